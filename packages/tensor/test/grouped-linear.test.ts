// groupedLinear against its definition, per-group `linear` on narrowed rows and `cat`: the same
// GEMM per group, so forward and every gradient must agree bit for bit, for each float dtype,
// empty groups, one group, no rows, non-contiguous operands, on the native CPU backend and on the
// pure-TypeScript reference backend (ref:0). Then finite differences in float64, the errors, and
// the memory it leaves behind. (packages/models/test/grouped-experts.test.ts runs it on the CUDA
// emulator, which this package cannot import.)
import { describe, expect, it } from 'vitest';
import { registerReferenceBackend } from '../src/backend/reference.js';
import type { DType, Tensor } from '../src/index.js';
import * as T from '../src/index.js';

registerReferenceBackend();

interface Case {
  sizes: number[];
  K: number;
  F: number;
}

/** Deterministic inputs of a case: x [N, K], one weight [F, K] per group, upstream gradient [N, F]. */
function inputs(c: Case, dtype: DType, device: string, seed: number) {
  const gen = new T.Generator(seed);
  const N = c.sizes.reduce((a, b) => a + b, 0);
  const make = (shape: number[]) => {
    const r = T.randn(shape, { generator: gen });
    const t = r.to({ device, dtype });
    if (t !== r) r.dispose();
    return t;
  };
  return { x: make([N, c.K]), ws: c.sizes.map(() => make([c.F, c.K])), g: make([N, c.F]) };
}

/** The definition: each group's rows through `linear`, concatenated. */
function perGroup(x: Tensor, ws: readonly Tensor[], sizes: readonly number[]): Tensor {
  const outs: Tensor[] = [];
  let start = 0;
  sizes.forEach((n, e) => {
    outs.push(T.linear(x.narrow(0, start, n), ws[e]));
    start += n;
  });
  return outs.length === 1 ? outs[0] : T.cat(outs, 0);
}

type Fn = (x: Tensor, ws: readonly Tensor[], sizes: readonly number[]) => Tensor;

/** Output, dx and every dW of fn on fresh leaves copied from the inputs, as host arrays. */
function run(fn: Fn, x: Tensor, ws: readonly Tensor[], g: Tensor, sizes: readonly number[]) {
  return T.tidy(() => {
    const xl = x.clone().requiresGrad_(true);
    const wl = ws.map((w) => w.clone().requiresGrad_(true));
    const y = fn(xl, wl, sizes);
    y.backward(g);
    const host = (t: Tensor | null) => {
      if (!t) throw new Error('missing gradient');
      const a = t.toTypedArray() as Float32Array | Float64Array;
      t.dispose();
      return { shape: [...t.shape], a };
    };
    return { y: host(y), dx: host(xl.grad), dws: wl.map((w) => host(w.grad)) };
  });
}

/** Equal bit for bit (NaN-free data), reporting the first differing element. */
function expectSame(
  got: { shape: number[]; a: Float32Array | Float64Array },
  want: { shape: number[]; a: Float32Array | Float64Array },
  what: string,
): void {
  expect(got.shape, what).toEqual(want.shape);
  const i = got.a.findIndex((v, j) => !Object.is(v, want.a[j]));
  expect(i === -1 ? 'identical' : `${what}[${i}]: ${got.a[i]} vs ${want.a[i]}`).toBe('identical');
}

function compare(
  c: Case,
  dtype: DType,
  device: string,
  seed: number,
  layout: 'dense' | 'transposed' = 'dense',
) {
  const { x, ws, g } = inputs(c, dtype, device, seed);
  // transposed: x, the weights and the upstream gradient as transposes of contiguous tensors
  const lay = (t: Tensor) => (layout === 'dense' ? t.clone() : t.t().contiguous().t());
  const [xv, gv] = [lay(x), lay(g)];
  const wv = ws.map(lay);
  if (layout === 'transposed' && xv.shape[0] > 1) expect(xv.isContiguous).toBe(false);
  const got = run(T.groupedLinear, xv, wv, gv, c.sizes);
  const want = run(perGroup, xv, wv, gv, c.sizes);
  expectSame(got.y, want.y, 'y');
  expectSame(got.dx, want.dx, 'dx');
  got.dws.forEach((dw, e) => {
    expectSame(dw, want.dws[e], `dW${e}`);
  });
  for (const t of [x, g, xv, gv, ...ws, ...wv]) t.dispose();
  return got;
}

const CASES: Record<string, Case> = {
  'odd sizes with an empty group': { sizes: [3, 0, 5, 2], K: 7, F: 6 },
  'one group': { sizes: [9], K: 5, F: 4 },
  'no rows': { sizes: [0, 0, 0], K: 6, F: 3 },
  'only the middle group has rows': { sizes: [0, 4, 0], K: 3, F: 5 },
  'one-row groups': { sizes: [1, 1, 1, 1], K: 8, F: 3 },
  // products large enough for the native GEMM's threaded split and OpenBLAS's blocking
  'large groups': { sizes: [130, 0, 257, 70], K: 96, F: 176 },
  'K = 0': { sizes: [2, 3], K: 0, F: 4 },
  'F = 0': { sizes: [2, 3], K: 4, F: 0 },
};

describe('groupedLinear equals per-group linear + cat (forward and gradients, bit for bit)', () => {
  for (const dtype of ['float32', 'float64', 'bfloat16', 'float16'] as const) {
    for (const [name, c] of Object.entries(CASES)) {
      it(`${dtype}: ${name}`, () => {
        compare(c, dtype, 'cpu', 11);
      });
    }
    it(`${dtype}: non-contiguous x, weights and upstream gradient`, () => {
      compare({ sizes: [4, 0, 7, 3], K: 9, F: 10 }, dtype, 'cpu', 5, 'transposed');
    });
  }

  it('gives an empty group a zero [F, K] weight gradient', () => {
    const got = compare({ sizes: [3, 0, 2], K: 4, F: 5 }, 'float32', 'cpu', 3);
    expect(got.dws[1].shape).toEqual([5, 4]);
    expect(Array.from(got.dws[1].a)).toEqual(new Array(20).fill(0));
  });

  it('on the reference backend (ref:0) too', () => {
    for (const dtype of ['float32', 'bfloat16'] as const) {
      for (const [name, c] of Object.entries(CASES)) {
        if (name === 'large groups') continue; // the TypeScript GEMM is slow; the odd shapes suffice
        compare(c, dtype, 'ref:0', 17);
      }
      compare({ sizes: [4, 0, 7, 3], K: 9, F: 10 }, dtype, 'ref:0', 19, 'transposed');
    }
  });

  it('takes the sizes as a tensor (int64 or int32, where x is), with the same bits', () => {
    // the backends here are synchronous: the sizes are read at once (the CUDA emulator's test,
    // packages/cuda/test/emulated-backend.test.ts, keeps them on its device)
    for (const device of ['cpu', 'ref:0']) {
      for (const sizeDtype of ['int64', 'int32'] as const) {
        const onDevice: Fn = (x, ws, sizes) =>
          T.groupedLinear(x, ws, T.tensor([...sizes], { dtype: sizeDtype, device }));
        const c = { sizes: [4, 0, 7, 3], K: 9, F: 10 };
        const { x, ws, g } = inputs(c, 'float32', device, 29);
        const got = run(onDevice, x, ws, g, c.sizes);
        const want = run(T.groupedLinear, x, ws, g, c.sizes);
        expectSame(got.y, want.y, 'y');
        expectSame(got.dx, want.dx, 'dx');
        got.dws.forEach((dw, e) => {
          expectSame(dw, want.dws[e], `dW${e}`);
        });
        for (const t of [x, g, ...ws]) t.dispose();
      }
    }
  });

  it('shares one read of tensor sizes between layers over the same rows (SharedGroupSizes)', () => {
    const c = { sizes: [4, 0, 7, 3], K: 9, F: 9 };
    const { x, ws, g } = inputs(c, 'float32', 'cpu', 31);
    const shared = new T.SharedGroupSizes(T.tensor(c.sizes, { dtype: 'int64' }));
    expect(shared.host).toBeNull();
    const twice: Fn = (xl, wl) => T.groupedLinear(T.groupedLinear(xl, wl, shared), wl, shared);
    const got = run(twice, x, ws, g, c.sizes);
    // the CPU reads them at the first layer; the second takes that copy
    expect(shared.host).toEqual(c.sizes);
    const want = run(
      (xl, wl, sizes) => T.groupedLinear(T.groupedLinear(xl, wl, sizes), wl, sizes),
      x,
      ws,
      g,
      c.sizes,
    );
    expectSame(got.y, want.y, 'y');
    expectSame(got.dx, want.dx, 'dx');
    got.dws.forEach((dw, e) => {
      expectSame(dw, want.dws[e], `dW${e}`);
    });
    expect(() => T.groupedLinear(x, ws.slice(1), shared)).toThrow(
      /groupSizes must be \[3\] \(one size per weight\), got \[4\]/,
    );
    for (const t of [x, g, shared.sizes, ...ws]) t.dispose();
  });

  it('agrees between the CPU and ref:0 within float32 rounding', () => {
    const c = { sizes: [6, 0, 9], K: 12, F: 7 };
    const a = compare(c, 'float32', 'cpu', 23);
    const b = compare(c, 'float32', 'ref:0', 23);
    for (const [p, q] of [[a.y, b.y] as const, [a.dx, b.dx] as const]) {
      const worst = Math.max(...Array.from(p.a, (v, i) => Math.abs(v - q.a[i]) / (1 + Math.abs(q.a[i]))));
      expect(worst).toBeLessThan(1e-5);
    }
  });
});

describe('groupedLinear autograd', () => {
  it('passes gradcheck in float64', () => {
    const gen = new T.Generator(41);
    const leaf = (shape: number[]) =>
      T.randn(shape, { dtype: 'float64', generator: gen }).requiresGrad_(true);
    const x = leaf([7, 4]);
    const ws = [leaf([3, 4]), leaf([3, 4]), leaf([3, 4])];
    const sizes = [2, 0, 5];
    expect(T.gradcheck((xx, a, b, c) => T.groupedLinear(xx, [a, b, c], sizes), [x, ...ws])).toBe(true);
    for (const t of [x, ...ws]) t.dispose();
  });

  it('computes only the gradients that are asked for', () => {
    const { x, ws, g } = inputs({ sizes: [2, 3], K: 4, F: 3 }, 'float32', 'cpu', 7);
    ws[1].requiresGrad_(true);
    T.groupedLinear(x, ws, [2, 3]).backward(g);
    expect(x.grad).toBeNull();
    expect(ws[0].grad).toBeNull();
    expect(ws[1].grad?.shape).toEqual([3, 4]);
    x.requiresGrad_(true);
    ws[1].requiresGrad_(false);
    ws[1].grad?.dispose();
    ws[1].grad = null;
    T.groupedLinear(x, ws, [2, 3]).backward(g);
    expect(x.grad?.shape).toEqual([5, 4]);
    expect(ws[1].grad).toBeNull();
    for (const t of [x, g, ...ws, x.grad as Tensor]) t.dispose();
  });

  it('records no node without grad, and one node with', () => {
    const { x, ws, g } = inputs({ sizes: [2, 3], K: 4, F: 3 }, 'float32', 'cpu', 9);
    const y0 = T.groupedLinear(x, ws, [2, 3]);
    expect(y0.gradFn).toBeNull();
    for (const w of ws) w.requiresGrad_(true);
    const y1 = T.groupedLinear(x, ws, [2, 3]);
    expect(y1.gradFn?.name).toBe('GroupedLinearBackward');
    expect(y1.gradFn?.next.map((e) => (e ? 'edge' : null))).toEqual([null, 'edge', 'edge']);
    for (const t of [x, g, y0, y1, ...ws]) t.dispose();
  });
});

describe('groupedLinear errors', () => {
  const x = T.zeros([5, 4]);
  const w = (shape = [3, 4], dtype: DType = 'float32') => T.zeros(shape, { dtype });
  const cases: [string, () => unknown, string, RegExp][] = [
    [
      'sizes that do not sum to N',
      () => T.groupedLinear(x, [w(), w()], [2, 2]),
      'SHAPE_MISMATCH',
      /sum to 4 .* 5 rows/,
    ],
    [
      'a negative size',
      () => T.groupedLinear(x, [w(), w()], [6, -1]),
      'INVALID_ARGUMENT',
      /group size 1 is -1/,
    ],
    [
      'a fractional size',
      () => T.groupedLinear(x, [w(), w()], [2.5, 2.5]),
      'INVALID_ARGUMENT',
      /non-negative integers/,
    ],
    [
      'a size per weight',
      () => T.groupedLinear(x, [w(), w()], [5]),
      'INVALID_ARGUMENT',
      /1 group sizes for 2 weights/,
    ],
    ['no groups', () => T.groupedLinear(x, [], []), 'INVALID_ARGUMENT', /at least one group/],
    ['a K mismatch', () => T.groupedLinear(x, [w([3, 5])], [5]), 'SHAPE_MISMATCH', /4 features.*expect 5/],
    [
      'weights of different shapes',
      () => T.groupedLinear(x, [w(), w([2, 4])], [2, 3]),
      'SHAPE_MISMATCH',
      /weight 1 is \[2,4\]/,
    ],
    ['a 3-D weight', () => T.groupedLinear(x, [w([1, 3, 4])], [5]), 'SHAPE_MISMATCH', /\[out, in\]/],
    [
      'a 3-D input',
      () => T.groupedLinear(T.zeros([1, 5, 4]), [w()], [5]),
      'SHAPE_MISMATCH',
      /x must be \[N, K\]/,
    ],
    [
      'a dtype mismatch',
      () => T.groupedLinear(x, [w(), w([3, 4], 'float64')], [2, 3]),
      'DTYPE_MISMATCH',
      /weight 1 is float64/,
    ],
    [
      'an integer input',
      () => T.groupedLinear(T.zeros([5, 4], { dtype: 'int64' }), [w([3, 4], 'int64')], [5]),
      'DTYPE_MISMATCH',
      /floating-point/,
    ],
    [
      'a device mismatch',
      () => T.groupedLinear(x, [T.zeros([3, 4], { device: 'ref:0' })], [5]),
      'DEVICE_MISMATCH',
      /different devices/,
    ],
    [
      'size tensors that do not sum to N',
      () => T.groupedLinear(x, [w(), w()], T.tensor([2, 2], { dtype: 'int64' })),
      'SHAPE_MISMATCH',
      /sum to 4 .* 5 rows/,
    ],
    [
      'a size tensor of another length',
      () => T.groupedLinear(x, [w(), w()], T.tensor([5], { dtype: 'int64' })),
      'SHAPE_MISMATCH',
      /groupSizes must be \[2\] \(one size per weight\), got \[1\]/,
    ],
    [
      'a float size tensor',
      () => T.groupedLinear(x, [w()], T.tensor([5], { dtype: 'float32' })),
      'DTYPE_MISMATCH',
      /groupSizes must be an int64 or int32 tensor/,
    ],
    [
      'a size tensor on another device',
      () => T.groupedLinear(x, [w()], T.tensor([5], { dtype: 'int64', device: 'ref:0' })),
      'DEVICE_MISMATCH',
      /different devices/,
    ],
  ];
  for (const [name, fn, code, msg] of cases) {
    it(`rejects ${name}`, () => {
      let err: unknown;
      try {
        T.tidy(fn);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(T.TensorError);
      expect((err as T.TensorError).code).toBe(code);
      expect((err as Error).message).toMatch(/^groupedLinear: /);
      expect((err as Error).message).toMatch(msg);
      expect((err as Error).message).not.toContain('\n');
    });
  }
});

describe('groupedLinear memory', () => {
  for (const device of ['cpu', 'ref:0']) {
    it(`leaves only the gradients behind on ${device} (non-contiguous operands too)`, () => {
      const gen = new T.Generator(1);
      const mk = (shape: number[]) => T.randn(shape, { generator: gen, device });
      const x = mk([4, 9]).t().requiresGrad_(true); // [9, 4], no unit row stride
      const ws = [mk([4, 3]).t(), mk([3, 4]), mk([3, 4])].map((w) => w.requiresGrad_(true));
      const g = mk([3, 9]).t();
      const before = T.memoryStats(device);
      T.tidy(() => {
        T.groupedLinear(x, ws, [4, 0, 5]).backward(g);
        // a forward whose graph never runs backward frees its saved tensors with its output
        T.groupedLinear(x, ws, [4, 0, 5]);
      });
      const grads = [x, ...ws].map((t) => t.grad as Tensor);
      const bytes = grads.reduce((a, t) => a + t.numel * 4, 0);
      const mid = T.memoryStats(device);
      expect(mid.liveStorages - before.liveStorages).toBe(grads.length);
      expect(mid.liveBytes - before.liveBytes).toBe(bytes);
      for (const t of [x, g, ...ws]) t.dispose();
      for (const t of grads) expect(t.disposed).toBe(true);
    });
  }
});
