// Megatron's MoEAllGatherTokenDispatcher: every rank of the expert-parallel group (and of the
// expert-TP group when the tokens differ over it) gathers all their tokens, routing weights and
// routing maps, runs its own experts on the tokens routed to them, and reduce-scatters the
// weighted outputs back (the reduction also sums the expert-TP partial outputs).
// Without sequence parallelism the TP ranks hold the same tokens. With expert-TP = TP they stay
// replicated over the expert-TP group (its ranks compute their slice of every expert on the same
// tokens, then all-reduce); with expert-TP ≠ TP each TP rank first keeps its share of the tokens,
// as sequence parallelism would give it, so that every token is computed once per expert slice.
// Under sequence parallelism each TP rank already holds its own chunk: it is dispatched as it is,
// gathered over expert-TP too (Megatron's tp_ep group), and the combine returns it to this rank.
// Device maps are gathered where they are: dropless ones with each rank's counts (one read a
// stage), padded ones (every expert at min(capacity, T)) in equal blocks without any read.
import {
  copyToTensorModelParallelRegion,
  type ProcessGroup,
  reduceFromTensorModelParallelRegion,
} from '@megapatch/parallel';
import {
  arange,
  fromTypedArray,
  indexSelect,
  logicalAnd,
  noGrad,
  type Tensor,
  tidy,
  where,
} from '@megapatch/tensor';
import {
  allGatherCountsOnDevice,
  allGatherInts,
  allGatherIntsV,
  allGatherRows,
  gatherRows,
  reduceScatterRows,
  splitRows,
} from './collectives.js';
import type { Routing } from './router.js';
import { type PairTensors, routingMapOnDevice } from './routing-map.js';
import {
  type DispatchedTokens,
  type Pairs,
  pairsInRows,
  pairWeights,
  pairWeightsOf,
  sameRanks,
  selectRows,
  splitCounts,
  type TokenDispatcher,
  type TokenDispatcherOptions,
  total,
  weightedRows,
} from './token-dispatcher.js';

/** The tokens of one router call after gathering: its rows and pairs per expert. */
interface Block {
  rows: number;
  counts: Int32Array;
}

/** Megatron's allgather token dispatcher. */
export class MoEAllGatherTokenDispatcher implements TokenDispatcher {
  readonly type = 'allgather';
  /** The tokens are the same on every expert-TP rank (expert-TP = TP): no gather over it. */
  private readonly etpReplicated: boolean;
  /** Each TP rank dispatches its share of the tokens (expert-TP ≠ TP). */
  private readonly splitTp: boolean;

  constructor(private readonly o: TokenDispatcherOptions) {
    const etpIsTp = sameRanks(o.etpGroup, o.tpGroup);
    this.etpReplicated = etpIsTp && !o.sequenceParallel;
    this.splitTp = o.tpGroup.size > 1 && !etpIsTp && !o.sequenceParallel;
  }

  dispatch(hidden: Tensor, routing: Routing): DispatchedTokens {
    const { tpGroup, epGroup, etpGroup, numExperts: E, firstExpert, numLocalExperts } = this.o;
    const T = hidden.shape[0];
    let x = hidden;
    let probs = routing.probs;
    let pairs: Pairs = routing.routingMap;
    const tpCounts = this.splitTp ? splitCounts(T, tpGroup.size) : null;
    if (tpCounts) {
      const start = total(tpCounts.slice(0, tpGroup.rank));
      const k = T > 0 ? probs.numel / T : 0;
      x = splitRows(hidden, tpCounts, tpGroup);
      probs = splitRows(probs, tpCounts, tpGroup);
      pairs = pairsInRows(pairs, start, tpCounts[tpGroup.rank]);
      pairs.slot = pairs.slot.map((s) => (s < 0 ? s : s - start * k));
    }
    // Gather over EP, then over expert-TP when its ranks hold other tokens (Megatron's tp_ep group).
    const stages = [epGroup, ...(this.etpReplicated ? [] : [etpGroup])].filter((g) => g.size > 1);
    const etpCopy = this.etpReplicated && etpGroup.size > 1;
    if (pairs.device && stages.length === 0 && !tpCounts) {
      // Nothing to gather (EP = 1, so every expert is local): the pairs as the router built them
      // on its device, in expert order, index the tokens and the weights there.
      const dev = pairs.device;
      let w = pairWeightsOf(probs, dev.slot, dev.padding);
      let xs = x;
      if (etpCopy) {
        xs = copyToTensorModelParallelRegion(xs, etpGroup);
        w = copyToTensorModelParallelRegion(w, etpGroup);
      }
      // every expert is local: the router's device counts are the grouped GEMM's sizes as they are
      return {
        tokens: indexSelect(xs, 0, dev.token),
        tokensPerExpert:
          dev.counts ?? Array.from(pairs.counts.subarray(firstExpert, firstExpert + numLocalExperts)),
        combine: (y) => {
          const out = weightedRows(y, w, dev.token, T, hidden);
          return this.backToRanks(out, stages, []);
        },
      };
    }
    if (pairs.device?.counts && !tpCounts) return this.gatherOnDevice(x, probs, routing, stages);
    if (pairs.device && pairs.padded && !tpCounts) return this.gatherPadded(x, probs, pairs, stages);
    let weights = pairWeights(probs, pairs.slot);
    let tokens = pairs.token;
    let blocks: Block[] = [{ rows: x.shape[0], counts: pairs.counts }];
    const stageRows: number[][] = [];
    for (const g of stages) {
      const perRank = allGatherInts(encodeBlocks(blocks, E), g).map((m) => decodeBlocks(m, E));
      const rowCounts = perRank.map((bs) => bs.reduce((a, b) => a + b.rows, 0));
      const pairCounts = perRank.map((bs) => bs.reduce((a, b) => a + total(b.counts), 0));
      x = allGatherRows(x, rowCounts, g);
      weights = allGatherRows(weights, pairCounts, g);
      tokens = allGatherIntsV(tokens, pairCounts, g);
      blocks = perRank.flat();
      stageRows.push(rowCounts);
    }
    if (etpCopy) {
      x = copyToTensorModelParallelRegion(x, etpGroup);
      weights = copyToTensorModelParallelRegion(weights, etpGroup);
    }

    // This rank's experts' pairs, expert by expert, each in gathered order.
    const rowOf: number[] = [];
    const pairOf: number[] = [];
    const tokensPerExpert = new Array<number>(numLocalExperts).fill(0);
    for (let e = 0; e < numLocalExperts; e++) {
      const ge = firstExpert + e;
      let rowOff = 0;
      let pairOff = 0;
      for (const b of blocks) {
        let p = pairOff;
        for (let f = 0; f < ge; f++) p += b.counts[f];
        for (let i = 0; i < b.counts[ge]; i++, p++) {
          rowOf.push(rowOff + tokens[p]);
          pairOf.push(p);
        }
        tokensPerExpert[e] += b.counts[ge];
        rowOff += b.rows;
        pairOff += total(b.counts);
      }
    }
    const gatheredRows = x.shape[0];
    const gatheredWeights = weights;
    return {
      tokens: selectRows(x, rowOf),
      tokensPerExpert,
      combine: (y) => {
        const rows = fromTypedArray(Int32Array.from(rowOf), [rowOf.length]);
        let out = weightedRows(y, selectRows(gatheredWeights, pairOf), rows, gatheredRows, hidden);
        out = this.backToRanks(out, stages, stageRows);
        if (tpCounts) out = gatherRows(out, tpCounts, tpGroup);
        return out;
      },
    };
  }

  /**
   * The way back of a combine's weighted sum over the gathered rows: the expert-TP partial outputs
   * summed where the tokens were replicated over expert-TP, then each gather stage undone in
   * reverse (reduce-scatter: every rank keeps its own rows, summed over the ranks' experts).
   */
  private backToRanks(out: Tensor, stages: readonly ProcessGroup[], stageRows: readonly number[][]): Tensor {
    let r = out;
    if (this.etpReplicated && this.o.etpGroup.size > 1)
      r = reduceFromTensorModelParallelRegion(r, this.o.etpGroup);
    for (let s = stages.length - 1; s >= 0; s--) r = reduceScatterRows(r, stageRows[s], stages[s]);
    return r;
  }

  /**
   * A padded map without a TP split: every expert has min(capacity, T) pairs on every rank (each
   * routing T tokens, as Megatron's drop-and-pad assumes), so each rank's rows, pair weights and
   * pair tokens are gathered where they are in equal blocks, and this rank's experts' pairs sit at
   * places the sizes alone give: block b's rows start at b·T, its expert f's pairs at b·P + f·C.
   * Nothing is read back (Megatron's allgather dispatcher reads its tokens per expert even then).
   */
  private gatherPadded(
    hidden: Tensor,
    probs: Tensor,
    pairs: Pairs,
    stages: readonly ProcessGroup[],
  ): DispatchedTokens {
    const { etpGroup, numExperts: E, firstExpert, numLocalExperts: L } = this.o;
    const dev = pairs.device as PairTensors;
    const T = hidden.shape[0];
    const C = pairs.counts[0] ?? 0;
    const P = E * C;
    let x = hidden;
    let w = pairWeightsOf(probs, dev.slot, dev.padding);
    let token = dev.token;
    let B = 1;
    const stageRows: number[][] = [];
    for (const g of stages) {
      const rows = new Array<number>(g.size).fill(B * T);
      const pairCounts = new Array<number>(g.size).fill(B * P);
      x = allGatherRows(x, rows, g);
      w = allGatherRows(w, pairCounts, g);
      token = allGatherRows(token, pairCounts, g);
      B *= g.size;
      stageRows.push(rows);
    }
    const etpCopy = this.etpReplicated && etpGroup.size > 1;
    if (etpCopy) {
      x = copyToTensorModelParallelRegion(x, etpGroup);
      w = copyToTensorModelParallelRegion(w, etpGroup);
    }
    const places = new Int32Array(L * B * C);
    let i = 0;
    for (let e = 0; e < L; e++)
      for (let b = 0; b < B; b++) for (let c = 0; c < C; c++) places[i++] = b * P + (firstExpert + e) * C + c;
    const at = fromTypedArray(places, [places.length], { device: x.device });
    const rows = noGrad(() =>
      tidy(() => {
        const int64 = { dtype: 'int64' as const, device: token.device };
        const offsets = arange(0, B, 1, int64)
          .mul(T)
          .view(B, 1)
          .expand(B, P)
          .reshape(B * P);
        return indexSelect(token.add(offsets), 0, at);
      }),
    );
    const weights = indexSelect(w, 0, at);
    return {
      tokens: indexSelect(x, 0, rows),
      tokensPerExpert: new Array<number>(L).fill(B * C),
      combine: (y) => {
        let out = weightedRows(y, weights, rows, B * T, hidden);
        out = this.backToRanks(out, stages, stageRows);
        return out;
      },
    };
  }

  /**
   * Dropless routing without a TP split: the pairs are device tensors, so the tokens, their
   * routing weights and their expert ids are gathered as they are (only each rank's rows and
   * pairs per expert come to the host: one read a stage) and this rank's pairs are found among
   * the gathered ids where they are: the same rows in the same order as the host's bookkeeping.
   */
  private gatherOnDevice(
    hidden: Tensor,
    probs: Tensor,
    routing: Routing,
    stages: readonly ProcessGroup[],
  ): DispatchedTokens {
    const { etpGroup, numExperts: E, firstExpert, numLocalExperts: L } = this.o;
    const T = hidden.shape[0];
    const map = routing.routingMap;
    let x = hidden;
    let p = probs;
    let g = routing.ids;
    let blocks: Block[] | null = null;
    const stageRows: number[][] = [];
    for (const group of stages) {
      // each rank's rows and pairs per expert: the first gather takes this rank's counts where
      // the router made them, so that the host reads them once, with every other rank's
      const perRank: Block[][] = (
        blocks
          ? allGatherInts(encodeBlocks(blocks, E), group)
          : allGatherCountsOnDevice(T, (map.device as PairTensors & { counts: Tensor }).counts, group)
      ).map((m) => decodeBlocks(m, E));
      if (!blocks) map.counts = perRank[group.rank][0].counts;
      const rowCounts = perRank.map((bs) => bs.reduce((a, b) => a + b.rows, 0));
      x = allGatherRows(x, rowCounts, group);
      p = allGatherRows(p, rowCounts, group);
      g = allGatherRows(g, rowCounts, group);
      blocks = perRank.flat();
      stageRows.push(rowCounts);
    }
    if (this.etpReplicated && etpGroup.size > 1) {
      x = copyToTensorModelParallelRegion(x, etpGroup);
      p = copyToTensorModelParallelRegion(p, etpGroup);
    }
    const all = blocks as Block[];
    const tokensPerExpert = Array.from({ length: L }, (_, e) =>
      all.reduce((a, b) => a + b.counts[firstExpert + e], 0),
    );
    const n = total(tokensPerExpert);
    const pairs = localPairsOnDevice(g, firstExpert, L);
    const rows = pairs.token.narrow(0, 0, n);
    const w = pairWeightsOf(p, pairs.slot.narrow(0, 0, n));
    const gatheredRows = x.shape[0];
    return {
      tokens: indexSelect(x, 0, rows),
      tokensPerExpert,
      combine: (y) => {
        const out = weightedRows(y, w, rows, gatheredRows, hidden);
        return this.backToRanks(out, stages, stageRows);
      },
    };
  }
}

/**
 * The pairs of this rank's experts among gathered ids [N, k] (int64), where the ids are: every id
 * outside experts [first, first + L) goes to a bucket L after them, and the dropless map of L + 1
 * experts (routingMapOnDevice: by expert, then row) begins with this rank's pairs; the bucket's
 * pairs (which may repeat within a row) come after them and are cut off by the caller.
 */
function localPairsOnDevice(ids: Tensor, first: number, L: number): PairTensors {
  return noGrad(() =>
    tidy(() => {
      const rel = ids.sub(first);
      const mapped = where(logicalAnd(rel.ge(0), rel.lt(L)), rel, L);
      const { token, slot } = routingMapOnDevice(mapped, L + 1);
      return { token, slot };
    }),
  );
}

/** Blocks as ints: per block its rows, then its pairs per expert. */
function encodeBlocks(blocks: readonly Block[], E: number): Int32Array {
  const out = new Int32Array(blocks.length * (E + 1));
  blocks.forEach((b, i) => {
    out[i * (E + 1)] = b.rows;
    out.set(b.counts, i * (E + 1) + 1);
  });
  return out;
}

function decodeBlocks(m: Int32Array, E: number): Block[] {
  const n = m.length / (E + 1);
  return Array.from({ length: n }, (_, i) => ({
    rows: m[i * (E + 1)],
    counts: m.slice(i * (E + 1) + 1, (i + 1) * (E + 1)),
  }));
}
