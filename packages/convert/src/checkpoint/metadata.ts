// metadata.json of a megapatch checkpoint (DESIGN §4): what was saved, with which layout, and where
// every piece of every logical tensor lives, so that any layout can read it back.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { z } from 'zod';
import { ConvertError } from '../errors.js';
import { isSafetensorsDtype, type SafetensorsDtype } from '../safetensors/dtype.js';

/** Version written into `formatVersion` (2: every piece carries the SHA-256 of its bytes). */
export const CHECKPOINT_FORMAT_VERSION = 2;
/** Versions readers accept: 1 (no checksums) and 2 (a checksum on every piece). */
export const CHECKPOINT_FORMAT_VERSIONS: readonly number[] = [1, 2];
/** Name of the metadata file inside an iteration directory. */
export const CHECKPOINT_METADATA_FILE = 'metadata.json';
/** Megatron's tracker file in the root directory, holding the latest complete iteration. */
export const LATEST_ITERATION_FILE = 'latest_checkpointed_iteration.txt';

/**
 * Folder inside an iteration directory holding the Hugging Face side files carried over by a
 * conversion (config.json, generation_config.json, tokenizer files, remote-code .py files).
 */
export const HF_FILES_DIR = 'huggingface';

/** Megatron's iteration folder name: `iter_` and the iteration zero-padded to 7 digits. */
export function iterationDirName(iteration: number): string {
  return `iter_${String(iteration).padStart(7, '0')}`;
}

const nonNegInt = z.number().int().nonnegative();
const posInt = z.number().int().positive();
const dtype = z.custom<SafetensorsDtype>((s) => isSafetensorsDtype(s), { message: 'unknown dtype' });
// Piece files are plain names inside the iteration directory: never a path that could leave it.
const fileName = z
  .string()
  .min(1)
  .refine((s) => s === path.basename(s) && s !== '.' && s !== '..' && !s.includes('\\'), {
    message: 'must be a plain file name',
  });

/**
 * The parallel layout a checkpoint was saved with (informational: readers may use any other).
 * The pipeline settings, absent for an even split, give with the model's layer counts the stage
 * of every layer: `pipelineStages({ ...layout, numLayers, mtpNumLayers })`.
 */
export const CheckpointLayout = z.object({
  /** Tensor-parallel size. */
  tp: posInt,
  /** Pipeline-parallel size. */
  pp: posInt,
  /** Expert-parallel size. */
  ep: posInt,
  /** Expert tensor-parallel size. */
  etp: posInt,
  /** Data-parallel size. */
  dp: posInt,
  /** Virtual pipeline stages per pipeline rank; absent: 1 (no interleaving). */
  vpp: posInt.optional(),
  /** Decoder layers on the first pipeline rank (Megatron's `--decoder-first-pipeline-num-layers`). */
  decoderFirstPipelineNumLayers: posInt.optional(),
  /** Decoder layers on the last pipeline rank (Megatron's `--decoder-last-pipeline-num-layers`). */
  decoderLastPipelineNumLayers: posInt.optional(),
  /** Megatron's `--pipeline-model-parallel-layout` string, e.g. `"E|t*5|t*6|t,m,L"`. */
  pipelineModelParallelLayout: z.string().min(1).optional(),
});
/** The parallel layout a checkpoint was saved with. */
export type CheckpointLayout = z.infer<typeof CheckpointLayout>;

/** One stored piece of a logical tensor: a box of the global tensor kept in one safetensors file. */
export const CheckpointPiece = z.object({
  /** Safetensors file (a name inside the iteration directory). */
  file: fileName,
  /** Tensor key inside that file. */
  key: z.string().min(1),
  /** Start index of the piece in the global tensor, one per dim. */
  offsets: z.array(nonNegInt),
  /** Shape of the piece, one extent per dim (same rank as the global shape). */
  shape: z.array(nonNegInt),
  /** SHA-256 of the piece's bytes (lowercase hex); required from format version 2 on. */
  sha256: z
    .string()
    .regex(/^[0-9a-f]{64}$/, { message: 'must be 64 lowercase hex digits (a SHA-256)' })
    .optional(),
});
/** One stored piece of a logical tensor. */
export type CheckpointPiece = z.infer<typeof CheckpointPiece>;

/** A logical tensor: its global dtype and shape, and the pieces that tile it exactly. */
export const CheckpointTensor = z.object({
  /** Element type, shared by every piece. */
  dtype,
  /** Shape of the whole (unsharded) tensor. */
  globalShape: z.array(nonNegInt),
  /** Pieces; together they cover the global tensor with no gap and no overlap. */
  pieces: z.array(CheckpointPiece),
});
/** A logical tensor of a checkpoint. */
export type CheckpointTensor = z.infer<typeof CheckpointTensor>;

/** The schema of `<root>/iter_<NNNNNNN>/metadata.json`. */
export const CheckpointMetadata = z.object({
  /** Format version: one of {@link CHECKPOINT_FORMAT_VERSIONS}; writers write {@link CHECKPOINT_FORMAT_VERSION}. */
  formatVersion: z.union([z.literal(1), z.literal(2)]),
  /** Training iteration the checkpoint was taken after. */
  iteration: nonNegInt,
  /** Samples consumed by training so far (for resuming the data loader). */
  consumedSamples: nonNegInt,
  /** The model's TransformerConfig as JSON; checked by the model builder, not here. */
  modelConfig: z.record(z.string(), z.unknown()),
  /** HF architecture name (`LlamaForCausalLM`, ...): selects the spec that maps and reshards it. */
  architecture: z.string().min(1).optional(),
  /** Hugging Face files kept in `<iter>/huggingface/` (configs, tokenizer, remote code). */
  huggingface: z
    .object({
      files: z.array(fileName),
      /** HF dtypes of tensors Megatron keeps in another dtype (a BF16 expert bias held in fp32). */
      dtypes: z.record(z.string(), dtype).optional(),
    })
    .optional(),
  /** The tokenizer files among them (also in `<iter>/huggingface/`). */
  tokenizer: z.object({ files: z.array(fileName) }).optional(),
  /** Layout the checkpoint was saved with. */
  layout: CheckpointLayout,
  /** Logical tensors by name (model parameters and any tensor-valued state). */
  tensors: z.record(z.string(), CheckpointTensor),
  /** Optimizer state beyond tensors (step counts, hyper-parameters); free-form JSON. */
  optimizer: z.unknown().optional(),
  /** Learning-rate scheduler state; free-form JSON. */
  scheduler: z.unknown().optional(),
  /** RNG states; free-form JSON. */
  rng: z.unknown().optional(),
  /** Data-loader state; free-form JSON. */
  dataLoader: z.unknown().optional(),
  /** Training position and provenance (iteration, consumed samples, the run config, versions); free-form JSON. */
  training: z.unknown().optional(),
});
/** Parsed metadata.json. */
export type CheckpointMetadata = z.infer<typeof CheckpointMetadata>;

/**
 * Validates parsed JSON as metadata; INVALID_FORMAT naming the first bad field. A version this
 * reader does not know is named as such, and version 2 needs a checksum on every piece.
 */
export function parseCheckpointMetadata(json: unknown, file = CHECKPOINT_METADATA_FILE): CheckpointMetadata {
  const version = (json as { formatVersion?: unknown } | null)?.formatVersion;
  if (json !== null && typeof json === 'object' && !CHECKPOINT_FORMAT_VERSIONS.includes(version as number)) {
    throw new ConvertError(
      'INVALID_FORMAT',
      `field formatVersion: checkpoint format version ${JSON.stringify(version)} is not supported ` +
        `(this megapatch reads versions ${CHECKPOINT_FORMAT_VERSIONS.join(' and ')}); ` +
        'open it with the megapatch release that wrote it, or upgrade megapatch',
      file,
    );
  }
  const r = CheckpointMetadata.safeParse(json);
  if (!r.success) {
    const issue = r.error.issues[0];
    const field = issue.path.length ? issue.path.map(String).join('.') : '(root)';
    throw new ConvertError('INVALID_FORMAT', `field ${field}: ${issue.message}`, file);
  }
  if (r.data.formatVersion >= 2) {
    for (const [name, t] of Object.entries(r.data.tensors)) {
      const i = t.pieces.findIndex((p) => p.sha256 === undefined);
      if (i >= 0) {
        throw new ConvertError(
          'INVALID_FORMAT',
          `field tensors.${name}.pieces.${i}.sha256: missing; format version ${r.data.formatVersion} ` +
            'records a checksum for every piece (the metadata was edited or written by a broken tool)',
          file,
        );
      }
    }
  }
  return r.data;
}

/** A rank folder of Megatron-LM's torch format: `mp_rank_TT[_PPP][_EEE]` (its numbers captured). */
export const MEGATRON_RANK_DIR = /^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$/;

/**
 * Which Megatron-LM checkpoint format an iteration folder holds, if it is one: `torch` (rank
 * folders `mp_rank_*` with model_optim_rng.pt) or `torch_dist` (PyTorch distributed checkpoint:
 * `.metadata` and `*.distcp` files, a metadata.json naming its `sharded_backend`).
 */
export function megatronCheckpointFormat(iterDir: string): 'torch' | 'torch_dist' | null {
  let names: string[];
  try {
    names = fs.readdirSync(iterDir);
  } catch {
    return null;
  }
  if (names.some((n) => MEGATRON_RANK_DIR.test(n))) return 'torch';
  if (names.includes('.metadata') || names.some((n) => n.endsWith('.distcp'))) return 'torch_dist';
  try {
    const j = JSON.parse(fs.readFileSync(path.join(iterDir, CHECKPOINT_METADATA_FILE), 'utf8'));
    if (j && typeof j === 'object' && 'sharded_backend' in j) return 'torch_dist';
  } catch {
    // not JSON, or no file: not Megatron's
  }
  return null;
}

/** The one-line error for a Megatron-LM checkpoint opened as a megapatch one (null: not Megatron's). */
export function megatronCheckpointError(iterDir: string): ConvertError | null {
  const format = megatronCheckpointFormat(iterDir);
  if (format === null) return null;
  const what =
    format === 'torch'
      ? 'in the torch format (mp_rank_*/model_optim_rng.pt)'
      : 'in the torch_dist format (.metadata, *.distcp, common.pt)';
  return new ConvertError(
    'INVALID_FORMAT',
    `${iterDir} is a Megatron-LM checkpoint ${what}, not a megapatch checkpoint: ` +
      `convert it with \`megapatch convert megatron-to-megapatch --load ${path.dirname(iterDir)} --hf-dir <HF folder with its config.json> --out <dir>\``,
  );
}

/** Reads and validates `<iterDir>/metadata.json`. */
export function readCheckpointMetadata(iterDir: string): CheckpointMetadata {
  const foreign = megatronCheckpointError(iterDir);
  if (foreign) throw foreign;
  const p = path.join(iterDir, CHECKPOINT_METADATA_FILE);
  let text: string;
  try {
    text = fs.readFileSync(p, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new ConvertError(
        'MISSING_FILE',
        `no ${CHECKPOINT_METADATA_FILE} in ${iterDir}`,
        CHECKPOINT_METADATA_FILE,
      );
    }
    throw e;
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ConvertError(
      'INVALID_FORMAT',
      `not valid JSON (${(e as Error).message})`,
      CHECKPOINT_METADATA_FILE,
    );
  }
  return parseCheckpointMetadata(json);
}

/** Reads the latest iteration from `<root>/latest_checkpointed_iteration.txt`. */
export function readLatestIteration(rootDir: string): number {
  const p = path.join(rootDir, LATEST_ITERATION_FILE);
  let text: string;
  try {
    text = fs.readFileSync(p, 'utf8').trim();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new ConvertError(
        'MISSING_FILE',
        `no ${LATEST_ITERATION_FILE} in ${rootDir}`,
        LATEST_ITERATION_FILE,
      );
    }
    throw e;
  }
  if (text === 'release' && fs.existsSync(path.join(rootDir, 'release'))) {
    throw (
      megatronCheckpointError(path.join(rootDir, 'release')) ??
      new ConvertError(
        'INVALID_FORMAT',
        'names a "release" checkpoint, which megapatch does not write',
        LATEST_ITERATION_FILE,
      )
    );
  }
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(Number(text))) {
    throw new ConvertError(
      'INVALID_FORMAT',
      `expected an iteration number, got ${JSON.stringify(text)}`,
      LATEST_ITERATION_FILE,
    );
  }
  return Number(text);
}
