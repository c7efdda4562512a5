// The built-in model families, registered on import.
import { deepseekFamily } from './deepseek.js';
import { registerModelFamily } from './family.js';
import { llamaFamily } from './llama.js';
import { mistralFamily } from './mistral.js';
import { qwenFamily } from './qwen.js';

export const BUILTIN_FAMILIES = [llamaFamily, mistralFamily, qwenFamily, deepseekFamily];
for (const f of BUILTIN_FAMILIES) registerModelFamily(f);

export * from './family.js';
