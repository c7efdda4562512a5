// The softmax family of the CUDA backend (native/src/kernels/softmax.cu): softmax / log-softmax
// and their backward, fused cross-entropy and NLL loss with their backward, and the per-shard
// kernels of the vocabulary-parallel cross-entropy. The arguments are packed as the CPU backend's
// wrappers in @megapatch/tensor (src/ops/softmax.ts, src/ops/cross-entropy-shard.ts) pack them,
// with the loss kernels' `stats` tensor (contiguous float64 [4], LOSS_STATS) last: the kernels fill
// it on the stream (count, total, first bad row, its target value) and return nothing, so a loss
// costs no host synchronisation.
import type { KernelTable, Tensor } from '@megapatch/tensor';
import { type Entries, pack } from '../pack.js';

type SoftmaxKernels = Pick<
  KernelTable,
  | 'softmax'
  | 'softmaxBackward'
  | 'crossEntropy'
  | 'crossEntropyBackward'
  | 'nllLoss'
  | 'nllLossBackward'
  | 'crossEntropyShardMax'
  | 'crossEntropyShardMaxStats'
  | 'crossEntropyShard'
  | 'crossEntropyShardBackward'
>;

/** The CPU backend's check of a loss kernel's `stats` operand, with its message. */
function checkStats(stats: Tensor): void {
  if (stats.dtype !== 'float64' || stats.numel !== 4 || !stats.isContiguous) {
    throw new Error(`loss kernel: stats must be a contiguous float64 [4] tensor, got ${stats.describe()}`);
  }
}

export function softmaxKernels(call: Entries): SoftmaxKernels {
  return {
    softmax(out, x, log) {
      pack
        .begin()
        .tensor(out)
        .tensor(x)
        .num(log ? 1 : 0);
      call.softmaxForward();
    },
    softmaxBackward(dx, y, g, log) {
      pack
        .begin()
        .tensor(dx)
        .tensor(y)
        .tensor(g)
        .num(log ? 1 : 0);
      call.softmaxBackward();
    },
    crossEntropy(x, target, lse, loss, ignoreIndex, labelSmoothing, stats) {
      checkStats(stats);
      pack
        .begin()
        .tensor(x)
        .tensor(target)
        .tensor(lse)
        .num(loss ? 1 : 0);
      if (loss) pack.tensor(loss);
      pack.num(ignoreIndex).num(labelSmoothing).tensor(stats);
      call.crossEntropyForward();
    },
    crossEntropyBackward(dx, x, target, lse, gout, scale, ignoreIndex, labelSmoothing) {
      pack.begin().tensor(dx).tensor(x).tensor(target).tensor(lse).tensor(gout);
      pack.num(scale).num(ignoreIndex).num(labelSmoothing);
      call.crossEntropyBackward();
    },
    nllLoss(x, target, loss, ignoreIndex, stats) {
      checkStats(stats);
      pack
        .begin()
        .tensor(x)
        .tensor(target)
        .num(loss ? 1 : 0);
      if (loss) pack.tensor(loss);
      pack.num(ignoreIndex).tensor(stats);
      call.nllLossForward();
    },
    nllLossBackward(dx, target, gout, scale, ignoreIndex) {
      pack.begin().tensor(dx).tensor(target).tensor(gout).num(scale).num(ignoreIndex);
      call.nllLossBackward();
    },
    crossEntropyShardMax(rowMax, logits, localReal) {
      pack.begin().tensor(rowMax).tensor(logits).num(localReal);
      call.crossEntropyShardMax();
    },
    crossEntropyShard(predicted, sumExp, shiftedSum, logits, target, rowMax, start, localReal) {
      pack
        .begin()
        .tensor(predicted)
        .tensor(sumExp)
        .num(shiftedSum ? 1 : 0);
      if (shiftedSum) pack.tensor(shiftedSum);
      pack.tensor(logits).tensor(target).tensor(rowMax).num(start).num(localReal);
      call.crossEntropyShardForward();
    },
    crossEntropyShardMaxStats(rowMax, predicted, sumExp, shiftedSum, logits, target, start, localReal) {
      pack
        .begin()
        .tensor(rowMax)
        .tensor(predicted)
        .tensor(sumExp)
        .num(shiftedSum ? 1 : 0);
      if (shiftedSum) pack.tensor(shiftedSum);
      pack.tensor(logits).tensor(target).num(start).num(localReal);
      call.crossEntropyShardMaxStats();
    },
    crossEntropyShardBackward(
      dx,
      logits,
      target,
      rowMax,
      logSumExp,
      gradLoss,
      start,
      localReal,
      smoothing,
      vocabSize,
    ) {
      pack.begin().tensor(dx).tensor(logits).tensor(target).tensor(rowMax).tensor(logSumExp).tensor(gradLoss);
      pack.num(start).num(localReal).num(smoothing).num(vocabSize);
      call.crossEntropyShardBackward();
    },
  };
}
