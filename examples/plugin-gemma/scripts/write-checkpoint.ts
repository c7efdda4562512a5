// Writes the synthetic Gemma checkpoint the fixture was computed from: a tiny GemmaForCausalLM
// with the real config.json field names and deterministic F32 weights. Tests import
// writeGemmaCheckpoint to rebuild the same bytes.
// Usage: tsx scripts/write-checkpoint.ts <outDir>   → <outDir>/config.json, model.safetensors
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type TensorInput, writeSafetensors } from '@megapatch/convert';

/**
 * config.json of the synthetic model. head_dim 16 is not hidden / heads (12), as in Gemma 7B;
 * √48 is not exact in bf16; the vocabulary is not a multiple of 128; two kv heads so that the
 * checkpoint converts to TP = 2; tied embeddings and `hidden_act: "gelu"` as Gemma 1.0 ships them.
 */
export const GEMMA_TEST_CONFIG = {
  architectures: ['GemmaForCausalLM'],
  model_type: 'gemma',
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 2,
  eos_token_id: 1,
  pad_token_id: 0,
  head_dim: 16,
  hidden_act: 'gelu',
  hidden_size: 48,
  initializer_range: 0.02,
  intermediate_size: 128,
  max_position_embeddings: 256,
  num_attention_heads: 4,
  num_hidden_layers: 3,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-6,
  rope_scaling: null,
  rope_theta: 10000.0,
  tie_word_embeddings: true,
  torch_dtype: 'float32',
  transformers_version: '4.42.4',
  use_cache: true,
  vocab_size: 1000,
};

/** mulberry32: uniform [0, 1) from a 32-bit seed. */
function uniform(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** HF tensor names and shapes of the synthetic model, written out by hand (not from the spec). */
function tensorShapes(c: typeof GEMMA_TEST_CONFIG): [string, number[]][] {
  const h = c.hidden_size;
  const q = c.num_attention_heads * c.head_dim;
  const kv = c.num_key_value_heads * c.head_dim;
  const f = c.intermediate_size;
  const out: [string, number[]][] = [
    ['model.embed_tokens.weight', [c.vocab_size, h]],
    ['model.norm.weight', [h]],
  ];
  for (let i = 0; i < c.num_hidden_layers; i++) {
    const p = `model.layers.${i}.`;
    out.push(
      [`${p}input_layernorm.weight`, [h]],
      [`${p}post_attention_layernorm.weight`, [h]],
      [`${p}self_attn.q_proj.weight`, [q, h]],
      [`${p}self_attn.k_proj.weight`, [kv, h]],
      [`${p}self_attn.v_proj.weight`, [kv, h]],
      [`${p}self_attn.o_proj.weight`, [h, q]],
      [`${p}mlp.gate_proj.weight`, [f, h]],
      [`${p}mlp.up_proj.weight`, [f, h]],
      [`${p}mlp.down_proj.weight`, [h, f]],
    );
  }
  return out;
}

/**
 * Half-width of the uniform distribution of a tensor. Norm weights are centred on 0 as Gemma
 * stores them (the scale is 1 + w), and large enough that reading them as the scale itself, or
 * forgetting them, changes the logits; linear weights have standard deviation 1/√fan_in.
 */
function halfWidth(name: string, shape: number[]): number {
  if (name.endsWith('norm.weight')) return 0.5;
  if (name === 'model.embed_tokens.weight') return 0.25;
  // Larger MLP weights put gate pre-activations where tanh GELU and exact GELU differ most.
  if (name.includes('.mlp.')) return 2 * Math.sqrt(3 / shape[1]);
  return Math.sqrt(3 / shape[1]);
}

/** Writes the synthetic Gemma checkpoint to `dir` (created if needed): config.json and model.safetensors. */
export function writeGemmaCheckpoint(dir: string): void {
  fs.mkdirSync(dir, { recursive: true });
  const tensors: TensorInput[] = tensorShapes(GEMMA_TEST_CONFIG).map(([name, shape], i) => {
    const rand = uniform(1000 + i);
    const a = halfWidth(name, shape);
    const data = new Float32Array(shape.reduce((x, y) => x * y, 1));
    for (let j = 0; j < data.length; j++) data[j] = a * (2 * rand() - 1);
    return { name, dtype: 'F32', shape, data: new Uint8Array(data.buffer) };
  });
  writeSafetensors(path.join(dir, 'model.safetensors'), tensors, { metadata: { format: 'pt' } });
  fs.writeFileSync(path.join(dir, 'config.json'), `${JSON.stringify(GEMMA_TEST_CONFIG, null, 2)}\n`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const dir = process.argv[2];
  if (!dir) {
    console.error('usage: tsx scripts/write-checkpoint.ts <outDir>');
    process.exit(2);
  }
  writeGemmaCheckpoint(dir);
  console.log(`wrote ${dir}`);
}
