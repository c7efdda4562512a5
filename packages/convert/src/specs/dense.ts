// Dense GQA decoders: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3 (q/k norm, explicit head_dim).
import { z } from 'zod';
import { ConvertError } from '../errors.js';
import {
  CONFIG_LIMITS as L,
  limitedInt,
  makeTransformerConfig,
  type TransformerConfig,
} from '../transformer-config.js';
import {
  denseMlpRules,
  gqaAttentionRules,
  gqaAttentionTensors,
  HfHiddenAct,
  HfRopeScaling,
  outerRules,
  outerTensors,
  preMlpNormRules,
  ropeScalingFromHf,
  swigluTensors,
} from './common.js';
import type { ArchitectureSpec, HfTensorShape, WeightRule } from './types.js';

/** Fields every Llama-style HF config.json carries. */
export const HfLlamaStyleConfig = z.object({
  hidden_size: limitedInt(L.width),
  intermediate_size: limitedInt(L.width),
  num_hidden_layers: limitedInt(L.layers),
  num_attention_heads: limitedInt(L.heads),
  num_key_value_heads: limitedInt(L.heads).nullish(),
  head_dim: limitedInt(L.headDim).nullish(),
  hidden_act: HfHiddenAct,
  rms_norm_eps: z.number().positive(),
  rope_theta: z.number().positive().default(10000),
  rope_scaling: HfRopeScaling,
  tie_word_embeddings: z.boolean().default(false),
  vocab_size: limitedInt(L.vocab),
  max_position_embeddings: limitedInt(L.positions),
  // Llama/Qwen3 `attention_bias` also adds an o_proj bias, which TransformerConfig cannot express.
  attention_bias: z.literal(false).optional(),
  mlp_bias: z.literal(false).optional(),
  // Sliding-window attention: Mistral applies `sliding_window` (transformers' default 4096 when the
  // field is absent); Qwen2/3 only with `use_sliding_window`, in layers >= `max_window_layers`.
  // transformers 5 writes 0 when the window is off
  sliding_window: limitedInt(L.positions, { zero: true }).nullish(),
  use_sliding_window: z.boolean().optional(),
  max_window_layers: limitedInt(L.layers, { zero: true }).optional(),
});
/** Parsed Llama-style HF config. */
export type HfLlamaStyleConfig = z.infer<typeof HfLlamaStyleConfig>;

/** TransformerConfig fields shared by every Llama-style config (attention, norms, rope, vocab). */
export function llamaStyleBase(hf: HfLlamaStyleConfig, ropeScaling: TransformerConfig['ropeScaling']) {
  if (hf.hidden_size % hf.num_attention_heads !== 0 && !hf.head_dim) {
    throw new ConvertError(
      'INVALID_CONFIG',
      'field "head_dim" is required when hidden_size is not a multiple of num_attention_heads',
    );
  }
  return {
    numLayers: hf.num_hidden_layers,
    hiddenSize: hf.hidden_size,
    ffnHiddenSize: hf.intermediate_size,
    numAttentionHeads: hf.num_attention_heads,
    // HF leaves num_key_value_heads out for plain multi-head attention.
    numQueryGroups: hf.num_key_value_heads ?? hf.num_attention_heads,
    kvChannels: hf.head_dim ?? hf.hidden_size / hf.num_attention_heads,
    normalization: 'RMSNorm' as const,
    layernormEpsilon: hf.rms_norm_eps,
    rotaryBase: hf.rope_theta,
    ropeScaling,
    untieEmbeddingsAndOutputWeights: !hf.tie_word_embeddings,
    vocabSize: hf.vocab_size,
    maxPositionEmbeddings: hf.max_position_embeddings,
  };
}

/** Rules of a dense Llama-style checkpoint. */
export const denseRules: WeightRule[] = [
  ...outerRules,
  ...gqaAttentionRules,
  ...preMlpNormRules,
  ...denseMlpRules,
];

/** HF tensors (names and shapes) of a dense Llama-style checkpoint. */
export function denseTensors(cfg: TransformerConfig): HfTensorShape[] {
  const out = outerTensors(cfg);
  for (let i = 0; i < cfg.numLayers; i++) {
    out.push(
      ...gqaAttentionTensors(cfg, i),
      ...swigluTensors(`model.layers.${i}.mlp.`, cfg.ffnHiddenSize, cfg.hiddenSize),
    );
  }
  return out;
}

/** The window of every layer, or null; a window in only some layers is refused (not supported). */
function slidingWindowOf(hf: HfLlamaStyleConfig, window: 'mistral' | 'qwen' | 'none'): number | null {
  if (window === 'none') return null;
  if (window === 'mistral') return hf.sliding_window === undefined ? 4096 : hf.sliding_window || null;
  if (!hf.use_sliding_window || !hf.sliding_window) return null;
  const from = hf.max_window_layers ?? 0;
  if (from >= hf.num_hidden_layers) return null;
  if (from > 0) {
    throw new ConvertError(
      'UNSUPPORTED',
      `field "max_window_layers": a sliding window in layers ${from}.. only is not supported; ` +
        'megapatch applies a window to every layer (set max_window_layers to 0) or to none',
    );
  }
  return hf.sliding_window;
}

function denseSpec(
  architectures: string[],
  opts: { qkvBias: boolean; qkNorm: boolean; defaultHeadDim?: number; window: 'mistral' | 'qwen' | 'none' },
): ArchitectureSpec<HfLlamaStyleConfig> {
  return {
    architectures,
    configSchema: HfLlamaStyleConfig,
    toTransformerConfig(hf) {
      const withDefault = opts.defaultHeadDim && !hf.head_dim ? { ...hf, head_dim: opts.defaultHeadDim } : hf;
      return makeTransformerConfig({
        ...llamaStyleBase(withDefault, ropeFrom(hf)),
        addQkvBias: opts.qkvBias,
        qkLayernorm: opts.qkNorm,
        slidingWindow: slidingWindowOf(hf, opts.window),
      });
    },
    weightRules: denseRules,
    expectedHfTensors: denseTensors,
  };
}

function ropeFrom(hf: HfLlamaStyleConfig) {
  return ropeScalingFromHf(hf.rope_scaling);
}

/** Llama 2/3/3.1/3.2 (llama3/linear rope scaling, optional explicit head_dim). */
export const llamaSpec = denseSpec(['LlamaForCausalLM'], { qkvBias: false, qkNorm: false, window: 'none' });
/** Mistral 7B (sliding-window attention: a runtime setting, not a weight difference). */
export const mistralSpec = denseSpec(['MistralForCausalLM'], {
  qkvBias: false,
  qkNorm: false,
  window: 'mistral',
});
/** Qwen2 / Qwen2.5: bias on q/k/v (always, independent of the config). */
export const qwen2Spec = denseSpec(['Qwen2ForCausalLM'], { qkvBias: true, qkNorm: false, window: 'qwen' });
/** Qwen3: per-head RMSNorm on q and k, head_dim defaulting to 128. */
export const qwen3Spec = denseSpec(['Qwen3ForCausalLM'], {
  qkvBias: false,
  qkNorm: true,
  defaultHeadDim: 128,
  window: 'qwen',
});
