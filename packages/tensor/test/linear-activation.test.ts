// linearActivation: equality with the composition act(linear(x, weight, bias)) forward and backward
// in every float dtype with odd sizes, K = 0, M = 0, non-contiguous inputs and a null bias: bit for
// bit where the backend has no linearBiasActivation kernel (the CPU, the reference backend), within
// the unfused steps' extra roundings where it has one (the conformance run on cudaemu:0 / cuda:0);
// no storage left behind; errors.
import { describe, expect, it } from 'vitest';
import {
  type DType,
  gelu,
  getBackend,
  getDefaultDevice,
  hasNativeKernel,
  type LinearActivation,
  linear,
  linearActivation,
  memoryStats,
  narrow,
  relu,
  type Tensor,
  tensor,
  tidy,
  transpose,
  zeros,
} from '../src/index.js';
import { expectTensorError, seededNormals as normals, relDiff } from './fixtures.js';

const ACTIVATIONS: LinearActivation[] = ['relu', 'gelu', 'gelu-tanh'];
const DTYPES: DType[] = ['float32', 'bfloat16', 'float16', 'float64'];

/** What linearActivation is defined as: act(linear(x, weight, bias)) of the unfused ops. */
function composition(
  x: Tensor,
  w: Tensor,
  b: Tensor | null | undefined,
  activation: LinearActivation,
): Tensor {
  const y = linear(x, w, b);
  return activation === 'relu' ? relu(y) : gelu(y, activation === 'gelu-tanh' ? 'tanh' : 'none');
}

/** Whether the default device runs the fused kernel (else the op is the composition itself). */
const fusedHere = (): boolean => hasNativeKernel(getBackend(getDefaultDevice()), 'linearBiasActivation');

const values = (t: Tensor): number[] => Array.from(t.toTypedArray() as ArrayLike<number>, Number);

// with the fused kernel, the composition's extra roundings (the GEMM's and the bias add's before
// the activation) separate the two by a few units of the dtype
const FUSED_TOL: Record<string, number> = { float32: 1e-5, float64: 1e-12, bfloat16: 3e-2, float16: 4e-3 };

type Layout = 'contiguous' | '3-d' | 'transposed' | 'sliced' | 'K = 0' | 'M = 0';
const CASES: { layout: Layout; M: number; K: number; N: number; bias: boolean }[] = [
  { layout: 'contiguous', M: 5, K: 7, N: 6, bias: true },
  { layout: '3-d', M: 6, K: 33, N: 17, bias: false },
  { layout: 'transposed', M: 5, K: 7, N: 9, bias: true },
  { layout: 'sliced', M: 6, K: 7, N: 5, bias: true },
  { layout: 'contiguous', M: 1, K: 1, N: 1, bias: false },
  { layout: 'K = 0', M: 4, K: 0, N: 3, bias: true },
  { layout: 'M = 0', M: 0, K: 7, N: 3, bias: true },
];

/** x [M, K] (or [2, M/2, K]) laid out as asked; values of order 1 for every K. */
function input(randn: ReturnType<typeof normals>, c: (typeof CASES)[number], dtype: DType): Tensor {
  const { M, K } = c;
  if (c.layout === '3-d') return randn([2, M / 2, K], dtype);
  if (c.layout === 'transposed') return transpose(randn([K, M], dtype), 0, 1);
  if (c.layout === 'sliced') return narrow(randn([M, K + 4], dtype), 1, 2, K);
  return randn([M, K], dtype);
}

describe('linearActivation equals act(linear(x, weight, bias))', () => {
  for (const dtype of DTYPES) {
    for (const activation of ACTIVATIONS) {
      it(`${activation}, ${dtype}: forward and backward, odd sizes, strided x, K = 0, M = 0, no bias`, () => {
        const fused = fusedHere();
        for (const [ci, c] of CASES.entries()) {
          tidy(() => {
            const randn = normals(ci * 31 + activation.length * 7 + dtype.length);
            const x0 = input(randn, c, dtype);
            const w0 = randn([c.N, c.K], dtype, 1 / Math.sqrt(Math.max(c.K, 1)));
            const b0 = c.bias ? randn([c.N], dtype) : null;
            const g = randn([...x0.shape.slice(0, -1), c.N], dtype);
            const label = `${activation} ${dtype} ${c.layout} M ${c.M} K ${c.K} N ${c.N}${c.bias ? '' : ' no bias'}`;
            const run = (fn: typeof linearActivation): Tensor[] => {
              const x = x0.detach().requiresGrad_(true);
              const w = w0.detach().requiresGrad_(true);
              const b = b0 ? b0.detach().requiresGrad_(true) : null;
              const y = fn(x, w, b, activation);
              y.backward(g);
              const grads = [x.grad, w.grad, b?.grad].filter(
                (t): t is Tensor => t !== null && t !== undefined,
              );
              return [y.detach(), ...grads];
            };
            const got = run(linearActivation);
            const want = run(composition);
            expect(got[0].shape, label).toEqual([...x0.shape.slice(0, -1), c.N]);
            expect(got[0].dtype, label).toBe(dtype);
            for (const [i, name] of ['out', 'dx', 'dweight', 'dbias'].slice(0, got.length).entries()) {
              expect(got[i].shape, `${label} ${name}`).toEqual(want[i].shape);
              if (!fused) expect(values(got[i]), `${label} ${name}`).toEqual(values(want[i]));
              else expect(relDiff(got[i], want[i]), `${label} ${name}`).toBeLessThanOrEqual(FUSED_TOL[dtype]);
            }
          });
        }
      });
    }
  }

  it('leaves no storage behind once the graph is released', () => {
    const device = getDefaultDevice();
    const randn = normals(3);
    tidy(() => {
      const before = memoryStats(device).liveStorages;
      for (const activation of ACTIVATIONS) {
        tidy(() => {
          const x = randn([4, 6], 'float32').requiresGrad_(true);
          const w = randn([5, 6], 'float32').requiresGrad_(true);
          const b = randn([5], 'float32').requiresGrad_(true);
          linearActivation(x, w, b, activation).sum().backward();
          linearActivation(x, w, null, activation).dispose(); // a graph that is never run
        });
      }
      expect(memoryStats(device).liveStorages).toBe(before);
    });
  });
});

describe('linearActivation errors', () => {
  const x = zeros([2, 3]);
  const w = zeros([4, 3]);
  const b = zeros([4]);

  it('names a bad activation', () => {
    for (const bad of ['swiglu', 'tanh', 'GELU'])
      expectTensorError(
        () => linearActivation(x, w, b, bad as LinearActivation),
        'INVALID_ARGUMENT',
        `linearActivation: activation must be 'relu', 'gelu' or 'gelu-tanh', got ${bad}`,
      );
  });

  it('names bad shapes', () => {
    expectTensorError(
      () => linearActivation(x, zeros([3]), b, 'relu'),
      'SHAPE_MISMATCH',
      /weight must be \[out, in\]/,
    );
    expectTensorError(
      () => linearActivation(x, zeros([4, 5]), b, 'gelu'),
      'SHAPE_MISMATCH',
      /^linearActivation: input \[2,3\] has 3 features, weight \[4,5\] expects 5$/,
    );
    expectTensorError(
      () => linearActivation(x, w, zeros([5]), 'gelu'),
      'SHAPE_MISMATCH',
      /bias \[5\] must be \[4\]/,
    );
    expectTensorError(() => linearActivation(zeros([]), w, b, 'relu'), 'SHAPE_MISMATCH', /got a 0-d tensor/);
  });

  it('names mixed and integer dtypes', () => {
    expectTensorError(
      () => linearActivation(x, w.to('bfloat16'), b, 'relu'),
      'DTYPE_MISMATCH',
      /^linearActivation: weight is bfloat16 but x is float32; use one dtype$/,
    );
    expectTensorError(
      () => linearActivation(x, w, b.to('float64'), 'relu'),
      'DTYPE_MISMATCH',
      /bias is float64/,
    );
    expectTensorError(
      () => linearActivation(x.to('int32'), w.to('int32'), null, 'relu'),
      'DTYPE_MISMATCH',
      /expected a floating-point input/,
    );
  });
});
