// pnpm bench for @megapatch/train: training throughput of a Llama-architecture model at a CPU size,
// as tokens/s and MFU, with the step broken into data, forward, backward, optimizer and
// communication time. The peak is this CPU's fp32 GEMM rate measured in the same run (a 1024³
// matmul through OpenBLAS), so MFU = Megatron's FLOP count of a step / step time / that rate.
// Prints one JSON line per case. Usage: node bench/run.mjs [--iters N]
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { IndexedDatasetBuilder } from '@megapatch/data';
import { getNumThreads, matmul, randn } from '@megapatch/tensor';
import { parseRunConfig, train } from '../dist/index.js';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
};
const iters = arg('iters', 6);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-train-bench-'));

function gemmPeak() {
  const n = 1024;
  const a = randn([n, n]);
  const b = randn([n, n]);
  matmul(a, b).dispose();
  let best = Number.POSITIVE_INFINITY;
  for (let i = 0; i < 8; i++) {
    const t0 = performance.now();
    matmul(a, b).dispose();
    best = Math.min(best, performance.now() - t0);
  }
  a.dispose();
  b.dispose();
  return (2 * n ** 3) / (best / 1000);
}

const hf = path.join(dir, 'model');
fs.mkdirSync(hf);
fs.writeFileSync(
  path.join(hf, 'config.json'),
  JSON.stringify({
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: 512,
    intermediate_size: 1408,
    num_hidden_layers: 4,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    vocab_size: 32000,
    max_position_embeddings: 1024,
    tie_word_embeddings: true,
    hidden_act: 'silu',
  }),
);
const prefix = path.join(dir, 'corpus');
const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
for (let d = 0; d < 2000; d++)
  b.addDocument(Array.from({ length: 200 }, (_, i) => 10 + ((d * 31 + i * 7) % 31000)));
b.finalize();

const peak = gemmPeak();
for (const dtype of ['fp32', 'bf16']) {
  const runDir = path.join(dir, `run-${dtype}`);
  const seq = 256;
  const gbs = 8;
  await train(
    parseRunConfig({
      model: { config: hf, dtype },
      data: { dataPath: [prefix], seqLength: seq, split: '100,0,0' },
      training: {
        microBatchSize: 2,
        globalBatchSize: gbs,
        trainIters: iters,
        evalInterval: null,
        logInterval: 1000,
      },
      optimizer: { lr: 1e-4 },
      logging: { runDir },
    }),
    { log: () => {}, report: false },
  );
  const rows = fs
    .readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .filter((m) => m.kind === 'train')
    .slice(1); // the first step allocates the optimizer state
  const mean = (f) => rows.reduce((a, m) => a + f(m), 0) / rows.length;
  const stepMs = mean((m) => m.elapsedMs);
  const tflops = mean((m) => m.tflops);
  const t = (k) => Number(mean((m) => m.timers[k]).toFixed(1));
  console.log(
    JSON.stringify({
      name: `llama-512x4-seq${seq}-gbs${gbs}-${dtype}`,
      unit: 'MFU',
      ours: Number(((tflops * 1e12) / peak).toFixed(3)),
      reference: Number((peak / 1e9).toFixed(1)),
      referenceName: `fp32 GEMM 1024³ GFLOP/s here, ${getNumThreads()} threads`,
      tokensPerSecond: Number(((gbs * seq) / (stepMs / 1000)).toFixed(0)),
      stepMs: Number(stepMs.toFixed(1)),
      breakdownMs: {
        data: t('dataMs'),
        forward: t('forwardMs'),
        backward: t('backwardMs'),
        optimizer: t('optimizerMs'),
        // one process: no gradient reduction (under megapatch launch the DP reductions show here)
        communication: t('commMs'),
        exposedCommunication: t('exposedCommMs'),
      },
      achievedGflops: Number((tflops * 1000).toFixed(1)),
    }),
  );
}
fs.rmSync(dir, { recursive: true, force: true });
