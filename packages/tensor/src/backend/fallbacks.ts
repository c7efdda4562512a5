// Compositions of the named kernels (KernelTable) from core ops, for backends that lack their own:
// each writes exactly what the kernel's contract says, computed with ops that every backend runs
// through its core kernels (copy, fill, unary, binary, reduce, gemm, ...). Registered with
// defineFallbackKernel; ops find them through getKernel.
//
// Rules every composition here follows:
//  - it uses only ops that reach the backend through its core methods or the indexing kernels
//    (gather runs on gatherAlong), never an op that looks up one of the kernels defined here
//    (softmax, crossEntropy, layerNorm, applyRotaryPosEmb, scaledDotProductAttention, ...), so
//    no fallback can end up calling itself;
//  - it computes in float32 for 16/32-bit floats and in float64 for float64, as the native CPU
//    kernels do: 16-bit inputs are widened first and each result is rounded to its storage
//    dtype once, when it is copied into the kernel's output;
//  - it runs under noGrad inside a tidy scope, so every temporary is freed before it returns and
//    the caller's tensors (inputs and outputs) are only read or written in place.
// Only module-level registration happens at import time: no op runs before a kernel is called.

import { noGrad } from '../autograd/graph.js';
import type { DType } from '../dtype.js';
import type { AttentionKernelOptions } from '../ops/attention.js';
import { arange, full, zeros } from '../ops/creation.js';
import {
  abs,
  add,
  div,
  eq,
  exp,
  ge,
  gelu,
  gt,
  isinf,
  isnan,
  le,
  log,
  logicalAnd,
  logicalNot,
  logicalOr,
  lt,
  maximum,
  mul,
  ne,
  neg,
  pow,
  reciprocal,
  relu,
  rsqrt,
  silu,
  sqrt,
  square,
  sub,
  where,
} from '../ops/elementwise.js';
import type { GatedActivation } from '../ops/glu.js';
import type { LinearActivation } from '../ops/linear-activation.js';
import { matmul } from '../ops/matmul.js';
import { amax, amin, sum } from '../ops/reduce.js';
import { expand, narrow, reshape, stack, to, transpose, unsqueeze } from '../ops/shape.js';
import { alloc } from '../ops/util.js';
import { checkAdamWCopy, checkAdamWLists, checkAdamWScaleTensor } from '../optim/kernels.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { defineFallbackKernel, getKernel, type KernelName, type KernelTable } from './kernels.js';

// ---- registry -----------------------------------------------------------------------------------

const table: Partial<KernelTable> = {};

/** The compositions defined in this file, by kernel name (for tests and for backends that wrap them). */
export const FALLBACK_KERNELS: Readonly<Partial<KernelTable>> = table;

/** The composition of a named kernel from core ops; throws when this file defines none. */
export function fallbackKernel<K extends KernelName>(name: K): KernelTable[K] {
  const k = table[name];
  if (!k) throw new Error(`fallbackKernel: no composition is defined for "${name}"`);
  return k as KernelTable[K];
}

function register<K extends KernelName>(name: K, fn: KernelTable[K]): void {
  table[name] = fn;
  defineFallbackKernel(name, fn);
}

// ---- helpers ------------------------------------------------------------------------------------

type Compute = 'float32' | 'float64';

/** The arithmetic dtype of the native kernels: float64 for float64 data, float32 otherwise. */
const computeOf = (d: DType): Compute => (d === 'float64' ? 'float64' : 'float32');

/** A number rounded as the compute type stores it. */
const asCompute = (v: number, c: Compute): number => (c === 'float32' ? Math.fround(v) : v);

/** Size of the last dimension (1 for a 0-d tensor, which the kernels treat as one element). */
const lastDim = (t: Tensor): number => (t.ndim === 0 ? 1 : t.shape[t.ndim - 1]);

/** Runs fn without recording the graph and frees every tensor it created. */
function run<T>(fn: () => T): T {
  return tidy(() => noGrad(fn));
}

/** Writes src (any layout with dst's element count) into dst, casting to dst's dtype. */
function store(dst: Tensor, src: Tensor): void {
  if (dst.numel === 0) return;
  dst.copy_(reshape(src, dst.shape));
}

/** x / v as a true division by v rounded to x's dtype (div(x, number) multiplies by 1 / v). */
function divBy(x: Tensor, v: number): Tensor {
  return div(x, full([], v, { dtype: x.dtype, device: x.device }));
}

/** 0, 1, ..., n - 1 as an int64 row [1, n] on t's device. */
function columns(t: Tensor, n: number): Tensor {
  return reshape(arange(0, n, 1, { dtype: 'int64', device: t.device }), [1, n]);
}

/** What the loss compositions learn from the targets, all on the device. */
interface TargetCheck {
  /** [rows] bool: the target is ignoreIndex. */
  ignored: Tensor;
  /** 0-d bool: some target is neither ignoreIndex nor a class. */
  anyBad: Tensor;
  /** The loss stats other than the total (see LOSS_STATS), each 0-d float64. */
  count: Tensor;
  badRow: Tensor;
  badValue: Tensor;
}

/**
 * Class-index targets [rows] checked as the native loss kernels check them, with device ops only
 * (no host read): the first row whose target is neither ignoreIndex nor in [0, classes) is the
 * smallest position of such a row (rows when there is none); the count covers the non-ignored
 * rows before it (all of them without one), as the native scan stops there.
 */
function checkTargets(t: Tensor, classes: number, ignoreIndex: number): TargetCheck {
  const rows = t.numel;
  const ignored = eq(t, ignoreIndex);
  const counted = logicalNot(ignored);
  const bad = logicalAnd(counted, logicalOr(lt(t, 0), ge(t, classes)));
  const pos = arange(0, rows, 1, { dtype: 'int64', device: t.device });
  const first = amin(where(bad, pos, rows));
  const anyBad = lt(first, rows);
  return {
    ignored,
    anyBad,
    count: to(sum(logicalAnd(counted, lt(pos, first))), 'float64'),
    badRow: where(anyBad, to(first, 'float64'), -1),
    // no position equals `first` when there is no bad row: the value is then 0
    badValue: sum(where(eq(pos, first), to(t, 'float64'), 0)),
  };
}

/** Writes the loss stats [count, total, badRow, badValue] (see LOSS_STATS) into `stats`. */
function storeStats(stats: Tensor, count: Tensor | number, total: Tensor | number, chk?: TargetCheck): void {
  const d = { dtype: 'float64' as const, device: stats.device };
  const scalar = (v: Tensor | number): Tensor => (typeof v === 'number' ? full([], v, d) : v);
  const badRow = chk ? chk.badRow : full([], -1, d);
  const badValue = chk ? chk.badValue : full([], 0, d);
  store(stats, stack([scalar(count), scalar(total), badRow, badValue]));
}

/**
 * The entry of each row of xs [rows, n] at column col [rows, 1], or 0 where col is not a column:
 * a masked row sum rather than gather. The other entries add exact zeros, and gather would queue
 * an index check of its own on an asynchronous backend.
 */
function pick(xs: Tensor, col: Tensor): Tensor {
  return sum(where(eq(columns(xs, xs.shape[1]), col), xs, 0), 1, true);
}

/** Rows [rows, 1] whose target is a real class: not ignoreIndex and within [0, classes). */
function validTargets(t: Tensor, classes: number, ignoreIndex: number): Tensor {
  return logicalAnd(ne(t, ignoreIndex), logicalAnd(ge(t, 0), lt(t, classes)));
}

/** The upstream gradient of a loss as a column: one value per row, or one for all rows. */
function rowGrad(gout: Tensor, rows: number, c: Compute): Tensor {
  return reshape(to(gout, c), [gout.numel === 1 ? 1 : rows, 1]);
}

// ---- softmax / log-softmax --------------------------------------------------------------------

// y = exp(x - max) / sum, or (x - max) - log(sum) for log-softmax, per row of the last dimension.
// A row whose maximum is -inf (fully masked) gives zeros (log-softmax: -inf) instead of NaN; a
// NaN anywhere in a row makes the whole row NaN.
register('softmax', (out, x, logOut) => {
  if (x.numel === 0) return;
  run(() => {
    const c = computeOf(x.dtype);
    const xs = reshape(to(x, c), [-1, lastDim(x)]);
    const m = amax(xs, 1, true);
    const dead = eq(m, Number.NEGATIVE_INFINITY);
    const shifted = sub(xs, where(dead, 0, m));
    const e = exp(shifted);
    const s = sum(e, 1, true);
    const y = logOut
      ? where(dead, Number.NEGATIVE_INFINITY, sub(shifted, log(s)))
      : where(dead, 0, mul(e, reciprocal(s)));
    store(out, y);
  });
});

// softmax: dx = y * (g - sum(g * y)); log-softmax: dx = g - exp(y) * sum(g). A log-softmax row
// that is -inf everywhere (a fully masked row) gets a zero gradient.
register('softmaxBackward', (dx, y, g, logOut) => {
  if (y.numel === 0) return;
  run(() => {
    const c = computeOf(y.dtype);
    const n = lastDim(y);
    const ys = reshape(to(y, c), [-1, n]);
    const gs = reshape(to(g, c), [-1, n]);
    let r: Tensor;
    if (!logOut) {
      const dot = sum(mul(gs, ys), 1, true);
      r = mul(ys, sub(gs, dot));
    } else {
      const total = sum(gs, 1, true);
      const dead = eq(amax(ys, 1, true), Number.NEGATIVE_INFINITY);
      r = where(dead, 0, sub(gs, mul(exp(ys), total)));
    }
    store(dx, r);
  });
});

// ---- cross-entropy ----------------------------------------------------------------------------

// Per row r with target t: lse = max + log(sum(exp(x - max))), loss = lse - (1 - eps) x[t] -
// eps * mean(x). Ignored rows get lse 0 and loss 0. The total adds the float (or double) row
// losses in double, before they are rounded to the loss dtype. A bad target leaves lse and loss
// as they were (each is rewritten with its old values) and reports total 0.
register('crossEntropy', (x, target, lse, loss, ignoreIndex, labelSmoothing, stats) =>
  run(() => {
    const n = lastDim(x);
    const rows = n === 0 ? 0 : x.numel / n;
    if (rows === 0) {
      storeStats(stats, 0, 0);
      return;
    }
    const t = reshape(target, [rows]);
    const chk = checkTargets(t, n, ignoreIndex);
    const c = computeOf(x.dtype);
    const xs = reshape(to(x, c), [rows, n]);
    const ignored = unsqueeze(chk.ignored, 1);
    const m = amax(xs, 1, true);
    const l = add(m, log(sum(exp(sub(xs, m)), 1, true)));
    // (1 - eps) is formed in the compute type from the rounded eps, as the kernel does
    const eps = asCompute(labelSmoothing, c);
    let value = sub(l, mul(pick(xs, unsqueeze(t, 1)), asCompute(1 - eps, c)));
    if (labelSmoothing !== 0) value = sub(value, divBy(mul(sum(xs, 1, true), eps), n));
    value = where(ignored, 0, value);
    store(lse, where(chk.anyBad, reshape(lse, [rows, 1]), where(ignored, 0, l)));
    if (loss) store(loss, where(chk.anyBad, reshape(to(loss, c), [rows, 1]), value));
    storeStats(stats, chk.count, where(chk.anyBad, 0, sum(to(value, 'float64'))), chk);
  }),
);

// dx[r, j] = (softmax[r, j] - eps / C - (1 - eps) [j == t_r]) * gout[r] * scale, with the softmax
// recomputed from the saved lse; rows whose target is ignored (or out of range) get zeros.
register('crossEntropyBackward', (dx, x, target, lse, gout, scale, ignoreIndex, labelSmoothing) => {
  if (x.numel === 0) return;
  run(() => {
    const c = computeOf(x.dtype);
    const n = lastDim(x);
    const rows = x.numel / n;
    const xs = reshape(to(x, c), [rows, n]);
    const t = reshape(target, [rows, 1]);
    const p = exp(sub(xs, reshape(to(lse, c), [rows, 1])));
    const off = sub(p, labelSmoothing / n);
    const d = where(eq(columns(x, n), t), sub(off, 1 - labelSmoothing), off);
    const gs = mul(rowGrad(gout, rows, c), scale);
    store(dx, where(validTargets(t, n, ignoreIndex), mul(d, gs), 0));
  });
});

// ---- NLL --------------------------------------------------------------------------------------

// Row loss -x[r, t_r] (0 on ignored rows), taken exactly from x's dtype; the total adds them in
// double. A bad target leaves loss as it was and reports total 0.
register('nllLoss', (x, target, loss, ignoreIndex, stats) =>
  run(() => {
    const n = lastDim(x);
    const rows = n === 0 ? 0 : x.numel / n;
    if (rows === 0) {
      storeStats(stats, 0, 0);
      return;
    }
    const t = reshape(target, [rows]);
    const chk = checkTargets(t, n, ignoreIndex);
    const c = computeOf(x.dtype);
    const ignored = unsqueeze(chk.ignored, 1);
    const value = where(ignored, 0, neg(pick(reshape(to(x, c), [rows, n]), unsqueeze(t, 1))));
    if (loss) store(loss, where(chk.anyBad, reshape(to(loss, c), [rows, 1]), value));
    storeStats(stats, chk.count, where(chk.anyBad, 0, sum(to(value, 'float64'))), chk);
  }),
);

// dx[r, t_r] = -gout[r] * scale, zero elsewhere and on rows whose target is ignored or out of range.
register('nllLossBackward', (dx, target, gout, scale, ignoreIndex) => {
  if (dx.numel === 0) return;
  run(() => {
    const c = computeOf(dx.dtype);
    const n = lastDim(dx);
    const rows = dx.numel / n;
    const t = reshape(target, [rows, 1]);
    const hit = logicalAnd(eq(columns(dx, n), t), validTargets(t, n, ignoreIndex));
    store(dx, where(hit, mul(neg(rowGrad(gout, rows, c)), scale), 0));
  });
});

// ---- vocabulary-parallel cross-entropy shards ---------------------------------------------------

// The maximum over the real columns [0, localReal) of each row; -inf when there is none.
register('crossEntropyShardMax', (rowMax, logits, localReal) => {
  const rows = rowMax.numel;
  if (rows === 0) return;
  if (localReal === 0) {
    rowMax.fill_(Number.NEGATIVE_INFINITY);
    return;
  }
  run(() => {
    const xs = reshape(to(logits, computeOf(logits.dtype)), [rows, lastDim(logits)]);
    store(rowMax, amax(narrow(xs, 1, 0, localReal), 1));
  });
});

// The row maximum, then the statistics against it: the shard's two kernels in turn (the backend's
// own where it has them), the bits of the two-pass forward.
register(
  'crossEntropyShardMaxStats',
  (rowMax, predicted, sumExp, shiftedSum, logits, target, start, localReal) => {
    const b = logits.backend;
    const max = getKernel(b, 'crossEntropyShardMax') ?? fallbackKernel('crossEntropyShardMax');
    const stats = getKernel(b, 'crossEntropyShard') ?? fallbackKernel('crossEntropyShard');
    max(rowMax, logits, localReal);
    stats(predicted, sumExp, shiftedSum, logits, target, rowMax, start, localReal);
  },
);

// Over the real columns [0, localReal) of each row, d = x - max: predicted = d at the target's
// column (0 when no real column of this shard is the target), sumExp = Σ exp(d), shiftedSum = Σ d.
register('crossEntropyShard', (predicted, sumExp, shiftedSum, logits, target, rowMax, start, localReal) => {
  const rows = target.numel;
  if (rows === 0) return;
  run(() => {
    const c = computeOf(logits.dtype);
    const xs = reshape(to(logits, c), [rows, lastDim(logits)]);
    const d = sub(narrow(xs, 1, 0, localReal), reshape(to(rowMax, c), [rows, 1]));
    store(predicted, pick(d, sub(reshape(target, [rows, 1]), start)));
    store(sumExp, sum(exp(d), 1));
    if (shiftedSum) store(shiftedSum, sum(d, 1));
  });
});

// dx = (p - α/K - (1 - α) [column is the target]) * g on the real columns, with p = exp((x - max)
// - lse) recomputed from the logits, and 0 on the padding columns.
register(
  'crossEntropyShardBackward',
  (dx, logits, target, rowMax, logSumExp, gradLoss, start, localReal, smoothing, vocabSize) => {
    if (dx.numel === 0) return;
    run(() => {
      const c = computeOf(logits.dtype);
      const rows = target.numel;
      const p = lastDim(logits);
      const col = (v: Tensor): Tensor => reshape(to(v, c), [rows, 1]);
      const xs = narrow(reshape(to(logits, c), [rows, p]), 1, 0, localReal);
      const prob = exp(sub(sub(xs, col(rowMax)), col(logSumExp)));
      const off = sub(prob, smoothing / vocabSize);
      const isTarget = eq(columns(xs, localReal), sub(reshape(target, [rows, 1]), start));
      const d = reshape(dx, [rows, p]);
      store(narrow(d, 1, 0, localReal), mul(where(isTarget, sub(off, 1 - smoothing), off), col(gradLoss)));
      if (localReal < p) narrow(d, 1, localReal, p - localReal).fill_(0);
    });
  },
);

// ---- LayerNorm / RMSNorm ----------------------------------------------------------------------

// Per row of n elements: mean (LayerNorm only; RMSNorm uses 0), rstd = 1 / sqrt(mean((x -
// mean)^2) + eps), y = (x - mean) * rstd * weight + bias. mean (when given) and rstd are written
// in the compute type; mean is 0 for RMSNorm.
register('normRows', (y, x, weight, bias, mean, rstd, n, eps, center) => {
  const rows = n > 0 ? x.numel / n : 0;
  if (rows === 0) return;
  run(() => {
    const c = computeOf(x.dtype);
    const xs = reshape(to(x, c), [rows, n]);
    const mu = center ? mul(sum(xs, 1, true), 1 / n) : null;
    const d = mu ? sub(xs, mu) : xs;
    const rs = rsqrt(add(mul(sum(mul(d, d), 1, true), 1 / n), eps));
    let out = mul(d, rs);
    if (weight) out = mul(out, reshape(to(weight, c), [1, n]));
    if (bias) out = add(out, reshape(to(bias, c), [1, n]));
    store(y, out);
    if (mean) {
      if (mu) store(mean, mu);
      else mean.fill_(0);
    }
    store(rstd, rs);
  });
});

// With xhat = (x - mean) * rstd and dy = g * weight:
//   dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat))   (RMSNorm: no mean(dy) term)
//   dweight = sum over rows of g * xhat, dbias = sum over rows of g.
// The saved mean is subtracted whenever it is passed, as the kernel does.
register(
  'normRowsBackward',
  (dx, g, x, weight, mean, rstd, dweight, dbias, n, center, accumulate = false, paramsIntoMain = false) => {
    const rows = n > 0 ? x.numel / n : 0;
    run(() => {
      if (rows === 0) {
        if (!paramsIntoMain) {
          dweight?.fill_(0);
          dbias?.fill_(0);
        }
        return;
      }
      const c = computeOf(x.dtype);
      const xs = reshape(to(x, c), [rows, n]);
      const gs = reshape(to(g, c), [rows, n]);
      const rs = reshape(to(rstd, c), [rows, 1]);
      const d = mean ? sub(xs, reshape(to(mean, c), [rows, 1])) : xs;
      const dy = weight ? mul(gs, reshape(to(weight, c), [1, n])) : gs;
      const k2 = mul(mul(sum(mul(dy, d), 1, true), rs), 1 / n);
      const xhat = mul(d, rs);
      const centred = center ? sub(dy, mul(sum(dy, 1, true), 1 / n)) : dy;
      const gx = mul(rs, sub(centred, mul(xhat, k2)));
      // accumulate: dx + the gradient rounded to dx's dtype (the engine's add of the two)
      store(dx, accumulate ? add(reshape(dx, [rows, n]), to(gx, dx.dtype)) : gx);
      // paramsIntoMain: the sums added to the float32 main gradients, unrounded
      const gw = dweight ? sum(mul(gs, xhat), 0) : null;
      const gb = dbias ? sum(gs, 0) : null;
      if (dweight && gw) store(dweight, paramsIntoMain ? add(reshape(dweight, [n]), gw) : gw);
      if (dbias && gb) store(dbias, paramsIntoMain ? add(reshape(dbias, [n]), gb) : gb);
    });
  },
);

// ---- RoPE -------------------------------------------------------------------------------------

// x [B, H, S, D], cos/sin [B, S, R] (any strides, batch stride 0 for shared tables). With
// halves x1 = x[:R/2], x2 = x[R/2:R] and the matching halves c1, c2, s1, s2 of cos and sin:
//   forward  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
//   inverse  y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1   (the transpose: the gradient w.r.t. x)
// Channels R..D are copied unchanged. Arithmetic is in float64 when x or the tables are float64.
register('ropeApply', (out, x, cos, sin, inverse) => {
  if (x.numel === 0) return;
  run(() => {
    const c: Compute = x.dtype === 'float64' || cos.dtype === 'float64' ? 'float64' : 'float32';
    const D = x.shape[3];
    const R = cos.shape[2];
    const half = R / 2;
    const xs = to(x, c);
    const x1 = narrow(xs, 3, 0, half);
    const x2 = narrow(xs, 3, half, half);
    // [B, S, R] -> [B, 1, S, R]: one table row per (batch, position), shared by the heads
    const cs = unsqueeze(to(cos, c), 1);
    const sn = unsqueeze(to(sin, c), 1);
    const c1 = narrow(cs, 3, 0, half);
    const c2 = narrow(cs, 3, half, half);
    const s1 = narrow(sn, 3, 0, half);
    const s2 = narrow(sn, 3, half, half);
    const y1 = inverse ? add(mul(x1, c1), mul(x2, s2)) : sub(mul(x1, c1), mul(x2, s1));
    const y2 = inverse ? sub(mul(x2, c2), mul(x1, s1)) : add(mul(x2, c2), mul(x1, s2));
    store(narrow(out, 3, 0, half), y1);
    store(narrow(out, 3, half, half), y2);
    if (R < D) store(narrow(out, 3, R, D - R), narrow(x, 3, R, D - R));
  });
});

// ---- gated activations (SwiGLU / GeGLU) -------------------------------------------------------

/** act(gate) with the unary op of the activation. */
function activate(gate: Tensor, activation: GatedActivation): Tensor {
  return activation === 'swiglu' ? silu(gate) : gelu(gate, activation === 'geglu-tanh' ? 'tanh' : 'none');
}

/** d * act'(gate) through the backend's core activation-gradient kernel (the unary ops' backward). */
function activationGrad(gate: Tensor, d: Tensor, activation: GatedActivation): Tensor {
  const out = alloc(gate.backend, gate.shape, gate.dtype);
  const op =
    activation === 'swiglu' ? 'siluBackward' : activation === 'geglu' ? 'geluBackward' : 'geluTanhBackward';
  gate.backend.binary(out, gate, d, op);
  return out;
}

// x [rows, 2f] = [gate, up]: out = act(gate) * up, in the compute type (the composition
// mul(act(gate), up) of the unary ops, evaluated in float32 for 16-bit data).
register('gatedActivation', (out, x, activation) => {
  if (out.numel === 0) return;
  run(() => {
    const c = computeOf(x.dtype);
    const f = lastDim(out);
    const xs = reshape(to(x, c), [-1, 2 * f]);
    store(out, mul(activate(narrow(xs, 1, 0, f), activation), narrow(xs, 1, f, f)));
  });
});

// dx = [dgate, dup] with dgate = (g * up) * act'(gate) and dup = g * act(gate).
register('gatedActivationBackward', (dx, g, x, activation) => {
  if (dx.numel === 0) return;
  run(() => {
    const c = computeOf(x.dtype);
    const f = lastDim(g);
    const xs = reshape(to(x, c), [-1, 2 * f]);
    const gs = reshape(to(g, c), [-1, f]);
    const gate = narrow(xs, 1, 0, f);
    const up = narrow(xs, 1, f, f);
    const d = reshape(dx, [-1, 2 * f]);
    store(narrow(d, 1, 0, f), activationGrad(gate, mul(gs, up), activation));
    store(narrow(d, 1, f, f), mul(gs, activate(gate, activation)));
  });
});

// ---- linear with bias -------------------------------------------------------------------------

// out = x @ weight^T + bias as linear() computes it without the fused kernel: the GEMM rounded to
// the storage dtype, then the bias added (a second rounding for 16-bit data, unlike the kernel).
// Kept that way on purpose: a backend without the kernel gives exactly what linear() gives.
register('linearBias', (out, x, weight, bias) => {
  if (out.numel === 0) return;
  run(() => {
    store(out, add(matmul(x, transpose(weight, 0, 1)), bias));
  });
});

// pre = x @ weight^T (+ bias) as linear() computes it without the fused kernels (the GEMM rounded
// to the storage dtype, then the bias added), out = act(pre) by the unary op: three roundings for
// 16-bit data where the kernel has one for out and one for preAct. Kept that way on purpose: a
// backend without the kernel gives exactly what linearActivation's composition gives.
register('linearBiasActivation', (out, preAct, x, weight, bias, activation) => {
  if (out.numel === 0) return;
  run(() => {
    const y = matmul(x, transpose(weight, 0, 1));
    const pre = bias ? add(y, bias) : y;
    if (preAct) store(preAct, pre);
    store(out, linearActivate(pre, activation));
  });
});

/** act(x) by the unary op of a linear activation. */
function linearActivate(x: Tensor, activation: LinearActivation): Tensor {
  return activation === 'relu' ? relu(x) : gelu(x, activation === 'gelu-tanh' ? 'tanh' : 'none');
}

// gradWeight = g^T @ x (one GEMM) and gradBias = the sum of g's rows (a reduction over dim 0),
// each accumulated in the compute type and rounded once to the storage dtype.
register('linearWeightBiasGrad', (gradWeight, gradBias, g, x) =>
  run(() => {
    if (gradWeight.numel > 0) store(gradWeight, matmul(transpose(g, 0, 1), x));
    if (gradBias.numel > 0) store(gradBias, sum(g, 0));
  }),
);

// mainGrad += g^T @ x: g and x cast to float32 (exact for 16-bit values), then one float32 GEMM
// with beta 1 into mainGrad, so the products are summed in float32 and added before mainGrad's
// rounding, as the devices' fused kernel does (in another summation order).
register('linearWeightGradAccumulate', (mainGrad, g, x) =>
  run(() => {
    const [M, N] = g.shape;
    const K = x.shape[1];
    if (M === 0 || N === 0 || K === 0) return;
    const gf = g.dtype === 'float32' ? g : to(g, 'float32');
    const xf = x.dtype === 'float32' ? x : to(x, 'float32');
    // mainGrad [N, K] = g^T [N, M] @ x [M, K]: the GEMM's A is g read transposed
    mainGrad.backend.gemm(
      1,
      N,
      K,
      M,
      { tensor: gf, bs: 0, rs: gf.strides[1], cs: gf.strides[0] },
      { tensor: xf, bs: 0, rs: xf.strides[0], cs: xf.strides[1] },
      { tensor: mainGrad, bs: 0, rs: K, cs: 1 },
      1,
      1,
    );
  }),
);

// out = residual, then out += x @ weight^T by one core GEMM with beta 1 (the product accumulated in
// the compute type and added to the residual before out's one rounding, the devices' numerics; the
// linearResidual op itself keeps linear + add where a backend has no kernel of its own).
register('linearResidual', (out, x, weight, residual) =>
  run(() => {
    const [M, K] = x.shape;
    const N = weight.shape[0];
    if (M === 0 || N === 0) return;
    if (residual !== out) store(out, residual);
    if (K === 0) return;
    out.backend.gemm(
      1,
      M,
      N,
      K,
      { tensor: x, bs: 0, rs: x.strides[0], cs: x.strides[1] },
      { tensor: weight, bs: 0, rs: weight.strides[1], cs: weight.strides[0] },
      { tensor: out, bs: 0, rs: out.strides[0], cs: 1 },
      1,
      1,
    );
  }),
);

// ---- grouped GEMM -----------------------------------------------------------------------------

// One core gemm per problem (c = a @ b, c not read): each product exactly as matmul computes it.
register('groupedGemm', (problems) => {
  for (const p of problems) p.c.tensor.backend.gemm(1, p.m, p.n, p.k, p.a, p.b, p.c, 1, 0);
});

// ---- attention --------------------------------------------------------------------------------

/** A kv tensor [B, Hkv, S, X] repeated to [B, Hkv * group, S, X] (query head h reads kv head h / group). */
function repeatHeads(t: Tensor, group: number): Tensor {
  if (group === 1) return t;
  const [B, H, S, X] = t.shape;
  return reshape(expand(unsqueeze(t, 2), [B, H, group, S, X]), [B, H * group, S, X]);
}

/** Gradients [B, Hkv * group, S, X] of repeated kv heads, summed back to [B, Hkv, S, X]. */
function sumHeads(t: Tensor, group: number): Tensor {
  if (group === 1) return t;
  const [B, H, S, X] = t.shape;
  return sum(reshape(t, [B, H / group, group, S, X]), 2);
}

/**
 * Which keys each query may attend to, broadcastable to [B, Hq, Sq, Sk], or null when all:
 * causal (key j <= query i, top-left aligned), the packed sequence of cuSeqlens (query and key
 * in the same sequence) and a boolean mask (true = attend) combined with AND.
 */
function allowedKeys(o: AttentionKernelOptions, ref: Tensor, Sq: number, Sk: number): Tensor | null {
  let allowed: Tensor | null = null;
  const both = (m: Tensor): void => {
    allowed = allowed ? logicalAnd(allowed, m) : m;
  };
  const rowIds = (len: number): Tensor => arange(0, len, 1, { dtype: 'int64', device: ref.device });
  if (o.causal) both(le(reshape(rowIds(Sk), [1, Sk]), reshape(rowIds(Sq), [Sq, 1])));
  if (o.cuSeqlens) {
    // sequence id of token i: how many sequence starts cu[s] are <= i (cu[0] = 0 counts for all)
    const starts = reshape(to(o.cuSeqlens, 'int64'), [1, o.cuSeqlens.numel]);
    const seq = sum(le(starts, reshape(rowIds(Sq), [Sq, 1])), 1);
    both(eq(reshape(seq, [Sq, 1]), reshape(seq, [1, Sq])));
  }
  if (o.mask && o.mask.dtype === 'bool') both(o.mask);
  return allowed;
}

/** Scaled scores q k^T * scale [B, Hq, Sq, Sk] in the compute type, plus an additive mask. */
function scores(q: Tensor, k: Tensor, o: AttentionKernelOptions): Tensor {
  const s = mul(matmul(q, transpose(k, 2, 3)), o.scale);
  return o.mask && o.mask.dtype !== 'bool' ? add(s, to(o.mask, s.dtype as Compute)) : s;
}

// out = softmax(scores over the allowed keys) v per query row, lse = max + log(sum); a row with
// nothing to attend to (no allowed key, or every score -inf) gives zeros and lse = -inf.
register('attentionForward', (out, lse, q, k, v, opts) => {
  if (out.numel === 0) return;
  run(() => {
    const c = computeOf(q.dtype);
    const [, Hq, Sq] = q.shape;
    const [, Hkv, Sk] = k.shape;
    if (Sk === 0) {
      out.fill_(0);
      lse.fill_(Number.NEGATIVE_INFINITY);
      return;
    }
    const group = Hq / Hkv;
    const ks = repeatHeads(to(k, c), group);
    const vs = repeatHeads(to(v, c), group);
    let s = scores(to(q, c), ks, opts);
    const allowed = allowedKeys(opts, q, Sq, Sk);
    if (allowed) s = where(allowed, s, Number.NEGATIVE_INFINITY);
    const m = amax(s, 3, true);
    const p = exp(sub(s, where(eq(m, Number.NEGATIVE_INFINITY), 0, m)));
    const l = sum(p, 3, true);
    const some = gt(l, 0);
    // dropout scales the probabilities after the softmax: (P ∘ M) V, the lse unchanged
    const kept = opts.dropout ? mul(p, to(opts.dropout, c)) : p;
    store(out, mul(matmul(kept, vs), where(some, reciprocal(l), 0)));
    store(lse, where(some, add(m, log(l)), Number.NEGATIVE_INFINITY));
  });
});

// With P recomputed from the saved lse (0 outside the allowed keys and on rows with lse = -inf),
// delta = rowsum(dO * O), dS = P * (dO V^T - delta):
//   dq = scale dS K,  dk = scale dS^T Q,  dv = P^T dO
// where dk and dv add up the query heads that share a kv head. With a dropout mask M (O = (P ∘ M) V):
// dS = P * (M ∘ dO V^T - delta), dv = (P ∘ M)^T dO, and delta = rowsum(dO * O) still holds.
register('attentionBackward', (dq, dk, dv, g, q, k, v, out, lse, opts) => {
  if (dq.numel + dk.numel + dv.numel === 0) return;
  run(() => {
    const c = computeOf(q.dtype);
    const [, Hq, Sq] = q.shape;
    const [, Hkv, Sk] = k.shape;
    if (Sq === 0 || Sk === 0) {
      for (const t of [dq, dk, dv]) if (t.numel > 0) t.fill_(0);
      return;
    }
    const group = Hq / Hkv;
    const qs = to(q, c);
    const ks = repeatHeads(to(k, c), group);
    const vs = repeatHeads(to(v, c), group);
    const gs = to(g, c);
    const L = unsqueeze(to(lse, c), 3);
    let keep = ne(L, Number.NEGATIVE_INFINITY);
    const allowed = allowedKeys(opts, q, Sq, Sk);
    if (allowed) keep = logicalAnd(keep, allowed);
    const p = where(keep, exp(sub(scores(qs, ks, opts), L)), 0);
    const delta = sum(mul(gs, to(out, c)), 3, true);
    const drop = opts.dropout ? to(opts.dropout, c) : null;
    const dP = matmul(gs, transpose(vs, 2, 3));
    const dS = mul(p, sub(drop ? mul(dP, drop) : dP, delta));
    store(dq, mul(matmul(dS, ks), opts.scale));
    store(dk, sumHeads(mul(matmul(transpose(dS, 2, 3), qs), opts.scale), group));
    store(dv, sumHeads(matmul(transpose(drop ? mul(p, drop) : p, 2, 3), gs), group));
  });
});

// ---- optimizers -------------------------------------------------------------------------------

/** t as a flat vector in the compute type (a view when it already has that dtype). */
const flat = (t: Tensor, c: Compute): Tensor => reshape(to(t, c), [-1]);

// torch.optim.AdamW's update in the kernel's order of operations, with every scalar rounded to
// the compute type: p = p * decay + negStep * m / (sqrt(v) / bc2Sqrt + eps), after
// m = m * beta1 + (1 - beta1) g and v = v * beta2 + (1 - beta2) g g.
// gradScale multiplies the gradient first, in its own dtype (as an in-place mul would); `copy`
// receives the new parameter converted to its dtype. A gradScaleTensor is that scale where the
// update runs: every output is selected between its new and old value by whether it is finite.
register('adamwStep', (p, g, m, v, s, copy) => {
  if (copy) checkAdamWCopy('adamwStep', p, copy);
  checkAdamWScaleTensor('adamwStep', p, s);
  if (p.numel === 0) return;
  run(() => {
    const c = computeOf(p.dtype);
    const ps = flat(p, c);
    const st = s.gradScaleTensor ? reshape(s.gradScaleTensor, []) : null;
    let scaled = g;
    if (st) {
      const gc = computeOf(g.dtype);
      scaled = to(mul(to(g, gc), to(st, gc)), g.dtype);
    } else if (s.gradScale !== undefined && s.gradScale !== 1) scaled = mul(g, s.gradScale);
    const gs = flat(scaled, c);
    const decayed = mul(ps, s.decay);
    const mi = add(mul(flat(m, c), s.beta1), mul(gs, 1 - s.beta1));
    const vi = add(mul(flat(v, c), s.beta2), mul(mul(gs, 1 - s.beta2), gs));
    const denom = add(divBy(sqrt(vi), s.bc2Sqrt), s.eps);
    const next = add(decayed, div(mul(mi, s.negStep), denom));
    if (!st) {
      store(m, mi);
      store(v, vi);
      store(p, next);
      if (copy) store(copy, p);
      return;
    }
    // the step skipped where the scale is not finite: each output keeps its value
    const ok = logicalNot(logicalOr(isnan(st), isinf(st)));
    const copyNext = copy ? where(ok, reshape(to(next, copy.dtype), [-1]), reshape(copy, [-1])) : null;
    store(m, where(ok, mi, flat(m, c)));
    store(v, where(ok, vi, flat(v, c)));
    store(p, where(ok, next, ps));
    if (copy && copyNext) store(copy, copyNext);
  });
});

// adamwStep per tensor, as the backend runs it: its own kernel, else the composition above (which
// never looks up adamwStepMulti, so this cannot call itself).
register('adamwStepMulti', (ps, gs, ms, vs, s, copies) => {
  checkAdamWLists(ps, gs, ms, vs, copies);
  for (let i = 0; i < ps.length; i++) {
    const one = getKernel(ps[i].backend, 'adamwStep') ?? fallbackKernel('adamwStep');
    one(ps[i], gs[i], ms[i], vs[i], s, copies?.[i] ?? null);
  }
});

// torch.optim.SGD: d = g + weightDecay p; with a buffer, b = first ? d : b * momentum +
// (1 - dampening) d and d = nesterov ? d + momentum b : b; then p = p - lr d.
register('sgdStep', (p, g, buf, s) => {
  if (p.numel === 0) return;
  run(() => {
    const c = computeOf(p.dtype);
    const ps = flat(p, c);
    let d = flat(g, c);
    if (s.weightDecay !== 0) d = add(d, mul(ps, s.weightDecay));
    if (buf) {
      const b = s.first ? d : add(mul(flat(buf, c), s.momentum), mul(d, 1 - s.dampening));
      store(buf, b);
      d = s.nesterov ? add(d, mul(b, s.momentum)) : b;
    }
    store(p, add(ps, mul(d, -s.lr)));
  });
});

// sum(|x|^p) accumulated in double (max |x| for p = +-Infinity) into the 0-d float64 `out`;
// NaN propagates; 0 when empty.
// With `accumulate`, out + that (max(out, that), NaN winning).
// One normPowerSum a tensor, in list order (the backend's own where it has it): the first writes
// out unless accumulating, the others accumulate.
register('normPowerSumMulti', (ts, p, out, accumulate = false) => {
  const one = getKernel(out.backend, 'normPowerSum') ?? fallbackKernel('normPowerSum');
  let acc = accumulate;
  for (const t of ts) {
    if (t.numel === 0) continue;
    one(t, p, out, acc);
    acc = true;
  }
  if (!acc) out.fill_(0);
});

register('normPowerSum', (t, p, out, accumulate = false) => {
  run(() => {
    const isMax = Math.abs(p) === Number.POSITIVE_INFINITY;
    let s: Tensor;
    if (t.numel === 0) s = zeros([], { dtype: 'float64', device: out.device });
    else {
      const a = abs(to(t, 'float64'));
      if (isMax) s = amax(a);
      else if (p === 2) s = sum(square(a));
      else if (p === 1) s = sum(a);
      else s = sum(pow(a, p));
    }
    if (accumulate) {
      const prev = reshape(out, []);
      s = isMax ? maximum(prev, s) : add(prev, s);
    }
    store(out, s);
  });
});

// Sets the float32 [1] flag foundInf to 1 when t holds inf or NaN (checked before scaling; never
// resets it); t is multiplied by invScale in place (in its own dtype's arithmetic) unless
// invScale is 1.
register('unscaleCheck', (t, invScale, foundInf) => {
  if (t.numel === 0) return;
  run(() => {
    const found = gt(sum(logicalOr(isnan(t), isinf(t))), 0);
    store(foundInf, where(found, 1, reshape(foundInf, [])));
    if (invScale !== 1) t.copy_(mul(t, invScale));
  });
});

// dst += src rounded to dst's dtype (the cast, then the add in dst's dtype).
register('accumulateGrad', (dst, src) => {
  run(() => {
    const s = src.dtype === dst.dtype ? src : to(src, dst.dtype);
    dst.backend.binary(dst, dst, s, 'add');
  });
});
