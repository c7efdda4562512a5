// Reading the PyTorch reference fixtures (scripts/reference.py) and rebuilding the HF checkpoints
// they were computed from.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  castElements,
  getArchitectureSpec,
  planConversion,
  SafetensorsFile,
  type TransformerConfig,
} from '@megapatch/convert';
import { fromTypedArray, type Tensor } from '@megapatch/tensor';
import { FIXTURE_MODELS, writeFixtureCheckpoint } from '../../scripts/write-fixture-checkpoints.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const FIXTURE_DIR = path.join(HERE, '..', 'fixtures');
export const FIXTURE_IDS = FIXTURE_MODELS.map((m) => m.id);

/** A fixture's tensors as float64 arrays (ids as numbers) with shapes. */
export interface Fixture {
  id: string;
  grads: string[];
  /** Rows of the HF tensor a stored gradient covers (null: all rows). */
  rowSubset(name: string): number[] | null;
  get(name: string): { shape: number[]; data: Float64Array };
  has(name: string): boolean;
  ids(name: string): Tensor;
}

export function readFixture(id: string): Fixture {
  const f = SafetensorsFile.open(path.join(FIXTURE_DIR, `${id}.safetensors`));
  const cache = new Map<string, { shape: number[]; data: Float64Array }>();
  const get = (name: string) => {
    let v = cache.get(name);
    if (!v) {
      const t = f.read(name);
      const raw = t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength);
      let data: Float64Array;
      if (t.dtype === 'I64') data = Float64Array.from(new BigInt64Array(raw), Number);
      else if (t.dtype === 'I32') data = Float64Array.from(new Int32Array(raw));
      else {
        const bytes = castElements(t.data, t.dtype, 'F64', name);
        data = new Float64Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
      }
      v = { shape: [...t.shape], data };
      cache.set(name, v);
    }
    return v;
  };
  const grads = (f.metadata.grads ?? '').split(',').filter((s) => s.length > 0);
  const subset = new Set((f.metadata.grad_row_subset ?? '').split(',').filter((s) => s.length > 0));
  return {
    id,
    grads,
    rowSubset: (name) => (subset.has(name) ? Array.from(get('grad_row_ids').data) : null),
    get,
    has: (name) => f.has(name),
    ids: (name) => {
      const t = get(name);
      return fromTypedArray(
        BigInt64Array.from(t.data, (x) => BigInt(x)),
        t.shape,
      );
    },
  };
}

const built = new Map<string, string>();
/** The F32 HF folder of fixture model `id` (written once per test process into a temp dir). */
export function fixtureCheckpoint(id: string): string {
  let dir = built.get(id);
  if (!dir) {
    dir = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'mp-models-')), id);
    writeFixtureCheckpoint(dir, id);
    built.set(id, dir);
  }
  return dir;
}

/** max |a − b| / max |b|. */
export function relMaxError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let d = 0;
  let m = 0;
  for (let i = 0; i < b.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]));
    m = Math.max(m, Math.abs(b[i]));
  }
  return d / Math.max(m, 1e-30);
}

export function cosine(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let ab = 0;
  let aa = 0;
  let bb = 0;
  for (let i = 0; i < b.length; i++) {
    ab += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  return ab / Math.sqrt(aa * bb);
}

/**
 * The rows of Megatron tensors that hold HF tensor `hf` (TP = 1): [megatron name, megatron start
 * row, HF start row, count] runs, from the conversion plan.
 */
export function hfRowsInMegatron(
  architecture: string,
  cfg: TransformerConfig,
  hf: string,
): { name: string; start: number; sourceStart: number; count: number }[] {
  const plan = planConversion(getArchitectureSpec(architecture), cfg, {});
  const out: { name: string; start: number; sourceStart: number; count: number }[] = [];
  for (const t of plan.tensors) {
    for (const r of t.rows)
      if (r.source === hf)
        out.push({ name: t.name, start: r.start, sourceStart: r.sourceStart, count: r.count });
  }
  return out;
}
