// GPTModel under the pipeline schedules of @megapatch/parallel: Megatron's forward_step for a GPT
// stage. The first stage embeds the micro-batch's tokens, the others start from the received
// activation, and the last turns the per-token loss into the micro-batch loss.
import type { ForwardStepFunc, LossFunc } from '@megapatch/parallel';
import type { Tensor } from '@megapatch/tensor';
import { ModelError } from './errors.js';
import type { GPTModel } from './gpt-model.js';

/** One micro-batch as every pipeline stage reads it (each stage uses what it needs). */
export interface GPTMicrobatch {
  /** Token ids [b, s]: read by the first stage (and by the last one for MTP). */
  tokens: Tensor;
  /** Target ids [b, s]: read by the last stage. */
  labels: Tensor;
  /** Tokens that count in the loss [b, s] (1 / 0); default all. */
  lossMask?: Tensor;
  /** Position ids [b, s]; every stage builds its rotary tables from them. */
  positionIds?: Tensor;
  /** Packed rows (b = 1): cumulative sample boundaries [nseq + 1]. */
  cuSeqlens?: Tensor | readonly number[];
  /** Which keys are real tokens [b, s] (bool). */
  attentionMask?: Tensor;
}

/** What the last stage reports per micro-batch. */
export interface GPTStepReport {
  /** Mean language-model loss of the micro-batch's counted tokens. */
  lmLoss: number;
  /** Tokens counted. */
  numTokens: number;
}

/**
 * Megatron's forward_step for a GPTModel stage, for `getForwardBackwardFunc()`: reads the next
 * micro-batch, runs the stage on the tokens (first stage) or on the received activation, and
 * returns the hidden states [s, b, h], or on the last stage the per-token loss with a loss
 * function giving `[sum of the counted tokens' losses, numTokens, report]` (the schedule divides
 * by the token count unless `calculatePerTokenLoss`). MTP losses are not added.
 */
export function gptForwardStep(): ForwardStepFunc<GPTModel, GPTMicrobatch, GPTStepReport> {
  return (dataIterator, model, context) => {
    const next = dataIterator?.next();
    if (!next || next.done) {
      throw new ModelError('INVALID_INPUT', `no micro-batch ${context.microbatch} in the data iterator`);
    }
    const mb = next.value;
    const out = model.forward(model.preProcess || model.mtp ? mb.tokens : null, {
      hiddenStates: context.inputTensor,
      labels: model.postProcess ? mb.labels : undefined,
      positionIds: mb.positionIds,
      cuSeqlens: mb.cuSeqlens,
      attentionMask: mb.attentionMask,
    });
    if (!model.postProcess) return [out.hiddenStates as Tensor, null];
    const lossFunc: LossFunc<GPTStepReport> = (perToken) => {
      const masked = mb.lossMask ? perToken.mul(mb.lossMask.to(perToken.dtype)) : perToken;
      const numTokens = mb.lossMask ? Number(mb.lossMask.sum().item()) : perToken.numel;
      const sum = masked.sum();
      return [sum, numTokens, { lmLoss: sum.item() / Math.max(numTokens, 1), numTokens }];
    };
    return [out.loss as Tensor, lossFunc];
  };
}
