// Megatron-Core's gradient norm and clipping for model-parallel training (optimizer/clip_grads.py):
// the norm is computed on the device into one tensor, reduced over the ranks that hold different
// pieces of the gradients, and read back once. Parameters replicated across tensor-parallel ranks
// are counted only on TP rank 0.
import { clipTensorsWithNorm, noGrad, stack, type Tensor, tidy, zeros } from '@megapatch/tensor';
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
 * data-parallel ranks when gradients are sharded), as a number. Per-parameter norms are combined
 * in one fp32 tensor on the gradients' device, reduced (SUM of p-th powers, MAX for the inf
 * norm), then read once. NaN anywhere gives NaN (inf for the max norm).
 */
export function getGradNorm(params: Iterable<Tensor>, options: GradNormOptions = {}): number {
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
      if (grads.length === 0) return zeros([1], { dtype: 'float32', device });
      const norms = grads.map((g) => {
        if (g.dtype === 'float32') return g.norm(normType);
        // a bf16/fp16 result would keep 3 significant digits: take the norm of an fp32 copy
        const g32 = g.float();
        const n = g32.norm(normType).float();
        g32.dispose();
        return n;
      });
      const all = stack(norms);
      if (inf) {
        // max() skips NaN (here and in a MAX reduction), so a non-finite gradient is turned into
        // +inf: a gradient holding NaN or ±inf has a non-finite sum, and s − s is NaN exactly
        // when s is not finite (a finite sum overflowing fp32 counts as non-finite too)
        const s = stack(grads.map((g) => g.sum().float())).sum();
        const d = s.sub(s).reshape(1);
        return all.amax().reshape(1).maskedFill(d.ne(d), Number.POSITIVE_INFINITY);
      }
      return all.pow(normType).sum().reshape(1);
    }),
  );
  try {
    const op = inf ? 'max' : 'sum';
    for (const group of [options.dataParallelGroup, options.modelParallelGroup]) {
      if (group && group.size > 1) group.allReduce(acc, op).waitSync();
    }
    const total = acc.item();
    return inf ? total : normType === 1 ? total : total ** (1 / normType);
  } finally {
    acc.dispose();
  }
}

/**
 * The factor Megatron's clip_grad_by_total_norm_fp32 scales the gradients by: maxNorm /
 * (totalNorm + 1e-6) when that is below 1, else 1 (NaN stays NaN).
 */
export function clipCoefficient(maxNorm: number, totalNorm: number): number {
  const coef = maxNorm / (totalNorm + 1e-6);
  return coef < 1 || Number.isNaN(coef) ? coef : 1;
}

/**
 * Scales the gradients of `params` in place by maxNorm / (totalNorm + 1e-6) when that is below 1
 * (Megatron's clip_grad_by_total_norm_fp32); totalNorm comes from getGradNorm.
 */
export function clipGradByTotalNorm(params: Iterable<Tensor>, maxNorm: number, totalNorm: number): void {
  const grads = [...params].map(gradOf).filter((g): g is Tensor => g !== null);
  clipTensorsWithNorm(grads, maxNorm, totalNorm);
}
