// Gradient-accumulation fusion on the emulator (the CUDA backend's own linearWeightGradAccumulate
// kernel): a linear layer's weight gradient goes straight into the weight's float32 mainGrad, in
// float32, with the engine's post-accumulate hooks still run once per backward and nothing left in
// .grad; the input gradient is unchanged; a weight with other uses, or with a tensor hook, still
// gets the right sum; setGradientAccumulationFusion(false) restores the bf16 gradient then the
// accumulateGrad kernel.
import {
  embedding,
  getBackend,
  getGradientAccumulationFusion,
  layerNorm,
  linear,
  memoryStats,
  setGradientAccumulationFusion,
  type Tensor,
  tensor,
} from '@megapatch/tensor';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadEmulatorAddon } from '../src/native.js';

const built = loadEmulatorAddon();
const skip = 'error' in built ? built.error : '';
const DEV = 'cudaemu:0';

/** Seeded normal values (mulberry32 + Box-Muller), rounded to dtype on DEV. */
function randn(seed: number, shape: number[], dtype: 'bfloat16' | 'float32', scale = 1): Tensor {
  let s = seed >>> 0;
  const u = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 4294967296;
  };
  const n = shape.reduce((a, b) => a * b, 1);
  const v = new Float64Array(n);
  for (let i = 0; i < n; i++) v[i] = scale * Math.sqrt(-2 * Math.log(u())) * Math.cos(2 * Math.PI * u());
  return tensor(v, { shape, dtype }).to(DEV);
}

const vals = (t: Tensor): number[] => Array.from(t.cpu().toTypedArray() as Float32Array, Number);

/** A bf16 weight [N, K] with a float32 mainGrad that starts at `init` (as DDP's buffer would). */
function weightWithMainGrad(seed: number, N: number, K: number, init: Tensor): Tensor {
  const w = randn(seed, [N, K], 'bfloat16', 0.2).requiresGrad_(true);
  w.mainGrad = init.clone();
  return w;
}

/** g^T x + init in float64 from the bf16 values (rows of g [M, N] and x [M, K]). */
function expected(init: Tensor, terms: [Tensor, Tensor][]): { sum: number[]; abs: number[] } {
  const sum = vals(init);
  const abs = sum.map(Math.abs);
  const [N, K] = init.shape;
  for (const [g, x] of terms) {
    const gv = vals(g.float());
    const xv = vals(x.float());
    const M = gv.length / N;
    for (let n = 0; n < N; n++)
      for (let k = 0; k < K; k++) {
        let s = 0;
        let a = 0;
        for (let m = 0; m < M; m++) {
          const p = gv[m * N + n] * xv[m * K + k];
          s += p;
          a += Math.abs(p);
        }
        sum[n * K + k] += s;
        abs[n * K + k] += a;
      }
  }
  return { sum, abs };
}

/** Every element within float32 summation error of the float64 value. */
function expectClose(got: number[], want: { sum: number[]; abs: number[] }, terms: number) {
  for (let i = 0; i < got.length; i++) {
    const tol = 1.2 * (terms + 2) * 2 ** -24 * want.abs[i] + 2 ** -24 * Math.abs(want.sum[i]);
    if (!(Math.abs(got[i] - want.sum[i]) <= tol)) expect.fail(`element ${i}: ${got[i]} vs ${want.sum[i]}`);
  }
}

describe.skipIf(skip !== '')(
  `gradient-accumulation fusion on ${DEV}${skip ? ` (skipped: ${skip})` : ''}`,
  () => {
    const kernelCalls: string[] = [];
    beforeAll(async () => {
      await import('../src/emulator.js');
      const b = getBackend(DEV);
      const kernel = b.kernel.bind(b);
      b.kernel = ((name: Parameters<typeof kernel>[0]) => {
        kernelCalls.push(name);
        return kernel(name);
      }) as typeof b.kernel;
    });
    afterEach(() => setGradientAccumulationFusion(true));

    const [M, N, K] = [24, 12, 40];

    it('is on by default; the weight gradient goes into mainGrad in float32, hooks run once, .grad stays empty', () => {
      expect(getGradientAccumulationFusion()).toBe(true);
      const init = randn(1, [N, K], 'float32');
      const w = weightWithMainGrad(2, N, K, init);
      const x = randn(3, [2, M / 2, K], 'bfloat16').requiresGrad_(true);
      const g = randn(4, [2, M / 2, N], 'bfloat16');
      let fired = 0;
      w.registerPostAccumulateGradHook(() => fired++);
      kernelCalls.length = 0;
      linear(x, w).backward(g);
      expect(kernelCalls).toContain('linearWeightGradAccumulate');
      expect(kernelCalls).not.toContain('accumulateGrad');
      expect(fired).toBe(1);
      expect(w.grad).toBeNull();
      const want = expected(init, [[g.reshape(M, N), x.reshape(M, K)]]);
      expectClose(vals(w.mainGrad!), want, M);

      // unfused: the bf16 gradient (rounded) accumulated by accumulateGrad; dx is the same bits
      setGradientAccumulationFusion(false);
      const w2 = weightWithMainGrad(2, N, K, init);
      const x2 = x.detach().requiresGrad_(true);
      kernelCalls.length = 0;
      linear(x2, w2).backward(g);
      expect(kernelCalls).not.toContain('linearWeightGradAccumulate');
      expect(kernelCalls).toContain('accumulateGrad');
      expect(vals(x2.grad!)).toEqual(vals(x.grad!));
      // the bf16 rounding of g^T x makes the two differ somewhere (40 x 12 values)
      const fused = vals(w.mainGrad!);
      const unfused = vals(w2.mainGrad!);
      expect(fused.some((v, i) => v !== unfused[i])).toBe(true);
      const bf16Rounded = vals(
        init.add(g.reshape(M, N).transpose(0, 1).matmul(x.detach().reshape(M, K)).float()),
      );
      expect(unfused).toEqual(bf16Rounded);
    });

    it('sums the weight gradients of several uses (two linears and an embedding lookup)', () => {
      const init = randn(5, [N, K], 'float32');
      const w = weightWithMainGrad(6, N, K, init);
      const x1 = randn(7, [M, K], 'bfloat16');
      const x2 = randn(8, [M, K], 'bfloat16');
      const g1 = randn(9, [M, N], 'bfloat16');
      const g2 = randn(10, [M, N], 'bfloat16');
      const ids = tensor([3, 0, 3, 11], { dtype: 'int64' }).to(DEV);
      const ge = randn(11, [4, K], 'bfloat16');
      let fired = 0;
      w.registerPostAccumulateGradHook(() => fired++);
      const loss = linear(x1, w)
        .mul(g1)
        .sum()
        .add(linear(x2, w).mul(g2).sum())
        .add(embedding(ids, w).mul(ge).sum());
      loss.backward();
      expect(fired).toBe(1);
      // the lookup's rows: one-hot rows of ids as "g" against ge as "x"
      const oneHot = tensor(
        Array.from({ length: 4 * N }, (_, i) => (Number([3, 0, 3, 11][Math.floor(i / N)]) === i % N ? 1 : 0)),
        { shape: [4, N], dtype: 'bfloat16' },
      ).to(DEV);
      const want = expected(init, [
        [g1, x1],
        [g2, x2],
        [oneHot, ge],
      ]);
      // the lookup's rows go into mainGrad in float32 too
      expectClose(vals(w.mainGrad!), want, M + 6);
    });

    it("adds a norm's weight and bias gradients into their mainGrads in float32 (no accumulateGrad)", () => {
      const [R, H] = [24, 16];
      const x = randn(30, [R, H], 'bfloat16');
      const g = randn(31, [R, H], 'bfloat16');
      const initW = randn(32, [H], 'float32');
      const initB = randn(33, [H], 'float32');
      const run = () => {
        const w = randn(34, [H], 'bfloat16').requiresGrad_(true);
        const b = randn(35, [H], 'bfloat16').requiresGrad_(true);
        w.mainGrad = initW.clone();
        b.mainGrad = initB.clone();
        let fired = 0;
        w.registerPostAccumulateGradHook(() => fired++);
        kernelCalls.length = 0;
        layerNorm(x, [H], w, b, 1e-5).backward(g);
        expect(fired).toBe(1);
        return { w, b, calls: [...kernelCalls] };
      };
      const on = run();
      expect(on.calls).not.toContain('accumulateGrad');
      expect(on.w.grad).toBeNull();
      expect(on.b.grad).toBeNull();
      setGradientAccumulationFusion(false);
      const off = run();
      expect(off.calls).toContain('accumulateGrad');
      // the unfused sums are rounded to bf16 before they are accumulated: within half a unit of
      // the sum (the unfused main gradient less its start value)
      for (const [name, a, e, init] of [
        ['weight', vals(on.w.mainGrad!), vals(off.w.mainGrad!), vals(initW)],
        ['bias', vals(on.b.mainGrad!), vals(off.b.mainGrad!), vals(initB)],
      ] as const) {
        for (let i = 0; i < a.length; i++) {
          const tol = 2 ** -8 * 1.01 * Math.abs(e[i] - init[i]) + 1e-6;
          if (!(Math.abs(a[i] - e[i]) <= tol)) expect.fail(`${name} ${i}: ${a[i]} vs ${e[i]}`);
        }
      }
      // the bias sums: exactly init + the float32 sum of g's columns (a float64 check)
      const gv = vals(g.float());
      const start = vals(initB);
      const got = vals(on.b.mainGrad!);
      for (let c = 0; c < H; c++) {
        let sum = 0;
        let abs = 0;
        for (let r = 0; r < R; r++) {
          sum += gv[r * H + c];
          abs += Math.abs(gv[r * H + c]);
        }
        const tol = (R + 2) * 2 ** -24 * (abs + Math.abs(start[c]));
        if (!(Math.abs(got[c] - (start[c] + sum)) <= tol))
          expect.fail(`bias ${c}: ${got[c]} vs ${start[c] + sum}`);
      }
    });

    it("adds an embedding's rows straight into mainGrad in float32; padding and unused rows stay as they are", () => {
      const [V, H] = [16, 24];
      const init = randn(20, [V, H], 'float32');
      const ids = tensor([3, 0, 3, 11, 5, 3], { shape: [2, 3], dtype: 'int64' }).to(DEV);
      const g = randn(22, [2, 3, H], 'bfloat16');
      const run = () => {
        const w = randn(21, [V, H], 'bfloat16', 0.2).requiresGrad_(true);
        w.mainGrad = init.clone();
        let fired = 0;
        w.registerPostAccumulateGradHook(() => fired++);
        kernelCalls.length = 0;
        embedding(ids, w, { paddingIdx: 5 }).backward(g);
        expect(fired).toBe(1);
        return { w, calls: [...kernelCalls] };
      };
      const { w, calls } = run();
      expect(calls).toContain('indexAddRows');
      expect(calls).not.toContain('accumulateGrad');
      expect(w.grad).toBeNull();
      const got = vals(w.mainGrad!);
      const start = vals(init);
      const gv = vals(g.float());
      const idv = [3, 0, 3, 11, 5, 3];
      for (let r = 0; r < V; r++) {
        for (let c = 0; c < H; c++) {
          const i = r * H + c;
          let s = 0;
          let a = 0;
          idv.forEach((id, p) => {
            if (id === r && id !== 5) {
              s += gv[p * H + c];
              a += Math.abs(gv[p * H + c]);
            }
          });
          if (a === 0) {
            expect(got[i], `untouched row ${r}`).toBe(start[i]); // bit for bit
            continue;
          }
          const want = start[i] + s;
          const tol = 4 * 2 ** -24 * (a + Math.abs(start[i]));
          if (!(Math.abs(got[i] - want) <= tol)) expect.fail(`row ${r} column ${c}: ${got[i]} vs ${want}`);
        }
      }
      // unfused: the bf16 gradient of the table (its rows rounded), then accumulateGrad
      setGradientAccumulationFusion(false);
      const off = run();
      expect(off.calls).toContain('accumulateGrad');
      expect(off.w.grad).toBeNull(); // accumulated into mainGrad
      const rounded = vals(off.w.mainGrad!);
      // row 3 sums three bf16 rows: the fused float32 sum and the bf16-rounded one differ somewhere
      expect(got.slice(3 * H, 4 * H).some((v, c) => v !== rounded[3 * H + c])).toBe(true);
    });

    it('leaves a weight with a tensor hook to the unfused path (the hook sees the real gradient)', () => {
      const init = randn(12, [N, K], 'float32');
      const w = weightWithMainGrad(13, N, K, init);
      const x = randn(14, [M, K], 'bfloat16');
      const g = randn(15, [M, N], 'bfloat16');
      const seen: number[][] = [];
      w.registerHook((grad) => {
        seen.push(vals(grad.float()));
      });
      kernelCalls.length = 0;
      linear(x, w).backward(g);
      expect(kernelCalls).not.toContain('linearWeightGradAccumulate');
      const gw = vals(g.transpose(0, 1).matmul(x).float());
      expect(seen).toEqual([gw]);
      expect(vals(w.mainGrad!)).toEqual(vals(init.add(g.transpose(0, 1).matmul(x).float())));
    });

    it('leaves no device memory behind: backward after backward, the live bytes stay flat', () => {
      const w = weightWithMainGrad(22, N, K, randn(23, [N, K], 'float32'));
      const x = randn(24, [M, K], 'bfloat16');
      const g = randn(25, [M, N], 'bfloat16');
      // no tidy scope around backward: it would free what the engine left behind
      const step = () => {
        const y = linear(x, w);
        y.backward(g);
        y.dispose();
      };
      step();
      const live = memoryStats(DEV).liveBytes;
      for (let i = 0; i < 3; i++) step();
      expect(memoryStats(DEV).liveBytes).toBe(live);
      expect(w.grad).toBeNull();
    });

    it('adds the bias gradient separately when the layer has a bias', () => {
      const init = randn(16, [N, K], 'float32');
      const w = weightWithMainGrad(17, N, K, init);
      const bias = randn(18, [N], 'bfloat16').requiresGrad_(true);
      bias.mainGrad = randn(19, [N], 'float32');
      const b0 = vals(bias.mainGrad);
      const x = randn(20, [M, K], 'bfloat16');
      const g = randn(21, [M, N], 'bfloat16');
      kernelCalls.length = 0;
      linear(x, w, bias).backward(g);
      expect(kernelCalls).toContain('linearWeightGradAccumulate');
      expectClose(vals(w.mainGrad!), expected(init, [[g, x]]), M);
      // the bias gradient: the row sums of g rounded once to bf16, then added to its mainGrad
      const gs = vals(g.float());
      const got = vals(bias.mainGrad);
      for (let n = 0; n < N; n++) {
        let s = 0;
        for (let m = 0; m < M; m++) s += gs[m * N + n];
        const tol = 2 ** -8 * Math.abs(s) + 1e-6;
        expect(Math.abs(got[n] - b0[n] - s)).toBeLessThanOrEqual(tol);
      }
    });
  },
);
