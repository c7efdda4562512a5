// The model zoo on other backends: with the default device set to the pure-TypeScript reference
// backend of @megapatch/tensor (ref:0), or to the CUDA backend's kernels run by its CPU emulator
// (cudaemu:0, from @megapatch/cuda/emulator), every fixture model loads its weights there, and its
// loss (with MTP) and gradients equal the CPU run's. Nothing in the models names a device.
import { AdamW, fromTypedArray, getDefaultDevice, setDefaultDevice, type Tensor } from '@megapatch/tensor';
import { registerReferenceBackend } from '@megapatch/tensor/reference';
import { afterEach, describe, expect, it } from 'vitest';
import { loadModel } from '../src/index.js';
import { fixtureCheckpoint } from './helpers/fixtures.js';

registerReferenceBackend();
afterEach(() => setDefaultDevice('cpu'));

/** Why the CUDA emulator could not be registered (its addon is built with @megapatch/cuda), or null. */
let emulator: string | null = null;
try {
  await import('@megapatch/cuda/emulator');
} catch (e) {
  emulator = (e as Error).message.split('\n')[0];
}

const IDS = [1, 5, 9, 33, 100, 7, 8, 9, 4, 77, 12, 3];

/** Loss, gradients and the loss after one AdamW step, on the default device. */
function run(id: string) {
  const { model } = loadModel(fixtureCheckpoint(id));
  try {
    const ids = fromTypedArray(BigInt64Array.from(IDS, BigInt), [2, 6]);
    const labels = fromTypedArray(BigInt64Array.from([...IDS.slice(1), 2], BigInt), [2, 6]);
    const objective = () => {
      const out = model.forward(ids, { labels });
      let l = (out.loss as Tensor).mean();
      for (const m of out.mtpLosses) l = l.add(m.mul(0.1));
      return l;
    };
    const l = objective();
    l.backward();
    const grads = model
      .namedParameters()
      .map(([n, p]) => [n, Float32Array.from((p.grad as Tensor).toTypedArray() as Float32Array)] as const);
    new AdamW(model.parameters(), { lr: 1e-2 }).step();
    return {
      loss: l.item(),
      after: objective().item(),
      grads,
      devices: [...new Set(model.parameters().map((p) => p.device))],
    };
  } finally {
    model.dispose();
  }
}

const FAMILIES = [
  'llama',
  'llama-tied',
  'mistral',
  'qwen2',
  'qwen3',
  'mixtral',
  'qwen2-moe',
  'qwen3-moe',
  'deepseek-v2',
  'deepseek-v3',
  'moonlight',
];

describe.each([
  ['ref:0', 'the reference backend', null],
  ['cudaemu:0', 'the CUDA kernels (emulated)', emulator],
])('%s', (device, what, unavailable) => {
  // on a machine without the emulator's addon: one skipped line that says why
  if (unavailable !== null) it.skip(`${device}: ${unavailable}`, () => {});
  it.runIf(unavailable === null).each(FAMILIES)(
    `%s on ${what} gives the CPU loss, gradients and AdamW step`,
    (id) => {
      const cpu = run(id);
      setDefaultDevice(device);
      expect(getDefaultDevice()).toBe(device);
      const other = run(id);
      expect(other.devices).toEqual([device]);
      expect(Math.abs(other.loss - cpu.loss) / cpu.loss).toBeLessThan(1e-5);
      expect(Math.abs(other.after - cpu.after) / cpu.after).toBeLessThan(1e-4);
      for (const [i, [name, g]] of cpu.grads.entries()) {
        const h = other.grads[i][1];
        let diff = 0;
        let scale = 1e-6;
        for (let j = 0; j < g.length; j++) {
          diff = Math.max(diff, Math.abs(g[j] - h[j]));
          scale = Math.max(scale, Math.abs(g[j]));
        }
        expect(diff / scale, name).toBeLessThan(1e-4);
      }
    },
  );
});
