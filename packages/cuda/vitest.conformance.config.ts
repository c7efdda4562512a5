import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';
import tensorConformance from '../tensor/vitest.conformance.config.js';

// The conformance suite of @megapatch/tensor (its op tests: forward and backward against the
// PyTorch fixtures, dtypes, odd shapes, non-contiguous views, gradcheck, random streams,
// optimizers) with every tensor on the CUDA backend: on the emulator (cudaemu:0, the default, runs
// anywhere) or, with MEGAPATCH_TEST_DEVICE=cuda:0, on a GPU.
const here = dirname(fileURLToPath(import.meta.url));
const tensorRoot = resolve(here, '../tensor');
const device = process.env.MEGAPATCH_TEST_DEVICE ?? 'cudaemu:0';
const backendModule = device.startsWith('cudaemu')
  ? resolve(here, 'src/emulator.ts')
  : resolve(here, 'src/index.ts');

export default defineConfig({
  root: tensorRoot,
  resolve: {
    // one copy of the tensor package: the tests import its sources, so the backend must too
    alias: [
      { find: /^@megapatch\/tensor$/, replacement: resolve(tensorRoot, 'src/index.ts') },
      { find: /^@megapatch\/tensor\/abi$/, replacement: resolve(tensorRoot, 'src/abi.ts') },
    ],
  },
  test: {
    ...tensorConformance.test,
    env: { MEGAPATCH_TEST_DEVICE: device, MEGAPATCH_TEST_BACKEND_MODULE: backendModule },
    testTimeout: 300_000,
  },
});
