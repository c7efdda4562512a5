// Setup of the kernel-by-kernel run (vitest.kernels.config.ts): registers the backend of the device
// under test (MEGAPATCH_KERNEL_DEVICE: the emulator for cudaemu:*, @megapatch/cuda for cuda:*) and,
// unlike the conformance setup, leaves the default device on the CPU: fallbacks.test.ts makes its
// inputs on the default device and runs the CPU's native kernels on them, and copies them to the
// device itself for the device's kernels.
import { getDefaultDevice, memoryStats } from '@megapatch/tensor';
import { afterAll } from 'vitest';

const device = process.env.MEGAPATCH_KERNEL_DEVICE ?? 'cudaemu:0';
await import(device.startsWith('cudaemu') ? '../src/emulator.js' : '../src/index.js');
if (getDefaultDevice() !== 'cpu')
  throw new Error(`kernels: the default device is ${getDefaultDevice()}, not cpu`);

// the run proves something only if the device's kernels ran on device tensors
afterAll(() => {
  const here = memoryStats(device).allocations;
  if (here === 0) throw new Error(`kernels: no allocation on ${device}; its kernels did not run`);
});
