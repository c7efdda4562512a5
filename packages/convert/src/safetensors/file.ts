// The default export, so that tests can spy on positioned reads.
import fs from 'node:fs';
import * as path from 'node:path';
import { ConvertError } from '../errors.js';
import type { SafetensorsDtype } from './dtype.js';
import { MAX_HEADER_SIZE, parseHeader, type TensorEntry } from './header.js';

/** Dtype, shape and byte length of one stored tensor. */
export interface TensorInfo {
  readonly dtype: SafetensorsDtype;
  readonly shape: readonly number[];
  readonly byteLength: number;
}

/** A tensor's raw bytes: little-endian, row-major, as stored. */
export interface TensorData {
  readonly dtype: SafetensorsDtype;
  readonly shape: readonly number[];
  readonly data: Uint8Array;
}

// Node refuses single reads above 2 GiB; bigger tensors are read in pieces.
const READ_CHUNK = 1 << 30;

/** Reads exactly `length` bytes at `position` into a fresh buffer, or throws TRUNCATED_FILE. */
export function readExact(fd: number, length: number, position: number, file: string): Uint8Array {
  const out = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, out, done, Math.min(READ_CHUNK, length - done), position + done);
    if (n === 0) {
      throw new ConvertError(
        'TRUNCATED_FILE',
        `file ended after ${position + done} bytes, expected at least ${position + length}`,
        file,
      );
    }
    done += n;
  }
  return out;
}

/**
 * An open safetensors file: the header is read and validated on open, tensor bytes are read on
 * demand with positioned reads, so only what is asked for is ever loaded.
 */
export class SafetensorsFile {
  /** Path the file was opened from. */
  readonly path: string;
  /** `__metadata__` of the header (empty when absent). */
  readonly metadata: Readonly<Record<string, string>>;
  /** Byte offset of the data buffer inside the file (8 + header length). */
  readonly dataStart: number;
  private readonly tensors: Map<string, TensorEntry>;
  private fd: number | null;
  private readonly label: string;

  private constructor(
    filePath: string,
    fd: number,
    dataStart: number,
    tensors: Map<string, TensorEntry>,
    metadata: Record<string, string>,
  ) {
    this.path = filePath;
    this.label = path.basename(filePath);
    this.fd = fd;
    this.dataStart = dataStart;
    this.tensors = tensors;
    this.metadata = metadata;
  }

  /** Opens and validates `filePath`; errors name the file (its base name) and the problem. */
  static open(filePath: string): SafetensorsFile {
    const label = path.basename(filePath);
    let fd: number;
    try {
      fd = fs.openSync(filePath, 'r');
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw new ConvertError('MISSING_FILE', `no such file (${filePath})`, label);
      throw new ConvertError('INVALID_ARGUMENT', `cannot open (${(e as Error).message})`, label);
    }
    try {
      const size = fs.fstatSync(fd).size;
      if (size < 8) {
        throw new ConvertError(
          'TRUNCATED_FILE',
          `file is ${size} bytes, too short for the header length`,
          label,
        );
      }
      const len = new DataView(readExact(fd, 8, 0, label).buffer).getBigUint64(0, true);
      if (len > BigInt(MAX_HEADER_SIZE)) {
        throw new ConvertError(
          'CORRUPT_FILE',
          `header length ${len} exceeds the ${MAX_HEADER_SIZE}-byte limit`,
          label,
        );
      }
      const headerLen = Number(len);
      if (headerLen < 2)
        throw new ConvertError('CORRUPT_FILE', `header length ${headerLen} is too small`, label);
      if (8 + headerLen > size) {
        throw new ConvertError(
          'TRUNCATED_FILE',
          `header length ${headerLen} runs past the end of the ${size}-byte file`,
          label,
        );
      }
      let text: string;
      try {
        text = new TextDecoder('utf-8', { fatal: true }).decode(readExact(fd, headerLen, 8, label));
      } catch {
        throw new ConvertError('CORRUPT_FILE', 'header is not valid UTF-8', label);
      }
      const dataStart = 8 + headerLen;
      const { tensors, metadata } = parseHeader(text, size - dataStart, label);
      return new SafetensorsFile(filePath, fd, dataStart, tensors, metadata);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /** Tensor names in header order. */
  keys(): string[] {
    return [...this.tensors.keys()];
  }

  /** True when the file holds tensor `name`. */
  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /** Dtype, shape and byte length of `name`; MISSING_TENSOR when absent. */
  info(name: string): TensorInfo {
    const t = this.entry(name);
    return { dtype: t.dtype, shape: t.shape, byteLength: t.end - t.begin };
  }

  /** Absolute byte range [begin, end) of `name` inside the file. */
  byteRange(name: string): [number, number] {
    const t = this.entry(name);
    return [this.dataStart + t.begin, this.dataStart + t.end];
  }

  /** Reads the whole of tensor `name`. */
  read(name: string): TensorData {
    const t = this.entry(name);
    return {
      dtype: t.dtype,
      shape: t.shape,
      data: this.readBytes(this.dataStart + t.begin, t.end - t.begin),
    };
  }

  /** Reads rows [start, start+count) along dim 0 of `name`, touching only those bytes. */
  readRows(name: string, start: number, count: number): TensorData {
    const t = this.entry(name);
    if (t.shape.length === 0) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `tensor ${JSON.stringify(name)} is a 0-d scalar: no rows`,
        this.label,
      );
    }
    const rows = t.shape[0];
    if (
      !Number.isSafeInteger(start) ||
      !Number.isSafeInteger(count) ||
      start < 0 ||
      count < 0 ||
      start + count > rows
    ) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `rows [${start}, ${start + count}) are outside tensor ${JSON.stringify(name)} with ${rows} rows`,
        this.label,
      );
    }
    const rowBytes = rows === 0 ? 0 : (t.end - t.begin) / rows;
    const data = this.readBytes(this.dataStart + t.begin + start * rowBytes, count * rowBytes);
    return { dtype: t.dtype, shape: [count, ...t.shape.slice(1)], data };
  }

  /** Reads bytes [start, start+length) of tensor `name`'s data (for hashing a tensor in chunks). */
  readByteRange(name: string, start: number, length: number): Uint8Array {
    const t = this.entry(name);
    const size = t.end - t.begin;
    if (
      !Number.isSafeInteger(start) ||
      !Number.isSafeInteger(length) ||
      start < 0 ||
      length < 0 ||
      start + length > size
    ) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `bytes [${start}, ${start + length}) are outside tensor ${JSON.stringify(name)} of ${size} bytes`,
        this.label,
      );
    }
    return this.readBytes(this.dataStart + t.begin + start, length);
  }

  /** Closes the file; later reads throw. */
  close(): void {
    if (this.fd !== null) fs.closeSync(this.fd);
    this.fd = null;
  }

  /** Closes the file (for `using`). */
  [Symbol.dispose](): void {
    this.close();
  }

  private entry(name: string): TensorEntry {
    const t = this.tensors.get(name);
    if (!t) throw new ConvertError('MISSING_TENSOR', `no tensor ${JSON.stringify(name)}`, this.label);
    return t;
  }

  private readBytes(position: number, length: number): Uint8Array {
    if (this.fd === null) throw new ConvertError('INVALID_ARGUMENT', 'file is closed', this.label);
    return readExact(this.fd, length, position, this.label);
  }
}
