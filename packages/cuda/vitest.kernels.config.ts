import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

// The kernel-by-kernel comparison of @megapatch/tensor (test/fallbacks.test.ts) with the CUDA
// backend's own named kernels as the candidates: each kernel runs on the device (the emulator,
// cudaemu:0, by default; MEGAPATCH_TEST_DEVICE=cuda:0 on a GPU) and on the CPU's native kernel
// with the same inputs (odd shapes, dtypes, every option), and every output must agree within the
// test's tolerances. The kernels the backend does not have are reported as skipped.
const here = dirname(fileURLToPath(import.meta.url));
const tensorRoot = resolve(here, '../tensor');
const device = process.env.MEGAPATCH_TEST_DEVICE ?? 'cudaemu:0';

export default defineConfig({
  root: tensorRoot,
  resolve: {
    // one copy of the tensor package: the test imports its sources, so the backend must too
    alias: [
      { find: /^@megapatch\/tensor$/, replacement: resolve(tensorRoot, 'src/index.ts') },
      { find: /^@megapatch\/tensor\/abi$/, replacement: resolve(tensorRoot, 'src/abi.ts') },
    ],
  },
  test: {
    include: ['test/fallbacks.test.ts'],
    // registers the device's backend and leaves the default device on the CPU
    setupFiles: [resolve(here, 'test/kernels-setup.ts')],
    env: { MEGAPATCH_KERNEL_DEVICE: device },
    testTimeout: 300_000,
    pool: 'forks',
  },
});
