// @megapatch/convert/testing: tiny random Hugging Face checkpoints with the real structure of every
// built-in architecture, for tests of converters, loaders and models.

export * from './megatron-dist.js';
export * from './synthetic-hf.js';
