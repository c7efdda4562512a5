import { join } from 'node:path';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';
import {
  ConvertError,
  makeTransformerConfig,
  moeLayerPattern,
  paddedVocabSize,
  parameterCount,
  parseHfConfig,
  rotaryDim,
  TransformerConfig,
} from '../src/index.js';
import { expectError, TINY_DENSE } from './helpers.js';

// The real configs in the shared data folder (../shared beside the checkout); the tests that read
// them skip, with a one-line reason, when it is absent.
const CONFIGS = sharedPath('data/configs');
const skipShared = skipWithoutShared(import.meta.url);
const count = (f: string) => parameterCount(parseHfConfig(join(CONFIGS, f)).transformerConfig);
const B = 1e9;

const tiny = TINY_DENSE;

describe('TransformerConfig', () => {
  it('applies Megatron defaults', () => {
    const c = makeTransformerConfig(tiny);
    expect(c).toMatchObject({
      normalization: 'RMSNorm',
      addQkvBias: false,
      qkLayernorm: false,
      ropeScaling: { type: 'none' },
      makeVocabSizeDivisibleBy: 128,
      moe: null,
      mla: null,
      mtpNumLayers: 0,
    });
    expect(TransformerConfig.parse(c)).toEqual(c);
  });

  it('rejects inconsistent configs with INVALID_CONFIG naming the field', () => {
    const bad = (over: object, field: string) => {
      try {
        makeTransformerConfig({ ...tiny, ...over });
      } catch (e) {
        expect(e).toBeInstanceOf(ConvertError);
        expect((e as ConvertError).code).toBe('INVALID_CONFIG');
        expect((e as ConvertError).message).toContain(field);
        return;
      }
      throw new Error('expected an error');
    };
    bad({ numQueryGroups: 3 }, 'numQueryGroups');
    bad({ hiddenSize: 0 }, 'hiddenSize');
    bad({ ropeScaling: { type: 'yarn', factor: 4 } }, 'ropeScaling');
    bad(
      { moe: { numExperts: 4, routerTopk: 2, moeFfnHiddenSize: 8, layerPattern: ['moe'] } },
      'moe.layerPattern',
    );
    bad(
      { moe: { numExperts: 2, routerTopk: 4, moeFfnHiddenSize: 8, layerPattern: ['moe', 'moe'] } },
      'routerTopk',
    );
  });

  it('rotates ⌊kvChannels · rotaryPercent⌋ channels: a positive even count, longrope one factor a pair', () => {
    const c = (over: object) => makeTransformerConfig({ ...tiny, kvChannels: 16, ...over });
    expect(c({}).rotaryPercent).toBe(1);
    expect(rotaryDim(c({}))).toBe(16);
    expect(rotaryDim(c({ rotaryPercent: 0.75 }))).toBe(12);
    // truncated as Megatron's int(kv_channels * rotary_percent): 16 · 0.3 = 4.8 → 4
    expect(rotaryDim(c({ rotaryPercent: 0.3 }))).toBe(4);
    const longrope = (n: number) => ({
      type: 'longrope',
      shortFactor: Array(n).fill(1),
      longFactor: Array(n).fill(2),
      originalMaxPositionEmbeddings: 8,
      attentionFactor: 1,
    });
    expect(c({ rotaryPercent: 0.5, ropeScaling: longrope(4) }).ropeScaling.type).toBe('longrope');
    expectError(
      () => c({ rotaryPercent: 0.5, ropeScaling: longrope(8) }),
      'INVALID_CONFIG',
      'TransformerConfig.ropeScaling.shortFactor: has 8 entries; 8 rotating channels need 4 (one per pair)',
    );
    expectError(
      () => c({ rotaryPercent: 0.2 }),
      'INVALID_CONFIG',
      'TransformerConfig.rotaryPercent: 0.2 of kvChannels 16 rotates 3 channels; RoPE needs a positive even number',
    );
    expectError(() => c({ rotaryPercent: 0.05 }), 'INVALID_CONFIG', 'rotates 0 channels');
    expectError(() => c({ rotaryPercent: 0 }), 'INVALID_CONFIG', 'TransformerConfig.rotaryPercent');
    expectError(() => c({ rotaryPercent: 1.5 }), 'INVALID_CONFIG', 'TransformerConfig.rotaryPercent');
    const mla = {
      qLoraRank: null,
      kvLoraRank: 8,
      qkNopeHeadDim: 8,
      qkRopeHeadDim: 4,
      vHeadDim: 8,
    };
    expect(rotaryDim(c({ mla }))).toBe(4);
    expectError(
      () => c({ mla, rotaryPercent: 0.5 }),
      'INVALID_CONFIG',
      'multi-latent attention rotates its own qkRopeHeadDim channels',
    );
  });

  it('builds per-layer MoE patterns (DeepSeek first_k_dense / freq, Qwen sparse step / mlp_only_layers)', () => {
    expect(moeLayerPattern(5, { firstKDense: 2, freq: 1 })).toEqual(['dense', 'dense', 'moe', 'moe', 'moe']);
    expect(moeLayerPattern(4, { freq: 2 })).toEqual(['moe', 'dense', 'moe', 'dense']);
    expect(moeLayerPattern(4, { sparseStep: 2, denseLayers: [3] })).toEqual([
      'dense',
      'moe',
      'dense',
      'dense',
    ]);
  });

  it('pads the vocabulary to a multiple of divisibleBy × TP', () => {
    expect(paddedVocabSize(128256)).toBe(128256);
    expect(paddedVocabSize(32000, 128, 8)).toBe(32768);
    expect(paddedVocabSize(151936, 128, 1)).toBe(151936);
    expect(paddedVocabSize(129280, 128, 4)).toBe(129536);
    expect(paddedVocabSize(100, 1, 1)).toBe(100);
    expect(() => paddedVocabSize(0)).toThrow(ConvertError);
    expect(() => paddedVocabSize(10, 128, 0)).toThrow(ConvertError);
  });
});

describe('parameterCount', () => {
  it('counts a tiny dense model by hand', () => {
    const p = parameterCount(makeTransformerConfig(tiny));
    // q 8·8, k 8·4, v 8·4, o 8·8; MLP 3·8·16; two norms of 8.
    const layer = 64 + 32 + 32 + 64 + 384 + 16;
    expect(p.perLayer[0].total).toBe(layer);
    expect(p.total).toBe(2 * layer + 80 + 80 + 8);
    expect(p.activePerToken).toBe(p.total);
    expect(p.mtp).toBe(0);
  });

  it('adds biases for QKV bias, q/k norms and LayerNorm, and drops a tied output layer', () => {
    const base = parameterCount(makeTransformerConfig(tiny)).total;
    expect(parameterCount(makeTransformerConfig({ ...tiny, addQkvBias: true })).total - base).toBe(2 * 16);
    expect(parameterCount(makeTransformerConfig({ ...tiny, qkLayernorm: true })).total - base).toBe(2 * 8);
    expect(parameterCount(makeTransformerConfig({ ...tiny, normalization: 'LayerNorm' })).total - base).toBe(
      5 * 8,
    );
    const tied = parameterCount(makeTransformerConfig({ ...tiny, untieEmbeddingsAndOutputWeights: false }));
    expect([tied.outputLayer, base - tied.total]).toEqual([0, 80]);
  });
});

describe.skipIf(skipShared)('parameterCount of the published models', () => {
  // Published sizes, asserted within ±0.5% of the published (rounded) figure.
  const published: [string, number, number | null][] = [
    ['Llama-3.1-8B.json', 8.03, null],
    ['Llama-3.2-1B.json', 1.24, null],
    ['Qwen3-0.6B.json', 0.596, null],
    ['Qwen2.5-3B.json', 3.09, null],
    ['Qwen2.5-7B-Instruct.json', 7.62, null],
    ['Mixtral-8x7B-v0.1.json', 46.7, 12.9],
    ['Qwen3-30B-A3B.json', 30.5, null],
    ['Qwen1.5-MoE-A2.7B.finetune-resave.json', 14.3, 2.7],
    ['DeepSeek-V3.json', 671, null],
  ];
  it.each(published)('%s matches the published size %fB (active %s)', (f, total, active) => {
    const p = count(f);
    expect(Math.abs(p.total / B - total)).toBeLessThanOrEqual(0.005 * total);
    if (active !== null) expect(Math.abs(p.activePerToken / B - active)).toBeLessThanOrEqual(0.005 * active);
  });

  it('matches the exact element counts of the published checkpoints', () => {
    // These are the safetensors totals of the HF checkpoints (dense models have no ambiguity).
    expect(count('Llama-3.1-8B.json').total).toBe(8_030_261_248);
    expect(count('Llama-3.2-1B.json').total).toBe(1_235_814_400);
    expect(count('Qwen2.5-7B-Instruct.json').total).toBe(7_615_616_512);
    expect(count('Mixtral-8x7B-v0.1.json').total).toBe(46_702_792_704);
  });

  it('DeepSeek-V3: 671B without MTP, ~685B with it (the HF checkpoint figure)', () => {
    const p = count('DeepSeek-V3.json');
    expect(Math.abs(p.totalWithMtp / B - 685)).toBeLessThanOrEqual(0.005 * 685);
    expect(p.mtp / B).toBeGreaterThan(13);
    expect(p.mtp / B).toBeLessThan(14.5);
    expect(p.perLayer.slice(0, 4).map((l) => l.kind)).toEqual(['dense', 'dense', 'dense', 'moe']);
  });

  // The published active figures below use counting conventions (how embeddings are counted,
  // rounding) that we cannot pin down; the count includes the full embedding and output layer.
  // They are asserted within 3% (Moonlight: 2.91B vs "3B" is the widest gap).
  it.each([
    ['Qwen3-30B-A3B.json', 3.3],
    ['DeepSeek-V3.json', 37],
    ['Moonlight-16B-A3B-Instruct.thirdparty-copy.json', 3],
  ] as const)('%s active parameters are close to the published %fB', (f, active) => {
    expect(Math.abs(count(f).activePerToken / B - active)).toBeLessThanOrEqual(0.03 * active);
  });

  it('Moonlight totals ~16B', () => {
    expect(
      Math.abs(count('Moonlight-16B-A3B-Instruct.thirdparty-copy.json').total / B - 16),
    ).toBeLessThanOrEqual(0.005 * 16);
  });
});
