import { describe, expect, it } from 'vitest';
import {
  AdamW,
  ConstantGradScaler,
  type DType,
  DynamicGradScaler,
  Generator,
  getTotalNorm,
  Linear,
  MixedPrecisionOptimizer,
  type MixedPrecisionStateDict,
  Module,
  memoryStats,
  OptimizerParamScheduler,
  randn,
  SGD,
  type Tensor,
  TensorError,
  tensor,
  tidy,
  zeros,
} from '../src/index.js';

class Mlp extends Module {
  readonly fc1: Linear;
  readonly fc2: Linear;
  constructor(seed: number, dtype: DType = 'float32') {
    super();
    const gen = new Generator(seed);
    this.fc1 = this.registerModule('fc1', new Linear(8, 32, { generator: gen, dtype }));
    this.fc2 = this.registerModule('fc2', new Linear(32, 1, { generator: gen, dtype }));
  }
  forward(x: Tensor): Tensor {
    return tidy(() => this.fc2.forward(this.fc1.forward(x).tanh()));
  }
}

function data(seed = 0) {
  const gen = new Generator(seed);
  const x = randn([64, 8], { generator: gen });
  const w = randn([8, 1], { generator: gen });
  const y = tidy(() => x.matmul(w).tanh());
  w.dispose();
  return { x, y };
}

/** MSE computed in fp32 whatever the model dtype (as Megatron computes the loss in fp32). */
function lossOf(model: Mlp, x: Tensor, y: Tensor): Tensor {
  return tidy(() => {
    const xin = x.to(model.fc1.weight.dtype);
    return model.forward(xin).float().sub(y).square().mean();
  });
}

const f32vals = (t: Tensor): number[] => Array.from(t.toTypedArray() as Float32Array);

describe('MixedPrecisionOptimizer (bf16, fp32 masters)', () => {
  it('tracks the fp32 run closely', () => {
    const { x, y } = data();
    const ref = new Mlp(1);
    const refOpt = new AdamW(ref.parameters(), { lr: 1e-2 });
    const model = new Mlp(1, 'bfloat16');
    const mp = new MixedPrecisionOptimizer({ lr: 1e-2 }, model.parameters());
    expect(model.parameters().every((p) => p.mainGrad?.dtype === 'float32')).toBe(true);
    expect(mp.masterParams.every((m) => m.dtype === 'float32')).toBe(true);
    const refLosses: number[] = [];
    const losses: number[] = [];
    for (let step = 0; step < 60; step++) {
      tidy(() => {
        const l = lossOf(ref, x, y);
        l.backward();
        refOpt.step();
        refOpt.zeroGrad();
        refLosses.push(l.item());
        const m = lossOf(model, x, y);
        m.backward();
        const r = mp.step();
        expect(r.skipped).toBe(false);
        expect(r.lossScale).toBe(1);
        losses.push(m.item());
      });
    }
    expect(losses[59]).toBeLessThan(losses[0] * 0.3);
    // the bf16 model follows the fp32 trajectory within bf16 forward/backward noise
    losses.forEach((l, i) => {
      expect(Math.abs(l - refLosses[i]), `step ${i}`).toBeLessThan(0.03 * refLosses[i]);
    });
    ref.parameters().forEach((p, i) => {
      const a = f32vals(p);
      const b = f32vals(mp.masterParams[i]);
      const err = Math.max(...a.map((v, k) => Math.abs(v - b[k])));
      expect(err).toBeLessThan(0.01);
    });
    // the model's bf16 weights are the masters rounded
    const rounded = mp.masterParams[0].to('bfloat16');
    expect(model.fc1.weight.toArray()).toEqual(rounded.toArray());
    rounded.dispose();
    for (const t of [x, y]) t.dispose();
    mp.dispose();
    refOpt.dispose();
    ref.dispose();
    model.dispose();
  });

  it('accumulates fp32 main grads across micro-batches', () => {
    const { x, y } = data(2);
    const model = new Mlp(3, 'bfloat16');
    const mp = new MixedPrecisionOptimizer((params) => new SGD(params, { lr: 0 }), model.parameters());
    const w = model.fc1.weight;
    tidy(() => lossOf(model, x.narrow(0, 0, 32), y.narrow(0, 0, 32)).backward());
    const first = f32vals(w.mainGrad!);
    tidy(() => lossOf(model, x.narrow(0, 32, 32), y.narrow(0, 32, 32)).backward());
    const both = f32vals(w.mainGrad!);
    expect(w.grad).toBeNull();
    // the second micro-batch alone, accumulated the same way (into a zero fp32 mainGrad: where a
    // device fuses the weight-gradient GEMM with the accumulation, that gradient is never bf16)
    const second = tidy(() => {
      const m2 = new Mlp(3, 'bfloat16');
      const w2 = m2.fc1.weight;
      w2.mainGrad = zeros(w2.shape, { dtype: 'float32', device: w2.device });
      lossOf(m2, x.narrow(0, 32, 32), y.narrow(0, 32, 32)).backward();
      const g = f32vals(w2.mainGrad);
      w2.mainGrad.dispose();
      w2.mainGrad = null;
      m2.dispose();
      return g;
    });
    both.forEach((v, i) => {
      expect(v).toBeCloseTo(first[i] + second[i], 6);
    });
    mp.step();
    expect(f32vals(w.mainGrad!).every((v) => v === 0)).toBe(true);
    for (const t of [x, y]) t.dispose();
    mp.dispose();
    expect(w.mainGrad).toBeNull();
    model.dispose();
  });

  it('clips the main grads and reports the norm', () => {
    const { x, y } = data(4);
    const a = new Mlp(5, 'bfloat16');
    const b = new Mlp(5, 'bfloat16');
    const ma = new MixedPrecisionOptimizer((p) => new SGD(p, { lr: 0.1 }), a.parameters(), {
      clipGrad: 0.01,
    });
    const mb = new MixedPrecisionOptimizer((p) => new SGD(p, { lr: 0.1 }), b.parameters());
    tidy(() => lossOf(a, x, y).backward());
    tidy(() => lossOf(b, x, y).backward());
    const norm = getTotalNorm(b.parameters().map((p) => p.mainGrad!));
    const before = f32vals(ma.masterParams[0]);
    const ra = ma.step();
    const rb = mb.step();
    expect(rb.gradNorm).toBeNull();
    expect(ra.gradNorm).toBeCloseTo(norm, 6);
    expect(norm).toBeGreaterThan(0.01);
    // the clipped update is the plain one scaled by 0.01 / norm
    const after = f32vals(ma.masterParams[0]);
    const plain = f32vals(mb.masterParams[0]);
    const scale = 0.01 / (norm + 1e-6);
    after.forEach((v, i) => {
      expect(v - before[i]).toBeCloseTo((plain[i] - before[i]) * scale, 6);
    });
    for (const t of [x, y]) t.dispose();
    for (const o of [ma, mb]) o.dispose();
    for (const m of [a, b]) m.dispose();
  });

  it('skips steps with non-finite gradients unless told not to', () => {
    const p = tensor([1, 2], { dtype: 'bfloat16' }).requiresGrad_(true);
    const q = tensor([1, 2], { dtype: 'bfloat16' }).requiresGrad_(true);
    const mp = new MixedPrecisionOptimizer((ps) => new SGD(ps, { lr: 1 }), [p]);
    const loose = new MixedPrecisionOptimizer((ps) => new SGD(ps, { lr: 1 }), [q], { skipNonFinite: false });
    for (const t of [p, q])
      tidy(() =>
        t
          .mul(tensor([Number.NaN, 1], { dtype: 'bfloat16' }))
          .sum()
          .backward(),
      );
    expect(mp.step()).toEqual({ skipped: true, gradNorm: null, lossScale: 1 });
    expect(p.toArray()).toEqual([1, 2]);
    expect(f32vals(p.mainGrad!)).toEqual([0, 0]);
    expect(loose.step().skipped).toBe(false);
    expect(Number.isNaN(f32vals(q)[0])).toBe(true);
    mp.dispose();
    loose.dispose();
    p.dispose();
    q.dispose();
  });

  it('restores a checkpoint bit for bit', () => {
    const { x, y } = data(6);
    const make = (seed: number) => {
      const model = new Mlp(seed, 'bfloat16');
      const mp = new MixedPrecisionOptimizer({ lr: 5e-3 }, model.parameters(), {
        lossScaler: new DynamicGradScaler({ initialScale: 1024, growthInterval: 2 }),
        clipGrad: 1,
      });
      return { model, mp };
    };
    const train = (r: { model: Mlp; mp: MixedPrecisionOptimizer }) =>
      tidy(() => {
        const l = lossOf(r.model, x, y);
        r.mp.scaleLoss(l).backward();
        return r.mp.step();
      });
    const a = make(7);
    for (let i = 0; i < 3; i++) train(a);
    expect(a.mp.lossScale).toBe(2048);
    const sd = a.mp.stateDict();
    const copy: MixedPrecisionStateDict = {
      optimizer: {
        paramGroups: JSON.parse(JSON.stringify(sd.optimizer.paramGroups)),
        state: Object.fromEntries(
          Object.entries(sd.optimizer.state).map(([k, s]) => [
            k,
            Object.fromEntries(
              Object.entries(s).map(([n, v]) => [n, typeof v === 'object' && v ? v.clone() : v]),
            ),
          ]),
        ),
      },
      gradScaler: JSON.parse(JSON.stringify(sd.gradScaler)),
      masters: sd.masters.map((m) => m.clone()),
    };
    const b = make(8);
    b.mp.loadStateDict(copy);
    expect(b.mp.lossScale).toBe(2048);
    expect(b.model.fc2.weight.toArray()).toEqual(a.model.fc2.weight.toArray());
    for (let i = 0; i < 3; i++) expect(train(b)).toEqual(train(a));
    a.mp.masterParams.forEach((m, i) => {
      expect(f32vals(b.mp.masterParams[i])).toEqual(f32vals(m));
    });
    for (const t of [x, y, ...copy.masters]) t.dispose();
    for (const s of Object.values(copy.optimizer.state))
      for (const v of Object.values(s)) if (typeof v === 'object' && v) v.dispose();
    for (const r of [a, b]) {
      r.mp.dispose();
      r.model.dispose();
    }
  });

  it('is driven by OptimizerParamScheduler through the inner groups', () => {
    const model = new Mlp(1, 'bfloat16');
    const mp = new MixedPrecisionOptimizer({ lr: 1 }, [
      { params: [model.fc1.weight, model.fc2.weight] },
      { params: [model.fc1.bias!, model.fc2.bias!], weightDecay: 0 },
    ]);
    const s = new OptimizerParamScheduler({
      optimizer: mp,
      maxLr: 1e-3,
      lrWarmupSteps: 10,
      lrDecaySteps: 100,
      lrDecayStyle: 'cosine',
    });
    s.step(5);
    expect(mp.optimizer.paramGroups.map((g) => g.lr)).toEqual([5e-4, 5e-4]);
    expect(mp.paramGroups[1].weightDecay).toBe(0);
    mp.dispose();
    model.dispose();
  });

  it('rejects parameters it cannot own', () => {
    const noGrad = zeros([2], { dtype: 'bfloat16' });
    const ints = tensor([1, 2]);
    const f64 = zeros([2], { dtype: 'float64' }).requiresGrad_(true);
    const p = zeros([2], { dtype: 'bfloat16' }).requiresGrad_(true);
    expect(() => new MixedPrecisionOptimizer({}, [noGrad])).toThrow(/requires grad/);
    expect(() => new MixedPrecisionOptimizer({}, [ints])).toThrow(TensorError);
    expect(() => new MixedPrecisionOptimizer({}, [f64])).toThrow(/bfloat16, float16 or float32/);
    expect(() => new MixedPrecisionOptimizer({}, [])).toThrow(/empty/);
    expect(() => new MixedPrecisionOptimizer({ lr: -1 }, [p])).toThrow(/learning rate/);
    expect(p.mainGrad).toBeNull();
    const mp = new MixedPrecisionOptimizer({}, [p]);
    expect(() => new MixedPrecisionOptimizer({}, [p])).toThrow(/already has a mainGrad/);
    mp.dispose();
    for (const t of [noGrad, ints, f64, p]) t.dispose();
  });

  it('keeps training memory flat and frees everything on dispose', () => {
    const before = memoryStats().liveBytes;
    const { x, y } = data(9);
    const model = new Mlp(2, 'bfloat16');
    const mp = new MixedPrecisionOptimizer({ lr: 1e-3 }, model.parameters(), {
      clipGrad: 1,
      lossScaler: new ConstantGradScaler(128),
    });
    let after3 = -1;
    for (let step = 1; step <= 15; step++) {
      tidy(() => {
        mp.scaleLoss(lossOf(model, x, y)).backward();
        mp.step();
      });
      if (step === 3) after3 = memoryStats().liveBytes;
    }
    expect(memoryStats().liveBytes).toBe(after3);
    mp.dispose();
    model.dispose();
    x.dispose();
    y.dispose();
    expect(memoryStats().liveBytes).toBe(before);
  });
});

describe('MixedPrecisionOptimizer (fp16, dynamic loss scale)', () => {
  it('backs off from a huge scale, skipping steps until the gradients are finite, then trains', () => {
    const { x, y } = data(10);
    const model = new Mlp(11, 'float16');
    const scaler = new DynamicGradScaler({ initialScale: 2 ** 32 });
    const mp = new MixedPrecisionOptimizer({ lr: 1e-2 }, model.parameters(), { lossScaler: scaler });
    const w0 = model.fc1.weight.toArray();
    const results: { skipped: boolean; lossScale: number }[] = [];
    const losses: number[] = [];
    for (let step = 0; step < 80; step++) {
      tidy(() => {
        const l = lossOf(model, x, y);
        mp.scaleLoss(l).backward();
        const r = mp.step();
        results.push({ skipped: r.skipped, lossScale: r.lossScale });
        if (!r.skipped) losses.push(l.item());
        if (r.skipped && losses.length === 0) expect(model.fc1.weight.toArray()).toEqual(w0);
      });
    }
    const firstTrained = results.findIndex((r) => !r.skipped);
    expect(firstTrained).toBeGreaterThan(10);
    // hysteresis 2: the first overflow only spends the budget, every later one halves the scale
    for (let k = 0; k < firstTrained; k++) {
      expect(results[k].skipped).toBe(true);
      expect(results[k].lossScale).toBe(k === 0 ? 2 ** 32 : 2 ** (32 - k));
    }
    // the first clean step ran at the scale left by the last backoff (fp16 overflows at ~2^16)
    const trainedScale = results[firstTrained].lossScale;
    expect(trainedScale).toBe(2 ** (33 - firstTrained));
    expect(trainedScale).toBeLessThanOrEqual(2 ** 16);
    expect(results.slice(firstTrained).filter((r) => r.skipped).length).toBeLessThanOrEqual(2);
    expect(losses[losses.length - 1]).toBeLessThan(losses[0] * 0.5);
    for (const t of [x, y]) t.dispose();
    mp.dispose();
    model.dispose();
  });

  it('ConstantGradScaler skips overflowing steps without changing the scale', () => {
    const p = zeros([2], { dtype: 'float16' }).requiresGrad_(true);
    const mp = new MixedPrecisionOptimizer((ps) => new SGD(ps, { lr: 1 }), [p], {
      lossScaler: new ConstantGradScaler(2 ** 20),
    });
    tidy(() => mp.scaleLoss(p.float().sum()).backward());
    expect(mp.step()).toEqual({ skipped: true, gradNorm: null, lossScale: 2 ** 20 });
    tidy(() => p.float().sum().backward());
    const r = mp.step();
    expect(r.skipped).toBe(false);
    // the gradient (1) was unscaled by 2^-20 before the update
    expect(p.toArray()).toEqual([-(2 ** -20), -(2 ** -20)]);
    mp.dispose();
    p.dispose();
  });
});

describe('DynamicGradScaler', () => {
  it("follows Megatron's update rule", () => {
    const s = new DynamicGradScaler({ initialScale: 1024, minScale: 256, growthInterval: 3, hysteresis: 2 });
    const seq: [boolean, number][] = [
      [true, 1024], // hysteresis 2 -> 1
      [true, 512], // -> 0: back off
      [false, 512],
      [true, 256], // hysteresis is not refilled by clean steps: back off again
      [true, 256], // floored at minScale
      [false, 256],
      [false, 256],
      [false, 512], // three clean steps: grow, refill hysteresis
      [true, 512], // hysteresis 2 -> 1
      [false, 512],
    ];
    for (const [found, scale] of seq) {
      s.update(found);
      expect(s.scale).toBe(scale);
    }
    expect(s.invScale).toBe(1 / 512);
    expect(s.stateDict()).toEqual({ scale: 512, growthTracker: 1, hysteresisTracker: 1 });
    const t = new DynamicGradScaler();
    expect(t.scale).toBe(2 ** 32);
    t.loadStateDict(s.stateDict());
    expect(t.stateDict()).toEqual(s.stateDict());
    expect(() => new DynamicGradScaler({ growthFactor: 1 })).toThrow(TensorError);
    expect(() => new DynamicGradScaler({ backoffFactor: 1 })).toThrow(TensorError);
    expect(() => new DynamicGradScaler({ initialScale: 1, minScale: 2 })).toThrow(TensorError);
    expect(() => new DynamicGradScaler({ hysteresis: 0 })).toThrow(TensorError);
    expect(() => new ConstantGradScaler(0)).toThrow(TensorError);
  });
});
