// @megapatch/plugin-gemma: Google's Gemma (v1, HF `GemmaForCausalLM`) as a plugin. Importing the
// package registers the architecture spec with @megapatch/convert and the model family with
// @megapatch/models, the same calls the built-in families make.
import { getArchitectureSpec, listArchitectures, registerArchitecture } from '@megapatch/convert';
import { listModelFamilies, registerModelFamily } from '@megapatch/models';
import { gemmaFamily } from './family.js';
import { GEMMA_ARCHITECTURE, gemmaSpec } from './spec.js';

export { gemmaFamily } from './family.js';
export { GEMMA_ARCHITECTURE, gemmaSpec, HfGemmaConfig } from './spec.js';

// Marks this plugin's objects, so a second copy of the package (its dist and its sources in one
// process, or two installs) recognises a registration as its own instead of a conflict.
const MARK = Symbol.for('@megapatch/plugin-gemma');
for (const o of [gemmaSpec, gemmaFamily]) Object.defineProperty(o, MARK, { value: true });
const isOurs = (o: object): boolean => (o as Record<symbol, unknown>)[MARK] === true;

/**
 * Registers the Gemma spec and family (done on import). Idempotent; throws the registries' error
 * when another package already registered `GemmaForCausalLM`.
 */
export function registerGemma(): void {
  if (!listArchitectures().includes(GEMMA_ARCHITECTURE) || !isOurs(getArchitectureSpec(GEMMA_ARCHITECTURE))) {
    registerArchitecture(gemmaSpec);
  }
  const family = listModelFamilies().find((f) => f.architectures.includes(GEMMA_ARCHITECTURE));
  if (!family || !isOurs(family)) registerModelFamily(gemmaFamily);
}

registerGemma();
