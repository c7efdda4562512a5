/**
 * The run folder, as the trainer writes it and the run report reads it.
 *
 * `<run-dir>/metrics.jsonl` holds one JSON object per line, appended as the run goes:
 *
 * - a training line per iteration (or per log interval, `elapsedMs` then being the mean):
 *   `{"kind": "train", "iteration": n, "consumedSamples": n, "globalBatchSize": n (the step's,
 *     below the configured one during a batch-size ramp-up), "elapsedMs": ms per iteration,
 *     "lr": x, "lmLoss": x, "gradNorm": x | null, "skippedIterations": n, "tokensPerSecond": x,
 *     "tflops": x | null, "memory": {"liveBytes": n, "peakBytes": n, "cachedBytes"?: n},
 *     "moe"?: {"auxLoss"?: x, "zLoss"?: x, "mtpLoss"?: x,
 *              "expertLoad"?: {"<layer>": [tokens routed to each expert, ...]}},
 *     "rl"?: {"rewardMean": x, "rewardStd": x, "rewardMin": x, "rewardMax": x,
 *             "responseLength": x, "pgLoss": x, "klLoss": x, "clipFraction": x, "approxKl": x, ...}
 *     (GRPO runs: lmLoss is then the objective, pgLoss + klLossCoef × klLoss),
 *     "dpo"?: {"loss": x, "accuracy": x, "chosenReward": x, "rejectedReward": x, "margin": x, ...}
 *     (DPO runs: lmLoss is the DPO loss plus ftx × the chosen replies' NLL),
 *     "time": ISO 8601 date-time}`
 *   `skippedIterations` is the running total of iterations skipped by the loss scaler.
 *   `lmLoss` and `gradNorm` are null when not finite (JSON has no NaN); `gradNorm` is null too for
 *   an iteration skipped by the loss scaler. `tflops` is null where the model's FLOPs are unknown.
 * - a validation line after each evaluation:
 *   `{"kind": "valid", "iteration": n, "consumedSamples": n, "lmLoss": x, "perplexity": x,
 *     "time": ISO 8601 date-time}`
 *   GRPO runs write `lmLoss` and `perplexity` null and `"rl": {"rewardMean": x, "responseLength": x}`.
 * - a test line, the same fields with `"kind": "test"`, after the test evaluation when a run with
 *   test data (a split with a test part, or data.testDataPath) ends.
 *
 * Fields the schemas do not name are kept (the trainer may add more); lines of other kinds are
 * skipped with a warning. A resumed run appends to the same file, so an
 * iteration may appear twice: the later line wins. A line that is not valid is an error naming its
 * number, except an incomplete last line (no newline, not valid JSON: a run killed mid-write),
 * which is skipped with a warning.
 *
 * `<run-dir>/config.json` (optional) is the resolved run config, free-form JSON.
 *
 * The report goes to `<run-dir>/report/`: `index.html` and one PNG per chart.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { z } from 'zod';
import { ReportError } from './errors.js';

export const RUN_METRICS_FILE = 'metrics.jsonl';
export const RUN_CONFIG_FILE = 'config.json';

const count = z.number().int().nonnegative();
const finiteOrNull = z.number().nullable();
const time = z.iso.datetime({ offset: true });

/** The MoE part of a training line. */
export const MoeMetrics = z.looseObject({
  auxLoss: z.number().optional(),
  zLoss: z.number().optional(),
  mtpLoss: z.number().optional(),
  /** Tokens routed to each expert in the interval, by layer number. */
  expertLoad: z.record(z.string(), z.array(z.number().nonnegative())).optional(),
});
export type MoeMetrics = z.infer<typeof MoeMetrics>;

/** The GRPO part of a training line (a run with an `rl` section). */
export const RlMetricsLine = z.looseObject({
  rewardMean: z.number(),
  rewardStd: z.number().optional(),
  rewardMin: z.number().optional(),
  rewardMax: z.number().optional(),
  responseLength: z.number().optional(),
  pgLoss: z.number().optional(),
  klLoss: z.number().optional(),
  clipFraction: z.number().optional(),
  approxKl: z.number().optional(),
});
export type RlMetricsLine = z.infer<typeof RlMetricsLine>;

/** The DPO part of a training or validation line (a run with a `dpo` section). */
export const DpoMetricsLine = z.looseObject({
  loss: z.number(),
  accuracy: z.number().optional(),
  chosenReward: z.number().optional(),
  rejectedReward: z.number().optional(),
  margin: z.number().optional(),
});
export type DpoMetricsLine = z.infer<typeof DpoMetricsLine>;

/** A `"kind": "train"` line. */
export const TrainMetricsLine = z.looseObject({
  kind: z.literal('train'),
  iteration: count,
  consumedSamples: count,
  /** Milliseconds per iteration (the mean over the interval, for a line per log interval). */
  elapsedMs: z.number().nonnegative(),
  lr: z.number().nonnegative(),
  lmLoss: finiteOrNull,
  gradNorm: finiteOrNull,
  /** Iterations skipped so far in the run (loss-scale overflow), a running total. */
  skippedIterations: count,
  tokensPerSecond: z.number().nonnegative(),
  /** Model TFLOP/s per GPU (Megatron's formula), or null when unknown. */
  tflops: finiteOrNull,
  /** cachedBytes: the caching allocator's reserve (absent in runs written before it was logged). */
  memory: z.looseObject({ liveBytes: count, peakBytes: count, cachedBytes: count.optional() }),
  moe: MoeMetrics.optional(),
  rl: RlMetricsLine.optional(),
  dpo: DpoMetricsLine.optional(),
  time,
});
export type TrainMetricsLine = z.infer<typeof TrainMetricsLine>;

/** A `"kind": "valid"` line, or `"kind": "test"` (the test evaluation when a run ends). */
export const ValidMetricsLine = z.looseObject({
  kind: z.enum(['valid', 'test']),
  iteration: count,
  consumedSamples: count,
  lmLoss: finiteOrNull,
  perplexity: finiteOrNull,
  /** GRPO runs: the mean reward of the held-out prompts (lmLoss and perplexity null). */
  rl: z.looseObject({ rewardMean: z.number(), responseLength: z.number().optional() }).optional(),
  /** DPO runs: the held-out pairs' numbers (lmLoss is their DPO loss). */
  dpo: DpoMetricsLine.optional(),
  time,
});
export type ValidMetricsLine = z.infer<typeof ValidMetricsLine>;

/** What {@link readRunMetrics} found in a run folder. */
export interface RunMetrics {
  runDir: string;
  /** Training lines by increasing iteration (the later of repeated iterations). */
  train: TrainMetricsLine[];
  /** Validation lines by increasing iteration. */
  valid: ValidMetricsLine[];
  /** Test evaluations (one when a run with test data ends), by increasing iteration. */
  test: ValidMetricsLine[];
  /** The parsed config.json, or null when there is none. */
  config: unknown;
  /** Lines skipped: an incomplete last line, lines of unknown kinds. */
  warnings: string[];
}

/** The lines of a file, read in 1 MiB chunks, with their 1-based numbers and whether each ended with a newline. */
function* fileLines(file: string): Generator<{ line: number; text: string; complete: boolean }> {
  const fd = fs.openSync(file, 'r');
  try {
    const chunk = Buffer.alloc(1 << 20);
    const decoder = new TextDecoder();
    let rest = '';
    let line = 0;
    for (;;) {
      const n = fs.readSync(fd, chunk, 0, chunk.length, null);
      rest += n > 0 ? decoder.decode(chunk.subarray(0, n), { stream: true }) : decoder.decode();
      const parts = rest.split('\n');
      rest = parts.pop() as string;
      for (const text of parts) yield { line: ++line, text, complete: true };
      if (n === 0) {
        if (rest !== '') yield { line: ++line, text: rest, complete: false };
        return;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** A zod error as `field: message; field: message`. */
function describeIssues(e: z.ZodError): string {
  return e.issues
    .slice(0, 3)
    .map((i) => (i.path.length > 0 ? `${i.path.join('.')}: ${i.message}` : i.message))
    .join('; ');
}

/** Sorted by iteration; of two lines for one iteration (a resumed run), the later one. */
function byIteration<T extends { iteration: number }>(records: T[]): T[] {
  const last = new Map<number, T>();
  for (const r of records) last.set(r.iteration, r);
  return [...last.values()].sort((a, b) => a.iteration - b.iteration);
}

/** Reads and validates `<runDir>/metrics.jsonl` and `<runDir>/config.json` (see the top of this file). */
export function readRunMetrics(runDir: string): RunMetrics {
  if (!fs.existsSync(runDir)) {
    throw new ReportError('NO_RUN', `${runDir}: no such run folder`);
  }
  if (!fs.statSync(runDir).isDirectory()) {
    throw new ReportError(
      'NO_RUN',
      `${runDir} is not a folder; give the run folder holding ${RUN_METRICS_FILE}`,
    );
  }
  const file = path.join(runDir, RUN_METRICS_FILE);
  if (!fs.existsSync(file)) {
    throw new ReportError(
      'NO_METRICS',
      `${runDir} has no ${RUN_METRICS_FILE}; is it a megapatch run folder?`,
    );
  }
  const train: TrainMetricsLine[] = [];
  const valid: ValidMetricsLine[] = [];
  const test: ValidMetricsLine[] = [];
  const warnings: string[] = [];
  const otherKinds = new Map<string, { lines: number; first: number }>();
  for (const { line, text, complete } of fileLines(file)) {
    if (text.trim() === '') continue;
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (e) {
      if (!complete) {
        warnings.push(`${file} line ${line}: incomplete last line skipped (a run stopped while writing it)`);
        continue;
      }
      throw new ReportError('BAD_METRICS', `${file} line ${line}: not valid JSON (${(e as Error).message})`);
    }
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      throw new ReportError('BAD_METRICS', `${file} line ${line}: expected a JSON object`);
    }
    const kind = (value as { kind?: unknown }).kind;
    const schema =
      kind === 'train' ? TrainMetricsLine : kind === 'valid' || kind === 'test' ? ValidMetricsLine : null;
    if (schema === null) {
      if (typeof kind !== 'string') {
        throw new ReportError(
          'BAD_METRICS',
          `${file} line ${line}: no "kind" ("train", "valid" or "test"); is it a megapatch metrics file?`,
        );
      }
      const seen = otherKinds.get(kind) ?? { lines: 0, first: line };
      seen.lines++;
      otherKinds.set(kind, seen);
      continue;
    }
    const parsed = schema.safeParse(value);
    if (!parsed.success) {
      throw new ReportError(
        'BAD_METRICS',
        `${file} line ${line}: bad ${kind} line (${describeIssues(parsed.error)})`,
      );
    }
    if (parsed.data.kind === 'train') train.push(parsed.data);
    else if (parsed.data.kind === 'test') test.push(parsed.data);
    else valid.push(parsed.data);
  }
  for (const [kind, seen] of otherKinds) {
    warnings.push(
      `${file}: ${seen.lines} line(s) of kind "${kind}" ignored (first at line ${seen.first}); the report knows "train", "valid" and "test"`,
    );
  }
  if (train.length === 0 && valid.length === 0) {
    throw new ReportError(
      'NO_METRICS',
      `${file} holds no training or validation lines yet; run the report after the first log interval`,
    );
  }
  return {
    runDir,
    train: byIteration(train),
    valid: byIteration(valid),
    test: byIteration(test),
    config: readConfig(runDir),
    warnings,
  };
}

/** The parsed `<runDir>/config.json`, or null when there is none. */
function readConfig(runDir: string): unknown {
  const file = path.join(runDir, RUN_CONFIG_FILE);
  if (!fs.existsSync(file)) return null;
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new ReportError('BAD_CONFIG', `${file}: not valid JSON (${(e as Error).message})`);
  }
}
