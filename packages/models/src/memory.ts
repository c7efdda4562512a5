// Megatron's theoretical memory estimate (megatron/training/theoretical_memory_usage.py) from the
// shapes of a TransformerConfig alone: nothing is allocated, so the 671B DeepSeek-V3 config can be
// measured anywhere. For every pipeline stage it gives one rank's parameters, its weight, gradient
// and optimizer bytes (Megatron's 18 bytes per parameter, 6 + 12/dp with the distributed optimizer)
// and its activation bytes (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
// Transformer Models", Table 2, as Megatron's compute_activation_memory implements it).
//
// Megatron's estimator counts one "most loaded" shard (a first stage that also holds the MTP block)
// and the activations of the first stage only, with a dense GeLU MLP and full-width attention. Here
// every stage is counted with what Megatron-Core actually builds on it, and the extensions are
// written next to the code they concern: GQA and head dims other than hidden/heads, MLA, SwiGLU,
// MoE layers (routed tokens, router, shared experts), context parallelism, uneven first/last stages,
// the last stage's output layer and MTP layers, full recomputation, and dtypes other than bf16.
import { type LayerKind, paddedVocabSize, type TransformerConfig } from '@megapatch/convert';
import { z } from 'zod';
import { ModelError } from './errors.js';

/** Dtypes of weights and gradients in training. */
export const TrainingDtype = z.enum(['bf16', 'fp16', 'fp32']);
/** A dtype of weights or gradients in training. */
export type TrainingDtype = z.infer<typeof TrainingDtype>;

const DTYPE_BYTES: Record<TrainingDtype, number> = { bf16: 2, fp16: 2, fp32: 4 };

/** Parallel sizes above this are typos, not clusters. */
const MAX_PARALLEL = 1 << 16;
const parallelSize = z.number().int().positive().max(MAX_PARALLEL);
const layerCount = z.number().int().nonnegative().max(100_000);

/** How the model is trained: parallel layout, batch shape, recomputation, dtypes, optimizer. */
export const MemoryLayout = z.strictObject({
  /** Tensor-parallel size. */
  tp: parallelSize.default(1),
  /** Pipeline-parallel size. */
  pp: parallelSize.default(1),
  /** Expert-parallel size. */
  ep: parallelSize.default(1),
  /** Expert tensor-parallel size; default: tp (as Megatron). */
  etp: parallelSize.optional(),
  /** Data-parallel size (of the dense part; the experts' is derived). */
  dp: parallelSize.default(1),
  /** Context-parallel size. */
  cp: parallelSize.default(1),
  /** Virtual pipeline stages per pipeline rank (interleaved 1F1B); unset: plain 1F1B. */
  vpp: parallelSize.optional(),
  /** Decoder layers of the first / last stage (Megatron's --decoder-first/last-pipeline-num-layers). */
  firstStageLayers: layerCount.optional(),
  lastStageLayers: layerCount.optional(),
  /** Tokens per sequence. */
  seqLength: z
    .number()
    .int()
    .positive()
    .max(2 ** 31 - 1),
  /** Sequences per micro-batch. */
  microBatchSize: z
    .number()
    .int()
    .positive()
    .max(1 << 20)
    .default(1),
  /** Micro-batches per step on one data-parallel rank; fewer than pp leaves stages idle (and lighter). */
  numMicroBatches: z.number().int().positive().optional(),
  /** ZeRO-1: optimizer states sharded over the data-parallel ranks. */
  distributedOptimizer: z.boolean().default(false),
  /**
   * Megatron --optimizer-cpu-offload with --optimizer-offload-fraction: the share of each rank's
   * optimizer states held in host memory instead (0: none; 1: all).
   */
  optimizerOffloadFraction: z.number().min(0).max(1).default(0),
  /** Sequence parallelism (with tp > 1). */
  sequenceParallel: z.boolean().default(false),
  /**
   * Megatron's --recompute-granularity: none, selective (core attention) or full (whole layers).
   * none and selective give the same estimate: attention scores are not counted (fused attention).
   */
  recompute: z.enum(['none', 'selective', 'full']).default('none'),
  /** Dtype of the model weights. */
  paramDtype: TrainingDtype.default('bf16'),
  /** Dtype of the gradient buffer; default fp32 (Megatron's), fp16 for fp16 weights. */
  gradDtype: TrainingDtype.optional(),
});
/** What theoreticalMemory accepts (defaults not yet applied). */
export type MemoryLayoutInput = z.input<typeof MemoryLayout>;

/** A checked layout with every default and derived size filled in. */
export interface ResolvedMemoryLayout extends Omit<z.output<typeof MemoryLayout>, 'etp' | 'gradDtype'> {
  etp: number;
  gradDtype: TrainingDtype;
  /** tp × cp × dp × pp. */
  worldSize: number;
  /** Data-parallel size of the expert parameters: tp × cp × dp / (ep × etp). */
  expertDp: number;
  /** Decoder layers of each pipeline stage. */
  stageLayers: number[];
  /** The vocabulary padded to a multiple of makeVocabSizeDivisibleBy × tp. */
  paddedVocabSize: number;
}

/** Parameters one rank holds, by part of the model and by how they are split. */
export interface ParameterBreakdown {
  /** Word embeddings (padded vocabulary); the last stage holds a copy when MTP needs it and pp > 1. */
  embedding: number;
  /** Output layer: its own when untied, or the tied copy Megatron keeps on the last stage when pp > 1. */
  outputLayer: number;
  /** Attention: projections, biases, q/k norms, MLA down projections and latent norms. */
  attention: number;
  /** MLPs of dense layers. */
  denseMlp: number;
  /** Routed experts: numExperts / ep of them, each split over etp. */
  experts: number;
  /** Shared experts and their gates. */
  sharedExperts: number;
  /** Router weights (the expert bias is a buffer and is not counted). */
  router: number;
  /** Input and pre-MLP norms, the final norm, the MTP norms. */
  norms: number;
  /** MTP eh_proj; the MTP decoder layers count in the parts above. */
  mtp: number;
  /** Split over the tensor-parallel ranks. */
  tensorParallel: number;
  /** The same on every tensor-parallel rank (norms, router, MLA down projections). */
  replicated: number;
  /** Split over ep × etp (routed experts). */
  expertParallel: number;
  total: number;
}

/** One pipeline stage: what each of its ranks holds. */
export interface StageMemory {
  stage: number;
  decoderLayers: number;
  mtpLayers: number;
  /** Parameters per rank. */
  parameters: ParameterBreakdown;
  /** Micro-batches whose activations the stage holds at its peak (fractional with vpp). */
  inFlightMicroBatches: number;
  /** Bytes per rank. */
  bytes: {
    weights: number;
    gradients: number;
    /**
     * Master weights and Adam moments (and an fp32 gradient copy when gradients are not fp32) on
     * the device: what optimizer offloading leaves there.
     */
    optimizer: number;
    /** The optimizer states offloaded to host memory (not in total). */
    optimizerHost: number;
    /** One micro-batch through this stage. */
    activationsPerMicroBatch: number;
    /** At the peak of the pipeline schedule. */
    activations: number;
    total: number;
  };
}

/** Megatron's theoretical memory of a model trained with a layout. */
export interface TheoreticalMemory {
  layout: ResolvedMemoryLayout;
  /** Parameters of the model as Megatron-Core builds it: padded vocabulary, MTP layers, no copies. */
  totalParameters: number;
  /** Bytes per parameter of weights, gradients and optimizer states, before any sharding. */
  bytesPerParameter: { weights: number; gradients: number; optimizer: number };
  stages: StageMemory[];
  /** The stage whose ranks need the most memory. */
  peakStage: number;
  /** Bytes on the ranks of the peak stage. */
  total: number;
}

/** Bytes per parameter with mixed precision and Adam: Megatron's table (docs/.../dist_optimizer.md). */
export function bytesPerParameter(paramDtype: TrainingDtype, gradDtype: TrainingDtype) {
  // The optimizer keeps fp32 master weights unless the weights are fp32 already, an fp32 copy of the
  // gradients unless they are fp32 already, and Adam's two fp32 moments: 18 bytes for bf16 weights
  // with fp32 gradients, 20 for fp16/fp16, 16 for fp32/fp32.
  const optimizer = 8 + (paramDtype === 'fp32' ? 0 : 4) + (gradDtype === 'fp32' ? 0 : 4);
  return { weights: DTYPE_BYTES[paramDtype], gradients: DTYPE_BYTES[gradDtype], optimizer };
}

const normSize = (cfg: TransformerConfig, dim: number) => (cfg.normalization === 'LayerNorm' ? 2 * dim : dim);
const kindsOf = (cfg: TransformerConfig): LayerKind[] =>
  Array.from({ length: cfg.numLayers }, (_, i) => cfg.moe?.layerPattern[i] ?? 'dense');

/** Validates `input` against the model; all its problems go into one ModelError('INVALID_ARGUMENT'). */
export function resolveMemoryLayout(cfg: TransformerConfig, input: MemoryLayoutInput): ResolvedMemoryLayout {
  const parsed = MemoryLayout.safeParse(input);
  if (!parsed.success) {
    throw new ModelError(
      'INVALID_ARGUMENT',
      parsed.error.issues.map((i) => `layout.${i.path.join('.') || '(root)'}: ${i.message}`).join('; '),
    );
  }
  const o = parsed.data;
  const etp = o.etp ?? o.tp;
  const problems: string[] = [];
  const kinds = kindsOf(cfg);
  const heads = cfg.numAttentionHeads;
  if (heads % o.tp !== 0) problems.push(`tp=${o.tp} does not divide ${heads} attention heads`);
  if (!cfg.mla && cfg.numQueryGroups % o.tp !== 0)
    problems.push(`tp=${o.tp} does not divide ${cfg.numQueryGroups} query groups`);
  if (kinds.includes('dense') && cfg.ffnHiddenSize % o.tp !== 0)
    problems.push(`tp=${o.tp} does not divide ffnHiddenSize ${cfg.ffnHiddenSize}`);
  const moe = cfg.moe;
  if (moe && kinds.includes('moe')) {
    if (moe.numExperts % o.ep !== 0) problems.push(`ep=${o.ep} does not divide ${moe.numExperts} experts`);
    if (moe.moeFfnHiddenSize % etp !== 0)
      problems.push(`etp=${etp} does not divide moeFfnHiddenSize ${moe.moeFfnHiddenSize}`);
    const shared = moe.sharedExpertIntermediateSize;
    if (shared > 0 && shared % o.tp !== 0)
      problems.push(`tp=${o.tp} does not divide sharedExpertIntermediateSize ${shared}`);
    // megatron/core/transformer/moe/moe_layer.py raises in training without it.
    if (o.tp > 1 && !o.sequenceParallel)
      problems.push(
        `MoE layers with tp=${o.tp} need sequence parallelism (Megatron refuses them without it): turn it on (--sequence-parallel)`,
      );
  } else if (o.ep > 1 || etp !== o.tp) {
    problems.push(`ep=${o.ep}, etp=${etp} need experts, and this model has none: leave ep and etp unset`);
  }
  // Megatron: expert_data_parallel_size = world_size // (etp × ep × pp); it must be a whole number.
  const stageRanks = o.tp * o.cp * o.dp;
  if (stageRanks % (o.ep * etp) !== 0) {
    problems.push(
      `ep × etp = ${o.ep * etp} does not divide tp × cp × dp = ${stageRanks}, the ranks of one pipeline stage, so the experts cannot be laid out: raise dp or lower ep or etp`,
    );
  }
  if (o.cp > 1 && o.seqLength % (2 * o.cp) !== 0) {
    problems.push(
      `seqLength ${o.seqLength} is not a multiple of 2 × cp = ${2 * o.cp} (context parallelism gives each rank two chunks of every sequence)`,
    );
  } else if (o.sequenceParallel && (o.seqLength / o.cp) % o.tp !== 0) {
    problems.push(
      `seqLength / cp = ${o.seqLength / o.cp} is not a multiple of tp=${o.tp} (sequence parallelism splits each sequence over the tensor-parallel ranks)`,
    );
  }
  const stageLayers = splitLayers(cfg.numLayers, o.pp, o.firstStageLayers, o.lastStageLayers, problems);
  if (o.vpp !== undefined) {
    if (o.pp === 1)
      problems.push(`vpp=${o.vpp} needs pp > 1 (the interleaved schedule splits pipeline stages)`);
    const bad = stageLayers.findIndex((n) => n % (o.vpp as number) !== 0);
    if (o.pp > 1 && bad >= 0)
      problems.push(
        `the ${stageLayers[bad]} layers of stage ${bad} do not split into vpp=${o.vpp} virtual stages`,
      );
  }
  if (problems.length > 0) throw new ModelError('INVALID_ARGUMENT', problems.join('; '));
  return {
    ...o,
    etp,
    gradDtype: o.gradDtype ?? (o.paramDtype === 'fp16' ? 'fp16' : 'fp32'),
    worldSize: stageRanks * o.pp,
    expertDp: stageRanks / (o.ep * etp),
    stageLayers,
    paddedVocabSize: paddedVocabSize(cfg.vocabSize, cfg.makeVocabSizeDivisibleBy, o.tp),
  };
}

/**
 * Decoder layers per stage: an even split, or the first and/or last stage's counts given and the
 * rest split evenly over the other stages (Megatron's --decoder-first/last-pipeline-num-layers).
 */
function splitLayers(
  layers: number,
  pp: number,
  first: number | undefined,
  last: number | undefined,
  problems: string[],
): number[] {
  if (pp === 1) {
    if (first !== undefined || last !== undefined) problems.push('first/last stage layer counts need pp > 1');
    return [layers];
  }
  const rest = layers - (first ?? 0) - (last ?? 0);
  const middle = pp - (first === undefined ? 0 : 1) - (last === undefined ? 0 : 1);
  if (rest < 0) {
    problems.push(`the first and last stages' ${layers - rest} layers are more than the model's ${layers}`);
    return [];
  }
  if (middle === 0 ? rest !== 0 : rest % middle !== 0) {
    problems.push(
      first === undefined && last === undefined
        ? `pp=${pp} does not divide ${layers} layers: give the first and/or last stage's layer counts (--decoder-first-pipeline-num-layers, --decoder-last-pipeline-num-layers) so that the other stages get equal shares`
        : `the ${rest} layers left after the first and last stages' do not split evenly over the other ${middle} stages`,
    );
    return [];
  }
  const even = middle === 0 ? 0 : rest / middle;
  return Array.from({ length: pp }, (_, s) =>
    s === 0 && first !== undefined ? first : s === pp - 1 && last !== undefined ? last : even,
  );
}

type Part =
  | 'embedding'
  | 'outputLayer'
  | 'attention'
  | 'denseMlp'
  | 'experts'
  | 'sharedExperts'
  | 'router'
  | 'norms'
  | 'mtp';
/** How a tensor is held: split over tp, the same on every tp rank, or split over ep × etp. */
type Held = 'tp' | 'replicated' | 'expert';
type Add = (part: Part, count: number, held: Held) => void;

/** Adds one decoder layer's parameters, as Megatron-Core's TE layer spec builds them. */
function addLayer(add: Add, cfg: TransformerConfig, kind: LayerKind): void {
  const h = cfg.hiddenSize;
  const heads = cfg.numAttentionHeads;
  const m = cfg.mla;
  if (m) {
    // MLA's down projections are TE linears with parallel_mode='duplicated': every tp rank holds
    // them whole (Megatron's estimator counts them as split; megapatch follows the model).
    const qHead = m.qkNopeHeadDim + m.qkRopeHeadDim;
    if (m.qLoraRank === null) add('attention', h * heads * qHead, 'tp');
    else {
      add('attention', h * m.qLoraRank + normSize(cfg, m.qLoraRank), 'replicated');
      add('attention', m.qLoraRank * heads * qHead, 'tp');
    }
    add('attention', h * (m.kvLoraRank + m.qkRopeHeadDim) + normSize(cfg, m.kvLoraRank), 'replicated');
    add('attention', m.kvLoraRank * heads * (m.qkNopeHeadDim + m.vHeadDim), 'tp');
    add('attention', heads * m.vHeadDim * h, 'tp');
  } else {
    const qkv = (heads + 2 * cfg.numQueryGroups) * cfg.kvChannels;
    add('attention', h * qkv + (cfg.addQkvBias ? qkv : 0) + heads * cfg.kvChannels * h, 'tp');
    if (cfg.qkLayernorm) add('attention', 2 * normSize(cfg, cfg.kvChannels), 'replicated');
  }
  add('norms', 2 * normSize(cfg, h), 'replicated');
  const moe = cfg.moe;
  if (kind === 'moe' && moe) {
    // the expert bias is a buffer (no gradient, no optimizer state), as in Megatron-Core
    add('router', h * moe.numExperts, 'replicated');
    add('sharedExperts', 3 * h * moe.sharedExpertIntermediateSize, 'tp');
    if (moe.sharedExpertGate) add('sharedExperts', h, 'replicated');
    add('experts', moe.numExperts * 3 * h * moe.moeFfnHiddenSize, 'expert');
  } else {
    // SwiGLU: linear_fc1 holds gate and up (2 × ffn × h), linear_fc2 down (ffn × h).
    add('denseMlp', 3 * h * cfg.ffnHiddenSize, 'tp');
  }
}

function emptyBreakdown(): ParameterBreakdown {
  return {
    embedding: 0,
    outputLayer: 0,
    attention: 0,
    denseMlp: 0,
    experts: 0,
    sharedExperts: 0,
    router: 0,
    norms: 0,
    mtp: 0,
    tensorParallel: 0,
    replicated: 0,
    expertParallel: 0,
    total: 0,
  };
}

/**
 * Parameters one rank of stage `s` holds. Megatron-Core puts the word embeddings on the first stage;
 * the final norm, the output layer and the MTP layers on the last; with pp > 1 the last stage also
 * holds the tied output weight (kept equal to the embedding by an all-reduce) and, for MTP, its own
 * copy of the embedding. `divide: false` counts the stage's tensors whole.
 */
function stageParameters(cfg: TransformerConfig, l: ResolvedMemoryLayout, s: number, divide = true) {
  const b = emptyBreakdown();
  const add: Add = (part, count, held) => {
    const n = !divide || held === 'replicated' ? count : count / (held === 'tp' ? l.tp : l.ep * l.etp);
    b[part] += n;
    b[held === 'tp' ? 'tensorParallel' : held === 'expert' ? 'expertParallel' : 'replicated'] += n;
    b.total += n;
  };
  const h = cfg.hiddenSize;
  const first = s === 0;
  const last = s === l.stageLayers.length - 1;
  const vocab = l.paddedVocabSize * h;
  const kinds = kindsOf(cfg);
  const start = l.stageLayers.slice(0, s).reduce((a, n) => a + n, 0);
  if (first) add('embedding', vocab, 'tp');
  for (const kind of kinds.slice(start, start + l.stageLayers[s])) addLayer(add, cfg, kind);
  if (last) {
    add('norms', normSize(cfg, h), 'replicated');
    if (cfg.untieEmbeddingsAndOutputWeights || !first) add('outputLayer', vocab, 'tp');
    if (cfg.mtpNumLayers > 0 && !first) add('embedding', vocab, 'tp');
    for (let i = 0; i < cfg.mtpNumLayers; i++) {
      // mtp.layers.i: enorm, hnorm, eh_proj (column parallel, 2h → h), a decoder layer of the last
      // layer's kind (Megatron's mtp_layer_is_moe) and final_layernorm.
      add('norms', 3 * normSize(cfg, h), 'replicated');
      add('mtp', 2 * h * h, 'tp');
      addLayer(add, cfg, kinds[kinds.length - 1] ?? 'dense');
    }
  }
  return b;
}

/** Tokens of one micro-batch on one context-parallel rank, before any tensor-parallel split. */
const tokensOf = (l: ResolvedMemoryLayout) => (l.seqLength * l.microBatchSize) / l.cp;

/**
 * Activation bytes one decoder layer keeps for one micro-batch on one rank, without recomputation
 * of whole layers. Like Megatron's formulas, it counts no s × s attention scores: a fused (flash)
 * attention kernel never keeps them, and selective recomputation of core attention drops them
 * otherwise; so recompute 'none' and 'selective' give the same figure.
 *
 * Megatron (Korthikanti Table 2, "TP + SP + selective"): s·b·h·(18 + 4·ffn/h) / tp, which is 10·sbh
 * outside the split GEMMs (two norm inputs 4, attention and MLP inputs 2 + 2, dropout masks 1 + 1)
 * plus 8·sbh of attention (Q, K, V 6, the context 2) and 4·s·b·ffn of GeLU MLP (its input and
 * output). Without sequence parallelism the 10·sbh are not split (Megatron's 10 + 24/tp). The
 * extensions, per token, 2 bytes per element:
 * - GQA and head dims ≠ h/heads: Q 2·heads·d, K and V 2·groups·d each, context 2·heads·d.
 * - MLA: Q and K 2·heads·(nope + rope) each, V and context 2·heads·v each; the latents (q: norm and
 *   up-projection inputs 4·qLoraRank; kv: 4·kvLoraRank + the rope key 2·rope) are computed for the
 *   whole sequence on every tp rank (duplicated down projections), so tp does not split them.
 * - SwiGLU: linear_fc1's 2·ffn-wide output (the SwiGLU input, 4·ffn) and the fc2 input (2·ffn):
 *   6·ffn instead of GeLU's 4·ffn.
 * - MoE: the router's fp32 logits (4·experts) next to the 10·h; a shared expert like a dense MLP
 *   (6·shared); each token's topk routed copies with balanced routing: per copy the fc1 input,
 *   gathered over etp (2·h·etp), and the SwiGLU tensors split over etp (6·moeFfn), on the
 *   tokens/tp a rank dispatches.
 */
export function layerActivationBytes(
  cfg: TransformerConfig,
  kind: LayerKind,
  l: ResolvedMemoryLayout,
): number {
  const h = cfg.hiddenSize;
  const heads = cfg.numAttentionHeads;
  const sp = l.sequenceParallel ? l.tp : 1;
  let outside = 10 * h;
  let split: number;
  let whole = 0;
  const m = cfg.mla;
  if (m) {
    split = 4 * heads * (m.qkNopeHeadDim + m.qkRopeHeadDim) + 4 * heads * m.vHeadDim;
    whole = 4 * (m.qLoraRank ?? 0) + 4 * m.kvLoraRank + 2 * m.qkRopeHeadDim;
  } else {
    split = 4 * heads * cfg.kvChannels + 4 * cfg.numQueryGroups * cfg.kvChannels;
  }
  const moe = cfg.moe;
  if (kind === 'moe' && moe) {
    outside += 4 * moe.numExperts;
    split += 6 * moe.sharedExpertIntermediateSize;
    split += moe.routerTopk * (2 * h * l.etp + 6 * moe.moeFfnHiddenSize);
  } else {
    split += 6 * cfg.ffnHiddenSize;
  }
  return tokensOf(l) * (outside / sp + split / l.tp + whole);
}

/**
 * Micro-batches a stage holds at its peak. 1F1B: pp − stage (Megatron's pp for the first stage),
 * fewer when there are fewer micro-batches. Interleaved: the warm-up chunks of Megatron's schedule
 * plus one, in micro-batches of the whole stage; for the first stage this is Megatron's
 * pp × (1 + (pp − 1) / (pp × vpp)).
 */
function inFlight(l: ResolvedMemoryLayout, s: number): number {
  if (l.pp === 1) return 1;
  const m = l.numMicroBatches ?? Number.POSITIVE_INFINITY;
  if (l.vpp === undefined) return Math.min(l.pp - s, m);
  const chunks = Math.min((l.pp - s - 1) * 2 + (l.vpp - 1) * l.pp + 1, m * l.vpp);
  return chunks / l.vpp;
}

/**
 * Activation bytes of stage `s` on one rank: one micro-batch, and at the schedule's peak.
 * First stage (Megatron): the embedding's input (8 bytes a token) and dropout mask (1 per element),
 * held for every micro-batch in flight like the layers. Last stage (Megatron counts it only for
 * pp = 1): the output layer's input and fp32 logits, 4·s·b·(h + vocab) / tp, for one micro-batch;
 * megapatch adds each MTP layer (its decoder layer, token ids, enorm/hnorm and eh_proj inputs, its
 * own logits). Full recomputation (megapatch's extension; Megatron's formulas have none) keeps each
 * layer's input, 2·s·b·h, plus one layer's activations while it is recomputed.
 */
function stageActivations(cfg: TransformerConfig, l: ResolvedMemoryLayout, s: number) {
  const h = cfg.hiddenSize;
  const tokens = tokensOf(l);
  const sp = l.sequenceParallel ? l.tp : 1;
  const kinds = kindsOf(cfg);
  const start = l.stageLayers.slice(0, s).reduce((a, n) => a + n, 0);
  const mine = kinds.slice(start, start + l.stageLayers[s]);
  const full = l.recompute === 'full';
  let layers = 0;
  let recomputed = 0;
  for (const kind of mine) {
    const bytes = layerActivationBytes(cfg, kind, l);
    layers += full ? (tokens * 2 * h) / sp : bytes;
    if (full) recomputed = Math.max(recomputed, bytes);
  }
  const embedding = s === 0 ? (tokens * (8 + h)) / sp : 0;
  let output = 0;
  if (s === l.stageLayers.length - 1) {
    const logits = (tokens * 4 * h) / sp + (tokens * 4 * l.paddedVocabSize) / l.tp;
    const lastKind = kinds[kinds.length - 1] ?? 'dense';
    const mtpLayer = layerActivationBytes(cfg, lastKind, l) + (tokens * (8 + 8 * h)) / sp + logits;
    output = logits + cfg.mtpNumLayers * mtpLayer;
  }
  const inFlightMicroBatches = inFlight(l, s);
  return {
    inFlightMicroBatches,
    perMicroBatch: layers + embedding + output + recomputed,
    peak: inFlightMicroBatches * (layers + embedding) + output + recomputed,
  };
}

/**
 * Megatron's theoretical memory per rank of `cfg` trained with `layout`, stage by stage: parameters,
 * weights, gradients, optimizer states (sharded over dp × cp, and the experts' over their own
 * data-parallel size, with the distributed optimizer) and activations. Throws
 * ModelError('INVALID_ARGUMENT') naming every size that does not fit the model.
 */
export function theoreticalMemory(cfg: TransformerConfig, layout: MemoryLayoutInput): TheoreticalMemory {
  const l = resolveMemoryLayout(cfg, layout);
  const per = bytesPerParameter(l.paramDtype, l.gradDtype);
  const whole: ResolvedMemoryLayout = { ...l, pp: 1, stageLayers: [cfg.numLayers] };
  const stages = l.stageLayers.map((decoderLayers, s): StageMemory => {
    const p = stageParameters(cfg, l, s);
    const dense = p.total - p.expertParallel;
    // Megatron shards the dense optimizer states over its data-parallel size; the distributed
    // optimizer's group is dp × cp in Megatron-Core (the estimator uses dp; megapatch follows the model).
    const states = l.distributedOptimizer
      ? per.optimizer * (dense / (l.dp * l.cp) + p.expertParallel / l.expertDp)
      : per.optimizer * p.total;
    const optimizerHost = states * l.optimizerOffloadFraction;
    const optimizer = states - optimizerHost;
    const a = stageActivations(cfg, l, s);
    const weights = per.weights * p.total;
    const gradients = per.gradients * p.total;
    return {
      stage: s,
      decoderLayers,
      mtpLayers: s === l.stageLayers.length - 1 ? cfg.mtpNumLayers : 0,
      parameters: p,
      inFlightMicroBatches: a.inFlightMicroBatches,
      bytes: {
        weights,
        gradients,
        optimizer,
        optimizerHost,
        activationsPerMicroBatch: a.perMicroBatch,
        activations: a.peak,
        total: weights + gradients + optimizer + a.peak,
      },
    };
  });
  const peakStage = stages.reduce(
    (best, st) => (st.bytes.total > stages[best].bytes.total ? st.stage : best),
    0,
  );
  return {
    layout: l,
    totalParameters: stageParameters(cfg, whole, 0, false).total,
    bytesPerParameter: per,
    stages,
    peakStage,
    total: stages[peakStage].bytes.total,
  };
}

/** Bytes in binary gigabytes, as GPU memory is quoted: `12.34 GiB`. */
export function formatGiB(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
}
