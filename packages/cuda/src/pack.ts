// The argument buffer of the CUDA addon (native/src/backend/glue.h reads it): the calling
// convention of @megapatch/tensor's native backends (@megapatch/tensor/abi). A tensor is written as
// (device address of element 0 of its view, dtype code, ndim, shape..., strides...); device
// addresses are exact in a double.
import type { Tensor } from '@megapatch/tensor';
import { createPacker, ITEMSIZE } from '@megapatch/tensor/abi';

export { ITEMSIZE };

/**
 * What the kernel profiler (profile.ts) learns about the entry being packed, while `active`: the
 * bytes of its tensor operands (each view's distinct elements: broadcast dimensions count once),
 * the FLOPs of its GEMMs (noteGemm), and a tag naming the operation within the entry (the unary or
 * binary op), and with `shapes` the first tensor operand's dtype and shape. `pack.begin()` clears it.
 */
export const note = { active: false, shapes: false, bytes: 0, flops: 0, tag: '', shape: '' };

const packer = createPacker();
const begin = packer.begin;
const tensor = packer.tensor;
packer.begin = () => {
  if (note.active) {
    note.bytes = 0;
    note.flops = 0;
    note.tag = '';
    note.shape = '';
  }
  return begin();
};
packer.tensor = (t: Tensor) => {
  if (note.active) {
    let n = ITEMSIZE[t.dtype];
    for (let i = 0; i < t.shape.length; i++) if (t.strides[i] !== 0) n *= t.shape[i];
    note.bytes += n;
    if (note.shapes && !note.shape) note.shape = `${t.dtype}[${t.shape.join(',')}]`;
  }
  return tensor(t);
};

/** Writes an entry's arguments: `pack.begin()`, then `tensor()` / `num()`, then call the entry. */
export const pack = packer;

/** For the profiler: a GEMM C [M, N] = A [M, K] · B [K, N] (batch of them) of the packed entry. */
export function noteGemm(M: number, N: number, K: number, itemsize: number, batch = 1): void {
  if (!note.active) return;
  note.flops += 2 * batch * M * N * K;
  note.bytes += batch * (M * K + K * N + M * N) * itemsize;
}

/** The buffer the addon reads its arguments from. */
export const ARGS = pack.args;

/** Device address of element 0 of a tensor's view. */
export const address = pack.address;

/** The addon's entries, called after `pack` wrote their arguments. */
export type Entries = Record<string, () => unknown>;
