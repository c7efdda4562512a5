// The megapatch side of the GPU bench (gpu-bench.sh runs it; torch_ref.py is the PyTorch side):
//   gemm  bf16 C = A·B through matmul (cuBLASLt on cuda:0): median TFLOP/s per product
//   grouped  bf16 groupedLinear (MoE experts' GEMMs) with uneven groups: median TFLOP/s of the
//         forward and of forward + backward, in the grouped GEMM's mode (MEGAPATCH_GROUPED_GEMM:
//         loop, streams, grouped = cuBLAS's, mma = our tensor-core kernel, tiled)
//   attn  causal scaledDotProductAttention, bf16: median ms of forward and of forward+backward
//   stream  the step's memory-bound kernels (norm, RoPE, SwiGLU, cross-entropy, add, copy) at its shapes: ms, GB/s
//   train a Llama-style bf16 training step through @megapatch/train on the device: tokens/s, MFU
//         (Megatron's FLOP count / step time / the peak in cases.json) and the step's breakdown
//   moe-train  the same for a Mixtral-style MoE model (cases.json's trainMoe)
//   generate  decoding with the KV cache on the train case's model: new tokens/s, greedy and top-p
// One JSON line per case on stdout (progress on stderr). The cases are in cases.json.
//
// usage (repository root): packages/cuda/node_modules/.bin/tsx packages/cuda/bench/ours.mts [gemm] [grouped] [attn] [stream] [train] [moe-train] [generate]
// env: MEGAPATCH_BENCH_DEVICE (cuda:0; cudaemu:0 for the emulator), MEGAPATCH_BENCH_TINY=1 (the
// tiny cases), MEGAPATCH_BENCH_MBS (the training micro-batch), MEGAPATCH_BENCH_LAYERS (the
// training model's layers), MEGAPATCH_BENCH_CASE_BUDGET_S (seconds of timed runs per gemm/attn
// case, default 4). On the emulator the training case also reports the kernel launches of a step;
// with MEGAPATCH_CUDA_EMU_DRY_RUN=1 the launches are only counted, so its times are the host's
// side of the step at full size (JS, the addon, allocation: what the GPU must not wait for).
//
// Runs from sources only: src-resolve.mjs maps every @megapatch/* import to packages/*/src, so
// the tensor package, the CUDA backend and the trainer share one module instance (one device
// registry) and no dist build is needed.
import * as fs from 'node:fs';
import { register } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Tensor } from '@megapatch/tensor';

register('./src-resolve.mjs', import.meta.url);

const here = path.dirname(fileURLToPath(import.meta.url));
const device = process.env.MEGAPATCH_BENCH_DEVICE ?? 'cuda:0';
const emu = device.startsWith('cudaemu');
const tiny = process.env.MEGAPATCH_BENCH_TINY === '1';
const parts = process.argv.slice(2).filter((a) => !a.startsWith('-'));
const want = (p: string) => parts.length === 0 || parts.includes(p);
const caseBudgetMs = Number(process.env.MEGAPATCH_BENCH_CASE_BUDGET_S ?? 4) * 1000;
const allCases = JSON.parse(fs.readFileSync(path.join(here, 'cases.json'), 'utf8'));
const cases = allCases[tiny ? 'tiny' : 'full'];
const peakTflops: number = allCases.peakTflops;

const T: typeof import('@megapatch/tensor') = await import('@megapatch/tensor');
const cudaModule: typeof import('../src/profile.js') = await import(
  emu ? '../src/emulator.js' : '../src/index.js'
);
const native = await import('../src/native.js');
// the addon the backend uses (require() caches it): its synchronize() waits for the device's
// stream. @megapatch/tensor's synchronize() only evaluates deferred checks when some are queued.
const loaded = emu ? native.loadEmulatorAddon() : native.loadAddon();
if ('error' in loaded) throw new Error(loaded.error);
const addon = loaded.addon as import('../src/native.js').BackendAddon;
const sync = () => {
  addon.synchronize();
  T.synchronize(device);
};

const log = (s: string) => process.stderr.write(`[ours ${device}] ${s}\n`);
const emit = (o: Record<string, unknown>) =>
  process.stdout.write(`${JSON.stringify({ side: 'megapatch', device, tiny, ...o })}\n`);
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const r4 = (x: number) => Number(x.toPrecision(4));

/**
 * Times fn (which only enqueues work): warm-up, then samples of `reps` back-to-back calls between
 * two stream synchronisations on the host clock, reps chosen so a sample lasts ≥ minSampleMs
 * (launch and sync costs amortised, the GPU kept busy as in a training step). Median ms per call.
 */
function timeIt(
  fn: () => void,
  o: {
    warm?: number;
    minSamples?: number;
    maxSamples?: number;
    minSampleMs?: number;
    budgetMs?: number;
  } = {},
) {
  const { warm = 3, minSamples = 3, maxSamples = 25, minSampleMs = 2, budgetMs = caseBudgetMs } = o;
  for (let i = 0; i < warm; i++) fn();
  sync();
  let t0 = performance.now();
  fn();
  sync();
  const once = performance.now() - t0;
  const reps = Math.max(1, Math.min(50, Math.ceil(minSampleMs / Math.max(once, 1e-3))));
  const samples: number[] = [];
  const start = performance.now();
  while (samples.length < maxSamples) {
    if (samples.length >= minSamples && performance.now() - start > budgetMs) break;
    sync();
    t0 = performance.now();
    for (let r = 0; r < reps; r++) fn();
    sync();
    samples.push((performance.now() - t0) / reps);
  }
  const s = [...samples].sort((a, b) => a - b);
  return {
    ms: median(samples),
    minMs: s[0],
    maxMs: s[s.length - 1],
    samples: samples.length,
    reps,
  };
}

const randBf16 = (shape: number[]) => T.randn(shape, { device, dtype: 'bfloat16' });

function bf16ToF64(t: Tensor): Float64Array {
  return Float64Array.from(t.to('cpu', 'float32').toTypedArray() as Float32Array);
}

// ---------------------------------------------------------------------------------------------
if (want('gemm')) {
  T.manualSeed(1);
  for (const c of cases.gemm) {
    const { M, N, K, ta, tb } = c;
    try {
      const As = randBf16(ta ? [K, M] : [M, K]);
      const Bs = randBf16(tb ? [N, K] : [K, N]);
      const A = ta ? As.t() : As;
      const B = tb ? Bs.t() : Bs;
      // a spot check of the product: rows 0..3 (all rows at tiny sizes) against float64 on the host
      let relErr: number | null = null;
      if (tiny || c.case === 'square-4096') {
        const C = T.matmul(A, B);
        const rows = Math.min(M, tiny ? M : 4);
        const a = bf16ToF64(A.narrow(0, 0, rows).contiguous());
        const b = bf16ToF64(B.contiguous());
        const got = bf16ToF64(C.narrow(0, 0, rows).contiguous());
        let num = 0;
        let den = 0;
        for (let i = 0; i < rows; i++)
          for (let j = 0; j < N; j++) {
            let s = 0;
            for (let k = 0; k < K; k++) s += a[i * K + k] * b[k * N + j];
            num += (got[i * N + j] - s) ** 2;
            den += s * s;
          }
        relErr = Math.sqrt(num / den);
        C.dispose();
      }
      const r = timeIt(() => T.matmul(A, B).dispose(), { maxSamples: 30 });
      const flops = 2 * M * N * K;
      // the same with MEGAPATCH_GEMM_AUTOTUNE=1 (its own plan: cuBLASLt's candidates timed at the
      // first call, which timeIt's warm-up takes)
      let tuned: ReturnType<typeof timeIt> | null = null;
      if (!emu) {
        process.env.MEGAPATCH_GEMM_AUTOTUNE = '1';
        try {
          tuned = timeIt(() => T.matmul(A, B).dispose(), { maxSamples: 30 });
        } finally {
          delete process.env.MEGAPATCH_GEMM_AUTOTUNE;
        }
      }
      emit({
        kind: 'gemm',
        case: c.case,
        M,
        N,
        K,
        layout: `${ta ? 'T' : 'N'}${tb ? 'T' : 'N'}`,
        ms: r4(r.ms),
        tflops: r4(flops / (r.ms / 1000) / 1e12),
        minMs: r4(r.minMs),
        maxMs: r4(r.maxMs),
        samples: r.samples,
        reps: r.reps,
        relErr: relErr === null ? null : r4(relErr),
        engine: emu ? 'emulator (tiled kernel)' : addon.gemmEngine(),
        ...(tuned ? { autotuneTflops: r4(flops / (tuned.ms / 1000) / 1e12) } : {}),
      });
      for (const t of [A, B, As, Bs]) if (!t.disposed) t.dispose();
    } catch (e) {
      emit({ kind: 'gemm', case: c.case, error: String((e as Error).message).split('\n')[0] });
    }
    log(`gemm ${c.case} done`);
  }
}

// ---------------------------------------------------------------------------------------------
/** Rows per expert of a grouped case (cases.json's _comment; torch_ref.py computes the same). */
function groupSizes(E: number, N: number): number[] {
  const w = Array.from({ length: E }, (_, e) => 1 + ((37 * e) % 11));
  const W = w.reduce((a, b) => a + b, 0);
  const sizes = w.map((x) => Math.floor((N * x) / W));
  sizes[E - 1] += N - sizes.reduce((a, b) => a + b, 0);
  return sizes;
}

if (want('grouped')) {
  T.manualSeed(3);
  // (unset: the device's default, the loop on a GPU; the emulator's is its grouped tiled kernel)
  // (MEGAPATCH_BENCH_GROUPED_MODE: the name gpu-bench.sh gives a setting, e.g. wgmma256)
  const mode = process.env.MEGAPATCH_BENCH_GROUPED_MODE || process.env.MEGAPATCH_GROUPED_GEMM || 'default';
  for (const c of cases.grouped ?? []) {
    const { E, N, K, F } = c;
    try {
      const sizes = groupSizes(E, N);
      const x = randBf16([N, K]);
      const ws = Array.from({ length: E }, () => randBf16([F, K]));
      // a spot check: the first rows of the first and last expert against float64 on the host
      const y = T.groupedLinear(x, ws, sizes);
      let num = 0;
      let den = 0;
      for (const [e, row] of [
        [0, 0],
        [E - 1, N - sizes[E - 1]],
      ]) {
        const xr = bf16ToF64(x.narrow(0, row, 1).contiguous());
        const wf = bf16ToF64(ws[e]);
        const got = bf16ToF64(y.narrow(0, row, 1).contiguous());
        for (let f = 0; f < F; f++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += xr[k] * wf[f * K + k];
          num += (got[f] - s) ** 2;
          den += s * s;
        }
      }
      y.dispose();
      const r = timeIt(() => T.groupedLinear(x, ws, sizes).dispose(), { maxSamples: 30 });
      // forward + backward (the input gradient dy W_e and the weight gradients dy_e^T x_e: the other
      // two operand layouts), 3 times the forward's FLOPs
      const xg = x.requiresGrad_();
      const wg = ws.map((w) => w.requiresGrad_());
      const gy = randBf16([N, F]);
      const rt = timeIt(
        () => {
          const yt = T.groupedLinear(xg, wg, sizes);
          yt.backward(gy);
          yt.dispose();
          for (const t of [xg, ...wg]) {
            t.grad?.dispose();
            t.grad = null;
          }
        },
        { maxSamples: 30 },
      );
      emit({
        kind: 'grouped',
        case: c.case,
        mode,
        E,
        N,
        K,
        F,
        ms: r4(r.ms),
        tflops: r4((2 * N * K * F) / (r.ms / 1000) / 1e12),
        trainMs: r4(rt.ms),
        trainTflops: r4((6 * N * K * F) / (rt.ms / 1000) / 1e12),
        minMs: r4(r.minMs),
        maxMs: r4(r.maxMs),
        samples: r.samples,
        reps: r.reps,
        relErr: r4(Math.sqrt(num / den)),
      });
      for (const t of [x, ...ws, gy]) t.dispose();
    } catch (e) {
      emit({ kind: 'grouped', case: c.case, mode, error: String((e as Error).message).split('\n')[0] });
    }
    log(`grouped ${c.case} (${mode}) done`);
  }
}

// ---------------------------------------------------------------------------------------------
if (want('attn')) {
  T.manualSeed(2);
  for (const c of cases.attn) {
    const { B, Hq, Hkv, S, D } = c;
    const Dv: number = c.Dv ?? D;
    // QK^T and PV, causal: half of 2·B·Hq·S²·(D + Dv)
    const fwdFlops = (2 * B * Hq * S * S * (D + Dv)) / 2;
    try {
      const q = randBf16([B, Hq, S, D]);
      const k = randBf16([B, Hkv, S, D]);
      const v = randBf16([B, Hkv, S, Dv]);
      const dout = randBf16([B, Hq, S, Dv]);
      const opts = { isCausal: true };
      const fwd = timeIt(() => T.scaledDotProductAttention(q, k, v, opts).dispose(), {
        warm: 2,
        maxSamples: 20,
      });
      // a finiteness check of one output and its gradients
      for (const t of [q, k, v]) t.requiresGrad_();
      const step = () => {
        const out = T.scaledDotProductAttention(q, k, v, opts);
        T.backward(out, dout);
        out.dispose();
        for (const t of [q, k, v]) {
          t.grad?.dispose();
          t.grad = null;
        }
      };
      {
        const out = T.scaledDotProductAttention(q, k, v, opts);
        T.backward(out, dout);
        const finite = [out, q.grad, k.grad, v.grad].every((t) => {
          if (!t) return false;
          const s = t.to('float32').abs().sum();
          const x = s.item();
          s.dispose();
          return Number.isFinite(x) && x > 0;
        });
        out.dispose();
        for (const t of [q, k, v]) {
          t.grad?.dispose();
          t.grad = null;
        }
        if (!finite) throw new Error('attention output or gradients not finite (or all zero)');
      }
      const fb = timeIt(step, { warm: 1, maxSamples: 20 });
      /** Forward and forward+backward timed with environment switches set, then restored. */
      const withSwitches = (pairs: [string, string][]) => {
        const prev = pairs.map(([name]) => process.env[name]);
        try {
          for (const [name, value] of pairs) process.env[name] = value;
          const f = timeIt(() => T.scaledDotProductAttention(q, k, v, opts).dispose(), {
            warm: 1,
            maxSamples: 10,
          });
          return { fwd: f, fb: timeIt(step, { warm: 1, maxSamples: 10 }) };
        } finally {
          pairs.forEach(([name], i) => {
            if (prev[i] === undefined) delete process.env[name];
            else process.env[name] = prev[i];
          });
        }
      };
      const withSwitch = (name: string, value: string) => withSwitches([[name, value]]);
      // variants to choose defaults from (the runs of 2026-12-04 settled MEGAPATCH_ATTENTION_PIPELINE=0,
      // MEGAPATCH_ATTENTION_FWD_ROWS=128 and, in run d, dK/dV tiles of 32 queries: all slower):
      // FlashAttention-2's single backward pass (dQ by atomics) against the dk/dv + dq pair; dq on
      // the caller's stream after dk/dv instead of beside it; with D + Dv <= 128, registers left
      // uncapped (fewer blocks an SM; capped is the default since run d), and the dQ kernel's
      // registers capped too
      const fused = withSwitch('MEGAPATCH_ATTENTION_BWD', 'fused');
      const oneStream = withSwitch('MEGAPATCH_ATTENTION_BWD_STREAMS', '1');
      const small = D + Dv <= 128;
      const uncapped = small ? withSwitch('MEGAPATCH_ATTENTION_OCC', '0') : null;
      const dqCapped = small ? withSwitch('MEGAPATCH_ATTENTION_DQ_OCC', '1') : null;
      // the mma.sync forward with 128 keys a tile (FlashAttention-2's for head dim 64)
      const keys128 = small ? withSwitch('MEGAPATCH_ATTENTION_FWD_KEYS', '128') : null;
      // the products on wgmma (sm_90a): the forward with 128 and 64 keys a tile, with and without
      // the overlap of the next tile's scores with P V; the backward; both (the mma.sync kernels
      // elsewhere); the same with two warpgroups a block; warp-specialised (left out with
      // MEGAPATCH_BENCH_WGMMA_WS=0: gpu/run.sh's check of it failed). Left out with MEGAPATCH_BENCH_WGMMA=0 (gpu/run.sh: its wgmma checks failed).
      const wgmmaForms: Record<string, [string, string][]> =
        process.env.MEGAPATCH_BENCH_WGMMA === '0'
          ? {}
          : {
              wgmmaMs: [['MEGAPATCH_ATTENTION_WGMMA', '1']],
              wgmma64Ms: [['MEGAPATCH_ATTENTION_WGMMA', '64']],
              wgmmaSerialMs: [
                ['MEGAPATCH_ATTENTION_WGMMA', '1'],
                ['MEGAPATCH_ATTENTION_WGMMA_OVERLAP', '0'],
              ],
              wgmma64SerialMs: [
                ['MEGAPATCH_ATTENTION_WGMMA', '64'],
                ['MEGAPATCH_ATTENTION_WGMMA_OVERLAP', '0'],
              ],
              wgmmaBwdMs: [['MEGAPATCH_ATTENTION_WGMMA_BWD', '1']],
              wgmmaBothMs: [
                ['MEGAPATCH_ATTENTION_WGMMA', '1'],
                ['MEGAPATCH_ATTENTION_WGMMA_BWD', '1'],
              ],
              // two warpgroups a block sharing each K/V (forward, dQ) or Q/dO (dK/dV) tile
              wgmma2Ms: [
                ['MEGAPATCH_ATTENTION_WGMMA', '1'],
                ['MEGAPATCH_ATTENTION_FWD_ROWS', '128'],
              ],
              wgmma64x2Ms: [
                ['MEGAPATCH_ATTENTION_WGMMA', '64'],
                ['MEGAPATCH_ATTENTION_FWD_ROWS', '128'],
              ],
              wgmmaBwd2Ms: [['MEGAPATCH_ATTENTION_WGMMA_BWD', '2']],
              wgmmaBoth2Ms: [
                ['MEGAPATCH_ATTENTION_WGMMA', '1'],
                ['MEGAPATCH_ATTENTION_FWD_ROWS', '128'],
                ['MEGAPATCH_ATTENTION_WGMMA_BWD', '2'],
              ],
              // warp-specialised (D + Dv <= 128): the forward (a loader warpgroup, two consumers
              // taking turns), dK/dV (a loader, two consumers of 64 keys; dQ on two warpgroups), dQ (a
              // loader, two consumers of 64 queries; dK/dV on two warpgroups), and both
              ...(small && process.env.MEGAPATCH_BENCH_WGMMA_WS !== '0'
                ? {
                    wgmmaWsMs: [
                      ['MEGAPATCH_ATTENTION_WGMMA', '64'],
                      ['MEGAPATCH_ATTENTION_WGMMA_WS', '1'],
                    ] as [string, string][],
                    wgmmaBwdWsMs: [['MEGAPATCH_ATTENTION_WGMMA_BWD', 'ws-dkdv']] as [string, string][],
                    wgmmaBwdWsDqMs: [['MEGAPATCH_ATTENTION_WGMMA_BWD', 'ws-dq']] as [string, string][],
                    wgmmaBwdWsBothMs: [['MEGAPATCH_ATTENTION_WGMMA_BWD', 'ws']] as [string, string][],
                  }
                : {}),
            };
      const wgmmaMs: Record<string, { fwd: number; fwdBwd: number }> = {};
      for (const [key, pairs] of Object.entries(wgmmaForms)) {
        const r = withSwitches(pairs);
        wgmmaMs[key] = { fwd: r4(r.fwd.ms), fwdBwd: r4(r.fb.ms) };
      }
      emit({
        kind: 'attn',
        case: c.case,
        B,
        Hq,
        Hkv,
        S,
        D,
        Dv,
        causal: true,
        modelLayer: c.modelLayer ?? false,
        fwdMs: r4(fwd.ms),
        fwdTflops: r4(fwdFlops / (fwd.ms / 1000) / 1e12),
        fwdBwdMs: r4(fb.ms),
        fwdBwdTflops: r4((3.5 * fwdFlops) / (fb.ms / 1000) / 1e12),
        fusedBwdMs: { fwd: r4(fused.fwd.ms), fwdBwd: r4(fused.fb.ms) },
        oneStreamMs: { fwd: r4(oneStream.fwd.ms), fwdBwd: r4(oneStream.fb.ms) },
        ...(uncapped ? { uncappedMs: { fwd: r4(uncapped.fwd.ms), fwdBwd: r4(uncapped.fb.ms) } } : {}),
        ...(dqCapped ? { dqCappedMs: { fwd: r4(dqCapped.fwd.ms), fwdBwd: r4(dqCapped.fb.ms) } } : {}),
        ...(keys128 ? { keys128Ms: { fwd: r4(keys128.fwd.ms), fwdBwd: r4(keys128.fb.ms) } } : {}),
        ...wgmmaMs,
        samples: [fwd.samples, fb.samples],
        spreadMs: [r4(fb.minMs), r4(fb.maxMs)],
      });
      for (const t of [q, k, v, dout]) t.dispose();
    } catch (e) {
      emit({ kind: 'attn', case: c.case, error: String((e as Error).message).split('\n')[0] });
    }
    log(`attn ${c.case} done`);
  }
}

// ---------------------------------------------------------------------------------------------
// The memory-bound kernels of the 1B step, one at a time at its shapes (bf16, s 2048, b 4, h 2048,
// ffn 8192, 32 heads of 64), each also under its variant switches: median ms and GB/s of the bytes
// it must move (its operands read and written once). torch_ref.py's `stream` part times a copy of
// the same size on the same GPU (the reference: how fast memory moves there at all).
if (want('stream')) {
  const [s, b, h, f, heads, d] = tiny ? [64, 2, 256, 512, 4, 64] : [2048, 4, 2048, 8192, 32, 64];
  const backend = T.getBackend(device);
  const kernel = <K extends keyof import('@megapatch/tensor').KernelTable>(name: K) => {
    const k = T.getKernel(backend, name);
    if (!k) throw new Error(`${device} has no ${name} kernel`);
    return k;
  };
  const rows = s * b;
  const bytes = 2; // bf16
  const x = randBf16([s, b, h]);
  const w = randBf16([h]);
  const y = randBf16([s, b, h]);
  const g = randBf16([s, b, h]);
  const dx = randBf16([s, b, h]);
  const rstd = T.empty([rows], { device, dtype: 'float32' });
  const dw32 = T.zeros([h], { device, dtype: 'float32' });
  const qkv = randBf16([s, b, heads, d]);
  const qOut = T.empty([b, heads, s, d], { device, dtype: 'bfloat16' });
  const pos = T.arange(0, s, 1, { device, dtype: 'int64' });
  const { cos, sin } = T.ropeCosSin(pos, d);
  const gu = randBf16([s, b, 2 * f]);
  const act = randBf16([s, b, f]);
  const dgu = randBf16([s, b, 2 * f]);
  const big = randBf16([s, b, 2 * f]);
  const big2 = randBf16([s, b, 2 * f]);
  const normRows = kernel('normRows');
  const normBack = kernel('normRowsBackward');
  const rope = kernel('ropeApply');
  const glu = kernel('gatedActivation');
  const gluBack = kernel('gatedActivationBackward');
  const vocab = tiny ? 1000 : 32000;
  const logits = randBf16([rows, vocab]);
  const dLogits = T.empty([rows, vocab], { device, dtype: 'bfloat16' });
  const labels = T.randint(0, vocab, [rows], { device, dtype: 'int64' });
  const [rowMax, pred, sumExp] = [0, 1, 2].map(() => T.empty([rows], { device, dtype: 'float32' }));
  const ceStats = kernel('crossEntropyShardMaxStats');
  const ceBack = kernel('crossEntropyShardBackward');
  const q = qkv.permute(1, 2, 0, 3);
  const c4 = cos.view(1, s, d).expand(b, s, d);
  const s4 = sin.view(1, s, d).expand(b, s, d);
  const hb = rows * h * bytes;
  const cases: { name: string; bytes: number; fn: () => void; variants?: [string, string][] }[] = [
    {
      name: 'rmsnorm forward',
      bytes: 2 * hb,
      fn: () => normRows(y, x, w, null, null, rstd, h, 1e-5, false),
      variants: [['MEGAPATCH_NORM_FWD', 'block']],
    },
    {
      // the step's: dx added into a waiting gradient, the weight's sum into its float32 main gradient
      name: 'rmsnorm backward',
      bytes: 4 * hb,
      fn: () => normBack(dx, g, x, w, null, rstd, dw32, null, h, false, true, true),
      variants: [['MEGAPATCH_NORM_BWD_FUSED', '0']],
    },
    { name: 'rope q forward', bytes: 2 * q.numel * bytes, fn: () => rope(qOut, q, c4, s4, false) },
    { name: 'rope q inverse', bytes: 2 * q.numel * bytes, fn: () => rope(q, qOut, c4, s4, true) },
    {
      name: 'swiglu forward',
      bytes: 3 * rows * f * bytes,
      fn: () => glu(act, gu, 'swiglu'),
      variants: [
        ['MEGAPATCH_GLU_UNROLL', '2'],
        ['MEGAPATCH_GLU_UNROLL', '4'],
      ],
    },
    {
      name: 'swiglu backward',
      bytes: 5 * rows * f * bytes,
      fn: () => gluBack(dgu, act, gu, 'swiglu'),
      variants: [
        ['MEGAPATCH_GLU_UNROLL', '2'],
        ['MEGAPATCH_GLU_UNROLL', '4'],
      ],
    },
    {
      // the loss of one rank holding the whole vocabulary: one pass for the maximum and the sums
      name: 'cross-entropy forward',
      bytes: rows * vocab * bytes,
      fn: () => ceStats(rowMax, pred, sumExp, null, logits, labels, 0, vocab),
      variants: [['MEGAPATCH_CE_ONE_PASS', '0']],
    },
    {
      name: 'cross-entropy backward',
      bytes: 2 * rows * vocab * bytes,
      fn: () => ceBack(dLogits, logits, labels, rowMax, sumExp, pred, 0, vocab, 0, vocab),
    },
    { name: 'add', bytes: 3 * hb, fn: () => backend.binary(dx, x, y, 'add') },
    { name: 'copy', bytes: 2 * big.numel * bytes, fn: () => backend.copy(big2, big) },
  ];
  for (const c of cases) {
    try {
      const t = timeIt(c.fn, { warm: 2, maxSamples: 10, budgetMs: Math.min(caseBudgetMs, 1000) });
      const variants: Record<string, { ms: number; gbs: number }> = {};
      for (const [name, value] of c.variants ?? []) {
        const prev = process.env[name];
        try {
          process.env[name] = value;
          const v = timeIt(c.fn, { warm: 2, maxSamples: 10, budgetMs: Math.min(caseBudgetMs, 1000) });
          variants[`${name}=${value}`] = { ms: r4(v.ms), gbs: r4(c.bytes / 1e6 / v.ms) };
        } finally {
          if (prev === undefined) delete process.env[name];
          else process.env[name] = prev;
        }
      }
      emit({
        kind: 'stream',
        case: c.name,
        shape: { s, b, h, f, heads, d },
        bytes: c.bytes,
        ms: r4(t.ms),
        gbs: r4(c.bytes / 1e6 / t.ms),
        variants,
        samples: t.samples,
      });
    } catch (e) {
      emit({ kind: 'stream', case: c.name, error: String((e as Error).message).split('\n')[0] });
    }
  }
  for (const t of [x, w, y, g, dx, rstd, dw32, qkv, qOut, pos, cos, sin, gu, act, dgu, big, big2])
    t.dispose();
  for (const t of [logits, dLogits, labels, rowMax, pred, sumExp]) t.dispose();
  log('stream done');
}

// ---------------------------------------------------------------------------------------------
/** A training step of cases.json's `train` (the Llama-style model) or `trainMoe` (Mixtral-style). */
// biome-ignore lint/suspicious/noExplicitAny: cases.json's shape
async function trainBench(tc: any) {
  const mbs = Number(process.env.MEGAPATCH_BENCH_MBS ?? tc.microBatchSize);
  const gbs = Math.max(tc.globalBatchSize, mbs);
  const seq: number = tc.seqLength;
  // one more iteration after the timed ones, with the kernel profiler on (MEGAPATCH_BENCH_PROFILE=0:
  // none; =shapes: labels with the first operand's shape)
  const profile = process.env.MEGAPATCH_BENCH_PROFILE !== '0';
  // the line's mode: "megapatch", or a variant's name (MEGAPATCH_BENCH_MODE, e.g. megapatch-bq32)
  const mode = process.env.MEGAPATCH_BENCH_MODE ?? 'megapatch';
  const iters: number = tc.warmupIters + tc.timedIters + (profile ? 1 : 0);
  let profiling = false;
  const layers = Number(process.env.MEGAPATCH_BENCH_LAYERS ?? tc.hf.num_hidden_layers);
  // the emulator's launch count at each iteration's log line
  const launchMarks: number[] = [];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-gpu-bench-'));
  try {
    // not dependencies of @megapatch/cuda: named through variables (src-resolve.mjs finds them)
    const dataModule = '@megapatch/data';
    const trainModule = '@megapatch/train';
    const { IndexedDatasetBuilder } = await import(dataModule);
    const { parseRunConfig, train } = await import(trainModule);
    const hf = path.join(dir, 'model');
    fs.mkdirSync(hf);
    fs.writeFileSync(
      path.join(hf, 'config.json'),
      JSON.stringify({
        architectures: ['LlamaForCausalLM'],
        model_type: 'llama',
        hidden_act: 'silu',
        ...tc.hf,
        num_hidden_layers: layers,
      }),
    );
    // random tokens: enough whole documents for every sample of the run (and then some)
    const prefix = path.join(dir, 'corpus');
    const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
    const vocab: number = tc.hf.vocab_size;
    const need = (iters + 2) * gbs * (seq + 1);
    let s = 987654321;
    for (let n = 0; n < need; n += seq) {
      const doc = new Array<number>(seq);
      for (let i = 0; i < seq; i++) {
        s = (s * 1103515245 + 12345) % 2147483648;
        doc[i] = 3 + (s % (vocab - 3));
      }
      b.addDocument(doc);
    }
    b.finalize();
    const runDir = path.join(dir, 'run');
    log(`train ${tc.case}: mbs ${mbs}, gbs ${gbs}, ${iters} iterations (${tc.warmupIters} warm-up)`);
    const t0 = performance.now();
    await train(
      parseRunConfig({
        model: {
          config: hf,
          dtype: 'bf16',
          // MEGAPATCH_BENCH_MOE_CAPACITY=<factor>: MoE token dropping at that capacity, padded to it
          // (Megatron's drop-and-pad: the experts' sizes follow from the tokens, nothing waits)
          ...(process.env.MEGAPATCH_BENCH_MOE_CAPACITY
            ? {
                moeExpertCapacityFactor: Number(process.env.MEGAPATCH_BENCH_MOE_CAPACITY),
                moePadExpertInputToCapacity: true,
              }
            : {}),
        },
        data: {
          dataPath: [prefix],
          seqLength: seq,
          split: '100,0,0',
          dataCachePath: path.join(dir, 'cache'),
        },
        training: {
          device,
          microBatchSize: mbs,
          globalBatchSize: gbs,
          trainIters: iters,
          evalInterval: null,
          // every step reads its loss (a sync) anyway: a log line a step costs nothing more
          logInterval: 1,
          // MEGAPATCH_BENCH_NO_GAF=1: without gradient-accumulation fusion (a variant of the bench)
          gradientAccumulationFusion: process.env.MEGAPATCH_BENCH_NO_GAF !== '1',
        },
        optimizer: { lr: 1e-4, weightDecay: 0.01, clipGrad: 1 },
        logging: { runDir },
      }),
      {
        log: (l: string) => {
          const it = /iteration\s+(\d+)\//.exec(l);
          if (it && emu && addon.emuStats) launchMarks.push(addon.emuStats().launches);
          log(l);
          if (it && profile && Number(it[1]) === tc.warmupIters + tc.timedIters) {
            cudaModule.startKernelProfile(device, {
              shapes: process.env.MEGAPATCH_BENCH_PROFILE === 'shapes',
            });
            profiling = true;
          }
        },
        report: false,
      },
    );
    const wallS = (performance.now() - t0) / 1000;
    if (profiling) {
      const p = cudaModule.stopKernelProfile(device);
      profiling = false;
      log(`the last iteration, profiled:\n${cudaModule.formatKernelProfile(p, 30)}`);
      const r = (x: number) => Number(x.toPrecision(4));
      emit({
        kind: 'profile',
        case: tc.case,
        mode,
        calls: p.calls,
        kernelMs: r(p.kernelMs),
        spanMs: r(p.spanMs),
        deviceMallocs: p.deviceMallocs,
        hostWaits: p.hostWaits,
        entries: p.entries.map((e) => ({ ...e, ms: r(e.ms) })),
      });
    }
    const rows = fs
      .readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l))
      .filter((m) => m.kind === 'train');
    const timed = rows.slice(tc.warmupIters, tc.warmupIters + tc.timedIters);
    const stepMs = median(timed.map((m) => m.elapsedMs));
    // Megatron's FLOPs of a step (the trainer's own count: tflops × elapsed)
    const flopsPerStep = median(timed.map((m) => m.tflops * 1e12 * (m.elapsedMs / 1000)));
    const t = (k: string) => r4(median(timed.map((m) => m.timers[k])));
    const mem = T.memoryStats(device);
    const launches = launchMarks.slice(1).map((n, i) => n - launchMarks[i]);
    emit({
      kind: 'train',
      case: tc.case,
      mode,
      ...(process.env.MEGAPATCH_BENCH_VARIANT_ENV
        ? { variantEnv: process.env.MEGAPATCH_BENCH_VARIANT_ENV }
        : {}),
      layers,
      ...(emu
        ? {
            dryRun: addon.emuStats?.().dryRun ?? false,
            launchesPerStep: launches.length ? median(launches) : null,
          }
        : {}),
      microBatchSize: mbs,
      globalBatchSize: gbs,
      seqLength: seq,
      iterations: iters,
      timedIterations: timed.length,
      stepMs: r4(stepMs),
      stepMsAll: rows.map((m) => r4(m.elapsedMs)),
      tokensPerSecond: r4((gbs * seq) / (stepMs / 1000)),
      flopsPerStep,
      achievedTflops: r4(flopsPerStep / (stepMs / 1000) / 1e12),
      mfu: r4(flopsPerStep / (stepMs / 1000) / (peakTflops * 1e12)),
      peakTflops,
      // forward, backward and optimizer are the host's enqueue times (nothing waits for the device
      // there since session 38: the gradient norm is read with the step's sums); the device's tail
      // lands in the step's one read, at its end (the rest of stepMs)
      breakdownMs: {
        data: t('dataMs'),
        forward: t('forwardMs'),
        backward: t('backwardMs'),
        optimizer: t('optimizerMs'),
        communication: t('commMs'),
      },
      losses: rows.map((m) => (typeof m.lmLoss === 'number' ? r4(m.lmLoss) : null)),
      peakMemoryGiB: r4((rows.at(-1)?.memory?.peakBytes ?? mem.peakBytes) / 2 ** 30),
      // the device memory of every step: live the same after each (nothing leaks), and the caching
      // allocator's reserve (live + cached) of the last
      memoryFlat: rows.every((m) => m.memory?.liveBytes === rows[0].memory?.liveBytes),
      liveMemoryGiB: r4((rows.at(-1)?.memory?.liveBytes ?? 0) / 2 ** 30),
      reservedMemoryGiB: r4(
        ((rows.at(-1)?.memory?.liveBytes ?? 0) + (rows.at(-1)?.memory?.cachedBytes ?? 0)) / 2 ** 30,
      ),
      wallS: r4(wallS),
    });
  } catch (e) {
    emit({
      kind: 'train',
      case: tc.case,
      mode,
      microBatchSize: mbs,
      error: String((e as Error).message).split('\n')[0],
    });
    process.exitCode = 3;
  } finally {
    if (profiling) cudaModule.stopKernelProfile(device);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
/**
 * Decoding speed: generate() with its KV cache on the training case's model (random weights,
 * bf16), each batch of random prompts greedy and with temperature 0.8 + top-p 0.9 (drawn on the
 * device), no EOS: new tokens per second over the call (prefill included, as Hugging Face's
 * generate is timed), and the host's waits for the device per new token (the kernel profile).
 */
async function generateBench(gc: any) {
  const hfFields = cases[gc.model].hf;
  const convertModule = '@megapatch/convert';
  const modelsModule = '@megapatch/models';
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-gpu-gen-'));
  let model: { dispose(): void } | null = null;
  try {
    const { makeTransformerConfig, parseHfConfig } = await import(convertModule);
    const { GPTModel, generate } = await import(modelsModule);
    fs.writeFileSync(
      path.join(dir, 'config.json'),
      JSON.stringify({
        architectures: ['LlamaForCausalLM'],
        model_type: 'llama',
        hidden_act: 'silu',
        ...hfFields,
      }),
    );
    const parsed = parseHfConfig(dir);
    T.setDefaultDevice(device);
    const m = new GPTModel(makeTransformerConfig(parsed.transformerConfig), {
      dtype: 'bfloat16',
      family: 'LlamaForCausalLM',
    });
    model = m;
    const vocab: number = hfFields.vocab_size;
    let s = 12345;
    const prompts = (b: number) =>
      Array.from({ length: b }, () =>
        Array.from({ length: gc.promptLength }, () => {
          s = (s * 1103515245 + 12345) % 2147483648;
          return 3 + (s % (vocab - 3));
        }),
      );
    for (const b of gc.batches as number[]) {
      for (const sampling of gc.sampling as string[]) {
        const opts = sampling === 'greedy' ? {} : { temperature: 0.8, topP: 0.9, seed: 1 };
        const base = { kind: 'generate', case: gc.case, batch: b, sampling };
        try {
          const p = prompts(b);
          generate(m, p, { ...opts, maxNewTokens: 4 });
          sync();
          const r = generate(m, p, { ...opts, maxNewTokens: gc.newTokens });
          sync();
          const made = r.rows.reduce((a: number, row: { tokens: number[] }) => a + row.tokens.length, 0);
          // the waits of a few steps, apart from the timed call
          cudaModule.startKernelProfile(device);
          generate(m, p, { ...opts, maxNewTokens: 4 });
          const prof = cudaModule.stopKernelProfile(device);
          emit({
            ...base,
            promptLength: gc.promptLength,
            newTokens: gc.newTokens,
            tokensPerSecond: r4(made / r.seconds),
            msPerStep: r4((r.seconds * 1000) / gc.newTokens),
            hostWaitsPer4Tokens: prof.hostWaits,
          });
        } catch (e) {
          emit({ ...base, error: String((e as Error).message).split('\n')[0] });
          process.exitCode = 3;
        }
        log(`generate b${b} ${sampling} done`);
      }
    }
  } finally {
    model?.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (want('train')) await trainBench(cases.train);
if (want('moe-train')) await trainBench(cases.trainMoe);
if (want('generate')) await generateBench(cases.generate);
sync();
process.exit(process.exitCode ?? 0);
