// PyTorch distributed checkpoints (torch.distributed.checkpoint, "DCP"), as FileSystemWriter lays
// them out: a `.metadata` file (a pickled Metadata: each key's global size, dtype and chunks, and
// where each chunk is stored) and `*.distcp` files in which every tensor chunk is a whole
// torch.save blob and every other object a run of bytes. Megatron-Core's `torch_dist` format is
// one of these. Reading never runs pickled code: the Metadata classes are read as PyObjects.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ConvertError } from '../errors.js';
import { DTYPE_SIZE, numelOf, type SafetensorsDtype } from '../safetensors/dtype.js';
import { PyGlobal, PyObject, unpickle } from './pickle.js';
import { TorchFile, TorchTensor, torchDtypeOf } from './torch-file.js';

/** The metadata file of a distributed checkpoint folder. */
export const DCP_METADATA_FILE = '.metadata';

/** One stored chunk of a tensor: where it sits in the global tensor and where its torch.save blob is. */
export interface DcpChunk {
  readonly offsets: readonly number[];
  readonly sizes: readonly number[];
  /** File of the blob, relative to the checkpoint folder. */
  readonly file: string;
  /** Byte range of the blob in that file. */
  readonly offset: number;
  readonly length: number;
}

/** A tensor of the checkpoint: its global size and dtype, and the chunks that tile it. */
export interface DcpTensor {
  readonly key: string;
  readonly dtype: SafetensorsDtype;
  readonly size: readonly number[];
  readonly chunks: readonly DcpChunk[];
}

/** A dataclass field of a PyObject (its BUILD state), or undefined. */
function field(o: unknown, name: string): unknown {
  return o instanceof PyObject && o.state instanceof Map ? o.state.get(name) : undefined;
}

const isCount = (x: unknown): x is number => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;

/** A torch.Size (pickled as torch.Size((…))) or a plain tuple, as numbers; undefined when it is neither. */
function sizeOf(v: unknown): number[] | undefined {
  const items =
    v instanceof PyObject && v.module === 'torch' && v.name === 'Size'
      ? v.args[0]
      : Array.isArray(v)
        ? v
        : undefined;
  return Array.isArray(items) && items.every(isCount) ? [...items] : undefined;
}

/** The dtype in a TensorProperties: its state is (dtype, layout, …) through __getstate__, or a dict. */
function dtypeOf(properties: unknown): string | undefined {
  const state = properties instanceof PyObject ? properties.state : undefined;
  const d = Array.isArray(state) ? state[0] : field(properties, 'dtype');
  return d instanceof PyGlobal && d.module === 'torch' ? d.name : undefined;
}

/**
 * A PyTorch distributed checkpoint folder opened for reading: `.metadata` parsed on open, chunk
 * blobs read on demand.
 */
/**
 * Two chunks that share an element, or null: a sweep along dim 0, each chunk compared with those
 * whose rows it meets (the layer and expert axes of Megatron's keys keep that set small).
 */
function overlapping(chunks: readonly DcpChunk[]): [DcpChunk, DcpChunk] | null {
  if (chunks.length < 2 || chunks[0].sizes.length === 0) return null;
  const sorted = [...chunks].sort((x, y) => x.offsets[0] - y.offsets[0]);
  let active: DcpChunk[] = [];
  for (const c of sorted) {
    active = active.filter((a) => a.offsets[0] + a.sizes[0] > c.offsets[0]);
    const hit = active.find((a) =>
      a.offsets.every((o, d) => o < c.offsets[d] + c.sizes[d] && c.offsets[d] < o + a.sizes[d]),
    );
    if (hit) return [hit, c];
    active.push(c);
  }
  return null;
}

export class DcpCheckpoint {
  /** Tensors by key. */
  readonly tensors: ReadonlyMap<string, DcpTensor>;
  /** Keys of the non-tensor objects (pickled bytes, e.g. Megatron's `_extra_state` and RNG states). */
  readonly objects: ReadonlySet<string>;
  private readonly fds = new Map<string, number>();
  private readonly blobs = new Map<DcpChunk, { file: TorchFile; tensor: TorchTensor }>();

  private constructor(
    readonly dir: string,
    tensors: Map<string, DcpTensor>,
    objects: Set<string>,
  ) {
    this.tensors = tensors;
    this.objects = objects;
  }

  /** Opens a DCP folder (the one holding `.metadata`), checking that every tensor's chunks tile it. */
  static open(dir: string): DcpCheckpoint {
    const metaFile = path.join(dir, DCP_METADATA_FILE);
    if (!fs.existsSync(metaFile)) {
      throw new ConvertError(
        'MISSING_FILE',
        `no ${DCP_METADATA_FILE}: not a PyTorch distributed checkpoint`,
        dir,
      );
    }
    const fail = (message: string) => new ConvertError('CORRUPT_FILE', message, metaFile);
    let meta: unknown;
    try {
      meta = unpickle(fs.readFileSync(metaFile));
    } catch (e) {
      if (e instanceof ConvertError && !e.file) throw new ConvertError(e.code, e.message, metaFile);
      throw e;
    }
    if (!(meta instanceof PyObject) || meta.name !== 'Metadata') {
      throw fail('does not hold a torch.distributed.checkpoint Metadata object');
    }
    const sdm = field(meta, 'state_dict_metadata');
    const storage = field(meta, 'storage_data');
    if (!(sdm instanceof Map) || !(storage instanceof Map)) {
      throw fail(
        'Metadata lacks state_dict_metadata or storage_data (a checkpoint not saved by FileSystemWriter?)',
      );
    }
    // storage_data: MetadataIndex(fqn, offset) → _StorageInfo(relative_path, offset, length)
    const where = new Map<string, { file: string; offset: number; length: number }>();
    for (const [index, info] of storage) {
      const fqn = field(index, 'fqn');
      const offsets = sizeOf(field(index, 'offset'));
      const file = field(info, 'relative_path');
      const offset = field(info, 'offset');
      const length = field(info, 'length');
      const transforms = field(info, 'transform_descriptors');
      if (typeof fqn !== 'string' || typeof file !== 'string' || !isCount(offset) || !isCount(length)) {
        throw fail('a storage_data entry is not MetadataIndex → _StorageInfo(relative_path, offset, length)');
      }
      if (Array.isArray(transforms) && transforms.length > 0) {
        throw new ConvertError(
          'UNSUPPORTED',
          `${fqn} is stored through the transforms ${transforms.join(', ')}, which megapatch does not read: save the checkpoint without storage extensions`,
          metaFile,
        );
      }
      if (file.includes('..') || path.isAbsolute(file))
        throw fail(`${fqn} is stored outside the folder (${file})`);
      if (offsets) where.set(`${fqn}@${offsets.join(',')}`, { file, offset, length });
    }
    const tensors = new Map<string, DcpTensor>();
    const objects = new Set<string>();
    for (const [key, m] of sdm) {
      if (typeof key !== 'string') throw fail('a state_dict_metadata key is not a string');
      if (m instanceof PyObject && m.name === 'BytesStorageMetadata') {
        objects.add(key);
        continue;
      }
      const size = sizeOf(field(m, 'size'));
      const chunksIn = field(m, 'chunks');
      if (!(m instanceof PyObject) || !size || !Array.isArray(chunksIn)) {
        throw fail(`${key}: neither TensorStorageMetadata (size, chunks) nor BytesStorageMetadata`);
      }
      const dtypeName = dtypeOf(field(m, 'properties'));
      const dtype = dtypeName === undefined ? undefined : torchDtypeOf(dtypeName);
      if (!dtype) {
        throw new ConvertError(
          'UNSUPPORTED',
          `${key} has dtype ${dtypeName ?? 'unknown'}, which is not supported`,
          metaFile,
        );
      }
      let covered = 0;
      const chunks = chunksIn.map((c): DcpChunk => {
        const offsets = sizeOf(field(c, 'offsets'));
        const sizes = sizeOf(field(c, 'sizes'));
        if (
          !offsets ||
          !sizes ||
          offsets.length !== size.length ||
          sizes.length !== size.length ||
          offsets.some((o, d) => o + sizes[d] > size[d])
        ) {
          throw fail(`${key}: a chunk at [${offsets}] of size [${sizes}] does not fit its size [${size}]`);
        }
        const at = where.get(`${key}@${offsets.join(',')}`);
        if (!at) throw fail(`${key}: the chunk at [${offsets.join(',')}] has no storage entry`);
        covered += numelOf(sizes);
        return { offsets, sizes, ...at };
      });
      if (covered !== numelOf(size)) {
        throw fail(`${key}: its chunks hold ${covered} of its ${numelOf(size)} elements`);
      }
      // as many elements as the tensor: they tile it unless two overlap (and leave a hole elsewhere)
      const twice = overlapping(chunks);
      if (twice) {
        const [a, b] = twice.map((c) => `[${c.offsets.join(',')}] of size [${c.sizes.join(',')}]`);
        throw fail(`${key}: the chunks at ${a} and ${b} overlap, so part of it is not stored`);
      }
      tensors.set(key, { key, dtype, size, chunks });
    }
    return new DcpCheckpoint(dir, tensors, objects);
  }

  /** Reads the box [offsets, offsets + shape) of tensor `key` as row-major bytes, from the chunks it overlaps. */
  readBox(key: string, offsets: readonly number[], shape: readonly number[]): Uint8Array {
    const t = this.tensors.get(key);
    if (!t) throw new ConvertError('MISSING_TENSOR', `no tensor ${key}`, this.dir);
    if (
      offsets.length !== t.size.length ||
      shape.length !== t.size.length ||
      shape.some((n, d) => offsets[d] + n > t.size[d])
    ) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `box at [${offsets.join(',')}] of shape [${shape.join(',')}] is outside ${key} of size [${t.size.join(',')}]`,
        this.dir,
      );
    }
    const esz = DTYPE_SIZE[t.dtype];
    const out = new Uint8Array(numelOf(shape) * esz);
    if (out.byteLength === 0) return out;
    for (const c of t.chunks) {
      const lo = offsets.map((o, d) => Math.max(o, c.offsets[d]));
      const hi = offsets.map((o, d) => Math.min(o + shape[d], c.offsets[d] + c.sizes[d]));
      if (lo.some((l, d) => l >= hi[d])) continue;
      const { file, tensor } = this.blob(t, c);
      const part = file.readBox(
        tensor,
        lo.map((l, d) => l - c.offsets[d]),
        lo.map((l, d) => hi[d] - l),
      );
      copyBox(
        part,
        lo.map((l, d) => hi[d] - l),
        out,
        shape,
        lo.map((l, d) => l - offsets[d]),
        esz,
      );
    }
    return out;
  }

  /** The torch.save blob of a chunk, opened once: a tensor of the chunk's dtype and element count. */
  private blob(t: DcpTensor, c: DcpChunk): { file: TorchFile; tensor: TorchTensor } {
    let b = this.blobs.get(c);
    if (b) return b;
    const where = path.join(this.dir, c.file);
    let fd = this.fds.get(c.file);
    if (fd === undefined) {
      if (!fs.existsSync(where)) {
        throw new ConvertError('MISSING_FILE', `no such file, which holds ${t.key}`, where);
      }
      fd = fs.openSync(where, 'r');
      this.fds.set(c.file, fd);
    }
    if (c.offset + c.length > fs.fstatSync(fd).size) {
      throw new ConvertError(
        'TRUNCATED_FILE',
        `${t.key}'s chunk [${c.offset}, ${c.offset + c.length}) runs past the end of the file`,
        where,
      );
    }
    const file = TorchFile.openRegion(fd, c.offset, c.length, where);
    const x = file.root;
    if (!(x instanceof TorchTensor) || x.dtype !== t.dtype || x.numel !== numelOf(c.sizes)) {
      const got =
        x instanceof TorchTensor ? `a ${x.dtype} tensor of shape [${x.shape.join(',')}]` : 'not a tensor';
      throw new ConvertError(
        'CORRUPT_FILE',
        `${t.key}'s chunk at [${c.offsets.join(',')}] is ${got}, its metadata says ${t.dtype} [${c.sizes.join(',')}]`,
        where,
      );
    }
    // Megatron views a chunk with its prepended axes as size-1 dimensions; any contiguous tensor
    // of the chunk's element count reads as the chunk.
    let tensor = x;
    if (x.shape.join(',') !== c.sizes.join(',')) {
      if (!x.contiguous) {
        throw new ConvertError(
          'UNSUPPORTED',
          `${t.key}'s chunk is a strided [${x.shape.join(',')}] view where [${c.sizes.join(',')}] was expected`,
          where,
        );
      }
      const stride = c.sizes.map((_, d) => numelOf(c.sizes.slice(d + 1)));
      tensor = new TorchTensor(
        x.dtype,
        [...c.sizes],
        stride,
        x.storageOffset,
        x.storageKey,
        x.storageNumel,
        false,
      );
    }
    b = { file, tensor };
    this.blobs.set(c, b);
    return b;
  }

  /** Closes the files. */
  close(): void {
    for (const b of this.blobs.values()) b.file.close();
    this.blobs.clear();
    for (const fd of this.fds.values()) fs.closeSync(fd);
    this.fds.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** Copies the dense box `src` (shape `srcShape`) into the dense `dst` (shape `dstShape`) at `at`, trailing dimensions merged into runs. */
function copyBox(
  src: Uint8Array,
  srcShape: readonly number[],
  dst: Uint8Array,
  dstShape: readonly number[],
  at: readonly number[],
  esz: number,
): void {
  const n = srcShape.length;
  if (n === 0) {
    dst.set(src);
    return;
  }
  // k: the first dimension of the run; from k + 1 on the box spans the whole of dst
  let k = n - 1;
  while (k > 0 && srcShape[k] === dstShape[k] && at[k] === 0) k--;
  const run = numelOf(srcShape.slice(k)) * esz;
  const dstStride = dstShape.map((_, d) => numelOf(dstShape.slice(d + 1)) * esz);
  const index = new Array<number>(k).fill(0);
  let s = 0;
  for (;;) {
    let o = at[k] * dstStride[k];
    for (let d = 0; d < k; d++) o += (at[d] + index[d]) * dstStride[d];
    dst.set(src.subarray(s, s + run), o);
    s += run;
    let d = k - 1;
    while (d >= 0 && ++index[d] === srcShape[d]) index[d--] = 0;
    if (d < 0) return;
  }
}
