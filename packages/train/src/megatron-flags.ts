// The flags of a Megatron-LM or Pai-Megatron-Patch run script, for `megapatch train`. Such a script
// states the model (--num-layers, --hidden-size, ...), which megapatch takes from the model's own
// config instead: those flags are kept under model.architecture and checked against the model
// before anything is built. Flags that only choose an implementation (fusions, overlap, the
// checkpoint format, TensorBoard) are accepted and named in a notice; features megapatch does not
// have (FP8, activation offloading) are refused with the reason.
import { paddedVocabSize, type TransformerConfig } from '@megapatch/convert';
import { z } from 'zod';
import { TrainError } from './errors.js';

const posInt = z.number().int().positive();

/**
 * The architecture a Megatron run script states, under Megatron's argument names (camelCase).
 * Every key is optional: only the flags given are checked, against the model's config, before the
 * run builds anything; a difference is an error naming the flag and the model's value.
 */
export const ArchitectureSection = z.strictObject({
  numLayers: posInt.optional(),
  hiddenSize: posInt.optional(),
  ffnHiddenSize: posInt.optional(),
  numAttentionHeads: posInt.optional(),
  groupQueryAttention: z.boolean().optional(),
  numQueryGroups: posInt.optional(),
  kvChannels: posInt.optional(),
  normalization: z.enum(['RMSNorm', 'LayerNorm']).optional(),
  normEpsilon: z.number().positive().optional(),
  /** Megatron --apply-layernorm-1p: norm weights stored as (gamma - 1) (Gemma's zero-centred norms). */
  applyLayernorm1p: z.boolean().optional(),
  swiglu: z.boolean().optional(),
  /** megapatch's models have no linear biases besides the QKV bias (addQkvBias). */
  disableBiasLinear: z.boolean().optional(),
  addQkvBias: z.boolean().optional(),
  qkLayernorm: z.boolean().optional(),
  positionEmbeddingType: z.enum(['learned_absolute', 'rope', 'yarn', 'mrope', 'relative', 'none']).optional(),
  useRotaryPositionEmbeddings: z.boolean().optional(),
  rotaryBase: z.number().positive().optional(),
  rotaryPercent: z.number().positive().optional(),
  rotarySeqLenInterpolationFactor: z.number().positive().optional(),
  ropeType: z.enum(['rope', 'yarn']).optional(),
  rotaryScalingFactor: z.number().positive().optional(),
  mscale: z.number().optional(),
  mscaleAllDim: z.number().optional(),
  yarnOriginalMaxPositionEmbeddings: posInt.optional(),
  yarnBetaFast: z.number().optional(),
  yarnBetaSlow: z.number().optional(),
  /** Megatron --use-rope-scaling: Llama 3.1's RoPE frequency scaling. */
  useRopeScaling: z.boolean().optional(),
  ropeScalingFactor: z.number().positive().optional(),
  untieEmbeddingsAndOutputWeights: z.boolean().optional(),
  /** Checked against data.seqLength (a script's sequences must fit), not against the model. */
  maxPositionEmbeddings: posInt.optional(),
  vocabSize: posInt.optional(),
  /** The embedding's rows after padding (Pai-Megatron-Patch's --padded-vocab-size). */
  paddedVocabSize: posInt.optional(),
  numExperts: posInt.optional(),
  moeRouterTopk: posInt.optional(),
  moeFfnHiddenSize: posInt.optional(),
  moeSharedExpertIntermediateSize: posInt.optional(),
  /** Megatron --moe-layer-freq: N (every N-th layer is MoE) or a list expression, `([0]*3+[1]*58)`. */
  moeLayerFreq: z.union([posInt, z.string().min(1)]).optional(),
  moeRouterScoreFunction: z.enum(['softmax', 'sigmoid']).optional(),
  moeRouterEnableExpertBias: z.boolean().optional(),
  moeRouterNumGroups: posInt.optional(),
  moeRouterGroupTopk: posInt.optional(),
  moeRouterTopkScalingFactor: z.number().positive().optional(),
  /** Megatron --moe-router-pre-softmax: softmax over all experts, then top-k (no renormalisation). */
  moeRouterPreSoftmax: z.boolean().optional(),
  multiLatentAttention: z.boolean().optional(),
  qLoraRank: posInt.optional(),
  kvLoraRank: posInt.optional(),
  qkHeadDim: posInt.optional(),
  qkPosEmbHeadDim: posInt.optional(),
  /** Pai-Megatron-Patch's name of qkHeadDim. */
  qkNopeHeadDim: posInt.optional(),
  /** Pai-Megatron-Patch's name of qkPosEmbHeadDim. */
  qkRopeHeadDim: posInt.optional(),
  vHeadDim: posInt.optional(),
  mtpNumLayers: z.number().int().nonnegative().optional(),
});
/** The architecture flags of a run script. */
export type Architecture = z.output<typeof ArchitectureSection>;

/** Megatron's flag name of an architecture key (`applyLayernorm1p` -> `apply-layernorm-1p`). */
export function architectureFlag(key: string): string {
  return key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`).replace(/(\d+)/g, '-$1');
}

/** Flag -> model.architecture key, for every architecture key. */
export const ARCHITECTURE_FLAGS: ReadonlyMap<string, string> = new Map(
  Object.keys(ArchitectureSection.shape).map((k) => [architectureFlag(k), `model.architecture.${k}`]),
);

/**
 * Flags that choose how Megatron runs, not what it computes: accepted, and named in one notice with
 * what megapatch does instead. (Values are not checked: any value means the same here.)
 */
export const IMPLEMENTATION_FLAGS: Readonly<Record<string, string>> = {
  'transformer-impl': 'megapatch has one implementation of each layer',
  'attention-backend': 'megapatch picks its attention kernel',
  'use-flash-attn': 'megapatch picks its attention kernel',
  'use-mcore-models': 'megapatch builds Megatron-Core models',
  'cross-entropy-loss-fusion': 'megapatch fuses the cross-entropy where the device has the kernel',
  'cross-entropy-fusion-impl': 'megapatch fuses the cross-entropy where the device has the kernel',
  'masked-softmax-fusion': 'megapatch picks its kernels',
  'no-masked-softmax-fusion': 'megapatch picks its kernels',
  'bias-swiglu-fusion': 'megapatch picks its kernels',
  'no-bias-swiglu-fusion': 'megapatch picks its kernels',
  'no-bias-dropout-fusion': 'megapatch picks its kernels',
  'no-bias-gelu-fusion': 'megapatch picks its kernels',
  'no-rope-fusion': 'megapatch picks its kernels',
  'apply-rope-fusion': 'megapatch picks its kernels',
  'moe-grouped-gemm': 'megapatch picks the expert GEMMs',
  'moe-permute-fusion': 'megapatch picks the expert kernels',
  'moe-router-fusion': 'megapatch picks the expert kernels',
  'moe-router-dtype': 'the router runs in float32',
  'moe-shared-expert-overlap': 'megapatch schedules the shared expert itself',
  'overlap-grad-reduce': 'gradients are reduced in buckets during the backward pass where the layout allows',
  'overlap-param-gather': "megapatch schedules the distributed optimizer's gathers itself",
  'tp-comm-overlap': 'megapatch schedules tensor-parallel communication itself',
  'accumulate-allreduce-grads-in-fp32': 'main gradients are float32 always',
  'grad-reduce-in-bf16': 'main gradients are float32 and reduced in float32 always',
  'empty-unused-memory-level': 'the caching allocator keeps freed blocks for the next step',
  'attention-softmax-in-fp32': 'the softmax accumulates in float32 always',
  'apply-query-key-layer-scaling':
    'the softmax accumulates in float32 (the same result without the rescaling)',
  'no-create-attention-mask-in-dataloader': 'attention masks are never materialised',
  'num-workers': 'samples are read in the training process',
  'distributed-backend': 'Gloo for CPU tensors, NCCL for CUDA tensors, chosen per tensor',
  'distributed-timeout-minutes': 'a lost peer is detected by the process groups themselves',
  'exit-signal-handler': 'SIGINT/SIGTERM always save and stop',
  'manual-gc': 'native and device memory are freed by their owners, not by the garbage collector',
  'manual-gc-interval': 'native and device memory are freed by their owners, not by the garbage collector',
  'ckpt-format': 'megapatch writes its own checkpoint format (megapatch convert turns it into Hugging Face)',
  'async-save': 'checkpoints are written before the next iteration',
  'use-dist-ckpt': 'megapatch writes its own checkpoint format',
  'auto-detect-ckpt-format': 'megapatch reads its own checkpoints and Hugging Face folders',
  'log-throughput': 'throughput is logged always',
  'log-timers-to-tensorboard': 'iteration-time is written to TensorBoard always',
  'log-validation-ppl-to-tensorboard': 'the validation perplexity is written to TensorBoard always',
  'log-memory-to-tensorboard': 'memory is written to TensorBoard always',
  'log-num-zeros-in-grad': 'not logged',
  'log-params-norm': 'not logged',
  'tensorboard-queue-size': 'TensorBoard events are written as they come',
  'tensorboard-log-interval': 'TensorBoard gets every iteration',
  'wandb-project': 'no Weights & Biases logging',
  'wandb-exp-name': 'no Weights & Biases logging',
  'wandb-save-dir': 'no Weights & Biases logging',
  'timing-log-level': 'iteration times are logged always',
  'patch-tokenizer-type': 'the data is tokenised already and the vocabulary comes from the model',
  'tokenizer-type': 'the data is tokenised already and the vocabulary comes from the model',
  'tokenizer-model': 'the data is tokenised already and the vocabulary comes from the model',
  'extra-vocab-size': 'the vocabulary comes from the model',
  'max-padding-length': 'SFT samples are padded to data.seqLength',
  'use-checkpoint-args': "the architecture comes from the model's config always",
  'no-position-embedding': 'rotary models have no position-embedding table',
  'use-cpu-initialization': "weights are drawn on the training device with the CPU generator's stream",
  'vocab-file': 'the data is tokenised already and the vocabulary comes from the model',
  'merge-file': 'the data is tokenised already and the vocabulary comes from the model',
  'ddp-bucket-size': "buckets are sized by Megatron's rule (parallel.ddpBucketSizeMb to set them, in MB)",
  'ddp-average-in-collective': 'gradients are averaged over data-parallel ranks always',
  'check-for-nan-in-loss-and-grad': 'a non-finite gradient norm skips the step always',
  'moe-per-layer-logging': 'the tokens per expert of every MoE layer are logged always',
  'ckpt-fully-parallel-save': 'megapatch writes its own checkpoint format',
  'ckpt-fully-parallel-load': 'megapatch reads its own checkpoint format',
  'ckpt-assume-constant-structure': 'megapatch writes its own checkpoint format',
  'dist-ckpt-strictness': 'a checkpoint that lacks a tensor the model needs is an error always',
  'no-async-tensor-model-parallel-allreduce': 'megapatch schedules tensor-parallel communication itself',
  'log-progress': 'every iteration is in <runDir>/metrics.jsonl',
  'use-precision-aware-optimizer':
    'float32 master weights, gradients and moments (the precision-aware optimizer with its default dtypes)',
  'overlap-cpu-optimizer-d2h-h2d':
    "the offloaded optimizer's copies run before and after its update, not overlapped with it",
  'pin-cpu-grads': 'the host copies of offloaded gradients are plain host memory',
  'pin-cpu-params': 'the host copies of offloaded parameters are plain host memory',
  'use-torch-optimizer-for-cpu-offload': "the offloaded update is megapatch's AdamW on the host",
  profile: 'no profiler is attached',
  'use-pytorch-profiler': 'no profiler is attached',
  'profile-step-start': 'no profiler is attached',
  'profile-step-end': 'no profiler is attached',
  'use-checkpoint-opt_param-scheduler': "a resumed run takes the checkpoint's schedule (the default here)",
};

const NO_FP8 = 'megapatch trains in bf16, fp16 or fp32: there is no FP8 training';
const ACTIVATIONS_STAY =
  'activations stay on the training device (use --recompute-granularity to save memory)';
const NO_FSDP = 'megapatch shards the optimizer state with --use-distributed-optimizer (ZeRO-1), not FSDP';
const PLACE_EMBEDDING =
  'place the embedding and loss with --pipeline-model-parallel-layout (or uneven stages)';

/** Flags whose feature megapatch does not have: refused with the reason, before the run starts. */
export const REFUSED_FLAGS: Readonly<Record<string, string>> = {
  fp8: NO_FP8,
  'fp8-format': NO_FP8,
  'fp8-recipe': NO_FP8,
  'fp8-param-gather': NO_FP8,
  'fp8-amax-compute-algo': NO_FP8,
  'fp8-amax-history-len': NO_FP8,
  'cpu-offloading': ACTIVATIONS_STAY,
  'cpu-offloading-num-layers': ACTIVATIONS_STAY,
  'moe-enable-deepep': 'experts exchange tokens by all-gather or all-to-all (--moe-token-dispatcher-type)',
  'sequence-packing': 'pack SFT samples with data.sft.packing (megapatch preprocess sft)',
  'use-legacy-models': 'megapatch builds Megatron-Core models',
  'mock-data': 'give real data (--data-path; megapatch preprocess pretrain makes it)',
  'use-torch-fsdp2': NO_FSDP,
  'use-custom-fsdp': NO_FSDP,
  'account-for-embedding-in-pipeline-split': PLACE_EMBEDDING,
  'account-for-loss-in-pipeline-split': PLACE_EMBEDDING,
  'hierarchical-context-parallel-sizes':
    'context parallelism runs over one group (--cp-comm-type p2p or a2a)',
  'moe-router-force-load-balancing': 'tokens go to the experts the router picks',
  'moe-input-jitter-eps': 'the router sees its input unchanged (no jitter)',
};

/**
 * Flags whose value decides whether megapatch can honour them: the accepted values, and why the
 * others are refused.
 */
const VALUE_FLAGS: Readonly<
  Record<string, { accept: (v: unknown) => boolean; note: string; reason: string }>
> = {
  optimizer: {
    accept: (v) => v === 'adam',
    note: "Megatron's adam (AdamW) is megapatch's optimizer",
    reason: "megapatch's optimizer is Megatron's adam (AdamW)",
  },
  'dataloader-type': {
    accept: (v) => v === 'single',
    note: "samples are read in Megatron's single order",
    reason: "samples are read in Megatron's single order (GPTDataset's shuffled index, once)",
  },
  'train-mode': {
    accept: (v) => v === 'pretrain',
    note: 'pre-training reads data.dataPath',
    reason: 'fine-tune from SFT data: megapatch preprocess sft, then --data.sft.prefix',
  },
  // the precision-aware optimizer's dtypes: megapatch keeps every one in float32
  ...Object.fromEntries(
    ['main-grads-dtype', 'main-params-dtype', 'exp-avg-dtype', 'exp-avg-sq-dtype'].map((flag) => [
      flag,
      {
        accept: (v: unknown) => v === 'fp32',
        note: 'float32, as megapatch keeps it',
        reason: 'megapatch keeps master weights, gradients and AdamW moments in float32: give fp32',
      },
    ]),
  ),
  dataset: {
    accept: (v) => v === 'MMAP',
    note: 'pre-training reads Megatron indexed datasets',
    reason:
      'pre-training reads Megatron indexed datasets (MMAP); SFT data comes from megapatch preprocess sft (--data.sft.prefix)',
  },
};

/** What one Megatron flag does: sets a key, or is accepted with a note on what megapatch does. */
export type MegatronFlag = { kind: 'key'; key: string } | { kind: 'accepted'; note: string };

/**
 * Classifies a Megatron flag that is not a config key's own name: an architecture flag (its
 * model.architecture key), an implementation choice (accepted, with its note), or null when the
 * flag is unknown. Refused flags and values throw a one-line TrainError with the reason.
 */
export function megatronFlag(flag: string, value: unknown): MegatronFlag | null {
  const arch = ARCHITECTURE_FLAGS.get(flag);
  if (arch) return { kind: 'key', key: arch };
  const refused = REFUSED_FLAGS[flag];
  if (refused) throw new TrainError('UNSUPPORTED', `--${flag}: ${refused}`);
  const byValue = VALUE_FLAGS[flag];
  if (byValue) {
    if (!byValue.accept(value))
      throw new TrainError('UNSUPPORTED', `--${flag} ${String(value)}: ${byValue.reason}`);
    return { kind: 'accepted', note: byValue.note };
  }
  const note = IMPLEMENTATION_FLAGS[flag];
  return note ? { kind: 'accepted', note } : null;
}

/** Every flag {@link megatronFlag} knows (for suggestions). */
export function knownMegatronFlags(): string[] {
  return [
    ...ARCHITECTURE_FLAGS.keys(),
    ...Object.keys(IMPLEMENTATION_FLAGS),
    ...Object.keys(REFUSED_FLAGS),
    ...Object.keys(VALUE_FLAGS),
  ];
}

/**
 * Megatron's --moe-layer-freq as one entry per layer (1: MoE, 0: dense): an integer N makes every
 * N-th layer MoE (layers 0, N, 2N, ...); a list expression (`[0,1,1]`, `([0]*3+[1]*58)`,
 * `([1]*2+[0])*4`) is evaluated.
 */
export function moeLayerFreqPattern(freq: number | string, numLayers: number): number[] {
  if (typeof freq === 'number' || /^\s*\d+\s*$/.test(freq)) {
    const n = Number(freq);
    if (!(Number.isInteger(n) && n > 0))
      throw new TrainError('INVALID_CONFIG', `--moe-layer-freq ${freq}: give a positive integer`);
    return Array.from({ length: numLayers }, (_, i) => (i % n === 0 ? 1 : 0));
  }
  const bad = () =>
    new TrainError(
      'INVALID_CONFIG',
      `--moe-layer-freq ${freq}: give an integer or a list expression such as ([0]*3+[1]*58)`,
    );
  const s = freq.replace(/\s+/g, '');
  let at = 0;
  const int = (): number => {
    const m = /^\d+/.exec(s.slice(at));
    if (!m) throw bad();
    at += m[0].length;
    return Number(m[0]);
  };
  const expr = (): number[] => {
    let out = term();
    while (s[at] === '+') {
      at++;
      out = out.concat(term());
    }
    return out;
  };
  const term = (): number[] => {
    let out = atom();
    while (s[at] === '*') {
      at++;
      const n = int();
      if (out.length * n > 1_000_000) throw bad();
      out = Array.from({ length: n }, () => out).flat();
    }
    return out;
  };
  const atom = (): number[] => {
    if (s[at] === '(') {
      at++;
      const out = expr();
      if (s[at++] !== ')') throw bad();
      return out;
    }
    if (s[at] === '[') {
      at++;
      const out: number[] = [];
      while (s[at] !== ']') {
        const v = int();
        if (v !== 0 && v !== 1) throw bad();
        out.push(v);
        if (s[at] === ',') at++;
        else if (s[at] !== ']') throw bad();
      }
      at++;
      return out;
    }
    throw bad();
  };
  const out = expr();
  if (at !== s.length) throw bad();
  return out;
}

/** What the architecture check needs to know of the model. */
export interface ModelFacts {
  config: TransformerConfig;
  /** The MLP's gated activation (SwiGLU unless the family says otherwise). */
  activation: string;
  /** Norm weights stored as (gamma - 1). */
  zeroCenteredGamma: boolean;
  /** Tensor-parallel size (the embedding is padded to a multiple of 128 · tp). */
  tensorParallelSize: number;
  /** Where the config came from, for the message. */
  source: string;
}

const near = (a: number, b: number) => Math.abs(a - b) <= 1e-9 * Math.max(Math.abs(a), Math.abs(b), 1e-30);

/**
 * Checks each architecture flag given against the model; the first that differs is a one-line
 * TrainError naming the flag, its value and the model's. `seqLength` is checked against
 * --max-position-embeddings.
 */
export function checkArchitecture(a: Architecture, m: ModelFacts, seqLength: number): void {
  const c = m.config;
  const fail = (key: keyof Architecture, model: unknown): never => {
    throw new TrainError(
      'INVALID_CONFIG',
      `--${architectureFlag(key)} ${String(a[key])} does not describe the model: it has ${String(model)} (${m.source}); correct the flag (model.architecture.${key}) or load the model the script was written for`,
    );
  };
  const same = (key: keyof Architecture, model: unknown) => {
    const v = a[key];
    if (v === undefined) return;
    if (typeof v === 'number' && typeof model === 'number' ? !near(v, model) : v !== model) fail(key, model);
  };
  same('numLayers', c.numLayers);
  same('hiddenSize', c.hiddenSize);
  same('ffnHiddenSize', c.ffnHiddenSize);
  same('numAttentionHeads', c.numAttentionHeads);
  same('numQueryGroups', c.numQueryGroups);
  if (a.groupQueryAttention === false && c.numQueryGroups !== c.numAttentionHeads)
    fail('groupQueryAttention', `${c.numQueryGroups} query groups for ${c.numAttentionHeads} heads`);
  if (c.mla === null) same('kvChannels', c.kvChannels);
  same('normalization', c.normalization);
  same('normEpsilon', c.layernormEpsilon);
  same('applyLayernorm1p', m.zeroCenteredGamma);
  if (a.swiglu !== undefined && a.swiglu !== (m.activation === 'swiglu'))
    fail('swiglu', `a ${m.activation} MLP`);
  if (a.disableBiasLinear === false) fail('disableBiasLinear', 'no linear biases besides the QKV bias');
  same('addQkvBias', c.addQkvBias);
  // MLA: Megatron's qk_layernorm is the norm of the query and key-value latents, which DeepSeek's
  // attention always has
  same('qkLayernorm', c.mla ? true : c.qkLayernorm);
  const rope = c.ropeScaling;
  if (a.positionEmbeddingType !== undefined) {
    const ok =
      a.positionEmbeddingType === 'rope' || (a.positionEmbeddingType === 'yarn' && rope.type === 'yarn');
    if (!ok)
      fail(
        'positionEmbeddingType',
        rope.type === 'yarn' ? 'YaRN rotary embeddings' : 'rotary embeddings (rope)',
      );
  }
  if (a.useRotaryPositionEmbeddings === false) fail('useRotaryPositionEmbeddings', 'rotary embeddings');
  same('rotaryBase', c.rotaryBase);
  same('rotaryPercent', c.mla ? 1 : c.rotaryPercent);
  if (a.ropeType !== undefined && (a.ropeType === 'yarn') !== (rope.type === 'yarn'))
    fail(
      'ropeType',
      rope.type === 'yarn'
        ? 'YaRN rotary embeddings'
        : `${rope.type === 'none' ? 'plain' : rope.type} rotary embeddings`,
    );
  // Llama 3.1's scaling applies to the decoder's rotary embedding, which MLA replaces by its own
  if (c.mla === null && a.useRopeScaling !== undefined && a.useRopeScaling !== (rope.type === 'llama3'))
    fail('useRopeScaling', rope.type === 'llama3' ? "Llama 3.1's RoPE scaling" : 'no Llama 3.1 RoPE scaling');
  if (c.mla === null && a.ropeScalingFactor !== undefined && a.useRopeScaling)
    same('ropeScalingFactor', rope.type === 'llama3' ? rope.factor : 'no Llama 3.1 RoPE scaling');
  if (a.rotarySeqLenInterpolationFactor !== undefined)
    same(
      'rotarySeqLenInterpolationFactor',
      rope.type === 'linear' ? rope.factor : 'no linear RoPE interpolation',
    );
  if (rope.type === 'yarn') {
    same('rotaryScalingFactor', rope.factor);
    same('mscale', rope.mscale);
    same('mscaleAllDim', rope.mscaleAllDim);
    same('yarnOriginalMaxPositionEmbeddings', rope.originalMaxPositionEmbeddings);
    same('yarnBetaFast', rope.betaFast);
    same('yarnBetaSlow', rope.betaSlow);
  } else {
    if (a.rotaryScalingFactor !== undefined && a.rotaryScalingFactor !== 1)
      fail('rotaryScalingFactor', 'no YaRN scaling (factor 1)');
    for (const k of ['yarnOriginalMaxPositionEmbeddings', 'yarnBetaFast', 'yarnBetaSlow'] as const)
      if (a[k] !== undefined) fail(k, 'no YaRN scaling');
  }
  same('untieEmbeddingsAndOutputWeights', c.untieEmbeddingsAndOutputWeights);
  if (a.maxPositionEmbeddings !== undefined && a.maxPositionEmbeddings < seqLength) {
    throw new TrainError(
      'INVALID_CONFIG',
      `--max-position-embeddings ${a.maxPositionEmbeddings} is shorter than data.seqLength ${seqLength} (--seq-length): raise it or shorten the sequences`,
    );
  }
  same('vocabSize', c.vocabSize);
  same('paddedVocabSize', paddedVocabSize(c.vocabSize, c.makeVocabSizeDivisibleBy, m.tensorParallelSize));
  const moe = c.moe;
  const moeKeys = [
    'numExperts',
    'moeRouterTopk',
    'moeFfnHiddenSize',
    'moeSharedExpertIntermediateSize',
    'moeLayerFreq',
    'moeRouterScoreFunction',
    'moeRouterEnableExpertBias',
    'moeRouterNumGroups',
    'moeRouterGroupTopk',
    'moeRouterTopkScalingFactor',
    'moeRouterPreSoftmax',
  ] as const;
  if (!moe) {
    for (const k of moeKeys)
      if (a[k] !== undefined && a[k] !== false) fail(k, 'no mixture of experts (a dense model)');
  } else {
    same('numExperts', moe.numExperts);
    same('moeRouterTopk', moe.routerTopk);
    same('moeFfnHiddenSize', moe.moeFfnHiddenSize);
    same('moeSharedExpertIntermediateSize', moe.sharedExpertIntermediateSize || 'no shared expert');
    if (a.moeLayerFreq !== undefined) {
      const want = moeLayerFreqPattern(a.moeLayerFreq, c.numLayers);
      const have = moe.layerPattern.map((k) => (k === 'moe' ? 1 : 0));
      if (want.length !== have.length || want.some((v, i) => v !== have[i]))
        fail('moeLayerFreq', `the MoE layer pattern [${have.join(',')}]`);
    }
    same('moeRouterScoreFunction', moe.scoreFunction);
    same('moeRouterEnableExpertBias', moe.expertBias);
    same('moeRouterNumGroups', moe.numGroups);
    same('moeRouterGroupTopk', moe.groupTopk);
    same('moeRouterTopkScalingFactor', moe.routedScalingFactor);
    // with a sigmoid score the order does not matter (Megatron ignores the flag)
    if (a.moeRouterPreSoftmax !== undefined && moe.scoreFunction === 'softmax') {
      // pre-softmax (probabilities over all experts, kept as they are) is a softmax router without
      // renormalising the top-k; the other order (top-k logits, then softmax) renormalises
      const pre = moe.scoreFunction === 'softmax' && !moe.normTopkProb;
      if (a.moeRouterPreSoftmax !== pre)
        fail(
          'moeRouterPreSoftmax',
          pre ? 'softmax over all experts, top-k not renormalised' : 'top-k probabilities renormalised',
        );
    }
  }
  const mla = c.mla;
  if (a.multiLatentAttention !== undefined && a.multiLatentAttention !== (mla !== null))
    fail('multiLatentAttention', mla ? 'multi-latent attention' : 'no multi-latent attention');
  const mlaKeys = [
    'qLoraRank',
    'kvLoraRank',
    'qkHeadDim',
    'qkPosEmbHeadDim',
    'qkNopeHeadDim',
    'qkRopeHeadDim',
    'vHeadDim',
  ] as const;
  if (!mla) {
    for (const k of mlaKeys) if (a[k] !== undefined) fail(k, 'no multi-latent attention');
  } else {
    same('qLoraRank', mla.qLoraRank ?? 'no query down-projection');
    same('kvLoraRank', mla.kvLoraRank);
    same('qkHeadDim', mla.qkNopeHeadDim);
    same('qkPosEmbHeadDim', mla.qkRopeHeadDim);
    same('qkNopeHeadDim', mla.qkNopeHeadDim);
    same('qkRopeHeadDim', mla.qkRopeHeadDim);
    same('vHeadDim', mla.vHeadDim);
  }
  same('mtpNumLayers', c.mtpNumLayers);
}
