// Setup of the conformance run (vitest.conformance.config.ts): registers the pure-TypeScript
// reference backend and makes MEGAPATCH_TEST_DEVICE (default ref:0) the default device, so that
// every op test below runs its tensors there and compares them with the same PyTorch fixtures.
// Another backend package is loaded first with MEGAPATCH_TEST_BACKEND_MODULE (e.g.
// MEGAPATCH_TEST_BACKEND_MODULE=@megapatch/cuda MEGAPATCH_TEST_DEVICE=cuda:0).
import { afterAll } from 'vitest';
import { getDefaultDevice, memoryStats, setDefaultDevice } from '../../src/index.js';
import { registerReferenceBackend } from '../../src/reference.js';

registerReferenceBackend();
if (process.env.MEGAPATCH_TEST_BACKEND_MODULE) await import(process.env.MEGAPATCH_TEST_BACKEND_MODULE);
setDefaultDevice(process.env.MEGAPATCH_TEST_DEVICE ?? 'ref:0');

// the run proves something only if the tests' tensors were made on the device under test
afterAll(() => {
  const device = getDefaultDevice();
  const here = memoryStats(device).allocations;
  const cpu = memoryStats('cpu').allocations;
  if (here === 0 || here < cpu) {
    throw new Error(
      `conformance: ${here} allocations on ${device} against ${cpu} on the CPU; the tests did not run on ${device}`,
    );
  }
  if (process.env.MEGAPATCH_CONFORMANCE_VERBOSE)
    console.log(`conformance: ${here} allocations on ${device}, ${cpu} on cpu`);
});
