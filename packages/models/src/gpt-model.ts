// GPTModel: one decoder-only model for every TransformerConfig, built from the tensor-parallel
// layers of @megapatch/parallel with Megatron-Core's parameter names (`embedding.word_embeddings`,
// `decoder.layers.{i}...`, `decoder.final_layernorm`, `output_layer`, `mtp.layers.{k}...`) and
// [s, b, h] activations. The same code runs on one process or across TP / EP / CP ranks, and as
// one pipeline stage: only the stage's decoder layers (local module indices, global logical names),
// the embedding on the first stage, the output layer and loss on the last.
import {
  type PipelineStage,
  type PipelineStages,
  paddedVocabSize,
  pipelineStages,
  rotaryDim,
  type TransformerConfig,
} from '@megapatch/convert';
import {
  ColumnParallelLinear,
  gatherFromTensorModelParallelRegion,
  getContextParallelGroup,
  getExpertModelParallelGroup,
  getExpertTensorParallelGroup,
  getPipelineModelParallelGroup,
  getTensorAndContextParallelGroup,
  getTensorAndDataParallelGroup,
  getTensorModelParallelGroup,
  getVirtualPipelineModelParallelWorldSize,
  modelParallelIsInitialized,
  type ProcessGroup,
  SingleProcessGroup,
  setSequenceParallelAttribute,
  VocabParallelEmbedding,
  vocabParallelCrossEntropy,
} from '@megapatch/parallel';
import {
  arange,
  cat,
  cumsum,
  type DType,
  defaultGenerator,
  deferCheck,
  fromTypedArray,
  full,
  type Generator,
  initMethodNormal,
  keep,
  logicalAnd,
  Module,
  ModuleList,
  maskedFill,
  noGrad,
  ones,
  scaledInitMethodNormal,
  scatterAdd,
  type Tensor,
  tidy,
  where,
  zeros,
} from '@megapatch/tensor';
import type { LayerBuildOptions } from './attention.js';
import { type AttentionContext, checkpointWithContext } from './context.js';
import { type DropoutKeys, LayoutDropout, tokenSlots } from './dropout.js';
import { ModelError } from './errors.js';
import { DEFAULT_FAMILY, getModelFamily, type ModelFamily } from './families/index.js';
import type { KVCache } from './kv-cache.js';
import { MoELayer, type MoELayerOptions } from './moe/moe-layer.js';
import type { LoadBalancingType } from './moe/router.js';
import { MultiTokenPredictionLayer } from './mtp.js';
import { mtpTargets } from './mtp-targets.js';
import { Norm } from './norm.js';
import { RotaryEmbedding } from './rope.js';
import { TransformerLayer, type TransformerLayerOptions } from './transformer-layer.js';

/** Modules Megatron's `--recompute-modules` can name (those megapatch implements). */
export type RecomputeModule = 'core_attn' | 'mla_up_proj' | 'moe' | 'mlp';

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
  /**
   * Megatron --cp-comm-type: how core attention crosses the cp group, 'p2p' (default: a ring of
   * key/value exchanges) or 'a2a' (two all-to-alls: each rank attends with cp-th of the heads
   * over whole sequences; cp must divide the query and key/value heads of each TP rank).
   */
  cpCommType?: 'p2p' | 'a2a';
  /**
   * Megatron's sequence parallelism (TP > 1): activations between layers are this rank's chunk of
   * the sequence [s/tp, b, h]; MoE layers route and dispatch that chunk.
   */
  sequenceParallel?: boolean;
  /** Generator of the initial weights (default: the default generator). */
  generator?: Generator;
  /** Draw initial weights (default true); false leaves zeros, for weights about to be loaded. */
  performInitialization?: boolean;
  /** Standard deviation of Megatron's normal initialisation (default 0.02). */
  initMethodStd?: number;
  /**
   * Activation recompute: whole layers (every layer; with Megatron's recompute method 'block', only
   * the first `numLayers` decoder layers of this stage; with 'uniform', groups of `numLayers`
   * layers, each checkpointed as one), or selected modules.
   */
  recompute?:
    | { granularity: 'full'; method?: 'uniform' | 'block'; numLayers?: number }
    | { granularity: 'selective'; modules: RecomputeModule[] }
    | null;
  /**
   * Megatron --hidden-dropout: dropout of the embedding's output and of each attention and MLP
   * output before its residual add (Megatron's bias-dropout-add), in training mode. Default 0
   * (Megatron's default is 0.1; the LLM recipes give 0). Masks depend on the rows' ids and the
   * tokens' places, not on the layout: see {@link GPTForwardOptions.dropout}.
   */
  hiddenDropout?: number;
  /**
   * Megatron --attention-dropout: dropout of the attention probabilities, in training mode (core
   * attention, or each block of the context-parallel ring, then runs as its composition from core
   * ops). Default 0.
   */
  attentionDropout?: number;
  /** Megatron --moe-aux-loss-coeff (default 0). */
  moeAuxLossCoeff?: number;
  /** Megatron --moe-z-loss-coeff (default 0). */
  moeZLossCoeff?: number;
  /**
   * Megatron --moe-router-load-balancing-type: the aux loss over each router call's tokens
   * ('aux_loss', default), per sample of the micro-batch ('seq_aux_loss', DeepSeek-V2/V3's
   * sequence-wise loss), or none ('none').
   */
  moeRouterLoadBalancingType?: LoadBalancingType;
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
  /** Pipeline-parallel group (default: the parallel state's, or a single process). */
  ppGroup?: ProcessGroup;
  /** Pipeline-parallel size (default: the size of `ppGroup`); set it to build one stage on one process. */
  pipelineModelParallelSize?: number;
  /** The stage this model is (default: this rank of `ppGroup`, virtual stage 0). */
  pipelineStage?: { ppRank: number; vpStage?: number };
  /** Virtual stages (model chunks) per pipeline rank (default: the parallel state's, else 1). */
  vpp?: number;
  /** Megatron --decoder-first-pipeline-num-layers: decoder layers on the first pipeline rank. */
  decoderFirstPipelineNumLayers?: number;
  /** Megatron --decoder-last-pipeline-num-layers: decoder layers on the last pipeline rank. */
  decoderLastPipelineNumLayers?: number;
  /** Megatron --pipeline-model-parallel-layout, e.g. "E|t*3|t*3,L". */
  pipelineModelParallelLayout?: string;
}

/** Inputs of {@link GPTModel.forward} beyond the token ids. */
export interface GPTForwardOptions {
  /**
   * Position of each token [b, s], or [1, s] when every row has the same (default: 0.. continuing
   * the cache, as [1, s]; per sample with cuSeqlens).
   */
  positionIds?: Tensor;
  /**
   * Packed rows (b = 1): cumulative sample boundaries [nseq + 1], int32 or int64, or the same as
   * numbers. Numbers are checked on the host and copied to the device; with context parallelism
   * (where the host plans the ring's calls with them) they spare the device a read back.
   */
  cuSeqlens?: Tensor | readonly number[];
  /** Which keys are real tokens [b, cached + s] (bool; false = padding), for batches of unequal prompts. */
  attentionMask?: Tensor;
  /** Target ids [b, s]: the forward returns the per-token loss instead of logits. */
  labels?: Tensor;
  /**
   * With labels: the logits are divided by it before the cross-entropy, so the loss is
   * −log p_T(label) of the distribution sampled at that temperature (RL's log-probabilities of
   * tokens generated at temperature T; default 1). The MTP losses are left as they are.
   */
  temperature?: number;
  /**
   * Loss mask [b, s] (float, 1 = counted) of the MTP losses: shifted with the labels at each depth,
   * as Megatron's MTP uses the batch's loss_mask (default all ones). The main loss is per token and
   * left to the caller to mask.
   */
  lossMask?: Tensor;
  /** Generation: keys and values of earlier tokens, extended by this call. */
  kvCache?: KVCache;
  /**
   * Pipeline stages after the first: the previous stage's output [s, b, h] ([s/tp, b, h] under
   * sequence parallelism). Default: the tensor given to {@link GPTModel.setInputTensor}.
   */
  hiddenStates?: Tensor | null;
  /**
   * The keys of the dropout masks (training mode, hiddenDropout or attentionDropout above 0): the
   * seed and an id of each row unique over the run (the trainer passes each sample's index in the
   * run's order, so every layout drops the same elements). Every stage of a pipeline gets the same.
   * Default: the default generator's seed and fresh row ids taken from its stream.
   */
  dropout?: DropoutKeys;
}

/** What {@link GPTModel.forward} returns. */
export interface GPTOutput {
  /** Logits [b, s, paddedVocab / tp] of this rank's vocabulary slice, padded columns −∞ (no labels). */
  logits: Tensor | null;
  /** Cross-entropy per token [b, s], float32 (with labels). */
  loss: Tensor | null;
  /**
   * Multi-token-prediction losses, one per depth (with labels and MTP layers): the masked mean over
   * the depth's tokens. Under context parallelism each CP rank returns its tokens' share (its sum
   * divided by the whole sequence's count): the shares over the CP group add up to the mean.
   */
  mtpLosses: Tensor[];
  /** Pipeline stages before the last: the hidden states [s, b, h] to send to the next stage (else null). */
  hiddenStates: Tensor | null;
}

function defaultGroup(get: () => ProcessGroup, fallback: () => ProcessGroup): ProcessGroup {
  return modelParallelIsInitialized() ? get() : fallback();
}

/** A dropout rate in [0, 1) (0 when absent). */
function checkRate(p: number | undefined, name: string): number {
  const v = p ?? 0;
  if (!(v >= 0 && v < 1)) throw new ModelError('INVALID_ARGUMENT', `${name} must be in [0, 1), got ${p}`);
  return v;
}

/** Megatron-Core's GPTModel for any TransformerConfig. */
export class GPTModel extends Module {
  readonly config: TransformerConfig;
  readonly dtype: DType;
  readonly tpGroup: ProcessGroup;
  readonly epGroup: ProcessGroup;
  readonly etpGroup: ProcessGroup;
  readonly cpGroup: ProcessGroup;
  /** How core attention crosses the cp group (see GPTModelOptions.cpCommType). */
  readonly cpCommType: 'p2p' | 'a2a';
  readonly sequenceParallel: boolean;
  /** Rows of the embedding and output tables: the vocabulary padded to makeVocabSizeDivisibleBy × TP. */
  readonly paddedVocabSize: number;
  readonly ppGroup: ProcessGroup;
  /** All the stages of the pipeline (one stage holding everything when pp = 1). */
  readonly pipeline: PipelineStages;
  /** The stage this model builds: its global decoder layers, MTP layers, embedding, loss. */
  readonly stage: PipelineStage;
  /** Megatron's pre_process: this stage embeds the token ids (the first stage). */
  readonly preProcess: boolean;
  /** Megatron's post_process: this stage computes the logits and the loss (the last stage). */
  readonly postProcess: boolean;
  /**
   * The word embeddings: on the first stage, and on the last stage as the copy the tied output
   * layer and the MTP layers use (null elsewhere).
   */
  readonly embedding: (Module & { wordEmbeddings: VocabParallelEmbedding }) | null;
  /** This stage's decoder layers (local indices; `layerNumber` is the global one) and the final norm where it lives. */
  readonly decoder: Module & { layers: ModuleList<TransformerLayer>; finalLayernorm: Norm | null };
  /** The output layer (last stage only). */
  readonly outputLayer: ColumnParallelLinear | null;
  readonly mtp: (Module & { layers: ModuleList<MultiTokenPredictionLayer> }) | null;
  readonly rotary: RotaryEmbedding;
  readonly family: ModelFamily;
  /** Gradient of each MoE aux loss (Megatron's MoEAuxLossAutoScaler scale; 1 by default). */
  auxLossScale = 1;
  private readonly recomputeCoreAttention: boolean;
  private readonly recomputeMlaUpProj: boolean;
  /** Megatron's 'uniform' recompute of groups of this many layers (1: each layer on its own, or none). */
  private readonly recomputeGroup: number;
  private inputTensor: Tensor | null = null;
  /** Megatron's hidden_dropout and attention_dropout (training mode only). */
  readonly hiddenDropout: number;
  readonly attentionDropout: number;

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
    this.cpCommType = options.cpCommType ?? 'p2p';
    this.etpGroup =
      options.etpGroup ??
      (modelParallelIsInitialized()
        ? getExpertTensorParallelGroup().size === this.tpGroup.size
          ? this.tpGroup
          : getExpertTensorParallelGroup()
        : this.tpGroup);
    this.sequenceParallel = (options.sequenceParallel ?? false) && this.tpGroup.size > 1;
    this.hiddenDropout = checkRate(options.hiddenDropout, 'hiddenDropout');
    this.attentionDropout = checkRate(options.attentionDropout, 'attentionDropout');
    checkLayout(config, this.tpGroup.size, this.epGroup.size, this.etpGroup.size);
    if (this.cpCommType === 'a2a' && this.cpGroup.size > 1) {
      // each rank attends with cp-th of its TP rank's heads: query and key/value heads both split
      const cp = this.cpGroup.size;
      const tp = this.tpGroup.size;
      const heads = config.numAttentionHeads / tp;
      const kv = config.mla ? heads : config.numQueryGroups / tp;
      if (heads % cp !== 0 || kv % cp !== 0) {
        throw new ModelError(
          'UNSUPPORTED',
          `context parallelism by all-to-all (cpCommType a2a) splits each tensor-parallel rank's ${heads} query and ${kv} key/value heads over cp=${cp}, which does not divide them; use cpCommType p2p`,
        );
      }
    }
    if (config.ropeScaling.type === 'longrope' && this.cpGroup.size > 1) {
      // each CP rank holds part of a sequence: the short/long choice needs the whole one's positions
      throw new ModelError(
        'UNSUPPORTED',
        `longrope (Phi-3's 128k RoPE) with context parallelism (cp=${this.cpGroup.size}) is not supported; use cp=1`,
      );
    }
    this.ppGroup = options.ppGroup ?? defaultGroup(getPipelineModelParallelGroup, () => single);
    this.pipeline = buildPipeline(config, this.ppGroup, options);
    this.stage = stageOf(this.pipeline, this.ppGroup, options.pipelineStage);
    this.preProcess = this.stage.embedding;
    this.postProcess = this.stage.loss;
    const stage = this.stage;
    const tied = !config.untieEmbeddingsAndOutputWeights;
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
      sequencePartitionGroup: this.sequencePartitionGroup(),
    };
    const rc = options.recompute ?? null;
    const group = rc?.granularity === 'full' && rc.method === 'uniform' ? (rc.numLayers ?? 1) : 1;
    if (!(Number.isInteger(group) && group >= 1)) {
      throw new ModelError(
        'INVALID_ARGUMENT',
        `recompute.numLayers of the 'uniform' method must be a positive integer, got ${group}`,
      );
    }
    this.recomputeGroup = group;
    const selective = rc?.granularity === 'selective' ? new Set(rc.modules) : new Set<RecomputeModule>();
    this.recomputeCoreAttention = selective.has('core_attn');
    this.recomputeMlaUpProj = selective.has('mla_up_proj');
    const moeOptions = moeLayerOptions(options);
    const layerOpts = (
      kind: 'dense' | 'moe',
      recomputeFull = rc?.granularity === 'full',
    ): TransformerLayerOptions => ({
      kind,
      expertParallel: { epGroup: this.epGroup, etpGroup: this.etpGroup },
      routerLosses: {
        auxLossCoeff: options.moeAuxLossCoeff ?? 0,
        zLossCoeff: options.moeZLossCoeff ?? 0,
        loadBalancingType: loadBalancingType(options.moeRouterLoadBalancingType),
      },
      moe: moeOptions,
      recomputeFull,
      recomputeMoe: selective.has('moe'),
      recomputeMlp: selective.has('mlp'),
      auxLossScale: () => this.auxLossScale,
    });
    const kindOf = (i: number) => (config.moe ? (config.moe.layerPattern[i] ?? 'dense') : 'dense');

    // The last stage's copy of the embedding (tied output layer, MTP) is drawn first like the
    // first stage's own, so that the same generator state gives the same table on both.
    if (stage.embedding || (stage.loss && (tied || config.mtpNumLayers > 0))) {
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
    } else this.embedding = null;

    const finalStage = this.pipeline.stages[this.pipeline.finalLayernormStage];
    const decoder = new Module() as Module & {
      layers: ModuleList<TransformerLayer>;
      finalLayernorm: Norm | null;
    };
    decoder.layers = decoder.registerModule(
      'layers',
      new ModuleList(
        stage.layers.map(
          (i, local) =>
            new TransformerLayer(
              o,
              i,
              // Megatron's 'block' method: the first numLayers layers of each stage (model chunk);
              // 'uniform' groups of several layers are checkpointed by the forward as one
              layerOpts(
                kindOf(i),
                rc?.granularity === 'full' &&
                  this.recomputeGroup === 1 &&
                  (rc.method !== 'block' || local < (rc.numLayers ?? 0)),
              ),
            ),
        ),
      ),
    );
    if (finalStage.ppRank === stage.ppRank && finalStage.vpStage === stage.vpStage) {
      const norm = decoder.registerModule(
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
      if (this.sequenceParallel) for (const p of norm.parameters()) setSequenceParallelAttribute(p);
      decoder.finalLayernorm = norm;
    } else decoder.finalLayernorm = null;
    this.decoder = this.registerModule('decoder', decoder);

    if (stage.mtpLayers.length > 0) {
      if (!stage.loss) {
        throw new ModelError(
          'UNSUPPORTED',
          `MTP layers on pipeline rank ${stage.ppRank} (virtual stage ${stage.vpStage}) without the loss: put 'm' in the stage with 'L'`,
        );
      }
      const mtp = new Module() as Module & { layers: ModuleList<MultiTokenPredictionLayer> };
      const lastKind = kindOf(config.numLayers - 1);
      mtp.layers = mtp.registerModule(
        'layers',
        new ModuleList(
          stage.mtpLayers.map(
            (k) => new MultiTokenPredictionLayer(o, config.numLayers + k, layerOpts(lastKind)),
          ),
        ),
      );
      this.mtp = this.registerModule('mtp', mtp);
    } else this.mtp = null;

    this.outputLayer = stage.loss
      ? this.registerModule(
          'output_layer',
          new ColumnParallelLinear(config.hiddenSize, this.paddedVocabSize, {
            tpGroup: this.tpGroup,
            generator: options.generator,
            dtype,
            bias: false,
            sequenceParallel: this.sequenceParallel,
            initMethod: initMethodNormal(std),
            skipWeightParamAllocation: tied,
            performInitialization: o.performInitialization,
          }),
        )
      : null;
    this.rotary = new RotaryEmbedding(rotaryDim(config), config.rotaryBase, config.ropeScaling);
  }

  /**
   * This stage's MoE layers by global layer index: the decoder's, then those of the MTP blocks
   * (numLayers + depth, Megatron's layer number for an MTP router and Hugging Face's layer index
   * for DeepSeek-V3's MTP block).
   */
  moeLayers(): [number, MoELayer][] {
    const out: [number, MoELayer][] = [];
    for (const l of this.decoder.layers) if (l.mlp instanceof MoELayer) out.push([l.layerNumber, l.mlp]);
    for (const m of this.mtp?.layers ?? []) {
      const l = m.transformerLayer;
      if (l.mlp instanceof MoELayer) out.push([l.layerNumber, l.mlp]);
    }
    return out;
  }

  /**
   * Tokens each expert computed per MoE layer since the last call, on this rank (the tokens of its
   * data-parallel slice, the same on every TP rank; under sequence parallelism its chunk of them),
   * then reset.
   */
  takeExpertLoad(): Map<number, Float64Array> {
    return new Map(this.moeLayers().map(([i, m]) => [i, m.router.takeLoad()]));
  }

  /**
   * Megatron's global load of the aux-loss-free update: {@link GPTModel.takeExpertLoad} summed
   * over the tensor × data × context-parallel group in one all-reduce for all layers (default: the
   * parallel state's, else a single process), divided by TP since the TP ranks route the same
   * tokens (not under sequence parallelism, where each routes its chunk). Every rank of the group
   * gets the same counts; call it on all of them.
   */
  takeGlobalExpertLoad(tpDpCpGroup?: ProcessGroup): Map<number, Float64Array> {
    const group = tpDpCpGroup ?? (modelParallelIsInitialized() ? getTensorAndDataParallelGroup(true) : null);
    // one rank: the local counts, as they are
    if (!group || group.size === 1) return this.takeExpertLoad();
    const g = this.takeGlobalExpertLoadOnDevice(group);
    if (!g) return new Map();
    const E = this.config.moe?.numExperts ?? 0;
    const all = g.load.toTypedArray() as Float64Array;
    g.load.dispose();
    return new Map(g.layers.map((l, i) => [l, all.slice(i * E, (i + 1) * E)]));
  }

  /**
   * {@link GPTModel.takeGlobalExpertLoad} left where the group sums it: `load` [layers × E]
   * (float64, the rows in `layers`' order, the caller's to free) on the model's device, nothing
   * read back; null without MoE layers. Give it to {@link GPTModel.updateExpertBias}.
   */
  takeGlobalExpertLoadOnDevice(tpDpCpGroup?: ProcessGroup): { layers: number[]; load: Tensor } | null {
    const moe = this.moeLayers();
    if (moe.length === 0) return null;
    const group = tpDpCpGroup ?? (modelParallelIsInitialized() ? getTensorAndDataParallelGroup(true) : null);
    const layers = moe.map(([l]) => l);
    const device = moe[0][1].router.weight.device;
    // each router's counts where they are (the dropless maps' were added up there)
    const t = noGrad(() => tidy(() => cat(moe.map(([, m]) => m.router.takeLoadOnDevice(device)))));
    if (!group || group.size === 1) return { layers, load: t };
    group.allReduce(t, 'sum').waitSync();
    const tp = this.sequenceParallel ? 1 : this.tpGroup.size;
    if (tp === 1) return { layers, load: t };
    const load = noGrad(() => t.div(tp));
    t.dispose();
    return { layers, load };
  }

  /**
   * DeepSeek-V3's aux-loss-free balancing on every MoE layer with an expert bias, from global
   * counts: bias += rate · sign(mean load − load), where the biases are. `load` is
   * {@link GPTModel.takeGlobalExpertLoad}'s map or {@link GPTModel.takeGlobalExpertLoadOnDevice}'s
   * result (then nothing is read back).
   */
  updateExpertBias(
    load: ReadonlyMap<number, ArrayLike<number>> | { layers: readonly number[]; load: Tensor },
    rate: number,
  ): void {
    const E = this.config.moe?.numExperts ?? 0;
    const onDevice = load instanceof Map ? null : (load as { layers: readonly number[]; load: Tensor });
    for (const [i, m] of this.moeLayers()) {
      if (!m.router.expertBias) continue;
      if (onDevice) {
        const row = onDevice.layers.indexOf(i);
        if (row >= 0) tidy(() => m.router.updateExpertBias(onDevice.load.narrow(0, row * E, E), rate));
      } else {
        const counts = (load as ReadonlyMap<number, ArrayLike<number>>).get(i);
        if (counts) m.router.updateExpertBias(counts, rate);
      }
    }
  }

  /** TP under sequence parallelism, CP, or the TP × CP group: the ranks sharing each sequence. */
  private sequencePartitionGroup(): ProcessGroup | null {
    const sp = this.sequenceParallel && this.tpGroup.size > 1;
    const cp = this.cpGroup.size > 1;
    if (!cp) return sp ? this.tpGroup : null;
    if (!sp) return this.cpGroup;
    if (!modelParallelIsInitialized()) {
      throw new ModelError(
        'UNSUPPORTED',
        'sequence and context parallelism together need the parallel state (initializeModelParallel) for the tp-cp group',
      );
    }
    return getTensorAndContextParallelGroup();
  }

  /** The output weight in use: the embedding table when tied. */
  private outputWeight(): Tensor | undefined {
    return this.config.untieEmbeddingsAndOutputWeights ? undefined : this.embedding?.wordEmbeddings.weight;
  }

  /**
   * Megatron's set_input_tensor: the previous stage's output [s, b, h] that the next forward
   * starts from (the pipeline schedules call it). Null on the first stage.
   */
  setInputTensor(t: Tensor | null): void {
    this.inputTensor = t;
  }

  /**
   * The word-embedding copy that the first and the last pipeline stage share (tied output layer,
   * or MTP on the last stage): pass it to `allreduceEmbeddingGrads` after the backward passes so
   * both copies get the summed gradient. Null when nothing is shared (pp = 1, a middle stage, or
   * untied embeddings without MTP).
   */
  sharedEmbeddingWeight(): Tensor | null {
    const shared = !this.config.untieEmbeddingsAndOutputWeights || this.config.mtpNumLayers > 0;
    if (!shared || this.pipeline.stages.length === 1 || !this.embedding) return null;
    return this.embedding.wordEmbeddings.weight;
  }

  /**
   * Runs this stage. The first stage reads token ids [b, s]; later stages start from the previous
   * stage's hidden states (`opts.hiddenStates` or {@link GPTModel.setInputTensor}) and need the
   * ids only for MTP. Stages before the last return `hiddenStates` [s, b, h]; the last returns
   * logits, or with `labels` the per-token loss (and the MTP losses). Padded vocabulary entries
   * never enter a softmax: they are −∞ in the logits and masked in the loss.
   */
  forward(inputIds: Tensor | null, opts: GPTForwardOptions = {}): GPTOutput {
    const c = this.config;
    const input = this.preProcess ? null : (opts.hiddenStates ?? this.inputTensor);
    this.inputTensor = null;
    const [b, s] = this.batchShape(inputIds, input);
    if (inputIds) checkIds(inputIds, c.vocabSize, 'input ids');
    const cache = opts.kvCache ?? null;
    const past = cache ? cache.length : 0;
    if (cache && cache.batch !== b) {
      throw new ModelError('SHAPE_MISMATCH', `the KV cache was made for batch ${cache.batch}, got ${b} rows`);
    }
    if (opts.cuSeqlens && (b !== 1 || cache)) {
      throw new ModelError('INVALID_INPUT', 'packed sequences (cuSeqlens) need one row and no KV cache');
    }
    const cpGroup = this.cpGroup.size > 1 ? this.cpGroup : null;
    const packed = packedBoundaries(opts.cuSeqlens ?? null, s, cpGroup !== null, inputIds ?? input);
    if (this.sequenceParallel && s % this.tpGroup.size !== 0) {
      throw new ModelError(
        'SHAPE_MISMATCH',
        `sequence length ${s} is not divisible by TP ${this.tpGroup.size} (sequence parallelism)`,
      );
    }
    const given = opts.positionIds ?? null;
    const made = given
      ? null
      : defaultPositions(b, s, past, packed, opts.attentionMask ?? null, c.maxPositionEmbeddings);
    const positionIds = given ?? (made as { ids: Tensor }).ids;
    // the rotary table's rows: what the positions need where the host knows them, else all of them
    // (positions made on the device are checked as given ones are)
    // (exact: the largest position + 1, where known; null: positions on an asynchronous device)
    const exact =
      made && made.rows !== null ? made.rows : checkPositions(positionIds, b, s, c.maxPositionEmbeddings);
    const rows = exact ?? c.maxPositionEmbeddings;
    cache?.reserve(s);
    let rope: { cos: Tensor; sin: Tensor };
    try {
      rope = this.rotary.forward(positionIds, rows, exact);
    } catch (e) {
      packed?.owned?.dispose();
      throw e;
    } finally {
      made?.ids.dispose();
    }
    const { cos, sin } = rope;
    const mask = buildMask(b, s, past, c.slidingWindow ?? null, opts.attentionMask ?? null);
    const ctx: AttentionContext = {
      cos,
      sin,
      mask,
      causal: mask === null,
      cuSeqlens: packed?.tensor ?? null,
      cuSeqlensValues: packed?.values ?? null,
      cpGroup,
      cpCommType: this.cpCommType,
      cache,
      recomputeCoreAttention: this.recomputeCoreAttention,
      recomputeMlaUpProj: this.recomputeMlaUpProj,
      dropout: null,
    };
    try {
      ctx.dropout = this.dropoutOf(b, s, cpGroup, packed?.values ?? null, opts.dropout);
      let x = input ?? this.embed(inputIds as Tensor, ctx.dropout, 0);
      x = this.decoderForward(x, ctx);
      // With MTP the final norm sits next to the last decoder layer, maybe on an earlier stage.
      const hidden = this.decoder.finalLayernorm ? this.decoder.finalLayernorm.forward(x) : x;
      cache?.commit();
      const outputLayer = this.outputLayer;
      if (!outputLayer) return { logits: null, loss: null, mtpLosses: [], hiddenStates: hidden };
      const logits = outputLayer.forward(hidden, this.outputWeight()).output; // [s, b, V/tp]
      if (!opts.labels) {
        return {
          logits: this.maskPadding(logits).transpose(0, 1).contiguous(),
          loss: null,
          mtpLosses: [],
          hiddenStates: null,
        };
      }
      checkIds(opts.labels, c.vocabSize, 'labels');
      const t = opts.temperature ?? 1;
      if (!(t > 0)) throw new ModelError('INVALID_ARGUMENT', `temperature must be > 0, got ${t}`);
      const loss = this.lossOf(t === 1 ? logits : logits.div(t), opts.labels);
      let mtpLosses: Tensor[] = [];
      if (this.mtp) {
        if (!inputIds) {
          throw new ModelError(
            'INVALID_INPUT',
            'the last pipeline stage needs the token ids for its MTP layers',
          );
        }
        mtpLosses = this.mtpLosses(inputIds, opts.labels, opts.lossMask ?? null, hidden, ctx);
      }
      return { logits: null, loss, mtpLosses, hiddenStates: null };
    } finally {
      cos.dispose();
      sin.dispose();
      mask?.dispose();
      packed?.owned?.dispose();
    }
  }

  /**
   * The stage's decoder layers; with Megatron's 'uniform' recompute of N > 1 layers a group, each
   * run of N layers (the last maybe fewer) is one checkpoint: only its input is kept, and the
   * backward recomputes the group's layers in turn.
   */
  private decoderForward(x: Tensor, ctx: AttentionContext): Tensor {
    const layers = [...this.decoder.layers];
    const n = this.recomputeGroup;
    if (n === 1) return layers.reduce((h, layer) => layer.forward(h, ctx), x);
    let h = x;
    for (let i = 0; i < layers.length; i += n) {
      const group = layers.slice(i, i + n);
      h = checkpointWithContext((xx, c) => group.reduce((y, layer) => layer.forward(y, c), xx), h, ctx);
    }
    return h;
  }

  /** Frees the parameters, buffers and the rotary tables cached per device. */
  override dispose(): void {
    this.rotary.dispose();
    super.dispose();
  }

  /** [b, s] of this forward: from the token ids, or from the received hidden states [s, b, h]. */
  private batchShape(ids: Tensor | null, hidden: Tensor | null): [number, number] {
    if (ids) {
      if (ids.ndim !== 2)
        throw new ModelError('SHAPE_MISMATCH', `input ids must be [batch, seq], got [${ids.shape}]`);
      if (ids.dtype !== 'int32' && ids.dtype !== 'int64') {
        throw new ModelError('INVALID_INPUT', `input ids must be int32 or int64, got ${ids.dtype}`);
      }
    }
    if (this.preProcess) {
      if (!ids) throw new ModelError('INVALID_INPUT', 'the first pipeline stage needs the token ids');
      return [ids.shape[0], ids.shape[1]];
    }
    if (!hidden) {
      throw new ModelError(
        'INVALID_INPUT',
        `pipeline stage ${this.stage.ppRank} (virtual ${this.stage.vpStage}) needs the previous stage's hidden states: pass opts.hiddenStates or call setInputTensor`,
      );
    }
    const h = this.config.hiddenSize;
    if (hidden.ndim !== 3 || hidden.shape[2] !== h) {
      throw new ModelError(
        'SHAPE_MISMATCH',
        `hidden states must be [seq, batch, ${h}], got [${hidden.shape}]`,
      );
    }
    const s = hidden.shape[0] * (this.sequenceParallel ? this.tpGroup.size : 1);
    const b = hidden.shape[1];
    if (ids && (ids.shape[0] !== b || ids.shape[1] !== s)) {
      throw new ModelError(
        'SHAPE_MISMATCH',
        `input ids [${ids.shape}] do not match the hidden states [${hidden.shape}] (batch ${b}, sequence ${s})`,
      );
    }
    return [b, s];
  }

  /**
   * ids [b, s] -> [s, b, h] (or [s/tp, b, h] under sequence parallelism), with the embedding
   * dropout of layer `layer`'s key (0: the model's embedding; an MTP block's number for its own).
   */
  private embed(ids: Tensor, dropout: LayoutDropout | null = null, layer = 0): Tensor {
    if (!this.embedding) throw new ModelError('INVALID_INPUT', 'this pipeline stage holds no embedding');
    let e = this.embedding.wordEmbeddings.forward(ids);
    const scale = this.family.embeddingMultiplier?.(this.config.hiddenSize);
    // HF rounds the multiplier to the activation dtype first (a bf16 √hidden is not exact)
    if (scale !== undefined) e = e.mul(full([], scale, { dtype: e.dtype }));
    const x = this.sequenceParallel ? e : e.transpose(0, 1).contiguous();
    return dropout ? dropout.hidden(x, layer, 'embedding') : x;
  }

  /**
   * This forward's dropout (null in evaluation mode or with both rates 0): the keys given, else the
   * default generator's seed and fresh row ids from its stream; each token's place in its row.
   */
  private dropoutOf(
    b: number,
    s: number,
    cp: ProcessGroup | null,
    cuSeqlens: readonly number[] | null,
    keys: DropoutKeys | undefined,
  ): LayoutDropout | null {
    if (!this.training || (this.hiddenDropout === 0 && this.attentionDropout === 0)) return null;
    let k = keys;
    if (!k) {
      const first = Number(defaultGenerator.advance(4 * b)); // b counter blocks: b fresh row ids
      k = { seed: defaultGenerator.initialSeed(), rowIds: Array.from({ length: b }, (_, i) => first + i) };
    }
    if (k.rowIds.length !== b || !k.rowIds.every((r) => Number.isSafeInteger(r) && r >= 0)) {
      throw new ModelError(
        'INVALID_INPUT',
        `dropout.rowIds must give a non-negative integer id to each of the ${b} rows, got [${k.rowIds.slice(0, 8)}${k.rowIds.length > 8 ? ', ...' : ''}] (${k.rowIds.length})`,
      );
    }
    const slots = tokenSlots(s, cp ? { rank: cp.rank, size: cp.size } : null, cp ? cuSeqlens : null);
    const sp = this.sequenceParallel
      ? { rank: this.tpGroup.rank, size: this.tpGroup.size }
      : { rank: 0, size: 1 };
    return new LayoutDropout(this.hiddenDropout, this.attentionDropout, k, slots, sp, s * (cp ? cp.size : 1));
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

  /**
   * Megatron's MTP: per depth k, the masked mean loss of predicting the token k + 1 ahead (ids,
   * labels and mask shifted k times within each sequence or packed sample; see mtp-targets.ts).
   */
  private mtpLosses(
    ids: Tensor,
    labels: Tensor,
    lossMask: Tensor | null,
    hidden: Tensor,
    ctx: AttentionContext,
  ): Tensor[] {
    const mtp = this.mtp as Module & { layers: ModuleList<MultiTokenPredictionLayer> };
    const targets = mtpTargets(
      {
        ids,
        labels,
        lossMask,
        cuSeqlens: ctx.cuSeqlens,
        cuSeqlensValues: ctx.cuSeqlensValues,
        cpGroup: ctx.cpGroup,
      },
      mtp.layers.length,
    );
    const out: Tensor[] = [];
    let h = hidden;
    for (const [k, layer] of [...mtp.layers].entries()) {
      const t = targets[k];
      // Megatron hands each block the previous one's normalised output (the decoder's final norm first).
      const embedded = this.embed(t.ids, ctx.dropout, layer.transformerLayer.layerNumber);
      h = layer.finalLayernorm.forward(layer.forward(embedded, h, ctx));
      const logits = (this.outputLayer as ColumnParallelLinear).forward(h, this.outputWeight()).output;
      const perToken = this.lossOf(logits, t.labels); // [b, s]
      out.push(perToken.mul(t.mask).sum().div(t.count.clamp(1)));
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

/** The pipeline stages of `config` for the pipeline size and uneven-stage options. */
function buildPipeline(config: TransformerConfig, ppGroup: ProcessGroup, o: GPTModelOptions): PipelineStages {
  const pp = o.pipelineModelParallelSize ?? ppGroup.size;
  if (ppGroup.size > 1 && pp !== ppGroup.size) {
    throw new ModelError(
      'INVALID_CONFIG',
      `pipelineModelParallelSize ${pp} differs from the pipeline group's size ${ppGroup.size}`,
    );
  }
  const vpp =
    o.vpp ??
    (modelParallelIsInitialized() && o.pipelineModelParallelLayout === undefined
      ? (getVirtualPipelineModelParallelWorldSize() ?? undefined)
      : undefined);
  try {
    return pipelineStages({
      numLayers: config.numLayers,
      mtpNumLayers: config.mtpNumLayers,
      pp,
      vpp,
      decoderFirstPipelineNumLayers: o.decoderFirstPipelineNumLayers,
      decoderLastPipelineNumLayers: o.decoderLastPipelineNumLayers,
      pipelineModelParallelLayout: o.pipelineModelParallelLayout,
    });
  } catch (e) {
    throw new ModelError('INVALID_CONFIG', (e as Error).message);
  }
}

/** The stage at (ppRank, vpStage), default this rank of the pipeline group and virtual stage 0. */
function stageOf(
  pipeline: PipelineStages,
  ppGroup: ProcessGroup,
  at: GPTModelOptions['pipelineStage'],
): PipelineStage {
  const ppRank = at?.ppRank ?? (ppGroup.size > 1 ? ppGroup.rank : 0);
  const vpStage = at?.vpStage ?? 0;
  if (!Number.isInteger(ppRank) || ppRank < 0 || ppRank >= pipeline.pp) {
    throw new ModelError('INVALID_ARGUMENT', `pipeline rank ${ppRank} is outside 0 .. ${pipeline.pp - 1}`);
  }
  if (!Number.isInteger(vpStage) || vpStage < 0 || vpStage >= pipeline.vpp) {
    throw new ModelError('INVALID_ARGUMENT', `virtual stage ${vpStage} is outside 0 .. ${pipeline.vpp - 1}`);
  }
  return pipeline.stages[vpStage * pipeline.pp + ppRank];
}

/**
 * Checks that every id lies in [0, vocab): at once for ids in host memory; for ids on an
 * asynchronous device (a GPU) as a deferred check, so the forward does not wait for the device.
 */
function checkIds(ids: Tensor, vocab: number, what: string): void {
  if (deferRangeCheck(ids, vocab, (x, i) => idsMessage(what, x, i, ids.shape[ids.ndim - 1], vocab))) return;
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

function idsMessage(what: string, x: number, i: number, s: number, vocab: number): string {
  return `${what}: token id ${x} at [${Math.floor(i / s)}, ${i % s}] is outside the vocabulary [0, ${vocab})`;
}

function positionMessage(p: number, max: number): string {
  return `position ${p} is outside the model's ${max} positions (maxPositionEmbeddings); shorten the sequence`;
}

/**
 * Checks the given position ids [b, s] against [0, max) and returns the rotary rows they need:
 * for positions in host memory their largest + 1; for positions on an asynchronous device (the
 * trainer's batches on a GPU) null (all `max` rows), with the range check deferred to the
 * device's next read.
 */
function checkPositions(pos: Tensor, b: number, s: number, max: number): number | null {
  if (pos.ndim !== 2 || (pos.shape[0] !== b && pos.shape[0] !== 1) || pos.shape[1] !== s) {
    throw new ModelError(
      'SHAPE_MISMATCH',
      `position ids must be [${b}, ${s}] (or [1, ${s}]: the same for every row), got [${pos.shape}]`,
    );
  }
  if (deferRangeCheck(pos, max, (p) => positionMessage(p, max))) return null;
  const v = pos.toTypedArray() as ArrayLike<number | bigint>;
  let top = 0;
  for (let i = 0; i < v.length; i++) {
    const p = Number(v[i]);
    if (p >= max || p < 0) throw new ModelError('INVALID_INPUT', positionMessage(p, max));
    if (p + 1 > top) top = p + 1;
  }
  return top;
}

/**
 * For integer `t` on an asynchronous device: queues the check that every element lies in
 * [0, limit) (the smallest and the largest element with their flat indices, read at the device's
 * next synchronisation; `message(value, index)` names the first offender) and returns true.
 * Returns false for tensors in host memory, which the caller reads at no cost.
 */
function deferRangeCheck(
  t: Tensor,
  limit: number,
  message: (value: number, index: number) => string,
): boolean {
  if (t.backend.synchronous !== false || t.numel === 0) return false;
  const values = noGrad(() =>
    tidy(() => {
      const flat = t.reshape(t.numel);
      const lo = flat.min(0);
      const hi = flat.max(0);
      // concatenated as int64 (ids of int32 widened), then one cast to what deferCheck reads
      return keep(
        cat([lo.values, lo.indices, hi.values, hi.indices].map((x) => x.to('int64').reshape(1))).to(
          'float64',
        ),
      );
    }),
  );
  deferCheck(values, ([lo, loAt, hi, hiAt]) => {
    if (lo < 0) return new ModelError('INVALID_INPUT', message(lo, loAt));
    if (hi >= limit) return new ModelError('INVALID_INPUT', message(hi, hiAt));
    return null;
  });
  return true;
}

/**
 * The positions [1, s] (int64) of one row packed at the boundaries cu, where cu lives: position i
 * is i less the last boundary at or before it (a cumsum of marks at the boundaries counts them up
 * to i, empty samples included), 0 before the first boundary and from the last one on, as the
 * host's loop leaves them (a bad cuSeqlens is then reported by attention's own check).
 * @internal (exported for its test)
 */
export function packedPositionsOnDevice(cu: Tensor, s: number): Tensor {
  return noGrad(() =>
    tidy(() => {
      const int64 = { dtype: 'int64' as const, device: cu.device };
      const c = cu.to(cu.device, 'int64');
      const n = c.shape[0];
      const marks = scatterAdd(zeros([s + 1], int64), 0, c.clamp(0, s), ones([n], int64));
      const seg = cumsum(marks, 0)
        .narrow(0, 0, s)
        .sub(1)
        .clamp(0, n - 1); // [s]
      const i = arange(0, s, 1, int64);
      const inside = logicalAnd(i.ge(c.narrow(0, 0, 1)), i.lt(c.narrow(0, n - 1, 1)));
      return where(inside, i.sub(c.gather(0, seg)), 0).view(1, s);
    }),
  );
}

/** A forward's packed boundaries: the tensor the kernels read, and the host's numbers when known. */
interface PackedBoundaries {
  tensor: Tensor;
  values: readonly number[] | null;
  /** The copy to the device of boundaries given as numbers (freed after the forward). */
  owned: Tensor | null;
}

/**
 * The boundaries of a packed forward of s tokens: numbers are checked here and copied to the
 * device of `like`; a tensor is read back only when the host needs its values (context parallelism).
 */
function packedBoundaries(
  cu: Tensor | readonly number[] | null,
  s: number,
  needValues: boolean,
  like: Tensor | null,
): PackedBoundaries | null {
  if (cu === null) return null;
  if (!Array.isArray(cu)) {
    const t = cu as Tensor;
    if (!needValues) return { tensor: t, values: null, owned: null };
    if ((t.dtype !== 'int32' && t.dtype !== 'int64') || t.ndim !== 1) {
      throw new ModelError(
        'INVALID_INPUT',
        `cuSeqlens must be int32 or int64 [nseq + 1], got ${t.dtype} [${t.shape}]`,
      );
    }
    return {
      tensor: t,
      values: checkBoundaries(Array.from(t.toTypedArray() as ArrayLike<number | bigint>, Number), s),
      owned: null,
    };
  }
  const values = checkBoundaries(cu as readonly number[], s);
  const owned = fromTypedArray(Int32Array.from(values), [values.length], like ? { device: like.device } : {});
  return { tensor: owned, values, owned };
}

/** Boundaries [0, …, s]: non-decreasing integers, checked on the host. */
function checkBoundaries(cu: readonly number[], s: number): number[] {
  const bad = (why: string) =>
    new ModelError(
      'INVALID_INPUT',
      `cuSeqlens ${why} (got [${cu.slice(0, 8).join(', ')}${cu.length > 8 ? ', …' : ''}])`,
    );
  if (cu.length < 2 || cu[0] !== 0) throw bad('must start at 0 and hold at least 2 entries');
  for (let i = 1; i < cu.length; i++) {
    if (!Number.isInteger(cu[i]) || cu[i] < cu[i - 1]) {
      throw bad(`must be non-decreasing integers: ${cu[i - 1]} then ${cu[i]} at index ${i}`);
    }
  }
  if (cu[cu.length - 1] !== s) throw bad(`must end at the row's ${s} tokens, not ${cu[cu.length - 1]}`);
  return [...cu];
}

/**
 * The positions [b, s] (int64) of the last s keys of left-padded rows, where the mask [b, sk]
 * (true = a real token) is: a real token's is the count of real tokens before it, padding's 0.
 * @internal (exported for its test)
 */
export function leftPaddedPositionsOnDevice(attn: Tensor, s: number): Tensor {
  return noGrad(() =>
    tidy(() => {
      const sk = attn.shape[1];
      const real = (attn.dtype === 'bool' ? attn : attn.ne(0)).to('int64');
      const before = cumsum(real, 1).sub(1);
      return where(real.ne(0), before, 0)
        .narrow(1, sk - s, s)
        .contiguous();
    }),
  );
}

/** Positions 0.. per row after `past` cached tokens (skipping padding), or per packed sample. */
function defaultPositions(
  b: number,
  s: number,
  past: number,
  packed: PackedBoundaries | null,
  attn: Tensor | null,
  max: number,
): { ids: Tensor; rows: number | null } {
  const cu = packed?.tensor ?? null;
  // packed rows on an asynchronous device: made where cuSeqlens lives (no read back); rows null
  if (cu && !packed?.values && cu.backend.synchronous === false) {
    return { ids: packedPositionsOnDevice(cu, s), rows: null };
  }
  const out = new BigInt64Array(b * s);
  // made here: checked on the host, and their rotary rows known without reading them back
  const done = (shape: number[], n = out.length) => {
    let top = 0;
    for (let i = 0; i < n; i++) {
      const p = Number(out[i]);
      if (p >= max) throw new ModelError('INVALID_INPUT', positionMessage(p, max));
      if (p + 1 > top) top = p + 1;
    }
    return { ids: fromTypedArray(n === out.length ? out : out.subarray(0, n), shape), rows: top };
  };
  if (cu) {
    const bounds = packed?.values ?? Array.from(cu.toTypedArray() as ArrayLike<number | bigint>, Number);
    for (let j = 0; j + 1 < bounds.length; j++)
      for (let i = bounds[j]; i < bounds[j + 1]; i++) out[i] = BigInt(i - bounds[j]);
    return done([1, s]);
  }
  if (attn && attn.backend.synchronous === false) {
    // on an asynchronous device, where the mask lives: the real tokens up to each one, less one
    return { ids: leftPaddedPositionsOnDevice(attn, s), rows: null };
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
    return done([b, s]);
  }
  // the same positions in every row: one row [1, s], and one rotary table for the batch
  for (let i = 0; i < s; i++) out[i] = BigInt(past + i);
  return done([1, s], s);
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
  // causality and the window on the host, the padding where the attention mask lives (no read back)
  const m = new Uint8Array(s * sk);
  for (let i = 0; i < s; i++) {
    const qi = past + i;
    for (let j = 0; j <= qi; j++) if (w === null || qi - j < w) m[i * sk + j] = 1;
  }
  return noGrad(() =>
    tidy(() => {
      const narrow = fromTypedArray(m, [1, 1, s, sk], attn ? { device: attn.device } : {});
      const causal = narrow.to('bool');
      if (!attn) return causal.expand(b, 1, s, sk).contiguous();
      const real = attn.dtype === 'bool' ? attn : attn.ne(0);
      return logicalAnd(causal, real.view(b, 1, 1, sk));
    }),
  );
}

/** The router's balancing loss, checked (a name from a config file reaches here unchecked). */
function loadBalancingType(t: string | undefined): LoadBalancingType {
  if (t === undefined || t === 'aux_loss' || t === 'seq_aux_loss' || t === 'none') return t ?? 'aux_loss';
  throw new ModelError(
    'INVALID_CONFIG',
    `moeRouterLoadBalancingType ${JSON.stringify(t)} is not implemented; use 'aux_loss', 'seq_aux_loss' or 'none'`,
  );
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
/** The sizes that divide `n` (the valid choices of a parallel size), as `1, 2, 4, 8`. */
function divisors(n: number): string {
  const out: number[] = [];
  for (let d = 1; d <= n && out.length < 12; d++) if (n % d === 0) out.push(d);
  return out.join(', ');
}

function checkLayout(c: TransformerConfig, tp: number, ep: number, etp: number): void {
  const bad = (m: string) => new ModelError('INVALID_CONFIG', m);
  // each check names the valid sizes, so the fix is in the message
  const tpFix = (n: number) => `; use a tensorModelParallelSize that divides ${n} (${divisors(n)})`;
  if (c.numAttentionHeads % tp !== 0)
    throw bad(
      `tp=${tp} does not divide the ${c.numAttentionHeads} attention heads${tpFix(c.numAttentionHeads)}`,
    );
  if (!c.mla && c.numQueryGroups % tp !== 0)
    throw bad(`tp=${tp} does not divide the ${c.numQueryGroups} query groups${tpFix(c.numQueryGroups)}`);
  if (c.ffnHiddenSize % tp !== 0)
    throw bad(`tp=${tp} does not divide ffnHiddenSize ${c.ffnHiddenSize}${tpFix(c.ffnHiddenSize)}`);
  if (c.moe && c.moe.numExperts % ep !== 0) {
    throw bad(
      `ep=${ep} does not divide the ${c.moe.numExperts} experts; use an expertModelParallelSize that divides ${c.moe.numExperts} (${divisors(c.moe.numExperts)})`,
    );
  }
  if (!c.moe && ep > 1)
    throw bad(`ep=${ep} needs a MoE model; this one is dense (set expertModelParallelSize 1)`);
  if (c.moe && c.moe.moeFfnHiddenSize % etp !== 0) {
    throw bad(
      `etp=${etp} (expert-TP) does not divide moeFfnHiddenSize ${c.moe.moeFfnHiddenSize}; use an expertTensorParallelSize that divides it (${divisors(c.moe.moeFfnHiddenSize)})`,
    );
  }
  if (c.moe && c.moe.sharedExpertIntermediateSize % tp !== 0) {
    throw bad(
      `tp=${tp} does not divide sharedExpertIntermediateSize ${c.moe.sharedExpertIntermediateSize}${tpFix(c.moe.sharedExpertIntermediateSize)}`,
    );
  }
  if (c.mtpNumLayers > 0 && c.hiddenSize % tp !== 0) {
    throw bad(
      `tp=${tp} does not divide hiddenSize ${c.hiddenSize} (the MTP eh_proj is split over TP)${tpFix(c.hiddenSize)}`,
    );
  }
}
