// Core ops against PyTorch: forward values and input gradients for every case in
// fixtures/core.json (written by scripts/fixtures_core.py, which documents each case's args).
import { describe, expect, it } from 'vitest';
import type { DType, Tensor } from '../src/index.js';
import * as T from '../src/index.js';
import { expectClose, type FixtureCase, fromFixture, loadFixture } from './fixtures.js';

type Inputs = Record<string, Tensor>;
type Args = Record<string, unknown> & { op: string };
type Result = Tensor | Tensor[] | { values: Tensor; indices: Tensor };

const num = (v: unknown): number => (v === 'inf' ? Number.POSITIVE_INFINITY : (v as number));
const dimArg = (v: unknown): number | number[] | undefined =>
  v === undefined || v === null ? undefined : (v as number);

const BINARY: Record<string, (a: Tensor | number, b: Tensor | number) => Tensor> = {
  add: (a, b) => T.add(a, b),
  sub: (a, b) => T.sub(a, b),
  mul: T.mul,
  div: T.div,
  pow: T.pow,
  maximum: (a, b) => T.maximum(a as Tensor, b as Tensor),
  minimum: (a, b) => T.minimum(a as Tensor, b as Tensor),
  eq: (a, b) => T.eq(a as Tensor, b),
  ne: (a, b) => T.ne(a as Tensor, b),
  lt: (a, b) => T.lt(a as Tensor, b),
  le: (a, b) => T.le(a as Tensor, b),
  gt: (a, b) => T.gt(a as Tensor, b),
  ge: (a, b) => T.ge(a as Tensor, b),
};

const UNARY: Record<string, (x: Tensor) => Tensor> = {
  neg: T.neg,
  exp: T.exp,
  log: T.log,
  sqrt: T.sqrt,
  rsqrt: T.rsqrt,
  abs: T.abs,
  tanh: T.tanh,
  sigmoid: T.sigmoid,
  silu: T.silu,
  gelu: (x) => T.gelu(x),
  geluTanh: (x) => T.gelu(x, 'tanh'),
  relu: T.relu,
  sin: T.sin,
  cos: T.cos,
  square: T.square,
  reciprocal: T.reciprocal,
  log1p: T.log1p,
  expm1: T.expm1,
};

/** Interprets a case's args with our ops, exactly as apply() in fixtures_core.py does with torch. */
function run(a: Args, t: Inputs): Result {
  const x = t.x;
  const kd = (a.keepdim as boolean | undefined) ?? false;
  if (a.op in BINARY) {
    const f = BINARY[a.op];
    if ('scalar' in a) return a.reverse ? f(a.scalar as number, x) : f(x, a.scalar as number);
    if ('alpha' in a)
      return a.op === 'add' ? T.add(x, t.y, a.alpha as number) : T.sub(x, t.y, a.alpha as number);
    return f(x, t.y);
  }
  switch (a.op) {
    case 'unary':
      return UNARY[a.fn as string](x);
    case 'clamp':
      return T.clamp(x, a.min as number | undefined, a.max as number | undefined);
    case 'where':
      return T.where(
        t.cond,
        'xScalar' in a ? (a.xScalar as number) : x,
        'yScalar' in a ? (a.yScalar as number) : t.y,
      );
    case 'maskedFill':
      return T.maskedFill(x, t.mask, a.value as number);
    case 'sum':
      return T.sum(x, dimArg(a.dim), kd);
    case 'mean':
      return T.mean(x, dimArg(a.dim), kd);
    case 'var':
      return T.variance(x, dimArg(a.dim), { correction: a.correction as number | undefined, keepdim: kd });
    case 'amax':
      return T.amax(x, dimArg(a.dim), kd);
    case 'amin':
      return T.amin(x, dimArg(a.dim), kd);
    case 'maxAll':
      return T.max(x);
    case 'minAll':
      return T.min(x);
    case 'maxDim':
      return T.max(x, a.dim as number, kd);
    case 'minDim':
      return T.min(x, a.dim as number, kd);
    case 'argmax':
      return T.argmax(x, a.dim as number | undefined, kd);
    case 'argmin':
      return T.argmin(x, a.dim as number | undefined, kd);
    case 'logsumexp':
      return T.logsumexp(x, a.dim as number | number[], kd);
    case 'norm':
      return T.norm(x, num(a.p), dimArg(a.dim), kd);
    case 'cumsum':
      return T.cumsum(x, a.dim as number);
    case 'view':
      return T.view(x, a.shape as number[]);
    case 'reshape':
      return T.reshape(x, a.shape as number[]);
    case 'transpose':
      return T.transpose(x, a.dim0 as number, a.dim1 as number);
    case 'permute':
      return T.permute(x, a.dims as number[]);
    case 'expand':
      return T.expand(x, a.shape as number[]);
    case 'squeeze':
      return T.squeeze(x, a.dim as number | undefined);
    case 'unsqueeze':
      return T.unsqueeze(x, a.dim as number);
    case 'flatten':
      return T.flatten(x, a.start as number | undefined, a.end as number | undefined);
    case 'narrow':
      return T.narrow(x, a.dim as number, a.start as number, a.length as number);
    case 'select':
      return T.select(x, a.dim as number, a.index as number);
    case 'split':
      return T.split(x, a.size as number | number[], a.dim as number | undefined);
    case 'chunk':
      return T.chunk(x, a.chunks as number, a.dim as number | undefined);
    case 'cat':
      return T.cat(
        (a.list as string[]).map((n) => t[n]),
        a.dim as number | undefined,
      );
    case 'stack':
      return T.stack(
        (a.list as string[]).map((n) => t[n]),
        a.dim as number | undefined,
      );
    case 'contiguous':
      return T.contiguous(x);
    case 'to':
      return T.to(x, a.dtype as DType);
    case 'matmul':
      return T.matmul(x, t.y);
    case 'bmm':
      return T.bmm(x, t.y);
    case 'linear':
      return T.linear(x, t.w, t.b);
  }
  throw new Error(`unknown op ${a.op}`);
}

function checkCase(c: FixtureCase): void {
  const a = c.args as Args;
  const wantGrad = new Set((a.grad as string[] | undefined) ?? []);
  const tol = a.tol as { atol?: number; rtol?: number } | undefined;
  const inputs: Inputs = {};
  for (const [k, f] of Object.entries(c.inputs)) inputs[k] = fromFixture(f, wantGrad.has(k));
  try {
    T.tidy(() => {
      for (const [k, f] of Object.entries(c.inputs)) {
        if (f.layout === 'transposed')
          expect(inputs[k].isContiguous, `${k} is a non-contiguous view`).toBe(false);
      }
      const r = run(a, inputs);
      if (Array.isArray(r)) {
        expect(r.length, 'number of outputs').toBe(Object.keys(c.outputs).length);
        r.forEach((o, i) => {
          expect(o.dtype).toBe(c.outputs[`out${i}`].dtype);
          expectClose(o, c.outputs[`out${i}`], tol, `out${i}`);
        });
      } else if (r instanceof T.Tensor) {
        expect(r.dtype, 'output dtype').toBe(c.outputs.out.dtype);
        expectClose(r, c.outputs.out, tol, 'out');
      } else {
        expect(r.values.dtype).toBe(c.outputs.values.dtype);
        expectClose(r.values, c.outputs.values, tol, 'values');
        expectClose(r.indices, c.outputs.indices, undefined, 'indices');
      }
      if (wantGrad.size === 0) return;
      if (Array.isArray(r)) {
        // torch: sum_i (out_i * gout_i).sum(), so each piece receives gout_i
        let loss: Tensor | null = null;
        r.forEach((o, i) => {
          const s = T.sum(T.mul(o, inputs[`gout${i}`]));
          loss = loss ? T.add(loss, s) : s;
        });
        (loss as unknown as Tensor).backward();
      } else if (r instanceof T.Tensor) {
        r.backward(inputs.gout);
      } else {
        r.values.backward(inputs.gout);
      }
      for (const [k, g] of Object.entries(c.grads)) {
        const got = inputs[k].grad;
        expect(got, `gradient of ${k}`).not.toBeNull();
        expect(got!.dtype, `gradient dtype of ${k}`).toBe(inputs[k].dtype);
        expectClose(got!, g, tol, `grad ${k}`);
      }
    });
  } finally {
    for (const t of Object.values(inputs)) t.dispose();
  }
}

const cases = loadFixture('core');

describe('core ops against PyTorch', () => {
  it('has the fixture cases', () => {
    expect(cases.length).toBeGreaterThan(300);
  });
  it.each(cases.map((c) => [c.name, c] as const))('%s', (_name, c) => {
    const before = T.memoryStats().liveBytes;
    checkCase(c);
    // every case frees what it allocated (inputs, outputs, graph, gradients)
    expect(T.memoryStats().liveBytes).toBe(before);
  });
});

// Behaviour without a torch counterpart (or checked by hand against the definition).
describe('core ops: semantics beyond the fixtures', () => {
  const arr = (t: Tensor) => {
    const v = t.toArray();
    t.dispose();
    return v;
  };

  it('add(number, tensor, alpha) is number + alpha * tensor', () => {
    const x = T.tensor([1, -2], { dtype: 'float32' });
    expect(arr(T.add(2, x, 3))).toEqual([5, -4]);
    expect(arr(T.add(x, 2, 3))).toEqual([7, 4]);
    expect(arr(T.sub(x, 2, 3))).toEqual([-5, -8]);
    x.dispose();
  });

  it('0-d tensors accept dims 0 and -1 where torch does', () => {
    const s = T.tensor(2.5, { dtype: 'float32' });
    expect(arr(T.sum(s, -1))).toBe(2.5);
    expect(arr(T.transpose(s, 0, -1))).toBe(2.5);
    expect(arr(T.cumsum(s, -1))).toBe(2.5);
    expect(arr(T.unsqueeze(s, -1))).toEqual([2.5]);
    expect(arr(T.stack([s, s]))).toEqual([2.5, 2.5]);
    s.dispose();
  });

  it('int64 true division gives float32, as torch.div', () => {
    const a = T.tensor([7, -7, 1]);
    expect(arr(T.div(a, T.tensor([2, 2, 3])))).toEqual([3.5, -3.5, Math.fround(1 / 3)]);
    expect(arr(T.div(a, 1))).toEqual([7, -7, 1]);
    a.dispose();
  });

  it('zero-size operands', () => {
    const z = T.zeros([3, 0]);
    const w = T.ones([0, 2]);
    // an empty inner dimension sums nothing: zeros, like torch
    expect(arr(T.matmul(z, w))).toEqual([
      [0, 0],
      [0, 0],
      [0, 0],
    ]);
    expect(arr(T.sum(z, 1))).toEqual([0, 0, 0]);
    const o = T.ones([3]);
    expect(arr(T.narrow(o, 0, 3, 0))).toEqual([]);
    o.dispose();
    expect(() => T.amax(z, 1)).toThrow(T.TensorError);
    z.dispose();
    w.dispose();
  });
});

// The fixtures are small, so their kernels run on one thread. These sizes cross the parallel
// grain (32768 element-costs, common.h) and are checked against float64 references computed in JS
// from the same float32 inputs.
describe('core ops: large tensors (multi-threaded kernels)', () => {
  const gen = new T.Generator(77);
  const f32 = (t: Tensor) => Array.from(t.toTypedArray() as Float32Array);
  function near(got: number[], want: number[], atol: number, rtol: number, label: string): void {
    expect(got.length, label).toBe(want.length);
    for (let i = 0; i < want.length; i++) {
      if (!(Math.abs(got[i] - want[i]) <= atol + rtol * Math.abs(want[i]))) {
        expect.fail(`${label} element ${i}: got ${got[i]}, expected ${want[i]}`);
      }
    }
  }

  it('elementwise, broadcasting, transposed copies and comparisons', () => {
    T.tidy(() => {
      const R = 300;
      const C = 257;
      const x = T.randn([R, C], { generator: gen });
      const b = T.randn([C], { generator: gen });
      const xv = f32(x);
      const bv = f32(b);
      near(f32(T.exp(x)), xv.map(Math.exp), 0, 1e-6, 'exp');
      near(
        f32(T.add(x, b)),
        xv.map((v, i) => v + bv[i % C]),
        0,
        1e-7,
        'add broadcast',
      );
      near(
        f32(T.gelu(T.transpose(x, 0, 1))),
        Array.from({ length: R * C }, (_, k) => {
          const v = xv[(k % R) * C + Math.floor(k / R)];
          return 0.5 * v * (1 + erf(v / Math.SQRT2));
        }),
        1e-6,
        1e-5,
        'gelu of transposed',
      );
      near(
        f32(T.contiguous(T.transpose(x, 0, 1))),
        Array.from({ length: R * C }, (_, k) => xv[(k % R) * C + Math.floor(k / R)]),
        0,
        0,
        'transpose copy',
      );
      const gt = Array.from(T.gt(x, b).toTypedArray() as Uint8Array);
      expect(gt.every((v, i) => v === (xv[i] > bv[i % C] ? 1 : 0))).toBe(true);
    });
  });

  it('reductions over each dimension, cumsum, argmax', () => {
    T.tidy(() => {
      const [A, B, Cn] = [64, 40, 30];
      const x = T.randn([A, B, Cn], { generator: gen });
      const xv = f32(x);
      const at = (i: number, j: number, k: number) => xv[(i * B + j) * Cn + k];
      const sum1: number[] = [];
      const max2: number[] = [];
      const arg2: number[] = [];
      for (let i = 0; i < A; i++) {
        for (let k = 0; k < Cn; k++) {
          let s = 0;
          for (let j = 0; j < B; j++) s += at(i, j, k);
          sum1.push(s);
        }
        for (let j = 0; j < B; j++) {
          let m = Number.NEGATIVE_INFINITY;
          let a = 0;
          for (let k = 0; k < Cn; k++) {
            if (at(i, j, k) > m) {
              m = at(i, j, k);
              a = k;
            }
          }
          max2.push(m);
          arg2.push(a);
        }
      }
      near(f32(T.sum(x, 1)), sum1, 1e-5, 1e-5, 'sum dim 1');
      near(f32(T.amax(x, 2)), max2, 0, 0, 'amax dim 2');
      expect(Array.from(T.argmax(x, 2).toTypedArray() as BigInt64Array, Number)).toEqual(arg2);
      let total = 0;
      for (const v of xv) total += v;
      near(f32(T.sum(x)), [total], 1e-3, 1e-5, 'sum all');
      // cumsum along a long dimension, split across threads by rows
      const y = T.randn([4, 20000], { generator: gen });
      const yv = f32(y);
      const cs: number[] = [];
      for (let r = 0; r < 4; r++) {
        let s = 0;
        for (let c = 0; c < 20000; c++) {
          s += yv[r * 20000 + c];
          cs.push(s);
        }
      }
      near(f32(T.cumsum(y, 1)), cs, 1e-4, 1e-5, 'cumsum');
    });
  });

  it('bf16 matmul (float panels, threaded) against a float64 product', () => {
    T.tidy(() => {
      const [M, K, N] = [200, 64, 180];
      const a = T.randn([M, K], { generator: gen, dtype: 'bfloat16' });
      const b = T.randn([K, N], { generator: gen, dtype: 'bfloat16' });
      const av = f32(a);
      const bv = f32(b);
      const want: number[] = [];
      for (let i = 0; i < M; i++)
        for (let j = 0; j < N; j++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += av[i * K + k] * bv[k * N + j];
          want.push(s);
        }
      // float32 accumulation then one rounding to bf16: within one bf16 ulp (2^-8 relative)
      // plus the float32 accumulation error
      near(f32(T.matmul(a, b)), want, 1e-3, 2 ** -8, 'bf16 matmul');
    });
  });
});

/** erf: its Maclaurin series for |x| < 3 (double precision), Abramowitz-Stegun 7.1.26 beyond. */
function erf(x: number): number {
  const s = Math.sign(x);
  const ax = Math.abs(x);
  const t = 1 / (1 + 0.3275911 * ax);
  let y =
    1 -
    ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) *
      t *
      Math.exp(-ax * ax);
  if (ax < 3) {
    let term = ax;
    let sum = ax;
    for (let n = 1; n < 60; n++) {
      term *= (-ax * ax) / n;
      sum += term / (2 * n + 1);
    }
    y = (2 / Math.sqrt(Math.PI)) * sum;
  }
  return s * y;
}
