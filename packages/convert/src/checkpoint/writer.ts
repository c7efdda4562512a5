// Writing a megapatch checkpoint: pieces from every rank go into per-rank safetensors files in a
// temporary directory, which is renamed into place only once complete and checked; the `latest`
// tracker is written after that, so a crash at any point leaves the previous checkpoint current.
import { createHash, type Hash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ConvertError } from '../errors.js';
import { byteLengthOf, type SafetensorsDtype } from '../safetensors/dtype.js';
import { SafetensorsWriter, type TensorSpec } from '../safetensors/writer.js';
import {
  CHECKPOINT_FORMAT_VERSION,
  CHECKPOINT_METADATA_FILE,
  type CheckpointLayout,
  type CheckpointMetadata,
  type CheckpointPiece,
  type CheckpointTensor,
  HF_FILES_DIR,
  iterationDirName,
  LATEST_ITERATION_FILE,
  parseCheckpointMetadata,
} from './metadata.js';
import { checkTiling } from './region.js';

/** The rank that owns a piece; it picks the piece's safetensors file. */
export interface PieceRank {
  readonly tp: number;
  readonly pp: number;
  readonly ep: number;
}

/** One piece of a logical tensor handed to {@link CheckpointWriter.addPiece}. */
export interface PieceInput {
  readonly dtype: SafetensorsDtype;
  /** Shape of the whole logical tensor. */
  readonly globalShape: readonly number[];
  /** Start index of this piece in the global tensor, per dim. */
  readonly offsets: readonly number[];
  /** Shape of this piece. */
  readonly shape: readonly number[];
  /** Raw little-endian row-major bytes of the piece. */
  readonly data: Uint8Array;
  /** Owning rank (default tp=pp=ep=0). */
  readonly rank?: PieceRank;
}

/** What the writer records besides tensors. */
export interface CheckpointWriterOptions {
  readonly layout: CheckpointLayout;
  readonly modelConfig: Record<string, unknown>;
  readonly consumedSamples?: number;
  /** HF architecture name recorded in the metadata (it selects the spec that reshards the checkpoint). */
  readonly architecture?: string;
  /** Files written with `addFile` into `<iter>/huggingface/` (set by the writer that adds them). */
  readonly huggingface?: {
    readonly files: readonly string[];
    readonly dtypes?: Readonly<Record<string, SafetensorsDtype>>;
  };
  readonly tokenizer?: { readonly files: readonly string[] };
  readonly optimizer?: unknown;
  readonly scheduler?: unknown;
  readonly rng?: unknown;
  readonly dataLoader?: unknown;
  readonly training?: unknown;
}

/** Name of the safetensors file of a rank. */
export function pieceFileName(rank: PieceRank): string {
  return `model_rank_tp${rank.tp}_pp${rank.pp}_ep${rank.ep}.safetensors`;
}

interface PendingPiece {
  readonly rank: PieceRank;
  readonly offsets: number[];
  readonly shape: number[];
  readonly data: Uint8Array;
}

interface PendingTensor {
  readonly dtype: SafetensorsDtype;
  readonly globalShape: readonly number[];
  readonly pieces: PendingPiece[];
}

/** Writes `text` to `file` atomically (temporary name, fsync, rename). */
function writeFileAtomic(file: string, text: string): void {
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, text);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

/** A key for `name` not yet used in `file`: the name, else `name#1`, `name#2`, ... */
function uniqueKey(keys: Map<string, Set<string>>, file: string, name: string): string {
  let used = keys.get(file);
  if (!used) {
    used = new Set();
    keys.set(file, used);
  }
  let key = name;
  for (let k = 1; used.has(key); k++) key = `${name}#${k}`;
  used.add(key);
  return key;
}

/** Rounds the metadata through its schema, so a bad layout or section fails before any rename. */
function buildMetadata(
  iteration: number,
  o: CheckpointWriterOptions,
  tensors: Record<string, CheckpointTensor>,
): CheckpointMetadata {
  return parseCheckpointMetadata({
    formatVersion: CHECKPOINT_FORMAT_VERSION,
    iteration,
    consumedSamples: o.consumedSamples ?? 0,
    modelConfig: o.modelConfig,
    ...(o.architecture ? { architecture: o.architecture } : {}),
    ...(o.huggingface
      ? {
          huggingface: {
            files: [...o.huggingface.files],
            ...(o.huggingface.dtypes ? { dtypes: { ...o.huggingface.dtypes } } : {}),
          },
        }
      : {}),
    ...(o.tokenizer ? { tokenizer: { files: [...o.tokenizer.files] } } : {}),
    layout: o.layout,
    tensors,
    ...(o.optimizer !== undefined ? { optimizer: o.optimizer } : {}),
    ...(o.scheduler !== undefined ? { scheduler: o.scheduler } : {}),
    ...(o.rng !== undefined ? { rng: o.rng } : {}),
    ...(o.dataLoader !== undefined ? { dataLoader: o.dataLoader } : {}),
    ...(o.training !== undefined ? { training: o.training } : {}),
  } satisfies CheckpointMetadata);
}

/**
 * Writes metadata.json into the temporary directory, renames it to `iter_<N>` (moving an older
 * save of the same iteration aside first, deleting it only once the new one is in place) and
 * then writes the `latest` tracker.
 */
function commitIterationDir(
  w: { readonly tmpDir: string; readonly dir: string; readonly rootDir: string; readonly iteration: number },
  metadata: CheckpointMetadata,
): void {
  writeFileAtomic(path.join(w.tmpDir, CHECKPOINT_METADATA_FILE), `${JSON.stringify(metadata, null, 2)}\n`);
  // rename() cannot replace a non-empty directory.
  const old = `${w.dir}.old-${process.pid}`;
  const hadOld = fs.existsSync(w.dir);
  if (hadOld) fs.renameSync(w.dir, old);
  fs.renameSync(w.tmpDir, w.dir);
  if (hadOld) fs.rmSync(old, { recursive: true, force: true });
  writeFileAtomic(path.join(w.rootDir, LATEST_ITERATION_FILE), `${w.iteration}\n`);
}

/** Creates `<root>/iter_<N>.tmp-<pid>/` (removing a stale one) and returns the two paths. */
function openIterationDir(rootDir: string, iteration: number): { dir: string; tmpDir: string } {
  if (!Number.isSafeInteger(iteration) || iteration < 0) {
    throw new ConvertError('INVALID_ARGUMENT', `iteration ${iteration} is not a non-negative integer`);
  }
  const dir = path.join(rootDir, iterationDirName(iteration));
  const tmpDir = `${dir}.tmp-${process.pid}`;
  fs.mkdirSync(rootDir, { recursive: true });
  fs.rmSync(tmpDir, { recursive: true, force: true });
  fs.mkdirSync(tmpDir);
  return { dir, tmpDir };
}

/**
 * Collects the pieces of a checkpoint and writes `<root>/iter_<NNNNNNN>/` atomically on
 * {@link finalize}: nothing appears under the final name until every piece is on disk and the
 * pieces of each tensor are known to tile its global shape.
 */
export class CheckpointWriter {
  /** Root directory (holding `iter_*` and the `latest` tracker). */
  readonly rootDir: string;
  /** Iteration being written. */
  readonly iteration: number;
  /** Final directory `<root>/iter_<NNNNNNN>`. */
  readonly dir: string;
  /** Temporary directory the files are written to. */
  readonly tmpDir: string;
  private readonly options: CheckpointWriterOptions;
  private readonly tensors = new Map<string, PendingTensor>();
  private readonly files: [string, Uint8Array | string][] = [];
  private state: 'open' | 'done' | 'aborted' = 'open';

  /** Creates `<root>/iter_<N>.tmp-<pid>/`. */
  constructor(rootDir: string, iteration: number, options: CheckpointWriterOptions) {
    const { dir, tmpDir } = openIterationDir(rootDir, iteration);
    this.rootDir = rootDir;
    this.iteration = iteration;
    this.options = options;
    this.dir = dir;
    this.tmpDir = tmpDir;
  }

  /** Adds one piece of tensor `name`; all pieces of a name must agree on dtype and global shape. */
  addPiece(name: string, piece: PieceInput): void {
    this.checkOpen();
    const where = `tensor ${JSON.stringify(name)}`;
    if (typeof name !== 'string' || name === '')
      throw new ConvertError('INVALID_ARGUMENT', `invalid tensor name ${JSON.stringify(name)}`);
    const expected = byteLengthOf(piece.dtype, piece.shape, where);
    if (piece.data.byteLength !== expected) {
      throw new ConvertError(
        'SHAPE_MISMATCH',
        `${where}: piece of shape [${piece.shape.join(',')}] ${piece.dtype} needs ${expected} bytes, got ${piece.data.byteLength}`,
      );
    }
    let t = this.tensors.get(name);
    if (!t) {
      t = { dtype: piece.dtype, globalShape: [...piece.globalShape], pieces: [] };
      this.tensors.set(name, t);
    } else if (t.dtype !== piece.dtype || t.globalShape.join(',') !== piece.globalShape.join(',')) {
      throw new ConvertError(
        'SHAPE_MISMATCH',
        `${where}: piece says ${piece.dtype} [${piece.globalShape.join(',')}], ` +
          `earlier pieces said ${t.dtype} [${t.globalShape.join(',')}]`,
      );
    }
    const rank = piece.rank ?? { tp: 0, pp: 0, ep: 0 };
    t.pieces.push({ rank, offsets: [...piece.offsets], shape: [...piece.shape], data: piece.data });
  }

  /** Adds a side file written into `<iter>/huggingface/` at finalize (config.json, tokenizer files). */
  addFile(name: string, data: Uint8Array | string): void {
    this.checkOpen();
    this.files.push([name, data]);
  }

  /**
   * Checks the tiling of every tensor, writes the piece files and metadata.json, renames the
   * directory into place, and only then updates the `latest` tracker. Returns the metadata.
   */
  finalize(): CheckpointMetadata {
    this.checkOpen();
    try {
      const names = [...this.tensors.keys()].sort();
      const plan = names.map((name) => {
        const t = this.tensors.get(name) as PendingTensor;
        return { name, dtype: t.dtype, globalShape: t.globalShape, pieces: t.pieces };
      });
      // The pieces are all known now: stream them through the planned writer.
      const w = new CheckpointStreamWriter(this.rootDir, this.iteration, this.options, plan);
      try {
        for (const [name, data] of this.files) w.addFile(name, data);
        for (const t of plan) {
          for (const [i, p] of t.pieces.entries()) w.write(t.name, i, p.data);
        }
        const metadata = w.finalize();
        this.state = 'done';
        this.tensors.clear();
        return metadata;
      } catch (e) {
        w.abort();
        throw e;
      }
    } catch (e) {
      this.abort();
      throw e;
    }
  }

  /** Removes the temporary directory; an existing checkpoint of the same iteration is untouched. */
  abort(): void {
    if (this.state === 'done') return;
    this.state = 'aborted';
    this.tensors.clear();
    fs.rmSync(this.tmpDir, { recursive: true, force: true });
  }

  private checkOpen(): void {
    if (this.state !== 'open')
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `checkpoint writer is ${this.state === 'done' ? 'finalized' : 'aborted'}`,
      );
  }
}

/** A logical tensor whose pieces are all known before any byte is written. */
export interface PlannedTensor {
  readonly name: string;
  readonly dtype: SafetensorsDtype;
  readonly globalShape: readonly number[];
  readonly pieces: readonly {
    readonly rank: PieceRank;
    readonly offsets: readonly number[];
    readonly shape: readonly number[];
  }[];
}

/** SHA-256 of a piece, computed as its chunks arrive. */
interface PieceDigest {
  /** Byte length of the piece. */
  readonly size: number;
  written: number;
  hash: Hash | null;
  /** Lowercase hex, once every byte has arrived. */
  sha256: string | null;
}

const EMPTY_SHA256 = createHash('sha256').digest('hex');

/**
 * Streaming checkpoint writer for a layout known up front (what a converter or resharder has):
 * every piece file's header is fixed at construction, and piece bytes are appended in chunks as
 * they are produced, so nothing is held in memory. Same atomicity as {@link CheckpointWriter}:
 * the directory appears under its final name only on {@link finalize}, after every byte of
 * every piece has been written.
 */
export class CheckpointStreamWriter {
  /** Root directory (holding `iter_*` and the `latest` tracker). */
  readonly rootDir: string;
  /** Iteration being written. */
  readonly iteration: number;
  /** Final directory `<root>/iter_<NNNNNNN>`. */
  readonly dir: string;
  /** Temporary directory the files are written to. */
  readonly tmpDir: string;
  private readonly options: CheckpointWriterOptions;
  private readonly tensors = new Map<string, CheckpointTensor>();
  private readonly writers = new Map<string, SafetensorsWriter>();
  private readonly digests = new Map<string, PieceDigest[]>();
  private readonly hfFiles: string[] = [];
  private state: 'open' | 'done' | 'aborted' = 'open';

  /** Checks the tiling of every planned tensor, creates the temporary directory and the piece files. */
  constructor(
    rootDir: string,
    iteration: number,
    options: CheckpointWriterOptions,
    plan: readonly PlannedTensor[],
  ) {
    const keys = new Map<string, Set<string>>();
    const specs = new Map<string, TensorSpec[]>();
    for (const t of plan) {
      if (this.tensors.has(t.name))
        throw new ConvertError('INVALID_ARGUMENT', `tensor ${JSON.stringify(t.name)} is planned twice`);
      checkTiling(t.name, t.globalShape, t.pieces);
      const pieces = t.pieces.map((p) => {
        const file = pieceFileName(p.rank);
        const key = uniqueKey(keys, file, t.name);
        const list = specs.get(file) ?? [];
        list.push({ name: key, dtype: t.dtype, shape: p.shape });
        specs.set(file, list);
        return { file, key, offsets: [...p.offsets], shape: [...p.shape] };
      });
      this.tensors.set(t.name, { dtype: t.dtype, globalShape: [...t.globalShape], pieces });
      this.digests.set(
        t.name,
        t.pieces.map((p) => ({
          size: byteLengthOf(t.dtype, p.shape, `tensor ${JSON.stringify(t.name)}`),
          written: 0,
          hash: null,
          sha256: null,
        })),
      );
    }
    const { dir, tmpDir } = openIterationDir(rootDir, iteration);
    this.rootDir = rootDir;
    this.iteration = iteration;
    this.options = options;
    this.dir = dir;
    this.tmpDir = tmpDir;
    try {
      for (const [file, list] of specs) {
        this.writers.set(
          file,
          new SafetensorsWriter(path.join(tmpDir, file), list, { metadata: { format: 'megapatch' } }),
        );
      }
    } catch (e) {
      this.abort();
      throw e;
    }
  }

  /** The planned pieces of `name`, in plan order (the index {@link write} takes). */
  pieces(name: string): readonly CheckpointPiece[] {
    const t = this.tensors.get(name);
    if (!t) throw new ConvertError('MISSING_TENSOR', `tensor ${JSON.stringify(name)} is not in the plan`);
    return t.pieces;
  }

  /**
   * Appends `chunk` (row-major bytes, following those already written) to piece `index` of `name`;
   * the piece's SHA-256 is updated on the way and recorded in metadata.json.
   */
  write(name: string, index: number, chunk: Uint8Array): void {
    this.checkOpen();
    const p = this.pieces(name)[index];
    if (!p) {
      throw new ConvertError('INVALID_ARGUMENT', `tensor ${JSON.stringify(name)} has no piece ${index}`);
    }
    // The file writer checks the length first, so the digest only ever sees bytes that were written.
    (this.writers.get(p.file) as SafetensorsWriter).write(p.key, chunk);
    const d = (this.digests.get(name) as PieceDigest[])[index];
    d.hash ??= createHash('sha256');
    d.hash.update(chunk);
    d.written += chunk.byteLength;
    if (d.written === d.size) {
      d.sha256 = d.hash.digest('hex');
      d.hash = null;
    }
  }

  /** Writes a side file into `<iter>/huggingface/` (a plain file name), recorded in the metadata. */
  addFile(name: string, data: Uint8Array | string): void {
    this.checkOpen();
    if (name !== path.basename(name) || name === '.' || name === '..' || name.includes('\\')) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `side file name ${JSON.stringify(name)} is not a plain file name`,
      );
    }
    const dir = path.join(this.tmpDir, HF_FILES_DIR);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, name), data);
    if (!this.hfFiles.includes(name)) this.hfFiles.push(name);
  }

  /**
   * Completes every piece file (each must have received all its bytes), writes metadata.json,
   * renames the directory into place and then updates the `latest` tracker.
   */
  finalize(): CheckpointMetadata {
    this.checkOpen();
    try {
      // finish() names any piece that is still short of bytes, before the metadata asks for its digest.
      for (const w of this.writers.values()) w.finish();
      this.writers.clear();
      const tensors: Record<string, CheckpointTensor> = {};
      for (const name of [...this.tensors.keys()].sort()) {
        const t = this.tensors.get(name) as CheckpointTensor;
        const digests = this.digests.get(name) as PieceDigest[];
        tensors[name] = {
          ...t,
          pieces: t.pieces.map((p, i) => ({
            ...p,
            sha256: digests[i].sha256 ?? (digests[i].size === 0 ? EMPTY_SHA256 : undefined),
          })),
        };
      }
      const hf = this.options.huggingface;
      const options =
        this.hfFiles.length > 0 || hf?.dtypes
          ? { ...this.options, huggingface: { ...hf, files: [...this.hfFiles] } }
          : this.options;
      const metadata = buildMetadata(this.iteration, options, tensors);
      commitIterationDir(this, metadata);
      this.state = 'done';
      return metadata;
    } catch (e) {
      this.abort();
      throw e;
    }
  }

  /** Drops the temporary directory; an existing checkpoint of the same iteration is untouched. */
  abort(): void {
    if (this.state === 'done') return;
    this.state = 'aborted';
    for (const w of this.writers.values()) w.abort();
    this.writers.clear();
    this.digests.clear();
    fs.rmSync(this.tmpDir, { recursive: true, force: true });
  }

  private checkOpen(): void {
    if (this.state !== 'open')
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `checkpoint writer is ${this.state === 'done' ? 'finalized' : 'aborted'}`,
      );
  }
}
