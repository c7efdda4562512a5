// Configs that cannot describe a model megapatch converts correctly are refused up front, with
// the field named: sizes beyond sane limits (before anything is allocated), activations other than
// SwiGLU's SiLU, and mixture-of-experts routing that cannot work.
import { describe, expect, it } from 'vitest';
import {
  CONFIG_LIMITS,
  type ConvertError,
  makeTransformerConfig,
  moeLayerPattern,
  parseHfConfig,
  type TransformerConfigInput,
} from '../src/index.js';
import { SYNTHETIC_MODELS } from '../src/testing/index.js';
import { convertError, TINY_DENSE } from './helpers.js';

const config = (id: string) => SYNTHETIC_MODELS.find((m) => m.id === id)?.config as Record<string, unknown>;
const parse =
  (id: string, edit: Record<string, unknown>, file = `${id}/config.json`) =>
  () =>
    parseHfConfig({ ...config(id), ...edit }, { file });

describe('size limits', () => {
  it('refuses num_hidden_layers 1e9 in milliseconds, naming file, architecture, field and limit', async () => {
    const t0 = performance.now();
    const e: ConvertError = await convertError(
      parse('llama', { num_hidden_layers: 1e9 }, 'big/config.json'),
      'INVALID_CONFIG',
      'big/config.json: LlamaForCausalLM: field "num_hidden_layers": 1000000000 is larger than 10000, the most megapatch accepts; correct it',
    );
    expect(performance.now() - t0).toBeLessThan(200);
    expect(e.message.split('\n')).toHaveLength(1);
    for (const id of ['qwen3-moe', 'deepseek-v3', 'mixtral']) {
      await convertError(
        parse(id, { num_hidden_layers: 1e9 }),
        'INVALID_CONFIG',
        'field "num_hidden_layers": 1000000000',
      );
    }
  });

  it.each([
    ['llama', 'hidden_size', 2 ** 22 + 1],
    ['llama', 'intermediate_size', 2 ** 30],
    ['llama', 'num_attention_heads', 65_537],
    ['llama', 'num_key_value_heads', 1e6],
    ['qwen3', 'head_dim', 65_537],
    ['llama', 'vocab_size', 2 ** 27 + 1],
    ['llama', 'max_position_embeddings', 2 ** 31],
    ['mixtral', 'num_local_experts', 65_537],
    ['qwen3-moe', 'num_experts', 1e7],
    ['qwen3-moe', 'moe_intermediate_size', 2 ** 23],
    ['qwen2-moe', 'shared_expert_intermediate_size', 2 ** 23],
    ['deepseek-v3', 'n_routed_experts', 1e6],
    ['deepseek-v3', 'kv_lora_rank', 2 ** 23],
    ['deepseek-v3', 'qk_rope_head_dim', 1e5],
    ['deepseek-v3', 'num_nextn_predict_layers', 65],
    ['deepseek-v3', 'first_k_dense_replace', 1e9],
  ] as const)('%s: refuses a huge %s', async (id, field, value) => {
    await convertError(
      parse(id, { [field]: value }),
      'INVALID_CONFIG',
      `field "${field}": ${value} is larger than`,
    );
  });

  it('refuses huge rope scaling and mlp_only_layers values', async () => {
    await convertError(
      parse('llama', {
        rope_scaling: {
          rope_type: 'llama3',
          factor: 8,
          low_freq_factor: 1,
          high_freq_factor: 4,
          original_max_position_embeddings: 2 ** 40,
        },
      }),
      'INVALID_CONFIG',
      'field "rope_scaling.original_max_position_embeddings"',
    );
    await convertError(
      parse('qwen3-moe', { mlp_only_layers: [1e12] }),
      'INVALID_CONFIG',
      'field "mlp_only_layers.0"',
    );
  });

  it('bounds TransformerConfig itself, and every tensor stays a safe number of bytes', async () => {
    const tiny = TINY_DENSE;
    await convertError(
      () => makeTransformerConfig({ ...tiny, numLayers: 10_001 }, 'metadata.json'),
      'INVALID_CONFIG',
      'metadata.json: TransformerConfig.numLayers: 10001 is larger than 10000',
    );
    await convertError(
      () => makeTransformerConfig({ ...tiny, mtpNumLayers: 65 }),
      'INVALID_CONFIG',
      'mtpNumLayers',
    );
    // Every field within its limit, but the fused QKV would hold 2^55 elements.
    await convertError(
      () =>
        makeTransformerConfig({
          ...tiny,
          hiddenSize: 2 ** 22,
          numAttentionHeads: 65_536,
          numQueryGroups: 65_536,
          kvChannels: 65_536,
        }),
      'INVALID_CONFIG',
      'the linear_qkv ((numAttentionHeads + 2 × numQueryGroups) × kvChannels × hiddenSize) tensor would hold',
    );
    const widest = makeTransformerConfig({ ...tiny, hiddenSize: 2 ** 22, vocabSize: 2 ** 27 });
    expect(Number.isSafeInteger(widest.vocabSize * widest.hiddenSize * 8)).toBe(true);
    expect(CONFIG_LIMITS.layers).toBe(10_000);
  });

  it('moeLayerPattern refuses a layer count it would have to allocate', async () => {
    const t0 = performance.now();
    await convertError(() => moeLayerPattern(1e9, {}), 'INVALID_CONFIG', 'numLayers 1000000000');
    expect(performance.now() - t0).toBeLessThan(100);
    expect(moeLayerPattern(4, { firstKDense: 1 })).toEqual(['dense', 'moe', 'moe', 'moe']);
  });
});

describe('activations', () => {
  it.each(['llama', 'qwen2', 'mistral', 'mixtral', 'qwen2-moe', 'qwen3-moe', 'deepseek-v2', 'deepseek-v3'])(
    '%s: refuses hidden_act other than silu, naming the field and SwiGLU',
    async (id) => {
      for (const act of ['gelu', 'gelu_pytorch_tanh', 'relu']) {
        await convertError(
          parse(id, { hidden_act: act }),
          'INVALID_CONFIG',
          `field "hidden_act": "${act}" is not supported: megapatch implements SwiGLU MLPs (hidden_act "silu") only`,
        );
      }
      expect(parse(id, { hidden_act: 'silu' })().transformerConfig.hiddenSize).toBe(64);
      // transformers maps "swish" to the same SiLU; an absent hidden_act defaults to silu.
      expect(parse(id, { hidden_act: 'swish' })().transformerConfig.hiddenSize).toBe(64);
      expect(parse(id, { hidden_act: undefined })().transformerConfig.hiddenSize).toBe(64);
    },
  );
});

describe('mixture-of-experts routing', () => {
  it('DeepSeek: names the config.json fields of impossible group-limited routing', async () => {
    const v3 = (edit: Record<string, unknown>) => parse('deepseek-v3', edit, 'ds/config.json');
    // The synthetic V3: 8 experts in 4 groups, 2 groups per token, 2 experts per token.
    await convertError(
      v3({ n_group: 3 }),
      'INVALID_CONFIG',
      'ds/config.json: DeepseekV3ForCausalLM: field "n_routed_experts": 8 is not a multiple of "n_group" 3',
    );
    await convertError(
      v3({ n_routed_experts: 256, n_group: 7 }),
      'INVALID_CONFIG',
      'field "n_routed_experts": 256 is not a multiple of "n_group" 7',
    );
    await convertError(
      v3({ topk_group: 5 }),
      'INVALID_CONFIG',
      'field "topk_group": 5 is larger than "n_group" 4',
    );
    await convertError(
      v3({ topk_group: 1, num_experts_per_tok: 3 }),
      'INVALID_CONFIG',
      'field "num_experts_per_tok": 3 is larger than "topk_group" × "n_routed_experts" / "n_group" = 2',
    );
    await convertError(
      v3({ n_group: undefined }),
      'INVALID_CONFIG',
      'field "n_group" is required when topk_method is "noaux_tc"',
    );
    await convertError(
      v3({ n_group: undefined, topk_method: undefined }),
      'INVALID_CONFIG',
      'field "n_group" is required when topk_method is "noaux_tc" (the default when topk_method is absent)',
    );
    await convertError(
      parse('deepseek-v2', { topk_method: 'group_limited_greedy', topk_group: null }),
      'INVALID_CONFIG',
      'DeepseekV2ForCausalLM: field "topk_group" is required when topk_method is "group_limited_greedy"',
    );
    await convertError(
      v3({ num_experts_per_tok: null }),
      'INVALID_CONFIG',
      'field "num_experts_per_tok" is required when "n_routed_experts" is set (8)',
    );
    await convertError(
      parse('deepseek-v2', { num_experts_per_tok: 5 }),
      'INVALID_CONFIG',
      'field "num_experts_per_tok": 5 is larger than "n_routed_experts" 4',
    );
    await convertError(v3({ topk_method: 'sinkhorn' }), 'INVALID_CONFIG', 'field "topk_method"');
    // Greedy routing ignores the group fields, as DeepSeek's code does.
    const greedy = parse('deepseek-v2', { n_group: 3, topk_group: 7 })().transformerConfig.moe;
    expect(greedy).toMatchObject({ numGroups: 1, groupTopk: 1 });
    expect(parse('deepseek-v2', { topk_method: 'gready' })().transformerConfig.moe?.numGroups).toBe(1);
  });

  it('Mixtral and Qwen: names the expert-count field a top-k exceeds', async () => {
    await convertError(
      parse('mixtral', { num_experts_per_tok: 9 }),
      'INVALID_CONFIG',
      'MixtralForCausalLM: field "num_experts_per_tok": 9 is larger than "num_local_experts" 4',
    );
    await convertError(
      parse('qwen3-moe', { num_experts_per_tok: 9 }),
      'INVALID_CONFIG',
      'field "num_experts_per_tok": 9 is larger than "num_experts" 4',
    );
    const { num_experts: n, ...t5 } = config('qwen3-moe');
    await convertError(
      () => parseHfConfig({ ...t5, num_local_experts: n, num_experts_per_tok: 9 }),
      'INVALID_CONFIG',
      '"num_local_experts" 4',
    );
  });

  it('TransformerConfig refuses inconsistent MoE settings however they were made', async () => {
    const dense: TransformerConfigInput = { ...TINY_DENSE, numLayers: 4 };
    const moe = (m: Record<string, unknown>) => () =>
      makeTransformerConfig({
        ...dense,
        moe: {
          numExperts: 256,
          routerTopk: 8,
          moeFfnHiddenSize: 4,
          layerPattern: moeLayerPattern(4, {}),
          ...m,
        },
      });
    await convertError(
      moe({ numGroups: 7 }),
      'INVALID_CONFIG',
      'moe.numGroups: numExperts 256 is not a multiple of numGroups 7',
    );
    await convertError(
      moe({ numGroups: 8, groupTopk: 9 }),
      'INVALID_CONFIG',
      'moe.groupTopk: 9 is larger than numGroups 8',
    );
    await convertError(
      moe({ numGroups: 64, groupTopk: 1 }),
      'INVALID_CONFIG',
      'moe.routerTopk: 8 is larger than groupTopk × numExperts / numGroups = 4',
    );
    await convertError(
      moe({ routerTopk: 300 }),
      'INVALID_CONFIG',
      'moe.routerTopk: 300 is larger than numExperts 256',
    );
    await convertError(moe({ sharedExpertGate: true }), 'INVALID_CONFIG', 'moe.sharedExpertGate');
    await convertError(
      () =>
        makeTransformerConfig({
          ...dense,
          numLayers: 10_000,
          moe: {
            numExperts: 65_536,
            routerTopk: 8,
            moeFfnHiddenSize: 4,
            layerPattern: moeLayerPattern(10_000, {}),
          },
        }),
      'INVALID_CONFIG',
      'numLayers 10000 × numExperts 65536 = 655360000 expert MLPs, more than 1048576',
    );
    expect(moe({ numGroups: 8, groupTopk: 4 })().moe).toMatchObject({
      numGroups: 8,
      groupTopk: 4,
      routerTopk: 8,
    });
  });
});
