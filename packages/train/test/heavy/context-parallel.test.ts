// Context-parallel layouts on four processes: CP=4, CP=2 × DP=2 (with the distributed optimizer)
// and CP=2 × TP=2 give the per-step losses of one process (pnpm test:heavy).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { parseRunConfig, train } from '../../src/index.js';
import { layoutRunConfig, patternCorpus, tempDir, tinyLlama } from '../helpers.js';
import { launchWorkers } from '../launch.js';

const root = tempDir('mp-train-cp-heavy-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const hf = tinyLlama(path.join(root, 'hf'));
const data = patternCorpus(path.join(root, 'corpus'));

function config(run: string, parallel: Record<string, unknown> = {}) {
  return layoutRunConfig({ root, hf, data, run, parallel });
}

let one: number[];
it('one process', async () => {
  one = (await train(parseRunConfig(config('one')), { log: () => {}, report: false })).losses;
});

it.each([
  ['CP=4', { contextParallelSize: 4 }],
  ['CP=2 × DP=2 + distributed optimizer', { contextParallelSize: 2, useDistributedOptimizer: true }],
  ['CP=2 × TP=2 + SP', { contextParallelSize: 2, tensorModelParallelSize: 2, sequenceParallel: true }],
])('%s gives the losses of one process', async (name, parallel) => {
  const [r] = (await launchWorkers({
    nproc: 4,
    script: 'train-worker.ts',
    config: config(`run-${name.replace(/\W+/g, '-')}`, parallel),
  })) as { losses: number[] }[];
  expect(r.losses.length).toBe(6);
  for (let i = 0; i < 6; i++)
    expect(Math.abs(r.losses[i] - one[i]) / one[i], `${name} step ${i + 1}`).toBeLessThan(1e-5);
});
