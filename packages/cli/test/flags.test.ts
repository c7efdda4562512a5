// The command line through the real binary: strict flags, Megatron's aliases, help, one-line
// errors with exit codes, and stack traces only on request.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { join } from 'node:path';
import { Checkpoint } from '@megapatch/convert';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { afterAll, describe, expect, it } from 'vitest';
import { parseCommandArgs } from '../src/command.js';
import { describeErrno } from '../src/errors.js';
import { commands } from '../src/index.js';
import { closest, editDistance } from '../src/suggest.js';
import { BIN, listTree, megapatch, oneLine, QWEN3_TOKENIZER, tempDir } from './helpers.js';

const root = tempDir('flags');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const hf = join(root, 'hf');
writeSyntheticHfCheckpoint(
  hf,
  SYNTHETIC_MODELS.find((m) => m.id === 'qwen2')?.config as Record<string, unknown>,
  {
    seed: 3,
  },
);

/** Every runnable command, by its words. */
async function leafCommands(): Promise<string[][]> {
  const out: string[][] = [];
  for (const [name, entry] of Object.entries(commands.commands)) {
    const node = await entry.load();
    if ('commands' in node) for (const sub of Object.keys(node.commands)) out.push([name, sub]);
    else out.push([name]);
  }
  return out;
}

describe('unknown flags and stray arguments are usage errors (exit 2)', () => {
  it('every command rejects an unknown flag', async () => {
    const leaves = await leafCommands();
    expect(leaves.map((l) => l.join(' '))).toEqual([
      'info',
      'model info',
      'preprocess pretrain',
      'preprocess sft',
      'data samples',
      'convert hf-to-megapatch',
      'convert megapatch-to-hf',
      'convert reshard',
      'convert megatron-to-megapatch',
      'convert megapatch-to-megatron',
      'convert megatron-to-hf',
      'ckpt inspect',
      'generate',
      'eval',
      'train',
      'launch',
      'report',
    ]);
    for (const words of leaves) {
      const r = megapatch([...words, '--no-such-flag', '1']);
      expect(r.status, words.join(' ')).toBe(2);
      expect(oneLine(r.stderr)).toBe(
        `megapatch ${words.join(' ')}: unknown option --no-such-flag; see megapatch help ${words.join(' ')}`,
      );
    }
  });

  it('--tp2 writes nothing and suggests --tp', () => {
    const out = join(root, 'tp2');
    const r = megapatch(['convert', 'hf-to-megapatch', '--hf-dir', hf, '--out', out, '--tp2']);
    expect(r.status).toBe(2);
    expect(oneLine(r.stderr)).toBe(
      'megapatch convert hf-to-megapatch: unknown option --tp2 (did you mean --tp?)',
    );
    expect(fs.existsSync(out)).toBe(false);
  });

  it('suggests the dashed name for --append_eod and the nearest one for --verfy', () => {
    const a = megapatch([
      'preprocess',
      'pretrain',
      '--input',
      'x.jsonl',
      '--tokenizer',
      't',
      '--output-prefix',
      'o',
      '--append_eod',
    ]);
    expect(a.status).toBe(2);
    expect(oneLine(a.stderr)).toContain('unknown option --append_eod (did you mean --append-eod?)');
    const v = megapatch(['ckpt', 'inspect', root, '--verfy']);
    expect(v.status).toBe(2);
    expect(oneLine(v.stderr)).toBe('megapatch ckpt inspect: unknown option --verfy (did you mean --verify?)');
  });

  it('a second positional argument is an error, not ignored', () => {
    const r = megapatch(['ckpt', 'inspect', 'A', 'B']);
    expect(r.status).toBe(2);
    expect(oneLine(r.stderr)).toMatch(
      /^megapatch ckpt inspect: unexpected argument "B": ckpt inspect takes one \(dir\)/,
    );
    const i = megapatch(['info', 'extra']);
    expect(i.status).toBe(2);
    expect(oneLine(i.stderr)).toMatch(/unexpected argument "extra": info takes no positional arguments/);
  });

  it('a flag without its value, a value for a switch, a flag given twice', () => {
    const cases: [string[], string][] = [
      [['convert', 'reshard', '--in', 'a', '--out'], '--out needs a value (DIR)'],
      [['convert', 'reshard', '--in', '--out', 'b'], '--in needs a value, got the flag --out'],
      [['ckpt', 'inspect', 'a', '--verify=yes'], '--verify takes no value (got "yes")'],
      [
        ['convert', 'reshard', '--in', 'a', '--out', 'b', '--tp', '2', '--tp', '4'],
        '--tp is given twice; give it once',
      ],
      [
        ['convert', 'reshard', '--in', 'a', '--out', 'b', '--tp', '2', '--tensor-model-parallel-size', '2'],
        '--tp and --tensor-model-parallel-size are the same option; give it once',
      ],
      [['convert', 'reshard', '--out', 'b'], 'missing --in DIR (megapatch checkpoint root)'],
      [['ckpt', 'inspect'], 'missing <dir> (checkpoint root or iter_NNNNNNN folder)'],
      [['convert'], 'missing command: one of hf-to-megapatch, megapatch-to-hf, reshard'],
      [['conver'], "unknown command 'conver' (did you mean 'convert'?)"],
      [['convert', 'hf-to-mcore'], "unknown command 'convert hf-to-mcore'"],
    ];
    for (const [args, message] of cases) {
      const r = megapatch(args);
      expect(r.status, args.join(' ')).toBe(2);
      expect(oneLine(r.stderr), args.join(' ')).toContain(message);
    }
  });

  it('bad values name the flag, in one line', () => {
    const cases: [string[], string][] = [
      [['--dtype', 'bf8'], "--dtype: must be bf16, fp16 or fp32 (or bfloat16, float16, float32), got 'bf8'"],
      [['--tp', '0'], '--tp: must be >= 1'],
      [['--tp', 'two'], '--tp: must be an integer'],
      [['--tp', '1e9'], '--tp: must be <= 65,536'],
      [['--make-vocab-size-divisible-by', '1.5'], '--make-vocab-size-divisible-by: must be an integer'],
    ];
    for (const [extra, message] of cases) {
      const out = join(root, 'bad');
      const r = megapatch(['convert', 'hf-to-megapatch', '--hf-dir', hf, '--out', out, ...extra]);
      expect(r.status, extra.join(' ')).toBe(2);
      expect(oneLine(r.stderr)).toBe(`megapatch convert hf-to-megapatch: ${message}`);
      expect(fs.existsSync(out)).toBe(false);
    }
  });
});

describe("Megatron's names and one dtype vocabulary", () => {
  it('--tensor-model-parallel-size, --load/--save and --bf16 give the same checkpoint as --tp, --hf-dir/--out and --dtype bf16', () => {
    const a = join(root, 'alias-a');
    const b = join(root, 'alias-b');
    const ra = megapatch([
      'convert',
      'hf-to-megapatch',
      '--hf-dir',
      hf,
      '--out',
      a,
      '--tp',
      '2',
      '--pp',
      '2',
      '--dtype',
      'bf16',
    ]);
    expect(ra.status, ra.stderr).toBe(0);
    const rb = megapatch([
      'convert',
      'hf-to-megapatch',
      '--load',
      hf,
      '--save',
      b,
      '--tensor-model-parallel-size',
      '2',
      '--pipeline-model-parallel-size=2',
      '--bf16',
    ]);
    expect(rb.status, rb.stderr).toBe(0);
    expect(listTree(b)).toEqual(listTree(a));
    const ca = Checkpoint.open(a);
    const cb = Checkpoint.open(b);
    expect(cb.metadata.layout).toEqual({ tp: 2, pp: 2, ep: 1, etp: 2, dp: 1 });
    expect(cb.metadata.tensors).toEqual(ca.metadata.tensors);
    ca.close();
    cb.close();
  });

  it('accepts bfloat16 / float16 / float32 wherever a dtype is taken', () => {
    const ckpt = join(root, 'alias-a');
    for (const [name, stored] of [
      ['bfloat16', 'BF16'],
      ['float16', 'F16'],
      ['float32', 'F32'],
    ]) {
      const out = join(root, `dtype-${name}`);
      const r = megapatch(['convert', 'reshard', '--in', ckpt, '--out', out, '--dtype', name]);
      expect(r.status, r.stderr).toBe(0);
      const c = Checkpoint.open(out);
      expect(c.info('decoder.layers.0.self_attention.linear_qkv.weight').dtype).toBe(stored);
      c.close();
    }
    const both = megapatch([
      'convert',
      'reshard',
      '--in',
      ckpt,
      '--out',
      join(root, 'x'),
      '--bf16',
      '--dtype',
      'fp32',
    ]);
    expect(both.status).toBe(2);
    expect(oneLine(both.stderr)).toContain('--bf16 and --dtype are the same option; give it once');
  });

  it('accepts the Megatron preprocessing names (--json-keys, --tokenizer-model, --tokenizer-type)', () => {
    const input = join(root, 'corpus.jsonl');
    fs.writeFileSync(
      input,
      `${['one two three', 'four five'].map((t) => JSON.stringify({ content: t })).join('\n')}\n`,
    );
    const r = megapatch([
      'preprocess',
      'pretrain',
      '--input',
      input,
      '--json-keys',
      'content',
      '--tokenizer-model',
      QWEN3_TOKENIZER,
      '--tokenizer-type',
      'HuggingFaceTokenizer',
      '--output-prefix',
      join(root, 'mg'),
      '--append-eod',
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain(`wrote ${join(root, 'mg')}_content_document.bin / .idx`);
    const t = megapatch([
      'preprocess',
      'pretrain',
      '--input',
      input,
      '--tokenizer',
      QWEN3_TOKENIZER,
      '--output-prefix',
      join(root, 'mg2'),
      '--tokenizer-type',
      'GPT2BPETokenizer',
    ]);
    expect(t.status).toBe(2);
    expect(oneLine(t.stderr)).toContain(
      '--tokenizer-type: megapatch reads Hugging Face tokenizer folders only',
    );
  });
});

describe('help', () => {
  it('megapatch help [command] and --help print the options, aliases included, without colour in a pipe', () => {
    for (const args of [
      ['help', 'convert', 'hf-to-megapatch'],
      ['convert', 'hf-to-megapatch', '--help'],
      ['convert', 'hf-to-megapatch', '-h'],
    ]) {
      const r = megapatch(args);
      expect(r.status, args.join(' ')).toBe(0);
      expect(r.stdout).toContain('Usage: megapatch convert hf-to-megapatch --hf-dir DIR --out DIR [options]');
      expect(r.stdout).toContain('--tensor-model-parallel-size');
      expect(r.stdout).toContain('--bf16');
      expect(r.stdout).not.toContain('\u001b[');
      expect(r.stderr).toBe('');
    }
    const top = megapatch(['help']);
    expect(top.status).toBe(0);
    for (const c of ['info', 'model', 'preprocess', 'data', 'convert', 'ckpt', 'help'])
      expect(top.stdout).toMatch(new RegExp(`^  ${c} `, 'm'));
    expect(megapatch([]).stdout).toBe(top.stdout);
    expect(megapatch(['help', 'convert']).stdout).toContain('reshard');
    const bad = megapatch(['help', 'nosuch']);
    expect(bad.status).toBe(2);
    expect(oneLine(bad.stderr)).toContain("unknown command 'nosuch'");
  });
});

describe('errors: one line, an exit code, a stack only on request', () => {
  it('a failed run exits 1 with one line naming the file', () => {
    const r = megapatch([
      'convert',
      'hf-to-megapatch',
      '--hf-dir',
      join(root, 'missing'),
      '--out',
      join(root, 'o1'),
    ]);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/^megapatch convert hf-to-megapatch: .*missing.*/);
  });

  it('--debug and MEGAPATCH_DEBUG=1 add the stack trace', () => {
    const args = ['convert', 'hf-to-megapatch', '--hf-dir', join(root, 'missing'), '--out', join(root, 'o1')];
    for (const r of [
      megapatch([...args, '--debug']),
      megapatch(['--debug', ...args]),
      megapatch(args, { MEGAPATCH_DEBUG: '1' }),
    ]) {
      expect(r.status).toBe(1);
      expect(r.stderr.split('\n')[0]).toMatch(/^megapatch convert hf-to-megapatch: /);
      expect(r.stderr).toMatch(/^\s+at /m);
    }
  });

  it('file-system failures name the operation and the path', () => {
    const file = join(root, 'a-file');
    fs.writeFileSync(file, 'x');
    const r = megapatch(['convert', 'hf-to-megapatch', '--hf-dir', hf, '--out', join(file, 'ckpt')]);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toBe(
      `megapatch convert hf-to-megapatch: cannot create the folder ${join(file, 'ckpt')}: a part of the path is a file, not a folder (ENOTDIR); check the path`,
    );
  });

  it('a full disk under stdout is one line and exit 1', () => {
    const fd = fs.openSync('/dev/full', 'w');
    try {
      const r = spawnSync(process.execPath, [BIN, 'info'], {
        stdio: ['ignore', fd, 'pipe'],
        encoding: 'utf8',
      });
      expect(r.status).toBe(1);
      expect(oneLine(r.stderr)).toBe(
        'megapatch info: cannot write to stdout: no space left on the device (ENOSPC); free some space or write somewhere else',
      );
    } finally {
      fs.closeSync(fd);
    }
  });

  it('describes EACCES, ENOSPC, EEXIST and ENOTDIR with the path and the operation', () => {
    const err = (code: string, syscall: string, path?: string, dest?: string) =>
      describeErrno({ code, syscall, path, dest, message: '' }, 'ckpt');
    expect(err('EACCES', 'open', '/data/x')).toBe(
      'cannot open /data/x: permission denied (EACCES); check the permissions of the path or choose another location',
    );
    expect(err('ENOSPC', 'write')).toBe(
      'cannot write (while writing ckpt): no space left on the device (ENOSPC); free some space or write somewhere else',
    );
    expect(err('EEXIST', 'mkdir', '/a')).toBe(
      'cannot create the folder /a: it already exists (EEXIST); remove it or choose another location',
    );
    expect(err('ENOTDIR', 'rename', '/a', '/b/c')).toBe(
      'cannot rename /a to /b/c: a part of the path is a file, not a folder (ENOTDIR); check the path',
    );
    expect(describeErrno({ code: 'EWHATEVER', message: '' })).toBeUndefined();
  });
});

describe('the parser and the suggestions', () => {
  it('edit distance and nearest candidates', () => {
    expect(editDistance('kitten', 'sitting')).toBe(3);
    expect(closest('--tp2', ['--tp', '--pp', '--ep', '--etp'])).toBe('--tp');
    expect(closest('--verfy', ['--json', '--verify', '--tensors'])).toBe('--verify');
    expect(closest('--zzzzzz', ['--json', '--verify'])).toBeUndefined();
  });

  it('keeps negative numbers and values after = as values', async () => {
    const node = await commands.commands.data.load();
    const samples = 'commands' in node ? await node.commands.samples.load() : node;
    if ('commands' in samples) throw new Error('expected a command');
    const p = parseCommandArgs(samples, [
      '--data-path',
      'd',
      '--seq-length=-1',
      '--train-samples',
      '5',
      '--seed',
      '-3',
    ]);
    expect(p.options['seq-length']).toBe('-1');
    expect(p.options.seed).toBe('-3');
    expect(p.options.split).toBe('969,30,1');
  });
});
