import { describe, expect, it } from 'vitest';
import {
  Generator,
  gradcheck,
  layerNorm,
  memoryStats,
  randn,
  rmsNorm,
  tensor,
  tidy,
  transpose,
} from '../src/index.js';
import { disposeAll, expectClose, expectTensorError, fromFixture, loadFixture } from './fixtures.js';

describe('norm family: PyTorch fixtures', () => {
  for (const c of loadFixture('norm')) {
    it(c.name, () => {
      const a = c.args as { op: string; normalizedShape: number[]; eps: number };
      const x = fromFixture(c.inputs.x, true);
      const w = c.inputs.weight ? fromFixture(c.inputs.weight, true) : null;
      const b = c.inputs.bias ? fromFixture(c.inputs.bias, true) : null;
      const gout = fromFixture(c.inputs.gout);
      const y =
        a.op === 'rmsNorm'
          ? rmsNorm(x, a.normalizedShape, w, a.eps)
          : layerNorm(x, a.normalizedShape, w, b, a.eps);
      expect(y.dtype).toBe(x.dtype);
      expectClose(y, c.outputs.y, undefined, `${c.name} y`);
      y.backward(gout);
      expectClose(x.grad!, c.grads.x, undefined, `${c.name} dx`);
      if (w) expectClose(w.grad!, c.grads.weight, undefined, `${c.name} dweight`);
      if (b) expectClose(b.grad!, c.grads.bias, undefined, `${c.name} dbias`);
      disposeAll(y, x, w, b, gout);
    });
  }
});

/** Direct float64 LayerNorm / RMSNorm of [rows, n] data. */
function reference(
  x: Float32Array,
  n: number,
  w: Float32Array | null,
  b: Float32Array | null,
  center: boolean,
  eps: number,
): Float64Array {
  const rows = x.length / n;
  const y = new Float64Array(x.length);
  for (let r = 0; r < rows; r++) {
    let mu = 0;
    if (center) {
      for (let j = 0; j < n; j++) mu += x[r * n + j];
      mu /= n;
    }
    let ss = 0;
    for (let j = 0; j < n; j++) ss += (x[r * n + j] - mu) ** 2;
    const rstd = 1 / Math.sqrt(ss / n + eps);
    for (let j = 0; j < n; j++) y[r * n + j] = (x[r * n + j] - mu) * rstd * (w ? w[j] : 1) + (b ? b[j] : 0);
  }
  return y;
}

describe('rmsNorm / layerNorm', () => {
  it('matches finite differences in float64 with and without weight / bias', () => {
    const gen = new Generator(21);
    const x = randn([3, 2, 5], { dtype: 'float64', generator: gen }).requiresGrad_();
    const w = randn([5], { dtype: 'float64', generator: gen, mean: 1 }).requiresGrad_();
    const b = randn([5], { dtype: 'float64', generator: gen }).requiresGrad_();
    const w2 = randn([2, 5], { dtype: 'float64', generator: gen, mean: 1 }).requiresGrad_();
    const b2 = randn([2, 5], { dtype: 'float64', generator: gen }).requiresGrad_();
    expect(gradcheck((t) => rmsNorm(t, [5]), [x])).toBe(true);
    expect(gradcheck((t, s) => rmsNorm(t, [5], s), [x, w])).toBe(true);
    expect(gradcheck((t, s) => rmsNorm(t, [2, 5], s, 1e-5), [x, w2])).toBe(true);
    expect(gradcheck((t) => layerNorm(t, [5]), [x])).toBe(true);
    expect(gradcheck((t, s, o) => layerNorm(t, [5], s, o), [x, w, b])).toBe(true);
    expect(gradcheck((t, s) => layerNorm(t, [5], s), [x, w])).toBe(true);
    expect(gradcheck((t, o) => layerNorm(t, [5], null, o), [x, b])).toBe(true);
    expect(gradcheck((t, s, o) => layerNorm(t, [2, 5], s, o, 1e-3), [x, w2, b2])).toBe(true);
    // a parameter that needs no gradient, and a non-contiguous input
    const wFixed = w.detach();
    expect(gradcheck((t) => rmsNorm(t, 5, wFixed), [x])).toBe(true);
    const base = randn([5, 4], { dtype: 'float64', generator: gen });
    const xt = transpose(base, 0, 1).detach().requiresGrad_();
    expect(gradcheck((t, s, o) => layerNorm(t, [5], s, o), [xt, w, b])).toBe(true);
    expect(gradcheck((t, s) => rmsNorm(t, [5], s), [xt, w])).toBe(true);
    disposeAll(x, w, b, w2, b2, wFixed, base, xt);
  });

  it('matches a direct computation on many rows (threaded path) and is deterministic', () => {
    const gen = new Generator(8);
    const rows = 256;
    const n = 384;
    const x = randn([rows, n], { generator: gen, mean: 0.5, std: 2 });
    const w = randn([n], { generator: gen, mean: 1 }).requiresGrad_();
    const b = randn([n], { generator: gen }).requiresGrad_();
    const xs = x.toTypedArray() as Float32Array;
    const ws = w.toTypedArray() as Float32Array;
    const bs = b.toTypedArray() as Float32Array;
    for (const center of [false, true]) {
      const y = center ? layerNorm(x, [n], w, b) : rmsNorm(x, [n], w);
      const ref = reference(xs, n, ws, center ? bs : null, center, center ? 1e-5 : 1e-6);
      const got = y.toTypedArray() as Float32Array;
      let worst = 0;
      for (let i = 0; i < got.length; i++)
        worst = Math.max(worst, Math.abs(got[i] - ref[i]) / (1e-5 + 1e-4 * Math.abs(ref[i])));
      expect(worst).toBeLessThan(1);
      // the weight gradient of sum(y) is sum over rows of xhat; twice, bit for bit
      const grads: Float32Array[] = [];
      for (let k = 0; k < 2; k++) {
        const s = y.sum();
        s.backward(undefined, { retainGraph: true });
        s.dispose();
        grads.push(w.grad!.toTypedArray() as Float32Array);
        w.grad!.dispose();
        w.grad = null;
        if (b.grad) {
          b.grad.dispose();
          b.grad = null;
        }
      }
      expect(Array.from(grads[0])).toEqual(Array.from(grads[1]));
      const xhat = reference(xs, n, null, null, center, center ? 1e-5 : 1e-6);
      for (let j = 0; j < n; j += 37) {
        let s = 0;
        for (let r = 0; r < rows; r++) s += xhat[r * n + j];
        expect(Math.abs(grads[0][j] - s)).toBeLessThan(1e-3 * (1 + Math.abs(s)));
      }
      y.dispose();
    }
    disposeAll(x, w, b);
  });

  it('supports float16 and bfloat16 inputs with output in the input dtype', () => {
    const gen = new Generator(13);
    const x = randn([5, 64], { generator: gen });
    const w = randn([64], { generator: gen, mean: 1 });
    const ref = rmsNorm(x, [64], w);
    const r32 = ref.toTypedArray() as Float32Array;
    for (const dtype of ['float16', 'bfloat16'] as const) {
      const xh = x.to(dtype);
      const wh = w.to(dtype);
      const y = rmsNorm(xh, [64], wh);
      const ln = layerNorm(xh, [64], wh, null);
      expect(y.dtype).toBe(dtype);
      expect(ln.dtype).toBe(dtype);
      const got = y.toTypedArray() as Float32Array;
      const tol = dtype === 'float16' ? 4e-3 : 3e-2;
      let worst = 0;
      for (let i = 0; i < got.length; i++)
        worst = Math.max(worst, Math.abs(got[i] - r32[i]) / (tol * (1 + Math.abs(r32[i]))));
      expect(worst).toBeLessThan(1);
      disposeAll(xh, wh, y, ln);
    }
    disposeAll(x, w, ref);
  });

  it('rejects mismatched shapes, dtypes and arguments with clear errors', () => {
    const x = randn([2, 8], { generator: new Generator(1) });
    const w7 = randn([7]);
    const w8 = randn([8]);
    const wd = randn([8], { dtype: 'float64' });
    const i = tensor([[1, 2]]);
    expectTensorError(
      () => rmsNorm(x, [8], w7),
      'SHAPE_MISMATCH',
      'rmsNorm: weight [7] does not match normalizedShape [8]',
    );
    expectTensorError(
      () => layerNorm(x, [8], w8, w7),
      'SHAPE_MISMATCH',
      'layerNorm: bias [7] does not match normalizedShape [8]',
    );
    expectTensorError(
      () => rmsNorm(x, [7]),
      'SHAPE_MISMATCH',
      'rmsNorm: input [2,8] does not end with normalizedShape [7]',
    );
    expectTensorError(() => layerNorm(x, [3, 2, 8]), 'SHAPE_MISMATCH', /layerNorm: input \[2,8\]/);
    expectTensorError(() => rmsNorm(x, [8], wd), 'DTYPE_MISMATCH', /rmsNorm: weight dtype float64/);
    expectTensorError(() => layerNorm(i, [2]), 'DTYPE_MISMATCH', /layerNorm/);
    expectTensorError(() => rmsNorm(x, []), 'INVALID_ARGUMENT', /rmsNorm: normalizedShape/);
    expectTensorError(() => rmsNorm(x, [8], null, -1), 'INVALID_ARGUMENT', /rmsNorm: eps/);
    disposeAll(x, w7, w8, wd, i);
  });

  it('frees every temporary of forward + backward', () => {
    const gen = new Generator(17);
    const x = randn([3, 4, 6], { generator: gen }).requiresGrad_();
    const w = randn([6], { generator: gen }).requiresGrad_();
    const b = randn([6], { generator: gen }).requiresGrad_();
    const wFixed = randn([4, 6], { generator: gen });
    const before = memoryStats().liveBytes;
    tidy(() => {
      const a = layerNorm(x, [6], w, b);
      const r = rmsNorm(x.transpose(0, 1), [6], w);
      const c = layerNorm(x, [4, 6], wFixed, null);
      const d = rmsNorm(x.to('bfloat16'), 6).float();
      a.mul(r.transpose(0, 1)).sum().add(c.sum()).add(d.square().sum()).backward();
    });
    disposeAll(x.grad, w.grad, b.grad);
    x.grad = null;
    w.grad = null;
    b.grad = null;
    expect(memoryStats().liveBytes).toBe(before);
    disposeAll(x, w, b, wFixed);
  });
});

describe('norm backward into a residual stream', () => {
  // x feeds a norm and a residual path (as a pre-norm transformer layer's input does): the norm's
  // backward adds its input gradient into the residual path's gradient waiting for x (the engine's
  // pending gradient), which must give the bits of the two gradients computed apart and added
  for (const dtype of ['float32', 'bfloat16', 'float64'] as const) {
    for (const op of ['rmsNorm', 'layerNorm'] as const) {
      it(`${op}, ${dtype}: x's gradient is the residual's plus the norm's, bit for bit`, () => {
        tidy(() => {
          const gen = new Generator().manualSeed(7);
          const x0 = randn([6, 16], { generator: gen }).to(dtype);
          const w = randn([16], { generator: gen }).to(dtype);
          const b = randn([16], { generator: gen }).to(dtype);
          const gy = randn([6, 16], { generator: gen }).to(dtype);
          const gr = randn([6, 16], { generator: gen }).to(dtype);
          const norm = (t: typeof x0) =>
            op === 'rmsNorm' ? rmsNorm(t, [16], w, 1e-6) : layerNorm(t, [16], w, b, 1e-5);
          // together: h = x * 1 (a non-leaf), its gradient from the residual path (h * 1, the
          // engine runs it first) waits while the norm's backward runs
          const x = x0.detach().requiresGrad_(true);
          const h = x.mul(1);
          const y = norm(h).mul(gy).sum().add(h.mul(1).mul(gr).sum());
          y.backward();
          // apart: the norm's input gradient alone, then the residual's added
          const xa = x0.detach().requiresGrad_(true);
          norm(xa).mul(gy).sum().backward();
          const want = gr.add(xa.grad!);
          expect(Array.from(x.grad!.toTypedArray() as ArrayLike<number>)).toEqual(
            Array.from(want.toTypedArray() as ArrayLike<number>),
          );
        });
      });
    }
  }
});
