// sampleToken sorts only what top-k or top-p needs (a native sort of packed keys, a selection for
// the k best, a growing prefix for the nucleus); here it must pick exactly the tokens of the plain
// rule written out with a comparator sort of every id, for the same random numbers.
import { describe, expect, it } from 'vitest';
import { sampleToken, samplingRng } from '../src/index.js';

/** The rule, plainly: every id sorted by descending logit (equal ones by id) where an order matters. */
function referenceSample(
  logits: Float32Array,
  opts: { temperature?: number; topK?: number; topP?: number },
  rand: () => number,
): number {
  const n = logits.length;
  const t = opts.temperature ?? 0;
  const k = opts.topK ?? 0;
  const topP = opts.topP ?? 1;
  const sorted = Array.from({ length: n }, (_, i) => i).sort((a, b) => logits[b] - logits[a] || a - b);
  const walk = (order: number[], w: (i: number) => number, sum: number) => {
    let u = rand() * sum;
    for (const i of order) {
      u -= w(i);
      if (u < 0) return i;
    }
    return order[order.length - 1];
  };
  if (k > 0 && k < n) {
    // top-k from the best, weights relative to the best, then top-p among them
    let order = sorted.slice(0, k);
    const w = (i: number) => Math.exp((logits[i] - logits[order[0]]) / t);
    let sum = order.reduce((a, i) => a + w(i), 0);
    if (topP < 1) {
      let acc = 0;
      let keep = 0;
      while (keep < order.length && (keep === 0 || acc / sum < topP)) acc += w(order[keep++]);
      order = order.slice(0, keep);
      sum = acc;
    }
    return walk(order, w, sum);
  }
  // the whole vocabulary: the weights summed in id order
  const max = Math.max(...logits);
  const w = (i: number) => Math.exp((logits[i] - max) / t);
  let sum = 0;
  for (let i = 0; i < n; i++) sum += w(i);
  if (topP >= 1) {
    return walk(
      Array.from({ length: n }, (_, i) => i).filter((i) => w(i) > 0),
      w,
      sum,
    );
  }
  let acc = 0;
  let keep = 0;
  while (keep < n && (keep === 0 || acc / sum < topP)) acc += w(sorted[keep++]);
  return walk(sorted.slice(0, keep), w, acc);
}

/** Logits with ties, signed zeros and −∞ among them (a masked vocabulary), from a seed. */
function logitsOf(n: number, seed: number): Float32Array {
  const r = samplingRng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = r();
    // a coarse grid makes many exact ties
    out[i] = u < 0.05 ? -Infinity : u < 0.1 ? (r() < 0.5 ? -0 : 0) : Math.round((r() - 0.5) * 16 * 4) / 4;
  }
  return out;
}

describe('sampleToken', () => {
  it.each([
    [7, { temperature: 1 }],
    [7, { temperature: 0.7, topK: 3 }],
    [7, { temperature: 0.7, topK: 7 }],
    [7, { temperature: 0.7, topK: 20 }],
    [64, { temperature: 1.3, topK: 1 }],
    [64, { temperature: 0.9, topP: 0.5 }],
    [1000, { temperature: 0.8 }],
    [1000, { temperature: 0.8, topK: 50 }],
    [1000, { temperature: 0.8, topK: 50, topP: 0.9 }],
    [1000, { temperature: 2, topP: 0.99 }],
    [5000, { temperature: 0.6, topK: 999, topP: 0.3 }],
    // nuclei beyond the first 1024 best (flat rows: the prefix grows)
    [20000, { temperature: 50, topP: 0.95 }],
    [20000, { temperature: 0.5, topP: 0.2 }],
  ])('over %i tokens with %j picks the tokens of a comparator sort', (n, opts) => {
    for (let seed = 1; seed <= 40; seed++) {
      const logits = logitsOf(n, seed);
      const a = samplingRng(seed + 1000);
      const b = samplingRng(seed + 1000);
      const picks = Array.from({ length: 5 }, () => [
        sampleToken(logits, opts, a),
        referenceSample(logits, opts, b),
      ]);
      for (const [got, want] of picks) expect(got, `seed ${seed}`).toBe(want);
    }
  });

  it('takes the first of equal best logits, and a view into a larger buffer', () => {
    const buf = new Float32Array([9, 1, 3, 3, -0, 3, 0]);
    const row = buf.subarray(1); // [1, 3, 3, −0, 3, 0]
    expect(sampleToken(row, { temperature: 0 }, () => 0)).toBe(1);
    // top-1 by sampling is the greedy choice among ties: the lowest id
    expect(sampleToken(row, { temperature: 1, topK: 1 }, () => 0.99)).toBe(1);
    // the three 3s in id order, then 1, then the zeros (−0 and 0 equal, by id)
    const seen = new Set<number>();
    for (let i = 0; i < 200; i++) seen.add(sampleToken(row, { temperature: 1, topK: 3 }, samplingRng(i)));
    expect([...seen].sort()).toEqual([1, 2, 4]);
  });
});
