// training.device: the whole run (model, optimizer, data, checkpoints) on another backend. The
// reference backend of @megapatch/tensor (ref:0) stands in for a GPU here: the losses equal the
// CPU run's, and its checkpoint resumes on the CPU.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parameterCount, parseHfConfig } from '@megapatch/convert';
import { getDefaultDevice, getGradientAccumulationFusion, memoryStats } from '@megapatch/tensor';
import { afterAll, expect, it } from 'vitest';
import { parseRunConfig, train } from '../src/index.js';
import { layoutRunConfig, patternCorpus, tempDir, tinyLlama, usePackedSft, writeSft } from './helpers.js';
import { launchWorkers } from './launch.js';

const root = tempDir('mp-train-device-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const hf = tinyLlama(path.join(root, 'hf'));
const data = patternCorpus(path.join(root, 'corpus'));
const quiet = { log: () => {}, report: false };

function config(run: string, device?: string, extra: Record<string, object> = {}) {
  const c = layoutRunConfig({ root, hf, data, run }) as Record<string, Record<string, unknown>>;
  if (device) c.training = { ...c.training, device };
  for (const [k, v] of Object.entries(extra)) c[k] = { ...c[k], ...v };
  return parseRunConfig(c);
}

it('a run on ref:0 gives the CPU losses, and its checkpoint resumes on the CPU', async () => {
  const cpu = (await train(config('cpu'), quiet)).losses;
  const before = memoryStats('ref:0').allocations;
  const save = path.join(root, 'ck-ref');
  const ref = (
    await train(config('ref', 'ref:0', { training: { exitInterval: 3 }, checkpoint: { save } }), quiet)
  ).losses;
  expect(memoryStats('ref:0').allocations - before, 'tensors were made on ref:0').toBeGreaterThan(1000);
  expect(getDefaultDevice(), 'the default device is restored after the run').toBe('cpu');
  expect(ref.length).toBe(3);
  for (let i = 0; i < 3; i++) expect(Math.abs(ref[i] - cpu[i]) / cpu[i], `step ${i + 1}`).toBeLessThan(1e-5);
  // the run's memory line reports the run's device
  const m = fs
    .readFileSync(path.join(root, 'ref', 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .filter((x) => x.kind === 'train');
  expect(m[0].memory.liveBytes).toBeGreaterThan(0);
  const resumed = (await train(config('resumed', 'cpu', { checkpoint: { load: save } }), quiet)).losses;
  for (let i = 0; i < 3; i++)
    expect(Math.abs(resumed[i] - cpu[3 + i]) / cpu[3 + i], `resumed step ${i + 4}`).toBeLessThan(1e-5);
});

it('a run on the CUDA kernels (cudaemu:0, the emulator of @megapatch/cuda) gives the CPU losses', async () => {
  const cpu = (await train(config('cpu-emu'), quiet)).losses;
  const emu = (await train(config('emu', 'cudaemu:0', { training: { exitInterval: 3 } }), quiet)).losses;
  expect(memoryStats('cudaemu:0').allocations, 'tensors were made on cudaemu:0').toBeGreaterThan(1000);
  expect(emu.length).toBe(3);
  for (let i = 0; i < 3; i++) expect(Math.abs(emu[i] - cpu[i]) / cpu[i], `step ${i + 1}`).toBeLessThan(1e-5);
});

it('bf16 on cudaemu:0: gradient-accumulation fusion on (the default) and off train alike, and the setting is restored', async () => {
  const bf16 = { model: { dtype: 'bf16' } };
  const on = (await train(config('emu-gaf', 'cudaemu:0', { ...bf16, training: { exitInterval: 3 } }), quiet))
    .losses;
  expect(getGradientAccumulationFusion()).toBe(true);
  const off = (
    await train(
      config('emu-nogaf', 'cudaemu:0', {
        ...bf16,
        training: { exitInterval: 3, gradientAccumulationFusion: false },
      }),
      quiet,
    )
  ).losses;
  expect(getGradientAccumulationFusion(), 'restored after the run').toBe(true);
  expect(on.length).toBe(3);
  // the first loss precedes any update; the later ones see weights updated from fp32-accumulated
  // (fused) or bf16-rounded weight gradients: close, and not bit for bit the same
  expect(on[0]).toBe(off[0]);
  for (let i = 1; i < 3; i++) expect(Math.abs(on[i] - off[i]) / off[i], `step ${i + 1}`).toBeLessThan(1e-2);
  expect(on.slice(1)).not.toEqual(off.slice(1));
});

it('--optimizer-cpu-offload on cudaemu:0: the losses of the optimizer on the device, its 12 bytes a parameter in host memory, a checkpoint that resumes either way', async () => {
  const run = (name: string, extra: Record<string, object>) =>
    train(config(name, 'cudaemu:0', { model: { dtype: 'bf16' }, ...extra }), quiet);
  const liveAt1 = (name: string) =>
    fs
      .readFileSync(path.join(root, name, 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l))
      .filter((x) => x.kind === 'train')[0].memory.liveBytes as number;
  const offload = { optimizerCpuOffload: true };
  // on the CPU it changes nothing, and says so
  const lines: string[] = [];
  await train(config('cpu-offload', 'cpu', { optimizer: offload, training: { exitInterval: 1 } }), {
    ...quiet,
    log: (l: string) => lines.push(l),
  });
  expect(lines.filter((l) => l.includes('optimizerCpuOffload'))).toEqual([
    'notice: optimizer.optimizerCpuOffload (--optimizer-cpu-offload) changes nothing here: the run trains on the CPU, where the optimizer state lives already',
  ]);
  const plain = (await run('emu-state', {})).losses;
  const save = path.join(root, 'ck-offload');
  const first = (
    await run('emu-offload', { optimizer: offload, training: { exitInterval: 3 }, checkpoint: { save } })
  ).losses;
  const half = (await run('emu-offload-half', { optimizer: { ...offload, optimizerOffloadFraction: 0.5 } }))
    .losses;
  // the host's AdamW and the device's: the same operations, fp32 rounding apart
  for (const r of [first, half])
    for (const [i, l] of r.entries())
      expect(Math.abs(l - plain[i]) / plain[i], `step ${i + 1}`).toBeLessThan(1e-4);
  // the device's live bytes after a step: the fp32 masters and moments (12 bytes a bf16 parameter) left it
  const params = parameterCount(parseHfConfig(hf).transformerConfig).total;
  const moved = liveAt1('emu-state') - liveAt1('emu-offload');
  expect(moved).toBeGreaterThanOrEqual(12 * params);
  expect(moved).toBeLessThan(12 * params * 1.1);
  // and the device's memory is flat from step to step
  const steps = fs
    .readFileSync(path.join(root, 'emu-offload-half', 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .filter((x) => x.kind === 'train')
    .map((x) => x.memory.liveBytes as number);
  expect(steps.length).toBe(6);
  expect(new Set(steps.slice(1)).size).toBe(1);
  const movedHalf = liveAt1('emu-state') - liveAt1('emu-offload-half');
  expect(movedHalf).toBeGreaterThan(0.2 * moved);
  expect(movedHalf).toBeLessThan(0.6 * moved);
  // the device waits: setup reads each of the 26 parameters once for its host master; a step reads
  // the offloaded gradients once a run of them in DDP's buffer (here one, not one a parameter) and
  // the clip coefficient once, besides the step's own read (the only one without offloading)
  const counted = layoutRunConfig({ root, hf, data, run: 'emu-offload-waits' }) as Record<
    string,
    Record<string, unknown>
  >;
  counted.model = { ...counted.model, dtype: 'bf16' };
  counted.optimizer = { ...counted.optimizer, optimizerCpuOffload: true };
  expect((await countedEmulatedRun(counted, 1)).hostWaits).toBe(26 + 3 * 3);
  // the checkpoint holds the state wherever it lived: resumed with and without offload, the run's last steps
  const resumed = (await run('emu-resumed', { optimizer: offload, checkpoint: { load: save } })).losses;
  const onDevice = (await run('emu-resumed-dev', { checkpoint: { load: save } })).losses;
  for (const r of [resumed, onDevice])
    for (let i = 0; i < 3; i++)
      expect(Math.abs(r[i] - plain[3 + i]) / plain[3 + i], `step ${i + 4}`).toBeLessThan(1e-4);
});

it('DP=2 × TP=2 on ref:0 (collectives through host copies) gives the CPU losses', async () => {
  const cpu = (await train(config('cpu-4'), quiet)).losses;
  const c = layoutRunConfig({
    root,
    hf,
    data,
    run: 'ref-dp2-tp2',
    parallel: { tensorModelParallelSize: 2, useDistributedOptimizer: true },
  }) as Record<string, Record<string, unknown>>;
  c.training = { ...c.training, device: 'ref:0' };
  const [r] = (await launchWorkers({ nproc: 4, script: 'train-worker.ts', config: c })) as {
    losses: number[];
  }[];
  expect(r.losses.length).toBe(6);
  for (let i = 0; i < 6; i++)
    expect(Math.abs(r.losses[i] - cpu[i]) / cpu[i], `step ${i + 1}`).toBeLessThan(1e-5);
});

it("TP=2 (+SP), PP=2, CP=2 (ring and all-to-all) and DP=2 on the emulated CUDA devices (one per process, collectives through the emulator's NCCL) give the CPU losses, waiting for the device once a step", async () => {
  const cpu = (await train(config('cpu-nccl'), quiet)).losses;
  const waits: Record<string, number> = {};
  for (const [name, parallel] of [
    ['tp2', { tensorModelParallelSize: 2, sequenceParallel: true }],
    ['pp2', { pipelineModelParallelSize: 2 }],
    ['cp2', { contextParallelSize: 2 }],
    // by all-to-all: NCCL's all-to-all, stream-ordered like the ring's exchanges
    ['cp2a2a', { contextParallelSize: 2, cpCommType: 'a2a' }],
    // DP=2: the weight gradients go into DDP's buffer by the fused GEMM (gradient-accumulation
    // fusion), the buckets still reduce from the post-accumulate hooks
    ['dp2', { useDistributedOptimizer: true }],
  ] as const) {
    const c = layoutRunConfig({ root, hf, data, run: `emu-nccl-${name}`, parallel }) as Record<
      string,
      Record<string, unknown>
    >;
    // "cudaemu": each process takes cudaemu:<LOCAL_RANK>, as "cuda" takes its GPU
    c.training = { ...c.training, device: 'cudaemu', exitInterval: 3 };
    const [r] = (await launchWorkers({
      nproc: 2,
      script: 'train-worker.ts',
      config: c,
      timeoutMs: 60_000,
      env: { MEGAPATCH_TEST_HOST_WAITS: '1' },
    })) as {
      losses: number[];
      device: string;
      collectives: string | null;
      hostWaits: number;
    }[];
    waits[name] = r.hostWaits;
    expect(r.device).toBe('cudaemu:0');
    expect(r.collectives, `${name}: the collectives went through NCCL`).toMatch(/^nccl emulated 2\./);
    expect(r.losses.length).toBe(3);
    for (let i = 0; i < 3; i++)
      expect(Math.abs(r.losses[i] - cpu[i]) / cpu[i], `${name} step ${i + 1}`).toBeLessThan(1e-5);
  }
  // rank 0's waits for its device over the 3 steps, setup included: one a step (the step's sums
  // with the gradient norm), in every layout (TP and PP waited once more at setup, when the
  // optimizer asked its expert group whether any rank holds experts through the device)
  expect(waits).toEqual({ tp2: 3, pp2: 3, cp2: 3, cp2a2a: 3, dp2: 3 });
});

/** Three steps of `c` on the emulated CUDA devices (one a process), counting the host's waits. */
async function countedEmulatedRun(
  c: Record<string, Record<string, unknown>>,
  nproc: number,
  env: Record<string, string> = {},
) {
  c.training = { ...c.training, device: 'cudaemu', trainIters: 3 };
  const [r] = (await launchWorkers({
    nproc,
    script: 'train-worker.ts',
    config: c,
    timeoutMs: 60_000,
    env: { MEGAPATCH_TEST_HOST_WAITS: '1', ...env },
  })) as { hostWaits: number; losses: number[] }[];
  return r;
}

function expectSameLosses(got: number[], want: number[], what: string): void {
  expect(got.length, what).toBe(want.length);
  for (let i = 0; i < want.length; i++)
    expect(Math.abs(got[i] - want[i]) / want[i], `${what} step ${i + 1}`).toBeLessThan(1e-5);
}

it('on the emulated devices a step waits for its device once (the step sums with the gradient norm), at CP=2 as on one process, on plain and on packed rows, and at DP=2 with the per-token loss', async () => {
  const prefix = path.join(root, 'sft-waits');
  writeSft(prefix, 80, 32);
  for (const packed of [false, true]) {
    const runs: { hostWaits: number; losses: number[] }[] = [];
    for (const cp of [1, 2]) {
      const c = layoutRunConfig({
        root,
        hf,
        data,
        run: `emu-waits-${packed ? 'packed' : 'plain'}-cp${cp}`,
        parallel: cp > 1 ? { contextParallelSize: cp } : {},
      }) as Record<string, Record<string, unknown>>;
      if (packed) {
        // SFT rows packed with cuSeqlens, each sample padded to a multiple of 2·cp (the same rows for both)
        usePackedSft(c, prefix, root);
      }
      runs.push(await countedEmulatedRun(c, cp));
    }
    const what = packed ? 'packed' : 'plain';
    // the whole run, setup included: CP=2 waited 24 (plain) and 84 (packed) times before, at the
    // loss mask's and the boundaries' reads of each micro-batch, each ring attention's read of
    // the boundaries, the host's numbers reduced through the device; 6 before the gradient norm
    // was read with the step's sums (the update queued without it)
    expect(
      runs.map((r) => r.hostWaits),
      what,
    ).toEqual([3, 3]);
    expectSameLosses(runs[1].losses, runs[0].losses, what);
  }
  // DP=2 with one token mean over the global batch: the batch's token count is summed over dp on
  // the host's collectives (it went through the device, a wait a step, before)
  const c = layoutRunConfig({ root, hf, data, run: 'emu-waits-per-token-dp2' }) as Record<
    string,
    Record<string, unknown>
  >;
  usePackedSft(c, prefix, root);
  c.training = { ...c.training, calculatePerTokenLoss: true };
  expect((await countedEmulatedRun(c, 2)).hostWaits).toBe(3);
});

it("Mixtral on the emulated devices, either dispatcher: one process waits once a step (the grouped GEMMs take the tokens per expert on the device; under a GPU's default loop of GEMMs once a MoE layer and micro-batch); at EP=2 a MoE layer waits once a micro-batch (every rank's tokens per expert, read together), a step once more", async () => {
  const mixtral = tinyLlama(path.join(root, 'hf-mixtral'), 'mixtral');
  const moeLayers = 4;
  const runs: { hostWaits: number; losses: number[] }[] = [];
  for (const [ep, dispatcher] of [
    [1, 'allgather'],
    [1, 'alltoall'],
    [2, 'allgather'],
    [2, 'alltoall'],
  ] as const) {
    const c = layoutRunConfig({
      root,
      hf: mixtral,
      data,
      run: `emu-waits-ep${ep}-${dispatcher}`,
      parallel: ep > 1 ? { expertModelParallelSize: ep } : {},
    }) as Record<string, Record<string, unknown>>;
    c.model = { ...c.model, moeTokenDispatcherType: dispatcher };
    runs.push(await countedEmulatedRun(c, ep));
  }
  // one process: the step's sums with the gradient norm, its one wait (4 micro-batches of 4 MoE
  // layers waited once each before, for the grouped GEMMs' sizes: 51 in 3 steps; now the emulator's
  // grouped kernel plans them on the device, as a GPU's does under MEGAPATCH_GROUPED_GEMM=tiled,
  // mma or wgmma; its default loop of cuBLASLt GEMMs reads them); EP=2 (DP=2: 2 micro-batches a rank): the
  // counts are gathered where the routers made them and read once, every rank's together (the
  // tokens, weights and expert ids travel where they are: the allgather dispatcher waited 5 times
  // a layer before, the alltoall one twice), the all-reduced expert load is read with the step's
  // sums (a read of its own before); the optimizer's setup asks the expert group on the host
  const ep2 = 3 * (2 * moeLayers + 1);
  expect(runs.map((r) => r.hostWaits)).toEqual([3, 3, ep2, ep2]);
  // a GPU's default grouped mode, the loop of GEMMs, needs the sizes on the host: one process then
  // waits once a MoE layer and micro-batch (fc1 and fc2 share the read; backward reads nothing)
  const loop = await countedEmulatedRun(
    layoutRunConfig({ root, hf: mixtral, data, run: 'emu-waits-ep1-loop' }) as Record<
      string,
      Record<string, unknown>
    >,
    1,
    { MEGAPATCH_GROUPED_GEMM: 'loop' },
  );
  expect(loop.hostWaits).toBe(3 * (4 * moeLayers + 1));
  expectSameLosses(loop.losses, runs[0].losses, 'EP=1, loop of GEMMs');
  expectSameLosses(runs[1].losses, runs[0].losses, 'EP=1, alltoall');
  expectSameLosses(runs[2].losses, runs[0].losses, 'EP=2, allgather');
  expectSameLosses(runs[3].losses, runs[0].losses, 'EP=2, alltoall');
});

it("Mixtral with a capacity on the emulated devices: padded to it (Megatron's drop-and-pad), EP=2 waits for nothing with either dispatcher, a step once; without padding a MoE layer reads its counts once a micro-batch", async () => {
  const mixtral = tinyLlama(path.join(root, 'hf-mixtral-capacity'), 'mixtral');
  const moeLayers = 4;
  const runs: { hostWaits: number; losses: number[] }[] = [];
  for (const [ep, pad, dispatcher] of [
    [1, true, 'alltoall'],
    [2, true, 'alltoall'],
    [1, false, 'alltoall'],
    [2, true, 'allgather'],
  ] as const) {
    const c = layoutRunConfig({
      root,
      hf: mixtral,
      data,
      run: `emu-waits-capacity-ep${ep}-${pad ? 'pad' : 'drop'}-${dispatcher}`,
      parallel: ep > 1 ? { expertModelParallelSize: ep } : {},
    }) as Record<string, Record<string, unknown>>;
    c.model = {
      ...c.model,
      moeTokenDispatcherType: dispatcher,
      moeExpertCapacityFactor: 1,
      moePadExpertInputToCapacity: pad,
    };
    runs.push(await countedEmulatedRun(c, ep));
  }
  // padded: every expert takes min(capacity, T) rows, known from T, so neither the map, nor the
  // grouped GEMM, nor the all-to-all's splits need the router's counts; without padding the map's
  // size is its counts, read once a MoE layer and micro-batch. While the host made the map it
  // read the ids and the weights there (and under EP every rank's counts): 99, 75 and 99 waits
  // in 3 steps; the allgather dispatcher gathers padded maps in equal blocks where they are (it
  // read their pairs and gathered them through the host: 99)
  expect(runs.map((r) => r.hostWaits)).toEqual([3, 3, 3 * (4 * moeLayers + 1), 3]);
  expectSameLosses(runs[1].losses, runs[0].losses, 'EP=2, padded, alltoall');
  expectSameLosses(runs[3].losses, runs[0].losses, 'EP=2, padded, allgather');
});

it('DeepSeek-V3 (expert bias, MTP) on one emulated device: the balancing update of the expert biases waits for nothing', async () => {
  const dsv3 = tinyLlama(path.join(root, 'hf-dsv3'), 'deepseek-v3');
  const c = layoutRunConfig({ root, hf: dsv3, data, run: 'emu-waits-dsv3' }) as Record<
    string,
    Record<string, unknown>
  >;
  const r = await countedEmulatedRun(c, 1);
  // the fixture: 4 layers, the first dense, one MTP block (MoE too): 4 routers whose counts stay
  // on the device (the grouped GEMMs' sizes, the expert load added up there and all-reduced for
  // the bias update), so a step waits once, at the step's sums with the gradient norm (17 a step
  // while each router waited a micro-batch for its counts; 21 while the 3 decoder routers' bias
  // updates read their biases back)
  expect(r.hostWaits).toBe(3);
  expect(r.losses.length).toBe(3);
});

it('a device without a backend is refused before training, with the fix', async () => {
  await expect(train(config('bad', 'gpu:0'), quiet)).rejects.toThrow(
    /training\.device gpu:0: no backend registered for device "gpu:0"/,
  );
  await expect(train(config('bad2', 'cuda'), quiet)).rejects.toThrow(
    /training\.device cuda: the CUDA backend could not be loaded .*install @megapatch\/cuda on a machine with an NVIDIA GPU, or use --device cpu/,
  );
  await expect(train(config('bad3', 'ref:7'), quiet)).rejects.toThrow(/device "ref:7" does not exist/);
});
