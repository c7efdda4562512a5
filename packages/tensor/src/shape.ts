import { argError, fmtShape, indexError, shapeError } from './errors.js';

export type Shape = readonly number[];

export function numel(shape: Shape): number {
  let n = 1;
  for (const s of shape) n *= s;
  return n;
}

export function contiguousStrides(shape: Shape): number[] {
  const st = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    st[i] = acc;
    acc *= shape[i];
  }
  return st;
}

export function sameShape(a: Shape, b: Shape): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** NumPy/PyTorch broadcasting of two shapes. */
export function broadcastShapes(op: string, a: Shape, b: Shape): number[] {
  if (sameShape(a, b)) return a as number[];
  const n = Math.max(a.length, b.length);
  const out = new Array<number>(n);
  for (let i = 0; i < n; i++) {
    const x = a[a.length - n + i] ?? 1;
    const y = b[b.length - n + i] ?? 1;
    if (x !== y && x !== 1 && y !== 1) {
      throw shapeError(
        op,
        `shapes ${fmtShape(a)} and ${fmtShape(b)} cannot be broadcast (dimension ${i}: ${x} vs ${y})`,
      );
    }
    out[i] = x === 1 ? y : x;
  }
  return out;
}

/** Resolves a possibly negative dimension index against `ndim` dimensions. */
export function normDim(op: string, dim: number, ndim: number): number {
  // a 0-d tensor accepts dims 0 and -1, like torch's maybe_wrap_dim
  const n = Math.max(ndim, 1);
  const d = dim < 0 ? dim + n : dim;
  if (!Number.isInteger(dim) || d < 0 || d >= n) {
    throw indexError(op, `dimension ${dim} is out of range for a tensor with ${ndim} dimensions`);
  }
  return d;
}

/** Resolves a shape containing at most one -1 for a tensor of `n` elements. */
export function inferShape(op: string, shape: Shape, n: number, from: Shape): number[] {
  let infer = -1;
  let known = 1;
  for (let i = 0; i < shape.length; i++) {
    const s = shape[i];
    if (s === -1) {
      if (infer >= 0) throw argError(op, `only one dimension can be -1, got ${fmtShape(shape)}`);
      infer = i;
    } else if (!Number.isInteger(s) || s < 0) {
      throw argError(op, `invalid size ${s} in ${fmtShape(shape)}`);
    } else {
      known *= s;
    }
  }
  const out = [...shape];
  if (infer >= 0) {
    if (known === 0 || n % known !== 0) {
      throw shapeError(
        op,
        `shape ${fmtShape(shape)} is invalid for input ${fmtShape(from)} of ${n} elements`,
      );
    }
    out[infer] = n / known;
  } else if (known !== n) {
    throw shapeError(op, `shape ${fmtShape(shape)} is invalid for input ${fmtShape(from)} of ${n} elements`);
  }
  return out;
}

/**
 * Strides for viewing (shape, strides) as newShape without a copy, or null when the memory
 * layout does not allow it (the rule of torch's computeStride).
 */
export function viewStrides(shape: Shape, strides: readonly number[], newShape: Shape): number[] | null {
  if (numel(shape) === 0 || shape.length === 0) return contiguousStrides(newShape);
  const out = new Array<number>(newShape.length);
  let viewD = newShape.length - 1;
  let chunkBaseStride = strides[strides.length - 1] ?? 1;
  let tensorNumel = 1;
  let viewNumel = 1;
  for (let d = shape.length - 1; d >= 0; d--) {
    tensorNumel *= shape[d];
    if (d === 0 || (shape[d - 1] !== 1 && strides[d - 1] !== tensorNumel * chunkBaseStride)) {
      while (viewD >= 0 && (viewNumel < tensorNumel || newShape[viewD] === 1)) {
        out[viewD] = viewNumel * chunkBaseStride;
        viewNumel *= newShape[viewD];
        viewD--;
      }
      if (viewNumel !== tensorNumel) return null;
      if (d > 0) {
        chunkBaseStride = strides[d - 1];
        tensorNumel = 1;
        viewNumel = 1;
      }
    }
  }
  if (viewD !== -1) return null;
  return out;
}

export function isContiguous(shape: Shape, strides: readonly number[]): boolean {
  let expected = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    if (shape[i] !== 1 && strides[i] !== expected) return false;
    expected *= shape[i];
  }
  return true;
}
