// The MoE router of every supported family: softmax or sigmoid scores in fp32, top-k (optionally
// limited to the best expert groups), an expert bias that steers selection only (DeepSeek-V3's
// aux-loss-free balancing, with its update rule), normalised top-k weights and the routed scaling
// factor; Megatron's load-balancing aux loss and z-loss; optional token dropping at a capacity
// (routing-map.ts). Under sequence parallelism each TP rank routes its own chunk of the sequence,
// and the losses take Megatron's tp-cp statistics: the expert counts summed over TP, each rank's
// loss a part of the whole one (summed over TP in forward, each part getting the whole gradient).
import type { MoeConfig } from '@megapatch/convert';
import {
  type ProcessGroup,
  reduceFromTensorModelParallelRegion,
  setSequenceParallelAttribute,
} from '@megapatch/parallel';
import {
  type DType,
  empty,
  fromTypedArray,
  type Generator,
  gather,
  initMethodNormal,
  isGradEnabled,
  keep,
  linear,
  logsumexp,
  Module,
  maskedFill,
  noGrad,
  oneHot,
  ones,
  scatterAdd,
  softmax,
  Tensor,
  tidy,
  topk,
  zeros,
  zeros_,
} from '@megapatch/tensor';
import { ModelError } from '../errors.js';
import {
  type CapacityOptions,
  capacityRoutingMapOnDevice,
  deviceRoutingMap,
  type RoutingMap,
  readInts,
  routingMapOnDevice,
} from './routing-map.js';

/** What the router decided for T tokens. */
export interface Routing {
  /** Weights of the chosen experts [T, k] (float32, differentiable). */
  probs: Tensor;
  /**
   * Chosen global expert ids [T, k], row-major on the host: read from `ids` at first use, which
   * must come before backward (or the end of a tidy scope) frees the forward's tensors.
   */
  readonly indices: Int32Array;
  /** The same ids [T, k] (int64) on the scores' device. */
  ids: Tensor;
  /** Tokens of this call routed to each expert, before any dropping (under SP: this rank's chunk). */
  tokensPerExpert: Float64Array;
  /** The (token, expert) pairs the experts compute: top-k choices after the capacity, plus padding. */
  routingMap: RoutingMap;
  /** Load-balancing loss (already scaled by its coefficient; under SP the whole sequence's), or null. */
  auxLoss: Tensor | null;
  /** Router z-loss (already scaled; under SP the whole sequence's), or null. */
  zLoss: Tensor | null;
}

/** Loss coefficients of the router (Megatron's --moe-aux-loss-coeff and --moe-z-loss-coeff). */
export interface RouterLossOptions {
  auxLossCoeff: number;
  zLossCoeff: number;
  /**
   * Megatron's --moe-router-load-balancing-type for the aux loss: 'aux_loss' (the Switch
   * Transformer loss over the router call's tokens, the default), 'seq_aux_loss' (DeepSeek-V2/V3's
   * sequence-wise loss: the same per sample of the micro-batch, averaged) or 'none'.
   */
  loadBalancingType?: LoadBalancingType;
}

/** Megatron's moe_router_load_balancing_type values megapatch implements. */
export type LoadBalancingType = 'aux_loss' | 'seq_aux_loss' | 'none';

/** Megatron's TopKRouter: `weight` [E, h] and, for aux-loss-free balancing, the `expert_bias` buffer. */
export class TopKRouter extends Module {
  readonly weight: Tensor;
  readonly expertBias: Tensor | null;
  /**
   * Tokens each expert computed (dropped ones and padding excluded) in forwards with gradients
   * since the last {@link TopKRouter.takeLoad}: for logging and bias updates.
   */
  private load: Float64Array;

  /**
   * Under sequence parallelism, the TP group whose ranks route the other chunks of the same
   * sequences (null otherwise).
   */
  private readonly spGroup: ProcessGroup | null;
  private readonly partitionGroup: ProcessGroup | null;

  /**
   * `capacity`: token dropping (Megatron's moe_expert_capacity_factor ...), null for dropless;
   * under sequence parallelism it applies to each rank's chunk, as in Megatron.
   */
  constructor(
    readonly moe: MoeConfig,
    hiddenSize: number,
    opts: {
      dtype: DType;
      generator?: Generator;
      performInitialization: boolean;
      /** Sequence parallelism: the TP group (each rank routes its chunk of the sequence). */
      sequenceParallelGroup?: ProcessGroup | null;
      /**
       * The ranks sharing each sequence (TP under SP, CP, or TP × CP; default the SP group): the
       * balancing statistics are the whole sequence's, summed over it.
       */
      sequencePartitionGroup?: ProcessGroup | null;
    },
    private readonly losses: RouterLossOptions,
    readonly capacity: CapacityOptions | null = null,
  ) {
    super();
    const w = empty([moe.numExperts, hiddenSize], { dtype: opts.dtype });
    if (opts.performInitialization) initMethodNormal(0.02)(w, opts.generator);
    else zeros_(w);
    this.weight = this.registerParameter('weight', w);
    const sp = opts.sequenceParallelGroup ?? null;
    this.spGroup = sp && sp.size > 1 ? sp : null;
    const part = opts.sequencePartitionGroup === undefined ? this.spGroup : opts.sequencePartitionGroup;
    this.partitionGroup = part && part.size > 1 ? part : null;
    // Each TP rank's gradient covers its chunk only: summed over TP with the SP norms'.
    if (this.spGroup) setSequenceParallelAttribute(this.weight);
    // Megatron keeps the expert bias in fp32 whatever the model dtype.
    this.expertBias = moe.expertBias
      ? this.registerBuffer('expert_bias', zeros([moe.numExperts], { dtype: 'float32' }))
      : null;
    this.load = new Float64Array(moe.numExperts);
  }

  /**
   * The maps' counts (kept choices) since the last take, float64 [E] where the router ran (the host
   * never waits for them; see takeLoad); the host's `load` holds what was folded back (a router
   * moved to another device).
   */
  private loadOnDevice: Tensor | null = null;

  protected override disposeState(): void {
    this.loadOnDevice?.dispose();
    this.loadOnDevice = null;
  }

  /** Adds a map's kept choices per expert (int64 [E]) to the load where they are. */
  private addLoad(counts: Tensor): void {
    noGrad(() => {
      const c = counts.to('float64'); // exact: counts stay far below 2^53
      const acc = this.loadOnDevice;
      if (acc && acc.device === c.device) {
        this.loadOnDevice = keep(acc.add(c));
        acc.dispose();
        c.dispose();
        return;
      }
      // the first counts (or the router moved: the old device's counts go to the host)
      if (acc) this.foldLoad(acc);
      this.loadOnDevice = keep(c);
    });
  }

  /** Adds a device load to the host's and frees it (a read). */
  private foldLoad(acc: Tensor): void {
    const v = acc.toTypedArray() as Float64Array;
    for (let e = 0; e < v.length; e++) this.load[e] += v[e];
    acc.dispose();
  }

  /**
   * Per-expert token counts accumulated since the last call, then reset. Counted, as Megatron
   * does, only when gradients are enabled: not in evaluation, and once under recompute (the
   * recomputation, the first forward running without gradients). Reads the maps' counts from
   * the router's device (one read); {@link TopKRouter.takeLoadOnDevice} leaves them there.
   */
  takeLoad(): Float64Array {
    const acc = this.loadOnDevice;
    this.loadOnDevice = null;
    if (acc) this.foldLoad(acc);
    const out = this.load;
    this.load = new Float64Array(this.moe.numExperts);
    return out;
  }

  /**
   * {@link TopKRouter.takeLoad}'s counts as float64 [E] on `device` (the caller's to free), nothing
   * read back.
   */
  takeLoadOnDevice(device: string): Tensor {
    const acc = this.loadOnDevice;
    this.loadOnDevice = null;
    const host = this.load;
    this.load = new Float64Array(this.moe.numExperts);
    return noGrad(() => {
      const h = fromTypedArray(host, [host.length], { device });
      if (!acc) return h;
      const moved = acc.to(device);
      const sum = h.add(moved);
      for (const t of new Set([h, moved, acc])) t.dispose();
      return sum;
    });
  }

  /**
   * The aux-loss-free update: bias_e += rate · sign(mean load − load_e), from the token counts of
   * the step (summed over data-parallel ranks by the caller), given as numbers or as a tensor.
   */
  updateExpertBias(tokensPerExpert: ArrayLike<number> | Tensor, rate: number): void {
    const bias = this.expertBias;
    if (!bias) return;
    // where the bias is, in float64 (the counts' sums are exact there), rounded to the bias's fp32
    // once: nothing read back
    noGrad(() =>
      tidy(() => {
        const load =
          tokensPerExpert instanceof Tensor
            ? tokensPerExpert.to(bias.device, 'float64')
            : fromTypedArray(Float64Array.from(tokensPerExpert), [tokensPerExpert.length], {
                device: bias.device,
              });
        const mean = load.sum().div(load.numel);
        bias.copy_(bias.to('float64').add(mean.sub(load).sign().mul(rate)).to('float32'));
      }),
    );
  }

  /**
   * Routes x [T, h]: the tokens of `batchSize` samples in sequence-major order (a MoE layer's
   * [s, b, h] flattened, as Megatron's), whose samples the 'seq_aux_loss' balancing tells apart.
   */
  forward(x: Tensor, batchSize = 1): Routing {
    const m = this.moe;
    const E = m.numExperts;
    const k = m.routerTopk;
    const T = x.shape[0];
    if (!(Number.isInteger(batchSize) && batchSize > 0 && T % batchSize === 0)) {
      throw new ModelError(
        'INVALID_ARGUMENT',
        `TopKRouter.forward: batchSize ${batchSize} must be a positive integer dividing the ${T} tokens`,
      );
    }
    const logits = linear(x.to('float32'), this.weight.to('float32')); // [T, E], fp32
    const scores = m.scoreFunction === 'softmax' ? softmax(logits, -1) : logits.sigmoid();
    // top-k on the scores' device
    const idx = topkRouting(scores, this.expertBias, m);
    let probs = gather(scores, 1, idx);
    if (m.normTopkProb && k > 1) {
      const denom = probs.sum(-1, true);
      probs = probs.div(m.scoreFunction === 'sigmoid' ? denom.add(1e-20) : denom);
    }
    if (m.routedScalingFactor !== 1) probs = probs.mul(m.routedScalingFactor);
    let indices: Int32Array | null = null;
    const hostIds = () => {
      indices ??= readInts(idx, 'routing.indices');
      return indices;
    };
    // The map is built on the scores' device, and the tokens each expert computes (after dropping,
    // without padding) are added to the load there; the host learns the counts only where a
    // dispatcher reads them (under EP, with the other ranks' in one read; at EP = 1 the grouped
    // GEMM takes them on the device; with padding they follow from T). `routed`: every expert's
    // choices before dropping (int64 [E]), the balancing loss's counts.
    let routingMap: RoutingMap;
    let routed: Tensor;
    if (this.capacity) {
      const made = capacityRoutingMapOnDevice(idx, probs.detach(), E, this.capacity);
      if (isGradEnabled()) this.addLoad(made.kept);
      routingMap = made.map;
      routed = made.routed;
    } else {
      const { token, slot, counts } = routingMapOnDevice(idx, E);
      if (isGradEnabled()) this.addLoad(counts);
      routingMap = deviceRoutingMap({ token, slot, counts });
      routed = counts;
    }
    let tokensPerExpert: Float64Array | null = null;
    const hostCounts = () => {
      // dropless: the map's own counts (a dispatcher may have read them already)
      tokensPerExpert ??= Float64Array.from(
        this.capacity ? readInts(routed, 'routing.tokensPerExpert') : routingMap.counts,
      );
      return tokensPerExpert;
    };
    // the ranks sharing the sequence (TP under SP, CP, TP × CP): statistics of the whole sequence
    const sp = this.partitionGroup;
    let auxLoss: Tensor | null = null;
    const balancing = this.losses.loadBalancingType ?? 'aux_loss';
    if (this.losses.auxLossCoeff > 0 && this.training && balancing !== 'none') {
      // On the scores of all experts (softmax, or sigmoid scores normalised per token) and the
      // top-k of those scores (Megatron's compute_routing_scores_for_aux_loss: the routing's own
      // choices unless an expert bias or group-limited routing changed them). Under SP / CP the
      // counts are the whole sequence's (summed over the ranks sharing it), the scores this rank's:
      // the parts add up over those ranks to the loss of one process.
      const all = m.scoreFunction === 'softmax' ? scores : scores.div(scores.sum(-1, true).add(1e-20));
      const grouped = m.numGroups > 1 && m.groupTopk < m.numGroups;
      const plain = !this.expertBias && !grouped;
      const lossIds = plain ? idx : noGrad(() => topk(scores, k, -1).indices);
      const coeff = this.losses.auxLossCoeff;
      if (balancing === 'aux_loss') {
        // Switch-Transformer balancing (Megatron's switch_load_balancing_loss_func)
        const perExpert = all.sum(0); // [E]
        const totalTokens = sp ? T * sp.size : T;
        const f = summedCounts(plain ? routed : idsPerExpert(lossIds, E), sp);
        auxLoss = perExpert
          .mul(f)
          .sum()
          // no tokens (an empty chunk): nothing to balance, a zero loss rather than 0 / 0
          .mul((E * coeff) / (k * Math.max(totalTokens, 1) ** 2));
      } else {
        // Megatron's sequence_load_balancing_loss_func: per sample b, E / (S·k) · Σ_e c_be · P_be,
        // c_be the sample's tokens whose top-k holds e, P_be the mean of its tokens' scores of e
        // over its S positions; the mean over the samples, times the coefficient
        const B = batchSize;
        const local = T / B;
        const S = sp ? local * sp.size : local;
        const c = noGrad(() => {
          const hits = scatterAdd(
            zeros([T, E], { device: scores.device }),
            1,
            lossIds,
            ones([T, k], { device: scores.device }),
          );
          const perSample = hits.view(local, B, E).sum(0); // [B, E], exact in float32
          if (sp) sp.allReduce(perSample, 'sum').waitSync();
          return perSample;
        });
        auxLoss = all
          .view(local, B, E)
          .sum(0)
          .mul(c)
          .sum()
          .mul((E * coeff) / (k * Math.max(S, 1) ** 2 * B));
      }
      if (sp) auxLoss = reduceFromTensorModelParallelRegion(auxLoss, sp);
    }
    let zLoss: Tensor | null = null;
    if (this.losses.zLossCoeff > 0 && this.training) {
      // Megatron divides the coefficient by the tp-cp size under SP: the mean over equal chunks.
      const lse = logsumexp(logits, -1);
      const squares = lse.mul(lse);
      // no tokens: the sum over none (zero, with the graph), as mean would divide 0 by 0
      zLoss = (T > 0 ? squares.mean() : squares.sum()).mul(this.losses.zLossCoeff / (sp ? sp.size : 1));
      if (sp) zLoss = reduceFromTensorModelParallelRegion(zLoss, sp);
    }
    return {
      probs,
      get indices() {
        return hostIds();
      },
      ids: idx,
      get tokensPerExpert() {
        return hostCounts();
      },
      routingMap,
      auxLoss,
      zLoss,
    };
  }
}

/** How many of ids [T, k] (int64) name each of E experts: int64 [E], where the ids are. */
function idsPerExpert(ids: Tensor, E: number): Tensor {
  return noGrad(() =>
    tidy(() => {
      const flat = ids.reshape(ids.numel);
      const int64 = { dtype: 'int64' as const, device: ids.device };
      return scatterAdd(zeros([E], int64), 0, flat, ones([ids.numel], int64));
    }),
  );
}

/**
 * Integer counts (int64 [E]) as float32 (exact: token counts fit in its 24 bits), summed over the
 * ranks of `group` (the sequence's) when given, where they are: nothing is read back.
 */
function summedCounts(counts: Tensor, group: ProcessGroup | null): Tensor {
  const f = noGrad(() => counts.to('float32'));
  if (group) group.allReduce(f, 'sum').waitSync();
  return f;
}

/** The experts' settings that routing reads. */
type RoutingRule = Pick<MoeConfig, 'numExperts' | 'routerTopk' | 'numGroups' | 'groupTopk' | 'expertBias'>;

/**
 * Top-k expert ids [T, k] (int64, on the scores' device, no gradient) from scores [T, E] (fp32):
 * the rule of {@link selectExperts} in tensor ops (Megatron's topk_routing_with_score_function
 * and group_limited_topk), so the scores never leave the device: the biased scores, each group's
 * score (its two best biased scores summed, or its best), the best `groupTopk` groups by `topk`,
 * the other groups' experts set to -inf, then `topk` over the experts. `topk` takes equal values
 * lowest index first, as selectExperts does, and the sums round to fp32 as there: the same ids.
 */
export function topkRouting(scores: Tensor, bias: Tensor | null, m: RoutingRule): Tensor {
  const [T, E] = scores.shape;
  const G = m.numGroups;
  return noGrad(() =>
    tidy(() => {
      let sel = bias ? scores.add(bias) : scores;
      if (G > 1 && m.groupTopk < G) {
        const grouped = sel.view(T, G, E / G);
        let groupScore: Tensor;
        if (m.expertBias && E / G > 1) {
          const top2 = topk(grouped, 2, -1).values;
          groupScore = top2.select(-1, 0).add(top2.select(-1, 1));
        } else groupScore = topk(grouped, 1, -1).values.squeeze(-1);
        const best = topk(groupScore, m.groupTopk, -1).indices; // [T, groupTopk]
        const dropped = oneHot(best, G).sum(1).eq(0).unsqueeze(-1); // [T, G, 1]
        sel = maskedFill(grouped, dropped, -Infinity).view(T, E);
      }
      return topk(sel, m.routerTopk, -1).indices;
    }),
  );
}

/**
 * Top-k expert ids per token from scores [T, E] (row-major), with the expert bias added for
 * selection and, for grouped routing, only experts of the best `groupTopk` groups eligible. A
 * group's score is the sum of its two best biased scores with an expert bias (DeepSeek-V3's
 * noaux_tc) and its best score otherwise (DeepSeek-V2's group-limited greedy). Sums round to fp32
 * (as Megatron's fp32 routing does), ties go to the lower id. The router runs the same rule on the
 * scores' device ({@link topkRouting}); this is its host reference.
 */
export function selectExperts(
  scores: Float32Array,
  bias: Float32Array | null,
  T: number,
  m: RoutingRule,
): Int32Array {
  const E = m.numExperts;
  const k = m.routerTopk;
  const G = m.numGroups;
  const perGroup = E / G;
  const out = new Int32Array(T * k);
  const sel = new Float32Array(E);
  const order = new Int32Array(E);
  const groupScore = new Float32Array(G);
  const groupOrder = new Int32Array(G);
  const eligible = new Uint8Array(E);
  for (let t = 0; t < T; t++) {
    for (let e = 0; e < E; e++) sel[e] = scores[t * E + e] + (bias ? bias[e] : 0);
    eligible.fill(1);
    if (G > 1 && m.groupTopk < G) {
      for (let g = 0; g < G; g++) {
        let best = -Infinity;
        let second = -Infinity;
        for (let j = 0; j < perGroup; j++) {
          const v = sel[g * perGroup + j];
          if (v > best) {
            second = best;
            best = v;
          } else if (v > second) second = v;
        }
        groupScore[g] = m.expertBias && perGroup > 1 ? best + second : best;
        groupOrder[g] = g;
      }
      sortByScore(groupOrder, groupScore);
      eligible.fill(0);
      for (let i = 0; i < m.groupTopk; i++) {
        const g = groupOrder[i];
        for (let j = 0; j < perGroup; j++) eligible[g * perGroup + j] = 1;
      }
    }
    for (let e = 0; e < E; e++) {
      order[e] = e;
      if (!eligible[e]) sel[e] = -Infinity;
    }
    sortByScore(order, sel);
    for (let j = 0; j < k; j++) out[t * k + j] = order[j];
  }
  return out;
}

/** Sorts ids by descending score, lower id first on ties (as torch.topk on CPU in practice). */
function sortByScore(ids: Int32Array, score: Float32Array): void {
  ids.sort((a, b) => score[b] - score[a] || a - b);
}
