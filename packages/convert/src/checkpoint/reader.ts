// Reading a megapatch checkpoint with any layout: a slice of a logical tensor is assembled from
// whichever pieces overlap it, reading only the rows of each piece that the slice needs.
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
}

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

/** An open megapatch checkpoint; piece files are opened on first use and kept open until close. */
export class Checkpoint {
  /** The iteration directory. */
  readonly dir: string;
  /** Validated metadata.json. */
  readonly metadata: CheckpointMetadata;
  private readonly files = new Map<string, SafetensorsFile>();

  private constructor(dir: string, metadata: CheckpointMetadata) {
    this.dir = dir;
    this.metadata = metadata;
  }

  /** Opens `<root>/iter_<N>` (default: the latest); validates metadata and the tiling of every tensor. */
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
    return new Checkpoint(dir, metadata);
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

  /** Opens every piece file and checks each piece is present with its dtype and shape. */
  verify(): void {
    for (const name of this.tensorNames()) {
      const t = this.metadata.tensors[name];
      for (const p of t.pieces) this.checkPiece(name, t, p);
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
  private readPieceRows(
    name: string,
    t: CheckpointTensor,
    p: CheckpointPiece,
    region: Region,
  ): { data: Uint8Array; box: Region } {
    const f = this.checkPiece(name, t, p);
    if (p.shape.length === 0) return { data: f.read(p.key).data, box: p };
    const start = region.offsets[0] - p.offsets[0];
    const count = region.shape[0];
    const { data } = f.readRows(p.key, start, count);
    return {
      data,
      box: { offsets: [region.offsets[0], ...p.offsets.slice(1)], shape: [count, ...p.shape.slice(1)] },
    };
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
