// DPO's invariant on real processes: data parallelism (each rank its micro-batches of pairs, in
// Megatron's order) and tensor parallelism, with and without sequence parallelism, give the
// losses, accuracies, rewards and gradient norms of one process.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseRunConfig, type RunConfigInput, train } from '../src/index.js';
import { charTokenizer, mergedRunConfig, SIMPLE_CHAT_TEMPLATE, tempDir, tinyLlama } from './helpers.js';
import { launchWorkers } from './launch.js';

const root = tempDir('mp-dpo-par-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const hf = charTokenizer(tinyLlama(path.join(root, 'hf')), 777, SIMPLE_CHAT_TEMPLATE);
const pairsFile = path.join(root, 'pairs.jsonl');
const words = [
  'is it',
  'can we',
  'do you',
  'will it',
  'was he',
  'are we',
  'did it',
  'has she',
  'may i',
  'so what',
];
fs.writeFileSync(
  pairsFile,
  `${words.map((q, i) => JSON.stringify({ prompt: `${q}?`, chosen: 'yes '.repeat(1 + (i % 3)).trim(), rejected: 'no'.repeat(1 + (i % 2)) })).join('\n')}\n`,
);

function config(run: string, parallel: Record<string, unknown> = {}) {
  const base: RunConfigInput = {
    model: { load: hf, dtype: 'fp32' },
    data: { seqLength: 32 },
    // 8 pairs a step, 2 per micro-batch: 4 micro-batches on one rank, 2 per rank at DP=2
    training: { microBatchSize: 2, globalBatchSize: 8, trainIters: 4, logInterval: 1, seed: 21 },
    optimizer: { lr: 5e-3, minLr: 5e-3, weightDecay: 0, clipGrad: 1 },
    scheduler: { lrDecayStyle: 'constant' },
    parallel,
    logging: { runDir: path.join(root, run) },
    dpo: { pairsPath: pairsFile, beta: 0.2, ftx: 0.1 },
  };
  return mergedRunConfig(base, {}) as object;
}
const metrics = (run: string) =>
  fs
    .readFileSync(path.join(root, run, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { gradNorm: number; dpo: Record<string, number> });

describe('DPO on several processes', () => {
  let one: ReturnType<typeof metrics>;
  it('one process', async () => {
    await train(parseRunConfig(config('one')), { log: () => {}, report: false });
    one = metrics('one');
    expect(one).toHaveLength(4);
    expect(one[3].dpo.loss).toBeLessThan(one[0].dpo.loss);
  });

  it.each([
    ['DP=2', {}],
    ['TP=2', { tensorModelParallelSize: 2 }],
    ['TP=2 + SP', { tensorModelParallelSize: 2, sequenceParallel: true }],
  ])(
    '%s gives the numbers of one process',
    async (name, parallel) => {
      const run = `two-${name.replace(/\W+/g, '')}`;
      await launchWorkers({
        nproc: 2,
        script: 'train-worker.ts',
        config: config(run, parallel),
        timeoutMs: 180_000,
      });
      const two = metrics(run);
      expect(two).toHaveLength(4);
      for (let i = 0; i < 4; i++) {
        const at = `${name} iteration ${i + 1}`;
        for (const key of ['loss', 'sftLoss', 'chosenLogp', 'rejectedLogp', 'margin'] as const) {
          const a = two[i].dpo[key];
          const b = one[i].dpo[key];
          expect(Math.abs(a - b), `${at} ${key}`).toBeLessThanOrEqual(1e-5 * Math.abs(b) + 1e-6);
        }
        expect(two[i].dpo.accuracy, at).toBe(one[i].dpo.accuracy);
        expect(Math.abs(two[i].gradNorm - one[i].gradNorm) / one[i].gradNorm, `${at} grad norm`).toBeLessThan(
          1e-4,
        );
      }
    },
    200_000,
  );
});
