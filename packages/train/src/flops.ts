// Model FLOPs of a training step, counted exactly as Megatron-LM counts them
// (megatron/training/training.py `num_floating_point_operations`, transformer path), so the
// TFLOP/s/GPU megapatch prints can be compared with a Megatron log line for line.
//
// Megatron counts only the GEMMs: every GEMM is run 3 times (forward, weight gradient, data
// gradient) and an m×n by n×k GEMM is 2mnk operations, hence the factor 6 on every term.
// Activations, softmax, biases, RoPE, the router and norms (but for the few norm terms Megatron adds
// to MLA and MTP) are not counted; neither is recomputation.
// Attention scores are counted for full causal attention even with a sliding window, as Megatron does.
import { paddedVocabSize, type TransformerConfig } from '@megapatch/convert';
import { TrainError } from './errors.js';

/** The step whose FLOPs are counted. */
export interface FlopsOptions {
  /** Tokens per sequence (Megatron --seq-length). */
  seqLength: number;
  /** Sequences in the step: Megatron's global batch size. */
  batchSize: number;
  /** Tensor-parallel size; Megatron pads the vocabulary to a multiple of divisibleBy × tp. Default 1. */
  tp?: number;
  /**
   * Real (unpadded) tokens in the step, Megatron's `total_real_tokens_in_batch` for packed (THD)
   * batches. Default batchSize × seqLength.
   */
  totalTokens?: number;
  /**
   * Σ Lᵢ² over the real sequences of the step, Megatron's `seqlen_squared_sum_in_batch` for packed
   * (THD) batches. Default batchSize × seqLength².
   */
  seqlenSquaredSum?: number;
}

/** FLOPs of one step (forward + backward) by Megatron term; `total` is Megatron's number. */
export interface FlopsBreakdown {
  /** MLP: dense layers, routed experts (top-k) and shared experts, MTP layers included. */
  mlp: number;
  /** Self attention, token-linear part (`self_attn_term`): QKV (or MLA) and output projections. */
  attentionProjections: number;
  /** Self attention, core part (`self_attn_core_term`): QKᵀ and softmax(QKᵀ)V over Σ Lᵢ². */
  attentionScores: number;
  /** MTP norms and eh projection (the MTP layers' transformer layers are in mlp and attention). */
  mtp: number;
  /** Output layer: the final logits and one per MTP layer. */
  logits: number;
  /** Megatron's `num_floating_point_operations(args, batch_size)`. */
  total: number;
}

/** forward_backward_expansion_factor (3: fprop, wgrad, dgrad) × fma_expansion_factor (2). */
const FWD_BWD_FMA = 3 * 2;
/** ffn_expansion_factor with SwiGLU (h → 2·ffn and ffn → h GEMMs); every megapatch MLP is gated. */
const SWIGLU_FFN_EXPANSION = 3;

/** FLOPs of one training step (forward + backward) by Megatron term. */
export function floatingPointOperationsBreakdown(
  config: TransformerConfig,
  opts: FlopsOptions,
): FlopsBreakdown {
  const { seqLength, batchSize } = opts;
  const tp = opts.tp ?? 1;
  positiveInt('seqLength', seqLength);
  positiveInt('batchSize', batchSize);
  positiveInt('tp', tp);
  const tokens = opts.totalTokens ?? batchSize * seqLength;
  const seqlenSquaredSum = opts.seqlenSquaredSum ?? batchSize * seqLength * seqLength;
  nonNegative('totalTokens', tokens);
  nonNegative('seqlenSquaredSum', seqlenSquaredSum);

  const h = config.hiddenSize;
  const moe = config.moe;
  // Megatron's moe_layer_pattern; the MTP layers repeat the kind of the last decoder layer.
  let moeLayers = moe ? moe.layerPattern.filter((k) => k === 'moe').length : 0;
  let denseLayers = config.numLayers - moeLayers;
  const mtpLayers = config.mtpNumLayers;
  if (moe?.layerPattern[config.numLayers - 1] === 'moe') moeLayers += mtpLayers;
  else denseLayers += mtpLayers;
  const layers = config.numLayers + mtpLayers;
  const routedTo = moe?.routerTopk ?? 0;
  const moeFfn = moe?.moeFfnHiddenSize ?? 0;
  const sharedFfn = moe?.sharedExpertIntermediateSize ?? 0;

  // Per token (or per Σ Lᵢ² for the core attention), summed over all layers.
  const mlp =
    FWD_BWD_FMA *
    h *
    (config.ffnHiddenSize * SWIGLU_FFN_EXPANSION * denseLayers +
      moeFfn * routedTo * SWIGLU_FFN_EXPANSION * moeLayers +
      sharedFfn * SWIGLU_FFN_EXPANSION * moeLayers);
  const attention = attentionTerms(config);
  const projections = attention.projections * layers;
  const scores = attention.scores * layers;
  // "MTP norms and proj": enorm, hnorm and final norm (3h), eh_proj (2h → h).
  const mtp = FWD_BWD_FMA * mtpLayers * (3 * h + 2 * h * h);
  const vocab = paddedVocabSize(config.vocabSize, config.makeVocabSizeDivisibleBy, tp);
  const logits = FWD_BWD_FMA * h * vocab * (mtpLayers + 1);

  return {
    mlp: tokens * mlp,
    attentionProjections: tokens * projections,
    attentionScores: seqlenSquaredSum * scores,
    mtp: tokens * mtp,
    logits: tokens * logits,
    total: tokens * (mlp + projections + mtp + logits) + seqlenSquaredSum * scores,
  };
}

/**
 * FLOPs of one training step of `batchSize` sequences (forward + backward), Megatron's
 * `num_floating_point_operations`: the numerator of its TFLOP/s/GPU.
 */
export function numFloatingPointOperations(config: TransformerConfig, opts: FlopsOptions): number {
  return floatingPointOperationsBreakdown(config, opts).total;
}

/** TFLOP/s per GPU as Megatron prints it: flops / (seconds × 10¹² × worldSize). */
export function tflopsPerSecond(flops: number, seconds: number, worldSize: number): number {
  if (!(seconds > 0) || !Number.isFinite(seconds)) {
    throw new TrainError('INVALID_ARGUMENT', `seconds must be a positive number, got ${seconds}`);
  }
  positiveInt('worldSize', worldSize);
  return flops / (seconds * 10 ** 12 * worldSize);
}

/**
 * One attention layer's FLOPs: `projections` per token (Megatron's `standard_self_attn_term`) and
 * `scores` per unit of Σ Lᵢ² (`standard_self_attn_core_term`).
 */
function attentionTerms(config: TransformerConfig): { projections: number; scores: number } {
  const h = config.hiddenSize;
  const heads = config.numAttentionHeads;
  const mla = config.mla;
  if (mla) {
    // Megatron's qk_head_dim is the no-RoPE part (qkNopeHeadDim), qk_pos_emb_head_dim the RoPE part.
    const qHead = mla.qkNopeHeadDim + mla.qkRopeHeadDim;
    // q: one projection, or the LoRA down/up pair with its norm (the +1).
    const q = mla.qLoraRank === null ? h * heads * qHead : mla.qLoraRank * (h + heads * qHead + 1);
    // kv: LoRA down/up pair with its norm, and the shared RoPE key projection h → qkRopeHeadDim.
    const kv = mla.kvLoraRank * (h + heads * (mla.qkNopeHeadDim + mla.vHeadDim) + 1) + h * mla.qkRopeHeadDim;
    const out = heads * mla.vHeadDim * h;
    // QKᵀ over the q/k head dim and PV over the v head dim, each halved by the causal mask.
    const scores = FWD_BWD_FMA * ((heads * qHead) / 2 + (heads * mla.vHeadDim) / 2);
    return { projections: FWD_BWD_FMA * (q + kv + out), scores };
  }
  const query = config.kvChannels * heads;
  const keyValue = config.kvChannels * config.numQueryGroups;
  return {
    // linear_qkv (h → q + k + v) and linear_proj (q → h).
    projections: FWD_BWD_FMA * (h * (query + 2 * keyValue) + query * h),
    // QKᵀ and (QKᵀ)V: ×2 GEMMs, /2 for the causal mask (only half the scores are computed).
    scores: ((FWD_BWD_FMA * query) / 2) * 2,
  };
}

function positiveInt(name: string, v: number): void {
  if (!Number.isSafeInteger(v) || v <= 0) {
    throw new TrainError('INVALID_ARGUMENT', `${name} must be a positive integer, got ${v}`);
  }
}

function nonNegative(name: string, v: number): void {
  if (!Number.isFinite(v) || v < 0) {
    throw new TrainError('INVALID_ARGUMENT', `${name} must be a non-negative number, got ${v}`);
  }
}
