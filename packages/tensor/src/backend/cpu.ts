// The built-in CPU backend: native kernels from native/src, called through the shared argument
// buffer (see common.h). Kernel families beyond the core set register themselves with
// defineCpuKernel from their op files.
import { DTYPE_CODES, ITEMSIZE } from '../dtype.js';
import { loadNative, type NativeAddon } from '../native.js';
import type { Tensor } from '../tensor.js';
import type { Backend, BinaryOp, GemmOperand, RandomDist, ReduceOp, UnaryOp } from './backend.js';
import { registerLazyBackend } from './backend.js';
import type { KernelName, KernelTable } from './kernels.js';

const UNARY: Record<UnaryOp, number> = {
  neg: 0,
  exp: 1,
  log: 2,
  sqrt: 3,
  rsqrt: 4,
  abs: 5,
  tanh: 6,
  sigmoid: 7,
  silu: 8,
  gelu: 9,
  geluTanh: 10,
  relu: 11,
  sin: 12,
  cos: 13,
  square: 14,
  reciprocal: 15,
  sign: 16,
  log1p: 17,
  expm1: 18,
  floor: 19,
  ceil: 20,
  round: 21,
  clamp: 22,
  logicalNot: 23,
  isnan: 24,
  isinf: 25,
};

const BINARY: Record<BinaryOp, number> = {
  add: 0,
  sub: 1,
  mul: 2,
  div: 3,
  pow: 4,
  maximum: 5,
  minimum: 6,
  eq: 7,
  ne: 8,
  lt: 9,
  le: 10,
  gt: 11,
  ge: 12,
  logicalAnd: 13,
  logicalOr: 14,
  siluBackward: 15,
  geluBackward: 16,
  geluTanhBackward: 17,
  sigmoidBackward: 18,
  tanhBackward: 19,
  reluBackward: 20,
  atan2: 21,
};

const REDUCE: Record<ReduceOp, number> = {
  sum: 0,
  mean: 1,
  max: 2,
  min: 3,
  argmax: 4,
  argmin: 5,
  var: 6,
  logsumexp: 7,
  norm: 8,
  prod: 9,
};

const DIST: Record<RandomDist, number> = { uniform: 0, normal: 1, randint: 2, bernoulli: 3 };

const ARGS = new Float64Array(8192);
let pos = 0;

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
    a.setArgBuffer(ARGS);
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
 * Writes kernel arguments into the shared buffer: `pack.begin()`, then `tensor()`/`num()` in
 * the order the kernel reads them, then call the kernel with no arguments.
 */
export interface Packer {
  begin(): Packer;
  tensor(t: Tensor): Packer;
  num(v: number): Packer;
  address(t: Tensor): number;
}

export const pack: Packer = {
  begin() {
    pos = 0;
    return pack;
  },
  tensor(t) {
    const shape = t.shape;
    const strides = t.strides;
    const nd = shape.length;
    ARGS[pos] = t.storage.address + t.offset * ITEMSIZE[t.dtype];
    ARGS[pos + 1] = DTYPE_CODES[t.dtype];
    ARGS[pos + 2] = nd;
    for (let i = 0; i < nd; i++) {
      ARGS[pos + 3 + i] = shape[i];
      ARGS[pos + 3 + nd + i] = strides[i];
    }
    pos += 3 + 2 * nd;
    return pack;
  },
  num(v) {
    ARGS[pos++] = v;
    return pack;
  },
  /** Address of element 0 of a tensor's view. */
  address(t) {
    return t.storage.address + t.offset * ITEMSIZE[t.dtype];
  },
};

const fused = new Map<KernelName, KernelTable[KernelName]>();

/** Registers a fused CPU kernel under a name that ops look up with backend.kernel(name). */
export function defineCpuKernel<K extends KernelName>(name: K, fn: KernelTable[K]): KernelTable[K] {
  fused.set(name, fn);
  return fn;
}

const U32 = 2 ** 32;

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
    pack.begin().num(DTYPE_CODES[c.tensor.dtype]).num(batch).num(M).num(N).num(K);
    for (const m of [a, b]) pack.num(pack.address(m.tensor)).num(m.bs).num(m.rs).num(m.cs);
    pack.num(pack.address(c.tensor)).num(c.bs).num(c.rs).num(alpha).num(beta);
    k.gemm();
  },
  random(out, dist, seed, offset, a, b) {
    const s = BigInt.asUintN(64, seed);
    pack
      .begin()
      .tensor(out)
      .num(DIST[dist])
      .num(Number(s % BigInt(U32)))
      .num(Number(s / BigInt(U32)))
      .num(Number(offset))
      .num(a)
      .num(b);
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
