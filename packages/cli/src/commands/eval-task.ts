// `megapatch eval --task multiple-choice | loglikelihood`: benchmark scoring as EleutherAI's
// lm-evaluation-harness does it for its `multiple_choice` and `loglikelihood` tasks, on a JSONL of
// documents. Each (context, continuation) pair is tokenised as the harness's HF model does it
// (trailing whitespace of the context moved to the continuation; context + continuation encoded
// together, the continuation being what follows the context's own tokens; an empty context is
// the end-of-text token; no BOS unless --add-bos), scored by scoreContinuations, and reduced to
// the harness's metrics: acc and acc_norm (log-likelihood per character) with their standard
// errors for multiple choice; the mean log-likelihood, perplexity and greedy accuracy otherwise.
import * as fs from 'node:fs';
import type { HfTokenizer } from '@megapatch/data';
import type { ContinuationRequest, ContinuationScore, GPTModel } from '@megapatch/models';
import { CliError, UsageError } from '../errors.js';
import type { Io } from '../io.js';
import { withOutput } from '../outputs.js';
import { describeModel, joinJob, loadForJob, modelTokenizer } from './generate.js';
import { fileLines, LineWriter, parseRecord } from './jsonl.js';

const NAME = 'eval';

/** The tasks of `megapatch eval --task`. */
export const EVAL_TASKS = ['perplexity', 'multiple-choice', 'loglikelihood', 'generate-until'] as const;
export type EvalTask = (typeof EVAL_TASKS)[number];

/** What `megapatch eval --task multiple-choice | loglikelihood --json` prints. */
export interface TaskEvalReport {
  model: string;
  data: string;
  task: 'multiple-choice' | 'loglikelihood' | 'generate-until';
  seqLength: number;
  documents: number;
  /** (context, continuation) pairs scored: one per choice, or one per document. */
  requests: number;
  /**
   * Multiple choice: the highest log-likelihood is the label's. Log-likelihood: the continuation is
   * the greedy one. Generate-until: the prediction equals the target (the harness's exact_match).
   */
  acc: number;
  accStderr: number;
  /** Multiple choice: the highest log-likelihood per character of the choice is the label's. */
  accNorm?: number;
  accNormStderr?: number;
  /** Log-likelihood: the mean over documents of the continuation's log-likelihood. */
  meanLoglikelihood?: number;
  /** Log-likelihood: exp(−meanLoglikelihood), as the harness's `perplexity`. */
  perplexity?: number;
  /** Requests whose context was cut from the left to fit --seq-length. */
  truncated: number;
  seconds: number;
}

/** The flag values `megapatch eval` passes for a task. */
export interface TaskEvalOptions {
  model: string;
  dtype: 'float32' | 'bfloat16';
  hfDir?: string | undefined;
  data: string;
  task: 'multiple-choice' | 'loglikelihood' | 'generate-until';
  seqLength: number;
  batchSize: number;
  until?: string | undefined;
  maxGenToks: number;
  answerRegex?: string | undefined;
  contextKey: string;
  choicesKey: string;
  labelKey: string;
  continuationKey: string;
  targetDelimiter: string;
  addBos: boolean;
  perDoc?: string;
  overwrite: boolean;
  json: boolean;
}

/** lm-evaluation-harness's split of a (context, continuation) pair into tokens. */
export function encodePair(
  tok: Pick<HfTokenizer, 'encode' | 'bosId' | 'eodId'>,
  context: string,
  continuation: string,
  addBos = false,
): { context: number[]; continuation: number[] } {
  const encode = (s: string) => tok.encode(s, { addSpecialTokens: false });
  const bos = addBos && tok.bosId !== null ? [tok.bosId] : [];
  if (context === '') return { context: [tok.eodId], continuation: encode(continuation) };
  // trailing whitespace belongs to the continuation ("Answer: " + "B" scores " B")
  const spaces = context.length - context.trimEnd().length;
  if (spaces > 0) {
    continuation = context.slice(context.length - spaces) + continuation;
    context = context.slice(0, context.length - spaces);
  }
  const whole = encode(context + continuation);
  const ctx = encode(context);
  return { context: [...bos, ...ctx], continuation: whole.slice(ctx.length) };
}

/** A document of the task: its requests and, for multiple choice, the choices and the label. */
interface Doc {
  line: number;
  requests: ContinuationRequest[];
  choices?: string[];
  label?: number;
}

/** A continuation must have tokens, and fit in --seq-length. */
function checkContinuation(o: TaskEvalOptions, line: number, tokens: number, what: string): void {
  if (tokens === 0) throw new CliError('INVALID_INPUT', `${o.data} line ${line}: ${what} has no tokens`);
  if (tokens > o.seqLength) {
    throw new CliError(
      'INVALID_INPUT',
      `${o.data} line ${line}: ${what} has ${tokens} tokens, more than --seq-length ${o.seqLength}`,
    );
  }
}

/** A string field of a document; its absence is a one-line error naming the line and the flag. */
function stringField(
  file: string,
  line: number,
  r: Record<string, unknown>,
  key: string,
  flag: string,
): string {
  const v = r[key];
  if (typeof v !== 'string') {
    throw new CliError('INVALID_INPUT', `${file} line ${line}: no string field "${key}" (set ${flag})`);
  }
  return v;
}

/** Reads and tokenises the task's documents; every problem names the file and the line. */
function readDocs(o: TaskEvalOptions, tok: HfTokenizer): Doc[] {
  const docs: Doc[] = [];
  for (const { line, text } of fileLines(o.data)) {
    const r = parseRecord(o.data, line, text);
    const context = stringField(o.data, line, r, o.contextKey, '--context-key');
    if (o.task === 'loglikelihood') {
      const target = stringField(o.data, line, r, o.continuationKey, '--continuation-key');
      const q = encodePair(tok, context, o.targetDelimiter + target, o.addBos);
      checkContinuation(o, line, q.continuation.length, 'the continuation');
      docs.push({ line, requests: [q] });
      continue;
    }
    const choices = r[o.choicesKey];
    if (!Array.isArray(choices) || choices.length < 2 || !choices.every((c) => typeof c === 'string')) {
      throw new CliError(
        'INVALID_INPUT',
        `${o.data} line ${line}: "${o.choicesKey}" must be a list of at least 2 strings (set --choices-key)`,
      );
    }
    const label = r[o.labelKey];
    if (!Number.isInteger(label) || (label as number) < 0 || (label as number) >= choices.length) {
      throw new CliError(
        'INVALID_INPUT',
        `${o.data} line ${line}: "${o.labelKey}" must be the index of the right choice, 0 to ${choices.length - 1}, not ${JSON.stringify(label)} (set --label-key)`,
      );
    }
    const requests = choices.map((c) => encodePair(tok, context, o.targetDelimiter + c, o.addBos));
    for (const [i, q] of requests.entries()) checkContinuation(o, line, q.continuation.length, `choice ${i}`);
    docs.push({ line, requests, choices: choices as string[], label: label as number });
  }
  if (docs.length === 0) throw new CliError('INVALID_INPUT', `${o.data} holds no documents`);
  return docs;
}

/** The first index of the largest value (numpy's argmax). */
function argmax(xs: readonly number[]): number {
  let best = 0;
  for (let i = 1; i < xs.length; i++) if (xs[i] > xs[best]) best = i;
  return best;
}

/** Mean and the standard error of the mean (sample standard deviation / √n), as the harness reports. */
function meanStderr(xs: readonly number[]): [number, number] {
  const n = xs.length;
  const mean = xs.reduce((a, b) => a + b, 0) / n;
  if (n < 2) return [mean, Number.NaN];
  const variance = xs.reduce((a, x) => a + (x - mean) ** 2, 0) / (n - 1);
  return [mean, Math.sqrt(variance / n)];
}

/** Scores the requests of `docs` in groups, turning the event loop between groups so an interrupt stops the run. */
async function scoreAll(model: GPTModel, docs: Doc[], o: TaskEvalOptions, io: Io, lead: boolean) {
  const { scoreContinuations } = await import('@megapatch/models');
  const all = docs.flatMap((d) => d.requests);
  const scores: ContinuationScore[] = [];
  const group = 32 * o.batchSize;
  const t0 = performance.now();
  let lastNote = t0;
  for (let i = 0; i < all.length; i += group) {
    scores.push(
      ...scoreContinuations(model, all.slice(i, i + group), {
        seqLength: o.seqLength,
        batchSize: o.batchSize,
      }),
    );
    await new Promise<void>((resolve) => setImmediate(resolve));
    io.throwIfStopped();
    const now = performance.now();
    if (lead && now - lastNote > 5000) {
      lastNote = now;
      io.note(`progress: ${scores.length} of ${all.length} requests`);
    }
  }
  return { scores, seconds: (performance.now() - t0) / 1000 };
}

/** Whether `file` is a --per-doc output: empty, or its first line is `{"doc", ...}`. */
function isPerDocFile(file: string): boolean {
  if (!fs.statSync(file).isFile()) return false;
  const first = fileLines(file).next();
  if (first.done) return true;
  try {
    const v = JSON.parse(first.value.text) as Record<string, unknown>;
    return typeof v?.doc === 'number' && ('loglikelihoods' in v || 'loglikelihood' in v || 'generation' in v);
  } catch {
    return false;
  }
}

/** The report and the --per-doc lines of scored documents. */
function reduce(o: TaskEvalOptions, docs: Doc[], scores: ContinuationScore[], seconds: number) {
  let at = 0;
  const perDoc = docs.map((d) => {
    const s = scores.slice(at, at + d.requests.length);
    at += d.requests.length;
    return s;
  });
  const base = {
    model: o.model,
    data: o.data,
    task: o.task,
    seqLength: o.seqLength,
    documents: docs.length,
    requests: scores.length,
    truncated: scores.filter((s) => s.truncated > 0).length,
    seconds,
  };
  const lines: string[] = [];
  if (o.task === 'multiple-choice') {
    const hits: number[] = [];
    const normHits: number[] = [];
    for (const [i, d] of docs.entries()) {
      const lls = perDoc[i].map((s) => s.loglikelihood);
      const pred = argmax(lls);
      // acc_norm divides by the choice's length in characters (code points), without the delimiter
      const predNorm = argmax(lls.map((ll, j) => ll / [...(d.choices as string[])[j]].length));
      hits.push(pred === d.label ? 1 : 0);
      normHits.push(predNorm === d.label ? 1 : 0);
      const greedy = perDoc[i].map((s) => s.greedy);
      lines.push(JSON.stringify({ doc: i, loglikelihoods: lls, greedy, pred, predNorm, label: d.label }));
    }
    const [acc, accStderr] = meanStderr(hits);
    const [accNorm, accNormStderr] = meanStderr(normHits);
    const report: TaskEvalReport = {
      ...base,
      task: 'multiple-choice',
      acc,
      accStderr,
      accNorm,
      accNormStderr,
    };
    return { report, lines };
  }
  const lls = perDoc.map(([s]) => s.loglikelihood);
  const [acc, accStderr] = meanStderr(perDoc.map(([s]) => (s.greedy ? 1 : 0)));
  const meanLoglikelihood = lls.reduce((a, b) => a + b, 0) / lls.length;
  for (const [i, [s]] of perDoc.entries()) {
    lines.push(
      JSON.stringify({ doc: i, loglikelihood: s.loglikelihood, greedy: s.greedy, tokens: s.tokens }),
    );
  }
  const report: TaskEvalReport = {
    ...base,
    task: 'loglikelihood',
    acc,
    accStderr,
    meanLoglikelihood,
    perplexity: Math.exp(-meanLoglikelihood),
  };
  return { report, lines };
}

/** Runs a benchmark task of `megapatch eval` with parsed flag values; prints the report and returns it. */
export async function runTaskEval(o: TaskEvalOptions, io: Io): Promise<TaskEvalReport> {
  if (!fs.existsSync(o.data)) throw new UsageError(`--data ${o.data}: no such file`, NAME);
  const out = o.perDoc;
  if (out !== undefined && fs.existsSync(out)) {
    if (!o.overwrite) throw new CliError('EXISTS', `--per-doc ${out} exists; pass --overwrite to replace it`);
    if (!isPerDocFile(out)) {
      throw new CliError(
        'NOT_OURS',
        `--per-doc ${out} is not a file megapatch eval wrote (its first line is not {"doc", ...}); --overwrite replaces only those, so remove it yourself or choose another path`,
      );
    }
  }
  const described = await describeModel(o.model, o.hfDir);
  const { maxPositionEmbeddings } = described.config;
  if (o.seqLength > maxPositionEmbeddings) {
    throw new UsageError(
      `--seq-length ${o.seqLength} exceeds the model's ${maxPositionEmbeddings} positions (max_position_embeddings)`,
      NAME,
    );
  }
  const tok = await modelTokenizer(o.model, described.tokenizerDir);
  if (o.task === 'generate-until') return runGenerateUntil(o, io, tok, described.tokenizerDir as string);
  const docs = readDocs(o, tok);
  const job = await joinJob();
  const lead = job.rank === 0;
  let model: GPTModel | undefined;
  let result: { report: TaskEvalReport; lines: string[] };
  try {
    const m = await loadForJob(o.model, o.dtype, o.hfDir);
    model = m;
    const score = async () => {
      const { scores, seconds } = await scoreAll(m, docs, o, io, lead);
      return reduce(o, docs, scores, seconds);
    };
    if (out !== undefined && lead) {
      const inputs = [
        { flag: '--model', path: o.model },
        ...(o.hfDir !== undefined ? [{ flag: '--hf-dir', path: o.hfDir }] : []),
        { flag: '--data', path: o.data },
      ];
      result = await withOutput(
        io,
        NAME,
        { target: out, outputs: [{ flag: '--per-doc', path: out }], inputs },
        async () => {
          const r = await score();
          LineWriter.writeAll(out, r.lines);
          return r;
        },
      );
    } else result = await score();
  } finally {
    model?.dispose();
    await job.close();
  }
  const { report } = result;
  if (!lead) return report;
  const pm = (m: number, e: number) => `${m.toFixed(4)} ± ${Number.isNaN(e) ? 'n/a' : e.toFixed(4)}`;
  if (o.json) io.out.log(JSON.stringify(report));
  else {
    if (report.task === 'multiple-choice') {
      io.out.log(
        `acc: ${pm(report.acc, report.accStderr)}, acc_norm: ${pm(report.accNorm as number, report.accNormStderr as number)}`,
      );
    } else {
      io.out.log(
        `acc (greedy): ${pm(report.acc, report.accStderr)}, mean log-likelihood: ${(report.meanLoglikelihood as number).toFixed(6)}, perplexity: ${(report.perplexity as number).toFixed(4)}`,
      );
    }
    io.out.log(
      `documents: ${report.documents}, requests: ${report.requests}, truncated: ${report.truncated}, seconds: ${report.seconds.toFixed(2)}`,
    );
    if (out !== undefined) io.out.log(`wrote ${out}`);
  }
  return report;
}

/** A generate-until document: the context's tokens (cut from the left) and the target. */
interface GenDoc {
  ids: number[];
  target: string;
  truncated: boolean;
}

/** The prediction of a generation: the text before the first stop string, or the regex's answer in it. */
export function predictionOf(text: string, until: readonly string[], answer: RegExp | null): string {
  let t = text;
  for (const u of until) t = t.split(u)[0];
  if (!answer) return t.trim();
  const m = answer.exec(t);
  return m ? (m[1] ?? m[0]).trim() : '[invalid]';
}

/**
 * `--task generate-until`: greedy generation from each context until a stop string (or EOS, or
 * --max-gen-toks tokens), the prediction compared with the target (exact match after stripping).
 */
async function runGenerateUntil(
  o: TaskEvalOptions,
  io: Io,
  tok: HfTokenizer,
  tokenizerDir: string,
): Promise<TaskEvalReport> {
  const { stopStrings, eosTokenIds } = await import('./generate.js');
  const until = o.until === undefined ? ['\n\n'] : stopStrings(o.until, '--until', NAME);
  if (o.maxGenToks >= o.seqLength) {
    throw new UsageError(
      `--max-gen-toks ${o.maxGenToks} leaves no room for a context in --seq-length ${o.seqLength}`,
      NAME,
    );
  }
  let answer: RegExp | null = null;
  if (o.answerRegex !== undefined) {
    try {
      answer = new RegExp(o.answerRegex);
    } catch (e) {
      throw new UsageError(`--answer-regex: ${(e as Error).message}`, NAME);
    }
  }
  const keep = o.seqLength - o.maxGenToks;
  const bos = o.addBos && tok.bosId !== null ? [tok.bosId] : [];
  const docs: GenDoc[] = [];
  for (const { line, text } of fileLines(o.data)) {
    const r = parseRecord(o.data, line, text);
    const context = stringField(o.data, line, r, o.contextKey, '--context-key');
    const target = stringField(o.data, line, r, o.continuationKey, '--continuation-key');
    const ids = [...bos, ...tok.encode(context, { addSpecialTokens: false })];
    if (ids.length === 0) ids.push(tok.eodId);
    docs.push({ ids: ids.slice(Math.max(0, ids.length - keep)), target, truncated: ids.length > keep });
  }
  if (docs.length === 0) throw new CliError('INVALID_INPUT', `${o.data} holds no documents`);
  const eos = eosTokenIds(tok, tokenizerDir);
  const decode = (ids: number[]) => tok.decode(ids, { skipSpecialTokens: true });
  const job = await joinJob();
  const lead = job.rank === 0;
  let model: GPTModel | undefined;
  const lines: string[] = [];
  const hits: number[] = [];
  const t0 = performance.now();
  const run = async () => {
    const { generate } = await import('@megapatch/models');
    const m = model as GPTModel;
    for (let i = 0; i < docs.length; i += o.batchSize) {
      const batch = docs.slice(i, i + o.batchSize);
      const r = generate(
        m,
        batch.map((d) => d.ids),
        { maxNewTokens: o.maxGenToks, temperature: 0, eosTokenIds: eos, stopStrings: until, decode },
      );
      for (const [j, row] of r.rows.entries()) {
        const kept = row.finishReason === 'eos' ? row.tokens.slice(0, -1) : row.tokens;
        const generation = row.finishReason === 'stop' ? (row.text as string) : decode(kept);
        const prediction = predictionOf(generation, until, answer);
        const d = batch[j];
        const exact = prediction === d.target.trim() ? 1 : 0;
        hits.push(exact);
        lines.push(
          JSON.stringify({ doc: i + j, generation, prediction, target: d.target, exact: exact === 1 }),
        );
      }
      await new Promise<void>((resolve) => setImmediate(resolve));
      io.throwIfStopped();
    }
  };
  try {
    model = await loadForJob(o.model, o.dtype, o.hfDir);
    if (o.perDoc !== undefined && lead) {
      const out = o.perDoc;
      const inputs = [
        { flag: '--model', path: o.model },
        ...(o.hfDir !== undefined ? [{ flag: '--hf-dir', path: o.hfDir }] : []),
        { flag: '--data', path: o.data },
      ];
      await withOutput(
        io,
        NAME,
        { target: out, outputs: [{ flag: '--per-doc', path: out }], inputs },
        async () => {
          await run();
          LineWriter.writeAll(out, lines);
        },
      );
    } else await run();
  } finally {
    model?.dispose();
    await job.close();
  }
  const [acc, accStderr] = meanStderr(hits);
  const report: TaskEvalReport = {
    model: o.model,
    data: o.data,
    task: 'generate-until',
    seqLength: o.seqLength,
    documents: docs.length,
    requests: docs.length,
    truncated: docs.filter((d) => d.truncated).length,
    seconds: (performance.now() - t0) / 1000,
    acc,
    accStderr,
  };
  if (!lead) return report;
  if (o.json) io.out.log(JSON.stringify(report));
  else {
    io.out.log(`exact_match: ${acc.toFixed(4)} ± ${Number.isNaN(accStderr) ? 'n/a' : accStderr.toFixed(4)}`);
    io.out.log(
      `documents: ${report.documents}, truncated: ${report.truncated}, seconds: ${report.seconds.toFixed(2)}`,
    );
    if (o.perDoc !== undefined) io.out.log(`wrote ${o.perDoc}`);
  }
  return report;
}
