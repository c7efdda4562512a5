// One rank of test/parallel.test.ts: trains the config given as argv[2] (JSON) and prints the
// per-iteration losses on global rank 0 as `RESULT {...}`. With MEGAPATCH_TEST_HOST_WAITS=1 (an
// emulated CUDA device) it also reports how often the host waited for its device during the run,
// with MEGAPATCH_TEST_COLLECTED=1 how many tensors of its device the garbage collector released.

import * as path from 'node:path';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { deviceCollectivesLibrary } from '@megapatch/parallel';
import { getBackend, memoryStats } from '@megapatch/tensor';
import { parseRunConfig, train } from '../../src/index.js';

const config = parseRunConfig(JSON.parse(process.argv[2] ?? '{}'));
const dev = config.training.device;
const name = dev === 'cpu' || dev.includes(':') ? dev : `${dev}:${process.env.LOCAL_RANK ?? 0}`;
const countWaits = process.env.MEGAPATCH_TEST_HOST_WAITS === '1';
const profiler = countWaits ? await import('@megapatch/cuda/emulator') : null;
if (profiler) {
  getBackend(name);
  profiler.startKernelProfile(name);
}
// MEGAPATCH_TEST_COLLECTED=1: also how many of the run's tensors the garbage collector released
// (dropped without dispose()), counted after full collections
const countCollected = process.env.MEGAPATCH_TEST_COLLECTED === '1';
const settle = countCollected ? await collections() : null;
// MEGAPATCH_TEST_ABORT_RANK=r with MEGAPATCH_TEST_ABORT_AFTER_MS=t: rank r alone is stopped (as by
// SIGTERM) t ms into the run
const stop = new AbortController();
if (process.env.MEGAPATCH_TEST_ABORT_RANK === process.env.RANK) {
  setTimeout(() => stop.abort(), Number(process.env.MEGAPATCH_TEST_ABORT_AFTER_MS ?? 0)).unref();
}
const r = await train(config, { log: () => {}, report: false, signal: stop.signal });
await settle?.();
const collected = countCollected ? memoryStats(name).collectedTensors : null;
const hostWaits = profiler ? profiler.stopKernelProfile(name).hostWaits : null;
// the library this rank's collectives used for the run's device (null: host copies over Gloo)
const device = dev === 'cpu' ? 'cpu' : getBackend(name).device;
const collectives = deviceCollectivesLibrary(device);
if ((process.env.RANK ?? '0') === '0')
  console.log(
    `RESULT ${JSON.stringify({
      losses: r.losses,
      iteration: r.iteration,
      exitReason: r.exitReason,
      checkpoints: r.checkpoints.map((c) => path.basename(c)),
      device,
      collectives,
      hostWaits,
      collected,
    })}`,
  );

/** Full collections until the finalizers have run (the collector exposed for this process). */
async function collections(): Promise<() => Promise<void>> {
  v8.setFlagsFromString('--expose-gc');
  const gc = vm.runInNewContext('gc') as () => void;
  return async () => {
    for (let i = 0; i < 4; i++) {
      gc();
      await new Promise((r) => setTimeout(r, 10));
    }
  };
}
