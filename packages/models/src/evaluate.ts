// Evaluation: the mean loss and perplexity of a model on token sequences. Each sequence is cut into
// windows of seqLength + 1 tokens that overlap by one (inputs = window[:-1], labels = window[1:]),
// as Megatron's GPTDataset cuts samples, so every token after the first is predicted exactly once.
// Windows are right-padded into batches: under the causal mask padding never reaches a real token,
// and its positions are left out of the sums. No gradients; each batch's tensors are freed at once.
import { fromTypedArray, noGrad, type Tensor, tidy } from '@megapatch/tensor';
import { ModelError } from './errors.js';
import type { GPTModel } from './gpt-model.js';

/** One evaluated sequence: its tokens and the log-probability of each token after the first. */
export interface SequenceLogprobs {
  /** Index of the sequence in the input, from 0. */
  index: number;
  ids: number[];
  /** `logprobs[i]` = log p(ids[i + 1] | ids[0..i]) (natural log); length ids.length − 1 (0 for one token). */
  logprobs: Float64Array;
}

/** Running totals passed to {@link EvaluateOptions.onProgress} after every batch. */
export interface EvaluateProgress {
  sequences: number;
  tokens: number;
  seconds: number;
}

/** Options of {@link evaluate}. */
export interface EvaluateOptions {
  /** Tokens the model sees per window (a window holds seqLength + 1 tokens). */
  seqLength: number;
  /** Windows per forward pass (default 8). */
  batchSize?: number;
  /** Collect every sequence's per-token log-probabilities in the result's `perSequence`. */
  perTokenLogprobs?: boolean;
  /** Called with each sequence once all its tokens are scored, in input order (streams logprobs). */
  onSequence?: (s: SequenceLogprobs) => void;
  onProgress?: (p: EvaluateProgress) => void;
  /** Checked between batches: an aborted signal throws its reason. */
  signal?: AbortSignal;
}

/** What {@link evaluate} returns. */
export interface EvaluateResult {
  /** Tokens scored (each sequence's tokens after its first). */
  tokens: number;
  sequences: number;
  /** Mean of −log p(token | earlier tokens) over the scored tokens, in nats. */
  meanLoss: number;
  /** exp(meanLoss). */
  perplexity: number;
  seconds: number;
  tokensPerSecond: number;
  /** With `perTokenLogprobs`: every sequence, in input order. */
  perSequence?: SequenceLogprobs[];
}

/** A window of one sequence: tokens [start, start + length) of it. */
interface Window {
  seq: Pending;
  start: number;
  length: number;
}

/** A sequence whose windows are being scored. */
interface Pending {
  index: number;
  ids: number[];
  logprobs: Float64Array;
  windowsLeft: number;
}

/** seqLength (within the model's positions) and batchSize (default 8), checked. */
export function checkEvalSizes(
  model: GPTModel,
  opts: { seqLength: number; batchSize?: number },
): { seqLength: number; batchSize: number } {
  const { seqLength } = opts;
  const batchSize = opts.batchSize ?? 8;
  if (!Number.isInteger(seqLength) || seqLength < 1) {
    throw new ModelError('INVALID_ARGUMENT', `seqLength must be a positive integer, got ${seqLength}`);
  }
  if (seqLength > model.config.maxPositionEmbeddings) {
    throw new ModelError(
      'INVALID_ARGUMENT',
      `seqLength ${seqLength} exceeds the model's ${model.config.maxPositionEmbeddings} positions (maxPositionEmbeddings)`,
    );
  }
  if (!Number.isInteger(batchSize) || batchSize < 1) {
    throw new ModelError('INVALID_ARGUMENT', `batchSize must be a positive integer, got ${batchSize}`);
  }
  return { seqLength, batchSize };
}

/**
 * Scores `sequences` (token ids; any iterable, read lazily) with `model`: the per-token loss comes
 * from the forward with labels (padded vocabulary masked, fp32), summed in float64. Every TP rank
 * must call it with the same sequences and options.
 */
export function evaluate(
  model: GPTModel,
  sequences: Iterable<ArrayLike<number>>,
  opts: EvaluateOptions,
): EvaluateResult {
  const { seqLength, batchSize } = checkEvalSizes(model, opts);
  const collected: SequenceLogprobs[] | undefined = opts.perTokenLogprobs ? [] : undefined;
  // Sequences finish out of order only inside a batch; emit them in input order.
  const finished = new Map<number, Pending>();
  let nextToEmit = 0;
  let sum = 0;
  let tokens = 0;
  let count = 0;
  const vocab = model.config.vocabSize;
  const t0 = performance.now();
  const emit = () => {
    for (let s = finished.get(nextToEmit); s; s = finished.get(nextToEmit)) {
      finished.delete(nextToEmit++);
      const out = { index: s.index, ids: s.ids, logprobs: s.logprobs };
      collected?.push(out);
      opts.onSequence?.(out);
    }
  };
  const wasTraining = model.training;
  model.eval();
  try {
    let batch: Window[] = [];
    const run = () => {
      opts.signal?.throwIfAborted();
      const lp = scoreBatch(model, batch);
      for (const [r, w] of batch.entries()) {
        const row = lp[r];
        w.seq.logprobs.set(row, w.start);
        for (let i = 0; i < row.length; i++) sum -= row[i];
        tokens += row.length;
        if (--w.seq.windowsLeft === 0) finished.set(w.seq.index, w.seq);
      }
      batch = [];
      emit();
      opts.onProgress?.({ sequences: nextToEmit, tokens, seconds: (performance.now() - t0) / 1000 });
    };
    for (const raw of sequences) {
      const ids = Array.from(raw, Number);
      const bad = ids.findIndex((t) => !(Number.isInteger(t) && t >= 0 && t < vocab));
      if (bad >= 0) {
        throw new ModelError(
          'INVALID_INPUT',
          `sequence ${count}: token ${ids[bad]} at position ${bad} is outside the vocabulary [0, ${vocab})`,
        );
      }
      const scored = Math.max(0, ids.length - 1);
      // all windows are counted before any runs, so a sequence is done only when its last one is
      const seq: Pending = {
        index: count++,
        ids,
        logprobs: new Float64Array(scored),
        windowsLeft: Math.ceil(scored / seqLength),
      };
      // window k holds tokens [k·seqLength, k·seqLength + seqLength + 1): the last token of one
      // window is the first input of the next
      for (let start = 0; start + 1 < ids.length; start += seqLength) {
        batch.push({ seq, start, length: Math.min(seqLength + 1, ids.length - start) });
        if (batch.length === batchSize) run();
      }
      if (seq.windowsLeft === 0) {
        finished.set(seq.index, seq);
        emit();
      }
    }
    if (batch.length > 0) run();
  } finally {
    if (wasTraining) model.train();
  }
  const seconds = (performance.now() - t0) / 1000;
  const meanLoss = tokens > 0 ? sum / tokens : Number.NaN;
  return {
    tokens,
    sequences: count,
    meanLoss,
    perplexity: Math.exp(meanLoss),
    seconds,
    tokensPerSecond: seconds > 0 ? tokens / seconds : 0,
    ...(collected ? { perSequence: collected } : {}),
  };
}

/** Log-probabilities of each window's labels (window.length − 1 per row), from one forward. */
function scoreBatch(model: GPTModel, windows: readonly Window[]): Float32Array[] {
  const b = windows.length;
  const s = Math.max(...windows.map((w) => w.length)) - 1;
  const input = new BigInt64Array(b * s);
  const labels = new BigInt64Array(b * s);
  windows.forEach((w, r) => {
    for (let i = 0; i < w.length - 1; i++) {
      input[r * s + i] = BigInt(w.seq.ids[w.start + i]);
      labels[r * s + i] = BigInt(w.seq.ids[w.start + i + 1]);
    }
  });
  const loss = noGrad(() =>
    tidy(() => {
      const out = model.forward(fromTypedArray(input, [b, s]), { labels: fromTypedArray(labels, [b, s]) });
      const l = out.loss as Tensor;
      return l.to('float32').toTypedArray() as Float32Array;
    }),
  );
  return windows.map((w, r) => {
    const row = loss.slice(r * s, r * s + w.length - 1);
    for (let i = 0; i < row.length; i++) row[i] = -row[i];
    return row;
  });
}
