// `megapatch ckpt inspect <dir>`: layout, dtypes, tensor and parameter counts and size of a
// megapatch checkpoint, from its metadata (and, with --verify, every piece file checked).
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  CHECKPOINT_METADATA_FILE,
  Checkpoint,
  type CheckpointLayout,
  type CheckpointVerification,
  verifyCheckpoint,
} from '@megapatch/convert';
import type { Command, CommandGroup } from '../command.js';
import { UsageError } from '../errors.js';
import { formatBytes } from '../format.js';
import { type Io, memoryIo } from '../io.js';
import { findTemporaries } from '../outputs.js';

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
  /** What --verify checked, or null without it. */
  verified: CheckpointVerification | null;
  /** Temporaries in the checkpoint root: writes in progress, or left by killed runs. */
  temporaries: { name: string; pid: number; running: boolean }[];
  tensors?: { name: string; dtype: string; shape: number[]; pieces: number }[];
}

/** A checkpoint root (latest iteration) or one `iter_NNNNNNN` folder, as a root and an iteration. */
function locate(dir: string): { root: string; iteration?: number } {
  const m = /^iter_(\d{7,})$/.exec(path.basename(path.resolve(dir)));
  if (m && fs.existsSync(path.join(dir, CHECKPOINT_METADATA_FILE))) {
    return { root: path.dirname(path.resolve(dir)), iteration: Number(m[1]) };
  }
  return { root: dir };
}

/** Builds the report of `dir`; `verify` opens every piece file and checks each piece. */
export function inspectCheckpoint(
  dir: string,
  opts: { verify?: boolean; tensors?: boolean } = {},
): CheckpointReport {
  const where = locate(dir);
  const ckpt = Checkpoint.open(
    where.root,
    where.iteration === undefined ? {} : { iteration: where.iteration },
  );
  try {
    const verified = opts.verify ? verifyCheckpoint(ckpt) : null;
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
      verified,
      temporaries: findTemporaries(where.root).map((t) => ({
        name: path.relative(path.resolve(where.root), t.path) || path.basename(t.path),
        pid: t.pid,
        running: t.alive,
      })),
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
    `size               ${formatBytes(r.bytes)} in ${r.files} file(s)`,
  ];
  if (r.sections.length > 0) lines.push(`state              ${r.sections.join(', ')}`);
  if (r.huggingfaceFiles.length > 0) lines.push(`huggingface files  ${r.huggingfaceFiles.join(', ')}`);
  if (r.verified) {
    const v = r.verified;
    const sums =
      v.checksummedPieces === v.pieces
        ? `every checksum matches`
        : v.checksummedPieces === 0
          ? 'no checksums recorded (format version 1)'
          : `${v.checksummedPieces} of ${v.pieces} checksums match`;
    const plan = v.architectureChecked ? `, every tensor ${v.architectureChecked} needs is there` : '';
    lines.push(`verified           ${v.pieces} pieces present with their dtype and shape, ${sums}${plan}`);
  }
  for (const t of r.temporaries) {
    lines.push(
      t.running
        ? `temporary          ${t.name} (a write in progress by process ${t.pid})`
        : `temporary          ${t.name} (left by process ${t.pid}, no longer running; the next run writing here removes it)`,
    );
  }
  for (const t of r.tensors ?? []) {
    lines.push(`  ${t.name}  ${t.dtype} [${t.shape.join(', ')}]  ${t.pieces} piece(s)`);
  }
  return lines.join('\n');
}

/** Runs `megapatch ckpt inspect`. */
export function runInspect(
  dir: string,
  opts: { json?: boolean; verify?: boolean; tensors?: boolean } = {},
  io: Io = memoryIo(),
): CheckpointReport {
  const r = inspectCheckpoint(dir, opts);
  io.out.log(opts.json ? JSON.stringify(r, null, 2) : formatCheckpointReport(r));
  return r;
}

export const inspect: Command = {
  name: 'ckpt inspect',
  summary: 'layout, dtypes, tensor and parameter counts and size of a checkpoint',
  description:
    'Reads metadata.json of a megapatch checkpoint (its root, for the latest iteration, or one ' +
    'iter_NNNNNNN folder). --verify also opens every piece file, checks every piece and its ' +
    'checksum, and checks that every tensor the architecture needs is there.',
  positionals: [{ name: 'dir', description: 'checkpoint root or iter_NNNNNNN folder', required: true }],
  options: {
    json: { type: 'boolean', description: 'print JSON' },
    verify: { type: 'boolean', description: 'check every piece file, checksum and tensor' },
    tensors: { type: 'boolean', description: 'list every tensor' },
  },
  examples: ['ckpt inspect ckpt --verify', 'ckpt inspect ckpt/iter_0000100 --tensors'],
  run: ({ options, positionals, io }) => {
    const dir = positionals[0];
    if (!dir) throw new UsageError('missing <dir>', 'ckpt inspect');
    runInspect(
      dir,
      { json: options.json === true, verify: options.verify === true, tensors: options.tensors === true },
      io,
    );
  },
};

const group: CommandGroup = {
  name: 'ckpt',
  summary: 'inspect megapatch checkpoints',
  commands: { inspect: { summary: inspect.summary, load: async () => inspect } },
};
export default group;
