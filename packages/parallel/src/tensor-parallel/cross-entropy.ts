// Megatron's vocabulary-parallel cross-entropy (cross_entropy.py): the logits of each token are
// split along the vocabulary across TP ranks and never gathered. Three all-reduces over [s, b]
// scalars (max, target logit, sum of exponentials) give each rank the full softmax denominator;
// the gradient, softmax - one-hot, is formed on the local slice only.
import {
  arange,
  attachGrad,
  gather,
  logicalOr,
  needsGrad,
  noGrad,
  type Tensor,
  tidy,
  where,
} from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import type { ProcessGroup } from '../process-group.js';
import { resolveTpGroup } from './mappings.js';

/** Options of {@link vocabParallelCrossEntropy}. */
export interface VocabParallelCrossEntropyOptions {
  /**
   * The real vocabulary size: logits of padded entries (global index ≥ vocabSize) are left out of
   * the softmax, so vocabulary padding never changes a loss or a gradient. Default: no masking.
   */
  vocabSize?: number;
  /** Tensor-parallel group (default: the parallel state's). */
  tpGroup?: ProcessGroup;
}

function fail(message: string): never {
  throw new DistributedError('INVALID_ARGUMENT', `vocabParallelCrossEntropy: ${message}`);
}

/** In place: the reduction over the group (no-op for one rank). */
function allReduce(t: Tensor, group: ProcessGroup, op: 'sum' | 'max'): void {
  if (group.size > 1) group.allReduce(t, op).waitSync();
}

/**
 * Cross-entropy per token of vocabulary-parallel logits: logits [s, b, V/tp] (this rank's
 * vocabulary slice), target [s, b] (global ids, int64 or int32) -> loss [s, b] in float32
 * (float64 for float64 logits), no reduction. Label smoothing follows Megatron: with
 * α' = α·K/(K-1) over the K real vocabulary entries, loss = (1-α')·nll - α'·mean(log p); the mean
 * runs over the whole vocabulary (reduced over TP), so the loss does not depend on the layout.
 * The gradient w.r.t. the logits has their dtype. Targets outside the vocabulary get the loss
 * log Σ exp (mask them out afterwards, as Megatron's loss mask does).
 */
export function vocabParallelCrossEntropy(
  logits: Tensor,
  target: Tensor,
  labelSmoothing = 0,
  opts: VocabParallelCrossEntropyOptions = {},
): Tensor {
  const group = resolveTpGroup(opts.tpGroup);
  logits.checkAlive('vocabParallelCrossEntropy');
  target.checkAlive('vocabParallelCrossEntropy');
  if (logits.ndim < 1) fail(`logits must have a vocabulary dimension, got [${logits.shape}]`);
  const lead = logits.shape.slice(0, -1);
  if (target.ndim !== lead.length || target.shape.some((d, i) => d !== lead[i])) {
    fail(`target [${target.shape}] does not match logits [${logits.shape}] without their last dim`);
  }
  if (target.dtype !== 'int64' && target.dtype !== 'int32') {
    fail(`target must hold int64 or int32 ids, got ${target.dtype}`);
  }
  if (!(labelSmoothing >= 0 && labelSmoothing < 1))
    fail(`labelSmoothing must be in [0, 1), got ${labelSmoothing}`);
  const partition = logits.shape[logits.ndim - 1];
  const start = group.rank * partition;
  const end = start + partition;
  const globalVocab = partition * group.size;
  const vocabSize = opts.vocabSize ?? globalVocab;
  if (!Number.isInteger(vocabSize) || vocabSize < 1 || vocabSize > globalVocab) {
    fail(`vocabSize must be an integer in [1, ${globalVocab}], got ${opts.vocabSize}`);
  }
  if (labelSmoothing > 0 && vocabSize < 2) fail('label smoothing needs a vocabulary of at least 2 entries');
  const math = logits.dtype === 'float64' ? 'float64' : 'float32';
  const inDtype = logits.dtype;
  const smoothing = labelSmoothing > 0 ? (labelSmoothing * vocabSize) / (vocabSize - 1) : 0;
  // Real (non-padding) columns of this slice: [0, localReal).
  const localReal = Math.max(0, Math.min(partition, vocabSize - start));

  const { loss, softmax, targetMask, maskedTarget, realCols } = tidy(() =>
    noGrad(() => {
      let x = logits.to(math);
      const cols = arange(0, partition, 1, { dtype: 'int64' });
      const realCols = cols.lt(localReal);
      if (localReal < partition) x = where(realCols, x, Number.NEGATIVE_INFINITY);

      const logitsMax = x.amax(-1);
      allReduce(logitsMax, group, 'max');
      const shifted = x.sub(logitsMax.unsqueeze(-1));

      const targetMask = logicalOr(target.lt(start), target.ge(end));
      const maskedTarget = where(targetMask, 0, target.sub(start)).to('int64').unsqueeze(-1);
      const predicted = where(targetMask, 0, gather(shifted, -1, maskedTarget).squeeze(-1)).contiguous();
      allReduce(predicted, group, 'sum');

      const expLogits = shifted.exp();
      const sumExp = expLogits.sum(-1);
      allReduce(sumExp, group, 'sum');
      const logSumExp = sumExp.log();
      let loss = logSumExp.sub(predicted);
      const softmax = expLogits.div(sumExp.unsqueeze(-1));

      if (smoothing > 0) {
        // mean over the real vocabulary of log p = (Σ shifted) / K - log Σ exp
        const shiftedSum = where(realCols, shifted, 0).sum(-1);
        allReduce(shiftedSum, group, 'sum');
        const meanLogProbs = shiftedSum.div(vocabSize).sub(logSumExp);
        loss = loss.mul(1 - smoothing).sub(meanLogProbs.mul(smoothing));
      }
      return { loss, softmax, targetMask, maskedTarget, realCols };
    }),
  );

  if (needsGrad(logits)) {
    attachGrad(
      loss,
      'VocabParallelCrossEntropyBackward',
      [logits],
      [softmax, targetMask, maskedTarget, realCols],
      (g, [sm, tm, mt, rc]) => {
        // softmax - (1-α')·onehot(target, if on this rank) - α'/K on every real column, times g
        const hit = where(tm, 0, 1 - smoothing)
          .to(math)
          .unsqueeze(-1);
        let grad = sm.scatterAdd(-1, mt, hit.neg());
        if (smoothing > 0) grad = grad.sub(where(rc, smoothing / vocabSize, 0).to(math));
        return [grad.mul(g.to(math).unsqueeze(-1)).to(inDtype)];
      },
    );
  }
  for (const t of [softmax, targetMask, maskedTarget, realCols]) t.dispose();
  return loss;
}
