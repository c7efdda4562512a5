// Llama 2 / 3 / 3.1 / 3.2 (and every Llama-format checkpoint, such as stories260K): the shared layers
// as they are — GQA with RoPE (llama3 or linear scaling), SwiGLU, RMSNorm.
import type { ModelFamily } from './family.js';

export const llamaFamily: ModelFamily = {
  name: 'llama',
  architectures: ['LlamaForCausalLM'],
  description: 'Llama 2/3/3.1/3.2: GQA, RoPE (llama3/linear scaling), SwiGLU, RMSNorm',
};
