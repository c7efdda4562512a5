// Megatron's routing map after token dropping, as the list of (token, expert) pairs the experts
// compute, sorted by expert and, within an expert, by token (the order of Megatron's permute).
// Dropless routing keeps every top-k choice. With a capacity factor each expert takes at most
// capacity = ceil(T·k / E · factor) of the T tokens of one router call: moe_token_drop_policy
// 'probs' keeps the highest routing weights, 'position' the earliest tokens. Padding
// (moe_pad_expert_input_to_capacity) fills each expert up to the capacity with other tokens of
// weight 0, as Megatron's capacity mask does.

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
