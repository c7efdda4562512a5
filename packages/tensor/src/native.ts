// Loads the native CPU addon. Like sharp's loader, it tries each known location and, when none
// works, throws one message that lists every attempt and says how to build it.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TensorError } from './errors.js';

/** The functions exported by native/src/*.cc. Kernels read their arguments from the buffer. */
export interface NativeAddon {
  setArgBuffer(buf: Float64Array): void;
  setNumThreads(n: number): void;
  getNumThreads(): number;
  buildInfo(): {
    blas: string;
    blasConfig: string;
    simd: string;
    openmp: boolean;
    threads: number;
    compiler: string;
    /** Engine of bfloat16 GEMMs: oneDNN's native bf16 kernels, or conversion to fp32 panels. */
    bf16Gemm: 'onednn' | 'fp32-panels';
    /** oneDNN version linked into the addon (e.g. "2.6.3"), null when built without it. */
    onednn: string | null;
    /** Highest ISA oneDNN dispatches to on this CPU (e.g. "avx512_core_bf16"), null without it. */
    onednnIsa: string | null;
  };
  alloc(bytes: number, zero: boolean): number;
  free(address: number): void;
  emptyCache(): void;
  cachedBytes(): number;
  readInto(address: number, bytes: number, dst: ArrayBufferView): void;
  writeFrom(address: number, src: ArrayBufferView): void;
  philoxBlock(c0: number, c1: number, c2: number, c3: number, k0: number, k1: number): number[];
  [kernel: string]: (...args: never[]) => unknown;
}

const require = createRequire(import.meta.url);
const here = dirname(fileURLToPath(import.meta.url));
// src/ (tests, tsx) or dist/ (the built package): the package root is one level up either way.
const packageRoot = resolve(here, '..');

function candidates(): string[] {
  const list: string[] = [];
  if (process.env.MEGAPATCH_TENSOR_NATIVE) list.push(resolve(process.env.MEGAPATCH_TENSOR_NATIVE));
  list.push(join(packageRoot, 'build', 'Release', 'megapatch_tensor.node'));
  list.push(join(packageRoot, 'build', 'Debug', 'megapatch_tensor.node'));
  return list;
}

let cached: { addon: NativeAddon; path: string } | undefined;

export function loadNative(): { addon: NativeAddon; path: string } {
  if (cached) return cached;
  const errors: string[] = [];
  for (const path of candidates()) {
    if (!existsSync(path)) {
      errors.push(`  ${path}: not found`);
      continue;
    }
    try {
      cached = { addon: require(path) as NativeAddon, path };
      return cached;
    } catch (e) {
      errors.push(`  ${path}: ${(e as Error).message}`);
    }
  }
  throw new TensorError(
    'NATIVE_LOAD',
    [
      'Could not load the native CPU backend of @megapatch/tensor. Tried:',
      ...errors,
      'Build it with `pnpm --filter @megapatch/tensor build:native` (needs cmake, a C++17 compiler and,',
      'for fast GEMM, libopenblas-dev), or point MEGAPATCH_TENSOR_NATIVE at a built megapatch_tensor.node.',
    ].join('\n'),
  );
}
