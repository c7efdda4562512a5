// The attention family of the CUDA backend (native/src/kernels/attention.cu): fused
// scaled-dot-product attention, flash-attention style (online softmax over key tiles, the per-row
// logsumexp saved for the backward, which recomputes the probabilities from it). The arguments
// are packed as the CPU backend's wrappers in @megapatch/tensor's src/ops/attention.ts pack them:
// the tensors, then hasMask, [mask], hasCuSeqlens, [cuSeqlens], causal, scale.
//
// cuSeqlens lives on the device: the op checks its values (start 0, non-decreasing, end at the
// token count) there too, as a deferred check raised at the next host read, and the kernels read it
// on the device without a host round trip, clamping every range to the rows (a bad cuSeqlens gives
// wrong values until the check raises, never an access outside the tensors).
import type { KernelTable } from '@megapatch/tensor';
import { type Entries, pack } from '../pack.js';

type AttentionKernels = Pick<KernelTable, 'attentionForward' | 'attentionBackward'>;
type Options = Parameters<KernelTable['attentionForward']>[5];

function packOptions(o: Options): void {
  pack.num(o.mask ? 1 : 0);
  if (o.mask) pack.tensor(o.mask);
  pack.num(o.cuSeqlens ? 1 : 0);
  if (o.cuSeqlens) pack.tensor(o.cuSeqlens);
  pack.num(o.causal ? 1 : 0).num(o.scale);
}

export function attentionKernels(call: Entries): AttentionKernels {
  return {
    attentionForward(out, lse, q, k, v, opts) {
      pack.begin().tensor(out).tensor(lse).tensor(q).tensor(k).tensor(v);
      packOptions(opts);
      call.attentionForward();
    },
    attentionBackward(dq, dk, dv, g, q, k, v, out, lse, opts) {
      pack
        .begin()
        .tensor(dq)
        .tensor(dk)
        .tensor(dv)
        .tensor(g)
        .tensor(q)
        .tensor(k)
        .tensor(v)
        .tensor(out)
        .tensor(lse);
      packOptions(opts);
      call.attentionBackward();
    },
  };
}
