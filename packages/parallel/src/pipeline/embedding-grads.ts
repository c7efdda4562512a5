// Megatron's _allreduce_word_embedding_grads (megatron/core/distributed/finalize_model_grads.py):
// with tied input and output embeddings and more than one pipeline stage, the first stage holds
// the word embeddings and the last stage a copy used by the output layer. Each copy only sees its
// own half of the gradient, so the two are summed over the embedding group (the first and the
// last stage of each pipeline) before the optimizer step, which keeps the copies identical.
import type { Tensor } from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import { getEmbeddingGroup, modelParallelIsInitialized } from '../parallel-state.js';
import type { ProcessGroup } from '../process-group.js';

/**
 * Sums the gradients of `weights` (the parameters the first and the last pipeline stage share,
 * in the same order on both) over the embedding group, in place: `.mainGrad` where set (mixed
 * precision, DDP buffers), else `.grad`. A no-op on ranks outside the group, when the group has
 * one rank (no pipelining), and for a null weight or one without gradient (as Megatron, which
 * skips frozen embeddings: both stages must agree). `embeddingGroup` defaults to the parallel
 * state's (none when it is not initialised). Blocks until the sums are done.
 */
export function allreduceEmbeddingGrads(
  weights: Tensor | null | undefined | readonly (Tensor | null | undefined)[],
  embeddingGroup?: ProcessGroup | null,
): void {
  const group =
    embeddingGroup === undefined
      ? modelParallelIsInitialized()
        ? getEmbeddingGroup()
        : null
      : embeddingGroup;
  if (!group || group.size < 2) return;
  const list: readonly (Tensor | null | undefined)[] = Array.isArray(weights) ? weights : [weights];
  const works = [];
  for (const w of list) {
    const grad = w ? (w.mainGrad ?? w.grad) : null;
    if (!w || !grad) continue;
    if (!grad.isContiguous) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `allreduceEmbeddingGrads: the gradient of ${w.describe()} is not contiguous; it must be summed in place`,
      );
    }
    works.push(group.allReduce(grad, 'sum'));
  }
  for (const work of works) work.waitSync();
}
