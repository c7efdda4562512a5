// The training loop: AdamW with Megatron's warm-up + cosine schedule, gradient clipping, and
// one Megatron-style log line per interval. Every step runs inside tidy(), so the memory in use
// is the same after every step.
import {
  AdamW,
  clipGradNorm,
  fromTypedArray,
  memoryStats,
  noGrad,
  OptimizerParamScheduler,
  softmax,
  type Tensor,
  tidy,
} from '@megapatch/tensor';
import type { GPT } from './model.js';
import type { Batch, PuzzleTask, Task, TextTask } from './tasks.js';

export interface TrainOptions {
  iters: number;
  batchSize: number;
  lr: number;
  minLr: number;
  warmupIters: number;
  weightDecay: number;
  clipGrad: number;
  logInterval: number;
  seed: number;
  /** Where log lines go (default console.log). */
  log?: (line: string) => void;
}

export interface StepInfo {
  iteration: number;
  loss: number;
  lr: number;
  gradNorm: number;
  /** Live native bytes after the step (flat from step to step). */
  liveBytes: number;
  msPerIter: number;
  tokensPerSecond: number;
}

function toTensors(batch: Batch): { tokens: Tensor; labels: Tensor } {
  const shape = [batch.batchSize, batch.seqLength];
  return { tokens: fromTypedArray(batch.tokens, shape), labels: fromTypedArray(batch.labels, shape) };
}

const sci = (v: number): string =>
  v
    .toExponential(6)
    .toUpperCase()
    .replace(/E([+-])(\d)$/, 'E$10$2');

/** Trains `model` on `task`; returns one StepInfo per iteration. */
export function train(model: GPT, task: Task, opts: TrainOptions, random: () => number): StepInfo[] {
  const run = trainSteps(model, task, opts, random);
  for (let r = run.next(); ; r = run.next()) if (r.done) return r.value;
}

/**
 * train(), yielding to the event loop every few tens of milliseconds: a caller with timers or I/O
 * to serve (a test runner's worker, a server) stays responsive during a long run.
 */
export async function trainAsync(
  model: GPT,
  task: Task,
  opts: TrainOptions,
  random: () => number,
): Promise<StepInfo[]> {
  const run = trainSteps(model, task, opts, random);
  let last = performance.now();
  for (let r = run.next(); ; r = run.next()) {
    if (r.done) return r.value;
    if (performance.now() - last > 50) {
      await new Promise((resolve) => setImmediate(resolve));
      last = performance.now();
    }
  }
}

/** The training loop, one iteration per `next()`. */
function* trainSteps(
  model: GPT,
  task: Task,
  opts: TrainOptions,
  random: () => number,
): Generator<void, StepInfo[], void> {
  const log = opts.log ?? console.log;
  const params = model.parameters();
  const optimizer = new AdamW(params, {
    lr: opts.lr,
    betas: [0.9, 0.95],
    eps: 1e-8,
    weightDecay: opts.weightDecay,
  });
  const scheduler = new OptimizerParamScheduler({
    optimizer,
    initLr: 0,
    maxLr: opts.lr,
    minLr: opts.minLr,
    lrWarmupSteps: opts.warmupIters,
    lrDecaySteps: opts.iters,
    lrDecayStyle: 'cosine',
  });
  const steps: StepInfo[] = [];
  let windowStart = performance.now();
  let windowLoss = 0;
  for (let it = 1; it <= opts.iters; it++) {
    const t0 = performance.now();
    const lr = optimizer.paramGroups[0].lr;
    const batch = task.trainBatch(opts.batchSize, random);
    const loss = tidy(() => {
      const { tokens, labels } = toTensors(batch);
      const l = model.loss(tokens, labels);
      l.backward();
      return l.item();
    });
    const gradNorm = clipGradNorm(params, opts.clipGrad);
    optimizer.step();
    scheduler.step();
    optimizer.zeroGrad();
    const ms = performance.now() - t0;
    const tokens = batch.batchSize * batch.seqLength;
    steps.push({
      iteration: it,
      loss,
      lr,
      gradNorm,
      liveBytes: memoryStats().liveBytes,
      msPerIter: ms,
      tokensPerSecond: (tokens / ms) * 1000,
    });
    windowLoss += loss;
    if (it % opts.logInterval === 0 || it === opts.iters) {
      const n = it % opts.logInterval === 0 ? opts.logInterval : it % opts.logInterval;
      const elapsed = (performance.now() - windowStart) / n;
      log(
        ` iteration ${String(it).padStart(6)}/${String(opts.iters).padStart(6)} |` +
          ` consumed samples: ${String(it * opts.batchSize).padStart(9)} |` +
          ` elapsed time per iteration (ms): ${elapsed.toFixed(1)} |` +
          ` learning rate: ${sci(lr)} |` +
          ` global batch size: ${String(opts.batchSize).padStart(4)} |` +
          ` lm loss: ${sci(windowLoss / n)} |` +
          ` grad norm: ${gradNorm.toFixed(3)} |` +
          ` tokens per second: ${Math.round((tokens / elapsed) * 1000)} |`,
      );
      windowLoss = 0;
      windowStart = performance.now();
    }
    yield;
  }
  optimizer.dispose();
  return steps;
}

/** Greedy decoding of every test problem; returns exact-match accuracy and the predictions. */
export function evaluatePuzzle(model: GPT, task: PuzzleTask): { accuracy: number; predictions: number[][] } {
  const problems = task.testProblems;
  const answerLen = problems[0].answer.length;
  const seqs = problems.map((p) => [...p.prompt]);
  const wasTraining = model.training;
  model.eval();
  noGrad(() => {
    for (let step = 0; step < answerLen; step++) {
      const len = seqs[0].length;
      const next = tidy(() => {
        const tokens = fromTypedArray(Int32Array.from(seqs.flat()), [seqs.length, len]);
        const logits = model.forward(tokens);
        return logits
          .select(1, len - 1)
          .argmax(-1)
          .toTypedArray();
      });
      for (let i = 0; i < seqs.length; i++) seqs[i].push(Number(next[i]));
    }
  });
  model.train(wasTraining);
  const predictions = seqs.map((s) => s.slice(s.length - answerLen));
  const correct = predictions.filter((p, i) => p.every((v, j) => v === problems[i].answer[j])).length;
  return { accuracy: correct / problems.length, predictions };
}

/** Mean loss over held-out windows of a text task. */
export function validationLoss(model: GPT, task: TextTask, batchSize: number, maxBatches: number): number {
  const batches = task.valBatches(batchSize, maxBatches);
  let total = 0;
  noGrad(() => {
    for (const b of batches) {
      total += tidy(() => {
        const { tokens, labels } = toTensors(b);
        return model.loss(tokens, labels).item();
      });
    }
  });
  return total / batches.length;
}

/** Samples `n` characters after `prompt` with temperature sampling. */
export function sampleText(
  model: GPT,
  task: TextTask,
  prompt: string,
  n: number,
  random: () => number,
  temperature = 0.8,
): string {
  const ids = task.encode(prompt);
  const ctx = task.seqLength;
  noGrad(() => {
    for (let i = 0; i < n; i++) {
      const window = ids.slice(-ctx);
      const probs = tidy(() => {
        const tokens = fromTypedArray(Int32Array.from(window), [1, window.length]);
        const logits = model
          .forward(tokens)
          .select(1, window.length - 1)
          .select(0, 0);
        return softmax(logits.div(temperature), -1).toTypedArray();
      });
      let r = random();
      let pick = probs.length - 1;
      for (let k = 0; k < probs.length; k++) {
        r -= Number(probs[k]);
        if (r <= 0) {
          pick = k;
          break;
        }
      }
      ids.push(pick);
    }
  });
  return task.decode(ids.slice(task.encode(prompt).length));
}
