// Synthetic Hugging Face checkpoints for tests: tiny dimensions, the real structure of each built-in
// architecture, deterministic weights, optional DeepSeek-style block-wise FP8.
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  parseHfConfig,
  planShards,
  type SafetensorsDtype,
  type TensorInput,
  writeSafetensors,
  writeShardedSafetensors,
} from '../index.js';

/** One synthetic model: an id and a full HF config.json object. */
export interface SyntheticModel {
  id: string;
  config: Record<string, unknown>;
}

/** Options of {@link writeSyntheticHfCheckpoint}. */
export interface SyntheticOptions {
  /** PRNG seed (default 0); the same seed gives the same bytes. */
  seed?: number;
  /** dtype of every tensor except fp8 weights and e_score_correction_bias (default BF16). */
  dtype?: 'BF16' | 'F16' | 'F32';
  /** Largest shard file (default 256 KiB, so most models get several shards); one shard → model.safetensors. */
  maxShardSize?: number | string;
  /** Store decoder/MTP Linear weights as F8_E4M3 with `<name>_scale_inv` per [b0, b1] block. */
  fp8?: { blockSize: [number, number] };
}

/** A tensor written by {@link writeSyntheticHfCheckpoint}. */
export interface SyntheticTensor {
  dtype: SafetensorsDtype;
  shape: number[];
  data: Uint8Array;
}

const common = {
  hidden_act: 'silu',
  initializer_range: 0.02,
  attention_dropout: 0,
  bos_token_id: 1,
  eos_token_id: 2,
  use_cache: true,
  torch_dtype: 'bfloat16',
  transformers_version: '4.51.0',
};

// Every model converts with TP=2, PP=2, EP=2: even kv heads (>= 2), even FFN sizes, even expert
// counts and layer counts; vocab sizes are not multiples of 128 so that padding is exercised.
const llamaBase = {
  ...common,
  hidden_size: 64,
  intermediate_size: 128,
  num_hidden_layers: 4,
  num_attention_heads: 8,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-5,
  max_position_embeddings: 256,
  vocab_size: 1000,
  attention_bias: false,
  mlp_bias: false,
};

const deepseekBase = {
  ...common,
  hidden_size: 64,
  intermediate_size: 128,
  moe_intermediate_size: 32,
  num_hidden_layers: 4,
  num_attention_heads: 4,
  num_key_value_heads: 4,
  kv_lora_rank: 32,
  qk_nope_head_dim: 16,
  qk_rope_head_dim: 8,
  v_head_dim: 16,
  n_shared_experts: 2,
  num_experts_per_tok: 2,
  first_k_dense_replace: 1,
  moe_layer_freq: 1,
  rms_norm_eps: 1e-6,
  rope_theta: 10000,
  max_position_embeddings: 512,
  vocab_size: 1000,
  tie_word_embeddings: false,
  attention_bias: false,
  aux_loss_alpha: 0.001,
  ep_size: 1,
};

/** Small models of every built-in architecture (configs parse with parseHfConfig). */
export const SYNTHETIC_MODELS: SyntheticModel[] = [
  {
    id: 'llama',
    config: {
      ...llamaBase,
      architectures: ['LlamaForCausalLM'],
      model_type: 'llama',
      rope_theta: 500000,
      rope_scaling: {
        rope_type: 'llama3',
        factor: 8,
        low_freq_factor: 1,
        high_freq_factor: 4,
        original_max_position_embeddings: 64,
      },
      tie_word_embeddings: false,
      pretraining_tp: 1,
    },
  },
  {
    id: 'llama-tied',
    config: {
      ...llamaBase,
      architectures: ['LlamaForCausalLM'],
      model_type: 'llama',
      num_attention_heads: 4,
      num_key_value_heads: 4,
      head_dim: 16,
      vocab_size: 777,
      rope_theta: 10000,
      tie_word_embeddings: true,
    },
  },
  {
    id: 'mistral',
    config: {
      ...llamaBase,
      architectures: ['MistralForCausalLM'],
      model_type: 'mistral',
      intermediate_size: 96,
      rope_theta: 1000000,
      sliding_window: 128,
      tie_word_embeddings: false,
    },
  },
  {
    id: 'qwen2',
    config: {
      ...llamaBase,
      architectures: ['Qwen2ForCausalLM'],
      model_type: 'qwen2',
      rms_norm_eps: 1e-6,
      rope_theta: 1000000,
      tie_word_embeddings: true,
      use_sliding_window: false,
      sliding_window: 256,
      max_window_layers: 4,
    },
  },
  {
    id: 'qwen3',
    config: {
      ...llamaBase,
      architectures: ['Qwen3ForCausalLM'],
      model_type: 'qwen3',
      // head_dim 16 while hidden / heads = 8.
      head_dim: 16,
      rms_norm_eps: 1e-6,
      rope_theta: 1000000,
      rope_scaling: null,
      tie_word_embeddings: false,
      vocab_size: 777,
      use_sliding_window: false,
      sliding_window: null,
      max_window_layers: 4,
    },
  },
  {
    id: 'mixtral',
    config: {
      ...llamaBase,
      architectures: ['MixtralForCausalLM'],
      model_type: 'mixtral',
      intermediate_size: 96,
      num_local_experts: 4,
      num_experts_per_tok: 2,
      rope_theta: 1000000,
      sliding_window: null,
      output_router_logits: false,
      router_aux_loss_coef: 0.02,
      tie_word_embeddings: false,
    },
  },
  {
    id: 'qwen2-moe',
    config: {
      ...llamaBase,
      architectures: ['Qwen2MoeForCausalLM'],
      model_type: 'qwen2_moe',
      num_attention_heads: 8,
      num_key_value_heads: 4,
      // intermediate_size is the dense MLP of the mlp_only_layers.
      intermediate_size: 96,
      moe_intermediate_size: 32,
      shared_expert_intermediate_size: 64,
      num_experts: 4,
      num_experts_per_tok: 2,
      norm_topk_prob: false,
      decoder_sparse_step: 1,
      mlp_only_layers: [0],
      rms_norm_eps: 1e-6,
      rope_theta: 1000000,
      tie_word_embeddings: false,
      output_router_logits: false,
      router_aux_loss_coef: 0.001,
      use_sliding_window: false,
      sliding_window: 256,
      max_window_layers: 4,
    },
  },
  {
    id: 'qwen3-moe',
    config: {
      ...llamaBase,
      architectures: ['Qwen3MoeForCausalLM'],
      model_type: 'qwen3_moe',
      head_dim: 16,
      intermediate_size: 96,
      moe_intermediate_size: 32,
      num_experts: 4,
      num_experts_per_tok: 2,
      norm_topk_prob: true,
      decoder_sparse_step: 1,
      mlp_only_layers: [],
      rms_norm_eps: 1e-6,
      rope_theta: 1000000,
      rope_scaling: null,
      tie_word_embeddings: false,
      vocab_size: 777,
      output_router_logits: false,
      router_aux_loss_coef: 0.001,
      use_sliding_window: false,
      sliding_window: null,
      max_window_layers: 4,
    },
  },
  {
    id: 'deepseek-v2',
    config: {
      ...deepseekBase,
      architectures: ['DeepseekV2ForCausalLM'],
      model_type: 'deepseek_v2',
      // V2-Lite style: plain q_proj, greedy softmax routing.
      q_lora_rank: null,
      n_routed_experts: 4,
      topk_method: 'greedy',
      n_group: 1,
      topk_group: 1,
      scoring_func: 'softmax',
      norm_topk_prob: false,
      routed_scaling_factor: 1.0,
      rope_scaling: {
        type: 'yarn',
        factor: 4,
        original_max_position_embeddings: 128,
        beta_fast: 32,
        beta_slow: 1,
        mscale: 0.75,
        mscale_all_dim: 0.75,
      },
    },
  },
  {
    id: 'deepseek-v3',
    config: {
      ...deepseekBase,
      architectures: ['DeepseekV3ForCausalLM'],
      model_type: 'deepseek_v3',
      q_lora_rank: 24,
      n_routed_experts: 8,
      n_shared_experts: 1,
      topk_method: 'noaux_tc',
      n_group: 4,
      topk_group: 2,
      scoring_func: 'sigmoid',
      norm_topk_prob: true,
      routed_scaling_factor: 2.5,
      num_nextn_predict_layers: 1,
      rope_scaling: {
        type: 'yarn',
        factor: 4,
        original_max_position_embeddings: 128,
        beta_fast: 32,
        beta_slow: 1,
        mscale: 1.0,
        mscale_all_dim: 1.0,
      },
    },
  },
  {
    id: 'moonlight',
    config: {
      ...deepseekBase,
      architectures: ['DeepseekV3ForCausalLM'],
      model_type: 'deepseek_v3',
      // Moonlight: DeepseekV3 layout without q LoRA, a single expert group, no MTP.
      q_lora_rank: null,
      n_routed_experts: 4,
      topk_method: 'noaux_tc',
      n_group: 1,
      topk_group: 1,
      scoring_func: 'sigmoid',
      norm_topk_prob: true,
      routed_scaling_factor: 2.446,
      num_nextn_predict_layers: 0,
      rope_theta: 50000,
      vocab_size: 777,
    },
  },
  {
    id: 'phi3',
    config: {
      ...llamaBase,
      architectures: ['Phi3ForCausalLM'],
      model_type: 'phi3',
      // GQA (Phi-4's 40 query / 10 key-value heads, scaled down) with packed qkv_proj / gate_up_proj
      num_attention_heads: 8,
      num_key_value_heads: 2,
      intermediate_size: 96,
      rope_theta: 250000,
      rope_scaling: null,
      sliding_window: 2047,
      original_max_position_embeddings: 256,
      partial_rotary_factor: 1.0,
      resid_pdrop: 0.0,
      embd_pdrop: 0.0,
      attention_dropout: 0.0,
      tie_word_embeddings: false,
    },
  },
  {
    id: 'phi3-longrope',
    config: {
      ...llamaBase,
      architectures: ['Phi3ForCausalLM'],
      model_type: 'phi3',
      // Phi-3.5-mini's shape, scaled down: multi-head attention, longrope over a 64-token original
      // context (one factor per rotary pair of the 8-wide heads), a window wider than any sequence
      num_attention_heads: 8,
      num_key_value_heads: 8,
      intermediate_size: 96,
      rope_theta: 10000,
      max_position_embeddings: 256,
      original_max_position_embeddings: 64,
      rope_scaling: {
        type: 'longrope',
        short_factor: [1.0, 1.1, 1.3, 1.7],
        long_factor: [1.5, 3.0, 7.0, 12.0],
      },
      sliding_window: 262144,
      tie_word_embeddings: false,
    },
  },
  {
    id: 'phi4-mini',
    config: {
      ...llamaBase,
      architectures: ['Phi3ForCausalLM'],
      model_type: 'phi3',
      // Phi-4-mini's shape, scaled down: GQA, tied embeddings, the first 6 of each head's 8
      // channels rotating (partial_rotary_factor 0.75; Phi-4-mini: 96 of 128) with longrope, one
      // factor per rotating pair
      num_attention_heads: 8,
      num_key_value_heads: 2,
      intermediate_size: 96,
      rope_theta: 10000,
      max_position_embeddings: 256,
      original_max_position_embeddings: 64,
      partial_rotary_factor: 0.75,
      rope_scaling: {
        type: 'longrope',
        short_factor: [1.0, 1.2, 1.5],
        long_factor: [2.0, 5.0, 9.0],
      },
      sliding_window: 262144,
      tie_word_embeddings: true,
    },
  },
];

// ---- deterministic values --------------------------------------------------------------------

function fnv1a(s: string, seed: number): number {
  let h = (0x811c9dc5 ^ Math.imul(seed | 0, 0x9e3779b1)) >>> 0;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/** mulberry32: a small 32-bit PRNG, uniform in [0, 1). */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** `n` float32 values mean + std·N(0, 1), from seed and tensor name (Box–Muller). */
function normalValues(n: number, seed: number, name: string, mean: number, std: number): Float32Array {
  const rand = mulberry32(fnv1a(name, seed));
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - rand()));
    const phi = 2 * Math.PI * rand();
    out[i] = mean + std * r * Math.cos(phi);
    if (i + 1 < n) out[i + 1] = mean + std * r * Math.sin(phi);
  }
  return out;
}

// ---- float encoders ------------------------------------------------------------------------------

/** Round half to even of a non-negative double. */
function rne(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/**
 * Bits of |a| (finite, >= 0) in a binary float with `mantBits` mantissa bits and exponent `bias`,
 * rounded to nearest even, without overflow handling (the caller clamps).
 */
function minifloatBits(a: number, mantBits: number, bias: number): number {
  const minExp = 1 - bias;
  if (a < 2 ** minExp) {
    // Subnormal; a round-up to 2^mantBits lands on the smallest normal's bit pattern.
    return rne(a / 2 ** (minExp - mantBits));
  }
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  else if (2 ** (e + 1) <= a) e++;
  let m = rne(a / 2 ** (e - mantBits));
  if (m === 2 ** (mantBits + 1)) {
    e++;
    m = 2 ** mantBits;
  }
  return ((e + bias) << mantBits) | (m - 2 ** mantBits);
}

/** float32 → IEEE half bits (round to nearest even, overflow → ±Inf). */
export function f32ToF16Bits(v: number): number {
  if (Number.isNaN(v)) return 0x7e00;
  const sign = v < 0 || Object.is(v, -0) ? 0x8000 : 0;
  const a = Math.abs(v);
  if (a === Infinity) return sign | 0x7c00;
  const bits = minifloatBits(a, 10, 15);
  return sign | Math.min(bits, 0x7c00);
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 → bfloat16 bits (round to nearest even on the float32 bits). */
export function f32ToBf16Bits(v: number): number {
  f32[0] = v;
  const u = u32[0];
  if (Number.isNaN(f32[0])) return 0x7fc0;
  return Math.floor((u + 0x7fff + ((u >>> 16) & 1)) / 65536) & 0xffff;
}

/** float → float8_e4m3fn bits (bias 7, no Inf, 0x7F NaN), round to nearest even, saturating to ±448. */
export function f32ToE4m3Bits(v: number): number {
  if (Number.isNaN(v)) return 0x7f;
  const sign = v < 0 || Object.is(v, -0) ? 0x80 : 0;
  const a = Math.abs(v);
  if (a >= 448) return sign | 0x7e;
  // Rounding may reach 0x7F (480), which is NaN in e4m3fn: saturate to 448 instead.
  return sign | Math.min(minifloatBits(a, 3, 7), 0x7e);
}

/** Encodes float32 values to little-endian bytes of `dtype`. */
function encode(values: Float32Array, dtype: 'BF16' | 'F16' | 'F32' | 'F8_E4M3'): Uint8Array {
  if (dtype === 'F32') {
    const out = new Uint8Array(values.length * 4);
    const dv = new DataView(out.buffer);
    for (let i = 0; i < values.length; i++) dv.setFloat32(i * 4, values[i], true);
    return out;
  }
  if (dtype === 'F8_E4M3') return Uint8Array.from(values, f32ToE4m3Bits);
  const out = new Uint8Array(values.length * 2);
  const dv = new DataView(out.buffer);
  const conv = dtype === 'BF16' ? f32ToBf16Bits : f32ToF16Bits;
  for (let i = 0; i < values.length; i++) dv.setUint16(i * 2, conv(values[i]), true);
  return out;
}

/**
 * Block-wise FP8 of a [R, C] weight: per [b0, b1] block, s = amax / 448 (float32) and
 * q = e4m3(w / s). Returns the fp8 bytes and the [ceil(R/b0), ceil(C/b1)] scales.
 */
function quantizeFp8(
  w: Float32Array,
  rows: number,
  cols: number,
  [b0, b1]: [number, number],
): { q: Uint8Array; scales: Float32Array; scaleShape: number[] } {
  const br = Math.ceil(rows / b0);
  const bc = Math.ceil(cols / b1);
  const scales = new Float32Array(br * bc);
  const q = new Uint8Array(rows * cols);
  for (let i = 0; i < br; i++) {
    for (let j = 0; j < bc; j++) {
      const r1 = Math.min(rows, (i + 1) * b0);
      const c1 = Math.min(cols, (j + 1) * b1);
      let amax = 0;
      for (let r = i * b0; r < r1; r++)
        for (let c = j * b1; c < c1; c++) amax = Math.max(amax, Math.abs(w[r * cols + c]));
      const s = Math.fround(amax > 0 ? amax / 448 : 1);
      scales[i * bc + j] = s;
      for (let r = i * b0; r < r1; r++)
        for (let c = j * b1; c < c1; c++) q[r * cols + c] = f32ToE4m3Bits(w[r * cols + c] / s);
    }
  }
  return { q, scales, scaleShape: [br, bc] };
}

/** True for the 2-D Linear weights DeepSeek-V3 stores in FP8 (decoder/MTP layers, router excluded). */
export function isFp8Weight(name: string, shape: readonly number[]): boolean {
  if (shape.length !== 2 || !/^model\.layers\.\d+\./.test(name) || !name.endsWith('.weight')) return false;
  return !/(\.mlp\.gate|\.block_sparse_moe\.gate|\.shared_expert_gate|\.embed_tokens|\.shared_head\.head)\.weight$/.test(
    name,
  );
}

// ---- tokenizer files ---------------------------------------------------------------------------

const SPECIAL = ['<unk>', '<s>', '</s>'];
const WORDS = ['the', 'a', 'model', 'is', 'small', '.'];

function tokenizerJson(): object {
  const vocab: Record<string, number> = {};
  [...SPECIAL, ...WORDS].forEach((w, i) => {
    vocab[w] = i;
  });
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: SPECIAL.map((content, id) => ({
      id,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    normalizer: null,
    pre_tokenizer: { type: 'Whitespace' },
    post_processor: null,
    decoder: null,
    model: { type: 'WordLevel', vocab, unk_token: '<unk>' },
  };
}

function writeJson(file: string, value: unknown): void {
  fs.writeFileSync(file, `${JSON.stringify(value, null, 2)}\n`);
}

const TORCH_DTYPE = { BF16: 'bfloat16', F16: 'float16', F32: 'float32' } as const;

/**
 * Writes a Hugging Face checkpoint folder for `config`: config.json (torch_dtype set, plus
 * quantization_config with fp8), generation_config.json, tokenizer files, and the weights as sharded
 * safetensors with model.safetensors.index.json, or one model.safetensors when everything fits in
 * one shard. MTP embedding/head copies repeat the bytes of the main embedding/lm_head. Returns
 * every tensor written (name → dtype, shape, bytes), `_scale_inv` tensors included.
 */
export function writeSyntheticHfCheckpoint(
  dir: string,
  config: Record<string, unknown>,
  opts: SyntheticOptions = {},
): Map<string, SyntheticTensor> {
  const seed = opts.seed ?? 0;
  const dtype = opts.dtype ?? 'BF16';
  const { spec, transformerConfig: cfg } = parseHfConfig(config);
  const out = new Map<string, SyntheticTensor>();
  const embedName = 'model.embed_tokens.weight';
  const headName = cfg.untieEmbeddingsAndOutputWeights ? 'lm_head.weight' : embedName;

  for (const { name, shape } of spec.expectedHfTensors(cfg)) {
    // DeepSeek-V3's MTP layers store exact copies of the embedding and the output layer.
    const copyOf = name.endsWith('.embed_tokens.weight')
      ? embedName
      : name.endsWith('.shared_head.head.weight')
        ? headName
        : null;
    if (copyOf && copyOf !== name) {
      const src = out.get(copyOf);
      if (!src) throw new Error(`${name}: ${copyOf} must come first`);
      out.set(name, { ...src, shape: [...shape], data: src.data.slice() });
      continue;
    }
    const n = shape.reduce((a, b) => a * b, 1);
    const isNorm = name.endsWith('norm.weight');
    const values = normalValues(n, seed, name, isNorm ? 1 : 0, 0.02);
    if (name.endsWith('.e_score_correction_bias')) {
      // Kept in float32 in the published DeepSeek-V3 files whatever the model dtype.
      out.set(name, { dtype: 'F32', shape: [...shape], data: encode(values, 'F32') });
    } else if (opts.fp8 && isFp8Weight(name, shape)) {
      const { q, scales, scaleShape } = quantizeFp8(values, shape[0], shape[1], opts.fp8.blockSize);
      out.set(name, { dtype: 'F8_E4M3', shape: [...shape], data: q });
      out.set(`${name}_scale_inv`, { dtype: 'F32', shape: scaleShape, data: encode(scales, 'F32') });
    } else {
      out.set(name, { dtype, shape: [...shape], data: encode(values, dtype) });
    }
  }

  fs.mkdirSync(dir, { recursive: true });
  const written: Record<string, unknown> = { ...config, torch_dtype: TORCH_DTYPE[dtype] };
  if (opts.fp8) {
    written.quantization_config = {
      quant_method: 'fp8',
      fmt: 'e4m3',
      activation_scheme: 'dynamic',
      weight_block_size: [...opts.fp8.blockSize],
    };
  }
  writeJson(path.join(dir, 'config.json'), written);
  writeJson(path.join(dir, 'generation_config.json'), {
    _from_model_config: true,
    bos_token_id: config.bos_token_id ?? 1,
    eos_token_id: config.eos_token_id ?? 2,
    transformers_version: config.transformers_version ?? '4.51.0',
  });
  writeJson(path.join(dir, 'tokenizer.json'), tokenizerJson());
  writeJson(path.join(dir, 'tokenizer_config.json'), {
    tokenizer_class: 'PreTrainedTokenizerFast',
    bos_token: '<s>',
    eos_token: '</s>',
    unk_token: '<unk>',
    model_max_length: cfg.maxPositionEmbeddings,
    clean_up_tokenization_spaces: false,
  });
  writeJson(path.join(dir, 'special_tokens_map.json'), {
    bos_token: '<s>',
    eos_token: '</s>',
    unk_token: '<unk>',
  });

  const list: TensorInput[] = [...out].map(([name, t]) => ({ name, ...t }));
  const metadata = { format: 'pt' };
  const maxShardSize = opts.maxShardSize ?? 256 * 1024;
  if (planShards(list, maxShardSize, metadata).length === 1)
    writeSafetensors(path.join(dir, 'model.safetensors'), list, { metadata });
  else writeShardedSafetensors(dir, list, { maxShardSize, metadata });
  return out;
}
