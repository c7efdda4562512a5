// The tensor backend of a CUDA device (and of the emulator, which runs the same native entries on
// the CPU): @megapatch/tensor's Backend interface over the addon's entries. Kernels are queued on
// the device's stream and run asynchronously (`synchronous: false`): host reads (`readInto`) and
// `synchronize()` are the only waits, and index / loss checks are deferred to them by the tensor
// layer. Named kernels the backend has are listed in `kernels`; every other named kernel runs as
// its composition of core ops (@megapatch/tensor's fallbacks).
import type {
  Backend,
  BackendType,
  BinaryOp,
  GemmOperand,
  KernelName,
  KernelTable,
  RandomDist,
  ReduceOp,
  UnaryOp,
} from '@megapatch/tensor';
import { familyKernels } from './kernels/families.js';
import type { BackendAddon } from './native.js';
import { ARGS, address, DTYPE_CODE, type Entries, ITEMSIZE, pack } from './pack.js';

// Op codes: must match native/src/kernels/elementwise.cu (and @megapatch/tensor's CPU backend).
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

const U32 = 2 ** 32;

/**
 * The device type `type` ("cuda", or "cudaemu" for the emulator) over an addon: one Backend per
 * device index, each making its device current before every call.
 */
export function createCudaBackendType(addon: BackendAddon, type: string): BackendType {
  addon.setArgBuffer(ARGS);
  const k = addon as unknown as Entries;
  let active = -1;
  const named = familyKernels(k, addon.families);

  function create(index: number): Backend {
    const on = () => {
      if (active !== index) {
        addon.setDevice(index);
        active = index;
      }
    };
    const kernels = new Map<KernelName, KernelTable[KernelName]>();
    for (const [name, fn] of Object.entries(named) as [KernelName, KernelTable[KernelName]][]) {
      // every named kernel first makes this device current
      kernels.set(name, ((...args: unknown[]) => {
        on();
        return (fn as (...a: unknown[]) => unknown)(...args);
      }) as KernelTable[KernelName]);
    }
    const backend: Backend = {
      device: `${type}:${index}`,
      synchronous: false,
      alloc(bytes, zero) {
        on();
        return addon.alloc(bytes, zero);
      },
      free(addr) {
        on();
        addon.free(addr);
      },
      emptyCache() {
        on();
        addon.emptyCache();
      },
      cachedBytes() {
        on();
        return addon.cachedBytes();
      },
      copy(dst, src) {
        on();
        pack.begin().tensor(dst).tensor(src);
        k.copy();
      },
      fill(t, value) {
        on();
        pack.begin().tensor(t).num(value);
        k.fill();
      },
      read(t, dst) {
        on();
        addon.readInto(address(t), t.numel * ITEMSIZE[t.dtype], dst);
      },
      write(t, src) {
        on();
        addon.writeFrom(address(t), src);
      },
      unary(out, x, op, p0 = Number.NaN, p1 = Number.NaN) {
        on();
        pack.begin().tensor(out).tensor(x).num(UNARY[op]).num(p0).num(p1);
        k.unary();
      },
      binary(out, x, y, op, alpha = 1) {
        on();
        pack.begin().tensor(out).tensor(x).tensor(y).num(BINARY[op]).num(alpha);
        k.binary();
      },
      binaryScalar(out, x, s, op, reverse = false) {
        on();
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
        on();
        pack.begin().tensor(out).tensor(cond).tensor(x).tensor(y);
        k.where();
      },
      reduce(x, out, indices, outer, R, inner, op, p) {
        on();
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
        on();
        pack.begin().tensor(x).tensor(out).num(outer).num(R).num(inner);
        k.cumsum();
      },
      gemm(batch, M, N, K, a: GemmOperand, b: GemmOperand, c: GemmOperand, alpha, beta) {
        on();
        pack.begin().num(DTYPE_CODE[c.tensor.dtype]).num(batch).num(M).num(N).num(K);
        for (const m of [a, b]) pack.num(address(m.tensor)).num(m.bs).num(m.rs).num(m.cs);
        pack.num(address(c.tensor)).num(c.bs).num(c.rs).num(alpha).num(beta);
        k.gemm();
      },
      random(out, dist, seed, offset, a, b) {
        on();
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
        return kernels.get(name) as KernelTable[K] | undefined;
      },
    };
    return backend;
  }

  return {
    type,
    deviceCount: () => addon.deviceCount(),
    create,
  };
}
