// Softmax family: softmax / logSoftmax along any dimension, fused cross-entropy (with
// ignoreIndex, label smoothing and reductions) and NLL loss. The kernels work on contiguous
// rows of the last dimension; other dimensions are moved last around the kernel call.

import { attachGrad, needsGrad } from '../autograd/record.js';
import type { Backend } from '../backend/backend.js';
import { defineCpuKernel, native, pack } from '../backend/cpu.js';
import { type DType, isFloating } from '../dtype.js';
import { argError, dtypeError, fmtShape, indexError, shapeError, type TensorError } from '../errors.js';
import { untrackTensor } from '../scope.js';
import { normDim, numel, type Shape, sameShape } from '../shape.js';
import { deferCheck } from '../sync.js';
import { Tensor } from '../tensor.js';
import { alloc, inputsBackend, kernelOf } from './util.js';

// ---- kernels ----------------------------------------------------------------------------------

/**
 * What a loss kernel writes into its `stats` operand (contiguous float64 [4] on its device),
 * by index: the rows it counted (not ignored; with a bad target, those before it), the sum of
 * the row losses (accumulated in double; 0 with a bad target), the first row whose target is
 * neither ignoreIndex nor a class (-1 when there is none) and that target's value (0 when none).
 * The ops never read it on the host: they reduce from it with device ops and queue the
 * bad-target check (sync.ts).
 */
export const LOSS_STATS = { count: 0, total: 1, badRow: 2, badValue: 3 } as const;

/** out = softmax (or log-softmax) of each row of x; x, out contiguous [rows, n]. */
export type SoftmaxKernel = (out: Tensor, x: Tensor, log: boolean) => void;
/** dx from the saved output y and the upstream gradient g, all contiguous [rows, n]. */
export type SoftmaxBackwardKernel = (dx: Tensor, y: Tensor, g: Tensor, log: boolean) => void;
/**
 * Row losses of logits x [rows, C] against target [rows] (int32/int64). Writes lse [rows]
 * (float32, float64 for float64 x; 0 on ignored rows), when given the per-row loss [rows] in x's
 * dtype, and always `stats` (see {@link LOSS_STATS}). A bad target leaves lse and loss as they
 * were.
 */
export type CrossEntropyKernel = (
  x: Tensor,
  target: Tensor,
  lse: Tensor,
  loss: Tensor | null,
  ignoreIndex: number,
  labelSmoothing: number,
  stats: Tensor,
) => void;
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
/**
 * Row losses -x[row, target[row]] of log-probabilities x [rows, C] into `loss` when given, and
 * `stats` (see {@link LOSS_STATS}); a bad target leaves loss as it was.
 */
export type NllLossKernel = (
  x: Tensor,
  target: Tensor,
  loss: Tensor | null,
  ignoreIndex: number,
  stats: Tensor,
) => void;
/** dx [rows, C]: -gout[row] * scale at the target column, 0 elsewhere. */
export type NllLossBackwardKernel = (
  dx: Tensor,
  target: Tensor,
  gout: Tensor,
  scale: number,
  ignoreIndex: number,
) => void;

/**
 * Writes the native loss kernel's answer [count, total, bad row] into `stats`, adding the bad
 * target's value (the CPU is synchronous: reading the target here costs no device wait).
 */
function answerStats(stats: Tensor, target: Tensor, r: unknown): void {
  if (stats.dtype !== 'float64' || stats.numel !== 4 || !stats.isContiguous) {
    throw new Error(`loss kernel: stats must be a contiguous float64 [4] tensor, got ${stats.describe()}`);
  }
  const [count, total, badRow] = r as [number, number, number];
  const badValue = badRow >= 0 ? Number(target.toTypedArray()[badRow]) : 0;
  stats.backend.write(stats, Float64Array.of(count, total, badRow, badValue));
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

defineCpuKernel('crossEntropy', (x, target, lse, loss, ignoreIndex, labelSmoothing, stats) => {
  pack
    .begin()
    .tensor(x)
    .tensor(target)
    .tensor(lse)
    .num(loss ? 1 : 0);
  if (loss) pack.tensor(loss);
  pack.num(ignoreIndex).num(labelSmoothing);
  answerStats(stats, target, native.crossEntropyForward());
});

defineCpuKernel('crossEntropyBackward', (dx, x, target, lse, gout, scale, ignoreIndex, labelSmoothing) => {
  pack.begin().tensor(dx).tensor(x).tensor(target).tensor(lse).tensor(gout);
  pack.num(scale).num(ignoreIndex).num(labelSmoothing);
  native.crossEntropyBackward();
});

defineCpuKernel('nllLoss', (x, target, loss, ignoreIndex, stats) => {
  pack
    .begin()
    .tensor(x)
    .tensor(target)
    .num(loss ? 1 : 0);
  if (loss) pack.tensor(loss);
  pack.num(ignoreIndex);
  answerStats(stats, target, native.nllLossForward());
});

defineCpuKernel('nllLossBackward', (dx, target, gout, scale, ignoreIndex) => {
  pack.begin().tensor(dx).tensor(target).tensor(gout).num(scale).num(ignoreIndex);
  native.nllLossBackward();
});

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

// ---- loss statistics on the device ------------------------------------------------------------
// The loss kernels answer in a float64 [4] tensor (LOSS_STATS) that stays on the device: the
// reduced loss and the 'mean' gradient scale are computed from it with core kernels, and the
// bad-target check is queued on it (sync.ts), so a loss costs no host synchronisation.

/** Element i of a loss stats tensor as a 0-d view (untracked: the caller disposes it). */
function statAt(stats: Tensor, i: number): Tensor {
  return stats.viewAs([], [], stats.offset + i, false);
}

/**
 * Runs a loss kernel on a fresh float64 [4] stats operand and returns it. Stats is untracked:
 * the check queue frees it, whatever tidy() scope is open. When anything throws, stats and
 * `rowLoss` are freed.
 */
function runLossKernel(backend: Backend, rowLoss: Tensor | null, kernel: (stats: Tensor) => void): Tensor {
  let stats: Tensor | null = null;
  try {
    stats = alloc(backend, [4], 'float64');
    untrackTensor(stats);
    kernel(stats);
    return stats;
  } catch (e) {
    stats?.dispose();
    rowLoss?.dispose();
    throw e;
  }
}

/**
 * The loss tensor of a reduced call, computed on the device: the total for 'sum', total / count
 * for 'mean' (NaN when every target is ignored), divided in double and rounded once to `dtype`
 * as a fill with the host quotient would.
 */
function reducedLoss(c: ClassRows, dtype: DType, stats: Tensor): Tensor {
  const b = c.backend;
  const out = alloc(b, [], dtype);
  const total = statAt(stats, LOSS_STATS.total);
  try {
    if (c.reduction === 'sum') b.copy(out, total);
    else {
      const count = statAt(stats, LOSS_STATS.count);
      const q = dtype === 'float64' ? out : alloc(b, [], 'float64');
      b.binary(q, total, count, 'div');
      count.dispose();
      if (q !== out) {
        b.copy(out, q);
        q.dispose();
      }
    }
  } catch (e) {
    out.dispose();
    throw e;
  } finally {
    total.dispose();
  }
  return out;
}

/**
 * The upstream gradient of a 'mean' loss divided by the counted rows, on the device: g * (1 /
 * count), with 1 / count formed in double and rounded to the compute type (float32, float64 for
 * float64) and the product taken there, which is exactly what the backward kernels did with the
 * host scale 1 / count. The result has g's dtype (16-bit dtypes round the product once more).
 */
function perCountGrad(g: Tensor, count: Tensor): Tensor {
  const b = g.backend;
  const cd: DType = g.dtype === 'float64' ? 'float64' : 'float32';
  const temps: Tensor[] = [];
  const tmp = (shape: Shape, dtype: DType): Tensor => {
    const t = alloc(b, shape, dtype);
    temps.push(t);
    return t;
  };
  try {
    const inv = tmp([], 'float64');
    b.binaryScalar(inv, count, 1, 'div', true);
    let invC = inv;
    if (cd !== 'float64') {
      invC = tmp([], cd);
      b.copy(invC, inv);
    }
    let gC = g;
    if (g.dtype !== cd) {
      gC = tmp(g.shape, cd);
      b.copy(gC, g);
    }
    const prod = cd === g.dtype ? alloc(b, g.shape, cd) : tmp(g.shape, cd);
    try {
      b.binary(prod, gC, invC, 'mul');
    } catch (e) {
      prod.dispose();
      throw e;
    }
    if (cd === g.dtype) return prod;
    const out = alloc(b, g.shape, g.dtype);
    try {
      b.copy(out, prod);
    } catch (e) {
      out.dispose();
      throw e;
    }
    return out;
  } finally {
    for (const t of temps) t.dispose();
  }
}

/** The error of a bad target, built from the value the kernel reported. */
function badTarget(op: string, c: ClassRows, value: number): TensorError {
  return indexError(
    op,
    `target ${value} is out of range for ${c.classes} classes (expected 0 <= target < ${c.classes}, or ignoreIndex ${c.ignoreIndex})`,
  );
}

interface LossResult {
  out: Tensor;
  /** A view of the counted rows, for the backward of a 'mean' loss that needs a gradient (else null). */
  count: Tensor | null;
}

/**
 * Finishes a loss op after its kernel wrote `stats`: the result (the row losses for 'none', else
 * the reduction), the count the 'mean' backward divides by, and the bad-target check queued on
 * stats, which the queue then owns. A synchronous backend throws the check's error from here;
 * whatever throws, stats, the result and the count are freed first.
 */
function finishLoss(
  op: string,
  c: ClassRows,
  dtype: DType,
  stats: Tensor,
  rowLoss: Tensor | null,
  wantCount: boolean,
): LossResult {
  let out: Tensor | null = rowLoss;
  let count: Tensor | null = null;
  let queued = false;
  try {
    out ??= reducedLoss(c, dtype, stats);
    if (wantCount) count = statAt(stats, LOSS_STATS.count);
    queued = true;
    deferCheck(stats, (v) => (v[LOSS_STATS.badRow] >= 0 ? badTarget(op, c, v[LOSS_STATS.badValue]) : null));
  } catch (e) {
    if (!queued) stats.dispose();
    out?.dispose();
    count?.dispose();
    throw e;
  }
  return { out, count };
}

/**
 * Cross-entropy of logits against class indices, as torch.nn.functional.cross_entropy:
 * input [C] / [N, C] / [N, C, d1, ...], target [] / [N] / [N, d1, ...] (int64 or int32) ->
 * a scalar ('mean', 'sum') or the target's shape ('none'), in the input dtype. A target out of
 * range throws INDEX_OUT_OF_RANGE from the op on a synchronous backend, at the next host read
 * of the device on an asynchronous one.
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
  const grad = needsGrad(input);
  let res: LossResult;
  try {
    const stats = runLossKernel(c.backend, rowLoss, (st) =>
      forward(xr, tg, lse, rowLoss, c.ignoreIndex, eps, st),
    );
    res = finishLoss(op, c, input.dtype, stats, rowLoss, grad && c.reduction === 'mean');
  } catch (e) {
    for (const t of [xr, tg, lse]) t.dispose();
    throw e;
  }
  const { out, count } = res;
  if (grad) {
    const inShape = input.shape;
    const dtype = input.dtype;
    const saved = count ? [xr, tg, lse, count] : [xr, tg, lse];
    attachGrad(out, 'CrossEntropyBackward', [input], saved, (g, [xs, ts, ls, n]) => {
      const backward = kernelOf(xs.backend, 'crossEntropyBackward', op);
      let gc = moveLast(g, Math.max(g.ndim - 1, 0), dtype);
      if (n) {
        const scaled = perCountGrad(gc, n);
        gc.dispose();
        gc = scaled;
      }
      const dxl = alloc(xs.backend, xs.shape, dtype);
      try {
        backward(dxl, xs, ts, ls, gc, 1, c.ignoreIndex, eps);
      } catch (e) {
        dxl.dispose();
        throw e;
      } finally {
        gc.dispose();
      }
      return [moveBack(dxl, c.cd, inShape)];
    });
  }
  count?.dispose();
  xr.dispose();
  tg.dispose();
  lse.dispose();
  return out;
}

/**
 * Negative log-likelihood of log-probabilities against class indices, as
 * torch.nn.functional.nll_loss: input [C] / [N, C] / [N, C, d1, ...], target [] / [N] /
 * [N, d1, ...] (int64 or int32) -> a scalar ('mean', 'sum') or the target's shape ('none'). A
 * bad target throws as in crossEntropy.
 */
export function nllLoss(logProbs: Tensor, target: Tensor, options: NllLossOptions = {}): Tensor {
  const op = 'nllLoss';
  const c = classRows(op, logProbs, target, options);
  const forward = kernelOf(c.backend, 'nllLoss', op);
  const xr = moveLast(logProbs, c.cd);
  const tg = moveLast(target, Math.max(target.ndim - 1, 0));
  const rowLoss = c.reduction === 'none' ? alloc(c.backend, c.targetShape, logProbs.dtype) : null;
  const grad = needsGrad(logProbs);
  let res: LossResult;
  try {
    const stats = runLossKernel(c.backend, rowLoss, (st) => forward(xr, tg, rowLoss, c.ignoreIndex, st));
    res = finishLoss(op, c, logProbs.dtype, stats, rowLoss, grad && c.reduction === 'mean');
  } catch (e) {
    tg.dispose();
    throw e;
  } finally {
    xr.dispose();
  }
  const { out, count } = res;
  if (grad) {
    const inShape = logProbs.shape;
    const dtype = logProbs.dtype;
    const rowShape = [...c.targetShape, c.classes];
    const saved = count ? [tg, count] : [tg];
    attachGrad(out, 'NllLossBackward', [logProbs], saved, (g, [ts, n]) => {
      const backward = kernelOf(ts.backend, 'nllLossBackward', op);
      let gc = moveLast(g, Math.max(g.ndim - 1, 0), dtype);
      if (n) {
        const scaled = perCountGrad(gc, n);
        gc.dispose();
        gc = scaled;
      }
      const dxl = alloc(ts.backend, rowShape, dtype);
      try {
        backward(dxl, ts, gc, 1, c.ignoreIndex);
      } catch (e) {
        dxl.dispose();
        throw e;
      } finally {
        gc.dispose();
      }
      return [moveBack(dxl, c.cd, inShape)];
    });
  }
  count?.dispose();
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
