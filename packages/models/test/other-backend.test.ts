// The model zoo on another backend: with the default device set to the pure-TypeScript reference
// backend of @megapatch/tensor (ref:0), every fixture model loads its weights there, and its loss
// (with MTP) and gradients equal the CPU run's. Nothing in the models names a device, so a new
// backend (CUDA) that passes the tensor conformance suite runs them unchanged.
import { AdamW, fromTypedArray, getDefaultDevice, setDefaultDevice, type Tensor } from '@megapatch/tensor';
import { registerReferenceBackend } from '@megapatch/tensor/reference';
import { afterEach, expect, it } from 'vitest';
import { loadModel } from '../src/index.js';
import { fixtureCheckpoint } from './helpers/fixtures.js';

registerReferenceBackend();
afterEach(() => setDefaultDevice('cpu'));

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

it.each([
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
])('%s on the reference backend gives the CPU loss, gradients and AdamW step', (id) => {
  const cpu = run(id);
  setDefaultDevice('ref:0');
  expect(getDefaultDevice()).toBe('ref:0');
  const ref = run(id);
  expect(ref.devices).toEqual(['ref:0']);
  expect(Math.abs(ref.loss - cpu.loss) / cpu.loss).toBeLessThan(1e-5);
  expect(Math.abs(ref.after - cpu.after) / cpu.after).toBeLessThan(1e-4);
  for (const [i, [name, g]] of cpu.grads.entries()) {
    const h = ref.grads[i][1];
    let diff = 0;
    let scale = 1e-6;
    for (let j = 0; j < g.length; j++) {
      diff = Math.max(diff, Math.abs(g[j] - h[j]));
      scale = Math.max(scale, Math.abs(g[j]));
    }
    expect(diff / scale, name).toBeLessThan(1e-4);
  }
});
