import { describe, expect, it, vi } from 'vitest';
import { registerReferenceBackend } from '../src/backend/reference.js';
import {
  AdamW,
  clipGradNorm,
  Generator,
  getBackend,
  getDefaultDevice,
  getTotalNorm,
  getTotalNormPowerSum,
  hasNativeKernel,
  type KernelName,
  type KernelTable,
  Linear,
  memoryStats,
  type Optimizer,
  type OptimizerStateDict,
  randn,
  SGD,
  Tensor,
  TensorError,
  tensor,
  tidy,
  zeros,
} from '../src/index.js';
import { expectClose, type FixtureCase, fromFixture, loadFixture } from './fixtures.js';

const cases = loadFixture('optim');
const TOL = { atol: 1e-7, rtol: 1e-6 };
const f32 = (v: number[]): Tensor => tensor(v, { dtype: 'float32' });
const vals = (t: Tensor): number[] => Array.from(t.toTypedArray() as Float32Array);

function optimizerFor(c: FixtureCase, params: Tensor[]): Optimizer {
  const a = c.args as Record<string, number | boolean | number[] | string>;
  if (a.optimizer === 'AdamW') {
    return new AdamW(params, {
      lr: a.lr as number,
      betas: a.betas as [number, number] | undefined,
      eps: a.eps as number | undefined,
      weightDecay: a.weight_decay as number,
    });
  }
  return new SGD(params, {
    lr: a.lr as number,
    momentum: a.momentum as number | undefined,
    dampening: a.dampening as number | undefined,
    nesterov: a.nesterov as boolean | undefined,
    weightDecay: a.weight_decay as number | undefined,
  });
}

const STATE_KEYS: Record<string, string> = {
  exp_avg: 'expAvg',
  exp_avg_sq: 'expAvgSq',
  momentum_buffer: 'momentumBuffer',
};

function setGrad(p: Tensor, g: Tensor): void {
  p.grad?.dispose();
  p.grad = g;
}

describe('optimizers match torch.optim', () => {
  for (const c of cases.filter((x) => !x.name.startsWith('clip'))) {
    it(c.name, () => {
      const params = [fromFixture(c.inputs.p0, true), fromFixture(c.inputs.p1, true)];
      const opt = optimizerFor(c, params);
      const lrs = c.args.lrs as number[] | undefined;
      for (let step = 0; step < (c.args.steps as number); step++) {
        if (lrs) opt.paramGroups[0].lr = lrs[step];
        params.forEach((p, i) => {
          setGrad(p, fromFixture(c.inputs[`g${i}_${step}`]));
        });
        opt.step();
        params.forEach((p, i) => {
          expectClose(p, c.outputs[`p${i}_${step}`], TOL, `${c.name} p${i} step ${step}`);
        });
      }
      for (const [key, expected] of Object.entries(c.outputs)) {
        const m = /^state(\d)_(.+)$/.exec(key);
        if (!m) continue;
        const st = opt.stateOf(params[Number(m[1])]) as Record<string, unknown>;
        expectClose(st[STATE_KEYS[m[2]]] as Tensor, expected, TOL, `${c.name} ${key}`);
      }
      if (c.args.optimizer === 'AdamW') expect(opt.stateOf(params[0])?.step).toBe(c.args.steps);
      opt.dispose();
      for (const p of params) p.dispose();
    });
  }
});

describe('clipGradNorm matches torch.nn.utils.clip_grad_norm_', () => {
  for (const c of cases.filter((x) => x.name.startsWith('clip'))) {
    it(c.name, () => {
      const params = [0, 1, 2].map((i) => {
        const g = fromFixture(c.inputs[`g${i}`]);
        const p = zeros(g.shape).requiresGrad_(true);
        p.grad = g;
        return p;
      });
      const normType = c.args.normType === 'inf' ? Number.POSITIVE_INFINITY : (c.args.normType as number);
      const total = clipGradNorm(params, c.args.maxNorm as number, normType);
      const expected = c.outputs.total.data[0] as number;
      expect(Math.abs(total - expected)).toBeLessThanOrEqual(1e-6 * Math.abs(expected));
      params.forEach((p, i) => {
        expectClose(p.grad!, c.outputs[`g${i}`], TOL, `${c.name} g${i}`);
      });
      for (const p of params) p.dispose();
    });
  }

  it('returns 0 without gradients and skips parameters that have none', () => {
    const a = zeros([3]).requiresGrad_(true);
    const b = zeros([2]).requiresGrad_(true);
    expect(clipGradNorm([a, b], 1)).toBe(0);
    b.grad = f32([3, 4]);
    expect(clipGradNorm([a, b], 1)).toBeCloseTo(5, 6);
    // 1 / (5 + 1e-6) per unit of norm
    expect(vals(b.grad)).toEqual([3, 4].map((v) => Math.fround(v * (1 / (5 + 1e-6)))));
    expect(clipGradNorm(b, 10)).toBeCloseTo(1, 5);
    a.dispose();
    b.dispose();
  });

  it('handles non-finite norms like torch', () => {
    const p = zeros([3]).requiresGrad_(true);
    const q = zeros([2]).requiresGrad_(true);
    // inf: the coefficient is 0, so finite values become 0 and the inf becomes NaN
    p.grad = f32([1, Number.POSITIVE_INFINITY, -2]);
    q.grad = f32([3, 4]);
    expect(clipGradNorm([p, q], 1)).toBe(Number.POSITIVE_INFINITY);
    const pg = vals(p.grad);
    expect(pg[0]).toBe(0);
    expect(Number.isNaN(pg[1])).toBe(true);
    expect(Math.abs(pg[2])).toBe(0);
    expect(vals(q.grad)).toEqual([0, 0]);
    // NaN anywhere: the norm is NaN (for every norm type) and every gradient becomes NaN
    for (const normType of [2, 1, Number.POSITIVE_INFINITY]) {
      setGrad(p, f32([1, Number.NaN, 100]));
      setGrad(q, f32([3, 4]));
      expect(Number.isNaN(clipGradNorm([p, q], 1, normType))).toBe(true);
      expect(vals(q.grad!).every(Number.isNaN)).toBe(true);
    }
    setGrad(p, f32([1, Number.NaN, 100]));
    expect(() => clipGradNorm([p], 1, 2, { errorIfNonfinite: true })).toThrow(TensorError);
    expect(p.grad!.toArray()).toEqual([1, Number.NaN, 100]);
    expect(() => clipGradNorm([p], 1, 0)).toThrow(/normType/);
    p.dispose();
    q.dispose();
  });

  it('getTotalNorm reads strided views and is independent of the block split', () => {
    const gen = new Generator(3);
    const big = randn([300, 257], { generator: gen });
    const t = big.transpose(0, 1);
    const flat = vals(big);
    const ref = Math.sqrt(flat.reduce((s, v) => s + v * v, 0));
    expect(getTotalNorm([t])).toBeCloseTo(ref, 8);
    expect(getTotalNorm([t, big], 1)).toBeCloseTo(2 * flat.reduce((s, v) => s + Math.abs(v), 0), 4);
    expect(getTotalNorm([big], Number.POSITIVE_INFINITY)).toBe(Math.max(...flat.map(Math.abs)));
    t.dispose();
    big.dispose();
  });

  it('getTotalNormPowerSum is the sum of |x|^p before the root (max |x|, NaN first, for inf)', () => {
    const a = tensor([3, -4], { dtype: 'float32' });
    const b = tensor([[1, 2]], { dtype: 'bfloat16' });
    const read = (t: Tensor) => {
      const v = t.item();
      t.dispose();
      return v;
    };
    expect(read(getTotalNormPowerSum([a, b]))).toBe(30);
    expect(read(getTotalNormPowerSum([a, b], 1))).toBe(10);
    expect(read(getTotalNormPowerSum([a, b], 3))).toBeCloseTo(27 + 64 + 1 + 8, 10);
    expect(read(getTotalNormPowerSum([a, b], Number.POSITIVE_INFINITY))).toBe(4);
    expect(read(getTotalNormPowerSum([]))).toBe(0);
    const n = tensor([1, Number.NaN, 5], { dtype: 'float32' });
    expect(read(getTotalNormPowerSum([a, n], Number.POSITIVE_INFINITY))).toBeNaN();
    expect(getTotalNorm([a, b])).toBe(Math.sqrt(30));
    for (const t of [a, b, n]) t.dispose();
  });
});

describe('Optimizer', () => {
  it('applies per-group hyperparameters and defaults', () => {
    const a = f32([1, 2]).requiresGrad_(true);
    const b = f32([1, 2]).requiresGrad_(true);
    const opt = new SGD([{ params: [a] }, { params: [b], lr: 1 }], { lr: 0.5 });
    expect(opt.paramGroups.map((g) => g.lr)).toEqual([0.5, 1]);
    expect(opt.paramGroups[1].momentum).toBe(0);
    a.grad = f32([1, 1]);
    b.grad = f32([1, 1]);
    opt.step();
    expect(a.toArray()).toEqual([0.5, 1.5]);
    expect(b.toArray()).toEqual([0, 1]);
    a.dispose();
    b.dispose();
  });

  it('rejects bad hyperparameters and parameters with TensorErrors', () => {
    const a = zeros([2]).requiresGrad_(true);
    const bad = (fn: () => unknown, re: RegExp) => {
      expect(fn).toThrow(TensorError);
      expect(fn).toThrow(re);
    };
    bad(() => new AdamW([], {}), /empty parameter list/);
    bad(() => new AdamW([a], { lr: -1 }), /learning rate/);
    bad(() => new AdamW([a], { betas: [1, 0.9] }), /beta1/);
    bad(() => new AdamW([a], { eps: -1 }), /eps/);
    bad(() => new SGD([a], { nesterov: true }), /Nesterov/);
    bad(() => new SGD([{ params: [a] }, { params: [a] }]), /more than one group/);
    bad(() => new SGD([tensor([1, 2])]), /floating-point/);
    a.dispose();
  });

  it('zeroGrad frees or zeroes gradients', () => {
    const a = zeros([2]).requiresGrad_(true);
    const opt = new SGD([a], { lr: 0.1 });
    a.grad = f32([1, 2]);
    opt.zeroGrad(false);
    expect(a.grad.toArray()).toEqual([0, 0]);
    const g = a.grad;
    opt.zeroGrad();
    expect(a.grad).toBeNull();
    expect(g.disposed).toBe(true);
    a.dispose();
  });

  it('steps non-contiguous parameters and low-precision gradients', () => {
    const gen = new Generator(5);
    const base = randn([3, 4], { generator: gen });
    const grads = [0, 1, 2].map(() => randn([4, 3], { generator: gen }));
    const view = base.transpose(0, 1).detach().requiresGrad_(true);
    const dense = base.transpose(0, 1).contiguous().detach().requiresGrad_(true);
    const o1 = new AdamW([view], { lr: 0.1 });
    const o2 = new AdamW([dense], { lr: 0.1 });
    for (const g of grads) {
      setGrad(view, g.to('bfloat16'));
      setGrad(dense, g.to('bfloat16').to('float32'));
      o1.step();
      o2.step();
    }
    expect(view.isContiguous).toBe(false);
    expect(view.toArray()).toEqual(dense.toArray());
    for (const t of [base, view, dense, ...grads]) t.dispose();
    o1.dispose();
    o2.dispose();
  });

  it('keeps fp32 state for bf16 parameters and rounds the fp32 update once', () => {
    const p16 = tensor([0.5, -1.25, 2], { dtype: 'bfloat16' }).requiresGrad_(true);
    const p32 = f32([0.5, -1.25, 2]).requiresGrad_(true);
    const o16 = new AdamW([p16], { lr: 0.05 });
    const o32 = new AdamW([p32], { lr: 0.05 });
    p16.grad = tensor([0.1, -0.2, 0.3], { dtype: 'bfloat16' });
    p32.grad = p16.grad.to('float32');
    o16.step();
    o32.step();
    expect(o16.stateOf(p16)?.expAvg.dtype).toBe('float32');
    const rounded = p32.to('bfloat16');
    expect(p16.toArray()).toEqual(rounded.toArray());
    for (const t of [p16, p32, rounded]) t.dispose();
    o16.dispose();
    o32.dispose();
  });
});

describe('optimizer checkpoints', () => {
  function makeRun(seed: number) {
    const model = new Linear(4, 3, { generator: new Generator(seed) });
    const opt = new AdamW(model.parameters(), { lr: 0.01, weightDecay: 0.1 });
    return { model, opt };
  }
  function trainStep(model: Linear, opt: Optimizer, x: Tensor): void {
    tidy(() => {
      const loss = model.forward(x).square().mean();
      loss.backward();
      clipGradNorm(model.parameters(), 0.5);
      opt.step();
      opt.zeroGrad();
    });
  }
  function cloneState(sd: OptimizerStateDict): OptimizerStateDict {
    const state: OptimizerStateDict['state'] = {};
    for (const [k, v] of Object.entries(sd.state)) {
      state[k] = Object.fromEntries(
        Object.entries(v).map(([n, x]) => [n, typeof x === 'object' && x !== null ? x.clone() : x]),
      );
    }
    return { state, paramGroups: JSON.parse(JSON.stringify(sd.paramGroups)) };
  }

  it('restores the step bit for bit', () => {
    const gen = new Generator(9);
    const xs = [0, 1, 2, 3, 4].map(() => randn([8, 4], { generator: gen }));
    const a = makeRun(1);
    for (const x of xs.slice(0, 3)) trainStep(a.model, a.opt, x);
    const sd = cloneState(a.opt.stateDict());
    const weights = Object.fromEntries(Object.entries(a.model.stateDict()).map(([k, v]) => [k, v.clone()]));
    expect(Object.keys(sd.state)).toEqual(['0', '1']);
    expect(sd.paramGroups[0]).toMatchObject({
      lr: 0.01,
      weightDecay: 0.1,
      betas: [0.9, 0.999],
      params: [0, 1],
    });
    expect(sd.state['0'].step).toBe(3);

    const b = makeRun(2);
    b.model.loadStateDict(weights);
    b.opt.loadStateDict(sd);
    for (const x of xs.slice(3)) {
      trainStep(a.model, a.opt, x);
      trainStep(b.model, b.opt, x);
    }
    for (const [name, t] of Object.entries(a.model.stateDict())) {
      expect(b.model.stateDict()[name].toArray(), name).toEqual(t.toArray());
    }
    expect(b.opt.stateOf(b.model.weight)?.step).toBe(5);
    for (const t of [...xs, ...Object.values(weights)]) t.dispose();
    for (const s of Object.values(sd.state))
      for (const v of Object.values(s)) if (typeof v === 'object' && v) v.dispose();
    for (const r of [a, b]) {
      r.opt.dispose();
      r.model.dispose();
    }
  });

  it('rejects checkpoints of another layout', () => {
    const { model, opt } = makeRun(1);
    const other = new Linear(4, 5);
    const o2 = new AdamW(other.parameters());
    trainStep(
      other,
      o2,
      tidy(() => randn([2, 4])),
    );
    expect(() => opt.loadStateDict({ state: {}, paramGroups: [] })).toThrow(
      /0 parameter groups, optimizer has 1/,
    );
    expect(() => opt.loadStateDict(o2.stateDict())).toThrow(TensorError);
    expect(() => opt.loadStateDict(o2.stateDict())).toThrow(/shape/);
    for (const x of [model, other]) x.dispose();
    opt.dispose();
    o2.dispose();
  });
});

describe('training loop memory', () => {
  it('is flat: AdamW + clipGradNorm inside tidy allocate nothing that survives a step', () => {
    const gen = new Generator(11);
    const model = new Linear(16, 8, { generator: gen });
    const opt = new AdamW(model.parameters(), { lr: 1e-3 });
    const x = randn([32, 16], { generator: gen });
    const y = randn([32, 8], { generator: gen });
    let after5 = -1;
    const losses: number[] = [];
    for (let step = 1; step <= 30; step++) {
      tidy(() => {
        const loss = model.forward(x).sub(y).square().mean();
        loss.backward();
        clipGradNorm(model.parameters(), 1.0);
        opt.step();
        opt.zeroGrad();
        losses.push(loss.item());
      });
      if (step === 5) after5 = memoryStats().liveBytes;
    }
    expect(memoryStats().liveBytes).toBe(after5);
    expect(losses[29]).toBeLessThan(losses[0]);
    opt.dispose();
    model.dispose();
    x.dispose();
    y.dispose();
  });
});

describe('AdamW multi-tensor path', () => {
  /** 150 parameters of mixed shapes and layouts: fp32, bf16 and transposed (non-contiguous) views. */
  function model(seed: number): Tensor[] {
    const gen = new Generator(seed);
    const params: Tensor[] = [];
    for (let i = 0; i < 150; i++) {
      const shape = i % 5 === 0 ? [1 + (i % 7)] : [2 + (i % 4), 3 + (i % 9)];
      let t = randn(shape, { generator: gen });
      if (i % 11 === 3) t = t.to('bfloat16');
      if (i % 13 === 7 && shape.length === 2) t = t.transpose(0, 1);
      params.push(t.detach().requiresGrad_(true));
    }
    return params;
  }

  /** Gradients for one step: none for every 9th parameter on even steps, some in another dtype. */
  function setGrads(params: Tensor[], step: number): void {
    const gen = new Generator(1000 + step);
    params.forEach((p, i) => {
      p.grad?.dispose();
      if (step % 2 === 0 && i % 9 === 4) {
        p.grad = null;
        return;
      }
      const g = randn(p.shape, { generator: gen, std: 0.1 });
      const dtype = i % 17 === 2 ? 'float16' : i % 6 === 1 ? 'bfloat16' : p.dtype;
      p.grad = g.to(dtype);
      if (p.grad !== g) g.dispose();
    });
  }

  /** Counts the default device's adamwStep calls and the tensors that go through adamwStepMulti. */
  function countKernels() {
    const backend = getBackend(getDefaultDevice());
    const original = backend.kernel.bind(backend);
    const counts = { adamwStep: 0, multiCalls: 0, multiTensors: 0 };
    const spy = vi.spyOn(backend, 'kernel').mockImplementation(((name: KernelName) => {
      const k = original(name);
      if (name === 'adamwStep' && k) {
        const one = k as KernelTable['adamwStep'];
        return ((...a: Parameters<typeof one>) => {
          counts.adamwStep++;
          one(...a);
        }) as KernelTable['adamwStep'];
      }
      if (name === 'adamwStepMulti' && k) {
        const multi = k as KernelTable['adamwStepMulti'];
        return ((...a: Parameters<typeof multi>) => {
          counts.multiCalls++;
          counts.multiTensors += a[0].length;
          multi(...a);
        }) as KernelTable['adamwStepMulti'];
      }
      return k;
    }) as typeof backend.kernel);
    return { counts, restore: () => spy.mockRestore() };
  }

  it('gives the per-tensor path bit for bit, over steps, groups and lagging step counts', () => {
    const a = model(21);
    const b = model(21);
    const groups = (ps: Tensor[]) => [
      { params: ps.slice(0, 90) },
      { params: ps.slice(90), lr: 3e-3, weightDecay: 0.1 },
    ];
    const perTensor = new AdamW(groups(a), { lr: 1e-2, foreach: false });
    const batched = new AdamW(groups(b), { lr: 1e-2 });
    const { counts, restore } = countKernels();
    try {
      for (let step = 1; step <= 4; step++) {
        setGrads(a, step);
        const calls = counts.multiCalls;
        perTensor.step();
        expect(counts.multiCalls).toBe(calls);
        const withGrad = b.filter((_, i) => !(step % 2 === 0 && i % 9 === 4)).length;
        setGrads(b, step);
        const before = { ...counts };
        batched.step();
        // on a backend with both kernels of its own (the CPU, CUDA; not a backend that runs their
        // compositions), every parameter with a gradient went through exactly one of the two
        if (hasNativeKernel(getBackend(getDefaultDevice()), 'adamwStepMulti')) {
          expect(counts.adamwStep - before.adamwStep + counts.multiTensors - before.multiTensors).toBe(
            withGrad,
          );
          // two groups x (fp32, bf16 params x grad dtypes) x lagging step counts: a handful of calls
          expect(counts.multiCalls - before.multiCalls).toBeGreaterThan(0);
          expect(counts.multiCalls - before.multiCalls).toBeLessThan(12);
          expect(counts.multiTensors - before.multiTensors).toBeGreaterThan(withGrad / 2);
        }
        a.forEach((p, i) => {
          expect(b[i].toArray(), `param ${i} step ${step}`).toEqual(p.toArray());
          const sa = perTensor.stateOf(p);
          const sb = batched.stateOf(b[i]);
          expect(sb?.step, `step count ${i}`).toBe(sa?.step);
          if (sa && sb) {
            expect(sb.expAvg.toArray(), `exp_avg ${i}`).toEqual(sa.expAvg.toArray());
            expect(sb.expAvgSq.toArray(), `exp_avg_sq ${i}`).toEqual(sa.expAvgSq.toArray());
          }
        });
      }
    } finally {
      restore();
    }
    for (const p of [...a, ...b]) {
      p.grad?.dispose();
      p.dispose();
    }
    perTensor.dispose();
    batched.dispose();
  });

  it('keeps the per-parameter checks: a bad gradient in any group fails the step before any update', () => {
    const ps = [0, 1, 2].map(() => zeros([3]).requiresGrad_(true));
    const opt = new AdamW([{ params: ps.slice(0, 2) }, { params: ps.slice(2) }], { lr: 0.1 });
    ps[0].grad = f32([1, 2, 3]);
    ps[1].grad = f32([1, 2, 3]);
    ps[2].grad = f32([1, 2]);
    expect(() => opt.step()).toThrow(TensorError);
    expect(() => opt.step()).toThrow(/gradient .* does not match/);
    expect(ps[0].toArray()).toEqual([0, 0, 0]);
    expect(opt.stateOf(ps[0])).toBeUndefined();
    for (const p of ps) {
      p.grad?.dispose();
      p.dispose();
    }
    opt.dispose();
  });
});

/** AdamW's per-parameter state (protected: read here to check step counts and moments). */
const stateOf = (opt: AdamW) =>
  (opt as unknown as { state: Map<Tensor, { step: number; expAvg: Tensor; expAvgSq: Tensor }> }).state;

/** A copy of a state dict with every tensor moved to `device` (what a checkpoint read gives). */
function structuredState(sd: OptimizerStateDict, device: string) {
  const made: Tensor[] = [];
  const state: OptimizerStateDict['state'] = {};
  for (const [id, entry] of Object.entries(sd.state)) {
    state[id] = Object.fromEntries(
      Object.entries(entry).map(([k, v]) => {
        if (!(v instanceof Tensor)) return [k, v];
        const t = v.to(device);
        made.push(t);
        return [k, t];
      }),
    ) as never;
  }
  return {
    sd: { ...sd, state },
    dispose: () => {
      for (const t of made) t.dispose();
    },
  };
}

describe('AdamW.step options: gradScale and paramCopies', () => {
  /** fp32 masters (one transposed, one 1-D) with gradients, their bf16 copies and a twin set. */
  function setup(seed: number) {
    const gen = new Generator(seed);
    const shapes = [[4, 6], [6, 4], [5], [3, 3]];
    const masters = shapes.map((s, i) => {
      const t = randn(s, { generator: gen });
      return (i === 1 ? t.transpose(0, 1).contiguous().transpose(0, 1) : t).detach().requiresGrad_(true);
    });
    for (const p of masters) p.grad = randn(p.shape, { generator: gen, std: 0.1 });
    const copies = masters.map((p) => p.detach().to('bfloat16'));
    return { masters, copies };
  }
  const free = (ts: Tensor[]) => {
    for (const t of ts) {
      t.grad?.dispose();
      t.dispose();
    }
  };

  for (const foreach of [true, false]) {
    it(`gradScale: the bits of scaling the gradients first, which stay unchanged (foreach ${foreach})`, () => {
      const a = setup(3);
      const b = setup(3);
      const optA = new AdamW(a.masters, { lr: 1e-2, foreach });
      const optB = new AdamW(b.masters, { lr: 1e-2, foreach });
      for (let step = 0; step < 3; step++) {
        const before = a.masters.map((p) => p.grad!.toArray());
        optA.step({ gradScale: 0.3 });
        expect(a.masters.map((p) => p.grad!.toArray())).toEqual(before);
        for (const p of b.masters) {
          const scaled = p.grad!.mul(0.3);
          p.grad!.copy_(scaled);
          scaled.dispose();
        }
        optB.step();
        for (let i = 0; i < a.masters.length; i++)
          expect(a.masters[i].toArray()).toEqual(b.masters[i].toArray());
        for (const p of b.masters) p.grad!.copy_(a.masters[b.masters.indexOf(p)].grad!);
      }
      optA.dispose();
      optB.dispose();
      free([...a.masters, ...a.copies, ...b.masters, ...b.copies]);
    });

    it(`paramCopies: each copy holds its master's new value rounded to bfloat16 (foreach ${foreach})`, () => {
      const { masters, copies } = setup(4);
      // one copy is a transposed view: written through a contiguous temporary
      const views = copies.map((c, i) => (i === 3 ? c.transpose(0, 1) : c));
      const paramCopies = new Map(
        masters.map((p, i) => [i === 3 ? p.transpose(0, 1) : p, views[i]] as const),
      );
      // the map is keyed by the optimizer's parameters: master 3 goes in as its transposed view
      const params = [...paramCopies.keys()];
      for (const [i, p] of params.entries()) if (i === 3) p.grad = masters[3].grad!.transpose(0, 1);
      const opt = new AdamW(params, { lr: 1e-2, foreach });
      opt.step({ paramCopies });
      params.forEach((p, i) => {
        expect(views[i].toArray()).toEqual(p.detach().to('bfloat16').toArray());
      });
      opt.dispose();
      free([...masters, ...copies]);
    });
  }

  for (const foreach of [true, false]) {
    it(`gradScale as a float64 tensor: the number's bits; not finite, nothing changes and revertStepCounts takes the step back (foreach ${foreach})`, () => {
      const a = setup(6);
      const b = setup(6);
      const optA = new AdamW(a.masters, { lr: 1e-2, foreach });
      const optB = new AdamW(b.masters, { lr: 1e-2, foreach });
      const copiesA = new Map(a.masters.map((p, i) => [p, a.copies[i]] as const));
      const copiesB = new Map(b.masters.map((p, i) => [p, b.copies[i]] as const));
      const snapshot = () => [
        ...a.masters.map((p) => p.toArray()),
        ...a.copies.map((c) => c.toArray()),
        ...a.masters.flatMap((p) => {
          const st = stateOf(optA).get(p);
          return st ? [st.expAvg.toArray(), st.expAvgSq.toArray()] : [];
        }),
      ];
      // A: 0.3 (tensor), NaN (skipped, reverted), inf (skipped, reverted), 0.5 (tensor);
      // B: 0.3 and 0.5 as numbers: the same values and step counts
      for (const scale of [0.3, Number.NaN, Number.POSITIVE_INFINITY, 0.5]) {
        const t = tensor([scale], { dtype: 'float64' });
        const before = snapshot();
        optA.step({ gradScale: t, paramCopies: copiesA });
        t.dispose();
        if (!Number.isFinite(scale)) {
          expect(snapshot()).toEqual(before);
          optA.revertStepCounts();
          continue;
        }
        optB.step({ gradScale: scale, paramCopies: copiesB });
        for (let i = 0; i < a.masters.length; i++) {
          expect(a.masters[i].toArray()).toEqual(b.masters[i].toArray());
          expect(a.copies[i].toArray()).toEqual(b.copies[i].toArray());
        }
      }
      a.masters.forEach((p, i) => {
        const sa = stateOf(optA).get(p)!;
        const sb = stateOf(optB).get(b.masters[i])!;
        expect(sa.step).toBe(2);
        expect(sb.step).toBe(2);
        expect(sa.expAvg.toArray()).toEqual(sb.expAvg.toArray());
        expect(sa.expAvgSq.toArray()).toEqual(sb.expAvgSq.toArray());
      });
      optA.dispose();
      optB.dispose();
      free([...a.masters, ...a.copies, ...b.masters, ...b.copies]);
    });
  }

  it('parameters on two devices (a host-offloaded state): the gradScale tensor reaches each, the host reading it once', () => {
    registerReferenceBackend();
    // the same masters and gradients, once all on the CPU (scaled by a number), once split
    // between ref:0 (where the scale tensor lives) and the CPU
    const a = setup(8);
    const b = setup(8);
    // (copies on each device, whichever the default device is: the conformance run's is ref:0)
    const copyTo = (t: Tensor, dev: string) => (t.device === dev ? t.detach().clone() : t.detach().to(dev));
    const moved = b.masters.map((p, i) => {
      const dev = i % 2 === 0 ? 'cpu' : 'ref:0';
      const q = copyTo(p, dev).requiresGrad_(true);
      q.grad = copyTo(p.grad as Tensor, dev);
      return q;
    });
    const optA = new AdamW(a.masters, { lr: 1e-2 });
    const optB = new AdamW(moved, { lr: 1e-2 });
    for (const scale of [0.3, Number.NaN, 0.5]) {
      const t = tensor([scale], { dtype: 'float64', device: 'ref:0' });
      const before = moved.map((p) => p.toArray());
      optB.step({ gradScale: t });
      t.dispose();
      if (!Number.isFinite(scale)) {
        // skipped on both devices
        expect(moved.map((p) => p.toArray())).toEqual(before);
        optB.revertStepCounts();
        continue;
      }
      optA.step({ gradScale: scale });
      moved.forEach((p, i) => {
        expect(p.device).toBe(i % 2 === 0 ? 'cpu' : 'ref:0');
        const host = p.to('cpu');
        const got = vals(host);
        host.dispose();
        const want = vals(a.masters[i]);
        for (const [k, v] of got.entries()) {
          expect(Math.abs(v - want[k])).toBeLessThanOrEqual(1e-7 + 1e-6 * Math.abs(want[k]));
        }
      });
    }
    expect(stateOf(optB).get(moved[1])?.expAvg.device).toBe('ref:0');
    expect(stateOf(optB).get(moved[0])?.step).toBe(2);
    // its state loads back onto each parameter's device, from tensors on another one
    const sd = optB.stateDict();
    const onCpu = structuredState(sd, 'cpu');
    const optC = new AdamW(moved, { lr: 1e-2 });
    optC.loadStateDict(onCpu.sd);
    for (const [i, p] of moved.entries()) {
      const st = stateOf(optC).get(p)!;
      expect(st.expAvg.device).toBe(p.device);
      expect(st.expAvgSq.toArray()).toEqual(stateOf(optB).get(p)!.expAvgSq.toArray());
      expect(st.step, `param ${i}`).toBe(2);
    }
    onCpu.dispose();
    optA.dispose();
    optB.dispose();
    optC.dispose();
    free([...a.masters, ...a.copies, ...b.masters, ...b.copies, ...moved]);
  });

  it('rejects a gradScale tensor of another dtype or size', () => {
    const { masters, copies } = setup(7);
    const opt = new AdamW(masters, { lr: 1e-2 });
    const before = masters[0].toArray();
    const f32 = tensor([0.5], { dtype: 'float32' });
    const two = tensor([0.5, 0.5], { dtype: 'float64' });
    expect(() => opt.step({ gradScale: f32 })).toThrow(
      /AdamW.step: a gradScale tensor must be float64 with one element, got/,
    );
    expect(() => opt.step({ gradScale: two })).toThrow(/must be float64 with one element/);
    expect(masters[0].toArray()).toEqual(before);
    for (const t of [f32, two]) t.dispose();
    opt.dispose();
    free([...masters, ...copies]);
  });

  it('rejects a bad gradScale, a copy of another shape and a copy of a float32 master into float64', () => {
    const { masters, copies } = setup(5);
    const opt = new AdamW(masters, { lr: 1e-2 });
    const before = masters[0].toArray();
    expect(() => opt.step({ gradScale: Number.NaN })).toThrow(/gradScale must be a finite number/);
    expect(() => opt.step({ paramCopies: new Map([[masters[0], copies[1]]]) })).toThrow(
      /parameter copy .* does not match/,
    );
    const f64 = masters[2].detach().to('float64');
    expect(() => opt.step({ paramCopies: new Map([[masters[2], f64]]) })).toThrow(/bfloat16 or float16/);
    expect(masters[0].toArray()).toEqual(before);
    opt.dispose();
    f64.dispose();
    free([...masters, ...copies]);
  });
});
