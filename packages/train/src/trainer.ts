// The training loop with Megatron's semantics: GPTDataset / BlendedDataset samples in Megatron's
// order, micro-batches with gradient accumulation up to the global batch, data parallelism with
// bucketed gradient reduction, AdamW with fp32 masters for bf16 weights (Megatron's parameter
// groups), the learning-rate schedule counted in samples, clipping, MoE aux losses and the
// expert-bias update, periodic evaluation and checkpoints, a Megatron log line and JSONL metrics.
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  convertMegapatchToHf,
  makeTransformerConfig,
  megatronCheckpointDir,
  parseHfConfig,
  type TransformerConfig,
} from '@megapatch/convert';
import {
  BlendedDataset,
  type CollatedBatch,
  DataLoader,
  GPTDataset,
  type GPTSample,
  globalBatchesSync,
  IndexedDataset,
  MegatronPretrainingSampler,
  numMicrobatches,
  parseSplit,
} from '@megapatch/data';
import { GPTModel, getModelFamily, loadModel, openWeights } from '@megapatch/models';
import {
  allreduceEmbeddingGrads,
  contextParallelPlan,
  contextParallelSplit,
  DataParallelOptimizer,
  DistributedDataParallel,
  DistributedOptimizer,
  destroyModelParallel,
  destroyProcessGroup,
  detectEnvironment,
  deviceCollectivesLibrary,
  getContextParallelGroup,
  getDataParallelGroup,
  getExpertDataParallelGroup,
  getForwardBackwardFunc,
  getPipelineModelParallelGroup,
  getTensorModelParallelGroup,
  getWorldGroup,
  initializeModelParallel,
  initProcessGroup,
  isInitialized,
  type ProcessGroup,
  registerSequenceParallelGradHooks,
  SingleProcessGroup,
} from '@megapatch/parallel';
import {
  ConstantGradScaler,
  cat,
  DynamicGradScaler,
  deviceCount,
  fromTypedArray,
  getBackend,
  getDefaultDevice,
  getGradientAccumulationFusion,
  keep,
  Module,
  ModuleList,
  manualSeed,
  memoryStats,
  noGrad,
  OptimizerParamScheduler,
  setDefaultDevice,
  setGradientAccumulationFusion,
  type Tensor,
  tidy,
  zeros,
} from '@megapatch/tensor';
import {
  LATEST_ITERATION_FILE,
  loadTrainingCheckpoint,
  resolveCheckpointIteration,
  saveTrainingCheckpoint,
  type TrainingState,
} from './checkpoint.js';
import { BatchSizeRampup, type RunConfig, trainIterations } from './config.js';
import { checkDpoLayout, trainDpo } from './dpo/dpo.js';
import { TrainError } from './errors.js';
import { numFloatingPointOperations, tflopsPerSecond } from './flops.js';
import { formatTrainingLogLine, formatValidationLogLines } from './log-line.js';
import { checkArchitecture } from './megatron-flags.js';
import { TensorBoardWriter } from './report/tensorboard.js';
import { writeRunReport } from './report/write.js';
import { checkRlLayout, trainGrpo } from './rl/grpo.js';
import { buildSftDataset } from './sft.js';

/** One training iteration's numbers (a line of metrics.jsonl). */
export interface TrainMetrics {
  kind: 'train';
  iteration: number;
  consumedSamples: number;
  /** The iteration's global batch (training.globalBatchSize, or less during a batch-size ramp-up). */
  globalBatchSize: number;
  elapsedMs: number;
  lr: number;
  /** The embedding and output layer's learning rate (optimizer.decoupledLr set). */
  decoupledLr?: number;
  lmLoss: number;
  gradNorm: number | null;
  skippedIterations: number;
  /** The loss scale of the iteration (fp16; 1 otherwise). */
  lossScale: number;
  tokensPerSecond: number;
  tflops: number | null;
  /**
   * Bytes of the run's device: held by live tensors (before the next batch is read), the peak so
   * far, and kept by the caching allocator for reuse (torch's reserved minus allocated).
   */
  memory: { liveBytes: number; peakBytes: number; cachedBytes: number };
  moe?: { auxLoss?: number; zLoss?: number; mtpLoss?: number; expertLoad?: Record<string, number[]> };
  /**
   * Where the iteration's time went, in ms: reading and collating the batch, the forward passes,
   * the backward passes (with the overlapped gradient reductions), and the optimizer step (waiting
   * for the last reductions, the gradient norm, clipping, AdamW); and of the data-parallel gradient
   * reductions, their whole time (`commMs`, mostly overlapped with backward) and the part the step
   * waited for (`exposedCommMs`).
   */
  timers: {
    dataMs: number;
    forwardMs: number;
    backwardMs: number;
    optimizerMs: number;
    commMs: number;
    exposedCommMs: number;
  };
  time: string;
}

/** One evaluation (a line of metrics.jsonl): on the validation data, or the test data at the end. */
export interface ValidMetrics {
  kind: 'valid' | 'test';
  iteration: number;
  consumedSamples: number;
  lmLoss: number;
  perplexity: number;
  time: string;
}

/**
 * The TensorBoard scalars of one metrics line, under the tags Megatron writes (its training_log and
 * evaluate_and_print_results), so dashboards made for Megatron runs read megapatch runs.
 */
export function tensorboardScalars(
  m: TrainMetrics | ValidMetrics,
  globalBatchSize: number,
): Record<string, number | null> {
  if (m.kind !== 'train') {
    // Megatron writes the test evaluation under the validation tags too
    return {
      'lm loss validation': m.lmLoss,
      'lm loss validation ppl': m.perplexity,
    };
  }
  return {
    'learning-rate': m.lr,
    'decoupled-learning-rate': m.decoupledLr ?? null,
    'batch-size': m.globalBatchSize ?? globalBatchSize,
    'lm loss': m.lmLoss,
    'loss-scale': m.lossScale,
    'grad-norm': m.gradNorm,
    'iteration-time': m.elapsedMs / 1000,
    throughput: m.tflops,
    'tokens-per-second': m.tokensPerSecond,
    'mem-allocated-bytes': m.memory.liveBytes,
    'mem-max-allocated-bytes': m.memory.peakBytes,
    'mem-reserved-bytes': m.memory.liveBytes + m.memory.cachedBytes,
    load_balancing_loss: m.moe?.auxLoss ?? null,
    z_loss: m.moe?.zLoss ?? null,
    'mtp loss': m.moe?.mtpLoss ?? null,
  };
}

/** The scalars Megatron also writes against the consumed samples, as `<tag> vs samples`. */
const VS_SAMPLES = [
  'learning-rate',
  'batch-size',
  'lm loss',
  'loss-scale',
  'grad-norm',
  'mtp loss',
  'lm loss validation',
  'lm loss validation ppl',
];

/**
 * The "vs samples" twins of {@link tensorboardScalars} that Megatron writes with the consumed
 * samples as the step (learning rate, batch size, the losses, loss scale, grad norm, validation).
 */
export function tensorboardSampleScalars(
  m: TrainMetrics | ValidMetrics,
  globalBatchSize: number,
): Record<string, number | null> {
  const all = tensorboardScalars(m, globalBatchSize);
  return Object.fromEntries(
    VS_SAMPLES.filter((tag) => tag in all).map((tag) => [`${tag} vs samples`, all[tag]]),
  );
}

/** Options of {@link train}. */
export interface TrainOptions {
  /** Receives each log line (default: console.log on the logging rank). */
  log?: (line: string) => void;
  /** Stops the run after the current iteration, saving a checkpoint first when `checkpoint.save` is set. */
  signal?: AbortSignal;
  /** Write the run report (`<runDir>/report/`) when the run ends (default true). */
  report?: boolean;
}

/** What a run did. */
export interface TrainResult {
  /** The last iteration completed. */
  iteration: number;
  /** The reported loss of every iteration run in this call. */
  losses: number[];
  /** Checkpoint iteration folders written. */
  checkpoints: string[];
  /** Why the run stopped. */
  exitReason: 'done' | 'exit-interval' | 'exit-duration' | 'signal';
}

/** The tensor-parallel, expert-parallel and data-parallel groups of this run. */
export interface Layout {
  tp: ProcessGroup;
  /** Gradients and loss sums reduce over it: Megatron's dp-cp group. */
  dp: ProcessGroup;
  /** The data-parallel ranks that read different samples (dp without cp). */
  dpData: ProcessGroup;
  /** Context-parallel group: the ranks that share each sequence. */
  cp: ProcessGroup;
  /** Pipeline-parallel group: the stages of this rank's model replica. */
  pp: ProcessGroup;
  /** Expert-data-parallel group: expert gradients are reduced over it. */
  edp: ProcessGroup;
  world: number;
  rank: number;
  distributed: boolean;
}

export async function setupLayout(config: RunConfig): Promise<Layout> {
  const env = detectEnvironment();
  const world = env.worldSize;
  const p = config.parallel;
  if (world === 1) {
    if (
      p.tensorModelParallelSize > 1 ||
      p.expertModelParallelSize > 1 ||
      p.contextParallelSize > 1 ||
      p.pipelineModelParallelSize > 1
    ) {
      throw new TrainError(
        'INVALID_CONFIG',
        `parallel.tensorModelParallelSize ${p.tensorModelParallelSize} × expertModelParallelSize ${p.expertModelParallelSize} needs that many processes: start the run with megapatch launch --nproc-per-node N`,
      );
    }
    const single = new SingleProcessGroup();
    return {
      tp: single,
      dp: single,
      dpData: single,
      cp: single,
      pp: single,
      edp: single,
      world: 1,
      rank: 0,
      distributed: false,
    };
  }
  if (!isInitialized()) await initProcessGroup();
  // the rank generator checks that the world divides tp × pp × cp and etp × ep × pp, naming the fix
  if (config.data.seqLength % (2 * p.contextParallelSize) !== 0) {
    throw new TrainError(
      'INVALID_CONFIG',
      `data.seqLength ${config.data.seqLength} is not a multiple of 2 × contextParallelSize (${2 * p.contextParallelSize}): each sequence is split into 2·cp chunks`,
    );
  }
  if (config.data.resetAttentionMask && p.contextParallelSize > 1) {
    // CP cuts every packed document into 2·cp equal chunks, and a pretraining document has any length
    throw new TrainError(
      'INVALID_CONFIG',
      `data.resetAttentionMask packs pretraining documents of any length, but contextParallelSize ${p.contextParallelSize} needs each packed sample to be a multiple of ${2 * p.contextParallelSize} tokens: set data.resetAttentionMask false, or pack SFT samples (data.sft) with data.sft.padToMultipleOf ${2 * p.contextParallelSize}`,
    );
  }
  await initializeModelParallel({
    tp: p.tensorModelParallelSize,
    ep: p.expertModelParallelSize,
    cp: p.contextParallelSize,
    pp: p.pipelineModelParallelSize,
    ...((p.virtualPipelineModelParallelSize ?? 1) > 1
      ? { vpp: p.virtualPipelineModelParallelSize as number }
      : {}),
    ...(p.expertTensorParallelSize !== null ? { etp: p.expertTensorParallelSize } : {}),
  });
  return {
    tp: getTensorModelParallelGroup(),
    dp: getDataParallelGroup(true),
    dpData: getDataParallelGroup(false),
    cp: getContextParallelGroup(),
    pp: getPipelineModelParallelGroup(),
    edp: getExpertDataParallelGroup(),
    world,
    rank: env.rank,
    distributed: true,
  };
}

/**
 * The model chunks of one rank under the interleaved schedule, as one module for DDP (parameters
 * named `chunks.<v>.…`); the schedule runs the chunks themselves.
 */
class ModelChunks extends Module {
  readonly chunks: ModuleList<GPTModel>;
  constructor(chunks: readonly GPTModel[]) {
    super();
    this.chunks = this.registerModule('chunks', new ModuleList(chunks));
  }
  forward(): never {
    throw new TrainError('INVALID_ARGUMENT', 'internal: model chunks run through the pipeline schedule');
  }
}

/** Whether `root` holds a checkpoint to resume (a tracker file or a complete iteration folder). */
function holdsCheckpoint(root: string): boolean {
  if (!fs.existsSync(root)) return false;
  return fs.readdirSync(root).some((f) => f === LATEST_ITERATION_FILE || /^iter_\d{7}$/.test(f));
}

/**
 * Settles where the model comes from before anything is built. A checkpoint.load folder that is a
 * Hugging Face model starts from its weights; one that holds no checkpoint yet (missing, empty, or
 * only a save that did not finish) starts from model.load or model.config: Megatron's --load on an
 * empty folder, the first run of a job that restarts itself with the same command. When the run script stated the architecture (model.architecture) or
 * numLayersPerVirtualPipelineStage, the model's config is read and checked here. Returns the run's
 * config with those settled, and lines to log.
 */
export function settleModelSource(config: RunConfig): { config: RunConfig; notes: string[] } {
  const notes: string[] = [];
  const m = config.model;
  const ck = config.checkpoint;
  const isMegatron = (dir: string | null) => dir !== null && megatronCheckpointDir(dir) !== null;
  const needHf = (what: string) =>
    new TrainError(
      'INVALID_CONFIG',
      `${what} is a Megatron-LM checkpoint: give model.hfConfig (--hf-ckpt-path), the Hugging Face config.json or folder that describes it, or convert it with megapatch convert megatron-to-megapatch`,
    );
  if (isMegatron(ck.load)) {
    // Megatron's --load of its own checkpoint: its weights, from iteration 0 (as --finetune)
    if (m.hfConfig === null) throw needHf(`checkpoint.load ${ck.load}`);
    if (m.load !== null || m.config !== null) {
      throw new TrainError(
        'INVALID_CONFIG',
        `checkpoint.load ${ck.load} is a Megatron-LM checkpoint, and model.${m.load !== null ? 'load' : 'config'} names another start: give one`,
      );
    }
    notes.push(
      `checkpoint.load ${ck.load} is a Megatron-LM checkpoint: starting from its weights at iteration 0 (its optimizer and RNG states are not read)`,
    );
    config = { ...config, model: { ...m, load: ck.load }, checkpoint: { ...ck, load: null } };
  } else if (isMegatron(m.load) && m.hfConfig === null) {
    throw needHf(`model.load ${m.load}`);
  }
  if (config.model.hfConfig !== null && !isMegatron(config.model.load)) {
    throw new TrainError(
      'INVALID_CONFIG',
      `model.hfConfig describes a Megatron-LM checkpoint, but model.load ${config.model.load ?? '(none)'} is not one: drop it`,
    );
  }
  if (ck.load !== null && !holdsCheckpoint(ck.load) && fs.existsSync(path.join(ck.load, 'config.json'))) {
    // a Hugging Face folder: its weights, from iteration 0 (a converted model does the same)
    if (m.load !== null || m.config !== null) {
      throw new TrainError(
        'INVALID_CONFIG',
        `checkpoint.load ${ck.load} is a Hugging Face model, and model.${m.load !== null ? 'load' : 'config'} names another start: give one`,
      );
    }
    notes.push(
      `checkpoint.load ${ck.load} is a Hugging Face model: starting from its weights at iteration 0`,
    );
    config = { ...config, model: { ...m, load: ck.load }, checkpoint: { ...ck, load: null } };
  } else if (ck.load !== null && !holdsCheckpoint(ck.load)) {
    if (m.load === null && m.config === null) {
      throw new TrainError(
        'CHECKPOINT',
        `checkpoint.load ${ck.load} holds no checkpoint${fs.existsSync(ck.load) ? '' : ' (no such folder)'}, and there is no model.load or model.config to start from`,
      );
    }
    if (m.load !== null && m.config !== null) {
      throw new TrainError(
        'INVALID_CONFIG',
        `checkpoint.load ${ck.load} holds no checkpoint yet, so the run starts from the model: give one of model.load and model.config, not both`,
      );
    }
    notes.push(`checkpoint.load ${ck.load} holds no checkpoint yet: starting from ${m.load ?? m.config}`);
    config = { ...config, checkpoint: { ...ck, load: null } };
  }
  const arch = config.model.architecture;
  const vpLayers = config.parallel.numLayersPerVirtualPipelineStage;
  if (Object.keys(arch).length === 0 && vpLayers === null) return { config, notes };
  // the model's config, without building it
  let cfg: TransformerConfig;
  let architecture: string;
  let source: string;
  const from = config.checkpoint.load ?? config.model.load;
  try {
    if (from !== null) {
      const iteration =
        config.checkpoint.load !== null
          ? resolveCheckpointIteration(config.checkpoint.load, () => {})
          : undefined;
      const opened = openWeights(from, {
        ...(iteration !== undefined ? { iteration } : {}),
        verifyChecksums: false,
        ...megatronSource(config, from),
      });
      opened.source.close();
      cfg = opened.config;
      architecture = opened.architecture;
    } else {
      const parsed = parseHfConfig(config.model.config as string);
      cfg = makeTransformerConfig({
        ...parsed.transformerConfig,
        makeVocabSizeDivisibleBy: config.model.makeVocabSizeDivisibleBy,
      });
      architecture = parsed.spec.architectures[0];
    }
    source = from ?? (config.model.config as string);
  } catch (e) {
    if (e instanceof TrainError) throw e;
    throw new TrainError('INVALID_CONFIG', `${from ?? config.model.config}: ${(e as Error).message}`);
  }
  const family = getModelFamily(architecture);
  checkArchitecture(
    arch,
    {
      config: cfg,
      activation: family.activation ?? 'swiglu',
      zeroCenteredGamma: family.zeroCenteredGamma ?? false,
      tensorParallelSize: config.parallel.tensorModelParallelSize,
      source,
    },
    config.data.seqLength,
  );
  if (vpLayers !== null) {
    const pp = config.parallel.pipelineModelParallelSize;
    if (cfg.numLayers % (pp * vpLayers) !== 0) {
      throw new TrainError(
        'INVALID_CONFIG',
        `parallel.numLayersPerVirtualPipelineStage ${vpLayers} (--num-layers-per-virtual-pipeline-stage): the model's ${cfg.numLayers} layers are not a multiple of pipelineModelParallelSize ${pp} × ${vpLayers}`,
      );
    }
    const vp = cfg.numLayers / (pp * vpLayers);
    if (vp > 1 && pp < 2) {
      throw new TrainError(
        'INVALID_CONFIG',
        `parallel.numLayersPerVirtualPipelineStage ${vpLayers} (--num-layers-per-virtual-pipeline-stage) makes ${vp} model chunks, which interleave over the pipeline ranks: it needs pipelineModelParallelSize 2 or more`,
      );
    }
    config = {
      ...config,
      parallel: {
        ...config.parallel,
        numLayersPerVirtualPipelineStage: null,
        virtualPipelineModelParallelSize: vp > 1 ? vp : null,
      },
    };
  }
  return { config, notes };
}

/**
 * openWeights / loadModel options for the model source `dir`: model.hfConfig where `dir` is a
 * Megatron-LM checkpoint.
 */
export function megatronSource(config: RunConfig, dir: string): { hfConfig?: string } {
  const hf = config.model.hfConfig;
  return hf !== null && megatronCheckpointDir(dir) !== null ? { hfConfig: hf } : {};
}

/** The model the run trains, and the HF architecture it exports to. */
export function buildModel(
  config: RunConfig,
  layout: Layout,
  iteration: number | undefined,
  vpStage = 0,
): { model: GPTModel; architecture: string; hfSource: string | null } {
  const m = config.model;
  const options = {
    dtype: ({ bf16: 'bfloat16', fp16: 'float16', fp32: 'float32' } as const)[m.dtype],
    tpGroup: layout.tp,
    sequenceParallel: config.parallel.sequenceParallel,
    cpCommType: config.parallel.cpCommType,
    // pipeline stages: this rank builds (and loads) only its stage's layers
    ...(config.parallel.decoderFirstPipelineNumLayers !== null
      ? { decoderFirstPipelineNumLayers: config.parallel.decoderFirstPipelineNumLayers }
      : {}),
    ...(config.parallel.decoderLastPipelineNumLayers !== null
      ? { decoderLastPipelineNumLayers: config.parallel.decoderLastPipelineNumLayers }
      : {}),
    ...(config.parallel.pipelineModelParallelLayout !== null
      ? { pipelineModelParallelLayout: config.parallel.pipelineModelParallelLayout }
      : {}),
    // the interleaved schedule: this rank holds one model chunk per virtual stage
    ...((config.parallel.virtualPipelineModelParallelSize ?? 1) > 1
      ? {
          vpp: config.parallel.virtualPipelineModelParallelSize as number,
          pipelineStage: { ppRank: layout.pp.rank, vpStage },
        }
      : {}),
    recompute:
      m.recomputeGranularity === 'full'
        ? ({
            granularity: 'full',
            ...(m.recomputeMethod !== null && m.recomputeNumLayers !== null
              ? { method: m.recomputeMethod, numLayers: m.recomputeNumLayers }
              : {}),
          } as const)
        : m.recomputeGranularity === 'selective'
          ? ({ granularity: 'selective', modules: m.recomputeModules } as const)
          : null,
    hiddenDropout: m.hiddenDropout,
    attentionDropout: m.attentionDropout,
    moeAuxLossCoeff: m.moeAuxLossCoeff,
    moeZLossCoeff: m.moeZLossCoeff,
    moeRouterLoadBalancingType: m.moeRouterLoadBalancingType,
    moeTokenDispatcherType: m.moeTokenDispatcherType,
    moeExpertCapacityFactor: m.moeExpertCapacityFactor,
    moeTokenDropPolicy: m.moeTokenDropPolicy,
    moePadExpertInputToCapacity: m.moePadExpertInputToCapacity,
  };
  const from = config.checkpoint.load ?? m.load;
  if (from) {
    const megatron = megatronSource(config, from);
    const loaded = loadModel(from, {
      ...options,
      ...(config.checkpoint.load && iteration !== undefined ? { iteration } : {}),
      ...megatron,
    });
    const hf = megatron.hfConfig;
    return {
      model: loaded.model,
      architecture: loaded.architecture,
      // a Megatron checkpoint's HF files (config, tokenizer) are model.hfConfig's folder
      hfSource:
        hf === undefined ? loaded.tokenizerDir : fs.statSync(hf).isDirectory() ? hf : path.dirname(hf),
    };
  }
  const parsed = parseHfConfig(m.config as string);
  const cfg: TransformerConfig = makeTransformerConfig({
    ...parsed.transformerConfig,
    makeVocabSizeDivisibleBy: m.makeVocabSizeDivisibleBy,
  });
  const architecture = parsed.spec.architectures[0];
  const model = new GPTModel(cfg, { ...options, family: architecture, initMethodStd: m.initMethodStd });
  const dir = fs.statSync(m.config as string).isDirectory()
    ? (m.config as string)
    : path.dirname(m.config as string);
  return { model, architecture, hfSource: dir };
}

function lcm(a: number, b: number): number {
  const gcd = (x: number, y: number): number => (y === 0 ? x : gcd(y, x % y));
  return (a / gcd(a, b)) * b;
}

/** Megatron's --data-path: [prefix] or [w1, prefix1, w2, prefix2, ...]. */
function dataPrefixes(
  dataPath: readonly (string | number)[],
  key = 'data.dataPath',
): {
  prefixes: string[];
  weights: number[] | null;
} {
  if (dataPath.length === 1) return { prefixes: [String(dataPath[0])], weights: null };
  if (dataPath.length % 2 !== 0) {
    throw new TrainError(
      'INVALID_CONFIG',
      `${key}: give one prefix, or weights and prefixes alternated ([0.3, a, 0.7, b])`,
    );
  }
  const prefixes: string[] = [];
  const weights: number[] = [];
  for (let i = 0; i < dataPath.length; i += 2) {
    const w = Number(dataPath[i]);
    if (!(w > 0))
      throw new TrainError(
        'INVALID_CONFIG',
        `${key}: weight ${dataPath[i]} at position ${i} is not a positive number`,
      );
    weights.push(w);
    prefixes.push(String(dataPath[i + 1]));
  }
  return { prefixes, weights };
}

type SampleSource = { length: number; getItem(i: number): GPTSample };

/** The train, validation or test dataset of Megatron's split, blended when the data path has weights. */
function buildDataset(
  config: RunConfig,
  split: 'train' | 'valid' | 'test',
  numSamples: number,
  eod: number,
): SampleSource | null {
  const d = config.data;
  if (d.sft) {
    try {
      return buildSftDataset({
        prefix: d.sft.prefix,
        split: d.split,
        which: split,
        seqLength: d.seqLength,
        numRows: numSamples,
        seed: config.training.seed,
        packing: d.sft.packing,
        perSequenceLoss: d.sft.perSequenceLoss,
        // context parallelism splits every packed sample into 2·cp chunks
        padToMultipleOf: lcm(
          d.sft.padToMultipleOf,
          config.parallel.contextParallelSize > 1 ? 2 * config.parallel.contextParallelSize : 1,
        ),
      });
    } catch (e) {
      if (split !== 'train' && e instanceof TrainError && /split .* is empty/.test(e.message)) return null;
      throw e;
    }
  }
  // Megatron's per-split data (--train-data-path, --valid-data-path): each read whole
  const perSplit = d.trainDataPath !== null;
  const key = perSplit
    ? ({ train: 'data.trainDataPath', valid: 'data.validDataPath', test: 'data.testDataPath' } as const)[
        split
      ]
    : 'data.dataPath';
  const source = perSplit
    ? { train: d.trainDataPath, valid: d.validDataPath, test: d.testDataPath }[split]
    : d.dataPath;
  if (source === null) return null; // trainDataPath without validDataPath / testDataPath: none
  const splitString = perSplit ? { train: '1,0,0', valid: '0,1,0', test: '0,0,1' }[split] : d.split;
  // Megatron's split string gives the split no share: no such evaluation
  if (!perSplit && split !== 'train') {
    const row = parseSplit(d.split)[split === 'valid' ? 1 : 2];
    if (row === null || row[1] <= row[0]) return null;
  }
  const { prefixes, weights } = dataPrefixes(source, key);
  const cacheDir = d.dataCachePath ?? path.join(config.logging.runDir, 'data-cache');
  const build = (prefix: string, n: number) => {
    let dataset: IndexedDataset;
    try {
      dataset = IndexedDataset.open(prefix);
    } catch (e) {
      throw new TrainError('DATA', `${key} ${prefix}: ${(e as Error).message}`);
    }
    return GPTDataset.build({
      dataset,
      split,
      splitString,
      sequenceLength: d.seqLength,
      numSamples: n,
      seed: config.training.seed,
      cacheDir,
      resetPositionIds: d.resetPositionIds,
      resetAttentionMask: d.resetAttentionMask,
      eodMaskLoss: d.eodMaskLoss,
      eodTokenId: eod,
    });
  };
  try {
    if (!weights) return build(prefixes[0], numSamples);
    const total = weights.reduce((a, b) => a + b, 0);
    // Megatron asks each child for its share with a 0.5% margin
    const children = prefixes.map((p, i) => build(p, Math.ceil((numSamples * weights[i] * 1.005) / total)));
    return new BlendedDataset(children, weights, numSamples) as unknown as SampleSource;
  } catch (e) {
    if (e instanceof TrainError) throw e;
    const msg = (e as Error).message;
    if (split !== 'train' && /empty|no documents|0 documents/i.test(msg)) return null;
    throw new TrainError('DATA', `${split} data: ${msg}`);
  }
}

/**
 * The position ids as one row [1, s] when every row of the micro-batch has the same (pre-training
 * without reset positions: 0..s-1 in every row), so the model builds one rotary table for the batch
 * and RoPE reads q where the QKV projection wrote it (no copy); null when the rows differ.
 */
function sharedPositions(f: CollatedBatch[string]): Tensor | null {
  const [rows, s] = f.shape;
  if (f.shape.length !== 2 || rows < 2 || !(f.data instanceof Int32Array)) return null;
  const d = f.data;
  for (let r = 1; r < rows; r++) for (let i = 0; i < s; i++) if (d[r * s + i] !== d[i]) return null;
  const one = fromTypedArray(d.slice(0, s), [1, s]);
  try {
    return one.to('int64');
  } finally {
    one.dispose();
  }
}

/**
 * Micro-batch tensors from a collated batch; with context parallelism, this rank's two chunks of
 * every sequence (tokens, labels, positions and loss mask split alike; packed rows per sample).
 * The host keeps what it needs as numbers (the packed boundaries, the mask sums: this rank's and
 * the whole sequences', which every CP rank reads alike), so nothing is read back from the device.
 */
function microTensors(b: CollatedBatch, cp: ProcessGroup) {
  // int32 from the collated batch, widened to int64 by one cast kernel (a BigInt per element on
  // the host cost milliseconds per micro-batch)
  const t = (name: string) => {
    const f = b[name];
    const narrow = fromTypedArray(f.data as Int32Array, f.shape);
    try {
      return narrow.to('int64');
    } finally {
      narrow.dispose();
    }
  };
  const mask = b.lossMask;
  const maskData = mask.data as Float32Array;
  const cu = b.cuSeqlens ? Array.from(b.cuSeqlens.data as Int32Array) : null;
  const wholeMaskSum = maskData.reduce((a, x) => a + x, 0);
  const full = {
    tokens: t('tokens'),
    labels: t('labels'),
    positionIds: sharedPositions(b.positionIds) ?? t('positionIds'),
    lossMask: fromTypedArray(maskData, mask.shape),
  };
  if (cp.size === 1) return { ...full, maskSum: wholeMaskSum, wholeMaskSum, cuSeqlens: cu };
  const split = (x: Tensor) => {
    const y = noGrad(() => contextParallelSplit(x, cp, { seqDim: 1, cuSeqlens: cu }));
    x.dispose();
    return y;
  };
  // this rank's tokens of every row (the split's plan): its share of the mask, and its boundaries
  const [rows, s] = mask.shape;
  const plan = contextParallelPlan(s, cp, { cuSeqlens: cu });
  let maskSum = 0;
  for (let r = 0; r < rows; r++) for (const i of plan.tokenIndices) maskSum += maskData[r * s + i];
  return {
    tokens: split(full.tokens),
    labels: split(full.labels),
    positionIds: split(full.positionIds),
    lossMask: split(full.lossMask),
    maskSum,
    wholeMaskSum,
    cuSeqlens: plan.localCuSeqlens ? [...plan.localCuSeqlens] : null,
  };
}

/** Frees the device tensors of a step's micro-batches. */
function disposeMicro(micro: readonly ReturnType<typeof microTensors>[]): void {
  for (const mb of micro) {
    for (const t of [mb.tokens, mb.labels, mb.positionIds, mb.lossMask]) t.dispose();
  }
}

/**
 * A running float64 sum of scalar tensors kept on their device, taken by reduceAndRead: adding
 * queues a cast and an add instead of waiting for the device (each term is its float32 value exactly, summed in
 * the order added, as the host sum of the terms' values was).
 */
export class DeviceSum {
  private acc: Tensor | null = null;

  add(t: Tensor): void {
    const next = noGrad(() =>
      tidy(() => {
        const v = t.detach().to('float64').reshape(1);
        return keep(this.acc ? this.acc.add(v) : v.clone());
      }),
    );
    this.acc?.dispose();
    this.acc = next;
  }

  /** The sum as a float64 [1] tensor on `device` (0 when nothing was added), now the caller's. */
  take(device: string): Tensor {
    const acc = this.acc ?? zeros([1], { dtype: 'float64', device });
    this.acc = null;
    return acc;
  }

  dispose(): void {
    this.acc?.dispose();
    this.acc = null;
  }
}

/**
 * A step's sums read with one wait: each term (a device sum or a host number) divided by its
 * divisor, summed over each group in turn on the device (float64), then read, followed by the
 * values of the `along` tensors (float64, reduced already) in order. The device sums and `along`
 * are freed. The same bits as reading each sum, dividing on the host and reducing the numbers.
 */
export function reduceAndRead(
  terms: readonly (DeviceSum | number)[],
  divisors: readonly number[],
  groups: readonly ProcessGroup[],
  along: readonly Tensor[] = [],
): number[] {
  const device = getDefaultDevice();
  const parts = terms.map((x) =>
    typeof x === 'number' ? fromTypedArray(Float64Array.of(x), [1]) : x.take(device),
  );
  let v: Tensor;
  try {
    v = noGrad(() =>
      tidy(() => keep(cat(parts).div(fromTypedArray(Float64Array.from(divisors), [divisors.length])))),
    );
  } catch (e) {
    for (const a of along) a.dispose();
    throw e;
  } finally {
    for (const p of parts) p.dispose();
  }
  try {
    for (const g of groups) if (g.size > 1) g.allReduce(v, 'sum').waitSync();
    if (along.length === 0) return Array.from(v.toTypedArray() as Float64Array);
    // `along` after them, read in the same wait
    return Array.from(
      noGrad(() => tidy(() => cat([v, ...along.map((a) => a.reshape(-1))]).toTypedArray())) as Float64Array,
    );
  } finally {
    v.dispose();
    for (const a of along) a.dispose();
  }
}

const STOP_REASONS: readonly (TrainResult['exitReason'] | null)[] = [
  null,
  'exit-interval',
  'exit-duration',
  'signal',
];

/** The strongest stop reason of any rank of `group` (a signal over the clock over the interval). */
export function agreeOnStop(
  stop: TrainResult['exitReason'] | null,
  group: ProcessGroup,
): TrainResult['exitReason'] | null {
  const [code] = allReduceNumbers([STOP_REASONS.indexOf(stop)], group, 'max');
  return STOP_REASONS[code] ?? null;
}

/**
 * Sum over the group of small host numbers (token counts), in float64: through the host's
 * collectives (a CPU tensor goes through Gloo), so that the device is neither used nor waited for.
 */
export function allReduceNumbers(values: number[], group: ProcessGroup, op: 'sum' | 'max' = 'sum'): number[] {
  if (group.size === 1) return values;
  const t = fromTypedArray(Float64Array.from(values), [values.length], { device: 'cpu' });
  group.allReduce(t, op).waitSync();
  const out = Array.from(t.toTypedArray() as Float64Array);
  t.dispose();
  return out;
}

/** DDP over the run's model chunks: Megatron's gradient buffers, buckets and reductions. */
export function makeDdp(
  config: RunConfig,
  layout: Layout,
  model: GPTModel,
  chunks: readonly GPTModel[],
): DistributedDataParallel<GPTModel | ModelChunks> {
  return new DistributedDataParallel<GPTModel | ModelChunks>(
    chunks.length > 1 ? new ModelChunks(chunks) : model,
    {
      dataParallelGroup: layout.dp,
      // pipeline: the tied embeddings' gradients are summed over the embedding group before the
      // data-parallel reduction, so the buckets are reduced when the step finishes (no overlap)
      ...(layout.pp.size > 1 ? { overlapGradReduce: false } : {}),
      // routed experts (each expert-parallel rank holds its own) reduce over expert-dp, as Megatron's
      // allreduce=False parameters
      isExpertParameter: (name) => name.includes('.local_experts.'),
      expertDataParallelGroup: layout.edp,
      useDistributedOptimizer: config.parallel.useDistributedOptimizer,
      ...(config.parallel.ddpBucketSizeMb
        ? { bucketSize: Math.round((config.parallel.ddpBucketSizeMb * 1e6) / 4) }
        : {}),
    },
  );
}

/** The run's optimizer (Megatron's: Adam, clipping, decoupled lr, loss scaling) over DDP's buffers. */
export function makeOptimizer(
  config: RunConfig,
  layout: Layout,
  chunks: readonly GPTModel[],
  ddp: DistributedDataParallel<GPTModel | ModelChunks>,
  log: (line: string) => void,
): DataParallelOptimizer | DistributedOptimizer {
  const o = config.optimizer;
  if (o.optimizerCpuOffload && getDefaultDevice() === 'cpu') {
    log(
      'notice: optimizer.optimizerCpuOffload (--optimizer-cpu-offload) changes nothing here: the run trains on the CPU, where the optimizer state lives already',
    );
  }
  const optOptions = {
    lr: o.lr,
    weightDecay: o.weightDecay,
    betas: [o.adamBeta1, o.adamBeta2] as [number, number],
    eps: o.adamEps,
    clipGrad: o.clipGrad,
    // Megatron --optimizer-cpu-offload / --optimizer-offload-fraction: the state in host memory
    optimizerCpuOffload: o.optimizerCpuOffload,
    optimizerOffloadFraction: o.optimizerOffloadFraction,
    ...(layout.distributed ? {} : { modelParallelGroup: null, expertModelParallelGroup: null }),
    // the last stage's copy of tied embeddings is counted once, on the first stage
    sharedParams: (() => {
      const copies = chunks.filter((c) => !c.preProcess).map((c) => c.sharedEmbeddingWeight());
      return copies.filter((w): w is Tensor => w !== null);
    })(),
    log: (line: string) => log(`warning: ${line}`),
    // Megatron --decoupled-lr: the word embeddings and the output layer (is_embedding_or_output_parameter)
    decoupledLr:
      o.decoupledLr === null
        ? null
        : {
            lr: o.decoupledLr,
            minLr: o.decoupledMinLr ?? o.minLr,
            isParam: (name: string) => /(^|\.)(embedding\.word_embeddings|output_layer)\.weight$/.test(name),
          },
    // fp16: Megatron's loss scaling (a constant scale, or the dynamic one)
    lossScaler:
      config.model.dtype !== 'fp16'
        ? null
        : o.lossScale !== null
          ? new ConstantGradScaler(o.lossScale)
          : new DynamicGradScaler({
              initialScale: o.initialLossScale,
              minScale: o.minLossScale,
              growthInterval: o.lossScaleWindow,
              hysteresis: o.hysteresis,
            }),
  };
  return config.parallel.useDistributedOptimizer
    ? new DistributedOptimizer(ddp, optOptions)
    : new DataParallelOptimizer(ddp, optOptions);
}

/**
 * Megatron's OptimizerParamScheduler of the run, counted in samples: iterations × the global batch,
 * or with sample-based training (--train-samples) the sample counts as given.
 */
export function makeScheduler(
  config: RunConfig,
  optimizer: DataParallelOptimizer | DistributedOptimizer,
  trainIters: number,
): OptimizerParamScheduler {
  const o = config.optimizer;
  const sch = config.scheduler;
  const gbs = config.training.globalBatchSize;
  const samples = config.training.trainSamples;
  const lrDecaySteps =
    samples !== null ? (sch.lrDecaySamples ?? samples) : (sch.lrDecayIters ?? trainIters) * gbs;
  return new OptimizerParamScheduler({
    optimizer,
    initLr: sch.lrWarmupInit,
    maxLr: o.lr,
    minLr: o.minLr,
    lrWarmupSteps:
      sch.lrWarmupFraction !== null
        ? sch.lrWarmupFraction * lrDecaySteps
        : samples !== null
          ? sch.lrWarmupSamples
          : sch.lrWarmupIters * gbs,
    lrDecaySteps,
    lrDecayStyle: sch.lrDecayStyle,
    ...(sch.lrDecayStyle === 'WSD'
      ? {
          wsdDecaySteps:
            samples !== null ? (sch.lrWsdDecaySamples ?? samples) : (sch.lrWsdDecayIters ?? trainIters) * gbs,
          lrWsdDecayStyle: sch.lrWsdDecayStyle,
        }
      : {}),
    // Megatron's weight-decay schedule runs over the whole run
    ...(o.startWeightDecay !== null || o.endWeightDecay !== null
      ? {
          startWd: o.startWeightDecay ?? (o.endWeightDecay as number),
          endWd: o.endWeightDecay ?? (o.startWeightDecay as number),
          wdIncrementSteps: samples ?? trainIters * gbs,
          wdIncrementStyle: o.weightDecayIncrStyle,
        }
      : {}),
    ...(sch.overrideOptParamScheduler
      ? { overrideOptParamScheduler: true, useCheckpointOptParamScheduler: false }
      : {}),
  });
}

/**
 * Whether the run stops after this iteration (a signal, Megatron's exit interval or duration), the
 * same on every rank: a signal or the clock reaches the ranks at different iterations, and stopping
 * saves (a collective), so every rank stops when one does, as Megatron all-reduces its exit flags
 * (one small all-reduce of host numbers a step, through Gloo). Yields to the event loop first, so
 * that signal handlers and pending output run.
 */
export async function stopAfterIteration(
  config: RunConfig,
  opts: TrainOptions,
  layout: Layout,
  iteration: number,
  startMs: number,
): Promise<TrainResult['exitReason'] | null> {
  await new Promise<void>((resolve) => setImmediate(resolve));
  const tr = config.training;
  let stop: TrainResult['exitReason'] | null = null;
  if (opts.signal?.aborted) stop = 'signal';
  else if (tr.exitInterval && iteration % tr.exitInterval === 0) stop = 'exit-interval';
  else if (tr.exitDurationInMins && (performance.now() - startMs) / 60000 >= tr.exitDurationInMins)
    stop = 'exit-duration';
  return layout.distributed ? agreeOnStop(stop, getWorldGroup()) : stop;
}

/** A finished run's last steps on the logging rank: the Hugging Face export and the run report. */
export async function finishRun(
  config: RunConfig,
  opts: TrainOptions,
  o: {
    logRank: boolean;
    exitReason: TrainResult['exitReason'];
    metricsClosed: boolean;
    log: (line: string) => void;
  },
): Promise<void> {
  if (!o.logRank) return;
  if (o.exitReason === 'done' && config.checkpoint.exportHf && config.checkpoint.save) {
    await convertMegapatchToHf({
      input: config.checkpoint.save,
      output: config.checkpoint.exportHf,
      overwrite: true,
    });
    o.log(`exported the model to ${config.checkpoint.exportHf}`);
  }
  if (opts.report !== false && o.metricsClosed) {
    try {
      const rep = await writeRunReport(config.logging.runDir);
      o.log(`run report: ${rep.html}`);
    } catch (e) {
      o.log(`warning: the run report was not written: ${(e as Error).message}`);
    }
  }
}

/** A host tensor on `device` (the tensor itself when it is there; else a copy, the host one freed). */
export function hostToDevice(host: Tensor, device: string): Tensor {
  if (host.device === device) return host;
  const d = host.to(device);
  host.dispose();
  return d;
}

/** Trains the model the config describes; returns when the run ends or is stopped. */
export async function train(config: RunConfig, opts: TrainOptions = {}): Promise<TrainResult> {
  const device = await useDevice(config.training.device);
  const previous = getDefaultDevice();
  const previousFusion = getGradientAccumulationFusion();
  setDefaultDevice(device);
  setGradientAccumulationFusion(config.training.gradientAccumulationFusion);
  try {
    // what the run allocates for the whole run (models, DDP, optimizer): the run frees them when
    // it ends (emptying the list); what is left here, setting up failed before the run's cleanup
    const owned: { dispose(): void }[] = [];
    try {
      return await trainOnDefaultDevice(config, opts, owned);
    } catch (e) {
      for (const o of owned.reverse()) o.dispose();
      throw e;
    }
  } finally {
    setDefaultDevice(previous);
    setGradientAccumulationFusion(previousFusion);
  }
}

/**
 * The canonical name of the run's device, its backend loaded: "cuda" needs @megapatch/cuda,
 * "cudaemu" its CPU emulator (@megapatch/cuda/emulator), "ref" the reference backend of
 * @megapatch/tensor; a type without an index means the device of this process's LOCAL_RANK.
 * Across processes, CUDA tensors (and cudaemu's) go through NCCL (the emulator's NCCL for
 * cudaemu), the others through host copies over Gloo.
 */
export async function useDevice(requested: string): Promise<string> {
  let name = requested;
  const type = name.split(':')[0];
  if (type === 'ref' && deviceCount('ref') === 0) {
    const { registerReferenceBackend } = await import('@megapatch/tensor/reference');
    registerReferenceBackend();
  }
  if (type === 'cudaemu' && deviceCount('cudaemu') === 0) {
    // the CUDA backend's kernels run on the CPU by its emulator: for checking, not for speed
    const emulatorModule = '@megapatch/cuda/emulator';
    try {
      await import(emulatorModule);
    } catch (e) {
      throw new TrainError(
        'INVALID_CONFIG',
        `training.device ${name}: the CUDA emulator could not be loaded (${(e as Error).message.split('\n')[0]}); install @megapatch/cuda (its build makes the emulator), or use --device cpu`,
      );
    }
  }
  if (type === 'cuda' && deviceCount('cuda') === 0) {
    const cudaModule = '@megapatch/cuda';
    try {
      await import(cudaModule);
    } catch (e) {
      throw new TrainError(
        'INVALID_CONFIG',
        `training.device ${name}: the CUDA backend could not be loaded (${(e as Error).message.split('\n')[0]}); install @megapatch/cuda on a machine with an NVIDIA GPU, or use --device cpu`,
      );
    }
  }
  let device: string;
  try {
    // a device type without an index is this process's device: cuda:<LOCAL_RANK> under a
    // launcher, one GPU per process (torch.cuda.set_device(local_rank) in Megatron)
    if (type !== 'cpu' && !name.includes(':')) {
      const local = Number(process.env.LOCAL_RANK ?? 0);
      const count = deviceCount(type);
      if (count > 0 && local >= count) {
        throw new Error(
          `LOCAL_RANK ${local} has no device: this machine has ${count} ${type} device(s); start one process per device (--nproc-per-node ${count})`,
        );
      }
      name = `${type}:${local}`;
    }
    device = getBackend(name).device;
  } catch (e) {
    throw new TrainError('INVALID_CONFIG', `training.device ${name}: ${(e as Error).message}`);
  }
  return device;
}

async function trainOnDefaultDevice(
  configIn: RunConfig,
  opts: TrainOptions,
  owned: { dispose(): void }[],
): Promise<TrainResult> {
  const { config, notes } = settleModelSource(configIn);
  if (config.rl) checkRlLayout(config);
  if (config.dpo) checkDpoLayout(config);
  const layout = await setupLayout(config);
  const logRank = layout.rank === 0;
  const log = (line: string) => {
    if (logRank) (opts.log ?? console.log)(line);
  };
  for (const line of notes) log(line);
  // reinforcement learning (GRPO): its own loop over the same model, optimizer and checkpoints
  if (config.rl) return trainGrpo(config, opts, owned, layout, log);
  // preference optimisation (DPO): its own loop too
  if (config.dpo) return trainDpo(config, opts, owned, layout, log);
  const tr = config.training;
  // gradients average over dp × cp; samples are spread over dp only (cp ranks share each sequence)
  const dpSize = layout.dp.size;
  const dataSize = layout.dpData.size;
  const cpSize = layout.cp.size;
  const numMicro = numMicrobatches({
    globalBatchSize: tr.globalBatchSize,
    microBatchSize: tr.microBatchSize,
    dataParallelSize: dataSize,
  });
  if (config.data.resetAttentionMask && tr.microBatchSize !== 1) {
    throw new TrainError(
      'INVALID_CONFIG',
      'data.resetAttentionMask packs documents with cuSeqlens: it needs training.microBatchSize 1',
    );
  }
  manualSeed(tr.seed);
  fs.mkdirSync(config.logging.runDir, { recursive: true });
  if (logRank)
    fs.writeFileSync(path.join(config.logging.runDir, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);

  // the checkpoint to resume (or fine-tune) from: the newest complete one
  const resumeIteration = config.checkpoint.load
    ? resolveCheckpointIteration(config.checkpoint.load, log)
    : undefined;
  const vpp = config.parallel.virtualPipelineModelParallelSize ?? 1;
  const built = Array.from({ length: vpp }, (_, v) => buildModel(config, layout, resumeIteration, v));
  const { model, architecture, hfSource } = built[0];
  // this rank's model chunks (one per virtual pipeline stage; [model] without interleaving)
  const chunks = built.map((b) => b.model);
  owned.push(...chunks);
  const cfg = model.config;
  const ddp = makeDdp(config, layout, model, chunks);
  owned.push(ddp);
  // after DDP wraps the parameters: its hooks must see the TP-summed gradients
  if (config.parallel.sequenceParallel) registerSequenceParallelGradHooks(ddp.parameters(), layout.tp);
  const optimizer = makeOptimizer(config, layout, chunks, ddp, log);
  owned.push(optimizer);
  const o = config.optimizer;
  const gbs = tr.globalBatchSize;
  const trainIters = trainIterations(config);
  const samples = tr.trainSamples;
  const scheduler = makeScheduler(config, optimizer, trainIters);

  // Resume: restores weights, optimizer, scheduler, RNG and the data position.
  let state: TrainingState = { iteration: 0, consumedSamples: 0, skippedIterations: 0 };
  if (config.checkpoint.load && !config.checkpoint.finetune) {
    state = loadTrainingCheckpoint(config.checkpoint.load, {
      model,
      chunks,
      optimizer,
      scheduler,
      architecture,
      log,
      iteration: resumeIteration,
      loadOptim: !config.checkpoint.noLoadOptim,
      loadRng: !config.checkpoint.noLoadRng,
    });
  }
  // Megatron's consumed_valid_samples: each evaluation reads the next evalIters global batches of
  // the validation data (a checkpoint from before it was kept: the evaluations the iterations made)
  if (state.consumedValidSamples === undefined) {
    const evaluations =
      tr.evalInterval && tr.trainSamples === null ? Math.floor(state.iteration / tr.evalInterval) : 0;
    state.consumedValidSamples = evaluations * tr.evalIters * gbs;
  }

  const eod = config.data.eodTokenId ?? cfg.vocabSize - 1;
  // Megatron sizes the train split by the samples the run asks for
  const trainData = buildDataset(config, 'train', samples ?? trainIters * gbs, eod);
  if (!trainData) throw new TrainError('DATA', 'the train split is empty: check data.split');
  const evalSteps = tr.evalInterval ? Math.floor(trainIters / tr.evalInterval) + 1 : 0;
  const validData =
    tr.evalInterval && tr.evalIters > 0
      ? buildDataset(config, 'valid', evalSteps * tr.evalIters * gbs, eod)
      : null;
  // Megatron's test evaluation when the run ends: evalIters global batches of the test split
  const testData = tr.evalIters > 0 ? buildDataset(config, 'test', tr.evalIters * gbs, eod) : null;

  const makeLoader = (data: SampleSource, consumed: number) =>
    new DataLoader<GPTSample>({
      dataset: data,
      sampler: new MegatronPretrainingSampler({
        totalSamples: data.length,
        consumedSamples: consumed,
        microBatchSize: tr.microBatchSize,
        dataParallelRank: layout.dpData.rank,
        dataParallelSize: dataSize,
        dropLast: true,
      }),
      prefetch: 0,
    });
  const loader = makeLoader(trainData, state.consumedSamples);
  // Megatron's batch-size ramp-up: each step's global batch from the samples consumed before it
  const rampup = tr.rampupBatchSize ? new BatchSizeRampup(gbs, tr.rampupBatchSize) : null;
  const stepBatchSize = (consumed: number) => (rampup ? rampup.globalBatchSize(consumed) : gbs);
  const microsOf = (batch: number) => {
    if (batch % (tr.microBatchSize * dataSize) !== 0) {
      throw new TrainError(
        'INVALID_CONFIG',
        `training.rampupBatchSize: a global batch of ${batch} is not a multiple of microBatchSize ${tr.microBatchSize} × data-parallel size ${dataSize}; choose a start and increment that are`,
      );
    }
    return batch / (tr.microBatchSize * dataSize);
  };
  // this rank's micro-batches of the next step (null: the data ran out)
  const nextStep = (micros: number): CollatedBatch[] | null => {
    const step: CollatedBatch[] = [];
    while (step.length < micros) {
      const r = loader.nextSync();
      if (r.done) return null;
      step.push(r.value);
    }
    return step;
  };
  const metricsFile = path.join(config.logging.runDir, 'metrics.jsonl');
  const metricsFd = logRank ? fs.openSync(metricsFile, state.iteration > 0 ? 'a' : 'w') : null;
  // Megatron's --tensorboard-dir: the same numbers as event files, under Megatron's tags
  const tensorboard =
    logRank && config.logging.tensorboardDir !== null
      ? new TensorBoardWriter(config.logging.tensorboardDir)
      : null;
  const writeMetrics = (m: TrainMetrics | ValidMetrics) => {
    if (metricsFd !== null) fs.writeSync(metricsFd, `${JSON.stringify(m)}\n`);
    if (tensorboard) {
      tensorboard.addScalars(m.iteration, tensorboardScalars(m, gbs));
      tensorboard.addScalars(m.consumedSamples, tensorboardSampleScalars(m, gbs));
    }
  };

  // Megatron's FLOP count of one step (forward and backward), for TFLOP/s per process
  const stepFlops = numFloatingPointOperations(cfg, {
    seqLength: config.data.seqLength,
    batchSize: gbs,
    tp: layout.tp.size,
  });
  const losses: number[] = [];
  const checkpoints: string[] = [];
  // the iteration of the last save, on every rank (only global rank 0 learns the folders)
  let savedIteration: number | null = null;
  let metricsClosed = false;
  const t0 = performance.now();
  let exitReason: TrainResult['exitReason'] = 'done';
  const expertBias = chunks.some((c) => c.moeLayers().some(([, m]) => m.router.expertBias !== null));
  // the MoE layers' global numbers (an MTP block's after the decoder's, numLayers + depth, when it
  // repeats the last layer's MoE MLP): the rows of the logged expert load
  const moeLayerNumbers: number[] = [];
  if (cfg.moe) {
    cfg.moe.layerPattern.forEach((kind, layer) => {
      if (kind === 'moe') moeLayerNumbers.push(layer);
    });
    if (cfg.moe.layerPattern[cfg.numLayers - 1] === 'moe') {
      for (let k = 0; k < cfg.mtpNumLayers; k++) moeLayerNumbers.push(cfg.numLayers + k);
    }
  }
  const moeRowCount = cfg.numLayers + cfg.mtpNumLayers;
  const setAuxLossScale = (x: number) => {
    for (const c of chunks) c.auxLossScale = x;
  };
  // Megatron's MoEAuxLossAutoScaler scale: the aux losses are averaged over the micro-batches as
  // the main loss is (not with calculatePerTokenLoss, where the main loss is not either)
  // With context parallelism each rank's router holds part of every sequence: its aux-loss gradient
  // is its part's, and DDP averages over cp, so the scale carries cp as the main objective does.
  const auxLossScaleOf = (micros: number) => (tr.calculatePerTokenLoss ? 1 : 1 / micros) * cpSize;
  setAuxLossScale(auxLossScaleOf(numMicro));
  let skippedSinceLog = 0;
  let firstLogged = false;
  // Pipeline parallelism: Megatron's 1F1B schedule over the stages (each rank holds one stage)
  const ppSize = layout.pp.size;
  const forwardBackward = ppSize > 1 ? getForwardBackwardFunc(ppSize, vpp > 1 ? vpp : null) : null;
  type Micro = ReturnType<typeof microTensors>;
  /**
   * The dropout masks' keys of this rank's micro-batch i of the step: each row's index in the run's
   * sample order (Megatron's sampler: sample C + i·mbs·dp + rank·mbs + j, C the samples consumed
   * before the step), the same on every layout and after a resume.
   */
  const dropoutOn = config.model.hiddenDropout > 0 || config.model.attentionDropout > 0;
  const dropoutKeys = (i: number, rows: number) => {
    if (!dropoutOn) return {};
    const first =
      state.consumedSamples + i * tr.microBatchSize * dataSize + layout.dpData.rank * tr.microBatchSize;
    return { dropout: { seed: tr.seed, rowIds: Array.from({ length: rows }, (_, j) => first + j) } };
  };
  interface Sums {
    loss: DeviceSum;
    tokens: number;
    aux: DeviceSum;
    z: DeviceSum;
    mtp: DeviceSum;
  }
  const newSums = (): Sums => ({
    loss: new DeviceSum(),
    tokens: 0,
    aux: new DeviceSum(),
    z: new DeviceSum(),
    mtp: new DeviceSum(),
  });
  /**
   * One pass of the schedule over the micro-batches (forward only for evaluation): every stage
   * reads the same micro-batches (positions, packing), the last computes the loss. The objective
   * is the one the single-stage loop uses; the schedule multiplies it by cp and divides it by the
   * number of micro-batches, so the loss function returns it without those factors.
   */
  const runPipeline = async (
    micro: Micro[],
    sums: Sums,
    o: { forwardOnly: boolean; microTokens: number[]; globalTokens: number; lossScale: number },
  ) => {
    if (!forwardBackward) throw new TrainError('INVALID_ARGUMENT', 'internal: no pipeline schedule');
    await forwardBackward({
      forwardStepFunc: (dataIterator, stage: GPTModel, ctx) => {
        const mb = (dataIterator as Iterator<Micro>).next().value as Micro;
        const out = stage.forward(stage.preProcess || stage.mtp ? mb.tokens : null, {
          hiddenStates: ctx.inputTensor,
          ...(stage.postProcess ? { labels: mb.labels, lossMask: mb.lossMask } : {}),
          positionIds: mb.positionIds,
          ...(mb.cuSeqlens ? { cuSeqlens: mb.cuSeqlens } : {}),
          ...(o.forwardOnly ? {} : dropoutKeys(ctx.microbatch, mb.tokens.shape[0])),
        });
        if (!o.forwardOnly) {
          for (const [, moe] of stage.moeLayers()) {
            const r = moe.lastRouting;
            if (r?.auxLoss) sums.aux.add(r.auxLoss);
            if (r?.zLoss) sums.z.add(r.zLoss);
          }
        }
        if (!stage.postProcess) return [out.hiddenStates as Tensor, null] as const;
        const i = ctx.microbatch;
        return [
          out.loss as Tensor,
          (perToken: Tensor) => {
            const masked = perToken.mul(mb.lossMask).sum();
            sums.loss.add(masked);
            sums.tokens += mb.maskSum;
            let objective = tr.calculatePerTokenLoss
              ? masked.mul((dpSize * micro.length) / (cpSize * Math.max(o.globalTokens, 1)))
              : masked.div(Math.max(o.microTokens[i], 1));
            if (out.mtpLosses.length > 0) {
              const mtp = out.mtpLosses.reduce((a, t) => a.add(t)).div(out.mtpLosses.length);
              sums.mtp.add(mtp);
              // each CP rank holds its tokens' share of the MTP mean: the schedule's ×cp turns the
              // DP × CP gradient average into their sum
              objective = objective.add(mtp.mul(config.model.mtpLossScalingFactor));
            }
            return [objective, null] as const;
          },
        ] as const;
      },
      // every chunk reads the same micro-batches
      dataIterator: chunks.length > 1 ? chunks.map(() => micro[Symbol.iterator]()) : micro[Symbol.iterator](),
      model: chunks.length > 1 ? chunks : model,
      numMicrobatches: micro.length,
      ...(config.parallel.microbatchGroupSizePerVpStage !== null
        ? { microbatchGroupSizePerVpStage: config.parallel.microbatchGroupSizePerVpStage }
        : {}),
      seqLength: config.data.seqLength,
      microBatchSize: tr.microBatchSize,
      hiddenSize: cfg.hiddenSize,
      forwardOnly: o.forwardOnly,
      ppGroup: layout.pp,
      pipelineDtype: model.dtype,
      contextParallelSize: cpSize,
      sequenceParallel: config.parallel.sequenceParallel,
      tensorModelParallelSize: layout.tp.size,
      ...(o.lossScale !== 1 ? { gradScaleFunc: (l: Tensor) => l.mul(o.lossScale) } : {}),
      noSyncFunc: <T>(fn: () => T) => ddp.noSync(fn),
      // tied embeddings: the first stage's table and the last stage's copy get the sum of both
      // gradients, before the data-parallel reduction
      finalizeModelGradsFunc: () => allreduceEmbeddingGrads(chunks.map((c) => c.sharedEmbeddingWeight())),
    });
  };
  const save = () => {
    if (!config.checkpoint.save) return;
    const dir = saveTrainingCheckpoint(config.checkpoint.save, {
      model,
      chunks,
      optimizer,
      scheduler,
      architecture,
      state,
      config,
      hfSource,
      keep: config.checkpoint.ckptKeep,
      layout,
    });
    savedIteration = state.iteration;
    if (dir) checkpoints.push(dir);
  };

  // the validation batches, read on from one evaluation to the next (Megatron's validation
  // iterator); the test evaluation reads its data from the start
  const evalBatches = (data: SampleSource, consumed: number) =>
    globalBatchesSync(makeLoader(data, consumed), {
      globalBatchSize: gbs,
      microBatchSize: tr.microBatchSize,
      dataParallelSize: dataSize,
    });
  const validBatches = validData ? evalBatches(validData, state.consumedValidSamples) : null;
  /**
   * One evaluation of evalIters global batches: of the validation data (`on`: Megatron's prefix
   * for the one when the run ends, 'validation set'), or of the test data.
   */
  const evaluate = async (kind: 'valid' | 'test', on: 'validation set' | 'test set' | null = null) => {
    const vBatches = kind === 'valid' ? validBatches : testData ? evalBatches(testData, 0) : null;
    if (!vBatches) return;
    let evaluated = 0;
    // the losses and tokens of every micro-batch summed where they are, read once at the end
    const sums = newSums();
    for (const c of chunks) c.eval();
    for (let i = 0; i < tr.evalIters; i++) {
      const step = vBatches.next();
      if (step.done) break;
      evaluated++;
      if (kind === 'valid') state.consumedValidSamples = (state.consumedValidSamples ?? 0) + gbs;
      if (forwardBackward) {
        // pipeline: forward only through the stages; the loss is summed on the last one
        const micro = step.value.map((b) => microTensors(b, layout.cp));
        await runPipeline(micro, sums, { forwardOnly: true, microTokens: [], globalTokens: 0, lossScale: 1 });
        disposeMicro(micro);
        continue;
      }
      for (const b of step.value) {
        tidy(() =>
          noGrad(() => {
            const mb = microTensors(b, layout.cp);
            const out = model.forward(mb.tokens, {
              labels: mb.labels,
              lossMask: mb.lossMask,
              positionIds: mb.positionIds,
              ...(mb.cuSeqlens ? { cuSeqlens: mb.cuSeqlens } : {}),
            });
            sums.loss.add((out.loss as Tensor).mul(mb.lossMask).sum());
            sums.tokens += mb.maskSum;
          }),
        );
      }
    }
    for (const c of chunks) c.train();
    for (const d of [sums.aux, sums.z, sums.mtp]) d.dispose();
    // over the pipeline (the last stage holds the loss), then the data-parallel ranks
    const [sum, count] = reduceAndRead([sums.loss, sums.tokens], [1, 1], [layout.pp, layout.dp]);
    if (evaluated === 0) {
      log(
        `warning: no ${kind === 'valid' ? 'validation' : 'test'} data left at iteration ${state.iteration}: the evaluation is skipped (the data was sized for the configured evaluations)`,
      );
      return;
    }
    const lmLoss = sum / Math.max(count, 1);
    const m: ValidMetrics = {
      kind,
      iteration: state.iteration,
      consumedSamples: state.consumedSamples,
      lmLoss,
      perplexity: Math.exp(Math.min(lmLoss, 20)),
      time: new Date().toISOString(),
    };
    writeMetrics(m);
    const dataset = on ? { dataset: on } : {};
    for (const line of formatValidationLogLines({ iteration: m.iteration, lmLoss, ...dataset })) log(line);
  };

  // a step's batch, read and copied to the device (null: the data ran out); the next step's is
  // fetched while the device still runs this step's optimizer update (see below)
  const fetchStep = (micros: number) => {
    const t = performance.now();
    const step = nextStep(micros);
    return {
      micro: step === null ? null : step.map((b) => microTensors(b, layout.cp)),
      ms: performance.now() - t,
    };
  };
  let prefetched: ReturnType<typeof fetchStep> | null = null;
  try {
    for (const c of chunks) c.train();
    while (state.iteration < trainIters) {
      const stepStart = performance.now();
      const stepGbs = stepBatchSize(state.consumedSamples);
      const numMicro = microsOf(stepGbs);
      const fetched = prefetched ?? fetchStep(numMicro);
      prefetched = null;
      if (!fetched.micro)
        throw new TrainError('DATA', `the train data ran out at iteration ${state.iteration + 1}`);
      const micro = fetched.micro;
      // with context parallelism a micro-batch's loss is normalised by the tokens of the whole
      // sequences (all cp ranks), and the objective is multiplied by cp (DDP averages over dp × cp)
      const microTokens = micro.map((m) => m.wholeMaskSum);
      const timers = {
        // the batch's host time (read ahead: during the previous step's update) and what waited here
        dataMs: fetched.ms + performance.now() - stepStart,
        forwardMs: 0,
        backwardMs: 0,
        optimizerMs: 0,
        commMs: 0,
        exposedCommMs: 0,
      };
      // the tokens that carry loss in the whole global batch (for the per-token loss)
      const [globalTokens] = tr.calculatePerTokenLoss
        ? allReduceNumbers([micro.reduce((a, m) => a + m.maskSum, 0)], layout.dp)
        : [0];
      optimizer.zeroGrad();
      // fp16: the objective (and the aux losses, as Megatron's MoEAuxLossAutoScaler) times the scale
      const lossScale = optimizer.lossScaler?.scale ?? 1;
      setAuxLossScale(auxLossScaleOf(numMicro) * lossScale);
      // the step's sums stay on the device until every micro-batch is queued (a read there would
      // wait for each forward before its backward could be queued); read after the optimizer step
      const sums = newSums();
      if (forwardBackward) {
        const f0 = performance.now();
        await runPipeline(micro, sums, { forwardOnly: false, microTokens, globalTokens, lossScale });
        // forward and backward interleave under the schedule: their time is one figure
        timers.forwardMs = performance.now() - f0;
      }
      for (const [i, mb] of (forwardBackward ? [] : micro).entries()) {
        // gradients accumulate locally over the micro-batches; the last one's backward reduces them
        const run = i < micro.length - 1 ? <T>(f: () => T) => ddp.noSync(f) : <T>(f: () => T) => f();
        run(() =>
          tidy(() => {
            const f0 = performance.now();
            const out = model.forward(mb.tokens, {
              labels: mb.labels,
              lossMask: mb.lossMask,
              positionIds: mb.positionIds,
              ...(mb.cuSeqlens ? { cuSeqlens: mb.cuSeqlens } : {}),
              ...dropoutKeys(i, mb.tokens.shape[0]),
            });
            const masked = (out.loss as Tensor).mul(mb.lossMask).sum();
            sums.loss.add(masked);
            sums.tokens += mb.maskSum;
            // Megatron: a mean over each micro-batch's tokens averaged over micro-batches (DDP
            // averages over DP), or with calculatePerTokenLoss one mean over the global batch.
            let objective = tr.calculatePerTokenLoss
              ? masked.mul(dpSize / Math.max(globalTokens, 1))
              : masked.div(Math.max(microTokens[i], 1) * numMicro).mul(cpSize);
            if (out.mtpLosses.length > 0) {
              const mtp = out.mtpLosses.reduce((a, t) => a.add(t)).div(out.mtpLosses.length);
              sums.mtp.add(mtp);
              // a CP rank's share of the MTP mean, ×cp against the DP × CP gradient average
              objective = objective.add(mtp.mul((config.model.mtpLossScalingFactor * cpSize) / numMicro));
            }
            for (const [, moe] of model.moeLayers()) {
              const r = moe.lastRouting;
              if (r?.auxLoss) sums.aux.add(r.auxLoss);
              if (r?.zLoss) sums.z.add(r.zLoss);
            }
            const b0 = performance.now();
            timers.forwardMs += b0 - f0;
            if (lossScale !== 1) objective = objective.mul(lossScale);
            objective.backward();
            timers.backwardMs += performance.now() - b0;
          }),
        );
      }
      disposeMicro(micro);
      const o0 = performance.now();
      // the update is queued without a read: the gradient norm (the clip coefficient and the skip
      // decision) stays on the device and is read with the step's sums below
      const gradNormOnDevice = optimizer.stepOnDevice();
      timers.optimizerMs = performance.now() - o0;
      // the next step's batch (the loader's host work and the copies to the device) while the
      // device runs the update, instead of after the reads below, when it would wait idle
      // (the step's live memory is read before it, so that the figure stays comparable step to step)
      const { liveBytes, cachedBytes } = memoryStats(getDefaultDevice());
      if (state.iteration + 1 < trainIters) {
        prefetched = fetchStep(microsOf(stepBatchSize(state.consumedSamples + stepGbs)));
      }
      const sync = ddp.lastSyncStats();
      timers.commMs = sync.commMs;
      timers.exposedCommMs = sync.exposedMs;
      // the step's tokens per expert over tp × dp × cp (a collective on every rank), where they
      // are: the aux-loss-free balancing update of the routers with an expert bias there, and a
      // row [layers × experts] for the metrics, each stage filling its own layers (summed over the
      // pipeline for rank 0, on the first stage), read with the step's sums below
      let loadRows: Tensor | null = null;
      if (cfg.moe) {
        const E = cfg.moe.numExperts;
        const rows = noGrad(() => zeros([moeRowCount * E], { dtype: 'float64' }));
        for (const c of chunks) {
          const g = c.takeGlobalExpertLoadOnDevice(layout.distributed ? undefined : layout.dp);
          if (!g) continue;
          if (expertBias) c.updateExpertBias(g, config.model.moeRouterBiasUpdateRate);
          // the views freed here, not when the collector finds them
          noGrad(() =>
            tidy(() => {
              g.layers.forEach((layer, i) => {
                rows.narrow(0, layer * E, E).copy_(g.load.narrow(0, i * E, E));
              });
            }),
          );
          g.load.dispose();
        }
        if (ppSize > 1) layout.pp.allReduce(rows, 'sum').waitSync();
        loadRows = rows;
      }
      // the loss lives on the last stage and each stage's MoE layers have their aux losses: sum
      // over the pipeline, then over the data-parallel ranks, on the device; the step's one read,
      // with the gradient norm and the expert loads
      const [lossAll, tokensAll, auxAll, zAll, mtpAll, gradNorm, ...loads] = reduceAndRead(
        [sums.loss, sums.tokens, sums.aux, sums.z, sums.mtp],
        [1, 1, numMicro, numMicro, numMicro],
        [layout.pp, layout.dp],
        loadRows ? [gradNormOnDevice, loadRows] : [gradNormOnDevice],
      );
      const r = optimizer.finishStep(gradNorm);
      // Megatron advances the schedule only after an update (a skipped step leaves it)
      if (r.updated) scheduler.step(stepGbs);
      state.iteration++;
      state.consumedSamples += stepGbs;
      if (!r.updated) {
        state.skippedIterations++;
        skippedSinceLog++;
      }
      const expertLoad: Record<string, number[]> = {};
      if (cfg.moe) {
        const E = cfg.moe.numExperts;
        for (const layer of moeLayerNumbers)
          expertLoad[String(layer)] = loads.slice(layer * E, (layer + 1) * E);
      }
      // what Megatron logs: the token mean of the global batch (loss_func reports [sum, tokens]),
      // whatever the objective's normalisation
      const lmLoss = lossAll / Math.max(tokensAll, 1);
      losses.push(lmLoss);
      const elapsed = performance.now() - stepStart;
      const mem = memoryStats(getDefaultDevice());
      const metrics: TrainMetrics = {
        kind: 'train',
        iteration: state.iteration,
        consumedSamples: state.consumedSamples,
        globalBatchSize: stepGbs,
        elapsedMs: elapsed,
        // the schedule's value now (every rank alike, whichever groups its shard holds)
        lr: scheduler.getLr(),
        ...(o.decoupledLr !== null
          ? {
              decoupledLr: scheduler.getLr(undefined, {
                maxLr: o.decoupledLr,
                minLr: o.decoupledMinLr ?? o.minLr,
              }),
            }
          : {}),
        lmLoss,
        gradNorm: Number.isFinite(r.gradNorm) ? r.gradNorm : null,
        skippedIterations: state.skippedIterations,
        lossScale,
        tokensPerSecond: (stepGbs * config.data.seqLength) / (elapsed / 1000),
        // the FLOPs grow with the batch (ramp-up)
        tflops: tflopsPerSecond((stepFlops * stepGbs) / gbs, elapsed / 1000, layout.world),
        memory: { liveBytes, peakBytes: mem.peakBytes, cachedBytes },
        timers,
        time: new Date().toISOString(),
      };
      if (cfg.moe || cfg.mtpNumLayers > 0) {
        metrics.moe = {};
        if (cfg.moe && config.model.moeAuxLossCoeff > 0 && config.model.moeRouterLoadBalancingType !== 'none')
          metrics.moe.auxLoss = auxAll / dpSize;
        if (cfg.moe && config.model.moeZLossCoeff > 0) metrics.moe.zLoss = zAll / dpSize;
        if (cfg.moe) metrics.moe.expertLoad = expertLoad;
        // the CP ranks' MTP shares add up to each sequence's mean: average over dp only
        if (cfg.mtpNumLayers > 0) metrics.moe.mtpLoss = (mtpAll * cpSize) / dpSize;
      }
      writeMetrics(metrics);
      const device = getDefaultDevice();
      if (!firstLogged && layout.distributed && device !== 'cpu') {
        // after the first step every group has met its device's communicator (or not)
        firstLogged = true;
        const lib = deviceCollectivesLibrary(device);
        log(
          `collectives on ${device}: ${lib ?? 'gloo through host copies (no collective library for this device)'}`,
        );
      }
      if (state.iteration % tr.logInterval === 0 || state.iteration === 1) {
        log(
          formatTrainingLogLine({
            time: new Date(),
            iteration: state.iteration,
            trainIters,
            consumedSamples: state.consumedSamples,
            elapsedMsPerIteration: elapsed,
            throughputTflopsPerGpu: metrics.tflops,
            learningRate: metrics.lr,
            ...(metrics.decoupledLr !== undefined ? { decoupledLearningRate: metrics.decoupledLr } : {}),
            globalBatchSize: stepGbs,
            lmLoss,
            ...(metrics.moe?.auxLoss !== undefined ? { loadBalancingLoss: metrics.moe.auxLoss } : {}),
            ...(metrics.moe?.zLoss !== undefined ? { zLoss: metrics.moe.zLoss } : {}),
            ...(metrics.moe?.mtpLoss !== undefined ? { mtpLosses: [metrics.moe.mtpLoss] } : {}),
            lossScale,
            gradNorm: metrics.gradNorm,
            // Megatron: the iterations skipped since the previous line
            skippedIterations: skippedSinceLog,
            nanIterations: Number.isFinite(lmLoss) ? 0 : 1,
            tokensPerSecond: metrics.tokensPerSecond,
            memoryLiveGiB: liveBytes / 2 ** 30,
            memoryPeakGiB: mem.peakBytes / 2 ** 30,
          }),
        );
        skippedSinceLog = 0;
      }
      if (tr.evalInterval && state.iteration % tr.evalInterval === 0) await evaluate('valid');
      const saveNow =
        config.checkpoint.saveInterval && state.iteration % config.checkpoint.saveInterval === 0;
      if (saveNow) save();
      // a turn of the event loop: signal handlers (SIGINT/SIGTERM) and pending output run here
      // signal handlers (SIGINT/SIGTERM) and pending output run here
      const stop = await stopAfterIteration(config, opts, layout, state.iteration, t0);
      if (stop) {
        if (!saveNow) save();
        exitReason = stop;
        break;
      }
    }
    if (exitReason === 'done') {
      // every rank decides alike (the save is collective): a save of this iteration already done
      if (config.checkpoint.save && savedIteration !== state.iteration) save();
      // then, as Megatron's pretrain, the validation of the finished run (on the next validation
      // batches) and the test evaluation (with a test split or --test-data-path)
      await evaluate('valid', 'validation set');
      await evaluate('test', 'test set');
    }
  } finally {
    // a batch read ahead for a step that did not run (a stop, an error)
    disposeMicro(prefetched?.micro ?? []);
    if (metricsFd !== null) fs.closeSync(metricsFd);
    tensorboard?.close();
    metricsClosed = true;
    // the optimizer's masters and moments, the gradient buffers, the weights (the run's `owned`,
    // newest first, the list emptied): freed here, not whenever the collector runs (on a GPU it
    // does not see the device memory they hold)
    for (const o of owned.splice(0).reverse()) o.dispose();
    if (layout.distributed) {
      destroyModelParallel();
      await destroyProcessGroup();
    }
  }
  await finishRun(config, opts, { logRank, exitReason, metricsClosed, log });
  return { iteration: state.iteration, losses, checkpoints, exitReason };
}
