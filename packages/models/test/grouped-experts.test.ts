// The routed experts as grouped GEMMs (Experts.forward: groupedLinear for fc1 and fc2 around one
// gatedActivation) against the per-expert loop they replace (each expert's MLP.forward on its
// narrowed rows, then cat): the same GEMM per expert, so outputs, token gradients and every
// expert weight's gradient agree bit for bit, an expert without tokens included. Then the op on
// the CUDA kernels (emulated, cudaemu:0; @megapatch/tensor cannot import them itself): equal to
// per-group linear + cat there, and to the CPU within float32 rounding.
import {
  cat,
  Generator,
  getDefaultDevice,
  groupedLinear,
  linear,
  randn,
  setDefaultDevice,
  type Tensor,
} from '@megapatch/tensor';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { type Experts, loadModel } from '../src/index.js';
import { fixtureCheckpoint } from './helpers/fixtures.js';

/** Why the CUDA emulator could not be registered (its addon is built with @megapatch/cuda), or null. */
let emulator: string | null = null;
try {
  await import('@megapatch/cuda/emulator');
} catch (e) {
  emulator = (e as Error).message.split('\n')[0];
}

const disposeLater: { dispose(): void }[] = [];
afterAll(() => {
  for (const m of disposeLater) m.dispose();
});
afterEach(() => setDefaultDevice('cpu'));

/** The expert loop Experts.forward ran before the grouped GEMMs. */
function expertLoop(experts: Experts, tokens: Tensor, tokensPerExpert: readonly number[]): Tensor {
  const outs: Tensor[] = [];
  let start = 0;
  tokensPerExpert.forEach((n, e) => {
    outs.push(experts.localExperts.get(e).forward(tokens.narrow(0, start, n)));
    start += n;
  });
  return outs.length === 1 ? outs[0] : cat(outs, 0);
}

type Host = Float32Array | Float64Array;

/** Output, token gradient and every expert parameter's gradient of one forward/backward. */
function step(
  experts: Experts,
  fn: (tokens: Tensor) => Tensor,
  x: Tensor,
  g: Tensor,
): { y: Host; dx: Host; grads: [string, Host][] } {
  for (const p of experts.parameters()) {
    p.grad?.dispose();
    p.grad = null;
  }
  const tokens = x.clone().requiresGrad_(true);
  const y = fn(tokens);
  y.backward(g);
  const out = {
    y: y.toTypedArray() as Host,
    dx: (tokens.grad as Tensor).toTypedArray() as Host,
    grads: experts
      .namedParameters()
      .map(([n, p]): [string, Host] => [n, (p.grad as Tensor).toTypedArray() as Host]),
  };
  y.dispose();
  tokens.dispose();
  return out;
}

function expectIdentical(got: Host, want: Host, what: string): void {
  expect(got.length, what).toBe(want.length);
  const i = got.findIndex((v, j) => !Object.is(v, want[j]));
  expect(i === -1 ? 'identical' : `${what}[${i}]: ${got[i]} vs ${want[i]}`).toBe('identical');
}

/** tokensPerExpert for E experts: uneven, with the second expert empty. */
function sizesFor(E: number): number[] {
  return Array.from({ length: E }, (_, e) => (e === 1 ? 0 : 3 + ((e * 5) % 7)));
}

describe('Experts.forward (grouped GEMMs) equals the per-expert loop bit for bit', () => {
  const cases = [
    ['mixtral', 'float32'],
    ['qwen2-moe', 'float32'],
    ['qwen3-moe', 'float32'],
    ['deepseek-v3', 'float32'],
    ['mixtral', 'bfloat16'],
    ['qwen3-moe', 'float64'],
  ] as const;
  it.each(cases)('%s in %s: output, token gradient and every expert weight gradient', (id, dtype) => {
    const { model } = loadModel(fixtureCheckpoint(id), { dtype });
    disposeLater.push(model);
    const experts = model.moeLayers()[0][1].experts;
    const sizes = sizesFor(experts.numLocalExperts);
    expect(sizes[1]).toBe(0);
    const N = sizes.reduce((a, b) => a + b, 0);
    const h = model.config.hiddenSize;
    const gen = new Generator(7);
    const draw = () => {
      const r = randn([N, h], { generator: gen });
      const t = r.to(dtype);
      if (t !== r) r.dispose();
      return t;
    };
    const [x, g] = [draw(), draw()];
    const grouped = step(experts, (t) => experts.forward(t, sizes), x, g);
    const loop = step(experts, (t) => expertLoop(experts, t, sizes), x, g);
    expectIdentical(grouped.y, loop.y, 'y');
    expectIdentical(grouped.dx, loop.dx, 'dx');
    expect(grouped.grads.map(([n]) => n)).toEqual(loop.grads.map(([n]) => n));
    expect(grouped.grads.length).toBe(2 * experts.numLocalExperts);
    for (const [i, [name, gw]] of grouped.grads.entries()) expectIdentical(gw, loop.grads[i][1], name);
    // the empty expert's weights got gradients, and they are zero
    const empty = grouped.grads.filter(([n]) => n.startsWith('local_experts.1.'));
    expect(empty.length).toBe(2);
    for (const [, gw] of empty) expect(gw.every((v) => v === 0)).toBe(true);
    x.dispose();
    g.dispose();
  });
});

describe.each([['cudaemu:0', emulator]])('groupedLinear on %s', (device, unavailable) => {
  // on a machine without the emulator's addon: one skipped line that says why
  if (unavailable !== null) it.skip(`${device}: ${unavailable}`, () => {});
  it.runIf(unavailable === null)(
    'equals per-group linear + cat there (forward and gradients) and the CPU within float32 rounding',
    () => {
      const sizes = [5, 0, 9, 1, 3];
      const [N, K, F] = [18, 12, 10];
      const gen = new Generator(3);
      const hx = randn([N, K], { generator: gen });
      const hw = sizes.map(() => randn([F, K], { generator: gen }));
      const hg = randn([N, F], { generator: gen });
      const results: Record<string, Host[]> = {};
      for (const [name, where, grouped] of [
        ['cpu', 'cpu', true],
        ['device', device, true],
        ['device loop', device, false],
      ] as const) {
        setDefaultDevice(where);
        const on = (t: Tensor) => (where === 'cpu' ? t.clone() : t.to(where));
        const x = on(hx).requiresGrad_(true);
        const ws = hw.map((w) => on(w).requiresGrad_(true));
        let y: Tensor;
        if (grouped) y = groupedLinear(x, ws, sizes);
        else {
          let start = 0;
          y = cat(
            sizes.map((n, e) => {
              const part = linear(x.narrow(0, start, n), ws[e]);
              start += n;
              return part;
            }),
            0,
          );
        }
        expect(y.device).toBe(where);
        const g = on(hg);
        y.backward(g);
        results[name] = [y, x.grad as Tensor, ...ws.map((w) => w.grad as Tensor)].map(
          (t) => t.toTypedArray() as Host,
        );
        for (const t of [y, g, x, ...ws]) t.dispose();
      }
      expect(getDefaultDevice()).toBe(device);
      results.device.forEach((a, i) => {
        expectIdentical(a, results['device loop'][i], `device output ${i}`);
        const c = results.cpu[i];
        let diff = 0;
        let scale = 1e-6;
        for (let j = 0; j < c.length; j++) {
          diff = Math.max(diff, Math.abs(a[j] - c[j]));
          scale = Math.max(scale, Math.abs(c[j]));
        }
        expect(diff / scale, `output ${i} vs the CPU`).toBeLessThan(1e-5);
      });
      // the empty group's weight gradient is a zero [F, K] there too
      expect(results.device[3].every((v) => v === 0)).toBe(true);
      for (const t of [hx, hg, ...hw]) t.dispose();
    },
  );

  it.runIf(unavailable === null)('runs a mixtral MoE layer’s experts there, as on the CPU', () => {
    const run = () => {
      const { model } = loadModel(fixtureCheckpoint('mixtral'));
      try {
        const experts = model.moeLayers()[0][1].experts;
        expect(experts.parameters().map((p) => p.device)).toContain(getDefaultDevice());
        const sizes = sizesFor(experts.numLocalExperts);
        const N = sizes.reduce((a, b) => a + b, 0);
        const gen = new Generator(11);
        const x = randn([N, model.config.hiddenSize], { generator: gen });
        const g = randn([N, model.config.hiddenSize], { generator: gen });
        const r = step(experts, (t) => experts.forward(t, sizes), x, g);
        x.dispose();
        g.dispose();
        return r;
      } finally {
        model.dispose();
      }
    };
    const cpu = run();
    setDefaultDevice(device);
    const other = run();
    for (const [what, a, c] of [
      ['y', other.y, cpu.y],
      ['dx', other.dx, cpu.dx],
      ...other.grads.map(([n, gw], i) => [n, gw, cpu.grads[i][1]] as const),
    ] as const) {
      let diff = 0;
      let scale = 1e-6;
      for (let j = 0; j < c.length; j++) {
        diff = Math.max(diff, Math.abs(a[j] - c[j]));
        scale = Math.max(scale, Math.abs(c[j]));
      }
      expect(diff / scale, what).toBeLessThan(1e-5);
    }
  });
});
