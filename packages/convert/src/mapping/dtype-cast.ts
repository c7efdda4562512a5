// Exact conversion of raw little-endian tensor bytes between floating-point dtypes, and block-scaled
// FP8 dequantization. Every rounding is a single round-to-nearest-even from the source value.
// Hot loops work on integer views of the bits; 16-bit and 8-bit sources use lookup tables that are
// built on first use. Assumes a little-endian host, like `typedView`.
import { ConvertError } from '../errors.js';
import { DTYPE_SIZE, type SafetensorsDtype } from '../safetensors/dtype.js';

/** Floating-point dtypes the converter can cast between. */
export type FloatDtype = 'F64' | 'F32' | 'F16' | 'BF16' | 'F8_E4M3' | 'F8_E5M2';

type Fp8Dtype = 'F8_E4M3' | 'F8_E5M2';
type Half = 'F16' | 'BF16';
type Target = 'F64' | 'F32' | Half;

const FLOAT_DTYPES: ReadonlySet<string> = new Set<FloatDtype>([
  'F64',
  'F32',
  'F16',
  'BF16',
  'F8_E4M3',
  'F8_E5M2',
]);

/** True for the dtypes {@link castElements} can read (all of {@link FloatDtype}). */
export function isFloatDtype(d: SafetensorsDtype): d is FloatDtype {
  return FLOAT_DTYPES.has(d);
}

const prefix = (where?: string): string => (where ? `${where}: ` : '');

// ---------------------------------------------------------------------------------------------
// Scalar bit conversions (also used to build the tables)

/** F32 bits to BF16 bits: RNE via the carry of `+ 0x7fff + lsb`, NaN kept quiet with its sign. */
function f32BitsToBf16(u: number): number {
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  return (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
}

/** F32 bits to F16 bits, RNE; overflow gives ±Inf, subnormal results are rounded exactly. */
function f32BitsToF16(u: number): number {
  const sign = (u >>> 16) & 0x8000;
  const a = u & 0x7fffffff;
  if (a >= 0x38800000) {
    // Normal F16 range: rebias the exponent (127 -> 15) and round off 13 mantissa bits; a carry
    // moves into the exponent, up to 0x7c00 (Inf) for values from 65520 on.
    if (a < 0x47800000) return sign | ((a - 0x38000000 + 0xfff + ((a >>> 13) & 1)) >>> 13);
    if (a > 0x7f800000) return sign | 0x7e00 | ((a >>> 13) & 0x3ff);
    return sign | 0x7c00;
  }
  // |x| <= 2^-25 rounds to zero (2^-25 itself is a tie, and 0 is even).
  if (a <= 0x33000000) return sign;
  // Subnormal F16: count of 2^-24 units is m * 2^(e - 126) with the implicit bit in m.
  const e = a >>> 23;
  const m = (a & 0x7fffff) | 0x800000;
  const shift = 126 - e; // 14..24
  let r = m >>> shift;
  const rem = m & ((1 << shift) - 1);
  const half = 1 << (shift - 1);
  if (rem > half || (rem === half && (r & 1) !== 0)) r++;
  return sign | r;
}

/** F16 bits to F32 bits (exact); NaN is quieted, keeping sign and payload. */
function f16BitsToF32(h: number): number {
  const sign = (h & 0x8000) << 16;
  const e = (h >>> 10) & 0x1f;
  let m = h & 0x3ff;
  if (e === 31) return (sign | (m === 0 ? 0x7f800000 : 0x7fc00000 | (m << 13))) >>> 0;
  if (e !== 0) return (sign | ((e + 112) << 23) | (m << 13)) >>> 0;
  if (m === 0) return sign >>> 0;
  let exp = 113; // a subnormal m * 2^-24 is normalized to 1.f * 2^(exp - 127)
  while ((m & 0x400) === 0) {
    m <<= 1;
    exp--;
  }
  return (sign | (exp << 23) | ((m & 0x3ff) << 13)) >>> 0;
}

/** BF16 bits to F32 bits (exact); NaN is quieted. */
function bf16BitsToF32(b: number): number {
  return ((b & 0x7fff) > 0x7f80 ? (b << 16) | 0x400000 : b << 16) >>> 0;
}

/** Decodes one element of an fp8 dtype to a JS number (exact). */
export function fp8ToNumber(byte: number, dtype: 'F8_E4M3' | 'F8_E5M2'): number {
  if (!Number.isInteger(byte) || byte < 0 || byte > 255) {
    throw new ConvertError('INVALID_ARGUMENT', `fp8 byte must be an integer in 0..255, got ${byte}`);
  }
  const sign = byte & 0x80 ? -1 : 1;
  if (dtype === 'F8_E4M3') {
    // "fn" variant: bias 7, no infinities, only S.1111.111 is NaN.
    const e = (byte >>> 3) & 0xf;
    const m = byte & 7;
    if (e === 15 && m === 7) return Number.NaN;
    return sign * (e === 0 ? m * 2 ** -9 : (8 + m) * 2 ** (e - 10));
  }
  if (dtype === 'F8_E5M2') {
    // IEEE-like: bias 15, exponent 31 holds Inf and NaN.
    const e = (byte >>> 2) & 0x1f;
    const m = byte & 3;
    if (e === 31) return m === 0 ? sign * Number.POSITIVE_INFINITY : Number.NaN;
    return sign * (e === 0 ? m * 2 ** -16 : (4 + m) * 2 ** (e - 17));
  }
  throw new ConvertError('INVALID_ARGUMENT', `${String(dtype)} is not an fp8 dtype`);
}

// ---------------------------------------------------------------------------------------------
// Lookup tables, built on first use

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

let f16ToF32Table: Uint32Array | undefined;
function f16ToF32Bits(): Uint32Array {
  if (!f16ToF32Table) {
    f16ToF32Table = new Uint32Array(65536);
    for (let h = 0; h < 65536; h++) f16ToF32Table[h] = f16BitsToF32(h);
  }
  return f16ToF32Table;
}

/** Bits of a 16-bit source word as F32 bits (exact). */
const half16ToF32 = (from: Half, w: number): number => (from === 'F16' ? f16BitsToF32(w) : bf16BitsToF32(w));

const table16Cache = new Map<string, Uint16Array>();
/** Word-to-word table between F16 and BF16 (exact widening to F32, then one rounding). */
function table16(from: Half, to: Half): Uint16Array {
  const key = `${from}>${to}`;
  let t = table16Cache.get(key);
  if (!t) {
    t = new Uint16Array(65536);
    const round = to === 'F16' ? f32BitsToF16 : f32BitsToBf16;
    for (let w = 0; w < 65536; w++) t[w] = round(half16ToF32(from, w));
    table16Cache.set(key, t);
  }
  return t;
}

const tableF64Cache = new Map<string, Float64Array>();
/** Values of all 65536 words of a 16-bit float dtype. */
function tableF64(from: Half): Float64Array {
  let t = tableF64Cache.get(from);
  if (!t) {
    t = new Float64Array(65536);
    for (let w = 0; w < 65536; w++) {
      u32Scratch[0] = half16ToF32(from, w);
      t[w] = f32Scratch[0];
    }
    tableF64Cache.set(from, t);
  }
  return t;
}

const fp8Cache = new Map<string, Float64Array | Float32Array | Uint16Array>();
/** 256-entry table from fp8 bytes to `to` elements (always exact: both fp8 formats fit F16 and BF16). */
function fp8Table(dtype: Fp8Dtype, to: 'F64'): Float64Array;
function fp8Table(dtype: Fp8Dtype, to: 'F32'): Float32Array;
function fp8Table(dtype: Fp8Dtype, to: Half): Uint16Array;
function fp8Table(dtype: Fp8Dtype, to: Target): Float64Array | Float32Array | Uint16Array;
function fp8Table(dtype: Fp8Dtype, to: Target): Float64Array | Float32Array | Uint16Array {
  const key = `${dtype}>${to}`;
  let t = fp8Cache.get(key);
  if (!t) {
    const values = new Float32Array(256);
    for (let b = 0; b < 256; b++) values[b] = fp8ToNumber(b, dtype);
    if (to === 'F32') t = values;
    else if (to === 'F64') t = Float64Array.from(values);
    else {
      const bits = new Uint32Array(values.buffer);
      const round = to === 'F16' ? f32BitsToF16 : f32BitsToBf16;
      t = new Uint16Array(256);
      for (let b = 0; b < 256; b++) t[b] = round(bits[b]);
    }
    fp8Cache.set(key, t);
  }
  return t;
}

// ---------------------------------------------------------------------------------------------
// Bulk kernels (dst and src have the same element count)

function f32ToBf16(src: Int32Array, dst: Uint16Array): void {
  const n = dst.length;
  for (let i = 0; i < n; i++) {
    const u = src[i];
    dst[i] = (u & 0x7fffffff) > 0x7f800000 ? (u >>> 16) | 0x40 : (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
  }
}

function f32ToF16(src: Int32Array, dst: Uint16Array): void {
  const n = dst.length;
  for (let i = 0; i < n; i++) {
    const u = src[i];
    const a = u & 0x7fffffff;
    // The common normal case inline, everything else through the scalar function.
    dst[i] =
      a >= 0x38800000 && a < 0x47800000
        ? ((u >>> 16) & 0x8000) | ((a - 0x38000000 + 0xfff + ((a >>> 13) & 1)) >>> 13)
        : f32BitsToF16(u);
  }
}

function bf16ToF32(src: Uint16Array, dst: Int32Array): void {
  const n = dst.length;
  for (let i = 0; i < n; i++) {
    const b = src[i];
    dst[i] = (b & 0x7fff) > 0x7f80 ? (b << 16) | 0x400000 : b << 16;
  }
}

function lookup16(
  src: Uint16Array,
  dst: Uint16Array | Uint32Array | Float64Array,
  t: ArrayLike<number>,
): void {
  const n = dst.length;
  for (let i = 0; i < n; i++) dst[i] = t[src[i]];
}

function lookup8(
  src: Uint8Array,
  dst: Uint16Array | Float32Array | Float64Array,
  t: ArrayLike<number>,
): void {
  const n = dst.length;
  for (let i = 0; i < n; i++) dst[i] = t[src[i]];
}

function copyValues(src: Float32Array | Float64Array, dst: Float32Array | Float64Array): void {
  const n = dst.length;
  for (let i = 0; i < n; i++) dst[i] = src[i];
}

const TWO52 = 2 ** 52;

// F64 -> BF16/F16 round once from the float64 bits. Going through F32 would round twice: a value
// just above a BF16 (or F16) halfway point can become exactly the halfway point in F32 and then
// round down to even, so these kernels never do that.
// `w` holds the float64 words (lo, hi) and `v` the same memory as numbers.
function f64ToHalf(w: Uint32Array, v: Float64Array, dst: Uint16Array, to: Half): void {
  const n = dst.length;
  // Per target: mantissa bits dropped from the high word, rebias offset, normal and Inf thresholds
  // of the high word, and the scale that turns a subnormal into a count of its smallest units.
  const bf = to === 'BF16';
  const drop = bf ? 13 : 10;
  const halfUlp = (1 << (drop - 1)) - 1;
  const rebias = bf ? (1023 - 127) << 20 : (1023 - 15) << 20;
  const minNormal = bf ? (1023 - 126) << 20 : (1023 - 14) << 20;
  const infFrom = bf ? (1023 + 128) << 20 : (1023 + 16) << 20;
  const subScale = bf ? 2 ** 133 : 2 ** 24;
  const expMask = bf ? 0x7f80 : 0x7c00;
  const quiet = bf ? 0x40 : 0x200;
  const mantMask = bf ? 0x7f : 0x3ff;
  for (let i = 0; i < n; i++) {
    const lo = w[2 * i];
    const hi = w[2 * i + 1];
    const sign = (hi >>> 16) & 0x8000;
    const a = hi & 0x7fffffff;
    let r: number;
    if (a >= minNormal && a < infFrom) {
      // Round off `drop` bits of the high word plus the whole low word (sticky).
      const x = a - rebias;
      r = (x + halfUlp + (((x >>> drop) & 1) | (lo !== 0 ? 1 : 0))) >>> drop;
    } else if (a < minNormal) {
      // |v| * scale < 2^10 is exact; adding and removing 2^52 rounds it to an integer, ties to even.
      r = Math.abs(v[i]) * subScale + TWO52 - TWO52;
    } else if (a > 0x7ff00000 || (a === 0x7ff00000 && lo !== 0)) {
      r = expMask | quiet | ((a >>> drop) & mantMask);
    } else {
      r = expMask;
    }
    dst[i] = sign | r;
  }
}

// ---------------------------------------------------------------------------------------------
// Public API

/** `data` as a view whose byte offset is a multiple of `size` (copied when it is not). */
function aligned(data: Uint8Array, size: number): Uint8Array {
  return data.byteOffset % size === 0 ? data : data.slice();
}

const view16 = (b: Uint8Array) => new Uint16Array(b.buffer, b.byteOffset, b.byteLength >>> 1);
const viewI32 = (b: Uint8Array) => new Int32Array(b.buffer, b.byteOffset, b.byteLength >>> 2);
const viewU32 = (b: Uint8Array) => new Uint32Array(b.buffer, b.byteOffset, b.byteLength >>> 2);
const viewF32 = (b: Uint8Array) => new Float32Array(b.buffer, b.byteOffset, b.byteLength >>> 2);
const viewF64 = (b: Uint8Array) => new Float64Array(b.buffer, b.byteOffset, b.byteLength >>> 3);

/**
 * Converts little-endian elements `data` (dtype `from`) to dtype `to`: round to nearest, ties to
 * even, rounding once from the source value; NaN stays NaN (made quiet, sign kept), ±Inf and ±0
 * are kept, overflow gives ±Inf for F16/BF16/F32 targets, subnormals are exact.
 * `from === to` returns `data` itself (no copy); otherwise the result is a new, aligned buffer.
 * Casting to F8_* or from/to a non-float dtype (ints, BOOL, F8_E8M0, C64) throws
 * ConvertError('UNSUPPORTED'); a byte length that is not a whole number of elements throws
 * ConvertError('INVALID_ARGUMENT'). F8_E4M3 is the "fn" variant (bias 7, no Inf, S.1111.111 = NaN,
 * max 448); F8_E5M2 has bias 15 with IEEE Inf/NaN (max 57344).
 * `where` (for example a tensor name) prefixes error messages.
 */
export function castElements(
  data: Uint8Array,
  from: SafetensorsDtype,
  to: SafetensorsDtype,
  where?: string,
): Uint8Array {
  const inSize = DTYPE_SIZE[from];
  const outSize = DTYPE_SIZE[to];
  if (inSize === undefined || outSize === undefined) {
    throw new ConvertError('INVALID_ARGUMENT', `${prefix(where)}unknown dtype in cast ${from} -> ${to}`);
  }
  if (data.byteLength % inSize !== 0) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `${prefix(where)}${data.byteLength} bytes is not a whole number of ${from} elements (${inSize} bytes each)`,
    );
  }
  if (from === to) return data;
  if (!isFloatDtype(from) || !isFloatDtype(to)) {
    throw new ConvertError(
      'UNSUPPORTED',
      `${prefix(where)}cannot cast ${from} to ${to}: only floating-point dtypes can be cast`,
    );
  }
  if (to === 'F8_E4M3' || to === 'F8_E5M2') {
    throw new ConvertError(
      'UNSUPPORTED',
      `${prefix(where)}cannot cast ${from} to ${to}: casting to fp8 is not supported`,
    );
  }
  const src = aligned(data, inSize);
  const n = src.byteLength / inSize;
  const out = new Uint8Array(n * outSize);
  switch (from) {
    case 'F8_E4M3':
    case 'F8_E5M2': {
      const t = fp8Table(from, to);
      const dst = to === 'F64' ? viewF64(out) : to === 'F32' ? viewF32(out) : view16(out);
      lookup8(src, dst, t);
      break;
    }
    case 'F16':
    case 'BF16': {
      const s = view16(src);
      if (to === 'F32') {
        if (from === 'BF16') bf16ToF32(s, viewI32(out));
        else lookup16(s, viewU32(out), f16ToF32Bits());
      } else if (to === 'F64') lookup16(s, viewF64(out), tableF64(from));
      else lookup16(s, view16(out), table16(from, to));
      break;
    }
    case 'F32': {
      if (to === 'BF16') f32ToBf16(viewI32(src), view16(out));
      else if (to === 'F16') f32ToF16(viewI32(src), view16(out));
      else copyValues(viewF32(src), viewF64(out));
      break;
    }
    case 'F64': {
      // Float32Array stores round to nearest, ties to even (ECMAScript ToFloat32): one rounding.
      if (to === 'F32') copyValues(viewF64(src), viewF32(out));
      else if (to !== 'F64') f64ToHalf(viewU32(src), viewF64(src), view16(out), to);
      break;
    }
  }
  return out;
}

function checkInt(name: string, v: number, min: number): void {
  if (!Number.isSafeInteger(v) || v < min) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `dequantizeFp8Blocks: ${name} must be an integer >= ${min}, got ${v}`,
    );
  }
}

/**
 * Dequantizes rows [rowStart, rowStart + rows) of an FP8 weight stored with block scales, as
 * DeepSeek-V3 checkpoints do (`W.weight` F8_E4M3 [R, C] + `W.weight_scale_inv` [ceil(R/b0), ceil(C/b1)]):
 * out[i][j] = float32(fp8(i,j)) * scaleInv[floor(i/b0)][floor(j/b1)] computed in float32, then
 * rounded to `to` (RNE). `data` holds exactly those `rows` rows (rows*cols bytes). Since only this
 * chunk is known, the check is that the scale rows it needs exist and scaleShape[1] === ceil(cols/b1);
 * mismatches throw ConvertError('SHAPE_MISMATCH'), bad arguments ConvertError('INVALID_ARGUMENT').
 */
export function dequantizeFp8Blocks(opts: {
  data: Uint8Array;
  dtype: 'F8_E4M3' | 'F8_E5M2';
  rowStart: number;
  rows: number;
  cols: number;
  /** the full scale tensor, row-major */
  scaleInv: Float32Array;
  scaleShape: [number, number];
  blockSize: [number, number];
  to: 'BF16' | 'F16' | 'F32';
}): Uint8Array {
  const { data, dtype, rowStart, rows, cols, scaleInv, scaleShape, blockSize, to } = opts;
  if (dtype !== 'F8_E4M3' && dtype !== 'F8_E5M2') {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `dequantizeFp8Blocks: dtype must be F8_E4M3 or F8_E5M2, got ${dtype}`,
    );
  }
  if (to !== 'BF16' && to !== 'F16' && to !== 'F32') {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `dequantizeFp8Blocks: target must be BF16, F16 or F32, got ${to}`,
    );
  }
  checkInt('rowStart', rowStart, 0);
  checkInt('rows', rows, 0);
  checkInt('cols', cols, 1);
  const [b0, b1] = blockSize;
  checkInt('blockSize[0]', b0, 1);
  checkInt('blockSize[1]', b1, 1);
  const [sr, sc] = scaleShape;
  checkInt('scaleShape[0]', sr, 0);
  checkInt('scaleShape[1]', sc, 0);
  if (data.byteLength !== rows * cols) {
    throw new ConvertError(
      'SHAPE_MISMATCH',
      `dequantizeFp8Blocks: ${rows} rows x ${cols} cols of ${dtype} need ${rows * cols} bytes, got ${data.byteLength}`,
    );
  }
  if (scaleInv.length !== sr * sc) {
    throw new ConvertError(
      'SHAPE_MISMATCH',
      `dequantizeFp8Blocks: scale shape [${sr},${sc}] needs ${sr * sc} values, got ${scaleInv.length}`,
    );
  }
  const colBlocks = Math.ceil(cols / b1);
  if (sc !== colBlocks) {
    throw new ConvertError(
      'SHAPE_MISMATCH',
      `dequantizeFp8Blocks: ${cols} cols in blocks of ${b1} need ${colBlocks} scale columns, scale shape is [${sr},${sc}]`,
    );
  }
  if (rows > 0) {
    const lastBlock = Math.floor((rowStart + rows - 1) / b0);
    if (lastBlock >= sr) {
      throw new ConvertError(
        'SHAPE_MISMATCH',
        `dequantizeFp8Blocks: rows ${rowStart}..${rowStart + rows - 1} in blocks of ${b0} need scale row ${lastBlock}, scale shape is [${sr},${sc}]`,
      );
    }
  }

  const values = fp8Table(dtype, 'F32');
  const out = new Uint8Array(rows * cols * DTYPE_SIZE[to]);
  const out32 = to === 'F32' ? viewF32(out) : undefined;
  const out16 = to === 'F32' ? undefined : view16(out);
  // One row of float32 products; a Float32Array store rounds the (exact) double product once.
  const row = out32 ?? new Float32Array(cols);
  const rowBits = out16 ? new Int32Array(row.buffer, row.byteOffset, cols) : undefined;
  for (let r = 0; r < rows; r++) {
    const sBase = Math.floor((rowStart + r) / b0) * sc;
    const inBase = r * cols;
    const outBase = out32 ? inBase : 0;
    for (let cb = 0, j0 = 0; j0 < cols; cb++, j0 += b1) {
      const s = scaleInv[sBase + cb];
      const j1 = Math.min(cols, j0 + b1);
      for (let j = j0; j < j1; j++) row[outBase + j] = values[data[inBase + j]] * s;
    }
    if (out16 && rowBits) {
      const dst = out16.subarray(inBase, inBase + cols);
      if (to === 'BF16') f32ToBf16(rowBits, dst);
      else f32ToF16(rowBits, dst);
    }
  }
  return out;
}
