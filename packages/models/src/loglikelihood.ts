// Log-likelihoods of continuations, as EleutherAI's lm-evaluation-harness scores its `loglikelihood`
// requests (multiple-choice questions, LAMBADA-style targets): the model reads context +
// continuation, the last seqLength + 1 tokens of it when longer (the context cut from the left),
// and the continuation's tokens are scored from the logits: the sum of their log-probabilities
// (float64 log-softmax over the real vocabulary) and whether each is the most likely token.
// Requests run longest first, right-padded into batches; results come back in request order.
import { fromTypedArray, noGrad, type Tensor, tidy } from '@megapatch/tensor';
import { ModelError } from './errors.js';
import { checkEvalSizes } from './evaluate.js';
import type { GPTModel } from './gpt-model.js';

/** How likely `continuation` is after `context` (token ids). */
export interface ContinuationRequest {
  /** At least one token (lm-evaluation-harness gives the end-of-text token for an empty context). */
  context: ArrayLike<number>;
  /** At least one token, at most seqLength. */
  continuation: ArrayLike<number>;
}

/** The score of one {@link ContinuationRequest}. */
export interface ContinuationScore {
  /** Σ log p(continuation[i] | context, continuation[..i]), natural log. */
  loglikelihood: number;
  /** Whether every continuation token is the most likely one (greedy decoding would produce it). */
  greedy: boolean;
  /** Continuation tokens scored. */
  tokens: number;
  /** Context tokens dropped from the left to fit seqLength + 1 tokens. */
  truncated: number;
}

/** Options of {@link scoreContinuations}. */
export interface ScoreContinuationsOptions {
  /** Tokens the model sees per request: context + continuation is cut to its last seqLength + 1. */
  seqLength: number;
  /** Requests per forward pass (default 8). */
  batchSize?: number;
  /** Called after every batch with the requests scored so far. */
  onProgress?: (p: { requests: number; seconds: number }) => void;
  /** Checked between batches: an aborted signal throws its reason. */
  signal?: AbortSignal;
}

interface Prepared {
  index: number;
  /** context + continuation, cut to seqLength + 1 tokens. */
  ids: number[];
  continuation: number;
  truncated: number;
}

/**
 * Scores `requests` with `model` (in eval mode, no gradients). Every TP rank must call it with the
 * same requests and options; each gets every score.
 */
export function scoreContinuations(
  model: GPTModel,
  requests: Iterable<ContinuationRequest>,
  opts: ScoreContinuationsOptions,
): ContinuationScore[] {
  const { seqLength, batchSize } = checkEvalSizes(model, opts);
  const vocab = model.config.vocabSize;
  const prepared: Prepared[] = [];
  for (const r of requests) {
    const index = prepared.length;
    const context = Array.from(r.context, Number);
    const continuation = Array.from(r.continuation, Number);
    for (const [what, ids] of [
      ['context', context],
      ['continuation', continuation],
    ] as const) {
      const bad = ids.findIndex((t) => !(Number.isInteger(t) && t >= 0 && t < vocab));
      if (bad >= 0) {
        throw new ModelError(
          'INVALID_INPUT',
          `request ${index}: ${what} token ${ids[bad]} at position ${bad} is outside the vocabulary [0, ${vocab})`,
        );
      }
    }
    if (context.length === 0 || continuation.length === 0) {
      throw new ModelError(
        'INVALID_INPUT',
        `request ${index}: the ${context.length === 0 ? 'context' : 'continuation'} is empty (give at least one token; an empty context is usually the end-of-text token)`,
      );
    }
    if (continuation.length > seqLength) {
      throw new ModelError(
        'INVALID_INPUT',
        `request ${index}: the continuation has ${continuation.length} tokens, more than seqLength ${seqLength}`,
      );
    }
    const whole = [...context, ...continuation];
    const keep = Math.min(whole.length, seqLength + 1);
    prepared.push({
      index,
      ids: whole.slice(whole.length - keep),
      continuation: continuation.length,
      truncated: whole.length - keep,
    });
  }
  const out = new Array<ContinuationScore>(prepared.length);
  // longest first: batches of similar lengths pad less
  const order = [...prepared].sort((a, b) => b.ids.length - a.ids.length || a.index - b.index);
  const t0 = performance.now();
  const wasTraining = model.training;
  model.eval();
  try {
    for (let i = 0; i < order.length; i += batchSize) {
      opts.signal?.throwIfAborted();
      const batch = order.slice(i, i + batchSize);
      const scores = scoreBatch(model, batch);
      for (const [r, p] of batch.entries()) out[p.index] = { ...scores[r], truncated: p.truncated };
      opts.onProgress?.({ requests: i + batch.length, seconds: (performance.now() - t0) / 1000 });
    }
  } finally {
    if (wasTraining) model.train();
  }
  return out;
}

/** One forward of right-padded rows; each row's continuation scored from its gathered logits. */
function scoreBatch(model: GPTModel, batch: readonly Prepared[]): Omit<ContinuationScore, 'truncated'>[] {
  const b = batch.length;
  const s = Math.max(...batch.map((p) => p.ids.length)) - 1;
  const input = new BigInt64Array(b * s);
  batch.forEach((p, r) => {
    for (let i = 0; i < p.ids.length - 1; i++) input[r * s + i] = BigInt(p.ids[i]);
  });
  const v = model.config.vocabSize;
  // logits of the positions that predict each row's continuation: [k, vocab] per row, float32
  const rows = noGrad(() =>
    tidy(() => {
      const logits = model.forward(fromTypedArray(input, [b, s])).logits as Tensor; // [b, s, V/tp]
      return batch.map((p, r) => {
        const n = p.ids.length - 1;
        const k = p.continuation;
        const picked = logits.narrow(0, r, 1).narrow(1, n - k, k);
        return model.gatherLogits(picked).contiguous().to('float32').toTypedArray() as Float32Array;
      });
    }),
  );
  return batch.map((p, r) => {
    const flat = rows[r];
    const k = p.continuation;
    let loglikelihood = 0;
    let greedy = true;
    for (let j = 0; j < k; j++) {
      const row = flat.subarray(j * v, (j + 1) * v);
      const target = p.ids[p.ids.length - k + j];
      let max = -Infinity;
      let best = 0;
      for (let t = 0; t < v; t++) {
        if (row[t] > max) {
          max = row[t];
          best = t;
        }
      }
      let z = 0;
      for (let t = 0; t < v; t++) z += Math.exp(row[t] - max);
      loglikelihood += row[target] - max - Math.log(z);
      // the first most likely token, as torch's argmax picks it
      if (best !== target) greedy = false;
    }
    return { loglikelihood, greedy, tokens: k };
  });
}
