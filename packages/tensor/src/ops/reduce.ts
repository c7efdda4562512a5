// Reductions over one, several or all dimensions, with keepdim, and their gradients.

import { attachGrad, needsGrad } from '../autograd/record.js';
import type { ReduceOp } from '../backend/backend.js';
import { type DType, isFloating } from '../dtype.js';
import { argError, dtypeError } from '../errors.js';
import { normDim, numel } from '../shape.js';
import { Tensor } from '../tensor.js';
import { arange } from './creation.js';
import { div, eq, exp, mul, sub, where } from './elementwise.js';
import { contiguous, expand, permute, reshape } from './shape.js';
import { alloc, inputsBackend } from './util.js';

type Dims = number | readonly number[] | null | undefined;

function normDims(op: string, dims: Dims, ndim: number): number[] {
  if (dims === null || dims === undefined) return [...Array(ndim).keys()];
  const list = typeof dims === 'number' ? [dims] : [...dims];
  // an empty list reduces every dimension, as torch.sum(x, dim=[]) does
  if (list.length === 0) return [...Array(ndim).keys()];
  const out = list.map((d) => normDim(op, d, ndim));
  if (new Set(out).size !== out.length) throw argError(op, `dimension listed twice in [${list}]`);
  return out.sort((a, b) => a - b);
}

function reducedShape(shape: readonly number[], dims: readonly number[], keepdim: boolean): number[] {
  const out: number[] = [];
  shape.forEach((s, i) => {
    if (!dims.includes(i)) out.push(s);
    else if (keepdim) out.push(1);
  });
  return out;
}

/**
 * Runs a kernel reduction over `dims`: the input is made contiguous with the reduced dims
 * moved last (when they are not a single dim), then viewed as [outer, R, inner].
 */
function reduceRaw(
  op: string,
  kop: ReduceOp,
  x: Tensor,
  dims: number[],
  keepdim: boolean,
  outDtype: DType,
  p = 0,
  withIndices = false,
): { values: Tensor; indices: Tensor | null } {
  const backend = inputsBackend(op, x);
  const outShape = reducedShape(x.shape, dims, keepdim);
  if (x.ndim === 0) dims = [];
  let src: Tensor;
  let outer: number;
  let R: number;
  let inner: number;
  if (dims.length <= 1) {
    src = contiguous(x);
    const d = dims[0] ?? 0;
    outer = numel(x.shape.slice(0, d));
    R = x.ndim === 0 ? 1 : x.shape[d];
    inner = numel(x.shape.slice(d + 1));
  } else {
    const kept = [...Array(x.ndim).keys()].filter((i) => !dims.includes(i));
    const perm = permute(x, [...kept, ...dims]);
    src = contiguous(perm);
    perm.dispose();
    outer = numel(kept.map((i) => x.shape[i]));
    R = numel(dims.map((i) => x.shape[i]));
    inner = 1;
  }
  if (kop !== 'argmax' && kop !== 'argmin' && src.dtype !== outDtype) {
    // the kernel writes values in its input's dtype: sums of bool/int32/uint8 need int64 input
    const cast = alloc(backend, src.shape, outDtype);
    if (cast.numel > 0) backend.copy(cast, src);
    src.dispose();
    src = cast;
  }
  if (R === 0 && kop !== 'sum' && kop !== 'prod') {
    src.dispose();
    throw argError(op, `cannot reduce over a zero-size dimension of ${x.describe()}`);
  }
  const values = alloc(backend, outShape, outDtype);
  const indices = withIndices ? alloc(backend, outShape, 'int64') : null;
  if (R === 0) backend.fill(values, kop === 'prod' ? 1 : 0);
  else if (values.numel > 0) backend.reduce(src, values, indices, outer, R, inner, kop, p);
  src.dispose();
  return { values, indices };
}

/** Expands a reduced gradient back to the input shape (a broadcast view). */
function expandGrad(g: Tensor, inShape: readonly number[], dims: number[], keepdim: boolean): Tensor {
  let k = g;
  if (!keepdim && dims.length > 0) k = reshape(g, reducedShape(inShape, dims, true));
  const e = expand(k, inShape);
  if (k !== g) k.dispose();
  return e;
}

function sumDtype(d: DType): DType {
  return isFloating(d) ? d : 'int64';
}

export function sum(x: Tensor, dim?: Dims, keepdim = false): Tensor {
  const dims = normDims('sum', dim, x.ndim);
  const { values } = reduceRaw('sum', 'sum', x, dims, keepdim, sumDtype(x.dtype));
  if (needsGrad(x)) {
    const shape = x.shape;
    attachGrad(values, 'SumBackward', [x], [], (g) => [expandGrad(g, shape, dims, keepdim)]);
  }
  return values;
}

export function mean(x: Tensor, dim?: Dims, keepdim = false): Tensor {
  const dims = normDims('mean', dim, x.ndim);
  const dtype = isFloating(x.dtype) ? x.dtype : 'float32';
  const src = dtype === x.dtype ? x : x.to(dtype);
  const { values } = reduceRaw('mean', 'mean', src, dims, keepdim, dtype);
  if (src !== x) src.dispose();
  if (needsGrad(x)) {
    const shape = x.shape;
    const n = numel(dims.map((d) => shape[d]));
    attachGrad(values, 'MeanBackward', [x], [], (g) => {
      const s = mul(g, 1 / n);
      const e = expandGrad(s, shape, dims, keepdim);
      s.dispose();
      return [e];
    });
  }
  return values;
}

/** Variance with Bessel's correction by default (correction = 1), as torch.var. */
export function variance(
  x: Tensor,
  dim?: Dims,
  options: { correction?: number; keepdim?: boolean } = {},
): Tensor {
  if (!isFloating(x.dtype)) throw dtypeError('var', `expected a floating-point tensor, got ${x.dtype}`);
  const correction = options.correction ?? 1;
  const keepdim = options.keepdim ?? false;
  const dims = normDims('var', dim, x.ndim);
  const { values } = reduceRaw('var', 'var', x, dims, keepdim, x.dtype, correction);
  if (needsGrad(x)) {
    const shape = x.shape;
    const n = numel(dims.map((d) => shape[d]));
    attachGrad(values, 'VarBackward', [x], [x], (g, [xs]) => {
      const m = mean(xs, dims, true);
      const centred = sub(xs, m);
      m.dispose();
      const scaled = mul(g, 2 / (n - correction));
      const ge = expandGrad(scaled, shape, dims, keepdim);
      scaled.dispose();
      const r = mul(centred, ge);
      centred.dispose();
      ge.dispose();
      return [r];
    });
  }
  return values;
}

/** Gradient routed to the positions equal to the result, split evenly among ties. */
function evenGrad(
  g: Tensor,
  xs: Tensor,
  res: Tensor,
  shape: readonly number[],
  dims: number[],
  keepdim: boolean,
): Tensor {
  const re = expandGrad(res, shape, dims, keepdim);
  const mask = eq(xs, re);
  re.dispose();
  const count = sum(mask, dims, true);
  const ge = expandGrad(g, shape, dims, keepdim);
  const share = div(ge, count);
  ge.dispose();
  count.dispose();
  const out = where(mask, share, 0);
  mask.dispose();
  share.dispose();
  return out;
}

function extremum(name: 'amax' | 'amin', x: Tensor, dim: Dims, keepdim: boolean): Tensor {
  const dims = normDims(name, dim, x.ndim);
  const kop: ReduceOp = name === 'amax' ? 'max' : 'min';
  const { values } = reduceRaw(name, kop, x, dims, keepdim, x.dtype);
  if (needsGrad(x)) {
    const shape = x.shape;
    attachGrad(values, name === 'amax' ? 'AmaxBackward' : 'AminBackward', [x], [x, values], (g, [xs, v]) => [
      evenGrad(g, xs, v, shape, dims, keepdim),
    ]);
  }
  return values;
}

export const amax = (x: Tensor, dim?: Dims, keepdim = false): Tensor => extremum('amax', x, dim, keepdim);
export const amin = (x: Tensor, dim?: Dims, keepdim = false): Tensor => extremum('amin', x, dim, keepdim);

/** One-hot mask of `indices` (keepdim form) along dim of shape. */
function indexMask(indices: Tensor, shape: readonly number[], dim: number): Tensor {
  const r = arange(shape[dim], undefined, 1, { device: indices.device, dtype: 'int64' });
  const view = shape.map((_, i) => (i === dim ? shape[dim] : 1));
  const rv = reshape(r, view);
  r.dispose();
  const m = eq(rv, indices);
  rv.dispose();
  return m;
}

function extremumDim(
  name: 'max' | 'min',
  x: Tensor,
  dim: number,
  keepdim: boolean,
): { values: Tensor; indices: Tensor } {
  const d = normDim(name, dim, x.ndim);
  const { values, indices } = reduceRaw(name, name, x, [d], keepdim, x.dtype, 0, true);
  if (needsGrad(x)) {
    const shape = x.shape;
    const idxKeep = keepdim ? indices! : reshape(indices!, reducedShape(shape, [d], true));
    attachGrad(values, name === 'max' ? 'MaxBackward' : 'MinBackward', [x], [idxKeep], (g, [ix]) => {
      const mask = indexMask(ix, shape, d);
      const ge = expandGrad(g, shape, [d], keepdim);
      const out = where(mask, ge, 0);
      mask.dispose();
      ge.dispose();
      return [out];
    });
    if (idxKeep !== indices) idxKeep.dispose();
  }
  return { values, indices: indices! };
}

export function max(x: Tensor): Tensor;
export function max(x: Tensor, dim: number, keepdim?: boolean): { values: Tensor; indices: Tensor };
export function max(x: Tensor, dim?: number, keepdim = false): Tensor | { values: Tensor; indices: Tensor } {
  return dim === undefined ? amax(x) : extremumDim('max', x, dim, keepdim);
}

export function min(x: Tensor): Tensor;
export function min(x: Tensor, dim: number, keepdim?: boolean): { values: Tensor; indices: Tensor };
export function min(x: Tensor, dim?: number, keepdim = false): Tensor | { values: Tensor; indices: Tensor } {
  return dim === undefined ? amin(x) : extremumDim('min', x, dim, keepdim);
}

function argext(name: 'argmax' | 'argmin', x: Tensor, dim: number | undefined, keepdim: boolean): Tensor {
  if (dim === undefined) {
    const flat = reshape(x, [-1]);
    const r = reduceRaw(name, name, flat, [0], false, 'int64').values;
    flat.dispose();
    if (!keepdim) return r;
    const k = reshape(
      r,
      x.shape.map(() => 1),
    );
    r.dispose();
    return k;
  }
  return reduceRaw(name, name, x, [normDim(name, dim, x.ndim)], keepdim, 'int64').values;
}

export const argmax = (x: Tensor, dim?: number, keepdim = false): Tensor => argext('argmax', x, dim, keepdim);
export const argmin = (x: Tensor, dim?: number, keepdim = false): Tensor => argext('argmin', x, dim, keepdim);

function requireFloat(op: string, x: Tensor): void {
  if (!isFloating(x.dtype)) {
    throw dtypeError(op, `expected a floating-point tensor, got ${x.dtype}; convert with .to('float32')`);
  }
}

/** log(sum(exp(x))) over dims, computed stably. */
export function logsumexp(x: Tensor, dim: number | readonly number[], keepdim = false): Tensor {
  requireFloat('logsumexp', x);
  const dims = normDims('logsumexp', dim, x.ndim);
  const { values } = reduceRaw('logsumexp', 'logsumexp', x, dims, keepdim, x.dtype);
  if (needsGrad(x)) {
    const shape = x.shape;
    attachGrad(values, 'LogsumexpBackward', [x], [x, values], (g, [xs, v]) => {
      const ve = expandGrad(v, shape, dims, keepdim);
      const d = sub(xs, ve);
      ve.dispose();
      const p = exp(d);
      d.dispose();
      const ge = expandGrad(g, shape, dims, keepdim);
      const r = mul(p, ge);
      p.dispose();
      ge.dispose();
      return [r];
    });
  }
  return values;
}

/** p-norm over dims (default: 2-norm of all elements). */
export function norm(x: Tensor, p = 2, dim?: Dims, keepdim = false): Tensor {
  if (!(p > 0)) throw argError('norm', `p must be positive, got ${p}`);
  requireFloat('norm', x);
  const dims = normDims('norm', dim, x.ndim);
  const { values } = reduceRaw('norm', 'norm', x, dims, keepdim, x.dtype, p);
  if (needsGrad(x)) {
    const shape = x.shape;
    attachGrad(values, 'NormBackward', [x], [x, values], (g, [xs, v]) => {
      if (p === Number.POSITIVE_INFINITY) {
        const a = xs.abs();
        const sg = xs.sign();
        const e = evenGrad(g, a, v, shape, dims, keepdim);
        const r = mul(e, sg);
        for (const t of [a, sg, e]) t.dispose();
        return [r];
      }
      // d||x||_p / dx = x * |x|^(p-2) / ||x||^(p-1); zero where the norm is zero
      const ve = expandGrad(v, shape, dims, keepdim);
      const ge = expandGrad(g, shape, dims, keepdim);
      let num: Tensor;
      if (p === 1) num = xs.sign();
      else if (p === 2) num = xs.mul(1);
      else {
        const a = xs.abs();
        const ap = a.pow(p - 2);
        num = mul(xs, ap);
        a.dispose();
        ap.dispose();
      }
      const den = p === 1 ? null : p === 2 ? ve.mul(1) : ve.pow(p - 1);
      const q = den ? div(num, den) : num;
      const zeroNorm = den ? eq(den, 0) : null;
      const safe = zeroNorm ? where(zeroNorm, 0, q) : q;
      const r = mul(safe, ge);
      for (const t of new Set([ve, ge, num, q, safe])) t.dispose();
      den?.dispose();
      zeroNorm?.dispose();
      return [r];
    });
  }
  return values;
}

/** A view of x reversed along dim (a negative stride); the copy kernels accept any strides. */
function flipView(x: Tensor, d: number): Tensor {
  const strides = [...x.strides];
  strides[d] = -strides[d];
  return x.viewAs(x.shape, strides, x.offset + (x.shape[d] - 1) * x.strides[d]);
}

/** Cumulative sum along dim. */
export function cumsum(x: Tensor, dim: number): Tensor {
  const backend = inputsBackend('cumsum', x);
  const d = normDim('cumsum', dim, x.ndim);
  const src = contiguous(x);
  const dtype = sumDtype(x.dtype);
  const s2 = dtype === src.dtype ? src : src.to(dtype);
  const out = alloc(backend, x.shape, dtype);
  if (out.numel > 0) {
    backend.cumsum(
      s2,
      out,
      numel(x.shape.slice(0, d)),
      x.ndim === 0 ? 1 : x.shape[d],
      numel(x.shape.slice(d + 1)),
    );
  }
  if (s2 !== src) s2.dispose();
  src.dispose();
  if (needsGrad(x)) {
    // reverse cumulative sum, computed as flip(cumsum(flip(g))) like torch: the shorter
    // total - cumsum(g) + g cancels catastrophically in bfloat16
    attachGrad(out, 'CumsumBackward', [x], [], (g) => {
      if (g.ndim === 0 || g.shape[d] <= 1) return [g];
      const f = flipView(g, d);
      const c = cumsum(f, d);
      f.dispose();
      const fc = flipView(c, d);
      c.dispose();
      const r = contiguous(fc);
      fc.dispose();
      return [r];
    });
  }
  return out;
}

Object.assign(Tensor.prototype, {
  sum(this: Tensor, dim?: Dims, keepdim?: boolean) {
    return sum(this, dim, keepdim);
  },
  mean(this: Tensor, dim?: Dims, keepdim?: boolean) {
    return mean(this, dim, keepdim);
  },
  var(this: Tensor, dim?: Dims, options?: { correction?: number; keepdim?: boolean }) {
    return variance(this, dim, options);
  },
  max(this: Tensor, dim?: number, keepdim?: boolean) {
    return dim === undefined ? max(this) : max(this, dim, keepdim);
  },
  min(this: Tensor, dim?: number, keepdim?: boolean) {
    return dim === undefined ? min(this) : min(this, dim, keepdim);
  },
  amax(this: Tensor, dim?: Dims, keepdim?: boolean) {
    return amax(this, dim, keepdim);
  },
  amin(this: Tensor, dim?: Dims, keepdim?: boolean) {
    return amin(this, dim, keepdim);
  },
  argmax(this: Tensor, dim?: number, keepdim?: boolean) {
    return argmax(this, dim, keepdim);
  },
  argmin(this: Tensor, dim?: number, keepdim?: boolean) {
    return argmin(this, dim, keepdim);
  },
  logsumexp(this: Tensor, dim: number | number[], keepdim?: boolean) {
    return logsumexp(this, dim, keepdim);
  },
  norm(this: Tensor, p?: number, dim?: Dims, keepdim?: boolean) {
    return norm(this, p, dim, keepdim);
  },
  cumsum(this: Tensor, dim: number) {
    return cumsum(this, dim);
  },
});
