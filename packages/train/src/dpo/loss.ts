// Direct preference optimisation's losses (Rafailov et al.; as TRL's DPOTrainer and LLaMA-Factory
// define them) from the summed log-probabilities of each pair's chosen and rejected reply under
// the policy and under the frozen reference model: with the log-ratio margin
// h = (log π(c) − log π(r)) − (log π_ref(c) − log π_ref(r)),
//   sigmoid (DPO):  −(1 − ε) log σ(β h) − ε log σ(−β h)   (ε: label smoothing, cDPO)
//   hinge (SLiC):   max(0, 1 − β h)
//   ipo (IPO):      (h − 1 / (2β))²
// and the implicit rewards β (log π − log π_ref) of each reply.
import { noGrad, type Tensor, where } from '@megapatch/tensor';
import { TrainError } from '../errors.js';

export type DpoLossType = 'sigmoid' | 'hinge' | 'ipo';

export const DPO_LOSS_TYPES: readonly DpoLossType[] = ['sigmoid', 'hinge', 'ipo'];

/** Inputs of {@link dpoLoss}: [n] tensors of summed reply log-probabilities, one per pair. */
export interface DpoLossOptions {
  policyChosen: Tensor;
  policyRejected: Tensor;
  refChosen: Tensor;
  refRejected: Tensor;
  /** The KL weight β (TRL's beta, LLaMA-Factory's pref_beta; 0.1). */
  beta: number;
  lossType: DpoLossType;
  /** cDPO's label smoothing ε in [0, 0.5) (sigmoid only; 0). */
  labelSmoothing?: number;
}

/**
 * log σ(x), stable for any x and with the right gradient σ(−x) everywhere (at x = 0 too, where a
 * DPO run starts: min(x, 0) − log(1 + e^−|x|) has kinks there that autograd sums to 1, not ½):
 * −log(1 + e^−x) for x ≥ 0 and x − log(1 + e^x) below, each on its input clamped to its side.
 */
function logSigmoid(x: Tensor): Tensor {
  const pos = x.clamp(0, null);
  const neg = x.clamp(null, 0);
  return where(x.ge(0), pos.neg().exp().add(1).log().neg(), neg.sub(neg.exp().add(1).log()));
}

/** Per-pair losses [n] and the implicit rewards [n] of the chosen and rejected replies (no gradient). */
export function dpoLoss(o: DpoLossOptions): {
  losses: Tensor;
  chosenRewards: Tensor;
  rejectedRewards: Tensor;
} {
  const { beta } = o;
  if (!(beta > 0)) throw new TrainError('INVALID_ARGUMENT', `beta must be > 0, got ${beta}`);
  const ls = o.labelSmoothing ?? 0;
  const margin = o.policyChosen.sub(o.policyRejected).sub(o.refChosen.sub(o.refRejected));
  let losses: Tensor;
  switch (o.lossType) {
    case 'sigmoid': {
      const z = margin.mul(beta);
      losses = logSigmoid(z).mul(-(1 - ls));
      if (ls > 0) losses = losses.sub(logSigmoid(z.neg()).mul(ls));
      break;
    }
    case 'hinge':
      losses = margin.mul(-beta).add(1).relu();
      break;
    case 'ipo':
      losses = margin.sub(1 / (2 * beta)).square();
      break;
    default:
      throw new TrainError(
        'INVALID_ARGUMENT',
        `unknown DPO loss ${String(o.lossType)}; use one of ${DPO_LOSS_TYPES.join(', ')}`,
      );
  }
  return {
    losses,
    chosenRewards: noGrad(() => o.policyChosen.sub(o.refChosen).mul(beta).detach()),
    rejectedRewards: noGrad(() => o.policyRejected.sub(o.refRejected).mul(beta).detach()),
  };
}
