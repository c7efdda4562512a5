// scoreContinuations against the independent PyTorch reference (scripts/reference.py): the fixture's
// fp32 logits of two 12-token rows give, for any split of a row into context and continuation, the
// continuation's log-likelihood (float64 log-softmax) and whether torch's argmax picks each of its
// tokens. Batching, the longest-first order and the left truncation must not change a score.
import { memoryStats } from '@megapatch/tensor';
import { afterAll, describe, expect, it } from 'vitest';
import { type ContinuationRequest, loadModel, scoreContinuations } from '../src/index.js';
import { fixtureCheckpoint, readFixture } from './helpers/fixtures.js';

const fx = readFixture('llama');
const { model } = loadModel(fixtureCheckpoint('llama'));
afterAll(() => model.dispose());
const V = model.config.vocabSize;
const [B, S] = fx.get('input_ids').shape;
const rows = Array.from({ length: B }, (_, r) =>
  Array.from(fx.get('input_ids').data.subarray(r * S, (r + 1) * S)),
);
const logits = fx.get('logits').data; // [B, S, V] from PyTorch

/** The reference score of row `r` split at `k`: tokens [k, end) continue tokens [0, k). */
function reference(r: number, k: number, end = S): { loglikelihood: number; greedy: boolean } {
  let loglikelihood = 0;
  let greedy = true;
  for (let i = k - 1; i < end - 1; i++) {
    const row = logits.subarray((r * S + i) * V, (r * S + i + 1) * V);
    let max = -Infinity;
    let best = -1;
    for (let t = 0; t < V; t++) if (row[t] > max) [max, best] = [row[t], t];
    let z = 0;
    for (const x of row) z += Math.exp(x - max);
    const target = rows[r][i + 1];
    loglikelihood += row[target] - max - Math.log(z);
    if (best !== target) greedy = false;
  }
  return { loglikelihood, greedy };
}

describe('scoreContinuations', () => {
  it('gives the log-likelihood and the greedy flag of the PyTorch logits, in request order', () => {
    const splits = [
      [0, 1],
      [0, 6],
      [0, 11],
      [1, 3],
      [1, 9],
      [1, 2],
    ];
    const requests: ContinuationRequest[] = splits.map(([r, k]) => ({
      context: rows[r].slice(0, k),
      continuation: rows[r].slice(k),
    }));
    for (const batchSize of [1, 4, 8]) {
      const got = scoreContinuations(model, requests, { seqLength: 16, batchSize });
      for (const [i, [r, k]] of splits.entries()) {
        const want = reference(r, k);
        expect(got[i].loglikelihood, `${r}/${k}`).toBeCloseTo(want.loglikelihood, 4);
        expect(got[i].greedy, `${r}/${k}`).toBe(want.greedy);
        expect([got[i].tokens, got[i].truncated]).toEqual([S - k, 0]);
      }
    }
    // a row of this random model has some greedy and some non-greedy continuations
    const flags = splits.map(([r, k]) => reference(r, k).greedy);
    expect(flags.some((g) => !g)).toBe(true);
    // single-token continuations: greedy where torch's argmax is the next token
    const singles = rows.flatMap((ids, r) => ids.slice(1).map((_, i) => ({ r, k: i + 1 })));
    const one = scoreContinuations(
      model,
      singles.map(({ r, k }) => ({ context: rows[r].slice(0, k), continuation: [rows[r][k]] })),
      { seqLength: 16 },
    );
    for (const [i, { r, k }] of singles.entries()) {
      const want = reference(r, k, k + 1);
      expect(one[i].loglikelihood).toBeCloseTo(want.loglikelihood, 4);
      expect(one[i].greedy).toBe(want.greedy);
    }
  });

  it("marks a continuation greedy where it is torch's argmax", () => {
    // the random rows are never the model's choice; the argmax of each PyTorch logits row is
    const cases = rows.flatMap((ids, r) =>
      ids.slice(0, -1).map((_, i) => {
        const row = logits.subarray((r * S + i) * V, (r * S + i + 1) * V);
        let best = 0;
        for (let t = 1; t < V; t++) if (row[t] > row[best]) best = t;
        let z = 0;
        for (const x of row) z += Math.exp(x - row[best]);
        return { r, i, best, loglikelihood: -Math.log(z) };
      }),
    );
    const got = scoreContinuations(
      model,
      cases.map(({ r, i, best }) => ({ context: rows[r].slice(0, i + 1), continuation: [best] })),
      { seqLength: 16, batchSize: 5 },
    );
    for (const [n, c] of cases.entries()) {
      expect(got[n].greedy, `${c.r}/${c.i}`).toBe(true);
      expect(got[n].loglikelihood).toBeCloseTo(c.loglikelihood, 4);
    }
  });

  it('cuts a long context from the left to seqLength + 1 tokens', () => {
    // a seqLength of 6 sees the last 7 tokens: context rows[0][5..9], continuation rows[0][9..12]
    const [got] = scoreContinuations(
      model,
      [{ context: rows[0].slice(0, 9), continuation: rows[0].slice(9) }],
      {
        seqLength: 6,
      },
    );
    const [direct] = scoreContinuations(
      model,
      [{ context: rows[0].slice(5, 9), continuation: rows[0].slice(9) }],
      { seqLength: 6 },
    );
    expect(got.truncated).toBe(5);
    expect(got.loglikelihood).toBe(direct.loglikelihood);
    expect(got.greedy).toBe(direct.greedy);
  });

  it('refuses empty parts, tokens outside the vocabulary and a continuation longer than seqLength', () => {
    const run =
      (r: ContinuationRequest, seqLength = 8) =>
      () =>
        scoreContinuations(model, [r], { seqLength });
    expect(run({ context: [], continuation: [1] })).toThrow(/request 0: the context is empty/);
    expect(run({ context: [1], continuation: [] })).toThrow(/request 0: the continuation is empty/);
    expect(run({ context: [1, V], continuation: [2] })).toThrow(
      `request 0: context token ${V} at position 1 is outside the vocabulary [0, ${V})`,
    );
    expect(run({ context: [1], continuation: [1, 2, 3] }, 2)).toThrow(/3 tokens, more than seqLength 2/);
    expect(() => scoreContinuations(model, [], { seqLength: 1 << 20 })).toThrow(/exceeds the model's/);
  });

  it('leaves no tensor alive', () => {
    const before = memoryStats('cpu').liveBytes;
    scoreContinuations(model, [{ context: rows[1].slice(0, 4), continuation: rows[1].slice(4) }], {
      seqLength: 16,
    });
    expect(memoryStats('cpu').liveBytes).toBe(before);
  });
});
