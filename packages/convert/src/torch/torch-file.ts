// torch.save files (the zip format of PyTorch >= 1.6, e.g. Megatron-LM's model_optim_rng.pt):
// `<archive>/data.pkl` pickles the saved object with each storage as a persistent id
// ('storage', torch.<X>Storage, key, location, numel), and `<archive>/data/<key>` holds that
// storage's raw little-endian bytes.
import fs from 'node:fs';
import { ConvertError, type ConvertErrorCode } from '../errors.js';
import { DTYPE_SIZE, numelOf, type SafetensorsDtype } from '../safetensors/dtype.js';
import { readExact } from '../safetensors/file.js';
import { PyGlobal, PyObject, PyTuple, pickle, unpickle } from './pickle.js';
import { entryDataOffset, readZipDirectory, ZipWriter } from './zip.js';

/**
 * Element type of a torch tensor, as a safetensors dtype. The writer takes those with a typed
 * torch storage (F32, BF16, F16, F64, I64, I32, I16, I8, U8, BOOL), which every torch >= 1.6
 * reads; the reader also gives C64, and U16 / U32 / U64 / F8 of torch >= 2.3 files.
 */
export type TorchDtype = SafetensorsDtype;

// Each dtype's typed storage (the persistent id of _rebuild_tensor_v2) and torch.<name> (the dtype
// argument of _rebuild_tensor_v3, which torch >= 2.3 writes over an UntypedStorage for dtypes
// that have no typed storage: unsigned and float8 ones).
const TORCH_DTYPES: [SafetensorsDtype, string | null, string][] = [
  ['F32', 'FloatStorage', 'float32'],
  ['BF16', 'BFloat16Storage', 'bfloat16'],
  ['F16', 'HalfStorage', 'float16'],
  ['F64', 'DoubleStorage', 'float64'],
  ['I64', 'LongStorage', 'int64'],
  ['I32', 'IntStorage', 'int32'],
  ['I16', 'ShortStorage', 'int16'],
  ['I8', 'CharStorage', 'int8'],
  ['U8', 'ByteStorage', 'uint8'],
  ['BOOL', 'BoolStorage', 'bool'],
  ['C64', 'ComplexFloatStorage', 'complex64'],
  ['U16', null, 'uint16'],
  ['U32', null, 'uint32'],
  ['U64', null, 'uint64'],
  ['F8_E5M2', null, 'float8_e5m2'],
  ['F8_E4M3', null, 'float8_e4m3fn'],
  ['F8_E8M0', null, 'float8_e8m0fnu'],
];
const DTYPE_OF_STORAGE = new Map(TORCH_DTYPES.map(([d, s]) => [s, d]));
const DTYPE_OF_NAME = new Map(TORCH_DTYPES.map(([d, , n]) => [n, d]));

/** The dtype of `torch.<name>` (`bfloat16` → BF16), or undefined for one the reader does not map. */
export function torchDtypeOf(name: string): TorchDtype | undefined {
  return DTYPE_OF_NAME.get(name);
}
/** Typed storages of the dtypes the writer takes: those every torch >= 1.6 reads. */
const WRITTEN = new Map(TORCH_DTYPES.filter(([d, s]) => s && d !== 'C64').map(([d, s]) => [d, s as string]));
// The first bytes of a pre-1.6 torch.save file: PROTO 2, then LONG1 of torch's magic number.
const LEGACY_MAGIC = [0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const ARCHIVE = 'archive';

/** A tensor in a torch file: where its bytes live, not the bytes. */
export class TorchTensor {
  constructor(
    readonly dtype: SafetensorsDtype,
    readonly shape: number[],
    /** Elements between neighbours along each dimension. */
    readonly stride: number[],
    /** Offset of element [0, ..., 0] in the storage, in elements. */
    readonly storageOffset: number,
    readonly storageKey: string,
    /** Elements in the whole storage, which other tensors may share. */
    readonly storageNumel: number,
    readonly requiresGrad: boolean,
  ) {}

  /** Number of elements (1 for a 0-d tensor). */
  get numel(): number {
    return numelOf(this.shape);
  }

  /** Whether it is contiguous row-major (strides of size-1 dimensions do not matter, as in torch). */
  get contiguous(): boolean {
    if (this.numel === 0) return true;
    let expected = 1;
    for (let d = this.shape.length - 1; d >= 0; d--) {
      if (this.shape[d] !== 1 && this.stride[d] !== expected) return false;
      expected *= this.shape[d];
    }
    return true;
  }
}

/** Index of the last storage element the tensor touches, plus one (its offset when empty). */
function extentOf(t: TorchTensor): number {
  if (t.numel === 0) return t.storageOffset;
  return t.shape.reduce((end, n, d) => end + (n - 1) * t.stride[d], t.storageOffset + 1);
}

/** A persistent id of data.pkl, once loaded. */
class Storage {
  constructor(
    readonly type: string,
    readonly key: string,
    readonly numel: number,
  ) {}
}

const isCount = (x: unknown): x is number => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;

/** The same tensor with another shape, storage offset or requires_grad. */
const viewOf = (t: TorchTensor, shape: number[], storageOffset: number, requiresGrad: boolean) =>
  new TorchTensor(t.dtype, shape, t.stride, storageOffset, t.storageKey, t.storageNumel, requiresGrad);

/** The globals of torch's tensor pickling, building TorchTensors (collected in `made`) and checking their arguments. */
function tensorClasses(file: string, made: TorchTensor[]): Record<string, (...args: unknown[]) => unknown> {
  const fail = (code: 'CORRUPT_FILE' | 'UNSUPPORTED', message: string) =>
    new ConvertError(code, `data.pkl: ${message}`, file);
  const tensor = (
    storage: unknown,
    offset: unknown,
    size: unknown,
    stride: unknown,
    grad: unknown,
    dtypeArg?: unknown,
  ) => {
    if (!(storage instanceof Storage)) throw fail('CORRUPT_FILE', 'a tensor is not built on a storage');
    const where = `the tensor on storage ${JSON.stringify(storage.key)}`;
    let dtype = DTYPE_OF_STORAGE.get(storage.type);
    let numel = storage.numel;
    if (dtypeArg !== undefined) {
      const name = dtypeArg instanceof PyGlobal ? dtypeArg.name : String(dtypeArg);
      dtype = DTYPE_OF_NAME.get(name);
      if (!dtype) throw fail('UNSUPPORTED', `${where} has dtype torch.${name}, which is not supported`);
      if (storage.type === 'UntypedStorage') numel = storage.numel / DTYPE_SIZE[dtype];
    }
    if (!dtype) throw fail('UNSUPPORTED', `${where} is a torch.${storage.type}, which is not supported`);
    const dims = (x: unknown): x is number[] => Array.isArray(x) && x.every(isCount);
    if (!dims(size) || !dims(stride) || size.length !== stride.length || !isCount(offset)) {
      throw fail('CORRUPT_FILE', `${where} has size ${size}, stride ${stride}, offset ${offset}`);
    }
    const t = new TorchTensor(dtype, [...size], [...stride], offset, storage.key, numel, grad === true);
    if (!isCount(numel) || extentOf(t) > numel) {
      throw fail('CORRUPT_FILE', `${where} reaches element ${extentOf(t)} of a ${numel}-element storage`);
    }
    made.push(t);
    return t;
  };
  const parameter = (t: unknown, grad: unknown) => {
    if (!(t instanceof TorchTensor)) throw fail('CORRUPT_FILE', 'a Parameter does not hold a tensor');
    return viewOf(t, t.shape, t.storageOffset, grad === true);
  };
  return {
    'torch._utils._rebuild_tensor_v2': (s, offset, size, stride, grad) =>
      tensor(s, offset, size, stride, grad),
    'torch._utils._rebuild_tensor_v3': (s, offset, size, stride, grad, _hooks, dtype) =>
      tensor(s, offset, size, stride, grad, dtype),
    'torch._utils._rebuild_parameter': parameter,
    'torch._utils._rebuild_parameter_with_state': parameter,
    // A tensor subclass or a tensor with Python attributes: the tensor is func(*args).
    'torch._tensor._rebuild_from_type_v2': (fn, type, args, state) =>
      typeof fn === 'function' && Array.isArray(args)
        ? fn(...args)
        : new PyObject('torch._tensor', '_rebuild_from_type_v2', [fn, type, args, state]),
  };
}

/** An open torch.save file: data.pkl is unpickled on open, tensor bytes are read on demand. */
export class TorchFile {
  private fd: number | null;

  private constructor(
    readonly file: string,
    /** The unpickled object, tensors as {@link TorchTensor}. */
    readonly root: unknown,
    fd: number,
    private readonly records: ReadonlyMap<string, { offset: number; size: number }>,
    private readonly ownsFd: boolean,
  ) {
    this.fd = fd;
  }

  /**
   * Opens the zip, reads the central directory and unpickles data.pkl (tensors as TorchTensor, no
   * tensor bytes read). Checks that every storage record exists and fits its tensors.
   */
  static open(file: string): TorchFile {
    let fd: number;
    try {
      fd = fs.openSync(file, 'r');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT')
        throw new ConvertError('MISSING_FILE', 'no such file', file);
      throw new ConvertError('INVALID_ARGUMENT', `cannot open (${(e as Error).message})`, file);
    }
    try {
      return TorchFile.load(fd, 0, fs.fstatSync(fd).size, file, true);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /**
   * A torch.save file stored as bytes [offset, offset + length) of the file open as `fd` (as a
   * PyTorch distributed checkpoint stores each tensor). The caller keeps `fd`: closing the
   * returned TorchFile leaves it open.
   */
  static openRegion(fd: number, offset: number, length: number, file: string): TorchFile {
    return TorchFile.load(fd, offset, length, file, false);
  }

  private static load(fd: number, base: number, size: number, file: string, ownsFd: boolean): TorchFile {
    const fail = (code: ConvertErrorCode, message: string) => new ConvertError(code, message, file);
    const head = readExact(fd, Math.min(size, 14), base, file);
    if (head[0] === 0x80 && LEGACY_MAGIC.every((b, i) => head[i + 2] === b)) {
      throw fail(
        'UNSUPPORTED',
        'is in the legacy (pre-1.6) torch.save format, which is not read: ' +
          're-save it with PyTorch >= 1.6, e.g. torch.save(torch.load(path), path)',
      );
    }
    const entries = readZipDirectory(fd, size, file, base);
    // Like torch, take the archive folder from the first entry; torch.save names it after the file.
    const slash = entries[0]?.name.indexOf('/') ?? -1;
    if (slash < 0) throw fail('INVALID_FORMAT', 'is a zip without a top folder: not a torch.save file');
    const prefix = entries[0].name.slice(0, slash + 1);
    const byName = new Map(entries.map((e) => [e.name, e]));
    if (byName.has(`${prefix}constants.pkl`)) {
      throw fail('UNSUPPORTED', 'is a TorchScript archive (torch.jit.save), not a torch.save file');
    }
    const locate = (name: string) => {
      const e = byName.get(prefix + name);
      if (!e) return undefined;
      if (e.method !== 0) {
        throw fail(
          'UNSUPPORTED',
          `zip entry ${e.name} is compressed (method ${e.method}), but torch.save stores entries: re-save the file with torch.save`,
        );
      }
      const offset = entryDataOffset(fd, e, file, base);
      if (offset + e.size > size)
        throw fail('TRUNCATED_FILE', `zip entry ${e.name} runs past the end of the file`);
      return { offset: base + offset, size: e.size };
    };
    const pkl = locate('data.pkl');
    if (!pkl) throw fail('INVALID_FORMAT', `has no ${prefix}data.pkl: not a torch.save file`);

    const storages = new Map<string, Storage>();
    const tensors: TorchTensor[] = [];
    const classes = tensorClasses(file, tensors);
    let root: unknown;
    try {
      root = unpickle(readExact(fd, pkl.size, pkl.offset, file), {
        findClass: (module, name) => classes[`${module}.${name}`],
        persistentLoad: (pid) => {
          const [kind, type, id, , numel] = Array.isArray(pid) ? pid : [];
          const key = typeof id === 'number' ? String(id) : id; // torch < 1.9 wrote numbers as keys
          if (
            kind !== 'storage' ||
            !(type instanceof PyGlobal) ||
            !isCount(numel) ||
            typeof key !== 'string'
          ) {
            throw fail('CORRUPT_FILE', `data.pkl: unknown persistent id ${String(pid)}`);
          }
          if (!storages.has(key)) storages.set(key, new Storage(type.name, key, numel));
          return storages.get(key);
        },
      });
    } catch (e) {
      if (e instanceof ConvertError && !e.file) throw fail(e.code, `data.pkl: ${e.message}`);
      throw e;
    }

    const records = new Map<string, { offset: number; size: number }>();
    for (const t of tensors) {
      if (records.has(t.storageKey)) continue;
      const name = `data/${t.storageKey}`;
      const record = locate(name);
      if (!record) throw fail('CORRUPT_FILE', `has no record ${prefix}${name} for a tensor's storage`);
      const bytes = t.storageNumel * DTYPE_SIZE[t.dtype];
      if (record.size !== bytes) {
        throw fail('CORRUPT_FILE', `record ${prefix}${name} has ${record.size} bytes, its storage ${bytes}`);
      }
      records.set(t.storageKey, record);
    }
    return new TorchFile(file, root, fd, records, ownsFd);
  }

  /** The tensor's elements in row-major order (strided views gathered), as bytes. */
  read(t: TorchTensor): Uint8Array {
    const size = DTYPE_SIZE[t.dtype];
    const record = this.records.get(t.storageKey);
    if (!record || extentOf(t) * size > record.size) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `tensor on storage ${JSON.stringify(t.storageKey)} is not in this file`,
        this.file,
      );
    }
    if (this.fd === null) throw new ConvertError('INVALID_ARGUMENT', 'file is closed', this.file);
    const begin = record.offset + t.storageOffset * size;
    const span = readExact(this.fd, (extentOf(t) - t.storageOffset) * size, begin, this.file);
    return t.contiguous ? span : gather(span, t.shape, t.stride, size);
  }

  /** Rows [start, start + count) along dim 0 of the tensor, as row-major bytes; a contiguous tensor reads only those bytes. */
  readRows(t: TorchTensor, start: number, count: number): Uint8Array {
    const rows = t.shape[0];
    if (t.shape.length === 0)
      throw new ConvertError('INVALID_ARGUMENT', 'a 0-d tensor has no rows', this.file);
    if (!isCount(start) || !isCount(count) || start + count > rows) {
      const message = `rows [${start}, ${start + count}) are outside a tensor of ${rows} rows`;
      throw new ConvertError('INVALID_ARGUMENT', message, this.file);
    }
    const offset = t.storageOffset + (count === 0 ? 0 : start * t.stride[0]);
    return this.read(viewOf(t, [count, ...t.shape.slice(1)], offset, t.requiresGrad));
  }

  /**
   * The box [offsets, offsets + shape) of the tensor as row-major bytes: one read of the storage
   * span it covers (exactly its bytes when it is a block of whole trailing rows).
   */
  readBox(t: TorchTensor, offsets: readonly number[], shape: readonly number[]): Uint8Array {
    if (
      offsets.length !== t.shape.length ||
      shape.length !== t.shape.length ||
      shape.some((n, d) => !isCount(n) || !isCount(offsets[d]) || offsets[d] + n > t.shape[d])
    ) {
      const message = `box at [${offsets.join(',')}] of shape [${shape.join(',')}] is outside a tensor of shape [${t.shape.join(',')}]`;
      throw new ConvertError('INVALID_ARGUMENT', message, this.file);
    }
    if (numelOf(shape) === 0) return new Uint8Array(0);
    const start = offsets.reduce((s, o, d) => s + o * t.stride[d], t.storageOffset);
    return this.read(viewOf(t, [...shape], start, t.requiresGrad));
  }

  /** Closes the file; later reads throw. */
  close(): void {
    if (this.fd !== null && this.ownsFd) fs.closeSync(this.fd);
    this.fd = null;
  }

  /** Closes the file (for `using`). */
  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * Integer views of `src` and `out` for copying elements of `size` bytes a word at a time, and the
 * words per element (2 for 8-byte elements): null for other sizes. An unaligned `src` is copied
 * to an aligned buffer first.
 */
function wordViews(
  src: Uint8Array,
  out: Uint8Array,
  size: number,
): [Uint16Array | Uint32Array, Uint16Array | Uint32Array, 1 | 2] | null {
  if (size !== 2 && size !== 4 && size !== 8) return null;
  const w = size === 2 ? 2 : 4;
  const s = src.byteOffset % w === 0 && src.byteLength % w === 0 ? src : src.slice();
  const view = (b: Uint8Array) =>
    w === 2
      ? new Uint16Array(b.buffer as ArrayBuffer, b.byteOffset, b.byteLength / 2)
      : new Uint32Array(b.buffer as ArrayBuffer, b.byteOffset, b.byteLength / 4);
  return [view(s), view(out), size === 8 ? 2 : 1];
}

/** Copies the elements of a strided view out of `src` (storage bytes from its first element) in row-major order. */
function gather(
  src: Uint8Array,
  shape: readonly number[],
  stride: readonly number[],
  size: number,
): Uint8Array {
  const out = new Uint8Array(numelOf(shape) * size);
  if (out.byteLength === 0) return out;
  const last = shape.length - 1;
  const words = wordViews(src, out, size);
  const index = new Array<number>(last).fill(0);
  let o = 0;
  for (;;) {
    let base = 0;
    for (let d = 0; d < last; d++) base += index[d] * stride[d];
    if (stride[last] === 1 || shape[last] === 1) {
      // a run of neighbours: one copy
      out.set(src.subarray(base * size, (base + shape[last]) * size), o);
      o += shape[last] * size;
    } else if (words) {
      // whole elements through integer views (2, 4 or 8 bytes: one or two 16/32-bit words each)
      const [from, to, per] = words;
      const step = stride[last] * per;
      let s = base * per;
      let t = o / (size / per);
      for (let i = 0; i < shape[last]; i++, s += step) {
        to[t++] = from[s];
        if (per === 2) to[t++] = from[s + 1];
      }
      o += shape[last] * size;
    } else {
      for (let i = 0; i < shape[last]; i++) {
        const s = (base + i * stride[last]) * size;
        for (let b = 0; b < size; b++) out[o++] = src[s + b];
      }
    }
    let d = last - 1;
    while (d >= 0 && ++index[d] === shape[d]) index[d--] = 0;
    if (d < 0) return out;
  }
}

/** Every TorchTensor inside a value (Maps, arrays, PyObject args and state), with its key path joined by '.'. */
export function torchTensors(value: unknown, prefix = ''): Array<[string, TorchTensor]> {
  const out: Array<[string, TorchTensor]> = [];
  const open = new Set<unknown>(); // guards against cycles, not against sharing
  const walk = (v: unknown, path: string) => {
    if (v instanceof TorchTensor) out.push([path, v]);
    if (typeof v !== 'object' || v === null || open.has(v)) return;
    open.add(v);
    const join = (k: unknown) => (path === '' ? String(k) : `${path}.${String(k)}`);
    if (v instanceof Map) for (const [k, x] of v) walk(x, join(k));
    else if (Array.isArray(v)) for (const [i, x] of v.entries()) walk(x, join(i));
    else if (v instanceof PyObject) {
      for (const [i, x] of v.args.entries()) walk(x, join(i));
      walk(v.state, path);
      walk(v.items, path);
    }
    open.delete(v);
  };
  walk(value, prefix);
  return out;
}

/** The storage of a placeholder, written as a persistent id. */
class StorageRef {
  constructor(
    readonly dtype: TorchDtype,
    readonly key: string,
    readonly numel: number,
  ) {}
}

/** A placeholder for a tensor of a {@link TorchFileWriter}; it pickles as torch._utils._rebuild_tensor_v2(...). */
export class TorchTensorRef extends PyObject {
  readonly dtype: TorchDtype;
  readonly shape: readonly number[];
  /** Its storage's record: `archive/data/<key>`. */
  readonly key: string;
  /** Bytes of its data: numel × itemsize. */
  readonly byteLength: number;

  constructor(dtype: TorchDtype, shape: readonly number[], key: string) {
    const stride = shape.map((_, d) => numelOf(shape.slice(d + 1)));
    const storage = new StorageRef(dtype, key, numelOf(shape));
    const hooks = new PyObject('collections', 'OrderedDict'); // backward hooks: none
    super('torch._utils', '_rebuild_tensor_v2', [
      storage,
      0,
      new PyTuple(shape),
      new PyTuple(stride),
      false,
      hooks,
    ]);
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.key = key;
    this.byteLength = storage.numel * DTYPE_SIZE[dtype];
  }
}

/**
 * Streams a torch.save-compatible file: placeholders first, data.pkl, then each tensor's bytes in
 * order, chunk by chunk. Writes to `${file}.tmp-${process.pid}` and renames on finish(); abort()
 * removes the temporary.
 */
export class TorchFileWriter {
  readonly file: string;
  private readonly tmp: string;
  private fd: number | null;
  private readonly zip: ZipWriter;
  private readonly refs: TorchTensorRef[] = [];
  private rootWritten = false;
  private next = 0; // the tensor being written, or to be written next
  private entryOpen = false;
  private written = 0; // bytes of tensor `next` so far

  constructor(file: string) {
    this.file = file;
    this.tmp = `${file}.tmp-${process.pid}`;
    this.fd = fs.openSync(this.tmp, 'w');
    this.zip = new ZipWriter(this.fd);
  }

  /** A placeholder for a tensor of this dtype and (contiguous) shape; put it anywhere in the root value. */
  tensor(dtype: TorchDtype, shape: readonly number[]): TorchTensorRef {
    this.check(!this.rootWritten, 'tensor() after writeRoot()');
    if (!WRITTEN.has(dtype)) {
      throw this.fail(
        'INVALID_ARGUMENT',
        `dtype ${dtype} is not written: only ${[...WRITTEN.keys()].join(', ')}`,
      );
    }
    if (!Array.isArray(shape) || !shape.every(isCount)) {
      throw this.fail('INVALID_ARGUMENT', `shape ${JSON.stringify(shape)} is invalid`);
    }
    const ref = new TorchTensorRef(dtype, shape, String(this.refs.length));
    this.refs.push(ref);
    return ref;
  }

  /** Writes data.pkl (the root value, placeholders as tensors). Call once, before any data. */
  writeRoot(root: unknown): void {
    this.check(!this.rootWritten, 'writeRoot() called twice');
    const seen = new Set<string>();
    const data = pickle(root, {
      persistentId: (v) => {
        if (!(v instanceof StorageRef)) return undefined;
        seen.add(v.key);
        return new PyTuple(['storage', new PyGlobal('torch', WRITTEN.get(v.dtype)!), v.key, 'cpu', v.numel]);
      },
    });
    const lost = this.refs.find((r) => !seen.has(r.key));
    if (lost) {
      throw this.fail(
        'INVALID_ARGUMENT',
        `placeholder ${lost.key} (${lost.dtype} [${lost.shape}]) is not in the root value`,
      );
    }
    this.zip.add(`${ARCHIVE}/data.pkl`, data);
    this.rootWritten = true;
  }

  /**
   * Appends bytes of ref's storage. Tensors are written one after another in the order their
   * placeholders were created, each completely (numel × itemsize bytes, checked).
   */
  write(ref: TorchTensorRef, chunk: Uint8Array): void {
    this.check(this.rootWritten, 'write() before writeRoot()');
    const i = Number(ref.key);
    if (this.refs[i] !== ref) throw this.fail('INVALID_ARGUMENT', 'the placeholder is not of this writer');
    if (i < this.next) {
      throw this.fail(
        'INVALID_ARGUMENT',
        `tensor ${i} is already written: write in the order of the placeholders`,
      );
    }
    while (this.next < i) this.endTensor();
    this.beginTensor();
    if (this.written + chunk.byteLength > ref.byteLength) {
      const total = this.written + chunk.byteLength;
      throw this.fail(
        'SHAPE_MISMATCH',
        `tensor ${i} gets ${total} bytes, but ${ref.dtype} [${ref.shape}] has ${ref.byteLength}`,
      );
    }
    this.zip.append(chunk);
    this.written += chunk.byteLength;
  }

  /** Checks every tensor was fully written, writes the version records and the zip directory, fsyncs and renames. */
  finish(): void {
    this.check(this.rootWritten, 'finish() before writeRoot()');
    try {
      while (this.next < this.refs.length) this.endTensor();
    } catch (e) {
      this.abort();
      throw e;
    }
    // torch >= 2.1 writes byteorder (older versions ignore it); every version needs version.
    this.zip.add(`${ARCHIVE}/byteorder`, new TextEncoder().encode('little'));
    this.zip.add(`${ARCHIVE}/version`, new TextEncoder().encode('3\n'));
    this.zip.finish();
    const fd = this.fd!;
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    this.fd = null;
    fs.renameSync(this.tmp, this.file);
  }

  /** Drops the temporary file; the destination is left untouched. */
  abort(): void {
    if (this.fd !== null) fs.closeSync(this.fd);
    this.fd = null;
    fs.rmSync(this.tmp, { force: true });
  }

  private fail(code: ConvertErrorCode, message: string): ConvertError {
    return new ConvertError(code, message, this.file);
  }

  private check(ok: boolean, what: string): void {
    if (this.fd === null) throw this.fail('INVALID_ARGUMENT', 'writer is closed');
    if (!ok) throw this.fail('INVALID_ARGUMENT', what);
  }

  private beginTensor(): void {
    if (this.entryOpen) return;
    const ref = this.refs[this.next];
    this.zip.begin(`${ARCHIVE}/data/${ref.key}`, ref.byteLength);
    this.entryOpen = true;
    this.written = 0;
  }

  private endTensor(): void {
    this.beginTensor();
    const ref = this.refs[this.next];
    if (this.written !== ref.byteLength) {
      const what = `tensor ${ref.key} (${ref.dtype} [${ref.shape}])`;
      throw this.fail('SHAPE_MISMATCH', `${what} got ${this.written} of its ${ref.byteLength} bytes`);
    }
    this.zip.end();
    this.entryOpen = false;
    this.next++;
  }
}
