// `megapatch ckpt inspect <dir>`: layout, dtypes, tensor and parameter counts and size of a
// megapatch checkpoint, from its metadata (and, with --verify, every piece file checked); or what
// a Megatron-LM checkpoint holds (with --hf-dir, checked against the model).
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  CHECKPOINT_METADATA_FILE,
  Checkpoint,
  type CheckpointLayout,
  type CheckpointVerification,
  inspectMegatronCheckpoint,
  type MegatronCheckpointInfo,
  megatronCheckpointDir,
  openMegatronCheckpoint,
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

/** What `megapatch ckpt inspect` reports for a Megatron-LM checkpoint. */
export interface MegatronCheckpointReport extends MegatronCheckpointInfo {
  kind: 'megatron';
  /** Model tensors stored, their parts (chunks or rank-file entries), and how many of each dtype. */
  tensorCount: number;
  parts: number;
  dtypes: Record<string, number>;
  /** With --hf-dir: the architecture read, and the parameters of its HF tensors (the checkpoint holds every one). */
  checked: { architecture: string; parameters: number } | null;
}

/**
 * The report of a Megatron-LM checkpoint (its tensors listed with `tensors`); with `hfDir`, every
 * tensor of that model is checked to be there.
 */
export function inspectMegatron(
  dir: string,
  opts: { hfDir?: string; tensors?: boolean } = {},
): MegatronCheckpointReport {
  const info = inspectMegatronCheckpoint(dir);
  let checked: MegatronCheckpointReport['checked'] = null;
  if (opts.hfDir !== undefined) {
    const view = openMegatronCheckpoint(info.dir, opts.hfDir);
    try {
      const parameters = view.plan.hfTensors.reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1), 0);
      checked = { architecture: view.plan.spec.architectures[0], parameters };
    } finally {
      view.close();
    }
  }
  const dtypes: Record<string, number> = {};
  for (const t of info.tensors) dtypes[t.dtype] = (dtypes[t.dtype] ?? 0) + 1;
  return {
    kind: 'megatron',
    ...info,
    tensors: opts.tensors ? info.tensors : [],
    tensorCount: info.tensors.length,
    parts: info.tensors.reduce((x, t) => x + t.parts, 0),
    dtypes,
    checked,
  };
}

/** A Megatron report as text. */
export function formatMegatronReport(r: MegatronCheckpointReport): string {
  const a = r.args;
  const model = [
    a.num_layers !== undefined ? `${a.num_layers} layers` : null,
    a.hidden_size !== undefined ? `hidden ${a.hidden_size}` : null,
    a.ffn_hidden_size !== undefined ? `ffn ${a.ffn_hidden_size}` : null,
    a.num_attention_heads !== undefined ? `${a.num_attention_heads} heads` : null,
    a.num_query_groups !== undefined && a.num_query_groups !== null
      ? `${a.num_query_groups} query groups`
      : null,
    a.num_experts !== undefined && a.num_experts !== null ? `${a.num_experts} experts` : null,
    a.padded_vocab_size !== undefined ? `padded vocab ${a.padded_vocab_size}` : null,
    a.params_dtype !== undefined ? `${String(a.params_dtype).replace(/^torch\./, '')}` : null,
  ].filter((x) => x !== null);
  const l = r.layout;
  const lines = [
    `checkpoint         ${r.dir}`,
    `format             Megatron-LM ${r.format === 'torch_dist' ? 'torch_dist (.metadata, *.distcp, common.pt)' : 'torch (mp_rank_*/model_optim_rng.pt)'}`,
    `iteration          ${r.iteration}${a.consumed_train_samples !== undefined ? ` (consumed samples ${a.consumed_train_samples})` : ''}`,
    `model (args)       ${model.length > 0 ? model.join(', ') : '(no args saved)'}`,
    `layout (args)      tp=${l.tp} pp=${l.pp} ep=${l.ep} etp=${l.etp} vpp=${l.vpp}`,
    `tensors            ${r.tensorCount} (${Object.entries(r.dtypes)
      .map(([d, n]) => `${d} ${n}`)
      .join(', ')}) in ${r.parts} ${r.format === 'torch_dist' ? 'chunks' : 'rank-file entries'}`,
    `size               ${formatBytes(r.bytes)} in ${r.files} file(s)`,
  ];
  if (r.optimizer) lines.push('state              optimizer');
  if (r.checked) {
    lines.push(
      `verified           every tensor of ${r.checked.architecture} is there at its shape (${r.checked.parameters.toLocaleString('en-US')} parameters)`,
    );
  }
  for (const t of r.tensors)
    lines.push(`  ${t.name}  ${t.dtype} [${t.shape.join(', ')}]  ${t.parts} part(s)`);
  return lines.join('\n');
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
  opts: { json?: boolean; verify?: boolean; tensors?: boolean; hfDir?: string } = {},
  io: Io = memoryIo(),
): CheckpointReport | MegatronCheckpointReport {
  if (megatronCheckpointDir(dir) !== null) {
    const r = inspectMegatron(dir, opts);
    io.out.log(opts.json ? JSON.stringify(r, null, 2) : formatMegatronReport(r));
    return r;
  }
  if (opts.hfDir !== undefined) {
    throw new UsageError(`--hf-dir is for a Megatron-LM checkpoint; ${dir} is not one`, 'ckpt inspect');
  }
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
    'checksum, and checks that every tensor the architecture needs is there. A Megatron-LM ' +
    'checkpoint (torch or torch_dist format) is described from its files and saved args; with ' +
    "--hf-dir, every tensor of the model that folder's config.json describes is checked to be there.",
  positionals: [{ name: 'dir', description: 'checkpoint root or iter_NNNNNNN folder', required: true }],
  options: {
    json: { type: 'boolean', description: 'print JSON' },
    verify: { type: 'boolean', description: 'check every piece file, checksum and tensor' },
    tensors: { type: 'boolean', description: 'list every tensor' },
    'hf-dir': {
      type: 'string',
      value: 'DIR',
      description: "a Megatron-LM checkpoint's Hugging Face folder: check the checkpoint holds that model",
      aliases: ['hf-ckpt-path'],
    },
  },
  examples: [
    'ckpt inspect ckpt --verify',
    'ckpt inspect ckpt/iter_0000100 --tensors',
    'ckpt inspect megatron-ckpt --hf-dir Qwen3-0.6B',
  ],
  run: ({ options, positionals, io }) => {
    const dir = positionals[0];
    if (!dir) throw new UsageError('missing <dir>', 'ckpt inspect');
    runInspect(
      dir,
      {
        json: options.json === true,
        verify: options.verify === true,
        tensors: options.tensors === true,
        ...(typeof options['hf-dir'] === 'string' ? { hfDir: options['hf-dir'] } : {}),
      },
      io,
    );
  },
};

const group: CommandGroup = {
  name: 'ckpt',
  summary: 'inspect megapatch and Megatron-LM checkpoints',
  commands: { inspect: { summary: inspect.summary, load: async () => inspect } },
};
export default group;
