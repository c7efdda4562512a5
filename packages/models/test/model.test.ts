// GPTModel behaviour beyond parity: routing rules, Megatron's aux and z losses, the expert-bias
// update, activation recompute, random initialisation and flat memory over training steps.

import type { ProcessGroup } from '@megapatch/parallel';
import { AdamW, fromTypedArray, Generator, memoryStats, noGrad, type Tensor, tidy } from '@megapatch/tensor';
import { afterAll, describe, expect, it } from 'vitest';
import { GPTModel, loadModel, selectExperts, TopKRouter, type TransformerLayer } from '../src/index.js';
import { fixtureCheckpoint, relMaxError } from './helpers/fixtures.js';

const ids = fromTypedArray(BigInt64Array.from([1, 5, 9, 33, 100, 7, 8, 9, 4, 77, 12, 3], BigInt), [2, 6]);
const labels = fromTypedArray(BigInt64Array.from([5, 9, 33, 100, 7, 8, 9, 4, 77, 12, 3, 2], BigInt), [2, 6]);
const disposeLater: { dispose(): void }[] = [];
afterAll(() => {
  for (const m of disposeLater) m.dispose();
});

function grads(m: GPTModel): Map<string, Float32Array> {
  return new Map(
    m.namedParameters().map(([n, p]) => [n, (p.grad as Tensor).to('float32').toTypedArray() as Float32Array]),
  );
}

/** A router of 4 experts, top-2, normalised top-k weights: the scores and the expert bias vary. */
function routerConfig(scoreFunction: 'softmax' | 'sigmoid', expertBias: boolean) {
  return {
    numExperts: 4,
    routerTopk: 2,
    moeFfnHiddenSize: 8,
    sharedExpertIntermediateSize: 0,
    sharedExpertGate: false,
    scoreFunction,
    expertBias,
    numGroups: 1,
    groupTopk: 1,
    routedScalingFactor: 1,
    normTopkProb: true,
    layerPattern: ['moe' as const],
  };
}

describe('router', () => {
  it('selects top-k within the best groups, with the bias for selection only', () => {
    const m = { numExperts: 8, routerTopk: 2, numGroups: 4, groupTopk: 2, expertBias: true };
    // groups (pairs): sums of both (expert bias) → g0 1.0, g1 0.3, g2 1.2, g3 0.9
    const scores = Float32Array.from([0.5, 0.5, 0.2, 0.1, 0.6, 0.6, 0.45, 0.45]);
    const bias = Float32Array.from([0, 0, 0, 0, 0, 0, 0, 0.3]);
    // with the bias g3 = 1.2: groups 2 and 3 (ties broken toward the lower id) → experts 4, 7 (0.75)
    expect(Array.from(selectExperts(scores, bias, 1, m))).toEqual([7, 4]);
    expect(Array.from(selectExperts(scores, null, 1, m))).toEqual([4, 5]);
    // softmax routing with groups: a group's score is its best expert
    const v2 = { ...m, expertBias: false, groupTopk: 1 };
    expect(Array.from(selectExperts(scores, null, 1, v2))).toEqual([4, 5]);
  });

  it("aux loss and z-loss follow Megatron's formulas and reach the router through backward", () => {
    const base = loadModel(fixtureCheckpoint('mixtral')).model;
    const { model } = loadModel(fixtureCheckpoint('mixtral'), {
      moeAuxLossCoeff: 0.01,
      moeZLossCoeff: 0.001,
    });
    disposeLater.push(base, model);
    const plain = base.forward(ids, { labels }).loss as Tensor;
    const out = model.forward(ids, { labels }).loss as Tensor;
    // the losses ride on the activations: the forward value is unchanged
    expect(out.mean().item()).toBeCloseTo(plain.mean().item(), 6);
    // recompute each layer's aux loss by hand from its routing
    const E = 4;
    const k = 2;
    let expected = 0;
    for (const [, moe] of model.moeLayers()) {
      const r = moe.lastRouting;
      if (!r) throw new Error('no routing');
      expect(r.auxLoss).not.toBeNull();
      const T = r.tokensPerExpert.reduce((a, b) => a + b, 0) / k;
      const x = moe.router.weight;
      void x;
      // aux = E·coeff/(k·T²)·Σ_e (Σ_t p_te)·f_e with p the softmax over all experts
      const aux = r.auxLoss?.item() as number;
      const z = r.zLoss?.item() as number;
      expect(aux).toBeGreaterThan(0);
      expect(z).toBeGreaterThan(0);
      // a perfectly uniform router would give exactly coeff: the loss is near it
      expect(aux / 0.01).toBeGreaterThan(0.9);
      expect(aux / 0.01).toBeLessThan(1.5);
      expected += aux + z;
      expect(T).toBe(12);
      expect(E).toBe(4);
    }
    out.mean().backward();
    plain.mean().backward();
    const withAux = grads(model);
    const without = grads(base);
    // the router gradient changes by the aux terms; the last layer's experts do not (the losses
    // reach only layers before their own router)
    const router = 'decoder.layers.0.mlp.router.weight';
    expect(
      relMaxError(withAux.get(router) as Float32Array, without.get(router) as Float32Array),
    ).toBeGreaterThan(1e-3);
    const expert = 'decoder.layers.3.mlp.experts.local_experts.0.linear_fc2.weight';
    expect(
      relMaxError(withAux.get(expert) as Float32Array, without.get(expert) as Float32Array),
    ).toBeLessThan(1e-6);
    expect(expected).toBeGreaterThan(0);
  });

  it("computes Megatron's switch aux loss and z-loss from the router's own scores", () => {
    const moe = routerConfig('softmax', false);
    const T = 5;
    const h = 3;
    const router = new TopKRouter(
      moe,
      h,
      { dtype: 'float32', generator: new Generator(1), performInitialization: true },
      {
        auxLossCoeff: 0.01,
        zLossCoeff: 0.001,
      },
    );
    const xs = Float32Array.from({ length: T * h }, (_, i) => Math.sin(i * 1.7) * 3);
    const r = router.forward(fromTypedArray(xs, [T, h]));
    const w = router.weight.toTypedArray() as Float32Array;
    let aux = 0;
    let z = 0;
    const perExpert = new Float64Array(4);
    const counts = new Float64Array(4);
    for (let t = 0; t < T; t++) {
      const logits = [0, 1, 2, 3].map(
        (e) => xs[t * h] * w[e * h] + xs[t * h + 1] * w[e * h + 1] + xs[t * h + 2] * w[e * h + 2],
      );
      const m = Math.max(...logits);
      const ex = logits.map((l) => Math.exp(l - m));
      const sum = ex.reduce((a, b) => a + b, 0);
      const top = [0, 1, 2, 3].sort((a, b) => logits[b] - logits[a]).slice(0, 2);
      for (const e of top) counts[e]++;
      for (let e = 0; e < 4; e++) perExpert[e] += ex[e] / sum;
      z += (m + Math.log(sum)) ** 2;
      // normalised top-k weights
      const p = r.probs.toTypedArray() as Float32Array;
      expect(p[t * 2] + p[t * 2 + 1]).toBeCloseTo(1, 6);
      expect(Array.from(r.indices.subarray(t * 2, t * 2 + 2))).toEqual(top);
    }
    for (let e = 0; e < 4; e++) aux += perExpert[e] * counts[e];
    aux *= (4 * 0.01) / (2 * T * T);
    z = (z / T) * 0.001;
    expect(Array.from(r.tokensPerExpert)).toEqual(Array.from(counts));
    expect((r.auxLoss as Tensor).item()).toBeCloseTo(aux, 7);
    expect((r.zLoss as Tensor).item()).toBeCloseTo(z, 7);
    // the pairs the dispatcher takes: by expert, then token, as Megatron's permute orders them
    const pairs = Array.from(r.routingMap.token, (t, p) => [t, r.routingMap.slot[p]]);
    expect(Array.from(r.routingMap.counts)).toEqual(Array.from(counts));
    let p = 0;
    for (let e = 0; e < 4; e++) {
      const mine = pairs.slice(p, p + counts[e]);
      p += counts[e];
      expect(mine.map(([t]) => t)).toEqual(mine.map(([t]) => t).sort((a, b) => a - b));
      for (const [t, slot] of mine) expect([t, r.indices[slot]]).toEqual([Math.floor(slot / 2), e]);
    }
    // read lazily from the device, before backward frees the forward's tensors (not after: with
    // the MoE layers recomputed, lastRouting is then the recomputation's, freed by its scope)
    const { model } = loadModel(fixtureCheckpoint('mixtral'), {
      recompute: { granularity: 'selective', modules: ['moe'] },
    });
    disposeLater.push(model);
    const loss = (model.forward(ids, { labels }).loss as Tensor).mean();
    const [[, first], [, second]] = model.moeLayers();
    expect(first.lastRouting?.indices.length).toBe(24);
    loss.backward();
    expect(() => second.lastRouting?.indices).toThrow(
      "routing.indices: the router's device tensors were freed with the forward's graph (by backward or a tidy scope); read it before backward, inside the scope",
    );
  });

  describe("Megatron's sequence-wise aux loss (seq_aux_loss)", () => {
    // 3 positions × 2 samples, sequence-major as a MoE layer flattens [s, b, h]: token t is
    // position floor(t / 2) of sample t % 2
    const S = 3;
    const B = 2;
    const T = S * B;
    const h = 3;
    const xs = Float32Array.from({ length: T * h }, (_, i) => Math.sin(i * 1.3) * 2);
    const make = (scoreFunction: 'softmax' | 'sigmoid', bias: boolean, type: 'aux_loss' | 'seq_aux_loss') => {
      const r = new TopKRouter(
        routerConfig(scoreFunction, bias),
        h,
        { dtype: 'float32', generator: new Generator(3), performInitialization: true },
        { auxLossCoeff: 0.01, zLossCoeff: 0, loadBalancingType: type },
      );
      disposeLater.push(r);
      // a bias that moves the routing: expert 3 wins every token's selection
      if (bias) r.expertBias?.copy_(fromTypedArray(Float32Array.from([0, 0, 0, 10]), [4]));
      return r;
    };
    /** The loss in float64 from the router's weight: per sample, E/(S·k)·Σ_e c_be·P_be, averaged. */
    const reference = (router: TopKRouter, scoreFunction: 'softmax' | 'sigmoid', perCall = false) => {
      const w = router.weight.toTypedArray() as Float32Array;
      const c = new Float64Array(B * 4);
      const P = new Float64Array(B * 4);
      for (let t = 0; t < T; t++) {
        const b = perCall ? 0 : t % B;
        const logits = [0, 1, 2, 3].map((e) => {
          let acc = 0;
          for (let j = 0; j < h; j++) acc += xs[t * h + j] * w[e * h + j];
          return acc;
        });
        let sc: number[];
        if (scoreFunction === 'softmax') {
          const m = Math.max(...logits);
          const ex = logits.map((l) => Math.exp(l - m));
          const sum = ex.reduce((a, v) => a + v, 0);
          sc = ex.map((v) => v / sum);
        } else {
          const sg = logits.map((l) => 1 / (1 + Math.exp(-l)));
          const sum = sg.reduce((a, v) => a + v, 0);
          sc = sg.map((v) => v / sum);
        }
        // the top-2 of the unbiased scores, whatever the bias chose
        for (const e of [0, 1, 2, 3].sort((a, b2) => sc[b2] - sc[a] || a - b2).slice(0, 2)) c[b * 4 + e]++;
        for (let e = 0; e < 4; e++) P[b * 4 + e] += sc[e];
      }
      const samples = perCall ? 1 : B;
      const len = perCall ? T : S;
      let loss = 0;
      for (let i = 0; i < samples * 4; i++) loss += ((c[i] * 4) / (len * 2)) * (P[i] / len);
      return (loss / samples) * 0.01;
    };

    it.each([
      ['softmax', false],
      ['sigmoid', false],
      ['sigmoid, an expert bias that moves the routing', true],
    ] as const)('%s: the per-sample formula, from the unbiased top-k', (name, bias) => {
      const fn = name.startsWith('softmax') ? 'softmax' : 'sigmoid';
      const router = make(fn, bias, 'seq_aux_loss');
      const r = router.forward(fromTypedArray(xs, [T, h]), B);
      const got = (r.auxLoss as Tensor).item();
      expect(got).toBeCloseTo(reference(router, fn), 8);
      // per sample, not over the call: the plain aux loss of the same tokens differs
      expect(Math.abs(got - reference(router, fn, true))).toBeGreaterThan(1e-6);
      if (bias) {
        // the bias sent every token to expert 3; the loss counted the scores' own top-2
        expect(r.tokensPerExpert[3]).toBe(T);
      }
    });

    it('with an expert bias the switch aux loss counts the unbiased top-k too', () => {
      const router = make('sigmoid', true, 'aux_loss');
      const r = router.forward(fromTypedArray(xs, [T, h]), B);
      expect(r.tokensPerExpert[3]).toBe(T);
      expect((r.auxLoss as Tensor).item()).toBeCloseTo(reference(router, 'sigmoid', true), 8);
    });

    it("its gradient is the loss's finite difference", () => {
      const router = make('softmax', false, 'seq_aux_loss');
      const x = fromTypedArray(xs, [T, h]);
      const loss = () => (router.forward(x, B).auxLoss as Tensor).item();
      (router.forward(x, B).auxLoss as Tensor).backward();
      const grad = Float64Array.from(router.weight.grad?.toTypedArray() as Float32Array);
      const w = router.weight.toTypedArray() as Float32Array;
      const eps = 1e-3;
      let worst = 0;
      for (let i = 0; i < w.length; i++) {
        const at = (d: number) => {
          const v = Float32Array.from(w);
          v[i] += d;
          noGrad(() => router.weight.copy_(fromTypedArray(v, router.weight.shape)));
          return loss();
        };
        const fd = (at(eps) - at(-eps)) / (2 * eps);
        noGrad(() => router.weight.copy_(fromTypedArray(w, router.weight.shape)));
        worst = Math.max(worst, Math.abs(fd - grad[i]));
      }
      const scale = Math.max(...grad.map(Math.abs));
      expect(scale).toBeGreaterThan(1e-5);
      expect(worst / scale).toBeLessThan(2e-2);
    });

    it("'none' adds no aux loss; a batch size that does not divide the tokens and an unknown type are refused", () => {
      const none = make('softmax', false, 'aux_loss');
      const off = new TopKRouter(
        routerConfig('softmax', false),
        h,
        { dtype: 'float32', generator: new Generator(3), performInitialization: true },
        { auxLossCoeff: 0.01, zLossCoeff: 0, loadBalancingType: 'none' },
      );
      disposeLater.push(off);
      expect(off.forward(fromTypedArray(xs, [T, h]), B).auxLoss).toBeNull();
      expect(() => none.forward(fromTypedArray(xs, [T, h]), 4)).toThrow(
        'TopKRouter.forward: batchSize 4 must be a positive integer dividing the 6 tokens',
      );
      expect(
        () =>
          new GPTModel(loadModel(fixtureCheckpoint('mixtral')).model.config, {
            moeRouterLoadBalancingType: 'sinkhorn' as 'none',
          }),
      ).toThrow(
        /moeRouterLoadBalancingType "sinkhorn" is not implemented; use 'aux_loss', 'seq_aux_loss' or 'none'/,
      );
    });
  });

  it('routes a chunk of no tokens: empty routing, zero balancing losses with gradients', () => {
    const moe = routerConfig('sigmoid', true);
    const router = new TopKRouter(
      moe,
      3,
      { dtype: 'float32', generator: new Generator(1), performInitialization: true },
      { auxLossCoeff: 0.01, zLossCoeff: 0.001 },
    );
    const r = router.forward(fromTypedArray(new Float32Array(0), [0, 3]));
    expect(r.probs.shape).toEqual([0, 2]);
    expect(Array.from(r.indices)).toEqual([]);
    expect(Array.from(r.routingMap.counts)).toEqual([0, 0, 0, 0]);
    const aux = r.auxLoss as Tensor;
    const z = r.zLoss as Tensor;
    expect([aux.item(), z.item()]).toEqual([0, 0]);
    aux.add(z).backward();
    expect(Array.from(router.weight.grad?.toTypedArray() as Float32Array)).toEqual(new Array(12).fill(0));
  });

  it('the expert load adds up where the router runs (forwards with gradients only), is taken there, and goes with the model', () => {
    const before = memoryStats().liveStorages;
    const { model } = loadModel(fixtureCheckpoint('mixtral'));
    const k = model.config.moe?.routerTopk as number;
    const E = model.config.moe?.numExperts as number;
    const forward = () => tidy(() => void model.forward(ids, { labels }));
    forward();
    forward();
    tidy(() => void noGrad(() => model.forward(ids))); // evaluation: not counted
    const g = model.takeGlobalExpertLoadOnDevice();
    if (!g) throw new Error('no MoE layers');
    const rows = g.load.toTypedArray() as Float64Array;
    g.load.dispose();
    expect(g.layers).toEqual(model.moeLayers().map(([l]) => l));
    g.layers.forEach((_, i) => {
      // two forwards of 12 tokens, k experts each
      expect(rows.slice(i * E, (i + 1) * E).reduce((a, b) => a + b, 0)).toBe(2 * 12 * k);
    });
    // taken: the next take counts from zero, and the host's take gives the same as the device's
    forward();
    const host = model.takeExpertLoad();
    expect([...host.values()].map((c) => c.reduce((a, b) => a + b, 0))).toEqual(g.layers.map(() => 12 * k));
    // a load never taken goes with the model
    forward();
    model.dispose();
    expect(memoryStats().liveStorages).toBe(before);
  });

  it("an MTP block's MoE layer is listed after the decoder's: its load is taken and its bias updated", () => {
    const { model } = loadModel(fixtureCheckpoint('deepseek-v3'));
    disposeLater.push(model);
    const L = model.config.numLayers;
    const k = model.config.moe?.routerTopk as number;
    const layers = model.moeLayers().map(([l]) => l);
    expect(layers[layers.length - 1]).toBe(L); // the MTP block (depth 0) repeats the last layer's MoE
    expect(model.moeLayers().at(-1)?.[1]).toBe(model.mtp?.layers.get(0).transformerLayer.mlp);
    tidy(() => void model.forward(ids, { labels })); // with labels: the MTP block runs
    const load = model.takeGlobalExpertLoad();
    expect([...load.keys()]).toEqual(layers);
    // every MoE layer, the MTP block's too, routed the 12 tokens to k experts each
    for (const l of layers) expect((load.get(l) as Float64Array).reduce((a, b) => a + b, 0)).toBe(12 * k);
    const bias = model.moeLayers().at(-1)?.[1].router.expertBias as Tensor;
    const before = Array.from(bias.toTypedArray() as Float32Array);
    model.updateExpertBias(load, 1e-3);
    const mtpLoad = load.get(L) as Float64Array;
    const mean = (12 * k) / mtpLoad.length;
    const after = Array.from(bias.toTypedArray() as Float32Array);
    for (let e = 0; e < mtpLoad.length; e++) {
      expect(after[e] - before[e]).toBeCloseTo(1e-3 * Math.sign(mean - mtpLoad[e]), 7);
    }
  });

  it('the expert bias moves toward under-loaded experts by the update rate', () => {
    const { model } = loadModel(fixtureCheckpoint('deepseek-v3'));
    disposeLater.push(model);
    const router = model.moeLayers()[0][1].router;
    const before = Array.from((router.expertBias as Tensor).toTypedArray() as Float32Array);
    model.forward(ids);
    const load = model.takeExpertLoad().get(model.moeLayers()[0][0]) as Float64Array;
    expect(load.reduce((a, b) => a + b, 0)).toBe(12 * 2);
    router.updateExpertBias(load, 1e-3);
    const after = Array.from((router.expertBias as Tensor).toTypedArray() as Float32Array);
    const mean = load.reduce((a, b) => a + b, 0) / load.length;
    for (let e = 0; e < load.length; e++) {
      expect(after[e] - before[e]).toBeCloseTo(1e-3 * Math.sign(mean - load[e]), 7);
    }
  });
});

describe.each(['qwen3', 'deepseek-v3'])('%s recompute', (id) => {
  it('full and selective recompute give the same loss and gradients', () => {
    const ref = loadModel(fixtureCheckpoint(id)).model;
    const full = loadModel(fixtureCheckpoint(id), { recompute: { granularity: 'full' } }).model;
    const sel = loadModel(fixtureCheckpoint(id), {
      recompute: { granularity: 'selective', modules: ['core_attn', 'mla_up_proj', 'moe', 'mlp'] },
    }).model;
    disposeLater.push(ref, full, sel);
    const losses = [ref, full, sel].map((m) => {
      const out = m.forward(ids, { labels });
      const l = (out.loss as Tensor).mean();
      const total = out.mtpLosses.reduce((a, t) => a.add(t.mul(0.1)), l);
      total.backward();
      return total.item();
    });
    expect(losses[1]).toBeCloseTo(losses[0], 6);
    expect(losses[2]).toBeCloseTo(losses[0], 6);
    const g0 = grads(ref);
    for (const m of [full, sel]) {
      for (const [n, g] of grads(m)) expect(relMaxError(g, g0.get(n) as Float32Array), n).toBeLessThan(1e-5);
    }
  });
});

/**
 * One forward and backward of the qwen3 fixture under `recompute`, counting how many times each
 * decoder layer ran the method `pick(layer)` names (its body, or its MLP's forward).
 */
function countedRun(
  recompute: NonNullable<Parameters<typeof loadModel>[1]>['recompute'],
  pick: (layer: TransformerLayer) => [object, string],
  seen: number[] = [],
) {
  const { model } = loadModel(fixtureCheckpoint('qwen3'), { recompute });
  disposeLater.push(model);
  const counts = [...model.decoder.layers].map((layer) => {
    const counter = { n: 0 };
    const [owner, key] = pick(layer);
    const o = owner as Record<string, (...a: unknown[]) => unknown>;
    const original = o[key].bind(owner);
    o[key] = (...a: unknown[]) => {
      counter.n++;
      seen.push(layer.layerNumber); // the order of the calls
      return original(...a);
    };
    return counter;
  });
  const loss = (model.forward(ids, { labels }).loss as Tensor).mean();
  loss.backward();
  const value = loss.item();
  loss.dispose();
  return { counts: counts.map((c) => c.n), value, grads: grads(model) };
}

/** Recomputing changes nothing computed: the loss and every gradient of `ref`. */
function expectSameRun(r: ReturnType<typeof countedRun>, ref: ReturnType<typeof countedRun>) {
  expect(r.value).toBeCloseTo(ref.value, 6);
  for (const [n, g] of r.grads)
    expect(relMaxError(g, ref.grads.get(n) as Float32Array), n).toBeLessThan(1e-5);
}

describe("Megatron's recompute methods", () => {
  it("'block' recomputes the first numLayers layers of the stage, 'uniform' every layer, in the backward pass", () => {
    // how many times each decoder layer ran its body in one forward and backward
    const runs = (recompute: Parameters<typeof countedRun>[0]) => countedRun(recompute, (l) => [l, 'body']);
    const none = runs(null);
    const block = runs({ granularity: 'full', method: 'block', numLayers: 1 });
    const uniform = runs({ granularity: 'full', method: 'uniform', numLayers: 1 });
    expect(none.counts).toEqual([1, 1, 1, 1]);
    expect(block.counts).toEqual([2, 1, 1, 1]);
    expect(uniform.counts).toEqual([2, 2, 2, 2]);
    expect(runs({ granularity: 'full', method: 'block', numLayers: 3 }).counts).toEqual([2, 2, 2, 1]);
    for (const r of [block, uniform]) expectSameRun(r, none);
  });

  it("'uniform' with numLayers > 1 checkpoints groups of layers: the backward recomputes each group's layers in turn", () => {
    // the order in which the decoder layers run their bodies over one forward and backward
    const order = (recompute: Parameters<typeof countedRun>[0]) => {
      const seen: number[] = [];
      return { ...countedRun(recompute, (l) => [l, 'body'], seen), seen };
    };
    const none = order(null);
    expect(none.seen).toEqual([0, 1, 2, 3]);
    // one layer a checkpoint: recomputed last to first
    expect(order({ granularity: 'full', method: 'uniform', numLayers: 1 }).seen).toEqual([
      0, 1, 2, 3, 3, 2, 1, 0,
    ]);
    // groups [0, 1], [2, 3]: each recomputed front to back, the last group first
    const two = order({ granularity: 'full', method: 'uniform', numLayers: 2 });
    expect(two.seen).toEqual([0, 1, 2, 3, 2, 3, 0, 1]);
    // groups [0, 1, 2], [3]
    const three = order({ granularity: 'full', method: 'uniform', numLayers: 3 });
    expect(three.seen).toEqual([0, 1, 2, 3, 3, 0, 1, 2]);
    for (const r of [two, three]) expectSameRun(r, none);
    expect(() =>
      loadModel(fixtureCheckpoint('qwen3'), {
        recompute: { granularity: 'full', method: 'uniform', numLayers: 0 },
      }),
    ).toThrow(/recompute.numLayers of the 'uniform' method must be a positive integer, got 0/);
  });
});

describe('--recompute-modules mlp', () => {
  it("recomputes each dense layer's MLP in the backward pass, with the same loss and gradients", () => {
    const runs = (modules: ('core_attn' | 'mlp')[]) =>
      countedRun({ granularity: 'selective', modules }, (l) => [l.mlp, 'forward']);
    const plain = runs(['core_attn']);
    const mlp = runs(['mlp']);
    expect(plain.counts).toEqual([1, 1, 1, 1]);
    expect(mlp.counts).toEqual([2, 2, 2, 2]);
    expectSameRun(mlp, plain);
  });
});

describe('multi-token prediction targets', () => {
  const row = (xs: number[]) => fromTypedArray(BigInt64Array.from(xs, BigInt), [1, xs.length]);
  const a = [1, 5, 9, 33, 100, 7];
  const b = [8, 9, 4, 77, 12];
  const next = (xs: number[], last: number) => [...xs.slice(1), last];
  const mtpOf = (m: GPTModel, x: number[], y: number[], o: { cu?: number[]; mask?: number[] } = {}) =>
    tidy(() =>
      m
        .forward(row(x), {
          labels: row(y),
          ...(o.cu ? { cuSeqlens: fromTypedArray(Int32Array.from(o.cu), [o.cu.length]) } : {}),
          ...(o.mask ? { lossMask: fromTypedArray(Float32Array.from(o.mask), [1, o.mask.length]) } : {}),
        })
        .mtpLosses[0].item(),
    );

  it('a packed row shifts each sample on its own: its MTP loss is the token mean of the samples run apart', () => {
    const { model } = loadModel(fixtureCheckpoint('deepseek-v3'));
    disposeLater.push(model);
    const la = mtpOf(model, a, next(a, 2));
    const lb = mtpOf(model, b, next(b, 3));
    const packed = mtpOf(model, [...a, ...b], [...next(a, 2), ...next(b, 3)], { cu: [0, 6, 11] });
    // depth 1 counts len − 1 tokens of each sample
    expect(packed).toBeCloseTo((la * 5 + lb * 4) / 9, 5);
    // shifting across the boundary (one unpacked sequence) gives another value
    const unpacked = mtpOf(model, [...a, ...b], [...next(a, 2), ...next(b, 3)]);
    expect(Math.abs(unpacked - packed)).toBeGreaterThan(1e-4);
  });

  it('cuSeqlens given as numbers: the same packed forward, checked on the host, its device copy freed', () => {
    const { model } = loadModel(fixtureCheckpoint('deepseek-v3'));
    disposeLater.push(model);
    const x = [...a, ...b];
    const y = [...next(a, 2), ...next(b, 3)];
    const withNumbers = (cu: number[]) =>
      tidy(() => {
        const out = model.forward(row(x), { labels: row(y), cuSeqlens: cu });
        return [(out.loss as Tensor).sum().item(), out.mtpLosses[0].item()];
      });
    const [loss, mtp] = tidy(() => {
      const out = model.forward(row(x), {
        labels: row(y),
        cuSeqlens: fromTypedArray(Int32Array.from([0, 6, 11]), [3]),
      });
      return [(out.loss as Tensor).sum().item(), out.mtpLosses[0].item()];
    });
    expect(withNumbers([0, 6, 11])).toEqual([loss, mtp]);
    const live = memoryStats().liveBytes;
    withNumbers([0, 6, 11]);
    expect(memoryStats().liveBytes).toBe(live);
    const message = (cu: number[]) => {
      try {
        withNumbers(cu);
      } catch (e) {
        return (e as Error).message;
      }
      return 'no error';
    };
    expect(message([0, 6])).toBe("cuSeqlens must end at the row's 11 tokens, not 6 (got [0, 6])");
    expect(message([1, 11])).toBe('cuSeqlens must start at 0 and hold at least 2 entries (got [1, 11])');
    expect(message([0, 7, 6, 11])).toBe(
      'cuSeqlens must be non-decreasing integers: 7 then 6 at index 2 (got [0, 7, 6, 11])',
    );
    expect(message([0, 5.5, 11])).toContain('must be non-decreasing integers: 0 then 5.5 at index 1');
    expect(memoryStats().liveBytes).toBe(live);
  });

  it("the loss mask is shifted with the labels, as Megatron's MTP rolls loss_mask", () => {
    const { model } = loadModel(fixtureCheckpoint('deepseek-v3'));
    disposeLater.push(model);
    const y = next(a, 2);
    const ones = mtpOf(model, a, y, { mask: [1, 1, 1, 1, 1, 1] });
    expect(ones).toBeCloseTo(mtpOf(model, a, y), 6);
    // mask e_j counts only the MTP position j − 1 (its target is the main label at j)
    const perToken = [1, 2, 3, 4, 5].map((j) =>
      mtpOf(model, a, y, { mask: a.map((_, i) => (i === j ? 1 : 0)) }),
    );
    expect(perToken.reduce((s, v) => s + v, 0) / 5).toBeCloseTo(ones, 5);
    // a prompt masked out (SFT): the mean of the answer's positions only
    const sft = mtpOf(model, a, y, { mask: [0, 0, 0, 1, 1, 1] });
    expect(sft).toBeCloseTo((perToken[2] + perToken[3] + perToken[4]) / 3, 5);
    // the mask at position 0 never counts at depth 1 (nothing shifts into it)
    expect(mtpOf(model, a, y, { mask: [1, 0, 0, 0, 0, 0] })).toBe(0);
  });
});

describe('context parallelism by all-to-all', () => {
  it("is refused at construction when cp does not divide each TP rank's query and key/value heads", () => {
    // only its size is read before a forward: a group of 4 over llama's 8 query and 2 key/value heads
    const cp4 = { size: 4, rank: 0 } as unknown as ProcessGroup;
    const { model: loaded, config } = loadModel(fixtureCheckpoint('llama'));
    loaded.dispose();
    const longrope = loadModel(fixtureCheckpoint('phi3-longrope'));
    longrope.model.dispose();
    const before = memoryStats().liveBytes;
    expect(() => new GPTModel(config, { cpGroup: cp4, cpCommType: 'a2a' })).toThrow(
      "context parallelism by all-to-all (cpCommType a2a) splits each tensor-parallel rank's 8 query and 2 key/value heads over cp=4, which does not divide them; use cpCommType p2p",
    );
    expect(() => new GPTModel(longrope.config, { cpGroup: cp4 })).toThrow(
      "longrope (Phi-3's 128k RoPE) with context parallelism (cp=4) is not supported; use cp=1",
    );
    // refused before any weight is made
    expect(memoryStats().liveBytes).toBe(before);
    // the ring has no such need
    const ring = new GPTModel(config, { cpGroup: cp4 });
    expect(ring.cpCommType).toBe('p2p');
    ring.dispose();
  });
});

describe('training', () => {
  it('a fresh model initialises reproducibly and its memory is flat from step to step', () => {
    const { model: loaded, config } = loadModel(fixtureCheckpoint('qwen2-moe'));
    loaded.dispose();
    const a = new GPTModel(config, { generator: new Generator(3) });
    const b = new GPTModel(config, { generator: new Generator(3) });
    disposeLater.push(a, b);
    const weightOf = (m: GPTModel) =>
      Array.from(m.decoder.layers.get(1).selfAttention.linearProj.weight.toTypedArray() as Float32Array);
    expect(weightOf(a)).toEqual(weightOf(b));
    const opt = new AdamW(a.parameters(), { lr: 1e-3 });
    const live: number[] = [];
    const losses: number[] = [];
    for (let step = 0; step < 5; step++) {
      const loss = tidy(() => {
        const l = (a.forward(ids, { labels }).loss as Tensor).mean();
        l.backward();
        return l.item();
      });
      opt.step();
      a.zeroGrad();
      losses.push(loss);
      live.push(memoryStats().liveBytes);
    }
    expect(losses[4]).toBeLessThan(losses[0]);
    for (let s = 2; s < 5; s++) expect(live[s], `step ${s}`).toBe(live[1]);
    opt.dispose?.();
  });
});

describe('loss at a temperature', () => {
  it('is −log softmax(logits / T) of the label, with its gradient', () => {
    const T = 0.6;
    const a = loadModel(fixtureCheckpoint('llama')).model;
    const b = loadModel(fixtureCheckpoint('llama')).model;
    disposeLater.push(a, b);
    const got = tidy(() => {
      const l = a.forward(ids, { labels, temperature: T }).loss as Tensor;
      l.sum().backward();
      return Array.from(l.toTypedArray() as Float32Array);
    });
    const want = tidy(() => {
      const logits = b.forward(ids).logits as Tensor; // [2, 6, V]
      const logp = logits.div(T).logSoftmax(-1);
      const lab = labels.toTypedArray() as BigInt64Array;
      const picked: Tensor[] = [];
      for (let r = 0; r < 2; r++)
        for (let t = 0; t < 6; t++)
          picked.push(
            logp
              .select(0, r)
              .select(0, t)
              .select(0, Number(lab[r * 6 + t]))
              .neg(),
          );
      picked.reduce((x, y) => x.add(y)).backward();
      return picked.map((p) => p.item());
    });
    for (let i = 0; i < want.length; i++) expect(got[i]).toBeCloseTo(want[i], 5);
    const ga = grads(a);
    for (const [name, g] of grads(b))
      expect(relMaxError(ga.get(name) as Float32Array, g), name).toBeLessThan(1e-4);
    // T = 1 is the plain loss; T changes it
    const plain = tidy(() =>
      Array.from((a.forward(ids, { labels }).loss as Tensor).toTypedArray() as Float32Array),
    );
    expect(plain[0]).not.toBeCloseTo(got[0], 3);
    expect(() => a.forward(ids, { labels, temperature: 0 })).toThrow(/temperature must be > 0, got 0/);
  });
});
