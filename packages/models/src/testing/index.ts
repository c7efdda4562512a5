// @megapatch/models/testing: what a family's parity tests need — reading a PyTorch reference
// fixture (the safetensors files scripts/reference.py writes), the error measures the tests use,
// and where an HF tensor's rows sit in the Megatron tensors. Used by the built-in tests and by
// plugin packages (examples/plugin-gemma).
import {
  type ArchitectureSpec,
  castElements,
  getArchitectureSpec,
  planConversion,
  SafetensorsFile,
  type TransformerConfig,
} from '@megapatch/convert';
import { fromTypedArray, type Tensor } from '@megapatch/tensor';

/** A reference fixture: tensors as float64 arrays with shapes, and the gradients it holds. */
export interface ReferenceFixture {
  /** HF names of the parameters whose gradients are stored as `grad.<name>`. */
  grads: string[];
  /** Rows of the HF tensor a stored gradient covers (`grad_row_ids`), or null for all rows. */
  rowSubset(name: string): number[] | null;
  get(name: string): { shape: number[]; data: Float64Array };
  has(name: string): boolean;
  /** An integer tensor (I64/I32) as an int64 Tensor. */
  ids(name: string): Tensor;
  /** The file's `__metadata__`. */
  metadata: Readonly<Record<string, string>>;
}

/**
 * Opens a fixture written by a reference script: tensors by name, `__metadata__.grads` (comma-
 * separated HF names) and `__metadata__.grad_row_subset` (gradients stored only at `grad_row_ids`).
 */
export function readReferenceFixture(file: string): ReferenceFixture {
  const f = SafetensorsFile.open(file);
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
  const list = (key: string) => (f.metadata[key] ?? '').split(',').filter((s) => s.length > 0);
  const subset = new Set(list('grad_row_subset'));
  return {
    grads: list('grads'),
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
    metadata: f.metadata,
  };
}

/** max |a − b| / max |b|: the logits and gradient measure of the parity tests. */
export function relMaxError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let d = 0;
  let m = 0;
  for (let i = 0; i < b.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]));
    m = Math.max(m, Math.abs(b[i]));
  }
  return d / Math.max(m, 1e-30);
}

/** Cosine similarity (the bf16 logits measure). */
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

/** One run of rows: Megatron tensor `name` rows [start, start + count) = HF rows [sourceStart, ...). */
export interface HfRowRun {
  name: string;
  start: number;
  sourceStart: number;
  count: number;
}

/** Where the rows of HF tensor `hf` sit in the Megatron tensors (TP = 1), from the conversion plan. */
export function hfRowsInMegatron(
  spec: ArchitectureSpec | string,
  cfg: TransformerConfig,
  hf: string,
): HfRowRun[] {
  const s = typeof spec === 'string' ? getArchitectureSpec(spec) : spec;
  const out: HfRowRun[] = [];
  for (const t of planConversion(s, cfg, {}).tensors) {
    for (const r of t.rows) {
      if (r.source === hf)
        out.push({ name: t.name, start: r.start, sourceStart: r.sourceStart, count: r.count });
    }
  }
  return out;
}
