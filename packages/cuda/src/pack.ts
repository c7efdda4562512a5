// The argument buffer shared with the CUDA addon (native/src/backend/glue.h): JavaScript writes a
// kernel's arguments into one Float64Array and calls the entry with no JS arguments, the same
// convention as the CPU backend of @megapatch/tensor. A tensor is (address of element 0 of the
// view, dtype code, ndim, shape..., strides...); addresses are device pointers, exact in a double.
import type { DType, Tensor } from '@megapatch/tensor';

/** Must match DType in native/src/kernels/common.cuh (and DTYPE_CODES of @megapatch/tensor). */
export const DTYPE_CODE: Record<DType, number> = {
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

export const ARGS = new Float64Array(8192);
let pos = 0;

/**
 * Writes kernel arguments: `pack.begin()`, then `tensor()` / `num()` in the order the native entry
 * reads them, then call the entry with no arguments.
 */
export const pack = {
  begin() {
    pos = 0;
    return pack;
  },
  tensor(t: Tensor) {
    const shape = t.shape;
    const strides = t.strides;
    const nd = shape.length;
    ARGS[pos] = address(t);
    ARGS[pos + 1] = DTYPE_CODE[t.dtype];
    ARGS[pos + 2] = nd;
    for (let i = 0; i < nd; i++) {
      ARGS[pos + 3 + i] = shape[i];
      ARGS[pos + 3 + nd + i] = strides[i];
    }
    pos += 3 + 2 * nd;
    return pack;
  },
  num(v: number) {
    ARGS[pos++] = v;
    return pack;
  },
};

/** Device address of element 0 of a tensor's view. */
export function address(t: Tensor): number {
  return t.storage.address + t.offset * ITEMSIZE[t.dtype];
}

/** The addon's entries, called after `pack` wrote their arguments. */
export type Entries = Record<string, () => unknown>;
