// @megapatch/tensor/abi: the calling convention of the native backends (argument buffer, dtype and
// op codes), for backend packages such as @megapatch/cuda whose addons read the same layout.
export {
  BINARY_CODES,
  createPacker,
  DIST_CODES,
  DTYPE_CODES,
  GATED_ACTIVATION_CODES,
  ITEMSIZE,
  LINEAR_ACTIVATION_CODES,
  type Packer,
  packAdamWScalars,
  packGemm,
  packPhilox,
  packSgd,
  REDUCE_CODES,
  UNARY_CODES,
} from './backend/abi.js';
// the argument check every backend's adamwStep / adamwStepMulti applies to a parameter copy
export { checkAdamWCopy, checkAdamWScaleTensor } from './optim/kernels.js';
