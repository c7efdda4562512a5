// The memory-bound kernels of the 1B bench step at its shapes (bf16, s 2048, b 4, h 2048, ffn 8192,
// 32 heads of 64), for Nsight Compute: gpu/run.sh's `ncu` step runs it under `ncu` limited to the
// norm, RoPE, gated-activation and binary kernels, to read how close each comes to the DRAM
// bandwidth. One pass: RMSNorm forward and backward (the weight gradient fused, the input
// gradient added into a waiting one), RoPE forward and inverse on q as the QKV projection lays it
// out, SwiGLU forward and backward, one residual-sized add, the cross-entropy statistics (one pass)
// and gradient of [s b, 32000] logits. Prints one line.
// usage (repository root; needs packages/tensor/dist): tsx packages/cuda/gpu/stream-ncu.mts [cuda:0 | cudaemu:0] [tiny]
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const root = process.env.MEGAPATCH_ROOT ?? process.cwd();
const device = process.argv[2] ?? 'cuda:0';
const tiny = process.argv[3] === 'tiny';
const url = (p: string) => pathToFileURL(resolve(root, p)).href;
const T: typeof import('@megapatch/tensor') = await import(url('packages/tensor/dist/index.js'));
await import(
  url(device.startsWith('cudaemu') ? 'packages/cuda/src/emulator.ts' : 'packages/cuda/src/index.ts')
);

const [s, b, h, f, heads, d] = tiny ? [64, 2, 64, 128, 4, 16] : [2048, 4, 2048, 8192, 32, 64];
const gen = new T.Generator(5);
const rnd = (shape: number[], grad = false) => {
  const t = T.randn(shape, { generator: gen }).to(device, 'bfloat16');
  return grad ? t.requiresGrad_(true) : t;
};
const t0 = performance.now();
// RMSNorm: h = x * 1 gets the residual path's gradient first, then the norm's is added into it
const x = rnd([s, b, h], true);
const w = rnd([h], true);
const hx = x.mul(1);
const y = T.rmsNorm(hx, [h], w, 1e-5)
  .mul(rnd([s, b, h]))
  .sum()
  .add(hx.mul(rnd([s, b, h])).sum());
y.backward();
// RoPE on q read where a fused QKV projection writes it ([s, b, heads, d] -> [b, heads, s, d])
const q = rnd([s, b, heads, d], true);
const ang = T.arange(0, s * d, 1, { device })
  .reshape(s, d)
  .float()
  .mul(1e-3);
const qr = T.applyRotaryPosEmb(q.permute(1, 2, 0, 3), ang.cos(), ang.sin());
qr.backward(rnd([b, heads, s, d]));
// SwiGLU and a residual-sized add
const gu = rnd([s, b, 2 * f], true);
T.gatedActivation(gu, 'swiglu').backward(rnd([s, b, f]));
const sum = rnd([s, b, h]).add(rnd([s, b, h]));
// the loss of one rank holding the whole vocabulary: statistics in one pass, then the gradient
const vocab = tiny ? 1000 : 32000;
const logits = rnd([s * b, vocab]);
const labels = T.randint(0, vocab, [s * b], { device, dtype: 'int64' });
const layout = { start: 0, localReal: vocab };
const { rowMax, stats } = T.crossEntropyShardMaxStats(logits, labels, layout);
const lse = stats.select(0, 1).log();
const dLogits = T.crossEntropyShardGrad(logits, labels, rowMax, lse, T.onesLike(lse), {
  ...layout,
  vocabSize: vocab,
});
const check =
  x.grad!.float().square().sum().item() + sum.float().sum().item() + dLogits.float().abs().sum().item();
console.log(
  `stream-ncu ${device}: s${s} b${b} h${h} ffn${f}: ${check.toPrecision(6)} in ${(performance.now() - t0).toFixed(1)} ms`,
);
