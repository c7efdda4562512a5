// SFT data: readers for Alpaca / ShareGPT / OpenAI messages, chat-template rendering with
// assistant-only loss, and sequence packing.

export * from './packing.js';
export * from './preference.js';
export * from './readers.js';
export * from './render.js';
export * from './types.js';
