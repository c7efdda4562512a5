// Generation with a KV cache: prompts of different lengths are left-padded into one batch, the
// prompt is run once (prefill), then one token per step reuses the cached keys and values. Greedy
// decoding, temperature, top-k and top-p sampling from a seeded generator (the same seed gives the
// same text, on one process or across TP ranks), stop on EOS ids and on stop strings.
import {
  arange,
  argmax,
  cat,
  fromTypedArray,
  full,
  minimum,
  noGrad,
  type Tensor,
  tidy,
  topk,
  where,
} from '@megapatch/tensor';
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
  /**
   * Seed of the sampling generator (default 0). One seed per row instead: rows given the same seed
   * draw from one generator, in row order, as a call with only those rows would (so several
   * prompts' groups generated together sample what they would sample alone).
   */
  seed?: number | readonly number[];
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

/** Vocabularies below 2^20 tokens pack a logit's order key and its id into one exact float64. */
const ID_BITS = 2 ** 20;

/**
 * The token ids by descending logit, equal logits by ascending id (the k first when k > 0):
 * each logit's float32 bits become an unsigned key that orders as the values do (descending),
 * packed with the id into one float64 (key · 2^20 + id < 2^52, exact), so that the engine's
 * native typed-array sort orders them (a comparator sort of 150K ids took 100-250 ms); with k,
 * a selection keeps the k smallest keys before sorting them.
 */
function descendingOrder(logits: Float32Array, k: number): number[] {
  const n = logits.length;
  if (n >= ID_BITS) {
    const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => logits[b] - logits[a] || a - b);
    return k > 0 && k < n ? order.slice(0, k) : order;
  }
  const bits = new Uint32Array(logits.buffer, logits.byteOffset, n);
  const keys = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const u = bits[i] === 0x80000000 ? 0 : bits[i]; // −0 orders as +0, as the difference of values does
    // ascending order of values: negative floats reversed, positive ones above them; then flipped
    const up = u & 0x80000000 ? ~u >>> 0 : (u | 0x80000000) >>> 0;
    keys[i] = (0xffffffff - up) * ID_BITS + i;
  }
  let sorted: Float64Array;
  if (k > 0 && k < n) {
    selectSmallest(keys, k);
    sorted = keys.subarray(0, k).sort();
  } else sorted = keys.sort();
  const order = new Array<number>(sorted.length);
  for (let j = 0; j < sorted.length; j++) order[j] = sorted[j] % ID_BITS;
  return order;
}

/** Moves the k smallest values of a (distinct numbers) to a[0 .. k) in some order (quickselect). */
function selectSmallest(a: Float64Array, k: number): void {
  let lo = 0;
  let hi = a.length - 1;
  while (lo < hi) {
    // median of three as the pivot
    const mid = (lo + hi) >>> 1;
    const x = a[lo];
    const y = a[mid];
    const z = a[hi];
    const pivot = Math.max(Math.min(x, y), Math.min(Math.max(x, y), z));
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] < pivot) i++;
      while (a[j] > pivot) j--;
      if (i <= j) {
        const t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
      }
    }
    // a[lo .. j] <= pivot <= a[i .. hi]; keep the part holding position k − 1
    if (k - 1 <= j) hi = j;
    else if (k - 1 >= i) lo = i;
    else return;
  }
}

/**
 * Picks a token from one row of logits (real vocabulary only): greedy when temperature is 0,
 * otherwise softmax(logits / T) restricted by top-k, then top-p, sampled with `rand`: one draw
 * walks the kept tokens' weights (the top-k ones, or the top-p nucleus, from the most likely;
 * the whole vocabulary in id order, as torch.multinomial does). Only what top-k or top-p needs is
 * sorted: the k best, or a growing prefix of the best until it holds the nucleus.
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
  const k = opts.topK ?? 0;
  const topP = opts.topP ?? 1;
  if (k > 0 && k < n) {
    const order = descendingOrder(logits, k);
    return sampleBest(order, (j) => logits[order[j]], t, topP, rand);
  }
  // the whole vocabulary: weights in id order
  let max = -Infinity;
  for (let i = 0; i < n; i++) if (logits[i] > max) max = logits[i];
  const w = new Float64Array(n);
  let sum = 0;
  for (let i = 0; i < n; i++) {
    w[i] = Math.exp((logits[i] - max) / t);
    sum += w[i];
  }
  if (topP >= 1) {
    let u = rand() * sum;
    let last = 0;
    for (let i = 0; i < n; i++) {
      if (w[i] === 0) continue;
      last = i;
      u -= w[i];
      if (u < 0) return i;
    }
    return last;
  }
  // the nucleus: the most likely tokens until the mass before them reaches top-p, found in the
  // m best (m grows until they hold it; most rows need a few hundred)
  for (let m = Math.min(n, 1024); ; m = Math.min(n, m * 8)) {
    const order = descendingOrder(logits, m);
    const { keep, acc } = nucleus((j) => w[order[j]], m, sum, topP);
    if (acc / sum >= topP || m === n) return draw(order.slice(0, keep), (j) => w[order[j]], acc, rand);
  }
}

/**
 * The top-p nucleus of `count` weights in descending order summing to `sum`: how many to keep
 * (until the mass before the next reaches top-p; the first always stays) and their mass.
 */
function nucleus(weight: (j: number) => number, count: number, sum: number, topP: number) {
  let acc = 0;
  let keep = 0;
  while (keep < count && (keep === 0 || acc / sum < topP)) acc += weight(keep++);
  return { keep, acc };
}

/**
 * One draw among the top-k tokens `ids` (descending logits value(j), equal ones by id): weights
 * relative to the best, then the top-p nucleus among them (the first token always stays).
 */
function sampleBest(
  ids: readonly number[],
  value: (j: number) => number,
  t: number,
  topP: number,
  rand: () => number,
): number {
  const max = value(0);
  const p = ids.map((_, j) => Math.exp((value(j) - max) / t));
  const sum = p.reduce((a, b) => a + b, 0);
  if (topP >= 1) return draw(ids, (j) => p[j], sum, rand);
  const { keep, acc } = nucleus((j) => p[j], p.length, sum, topP);
  return draw(ids.slice(0, keep), (j) => p[j], acc, rand);
}

/** One draw from `order` with weights weight(j) summing to `sum`, walked in order. */
function draw(
  order: readonly number[],
  weight: (j: number) => number,
  sum: number,
  rand: () => number,
): number {
  let u = rand() * sum;
  for (let j = 0; j < order.length; j++) {
    u -= weight(j);
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
 * Greedy choices: each row's first largest last-position logit, found where the logits are (on a
 * GPU only the b ids come back, not b rows of the vocabulary).
 */
function greedyTokens(model: GPTModel, logits: Tensor): number[] {
  return tidy(() => {
    const s = logits.shape[1];
    const ids = argmax(model.gatherLogits(logits.narrow(1, s - 1, 1)), -1);
    return Array.from(ids.toTypedArray() as BigInt64Array, Number);
  });
}

/**
 * The k largest last-position logits of each row (descending, equal ones by id) with their ids,
 * chosen where the logits are: on a GPU b·k of them come back, not b rows of the vocabulary.
 */
function lastTopK(model: GPTModel, logits: Tensor, k: number): { ids: number[]; values: Float32Array }[] {
  return tidy(() => {
    const [b, s] = logits.shape;
    const best = topk(model.gatherLogits(logits.narrow(1, s - 1, 1)), k, -1);
    const values = best.values.to('float32').toTypedArray() as Float32Array;
    const ids = best.indices.toTypedArray() as BigInt64Array;
    return Array.from({ length: b }, (_, r) => ({
      ids: Array.from(ids.subarray(r * k, (r + 1) * k), Number),
      values: values.slice(r * k, (r + 1) * k),
    }));
  });
}

/**
 * Temperature sampling (with top-p, without top-k) of each active row of `rows` ([b, vocab]
 * last-position logits) where they live, for an asynchronous device (a GPU), where reading b rows
 * of the vocabulary and sorting them on the host took longer than the model's step: the weights
 * exp((x − max) / T) are made there in float64 and only what the draw needs comes back. Without
 * top-p each row's draw is the inverse of its cumulative weights in id order (the host rule's walk;
 * the uniform numbers go to the device, the b ids come back). With top-p the row sums come back
 * with the M best logits and their ids (M = 1024, ×8 until they hold each row's nucleus; equal
 * logits by id), and the host takes the nucleus and draws as sampleToken does. One draw of `rand`
 * per active row, in row order, as on the host (`rand`: one generator, or one per row); inactive
 * rows get -1.
 */
export function sampleOnDevice(
  rows: Tensor,
  opts: { temperature: number; topP?: number },
  rand: (() => number) | readonly (() => number)[],
  active: readonly boolean[],
): number[] {
  const randOf = (r: number) => (typeof rand === 'function' ? rand : rand[r]);
  const [b, n] = rows.shape;
  const t = opts.temperature;
  const topP = opts.topP ?? 1;
  return noGrad(() =>
    tidy(() => {
      const device = rows.device;
      const x = rows.to('float64');
      // a true division by T (a number divisor would multiply by 1 / T)
      const w = x
        .sub(x.amax(-1, true))
        .div(full([], t, { dtype: 'float64', device }))
        .exp();
      if (topP >= 1) {
        const u = Float64Array.from(active, (a, r) => (a ? randOf(r)() : 0));
        const c = w.cumsum(-1);
        const target = c.narrow(1, n - 1, 1).mul(fromTypedArray(u, [b, 1]).to(device));
        // the first id whose cumulative weight passes u · sum, or the last id with a weight
        const passed = c.le(target).sum(-1);
        const ids = arange(0, n, 1, { dtype: 'int64', device }).reshape(1, n);
        const lastWeighted = where(w.gt(0), ids, -1).amax(-1);
        const chosen = minimum(passed, lastWeighted).toTypedArray() as BigInt64Array;
        return Array.from(chosen, (v, r) => (active[r] ? Number(v) : -1));
      }
      const sums = w.sum(-1, true);
      const picked: ({ ids: number[]; weights: number[]; acc: number } | null)[] = new Array(b).fill(null);
      for (let m = Math.min(n, 1024); ; m = Math.min(n, m * 8)) {
        const best = topk(x, m, -1);
        // sums, values and ids (exact in float64 below 2^53) in one read
        const all = cat([sums, best.values, best.indices.to('float64')], -1).toTypedArray() as Float64Array;
        let open = false;
        for (let r = 0; r < b; r++) {
          if (!active[r] || picked[r]) continue;
          const row = all.subarray(r * (2 * m + 1), (r + 1) * (2 * m + 1));
          const sum = row[0];
          const max = row[1];
          // each weight computed once: the nucleus walks them, the draw walks the kept ones again
          const weights: number[] = [];
          const weight = (j: number) => {
            weights[j] ??= Math.exp((row[1 + j] - max) / t);
            return weights[j];
          };
          const { keep, acc } = nucleus(weight, m, sum, topP);
          if (acc / sum >= topP || m === n) {
            weights.length = keep;
            picked[r] = { ids: Array.from(row.subarray(1 + m, 1 + m + keep), Number), weights, acc };
          } else open = true;
        }
        if (!open) break;
      }
      // the draws in row order, after every nucleus is known
      return picked.map((p, r) => (p ? draw(p.ids, (j) => p.weights[j], p.acc, randOf(r)) : -1));
    }),
  );
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
  const greedy = !((opts.temperature ?? 0) > 0);
  // top-k sampling: the k best chosen where the logits are (the whole rows when k keeps them all)
  const topK = (opts.topK ?? 0) < model.config.vocabSize ? (opts.topK ?? 0) : 0;
  // each row's generator: one for all rows, or one per distinct seed
  const seeds = opts.seed;
  let rands: (() => number)[];
  if (typeof seeds === 'object') {
    if (seeds.length !== b) {
      throw new ModelError(
        'INVALID_INPUT',
        `seed has ${seeds.length} entries for ${b} prompts; give one per prompt`,
      );
    }
    const bySeed = new Map<number, () => number>();
    rands = seeds.map((sd) => {
      let g = bySeed.get(sd);
      if (!g) bySeed.set(sd, (g = samplingRng(sd)));
      return g;
    });
  } else {
    rands = new Array(b).fill(samplingRng(seeds ?? 0));
  }
  const rows: Generation[] = prompts.map(() => ({ tokens: [], finishReason: 'length' }));
  const done = new Array<boolean>(b).fill(maxNew === 0);
  // valid[r][j]: whether key j of row r is a real token (prompts are left-padded)
  const valid = new Uint8Array(b * capacity);
  // every row's tokens so far, left-padded: the prompt, then what was generated
  const tokens = new BigInt64Array(b * capacity);
  prompts.forEach((p, r) => {
    const pad = promptLen - p.length;
    for (let j = 0; j < p.length; j++) {
      tokens[r * capacity + pad + j] = BigInt(p[j]);
      valid[r * capacity + pad + j] = 1;
    }
  });
  const tokensOf = (len: number): Tensor => {
    const t = new BigInt64Array(b * len);
    for (let r = 0; r < b; r++) t.set(tokens.subarray(r * capacity, r * capacity + len), r * len);
    return fromTypedArray(t, [b, len]);
  };
  const maskOf = (len: number): Tensor => {
    const m = new Uint8Array(b * len);
    for (let r = 0; r < b; r++) m.set(valid.subarray(r * capacity, r * capacity + len), r * len);
    return fromTypedArray(m, [b, len]).to('bool');
  };
  const wasTraining = model.training;
  model.eval();
  let cache = new KVCache(b, capacity);
  const t0 = performance.now();
  let produced = 0;
  try {
    noGrad(() => {
      let input = tokensOf(promptLen);
      let len = promptLen;
      for (let step = 0; step < maxNew && !done.every(Boolean); step++) {
        if (step > 0 && model.rotary.usesLongFactors(len) && !model.rotary.usesLongFactors(len - 1)) {
          // longrope crossing its original context: the keys cached with the short factors are
          // recomputed with the long ones, the whole sequence run again (transformers' Phi-3 does so)
          cache.dispose();
          cache = new KVCache(b, capacity);
          input.dispose();
          input = tokensOf(len);
        }
        const next = tidy(() => {
          const mask = maskOf(len);
          const out = model.forward(input, { kvCache: cache, attentionMask: mask });
          const logits = out.logits as Tensor;
          if (greedy) return greedyTokens(model, logits);
          if (topK > 0) return lastTopK(model, logits, topK);
          if (logits.backend.synchronous === false) {
            // an asynchronous device: the draw made where the logits are (the host's rule, rows
            // not read back), the uniform numbers drawn now, for the active rows in row order
            const [, s] = logits.shape;
            const last = model.gatherLogits(logits.narrow(1, s - 1, 1));
            return sampleOnDevice(
              last.reshape(last.shape[0], last.shape[2]),
              { temperature: opts.temperature as number, topP: opts.topP },
              rands,
              done.map((d) => !d),
            );
          }
          return lastLogits(model, logits);
        });
        input.dispose();
        const chosen = new BigInt64Array(b);
        for (let r = 0; r < b; r++) {
          if (done[r]) continue;
          const row = next[r];
          const tok =
            typeof row === 'number'
              ? row
              : row instanceof Float32Array
                ? sampleToken(row, opts, rands[r])
                : sampleBest(
                    row.ids,
                    (j) => row.values[j],
                    opts.temperature as number,
                    opts.topP ?? 1,
                    rands[r],
                  );
          rows[r].tokens.push(tok);
          produced++;
          chosen[r] = BigInt(tok);
          tokens[r * capacity + len] = chosen[r];
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
