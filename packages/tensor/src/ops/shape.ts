// Views (sharing storage) and copies that change shape: view/reshape, transpose/permute,
// expand, squeeze/unsqueeze, flatten, narrow/select, split/chunk, cat/stack, contiguous,
// clone, detach, dtype casts and in-place copies.

import type { GradDestination } from '../autograd/graph.js';
import { isGradEnabled } from '../autograd/graph.js';
import { attachGrad, attachGradMulti, needsGrad } from '../autograd/record.js';
import { type Backend, getBackend } from '../backend/backend.js';
import { DTYPES, type DType, ITEMSIZE, isFloating, promoteTypes } from '../dtype.js';
import { argError, fmtShape, indexError, shapeError, TensorError } from '../errors.js';
import { keep } from '../scope.js';
import { contiguousStrides, inferShape, normDim, type Shape, sameShape, viewStrides } from '../shape.js';
import { readChecked } from '../sync.js';
import { Tensor } from '../tensor.js';
import { zeros } from './creation.js';
import { sumToShape } from './elementwise.js';
import { alloc, inputsBackend } from './util.js';

const shapeArgs = (args: readonly (number | readonly number[])[]): number[] =>
  args.length === 1 && Array.isArray(args[0]) ? [...(args[0] as number[])] : (args as number[]);

/** A view with a new shape; throws when the strides do not allow one (use reshape). */
export function view(x: Tensor, shape: Shape): Tensor {
  inputsBackend('view', x);
  const target = inferShape('view', shape, x.numel, x.shape);
  const st = viewStrides(x.shape, x.strides, target);
  if (!st) {
    throw shapeError(
      'view',
      `cannot view ${fmtShape(x.shape)} (strides ${fmtShape(x.strides)}) as ${fmtShape(target)}: not contiguous; use reshape()`,
    );
  }
  const out = x.viewAs(target, st, x.offset);
  if (needsGrad(x)) {
    const inShape = x.shape;
    attachGrad(out, 'ViewBackward', [x], [], (g) => [reshape(g, inShape)], {
      forwardView: (t) => {
        const s = viewStrides(t.shape, t.strides, target);
        return s ? t.viewAs(target, s, t.offset) : null;
      },
    });
  }
  return out;
}

/** A view when the layout allows, otherwise a contiguous copy. */
export function reshape(x: Tensor, shape: Shape): Tensor {
  inputsBackend('reshape', x);
  const target = inferShape('reshape', shape, x.numel, x.shape);
  if (viewStrides(x.shape, x.strides, target)) return view(x, target);
  const c = contiguous(x);
  const v = view(c, target);
  c.dispose();
  return v;
}

function swapped(strides: readonly number[], a: number, b: number): number[] {
  const s = [...strides];
  [s[a], s[b]] = [s[b], s[a]];
  return s;
}

export function transpose(x: Tensor, dim0: number, dim1: number): Tensor {
  inputsBackend('transpose', x);
  const a = normDim('transpose', dim0, x.ndim);
  const b = normDim('transpose', dim1, x.ndim);
  if (x.ndim === 0) return aliasWithGrad(x);
  const shape = [...x.shape];
  const strides = [...x.strides];
  [shape[a], shape[b]] = [shape[b], shape[a]];
  [strides[a], strides[b]] = [strides[b], strides[a]];
  const out = x.viewAs(shape, strides, x.offset);
  if (needsGrad(x)) {
    attachGrad(out, 'TransposeBackward', [x], [], (g) => [transpose(g, a, b)], {
      forwardView: (t) => t.viewAs(shape, swapped(t.strides, a, b), t.offset),
    });
  }
  return out;
}

export function permute(x: Tensor, dims: readonly number[]): Tensor {
  inputsBackend('permute', x);
  if (dims.length !== x.ndim) {
    throw argError('permute', `got ${dims.length} dims [${dims}] for a tensor with ${x.ndim} dimensions`);
  }
  const nd = dims.map((d) => normDim('permute', d, x.ndim));
  if (new Set(nd).size !== nd.length) throw argError('permute', `repeated dimension in [${dims}]`);
  const out = x.viewAs(
    nd.map((d) => x.shape[d]),
    nd.map((d) => x.strides[d]),
    x.offset,
  );
  if (needsGrad(x)) {
    const inv = new Array<number>(nd.length);
    nd.forEach((d, i) => {
      inv[d] = i;
    });
    attachGrad(out, 'PermuteBackward', [x], [], (g) => [permute(g, inv)], {
      forwardView: (t) =>
        t.viewAs(
          nd.map((d) => t.shape[d]),
          nd.map((d) => t.strides[d]),
          t.offset,
        ),
    });
  }
  return out;
}

/** Broadcast view to a larger shape (-1 keeps a dimension); no memory is copied. */
export function expand(x: Tensor, shape: Shape): Tensor {
  inputsBackend('expand', x);
  if (shape.length < x.ndim) {
    throw shapeError('expand', `cannot expand ${fmtShape(x.shape)} to fewer dimensions ${fmtShape(shape)}`);
  }
  const lead = shape.length - x.ndim;
  const outShape: number[] = [];
  const strides: number[] = [];
  for (let i = 0; i < shape.length; i++) {
    const src = i - lead;
    const want = shape[i];
    if (src < 0) {
      if (want < 0) throw shapeError('expand', `-1 is not allowed for new leading dimension ${i}`);
      outShape.push(want);
      strides.push(0);
      continue;
    }
    const have = x.shape[src];
    if (want === -1 || want === have) {
      outShape.push(have);
      strides.push(x.strides[src]);
    } else if (have === 1) {
      outShape.push(want);
      strides.push(0);
    } else {
      throw shapeError(
        'expand',
        `cannot expand ${fmtShape(x.shape)} to ${fmtShape(shape)}: dimension ${i} is ${have}`,
      );
    }
  }
  if (sameShape(outShape, x.shape)) return aliasWithGrad(x);
  const out = x.viewAs(outShape, strides, x.offset);
  if (needsGrad(x)) {
    const inShape = x.shape;
    attachGrad(out, 'ExpandBackward', [x], [], (g) => [sumToShape(g, inShape)]);
  }
  return out;
}

/** A new Tensor object for the same data, recorded as identity in the graph. */
function aliasWithGrad(x: Tensor): Tensor {
  const out = x.viewAs(x.shape, x.strides, x.offset);
  if (needsGrad(x)) attachGrad(out, 'AliasBackward', [x], [], (g) => [g]);
  return out;
}

export function squeeze(x: Tensor, dim?: number): Tensor {
  inputsBackend('squeeze', x);
  let shape: number[];
  if (dim === undefined) shape = x.shape.filter((s) => s !== 1);
  else {
    const d = normDim('squeeze', dim, x.ndim);
    shape = x.shape[d] === 1 ? x.shape.filter((_, i) => i !== d) : [...x.shape];
  }
  return view(x, shape);
}

export function unsqueeze(x: Tensor, dim: number): Tensor {
  inputsBackend('unsqueeze', x);
  const d = normDim('unsqueeze', dim, x.ndim + 1);
  const shape = [...x.shape];
  shape.splice(d, 0, 1);
  const strides = [...x.strides];
  strides.splice(d, 0, d < x.ndim ? x.shape[d] * x.strides[d] : 1);
  const out = x.viewAs(shape, strides, x.offset);
  if (needsGrad(x)) {
    const inShape = x.shape;
    attachGrad(out, 'UnsqueezeBackward', [x], [], (g) => [reshape(g, inShape)], {
      forwardView: (t) => {
        const st = [...t.strides];
        st.splice(d, 0, d < t.ndim ? t.shape[d] * t.strides[d] : 1);
        return t.viewAs(shape, st, t.offset);
      },
    });
  }
  return out;
}

export function flatten(x: Tensor, startDim = 0, endDim = -1): Tensor {
  if (x.ndim === 0) return reshape(x, [1]);
  const s = normDim('flatten', startDim, x.ndim);
  const e = normDim('flatten', endDim, x.ndim);
  if (s > e) throw argError('flatten', `startDim ${startDim} comes after endDim ${endDim}`);
  const shape = [
    ...x.shape.slice(0, s),
    x.shape.slice(s, e + 1).reduce((a, b) => a * b, 1),
    ...x.shape.slice(e + 1),
  ];
  return reshape(x, shape);
}

/** View of `length` elements along dim starting at start. */
export function narrow(x: Tensor, dim: number, start: number, length: number): Tensor {
  inputsBackend('narrow', x);
  noScalar('narrow', x);
  const d = normDim('narrow', dim, x.ndim);
  const size = x.shape[d];
  if (start < 0) start += size;
  if (
    !Number.isInteger(start) ||
    !Number.isInteger(length) ||
    start < 0 ||
    length < 0 ||
    start + length > size
  ) {
    throw indexError(
      'narrow',
      `range [${start}, ${start + length}) is outside dimension ${d} of size ${size}`,
    );
  }
  const shape = [...x.shape];
  shape[d] = length;
  const out = x.viewAs(shape, x.strides, x.offset + start * x.strides[d]);
  if (needsGrad(x)) {
    const inShape = x.shape;
    const dt = x.dtype;
    attachGrad(out, 'NarrowBackward', [x], [], (g) => {
      const z = zeros(inShape, { dtype: dt, device: g.device });
      const region = z.viewAs(g.shape, z.strides, start * z.strides[d]);
      z.backend.copy(region, g);
      region.dispose();
      return [z];
    });
  }
  return out;
}

/** Slicing a 0-d tensor has no dimension to slice (normDim accepts dim 0 for it). */
function noScalar(op: string, x: Tensor): void {
  if (x.ndim === 0) throw indexError(op, `cannot be applied to a 0-d tensor ${x.describe()}`);
}

/** The slice at `index` along dim, with that dimension removed. */
export function select(x: Tensor, dim: number, index: number): Tensor {
  noScalar('select', x);
  const d = normDim('select', dim, x.ndim);
  const size = x.shape[d];
  const i = index < 0 ? index + size : index;
  if (i < 0 || i >= size)
    throw indexError('select', `index ${index} is out of range for dimension ${d} of size ${size}`);
  const n = narrow(x, d, i, 1);
  const out = squeeze(n, d);
  n.dispose();
  return out;
}

/** Splits into pieces of splitSize (the last may be smaller) or of the listed sizes (views). */
export function split(x: Tensor, splitSize: number | readonly number[], dim = 0): Tensor[] {
  inputsBackend('split', x);
  if (x.ndim === 0) throw indexError('split', 'cannot split a 0-d tensor');
  const d = normDim('split', dim, x.ndim);
  const size = x.shape[d];
  let sizes: number[];
  if (typeof splitSize === 'number') {
    if (!(splitSize > 0)) throw argError('split', `splitSize must be positive, got ${splitSize}`);
    sizes = [];
    for (let s = 0; s < size; s += splitSize) sizes.push(Math.min(splitSize, size - s));
    if (sizes.length === 0) sizes.push(0);
  } else {
    sizes = [...splitSize];
    const total = sizes.reduce((a, b) => a + b, 0);
    if (total !== size)
      throw shapeError('split', `sizes [${sizes}] sum to ${total}, dimension ${d} has ${size}`);
  }
  const starts: number[] = [];
  let start = 0;
  const pieces = sizes.map((len) => {
    starts.push(start);
    const shape = [...x.shape];
    shape[d] = len;
    const v = x.viewAs(shape, x.strides, x.offset + start * x.strides[d]);
    start += len;
    return v;
  });
  if (needsGrad(x)) {
    const inShape = x.shape;
    const region = (out: Tensor, i: number): Tensor => {
      const shape = [...inShape];
      shape[d] = sizes[i];
      return out.viewAs(shape, out.strides, starts[i] * out.strides[d]);
    };
    // one node for all pieces: the input gradient is assembled once, zeros where a piece got none
    // (in the buffer that its producers may have written into already: gradientBuffer)
    const buf = gradientBuffer(x, region);
    attachGradMulti(
      pieces,
      'SplitBackward',
      [x],
      [],
      (grads) => [assemble(inShape, grads, region, buf.take())],
      buf,
    );
  }
  return pieces;
}

/** The slices along dim, with that dimension removed (views), like torch.unbind. */
export function unbind(x: Tensor, dim = 0): Tensor[] {
  inputsBackend('unbind', x);
  if (x.ndim === 0) throw indexError('unbind', 'cannot unbind a 0-d tensor');
  const d = normDim('unbind', dim, x.ndim);
  const shape = x.shape.filter((_, i) => i !== d);
  const strides = x.strides.filter((_, i) => i !== d);
  const pieces = Array.from({ length: x.shape[d] }, (_, i) =>
    x.viewAs(shape, strides, x.offset + i * x.strides[d]),
  );
  if (needsGrad(x)) {
    const inShape = x.shape;
    const region = (out: Tensor, i: number): Tensor =>
      out.viewAs(
        shape,
        out.strides.filter((_, k) => k !== d),
        i * out.strides[d],
      );
    const buf = gradientBuffer(x, region);
    attachGradMulti(
      pieces,
      'UnbindBackward',
      [x],
      [],
      (grads) => [assemble(inShape, grads, region, buf.take())],
      buf,
    );
  }
  return pieces;
}

/**
 * The gradient buffer of a split / unbind of x (Node.destination): allocated, contiguous in x's
 * shape and dtype, when a producer of a piece's gradient first asks for its region, then taken by
 * the backward (or freed by release() if the backward never runs).
 */
function gradientBuffer(
  x: Tensor,
  region: (out: Tensor, i: number) => Tensor,
): GradDestination & { take(): Tensor | null } {
  const { backend, shape, dtype } = x;
  let buf: Tensor | null = null;
  return {
    region(i) {
      buf ??= keep(alloc(backend, shape, dtype));
      return region(buf, i);
    },
    release() {
      buf?.dispose();
      buf = null;
    },
    take() {
      const b = buf;
      buf = null;
      return b;
    },
  };
}

/** Whether a and b are the same view of the same storage. */
function sameView(a: Tensor, b: Tensor): boolean {
  return (
    a.storage === b.storage &&
    a.offset === b.offset &&
    a.dtype === b.dtype &&
    sameShape(a.shape, b.shape) &&
    a.strides.every((s, k) => a.shape[k] === 1 || s === b.strides[k])
  );
}

/**
 * A tensor of `shape` whose region i (given by `region`) holds grads[i], or zeros: `into` (a
 * destination buffer whose regions the producers may have written already: those are left as they
 * are) or a new tensor.
 */
function assemble(
  shape: Shape,
  grads: readonly (Tensor | null)[],
  region: (out: Tensor, i: number) => Tensor,
  into: Tensor | null = null,
): Tensor {
  const ref = grads.find((g) => g)!;
  const out = into ?? alloc(ref.backend, shape, ref.dtype);
  grads.forEach((g, i) => {
    const r = region(out, i);
    if (r.numel > 0) {
      if (g && sameView(g, r)) {
        // written in place by its producer (BackwardFn's dest)
      } else if (g) out.backend.copy(r, g);
      else out.backend.fill(r, 0);
    }
    r.dispose();
  });
  return out;
}

/** Splits into `chunks` pieces of ceil(size / chunks). */
export function chunk(x: Tensor, chunks: number, dim = 0): Tensor[] {
  noScalar('chunk', x);
  const d = normDim('chunk', dim, x.ndim);
  if (!(chunks > 0)) throw argError('chunk', `chunks must be positive, got ${chunks}`);
  return split(x, Math.max(1, Math.ceil(x.shape[d] / chunks)), d);
}

/** A contiguous tensor with the same values: a new view when already contiguous, else a copy. */
export function contiguous(x: Tensor): Tensor {
  inputsBackend('contiguous', x);
  if (x.isContiguous) return aliasWithGrad(x);
  return clone(x);
}

/** A contiguous copy. */
export function clone(x: Tensor): Tensor {
  const backend = inputsBackend('clone', x);
  const out = alloc(backend, x.shape, x.dtype);
  if (out.numel > 0) backend.copy(out, x);
  if (needsGrad(x)) attachGrad(out, 'CloneBackward', [x], [], (g) => [g]);
  return out;
}

/** A view of the same data cut from the graph. */
export function detach(x: Tensor): Tensor {
  x.checkAlive('detach');
  return x.viewAs(x.shape, x.strides, x.offset);
}

/** Where and as what {@link to} puts a tensor: a dtype, a device, or both. */
export interface ToOptions {
  device?: string;
  dtype?: DType;
}

/** A device name or a dtype name, told apart by the fixed list of dtypes (Tensor.to, Module.to). */
export function toTarget(op: string, a: DType | string | ToOptions, b?: DType): ToOptions {
  if (typeof a === 'object' && a !== null) return a;
  if (typeof a !== 'string')
    throw argError(op, `expected a device, a dtype or { device, dtype }, got ${typeof a}`);
  if (b !== undefined) {
    if (!DTYPES.includes(b)) throw argError(op, `unknown dtype "${b}" (one of ${DTYPES.join(', ')})`);
    return { device: a, dtype: b };
  }
  return (DTYPES as readonly string[]).includes(a) ? { dtype: a as DType } : { device: a };
}

/**
 * The elements of a tensor (any strides) on another backend, same dtype, as a new contiguous
 * tensor: through host memory (a backend to backend path would go here; a host read is the only
 * synchronisation).
 */
function transfer(x: Tensor, dst: Backend): Tensor {
  const src = x.isContiguous ? x : x.contiguous();
  try {
    const out = alloc(dst, x.shape, x.dtype);
    if (out.numel > 0) {
      const host = new Uint8Array(x.numel * ITEMSIZE[x.dtype]);
      try {
        // with the source device's queued checks; a failing one throws, the copy is dropped
        readChecked(src, host);
      } catch (e) {
        out.dispose();
        throw e;
      }
      dst.write(out, host);
    }
    return out;
  } finally {
    if (src !== x) src.dispose();
  }
}

/**
 * PyTorch's Tensor.to: another dtype (`to('bfloat16')`), another device (`to('cuda:1')`), or both
 * (`to('cuda', 'bfloat16')`, `to({ device, dtype })`). The same tensor (a new view) when nothing
 * changes. Differentiable: the gradient goes back to the source device and dtype.
 */
export function to(x: Tensor, target: DType | string | ToOptions, dtype?: DType): Tensor {
  const backend = inputsBackend('to', x);
  const t = toTarget('to', target, dtype);
  const outDtype = t.dtype ?? x.dtype;
  if (!DTYPES.includes(outDtype))
    throw argError('to', `unknown dtype "${outDtype}" (one of ${DTYPES.join(', ')})`);
  const dst = t.device === undefined ? backend : getBackend(t.device);
  if (outDtype === x.dtype && dst === backend) return aliasWithGrad(x);
  let out: Tensor;
  if (dst === backend) {
    out = alloc(backend, x.shape, outDtype);
    if (out.numel > 0) backend.copy(out, x);
  } else if (outDtype === x.dtype) {
    out = transfer(x, dst);
  } else {
    // cast where the data is, then move the cast copy
    const cast = alloc(backend, x.shape, outDtype);
    try {
      if (cast.numel > 0) backend.copy(cast, x);
      out = transfer(cast, dst);
    } finally {
      cast.dispose();
    }
  }
  if (needsGrad(x) && isFloating(outDtype)) {
    const from = { device: x.device, dtype: x.dtype };
    attachGrad(out, 'ToCopyBackward', [x], [], (g) => [to(g, from)]);
  }
  return out;
}

export function cat(tensors: readonly Tensor[], dim = 0): Tensor {
  if (tensors.length === 0) throw argError('cat', 'expected a non-empty list of tensors');
  const backend = inputsBackend('cat', ...tensors);
  const first = tensors[0];
  if (first.ndim === 0) throw shapeError('cat', 'zero-dimensional tensors cannot be concatenated; use stack');
  const d = normDim('cat', dim, first.ndim);
  let dtype = first.dtype;
  let total = 0;
  for (const [i, t] of tensors.entries()) {
    if (t.ndim !== first.ndim) {
      throw shapeError('cat', `tensor ${i} has ${t.ndim} dimensions, tensor 0 has ${first.ndim}`);
    }
    for (let k = 0; k < t.ndim; k++) {
      if (k !== d && t.shape[k] !== first.shape[k]) {
        throw shapeError(
          'cat',
          `tensor ${i} has shape ${fmtShape(t.shape)}, tensor 0 has ${fmtShape(first.shape)}: sizes must match except in dimension ${d}`,
        );
      }
    }
    dtype = promoteTypes(dtype, t.dtype);
    total += t.shape[d];
  }
  const shape = [...first.shape];
  shape[d] = total;
  const out = alloc(backend, shape, dtype);
  let start = 0;
  const sizes: number[] = [];
  for (const t of tensors) {
    const len = t.shape[d];
    sizes.push(len);
    if (len > 0) {
      const region = out.viewAs(t.shape, out.strides, start * out.strides[d]);
      backend.copy(region, t);
      region.dispose();
    }
    start += len;
  }
  if (needsGrad(...tensors)) {
    attachGrad(out, 'CatBackward', tensors, [], (g) => {
      let s = 0;
      return tensors.map((t, i) => {
        let piece = t.requiresGrad ? narrow(g, d, s, sizes[i]) : null;
        s += sizes[i];
        if (piece && piece.dtype !== t.dtype) {
          // an input of a lower-precision dtype than the (promoted) output gets its own dtype
          const cast = to(piece, t.dtype);
          piece.dispose();
          piece = cast;
        }
        return piece;
      });
    });
  }
  return out;
}

export function stack(tensors: readonly Tensor[], dim = 0): Tensor {
  if (tensors.length === 0) throw argError('stack', 'expected a non-empty list of tensors');
  const d = normDim('stack', dim, tensors[0].ndim + 1);
  for (const [i, t] of tensors.entries()) {
    if (!sameShape(t.shape, tensors[0].shape)) {
      throw shapeError(
        'stack',
        `tensor ${i} has shape ${fmtShape(t.shape)}, tensor 0 has ${fmtShape(tensors[0].shape)}`,
      );
    }
  }
  const parts = tensors.map((t) => unsqueeze(t, d));
  const out = cat(parts, d);
  for (const p of parts) p.dispose();
  return out;
}

function checkInPlace(op: string, x: Tensor, src?: Tensor): void {
  if (isGradEnabled() && (x.requiresGrad || src?.requiresGrad)) {
    throw new TensorError(
      'INVALID_ARGUMENT',
      `${op}: in-place operations on tensors that require grad are not recorded; run them inside noGrad()`,
    );
  }
}

Object.assign(Tensor.prototype, {
  view(this: Tensor, ...shape: (number | number[])[]) {
    return view(this, shapeArgs(shape));
  },
  reshape(this: Tensor, ...shape: (number | number[])[]) {
    return reshape(this, shapeArgs(shape));
  },
  transpose(this: Tensor, a: number, b: number) {
    return transpose(this, a, b);
  },
  t(this: Tensor) {
    if (this.ndim > 2) throw argError('t', `expects a tensor with <= 2 dimensions, got ${this.ndim}`);
    return this.ndim < 2 ? aliasWithGrad(this) : transpose(this, 0, 1);
  },
  permute(this: Tensor, ...dims: (number | number[])[]) {
    return permute(this, shapeArgs(dims));
  },
  expand(this: Tensor, ...shape: (number | number[])[]) {
    return expand(this, shapeArgs(shape));
  },
  expandAs(this: Tensor, other: Tensor) {
    return expand(this, other.shape);
  },
  squeeze(this: Tensor, dim?: number) {
    return squeeze(this, dim);
  },
  unsqueeze(this: Tensor, dim: number) {
    return unsqueeze(this, dim);
  },
  flatten(this: Tensor, s?: number, e?: number) {
    return flatten(this, s, e);
  },
  narrow(this: Tensor, dim: number, start: number, length: number) {
    return narrow(this, dim, start, length);
  },
  select(this: Tensor, dim: number, index: number) {
    return select(this, dim, index);
  },
  split(this: Tensor, s: number | number[], dim?: number) {
    return split(this, s, dim);
  },
  chunk(this: Tensor, c: number, dim?: number) {
    return chunk(this, c, dim);
  },
  unbind(this: Tensor, dim?: number) {
    return unbind(this, dim);
  },
  contiguous(this: Tensor) {
    return contiguous(this);
  },
  clone(this: Tensor) {
    return clone(this);
  },
  detach(this: Tensor) {
    return detach(this);
  },
  to(this: Tensor, target: DType | string | ToOptions, dtype?: DType) {
    return to(this, target, dtype);
  },
  cpu(this: Tensor) {
    return to(this, { device: 'cpu' });
  },
  float(this: Tensor) {
    return to(this, 'float32');
  },
  copy_(this: Tensor, src: Tensor) {
    inputsBackend('copy_', this, src);
    checkInPlace('copy_', this, src);
    broadcastCheck(this, src);
    if (this.numel > 0) this.backend.copy(this, src);
    return this;
  },
  fill_(this: Tensor, value: number) {
    inputsBackend('fill_', this);
    checkInPlace('fill_', this);
    if (this.numel > 0) this.backend.fill(this, value);
    return this;
  },
  zero_(this: Tensor) {
    return this.fill_(0);
  },
});

function broadcastCheck(dst: Tensor, src: Tensor): void {
  const lead = dst.ndim - src.ndim;
  const ok = lead >= 0 && src.shape.every((s, i) => s === 1 || s === dst.shape[i + lead]);
  if (!ok)
    throw shapeError('copy_', `source ${fmtShape(src.shape)} does not broadcast to ${fmtShape(dst.shape)}`);
}

export { contiguousStrides };
