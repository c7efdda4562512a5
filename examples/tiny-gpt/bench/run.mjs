// gpt-train-step: seconds per optimizer step of the tiny-gpt model at a fixed size (4 layers,
// hidden 256, 8 heads, seq 256, batch 8, fp32) against the same model in PyTorch on the same
// threads, measured in the same run. One JSON line, like packages/tensor/bench/run.mjs.
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { AdamW, clipGradNorm, getNumThreads, manualSeed, randint, tidy } from '@megapatch/tensor';
import { GPT } from '../dist/index.js';

const here = dirname(fileURLToPath(import.meta.url));
const cfg = { layers: 4, hidden: 256, heads: 8, seq: 256, batch: 8, vocab: 256 };
const steps = Number(process.env.BENCH_STEPS ?? 6);
const threads = getNumThreads();

manualSeed(0);
const model = new GPT({
  vocabSize: cfg.vocab,
  numLayers: cfg.layers,
  hiddenSize: cfg.hidden,
  numAttentionHeads: cfg.heads,
  maxSeqLength: cfg.seq,
});
const params = model.parameters();
const opt = new AdamW(params, { lr: 1e-3, betas: [0.9, 0.95], weightDecay: 0.1 });
const idx = randint(0, cfg.vocab, [cfg.batch, cfg.seq]);
const labels = randint(0, cfg.vocab, [cfg.batch, cfg.seq]);
const step = () => {
  tidy(() => model.loss(idx, labels).backward());
  clipGradNorm(params, 1.0);
  opt.step();
  opt.zeroGrad();
};
for (let i = 0; i < 2; i++) step();
const times = [];
for (let i = 0; i < steps; i++) {
  const t0 = performance.now();
  step();
  times.push((performance.now() - t0) / 1000);
}
times.sort((a, b) => a - b);
const ours = times[Math.floor(times.length / 2)];

let ref;
try {
  const args = [cfg.layers, cfg.hidden, cfg.heads, cfg.seq, cfg.batch, cfg.vocab, threads, steps].map(String);
  ref = JSON.parse(
    execFileSync(
      process.env.MEGAPATCH_PYTHON ?? '/usr/bin/python3',
      [join(here, 'reference_gpt.py'), ...args],
      {
        encoding: 'utf8',
        env: { ...process.env, OMP_NUM_THREADS: String(threads) },
      },
    ),
  );
} catch (e) {
  ref = { value: Number.NaN, name: `unavailable (${e.message.split('\n')[0]})` };
}
console.log(
  JSON.stringify({
    name: 'gpt-train-step',
    unit: 's/step',
    ours: Number(ours.toPrecision(4)),
    reference: Number(ref.value.toPrecision(4)),
    referenceName: ref.name,
    ratio: Number((ours / ref.value).toFixed(3)),
  }),
);
