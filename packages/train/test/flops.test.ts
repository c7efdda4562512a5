// Megatron's FLOPs count, checked against values worked out by hand from the terms of
// megatron/training/training.py `num_floating_point_operations` (each also cross-checked by running
// that function, at Megatron-LM d98e8a64, on the same arguments).
import { join } from 'node:path';
import {
  makeTransformerConfig,
  parameterCount,
  parseHfConfig,
  type TransformerConfigInput,
} from '@megapatch/convert';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';
import { TrainError } from '../src/errors.js';
import {
  floatingPointOperationsBreakdown,
  numFloatingPointOperations,
  tflopsPerSecond,
} from '../src/flops.js';

const CONFIGS = sharedPath('data/configs');
const skipShared = skipWithoutShared(import.meta.url);
const hf = (f: string) => parseHfConfig(join(CONFIGS, f)).transformerConfig;

const BASE: TransformerConfigInput = {
  numLayers: 2,
  hiddenSize: 64,
  ffnHiddenSize: 128,
  numAttentionHeads: 4,
  numQueryGroups: 2,
  kvChannels: 16,
  layernormEpsilon: 1e-5,
  rotaryBase: 10_000,
  untieEmbeddingsAndOutputWeights: true,
  vocabSize: 1000,
  maxPositionEmbeddings: 64,
};
const DENSE = makeTransformerConfig(BASE);
// Layers dense, moe, moe (the MTP layer is then MoE); kvChannels independent of hidden / heads.
const MOE = makeTransformerConfig({
  ...BASE,
  numLayers: 3,
  ffnHiddenSize: 96,
  numQueryGroups: 1,
  kvChannels: 32,
  vocabSize: 500,
  mtpNumLayers: 1,
  moe: {
    numExperts: 4,
    routerTopk: 2,
    moeFfnHiddenSize: 32,
    sharedExpertIntermediateSize: 48,
    layerPattern: ['dense', 'moe', 'moe'],
  },
});
// Layers moe, dense (the two MTP layers are then dense).
const mla = (qLoraRank: number | null) =>
  makeTransformerConfig({
    ...BASE,
    ffnHiddenSize: 96,
    numQueryGroups: 4,
    kvChannels: 12,
    vocabSize: 256,
    mtpNumLayers: 2,
    moe: { numExperts: 4, routerTopk: 1, moeFfnHiddenSize: 16, layerPattern: ['moe', 'dense'] },
    mla: { qLoraRank, kvLoraRank: 16, qkNopeHeadDim: 8, qkRopeHeadDim: 4, vHeadDim: 8 },
  });

describe('numFloatingPointOperations on small configs', () => {
  it('dense GQA with SwiGLU', () => {
    // Per layer and token: linear_qkv + linear_proj 6·(64·(64 + 2·32) + 64·64) = 73 728,
    // MLP 6·64·128·3 = 147 456; logits 6·64·1024 (vocab 1000 padded to 1024) = 393 216.
    // Per sequence²: QKᵀ and PV 6·64 = 384 per layer.
    const perToken = 2 * (73_728 + 147_456) + 393_216;
    const b = floatingPointOperationsBreakdown(DENSE, { seqLength: 32, batchSize: 2 });
    expect(perToken).toBe(835_584);
    expect(b).toEqual({
      mlp: 64 * 2 * 147_456,
      attentionProjections: 64 * 2 * 73_728,
      attentionScores: 2 * 32 ** 2 * 2 * 384,
      mtp: 0,
      logits: 64 * 393_216,
      total: 64 * perToken + 2 * 32 ** 2 * 2 * 384,
    });
    expect(b.total).toBe(55_050_240);
    expect(numFloatingPointOperations(DENSE, { seqLength: 32, batchSize: 2 })).toBe(b.total);
  });

  it('MoE with a shared expert, a dense first layer and an MoE MTP layer', () => {
    // 4 layers with MTP: 1 dense, 3 MoE (the MTP layer takes the last layer's kind).
    // MLP: 6·64·(96·3·1 + 32·2·3·3 + 48·3·3) = 497 664. Attention per layer: q 4·32 = 128,
    // k = v = 32: 6·(64·192 + 128·64) = 122 880; scores 6·128 = 768. MTP norms and eh_proj:
    // 6·(3·64 + 2·64²) = 50 304. Logits, final + MTP: 6·64·512·2 = 393 216.
    const perToken = 497_664 + 4 * 122_880 + 50_304 + 393_216;
    const b = floatingPointOperationsBreakdown(MOE, { seqLength: 16, batchSize: 3 });
    expect([b.mlp, b.attentionProjections, b.attentionScores, b.mtp, b.logits]).toEqual([
      48 * 497_664,
      48 * 4 * 122_880,
      3 * 16 ** 2 * 4 * 768,
      48 * 50_304,
      48 * 393_216,
    ]);
    expect(b.total).toBe(48 * perToken + 3 * 16 ** 2 * 4 * 768);
    expect(b.total).toBe(71_129_088);
  });

  it('pads the vocabulary by divisibleBy × tp', () => {
    // 500 → 1024 with tp 8: the logits term grows to 6·64·1024·2 = 786 432 per token.
    const perToken = 497_664 + 4 * 122_880 + 50_304 + 786_432;
    expect(numFloatingPointOperations(MOE, { seqLength: 16, batchSize: 3, tp: 8 })).toBe(
      48 * perToken + 3 * 16 ** 2 * 4 * 768,
    );
  });

  it('takes packed (THD) token counts and Σ L² like Megatron', () => {
    const b = floatingPointOperationsBreakdown(MOE, {
      seqLength: 16,
      batchSize: 3,
      totalTokens: 40,
      seqlenSquaredSum: 600,
    });
    expect(b.attentionScores).toBe(600 * 4 * 768);
    expect(b.total).toBe(59_151_360);
  });

  it('MLA with a plain q projection and dense MTP layers', () => {
    // Attention per layer: q 64·4·12 = 3072; kv 16·(64 + 4·(8 + 8) + 1) + 64·4 = 2320;
    // out 4·8·64 = 2048 → 6·7440 = 44 640; scores 6·(4·12/2 + 4·8/2) = 240. 4 layers with MTP.
    // MLP: 3 dense, 1 MoE: 6·64·(96·3·3 + 16·1·3) = 350 208. MTP: 2·6·(3·64 + 2·64²) = 100 608.
    // Logits: 6·64·256·3 = 294 912.
    const perToken = 350_208 + 4 * 44_640 + 100_608 + 294_912;
    const total = numFloatingPointOperations(mla(null), { seqLength: 8, batchSize: 1 });
    expect(total).toBe(8 * perToken + 8 ** 2 * 4 * 240);
    expect(total).toBe(7_455_744);
  });

  it('MLA with a q LoRA', () => {
    // q becomes 24·(64 + 4·12 + 1) = 2712: attention 6·(2712 + 2320 + 2048) = 42 480 per layer.
    const perToken = 350_208 + 4 * 42_480 + 100_608 + 294_912;
    const total = numFloatingPointOperations(mla(24), { seqLength: 8, batchSize: 1 });
    expect(total).toBe(8 * perToken + 8 ** 2 * 4 * 240);
    expect(total).toBe(7_386_624);
  });

  it('is linear in the batch and quadratic in the sequence only through the scores', () => {
    const f = (seqLength: number, batchSize: number) =>
      floatingPointOperationsBreakdown(DENSE, { seqLength, batchSize });
    expect(f(32, 6).total).toBe(3 * f(32, 2).total);
    expect(f(64, 2).attentionScores).toBe(4 * f(32, 2).attentionScores);
    expect(f(64, 2).mlp).toBe(2 * f(32, 2).mlp);
  });

  it('is about 6 × parameters × tokens without the attention scores', () => {
    // Vocabulary 1024: no padding, so the output layer is counted as stored.
    const cfg = makeTransformerConfig({ ...BASE, vocabSize: 1024 });
    const p = parameterCount(cfg);
    const b = floatingPointOperationsBreakdown(cfg, { seqLength: 32, batchSize: 2 });
    const gemmParams = p.total - p.embedding - p.finalNorm - p.perLayer.reduce((a, l) => a + l.norms, 0);
    expect(b.total - b.attentionScores).toBe(6 * gemmParams * 64);
    expect((b.total - b.attentionScores) / (6 * (p.total - p.embedding) * 64)).toBeCloseTo(1, 2);
  });

  it('rejects a bad step with INVALID_ARGUMENT', () => {
    const bad = (opts: Parameters<typeof numFloatingPointOperations>[1]) => {
      expect(() => numFloatingPointOperations(DENSE, opts)).toThrow(TrainError);
      try {
        numFloatingPointOperations(DENSE, opts);
      } catch (e) {
        expect((e as TrainError).code).toBe('INVALID_ARGUMENT');
      }
    };
    bad({ seqLength: 0, batchSize: 1 });
    bad({ seqLength: 8, batchSize: 1.5 });
    bad({ seqLength: 8, batchSize: 1, tp: 0 });
    bad({ seqLength: 8, batchSize: 1, totalTokens: -1 });
    bad({ seqLength: 8, batchSize: 1, seqlenSquaredSum: Number.NaN });
  });
});

describe('tflopsPerSecond', () => {
  it('divides by seconds × 10¹² × world size', () => {
    expect(tflopsPerSecond(8e12, 2, 4)).toBe(1);
    expect(tflopsPerSecond(421_645_529_382_912, 0.5, 8)).toBeCloseTo(105.411382345728, 9);
  });

  it('rejects a zero time or a bad world size', () => {
    expect(() => tflopsPerSecond(1, 0, 1)).toThrow(TrainError);
    expect(() => tflopsPerSecond(1, 1, 0)).toThrow(TrainError);
  });
});

describe.skipIf(skipShared)('numFloatingPointOperations of the published models', () => {
  it('Llama-3.1-8B (dense GQA): 4.216e14 per 8192-token sequence', () => {
    // Per token: 32 × (attention 6·(4096·(4096 + 2·1024) + 4096·4096) = 251 658 240
    //                + MLP 6·4096·14336·3 = 1 056 964 608) + logits 6·4096·128256 = 3 152 019 456.
    // Per sequence²: 32 × 6·4096 = 786 432.
    const perToken = 32 * (251_658_240 + 1_056_964_608) + 3_152_019_456;
    const total = numFloatingPointOperations(hf('Llama-3.1-8B.json'), { seqLength: 8192, batchSize: 1 });
    expect(total).toBe(8192 * perToken + 8192 ** 2 * 786_432);
    expect(total).toBe(421_645_529_382_912);
  });

  it('Llama-3.1-8B with TP 8: the vocabulary is padded to 129024', () => {
    const perToken = 32 * (251_658_240 + 1_056_964_608) + 6 * 4096 * 129_024;
    const total = numFloatingPointOperations(hf('Llama-3.1-8B.json'), {
      seqLength: 4096,
      batchSize: 2,
      tp: 8,
    });
    expect(total).toBe(2 * 4096 * perToken + 2 * 4096 ** 2 * 786_432);
    expect(total).toBe(395_411_869_138_944);
  });

  it('Llama-3.1-8B: about 6 × parameters × tokens without the attention scores', () => {
    const cfg = hf('Llama-3.1-8B.json');
    const p = parameterCount(cfg);
    const b = floatingPointOperationsBreakdown(cfg, { seqLength: 8192, batchSize: 1 });
    const gemmParams = p.total - p.embedding - p.finalNorm - p.perLayer.reduce((a, l) => a + l.norms, 0);
    expect(b.total - b.attentionScores).toBe(6 * gemmParams * 8192);
    expect((b.total - b.attentionScores) / (6 * (p.total - p.embedding) * 8192)).toBeCloseTo(1, 4);
  });

  it('Mixtral-8x7B (MoE, top-2): 3.265e14 per 4096-token sequence', () => {
    // Per token: MLP 32 × 6·4096·14336·2·3 = 67 645 734 912; attention 32 × 251 658 240
    // = 8 053 063 680; logits 6·4096·32000 = 786 432 000. Per sequence²: 786 432.
    const perToken = 67_645_734_912 + 8_053_063_680 + 786_432_000;
    const total = numFloatingPointOperations(hf('Mixtral-8x7B-v0.1.json'), { seqLength: 4096, batchSize: 1 });
    expect(total).toBe(4096 * perToken + 4096 ** 2 * 786_432);
    expect(total).toBe(326_477_644_038_144);
  });

  it('DeepSeek-V3 (MLA, 3 dense + 58 MoE layers, 1 MTP layer): 1.065e15 per 4096-token sequence', () => {
    // 62 layers with MTP: 3 dense, 59 MoE. MLP: 6·7168·(18432·3·3 + 2048·8·3·59 + 2048·3·59)
    // = 147 446 562 816. MLA per layer: q 1536·(7168 + 128·192 + 1) = 48 760 320; kv 512·(7168
    // + 128·256 + 1) + 7168·64 = 20 906 496; out 128·128·7168 = 117 440 512 → ×6 = 1 122 643 968.
    // MTP: 6·(3·7168 + 2·7168²) = 616 691 712. Logits: 6·7168·129280·2 = 11 120 148 480.
    // Per sequence²: 62 × 6·(128·192/2 + 128·128/2) = 62 × 122 880.
    const b = floatingPointOperationsBreakdown(hf('DeepSeek-V3.json'), { seqLength: 4096, batchSize: 1 });
    expect([b.mlp, b.attentionProjections, b.mtp, b.logits, b.attentionScores]).toEqual([
      4096 * 147_446_562_816,
      4096 * 62 * 1_122_643_968,
      4096 * 616_691_712,
      4096 * 11_120_148_480,
      4096 ** 2 * 62 * 122_880,
    ]);
    const perToken = 147_446_562_816 + 62 * 1_122_643_968 + 616_691_712 + 11_120_148_480;
    expect(b.total).toBe(4096 * perToken + 4096 ** 2 * 62 * 122_880);
    expect(b.total).toBe(1_064_931_126_411_264);
  });
});
