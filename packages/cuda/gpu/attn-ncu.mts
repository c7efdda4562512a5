// One causal attention forward and backward at the bench's model-layer shape (B 4, Hq 32, Hkv 8,
// S 2048, D 64, bf16), for Nsight Compute: gpu/run.sh's `ncu` step runs it under `ncu`, limited to
// the attention kernels, with the default kernels and variants the bench compares
// (MEGAPATCH_ATTENTION_WGMMA=1 with MEGAPATCH_ATTENTION_WGMMA_BWD=1, MEGAPATCH_ATTENTION_DQ_OCC=1).
// Prints one line per pass.
// usage (repository root; needs packages/tensor/dist): tsx packages/cuda/gpu/attn-ncu.mts [cuda:0 | cudaemu:0] [tiny]
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

const [B, Hq, Hkv, S, D] = tiny ? [1, 4, 2, 64, 64] : [4, 32, 8, 2048, 64];
const make = (h: number) =>
  T.randn([B, h, S, D], { generator: new T.Generator(h) })
    .to(device, 'bfloat16')
    .requiresGrad_(true);
const [q, k, v] = [make(Hq), make(Hkv), make(Hkv)];
const g = T.randn([B, Hq, S, D], { generator: new T.Generator(7) }).to(device, 'bfloat16');
const t0 = performance.now();
const out = T.scaledDotProductAttention(q, k, v, { isCausal: true });
out.backward(g);
const norm = q.grad!.float().square().sum().item();
console.log(
  `attn-ncu ${device} B${B} Hq${Hq} Hkv${Hkv} S${S} D${D}: |dq|^2 ${norm.toPrecision(6)} in ${(performance.now() - t0).toFixed(1)} ms (${
    Object.entries(process.env)
      .filter(([k]) => k.startsWith('MEGAPATCH_ATTENTION_'))
      .map(([k, v]) => `${k}=${v}`)
      .join(' ') || 'default kernels'
  })`,
);
