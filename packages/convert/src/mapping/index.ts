// Weight-mapping building blocks: tensor layout transforms between HF and Megatron.
export * from './transforms.js';
