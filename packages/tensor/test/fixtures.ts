// Loads the PyTorch fixtures written by scripts/fixtures_*.py and compares tensors with them.
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import {
  type DType,
  memoryStats,
  synchronize,
  Tensor,
  TensorError,
  type TensorErrorCode,
  tensor,
  transpose,
} from '../src/index.js';

export interface FixtureTensor {
  shape: number[];
  dtype: DType;
  data: (number | boolean)[];
  layout?: 'contiguous' | 'transposed';
}

export interface FixtureCase {
  name: string;
  args: Record<string, unknown>;
  inputs: Record<string, FixtureTensor>;
  outputs: Record<string, FixtureTensor>;
  grads: Record<string, FixtureTensor>;
}

const here = dirname(fileURLToPath(import.meta.url));

export function loadFixture(family: string): FixtureCase[] {
  const json = JSON.parse(readFileSync(join(here, 'fixtures', `${family}.json`), 'utf8'));
  return json.cases as FixtureCase[];
}

/** Builds the input tensor of a fixture (non-contiguous for layout "transposed"). */
export function fromFixture(f: FixtureTensor, requiresGrad = false): Tensor {
  const vals = f.data.map((v) => (typeof v === 'boolean' ? (v ? 1 : 0) : v));
  if (f.layout === 'transposed') {
    const n = f.shape.length;
    const baseShape = [...f.shape.slice(0, n - 2), f.shape[n - 1], f.shape[n - 2]];
    // the data is listed in the logical (transposed) order: rebuild the contiguous base
    const rows = f.shape[n - 2];
    const cols = f.shape[n - 1];
    const batch = vals.length / (rows * cols || 1);
    const base = new Array<number>(vals.length);
    for (let b = 0; b < batch; b++)
      for (let i = 0; i < rows; i++)
        for (let j = 0; j < cols; j++)
          base[b * rows * cols + j * rows + i] = vals[b * rows * cols + i * cols + j];
    const t = tensor(base, { dtype: f.dtype, shape: baseShape });
    const v = transpose(t, -1, -2);
    t.dispose();
    if (requiresGrad) {
      // a non-leaf view cannot require grad; make the view itself a leaf sharing the storage
      const leaf = v.detach();
      v.dispose();
      return leaf.requiresGrad_(true);
    }
    return v;
  }
  const t = tensor(vals, { dtype: f.dtype, shape: f.shape });
  return requiresGrad ? t.requiresGrad_(true) : t;
}

/** Default tolerances per dtype: float32 1e-5/1e-4, bfloat16 2^-7 relative. */
export function tolFor(dtype: DType): { atol: number; rtol: number } {
  if (dtype === 'bfloat16') return { atol: 1e-2, rtol: 1.6e-2 };
  if (dtype === 'float16') return { atol: 1e-3, rtol: 2e-3 };
  if (dtype === 'float64') return { atol: 1e-10, rtol: 1e-9 };
  return { atol: 1e-5, rtol: 1e-4 };
}

/** Asserts allclose(actual, expected) with a message naming the first bad element. */
export function expectClose(
  actual: Tensor,
  expected: FixtureTensor,
  tol?: { atol?: number; rtol?: number },
  label = '',
): void {
  expect(actual.shape, `${label} shape`).toEqual(expected.shape);
  const t = { ...tolFor(expected.dtype), ...tol };
  const a = Array.from(actual.toTypedArray() as ArrayLike<number | bigint>, Number);
  const e = expected.data.map((v) => (typeof v === 'boolean' ? (v ? 1 : 0) : v));
  for (let i = 0; i < e.length; i++) {
    const ok = Number.isNaN(e[i])
      ? Number.isNaN(a[i])
      : Math.abs(a[i] - e[i]) <= t.atol + t.rtol * Math.abs(e[i]);
    if (!ok) {
      expect.fail(`${label} element ${i}: got ${a[i]}, expected ${e[i]} (atol ${t.atol}, rtol ${t.rtol})`);
    }
  }
}

/** Disposes tensors (and with them their .grad). */
export function disposeAll(...ts: (Tensor | null | undefined)[]): void {
  for (const t of ts) t?.dispose();
}

/**
 * Calls fn and waits for the devices: on an asynchronous backend a kernel's verdict (a bad index,
 * a bad target) arrives at the next host read, as a device-side assert does on a GPU. A tensor fn
 * returns is disposed, so that a failed call leaves memory as it was on every backend.
 */
export function callAndSync(fn: () => unknown): void {
  const r = fn();
  try {
    synchronize();
  } finally {
    if (r instanceof Tensor) r.dispose();
  }
}

/**
 * The default device's live bytes once its queue has settled: on an asynchronous backend a
 * deferred check (a bad index, a bad target) holds its small result until the next host read, so
 * a test that counts bytes syncs first (on the CPU nothing is pending).
 */
export function settledLiveBytes(): number {
  synchronize();
  return memoryStats().liveBytes;
}

/** Asserts that fn throws a TensorError with this code (and a message matching `message`). */
export function expectTensorError(fn: () => unknown, code: TensorErrorCode, message?: RegExp | string): void {
  try {
    callAndSync(fn);
  } catch (e) {
    expect(e).toBeInstanceOf(TensorError);
    expect((e as TensorError).code).toBe(code);
    if (message !== undefined) expect((e as TensorError).message).toMatch(message);
    return;
  }
  expect.fail(`expected a TensorError ${code}`);
}

/** A small seeded uniform generator in [0, 1) (mulberry32): inputs that do not depend on Philox. */
export function mulberry32(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A small seeded generator (mulberry32) of normal samples, the same on every backend. */
export function seededNormals(seed: number) {
  const uniform = mulberry32(seed);
  return (shape: number[], dtype: DType, scale = 1): Tensor => {
    const n = shape.reduce((a, b) => a * b, 1);
    const v = Array.from(
      { length: n },
      () => scale * Math.sqrt(-2 * Math.log(Math.max(uniform(), 1e-12))) * Math.cos(2 * Math.PI * uniform()),
    );
    return tensor(v, { shape, dtype: 'float64' }).to(dtype);
  };
}

/** Max |a - e| over max(1, max |e|): how far apart two results are, relative to their size. */
export function relDiff(a: Tensor, e: Tensor): number {
  const av = Array.from(a.toTypedArray() as ArrayLike<number>, Number);
  const ev = Array.from(e.toTypedArray() as ArrayLike<number>, Number);
  let d = 0;
  let m = 1;
  for (let i = 0; i < ev.length; i++) {
    d = Math.max(d, Math.abs(av[i] - ev[i]));
    m = Math.max(m, Math.abs(ev[i]));
  }
  return d / m;
}
