// linearResidual: equality with the composition add(residual, linear(x, weight)) forward and
// backward in every float dtype with odd sizes, K = 0, M = 0, strided inputs and residuals: bit for
// bit where the backend has no linearResidual kernel (the CPU, the reference backend), within the
// composition's extra rounding where it has one (the conformance run on cudaemu:0 / cuda:0); the
// residual's gradient is the output's; a float64 gradcheck; no storage left behind; errors.
import { describe, expect, it } from 'vitest';
import {
  add,
  type DType,
  getBackend,
  getDefaultDevice,
  gradcheck,
  hasNativeKernel,
  linear,
  linearResidual,
  memoryStats,
  narrow,
  type Tensor,
  tensor,
  tidy,
  transpose,
  zeros,
} from '../src/index.js';
import { expectTensorError, seededNormals as normals, relDiff } from './fixtures.js';

const DTYPES: DType[] = ['float32', 'bfloat16', 'float16', 'float64'];

/** What linearResidual is defined as: residual + linear(x, weight), the unfused ops. */
const composition = (x: Tensor, w: Tensor, r: Tensor): Tensor => add(r, linear(x, w));

/** Whether the default device runs the fused kernel (else the op is the composition itself). */
const fusedHere = (): boolean => hasNativeKernel(getBackend(getDefaultDevice()), 'linearResidual');

const values = (t: Tensor): number[] => Array.from(t.toTypedArray() as ArrayLike<number>, Number);

// with the fused kernel the composition rounds the product before the add: a unit of the dtype apart
const FUSED_TOL: Record<string, number> = { float32: 1e-5, float64: 1e-12, bfloat16: 2e-2, float16: 2e-3 };

type Layout = 'contiguous' | '3-d' | 'transposed x' | 'sliced residual' | 'K = 0' | 'M = 0';
const CASES: { layout: Layout; M: number; K: number; N: number }[] = [
  { layout: 'contiguous', M: 5, K: 7, N: 6 },
  { layout: '3-d', M: 6, K: 33, N: 17 },
  { layout: 'transposed x', M: 5, K: 7, N: 9 },
  { layout: 'sliced residual', M: 6, K: 7, N: 5 },
  { layout: 'contiguous', M: 1, K: 1, N: 1 },
  { layout: 'K = 0', M: 4, K: 0, N: 3 },
  { layout: 'M = 0', M: 0, K: 7, N: 3 },
];

describe('linearResidual equals residual + linear(x, weight)', () => {
  for (const dtype of DTYPES) {
    it(`${dtype}: forward and backward, odd sizes, strided x and residual, K = 0, M = 0`, () => {
      const fused = fusedHere();
      for (const [ci, c] of CASES.entries()) {
        tidy(() => {
          const randn = normals(ci * 37 + dtype.length);
          const lead = c.layout === '3-d' ? [2, c.M / 2] : [c.M];
          const x0 =
            c.layout === 'transposed x'
              ? transpose(randn([c.K, c.M], dtype), 0, 1)
              : randn([...lead, c.K], dtype);
          const w0 = randn([c.N, c.K], dtype, 1 / Math.sqrt(Math.max(c.K, 1)));
          const r0 =
            c.layout === 'sliced residual'
              ? narrow(randn([c.M, c.N + 3], dtype), 1, 1, c.N)
              : randn([...lead, c.N], dtype);
          const g = randn([...lead, c.N], dtype);
          const label = `${dtype} ${c.layout} M ${c.M} K ${c.K} N ${c.N}`;
          const run = (fn: typeof linearResidual): Tensor[] => {
            const x = x0.detach().requiresGrad_(true);
            const w = w0.detach().requiresGrad_(true);
            const r = r0.detach().requiresGrad_(true);
            const y = fn(x, w, r);
            y.backward(g);
            return [y.detach(), x.grad as Tensor, w.grad as Tensor, r.grad as Tensor];
          };
          const got = run(linearResidual);
          const want = run(composition);
          expect(got[0].shape, label).toEqual([...lead, c.N]);
          expect(got[0].dtype, label).toBe(dtype);
          for (const [i, name] of ['out', 'dx', 'dweight', 'dresidual'].entries()) {
            expect(got[i].shape, `${label} ${name}`).toEqual(want[i].shape);
            // the gradients come from the same GEMMs either way: bit for bit
            if (!fused || i > 0) expect(values(got[i]), `${label} ${name}`).toEqual(values(want[i]));
            else expect(relDiff(got[i], want[i]), `${label} ${name}`).toBeLessThanOrEqual(FUSED_TOL[dtype]);
          }
          // the residual's gradient is the output's
          expect(values(got[3]), `${label} dresidual = g`).toEqual(values(g));
        });
      }
    });
  }

  it('passes gradcheck in float64', () => {
    const randn = normals(11);
    const x = randn([3, 4], 'float64').requiresGrad_(true);
    const w = randn([5, 4], 'float64').requiresGrad_(true);
    const r = randn([3, 5], 'float64').requiresGrad_(true);
    expect(gradcheck((a, b, c) => linearResidual(a, b, c), [x, w, r])).toBe(true);
  });

  it('leaves no storage behind once the graph is released', () => {
    const device = getDefaultDevice();
    const randn = normals(3);
    tidy(() => {
      const before = memoryStats(device).liveStorages;
      tidy(() => {
        const x = randn([4, 6], 'float32').requiresGrad_(true);
        const w = randn([5, 6], 'float32').requiresGrad_(true);
        const r = randn([4, 5], 'float32').requiresGrad_(true);
        linearResidual(x, w, r).sum().backward();
        linearResidual(x, w, r).dispose(); // a graph that is never run
      });
      expect(memoryStats(device).liveStorages).toBe(before);
    });
  });
});

describe('linearResidual errors', () => {
  it('names bad shapes', () => {
    const x = zeros([2, 3]);
    const w = zeros([4, 3]);
    expectTensorError(
      () => linearResidual(x, w, zeros([2, 5])),
      'SHAPE_MISMATCH',
      /^linearResidual: residual \[2,5\] must have the output's shape \[2,4\]$/,
    );
    expectTensorError(
      () => linearResidual(x, w, zeros([4])),
      'SHAPE_MISMATCH',
      /^linearResidual: residual \[4\] must have the output's shape \[2,4\]$/,
    );
    expectTensorError(
      () => linearResidual(x, zeros([4, 5]), zeros([2, 4])),
      'SHAPE_MISMATCH',
      /^linearResidual: input \[2,3\] has 3 features, weight \[4,5\] expects 5$/,
    );
  });
});
