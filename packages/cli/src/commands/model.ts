// `megapatch model info --config <config>`: the architecture, the TransformerConfig and the total and
// active (per token) parameter counts of a Hugging Face config or a megapatch checkpoint; with a
// layout or a batch shape (--tp, --pp, --ep, ..., --seq-length), Megatron's theoretical memory per
// rank, computed from the shapes alone (nothing is allocated).
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  CHECKPOINT_METADATA_FILE,
  iterationDirName,
  LATEST_ITERATION_FILE,
  makeTransformerConfig,
  parameterCount,
  parseHfConfig,
  readCheckpointMetadata,
  readLatestIteration,
  rotaryDim,
  type TransformerConfig,
} from '@megapatch/convert';
import {
  formatGiB,
  type MemoryLayoutInput,
  ModelError,
  type ParameterBreakdown,
  type TheoreticalMemory,
  theoreticalMemory,
} from '@megapatch/models';
import { z } from 'zod';
import {
  type Command,
  type CommandGroup,
  type OptionSpec,
  type OptionValues,
  withDefaults,
} from '../command.js';
import { CliError, UsageError } from '../errors.js';
import { type Io, memoryIo } from '../io.js';
import { Dtype, int, MAX_PARALLEL, parseOptions } from '../options.js';

const NAME = 'model info';

/** What `megapatch model info` reports, as data. */
export interface ModelInfo {
  /** What --config named: a Hugging Face config (file or folder) or a megapatch checkpoint. */
  source: 'huggingface' | 'megapatch-checkpoint';
  architecture: string;
  transformerConfig: TransformerConfig;
  parameters: { total: number; activePerToken: number; embedding: number; mtp: number; totalWithMtp: number };
  /** Megatron's theoretical memory per rank, when a layout or batch shape was given. */
  memory?: TheoreticalMemory;
}

/** A layout for {@link modelInfo}; the sequence length defaults to min(4096, maxPositionEmbeddings). */
export type ModelInfoLayout = Omit<MemoryLayoutInput, 'seqLength'> & { seqLength?: number };

/** The model a --config path names: an HF config.json or folder, or a megapatch checkpoint. */
function loadModel(configPath: string): Pick<ModelInfo, 'source' | 'architecture' | 'transformerConfig'> {
  const isDir = fs.statSync(configPath, { throwIfNoEntry: false })?.isDirectory() ?? false;
  if (isDir && !fs.existsSync(path.join(configPath, 'config.json'))) {
    // A checkpoint root (its latest iteration) or one iter_NNNNNNN folder.
    let iterDir = configPath;
    if (!fs.existsSync(path.join(configPath, CHECKPOINT_METADATA_FILE))) {
      if (!fs.existsSync(path.join(configPath, LATEST_ITERATION_FILE))) {
        throw new CliError(
          'INVALID_INPUT',
          `${configPath} is neither a Hugging Face model folder (no config.json) nor a megapatch checkpoint (no ${LATEST_ITERATION_FILE} or ${CHECKPOINT_METADATA_FILE}): give one of those, or a config.json`,
        );
      }
      iterDir = path.join(configPath, iterationDirName(readLatestIteration(configPath)));
    }
    const meta = readCheckpointMetadata(iterDir);
    return {
      source: 'megapatch-checkpoint',
      architecture: meta.architecture ?? '(not recorded)',
      transformerConfig: makeTransformerConfig(
        meta.modelConfig as never,
        path.join(iterDir, CHECKPOINT_METADATA_FILE),
      ),
    };
  }
  const parsed = parseHfConfig(configPath);
  const hf = parsed.hfConfig as { architectures?: string[] };
  return {
    source: 'huggingface',
    architecture: hf.architectures?.[0] ?? parsed.spec.architectures[0],
    transformerConfig: parsed.transformerConfig,
  };
}

/**
 * The report of `configPath`; with `layout`, also Megatron's theoretical memory per rank. A layout
 * that does not fit the model is a UsageError naming every size that does not.
 */
export function modelInfo(configPath: string, layout?: ModelInfoLayout): ModelInfo {
  const model = loadModel(configPath);
  const cfg = model.transformerConfig;
  const count = parameterCount(cfg);
  let memory: TheoreticalMemory | undefined;
  if (layout) {
    const seqLength = layout.seqLength ?? Math.min(4096, cfg.maxPositionEmbeddings);
    try {
      memory = theoreticalMemory(cfg, { ...layout, seqLength });
    } catch (e) {
      if (e instanceof ModelError) throw new UsageError(`${model.architecture}: ${e.message}`, NAME);
      throw e;
    }
  }
  return {
    ...model,
    parameters: {
      total: count.total,
      activePerToken: count.activePerToken,
      embedding: count.embedding,
      mtp: count.mtp,
      totalWithMtp: count.totalWithMtp,
    },
    ...(memory ? { memory } : {}),
  };
}

const billions = (n: number): string => `${(n / 1e9).toFixed(2)}B (${n.toLocaleString('en-US')})`;

/** A parameter count in a table cell: 2.57B, 463.4M, 2,048. */
const count = (n: number): string =>
  n >= 1e9 ? `${(n / 1e9).toFixed(2)}B` : n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : n.toLocaleString('en-US');

const PARTS: [keyof ParameterBreakdown, string][] = [
  ['embedding', '  embedding'],
  ['outputLayer', '  output layer'],
  ['attention', '  attention'],
  ['denseMlp', '  dense MLP'],
  ['experts', '  routed experts'],
  ['sharedExperts', '  shared experts'],
  ['router', '  router'],
  ['norms', '  norms'],
  ['mtp', '  MTP eh_proj'],
];

/** The memory table: the first stage, the peak one and the last, per rank. */
export function formatMemory(m: TheoreticalMemory): string {
  const l = m.layout;
  const shown = [...new Set([0, m.peakStage, m.stages.length - 1])].map((s) => m.stages[s]);
  const head = (s: (typeof shown)[number]) =>
    m.stages.length === 1
      ? 'every rank'
      : `stage ${s.stage}${s.stage === m.peakStage && shown.length > 1 ? ' (peak)' : ''}`;
  const rows: [string, string[]][] = [
    ['', shown.map(head)],
    ['decoder layers', shown.map((s) => `${s.decoderLayers}${s.mtpLayers ? ` + ${s.mtpLayers} MTP` : ''}`)],
    ['parameters', shown.map((s) => count(s.parameters.total))],
  ];
  for (const [part, label] of PARTS) {
    if (shown.some((s) => s.parameters[part] > 0))
      rows.push([label, shown.map((s) => count(s.parameters[part]))]);
  }
  const gib = (f: (s: (typeof shown)[number]) => number) => shown.map((s) => formatGiB(f(s)));
  rows.push(
    ['weights', gib((s) => s.bytes.weights)],
    ['gradients', gib((s) => s.bytes.gradients)],
    ['optimizer states', gib((s) => s.bytes.optimizer)],
    ...(l.optimizerOffloadFraction > 0
      ? ([['  offloaded to the host', gib((s) => s.bytes.optimizerHost)]] as [string, string[]][])
      : []),
    ['activations / micro-batch', gib((s) => s.bytes.activationsPerMicroBatch)],
    ['micro-batches in flight', shown.map((s) => `${+s.inFlightMicroBatches.toFixed(2)}`)],
    ['activations', gib((s) => s.bytes.activations)],
    ['total', gib((s) => s.bytes.total)],
  );
  const widths = shown.map((_, i) => Math.max(...rows.map(([, cells]) => cells[i].length)));
  const table = rows.map(([label, cells]) =>
    `${label.padEnd(27)}${cells.map((c, i) => c.padStart(widths[i])).join('   ')}`.trimEnd(),
  );
  const pipeline = l.vpp ? `interleaved 1F1B, vpp=${l.vpp}` : l.pp > 1 ? '1F1B' : 'no pipeline';
  const settings = [
    `${l.paramDtype} weights, ${l.gradDtype} gradients`,
    l.distributedOptimizer ? 'distributed optimizer' : 'optimizer states on every data-parallel rank',
    ...(l.optimizerOffloadFraction > 0
      ? [
          `${l.optimizerOffloadFraction === 1 ? 'all' : l.optimizerOffloadFraction} of them offloaded to the host`,
        ]
      : []),
    ...(l.sequenceParallel && l.tp > 1 ? ['sequence parallel'] : []),
    `recompute ${l.recompute}`,
    pipeline,
  ];
  return [
    `memory per rank    Megatron's theoretical estimate (${(m.totalParameters / 1e9).toFixed(2)}B parameters as built)`,
    `layout             tp=${l.tp} pp=${l.pp} ep=${l.ep} etp=${l.etp} dp=${l.dp} cp=${l.cp}: ${l.worldSize.toLocaleString('en-US')} GPUs, expert dp=${l.expertDp}`,
    `batch              seq-length ${l.seqLength} × micro-batch-size ${l.microBatchSize}${l.numMicroBatches ? `, ${l.numMicroBatches} micro-batches per step` : ''}`,
    `training           ${settings.join(', ')}`,
    '',
    ...table,
    '',
    `peak               ${formatGiB(m.total)} per GPU on ${m.stages.length === 1 ? 'every rank' : `stage ${m.peakStage}`}`,
  ].join('\n');
}

export function formatModelInfo(m: ModelInfo): string {
  const c = m.transformerConfig;
  const lines = [
    `architecture       ${m.architecture}`,
    `layers             ${c.numLayers}`,
    `hidden size        ${c.hiddenSize}`,
    `attention heads    ${c.numAttentionHeads} (${c.numQueryGroups} query groups, head dim ${c.kvChannels})`,
    `vocabulary         ${c.vocabSize}`,
  ];
  if (c.rotaryPercent !== 1)
    lines.push(
      `rotary             the first ${rotaryDim(c)} of each head's ${c.kvChannels} channels (rotary percent ${c.rotaryPercent})`,
    );
  if (c.moe) lines.push(`experts            ${c.moe.numExperts}, top-${c.moe.routerTopk}`);
  if (c.mla)
    lines.push(
      `attention          MLA (kv LoRA rank ${c.mla.kvLoraRank}, q LoRA rank ${c.mla.qLoraRank ?? 'none'})`,
    );
  lines.push(`parameters         ${billions(m.parameters.total)}`);
  lines.push(`active per token   ${billions(m.parameters.activePerToken)}`);
  if (m.parameters.mtp > 0)
    lines.push(
      `MTP layers         ${billions(m.parameters.mtp)} more (total with MTP ${billions(m.parameters.totalWithMtp)})`,
    );
  if (m.memory) lines.push('', formatMemory(m.memory));
  return lines.join('\n');
}

const size = (description: string, ...aliases: string[]): OptionSpec => ({
  type: 'string',
  value: 'N',
  description,
  ...(aliases.length ? { aliases } : {}),
});

/**
 * The flags of the memory estimate. None has a default here, so that giving any of them is what
 * asks for the estimate; the defaults are the library's (and said in the descriptions).
 */
const memoryOptions = {
  tp: size('tensor-parallel size (default 1)', 'tensor-model-parallel-size'),
  pp: size('pipeline-parallel size (default 1)', 'pipeline-model-parallel-size'),
  ep: size('expert-parallel size (default 1)', 'expert-model-parallel-size'),
  etp: size('expert tensor-parallel size (default: the tensor-parallel size)', 'expert-tensor-parallel-size'),
  dp: size('data-parallel size (default 1)', 'data-parallel-size'),
  cp: size('context-parallel size (default 1)', 'context-parallel-size'),
  vpp: size(
    'virtual pipeline stages per pipeline rank: the interleaved schedule (default: plain 1F1B)',
    'num-virtual-stages-per-pipeline-rank',
    'virtual-pipeline-model-parallel-size',
  ),
  'decoder-first-pipeline-num-layers': size(
    'decoder layers of the first pipeline stage (default: an even split)',
  ),
  'decoder-last-pipeline-num-layers': size(
    'decoder layers of the last pipeline stage (default: an even split)',
  ),
  'seq-length': size("tokens per sequence (default 4096, or the model's maximum when smaller)"),
  'micro-batch-size': size('sequences per micro-batch (default 1)'),
  'global-batch-size': size(
    'sequences per step: global / (micro-batch-size × dp) micro-batches (default: enough to fill the pipeline)',
  ),
  'distributed-optimizer': {
    type: 'boolean',
    description: 'shard the optimizer states over the data-parallel ranks',
    aliases: ['use-distributed-optimizer'],
  },
  'optimizer-cpu-offload': {
    type: 'boolean',
    description: 'keep the optimizer states in host memory (Megatron --optimizer-cpu-offload)',
  },
  'optimizer-offload-fraction': {
    type: 'string',
    value: 'F',
    description:
      'the share of the optimizer states offloaded, 0 to 1 (default 1 with --optimizer-cpu-offload)',
  },
  'sequence-parallel': { type: 'boolean', description: 'sequence parallelism (MoE with tp > 1 needs it)' },
  'recompute-granularity': {
    type: 'string',
    value: 'none|selective|full',
    description: 'activation recomputation (default none)',
  },
  'params-dtype': {
    type: 'string',
    value: 'bf16|fp16|fp32',
    description: 'dtype of the weights in training (default bf16)',
    presets: { bf16: 'bf16', fp16: 'fp16' },
  },
  'grad-dtype': {
    type: 'string',
    value: 'fp32|bf16|fp16',
    description: 'dtype of the gradient buffer (default fp32; fp16 with fp16 weights)',
    presets: { 'grad-reduce-in-bf16': 'bf16' },
  },
} as const satisfies Record<string, OptionSpec>;

const Flags = z.object({
  config: z.string().min(1, 'is required (a config.json, model folder or checkpoint)'),
  json: z.boolean(),
  tp: int(1, MAX_PARALLEL).optional(),
  pp: int(1, MAX_PARALLEL).optional(),
  ep: int(1, MAX_PARALLEL).optional(),
  etp: int(1, MAX_PARALLEL).optional(),
  dp: int(1, MAX_PARALLEL).optional(),
  cp: int(1, MAX_PARALLEL).optional(),
  vpp: int(1, MAX_PARALLEL).optional(),
  decoderFirstPipelineNumLayers: int(0, 100_000).optional(),
  decoderLastPipelineNumLayers: int(0, 100_000).optional(),
  seqLength: int(1, 2 ** 24).optional(),
  microBatchSize: int(1, 1 << 20).optional(),
  globalBatchSize: int(1, 2 ** 40).optional(),
  distributedOptimizer: z.boolean(),
  optimizerCpuOffload: z.boolean(),
  optimizerOffloadFraction: z
    .string()
    .trim()
    .regex(/^(0|1|0?\.\d+|1\.0*)$/, 'must be a number from 0 to 1')
    .transform(Number)
    .optional(),
  sequenceParallel: z.boolean(),
  recomputeGranularity: z
    .enum(['none', 'selective', 'full'], {
      error: (i) => `must be none, selective or full, got '${i.input}'`,
    })
    .optional(),
  paramsDtype: Dtype.optional(),
  gradDtype: Dtype.optional(),
});
type Flags = z.output<typeof Flags>;

/** The layout the flags describe, or undefined when none of the memory flags was given. */
function layoutOf(o: Flags, given: OptionValues): ModelInfoLayout | undefined {
  if (!Object.keys(memoryOptions).some((k) => given[k] !== undefined && given[k] !== false)) return undefined;
  const mbs = o.microBatchSize ?? 1;
  const dp = o.dp ?? 1;
  let numMicroBatches: number | undefined;
  if (o.globalBatchSize !== undefined) {
    if (o.globalBatchSize % (mbs * dp) !== 0) {
      throw new UsageError(
        `--global-batch-size ${o.globalBatchSize} is not a multiple of micro-batch-size × dp = ${mbs * dp}`,
        NAME,
      );
    }
    numMicroBatches = o.globalBatchSize / (mbs * dp);
  }
  const layout: ModelInfoLayout = {
    tp: o.tp,
    pp: o.pp,
    ep: o.ep,
    etp: o.etp,
    dp,
    cp: o.cp,
    vpp: o.vpp,
    firstStageLayers: o.decoderFirstPipelineNumLayers,
    lastStageLayers: o.decoderLastPipelineNumLayers,
    seqLength: o.seqLength,
    microBatchSize: mbs,
    numMicroBatches,
    distributedOptimizer: o.distributedOptimizer,
    // Megatron: the fraction counts only with --optimizer-cpu-offload (1 by default there)
    optimizerOffloadFraction: o.optimizerCpuOffload ? (o.optimizerOffloadFraction ?? 1) : 0,
    sequenceParallel: o.sequenceParallel,
    recompute: o.recomputeGranularity,
    paramDtype: o.paramsDtype,
    gradDtype: o.gradDtype,
  };
  // The library applies its defaults to fields that are absent, not to fields set to undefined.
  return Object.fromEntries(Object.entries(layout).filter(([, v]) => v !== undefined)) as ModelInfoLayout;
}

/** Runs `megapatch model info` with flag values (strings, as typed); returns the report. */
export function runModelInfo(args: OptionValues, io: Io = memoryIo()): ModelInfo {
  const o = parseOptions(Flags, withDefaults(info, args), NAME);
  const m = modelInfo(o.config, layoutOf(o, args));
  io.out.log(o.json ? JSON.stringify(m, null, 2) : formatModelInfo(m));
  return m;
}

export const info: Command = {
  name: NAME,
  summary: 'architecture, TransformerConfig, parameter counts and memory per rank of a model',
  description:
    'Reads a Hugging Face config.json (or the model folder holding it) or a megapatch checkpoint ' +
    "(its root or one iter_NNNNNNN folder). With any layout or batch flag it adds Megatron's " +
    'theoretical memory per rank, from the shapes alone: parameters per rank, weights, gradients, ' +
    'optimizer states and activations of the first, the peak and the last pipeline stage.',
  options: {
    config: {
      type: 'string',
      value: 'PATH',
      description: 'config.json, the model folder holding it, or a megapatch checkpoint',
      required: true,
    },
    ...memoryOptions,
    json: { type: 'boolean', description: 'print JSON' },
  },
  examples: [
    'model info --config Qwen3-30B-A3B/config.json',
    'model info --config DeepSeek-V3 --tp 2 --pp 8 --ep 64 --etp 1 --dp 64 --decoder-first-pipeline-num-layers 7 ' +
      '--decoder-last-pipeline-num-layers 6 --seq-length 4096 --sequence-parallel --use-distributed-optimizer',
  ],
  run: ({ options, io }) => {
    runModelInfo(options, io);
  },
};

const group: CommandGroup = {
  name: 'model',
  summary: 'inspect Hugging Face model configs',
  commands: { info: { summary: info.summary, load: async () => info } },
};
export default group;
