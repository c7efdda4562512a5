// The megapatch checkpoint (DESIGN §4): metadata.json plus per-rank safetensors files, readable
// into any parallel layout.
export * from './metadata.js';
export * from './reader.js';
export { checkTiling, copyRegion, intersect, type Region } from './region.js';
export * from './writer.js';
