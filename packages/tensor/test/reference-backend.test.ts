// The pure-TypeScript reference backend (src/backend/reference.ts) against the native CPU
// backend: the same inputs on "cpu" and "ref:0", the same public ops, the same results (bit for
// bit where the CPU kernel is exact, to float rounding elsewhere). Also its device semantics:
// separate memory per device, device mismatches, memory statistics, freed memory.
import { describe, expect, it } from 'vitest';
import {
  createReferenceBackendType,
  f16ToF32,
  f32ToBf16,
  f32ToF16,
  philox4x32,
  registerReferenceBackend,
} from '../src/backend/reference.js';
import type { DType, Tensor } from '../src/index.js';
import * as T from '../src/index.js';

registerReferenceBackend();
const REF = 'ref:0';

// ---- helpers ---------------------------------------------------------------------------------

type Tol = 'exact' | { rtol: number; atol: number };
const EXACT: Tol = 'exact';
const F32: Tol = { rtol: 1e-6, atol: 1e-6 };
const F64: Tol = { rtol: 1e-12, atol: 1e-12 };
// one ulp of the 16-bit formats, for results that the two backends round from slightly
// different float32 values
const F16: Tol = { rtol: 2e-3, atol: 1e-4 };
const BF16: Tol = { rtol: 1.6e-2, atol: 1e-3 };
const TOL: Record<string, Tol> = { float32: F32, float64: F64, float16: F16, bfloat16: BF16 };

/** Deterministic uniform numbers in [lo, hi) (mulberry32). */
function numbers(n: number, seed: number, lo = -2, hi = 2): number[] {
  let s = seed >>> 0;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out.push(lo + (hi - lo) * (((t ^ (t >>> 14)) >>> 0) / 4294967296));
  }
  return out;
}

/** A CPU tensor of random values (floats, or integers in [lo, hi) for integer dtypes). */
function rnd(shape: number[], seed: number, dtype: DType = 'float32', lo = -2, hi = 2): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  let v = numbers(n, seed, lo, hi);
  if (!T.isFloating(dtype)) v = v.map(Math.floor);
  return T.tensor(Float64Array.from(v), { shape, dtype });
}

/** Integer-valued floats in a small range: many ties for max/argmax/topk. */
const ties = (shape: number[], seed: number, dtype: DType = 'float32'): Tensor => {
  const i = rnd(shape, seed, 'int32', -3, 4);
  const f = i.to(dtype);
  i.dispose();
  return f;
};

function numeric(t: Tensor): number[] {
  return Array.from(t.toTypedArray() as ArrayLike<number | bigint>, Number);
}

type Out = Tensor | readonly Tensor[] | { values: Tensor; indices: Tensor };
const list = (o: Out): Tensor[] =>
  o instanceof T.Tensor
    ? [o]
    : Array.isArray(o)
      ? [...o]
      : [(o as { values: Tensor }).values, (o as { indices: Tensor }).indices];

/** Asserts that a result of ref:N matches the CPU's: shape, dtype, and values under `tol`. */
function expectMatch(cpu: Tensor, ref: Tensor, tol: Tol, what = ''): void {
  expect(ref.device.startsWith('ref:'), `${what}: result on ${ref.device}`).toBe(true);
  expect(ref.shape, what).toEqual(cpu.shape);
  expect(ref.dtype, what).toBe(cpu.dtype);
  const bad: string[] = [];
  if (tol === 'exact') {
    const a = cpu.toBytes();
    const b = ref.toBytes();
    const size = a.length / Math.max(cpu.numel, 1);
    const va = numeric(cpu);
    const vb = numeric(ref);
    for (let i = 0; i < a.length && bad.length < 5; i++) {
      if (a[i] !== b[i]) {
        const e = Math.floor(i / size);
        bad.push(`element ${e}: cpu ${va[e]} ref ${vb[e]}`);
        i = (e + 1) * size - 1;
      }
    }
  } else {
    const a = numeric(cpu);
    const b = numeric(ref);
    for (let i = 0; i < a.length && bad.length < 5; i++) {
      const x = a[i];
      const y = b[i];
      const ok =
        (Number.isNaN(x) && Number.isNaN(y)) ||
        x === y ||
        (Number.isFinite(x) && Math.abs(x - y) <= tol.atol + tol.rtol * Math.abs(x));
      if (!ok) bad.push(`element ${i}: cpu ${x} ref ${y}`);
    }
  }
  expect(bad, what).toEqual([]);
}

/**
 * Runs `op` on CPU inputs and on copies of them on `device`, and compares every output. Views
 * (transposes, narrows) taken inside `op` are taken on both devices alike.
 */
function compare(
  inputs: Tensor[],
  op: (...xs: Tensor[]) => Out,
  tol: Tol = EXACT,
  what = '',
  device = REF,
): void {
  T.tidy(() => {
    const moved = inputs.map((t) => t.to(device));
    const a = list(op(...inputs));
    const b = list(op(...moved));
    expect(b.length).toBe(a.length);
    for (let i = 0; i < a.length; i++) expectMatch(a[i], b[i], tol, `${what} output ${i}`);
  });
  for (const t of inputs) t.dispose();
}

/** The error an op throws, to compare CPU and ref messages. */
function errorOf(f: () => unknown): TError {
  try {
    f();
  } catch (e) {
    return e as TError;
  }
  throw new Error('expected an error');
}
type TError = Error & { code?: string };

const FLOATS: DType[] = ['float32', 'float64', 'bfloat16', 'float16'];

// ---- devices and memory ----------------------------------------------------------------------

describe('reference backend: devices and memory', () => {
  it('registers ref:0 and ref:1 as separate devices', () => {
    expect(T.deviceCount('ref')).toBe(2);
    expect(T.normalizeDevice('ref')).toBe('ref:0');
    expect(T.getBackend('ref')).toBe(T.getBackend('ref:0'));
    expect(T.getBackend('ref:1')).not.toBe(T.getBackend('ref:0'));
    expect(T.getBackend('ref:1').device).toBe('ref:1');
    expect(T.listBackends()).toContain('ref');
    const e = errorOf(() => T.getBackend('ref:2'));
    expect(e).toBeInstanceOf(T.TensorError);
    expect(e.code).toBe('INVALID_DEVICE');
  });

  it('createReferenceBackendType takes a type name and a device count', () => {
    const type = createReferenceBackendType({ type: 'refx', deviceCount: 3 });
    expect(type.type).toBe('refx');
    expect(type.deviceCount()).toBe(3);
    expect(type.create(2).device).toBe('refx:2');
    expect(() => type.create(3)).toThrow(/no device 3/);
    expect(createReferenceBackendType().type).toBe('ref');
    expect(createReferenceBackendType().deviceCount()).toBe(2);
  });

  it('an op mixing ref:0 and ref:1 (or cpu) throws DEVICE_MISMATCH', () => {
    T.tidy(() => {
      const a = T.ones([3], { device: 'ref:0' });
      const b = T.ones([3], { device: 'ref:1' });
      const c = T.ones([3]);
      for (const f of [
        () => T.add(a, b),
        () => T.mul(b, a),
        () => T.matmul(T.ones([2, 3], { device: 'ref:1' }), T.ones([3, 2], { device: 'ref:0' })),
        () => T.add(a, c),
        () => T.where(T.gt(a, 0), a, b),
      ]) {
        const e = errorOf(f);
        expect(e).toBeInstanceOf(T.TensorError);
        expect(e.code).toBe('DEVICE_MISMATCH');
      }
      // the same op on one device works on either
      expect(numeric(T.add(b, b))).toEqual([2, 2, 2]);
    });
  });

  it('memoryStats counts only the bytes of its own device', () => {
    const s0 = T.memoryStats('ref:0').liveBytes;
    const s1 = T.memoryStats('ref:1').liveBytes;
    const a = T.zeros([10], { device: 'ref:1' });
    const b = T.zeros([100], { device: 'ref:0', dtype: 'float64' });
    expect(T.memoryStats('ref:1').liveBytes - s1).toBe(40);
    expect(T.memoryStats('ref:0').liveBytes - s0).toBe(800);
    a.dispose();
    expect(T.memoryStats('ref:1').liveBytes).toBe(s1);
    expect(T.memoryStats('ref:0').liveBytes - s0).toBe(800);
    b.dispose();
    expect(T.memoryStats('ref:0').liveBytes).toBe(s0);
    expect(T.memoryStats('ref:1').cachedBytes).toBe(0);
  });

  it('alloc gives fresh addresses, 0xCD garbage unless zeroed, and rejects double frees', () => {
    const be = T.getBackend('ref:0');
    const a = be.alloc(10, false);
    const b = be.alloc(0, false);
    const c = be.alloc(10, true);
    expect(new Set([a, b, c]).size).toBe(3);
    for (const x of [a, b, c]) expect(x).not.toBe(0);
    // addresses of ref:1 are never those of ref:0
    const d = T.getBackend('ref:1').alloc(10, false);
    expect([a, b, c]).not.toContain(d);
    for (const x of [a, b, c]) be.free(x);
    T.getBackend('ref:1').free(d);
    expect(() => be.free(a)).toThrow(/not a live allocation/);
    expect(() => be.free(d)).toThrow(/not a live allocation/);
    // a freed address is not handed out again
    const e = be.alloc(10, false);
    expect([a, b, c]).not.toContain(e);
    be.free(e);
    T.tidy(() => {
      expect([...(T.empty([5], { device: REF, dtype: 'uint8' }).toTypedArray() as Uint8Array)]).toEqual(
        Array(5).fill(0xcd),
      );
      expect([...T.empty([2], { device: REF, dtype: 'int32' }).toBytes()]).toEqual(Array(8).fill(0xcd));
      expect(numeric(T.zeros([4], { device: REF, dtype: 'int64' }))).toEqual([0, 0, 0, 0]);
    });
  });

  it('freed memory cannot be read', () => {
    const t = T.tensor([1, 2, 3], { device: REF });
    const be = t.backend;
    t.dispose();
    expect(() => be.read(t, new BigInt64Array(3))).toThrow(/not a live allocation/);
    const e = errorOf(() => t.toTypedArray());
    expect(e.code).toBe('DISPOSED');
    // nor can memory of another device be read through this one
    const u = T.tensor([1.5, 2, 3], { device: 'ref:1' });
    expect(() => be.read(u, new Float32Array(3))).toThrow(/not a live allocation/);
    expect(() => u.backend.read(u, new Float32Array(2))).toThrow(/destination too small/);
    u.dispose();
  });

  it('transfers between cpu, ref:0 and ref:1 keep every byte, for every dtype', () => {
    const vals = [0, -0, 1.5, -2, 3.25, 65504, 1e-7, Number.NaN, Number.POSITIVE_INFINITY, 255];
    T.tidy(() => {
      for (const dtype of T.DTYPES) {
        const src = T.isFloating(dtype)
          ? T.tensor(vals, { dtype })
          : T.tensor([0, 1, 2, 7, 100, 0, 1, 3, 5, 9], { dtype });
        const back = src.to('ref:0').to('ref:1').to('cpu');
        expect([...back.toBytes()], dtype).toEqual([...src.toBytes()]);
        const v = src.to('ref:1');
        expect(v.device).toBe('ref:1');
        expectMatch(src.to('float32'), v.to('float32'), EXACT, dtype);
      }
      // big int64 values survive a contiguous transfer exactly
      const big = T.tensor(new BigInt64Array([2n ** 62n + 1n, -(2n ** 60n) - 3n]));
      expect([...big.to(REF).toBytes()]).toEqual([...big.toBytes()]);
    });
  });

  it('write and read raw 16-bit float words', () => {
    const words = new Uint16Array([0x3f80, 0xbf81, 0x7fc0, 0x0001, 0x7f80, 0x8000]);
    T.tidy(() => {
      for (const dtype of ['bfloat16', 'float16'] as const) {
        const r = T.fromTypedArray(words, undefined, { device: REF, dtype });
        const c = T.fromTypedArray(words, undefined, { dtype });
        expect(new Uint16Array(r.toBytes().buffer)).toEqual(words);
        expectMatch(c, r, EXACT, dtype);
      }
    });
  });
});

// ---- core kernels ----------------------------------------------------------------------------

describe('reference backend: copy, casts and fill', () => {
  // values every dtype holds (casts to integers of out-of-range values are undefined in C++)
  const SMALL = [0, 1, 2, 3, 7, 100, 127, 0.5, 1.5, 2.5, 3.99, 250.7, 0, 42, 17, 9];
  const SIGNED = [0, -1, -2.5, 2.5, -0.5, 1.7, -100.9, 30000.25, -7, 99, 3, -3, 0, 12, -12, 1];
  const SPECIAL = [
    0,
    -0,
    1,
    -1,
    1 / 3,
    1 + 2 ** -8, // bfloat16 tie, rounds to even (down)
    1 + 3 * 2 ** -8, // bfloat16 tie, rounds up
    1 + 2 ** -11, // float16 tie
    1 + 3 * 2 ** -11,
    65504,
    65519, // float16: rounds down to the largest half
    65520, // float16: overflows to inf
    2 ** -24, // smallest float16 subnormal
    3 * 2 ** -26, // float16 subnormal rounding
    6.1e-5,
    3.4e38,
    -3.4e38,
    1e-40, // float32 subnormal
    Number.NaN,
    Number.POSITIVE_INFINITY,
    Number.NEGATIVE_INFINITY,
    ...numbers(11, 5, -1000, 1000),
  ];

  it('16-bit conversions: known bit patterns', () => {
    expect(f32ToBf16(1)).toBe(0x3f80);
    expect(f32ToBf16(1 + 2 ** -8)).toBe(0x3f80);
    expect(f32ToBf16(1 + 3 * 2 ** -8)).toBe(0x3f82);
    expect(f32ToBf16(Number.NaN)).toBe(0x7fc0);
    expect(f32ToF16(65504)).toBe(0x7bff);
    expect(f32ToF16(65520)).toBe(0x7c00);
    expect(f32ToF16(2 ** -24)).toBe(0x0001);
    expect(f32ToF16(Number.NaN)).toBe(0x7e00);
    expect(f32ToF16(-(2 ** -25))).toBe(0x8000); // a tie rounds to even: -0
    expect(f16ToF32(0x0001)).toBe(2 ** -24);
    expect(f16ToF32(0xfc00)).toBe(Number.NEGATIVE_INFINITY);
  });

  it('casts between every pair of dtypes, contiguous and strided', () => {
    for (const from of T.DTYPES) {
      for (const to of T.DTYPES) {
        const values =
          T.isFloating(from) && T.isFloating(to)
            ? SPECIAL
            : to === 'bool'
              ? [...SIGNED, ...SPECIAL]
              : to === 'uint8' || from === 'uint8' || from === 'bool'
                ? SMALL
                : SIGNED;
        const n = values.length - (values.length % 4);
        // the source is made on the CPU in its dtype (the cast there is not under test)
        const wide = T.tensor(values.slice(0, n), { dtype: 'float64' });
        const src = wide.to(from);
        wide.dispose();
        compare([src], (x) => x.to(to), EXACT, `${from} -> ${to}`);
        const src2 = T.tensor(values.slice(0, n), { dtype: 'float64' });
        const s2 = src2.to(from);
        src2.dispose();
        compare(
          [s2],
          (x) => T.transpose(T.reshape(x, [4, n / 4]), 0, 1).to(to),
          EXACT,
          `${from} -> ${to} (T)`,
        );
      }
    }
  });

  it('strided copies: int64 beyond 2^53 rounds through double as on the CPU', () => {
    const big = T.tensor(new BigInt64Array([2n ** 53n + 1n, 2n, -(2n ** 60n) - 1n, 4n]), { shape: [2, 2] });
    compare([big], (x) => T.transpose(x, 0, 1).contiguous());
    // and bfloat16/float16 NaN payloads become canonical in a strided copy
    const words = new Uint16Array([0x7f81, 0x3f80, 0xffa0, 0x0000]);
    for (const dtype of ['bfloat16', 'float16'] as const) {
      compare([T.fromTypedArray(words, [2, 2], { dtype })], (x) => T.transpose(x, 0, 1).contiguous());
    }
  });

  it('views: transposes, permutes, narrows, expands, cat and stack', () => {
    compare([rnd([3, 4, 5], 1)], (x) => T.permute(x, [2, 0, 1]).contiguous());
    compare([rnd([3, 4, 5], 2)], (x) => T.narrow(T.transpose(x, 0, 2), 1, 1, 2).contiguous());
    compare([rnd([3, 4, 5], 3)], (x) => T.select(x, 1, 2).contiguous());
    compare([rnd([4, 1], 4)], (x) => T.expand(x, [2, 4, 3]).contiguous());
    compare([rnd([2, 3], 5), rnd([2, 4], 6)], (a, b) => T.cat([a, b], 1));
    compare([rnd([2, 3], 7), rnd([2, 3], 8, 'bfloat16')], (a, b) => T.stack([a, b], 0));
    compare([rnd([6, 5], 9, 'float64')], (x) => T.transpose(x, 0, 1).to('bfloat16'));
  });

  it('fill: every dtype, and strided views', () => {
    for (const dtype of T.DTYPES) {
      for (const v of [0, 1, 2.5, -3, 0.1, 100]) {
        if ((dtype === 'uint8' || dtype === 'bool') && v < 0) continue;
        T.tidy(() =>
          expectMatch(T.full([7], v, { dtype }), T.full([7], v, { dtype, device: REF }), EXACT, dtype),
        );
      }
    }
    // fill of a transposed column writes only that column
    compare([rnd([3, 4], 10)], (x) => {
      const y = x.clone();
      const col = T.select(T.transpose(y, 0, 1), 0, 2);
      y.backend.fill(col, 9.5);
      return y;
    });
    compare([T.ones([2, 3], { dtype: 'bfloat16' })], (x) => {
      const y = x.clone();
      y.backend.fill(T.narrow(y, 1, 1, 1), 1 / 3);
      return y;
    });
  });
});

describe('reference backend: elementwise', () => {
  // exact: bit for bit on every float dtype ('all'), only where the CPU computes in float32
  // ('float': its own exp for sigmoid/silu), or to float rounding (libm on both sides)
  const UNARY: [string, (x: Tensor) => Tensor, number, number, 'all' | 'float' | 'none'][] = [
    ['neg', T.neg, -3, 3, 'all'],
    ['exp', T.exp, -3, 3, 'none'],
    ['log', T.log, 0.01, 5, 'none'],
    ['sqrt', T.sqrt, 0, 5, 'all'],
    ['rsqrt', T.rsqrt, 0.01, 5, 'all'],
    ['abs', T.abs, -3, 3, 'all'],
    ['tanh', T.tanh, -3, 3, 'none'],
    ['sigmoid', T.sigmoid, -10, 10, 'float'],
    ['silu', T.silu, -10, 10, 'float'],
    ['gelu', (x) => T.gelu(x), -5, 5, 'none'],
    ['geluTanh', (x) => T.gelu(x, 'tanh'), -5, 5, 'none'],
    ['relu', T.relu, -3, 3, 'all'],
    ['sin', T.sin, -6, 6, 'none'],
    ['cos', T.cos, -6, 6, 'none'],
    ['square', T.square, -3, 3, 'all'],
    ['reciprocal', T.reciprocal, 0.1, 4, 'all'],
    ['log1p', T.log1p, -0.9, 5, 'none'],
    ['expm1', T.expm1, -3, 3, 'none'],
    ['floor', T.floor, -3, 3, 'all'],
    ['ceil', T.ceil, -3, 3, 'all'],
    ['round', T.round, -3, 3, 'all'],
    ['sign', T.sign, -3, 3, 'all'],
  ];

  it.each(UNARY)('unary %s on every float dtype, contiguous and transposed', (name, f, lo, hi, exact) => {
    for (const dtype of FLOATS) {
      const tol = exact === 'all' || (exact === 'float' && dtype !== 'float64') ? EXACT : TOL[dtype];
      compare([rnd([8, 13], 11, dtype, lo, hi)], f, tol, `${name} ${dtype}`);
      compare([rnd([8, 13], 12, dtype, lo, hi)], (x) => f(T.transpose(x, 0, 1)), tol, `${name} ${dtype} T`);
    }
  });

  it('unary edge values: rounding ties, NaN, infinities, signed zeros', () => {
    const edge = [
      0.5,
      1.5,
      2.5,
      -0.5,
      -2.5,
      -0,
      0,
      Number.NaN,
      Number.POSITIVE_INFINITY,
      -Number.MAX_VALUE,
      88,
      -88,
      -100,
      1e-30,
    ];
    for (const dtype of ['float32', 'float64'] as const) {
      for (const f of [
        T.round,
        T.floor,
        T.ceil,
        T.sign,
        T.relu,
        T.abs,
        T.neg,
        T.isnan,
        T.isinf,
        T.logicalNot,
      ]) {
        compare([T.tensor(edge, { dtype })], f, EXACT, `${f.name} ${dtype}`);
      }
      for (const f of [T.sigmoid, T.silu, T.exp, T.tanh]) compare([T.tensor(edge, { dtype })], f, TOL[dtype]);
    }
  });

  it('clamp with one or both bounds, on floats and integers', () => {
    for (const dtype of ['float32', 'bfloat16', 'int32', 'int64'] as const) {
      compare([rnd([20], 13, dtype, -5, 5)], (x) => T.clamp(x, -1, 2), EXACT, dtype);
      compare([rnd([20], 14, dtype, -5, 5)], (x) => T.clamp(x, null, 0.5), EXACT, dtype);
      compare([rnd([20], 15, dtype, -5, 5)], (x) => T.clamp(x, -0.25), EXACT, dtype);
    }
    compare([T.tensor([Number.NaN, 1, 5])], (x) => T.clamp(x, 0, 2));
  });

  it('integer unary ops', () => {
    for (const dtype of ['int32', 'int64', 'uint8'] as const) {
      const lo = dtype === 'uint8' ? 0 : -50;
      for (const f of [T.abs, T.square, T.sign, T.relu])
        compare([rnd([17], 16, dtype, lo, 50)], f, EXACT, dtype);
    }
    compare([rnd([17], 17, 'int64', -50, 50)], T.neg);
    compare([rnd([9], 18, 'int32', 1, 50)], T.sqrt, F32); // computes in float32
  });

  it('binary ops with broadcasting and transposed operands', () => {
    const ops: [string, (a: Tensor, b: Tensor) => Tensor][] = [
      ['add', (a, b) => T.add(a, b)],
      ['sub', (a, b) => T.sub(a, b)],
      ['mul', (a, b) => T.mul(a, b)],
      ['div', (a, b) => T.div(a, b)],
      ['maximum', T.maximum],
      ['minimum', T.minimum],
      ['eq', T.eq],
      ['ne', T.ne],
      ['lt', T.lt],
      ['le', T.le],
      ['gt', T.gt],
      ['ge', T.ge],
    ];
    for (const dtype of FLOATS) {
      for (const [name, f] of ops) {
        compare([ties([3, 1, 4], 20, dtype), ties([5, 4], 21, dtype)], f, EXACT, `${name} ${dtype}`);
        compare(
          [rnd([4, 5], 22, dtype), rnd([5, 4], 23, dtype)],
          (a, b) => f(T.transpose(a, 0, 1), b),
          EXACT,
          `${name} ${dtype} T`,
        );
      }
      compare(
        [rnd([6, 7], 24, dtype, 0.1, 3), rnd([7], 25, dtype, -2, 2)],
        (a, b) => T.pow(a, b),
        TOL[dtype],
        `pow ${dtype}`,
      );
      compare(
        [rnd([6, 7], 26, dtype), rnd([6, 1], 27, dtype)],
        (a, b) => T.add(a, b, 0.3),
        EXACT,
        `add alpha ${dtype}`,
      );
      compare(
        [rnd([6, 7], 28, dtype), rnd([7], 29, dtype)],
        (a, b) => T.sub(a, b, -2.5),
        EXACT,
        `sub alpha ${dtype}`,
      );
    }
  });

  it('binary ops: NaN propagation, integers, bools, mixed dtypes', () => {
    const nan = [Number.NaN, 1, -2, Number.NaN, 0, -0];
    const other = [3, Number.NaN, -2, Number.NaN, -0, 0];
    for (const f of [T.maximum, T.minimum, T.eq, T.ne, T.lt, T.ge, T.add, T.mul]) {
      compare([T.tensor(nan), T.tensor(other)], (a, b) => f(a, b));
    }
    for (const dtype of ['int32', 'int64', 'uint8'] as const) {
      const lo = dtype === 'uint8' ? 0 : -20;
      for (const f of [T.add, T.sub, T.mul, T.maximum, T.lt, T.eq]) {
        compare(
          [rnd([4, 6], 30, dtype, lo, 20), rnd([6], 31, dtype, lo, 20)],
          (a, b) => f(a, b),
          EXACT,
          dtype,
        );
      }
      compare(
        [rnd([4, 6], 32, dtype, 1, 20), rnd([6], 33, dtype, 1, 20)],
        (a, b) => T.div(a, b),
        F32,
        `div ${dtype}`,
      );
    }
    compare([rnd([10], 34, 'int64', -1000, 1000)], (a) => T.add(a, a, 3));
    const b1 = T.tensor([true, false, true, false]);
    const b2 = T.tensor([true, true, false, false]);
    compare([b1, b2], (a, b) => [T.logicalAnd(a, b), T.logicalOr(a, b), T.add(a, b), T.logicalNot(a)]);
    compare([rnd([5], 35, 'bfloat16'), rnd([5], 36, 'float16')], (a, b) => T.add(a, b));
    compare([rnd([5], 37, 'int32'), rnd([5], 38, 'float32')], (a, b) => T.mul(a, b));
  });

  it('tensor-scalar ops, both orders', () => {
    for (const dtype of [...FLOATS, 'int32', 'int64'] as DType[]) {
      const tol = T.isFloating(dtype) ? EXACT : F32;
      compare([rnd([3, 5], 40, dtype, 1, 5)], (x) => T.add(x, 2.5), tol, dtype);
      compare([rnd([3, 5], 41, dtype, 1, 5)], (x) => T.sub(2, x), EXACT, dtype);
      compare([rnd([3, 5], 42, dtype, 1, 5)], (x) => T.mul(T.transpose(x, 0, 1), -3), EXACT, dtype);
      compare([rnd([3, 5], 43, dtype, 1, 5)], (x) => T.div(1, x), tol, dtype);
      compare([rnd([3, 5], 44, dtype, 1, 5)], (x) => T.div(x, 7), tol, dtype);
      compare([rnd([3, 5], 45, dtype, 1, 5)], (x) => T.pow(x, 2), TOL[dtype] ?? EXACT, dtype);
      compare([rnd([3, 5], 46, dtype, 1, 5)], (x) => [T.gt(x, 2), T.eq(x, 3), T.le(x, 2.5)], EXACT, dtype);
    }
  });

  it('activation gradients (the *Backward binary ops) through autograd', () => {
    const acts: [string, (x: Tensor) => Tensor][] = [
      ['silu', T.silu],
      ['gelu', (x) => T.gelu(x)],
      ['geluTanh', (x) => T.gelu(x, 'tanh')],
      ['sigmoid', T.sigmoid],
      ['tanh', T.tanh],
      ['relu', T.relu],
      ['sqrt', (x) => T.sqrt(T.abs(x))],
      ['pow', (x) => T.pow(x, 3)],
    ];
    for (const dtype of ['float32', 'float64', 'bfloat16'] as const) {
      for (const [name, act] of acts) {
        compare(
          [rnd([4, 6], 50, dtype, -4, 4), rnd([4, 6], 51, dtype)],
          (x0, g) => {
            const x = x0.detach().requiresGrad_();
            act(x).backward(g);
            return x.grad!;
          },
          TOL[dtype],
          `${name} grad ${dtype}`,
        );
      }
    }
  });

  it('the activation-gradient ops on the backend directly: fused multiply-adds as on the CPU', () => {
    const ops = ['siluBackward', 'tanhBackward', 'sigmoidBackward', 'reluBackward'] as const;
    for (const dtype of ['float32', 'bfloat16', 'float16'] as const) {
      for (const op of ops) {
        // a: the saved input (silu, relu) or output (tanh, sigmoid); b: the incoming gradient
        const lo = op === 'tanhBackward' || op === 'sigmoidBackward' ? -1 : -8;
        compare(
          [rnd([64, 33], 54, dtype, lo, -lo), rnd([64, 33], 55, dtype)],
          (a, b) => {
            const out = T.empty(a.shape, { device: a.device, dtype });
            a.backend.binary(out, a, b, op);
            return out;
          },
          EXACT,
          `${op} ${dtype}`,
        );
      }
    }
  });

  it('atan2 on the backend directly', () => {
    compare(
      [rnd([12], 52, 'float32', -3, 3), rnd([12], 53, 'float32', -3, 3)],
      (a, b) => {
        const out = T.empty([12], { device: a.device });
        a.backend.binary(out, a, b, 'atan2');
        return out;
      },
      F32,
    );
  });

  it('where and maskedFill with broadcasting and scalars', () => {
    for (const dtype of ['float32', 'bfloat16', 'int64', 'bool'] as const) {
      compare(
        [T.gt(rnd([3, 1, 4], 60), 0), rnd([5, 4], 61, dtype, 0, 3), rnd([3, 5, 1], 62, dtype, 0, 3)],
        (c, x, y) => T.where(c, x, T.transpose(T.transpose(y, 0, 1), 0, 1)),
        EXACT,
        dtype,
      );
    }
    compare([T.gt(rnd([4, 5], 63), 0), rnd([4, 5], 64)], (c, x) => [T.where(c, x, 0), T.where(c, -1.5, x)]);
    compare([T.gt(rnd([5], 65), 0), rnd([4, 5], 66, 'bfloat16')], (m, x) => T.maskedFill(x, m, -Infinity));
  });
});

describe('reference backend: reductions and cumsum', () => {
  const dimsList: (number | number[] | undefined)[] = [undefined, 0, 1, 2, -1, [0, 2], [1, 2]];

  it('sum, mean, amax, amin over dims, with keepdim (exact: double accumulators)', () => {
    for (const dtype of FLOATS) {
      for (const dims of dimsList) {
        for (const keepdim of [false, true]) {
          const what = `${dtype} dims ${String(dims)} keepdim ${keepdim}`;
          compare(
            [rnd([4, 5, 6], 70, dtype)],
            (x) => [T.sum(x, dims, keepdim), T.mean(x, dims, keepdim)],
            EXACT,
            what,
          );
          compare(
            [ties([4, 5, 6], 71, dtype)],
            (x) => [T.amax(x, dims, keepdim), T.amin(x, dims, keepdim)],
            EXACT,
            what,
          );
        }
      }
    }
    for (const dtype of ['int32', 'int64', 'uint8', 'bool'] as const) {
      compare(
        [rnd([4, 5, 6], 72, dtype, 0, 7)],
        (x) => [T.sum(x), T.sum(x, 1), T.amax(x, 2), T.mean(x, 0)],
        EXACT,
        dtype,
      );
    }
    compare([rnd([3, 4], 73)], (x) => T.sum(T.transpose(x, 0, 1), 1));
  });

  it('max/min with indices and argmax/argmin: first index wins ties, NaN wins', () => {
    for (const dtype of ['float32', 'bfloat16', 'int64'] as const) {
      for (const d of [0, 1, 2]) {
        compare([ties([4, 5, 6], 74 + d, dtype)], (x) => T.max(x, d), EXACT, `max ${dtype} ${d}`);
        compare([ties([4, 5, 6], 77 + d, dtype)], (x) => T.min(x, d, true), EXACT, `min ${dtype} ${d}`);
        compare(
          [ties([4, 5, 6], 80 + d, dtype)],
          (x) => [T.argmax(x, d), T.argmin(x, d)],
          EXACT,
          `arg ${dtype} ${d}`,
        );
      }
      compare([ties([4, 5, 6], 83, dtype)], (x) => [T.argmax(x), T.argmin(x, undefined, true)], EXACT, dtype);
    }
    const withNaN = T.tensor([
      [1, Number.NaN, 3, Number.NaN],
      [Number.NaN, 0, 0, 1],
      [2, 2, -1, -1],
    ]);
    compare([withNaN], (x) => [T.max(x, 1).values, T.max(x, 1).indices, T.argmin(x, 1), T.amax(x, 0)]);
  });

  it('var, norm and logsumexp', () => {
    for (const dtype of FLOATS) {
      const tol = TOL[dtype];
      for (const dims of dimsList) {
        const what = `${dtype} dims ${String(dims)}`;
        compare(
          [rnd([4, 5, 6], 85, dtype)],
          (x) => [T.variance(x, dims), T.variance(x, dims, { correction: 0, keepdim: true })],
          tol,
          what,
        );
        compare(
          [rnd([4, 5, 6], 86, dtype)],
          (x) => [T.norm(x, 1, dims), T.norm(x, 2, dims), T.norm(x, 3, dims), T.norm(x, Infinity, dims)],
          tol,
          what,
        );
        if (dims !== undefined)
          compare([rnd([4, 5, 6], 87, dtype, -5, 5)], (x) => T.logsumexp(x, dims, true), tol, what);
      }
    }
    // var of one element is NaN; logsumexp of -inf rows; the inf-norm skips NaN like std::fmax
    compare([T.tensor([[1], [2]], { dtype: 'float32' })], (x) => T.variance(x, 1));
    const inf = Number.POSITIVE_INFINITY;
    compare(
      [
        T.tensor([
          [-inf, -inf],
          [inf, 1],
          [Number.NaN, 1],
          [0, 1],
        ]),
      ],
      (x) => T.logsumexp(x, 1),
      F32,
    );
    compare([T.tensor([Number.NaN, 1, -2])], (x) => [T.norm(x, Infinity), T.norm(x, 2)]);
  });

  it('prod on the backend directly', () => {
    compare(
      [rnd([3, 4, 5], 88, 'float32', 0.5, 1.5)],
      (x) => {
        const out = T.empty([3, 5], { device: x.device });
        x.backend.reduce(x, out, null, 3, 4, 5, 'prod', 0);
        return out;
      },
      F32,
    );
  });

  it('cumsum along every dim (exact: double accumulators)', () => {
    for (const dtype of [...FLOATS, 'int32', 'int64', 'bool'] as DType[]) {
      for (const d of [0, 1, 2, -1])
        compare([rnd([3, 4, 5], 89, dtype, 0, 3)], (x) => T.cumsum(x, d), EXACT, `${dtype} ${d}`);
    }
    compare([rnd([4, 5], 90)], (x) => T.cumsum(T.transpose(x, 0, 1), 1));
  });
});

describe('reference backend: matmul', () => {
  /** float32 GEMM: OpenBLAS accumulates in float32, the reference in double. */
  const gemmTol = (K: number): Tol => ({ rtol: 1e-5, atol: 2e-6 * K });

  it('2-D, transposed, batched, broadcast and vector products in float32 and float64', () => {
    const cases: [number[], number[], ((a: Tensor, b: Tensor) => Tensor)?][] = [
      [
        [17, 23],
        [23, 19],
      ],
      [[23, 17], [23, 19], (a, b) => T.matmul(T.transpose(a, 0, 1), b)],
      [[17, 23], [19, 23], (a, b) => T.matmul(a, T.transpose(b, 0, 1))],
      [[23, 17], [19, 23], (a, b) => T.matmul(T.transpose(a, 0, 1), T.transpose(b, 0, 1))],
      [
        [3, 5, 7],
        [3, 7, 4],
      ],
      [
        [2, 1, 5, 6],
        [3, 6, 4],
      ],
      [
        [4, 5, 6],
        [6, 3],
      ],
      [[3, 7, 5], [3, 4, 7], (a, b) => T.bmm(T.transpose(a, 1, 2), T.transpose(b, 1, 2))],
      [[7], [7, 3]],
      [[4, 7], [7]],
      [[7], [7]],
    ];
    for (const dtype of ['float32', 'float64'] as const) {
      for (const [sa, sb, f] of cases) {
        const K = sa.length === 1 ? sa[0] : Math.max(...sa);
        compare(
          [rnd(sa, 100, dtype), rnd(sb, 101, dtype)],
          f ?? T.matmul,
          dtype === 'float32' ? gemmTol(K) : F64,
          `${dtype} ${sa} @ ${sb}`,
        );
      }
    }
    compare(
      [rnd([2, 3, 8], 102), rnd([5, 8], 103), rnd([5], 104)],
      (x, w, b) => T.linear(x, w, b),
      gemmTol(8),
    );
  });

  it('bfloat16 and float16 products (rounded once from float32)', () => {
    for (const dtype of ['bfloat16', 'float16'] as const) {
      compare([rnd([9, 33], 105, dtype), rnd([33, 11], 106, dtype)], T.matmul, TOL[dtype], dtype);
      compare(
        [rnd([2, 33, 9], 107, dtype), rnd([2, 11, 33], 108, dtype)],
        (a, b) => T.matmul(T.transpose(a, 1, 2), T.transpose(b, 1, 2)),
        TOL[dtype],
        `${dtype} T`,
      );
    }
  });

  it('alpha, beta and operand strides through backend.gemm', () => {
    for (const dtype of ['float32', 'float64', 'bfloat16'] as const) {
      compare(
        [rnd([2, 6, 4], 110, dtype), rnd([5, 6], 111, dtype), rnd([2, 3, 5], 112, dtype)],
        (a, b, c) => {
          // C[b] = 0.5 * A[b]^T @ B^T + 2 * C[b], with A [2, 6, 4] read transposed and B shared
          const out = c.clone();
          c.backend.gemm(
            2,
            3,
            5,
            6,
            { tensor: a, bs: 24, rs: 1, cs: 4 },
            { tensor: b, bs: 0, rs: 1, cs: 6 },
            { tensor: out, bs: 15, rs: 5, cs: 1 },
            0.5,
            2,
          );
          return out;
        },
        TOL[dtype] === F32 ? gemmTol(6) : TOL[dtype],
      );
    }
    // beta = 0 never reads C (a NaN there would survive a 0 * C)
    compare(
      [rnd([3, 4], 113), rnd([4, 2], 114)],
      (a, b) => {
        const out = T.full([3, 2], Number.NaN, { device: a.device });
        a.backend.gemm(
          1,
          3,
          2,
          4,
          { tensor: a, bs: 0, rs: 4, cs: 1 },
          { tensor: b, bs: 0, rs: 2, cs: 1 },
          { tensor: out, bs: 0, rs: 2, cs: 1 },
          1,
          0,
        );
        return out;
      },
      gemmTol(4),
    );
  });

  it('a 256 x 256 x 256 product takes well under a second', () => {
    const a = T.randn([256, 256], { device: REF, generator: new T.Generator(1) });
    const b = T.randn([256, 256], { device: REF, generator: new T.Generator(2) });
    const t0 = performance.now();
    const c = T.matmul(a, b);
    const ms = performance.now() - t0;
    expect(c.shape).toEqual([256, 256]);
    expect(ms).toBeLessThan(1000);
    for (const t of [a, b, c]) t.dispose();
  });
});

describe('reference backend: random numbers', () => {
  it('Philox 4x32-10 known-answer vectors (Random123)', () => {
    const hex = (w: ArrayLike<number>) => Array.from(w, (x) => (x >>> 0).toString(16).padStart(8, '0'));
    expect(hex(philox4x32(0, 0, 0, 0, 0, 0))).toEqual(['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8']);
    const m = 0xffffffff;
    expect(hex(philox4x32(m, m, m, m, m, m))).toEqual(['408f276d', '41c83b0e', 'a20bc7c6', '6d5451fd']);
    expect(hex(philox4x32(0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0))).toEqual([
      'd16cfe09',
      '94fdcceb',
      '5001e420',
      '24126ea1',
    ]);
  });

  /** The same draws from a fresh generator of `seed` on cpu and on ref:0 (bit for bit by default). */
  function sameStream(
    seed: number | bigint,
    draw: (device: string, g: T.Generator) => Tensor[],
    what: string,
    tol: (i: number) => Tol = () => EXACT,
  ) {
    T.tidy(() => {
      const a = draw('cpu', new T.Generator(seed));
      const b = draw(REF, new T.Generator(seed));
      for (let i = 0; i < a.length; i++) expectMatch(a[i], b[i], tol(i), `${what} draw ${i}`);
    });
  }

  it('rand, uniform, randn, randint and bernoulli streams are bit-identical', () => {
    for (const dtype of FLOATS) {
      sameStream(
        1234,
        (device, generator) => [
          T.rand([1001], { device, dtype, generator }),
          T.rand([3, 7], { device, dtype, generator }),
          T.uniform([50], -2, 3, { device, dtype, generator }),
          T.uniform([999], -0.1, 0.2, { device, dtype, generator }), // a fused multiply-add on the CPU
          T.randn([1003], { device, dtype, generator }),
          T.randn([10], { device, dtype, generator, mean: 1, std: 0.5 }),
        ],
        dtype,
        // float64 normals: V8's Math.log/cos/sin against glibc's, an ulp apart now and then
        (i) => (dtype === 'float64' && i >= 4 ? { rtol: 1e-15, atol: 1e-15 } : EXACT),
      );
    }
    // many float32 normals, exactly
    sameStream(
      99,
      (device, generator) => [T.randn([200_000], { device, generator, mean: 0.3, std: 1.7 })],
      'randn',
    );
    for (const dtype of ['int64', 'int32', 'uint8'] as const) {
      sameStream(
        0xfeedbeefcafen,
        (device, generator) => [
          T.randint(0, 10, [999], { device, dtype, generator }),
          T.randint(-5, 250, [64], { device, dtype: dtype === 'uint8' ? 'int32' : dtype, generator }),
          T.rand([9], { device, dtype, generator }),
        ],
        dtype,
      );
    }
    // a large offset and a seed with the high word set
    sameStream(
      2n ** 63n + 12345n,
      (device, generator) => {
        generator.setState({ seed: generator.initialSeed().toString(), offset: String(2 ** 40 + 3) });
        return [T.randn([33], { device, generator }), T.rand([5], { device, dtype: 'float64', generator })];
      },
      'offset',
    );
    // bernoulli (the kernel under dropout), directly and through dropout
    sameStream(
      7,
      (device, generator) => {
        const out = T.empty([1001], { device });
        out.backend.random(out, 'bernoulli', generator.initialSeed(), generator.advance(1001), 0.3, 0);
        const x = T.ones([257], { device, dtype: 'bfloat16' });
        return [out, T.dropout(x, 0.25, true, generator)];
      },
      'bernoulli',
    );
  });
});

describe('reference backend: index kernels', () => {
  it('provides exactly the seven index kernels', () => {
    const be = T.getBackend(REF);
    for (const name of [
      'indexSelectRows',
      'indexAddRows',
      'gatherAlong',
      'scatterAddAlong',
      'topk',
      'triangle',
      'oneHot',
    ] as const) {
      expect(be.kernel(name), name).toBeTypeOf('function');
    }
    for (const name of [
      'softmax',
      'crossEntropy',
      'normRows',
      'ropeApply',
      'attentionForward',
      'adamwStep',
    ] as const) {
      expect(be.kernel(name), name).toBeUndefined();
    }
  });

  it('indexSelect and embedding (with the padding row in the gradient)', () => {
    for (const dtype of ['float32', 'bfloat16', 'int64', 'bool'] as const) {
      for (const d of [0, 1, 2]) {
        compare(
          [rnd([4, 5, 3], 120, dtype, 0, 3), rnd([7], 121 + d, 'int64', 0, [4, 5, 3][d])],
          (x, i) => T.indexSelect(x, d, i),
          EXACT,
          `${dtype} ${d}`,
        );
      }
    }
    compare([rnd([5, 6], 124), rnd([4], 125, 'int32', 0, 6)], (x, i) =>
      T.indexSelect(T.transpose(x, 0, 1), 0, i),
    );
    compare([rnd([10, 4], 126), rnd([3, 5], 127, 'int64', 0, 10), rnd([3, 5, 4], 128)], (w0, ids, g) => {
      const w = w0.detach().requiresGrad_();
      const y = T.embedding(ids, w, { paddingIdx: 2 });
      y.backward(g);
      return [y, w.grad!];
    });
    compare(
      [rnd([10, 4], 129, 'bfloat16'), rnd([30], 130, 'int32', 0, 10), rnd([30, 4], 131, 'bfloat16')],
      (w0, ids, g) => {
        const w = w0.detach().requiresGrad_();
        T.embedding(ids, w).backward(g);
        return w.grad!;
      },
    );
  });

  it('indexAdd with repeated indices and alpha', () => {
    for (const dtype of ['float32', 'float64', 'bfloat16', 'int32'] as const) {
      for (const d of [0, 1]) {
        const shape = [5, 6];
        const src = [...shape];
        src[d] = 9;
        compare(
          [
            rnd(shape, 132, dtype, -3, 3),
            rnd([9], 133 + d, 'int64', 0, shape[d]),
            rnd(src, 135, dtype, -3, 3),
          ],
          (x, i, s) => [T.indexAdd(x, d, i, s), T.indexAdd(x, d, i, s, dtype === 'int32' ? 2 : 0.3)],
          EXACT,
          `${dtype} ${d}`,
        );
      }
    }
  });

  it('scatterAddAlong with alpha, on the kernel directly', () => {
    for (const dtype of ['float32', 'float64'] as const) {
      compare(
        [rnd([4, 6], 136, dtype), rnd([4, 9], 137, 'int64', 0, 6), rnd([4, 9], 138, dtype)],
        (x, i, s) => {
          const out = x.clone();
          const bad = T.full([2], 7, { dtype: 'float64', device: out.device });
          out.backend.kernel('scatterAddAlong')!(out, s, i, 1, 0.3, bad);
          expect(bad.toArray()).toEqual([-1, 0]); // always written: no index rejected
          return out;
        },
        EXACT,
        dtype,
      );
    }
  });

  it('gather and scatterAdd along every dim, on strided inputs', () => {
    for (const dtype of ['float32', 'float64', 'bfloat16', 'int64'] as const) {
      for (const d of [0, 1, 2]) {
        const xs = [4, 5, 6];
        const is = [3, 4, 5];
        is[d] = 7;
        compare(
          [rnd(xs, 140, dtype, -3, 3), rnd(is, 141 + d, 'int64', 0, xs[d])],
          (x, i) => T.gather(x, d, i),
          EXACT,
          `gather ${dtype} ${d}`,
        );
        compare(
          [rnd(xs, 144, dtype, -3, 3), rnd(is, 145 + d, 'int32', 0, xs[d]), rnd(is, 148, dtype, -3, 3)],
          (x, i, s) => T.scatterAdd(x, d, i, s),
          EXACT,
          `scatterAdd ${dtype} ${d}`,
        );
      }
    }
    compare([rnd([6, 4], 150), rnd([3, 6], 151, 'int64', 0, 6)], (x, i) =>
      T.gather(T.transpose(x, 0, 1), 1, i),
    );
    // the gather gradient is a scatter-add of the output gradient
    compare([rnd([4, 6], 152), rnd([4, 9], 153, 'int64', 0, 6), rnd([4, 9], 154)], (x0, i, g) => {
      const x = x0.detach().requiresGrad_();
      T.gather(x, 1, i).backward(g);
      return x.grad!;
    });
    // src larger than the index
    compare([rnd([4, 6], 155), rnd([2, 3], 156, 'int64', 0, 4), rnd([3, 5], 157)], (x, i, s) =>
      T.scatterAdd(x, 0, i, s),
    );
  });

  it('topk: largest and smallest, ties lowest index first, NaN above every number', () => {
    for (const dtype of ['float32', 'bfloat16', 'int64', 'float64'] as const) {
      for (const d of [0, 1, 2]) {
        for (const largest of [true, false]) {
          compare(
            [ties([5, 6, 7], 160 + d, dtype)],
            (x) => T.topk(x, 3, d, largest),
            EXACT,
            `${dtype} ${d} ${largest}`,
          );
        }
      }
    }
    const nan = Number.NaN;
    for (const largest of [true, false]) {
      compare(
        [
          T.tensor([
            [1, nan, 3, nan, -0, 0, 3],
            [2, 2, 2, 2, 2, 2, 2],
          ]),
        ],
        (x) => T.topk(x, 7, 1, largest),
      );
    }
    compare([rnd([8], 165)], (x) => T.topk(x, 0));
    compare([rnd([5, 4], 166)], (x) => T.topk(T.transpose(x, 0, 1), 2, 1));
  });

  it('triu and tril: diagonals, batches, strided inputs', () => {
    for (const dtype of ['float32', 'bfloat16', 'int64', 'bool'] as const) {
      for (const k of [-2, -1, 0, 1, 3]) {
        compare(
          [rnd([2, 4, 5], 170, dtype, 0, 3)],
          (x) => [T.triu(x, k), T.tril(x, k)],
          EXACT,
          `${dtype} ${k}`,
        );
      }
    }
    compare([rnd([5, 4], 171)], (x) => [T.triu(T.transpose(x, 0, 1)), T.tril(T.transpose(x, 0, 1), -1)]);
  });

  it('oneHot with explicit and inferred class counts', () => {
    compare([rnd([3, 4], 175, 'int64', 0, 6)], (i) => [T.oneHot(i), T.oneHot(i, 9)]);
    compare([rnd([7], 176, 'int32', 0, 3)], (i) => T.oneHot(i, 3));
  });

  it('a bad index raises the same error on both devices', () => {
    const cases: [string, (dev: string) => unknown][] = [
      [
        'indexSelect',
        (dev) => T.indexSelect(T.ones([4, 3], { device: dev }), 0, T.tensor([0, 5, 1, 9], { device: dev })),
      ],
      [
        'indexSelect negative',
        (dev) => T.indexSelect(T.ones([4, 3], { device: dev }), 1, T.tensor([0, -1], { device: dev })),
      ],
      [
        'embedding',
        (dev) =>
          T.embedding(
            T.tensor(
              [
                [1, 2],
                [3, 10],
              ],
              { device: dev, dtype: 'int32' },
            ),
            T.ones([4, 2], { device: dev }),
          ),
      ],
      [
        'indexAdd',
        (dev) =>
          T.indexAdd(
            T.ones([4, 3], { device: dev }),
            0,
            T.tensor([1, 4], { device: dev }),
            T.ones([2, 3], { device: dev }),
          ),
      ],
      [
        'gather',
        (dev) =>
          T.gather(
            T.ones([2, 3], { device: dev }),
            1,
            T.tensor(
              [
                [0, 1],
                [3, 0],
              ],
              { device: dev },
            ),
          ),
      ],
      [
        'scatterAdd',
        (dev) =>
          T.scatterAdd(
            T.ones([2, 3], { device: dev }),
            0,
            T.tensor([[0, -2, 7]], { device: dev }),
            T.ones([1, 3], { device: dev }),
          ),
      ],
      ['oneHot', (dev) => T.oneHot(T.tensor([0, 1, 2, 5], { device: dev }), 4)],
    ];
    for (const [name, f] of cases) {
      T.tidy(() => {
        const cpu = errorOf(() => f('cpu'));
        const ref = errorOf(() => f(REF));
        expect(cpu.code, name).toBe('INDEX_OUT_OF_RANGE');
        expect(ref.code, name).toBe(cpu.code);
        expect(ref.message, name).toBe(cpu.message);
      });
    }
  });
});

describe('reference backend: end to end', () => {
  it('a two-layer network: forward, loss and gradients match the CPU', () => {
    compare(
      [
        rnd([8, 16], 200),
        rnd([32, 16], 201, 'float32', -0.3, 0.3),
        rnd([32], 202),
        rnd([4, 32], 203, 'float32', -0.3, 0.3),
      ],
      (x, w1, b1, w2) => {
        const p = [w1, b1, w2].map((t) => t.detach().requiresGrad_());
        const h = T.gelu(T.linear(x, p[0], p[1]));
        const y = T.matmul(h, T.transpose(p[2], 0, 1));
        const loss = T.mean(T.square(T.sub(y, T.amax(y, 1, true))));
        loss.backward();
        return [loss, ...p.map((t) => t.grad!)];
      },
      { rtol: 1e-5, atol: 1e-5 },
    );
  });

  it('ops run on ref:1 as on ref:0', () => {
    compare(
      [rnd([6, 5], 210), rnd([5, 4], 211)],
      (a, b) => T.cumsum(T.matmul(a, b), 1),
      { rtol: 1e-5, atol: 1e-5 },
      '',
      'ref:1',
    );
  });
});
