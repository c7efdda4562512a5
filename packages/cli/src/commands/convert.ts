// `megapatch convert hf-to-megapatch | megapatch-to-hf | reshard | megatron-to-megapatch |
// megapatch-to-megatron | megatron-to-hf`: streaming checkpoint conversion
// with a progress bar on a terminal (plain periodic lines otherwise) and a summary at the end.
import {
  type ConversionProgress,
  type ConversionSummary,
  convertHfToMegapatch,
  convertMegapatchToHf,
  convertMegapatchToMegatron,
  convertMegatronToHf,
  convertMegatronToMegapatch,
  type ModelDtype,
  reshardCheckpoint,
} from '@megapatch/convert';
import cliProgress from 'cli-progress';
import { z } from 'zod';
import {
  type Command,
  type CommandGroup,
  type OptionSpec,
  type OptionValues,
  withDefaults,
} from '../command.js';
import { formatBytes } from '../format.js';
import { type Io, memoryIo, type Output } from '../io.js';
import {
  Dtype,
  dtypeOption,
  int,
  layoutOptions,
  layoutSchema,
  MAX_PARALLEL,
  overwriteOption,
  parseOptions,
} from '../options.js';
import { type FlagPath, withOutput } from '../outputs.js';

const ModelDtypeFlag = Dtype.transform(
  (d): ModelDtype => ({ bf16: 'BF16', fp16: 'F16', fp32: 'F32' })[d] as ModelDtype,
);
const path = (what: string) => z.string({ message: `is required (${what})` }).min(1, `is required (${what})`);
/** Megatron pads to 128 by default; anything past 2^20 is a typo. */
const VOCAB_MULTIPLE_MAX = 1 << 20;
/** Megatron's iteration folders have 7 digits; allow more, but keep it an integer a file name holds. */
const ITERATION_MAX = 999_999_999_999;
/** Far above any model's layer count; the library checks the counts against the model. */
const LAYERS_MAX = 1_000_000;

/** Megatron's uneven-pipeline flags (the library checks them against the model). */
const pipelineSchema = {
  vpp: int(1, MAX_PARALLEL).optional(),
  decoderFirstPipelineNumLayers: int(1, LAYERS_MAX).optional(),
  decoderLastPipelineNumLayers: int(1, LAYERS_MAX).optional(),
  pipelineModelParallelLayout: z.string().trim().min(1, 'must not be empty').optional(),
};

const pipelineOptions = {
  vpp: {
    type: 'string',
    value: 'N',
    description: 'virtual pipeline stages per pipeline rank: layers interleave over the ranks (default 1)',
    aliases: ['num-virtual-stages-per-pipeline-rank', 'virtual-pipeline-model-parallel-size'],
  },
  'decoder-first-pipeline-num-layers': {
    type: 'string',
    value: 'N',
    description: 'decoder layers on the first pipeline rank; the rest split evenly (default: an even split)',
  },
  'decoder-last-pipeline-num-layers': {
    type: 'string',
    value: 'N',
    description: 'decoder layers on the last pipeline rank; the rest split evenly (default: an even split)',
  },
  'pipeline-model-parallel-layout': {
    type: 'string',
    value: 'LAYOUT',
    description:
      "Megatron's stage layout: pp x vpp stages split by '|' of E (embedding), t (decoder layer), " +
      'm (MTP layer), L (loss), x*N repeats, e.g. "E|t*5|t*6|t,m,L"',
  },
} as const satisfies Record<string, OptionSpec>;

const HfToMegapatch = z.object({
  hfDir: path('a Hugging Face model folder'),
  out: path('the megapatch checkpoint root'),
  ...layoutSchema,
  ...pipelineSchema,
  dtype: ModelDtypeFlag.optional(),
  makeVocabSizeDivisibleBy: int(1, VOCAB_MULTIPLE_MAX),
  iteration: int(0, ITERATION_MAX),
  overwrite: z.boolean(),
});
export type HfToMegapatchArgs = z.input<typeof HfToMegapatch>;

const MegapatchToHf = z.object({
  in: path('a megapatch checkpoint root'),
  out: path('the Hugging Face folder to write'),
  maxShardSize: z.string().min(1),
  dtype: ModelDtypeFlag.optional(),
  iteration: int(0, ITERATION_MAX).optional(),
  overwrite: z.boolean(),
});
export type MegapatchToHfArgs = z.input<typeof MegapatchToHf>;

const Reshard = z.object({
  in: path('a megapatch checkpoint root'),
  out: path('the checkpoint root to write'),
  ...layoutSchema,
  ...pipelineSchema,
  dtype: ModelDtypeFlag.optional(),
  iteration: int(0, ITERATION_MAX).optional(),
  overwrite: z.boolean(),
});
export type ReshardArgs = z.input<typeof Reshard>;

const MegatronToMegapatch = z.object({
  in: path('a Megatron checkpoint root'),
  hfDir: path("the Hugging Face folder with the model's config.json"),
  out: path('the megapatch checkpoint root'),
  tp: int(1, MAX_PARALLEL).optional(),
  pp: int(1, MAX_PARALLEL).optional(),
  ep: int(1, MAX_PARALLEL).optional(),
  etp: int(1, MAX_PARALLEL).optional(),
  ...pipelineSchema,
  dtype: ModelDtypeFlag.optional(),
  iteration: int(0, ITERATION_MAX).optional(),
  overwrite: z.boolean(),
});
export type MegatronToMegapatchArgs = z.input<typeof MegatronToMegapatch>;

const MegatronToHf = z.object({
  in: path('a Megatron checkpoint root'),
  hfDir: path("the Hugging Face folder with the model's config.json"),
  out: path('the Hugging Face folder to write'),
  maxShardSize: z.string().min(1),
  dtype: ModelDtypeFlag.optional(),
  iteration: int(0, ITERATION_MAX).optional(),
  overwrite: z.boolean(),
});
export type MegatronToHfArgs = z.input<typeof MegatronToHf>;

const MegapatchToMegatron = z.object({
  in: path('a megapatch checkpoint root'),
  out: path('the Megatron checkpoint root to write'),
  ...layoutSchema,
  ...pipelineSchema,
  transformerImpl: z.enum(['transformer_engine', 'local'], {
    message: "must be 'transformer_engine' or 'local'",
  }),
  moeGroupedGemm: z.boolean(),
  dtype: ModelDtypeFlag.optional(),
  iteration: int(0, ITERATION_MAX).optional(),
  overwrite: z.boolean(),
});
export type MegapatchToMegatronArgs = z.input<typeof MegapatchToMegatron>;

/** A byte progress reporter: a cli-progress bar on a terminal, a line every 2 s otherwise. */
function byteProgress(out: Output): { update: (p: ConversionProgress) => void; stop: () => void } {
  const t0 = performance.now();
  const rate = (done: number) => (done / 1e6 / Math.max(1e-9, (performance.now() - t0) / 1000)).toFixed(0);
  if (out.isTTY) {
    const bar = new cliProgress.SingleBar(
      { format: '{bar} {percentage}% | {done} / {all} | {rate} MB/s | {tensor}', hideCursor: true },
      cliProgress.Presets.shades_classic,
    );
    let started = false;
    return {
      update: (p) => {
        if (!started) {
          bar.start(p.totalBytes, 0, {
            done: formatBytes(0),
            all: formatBytes(p.totalBytes),
            rate: '0',
            tensor: '',
          });
          started = true;
        }
        bar.update(p.doneBytes, {
          done: formatBytes(p.doneBytes),
          rate: rate(p.doneBytes),
          tensor: p.tensor,
        });
      },
      stop: () => {
        if (started) bar.stop();
      },
    };
  }
  let last = 0;
  let first = true;
  return {
    update: (p) => {
      const s = (performance.now() - t0) / 1000;
      if (!first && s - last < 2) return;
      last = s;
      if (first) {
        first = false;
        out.log(`writing ${formatBytes(p.totalBytes)}`);
        return;
      }
      const pct = ((100 * p.doneBytes) / Math.max(1, p.totalBytes)).toFixed(1);
      out.log(
        `progress: ${pct}% (${formatBytes(p.doneBytes)} of ${formatBytes(p.totalBytes)}), ${rate(p.doneBytes)} MB/s`,
      );
    },
    stop: () => {},
  };
}

function summarize(out: Output, what: string, s: ConversionSummary): void {
  const speed = s.seconds > 0 ? (s.bytes / 1e9 / s.seconds).toFixed(2) : '-';
  out.log(`${what}: ${s.output}`);
  out.log(
    `  ${s.tensors} tensors, ${s.parameters.toLocaleString('en-US')} parameters, ${formatBytes(s.bytes)} in ${s.files} file(s)`,
  );
  out.log(`  ${s.seconds.toFixed(1)} s, ${speed} GB/s`);
  if (s.carried.length > 0) out.log(`  carried over: ${s.carried.join(', ')}`);
}

/** Runs a conversion into `out` (see {@link withOutput}) with a progress reporter. */
function convertInto(
  io: Io,
  command: string,
  paths: { out: string; inputs: FlagPath[] },
  run: (signal: AbortSignal, onProgress: (p: ConversionProgress) => void) => Promise<ConversionSummary>,
): Promise<ConversionSummary> {
  const outputs = [{ flag: '--out', path: paths.out }];
  return withOutput(io, command, { target: paths.out, outputs, inputs: paths.inputs }, async (signal) => {
    const progress = byteProgress(io.out);
    try {
      return await run(signal, progress.update);
    } finally {
      progress.stop();
    }
  });
}

interface LayoutFlags {
  tp: number;
  pp: number;
  ep: number;
  etp?: number;
  vpp?: number;
  decoderFirstPipelineNumLayers?: number;
  decoderLastPipelineNumLayers?: number;
  pipelineModelParallelLayout?: string;
}

const layoutOf = (o: LayoutFlags) => ({
  tp: o.tp,
  pp: o.pp,
  ep: o.ep,
  ...(o.etp ? { etp: o.etp } : {}),
  ...(o.vpp !== undefined ? { vpp: o.vpp } : {}),
  ...(o.decoderFirstPipelineNumLayers !== undefined
    ? { decoderFirstPipelineNumLayers: o.decoderFirstPipelineNumLayers }
    : {}),
  ...(o.decoderLastPipelineNumLayers !== undefined
    ? { decoderLastPipelineNumLayers: o.decoderLastPipelineNumLayers }
    : {}),
  ...(o.pipelineModelParallelLayout !== undefined
    ? { pipelineModelParallelLayout: o.pipelineModelParallelLayout }
    : {}),
});
/** `tp=2 pp=2 ep=1 etp=2`, and the uneven-pipeline settings given. */
const layoutText = (o: LayoutFlags) =>
  [
    `tp=${o.tp} pp=${o.pp} ep=${o.ep} etp=${o.etp ?? o.tp}`,
    o.vpp !== undefined ? `vpp=${o.vpp}` : '',
    o.decoderFirstPipelineNumLayers !== undefined
      ? `decoder-first-pipeline-num-layers=${o.decoderFirstPipelineNumLayers}`
      : '',
    o.decoderLastPipelineNumLayers !== undefined
      ? `decoder-last-pipeline-num-layers=${o.decoderLastPipelineNumLayers}`
      : '',
    o.pipelineModelParallelLayout !== undefined
      ? `pipeline-model-parallel-layout=${JSON.stringify(o.pipelineModelParallelLayout)}`
      : '',
  ]
    .filter(Boolean)
    .join(' ');

const HF_TO_MEGAPATCH = 'convert hf-to-megapatch';
const MEGAPATCH_TO_HF = 'convert megapatch-to-hf';
const RESHARD = 'convert reshard';
const MEGATRON_TO_MEGAPATCH = 'convert megatron-to-megapatch';
const MEGAPATCH_TO_MEGATRON = 'convert megapatch-to-megatron';
const MEGATRON_TO_HF = 'convert megatron-to-hf';

/** `megapatch convert hf-to-megapatch` with flag values (strings, as typed). */
export async function runHfToMegapatch(args: OptionValues, io: Io = memoryIo()): Promise<ConversionSummary> {
  const o = parseOptions(HfToMegapatch, withDefaults(hfToMegapatch, args), HF_TO_MEGAPATCH);
  const s = await convertInto(
    io,
    HF_TO_MEGAPATCH,
    { out: o.out, inputs: [{ flag: '--hf-dir', path: o.hfDir }] },
    (signal, onProgress) =>
      convertHfToMegapatch({
        hfDir: o.hfDir,
        output: o.out,
        layout: layoutOf(o),
        ...(o.dtype ? { dtype: o.dtype } : {}),
        makeVocabSizeDivisibleBy: o.makeVocabSizeDivisibleBy,
        iteration: o.iteration,
        overwrite: o.overwrite,
        onProgress,
        signal,
      }),
  );
  summarize(io.out, `megapatch checkpoint (${layoutText(o)})`, s);
  return s;
}

/** What both Hugging Face exports take from their flags: shard size, dtype, iteration, overwrite. */
function hfWriteOptions<D>(o: { maxShardSize: string; dtype?: D; iteration?: number; overwrite: boolean }): {
  maxShardSize: string;
  dtype?: D;
  iteration?: number;
  overwrite: boolean;
} {
  return {
    maxShardSize: o.maxShardSize,
    ...(o.dtype ? { dtype: o.dtype } : {}),
    ...(o.iteration !== undefined ? { iteration: o.iteration } : {}),
    overwrite: o.overwrite,
  };
}

/** `megapatch convert megapatch-to-hf` with flag values. */
export async function runMegapatchToHf(args: OptionValues, io: Io = memoryIo()): Promise<ConversionSummary> {
  const o = parseOptions(MegapatchToHf, withDefaults(megapatchToHf, args), MEGAPATCH_TO_HF);
  const s = await convertInto(
    io,
    MEGAPATCH_TO_HF,
    { out: o.out, inputs: [{ flag: '--in', path: o.in }] },
    (signal, onProgress) =>
      convertMegapatchToHf({
        input: o.in,
        output: o.out,
        ...hfWriteOptions(o),
        onProgress,
        signal,
      }),
  );
  summarize(io.out, 'Hugging Face folder', s);
  return s;
}

/** `megapatch convert reshard` with flag values. */
export async function runReshard(args: OptionValues, io: Io = memoryIo()): Promise<ConversionSummary> {
  const o = parseOptions(Reshard, withDefaults(reshard, args), RESHARD);
  const s = await convertInto(
    io,
    RESHARD,
    { out: o.out, inputs: [{ flag: '--in', path: o.in }] },
    (signal, onProgress) =>
      reshardCheckpoint({
        input: o.in,
        output: o.out,
        layout: layoutOf(o),
        ...(o.dtype ? { dtype: o.dtype } : {}),
        ...(o.iteration !== undefined ? { iteration: o.iteration } : {}),
        overwrite: o.overwrite,
        onProgress,
        signal,
      }),
  );
  summarize(io.out, `megapatch checkpoint (${layoutText(o)})`, s);
  return s;
}

/** `megapatch convert megatron-to-megapatch` with flag values. */
export async function runMegatronToMegapatch(
  args: OptionValues,
  io: Io = memoryIo(),
): Promise<ConversionSummary> {
  const o = parseOptions(MegatronToMegapatch, withDefaults(megatronToMegapatch, args), MEGATRON_TO_MEGAPATCH);
  // the layout flags given; none keeps the Megatron checkpoint's layout
  const given = Object.fromEntries(
    (
      [
        'tp',
        'pp',
        'ep',
        'etp',
        'vpp',
        'decoderFirstPipelineNumLayers',
        'decoderLastPipelineNumLayers',
        'pipelineModelParallelLayout',
      ] as const
    )
      .filter((k) => o[k] !== undefined)
      .map((k) => [k, o[k]]),
  );
  const layout = Object.keys(given).length > 0 ? given : undefined;
  const s = await convertInto(
    io,
    MEGATRON_TO_MEGAPATCH,
    { out: o.out, inputs: megatronInputs(o) },
    (signal, onProgress) =>
      convertMegatronToMegapatch({
        input: o.in,
        hfDir: o.hfDir,
        output: o.out,
        ...(layout ? { layout } : {}),
        ...(o.dtype ? { dtype: o.dtype } : {}),
        ...(o.iteration !== undefined ? { iteration: o.iteration } : {}),
        overwrite: o.overwrite,
        onProgress,
        signal,
      }),
  );
  summarize(
    io.out,
    `megapatch checkpoint (${
      layout
        ? Object.entries(given)
            .map(([k, v]) => `${k}=${v}`)
            .join(' ')
        : 'the Megatron layout'
    })`,
    s,
  );
  return s;
}

/** `megapatch convert megatron-to-hf` with flag values. */
export async function runMegatronToHf(args: OptionValues, io: Io = memoryIo()): Promise<ConversionSummary> {
  const o = parseOptions(MegatronToHf, withDefaults(megatronToHf, args), MEGATRON_TO_HF);
  const s = await convertInto(
    io,
    MEGATRON_TO_HF,
    { out: o.out, inputs: megatronInputs(o) },
    (signal, onProgress) =>
      convertMegatronToHf({
        input: o.in,
        hfDir: o.hfDir,
        output: o.out,
        ...hfWriteOptions(o),
        onProgress,
        signal,
      }),
  );
  summarize(io.out, 'Hugging Face folder', s);
  return s;
}

/** `megapatch convert megapatch-to-megatron` with flag values. */
export async function runMegapatchToMegatron(
  args: OptionValues,
  io: Io = memoryIo(),
): Promise<ConversionSummary> {
  const o = parseOptions(MegapatchToMegatron, withDefaults(megapatchToMegatron, args), MEGAPATCH_TO_MEGATRON);
  const s = await convertInto(
    io,
    MEGAPATCH_TO_MEGATRON,
    { out: o.out, inputs: [{ flag: '--in', path: o.in }] },
    (signal, onProgress) =>
      convertMegapatchToMegatron({
        input: o.in,
        output: o.out,
        layout: layoutOf(o),
        transformerImpl: o.transformerImpl,
        moeGroupedGemm: o.moeGroupedGemm,
        ...(o.dtype ? { dtype: o.dtype } : {}),
        ...(o.iteration !== undefined ? { iteration: o.iteration } : {}),
        overwrite: o.overwrite,
        onProgress,
        signal,
      }),
  );
  summarize(io.out, `Megatron torch-format checkpoint (${layoutText(o)})`, s);
  return s;
}

/** `--in`: a checkpoint to read, with Megatron's `--load`. */
const inOption = {
  type: 'string',
  value: 'DIR',
  description: 'megapatch checkpoint root',
  required: true,
  aliases: ['load', 'load-dir'],
} as const satisfies OptionSpec;

/** `--out`, with Megatron's `--save`. */
const outOption = (description: string): OptionSpec => ({
  type: 'string',
  value: 'DIR',
  description,
  required: true,
  aliases: ['save', 'save-dir'],
});

const iterationOption = {
  type: 'string',
  value: 'N',
  description: 'iteration to read (default: the latest)',
  aliases: ['ckpt-step'],
} as const;

export const hfToMegapatch: Command = {
  name: HF_TO_MEGAPATCH,
  summary: 'Hugging Face folder -> megapatch checkpoint (any TP/PP/EP layout)',
  description:
    'Streams the weights of a Hugging Face model folder (safetensors, or PyTorch pytorch_model*.bin ' +
    'files, read without running their code) into a megapatch checkpoint root ' +
    '(<out>/iter_NNNNNNN/ and latest_checkpointed_iteration.txt) in the layout given, carrying ' +
    'config.json, generation_config.json and the tokenizer files along.',
  options: {
    'hf-dir': {
      type: 'string',
      value: 'DIR',
      description: 'Hugging Face model folder (config.json + safetensors or pytorch_model*.bin)',
      required: true,
      aliases: ['load', 'load-dir', 'hf-ckpt-path'],
    },
    out: outOption('megapatch checkpoint root to write'),
    ...layoutOptions,
    ...pipelineOptions,
    dtype: dtypeOption,
    'make-vocab-size-divisible-by': {
      type: 'string',
      value: 'N',
      description: 'pad the vocabulary to a multiple of N x tp, as Megatron does',
      default: '128',
    },
    iteration: {
      type: 'string',
      value: 'N',
      description: 'iteration recorded in the checkpoint',
      default: '0',
    },
    overwrite: overwriteOption,
  },
  examples: [
    'convert hf-to-megapatch --hf-dir Qwen3-0.6B --out ckpt --tp 2 --pp 2 --dtype bf16',
    'convert hf-to-megapatch --hf-dir DeepSeek-V3 --out ckpt --tp 8 --pp 8 --ep 64 --etp 1 ' +
      '--decoder-first-pipeline-num-layers 5 --decoder-last-pipeline-num-layers 8',
  ],
  run: async ({ options, io }) => {
    await runHfToMegapatch(options, io);
  },
};

/** `--max-shard-size` of the Hugging Face writers. */
const maxShardSizeOption = {
  type: 'string',
  value: 'SIZE',
  description: "largest shard file, e.g. '5GB' or '500MB'",
  default: '5GB',
} as const satisfies OptionSpec;

export const megapatchToHf: Command = {
  name: MEGAPATCH_TO_HF,
  summary: 'megapatch checkpoint (any layout) -> Hugging Face folder',
  description:
    'Exports a megapatch checkpoint saved in any layout as sharded safetensors with an index, ' +
    'config.json, generation_config.json and the tokenizer files, ready for transformers.',
  options: {
    in: inOption,
    out: outOption('Hugging Face folder to write'),
    'max-shard-size': maxShardSizeOption,
    dtype: dtypeOption,
    iteration: iterationOption,
    overwrite: overwriteOption,
  },
  examples: ['convert megapatch-to-hf --in ckpt --out Qwen3-0.6B-trained --dtype bf16'],
  run: async ({ options, io }) => {
    await runMegapatchToHf(options, io);
  },
};

export const reshard: Command = {
  name: RESHARD,
  summary: 'megapatch checkpoint -> the same in another TP/PP/EP layout',
  options: {
    in: inOption,
    out: outOption('checkpoint root to write'),
    ...layoutOptions,
    ...pipelineOptions,
    dtype: dtypeOption,
    iteration: { ...iterationOption, description: 'iteration to reshard (default: the latest)' },
    overwrite: overwriteOption,
  },
  examples: [
    'convert reshard --in ckpt --out ckpt-tp1 --tp 1 --pp 1',
    'convert reshard --in ckpt --out ckpt-pp4 --pp 4 --pipeline-model-parallel-layout "E|t*5|t*6|t,m,L"',
  ],
  run: async ({ options, io }) => {
    await runReshard(options, io);
  },
};

/** The layout flags without defaults: a flag not given keeps the Megatron checkpoint's setting. */
const keepLayout = (spec: OptionSpec): OptionSpec => {
  const { default: _, ...rest } = spec as OptionSpec & { default?: string };
  return { ...rest, description: `${spec.description} of the output (default: the Megatron checkpoint's)` };
};
const keepLayoutOptions = {
  tp: keepLayout(layoutOptions.tp),
  pp: keepLayout(layoutOptions.pp),
  ep: keepLayout(layoutOptions.ep),
  etp: keepLayout(layoutOptions.etp),
};

/** `--in` (a Megatron checkpoint) and `--hf-dir` (its HF config and side files) of the Megatron readers. */
const megatronSourceOptions = {
  in: { ...inOption, description: 'Megatron checkpoint root (or an iter_NNNNNNN folder)' },
  'hf-dir': {
    type: 'string',
    value: 'DIR',
    description: "Hugging Face folder with the model's config.json (and the tokenizer files to carry)",
    required: true,
    aliases: ['hf-ckpt-path'],
  },
} as const satisfies Record<string, OptionSpec>;

/** The paths a Megatron reader reads (no output may sit inside them). */
const megatronInputs = (o: { in: string; hfDir: string }) => [
  { flag: '--in', path: o.in },
  { flag: '--hf-dir', path: o.hfDir },
];

export const megatronToMegapatch: Command = {
  name: MEGATRON_TO_MEGAPATCH,
  summary: 'Megatron-LM checkpoint (torch or torch_dist format) -> megapatch checkpoint',
  description:
    'Reads the model weights of a Megatron-LM checkpoint, saved with --ckpt-format torch (any TP/PP/EP, ' +
    'Transformer Engine or local layer names, grouped or sequential experts) or torch_dist (Megatron-Core ' +
    'distributed checkpoints: .metadata, *.distcp, common.pt), for the model that ' +
    "--hf-dir's config.json describes, and writes a megapatch checkpoint in the same layout (or the one " +
    "the layout flags give) with --hf-dir's config and tokenizer files. The optimizer and RNG states are not carried.",
  options: {
    ...megatronSourceOptions,
    out: outOption('megapatch checkpoint root to write'),
    ...keepLayoutOptions,
    ...pipelineOptions,
    dtype: dtypeOption,
    iteration: iterationOption,
    overwrite: overwriteOption,
  },
  examples: ['convert megatron-to-megapatch --load megatron-ckpt --hf-dir Qwen3-0.6B --out ckpt'],
  run: async ({ options, io }) => {
    await runMegatronToMegapatch(options, io);
  },
};

export const megatronToHf: Command = {
  name: MEGATRON_TO_HF,
  summary: 'Megatron-LM checkpoint (torch or torch_dist format) -> Hugging Face folder',
  description:
    "Pai-Megatron-Patch's mcore2hf in one streaming step: reads the model weights of a Megatron-LM " +
    'checkpoint (either format, any layout, as megatron-to-megapatch does) for the model that ' +
    "--hf-dir's config.json describes, and writes sharded safetensors with an index and --hf-dir's " +
    'config (for the dtype written), generation and tokenizer files. Where --hf-dir holds weights too, ' +
    'each tensor is written in their dtype unless --dtype says otherwise.',
  options: {
    ...megatronSourceOptions,
    out: outOption('Hugging Face folder to write'),
    'max-shard-size': maxShardSizeOption,
    dtype: dtypeOption,
    iteration: iterationOption,
    overwrite: overwriteOption,
  },
  examples: [
    'convert megatron-to-hf --load megatron-ckpt --hf-ckpt-path Qwen3-0.6B --save Qwen3-0.6B-trained',
  ],
  run: async ({ options, io }) => {
    await runMegatronToHf(options, io);
  },
};

export const megapatchToMegatron: Command = {
  name: MEGAPATCH_TO_MEGATRON,
  summary: 'megapatch checkpoint -> Megatron-LM torch-format checkpoint (any TP/PP/EP layout)',
  description:
    'Writes the model weights of a megapatch checkpoint as a Megatron-LM --ckpt-format torch ' +
    'checkpoint (<out>/iter_NNNNNNN/mp_rank_*/model_optim_rng.pt and latest_checkpointed_iteration.txt) ' +
    'with the args Megatron checks; load it with --finetune (or --no-load-optim --no-load-rng).',
  options: {
    in: inOption,
    out: outOption('Megatron checkpoint root to write'),
    ...layoutOptions,
    ...pipelineOptions,
    'transformer-impl': {
      type: 'string',
      value: 'IMPL',
      description: "layer names of Megatron's --transformer-impl: transformer_engine (fused norms) or local",
      default: 'transformer_engine',
    },
    'moe-grouped-gemm': {
      type: 'boolean',
      description: 'experts as TEGroupedMLP (experts.linear_fc1.weight<j>), for --moe-grouped-gemm',
    },
    dtype: dtypeOption,
    iteration: { ...iterationOption, description: 'iteration to export (default: the latest)' },
    overwrite: overwriteOption,
  },
  examples: [
    'convert megapatch-to-megatron --in ckpt --out megatron-ckpt --tp 2 --pp 2',
    'convert megapatch-to-megatron --in ckpt --out megatron-ckpt --ep 4 --moe-grouped-gemm',
  ],
  run: async ({ options, io }) => {
    await runMegapatchToMegatron(options, io);
  },
};

const group: CommandGroup = {
  name: 'convert',
  summary: 'convert checkpoints between Hugging Face and megapatch layouts',
  commands: {
    'hf-to-megapatch': { summary: hfToMegapatch.summary, load: async () => hfToMegapatch },
    'megapatch-to-hf': { summary: megapatchToHf.summary, load: async () => megapatchToHf },
    reshard: { summary: reshard.summary, load: async () => reshard },
    'megatron-to-megapatch': { summary: megatronToMegapatch.summary, load: async () => megatronToMegapatch },
    'megapatch-to-megatron': { summary: megapatchToMegatron.summary, load: async () => megapatchToMegatron },
    'megatron-to-hf': { summary: megatronToHf.summary, load: async () => megatronToHf },
  },
};
export default group;
