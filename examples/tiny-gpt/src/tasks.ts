// Training data the example makes itself (digit addition and sorting, as in minGPT's demos) or
// reads from a text file (character level). Each task yields (tokens, labels) rows where labels
// are the next tokens and -100 marks positions that carry no loss.

/** A small seeded PRNG (mulberry32) for sampling batches in JS. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface Batch {
  tokens: Int32Array;
  labels: Int32Array;
  batchSize: number;
  seqLength: number;
}

export interface Task {
  readonly name: string;
  readonly vocabSize: number;
  readonly seqLength: number;
  /** A random training batch. */
  trainBatch(batchSize: number, random: () => number): Batch;
}

/** A problem with a prompt and its answer, for exact-match evaluation. */
export interface Problem {
  prompt: number[];
  answer: number[];
}

export interface PuzzleTask extends Task {
  readonly testProblems: Problem[];
  describe(p: Problem, predicted: number[]): string;
}

function puzzleBatch(problems: Problem[], promptLen: number, batchSize: number, random: () => number): Batch {
  const seq = problems[0].prompt.length + problems[0].answer.length - 1;
  const tokens = new Int32Array(batchSize * seq);
  const labels = new Int32Array(batchSize * seq);
  for (let b = 0; b < batchSize; b++) {
    const p = problems[Math.floor(random() * problems.length)];
    const full = [...p.prompt, ...p.answer];
    for (let i = 0; i < seq; i++) {
      tokens[b * seq + i] = full[i];
      // only the answer is predicted: positions before the last prompt token carry no loss
      labels[b * seq + i] = i < promptLen - 1 ? -100 : full[i + 1];
    }
  }
  return { tokens, labels, batchSize, seqLength: seq };
}

function shuffled<T>(xs: T[], random: () => number): T[] {
  const a = [...xs];
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

/**
 * Adding two n-digit numbers: the prompt is the digits of a and b, the answer the n+1 digits of
 * a + b written least significant first (the order in which a person carries).
 */
export function additionTask(ndigit = 2, testSize = 500, seed = 7): PuzzleTask {
  const all: Problem[] = [];
  const lim = 10 ** ndigit;
  const digits = (v: number, n: number): number[] => [...String(v).padStart(n, '0')].map(Number);
  for (let a = 0; a < lim; a++) {
    for (let b = 0; b < lim; b++) {
      all.push({
        prompt: [...digits(a, ndigit), ...digits(b, ndigit)],
        answer: digits(a + b, ndigit + 1).reverse(),
      });
    }
  }
  const order = shuffled(all, rng(seed));
  const test = order.slice(0, testSize);
  const train = order.slice(testSize);
  return {
    name: `add${ndigit}`,
    vocabSize: 10,
    seqLength: 3 * ndigit,
    testProblems: test,
    trainBatch: (bs, random) => puzzleBatch(train, 2 * ndigit, bs, random),
    describe: (p, pred) => {
      const a = p.prompt.slice(0, ndigit).join('');
      const b = p.prompt.slice(ndigit).join('');
      return `${a} + ${b} = ${[...pred].reverse().join('')}`;
    },
  };
}

/** Sorting `length` digits drawn from 0..numDigits-1 (minGPT's sort demo). */
export function sortTask(length = 6, numDigits = 3, testSize = 200, seed = 7): PuzzleTask {
  const random = rng(seed);
  const make = (): Problem => {
    const prompt = Array.from({ length }, () => Math.floor(random() * numDigits));
    return { prompt, answer: [...prompt].sort((x, y) => x - y) };
  };
  const key = (p: Problem): string => p.prompt.join('');
  const test: Problem[] = [];
  const seen = new Set<string>();
  while (test.length < testSize) {
    const p = make();
    if (!seen.has(key(p))) {
      seen.add(key(p));
      test.push(p);
    }
  }
  return {
    name: `sort${length}`,
    vocabSize: numDigits,
    seqLength: 2 * length - 1,
    testProblems: test,
    trainBatch: (bs, r) => {
      const problems: Problem[] = [];
      while (problems.length < Math.min(bs, 64)) {
        const p = make();
        if (!seen.has(key(p))) problems.push(p);
      }
      return puzzleBatch(problems, length, bs, r);
    },
    describe: (p, pred) => `sort(${p.prompt.join(' ')}) = ${pred.join(' ')}`,
  };
}

export interface TextTask extends Task {
  readonly chars: string[];
  encode(s: string): number[];
  decode(ids: readonly number[]): string;
  /** Consecutive held-out windows (the last tenth of the text) for validation. */
  valBatches(batchSize: number, maxBatches: number): Batch[];
  /** Entropy (nats) of the text's character distribution: the loss of a model that ignores context. */
  readonly unigramEntropy: number;
}

/** Character-level language modelling on a text; the last 10% is held out. */
export function textTask(text: string, seqLength = 128): TextTask {
  if (text.length < 10 * (seqLength + 1)) {
    throw new Error(`text of ${text.length} characters is too short for sequences of ${seqLength}`);
  }
  const chars = [...new Set(text)].sort();
  const index = new Map(chars.map((c, i) => [c, i]));
  const ids = Int32Array.from(text, (c) => index.get(c)!);
  const split = Math.floor(ids.length * 0.9);
  const counts = new Float64Array(chars.length);
  for (const id of ids) counts[id]++;
  let entropy = 0;
  for (const c of counts) if (c > 0) entropy -= (c / ids.length) * Math.log(c / ids.length);
  const window = (start: number, b: number, batch: Batch): void => {
    for (let i = 0; i < seqLength; i++) {
      batch.tokens[b * seqLength + i] = ids[start + i];
      batch.labels[b * seqLength + i] = ids[start + i + 1];
    }
  };
  const empty = (bs: number): Batch => ({
    tokens: new Int32Array(bs * seqLength),
    labels: new Int32Array(bs * seqLength),
    batchSize: bs,
    seqLength,
  });
  return {
    name: 'text',
    vocabSize: chars.length,
    seqLength,
    chars,
    unigramEntropy: entropy,
    encode: (s) => [...s].map((c) => index.get(c) ?? 0),
    decode: (xs) => xs.map((i) => chars[i]).join(''),
    trainBatch: (bs, random) => {
      const batch = empty(bs);
      for (let b = 0; b < bs; b++) window(Math.floor(random() * (split - seqLength - 1)), b, batch);
      return batch;
    },
    valBatches: (bs, maxBatches) => {
      const out: Batch[] = [];
      let start = split;
      while (out.length < maxBatches && start + bs * seqLength + 1 < ids.length) {
        const batch = empty(bs);
        for (let b = 0; b < bs; b++, start += seqLength) window(start, b, batch);
        out.push(batch);
      }
      return out;
    },
  };
}
