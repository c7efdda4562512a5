import * as fs from 'node:fs';
import { join } from 'node:path';
import { convertHfToMegapatch } from '@megapatch/convert';
import { IndexedDatasetBuilder, loadTokenizer } from '@megapatch/data';
import { evaluate, type GPTModel, loadModel } from '@megapatch/models';
import { megatronFixture, sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EvalReport } from '../src/commands/eval.js';
import { launched, listTree, megapatch, oneLine, tempDir } from './helpers.js';

const STORIES = sharedPath('data/models/stories260K/hf');
const TEXTS = [
  'Once upon a time, there was a little girl named Lily. She loved to play outside in the park.',
  'Tom had a red ball. He liked to throw it to his dog. One day the ball went into the river, and Tom was sad. His mom gave him a hug.',
  'The sun was hot. Sue and Ben went to the beach to swim and build a big sand castle.',
  'Hi.',
];

const root = tempDir('eval');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

/** The report of a successful `megapatch eval --json`. */
function report(args: string[]): EvalReport {
  const r = megapatch(['eval', ...args, '--json']);
  expect(r.status, r.stderr).toBe(0);
  expect(r.stderr).toBe('');
  return JSON.parse(r.stdout) as EvalReport;
}

describe('megapatch eval: usage errors exit 2 with one line', () => {
  it.each<[string, string[], string]>([
    ['no data', ['--model', 'm', '--seq-length', '8'], 'missing --data PATH'],
    ['no seq length', ['--model', 'm', '--data', 'd'], 'missing --seq-length N'],
    ['a zero seq length', ['--model', 'm', '--data', 'd', '--seq-length', '0'], '--seq-length: must be >= 1'],
    [
      'a zero batch',
      ['--model', 'm', '--data', 'd', '--seq-length', '8', '--micro-batch-size', '0'],
      '--batch-size: must be >= 1',
    ],
    [
      'missing data',
      ['--model', 'm', '--data', '/no/such', '--seq-length', '8'],
      '--data /no/such: no such file, and no /no/such.bin / /no/such.idx',
    ],
  ])('%s', (_, args, message) => {
    const r = megapatch(['eval', ...args]);
    expect(r.status, r.stderr).toBe(2);
    expect(oneLine(r.stderr)).toContain(`megapatch eval: ${message}`);
  });
});

describe('megapatch eval and generate on a Megatron-LM checkpoint with --hf-dir', () => {
  it.each(['llama-tp2-pp2', 'llama-dist-tp2'])(
    '%s: the loss of its HF weights; no tokenizer is one line',
    (name) => {
      const { hf, megatron } = megatronFixture(name);
      const ids = join(root, `${name}-ids.jsonl`);
      fs.writeFileSync(ids, `${JSON.stringify({ ids: [1, 5, 9, 33, 17, 7, 8, 39, 2, 11] })}\n`);
      const common = ['--data', ids, '--seq-length', '8'];
      const fromHf = report(['--model', hf, ...common]);
      const fromMegatron = report(['--model', megatron, '--hf-dir', hf, ...common]);
      expect(fromMegatron.tokens).toBe(fromHf.tokens);
      expect(fromMegatron.meanLoss).toBe(fromHf.meanLoss);
      // without --hf-dir: the conversion command, or --hf-dir
      const r = megapatch(['eval', '--model', megatron, ...common]);
      expect(r.status).toBe(1);
      expect(oneLine(r.stderr)).toMatch(
        /is a Megatron-LM checkpoint in the torch(_dist)? format .*--hf-dir on the command line/,
      );
      const g = megapatch(['generate', '--model', megatron, '--hf-ckpt-path', hf, '--prompt', 'x']);
      expect(g.status).toBe(1);
      expect(oneLine(g.stderr)).toContain('holds no tokenizer files');
    },
  );
});

describe.skipIf(skipWithoutShared(import.meta.url))('megapatch eval on stories260K', () => {
  let model: GPTModel;
  let documents: number[][];
  const text = join(root, 'text.jsonl');
  const ids = join(root, 'ids.jsonl');
  const prefix = join(root, 'indexed');

  beforeAll(async () => {
    const tok = await loadTokenizer(STORIES);
    // BOS, the text without other special tokens, EOD: the convention megapatch eval documents
    documents = TEXTS.map((t) => [
      tok.bosId as number,
      ...tok.encode(t, { addSpecialTokens: false }),
      tok.eodId,
    ]);
    fs.writeFileSync(text, `${TEXTS.map((t) => JSON.stringify({ text: t })).join('\n')}\n\n`);
    fs.writeFileSync(ids, documents.map((d) => JSON.stringify({ ids: d })).join('\n'));
    const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
    for (const d of documents) b.addDocument(d);
    b.finalize();
    ({ model } = loadModel(STORIES));
  });
  afterAll(() => model?.dispose());

  it('a text JSONL, the same ids and the indexed dataset all give the loss evaluate() gives', () => {
    for (const seqLength of [256, 8]) {
      const want = evaluate(model, documents, { seqLength });
      const fromText = report(['--model', STORIES, '--data', text, '--seq-length', String(seqLength)]);
      const fromIds = report(['--model', STORIES, '--data', ids, '--seq-length', String(seqLength)]);
      const fromIndexed = report([
        '--model',
        STORIES,
        '--data',
        `${prefix}.bin`,
        '--seq-length',
        String(seqLength),
      ]);
      expect([fromText.format, fromIds.format, fromIndexed.format]).toEqual([
        'text-jsonl',
        'ids-jsonl',
        'indexed',
      ]);
      expect(fromIndexed.data).toBe(prefix);
      for (const r of [fromText, fromIds, fromIndexed]) {
        expect(r.sequences).toBe(TEXTS.length);
        expect(r.tokens).toBe(want.tokens);
        expect(r.meanLoss).toBeCloseTo(want.meanLoss, 9);
        expect(Number.isFinite(r.perplexity)).toBe(true);
        expect(r.perplexity).toBeCloseTo(Math.exp(r.meanLoss), 9);
        expect(r.seqLength).toBe(seqLength);
        expect(r.tokensPerSecond).toBeGreaterThan(0);
      }
    }
  });

  it('the trained model finds its own kind of text likely', () => {
    const r = report(['--model', STORIES, '--data', text, '--seq-length', '256']);
    // the README reports a validation loss of 1.2968 on TinyStories
    expect(r.meanLoss).toBeGreaterThan(0.5);
    expect(r.meanLoss).toBeLessThan(3);
  });

  it('prints plain lines without --json', () => {
    const r = megapatch(['eval', '--model', STORIES, '--data', ids, '--seq-length', '64']);
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines[0]).toMatch(/^mean loss: \d+\.\d{6}, perplexity: \d+\.\d{4}$/);
    expect(lines[1]).toMatch(/^documents: 4, tokens: \d+, seconds: [\d.]+, tokens\/s: [\d.]+$/);
  });

  it('--per-token-logprobs writes one {"ids", "logprobs"} line per document, atomically', () => {
    const out = join(root, 'out', 'logprobs.jsonl');
    fs.mkdirSync(join(root, 'out'));
    const r = report(['--model', STORIES, '--data', text, '--seq-length', '16', '--per-token-logprobs', out]);
    const want = evaluate(model, documents, { seqLength: 16, perTokenLogprobs: true }).perSequence ?? [];
    const lines = fs
      .readFileSync(out, 'utf8')
      .trimEnd()
      .split('\n')
      .map((l) => JSON.parse(l) as { ids: number[]; logprobs: number[] });
    expect(lines.map((l) => l.ids)).toEqual(documents);
    let sum = 0;
    for (const [i, l] of lines.entries()) {
      expect(Object.keys(l)).toEqual(['ids', 'logprobs']);
      expect(l.logprobs).toHaveLength(documents[i].length - 1);
      for (const [j, x] of l.logprobs.entries()) {
        expect(x).toBeLessThanOrEqual(0);
        expect(x).toBeCloseTo(want[i].logprobs[j], 6);
        sum -= x;
      }
    }
    expect(sum / r.tokens).toBeCloseTo(r.meanLoss, 6);
    expect(listTree(join(root, 'out'))).toEqual(['logprobs.jsonl']);

    const again = megapatch([
      'eval',
      '--model',
      STORIES,
      '--data',
      text,
      '--seq-length',
      '16',
      '--per-token-logprobs',
      out,
    ]);
    expect(again.status).toBe(1);
    expect(oneLine(again.stderr)).toBe(
      `megapatch eval: --per-token-logprobs ${out} exists; pass --overwrite to replace it`,
    );
    report([
      '--model',
      STORIES,
      '--data',
      ids,
      '--seq-length',
      '16',
      '--per-token-logprobs',
      out,
      '--overwrite',
    ]);
    expect(listTree(join(root, 'out'))).toEqual(['logprobs.jsonl']);

    const notes = join(root, 'out', 'notes.txt');
    fs.writeFileSync(notes, 'my notes\n');
    const refused = megapatch([
      'eval',
      '--model',
      STORIES,
      '--data',
      ids,
      '--seq-length',
      '16',
      '--per-token-logprobs',
      notes,
      '--overwrite',
    ]);
    expect(refused.status).toBe(1);
    expect(oneLine(refused.stderr)).toContain(
      `--per-token-logprobs ${notes} is not a file megapatch eval wrote`,
    );
    expect(fs.readFileSync(notes, 'utf8')).toBe('my notes\n');
  });

  it('a failed run leaves no logprobs file, no temporary and no lock', () => {
    const bad = join(root, 'late-bad.jsonl');
    fs.writeFileSync(bad, `${JSON.stringify({ ids: documents[0] })}\n${JSON.stringify({ ids: [1, 999] })}\n`);
    const out = join(root, 'out2', 'lp.jsonl');
    const r = megapatch([
      'eval',
      '--model',
      STORIES,
      '--data',
      bad,
      '--seq-length',
      '8',
      '--batch-size',
      '1',
      '--per-token-logprobs',
      out,
    ]);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toBe(
      `megapatch eval: ${bad} line 2: ids[1] = 999 is not a token id of the model (0 to 511)`,
    );
    expect(fs.existsSync(join(root, 'out2')) ? fs.readdirSync(join(root, 'out2')) : []).toEqual([]);
  });

  it('bad input is one line naming the file and the line', () => {
    const cases: [string, string][] = [
      [
        '{"text": "a b"}\n{"text": 3}\n',
        'line 2: no string field "text" (set --json-key, or give {"ids": [...]} on every line)',
      ],
      ['{"text": "a b"}\nnot json\n', 'line 2: not valid JSON'],
      ['[1, 2]\n', 'line 1: expected a JSON object'],
      ['{"ids": [1, 2]}\n{"text": "a"}\n', 'line 2: expected {"ids": [...]} like the first line'],
      ['\n', 'holds no documents'],
      ['{"ids": [1]}\n', 'nothing to score (1 documents, none with 2 tokens or more)'],
    ];
    for (const [i, [content, message]] of cases.entries()) {
      const file = join(root, `bad-${i}.jsonl`);
      fs.writeFileSync(file, content);
      const r = megapatch(['eval', '--model', STORIES, '--data', file, '--seq-length', '8']);
      expect(r.status, content).toBe(1);
      expect(oneLine(r.stderr)).toContain(
        `megapatch eval: ${file}${message.startsWith('nothing') ? ':' : ''} ${message}`,
      );
    }
  });

  it('a TP=2 checkpoint under megapatch launch --nproc-per-node 2 gives the loss of one process', async () => {
    const tp2 = join(root, 'tp2');
    await convertHfToMegapatch({ hfDir: STORIES, output: tp2, layout: { tp: 2 } });
    const out = join(root, 'tp2-logprobs.jsonl');
    const args = ['eval', '--model', tp2, '--data', text, '--seq-length', '16', '--json'];
    const r = launched(2, [...args, '--per-token-logprobs', out]);
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines).toHaveLength(1);
    const distributed = JSON.parse(lines[0]) as EvalReport;
    const single = report(args.slice(1, -1));
    expect(distributed.tokens).toBe(single.tokens);
    expect(distributed.meanLoss).toBeCloseTo(single.meanLoss, 6);
    expect(fs.readFileSync(out, 'utf8').trimEnd().split('\n')).toHaveLength(TEXTS.length);
  });

  it('--json-key reads another field; a seq length past the model is a usage error', () => {
    const file = join(root, 'content.jsonl');
    fs.writeFileSync(file, TEXTS.map((t) => JSON.stringify({ content: t })).join('\n'));
    const a = report(['--model', STORIES, '--data', file, '--seq-length', '32', '--json-key', 'content']);
    const b = report(['--model', STORIES, '--data', text, '--seq-length', '32']);
    expect(a.meanLoss).toBe(b.meanLoss);
    const r = megapatch(['eval', '--model', STORIES, '--data', text, '--seq-length', '513']);
    expect(r.status).toBe(2);
    expect(oneLine(r.stderr)).toBe(
      "megapatch eval: --seq-length 513 exceeds the model's 512 positions (max_position_embeddings)",
    );
  });
});
