// Optimizers, gradient clipping, learning-rate schedules and mixed precision.
import './kernels.js';

export {
  AdamW,
  type AdamWGroup,
  type AdamWOptions,
  type AdamWState,
  type AdamWStepOptions,
} from './adamw.js';
export {
  type ClipGradNormOptions,
  clipCoefficient,
  clipGradNorm,
  clipTensorsWithNorm,
  getTotalNorm,
  getTotalNormPowerSum,
  getTotalNormTensor,
} from './clip-grad.js';
export {
  ConstantGradScaler,
  DynamicGradScaler,
  type DynamicGradScalerOptions,
  type GradScaler,
  type GradScalerState,
} from './grad-scaler.js';
export {
  type LrDecayStyle,
  OptimizerParamScheduler,
  type OptimizerParamSchedulerOptions,
  type OptimizerParamSchedulerState,
  type SchedulableOptimizer,
  type WdIncrementStyle,
  type WsdDecayStyle,
} from './lr-scheduler.js';
export {
  type InnerOptimizerFactory,
  MixedPrecisionOptimizer,
  type MixedPrecisionOptions,
  type MixedPrecisionStateDict,
  type MixedPrecisionStepResult,
} from './mixed-precision.js';
export {
  type GroupInput,
  type JsonValue,
  Optimizer,
  type OptimizerStateDict,
  type ParamGroup,
  type ParamState,
  type ParamsInput,
  type StateValue,
  toParamGroups,
} from './optimizer.js';
export { SGD, type SGDGroup, type SGDOptions, type SGDState } from './sgd.js';
