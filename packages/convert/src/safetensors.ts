// safetensors: reader, writers (whole-file and streaming) and the sharded-checkpoint convention.
export * from './safetensors/dtype.js';
export * from './safetensors/file.js';
export * from './safetensors/header.js';
export * from './safetensors/sharded.js';
export * from './safetensors/writer.js';
