import { readFileSync } from 'node:fs';
import { manualSeed, memoryStats } from '@megapatch/tensor';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';
import { evaluatePuzzle, GPT, rng, sortTask, textTask, trainAsync, validationLoss } from '../src/index.js';

const shakespeare = sharedPath('data/corpus/tinyshakespeare_input.txt');
// Any text will do to show that memory stays flat: a generated one needs no data folder.
const generatedText = Array.from(
  { length: 4000 },
  (_, i) => `${['the', 'a', 'one'][i % 3]} ${['cat', 'dog', 'bird', 'fox'][(i * 7) % 4]} ${i % 11}.`,
).join(' ');
const quiet = { log: () => {} };

describe('tiny-gpt', () => {
  it('keeps native memory flat from step to step (50 steps)', async () => {
    manualSeed(0);
    const task = textTask(generatedText, 64);
    const model = new GPT({
      vocabSize: task.vocabSize,
      numLayers: 2,
      hiddenSize: 64,
      numAttentionHeads: 4,
      maxSeqLength: 64,
    });
    const steps = await trainAsync(
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
    manualSeed(1);
    const task = sortTask(6, 3);
    const model = new GPT({
      vocabSize: task.vocabSize,
      numLayers: 2,
      hiddenSize: 48,
      numAttentionHeads: 4,
      maxSeqLength: task.seqLength,
    });
    await trainAsync(
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
        ...quiet,
      },
      rng(1),
    );
    const { accuracy } = evaluatePuzzle(model, task);
    expect(accuracy).toBeGreaterThan(0.9);
    model.dispose();
  });

  it.skipIf(skipWithoutShared(import.meta.url))(
    'trains on tiny Shakespeare to a validation loss well below the unigram entropy',
    async () => {
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
      await trainAsync(
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
