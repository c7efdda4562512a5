// Corpus preprocessing: text to Megatron indexed datasets (pre-training) and SFT conversations to
// token + loss-mask indexed datasets.

export * from './pretrain.js';
export * from './readers.js';
export * from './sft.js';
