// @megapatch/cuda: the CUDA backend of megapatch. Importing it registers the device type "cuda"
// (cuda:0, cuda:1, ...) with @megapatch/tensor: a caching device allocator, one stream per device,
// elementwise / reduction / indexing / Philox kernels and cuBLASLt GEMMs; the named kernels it
// does not have yet (softmax, norms, attention, optimizers) run as compositions of those. Importing
// is also the check: it throws one clear line when this machine or build cannot run it.
// cudaInfo() (also from @megapatch/cuda/info) reports the GPUs, driver, runtime and NCCL.
import { registerBackendType } from '@megapatch/tensor';
import { createCudaBackendType } from './backend.js';
import { cudaInfo } from './info.js';
import { type BackendAddon, loadAddon } from './native.js';

export { type CudaDevice, type CudaInfo, cudaInfo } from './info.js';
export {
  formatKernelProfile,
  type KernelProfile,
  type KernelProfileEntry,
  type KernelProfileOptions,
  startKernelProfile,
  stopKernelProfile,
} from './profile.js';

/** Why @megapatch/cuda cannot be used here. */
export class CudaError extends Error {
  readonly code: 'UNAVAILABLE';
  constructor(code: 'UNAVAILABLE', message: string) {
    super(message);
    this.name = 'CudaError';
    this.code = code;
  }
}

const info = cudaInfo();
if (!info.available)
  throw new CudaError('UNAVAILABLE', `@megapatch/cuda: CUDA is not available: ${info.reason}`);
const loaded = loadAddon();
if ('error' in loaded) throw new CudaError('UNAVAILABLE', `@megapatch/cuda: ${loaded.error}`);
registerBackendType(createCudaBackendType(loaded.addon as BackendAddon, 'cuda'));

/** The GEMM engine of the CUDA backend ("cuBLASLt <version>"). */
export function gemmEngine(): string {
  return (loaded as { addon: BackendAddon }).addon.gemmEngine();
}
