import { readFileSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { manualSeed, memoryStats } from '@megapatch/tensor';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';
import { GPT, rng, textTask, train, validationLoss } from '../src/index.js';

const shakespeare = sharedPath('data/corpus/tinyshakespeare_input.txt');
// Any text will do to show that memory stays flat: a generated one needs no data folder.
const generatedText = Array.from(
  { length: 4000 },
  (_, i) => `${['the', 'a', 'one'][i % 3]} ${['cat', 'dog', 'bird', 'fox'][(i * 7) % 4]} ${i % 11}.`,
).join(' ');
const quiet = { log: () => {} };

describe('tiny-gpt', () => {
  it('keeps native memory flat from step to step (50 steps)', () => {
    manualSeed(0);
    const task = textTask(generatedText, 64);
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
      {
        iters: 50,
        batchSize: 8,
        lr: 1e-3,
        minLr: 1e-4,
        warmupIters: 5,
        weightDecay: 0.1,
        clipGrad: 1,
        logInterval: 50,
        seed: 0,
        ...quiet,
      },
      rng(0),
    );
    expect(steps[4].liveBytes).toBeGreaterThan(0);
    expect(steps[49].liveBytes).toBe(steps[4].liveBytes);
    expect(steps[49].loss).toBeLessThan(steps[0].loss);
    model.dispose();
  });

  it('learns to sort digits and solves held-out cases', async () => {
    // in a worker thread, so that a minute of training does not stall the test runner
    const accuracy = await new Promise<number>((resolve, reject) => {
      const w = new Worker(new URL('./sort-worker.mjs', import.meta.url));
      w.once('message', (m: { accuracy: number }) => resolve(m.accuracy));
      w.once('error', reject);
      w.once('exit', (code) => code !== 0 && reject(new Error(`the sort worker exited with ${code}`)));
    });
    expect(accuracy).toBeGreaterThan(0.9);
  });

  it.skipIf(skipWithoutShared(import.meta.url))(
    'trains on tiny Shakespeare to a validation loss well below the unigram entropy',
    () => {
      manualSeed(2);
      const task = textTask(readFileSync(shakespeare, 'utf8'), 64);
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
        {
          iters: 250,
          batchSize: 16,
          lr: 3e-3,
          minLr: 3e-4,
          warmupIters: 25,
          weightDecay: 0.1,
          clipGrad: 1,
          logInterval: 250,
          seed: 2,
          ...quiet,
        },
        rng(2),
      );
      const val = validationLoss(model, task, 16, 10);
      // unigram entropy of the text is about 3.3 nats per character
      expect(task.unigramEntropy).toBeGreaterThan(3);
      expect(val).toBeLessThan(task.unigramEntropy - 0.8);
      model.dispose();
      expect(memoryStats().liveBytes).toBeLessThanOrEqual(before);
    },
  );
});
