// One rank of test/parallel.test.ts: trains the config given as argv[2] (JSON) and prints the
// per-iteration losses on global rank 0 as `RESULT {...}`. With MEGAPATCH_TEST_HOST_WAITS=1 (an
// emulated CUDA device) it also reports how often the host waited for its device during the run.
import { deviceCollectivesLibrary } from '@megapatch/parallel';
import { getBackend } from '@megapatch/tensor';
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
const r = await train(config, { log: () => {}, report: false });
const hostWaits = profiler ? profiler.stopKernelProfile(name).hostWaits : null;
// the library this rank's collectives used for the run's device (null: host copies over Gloo)
const device = dev === 'cpu' ? 'cpu' : getBackend(name).device;
const collectives = deviceCollectivesLibrary(device);
if ((process.env.RANK ?? '0') === '0')
  console.log(
    `RESULT ${JSON.stringify({ losses: r.losses, iteration: r.iteration, device, collectives, hostWaits })}`,
  );
