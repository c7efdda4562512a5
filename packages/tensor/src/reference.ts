// @megapatch/tensor/reference: the pure-TypeScript reference backend (devices "ref:0", "ref:1"),
// for conformance tests of other backends and of device-agnostic code.
export {
  createReferenceBackendType,
  type ReferenceBackendOptions,
  registerReferenceBackend,
} from './backend/reference.js';
