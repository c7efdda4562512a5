// Layouts of eight processes give the per-step losses and gradient norms of one process (pnpm
// test:heavy): a dense model at PP=2 × 2 virtual stages × TP=2 × DP=2 with the distributed
// optimizer, and DeepSeek-V3's tiny model (MLA, MoE with expert bias, MTP) at PP=2 × CP=2 × EP=2
// with the all-to-all dispatcher and at TP=2 × CP=2 × DP=2 with sequence parallelism.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { parseRunConfig, train } from '../../src/index.js';
import { layoutRunConfig, patternCorpus, tempDir, tinyLlama } from '../helpers.js';
import { launchWorkers } from '../launch.js';

const root = tempDir('mp-train-8p-heavy-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const data = patternCorpus(path.join(root, 'corpus'));
const models: Record<string, string> = {};
const hfOf = (id: string) => {
  models[id] ??= tinyLlama(path.join(root, `hf-${id}`), id);
  return models[id];
};

const metrics = (run: string) =>
  fs
    .readFileSync(path.join(root, run, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .filter((m) => m.kind === 'train');

it.each([
  [
    'llama-tied',
    'PP=2 × 2 virtual stages × TP=2 × DP=2 + distributed optimizer',
    {
      pipelineModelParallelSize: 2,
      virtualPipelineModelParallelSize: 2,
      tensorModelParallelSize: 2,
      useDistributedOptimizer: true,
    },
    {},
  ],
  [
    'deepseek-v3',
    'PP=2 × CP=2 × EP=2, all-to-all',
    { pipelineModelParallelSize: 2, contextParallelSize: 2, expertModelParallelSize: 2 },
    { moeAuxLossCoeff: 0.01, moeTokenDispatcherType: 'alltoall' },
  ],
  [
    'deepseek-v3',
    'TP=2 × CP=2 × DP=2 + SP',
    { tensorModelParallelSize: 2, contextParallelSize: 2, sequenceParallel: true },
    { moeAuxLossCoeff: 0.01 },
  ],
] as [string, string, Record<string, unknown>, Record<string, unknown>][])(
  '%s %s gives the losses and gradient norms of one process',
  async (id, name, parallel, model) => {
    const tag = `${id}-${name.replace(/\W+/g, '-')}`;
    const cfg = (run: string, p: Record<string, unknown>) =>
      layoutRunConfig({ root, hf: hfOf(id), data, run, parallel: p, model });
    await train(parseRunConfig(cfg(`one-${tag}`, {})), { log: () => {}, report: false });
    await launchWorkers({
      nproc: 8,
      script: 'train-worker.ts',
      config: cfg(`run-${tag}`, parallel),
      timeoutMs: 600_000,
    });
    const [one, run] = [metrics(`one-${tag}`), metrics(`run-${tag}`)];
    expect(run.length).toBe(6);
    const rel = (a: number, b: number) => Math.abs(a - b) / Math.abs(b);
    for (let i = 0; i < 6; i++) {
      expect(rel(run[i].lmLoss, one[i].lmLoss), `${name} step ${i + 1}`).toBeLessThan(1e-5);
      expect(rel(run[i].gradNorm, one[i].gradNorm), `${name} step ${i + 1} grad norm`).toBeLessThan(1e-4);
      if (id === 'deepseek-v3') {
        expect(rel(run[i].moe.mtpLoss, one[i].moe.mtpLoss), `${name} step ${i + 1} MTP loss`).toBeLessThan(
          1e-5,
        );
        expect(run[i].moe.expertLoad, `${name} step ${i + 1} expert load`).toEqual(one[i].moe.expertLoad);
      }
    }
  },
  900_000,
);
