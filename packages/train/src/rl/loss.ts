// GRPO's pieces, as verl's GRPO trainer (and ChatLearn's) define them: group-normalised outcome
// advantages, the PPO clipped policy-gradient loss (asymmetric clip, dual clip; GSPO's
// sequence-level ratio), the KL estimators against a reference policy, and the four ways of
// aggregating per-token losses into one number. Every function works on [b, s] tensors of one
// batch of responses (log-probabilities of each response token, 0 elsewhere, with a float mask of
// the response tokens) and records autograd through the new log-probabilities only.
import { noGrad, type Tensor, where } from '@megapatch/tensor';
import { TrainError } from '../errors.js';

/**
 * How per-token losses become one number (verl's loss_agg_mode): a mean over every response token
 * of the batch; the mean over responses of each one's token sum; the mean over responses of each
 * one's token mean (the original GRPO); or each one's token sum divided by a constant length, then
 * the mean over responses (Dr. GRPO).
 */
export type LossAggregation =
  | 'token-mean'
  | 'seq-mean-token-sum'
  | 'seq-mean-token-mean'
  | 'seq-mean-token-sum-norm';

export const LOSS_AGGREGATIONS: readonly LossAggregation[] = [
  'token-mean',
  'seq-mean-token-sum',
  'seq-mean-token-mean',
  'seq-mean-token-sum-norm',
];

/**
 * KL estimators of log π − log π_ref per token (Schulman's k1, k2, k3; verl's kl_loss_type):
 * `kl` (k1: the difference), `abs`, `mse` (k2: half its square), `low_var_kl` (k3:
 * exp(ref − logp) − (ref − logp) − 1, never negative; the difference clamped to ±20 and the value
 * to ±10 for safety, as verl does).
 */
export type KlType = 'kl' | 'abs' | 'mse' | 'low_var_kl';

export const KL_TYPES: readonly KlType[] = ['kl', 'abs', 'mse', 'low_var_kl'];

/**
 * GRPO's outcome advantages: each reward minus the mean of its group (the `groupSize` responses to
 * one prompt, consecutive in `rewards`), divided by the group's standard deviation (unbiased, as
 * torch.std) plus `epsilon` when `normalizeByStd` (Dr. GRPO turns that off). A group of one
 * response gets its reward as advantage (mean 0, std 1), as verl does.
 */
export function grpoAdvantages(
  rewards: readonly number[],
  groupSize: number,
  opts: { normalizeByStd?: boolean; epsilon?: number } = {},
): number[] {
  if (!Number.isInteger(groupSize) || groupSize < 1 || rewards.length % groupSize !== 0) {
    throw new TrainError(
      'INVALID_ARGUMENT',
      `${rewards.length} rewards do not make whole groups of ${groupSize} responses`,
    );
  }
  const eps = opts.epsilon ?? 1e-6;
  const byStd = opts.normalizeByStd ?? true;
  const out = new Array<number>(rewards.length);
  for (let g = 0; g < rewards.length; g += groupSize) {
    const group = rewards.slice(g, g + groupSize);
    let mean = 0;
    let std = 1;
    if (groupSize > 1) {
      mean = group.reduce((a, b) => a + b, 0) / groupSize;
      std = Math.sqrt(group.reduce((a, r) => a + (r - mean) ** 2, 0) / (groupSize - 1));
    }
    for (let j = 0; j < groupSize; j++) {
      const centred = group[j] - mean;
      out[g + j] = byStd ? centred / (std + eps) : centred;
    }
  }
  return out;
}

/** Per-token KL estimate [b, s] of the policy against the reference (see {@link KlType}). */
export function klPenalty(logProbs: Tensor, refLogProbs: Tensor, type: KlType): Tensor {
  switch (type) {
    case 'kl':
      return logProbs.sub(refLogProbs);
    case 'abs':
      return logProbs.sub(refLogProbs).abs();
    case 'mse':
      return logProbs.sub(refLogProbs).square().mul(0.5);
    case 'low_var_kl': {
      const d = refLogProbs.sub(logProbs).clamp(-20, 20);
      return d.exp().sub(d).sub(1).clamp(-10, 10);
    }
    default:
      throw new TrainError(
        'INVALID_ARGUMENT',
        `unknown KL type ${String(type)}; use one of ${KL_TYPES.join(', ')}`,
      );
  }
}

/** Options of {@link policyGradientLosses}. */
export interface PolicyLossOptions {
  /** The current policy's log-probabilities [b, s] (autograd flows through them). */
  logProbs: Tensor;
  /** The log-probabilities [b, s] of the policy that generated the responses (no gradient). */
  oldLogProbs: Tensor;
  /** One advantage per response [b, 1], or per token [b, s]. */
  advantages: Tensor;
  /** 1 on response tokens, 0 elsewhere [b, s] (float). */
  mask: Tensor;
  /** The ratio is clipped to [1 − clipRatioLow, 1 + clipRatioHigh] (verl clip_ratio_low/high). */
  clipRatioLow: number;
  clipRatioHigh: number;
  /**
   * Dual clip (vanilla only): for negative advantages the loss is at most −A · clipRatioC
   * (verl clip_ratio_c, default 3); null turns it off.
   */
  clipRatioC: number | null;
  /**
   * `vanilla`: PPO's per-token ratio π/π_old; `gspo`: GSPO's sequence ratio, the exponential of the
   * response's mean log-ratio, with each token's gradient (verl's policy_loss.loss_mode gspo).
   */
  mode: 'vanilla' | 'gspo';
}

/** What {@link policyGradientLosses} returns: [b, s] tensors, to aggregate with the mask. */
export interface PolicyLossTerms {
  /** Per-token policy-gradient losses. */
  losses: Tensor;
  /** 1 where the clip bound was the larger loss (the ratio clipped), else 0 (no gradient). */
  clipped: Tensor;
  /** log π_old − log π per token (no gradient): its masked mean is the approximate KL to π_old. */
  approxKl: Tensor;
}

/**
 * The PPO clipped surrogate losses per token: with ratio r and advantage A,
 * max(−A·r, −A·clip(r, 1 − εlow, 1 + εhigh)), and for A < 0 at most −A·c (dual clip). The
 * log-ratio is clamped to ±20 before the exponential (GSPO: at most 10), as verl does.
 */
export function policyGradientLosses(o: PolicyLossOptions): PolicyLossTerms {
  const adv = o.advantages;
  const negKl = o.logProbs.sub(o.oldLogProbs);
  let ratio: Tensor;
  if (o.mode === 'gspo') {
    // the sequence's mean log-ratio (a number per response) carried by each token's own gradient:
    // log s_i = logp − sg(logp) + sg(mean_t(logp − old))
    const seqMean = noGrad(() => negKl.mul(o.mask).sum(-1, true).div(o.mask.sum(-1, true).clamp(1)));
    ratio = o.logProbs.sub(o.logProbs.detach()).add(seqMean).clamp(null, 10).exp();
  } else {
    ratio = negKl.clamp(-20, 20).exp();
  }
  const plain = adv.neg().mul(ratio);
  const bounded = adv.neg().mul(ratio.clamp(1 - o.clipRatioLow, 1 + o.clipRatioHigh));
  let losses = plain.maximum(bounded);
  const clipped = noGrad(() => bounded.gt(plain).to('float32'));
  if (o.mode === 'vanilla' && o.clipRatioC !== null) {
    const floor = adv.neg().mul(o.clipRatioC);
    losses = where(adv.lt(0), losses.minimum(floor.expandAs(losses)), losses);
  }
  const approxKl = noGrad(() => negKl.neg());
  return { losses, clipped, approxKl };
}

/** The counts an aggregation divides by, over the whole batch it stands for (every rank, every micro-batch). */
export interface AggregationTotals {
  /** Response tokens of the whole batch (token-mean). */
  tokens: number;
  /** Responses of the whole batch. */
  sequences: number;
  /** The constant length of seq-mean-token-sum-norm (Dr. GRPO's; the rollout's maxNewTokens). */
  normLength: number;
}

/**
 * The aggregated loss of a part of a batch: Σ_i Σ_t w_it · mask_it · loss_it with the weights of
 * `mode` over the whole batch's `totals`, so that the parts (micro-batches, data-parallel ranks)
 * add up to the batch's loss. Without totals the part is the whole batch.
 */
export function aggregateLoss(
  losses: Tensor,
  mask: Tensor,
  mode: LossAggregation,
  totals?: AggregationTotals,
): Tensor {
  const t = totals ?? {
    tokens: noGrad(() => mask.sum().item()),
    sequences: mask.shape[0],
    normLength: mask.shape[mask.shape.length - 1],
  };
  const masked = losses.mul(mask);
  switch (mode) {
    case 'token-mean':
      return masked.sum().div(Math.max(t.tokens, 1));
    case 'seq-mean-token-sum':
      return masked.sum().div(t.sequences);
    case 'seq-mean-token-mean': {
      const perSeq = masked.sum(-1).div(mask.sum(-1).clamp(1));
      return perSeq.sum().div(t.sequences);
    }
    case 'seq-mean-token-sum-norm':
      return masked.sum().div(t.sequences * t.normLength);
    default:
      throw new TrainError(
        'INVALID_ARGUMENT',
        `unknown loss aggregation ${String(mode)}; use one of ${LOSS_AGGREGATIONS.join(', ')}`,
      );
  }
}
