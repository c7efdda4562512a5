// @megapatch/tensor: tensors, autograd, nn, optimizers and the native CPU backend.
import './backend/cpu.js';
import './autograd/engine.js';
import './backend/fallbacks.js';

export { checkpoint } from './autograd/checkpoint.js';
export { addedToMainGrad, type BackwardOptions, backward } from './autograd/engine.js';
export { type GradcheckOptions, gradcheck } from './autograd/gradcheck.js';
export {
  type BackwardFn,
  enableGrad,
  type GradDestination,
  type GradHook,
  isGradEnabled,
  noGrad,
  setGradEnabled,
} from './autograd/graph.js';
export { type AttachOptions, attachGrad, needsGrad } from './autograd/record.js';
export {
  type Backend,
  type BackendType,
  type BinaryOp,
  type DeviceCollectives,
  type DeviceCommunicator,
  type DeviceReduceOp,
  deviceCount,
  type GemmOperand,
  getBackend,
  getDefaultDevice,
  listBackends,
  normalizeDevice,
  type RandomDist,
  type ReduceOp,
  registerBackend,
  registerBackendType,
  registerLazyBackend,
  setDefaultDevice,
  type UnaryOp,
} from './backend/backend.js';
export { backendInfo, defineCpuKernel, getNumThreads, setNumThreads } from './backend/cpu.js';
export {
  getFallbackKernel,
  getKernel,
  hasNativeKernel,
  type KernelName,
  type KernelTable,
} from './backend/kernels.js';
export { DTYPES, type DType, isFloating, isIntegral, promoteTypes } from './dtype.js';
export { TensorError, type TensorErrorCode } from './errors.js';
export * from './nn/index.js';
export * from './ops/attention.js';
export * from './ops/creation.js';
export * from './ops/cross-entropy-shard.js';
export * from './ops/elementwise.js';
export * from './ops/glu.js';
export * from './ops/grouped-linear.js';
export * from './ops/indexing.js';
export * from './ops/linear-activation.js';
export * from './ops/matmul.js';
export * from './ops/norm.js';
export * from './ops/reduce.js';
export * from './ops/rope.js';
export * from './ops/shape.js';
export * from './ops/softmax.js';
export type { CreateOptions } from './ops/util.js';
export * from './optim/index.js';
export * from './random.js';
export { keep, tidy } from './scope.js';
export {
  type CollectedSite,
  collectedTensorSites,
  emptyCache,
  type MemoryStats,
  memoryStats,
  resetPeakMemoryStats,
  Storage,
} from './storage.js';
export { deferCheck, pendingChecks, synchronize } from './sync.js';
export { type NestedArray, type PostAccumulateGradHook, Tensor } from './tensor.js';
