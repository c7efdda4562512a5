// The tensor backend of a CUDA device (and of the emulator, which runs the same native entries on
// the CPU): @megapatch/tensor's Backend interface over the addon's entries. Kernels are queued on
// the device's stream and run asynchronously (`synchronous: false`): host reads (`readInto`) and
// `synchronize()` are the only waits, and index / loss checks are deferred to them by the tensor
// layer. Named kernels the backend has are listed in `kernels`; every other named kernel runs as
// its composition of core ops (@megapatch/tensor's fallbacks).
import type {
  Backend,
  BackendType,
  DeviceCollectives,
  GemmOperand,
  KernelName,
  KernelTable,
} from '@megapatch/tensor';
import { BINARY_CODES, packGemm, packPhilox, REDUCE_CODES, UNARY_CODES } from '@megapatch/tensor/abi';
import { familyKernels } from './kernels/families.js';
import type { BackendAddon } from './native.js';
import { createCollectives } from './nccl.js';
import { ARGS, address, ITEMSIZE, note, noteGemm, pack } from './pack.js';
import { profiledEntries } from './profile.js';

// op codes shared with every native backend (native/src/kernels/elementwise.cu, reduce.h, random.cu)
const UNARY = UNARY_CODES;
const BINARY = BINARY_CODES;
const REDUCE = REDUCE_CODES;

/**
 * The device type `type` ("cuda", or "cudaemu" for the emulator) over an addon: one Backend per
 * device index, each making its device current before every call.
 */
export function createCudaBackendType(addon: BackendAddon, type: string): BackendType {
  addon.setArgBuffer(ARGS);
  let active = -1;
  // the entries, timed per device while a kernel profile runs there (profile.ts)
  const { entries: k, register } = profiledEntries(addon, type, () => active);
  const named: Partial<KernelTable> = {
    ...familyKernels(k, addon.families),
    // an elementwise kernel, present in every build
    accumulateGrad(dst, src) {
      pack.begin().tensor(dst).tensor(src);
      k.accumulateGrad();
    },
  };

  function create(index: number): Backend {
    const on = () => {
      if (active !== index) {
        addon.setDevice(index);
        active = index;
      }
    };
    register(index, on);
    const kernels = new Map<KernelName, KernelTable[KernelName]>();
    let collectives: DeviceCollectives | null | undefined;
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
      // RoPE and attention outputs in their inputs' memory order (no copies around attention)
      preferInputLayout: true,
      alloc(bytes, zero) {
        on();
        return addon.alloc(bytes, zero);
      },
      free(addr) {
        on();
        addon.free(addr);
      },
      synchronize() {
        on();
        addon.synchronize();
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
      readMany(ts, dsts) {
        on();
        addon.readIntoMany(
          Float64Array.from(ts, (t) => address(t)),
          Float64Array.from(ts, (t) => t.numel * ITEMSIZE[t.dtype]),
          dsts,
        );
      },
      write(t, src) {
        on();
        addon.writeFrom(address(t), src);
      },
      unary(out, x, op, p0 = Number.NaN, p1 = Number.NaN) {
        on();
        pack.begin().tensor(out).tensor(x).num(UNARY[op]).num(p0).num(p1);
        if (note.active) note.tag = op;
        k.unary();
      },
      binary(out, x, y, op, alpha = 1) {
        on();
        pack.begin().tensor(out).tensor(x).tensor(y).num(BINARY[op]).num(alpha);
        if (note.active) note.tag = op;
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
        if (note.active) note.tag = op;
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
        if (note.active) note.tag = op;
        k.reduce();
      },
      cumsum(x, out, outer, R, inner) {
        on();
        pack.begin().tensor(x).tensor(out).num(outer).num(R).num(inner);
        k.cumsum();
      },
      gemm(batch, M, N, K, a: GemmOperand, b: GemmOperand, c: GemmOperand, alpha, beta) {
        on();
        packGemm(pack, batch, M, N, K, a, b, c, alpha, beta);
        noteGemm(M, N, K, ITEMSIZE[c.tensor.dtype], batch);
        k.gemm();
      },
      random(out, dist, seed, offset, a, b) {
        on();
        packPhilox(pack, out, dist, seed, offset, a, b);
        k.philox();
      },
      kernel<K extends KernelName>(name: K): KernelTable[K] | undefined {
        return kernels.get(name) as KernelTable[K] | undefined;
      },
      collectives() {
        if (collectives === undefined) collectives = createCollectives(addon, `${type}:${index}`, on);
        return collectives;
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
