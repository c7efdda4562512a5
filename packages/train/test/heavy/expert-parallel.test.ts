// The expert-parallel layouts that need four processes: TP=2 × EP=2 and EP=4 (with and without the
// distributed optimizer) give the per-step losses of one process (pnpm test:heavy).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { parseRunConfig, train } from '../../src/index.js';
import { layoutRunConfig, patternCorpus, tempDir, tinyLlama } from '../helpers.js';
import { launchWorkers } from '../launch.js';

const root = tempDir('mp-train-ep-heavy-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const hf = tinyLlama(path.join(root, 'hf-mixtral'), 'mixtral');
const data = patternCorpus(path.join(root, 'corpus'));

function config(run: string, parallel: Record<string, unknown> = {}) {
  return layoutRunConfig({
    root,
    hf,
    data,
    run,
    parallel,
    model: { moeAuxLossCoeff: 0.01, moeZLossCoeff: 0.001 },
  });
}

it.each([
  ['TP=2 × EP=2', { tensorModelParallelSize: 2, expertModelParallelSize: 2 }],
  ['TP=2 × EP=2 + SP', { tensorModelParallelSize: 2, expertModelParallelSize: 2, sequenceParallel: true }],
  [
    'CP=2 × TP=2 + SP (aux statistics over tp × cp)',
    { contextParallelSize: 2, tensorModelParallelSize: 2, sequenceParallel: true },
  ],
  ['CP=2 × EP=2', { contextParallelSize: 2, expertModelParallelSize: 2 }],
  [
    'TP=2 × EP=2 + distributed optimizer',
    {
      tensorModelParallelSize: 2,
      expertModelParallelSize: 2,
      useDistributedOptimizer: true,
    },
  ],
  ['EP=4', { expertModelParallelSize: 4 }],
  ['EP=4, all-to-all dispatcher', { expertModelParallelSize: 4 }, { moeTokenDispatcherType: 'alltoall' }],
  [
    'TP=2 × EP=2 × ETP=1, all-to-all',
    { tensorModelParallelSize: 2, expertModelParallelSize: 2, expertTensorParallelSize: 1 },
    { moeTokenDispatcherType: 'alltoall' },
  ],
  ['EP=4 + distributed optimizer', { expertModelParallelSize: 4, useDistributedOptimizer: true }],
  ['EP=2 × DP=4', { expertModelParallelSize: 2, useDistributedOptimizer: true }],
] as [string, Record<string, unknown>, Record<string, unknown>?][])(
  '%s gives the losses of one process',
  async (name, parallel, model = {}) => {
    const one = (
      await train(parseRunConfig(config(`one-${name.replace(/\W+/g, '-')}`)), {
        log: () => {},
        report: false,
      })
    ).losses;
    const [r] = (await launchWorkers({
      nproc: 4,
      script: 'train-worker.ts',
      config: {
        ...config(`run-${name.replace(/\W+/g, '-')}`, parallel),
        model: { ...config('x').model, ...model },
      },
    })) as { losses: number[] }[];
    expect(r.losses.length).toBe(6);
    for (let i = 0; i < 6; i++)
      expect(Math.abs(r.losses[i] - one[i]) / one[i], `${name} step ${i + 1}`).toBeLessThan(1e-5);
  },
);

// DeepSeek-V3's tiny model: MLA, a multi-token-prediction layer, 8 routed experts with group-limited
// sigmoid routing and the aux-loss-free expert bias, and a shared expert
const dsv3 = tinyLlama(path.join(root, 'hf-deepseek-v3'), 'deepseek-v3');
it.each([
  ['EP=4', { expertModelParallelSize: 4 }, 'allgather'],
  ['EP=4, all-to-all', { expertModelParallelSize: 4 }, 'alltoall'],
  [
    'TP=2 × EP=2 + SP, all-to-all',
    { tensorModelParallelSize: 2, expertModelParallelSize: 2, sequenceParallel: true },
    'alltoall',
  ],
  [
    'CP=2 × EP=2, all-to-all (MTP shifted across the CP ranks)',
    { contextParallelSize: 2, expertModelParallelSize: 2 },
    'alltoall',
  ],
  [
    'CP=2 × TP=2 + SP',
    { contextParallelSize: 2, tensorModelParallelSize: 2, sequenceParallel: true },
    'allgather',
  ],
  [
    'TP=2 × EP=2 × ETP=1, all-to-all',
    { tensorModelParallelSize: 2, expertModelParallelSize: 2, expertTensorParallelSize: 1 },
    'alltoall',
  ],
  [
    'TP=2 × EP=2, all-to-all + distributed optimizer',
    { tensorModelParallelSize: 2, expertModelParallelSize: 2, useDistributedOptimizer: true },
    'alltoall',
  ],
] as [string, Record<string, unknown>, string][])(
  'DeepSeek-V3 (MLA, MTP, expert bias) %s gives the losses of one process',
  async (name, parallel, dispatcher) => {
    const cfg = (run: string, p: Record<string, unknown>) =>
      layoutRunConfig({
        root,
        hf: dsv3,
        data,
        run,
        parallel: p,
        model: { moeTokenDispatcherType: dispatcher },
      });
    const tag = name.replace(/\W+/g, '-');
    const one = (await train(parseRunConfig(cfg(`dsv3-one-${tag}`, {})), { log: () => {}, report: false }))
      .losses;
    const [r] = (await launchWorkers({
      nproc: 4,
      script: 'train-worker.ts',
      config: cfg(`dsv3-${tag}`, parallel),
    })) as {
      losses: number[];
    }[];
    expect(r.losses.length).toBe(6);
    for (let i = 0; i < 6; i++)
      expect(Math.abs(r.losses[i] - one[i]) / one[i], `${name} step ${i + 1}`).toBeLessThan(1e-5);
  },
);
