// Pipeline-parallel layouts on four processes give the per-step losses of one process (pnpm
// test:heavy): PP=4 (also from a layout string), PP=2 × DP=2 with the distributed optimizer, PP=2 × TP=2, uneven stages, PP=2 ×
// CP=2, and MoE models (Mixtral at PP=2 × EP=2, DeepSeek-V3 with MLA and MTP at PP=2 × DP=2).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { parseRunConfig, train } from '../../src/index.js';
import { layoutRunConfig, patternCorpus, tempDir, tinyLlama } from '../helpers.js';
import { launchWorkers } from '../launch.js';

const root = tempDir('mp-train-pp-heavy-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const data = patternCorpus(path.join(root, 'corpus'));
const models: Record<string, string> = {};
const hfOf = (id: string) => {
  models[id] ??= tinyLlama(path.join(root, `hf-${id}`), id);
  return models[id];
};

it.each([
  ['llama-tied', 'PP=4', { pipelineModelParallelSize: 4 }],
  [
    'llama-tied',
    'PP=2 × DP=2 + distributed optimizer',
    { pipelineModelParallelSize: 2, useDistributedOptimizer: true },
  ],
  ['llama-tied', 'PP=2 × TP=2', { pipelineModelParallelSize: 2, tensorModelParallelSize: 2 }],
  [
    'llama-tied',
    'PP=2 × 2 virtual stages × DP=2 + distributed optimizer',
    { pipelineModelParallelSize: 2, virtualPipelineModelParallelSize: 2, useDistributedOptimizer: true },
  ],
  [
    'llama-tied',
    'PP=2 × 2 virtual stages × TP=2',
    { pipelineModelParallelSize: 2, virtualPipelineModelParallelSize: 2, tensorModelParallelSize: 2 },
  ],
  [
    'llama-tied',
    'PP=4 with a layout string (Et|t|t|tL)',
    { pipelineModelParallelSize: 4, pipelineModelParallelLayout: 'Et|t|t|tL' },
  ],
  [
    'llama-tied',
    'PP=2 × DP=2 uneven (1 + 3 layers)',
    { pipelineModelParallelSize: 2, decoderFirstPipelineNumLayers: 1 },
  ],
  ['llama-tied', 'PP=2 × CP=2', { pipelineModelParallelSize: 2, contextParallelSize: 2 }],
  ['mixtral', 'PP=2 × EP=2', { pipelineModelParallelSize: 2, expertModelParallelSize: 2 }],
  ['deepseek-v3', 'PP=2 × DP=2', { pipelineModelParallelSize: 2 }],
  ['deepseek-v3', 'PP=4', { pipelineModelParallelSize: 4 }],
  [
    'deepseek-v3',
    'PP=2 × 2 virtual stages × DP=2',
    { pipelineModelParallelSize: 2, virtualPipelineModelParallelSize: 2 },
  ],
  [
    'deepseek-v3',
    'PP=2 × EP=2 uneven (1 + 3 layers)',
    { pipelineModelParallelSize: 2, expertModelParallelSize: 2, decoderFirstPipelineNumLayers: 1 },
  ],
  [
    'deepseek-v3',
    'PP=2 × CP=2 (MTP on the last stage under CP)',
    { pipelineModelParallelSize: 2, contextParallelSize: 2 },
  ],
] as [string, string, Record<string, unknown>][])(
  '%s %s gives the losses of one process',
  async (id, name, parallel) => {
    const tag = `${id}-${name.replace(/\W+/g, '-')}`;
    const model = id === 'llama-tied' ? {} : { moeAuxLossCoeff: 0.01 };
    const cfg = (run: string, p: Record<string, unknown>) =>
      layoutRunConfig({ root, hf: hfOf(id), data, run, parallel: p, model });
    const one = (await train(parseRunConfig(cfg(`one-${tag}`, {})), { log: () => {}, report: false })).losses;
    const [r] = (await launchWorkers({
      nproc: 4,
      script: 'train-worker.ts',
      config: cfg(`run-${tag}`, parallel),
    })) as {
      losses: number[];
    }[];
    expect(r.losses.length).toBe(6);
    for (let i = 0; i < 6; i++)
      expect(Math.abs(r.losses[i] - one[i]) / one[i], `${name} step ${i + 1}`).toBeLessThan(1e-5);
    if (id !== 'llama-tied') {
      // rank 0's metrics hold the expert load of every stage's MoE layers, as one process counts it
      const load = (run: string) =>
        fs
          .readFileSync(path.join(root, run, 'metrics.jsonl'), 'utf8')
          .trim()
          .split('\n')
          .map((l) => JSON.parse(l))
          .filter((m) => m.kind === 'train')
          .map((m) => m.moe.expertLoad);
      expect(load(`run-${tag}`)).toEqual(load(`one-${tag}`));
    }
  },
);

it('a one-process checkpoint resumes under the interleaved schedule (PP=2 × 2 virtual stages)', async () => {
  const hf = hfOf('llama-tied');
  const one = (
    await train(parseRunConfig(layoutRunConfig({ root, hf, data, run: 'vp-one' })), {
      log: () => {},
      report: false,
    })
  ).losses;
  const save = path.join(root, 'ck-vp');
  const half = layoutRunConfig({ root, hf, data, run: 'vp-half' }) as Record<string, Record<string, unknown>>;
  half.training = { ...half.training, exitInterval: 3 };
  half.checkpoint = { save };
  await train(parseRunConfig(half), { log: () => {}, report: false });
  const resumed = layoutRunConfig({
    root,
    hf,
    data,
    run: 'vp-resumed',
    parallel: { pipelineModelParallelSize: 2, virtualPipelineModelParallelSize: 2 },
  }) as Record<string, Record<string, unknown>>;
  resumed.checkpoint = { load: save };
  const [r] = (await launchWorkers({ nproc: 2, script: 'train-worker.ts', config: resumed })) as {
    losses: number[];
  }[];
  expect(r.losses.length).toBe(3);
  for (let i = 0; i < 3; i++)
    expect(Math.abs(r.losses[i] - one[3 + i]) / one[3 + i], `step ${i + 4}`).toBeLessThan(1e-5);
});
