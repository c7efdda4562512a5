// The converter half of Gemma (v1, HF `GemmaForCausalLM`): Llama's tensor names and weight rules
// (the norm weights are stored as HF stores them, centred on 0), with Gemma's own config schema.
import {
  type ArchitectureSpec,
  CONFIG_LIMITS,
  denseRules,
  denseTensors,
  HfLlamaStyleConfig,
  limitedInt,
  llamaStyleBase,
  makeTransformerConfig,
  ropeScalingFromHf,
} from '@megapatch/convert';
import { z } from 'zod';

/** The HF architecture name this plugin adds. */
export const GEMMA_ARCHITECTURE = 'GemmaForCausalLM';

const TANH_GELU = 'gelu_pytorch_tanh';

/**
 * An activation field of a Gemma config. The family computes GELU with the tanh approximation,
 * the function Gemma was trained with. Gemma 1.0's released configs say `hidden_act: "gelu"`;
 * transformers 4.38–4.47 ignored that field and used `hidden_activation` (default tanh GELU), so
 * `legacyGelu` reads a "gelu" in `hidden_act` as that same tanh GELU. Anything else would convert
 * into a model that computes something else, so it is refused.
 */
function activationField(legacyGelu: boolean) {
  return z.string().refine((v) => v === TANH_GELU || (legacyGelu && v === 'gelu'), {
    error: (iss) =>
      `${JSON.stringify(iss.input)} is not supported: the Gemma family computes GeGLU with the tanh ` +
      `approximation of GELU ("${TANH_GELU}"${legacyGelu ? ', or Gemma 1.0\'s legacy "gelu"' : ''})`,
  });
}

/** Fields of a Gemma (v1) HF config.json; the defaults are transformers' GemmaConfig defaults. */
export const HfGemmaConfig = HfLlamaStyleConfig.omit({
  hidden_act: true,
  sliding_window: true,
  use_sliding_window: true,
  max_window_layers: true,
}).extend({
  hidden_act: activationField(true).optional(),
  hidden_activation: activationField(false).nullish(),
  // GemmaConfig's default (16) fits only Gemma 7B; every released config writes the field.
  num_key_value_heads: limitedInt(CONFIG_LIMITS.heads),
  // Gemma 7B: 16 heads of 256 in a hidden size of 3072, so head_dim is not hidden / heads.
  head_dim: limitedInt(CONFIG_LIMITS.headDim).default(256),
  rms_norm_eps: z.number().positive().default(1e-6),
  tie_word_embeddings: z.boolean().default(true),
  max_position_embeddings: limitedInt(CONFIG_LIMITS.positions).default(8192),
});
/** Parsed Gemma HF config. */
export type HfGemmaConfig = z.infer<typeof HfGemmaConfig>;

/** Gemma (v1): a Llama-style dense decoder as far as the converter is concerned. */
export const gemmaSpec: ArchitectureSpec<HfGemmaConfig> = {
  architectures: [GEMMA_ARCHITECTURE],
  configSchema: HfGemmaConfig,
  toTransformerConfig(hf) {
    return makeTransformerConfig({
      // The activation is the family's (GeGLU-tanh), checked by the schema; the base reads the rest.
      ...llamaStyleBase({ ...hf, hidden_act: undefined }, ropeScalingFromHf(hf.rope_scaling)),
      addQkvBias: false,
      qkLayernorm: false,
      slidingWindow: null,
    });
  },
  weightRules: denseRules,
  expectedHfTensors: denseTensors,
};
