// The residual stream of a pre-norm transformer layer on the emulator: x -> rmsNorm -> linear ->
// + x -> rmsNorm -> linear -> + (two sublayers). On the CUDA backend the forward's residual adds go
// into the GEMMs (linearResidual) and the backward's adds of the residual gradient into the norms'
// backward (the engine's pending gradient), so neither pass runs a binary add of the stream; the
// gradients agree with the CPU's unfused graph within bf16 rounding.
import { Generator, linearResidual, randn, rmsNorm, type Tensor, tidy } from '@megapatch/tensor';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadEmulatorAddon } from '../src/native.js';
import { startKernelProfile, stopKernelProfile } from '../src/profile.js';

const built = loadEmulatorAddon();
const skip = 'error' in built ? built.error : '';
const DEV = 'cudaemu:0';

/** Two pre-norm sublayers over x [s, b, h] with weights ws (norm, linear, norm, linear). */
function block(x: Tensor, ws: Tensor[]): Tensor {
  const [n1, w1, n2, w2] = ws;
  const h = linearResidual(rmsNorm(x, [x.shape[2]], n1, 1e-6), w1, x);
  return linearResidual(rmsNorm(h, [h.shape[2]], n2, 1e-6), w2, h);
}

const vals = (t: Tensor): number[] => Array.from(t.cpu().float().toTypedArray() as Float32Array);

describe.skipIf(skip !== '')(
  `residual stream fusion on the emulator${skip ? ` (skipped: ${skip})` : ''}`,
  () => {
    beforeAll(async () => {
      await import('../src/emulator.js');
    });

    it('runs no binary add of the stream forward or backward, and gives the CPU gradients', () => {
      tidy(() => {
        const gen = new Generator().manualSeed(3);
        const [s, b, h] = [8, 2, 32];
        const x0 = randn([s, b, h], { generator: gen }).to('bfloat16');
        const ws0 = [
          randn([h], { generator: gen }),
          randn([h, h], { generator: gen }).mul(0.2),
          randn([h], { generator: gen }),
          randn([h, h], { generator: gen }).mul(0.2),
        ].map((t) => t.to('bfloat16'));
        const g0 = randn([s, b, h], { generator: gen }).to('bfloat16');
        const run = (device: string, profile: boolean) => {
          const x = x0.to(device).requiresGrad_(true);
          const ws = ws0.map((w) => w.to(device).requiresGrad_(true));
          if (profile) startKernelProfile(device, { shapes: true });
          const y = block(x, ws);
          // the gradient of the stream also arrives from outside (as from the next layer's residual)
          y.backward(g0.to(device));
          const p = profile ? stopKernelProfile(device) : null;
          return { y, grads: [x.grad as Tensor, ...ws.map((w) => w.grad as Tensor)], p };
        };
        const dev = run(DEV, true);
        const cpu = run('cpu', false);
        const names = dev.p!.entries.map((e) => e.name);
        expect(names.filter((n) => n.startsWith('linearResidual')).length).toBe(1);
        expect(dev.p!.entries.find((e) => e.name.startsWith('linearResidual'))!.calls).toBe(2);
        // no add of [s, b, h] bf16 tensors at all: forward (in the GEMMs) nor backward (in the norms)
        expect(names.filter((n) => n.startsWith('binary:add') && n.includes(`[${s},${b},${h}]`))).toEqual([]);
        // the CPU composes linear + add and adds the gradients apart: within bf16 rounding
        for (const [i, [a, e]] of [[dev.y, cpu.y], ...dev.grads.map((t, k) => [t, cpu.grads[k]])].entries()) {
          const av = vals(a as Tensor);
          const ev = vals(e as Tensor);
          const scale = Math.max(1, ...ev.map(Math.abs));
          const worst = Math.max(...av.map((v, k) => Math.abs(v - ev[k])));
          expect(worst / scale, `output ${i}`).toBeLessThanOrEqual(3e-2);
        }
      });
    });
  },
);
