// Reading a megapatch checkpoint with any layout: a slice of a logical tensor is assembled from
// whichever pieces overlap it, reading only the rows of each piece that the slice needs.
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ConvertError } from '../errors.js';
import { byteLengthOf, DTYPE_SIZE, type SafetensorsDtype } from '../safetensors/dtype.js';
import { SafetensorsFile } from '../safetensors/file.js';
import {
  type CheckpointLayout,
  type CheckpointMetadata,
  type CheckpointPiece,
  type CheckpointTensor,
  iterationDirName,
  readCheckpointMetadata,
  readLatestIteration,
} from './metadata.js';
import { checkTiling, copyRegion, inBounds, intersect, numel, type Region } from './region.js';

/** Options of {@link Checkpoint.open}. */
export interface CheckpointOpenOptions {
  /** Iteration to open; default: the one in `latest_checkpointed_iteration.txt`. */
  readonly iteration?: number;
  /**
   * Check each piece's SHA-256 (format version 2) the first time any of its bytes are read, once
   * per piece (default true): a corrupted file fails with CORRUPT_FILE instead of giving wrong bytes.
   */
  readonly verifyChecksums?: boolean;
}

/** Bytes hashed per read when a piece's checksum is checked (memory stays bounded by this). */
const HASH_CHUNK = 16 << 20;
const tick = () => new Promise<void>((r) => setImmediate(r));

/** Summary of a checkpoint, from its metadata alone. */
export interface CheckpointSummary {
  readonly iteration: number;
  readonly consumedSamples: number;
  readonly layout: CheckpointLayout;
  readonly tensorCount: number;
  /** Sum of the global element counts of all tensors. */
  readonly parameterCount: number;
  /** Sum of the global byte lengths of all tensors. */
  readonly bytes: number;
  /** Tensor count per dtype. */
  readonly dtypes: Readonly<Partial<Record<SafetensorsDtype, number>>>;
}

/** Identifies a piece within a checkpoint (a key is unique inside its file). */
function pieceId(p: CheckpointPiece): string {
  return `${p.file}\u0000${p.key}`;
}

/** The bytes of tensor `key` of `f`, in chunks of at most {@link HASH_CHUNK}. */
function* chunksOf(f: SafetensorsFile, key: string): Generator<Uint8Array> {
  const size = f.info(key).byteLength;
  for (let at = 0; at < size; at += HASH_CHUNK)
    yield f.readByteRange(key, at, Math.min(HASH_CHUNK, size - at));
}

/** An open megapatch checkpoint; piece files are opened on first use and kept open until close. */
export class Checkpoint {
  /** The iteration directory. */
  readonly dir: string;
  /** Validated metadata.json. */
  readonly metadata: CheckpointMetadata;
  /** Whether reads check each piece's checksum first (see {@link CheckpointOpenOptions}). */
  readonly verifyChecksums: boolean;
  private readonly files = new Map<string, SafetensorsFile>();
  // Pieces whose checksum has been checked, by file and key.
  private readonly verified = new Set<string>();

  private constructor(dir: string, metadata: CheckpointMetadata, verifyChecksums: boolean) {
    this.dir = dir;
    this.metadata = metadata;
    this.verifyChecksums = verifyChecksums;
  }

  /**
   * Opens `<root>/iter_<N>` (default: the latest); validates metadata and the tiling of every
   * tensor. Piece checksums are checked as pieces are first read unless `verifyChecksums` is false.
   */
  static open(rootDir: string, options: CheckpointOpenOptions = {}): Checkpoint {
    const iteration = options.iteration ?? readLatestIteration(rootDir);
    const dir = path.join(rootDir, iterationDirName(iteration));
    if (!fs.existsSync(dir)) {
      throw new ConvertError('MISSING_FILE', `no checkpoint directory ${dir}`, iterationDirName(iteration));
    }
    const metadata = readCheckpointMetadata(dir);
    for (const [name, t] of Object.entries(metadata.tensors)) {
      // metadata.json is trusted for nothing: a bad tiling would silently read garbage.
      try {
        checkTiling(name, t.globalShape, t.pieces);
      } catch (e) {
        throw new ConvertError(
          'INVALID_FORMAT',
          `field tensors.${name}.pieces: ${(e as Error).message}`,
          'metadata.json',
        );
      }
    }
    return new Checkpoint(dir, metadata, options.verifyChecksums ?? true);
  }

  /** Iteration of this checkpoint. */
  get iteration(): number {
    return this.metadata.iteration;
  }

  /** Names of all logical tensors, sorted. */
  tensorNames(): string[] {
    return Object.keys(this.metadata.tensors).sort();
  }

  /** Dtype, global shape and pieces of `name`; MISSING_TENSOR when absent. */
  info(name: string): CheckpointTensor {
    const t = Object.hasOwn(this.metadata.tensors, name) ? this.metadata.tensors[name] : undefined;
    if (!t)
      throw new ConvertError(
        'MISSING_TENSOR',
        `checkpoint has no tensor ${JSON.stringify(name)}`,
        'metadata.json',
      );
    return t;
  }

  /** The whole of tensor `name`, assembled from its pieces. */
  read(name: string): Uint8Array {
    const t = this.info(name);
    return this.readSlice(
      name,
      t.globalShape.map(() => 0),
      t.globalShape,
    );
  }

  /** The box `offsets`/`shape` of tensor `name`, reading only the rows of each piece it overlaps. */
  readSlice(name: string, offsets: readonly number[], shape: readonly number[]): Uint8Array {
    const t = this.info(name);
    const want: Region = { offsets, shape };
    if (!inBounds(want, t.globalShape)) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `slice offsets [${offsets.join(',')}] shape [${shape.join(',')}] is outside tensor ` +
          `${JSON.stringify(name)} of shape [${t.globalShape.join(',')}]`,
      );
    }
    const esz = DTYPE_SIZE[t.dtype];
    if (numel(shape) === 0) return new Uint8Array(0);
    // One piece holding whole rows of the slice: its row read is the answer, with no extra copy.
    const whole = t.pieces.find(
      (p) =>
        shape.length > 0 &&
        p.shape.every((d, i) => (i === 0 ? true : d === shape[i] && p.offsets[i] === offsets[i])) &&
        p.offsets[0] <= offsets[0] &&
        offsets[0] + shape[0] <= p.offsets[0] + p.shape[0],
    );
    if (whole) return this.readPieceRows(name, t, whole, want).data;
    const out = new Uint8Array(byteLengthOf(t.dtype, shape));
    for (const p of t.pieces) {
      if (numel(p.shape) === 0) continue;
      const region = shape.length === 0 ? want : intersect(want, p);
      if (!region) continue;
      const { data, box } = this.readPieceRows(name, t, p, region);
      copyRegion(data, box, out, want, region, esz);
    }
    return out;
  }

  /**
   * Opens every piece file and checks each piece is present with its dtype and shape, and that its
   * bytes have the recorded SHA-256 (read in 16 MiB chunks; whatever `verifyChecksums` says).
   */
  verify(): void {
    for (const name of this.tensorNames()) {
      const t = this.metadata.tensors[name];
      for (const p of t.pieces) {
        const f = this.checkPiece(name, t, p);
        this.checkDigest(name, p, f);
      }
    }
  }

  /**
   * Checks the SHA-256 of every piece of `name` not checked yet, yielding to the event loop
   * between chunks (so a signal handler can run) and stopping with `signal.reason` once aborted.
   * The converters call it before reading a tensor; later reads of those pieces hash nothing.
   */
  async verifyTensor(name: string, options: { readonly signal?: AbortSignal } = {}): Promise<void> {
    const t = this.info(name);
    for (const p of t.pieces) {
      options.signal?.throwIfAborted();
      const f = this.checkPiece(name, t, p);
      if (p.sha256 === undefined || this.verified.has(pieceId(p))) continue;
      const hash = createHash('sha256');
      for (const chunk of chunksOf(f, p.key)) {
        hash.update(chunk);
        await tick();
        options.signal?.throwIfAborted();
      }
      this.settle(name, p, hash.digest('hex'));
    }
  }

  /** A summary from the metadata. */
  inspect(): CheckpointSummary {
    let parameterCount = 0;
    let bytes = 0;
    const dtypes: Partial<Record<SafetensorsDtype, number>> = {};
    for (const t of Object.values(this.metadata.tensors)) {
      parameterCount += numel(t.globalShape);
      bytes += byteLengthOf(t.dtype, t.globalShape);
      dtypes[t.dtype] = (dtypes[t.dtype] ?? 0) + 1;
    }
    return {
      iteration: this.metadata.iteration,
      consumedSamples: this.metadata.consumedSamples,
      layout: this.metadata.layout,
      tensorCount: Object.keys(this.metadata.tensors).length,
      parameterCount,
      bytes,
      dtypes,
    };
  }

  /** Closes every opened piece file. */
  close(): void {
    for (const f of this.files.values()) f.close();
    this.files.clear();
  }

  /** Closes the checkpoint (for `using`). */
  [Symbol.dispose](): void {
    this.close();
  }

  // Reads the rows of piece `p` along dim 0 that `region` needs; columns are cut in memory later.
  // An unchecked piece is checked first; when all of it is read anyway, the bytes read are hashed.
  private readPieceRows(
    name: string,
    t: CheckpointTensor,
    p: CheckpointPiece,
    region: Region,
  ): { data: Uint8Array; box: Region } {
    const f = this.checkPiece(name, t, p);
    const unchecked = this.verifyChecksums && p.sha256 !== undefined && !this.verified.has(pieceId(p));
    const start = p.shape.length === 0 ? 0 : region.offsets[0] - p.offsets[0];
    const count = p.shape.length === 0 ? 1 : region.shape[0];
    const whole = p.shape.length === 0 || (start === 0 && count === p.shape[0]);
    if (unchecked && !whole) this.checkDigest(name, p, f);
    const data = p.shape.length === 0 ? f.read(p.key).data : f.readRows(p.key, start, count).data;
    if (unchecked && whole) this.settle(name, p, createHash('sha256').update(data).digest('hex'));
    if (p.shape.length === 0) return { data, box: p };
    return {
      data,
      box: { offsets: [region.offsets[0], ...p.offsets.slice(1)], shape: [count, ...p.shape.slice(1)] },
    };
  }

  // Hashes a piece (once per open checkpoint) and compares it with its recorded SHA-256.
  private checkDigest(name: string, p: CheckpointPiece, f: SafetensorsFile): void {
    if (p.sha256 === undefined || this.verified.has(pieceId(p))) return;
    const hash = createHash('sha256');
    for (const chunk of chunksOf(f, p.key)) hash.update(chunk);
    this.settle(name, p, hash.digest('hex'));
  }

  // Records a piece as checked, or throws CORRUPT_FILE naming the file, the tensor and the piece.
  private settle(name: string, p: CheckpointPiece, sha256: string): void {
    if (sha256 !== p.sha256) {
      throw new ConvertError(
        'CORRUPT_FILE',
        `tensor ${JSON.stringify(name)} piece at [${p.offsets.join(',')}] (key ${JSON.stringify(p.key)}): ` +
          `SHA-256 of its bytes is ${sha256}, metadata.json records ${p.sha256}; the file is damaged: ` +
          'restore the checkpoint from a good copy or convert the model again',
        p.file,
      );
    }
    this.verified.add(pieceId(p));
  }

  // Opens the piece's file and checks the piece is there as the metadata describes it.
  private checkPiece(name: string, t: CheckpointTensor, p: CheckpointPiece): SafetensorsFile {
    const where = `tensor ${JSON.stringify(name)} piece at [${p.offsets.join(',')}]`;
    let f = this.files.get(p.file);
    if (!f) {
      try {
        f = SafetensorsFile.open(path.join(this.dir, p.file));
      } catch (e) {
        if (e instanceof ConvertError && e.code === 'MISSING_FILE') {
          throw new ConvertError('MISSING_FILE', `${where}: piece file ${p.file} is missing`, p.file);
        }
        // TRUNCATED_FILE and CORRUPT_FILE already name the file.
        throw e;
      }
      this.files.set(p.file, f);
    }
    if (!f.has(p.key)) {
      throw new ConvertError(
        'MISSING_TENSOR',
        `${where}: key ${JSON.stringify(p.key)} is missing from ${p.file}`,
        p.file,
      );
    }
    const info = f.info(p.key);
    if (info.dtype !== t.dtype || info.shape.join(',') !== p.shape.join(',')) {
      throw new ConvertError(
        'SHAPE_MISMATCH',
        `${where}: stored as ${info.dtype} [${info.shape.join(',')}], metadata says ${t.dtype} [${p.shape.join(',')}]`,
        p.file,
      );
    }
    return f;
  }
}
