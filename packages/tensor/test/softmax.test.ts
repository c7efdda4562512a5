import { describe, expect, it } from 'vitest';
import {
  type CrossEntropyOptions,
  crossEntropy,
  Generator,
  gradcheck,
  type LossReduction,
  logSoftmax,
  memoryStats,
  nllLoss,
  randint,
  randn,
  softmax,
  type Tensor,
  tensor,
  tidy,
  transpose,
} from '../src/index.js';
import {
  disposeAll,
  expectClose,
  expectTensorError,
  type FixtureCase,
  fromFixture,
  loadFixture,
  settledLiveBytes,
} from './fixtures.js';

function runCase(c: FixtureCase, x: Tensor, target: Tensor | null): Tensor {
  const a = c.args as Record<string, unknown>;
  switch (a.op) {
    case 'softmax':
      return softmax(x, a.dim as number);
    case 'logSoftmax':
      return logSoftmax(x, a.dim as number);
    case 'crossEntropy':
      return crossEntropy(x, target!, {
        reduction: a.reduction as LossReduction,
        ignoreIndex: a.ignoreIndex as number,
        labelSmoothing: a.labelSmoothing as number,
      });
    case 'nllLoss':
      return nllLoss(x, target!, {
        reduction: a.reduction as LossReduction,
        ignoreIndex: a.ignoreIndex as number,
      });
    default:
      throw new Error(`unknown op ${String(a.op)}`);
  }
}

describe('softmax family: PyTorch fixtures', () => {
  for (const c of loadFixture('softmax')) {
    it(c.name, () => {
      const x = fromFixture(c.inputs.x, true);
      const gout = fromFixture(c.inputs.gout);
      let target: Tensor | null = c.inputs.target ? fromFixture(c.inputs.target) : null;
      if (target && c.args.targetDtype === 'int32') {
        const t32 = target.to('int32');
        target.dispose();
        target = t32;
      }
      const y = runCase(c, x, target);
      expect(y.dtype).toBe(c.outputs.y.dtype);
      expectClose(y, c.outputs.y, undefined, `${c.name} y`);
      y.backward(gout);
      expectClose(x.grad!, c.grads.x, undefined, `${c.name} dx`);
      disposeAll(y, x, gout, target);
    });
  }
});

describe('softmax / logSoftmax', () => {
  it('gives zeros (not NaN) for a fully masked row, and a zero gradient', () => {
    const inf = Number.NEGATIVE_INFINITY;
    const x = tensor([
      [inf, inf, inf, inf],
      [1, inf, 2, 0.5],
    ]).requiresGrad_();
    const g = tensor([
      [0.3, -1, 2, 0.7],
      [1, 2, -0.5, 0.25],
    ]);
    const y = softmax(x, -1);
    const v = y.toArray() as number[][];
    expect(v[0]).toEqual([0, 0, 0, 0]);
    expect(v[1][1]).toBe(0);
    const e = [Math.exp(1), 0, Math.exp(2), Math.exp(0.5)];
    const s = e[0] + e[2] + e[3];
    for (let j = 0; j < 4; j++) expect(v[1][j]).toBeCloseTo(e[j] / s, 6);
    y.backward(g);
    const dx = x.grad!.toArray() as number[][];
    expect(dx[0].map(Math.abs)).toEqual([0, 0, 0, 0]); // -0 where g < 0
    expect(dx[1].every(Number.isFinite)).toBe(true);
    disposeAll(x, g, y);

    const x2 = tensor([
      [inf, inf, inf],
      [0, 1, 2],
    ]).requiresGrad_();
    const ly = logSoftmax(x2, 1);
    const lv = ly.toArray() as number[][];
    expect(lv[0]).toEqual([inf, inf, inf]);
    expect(lv[1].every(Number.isFinite)).toBe(true);
    const g2 = tensor([
      [1, 2, 3],
      [1, 2, 3],
    ]);
    ly.backward(g2);
    const dx2 = x2.grad!.toArray() as number[][];
    expect(dx2[0].map(Math.abs)).toEqual([0, 0, 0]);
    expect(dx2[1].every(Number.isFinite)).toBe(true);
    disposeAll(x2, g2, ly);
  });

  it('handles float16, the Tensor methods and large rows across threads', () => {
    const gen = new Generator(7);
    const x = randn([96, 700], { generator: gen, std: 4 });
    const y = x.softmax(-1);
    const ly = x.logSoftmax(1);
    const xs = x.toTypedArray() as Float32Array;
    const ys = y.toTypedArray() as Float32Array;
    const ls = ly.toTypedArray() as Float32Array;
    let worst = 0;
    let worstLog = 0;
    for (let r = 0; r < 96; r++) {
      let m = Number.NEGATIVE_INFINITY;
      for (let j = 0; j < 700; j++) m = Math.max(m, xs[r * 700 + j]);
      let s = 0;
      for (let j = 0; j < 700; j++) s += Math.exp(xs[r * 700 + j] - m);
      for (let j = 0; j < 700; j++) {
        const p = Math.exp(xs[r * 700 + j] - m) / s;
        worst = Math.max(worst, Math.abs(ys[r * 700 + j] - p) / (p + 1e-30));
        worstLog = Math.max(worstLog, Math.abs(ls[r * 700 + j] - (xs[r * 700 + j] - m - Math.log(s))));
      }
    }
    expect(worst).toBeLessThan(2e-6);
    expect(worstLog).toBeLessThan(2e-5);
    const xh = x.to('float16');
    const yh = softmax(xh, -1);
    expect(yh.dtype).toBe('float16');
    const yh32 = yh.toTypedArray() as Float32Array;
    let worstHalf = 0;
    for (let i = 0; i < yh32.length; i++)
      worstHalf = Math.max(worstHalf, Math.abs(yh32[i] - ys[i]) / (1e-3 + 2e-3 * ys[i]));
    expect(worstHalf).toBeLessThan(1);
    disposeAll(x, y, ly, xh, yh);
  });

  it('matches finite differences in float64 (last and inner dims, non-contiguous input)', () => {
    const gen = new Generator(11);
    for (const fn of [softmax, logSoftmax]) {
      const x = randn([3, 4, 5], { dtype: 'float64', generator: gen }).requiresGrad_();
      for (const dim of [-1, 1, 0]) expect(gradcheck((t) => fn(t, dim), [x])).toBe(true);
      const base = randn([5, 4], { dtype: 'float64', generator: gen });
      const xt = transpose(base, 0, 1).detach().requiresGrad_();
      expect(gradcheck((t) => fn(t, -1), [xt])).toBe(true);
      disposeAll(x, base, xt);
    }
  });

  it('rejects integer inputs and bad dims', () => {
    const i = tensor([1, 2, 3]);
    expectTensorError(() => softmax(i, 0), 'DTYPE_MISMATCH', /softmax/);
    const x = tensor([[1.5, 2]]);
    expectTensorError(() => logSoftmax(x, 2), 'INDEX_OUT_OF_RANGE', /logSoftmax/);
    disposeAll(i, x);
  });
});

describe('crossEntropy / nllLoss', () => {
  const reductions: LossReduction[] = ['mean', 'sum', 'none'];

  it('matches finite differences in float64 for every option', () => {
    const gen = new Generator(3);
    const x = randn([6, 5], { dtype: 'float64', generator: gen }).requiresGrad_();
    const target = tensor([0, 4, -100, 2, 3, 1]);
    const t3 = tensor([3, 1, 3, 0, 2, 3]);
    const options: CrossEntropyOptions[] = [];
    for (const reduction of reductions) {
      options.push({ reduction });
      options.push({ reduction, labelSmoothing: 0.2 });
    }
    for (const o of options) {
      expect(gradcheck((t) => crossEntropy(t, target, o), [x])).toBe(true);
      expect(gradcheck((t) => crossEntropy(t, t3, { ...o, ignoreIndex: 3 }), [x])).toBe(true);
      if (o.labelSmoothing === undefined) {
        expect(gradcheck((t) => nllLoss(t, target, o), [x])).toBe(true);
        expect(gradcheck((t) => nllLoss(t, t3, { ...o, ignoreIndex: 3 }), [x])).toBe(true);
      }
    }
    // [N, C, d] with the class dimension in the middle, and [C] with a scalar target
    const xs = randn([2, 4, 3], { dtype: 'float64', generator: gen }).requiresGrad_();
    const ts = tensor([
      [0, 3, -100],
      [2, 1, 1],
    ]);
    expect(gradcheck((t) => crossEntropy(t, ts, { labelSmoothing: 0.1 }), [xs])).toBe(true);
    expect(gradcheck((t) => nllLoss(t, ts, { reduction: 'none' }), [xs])).toBe(true);
    const x1 = randn([7], { dtype: 'float64', generator: gen }).requiresGrad_();
    const t1 = tensor(4);
    expect(gradcheck((t) => crossEntropy(t, t1, { reduction: 'sum' }), [x1])).toBe(true);
    disposeAll(x, target, t3, xs, ts, x1, t1);
  });

  it('matches a direct computation on many rows (threaded path), int32 targets', () => {
    const gen = new Generator(5);
    const N = 300;
    const C = 150;
    const x = randn([N, C], { generator: gen, std: 3 });
    const t64 = randint(0, C, [N], { generator: gen });
    const t = t64.to('int32');
    const xs = x.toTypedArray() as Float32Array;
    const ts = t.toTypedArray() as Int32Array;
    const eps = 0.1;
    const rows = new Float64Array(N);
    for (let r = 0; r < N; r++) {
      let m = Number.NEGATIVE_INFINITY;
      let sx = 0;
      for (let j = 0; j < C; j++) {
        m = Math.max(m, xs[r * C + j]);
        sx += xs[r * C + j];
      }
      let s = 0;
      for (let j = 0; j < C; j++) s += Math.exp(xs[r * C + j] - m);
      const lse = m + Math.log(s);
      rows[r] = lse - (1 - eps) * xs[r * C + ts[r]] - (eps * sx) / C;
    }
    const none = crossEntropy(x, t, { reduction: 'none', labelSmoothing: eps });
    const got = none.toTypedArray() as Float32Array;
    for (let r = 0; r < N; r++)
      expect(Math.abs(got[r] - rows[r])).toBeLessThan(1e-4 * (1 + Math.abs(rows[r])));
    const total = rows.reduce((a, b) => a + b, 0);
    const mean = crossEntropy(x, t, { labelSmoothing: eps });
    expect(mean.item()).toBeCloseTo(total / N, 4);
    const sum = crossEntropy(x, t64, { reduction: 'sum', labelSmoothing: eps });
    expect(Math.abs(sum.item() - total) / total).toBeLessThan(1e-5);
    disposeAll(x, t64, t, none, mean, sum);
  });

  it('gives NaN for a mean over only ignored targets, like torch', () => {
    const x = randn([3, 4], { generator: new Generator(1) }).requiresGrad_();
    const t = tensor([-100, -100, -100]);
    const mean = crossEntropy(x, t);
    expect(Number.isNaN(mean.item())).toBe(true);
    const sum = crossEntropy(x, t, { reduction: 'sum' });
    expect(sum.item()).toBe(0);
    sum.backward();
    expect(Array.from(x.grad!.toTypedArray() as Float32Array)).toEqual(new Array(12).fill(0));
    disposeAll(x, t, mean, sum);
  });

  it('throws INDEX_OUT_OF_RANGE naming the op, the target and C', () => {
    const x = randn([3, 5], { generator: new Generator(2) });
    for (const bad of [5, -1, 17]) {
      const t = tensor([0, bad, 1]);
      expectTensorError(
        () => crossEntropy(x, t),
        'INDEX_OUT_OF_RANGE',
        new RegExp(`^crossEntropy: target ${bad} .*5 classes`),
      );
      expectTensorError(
        () => nllLoss(x, t),
        'INDEX_OUT_OF_RANGE',
        new RegExp(`^nllLoss: target ${bad} .*5 classes`),
      );
      t.dispose();
    }
    // an out-of-range value equal to ignoreIndex is fine
    const ti = tensor([0, 9, 1]);
    const l = crossEntropy(x, ti, { ignoreIndex: 9 });
    expect(Number.isFinite(l.item())).toBe(true);
    disposeAll(x, ti, l);
  });

  it('rejects bad shapes, dtypes and options', () => {
    const x = randn([3, 5], { generator: new Generator(4) });
    const t = tensor([0, 1, 2]);
    const t2 = tensor([0, 1]);
    const tf = tensor([0.5, 1, 2]);
    const i = tensor([[1, 2, 3]]);
    const t0 = tensor([0]);
    expectTensorError(
      () => crossEntropy(x, t2),
      'SHAPE_MISMATCH',
      /crossEntropy: target \[2\] does not match input \[3,5\]/,
    );
    expectTensorError(() => crossEntropy(x, tf), 'DTYPE_MISMATCH', /crossEntropy: target/);
    expectTensorError(() => crossEntropy(i, t0), 'DTYPE_MISMATCH', /crossEntropy/);
    expectTensorError(
      () => crossEntropy(x, t, { labelSmoothing: 1.5 }),
      'INVALID_ARGUMENT',
      /labelSmoothing/,
    );
    expectTensorError(
      () => crossEntropy(x, t, { reduction: 'avg' as LossReduction }),
      'INVALID_ARGUMENT',
      /reduction/,
    );
    expectTensorError(() => nllLoss(x, t2), 'SHAPE_MISMATCH', /nllLoss/);
    disposeAll(x, t, t2, tf, i, t0);
  });
});

describe('memory', () => {
  it('frees every temporary of forward + backward', () => {
    const gen = new Generator(9);
    const x = randn([4, 3, 7], { generator: gen }).requiresGrad_();
    const target = tensor([
      [0, 2, -100, 1, 1, 0, 2],
      [2, 2, 0, 1, -100, 0, 1],
      [1, 0, 0, 2, 2, 1, 0],
      [0, 1, 2, 0, 1, 2, 0],
    ]);
    const base = randn([7, 3], { generator: gen });
    const xt = transpose(base, 0, 1).detach().requiresGrad_();
    const before = settledLiveBytes();
    tidy(() => {
      const s = softmax(x, 1);
      const ls = logSoftmax(x, -1).exp();
      const ce = crossEntropy(x, target, { labelSmoothing: 0.1 });
      const ce2 = crossEntropy(x, target, { reduction: 'none' });
      const nl = nllLoss(logSoftmax(x, 1), target, { reduction: 'sum' });
      const st = softmax(xt, 0).mul(xt).sum();
      s.mul(s).sum().add(ls.sum()).add(ce).add(ce2.sum()).add(nl).add(st).backward();
    });
    expect(x.grad).not.toBeNull();
    disposeAll(x.grad, xt.grad);
    x.grad = null;
    xt.grad = null;
    expect(settledLiveBytes()).toBe(before);
    // a failed call leaks nothing either
    const bad = tensor([
      [0, 9, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0],
    ]);
    const before2 = memoryStats().liveBytes;
    expectTensorError(() => crossEntropy(x, bad), 'INDEX_OUT_OF_RANGE');
    expectTensorError(() => nllLoss(x, bad), 'INDEX_OUT_OF_RANGE');
    expect(memoryStats().liveBytes).toBe(before2);
    disposeAll(x, target, base, xt, bad);
  });
});
