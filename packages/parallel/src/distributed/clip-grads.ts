// Megatron-Core's gradient norm and clipping for model-parallel training (optimizer/clip_grads.py):
// the norm is computed on the device into one tensor, reduced over the ranks that hold different
// pieces of the gradients, and read back once. Parameters replicated across tensor-parallel ranks
// are counted only on TP rank 0.
import {
  clipCoefficient,
  clipTensorsWithNorm,
  getTotalNormPowerSum,
  noGrad,
  type Tensor,
  tidy,
  zeros,
} from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import type { ProcessGroup } from '../process-group.js';
import { paramIsNotTensorParallelDuplicate } from '../tensor-parallel/attributes.js';

/** Options of getGradNorm. */
export interface GradNormOptions {
  /** Ranks holding other pieces of the model (Megatron's tp-pp group); null or absent: none. */
  modelParallelGroup?: ProcessGroup | null;
  /** Set when each data-parallel rank holds a different shard of the gradients (distributed optimizer). */
  dataParallelGroup?: ProcessGroup | null;
  /** This rank's tensor-parallel rank (default 0): replicated parameters count only on rank 0. */
  tpRank?: number;
  /** 2 by default; Infinity for the max norm. */
  normType?: number;
}

/** The gradient of a parameter: its mainGrad when it has one, else .grad. */
function gradOf(p: Tensor): Tensor | null {
  return p.mainGrad ?? p.grad;
}

/**
 * The total p-norm of the gradients of `params` across the model-parallel ranks (and the
 * data-parallel ranks when gradients are sharded), as a number. The p-th powers are summed in
 * double on the gradients' device (getTotalNormPowerSum: one kernel launch per gradient), reduced
 * (SUM, or MAX for the inf norm) as one float64 value, then read once. NaN anywhere gives NaN (inf
 * for the max norm).
 */
export function getGradNorm(params: Iterable<Tensor>, options: GradNormOptions = {}): number {
  const normType = options.normType ?? 2;
  const acc = gradNormPowerSum(params, options);
  try {
    return gradNormOf(acc.item(), normType);
  } finally {
    acc.dispose();
  }
}

/**
 * @internal getGradNorm's reduced accumulator, not read yet: a float64 [1] on the gradients'
 * device holding the sum of |g|^p over every rank (the max |g| for the inf norm); the caller
 * frees it. Several of them can then be read with one wait (the dense and expert norms).
 */
export function gradNormPowerSum(params: Iterable<Tensor>, options: GradNormOptions = {}): Tensor {
  const normType = options.normType ?? 2;
  if (!(normType > 0)) {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `getGradNorm: normType must be positive or Infinity, got ${normType}`,
    );
  }
  const tpRank = options.tpRank ?? 0;
  const inf = normType === Number.POSITIVE_INFINITY;
  const list = [...params];
  const grads = list
    .filter((p) => paramIsNotTensorParallelDuplicate(p, tpRank))
    .map(gradOf)
    .filter((g): g is Tensor => g !== null && g.numel > 0);
  const device = list[0]?.device ?? 'cpu';
  const acc = noGrad(() =>
    tidy(() => {
      if (grads.length === 0) return zeros([1], { dtype: 'float64', device });
      // sum |g|^p (max |g|) in double, one normPowerSum launch per gradient, 16-bit ones read
      // as they are (no fp32 copy)
      const s = getTotalNormPowerSum(grads, normType).reshape(1);
      // a MAX reduction would drop a NaN: the max norm of a gradient holding NaN becomes +inf
      return inf ? s.maskedFill(s.ne(s), Number.POSITIVE_INFINITY) : s;
    }),
  );
  try {
    const op = inf ? 'max' : 'sum';
    for (const group of [options.dataParallelGroup, options.modelParallelGroup]) {
      if (group && group.size > 1) group.allReduce(acc, op).waitSync();
    }
    return acc;
  } catch (e) {
    acc.dispose();
    throw e;
  }
}

/** @internal The norm from gradNormPowerSum's value. */
export function gradNormOf(total: number, normType = 2): number {
  if (normType === Number.POSITIVE_INFINITY || normType === 1) return total;
  // the square root as the devices take it (correctly rounded), not through pow
  return normType === 2 ? Math.sqrt(total) : total ** (1 / normType);
}

// the factor Megatron's clip_grad_by_total_norm_fp32 scales the gradients by (tensor's, re-exported)
export { clipCoefficient };

/**
 * Scales the gradients of `params` in place by maxNorm / (totalNorm + 1e-6) when that is below 1
 * (Megatron's clip_grad_by_total_norm_fp32); totalNorm comes from getGradNorm.
 */
export function clipGradByTotalNorm(params: Iterable<Tensor>, maxNorm: number, totalNorm: number): void {
  const grads = [...params].map(gradOf).filter((g): g is Tensor => g !== null);
  clipTensorsWithNorm(grads, maxNorm, totalNorm);
}
