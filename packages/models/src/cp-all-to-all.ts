// Context parallelism by all-to-all (Megatron's --cp-comm-type a2a, DeepSpeed-Ulysses): each CP
// rank holds its two load-balanced chunks of every sequence (as for the ring); before core
// attention one all-to-all trades them for a share of the heads over the whole sequence
// (heads / cp of them), attention runs locally on full sequences, and a second all-to-all brings
// the outputs back to the rank's own tokens. Backward: the same exchanges reversed. The sequence
// is put back in its natural order between the two (the chunks arrive in rank order), so causal
// masking and packed samples (global cuSeqlens) work as on one process.
import { contextParallelPlan, type ProcessGroup } from '@megapatch/parallel';
import { fromTypedArray, type Tensor } from '@megapatch/tensor';
import { ModelError } from './errors.js';
import { allToAllRows } from './moe/collectives.js';

/** The attention a rank runs on its heads over whole sequences: [b, n, S, d] (cuSeqlens: global). */
export type LocalAttention = (q: Tensor, k: Tensor, v: Tensor, cuSeqlens: Tensor | null) => Tensor;

/**
 * Core attention over a CP group by all-to-all: q [b, H, s, d], k [b, G, s, d], v [b, G, s, dv]
 * hold this rank's tokens (s = S / cp) of H query heads and G key/value heads, both multiples of
 * cp; `localCuSeqlens` are this rank's packed boundaries (each sample's global length / cp), or
 * null. Returns [b, H, s, dv] for this rank's tokens.
 */
export function allToAllAttention(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  group: ProcessGroup,
  localCuSeqlens: readonly number[] | null,
  attend: LocalAttention,
): Tensor {
  const cp = group.size;
  const [b, heads, s] = q.shape;
  const groups = k.shape[1];
  if (heads % cp !== 0 || groups % cp !== 0) {
    throw new ModelError(
      'UNSUPPORTED',
      `context parallelism by all-to-all (cpCommType a2a) splits the heads over the cp group: cp=${cp} must divide the ${heads} query and ${groups} key/value heads of each tensor-parallel rank; use cpCommType p2p`,
    );
  }
  const S = s * cp;
  const globalCu = localCuSeqlens ? localCuSeqlens.map((x) => x * cp) : null;
  // order[p]: the sequence index of the p-th token once every rank's tokens are stacked in rank order
  const order: number[] = [];
  for (let r = 0; r < cp; r++) {
    order.push(...contextParallelPlan(S, { size: cp, rank: r }, { cuSeqlens: globalCu }).tokenIndices);
  }
  const inverse = new Array<number>(S);
  for (const [p, i] of order.entries()) inverse[i] = p;
  const device = { device: q.device };
  const toNatural = fromTypedArray(BigInt64Array.from(inverse, BigInt), [S], device);
  const toRanks = fromTypedArray(BigInt64Array.from(order, BigInt), [S], device);
  const cu = globalCu ? fromTypedArray(Int32Array.from(globalCu), [globalCu.length], device) : null;
  const ones = new Array<number>(cp).fill(1);
  try {
    // [b, n, s, d] -> heads j·n/cp.. to rank j; from every rank its tokens of this rank's heads
    const toHeads = (x: Tensor): Tensor => {
      const [, n, , d] = x.shape;
      const rows = x
        .permute(1, 0, 2, 3)
        .contiguous()
        .reshape(cp, (n / cp) * b * s * d);
      return allToAllRows(rows, ones, ones, group)
        .reshape(cp, n / cp, b, s, d)
        .permute(2, 1, 0, 3, 4)
        .reshape(b, n / cp, S, d)
        .indexSelect(2, toNatural);
    };
    const out = attend(toHeads(q), toHeads(k), toHeads(v), cu); // [b, H/cp, S, dv]
    const dv = out.shape[3];
    const rows = out
      .indexSelect(2, toRanks)
      .reshape(b, heads / cp, cp, s, dv)
      .permute(2, 1, 0, 3, 4)
      .contiguous()
      .reshape(cp, (heads / cp) * b * s * dv);
    // from rank j: its heads for this rank's tokens, stacked in head order
    return allToAllRows(rows, ones, ones, group).reshape(heads, b, s, dv).permute(1, 0, 2, 3);
  } finally {
    toNatural.dispose();
    toRanks.dispose();
    cu?.dispose();
  }
}
