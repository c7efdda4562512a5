// The argument buffer of the CUDA addon (native/src/backend/glue.h reads it): the calling
// convention of @megapatch/tensor's native backends (@megapatch/tensor/abi). A tensor is written as
// (device address of element 0 of its view, dtype code, ndim, shape..., strides...); device
// addresses are exact in a double.
import { createPacker, ITEMSIZE } from '@megapatch/tensor/abi';

export { ITEMSIZE };

/** Writes an entry's arguments: `pack.begin()`, then `tensor()` / `num()`, then call the entry. */
export const pack = createPacker();

/** The buffer the addon reads its arguments from. */
export const ARGS = pack.args;

/** Device address of element 0 of a tensor's view. */
export const address = pack.address;

/** The addon's entries, called after `pack` wrote their arguments. */
export type Entries = Record<string, () => unknown>;
