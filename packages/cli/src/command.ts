// Commands and their flags: a command declares its options (with Megatron's long names as
// aliases), node:util's parseArgs splits the words, and this file checks them strictly: an unknown
// flag, a flag given twice, a missing value or a stray argument is a usage error naming the fix.
import { parseArgs } from 'node:util';
import { UsageError } from './errors.js';
import type { Io } from './io.js';
import { closest } from './suggest.js';

/** One `--flag` of a command. */
export interface OptionSpec {
  readonly type: 'string' | 'boolean';
  /** What it does, with its unit; shown in help. */
  readonly description: string;
  /** Placeholder of the value in help (`N`, `DIR`); string options only. */
  readonly value?: string;
  /** Other long names accepted for it (Megatron's / Pai-Megatron-Patch's spellings). */
  readonly aliases?: readonly string[];
  /** Boolean flags that set this string option to a value (`--bf16` sets `--dtype bf16`). */
  readonly presets?: Readonly<Record<string, string>>;
  /** Value when the flag is absent (shown in help). */
  readonly default?: string | boolean;
  readonly required?: boolean;
}

/** A positional argument. */
export interface PositionalSpec {
  readonly name: string;
  readonly description: string;
  readonly required?: boolean;
}

/** Parsed flags by canonical name: strings for string options, booleans for boolean ones. */
export type OptionValues = Record<string, string | boolean | undefined>;

/** What a command's `run` receives. */
export interface RunContext {
  /** Flag values by canonical name (defaults applied). */
  readonly options: OptionValues;
  readonly positionals: readonly string[];
  /** stdout/stderr, interrupts and the outputs this run claims. */
  readonly io: Io;
  /** The words after `--`, unparsed, for a command with `passthrough` (null when there was no `--`). */
  readonly rest: readonly string[] | null;
  /** `--section.key value` pairs, for a command with `dottedOverrides` (in order). */
  readonly overrides?: readonly [string, string][];
}

/** A runnable command (a leaf of the command tree). */
export interface Command {
  /** The full name, e.g. `convert hf-to-megapatch`. */
  readonly name: string;
  /** One line for the command list. */
  readonly summary: string;
  /** A longer paragraph for its help page. */
  readonly description?: string;
  readonly positionals?: readonly PositionalSpec[];
  readonly options: Readonly<Record<string, OptionSpec>>;
  /** Example invocations (without the leading `megapatch `). */
  readonly examples?: readonly string[];
  /** The command takes every word after `--` as is (the worker command of `launch`). */
  readonly passthrough?: PositionalSpec;
  /**
   * Flags with a dot (`--training.lr 1e-4`, `--training.lr=1e-4`) and undeclared long flags
   * (Megatron's names: `--train-iters 10`, `--bf16`) are config overrides the command validates
   * itself (`megapatch train`); they come in `overrides`, not in `options`.
   */
  readonly dottedOverrides?: boolean;
  /**
   * How long the command has to stop by itself after SIGINT/SIGTERM before it is cut short, in ms
   * (default 10 s); null: as long as it takes (`train` finishes its iteration and saves its
   * checkpoint). A second signal always stops at once; MEGAPATCH_STOP_GRACE_S overrides it.
   */
  readonly stopGraceMs?: number | null;
  /** Returns nothing (exit 0) or an exit code of its own (`launch` passes on a worker's). */
  // biome-ignore lint/suspicious/noConfusingVoidType: a command that returns nothing exits 0
  run(ctx: RunContext): Promise<void | number> | void | number;
}

/** An entry of a command group: loaded only when used, so `megapatch info` pays for nothing else. */
export interface CommandEntry {
  readonly summary: string;
  readonly load: () => Promise<Command | CommandGroup>;
}

/** A command with subcommands (`convert`, `ckpt`, ...). */
export interface CommandGroup {
  readonly name: string;
  readonly summary: string;
  readonly commands: Readonly<Record<string, CommandEntry>>;
}

export const isGroup = (c: Command | CommandGroup): c is CommandGroup => 'commands' in c;

/** Flags every command accepts. */
export const GLOBAL_OPTIONS: Readonly<Record<string, OptionSpec>> = {
  help: { type: 'boolean', description: 'show this help' },
  debug: { type: 'boolean', description: 'print stack traces of errors (also MEGAPATCH_DEBUG=1)' },
  // taken out of the command line before parsing (see plugins.ts); listed here for the help
  plugin: {
    type: 'string',
    description:
      'import a plugin package (name or path) that adds an architecture, before the command runs; repeatable',
  },
};

/** Every name a flag answers to, with the canonical option and, for presets, the value it sets. */
function flagTable(options: Readonly<Record<string, OptionSpec>>) {
  const table = new Map<string, { option: string; preset?: string }>();
  const add = (flag: string, entry: { option: string; preset?: string }) => {
    if (table.has(flag)) throw new Error(`internal: flag --${flag} is declared twice`);
    table.set(flag, entry);
  };
  for (const [name, spec] of Object.entries({ ...options, ...GLOBAL_OPTIONS })) {
    add(name, { option: name });
    for (const a of spec.aliases ?? []) add(a, { option: name });
    for (const [flag, value] of Object.entries(spec.presets ?? {}))
      add(flag, { option: name, preset: value });
  }
  return table;
}

/** The result of parsing a command line against a command. */
export interface ParsedArgs {
  options: OptionValues;
  positionals: string[];
  help: boolean;
  debug: boolean;
  /** `--section.key value` pairs (commands with dottedOverrides). */
  overrides: [string, string][];
}

/**
 * Takes config overrides out of argv: `--a.b value` / `--a.b=value`, and Megatron long flags the
 * command does not declare itself (`--train-iters 10`, `--data-path 0.3 a 0.7 b`, `--bf16`): such a
 * flag takes the words up to the next `--` flag (none: the value `true`). The command validates them.
 */
function takeOverrides(
  command: Command,
  argv: readonly string[],
  known: ReadonlySet<string>,
): { rest: string[]; overrides: [string, string][] } {
  const rest: string[] = [];
  const overrides: [string, string][] = [];
  for (let i = 0; i < argv.length; i++) {
    const w = argv[i];
    if (w === '--') {
      rest.push(...argv.slice(i));
      break;
    }
    const m = /^--([A-Za-z][\w-]*(?:\.[A-Za-z][\w-]*)+)(?:=(.*))?$/.exec(w);
    if (m) {
      let value = m[2];
      if (value === undefined) {
        value = argv[i + 1];
        if (value === undefined) throw new UsageError(`${w} needs a value`, command.name);
        i++;
      }
      overrides.push([m[1], value]);
      continue;
    }
    // Megatron spells a few flags with an underscore (--override-opt_param-scheduler)
    const f = /^--([a-z][a-z0-9_-]*)(?:=(.*))?$/.exec(w);
    if (!f || known.has(f[1])) {
      rest.push(w);
      continue;
    }
    if (f[2] !== undefined) {
      overrides.push([f[1], f[2]]);
      continue;
    }
    const words: string[] = [];
    while (i + 1 < argv.length && !argv[i + 1].startsWith('--')) words.push(argv[++i]);
    overrides.push([f[1], words.length === 0 ? 'true' : words.join(' ')]);
  }
  return { rest, overrides };
}

/**
 * Parses `argv` (the words after the command name) against `command`'s flags. Throws UsageError
 * for an unknown flag (with the nearest known one), a string flag without a value, a value given
 * to a boolean flag, a flag given twice (under any of its names), a missing required flag and
 * too many or too few positional arguments.
 */
export function parseCommandArgs(command: Command, argvIn: readonly string[]): ParsedArgs {
  const table = flagTable(command.options);
  const { rest: argv, overrides } = command.dottedOverrides
    ? takeOverrides(command, argvIn, new Set(table.keys()))
    : { rest: [...argvIn], overrides: [] as [string, string][] };
  const specOf = (option: string) => command.options[option] ?? GLOBAL_OPTIONS[option];
  const config: Record<string, { type: 'string' | 'boolean'; short?: string }> = {};
  for (const [flag, entry] of table) {
    config[flag] = { type: entry.preset !== undefined ? 'boolean' : specOf(entry.option).type };
  }
  config.help.short = 'h';
  // strict: false so that every word comes back as a token; the checks below are ours, with
  // messages that name the fix instead of parseArgs' multi-line ones.
  const { tokens } = parseArgs({
    args: [...argv],
    options: config,
    strict: false,
    allowPositionals: true,
    tokens: true,
  });
  const given = new Map<string, { raw: string; value: string | boolean }>();
  const positionals: string[] = [];
  for (const t of tokens ?? []) {
    if (t.kind === 'positional') {
      positionals.push(t.value);
      continue;
    }
    if (t.kind !== 'option') continue;
    const entry = table.get(t.name);
    if (!entry) throw unknownFlag(command, t.rawName, table);
    const spec = specOf(entry.option);
    let value: string | boolean;
    if (entry.preset !== undefined || spec.type === 'boolean') {
      if (t.value !== undefined) {
        throw new UsageError(`${t.rawName} takes no value (got ${JSON.stringify(t.value)})`, command.name);
      }
      value = entry.preset ?? true;
    } else {
      if (t.value === undefined) {
        throw new UsageError(
          `${t.rawName} needs a value${spec.value ? ` (${spec.value})` : ''}`,
          command.name,
        );
      }
      // parseArgs takes the next word as the value even when it is another flag.
      if (!t.inlineValue && t.value.startsWith('--')) {
        throw new UsageError(
          `${t.rawName} needs a value, got the flag ${t.value} (write ${t.rawName}=${t.value} if that is the value)`,
          command.name,
        );
      }
      value = t.value;
    }
    const before = given.get(entry.option);
    if (before) {
      const same =
        before.raw === t.rawName
          ? `${t.rawName} is given twice`
          : `${before.raw} and ${t.rawName} are the same option`;
      throw new UsageError(`${same}; give it once`, command.name);
    }
    given.set(entry.option, { raw: t.rawName, value });
  }
  const help = given.get('help')?.value === true;
  const debug = given.get('debug')?.value === true;
  const values: OptionValues = {};
  for (const [name, { value }] of given) values[name] = value;
  const options = withDefaults(command, values);
  for (const [name, spec] of Object.entries(command.options)) {
    if (options[name] === undefined && spec.required && !help) {
      throw new UsageError(
        `missing --${name}${spec.value ? ` ${spec.value}` : ''} (${spec.description})`,
        command.name,
      );
    }
  }
  if (!help) checkPositionals(command, positionals);
  return { options, positionals, help, debug, overrides };
}

function checkPositionals(command: Command, positionals: readonly string[]): void {
  const specs = command.positionals ?? [];
  // a passthrough command sees stray words itself, to say that they belong after --
  if (positionals.length > specs.length && !command.passthrough) {
    const extra = positionals[specs.length];
    const takes =
      specs.length === 0
        ? 'takes no positional arguments'
        : `takes ${specs.length === 1 ? 'one' : specs.length} (${specs.map((p) => p.name).join(', ')})`;
    const hint = extra.startsWith('-') ? '' : '; quote paths with spaces, and give flags as --name value';
    throw new UsageError(
      `unexpected argument ${JSON.stringify(extra)}: ${command.name} ${takes}${hint}`,
      command.name,
    );
  }
  for (let i = positionals.length; i < specs.length; i++) {
    if (specs[i].required)
      throw new UsageError(`missing <${specs[i].name}> (${specs[i].description})`, command.name);
  }
}

function unknownFlag(command: Command, raw: string, table: Map<string, unknown>): UsageError {
  const flags = [...table.keys()].map((f) => `--${f}`);
  // Megatron's argparse accepts `--append_eod`-style names nowhere, but users type them.
  const normalised = raw.startsWith('--') ? `--${raw.slice(2).replaceAll('_', '-')}` : raw;
  const near = flags.includes(normalised) ? normalised : closest(raw, flags);
  const hint = near ? ` (did you mean ${near}?)` : `; see megapatch help ${command.name}`;
  return new UsageError(`unknown option ${raw}${hint}`, command.name);
}

/** Flag values with `command`'s defaults for the flags not given (switches default to false). */
export function withDefaults(command: Command, args: OptionValues): OptionValues {
  const out: OptionValues = {};
  for (const [name, spec] of Object.entries(command.options)) {
    out[name] = args[name] ?? spec.default ?? (spec.type === 'boolean' ? false : undefined);
  }
  return out;
}
