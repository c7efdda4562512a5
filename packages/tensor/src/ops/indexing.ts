// The indexing family: embedding, indexSelect, gather, scatterAdd, indexAdd, topk, triu/tril
// and oneHot, on the native kernels of native/src/index.cc, with their gradients.
//
// Index tensors are int32 or int64. Indices are validated by the kernels before anything is
// written; an index outside its dimension raises TensorError INDEX_OUT_OF_RANGE naming the op,
// the value and the size. The kernels report a rejected index in a small device tensor whose
// check is queued (sync.ts): the CPU throws from the op itself, an asynchronous device at its
// next host read. Accumulating ops (the embedding and indexSelect gradients, indexAdd,
// scatterAdd and the gather gradient) add in a fixed order and accumulate 16-bit floats in
// float32, rounding once, so their results do not depend on the thread count.

import { addedToMainGrad } from '../autograd/engine.js';
import { attachGrad, needsGrad } from '../autograd/record.js';
import { defineCpuKernel, native, pack } from '../backend/cpu.js';
import type { DType } from '../dtype.js';
import { argError, dtypeError, fmtShape, indexError, shapeError, type TensorError } from '../errors.js';
import { untrackTensor } from '../scope.js';
import { normDim, numel, type Shape } from '../shape.js';
import { deferCheck } from '../sync.js';
import { Tensor } from '../tensor.js';
import { fusedMainGradOf } from './matmul.js';
import { amax, amin } from './reduce.js';
import { reshape } from './shape.js';
import { alloc, inputsBackend, kernelOf } from './util.js';

// ---- kernels --------------------------------------------------------------------------------
//
// The five index-checking kernels (indexSelectRows, indexAddRows, gatherAlong, scatterAddAlong,
// oneHot) take a last argument `bad`: a contiguous float64 tensor of shape [2] on the kernel's
// device. The kernel always fills it, with [position, value] of the first index it rejected (its
// flat position in the contiguous index tensor and its value; nothing else is written then), or
// with [-1, 0] when every index is in range. They return nothing: on an asynchronous device the
// answer is only known once the kernel has run, so the op queues its check (sync.ts) instead of
// reading it.

export type IndexSelectRowsKernel = (
  out: Tensor,
  x: Tensor,
  index: Tensor,
  outer: number,
  S: number,
  inner: number,
  bad: Tensor,
) => void;
export type IndexAddRowsKernel = (
  out: Tensor,
  base: Tensor | null,
  src: Tensor,
  index: Tensor,
  outer: number,
  S: number,
  inner: number,
  alpha: number,
  skip: number,
  bad: Tensor,
) => void;
export type GatherAlongKernel = (out: Tensor, x: Tensor, index: Tensor, dim: number, bad: Tensor) => void;
export type ScatterAddAlongKernel = (
  out: Tensor,
  src: Tensor,
  index: Tensor,
  dim: number,
  alpha: number,
  bad: Tensor,
) => void;
export type TopkKernel = (
  values: Tensor,
  indices: Tensor,
  x: Tensor,
  outer: number,
  R: number,
  inner: number,
  k: number,
  largest: boolean,
) => void;
export type TriangleKernel = (out: Tensor, x: Tensor, diagonal: number, upper: boolean) => void;
export type OneHotKernel = (out: Tensor, index: Tensor, classes: number, bad: Tensor) => void;

const call = native as unknown as Record<string, () => unknown>;

/** Stores a native kernel's answer (an array [position, value], or nothing) into `bad`. */
function answer(bad: Tensor, r: unknown): void {
  const v = Array.isArray(r) ? [Number(r[0]), Number(r[1])] : [-1, 0];
  bad.backend.write(bad, Float64Array.from(v));
}

defineCpuKernel('indexSelectRows', (out, x, index, outer, S, inner, bad) => {
  pack.begin().tensor(out).tensor(x).tensor(index).num(outer).num(S).num(inner);
  answer(bad, call.indexSelectRows());
});
defineCpuKernel('indexAddRows', (out, base, src, index, outer, S, inner, alpha, skip, bad) => {
  pack
    .begin()
    .tensor(out)
    .num(base ? 1 : 0);
  if (base) pack.tensor(base);
  pack.tensor(src).tensor(index).num(outer).num(S).num(inner).num(alpha).num(skip);
  answer(bad, call.indexAddRows());
});
defineCpuKernel('gatherAlong', (out, x, index, dim, bad) => {
  pack.begin().tensor(out).tensor(x).tensor(index).num(dim);
  answer(bad, call.gatherAlong());
});
defineCpuKernel('scatterAddAlong', (out, src, index, dim, alpha, bad) => {
  pack.begin().tensor(out).tensor(src).tensor(index).num(dim).num(alpha);
  answer(bad, call.scatterAddAlong());
});
defineCpuKernel('topk', (values, indices, x, outer, R, inner, k, largest) => {
  pack
    .begin()
    .tensor(values)
    .tensor(indices)
    .tensor(x)
    .num(outer)
    .num(R)
    .num(inner)
    .num(k)
    .num(largest ? 1 : 0);
  call.topk();
});
defineCpuKernel('triangle', (out, x, diagonal, upper) => {
  pack
    .begin()
    .tensor(out)
    .tensor(x)
    .num(diagonal)
    .num(upper ? 1 : 0);
  call.triangle();
});
defineCpuKernel('oneHot', (out, index, classes, bad) => {
  pack.begin().tensor(out).tensor(index).num(classes);
  answer(bad, call.oneHot());
});

/**
 * Runs an index-checking kernel on a fresh `bad` tensor and queues the check of its answer;
 * `error` builds the op's error from the position and value of the rejected index. The check
 * throws from here on a synchronous backend (and so does a full queue that synchronises on an
 * asynchronous one): whatever throws, `out` and `bad` are disposed first, so the op that called
 * this only has its own temporaries to free.
 */
function checkedKernel(
  out: Tensor,
  run: (bad: Tensor) => void,
  error: (position: number, value: number) => TensorError,
  ownsOut = true,
): void {
  let bad: Tensor | null = null;
  try {
    bad = alloc(out.backend, [2], 'float64');
    // the queue frees it at its check: a tidy() scope that ends before then must leave it alone
    untrackTensor(bad);
    run(bad);
  } catch (e) {
    bad?.dispose();
    if (ownsOut) out.dispose();
    throw e;
  }
  try {
    deferCheck(bad, (v) => (v[0] >= 0 ? error(v[0], v[1]) : null));
  } catch (e) {
    if (ownsOut) out.dispose();
    throw e;
  }
}

// ---- helpers --------------------------------------------------------------------------------

/** t itself when contiguous, else a contiguous copy (not recorded in the graph). */
function dense(t: Tensor): Tensor {
  if (t.isContiguous) return t;
  const c = alloc(t.backend, t.shape, t.dtype);
  if (c.numel > 0) t.backend.copy(c, t);
  return c;
}

/** A contiguous copy of t in another dtype (not recorded in the graph). */
function cast(t: Tensor, dtype: DType): Tensor {
  const c = alloc(t.backend, t.shape, dtype);
  if (c.numel > 0) t.backend.copy(c, t);
  return c;
}

function disposeTemp(t: Tensor, original: Tensor): void {
  if (t !== original) t.dispose();
}

/** fn's result; when fn throws, t (original itself or a temporary copy of it) is freed first. */
function freeOnThrow<T>(t: Tensor, original: Tensor, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    disposeTemp(t, original);
    throw e;
  }
}

function checkIndexDtype(op: string, index: Tensor, what = 'index'): void {
  if (index.dtype !== 'int64' && index.dtype !== 'int32') {
    throw dtypeError(op, `${what} must be an int64 or int32 tensor, got ${index.dtype}`);
  }
}

function checkVector(op: string, index: Tensor): void {
  if (index.ndim > 1) throw shapeError(op, `index must be 0-D or 1-D, got shape ${fmtShape(index.shape)}`);
}

function checkHasDims(op: string, x: Tensor): void {
  if (x.ndim === 0) throw shapeError(op, `expects a tensor with at least 1 dimension, got ${x.describe()}`);
}

function rangeError(op: string, bad: readonly [number, number], dim: number, size: number): TensorError {
  return indexError(
    op,
    `index ${bad[1]} (at position ${bad[0]} of the index) is out of range for dimension ${dim} of size ${size}`,
  );
}

/** [outer, size, inner] split of a shape around dim. */
function around(shape: Shape, d: number): { outer: number; size: number; inner: number } {
  return { outer: numel(shape.slice(0, d)), size: shape[d], inner: numel(shape.slice(d + 1)) };
}

const withDim = (shape: Shape, d: number, size: number): number[] =>
  shape.map((s, i) => (i === d ? size : s));

// 16-bit floats accumulate in float32 and are rounded once at the end.
const accumDtype = (d: DType): DType => (d === 'bfloat16' || d === 'float16' ? 'float32' : d);

// ---- raw ops (no graph recording) -------------------------------------------------------------

/** x with the slices index[i] of dim d, in index order; index contiguous. */
function indexSelectRaw(op: string, x: Tensor, d: number, index: Tensor): Tensor {
  const backend = x.backend;
  const { outer, size, inner } = around(x.shape, d);
  const xd = dense(x);
  const out = alloc(backend, withDim(x.shape, d, index.numel), x.dtype);
  try {
    checkedKernel(
      out,
      (bad) => kernelOf(backend, 'indexSelectRows', op)(out, xd, index, outer, size, inner, bad),
      (p, v) => rangeError(op, [p, v], d, size),
    );
  } finally {
    disposeTemp(xd, x);
  }
  return out;
}

/**
 * (base ?? 0) of `shape` with alpha * src[..., i, ...] added to slice index[i] of dim d; src has
 * shape with dim d of index.numel; index contiguous. Rows equal to `skip` are not added.
 */
function indexAddRaw(
  op: string,
  base: Tensor | null,
  src: Tensor,
  index: Tensor,
  shape: Shape,
  d: number,
  alpha: number,
  skip = -1,
): Tensor {
  const backend = src.backend;
  const { outer, size, inner } = around(shape, d);
  const bd = base ? dense(base) : null;
  const sd = dense(src);
  const out = alloc(backend, shape, src.dtype);
  try {
    checkedKernel(
      out,
      (bad) =>
        kernelOf(backend, 'indexAddRows', op)(out, bd, sd, index, outer, size, inner, alpha, skip, bad),
      (p, v) => rangeError(op, [p, v], d, size),
    );
  } finally {
    if (bd && base) disposeTemp(bd, base);
    disposeTemp(sd, src);
  }
  return out;
}

/**
 * main [V, H] (float32, contiguous) += the rows of g (any float dtype, [ids, H] in memory) at the
 * ids' rows, in float32: the rows of g are cast to float32 (exactly, from 16 bits) and added in
 * place by the indexAddRows kernel with main as base and output (rows no id names are left as they
 * are). Rows equal to `pad` are skipped. An id out of range is reported as the embedding's.
 */
function addRowsIntoMainGrad(
  op: string,
  main: Tensor,
  g: Tensor,
  ix: Tensor,
  V: number,
  H: number,
  pad: number,
): void {
  const g32 = g.dtype === 'float32' ? dense(g) : cast(g, 'float32');
  try {
    // main is the parameter's: an error leaves it alive
    checkedKernel(
      main,
      (bad) => kernelOf(main.backend, 'indexAddRows', op)(main, main, g32, ix, 1, V, H, 1, pad, bad),
      (p, v) => rangeError(op, [p, v], 0, V),
      false,
    );
  } finally {
    disposeTemp(g32, g);
  }
}

/** out[p] = x[p with p[d] = index[p]] over the positions of (contiguous) index. */
function gatherRaw(op: string, x: Tensor, d: number, index: Tensor): Tensor {
  const out = alloc(x.backend, index.shape, x.dtype);
  const size = x.shape[d];
  checkedKernel(
    out,
    (bad) => kernelOf(x.backend, 'gatherAlong', op)(out, x, index, d, bad),
    (p, v) => rangeError(op, [p, v], d, size),
  );
  return out;
}

/** (base ?? zeros) of `shape`/`dtype` with alpha * src[p] added at p with p[d] = index[p]. */
function scatterAddRaw(
  op: string,
  base: Tensor | null,
  shape: Shape,
  dtype: DType,
  d: number,
  index: Tensor,
  src: Tensor,
  alpha = 1,
): Tensor {
  const backend = src.backend;
  const work = accumDtype(dtype);
  const acc = alloc(backend, shape, work, base === null);
  if (base && acc.numel > 0) backend.copy(acc, base);
  const s = src.dtype === work ? src : cast(src, work);
  const size = shape[d];
  try {
    checkedKernel(
      acc,
      (bad) => kernelOf(backend, 'scatterAddAlong', op)(acc, s, index, d, alpha, bad),
      (p, v) => rangeError(op, [p, v], d, size),
    );
  } finally {
    disposeTemp(s, src);
  }
  if (work === dtype) return acc;
  const out = cast(acc, dtype);
  acc.dispose();
  return out;
}

function triangleRaw(op: string, x: Tensor, diagonal: number, upper: boolean): Tensor {
  const out = alloc(x.backend, x.shape, x.dtype);
  if (out.numel > 0) kernelOf(x.backend, 'triangle', op)(out, x, diagonal, upper);
  return out;
}

// ---- embedding ------------------------------------------------------------------------------

/** Rows of weight [V, H] picked by integer ids of any shape: out [...ids.shape, H]. */
export function embedding(
  input: Tensor,
  weight: Tensor,
  options: { paddingIdx?: number | null } = {},
): Tensor {
  const op = 'embedding';
  const backend = inputsBackend(op, input, weight);
  checkIndexDtype(op, input, 'input ids');
  if (weight.ndim !== 2) throw shapeError(op, `weight must be 2-D [V, H], got ${fmtShape(weight.shape)}`);
  const [V, H] = weight.shape;
  let pad = -1;
  const p = options.paddingIdx;
  if (p !== undefined && p !== null) {
    if (!Number.isInteger(p) || p < -V || p >= V) {
      throw argError(op, `paddingIdx ${p} must be an integer in [${-V}, ${V}) for a vocabulary of ${V} rows`);
    }
    pad = p < 0 ? p + V : p;
  }
  const ids = dense(input);
  const w = dense(weight);
  const out = alloc(backend, [...input.shape, H], weight.dtype);
  try {
    checkedKernel(
      out,
      (bad) => kernelOf(backend, 'indexSelectRows', op)(out, w, ids, 1, V, H, bad),
      (p, v) =>
        indexError(
          op,
          `id ${v} (at position ${p} of the input) is out of range for a vocabulary of V = ${V} rows`,
        ),
    );
  } catch (e) {
    disposeTemp(ids, input);
    throw e;
  } finally {
    disposeTemp(w, weight);
  }
  if (needsGrad(weight)) {
    // g [...ids, H] has the memory layout of [ids.numel, H], which is all the kernel reads
    attachGrad(out, 'EmbeddingBackward', [weight], [ids], (g, [ix]) => {
      // gradient-accumulation fusion: the rows added into the float32 main gradient in place
      const main = fusedMainGradOf(weight);
      if (main) {
        addRowsIntoMainGrad(op, main, g, ix, V, H, pad);
        return [addedToMainGrad(weight)];
      }
      return [indexAddRaw(op, null, g, ix, [V, H], 0, 1, pad)];
    });
  }
  disposeTemp(ids, input);
  return out;
}

// ---- indexSelect / indexAdd -----------------------------------------------------------------

/** Slices index[i] of dim of x [..., S, ...] (index 0-D/1-D of L ints): out [..., L, ...]. */
export function indexSelect(x: Tensor, dim: number, index: Tensor): Tensor {
  const op = 'indexSelect';
  inputsBackend(op, x, index);
  checkHasDims(op, x);
  checkIndexDtype(op, index);
  checkVector(op, index);
  const d = normDim(op, dim, x.ndim);
  const ix = dense(index);
  const out = freeOnThrow(ix, index, () => indexSelectRaw(op, x, d, ix));
  if (needsGrad(x)) {
    const shape = x.shape;
    attachGrad(out, 'IndexSelectBackward', [x], [ix], (g, [i]) => [indexAddRaw(op, null, g, i, shape, d, 1)]);
  }
  disposeTemp(ix, index);
  return out;
}

/** Out-of-place index_add: x [..., S, ...] plus alpha * source [..., L, ...] added at slices index[i]. */
export function indexAdd(x: Tensor, dim: number, index: Tensor, source: Tensor, alpha = 1): Tensor {
  const op = 'indexAdd';
  inputsBackend(op, x, index, source);
  checkHasDims(op, x);
  checkIndexDtype(op, index);
  checkVector(op, index);
  const d = normDim(op, dim, x.ndim);
  if (source.dtype !== x.dtype)
    throw dtypeError(op, `source dtype ${source.dtype} differs from input dtype ${x.dtype}`);
  const want = withDim(x.shape, d, index.numel);
  if (source.ndim !== x.ndim || source.shape.some((s, i) => s !== want[i])) {
    throw shapeError(
      op,
      `source must have shape ${fmtShape(want)} (input ${fmtShape(x.shape)} with dimension ${d} of the index length ${index.numel}), got ${fmtShape(source.shape)}`,
    );
  }
  const ix = dense(index);
  const out = freeOnThrow(ix, index, () => indexAddRaw(op, x, source, ix, x.shape, d, alpha));
  if (needsGrad(x, source)) {
    const rx = x.requiresGrad;
    const rs = source.requiresGrad;
    attachGrad(out, 'IndexAddBackward', [x, source], rs ? [ix] : [], (g, s) => {
      let gs: Tensor | null = null;
      if (rs) {
        const sel = indexSelectRaw(op, g, d, s[0]);
        gs = alpha === 1 ? sel : sel.mul(alpha);
        if (gs !== sel) sel.dispose();
      }
      return [rx ? g : null, gs];
    });
  }
  disposeTemp(ix, index);
  return out;
}

// ---- gather / scatterAdd --------------------------------------------------------------------

/** out[p] = x[p with p[dim] = index[p]]; index has x's rank, out has index's shape. */
export function gather(x: Tensor, dim: number, index: Tensor): Tensor {
  const op = 'gather';
  inputsBackend(op, x, index);
  checkHasDims(op, x);
  checkIndexDtype(op, index);
  const d = normDim(op, dim, x.ndim);
  if (index.ndim !== x.ndim) {
    throw shapeError(
      op,
      `index ${fmtShape(index.shape)} must have as many dimensions as the input ${fmtShape(x.shape)}`,
    );
  }
  for (let i = 0; i < x.ndim; i++) {
    if (i !== d && index.shape[i] > x.shape[i]) {
      throw shapeError(
        op,
        `index ${fmtShape(index.shape)} is larger than the input ${fmtShape(x.shape)} in dimension ${i} (only dimension ${d} may differ)`,
      );
    }
  }
  const ix = dense(index);
  const out = freeOnThrow(ix, index, () => gatherRaw(op, x, d, ix));
  if (needsGrad(x)) {
    const shape = x.shape;
    attachGrad(out, 'GatherBackward', [x], [ix], (g, [i]) => [
      scatterAddRaw(op, null, shape, g.dtype, d, i, g),
    ]);
  }
  disposeTemp(ix, index);
  return out;
}

/** Out-of-place scatter_add: x plus src[p] added at p with p[dim] = index[p], for p over index. */
export function scatterAdd(x: Tensor, dim: number, index: Tensor, src: Tensor): Tensor {
  const op = 'scatterAdd';
  inputsBackend(op, x, index, src);
  checkHasDims(op, x);
  checkIndexDtype(op, index);
  const d = normDim(op, dim, x.ndim);
  if (src.dtype !== x.dtype)
    throw dtypeError(op, `src dtype ${src.dtype} differs from input dtype ${x.dtype}`);
  if (index.ndim !== x.ndim || src.ndim !== x.ndim) {
    throw shapeError(
      op,
      `input ${fmtShape(x.shape)}, index ${fmtShape(index.shape)} and src ${fmtShape(src.shape)} must have the same number of dimensions`,
    );
  }
  for (let i = 0; i < x.ndim; i++) {
    if (index.shape[i] > src.shape[i] || (i !== d && index.shape[i] > x.shape[i])) {
      throw shapeError(
        op,
        `index ${fmtShape(index.shape)} must be no larger than src ${fmtShape(src.shape)} in every dimension and than the input ${fmtShape(x.shape)} outside dimension ${d} (dimension ${i})`,
      );
    }
  }
  const ix = dense(index);
  const out = freeOnThrow(ix, index, () => scatterAddRaw(op, x, x.shape, x.dtype, d, ix, src));
  if (needsGrad(x, src)) {
    const rx = x.requiresGrad;
    const rs = src.requiresGrad;
    const srcShape = src.shape;
    attachGrad(out, 'ScatterAddBackward', [x, src], rs ? [ix] : [], (g, s) => {
      let gs: Tensor | null = null;
      if (rs) {
        const picked = gatherRaw(op, g, d, s[0]);
        if (picked.shape.every((n, i) => n === srcShape[i])) gs = picked;
        else {
          // src elements outside the index's extent were never added: their gradient is zero
          gs = alloc(g.backend, srcShape, g.dtype, true);
          const region = gs.viewAs(picked.shape, gs.strides, 0);
          g.backend.copy(region, picked);
          region.dispose();
          picked.dispose();
        }
      }
      return [rx ? g : null, gs];
    });
  }
  disposeTemp(ix, index);
  return out;
}

// ---- topk -----------------------------------------------------------------------------------

/**
 * The k largest (or smallest) entries along dim of x [..., R, ...]: values [..., k, ...] and
 * their int64 indices. Results are always sorted (sorted=false is accepted and gives the same
 * order); NaN ranks above every number, and equal values are taken lowest index first.
 */
export function topk(
  x: Tensor,
  k: number,
  dim = -1,
  largest = true,
  _sorted = true,
): { values: Tensor; indices: Tensor } {
  const op = 'topk';
  const backend = inputsBackend(op, x);
  if (x.ndim === 0) {
    const flat = reshape(x, [1]);
    const r = topk(flat, k, 0, largest);
    flat.dispose();
    const values = reshape(r.values, []);
    const indices = reshape(r.indices, []);
    r.values.dispose();
    r.indices.dispose();
    return { values, indices };
  }
  const d = normDim(op, dim, x.ndim);
  const { outer, size, inner } = around(x.shape, d);
  if (!Number.isInteger(k) || k < 0 || k > size) {
    throw argError(op, `k = ${k} must be an integer in [0, ${size}] for dimension ${d} of ${x.describe()}`);
  }
  const shape = withDim(x.shape, d, k);
  const values = alloc(backend, shape, x.dtype);
  const indices = alloc(backend, shape, 'int64');
  if (values.numel > 0) {
    const xd = dense(x);
    kernelOf(backend, 'topk', op)(values, indices, xd, outer, size, inner, k, largest);
    disposeTemp(xd, x);
  }
  if (needsGrad(x)) {
    const xShape = x.shape;
    attachGrad(values, 'TopkBackward', [x], [indices], (g, [ix]) => [
      scatterAddRaw(op, null, xShape, g.dtype, d, ix, g),
    ]);
  }
  return { values, indices };
}

// ---- triu / tril ----------------------------------------------------------------------------

function triangle(op: 'triu' | 'tril', x: Tensor, diagonal: number): Tensor {
  inputsBackend(op, x);
  if (x.ndim < 2) throw shapeError(op, `expects a tensor with at least 2 dimensions, got ${x.describe()}`);
  if (!Number.isInteger(diagonal)) throw argError(op, `diagonal must be an integer, got ${diagonal}`);
  const upper = op === 'triu';
  const out = triangleRaw(op, x, diagonal, upper);
  if (needsGrad(x)) {
    attachGrad(out, upper ? 'TriuBackward' : 'TrilBackward', [x], [], (g) => [
      triangleRaw(op, g, diagonal, upper),
    ]);
  }
  return out;
}

/** Upper triangle of the last two dims of x [..., M, N] (j - i >= diagonal kept, rest 0). */
export function triu(x: Tensor, diagonal = 0): Tensor {
  return triangle('triu', x, diagonal);
}

/** Lower triangle of the last two dims of x [..., M, N] (j - i <= diagonal kept, rest 0). */
export function tril(x: Tensor, diagonal = 0): Tensor {
  return triangle('tril', x, diagonal);
}

// ---- oneHot ---------------------------------------------------------------------------------

/** int64 one-hot encoding of integer class ids [...]: out [..., numClasses] (-1 infers max + 1). */
export function oneHot(indices: Tensor, numClasses = -1): Tensor {
  const op = 'oneHot';
  const backend = inputsBackend(op, indices);
  checkIndexDtype(op, indices, 'indices');
  let classes = numClasses;
  if (classes === -1) {
    if (indices.numel === 0)
      throw argError(op, 'cannot infer numClasses from an empty tensor; pass numClasses');
    const lo = amin(indices);
    const hi = amax(indices);
    const min = lo.item();
    classes = hi.item() + 1;
    lo.dispose();
    hi.dispose();
    if (min < 0) throw indexError(op, `class values must be non-negative, got ${min}`);
  } else if (!Number.isInteger(classes) || classes < 0) {
    throw argError(op, `numClasses must be a non-negative integer or -1, got ${numClasses}`);
  }
  const ix = dense(indices);
  const out = alloc(backend, [...indices.shape, classes], 'int64', true);
  try {
    checkedKernel(
      out,
      (bad) => kernelOf(backend, 'oneHot', op)(out, ix, classes, bad),
      (p, v) => indexError(op, `class value ${v} (at position ${p}) is out of range for ${classes} classes`),
    );
  } finally {
    disposeTemp(ix, indices);
  }
  return out;
}

Object.assign(Tensor.prototype, {
  gather(this: Tensor, dim: number, index: Tensor) {
    return gather(this, dim, index);
  },
  indexSelect(this: Tensor, dim: number, index: Tensor) {
    return indexSelect(this, dim, index);
  },
  scatterAdd(this: Tensor, dim: number, index: Tensor, src: Tensor) {
    return scatterAdd(this, dim, index, src);
  },
  indexAdd(this: Tensor, dim: number, index: Tensor, source: Tensor, alpha?: number) {
    return indexAdd(this, dim, index, source, alpha);
  },
  topk(this: Tensor, k: number, dim?: number, largest?: boolean, sorted?: boolean) {
    return topk(this, k, dim, largest, sorted);
  },
  triu(this: Tensor, diagonal?: number) {
    return triu(this, diagonal);
  },
  tril(this: Tensor, diagonal?: number) {
    return tril(this, diagonal);
  },
});
