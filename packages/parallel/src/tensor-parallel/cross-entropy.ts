// Megatron's vocabulary-parallel cross-entropy (cross_entropy.py): the logits of each token are
// split along the vocabulary across TP ranks and never gathered. Two all-reduces over [s, b]
// scalars (the row maximum, then the target logit, Σ exp and, with label smoothing, Σ of the
// shifted logits, stacked into one tensor) give each rank the full softmax denominator. Each
// rank's share is two fused reads of its slice (crossEntropyShardMax, crossEntropyShard; one,
// crossEntropyShardMaxStats, when one rank holds the whole vocabulary); the
// backward recomputes the softmax from the logits in one more pass (crossEntropyShardBackward),
// so nothing of size [s, b, V/tp] is allocated by the forward or kept for the backward.
import {
  attachGrad,
  crossEntropyShardGrad,
  crossEntropyShardMax,
  crossEntropyShardMaxStats,
  crossEntropyShardStats,
  needsGrad,
  noGrad,
  reshape,
  type Tensor,
  tidy,
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
 * The gradient w.r.t. the logits has their dtype. Targets outside the vocabulary (padding ids
 * included) get the loss log Σ exp(x - max) (mask them out afterwards, as Megatron's loss mask
 * does).
 * Memory: the backward keeps the logits (by reference) and three [s, b] vectors, no softmax.
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
  const globalVocab = partition * group.size;
  const vocabSize = opts.vocabSize ?? globalVocab;
  if (!Number.isInteger(vocabSize) || vocabSize < 1 || vocabSize > globalVocab) {
    fail(`vocabSize must be an integer in [1, ${globalVocab}], got ${opts.vocabSize}`);
  }
  if (labelSmoothing > 0 && vocabSize < 2) fail('label smoothing needs a vocabulary of at least 2 entries');
  const smoothing = labelSmoothing > 0 ? (labelSmoothing * vocabSize) / (vocabSize - 1) : 0;
  // Real (non-padding) columns of this slice: [0, localReal).
  const localReal = Math.max(0, Math.min(partition, vocabSize - start));
  const layout = { start, localReal };

  const { loss, rowMax, logSumExp } = tidy(() =>
    noGrad(() => {
      const shard = { ...layout, withShiftedSum: smoothing > 0 };
      let rowMax: Tensor;
      let stats: Tensor;
      if (group.size === 1) {
        // the whole vocabulary here: the maximum and the statistics in one pass over the logits
        ({ rowMax, stats } = crossEntropyShardMaxStats(logits, target, shard));
      } else {
        // an all-padding slice has no real logit: -inf leaves the group maximum to the other ranks
        rowMax = crossEntropyShardMax(logits, localReal);
        allReduce(rowMax, group, 'max');
        // [predicted, Σ exp, (Σ shifted)] over this slice, summed over the group in one all-reduce
        stats = crossEntropyShardStats(logits, target, rowMax, shard);
        allReduce(stats, group, 'sum');
      }
      const [predicted, sumExp, shiftedSum] = stats.unbind(0);
      const logSumExp = sumExp.log();
      let loss = logSumExp.sub(predicted);
      if (smoothing > 0) {
        // mean over the real vocabulary of log p = (Σ shifted) / K - log Σ exp
        const meanLogProbs = shiftedSum.div(vocabSize).sub(logSumExp);
        loss = loss.mul(1 - smoothing).sub(meanLogProbs.mul(smoothing));
      }
      return { loss: reshape(loss, lead), rowMax, logSumExp };
    }),
  );

  if (needsGrad(logits)) {
    // the targets are copied so that a caller reusing their buffer cannot change the backward
    const savedTarget = tidy(() => noGrad(() => target.clone()));
    attachGrad(
      loss,
      'VocabParallelCrossEntropyBackward',
      [logits],
      [logits, savedTarget, rowMax, logSumExp],
      (g, [x, t, m, lse]) => [crossEntropyShardGrad(x, t, m, lse, g, { ...layout, smoothing, vocabSize })],
    );
    savedTarget.dispose();
  }
  rowMax.dispose();
  logSumExp.dispose();
  return loss;
}
