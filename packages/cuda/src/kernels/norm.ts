// The normalisation and RoPE kernels of the CUDA backend (native/src/kernels/norm.cu): the
// arguments are packed as the CPU backend's wrappers in @megapatch/tensor's src/ops/norm.ts and
// src/ops/rope.ts pack them (optional operands as a flag followed by the tensor). Statistics
// (mean, rstd) and the weight / bias gradients are written into the given device tensors.
import type { KernelTable, Tensor } from '@megapatch/tensor';
import { type Entries, pack } from '../pack.js';

type NormKernels = Pick<KernelTable, 'normRows' | 'normRowsBackward' | 'ropeApply'>;

function optional(t: Tensor | null): void {
  pack.num(t ? 1 : 0);
  if (t) pack.tensor(t);
}

export function normKernels(call: Entries): NormKernels {
  return {
    normRows(y, x, weight, bias, mean, rstd, n, eps, center) {
      pack.begin().tensor(y).tensor(x);
      optional(weight);
      optional(bias);
      optional(mean);
      pack
        .tensor(rstd)
        .num(n)
        .num(eps)
        .num(center ? 1 : 0);
      call.normForward();
    },
    normRowsBackward(
      dx,
      g,
      x,
      weight,
      mean,
      rstd,
      dweight,
      dbias,
      n,
      center,
      accumulate = false,
      paramsIntoMain = false,
    ) {
      pack.begin().tensor(dx).tensor(g).tensor(x);
      optional(weight);
      optional(mean);
      pack.tensor(rstd);
      optional(dweight);
      optional(dbias);
      pack
        .num(n)
        .num(center ? 1 : 0)
        .num(accumulate ? 1 : 0)
        .num(paramsIntoMain ? 1 : 0);
      call.normBackward();
    },
    ropeApply(out, x, cos, sin, inverse) {
      pack
        .begin()
        .tensor(out)
        .tensor(x)
        .tensor(cos)
        .tensor(sin)
        .num(inverse ? 1 : 0);
      call.ropeApply();
    },
  };
}
