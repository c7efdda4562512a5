// DeepSeek-V2 / V3 (and Moonlight, which ships as DeepseekV3ForCausalLM): MLA attention, MoE with
// shared experts, optional first dense layers, V3's expert bias and multi-token-prediction layers.
import { z } from 'zod';
import { makeTransformerConfig, moeLayerPattern, type TransformerConfig } from '../transformer-config.js';
import {
  HfRopeScaling,
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
import type { ArchitectureSpec, HfTensorShape, WeightRule } from './types.js';

const int = z.number().int().positive();

/** DeepSeek-V2/V3 config.json. */
export const HfDeepseekConfig = z.object({
  hidden_size: int,
  intermediate_size: int,
  moe_intermediate_size: int,
  num_hidden_layers: int,
  num_attention_heads: int,
  // MoE fields: n_routed_experts null means a dense model.
  n_routed_experts: int.nullish(),
  n_shared_experts: z.number().int().nonnegative().nullish(),
  num_experts_per_tok: int.nullish(),
  first_k_dense_replace: z.number().int().nonnegative().default(0),
  moe_layer_freq: int.default(1),
  n_group: int.nullish(),
  topk_group: int.nullish(),
  topk_method: z.string().optional(),
  routed_scaling_factor: z.number().positive().default(1),
  scoring_func: z.enum(['softmax', 'sigmoid']).optional(),
  norm_topk_prob: z.boolean().default(false),
  // MLA fields.
  q_lora_rank: int.nullable(),
  kv_lora_rank: int,
  qk_nope_head_dim: int,
  qk_rope_head_dim: int,
  v_head_dim: int,
  rms_norm_eps: z.number().positive(),
  rope_theta: z.number().positive().default(10000),
  rope_scaling: HfRopeScaling,
  tie_word_embeddings: z.boolean().default(false),
  vocab_size: int,
  max_position_embeddings: int,
  num_nextn_predict_layers: z.number().int().nonnegative().default(0),
  attention_bias: z.literal(false).optional(),
});
/** Parsed DeepSeek-V2/V3 config. */
export type HfDeepseekConfig = z.infer<typeof HfDeepseekConfig>;

function toConfig(hf: HfDeepseekConfig, v3: boolean): TransformerConfig {
  // V3 defaults: sigmoid scores with aux-loss-free expert bias (topk_method noaux_tc).
  const topkMethod = hf.topk_method ?? (v3 ? 'noaux_tc' : 'greedy');
  const grouped = topkMethod === 'noaux_tc' || topkMethod === 'group_limited_greedy';
  const moe =
    hf.n_routed_experts && hf.num_experts_per_tok
      ? {
          numExperts: hf.n_routed_experts,
          routerTopk: hf.num_experts_per_tok,
          moeFfnHiddenSize: hf.moe_intermediate_size,
          // HF fuses the n shared experts into one MLP of n × moe_intermediate_size.
          sharedExpertIntermediateSize: (hf.n_shared_experts ?? 0) * hf.moe_intermediate_size,
          scoreFunction: hf.scoring_func ?? (v3 ? ('sigmoid' as const) : ('softmax' as const)),
          expertBias: topkMethod === 'noaux_tc',
          numGroups: grouped ? (hf.n_group ?? 1) : 1,
          groupTopk: grouped ? (hf.topk_group ?? 1) : 1,
          routedScalingFactor: hf.routed_scaling_factor,
          normTopkProb: hf.norm_topk_prob,
          layerPattern: moeLayerPattern(hf.num_hidden_layers, {
            firstKDense: hf.first_k_dense_replace,
            freq: hf.moe_layer_freq,
          }),
        }
      : null;
  return makeTransformerConfig({
    numLayers: hf.num_hidden_layers,
    hiddenSize: hf.hidden_size,
    ffnHiddenSize: hf.intermediate_size,
    numAttentionHeads: hf.num_attention_heads,
    // MLA has no grouped KV heads; every head gets its own k/v from the latent.
    numQueryGroups: hf.num_attention_heads,
    kvChannels: hf.qk_nope_head_dim + hf.qk_rope_head_dim,
    layernormEpsilon: hf.rms_norm_eps,
    rotaryBase: hf.rope_theta,
    ropeScaling: ropeScalingFromHf(hf.rope_scaling),
    untieEmbeddingsAndOutputWeights: !hf.tie_word_embeddings,
    vocabSize: hf.vocab_size,
    maxPositionEmbeddings: hf.max_position_embeddings,
    moe,
    mla: {
      qLoraRank: hf.q_lora_rank,
      kvLoraRank: hf.kv_lora_rank,
      qkNopeHeadDim: hf.qk_nope_head_dim,
      qkRopeHeadDim: hf.qk_rope_head_dim,
      vHeadDim: hf.v_head_dim,
    },
    mtpNumLayers: v3 ? hf.num_nextn_predict_layers : 0,
  });
}

const R = { type: 'replicate' } as const;

/** Rules of one DeepSeek decoder layer (prefixes `model.layers.{layer}.` / `decoder.layers.{layer}.`). */
const layerRules: WeightRule[] = [
  layerRule('input_layernorm.weight', 'input_layernorm.weight', R),
  // Recent mcore builds the down-projections duplicated across TP, so they are replicated.
  layerRule('self_attn.q_proj.weight', 'self_attention.linear_q_proj.weight', { type: 'split', dim: 0 }),
  layerRule('self_attn.q_a_proj.weight', 'self_attention.linear_q_down_proj.weight', R),
  layerRule('self_attn.q_a_layernorm.weight', 'self_attention.linear_q_up_proj.layer_norm_weight', R),
  layerRule('self_attn.q_b_proj.weight', 'self_attention.linear_q_up_proj.weight', { type: 'split', dim: 0 }),
  layerRule('self_attn.kv_a_proj_with_mqa.weight', 'self_attention.linear_kv_down_proj.weight', R),
  layerRule('self_attn.kv_a_layernorm.weight', 'self_attention.linear_kv_up_proj.layer_norm_weight', R),
  layerRule('self_attn.kv_b_proj.weight', 'self_attention.linear_kv_up_proj.weight', {
    type: 'split',
    dim: 0,
  }),
  layerRule('self_attn.o_proj.weight', 'self_attention.linear_proj.weight', { type: 'split', dim: 1 }),
  ...preMlpNormRules,
  ...swigluRules('mlp.', 'mlp.', PROJ, false, 'dense'),
  layerRule('mlp.gate.weight', 'mlp.router.weight', R, 'moe'),
  { ...layerRule('mlp.gate.e_score_correction_bias', 'mlp.router.expert_bias', R, 'moe'), dtype: 'F32' },
  ...swigluRules('mlp.experts.{expert}.', 'mlp.experts.local_experts.{expert}.', PROJ, true, 'moe'),
  ...swigluRules('mlp.shared_experts.', 'mlp.shared_experts.', PROJ, false, 'moe'),
];

// An MTP block holds a full decoder layer at HF index numLayers + k, mapped under mtp.layers.{k}.
const mtpRules: WeightRule[] = [
  ...layerRules.map((r) => ({
    ...r,
    hf: r.hf.replace('model.layers.{layer}.', 'model.layers.{mtpLayer}.'),
    megatron: r.megatron.replace('decoder.layers.{layer}.', 'mtp.layers.{mtp}.transformer_layer.'),
  })),
  { hf: 'model.layers.{mtpLayer}.enorm.weight', megatron: 'mtp.layers.{mtp}.enorm.weight', op: R },
  { hf: 'model.layers.{mtpLayer}.hnorm.weight', megatron: 'mtp.layers.{mtp}.hnorm.weight', op: R },
  {
    hf: 'model.layers.{mtpLayer}.eh_proj.weight',
    megatron: 'mtp.layers.{mtp}.eh_proj.weight',
    op: { type: 'split', dim: 0 },
  },
  {
    hf: 'model.layers.{mtpLayer}.shared_head.norm.weight',
    megatron: 'mtp.layers.{mtp}.final_layernorm.weight',
    op: R,
  },
  // Megatron shares the main embedding and output layer with the MTP block; HF stores copies.
  {
    hf: 'model.layers.{mtpLayer}.embed_tokens.weight',
    megatron: 'embedding.word_embeddings.weight',
    op: { type: 'duplicate' },
  },
  {
    hf: 'model.layers.{mtpLayer}.shared_head.head.weight',
    megatron: 'output_layer.weight',
    op: { type: 'duplicate' },
  },
];

/** HF tensors of decoder layer `i` (also an MTP block's inner layer) of the given kind. */
function layerTensors(cfg: TransformerConfig, i: number, kind: 'dense' | 'moe'): HfTensorShape[] {
  const p = `model.layers.${i}.`;
  const a = `${p}self_attn.`;
  const h = cfg.hiddenSize;
  const heads = cfg.numAttentionHeads;
  const out = [hfTensor(`${p}input_layernorm.weight`, h), hfTensor(`${p}post_attention_layernorm.weight`, h)];
  const mla = cfg.mla;
  if (mla) {
    const qHead = mla.qkNopeHeadDim + mla.qkRopeHeadDim;
    if (mla.qLoraRank === null) out.push(hfTensor(`${a}q_proj.weight`, heads * qHead, h));
    else {
      out.push(
        hfTensor(`${a}q_a_proj.weight`, mla.qLoraRank, h),
        hfTensor(`${a}q_a_layernorm.weight`, mla.qLoraRank),
        hfTensor(`${a}q_b_proj.weight`, heads * qHead, mla.qLoraRank),
      );
    }
    // The kv down-projection also yields the shared rope key (MQA-style), hence + rope dim.
    out.push(
      hfTensor(`${a}kv_a_proj_with_mqa.weight`, mla.kvLoraRank + mla.qkRopeHeadDim, h),
      hfTensor(`${a}kv_a_layernorm.weight`, mla.kvLoraRank),
      hfTensor(`${a}kv_b_proj.weight`, heads * (mla.qkNopeHeadDim + mla.vHeadDim), mla.kvLoraRank),
      hfTensor(`${a}o_proj.weight`, h, heads * mla.vHeadDim),
    );
  }
  const moe = cfg.moe;
  if (kind === 'dense' || !moe) return [...out, ...swigluTensors(`${p}mlp.`, cfg.ffnHiddenSize, h)];
  out.push(hfTensor(`${p}mlp.gate.weight`, moe.numExperts, h));
  if (moe.expertBias) out.push(hfTensor(`${p}mlp.gate.e_score_correction_bias`, moe.numExperts));
  for (let e = 0; e < moe.numExperts; e++)
    out.push(...swigluTensors(`${p}mlp.experts.${e}.`, moe.moeFfnHiddenSize, h));
  // HF fuses the n_shared_experts into one MLP of n × moe_intermediate_size.
  if (moe.sharedExpertIntermediateSize > 0)
    out.push(...swigluTensors(`${p}mlp.shared_experts.`, moe.sharedExpertIntermediateSize, h));
  return out;
}

/** HF tensors of MTP block `k` (HF layer numLayers + k): a decoder layer, norms, eh_proj and copies. */
function mtpTensors(cfg: TransformerConfig, k: number): HfTensorShape[] {
  const i = cfg.numLayers + k;
  const p = `model.layers.${i}.`;
  const h = cfg.hiddenSize;
  return [
    ...layerTensors(cfg, i, kindOf(cfg, cfg.numLayers - 1)),
    hfTensor(`${p}enorm.weight`, h),
    hfTensor(`${p}hnorm.weight`, h),
    // Projects concat(enorm(embedding), hnorm(hidden)) [2h] back to h.
    hfTensor(`${p}eh_proj.weight`, h, 2 * h),
    hfTensor(`${p}shared_head.norm.weight`, h),
    hfTensor(`${p}embed_tokens.weight`, cfg.vocabSize, h),
    hfTensor(`${p}shared_head.head.weight`, cfg.vocabSize, h),
  ];
}

function deepseekSpec(architectures: string[], v3: boolean): ArchitectureSpec<HfDeepseekConfig> {
  return {
    architectures,
    configSchema: HfDeepseekConfig,
    toTransformerConfig: (hf) => toConfig(hf, v3),
    weightRules: [...outerRules, ...layerRules, ...(v3 ? mtpRules : [])],
    expectedHfTensors(cfg) {
      const out = outerTensors(cfg);
      for (let i = 0; i < cfg.numLayers; i++) out.push(...layerTensors(cfg, i, kindOf(cfg, i)));
      for (let k = 0; k < cfg.mtpNumLayers; k++) out.push(...mtpTensors(cfg, k));
      return out;
    },
  };
}

/** DeepSeek-V2 / V2-Lite: softmax routing (greedy or group-limited), no expert bias, no MTP. */
export const deepseekV2Spec = deepseekSpec(['DeepseekV2ForCausalLM'], false);
/** DeepSeek-V3 and Moonlight: sigmoid routing with expert bias (noaux_tc), grouped top-k, MTP layers. */
export const deepseekV3Spec = deepseekSpec(['DeepseekV3ForCausalLM'], true);
