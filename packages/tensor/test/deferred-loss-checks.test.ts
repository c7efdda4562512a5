// The loss kernels (crossEntropy, nllLoss) and the optimizer kernels (normPowerSum,
// unscaleCheck) answer in device tensors instead of host numbers, so that an asynchronous
// backend is only waited for when a value is read: the CPU still throws a bad target from the op
// (and its results are those of the host-number version, bit for bit where the arithmetic is the
// same), while an asynchronous reference device ('aref') queues the check until the next read
// and gives the CPU's results. Last, the host reads of a training step are counted.
import { afterEach, describe, expect, it } from 'vitest';
import {
  type Backend,
  type CrossEntropyOptions,
  crossEntropy,
  type DType,
  DynamicGradScaler,
  Generator,
  getBackend,
  getTotalNorm,
  getTotalNormTensor,
  type LossReduction,
  MixedPrecisionOptimizer,
  memoryStats,
  type NllLossOptions,
  nllLoss,
  pendingChecks,
  randn,
  synchronize,
  type Tensor,
  TensorError,
  tensor,
  tidy,
} from '../src/index.js';
import { registerReferenceBackend } from '../src/reference.js';

registerReferenceBackend({ type: 'aref', asynchronous: true });
const AREF = 'aref:0';

afterEach(() => {
  // a failed test must not leave a check that the next one would throw
  try {
    synchronize();
  } catch {}
});

const nums = (t: Tensor): number[] => Array.from(t.toTypedArray() as ArrayLike<number | bigint>, Number);

type Loss = 'crossEntropy' | 'nllLoss';
const lossFn = (name: Loss, x: Tensor, t: Tensor, o: CrossEntropyOptions): Tensor =>
  name === 'crossEntropy' ? crossEntropy(x, t, o) : nllLoss(x, t, o as NllLossOptions);

const message = (op: Loss, value: number, classes: number, ignoreIndex = -100): string =>
  `${op}: target ${value} is out of range for ${classes} classes (expected 0 <= target < ${classes}, or ignoreIndex ${ignoreIndex})`;

function expectIndexError(fn: () => unknown, msg: string): void {
  let err: unknown = null;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(TensorError);
  expect((err as TensorError).code).toBe('INDEX_OUT_OF_RANGE');
  expect((err as TensorError).message).toBe(msg);
}

// ---- (a) the CPU ---------------------------------------------------------------------------------

describe('on the CPU (synchronous)', () => {
  it('a bad target throws from the op with the message of the host-number version and leaks nothing', () => {
    const x = randn([4, 5], { generator: new Generator(1) }).requiresGrad_();
    const xd = randn([4, 5], { generator: new Generator(2), dtype: 'float64' });
    for (const op of ['crossEntropy', 'nllLoss'] as const) {
      for (const bad of [5, -1, 17]) {
        const t = tensor([0, -100, bad, 7], { dtype: 'int64' });
        const t32 = tensor([bad, 1, 2, 3], { dtype: 'int32' });
        const tIgnore3 = tensor([0, 3, bad, -100], { dtype: 'int64' });
        const live = memoryStats('cpu').liveStorages;
        for (const reduction of ['mean', 'sum', 'none'] as LossReduction[]) {
          // the first bad row is reported: 7 comes after `bad`
          expectIndexError(() => lossFn(op, x, t, { reduction }), message(op, bad, 5));
          expectIndexError(() => lossFn(op, xd, t32, { reduction }), message(op, bad, 5));
          expectIndexError(
            () => lossFn(op, x, tIgnore3, { reduction, ignoreIndex: 3 }),
            message(op, bad, 5, 3),
          );
        }
        expect(memoryStats('cpu').liveStorages).toBe(live);
        expect(pendingChecks('cpu')).toBe(0);
        for (const v of [t, t32, tIgnore3]) v.dispose();
      }
    }
    expect(x.grad).toBeNull();
    x.dispose();
    xd.dispose();
  });

  // The reduced losses against the 'none' row losses, with the arithmetic of the host-number
  // version: total = the row losses added in double in row order (one chunk for a few rows),
  // 'sum' = total and 'mean' = total / count rounded once to the dtype. The gradient of 'mean'
  // was the kernel's with scale 1 / count: the same as 'none' with every row's upstream gradient
  // g * (1 / count) formed in the compute type, so the two must agree bit for bit.
  for (const op of ['crossEntropy', 'nllLoss'] as const) {
    for (const dtype of ['float32', 'float64'] as DType[]) {
      it(`${op} ${dtype}: 'mean' / 'sum' and their gradients equal the host-number arithmetic`, () =>
        tidy(() => {
          const gen = new Generator(dtype === 'float64' ? 7 : 8);
          const data = randn([7, 6], { generator: gen, std: 2, dtype });
          const t = tensor([2, -100, 5, 0, -100, 1, 3], { dtype: 'int64' });
          const valid = [true, false, true, true, false, true, true];
          const count = 5;
          const o = op === 'crossEntropy' ? { labelSmoothing: 0.1 } : {};
          const round = dtype === 'float32' ? Math.fround : (v: number) => v;
          const run = (reduction: LossReduction, g: Tensor) => {
            const x = data.clone().requiresGrad_();
            const l = lossFn(op, x, t, { ...o, reduction });
            l.backward(g);
            return { loss: nums(l), grad: nums(x.grad!) };
          };
          const gOut = 0.7;
          const g0 = tensor(gOut, { dtype });
          const none = run('none', tensor(new Array(7).fill(gOut), { dtype }));
          const total = none.loss.reduce((a, v) => a + v, 0);
          const sum = run('sum', g0);
          expect(sum.loss[0]).toBe(round(total));
          expect(sum.grad).toEqual(none.grad);
          const mean = run('mean', g0);
          expect(mean.loss[0]).toBe(round(total / count));
          const gs = round(round(gOut) * round(1 / count));
          const perRow = run(
            'none',
            tensor(
              valid.map(() => gs),
              { dtype },
            ),
          );
          expect(mean.grad).toEqual(perRow.grad);
        }));
    }
  }

  it("'mean' over ignored targets only: NaN and a zero gradient, as before", () =>
    tidy(() => {
      const x = randn([3, 4], { generator: new Generator(3) }).requiresGrad_();
      const t = tensor([-100, -100, -100]);
      const l = crossEntropy(x, t);
      expect(Number.isNaN(l.item())).toBe(true);
      l.backward();
      expect(nums(x.grad!)).toEqual(new Array(12).fill(0));
    }));
});

// ---- (b) an asynchronous device ----------------------------------------------------------------

describe('on an asynchronous device (aref)', () => {
  it('a bad target returns, queues one check, and the next host read throws the message', () => {
    for (const op of ['crossEntropy', 'nllLoss'] as const) {
      const live = memoryStats(AREF).liveStorages;
      const x = randn([4, 5], { generator: new Generator(4), device: AREF }).requiresGrad_();
      const t = tensor([0, 3, 9, -3], { dtype: 'int64', device: AREF });
      const l = lossFn(op, x, t, {});
      expect(pendingChecks(AREF)).toBe(1);
      expectIndexError(() => l.item(), message(op, 9, 5));
      expect(pendingChecks(AREF)).toBe(0);
      // the queue is empty now: reads work again
      expect(nums(t)).toEqual([0, 3, 9, -3]);
      for (const v of [l, x, t]) v.dispose();
      expect(memoryStats(AREF).liveStorages).toBe(live);
    }
  });

  it('an unrelated read on the device throws it too, and synchronize() does', () => {
    const x = randn([3, 5], { generator: new Generator(5), device: AREF });
    const t = tensor([1, -100, 5], { dtype: 'int32', device: AREF });
    const l = crossEntropy(x, t, { reduction: 'none' });
    const other = tensor([1, 2], { device: AREF });
    expectIndexError(() => other.toTypedArray(), message('crossEntropy', 5, 5));
    nllLoss(x, t, { reduction: 'sum' }).dispose();
    expectIndexError(() => synchronize(AREF), message('nllLoss', 5, 5));
    for (const v of [x, t, l, other]) v.dispose();
  });

  /** Runs fn on the CPU and on aref; returns both results as host arrays. */
  function both(fn: (device: string) => Tensor[]): { cpu: number[][]; aref: number[][] } {
    const go = (device: string) => tidy(() => fn(device).map((r) => nums(r.to('cpu'))));
    return { cpu: go('cpu'), aref: go(AREF) };
  }

  function expectClose(a: number[][], b: number[][], rtol: number, atol: number): void {
    expect(a.length).toBe(b.length);
    a.forEach((row, i) => {
      expect(row.length).toBe(b[i].length);
      row.forEach((v, j) => {
        if (Number.isNaN(b[i][j])) expect(v).toBeNaN();
        else
          expect(Math.abs(v - b[i][j]), `output ${i} element ${j}: ${v} vs ${b[i][j]}`).toBeLessThanOrEqual(
            atol + rtol * Math.abs(b[i][j]),
          );
      });
    });
  }

  it('crossEntropy and nllLoss (every reduction, with gradients) give the CPU results', () => {
    for (const dtype of ['float32', 'float64'] as DType[]) {
      const data = randn([3, 6, 4], { generator: new Generator(6), std: 2, dtype });
      const tgt = tensor(
        [
          [0, 5, -100, 2],
          [1, 1, 3, -100],
          [4, 0, 2, 5],
        ],
        { dtype: 'int64' },
      );
      const res = both((device) => {
        const out: Tensor[] = [];
        for (const reduction of ['mean', 'sum', 'none'] as LossReduction[]) {
          const x = data.to(device).clone().requiresGrad_();
          const t = tgt.to(device);
          const ce = crossEntropy(x, t, { reduction, labelSmoothing: 0.05 });
          const nl = nllLoss(x.logSoftmax(1), t, { reduction });
          ce.sum().add(nl.sum().mul(0.5)).backward();
          out.push(ce, nl, x.grad!.clone());
        }
        return out;
      });
      if (dtype === 'float64') expectClose(res.aref, res.cpu, 1e-12, 1e-14);
      else expectClose(res.aref, res.cpu, 1e-5, 1e-6);
      data.dispose();
      tgt.dispose();
    }
  });

  it('getTotalNormTensor gives the CPU norms as a float64 scalar on the device', () => {
    const gen = new Generator(7);
    const host = [randn([5, 3], { generator: gen }), randn([33], { generator: gen, dtype: 'float64' })];
    host.push(randn([4], { generator: gen }).to('bfloat16'));
    for (const p of [2, 1, Number.POSITIVE_INFINITY, 3]) {
      const dev = host.map((t) => t.to(AREF));
      const n = getTotalNormTensor(dev, p);
      expect(n.device).toBe(AREF);
      expect(n.dtype).toBe('float64');
      expect(n.shape).toEqual([]);
      const cpu = getTotalNorm(host, p);
      expect(Math.abs(n.item() - cpu)).toBeLessThanOrEqual(1e-12 * cpu);
      for (const t of [n, ...dev]) t.dispose();
    }
    // NaN propagates, the empty list is 0
    const nan = tensor([1, Number.NaN], { device: AREF });
    expect(Number.isNaN(getTotalNorm([nan], Number.POSITIVE_INFINITY))).toBe(true);
    expect(Number.isNaN(getTotalNorm([nan], 2))).toBe(true);
    expect(getTotalNorm([], 2)).toBe(0);
    for (const t of [nan, ...host]) t.dispose();
  });

  it('a MixedPrecisionOptimizer step with a grad scaler and clipping gives the CPU results', () => {
    const run = (device: string) => {
      const gen = new Generator(8);
      const w = randn([6, 4], { generator: gen }).to('bfloat16').to(device).requiresGrad_();
      const mp = new MixedPrecisionOptimizer({ lr: 1e-2 }, [w], {
        lossScaler: new DynamicGradScaler({ initialScale: 1024, growthInterval: 2, hysteresis: 1 }),
        clipGrad: 0.5,
      });
      const steps: { skipped: boolean; gradNorm: number | null; lossScale: number; loss: number }[] = [];
      for (let s = 0; s < 5; s++) {
        tidy(() => {
          const xs = randn([8, 6], { generator: gen });
          // step 1 sees a NaN input: its gradients are not finite and the step is skipped
          const x = (s === 1 ? xs.mul(tensor([Number.NaN, 1, 1, 1, 1, 1])) : xs).to(device);
          const t = tensor([0, 1, 2, 3, 3, 2, 1, 0], { dtype: 'int64', device });
          const loss = crossEntropy(x.to('bfloat16').matmul(w).float(), t);
          mp.scaleLoss(loss).backward();
          const r = mp.step();
          steps.push({ ...r, loss: loss.item() });
        });
      }
      const master = nums(mp.masterParams[0].to('cpu'));
      mp.dispose();
      w.dispose();
      return { steps, master };
    };
    const cpu = run('cpu');
    const aref = run(AREF);
    expect(cpu.steps.map((s) => s.skipped)).toEqual([false, true, false, false, false]);
    expect(aref.steps.map((s) => [s.skipped, s.lossScale])).toEqual(
      cpu.steps.map((s) => [s.skipped, s.lossScale]),
    );
    aref.steps.forEach((s, i) => {
      const c = cpu.steps[i];
      if (c.gradNorm === null) expect(s.gradNorm).toBeNull();
      else expect(Math.abs(s.gradNorm! - c.gradNorm)).toBeLessThanOrEqual(1e-5 * c.gradNorm);
      if (!Number.isNaN(c.loss))
        expect(Math.abs(s.loss - c.loss)).toBeLessThanOrEqual(1e-5 * Math.abs(c.loss));
    });
    aref.master.forEach((v, i) => {
      expect(Math.abs(v - cpu.master[i])).toBeLessThanOrEqual(1e-5 + 1e-5 * Math.abs(cpu.master[i]));
    });
  });
});

// ---- (c) host reads --------------------------------------------------------------------------

describe('host reads on an asynchronous device', () => {
  /** Counts the aref backend's reads (every device-to-host transfer goes through read()). */
  function countReads(b: Backend): { readonly n: number; restore(): void } {
    const original = b.read;
    let n = 0;
    (b as { read: Backend['read'] }).read = (t, dst) => {
      n++;
      original.call(b, t, dst);
    };
    return {
      get n() {
        return n;
      },
      restore() {
        delete (b as { read?: Backend['read'] }).read;
      },
    };
  }

  it('crossEntropy forward and backward ("mean", valid targets) read nothing until the loss is read', () =>
    tidy(() => {
      synchronize();
      const b = getBackend(AREF);
      const x = randn([6, 5], { generator: new Generator(9), device: AREF }).requiresGrad_();
      const t = tensor([0, 4, -100, 2, 3, 1], { dtype: 'int64', device: AREF });
      const reads = countReads(b);
      try {
        const l = crossEntropy(x, t);
        l.backward();
        const nl = nllLoss(x.logSoftmax(1), t, { reduction: 'sum' });
        expect(reads.n).toBe(0);
        expect(pendingChecks(AREF)).toBe(2);
        // the first read evaluates the two queued checks (one read of each stats tensor), then
        // reads the loss itself
        expect(Number.isFinite(l.item())).toBe(true);
        expect(reads.n).toBe(3);
        expect(pendingChecks(AREF)).toBe(0);
        expect(Number.isFinite(nl.item())).toBe(true);
        expect(reads.n).toBe(4);
      } finally {
        reads.restore();
      }
    }));

  it('getTotalNorm reads once', () =>
    tidy(() => {
      synchronize();
      const gen = new Generator(10);
      const ts = [
        randn([7, 3], { generator: gen }),
        randn([40], { generator: gen }),
        randn([1], { generator: gen }),
      ];
      const dev = ts.map((t) => t.to(AREF));
      const reads = countReads(getBackend(AREF));
      try {
        for (const p of [2, Number.POSITIVE_INFINITY, 1, 3]) {
          const before = reads.n;
          const n = getTotalNorm(dev, p);
          expect(reads.n - before).toBe(1);
          expect(Math.abs(n - getTotalNorm(ts, p))).toBeLessThanOrEqual(1e-12 * n);
        }
        const before = reads.n;
        const nt = getTotalNormTensor(dev, 2);
        expect(reads.n).toBe(before);
        nt.dispose();
      } finally {
        reads.restore();
      }
    }));

  it('a MixedPrecisionOptimizer step reads twice with clipping (inf flag, norm) and once without', () => {
    synchronize();
    const gen = new Generator(11);
    const reads = countReads(getBackend(AREF));
    try {
      for (const clipGrad of [1, 0]) {
        const ws = [randn([6, 4], { generator: gen }), randn([4], { generator: gen })].map((w) =>
          w.to('bfloat16').to(AREF).requiresGrad_(),
        );
        const mp = new MixedPrecisionOptimizer({ lr: 1e-2 }, ws, {
          lossScaler: new DynamicGradScaler({ initialScale: 256 }),
          clipGrad,
        });
        for (let s = 0; s < 2; s++) {
          tidy(() => {
            const x = randn([8, 6], { generator: gen }).to('bfloat16').to(AREF);
            const t = tensor([0, 1, 2, 3, 3, 2, 1, 0], { dtype: 'int64', device: AREF });
            const loss = crossEntropy(x.matmul(ws[0]).add(ws[1]).float(), t);
            mp.scaleLoss(loss).backward();
            // a training loop logs the loss: that read also evaluates the loss's queued check
            loss.item();
            const before = reads.n;
            const r = mp.step();
            expect(r.skipped).toBe(false);
            expect(reads.n - before).toBe(clipGrad > 0 ? 2 : 1);
          });
        }
        mp.dispose();
        for (const w of ws) w.dispose();
      }
    } finally {
      reads.restore();
    }
  });
});
