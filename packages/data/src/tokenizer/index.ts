// Tokenizers (Hugging Face folders, tiktoken rank files) and chat templates.

export * from './chat-template.js';
export * from './hf.js';
export * from './tiktoken.js';
export * from './types.js';
