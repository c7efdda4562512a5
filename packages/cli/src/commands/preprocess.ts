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
import { defineCommand } from 'citty';
import cliProgress from 'cli-progress';
import { z } from 'zod';
import { defaultOutput, type Output, parseOrThrow } from '../output.js';

export type { Output } from '../output.js';

const Workers = z.coerce
  .number({ message: 'must be a number' })
  .int('must be an integer')
  .min(1, 'must be >= 1')
  .default(1);

const PretrainOptions = z.object({
  input: z.string().min(1, 'is required (a .jsonl, .json, .parquet or .txt file)'),
  jsonKey: z.string().min(1, 'must not be empty').default('text'),
  tokenizer: z.string().min(1, 'is required (a Hugging Face tokenizer folder)'),
  outputPrefix: z.string().min(1, 'is required'),
  appendEod: z.boolean().default(false),
  workers: Workers,
  strict: z.boolean().default(false),
});
export type PretrainOptions = z.input<typeof PretrainOptions>;

const SftOptions = z.object({
  input: z.string().min(1, 'is required (an Alpaca/ShareGPT/OpenAI .json, .jsonl or .parquet file)'),
  tokenizer: z.string().min(1, 'is required (a Hugging Face tokenizer folder)'),
  outputPrefix: z.string().min(1, 'is required'),
  seqLength: z.coerce
    .number({ message: 'must be a number' })
    .int('must be an integer')
    .min(1, 'must be >= 1'),
  truncation: z.enum(['drop', 'truncate'], { message: "must be 'drop' or 'truncate'" }).default('drop'),
  /** Rendering + tokenizer threads; the output is the same whatever the count. */
  workers: Workers,
  strict: z.boolean().default(false),
});
export type SftOptions = z.input<typeof SftOptions>;

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

function reportBadLines(out: Output, badLines: readonly BadLine[]): void {
  if (badLines.length === 0) return;
  out.log(`bad lines: ${badLines.length} (skipped)`);
  for (const b of badLines.slice(0, 20)) out.log(`  line ${b.line}: ${b.reason}`);
  if (badLines.length > 20) out.log(`  ... and ${badLines.length - 20} more`);
}

/** Runs `megapatch preprocess pretrain` with parsed options, printing progress and totals. */
export async function runPretrain(
  options: PretrainOptions,
  out: Output = defaultOutput(),
): Promise<PreprocessPretrainResult> {
  const o = parseOrThrow(PretrainOptions, options, 'megapatch preprocess pretrain');
  const progress = progressReporter(out, 'documents');
  let r: PreprocessPretrainResult;
  try {
    r = await preprocessPretrain({
      input: o.input,
      jsonKey: o.jsonKey,
      tokenizerDir: o.tokenizer,
      outputPrefix: o.outputPrefix,
      appendEod: o.appendEod,
      workers: o.workers,
      strict: o.strict,
      onProgress: progress.update,
    });
  } finally {
    progress.stop();
  }
  out.log(`wrote ${r.datasetPrefix}.bin / .idx (${r.dtype})`);
  out.log(
    `documents: ${r.documents}, tokens: ${r.tokens}, bytes: ${r.bytes}, seconds: ${r.seconds.toFixed(2)}, ` +
      `documents/s: ${perSecond(r.documents, r.seconds)}, MB/s: ${mbps(r)}`,
  );
  reportBadLines(out, r.badLines);
  return r;
}

/** Runs `megapatch preprocess sft` with parsed options, printing progress and totals. */
export async function runSft(
  options: SftOptions,
  out: Output = defaultOutput(),
): Promise<PreprocessSftResult> {
  const o = parseOrThrow(SftOptions, options, 'megapatch preprocess sft');
  const progress = progressReporter(out, 'samples');
  let r: PreprocessSftResult;
  try {
    r = await preprocessSft({
      input: o.input,
      tokenizerDir: o.tokenizer,
      outputPrefix: o.outputPrefix,
      seqLength: o.seqLength,
      truncation: o.truncation,
      workers: o.workers,
      strict: o.strict,
      onProgress: progress.update,
    });
  } finally {
    progress.stop();
  }
  out.log(`wrote ${r.tokensPrefix}.bin / .idx, ${r.lossMaskPrefix}.bin / .idx and ${r.sidecar}`);
  out.log(
    `samples: ${r.samples}, tokens: ${r.tokens}, loss tokens: ${r.lossTokens}, dropped: ${r.dropped}, ` +
      `truncated: ${r.truncated}, bytes: ${r.bytes}, seconds: ${r.seconds.toFixed(2)}, ` +
      `samples/s: ${perSecond(r.samples, r.seconds)}, MB/s: ${mbps(r)}`,
  );
  reportBadLines(out, r.badLines);
  return r;
}

const common = {
  input: { type: 'string', description: 'input file', required: true },
  tokenizer: { type: 'string', description: 'Hugging Face tokenizer folder', required: true },
  'output-prefix': { type: 'string', description: 'output path prefix', required: true },
  strict: { type: 'boolean', description: 'fail at the first bad line', default: false },
} as const;

const pretrain = defineCommand({
  meta: {
    name: 'pretrain',
    description:
      "Tokenise a corpus into <prefix>_<json-key>_document.{bin,idx} (Megatron's preprocess_data.py)",
  },
  args: {
    ...common,
    'json-key': { type: 'string', description: 'field holding the text', default: 'text' },
    'append-eod': { type: 'boolean', description: 'append the EOD token to every document', default: false },
    workers: { type: 'string', description: 'tokenizer threads', default: '1' },
  },
  async run({ args }) {
    await runPretrain({
      input: args.input,
      jsonKey: args['json-key'],
      tokenizer: args.tokenizer,
      outputPrefix: args['output-prefix'],
      appendEod: args['append-eod'],
      workers: args.workers,
      strict: args.strict,
    });
  },
});

const sft = defineCommand({
  meta: {
    name: 'sft',
    description: 'Tokenise SFT conversations into <prefix>_sft_tokens / _sft_loss_mask indexed datasets',
  },
  args: {
    ...common,
    'seq-length': { type: 'string', description: 'most training positions per sample', required: true },
    truncation: { type: 'string', description: "longer samples: 'drop' or 'truncate'", default: 'drop' },
    workers: { type: 'string', description: 'rendering + tokenizer threads', default: '1' },
  },
  async run({ args }) {
    await runSft({
      input: args.input,
      tokenizer: args.tokenizer,
      outputPrefix: args['output-prefix'],
      seqLength: args['seq-length'],
      truncation: args.truncation as 'drop' | 'truncate',
      workers: args.workers,
      strict: args.strict,
    });
  },
});

export default defineCommand({
  meta: { name: 'preprocess', description: 'Tokenise corpora into Megatron indexed datasets' },
  subCommands: { pretrain, sft },
});
