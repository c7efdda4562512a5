// Architecture specs: types, the registry, and the built-in HF architectures, which register
// themselves here through the same registerArchitecture a plugin package calls.
import { deepseekV2Spec, deepseekV3Spec } from './deepseek.js';
import { llamaSpec, mistralSpec, qwen2Spec, qwen3Spec } from './dense.js';
import { mixtralSpec, qwen2MoeSpec, qwen3MoeSpec } from './moe.js';
import { phi3Spec } from './phi3.js';
import { registerArchitecture } from './registry.js';
import type { ArchitectureSpec } from './types.js';

export { HfRopeScaling, ropeScalingFromHf } from './common.js';
export * from './deepseek.js';
export * from './dense.js';
export * from './moe.js';
export * from './phi3.js';
export * from './registry.js';
export * from './types.js';

/** The built-in specs, in registration order. */
export const builtinArchitectureSpecs: readonly ArchitectureSpec[] = [
  llamaSpec,
  mistralSpec,
  qwen2Spec,
  qwen3Spec,
  mixtralSpec,
  qwen2MoeSpec,
  qwen3MoeSpec,
  deepseekV2Spec,
  deepseekV3Spec,
  phi3Spec,
];

for (const spec of builtinArchitectureSpecs) registerArchitecture(spec);
