// A long run's memory is flat from step to step: the native bytes the tensor library holds are the
// same after every iteration (through evaluations and checkpoint saves), and the process's resident
// set stops growing once the run has warmed up.
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { memoryStats } from '@megapatch/tensor';
import { afterAll, describe, expect, it } from 'vitest';
import { parseRunConfig, train } from '../src/index.js';
import { layoutRunConfig, patternCorpus, tempDir, tinyLlama } from './helpers.js';
import { launchWorkers } from './launch.js';

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

/** Collections until the finalizers have run: what the collector released is counted by then. */
async function settle(): Promise<void> {
  for (let i = 0; i < 4; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * Tensors of `device` the garbage collector released while `run` ran (dropped without dispose():
 * memory freed late, whenever the collector ran; MEGAPATCH_TRACE_COLLECTED=1 names where).
 */
async function collectedDuring(device: string, run: () => Promise<unknown>): Promise<number> {
  await settle();
  const before = memoryStats(device).collectedTensors;
  await run();
  await settle();
  return memoryStats(device).collectedTensors - before;
}

const root = tempDir('mp-train-memory-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

describe('a long run', () => {
  it('keeps native memory flat over 300 iterations with evaluations and saves', async () => {
    const hf = tinyLlama(path.join(root, 'hf'));
    const data = patternCorpus(path.join(root, 'corpus'));
    const runDir = path.join(root, 'run');
    const rss = new Map<number, number>();
    await settle();
    const collectedBefore = memoryStats('cpu').collectedTensors;
    const r = await train(
      parseRunConfig({
        model: { load: hf, dtype: 'fp32' },
        data: { dataPath: [data], seqLength: 32, split: '90,10,0', eodTokenId: 2 },
        training: {
          microBatchSize: 2,
          globalBatchSize: 4,
          trainIters: 300,
          logInterval: 1,
          evalInterval: 50,
          evalIters: 2,
        },
        optimizer: { lr: 1e-3 },
        checkpoint: { save: path.join(root, 'ckpt'), saveInterval: 100, ckptKeep: 1 },
        logging: { runDir },
      }),
      {
        log: (line) => {
          const m = /iteration\s+(\d+)\//.exec(line);
          if (m && Number(m[1]) % 10 === 0) {
            // a full collection first: garbage the collector has not reached yet is not growth
            gc();
            rss.set(Number(m[1]), process.memoryUsage().rss);
          }
        },
        report: false,
      },
    );
    expect(r.iteration).toBe(300);
    // nothing left to the collector: every tensor of the run disposed by its owner
    await settle();
    expect(memoryStats('cpu').collectedTensors - collectedBefore, 'tensors the collector released').toBe(0);
    const steps = fs
      .readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l))
      .filter((m) => m.kind === 'train');
    expect(steps).toHaveLength(300);
    const live = steps.map((m) => m.memory.liveBytes as number);
    for (let i = 2; i < live.length; i++) expect(live[i], `live bytes after step ${i + 1}`).toBe(live[1]);
    // the resident set after a full collection (measured: 136–139 MiB from step 10 to 300)
    const growth = (rss.get(300) as number) - (rss.get(100) as number);
    expect(growth, `RSS grew by ${(growth / 2 ** 20).toFixed(1)} MiB from step 100 to 300`).toBeLessThan(
      8 * 2 ** 20,
    );
    expect(fs.readdirSync(path.join(root, 'ckpt')).filter((f) => f.startsWith('iter_'))).toEqual([
      'iter_0000300',
    ]);
  }, 300_000);
});

describe('train() returns', () => {
  // the weights, gradient buffers and optimizer state are freed when the run ends, not left to the
  // garbage collector (which does not see a GPU's memory): also when setting up fails after the
  // model was built (here: a data prefix that does not exist)
  it('with every tensor it allocated freed, after a run, a resumed run and a failed setup', async () => {
    const hf = tinyLlama(path.join(root, 'hf-returns'), 'deepseek-v3');
    const data = patternCorpus(path.join(root, 'returns-corpus'));
    const save = path.join(root, 'ck-returns');
    const config = (run: string, prefix: string, trainIters: number, load: string | null = null) => {
      const c = layoutRunConfig({ root, hf, data: prefix, run }) as Record<string, Record<string, unknown>>;
      c.training = { ...c.training, trainIters, evalInterval: null };
      c.checkpoint = { save, load };
      return parseRunConfig(c);
    };
    const quiet = { log: () => {}, report: false };
    const before = memoryStats('cpu').liveBytes;
    const collected = await collectedDuring('cpu', async () => {
      const r = await train(config('returns', data, 2), quiet);
      expect(r.iteration).toBe(2);
      expect(memoryStats('cpu').liveBytes, 'after a run').toBe(before);
      // resumed: the optimizer's moments and masters read from the checkpoint, copied and freed
      const resumed = await train(config('returns-resumed', data, 3, save), quiet);
      expect(resumed.iteration).toBe(3);
      expect(memoryStats('cpu').liveBytes, 'after a resumed run').toBe(before);
      await expect(train(config('returns-bad', path.join(root, 'no-such-corpus'), 2), quiet)).rejects.toThrow(
        /no-such-corpus/,
      );
      expect(memoryStats('cpu').liveBytes, 'after a failed setup').toBe(before);
    });
    // nor anything left to the collector (the moments read to resume were, 260 tensors here)
    expect(collected, 'tensors the collector released').toBe(0);
  }, 120_000);
});

// A MoE model's step holds more state between steps (the routers' loads, the balancing losses on
// the activations, the step's sums and loads read together): on the emulated CUDA device, whose
// caching allocator a GPU run uses, and on the CPU, the live bytes after every step are the same.
// (Before: each MoE layer's output outlived its step once a balancing loss rode on it, 256 KiB a
// step here; the views that copied the expert loads waited for the garbage collector.)
describe('MoE runs', () => {
  const data = patternCorpus(path.join(root, 'moe-corpus'));
  it.each([
    ['deepseek-v3', 'cudaemu:0', { moeAuxLossCoeff: 0.01, moeZLossCoeff: 0.001 }],
    ['deepseek-v3', 'cpu', { moeAuxLossCoeff: 0.01, moeZLossCoeff: 0.001 }],
    [
      'mixtral',
      'cudaemu:0',
      { moeExpertCapacityFactor: 1, moePadExpertInputToCapacity: true, moeAuxLossCoeff: 0.01 },
    ],
  ] as const)(
    '%s on %s: the live bytes are the same after every step, through evaluations',
    async (id, device, moe) => {
      const hf = tinyLlama(path.join(root, `hf-${id}`), id);
      const run = `moe-${id}-${device.replace(':', '')}`;
      const c = layoutRunConfig({ root, hf, data, run }) as Record<string, Record<string, unknown>>;
      c.model = { ...c.model, ...moe };
      c.training = { ...c.training, device, trainIters: 10, logInterval: 1, evalInterval: 4, evalIters: 1 };
      const collected = await collectedDuring(device, () =>
        train(parseRunConfig(c), { log: () => {}, report: false }),
      );
      expectFlat(path.join(root, run), 10);
      expect(collected, 'tensors the collector released').toBe(0);
    },
    300_000,
  );

  // the dispatchers' exchanges and the sequence-parallel balancing statistics, one emulated device
  // a process (rank 0's live bytes, as its metrics log them)
  it.each([
    [
      'mixtral',
      { expertModelParallelSize: 2 },
      {
        moeTokenDispatcherType: 'alltoall',
        moeExpertCapacityFactor: 1,
        moePadExpertInputToCapacity: true,
        moeAuxLossCoeff: 0.01,
      },
    ],
    [
      'deepseek-v3',
      { tensorModelParallelSize: 2, sequenceParallel: true },
      { moeAuxLossCoeff: 0.01, moeZLossCoeff: 0.001, moeRouterLoadBalancingType: 'seq_aux_loss' },
    ],
  ] as const)(
    '%s at %j on the emulated devices: the same after every step',
    async (id, parallel, moe) => {
      const hf = tinyLlama(path.join(root, `hf-${id}`), id);
      const run = `moe-${id}-${Object.keys(parallel).join('-')}`;
      const c = layoutRunConfig({ root, hf, data, run, parallel }) as Record<string, Record<string, unknown>>;
      c.model = { ...c.model, ...moe };
      c.training = {
        ...c.training,
        device: 'cudaemu',
        trainIters: 8,
        logInterval: 1,
        evalInterval: 4,
        evalIters: 1,
      };
      const [r] = (await launchWorkers({
        nproc: 2,
        script: 'train-worker.ts',
        config: c,
        timeoutMs: 300_000,
        env: { MEGAPATCH_TEST_COLLECTED: '1' },
      })) as { collected: number }[];
      expectFlat(path.join(root, run), 8);
      expect(r.collected, "tensors the collector released (rank 0's device)").toBe(0);
    },
    300_000,
  );
});

/**
 * The run's live bytes after each of its `steps` steps, all equal to the first step's; and the
 * caching allocator's reserve, the same from the second step on (the first fills it).
 */
function expectFlat(runDir: string, steps: number): void {
  const memory = fs
    .readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .filter((m) => m.kind === 'train')
    .map((m) => m.memory as { liveBytes: number; cachedBytes: number });
  expect(memory).toHaveLength(steps);
  for (let i = 1; i < memory.length; i++) {
    expect(memory[i].liveBytes, `live bytes after step ${i + 1}`).toBe(memory[0].liveBytes);
    if (i > 1) expect(memory[i].cachedBytes, `cached bytes after step ${i + 1}`).toBe(memory[1].cachedBytes);
  }
}
