// Gradient-norm clipping with torch.nn.utils.clip_grad_norm_'s semantics. The norm is
// accumulated in double on the gradients' device (one scalar per device, no copy of contiguous
// gradients) and read once; the gradients are scaled in place, so clipping adds nothing to a
// training step's memory.
import type { Backend } from '../backend/backend.js';
import { getKernel, hasNativeKernel } from '../backend/kernels.js';
import { isFloating } from '../dtype.js';
import { TensorError } from '../errors.js';
import { zeros } from '../ops/creation.js';
import { Tensor } from '../tensor.js';
import { dense, kernelFor, release } from './kernels.js';

/** Options of clipGradNorm. */
export interface ClipGradNormOptions {
  /** Throw when the total norm is NaN or infinite instead of scaling by it (torch's error_if_nonfinite). */
  errorIfNonfinite?: boolean;
}

function checkNormType(op: string, normType: number): void {
  if (!(normType > 0))
    throw new TensorError(
      'INVALID_ARGUMENT',
      `${op}: normType must be positive or Infinity, got ${normType}`,
    );
}

/**
 * The p-norm of several tensors viewed as one vector (normType = Infinity for the max norm), as a
 * new 0-d float64 tensor on their device, computed there without any host read: each tensor's
 * power sum (max) goes through the backend's normPowerSum kernel, which adds (maxes) it into one
 * accumulator in list order (one launch a tensor; a backend with its own normPowerSumMulti sums
 * each run of tensors of one dtype in one call), so the value is bit for bit what getTotalNorm returns. NaN anywhere
 * gives NaN; an empty list gives 0 on the default device. Tensors on several devices are summed
 * per device first; the other devices' partial results are then copied to the first tensor's
 * device (one read on each of those devices).
 */
export function getTotalNormTensor(tensors: Iterable<Tensor>, normType = 2): Tensor {
  checkNormType('getTotalNorm', normType);
  const acc = powerSum('getTotalNorm', tensors, normType);
  if (normType === 1 || normType === Number.POSITIVE_INFINITY) return acc;
  try {
    const out = Tensor.empty(acc.backend, [], 'float64');
    if (normType === 2) acc.backend.unary(out, acc, 'sqrt');
    else acc.backend.binaryScalar(out, acc, 1 / normType, 'pow');
    return out;
  } finally {
    acc.dispose();
  }
}

/**
 * The sum of |x|^p over several tensors (the max of |x| for normType = Infinity, the first NaN
 * winning), before getTotalNormTensor's p-th root: a new 0-d float64 tensor on their device,
 * accumulated in double by the backend's normPowerSum kernel, tensor by tensor in list order.
 * What model-parallel code all-reduces (SUM, or MAX for the max norm) before taking the root.
 */
export function getTotalNormPowerSum(tensors: Iterable<Tensor>, normType = 2): Tensor {
  checkNormType('getTotalNormPowerSum', normType);
  return powerSum('getTotalNormPowerSum', tensors, normType);
}

/** Frees the dense copies of a run of tensors (the originals stay) and empties it. */
function releaseRun(run: { dense: Tensor[]; orig: Tensor[] }): void {
  for (let i = 0; i < run.dense.length; i++) release(run.dense[i], run.orig[i], false);
  run.dense = [];
  run.orig = [];
}

function powerSum(op: string, tensors: Iterable<Tensor>, normType: number): Tensor {
  // one accumulator per device: the first tensor's sum is written into it, the others are added
  // (maxed) into it by the kernel itself (its `accumulate`), in list order; a backend with its own
  // normPowerSumMulti gets each run of tensors of one dtype in one call (few launches) instead
  const accs = new Map<Backend, Tensor>();
  const temps: Tensor[] = [];
  // the tensors of a backend with normPowerSumMulti waiting for their call (dense, with originals)
  const runs = new Map<Backend, { dense: Tensor[]; orig: Tensor[] }>();
  const accFor = (b: Backend): { acc: Tensor; fresh: boolean } => {
    const acc = accs.get(b);
    if (acc) return { acc, fresh: false };
    const fresh = Tensor.empty(b, [], 'float64');
    temps.push(fresh);
    accs.set(b, fresh);
    return { acc: fresh, fresh: true };
  };
  const flush = (b: Backend): void => {
    const run = runs.get(b);
    if (!run || run.dense.length === 0) return;
    try {
      const { acc, fresh } = accFor(b);
      getKernel(b, 'normPowerSumMulti')!(run.dense, normType, acc, !fresh);
    } finally {
      releaseRun(run);
    }
  };
  try {
    for (const t of tensors) {
      t.checkAlive(op);
      if (!isFloating(t.dtype))
        throw new TensorError(
          'DTYPE_MISMATCH',
          `${op}: expected floating-point tensors, got ${t.describe()}`,
        );
      if (t.numel === 0) continue;
      const b = t.backend;
      if (hasNativeKernel(b, 'normPowerSumMulti')) {
        let run = runs.get(b);
        if (!run) {
          run = { dense: [], orig: [] };
          runs.set(b, run);
        }
        if (run.dense.length > 0 && run.dense[0].dtype !== t.dtype) flush(b);
        run.dense.push(dense(t));
        run.orig.push(t);
        continue;
      }
      const kernel = kernelFor(t, 'normPowerSum');
      const d = dense(t);
      try {
        const { acc, fresh } = accFor(b);
        kernel(d, normType, acc, !fresh);
      } finally {
        release(d, t, false);
      }
    }
    for (const b of runs.keys()) flush(b);
    const list = [...accs.values()];
    if (list.length === 0) return zeros([], { dtype: 'float64' });
    const acc = list[0];
    const combine = normType === Number.POSITIVE_INFINITY ? 'maximum' : 'add';
    for (const other of list.slice(1)) {
      const moved = other.to(acc.device);
      temps.push(moved);
      acc.backend.binary(acc, acc, moved, combine);
    }
    // the result is handed out: it is not a temporary any more
    temps.splice(temps.indexOf(acc), 1);
    return acc;
  } finally {
    for (const run of runs.values()) releaseRun(run);
    for (const t of temps) t.dispose();
  }
}

/**
 * The p-norm of several tensors viewed as one vector (normType = Infinity for the max norm), as
 * a number: getTotalNormTensor read once. NaN anywhere gives NaN; an empty list gives 0.
 */
export function getTotalNorm(tensors: Iterable<Tensor>, normType = 2): number {
  const total = getTotalNormTensor(tensors, normType);
  try {
    return total.item();
  } finally {
    total.dispose();
  }
}

/**
 * The factor clipping scales the gradients by: min(1, maxNorm / (totalNorm + 1e-6)) (torch's and
 * Megatron's); NaN passes through the clamp (torch.clamp keeps NaN), poisoning the gradients visibly.
 */
export function clipCoefficient(maxNorm: number, totalNorm: number): number {
  const coef = maxNorm / (totalNorm + 1e-6);
  return coef < 1 || Number.isNaN(coef) ? coef : 1;
}

/**
 * Scales tensors in place by min(1, maxNorm / (totalNorm + 1e-6)). A NaN total makes every
 * value NaN and an infinite one zeroes them, as torch does.
 */
export function clipTensorsWithNorm(tensors: Iterable<Tensor>, maxNorm: number, totalNorm: number): void {
  const clamped = clipCoefficient(maxNorm, totalNorm);
  if (clamped === 1) return;
  for (const t of tensors) if (t.numel > 0) t.backend.binaryScalar(t, t, clamped, 'mul');
}

/**
 * Clips the gradients of `params` (in place) so that their total p-norm is at most maxNorm;
 * returns the total norm before clipping. Parameters without a gradient are skipped.
 */
export function clipGradNorm(
  params: Tensor | Iterable<Tensor>,
  maxNorm: number,
  normType = 2,
  options: ClipGradNormOptions = {},
): number {
  checkNormType('clipGradNorm', normType);
  const list = params instanceof Tensor ? [params] : [...params];
  const grads = list.map((p) => p.grad).filter((g): g is Tensor => g !== null);
  const total = getTotalNorm(grads, normType);
  if (options.errorIfNonfinite && !Number.isFinite(total)) {
    throw new TensorError(
      'INVALID_ARGUMENT',
      `clipGradNorm: the total norm of order ${normType} of the gradients is ${total}, so they cannot be clipped`,
    );
  }
  clipTensorsWithNorm(grads, maxNorm, total);
  return total;
}
