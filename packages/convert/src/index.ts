// @megapatch/convert: safetensors, Hugging Face checkpoints, TransformerConfig and the
// architecture specs, the megapatch checkpoint, resharding, Megatron-LM's torch-format checkpoints.
// Pure TypeScript.

export * from './checkpoint/index.js';
export { ConvertError, type ConvertErrorCode } from './errors.js';
export * from './mapping/index.js';
export * from './pipeline-layout.js';
export * from './safetensors.js';
export * from './specs/index.js';
export * from './torch/index.js';
export * from './transformer-config.js';
