// DeepSeek-V2 / V3 / R1 and Moonlight: multi-head latent attention with yarn RoPE, MoE with shared
// experts and group-limited routing (sigmoid scores and an expert bias in V3), multi-token prediction.
import type { ModelFamily } from './family.js';

export const deepseekFamily: ModelFamily = {
  name: 'deepseek',
  architectures: ['DeepseekV2ForCausalLM', 'DeepseekV3ForCausalLM'],
  description: 'DeepSeek-V2/V3/R1, Moonlight: MLA, grouped MoE routing with expert bias, MTP',
};
