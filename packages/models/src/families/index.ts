// The built-in model families, registered on import.
import { deepseekFamily } from './deepseek.js';
import { registerModelFamily } from './family.js';
import { llamaFamily } from './llama.js';
import { mistralFamily } from './mistral.js';
import { phi3Family } from './phi3.js';
import { qwenFamily } from './qwen.js';

export const BUILTIN_FAMILIES = [llamaFamily, mistralFamily, qwenFamily, deepseekFamily, phi3Family];
for (const f of BUILTIN_FAMILIES) registerModelFamily(f);

export * from './family.js';
