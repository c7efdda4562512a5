// Megatron's routing map after token dropping, as the list of (token, expert) pairs the experts
// compute, sorted by expert and, within an expert, by token (the order of Megatron's permute).
// Dropless routing keeps every top-k choice. With a capacity factor each expert takes at most
// capacity = ceil(T·k / E · factor) of the T tokens of one router call: moe_token_drop_policy
// 'probs' keeps the highest routing weights, 'position' the earliest tokens. Padding
// (moe_pad_expert_input_to_capacity) fills each expert up to the capacity with other tokens of
// weight 0, as Megatron's capacity mask does.
// Maps are built where the router's ids are (routingMapOnDevice, capacityRoutingMapOnDevice): at
// most the per-expert counts come back to the host, when a dispatcher needs them (with other
// ranks' under EP; at EP = 1 the grouped GEMM takes them on the device; with padding they follow
// from the token count alone); the pairs' tokens and slots stay device tensors for the dispatcher.
// buildRoutingMap is the same map made on the host from the ids, the reference of the tests.
import {
  arange,
  cumsum,
  gather,
  indexSelect,
  noGrad,
  ones,
  scatterAdd,
  type Tensor,
  tidy,
  topk,
  where,
  zeros,
} from '@megapatch/tensor';
import { ModelError } from '../errors.js';

/** Megatron's moe_token_drop_policy. */
export type TokenDropPolicy = 'probs' | 'position';

/** Token dropping settings (Megatron's --moe-expert-capacity-factor and companions). */
export interface CapacityOptions {
  /** moe_expert_capacity_factor: capacity = ceil(T·k / E · factor). */
  capacityFactor: number;
  /** Which tokens an over-full expert keeps (default 'probs'). */
  dropPolicy: TokenDropPolicy;
  /** Pad every expert's input to the capacity with weight-0 tokens (moe_pad_expert_input_to_capacity). */
  padToCapacity: boolean;
}

/** The (token, expert) pairs of one router call, grouped by expert. */
export interface RoutingMap {
  /** Token row of each pair [P]. */
  token: Int32Array;
  /** Slot t·k + j of the pair's weight in the router's probs [T, k], or −1 for padding (weight 0). */
  slot: Int32Array;
  /** Pairs of each expert [E]: expert e's pairs follow expert e − 1's. */
  counts: Int32Array;
  /** Tokens each expert may take, or null when dropless. */
  capacity: number | null;
  /**
   * Every expert has min(capacity, T) pairs (moe_pad_expert_input_to_capacity): the counts follow
   * from the number of tokens alone, so expert-parallel ranks that route as many tokens as this one
   * (as every rank of a training step does) know each other's counts without an exchange.
   */
  padded?: boolean;
  /**
   * The same `token` and `slot` as int64 tensors [P] on the router's device, when the map was
   * built there (as the router does): the dispatchers index with them, and `token` / `slot` are then
   * read back only when something asks for them.
   */
  device?: PairTensors;
}

/** A routing map's pairs as tensors on the router's device (int64 [P]). */
export interface PairTensors {
  token: Tensor;
  /** As RoutingMap.slot: −1 for padding, which only a padded map has. */
  slot: Tensor;
  /** Some slots are −1 (padding, weight 0). */
  padding?: boolean;
  /** The pairs of each expert [E] (int64) there, when the router counted them there. */
  counts?: Tensor;
}

/**
 * The dropless map of ids [T, k] (int64, every token's k distinct experts) where they are, in
 * Megatron's permute order (by expert, then token), without a sort: hits [T, E] (a 1 where token
 * t chose expert e), the pairs of earlier tokens per expert (an exclusive cumsum down the tokens),
 * each expert's first position (an exclusive cumsum of the counts), so pair (t, j) lands at
 * start[e] + before[t, e] for its expert e; the tokens and slots are scattered there. Counts [E]
 * (int64) on the same device.
 */
export function routingMapOnDevice(
  ids: Tensor,
  numExperts: number,
): { token: Tensor; slot: Tensor; counts: Tensor } {
  const [T, k] = ids.shape;
  const P = T * k;
  const E = numExperts;
  const device = ids.device;
  const int64 = { dtype: 'int64' as const, device };
  return noGrad(() =>
    tidy(() => {
      if (P === 0) return { token: zeros([0], int64), slot: zeros([0], int64), counts: zeros([E], int64) };
      const hits = scatterAdd(zeros([T, E], int64), 1, ids, ones([T, k], int64));
      const counts = hits.sum(0);
      const before = cumsum(hits, 0).sub(hits);
      const start = cumsum(counts, 0).sub(counts);
      const dest = gather(before, 1, ids)
        .reshape(P)
        .add(indexSelect(start, 0, ids.reshape(P)));
      const at = (src: Tensor) => scatterAdd(zeros([P], int64), 0, dest, src);
      return {
        token: at(arange(0, T, 1, int64).view(T, 1).expand(T, k).reshape(P)),
        slot: at(arange(0, P, 1, int64)),
        counts,
      };
    }),
  );
}

/**
 * {@link buildRoutingMap} with a capacity, where the ids [T, k] (int64) are: the same pairs in the
 * same order, without reading the ids back. `weights` [T, k] (the final routing weights, on the
 * same device) rank an over-full expert's tokens under the 'probs' policy. On the [E, T] grid of
 * hits (row e: the tokens that chose expert e), 'position' keeps the hits with fewer than
 * `capacity` hits before them in their row, 'probs' the row's top `capacity` by weight (topk over
 * the hits, −inf elsewhere; ties take the earlier token, as the host's sort); padding then takes
 * the row's first min(capacity, T) − kept tokens not kept. A topk of T − t over the taken cells
 * lists each row's tokens in token order (the pairs of one expert), and their slots are gathered.
 * With padding every expert has min(capacity, T) pairs: the rows are the map and nothing is read.
 * Without, the host reads the E counts once (the number of pairs sizes the map) and each row's
 * first counts[e] entries are scattered to their places. Also returns, on the device, each
 * expert's kept choices (int64 [E], the expert load) and its choices before dropping (the
 * balancing loss's counts).
 */
export function capacityRoutingMapOnDevice(
  ids: Tensor,
  weights: Tensor,
  numExperts: number,
  capacity: CapacityOptions,
): { map: RoutingMap; kept: Tensor; routed: Tensor } {
  const [T, k] = ids.shape;
  const E = numExperts;
  const device = ids.device;
  const int64 = { dtype: 'int64' as const, device };
  const cap = expertCapacity(T * k, E, capacity.capacityFactor);
  const pad = capacity.padToCapacity;
  const target = Math.min(cap, T);
  // the tensors made in a scope, the map (whose getters read) outside it
  const made = noGrad(() =>
    tidy(() => {
      if (T === 0) {
        return {
          token: zeros([0], int64),
          slot: zeros([0], int64),
          kept: zeros([E], int64),
          routed: zeros([E], int64),
          counts: new Int32Array(E),
        };
      }
      // the grid by expert: row e holds a 1 at each token that chose expert e
      const byExpert = ids.t();
      const hits = scatterAdd(zeros([E, T], int64), 0, byExpert, ones([k, T], int64));
      const routed = hits.sum(1);
      let keep: Tensor;
      if (capacity.dropPolicy === 'position') {
        keep = hits.mul(cumsum(hits, 1).sub(hits).lt(cap).to('int64'));
      } else {
        const w = scatterAdd(
          zeros([E, T], { dtype: 'float32', device }),
          0,
          byExpert,
          weights.t().to('float32'),
        );
        const { indices } = topk(where(hits.gt(0), w, Number.NEGATIVE_INFINITY), target, 1);
        keep = hits.mul(scatterAdd(zeros([E, T], int64), 1, indices, ones(indices.shape, int64)));
      }
      const kept = keep.sum(1);
      let taken = keep;
      if (pad) {
        const free = keep.neg().add(1);
        const ahead = cumsum(free, 1).sub(free);
        taken = keep.add(free.mul(ahead.lt(kept.neg().add(target).unsqueeze(1)).to('int64')));
      }
      // each row's taken tokens in token order (at most `target` of them): the best `target` of
      // T − t where taken, −1 elsewhere; a row with fewer ends in untaken tokens
      const rank = arange(T, 0, -1, int64).unsqueeze(0);
      const tokens = topk(where(taken.gt(0), rank, -1), target, 1).indices; // [E, target]
      // slot + 1 where a token chose the expert; kept cells keep it, every other cell gets −1
      const slotPlus = scatterAdd(
        zeros([E, T], int64),
        0,
        byExpert,
        arange(1, T * k + 1, 1, int64)
          .view(T, k)
          .t(),
      );
      const slots = gather(slotPlus.mul(keep), 1, tokens).sub(1);
      if (pad) {
        // every row holds `target` pairs: the map is the rows as they are
        return {
          token: tokens.reshape(E * target),
          slot: slots.reshape(E * target),
          kept,
          routed,
          counts: new Int32Array(E).fill(target),
        };
      }
      // row e's first counts[e] entries are its pairs: the others go to places past the end
      const perExpert = taken.sum(1);
      const counts = readInts(perExpert, 'routingMap.counts');
      let P = 0;
      for (const c of counts) P += c;
      const cells = E * target;
      const valid = arange(0, target, 1, int64).unsqueeze(0).lt(perExpert.unsqueeze(1)).reshape(cells);
      const before = cumsum(valid.to('int64'), 0);
      const dest = where(valid, before.sub(1), arange(P, P + cells, 1, int64));
      const at = (src: Tensor) =>
        scatterAdd(zeros([P + cells], int64), 0, dest, src.reshape(cells))
          .narrow(0, 0, P)
          .clone();
      return { token: at(tokens), slot: at(slots), kept, routed, counts };
    }),
  );
  const map = deviceRoutingMap(
    { token: made.token, slot: made.slot, padding: pad },
    { counts: made.counts, capacity: cap, padded: pad },
  );
  return { map, kept: made.kept, routed: made.routed };
}

/**
 * A RoutingMap over device pairs: `counts` (unless known on the host), `token` and `slot` read
 * from the device tensors at their first use (int32), which must come before the forward's graph
 * frees them. A dispatcher that reads the counts together with other ranks' assigns them instead
 * (no read of their own).
 */
export function deviceRoutingMap(
  pairs: PairTensors,
  known: { counts?: Int32Array; capacity?: number | null; padded?: boolean } = {},
): RoutingMap {
  const onDevice = pairs.counts;
  if (!known.counts && !onDevice) {
    throw new ModelError(
      'INVALID_ARGUMENT',
      'deviceRoutingMap needs the counts, on the host or on the device',
    );
  }
  let counts: Int32Array | null = known.counts ?? null;
  let token: Int32Array | null = null;
  let slot: Int32Array | null = null;
  return {
    capacity: known.capacity ?? null,
    padded: known.padded ?? false,
    device: pairs,
    get counts() {
      counts ??= readInts(onDevice as Tensor, 'routingMap.counts');
      return counts;
    },
    set counts(c: Int32Array) {
      counts ??= c;
    },
    get token() {
      token ??= readInts(pairs.token, 'routingMap.token');
      return token;
    },
    get slot() {
      slot ??= readInts(pairs.slot, 'routingMap.slot');
      return slot;
    },
  };
}

/**
 * An integer tensor's values on the host as int32 (cast on its device first). `what` names it in
 * the error for a tensor already freed (the router's lazily read ids and pairs).
 */
export function readInts(t: Tensor, what = 'routing'): Int32Array {
  if (t.disposed) {
    throw new ModelError(
      'INVALID_ARGUMENT',
      `${what}: the router's device tensors were freed with the forward's graph (by backward or a tidy scope); read it before backward, inside the scope`,
    );
  }
  const narrow = t.to('int32');
  try {
    return Int32Array.from(narrow.toTypedArray() as Int32Array);
  } finally {
    narrow.dispose();
  }
}

/** Megatron's get_capacity: ceil(numTokens / numExperts · factor), numTokens counting every top-k choice. */
export function expertCapacity(numTokens: number, numExperts: number, capacityFactor: number): number {
  return Math.ceil((numTokens / numExperts) * capacityFactor);
}

/**
 * The routing map of T tokens whose top-k experts are `indices` [T·k] (row-major), with the
 * capacity applied when given. `weights` [T·k] (the final routing weights) is read only when the
 * 'probs' policy has to choose; ties keep the earlier token.
 */
export function buildRoutingMap(
  indices: Int32Array,
  T: number,
  numExperts: number,
  capacity: CapacityOptions | null,
  weights: () => Float32Array,
): RoutingMap {
  const E = numExperts;
  const k = T > 0 ? indices.length / T : 0;
  // Slots routed to each expert, in token order (a token picks an expert at most once).
  const perExpert: number[][] = Array.from({ length: E }, () => []);
  for (let s = 0; s < indices.length; s++) perExpert[indices[s]].push(s);
  const cap = capacity ? expertCapacity(T * k, E, capacity.capacityFactor) : null;
  if (capacity && cap !== null) {
    let w: Float32Array | null = null;
    for (let e = 0; e < E; e++) {
      const slots = perExpert[e];
      if (slots.length > cap) {
        if (capacity.dropPolicy === 'position') perExpert[e] = slots.slice(0, cap);
        else {
          w ??= weights();
          const ww = w;
          perExpert[e] = [...slots]
            .sort((a, b) => ww[b] - ww[a] || a - b)
            .slice(0, cap)
            .sort((a, b) => a - b);
        }
      }
      // Megatron's capacity mask has min(capacity, T) tokens per column: the kept ones, then
      // others of weight 0 (here the earliest tokens the expert does not already have).
      if (capacity.padToCapacity) perExpert[e] = padSlots(perExpert[e], Math.min(cap, T), k);
    }
  }
  let total = 0;
  for (const slots of perExpert) total += slots.length;
  const token = new Int32Array(total);
  const slot = new Int32Array(total);
  const counts = new Int32Array(E);
  let p = 0;
  for (let e = 0; e < E; e++) {
    counts[e] = perExpert[e].length;
    for (const s of perExpert[e]) {
      // padding is encoded as −(t + 1) by padSlots
      token[p] = s >= 0 ? Math.floor(s / k) : -s - 1;
      slot[p] = s >= 0 ? s : -1;
      p++;
    }
  }
  return { token, slot, counts, capacity: cap };
}

/**
 * `slots` (token order) completed to `target` entries with the earliest tokens not yet present,
 * each padding entry encoded as −(token + 1); the result stays in token order.
 */
function padSlots(slots: number[], target: number, k: number): number[] {
  if (slots.length >= target) return slots;
  const have = new Set(slots.map((s) => Math.floor(s / k)));
  const out: number[] = [];
  let need = target - slots.length;
  let i = 0;
  for (let t = 0; out.length < target; t++) {
    if (i < slots.length && Math.floor(slots[i] / k) === t) {
      out.push(slots[i]);
      i++;
    } else if (need > 0 && !have.has(t)) {
      out.push(-t - 1);
      need--;
    }
  }
  return out;
}
