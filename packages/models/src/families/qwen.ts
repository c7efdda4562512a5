// Qwen 1.5 / 2 / 2.5 / 3, QwQ and their MoE variants: QKV bias (Qwen2), per-head q/k RMSNorm and an
// explicit head dim (Qwen3), shared experts with a sigmoid gate (Qwen2-MoE).
import type { ModelFamily } from './family.js';

export const qwenFamily: ModelFamily = {
  name: 'qwen',
  architectures: ['Qwen2ForCausalLM', 'Qwen3ForCausalLM', 'Qwen2MoeForCausalLM', 'Qwen3MoeForCausalLM'],
  description: 'Qwen 1.5/2/2.5/3, QwQ, Qwen-MoE, Qwen3-MoE: QKV bias, QK norm, gated shared experts',
};
