// The named kernels beyond a backend's core set, in one typed table. A backend provides any of
// them through Backend.kernel(name); an op that finds none computes the same result from core
// kernels (its composition), so a new backend runs every op from its first core kernel on and
// gains speed kernel by kernel. The signatures live next to the ops that call them.

import type { AccumulateGradKernel } from '../autograd/engine.js';
import type { AttentionBackwardKernel, AttentionForwardKernel } from '../ops/attention.js';
import type {
  CrossEntropyShardBackwardKernel,
  CrossEntropyShardKernel,
  CrossEntropyShardMaxKernel,
  CrossEntropyShardMaxStatsKernel,
} from '../ops/cross-entropy-shard.js';
import type { GatedActivationBackwardKernel, GatedActivationKernel } from '../ops/glu.js';
import type { GroupedGemmKernel, GroupedGemmSizedKernel } from '../ops/grouped-linear.js';
import type {
  GatherAlongKernel,
  IndexAddRowsKernel,
  IndexSelectRowsKernel,
  OneHotKernel,
  ScatterAddAlongKernel,
  TopkKernel,
  TriangleKernel,
} from '../ops/indexing.js';
import type { LinearBiasActivationKernel } from '../ops/linear-activation.js';
import type {
  LinearBiasKernel,
  LinearResidualKernel,
  LinearWeightBiasGradKernel,
  LinearWeightGradAccumulateKernel,
} from '../ops/linear-bias.js';
import type { NormBackwardKernel, NormKernel } from '../ops/norm.js';
import type { RopeKernel } from '../ops/rope.js';
import type {
  CrossEntropyBackwardKernel,
  CrossEntropyKernel,
  NllLossBackwardKernel,
  NllLossKernel,
  SoftmaxBackwardKernel,
  SoftmaxKernel,
} from '../ops/softmax.js';
import type {
  AdamWKernel,
  AdamWMultiKernel,
  NormPowerSumKernel,
  NormPowerSumMultiKernel,
  SgdKernel,
  UnscaleCheckKernel,
} from '../optim/kernels.js';
import type { Backend } from './backend.js';

/** Every named kernel, by name. */
export interface KernelTable {
  softmax: SoftmaxKernel;
  softmaxBackward: SoftmaxBackwardKernel;
  crossEntropy: CrossEntropyKernel;
  crossEntropyBackward: CrossEntropyBackwardKernel;
  nllLoss: NllLossKernel;
  nllLossBackward: NllLossBackwardKernel;
  crossEntropyShardMax: CrossEntropyShardMaxKernel;
  crossEntropyShard: CrossEntropyShardKernel;
  crossEntropyShardMaxStats: CrossEntropyShardMaxStatsKernel;
  crossEntropyShardBackward: CrossEntropyShardBackwardKernel;
  normRows: NormKernel;
  normRowsBackward: NormBackwardKernel;
  ropeApply: RopeKernel;
  gatedActivation: GatedActivationKernel;
  gatedActivationBackward: GatedActivationBackwardKernel;
  linearBias: LinearBiasKernel;
  linearBiasActivation: LinearBiasActivationKernel;
  linearWeightBiasGrad: LinearWeightBiasGradKernel;
  linearWeightGradAccumulate: LinearWeightGradAccumulateKernel;
  linearResidual: LinearResidualKernel;
  groupedGemm: GroupedGemmKernel;
  groupedGemmSized: GroupedGemmSizedKernel;
  attentionForward: AttentionForwardKernel;
  attentionBackward: AttentionBackwardKernel;
  indexSelectRows: IndexSelectRowsKernel;
  indexAddRows: IndexAddRowsKernel;
  gatherAlong: GatherAlongKernel;
  scatterAddAlong: ScatterAddAlongKernel;
  topk: TopkKernel;
  triangle: TriangleKernel;
  oneHot: OneHotKernel;
  adamwStep: AdamWKernel;
  adamwStepMulti: AdamWMultiKernel;
  sgdStep: SgdKernel;
  normPowerSum: NormPowerSumKernel;
  normPowerSumMulti: NormPowerSumMultiKernel;
  unscaleCheck: UnscaleCheckKernel;
  accumulateGrad: AccumulateGradKernel;
}

/** The name of a kernel in the {@link KernelTable}. */
export type KernelName = keyof KernelTable;

const fallbacks = new Map<KernelName, KernelTable[KernelName]>();

/**
 * Registers the composition of a named kernel from core ops, used on every backend that lacks
 * its own (src/backend/fallbacks.ts).
 */
export function defineFallbackKernel<K extends KernelName>(name: K, fn: KernelTable[K]): void {
  fallbacks.set(name, fn);
}

/** The backend's own kernel, else its composition from core ops, else undefined. */
export function getKernel<K extends KernelName>(backend: Backend, name: K): KernelTable[K] | undefined {
  return backend.kernel(name) ?? (fallbacks.get(name) as KernelTable[K] | undefined);
}

/**
 * The composition of a named kernel from core ops, whatever the backend has (for options the
 * backends' own kernels lack, such as attention dropout).
 */
export function getFallbackKernel<K extends KernelName>(name: K): KernelTable[K] | undefined {
  return fallbacks.get(name) as KernelTable[K] | undefined;
}

/** Whether `name` runs as the backend's own kernel (false: the composition, or nothing). */
export function hasNativeKernel(backend: Backend, name: KernelName): boolean {
  return backend.kernel(name) !== undefined;
}
