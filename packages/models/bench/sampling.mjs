// pnpm bench for @megapatch/models: picking one next token from one row of logits (sampleToken:
// temperature, top-k, top-p over the whole vocabulary, as generate does for every row and step)
// for the vocabularies of Llama 2 (32000), Llama 3 (128256) and Qwen2.5 (151936), against the
// same sampling in PyTorch on the CPU (bench/torch_sampling.py: torch.topk, a descending sort with
// a cumulative softmax, torch.multinomial) on the same threads, measured in the same run.
// Prints one JSON line per case: {"name", "unit", "ours", "reference", "referenceName", "ratio"}.
// Usage: node bench/sampling.mjs [--iters N]
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { getNumThreads } from '@megapatch/tensor';
import { sampleToken, samplingRng } from '../dist/index.js';

const here = dirname(fileURLToPath(import.meta.url));
const i = process.argv.indexOf('--iters');
const iters = i >= 0 ? Number(process.argv[i + 1]) : 20;
const threads = getNumThreads();
const CASES = [];
for (const vocab of [32000, 128256, 151936]) {
  CASES.push({ name: `sample-v${vocab}-t0.8`, vocab, temperature: 0.8 });
  CASES.push({ name: `sample-v${vocab}-t0.8-topk50`, vocab, temperature: 0.8, topK: 50 });
  CASES.push({ name: `sample-v${vocab}-t0.8-topp0.9`, vocab, temperature: 0.8, topP: 0.9 });
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function ours(c) {
  const r = samplingRng(1);
  const logits = new Float32Array(c.vocab);
  // normal-ish logits (a sum of uniforms), scaled as a model's
  for (let v = 0; v < c.vocab; v++) logits[v] = (r() + r() + r() + r() - 2) * 7;
  const times = [];
  for (let k = 0; k < iters + 2; k++) {
    const t0 = performance.now();
    sampleToken(logits, c, r);
    if (k >= 2) times.push(performance.now() - t0);
  }
  return median(times);
}

const torchOut = JSON.parse(
  execFileSync(
    process.env.MEGAPATCH_PYTHON ?? '/usr/bin/python3',
    [join(here, 'torch_sampling.py'), JSON.stringify({ threads, iters, cases: CASES })],
    { encoding: 'utf8' },
  ),
);
const ref = `PyTorch ${torchOut.torch} CPU, ${threads} threads`;
for (const c of CASES) {
  const o = ours(c);
  const t = torchOut.ms[c.name];
  console.log(
    JSON.stringify({
      name: c.name,
      unit: 'ms',
      ours: Number(o.toPrecision(4)),
      reference: Number(t.toPrecision(4)),
      referenceName: ref,
      ratio: Number((o / t).toFixed(3)),
    }),
  );
}
