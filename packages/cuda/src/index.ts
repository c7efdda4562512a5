// @megapatch/cuda: the CUDA backend of megapatch. This version discovers the GPUs, the driver, the
// CUDA runtime and NCCL (cudaInfo); the tensor backend (allocator, kernels, cuBLASLt GEMMs, flash
// attention) and the NCCL process group come next. Importing the package is the check: it throws
// one clear line when this machine or build cannot run it.
import { cudaInfo } from './info.js';

export { type CudaDevice, type CudaInfo, cudaInfo } from './info.js';

/** Why @megapatch/cuda cannot be used here. */
export class CudaError extends Error {
  readonly code: 'UNAVAILABLE' | 'NOT_IMPLEMENTED';
  constructor(code: 'UNAVAILABLE' | 'NOT_IMPLEMENTED', message: string) {
    super(message);
    this.name = 'CudaError';
    this.code = code;
  }
}

const info = cudaInfo();
if (!info.available)
  throw new CudaError('UNAVAILABLE', `@megapatch/cuda: CUDA is not available: ${info.reason}`);
throw new CudaError(
  'NOT_IMPLEMENTED',
  `@megapatch/cuda: ${info.reason} found, but this version has no tensor backend yet (cudaInfo() from @megapatch/cuda/info reports them); train with --device cpu`,
);
