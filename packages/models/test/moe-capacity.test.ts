// Token dropping at an expert capacity (Megatron's --moe-expert-capacity-factor,
// --moe-token-drop-policy, --moe-pad-expert-input-to-capacity) on one process: the capacity
// formula, which tokens each policy keeps on a hand-worked routing, what a MoE layer computes with
// them under both dispatchers, when the expert load is counted, and the options' errors.
import { SingleProcessGroup } from '@megapatch/parallel';
import { fromTypedArray, noGrad, type Tensor } from '@megapatch/tensor';
import { afterAll, describe, expect, it } from 'vitest';
import { ModelError } from '../src/errors.js';
import type { GPTModel, GPTModelOptions } from '../src/gpt-model.js';
import { loadModel } from '../src/load.js';
import type { MoELayer } from '../src/moe/moe-layer.js';
import { buildRoutingMap, type CapacityOptions, expertCapacity } from '../src/moe/routing-map.js';
import { fixtureCheckpoint, readFixture, relMaxError } from './helpers/fixtures.js';

const disposeLater: { dispose(): void }[] = [];
afterAll(() => {
  for (const d of disposeLater) d.dispose();
});

// Six tokens, top-2 of four experts: T·k / E = 3 choices per expert on average.
//   token:    0          1          2          3          4          5
//   experts:  0 .5 1 .5  0 .7 2 .3  1 .5 0 .5  0 .9 3 .1  2 .8 1 .2  0 .5 1 .5
// expert 0 is chosen by tokens 0 (.5), 1 (.7), 2 (.5), 3 (.9), 5 (.5); expert 1 by 0 (.5), 2 (.5),
// 4 (.2), 5 (.5); expert 2 by 1 (.3), 4 (.8); expert 3 by 3 (.1).
const T = 6;
const E = 4;
const INDICES = Int32Array.from([0, 1, 0, 2, 1, 0, 0, 3, 2, 1, 0, 1]);
const WEIGHTS = Float32Array.from([0.5, 0.5, 0.7, 0.3, 0.5, 0.5, 0.9, 0.1, 0.8, 0.2, 0.5, 0.5]);

/** Tokens of each expert in a routing map, with padding marked `p`. */
function tokensByExpert(capacity: CapacityOptions | null): (number | string)[][] {
  const m = buildRoutingMap(INDICES, T, E, capacity, () => WEIGHTS);
  const out: (number | string)[][] = [];
  let p = 0;
  for (let e = 0; e < E; e++) {
    const row: (number | string)[] = [];
    for (let i = 0; i < m.counts[e]; i++, p++) {
      row.push(m.slot[p] < 0 ? `p${m.token[p]}` : m.token[p]);
      // a real pair's slot holds this token's choice of this expert
      if (m.slot[p] >= 0) {
        expect(Math.floor(m.slot[p] / 2)).toBe(m.token[p]);
        expect(INDICES[m.slot[p]]).toBe(e);
      }
    }
    out.push(row);
  }
  return out;
}

const cap = (capacityFactor: number, dropPolicy: 'probs' | 'position', padToCapacity = false) => ({
  capacityFactor,
  dropPolicy,
  padToCapacity,
});

describe('capacity and the tokens each policy keeps', () => {
  it("capacity is Megatron's ceil(T·k / E · factor)", () => {
    expect(expertCapacity(12, 4, 0.5)).toBe(2); // 1.5 -> 2
    expect(expertCapacity(12, 4, 1)).toBe(3);
    expect(expertCapacity(14, 4, 1)).toBe(4); // 3.5 -> 4
    expect(expertCapacity(14, 4, 1.25)).toBe(5); // 4.375 -> 5
  });

  it('dropless keeps every choice, grouped by expert in token order', () => {
    expect(tokensByExpert(null)).toEqual([[0, 1, 2, 3, 5], [0, 2, 4, 5], [1, 4], [3]]);
  });

  it("'probs' keeps each expert's highest weights, the earlier token on a tie", () => {
    // capacity 2: expert 0 keeps 3 (.9) and 1 (.7); expert 1's .5 three-way tie keeps 0 and 2
    expect(tokensByExpert(cap(0.5, 'probs'))).toEqual([[1, 3], [0, 2], [1, 4], [3]]);
  });

  it("'position' keeps each expert's earliest tokens", () => {
    expect(tokensByExpert(cap(0.5, 'position'))).toEqual([[0, 1], [0, 2], [1, 4], [3]]);
  });

  it('padding fills every expert to the capacity with weight-0 tokens', () => {
    expect(tokensByExpert(cap(0.5, 'probs', true))).toEqual([
      [1, 3],
      [0, 2],
      [1, 4],
      ['p0', 3],
    ]);
    // capacity ceil(3 · 1.25) = 4: expert 0 keeps its first 4 tokens, the others are padded to 4
    expect(tokensByExpert(cap(1.25, 'position', true))).toEqual([
      [0, 1, 2, 3],
      [0, 2, 4, 5],
      ['p0', 1, 'p2', 4],
      ['p0', 'p1', 'p2', 3],
    ]);
    // a capacity above T gives each expert every token, as Megatron's all-true capacity mask
    expect(tokensByExpert(cap(4, 'probs', true))[3]).toEqual(['p0', 'p1', 'p2', 3, 'p4', 'p5']);
  });

  it('a capacity no expert reaches drops nothing', () => {
    expect(tokensByExpert(cap(2, 'probs'))).toEqual(tokensByExpert(null));
  });
});

/** The first MoE layer of a mixtral fixture built with `opts`, and a [5, 2, h] input. */
function moeLayer(opts: GPTModelOptions): { model: GPTModel; layer: MoELayer; x: Tensor } {
  const { model } = loadModel(fixtureCheckpoint('mixtral'), opts);
  disposeLater.push(model);
  const layer = model.moeLayers()[0][1];
  const h = model.config.hiddenSize;
  const x = fromTypedArray(
    Float32Array.from({ length: 10 * h }, (_, i) => Math.sin(i * 0.37) * 0.8),
    [5, 2, h],
  );
  return { model, layer, x };
}

describe('a MoE layer with a capacity', () => {
  it.each(['allgather', 'alltoall'] as const)(
    '%s: each token gets the weighted outputs of the experts that kept it',
    (dispatcher) => {
      const { layer, x } = moeLayer({ moeTokenDispatcherType: dispatcher, moeExpertCapacityFactor: 0.5 });
      const out = noGrad(() => layer.forward(x));
      const r = layer.lastRouting;
      if (!r) throw new Error('no routing');
      const [s, b, h] = x.shape;
      const flat = x.reshape(s * b, h);
      const capacity = expertCapacity(s * b * 2, 4, 0.5);
      expect(r.routingMap.capacity).toBe(capacity);
      expect(Math.max(...r.routingMap.counts)).toBe(capacity);
      expect(r.routingMap.token.length, 'some choices dropped').toBeLessThan(r.indices.length);
      // every expert on every token, then the kept pairs summed by hand
      const perExpert = noGrad(() =>
        Array.from(
          { length: 4 },
          (_, e) => layer.experts.localExperts.get(e).forward(flat).toTypedArray() as Float32Array,
        ),
      );
      const w = r.probs.toTypedArray() as Float32Array;
      const want = new Float64Array(s * b * h);
      let p = 0;
      for (let e = 0; e < 4; e++) {
        for (let i = 0; i < r.routingMap.counts[e]; i++, p++) {
          const t = r.routingMap.token[p];
          const wt = w[r.routingMap.slot[p]];
          for (let j = 0; j < h; j++) want[t * h + j] += wt * perExpert[e][t * h + j];
        }
      }
      const got = out.reshape(s * b, h).toTypedArray() as Float32Array;
      expect(relMaxError(got, want)).toBeLessThan(1e-6);
      // and it is not the dropless output
      const { layer: dropless } = moeLayer({ moeTokenDispatcherType: dispatcher });
      const full = noGrad(() => dropless.forward(x)).toTypedArray() as Float32Array;
      expect(relMaxError(got, full)).toBeGreaterThan(1e-3);
    },
  );

  it('padding changes no value and no gradient', () => {
    const grads = [false, true].map((pad) => {
      const { model, layer, x } = moeLayer({
        moeTokenDispatcherType: 'alltoall',
        moeExpertCapacityFactor: 1,
        moePadExpertInputToCapacity: pad,
      });
      const xx = x.clone().requiresGrad_(true);
      const out = layer.forward(xx);
      if (pad) expect(layer.lastRouting?.routingMap.slot.some((sl) => sl < 0)).toBe(true);
      out.mul(out).sum().backward();
      const params = new Map(model.namedParameters());
      const g = (n: string) => {
        const grad = params.get(n)?.grad;
        if (!grad) throw new Error(`no gradient of ${n}`);
        return grad.toTypedArray() as Float32Array;
      };
      return {
        out: out.toTypedArray() as Float32Array,
        x: xx.grad?.toTypedArray() as Float32Array,
        router: g('decoder.layers.0.mlp.router.weight'),
        fc1: g('decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight'),
      };
    });
    for (const k of ['out', 'x', 'router', 'fc1'] as const) {
      expect(relMaxError(grads[1][k], grads[0][k]), k).toBeLessThan(1e-6);
    }
  });
});

describe('expert load', () => {
  const ids = readFixture('mixtral').ids('input_ids'); // [2, 12]
  const labels = readFixture('mixtral').ids('labels');

  it('counts the kept choices of forwards with gradients, once under recompute', () => {
    const plain = loadModel(fixtureCheckpoint('mixtral'), { moeExpertCapacityFactor: 0.5 }).model;
    const recompute = loadModel(fixtureCheckpoint('mixtral'), {
      moeExpertCapacityFactor: 0.5,
      recompute: { granularity: 'selective', modules: ['moe'] },
    }).model;
    disposeLater.push(plain, recompute);
    noGrad(() => plain.forward(ids));
    for (const [, counts] of plain.takeExpertLoad()) expect(Array.from(counts)).toEqual([0, 0, 0, 0]);
    const loads = [plain, recompute].map((m) => {
      (m.forward(ids, { labels }).loss as Tensor).mean().backward();
      return m.takeExpertLoad();
    });
    for (const [layer, counts] of loads[0]) {
      // 24 tokens, top-2, capacity ceil(48 / 4 · 0.5) = 6 per expert
      expect(Math.max(...counts), `layer ${layer}`).toBeLessThanOrEqual(6);
      expect(counts.reduce((a, c) => a + c, 0)).toBeLessThan(48);
      expect(Array.from(loads[1].get(layer) ?? []), `layer ${layer} under recompute`).toEqual(
        Array.from(counts),
      );
    }
  });

  it('on one process the global load is the local one, and updateExpertBias moves each biased router', () => {
    const { model } = loadModel(fixtureCheckpoint('deepseek-v3'));
    disposeLater.push(model);
    model.forward(ids);
    const load = model.takeGlobalExpertLoad(new SingleProcessGroup());
    expect(load.size).toBe(model.moeLayers().length);
    const [first, moe] = model.moeLayers()[0];
    const counts = load.get(first) as Float64Array;
    expect(counts.reduce((a, c) => a + c, 0)).toBe(24 * 2);
    const before = Array.from(moe.router.expertBias?.toTypedArray() as Float32Array);
    model.updateExpertBias(load, 1e-3);
    const after = Array.from(moe.router.expertBias?.toTypedArray() as Float32Array);
    const mean = counts.reduce((a, c) => a + c, 0) / counts.length;
    for (let e = 0; e < counts.length; e++) {
      expect(after[e] - before[e]).toBeCloseTo(1e-3 * Math.sign(mean - counts[e]), 7);
    }
  });
});

describe('bad MoE options give one clear error', () => {
  const build = (opts: GPTModelOptions) => () =>
    loadModel(fixtureCheckpoint('mixtral'), opts).model.dispose();
  it('padding without a capacity factor', () => {
    expect(build({ moePadExpertInputToCapacity: true })).toThrow(
      /moePadExpertInputToCapacity needs moeExpertCapacityFactor/,
    );
  });
  it('a zero capacity factor', () => {
    expect(build({ moeExpertCapacityFactor: 0 })).toThrow(ModelError);
    expect(build({ moeExpertCapacityFactor: 0 })).toThrow(/positive number/);
  });
  it('a negative capacity factor is dropless, as in Megatron', () => {
    const { model } = loadModel(fixtureCheckpoint('mixtral'), { moeExpertCapacityFactor: -1 });
    disposeLater.push(model);
    expect(model.moeLayers()[0][1].router.capacity).toBeNull();
  });
  it('an unknown dispatcher', () => {
    // @ts-expect-error: a value from an untyped config file
    expect(build({ moeTokenDispatcherType: 'flex' })).toThrow(/unknown MoE token dispatcher 'flex'/);
  });
});
