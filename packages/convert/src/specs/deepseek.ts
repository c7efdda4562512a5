// DeepSeek-V2 / V3 (and Moonlight, which ships as DeepseekV3ForCausalLM): MLA attention, MoE with
// shared experts, optional first dense layers, V3's expert bias and multi-token-prediction layers.
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
  HfHiddenAct,
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

/** DeepSeek-V2/V3 config.json. */
export const HfDeepseekConfig = z.object({
  hidden_size: limitedInt(L.width),
  intermediate_size: limitedInt(L.width),
  moe_intermediate_size: limitedInt(L.width),
  num_hidden_layers: limitedInt(L.layers),
  num_attention_heads: limitedInt(L.heads),
  hidden_act: HfHiddenAct,
  // MoE fields: n_routed_experts null means a dense model.
  n_routed_experts: limitedInt(L.experts).nullish(),
  n_shared_experts: limitedInt(L.experts, { zero: true }).nullish(),
  num_experts_per_tok: limitedInt(L.experts).nullish(),
  first_k_dense_replace: limitedInt(L.layers, { zero: true }).default(0),
  moe_layer_freq: limitedInt(L.layers).default(1),
  n_group: limitedInt(L.experts).nullish(),
  topk_group: limitedInt(L.experts).nullish(),
  // "gready" is the misspelt default of DeepSeek-V2's own configuration code.
  topk_method: z.enum(['greedy', 'gready', 'group_limited_greedy', 'noaux_tc']).optional(),
  routed_scaling_factor: z.number().positive().default(1),
  scoring_func: z.enum(['softmax', 'sigmoid']).optional(),
  norm_topk_prob: z.boolean().default(false),
  // MLA fields.
  q_lora_rank: limitedInt(L.width).nullable(),
  kv_lora_rank: limitedInt(L.width),
  qk_nope_head_dim: limitedInt(L.headDim),
  qk_rope_head_dim: limitedInt(L.headDim),
  v_head_dim: limitedInt(L.headDim),
  rms_norm_eps: z.number().positive(),
  rope_theta: z.number().positive().default(10000),
  rope_scaling: HfRopeScaling,
  tie_word_embeddings: z.boolean().default(false),
  vocab_size: limitedInt(L.vocab),
  max_position_embeddings: limitedInt(L.positions),
  num_nextn_predict_layers: limitedInt(L.mtpLayers, { zero: true }).default(0),
  attention_bias: z.literal(false).optional(),
});
/** Parsed DeepSeek-V2/V3 config. */
export type HfDeepseekConfig = z.infer<typeof HfDeepseekConfig>;

/**
 * The routing of a MoE config.json, checked with messages that name its fields: a top-k the
 * experts can serve and, for group-limited routing, groups of equal size with enough experts in
 * the `topk_group` groups a token may use. Null for a dense model (no `n_routed_experts`).
 */
function routingOf(hf: HfDeepseekConfig, v3: boolean) {
  // V3 defaults: sigmoid scores with aux-loss-free expert bias (topk_method noaux_tc).
  const method = hf.topk_method ?? (v3 ? 'noaux_tc' : 'greedy');
  const experts = hf.n_routed_experts;
  if (!experts) return null;
  const bad = (message: string) => new ConvertError('INVALID_CONFIG', message);
  const topk = hf.num_experts_per_tok;
  if (!topk) {
    throw bad(`field "num_experts_per_tok" is required when "n_routed_experts" is set (${experts})`);
  }
  if (topk > experts) {
    throw bad(`field "num_experts_per_tok": ${topk} is larger than "n_routed_experts" ${experts}`);
  }
  if (method !== 'noaux_tc' && method !== 'group_limited_greedy')
    return { method, topk, groups: 1, groupTopk: 1 };
  const why = hf.topk_method === undefined ? ' (the default when topk_method is absent)' : '';
  if (hf.n_group == null) throw bad(`field "n_group" is required when topk_method is "${method}"${why}`);
  if (hf.topk_group == null)
    throw bad(`field "topk_group" is required when topk_method is "${method}"${why}`);
  const groups = hf.n_group;
  const groupTopk = hf.topk_group;
  if (experts % groups !== 0) {
    throw bad(
      `field "n_routed_experts": ${experts} is not a multiple of "n_group" ${groups} (expert groups are of equal size)`,
    );
  }
  if (groupTopk > groups) throw bad(`field "topk_group": ${groupTopk} is larger than "n_group" ${groups}`);
  const reachable = (groupTopk * experts) / groups;
  if (topk > reachable) {
    throw bad(
      `field "num_experts_per_tok": ${topk} is larger than "topk_group" × "n_routed_experts" / "n_group" = ` +
        `${reachable}, the experts a token can reach`,
    );
  }
  return { method, topk, groups, groupTopk };
}

function toConfig(hf: HfDeepseekConfig, v3: boolean): TransformerConfig {
  const routing = routingOf(hf, v3);
  const moe =
    hf.n_routed_experts && routing
      ? {
          numExperts: hf.n_routed_experts,
          routerTopk: routing.topk,
          moeFfnHiddenSize: hf.moe_intermediate_size,
          // HF fuses the n shared experts into one MLP of n × moe_intermediate_size.
          sharedExpertIntermediateSize: (hf.n_shared_experts ?? 0) * hf.moe_intermediate_size,
          scoreFunction: hf.scoring_func ?? (v3 ? ('sigmoid' as const) : ('softmax' as const)),
          expertBias: routing.method === 'noaux_tc',
          numGroups: routing.groups,
          groupTopk: routing.groupTopk,
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
