// Megatron's MoEAlltoAllTokenDispatcher. Each TP rank takes its share of the tokens (Megatron's
// MoE runs on the sequence-parallel split: under sequence parallelism that is the rank's own
// chunk; without it the TP ranks hold the same tokens, so the split is made at the layer's entry
// and undone at its exit), permutes them by expert, exchanges the token counts over the
// expert-parallel group and all-to-alls every token to the EP rank that owns its expert. With
// expert-TP > 1 the received tokens are all-gathered over the expert-TP group, whose ranks hold
// the slices of the same experts; the rows are then sorted by local expert. The way back reverses
// each step (unsort, reduce-scatter over expert-TP, the reverse all-to-all) and sums each token's
// expert outputs with its routing weights on the rank that routed it; without sequence
// parallelism the TP ranks then gather their shares again. Every step is differentiable; the
// backward of an all-to-all is the reverse all-to-all.
import { fromTypedArray, indexSelect, type Tensor } from '@megapatch/tensor';
import {
  allGatherCountsOnDevice,
  allGatherInts,
  allGatherRows,
  allToAllRows,
  gatherRows,
  reduceScatterRows,
  splitRows,
} from './collectives.js';
import type { Routing } from './router.js';
import {
  type DispatchedTokens,
  type Pairs,
  pairsInRows,
  pairWeights,
  pairWeightsOf,
  selectRows,
  splitCounts,
  type TokenDispatcher,
  type TokenDispatcherOptions,
  total,
  weightedRows,
} from './token-dispatcher.js';

/** Megatron's alltoall token dispatcher. */
export class MoEAlltoAllTokenDispatcher implements TokenDispatcher {
  readonly type = 'alltoall';

  constructor(private readonly o: TokenDispatcherOptions) {}

  dispatch(hidden: Tensor, routing: Routing): DispatchedTokens {
    const { tpGroup, epGroup, etpGroup, numExperts: E, firstExpert, numLocalExperts: L } = this.o;
    const T = hidden.shape[0];
    const tp = tpGroup.size;
    const ep = epGroup.size;
    const etp = etpGroup.size;

    // This TP rank's share of the tokens (under sequence parallelism, the tokens it holds).
    let x = hidden;
    let probs = routing.probs;
    let pairs: Pairs = routing.routingMap;
    const tpCounts = tp > 1 && !this.o.sequenceParallel ? splitCounts(T, tp) : null;
    if (tpCounts) {
      const start = total(tpCounts.slice(0, tpGroup.rank));
      const k = T > 0 ? probs.numel / T : 0;
      x = splitRows(hidden, tpCounts, tpGroup);
      probs = splitRows(probs, tpCounts, tpGroup);
      pairs = pairsInRows(pairs, start, tpCounts[tpGroup.rank]);
      pairs.slot = pairs.slot.map((s) => (s < 0 ? s : s - start * k));
    }
    const localRows = x.shape[0];
    // the pairs on the router's device when it built them there (and this rank routes all its tokens)
    const dev = tpCounts ? undefined : pairs.device;
    const weights = dev ? pairWeightsOf(probs, dev.slot, dev.padding) : pairWeights(probs, pairs.slot);

    // Permutation 1: the tokens sorted by expert, hence by the EP rank that owns it.
    const sent = dev ? indexSelect(x, 0, dev.token) : selectRows(x, pairs.token);
    if (ep === 1 && etp === 1 && dev?.counts) {
      // every expert here and nothing to exchange: the sorted tokens are the experts' input and the
      // router's device counts their sizes, so nothing is read back (the general path below with
      // its permutations the identity)
      const counts = dev.counts;
      return {
        tokens: sent,
        tokensPerExpert: counts,
        combine: (y) => weightedRows(y, weights, dev.token, localRows, hidden),
      };
    }
    // every EP rank's pairs per expert; with the router's counts on its device they are gathered
    // there and the host reads them once, this rank's with the others'. Padded maps (every expert
    // at min(capacity, T)) need no exchange: each EP rank routes T tokens too, as in Megatron's
    // drop-and-pad all-to-all, which sends equal splits without a sync.
    const uniform = pairs.padded === true && !tpCounts;
    let counts: Int32Array[];
    if (uniform) counts = new Array<Int32Array>(ep).fill(pairs.counts);
    else if (ep > 1 && dev?.counts) {
      counts = allGatherCountsOnDevice(localRows, dev.counts, epGroup).map((c) => c.subarray(1));
      pairs.counts = counts[epGroup.rank];
    } else counts = ep > 1 ? allGatherInts(pairs.counts, epGroup) : [pairs.counts];
    const perRank = E / ep;
    const sendCounts = Array.from({ length: ep }, (_, j) =>
      total(pairs.counts.subarray(j * perRank, (j + 1) * perRank)),
    );
    // recvBlocks[j][e]: rows EP rank j sends for local expert e.
    const recvBlocks = counts.map((c) => Array.from(c.subarray(firstExpert, firstExpert + L)));
    const recvCounts = recvBlocks.map((b) => total(b));
    const received = ep > 1 ? allToAllRows(sent, sendCounts, recvCounts, epGroup) : sent;

    // blocks[i][j][e]: rows expert-TP rank i received from EP rank j for local expert e.
    const blocks =
      etp > 1 && !uniform
        ? allGatherInts(Int32Array.from(recvBlocks.flat()), etpGroup).map((m) =>
            Array.from({ length: ep }, (_, j) => Array.from(m.subarray(j * L, (j + 1) * L))),
          )
        : new Array<number[][]>(etp).fill(recvBlocks);
    const etpCounts = blocks.map((b) => total(b.flat()));
    const gathered = etp > 1 ? allGatherRows(received, etpCounts, etpGroup) : received;

    // Permutation 2: rows sorted by local expert (rows arrive by expert-TP rank, EP rank, expert).
    const offsets: number[][][] = [];
    let off = 0;
    for (const bi of blocks) {
      offsets.push(
        bi.map((bij) =>
          bij.map((n) => {
            const o = off;
            off += n;
            return o;
          }),
        ),
      );
    }
    const perm: number[] = [];
    const tokensPerExpert = new Array<number>(L).fill(0);
    for (let e = 0; e < L; e++) {
      blocks.forEach((bi, i) => {
        bi.forEach((bij, j) => {
          for (let r = 0; r < bij[e]; r++) perm.push(offsets[i][j][e] + r);
          tokensPerExpert[e] += bij[e];
        });
      });
    }
    const sorted = perm.some((p, i) => p !== i);
    const inverse = new Int32Array(perm.length);
    perm.forEach((p, i) => {
      inverse[p] = i;
    });

    return {
      tokens: sorted ? selectRows(gathered, perm) : gathered,
      tokensPerExpert,
      combine: (y) => {
        let z = sorted ? selectRows(y, inverse) : y;
        if (etp > 1) z = reduceScatterRows(z, etpCounts, etpGroup);
        if (ep > 1) z = allToAllRows(z, recvCounts, sendCounts, epGroup);
        const rows = dev ? dev.token : fromTypedArray(Int32Array.from(pairs.token), [pairs.token.length]);
        let out = weightedRows(z, weights, rows, localRows, hidden);
        if (tpCounts) out = gatherRows(out, tpCounts, tpGroup);
        return out;
      },
    };
  }
}
