// @megapatch/models: GPTModel for every TransformerConfig on the tensor-parallel layers, MLA, MoE,
// multi-token prediction, and the KV cache.

export { coreAttention, type LayerBuildOptions, SelfAttention } from './attention.js';
export { attachAuxLoss } from './aux-loss.js';
export type { AttentionContext } from './context.js';
export {
  type DropoutKeys,
  type DropoutSite,
  dropoutKey,
  keepMask,
  LayoutDropout,
  tokenSlots,
} from './dropout.js';
export { ModelError, type ModelErrorCode } from './errors.js';
export {
  type EvaluateOptions,
  type EvaluateProgress,
  type EvaluateResult,
  evaluate,
  type SequenceLogprobs,
} from './evaluate.js';
export {
  BUILTIN_FAMILIES,
  DEFAULT_FAMILY,
  type GatedActivation,
  getModelFamily,
  listModelFamilies,
  type ModelFamily,
  registerModelFamily,
} from './families/index.js';
export {
  type FinishReason,
  type GenerateResult,
  type Generation,
  generate,
  type SamplingOptions,
  sampleOnDevice,
  sampleToken,
  samplingRng,
} from './generate.js';
export {
  type GPTForwardOptions,
  GPTModel,
  type GPTModelOptions,
  type GPTOutput,
  type RecomputeModule,
} from './gpt-model.js';
export { KVCache } from './kv-cache.js';
export {
  type LoadedModel,
  type LoadModelOptions,
  loadModel,
  loadWeights,
  logicalName,
  type OpenedWeights,
  openWeights,
  type ParameterSlice,
  parameterSlices,
  type SaveModelOptions,
  saveModel,
} from './load.js';
export {
  type ContinuationRequest,
  type ContinuationScore,
  type ScoreContinuationsOptions,
  scoreContinuations,
} from './loglikelihood.js';
export * from './memory.js';
export { MLASelfAttention } from './mla.js';
export { gatedActivation, MLP, type MLPOptions, swiglu } from './mlp.js';
export { MoEAllGatherTokenDispatcher } from './moe/allgather-dispatcher.js';
export { MoEAlltoAllTokenDispatcher } from './moe/alltoall-dispatcher.js';
export {
  type ExpertParallelOptions,
  Experts,
  MoELayer,
  type MoELayerOptions,
  SharedExperts,
} from './moe/moe-layer.js';
export {
  type LoadBalancingType,
  type RouterLossOptions,
  type Routing,
  selectExperts,
  TopKRouter,
  topkRouting,
} from './moe/router.js';
export {
  buildRoutingMap,
  type CapacityOptions,
  capacityRoutingMapOnDevice,
  expertCapacity,
  type PairTensors,
  type RoutingMap,
  routingMapOnDevice,
  type TokenDropPolicy,
} from './moe/routing-map.js';
export type {
  DispatchedTokens,
  MoETokenDispatcherType,
  TokenDispatcher,
  TokenDispatcherOptions,
} from './moe/token-dispatcher.js';
export { MultiTokenPredictionLayer } from './mtp.js';
export { Norm } from './norm.js';
export { type GPTMicrobatch, type GPTStepReport, gptForwardStep } from './pipeline.js';
export { RotaryEmbedding, yarnMscale } from './rope.js';
export { TransformerLayer, type TransformerLayerOptions } from './transformer-layer.js';
