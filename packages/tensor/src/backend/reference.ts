// The reference backend: every core kernel of the Backend interface (and the index kernels of the
// KernelTable) written in plain TypeScript over ArrayBuffers, one buffer per allocation.
//
// What it is for:
//  - Conformance. Registered as a numbered device type ("ref:0", "ref:1"), it lets the op test
//    suites run unchanged on a second backend, which proves that ops reach the hardware only
//    through the Backend interface and that the named-kernel compositions are right.
//  - A model for new backends. Each kernel is the plain loop that defines it, with the same
//    argument conventions and edge cases as the native CPU kernels (native/src/*.cc): which
//    accumulator a reduction uses, how a double becomes an int32, how float32 rounds to bfloat16,
//    where a NaN goes, how the Philox stream is laid out. A port can check itself against it.
//
// It mirrors the CPU backend bit for bit where that backend is exact (copies, casts, fills,
// integer arithmetic, indexing, sums accumulated in double, the Philox streams) and to float
// rounding elsewhere. Float32 math is evaluated in double and rounded to float32 after every
// operation, as the C++ computes in float, with multiply-adds fused where the compiled kernels
// fuse them (-march=native with GCC's default -ffp-contract=fast); what remains apart is libm
// (V8's Math.exp/log/tanh/... and glibc's functions round differently now and then) and the
// summation order of OpenBLAS. So float64 normal draws, which go through log/cos/sin in double,
// match the CPU's to an ulp rather than bit for bit; float32 and 16-bit ones match exactly.
//
// Memory is per device: an address is a key into that device's map of live buffers, so a freed
// block or a block of another device cannot be read. Fresh blocks that are not zeroed hold 0xCD
// bytes, which makes reads of uninitialised memory easy to spot. Performance is not a goal.
import { type DType, ITEMSIZE } from '../dtype.js';
import type {
  GatherAlongKernel,
  IndexAddRowsKernel,
  IndexSelectRowsKernel,
  OneHotKernel,
  ScatterAddAlongKernel,
  TopkKernel,
  TriangleKernel,
} from '../ops/indexing.js';
import type { Tensor } from '../tensor.js';
import {
  type Backend,
  type BackendType,
  type BinaryOp,
  type GemmOperand,
  type RandomDist,
  type ReduceOp,
  registerBackendType,
  type UnaryOp,
} from './backend.js';
import type { KernelName, KernelTable } from './kernels.js';

const TWO32 = 4294967296;

// ---- float32 / bfloat16 / float16 bit conversions ------------------------------------------

const F32 = new Float32Array(1);
const U32 = new Uint32Array(F32.buffer);

/** The bits of a number rounded to float32. */
function f32Bits(v: number): number {
  F32[0] = v;
  return U32[0];
}

function f32FromBits(u: number): number {
  U32[0] = u;
  return F32[0];
}

/** float32 → bfloat16, round to nearest even; a NaN stays NaN with its quiet bit set. */
export function f32ToBf16(v: number): number {
  const u = f32Bits(v);
  if ((u & 0x7fffffff) >>> 0 > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  return (((u + 0x7fff + ((u >>> 16) & 1)) >>> 0) >>> 16) & 0xffff;
}

/** float32 → float16, round to nearest even; overflow gives ±inf, NaN gives the quiet NaN 0x7e00. */
export function f32ToF16(v: number): number {
  const u = f32Bits(v);
  const sign = (u >>> 16) & 0x8000;
  const abs = (u & 0x7fffffff) >>> 0;
  if (abs > 0x7f800000) return sign | 0x7e00;
  if (abs >= 0x477ff000) return sign | 0x7c00;
  if (abs < 0x38800000) {
    // below the smallest normal half: adding 0.5 in float32 lines the half subnormal's units
    // (2^-24) up with the low mantissa bits and rounds them to nearest even on the way
    const r = f32Bits(Math.fround(f32FromBits(abs) + 0.5));
    return (sign | (r - 0x3f000000)) & 0xffff;
  }
  const odd = (abs >>> 13) & 1;
  // rebias the exponent (-112 << 23) and round the 13 dropped bits to nearest even
  return (sign | (((abs + 0xc8000fff + odd) >>> 0) >>> 13)) & 0xffff;
}

function f16Bits32(h: number): number {
  const sign = (h & 0x8000) << 16;
  let exp = (h >> 10) & 0x1f;
  let man = h & 0x3ff;
  if (exp === 0) {
    if (man === 0) return sign >>> 0;
    exp = 127 - 15 + 1; // subnormal: shift the mantissa up to a leading 1
    while (!(man & 0x400)) {
      man <<= 1;
      exp--;
    }
    return (sign | (exp << 23) | ((man & 0x3ff) << 13)) >>> 0;
  }
  if (exp === 31) return (sign | 0x7f800000 | (man << 13)) >>> 0;
  return (sign | ((exp + 127 - 15) << 23) | (man << 13)) >>> 0;
}

// Every 16-bit pattern widened once: loads are a table lookup.
const BF16_TO_F32 = new Float32Array(65536);
const F16_TO_F32 = new Float32Array(65536);
{
  const b = new Uint32Array(BF16_TO_F32.buffer);
  const h = new Uint32Array(F16_TO_F32.buffer);
  for (let i = 0; i < 65536; i++) {
    b[i] = i << 16;
    h[i] = f16Bits32(i);
  }
}

export const bf16ToF32 = (b: number): number => BF16_TO_F32[b & 0xffff];
export const f16ToF32 = (h: number): number => F16_TO_F32[h & 0xffff];

// ---- casts from double, as static_cast on x86-64 ---------------------------------------------
// Out-of-range and NaN conversions to integers are undefined in C++; x86 gives the "integer
// indefinite" value (the most negative one), and uint8 takes the low byte of the int32.

function toInt32(v: number): number {
  const t = Math.trunc(v);
  return t >= -2147483648 && t <= 2147483647 ? t : -2147483648;
}

function storeInt64(words: Int32Array, i: number, v: number): void {
  const t = Math.trunc(v);
  if (!(t >= -(2 ** 63) && t < 2 ** 63)) {
    words[2 * i] = 0;
    words[2 * i + 1] = -2147483648;
    return;
  }
  const hi = Math.floor(t / TWO32); // exact: dividing by a power of two
  words[2 * i] = t - hi * TWO32; // the low word, stored modulo 2^32
  words[2 * i + 1] = hi;
}

// ---- element access ------------------------------------------------------------------------

/**
 * Loads and stores of one tensor's storage, by element index into the storage. `ld` gives the
 * value in the native compute type (float32 values for the 16/32-bit floats, doubles for float64
 * and the integers); `st` converts a double to the storage type as the native kernels' casts do.
 */
interface Access {
  ld: (i: number) => number;
  st: (i: number, v: number) => void;
}

function accessFor(buf: ArrayBuffer, dtype: DType): Access {
  switch (dtype) {
    case 'float32': {
      const a = new Float32Array(buf);
      return { ld: (i) => a[i], st: (i, v) => void (a[i] = v) };
    }
    case 'float64': {
      const a = new Float64Array(buf);
      return { ld: (i) => a[i], st: (i, v) => void (a[i] = v) };
    }
    case 'bfloat16': {
      const a = new Uint16Array(buf);
      return { ld: (i) => BF16_TO_F32[a[i]], st: (i, v) => void (a[i] = f32ToBf16(v)) };
    }
    case 'float16': {
      const a = new Uint16Array(buf);
      return { ld: (i) => F16_TO_F32[a[i]], st: (i, v) => void (a[i] = f32ToF16(v)) };
    }
    case 'int32': {
      const a = new Int32Array(buf);
      return { ld: (i) => a[i], st: (i, v) => void (a[i] = toInt32(v)) };
    }
    case 'int64': {
      // two 32-bit words per element, so no BigInt: hi * 2^32 + lo rounds once, like (double)i64
      const w = new Int32Array(buf);
      return {
        ld: (i) => w[2 * i + 1] * TWO32 + (w[2 * i] >>> 0),
        st: (i, v) => storeInt64(w, i, v),
      };
    }
    case 'uint8': {
      const a = new Uint8Array(buf);
      return { ld: (i) => a[i], st: (i, v) => void (a[i] = toInt32(v)) };
    }
    case 'bool': {
      const a = new Uint8Array(buf);
      return { ld: (i) => (a[i] !== 0 ? 1 : 0), st: (i, v) => void (a[i] = v !== 0 ? 1 : 0) };
    }
  }
}

/** Copies elements as raw bits (dst index, src index), for kernels that move values unchanged. */
type RawCopy = (di: number, si: number) => void;
/** Writes all-zero bits (+0 in every float format) at an element index. */
type RawZero = (di: number) => void;

function wordsOf(buf: ArrayBuffer, dtype: DType): Uint8Array | Uint16Array | Uint32Array {
  const size = ITEMSIZE[dtype];
  return size === 1 ? new Uint8Array(buf) : size === 2 ? new Uint16Array(buf) : new Uint32Array(buf);
}

function rawCopier(dst: ArrayBuffer, src: ArrayBuffer, dtype: DType): RawCopy {
  const d = wordsOf(dst, dtype);
  const s = wordsOf(src, dtype);
  if (ITEMSIZE[dtype] !== 8) return (di, si) => void (d[di] = s[si]);
  return (di, si) => {
    d[2 * di] = s[2 * si];
    d[2 * di + 1] = s[2 * si + 1];
  };
}

function rawZeroer(buf: ArrayBuffer, dtype: DType): RawZero {
  const d = wordsOf(buf, dtype);
  if (ITEMSIZE[dtype] !== 8) return (di) => void (d[di] = 0);
  return (di) => {
    d[2 * di] = 0;
    d[2 * di + 1] = 0;
  };
}

// ---- strided iteration ---------------------------------------------------------------------

/** The most dimensions a kernel operand may have (kMaxDims of native/src/common.h). */
const MAX_DIMS = 16;

const numelOf = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/**
 * The storage element index of every position of `shape`, in row-major order, for a view with
 * `strides` (elements, 0 for broadcast dimensions) whose element 0 is at `base`.
 */
function offsets(shape: readonly number[], strides: readonly number[], base: number): Float64Array {
  const n = numelOf(shape);
  const out = new Float64Array(n);
  const nd = shape.length;
  if (n === 0) return out;
  if (nd === 0) {
    out[0] = base;
    return out;
  }
  const len = shape[nd - 1];
  const step = strides[nd - 1];
  const idx = new Array<number>(nd).fill(0);
  let at = base;
  for (let k = 0; k < n; k += len) {
    for (let j = 0; j < len; j++) out[k + j] = at + j * step;
    // odometer over the outer dimensions
    for (let d = nd - 2; d >= 0; d--) {
      at += strides[d];
      if (++idx[d] < shape[d]) break;
      at -= strides[d] * shape[d];
      idx[d] = 0;
    }
  }
  return out;
}

/** Strides of `t` broadcast (right-aligned) to an iteration shape; size-1 dimensions get 0. */
function broadcastStrides(t: Tensor, shape: readonly number[]): number[] {
  const lead = shape.length - t.ndim;
  return shape.map((_, d) => {
    const td = d - lead;
    return td < 0 || t.shape[td] === 1 ? 0 : t.strides[td];
  });
}

/** Element indices of `t` over the positions of `shape` (t broadcast to it). */
const over = (shape: readonly number[], t: Tensor): Float64Array =>
  offsets(shape, broadcastStrides(t, shape), t.offset);

/** Contiguous as the native kernels define it: size-1 dimensions may have any stride. */
function isDense(t: Tensor): boolean {
  let expected = 1;
  for (let d = t.ndim - 1; d >= 0; d--) {
    if (t.shape[d] !== 1 && t.strides[d] !== expected) return false;
    expected *= t.shape[d];
  }
  return true;
}

/** Whether the native kernels compute this dtype in float (else in double). */
const inFloat = (d: DType): boolean => d === 'float32' || d === 'bfloat16' || d === 'float16';

const isFloatDtype = (d: DType): boolean => inFloat(d) || d === 'float64';

// ---- math helpers --------------------------------------------------------------------------

type Round = (v: number) => number;
const keep: Round = (v) => v;

// the doubles of native/src/elementwise.cc's constants
const SQRT_2_OVER_PI = Math.sqrt(2 / Math.PI);
const INV_SQRT2 = Math.SQRT1_2;
const INV_SQRT_2PI = 1 / Math.sqrt(2 * Math.PI);

const TWO_OVER_SQRT_PI = 1.1283791670955126;

/** e^(-a^2), with a^2 split exactly into hi + lo so that its rounding does not reach the result. */
function expNegSquare(a: number): number {
  const hi = a * a;
  const t = 134217729 * a; // Veltkamp split: a = ah + al with 26-bit halves
  const ah = t - (t - a);
  const al = a - ah;
  const lo = ah * ah - hi + 2 * ah * al + al * al;
  return Math.exp(-hi) * (1 - lo);
}

/**
 * erf in double precision (JavaScript has none), within a few ulp: the Taylor series below 0.8,
 * then 1 - erfc with erfc from its continued fraction (more terms the closer to 0.8).
 */
export function erf(x: number): number {
  if (Number.isNaN(x)) return x;
  const a = Math.abs(x);
  let r: number;
  if (a < 0.8) {
    // 2/sqrt(pi) sum (-1)^n a^(2n+1) / (n! (2n+1))
    const a2 = a * a;
    let power = a;
    let sum = a;
    for (let n = 1; n < 40; n++) {
      power *= -a2 / n;
      sum += power / (2 * n + 1);
    }
    r = TWO_OVER_SQRT_PI * sum;
  } else if (a < 6) {
    // erfc(a) = e^(-a^2) / sqrt(pi) / (a + (1/2) / (a + 1 / (a + (3/2) / (a + ...))))
    let f = a;
    for (let k = Math.ceil(30 + 200 / (a * a)); k >= 1; k--) f = a + k / 2 / f;
    r = 1 - ((TWO_OVER_SQRT_PI / 2) * expNegSquare(a)) / f;
  } else {
    r = 1; // erfc(6) < 2^-54
  }
  return x < 0 ? -r : r;
}

/**
 * fma(x, y, z) = x * y + z rounded once, in double. The CPU build (-march=native with GCC's
 * default -ffp-contract=fast) fuses a multiplication into the addition that consumes it, e.g.
 * `a + (b - a) * u` in the random kernel and `1 - a * a` in tanhBackward. x * y is split exactly
 * into p + e (Veltkamp), and p + e + z summed with exact error terms (wrong only at a tie).
 */
export function fma(x: number, y: number, z: number): number {
  const p = x * y;
  if (!Number.isFinite(p) || !Number.isFinite(z) || p === 0 || z === 0) return p + z;
  let t = 134217729 * x; // 2^27 + 1
  const xh = t - (t - x);
  const xl = x - xh;
  t = 134217729 * y;
  const yh = t - (t - y);
  const yl = y - yh;
  const e = xh * yh - p + xh * yl + xl * yh + xl * yl; // x * y = p + e exactly
  const s = p + z; // p + z = s + f exactly
  const v = s - p;
  const f = p - (s - v) + (z - v);
  const g = f + e; // the small parts: their rounding error lies far below s's ulp
  return s + g;
}

/**
 * The fused multiply-add of the compute type: for float32 values x * y is exact in double, so one
 * double addition rounded to float32 is fmaf (but for double-rounding ties, ~2^-29 of cases).
 */
const fmaF = (x: number, y: number, z: number): number => Math.fround(x * y + z);

// The float32 sigmoid of native/src/fast-math.h: exp(x) for x <= 0 by range reduction and a
// degree-7 Taylor polynomial (flushing below -87 to 0), then 1 / (1 + e) or e / (1 + e) with
// e = exp(-|x|). Each step rounds to float32 as the C++ does.
const LOG2E_F = Math.fround(Math.LOG2E);
const LN2_HI_F = 0.693359375;
const LN2_LO_F = Math.fround(-2.1219444e-4);
const TAYLOR_F = [1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 0.5, 1, 1].map(Math.fround);

function expNonPosF(x: number): number {
  if (Number.isNaN(x)) return x;
  if (x < -87) return 0;
  const f = Math.fround;
  // (the multiply-adds fused, as compiled)
  const k = f(fmaF(x, LOG2E_F, 12582912) - 12582912); // rounds x * log2(e) to an integer
  const r = fmaF(-k, LN2_LO_F, fmaF(-k, LN2_HI_F, x));
  let p = TAYLOR_F[0];
  for (let i = 1; i < TAYLOR_F.length; i++) p = fmaF(p, r, TAYLOR_F[i]);
  return f(p * 2 ** k);
}

/** float32 sigmoid(x) and 1 - sigmoid(x), each without cancellation. */
function sigmoidPartsF(x: number): [s: number, oneMinus: number] {
  const e = expNonPosF(-Math.abs(x));
  const r = Math.fround(1 / Math.fround(1 + e));
  const er = Math.fround(e * r);
  return x >= 0 ? [r, er] : [er, r];
}

/** std::pow's special cases that Math.pow lacks: pow(1, y) = 1 and pow(-1, ±inf) = 1. */
function cpow(a: number, b: number): number {
  if (a === 1) return 1;
  if (a === -1 && (b === Number.POSITIVE_INFINITY || b === Number.NEGATIVE_INFINITY)) return 1;
  return a ** b;
}

/** Round half to even, as std::nearbyint in the default rounding mode. */
function roundEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : r;
}

/**
 * A unary op in the compute type (`single`: float32 rounding after each operation), with the
 * multiply-adds fused where the compiled C++ fuses them.
 */
function unaryFn(op: UnaryOp, single: boolean, p0: number, p1: number): (x: number) => number {
  const r: Round = single ? Math.fround : keep;
  switch (op) {
    case 'neg':
      return (x) => -x;
    case 'exp':
      return (x) => r(Math.exp(x));
    case 'log':
      return (x) => r(Math.log(x));
    case 'sqrt':
      return (x) => r(Math.sqrt(x));
    case 'rsqrt':
      return (x) => r(1 / r(Math.sqrt(x)));
    case 'abs':
      return (x) => Math.abs(x);
    case 'tanh':
      return (x) => r(Math.tanh(x));
    case 'sigmoid':
      return single ? (x) => sigmoidPartsF(x)[0] : (x) => 1 / (1 + Math.exp(-x));
    case 'silu':
      return single ? (x) => r(x * sigmoidPartsF(x)[0]) : (x) => x / (1 + Math.exp(-x));
    case 'gelu': {
      const k = r(INV_SQRT2);
      return (x) => r(r(0.5 * x) * r(1 + r(erf(r(x * k)))));
    }
    case 'geluTanh': {
      const k = r(SQRT_2_OVER_PI);
      const c = r(0.044715);
      const fm = single ? fmaF : fma;
      return (x) => r(r(0.5 * x) * r(1 + r(Math.tanh(r(k * fm(r(r(c * x) * x), x, x))))));
    }
    case 'relu':
      // biome-ignore lint/complexity/useMathMinMax: NaN gives 0 and -0 gives +0, as in the C++
      return (x) => (x > 0 ? x : 0);
    case 'sin':
      return (x) => r(Math.sin(x));
    case 'cos':
      return (x) => r(Math.cos(x));
    case 'square':
      return (x) => r(x * x);
    case 'reciprocal':
      return (x) => r(1 / x);
    case 'sign':
      return (x) => (x > 0 ? 1 : x < 0 ? -1 : 0);
    case 'log1p':
      return (x) => r(Math.log1p(x));
    case 'expm1':
      return (x) => r(Math.expm1(x));
    case 'floor':
      return Math.floor;
    case 'ceil':
      return Math.ceil;
    case 'round':
      return roundEven;
    case 'clamp': {
      // NaN bounds mean "no bound"
      const lo = r(p0);
      const hi = r(p1);
      return (x) => {
        let y = x;
        if (!Number.isNaN(lo) && y < lo) y = lo;
        if (!Number.isNaN(hi) && y > hi) y = hi;
        return y;
      };
    }
    case 'logicalNot':
      return (x) => (x === 0 ? 1 : 0);
    case 'isnan':
      return (x) => (Number.isNaN(x) ? 1 : 0);
    case 'isinf':
      return (x) => (x === Number.POSITIVE_INFINITY || x === Number.NEGATIVE_INFINITY ? 1 : 0);
  }
  throw new Error(`unknown unary op ${String(op)}`);
}

/** A binary op in the compute type; for the *Backward ops a is the saved value and b the gradient. */
function binaryFn(op: BinaryOp, single: boolean): (a: number, b: number) => number {
  const r: Round = single ? Math.fround : keep;
  switch (op) {
    case 'add':
      return (a, b) => r(a + b);
    case 'sub':
      return (a, b) => r(a - b);
    case 'mul':
      return (a, b) => r(a * b);
    case 'div':
      return (a, b) => r(a / b);
    case 'pow':
      return (a, b) => r(cpow(a, b));
    case 'maximum':
      return (a, b) => (Number.isNaN(a) || a > b ? a : b); // NaN propagates
    case 'minimum':
      return (a, b) => (Number.isNaN(a) || a < b ? a : b);
    case 'eq':
      return (a, b) => (a === b ? 1 : 0);
    case 'ne':
      return (a, b) => (a !== b ? 1 : 0);
    case 'lt':
      return (a, b) => (a < b ? 1 : 0);
    case 'le':
      return (a, b) => (a <= b ? 1 : 0);
    case 'gt':
      return (a, b) => (a > b ? 1 : 0);
    case 'ge':
      return (a, b) => (a >= b ? 1 : 0);
    case 'logicalAnd':
      return (a, b) => (a !== 0 && b !== 0 ? 1 : 0);
    case 'logicalOr':
      return (a, b) => (a !== 0 || b !== 0 ? 1 : 0);
    case 'siluBackward':
      // d silu / dx = s (1 + x (1 - s))
      if (single) {
        return (a, b) => {
          const [s, om] = sigmoidPartsF(a);
          return r(b * r(s * fmaF(a, om, 1)));
        };
      }
      return (a, b) => {
        const s = 1 / (1 + Math.exp(-a));
        return b * (s * fma(a, 1 - s, 1));
      };
    case 'geluBackward': {
      const k = r(INV_SQRT2);
      const q = r(INV_SQRT_2PI);
      const fm = single ? fmaF : fma;
      return (a, b) => {
        const pdf = r(q * r(Math.exp(r(r(-0.5 * a) * a))));
        // `cdf + a * pdf` with cdf = 0.5 * (1 + erf): the first product is the fused one
        return r(b * fm(0.5, r(1 + r(erf(r(a * k)))), r(a * pdf)));
      };
    }
    case 'geluTanhBackward': {
      const k = r(SQRT_2_OVER_PI);
      const c = r(0.044715);
      const c3 = r(3 * 0.044715);
      const fm = single ? fmaF : fma;
      return (a, b) => {
        const inner = r(k * fm(r(r(c * a) * a), a, a));
        const t = r(Math.tanh(inner));
        const dinner = r(k * fm(r(c3 * a), a, 1));
        const rest = r(r(r(0.5 * a) * fm(-t, t, 1)) * dinner);
        return r(b * fm(0.5, r(1 + t), rest)); // as in geluBackward, the first product is fused
      };
    }
    case 'sigmoidBackward':
      return (a, b) => r(r(b * a) * r(1 - a)); // a = sigmoid output
    case 'tanhBackward':
      return single ? (a, b) => r(b * fmaF(-a, a, 1)) : (a, b) => b * fma(-a, a, 1); // a = tanh output
    case 'reluBackward':
      return (a, b) => (a > 0 ? b : 0);
    case 'atan2':
      return (a, b) => r(Math.atan2(a, b));
  }
  throw new Error(`unknown binary op ${String(op)}`);
}

// ---- Philox 4x32-10 --------------------------------------------------------------------------

const M0 = 0xd2511f53;
const M1 = 0xcd9e8d57;
const W0 = 0x9e3779b9;
const W1 = 0xbb67ae85;

/** High 32 bits of the 64-bit product of two uint32, exactly, in doubles. */
function mulHi(a: number, b: number): number {
  const lo = a * (b & 0xffff); // < 2^48: exact
  const hi = a * (b >>> 16); // < 2^48: exact
  // a * b = hi * 2^16 + lo; split hi at bit 16 so that every partial sum stays below 2^53
  const hiTop = Math.floor(hi / 65536);
  return (hiTop + Math.floor(((hi - hiTop * 65536) * 65536 + lo) / TWO32)) >>> 0;
}

/** One Philox 4x32-10 block: counter (c0..c3) under key (k0, k1), into `out` (4 words). */
export function philox4x32(
  c0: number,
  c1: number,
  c2: number,
  c3: number,
  k0: number,
  k1: number,
  out: Uint32Array | number[] = new Uint32Array(4),
): Uint32Array | number[] {
  for (let r = 0; r < 10; r++) {
    const hi0 = mulHi(M0, c0);
    const lo0 = Math.imul(M0, c0) >>> 0;
    const hi1 = mulHi(M1, c2);
    const lo1 = Math.imul(M1, c2) >>> 0;
    c0 = (hi1 ^ c1 ^ k0) >>> 0;
    c1 = lo1;
    c2 = (hi0 ^ c3 ^ k1) >>> 0;
    c3 = lo0;
    k0 = (k0 + W0) >>> 0;
    k1 = (k1 + W1) >>> 0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
  return out;
}

/** (0, 1), never 0, so that log() in Box-Muller stays finite. */
const u01 = (x: number): number => (x + 0.5) * (1 / TWO32);

/** Random bits a uniform draw keeps: the significand of the output type (32 for the rest). */
const UNIFORM_BITS: Partial<Record<DType, number>> = { float32: 24, bfloat16: 8, float16: 11 };

// ---- memory ----------------------------------------------------------------------------------

/** A device's live blocks by address. Addresses are never reused, and differ between devices. */
class DeviceMemory {
  private readonly blocks = new Map<number, ArrayBuffer>();
  private next: number;

  constructor(
    private readonly device: string,
    index: number,
  ) {
    // 2^40 bytes of address space per device, starting above 0
    this.next = (index + 1) * 2 ** 40;
  }

  alloc(bytes: number, zero: boolean): number {
    if (!(Number.isInteger(bytes) && bytes >= 0)) {
      throw new Error(`${this.device}: cannot allocate ${bytes} bytes`);
    }
    // rounded up to 8 bytes so that every typed-array view fits
    const buf = new ArrayBuffer(Math.max(8, Math.ceil(bytes / 8) * 8));
    if (!zero) new Uint8Array(buf).fill(0xcd);
    const address = this.next;
    this.next += Math.ceil(Math.max(bytes, 1) / 64) * 64 + 64;
    this.blocks.set(address, buf);
    return address;
  }

  free(address: number): void {
    if (!this.blocks.delete(address)) {
      throw new Error(
        `${this.device}: free of address ${address}, which is not a live allocation of this device (double free?)`,
      );
    }
  }

  buffer(address: number): ArrayBuffer {
    const b = this.blocks.get(address);
    if (!b) {
      throw new Error(
        `${this.device}: address ${address} is not a live allocation of this device (freed, or memory of another device)`,
      );
    }
    return b;
  }
}

// ---- the backend -----------------------------------------------------------------------------

type RefKernels = Pick<
  KernelTable,
  'indexSelectRows' | 'indexAddRows' | 'gatherAlong' | 'scatterAddAlong' | 'topk' | 'triangle' | 'oneHot'
>;

function checkIndexDtype(t: Tensor): void {
  if (t.dtype !== 'int32' && t.dtype !== 'int64') throw new Error('index tensors must be int32 or int64');
}

class ReferenceBackend implements Backend {
  readonly device: string;
  readonly synchronous: boolean;
  /** Laid out as a device backend would (so the conformance run covers it). */
  readonly preferInputLayout = true;
  private readonly mem: DeviceMemory;
  private readonly kernels: RefKernels;

  constructor(device: string, index: number, synchronous: boolean) {
    this.device = device;
    this.synchronous = synchronous;
    this.mem = new DeviceMemory(device, index);
    this.kernels = {
      indexSelectRows: this.indexSelectRows,
      indexAddRows: this.indexAddRows,
      gatherAlong: this.gatherAlong,
      scatterAddAlong: this.scatterAddAlong,
      topk: this.topk,
      triangle: this.triangle,
      oneHot: this.oneHot,
    };
  }

  // -- memory

  alloc(bytes: number, zero: boolean): number {
    return this.mem.alloc(bytes, zero);
  }

  free(address: number): void {
    this.mem.free(address);
  }

  emptyCache(): void {}

  cachedBytes(): number {
    return 0;
  }

  /** A kernel operand's buffer. Like the CPU's argument buffer, operands have at most 16 dims. */
  private buf(t: Tensor): ArrayBuffer {
    if (t.ndim > MAX_DIMS) throw new Error(`tensors have at most ${MAX_DIMS} dimensions, got ${t.ndim}`);
    return this.mem.buffer(t.storage.address);
  }

  private acc(t: Tensor): Access {
    return accessFor(this.buf(t), t.dtype);
  }

  /** The bytes of a contiguous tensor's elements. */
  private bytesOf(t: Tensor, bytes: number): Uint8Array {
    const buf = this.mem.buffer(t.storage.address);
    const start = t.offset * ITEMSIZE[t.dtype];
    if (start < 0 || start + bytes > buf.byteLength) {
      throw new Error(`${this.device}: ${bytes} bytes at element ${t.offset} lie outside the allocation`);
    }
    return new Uint8Array(buf, start, bytes);
  }

  // -- transfers

  read(t: Tensor, dst: ArrayBufferView): void {
    const bytes = t.numel * ITEMSIZE[t.dtype];
    const src = this.bytesOf(t, bytes);
    if (bytes > dst.byteLength) throw new RangeError('readInto: destination too small');
    new Uint8Array(dst.buffer, dst.byteOffset, bytes).set(src);
  }

  /** Several reads at once (as a GPU backend reads its queued checks with one wait). */
  readMany(ts: Tensor[], dsts: ArrayBufferView[]): void {
    if (ts.length !== dsts.length) throw new Error('readMany: expected as many arrays as tensors');
    for (let i = 0; i < ts.length; i++) this.read(ts[i], dsts[i]);
  }

  write(t: Tensor, src: ArrayBufferView): void {
    this.bytesOf(t, src.byteLength).set(new Uint8Array(src.buffer, src.byteOffset, src.byteLength));
  }

  // -- copies and fills

  copy(dst: Tensor, src: Tensor): void {
    const n = dst.numel;
    const D = this.acc(dst);
    const S = this.acc(src);
    if (n === 0) return;
    if (dst.dtype === src.dtype && isDense(dst) && isDense(src) && src.numel === n) {
      const bytes = n * ITEMSIZE[dst.dtype];
      this.bytesOf(dst, bytes).set(this.bytesOf(src, bytes));
      return;
    }
    const od = over(dst.shape, dst);
    const os = over(dst.shape, src);
    // Same-dtype strided copies go through the compute type like every native copy: exact for
    // float32/float64/int32/uint8 (moved as raw bits here), while bfloat16/float16 NaNs become
    // canonical quiet NaNs, bool bytes become 0/1 and int64 rounds through double (2^53 + 1 → 2^53).
    if (dst.dtype === src.dtype && ['float32', 'float64', 'int32', 'uint8'].includes(dst.dtype)) {
      const move = rawCopier(this.buf(dst), this.buf(src), dst.dtype);
      for (let k = 0; k < n; k++) move(od[k], os[k]);
      return;
    }
    for (let k = 0; k < n; k++) D.st(od[k], S.ld(os[k]));
  }

  fill(t: Tensor, value: number): void {
    const A = this.acc(t);
    const o = over(t.shape, t);
    for (let k = 0; k < o.length; k++) A.st(o[k], value);
  }

  // -- elementwise

  unary(out: Tensor, x: Tensor, op: UnaryOp, p0 = Number.NaN, p1 = Number.NaN): void {
    if (out.dtype !== 'bool' && out.dtype !== x.dtype) {
      throw new Error('unary: output dtype must equal the input dtype or be bool');
    }
    const f = unaryFn(op, inFloat(x.dtype), p0, p1);
    const O = this.acc(out);
    const X = this.acc(x);
    const oo = over(out.shape, out);
    const ox = over(out.shape, x);
    for (let k = 0; k < oo.length; k++) O.st(oo[k], f(X.ld(ox[k])));
  }

  binary(out: Tensor, x: Tensor, y: Tensor, op: BinaryOp, alpha = 1): void {
    if (x.dtype !== y.dtype) throw new Error('binary: operands must share a dtype');
    if (!(out.dtype === x.dtype || (out.dtype === 'bool' && x.dtype !== 'bool'))) {
      throw new Error('binary: output dtype must equal the input dtype or be bool');
    }
    const single = inFloat(x.dtype);
    const f = binaryFn(op, single);
    const O = this.acc(out);
    const X = this.acc(x);
    const Y = this.acc(y);
    const oo = over(out.shape, out);
    const ox = over(out.shape, x);
    const oy = over(out.shape, y);
    if ((op === 'add' || op === 'sub') && alpha !== 1) {
      // out = x ± alpha * y, alpha in the compute type and the product rounded to it
      const r: Round = single ? Math.fround : keep;
      const al = r(alpha);
      for (let k = 0; k < oo.length; k++) O.st(oo[k], f(X.ld(ox[k]), r(Y.ld(oy[k]) * al)));
      return;
    }
    for (let k = 0; k < oo.length; k++) O.st(oo[k], f(X.ld(ox[k]), Y.ld(oy[k])));
  }

  binaryScalar(out: Tensor, x: Tensor, s: number, op: BinaryOp, reverse = false): void {
    if (!(out.dtype === x.dtype || (out.dtype === 'bool' && x.dtype !== 'bool'))) {
      throw new Error('binaryScalar: output dtype must equal the input dtype or be bool');
    }
    const single = inFloat(x.dtype);
    const f = binaryFn(op, single);
    const sc = single ? Math.fround(s) : s;
    const O = this.acc(out);
    const X = this.acc(x);
    const oo = over(out.shape, out);
    const ox = over(out.shape, x);
    if (reverse) for (let k = 0; k < oo.length; k++) O.st(oo[k], f(sc, X.ld(ox[k])));
    else for (let k = 0; k < oo.length; k++) O.st(oo[k], f(X.ld(ox[k]), sc));
  }

  where(out: Tensor, cond: Tensor, x: Tensor, y: Tensor): void {
    if (cond.dtype !== 'bool' && cond.dtype !== 'uint8') throw new Error('where: condition must be bool');
    const c = new Uint8Array(this.buf(cond));
    const fromX = rawCopier(this.buf(out), this.buf(x), x.dtype);
    const fromY = rawCopier(this.buf(out), this.buf(y), x.dtype);
    const oo = over(out.shape, out);
    const oc = over(out.shape, cond);
    const ox = over(out.shape, x);
    const oy = over(out.shape, y);
    for (let k = 0; k < oo.length; k++) {
      if (c[oc[k]] !== 0) fromX(oo[k], ox[k]);
      else fromY(oo[k], oy[k]);
    }
  }

  // -- reductions

  reduce(
    x: Tensor,
    out: Tensor,
    indices: Tensor | null,
    outer: number,
    R: number,
    inner: number,
    op: ReduceOp,
    p: number,
  ): void {
    if (R === 0) throw new Error('reduce: cannot reduce over an empty dimension');
    const X = this.acc(x);
    const O = this.acc(out);
    const I = indices ? this.acc(indices) : null;
    if ((op === 'sum' || op === 'mean') && inner > 1) {
      // rows accumulated in double in order of r, then scaled by 1/R for the mean (a product,
      // where the single-line path below divides by R)
      const acc = new Float64Array(inner);
      const scale = op === 'mean' ? 1 / R : 1;
      for (let o = 0; o < outer; o++) {
        acc.fill(0);
        const base = x.offset + o * R * inner;
        for (let r = 0; r < R; r++) for (let i = 0; i < inner; i++) acc[i] += X.ld(base + r * inner + i);
        for (let i = 0; i < inner; i++) O.st(out.offset + o * inner + i, acc[i] * scale);
      }
      return;
    }
    const line = { value: 0, index: 0 };
    const writesIndex = op === 'argmax' || op === 'argmin';
    for (let j = 0; j < outer * inner; j++) {
      const o = Math.floor(j / inner);
      const i = j % inner;
      reduceLine(X.ld, x.offset + o * R * inner + i, R, inner, op, p, line);
      O.st(out.offset + j, writesIndex ? line.index : line.value);
      if (I && indices) I.st(indices.offset + j, line.index);
    }
  }

  cumsum(x: Tensor, out: Tensor, outer: number, R: number, inner: number): void {
    const X = this.acc(x);
    const O = this.acc(out);
    for (let j = 0; j < outer * inner; j++) {
      const start = Math.floor(j / inner) * R * inner + (j % inner);
      let s = 0; // double accumulator
      for (let r = 0; r < R; r++) {
        s += X.ld(x.offset + start + r * inner);
        O.st(out.offset + start + r * inner, s);
      }
    }
  }

  // -- matrix products

  gemm(
    batch: number,
    M: number,
    N: number,
    K: number,
    a: GemmOperand,
    b: GemmOperand,
    c: GemmOperand,
    alpha: number,
    beta: number,
  ): void {
    if (!isFloatDtype(c.tensor.dtype)) throw new Error('matmul: integer and bool dtypes are not supported');
    if (M === 0 || N === 0) return;
    if (K === 0) throw new Error('gemm: K == 0 must be handled by the caller');
    const A = this.acc(a.tensor);
    const B = this.acc(b.tensor);
    const C = this.acc(c.tensor);
    // The CPU's portable GEMM (and, in its own blocking, OpenBLAS): C = beta * C (0 when beta is
    // 0: C is not read), then C += (alpha * A[i, k]) * B[k, j] for k in order, accumulated in
    // float32 for float32 and the 16-bit floats (which go through float32 panels, rounded into C
    // once) and in double for float64. A float32 accumulator takes each exact product and rounds
    // once, as the CPU's fused multiply-add does; the float64 one rounds the product too. C's
    // column stride is honoured (the CPU assumes 1).
    const single = inFloat(c.tensor.dtype);
    const r: Round = single ? Math.fround : keep;
    const al = r(alpha);
    const be = r(beta);
    const pa = new Float64Array(M * K);
    const pb = new Float64Array(K * N);
    const acc = single ? new Float32Array(N) : new Float64Array(N);
    for (let bi = 0; bi < batch; bi++) {
      if (bi === 0 || a.bs !== 0) {
        const a0 = a.tensor.offset + bi * a.bs;
        for (let i = 0; i < M; i++)
          for (let k = 0; k < K; k++) pa[i * K + k] = r(al * A.ld(a0 + i * a.rs + k * a.cs));
      }
      if (bi === 0 || b.bs !== 0) {
        const b0 = b.tensor.offset + bi * b.bs;
        for (let k = 0; k < K; k++)
          for (let j = 0; j < N; j++) pb[k * N + j] = B.ld(b0 + k * b.rs + j * b.cs);
      }
      const c0 = c.tensor.offset + bi * c.bs;
      for (let i = 0; i < M; i++) {
        const row = c0 + i * c.rs;
        for (let j = 0; j < N; j++) acc[j] = be === 0 ? 0 : C.ld(row + j * c.cs) * be;
        for (let k = 0; k < K; k++) {
          const av = pa[i * K + k];
          const bk = k * N;
          for (let j = 0; j < N; j++) acc[j] += av * pb[bk + j];
        }
        for (let j = 0; j < N; j++) C.st(row + j * c.cs, acc[j]);
      }
    }
  }

  // -- random numbers

  random(out: Tensor, dist: RandomDist, seed: bigint, offset: bigint, a: number, b: number): void {
    if (!isDense(out)) throw new Error('philox: output must be contiguous');
    const s = BigInt.asUintN(64, seed);
    const k0 = Number(s & 0xffffffffn);
    const k1 = Number(s >> 32n);
    // the CPU backend passes the offset as a double: mirror that (exact below 2^53)
    const off = Number(offset);
    const O = this.acc(out);
    const n = out.numel;
    const bits = UNIFORM_BITS[out.dtype] ?? 32;
    const unit = 1 / 2 ** bits;
    const words = new Uint32Array(4);
    const v = new Float64Array(4);
    for (let j = 0; j < Math.ceil(n / 4); j++) {
      const ctr = off + j;
      const hi = Math.floor(ctr / TWO32);
      philox4x32(ctr - hi * TWO32, hi >>> 0, 0, 0, k0, k1, words);
      switch (dist) {
        case 'uniform':
          // [a, b) from the top `bits` bits: exact in the output type, never rounds up to b
          for (let l = 0; l < 4; l++) v[l] = fma(b - a, (words[l] >>> (32 - bits)) * unit, a);
          break;
        case 'normal':
          // Box-Muller on word pairs: (w0, w1) → two normals, (w2, w3) → two more
          for (let l = 0; l < 4; l += 2) {
            const rad = Math.sqrt(-2 * Math.log(u01(words[l])));
            const th = 6.283185307179586 * u01(words[l + 1]);
            v[l] = fma(b * rad, Math.cos(th), a);
            v[l + 1] = fma(b * rad, Math.sin(th), a);
          }
          break;
        case 'randint': // [a, b)
          for (let l = 0; l < 4; l++) v[l] = a + Math.floor(u01(words[l]) * (b - a));
          break;
        case 'bernoulli': // 1 with probability a
          for (let l = 0; l < 4; l++) v[l] = u01(words[l]) < a ? 1 : 0;
          break;
        default:
          throw new Error(`unknown distribution ${String(dist)}`);
      }
      for (let l = 0; l < 4 && 4 * j + l < n; l++) O.st(out.offset + 4 * j + l, v[l]);
    }
  }

  // -- named kernels

  kernel<K extends KernelName>(name: K): KernelTable[K] | undefined {
    return (this.kernels as Partial<KernelTable>)[name] as KernelTable[K] | undefined;
  }

  /** Index values of a (contiguous) index tensor in row-major order, as doubles. */
  private indexValues(index: Tensor): Float64Array {
    checkIndexDtype(index);
    const I = this.acc(index);
    const o = over(index.shape, index);
    for (let k = 0; k < o.length; k++) o[k] = I.ld(o[k]);
    return o;
  }

  /**
   * Stores an index kernel's verdict in its `bad` operand (float64 [2]): [position, value] of the
   * rejected index, or [-1, 0]. True when an index was rejected (the kernel then writes nothing).
   */
  private report(bad: Tensor, rejected: RejectedIndex | undefined): boolean {
    if (bad.dtype !== 'float64' || bad.ndim !== 1 || bad.shape[0] !== 2) {
      throw new Error('index kernels report into a float64 tensor of shape [2]');
    }
    const B = this.acc(bad);
    B.st(bad.offset, rejected ? rejected[0] : -1);
    B.st(bad.offset + bad.strides[0], rejected ? rejected[1] : 0);
    return rejected !== undefined;
  }

  private readonly indexSelectRows: IndexSelectRowsKernel = (out, x, index, outer, S, inner, bad) => {
    const idx = this.indexValues(index);
    if (this.report(bad, firstBad(idx, S))) return;
    const L = idx.length;
    const move = rawCopier(this.buf(out), this.buf(x), x.dtype);
    for (let o = 0; o < outer; o++) {
      for (let i = 0; i < L; i++) {
        const d = out.offset + (o * L + i) * inner;
        const s = x.offset + (o * S + idx[i]) * inner;
        for (let q = 0; q < inner; q++) move(d + q, s + q);
      }
    }
  };

  private readonly indexAddRows: IndexAddRowsKernel = (
    out,
    base,
    src,
    index,
    outer,
    S,
    inner,
    alpha,
    skip,
    bad,
  ) => {
    const idx = this.indexValues(index);
    if (this.report(bad, firstBad(idx, S))) return;
    const L = idx.length;
    // the positions adding into each target row, in increasing order (rows equal to skip add nothing)
    const rows: number[][] = Array.from({ length: S }, () => []);
    for (let i = 0; i < L; i++) if (idx[i] !== skip) rows[idx[i]].push(i);
    const single = inFloat(out.dtype);
    const r: Round = single ? Math.fround : keep;
    const fm = single ? fmaF : fma;
    const al = r(alpha);
    const O = this.acc(out);
    const B = base ? this.acc(base) : null;
    const Sx = this.acc(src);
    const fromBase = base ? rawCopier(this.buf(out), this.buf(base), out.dtype) : null;
    const zero = rawZeroer(this.buf(out), out.dtype);
    // the accumulator has the compute type: float32 additions for the 16/32-bit floats
    const acc = single ? new Float32Array(inner) : new Float64Array(inner);
    for (let o = 0; o < outer; o++) {
      for (let s = 0; s < S; s++) {
        const dst = out.offset + (o * S + s) * inner;
        const bRow = base ? base.offset + (o * S + s) * inner : 0;
        if (rows[s].length === 0) {
          for (let j = 0; j < inner; j++) {
            if (fromBase) fromBase(dst + j, bRow + j);
            else zero(dst + j);
          }
          continue;
        }
        acc.fill(0);
        for (const i of rows[s]) {
          const sRow = src.offset + (o * L + i) * inner;
          for (let j = 0; j < inner; j++) acc[j] += Sx.ld(sRow + j);
        }
        // base + alpha * sum, the multiply-add fused as compiled
        for (let j = 0; j < inner; j++) O.st(dst + j, B ? fm(al, acc[j], B.ld(bRow + j)) : r(al * acc[j]));
      }
    }
  };

  private readonly gatherAlong: GatherAlongKernel = (out, x, index, dim, bad) => {
    const idx = this.indexValues(index);
    if (this.report(bad, firstBad(idx, x.shape[dim]))) return;
    const oo = offsets(index.shape, out.strides, out.offset);
    const xs = [...x.strides];
    xs[dim] = 0; // the coordinate along dim comes from the index
    const ox = offsets(index.shape, xs, x.offset);
    const step = x.strides[dim];
    const move = rawCopier(this.buf(out), this.buf(x), x.dtype);
    for (let k = 0; k < idx.length; k++) move(oo[k], ox[k] + idx[k] * step);
  };

  private readonly scatterAddAlong: ScatterAddAlongKernel = (out, src, index, dim, alpha, bad) => {
    const idx = this.indexValues(index);
    if (this.report(bad, firstBad(idx, out.shape[dim]))) return;
    const single = inFloat(out.dtype);
    const fm = single ? fmaF : fma;
    const al = single ? Math.fround(alpha) : alpha;
    const os = [...out.strides];
    os[dim] = 0;
    const oo = offsets(index.shape, os, out.offset);
    const osrc = offsets(index.shape, src.strides, src.offset);
    const step = out.strides[dim];
    const O = this.acc(out);
    const Sx = this.acc(src);
    // row-major order: along each line (fixed coordinates outside dim) in increasing index position
    for (let k = 0; k < idx.length; k++) {
      const at = oo[k] + idx[k] * step;
      O.st(at, fm(al, Sx.ld(osrc[k]), O.ld(at))); // out += alpha * src, fused as compiled
    }
  };

  private readonly topk: TopkKernel = (values, indices, x, outer, R, inner, k, largest) => {
    if (k < 0 || k > R) throw new Error('topk: k out of range');
    if (k === 0 || outer * inner === 0) return;
    const X = this.acc(x);
    const I = this.acc(indices);
    const move = rawCopier(this.buf(values), this.buf(x), x.dtype);
    const vals = new Float64Array(R);
    const order = Array.from({ length: R }, (_, r) => r);
    // NaN ranks above every number; equal values keep the lower position first
    const rank = (p: number, q: number): number => {
      const a = vals[p];
      const b = vals[q];
      const an = Number.isNaN(a);
      const bn = Number.isNaN(b);
      if (an || bn) return an && bn ? p - q : an === largest ? -1 : 1;
      if (a !== b) return (largest ? a > b : a < b) ? -1 : 1;
      return p - q;
    };
    for (let j = 0; j < outer * inner; j++) {
      const o = Math.floor(j / inner);
      const i = j % inner;
      const line = x.offset + o * R * inner + i;
      for (let r = 0; r < R; r++) {
        vals[r] = X.ld(line + r * inner);
        order[r] = r;
      }
      order.sort(rank);
      for (let q = 0; q < k; q++) {
        const at = o * k * inner + q * inner + i;
        move(values.offset + at, line + order[q] * inner); // the stored value, bit for bit
        I.st(indices.offset + at, order[q]);
      }
    }
  };

  private readonly triangle: TriangleKernel = (out, x, diagonal, upper) => {
    const nd = x.ndim;
    if (nd < 2) throw new Error('triangle: needs at least 2 dimensions');
    const M = x.shape[nd - 2];
    const N = x.shape[nd - 1];
    const ox = offsets(x.shape, x.strides, x.offset);
    const oo = offsets(x.shape, out.strides, out.offset);
    const move = rawCopier(this.buf(out), this.buf(x), x.dtype);
    const zero = rawZeroer(this.buf(out), out.dtype);
    for (let e = 0; e < ox.length; e++) {
      const j = e % N;
      const i = Math.floor(e / N) % M;
      if (upper ? j - i >= diagonal : j - i <= diagonal) move(oo[e], ox[e]);
      else zero(oo[e]);
    }
  };

  private readonly oneHot: OneHotKernel = (out, index, classes, bad) => {
    const idx = this.indexValues(index);
    if (this.report(bad, firstBad(idx, classes))) return;
    const O = this.acc(out); // int64, zero-filled by the caller
    for (let i = 0; i < idx.length; i++) O.st(out.offset + i * classes + idx[i], 1);
  };
}

/** A rejected index: its flat position in the (contiguous) index tensor and its value. */
type RejectedIndex = readonly [position: number, value: number];

/** The first index outside [0, size) as [position, value], or undefined. No negative indexing. */
function firstBad(idx: Float64Array, size: number): RejectedIndex | undefined {
  for (let i = 0; i < idx.length; i++) {
    const v = idx[i];
    if (v < 0 || v >= size) return [i, v];
  }
  return undefined;
}

/** One reduction line: R elements from `start` with `stride`; value (and index for max/min). */
function reduceLine(
  ld: (i: number) => number,
  start: number,
  R: number,
  stride: number,
  op: ReduceOp,
  p: number,
  res: { value: number; index: number },
): void {
  res.index = 0;
  switch (op) {
    case 'sum':
    case 'mean': {
      let s = 0;
      for (let r = 0; r < R; r++) s += ld(start + r * stride);
      res.value = op === 'mean' ? s / R : s;
      return;
    }
    case 'prod': {
      let s = 1;
      for (let r = 0; r < R; r++) s *= ld(start + r * stride);
      res.value = s;
      return;
    }
    case 'max':
    case 'argmax':
    case 'min':
    case 'argmin': {
      // the first extreme wins ties; the first NaN wins outright, as in torch
      const isMax = op === 'max' || op === 'argmax';
      let best = ld(start);
      let bi = 0;
      if (!Number.isNaN(best)) {
        for (let r = 1; r < R; r++) {
          const v = ld(start + r * stride);
          if (Number.isNaN(v)) {
            best = v;
            bi = r;
            break;
          }
          if (isMax ? v > best : v < best) {
            best = v;
            bi = r;
          }
        }
      }
      res.value = best;
      res.index = bi;
      return;
    }
    case 'var': {
      // two passes in double; p is the correction (1 = unbiased)
      let s = 0;
      for (let r = 0; r < R; r++) s += ld(start + r * stride);
      const mean = s / R;
      let ss = 0;
      for (let r = 0; r < R; r++) {
        const d = ld(start + r * stride) - mean;
        ss += d * d;
      }
      const denom = R - p;
      res.value = denom > 0 ? ss / denom : Number.NaN;
      return;
    }
    case 'logsumexp': {
      let m = Number.NEGATIVE_INFINITY;
      for (let r = 0; r < R; r++) {
        const v = ld(start + r * stride);
        if (v > m || Number.isNaN(v)) m = v;
      }
      if (!Number.isFinite(m)) {
        res.value = m; // all -inf, any +inf, or NaN
        return;
      }
      let s = 0;
      for (let r = 0; r < R; r++) s += Math.exp(ld(start + r * stride) - m);
      res.value = m + Math.log(s);
      return;
    }
    case 'norm': {
      let s = 0;
      if (p === 2) {
        for (let r = 0; r < R; r++) {
          const v = ld(start + r * stride);
          s += v * v;
        }
        res.value = Math.sqrt(s);
      } else if (p === 1) {
        for (let r = 0; r < R; r++) s += Math.abs(ld(start + r * stride));
        res.value = s;
      } else if (p === Number.POSITIVE_INFINITY || p === Number.NEGATIVE_INFINITY) {
        // std::fmax: a NaN element is skipped, not propagated
        for (let r = 0; r < R; r++) {
          const a = Math.abs(ld(start + r * stride));
          if (a > s) s = a;
        }
        res.value = s;
      } else {
        for (let r = 0; r < R; r++) s += Math.abs(ld(start + r * stride)) ** p;
        res.value = s ** (1 / p);
      }
      return;
    }
  }
  throw new Error(`unknown reduction ${String(op)}`);
}

// ---- registration ------------------------------------------------------------------------------

export interface ReferenceBackendOptions {
  /** Device type name (default "ref": devices "ref:0", "ref:1", …). */
  type?: string;
  /** Number of devices (default 2). */
  deviceCount?: number;
  /**
   * Behave as an asynchronous device (a GPU stream): checks that need a kernel's result are
   * queued until the next host read instead of thrown by the op (default false).
   */
  asynchronous?: boolean;
}

/** The reference backend as a device type: each index is a device with its own memory. */
export function createReferenceBackendType(options: ReferenceBackendOptions = {}): BackendType {
  const type = options.type ?? 'ref';
  const count = options.deviceCount ?? 2;
  return {
    type,
    deviceCount: () => count,
    create(index: number): Backend {
      if (!(Number.isInteger(index) && index >= 0 && index < count)) {
        throw new Error(`${type}: no device ${index} (${count} devices)`);
      }
      // typed arrays use the host's byte order; tensors' bytes are little-endian
      if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
        throw new Error(`${type}: the reference backend needs a little-endian host`);
      }
      return new ReferenceBackend(`${type}:${index}`, index, !(options.asynchronous ?? false));
    },
  };
}

/** Registers the reference backend's device type ("ref:0", "ref:1" by default). */
export function registerReferenceBackend(options: ReferenceBackendOptions = {}): void {
  registerBackendType(createReferenceBackendType(options));
}
