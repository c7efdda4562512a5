// Generation with a KV cache: prompts of different lengths are left-padded into one batch, the
// prompt is run once (prefill), then one token per step reuses the cached keys and values. Greedy
// decoding, temperature, top-k and top-p sampling from a seeded generator (the same seed gives the
// same text, on one process or across TP ranks), stop on EOS ids and on stop strings.
import { fromTypedArray, noGrad, type Tensor, tidy } from '@megapatch/tensor';
import { ModelError } from './errors.js';
import type { GPTModel } from './gpt-model.js';
import { KVCache } from './kv-cache.js';

/** How to pick each next token. */
export interface SamplingOptions {
  /** Tokens to generate at most per prompt (default 128). */
  maxNewTokens?: number;
  /** 0 (default) is greedy decoding; otherwise logits are divided by it before sampling. */
  temperature?: number;
  /** Keep only the k most likely tokens (0 = all). */
  topK?: number;
  /** Keep the smallest set of most likely tokens whose probability reaches p (1 = all). */
  topP?: number;
  /** Seed of the sampling generator (default 0). */
  seed?: number;
  /** Token ids that end a sequence (kept in the output). */
  eosTokenIds?: readonly number[];
  /** Strings that end a sequence (cut from the completion text). Needs `decode`. */
  stopStrings?: readonly string[];
  /** Turns token ids into text, to find stop strings. */
  decode?: (ids: number[]) => string;
  /** Called with each new token of each row as it is chosen (for streaming). */
  onToken?: (row: number, token: number) => void;
}

/** Why a row stopped. */
export type FinishReason = 'eos' | 'stop' | 'length';

/** One generated row. */
export interface Generation {
  /** The new tokens (EOS included when it ended the row; tokens of a stop string included). */
  tokens: number[];
  finishReason: FinishReason;
  /** With stopStrings and decode: the completion text cut before the stop string. */
  text?: string;
}

/** What {@link generate} returns. */
export interface GenerateResult {
  rows: Generation[];
  /** New tokens per second over the whole call (all rows). */
  tokensPerSecond: number;
  seconds: number;
}

/** A small counter-free PRNG (mulberry32): uniform [0, 1), reproducible from a seed. */
export function samplingRng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Picks a token from one row of logits (real vocabulary only): greedy when temperature is 0,
 * otherwise softmax(logits / T) restricted by top-k, then top-p, sampled with `rand`.
 */
export function sampleToken(
  logits: Float32Array,
  opts: { temperature?: number; topK?: number; topP?: number },
  rand: () => number,
): number {
  const n = logits.length;
  const t = opts.temperature ?? 0;
  if (!(t > 0)) {
    let best = 0;
    for (let i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
    return best;
  }
  let order = Array.from({ length: n }, (_, i) => i).sort((a, b) => logits[b] - logits[a] || a - b);
  const k = opts.topK ?? 0;
  if (k > 0 && k < n) order = order.slice(0, k);
  const max = logits[order[0]];
  const p = order.map((i) => Math.exp((logits[i] - max) / t));
  let sum = p.reduce((a, b) => a + b, 0);
  const topP = opts.topP ?? 1;
  if (topP < 1) {
    // Keep tokens until the mass before them reaches top-p (the first token always stays).
    let acc = 0;
    let keep = 0;
    while (keep < p.length && (keep === 0 || acc / sum < topP)) acc += p[keep++];
    order = order.slice(0, keep);
    p.length = keep;
    sum = acc;
  }
  let u = rand() * sum;
  for (let j = 0; j < p.length; j++) {
    u -= p[j];
    if (u < 0) return order[j];
  }
  return order[order.length - 1];
}

function checkOptions(o: SamplingOptions): void {
  const bad = (m: string) => new ModelError('INVALID_ARGUMENT', m);
  const max = o.maxNewTokens ?? 128;
  if (!Number.isInteger(max) || max < 0) throw bad(`maxNewTokens must be a non-negative integer, got ${max}`);
  if (o.temperature !== undefined && !(o.temperature >= 0))
    throw bad(`temperature must be ≥ 0, got ${o.temperature}`);
  if (o.topK !== undefined && !(Number.isInteger(o.topK) && o.topK >= 0))
    throw bad(`topK must be an integer ≥ 0, got ${o.topK}`);
  if (o.topP !== undefined && !(o.topP > 0 && o.topP <= 1))
    throw bad(`topP must be in (0, 1], got ${o.topP}`);
  if (o.stopStrings?.length && !o.decode) throw bad('stopStrings need a decode function');
}

/** Last-position logits [b, vocab] of a forward, gathered over TP, as float32 rows. */
function lastLogits(model: GPTModel, logits: Tensor): Float32Array[] {
  return tidy(() => {
    const [b, s] = logits.shape;
    const last = model
      .gatherLogits(logits.narrow(1, s - 1, 1))
      .contiguous()
      .to('float32');
    const flat = last.toTypedArray() as Float32Array;
    const v = model.config.vocabSize;
    return Array.from({ length: b }, (_, r) => flat.slice(r * v, (r + 1) * v));
  });
}

/**
 * Continues each prompt (token ids; lengths may differ) with a KV cache. Every TP rank must call it
 * with the same prompts and options: they then pick the same tokens.
 */
export function generate(
  model: GPTModel,
  prompts: readonly (readonly number[])[],
  opts: SamplingOptions = {},
): GenerateResult {
  checkOptions(opts);
  if (prompts.length === 0) return { rows: [], tokensPerSecond: 0, seconds: 0 };
  for (const [i, p] of prompts.entries()) {
    if (p.length === 0)
      throw new ModelError('INVALID_INPUT', `prompt ${i} is empty; give at least one token (e.g. BOS)`);
  }
  const maxNew = opts.maxNewTokens ?? 128;
  const b = prompts.length;
  const promptLen = Math.max(...prompts.map((p) => p.length));
  const capacity = promptLen + maxNew;
  if (capacity > model.config.maxPositionEmbeddings) {
    throw new ModelError(
      'INVALID_INPUT',
      `prompt (${promptLen} tokens) + maxNewTokens (${maxNew}) exceed the model's ${model.config.maxPositionEmbeddings} positions`,
    );
  }
  const eos = new Set(opts.eosTokenIds ?? []);
  const rand = samplingRng(opts.seed ?? 0);
  const rows: Generation[] = prompts.map(() => ({ tokens: [], finishReason: 'length' }));
  const done = new Array<boolean>(b).fill(maxNew === 0);
  // valid[r][j]: whether key j of row r is a real token (prompts are left-padded)
  const valid = new Uint8Array(b * capacity);
  const ids = new BigInt64Array(b * promptLen);
  prompts.forEach((p, r) => {
    const pad = promptLen - p.length;
    for (let j = 0; j < p.length; j++) {
      ids[r * promptLen + pad + j] = BigInt(p[j]);
      valid[r * capacity + pad + j] = 1;
    }
  });
  const maskOf = (len: number): Tensor => {
    const m = new Uint8Array(b * len);
    for (let r = 0; r < b; r++) m.set(valid.subarray(r * capacity, r * capacity + len), r * len);
    return fromTypedArray(m, [b, len]).to('bool');
  };
  const wasTraining = model.training;
  model.eval();
  const cache = new KVCache(b, capacity);
  const t0 = performance.now();
  let produced = 0;
  try {
    noGrad(() => {
      let input = fromTypedArray(ids, [b, promptLen]);
      let len = promptLen;
      for (let step = 0; step < maxNew && !done.every(Boolean); step++) {
        const next = tidy(() => {
          const mask = maskOf(len);
          const out = model.forward(input, { kvCache: cache, attentionMask: mask });
          return lastLogits(model, out.logits as Tensor);
        });
        input.dispose();
        const chosen = new BigInt64Array(b);
        for (let r = 0; r < b; r++) {
          if (done[r]) continue;
          const tok = sampleToken(next[r], opts, rand);
          rows[r].tokens.push(tok);
          produced++;
          chosen[r] = BigInt(tok);
          valid[r * capacity + len] = 1;
          opts.onToken?.(r, tok);
          if (eos.has(tok)) {
            rows[r].finishReason = 'eos';
            done[r] = true;
          } else if (opts.stopStrings?.length && opts.decode) {
            const text = opts.decode(rows[r].tokens);
            const at = Math.min(...opts.stopStrings.map((s) => text.indexOf(s)).filter((i) => i >= 0));
            if (Number.isFinite(at)) {
              rows[r].finishReason = 'stop';
              rows[r].text = text.slice(0, at);
              done[r] = true;
            }
          }
        }
        input = fromTypedArray(chosen, [b, 1]);
        len++;
      }
      input.dispose();
    });
  } finally {
    cache.dispose();
    if (wasTraining) model.train();
  }
  if (opts.decode) for (const r of rows) r.text ??= opts.decode(r.tokens);
  const seconds = (performance.now() - t0) / 1000;
  return { rows, tokensPerSecond: seconds > 0 ? produced / seconds : 0, seconds };
}
