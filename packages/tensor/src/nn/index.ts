// Neural-network modules and initialisers (torch.nn names, camelCased).

export { Embedding, type EmbeddingOptions } from './embedding.js';
export * as init from './init.js';
export {
  calculateFanInAndFanOut,
  calculateGain,
  constant_,
  type InitMethod,
  initMethodNormal,
  type KaimingOptions,
  kaimingUniform_,
  type Nonlinearity,
  normal_,
  ones_,
  scaledInitMethodNormal,
  uniform_,
  xavierUniform_,
  zeros_,
} from './init.js';
export { Dropout, type DropoutOptions, Linear, type LinearOptions } from './linear.js';
export {
  type LoadStateDictOptions,
  type LoadStateDictResult,
  Module,
  ModuleList,
  type StateDict,
} from './module.js';
export { LayerNorm, type LayerNormOptions, RMSNorm, type RMSNormOptions } from './normalization.js';
