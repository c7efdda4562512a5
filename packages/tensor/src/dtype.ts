/** Element types of a tensor, named as in PyTorch. */
export type DType = 'float32' | 'float64' | 'bfloat16' | 'float16' | 'int32' | 'int64' | 'uint8' | 'bool';

export const DTYPES: readonly DType[] = [
  'float32',
  'float64',
  'bfloat16',
  'float16',
  'int32',
  'int64',
  'uint8',
  'bool',
];

/** Codes shared with the native backend (native/src/common.h). */
export const DTYPE_CODES: Record<DType, number> = {
  float32: 0,
  float64: 1,
  bfloat16: 2,
  float16: 3,
  int32: 4,
  int64: 5,
  uint8: 6,
  bool: 7,
};

export const ITEMSIZE: Record<DType, number> = {
  float32: 4,
  float64: 8,
  bfloat16: 2,
  float16: 2,
  int32: 4,
  int64: 8,
  uint8: 1,
  bool: 1,
};

export function isFloating(d: DType): boolean {
  return d === 'float32' || d === 'float64' || d === 'bfloat16' || d === 'float16';
}

export function isIntegral(d: DType): boolean {
  return d === 'int32' || d === 'int64' || d === 'uint8' || d === 'bool';
}

/** The JS typed array used to move data of each dtype in and out (16-bit floats as raw words). */
export type TypedArrayFor = {
  float32: Float32Array;
  float64: Float64Array;
  bfloat16: Uint16Array;
  float16: Uint16Array;
  int32: Int32Array;
  int64: BigInt64Array;
  uint8: Uint8Array;
  bool: Uint8Array;
};
export type AnyTypedArray = TypedArrayFor[DType];

export function typedArrayFor(d: DType, n: number): AnyTypedArray {
  switch (d) {
    case 'float32':
      return new Float32Array(n);
    case 'float64':
      return new Float64Array(n);
    case 'bfloat16':
    case 'float16':
      return new Uint16Array(n);
    case 'int32':
      return new Int32Array(n);
    case 'int64':
      return new BigInt64Array(n);
    default:
      return new Uint8Array(n);
  }
}

// Promotion order for mixed-dtype arithmetic, as in torch.result_type for tensor operands.
const RANK: Record<DType, number> = {
  bool: 0,
  uint8: 1,
  int32: 2,
  int64: 3,
  float16: 4,
  bfloat16: 4,
  float32: 5,
  float64: 6,
};

/** The dtype two tensor operands are computed in (bfloat16 with float16 gives float32). */
export function promoteTypes(a: DType, b: DType): DType {
  if (a === b) return a;
  if ((a === 'bfloat16' && b === 'float16') || (a === 'float16' && b === 'bfloat16')) return 'float32';
  return RANK[a] >= RANK[b] ? a : b;
}

/** The dtype of `tensor OP number`: a float scalar lifts integer tensors to float32. */
export function promoteWithScalar(d: DType, scalar: number): DType {
  if (isFloating(d)) return d;
  if (!Number.isInteger(scalar)) return 'float32';
  return d === 'bool' ? 'int64' : d;
}
