// Pieces shared by the built-in specs: HF rope_scaling parsing and the decoder-layer rule blocks
// (Megatron-Core names with the Transformer Engine layer spec, see reference/pai-megatron-patch.md).
import { z } from 'zod';
import { ConvertError } from '../errors.js';
import type { RopeScaling, TransformerConfig } from '../transformer-config.js';
import type { WeightOp, WeightRule } from './types.js';

/** HF `rope_scaling` as written by transformers (older files say `type`, newer `rope_type`). */
export const HfRopeScaling = z
  .object({
    rope_type: z.string().optional(),
    type: z.string().optional(),
    factor: z.number().optional(),
    low_freq_factor: z.number().optional(),
    high_freq_factor: z.number().optional(),
    original_max_position_embeddings: z.number().int().optional(),
    beta_fast: z.number().optional(),
    beta_slow: z.number().optional(),
    mscale: z.number().optional(),
    mscale_all_dim: z.number().optional(),
  })
  .nullish();

function need(v: number | undefined, field: string): number {
  if (v === undefined) throw new ConvertError('INVALID_CONFIG', `field "rope_scaling.${field}" is required`);
  return v;
}

/** Converts HF `rope_scaling` to RopeScaling; an unimplemented rope type is an INVALID_CONFIG error. */
export function ropeScalingFromHf(rs: z.infer<typeof HfRopeScaling>): RopeScaling {
  if (!rs) return { type: 'none' };
  const kind = rs.rope_type ?? rs.type ?? 'default';
  switch (kind) {
    case 'default':
      return { type: 'none' };
    case 'linear':
      return { type: 'linear', factor: need(rs.factor, 'factor') };
    case 'llama3':
      return {
        type: 'llama3',
        factor: need(rs.factor, 'factor'),
        lowFreqFactor: need(rs.low_freq_factor, 'low_freq_factor'),
        highFreqFactor: need(rs.high_freq_factor, 'high_freq_factor'),
        originalMaxPositionEmbeddings: need(
          rs.original_max_position_embeddings,
          'original_max_position_embeddings',
        ),
      };
    case 'yarn':
      // Defaults are those transformers applies when a yarn config omits them.
      return {
        type: 'yarn',
        factor: need(rs.factor, 'factor'),
        originalMaxPositionEmbeddings: need(
          rs.original_max_position_embeddings,
          'original_max_position_embeddings',
        ),
        betaFast: rs.beta_fast ?? 32,
        betaSlow: rs.beta_slow ?? 1,
        mscale: rs.mscale ?? 1,
        mscaleAllDim: rs.mscale_all_dim ?? 0,
      };
    default:
      throw new ConvertError(
        'INVALID_CONFIG',
        `field "rope_scaling.rope_type": "${kind}" is not supported (supported: default, linear, llama3, yarn)`,
      );
  }
}

const LP = 'model.layers.{layer}.';
const MP = 'decoder.layers.{layer}.';

/** A rule inside a decoder layer, given by the name suffixes after the layer prefixes. */
export function layerRule(
  hf: string,
  megatron: string,
  op: WeightOp,
  layerKind?: 'dense' | 'moe',
): WeightRule {
  return layerKind
    ? { hf: LP + hf, megatron: MP + megatron, op, layerKind }
    : { hf: LP + hf, megatron: MP + megatron, op };
}

/** Embedding, final norm and output layer. */
export const outerRules: WeightRule[] = [
  {
    hf: 'model.embed_tokens.weight',
    megatron: 'embedding.word_embeddings.weight',
    op: { type: 'split', dim: 0 },
  },
  { hf: 'model.norm.weight', megatron: 'decoder.final_layernorm.weight', op: { type: 'replicate' } },
  { hf: 'lm_head.weight', megatron: 'output_layer.weight', op: { type: 'split', dim: 0 } },
];

/** GQA attention with the input norm fused into TE's linear_qkv (Llama, Mistral, Qwen2/3). */
export const gqaAttentionRules: WeightRule[] = [
  layerRule('input_layernorm.weight', 'self_attention.linear_qkv.layer_norm_weight', { type: 'replicate' }),
  ...(['q', 'k', 'v'] as const).flatMap((part) => [
    layerRule(`self_attn.${part}_proj.weight`, 'self_attention.linear_qkv.weight', { type: 'qkv', part }),
    layerRule(`self_attn.${part}_proj.bias`, 'self_attention.linear_qkv.bias', { type: 'qkv', part }),
  ]),
  layerRule('self_attn.q_norm.weight', 'self_attention.q_layernorm.weight', { type: 'replicate' }),
  layerRule('self_attn.k_norm.weight', 'self_attention.k_layernorm.weight', { type: 'replicate' }),
  layerRule('self_attn.o_proj.weight', 'self_attention.linear_proj.weight', { type: 'split', dim: 1 }),
];

/** The post-attention norm: fused into linear_fc1 for dense MLPs, separate before a MoE block. */
export const preMlpNormRules: WeightRule[] = [
  layerRule(
    'post_attention_layernorm.weight',
    'mlp.linear_fc1.layer_norm_weight',
    { type: 'replicate' },
    'dense',
  ),
  layerRule('post_attention_layernorm.weight', 'pre_mlp_layernorm.weight', { type: 'replicate' }, 'moe'),
];

/** A SwiGLU MLP at `hfPrefix` with HF names gate/up/down → Megatron linear_fc1/linear_fc2 at `mPrefix`. */
export function swigluRules(
  hfPrefix: string,
  mPrefix: string,
  names: { gate: string; up: string; down: string },
  expert: boolean,
  layerKind?: 'dense' | 'moe',
): WeightRule[] {
  const wrap = (inner: { type: 'split'; dim: 0 | 1 } | { type: 'gate_up'; part: 'gate' | 'up' }): WeightOp =>
    expert ? { type: 'expert', inner } : inner;
  return [
    layerRule(
      `${hfPrefix}${names.gate}.weight`,
      `${mPrefix}linear_fc1.weight`,
      wrap({ type: 'gate_up', part: 'gate' }),
      layerKind,
    ),
    layerRule(
      `${hfPrefix}${names.up}.weight`,
      `${mPrefix}linear_fc1.weight`,
      wrap({ type: 'gate_up', part: 'up' }),
      layerKind,
    ),
    layerRule(
      `${hfPrefix}${names.down}.weight`,
      `${mPrefix}linear_fc2.weight`,
      wrap({ type: 'split', dim: 1 }),
      layerKind,
    ),
  ];
}

/** HF gate/up/down names used by Llama-style MLPs. */
export const PROJ = { gate: 'gate_proj', up: 'up_proj', down: 'down_proj' } as const;

/** The dense MLP of Llama-style layers (`mlp.gate_proj` …). */
export const denseMlpRules: WeightRule[] = swigluRules('mlp.', 'mlp.', PROJ, false, 'dense');

/** HF names of the GQA attention block of layer `i` (Llama, Mistral, Qwen2/3). */
export function gqaAttentionNames(cfg: TransformerConfig, i: number): string[] {
  const p = `model.layers.${i}.`;
  const out = [
    `${p}input_layernorm.weight`,
    `${p}post_attention_layernorm.weight`,
    `${p}self_attn.o_proj.weight`,
  ];
  for (const x of ['q', 'k', 'v']) {
    out.push(`${p}self_attn.${x}_proj.weight`);
    if (cfg.addQkvBias) out.push(`${p}self_attn.${x}_proj.bias`);
  }
  if (cfg.qkLayernorm) out.push(`${p}self_attn.q_norm.weight`, `${p}self_attn.k_norm.weight`);
  return out;
}

/** HF names of a SwiGLU MLP under `prefix`. */
export function swigluNames(
  prefix: string,
  names: { gate: string; up: string; down: string } = PROJ,
): string[] {
  return [`${prefix}${names.gate}.weight`, `${prefix}${names.up}.weight`, `${prefix}${names.down}.weight`];
}

/** HF names outside the layers: embedding, final norm and (untied) lm_head. */
export function outerNames(cfg: TransformerConfig): string[] {
  const out = ['model.embed_tokens.weight', 'model.norm.weight'];
  if (cfg.untieEmbeddingsAndOutputWeights) out.push('lm_head.weight');
  return out;
}

/** Layer kind of layer i (dense when the model has no MoE). */
export function kindOf(cfg: TransformerConfig, i: number): 'dense' | 'moe' {
  return cfg.moe ? (cfg.moe.layerPattern[i] ?? 'dense') : 'dense';
}
