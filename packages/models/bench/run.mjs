// pnpm bench for @megapatch/models: a Qwen3-architecture model at a CPU size (Qwen3-0.6B's widths,
// 4 layers, sequence 512) against the same model in PyTorch on the same threads, measured in the same
// run: one training step (forward, backward, AdamW) in fp32 and in bf16, and KV-cache decoding.
// Prints one JSON line per case: {"name", "unit", "ours", "reference", "referenceName", "ratio"}.
// Usage: node bench/run.mjs [--layers N] [--seq N] [--steps N]
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeTransformerConfig } from '@megapatch/convert';
import {
  AdamW,
  fromTypedArray,
  getNumThreads,
  memoryStats,
  resetPeakMemoryStats,
  tidy,
} from '@megapatch/tensor';
import { GPTModel, generate, theoreticalMemory } from '../dist/index.js';

const here = dirname(fileURLToPath(import.meta.url));
const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
};
const threads = getNumThreads();
const shape = {
  threads,
  hidden: 1024,
  ffn: 3072,
  layers: arg('layers', 4),
  heads: 16,
  kvHeads: 8,
  headDim: 128,
  vocab: 151936,
  seq: arg('seq', 512),
  steps: arg('steps', 3),
  prompt: 32,
  newTokens: 64,
};
const config = makeTransformerConfig({
  numLayers: shape.layers,
  hiddenSize: shape.hidden,
  ffnHiddenSize: shape.ffn,
  numAttentionHeads: shape.heads,
  numQueryGroups: shape.kvHeads,
  kvChannels: shape.headDim,
  layernormEpsilon: 1e-6,
  qkLayernorm: true,
  rotaryBase: 1e6,
  untieEmbeddingsAndOutputWeights: false,
  vocabSize: shape.vocab,
  maxPositionEmbeddings: 40960,
});

function randomIds(n, seed) {
  let a = seed;
  return BigInt64Array.from({ length: n }, () => {
    a = (a * 1103515245 + 12345) % 2147483648;
    return BigInt(a % shape.vocab);
  });
}

function trainStep(dtype) {
  const model = new GPTModel(config, { dtype });
  const opt = new AdamW(model.parameters(), { lr: 1e-4 });
  const ids = fromTypedArray(randomIds(shape.seq, 1), [1, shape.seq]);
  const labels = fromTypedArray(randomIds(shape.seq, 2), [1, shape.seq]);
  const times = [];
  let peak = 0;
  for (let i = 0; i <= shape.steps; i++) {
    resetPeakMemoryStats();
    const t0 = performance.now();
    tidy(() => {
      const loss = model.forward(ids, { labels }).loss.mean();
      loss.backward();
    });
    opt.step();
    model.zeroGrad();
    if (i > 0) times.push((performance.now() - t0) / 1000);
    peak = Math.max(peak, memoryStats().peakBytes);
  }
  opt.dispose?.();
  model.dispose();
  times.sort((a, b) => a - b);
  return { seconds: times[Math.floor(times.length / 2)], peak };
}

function decode() {
  const model = new GPTModel(config);
  const prompt = Array.from(randomIds(shape.prompt, 3), Number);
  generate(model, [prompt], { maxNewTokens: 4 });
  const r = generate(model, [prompt], { maxNewTokens: shape.newTokens });
  model.dispose();
  return shape.newTokens / r.seconds;
}

function report(name, unit, ours, reference, referenceName, extra = {}) {
  console.log(
    JSON.stringify({
      name,
      unit,
      ours: Number(ours.toPrecision(4)),
      reference: Number(reference.toPrecision(4)),
      referenceName,
      ratio: Number((ours / reference).toFixed(3)),
      ...extra,
    }),
  );
}

const torchOut = JSON.parse(
  execFileSync(
    process.env.MEGAPATCH_PYTHON ?? '/usr/bin/python3',
    [join(here, 'torch_qwen3.py'), JSON.stringify(shape)],
    {
      encoding: 'utf8',
      env: { ...process.env, OMP_NUM_THREADS: String(threads) },
    },
  ),
);
const ref = `PyTorch ${torchOut.torch} CPU, ${threads} threads`;
const estimate = (paramDtype) =>
  theoreticalMemory(config, { seqLength: shape.seq, microBatchSize: 1, paramDtype }).stages[0].bytes.total;
const f32 = trainStep('float32');
report('qwen3-train-step-fp32', 's', f32.seconds, torchOut.trainFp32, ref, {
  peakBytes: f32.peak,
  estimateBytes: estimate('fp32'),
});
const bf16 = trainStep('bfloat16');
report('qwen3-train-step-bf16', 's', bf16.seconds, torchOut.trainBf16, ref, {
  peakBytes: bf16.peak,
  estimateBytes: estimate('bf16'),
  overFp32: Number((bf16.seconds / f32.seconds).toFixed(3)),
});
report('qwen3-decode-fp32', 'tokens/s', decode(), torchOut.decodeFp32, ref);
