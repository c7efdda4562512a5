// What a MoE token dispatcher does (Megatron's MoETokenDispatcher): take the tokens of this rank
// with their routing, hand this rank's experts their tokens grouped by expert, and bring the
// experts' outputs back to the tokens' ranks, summed per token with the routing weights. Two
// implementations, chosen like Megatron's moe_token_dispatcher_type: 'allgather'
// (allgather-dispatcher.ts) and 'alltoall' (alltoall-dispatcher.ts). The helpers below are shared.
import type { ProcessGroup } from '@megapatch/parallel';
import {
  cat,
  fromTypedArray,
  indexAdd,
  indexSelect,
  noGrad,
  type Tensor,
  where,
  zeros,
} from '@megapatch/tensor';
import type { Routing } from './router.js';
import type { PairTensors } from './routing-map.js';

/** Megatron's moe_token_dispatcher_type. */
export type MoETokenDispatcherType = 'allgather' | 'alltoall';

/** The experts of this rank and the groups tokens move over. */
export interface TokenDispatcherOptions {
  /** Tensor-parallel group of the layer. */
  tpGroup: ProcessGroup;
  /**
   * Sequence parallelism: each TP rank holds its own chunk of the sequence, dispatched as it is and
   * combined back on this rank. Without it the TP ranks hold the same tokens and each dispatches
   * its share, gathered again over TP after the combine.
   */
  sequenceParallel: boolean;
  /** Expert-parallel group: experts are split into contiguous blocks over it. */
  epGroup: ProcessGroup;
  /** Expert tensor-parallel group: each expert's FFN is split over it. */
  etpGroup: ProcessGroup;
  numExperts: number;
  /** Global id of this rank's first expert. */
  firstExpert: number;
  numLocalExperts: number;
}

/** This rank's experts' input, and the way back. */
export interface DispatchedTokens {
  /** Rows [N, h] grouped by local expert, expert 0's first. */
  tokens: Tensor;
  /**
   * Rows of each local expert: on the host, or (int64 [local experts]) where the router counted
   * them, when nothing had to bring them to the host (EP = 1, every expert here): the grouped GEMM
   * then takes them there, and the host need not wait for the router.
   */
  tokensPerExpert: number[] | Tensor;
  /**
   * The experts' outputs [N, h] (rows as in `tokens`) -> [T, h]: for each token this rank routed,
   * the sum over its experts of weight × output.
   */
  combine(expertOutput: Tensor): Tensor;
}

/** Megatron's MoETokenDispatcher. */
export interface TokenDispatcher {
  readonly type: MoETokenDispatcherType;
  /** Tokens hidden [T, h] routed by `routing` -> the input of this rank's experts. */
  dispatch(hidden: Tensor, routing: Routing): DispatchedTokens;
}

/** The (token, expert) pairs of a block of tokens, grouped by expert (see RoutingMap). */
export interface Pairs {
  /** Token row of each pair, relative to the block. */
  token: Int32Array;
  /** Slot of each pair's weight in the router's probs [T·k], or −1 for padding. */
  slot: Int32Array;
  /** Pairs per expert [E]. */
  counts: Int32Array;
  /** token and slot on the router's device, when the router built the map there. */
  device?: PairTensors;
  /** Every expert at min(capacity, T) pairs: the counts follow from T (see RoutingMap.padded). */
  padded?: boolean;
}

/** Rows of each rank when `n` rows are split over `size` ranks, the first ones taking the extra rows. */
export function splitCounts(n: number, size: number): number[] {
  const base = Math.floor(n / size);
  const extra = n % size;
  return Array.from({ length: size }, (_, r) => base + (r < extra ? 1 : 0));
}

/** The pairs whose token lies in rows [start, start + n), tokens renumbered from 0. */
export function pairsInRows(all: Pairs, start: number, n: number): Pairs {
  const E = all.counts.length;
  const counts = new Int32Array(E);
  const token: number[] = [];
  const slot: number[] = [];
  let p = 0;
  for (let e = 0; e < E; e++) {
    for (let i = 0; i < all.counts[e]; i++, p++) {
      const t = all.token[p];
      if (t >= start && t < start + n) {
        token.push(t - start);
        slot.push(all.slot[p]);
        counts[e]++;
      }
    }
  }
  return { token: Int32Array.from(token), slot: Int32Array.from(slot), counts };
}

/** The routing weight of each pair [P] (float32, differentiable; 0 for padding) from probs [T, k]. */
export function pairWeights(probs: Tensor, slot: Int32Array): Tensor {
  let flat = probs.reshape(probs.numel);
  let idx = slot;
  if (slot.some((s) => s < 0)) {
    // padding reads an appended zero, so it carries no gradient
    flat = cat([flat, zeros([1], { dtype: flat.dtype })], 0);
    idx = slot.map((s) => (s < 0 ? probs.numel : s));
  }
  return indexSelect(flat, 0, fromTypedArray(Int32Array.from(idx), [idx.length]));
}

/**
 * The routing weight of each pair [P] (float32, differentiable) from probs [T, k], by device slots;
 * with `padding`, slots of −1 read an appended zero (no gradient), as {@link pairWeights} does.
 */
export function pairWeightsOf(probs: Tensor, slot: Tensor, padding = false): Tensor {
  const flat = probs.reshape(probs.numel);
  if (!padding) return indexSelect(flat, 0, slot);
  const at = noGrad(() => where(slot.lt(0), probs.numel, slot));
  return indexSelect(cat([flat, zeros([1], { dtype: flat.dtype, device: flat.device })], 0), 0, at);
}

/**
 * A combine's sum: weights[i] × y[i] for each pair i, added into row rows[i] of n zero rows (with
 * like's width, dtype and device): each token's experts' outputs summed with its routing weights.
 */
export function weightedRows(y: Tensor, weights: Tensor, rows: Tensor, n: number, like: Tensor): Tensor {
  const w = weights.unsqueeze(1).to(y.dtype);
  const zero = zeros([n, like.shape[1]], { dtype: like.dtype, device: like.device });
  return indexAdd(zero, 0, rows, y.mul(w));
}

/** rows[i] of x for each i: [rows.length, ...]. */
export function selectRows(x: Tensor, rows: ArrayLike<number>): Tensor {
  return indexSelect(x, 0, fromTypedArray(Int32Array.from(rows), [rows.length]));
}

/** Whether two groups hold the same ranks in the same order. */
export function sameRanks(a: ProcessGroup, b: ProcessGroup): boolean {
  return a === b || (a.size === b.size && a.ranks.every((r, i) => r === b.ranks[i]));
}

/** Sum of a few numbers. */
export function total(xs: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < xs.length; i++) s += xs[i];
  return s;
}
