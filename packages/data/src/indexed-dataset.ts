// Megatron-LM's mmap indexed dataset (`.idx` + `.bin`), read and written in pure TypeScript.
//
// Layout of the `.idx` (all little-endian): 9-byte magic `MMIDIDX\0\0`, u64 version = 1, u8 dtype
// code, u64 sequence count N, u64 document count D (documents + 1), then int32[N] sequence lengths,
// int64[N] byte pointers into the `.bin`, int64[D] document indices and, for multimodal datasets
// only, int8[N] sequence modes. The `.bin` is the raw concatenation of the token arrays.
//
// The arrays start at byte 34, which is neither 4- nor 8-aligned, so everything in the `.idx` goes
// through a DataView: a typed array cannot be constructed at such an offset.
import fs from 'node:fs';
import { DataError } from './errors.js';
import type { LowLevelDataset } from './types.js';

/** Token dtypes of a Megatron indexed dataset. */
export type IndexedDtypeName =
  | 'uint8'
  | 'int8'
  | 'int16'
  | 'int32'
  | 'int64'
  | 'float64'
  | 'float32'
  | 'uint16';

/** A token dtype: Megatron's numeric code, its numpy name and its size in bytes. */
export interface IndexedDtype {
  readonly code: number;
  readonly name: IndexedDtypeName;
  readonly itemSize: number;
}

interface DtypeCodec extends IndexedDtype {
  /** Smallest and largest storable integer token (floats store every int32 exactly). */
  readonly min: number;
  readonly max: number;
  read(view: DataView, byteOffset: number): number;
  write(view: DataView, byteOffset: number, value: number): void;
}

const INT32_MIN = -2147483648;
const INT32_MAX = 2147483647;

// Codes from Megatron's DType enum; these are on disk and must never change.
const CODECS: readonly DtypeCodec[] = [
  {
    code: 1,
    name: 'uint8',
    itemSize: 1,
    min: 0,
    max: 255,
    read: (v, o) => v.getUint8(o),
    write: (v, o, x) => v.setUint8(o, x),
  },
  {
    code: 2,
    name: 'int8',
    itemSize: 1,
    min: -128,
    max: 127,
    read: (v, o) => v.getInt8(o),
    write: (v, o, x) => v.setInt8(o, x),
  },
  {
    code: 3,
    name: 'int16',
    itemSize: 2,
    min: -32768,
    max: 32767,
    read: (v, o) => v.getInt16(o, true),
    write: (v, o, x) => v.setInt16(o, x, true),
  },
  {
    code: 4,
    name: 'int32',
    itemSize: 4,
    min: INT32_MIN,
    max: INT32_MAX,
    read: (v, o) => v.getInt32(o, true),
    write: (v, o, x) => v.setInt32(o, x, true),
  },
  {
    code: 5,
    name: 'int64',
    itemSize: 8,
    min: Number.MIN_SAFE_INTEGER,
    max: Number.MAX_SAFE_INTEGER,
    // Values beyond 2^53 become inexact here, but they are rejected anyway as not fitting int32.
    read: (v, o) => Number(v.getBigInt64(o, true)),
    write: (v, o, x) => v.setBigInt64(o, BigInt(x), true),
  },
  {
    code: 6,
    name: 'float64',
    itemSize: 8,
    min: Number.MIN_SAFE_INTEGER,
    max: Number.MAX_SAFE_INTEGER,
    read: (v, o) => v.getFloat64(o, true),
    write: (v, o, x) => v.setFloat64(o, x, true),
  },
  {
    code: 7,
    name: 'float32',
    itemSize: 4,
    // float32 holds integers exactly only up to 2^24.
    min: -16777216,
    max: 16777216,
    read: (v, o) => v.getFloat32(o, true),
    write: (v, o, x) => v.setFloat32(o, x, true),
  },
  {
    code: 8,
    name: 'uint16',
    itemSize: 2,
    min: 0,
    max: 65535,
    read: (v, o) => v.getUint16(o, true),
    write: (v, o, x) => v.setUint16(o, x, true),
  },
];

const MAGIC = Uint8Array.from([0x4d, 0x4d, 0x49, 0x44, 0x49, 0x44, 0x58, 0x00, 0x00]);
const HEADER_BYTES = 34;
const VERSION = 1n;

function codecByName(name: string): DtypeCodec {
  const codec = CODECS.find((c) => c.name === name);
  if (!codec) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `unknown indexed dataset dtype '${name}' (expected one of ${CODECS.map((c) => c.name).join(', ')})`,
    );
  }
  return codec;
}

function publicDtype(codec: DtypeCodec): IndexedDtype {
  return { code: codec.code, name: codec.name, itemSize: codec.itemSize };
}

/** Throws MISSING_FILE naming `file` when it does not exist; returns its size. */
function fileSize(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new DataError('MISSING_FILE', 'file does not exist', file);
    }
    throw err;
  }
}

/** Reads exactly `length` bytes at `position`, looping because readSync may return short counts. */
function readExactly(fd: number, file: string, target: Uint8Array, position: number): void {
  let done = 0;
  while (done < target.length) {
    const n = fs.readSync(fd, target, done, target.length - done, position + done);
    if (n === 0) {
      throw new DataError('TRUNCATED_FILE', `unexpected end of file at byte ${position + done}`, file);
    }
    done += n;
  }
}

/** Reads an on-disk u64/i64 as a JS number, rejecting values a double cannot hold exactly. */
function safeInt64(view: DataView, offset: number, what: string, file: string): number {
  const value = view.getBigInt64(offset, true);
  if (value < BigInt(Number.MIN_SAFE_INTEGER) || value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new DataError('CORRUPT_FILE', `${what} ${value} is out of range`, file);
  }
  return Number(value);
}

/** A Megatron `.idx`/`.bin` dataset: the index is read whole, tokens are read from disk on demand. */
export class IndexedDataset implements LowLevelDataset {
  /** The token dtype of the `.bin`. */
  readonly dtype: IndexedDtype;
  /** Tokens per sequence. */
  readonly sequenceLengths: Int32Array;
  /** Byte offset of every sequence in the `.bin`. */
  readonly sequencePointers: Float64Array;
  /** Document boundaries as sequence indices: [0, ..., N]. */
  readonly documentIndices: Float64Array;
  /** Per-sequence modes (multimodal datasets only). */
  readonly sequenceModes: Int8Array | undefined;
  /** Total number of tokens in the `.bin`. */
  readonly numTokens: number;
  private readonly codec: DtypeCodec;
  private readonly binPath: string;
  private fd: number | undefined;

  private constructor(
    readonly pathPrefix: string,
    codec: DtypeCodec,
    lengths: Int32Array,
    pointers: Float64Array,
    documents: Float64Array,
    modes: Int8Array | undefined,
    numTokens: number,
    fd: number,
  ) {
    this.codec = codec;
    this.dtype = publicDtype(codec);
    this.sequenceLengths = lengths;
    this.sequencePointers = pointers;
    this.documentIndices = documents;
    this.sequenceModes = modes;
    this.numTokens = numTokens;
    this.binPath = `${pathPrefix}.bin`;
    this.fd = fd;
  }

  /** Opens `<prefix>.idx` and `<prefix>.bin`, validating the index against the token file. */
  static open(pathPrefix: string): IndexedDataset {
    const idxPath = `${pathPrefix}.idx`;
    const binPath = `${pathPrefix}.bin`;
    fileSize(idxPath);
    const binSize = fileSize(binPath);
    const idx = fs.readFileSync(idxPath);
    const view = new DataView(idx.buffer, idx.byteOffset, idx.byteLength);

    if (idx.length < HEADER_BYTES) {
      throw new DataError(
        'TRUNCATED_FILE',
        `index is ${idx.length} bytes, shorter than the ${HEADER_BYTES}-byte header`,
        idxPath,
      );
    }
    for (let i = 0; i < MAGIC.length; i++) {
      if (idx[i] !== MAGIC[i]) {
        throw new DataError('CORRUPT_FILE', 'bad magic (not a Megatron MMIDIDX index)', idxPath);
      }
    }
    const version = view.getBigUint64(9, true);
    if (version !== VERSION) {
      throw new DataError('CORRUPT_FILE', `unsupported index version ${version} (expected 1)`, idxPath);
    }
    const code = view.getUint8(17);
    const codec = CODECS.find((c) => c.code === code);
    if (!codec) throw new DataError('CORRUPT_FILE', `unknown dtype code ${code}`, idxPath);

    const rawSeq = view.getBigUint64(18, true);
    const rawDoc = view.getBigUint64(26, true);
    // Compare in bigint so absurd counts cannot overflow into a plausible size.
    const needed = BigInt(HEADER_BYTES) + 12n * rawSeq + 8n * rawDoc;
    if (needed > BigInt(idx.length)) {
      throw new DataError(
        'TRUNCATED_FILE',
        `index is ${idx.length} bytes but ${rawSeq} sequences and ${rawDoc} document indices need ${needed}`,
        idxPath,
      );
    }
    const n = Number(rawSeq);
    const d = Number(rawDoc);
    if (d < 1)
      throw new DataError('CORRUPT_FILE', 'document count is 0 (must include the leading 0)', idxPath);
    // Nothing in the header says whether sequence modes follow, so the file size decides.
    const base = Number(needed);
    let modes: Int8Array | undefined;
    if (idx.length === base + n && n > 0) {
      modes = new Int8Array(idx.buffer.slice(idx.byteOffset + base, idx.byteOffset + base + n));
    } else if (idx.length !== base) {
      throw new DataError(
        'CORRUPT_FILE',
        `index is ${idx.length} bytes; expected ${base} (or ${base + n} with sequence modes)`,
        idxPath,
      );
    }

    const lengths = new Int32Array(n);
    const pointers = new Float64Array(n);
    const pointerBase = HEADER_BYTES + 4 * n;
    let expectedPointer = 0;
    for (let i = 0; i < n; i++) {
      const len = view.getInt32(HEADER_BYTES + 4 * i, true);
      if (len < 0) throw new DataError('CORRUPT_FILE', `sequence ${i} has negative length ${len}`, idxPath);
      const ptr = safeInt64(view, pointerBase + 8 * i, `pointer of sequence ${i}`, idxPath);
      if (ptr !== expectedPointer) {
        throw new DataError(
          'CORRUPT_FILE',
          `sequence ${i} pointer is ${ptr} but the preceding lengths put it at byte ${expectedPointer}`,
          idxPath,
        );
      }
      lengths[i] = len;
      pointers[i] = ptr;
      expectedPointer += len * codec.itemSize;
    }

    const documents = new Float64Array(d);
    const docBase = HEADER_BYTES + 12 * n;
    for (let i = 0; i < d; i++) {
      const value = safeInt64(view, docBase + 8 * i, `document index ${i}`, idxPath);
      if (i === 0 && value !== 0) {
        throw new DataError('CORRUPT_FILE', `document_indices[0] is ${value} (must be 0)`, idxPath);
      }
      if (i > 0 && value < documents[i - 1]) {
        throw new DataError(
          'CORRUPT_FILE',
          `document_indices decrease at ${i} (${documents[i - 1]} then ${value})`,
          idxPath,
        );
      }
      documents[i] = value;
    }
    if (documents[d - 1] !== n) {
      throw new DataError(
        'CORRUPT_FILE',
        `last document index is ${documents[d - 1]} but there are ${n} sequences`,
        idxPath,
      );
    }

    if (binSize !== expectedPointer) {
      throw new DataError(
        binSize < expectedPointer ? 'TRUNCATED_FILE' : 'CORRUPT_FILE',
        `token file is ${binSize} bytes but the index describes ${expectedPointer / codec.itemSize} ` +
          `${codec.name} tokens (${expectedPointer} bytes)`,
        binPath,
      );
    }
    const fd = fs.openSync(binPath, 'r');
    return new IndexedDataset(
      pathPrefix,
      codec,
      lengths,
      pointers,
      documents,
      modes,
      expectedPointer / codec.itemSize,
      fd,
    );
  }

  /** Number of sequences. */
  get length(): number {
    return this.sequenceLengths.length;
  }

  /** Number of documents (one less than `documentIndices.length`). */
  get numDocuments(): number {
    return this.documentIndices.length - 1;
  }

  /** `length` tokens (default: to the end) of sequence `index` from token `offset`, as int32. */
  get(index: number, offset = 0, length?: number): Int32Array {
    if (!Number.isInteger(index) || index < 0 || index >= this.length) {
      throw new DataError(
        'INDEX_OUT_OF_RANGE',
        `sequence ${index} out of range [0, ${this.length})`,
        this.binPath,
      );
    }
    const seqLength = this.sequenceLengths[index];
    const count = length ?? seqLength - offset;
    if (
      !Number.isInteger(offset) ||
      !Number.isInteger(count) ||
      offset < 0 ||
      count < 0 ||
      offset + count > seqLength
    ) {
      throw new DataError(
        'INDEX_OUT_OF_RANGE',
        `tokens [${offset}, ${offset + count}) out of range for sequence ${index} of length ${seqLength}`,
        this.binPath,
      );
    }
    return this.readTokens(this.sequencePointers[index] + offset * this.codec.itemSize, count);
  }

  /** All tokens of document `docIndex` (its sequences concatenated), as int32. */
  getDocument(docIndex: number): Int32Array {
    if (!Number.isInteger(docIndex) || docIndex < 0 || docIndex >= this.numDocuments) {
      throw new DataError(
        'INDEX_OUT_OF_RANGE',
        `document ${docIndex} out of range [0, ${this.numDocuments})`,
        this.binPath,
      );
    }
    const first = this.documentIndices[docIndex];
    const end = this.documentIndices[docIndex + 1];
    if (first === end) return new Int32Array(0);
    // A document's sequences are contiguous in the .bin, so one read covers them all.
    let count = 0;
    for (let s = first; s < end; s++) count += this.sequenceLengths[s];
    return this.readTokens(this.sequencePointers[first], count);
  }

  /** Closes the `.bin` file descriptor; later reads throw. */
  close(): void {
    if (this.fd !== undefined) {
      fs.closeSync(this.fd);
      this.fd = undefined;
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }

  private readTokens(bytePosition: number, count: number): Int32Array {
    if (this.fd === undefined) {
      throw new DataError('INVALID_ARGUMENT', 'dataset is closed', this.binPath);
    }
    const out = new Int32Array(count);
    if (count === 0) return out;
    const itemSize = this.codec.itemSize;
    const bytes = new Uint8Array(count * itemSize);
    readExactly(this.fd, this.binPath, bytes, bytePosition);
    const view = new DataView(bytes.buffer);
    for (let i = 0; i < count; i++) {
      const value = this.codec.read(view, i * itemSize);
      // int64 and float tokens may hold values an int32 cannot; refuse rather than wrap silently.
      if (!Number.isInteger(value) || value < INT32_MIN || value > INT32_MAX) {
        throw new DataError(
          'UNSUPPORTED',
          `token ${value} at byte ${bytePosition + i * itemSize} does not fit in int32`,
          this.binPath,
        );
      }
      out[i] = value;
    }
    return out;
  }
}

/** Options of IndexedDatasetBuilder. */
export interface IndexedDatasetBuilderOptions {
  /** Token dtype of the `.bin` (Megatron's default is int32). */
  dtype?: IndexedDtypeName;
  /** Write per-sequence modes after the document indices (Megatron's `multimodal=True`). */
  multimodal?: boolean;
  /** Size of the write buffer for the `.bin`, in bytes. */
  bufferBytes?: number;
}

/** Writes a Megatron `.idx`/`.bin` pair, streaming tokens to disk; files appear only on finalize(). */
export class IndexedDatasetBuilder {
  /** The token dtype being written. */
  readonly dtype: IndexedDtype;
  private readonly codec: DtypeCodec;
  private readonly multimodal: boolean;
  private readonly binTmp: string;
  private readonly idxTmp: string;
  private fd: number | undefined;
  private readonly buffer: Uint8Array;
  private readonly view: DataView;
  private used = 0;
  private readonly lengths: number[] = [];
  private readonly modes: number[] = [];
  private readonly documents: number[] = [0];
  private state: 'open' | 'finalized' | 'aborted' = 'open';

  /** Chooses the dtype Megatron's preprocessing would: uint16 below 65500 tokens, else int32. */
  static optimalDtype(vocabSize: number): IndexedDtypeName {
    return vocabSize < 65500 ? 'uint16' : 'int32';
  }

  constructor(
    readonly pathPrefix: string,
    options: IndexedDatasetBuilderOptions = {},
  ) {
    this.codec = codecByName(options.dtype ?? 'int32');
    this.dtype = publicDtype(this.codec);
    this.multimodal = options.multimodal ?? false;
    // Temporary names carry the pid so concurrent writers of one prefix do not clobber each other.
    this.binTmp = `${pathPrefix}.bin.tmp-${process.pid}`;
    this.idxTmp = `${pathPrefix}.idx.tmp-${process.pid}`;
    const size = Math.max(options.bufferBytes ?? 1 << 20, 8);
    this.buffer = new Uint8Array(size);
    this.view = new DataView(this.buffer.buffer);
    try {
      this.fd = fs.openSync(this.binTmp, 'w');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new DataError(
        code === 'ENOENT' ? 'MISSING_FILE' : 'INVALID_ARGUMENT',
        `cannot create the temporary token file (${code ?? String(err)})`,
        this.binTmp,
      );
    }
  }

  /** Appends one sequence to the current document. */
  addItem(tokens: ArrayLike<number>, mode = 0): void {
    this.writeTokens(tokens);
    this.lengths.push(tokens.length);
    if (this.multimodal) this.modes.push(mode);
  }

  /** Closes the current document (its sequences are those added since the previous one). */
  endDocument(): void {
    this.assertOpen();
    this.documents.push(this.lengths.length);
  }

  /** Appends one whole document: `tokens` split into sequences of `lengths` (default: one sequence). */
  addDocument(tokens: ArrayLike<number>, lengths?: ArrayLike<number>, modes?: ArrayLike<number>): void {
    this.assertOpen();
    const seqLengths = lengths ? Array.from(lengths) : [tokens.length];
    let sum = 0;
    for (const len of seqLengths) {
      if (!Number.isInteger(len) || len < 0 || len > INT32_MAX) {
        throw new DataError('INVALID_ARGUMENT', `invalid sequence length ${len}`, this.pathPrefix);
      }
      sum += len;
    }
    if (sum !== tokens.length) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `sequence lengths sum to ${sum} but the document has ${tokens.length} tokens`,
        this.pathPrefix,
      );
    }
    if (modes && modes.length !== seqLengths.length) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `${modes.length} modes for ${seqLengths.length} sequences`,
        this.pathPrefix,
      );
    }
    this.writeTokens(tokens);
    this.lengths.push(...seqLengths);
    if (this.multimodal) {
      for (let i = 0; i < seqLengths.length; i++) this.modes.push(modes ? modes[i] : 0);
    }
    this.documents.push(this.lengths.length);
  }

  /** Appends every document of an existing dataset (Megatron's `add_index`), copying its `.bin` in chunks. */
  addIndex(pathPrefix: string): void {
    this.assertOpen();
    this.assertNoOpenDocument();
    const source = IndexedDataset.open(pathPrefix);
    try {
      if (source.dtype.name !== this.codec.name) {
        throw new DataError(
          'INVALID_ARGUMENT',
          `dtype ${source.dtype.name} of ${pathPrefix} differs from ${this.codec.name} being written`,
          this.pathPrefix,
        );
      }
      if ((source.sequenceModes !== undefined) !== this.multimodal && source.length > 0) {
        throw new DataError(
          'INVALID_ARGUMENT',
          `${pathPrefix} is ${this.multimodal ? 'not ' : ''}multimodal, unlike the dataset being written`,
          this.pathPrefix,
        );
      }
      this.copyBytes(`${pathPrefix}.bin`, source.numTokens * source.dtype.itemSize);
      const offset = this.lengths.length;
      for (const len of source.sequenceLengths) this.lengths.push(len);
      if (this.multimodal) {
        for (let i = 0; i < source.length; i++) this.modes.push(source.sequenceModes?.[i] ?? 0);
      }
      for (let i = 1; i < source.documentIndices.length; i++) {
        this.documents.push(offset + source.documentIndices[i]);
      }
    } finally {
      source.close();
    }
  }

  /** Writes the `.idx` and renames both files into place, the `.idx` last. */
  finalize(): void {
    this.assertOpen();
    // Sequences added after the last endDocument() would make document_indices[-1] != N, which
    // readers reject, so they form a final document.
    if (this.documents[this.documents.length - 1] !== this.lengths.length)
      this.documents.push(this.lengths.length);
    this.flush();
    fs.fsyncSync(this.fd!);
    fs.closeSync(this.fd!);
    this.fd = undefined;

    const n = this.lengths.length;
    const d = this.documents.length;
    const idx = new Uint8Array(HEADER_BYTES + 12 * n + 8 * d + (this.multimodal ? n : 0));
    const view = new DataView(idx.buffer);
    idx.set(MAGIC, 0);
    view.setBigUint64(9, VERSION, true);
    view.setUint8(17, this.codec.code);
    view.setBigUint64(18, BigInt(n), true);
    view.setBigUint64(26, BigInt(d), true);
    let pointer = 0;
    for (let i = 0; i < n; i++) {
      view.setInt32(HEADER_BYTES + 4 * i, this.lengths[i], true);
      view.setBigInt64(HEADER_BYTES + 4 * n + 8 * i, BigInt(pointer), true);
      pointer += this.lengths[i] * this.codec.itemSize;
    }
    for (let i = 0; i < d; i++)
      view.setBigInt64(HEADER_BYTES + 12 * n + 8 * i, BigInt(this.documents[i]), true);
    if (this.multimodal) {
      for (let i = 0; i < n; i++) view.setInt8(HEADER_BYTES + 12 * n + 8 * d + i, this.modes[i]);
    }
    const idxFd = fs.openSync(this.idxTmp, 'w');
    try {
      fs.writeSync(idxFd, idx);
      fs.fsyncSync(idxFd);
    } finally {
      fs.closeSync(idxFd);
    }
    // Drop any old .idx first so a stale index never pairs with the new .bin between the renames.
    fs.rmSync(`${this.pathPrefix}.idx`, { force: true });
    fs.renameSync(this.binTmp, `${this.pathPrefix}.bin`);
    fs.renameSync(this.idxTmp, `${this.pathPrefix}.idx`);
    this.state = 'finalized';
  }

  /** Discards everything written so far and removes the temporary files. */
  abort(): void {
    if (this.state !== 'open') return;
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
    fs.rmSync(this.binTmp, { force: true });
    fs.rmSync(this.idxTmp, { force: true });
    this.state = 'aborted';
  }

  private assertOpen(): void {
    if (this.state !== 'open') {
      throw new DataError('INVALID_ARGUMENT', `builder is already ${this.state}`, this.pathPrefix);
    }
  }

  private assertNoOpenDocument(): void {
    if (this.documents[this.documents.length - 1] !== this.lengths.length) {
      throw new DataError(
        'INVALID_ARGUMENT',
        'call endDocument() before adding another index',
        this.pathPrefix,
      );
    }
  }

  private writeTokens(tokens: ArrayLike<number>): void {
    this.assertOpen();
    const { codec } = this;
    // Validate the whole sequence first so a bad token leaves nothing half-written.
    for (let i = 0; i < tokens.length; i++) {
      const t = tokens[i];
      const isInt = Number.isInteger(t);
      const floatOk = codec.name.startsWith('float') && Number.isFinite(t);
      if (!(isInt || floatOk) || t < codec.min || t > codec.max) {
        throw new DataError(
          'INVALID_ARGUMENT',
          `token ${t} at position ${i} does not fit dtype ${codec.name} [${codec.min}, ${codec.max}]`,
          this.pathPrefix,
        );
      }
    }
    const itemSize = codec.itemSize;
    for (let i = 0; i < tokens.length; i++) {
      if (this.used + itemSize > this.buffer.length) this.flush();
      codec.write(this.view, this.used, tokens[i]);
      this.used += itemSize;
    }
  }

  private flush(): void {
    let done = 0;
    while (done < this.used) done += fs.writeSync(this.fd!, this.buffer, done, this.used - done);
    this.used = 0;
  }

  /** Streams `byteCount` bytes of `file` onto the end of the `.bin` being written. */
  private copyBytes(file: string, byteCount: number): void {
    this.flush();
    const fd = fs.openSync(file, 'r');
    try {
      const chunk = this.buffer;
      for (let position = 0; position < byteCount; ) {
        const n = Math.min(chunk.length, byteCount - position);
        readExactly(fd, file, chunk.subarray(0, n), position);
        let written = 0;
        while (written < n) written += fs.writeSync(this.fd!, chunk, written, n - written);
        position += n;
      }
    } finally {
      fs.closeSync(fd);
    }
  }
}

/** Concatenates the sequences and documents of several datasets into one (Megatron's merge_datasets.py). */
export function mergeIndexedDatasets(outputPrefix: string, inputPrefixes: readonly string[]): void {
  if (inputPrefixes.length === 0) {
    throw new DataError('INVALID_ARGUMENT', 'no input datasets to merge', outputPrefix);
  }
  // Peek at every input before writing anything so a dtype mismatch fails without leftovers.
  let first: { prefix: string; dtype: IndexedDtypeName; multimodal: boolean } | undefined;
  for (const prefix of inputPrefixes) {
    const ds = IndexedDataset.open(prefix);
    const info = { prefix, dtype: ds.dtype.name, multimodal: ds.sequenceModes !== undefined };
    ds.close();
    if (!first) first = info;
    else if (info.dtype !== first.dtype) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `cannot merge datasets of different dtypes: ${first.prefix} is ${first.dtype}, ${prefix} is ${info.dtype}`,
        outputPrefix,
      );
    }
  }
  const builder = new IndexedDatasetBuilder(outputPrefix, {
    dtype: first!.dtype,
    multimodal: first!.multimodal,
  });
  try {
    for (const prefix of inputPrefixes) builder.addIndex(prefix);
    builder.finalize();
  } catch (err) {
    builder.abort();
    throw err;
  }
}
