// The optimizer kernels of the CUDA backend (native/src/kernels/optim.cu): the arguments are packed
// as the CPU backend's wrappers in @megapatch/tensor's src/optim/kernels.ts pack them. The two
// kernels that return a value on the CPU write it on the stream instead: normPowerSum into its
// float64 `out` scalar and unscaleCheck into its float32 `foundInf` flag (1 when it found inf or
// NaN, never reset), both passed last.
import type { DType, KernelTable, Tensor } from '@megapatch/tensor';
import { type Entries, pack } from '../pack.js';

type OptimKernels = Pick<KernelTable, 'adamwStep' | 'sgdStep' | 'normPowerSum' | 'unscaleCheck'>;

/** Throws unless `t` is a contiguous tensor of `dtype` with `n` elements (the CPU wrapper's check). */
function checkOutput(kernel: string, what: string, t: Tensor, dtype: DType, n: number): void {
  if (t.dtype !== dtype || t.numel !== n || !t.isContiguous) {
    throw new Error(
      `${kernel}: ${what} must be a contiguous ${dtype} tensor of ${n} element(s), got ${t.describe()}`,
    );
  }
}

export function optimKernels(call: Entries): OptimKernels {
  return {
    adamwStep(p, g, m, v, s) {
      pack
        .begin()
        .tensor(p)
        .tensor(g)
        .tensor(m)
        .tensor(v)
        .num(s.decay)
        .num(s.beta1)
        .num(1 - s.beta1)
        .num(s.beta2)
        .num(1 - s.beta2)
        .num(s.bc2Sqrt)
        .num(s.eps)
        .num(s.negStep);
      call.adamwStep();
    },
    sgdStep(p, g, buf, s) {
      pack
        .begin()
        .tensor(p)
        .tensor(g)
        .num(buf ? 1 : 0);
      if (buf) pack.tensor(buf);
      pack
        .num(-s.lr)
        .num(s.momentum)
        .num(1 - s.dampening)
        .num(s.weightDecay)
        .num(s.nesterov ? 1 : 0)
        .num(s.first ? 1 : 0);
      call.sgdStep();
    },
    normPowerSum(t, p, out) {
      checkOutput('normPowerSum', 'out', out, 'float64', 1);
      pack.begin().tensor(t).num(p).tensor(out);
      call.normPowerSum();
    },
    unscaleCheck(t, invScale, foundInf) {
      checkOutput('unscaleCheck', 'foundInf', foundInf, 'float32', 1);
      pack.begin().tensor(t).num(invScale).tensor(foundInf);
      call.unscaleCheck();
    },
  };
}
