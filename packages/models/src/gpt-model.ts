// GPTModel: one decoder-only model for every TransformerConfig, built from the tensor-parallel
// layers of @megapatch/parallel with Megatron-Core's parameter names (`embedding.word_embeddings`,
// `decoder.layers.{i}...`, `decoder.final_layernorm`, `output_layer`, `mtp.layers.{k}...`) and
// [s, b, h] activations. The same code runs on one process or across TP / EP ranks.
import { paddedVocabSize, type TransformerConfig } from '@megapatch/convert';
import {
  ColumnParallelLinear,
  gatherFromTensorModelParallelRegion,
  getContextParallelGroup,
  getExpertModelParallelGroup,
  getExpertTensorParallelGroup,
  getTensorAndDataParallelGroup,
  getTensorModelParallelGroup,
  modelParallelIsInitialized,
  type ProcessGroup,
  SingleProcessGroup,
  setSequenceParallelAttribute,
  VocabParallelEmbedding,
  vocabParallelCrossEntropy,
} from '@megapatch/parallel';
import {
  type DType,
  fromTypedArray,
  full,
  type Generator,
  initMethodNormal,
  Module,
  ModuleList,
  maskedFill,
  scaledInitMethodNormal,
  type Tensor,
  tidy,
} from '@megapatch/tensor';
import type { LayerBuildOptions } from './attention.js';
import type { AttentionContext } from './context.js';
import { ModelError } from './errors.js';
import { DEFAULT_FAMILY, getModelFamily, type ModelFamily } from './families/index.js';
import type { KVCache } from './kv-cache.js';
import { MoELayer, type MoELayerOptions } from './moe/moe-layer.js';
import { MultiTokenPredictionLayer } from './mtp.js';
import { Norm } from './norm.js';
import { RotaryEmbedding } from './rope.js';
import { TransformerLayer, type TransformerLayerOptions } from './transformer-layer.js';

/** Modules Megatron's `--recompute-modules` can name (those megapatch implements). */
export type RecomputeModule = 'core_attn' | 'mla_up_proj' | 'moe';

/** Options of {@link GPTModel}. */
export interface GPTModelOptions {
  /** Parameter and activation dtype (default float32); softmax, norms, RoPE, router and loss run in fp32. */
  dtype?: DType;
  /** Tensor-parallel group (default: the parallel state's, or a single process). */
  tpGroup?: ProcessGroup;
  /** Expert-parallel group (default: the parallel state's, or a single process). */
  epGroup?: ProcessGroup;
  /** Expert tensor-parallel group (default: the parallel state's, or the TP group). */
  etpGroup?: ProcessGroup;
  /**
   * Context-parallel group (default: the parallel state's, or a single process): inputs are this
   * rank's load-balanced chunks of each sequence (see `contextParallelSplit`), with their position
   * ids and local cuSeqlens, and core attention runs as a ring over the group.
   */
  cpGroup?: ProcessGroup;
  /** Megatron's sequence parallelism (dense GQA models). */
  sequenceParallel?: boolean;
  /** Generator of the initial weights (default: the default generator). */
  generator?: Generator;
  /** Draw initial weights (default true); false leaves zeros, for weights about to be loaded. */
  performInitialization?: boolean;
  /** Standard deviation of Megatron's normal initialisation (default 0.02). */
  initMethodStd?: number;
  /** Activation recompute: the whole layer, or selected modules. */
  recompute?: { granularity: 'full' } | { granularity: 'selective'; modules: RecomputeModule[] } | null;
  /** Megatron --moe-aux-loss-coeff (default 0). */
  moeAuxLossCoeff?: number;
  /** Megatron --moe-z-loss-coeff (default 0). */
  moeZLossCoeff?: number;
  /** Megatron --moe-token-dispatcher-type: all-gather or all-to-all expert dispatch (default 'allgather'). */
  moeTokenDispatcherType?: 'allgather' | 'alltoall';
  /**
   * Megatron --moe-expert-capacity-factor: each expert takes at most ceil(T·k / E · factor) of the
   * T tokens of a router call, the others are dropped. Default null (or negative): dropless.
   */
  moeExpertCapacityFactor?: number | null;
  /** Megatron --moe-token-drop-policy: drop the lowest weights ('probs', default) or the latest tokens ('position'). */
  moeTokenDropPolicy?: 'probs' | 'position';
  /** Megatron --moe-pad-expert-input-to-capacity: pad each expert's input to the capacity (weight-0 tokens). */
  moePadExpertInputToCapacity?: boolean;
  /**
   * The model family (or an HF architecture name resolved through the family registry): what
   * the architecture changes in the shared layers. Default: Llama's choices.
   */
  family?: ModelFamily | string;
}

/** Inputs of {@link GPTModel.forward} beyond the token ids. */
export interface GPTForwardOptions {
  /** Position of each token [b, s] (default: 0.. per row, continuing the cache; per sample with cuSeqlens). */
  positionIds?: Tensor;
  /** Packed rows (b = 1): cumulative sample boundaries [nseq + 1], int32 or int64. */
  cuSeqlens?: Tensor;
  /** Which keys are real tokens [b, cached + s] (bool; false = padding), for batches of unequal prompts. */
  attentionMask?: Tensor;
  /** Target ids [b, s]: the forward returns the per-token loss instead of logits. */
  labels?: Tensor;
  /** Generation: keys and values of earlier tokens, extended by this call. */
  kvCache?: KVCache;
}

/** What {@link GPTModel.forward} returns. */
export interface GPTOutput {
  /** Logits [b, s, paddedVocab / tp] of this rank's vocabulary slice, padded columns −∞ (no labels). */
  logits: Tensor | null;
  /** Cross-entropy per token [b, s], float32 (with labels). */
  loss: Tensor | null;
  /** Multi-token-prediction losses, one mean per depth (with labels and MTP layers). */
  mtpLosses: Tensor[];
}

function defaultGroup(get: () => ProcessGroup, fallback: () => ProcessGroup): ProcessGroup {
  return modelParallelIsInitialized() ? get() : fallback();
}

/** Megatron-Core's GPTModel for any TransformerConfig. */
export class GPTModel extends Module {
  readonly config: TransformerConfig;
  readonly dtype: DType;
  readonly tpGroup: ProcessGroup;
  readonly epGroup: ProcessGroup;
  readonly etpGroup: ProcessGroup;
  readonly cpGroup: ProcessGroup;
  readonly sequenceParallel: boolean;
  /** Rows of the embedding and output tables: the vocabulary padded to makeVocabSizeDivisibleBy × TP. */
  readonly paddedVocabSize: number;
  readonly embedding: Module & { wordEmbeddings: VocabParallelEmbedding };
  readonly decoder: Module & { layers: ModuleList<TransformerLayer>; finalLayernorm: Norm };
  readonly outputLayer: ColumnParallelLinear;
  readonly mtp: (Module & { layers: ModuleList<MultiTokenPredictionLayer> }) | null;
  readonly rotary: RotaryEmbedding;
  readonly family: ModelFamily;
  /** Gradient of each MoE aux loss (Megatron's MoEAuxLossAutoScaler scale; 1 by default). */
  auxLossScale = 1;
  private readonly recomputeCoreAttention: boolean;
  private readonly recomputeMlaUpProj: boolean;

  constructor(config: TransformerConfig, options: GPTModelOptions = {}) {
    super();
    this.config = config;
    const dtype = options.dtype ?? 'float32';
    if (dtype !== 'float32' && dtype !== 'bfloat16' && dtype !== 'float16' && dtype !== 'float64') {
      throw new ModelError('INVALID_ARGUMENT', `model dtype must be a floating-point type, got ${dtype}`);
    }
    this.dtype = dtype;
    const single = new SingleProcessGroup();
    this.tpGroup = options.tpGroup ?? defaultGroup(getTensorModelParallelGroup, () => single);
    this.epGroup = options.epGroup ?? defaultGroup(getExpertModelParallelGroup, () => single);
    this.cpGroup = options.cpGroup ?? defaultGroup(getContextParallelGroup, () => single);
    if (this.cpGroup.size > 1 && config.mtpNumLayers > 0) {
      throw new ModelError(
        'UNSUPPORTED',
        'multi-token prediction with context parallelism is not supported yet; set contextParallelSize 1',
      );
    }
    this.etpGroup =
      options.etpGroup ??
      (modelParallelIsInitialized()
        ? getExpertTensorParallelGroup().size === this.tpGroup.size
          ? this.tpGroup
          : getExpertTensorParallelGroup()
        : this.tpGroup);
    this.sequenceParallel = (options.sequenceParallel ?? false) && this.tpGroup.size > 1;
    checkLayout(config, this.tpGroup.size, this.epGroup.size, this.etpGroup.size);
    const tp = this.tpGroup.size;
    this.paddedVocabSize = paddedVocabSize(config.vocabSize, config.makeVocabSizeDivisibleBy, tp);
    const std = options.initMethodStd ?? 0.02;
    this.family =
      typeof options.family === 'string'
        ? getModelFamily(options.family)
        : (options.family ?? DEFAULT_FAMILY);
    const totalLayers = config.numLayers;
    const o: LayerBuildOptions = {
      config,
      dtype,
      tpGroup: this.tpGroup,
      sequenceParallel: this.sequenceParallel,
      generator: options.generator,
      initMethod: initMethodNormal(std),
      outputInitMethod: scaledInitMethodNormal(std, totalLayers),
      performInitialization: options.performInitialization ?? true,
      family: this.family,
    };
    const rc = options.recompute ?? null;
    const selective = rc?.granularity === 'selective' ? new Set(rc.modules) : new Set<RecomputeModule>();
    this.recomputeCoreAttention = selective.has('core_attn');
    this.recomputeMlaUpProj = selective.has('mla_up_proj');
    const moeOptions = moeLayerOptions(options);
    const layerOpts = (kind: 'dense' | 'moe'): TransformerLayerOptions => ({
      kind,
      expertParallel: { epGroup: this.epGroup, etpGroup: this.etpGroup },
      routerLosses: { auxLossCoeff: options.moeAuxLossCoeff ?? 0, zLossCoeff: options.moeZLossCoeff ?? 0 },
      moe: moeOptions,
      recomputeFull: rc?.granularity === 'full',
      recomputeMoe: selective.has('moe'),
      auxLossScale: () => this.auxLossScale,
    });
    const kindOf = (i: number) => (config.moe ? (config.moe.layerPattern[i] ?? 'dense') : 'dense');

    const embedding = new Module() as Module & { wordEmbeddings: VocabParallelEmbedding };
    embedding.wordEmbeddings = embedding.registerModule(
      'word_embeddings',
      new VocabParallelEmbedding(this.paddedVocabSize, config.hiddenSize, {
        tpGroup: this.tpGroup,
        generator: options.generator,
        dtype,
        initMethod: initMethodNormal(std),
        reduceScatterEmbeddings: this.sequenceParallel,
        performInitialization: o.performInitialization,
      }),
    );
    this.embedding = this.registerModule('embedding', embedding);

    const decoder = new Module() as Module & { layers: ModuleList<TransformerLayer>; finalLayernorm: Norm };
    decoder.layers = decoder.registerModule(
      'layers',
      new ModuleList(
        Array.from({ length: config.numLayers }, (_, i) => new TransformerLayer(o, i, layerOpts(kindOf(i)))),
      ),
    );
    decoder.finalLayernorm = decoder.registerModule(
      'final_layernorm',
      new Norm(
        config.hiddenSize,
        config.normalization,
        config.layernormEpsilon,
        dtype,
        this.family.zeroCenteredGamma,
      ),
    );
    // Under sequence parallelism it sees s/tp tokens: its gradients are summed over TP by
    // allreduceSequenceParallelGrads, like the norms fused into the parallel layers.
    if (this.sequenceParallel) {
      for (const p of decoder.finalLayernorm.parameters()) setSequenceParallelAttribute(p);
    }
    this.decoder = this.registerModule('decoder', decoder);

    if (config.mtpNumLayers > 0) {
      const mtp = new Module() as Module & { layers: ModuleList<MultiTokenPredictionLayer> };
      const lastKind = kindOf(config.numLayers - 1);
      mtp.layers = mtp.registerModule(
        'layers',
        new ModuleList(
          Array.from(
            { length: config.mtpNumLayers },
            (_, k) => new MultiTokenPredictionLayer(o, config.numLayers + k, layerOpts(lastKind)),
          ),
        ),
      );
      this.mtp = this.registerModule('mtp', mtp);
    } else this.mtp = null;

    this.outputLayer = this.registerModule(
      'output_layer',
      new ColumnParallelLinear(config.hiddenSize, this.paddedVocabSize, {
        tpGroup: this.tpGroup,
        generator: options.generator,
        dtype,
        bias: false,
        sequenceParallel: this.sequenceParallel,
        initMethod: initMethodNormal(std),
        skipWeightParamAllocation: !config.untieEmbeddingsAndOutputWeights,
        performInitialization: o.performInitialization,
      }),
    );
    const rotaryDim = config.mla ? config.mla.qkRopeHeadDim : config.kvChannels;
    this.rotary = new RotaryEmbedding(rotaryDim, config.rotaryBase, config.ropeScaling);
  }

  /** The MoE layers, by decoder layer index (MTP layers excluded). */
  moeLayers(): [number, MoELayer][] {
    const out: [number, MoELayer][] = [];
    let i = 0;
    for (const l of this.decoder.layers) {
      if (l.mlp instanceof MoELayer) out.push([i, l.mlp]);
      i++;
    }
    return out;
  }

  /**
   * Tokens each expert computed per MoE layer since the last call, on this rank (the tokens of its
   * data-parallel slice, the same on every TP rank), then reset.
   */
  takeExpertLoad(): Map<number, Float64Array> {
    return new Map(this.moeLayers().map(([i, m]) => [i, m.router.takeLoad()]));
  }

  /**
   * Megatron's global load of the aux-loss-free update: {@link GPTModel.takeExpertLoad} summed
   * over the tensor × data × context-parallel group in one all-reduce for all layers (default: the
   * parallel state's, else a single process), divided by TP since the TP ranks route the same
   * tokens. Every rank of the group gets the same counts; call it on all of them.
   */
  takeGlobalExpertLoad(tpDpCpGroup?: ProcessGroup): Map<number, Float64Array> {
    const local = this.takeExpertLoad();
    const group = tpDpCpGroup ?? (modelParallelIsInitialized() ? getTensorAndDataParallelGroup(true) : null);
    if (!group || group.size === 1 || local.size === 0) return local;
    const E = this.config.moe?.numExperts ?? 0;
    const layers = [...local.keys()];
    const flat = new Float64Array(layers.length * E);
    layers.forEach((l, i) => {
      flat.set(local.get(l) as Float64Array, i * E);
    });
    const t = fromTypedArray(flat, [flat.length]);
    group.allReduce(t, 'sum').waitSync();
    const sum = t.toTypedArray() as Float64Array;
    t.dispose();
    const tp = this.tpGroup.size;
    return new Map(
      layers.map((l, i) => [l, Float64Array.from(sum.subarray(i * E, (i + 1) * E), (v) => v / tp)]),
    );
  }

  /**
   * DeepSeek-V3's aux-loss-free balancing on every MoE layer with an expert bias, from global
   * counts ({@link GPTModel.takeGlobalExpertLoad}): bias += rate · sign(mean load − load).
   */
  updateExpertBias(load: ReadonlyMap<number, ArrayLike<number>>, rate: number): void {
    for (const [i, m] of this.moeLayers()) {
      const counts = load.get(i);
      if (counts && m.router.expertBias) m.router.updateExpertBias(counts, rate);
    }
  }

  /** The output weight in use: the embedding table when tied. */
  private outputWeight(): Tensor | undefined {
    return this.config.untieEmbeddingsAndOutputWeights ? undefined : this.embedding.wordEmbeddings.weight;
  }

  /**
   * Runs the model on token ids [b, s]: logits, or with `labels` the per-token loss (and the MTP
   * losses). Padded vocabulary entries never enter a softmax: they are −∞ in the logits and
   * masked in the loss.
   */
  forward(inputIds: Tensor, opts: GPTForwardOptions = {}): GPTOutput {
    const c = this.config;
    if (inputIds.ndim !== 2)
      throw new ModelError('SHAPE_MISMATCH', `input ids must be [batch, seq], got [${inputIds.shape}]`);
    if (inputIds.dtype !== 'int32' && inputIds.dtype !== 'int64') {
      throw new ModelError('INVALID_INPUT', `input ids must be int32 or int64, got ${inputIds.dtype}`);
    }
    const [b, s] = inputIds.shape;
    checkIds(inputIds, c.vocabSize, 'input ids');
    const cache = opts.kvCache ?? null;
    const past = cache ? cache.length : 0;
    if (cache && cache.batch !== b) {
      throw new ModelError('SHAPE_MISMATCH', `the KV cache was made for batch ${cache.batch}, got ${b} rows`);
    }
    if (opts.cuSeqlens && (b !== 1 || cache)) {
      throw new ModelError('INVALID_INPUT', 'packed sequences (cuSeqlens) need one row and no KV cache');
    }
    if (this.sequenceParallel && s % this.tpGroup.size !== 0) {
      throw new ModelError(
        'SHAPE_MISMATCH',
        `sequence length ${s} is not divisible by TP ${this.tpGroup.size} (sequence parallelism)`,
      );
    }
    const positionIds =
      opts.positionIds ?? defaultPositions(b, s, past, opts.cuSeqlens ?? null, opts.attentionMask ?? null);
    checkPositions(positionIds, b, s, c.maxPositionEmbeddings);
    cache?.reserve(s);
    const { cos, sin } = this.rotary.forward(positionIds);
    const mask = buildMask(b, s, past, c.slidingWindow ?? null, opts.attentionMask ?? null);
    const ctx: AttentionContext = {
      cos,
      sin,
      mask,
      causal: mask === null,
      cuSeqlens: opts.cuSeqlens ?? null,
      cpGroup: this.cpGroup.size > 1 ? this.cpGroup : null,
      cache,
      recomputeCoreAttention: this.recomputeCoreAttention,
      recomputeMlaUpProj: this.recomputeMlaUpProj,
    };
    try {
      const embedded = this.embed(inputIds);
      let x = embedded;
      for (const layer of this.decoder.layers) x = layer.forward(x, ctx);
      const hidden = this.decoder.finalLayernorm.forward(x);
      cache?.commit();
      const logits = this.outputLayer.forward(hidden, this.outputWeight()).output; // [s, b, V/tp]
      if (!opts.labels) {
        return { logits: this.maskPadding(logits).transpose(0, 1).contiguous(), loss: null, mtpLosses: [] };
      }
      checkIds(opts.labels, c.vocabSize, 'labels');
      const loss = this.lossOf(logits, opts.labels);
      const mtpLosses = this.mtp ? this.mtpLosses(inputIds, opts.labels, hidden, ctx) : [];
      return { logits: null, loss, mtpLosses };
    } finally {
      cos.dispose();
      sin.dispose();
      mask?.dispose();
    }
  }

  /** ids [b, s] -> [s, b, h] (or [s/tp, b, h] under sequence parallelism). */
  private embed(ids: Tensor): Tensor {
    let e = this.embedding.wordEmbeddings.forward(ids);
    const scale = this.family.embeddingMultiplier?.(this.config.hiddenSize);
    // HF rounds the multiplier to the activation dtype first (a bf16 √hidden is not exact)
    if (scale !== undefined) e = e.mul(full([], scale, { dtype: e.dtype }));
    return this.sequenceParallel ? e : e.transpose(0, 1).contiguous();
  }

  /** Per-token cross-entropy [b, s] of logits [s, b, V/tp] against labels [b, s], padding masked. */
  private lossOf(logits: Tensor, labels: Tensor): Tensor {
    const target = labels.transpose(0, 1).contiguous();
    const l = vocabParallelCrossEntropy(logits, target, 0, {
      vocabSize: this.config.vocabSize,
      tpGroup: this.tpGroup,
    });
    return l.transpose(0, 1).contiguous();
  }

  /** Sets this rank's padded vocabulary columns to −∞. */
  private maskPadding(logits: Tensor): Tensor {
    const per = this.paddedVocabSize / this.tpGroup.size;
    const start = this.tpGroup.rank * per;
    const realHere = Math.max(0, Math.min(per, this.config.vocabSize - start));
    if (realHere === per) return logits;
    const pad = new Uint8Array(per);
    pad.fill(1, realHere);
    return tidy(() => maskedFill(logits, fromTypedArray(pad, [per]).to('bool'), -Infinity));
  }

  /** Megatron's MTP: per depth k, the mean loss of predicting the token k + 1 ahead. */
  private mtpLosses(ids: Tensor, labels: Tensor, hidden: Tensor, ctx: AttentionContext): Tensor[] {
    const mtp = this.mtp as Module & { layers: ModuleList<MultiTokenPredictionLayer> };
    const [b, s] = ids.shape;
    const out: Tensor[] = [];
    let curIds = ids;
    let curLabels = labels;
    let h = hidden;
    let k = 0;
    for (const layer of mtp.layers) {
      k++;
      curIds = rollLeft(curIds);
      curLabels = rollLeft(curLabels);
      // Megatron hands each block the previous one's normalised output (the decoder's final norm first).
      h = layer.finalLayernorm.forward(layer.forward(this.embed(curIds), h, ctx));
      const logits = this.outputLayer.forward(h, this.outputWeight()).output;
      const perToken = this.lossOf(logits, curLabels); // [b, s]
      const m = new Float32Array(b * s);
      for (let r = 0; r < b; r++) m.fill(1, r * s, r * s + Math.max(0, s - k));
      const mask = fromTypedArray(m, [b, s]);
      out.push(
        perToken
          .mul(mask)
          .sum()
          .div(Math.max(1, b * Math.max(0, s - k))),
      );
    }
    return out;
  }

  /**
   * Full-vocabulary logits [b, s, vocabSize] (padding removed) of this rank's slice: gathered over
   * TP. For sampling and evaluation.
   */
  gatherLogits(logits: Tensor): Tensor {
    const full = this.tpGroup.size > 1 ? gatherFromTensorModelParallelRegion(logits, this.tpGroup) : logits;
    return full.narrow(-1, 0, this.config.vocabSize);
  }
}

/** ids [b, s] shifted one position left, the last column filled with 0 (Megatron's roll_tensor). */
function rollLeft(ids: Tensor): Tensor {
  const [b, s] = ids.shape;
  const src = ids.toTypedArray() as ArrayLike<number | bigint>;
  const out = new BigInt64Array(b * s);
  for (let r = 0; r < b; r++) for (let i = 0; i < s - 1; i++) out[r * s + i] = BigInt(src[r * s + i + 1]);
  return fromTypedArray(out, [b, s]);
}

/** Checks that every id lies in [0, vocab). */
function checkIds(ids: Tensor, vocab: number, what: string): void {
  const v = ids.toTypedArray() as ArrayLike<number | bigint>;
  const s = ids.shape[ids.ndim - 1];
  for (let i = 0; i < v.length; i++) {
    const x = Number(v[i]);
    if (!(x >= 0 && x < vocab)) {
      throw new ModelError(
        'INVALID_INPUT',
        `${what}: token id ${x} at [${Math.floor(i / s)}, ${i % s}] is outside the vocabulary [0, ${vocab})`,
      );
    }
  }
}

function checkPositions(pos: Tensor, b: number, s: number, max: number): void {
  if (pos.ndim !== 2 || pos.shape[0] !== b || pos.shape[1] !== s) {
    throw new ModelError('SHAPE_MISMATCH', `position ids must be [${b}, ${s}], got [${pos.shape}]`);
  }
  const v = pos.toTypedArray() as ArrayLike<number | bigint>;
  for (let i = 0; i < v.length; i++) {
    const p = Number(v[i]);
    if (p >= max || p < 0) {
      throw new ModelError(
        'INVALID_INPUT',
        `position ${p} is outside the model's ${max} positions (maxPositionEmbeddings); shorten the sequence`,
      );
    }
  }
}

/** Positions 0.. per row after `past` cached tokens (skipping padding), or per packed sample. */
function defaultPositions(
  b: number,
  s: number,
  past: number,
  cu: Tensor | null,
  attn: Tensor | null,
): Tensor {
  const out = new BigInt64Array(b * s);
  if (cu) {
    const bounds = Array.from(cu.toTypedArray() as ArrayLike<number | bigint>, Number);
    for (let j = 0; j + 1 < bounds.length; j++)
      for (let i = bounds[j]; i < bounds[j + 1]; i++) out[i] = BigInt(i - bounds[j]);
    return fromTypedArray(out, [1, s]);
  }
  if (attn) {
    // Left-padded rows: a real token's position counts the real tokens before it; padding gets 0.
    const m = attn.toTypedArray() as ArrayLike<number | boolean>;
    const total = attn.shape[1];
    for (let r = 0; r < b; r++) {
      let n = 0;
      for (let j = 0; j < total; j++) {
        const real = Boolean(m[r * total + j]);
        if (j >= total - s) out[r * s + j - (total - s)] = BigInt(real ? n : 0);
        if (real) n++;
      }
    }
    return fromTypedArray(out, [b, s]);
  }
  for (let r = 0; r < b; r++) for (let i = 0; i < s; i++) out[r * s + i] = BigInt(past + i);
  return fromTypedArray(out, [b, s]);
}

/**
 * The boolean mask [b, 1, s, past + s] when causality alone does not describe attention: cached
 * tokens (bottom-right aligned), a sliding window (key j visible from query i iff 0 ≤ i − j < window)
 * or padding. Null for plain causal attention; packed rows are separated by the kernel (cuSeqlens).
 */
function buildMask(
  b: number,
  s: number,
  past: number,
  window: number | null,
  attn: Tensor | null,
): Tensor | null {
  const sk = past + s;
  // A window at least as long as the sequence changes nothing.
  const w = window !== null && window < sk ? window : null;
  if (past === 0 && w === null && attn === null) return null;
  if (attn && (attn.ndim !== 2 || attn.shape[0] !== b || attn.shape[1] !== sk)) {
    throw new ModelError(
      'SHAPE_MISMATCH',
      `attentionMask must be [${b}, ${sk}] (cached + new tokens), got [${attn.shape}]`,
    );
  }
  const valid = attn ? (attn.toTypedArray() as ArrayLike<number | boolean>) : null;
  const m = new Uint8Array(b * s * sk);
  for (let r = 0; r < b; r++) {
    for (let i = 0; i < s; i++) {
      const qi = past + i;
      for (let j = 0; j <= qi; j++) {
        if (w !== null && qi - j >= w) continue;
        if (valid && !valid[r * sk + j]) continue;
        m[(r * s + i) * sk + j] = 1;
      }
    }
  }
  return fromTypedArray(m, [b, 1, s, sk]).to('bool');
}

/** The MoE layers' dispatcher and capacity from the model options. */
function moeLayerOptions(o: GPTModelOptions): MoELayerOptions {
  // a negative factor means dropless, as Megatron's TransformerConfig reads it
  const given = o.moeExpertCapacityFactor ?? null;
  const factor = given !== null && given < 0 ? null : given;
  if (factor === null && o.moePadExpertInputToCapacity) {
    throw new ModelError(
      'INVALID_CONFIG',
      'moePadExpertInputToCapacity needs moeExpertCapacityFactor; set a capacity factor or drop the padding',
    );
  }
  return {
    tokenDispatcherType: o.moeTokenDispatcherType ?? 'allgather',
    capacity:
      factor === null
        ? null
        : {
            capacityFactor: factor,
            dropPolicy: o.moeTokenDropPolicy ?? 'probs',
            padToCapacity: o.moePadExpertInputToCapacity ?? false,
          },
  };
}

/** Checks that TP, EP and expert-TP can split this model. */
function checkLayout(c: TransformerConfig, tp: number, ep: number, etp: number): void {
  const bad = (m: string) => new ModelError('INVALID_CONFIG', m);
  if (c.numAttentionHeads % tp !== 0)
    throw bad(`tp=${tp} does not divide the ${c.numAttentionHeads} attention heads`);
  if (!c.mla && c.numQueryGroups % tp !== 0)
    throw bad(`tp=${tp} does not divide the ${c.numQueryGroups} query groups`);
  if (c.ffnHiddenSize % tp !== 0) throw bad(`tp=${tp} does not divide ffnHiddenSize ${c.ffnHiddenSize}`);
  if (c.moe && c.moe.numExperts % ep !== 0)
    throw bad(`ep=${ep} does not divide the ${c.moe.numExperts} experts`);
  if (!c.moe && ep > 1) throw bad(`ep=${ep} needs a MoE model; this one is dense`);
  if (c.moe && c.moe.moeFfnHiddenSize % etp !== 0) {
    throw bad(`etp=${etp} (expert-TP) does not divide moeFfnHiddenSize ${c.moe.moeFfnHiddenSize}`);
  }
  if (c.moe && c.moe.sharedExpertIntermediateSize % tp !== 0) {
    throw bad(`tp=${tp} does not divide sharedExpertIntermediateSize ${c.moe.sharedExpertIntermediateSize}`);
  }
  if (c.mtpNumLayers > 0 && c.hiddenSize % tp !== 0) {
    throw bad(`tp=${tp} does not divide hiddenSize ${c.hiddenSize} (the MTP eh_proj is split over TP)`);
  }
}
