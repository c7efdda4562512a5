// GQA decoders with mixture-of-experts MLPs: Mixtral, Qwen1.5/Qwen2-MoE, Qwen3-MoE.
import { z } from 'zod';
import { ConvertError } from '../errors.js';
import {
  CONFIG_LIMITS as L,
  limitedInt,
  makeTransformerConfig,
  moeLayerPattern,
  type TransformerConfig,
} from '../transformer-config.js';
import {
  gqaAttentionRules,
  gqaAttentionTensors,
  hfTensor,
  kindOf,
  layerRule,
  outerRules,
  outerTensors,
  PROJ,
  preMlpNormRules,
  ropeScalingFromHf,
  swigluRules,
  swigluTensors,
} from './common.js';
import { denseRules, HfLlamaStyleConfig, llamaStyleBase } from './dense.js';
import type { ArchitectureSpec, HfTensorShape, WeightRule } from './types.js';

const EXPERTS = 'mlp.experts.local_experts.{expert}.';

/** Mixtral config.json. */
export const HfMixtralConfig = HfLlamaStyleConfig.extend({
  num_local_experts: limitedInt(L.experts),
  num_experts_per_tok: limitedInt(L.experts),
});
/** Parsed Mixtral config. */
export type HfMixtralConfig = z.infer<typeof HfMixtralConfig>;

const W = { gate: 'w1', up: 'w3', down: 'w2' } as const;

/** Refuses a top-k larger than the expert count, naming the config.json fields. */
function checkTopk(topk: number, experts: number, field: string): void {
  if (topk > experts) {
    throw new ConvertError(
      'INVALID_CONFIG',
      `field "num_experts_per_tok": ${topk} is larger than "${field}" ${experts}`,
    );
  }
}

/** Mixtral 8x7B / 8x22B: every layer MoE, experts named w1 (gate), w3 (up), w2 (down). */
export const mixtralSpec: ArchitectureSpec<HfMixtralConfig> = {
  architectures: ['MixtralForCausalLM'],
  configSchema: HfMixtralConfig,
  toTransformerConfig(hf) {
    checkTopk(hf.num_experts_per_tok, hf.num_local_experts, 'num_local_experts');
    return makeTransformerConfig({
      ...llamaStyleBase(hf, ropeScalingFromHf(hf.rope_scaling)),
      moe: {
        numExperts: hf.num_local_experts,
        routerTopk: hf.num_experts_per_tok,
        moeFfnHiddenSize: hf.intermediate_size,
        // Mixtral renormalises the top-k softmax weights.
        normTopkProb: true,
        layerPattern: moeLayerPattern(hf.num_hidden_layers, {}),
      },
    });
  },
  weightRules: [
    ...outerRules,
    ...gqaAttentionRules,
    ...preMlpNormRules,
    layerRule('block_sparse_moe.gate.weight', 'mlp.router.weight', { type: 'replicate' }, 'moe'),
    ...swigluRules('block_sparse_moe.experts.{expert}.', EXPERTS, W, true, 'moe'),
  ],
  expectedHfTensors(cfg) {
    const out = outerTensors(cfg);
    const h = cfg.hiddenSize;
    const moe = cfg.moe;
    for (let i = 0; i < cfg.numLayers; i++) {
      const p = `model.layers.${i}.block_sparse_moe.`;
      out.push(...gqaAttentionTensors(cfg, i));
      if (!moe) continue;
      out.push(hfTensor(`${p}gate.weight`, moe.numExperts, h));
      for (let e = 0; e < moe.numExperts; e++)
        out.push(...swigluTensors(`${p}experts.${e}.`, moe.moeFfnHiddenSize, h, W));
    }
    return out;
  },
};

/** Qwen-MoE fields common to Qwen2-MoE and Qwen3-MoE. */
const qwenMoeFields = {
  // transformers 5 writes Qwen3-MoE's expert count as num_local_experts.
  num_experts: limitedInt(L.experts).optional(),
  num_local_experts: limitedInt(L.experts).optional(),
  num_experts_per_tok: limitedInt(L.experts),
  moe_intermediate_size: limitedInt(L.width),
  norm_topk_prob: z.boolean().default(false),
  decoder_sparse_step: limitedInt(L.layers).default(1),
  mlp_only_layers: z
    .array(limitedInt(L.layers, { zero: true }))
    .max(L.layers)
    .default([]),
};

/** Qwen1.5-MoE / Qwen2-MoE config.json. */
export const HfQwen2MoeConfig = HfLlamaStyleConfig.extend({
  ...qwenMoeFields,
  shared_expert_intermediate_size: limitedInt(L.width),
});
/** Parsed Qwen2-MoE config. */
export type HfQwen2MoeConfig = z.infer<typeof HfQwen2MoeConfig>;
/** Qwen3-MoE config.json. */
export const HfQwen3MoeConfig = HfLlamaStyleConfig.extend(qwenMoeFields);
/** Parsed Qwen3-MoE config. */
export type HfQwen3MoeConfig = z.infer<typeof HfQwen3MoeConfig>;

function qwenNumExperts(hf: {
  num_experts?: number;
  num_local_experts?: number;
  num_experts_per_tok: number;
}): number {
  const n = hf.num_experts ?? hf.num_local_experts;
  if (n === undefined) {
    throw new ConvertError('INVALID_CONFIG', 'field "num_experts" (or "num_local_experts") is required');
  }
  checkTopk(hf.num_experts_per_tok, n, hf.num_experts !== undefined ? 'num_experts' : 'num_local_experts');
  return n;
}

function qwenMoePattern(hf: z.infer<typeof HfQwen3MoeConfig>) {
  return moeLayerPattern(hf.num_hidden_layers, {
    sparseStep: hf.decoder_sparse_step,
    denseLayers: hf.mlp_only_layers,
  });
}

const qwenMoeRules: WeightRule[] = [
  // Layers listed in mlp_only_layers keep the dense `mlp.gate_proj` … names.
  ...denseRules,
  layerRule('mlp.gate.weight', 'mlp.router.weight', { type: 'replicate' }, 'moe'),
  ...swigluRules('mlp.experts.{expert}.', EXPERTS, PROJ, true, 'moe'),
];

function qwenMoeTensors(cfg: TransformerConfig, shared: boolean): HfTensorShape[] {
  const out = outerTensors(cfg);
  const h = cfg.hiddenSize;
  for (let i = 0; i < cfg.numLayers; i++) {
    const p = `model.layers.${i}.`;
    out.push(...gqaAttentionTensors(cfg, i));
    const moe = cfg.moe;
    if (!moe || kindOf(cfg, i) === 'dense') {
      // Layers in mlp_only_layers are dense MLPs of intermediate_size.
      out.push(...swigluTensors(`${p}mlp.`, cfg.ffnHiddenSize, h));
      continue;
    }
    out.push(hfTensor(`${p}mlp.gate.weight`, moe.numExperts, h));
    for (let e = 0; e < moe.numExperts; e++)
      out.push(...swigluTensors(`${p}mlp.experts.${e}.`, moe.moeFfnHiddenSize, h));
    if (shared) {
      out.push(
        ...swigluTensors(`${p}mlp.shared_expert.`, moe.sharedExpertIntermediateSize, h),
        hfTensor(`${p}mlp.shared_expert_gate.weight`, 1, h),
      );
    }
  }
  return out;
}

/** Qwen1.5-MoE / Qwen2-MoE: q/k/v bias, one shared expert with a sigmoid gate. */
export const qwen2MoeSpec: ArchitectureSpec<HfQwen2MoeConfig> = {
  architectures: ['Qwen2MoeForCausalLM'],
  configSchema: HfQwen2MoeConfig,
  toTransformerConfig(hf) {
    return makeTransformerConfig({
      ...llamaStyleBase(hf, ropeScalingFromHf(hf.rope_scaling)),
      addQkvBias: true,
      moe: {
        numExperts: qwenNumExperts(hf),
        routerTopk: hf.num_experts_per_tok,
        moeFfnHiddenSize: hf.moe_intermediate_size,
        sharedExpertIntermediateSize: hf.shared_expert_intermediate_size,
        sharedExpertGate: true,
        normTopkProb: hf.norm_topk_prob,
        layerPattern: qwenMoePattern(hf),
      },
    });
  },
  weightRules: [
    ...qwenMoeRules,
    ...swigluRules('mlp.shared_expert.', 'mlp.shared_experts.', PROJ, false, 'moe'),
    layerRule(
      'mlp.shared_expert_gate.weight',
      'mlp.shared_experts.gate_weight',
      { type: 'replicate' },
      'moe',
    ),
  ],
  expectedHfTensors: (cfg) => qwenMoeTensors(cfg, true),
};

/** Qwen3-MoE: q/k norm, head_dim (default 128), no shared expert. */
export const qwen3MoeSpec: ArchitectureSpec<HfQwen3MoeConfig> = {
  architectures: ['Qwen3MoeForCausalLM'],
  configSchema: HfQwen3MoeConfig,
  toTransformerConfig(hf) {
    return makeTransformerConfig({
      ...llamaStyleBase({ ...hf, head_dim: hf.head_dim ?? 128 }, ropeScalingFromHf(hf.rope_scaling)),
      qkLayernorm: true,
      moe: {
        numExperts: qwenNumExperts(hf),
        routerTopk: hf.num_experts_per_tok,
        moeFfnHiddenSize: hf.moe_intermediate_size,
        normTopkProb: hf.norm_topk_prob,
        layerPattern: qwenMoePattern(hf),
      },
    });
  },
  weightRules: qwenMoeRules,
  expectedHfTensors: (cfg) => qwenMoeTensors(cfg, false),
};
