// The mapping engine: layout transforms, the conversion plan built from an architecture's weight
// rules, dtype casts and the streaming converters.
export * from './convert.js';
export * from './dtype-cast.js';
export * from './json-edit.js';
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
