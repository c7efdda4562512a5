// The digit-sorting run of test/tiny-gpt.test.ts, in a worker thread: a training loop of over a
// minute would otherwise block the test runner's event loop (and its heartbeat) for that long.
// Reads the built package (dist/), which the test task builds first.
import { parentPort } from 'node:worker_threads';
import { manualSeed } from '@megapatch/tensor';
import { evaluatePuzzle, GPT, rng, sortTask, train } from '../dist/index.js';

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
  {
    iters: 600,
    batchSize: 64,
    lr: 5e-3,
    minLr: 5e-4,
    warmupIters: 50,
    weightDecay: 0.1,
    clipGrad: 1,
    logInterval: 100,
    seed: 1,
    log: () => {},
  },
  rng(1),
);
const { accuracy } = evaluatePuzzle(model, task);
model.dispose();
parentPort?.postMessage({ accuracy });
