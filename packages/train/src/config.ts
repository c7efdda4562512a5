// The run configuration: one zod schema for a training run, named as Megatron-LM's arguments in
// camelCase (units in the names), read from a YAML or JSON file plus dotted `--section.key value`
// overrides. An unknown or misspelled key is an error that names the nearest valid one.
import * as fs from 'node:fs';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { TrainError } from './errors.js';
import {
  ARCHITECTURE_FLAGS,
  ArchitectureSection,
  knownMegatronFlags,
  megatronFlag,
} from './megatron-flags.js';

const posInt = z.number().int().positive();
const nonNegInt = z.number().int().nonnegative();

/** Where the model comes from and how it is built. */
export const ModelSection = z.strictObject({
  /** Weights to start from: a Hugging Face folder or a megapatch checkpoint (any layout). */
  load: z.string().min(1).nullable().default(null),
  /** Build from scratch with Megatron's initialisation: an HF config.json (or its folder). */
  config: z.string().min(1).nullable().default(null),
  /**
   * With a Megatron-LM checkpoint (torch or torch_dist format) as load or checkpoint.load: the HF
   * config.json (or its folder) that describes the model; its tokenizer and export files are used.
   */
  hfConfig: z.string().min(1).nullable().default(null),
  /**
   * Parameter and activation dtype; bf16 and fp16 keep fp32 master weights and gradients (Megatron
   * --bf16 / --fp16); fp16 also scales the loss (optimizer.lossScale, initialLossScale, ...).
   */
  dtype: z.enum(['fp32', 'bf16', 'fp16']).default('bf16'),
  /** Megatron --init-method-std (from scratch). */
  initMethodStd: z.number().positive().default(0.02),
  /** Megatron --make-vocab-size-divisible-by (from scratch; loaded models keep theirs). */
  makeVocabSizeDivisibleBy: posInt.default(128),
  /** Megatron --recompute-granularity. */
  recomputeGranularity: z.enum(['full', 'selective']).nullable().default(null),
  /** Megatron --recompute-modules (selective). */
  recomputeModules: z.array(z.enum(['core_attn', 'mla_up_proj', 'moe', 'mlp'])).default(['core_attn']),
  /**
   * Megatron --recompute-method (full granularity): 'uniform' recomputes every layer, keeping the
   * input of each group of recomputeNumLayers layers only; 'block' only the first
   * recomputeNumLayers layers of each pipeline stage (model chunk). Null: every layer.
   */
  recomputeMethod: z.enum(['uniform', 'block']).nullable().default(null),
  /** Megatron --recompute-num-layers (with recomputeMethod). */
  recomputeNumLayers: nonNegInt.nullable().default(null),
  /**
   * The architecture a Megatron run script states (--num-layers, --hidden-size, --num-experts, ...):
   * megapatch takes the architecture from the model's config and checks each key given here
   * against it before building anything.
   */
  architecture: ArchitectureSection.default({}),
  /**
   * Megatron --hidden-dropout: dropout of the embedding's output and of each attention and MLP
   * output before its residual add. Default 0: Megatron's default is 0.1, its and Pai's LLM
   * scripts give 0. The masks are keyed by each sample's place in the run, so every layout (and a
   * resume in another layout) drops the same elements.
   */
  hiddenDropout: z.number().min(0).lt(1).default(0),
  /** Megatron --attention-dropout: dropout of the attention probabilities. Default 0. */
  attentionDropout: z.number().min(0).lt(1).default(0),
  /** Megatron --moe-aux-loss-coeff. */
  moeAuxLossCoeff: z.number().nonnegative().default(0),
  /** Megatron --moe-z-loss-coeff. */
  moeZLossCoeff: z.number().nonnegative().default(0),
  /**
   * Megatron --moe-router-load-balancing-type: 'aux_loss' (over each micro-batch's tokens),
   * 'seq_aux_loss' (per sample, DeepSeek-V2/V3's sequence-wise loss) or 'none'.
   */
  moeRouterLoadBalancingType: z.enum(['aux_loss', 'seq_aux_loss', 'none']).default('aux_loss'),
  /** Megatron --moe-router-bias-update-rate (aux-loss-free balancing; models with an expert bias). */
  moeRouterBiasUpdateRate: z.number().nonnegative().default(1e-3),
  /** Megatron --moe-token-dispatcher-type: how tokens reach their experts across EP ranks. */
  moeTokenDispatcherType: z.enum(['allgather', 'alltoall']).default('allgather'),
  /** Megatron --moe-expert-capacity-factor (null: dropless). */
  moeExpertCapacityFactor: z.number().nullable().default(null),
  /** Megatron --moe-token-drop-policy (with a capacity factor). */
  moeTokenDropPolicy: z.enum(['probs', 'position']).default('probs'),
  /** Megatron --moe-pad-expert-input-to-capacity (with a capacity factor). */
  moePadExpertInputToCapacity: z.boolean().default(false),
  /** Megatron --mtp-loss-scaling-factor (models with MTP layers). */
  mtpLossScalingFactor: z.number().nonnegative().default(0.1),
});

/** Pre-training data: Megatron indexed datasets sampled as GPTDataset / BlendedDataset. */
export const DataSection = z.strictObject({
  /**
   * Megatron --data-path: one prefix (`<prefix>.bin/.idx`), or weights and prefixes alternated
   * (`[0.3, a, 0.7, b]`) for a blend.
   */
  dataPath: z
    .array(z.union([z.string().min(1), z.number().positive()]))
    .min(1)
    .nullable()
    .default(null),
  /**
   * Megatron --train-data-path, instead of dataPath: the training data whole (no split), one prefix
   * or a weighted blend, as dataPath.
   */
  trainDataPath: z
    .array(z.union([z.string().min(1), z.number().positive()]))
    .min(1)
    .nullable()
    .default(null),
  /** Megatron --valid-data-path (with trainDataPath): the validation data whole; null: no validation. */
  validDataPath: z
    .array(z.union([z.string().min(1), z.number().positive()]))
    .min(1)
    .nullable()
    .default(null),
  /**
   * Megatron --test-data-path (with trainDataPath): the test data whole, evaluated once when the
   * run ends (training.evalIters global batches); null: no test evaluation.
   */
  testDataPath: z
    .array(z.union([z.string().min(1), z.number().positive()]))
    .min(1)
    .nullable()
    .default(null),
  /**
   * Fine-tuning data instead of dataPath: the output prefix of `megapatch preprocess sft`; packed
   * rows (cuSeqlens, micro batch 1) or one padded sample per row; Pai-Megatron-Patch's
   * per-sequence loss weighs each sample equally.
   */
  sft: z
    .strictObject({
      prefix: z.string().min(1),
      packing: z.boolean().default(true),
      perSequenceLoss: z.boolean().default(false),
      /**
       * Pad each sample to a multiple of this many tokens (no loss) before packing; with context
       * parallelism the trainer pads to a multiple of 2·cp anyway (Megatron's SFT padding).
       */
      padToMultipleOf: posInt.default(1),
    })
    .nullable()
    .default(null),
  /** Megatron --split: train, validation and test proportions. */
  split: z.string().default('969,30,1'),
  /** Megatron --seq-length. */
  seqLength: posInt,
  /** Megatron --data-cache-path (default: beside the run directory). */
  dataCachePath: z.string().nullable().default(null),
  /** Megatron --reset-position-ids. */
  resetPositionIds: z.boolean().default(false),
  /** Megatron --reset-attention-mask (documents never attend to each other: packed rows). */
  resetAttentionMask: z.boolean().default(false),
  /** Megatron --eod-mask-loss. */
  eodMaskLoss: z.boolean().default(false),
  /** End-of-document token id (default: the tokenizer's, else the model's vocabulary's last id). */
  eodTokenId: nonNegInt.nullable().default(null),
});

/** Batches, length of the run, evaluation and exits. */
export const TrainingSection = z.strictObject({
  /**
   * Where the run's tensors live: "cpu" (default), "cuda" / "cuda:<i>" (with @megapatch/cuda;
   * "cuda" is cuda:<LOCAL_RANK>, one GPU per process), "cudaemu" / "cudaemu:<i>" (the CUDA kernels
   * on the CPU, by @megapatch/cuda's emulator: slow, for checking them), or "ref:<i>" (the
   * reference backend of @megapatch/tensor, for checking device-agnostic code).
   */
  device: z.string().min(1).default('cpu'),
  microBatchSize: posInt.default(1),
  globalBatchSize: posInt,
  /** Megatron --train-iters (give it or trainSamples). */
  trainIters: posInt.nullable().default(null),
  /**
   * Megatron --train-samples: sample-based training, trainSamples / globalBatchSize iterations
   * (rounded down), the schedule counted in samples (scheduler.lrDecaySamples, lrWarmupSamples).
   */
  trainSamples: posInt.nullable().default(null),
  /**
   * Megatron --rampup-batch-size <start> <increment> <samples> (with trainSamples): the global
   * batch starts at `start` samples and grows by `increment` evenly over the first `samples`
   * samples up to globalBatchSize; each size must be a multiple of microBatchSize × data-parallel
   * size.
   */
  rampupBatchSize: z
    .tuple([posInt, posInt, nonNegInt], {
      error:
        'give three whole numbers: [start, increment, samples] (--rampup-batch-size <start> <increment> <samples>)',
    })
    .nullable()
    .default(null),
  seed: nonNegInt.default(1234),
  logInterval: posInt.default(100),
  evalInterval: posInt.nullable().default(1000),
  evalIters: nonNegInt.default(100),
  /** Megatron --exit-interval: stop (after saving) when the iteration is a multiple of it. */
  exitInterval: posInt.nullable().default(null),
  /** Megatron --exit-duration-in-mins: stop (after saving) once the run has lasted this long. */
  exitDurationInMins: z.number().positive().nullable().default(null),
  /** Megatron --calculate-per-token-loss: one token mean over the global batch (else a mean of micro-batch means). */
  calculatePerTokenLoss: z.boolean().default(false),
  /**
   * Megatron --gradient-accumulation-fusion (on by default; --no-gradient-accumulation-fusion turns
   * it off): linear layers add their weight gradients straight into the float32 main gradients in
   * the weight-gradient GEMM, where the device has the fused kernel (CUDA); elsewhere it changes
   * nothing. See @megapatch/tensor's setGradientAccumulationFusion.
   */
  gradientAccumulationFusion: z.boolean().default(true),
});

/** AdamW with Megatron's parameter groups (no weight decay on biases and norms). */
export const OptimizerSection = z.strictObject({
  lr: z.number().positive(),
  minLr: z.number().nonnegative().default(0),
  weightDecay: z.number().nonnegative().default(0.01),
  adamBeta1: z.number().min(0).lt(1).default(0.9),
  adamBeta2: z.number().min(0).lt(1).default(0.999),
  adamEps: z.number().positive().default(1e-8),
  /**
   * Megatron --decoupled-lr: the word embeddings' and output layer's own peak learning rate (their
   * schedule runs from it to decoupledMinLr; null: the one schedule of every parameter).
   */
  decoupledLr: z.number().nonnegative().nullable().default(null),
  /** Megatron --decoupled-min-lr (default minLr). */
  decoupledMinLr: z.number().nonnegative().nullable().default(null),
  /** Megatron --start-weight-decay (a weight-decay schedule; null: weightDecay throughout). */
  startWeightDecay: z.number().nonnegative().nullable().default(null),
  /** Megatron --end-weight-decay. */
  endWeightDecay: z.number().nonnegative().nullable().default(null),
  /** Megatron --weight-decay-incr-style: how weight decay moves from start to end over lrDecayIters. */
  weightDecayIncrStyle: z.enum(['constant', 'linear', 'cosine']).default('constant'),
  /** Megatron --clip-grad (0: no clipping). */
  clipGrad: z.number().nonnegative().default(1),
  /** Megatron --loss-scale (fp16): a constant loss scale; null: the dynamic scale below. */
  lossScale: z.number().positive().nullable().default(null),
  /** Megatron --initial-loss-scale (fp16, dynamic). */
  initialLossScale: z
    .number()
    .positive()
    .default(2 ** 32),
  /** Megatron --min-loss-scale (fp16, dynamic). */
  minLossScale: z.number().positive().default(1),
  /** Megatron --loss-scale-window: clean iterations before the dynamic scale doubles. */
  lossScaleWindow: posInt.default(1000),
  /** Megatron --hysteresis: iterations with inf/NaN gradients tolerated before the scale halves. */
  hysteresis: posInt.default(2),
  /**
   * Megatron --optimizer-cpu-offload: the fp32 master weights and AdamW moments live in host
   * memory and the update runs there (gradients copied to the host, new values back each step),
   * so the device holds only parameters, gradients and activations: 12 bytes per bf16 parameter
   * (divided by the data-parallel size with the distributed optimizer) move to the host.
   */
  optimizerCpuOffload: z.boolean().default(false),
  /** Megatron --optimizer-offload-fraction: the share of each rank's optimizer state offloaded. */
  optimizerOffloadFraction: z.number().min(0).max(1).default(1),
});

/** Megatron's learning-rate schedule. */
export const SchedulerSection = z.strictObject({
  lrDecayStyle: z.enum(['constant', 'linear', 'cosine', 'inverse-square-root', 'WSD']).default('linear'),
  lrWarmupIters: nonNegInt.default(0),
  /** Megatron --lr-warmup-fraction: warm up over this fraction of lrDecayIters (instead of lrWarmupIters). */
  lrWarmupFraction: z.number().min(0).lt(1).nullable().default(null),
  /** Megatron --lr-warmup-init: the learning rate the warm-up starts from. */
  lrWarmupInit: z.number().nonnegative().default(0),
  /**
   * Megatron --override-opt_param-scheduler: a resumed run keeps this config's schedule (lr, minLr,
   * warm-up, decay) and takes only the step from the checkpoint.
   */
  overrideOptParamScheduler: z.boolean().default(false),
  /** Default: trainIters. */
  lrDecayIters: posInt.nullable().default(null),
  /** WSD: iterations of the final anneal. */
  lrWsdDecayIters: posInt.nullable().default(null),
  /** Megatron --lr-decay-samples (sample-based training; default: trainSamples). */
  lrDecaySamples: posInt.nullable().default(null),
  /** Megatron --lr-warmup-samples (sample-based training). */
  lrWarmupSamples: nonNegInt.default(0),
  /** Megatron --lr-wsd-decay-samples (sample-based WSD; default: trainSamples). */
  lrWsdDecaySamples: posInt.nullable().default(null),
  lrWsdDecayStyle: z.enum(['linear', 'cosine', 'exponential', 'minus_sqrt']).default('exponential'),
});

/** The parallel layout (data parallelism is what remains of the world). */
export const ParallelSection = z.strictObject({
  tensorModelParallelSize: posInt.default(1),
  expertModelParallelSize: posInt.default(1),
  /** Megatron --expert-tensor-parallel-size (default: tensorModelParallelSize). */
  expertTensorParallelSize: posInt.nullable().default(null),
  /** Megatron --pipeline-model-parallel-size: the decoder's layers are split into this many stages (1F1B). */
  pipelineModelParallelSize: posInt.default(1),
  /**
   * Megatron --num-virtual-stages-per-pipeline-rank (--virtual-pipeline-model-parallel-size): model
   * chunks per pipeline rank for the interleaved schedule (null: 1F1B).
   */
  virtualPipelineModelParallelSize: posInt.nullable().default(null),
  /** Megatron --microbatch-group-size-per-virtual-pipeline-stage (default: the pipeline size). */
  microbatchGroupSizePerVpStage: posInt.nullable().default(null),
  /**
   * Megatron --num-layers-per-virtual-pipeline-stage: sets virtualPipelineModelParallelSize to
   * numLayers / (pipelineModelParallelSize × this) once the model's layers are known.
   */
  numLayersPerVirtualPipelineStage: posInt.nullable().default(null),
  /** Megatron --decoder-first-pipeline-num-layers (uneven stages). */
  decoderFirstPipelineNumLayers: posInt.nullable().default(null),
  /** Megatron --decoder-last-pipeline-num-layers (uneven stages). */
  decoderLastPipelineNumLayers: posInt.nullable().default(null),
  /** Megatron --pipeline-model-parallel-layout, e.g. "E|t*3|t,L" (one stage per rank here). */
  pipelineModelParallelLayout: z.string().min(1).nullable().default(null),
  /**
   * Megatron --context-parallel-size: each sequence is split into 2·cp chunks (rank r holds
   * chunks r and 2·cp−1−r) and attention runs as a ring over the cp group; gradients are reduced
   * over dp × cp. seqLength (and every packed sample) must be a multiple of 2·cp.
   */
  contextParallelSize: posInt.default(1),
  /**
   * Megatron --cp-comm-type: how attention crosses the cp group. p2p: a ring of key/value
   * exchanges; a2a: two all-to-alls per attention that give each rank cp-th of the heads over
   * whole sequences (DeepSpeed-Ulysses; cp must divide the query and key/value heads of each TP
   * rank, and attention dropout must be 0).
   */
  cpCommType: z
    .enum(['p2p', 'a2a'], {
      error: (i) =>
        `must be p2p or a2a, got ${JSON.stringify(i.input)} (megapatch has no allgather or hierarchical a2a+p2p)`,
    })
    .default('p2p'),
  sequenceParallel: z.boolean().default(false),
  useDistributedOptimizer: z.boolean().default(false),
  /** Megatron --ddp-bucket-size, in MB (default: Megatron's rule). */
  ddpBucketSizeMb: z.number().positive().nullable().default(null),
});

/** Checkpoints. */
export const CheckpointSection = z.strictObject({
  /** Megatron --save: the checkpoint root written every saveInterval and at the end. */
  save: z.string().min(1).nullable().default(null),
  saveInterval: posInt.nullable().default(null),
  /** Megatron --load: resume from this training checkpoint (model, optimizer, scheduler, RNG, data position). */
  load: z.string().min(1).nullable().default(null),
  /** Megatron --finetune: load weights only from `load`, start at iteration 0. */
  finetune: z.boolean().default(false),
  /** Megatron --no-load-optim: resume the weights and position, not the optimizer state or LR schedule. */
  noLoadOptim: z.boolean().default(false),
  /** Megatron --no-load-rng: resume without the checkpoint's random-number state. */
  noLoadRng: z.boolean().default(false),
  /** Megatron --no-save-optim: checkpoints without the optimizer state and LR schedule (a resume starts them fresh). */
  noSaveOptim: z.boolean().default(false),
  /** Megatron --no-save-rng: checkpoints without the random-number state. */
  noSaveRng: z.boolean().default(false),
  /** Keep the last N checkpoints (null: all). */
  ckptKeep: posInt.nullable().default(null),
  /** Export the final model to this Hugging Face folder. */
  exportHf: z.string().min(1).nullable().default(null),
});

/** Where the run writes its config, metrics and report. */
export const LoggingSection = z.strictObject({
  runDir: z.string().min(1),
  /**
   * Megatron --tensorboard-dir: TensorBoard event files of the run's scalars (Megatron's tags:
   * `lm loss`, `learning-rate`, `grad-norm`, ...) are written here too. From the command line,
   * the run folder defaults to it.
   */
  tensorboardDir: z.string().min(1).nullable().default(null),
});

/**
 * Reinforcement learning from rewards (GRPO, as verl's and ChatLearn's GRPO trainers), instead of a
 * data source: each iteration takes `promptsPerStep` prompts, generates `groupSize` responses to
 * each with the policy (the rollout), scores them with the reward function, normalises the rewards
 * within each prompt's group (the advantages) and updates the policy with the PPO clipped loss on
 * mini-batches of training.globalBatchSize responses (microBatchSize per forward), ppoEpochs times,
 * plus klLossCoef times a KL estimate against the reference model.
 */
export const RlSection = z.strictObject({
  algorithm: z.enum(['grpo']).default('grpo'),
  /**
   * The prompts: JSON lines with "prompt" (text) or "messages" (a chat, rendered with the model's
   * chat template), and any other fields the reward function reads ("answer" for the built-in ones).
   */
  promptsPath: z.string().min(1),
  /** Render each text prompt as one user message with the chat template and its generation prompt. */
  chat: z.boolean().default(false),
  /** Prompts per iteration (verl data.train_batch_size). */
  promptsPerStep: posInt,
  /** Responses per prompt (verl rollout.n, ChatLearn num_inference_per_prompt). */
  groupSize: posInt.default(8),
  /** Tokens generated at most per response (verl data.max_response_length). */
  maxNewTokens: posInt.default(256),
  /** Sampling temperature of the rollout; the log-probabilities are of the same tempered policy. */
  temperature: z.number().positive().default(1),
  topP: z.number().gt(0).lte(1).default(1),
  topK: nonNegInt.default(0),
  /**
   * Prompts whose groups one batched generate call holds (all of this replica's prompts of the
   * iteration at most). Each group still draws from a generator seeded by its prompt's index, so
   * the responses are those of one group per call (default 1), up to the last bits of the logits
   * that padding the prompts to one length may move; more prompts per call keep a GPU busy.
   */
  promptsPerGenerate: posInt.default(1),
  /** Passes over each rollout's mini-batches (verl ppo_epochs). */
  ppoEpochs: posInt.default(1),
  /** The ratio is clipped to [1 − clipRatioLow, 1 + clipRatioHigh] (verl clip_ratio_low/high, DAPO's clip-higher). */
  clipRatioLow: z.number().min(0).lt(1).default(0.2),
  clipRatioHigh: z.number().min(0).default(0.2),
  /** Dual-clip bound of negative advantages (verl clip_ratio_c); null: none. */
  clipRatioC: z.number().gt(1).nullable().default(3),
  /** "vanilla" (PPO's token ratio) or "gspo" (GSPO's sequence ratio; use small clip ratios such as 3e-4, 4e-4). */
  policyLoss: z.enum(['vanilla', 'gspo']).default('vanilla'),
  /** verl's loss_agg_mode, over each whole mini-batch. */
  lossAggregation: z
    .enum(['token-mean', 'seq-mean-token-sum', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'])
    .default('token-mean'),
  /** Weight of the KL loss against the reference model (verl kl_loss_coef); 0: no reference model. */
  klLossCoef: z.number().min(0).default(0.001),
  /** The KL estimator (verl kl_loss_type). */
  klLossType: z.enum(['kl', 'abs', 'mse', 'low_var_kl']).default('low_var_kl'),
  /** The reference model (a Hugging Face folder or a megapatch checkpoint); default: model.load. */
  referenceModel: z.string().min(1).nullable().default(null),
  /** Divide the advantages by the group's standard deviation (verl norm_adv_by_std_in_grpo; false: Dr. GRPO). */
  normAdvByStd: z.boolean().default(true),
  advantageEpsilon: z.number().positive().default(1e-6),
  /**
   * The reward of each response: "math" (1 when the response's final number equals the prompt
   * line's "answer", GSM8K style: the number after "####", else the last number; 0 otherwise),
   * "exact" (1 when the response, trimmed, equals "answer"), or the path of a JavaScript module
   * whose default export is `(response: string, sample: object) => number` (or a promise of one).
   */
  reward: z.string().min(1).default('math'),
  /**
   * Write every response to `<runDir>/rollouts/dp<r>.jsonl` (one file per data-parallel replica):
   * iteration, prompt index and line, token ids, text, finish reason, reward and advantage.
   */
  saveRollouts: z.boolean().default(false),
  /**
   * Held-out prompts (the same format) whose mean reward is measured before training, every
   * training.evalInterval iterations and when the run ends: one response per prompt at
   * validTemperature (verl's validation; null: none).
   */
  validPromptsPath: z.string().min(1).nullable().default(null),
  /** Sampling temperature of the validation responses (0: greedy, as verl's do_sample false). */
  validTemperature: z.number().min(0).default(0),
});

/**
 * Direct preference optimisation (DPO, as TRL's DPOTrainer and LLaMA-Factory's `stage: dpo`),
 * instead of a data source: each step reads training.globalBatchSize preference pairs (a prompt
 * conversation, a chosen and a rejected reply), rendered with the model's chat template, and
 * lowers the DPO loss of the policy against the frozen reference model.
 */
export const DpoSection = z.strictObject({
  /**
   * The pairs: a JSON array or JSON lines, ShareGPT (`conversations` + `chosen` / `rejected` turns,
   * LLaMA-Factory's dpo data), Alpaca (`instruction`, `input`, `chosen`, `rejected`) or TRL's
   * (`prompt`, `chosen`, `rejected`: strings or message lists).
   */
  pairsPath: z.string().min(1),
  /** Held-out pairs, evaluated every training.evalInterval iterations and at the end (null: none). */
  validPairsPath: z.string().min(1).nullable().default(null),
  /** β, the weight of the implicit KL to the reference (TRL beta, LLaMA-Factory pref_beta). */
  beta: z.number().positive().default(0.1),
  /** "sigmoid" (DPO), "hinge" (SLiC) or "ipo" (IPO). */
  lossType: z.enum(['sigmoid', 'hinge', 'ipo']).default('sigmoid'),
  /** cDPO's label smoothing (sigmoid only). */
  labelSmoothing: z.number().min(0).lt(0.5).default(0),
  /** Weight of the chosen replies' SFT loss added (LLaMA-Factory pref_ftx; TRL's rpo_alpha). */
  ftx: z.number().min(0).default(0),
  /** The reference model (a Hugging Face folder or a megapatch checkpoint); default: model.load. */
  referenceModel: z.string().min(1).nullable().default(null),
  /**
   * A longer prompt keeps its last tokens (TRL's max_prompt_length with keep_end; BOS stays); then
   * each conversation is cut to data.seqLength tokens, the reply's end first. Default: half of
   * data.seqLength.
   */
  maxPromptLength: posInt.nullable().default(null),
});

/** A whole run. */
export const RunConfig = z
  .strictObject({
    model: ModelSection,
    data: DataSection,
    training: TrainingSection,
    optimizer: OptimizerSection,
    scheduler: SchedulerSection.default(SchedulerSection.parse({})),
    parallel: ParallelSection.default(ParallelSection.parse({})),
    checkpoint: CheckpointSection.default(CheckpointSection.parse({})),
    logging: LoggingSection,
    /** Reinforcement learning (GRPO) instead of a data source. */
    rl: RlSection.nullable().default(null),
    /** Preference optimisation (DPO) instead of a data source. */
    dpo: DpoSection.nullable().default(null),
  })
  .superRefine((c, ctx) => {
    if ((c.model.load === null) === (c.model.config === null) && c.checkpoint.load === null) {
      ctx.addIssue({
        code: 'custom',
        path: ['model'],
        message: 'give exactly one of model.load (weights to start from) and model.config (from scratch)',
      });
    }
    const sources = [c.data.dataPath, c.data.trainDataPath, c.data.sft].filter((x) => x !== null).length;
    if (c.dpo !== null) {
      const issue = (path: string[], message: string) => ctx.addIssue({ code: 'custom', path, message });
      if (c.rl !== null) issue(['dpo'], 'give one of dpo (preference pairs) and rl (prompts and a reward)');
      if (sources > 0) issue(['data'], 'DPO reads its pairs from dpo.pairsPath: drop the data source');
      if (c.training.trainSamples !== null || c.training.rampupBatchSize !== null)
        issue(['training', 'trainSamples'], 'DPO counts iterations: give training.trainIters');
      if (c.dpo.labelSmoothing > 0 && c.dpo.lossType !== 'sigmoid')
        issue(
          ['dpo', 'labelSmoothing'],
          `label smoothing is cDPO's, of the sigmoid loss, not ${c.dpo.lossType}`,
        );
      if (c.dpo.maxPromptLength !== null && c.dpo.maxPromptLength >= c.data.seqLength)
        issue(
          ['dpo', 'maxPromptLength'],
          `${c.dpo.maxPromptLength} leaves no room for the reply in data.seqLength ${c.data.seqLength}`,
        );
      if (c.dpo.referenceModel === null && c.model.load === null)
        issue(
          ['dpo', 'referenceModel'],
          'DPO needs a reference model: give dpo.referenceModel (or model.load)',
        );
      if (c.model.hiddenDropout > 0 || c.model.attentionDropout > 0)
        issue(
          ['model', 'hiddenDropout'],
          'DPO compares the policy with the reference on the same replies (TRL turns dropout off): set model.hiddenDropout and model.attentionDropout 0',
        );
    } else if (c.rl !== null) {
      const r = c.rl;
      const issue = (path: string[], message: string) => ctx.addIssue({ code: 'custom', path, message });
      if (sources > 0)
        issue(
          ['data'],
          'reinforcement learning (rl) reads its prompts from rl.promptsPath: drop the data source',
        );
      if (c.training.trainSamples !== null || c.training.rampupBatchSize !== null)
        issue(
          ['training', 'trainSamples'],
          'reinforcement learning counts iterations: give training.trainIters',
        );
      if (c.training.globalBatchSize % r.groupSize !== 0)
        issue(
          ['training', 'globalBatchSize'],
          `an RL mini-batch holds whole groups: ${c.training.globalBatchSize} responses is not a multiple of rl.groupSize ${r.groupSize}`,
        );
      else if ((r.promptsPerStep * r.groupSize) % c.training.globalBatchSize !== 0)
        issue(
          ['training', 'globalBatchSize'],
          `each iteration's ${r.promptsPerStep} × ${r.groupSize} responses do not make whole mini-batches of ${c.training.globalBatchSize}`,
        );
      if (r.maxNewTokens >= c.data.seqLength)
        issue(
          ['rl', 'maxNewTokens'],
          `${r.maxNewTokens} leaves no room for the prompt in data.seqLength ${c.data.seqLength} (prompt + response tokens)`,
        );
      if (r.klLossCoef > 0 && r.referenceModel === null && c.model.load === null)
        issue(
          ['rl', 'referenceModel'],
          'the KL loss needs a reference model: give rl.referenceModel (or model.load), or set rl.klLossCoef 0',
        );
      if (c.model.hiddenDropout > 0 || c.model.attentionDropout > 0)
        issue(
          ['model', 'hiddenDropout'],
          'reinforcement learning compares log-probabilities of the rollout and the update: set model.hiddenDropout and model.attentionDropout 0',
        );
    } else if (sources !== 1) {
      ctx.addIssue({
        code: 'custom',
        path: ['data'],
        message:
          'give exactly one of data.dataPath (pre-training, split by data.split), data.trainDataPath (pre-training, with data.validDataPath) and data.sft (fine-tuning)',
      });
    }
    for (const key of ['validDataPath', 'testDataPath'] as const) {
      if (c.data[key] !== null && c.data.trainDataPath === null) {
        ctx.addIssue({
          code: 'custom',
          path: ['data', key],
          message:
            'goes with data.trainDataPath (data.dataPath is split into train, validation and test by data.split)',
        });
      }
    }
    if (c.data.sft?.packing && c.training.microBatchSize !== 1) {
      ctx.addIssue({
        code: 'custom',
        path: ['training', 'microBatchSize'],
        message: 'packed SFT rows (data.sft.packing) need microBatchSize 1',
      });
    }
    // iterations or samples, as Megatron's argument checks
    const t = c.training;
    const sch = c.scheduler;
    if ((t.trainIters === null) === (t.trainSamples === null)) {
      ctx.addIssue({
        code: 'custom',
        path: ['training', 'trainIters'],
        message:
          'give one of training.trainIters (--train-iters) and training.trainSamples (--train-samples)',
      });
    } else if (t.rampupBatchSize !== null && t.trainSamples === null) {
      ctx.addIssue({
        code: 'custom',
        path: ['training', 'rampupBatchSize'],
        message:
          'Megatron ramps the batch size up over samples: give training.trainSamples (--train-samples), not trainIters',
      });
    } else if (t.trainSamples !== null) {
      if (t.rampupBatchSize !== null) {
        const [start, increment] = t.rampupBatchSize;
        const diff = t.globalBatchSize - start;
        if (diff <= 0 || diff % increment !== 0) {
          ctx.addIssue({
            code: 'custom',
            path: ['training', 'rampupBatchSize'],
            message: `the ramp grows from ${start} by ${increment} to globalBatchSize ${t.globalBatchSize}: give a start below it and an increment that divides the difference`,
          });
        }
      }
      if (t.trainSamples < t.globalBatchSize && t.rampupBatchSize === null) {
        ctx.addIssue({
          code: 'custom',
          path: ['training', 'trainSamples'],
          message: `${t.trainSamples} samples make no iteration of globalBatchSize ${t.globalBatchSize}`,
        });
      }
    }
    // each schedule length in the run's unit (Megatron's assertions): iterations or samples
    if ((t.trainIters === null) !== (t.trainSamples === null)) {
      const bySamples = t.trainSamples !== null;
      const pairs = [
        ['lrDecayIters', 'lrDecaySamples'],
        ['lrWarmupIters', 'lrWarmupSamples'],
        ['lrWsdDecayIters', 'lrWsdDecaySamples'],
      ] as const;
      for (const [iters, samples] of pairs) {
        const key = bySamples ? iters : samples;
        if (sch[key] === null || sch[key] === 0) continue;
        ctx.addIssue({
          code: 'custom',
          path: ['scheduler', key],
          message: bySamples
            ? `sample-based training (training.trainSamples) counts the schedule in samples: give scheduler.${samples} instead`
            : `iteration-based training (training.trainIters) counts the schedule in iterations: give scheduler.${iters}, or training.trainSamples`,
        });
      }
    }
    if (
      c.parallel.cpCommType === 'a2a' &&
      c.parallel.contextParallelSize > 1 &&
      c.model.attentionDropout > 0
    ) {
      ctx.addIssue({
        code: 'custom',
        path: ['parallel', 'cpCommType'],
        message: `a2a runs attention without dropout, but model.attentionDropout is ${c.model.attentionDropout}: set it to 0 or use cpCommType p2p`,
      });
    }
    // what Megatron's scheduler asserts, in the config's words (not the samples it counts in)
    const decay = c.scheduler.lrDecayIters ?? trainIterations(c);
    if (
      c.scheduler.lrWarmupFraction !== null &&
      (c.scheduler.lrWarmupIters !== 0 || sch.lrWarmupSamples !== 0)
    ) {
      ctx.addIssue({
        code: 'custom',
        path: ['scheduler', 'lrWarmupFraction'],
        message: `give one of lrWarmupFraction and ${sch.lrWarmupSamples !== 0 ? 'lrWarmupSamples' : 'lrWarmupIters'}`,
      });
    }
    if (t.trainSamples !== null && sch.lrWarmupSamples >= (sch.lrDecaySamples ?? t.trainSamples)) {
      ctx.addIssue({
        code: 'custom',
        path: ['scheduler', 'lrWarmupSamples'],
        message: `${sch.lrWarmupSamples} warm-up samples leave none to decay over: make it less than ${
          sch.lrDecaySamples === null
            ? `training.trainSamples (${t.trainSamples}; scheduler.lrDecaySamples defaults to it)`
            : `scheduler.lrDecaySamples (${sch.lrDecaySamples})`
        }`,
      });
    }
    if (c.scheduler.lrWarmupInit > c.optimizer.lr) {
      ctx.addIssue({
        code: 'custom',
        path: ['scheduler', 'lrWarmupInit'],
        message: `${c.scheduler.lrWarmupInit} is above optimizer.lr (${c.optimizer.lr}): the warm-up rises from lrWarmupInit to lr`,
      });
    }
    const o = c.optimizer;
    if (o.decoupledMinLr !== null && o.decoupledLr === null) {
      ctx.addIssue({
        code: 'custom',
        path: ['optimizer', 'decoupledMinLr'],
        message: 'goes with optimizer.decoupledLr',
      });
    }
    if (o.decoupledLr !== null && (o.decoupledMinLr ?? o.minLr) > o.decoupledLr) {
      ctx.addIssue({
        code: 'custom',
        path: ['optimizer', 'decoupledMinLr'],
        message: `${o.decoupledMinLr ?? o.minLr}${o.decoupledMinLr === null ? ' (minLr)' : ''} is above optimizer.decoupledLr (${o.decoupledLr})`,
      });
    }
    if (o.startWeightDecay !== null || o.endWeightDecay !== null) {
      const start = o.startWeightDecay ?? o.endWeightDecay ?? 0;
      const end = o.endWeightDecay ?? o.startWeightDecay ?? 0;
      if (end < start) {
        ctx.addIssue({
          code: 'custom',
          path: ['optimizer', 'endWeightDecay'],
          message: `${end} is below startWeightDecay (${start}): weight decay only increases`,
        });
      } else if (o.weightDecayIncrStyle === 'constant' && end !== start) {
        ctx.addIssue({
          code: 'custom',
          path: ['optimizer', 'weightDecayIncrStyle'],
          message: `'constant' keeps one weight decay, but startWeightDecay ${start} and endWeightDecay ${end} differ: use 'linear' or 'cosine'`,
        });
      }
    }
    const m = c.model;
    if (m.recomputeMethod !== null || m.recomputeNumLayers !== null) {
      if (m.recomputeGranularity !== 'full') {
        ctx.addIssue({
          code: 'custom',
          path: ['model', 'recomputeMethod'],
          message: "recomputeMethod and recomputeNumLayers go with recomputeGranularity 'full'",
        });
      } else if (m.recomputeMethod === null || m.recomputeNumLayers === null) {
        ctx.addIssue({
          code: 'custom',
          path: ['model', m.recomputeMethod === null ? 'recomputeMethod' : 'recomputeNumLayers'],
          message: 'give recomputeMethod and recomputeNumLayers together',
        });
      } else if (m.recomputeMethod === 'uniform' && m.recomputeNumLayers === 0) {
        ctx.addIssue({
          code: 'custom',
          path: ['model', 'recomputeNumLayers'],
          message: "'uniform' checkpoints groups of recomputeNumLayers layers: give 1 or more",
        });
      }
    }
    if ((c.parallel.virtualPipelineModelParallelSize ?? 1) > 1 && c.parallel.pipelineModelParallelSize < 2) {
      ctx.addIssue({
        code: 'custom',
        path: ['parallel', 'virtualPipelineModelParallelSize'],
        message: `${c.parallel.virtualPipelineModelParallelSize} model chunks interleave over the pipeline ranks: it needs pipelineModelParallelSize 2 or more`,
      });
    }
    if (
      c.parallel.numLayersPerVirtualPipelineStage !== null &&
      c.parallel.virtualPipelineModelParallelSize !== null
    ) {
      ctx.addIssue({
        code: 'custom',
        path: ['parallel', 'numLayersPerVirtualPipelineStage'],
        message: 'give one of numLayersPerVirtualPipelineStage and virtualPipelineModelParallelSize',
      });
    }
    if (c.scheduler.lrWarmupIters >= decay) {
      ctx.addIssue({
        code: 'custom',
        path: ['scheduler', 'lrWarmupIters'],
        message: `${c.scheduler.lrWarmupIters} warm-up iterations leave none to decay over: make it less than ${
          c.scheduler.lrDecayIters === null
            ? `training.trainIters (${decay}; scheduler.lrDecayIters defaults to it)`
            : `scheduler.lrDecayIters (${decay})`
        }`,
      });
    }
    if (c.optimizer.minLr > c.optimizer.lr) {
      ctx.addIssue({
        code: 'custom',
        path: ['optimizer', 'minLr'],
        message: `${c.optimizer.minLr} is above optimizer.lr (${c.optimizer.lr}): the schedule decays from lr down to minLr`,
      });
    }
    if (c.checkpoint.exportHf !== null && c.checkpoint.save === null) {
      ctx.addIssue({
        code: 'custom',
        path: ['checkpoint', 'save'],
        message: 'exportHf exports the final checkpoint: set checkpoint.save too',
      });
    }
    if (c.checkpoint.saveInterval !== null && c.checkpoint.save === null) {
      ctx.addIssue({
        code: 'custom',
        path: ['checkpoint', 'save'],
        message: 'saveInterval needs checkpoint.save',
      });
    }
  });
/** A validated run configuration (defaults applied). */
export type RunConfig = z.output<typeof RunConfig>;
/** What a config file may hold (defaults not yet applied). */
export type RunConfigInput = z.input<typeof RunConfig>;

/** Every valid dotted key, for suggestions. */
function validKeys(): string[] {
  const out: string[] = [];
  const shape = RunConfig.shape as unknown as Record<string, z.ZodType>;
  for (const [section, schema] of Object.entries(shape)) {
    let s = schema as unknown as { def: { innerType?: unknown; shape?: Record<string, unknown> } };
    while (s.def.innerType) s = s.def.innerType as typeof s;
    for (const [key, inner] of Object.entries(s.def.shape ?? {})) {
      out.push(`${section}.${key}`);
      // one more level for nested sections (data.sft.*)
      let t = inner as typeof s;
      while (t.def.innerType) t = t.def.innerType as typeof s;
      for (const sub of Object.keys(t.def.shape ?? {})) out.push(`${section}.${key}.${sub}`);
    }
    out.push(section);
  }
  return out;
}

/** Levenshtein distance. */
function distance(a: string, b: string): number {
  const d = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = d[0];
    d[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const t = d[j];
      d[j] = Math.min(d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = t;
    }
  }
  return d[b.length];
}

/** The valid key nearest to `key` (by edit distance, case-insensitive), or null when none is close. */
export function nearestKey(key: string): string | null {
  const lower = key.toLowerCase();
  let best: string | null = null;
  let bestD = Number.POSITIVE_INFINITY;
  for (const k of validKeys()) {
    const tail = k.split('.').at(-1) as string;
    const dd = Math.min(
      distance(lower, k.toLowerCase()),
      distance(lower.split('.').at(-1) as string, tail.toLowerCase()) + 1,
    );
    if (dd < bestD) {
      bestD = dd;
      best = k;
    }
  }
  return best !== null && bestD <= Math.max(2, Math.floor(lower.length / 3)) ? best : null;
}

/** Validates a parsed config object; the first problem is a one-line TrainError naming the key. */
export function parseRunConfig(input: unknown, source = 'config'): RunConfig {
  const r = RunConfig.safeParse(input);
  if (r.success) return r.data;
  const issue = r.error.issues[0];
  const where = issue.path.join('.');
  if (issue.code === 'unrecognized_keys') {
    const key = [where, issue.keys[0]].filter(Boolean).join('.');
    const near = nearestKey(key);
    throw new TrainError(
      'INVALID_CONFIG',
      `${source}: unknown key ${key}${near ? ` (did you mean ${near}?)` : ''}`,
    );
  }
  throw new TrainError('INVALID_CONFIG', `${source}: ${where || 'config'}: ${issue.message}`);
}

/** Sets `obj[a][b]... = value` for the dotted key `a.b...`, creating sections as needed. */
function setDotted(obj: Record<string, unknown>, key: string, value: unknown): void {
  const parts = key.split('.');
  let at = obj;
  for (const p of parts.slice(0, -1)) {
    const next = at[p];
    if (next === undefined) at[p] = {};
    else if (typeof next !== 'object' || next === null || Array.isArray(next)) {
      throw new TrainError('INVALID_CONFIG', `override --${key}: ${p} is not a section`);
    }
    at = at[p] as Record<string, unknown>;
  }
  at[parts[parts.length - 1]] = value;
}

/** An override value: JSON when it parses (numbers, booleans, null, lists), else the string. */
function overrideValue(text: string): unknown {
  // numbers as Python writes them too (`.001`, `1.`), which JSON does not read
  if (/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(text)) return Number(text);
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Megatron flags whose config key is not found by name alone (or that set a value themselves). */
const MEGATRON_FLAGS: Readonly<Record<string, { key: string; value?: unknown }>> = {
  load: { key: 'checkpoint.load' },
  // Megatron: the weights a run starts from when --load holds no checkpoint yet
  'pretrained-checkpoint': { key: 'model.load' },
  // Pai-Megatron-Patch's name for the HF folder beside a Megatron checkpoint
  'hf-ckpt-path': { key: 'model.hfConfig' },
  bf16: { key: 'model.dtype', value: 'bf16' },
  fp16: { key: 'model.dtype', value: 'fp16' },
  'export-hf': { key: 'checkpoint.exportHf' },
  'sft-packing': { key: 'data.sft.packing' },
  'no-gradient-accumulation-fusion': { key: 'training.gradientAccumulationFusion', value: false },
  'recompute-activations': { key: 'model.recomputeGranularity', value: 'selective' },
  'num-virtual-stages-per-pipeline-rank': { key: 'parallel.virtualPipelineModelParallelSize' },
  'override-opt_param-scheduler': { key: 'scheduler.overrideOptParamScheduler', value: true },
};

/** Keys whose value is a list: a Megatron flag given several words (`--data-path 0.3 a 0.7 b`). */
const LIST_KEYS = new Set([
  'data.dataPath',
  'data.trainDataPath',
  'data.validDataPath',
  'data.testDataPath',
  'training.rampupBatchSize',
  'model.recomputeModules',
]);

const kebab = (camel: string) => camel.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);

/** Megatron's long flag name (`tensor-model-parallel-size`) for every key it names unambiguously. */
function megatronFlagKeys(): Map<string, string> {
  const byFlag = new Map<string, string[]>();
  for (const k of validKeys()) {
    const parts = k.split('.');
    if (parts.length !== 2) continue;
    const flag = kebab(parts[1]);
    byFlag.set(flag, [...(byFlag.get(flag) ?? []), k]);
  }
  const out = new Map<string, string>();
  for (const [flag, keys] of byFlag) if (keys.length === 1) out.set(flag, keys[0]);
  for (const [flag, m] of Object.entries(MEGATRON_FLAGS)) out.set(flag, m.key);
  for (const [flag, key] of ARCHITECTURE_FLAGS) out.set(flag, key);
  return out;
}

/**
 * The config key and value of one command-line override: a dotted key (`training.trainIters`) as
 * it is, or a Megatron long flag name (`train-iters`, `tensor-model-parallel-size`, `load`,
 * `bf16`, `export-hf`, `data-path`, `num-layers`) mapped to its key. A flag given without a value
 * is `true`. Null: a Megatron flag that chooses an implementation (`--transformer-impl`,
 * `--overlap-grad-reduce`), accepted without a key (see {@link megatronFlag}); a flag for a feature
 * megapatch lacks (`--fp8-format`) throws with the reason.
 */
/** A blend list as Megatron reads it from text: whitespace-separated prefixes with optional weights. */
function blendList(text: string): (string | number)[] {
  return text
    .split(/\s+/)
    .filter(Boolean)
    .map((w) => (/^[0-9]*\.?[0-9]+(e[-+]?[0-9]+)?$/i.test(w) ? Number(w) : w));
}

function readArgsFile(flag: string, file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new TrainError(
      'INVALID_CONFIG',
      `--${flag} ${file}: cannot read it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`,
    );
  }
}

/**
 * The data keys of Megatron's data-argument files: `--data-args-path` holds what --data-path would
 * (the blend as text), `--per-split-data-args-path` a JSON object of `train`, `valid` and `test`
 * blends (lists, or text). Null for any other flag.
 */
export function dataArgsOverrides(flag: string, file: string): [string, unknown][] | null {
  if (flag === 'data-args-path') {
    const blend = blendList(readArgsFile(flag, file));
    if (blend.length === 0)
      throw new TrainError('INVALID_CONFIG', `--${flag} ${file}: holds no data prefixes`);
    return [['data.dataPath', blend]];
  }
  if (flag !== 'per-split-data-args-path') return null;
  let parsed: unknown;
  try {
    parsed = JSON.parse(readArgsFile(flag, file));
  } catch (e) {
    if (e instanceof TrainError) throw e;
    throw new TrainError('INVALID_CONFIG', `--${flag} ${file}: not valid JSON (${(e as Error).message})`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed) || !('train' in parsed)) {
    throw new TrainError(
      'INVALID_CONFIG',
      `--${flag} ${file}: expected {"train": ..., "valid": ..., "test": ...}`,
    );
  }
  const out: [string, unknown][] = [];
  for (const [split, key] of [
    ['train', 'data.trainDataPath'],
    ['valid', 'data.validDataPath'],
    ['test', 'data.testDataPath'],
  ] as const) {
    const v = (parsed as Record<string, unknown>)[split];
    if (v === undefined || v === null) continue;
    const blend = typeof v === 'string' ? blendList(v) : Array.isArray(v) ? v : null;
    if (!blend || blend.length === 0) {
      throw new TrainError(
        'INVALID_CONFIG',
        `--${flag} ${file}: "${split}" must be a blend (a list, or text)`,
      );
    }
    out.push([key, blend]);
  }
  return out;
}

export function resolveOverride(flag: string, text: string): [string, unknown] | null {
  if (flag.includes('.')) {
    if (!validKeys().includes(flag)) {
      const near = nearestKey(flag);
      throw new TrainError('UNKNOWN_KEY', `unknown key --${flag}${near ? ` (did you mean --${near}?)` : ''}`);
    }
    return [flag, overrideValue(text)];
  }
  const dataArgs = dataArgsOverrides(flag, text);
  if (dataArgs) return dataArgs[0] ?? null;
  const flags = megatronFlagKeys();
  const key = flags.get(flag);
  if (key === undefined) {
    if (megatronFlag(flag, overrideValue(text))) return null;
    let best: string | null = null;
    let bestD = Number.POSITIVE_INFINITY;
    for (const f of [...flags.keys(), ...knownMegatronFlags()]) {
      const d = distance(flag, f);
      if (d < bestD) [best, bestD] = [f, d];
    }
    const near = best !== null && bestD <= Math.max(2, Math.floor(flag.length / 3)) ? best : null;
    throw new TrainError(
      'UNKNOWN_KEY',
      `unknown option --${flag}${near ? ` (did you mean --${near}?)` : ''}`,
    );
  }
  const preset = MEGATRON_FLAGS[flag]?.value;
  if (preset !== undefined) {
    if (text !== 'true') throw new TrainError('INVALID_CONFIG', `--${flag} takes no value (got ${text})`);
    return [key, preset];
  }
  if (LIST_KEYS.has(key)) {
    const v = overrideValue(text);
    return [
      key,
      Array.isArray(v)
        ? v
        : text
            .split(/[\s,]+/)
            .filter(Boolean)
            .map(overrideValue),
    ];
  }
  return [key, overrideValue(text)];
}

/**
 * The run's iterations: training.trainIters, or with sample-based training (Megatron
 * --train-samples) the whole global batches the samples make.
 */
export function trainIterations(c: {
  training: {
    trainIters: number | null;
    trainSamples: number | null;
    globalBatchSize: number;
    rampupBatchSize?: readonly [number, number, number] | null;
  };
}): number {
  const t = c.training;
  if (t.trainIters !== null) return t.trainIters;
  const samples = t.trainSamples ?? 0;
  if (!t.rampupBatchSize) return Math.floor(samples / t.globalBatchSize);
  // Megatron's update_train_iters: the ramp's steps while the consumed samples are within it, then
  // whole global batches (a partial last one is dropped)
  const ramp = new BatchSizeRampup(t.globalBatchSize, t.rampupBatchSize);
  let consumed = 0;
  let iterations = 0;
  while (consumed <= t.rampupBatchSize[2] && consumed <= samples) {
    consumed += ramp.globalBatchSize(consumed);
    iterations++;
  }
  if (samples > consumed) iterations += Math.floor((samples - consumed) / t.globalBatchSize);
  return iterations;
}

/**
 * Megatron's batch-size ramp-up (RampupBatchsizeNumMicroBatchesCalculator): the global batch of a
 * step that starts with `consumed` samples consumed.
 */
export class BatchSizeRampup {
  private readonly perIncrement: number;

  constructor(
    readonly finalGlobalBatchSize: number,
    readonly ramp: readonly [start: number, increment: number, samples: number],
  ) {
    const [start, increment, samples] = ramp;
    this.perIncrement = samples / ((finalGlobalBatchSize - start) / increment);
  }

  /** The global batch size after `consumed` samples. */
  globalBatchSize(consumed: number): number {
    const [start, increment, samples] = this.ramp;
    if (consumed > samples) return this.finalGlobalBatchSize;
    return start + Math.floor(consumed / this.perIncrement) * increment;
  }
}

/**
 * Reads a YAML or JSON run config and applies command-line overrides ([flag, value] pairs: dotted
 * keys such as `training.lr`, or Megatron long flag names such as `lr`, `load`, `bf16`; see
 * {@link resolveOverride}); returns the validated config.
 */
export function loadRunConfig(
  file: string | null,
  overrides: readonly [string, string][] = [],
  opts: {
    /** Told of the Megatron flags accepted without effect (one line, each with what megapatch does), and of a Megatron default megapatch does not share (dropout, when a script gives no rate). */
    notice?: (line: string) => void;
  } = {},
): RunConfig {
  let obj: Record<string, unknown> = {};
  if (file !== null) {
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch (e) {
      throw new TrainError(
        'INVALID_CONFIG',
        `${file}: cannot read the config (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`,
      );
    }
    let parsed: unknown;
    try {
      parsed = file.endsWith('.json') ? JSON.parse(text) : parseYaml(text);
    } catch (e) {
      throw new TrainError(
        'INVALID_CONFIG',
        `${file}: not valid ${file.endsWith('.json') ? 'JSON' : 'YAML'} (${(e as Error).message.split('\n')[0]})`,
      );
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
      throw new TrainError('INVALID_CONFIG', `${file}: the config must be a mapping of sections`);
    }
    obj = parsed as Record<string, unknown>;
  }
  // the flags accepted without a key, grouped by what megapatch does instead
  const accepted = new Map<string, string[]>();
  for (const [flag, text] of overrides) {
    const dataArgs = dataArgsOverrides(flag, text);
    if (dataArgs) {
      for (const [k, v] of dataArgs) setDotted(obj, k, v);
      continue;
    }
    const resolved = resolveOverride(flag, text);
    if (resolved === null) {
      const m = megatronFlag(flag, overrideValue(text));
      if (m?.kind === 'accepted') accepted.set(m.note, [...(accepted.get(m.note) ?? []), `--${flag}`]);
      continue;
    }
    setDotted(obj, resolved[0], resolved[1]);
  }
  // a Megatron run script names no run folder: its TensorBoard folder serves
  const logging = obj.logging as Record<string, unknown> | undefined;
  if (logging && logging.runDir === undefined && typeof logging.tensorboardDir === 'string')
    logging.runDir = logging.tensorboardDir;
  const config = parseRunConfig(obj, file ?? 'config');
  if (accepted.size > 0) {
    const groups = [...accepted].map(([note, flags]) => `${flags.join(', ')} (${note})`);
    opts.notice?.(`Megatron flags megapatch needs nothing for: ${groups.join('; ')}`);
  }
  // a Megatron script (it states the architecture) without dropout flags trains with Megatron's
  // default of 0.1; megapatch's default is 0: say so
  const model = obj.model as Record<string, unknown> | undefined;
  const unset = ['hiddenDropout', 'attentionDropout'].filter((k) => model?.[k] === undefined);
  if (unset.length > 0 && overrides.some(([flag]) => ARCHITECTURE_FLAGS.has(flag))) {
    const flags = unset.map((k) => `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`);
    opts.notice?.(
      `no ${flags.join(' or ')}: megapatch trains without dropout where Megatron's default is 0.1; give ${flags.map((f) => `${f} 0.1`).join(' ')} to train as Megatron would`,
    );
  }
  return config;
}
