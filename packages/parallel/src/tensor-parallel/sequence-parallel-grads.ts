// Under sequence parallelism a replicated parameter used on the sequence shard (a norm's weight
// and bias, a row-parallel bias) sees only its rank's tokens, so its gradient is a partial sum.
// Megatron all-reduces these gradients over the TP group after backward (finalize_model_grads's
// _allreduce_layernorm_grads); this is that step.
import { cat, noGrad, type Tensor, tidy } from '@megapatch/tensor';
import type { ProcessGroup } from '../process-group.js';
import { getTensorModelParallelAttributes } from './attributes.js';
import { resolveTpGroup } from './mappings.js';

/**
 * Sums over the TP group, in place, the gradients (`mainGrad` when set, else `grad`) of the
 * parameters marked sequence-parallel; one all-reduce for all of them. Parameters without the
 * mark or without a gradient are left alone. Call it on every TP rank after backward.
 */
export function allreduceSequenceParallelGrads(params: Iterable<Tensor>, tpGroup?: ProcessGroup): void {
  const group = resolveTpGroup(tpGroup);
  if (group.size === 1) return;
  const grads: Tensor[] = [];
  for (const p of params) {
    if (!getTensorModelParallelAttributes(p).sequenceParallel) continue;
    const g = p.mainGrad ?? p.grad;
    if (g) grads.push(g);
  }
  if (grads.length === 0) return;
  tidy(() =>
    noGrad(() => {
      // Coalesced by dtype: one flat buffer per dtype, reduced, then copied back.
      const byDtype = new Map<string, Tensor[]>();
      for (const g of grads) byDtype.set(g.dtype, [...(byDtype.get(g.dtype) ?? []), g]);
      for (const list of byDtype.values()) {
        const flat = cat(list.map((g) => g.reshape(-1)));
        group.allReduce(flat, 'sum').waitSync();
        let at = 0;
        for (const g of list) {
          g.copy_(flat.narrow(0, at, g.numel).view(...g.shape));
          at += g.numel;
        }
      }
    }),
  );
}

/**
 * The same sum done in backward: a gradient hook on each parameter marked sequence-parallel
 * all-reduces its gradient over TP before it is accumulated, so that DistributedDataParallel
 * (which starts a bucket's reduction from gradient hooks, while backward goes on) reduces the
 * full sum. Register the hooks on the parameters the optimizer updates, i.e. after wrapping in
 * DistributedDataParallel. Returns a function that removes them.
 */
export function registerSequenceParallelGradHooks(
  params: Iterable<Tensor>,
  tpGroup?: ProcessGroup,
): () => void {
  const group = resolveTpGroup(tpGroup);
  const removers: (() => void)[] = [];
  if (group.size > 1) {
    for (const p of params) {
      if (!getTensorModelParallelAttributes(p).sequenceParallel || !p.requiresGrad) continue;
      removers.push(
        p.registerHook((g) => {
          const sum = g.contiguous();
          group.allReduce(sum, 'sum').waitSync();
          return sum;
        }),
      );
    }
  }
  return () => {
    for (const remove of removers) remove();
  };
}
