// Writing a megapatch checkpoint: pieces from every rank go into per-rank safetensors files in a
// temporary directory, which is renamed into place only once complete and checked; the `latest`
// tracker is written after that, so a crash at any point leaves the previous checkpoint current.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ConvertError } from '../errors.js';
import { byteLengthOf, type SafetensorsDtype } from '../safetensors/dtype.js';
import { type TensorInput, writeSafetensors } from '../safetensors/writer.js';
import {
  CHECKPOINT_FORMAT_VERSION,
  CHECKPOINT_METADATA_FILE,
  type CheckpointLayout,
  type CheckpointMetadata,
  type CheckpointPiece,
  type CheckpointTensor,
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
  readonly tokenizer?: { readonly files: readonly string[] };
  readonly optimizer?: unknown;
  readonly scheduler?: unknown;
  readonly rng?: unknown;
  readonly dataLoader?: unknown;
}

/** Name of the safetensors file of a rank. */
export function pieceFileName(rank: PieceRank): string {
  return `model_rank_tp${rank.tp}_pp${rank.pp}_ep${rank.ep}.safetensors`;
}

interface PendingPiece extends CheckpointPiece {
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
  // Keys already used per file, so two pieces of one tensor on the same rank get distinct keys.
  private readonly keys = new Map<string, Set<string>>();
  private state: 'open' | 'done' | 'aborted' = 'open';

  /** Creates `<root>/iter_<N>.tmp-<pid>/`. */
  constructor(rootDir: string, iteration: number, options: CheckpointWriterOptions) {
    if (!Number.isSafeInteger(iteration) || iteration < 0) {
      throw new ConvertError('INVALID_ARGUMENT', `iteration ${iteration} is not a non-negative integer`);
    }
    this.rootDir = rootDir;
    this.iteration = iteration;
    this.options = options;
    this.dir = path.join(rootDir, iterationDirName(iteration));
    this.tmpDir = `${this.dir}.tmp-${process.pid}`;
    fs.mkdirSync(rootDir, { recursive: true });
    fs.rmSync(this.tmpDir, { recursive: true, force: true });
    fs.mkdirSync(this.tmpDir);
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
    const file = pieceFileName(piece.rank ?? { tp: 0, pp: 0, ep: 0 });
    let used = this.keys.get(file);
    if (!used) {
      used = new Set();
      this.keys.set(file, used);
    }
    let key = name;
    for (let k = 1; used.has(key); k++) key = `${name}#${k}`;
    used.add(key);
    t.pieces.push({ file, key, offsets: [...piece.offsets], shape: [...piece.shape], data: piece.data });
  }

  /**
   * Checks the tiling of every tensor, writes the piece files and metadata.json, renames the
   * directory into place, and only then updates the `latest` tracker. Returns the metadata.
   */
  finalize(): CheckpointMetadata {
    this.checkOpen();
    try {
      const tensors: Record<string, CheckpointTensor> = {};
      const files = new Map<string, TensorInput[]>();
      for (const [name, t] of [...this.tensors].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
        checkTiling(name, t.globalShape, t.pieces);
        tensors[name] = {
          dtype: t.dtype,
          globalShape: [...t.globalShape],
          pieces: t.pieces.map(({ file, key, offsets, shape }) => ({ file, key, offsets, shape })),
        };
        for (const p of t.pieces) {
          const list = files.get(p.file) ?? [];
          list.push({ name: p.key, dtype: t.dtype, shape: p.shape, data: p.data });
          files.set(p.file, list);
        }
      }
      const o = this.options;
      // Round the metadata through the schema so a bad layout or section fails before any rename.
      const metadata = parseCheckpointMetadata({
        formatVersion: CHECKPOINT_FORMAT_VERSION,
        iteration: this.iteration,
        consumedSamples: o.consumedSamples ?? 0,
        modelConfig: o.modelConfig,
        ...(o.tokenizer ? { tokenizer: { files: [...o.tokenizer.files] } } : {}),
        layout: o.layout,
        tensors,
        ...(o.optimizer !== undefined ? { optimizer: o.optimizer } : {}),
        ...(o.scheduler !== undefined ? { scheduler: o.scheduler } : {}),
        ...(o.rng !== undefined ? { rng: o.rng } : {}),
        ...(o.dataLoader !== undefined ? { dataLoader: o.dataLoader } : {}),
      } satisfies CheckpointMetadata);
      for (const [file, list] of files) {
        writeSafetensors(path.join(this.tmpDir, file), list, { metadata: { format: 'megapatch' } });
      }
      writeFileAtomic(
        path.join(this.tmpDir, CHECKPOINT_METADATA_FILE),
        `${JSON.stringify(metadata, null, 2)}\n`,
      );
      this.moveIntoPlace();
      writeFileAtomic(path.join(this.rootDir, LATEST_ITERATION_FILE), `${this.iteration}\n`);
      this.state = 'done';
      this.tensors.clear();
      return metadata;
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

  private moveIntoPlace(): void {
    // rename() cannot replace a non-empty directory: move an older save of this iteration aside
    // first, and delete it only once the new one is in place.
    const old = `${this.dir}.old-${process.pid}`;
    const hadOld = fs.existsSync(this.dir);
    if (hadOld) fs.renameSync(this.dir, old);
    fs.renameSync(this.tmpDir, this.dir);
    if (hadOld) fs.rmSync(old, { recursive: true, force: true });
  }

  private checkOpen(): void {
    if (this.state !== 'open')
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `checkpoint writer is ${this.state === 'done' ? 'finalized' : 'aborted'}`,
      );
  }
}
