import * as fs from 'node:fs';
import { join } from 'node:path';
import { convertHfToMegapatch } from '@megapatch/convert';
import { loadTokenizer } from '@megapatch/data';
import { type GPTModel, generate, loadModel, scoreContinuations } from '@megapatch/models';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodePair, predictionOf, type TaskEvalReport } from '../src/commands/eval-task.js';
import { launched, megapatch, oneLine, tempDir } from './helpers.js';

const STORIES = sharedPath('data/models/stories260K/hf');
const root = tempDir('eval-task');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

/** Words with their leading space as one token ("▁B"), a lone space as "▁": SentencePiece's way. */
const vocab = new Map<string, number>();
const wordTok = {
  bosId: 1,
  eodId: 2,
  encode: (s: string) =>
    (s.match(/ ?[^ ]+| /g) ?? []).map((w) => {
      if (!vocab.has(w)) vocab.set(w, 10 + vocab.size);
      return vocab.get(w) as number;
    }),
};
const id = (w: string) => wordTok.encode(w)[0];

describe("lm-evaluation-harness's (context, continuation) split", () => {
  it('scores the continuation as the tokens that follow the context, trailing spaces moved to it', () => {
    // "Answer: " + "B": the space leaves the context and the continuation is the one token " B"
    expect(encodePair(wordTok, 'Answer: ', 'B')).toEqual({
      context: [id('Answer:')],
      continuation: [id(' B')],
    });
    expect(encodePair(wordTok, 'Answer:', ' B')).toEqual({
      context: [id('Answer:')],
      continuation: [id(' B')],
    });
    expect(encodePair(wordTok, 'The cat sat', ' on the mat')).toEqual({
      context: [id('The'), id(' cat'), id(' sat')],
      continuation: [id(' on'), id(' the'), id(' mat')],
    });
    // an empty context is the end-of-text token; --add-bos starts the context with BOS
    expect(encodePair(wordTok, '', 'Hello there')).toEqual({
      context: [2],
      continuation: [id('Hello'), id(' there')],
    });
    expect(encodePair(wordTok, 'Q', ' A', true)).toEqual({ context: [1, id('Q')], continuation: [id(' A')] });
  });
});

describe('generate-until predictions', () => {
  it('cut at the first stop string, or taken from the answer regex', () => {
    expect(predictionOf(' 42\n\nQuestion: more', ['\n\n'], null)).toBe('42');
    expect(predictionOf('so the answer is 17. Then', ['\n\n', 'Then'], /answer is (\d+)/)).toBe('17');
    expect(predictionOf('#### 3', [], /#### \d+/)).toBe('#### 3');
    expect(predictionOf('no number', [], /(\d+)/)).toBe('[invalid]');
  });
});

describe('megapatch eval --task: usage', () => {
  it.each<[string, string[], string]>([
    [
      'an unknown task',
      ['--task', 'mmlu'],
      "--task: must be 'perplexity', 'multiple-choice', 'loglikelihood' or 'generate-until'",
    ],
    [
      'a task flag with perplexity',
      ['--per-doc', 'x.jsonl'],
      '--per-doc does not apply to --task perplexity',
    ],
    [
      'a perplexity flag with a task',
      ['--task', 'multiple-choice', '--per-token-logprobs', 'x.jsonl'],
      '--per-token-logprobs does not apply to --task multiple-choice',
    ],
  ])('%s', (_, args, message) => {
    const r = megapatch(['eval', '--model', 'm', '--data', 'd', '--seq-length', '8', ...args]);
    expect(r.status, r.stderr).toBe(2);
    expect(oneLine(r.stderr)).toContain(`megapatch eval: ${message}`);
  });
});

const QUESTIONS = [
  { context: 'Lily went to the park. She played on the', choices: ['swing.', 'moon of Jupiter.'], label: 0 },
  { context: 'Tom had a red ball. He liked to throw the', choices: ['ball.', 'tax return forms.'], label: 0 },
  { context: 'One day, a little girl named', choices: ['Sue went to the store.', 'quantum.'], label: 0 },
  { context: 'The sun was hot. Sue and Ben went to the', choices: ['nuclear reactor.', 'beach.'], label: 1 },
  { context: 'Once upon a time, there was a little', choices: ['girl.', 'transistor.', 'dog.'], label: 2 },
];

describe.skipIf(skipWithoutShared(import.meta.url))('megapatch eval --task on stories260K', () => {
  let model: GPTModel;
  const mc = join(root, 'mc.jsonl');
  const ll = join(root, 'll.jsonl');
  beforeAll(() => {
    fs.writeFileSync(mc, `${QUESTIONS.map((q) => JSON.stringify(q)).join('\n')}\n`);
    fs.writeFileSync(
      ll,
      QUESTIONS.map((q) => JSON.stringify({ context: q.context, continuation: q.choices[q.label] })).join(
        '\n',
      ),
    );
    ({ model } = loadModel(STORIES));
  });
  afterAll(() => model?.dispose());

  /** `megapatch eval` of a multiple-choice file on stories260K, as plain text. */
  const multipleChoice = (data: string) =>
    megapatch([
      'eval',
      '--model',
      STORIES,
      '--data',
      data,
      '--seq-length',
      '64',
      '--task',
      'multiple-choice',
    ]);
  const run = (args: string[]) => {
    const seq = args.includes('--seq-length') ? [] : ['--seq-length', '64'];
    const r = megapatch(['eval', '--model', STORIES, ...seq, ...args, '--json']);
    expect(r.status, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as TaskEvalReport;
  };

  it('multiple-choice: acc and acc_norm of the log-likelihoods scoreContinuations gives, per document', async () => {
    const tok = await loadTokenizer(STORIES);
    const perDoc = join(root, 'mc-docs.jsonl');
    const r = run(['--task', 'multiple-choice', '--data', mc, '--per-doc', perDoc, '--batch-size', '3']);
    const lines = fs
      .readFileSync(perDoc, 'utf8')
      .trimEnd()
      .split('\n')
      .map((l) => JSON.parse(l));
    expect(lines).toHaveLength(QUESTIONS.length);
    let hits = 0;
    let normHits = 0;
    for (const [i, q] of QUESTIONS.entries()) {
      const want = scoreContinuations(
        model,
        q.choices.map((c) => encodePair(tok, q.context, ` ${c}`)),
        { seqLength: 64 },
      );
      const lls = want.map((s) => s.loglikelihood);
      expect(lines[i].doc).toBe(i);
      expect(lines[i].label).toBe(q.label);
      lines[i].loglikelihoods.forEach((x: number, j: number) => {
        expect(x).toBeCloseTo(lls[j], 4); // batched differently: float32 rounding
      });
      expect(lines[i].greedy).toEqual(want.map((s) => s.greedy));
      const pred = lls.indexOf(Math.max(...lls));
      const norm = lls.map((x, j) => x / q.choices[j].length);
      const predNorm = norm.indexOf(Math.max(...norm));
      expect([lines[i].pred, lines[i].predNorm]).toEqual([pred, predNorm]);
      hits += pred === q.label ? 1 : 0;
      normHits += predNorm === q.label ? 1 : 0;
    }
    const n = QUESTIONS.length;
    expect([r.task, r.documents, r.requests, r.truncated]).toEqual(['multiple-choice', n, 11, 0]);
    expect(r.acc).toBe(hits / n);
    expect(r.accNorm).toBe(normHits / n);
    const p = hits / n;
    expect(r.accStderr).toBeCloseTo(Math.sqrt((p * (1 - p) * n) / (n - 1) / n), 12);
    // a model trained on children's stories prefers their words
    expect(r.acc).toBeGreaterThanOrEqual(0.8);
  });

  it('loglikelihood: the mean, perplexity and greedy accuracy; a short --seq-length cuts contexts', () => {
    const r = run(['--task', 'loglikelihood', '--data', ll]);
    expect([r.task, r.documents, r.requests]).toEqual(['loglikelihood', QUESTIONS.length, QUESTIONS.length]);
    expect(r.perplexity).toBeCloseTo(Math.exp(-(r.meanLoglikelihood as number)), 12);
    expect(r.meanLoglikelihood).toBeLessThan(0);
    expect(r.acc).toBeGreaterThanOrEqual(0);
    const cut = run(['--task', 'loglikelihood', '--data', ll, '--seq-length', '12']);
    expect(cut.truncated).toBeGreaterThan(0);
    expect(cut.meanLoglikelihood).not.toBe(r.meanLoglikelihood);
    // a continuation longer than --seq-length cannot be scored
    const long = megapatch([
      'eval',
      '--model',
      STORIES,
      '--data',
      ll,
      '--seq-length',
      '6',
      '--task',
      'loglikelihood',
    ]);
    expect(long.status).toBe(1);
    expect(oneLine(long.stderr)).toContain(
      `${ll} line 3: the continuation has 11 tokens, more than --seq-length 6`,
    );
  });

  it('under megapatch launch --nproc-per-node 2 (TP=2), the log-likelihoods of one process', async () => {
    const tp2 = join(root, 'tp2');
    await convertHfToMegapatch({ hfDir: STORIES, output: tp2, layout: { tp: 2 } });
    const docs = [join(root, 'tp2-docs.jsonl'), join(root, 'one-docs.jsonl')];
    const args = [
      'eval',
      '--model',
      tp2,
      '--data',
      mc,
      '--seq-length',
      '64',
      '--task',
      'multiple-choice',
      '--json',
    ];
    const r = launched(2, [...args, '--per-doc', docs[0]]);
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines).toHaveLength(1);
    const distributed = JSON.parse(lines[0]) as TaskEvalReport;
    const single = megapatch([...args, '--per-doc', docs[1]]);
    expect(single.status, single.stderr).toBe(0);
    expect(distributed.acc).toBe((JSON.parse(single.stdout) as TaskEvalReport).acc);
    const [a, b] = docs.map((f) =>
      fs
        .readFileSync(f, 'utf8')
        .trimEnd()
        .split('\n')
        .map((l) => JSON.parse(l)),
    );
    for (const [i, d] of a.entries()) {
      expect(d.pred).toBe(b[i].pred);
      d.loglikelihoods.forEach((x: number, j: number) => {
        expect(x).toBeCloseTo(b[i].loglikelihoods[j], 4);
      });
    }
  });

  it('generate-until: exact match of the greedy generation, one document at a time as generate() gives it', async () => {
    const tok = await loadTokenizer(STORIES);
    const contexts = [
      'Lily went to the park. She',
      'Tom had a red ball. He',
      'Once upon a time, there was a little',
    ];
    const greedy = contexts.map((c) => {
      const r = generate(model, [tok.encode(c, { addSpecialTokens: false })], {
        maxNewTokens: 12,
        temperature: 0,
        eosTokenIds: [tok.eosId],
        stopStrings: ['.'],
        decode: (ids) => tok.decode(ids, { skipSpecialTokens: true }),
      }).rows[0];
      return ((row) =>
        row.finishReason === 'stop'
          ? (row.text as string)
          : tok.decode(row.tokens, { skipSpecialTokens: true }))(r);
    });
    // the first two targets are what the model writes, the third is not
    const targets = [greedy[0], greedy[1], 'a purple elephant'];
    const file = join(root, 'gen.jsonl');
    fs.writeFileSync(
      file,
      contexts.map((c, i) => JSON.stringify({ context: c, continuation: targets[i] })).join('\n'),
    );
    const perDoc = join(root, 'gen-docs.jsonl');
    const r = run([
      '--task',
      'generate-until',
      '--data',
      file,
      '--until',
      '.',
      '--max-gen-toks',
      '12',
      '--batch-size',
      '1',
      '--per-doc',
      perDoc,
    ]);
    expect([r.task, r.documents, r.acc]).toEqual(['generate-until', 3, 2 / 3]);
    const lines = fs
      .readFileSync(perDoc, 'utf8')
      .trimEnd()
      .split('\n')
      .map((l) => JSON.parse(l));
    expect(lines.map((l) => l.generation)).toEqual(greedy);
    expect(lines.map((l) => l.exact)).toEqual([true, true, false]);
  });

  it('prints plain lines, and bad documents are one line naming the file and the line', () => {
    const plain = multipleChoice(mc);
    expect(plain.status, plain.stderr).toBe(0);
    expect(plain.stdout).toMatch(
      /^acc: [\d.]+ ± [\d.]+, acc_norm: [\d.]+ ± [\d.]+\ndocuments: 5, requests: 11, truncated: 0, seconds: /,
    );
    const bad = join(root, 'bad.jsonl');
    for (const [line, message] of [
      [
        '{"context": "a", "choices": ["b", "c"], "label": 2}',
        `${bad} line 2: "label" must be the index of the right choice, 0 to 1, not 2`,
      ],
      [
        '{"context": "a", "choices": ["b"], "label": 0}',
        `${bad} line 2: "choices" must be a list of at least 2 strings`,
      ],
      [
        '{"question": "a", "choices": ["b", "c"], "label": 0}',
        `${bad} line 2: no string field "context" (set --context-key)`,
      ],
    ]) {
      fs.writeFileSync(bad, `${JSON.stringify(QUESTIONS[0])}\n${line}\n`);
      const r = multipleChoice(bad);
      expect(r.status, r.stderr).toBe(1);
      expect(oneLine(r.stderr)).toContain(message);
    }
    // --context-key and friends read other fields (the harness's hellaswag-like "query", "gold")
    const other = join(root, 'other.jsonl');
    fs.writeFileSync(
      other,
      QUESTIONS.map((q) => JSON.stringify({ query: q.context, endings: q.choices, gold: q.label })).join(
        '\n',
      ),
    );
    const r = run([
      '--task',
      'multiple-choice',
      '--data',
      other,
      '--context-key',
      'query',
      '--choices-key',
      'endings',
      '--label-key',
      'gold',
    ]);
    expect(r.documents).toBe(QUESTIONS.length);
  });
});
