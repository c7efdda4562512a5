// The built-in CPU backend: native kernels from native/src, called through the shared argument
// buffer (see common.h). Kernel families beyond the core set register themselves with
// defineCpuKernel from their op files.
import { ITEMSIZE } from '../dtype.js';
import { loadNative, type NativeAddon } from '../native.js';
import {
  BINARY_CODES,
  createPacker,
  type Packer,
  packGemm,
  packPhilox,
  REDUCE_CODES,
  UNARY_CODES,
} from './abi.js';
import type { Backend, GemmOperand } from './backend.js';
import { registerLazyBackend } from './backend.js';
import type { KernelName, KernelTable } from './kernels.js';

const UNARY = UNARY_CODES;
const BINARY = BINARY_CODES;
const REDUCE = REDUCE_CODES;

/**
 * The native addon, loaded on first use: importing @megapatch/tensor never loads it, so a
 * machine without the CPU build can still use another backend; the loader's actionable error
 * comes with the first CPU tensor (or backendInfo / setNumThreads).
 */
let addon: NativeAddon | null = null;
/** Kernels by name (the addon's functions, read from the shared argument buffer). */
let k: Record<string, () => void> = {};

function loadAddon(): NativeAddon {
  if (!addon) {
    const a = loadNative().addon;
    a.setArgBuffer(pack.args);
    addon = a;
    k = a as unknown as Record<string, () => void>;
  }
  return addon;
}

/**
 * The addon's functions for kernel wrappers in op files. Every CPU kernel runs on CPU tensors, so
 * the CPU backend (and with it the addon) exists by the time one is called.
 */
export const native: NativeAddon = new Proxy({} as NativeAddon, {
  get: (_, name) => (loadAddon() as unknown as Record<string | symbol, unknown>)[name],
});

/**
 * Writes kernel arguments into the CPU addon's argument buffer: `pack.begin()`, then
 * `tensor()`/`num()` in the order the kernel reads them, then call the kernel with no arguments.
 */
export const pack: Packer = createPacker();

const fused = new Map<KernelName, KernelTable[KernelName]>();

/** Registers a fused CPU kernel under a name that ops look up with backend.kernel(name). */
export function defineCpuKernel<K extends KernelName>(name: K, fn: KernelTable[K]): KernelTable[K] {
  fused.set(name, fn);
  return fn;
}

export const cpuBackend: Backend = {
  device: 'cpu',
  alloc: (bytes, zero) => loadAddon().alloc(bytes, zero),
  free: (address) => loadAddon().free(address),
  emptyCache: () => loadAddon().emptyCache(),
  cachedBytes: () => loadAddon().cachedBytes(),
  copy(dst, src) {
    pack.begin().tensor(dst).tensor(src);
    k.copy();
  },
  fill(t, value) {
    pack.begin().tensor(t).num(value);
    k.fill();
  },
  read(t, dst) {
    loadAddon().readInto(pack.address(t), t.numel * ITEMSIZE[t.dtype], dst);
  },
  write(t, src) {
    loadAddon().writeFrom(pack.address(t), src);
  },
  unary(out, x, op, p0 = Number.NaN, p1 = Number.NaN) {
    pack.begin().tensor(out).tensor(x).num(UNARY[op]).num(p0).num(p1);
    k.unary();
  },
  binary(out, x, y, op, alpha = 1) {
    pack.begin().tensor(out).tensor(x).tensor(y).num(BINARY[op]).num(alpha);
    k.binary();
  },
  binaryScalar(out, x, s, op, reverse = false) {
    pack
      .begin()
      .tensor(out)
      .tensor(x)
      .num(s)
      .num(BINARY[op])
      .num(reverse ? 1 : 0);
    k.binaryScalar();
  },
  where(out, cond, x, y) {
    pack.begin().tensor(out).tensor(cond).tensor(x).tensor(y);
    k.where();
  },
  reduce(x, out, indices, outer, R, inner, op, p) {
    pack
      .begin()
      .tensor(x)
      .tensor(out)
      .num(indices ? 1 : 0);
    if (indices) pack.tensor(indices);
    pack.num(outer).num(R).num(inner).num(REDUCE[op]).num(p);
    k.reduce();
  },
  cumsum(x, out, outer, R, inner) {
    pack.begin().tensor(x).tensor(out).num(outer).num(R).num(inner);
    k.cumsum();
  },
  gemm(batch, M, N, K, a: GemmOperand, b: GemmOperand, c: GemmOperand, alpha, beta) {
    packGemm(pack, batch, M, N, K, a, b, c, alpha, beta);
    k.gemm();
  },
  random(out, dist, seed, offset, a, b) {
    packPhilox(pack, out, dist, seed, offset, a, b);
    k.philox();
  },
  kernel<K extends KernelName>(name: K): KernelTable[K] | undefined {
    return fused.get(name) as KernelTable[K] | undefined;
  },
};

// made on first use: the addon loads with the first CPU tensor
registerLazyBackend('cpu', () => {
  loadAddon();
  return cpuBackend;
});

/** Information about the native build: BLAS in use, SIMD level, OpenMP, threads, bf16 GEMM engine. */
export function backendInfo(): ReturnType<NativeAddon['buildInfo']> & { addonPath: string } {
  return { ...loadAddon().buildInfo(), addonPath: loadNative().path };
}

/** Sets the number of threads used by native kernels and OpenBLAS. */
export function setNumThreads(n: number): void {
  loadAddon().setNumThreads(n);
}

export function getNumThreads(): number {
  return loadAddon().getNumThreads();
}
