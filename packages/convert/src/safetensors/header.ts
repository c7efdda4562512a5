import { ConvertError } from '../errors.js';
import { checkDtype, DTYPE_SIZE, numelOf, type SafetensorsDtype } from './dtype.js';

/** Largest JSON header accepted, as in the reference Rust reader. */
export const MAX_HEADER_SIZE = 100_000_000;

/** One tensor of a header: dtype, shape and [begin, end) byte range inside the data buffer. */
export interface TensorEntry {
  readonly name: string;
  readonly dtype: SafetensorsDtype;
  readonly shape: readonly number[];
  readonly begin: number;
  readonly end: number;
}

/** A validated header. */
export interface ParsedHeader {
  readonly tensors: Map<string, TensorEntry>;
  readonly metadata: Record<string, string>;
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

/**
 * Finds the first duplicated key of any object in a JSON text that already parsed, since
 * JSON.parse silently keeps the last value. Returns the key, or undefined.
 */
export function findDuplicateKey(json: string): string | undefined {
  // One frame per open bracket: objects track the keys seen and whether a key comes next.
  const stack: { keys: Set<string> | null; expectKey: boolean }[] = [];
  for (let i = 0; i < json.length; i++) {
    const c = json[i];
    if (c === '"') {
      let j = i + 1;
      while (json[j] !== '"') j += json[j] === '\\' ? 2 : 1;
      const top = stack[stack.length - 1];
      if (top?.keys && top.expectKey) {
        const key = JSON.parse(json.slice(i, j + 1)) as string;
        if (top.keys.has(key)) return key;
        top.keys.add(key);
        top.expectKey = false;
      }
      i = j;
    } else if (c === '{') stack.push({ keys: new Set(), expectKey: true });
    else if (c === '[') stack.push({ keys: null, expectKey: false });
    else if (c === '}' || c === ']') stack.pop();
    else if (c === ',') {
      const top = stack[stack.length - 1];
      if (top?.keys) top.expectKey = true;
    }
  }
  return undefined;
}

/**
 * Parses and validates the JSON header against a data buffer of `dataSize` bytes: known dtypes,
 * shapes, offsets matching shapes, the buffer covered with no hole or overlap, string metadata.
 */
export function parseHeader(text: string, dataSize: number, file: string): ParsedHeader {
  const corrupt = (msg: string) => new ConvertError('CORRUPT_FILE', msg, file);
  if (!text.startsWith('{')) throw corrupt(`header does not start with '{'`);
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw corrupt(`header is not valid JSON (${(e as Error).message})`);
  }
  // Only spaces may pad the header; JSON.parse would also accept tabs and newlines.
  let last = text.length - 1;
  while (text[last] === ' ') last--;
  if (text[last] !== '}') throw corrupt('header is padded with characters other than spaces');
  if (!isObject(raw)) throw corrupt('header is not a JSON object');
  const dup = findDuplicateKey(text);
  if (dup !== undefined) throw corrupt(`header has duplicate key ${JSON.stringify(dup)}`);

  // Null-prototype records so that a key such as "__proto__" stays an ordinary key.
  const metadata = Object.create(null) as Record<string, string>;
  const tensors = new Map<string, TensorEntry>();
  for (const [name, value] of Object.entries(raw)) {
    if (name === '__metadata__') {
      if (!isObject(value)) throw corrupt('__metadata__ is not an object');
      for (const [k, v] of Object.entries(value)) {
        if (typeof v !== 'string')
          throw corrupt(`__metadata__ value of ${JSON.stringify(k)} is not a string`);
        metadata[k] = v;
      }
      continue;
    }
    const where = `tensor ${JSON.stringify(name)}`;
    if (!isObject(value)) throw corrupt(`${where} is not an object`);
    const dtype = checkDtype(value.dtype, where, file);
    const shape = value.shape;
    if (!Array.isArray(shape) || !shape.every(isCount)) {
      throw corrupt(`${where} shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
    }
    const offsets = value.data_offsets;
    if (
      !Array.isArray(offsets) ||
      offsets.length !== 2 ||
      !offsets.every(isCount) ||
      offsets[0] > offsets[1]
    ) {
      throw corrupt(`${where} data_offsets ${JSON.stringify(offsets)} is not [begin, end] with begin <= end`);
    }
    const [begin, end] = offsets as [number, number];
    const bytes = numelOf(shape, where, file) * DTYPE_SIZE[dtype];
    if (end - begin !== bytes) {
      throw corrupt(
        `${where} data_offsets [${begin}, ${end}] do not match shape [${shape.join(',')}] ${dtype} (${bytes} bytes)`,
      );
    }
    tensors.set(name, { name, dtype, shape, begin, end });
  }

  // Walk the byte ranges in order: each must start where the previous ended.
  const sorted = [...tensors.values()].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let cursor = 0;
  let prev: TensorEntry | undefined;
  for (const t of sorted) {
    if (t.end > dataSize) {
      throw new ConvertError(
        'TRUNCATED_FILE',
        `tensor ${JSON.stringify(t.name)} data_offsets [${t.begin}, ${t.end}] run past the end of the ` +
          `${dataSize}-byte data buffer (file truncated?)`,
        file,
      );
    }
    if (t.begin < cursor) {
      throw corrupt(
        `tensor ${JSON.stringify(t.name)} data_offsets [${t.begin}, ${t.end}] overlap ` +
          `tensor ${JSON.stringify(prev?.name)} [${prev?.begin}, ${prev?.end}]`,
      );
    }
    if (t.begin > cursor) {
      throw corrupt(`hole in the data buffer: bytes [${cursor}, ${t.begin}) belong to no tensor`);
    }
    cursor = t.end;
    prev = t;
  }
  if (cursor !== dataSize) {
    throw corrupt(`hole in the data buffer: bytes [${cursor}, ${dataSize}) at the end belong to no tensor`);
  }
  return { tensors, metadata };
}

/**
 * Serializes a header: `__metadata__` first, then the entries in the given order, compact JSON,
 * padded with spaces so that the data buffer starts 8-byte aligned (8 + length ≡ 0 mod 8).
 */
export function encodeHeader(entries: readonly TensorEntry[], metadata?: Record<string, string>): Uint8Array {
  const obj = Object.create(null) as Record<string, unknown>;
  if (metadata && Object.keys(metadata).length > 0) obj.__metadata__ = metadata;
  for (const t of entries) {
    obj[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [t.begin, t.end] };
  }
  const json = Buffer.from(JSON.stringify(obj), 'utf8');
  const padded = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + padded).fill(0x20);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  return out;
}
