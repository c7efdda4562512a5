// The sort-based paths of the CUDA index kernels (native/src/kernels/index.cu) on the emulator:
// indexAddRows over thousands of positions, scatterAddAlong on few long lines, topk on lines
// longer than one block sorts (candidate passes for k <= 1024, whole-line sorts above). Every
// output must equal the CPU backend's bit for bit (the same summation order and tie rules), and
// `bad` must name the same lowest rejected position. The sizes stay small enough for the
// emulator (each CUDA thread is a fiber) while crossing every tile and pass boundary.
import {
  type DType,
  getBackend,
  type KernelName,
  type KernelTable,
  type Tensor,
  tensor,
  tidy,
  zeros,
} from '@megapatch/tensor';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadEmulatorAddon } from '../src/native.js';

const built = loadEmulatorAddon();
const skip = 'error' in built ? built.error : '';
const DEV = 'cudaemu:0';
const DEVICES = ['cpu', DEV] as const;

function kernel<K extends KernelName>(device: string, name: K): KernelTable[K] {
  const k = getBackend(device).kernel(name);
  if (!k) throw new Error(`${device} has no kernel ${name}`);
  return k;
}

/** A seeded generator of floats in [0, 1) (mulberry32). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Values spread over many binades (so that the summation order shows in the rounding). */
function values(r: () => number, n: number, dtype: DType): number[] {
  const out = new Array<number>(n);
  for (let i = 0; i < n; i++) {
    const scale = 2 ** Math.floor(r() * 40 - 20);
    if (dtype === 'int64' || dtype === 'int32') out[i] = Math.floor((r() - 0.5) * 2000);
    else if (dtype === 'float64')
      out[i] = (r() - 0.5 + r() * 2 ** -30) * scale; // all 53 bits
    else out[i] = (r() - 0.5) * scale;
  }
  return out;
}

function make(data: number[], shape: number[], dtype: DType, device: string): Tensor {
  return tensor(data, { shape, dtype }).to(device);
}

/** Expects equal bytes, naming the first differing byte. */
function expectSameBytes(got: Uint8Array, want: Uint8Array, what: string): void {
  expect(got.length, `${what}: length`).toBe(want.length);
  let at = -1;
  for (let i = 0; i < want.length && at < 0; i++) if (got[i] !== want[i]) at = i;
  expect(at, `${what}: first differing byte`).toBe(-1);
}

/** Runs fn on the CPU and on the emulator; returns each run's outputs as bytes. */
function both(fn: (device: string) => Tensor[]): Uint8Array[][] {
  return DEVICES.map((device) => tidy(() => fn(device).map((t) => t.toBytes())));
}

function expectBoth(fn: (device: string) => Tensor[], names: string[]): void {
  const [cpu, dev] = both(fn);
  for (const [i, name] of names.entries()) expectSameBytes(dev[i], cpu[i], name);
}

describe.skipIf(skip !== '')(
  `CUDA index kernels, sort-based paths${skip ? ` (skipped: ${skip})` : ''}`,
  () => {
    beforeAll(async () => {
      await import('../src/emulator.js');
    });

    describe('indexAddRows', () => {
      interface AddCase {
        name: string;
        index: number[];
        S: number;
        inner: number;
        outer?: number;
        dtype?: DType;
        indexDtype?: 'int32' | 'int64';
        base?: boolean;
        alpha?: number;
        skip?: number;
      }

      function run(c: AddCase): void {
        const outer = c.outer ?? 1;
        const dtype = c.dtype ?? 'float32';
        const L = c.index.length;
        const r = rng(L * 31 + c.S + c.inner);
        const srcData = values(r, outer * L * c.inner, dtype);
        const baseData = values(r, outer * c.S * c.inner, dtype);
        expectBoth(
          (device) => {
            const src = make(srcData, [outer, L, c.inner], dtype, device);
            const base = c.base === false ? null : make(baseData, [outer, c.S, c.inner], dtype, device);
            const index = make(c.index, [L], c.indexDtype ?? 'int64', device);
            const out = zeros([outer, c.S, c.inner], { dtype, device });
            const bad = zeros([2], { dtype: 'float64', device });
            kernel(device, 'indexAddRows')(
              out,
              base,
              src,
              index,
              outer,
              c.S,
              c.inner,
              c.alpha ?? 1,
              c.skip ?? -1,
              bad,
            );
            return [out, bad];
          },
          [`${c.name}: out`, `${c.name}: bad`],
        );
      }

      const V = 3000;
      const N = 5000;
      const r = rng(7);
      // frequent low ids, as in a BPE vocabulary, plus rows nobody hits
      const zipf = Array.from({ length: N }, () => Math.floor(V * r() ** 4));
      const uniform = Array.from({ length: N }, () => Math.floor(V * r()));

      for (const inner of [1, 7, 64, 129]) {
        it(`float32, N = ${N} into V = ${V}, H = ${inner}, duplicates`, () =>
          run({ name: `H ${inner}`, index: zipf, S: V, inner }));
      }
      it('float32 without base, alpha -0.75, int32 index, skip = 0 (a padding id)', () =>
        run({
          name: 'no base',
          index: zipf,
          S: V,
          inner: 7,
          base: false,
          alpha: -0.75,
          indexDtype: 'int32',
          skip: 0,
        }));
      // rows of whole 16-byte packs take the vectorised kernel: without a base too
      it('bfloat16 and float32 without base, alpha -0.75, H a multiple of the pack (16-byte kernel)', () => {
        run({
          name: 'packs bf16',
          index: zipf,
          S: V,
          inner: 16,
          base: false,
          alpha: -0.75,
          dtype: 'bfloat16',
        });
        run({
          name: 'packs f32',
          index: uniform,
          S: V,
          inner: 12,
          base: false,
          skip: 0,
          indexDtype: 'int32',
        });
      });
      for (const dtype of ['bfloat16', 'float64', 'int64'] as const) {
        it(`${dtype}, H = 64`, () => run({ name: dtype, index: zipf, S: V, inner: 64, dtype, alpha: 2 }));
      }
      it('every position on one row (one long run)', () =>
        run({ name: 'all same', index: new Array<number>(N).fill(1234), S: V, inner: 7 }));
      it('outer 2 (index along a middle dimension), uniform ids, int32 index', () =>
        run({ name: 'outer 2', index: uniform, S: V, inner: 3, outer: 2, indexDtype: 'int32' }));
      it('an empty index leaves the base (or zeros)', () => {
        run({ name: 'empty, base', index: [], S: 50, inner: 5 });
        run({ name: 'empty, no base', index: [], S: 50, inner: 5, base: false });
      });
      it('reports the lowest rejected position, int32 and int64', () => {
        for (const indexDtype of ['int32', 'int64'] as const) {
          const index = zipf.slice();
          index[4000] = V;
          index[2500] = -3;
          index[4999] = V + 7;
          const [cpu, dev] = both((device) => {
            const bad = zeros([2], { dtype: 'float64', device });
            const src = zeros([N, 4], { device });
            const out = zeros([V, 4], { device });
            kernel(device, 'indexAddRows')(
              out,
              null,
              src,
              make(index, [N], indexDtype, device),
              1,
              V,
              4,
              1,
              -1,
              bad,
            );
            return [bad];
          });
          expect(Array.from(new Float64Array(dev[0].buffer))).toEqual([2500, -3]);
          expectSameBytes(dev[0], cpu[0], `bad (${indexDtype})`);
        }
      });
    });

    describe('scatterAddAlong', () => {
      interface ScatterCase {
        name: string;
        out: number[];
        index: number[];
        dim: number;
        dtype?: DType;
        alpha?: number;
        /** the largest index value + 1 (default out[dim]); a small range makes many duplicates */
        range?: number;
      }

      function run(c: ScatterCase): void {
        const dtype = c.dtype ?? 'float32';
        const n = c.index.reduce((a, b) => a * b, 1);
        const m = c.out.reduce((a, b) => a * b, 1);
        const r = rng(n + m);
        const range = c.range ?? c.out[c.dim];
        const idx = Array.from({ length: n }, () => Math.floor(range * r() ** 2));
        const srcData = values(r, n, dtype);
        const outData = values(r, m, dtype);
        expectBoth(
          (device) => {
            const out = make(outData, c.out, dtype, device);
            const src = make(srcData, c.index, dtype, device);
            const bad = zeros([2], { dtype: 'float64', device });
            kernel(device, 'scatterAddAlong')(
              out,
              src,
              make(idx, c.index, 'int64', device),
              c.dim,
              c.alpha ?? 1,
              bad,
            );
            return [out, bad];
          },
          [`${c.name}: out`, `${c.name}: bad`],
        );
      }

      it('dim 0, lines of 1500', () => run({ name: 'dim 0', out: [40, 3, 4], index: [1500, 3, 4], dim: 0 }));
      it('dim 1, lines of 1000, bfloat16 (rounds at every step)', () =>
        run({ name: 'dim 1', out: [3, 50, 4], index: [3, 1000, 4], dim: 1, dtype: 'bfloat16', range: 6 }));
      it('last dim, lines of 700, float64 and int64, alpha 0.5', () => {
        run({ name: 'last f64', out: [4, 3, 100], index: [4, 3, 700], dim: 2, dtype: 'float64', alpha: 0.5 });
        run({ name: 'last i64', out: [4, 3, 100], index: [4, 3, 700], dim: 2, dtype: 'int64', alpha: 3 });
      });
      it('one 1-D line of 5000 into 7 targets', () => run({ name: '1-D', out: [7], index: [5000], dim: 0 }));
      it('index smaller than out outside dim', () =>
        run({ name: 'sub', out: [30, 6, 9], index: [900, 4, 5], dim: 0, range: 30 }));
      it('many short lines (one thread per line)', () =>
        run({ name: 'short', out: [5000, 8], index: [5000, 3], dim: 1, range: 8 }));
      it('reports the lowest rejected position on the sorted path', () => {
        const idx = Array.from({ length: 2 * 600 }, (_, i) => i % 9);
        idx[900] = 9;
        idx[700] = -1;
        const [cpu, dev] = both((device) => {
          const out = zeros([2, 9], { device });
          const src = zeros([2, 600], { device });
          const bad = zeros([2], { dtype: 'float64', device });
          kernel(device, 'scatterAddAlong')(out, src, make(idx, [2, 600], 'int64', device), 1, 1, bad);
          return [bad];
        });
        expect(Array.from(new Float64Array(dev[0].buffer))).toEqual([700, -1]);
        expectSameBytes(dev[0], cpu[0], 'bad');
      });
    });

    describe('topk', () => {
      /** x [outer, R, inner] with NaNs, -0 and +0, and many ties. */
      function data(outer: number, R: number, inner: number, dtype: DType): number[] {
        const r = rng(R * 7 + outer + inner);
        const n = outer * R * inner;
        const out = new Array<number>(n);
        const floating = dtype !== 'int64' && dtype !== 'int32';
        for (let i = 0; i < n; i++) {
          const u = r();
          if (floating && u < 0.01) out[i] = Number.NaN;
          else if (floating && u < 0.03) out[i] = u < 0.02 ? -0 : 0;
          else if (u < 0.5)
            out[i] = Math.floor(r() * 40) - 20; // ties
          else out[i] = floating ? (r() - 0.5) * 100 : Math.floor((r() - 0.5) * 1e6);
        }
        return out;
      }

      function run(outer: number, R: number, inner: number, dtype: DType, ks: number[]): void {
        const xData = data(outer, R, inner, dtype);
        for (const k of ks) {
          for (const largest of [true, false]) {
            expectBoth(
              (device) => {
                const x = make(xData, [outer, R, inner], dtype, device);
                const values = zeros([outer, k, inner], { dtype, device });
                const indices = zeros([outer, k, inner], { dtype: 'int64', device });
                kernel(device, 'topk')(values, indices, x, outer, R, inner, k, largest);
                return [values, indices];
              },
              [`R ${R}, k ${k}, ${largest ? 'largest' : 'smallest'}: values`, `k ${k}: indices`],
            );
          }
        }
      }

      it('lines of 20000 (two candidate passes for k = 1024)', () =>
        run(2, 20000, 1, 'float32', [1, 5, 64, 300, 1024]));
      it('lines of 5000 across inner = 3', () => run(1, 5000, 3, 'float32', [1, 5, 64, 300]));
      it('bfloat16 and float64 lines of 5000', () => {
        run(1, 5000, 1, 'bfloat16', [64]);
        run(2, 5000, 1, 'float64', [5]);
      });
      it('int64 lines of 5000', () => run(1, 5000, 2, 'int64', [300]));
      it('k above 1024 sorts lines whole, up to k = R', () => run(2, 5000, 1, 'float32', [1500, 5000]));
      it('lines of at most 4096 keep the one-block sort', () => run(3, 4096, 1, 'float32', [4096, 7]));
    });
  },
);
