// The model half of Gemma (v1): what it changes in the shared GPTModel layers.
import type { ModelFamily } from '@megapatch/models';
import { GEMMA_ARCHITECTURE } from './spec.js';

/**
 * Gemma: the gated MLP is GELU(tanh)(gate) · up; every RMSNorm scales by (1 + weight) in fp32 with
 * the weight stored centred on 0; the embedding output is multiplied by √hidden rounded to the
 * activation dtype (HF: `hidden * torch.tensor(hidden_size ** 0.5, dtype=hidden.dtype)`).
 */
export const gemmaFamily: ModelFamily = {
  name: 'gemma',
  architectures: [GEMMA_ARCHITECTURE],
  description:
    'Gemma (v1): GQA/MQA, RoPE, GeGLU (tanh GELU), RMSNorm × (1 + w), embeddings × √hidden, tied head',
  activation: 'geglu-tanh',
  zeroCenteredGamma: true,
  embeddingMultiplier: (hiddenSize) => Math.sqrt(hiddenSize),
};
