// Softmax family: softmax / logSoftmax along any dimension, fused cross-entropy (with
// ignoreIndex, label smoothing and reductions) and NLL loss. The kernels work on contiguous
// rows of the last dimension; other dimensions are moved last around the kernel call.

import { attachGrad, needsGrad } from '../autograd/record.js';
import type { Backend } from '../backend/backend.js';
import { defineCpuKernel, native, pack } from '../backend/cpu.js';
import { getKernel, type KernelName, type KernelTable } from '../backend/kernels.js';
import { type DType, isFloating } from '../dtype.js';
import { argError, dtypeError, fmtShape, indexError, shapeError, TensorError } from '../errors.js';
import { normDim, numel, type Shape, sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';
import { alloc, inputsBackend } from './util.js';

// ---- kernels ----------------------------------------------------------------------------------

/** Result of a loss kernel: non-ignored rows, sum of the row losses, first row with a bad target or -1. */
export interface LossKernelStats {
  count: number;
  total: number;
  badRow: number;
}

/** out = softmax (or log-softmax) of each row of x; x, out contiguous [rows, n]. */
export type SoftmaxKernel = (out: Tensor, x: Tensor, log: boolean) => void;
/** dx from the saved output y and the upstream gradient g, all contiguous [rows, n]. */
export type SoftmaxBackwardKernel = (dx: Tensor, y: Tensor, g: Tensor, log: boolean) => void;
/**
 * Row losses of logits x [rows, C] against target [rows] (int32/int64). Writes lse [rows]
 * (float32, float64 for float64 x; 0 on ignored rows) and, when given, the per-row loss [rows]
 * in x's dtype.
 */
export type CrossEntropyKernel = (
  x: Tensor,
  target: Tensor,
  lse: Tensor,
  loss: Tensor | null,
  ignoreIndex: number,
  labelSmoothing: number,
) => LossKernelStats;
/** dx [rows, C] = (softmax - smoothed one-hot) * gout[row] * scale; gout has rows or 1 element. */
export type CrossEntropyBackwardKernel = (
  dx: Tensor,
  x: Tensor,
  target: Tensor,
  lse: Tensor,
  gout: Tensor,
  scale: number,
  ignoreIndex: number,
  labelSmoothing: number,
) => void;
/** Row losses -x[row, target[row]] of log-probabilities x [rows, C]. */
export type NllLossKernel = (
  x: Tensor,
  target: Tensor,
  loss: Tensor | null,
  ignoreIndex: number,
) => LossKernelStats;
/** dx [rows, C]: -gout[row] * scale at the target column, 0 elsewhere. */
export type NllLossBackwardKernel = (
  dx: Tensor,
  target: Tensor,
  gout: Tensor,
  scale: number,
  ignoreIndex: number,
) => void;

function stats(r: unknown): LossKernelStats {
  const [count, total, badRow] = r as [number, number, number];
  return { count, total, badRow };
}

defineCpuKernel('softmax', (out, x, log) => {
  pack
    .begin()
    .tensor(out)
    .tensor(x)
    .num(log ? 1 : 0);
  native.softmaxForward();
});

defineCpuKernel('softmaxBackward', (dx, y, g, log) => {
  pack
    .begin()
    .tensor(dx)
    .tensor(y)
    .tensor(g)
    .num(log ? 1 : 0);
  native.softmaxBackward();
});

defineCpuKernel('crossEntropy', (x, target, lse, loss, ignoreIndex, labelSmoothing) => {
  pack
    .begin()
    .tensor(x)
    .tensor(target)
    .tensor(lse)
    .num(loss ? 1 : 0);
  if (loss) pack.tensor(loss);
  pack.num(ignoreIndex).num(labelSmoothing);
  return stats(native.crossEntropyForward());
});

defineCpuKernel('crossEntropyBackward', (dx, x, target, lse, gout, scale, ignoreIndex, labelSmoothing) => {
  pack.begin().tensor(dx).tensor(x).tensor(target).tensor(lse).tensor(gout);
  pack.num(scale).num(ignoreIndex).num(labelSmoothing);
  native.crossEntropyBackward();
});

defineCpuKernel('nllLoss', (x, target, loss, ignoreIndex) => {
  pack
    .begin()
    .tensor(x)
    .tensor(target)
    .num(loss ? 1 : 0);
  if (loss) pack.tensor(loss);
  pack.num(ignoreIndex);
  return stats(native.nllLossForward());
});

defineCpuKernel('nllLossBackward', (dx, target, gout, scale, ignoreIndex) => {
  pack.begin().tensor(dx).tensor(target).tensor(gout).num(scale).num(ignoreIndex);
  native.nllLossBackward();
});

function kernelOf<K extends KernelName>(backend: Backend, name: K, op: string): KernelTable[K] {
  const k = getKernel(backend, name);
  if (!k)
    throw new TensorError('UNSUPPORTED', `${op}: the ${backend.device} backend has no "${name}" kernel`);
  return k;
}

// ---- layout helpers ---------------------------------------------------------------------------
// These bypass the graph on purpose: each op records one node for the whole computation.

/**
 * x with dimension d moved last, as a contiguous tensor of `dtype` (an alias of x when it already
 * is one). The caller disposes the result.
 */
function moveLast(x: Tensor, d: number, dtype: DType = x.dtype): Tensor {
  const nd = x.ndim;
  let v: Tensor;
  if (nd === 0 || d === nd - 1) v = x.viewAs(x.shape, x.strides, x.offset, false);
  else {
    const order = [...Array(nd).keys()].filter((i) => i !== d);
    order.push(d);
    v = x.viewAs(
      order.map((i) => x.shape[i]),
      order.map((i) => x.strides[i]),
      x.offset,
      false,
    );
  }
  if (v.isContiguous && dtype === x.dtype) return v;
  const c = alloc(x.backend, v.shape, dtype);
  if (c.numel > 0) x.backend.copy(c, v);
  v.dispose();
  return c;
}

/** Inverse of moveLast: r (contiguous, dimension d last) back to `shape` as a new contiguous tensor. Consumes r. */
function moveBack(r: Tensor, d: number, shape: Shape): Tensor {
  const nd = shape.length;
  if (nd === 0 || d === nd - 1) return r;
  const strides = new Array<number>(nd);
  let k = 0;
  for (let i = 0; i < nd; i++) if (i !== d) strides[i] = r.strides[k++];
  strides[d] = r.strides[nd - 1];
  const v = r.viewAs(shape, strides, r.offset, false);
  const out = alloc(r.backend, shape, r.dtype);
  if (out.numel > 0) r.backend.copy(out, v);
  v.dispose();
  r.dispose();
  return out;
}

// ---- softmax / logSoftmax ---------------------------------------------------------------------

function softmaxOp(op: 'softmax' | 'logSoftmax', x: Tensor, dim: number): Tensor {
  const backend = inputsBackend(op, x);
  if (!isFloating(x.dtype)) throw dtypeError(op, `expected a floating-point input, got ${x.describe()}`);
  const d = normDim(op, dim, x.ndim);
  const log = op === 'logSoftmax';
  const forward = kernelOf(backend, 'softmax', op);
  const xr = moveLast(x, d);
  const yr = alloc(backend, xr.shape, x.dtype);
  try {
    if (yr.numel > 0) forward(yr, xr, log);
  } catch (e) {
    yr.dispose();
    throw e;
  } finally {
    xr.dispose();
  }
  const y = moveBack(yr, d, x.shape);
  if (needsGrad(x)) {
    attachGrad(y, log ? 'LogSoftmaxBackward' : 'SoftmaxBackward', [x], [y], (g, [ys]) => {
      const backward = kernelOf(ys.backend, 'softmaxBackward', op);
      const yl = moveLast(ys, d);
      const gl = moveLast(g, d, ys.dtype);
      const dxl = alloc(ys.backend, yl.shape, ys.dtype);
      if (dxl.numel > 0) backward(dxl, yl, gl, log);
      yl.dispose();
      gl.dispose();
      return [moveBack(dxl, d, ys.shape)];
    });
  }
  return y;
}

/** Softmax along `dim`: x [..., n, ...] -> same shape and dtype. A row that is all -inf gives zeros. */
export function softmax(x: Tensor, dim: number): Tensor {
  return softmaxOp('softmax', x, dim);
}

/**
 * log(softmax(x)) along `dim`, computed stably: x [..., n, ...] -> same shape and dtype. A row
 * that is all -inf gives -inf (and a zero gradient).
 */
export function logSoftmax(x: Tensor, dim: number): Tensor {
  return softmaxOp('logSoftmax', x, dim);
}

// ---- cross-entropy / NLL ----------------------------------------------------------------------

export type LossReduction = 'mean' | 'sum' | 'none';

export interface NllLossOptions {
  /** Targets equal to this value contribute no loss and no gradient (default -100). */
  ignoreIndex?: number;
  /** 'mean' (over non-ignored targets, default), 'sum', or 'none' (one loss per target). */
  reduction?: LossReduction;
}

export interface CrossEntropyOptions extends NllLossOptions {
  /** Mixes the one-hot target with the uniform distribution: (1 - eps) * nll + eps * mean(-log p). */
  labelSmoothing?: number;
}

interface ClassRows {
  backend: Backend;
  /** The class dimension of the input. */
  cd: number;
  classes: number;
  /** The shape of the target, which is also the shape of the 'none' loss. */
  targetShape: number[];
  ignoreIndex: number;
  reduction: LossReduction;
}

/** Validates a class-index loss call (input [C] / [N, C] / [N, C, d1, ...], target [] / [N] / [N, d1, ...]). */
function classRows(op: string, input: Tensor, target: Tensor, options: NllLossOptions): ClassRows {
  const backend = inputsBackend(op, input, target);
  if (!isFloating(input.dtype))
    throw dtypeError(op, `expected a floating-point input, got ${input.describe()}`);
  if (target.dtype !== 'int64' && target.dtype !== 'int32') {
    throw dtypeError(
      op,
      `target must hold class indices as int64 or int32, got ${target.dtype}` +
        (isFloating(target.dtype) ? ' (class-probability targets are not supported)' : ''),
    );
  }
  if (input.ndim === 0) throw shapeError(op, 'input must have a class dimension, got a 0-d tensor');
  const cd = input.ndim === 1 ? 0 : 1;
  const classes = input.shape[cd];
  if (classes === 0) throw shapeError(op, `input ${fmtShape(input.shape)} has no classes`);
  const targetShape = input.shape.filter((_, i) => i !== cd);
  if (!sameShape(target.shape, targetShape)) {
    throw shapeError(
      op,
      `target ${fmtShape(target.shape)} does not match input ${fmtShape(input.shape)} (expected ${fmtShape(targetShape)})`,
    );
  }
  const ignoreIndex = options.ignoreIndex ?? -100;
  if (!Number.isInteger(ignoreIndex))
    throw argError(op, `ignoreIndex must be an integer, got ${ignoreIndex}`);
  const reduction = options.reduction ?? 'mean';
  if (reduction !== 'mean' && reduction !== 'sum' && reduction !== 'none') {
    throw argError(op, `reduction must be 'mean', 'sum' or 'none', got ${String(reduction)}`);
  }
  return { backend, cd, classes, targetShape, ignoreIndex, reduction };
}

/** The loss tensor of a reduced call: sum, or sum / count for 'mean' (NaN when every target is ignored). */
function reducedLoss(c: ClassRows, dtype: DType, s: LossKernelStats): Tensor {
  const out = alloc(c.backend, [], dtype);
  c.backend.fill(out, c.reduction === 'sum' ? s.total : s.total / s.count);
  return out;
}

function badTarget(op: string, c: ClassRows, target: Tensor, row: number): TensorError {
  const v = Number(target.toTypedArray()[row]);
  return indexError(
    op,
    `target ${v} is out of range for ${c.classes} classes (expected 0 <= target < ${c.classes}, or ignoreIndex ${c.ignoreIndex})`,
  );
}

/**
 * Cross-entropy of logits against class indices, as torch.nn.functional.cross_entropy:
 * input [C] / [N, C] / [N, C, d1, ...], target [] / [N] / [N, d1, ...] (int64 or int32) ->
 * a scalar ('mean', 'sum') or the target's shape ('none'), in the input dtype.
 */
export function crossEntropy(input: Tensor, target: Tensor, options: CrossEntropyOptions = {}): Tensor {
  const op = 'crossEntropy';
  const c = classRows(op, input, target, options);
  const eps = options.labelSmoothing ?? 0;
  if (!(eps >= 0 && eps <= 1)) throw argError(op, `labelSmoothing must be in [0, 1], got ${eps}`);
  const forward = kernelOf(c.backend, 'crossEntropy', op);
  const xr = moveLast(input, c.cd);
  const tg = moveLast(target, Math.max(target.ndim - 1, 0));
  const lse = alloc(c.backend, [numel(c.targetShape)], input.dtype === 'float64' ? 'float64' : 'float32');
  const rowLoss = c.reduction === 'none' ? alloc(c.backend, c.targetShape, input.dtype) : null;
  let s: LossKernelStats;
  try {
    s = forward(xr, tg, lse, rowLoss, c.ignoreIndex, eps);
    if (s.badRow >= 0) throw badTarget(op, c, tg, s.badRow);
  } catch (e) {
    for (const t of [xr, tg, lse, rowLoss]) t?.dispose();
    throw e;
  }
  const out = rowLoss ?? reducedLoss(c, input.dtype, s);
  if (needsGrad(input)) {
    const scale = c.reduction === 'mean' ? 1 / s.count : 1;
    const inShape = input.shape;
    const dtype = input.dtype;
    attachGrad(out, 'CrossEntropyBackward', [input], [xr, tg, lse], (g, [xs, ts, ls]) => {
      const backward = kernelOf(xs.backend, 'crossEntropyBackward', op);
      const gc = moveLast(g, Math.max(g.ndim - 1, 0), dtype);
      const dxl = alloc(xs.backend, xs.shape, dtype);
      backward(dxl, xs, ts, ls, gc, scale, c.ignoreIndex, eps);
      gc.dispose();
      return [moveBack(dxl, c.cd, inShape)];
    });
  }
  xr.dispose();
  tg.dispose();
  lse.dispose();
  return out;
}

/**
 * Negative log-likelihood of log-probabilities against class indices, as
 * torch.nn.functional.nll_loss: input [C] / [N, C] / [N, C, d1, ...], target [] / [N] /
 * [N, d1, ...] (int64 or int32) -> a scalar ('mean', 'sum') or the target's shape ('none').
 */
export function nllLoss(logProbs: Tensor, target: Tensor, options: NllLossOptions = {}): Tensor {
  const op = 'nllLoss';
  const c = classRows(op, logProbs, target, options);
  const forward = kernelOf(c.backend, 'nllLoss', op);
  const xr = moveLast(logProbs, c.cd);
  const tg = moveLast(target, Math.max(target.ndim - 1, 0));
  const rowLoss = c.reduction === 'none' ? alloc(c.backend, c.targetShape, logProbs.dtype) : null;
  let s: LossKernelStats;
  try {
    s = forward(xr, tg, rowLoss, c.ignoreIndex);
    if (s.badRow >= 0) throw badTarget(op, c, tg, s.badRow);
  } catch (e) {
    for (const t of [tg, rowLoss]) t?.dispose();
    throw e;
  } finally {
    xr.dispose();
  }
  const out = rowLoss ?? reducedLoss(c, logProbs.dtype, s);
  if (needsGrad(logProbs)) {
    const scale = c.reduction === 'mean' ? 1 / s.count : 1;
    const inShape = logProbs.shape;
    const dtype = logProbs.dtype;
    const rowShape = [...c.targetShape, c.classes];
    attachGrad(out, 'NllLossBackward', [logProbs], [tg], (g, [ts]) => {
      const backward = kernelOf(ts.backend, 'nllLossBackward', op);
      const gc = moveLast(g, Math.max(g.ndim - 1, 0), dtype);
      const dxl = alloc(ts.backend, rowShape, dtype);
      backward(dxl, ts, gc, scale, c.ignoreIndex);
      gc.dispose();
      return [moveBack(dxl, c.cd, inShape)];
    });
  }
  tg.dispose();
  return out;
}

Object.assign(Tensor.prototype, {
  softmax(this: Tensor, dim: number) {
    return softmax(this, dim);
  },
  logSoftmax(this: Tensor, dim: number) {
    return logSoftmax(this, dim);
  },
});
