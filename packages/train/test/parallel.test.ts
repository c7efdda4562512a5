// The trainer's invariant: data parallelism (DP=2) and tensor parallelism (TP=2) on real processes
// give the per-step losses of one process, in fp32 (the same global batches in Megatron's order).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseRunConfig, train } from '../src/index.js';
import { patternCorpus, tempDir, tinyLlama } from './helpers.js';
import { launchWorkers } from './launch.js';

const root = tempDir('mp-train-par-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const hf = tinyLlama(path.join(root, 'hf'));
const data = patternCorpus(path.join(root, 'corpus'));

function config(run: string, parallel: Record<string, unknown> = {}) {
  return {
    model: { load: hf, dtype: 'fp32' },
    data: {
      dataPath: [data],
      seqLength: 32,
      split: '90,10,0',
      eodTokenId: 2,
      dataCachePath: path.join(root, 'cache'),
    },
    training: {
      microBatchSize: 2,
      globalBatchSize: 8,
      trainIters: 6,
      logInterval: 100,
      evalInterval: null,
      seed: 3,
    },
    optimizer: { lr: 3e-3, minLr: 3e-4, clipGrad: 1 },
    scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 1 },
    parallel,
    logging: { runDir: path.join(root, run) },
  };
}

describe('train on several processes', () => {
  let reference: number[];
  it('one process', async () => {
    reference = (await train(parseRunConfig(config('one')), { log: () => {}, report: false })).losses;
    expect(reference.length).toBe(6);
  });

  it.each([
    ['DP=2', {}],
    ['TP=2', { tensorModelParallelSize: 2 }],
    ['TP=2 + sequence parallelism', { tensorModelParallelSize: 2, sequenceParallel: true }],
  ])('%s gives the losses of one process', async (name, parallel) => {
    const [r] = (await launchWorkers({
      nproc: 2,
      script: 'train-worker.ts',
      config: config(`run-${name.replace(/\W+/g, '-')}`, parallel),
    })) as { losses: number[] }[];
    expect(r.losses.length).toBe(6);
    for (let i = 0; i < 6; i++) {
      expect(Math.abs(r.losses[i] - reference[i]) / reference[i], `${name} step ${i + 1}`).toBeLessThan(1e-5);
    }
  });
});
