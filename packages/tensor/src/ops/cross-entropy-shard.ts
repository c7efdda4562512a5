// The per-rank kernels of a vocabulary-parallel cross-entropy (Megatron's cross_entropy.py). A
// rank holds the columns [start, start + P) of the vocabulary, the last ones possibly padding. The
// forward reads its logits twice in place (the row maximum before the group's max all-reduce, then
// three numbers per row that the group sums; once where one rank holds the whole vocabulary and the
// backend has crossEntropyShardMaxStats) and the backward recomputes the softmax from the
// logits, so nothing of size [rows, P] is allocated by the forward or outlives it but the logits
// themselves. The group reductions live in @megapatch/parallel.

import type { Backend } from '../backend/backend.js';
import { defineCpuKernel, native, pack } from '../backend/cpu.js';
import { type DType, isFloating } from '../dtype.js';
import { argError, dtypeError, fmtShape, shapeError } from '../errors.js';
import type { Tensor } from '../tensor.js';
import { alloc, contiguousRaw, inputsBackend, kernelOf } from './util.js';

// ---- kernels ----------------------------------------------------------------------------------

/**
 * rowMax [R] (float32; float64 for float64 logits) = the maximum of each row of logits [R, P]
 * (contiguous rows) over its real columns [0, localReal); -inf when localReal is 0.
 */
export type CrossEntropyShardMaxKernel = (rowMax: Tensor, logits: Tensor, localReal: number) => void;

/**
 * Row statistics of one vocabulary shard. logits [R, P] (contiguous rows, any float dtype),
 * target [R] (int32/int64 global ids), rowMax [R] (the group-wide maximum of each row, at least
 * every real logit of it). Columns [0, localReal) are real, the rest is vocabulary padding and is
 * left out. Writes, in the compute dtype (float32; float64 for float64 logits), each contiguous [R]:
 * predicted = x[t - start] - max when the target's column is a real column of this shard, else 0;
 * sumExp = Σ exp(x - max); shiftedSum (when given) = Σ (x - max), over the real columns.
 */
export type CrossEntropyShardKernel = (
  predicted: Tensor,
  sumExp: Tensor,
  shiftedSum: Tensor | null,
  logits: Tensor,
  target: Tensor,
  rowMax: Tensor,
  start: number,
  localReal: number,
) => void;

/**
 * Both of the above in one pass over the logits, for a vocabulary held whole by one rank (a group
 * of one: no all-reduce between the maximum and the statistics): rowMax [R] as
 * {@link CrossEntropyShardMaxKernel} writes it, and predicted, sumExp and shiftedSum against it as
 * {@link CrossEntropyShardKernel} does. A device kernel keeps a running maximum and rescales its sum
 * of exponentials when the maximum grows (online log-sum-exp): sumExp and shiftedSum may then differ
 * from the two-pass values in their last bits; rowMax and predicted do not.
 */
export type CrossEntropyShardMaxStatsKernel = (
  rowMax: Tensor,
  predicted: Tensor,
  sumExp: Tensor,
  shiftedSum: Tensor | null,
  logits: Tensor,
  target: Tensor,
  start: number,
  localReal: number,
) => void;

/**
 * dx [R, P] in the logits' dtype = (softmax - (1 - α)·onehot(target) - α / vocabSize) · gradLoss
 * on the real columns [0, localReal), 0 on the padding, with softmax = exp((x - rowMax) -
 * logSumExp) recomputed from the logits. rowMax, logSumExp (log of the group's Σ exp(x - max)) and
 * gradLoss are [R] in the compute dtype; α is the smoothing already scaled to K/(K-1) (Megatron).
 */
export type CrossEntropyShardBackwardKernel = (
  dx: Tensor,
  logits: Tensor,
  target: Tensor,
  rowMax: Tensor,
  logSumExp: Tensor,
  gradLoss: Tensor,
  start: number,
  localReal: number,
  smoothing: number,
  vocabSize: number,
) => void;

defineCpuKernel('crossEntropyShardMax', (rowMax, logits, localReal) => {
  pack.begin().tensor(rowMax).tensor(logits).num(localReal);
  native.crossEntropyShardMax();
});

defineCpuKernel(
  'crossEntropyShard',
  (predicted, sumExp, shiftedSum, logits, target, rowMax, start, localReal) => {
    pack
      .begin()
      .tensor(predicted)
      .tensor(sumExp)
      .num(shiftedSum ? 1 : 0);
    if (shiftedSum) pack.tensor(shiftedSum);
    pack.tensor(logits).tensor(target).tensor(rowMax).num(start).num(localReal);
    native.crossEntropyShardForward();
  },
);

defineCpuKernel(
  'crossEntropyShardBackward',
  (dx, logits, target, rowMax, logSumExp, gradLoss, start, localReal, smoothing, vocabSize) => {
    pack.begin().tensor(dx).tensor(logits).tensor(target).tensor(rowMax).tensor(logSumExp).tensor(gradLoss);
    pack.num(start).num(localReal).num(smoothing).num(vocabSize);
    native.crossEntropyShardBackward();
  },
);

// ---- the helper ops ---------------------------------------------------------------------------

/** Where this rank's vocabulary slice sits: global id of column 0 and its count of real columns. */
export interface CrossEntropyShardLayout {
  /** Global vocabulary id of the slice's column 0. */
  start: number;
  /** Columns [0, localReal) are real vocabulary entries; the rest (up to P) is padding. */
  localReal: number;
}

interface Checked {
  backend: Backend;
  rows: number;
  partition: number;
  compute: DType;
}

function checkShard(
  op: string,
  logits: Tensor,
  target: Tensor,
  layout: CrossEntropyShardLayout,
  rowVectors: readonly [string, Tensor][],
): Checked {
  const backend = inputsBackend(op, logits, target, ...rowVectors.map(([, t]) => t));
  if (!isFloating(logits.dtype))
    throw dtypeError(op, `logits must be floating point, got ${logits.describe()}`);
  if (target.dtype !== 'int64' && target.dtype !== 'int32')
    throw dtypeError(op, `target must hold int64 or int32 ids, got ${target.dtype}`);
  if (logits.ndim < 1) throw shapeError(op, 'logits must have a vocabulary dimension, got a 0-d tensor');
  const partition = logits.shape[logits.ndim - 1];
  const lead = logits.shape.slice(0, -1);
  if (target.ndim !== lead.length || target.shape.some((d, i) => d !== lead[i])) {
    throw shapeError(
      op,
      `target ${fmtShape(target.shape)} does not match logits ${fmtShape(logits.shape)} without their last dim`,
    );
  }
  const { start, localReal } = layout;
  if (!Number.isSafeInteger(start)) throw argError(op, `start must be an integer, got ${start}`);
  if (!Number.isInteger(localReal) || localReal < 0 || localReal > partition)
    throw argError(op, `localReal must be an integer in [0, ${partition}], got ${localReal}`);
  const rows = target.numel;
  const compute: DType = logits.dtype === 'float64' ? 'float64' : 'float32';
  for (const [name, t] of rowVectors) {
    if (t.numel !== rows)
      throw shapeError(op, `${name} must have one element per row (${rows}), got ${t.describe()}`);
    if (!isFloating(t.dtype)) throw dtypeError(op, `${name} must be floating point, got ${t.describe()}`);
  }
  return { backend, rows, partition, compute };
}

/**
 * The maximum over the real columns [0, localReal) of each row of this rank's logits [..., P] ->
 * [R] in float32 (float64 for float64 logits), -inf where localReal is 0: the first step of the
 * vocabulary-parallel cross-entropy, before the group's max all-reduce. Reads the real columns in
 * place (no copy of a padded slice). Outside the graph; one kernel call.
 */
export function crossEntropyShardMax(logits: Tensor, localReal: number): Tensor {
  const op = 'crossEntropyShardMax';
  const backend = inputsBackend(op, logits);
  if (!isFloating(logits.dtype))
    throw dtypeError(op, `logits must be floating point, got ${logits.describe()}`);
  if (logits.ndim < 1) throw shapeError(op, 'logits must have a vocabulary dimension, got a 0-d tensor');
  const partition = logits.shape[logits.ndim - 1];
  if (!Number.isInteger(localReal) || localReal < 0 || localReal > partition)
    throw argError(op, `localReal must be an integer in [0, ${partition}], got ${localReal}`);
  const rows = logits.shape.slice(0, -1).reduce((a, b) => a * b, 1);
  const out = alloc(backend, [rows], logits.dtype === 'float64' ? 'float64' : 'float32');
  if (rows === 0) return out;
  const x = contiguousRaw(logits);
  try {
    kernelOf(backend, 'crossEntropyShardMax', op)(out, x, localReal);
  } catch (e) {
    out.dispose();
    throw e;
  } finally {
    x.dispose();
  }
  return out;
}

/**
 * Row statistics of this rank's vocabulary slice: logits [..., P] (float dtype), target [...]
 * (int32/int64 global ids), rowMax [...] (the group-wide row maximum) -> [2, R] or, with
 * `withShiftedSum`, [3, R] in float32 (float64 for float64 logits), R = target.numel, holding
 * predicted, sumExp and shiftedSum (see {@link CrossEntropyShardKernel}) stacked so that one
 * all-reduce sums them over the group. Outside the graph; one kernel call.
 */
export function crossEntropyShardStats(
  logits: Tensor,
  target: Tensor,
  rowMax: Tensor,
  layout: CrossEntropyShardLayout & { withShiftedSum?: boolean },
): Tensor {
  const op = 'crossEntropyShardStats';
  const c = checkShard(op, logits, target, layout, [['rowMax', rowMax]]);
  const kernel = kernelOf(c.backend, 'crossEntropyShard', op);
  return statRows(c, layout, (rows, use) =>
    kernel(
      rows[0],
      rows[1],
      rows[2],
      use(contiguousRaw(logits)),
      use(contiguousRaw(target)),
      use(contiguousRaw(rowMax, c.compute)),
      layout.start,
      layout.localReal,
    ),
  );
}

/**
 * {@link crossEntropyShardMax} and {@link crossEntropyShardStats} in one call, for a vocabulary that
 * one rank holds whole (the group's reductions are then no-ops): -> the row maximum [R] and the
 * statistics [2 or 3, R] against it. Where the backend has its own kernel the logits are read once
 * instead of twice (see {@link CrossEntropyShardMaxStatsKernel}). Outside the graph; one kernel call.
 */
export function crossEntropyShardMaxStats(
  logits: Tensor,
  target: Tensor,
  layout: CrossEntropyShardLayout & { withShiftedSum?: boolean },
): { rowMax: Tensor; stats: Tensor } {
  const op = 'crossEntropyShardMaxStats';
  const c = checkShard(op, logits, target, layout, []);
  const kernel = kernelOf(c.backend, 'crossEntropyShardMaxStats', op);
  const rowMax = alloc(c.backend, [c.rows], c.compute);
  try {
    const stats = statRows(c, layout, (rows, use) =>
      kernel(
        rowMax,
        rows[0],
        rows[1],
        rows[2],
        use(contiguousRaw(logits)),
        use(contiguousRaw(target)),
        layout.start,
        layout.localReal,
      ),
    );
    return { rowMax, stats };
  } catch (e) {
    rowMax.dispose();
    throw e;
  }
}

/**
 * The stacked statistics [2 or 3, R] of a shard kernel call: `run` gets views of their rows
 * (shiftedSum's null unless asked for) and `use`, which frees a temporary operand afterwards; the
 * call is skipped when there are no rows, and the statistics are freed if it throws.
 */
function statRows(
  c: Checked,
  layout: { withShiftedSum?: boolean },
  run: (rows: [Tensor, Tensor, Tensor | null], use: (t: Tensor) => Tensor) => void,
): Tensor {
  const k = layout.withShiftedSum ? 3 : 2;
  const out = alloc(c.backend, [k, c.rows], c.compute);
  const temps: Tensor[] = [];
  const use = (t: Tensor): Tensor => {
    temps.push(t);
    return t;
  };
  try {
    if (c.rows > 0) {
      const row = (i: number): Tensor => use(out.viewAs([c.rows], [1], out.offset + i * c.rows, false));
      run([row(0), row(1), k === 3 ? row(2) : null], use);
    }
  } catch (e) {
    out.dispose();
    throw e;
  } finally {
    for (const t of temps) t.dispose();
  }
  return out;
}

/** Options of {@link crossEntropyShardGrad}. */
export interface CrossEntropyShardGradOptions extends CrossEntropyShardLayout {
  /** Label smoothing α' = α·K/(K-1) of Megatron, in [0, 1) (default 0). */
  smoothing?: number;
  /** The real vocabulary size K over the whole group (the smoothing spreads α'/K on each entry). */
  vocabSize: number;
}

/**
 * The gradient of the vocabulary-parallel cross-entropy w.r.t. this rank's logits [..., P]:
 * (softmax - (1 - α')·onehot - α'/K) · gradLoss on the real columns, 0 on the padding, in the
 * logits' dtype, with the softmax recomputed from logits, rowMax [...] and logSumExp [...];
 * gradLoss [...] is the upstream gradient of the per-row loss. Outside the graph; one kernel call.
 */
export function crossEntropyShardGrad(
  logits: Tensor,
  target: Tensor,
  rowMax: Tensor,
  logSumExp: Tensor,
  gradLoss: Tensor,
  opts: CrossEntropyShardGradOptions,
): Tensor {
  const op = 'crossEntropyShardGrad';
  const c = checkShard(op, logits, target, opts, [
    ['rowMax', rowMax],
    ['logSumExp', logSumExp],
    ['gradLoss', gradLoss],
  ]);
  const smoothing = opts.smoothing ?? 0;
  if (!(smoothing >= 0 && smoothing < 1)) throw argError(op, `smoothing must be in [0, 1), got ${smoothing}`);
  if (!Number.isInteger(opts.vocabSize) || opts.vocabSize < 1)
    throw argError(op, `vocabSize must be a positive integer, got ${opts.vocabSize}`);
  const kernel = kernelOf(c.backend, 'crossEntropyShardBackward', op);
  const dx = alloc(c.backend, logits.shape, logits.dtype);
  if (dx.numel === 0) return dx;
  const temps: Tensor[] = [];
  const use = (t: Tensor): Tensor => {
    temps.push(t);
    return t;
  };
  try {
    kernel(
      dx,
      use(contiguousRaw(logits)),
      use(contiguousRaw(target)),
      use(contiguousRaw(rowMax, c.compute)),
      use(contiguousRaw(logSumExp, c.compute)),
      use(contiguousRaw(gradLoss, c.compute)),
      opts.start,
      opts.localReal,
      smoothing,
      opts.vocabSize,
    );
  } catch (e) {
    dx.dispose();
    throw e;
  } finally {
    for (const t of temps) t.dispose();
  }
  return dx;
}
