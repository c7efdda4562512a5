// The CUDA backend's own behaviour, on the emulator (cudaemu:0 / cudaemu:1 run the same native
// entries and kernels as cuda:0 / cuda:1, on the CPU): the caching allocator and its statistics
// per device, transfers, asynchronous index checks, casts as the CPU makes them, and the errors of
// mixing devices. The op-by-op conformance with the CPU is vitest.conformance.config.ts.

import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  cat,
  emptyCache,
  gelu,
  getBackend,
  groupedLinear,
  hasNativeKernel,
  type LinearActivation,
  linear,
  linearActivation,
  memoryStats,
  randn,
  relu,
  synchronize,
  type Tensor,
  tensor,
  zeros,
} from '@megapatch/tensor';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadEmulatorAddon } from '../src/native.js';
import { formatKernelProfile, startKernelProfile, stopKernelProfile } from '../src/profile.js';

const built = loadEmulatorAddon();
const skip = 'error' in built ? built.error : '';
const pkg = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const tsx = path.join(pkg, 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs');

/**
 * Runs `body` in a child process (for settings read once a process) after a preamble that gives
 * it T (@megapatch/tensor), the emulator registered, `built` (its addon) and dev = 'cudaemu:0';
 * returns the JSON of the last line it prints, with nothing on stderr.
 */
function childJson(env: Record<string, string>, body: string) {
  const script = `
    const T = await import('@megapatch/tensor');
    await import(${JSON.stringify(path.join(pkg, 'src', 'emulator.ts'))});
    const { loadEmulatorAddon } = await import(${JSON.stringify(path.join(pkg, 'src', 'native.ts'))});
    const built = loadEmulatorAddon();
    const dev = 'cudaemu:0';
    ${body}
  `;
  const r = spawnSync(process.execPath, ['--import', tsx, '--input-type=module', '-e', script], {
    cwd: pkg,
    encoding: 'utf8',
    env: { ...process.env, ...env },
  });
  expect(r.stderr).toBe('');
  return JSON.parse(r.stdout.trim().split('\n').at(-1) ?? '{}');
}

describe.skipIf(skip !== '')(`CUDA backend on the emulator${skip ? ` (skipped: ${skip})` : ''}`, () => {
  beforeAll(async () => {
    await import('../src/emulator.js');
  });

  it('runs its own kernels for the named kernels of its families (no compositions)', () => {
    const b = getBackend('cudaemu:0');
    const names = [
      'indexSelectRows',
      'indexAddRows',
      'gatherAlong',
      'scatterAddAlong',
      'topk',
      'triangle',
      'oneHot',
      'softmax',
      'softmaxBackward',
      'crossEntropy',
      'crossEntropyBackward',
      'nllLoss',
      'nllLossBackward',
      'crossEntropyShardMax',
      'crossEntropyShard',
      'crossEntropyShardBackward',
      'normRows',
      'normRowsBackward',
      'ropeApply',
      'gatedActivation',
      'gatedActivationBackward',
      'adamwStep',
      'adamwStepMulti',
      'sgdStep',
      'normPowerSum',
      'unscaleCheck',
      'attentionForward',
      'attentionBackward',
      'linearBias',
      'linearBiasActivation',
      'linearWeightBiasGrad',
      'linearWeightGradAccumulate',
      'groupedGemm',
      'accumulateGrad',
    ] as const;
    for (const name of names) expect(hasNativeKernel(b, name), name).toBe(true);
  });

  it('moves tensors to and from devices, keeping values and dtypes', () => {
    const x = tensor([
      [1.5, -2],
      [3, 4.25],
    ]);
    const d = x.to('cudaemu:1');
    expect(d.device).toBe('cudaemu:1');
    expect(d.add(d).cpu().toArray()).toEqual([
      [3, -4],
      [6, 8.5],
    ]);
    const b = x.to('cudaemu', 'bfloat16');
    expect(b.device).toBe('cudaemu:0');
    expect(b.dtype).toBe('bfloat16');
    expect(b.cpu().toArray()).toEqual([
      [1.5, -2],
      [3, 4.25],
    ]);
  });

  it('keeps freed blocks per device and reuses them; emptyCache returns them', () => {
    emptyCache('cudaemu:0');
    const before = memoryStats('cudaemu:0');
    let t: Tensor | null = zeros([1000], { device: 'cudaemu:0' });
    const live = memoryStats('cudaemu:0');
    expect(live.liveBytes - before.liveBytes).toBe(4000);
    t.dispose();
    t = null;
    const cached = memoryStats('cudaemu:0').cachedBytes;
    expect(cached).toBeGreaterThanOrEqual(4000); // a size class of at least 4000 bytes
    expect(memoryStats('cudaemu:1').cachedBytes).toBe(0);
    const again = zeros([1000], { device: 'cudaemu:0' });
    expect(memoryStats('cudaemu:0').cachedBytes).toBe(cached - cached); // the cached block was reused
    again.dispose();
    emptyCache('cudaemu:0');
    expect(memoryStats('cudaemu:0').cachedBytes).toBe(0);
  });

  it('casts as the CPU backend does, corners included', () => {
    const v = [Number.NaN, 1e10, -1e10, 2.7, -2.7, 300, -1, 65504.5, 1e-8];
    for (const dtype of ['int32', 'int64', 'uint8', 'bool', 'bfloat16', 'float16'] as const) {
      const cpu = tensor(v, { dtype: 'float64' }).to(dtype);
      const gpu = tensor(v, { dtype: 'float64' }).to('cudaemu:0').to(dtype);
      expect(gpu.cpu().toArray(), dtype).toEqual(cpu.toArray());
    }
  });

  it('reports a bad index at the next host read, as a device-side assert would', () => {
    const x = tensor([1, 2, 3]).to('cudaemu:0');
    const idx = tensor([0, 5], { dtype: 'int64' }).to('cudaemu:0');
    expect(hasNativeKernel(getBackend('cudaemu:0'), 'indexSelectRows')).toBe(true);
    const y = x.indexSelect(0, idx); // queued: no error yet
    expect(() => synchronize('cudaemu:0')).toThrow(
      /^indexSelect: index 5 \(at position 1 of the index\) is out of range/,
    );
    y.dispose();
  });

  it('splits an activation cuBLASLt has no epilogue for into the GEMM and the unary kernel, as on a GPU', () => {
    const stats = 'error' in built ? undefined : built.addon.emuStats?.bind(built.addon);
    if (!stats) throw new Error(`the emulator addon has no emuStats: ${skip}`);
    const on = (t: Tensor) => t.to('cudaemu:0', 'bfloat16');
    const x = on(
      tensor(
        Array.from({ length: 5 * 7 }, (_, i) => Math.sin(i) * 2),
        { shape: [5, 7] },
      ),
    );
    const w = on(
      tensor(
        Array.from({ length: 6 * 7 }, (_, i) => Math.cos(i * 0.7)),
        { shape: [6, 7] },
      ),
    );
    const b = on(tensor([0.5, -1, 0.25, 2, -0.75, 0]));
    /** The kernel launches of fn (copies are not launches). */
    const launches = (fn: () => void) => {
      synchronize('cudaemu:0');
      const before = stats().launches;
      fn();
      synchronize('cudaemu:0');
      return stats().launches - before;
    };
    const ref = (act: LinearActivation) =>
      act === 'relu' ? relu(linear(x, w, b)) : gelu(linear(x, w, b), act === 'gelu' ? 'none' : 'tanh');
    const xg = x.clone().requiresGrad_(); // a gradient keeps the pre-activation (GELU's backward reads it)
    for (const [act, input, count] of [
      ['gelu', x, 2], // the erf GELU: GEMM + bias, then the unary kernel
      ['gelu', xg, 2],
      ['gelu-tanh', xg, 1], // GELU_AUX_BIAS
      ['relu', xg, 1], // RELU_BIAS (ReLU's backward reads its output)
    ] as const) {
      let y: Tensor | null = null;
      expect(
        launches(() => {
          y = linearActivation(input, w, b, act);
        }),
        `${act}${input === xg ? ' with a gradient' : ''}`,
      ).toBe(count);
      const r = ref(act);
      // the split runs the composition's order (the pre-activation rounded once): equal bit for bit
      if (count === 2) expect((y as unknown as Tensor).cpu().toArray(), act).toEqual(r.cpu().toArray());
      (y as unknown as Tensor).dispose();
      r.dispose();
    }
    // a ReLU that keeps its input (not one the op asks for; RELU_AUX keeps a bit mask) splits too
    const kernel = getBackend('cudaemu:0').kernel('linearBiasActivation');
    if (!kernel) throw new Error('no linearBiasActivation kernel');
    const out = on(zeros([5, 6]));
    const pre = on(zeros([5, 6]));
    expect(launches(() => kernel(out, pre, x, w, b, 'relu'))).toBe(2);
    const lin = linear(x, w, b);
    expect(pre.cpu().toArray()).toEqual(lin.cpu().toArray());
    expect(out.cpu().toArray()).toEqual(relu(lin).cpu().toArray());
    for (const t of [out, pre, lin, xg, x, w, b]) t.dispose();
  });

  it('runs the products of a grouped GEMM in one launch, each equal to its own GEMM bit for bit', () => {
    const stats = 'error' in built ? undefined : built.addon.emuStats?.bind(built.addon);
    if (!stats) throw new Error(`the emulator addon has no emuStats: ${skip}`);
    const dev = 'cudaemu:0';
    // 40 groups: their table (15 words each) takes two uploads of at most 480 words
    const sizes = Array.from({ length: 40 }, (_, e) => (e % 7 === 3 ? 0 : 1 + ((e * 11) % 19)));
    const [K, F] = [9, 17];
    const N = sizes.reduce((a, b) => a + b, 0);
    const host = (n: number, seed: number) => Array.from({ length: n }, (_, i) => Math.sin(i * 0.37 + seed));
    const x = tensor(host(N * K, 1), { shape: [N, K] }).to(dev);
    const ws = sizes.map((_, e) => tensor(host(F * K, e + 2), { shape: [F, K] }).to(dev));
    synchronize(dev);
    const before = stats().launches;
    const y = groupedLinear(x, ws, sizes);
    synchronize(dev);
    expect(stats().launches - before).toBe(3); // two table uploads and the grouped kernel
    let start = 0;
    const parts = sizes.map((n, e) => {
      const part = linear(x.narrow(0, start, n), ws[e]);
      start += n;
      return part;
    });
    const loop = cat(parts, 0);
    expect(y.cpu().toArray()).toEqual(loop.cpu().toArray());
    for (const t of [y, loop, x, ...ws, ...parts]) t.dispose();
  });

  it('uploads and reads back checks without page-locked memory (refused, as under a locked-memory limit)', () => {
    const r = childJson(
      { MEGAPATCH_CUDA_EMU_NO_PINNED: '1' },
      `
      const a = built.addon;
      const w0 = a.hostWaits();
      const xs = [1, 2, 3].map((i) => T.tensor([i, i + 0.5, i + 0.25]).to(dev));
      const waits = a.hostWaits() - w0;
      const table = T.tensor([[1, 2], [3, 4], [5, 6]]).to(dev);
      const rows = [0, 2].map((i) => table.indexSelect(0, T.tensor([i], { dtype: 'int64' }).to(dev)));
      const pending = T.pendingChecks(dev);
      let error = null;
      table.indexSelect(0, T.tensor([7], { dtype: 'int64' }).to(dev));
      try { T.synchronize(dev); } catch (e) { error = e.message; }
      const stats = a.uploadStats();
      console.log(JSON.stringify({
        waits, pending, error,
        values: xs.map((x) => x.cpu().toArray()),
        rows: rows.map((r) => r.cpu().toArray()),
        staged: stats.staged, direct: stats.direct, unstaged: stats.unstagedDevices,
      }));
      `,
    );
    expect(r).toEqual({
      waits: 3, // each upload copies directly and waits, as before the ring
      pending: 2,
      error: 'indexSelect: index 7 (at position 0 of the index) is out of range for dimension 0 of size 3',
      values: [
        [1, 1.5, 1.25],
        [2, 2.5, 2.25],
        [3, 3.5, 3.25],
      ],
      rows: [[[1, 2]], [[5, 6]]],
      staged: 0,
      direct: r.direct,
      unstaged: 1,
    });
    expect(r.direct).toBeGreaterThanOrEqual(6);
  });

  it('runs a grouped GEMM on several streams (MEGAPATCH_GROUPED_GEMM=streams): forked and joined, the same bits', () => {
    // the mode is read once a process: each setting in a child process, against the loop there
    const child = (env: Record<string, string>) => {
      return childJson(
        env,
        `
        const sizes = [5, 0, 13, 1, 8, 21, 3, 0, 2, 9];
        const [K, F] = [11, 7];
        const N = sizes.reduce((a, b) => a + b, 0);
        const host = (n, seed) => Array.from({ length: n }, (_, i) => Math.sin(i * 0.37 + seed));
        const x = T.tensor(host(N * K, 1), { shape: [N, K] }).to(dev);
        const ws = sizes.map((_, e) => T.tensor(host(F * K, e + 2), { shape: [F, K] }).to(dev));
        T.synchronize(dev);
        const before = built.addon.emuStats().streamWaits;
        let y;
        try {
          y = T.groupedLinear(x, ws, sizes);
        } catch (e) {
          console.log(JSON.stringify({ error: e.message }));
          process.exit(0);
        }
        T.synchronize(dev);
        const waits = built.addon.emuStats().streamWaits - before;
        let start = 0;
        const parts = sizes.map((n, e) => { const p = T.linear(x.narrow(0, start, n), ws[e]); start += n; return p; });
        const same = JSON.stringify(y.cpu().toArray()) === JSON.stringify(T.cat(parts, 0).cpu().toArray());
        console.log(JSON.stringify({ waits, same }));
      `,
      );
    };
    // four lanes (the default): three side streams, each waits for the fork and is waited for
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'streams' })).toEqual({ waits: 6, same: true });
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'streams', MEGAPATCH_GROUPED_STREAMS: '3' })).toEqual({
      waits: 4,
      same: true,
    });
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'loop' })).toEqual({ waits: 0, same: true });
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'streams', MEGAPATCH_GROUPED_STREAMS: '1' }).error).toMatch(
      /^groupedGemm: MEGAPATCH_GROUPED_STREAMS must be an integer from 2 to 8, got '1'/,
    );
  });

  it("runs a grouped GEMM on its tensor-core kernels (MEGAPATCH_GROUPED_GEMM=mma, =wgmma): forward and backward, the loop's bits", () => {
    // One process a setting (the mode is read once). Each output of the mma.sync and wgmma kernels is
    // the sum in k order in fp32 of exact 16-bit products, as the tiled gemm's: the same bits as linear per
    // group, for x W^T (A K-fast, B K-fast), dy W (B N-fast) and dy_e^T x_e (A M-fast, B N-fast).
    // Groups of 1 to 300 rows (several 128-row tiles, partial tiles), K and F not multiples of
    // 128 or 32 (zero-filled chunks), an empty group; and K = 12 (rows of 24 bytes: no 16-byte
    // chunks) runs on the loop instead.
    const child = (env: Record<string, string>, dtype: string, K: number, F: number) => {
      return childJson(
        env,
        `
        const sizes = [37, 0, 300, 1, 129];
        const [K, F] = [${K}, ${F}];
        const N = sizes.reduce((a, b) => a + b, 0);
        const host = (n, seed) => Array.from({ length: n }, (_, i) => Math.sin(i * 0.37 + seed));
        const leaf = (n, shape, seed) => T.tensor(host(n, seed), { shape, dtype: '${dtype}' }).to(dev).requiresGrad_();
        const x = leaf(N * K, [N, K], 1);
        const ws = sizes.map((_, e) => leaf(F * K, [F, K], e + 2));
        const gy = T.tensor(host(N * F, 9), { shape: [N, F], dtype: '${dtype}' }).to(dev);
        T.synchronize(dev);
        let before = built.addon.emuStats().launches;
        let y;
        try {
          y = T.groupedLinear(x, ws, sizes);
        } catch (e) {
          console.log(JSON.stringify({ error: e.message }));
          process.exit(0);
        }
        T.synchronize(dev);
        const launches = built.addon.emuStats().launches - before;
        y.backward(gy);
        const got = [y, x.grad, ...ws.map((w) => w.grad)].map((t) => JSON.stringify(t.cpu().toArray()));
        x.grad = null;
        for (const w of ws) w.grad = null;
        let start = 0;
        const parts = sizes.map((n, e) => { const p = T.linear(x.narrow(0, start, n), ws[e]); start += n; return p; });
        const ref = T.cat(parts, 0);
        ref.backward(gy);
        const want = [ref, x.grad, ...ws.map((w) => w.grad)].map((t) => JSON.stringify(t.cpu().toArray()));
        const same = got.map((g, i) => g === want[i]);
        console.log(JSON.stringify({ launches, same: same.every(Boolean) ? true : same }));
      `,
      );
    };
    const mma = { MEGAPATCH_GROUPED_GEMM: 'mma' };
    const wgmma = { MEGAPATCH_GROUPED_GEMM: 'wgmma' };
    // one table upload and one launch of the kernel for the 4 products (mma.sync, then wgmma)
    expect(child(mma, 'bfloat16', 40, 136)).toEqual({ launches: 2, same: true });
    expect(child(mma, 'float16', 72, 24)).toEqual({ launches: 2, same: true });
    expect(child(wgmma, 'bfloat16', 40, 136)).toEqual({ launches: 2, same: true });
    expect(child(wgmma, 'float16', 72, 24)).toEqual({ launches: 2, same: true });
    // not for the kernel: one gemm per product (float32; rows of K = 12 elements)
    expect(child(mma, 'float32', 40, 136)).toEqual({ launches: 4, same: true });
    expect(child(mma, 'bfloat16', 12, 24)).toEqual({ launches: 4, same: true });
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'fast' }, 'bfloat16', 8, 8).error).toMatch(
      /^groupedGemm: MEGAPATCH_GROUPED_GEMM must be loop, streams, grouped, tiled, mma or wgmma, got 'fast'/,
    );
    // all four operand layouts (A K- or M-fast, B K- or N-fast) against the CPU's GEMM, with writes
    // outside the outputs checked: the GPU run's check (gpu/gemm-check.mts), here on the emulator
    // (and with every cp.async landing at once, MEGAPATCH_CUDA_EMU_CP_ASYNC=eager: a ring slot
    // refilled while a wgmma group not yet waited for still reads it gives wrong products there)
    // (and the wgmma kernel's 128 x 256 tiles, MEGAPATCH_GROUPED_WGMMA_N=256)
    for (const [mode, landing, n] of [
      ['mma', '', ''],
      ['wgmma', '', ''],
      ['wgmma', 'eager', ''],
      ['wgmma', 'eager', '256'],
    ]) {
      const r = spawnSync(
        process.execPath,
        ['--import', tsx, path.join(pkg, 'gpu', 'gemm-check.mts'), 'cudaemu:0', 'grouped'],
        {
          cwd: path.join(pkg, '..', '..'),
          encoding: 'utf8',
          env: {
            ...process.env,
            MEGAPATCH_GROUPED_GEMM: mode,
            MEGAPATCH_CUDA_EMU_CP_ASYNC: landing,
            MEGAPATCH_GROUPED_WGMMA_N: n,
          },
        },
      );
      expect(r.stdout.trim().split('\n').at(-1)).toBe(
        `grouped (MEGAPATCH_GROUPED_GEMM=${mode}): 51 cases, 0 failures`,
      );
    }
  }, 180_000);

  it("runs a grouped linear layer over group sizes on the device without waiting for them: the host sizes' bits", () => {
    // MoE's tokens per expert stay where the router counted them: the grouped tiled kernel (the
    // emulator's default, =tiled) and the tensor-core kernels (=mma, =wgmma: 16-bit) plan the
    // groups on the device, forward (x W^T), dx (dy W) and dW (dy_e^T x_e, zeros for an empty
    // group); the loop of GEMMs (=loop, a GPU's default) and float32 on =mma read them: one wait.
    // One process a setting (the mode is read once).
    const child = (env: Record<string, string>, dtype: string, sizeDtype = 'int64', bad = '') => {
      return childJson(
        env,
        `
        const sizes = [37, 0, 300, 1, 129, 0];
        const [K, F] = [40, 136];
        const N = sizes.reduce((a, b) => a + b, 0);
        const host = (n, seed) => Array.from({ length: n }, (_, i) => Math.sin(i * 0.37 + seed));
        const leaf = (n, shape, seed) => T.tensor(host(n, seed), { shape, dtype: '${dtype}' }).to(dev).requiresGrad_();
        const x = leaf(N * K, [N, K], 1);
        const ws = sizes.map((_, e) => leaf(F * K, [F, K], e + 2));
        const gy = T.tensor(host(N * F, 9), { shape: [N, F], dtype: '${dtype}' }).to(dev);
        const given = ${bad || 'sizes'};
        const onDevice = T.tensor(given, { dtype: '${sizeDtype}' }).to(dev);
        T.synchronize(dev);
        const live0 = T.memoryStats(dev).liveStorages;
        const w0 = built.addon.hostWaits();
        let y;
        let waits = -1; // forward and backward's (an error thrown there: until it)
        let got;
        try {
          y = T.groupedLinear(x, ws, onDevice);
          y.backward(gy);
          waits = built.addon.hostWaits() - w0;
          got = [y, x.grad, ...ws.map((w) => w.grad)].map((t) => JSON.stringify(t.cpu().toArray()));
        } catch (e) {
          if (waits < 0) waits = built.addon.hostWaits() - w0;
          console.log(JSON.stringify({ waits, error: e.message }));
          process.exit(0);
        }
        y.dispose();
        // what stays: the 7 gradients (the graph's saved tensors and any int64 copy are gone)
        const live = T.memoryStats(dev).liveStorages - live0;
        for (const t of [x, ...ws]) { t.grad.dispose(); t.grad = null; }
        const ref = T.groupedLinear(x, ws, sizes);
        ref.backward(gy);
        const want = [ref, x.grad, ...ws.map((w) => w.grad)].map((t) => JSON.stringify(t.cpu().toArray()));
        const same = got.map((g, i) => g === want[i]);
        const zero = JSON.stringify(ws[1].grad.cpu().toArray().flat().map(Math.abs)) === JSON.stringify(new Array(F * K).fill(0));
        // two layers over the same rows (a MoE layer's fc1 and fc2) share one read of the sizes
        T.synchronize(dev);
        const w1 = built.addon.hostWaits();
        const shared = new T.SharedGroupSizes(onDevice);
        T.tidy(() => T.noGrad(() => T.groupedLinear(T.groupedLinear(x, ws, shared).narrow(1, 0, K), ws, shared)));
        const sharedWaits = built.addon.hostWaits() - w1;
        // and queue one check of them (where the device planned them; none where they were read)
        const sharedChecks = T.pendingChecks(dev);
        console.log(JSON.stringify({ waits, live, same: same.every(Boolean) ? true : same, zero, sharedWaits, sharedChecks }));
      `,
      );
    };
    const ok = { waits: 0, live: 7, same: true, zero: true, sharedWaits: 0, sharedChecks: 1 };
    expect(child({}, 'float32')).toEqual(ok);
    expect(child({}, 'bfloat16', 'int32')).toEqual(ok);
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'tiled' }, 'float16')).toEqual(ok);
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'mma' }, 'bfloat16')).toEqual(ok);
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'wgmma' }, 'float16')).toEqual(ok);
    // the modes that need the sizes on the host read them once, forward and backward together
    // (and two layers sharing them through a SharedGroupSizes read them once)
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'loop' }, 'bfloat16')).toEqual({
      ...ok,
      waits: 1,
      sharedWaits: 1,
      sharedChecks: 0,
    });
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'mma' }, 'float32')).toEqual({
      ...ok,
      waits: 1,
      sharedWaits: 1,
      sharedChecks: 0,
    });
    // bad sizes: clamped on the device, raised at the next read with the host check's words
    expect(child({}, 'float32', 'int64', '[37, 0, 300, 1, 130, 0]')).toEqual({
      waits: 0,
      error: 'groupedLinear: group sizes sum to 468 but x [467,40] has 467 rows',
    });
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'mma' }, 'bfloat16', 'int64', '[37, 0, 301, -1, 129, 0]')).toEqual(
      {
        waits: 0,
        error: 'groupedLinear: group size 3 is -1; sizes must be non-negative integers',
      },
    );
    // read back for the loop: checked on the host before a GEMM uses them
    expect(child({ MEGAPATCH_GROUPED_GEMM: 'loop' }, 'float32', 'int64', '[37, 0, 300, 1, 130, 0]')).toEqual({
      waits: 1,
      error: 'groupedLinear: group sizes sum to 468 but x [467,40] has 467 rows',
    });
  });

  it('refuses to mix devices in one op with a one-line error', () => {
    const a = tensor([1, 2]).to('cudaemu:0');
    const b = tensor([1, 2]).to('cudaemu:1');
    expect(() => a.add(b)).toThrow(/cudaemu:0.*cudaemu:1|cudaemu:1.*cudaemu:0/);
  });

  it('profiles the entries of a device: calls, device time, operand bytes, GEMM FLOPs, allocations', () => {
    const x = tensor(
      Array.from({ length: 6 * 8 }, (_, i) => (i % 7) - 3),
      { dtype: 'float32' },
    )
      .reshape(6, 8)
      .to('cudaemu:0');
    const w = tensor(
      Array.from({ length: 5 * 8 }, (_, i) => (i % 5) - 2),
      { dtype: 'float32' },
    )
      .reshape(5, 8)
      .to('cudaemu:0');
    const other = tensor([1, 2, 3]).to('cudaemu:1');
    expect(() => stopKernelProfile('cudaemu:0')).toThrow(/no profile is running on cudaemu:0/);
    expect(() => startKernelProfile('cuda:7')).toThrow(/"cuda:7" is not a device of @megapatch\/cuda/);
    startKernelProfile('cudaemu:0', { shapes: true });
    const y = linear(x, w); // [6, 5]: the bias-free linear is one gemm entry
    const z = relu(y).add(y); // unary:relu, binary:add
    other.add(other).dispose(); // another device: not in this profile
    const big = zeros([1 << 20], { device: 'cudaemu:0' }); // a size class the cache has not seen
    const p = stopKernelProfile('cudaemu:0');
    const byName = new Map(p.entries.map((e) => [e.name.split(' ')[0], e]));
    expect(p.device).toBe('cudaemu:0');
    const gemm = byName.get('gemm')!;
    expect(gemm.kind).toBe('gemm');
    expect(gemm.calls).toBe(1);
    expect(gemm.flops).toBe(2 * 6 * 5 * 8);
    expect(gemm.bytes).toBe((6 * 8 + 8 * 5 + 6 * 5) * 4);
    const add = byName.get('binary:add')!;
    expect(add.name).toBe('binary:add float32[6,5]');
    expect([add.kind, add.calls, add.bytes, add.flops]).toEqual(['other', 1, 3 * 30 * 4, 0]);
    expect(byName.get('unary:relu')?.bytes).toBe(2 * 30 * 4);
    expect(p.calls).toBe(p.entries.reduce((s, e) => s + e.calls, 0));
    for (const e of p.entries) expect(e.ms).toBeGreaterThanOrEqual(0);
    expect(p.entries.map((e) => e.ms)).toEqual([...p.entries.map((e) => e.ms)].sort((a, b) => b - a));
    expect(p.kernelMs).toBeLessThanOrEqual(p.spanMs + 1e-6);
    expect(p.kernelMs).toBeGreaterThan(0); // the emulator's events carry host time
    expect(p.deviceMallocs).toBeGreaterThanOrEqual(1);
    expect(p.hostWaits).toBe(0); // kernels and allocations queue; nothing was read
    const table = formatKernelProfile(p, 2);
    expect(table.split('\n')[0]).toMatch(/^kernel profile of cudaemu:0: \d+ entries/);
    expect(table).toMatch(/by kind: gemm [\d.]+ ms/);
    // nothing is recorded once stopped, and a second profile starts empty
    z.add(z).dispose();
    startKernelProfile('cudaemu:0');
    z.toTypedArray(); // a read waits once
    const q = stopKernelProfile('cudaemu:0');
    expect([q.calls, q.hostWaits]).toEqual([0, 1]);
    for (const t of [x, w, y, z, big, other]) t.dispose();
  });

  it('gives the same bits on the packed path (aligned, contiguous) as element by element', () => {
    // a view that starts one element in is contiguous but not pack-aligned: the element kernels
    for (const dtype of ['float32', 'bfloat16', 'float16', 'float64'] as const) {
      for (const n of [1, 7, 8, 9, 33, 1000]) {
        const base = randn([n + 1], { dtype: 'float32' }).to('cudaemu:0', dtype);
        const other = randn([n + 1], { dtype: 'float32' }).to('cudaemu:0', dtype);
        const a = base.narrow(0, 0, n).clone(); // fresh blocks: aligned
        const b = other.narrow(0, 0, n).clone();
        const ua = base.narrow(0, 1, n); // not aligned
        const ub = other.narrow(0, 1, n);
        ua.copy_(a);
        ub.copy_(b);
        const ops: [string, (x: Tensor, y: Tensor) => Tensor][] = [
          ['add', (x, y) => x.add(y, 0.5)],
          ['mul', (x, y) => x.mul(y)],
          ['scalar', (x) => x.mul(3).sub(1)],
          ['exp', (x) => x.exp()],
          ['silu', (x) => x.silu()],
          ['gt', (x, y) => x.gt(y)],
          ['cast', (x) => x.to(dtype === 'float32' ? 'bfloat16' : 'float32')],
        ];
        for (const [name, f] of ops) {
          const packed = f(a, b).cpu().toArray();
          const single = f(ua, ub).cpu().toArray();
          expect(packed, `${name} ${dtype} n=${n}`).toEqual(single);
        }
        for (const t of [base, other, a, b]) t.dispose();
      }
      // rows kept contiguous under a transpose ([s, b, h, d] <-> [b, h, s, d]), and a row broadcast
      // over the leading dimensions: packed per row when aligned (d 16), element by element when
      // the views start one element in
      const grid = randn([3, 4, 5, 24], { dtype: 'float32' }).to('cudaemu:0', dtype);
      const gridU = zeros([3, 4, 5, 24], { dtype, device: 'cudaemu:0' });
      const row = randn([17], { dtype: 'float32' }).to('cudaemu:0', dtype);
      const rowU = zeros([17], { dtype, device: 'cudaemu:0' });
      const al = grid.narrow(3, 0, 16).permute(1, 2, 0, 3); // [4, 5, 3, 16], rows aligned (24-element rows)
      const un = gridU.narrow(3, 1, 16).permute(1, 2, 0, 3); // the same layout, one element in
      un.copy_(al);
      const ra = row.narrow(0, 0, 16);
      const ru = rowU.narrow(0, 1, 16);
      ru.copy_(ra);
      const cases: [string, (x: Tensor, r: Tensor) => Tensor][] = [
        ['permuted copy', (x) => x.contiguous()],
        ['permuted cast', (x) => x.to(dtype === 'float32' ? 'bfloat16' : 'float32')],
        ['permuted exp', (x) => x.exp()],
        ['row broadcast add', (x, r) => x.add(r)],
        ['row broadcast mul', (x, r) => r.mul(x)],
      ];
      for (const [name, f] of cases) {
        const packed = f(al, ra).cpu().toArray();
        const single = f(un, ru).cpu().toArray();
        expect(packed, `${name} ${dtype}`).toEqual(single);
      }
      for (const t of [grid, gridU, row, rowU]) t.dispose();
    }
  });
});
