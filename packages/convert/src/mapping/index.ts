// The mapping engine: layout transforms, the conversion plan built from an architecture's weight
// rules, dtype casts and the streaming converters.
export {
  type CommonConvertOptions,
  type ConversionProgress,
  type ConversionSummary,
  convertHfToMegapatch,
  convertMegapatchToHf,
  exportedHfConfig,
  HfMegatronView,
  type HfToMegapatchOptions,
  type MegapatchToHfOptions,
  type ModelDtype,
  type ReshardOptions,
  reshardCheckpoint,
  type TensorSource,
  type TensorSourceInfo,
} from './convert.js';
export * from './dtype-cast.js';
export {
  type HfWeights,
  openHfWeights,
  PYTORCH_INDEX_FILE,
  PYTORCH_SINGLE_FILE,
  TorchBinWeights,
} from './hf-weights.js';
export * from './json-edit.js';
export { MEGATRON_TRACKER_FILE, MegatronPlanView } from './megatron-common.js';
export { MEGATRON_COMMON_FILE, MEGATRON_DIST_METADATA_FILE, MegatronDistView } from './megatron-dist.js';
export {
  convertMegapatchToMegatron,
  convertMegatronToHf,
  convertMegatronToMegapatch,
  inspectMegatronCheckpoint,
  MEGATRON_RANK_FILE,
  type MegapatchToMegatronOptions,
  type MegatronCheckpointInfo,
  MegatronLegacyView,
  type MegatronNaming,
  type MegatronStoredTensor,
  type MegatronToHfOptions,
  type MegatronToMegapatchOptions,
  megatronCheckpointDir,
  megatronRankDirName,
  openMegatronCheckpoint,
} from './megatron-legacy.js';
export {
  HF_EXPORT_MARKER_FILE,
  HfExportMarker,
  type PathRelation,
  pathRelation,
  readHfExportMarker,
} from './output-guard.js';
export * from './plan.js';
export * from './transforms.js';
export { type CheckpointVerification, verifyCheckpoint } from './verify.js';
