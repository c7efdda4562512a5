// GRPO on the real stories260K model through the commands a user runs: `megapatch train` on the
// shipped example (examples/grpo/stories-grpo.yaml: story openings, a reward module that wants the
// hero named again), then `megapatch generate` on the exported folder: the reward rises from under
// 0.2 to above 0.8, on the training prompts and on held-out ones, and the greedy continuation
// names the hero.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { skipWithoutShared } from '@megapatch/test-support';
import { afterAll, describe, expect, it } from 'vitest';
import { BIN, tempDir } from './helpers.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const root = tempDir('mp-cli-grpo');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

/** `megapatch ...args` from the repository root, where the example's paths start. */
function fromRoot(args: readonly string[]) {
  const r = spawnSync(process.execPath, [BIN, ...args], {
    cwd: ROOT,
    encoding: 'utf8',
    env: { ...process.env, MEGAPATCH_DEBUG: '', NO_COLOR: '' },
    maxBuffer: 1 << 26,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe.skipIf(skipWithoutShared(import.meta.url))('GRPO of the real stories260K model', () => {
  it('runs the shipped example: the reward rises and the exported model names the hero', () => {
    const run = path.join(root, 'run');
    const hf = path.join(root, 'hf');
    const r = fromRoot([
      'train',
      '--config',
      'examples/grpo/stories-grpo.yaml',
      '--logging.runDir',
      run,
      '--save',
      path.join(root, 'ckpt'),
      '--export-hf',
      hf,
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(
      /^GRPO: 36 prompts, 8 per iteration × 8 responses; 2 mini-batch\(es\) of 32 responses/m,
    );
    expect(r.stdout).toMatch(/iteration +20\/ +20 \| consumed prompts: +160 \|.* reward mean: /);
    const lines = fs
      .readFileSync(path.join(run, 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { kind: string; iteration: number; rl: { rewardMean: number } });
    const rewards = lines.filter((l) => l.kind === 'train').map((l) => l.rl.rewardMean);
    // the held-out openings' greedy continuations: none names the hero before, most do after
    const valid = lines.filter((l) => l.kind === 'valid');
    expect(valid.map((l) => l.iteration)).toEqual([0, 10, 20]);
    expect(valid[0].rl.rewardMean).toBeLessThan(0.2);
    expect(valid[2].rl.rewardMean).toBeGreaterThan(0.8);
    expect(rewards).toHaveLength(20);
    expect(rewards[0]).toBeLessThan(0.2);
    expect(rewards.slice(-5).reduce((a, b) => a + b) / 5).toBeGreaterThan(0.8);
    expect(fs.readdirSync(path.join(run, 'rollouts'))).toEqual(['dp0.jsonl']);
    const gen = fromRoot([
      'generate',
      '--model',
      hf,
      '--prompt',
      'Tom saw a big dog.',
      '--max-new-tokens',
      '16',
      '--json',
    ]);
    expect(gen.status, gen.stderr).toBe(0);
    expect(JSON.parse(gen.stdout.trim().split('\n')[0]).completion).toMatch(/Tom/);
  }, 300_000);
});

describe('the GRPO examples', () => {
  it('validate: the tiny run and Qwen3-8B on GSM8K (TP2 × DP4, 32 responses a prompt)', async () => {
    const { loadRunConfig } = await import('@megapatch/train');
    const tiny = loadRunConfig(path.join(ROOT, 'examples/grpo/stories-grpo.yaml'));
    expect(tiny.rl?.reward).toBe('examples/grpo/name-reward.mjs');
    expect(fs.existsSync(path.join(ROOT, tiny.rl?.promptsPath as string))).toBe(true);
    const real = loadRunConfig(path.join(ROOT, 'examples/grpo/qwen3-8b-gsm8k.yaml'));
    expect(real.rl).toMatchObject({ reward: 'math', chat: true, groupSize: 32, klLossType: 'low_var_kl' });
    expect(real.parallel.tensorModelParallelSize).toBe(2);
    // 32 prompts × 32 responses in mini-batches of 256: 4 updates an iteration
    expect(((real.rl?.promptsPerStep ?? 0) * (real.rl?.groupSize ?? 0)) / real.training.globalBatchSize).toBe(
      4,
    );
  });
});
