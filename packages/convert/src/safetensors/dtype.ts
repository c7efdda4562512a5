import { ConvertError } from '../errors.js';

/** Element types of the safetensors format that have a whole number of bytes per element. */
export type SafetensorsDtype =
  | 'BOOL'
  | 'U8'
  | 'I8'
  | 'F8_E5M2'
  | 'F8_E4M3'
  | 'F8_E8M0'
  | 'I16'
  | 'U16'
  | 'F16'
  | 'BF16'
  | 'I32'
  | 'U32'
  | 'F32'
  | 'C64'
  | 'I64'
  | 'U64'
  | 'F64';

/** Bytes per element of each dtype; also its alignment, which orders tensors on write. */
export const DTYPE_SIZE: Readonly<Record<SafetensorsDtype, number>> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  F8_E8M0: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  C64: 8,
  I64: 8,
  U64: 8,
  F64: 8,
};

// Published dtypes that pack several elements in a byte: known, but rejected with a clearer
// message than "unknown dtype" because a byte length cannot be derived per element.
const SUB_BYTE_DTYPES = new Set(['F4', 'F6_E2M3', 'F6_E3M2']);

/** True when `s` is a dtype this package reads and writes. */
export function isSafetensorsDtype(s: unknown): s is SafetensorsDtype {
  return typeof s === 'string' && Object.hasOwn(DTYPE_SIZE, s);
}

/** Checks a dtype string, throwing CORRUPT_FILE (unknown) or UNSUPPORTED (sub-byte) naming `where`. */
export function checkDtype(s: unknown, where: string, file?: string): SafetensorsDtype {
  if (isSafetensorsDtype(s)) return s;
  if (typeof s === 'string' && SUB_BYTE_DTYPES.has(s)) {
    throw new ConvertError('UNSUPPORTED', `${where} has sub-byte dtype ${s}, which is not supported`, file);
  }
  throw new ConvertError('CORRUPT_FILE', `${where} has unknown dtype ${JSON.stringify(s)}`, file);
}

/** Number of elements of a shape (1 for a 0-d scalar); throws past 2^53. */
export function numelOf(shape: readonly number[], where = 'tensor', file?: string): number {
  let n = 1;
  for (const d of shape) n *= d;
  if (!Number.isSafeInteger(n)) {
    throw new ConvertError('CORRUPT_FILE', `${where} shape [${shape.join(',')}] is too large`, file);
  }
  return n;
}

/** Byte length of a tensor of `dtype` and `shape`. */
export function byteLengthOf(dtype: SafetensorsDtype, shape: readonly number[], where?: string): number {
  const n = numelOf(shape, where) * DTYPE_SIZE[dtype];
  if (!Number.isSafeInteger(n)) throw new ConvertError('CORRUPT_FILE', `${where ?? 'tensor'} is too large`);
  return n;
}

/** Typed view types returned by {@link typedView}. */
export type TypedTensorArray =
  | Uint8Array
  | Int8Array
  | Uint16Array
  | Int16Array
  | Uint32Array
  | Int32Array
  | Float32Array
  | Float64Array
  | BigInt64Array
  | BigUint64Array;

/**
 * A typed array over raw little-endian tensor bytes (copied when unaligned). BF16, F16 and
 * F8 types stay as raw integer words (Uint16Array / Uint8Array) since JS has no such floats;
 * C64 is a Float32Array of interleaved real/imaginary parts. Assumes a little-endian host.
 */
export function typedView(dtype: SafetensorsDtype, data: Uint8Array): TypedTensorArray {
  const size = DTYPE_SIZE[dtype];
  if (data.byteLength % size !== 0) {
    throw new ConvertError('INVALID_ARGUMENT', `${data.byteLength} bytes is not a whole number of ${dtype}`);
  }
  const bytes = data.byteOffset % size === 0 ? data : data.slice();
  const { buffer, byteOffset } = bytes;
  const n = bytes.byteLength / size;
  switch (dtype) {
    case 'BOOL':
    case 'U8':
    case 'F8_E5M2':
    case 'F8_E4M3':
    case 'F8_E8M0':
      return bytes;
    case 'I8':
      return new Int8Array(buffer, byteOffset, n);
    case 'U16':
    case 'F16':
    case 'BF16':
      return new Uint16Array(buffer, byteOffset, n);
    case 'I16':
      return new Int16Array(buffer, byteOffset, n);
    case 'U32':
      return new Uint32Array(buffer, byteOffset, n);
    case 'I32':
      return new Int32Array(buffer, byteOffset, n);
    case 'F32':
      return new Float32Array(buffer, byteOffset, n);
    case 'C64':
      return new Float32Array(buffer, byteOffset, n * 2);
    case 'I64':
      return new BigInt64Array(buffer, byteOffset, n);
    case 'U64':
      return new BigUint64Array(buffer, byteOffset, n);
    case 'F64':
      return new Float64Array(buffer, byteOffset, n);
  }
}
