// `megapatch ckpt inspect <dir>`: layout, dtypes, tensor and parameter counts and size of a
// megapatch checkpoint, from its metadata (and, with --verify, every piece file checked).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CHECKPOINT_METADATA_FILE, Checkpoint, type CheckpointLayout } from '@megapatch/convert';
import { defineCommand } from 'citty';
import { defaultOutput, type Output } from '../output.js';

/** What `megapatch ckpt inspect` reports, as data. */
export interface CheckpointReport {
  dir: string;
  iteration: number;
  architecture: string | null;
  layout: CheckpointLayout;
  tensorCount: number;
  parameterCount: number;
  bytes: number;
  files: number;
  dtypes: Record<string, number>;
  consumedSamples: number;
  huggingfaceFiles: string[];
  sections: string[];
  verified: boolean;
  tensors?: { name: string; dtype: string; shape: number[]; pieces: number }[];
}

/** Opens a checkpoint root (latest iteration) or one `iter_NNNNNNN` folder. */
function open(dir: string): Checkpoint {
  const m = /^iter_(\d{7,})$/.exec(path.basename(path.resolve(dir)));
  if (m && fs.existsSync(path.join(dir, CHECKPOINT_METADATA_FILE))) {
    return Checkpoint.open(path.dirname(path.resolve(dir)), { iteration: Number(m[1]) });
  }
  return Checkpoint.open(dir);
}

/** Builds the report of `dir`; `verify` opens every piece file and checks each piece. */
export function inspectCheckpoint(
  dir: string,
  opts: { verify?: boolean; tensors?: boolean } = {},
): CheckpointReport {
  const ckpt = open(dir);
  try {
    if (opts.verify) ckpt.verify();
    const s = ckpt.inspect();
    const meta = ckpt.metadata;
    const files = new Set(Object.values(meta.tensors).flatMap((t) => t.pieces.map((p) => p.file)));
    const sections = (['optimizer', 'scheduler', 'rng', 'dataLoader'] as const).filter(
      (k) => meta[k] !== undefined,
    );
    return {
      dir: ckpt.dir,
      iteration: s.iteration,
      architecture: meta.architecture ?? null,
      layout: s.layout,
      tensorCount: s.tensorCount,
      parameterCount: s.parameterCount,
      bytes: s.bytes,
      files: files.size,
      dtypes: { ...s.dtypes } as Record<string, number>,
      consumedSamples: s.consumedSamples,
      huggingfaceFiles: meta.huggingface?.files ?? [],
      sections,
      verified: opts.verify === true,
      ...(opts.tensors
        ? {
            tensors: ckpt.tensorNames().map((name) => {
              const t = meta.tensors[name];
              return { name, dtype: t.dtype, shape: t.globalShape, pieces: t.pieces.length };
            }),
          }
        : {}),
    };
  } finally {
    ckpt.close();
  }
}

/** The report as text. */
export function formatCheckpointReport(r: CheckpointReport): string {
  const l = r.layout;
  const lines = [
    `checkpoint         ${r.dir}`,
    `iteration          ${r.iteration} (consumed samples ${r.consumedSamples})`,
    `architecture       ${r.architecture ?? '(not recorded)'}`,
    `layout             tp=${l.tp} pp=${l.pp} ep=${l.ep} etp=${l.etp} dp=${l.dp}`,
    `tensors            ${r.tensorCount} (${Object.entries(r.dtypes)
      .map(([d, n]) => `${d} ${n}`)
      .join(', ')})`,
    `parameters         ${r.parameterCount.toLocaleString('en-US')} (${(r.parameterCount / 1e9).toFixed(3)}B)`,
    `size               ${(r.bytes / 1e9).toFixed(3)} GB in ${r.files} file(s)`,
  ];
  if (r.sections.length > 0) lines.push(`state              ${r.sections.join(', ')}`);
  if (r.huggingfaceFiles.length > 0) lines.push(`huggingface files  ${r.huggingfaceFiles.join(', ')}`);
  if (r.verified) lines.push('verified           every piece present with its dtype and shape');
  for (const t of r.tensors ?? []) {
    lines.push(`  ${t.name}  ${t.dtype} [${t.shape.join(', ')}]  ${t.pieces} piece(s)`);
  }
  return lines.join('\n');
}

/** Runs `megapatch ckpt inspect`. */
export function runInspect(
  dir: string,
  opts: { json?: boolean; verify?: boolean; tensors?: boolean } = {},
  out: Output = defaultOutput(),
): CheckpointReport {
  const r = inspectCheckpoint(dir, opts);
  out.log(opts.json ? JSON.stringify(r, null, 2) : formatCheckpointReport(r));
  return r;
}

const inspect = defineCommand({
  meta: {
    name: 'inspect',
    description: 'Layout, dtypes, tensor and parameter counts and size of a checkpoint',
  },
  args: {
    dir: { type: 'positional', description: 'checkpoint root or iter_NNNNNNN folder', required: true },
    json: { type: 'boolean', description: 'print JSON', default: false },
    verify: { type: 'boolean', description: 'open every piece file and check each piece', default: false },
    tensors: { type: 'boolean', description: 'list every tensor', default: false },
  },
  run({ args }) {
    runInspect(args.dir, { json: args.json, verify: args.verify, tensors: args.tensors });
  },
});

export default defineCommand({
  meta: { name: 'ckpt', description: 'Inspect megapatch checkpoints' },
  subCommands: { inspect },
});
