// Phi-3 / Phi-4 (Phi3ForCausalLM): Mistral's decoder with packed projections. `qkv_proj` holds
// every query head, then the key heads, then the value heads ([q; k; v] along the rows), and
// `gate_up_proj` holds [gate; up], SiLU on the first half, as transformers' Phi3Attention and
// Phi3MLP split them. A sliding window applies only when `sliding_window` is set (Phi-3-mini-4k:
// 2047), with Mistral's mask. The 128k-context models scale RoPE with longrope (per-frequency
// factors, short or long by the context); Phi-4-mini rotates only part of each head
// (`partial_rotary_factor` 0.75: the first 96 of 128 channels), Megatron's rotary_percent.
import { z } from 'zod';
import { ConvertError } from '../errors.js';
import {
  CONFIG_LIMITS,
  limitedInt,
  makeTransformerConfig,
  type RopeScaling,
  type TransformerConfig,
} from '../transformer-config.js';
import { hfTensor, layerRule, outerRules, outerTensors } from './common.js';
import { HfLlamaStyleConfig, llamaStyleBase } from './dense.js';
import type { ArchitectureSpec, HfTensorShape, WeightRule } from './types.js';

const factors = z.array(z.number().positive()).max(CONFIG_LIMITS.headDim);

/** Phi-3's config.json: the Llama-style fields and its rotary settings (longrope's factor lists). */
export const HfPhi3Config = HfLlamaStyleConfig.extend({
  rope_scaling: z
    .object({
      rope_type: z.string().optional(),
      type: z.string().optional(),
      short_factor: factors.optional(),
      long_factor: factors.optional(),
      attention_factor: z.number().positive().nullish(),
      original_max_position_embeddings: limitedInt(CONFIG_LIMITS.positions).optional(),
    })
    .passthrough()
    .nullish(),
  original_max_position_embeddings: limitedInt(CONFIG_LIMITS.positions).optional(),
  partial_rotary_factor: z.number().positive().max(1).optional(),
  // transformers 5 keeps the rotary settings here
  rope_parameters: z
    .object({ partial_rotary_factor: z.number().positive().max(1).optional() })
    .passthrough()
    .nullish(),
});
/** Parsed Phi-3 config. */
export type HfPhi3Config = z.infer<typeof HfPhi3Config>;

/** Rules of a Phi-3 checkpoint: packed QKV and gate/up, Llama's norms and output layer. */
export const phi3Rules: WeightRule[] = [
  ...outerRules,
  layerRule('input_layernorm.weight', 'self_attention.linear_qkv.layer_norm_weight', { type: 'replicate' }),
  layerRule('self_attn.qkv_proj.weight', 'self_attention.linear_qkv.weight', { type: 'qkv', part: 'qkv' }),
  layerRule('self_attn.o_proj.weight', 'self_attention.linear_proj.weight', { type: 'split', dim: 1 }),
  layerRule('post_attention_layernorm.weight', 'mlp.linear_fc1.layer_norm_weight', { type: 'replicate' }),
  layerRule('mlp.gate_up_proj.weight', 'mlp.linear_fc1.weight', { type: 'gate_up', part: 'gate_up' }),
  layerRule('mlp.down_proj.weight', 'mlp.linear_fc2.weight', { type: 'split', dim: 1 }),
];

/** HF tensors (names and shapes) of a Phi-3 checkpoint. */
export function phi3Tensors(cfg: TransformerConfig): HfTensorShape[] {
  const out = outerTensors(cfg);
  const h = cfg.hiddenSize;
  const d = cfg.kvChannels;
  const f = cfg.ffnHiddenSize;
  for (let i = 0; i < cfg.numLayers; i++) {
    const p = `model.layers.${i}.`;
    out.push(
      hfTensor(`${p}input_layernorm.weight`, h),
      hfTensor(`${p}self_attn.qkv_proj.weight`, (cfg.numAttentionHeads + 2 * cfg.numQueryGroups) * d, h),
      hfTensor(`${p}self_attn.o_proj.weight`, h, cfg.numAttentionHeads * d),
      hfTensor(`${p}post_attention_layernorm.weight`, h),
      hfTensor(`${p}mlp.gate_up_proj.weight`, 2 * f, h),
      hfTensor(`${p}mlp.down_proj.weight`, h, f),
    );
  }
  return out;
}

/**
 * Phi-3's rotary scaling: none, or longrope (transformers reads the older names "su" and "yarn" as
 * longrope too). The original context comes from the config's top level, as transformers takes it;
 * the default attention factor is √(1 + ln(s) / ln(original)) for s = max / original positions > 1.
 */
function phi3Rope(hf: HfPhi3Config, rotaryPercent: number): RopeScaling {
  const rs = hf.rope_scaling;
  const kind = rs ? (rs.rope_type ?? rs.type ?? 'default') : 'default';
  if (!rs || kind === 'default') return { type: 'none' };
  if (!['longrope', 'su', 'yarn'].includes(kind)) {
    throw new ConvertError(
      'UNSUPPORTED',
      `field "rope_scaling": type ${JSON.stringify(kind)} is not one of Phi-3's (longrope)`,
    );
  }
  // one factor per rotating pair: transformers' int(head_dim · partial_rotary_factor) / 2
  const half = Math.trunc((hf.head_dim ?? hf.hidden_size / hf.num_attention_heads) * rotaryPercent) / 2;
  for (const field of ['short_factor', 'long_factor'] as const) {
    const f = rs[field];
    if (!f || f.length !== half) {
      throw new ConvertError(
        'INVALID_CONFIG',
        `field "rope_scaling.${field}" must list ${half} numbers (one per rotating pair of a head's channels), got ${f ? f.length : 'none'}`,
      );
    }
  }
  const original =
    hf.original_max_position_embeddings ?? rs.original_max_position_embeddings ?? hf.max_position_embeddings;
  const s = hf.max_position_embeddings / original;
  const attentionFactor =
    rs.attention_factor ?? (s > 1 ? Math.sqrt(1 + Math.log(s) / Math.log(original)) : 1);
  return {
    type: 'longrope',
    shortFactor: [...(rs.short_factor as number[])],
    longFactor: [...(rs.long_factor as number[])],
    originalMaxPositionEmbeddings: original,
    attentionFactor,
  };
}

/** Phi-3-mini/medium (4k and 128k), Phi-3.5-mini, Phi-4, Phi-4-mini: Phi3ForCausalLM. */
export const phi3Spec: ArchitectureSpec<HfPhi3Config> = {
  architectures: ['Phi3ForCausalLM'],
  configSchema: HfPhi3Config,
  toTransformerConfig(hf) {
    // transformers 4 keeps it at the top level, transformers 5 among the rotary settings
    const rotaryPercent = hf.partial_rotary_factor ?? hf.rope_parameters?.partial_rotary_factor ?? 1;
    const rotating = Math.trunc((hf.head_dim ?? hf.hidden_size / hf.num_attention_heads) * rotaryPercent);
    if (rotating === 0 || rotating % 2 !== 0) {
      throw new ConvertError(
        'INVALID_CONFIG',
        `field "partial_rotary_factor": ${rotaryPercent} rotates ${rotating} channels of each head; RoPE needs a positive even number`,
      );
    }
    return makeTransformerConfig({
      ...llamaStyleBase(hf, phi3Rope(hf, rotaryPercent)),
      rotaryPercent,
      addQkvBias: false,
      qkLayernorm: false,
      // Phi3Config's default is no window (Mistral's is 4096)
      slidingWindow: hf.sliding_window || null,
    });
  },
  weightRules: phi3Rules,
  expectedHfTensors: phi3Tensors,
};
