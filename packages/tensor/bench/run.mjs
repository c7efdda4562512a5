// pnpm bench for @megapatch/tensor: one JSON line per case with a reference measured in the same
// run on the same threads: {"name", "unit", "ours", "reference", "referenceName", "ratio"}.
// Usage: node bench/run.mjs [case-name-substring ...]
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as T from '../dist/index.js';

const here = dirname(fileURLToPath(import.meta.url));
const python = process.env.MEGAPATCH_PYTHON ?? '/usr/bin/python3';
const threads = T.getNumThreads();
const filters = process.argv.slice(2);
const want = (name) => filters.length === 0 || filters.some((f) => name.includes(f));

function reference(...args) {
  try {
    const env = { ...process.env, OPENBLAS_NUM_THREADS: String(threads), OMP_NUM_THREADS: String(threads) };
    return JSON.parse(
      execFileSync(python, [join(here, 'reference.py'), ...args, String(threads)], { env, encoding: 'utf8' }),
    );
  } catch (e) {
    return { value: Number.NaN, unit: '', name: `unavailable (${e.message.split('\n')[0]})` };
  }
}

function bestOf(fn, reps) {
  fn();
  let best = Number.POSITIVE_INFINITY;
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    fn();
    best = Math.min(best, performance.now() - t0);
  }
  return best / 1000;
}

// ratio = ours / reference: above 1 is better for GFLOP/s, below 1 is better for times
function report(name, unit, ours, ref) {
  const ratio = ours / ref.value;
  console.log(
    JSON.stringify({
      name,
      unit,
      ours: Number(ours.toPrecision(4)),
      reference: Number(ref.value.toPrecision(4)),
      referenceName: ref.name,
      ratio: Number(ratio.toFixed(3)),
    }),
  );
}

for (const n of [512, 1024, 2048]) {
  const name = `matmul-f32-${n}`;
  if (!want(name)) continue;
  const a = T.randn([n, n]);
  const b = T.randn([n, n]);
  const reps = n <= 512 ? 20 : n <= 1024 ? 8 : 3;
  const t = bestOf(() => T.matmul(a, b).dispose(), reps);
  a.dispose();
  b.dispose();
  report(name, 'GFLOP/s', (2 * n ** 3) / t / 1e9, reference('matmul', String(n)));
}

// bf16 GEMMs at transformer shapes: linear is x @ W^T with W [out, in] as in a layer, matmul a square
// product. Two rows each: the time against float32 here (bf16 should take at most ~0.6 of it) and
// GFLOP/s against PyTorch's bf16 op.
for (const [op, M, K, N] of [
  ['linear', 512, 1024, 3072],
  ['linear', 2048, 1024, 3072],
  ['matmul', 1024, 1024, 1024],
]) {
  const shape = `${M}x${K}x${N}`;
  const vsTorch = `${op}-bf16-${shape}`;
  const vsF32 = `${op}-bf16-over-f32-${shape}`;
  if (!want(vsTorch) && !want(vsF32)) continue;
  const x = T.randn([M, K]);
  const w = op === 'linear' ? T.randn([N, K]) : T.randn([K, N]);
  const xb = x.to('bfloat16');
  const wb = w.to('bfloat16');
  const run = op === 'linear' ? T.linear : T.matmul;
  const reps = M * K * N <= 2 ** 31 ? 10 : 5;
  const tf = bestOf(() => run(x, w).dispose(), reps);
  const tb = bestOf(() => run(xb, wb).dispose(), reps);
  for (const t of [x, w, xb, wb]) t.dispose();
  if (want(vsF32)) report(vsF32, 'ms', tb * 1000, { value: tf * 1000, name: 'megapatch float32' });
  if (want(vsTorch))
    report(vsTorch, 'GFLOP/s', (2 * M * K * N) / tb / 1e9, reference('gemm-bf16', `${op}:${shape}`));
}

if (want('op-dispatch')) {
  // fixed cost of one small elementwise op: allocation, checks, kernel call, result object
  const x = T.randn([16]);
  const y = T.randn([16]);
  const calls = 200_000;
  const per = bestOf(() => {
    for (let i = 0; i < calls; i++) T.add(x, y).dispose();
  }, 3);
  const us = (per / calls) * 1e6;
  console.log(
    JSON.stringify({
      name: 'op-dispatch',
      unit: 'us/call',
      ours: Number(us.toFixed(3)),
      reference: 5,
      referenceName: 'target',
      ratio: Number((us / 5).toFixed(3)),
    }),
  );
}

for (const mode of ['causal', 'varlen']) {
  const name = `attention-${mode}`;
  if (!want(name) || typeof T.scaledDotProductAttention !== 'function') continue;
  const [B, H, S, D] = [1, 8, 1024, 64];
  const q = T.randn([B, H, S, D], { requiresGrad: true });
  const k = T.randn([B, H, S, D], { requiresGrad: true });
  const v = T.randn([B, H, S, D], { requiresGrad: true });
  const g = T.randn([B, H, S, D]);
  const cuSeqlens = T.tensor([0, 400, 700, 900, 1024], { dtype: 'int32' });
  const t = bestOf(() => {
    T.tidy(() => {
      const o = T.scaledDotProductAttention(
        q,
        k,
        v,
        mode === 'causal' ? { isCausal: true } : { isCausal: true, cuSeqlens },
      );
      o.backward(g);
    });
    for (const p of [q, k, v]) {
      p.grad?.dispose();
      p.grad = null;
    }
  }, 5);
  report(name, 'ms', t * 1000, reference('attention', mode));
}
