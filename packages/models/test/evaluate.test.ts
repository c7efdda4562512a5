// evaluate() against a direct computation: the log-softmax of the logits of model.forward(ids)
// through gatherLogits, on the fixture Llama; windows, batching and vocabulary padding must not
// change a single log-probability.
import { fromTypedArray, memoryStats, type Tensor } from '@megapatch/tensor';
import { afterAll, describe, expect, it } from 'vitest';
import {
  evaluate,
  GPTModel,
  loadModel,
  loadWeights,
  type GPTModel as Model,
  openWeights,
} from '../src/index.js';
import { fixtureCheckpoint } from './helpers/fixtures.js';

/** log p(ids[i + 1] | ids[..i]) for one sequence, from the full logits (float64 log-softmax). */
function directLogprobs(model: Model, ids: number[]): number[] {
  const t = fromTypedArray(BigInt64Array.from(ids, BigInt), [1, ids.length]);
  const logits = model.forward(t).logits as Tensor;
  const real = model.gatherLogits(logits).contiguous().to('float32');
  const v = model.config.vocabSize;
  const flat = real.toTypedArray() as Float32Array;
  for (const x of [t, logits, real]) x.dispose();
  const out: number[] = [];
  for (let i = 0; i + 1 < ids.length; i++) {
    const row = flat.subarray(i * v, (i + 1) * v);
    let max = -Infinity;
    for (const x of row) max = Math.max(max, x);
    let z = 0;
    for (const x of row) z += Math.exp(x - max);
    out.push(row[ids[i + 1]] - max - Math.log(z));
  }
  return out;
}

/** Deterministic token sequences of the given lengths. */
function sequences(lengths: number[], vocab: number): number[][] {
  let x = 12345;
  const next = () => {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    return x % vocab;
  };
  return lengths.map((n) => Array.from({ length: n }, next));
}

const dir = fixtureCheckpoint('llama');
const { model, architecture } = loadModel(dir);
const models: Model[] = [model];
afterAll(() => {
  for (const m of models) m.dispose();
});
const data = sequences([1, 2, 9, 17, 40], model.config.vocabSize);

describe('evaluate', () => {
  it('gives the log-softmax of the full logits, token by token', () => {
    const r = evaluate(model, data, { seqLength: 64, perTokenLogprobs: true });
    const seqs = r.perSequence ?? [];
    expect(seqs.map((s) => s.ids)).toEqual(data);
    let sum = 0;
    for (const [i, s] of seqs.entries()) {
      expect(s.index).toBe(i);
      const want = directLogprobs(model, data[i]);
      expect(s.logprobs.length).toBe(want.length);
      for (let j = 0; j < want.length; j++) expect(s.logprobs[j]).toBeCloseTo(want[j], 4);
      sum -= want.reduce((a, b) => a + b, 0);
    }
    expect(r.tokens).toBe(data.reduce((a, s) => a + s.length - 1, 0));
    expect(r.sequences).toBe(data.length);
    expect(r.meanLoss).toBeCloseTo(sum / r.tokens, 5);
    expect(r.perplexity).toBeCloseTo(Math.exp(r.meanLoss), 6);
  });

  it('windows of seqLength + 1 tokens overlapping by one score every token once, whatever the batch', () => {
    const whole = evaluate(model, data, { seqLength: 64, perTokenLogprobs: true });
    // seqLength 8: the 40-token sequence is 5 windows; the first token of each window after the
    // first loses its earlier context, so compare each window with a direct computation on it.
    const cut = evaluate(model, data, { seqLength: 8, batchSize: 3, perTokenLogprobs: true });
    expect(cut.tokens).toBe(whole.tokens);
    const long = data[4];
    const lp = (cut.perSequence ?? [])[4].logprobs;
    for (let start = 0; start + 1 < long.length; start += 8) {
      const want = directLogprobs(model, long.slice(start, start + 9));
      for (let j = 0; j < want.length; j++) expect(lp[start + j]).toBeCloseTo(want[j], 4);
    }
    for (const batchSize of [1, 2, 7]) {
      const r = evaluate(model, data, { seqLength: 8, batchSize, perTokenLogprobs: true });
      expect(r.meanLoss).toBeCloseTo(cut.meanLoss, 5);
      for (const [i, s] of (r.perSequence ?? []).entries()) {
        const ref = (cut.perSequence ?? [])[i].logprobs;
        for (let j = 0; j < ref.length; j++) expect(s.logprobs[j]).toBeCloseTo(ref[j], 4);
      }
    }
  });

  it('streams sequences in input order from a lazy iterable, and reports progress', () => {
    function* lazy() {
      for (const s of data) yield Int32Array.from(s);
    }
    const seen: { index: number; logprobs: number[] }[] = [];
    const progress: number[] = [];
    const r = evaluate(model, lazy(), {
      seqLength: 8,
      batchSize: 4,
      // a copy: each sequence must be complete when it is handed over, its windows spread over batches
      onSequence: (s) => seen.push({ index: s.index, logprobs: Array.from(s.logprobs) }),
      onProgress: (p) => progress.push(p.tokens),
    });
    expect(seen.map((s) => s.index)).toEqual([0, 1, 2, 3, 4]);
    const full =
      evaluate(model, data, { seqLength: 8, batchSize: 4, perTokenLogprobs: true }).perSequence ?? [];
    for (const [i, s] of seen.entries()) expect(s.logprobs).toEqual(Array.from(full[i].logprobs));
    expect(r.perSequence).toBeUndefined();
    expect(progress.at(-1)).toBe(r.tokens);
    expect(progress).toEqual([...progress].sort((a, b) => a - b));
  });

  it('never changes a loss with the vocabulary padding (makeVocabSizeDivisibleBy)', () => {
    const reference = evaluate(model, data, { seqLength: 16, perTokenLogprobs: true });
    for (const divisibleBy of [1, 384]) {
      const config = { ...model.config, makeVocabSizeDivisibleBy: divisibleBy };
      const padded = new GPTModel(config, { performInitialization: false });
      models.push(padded);
      const weights = openWeights(dir);
      try {
        loadWeights(padded, weights);
      } finally {
        weights.source.close();
      }
      expect(architecture).toBe(weights.architecture);
      expect(padded.paddedVocabSize).toBe(divisibleBy === 1 ? 1000 : 1152);
      const r = evaluate(padded, data, { seqLength: 16, perTokenLogprobs: true });
      expect(r.meanLoss).toBeCloseTo(reference.meanLoss, 5);
      for (const [i, s] of (r.perSequence ?? []).entries()) {
        const ref = (reference.perSequence ?? [])[i].logprobs;
        for (let j = 0; j < ref.length; j++) expect(s.logprobs[j]).toBeCloseTo(ref[j], 4);
      }
    }
  });

  it('keeps memory flat: no storage outlives a batch', () => {
    evaluate(model, data, { seqLength: 8, batchSize: 2 });
    const before = memoryStats();
    let during = 0;
    evaluate(model, data, {
      seqLength: 8,
      batchSize: 2,
      onProgress: () => {
        during = Math.max(during, memoryStats().liveStorages);
      },
    });
    expect(during).toBe(before.liveStorages);
    expect(memoryStats().liveBytes).toBe(before.liveBytes);
  });

  it('refuses bad arguments and tokens outside the vocabulary with the sequence and position', () => {
    expect(() => evaluate(model, data, { seqLength: 0 })).toThrow(/seqLength must be a positive integer/);
    expect(() => evaluate(model, data, { seqLength: 100_000 })).toThrow(/maxPositionEmbeddings/);
    expect(() => evaluate(model, data, { seqLength: 8, batchSize: 0 })).toThrow(/batchSize/);
    expect(() =>
      evaluate(
        model,
        [
          [1, 2],
          [3, 1000],
        ],
        { seqLength: 8 },
      ),
    ).toThrow('sequence 1: token 1000 at position 1 is outside the vocabulary [0, 1000)');
  });

  it('has no tokens to score in empty or one-token sequences', () => {
    const r = evaluate(model, [[], [5]], { seqLength: 8, perTokenLogprobs: true });
    expect(r.tokens).toBe(0);
    expect(r.meanLoss).toBeNaN();
    expect((r.perSequence ?? []).map((s) => s.logprobs.length)).toEqual([0, 0]);
  });
});
