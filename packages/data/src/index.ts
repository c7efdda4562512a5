// @megapatch/data: tokenizers, chat templates, Megatron indexed datasets, GPT pre-training
// samples, SFT data and sequence packing. Pure TypeScript.

export * from './blended-dataset.js';
export { DataError, type DataErrorCode } from './errors.js';
export * from './gpt-dataset.js';
export * from './indexed-dataset.js';
export * from './loader.js';
export * from './numpy-random.js';
export * from './preprocess/index.js';
export * from './sft/index.js';
export * from './tokenizer/index.js';
export type { LowLevelDataset, TokenArray } from './types.js';
