// The training runs of test/tiny-gpt.test.ts, each in a worker thread: a training loop of a minute
// would otherwise block the test runner's event loop (and its RPC heartbeat) for that long. Reads
// the built package (dist/), which the test task builds first. workerData: {case, text?}.
import { parentPort, workerData } from 'node:worker_threads';
import { manualSeed, memoryStats } from '@megapatch/tensor';
import { evaluatePuzzle, GPT, rng, sortTask, textTask, train, validationLoss } from '../dist/index.js';

const quiet = { log: () => {} };
const opts = (o) => ({ weightDecay: 0.1, clipGrad: 1, ...quiet, ...o });
const { case: which, text } = workerData;
let result;
if (which === 'memory') {
  manualSeed(0);
  const task = textTask(text, 64);
  const model = new GPT({
    vocabSize: task.vocabSize,
    numLayers: 2,
    hiddenSize: 64,
    numAttentionHeads: 4,
    maxSeqLength: 64,
  });
  const steps = train(
    model,
    task,
    opts({ iters: 50, batchSize: 8, lr: 1e-3, minLr: 1e-4, warmupIters: 5, logInterval: 50, seed: 0 }),
    rng(0),
  );
  result = { liveBytes: steps.map((s) => s.liveBytes), losses: steps.map((s) => s.loss) };
  model.dispose();
} else if (which === 'sort') {
  manualSeed(1);
  const task = sortTask(6, 3);
  const model = new GPT({
    vocabSize: task.vocabSize,
    numLayers: 2,
    hiddenSize: 48,
    numAttentionHeads: 4,
    maxSeqLength: task.seqLength,
  });
  train(
    model,
    task,
    opts({ iters: 600, batchSize: 64, lr: 5e-3, minLr: 5e-4, warmupIters: 50, logInterval: 100, seed: 1 }),
    rng(1),
  );
  result = { accuracy: evaluatePuzzle(model, task).accuracy };
  model.dispose();
} else {
  manualSeed(2);
  const task = textTask(text, 64);
  const model = new GPT({
    vocabSize: task.vocabSize,
    numLayers: 2,
    hiddenSize: 96,
    numAttentionHeads: 4,
    maxSeqLength: 64,
  });
  const before = memoryStats().liveBytes;
  train(
    model,
    task,
    opts({ iters: 250, batchSize: 16, lr: 3e-3, minLr: 3e-4, warmupIters: 25, logInterval: 250, seed: 2 }),
    rng(2),
  );
  const val = validationLoss(model, task, 16, 10);
  model.dispose();
  result = { val, unigramEntropy: task.unigramEntropy, before, after: memoryStats().liveBytes };
}
parentPort?.postMessage(result);
