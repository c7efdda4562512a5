import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { hasShared, sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import {
  type ArchitectureSpec,
  ConvertError,
  expectedHfTensorNames,
  findWeightRules,
  getArchitectureSpec,
  listArchitectures,
  makeTransformerConfig,
  parameterCount,
  parseHfConfig,
  registerArchitecture,
  rotaryDim,
  type WeightRule,
} from '../src/index.js';

// The real configs in the shared data folder (../shared beside the checkout); the suites that read
// them skip, with a one-line reason, when it is absent.
const CONFIGS = sharedPath('data/configs');
const skipShared = skipWithoutShared(import.meta.url);
const listShared = (dir: string) => (hasShared ? readdirSync(dir) : []);
const hfFiles = listShared(CONFIGS).filter((f) => f.endsWith('.json'));

function expectConvertError(fn: () => unknown, code: string, ...fragments: string[]): ConvertError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ConvertError);
    const err = e as ConvertError;
    expect(err.code).toBe(code);
    for (const f of fragments) expect(err.message).toContain(f);
    return err;
  }
  throw new Error('expected a ConvertError');
}

describe('registry', () => {
  it('lists the ten built-in architectures', () => {
    expect(listArchitectures()).toEqual(
      expect.arrayContaining([
        'LlamaForCausalLM',
        'MistralForCausalLM',
        'Qwen2ForCausalLM',
        'Qwen3ForCausalLM',
        'Qwen2MoeForCausalLM',
        'Qwen3MoeForCausalLM',
        'MixtralForCausalLM',
        'DeepseekV2ForCausalLM',
        'DeepseekV3ForCausalLM',
        'Phi3ForCausalLM',
      ]),
    );
  });

  it('rejects an unknown architecture, listing the known ones', () => {
    expectConvertError(
      () => getArchitectureSpec('GPT2LMHeadModel'),
      'UNKNOWN_ARCHITECTURE',
      'GPT2LMHeadModel',
      'LlamaForCausalLM',
    );
    expectConvertError(
      () => parseHfConfig({ architectures: ['FalconForCausalLM'] }, { file: 'x/config.json' }),
      'UNKNOWN_ARCHITECTURE',
      'FalconForCausalLM',
      'Qwen3ForCausalLM',
      'x/config.json',
    );
  });

  it('registers a plugin spec exactly like the built-ins, and refuses a silent duplicate', () => {
    const ToySchema = z.object({ width: z.number().int().positive(), depth: z.number().int().positive() });
    const toy: ArchitectureSpec<z.infer<typeof ToySchema>> = {
      architectures: ['ToyForCausalLM'],
      configSchema: ToySchema,
      toTransformerConfig: (hf) =>
        makeTransformerConfig({
          numLayers: hf.depth,
          hiddenSize: hf.width,
          ffnHiddenSize: 4 * hf.width,
          numAttentionHeads: 1,
          numQueryGroups: 1,
          kvChannels: hf.width,
          layernormEpsilon: 1e-5,
          rotaryBase: 10000,
          untieEmbeddingsAndOutputWeights: false,
          vocabSize: 256,
          maxPositionEmbeddings: 64,
        }),
      weightRules: [
        { hf: 'toy.{layer}.w', megatron: 'decoder.layers.{layer}.w', op: { type: 'split', dim: 0 } },
      ],
      expectedHfTensors: (cfg) =>
        Array.from({ length: cfg.numLayers }, (_, i) => ({
          name: `toy.${i}.w`,
          shape: [cfg.hiddenSize, cfg.hiddenSize],
        })),
    };
    registerArchitecture(toy);
    expect(listArchitectures()).toContain('ToyForCausalLM');
    const { spec, transformerConfig } = parseHfConfig({
      architectures: ['ToyForCausalLM'],
      width: 8,
      depth: 2,
    });
    expect(spec).toBe(toy);
    expect(transformerConfig.ffnHiddenSize).toBe(32);
    expect(expectedHfTensorNames(spec, transformerConfig)).toEqual(['toy.0.w', 'toy.1.w']);
    expectConvertError(() => registerArchitecture(toy), 'INVALID_ARGUMENT', 'already registered');
    registerArchitecture(toy, { replace: true });
    expectConvertError(
      () => parseHfConfig({ architectures: ['ToyForCausalLM'], width: 8 }),
      'INVALID_CONFIG',
      '"depth"',
    );
  });
});

describe.skipIf(skipShared)('parseHfConfig on the real configs', () => {
  it.each(hfFiles)('%s parses to a TransformerConfig', (f) => {
    const { spec, transformerConfig: c } = parseHfConfig(join(CONFIGS, f));
    expect(spec.architectures.length).toBeGreaterThan(0);
    expect(c.hiddenSize).toBeGreaterThan(0);
  });

  it('reads Llama-3.1 rope scaling and GQA', () => {
    const c = parseHfConfig(join(CONFIGS, 'Llama-3.1-8B.json')).transformerConfig;
    expect(c.ropeScaling).toEqual({
      type: 'llama3',
      factor: 8,
      lowFreqFactor: 1,
      highFreqFactor: 4,
      originalMaxPositionEmbeddings: 8192,
    });
    expect([c.numQueryGroups, c.kvChannels, c.rotaryBase, c.untieEmbeddingsAndOutputWeights]).toEqual([
      8,
      128,
      500000,
      true,
    ]);
  });

  it('reads Qwen3 head_dim independent of hidden/heads, qk norm, tied embeddings', () => {
    const c = parseHfConfig(join(CONFIGS, 'Qwen3-0.6B.json')).transformerConfig;
    expect([
      c.kvChannels,
      c.hiddenSize / c.numAttentionHeads,
      c.qkLayernorm,
      c.untieEmbeddingsAndOutputWeights,
    ]).toEqual([128, 64, true, false]);
    expect(parseHfConfig(join(CONFIGS, 'Qwen2.5-3B.json')).transformerConfig.addQkvBias).toBe(true);
  });

  it('reads DeepSeek-V3 MLA, MoE routing, yarn and MTP', () => {
    const c = parseHfConfig(join(CONFIGS, 'DeepSeek-V3.json')).transformerConfig;
    expect(c.mla).toEqual({
      qLoraRank: 1536,
      kvLoraRank: 512,
      qkNopeHeadDim: 128,
      qkRopeHeadDim: 64,
      vHeadDim: 128,
    });
    expect(c.moe).toMatchObject({
      numExperts: 256,
      routerTopk: 8,
      sharedExpertIntermediateSize: 2048,
      scoreFunction: 'sigmoid',
      expertBias: true,
      numGroups: 8,
      groupTopk: 4,
      routedScalingFactor: 2.5,
      normTopkProb: true,
    });
    expect(c.moe?.layerPattern.slice(0, 4)).toEqual(['dense', 'dense', 'dense', 'moe']);
    expect(c.ropeScaling).toMatchObject({
      type: 'yarn',
      factor: 40,
      originalMaxPositionEmbeddings: 4096,
      betaFast: 32,
    });
    expect(c.mtpNumLayers).toBe(1);
  });

  it('reads Moonlight as DeepseekV3 without q LoRA', () => {
    const c = parseHfConfig(
      join(CONFIGS, 'Moonlight-16B-A3B-Instruct.thirdparty-copy.json'),
    ).transformerConfig;
    expect(c.mla?.qLoraRank).toBeNull();
    expect(c.moe).toMatchObject({
      numExperts: 64,
      routerTopk: 6,
      sharedExpertIntermediateSize: 2816,
      routedScalingFactor: 2.446,
    });
    expect(c.moe?.layerPattern.filter((k) => k === 'dense')).toHaveLength(1);
    expect(c.mtpNumLayers).toBe(0);
  });

  it('reads Qwen1.5-MoE shared expert and its gate', () => {
    const c = parseHfConfig(join(CONFIGS, 'Qwen1.5-MoE-A2.7B.finetune-resave.json')).transformerConfig;
    expect(c.moe).toMatchObject({
      numExperts: 60,
      routerTopk: 4,
      sharedExpertIntermediateSize: 5632,
      sharedExpertGate: true,
      normTopkProb: false,
    });
  });

  it.each(listShared(join(CONFIGS, 'deepseek-native')))(
    'rejects DeepSeek native inference config %s with a clear error',
    (f) => {
      const path = join(CONFIGS, 'deepseek-native', f);
      expectConvertError(
        () => parseHfConfig(path),
        'INVALID_CONFIG',
        'DeepSeek native inference config',
        'architectures',
        path,
      );
    },
  );
});

describe('config errors', () => {
  const base = () => ({
    architectures: ['LlamaForCausalLM'],
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    rms_norm_eps: 1e-5,
    vocab_size: 100,
    max_position_embeddings: 128,
  });

  it('accepts a minimal config', () => {
    expect(parseHfConfig(base()).transformerConfig.numQueryGroups).toBe(4);
  });

  it('names the missing field and the file', () => {
    const { hidden_size: _, ...cfg } = base();
    expectConvertError(
      () => parseHfConfig(cfg, { file: 'm/config.json' }),
      'INVALID_CONFIG',
      '"hidden_size"',
      'm/config.json',
      'LlamaForCausalLM',
    );
  });

  it('names a wrongly typed field', () => {
    expectConvertError(
      () => parseHfConfig({ ...base(), num_hidden_layers: '2' }),
      'INVALID_CONFIG',
      '"num_hidden_layers"',
    );
  });

  it('rejects an unsupported rope type and incomplete rope scaling', () => {
    expectConvertError(
      () =>
        parseHfConfig({ ...base(), rope_scaling: { rope_type: 'dynamic', factor: 2 } }, { file: 'c.json' }),
      'INVALID_CONFIG',
      'rope_scaling.rope_type',
      'c.json',
    );
    expectConvertError(
      () => parseHfConfig({ ...base(), rope_scaling: { rope_type: 'llama3', factor: 8 } }),
      'INVALID_CONFIG',
      'low_freq_factor',
    );
    expect(
      parseHfConfig({ ...base(), rope_scaling: { type: 'linear', factor: 2 } }).transformerConfig.ropeScaling,
    ).toEqual({ type: 'linear', factor: 2 });
  });

  it('rejects attention_bias on Llama (o_proj bias is not representable)', () => {
    expectConvertError(
      () => parseHfConfig({ ...base(), attention_bias: true }),
      'INVALID_CONFIG',
      '"attention_bias"',
    );
  });

  it('rejects a config without architectures, JSON that is not an object, and a missing file', () => {
    expectConvertError(() => parseHfConfig({ hidden_size: 1 }), 'INVALID_CONFIG', 'architectures');
    expectConvertError(() => parseHfConfig([] as object), 'INVALID_CONFIG', 'JSON object');
    expectConvertError(() => parseHfConfig('/nonexistent/config.json'), 'MISSING_FILE', '/nonexistent');
  });

  it('rejects inconsistent head counts', () => {
    expectConvertError(
      () => parseHfConfig({ ...base(), num_key_value_heads: 3 }),
      'INVALID_CONFIG',
      'numQueryGroups',
    );
  });
});

describe.skipIf(skipShared)('weight rules', () => {
  function check(spec: ArchitectureSpec, file: string) {
    const { transformerConfig: cfg } = parseHfConfig(join(CONFIGS, file));
    const names = expectedHfTensorNames(spec, cfg);
    expect(new Set(names).size).toBe(names.length);
    const targets = new Map<string, WeightRule[]>();
    for (const n of names) {
      const m = findWeightRules(spec.weightRules, n, cfg);
      if (m.length !== 1) throw new Error(`${file}: ${n} matches ${m.length} rules`);
      const list = targets.get(m[0].megatron) ?? [];
      list.push(m[0].rule);
      targets.set(m[0].megatron, list);
    }
    // Fused targets receive all their parts; every other Megatron name receives exactly one tensor.
    for (const [name, rules] of targets) {
      const op = rules[0].op;
      const inner = op.type === 'expert' ? op.inner : op;
      if (inner.type === 'qkv')
        expect(rules.map((r) => (r.op as { part: string }).part).sort(), name).toEqual(['k', 'q', 'v']);
      else if (inner.type === 'gate_up') expect(rules).toHaveLength(2);
      else
        expect(
          rules.filter((r) => r.op.type !== 'duplicate'),
          name,
        ).toHaveLength(1);
    }
    return { names, targets };
  }

  it.each(hfFiles)('%s: every HF tensor matches exactly one rule', (f) => {
    const { spec } = parseHfConfig(join(CONFIGS, f));
    check(spec, f);
  });

  it('maps Llama names to Megatron-Core TE names', () => {
    const { targets } = check(getArchitectureSpec('LlamaForCausalLM'), 'Llama-3.1-8B.json');
    for (const n of [
      'embedding.word_embeddings.weight',
      'decoder.layers.0.self_attention.linear_qkv.weight',
      'decoder.layers.0.self_attention.linear_qkv.layer_norm_weight',
      'decoder.layers.31.self_attention.linear_proj.weight',
      'decoder.layers.0.mlp.linear_fc1.weight',
      'decoder.layers.0.mlp.linear_fc1.layer_norm_weight',
      'decoder.layers.0.mlp.linear_fc2.weight',
      'decoder.final_layernorm.weight',
      'output_layer.weight',
    ])
      expect(targets.has(n), n).toBe(true);
    // Per layer: qkv, its fused norm, proj, fc1, its fused norm, fc2.
    expect(targets.size).toBe(3 + 32 * 6);
  });

  it('maps DeepSeek-V3 MoE, MLA and MTP names', () => {
    const spec = getArchitectureSpec('DeepseekV3ForCausalLM');
    const { names, targets } = check(spec, 'DeepSeek-V3.json');
    for (const n of [
      'decoder.layers.0.mlp.linear_fc1.layer_norm_weight',
      'decoder.layers.3.pre_mlp_layernorm.weight',
      'decoder.layers.3.mlp.router.weight',
      'decoder.layers.3.mlp.router.expert_bias',
      'decoder.layers.3.mlp.experts.local_experts.255.linear_fc1.weight',
      'decoder.layers.3.mlp.shared_experts.linear_fc2.weight',
      'decoder.layers.5.self_attention.linear_q_down_proj.weight',
      'decoder.layers.5.self_attention.linear_kv_up_proj.layer_norm_weight',
      'mtp.layers.0.eh_proj.weight',
      'mtp.layers.0.final_layernorm.weight',
      'mtp.layers.0.transformer_layer.mlp.experts.local_experts.0.linear_fc2.weight',
    ])
      expect(targets.has(n), n).toBe(true);
    expect(names).toContain('model.layers.61.shared_head.head.weight');
    const dup = findWeightRules(
      spec.weightRules,
      'model.layers.61.embed_tokens.weight',
      parseHfConfig(join(CONFIGS, 'DeepSeek-V3.json')).transformerConfig,
    );
    expect(dup.map((d) => [d.megatron, d.rule.op.type])).toEqual([
      ['embedding.word_embeddings.weight', 'duplicate'],
    ]);
  });

  it('does not match out-of-range layers or experts', () => {
    const { spec, transformerConfig: cfg } = parseHfConfig(join(CONFIGS, 'Mixtral-8x7B-v0.1.json'));
    expect(findWeightRules(spec.weightRules, 'model.layers.32.input_layernorm.weight', cfg)).toHaveLength(0);
    expect(
      findWeightRules(spec.weightRules, 'model.layers.0.block_sparse_moe.experts.8.w1.weight', cfg),
    ).toHaveLength(0);
    expect(findWeightRules(spec.weightRules, 'model.layers.01.input_layernorm.weight', cfg)).toHaveLength(0);
    const [m] = findWeightRules(spec.weightRules, 'model.layers.7.block_sparse_moe.experts.3.w3.weight', cfg);
    expect(m.megatron).toBe('decoder.layers.7.mlp.experts.local_experts.3.linear_fc1.weight');
    expect(m.rule.op).toEqual({ type: 'expert', inner: { type: 'gate_up', part: 'up' } });
  });
});

describe.skipIf(skipShared)('expected HF tensor shapes', () => {
  const numel = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

  function shapes(file: string): Map<string, number[]> {
    const { spec, transformerConfig: cfg } = parseHfConfig(join(CONFIGS, file));
    return new Map(spec.expectedHfTensors(cfg).map((t) => [t.name, t.shape]));
  }

  it.each(hfFiles)('%s: numel over the expected tensors equals parameterCount().totalWithMtp', (f) => {
    const { spec, transformerConfig: cfg } = parseHfConfig(join(CONFIGS, f));
    const tensors = spec.expectedHfTensors(cfg);
    const bad = tensors.filter(
      (t) => t.shape.length === 0 || !t.shape.every((d) => Number.isInteger(d) && d > 0),
    );
    expect(bad).toEqual([]);
    expect(tensors.reduce((a, t) => a + numel(t.shape), 0)).toBe(parameterCount(cfg).totalWithMtp);
  });

  it('gives Llama-3.1-8B its published 8,030,261,248 parameters', () => {
    const s = shapes('Llama-3.1-8B.json');
    expect(s.get('model.layers.0.self_attn.q_proj.weight')).toEqual([4096, 4096]);
    expect(s.get('model.layers.0.self_attn.k_proj.weight')).toEqual([1024, 4096]);
    expect(s.get('model.layers.0.mlp.down_proj.weight')).toEqual([4096, 14336]);
    expect(s.get('lm_head.weight')).toEqual([128256, 4096]);
    expect([...s.values()].reduce((a, sh) => a + numel(sh), 0)).toBe(8_030_261_248);
  });

  it('uses Qwen3 head_dim for q/k/v/o and the per-head q/k norms; tied models have no lm_head', () => {
    const s = shapes('Qwen3-0.6B.json');
    expect(s.get('model.layers.0.self_attn.q_proj.weight')).toEqual([2048, 1024]);
    expect(s.get('model.layers.0.self_attn.k_proj.weight')).toEqual([1024, 1024]);
    expect(s.get('model.layers.0.self_attn.o_proj.weight')).toEqual([1024, 2048]);
    expect(s.get('model.layers.0.self_attn.q_norm.weight')).toEqual([128]);
    expect(s.has('lm_head.weight')).toBe(false);
    const q = shapes('Qwen2.5-7B-Instruct.json');
    expect(q.get('model.layers.3.self_attn.q_proj.bias')).toEqual([3584]);
    expect(q.get('model.layers.3.self_attn.v_proj.bias')).toEqual([512]);
  });

  it('shapes the MoE routers, experts and the Qwen shared expert', () => {
    const m = shapes('Mixtral-8x7B-v0.1.json');
    expect(m.get('model.layers.0.block_sparse_moe.gate.weight')).toEqual([8, 4096]);
    expect(m.get('model.layers.0.block_sparse_moe.experts.7.w1.weight')).toEqual([14336, 4096]);
    expect(m.get('model.layers.0.block_sparse_moe.experts.7.w2.weight')).toEqual([4096, 14336]);
    const q = shapes('Qwen1.5-MoE-A2.7B.finetune-resave.json');
    expect(q.get('model.layers.0.mlp.gate.weight')).toEqual([60, 2048]);
    expect(q.get('model.layers.0.mlp.experts.59.up_proj.weight')).toEqual([1408, 2048]);
    expect(q.get('model.layers.0.mlp.shared_expert.gate_proj.weight')).toEqual([5632, 2048]);
    expect(q.get('model.layers.0.mlp.shared_expert_gate.weight')).toEqual([1, 2048]);
    const q3 = shapes('Qwen3-30B-A3B.json');
    expect(q3.get('model.layers.47.mlp.experts.127.down_proj.weight')).toEqual([2048, 768]);
    expect(q3.get('model.layers.0.self_attn.q_proj.weight')).toEqual([4096, 2048]);
  });

  it('shapes DeepSeek-V3 MLA, MoE and MTP tensors as in the published checkpoint', () => {
    const s = shapes('DeepSeek-V3.json');
    const a = 'model.layers.5.self_attn.';
    expect(s.get(`${a}q_a_proj.weight`)).toEqual([1536, 7168]);
    expect(s.get(`${a}q_a_layernorm.weight`)).toEqual([1536]);
    expect(s.get(`${a}q_b_proj.weight`)).toEqual([24576, 1536]);
    expect(s.get(`${a}kv_a_proj_with_mqa.weight`)).toEqual([576, 7168]);
    expect(s.get(`${a}kv_a_layernorm.weight`)).toEqual([512]);
    expect(s.get(`${a}kv_b_proj.weight`)).toEqual([32768, 512]);
    expect(s.get(`${a}o_proj.weight`)).toEqual([7168, 16384]);
    expect(s.get('model.layers.0.mlp.gate_proj.weight')).toEqual([18432, 7168]);
    expect(s.get('model.layers.3.mlp.gate.weight')).toEqual([256, 7168]);
    expect(s.get('model.layers.3.mlp.gate.e_score_correction_bias')).toEqual([256]);
    expect(s.get('model.layers.3.mlp.experts.255.down_proj.weight')).toEqual([7168, 2048]);
    expect(s.get('model.layers.3.mlp.shared_experts.up_proj.weight')).toEqual([2048, 7168]);
    expect(s.get('model.layers.61.eh_proj.weight')).toEqual([7168, 14336]);
    expect(s.get('model.layers.61.enorm.weight')).toEqual([7168]);
    expect(s.get('model.layers.61.embed_tokens.weight')).toEqual([129280, 7168]);
    expect(s.get('model.layers.61.shared_head.head.weight')).toEqual([129280, 7168]);
    expect(s.get('model.layers.61.mlp.experts.0.gate_proj.weight')).toEqual([2048, 7168]);
    expect(s.has('model.layers.62.enorm.weight')).toBe(false);
    const moon = shapes('Moonlight-16B-A3B-Instruct.thirdparty-copy.json');
    expect(moon.get('model.layers.1.self_attn.q_proj.weight')).toEqual([3072, 2048]);
    expect(moon.has('model.layers.1.self_attn.q_a_proj.weight')).toBe(false);
    expect(moon.get('model.layers.1.mlp.shared_experts.gate_proj.weight')).toEqual([2816, 2048]);
  });
});

// Published config.json values of microsoft/Phi-3-mini-4k-instruct and microsoft/phi-4 (the fields
// the spec reads, plus those it must ignore).
const PHI3_MINI_4K = {
  architectures: ['Phi3ForCausalLM'],
  attention_dropout: 0.0,
  bos_token_id: 1,
  embd_pdrop: 0.0,
  eos_token_id: 32000,
  hidden_act: 'silu',
  hidden_size: 3072,
  initializer_range: 0.02,
  intermediate_size: 8192,
  max_position_embeddings: 4096,
  model_type: 'phi3',
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 32,
  original_max_position_embeddings: 4096,
  pad_token_id: 32000,
  resid_pdrop: 0.0,
  rms_norm_eps: 1e-5,
  rope_scaling: null,
  rope_theta: 10000.0,
  sliding_window: 2047,
  tie_word_embeddings: false,
  torch_dtype: 'bfloat16',
  attention_bias: false,
  vocab_size: 32064,
};
const PHI4 = {
  ...PHI3_MINI_4K,
  bos_token_id: 100257,
  eos_token_id: 100265,
  pad_token_id: 100349,
  hidden_size: 5120,
  intermediate_size: 17920,
  max_position_embeddings: 16384,
  original_max_position_embeddings: 16384,
  num_attention_heads: 40,
  num_hidden_layers: 40,
  num_key_value_heads: 10,
  rope_theta: 250000,
  sliding_window: null,
  vocab_size: 100352,
};

describe('Phi3ForCausalLM (Phi-3, Phi-3.5, Phi-4): packed qkv_proj and gate_up_proj, longrope', () => {
  it('reads Phi-3-mini-4k and Phi-4: their sizes, window and parameter counts', () => {
    const mini = parseHfConfig(PHI3_MINI_4K).transformerConfig;
    expect([
      mini.numLayers,
      mini.hiddenSize,
      mini.numQueryGroups,
      mini.kvChannels,
      mini.slidingWindow,
    ]).toEqual([32, 3072, 32, 96, 2047]);
    // Phi-3-mini: 3.82e9 parameters (the model card's 3.8B)
    expect(parameterCount(mini).total).toBe(3_821_079_552);
    const phi4 = parseHfConfig(PHI4).transformerConfig;
    expect([phi4.numQueryGroups, phi4.kvChannels, phi4.rotaryBase, phi4.slidingWindow]).toEqual([
      10,
      128,
      250000,
      null,
    ]);
    // Phi-4: 14.66e9 parameters (the model card's 14B)
    expect(parameterCount(phi4).total).toBe(14_659_507_200);
    expect(parseHfConfig({ ...PHI4, sliding_window: undefined }).transformerConfig.slidingWindow).toBeNull();
  });

  it('maps each packed tensor to one Megatron tensor, [q; k; v] regrouped per query group', () => {
    const { spec, transformerConfig: cfg } = parseHfConfig(PHI4);
    const names = expectedHfTensorNames(spec, cfg).filter((n) => n.startsWith('model.layers.0.'));
    expect(names).toEqual([
      'model.layers.0.input_layernorm.weight',
      'model.layers.0.self_attn.qkv_proj.weight',
      'model.layers.0.self_attn.o_proj.weight',
      'model.layers.0.post_attention_layernorm.weight',
      'model.layers.0.mlp.gate_up_proj.weight',
      'model.layers.0.mlp.down_proj.weight',
    ]);
    const qkv = spec.expectedHfTensors(cfg).find((t) => t.name.endsWith('0.self_attn.qkv_proj.weight'));
    expect(qkv?.shape).toEqual([(40 + 2 * 10) * 128, 5120]);
    expect(findWeightRules(spec.weightRules, 'model.layers.7.mlp.gate_up_proj.weight', cfg)).toEqual([
      expect.objectContaining({ megatron: 'decoder.layers.7.mlp.linear_fc1.weight' }),
    ]);
  });

  it("reads longrope (the 128k models), transformers' older names for it included", () => {
    // Phi-3.5-mini / Phi-3-mini-128k: 131,072 positions over an original 4,096, 48 factors a list
    const short_factor = Array.from({ length: 48 }, (_, k) => 1 + k / 100);
    const long_factor = Array.from({ length: 48 }, (_, k) => 1 + k);
    const mini128k = { ...PHI3_MINI_4K, max_position_embeddings: 131072, sliding_window: 262144 };
    for (const type of ['longrope', 'su', 'yarn']) {
      const c = parseHfConfig({
        ...mini128k,
        rope_scaling: { type, short_factor, long_factor },
      }).transformerConfig;
      expect(c.ropeScaling).toEqual({
        type: 'longrope',
        shortFactor: short_factor,
        longFactor: long_factor,
        originalMaxPositionEmbeddings: 4096,
        // √(1 + ln 32 / ln 4096), transformers' default
        attentionFactor: Math.sqrt(1 + Math.log(32) / Math.log(4096)),
      });
      expect((c.ropeScaling as { attentionFactor: number }).attentionFactor).toBeCloseTo(
        1.1902380714238083,
        15,
      );
    }
    const given = parseHfConfig({
      ...mini128k,
      rope_scaling: { type: 'longrope', short_factor, long_factor, attention_factor: 1.25 },
    }).transformerConfig.ropeScaling;
    expect(given).toMatchObject({ attentionFactor: 1.25 });
    expectConvertError(
      () =>
        parseHfConfig({ ...mini128k, rope_scaling: { type: 'longrope', short_factor, long_factor: [1, 2] } }),
      'INVALID_CONFIG',
      'field "rope_scaling.long_factor" must list 48 numbers (one per rotating pair of a head\'s channels), got 2',
    );
    expectConvertError(
      () => parseHfConfig({ ...mini128k, rope_scaling: { type: 'dynamic', factor: 2 } }),
      'UNSUPPORTED',
      `field "rope_scaling": type "dynamic" is not one of Phi-3's (longrope)`,
    );
  });

  it('reads Phi-4-mini: 96 of 128 channels rotating (partial_rotary_factor 0.75), longrope on them', () => {
    // microsoft/Phi-4-mini-instruct's config.json (its factor lists' values stand in: 48 each)
    const short_factor = Array.from({ length: 48 }, (_, k) => 1 + k / 50);
    const long_factor = Array.from({ length: 48 }, (_, k) => 1 + k / 2);
    const mini = {
      ...PHI3_MINI_4K,
      bos_token_id: 199999,
      eos_token_id: 199999,
      pad_token_id: 199999,
      num_attention_heads: 24,
      num_key_value_heads: 8,
      max_position_embeddings: 131072,
      original_max_position_embeddings: 4096,
      partial_rotary_factor: 0.75,
      rope_scaling: { type: 'longrope', short_factor, long_factor },
      sliding_window: 262144,
      tie_word_embeddings: true,
      vocab_size: 200064,
      full_attn_mod: 1,
      interpolate_factor: 1,
      lm_head_bias: false,
      mlp_bias: false,
    };
    const c = parseHfConfig(mini).transformerConfig;
    expect([c.kvChannels, c.rotaryPercent, rotaryDim(c), c.numQueryGroups]).toEqual([128, 0.75, 96, 8]);
    expect(c.ropeScaling).toMatchObject({ type: 'longrope', shortFactor: short_factor });
    expect(c.untieEmbeddingsAndOutputWeights).toBe(false);
    // 3.84e9 parameters (the model card's 3.8B): the tied 200,064-row embedding is 614.6M of them
    expect(parameterCount(c).total).toBe(3_836_021_760);
    // one longrope factor per rotating pair: 48, not the 64 of whole heads
    expectConvertError(
      () =>
        parseHfConfig({
          ...mini,
          rope_scaling: { type: 'longrope', short_factor: [...short_factor, 1, 1], long_factor },
        }),
      'INVALID_CONFIG',
      'field "rope_scaling.short_factor" must list 48 numbers (one per rotating pair of a head\'s channels), got 50',
    );
    // transformers 5 keeps it among the rotary settings
    const tf5 = parseHfConfig({
      ...PHI4,
      rope_theta: undefined,
      rope_parameters: { rope_type: 'default', rope_theta: 250000, partial_rotary_factor: 0.5 },
    }).transformerConfig;
    expect([tf5.rotaryBase, tf5.rotaryPercent, rotaryDim(tf5)]).toEqual([250000, 0.5, 64]);
    expect(parseHfConfig(PHI4).transformerConfig.rotaryPercent).toBe(1);
    // a factor leaving an odd number of channels cannot rotate in pairs (int(128 · 0.3) = 38 can)
    expectConvertError(
      () => parseHfConfig({ ...PHI4, partial_rotary_factor: 0.34 }),
      'INVALID_CONFIG',
      'field "partial_rotary_factor": 0.34 rotates 43 channels',
    );
  });
});
