// @megapatch/parallel: launch, rendezvous, process groups on Gloo, Megatron's parallel state,
// tensor/sequence-parallel layers, data parallelism and the distributed optimizer.

export type { CollectiveChecks } from './collective-checks.js';
export { type RingAttentionOptions, ringAttention } from './context-parallel/ring-attention.js';
export {
  type ContextParallelPlan,
  type ContextParallelRank,
  type ContextParallelSplitOptions,
  type CuSeqlens,
  contextParallelCuSeqlens,
  contextParallelGather,
  contextParallelPlan,
  contextParallelPositionIds,
  contextParallelSplit,
  contextParallelUnsplit,
  padCuSeqlensForContextParallel,
} from './context-parallel/split.js';
export {
  clipCoefficient,
  clipGradByTotalNorm,
  type GradNormOptions,
  getGradNorm,
} from './distributed/clip-grads.js';
export {
  DistributedDataParallel,
  type DistributedDataParallelOptions,
  type GradSyncStats,
} from './distributed/distributed-data-parallel.js';
export {
  DataParallelOptimizer,
  DistributedOptimizer,
  type DistributedOptimizerOptions,
  type DistributedOptimizerStateDict,
  type DistributedStepResult,
  type MasterPiece,
} from './distributed/distributed-optimizer.js';
export {
  BUCKET_END_ALIGNMENT,
  type Bucket,
  type BucketSlot,
  type BufferLayout,
  type BufferLayoutOptions,
  bucketEndDivisor,
  computeBufferLayout,
  defaultBucketSize,
  PARAM_ALIGNMENT,
  ParamAndGradBuffer,
  type ParamAndGradBufferOptions,
  type ParamSlot,
} from './distributed/param-and-grad-buffer.js';
export {
  DEFAULT_TIMEOUT_MS,
  destroyGroup,
  destroyProcessGroup,
  getEnvironment,
  getRank,
  getStore,
  getWorldGroup,
  getWorldSize,
  type InitProcessGroupOptions,
  initProcessGroup,
  isInitialized,
  newGroup,
} from './distributed.js';
export { DistributedError, type DistributedErrorCode } from './errors.js';
export { deviceCollectivesLibrary, GlooProcessGroup } from './gloo.js';
// the launcher and environment detection (also `@megapatch/parallel/launch`, without native code)
export * from './launch.js';
export { type CollectivesInfo, collectivesInfo } from './native.js';
export { NcclProcessGroup } from './nccl.js';
export * from './parallel-state.js';
export { allreduceEmbeddingGrads } from './pipeline/embedding-grads.js';
export {
  backwardStep,
  type DataIterator,
  type ForwardBackwardArgs,
  type ForwardBackwardFunc,
  type ForwardStepContext,
  type ForwardStepFunc,
  forwardBackwardNoPipelining,
  forwardBackwardPipeliningWithInterleaving,
  forwardBackwardPipeliningWithoutInterleaving,
  getForwardBackwardFunc,
  type LossFunc,
} from './pipeline/forward-backward.js';
export {
  type ExchangeResult,
  P2PCommunicator,
  type P2PCommunicatorOptions,
  PIPELINE_BACKWARD_TAG,
  PIPELINE_FORWARD_TAG,
} from './pipeline/p2p-communication.js';
export {
  convertScheduleTableToOrder,
  getPpRankMicrobatches,
  getScheduleTable,
  type MicrobatchChunk,
  type PipelineAction,
  type PipelineExchange,
  type PipelineExchangeName,
  type PipelinePhase,
  type PipelineSchedule,
  type PipelineScheduleKind,
  type PipelineScheduleOptions,
  type PipelineStep,
  type PpRankMicrobatches,
  pipelineSchedule,
  scheduleKind,
} from './pipeline/schedules.js';
export { batchIsendIrecv, type P2POp, type ProcessGroup, type ReduceOp, type Work } from './process-group.js';
export {
  type ComputeParallelGroupsOptions,
  computeParallelGroups,
  DEFAULT_ORDER,
  GROUP_KINDS,
  type GroupKind,
  generateMaskedOrthogonalRankGroups,
  type ParallelAxis,
  type ParallelGroups,
  RankGenerator,
  type RankGeneratorOptions,
} from './rank-generator.js';
export { SingleProcessGroup } from './single-process-group.js';
export { TCPStore, type TCPStoreOptions } from './store.js';
export {
  getTensorModelParallelAttributes,
  paramIsNotTensorParallelDuplicate,
  setSequenceParallelAttribute,
  setTensorModelParallelAttributes,
  type TensorParallelAttributes,
} from './tensor-parallel/attributes.js';
export {
  type VocabParallelCrossEntropyOptions,
  vocabParallelCrossEntropy,
} from './tensor-parallel/cross-entropy.js';
export {
  ColumnParallelLinear,
  type ColumnParallelLinearOptions,
  type ColumnPartition,
  LayerNormColumnParallelLinear,
  type LayerNormColumnParallelLinearOptions,
  type LinearOutput,
  type ParallelLinearOptions,
  padVocabSize,
  RowParallelLinear,
  type RowParallelLinearOptions,
  VocabParallelEmbedding,
  type VocabParallelEmbeddingOptions,
  vocabRangeFromGlobalVocabSize,
  vocabRangeFromPerPartitionVocabSize,
} from './tensor-parallel/layers.js';
export {
  copyToTensorModelParallelRegion,
  gatherFromSequenceParallelRegion,
  gatherFromTensorModelParallelRegion,
  reduceFromTensorModelParallelRegion,
  reduceScatterToSequenceParallelRegion,
  resolveTpGroup,
  scatterToSequenceParallelRegion,
  scatterToTensorModelParallelRegion,
} from './tensor-parallel/mappings.js';
export {
  DATA_PARALLEL_RNG_TRACKER_NAME,
  EXPERT_PARALLEL_RNG_TRACKER_NAME,
  getRngTracker,
  MODEL_PARALLEL_RNG_TRACKER_NAME,
  type ModelParallelSeedOptions,
  modelParallelManualSeed,
  RngStatesTracker,
} from './tensor-parallel/random.js';
export {
  allreduceSequenceParallelGrads,
  registerSequenceParallelGradHooks,
} from './tensor-parallel/sequence-parallel-grads.js';
export {
  fromTensorData,
  gatherShards,
  type Partition,
  type QkvDims,
  type ShardOptions,
  shardOf,
  toTensorData,
} from './tensor-parallel/sharding.js';
