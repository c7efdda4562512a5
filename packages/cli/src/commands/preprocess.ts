// `megapatch preprocess pretrain|sft`: tokenise a corpus into Megatron indexed datasets, with a
// progress bar on a terminal and plain periodic lines otherwise (logs, CI).
import {
  type BadLine,
  type PreprocessPretrainResult,
  type PreprocessProgress,
  type PreprocessSftResult,
  preprocessPretrain,
  preprocessSft,
} from '@megapatch/data';
import cliProgress from 'cli-progress';
import { z } from 'zod';
import {
  type Command,
  type CommandGroup,
  type OptionSpec,
  type OptionValues,
  withDefaults,
} from '../command.js';
import { type Io, memoryIo, type Output } from '../io.js';
import { capWorkers, int, overwriteOption, parseOptions } from '../options.js';
import { type FlagPath, withOutput } from '../outputs.js';
import { MAX_SEQ_LENGTH } from './data.js';

/** More bad records than this fraction of the input gets a warning (a wrong --json-key, a broken file). */
export const BAD_FRACTION_WARNING = 0.01;
/** Far more threads than any machine has cores: a typo, not a wish. */
const MAX_WORKERS = 4096;

const PretrainOptions = z.object({
  input: z.string().min(1, 'is required (a .jsonl, .json, .parquet or .txt file)'),
  jsonKey: z.string().min(1, 'must not be empty'),
  tokenizer: z.string().min(1, 'is required (a Hugging Face tokenizer folder)'),
  tokenizerType: z
    .literal('HuggingFaceTokenizer', {
      message: 'megapatch reads Hugging Face tokenizer folders only: HuggingFaceTokenizer',
    })
    .optional(),
  outputPrefix: z.string().min(1, 'is required'),
  appendEod: z.boolean(),
  workers: int(1, MAX_WORKERS),
  strict: z.boolean(),
  overwrite: z.boolean(),
});

const SftOptions = z.object({
  input: z.string().min(1, 'is required (an Alpaca/ShareGPT/OpenAI .json, .jsonl or .parquet file)'),
  tokenizer: z.string().min(1, 'is required (a Hugging Face tokenizer folder)'),
  tokenizerType: PretrainOptions.shape.tokenizerType,
  outputPrefix: z.string().min(1, 'is required'),
  seqLength: int(1, MAX_SEQ_LENGTH),
  truncation: z.enum(['drop', 'truncate'], { message: "must be 'drop' or 'truncate'" }),
  /** Rendering + tokenizer threads; the output is the same whatever the count. */
  workers: int(1, MAX_WORKERS),
  strict: z.boolean(),
  overwrite: z.boolean(),
});

const mbps = (p: PreprocessProgress): string =>
  p.seconds > 0 ? (p.bytes / 1e6 / p.seconds).toFixed(2) : '0.00';
const perSecond = (n: number, s: number): string => (s > 0 ? (n / s).toFixed(1) : '0');

/** A progress reporter: cli-progress on a terminal, a line every couple of seconds otherwise. */
function progressReporter(
  out: Output,
  unit: string,
): { update: (p: PreprocessProgress) => void; stop: () => void } {
  if (out.isTTY) {
    // The total is unknown while streaming, so the bar shows counters rather than a percentage.
    const bar = new cliProgress.SingleBar(
      {
        format: `{documents} ${unit} | {tokens} tokens | {mbps} MB/s | {duration_formatted}`,
        hideCursor: true,
      },
      cliProgress.Presets.shades_classic,
    );
    bar.start(0, 0, { documents: 0, tokens: 0, mbps: '0.00' });
    return {
      update: (p) => bar.update(0, { documents: p.documents, tokens: p.tokens, mbps: mbps(p) }),
      stop: () => bar.stop(),
    };
  }
  let last = 0;
  return {
    update: (p) => {
      if (p.seconds - last < 2) return;
      last = p.seconds;
      out.log(
        `progress: ${p.documents} ${unit}, ${p.tokens} tokens, ${mbps(p)} MB/s, ${p.seconds.toFixed(1)} s`,
      );
    },
    stop: () => {},
  };
}

/** Lists bad records, and warns when there are many of them or when text was not valid UTF-8. */
function reportBadLines(
  io: Io,
  r: { badLines: readonly BadLine[]; records: number; invalidUtf8: number },
): void {
  const { badLines } = r;
  if (badLines.length > 0) {
    io.out.log(`bad lines: ${badLines.length} (skipped)`);
    for (const b of badLines.slice(0, 20)) io.out.log(`  line ${b.line}: ${b.reason}`);
    if (badLines.length > 20) io.out.log(`  ... and ${badLines.length - 20} more`);
  }
  if (r.records > 0 && badLines.length / r.records > BAD_FRACTION_WARNING) {
    const pct = ((100 * badLines.length) / r.records).toFixed(1);
    io.warn(
      `${badLines.length} of ${r.records} records (${pct}%) were bad and skipped; check the input and the flags, or pass --strict to stop at the first`,
    );
  }
  if (r.invalidUtf8 > 0) {
    io.warn(
      `${r.invalidUtf8} record(s) were not valid UTF-8 and were read with replacement characters; --strict rejects them`,
    );
  }
}

/** Runs a preprocessing job into the dataset prefix (see {@link withOutput}) with a progress reporter. */
function preprocessInto<R>(
  io: Io,
  command: string,
  paths: { prefix: string; outputs: string[]; inputs: FlagPath[] },
  unit: string,
  run: (signal: AbortSignal, onProgress: (p: PreprocessProgress) => void) => Promise<R>,
): Promise<R> {
  const outputs = paths.outputs.map((p) => ({ flag: '--output-prefix', path: p }));
  const where = { target: paths.prefix, kind: 'prefix' as const, outputs, inputs: paths.inputs };
  return withOutput(io, command, where, async (signal) => {
    const progress = progressReporter(io.out, unit);
    try {
      return await run(signal, progress.update);
    } finally {
      progress.stop();
    }
  });
}

/** The paths a preprocessing job reads, with their flags. */
const inputsOf = (o: { input: string; tokenizer: string }) => [
  { flag: '--input', path: o.input },
  { flag: '--tokenizer', path: o.tokenizer },
];

/** Runs `megapatch preprocess pretrain` with parsed options, printing progress and totals. */
export async function runPretrain(
  args: OptionValues,
  io: Io = memoryIo(),
): Promise<PreprocessPretrainResult> {
  const o = parseOptions(PretrainOptions, withDefaults(pretrain, args), PRETRAIN);
  const workers = capWorkers(io, o.workers);
  const datasetPrefix = `${o.outputPrefix}_${o.jsonKey}_document`;
  const r = await preprocessInto(
    io,
    PRETRAIN,
    {
      prefix: o.outputPrefix,
      outputs: [`${datasetPrefix}.bin`, `${datasetPrefix}.idx`],
      inputs: inputsOf(o),
    },
    'documents',
    (signal, onProgress) =>
      preprocessPretrain({
        input: o.input,
        jsonKey: o.jsonKey,
        tokenizerDir: o.tokenizer,
        outputPrefix: o.outputPrefix,
        appendEod: o.appendEod,
        workers,
        strict: o.strict,
        overwrite: o.overwrite,
        signal,
        onProgress,
      }),
  );
  const out = io.out;
  out.log(`wrote ${r.datasetPrefix}.bin / .idx (${r.dtype})`);
  out.log(
    `documents: ${r.documents}, tokens: ${r.tokens}, bytes: ${r.bytes}, seconds: ${r.seconds.toFixed(2)}, ` +
      `documents/s: ${perSecond(r.documents, r.seconds)}, MB/s: ${mbps(r)}`,
  );
  reportBadLines(io, r);
  return r;
}

/** Runs `megapatch preprocess sft` with flag values, printing progress and totals. */
export async function runSft(args: OptionValues, io: Io = memoryIo()): Promise<PreprocessSftResult> {
  const o = parseOptions(SftOptions, withDefaults(sft, args), SFT);
  const workers = capWorkers(io, o.workers);
  const p = o.outputPrefix;
  const r = await preprocessInto(
    io,
    SFT,
    {
      prefix: p,
      outputs: [
        '_sft_tokens.bin',
        '_sft_tokens.idx',
        '_sft_loss_mask.bin',
        '_sft_loss_mask.idx',
        '_sft.json',
      ].map((s) => `${p}${s}`),
      inputs: inputsOf(o),
    },
    'samples',
    (signal, onProgress) =>
      preprocessSft({
        input: o.input,
        tokenizerDir: o.tokenizer,
        outputPrefix: o.outputPrefix,
        seqLength: o.seqLength,
        truncation: o.truncation,
        workers,
        strict: o.strict,
        overwrite: o.overwrite,
        signal,
        onProgress,
      }),
  );
  const out = io.out;
  out.log(`wrote ${r.tokensPrefix}.bin / .idx, ${r.lossMaskPrefix}.bin / .idx and ${r.sidecar}`);
  out.log(
    `samples: ${r.samples}, tokens: ${r.tokens}, loss tokens: ${r.lossTokens}, dropped: ${r.dropped}, ` +
      `truncated: ${r.truncated}, bytes: ${r.bytes}, seconds: ${r.seconds.toFixed(2)}, ` +
      `samples/s: ${perSecond(r.samples, r.seconds)}, MB/s: ${mbps(r)}`,
  );
  reportBadLines(io, r);
  return r;
}

const PRETRAIN = 'preprocess pretrain';
const SFT = 'preprocess sft';

const common = {
  input: { type: 'string', value: 'FILE', description: 'input file', required: true },
  tokenizer: {
    type: 'string',
    value: 'DIR',
    description: 'Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json)',
    required: true,
    aliases: ['tokenizer-model', 'load'],
  },
  'tokenizer-type': {
    type: 'string',
    value: 'TYPE',
    description: "accepted for Megatron's command lines; must be HuggingFaceTokenizer",
  },
  'output-prefix': { type: 'string', value: 'PREFIX', description: 'output path prefix', required: true },
  workers: { type: 'string', value: 'N', description: 'tokenizer threads (at most the cores)', default: '1' },
  strict: {
    type: 'boolean',
    description: 'fail at the first bad record or invalid UTF-8 instead of skipping it',
  },
  overwrite: overwriteOption,
} as const satisfies Record<string, OptionSpec>;

export const pretrain: Command = {
  name: PRETRAIN,
  summary: "tokenise a corpus into <prefix>_<json-key>_document.{bin,idx} (Megatron's preprocess_data.py)",
  options: {
    ...common,
    'json-key': {
      type: 'string',
      value: 'KEY',
      description: 'field holding the text',
      default: 'text',
      aliases: ['json-keys'],
    },
    'append-eod': { type: 'boolean', description: 'append the EOD token to every document' },
  },
  examples: [
    'preprocess pretrain --input c4.jsonl --tokenizer Qwen3-0.6B --output-prefix data/c4 --append-eod --workers 2',
  ],
  run: async ({ options, io }) => {
    await runPretrain(options, io);
  },
};

export const sft: Command = {
  name: SFT,
  summary: 'tokenise SFT conversations into <prefix>_sft_tokens / _sft_loss_mask indexed datasets',
  options: {
    ...common,
    'seq-length': {
      type: 'string',
      value: 'N',
      description: 'most training positions per sample',
      required: true,
    },
    truncation: {
      type: 'string',
      value: 'drop|truncate',
      description: 'what happens to longer samples',
      default: 'drop',
    },
  },
  examples: [
    'preprocess sft --input alpaca.json --tokenizer Qwen3-0.6B --output-prefix data/alpaca --seq-length 2048',
  ],
  run: async ({ options, io }) => {
    await runSft(options, io);
  },
};

const group: CommandGroup = {
  name: 'preprocess',
  summary: 'tokenise corpora into Megatron indexed datasets',
  commands: {
    pretrain: { summary: pretrain.summary, load: async () => pretrain },
    sft: { summary: sft.summary, load: async () => sft },
  },
};
export default group;
