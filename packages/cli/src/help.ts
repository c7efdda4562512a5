// Help pages: plain text, with bold headings only on a terminal (never in a pipe or with NO_COLOR).
import { type Command, type CommandGroup, GLOBAL_OPTIONS, type OptionSpec } from './command.js';

const bold = (color: boolean, s: string) => (color ? `\u001b[1m${s}\u001b[22m` : s);

/** Wraps `text` to `width` columns, indenting continuation lines by `indent`. */
function wrap(text: string, width: number, indent: number): string {
  const words = text.split(/\s+/).filter(Boolean);
  const lines: string[] = [];
  let line = '';
  for (const w of words) {
    if (line && line.length + 1 + w.length > width) {
      lines.push(line);
      line = w;
    } else line = line ? `${line} ${w}` : w;
  }
  if (line) lines.push(line);
  return lines.join(`\n${' '.repeat(indent)}`);
}

function flagText(name: string, spec: OptionSpec): string {
  const short = name === 'help' ? '-h, ' : '';
  return spec.type === 'string' ? `${short}--${name} ${spec.value ?? 'VALUE'}` : `${short}--${name}`;
}

function optionLines(options: Readonly<Record<string, OptionSpec>>): string[] {
  const entries = Object.entries(options);
  const col = Math.min(34, Math.max(...entries.map(([n, s]) => flagText(n, s).length)) + 2);
  const lines: string[] = [];
  for (const [name, spec] of entries) {
    const notes: string[] = [];
    if (spec.required) notes.push('required');
    if (spec.default !== undefined && spec.default !== false) notes.push(`default ${spec.default}`);
    const also = [
      ...(spec.aliases ?? []).map((a) => `--${a}`),
      ...Object.keys(spec.presets ?? {}).map((p) => `--${p}`),
    ];
    const text = `${spec.description}${notes.length ? ` (${notes.join(', ')})` : ''}${also.length ? `; also ${also.join(', ')}` : ''}`;
    const flag = flagText(name, spec);
    const pad = flag.length + 2 > col ? `\n${' '.repeat(2 + col)}` : ' '.repeat(col - flag.length);
    lines.push(`  ${flag}${pad}${wrap(text, 100 - col, 2 + col)}`);
  }
  return lines;
}

/** The help page of a command. */
export function commandHelp(c: Command, color: boolean): string {
  const positionals = (c.positionals ?? []).map((p) => (p.required ? `<${p.name}>` : `[${p.name}]`));
  const required = Object.entries(c.options)
    .filter(([, s]) => s.required)
    .map(([n, s]) => `--${n} ${s.value ?? 'VALUE'}`);
  const out = [
    `megapatch ${c.name} — ${c.summary}`,
    '',
    `${bold(color, 'Usage:')} megapatch ${[c.name, ...positionals, ...required, '[options]', ...(c.passthrough ? [`-- <${c.passthrough.name}>`] : [])].join(' ')}`,
  ];
  if (c.description) out.push('', wrap(c.description, 100, 0));
  if (c.positionals?.length || c.passthrough) {
    out.push('', bold(color, 'Arguments:'));
    for (const p of c.positionals ?? []) out.push(`  ${p.name.padEnd(20)} ${p.description}`);
    if (c.passthrough) out.push(`  ${`-- ${c.passthrough.name}`.padEnd(20)} ${c.passthrough.description}`);
  }
  if (Object.keys(c.options).length) out.push('', bold(color, 'Options:'), ...optionLines(c.options));
  out.push('', bold(color, 'Global options:'), ...optionLines(GLOBAL_OPTIONS));
  if (c.examples?.length) {
    out.push('', bold(color, 'Examples:'));
    for (const e of c.examples) out.push(`  megapatch ${e}`);
  }
  return out.join('\n');
}

/** The help page of a group: its commands with their summaries. */
export function groupHelp(g: CommandGroup, color: boolean, version?: string): string {
  const name = g.name ? `megapatch ${g.name}` : 'megapatch';
  const width = Math.max(4, ...Object.keys(g.commands).map((n) => n.length)) + 2;
  const out = [
    `${name} — ${g.summary}${version ? ` (version ${version})` : ''}`,
    '',
    `${bold(color, 'Usage:')} ${name} <command> [options]`,
    '',
    bold(color, 'Commands:'),
  ];
  for (const [n, e] of Object.entries(g.commands)) out.push(`  ${n.padEnd(width)}${e.summary}`);
  if (!g.name) out.push(`  ${'help'.padEnd(width)}the help of a command: megapatch help [command ...]`);
  out.push('', `Run 'megapatch help ${g.name ? `${g.name} ` : ''}<command>' for a command's options.`);
  if (!g.name) {
    out.push(
      '',
      bold(color, 'Global options:'),
      ...optionLines({ ...GLOBAL_OPTIONS, version: { type: 'boolean', description: 'print the version' } }),
      '',
      'Exit codes: 0 done, 1 failed, 2 bad command line, 130/143 interrupted (SIGINT/SIGTERM), 141 stdout closed.',
    );
  }
  return out.join('\n');
}
