import * as fs from 'node:fs';
import * as path from 'node:path';
import { ConvertError } from '../errors.js';
import { byteLengthOf, checkDtype, DTYPE_SIZE, type SafetensorsDtype } from './dtype.js';
import { encodeHeader, type TensorEntry } from './header.js';

/** A tensor to write: raw little-endian row-major bytes. */
export interface TensorInput {
  readonly name: string;
  readonly dtype: SafetensorsDtype;
  readonly shape: readonly number[];
  readonly data: Uint8Array;
}

/** What the streaming writer needs up front: everything but the data. */
export type TensorSpec = Omit<TensorInput, 'data'>;

/**
 * Layout order of tensors in the data buffer.
 * - 'alignment' (default): dtype size descending, then name by UTF-8 bytes. The reference Rust
 *   writer also puts larger alignments first then sorts by name, so every tensor starts aligned;
 *   among dtypes of equal size it orders by dtype first, so files may differ from it there.
 * - 'given': the order the tensors were passed in.
 */
export type TensorOrder = 'alignment' | 'given';

/** Options of the writers. */
export interface WriteOptions {
  /** `__metadata__` (string values only), e.g. `{ format: 'pt' }`. */
  readonly metadata?: Record<string, string>;
  /** Layout order; see {@link TensorOrder}. */
  readonly order?: TensorOrder;
}

/** Sorts specs into the layout order (a copy). */
export function layoutOrder<T extends TensorSpec>(
  specs: readonly T[],
  order: TensorOrder = 'alignment',
): T[] {
  if (order === 'given') return [...specs];
  return [...specs].sort(
    (a, b) =>
      DTYPE_SIZE[b.dtype] - DTYPE_SIZE[a.dtype] || Buffer.compare(Buffer.from(a.name), Buffer.from(b.name)),
  );
}

/** Checks names (non-empty, unique, not `__metadata__`), dtypes, shapes and metadata before writing. */
export function checkSpecs(specs: readonly TensorSpec[], metadata?: Record<string, string>): void {
  const seen = new Set<string>();
  for (const s of specs) {
    const where = `tensor ${JSON.stringify(s.name)}`;
    if (typeof s.name !== 'string' || s.name === '' || s.name === '__metadata__') {
      throw new ConvertError('INVALID_ARGUMENT', `invalid tensor name ${JSON.stringify(s.name)}`);
    }
    if (seen.has(s.name)) throw new ConvertError('INVALID_ARGUMENT', `duplicate ${where}`);
    seen.add(s.name);
    try {
      checkDtype(s.dtype, where);
    } catch (e) {
      throw new ConvertError('INVALID_ARGUMENT', (e as Error).message);
    }
    if (!Array.isArray(s.shape) || !s.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new ConvertError('INVALID_ARGUMENT', `${where} shape ${JSON.stringify(s.shape)} is invalid`);
    }
  }
  for (const [k, v] of Object.entries(metadata ?? {})) {
    if (typeof v !== 'string') {
      throw new ConvertError('INVALID_ARGUMENT', `metadata value of ${JSON.stringify(k)} is not a string`);
    }
  }
}

/** Writes all of `data` at `position`. */
function writeAll(fd: number, data: Uint8Array, position: number): void {
  let done = 0;
  while (done < data.byteLength) {
    done += fs.writeSync(fd, data, done, Math.min(1 << 30, data.byteLength - done), position + done);
  }
}

/**
 * Streaming writer: the header is fixed up front from the specs, then each tensor's bytes are
 * written (in one piece or in chunks, in any tensor order) at their final offsets, so a
 * converter never holds more than one chunk. The file appears atomically on {@link finish}.
 */
export class SafetensorsWriter {
  /** Final path. */
  readonly path: string;
  /** Tensors in layout order; writing in this order keeps the file writes sequential. */
  readonly order: readonly TensorSpec[];
  private readonly tmpPath: string;
  private fd: number | null;
  private readonly entries = new Map<string, TensorEntry & { written: number }>();
  private readonly dataStart: number;

  /** Creates `<path>.tmp-<pid>` and writes the header; see {@link WriteOptions}. */
  constructor(filePath: string, specs: readonly TensorSpec[], options: WriteOptions = {}) {
    checkSpecs(specs, options.metadata);
    this.path = filePath;
    this.order = layoutOrder(specs, options.order);
    let offset = 0;
    const list: TensorEntry[] = [];
    for (const s of this.order) {
      const bytes = byteLengthOf(s.dtype, s.shape, `tensor ${JSON.stringify(s.name)}`);
      const e = { name: s.name, dtype: s.dtype, shape: [...s.shape], begin: offset, end: offset + bytes };
      list.push(e);
      this.entries.set(s.name, { ...e, written: 0 });
      offset += bytes;
    }
    const header = encodeHeader(list, options.metadata);
    this.dataStart = header.byteLength;
    this.tmpPath = `${filePath}.tmp-${process.pid}`;
    this.fd = fs.openSync(this.tmpPath, 'w');
    try {
      writeAll(this.fd, header, 0);
      // Size the file now so that a tensor written out of order leaves no gap behind.
      fs.ftruncateSync(this.fd, this.dataStart + offset);
    } catch (e) {
      this.abort();
      throw e;
    }
  }

  /** Appends `chunk` to tensor `name` (the next bytes after those already written). */
  write(name: string, chunk: Uint8Array): void {
    if (this.fd === null)
      throw new ConvertError('INVALID_ARGUMENT', 'writer is closed', path.basename(this.path));
    const e = this.entries.get(name);
    if (!e) {
      throw new ConvertError(
        'MISSING_TENSOR',
        `tensor ${JSON.stringify(name)} is not in the header`,
        path.basename(this.path),
      );
    }
    if (e.written + chunk.byteLength > e.end - e.begin) {
      throw new ConvertError(
        'SHAPE_MISMATCH',
        `tensor ${JSON.stringify(name)} gets ${e.written + chunk.byteLength} bytes, ` +
          `but shape [${e.shape.join(',')}] ${e.dtype} has ${e.end - e.begin}`,
        path.basename(this.path),
      );
    }
    writeAll(this.fd, chunk, this.dataStart + e.begin + e.written);
    e.written += chunk.byteLength;
  }

  /** Checks that every tensor is complete, flushes, and renames the file into place. */
  finish(): void {
    if (this.fd === null)
      throw new ConvertError('INVALID_ARGUMENT', 'writer is closed', path.basename(this.path));
    for (const e of this.entries.values()) {
      if (e.written !== e.end - e.begin) {
        this.abort();
        throw new ConvertError(
          'SHAPE_MISMATCH',
          `tensor ${JSON.stringify(e.name)} got ${e.written} of its ${e.end - e.begin} bytes`,
          path.basename(this.path),
        );
      }
    }
    fs.fsyncSync(this.fd);
    fs.closeSync(this.fd);
    this.fd = null;
    fs.renameSync(this.tmpPath, this.path);
  }

  /** Drops the temporary file; the destination is left untouched. */
  abort(): void {
    if (this.fd !== null) fs.closeSync(this.fd);
    this.fd = null;
    fs.rmSync(this.tmpPath, { force: true });
  }
}

/** Normalizes a tensor list or a name → tensor map into a list. */
export function toTensorList(
  tensors: readonly TensorInput[] | ReadonlyMap<string, Omit<TensorInput, 'name'>>,
): TensorInput[] {
  if (Array.isArray(tensors)) return [...tensors];
  return [...(tensors as ReadonlyMap<string, Omit<TensorInput, 'name'>>)].map(([name, t]) => ({
    ...t,
    name,
  }));
}

/** Writes a whole safetensors file atomically (`<path>.tmp-<pid>`, then rename). */
export function writeSafetensors(
  filePath: string,
  tensors: readonly TensorInput[] | ReadonlyMap<string, Omit<TensorInput, 'name'>>,
  options: WriteOptions = {},
): void {
  const list = toTensorList(tensors);
  const w = new SafetensorsWriter(filePath, list, options);
  try {
    for (const t of w.order) w.write(t.name, (t as TensorInput).data);
    w.finish();
  } catch (e) {
    w.abort();
    throw e;
  }
}
