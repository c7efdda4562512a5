// GRPO's invariant on real processes: data parallelism (each rank generates its prompts' groups)
// and tensor parallelism (the TP ranks generate together) give the responses, rewards, losses and
// gradient norms of one process: the same tokens, the numbers to float tolerance. Sampling is not
// continuous: once the weights differ in their last bits (after an update, or in the TP ranks'
// sums) a draw that falls within that distance of a boundary between two tokens picks the other
// one, and the runs part. The first iteration (the same weights) must give the same responses;
// a later iteration is compared where its responses are the same (top-4 sampling keeps boundaries
// far apart: in this run all four iterations agree). One process runs as a worker too, with the
// workers' one compute thread.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import type { RunConfigInput } from '../src/index.js';
import { charTokenizer, mergedRunConfig, tempDir, tinyLlama } from './helpers.js';
import { launchWorkers } from './launch.js';

const root = tempDir('mp-rl-par-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const hf = charTokenizer(tinyLlama(path.join(root, 'hf')));
const promptsFile = path.join(root, 'prompts.jsonl');
fs.writeFileSync(
  promptsFile,
  `${['the cat', 'a dog ran', 'once', 'we saw', 'it is', 'big red', 'so far', 'no way']
    .map((p) => JSON.stringify({ prompt: p }))
    .join('\n')}\n`,
);
const rewardFile = path.join(root, 'letters.mjs');
fs.writeFileSync(
  rewardFile,
  'export default (response) => (response.replace(/<x\\d+>/g, "").match(/[a-z]/g) ?? []).length / 12;\n',
);

function config(run: string, parallel: Record<string, unknown> = {}) {
  const base: RunConfigInput = {
    model: { load: hf, dtype: 'fp32' },
    data: { seqLength: 32 },
    // two mini-batches of two prompts' groups an iteration, two epochs: each rank one group per
    // mini-batch at DP=2, in micro-batches of 2
    training: { microBatchSize: 2, globalBatchSize: 8, trainIters: 4, logInterval: 1, seed: 11 },
    optimizer: { lr: 2e-3, minLr: 2e-3, weightDecay: 0, clipGrad: 1 },
    scheduler: { lrDecayStyle: 'constant' },
    parallel,
    logging: { runDir: path.join(root, run) },
    rl: {
      promptsPath: promptsFile,
      promptsPerStep: 4,
      groupSize: 4,
      maxNewTokens: 12,
      temperature: 0.8,
      topK: 4,
      ppoEpochs: 2,
      klLossCoef: 0.05,
      reward: rewardFile,
      saveRollouts: true,
    },
  };
  return mergedRunConfig(base, {}) as object;
}

interface Line {
  lmLoss: number;
  gradNorm: number;
  rl: Record<string, number>;
}
const metrics = (run: string): Line[] =>
  fs
    .readFileSync(path.join(root, run, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Line);
/** Every response of a run, by (iteration, prompt index, place in its group). */
function responses(run: string): Map<string, { tokens: number[]; reward: number }> {
  const out = new Map<string, { tokens: number[]; reward: number }>();
  const dir = path.join(root, run, 'rollouts');
  for (const f of fs.readdirSync(dir).sort()) {
    const seen = new Map<string, number>();
    for (const l of fs.readFileSync(path.join(dir, f), 'utf8').trim().split('\n')) {
      const x = JSON.parse(l) as { iteration: number; promptIndex: number; tokens: number[]; reward: number };
      const g = `${x.iteration}/${x.promptIndex}`;
      const j = seen.get(g) ?? 0;
      seen.set(g, j + 1);
      out.set(`${g}/${j}`, { tokens: x.tokens, reward: x.reward });
    }
  }
  return out;
}

describe('GRPO on several processes', () => {
  let one: Line[];
  it('one process', async () => {
    await launchWorkers({ nproc: 1, script: 'train-worker.ts', config: config('one'), timeoutMs: 180_000 });
    one = metrics('one');
    expect(one).toHaveLength(4);
    expect(one[3].rl.klLoss).toBeGreaterThan(0);
  }, 200_000);

  it.each([
    ['DP=2', {}],
    ['TP=2', { tensorModelParallelSize: 2 }],
  ])(
    '%s gives the responses and numbers of one process',
    async (name, parallel) => {
      const run = `two-${name.replace(/\W+/g, '')}`;
      await launchWorkers({
        nproc: 2,
        script: 'train-worker.ts',
        config: config(run, parallel),
        timeoutMs: 180_000,
      });
      // the same responses, token for token (DP=2: half in each replica's file)
      const want = responses('one');
      const got = responses(run);
      expect(got.size).toBe(want.size);
      const same = (it: number) =>
        [...want.entries()]
          .filter(([k]) => k.startsWith(`${it}/`))
          .every(([k, v]) => JSON.stringify(got.get(k)) === JSON.stringify(v));
      expect(same(1), `${name}: the first iteration's responses`).toBe(true);
      const agreeing = [1, 2, 3, 4].filter(same);
      // this seed's run keeps every iteration's responses on both layouts
      expect(agreeing).toEqual([1, 2, 3, 4]);
      const two = metrics(run);
      expect(two).toHaveLength(4);
      for (const it of agreeing) {
        const i = it - 1;
        const at = `${name} iteration ${it}`;
        expect(two[i].rl.rewardMean, at).toBe(one[i].rl.rewardMean);
        // the losses are means of ±advantages that cancel: compared against their terms' size
        for (const key of ['pgLoss', 'klLoss', 'approxKl'] as const) {
          const a = two[i].rl[key];
          const b = one[i].rl[key];
          expect(Math.abs(a - b), `${at} ${key}`).toBeLessThanOrEqual(2e-5 * Math.abs(b) + 5e-6);
        }
        expect(Math.abs(two[i].gradNorm - one[i].gradNorm) / one[i].gradNorm, `${at} grad norm`).toBeLessThan(
          1e-4,
        );
      }
    },
    200_000,
  );
});
