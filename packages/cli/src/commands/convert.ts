// `megapatch convert hf-to-megapatch | megapatch-to-hf | reshard`: streaming checkpoint conversion
// with a progress bar on a terminal (plain periodic lines otherwise) and a summary at the end.
import {
  type ConversionProgress,
  type ConversionSummary,
  convertHfToMegapatch,
  convertMegapatchToHf,
  type ModelDtype,
  reshardCheckpoint,
} from '@megapatch/convert';
import { defineCommand } from 'citty';
import cliProgress from 'cli-progress';
import { z } from 'zod';
import { defaultOutput, type Output, parseOrThrow } from '../output.js';

const size = z.coerce
  .number({ message: 'must be a number' })
  .int('must be an integer')
  .min(1, 'must be >= 1');
const Dtype = z
  .enum(['bf16', 'fp16', 'fp32'], { message: "must be 'bf16', 'fp16' or 'fp32'" })
  .transform((d): ModelDtype => ({ bf16: 'BF16', fp16: 'F16', fp32: 'F32' })[d] as ModelDtype)
  .optional();
const Layout = {
  tp: size.default(1),
  pp: size.default(1),
  ep: size.default(1),
  /** Megatron's default expert-TP size is the TP size. */
  etp: size.optional(),
};

const HfToMegapatch = z.object({
  hfDir: z.string().min(1, 'is required (a Hugging Face model folder)'),
  out: z.string().min(1, 'is required (the megapatch checkpoint root)'),
  ...Layout,
  dtype: Dtype,
  makeVocabSizeDivisibleBy: size.default(128),
  iteration: z.coerce.number().int().min(0, 'must be >= 0').default(0),
  overwrite: z.boolean().default(false),
});
export type HfToMegapatchArgs = z.input<typeof HfToMegapatch>;

const MegapatchToHf = z.object({
  in: z.string().min(1, 'is required (a megapatch checkpoint root)'),
  out: z.string().min(1, 'is required (the Hugging Face folder to write)'),
  maxShardSize: z.string().min(1).default('5GB'),
  dtype: Dtype,
  iteration: z.coerce.number().int().min(0, 'must be >= 0').optional(),
  overwrite: z.boolean().default(false),
});
export type MegapatchToHfArgs = z.input<typeof MegapatchToHf>;

const Reshard = z.object({
  in: z.string().min(1, 'is required (a megapatch checkpoint root)'),
  out: z.string().min(1, 'is required (the checkpoint root to write)'),
  ...Layout,
  dtype: Dtype,
  iteration: z.coerce.number().int().min(0, 'must be >= 0').optional(),
  overwrite: z.boolean().default(false),
});
export type ReshardArgs = z.input<typeof Reshard>;

const gb = (n: number) => `${(n / 1e9).toFixed(2)} GB`;

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
          bar.start(p.totalBytes, 0, { done: gb(0), all: gb(p.totalBytes), rate: '0', tensor: '' });
          started = true;
        }
        bar.update(p.doneBytes, { done: gb(p.doneBytes), rate: rate(p.doneBytes), tensor: p.tensor });
      },
      stop: () => {
        if (started) bar.stop();
      },
    };
  }
  let last = 0;
  return {
    update: (p) => {
      const s = (performance.now() - t0) / 1000;
      if (s - last < 2) return;
      last = s;
      const pct = ((100 * p.doneBytes) / Math.max(1, p.totalBytes)).toFixed(1);
      out.log(`progress: ${pct}% (${gb(p.doneBytes)} of ${gb(p.totalBytes)}), ${rate(p.doneBytes)} MB/s`);
    },
    stop: () => {},
  };
}

function summarize(out: Output, what: string, s: ConversionSummary): void {
  const speed = s.seconds > 0 ? (s.bytes / 1e9 / s.seconds).toFixed(2) : '-';
  out.log(`${what}: ${s.output}`);
  out.log(
    `  ${s.tensors} tensors, ${s.parameters.toLocaleString('en-US')} parameters, ${gb(s.bytes)} in ${s.files} file(s)`,
  );
  out.log(`  ${s.seconds.toFixed(1)} s, ${speed} GB/s`);
  if (s.carried.length > 0) out.log(`  carried over: ${s.carried.join(', ')}`);
}

async function withProgress(
  out: Output,
  run: (cb: (p: ConversionProgress) => void) => Promise<ConversionSummary>,
) {
  const progress = byteProgress(out);
  try {
    return await run(progress.update);
  } finally {
    progress.stop();
  }
}

/** `megapatch convert hf-to-megapatch` with parsed options. */
export async function runHfToMegapatch(
  args: HfToMegapatchArgs,
  out: Output = defaultOutput(),
): Promise<ConversionSummary> {
  const o = parseOrThrow(HfToMegapatch, args, 'megapatch convert hf-to-megapatch');
  const s = await withProgress(out, (onProgress) =>
    convertHfToMegapatch({
      hfDir: o.hfDir,
      output: o.out,
      layout: { tp: o.tp, pp: o.pp, ep: o.ep, ...(o.etp ? { etp: o.etp } : {}) },
      ...(o.dtype ? { dtype: o.dtype } : {}),
      makeVocabSizeDivisibleBy: o.makeVocabSizeDivisibleBy,
      iteration: o.iteration,
      overwrite: o.overwrite,
      onProgress,
    }),
  );
  summarize(out, `megapatch checkpoint (tp=${o.tp} pp=${o.pp} ep=${o.ep} etp=${o.etp ?? o.tp})`, s);
  return s;
}

/** `megapatch convert megapatch-to-hf` with parsed options. */
export async function runMegapatchToHf(
  args: MegapatchToHfArgs,
  out: Output = defaultOutput(),
): Promise<ConversionSummary> {
  const o = parseOrThrow(MegapatchToHf, args, 'megapatch convert megapatch-to-hf');
  const s = await withProgress(out, (onProgress) =>
    convertMegapatchToHf({
      input: o.in,
      output: o.out,
      maxShardSize: o.maxShardSize,
      ...(o.dtype ? { dtype: o.dtype } : {}),
      ...(o.iteration !== undefined ? { iteration: o.iteration } : {}),
      overwrite: o.overwrite,
      onProgress,
    }),
  );
  summarize(out, 'Hugging Face folder', s);
  return s;
}

/** `megapatch convert reshard` with parsed options. */
export async function runReshard(
  args: ReshardArgs,
  out: Output = defaultOutput(),
): Promise<ConversionSummary> {
  const o = parseOrThrow(Reshard, args, 'megapatch convert reshard');
  const s = await withProgress(out, (onProgress) =>
    reshardCheckpoint({
      input: o.in,
      output: o.out,
      layout: { tp: o.tp, pp: o.pp, ep: o.ep, ...(o.etp ? { etp: o.etp } : {}) },
      ...(o.dtype ? { dtype: o.dtype } : {}),
      ...(o.iteration !== undefined ? { iteration: o.iteration } : {}),
      overwrite: o.overwrite,
      onProgress,
    }),
  );
  summarize(out, `megapatch checkpoint (tp=${o.tp} pp=${o.pp} ep=${o.ep} etp=${o.etp ?? o.tp})`, s);
  return s;
}

const layoutArgs = {
  tp: { type: 'string', description: 'tensor-parallel size', default: '1' },
  pp: { type: 'string', description: 'pipeline-parallel size', default: '1' },
  ep: { type: 'string', description: 'expert-parallel size', default: '1' },
  etp: { type: 'string', description: 'expert tensor-parallel size (default: --tp)' },
} as const;
const dtypeArg = { type: 'string', description: 'cast floating-point weights: bf16, fp16 or fp32' } as const;
const overwriteArg = { type: 'boolean', description: 'replace an existing output', default: false } as const;

const hfToMegapatch = defineCommand({
  meta: {
    name: 'hf-to-megapatch',
    description: 'Hugging Face folder -> megapatch checkpoint (any TP/PP/EP layout)',
  },
  args: {
    'hf-dir': { type: 'string', description: 'Hugging Face model folder', required: true },
    out: { type: 'string', description: 'megapatch checkpoint root to write', required: true },
    ...layoutArgs,
    dtype: dtypeArg,
    'make-vocab-size-divisible-by': {
      type: 'string',
      description: 'vocabulary padding multiple',
      default: '128',
    },
    iteration: { type: 'string', description: 'iteration recorded in the checkpoint', default: '0' },
    overwrite: overwriteArg,
  },
  async run({ args }) {
    await runHfToMegapatch({
      hfDir: args['hf-dir'],
      out: args.out,
      tp: args.tp,
      pp: args.pp,
      ep: args.ep,
      etp: args.etp,
      dtype: args.dtype as HfToMegapatchArgs['dtype'],
      makeVocabSizeDivisibleBy: args['make-vocab-size-divisible-by'],
      iteration: args.iteration,
      overwrite: args.overwrite,
    } as HfToMegapatchArgs);
  },
});

const megapatchToHf = defineCommand({
  meta: { name: 'megapatch-to-hf', description: 'megapatch checkpoint (any layout) -> Hugging Face folder' },
  args: {
    in: { type: 'string', description: 'megapatch checkpoint root', required: true },
    out: { type: 'string', description: 'Hugging Face folder to write', required: true },
    'max-shard-size': { type: 'string', description: "largest shard, e.g. '5GB' or '500MB'", default: '5GB' },
    dtype: dtypeArg,
    iteration: { type: 'string', description: 'iteration to export (default: latest)' },
    overwrite: overwriteArg,
  },
  async run({ args }) {
    await runMegapatchToHf({
      in: args.in,
      out: args.out,
      maxShardSize: args['max-shard-size'],
      dtype: args.dtype as MegapatchToHfArgs['dtype'],
      iteration: args.iteration,
      overwrite: args.overwrite,
    } as MegapatchToHfArgs);
  },
});

const reshard = defineCommand({
  meta: { name: 'reshard', description: 'megapatch checkpoint -> megapatch checkpoint in another layout' },
  args: {
    in: { type: 'string', description: 'megapatch checkpoint root', required: true },
    out: { type: 'string', description: 'checkpoint root to write', required: true },
    ...layoutArgs,
    dtype: dtypeArg,
    iteration: { type: 'string', description: 'iteration to reshard (default: latest)' },
    overwrite: overwriteArg,
  },
  async run({ args }) {
    await runReshard({
      in: args.in,
      out: args.out,
      tp: args.tp,
      pp: args.pp,
      ep: args.ep,
      etp: args.etp,
      dtype: args.dtype as ReshardArgs['dtype'],
      iteration: args.iteration,
      overwrite: args.overwrite,
    } as ReshardArgs);
  },
});

export default defineCommand({
  meta: { name: 'convert', description: 'Convert checkpoints between Hugging Face and megapatch layouts' },
  subCommands: { 'hf-to-megapatch': hfToMegapatch, 'megapatch-to-hf': megapatchToHf, reshard },
});
