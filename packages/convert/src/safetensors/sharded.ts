import * as fs from 'node:fs';
import * as path from 'node:path';
import { ConvertError } from '../errors.js';
import { byteLengthOf } from './dtype.js';
import { SafetensorsFile, type TensorData, type TensorInfo } from './file.js';
import {
  checkSpecs,
  type TensorInput,
  type TensorSpec,
  toTensorList,
  type WriteOptions,
  writeSafetensors,
} from './writer.js';

/** Name of the index file of a sharded checkpoint. */
export const SAFETENSORS_INDEX_FILE = 'model.safetensors.index.json';
/** Name of a single-file checkpoint. */
export const SAFETENSORS_SINGLE_FILE = 'model.safetensors';

/** A parsed `model.safetensors.index.json`. */
export interface SafetensorsIndex {
  /** `metadata` of the index (`total_size` and anything else it holds). */
  readonly metadata: Readonly<Record<string, unknown>>;
  /** `metadata.total_size` when it is a number: the sum of tensor byte lengths. */
  readonly totalSize?: number;
  /** Tensor name → shard file name (a plain name inside the folder). */
  readonly weightMap: ReadonlyMap<string, string>;
  /** Distinct shard file names, in first-seen order. */
  readonly files: readonly string[];
}

/** The `model-0000k-of-0000n.safetensors` name of shard k (1-based) of n, 5-digit numbering. */
export function shardFileName(k: number, n: number, prefix = 'model'): string {
  const pad = (x: number) => String(x).padStart(5, '0');
  return `${prefix}-${pad(k)}-of-${pad(n)}.safetensors`;
}

/** Throws INVALID_FORMAT unless `name` is a plain file name that stays inside its folder. */
export function checkShardFileName(name: unknown, file = SAFETENSORS_INDEX_FILE): string {
  // Index files come from untrusted downloads: a name with a separator, a drive, "..", or NUL
  // could read (or with a writer, overwrite) files outside the checkpoint folder.
  if (
    typeof name !== 'string' ||
    name === '' ||
    name === '.' ||
    name === '..' ||
    /[/\\:\0]/.test(name) ||
    path.isAbsolute(name)
  ) {
    throw new ConvertError(
      'INVALID_FORMAT',
      `shard file name ${JSON.stringify(name)} is not a plain file name`,
      file,
    );
  }
  return name;
}

/**
 * Reads and checks `dir/model.safetensors.index.json` (or `indexFile`, an index of the same form
 * such as transformers' `pytorch_model.bin.index.json`).
 */
export function readSafetensorsIndex(dir: string, indexFile = SAFETENSORS_INDEX_FILE): SafetensorsIndex {
  const indexPath = path.join(dir, indexFile);
  let text: string;
  try {
    text = fs.readFileSync(indexPath, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new ConvertError('MISSING_FILE', `no such file in ${dir}`, indexFile);
    }
    throw e;
  }
  const bad = (msg: string) => new ConvertError('INVALID_FORMAT', msg, indexFile);
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw bad(`not valid JSON (${(e as Error).message})`);
  }
  const isObj = (v: unknown): v is Record<string, unknown> =>
    typeof v === 'object' && v !== null && !Array.isArray(v);
  if (!isObj(raw)) throw bad('not a JSON object');
  const metadata = raw.metadata ?? {};
  if (!isObj(metadata)) throw bad('"metadata" is not an object');
  const wm = raw.weight_map;
  if (!isObj(wm)) throw bad('"weight_map" is missing or not an object');
  const weightMap = new Map<string, string>();
  const files: string[] = [];
  for (const [tensor, file] of Object.entries(wm)) {
    const name = checkShardFileName(file, indexFile);
    weightMap.set(tensor, name);
    if (!files.includes(name)) files.push(name);
  }
  const ts = metadata.total_size;
  // Some exporters write total_size as a string; accept it when it is a plain integer.
  const totalSize =
    typeof ts === 'number' ? ts : typeof ts === 'string' && /^\d+$/.test(ts) ? Number(ts) : undefined;
  return { metadata, totalSize, weightMap, files };
}

/** Tensor info plus the shard it lives in. */
export interface ShardedTensorInfo extends TensorInfo {
  /** Shard file name inside the folder. */
  readonly file: string;
}

/**
 * One view over a checkpoint folder: the shards listed by `model.safetensors.index.json`, or
 * a single `model.safetensors`. Every tensor of the index must exist in the shard it names.
 */
export class ShardedSafetensors {
  /** Folder of the checkpoint. */
  readonly dir: string;
  /** The index, absent for a single-file checkpoint. */
  readonly index?: SafetensorsIndex;
  private readonly shards: Map<string, SafetensorsFile>;
  private readonly location: Map<string, string>;

  private constructor(
    dir: string,
    shards: Map<string, SafetensorsFile>,
    location: Map<string, string>,
    index?: SafetensorsIndex,
  ) {
    this.dir = dir;
    this.shards = shards;
    this.location = location;
    this.index = index;
  }

  /** Opens `dir` (index first, else `model.safetensors`); MISSING_FILE when neither exists. */
  static open(dir: string): ShardedSafetensors {
    const shards = new Map<string, SafetensorsFile>();
    const location = new Map<string, string>();
    try {
      if (fs.existsSync(path.join(dir, SAFETENSORS_INDEX_FILE))) {
        const index = readSafetensorsIndex(dir);
        for (const f of index.files) shards.set(f, SafetensorsFile.open(path.join(dir, f)));
        for (const [tensor, f] of index.weightMap) {
          if (!shards.get(f)!.has(tensor)) {
            throw new ConvertError(
              'MISSING_TENSOR',
              `tensor ${JSON.stringify(tensor)} listed in the index is absent`,
              f,
            );
          }
          location.set(tensor, f);
        }
        return new ShardedSafetensors(dir, shards, location, index);
      }
      const single = path.join(dir, SAFETENSORS_SINGLE_FILE);
      if (!fs.existsSync(single)) {
        throw new ConvertError(
          'MISSING_FILE',
          `neither ${SAFETENSORS_INDEX_FILE} nor ${SAFETENSORS_SINGLE_FILE} in ${dir}`,
          path.basename(dir),
        );
      }
      const f = SafetensorsFile.open(single);
      shards.set(SAFETENSORS_SINGLE_FILE, f);
      for (const k of f.keys()) location.set(k, SAFETENSORS_SINGLE_FILE);
      return new ShardedSafetensors(dir, shards, location);
    } catch (e) {
      for (const s of shards.values()) s.close();
      throw e;
    }
  }

  /** All tensor names (index order, or header order for a single file). */
  keys(): string[] {
    return [...this.location.keys()];
  }

  /** Shard file names. */
  files(): string[] {
    return [...this.shards.keys()];
  }

  /** True when the checkpoint holds `name`. */
  has(name: string): boolean {
    return this.location.has(name);
  }

  /** Dtype, shape, byte length and shard file of `name`. */
  info(name: string): ShardedTensorInfo {
    const [file, shard] = this.shard(name);
    return { ...shard.info(name), file };
  }

  /** Reads the whole of `name`. */
  read(name: string): TensorData {
    return this.shard(name)[1].read(name);
  }

  /** Reads rows [start, start+count) along dim 0 of `name`. */
  readRows(name: string, start: number, count: number): TensorData {
    return this.shard(name)[1].readRows(name, start, count);
  }

  /** Closes every shard. */
  close(): void {
    for (const s of this.shards.values()) s.close();
  }

  /** Closes every shard (for `using`). */
  [Symbol.dispose](): void {
    this.close();
  }

  private shard(name: string): [string, SafetensorsFile] {
    const file = this.location.get(name);
    if (file === undefined) {
      throw new ConvertError('MISSING_TENSOR', `no tensor ${JSON.stringify(name)}`, path.basename(this.dir));
    }
    return [file, this.shards.get(file)!];
  }
}

const UNITS: Record<string, number> = {
  B: 1,
  KB: 1e3,
  MB: 1e6,
  GB: 1e9,
  TB: 1e12,
  KIB: 2 ** 10,
  MIB: 2 ** 20,
  GIB: 2 ** 30,
  TIB: 2 ** 40,
};

/** Parses a shard size: a byte count, or '5GB' (decimal, as Hugging Face) / '4GiB' (binary). */
export function parseSize(size: number | string): number {
  if (typeof size === 'number') {
    if (Number.isSafeInteger(size) && size > 0) return size;
  } else {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$/i.exec(size);
    if (m) {
      const n = Math.floor(Number(m[1]) * UNITS[(m[2] ?? 'B').toUpperCase()]);
      if (Number.isSafeInteger(n) && n > 0) return n;
    }
  }
  throw new ConvertError('INVALID_ARGUMENT', `invalid size ${JSON.stringify(size)}`);
}

/**
 * Upper bound of a shard file's size: data, plus each header entry with its offsets at their
 * widest, plus braces, metadata, the 8-byte length and up to 7 bytes of padding.
 */
function entryBound(s: TensorSpec, bytes: number, maxOffset: number): number {
  const digits = String(maxOffset).length;
  const entry = `${JSON.stringify(s.name)}:{"dtype":"${s.dtype}","shape":[${s.shape.join(',')}],"data_offsets":[,]},`;
  return bytes + Buffer.byteLength(entry) + 2 * digits;
}

/**
 * Splits tensors (kept in the given order) into shards whose files do not exceed `maxShardSize`
 * bytes, header included; a tensor larger than that on its own gets a shard to itself.
 */
export function planShards<T extends TensorSpec>(
  tensors: readonly T[],
  maxShardSize: number | string,
  metadata?: Record<string, string>,
): T[][] {
  const max = parseSize(maxShardSize);
  const fixed =
    8 +
    7 +
    2 +
    (metadata && Object.keys(metadata).length > 0
      ? Buffer.byteLength(JSON.stringify({ __metadata__: metadata }))
      : 0);
  // Offsets inside a shard never exceed the larger of the limit and the largest tensor.
  const sizes = tensors.map((t) => byteLengthOf(t.dtype, t.shape, `tensor ${JSON.stringify(t.name)}`));
  const maxOffset = sizes.reduce((a, b) => Math.max(a, b), max);
  const shards: T[][] = [];
  let current: T[] = [];
  let used = fixed;
  tensors.forEach((t, i) => {
    const cost = entryBound(t, sizes[i], maxOffset);
    if (current.length > 0 && used + cost > max) {
      shards.push(current);
      current = [];
      used = fixed;
    }
    current.push(t);
    used += cost;
  });
  if (current.length > 0) shards.push(current);
  return shards;
}

/** Options of {@link writeShardedSafetensors}. */
export interface ShardedWriteOptions extends WriteOptions {
  /** Largest shard file, in bytes or as '5GB' / '4GiB'. */
  readonly maxShardSize: number | string;
  /** File name prefix (default 'model'). */
  readonly prefix?: string;
}

/** Writes `dir/model.safetensors.index.json` atomically. */
export function writeSafetensorsIndex(
  dir: string,
  weightMap: ReadonlyMap<string, string>,
  totalSize: number,
): void {
  const body = { metadata: { total_size: totalSize }, weight_map: Object.fromEntries(weightMap) };
  const target = path.join(dir, SAFETENSORS_INDEX_FILE);
  const tmp = `${target}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, `${JSON.stringify(body, null, 2)}\n`);
  fs.renameSync(tmp, target);
}

/**
 * Writes a sharded checkpoint: `model-0000k-of-0000n.safetensors` files (each atomic, in the
 * given tensor order split by {@link planShards}) and then the index, so a reader never sees
 * an index that names a missing shard. Shards of an older, differently split checkpoint in the
 * folder are not removed. Returns the index written.
 */
export function writeShardedSafetensors(
  dir: string,
  tensors: readonly TensorInput[] | ReadonlyMap<string, Omit<TensorInput, 'name'>>,
  options: ShardedWriteOptions,
): SafetensorsIndex {
  const list = toTensorList(tensors);
  checkSpecs(list, options.metadata);
  const plan = planShards(list, options.maxShardSize, options.metadata);
  fs.mkdirSync(dir, { recursive: true });
  const weightMap = new Map<string, string>();
  let totalSize = 0;
  plan.forEach((shard, i) => {
    const file = checkShardFileName(shardFileName(i + 1, plan.length, options.prefix));
    writeSafetensors(path.join(dir, file), shard, { metadata: options.metadata, order: options.order });
    for (const t of shard) {
      weightMap.set(t.name, file);
      totalSize += t.data.byteLength;
    }
  });
  writeSafetensorsIndex(dir, weightMap, totalSize);
  return {
    metadata: { total_size: totalSize },
    totalSize,
    weightMap,
    files: plan.map((_, i) => shardFileName(i + 1, plan.length, options.prefix)),
  };
}
