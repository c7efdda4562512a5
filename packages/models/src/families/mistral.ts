// Mistral / Mixtral: Llama's layers with a sliding attention window (Mistral 7B v0.1) and, for
// Mixtral, sparse SwiGLU experts with a softmax top-2 router.
import type { ModelFamily } from './family.js';

export const mistralFamily: ModelFamily = {
  name: 'mistral',
  architectures: ['MistralForCausalLM', 'MixtralForCausalLM'],
  description: 'Mistral (sliding window) and Mixtral (softmax top-k MoE)',
};
