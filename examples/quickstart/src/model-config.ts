// The model trained from scratch: a small MistralForCausalLM described by a Hugging Face
// config.json — Mistral's layers (RMSNorm, RoPE, grouped-query attention, SwiGLU) at a size that
// trains in minutes on two CPU cores, with the real 32,000-token vocabulary.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { copyTokenizer } from './tokenizer.js';

/** The sizes the quickstart chooses (hidden size, layers, heads). */
export interface ModelSize {
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKeyValueHeads: number;
}

/** The Hugging Face config.json of a small Mistral with tied embeddings and no sliding window. */
export function mistralConfig(size: ModelSize, maxPositions: number): Record<string, unknown> {
  return {
    architectures: ['MistralForCausalLM'],
    model_type: 'mistral',
    hidden_size: size.hiddenSize,
    intermediate_size: 3 * size.hiddenSize,
    num_hidden_layers: size.numLayers,
    num_attention_heads: size.numHeads,
    num_key_value_heads: size.numKeyValueHeads,
    head_dim: size.hiddenSize / size.numHeads,
    hidden_act: 'silu',
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    max_position_embeddings: maxPositions,
    // the stories are far shorter than any window; null turns Mistral's 4,096-token window off
    sliding_window: null,
    tie_word_embeddings: true,
    vocab_size: 32000,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: 'float32',
  };
}

/** Writes `dir`/config.json and the tokenizer files: what `model.config` of a run config points at. */
export function writeModelConfig(dir: string, size: ModelSize, maxPositions: number): string {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'config.json');
  fs.writeFileSync(file, `${JSON.stringify(mistralConfig(size, maxPositions), null, 2)}\n`);
  copyTokenizer(dir);
  return file;
}
