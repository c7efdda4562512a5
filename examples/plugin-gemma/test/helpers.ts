// Reading the PyTorch reference fixture (scripts/reference.py), rebuilding the checkpoint it was
// computed from, and the error measures of the tests.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  type ArchitectureSpec,
  castElements,
  planConversion,
  SafetensorsFile,
  type TransformerConfig,
} from '@megapatch/convert';
import { fromTypedArray, type Tensor } from '@megapatch/tensor';
import { writeGemmaCheckpoint } from '../scripts/write-checkpoint.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const FIXTURE = path.join(HERE, 'fixtures', 'gemma.safetensors');

/** The fixture's tensors as float64 arrays (ids as numbers) with their shapes. */
export interface Fixture {
  /** HF names of the parameters whose gradients are stored. */
  grads: string[];
  /** Rows of the HF tensor a stored gradient covers (null: all rows). */
  rowSubset(name: string): number[] | null;
  get(name: string): { shape: number[]; data: Float64Array };
  /** An I64 tensor of ids as a Tensor. */
  ids(name: string): Tensor;
}

export function readFixture(file = FIXTURE): Fixture {
  const f = SafetensorsFile.open(file);
  const get = (name: string) => {
    const t = f.read(name);
    const raw = t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength);
    let data: Float64Array;
    if (t.dtype === 'I64') data = Float64Array.from(new BigInt64Array(raw), Number);
    else {
      const bytes = castElements(t.data, t.dtype, 'F64', name);
      data = new Float64Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    }
    return { shape: [...t.shape], data };
  };
  const subset = new Set((f.metadata.grad_row_subset ?? '').split(',').filter((s) => s.length > 0));
  return {
    grads: (f.metadata.grads ?? '').split(',').filter((s) => s.length > 0),
    rowSubset: (name) => (subset.has(name) ? Array.from(get('grad_row_ids').data) : null),
    get,
    ids: (name) => {
      const t = get(name);
      return fromTypedArray(
        BigInt64Array.from(t.data, (x) => BigInt(x)),
        t.shape,
      );
    },
  };
}

/** A fresh temporary folder, removed by the returned function. */
export function tempDir(prefix: string): { dir: string; remove: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, remove: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** Writes the synthetic Gemma checkpoint into `root`/gemma and returns that folder. */
export function gemmaCheckpoint(root: string): string {
  const dir = path.join(root, 'gemma');
  writeGemmaCheckpoint(dir);
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

/** Where the rows of HF tensor `hf` sit in the Megatron tensors (TP = 1), from the conversion plan. */
export function hfRowsInMegatron(
  spec: ArchitectureSpec,
  cfg: TransformerConfig,
  hf: string,
): { name: string; start: number; sourceStart: number; count: number }[] {
  const out: { name: string; start: number; sourceStart: number; count: number }[] = [];
  for (const t of planConversion(spec, cfg, {}).tensors) {
    for (const r of t.rows)
      if (r.source === hf)
        out.push({ name: t.name, start: r.start, sourceStart: r.sourceStart, count: r.count });
  }
  return out;
}
