// The indexing kernels of the CUDA backend (native/src/kernels/index.cu): the arguments are packed
// as the CPU backend's wrappers in @megapatch/tensor's src/ops/indexing.ts pack them, with the
// `bad` report tensor (float64 [2] on the device) last for the five index-checking kernels. The
// kernels fill `bad` on the stream; the op queues its check, which reads it at the next host sync.
import type { KernelTable } from '@megapatch/tensor';
import { type Entries, pack } from '../pack.js';

type IndexingKernels = Pick<
  KernelTable,
  'indexSelectRows' | 'indexAddRows' | 'gatherAlong' | 'scatterAddAlong' | 'topk' | 'triangle' | 'oneHot'
>;

export function indexingKernels(call: Entries): IndexingKernels {
  return {
    indexSelectRows(out, x, index, outer, S, inner, bad) {
      pack.begin().tensor(out).tensor(x).tensor(index).num(outer).num(S).num(inner).tensor(bad);
      call.indexSelectRows();
    },
    indexAddRows(out, base, src, index, outer, S, inner, alpha, skip, bad) {
      pack
        .begin()
        .tensor(out)
        .num(base ? 1 : 0);
      if (base) pack.tensor(base);
      pack.tensor(src).tensor(index).num(outer).num(S).num(inner).num(alpha).num(skip).tensor(bad);
      call.indexAddRows();
    },
    gatherAlong(out, x, index, dim, bad) {
      pack.begin().tensor(out).tensor(x).tensor(index).num(dim).tensor(bad);
      call.gatherAlong();
    },
    scatterAddAlong(out, src, index, dim, alpha, bad) {
      pack.begin().tensor(out).tensor(src).tensor(index).num(dim).num(alpha).tensor(bad);
      call.scatterAddAlong();
    },
    topk(values, indices, x, outer, R, inner, k, largest) {
      pack
        .begin()
        .tensor(values)
        .tensor(indices)
        .tensor(x)
        .num(outer)
        .num(R)
        .num(inner)
        .num(k)
        .num(largest ? 1 : 0);
      call.topk();
    },
    triangle(out, x, diagonal, upper) {
      pack
        .begin()
        .tensor(out)
        .tensor(x)
        .num(diagonal)
        .num(upper ? 1 : 0);
      call.triangle();
    },
    oneHot(out, index, classes, bad) {
      pack.begin().tensor(out).tensor(index).num(classes).tensor(bad);
      call.oneHot();
    },
  };
}
