// Megatron's tensor-parallel layers: column- and row-parallel linears, Transformer Engine's fused
// LayerNorm + column-parallel linear, and the vocabulary-parallel embedding. Weights are
// initialised as Megatron's CPU path does it: the full master weight is drawn on every rank from
// the same generator and each rank keeps its shard (taken with the converter's split rules), so a
// TP=n layer holds exact slices of the TP=1 layer built with the same seed.

import { paddedVocab } from '@megapatch/convert';
import {
  type DType,
  embedding,
  empty,
  type Generator,
  type InitMethod,
  initMethodNormal,
  layerNorm,
  linear,
  linearResidual,
  logicalOr,
  Module,
  maskedFill,
  noGrad,
  ones,
  rmsNorm,
  type Tensor,
  tidy,
  where,
  zeros,
} from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import type { ProcessGroup } from '../process-group.js';
import { setSequenceParallelAttribute, setTensorModelParallelAttributes } from './attributes.js';
import {
  copyToTensorModelParallelRegion,
  gatherFromSequenceParallelRegion,
  gatherFromTensorModelParallelRegion,
  reduceFromTensorModelParallelRegion,
  reduceScatterToSequenceParallelRegion,
  resolveTpGroup,
  scatterToTensorModelParallelRegion,
} from './mappings.js';
import { type QkvDims, shardOf } from './sharding.js';

/** What a parallel linear returns: the output and, with skipBiasAdd, the bias left for the caller to add. */
export interface LinearOutput {
  output: Tensor;
  bias: Tensor | null;
}

/** Options shared by the parallel linears. */
export interface ParallelLinearOptions {
  /** Learn an additive bias, initialised to zero (default true). */
  bias?: boolean;
  /** Return the bias instead of adding it, so the caller can fuse it with what follows (default false). */
  skipBiasAdd?: boolean;
  /** Activations outside the layer are split along the sequence (dim 0) across TP ranks (default false). */
  sequenceParallel?: boolean;
  /** Initialises the full master weight (default Megatron's init_method_normal(0.02)). */
  initMethod?: InitMethod;
  /** Parameter dtype (default float32); the master weight is drawn in float32 and cast. */
  dtype?: DType;
  /** Tensor-parallel group (default: the parallel state's). */
  tpGroup?: ProcessGroup;
  /** Generator of the master weight (default: the default generator, seeded alike on every rank). */
  generator?: Generator;
  /**
   * Draw the master weight (default true). False allocates the shard filled with zeros and draws
   * nothing, as Megatron's `perform_initialization=False`: for weights about to be loaded.
   */
  performInitialization?: boolean;
}

/** How a column-parallel weight is cut: evenly, by whole query groups, or as [gate_r; up_r]. */
export type ColumnPartition = 'split0' | 'qkv' | 'gate_up';

/** Options of {@link ColumnParallelLinear}. */
export interface ColumnParallelLinearOptions extends ParallelLinearOptions {
  /**
   * All-gather the output so every rank holds [*, outputSize] (default false): the ranks' outputs
   * concatenated in rank order, which for 'gate_up' is [gate_0, up_0, gate_1, up_1, ...].
   */
  gatherOutput?: boolean;
  /** Layout of the output dimension (default 'split0'). */
  partition?: ColumnPartition;
  /** Head geometry, required by partition 'qkv'. */
  qkvDims?: QkvDims;
  /** Allocate no weight: forward takes it as an argument (a tied output layer). */
  skipWeightParamAllocation?: boolean;
}

/** Options of {@link RowParallelLinear}. */
export interface RowParallelLinearOptions extends ParallelLinearOptions {
  /** The input is already split along its last dim across TP ranks (default false). */
  inputIsParallel?: boolean;
}

const DEFAULT_INIT: InitMethod = initMethodNormal(0.02);

function fail(message: string): never {
  throw new DistributedError('INVALID_ARGUMENT', message);
}

function checkSize(where: string, what: string, n: number): void {
  if (!Number.isInteger(n) || n <= 0) fail(`${where}: ${what} must be a positive integer, got ${n}`);
}

/** Checks that a column-parallel output dimension can be cut `tp` ways under `partition`. */
function checkColumnPartition(
  where: string,
  outputSize: number,
  partition: ColumnPartition,
  tp: number,
  qkvDims?: QkvDims,
): void {
  if (partition === 'qkv') {
    if (!qkvDims) fail(`${where}: partition 'qkv' needs qkvDims {numHeads, numQueryGroups, headDim}`);
    const { numHeads, numQueryGroups, headDim } = qkvDims;
    if ((numHeads + 2 * numQueryGroups) * headDim !== outputSize) {
      fail(
        `${where}: outputSize ${outputSize} is not (numHeads ${numHeads} + 2 × numQueryGroups ${numQueryGroups}) × headDim ${headDim}`,
      );
    }
    if (numQueryGroups % tp !== 0)
      fail(`${where}: numQueryGroups ${numQueryGroups} is not divisible by the TP size ${tp}`);
  } else if (partition === 'gate_up') {
    if (outputSize % (2 * tp) !== 0)
      fail(`${where}: outputSize ${outputSize} = 2 × ffn needs ffn divisible by the TP size ${tp}`);
  } else if (partition === 'split0') {
    if (outputSize % tp !== 0)
      fail(`${where}: outputSize ${outputSize} is not divisible by the TP size ${tp}`);
  } else {
    fail(`${where}: partition must be 'split0', 'qkv' or 'gate_up', got ${String(partition)}`);
  }
}

/**
 * This rank's shard of a master weight of `shape`, drawn in float32 with `init` and cast to
 * `dtype` before it is cut (as Megatron's _initialize_affine_weight_cpu).
 */
function initShard(
  shape: [number, number],
  partition: 'split0' | 'split1' | 'qkv' | 'gate_up',
  group: ProcessGroup,
  opts: {
    initMethod?: InitMethod;
    generator?: Generator;
    dtype?: DType;
    qkvDims?: QkvDims;
    performInitialization?: boolean;
  },
): Tensor {
  if (opts.performInitialization === false) {
    const local: [number, number] =
      partition === 'split1' ? [shape[0], shape[1] / group.size] : [shape[0] / group.size, shape[1]];
    return zeros(local, { dtype: opts.dtype ?? 'float32' });
  }
  return tidy(() =>
    noGrad(() => {
      const master = empty(shape, { dtype: 'float32' });
      (opts.initMethod ?? DEFAULT_INIT)(master, opts.generator);
      const cast = master.to(opts.dtype ?? 'float32');
      // one rank's shard is the whole weight: no trip through host memory (a GPU's weights would
      // be read back, split and copied again)
      if (group.size === 1) return cast;
      return shardOf(cast, partition, { tp: group.size, rank: group.rank, qkvDims: opts.qkvDims });
    }),
  );
}

/** Marks a parameter that every TP rank holds in full. */
function replicated(p: Tensor, sequenceParallel: boolean): Tensor {
  setTensorModelParallelAttributes(p, false, -1);
  if (sequenceParallel) setSequenceParallelAttribute(p);
  return p;
}

/** The column-parallel weight and bias of a module, registered as 'weight' and 'bias'. */
function registerColumnParams(
  m: Module,
  where: string,
  inputSize: number,
  outputSize: number,
  group: ProcessGroup,
  opts: ColumnParallelLinearOptions,
): { weight: Tensor | null; bias: Tensor | null } {
  checkSize(where, 'inputSize', inputSize);
  checkSize(where, 'outputSize', outputSize);
  const partition = opts.partition ?? 'split0';
  checkColumnPartition(where, outputSize, partition, group.size, opts.qkvDims);
  const local = outputSize / group.size;
  const weight = opts.skipWeightParamAllocation
    ? m.registerParameter('weight', null)
    : m.registerParameter('weight', initShard([outputSize, inputSize], partition, group, opts));
  if (weight) setTensorModelParallelAttributes(weight, true, 0);
  const bias = m.registerParameter(
    'bias',
    opts.bias === false ? null : zeros([local], { dtype: opts.dtype ?? 'float32' }),
  );
  if (bias) setTensorModelParallelAttributes(bias, true, 0);
  return { weight, bias };
}

/** The column-parallel matmul on an input already normalised (or not): [s, b, in] -> [s, b, out/tp]. */
function columnForward(
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  group: ProcessGroup,
  sequenceParallel: boolean,
  skipBiasAdd: boolean,
): Tensor {
  // Under SP the input arrives as a sequence shard and is all-gathered here (its gradient is
  // reduce-scattered back); otherwise it is replicated and its gradient is all-reduced.
  const input = sequenceParallel
    ? gatherFromSequenceParallelRegion(x, true, group)
    : copyToTensorModelParallelRegion(x, group);
  return linear(input, weight, skipBiasAdd ? null : bias);
}

/**
 * Y = X A + b with A split along its output dimension: weight [outputSize/tp, inputSize] (rank
 * r's rows of the master weight under `partition`), bias [outputSize/tp]. Input [s, b, inputSize]
 * (under sequence parallelism [s/tp, b, inputSize]); output [s, b, outputSize/tp], or
 * [s, b, outputSize] with gatherOutput.
 */
export class ColumnParallelLinear extends Module {
  readonly inputSize: number;
  readonly outputSize: number;
  readonly outputSizePerPartition: number;
  readonly partition: ColumnPartition;
  readonly gatherOutput: boolean;
  readonly skipBiasAdd: boolean;
  readonly sequenceParallel: boolean;
  readonly tpGroup: ProcessGroup;
  readonly weight: Tensor | null;
  readonly bias: Tensor | null;

  constructor(inputSize: number, outputSize: number, opts: ColumnParallelLinearOptions = {}) {
    super();
    this.tpGroup = resolveTpGroup(opts.tpGroup);
    this.inputSize = inputSize;
    this.outputSize = outputSize;
    this.partition = opts.partition ?? 'split0';
    this.gatherOutput = opts.gatherOutput ?? false;
    this.skipBiasAdd = opts.skipBiasAdd ?? false;
    this.sequenceParallel = opts.sequenceParallel ?? false;
    const { weight, bias } = registerColumnParams(
      this,
      'ColumnParallelLinear',
      inputSize,
      outputSize,
      this.tpGroup,
      opts,
    );
    this.outputSizePerPartition = outputSize / this.tpGroup.size;
    this.weight = weight;
    this.bias = bias;
  }

  /** x [s, b, inputSize] (or [s/tp, b, inputSize] under SP); `weight` replaces the layer's own (required without one). */
  forward(x: Tensor, weight?: Tensor): LinearOutput {
    const w = weight ?? this.weight;
    if (!w)
      fail('ColumnParallelLinear.forward: the layer has no weight (skipWeightParamAllocation); pass one');
    const want = [this.outputSizePerPartition, this.inputSize];
    if (w.ndim !== 2 || w.shape[0] !== want[0] || w.shape[1] !== want[1]) {
      fail(`ColumnParallelLinear.forward: weight is [${w.shape}], expected [${want}]`);
    }
    const output = tidy(() => {
      const y = columnForward(x, w, this.bias, this.tpGroup, this.sequenceParallel, this.skipBiasAdd);
      return this.gatherOutput ? gatherFromTensorModelParallelRegion(y, this.tpGroup) : y;
    });
    return { output, bias: this.skipBiasAdd ? this.bias : null };
  }
}

/**
 * Y = X A + b with A split along its input dimension: weight [outputSize, inputSize/tp], bias
 * [outputSize] (not split, added after the reduction). Input [s, b, inputSize/tp] with
 * inputIsParallel, else [s, b, inputSize] (scattered here); output [s, b, outputSize], all-reduced,
 * or reduce-scattered to [s/tp, b, outputSize] under sequence parallelism.
 */
export class RowParallelLinear extends Module {
  readonly inputSize: number;
  readonly outputSize: number;
  readonly inputSizePerPartition: number;
  readonly inputIsParallel: boolean;
  readonly skipBiasAdd: boolean;
  readonly sequenceParallel: boolean;
  readonly tpGroup: ProcessGroup;
  readonly weight: Tensor;
  readonly bias: Tensor | null;

  constructor(inputSize: number, outputSize: number, opts: RowParallelLinearOptions = {}) {
    super();
    const where = 'RowParallelLinear';
    this.tpGroup = resolveTpGroup(opts.tpGroup);
    checkSize(where, 'inputSize', inputSize);
    checkSize(where, 'outputSize', outputSize);
    const tp = this.tpGroup.size;
    if (inputSize % tp !== 0) fail(`${where}: inputSize ${inputSize} is not divisible by the TP size ${tp}`);
    this.inputSize = inputSize;
    this.outputSize = outputSize;
    this.inputSizePerPartition = inputSize / tp;
    this.inputIsParallel = opts.inputIsParallel ?? false;
    this.skipBiasAdd = opts.skipBiasAdd ?? false;
    this.sequenceParallel = opts.sequenceParallel ?? false;
    if (this.sequenceParallel && !this.inputIsParallel) {
      fail(`${where}: sequenceParallel needs inputIsParallel (the input must already be split)`);
    }
    this.weight = this.registerParameter(
      'weight',
      initShard([outputSize, inputSize], 'split1', this.tpGroup, opts),
    );
    setTensorModelParallelAttributes(this.weight, true, 1);
    const bias = opts.bias === false ? null : zeros([outputSize], { dtype: opts.dtype ?? 'float32' });
    // Under SP the bias is added to a sequence shard, so its gradient is partial on each rank.
    this.bias = this.registerParameter('bias', bias && replicated(bias, this.sequenceParallel));
  }

  /**
   * x [s, b, inputSize/tp] (inputIsParallel) or [s, b, inputSize]. With `residual` (the output's
   * shape: a transformer layer's residual stream) the output is residual + the layer's output; on
   * one TP rank without a bias to add, the residual goes into the GEMM itself where the backend has
   * its own linearResidual kernel (CUDA: cuBLASLt's C, one rounding; else linear then add).
   */
  forward(x: Tensor, residual?: Tensor): LinearOutput {
    const output = tidy(() => {
      const input = this.inputIsParallel ? x : scatterToTensorModelParallelRegion(x, this.tpGroup);
      const addsBias = this.bias !== null && !this.skipBiasAdd;
      if (residual && this.tpGroup.size === 1 && !addsBias)
        return linearResidual(input, this.weight, residual);
      const partial = linear(input, this.weight);
      const reduced = this.sequenceParallel
        ? reduceScatterToSequenceParallelRegion(partial, this.tpGroup)
        : reduceFromTensorModelParallelRegion(partial, this.tpGroup);
      const biased = addsBias ? reduced.add(this.bias as Tensor) : reduced;
      return residual ? residual.add(biased) : biased;
    });
    return { output, bias: this.skipBiasAdd ? this.bias : null };
  }
}

/** Options of {@link LayerNormColumnParallelLinear}. */
export interface LayerNormColumnParallelLinearOptions
  extends Omit<ColumnParallelLinearOptions, 'gatherOutput'> {
  /** Normalisation before the linear (default 'LayerNorm', as Megatron's config). */
  normalization?: 'RMSNorm' | 'LayerNorm';
  /** Added to the variance (default 1e-5). */
  eps?: number;
  /**
   * Transformer Engine's zero_centered_gamma: the norm scales by (1 + layer_norm_weight), whose
   * stored value starts at zero (Gemma's RMSNorm). Default false.
   */
  zeroCenteredGamma?: boolean;
}

/**
 * Transformer Engine's LayerNormLinear in column-parallel mode (the `linear_qkv` and `linear_fc1`
 * of the TE layer spec): norm(x) then a column-parallel linear. Parameters `layer_norm_weight`
 * (ones), `layer_norm_bias` (zeros, LayerNorm only), `weight`, `bias`. Under sequence
 * parallelism the norm runs on the sequence shard and the all-gather follows it, so the norm
 * parameters get partial gradients: call allreduceSequenceParallelGrads after backward.
 */
export class LayerNormColumnParallelLinear extends Module {
  readonly inputSize: number;
  readonly outputSize: number;
  readonly outputSizePerPartition: number;
  readonly partition: ColumnPartition;
  readonly normalization: 'RMSNorm' | 'LayerNorm';
  readonly eps: number;
  readonly skipBiasAdd: boolean;
  readonly sequenceParallel: boolean;
  readonly tpGroup: ProcessGroup;
  readonly layerNormWeight: Tensor;
  readonly layerNormBias: Tensor | null;
  readonly weight: Tensor | null;
  readonly bias: Tensor | null;
  readonly zeroCenteredGamma: boolean;

  constructor(inputSize: number, outputSize: number, opts: LayerNormColumnParallelLinearOptions = {}) {
    super();
    const where = 'LayerNormColumnParallelLinear';
    this.tpGroup = resolveTpGroup(opts.tpGroup);
    checkSize(where, 'inputSize', inputSize);
    this.inputSize = inputSize;
    this.outputSize = outputSize;
    this.partition = opts.partition ?? 'split0';
    this.normalization = opts.normalization ?? 'LayerNorm';
    if (this.normalization !== 'LayerNorm' && this.normalization !== 'RMSNorm') {
      fail(`${where}: normalization must be 'LayerNorm' or 'RMSNorm', got ${String(this.normalization)}`);
    }
    this.eps = opts.eps ?? 1e-5;
    this.skipBiasAdd = opts.skipBiasAdd ?? false;
    this.sequenceParallel = opts.sequenceParallel ?? false;
    const dtype = opts.dtype ?? 'float32';
    this.zeroCenteredGamma = opts.zeroCenteredGamma ?? false;
    this.layerNormWeight = this.registerParameter(
      'layer_norm_weight',
      replicated((this.zeroCenteredGamma ? zeros : ones)([inputSize], { dtype }), this.sequenceParallel),
    );
    this.layerNormBias = this.registerParameter(
      'layer_norm_bias',
      this.normalization === 'LayerNorm'
        ? replicated(zeros([inputSize], { dtype }), this.sequenceParallel)
        : null,
    );
    const { weight, bias } = registerColumnParams(this, where, inputSize, outputSize, this.tpGroup, opts);
    this.outputSizePerPartition = outputSize / this.tpGroup.size;
    this.weight = weight;
    this.bias = bias;
  }

  /** The norm's scale: the weight, or 1 + weight with zeroCenteredGamma. */
  private gamma(): Tensor {
    return this.zeroCenteredGamma ? this.layerNormWeight.add(1) : this.layerNormWeight;
  }

  /** x [s, b, inputSize] (or [s/tp, b, inputSize] under SP) -> [s, b, outputSize/tp]. */
  forward(x: Tensor, weight?: Tensor): LinearOutput {
    const w = weight ?? this.weight;
    if (!w) fail('LayerNormColumnParallelLinear.forward: the layer has no weight; pass one');
    const output = tidy(() => {
      const normed =
        this.normalization === 'RMSNorm'
          ? rmsNorm(x, [this.inputSize], this.gamma(), this.eps)
          : layerNorm(x, [this.inputSize], this.gamma(), this.layerNormBias, this.eps);
      return columnForward(normed, w, this.bias, this.tpGroup, this.sequenceParallel, this.skipBiasAdd);
    });
    return { output, bias: this.skipBiasAdd ? this.bias : null };
  }
}

/** Megatron's padded vocabulary: `vocab` rounded up to a multiple of makeVocabSizeDivisibleBy × tp. */
export function padVocabSize(vocab: number, makeVocabSizeDivisibleBy = 128, tp = 1): number {
  return paddedVocab(vocab, makeVocabSizeDivisibleBy, tp);
}

/** The vocabulary rows [start, end) of `rank` when `perPartitionVocabSize` rows sit on each rank. */
export function vocabRangeFromPerPartitionVocabSize(
  perPartitionVocabSize: number,
  rank: number,
): [number, number] {
  const start = rank * perPartitionVocabSize;
  return [start, start + perPartitionVocabSize];
}

/** The vocabulary rows [start, end) of `rank` of `worldSize` (the size must divide evenly). */
export function vocabRangeFromGlobalVocabSize(
  globalVocabSize: number,
  rank: number,
  worldSize: number,
): [number, number] {
  if (globalVocabSize % worldSize !== 0) {
    fail(
      `vocabulary of ${globalVocabSize} rows is not divisible by the TP size ${worldSize}; pad it with padVocabSize`,
    );
  }
  return vocabRangeFromPerPartitionVocabSize(globalVocabSize / worldSize, rank);
}

/** Options of {@link VocabParallelEmbedding}. */
export interface VocabParallelEmbeddingOptions {
  /** Reduce-scatter the output along the sequence (sequence parallelism) instead of all-reducing it (default false). */
  reduceScatterEmbeddings?: boolean;
  /** Initialises the full master table (default init_method_normal(0.02)). */
  initMethod?: InitMethod;
  dtype?: DType;
  tpGroup?: ProcessGroup;
  generator?: Generator;
  /** Draw the master table (default true); false leaves zeros, for a table about to be loaded. */
  performInitialization?: boolean;
}

/**
 * An embedding table split along the vocabulary: rank r holds rows [r·V/tp, (r+1)·V/tp) of the
 * padded vocabulary V = numEmbeddings. Ids [b, s] -> [b, s, h] (Megatron's layout; the caller
 * transposes to [s, b, h]); with reduceScatterEmbeddings the output is transposed here and
 * reduce-scattered to [s/tp, b, h].
 */
export class VocabParallelEmbedding extends Module {
  readonly numEmbeddings: number;
  readonly embeddingDim: number;
  readonly reduceScatterEmbeddings: boolean;
  readonly vocabStartIndex: number;
  readonly vocabEndIndex: number;
  readonly numEmbeddingsPerPartition: number;
  readonly tpGroup: ProcessGroup;
  readonly weight: Tensor;

  constructor(numEmbeddings: number, embeddingDim: number, opts: VocabParallelEmbeddingOptions = {}) {
    super();
    const where = 'VocabParallelEmbedding';
    checkSize(where, 'numEmbeddings', numEmbeddings);
    checkSize(where, 'embeddingDim', embeddingDim);
    this.tpGroup = resolveTpGroup(opts.tpGroup);
    this.numEmbeddings = numEmbeddings;
    this.embeddingDim = embeddingDim;
    this.reduceScatterEmbeddings = opts.reduceScatterEmbeddings ?? false;
    [this.vocabStartIndex, this.vocabEndIndex] = vocabRangeFromGlobalVocabSize(
      numEmbeddings,
      this.tpGroup.rank,
      this.tpGroup.size,
    );
    this.numEmbeddingsPerPartition = this.vocabEndIndex - this.vocabStartIndex;
    this.weight = this.registerParameter(
      'weight',
      initShard([numEmbeddings, embeddingDim], 'split0', this.tpGroup, opts),
    );
    setTensorModelParallelAttributes(this.weight, true, 0);
  }

  /** Integer ids [b, s] (any shape without reduceScatterEmbeddings) -> [b, s, h], or [s/tp, b, h]. */
  forward(ids: Tensor): Tensor {
    if (this.reduceScatterEmbeddings && ids.ndim !== 2) {
      fail(`VocabParallelEmbedding.forward: reduceScatterEmbeddings needs ids [b, s], got [${ids.shape}]`);
    }
    return tidy(() => {
      let local: Tensor;
      if (this.tpGroup.size > 1) {
        // Ids of other ranks look up row 0 and their rows are zeroed, so the sum over ranks
        // leaves each id's row from the one rank that holds it.
        const outside = logicalOr(ids.lt(this.vocabStartIndex), ids.ge(this.vocabEndIndex));
        const masked = where(outside, 0, ids.sub(this.vocabStartIndex));
        local = maskedFill(embedding(masked, this.weight), outside.unsqueeze(-1), 0);
      } else {
        local = embedding(ids, this.weight);
      }
      if (this.reduceScatterEmbeddings) {
        return reduceScatterToSequenceParallelRegion(local.transpose(0, 1).contiguous(), this.tpGroup);
      }
      return reduceFromTensorModelParallelRegion(local, this.tpGroup);
    });
  }
}
