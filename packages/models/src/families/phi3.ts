// Phi-3 / Phi-4 (Phi3ForCausalLM): Mistral's layers as they are (GQA, RoPE, SwiGLU, RMSNorm, an
// optional sliding window); only the checkpoint differs, its q/k/v and gate/up projections packed
// into one tensor each, which the converter's spec regroups.
import type { ModelFamily } from './family.js';

export const phi3Family: ModelFamily = {
  name: 'phi3',
  architectures: ['Phi3ForCausalLM'],
  description: 'Phi-3 / Phi-4: packed qkv_proj and gate_up_proj, optional sliding window',
};
