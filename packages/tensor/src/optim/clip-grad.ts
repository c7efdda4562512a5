// Gradient-norm clipping with torch.nn.utils.clip_grad_norm_'s semantics. The norm is
// accumulated in double by a native kernel (no tensor is allocated for contiguous gradients) and
// the gradients are scaled in place, so clipping adds nothing to a training step's memory.
import { isFloating } from '../dtype.js';
import { TensorError } from '../errors.js';
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
 * The p-norm of several tensors viewed as one vector (normType = Infinity for the max norm).
 * NaN anywhere gives NaN; an empty list gives 0.
 */
export function getTotalNorm(tensors: Iterable<Tensor>, normType = 2): number {
  checkNormType('getTotalNorm', normType);
  const inf = normType === Number.POSITIVE_INFINITY;
  let acc = 0;
  for (const t of tensors) {
    t.checkAlive('getTotalNorm');
    if (!isFloating(t.dtype))
      throw new TensorError(
        'DTYPE_MISMATCH',
        `getTotalNorm: expected floating-point tensors, got ${t.describe()}`,
      );
    if (t.numel === 0) continue;
    const kernel = kernelFor(t, 'normPowerSum');
    const d = dense(t);
    const s = kernel(d, normType);
    release(d, t, false);
    if (inf) acc = Number.isNaN(s) || Number.isNaN(acc) ? Number.NaN : Math.max(acc, s);
    else acc += s;
  }
  if (inf) return acc;
  return normType === 2 ? Math.sqrt(acc) : normType === 1 ? acc : acc ** (1 / normType);
}

/**
 * Scales tensors in place by min(1, maxNorm / (totalNorm + 1e-6)). A NaN total makes every
 * value NaN and an infinite one zeroes them, as torch does.
 */
export function clipTensorsWithNorm(tensors: Iterable<Tensor>, maxNorm: number, totalNorm: number): void {
  const coef = maxNorm / (totalNorm + 1e-6);
  // NaN passes through the clamp (torch.clamp keeps NaN), poisoning the gradients visibly
  const clamped = coef < 1 || Number.isNaN(coef) ? coef : 1;
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
