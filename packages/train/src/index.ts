// @megapatch/train: the training engine — the run config, the training loop with Megatron's
// semantics, training checkpoints that resume bit for bit, metrics and the run report.

export {
  type LoadOptions,
  loadTrainingCheckpoint,
  type SaveOptions,
  saveTrainingCheckpoint,
  type TrainingState,
} from './checkpoint.js';
export {
  BatchSizeRampup,
  CheckpointSection,
  DataSection,
  DpoSection,
  LoggingSection,
  loadRunConfig,
  ModelSection,
  nearestKey,
  OptimizerSection,
  ParallelSection,
  parseRunConfig,
  RlSection,
  RunConfig,
  type RunConfigInput,
  resolveOverride,
  SchedulerSection,
  TrainingSection,
  trainIterations,
} from './config.js';
// Preference optimisation (DPO): its losses and its run loop.
export { type DpoMetrics, trainDpo } from './dpo/dpo.js';
export { DPO_LOSS_TYPES, type DpoLossOptions, type DpoLossType, dpoLoss } from './dpo/loss.js';
export { TrainError, type TrainErrorCode } from './errors.js';
export {
  type FlopsBreakdown,
  type FlopsOptions,
  floatingPointOperationsBreakdown,
  numFloatingPointOperations,
  tflopsPerSecond,
} from './flops.js';
export {
  formatTrainingLogLine,
  formatValidationLogLines,
  type TrainingLogFields,
  type ValidationLogFields,
} from './log-line.js';
export {
  ARCHITECTURE_FLAGS,
  type Architecture,
  ArchitectureSection,
  checkArchitecture,
  IMPLEMENTATION_FLAGS,
  type MegatronFlag,
  megatronFlag,
  moeLayerFreqPattern,
  REFUSED_FLAGS,
} from './megatron-flags.js';
// The run report: metrics.jsonl → report/index.html (Vega charts) and PNGs of the same charts.
export { ReportError, type ReportErrorCode } from './report/errors.js';
export {
  DpoMetricsLine,
  MoeMetrics,
  RlMetricsLine,
  RUN_CONFIG_FILE,
  RUN_METRICS_FILE,
  type RunMetrics,
  readRunMetrics,
  TrainMetricsLine,
  ValidMetricsLine,
} from './report/metrics.js';
// TensorBoard event files (logging.tensorboardDir, Megatron's --tensorboard-dir).
export {
  encodeEvent,
  readScalarEvents,
  type ScalarEvent,
  TensorBoardWriter,
  tfRecord,
} from './report/tensorboard.js';
export {
  REPORT_DIR,
  REPORT_PAGE,
  type RunReport,
  type RunReportOptions,
  writeRunReport,
} from './report/write.js';
export { type RlMetrics, trainGrpo } from './rl/grpo.js';
// Reinforcement learning (GRPO): advantages, policy and KL losses, their aggregation.
export {
  type AggregationTotals,
  aggregateLoss,
  grpoAdvantages,
  KL_TYPES,
  type KlType,
  klPenalty,
  LOSS_AGGREGATIONS,
  type LossAggregation,
  type PolicyLossOptions,
  type PolicyLossTerms,
  policyGradientLosses,
} from './rl/loss.js';
export {
  BUILTIN_REWARDS,
  finalAnswer,
  loadReward,
  type RewardFunction,
  type RlPrompt,
  readRlPrompts,
} from './rl/prompts.js';
export {
  type TrainMetrics,
  type TrainOptions,
  type TrainResult,
  tensorboardSampleScalars,
  tensorboardScalars,
  train,
  type ValidMetrics,
} from './trainer.js';
