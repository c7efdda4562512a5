// Phi-3 / Phi-4 (Phi3ForCausalLM): Mistral's decoder with packed projections. `qkv_proj` holds
// every query head, then the key heads, then the value heads ([q; k; v] along the rows), and
// `gate_up_proj` holds [gate; up], SiLU on the first half, as transformers' Phi3Attention and
// Phi3MLP split them. A sliding window applies only when `sliding_window` is set (Phi-3-mini-4k:
// 2047), with Mistral's mask. The 128k-context models' longrope scaling and Phi-4-mini's partial
// rotary embedding are refused, naming the models that do convert.
import { z } from 'zod';
import { ConvertError } from '../errors.js';
import { makeTransformerConfig, type TransformerConfig } from '../transformer-config.js';
import { hfTensor, layerRule, outerRules, outerTensors } from './common.js';
import { HfLlamaStyleConfig, llamaStyleBase } from './dense.js';
import type { ArchitectureSpec, HfTensorShape, WeightRule } from './types.js';

/** Phi-3's config.json: the Llama-style fields and its rotary settings. */
export const HfPhi3Config = HfLlamaStyleConfig.extend({
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

/** Phi-3-mini/medium (4k), Phi-4: Phi3ForCausalLM. */
export const phi3Spec: ArchitectureSpec<HfPhi3Config> = {
  architectures: ['Phi3ForCausalLM'],
  configSchema: HfPhi3Config,
  toTransformerConfig(hf) {
    const partial = hf.partial_rotary_factor ?? hf.rope_parameters?.partial_rotary_factor ?? 1;
    if (partial !== 1) {
      throw new ConvertError(
        'UNSUPPORTED',
        `field "partial_rotary_factor": ${partial} (a rotary embedding on part of each head, as in Phi-4-mini) is not supported: megapatch rotates whole heads`,
      );
    }
    const kind = hf.rope_scaling
      ? (hf.rope_scaling.rope_type ?? hf.rope_scaling.type ?? 'default')
      : 'default';
    if (kind !== 'default') {
      // transformers reads Phi-3's "su" and "yarn" as longrope too
      throw new ConvertError(
        'UNSUPPORTED',
        `field "rope_scaling": Phi-3's ${JSON.stringify(kind)} scaling (longrope, the 128k-context Phi-3 and Phi-3.5 models) is not supported; ` +
          'the models without it convert (Phi-3-mini-4k, Phi-3-medium-4k, Phi-4)',
      );
    }
    return makeTransformerConfig({
      ...llamaStyleBase(hf, { type: 'none' }),
      addQkvBias: false,
      qkLayernorm: false,
      // Phi3Config's default is no window (Mistral's is 4096)
      slidingWindow: hf.sliding_window || null,
    });
  },
  weightRules: phi3Rules,
  expectedHfTensors: phi3Tensors,
};
