// Megatron's theoretical memory estimate: checked against Megatron's own formulas
// (megatron/training/theoretical_memory_usage.py, transcribed below) where they cover the model,
// against hand-computed extensions where they do not, and against the parameter counts of the
// real configs (Llama-3.1-8B, Qwen3-30B-A3B, DeepSeek-V3) in the shared data folder.
import { join } from 'node:path';
import {
  makeTransformerConfig,
  paddedVocabSize,
  parameterCount,
  parseHfConfig,
  type TransformerConfig,
} from '@megapatch/convert';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';
import {
  bytesPerParameter,
  formatGiB,
  layerActivationBytes,
  type MemoryLayoutInput,
  resolveMemoryLayout,
  type TheoreticalMemory,
  theoreticalMemory,
} from '../src/memory.js';

/** Llama-3-8B's shapes, inline so that the formula checks run without the shared folder. */
const llama3: TransformerConfig = makeTransformerConfig({
  numLayers: 32,
  hiddenSize: 4096,
  ffnHiddenSize: 14336,
  numAttentionHeads: 32,
  numQueryGroups: 8,
  kvChannels: 128,
  layernormEpsilon: 1e-5,
  rotaryBase: 500000,
  untieEmbeddingsAndOutputWeights: true,
  vocabSize: 128256,
  maxPositionEmbeddings: 8192,
});

/** The arguments of Megatron's estimator this test uses (dense or MoE, no MLA). */
interface MegatronArgs {
  numLayers: number;
  hidden: number;
  ffn: number;
  heads: number;
  groups: number;
  kvChannels: number;
  paddedVocab: number;
  untied: boolean;
  tp: number;
  pp: number;
  dp: number;
  ep?: number;
  etp?: number;
  distributedOptimizer: boolean;
  moe?: { experts: number; ffn: number; pattern: number[]; shared: number };
}

/** compute_weight_and_optimizer_memory (swiglu, RMSNorm, no MLA, no MTP, no latent MoE), in bytes. */
function megatronWeightAndOptimizer(a: MegatronArgs): number {
  const h = a.hidden;
  const attention = 2 * h * h * ((1 + a.groups / a.heads) * ((a.kvChannels * a.heads) / h));
  const embedding = h * a.paddedVocab;
  const finalNorm = h;
  const denseMlp = 2 * h * a.ffn * (3 / 2);
  const pattern = a.moe?.pattern ?? Array(a.numLayers).fill(0);
  const moeLayers = pattern.reduce((x, y) => x + y, 0);
  const denseLayers = a.numLayers - moeLayers;
  const shared = 2 * h * (a.moe?.shared ?? 0) * (3 / 2);
  const routed = a.moe ? 2 * h * a.moe.ffn * a.moe.experts * (3 / 2) : 0;
  const norms = 2 * h;
  const router = a.moe ? h * a.moe.experts : 0;
  const ep = a.ep ?? 1;
  const etp = a.etp ?? a.tp;
  const world = a.tp * a.pp * a.dp;
  const expertDp = Math.floor(world / (etp * ep * a.pp));
  const tpSharded = (attention + denseMlp) * denseLayers + (attention + shared) * moeLayers;
  const replicated = norms * denseLayers + (norms + router) * moeLayers + finalNorm;
  const expertSharded = routed * moeLayers;
  let tpOnShard = (tpSharded / a.pp + embedding) / a.tp;
  const replicatedOnShard = replicated / a.pp;
  const expertOnShard = expertSharded / a.pp / (etp * ep);
  if (a.untied && a.pp === 1) tpOnShard += embedding / a.tp;
  const bytes = (dp: number) => (a.distributedOptimizer ? 6 + 12 / dp : 18);
  return (tpOnShard + replicatedOnShard) * bytes(a.dp) + expertOnShard * bytes(expertDp);
}

/** compute_activation_memory (sequence parallelism and selective recomputation), in bytes. */
function megatronActivations(a: {
  seq: number;
  mbs: number;
  hidden: number;
  ffn: number;
  numLayers: number;
  tp: number;
  pp: number;
  vpp?: number;
  paddedVocab: number;
  numMicroBatches?: number;
}): number {
  let m = a.seq * a.mbs * a.hidden * (18 + 4 * (a.ffn / a.hidden));
  m *= a.numLayers;
  m += 8 * a.seq * a.mbs * a.pp;
  m += a.seq * a.mbs * a.hidden * a.pp;
  if (a.vpp !== undefined) m *= 1 + (a.pp - 1) / (a.pp * a.vpp);
  if (a.vpp === undefined && a.pp > 1 && a.numMicroBatches !== undefined)
    m *= Math.min(1, a.numMicroBatches / a.pp);
  if (a.pp === 1) m += a.seq * a.mbs * a.hidden * 4 * (1 + a.paddedVocab / a.hidden);
  return m / a.tp;
}

const llamaArgs = (tp: number, pp: number, dp: number, distributedOptimizer: boolean): MegatronArgs => ({
  numLayers: 32,
  hidden: 4096,
  ffn: 14336,
  heads: 32,
  groups: 8,
  kvChannels: 128,
  paddedVocab: paddedVocabSize(128256, 128, tp),
  untied: true,
  tp,
  pp,
  dp,
  distributedOptimizer,
});

const stateBytes = (m: TheoreticalMemory, s: number) => {
  const b = m.stages[s].bytes;
  return b.weights + b.gradients + b.optimizer;
};

describe("Megatron's bytes per parameter", () => {
  it('18 with bf16 weights and fp32 gradients, 20 for fp16, 16 for fp32 (dist_optimizer.md)', () => {
    const sum = (p: { weights: number; gradients: number; optimizer: number }) =>
      p.weights + p.gradients + p.optimizer;
    expect(bytesPerParameter('bf16', 'fp32')).toEqual({ weights: 2, gradients: 4, optimizer: 12 });
    expect(sum(bytesPerParameter('fp16', 'fp16'))).toBe(20);
    expect(sum(bytesPerParameter('fp32', 'fp32'))).toBe(16);
    const l = resolveMemoryLayout(llama3, { seqLength: 8, paramDtype: 'fp16' });
    expect(l.gradDtype).toBe('fp16');
    expect(resolveMemoryLayout(llama3, { seqLength: 8 }).gradDtype).toBe('fp32');
  });

  it('6 + 12/dp with the distributed optimizer: the optimizer states shrink, weights and grads do not', () => {
    const one = theoreticalMemory(llama3, { seqLength: 8, dp: 1, distributedOptimizer: true });
    const eight = theoreticalMemory(llama3, { seqLength: 8, dp: 8, distributedOptimizer: true });
    const n = one.stages[0].parameters.total;
    expect(n).toBe(one.totalParameters);
    expect(stateBytes(one, 0)).toBe(18 * n);
    expect(stateBytes(eight, 0)).toBeCloseTo((6 + 12 / 8) * n, 0);
    expect(eight.stages[0].bytes.optimizer).toBeCloseTo((12 * n) / 8, 0);
    // Context parallelism joins the distributed optimizer's group, as in Megatron-Core.
    const cp = theoreticalMemory(llama3, { seqLength: 8, dp: 4, cp: 2, distributedOptimizer: true });
    expect(cp.stages[0].bytes.optimizer).toBeCloseTo(eight.stages[0].bytes.optimizer, 0);
  });

  it('optimizer offload: the offloaded share of the states leaves the device total for host memory', () => {
    const base = { seqLength: 8, dp: 8, distributedOptimizer: true } as const;
    const on = theoreticalMemory(llama3, base);
    const all = theoreticalMemory(llama3, { ...base, optimizerOffloadFraction: 1 });
    const part = theoreticalMemory(llama3, { ...base, optimizerOffloadFraction: 0.25 });
    const states = on.stages[0].bytes.optimizer;
    expect(on.stages[0].bytes.optimizerHost).toBe(0);
    expect([all.stages[0].bytes.optimizer, all.stages[0].bytes.optimizerHost]).toEqual([0, states]);
    expect(part.stages[0].bytes.optimizerHost).toBeCloseTo(0.25 * states, 3);
    expect(on.total - all.total).toBeCloseTo(states, 3);
    expect(on.total - part.total).toBeCloseTo(0.25 * states, 3);
    expect(() => theoreticalMemory(llama3, { ...base, optimizerOffloadFraction: 2 })).toThrow(
      /optimizerOffloadFraction/,
    );
  });
});

describe('weights, gradients and optimizer states against compute_weight_and_optimizer_memory', () => {
  it('Llama-3-8B, pp=1: exactly Megatron, with and without the distributed optimizer', () => {
    for (const [tp, dp, dist] of [
      [1, 1, false],
      [8, 1, false],
      [8, 4, true],
      [2, 16, true],
    ] as const) {
      const m = theoreticalMemory(llama3, { tp, dp, seqLength: 8192, distributedOptimizer: dist });
      expect(stateBytes(m, 0)).toBeCloseTo(megatronWeightAndOptimizer(llamaArgs(tp, 1, dp, dist)), 0);
    }
  });

  it("Llama-3-8B, pp=4: the first stage is Megatron's most loaded shard less its share of the final norm", () => {
    // Megatron spreads the final norm's h parameters over the stages; Megatron-Core builds it on the last.
    const m = theoreticalMemory(llama3, { tp: 2, pp: 4, dp: 8, seqLength: 4096, distributedOptimizer: true });
    const megatron = megatronWeightAndOptimizer(llamaArgs(2, 4, 8, true));
    expect(stateBytes(m, 0)).toBeCloseTo(megatron - (4096 / 4) * (6 + 12 / 8), 0);
    // The last stage holds the output layer instead of the embedding, and the final norm.
    const p = m.stages[3].parameters;
    expect(p.embedding).toBe(0);
    expect(p.outputLayer).toBe((128256 * 4096) / 2);
    expect(m.stages[1].parameters.total).toBe(m.stages[0].parameters.total - (128256 * 4096) / 2);
    expect(m.peakStage).toBe(0);
  });

  it('a MoE model: expert states sharded over the expert data-parallel size tp × dp / (ep × etp)', () => {
    const moe = makeTransformerConfig({
      ...llama3,
      numLayers: 4,
      moe: {
        numExperts: 16,
        routerTopk: 2,
        moeFfnHiddenSize: 1024,
        sharedExpertIntermediateSize: 2048,
        layerPattern: ['dense', 'moe', 'moe', 'moe'],
      },
    });
    const layout = { tp: 2, ep: 4, etp: 1, dp: 8, seqLength: 1024, sequenceParallel: true };
    for (const dist of [false, true]) {
      const m = theoreticalMemory(moe, { ...layout, distributedOptimizer: dist });
      expect(m.layout.expertDp).toBe(4);
      const megatron = megatronWeightAndOptimizer({
        ...llamaArgs(2, 1, 8, dist),
        numLayers: 4,
        ep: 4,
        etp: 1,
        moe: { experts: 16, ffn: 1024, pattern: [0, 1, 1, 1], shared: 2048 },
      });
      expect(stateBytes(m, 0)).toBeCloseTo(megatron, 0);
    }
  });
});

describe('activations against compute_activation_memory', () => {
  const h = 4096;
  const f = 14336;
  const gd = 8 * 128;
  // Megatron's per-layer s·b·h·(18 + 4·ffn/h) assumes a GeLU MLP and full-width K and V. Llama's
  // SwiGLU keeps 2·ffn more bytes a token (fc1's output is 2·ffn wide) and its 8 KV groups keep
  // 4·(h − groups·d) fewer (K and V are groups·d wide): 36·h instead of Megatron's 32·h.
  const extension = 2 * f - 4 * (h - gd);

  it("Llama-3-8B per layer: 36·h bytes a token, Megatron's 32·h plus the SwiGLU and GQA terms", () => {
    const l = resolveMemoryLayout(llama3, {
      tp: 8,
      seqLength: 4096,
      microBatchSize: 2,
      sequenceParallel: true,
    });
    const sb = 4096 * 2;
    expect(layerActivationBytes(llama3, 'dense', l)).toBe((sb * 36 * h) / 8);
    expect((sb * (h * (18 + (4 * f) / h) + extension)) / 8).toBe((sb * 36 * h) / 8);
    // Without sequence parallelism the 10·sbh outside the split GEMMs stay whole: Megatron's
    // s·b·h·(10 + 24/tp), whose 24 = 8 of attention + 4·ffn/h for ffn = 4h.
    const noSp = resolveMemoryLayout(llama3, { tp: 8, seqLength: 4096, microBatchSize: 2 });
    expect(layerActivationBytes(llama3, 'dense', noSp)).toBe(sb * 10 * h + (sb * 26 * h) / 8);
    expect(sb * 10 * h + (sb * (8 * h + 4 * f + extension)) / 8).toBe(sb * 10 * h + (sb * 26 * h) / 8);
  });

  it('pp=1: Megatron plus the extension, with the output layer and its fp32 logits', () => {
    const m = theoreticalMemory(llama3, { tp: 4, seqLength: 8192, sequenceParallel: true });
    const megatron = megatronActivations({
      seq: 8192,
      mbs: 1,
      hidden: h,
      ffn: f,
      numLayers: 32,
      tp: 4,
      pp: 1,
      paddedVocab: 128512, // 128256 padded to a multiple of 128 × tp
    });
    expect(m.stages[0].bytes.activations).toBeCloseTo(megatron + (32 * 8192 * extension) / 4, 0);
    expect(m.stages[0].bytes.activationsPerMicroBatch).toBe(m.stages[0].bytes.activations);
  });

  it('pp=4: pp micro-batches in flight on the first stage, fewer with fewer micro-batches, interleaving', () => {
    const base = { tp: 2, pp: 4, seqLength: 4096, sequenceParallel: true } as const;
    const args = { seq: 4096, mbs: 1, hidden: h, ffn: f, numLayers: 32, tp: 2, pp: 4, paddedVocab: 128256 };
    const ext = (layers: number) => (layers * 4096 * extension) / 2;
    for (const [layout, megatron, layerMicroBatches] of [
      [base, megatronActivations(args), 32],
      [{ ...base, numMicroBatches: 2 }, megatronActivations({ ...args, numMicroBatches: 2 }), 16],
      [{ ...base, vpp: 2 }, megatronActivations({ ...args, vpp: 2 }), 32 * (1 + 3 / 8)],
    ] as const) {
      const m = theoreticalMemory(llama3, layout);
      expect(m.stages[0].bytes.activations).toBeCloseTo(megatron + ext(layerMicroBatches), 0);
    }
    const m = theoreticalMemory(llama3, base);
    expect(m.stages.map((s) => s.inFlightMicroBatches)).toEqual([4, 3, 2, 1]);
    // The last stage holds one micro-batch, with the output layer's input and logits.
    const last = m.stages[3].bytes;
    const layer = layerActivationBytes(llama3, 'dense', m.layout);
    expect(last.activations).toBe(8 * layer + (4096 * 4 * (h + 128256)) / 2);
  });

  it("full recomputation keeps each layer's input and one layer being recomputed", () => {
    const m = theoreticalMemory(llama3, {
      tp: 2,
      seqLength: 4096,
      sequenceParallel: true,
      recompute: 'full',
    });
    const layer = layerActivationBytes(llama3, 'dense', m.layout);
    const logits = (4096 * 4 * (h + 128256)) / 2;
    const embedding = (4096 * (8 + h)) / 2;
    expect(m.stages[0].bytes.activations).toBe((32 * 4096 * 2 * h) / 2 + layer + logits + embedding);
    const selective = theoreticalMemory(llama3, { tp: 2, seqLength: 4096, sequenceParallel: true });
    expect(selective.stages[0].bytes.activations).toBe(32 * layer + logits + embedding);
  });

  it('context parallelism divides the sequence', () => {
    const one = theoreticalMemory(llama3, { seqLength: 8192, pp: 2 });
    const two = theoreticalMemory(llama3, { seqLength: 8192, pp: 2, cp: 2 });
    expect(two.stages[0].bytes.activations).toBeCloseTo(one.stages[0].bytes.activations / 2, 0);
  });
});

describe('layouts that do not fit the model are one-line errors', () => {
  const moe = makeTransformerConfig({
    ...llama3,
    numLayers: 2,
    moe: { numExperts: 8, routerTopk: 2, moeFfnHiddenSize: 512, layerPattern: ['moe', 'moe'] },
  });
  const cases: [TransformerConfig, MemoryLayoutInput, string][] = [
    [
      llama3,
      { tp: 3, seqLength: 8 },
      'tp=3 does not divide 32 attention heads; tp=3 does not divide 8 query groups; tp=3 does not divide ffnHiddenSize 14336',
    ],
    [llama3, { tp: 16, seqLength: 8 }, 'tp=16 does not divide 8 query groups'],
    [llama3, { pp: 5, seqLength: 8 }, 'pp=5 does not divide 32 layers: give the first and/or last stage'],
    [
      llama3,
      { pp: 5, firstStageLayers: 5, seqLength: 8 },
      "the 27 layers left after the first and last stages' do not split evenly over the other 4 stages",
    ],
    [
      llama3,
      { pp: 4, vpp: 3, seqLength: 8 },
      'the 8 layers of stage 0 do not split into vpp=3 virtual stages',
    ],
    [llama3, { ep: 2, seqLength: 8 }, 'ep=2, etp=1 need experts, and this model has none'],
    [moe, { ep: 3, dp: 3, seqLength: 8 }, 'ep=3 does not divide 8 experts'],
    [moe, { ep: 4, dp: 2, seqLength: 8 }, 'ep × etp = 4 does not divide tp × cp × dp = 2'],
    [moe, { tp: 2, seqLength: 8 }, 'MoE layers with tp=2 need sequence parallelism'],
    [llama3, { cp: 4, seqLength: 12 }, 'seqLength 12 is not a multiple of 2 × cp = 8'],
    [
      llama3,
      { tp: 8, sequenceParallel: true, seqLength: 12 },
      'seqLength / cp = 12 is not a multiple of tp=8',
    ],
    [llama3, { tp: 0, seqLength: 8 }, 'layout.tp: '],
    [llama3, { seqLength: 8, tpp: 2 } as MemoryLayoutInput, 'layout.(root): Unrecognized key: "tpp"'],
  ];
  it.each(cases.map(([c, l, msg]) => ({ c, l, msg })))('$msg', ({ c, l, msg }) => {
    let thrown: unknown;
    try {
      theoreticalMemory(c, l);
    } catch (e) {
      thrown = e;
    }
    expect(thrown).toMatchObject({ name: 'ModelError', code: 'INVALID_ARGUMENT' });
    const message = (thrown as Error).message;
    expect(message).toContain(msg);
    expect(message).not.toContain('\n');
  });
});

const configs = sharedPath('data/configs');
const load = (name: string) => parseHfConfig(join(configs, `${name}.json`)).transformerConfig;

/** Σ over stages of each rank's parameters times the ranks that split them, each replicated tensor once. */
const rebuilt = (m: TheoreticalMemory) =>
  m.stages.reduce(
    (a, s) =>
      a +
      s.parameters.tensorParallel * m.layout.tp +
      s.parameters.replicated +
      s.parameters.expertParallel * m.layout.ep * m.layout.etp,
    0,
  );

/** The model Megatron-Core builds, from the HF count: padded vocabulary, MTP without its own embedding and head. */
function megatronTotal(cfg: TransformerConfig, tp: number): number {
  const n = parameterCount(cfg);
  const h = cfg.hiddenSize;
  const padding = (paddedVocabSize(cfg.vocabSize, cfg.makeVocabSizeDivisibleBy, tp) - cfg.vocabSize) * h;
  // HF stores the expert bias as a weight; Megatron-Core keeps it as a buffer, not a parameter
  const moe = cfg.moe;
  const moeLayers = moe ? moe.layerPattern.filter((k) => k === 'moe').length : 0;
  const mtpMoe = moe && moe.layerPattern[cfg.numLayers - 1] === 'moe' ? cfg.mtpNumLayers : 0;
  const bias = moe?.expertBias ? (moeLayers + mtpMoe) * moe.numExperts : 0;
  return (
    n.totalWithMtp -
    bias -
    cfg.mtpNumLayers * 2 * cfg.vocabSize * h +
    padding * (cfg.untieEmbeddingsAndOutputWeights ? 2 : 1)
  );
}

describe.skipIf(skipWithoutShared(import.meta.url))('the real configs', () => {
  it('Llama-3.1-8B: parameters per rank times ranks are the whole model', () => {
    const cfg = load('Llama-3.1-8B');
    for (const layout of [{ tp: 1 }, { tp: 8, pp: 4 }, { tp: 4, pp: 2, dp: 2 }]) {
      const m = theoreticalMemory(cfg, { ...layout, seqLength: 8192 });
      expect(m.totalParameters).toBe(megatronTotal(cfg, layout.tp));
      expect(rebuilt(m)).toBe(m.totalParameters);
    }
    expect(theoreticalMemory(cfg, { seqLength: 8 }).totalParameters).toBe(8_030_261_248);
  });

  it('a tied model with pp > 1: the last stage holds a copy of the embedding as its output layer', () => {
    const cfg = load('Llama-3.2-1B');
    expect(cfg.untieEmbeddingsAndOutputWeights).toBe(false);
    const m = theoreticalMemory(cfg, { tp: 2, pp: 2, seqLength: 8192 });
    const vocab = paddedVocabSize(cfg.vocabSize, 128, 2) * cfg.hiddenSize;
    expect(m.stages[1].parameters.outputLayer).toBe(vocab / 2);
    expect(rebuilt(m)).toBe(m.totalParameters + vocab);
    expect(theoreticalMemory(cfg, { tp: 2, seqLength: 8 }).stages[0].parameters.outputLayer).toBe(0);
  });

  it('Qwen3-30B-A3B at TP4 PP4 EP8: hand-checked parts, the vocabulary padded to 4 × 128', () => {
    const cfg = load('Qwen3-30B-A3B');
    const layout = {
      tp: 4,
      pp: 4,
      ep: 8,
      etp: 1,
      dp: 2,
      seqLength: 4096,
      sequenceParallel: true,
      distributedOptimizer: true,
    };
    const m = theoreticalMemory(cfg, layout);
    expect(m.layout.paddedVocabSize).toBe(152064);
    expect(m.layout.stageLayers).toEqual([12, 12, 12, 12]);
    expect(m.totalParameters).toBe(megatronTotal(cfg, 4));
    expect(rebuilt(m)).toBe(m.totalParameters);
    const h = 2048;
    const p = m.stages[0].parameters;
    expect(p.embedding).toBe((152064 * h) / 4);
    expect(p.experts).toBe((12 * 128 * 3 * h * 768) / 8);
    expect(p.attention).toBe(12 * ((h * (32 + 8) * 128 + 32 * 128 * h) / 4 + 2 * 128));
    expect(p.router).toBe(12 * h * 128);
    expect(p.denseMlp).toBe(0);
    // Megatron's estimator leaves out the q/k norms (2 × 128 per layer); otherwise it agrees.
    const megatron = megatronWeightAndOptimizer({
      numLayers: 48,
      hidden: h,
      ffn: 6144,
      heads: 32,
      groups: 4,
      kvChannels: 128,
      paddedVocab: 152064,
      untied: true,
      tp: 4,
      pp: 4,
      dp: 2,
      ep: 8,
      etp: 1,
      distributedOptimizer: true,
      moe: { experts: 128, ffn: 768, pattern: Array(48).fill(1), shared: 0 },
    });
    expect(stateBytes(m, 0)).toBeCloseTo(megatron + 12 * 256 * (6 + 12 / 2) - (h / 4) * (6 + 12 / 2), 0);
    // Per MoE layer and token: 10·h + 4·experts outside the split GEMMs, attention 4·(32 + 4)·128,
    // topk routed copies of the fc1 input (2·h) and the SwiGLU tensors (6·768).
    const perToken = (10 * h + 4 * 128) / 4 + (4 * 36 * 128 + 8 * (2 * h + 6 * 768)) / 4;
    expect(layerActivationBytes(cfg, 'moe', m.layout)).toBe(4096 * perToken);
    expect(m.stages[0].bytes.activations).toBe(4 * (12 * 4096 * perToken + (4096 * (8 + h)) / 4));
  });

  it('DeepSeek-V3: 671B plus an 11.6B MTP layer, laid out at TP2 PP8 EP64 with 7 and 6 layers on the ends', () => {
    const cfg = load('DeepSeek-V3');
    const count = parameterCount(cfg);
    expect(count.total / 1e9).toBeCloseTo(671, 0);
    const layout = {
      tp: 2,
      pp: 8,
      ep: 64,
      etp: 1,
      dp: 64,
      firstStageLayers: 7,
      lastStageLayers: 6,
      seqLength: 4096,
      sequenceParallel: true,
      distributedOptimizer: true,
    };
    const m = theoreticalMemory(cfg, layout);
    expect(m.layout.worldSize).toBe(1024);
    expect(m.layout.expertDp).toBe(2);
    expect(m.layout.stageLayers).toEqual([7, 8, 8, 8, 8, 8, 8, 6]);
    // DeepSeek publishes the MTP module as 14B in the HF files, with its own embedding and head;
    // Megatron shares those, and builds eh_proj, three norms and one MoE layer: ≈ 11.6B.
    expect((m.totalParameters - count.total) / 1e9).toBeCloseTo(11.6, 1);
    expect(m.totalParameters).toBe(megatronTotal(cfg, 2));
    // The last stage keeps a copy of the embedding for its MTP layer.
    const vocab = 129280 * 7168;
    expect(m.stages[7].parameters.embedding).toBe(vocab / 2);
    expect(rebuilt(m)).toBe(m.totalParameters + vocab);
    // The first 3 layers are dense: stage 0 holds 4 MoE layers' 4 experts each, whole (etp = 1).
    expect(m.stages[0].parameters.experts).toBe(4 * 4 * 3 * 7168 * 2048);
    expect(m.stages[0].parameters.denseMlp).toBe((3 * 3 * 7168 * 18432) / 2);
    // MLA's down projections and latent norms are whole on every tp rank.
    const replicatedMla = 7168 * 1536 + 1536 + 7168 * (512 + 64) + 512;
    const splitMla = 1536 * 128 * 192 + 512 * 128 * 256 + 128 * 128 * 7168;
    expect(m.stages[1].parameters.attention).toBe(8 * (replicatedMla + splitMla / 2));
    expect(m.stages[0].bytes.optimizer).toBeCloseTo(
      12 * ((m.stages[0].parameters.total - m.stages[0].parameters.expertParallel) / 64) +
        12 * (m.stages[0].parameters.expertParallel / 2),
      0,
    );
    expect(m.total).toBe(Math.max(...m.stages.map((s) => s.bytes.total)));
    expect(formatGiB(m.total)).toMatch(/^\d+\.\d\d GiB$/);
  });
});
