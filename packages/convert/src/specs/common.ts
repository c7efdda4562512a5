// Pieces shared by the built-in specs: HF rope_scaling parsing and the decoder-layer rule blocks
// (Megatron-Core names with the Transformer Engine layer spec, see reference/pai-megatron-patch.md).
import { z } from 'zod';
import { ConvertError } from '../errors.js';
import {
  CONFIG_LIMITS,
  limitedInt,
  type RopeScaling,
  type TransformerConfig,
} from '../transformer-config.js';
import type { HfTensorShape, WeightOp, WeightRule } from './types.js';

/** HF `rope_scaling` as written by transformers (older files say `type`, newer `rope_type`). */
export const HfRopeScaling = z
  .object({
    rope_type: z.string().optional(),
    type: z.string().optional(),
    factor: z.number().optional(),
    low_freq_factor: z.number().optional(),
    high_freq_factor: z.number().optional(),
    original_max_position_embeddings: limitedInt(CONFIG_LIMITS.positions).optional(),
    beta_fast: z.number().optional(),
    beta_slow: z.number().optional(),
    mscale: z.number().optional(),
    mscale_all_dim: z.number().optional(),
  })
  .nullish();

/**
 * HF `hidden_act`. Every built-in spec implements the SwiGLU MLP, whose gate is SiLU ("swish" is
 * transformers' other name for the same function); anything else would convert into a model that
 * computes something else.
 */
export const HfHiddenAct = z
  .string()
  .optional()
  .refine((v) => v === undefined || v === 'silu' || v === 'swish', {
    error: (iss) =>
      `${JSON.stringify(iss.input)} is not supported: megapatch implements SwiGLU MLPs (hidden_act "silu") only`,
  });

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
    op: { type: 'vocab' },
  },
  { hf: 'model.norm.weight', megatron: 'decoder.final_layernorm.weight', op: { type: 'replicate' } },
  { hf: 'lm_head.weight', megatron: 'output_layer.weight', op: { type: 'vocab' } },
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

/** An HfTensorShape from a name and its dimensions. */
export function hfTensor(name: string, ...shape: number[]): HfTensorShape {
  return { name, shape };
}

/** HF tensors of the GQA attention block and both norms of layer `i` (Llama, Mistral, Qwen2/3). */
export function gqaAttentionTensors(cfg: TransformerConfig, i: number): HfTensorShape[] {
  const p = `model.layers.${i}.`;
  const h = cfg.hiddenSize;
  const d = cfg.kvChannels;
  const qOut = cfg.numAttentionHeads * d;
  const kvOut = cfg.numQueryGroups * d;
  const out = [
    hfTensor(`${p}input_layernorm.weight`, h),
    hfTensor(`${p}post_attention_layernorm.weight`, h),
    hfTensor(`${p}self_attn.o_proj.weight`, h, qOut),
  ];
  for (const [x, rows] of [
    ['q', qOut],
    ['k', kvOut],
    ['v', kvOut],
  ] as const) {
    out.push(hfTensor(`${p}self_attn.${x}_proj.weight`, rows, h));
    if (cfg.addQkvBias) out.push(hfTensor(`${p}self_attn.${x}_proj.bias`, rows));
  }
  // Qwen3 normalises each head: the norm weight has one head's width.
  if (cfg.qkLayernorm)
    out.push(hfTensor(`${p}self_attn.q_norm.weight`, d), hfTensor(`${p}self_attn.k_norm.weight`, d));
  return out;
}

/** HF tensors of a SwiGLU MLP under `prefix`: gate/up [ffn, hidden], down [hidden, ffn]. */
export function swigluTensors(
  prefix: string,
  ffn: number,
  hidden: number,
  names: { gate: string; up: string; down: string } = PROJ,
): HfTensorShape[] {
  return [
    hfTensor(`${prefix}${names.gate}.weight`, ffn, hidden),
    hfTensor(`${prefix}${names.up}.weight`, ffn, hidden),
    hfTensor(`${prefix}${names.down}.weight`, hidden, ffn),
  ];
}

/** HF tensors outside the layers: embedding, final norm and (untied) lm_head. */
export function outerTensors(cfg: TransformerConfig): HfTensorShape[] {
  const h = cfg.hiddenSize;
  const out = [hfTensor('model.embed_tokens.weight', cfg.vocabSize, h), hfTensor('model.norm.weight', h)];
  if (cfg.untieEmbeddingsAndOutputWeights) out.push(hfTensor('lm_head.weight', cfg.vocabSize, h));
  return out;
}

/** Layer kind of layer i (dense when the model has no MoE). */
export function kindOf(cfg: TransformerConfig, i: number): 'dense' | 'moe' {
  return cfg.moe ? (cfg.moe.layerPattern[i] ?? 'dense') : 'dense';
}
