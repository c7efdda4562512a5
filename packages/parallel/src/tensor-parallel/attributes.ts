// Megatron's tensor-parallel attributes of a parameter (tensor_model_parallel, partition_dim,
// partition_stride), kept beside the tensor so that the optimizer and the gradient-norm code know
// which parameters are split across TP ranks and which are copies on every rank.
import type { Tensor } from '@megapatch/tensor';

export interface TensorParallelAttributes {
  /** True when each TP rank holds a different slice of the logical parameter. */
  tensorModelParallel: boolean;
  /** The dimension the parameter is split on (-1 when it is not split). */
  partitionDim: number;
  /** Megatron's partition stride (1 for every layer here). */
  partitionStride: number;
  /** Set on parameters that sequence parallelism computes on sequence shards (norms), whose grads are all-reduced over TP. */
  sequenceParallel?: boolean;
}

const attrs = new WeakMap<Tensor, TensorParallelAttributes>();

/** Marks `param` as split (or not) across tensor-parallel ranks. */
export function setTensorModelParallelAttributes(
  param: Tensor,
  isParallel: boolean,
  dim: number,
  stride = 1,
): void {
  const prev = attrs.get(param);
  attrs.set(param, {
    ...prev,
    tensorModelParallel: isParallel,
    partitionDim: isParallel ? dim : -1,
    partitionStride: stride,
  });
}

/** Marks `param` as computed on sequence shards under sequence parallelism. */
export function setSequenceParallelAttribute(param: Tensor, on = true): void {
  const prev = attrs.get(param) ?? { tensorModelParallel: false, partitionDim: -1, partitionStride: 1 };
  attrs.set(param, { ...prev, sequenceParallel: on });
}

/** The attributes of `param` (an unmarked parameter is a full copy on every TP rank). */
export function getTensorModelParallelAttributes(param: Tensor): TensorParallelAttributes {
  return attrs.get(param) ?? { tensorModelParallel: false, partitionDim: -1, partitionStride: 1 };
}

/**
 * Megatron's param_is_not_tensor_parallel_duplicate: true when the parameter is split across TP
 * ranks or this is TP rank 0 (so a replicated parameter is counted once in the gradient norm).
 */
export function paramIsNotTensorParallelDuplicate(param: Tensor, tpRank: number): boolean {
  return getTensorModelParallelAttributes(param).tensorModelParallel || tpRank === 0;
}
