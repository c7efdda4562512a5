// crossEntropyShardMax / crossEntropyShardStats / crossEntropyShardGrad, the per-rank parts of a vocabulary-parallel
// cross-entropy: a padded vocabulary split over three simulated ranks, with the group reductions
// done here by hand, must give crossEntropy of the real logits (with Megatron's label smoothing
// α' = α·K/(K-1) as torch's labelSmoothing) and its autograd gradient, padding gradient 0, in
// float32, bfloat16 and float64. Then: targets outside the vocabulary, strided inputs, errors.
import { describe, expect, it } from 'vitest';
import {
  add,
  cat,
  crossEntropy,
  crossEntropyShardGrad,
  crossEntropyShardMax,
  crossEntropyShardStats,
  type DType,
  Generator,
  randn,
  type Tensor,
  tensor,
  tidy,
  zeros,
} from '../src/index.js';
import { expectTensorError } from './fixtures.js';

const values = (t: Tensor): number[] => Array.from(t.toTypedArray() as ArrayLike<number>);

function expectNear(actual: Tensor, expected: Tensor, atol: number, rtol: number, label: string): void {
  expect(actual.shape, `${label} shape`).toEqual(expected.shape);
  const a = values(actual);
  const e = values(expected);
  for (let i = 0; i < e.length; i++) {
    if (!(Math.abs(a[i] - e[i]) <= atol + rtol * Math.abs(e[i])))
      expect.fail(`${label} element ${i}: shard ${a[i]}, reference ${e[i]}`);
  }
}

const RANKS = 3;
const PART = 9; // columns per rank: a padded vocabulary of 27
const VOCAB = 23; // real entries: the last rank holds 5 real columns and 4 of padding
const ROWS = 10;

interface Sharded {
  loss: Tensor;
  /** The gradient over the padded vocabulary [ROWS, RANKS * PART], ranks side by side. */
  grad: Tensor;
}

/**
 * The vocabulary-parallel loss and gradient of logits [ROWS, RANKS * PART], each rank working on
 * its slice and the all-reduces (max, then sum of the stacked statistics) done over the slices.
 */
function sharded(logits: Tensor, target: Tensor, alpha: number, gradLoss: Tensor): Sharded {
  const smoothing = alpha > 0 ? (alpha * VOCAB) / (VOCAB - 1) : 0;
  const slices = [...Array(RANKS).keys()].map((r) => {
    const start = r * PART;
    const localReal = Math.max(0, Math.min(PART, VOCAB - start));
    return { x: logits.narrow(1, start, PART), start, localReal };
  });
  const rowMax = slices.map((s) => crossEntropyShardMax(s.x, s.localReal)).reduce((a, b) => a.maximum(b));
  const stats = slices
    .map((s) => crossEntropyShardStats(s.x, target, rowMax, { ...s, withShiftedSum: alpha > 0 }))
    .reduce((a, b) => add(a, b));
  const [predicted, sumExp, shiftedSum] = stats.unbind(0);
  const lse = sumExp.log();
  let loss = lse.sub(predicted);
  if (alpha > 0) {
    const meanLogProbs = shiftedSum.div(VOCAB).sub(lse);
    loss = loss.mul(1 - smoothing).sub(meanLogProbs.mul(smoothing));
  }
  const grads = slices.map((s) =>
    crossEntropyShardGrad(s.x, target, rowMax, lse, gradLoss, { ...s, smoothing, vocabSize: VOCAB }),
  );
  return { loss, grad: cat(grads, 1) };
}

describe('crossEntropyShardMax / crossEntropyShardStats / crossEntropyShardGrad over three ranks', () => {
  for (const dtype of ['float32', 'bfloat16', 'float64'] as const) {
    for (const alpha of [0, 0.1]) {
      it(`${dtype}, label smoothing ${alpha}: crossEntropy of the real logits and its gradient`, () =>
        tidy(() => {
          const compute: DType = dtype === 'float64' ? 'float64' : 'float32';
          const full = randn([ROWS, RANKS * PART], { generator: new Generator(7), std: 3, dtype });
          const target = tensor([0, 22, 9, 17, 18, 5, 13, 21, 8, 1], { dtype: 'int32' });
          const g = randn([ROWS], { generator: new Generator(8), dtype: compute });
          const { loss, grad } = sharded(full, target, alpha, g);

          const real = full.narrow(1, 0, VOCAB).to(compute).detach().requiresGrad_();
          const want = crossEntropy(real, target, {
            reduction: 'none',
            labelSmoothing: alpha > 0 ? (alpha * VOCAB) / (VOCAB - 1) : 0,
          });
          want.backward(g);
          const tol = dtype === 'float64' ? 1e-12 : 1e-5;
          expect(loss.dtype).toBe(compute);
          expectNear(loss, want, tol, tol, 'loss');
          expect(grad.dtype).toBe(dtype);
          const gtol = dtype === 'bfloat16' ? 8e-3 : tol;
          expectNear(grad.narrow(1, 0, VOCAB).to(compute), real.grad as Tensor, gtol, gtol, 'grad');
          expect(values(grad.narrow(1, VOCAB, RANKS * PART - VOCAB))).toEqual(
            new Array(ROWS * (RANKS * PART - VOCAB)).fill(0),
          );
        }));
    }
  }

  it('targets outside the vocabulary (negative, in the padding, past it) cost log Σ exp(x - max)', () =>
    tidy(() => {
      const full = randn([ROWS, RANKS * PART], { generator: new Generator(9) });
      const target = tensor([-1, 23, 26, 40, 0, 1, 2, 3, 4, 5], { dtype: 'int64' });
      const g = zeros([ROWS]).add(1);
      const { loss, grad } = sharded(full, target, 0, g);
      const x = values(full);
      const l = values(loss);
      const dx = values(grad);
      for (let r = 0; r < 4; r++) {
        const row = x.slice(r * RANKS * PART, r * RANKS * PART + VOCAB);
        const m = Math.max(...row);
        // as in Megatron, the target's (shifted) logit counts as 0: log Σ exp(x - max) remains
        expect(l[r]).toBeCloseTo(Math.log(row.reduce((s, v) => s + Math.exp(v - m), 0)), 5);
        // no one-hot anywhere: the gradient is the softmax itself, which sums to 1
        const sum = dx.slice(r * RANKS * PART, (r + 1) * RANKS * PART).reduce((s, v) => s + v, 0);
        expect(sum).toBeCloseTo(1, 5);
      }
    }));

  it('the local maximum: amax of the real columns, -inf on an all-padding slice, any leading shape', () =>
    tidy(() => {
      for (const dtype of ['float32', 'bfloat16', 'float64'] as const) {
        const x = randn([2, 5, 8], { generator: new Generator(11), dtype });
        const m = crossEntropyShardMax(x, 6);
        expect(m.shape).toEqual([10]);
        expect(m.dtype).toBe(dtype === 'float64' ? 'float64' : 'float32');
        expect(values(m)).toEqual(values(x.narrow(2, 0, 6).amax(2).reshape(10).to(m.dtype)));
        expect(values(crossEntropyShardMax(x, 0))).toEqual(new Array(10).fill(Number.NEGATIVE_INFINITY));
      }
    }));

  it('takes strided logits as they are (a transposed view equals its contiguous copy)', () =>
    tidy(() => {
      const xt = randn([PART, ROWS], { generator: new Generator(10) }).transpose(0, 1);
      const target = tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 30], { dtype: 'int64' });
      const rowMax = xt.amax(1);
      const layout = { start: 0, localReal: 7, withShiftedSum: true };
      expect(xt.isContiguous).toBe(false);
      const a = crossEntropyShardStats(xt, target, rowMax, layout);
      const b = crossEntropyShardStats(xt.contiguous(), target, rowMax, layout);
      expect(a.shape).toEqual([3, ROWS]);
      expect(values(a)).toEqual(values(b));
      const lse = a.select(0, 1).log();
      const opts = { start: 0, localReal: 7, smoothing: 0.2, vocabSize: 7 };
      const ga = crossEntropyShardGrad(xt, target, rowMax, lse, rowMax, opts);
      const gb = crossEntropyShardGrad(xt.contiguous(), target, rowMax, lse, rowMax, opts);
      expect(values(ga)).toEqual(values(gb));
    }));

  it('rejects bad arguments with typed errors', () => {
    tidy(() => {
      const x = randn([4, 6]);
      const t = tensor([0, 1, 2, 3], { dtype: 'int64' });
      const m = x.amax(1);
      const layout = { start: 0, localReal: 6 };
      expectTensorError(
        () => crossEntropyShardStats(x, t, m, { start: 0, localReal: 7 }),
        'INVALID_ARGUMENT',
        /localReal/,
      );
      expectTensorError(
        () => crossEntropyShardStats(x, t.float(), m, layout),
        'DTYPE_MISMATCH',
        /int64 or int32/,
      );
      expectTensorError(
        () => crossEntropyShardStats(x, t.narrow(0, 0, 3), m, layout),
        'SHAPE_MISMATCH',
        /target/,
      );
      expectTensorError(
        () => crossEntropyShardStats(x, t, m.narrow(0, 0, 3), layout),
        'SHAPE_MISMATCH',
        /rowMax/,
      );
      expectTensorError(() => crossEntropyShardStats(t, t, m, layout), 'DTYPE_MISMATCH', /logits/);
      expectTensorError(() => crossEntropyShardMax(x, -1), 'INVALID_ARGUMENT', /localReal/);
      expectTensorError(() => crossEntropyShardMax(t, 1), 'DTYPE_MISMATCH', /logits/);
      expectTensorError(
        () => crossEntropyShardGrad(x, t, m, m, m, { ...layout, smoothing: 1, vocabSize: 6 }),
        'INVALID_ARGUMENT',
        /smoothing/,
      );
      expectTensorError(
        () => crossEntropyShardGrad(x, t, m, m, m, { ...layout, vocabSize: 0 }),
        'INVALID_ARGUMENT',
        /vocabSize/,
      );
    });
  });
});
