// DistributedOptimizer / DataParallelOptimizer and the gradient norm in one process (dp = 1, a
// LocalGroup): they train exactly like torch-style AdamW with Megatron's no-decay groups and
// clipping, skip a step with a NaN gradient norm (one log line, weights untouched), checkpoint
// their shard, follow the bytes-per-parameter budget for bf16 and free everything they made.
import {
  AdamW,
  clipGradNorm,
  crossEntropy,
  getTotalNorm,
  memoryStats,
  noGrad,
  Tensor,
  tensor,
  tidy,
} from '@megapatch/tensor';
import { registerReferenceBackend } from '@megapatch/tensor/reference';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { clipGradByTotalNorm, getGradNorm } from '../src/distributed/clip-grads.js';
import { DistributedDataParallel } from '../src/distributed/distributed-data-parallel.js';
import {
  DataParallelOptimizer,
  DistributedOptimizer,
  type DistributedOptimizerOptions,
} from '../src/distributed/distributed-optimizer.js';
import { DistributedError } from '../src/errors.js';
import { setTensorModelParallelAttributes } from '../src/tensor-parallel/attributes.js';
import {
  DIMS,
  HYPER,
  LocalGroup,
  MLP,
  makeData,
  maxRelDiff,
  referenceRun,
  weightsOf,
} from './workers/ddp-common.js';

const vals = (t: Tensor | null): number[] => Array.from(noGrad(() => t!.toTypedArray()) as Float32Array);

let start = 0;
beforeEach(() => {
  start = memoryStats().liveBytes;
});
afterEach(() => {
  expect(memoryStats().liveBytes).toBe(start);
});

const optOptions: DistributedOptimizerOptions = { ...HYPER, modelParallelGroup: null };

function train(distributed: boolean, data: { x: Tensor; y: Tensor }[], bucketSize: number | null) {
  const model = new MLP(DIMS, 11);
  const ddp = new DistributedDataParallel(model, {
    dataParallelGroup: new LocalGroup(),
    useDistributedOptimizer: distributed,
    bucketSize,
  });
  const opt = distributed
    ? new DistributedOptimizer(ddp, optOptions)
    : new DataParallelOptimizer(ddp, optOptions);
  const losses: number[] = [];
  const gradNorms: number[] = [];
  for (const { x, y } of data) {
    opt.zeroGrad();
    losses.push(
      tidy(() => {
        const l = crossEntropy(ddp.forward(x), y);
        l.backward();
        return l.item();
      }),
    );
    const r = opt.step();
    expect(r.updated && !r.skipped).toBe(true);
    gradNorms.push(r.gradNorm);
  }
  const weights = weightsOf(model);
  opt.dispose();
  ddp.dispose();
  model.dispose();
  return { losses, gradNorms, weights };
}

describe('optimizers over DDP (one process)', () => {
  it.each([
    ['DistributedOptimizer', true, 200],
    ['DistributedOptimizer, one bucket', true, null],
    ['DataParallelOptimizer', false, 200],
  ] as const)('%s trains like AdamW with clipping on the same batches', (_, distributed, bucketSize) => {
    const data = makeData(4, 16, 21);
    const got = train(distributed, data, bucketSize);
    const ref = referenceRun(data, 11, HYPER, (ps, max) => clipGradNorm(ps, max));
    got.losses.forEach((l, i) => {
      expect(Math.abs(l - ref.losses[i]) / ref.losses[i]).toBeLessThan(1e-6);
    });
    got.gradNorms.forEach((g, i) => {
      expect(Math.abs(g - ref.gradNorms[i]) / ref.gradNorms[i]).toBeLessThan(1e-5);
    });
    // clipping really happened in some steps
    expect(ref.gradNorms.some((g) => g > HYPER.clipGrad)).toBe(true);
    expect(maxRelDiff(got.weights, ref.weights)).toBeLessThan(1e-5);
    for (const b of data) for (const t of [b.x, b.y]) t.dispose();
  });

  it('owns its tensors: DDP and the optimizer built inside tidy() keep working after it', () => {
    const model = new MLP(DIMS, 1);
    const { ddp, opt } = tidy(() => {
      const d = new DistributedDataParallel(model, {
        dataParallelGroup: new LocalGroup(),
        useDistributedOptimizer: true,
        bucketSize: 200,
      });
      return { ddp: d, opt: new DistributedOptimizer(d, optOptions) };
    });
    for (const p of model.parameters()) expect([p.disposed, p.mainGrad!.disposed]).toEqual([false, false]);
    for (const m of opt.masterParams) expect([m.disposed, m.grad!.disposed]).toEqual([false, false]);
    const [batch] = makeData(1, 8, 1);
    tidy(() => crossEntropy(ddp.forward(batch.x), batch.y).backward());
    expect(opt.step().updated).toBe(true);
    opt.dispose();
    ddp.dispose();
    model.dispose();
    for (const t of [batch.x, batch.y]) t.dispose();
  });

  it('puts biases and 1-D parameters in a group without weight decay', () => {
    const model = new MLP(DIMS, 1);
    const ddp = new DistributedDataParallel(model, {
      dataParallelGroup: new LocalGroup(),
      useDistributedOptimizer: true,
    });
    const opt = new DistributedOptimizer(ddp, { ...optOptions, weightDecay: 0.3 });
    const groups = opt.paramGroups;
    expect(groups.map((g) => g.weightDecay)).toEqual([0.3, 0]);
    expect(groups[0].params.map((p) => p.name).sort()).toEqual(['fc1.weight', 'fc2.weight', 'fc3.weight']);
    expect(groups[1].params.map((p) => p.name).sort()).toEqual(['fc1.bias', 'fc2.bias', 'fc3.bias']);
    expect(groups[1].wdMult).toBe(0);
    expect(opt.numLocalElements).toBe(model.numParameters());
    opt.dispose();
    ddp.dispose();
    model.dispose();
  });

  it.each([true, false])(
    'decoupledLr (distributed %s): the named parameters in groups of their own, with their own learning rate',
    (distributed) => {
      const model = new MLP(DIMS, 1);
      const ddp = new DistributedDataParallel(model, {
        dataParallelGroup: new LocalGroup(),
        useDistributedOptimizer: distributed,
      });
      const options = {
        ...optOptions,
        weightDecay: 0.3,
        decoupledLr: { lr: 0, minLr: 0, isParam: (n: string) => n.startsWith('fc3.') },
      };
      const opt = distributed
        ? new DistributedOptimizer(ddp, options)
        : new DataParallelOptimizer(ddp, options);
      const groups = opt.paramGroups;
      expect(groups.map((g) => [g.weightDecay, g.maxLr, g.minLr])).toEqual([
        [0.3, undefined, undefined],
        [0, undefined, undefined],
        [0.3, 0, 0],
        [0, 0, 0],
      ]);
      expect(groups.map((g) => g.params.map((p) => p.name).sort())).toEqual([
        ['fc1.weight', 'fc2.weight'],
        ['fc1.bias', 'fc2.bias'],
        ['fc3.weight'],
        ['fc3.bias'],
      ]);
      // a step at learning rate 0 for fc3 moves the others only
      const [batch] = makeData(1, 8, 3);
      const before = weightsOf(model);
      tidy(() => crossEntropy(ddp.forward(batch.x), batch.y).backward());
      expect(opt.step().updated).toBe(true);
      const after = weightsOf(model);
      for (const [n, v] of Object.entries(before)) {
        const moved = after[n].some((x, i) => x !== v[i]);
        expect(moved, n).toBe(!n.startsWith('fc3.'));
      }
      for (const t of [batch.x, batch.y]) t.dispose();
      opt.dispose();
      ddp.dispose();
      model.dispose();
    },
  );

  it('skips the step when the gradient norm is NaN: one log line, weights unchanged', () => {
    const model = new MLP(DIMS, 2);
    const ddp = new DistributedDataParallel(model, {
      dataParallelGroup: new LocalGroup(),
      useDistributedOptimizer: true,
    });
    const lines: string[] = [];
    const opt = new DistributedOptimizer(ddp, { ...optOptions, log: (l) => lines.push(l) });
    const [batch] = makeData(1, 8, 3);
    const before = weightsOf(model);
    tidy(() => {
      const x = batch.x.clone();
      noGrad(() => x.narrow(0, 0, 1).fill_(Number.NaN));
      crossEntropy(ddp.forward(x), batch.y).backward();
    });
    const r = opt.step();
    expect(r).toEqual({ updated: false, gradNorm: Number.NaN, skipped: true });
    expect(lines).toEqual(['iteration skipped: gradient norm is nan']);
    expect(maxRelDiff(weightsOf(model), before)).toBe(0);
    // the next clean step goes through, as the first update of a fresh optimizer (the skipped
    // step's count was taken back: AdamW's bias correction is that of step 1)
    opt.zeroGrad();
    tidy(() => crossEntropy(ddp.forward(batch.x), batch.y).backward());
    expect(opt.step().updated).toBe(true);
    expect(lines.length).toBe(1);
    const fresh = new MLP(DIMS, 2);
    const ddp2 = new DistributedDataParallel(fresh, {
      dataParallelGroup: new LocalGroup(),
      useDistributedOptimizer: true,
    });
    const opt2 = new DistributedOptimizer(ddp2, optOptions);
    tidy(() => crossEntropy(ddp2.forward(batch.x), batch.y).backward());
    expect(opt2.step().updated).toBe(true);
    expect(maxRelDiff(weightsOf(model), weightsOf(fresh))).toBe(0);
    for (const x of [opt, ddp, model, opt2, ddp2, fresh]) x.dispose();
    for (const t of [batch.x, batch.y]) t.dispose();
  });

  it('stepOnDevice + finishStep: the update queued without a read, the norm read with other values', () => {
    const data = makeData(3, 16, 5);
    const runs = [false, true].map((split) => {
      const model = new MLP(DIMS, 4);
      const ddp = new DistributedDataParallel(model, {
        dataParallelGroup: new LocalGroup(),
        useDistributedOptimizer: true,
      });
      const opt = new DistributedOptimizer(ddp, optOptions);
      const norms: number[] = [];
      for (const { x, y } of data) {
        opt.zeroGrad();
        tidy(() => crossEntropy(ddp.forward(x), y).backward());
        if (!split) {
          norms.push(opt.step().gradNorm);
          continue;
        }
        const norm = opt.stepOnDevice();
        expect(norm.dtype).toBe('float64');
        expect(norm.shape).toEqual([1]);
        // a second step before the first is finished, or finishing twice, is refused
        expect(() => opt.stepOnDevice()).toThrow(
          /DistributedOptimizer.stepOnDevice: the previous step is not finished; pass its gradient norm to finishStep\(\) first/,
        );
        const value = norm.item();
        norm.dispose();
        expect(opt.finishStep(value)).toEqual({ updated: true, gradNorm: value, skipped: false });
        expect(() => opt.finishStep(value)).toThrow(
          /finishStep: no step to finish; call stepOnDevice\(\) first/,
        );
        norms.push(value);
      }
      const weights = weightsOf(model);
      for (const x of [opt, ddp, model]) x.dispose();
      return { norms, weights };
    });
    expect(runs[1].norms).toEqual(runs[0].norms);
    expect(maxRelDiff(runs[1].weights, runs[0].weights)).toBe(0);
    for (const b of data) for (const t of [b.x, b.y]) t.dispose();
  });

  it('stateDict / loadStateDict restore the shard (masters, moments) and the model', () => {
    const model = new MLP(DIMS, 4);
    const ddp = new DistributedDataParallel(model, {
      dataParallelGroup: new LocalGroup(),
      useDistributedOptimizer: true,
    });
    const opt = new DistributedOptimizer(ddp, optOptions);
    const data = makeData(3, 8, 5);
    const stepOn = (b: { x: Tensor; y: Tensor }) => {
      opt.zeroGrad();
      tidy(() => crossEntropy(ddp.forward(b.x), b.y).backward());
      opt.step();
    };
    stepOn(data[0]);
    const sd = opt.stateDict();
    const saved = {
      ...sd,
      masters: sd.masters.map((m) => m.clone()),
      optimizer: sd.optimizer && {
        ...sd.optimizer,
        state: Object.fromEntries(
          Object.entries(sd.optimizer.state).map(([k, s]) => [
            k,
            Object.fromEntries(Object.entries(s).map(([n, v]) => [n, v instanceof Tensor ? v.clone() : v])),
          ]),
        ),
      },
    };
    const weightsAfter1 = weightsOf(model);
    stepOn(data[1]);
    const weightsAfter2 = weightsOf(model);
    expect(maxRelDiff(weightsAfter2, weightsAfter1)).toBeGreaterThan(0);
    opt.loadStateDict(saved);
    expect(maxRelDiff(weightsOf(model), weightsAfter1)).toBe(0);
    // stepping again on the same batch repeats step 2 exactly
    stepOn(data[1]);
    expect(maxRelDiff(weightsOf(model), weightsAfter2)).toBe(0);
    expect(() => opt.loadStateDict({ ...saved, dataParallelSize: 2 })).toThrow(DistributedError);
    for (const m of saved.masters) m.dispose();
    for (const s of Object.values(saved.optimizer!.state))
      for (const v of Object.values(s)) if (v instanceof Tensor) v.dispose();
    opt.dispose();
    ddp.dispose();
    model.dispose();
    for (const b of data) for (const t of [b.x, b.y]) t.dispose();
  });

  it('needs the matching DDP mode', () => {
    const model = new MLP(DIMS, 1);
    const plain = new DistributedDataParallel(model, { dataParallelGroup: new LocalGroup() });
    expect(() => new DistributedOptimizer(plain, optOptions)).toThrow(/useDistributedOptimizer: true/);
    plain.dispose();
    const sharded = new DistributedDataParallel(model, {
      dataParallelGroup: new LocalGroup(),
      useDistributedOptimizer: true,
    });
    expect(() => new DataParallelOptimizer(sharded, optOptions)).toThrow(/use DistributedOptimizer/);
    sharded.dispose();
    model.dispose();
  });

  it.each([
    ['DistributedOptimizer', true],
    ['DataParallelOptimizer', false],
  ] as const)(
    '%s: bf16 parameters with fp32 grads cost 18 bytes per parameter at dp = 1 (plus padding)',
    (_, distributed) => {
      const base = memoryStats().liveBytes;
      const model = new MLP(DIMS, 3, 'bfloat16');
      const n = model.numParameters();
      expect(memoryStats().liveBytes - base).toBe(2 * n);
      const ddp = new DistributedDataParallel(model, {
        dataParallelGroup: new LocalGroup(),
        useDistributedOptimizer: distributed,
        bucketSize: 200,
      });
      const padded = ddp.buffers[0].layout.numel;
      const opt = distributed
        ? new DistributedOptimizer(ddp, optOptions)
        : new DataParallelOptimizer(ddp, optOptions);
      const [batch] = makeData(1, 8, 9);
      const x = batch.x.to('bfloat16');
      tidy(() => crossEntropy(ddp.forward(x).float(), batch.y).backward());
      opt.step(); // AdamW makes its moments on the first step
      const bytes = memoryStats().liveBytes - base - (x.numel * 2 + batch.x.numel * 4 + batch.y.numel * 8);
      // params 2 (+ padding with the param buffer) + grads 4 (+ padding) + master 4 + moments 8
      const expected = 18 * n + (padded - n) * (distributed ? 6 : 4);
      expect(bytes).toBe(expected);
      opt.dispose();
      ddp.dispose();
      model.dispose();
      for (const t of [x, batch.x, batch.y]) t.dispose();
    },
  );
});

describe('bf16 parameters: clipping and the master copy inside the AdamW pass', () => {
  it.each([
    ['DistributedOptimizer', true],
    ['DataParallelOptimizer', false],
  ] as const)(
    '%s gives the bits of clipping in place, AdamW on fp32 masters, then copying',
    (_, distributed) => {
      const data = makeData(3, 16, 31);
      const model = new MLP(DIMS, 11, 'bfloat16');
      const ddp = new DistributedDataParallel(model, {
        dataParallelGroup: new LocalGroup(),
        useDistributedOptimizer: distributed,
        bucketSize: 200,
      });
      const opt = distributed
        ? new DistributedOptimizer(ddp, optOptions)
        : new DataParallelOptimizer(ddp, optOptions);
      // the reference: the same model, fp32 masters, in-place clipping with the norm the optimizer
      // reports, torch-style AdamW, then a copy into the bf16 weights
      const ref = new MLP(DIMS, 11, 'bfloat16');
      const named = ref.namedParameters();
      const masters = new Map(named.map(([n, p]) => [n, noGrad(() => p.float()).requiresGrad_(true)]));
      const isNoDecay = (n: string, p: Tensor) => p.ndim === 1 || n.endsWith('.bias');
      const refOpt = new AdamW(
        [
          {
            params: named.filter(([n, p]) => !isNoDecay(n, p)).map(([n]) => masters.get(n)!),
            weightDecay: HYPER.weightDecay,
          },
          { params: named.filter(([n, p]) => isNoDecay(n, p)).map(([n]) => masters.get(n)!), weightDecay: 0 },
        ],
        { lr: HYPER.lr, betas: HYPER.betas, eps: HYPER.eps },
      );
      let clipped = 0;
      for (const { x, y } of data) {
        opt.zeroGrad();
        tidy(() => crossEntropy(ddp.forward(x.to('bfloat16')), y).backward());
        const r = opt.step();
        for (const [, p] of named) {
          p.grad?.dispose();
          p.grad = null;
        }
        tidy(() => crossEntropy(ref.forward(x.to('bfloat16')), y).backward());
        for (const [n, p] of named) {
          const m = masters.get(n)!;
          m.grad?.dispose();
          m.grad = noGrad(() => p.grad!.float());
        }
        clipGradByTotalNorm([...masters.values()], HYPER.clipGrad, r.gradNorm);
        if (r.gradNorm > HYPER.clipGrad) clipped++;
        refOpt.step();
        noGrad(() => {
          for (const [n, p] of named) p.copy_(masters.get(n)!);
        });
        const got = weightsOf(model);
        const want = weightsOf(ref);
        for (const n of Object.keys(want)) expect(got[n], n).toEqual(want[n]);
      }
      expect(clipped).toBeGreaterThan(0);
      refOpt.dispose();
      for (const m of masters.values()) {
        m.grad?.dispose();
        m.dispose();
      }
      for (const [, p] of named) p.grad?.dispose();
      ref.dispose();
      opt.dispose();
      ddp.dispose();
      model.dispose();
      for (const b of data) for (const t of [b.x, b.y]) t.dispose();
    },
  );
});

describe('optimizerCpuOffload: masters and moments in host memory (the model on ref:0)', () => {
  registerReferenceBackend();
  const DEV = 'ref:0';
  /** Three steps of a model on ref:0; the weights, norms and ref:0's bytes after the first step. */
  function run(o: {
    distributed: boolean;
    dtype: 'float32' | 'bfloat16';
    offload?: number;
    nanAt?: number;
    restoreAfter?: number;
  }) {
    const devStart = memoryStats(DEV).liveBytes;
    const data = makeData(3, 16, 41);
    const onDev = data.map((b) => ({ x: b.x.to(DEV, o.dtype), y: b.y.to(DEV) }));
    const devBase = memoryStats(DEV).liveBytes;
    const hostBase = memoryStats('cpu').liveBytes;
    const model = new MLP(DIMS, 11, o.dtype).to(DEV);
    const ddp = new DistributedDataParallel(model, {
      dataParallelGroup: new LocalGroup(),
      useDistributedOptimizer: o.distributed,
      bucketSize: 200,
    });
    const options: DistributedOptimizerOptions = {
      ...optOptions,
      log: () => {},
      ...(o.offload === undefined ? {} : { optimizerCpuOffload: true, optimizerOffloadFraction: o.offload }),
    };
    const opt = o.distributed
      ? new DistributedOptimizer(ddp, options)
      : new DataParallelOptimizer(ddp, options);
    const norms: number[] = [];
    const live: number[][] = [];
    let bytes = { device: 0, host: 0 };
    let saved: ReturnType<typeof opt.stateDict> | null = null;
    let weightsAtSave: Record<string, number[]> = {};
    for (const [i, { x, y }] of onDev.entries()) {
      opt.zeroGrad();
      tidy(() => {
        const l = crossEntropy(ddp.forward(x).float(), y);
        (i === o.nanAt ? l.mul(Number.NaN) : l).backward();
      });
      const before = i === o.nanAt ? weightsOf(model) : null;
      const r = opt.step();
      norms.push(r.gradNorm);
      expect(r.skipped).toBe(i === o.nanAt);
      // a skipped step writes the host's unchanged masters back: the same weights
      if (before) expect(maxRelDiff(weightsOf(model), before)).toBe(0);
      // host and device memory flat from step to step once the moments exist
      live.push([memoryStats('cpu').liveBytes, memoryStats(DEV).liveBytes]);
      if (i === 0)
        bytes = {
          device: memoryStats(DEV).liveBytes - devBase,
          host: memoryStats('cpu').liveBytes - hostBase,
        };
      if (i === o.restoreAfter) {
        // a copy on the model's device: what a checkpoint read there gives
        const sd = opt.stateDict();
        const copy = (t: Tensor) => (t.device === DEV ? t.clone() : t.to(DEV));
        saved = {
          ...sd,
          masters: sd.masters.map(copy),
          optimizer: sd.optimizer && {
            ...sd.optimizer,
            state: Object.fromEntries(
              Object.entries(sd.optimizer.state).map(([k, st]) => [
                k,
                Object.fromEntries(
                  Object.entries(st).map(([n, v]) => [n, v instanceof Tensor ? copy(v) : v]),
                ),
              ]),
            ),
          },
        };
        weightsAtSave = weightsOf(model);
      }
    }
    // (a saved copy of the state, made after step 2, is not part of it)
    if (o.restoreAfter === undefined) expect(live[2]).toEqual(live[1]);
    const masters = opt.masterParams.map((m) => m.device);
    if (saved) {
      const sd = saved as ReturnType<typeof opt.stateDict>;
      opt.loadStateDict(sd);
      expect(maxRelDiff(weightsOf(model), weightsAtSave)).toBe(0);
      for (const m of sd.masters) m.dispose();
      for (const st of Object.values(sd.optimizer?.state ?? {}))
        for (const v of Object.values(st)) if (v instanceof Tensor) v.dispose();
    }
    const weights = weightsOf(model);
    const n = model.numParameters();
    opt.dispose();
    ddp.dispose();
    model.dispose();
    for (const b of [...data, ...onDev]) for (const t of [b.x, b.y]) t.dispose();
    expect(memoryStats(DEV).liveBytes).toBe(devStart);
    return { weights, norms, bytes, masters, n };
  }

  it.each([
    ['DistributedOptimizer', true, 'float32'],
    ['DistributedOptimizer', true, 'bfloat16'],
    ['DataParallelOptimizer', false, 'bfloat16'],
  ] as const)(
    '%s, %s parameters: the steps of the optimizer on the device, its state on the host',
    (_, distributed, dtype) => {
      const onDevice = run({ distributed, dtype });
      const all = run({ distributed, dtype, offload: 1 });
      const half = run({ distributed, dtype, offload: 0.5 });
      expect(onDevice.masters.every((d) => d === DEV)).toBe(true);
      expect(all.masters.every((d) => d === 'cpu')).toBe(true);
      // at most half of the elements, in parameter order
      expect(half.masters).toContain('cpu');
      expect(half.masters).toContain(DEV);
      for (const r of [all, half]) {
        // the first step's norm is of the same gradients; later ones of weights equal to rounding
        expect(r.norms[0]).toBe(onDevice.norms[0]);
        r.norms.forEach((g, i) => {
          expect(Math.abs(g - onDevice.norms[i]) / onDevice.norms[i]).toBeLessThan(1e-6);
        });
        // the host's AdamW and the device's: the same operations, fp32 rounding apart
        expect(maxRelDiff(r.weights, onDevice.weights)).toBeLessThan(1e-6);
      }
      // the device keeps the parameters and gradients: the masters (bf16) and moments moved
      const n = onDevice.n;
      const state = (dtype === 'bfloat16' ? 12 : 8) * n;
      expect(onDevice.bytes.device - all.bytes.device).toBeGreaterThanOrEqual(state);
      expect(onDevice.bytes.device - all.bytes.device).toBeLessThan(state * 1.05);
      expect(all.bytes.host - onDevice.bytes.host).toBeGreaterThanOrEqual(state);
      const saved = onDevice.bytes.device - half.bytes.device;
      expect(saved).toBeGreaterThan(0.2 * state);
      expect(saved).toBeLessThan(0.55 * state);
    },
  );

  it('a NaN gradient skips the step on the host too; loadStateDict takes state read on the device', () => {
    const clean = run({ distributed: true, dtype: 'bfloat16', offload: 1 });
    const skipped = run({ distributed: true, dtype: 'bfloat16', offload: 1, nanAt: 1 });
    expect(Number.isNaN(skipped.norms[1])).toBe(true);
    expect(maxRelDiff(skipped.weights, clean.weights)).toBeGreaterThan(0);
    const restored = run({ distributed: true, dtype: 'bfloat16', offload: 0.5, restoreAfter: 1 });
    expect(restored.masters).toContain('cpu');
  });

  it('refuses a fraction outside 0 to 1', () => {
    const model = new MLP(DIMS, 1);
    const ddp = new DistributedDataParallel(model, {
      dataParallelGroup: new LocalGroup(),
      useDistributedOptimizer: true,
    });
    expect(
      () =>
        new DistributedOptimizer(ddp, {
          ...optOptions,
          optimizerCpuOffload: true,
          optimizerOffloadFraction: 1.5,
        }),
    ).toThrow(/^DistributedOptimizer: optimizerOffloadFraction must be from 0 to 1, got 1.5$/);
    ddp.dispose();
    model.dispose();
  });
});

describe('getGradNorm / clipGradByTotalNorm', () => {
  function withGrads(): Tensor[] {
    const f = (d: number[] | number[][]) => tensor(d, { dtype: 'float32' });
    const ps = [
      f([1, 2, 3]).requiresGrad_(true),
      f([[4, -5]]).requiresGrad_(true),
      f([0.5]).requiresGrad_(true),
    ];
    ps[0].grad = f([3, 0, -4]);
    ps[1].grad = f([[1, -2]]);
    ps[2].mainGrad = f([2]);
    return ps;
  }
  const free = (ps: Tensor[]) => {
    for (const p of ps) {
      p.mainGrad?.dispose();
      p.dispose();
    }
  };

  it('matches getTotalNorm, reading mainGrad when set', () => {
    const ps = withGrads();
    const grads = [ps[0].grad!, ps[1].grad!, ps[2].mainGrad!];
    expect(getGradNorm(ps)).toBeCloseTo(getTotalNorm(grads), 6);
    expect(getGradNorm(ps, { normType: Number.POSITIVE_INFINITY })).toBe(4);
    expect(getGradNorm(ps, { normType: 1 })).toBeCloseTo(12, 5);
    expect(getGradNorm([])).toBe(0);
    free(ps);
  });

  it('counts parameters replicated across TP only on TP rank 0', () => {
    const ps = withGrads();
    setTensorModelParallelAttributes(ps[1], true, 0);
    // on TP rank 1 only the split parameter counts
    expect(getGradNorm(ps, { tpRank: 1 })).toBeCloseTo(Math.sqrt(5), 6);
    expect(getGradNorm(ps, { tpRank: 0 })).toBeCloseTo(Math.sqrt(34), 6);
    free(ps);
  });

  it('reduces over the groups it is given (SUM of squares, MAX for inf)', () => {
    const ps = withGrads();
    const dp = new LocalGroup();
    const mp = new LocalGroup();
    getGradNorm(ps, { dataParallelGroup: dp, modelParallelGroup: mp });
    getGradNorm(ps, { dataParallelGroup: dp, normType: Number.POSITIVE_INFINITY });
    // size-1 groups have nothing to reduce: no op issued
    expect(dp.ops.length + mp.ops.length).toBe(0);
    free(ps);
  });

  it('gives NaN / inf for non-finite gradients', () => {
    const ps = withGrads();
    noGrad(() => ps[1].grad!.fill_(Number.NaN));
    expect(getGradNorm(ps)).toBeNaN();
    // the max norm turns NaN into inf so that a MAX reduction cannot drop it
    expect(getGradNorm(ps, { normType: Number.POSITIVE_INFINITY })).toBe(Number.POSITIVE_INFINITY);
    free(ps);
  });

  it('clipGradByTotalNorm scales every gradient by maxNorm / (total + 1e-6), only when below 1', () => {
    const ps = withGrads();
    const before = [vals(ps[0].grad), vals(ps[1].grad), vals(ps[2].mainGrad)];
    const total = getGradNorm(ps);
    clipGradByTotalNorm(ps, 1, total);
    const coef = 1 / (total + 1e-6);
    [vals(ps[0].grad), vals(ps[1].grad), vals(ps[2].mainGrad)].forEach((g, k) => {
      g.forEach((v, i) => {
        expect(v).toBeCloseTo(before[k][i] * coef, 6);
      });
    });
    expect(getGradNorm(ps)).toBeCloseTo(1, 5);
    const clipped = vals(ps[1].grad);
    clipGradByTotalNorm(ps, 100, 1);
    expect(vals(ps[1].grad)).toEqual(clipped);
    free(ps);
  });
});
