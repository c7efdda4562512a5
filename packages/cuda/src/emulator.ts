// @megapatch/cuda/emulator: the CUDA backend's entries and kernels, built by the host C++ compiler
// against native/emu/cuda_emu.h, which runs every kernel on the CPU (a block at a time, each CUDA
// thread a fiber, __syncthreads and warp shuffles as on the GPU). It registers the device type
// "cudaemu" (cudaemu:0, cudaemu:1; MEGAPATCH_CUDA_EMU_DEVICES sets how many), so that the tensor
// package's op tests run on the CUDA kernels on machines without a GPU. It is a test tool: slow,
// and blind to what only hardware shows (timing, cuBLASLt, memory limits).
import { registerBackendType } from '@megapatch/tensor';
import { createCudaBackendType } from './backend.js';
import { loadEmulatorAddon } from './native.js';

export {
  formatKernelProfile,
  type KernelProfile,
  type KernelProfileEntry,
  type KernelProfileOptions,
  startKernelProfile,
  stopKernelProfile,
} from './profile.js';

/** The device type name of the emulator. */
export const EMULATOR_DEVICE_TYPE = 'cudaemu';

/** Registers the emulator's device type; throws one line when its addon is not built. */
export function registerCudaEmulator(): void {
  const loaded = loadEmulatorAddon();
  if ('error' in loaded) throw new Error(`@megapatch/cuda/emulator: ${loaded.error}`);
  registerBackendType(createCudaBackendType(loaded.addon, EMULATOR_DEVICE_TYPE));
}

registerCudaEmulator();
