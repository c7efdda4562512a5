// The compositions of src/backend/fallbacks.ts against the native CPU kernels: each kernel runs
// both ways on the same inputs (odd sizes, float32 / bfloat16 / float64, every option) and every
// output buffer and return value must agree. Then: no fallback leaks a storage, and the ops run
// end to end on a backend that only has the core and indexing kernels (so they use the fallbacks).
//
// With MEGAPATCH_KERNEL_DEVICE set (e.g. "cudaemu:0", its backend registered by a setup file such
// as packages/cuda/test/kernels-setup.ts), the same comparisons check ANOTHER device's own named
// kernels against the CPU's instead of the compositions (see "the candidate" below); the sections
// that are about the compositions themselves (memory, coverage, ops on a core-only backend) skip.
import { describe, expect, it } from 'vitest';
import { cpuBackend } from '../src/backend/cpu.js';
import { FALLBACK_KERNELS, fallbackKernel } from '../src/backend/fallbacks.js';
import { getKernel, hasNativeKernel, type KernelName, type KernelTable } from '../src/backend/kernels.js';
import { erf } from '../src/backend/reference.js';
import {
  AdamW,
  type AttentionKernelOptions,
  add,
  applyRotaryPosEmb,
  type Backend,
  crossEntropy,
  type DType,
  expand,
  type GatedActivation,
  type GemmProblem,
  gatedActivation,
  getBackend,
  getTotalNorm,
  type LinearActivation,
  layerNorm,
  linear,
  linearActivation,
  logSoftmax,
  matmul,
  memoryStats,
  nllLoss,
  registerBackendType,
  rmsNorm,
  SGD,
  scaledDotProductAttention,
  softmax,
  sum,
  Tensor,
  tensor,
  tidy,
  transpose,
  unsqueeze,
  zeros,
} from '../src/index.js';
import { combinePowerSums } from '../src/optim/kernels.js';
import { mulberry32 } from './fixtures.js';

const NINF = Number.NEGATIVE_INFINITY;
const INF = Number.POSITIVE_INFINITY;

/** The kernels that src/backend/fallbacks.ts must compose. */
const COMPOSED: KernelName[] = [
  'softmax',
  'softmaxBackward',
  'crossEntropy',
  'crossEntropyBackward',
  'nllLoss',
  'nllLossBackward',
  'crossEntropyShardMax',
  'crossEntropyShard',
  'crossEntropyShardBackward',
  'normRows',
  'normRowsBackward',
  'ropeApply',
  'gatedActivation',
  'gatedActivationBackward',
  'attentionForward',
  'attentionBackward',
  'adamwStep',
  'adamwStepMulti',
  'sgdStep',
  'normPowerSum',
  'unscaleCheck',
];

/** Compositions of kernels that only devices provide (no native CPU kernel to compare them with). */
const DEVICE_ONLY: KernelName[] = [
  'accumulateGrad',
  'linearBias',
  'linearBiasActivation',
  'linearWeightBiasGrad',
  'linearWeightGradAccumulate',
  'linearResidual',
  'groupedGemm',
  'crossEntropyShardMaxStats',
  'normPowerSumMulti',
];

function nativeKernel<K extends KernelName>(name: K): KernelTable[K] {
  const k = cpuBackend.kernel(name);
  if (!k) throw new Error(`no native CPU kernel ${name}`);
  return k;
}

// ---- the candidate: the compositions, or another device's own kernels ------------------------

/** The device whose named kernels are compared with the CPU's (unset: the compositions are). */
const KERNEL_DEVICE = process.env.MEGAPATCH_KERNEL_DEVICE || undefined;
/** Who the candidate is, in failure messages ("fallback" as before when no device is set). */
const CANDIDATE = KERNEL_DEVICE ? `device ${KERNEL_DEVICE}` : 'fallback';

/**
 * A copy on `device` of a CPU tensor with the same layout (strides, broadcast dimensions), so that
 * the device kernel gets the strided and expanded operands the CPU kernel gets: the storage span
 * the view reaches goes over with `.to(device)` and the view is rebuilt on it. `back()` copies that
 * span back into the CPU tensor's storage (a kernel writes into its outputs; inputs come back
 * unchanged) and disposes the copies.
 */
function deviceCopy(t: Tensor, device: string): { dev: Tensor; back: () => void } {
  // from element 0 of the view to the last element it reaches (strides are never negative)
  const span = t.numel === 0 ? 0 : 1 + t.shape.reduce((a, n, i) => a + (n - 1) * t.strides[i], 0);
  const hostSpan = t.viewAs([span], [1], t.offset);
  const devSpan = hostSpan.to(device);
  const dev = devSpan.viewAs(t.shape, t.strides, 0);
  return {
    dev,
    back: () => {
      const home = devSpan.to('cpu');
      hostSpan.copy_(home);
      for (const x of [home, dev, devSpan, hostSpan]) x.dispose();
    },
  };
}

/**
 * A device kernel called with CPU arguments: every Tensor argument, and every Tensor field of an
 * option object (AttentionKernelOptions' mask and cuSeqlens), is copied to `device` first; after
 * the call every copy goes back into its CPU tensor and is disposed.
 */
function onDevice<F>(kernel: F, device: string): F {
  return ((...args: unknown[]) => {
    const copies = new Map<Tensor, { dev: Tensor; back: () => void }>();
    const move = (a: unknown): unknown => {
      if (a instanceof Tensor) {
        let c = copies.get(a);
        if (!c) {
          c = deviceCopy(a, device);
          copies.set(a, c);
        }
        return c.dev;
      }
      // arrays and plain objects (groupedGemm's problems and their operands) are moved field by field
      if (Array.isArray(a)) return a.map(move);
      if (a !== null && typeof a === 'object' && Object.getPrototypeOf(a) === Object.prototype)
        return Object.fromEntries(Object.entries(a).map(([k, v]) => [k, move(v)]));
      return a;
    };
    const moved = args.map(move);
    try {
      return (kernel as (...a: unknown[]) => unknown)(...moved);
    } finally {
      for (const c of copies.values()) c.back();
    }
  }) as F;
}

/** The kernels of KERNEL_DEVICE that it lacks, among `names` (none without a device). */
function lacking(names: KernelName[]): KernelName[] {
  if (!KERNEL_DEVICE) return [];
  const backend = getBackend(KERNEL_DEVICE);
  return names.filter((n) => !backend.kernel(n));
}

/**
 * The kernel compared with the native CPU kernel: the composition, or the device's own kernel (on
 * device copies of its arguments). The *F variables of the tests below hold its results.
 */
function candidateKernel<K extends KernelName>(name: K): KernelTable[K] {
  if (!KERNEL_DEVICE) return fallbackKernel(name);
  const k = getBackend(KERNEL_DEVICE).kernel(name);
  if (!k) throw new Error(`${KERNEL_DEVICE} has no kernel ${name}`);
  return onDevice(k, KERNEL_DEVICE);
}

/** `describe` for the sections about the compositions themselves: skipped with a device. */
const describeFallbacks = describe.skipIf(KERNEL_DEVICE !== undefined);

/**
 * `it` for the comparisons of the kernels `names`: plain `it` without a device; skipped, saying so
 * in its title, when the device under test lacks one of them. Each comparison describe below
 * shadows `it` with it.
 */
function itWith(...names: KernelName[]) {
  const missing = lacking(names);
  return (title: string, fn: () => unknown) =>
    it.skipIf(missing.length > 0)(
      missing.length > 0 ? `${title} [skipped: ${KERNEL_DEVICE} has no ${missing.join(', ')}]` : title,
      fn,
    );
}

// ---- deterministic inputs -----------------------------------------------------------------------

/** A small seeded generator (mulberry32) with normal samples, so that inputs do not depend on Philox. */
function rng(seed: number) {
  const uniform = mulberry32(seed);
  const normal = (): number => {
    const u = Math.max(uniform(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * uniform());
  };
  return { uniform, normal, int: (lo: number, hi: number) => lo + Math.floor(uniform() * (hi - lo)) };
}

type Rng = ReturnType<typeof rng>;

const numel = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/** A tensor of `dtype` from values f(i) (computed in double, rounded once to the dtype). */
function make(shape: readonly number[], dtype: DType, f: (i: number) => number): Tensor {
  const vals = new Float64Array(numel(shape));
  for (let i = 0; i < vals.length; i++) vals[i] = f(i);
  return tensor(vals, { shape: [...shape], dtype });
}

const randnT = (r: Rng, shape: readonly number[], dtype: DType, scale = 1, shift = 0): Tensor =>
  make(shape, dtype, () => shift + scale * r.normal());

/** Output buffers start with the same sentinel, so "left unwritten" compares equal too. */
const sentinel = (shape: readonly number[], dtype: DType): Tensor => make(shape, dtype, () => 7.25);

const clone = (t: Tensor): Tensor => t.clone();

// ---- comparisons --------------------------------------------------------------------------------

interface Tol {
  rtol?: number;
  atol?: number;
  /** bf16 / fp16: allowed difference in units in the last place of the larger value. */
  ulps?: number;
}

const values = (t: Tensor): number[] => Array.from(t.toTypedArray() as ArrayLike<number | bigint>, Number);

/** One unit in the last place of |v| for a 16-bit float dtype (normal range). */
function ulp16(v: number, dtype: DType): number {
  const mant = dtype === 'bfloat16' ? 7 : 10;
  const minExp = dtype === 'bfloat16' ? -126 : -14;
  const e = v === 0 ? minExp : Math.max(minExp, Math.floor(Math.log2(Math.abs(v))));
  return 2 ** (e - mant);
}

function expectSame(actual: Tensor, expected: Tensor, label: string, tol: Tol = {}): void {
  expect(actual.shape, `${label} shape`).toEqual(expected.shape);
  expect(actual.dtype, `${label} dtype`).toBe(expected.dtype);
  const a = values(actual);
  const e = values(expected);
  const d = expected.dtype;
  const half = d === 'bfloat16' || d === 'float16';
  const rtol = tol.rtol ?? (d === 'float64' ? 1e-10 : 1e-5);
  const atol = tol.atol ?? (d === 'float64' ? 1e-12 : half ? 1e-5 : 1e-6);
  const ulps = tol.ulps ?? 2;
  for (let i = 0; i < e.length; i++) {
    const x = a[i];
    const y = e[i];
    let ok: boolean;
    if (Number.isNaN(y) || Number.isNaN(x)) ok = Number.isNaN(x) && Number.isNaN(y);
    else if (!Number.isFinite(y) || !Number.isFinite(x)) ok = x === y;
    else if (half) ok = Math.abs(x - y) <= ulps * ulp16(Math.max(Math.abs(x), Math.abs(y)), d) + atol;
    else ok = Math.abs(x - y) <= atol + rtol * Math.abs(y);
    if (!ok) expect.fail(`${label} element ${i}: ${CANDIDATE} ${x}, native ${y} (${d})`);
  }
}

function expectSameNumber(actual: number, expected: number, label: string, rtol = 1e-6): void {
  if (Number.isNaN(expected)) {
    expect(actual, label).toBeNaN();
    return;
  }
  if (!Number.isFinite(expected)) {
    expect(actual, label).toBe(expected);
    return;
  }
  expect(
    Math.abs(actual - expected),
    `${label}: ${CANDIDATE} ${actual}, native ${expected}`,
  ).toBeLessThanOrEqual(rtol * Math.max(Math.abs(expected), 1e-30));
}

// ---- softmax ----------------------------------------------------------------------------------

const FLOATS: DType[] = ['float32', 'bfloat16', 'float64'];
const WIDTHS = [1, 7, 33];

/** Rows of n logits: random, fully -inf (masked), one -inf entry, large values. */
function logits(r: Rng, shape: readonly number[], dtype: DType): Tensor {
  const n = shape[shape.length - 1];
  return make(shape, dtype, (i) => {
    const row = Math.floor(i / n) % 4;
    const j = i % n;
    if (row === 1) return NINF;
    if (row === 2 && j === 0) return NINF;
    if (row === 3) return 60 + 4 * r.normal();
    return 3 * r.normal();
  });
}

describe('softmax / softmaxBackward', () => {
  // skipped where the device under test lacks these kernels (see itWith)
  const it = itWith('softmax', 'softmaxBackward');
  for (const dtype of FLOATS) {
    for (const n of WIDTHS) {
      for (const logOut of [false, true]) {
        it(`${dtype}, rows of ${n}, ${logOut ? 'log-softmax' : 'softmax'}`, () =>
          tidy(() => {
            const r = rng(n * 7 + (logOut ? 1 : 0));
            const x = logits(r, [2, 4, n], dtype);
            const yN = sentinel(x.shape, dtype);
            const yF = sentinel(x.shape, dtype);
            nativeKernel('softmax')(yN, x, logOut);
            candidateKernel('softmax')(yF, x, logOut);
            expectSame(yF, yN, 'y');

            const g = randnT(r, x.shape, dtype);
            const dxN = sentinel(x.shape, dtype);
            const dxF = sentinel(x.shape, dtype);
            nativeKernel('softmaxBackward')(dxN, yN, g, logOut);
            candidateKernel('softmaxBackward')(dxF, yN, g, logOut);
            expectSame(dxF, dxN, 'dx');
          }));
      }
    }
  }
});

// ---- cross-entropy / NLL ------------------------------------------------------------------------

interface LossCase {
  dtype: DType;
  classes: number;
  targetDtype: 'int32' | 'int64';
  ignoreIndex: number;
  smoothing: number;
  withLoss: boolean;
}

const ROWS = 6;

/** Targets of ROWS rows: random classes, with rows 1 and 4 set to ignoreIndex. */
function targets(r: Rng, c: LossCase, badRow = -1): Tensor {
  const vals = new Float64Array(ROWS);
  for (let i = 0; i < ROWS; i++) vals[i] = r.int(0, c.classes);
  vals[1] = c.ignoreIndex;
  vals[4] = c.ignoreIndex;
  if (badRow >= 0) vals[badRow] = c.classes;
  return tensor(vals, { shape: [2, ROWS / 2], dtype: c.targetDtype });
}

function lossCases(): LossCase[] {
  const out: LossCase[] = [];
  for (const dtype of FLOATS)
    for (const classes of WIDTHS)
      for (const smoothing of [0, 0.1])
        out.push({
          dtype,
          classes,
          targetDtype: classes === 7 ? 'int32' : 'int64',
          ignoreIndex: classes === 33 ? 0 : -100,
          smoothing,
          withLoss: smoothing === 0 || dtype !== 'float64',
        });
  return out;
}

const caseName = (c: LossCase): string =>
  `${c.dtype}, ${c.classes} classes, ${c.targetDtype} targets, ignoreIndex ${c.ignoreIndex}, smoothing ${c.smoothing}${c.withLoss ? '' : ', no row losses'}`;

/** The loss stats a kernel wrote (LOSS_STATS order), read back on the host. */
interface Stats {
  count: number;
  total: number;
  badRow: number;
  badValue: number;
}

/** Runs a loss kernel on a fresh float64 [4] stats operand (sentinel-filled) and reads it back. */
function lossStats(run: (stats: Tensor) => void): Stats {
  const st = sentinel([4], 'float64');
  run(st);
  const [count, total, badRow, badValue] = values(st);
  st.dispose();
  return { count, total, badRow, badValue };
}

/**
 * Loss statistics: count, bad row and bad value exactly, the total within 1e-6 relative. A total
 * near 0 is rounding noise of cancelling row losses (one class with label smoothing), so the
 * tolerance has a floor at the scale of the terms that cancelled: `scale` (the sum of |lse| over
 * the rows).
 */
function expectSameStats(f: Stats, n: Stats, dtype: DType, scale = 0): void {
  expect(f.count).toBe(n.count);
  expect(f.badRow).toBe(n.badRow);
  expect(f.badValue).toBe(n.badValue);
  const floor = scale * (dtype === 'float64' ? 1e-13 : 1e-6);
  if (Math.abs(f.total - n.total) <= floor) return;
  expectSameNumber(f.total, n.total, 'total');
}

const absSum = (t: Tensor): number => values(t).reduce((a, v) => a + Math.abs(v), 0);

describe('crossEntropy / crossEntropyBackward', () => {
  const it = itWith('crossEntropy', 'crossEntropyBackward');
  const itF = itWith('crossEntropy'); // the tests of the forward only
  for (const c of lossCases()) {
    it(caseName(c), () =>
      tidy(() => {
        const r = rng(c.classes * 31 + c.smoothing * 100 + c.dtype.length);
        const x = randnT(r, [2, ROWS / 2, c.classes], c.dtype, 2);
        const t = targets(r, c);
        const lseDtype = c.dtype === 'float64' ? 'float64' : 'float32';
        const lseN = sentinel([ROWS], lseDtype);
        const lseF = sentinel([ROWS], lseDtype);
        const lossN = c.withLoss ? sentinel([2, ROWS / 2], c.dtype) : null;
        const lossF = c.withLoss ? sentinel([2, ROWS / 2], c.dtype) : null;
        const sN = lossStats((st) =>
          nativeKernel('crossEntropy')(x, t, lseN, lossN, c.ignoreIndex, c.smoothing, st),
        );
        const sF = lossStats((st) =>
          candidateKernel('crossEntropy')(x, t, lseF, lossF, c.ignoreIndex, c.smoothing, st),
        );
        expect(sN.badRow).toBe(-1);
        expect(sN.badValue).toBe(0);
        expectSameStats(sF, sN, c.dtype, absSum(lseN));
        expectSame(lseF, lseN, 'lse');
        if (lossF && lossN) expectSame(lossF, lossN, 'loss');

        for (const perRow of [true, false]) {
          const gout = perRow ? randnT(r, [2, ROWS / 2], c.dtype) : make([], c.dtype, () => 1.5);
          const scale = perRow ? 1 : 1 / sN.count;
          const dxN = sentinel(x.shape, c.dtype);
          const dxF = sentinel(x.shape, c.dtype);
          nativeKernel('crossEntropyBackward')(dxN, x, t, lseN, gout, scale, c.ignoreIndex, c.smoothing);
          candidateKernel('crossEntropyBackward')(dxF, x, t, lseN, gout, scale, c.ignoreIndex, c.smoothing);
          expectSame(dxF, dxN, perRow ? 'dx (per-row gradient)' : 'dx (reduced gradient)');
        }
      }),
    );
  }

  itF('a target out of range: same stats (count, bad row and value) and untouched outputs', () =>
    tidy(() => {
      const c = lossCases()[1];
      const r = rng(5);
      const x = randnT(r, [2, ROWS / 2, c.classes], c.dtype);
      const t = targets(r, c, 3);
      const out = () => [sentinel([ROWS], 'float32'), sentinel([2, ROWS / 2], c.dtype)];
      const [lseN, lossN] = out();
      const [lseF, lossF] = out();
      const sN = lossStats((st) => nativeKernel('crossEntropy')(x, t, lseN, lossN, c.ignoreIndex, 0, st));
      const sF = lossStats((st) => candidateKernel('crossEntropy')(x, t, lseF, lossF, c.ignoreIndex, 0, st));
      expect(sN).toEqual({ count: 2, total: 0, badRow: 3, badValue: c.classes });
      expect(sF).toEqual(sN);
      expectSame(lseF, lseN, 'lse');
      expectSame(lossF, lossN, 'loss');
    }),
  );

  itF('a single row of logits with a 0-d target', () =>
    tidy(() => {
      const r = rng(9);
      const x = randnT(r, [7], 'float32');
      const t = tensor(3);
      const lseN = sentinel([1], 'float32');
      const lseF = sentinel([1], 'float32');
      const lossN = sentinel([], 'float32');
      const lossF = sentinel([], 'float32');
      const sN = lossStats((st) => nativeKernel('crossEntropy')(x, t, lseN, lossN, -100, 0.2, st));
      const sF = lossStats((st) => candidateKernel('crossEntropy')(x, t, lseF, lossF, -100, 0.2, st));
      expectSameStats(sF, sN, 'float32', absSum(lseN));
      expectSame(lseF, lseN, 'lse');
      expectSame(lossF, lossN, 'loss');
    }),
  );
});

describe('nllLoss / nllLossBackward', () => {
  const it = itWith('nllLoss', 'nllLossBackward');
  const itF = itWith('nllLoss'); // the tests of the forward only
  for (const c of lossCases().filter((l) => l.smoothing === 0)) {
    it(caseName(c), () =>
      tidy(() => {
        const r = rng(c.classes * 13 + c.dtype.length);
        const x = randnT(r, [2, ROWS / 2, c.classes], c.dtype, 2, -1);
        const t = targets(r, c);
        const lossN = sentinel([2, ROWS / 2], c.dtype);
        const lossF = sentinel([2, ROWS / 2], c.dtype);
        const sN = lossStats((st) => nativeKernel('nllLoss')(x, t, lossN, c.ignoreIndex, st));
        const sF = lossStats((st) => candidateKernel('nllLoss')(x, t, lossF, c.ignoreIndex, st));
        expectSameStats(sF, sN, c.dtype);
        expectSame(lossF, lossN, 'loss');
        const sN2 = lossStats((st) => nativeKernel('nllLoss')(x, t, null, c.ignoreIndex, st));
        const sF2 = lossStats((st) => candidateKernel('nllLoss')(x, t, null, c.ignoreIndex, st));
        expectSameStats(sF2, sN2, c.dtype);

        for (const perRow of [true, false]) {
          const gout = perRow ? randnT(r, [2, ROWS / 2], c.dtype) : make([], c.dtype, () => 0.75);
          const scale = perRow ? 1 : 1 / sN.count;
          const dxN = sentinel(x.shape, c.dtype);
          const dxF = sentinel(x.shape, c.dtype);
          nativeKernel('nllLossBackward')(dxN, t, gout, scale, c.ignoreIndex);
          candidateKernel('nllLossBackward')(dxF, t, gout, scale, c.ignoreIndex);
          expectSame(dxF, dxN, 'dx');
        }
      }),
    );
  }

  itF('a target out of range: same stats (count, bad row and value) and untouched loss', () =>
    tidy(() => {
      const c = lossCases()[0];
      const r = rng(6);
      const x = randnT(r, [2, ROWS / 2, c.classes], c.dtype);
      for (const badRow of [0, 5]) {
        const t = targets(r, c, badRow);
        const lossN = sentinel([2, ROWS / 2], c.dtype);
        const lossF = sentinel([2, ROWS / 2], c.dtype);
        const sN = lossStats((st) => nativeKernel('nllLoss')(x, t, lossN, c.ignoreIndex, st));
        const sF = lossStats((st) => candidateKernel('nllLoss')(x, t, lossF, c.ignoreIndex, st));
        expect(sN.badRow).toBe(badRow);
        expect(sN.badValue).toBe(c.classes);
        expect(sF).toEqual(sN);
        expectSame(lossF, lossN, 'loss');
      }
    }),
  );
});

// ---- vocabulary-parallel cross-entropy shards -------------------------------------------------

interface ShardCase {
  dtype: DType;
  /** Columns of the slice (P). */
  cols: number;
  /** Real columns [0, localReal); the rest is vocabulary padding. */
  localReal: number;
  targetDtype: 'int32' | 'int64';
  smoothing: number;
}

const SHARD_ROWS = 7;
const SHARD_START = 40;

function shardCases(): ShardCase[] {
  const out: ShardCase[] = [];
  for (const dtype of FLOATS)
    for (const [cols, localReal] of [
      [1, 1],
      [7, 7],
      [33, 29],
      [9, 0],
      [1501, 1403], // a block per row on a GPU
    ])
      for (const smoothing of [0, 0.15])
        out.push({ dtype, cols, localReal, targetDtype: cols === 7 ? 'int32' : 'int64', smoothing });
  return out;
}

/**
 * Inputs of a shard kernel: logits [R, P] (a -inf entry in row 2, large logits in row 3),
 * targets on real columns, on padding columns, on other ranks (below and above) and outside the
 * vocabulary (-1), and a group maximum per row at least the row's real maximum (another rank may
 * hold a larger logit).
 */
function shardInputs(c: ShardCase, r: Rng) {
  const logits = make([SHARD_ROWS, c.cols], c.dtype, (i) => {
    const row = Math.floor(i / c.cols);
    if (row === 2 && i % c.cols === 0 && c.localReal > 1) return NINF;
    return row === 3 ? 60 + 3 * r.normal() : 2 * r.normal();
  });
  const real = c.localReal;
  const t = [
    SHARD_START + r.int(0, Math.max(real, 1)),
    SHARD_START + (real < c.cols ? real : 0),
    SHARD_START - 5,
    SHARD_START + c.cols + 2,
    -1,
    SHARD_START + real - 1,
    SHARD_START,
  ];
  const target = tensor(t, { shape: [SHARD_ROWS], dtype: c.targetDtype });
  const xv = values(logits);
  const compute = c.dtype === 'float64' ? 'float64' : 'float32';
  const rowMax = make([SHARD_ROWS], compute, (row) => {
    let m = row % 2 === 0 ? 0.75 : 0; // odd rows: the maximum is on this shard
    if (real === 0) return 1.5;
    m += Math.max(...xv.slice(row * c.cols, row * c.cols + real).filter((v) => v !== NINF));
    return m;
  });
  return { logits, target, rowMax, compute: compute as DType };
}

describe('crossEntropyShardMax / crossEntropyShard / crossEntropyShardBackward', () => {
  const it = itWith('crossEntropyShardMax', 'crossEntropyShard', 'crossEntropyShardBackward');
  for (const c of shardCases()) {
    const name = `${c.dtype}, ${c.localReal} real of ${c.cols} columns, ${c.targetDtype} targets, smoothing ${c.smoothing}`;
    it(name, () =>
      tidy(() => {
        const r = rng(c.cols * 17 + c.localReal + c.smoothing * 100 + c.dtype.length);
        const { logits, target, rowMax, compute } = shardInputs(c, r);
        const mN = sentinel([SHARD_ROWS], compute);
        const mF = sentinel([SHARD_ROWS], compute);
        nativeKernel('crossEntropyShardMax')(mN, logits, c.localReal);
        candidateKernel('crossEntropyShardMax')(mF, logits, c.localReal);
        expectSame(mF, mN, 'local max');
        if (c.localReal === 0) expect(values(mN)).toEqual(new Array(SHARD_ROWS).fill(NINF));
        const outs = () => [0, 1, 2].map(() => sentinel([SHARD_ROWS], compute));
        const [pN, eN, qN] = outs();
        const [pF, eF, qF] = outs();
        const withSum = c.smoothing > 0;
        const rest = [logits, target, rowMax, SHARD_START, c.localReal] as const;
        nativeKernel('crossEntropyShard')(pN, eN, withSum ? qN : null, ...rest);
        candidateKernel('crossEntropyShard')(pF, eF, withSum ? qF : null, ...rest);
        expectSame(pF, pN, 'predicted');
        expectSame(eF, eN, 'sumExp');
        expectSame(qF, qN, withSum ? 'shiftedSum' : 'shiftedSum (not asked for: untouched)');
        // targets off the shard, on its padding or outside the vocabulary predict exactly 0
        const p = values(pN);
        for (const row of [2, 3, 4]) expect(p[row], `predicted row ${row}`).toBe(0);
        if (c.localReal < c.cols) expect(p[1]).toBe(0);
        if (c.localReal === 0) expect(values(eN)).toEqual(new Array(SHARD_ROWS).fill(0));

        // the group's Σ exp: this shard's plus some from the others, so log Σ exp >= 0
        const others = r.uniform() + 1;
        const lse = make([SHARD_ROWS], compute, (row) => Math.log(values(eN)[row] + others));
        const g = randnT(r, [SHARD_ROWS], compute);
        const vocab = 3 * c.cols + 1;
        const dxN = sentinel(logits.shape, c.dtype);
        const dxF = sentinel(logits.shape, c.dtype);
        const args = [logits, target, rowMax, lse, g, SHARD_START, c.localReal, c.smoothing, vocab] as const;
        nativeKernel('crossEntropyShardBackward')(dxN, ...args);
        candidateKernel('crossEntropyShardBackward')(dxF, ...args);
        expectSame(dxF, dxN, 'dx');
        const dx = values(dxN);
        for (let row = 0; row < SHARD_ROWS; row++)
          for (let j = c.localReal; j < c.cols; j++) expect(dx[row * c.cols + j], 'padding gradient').toBe(0);
      }),
    );
  }

  it('the local maximum: a NaN among the real columns wins, one in the padding does not count', () =>
    tidy(() => {
      for (const dtype of FLOATS) {
        const x = make([3, 37], dtype, (i) => (i === 36 || i === 40 ? Number.NaN : (i % 37) - 20));
        const mN = sentinel([3], dtype === 'float64' ? 'float64' : 'float32');
        const mF = sentinel([3], dtype === 'float64' ? 'float64' : 'float32');
        nativeKernel('crossEntropyShardMax')(mN, x, 36);
        candidateKernel('crossEntropyShardMax')(mF, x, 36);
        expectSame(mF, mN, `${dtype} local max`);
        expect(values(mN)).toEqual([15, Number.NaN, 15]);
      }
    }));
});

describe('crossEntropyShardMaxStats (one pass) against crossEntropyShardMax then crossEntropyShard', () => {
  const it = itWith('crossEntropyShardMaxStats');
  /**
   * The native two passes and the candidate's one on the same logits: the row maximum and the
   * predicted logit exactly, the sums within their rounding (online rescaling). Returns the native
   * sumExp.
   */
  const compare = (
    logits: Tensor,
    target: Tensor,
    real: number,
    withSum: boolean,
    label: string,
    atol = 1e-4,
  ) => {
    const compute: DType = logits.dtype === 'float64' ? 'float64' : 'float32';
    const [mN, pN, eN, qN, mF, pF, eF, qF] = Array.from({ length: 8 }, () => sentinel([SHARD_ROWS], compute));
    nativeKernel('crossEntropyShardMax')(mN, logits, real);
    nativeKernel('crossEntropyShard')(pN, eN, withSum ? qN : null, logits, target, mN, SHARD_START, real);
    candidateKernel('crossEntropyShardMaxStats')(
      mF,
      pF,
      eF,
      withSum ? qF : null,
      logits,
      target,
      SHARD_START,
      real,
    );
    expect(values(mF), `${label} row max`).toEqual(values(mN));
    expect(values(pF), `${label} predicted`).toEqual(values(pN));
    expectSame(eF, eN, `${label} sumExp`);
    expectSame(qF, qN, withSum ? `${label} shiftedSum` : `${label} shiftedSum (not asked for: untouched)`, {
      rtol: 1e-5,
      atol,
    });
    return eN;
  };
  for (const c of shardCases()) {
    const withSum = c.smoothing > 0;
    it(`${c.dtype}, ${c.localReal} real of ${c.cols} columns, ${c.targetDtype} targets${withSum ? ', shifted sum' : ''}`, () =>
      tidy(() => {
        const r = rng(c.cols * 31 + c.localReal + c.smoothing * 100 + c.dtype.length);
        const { logits, target } = shardInputs(c, r);
        compare(logits, target, c.localReal, withSum, c.dtype);
      }));
  }

  it('rows longer than a warp takes (a block a row on a device), large logits', () =>
    tidy(() => {
      for (const dtype of FLOATS) {
        const cols = 1600;
        const r = rng(cols + dtype.length);
        const logits = make(
          [SHARD_ROWS, cols],
          dtype,
          (i) => (Math.floor(i / cols) === 3 ? 50 : 0) + 3 * r.normal(),
        );
        const target = tensor([40, 41, 1500, 1570, 39, 1000, 41 + 1530], {
          shape: [SHARD_ROWS],
          dtype: 'int32',
        });
        compare(logits, target, 1531, true, dtype, 2e-2);
      }
    }));

  it('rows with a NaN, a +inf, only -inf, or one large logit among small ones: the two-pass values', () =>
    tidy(() => {
      for (const dtype of FLOATS) {
        const cols = 37;
        const rowsOf: ((j: number) => number)[] = [
          (j) => (j === 5 ? Number.NaN : j - 20), // a NaN wins the maximum: NaN statistics
          (j) => (j === 7 ? INF : j - 20), // +inf: the maximum, NaN statistics
          () => NINF, // every real logit -inf
          (j) => (j === 30 ? 80 : j % 3), // the maximum late in the row: rescaled sums
          (j) => (j === 36 ? Number.NaN : j / 7), // a NaN in the padding only: not seen
          (j) => (j === 0 ? 90 : -j), // the maximum first
          (j) => j * 0.5,
        ];
        const logits = make([SHARD_ROWS, cols], dtype, (i) => rowsOf[Math.floor(i / cols)](i % cols));
        const target = tensor([40, 41, 42, 43, 44, 45, 46], { shape: [SHARD_ROWS], dtype: 'int64' });
        const eN = compare(logits, target, 36, true, dtype);
        expect(Number.isNaN(values(eN)[0]) && Number.isNaN(values(eN)[1]), 'NaN rows').toBe(true);
      }
    }));
});

describeFallbacks('crossEntropyShardMax / crossEntropyShard / crossEntropyShardBackward compositions', () => {
  it('free every temporary', () =>
    tidy(() => {
      const c = shardCases()[5];
      const { logits, target, rowMax, compute } = shardInputs(c, rng(3));
      const [p, e, q, lse, g] = [0, 1, 2, 3, 4].map(() => sentinel([SHARD_ROWS], compute));
      const dx = sentinel(logits.shape, c.dtype);
      const before = memoryStats('cpu').liveStorages;
      fallbackKernel('crossEntropyShardMax')(p, logits, c.localReal);
      fallbackKernel('crossEntropyShardMax')(p, logits, 0);
      fallbackKernel('crossEntropyShard')(p, e, q, logits, target, rowMax, SHARD_START, c.localReal);
      fallbackKernel('crossEntropyShardMaxStats')(lse, p, e, q, logits, target, SHARD_START, c.localReal);
      fallbackKernel('crossEntropyShardBackward')(dx, logits, target, rowMax, lse, g, SHARD_START, 0, 0.1, 9);
      expect(memoryStats('cpu').liveStorages).toBe(before);
    }));
});

// ---- LayerNorm / RMSNorm ------------------------------------------------------------------------

describe('normRows / normRowsBackward', () => {
  const it = itWith('normRows', 'normRowsBackward');
  const params: { w: boolean; b: boolean; center: boolean; mean: boolean }[] = [
    { w: false, b: false, center: true, mean: true },
    { w: true, b: false, center: true, mean: true },
    { w: true, b: true, center: true, mean: true },
    { w: false, b: true, center: true, mean: true },
    { w: false, b: false, center: false, mean: false },
    { w: true, b: false, center: false, mean: false },
    // RMSNorm given a mean buffer: the kernel writes 0 there and subtracts it in the backward
    { w: true, b: false, center: false, mean: true },
  ];
  const shapes: { x: number[]; norm: number[] }[] = [
    { x: [1, 1], norm: [1] },
    { x: [5, 7], norm: [7] },
    { x: [3, 33], norm: [33] },
    { x: [2, 3, 4, 5], norm: [4, 5] },
    // more rows than one block of a device's weight-gradient pass sums (CUDA: 64 a chunk)
    { x: [150, 40], norm: [40] },
    // rows longer than a warp's (CUDA: a block a row), several rows a block in the fused weight
    // gradient of the device's backward
    { x: [9, 1040], norm: [1040] },
    // rows of 32 16-byte vectors a lane (CUDA forward: a row in a warp's registers, 256 bf16 /
    // 128 float32 elements a vector slot): 2, 5 (a partial unrolled slot set) and 16 slots for
    // 16-bit rows, with more rows than warps of the grid
    { x: [37, 512], norm: [512] },
    { x: [6, 1280], norm: [1280] },
    { x: [3, 4096], norm: [4096] },
  ];
  for (const dtype of FLOATS) {
    for (const s of shapes) {
      for (const p of params) {
        const name = `${dtype}, x [${s.x}], ${p.center ? 'LayerNorm' : 'RMSNorm'}${p.w ? ' +weight' : ''}${p.b ? ' +bias' : ''}${p.mean ? ' +mean' : ''}`;
        it(name, () =>
          tidy(() => {
            const r = rng(s.x.length * 100 + numel(s.x) + Number(p.w) * 3 + Number(p.b) * 5);
            const n = numel(s.norm);
            const rows = numel(s.x) / n;
            const eps = p.center ? 1e-5 : 1e-6;
            const stat = dtype === 'float64' ? 'float64' : 'float32';
            const x = randnT(r, s.x, dtype, 2, 0.5);
            const w = p.w ? randnT(r, s.norm, dtype, 0.5, 1) : null;
            const b = p.b ? randnT(r, s.norm, dtype) : null;
            const run = (k: KernelTable['normRows']) => {
              const y = sentinel(s.x, dtype);
              const mean = p.mean ? sentinel([rows], stat) : null;
              const rstd = sentinel([rows], stat);
              k(y, x, w, b, mean, rstd, n, eps, p.center);
              return { y, mean, rstd };
            };
            const N = run(nativeKernel('normRows'));
            const F = run(candidateKernel('normRows'));
            expectSame(F.y, N.y, 'y');
            expectSame(F.rstd, N.rstd, 'rstd');
            if (F.mean && N.mean) expectSame(F.mean, N.mean, 'mean');

            const g = randnT(r, s.x, dtype);
            const back = (k: KernelTable['normRowsBackward']) => {
              const dx = sentinel(s.x, dtype);
              const dw = p.w ? sentinel(s.norm, dtype) : null;
              const db = p.b ? sentinel(s.norm, dtype) : null;
              k(dx, g, x, w, N.mean, N.rstd, dw, db, n, p.center);
              return { dx, dw, db };
            };
            const dN = back(nativeKernel('normRowsBackward'));
            const dF = back(candidateKernel('normRowsBackward'));
            // dx cancels (dy - mean(dy) - xhat * mean(dy xhat)): compare at the scale of dy * rstd
            expectSame(dF.dx, dN.dx, 'dx', { atol: dtype === 'float64' ? 1e-11 : 1e-5 });
            if (dF.dw && dN.dw)
              expectSame(dF.dw, dN.dw, 'dweight', { atol: dtype === 'float64' ? 1e-11 : 1e-5 });
            if (dF.db && dN.db)
              expectSame(dF.db, dN.db, 'dbias', { atol: dtype === 'float64' ? 1e-11 : 1e-5 });
            // accumulate: dx already holds a gradient P and gets P + dx, each kernel's own dx added
            // with the binary add's bits (the weight gradients are written as before)
            const P = randnT(r, s.x, dtype);
            for (const [label, k, own] of [
              ['native', nativeKernel('normRowsBackward'), dN],
              ['candidate', candidateKernel('normRowsBackward'), dF],
            ] as const) {
              const dx = clone(P);
              const dw = p.w ? sentinel(s.norm, dtype) : null;
              k(dx, g, x, w, N.mean, N.rstd, dw, null, n, p.center, true);
              expect(values(dx), `${label} accumulated dx`).toEqual(values(add(P, own.dx)));
              if (dw && own.dw)
                expect(values(dw), `${label} dweight with accumulate`).toEqual(values(own.dw));
            }
            // paramsIntoMain (16/32-bit data): the weight / bias sums added to float32 main
            // gradients M: M + the kernel's own sums, unrounded where the kernel does it in its
            // pass (within a rounding to x's dtype of them), exactly M + the rounded ones where
            // it accumulates afterwards (the CPU)
            if (dtype !== 'float64' && (p.w || p.b)) {
              const Mw = p.w ? randnT(r, s.norm, 'float32') : null;
              const Mb = p.b ? randnT(r, s.norm, 'float32') : null;
              for (const [label, k, own] of [
                ['native', nativeKernel('normRowsBackward'), dN],
                ['candidate', candidateKernel('normRowsBackward'), dF],
              ] as const) {
                const mw = Mw ? clone(Mw) : null;
                const mb = Mb ? clone(Mb) : null;
                const dx = sentinel(s.x, dtype);
                k(dx, g, x, w, N.mean, N.rstd, mw, mb, n, p.center, false, true);
                expect(values(dx), `${label} dx with paramsIntoMain`).toEqual(values(own.dx));
                for (const [name, m, start, sums] of [
                  ['dweight', mw, Mw, own.dw],
                  ['dbias', mb, Mb, own.db],
                ] as const) {
                  if (!m || !start || !sums) continue;
                  const want = values(add(start, sums.to('float32')));
                  const got = values(m);
                  const sv = values(sums);
                  for (let i = 0; i < got.length; i++) {
                    const tol =
                      label === 'native'
                        ? 0
                        : 2 * ulpOf(Math.max(Math.abs(sv[i]), 1e-30), dtype) + 1e-5 * Math.abs(want[i]);
                    if (!(Math.abs(got[i] - want[i]) <= tol))
                      expect.fail(`${label} ${name} into main, element ${i}: ${got[i]} vs ${want[i]}`);
                  }
                }
              }
            }
          }),
        );
      }
    }
  }
});

// ---- RoPE -------------------------------------------------------------------------------------

describe('ropeApply', () => {
  const it = itWith('ropeApply');
  const B = 2;
  // 6: the CUDA kernel's packed path takes heads four at a time (a full group and a partial one)
  const H = 6;
  const S = 5;
  // 16: a full rotary dimension takes the CUDA kernel's packed path (8 bf16 / 4 float32 a pack)
  const D = 16;
  const combos: { x: DType; table: DType }[] = [
    { x: 'float32', table: 'float32' },
    { x: 'bfloat16', table: 'float32' },
    { x: 'bfloat16', table: 'bfloat16' },
    { x: 'float64', table: 'float64' },
    { x: 'float32', table: 'float64' },
  ];
  for (const dt of combos) {
    for (const R of [16, 8, 4, 2]) {
      for (const shared of [true, false]) {
        for (const strided of [false, true]) {
          for (const inverse of [false, true]) {
            const name = `x ${dt.x}, tables ${dt.table}, rotary ${R} of ${D}, ${shared ? '[S, R]' : '[B, S, R]'} tables, ${strided ? 'strided' : 'contiguous'} x, ${inverse ? 'inverse' : 'forward'}`;
            it(name, () =>
              tidy(() => {
                const r = rng(R * 17 + Number(shared) * 3 + Number(strided) * 5 + dt.x.length);
                // angles in HF layout: the frequencies listed twice
                const angles = (b: number, s: number, j: number) =>
                  (s + 1 + b) * 10000 ** (-(2 * (j % (R / 2))) / R) + 0.1 * r.normal();
                const tables = (f: (a: number) => number): Tensor => {
                  if (shared) {
                    const t = make([S, R], dt.table, (i) => f(angles(0, Math.floor(i / R), i % R)));
                    return expand(unsqueeze(t, 0), [B, S, R]);
                  }
                  return make([B, S, R], dt.table, (i) =>
                    f(angles(Math.floor(i / (S * R)), Math.floor(i / R) % S, i % R)),
                  );
                };
                const cos = tables(Math.cos);
                const sin = tables(Math.sin);
                const x = strided
                  ? transpose(randnT(r, [B, S, H, D], dt.x), 1, 2)
                  : randnT(r, [B, H, S, D], dt.x);
                const outN = sentinel([B, H, S, D], dt.x);
                const outF = sentinel([B, H, S, D], dt.x);
                nativeKernel('ropeApply')(outN, x, cos, sin, inverse);
                candidateKernel('ropeApply')(outF, x, cos, sin, inverse);
                expectSame(outF, outN, 'out');
              }),
            );
          }
        }
      }
    }
  }
});

// ---- gated activations (SwiGLU / GeGLU) ---------------------------------------------------------

describe('gatedActivation / gatedActivationBackward', () => {
  const it = itWith('gatedActivation', 'gatedActivationBackward');
  const activations: GatedActivation[] = ['swiglu', 'geglu', 'geglu-tanh'];
  // x [..., 2f]: odd f, f a multiple of every vector width (8 bf16 / 4 fp32 / 2 fp64), one row,
  // a long row, leading dimensions
  const shapes = [
    [1, 2],
    [5, 14],
    [3, 64],
    [2, 3, 34],
    [1, 1030],
    [4, 16, 24],
  ];
  for (const dtype of [...FLOATS, 'float16'] as DType[]) {
    for (const activation of activations) {
      for (const shape of shapes) {
        it(`${dtype}, ${activation}, x [${shape}]`, () =>
          tidy(() => {
            const r = rng(numel(shape) + activation.length * 13 + dtype.length);
            const f = shape[shape.length - 1] / 2;
            const half = [...shape.slice(0, -1), f];
            // scale 3: the tails of silu / gelu (saturation, tiny gradients) are covered too
            const x = randnT(r, shape, dtype, 3);
            const outN = sentinel(half, dtype);
            const outF = sentinel(half, dtype);
            nativeKernel('gatedActivation')(outN, x, activation);
            candidateKernel('gatedActivation')(outF, x, activation);
            // gelu's tail: 1 + erf(x / sqrt 2) cancels, so erf's last-bit differences between libm
            // and CUDA's erff come out near 1e-6 absolute there (measured on an H200)
            expectSame(outF, outN, 'out', { atol: dtype === 'float64' ? 1e-12 : 1e-5 });
            const g = randnT(r, half, dtype);
            const dxN = sentinel(shape, dtype);
            const dxF = sentinel(shape, dtype);
            nativeKernel('gatedActivationBackward')(dxN, g, x, activation);
            candidateKernel('gatedActivationBackward')(dxF, g, x, activation);
            // d gate = g * up * act'(gate): act' (gelu) cancels near gate = -0.75
            expectSame(dxF, dxN, 'dx', { atol: dtype === 'float64' ? 1e-12 : 1e-5 });
          }));
      }
    }
  }
});

// ---- attention --------------------------------------------------------------------------------

interface AttnCase {
  name: string;
  B: number;
  Hq: number;
  Hkv: number;
  Sq: number;
  Sk: number;
  D: number;
  Dv: number;
  causal?: boolean;
  scale?: number;
  mask?: 'bool' | 'float';
  cu?: { vals: number[]; dtype: 'int32' | 'int64' };
  dtypes: DType[];
}

const ATTN_CASES: AttnCase[] = [
  { name: 'plain, Sq 5 / Sk 7', B: 2, Hq: 2, Hkv: 2, Sq: 5, Sk: 7, D: 8, Dv: 8, dtypes: FLOATS },
  { name: 'causal, Sq = Sk', B: 2, Hq: 2, Hkv: 2, Sq: 6, Sk: 6, D: 4, Dv: 4, causal: true, dtypes: FLOATS },
  {
    name: 'causal, Sq 4 < Sk 9 (top-left aligned)',
    B: 1,
    Hq: 2,
    Hkv: 1,
    Sq: 4,
    Sk: 9,
    D: 5,
    Dv: 3,
    causal: true,
    dtypes: ['float32', 'float64'],
  },
  {
    name: 'causal, Sq 7 > Sk 3',
    B: 1,
    Hq: 1,
    Hkv: 1,
    Sq: 7,
    Sk: 3,
    D: 4,
    Dv: 4,
    causal: true,
    dtypes: ['float32'],
  },
  {
    name: 'boolean mask with a fully masked row',
    B: 2,
    Hq: 2,
    Hkv: 2,
    Sq: 5,
    Sk: 6,
    D: 8,
    Dv: 8,
    mask: 'bool',
    dtypes: FLOATS,
  },
  {
    name: 'additive mask with -inf entries, causal',
    B: 2,
    Hq: 2,
    Hkv: 1,
    Sq: 6,
    Sk: 6,
    D: 4,
    Dv: 6,
    mask: 'float',
    causal: true,
    dtypes: FLOATS,
  },
  {
    name: 'cuSeqlens with 3 packed sequences',
    B: 1,
    Hq: 2,
    Hkv: 2,
    Sq: 10,
    Sk: 10,
    D: 8,
    Dv: 8,
    cu: { vals: [0, 3, 7, 10], dtype: 'int64' },
    dtypes: FLOATS,
  },
  {
    name: 'cuSeqlens (int32, an empty sequence) + causal + GQA',
    B: 1,
    Hq: 4,
    Hkv: 2,
    Sq: 9,
    Sk: 9,
    D: 4,
    Dv: 4,
    causal: true,
    cu: { vals: [0, 2, 2, 5, 9], dtype: 'int32' },
    dtypes: ['float32', 'bfloat16'],
  },
  {
    name: 'GQA 4 query heads on 2 kv heads, Dv != D, scale 0.3',
    B: 2,
    Hq: 4,
    Hkv: 2,
    Sq: 5,
    Sk: 6,
    D: 8,
    Dv: 5,
    scale: 0.3,
    dtypes: FLOATS,
  },
  {
    name: 'GQA + boolean mask + causal, Sq 3 / Sk 5',
    B: 1,
    Hq: 4,
    Hkv: 2,
    Sq: 3,
    Sk: 5,
    D: 4,
    Dv: 4,
    causal: true,
    mask: 'bool',
    dtypes: ['float32', 'float64'],
  },
];

function attnInputs(c: AttnCase, dtype: DType, r: Rng) {
  const q = randnT(r, [c.B, c.Hq, c.Sq, c.D], dtype);
  // k transposed in memory: the kernels take any strides
  const k = transpose(randnT(r, [c.B, c.Sk, c.Hkv, c.D], dtype), 1, 2);
  const v = randnT(r, [c.B, c.Hkv, c.Sk, c.Dv], dtype);
  let mask: Tensor | null = null;
  if (c.mask === 'bool') {
    // [Sq, Sk] broadcast over batch and heads; query row 1 attends to nothing
    const m = make([c.Sq, c.Sk], 'bool', (i) => (Math.floor(i / c.Sk) === 1 ? 0 : r.uniform() < 0.7 ? 1 : 0));
    mask = expand(m, [c.B, c.Hq, c.Sq, c.Sk]);
  } else if (c.mask === 'float') {
    const m = make([c.B, 1, c.Sq, c.Sk], dtype, (i) => (i % 5 === 2 ? NINF : 0.5 * r.normal()));
    mask = expand(m, [c.B, c.Hq, c.Sq, c.Sk]);
  }
  const cuSeqlens = c.cu ? tensor(c.cu.vals, { dtype: c.cu.dtype }) : null;
  const opts: AttentionKernelOptions = {
    mask,
    cuSeqlens,
    causal: c.causal ?? false,
    scale: c.scale ?? 1 / Math.sqrt(c.D),
  };
  return { q, k, v, opts };
}

// ---- linear with bias (a device kernel: the CPU has none) -------------------------------------

/** One unit in the last place of |v| in float32 (normal range). */
const ulp32 = (v: number): number =>
  2 ** (Math.max(-126, Math.floor(Math.log2(Math.abs(v) || 2 ** -126))) - 23);

describe('accumulateGrad', () => {
  // the reference: the cast, then the add, by the CPU's core ops; one rounding each way, so bit
  // for bit whatever the device
  const it = itWith('accumulateGrad');
  const SRC: DType[] = ['float32', 'bfloat16', 'float16', 'float64'];
  const LAYOUTS = ['contiguous', 'transposed', 'expanded'] as const;
  let seed = 1;
  for (const dt of FLOATS) {
    for (const st of SRC) {
      for (const shape of [
        [1, 1],
        [7, 3],
        [33, 40],
      ]) {
        for (const layout of LAYOUTS) {
          const s0 = seed++;
          it(`dst ${dt}, src ${st} ${layout} [${shape}]`, () =>
            tidy(() => {
              const r = rng(s0);
              const [m, n] = shape;
              const dst = randnT(r, shape, dt, 2);
              const src =
                layout === 'contiguous'
                  ? randnT(r, shape, st, 3)
                  : layout === 'transposed'
                    ? transpose(randnT(r, [n, m], st, 3), 0, 1)
                    : expand(randnT(r, [1, n], st, 3), [m, n]);
              const want = dst.add(src.to(dt));
              const got = dst.clone();
              candidateKernel('accumulateGrad')(got, src);
              expectSame(got, want, 'dst', { rtol: 0, atol: 0, ulps: 0 });
            }));
        }
      }
    }
  }
});

describe('linearBias', () => {
  // the CPU has no linearBias kernel: the reference is the CPU's linear() (GEMM, then the bias
  // add), and a float64 evaluation of the same inputs for the single rounding
  const itK = itWith('linearBias');
  const SIZES = [1, 7, 33, 130];
  // every size in every role and every (M, N) pair: 16 cases instead of 64
  const CASES = SIZES.flatMap((M, i) => SIZES.map((N, j) => [M, N, SIZES[(i + j) % 4]]));
  const LAYOUTS = ['contiguous', 'x transposed', 'x row-strided, weight transposed'] as const;
  type Layout = (typeof LAYOUTS)[number];

  function inputs(r: Rng, M: number, N: number, K: number, dtype: DType, layout: Layout) {
    // weight scaled by 1 / sqrt(K): outputs of order 1 whatever K, so that one atol fits all
    const s = 1 / Math.sqrt(K);
    let x: Tensor;
    if (layout === 'x transposed') x = transpose(randnT(r, [K, M], dtype), 0, 1);
    else if (layout === 'contiguous') x = randnT(r, [M, K], dtype);
    else x = randnT(r, [M, K + 3], dtype).viewAs([M, K], [K + 3, 1], 2);
    const w =
      layout === 'x row-strided, weight transposed'
        ? transpose(randnT(r, [K, N], dtype, s), 0, 1)
        : randnT(r, [N, K], dtype, s);
    return { x, w, b: randnT(r, [N], dtype) };
  }

  /** sum_k x[m, k] w[n, k] + b[n] in float64, and sum_k |x[m, k] w[n, k]| (the rounding scale). */
  function exact(x: Tensor, w: Tensor, b: Tensor) {
    const [M, K] = x.shape;
    const N = w.shape[0];
    const xv = values(x);
    const wv = values(w);
    const bv = values(b);
    const sum = new Float64Array(M * N);
    const abs = new Float64Array(M * N);
    for (let m = 0; m < M; m++) {
      for (let n = 0; n < N; n++) {
        let s = 0;
        let a = 0;
        for (let k = 0; k < K; k++) {
          const p = xv[m * K + k] * wv[n * K + k];
          s += p;
          a += Math.abs(p);
        }
        sum[m * N + n] = s + bv[n];
        abs[m * N + n] = a + Math.abs(bv[n]);
      }
    }
    return { sum, abs };
  }

  for (const [di, dtype] of FLOATS.entries()) {
    for (const [ci, [M, N, K]] of CASES.entries()) {
      const layout = LAYOUTS[(ci + di) % LAYOUTS.length];
      itK(`${dtype}, M ${M}, N ${N}, K ${K}, ${layout}`, () =>
        tidy(() => {
          const r = rng(M * 10007 + N * 101 + K + di);
          const { x, w, b } = inputs(r, M, N, K, dtype, layout);
          const want = linear(x, w, b);
          const outF = sentinel([M, N], dtype);
          candidateKernel('linearBias')(outF, x, w, b);
          if (!KERNEL_DEVICE) {
            // the composition is linear()'s unfused path, bit for bit
            expect(values(outF)).toEqual(values(want));
            return;
          }
          const got = values(outF);
          const ref = exact(x, w, b);
          if (dtype === 'bfloat16') {
            // the CPU rounds the product, then the sum: the two differ by at most one unit of
            // the larger of the product and the output
            const y = values(linear(x, w));
            const cpu = values(want);
            for (let i = 0; i < got.length; i++) {
              const big = Math.max(Math.abs(y[i]), Math.abs(cpu[i]), Math.abs(got[i]));
              const tol = ulp16(big, dtype) + 2 ** -20 * ref.abs[i];
              if (!(Math.abs(got[i] - cpu[i]) <= tol))
                expect.fail(
                  `out element ${i}: ${CANDIDATE} ${got[i]}, CPU linear ${cpu[i]} (product ${y[i]})`,
                );
            }
          } else {
            expectSame(outF, want, 'out', dtype === 'float32' ? { rtol: 1e-5, atol: 1e-5 } : {});
          }
          if (dtype === 'float64') return;
          // one rounding: within half a unit of the float64 value, up to the float32 sum's error;
          // on a GPU cuBLASLt's bias epilogue may round a bf16 product before adding the bias
          // (measured on an H200 for K 7 and 33): half a unit of the product more there
          const ulp = dtype === 'bfloat16' ? (v: number) => ulp16(v, dtype) : ulp32;
          for (let i = 0; i < got.length; i++) {
            const e = ref.sum[i];
            const pre = REAL_GPU && dtype === 'bfloat16' ? 0.5 * ulp(ref.abs[i]) : 0;
            const tol =
              0.5 * ulp(Math.max(Math.abs(e), Math.abs(got[i]))) + pre + (K + 2) * 2 ** -24 * ref.abs[i];
            if (!(Math.abs(got[i] - e) <= tol))
              expect.fail(`out element ${i}: ${CANDIDATE} ${got[i]}, float64 ${e}: not rounded once`);
          }
        }),
      );
    }
  }

  it.skipIf(KERNEL_DEVICE !== undefined)(
    'the CPU has no kernel: getKernel gives the composition, which frees its temporaries',
    () =>
      tidy(() => {
        expect(hasNativeKernel(cpuBackend, 'linearBias')).toBe(false);
        expect(getKernel(cpuBackend, 'linearBias')).toBe(fallbackKernel('linearBias'));
        const r = rng(5);
        const { x, w, b } = inputs(r, 7, 5, 3, 'float32', 'x transposed');
        const out = sentinel([7, 5], 'float32');
        const before = memoryStats('cpu').liveStorages;
        fallbackKernel('linearBias')(out, x, w, b);
        expect(memoryStats('cpu').liveStorages).toBe(before);
      }),
  );

  it.skipIf(KERNEL_DEVICE === undefined || lacking(['linearBias']).length > 0)(
    'linear() on the device runs the kernel, with the gradients of the unfused graph',
    () =>
      tidy(() => {
        const dev = KERNEL_DEVICE as string;
        const r = rng(11);
        // bfloat16: linear() on the device gives the kernel's single rounding, bit for bit
        const x16 = randnT(r, [2, 5, 33], 'bfloat16');
        const w16 = randnT(r, [7, 33], 'bfloat16', 0.2);
        const b16 = randnT(r, [7], 'bfloat16');
        const viaKernel = sentinel([10, 7], 'bfloat16');
        candidateKernel('linearBias')(viaKernel, x16.reshape(10, 33), w16, b16);
        const onDev = linear(x16.to(dev), w16.to(dev), b16.to(dev)).to('cpu');
        expect(onDev.shape).toEqual([2, 5, 7]);
        expect(values(onDev)).toEqual(values(viaKernel));
        // float32 with gradients against the CPU's unfused graph
        const xd = randnT(r, [2, 5, 33], 'float32');
        const wd = randnT(r, [7, 33], 'float32', 0.2);
        const bd = randnT(r, [7], 'float32');
        const g = randnT(r, [2, 5, 7], 'float32');
        const run = (device: string): Tensor[] => {
          const xi = xd.to(device).requiresGrad_(true);
          const wi = wd.to(device).requiresGrad_(true);
          const bi = bd.to(device).requiresGrad_(true);
          const y = linear(xi, wi, bi);
          y.backward(g.to(device));
          return [y, xi.grad as Tensor, wi.grad as Tensor, bi.grad as Tensor].map((t) => t.to('cpu'));
        };
        const cpu = run('cpu');
        const other = run(dev);
        for (const [i, name] of ['y', 'dx', 'dweight', 'dbias'].entries())
          expectSame(other[i], cpu[i], name, { rtol: 1e-5, atol: 1e-5 });
      }),
  );
});

// ---- linear with an activation, linear's weight and bias gradients (device kernels) ----------

const LINEAR_DTYPES: DType[] = ['float32', 'bfloat16', 'float16', 'float64'];
const LINEAR_ACTIVATIONS: LinearActivation[] = ['relu', 'gelu', 'gelu-tanh'];
/** A GPU rather than its emulator: cuBLASLt's epilogues may run there. */
const REAL_GPU = KERNEL_DEVICE?.startsWith('cuda:') ?? false;
/**
 * The CUDA backend (GPU or emulator) applies the erf GELU, which cuBLASLt has no epilogue for, to
 * the pre-activation rounded to the dtype (PyTorch's order): one rounding more, allowed for there.
 */
const GELU_OF_ROUNDED = KERNEL_DEVICE?.startsWith('cuda') ?? false;

/** One unit in the last place of |v| in dtype (normal range). */
function ulpOf(v: number, dtype: DType): number {
  if (dtype === 'bfloat16' || dtype === 'float16') return ulp16(v, dtype);
  if (dtype === 'float32') return ulp32(v);
  return 2 ** (Math.max(-1022, Math.floor(Math.log2(Math.abs(v) || 2 ** -1022))) - 52);
}

/** The unit roundoff of the kernels' accumulator: float32's, float64's for float64 data. */
const unitOf = (dtype: DType): number => (dtype === 'float64' ? 2 ** -53 : 2 ** -24);

/** act(v) in float64, with the unary ops' formulas. */
function actF64(v: number, activation: LinearActivation | null): number {
  if (activation === null) return v;
  // biome-ignore lint/complexity/useMathMinMax: NaN gives 0, as in the kernels
  if (activation === 'relu') return v > 0 ? v : 0;
  if (activation === 'gelu') return 0.5 * v * (1 + erf(v / Math.SQRT2));
  return 0.5 * v * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (v + 0.044715 * v * v * v)));
}

/** sum_k a[i, k] b[j, k] (+ bias[j]) in float64 for a [I, K], b [J, K], and the sum of |terms|. */
function rowDots(a: Tensor, b: Tensor, bias: Tensor | null) {
  const [I, K] = a.shape;
  const J = b.shape[0];
  const av = values(a);
  const bv = values(b);
  const cv = bias ? values(bias) : null;
  const sum = new Float64Array(I * J);
  const abs = new Float64Array(I * J);
  for (let i = 0; i < I; i++) {
    for (let j = 0; j < J; j++) {
      let s = cv ? cv[j] : 0;
      let t = cv ? Math.abs(cv[j]) : 0;
      for (let k = 0; k < K; k++) {
        const p = av[i * K + k] * bv[j * K + k];
        s += p;
        t += Math.abs(p);
      }
      sum[i * J + j] = s;
      abs[i * J + j] = t;
    }
  }
  return { sum, abs };
}

/**
 * The first element of `got` that is not act(the exact sum) rounded once to dtype, or -1: each
 * must lie within half a unit (of the larger of it and the exact value) of act(exact), up to the
 * error the accumulator's sum of `terms` products can make (through act's slope, at most 1.13 for
 * GELU) and the activation's own evaluation error in the accumulator type. On a GPU, cuBLASLt's
 * GELU epilogue may evaluate tanh with the hardware approximation (about 2^-11 relative): a
 * further 2^-10 |pre| there; on the CUDA backend the erf GELU reads the rounded pre-activation
 * (GELU_OF_ROUNDED); and on a GPU a 16-bit product may be rounded before the epilogue.
 */
function notRoundedOnce(
  got: readonly number[],
  exact: { sum: Float64Array; abs: Float64Array },
  terms: number,
  dtype: DType,
  activation: LinearActivation | null,
): number {
  const u = unitOf(dtype);
  for (let i = 0; i < got.length; i++) {
    const e = exact.sum[i];
    const a = actF64(e, activation);
    let tol =
      0.5 * ulpOf(Math.max(Math.abs(a), Math.abs(got[i])), dtype) + 1.2 * (terms + 2) * u * exact.abs[i];
    if (activation !== null && activation !== 'relu') {
      tol += 8 * u * (Math.abs(a) + Math.abs(e));
      if (REAL_GPU && activation === 'gelu-tanh') tol += 2 ** -10 * Math.abs(e);
      // GELU's slope is at most 1.13: half a unit of the rounded pre-activation moves it that much
      if (GELU_OF_ROUNDED && activation === 'gelu') tol += 0.57 * ulpOf(e, dtype);
    }
    // cuBLASLt's epilogues on 16-bit outputs may round the product to the dtype before the bias
    // and activation (measured on an H200, cuBLASLt 13.1: bf16 with K 7 and 33 always, K 256
    // never): half a unit of the product, bounded by that of the sum of |terms|, times the slope
    if (REAL_GPU && (dtype === 'bfloat16' || dtype === 'float16')) tol += 0.57 * ulpOf(exact.abs[i], dtype);
    if (!(Math.abs(got[i] - a) <= tol)) return i;
  }
  return -1;
}

/** x [M, K], weight [N, K] and bias [N] laid out as in the linearBias comparisons. */
function linearInputs(r: Rng, M: number, N: number, K: number, dtype: DType, layout: number) {
  const s = 1 / Math.sqrt(Math.max(K, 1));
  let x: Tensor;
  if (layout === 1) x = transpose(randnT(r, [K, M], dtype), 0, 1);
  else if (layout === 0) x = randnT(r, [M, K], dtype);
  else x = randnT(r, [M, K + 3], dtype).viewAs([M, K], [K + 3, 1], 2);
  const w = layout === 2 ? transpose(randnT(r, [K, N], dtype, s), 0, 1) : randnT(r, [N, K], dtype, s);
  return { x, w, b: randnT(r, [N], dtype) };
}

const LINEAR_LAYOUTS = ['contiguous', 'x transposed', 'x row-strided, weight transposed'];

describe('linearBiasActivation', () => {
  // the CPU has none: the reference is the float64 evaluation of the same inputs (one rounding of
  // out and of preAct), and without a device the composition must be linearActivation's, bit for bit
  const itK = itWith('linearBiasActivation');
  // N a multiple of 8 in some cases: where cuBLASLt can keep the pre-activation (its ld % 8 == 0)
  const CASES = [
    [1, 1, 1],
    [7, 33, 1],
    [33, 8, 130],
    [130, 32, 7],
    [5, 9, 0],
    [33, 130, 33],
    [64, 64, 48],
  ];
  for (const [di, dtype] of LINEAR_DTYPES.entries()) {
    for (const [ai, activation] of LINEAR_ACTIVATIONS.entries()) {
      for (const [ci, [M, N, K]] of CASES.entries()) {
        const layout = (ci + di + ai) % LINEAR_LAYOUTS.length;
        const withBias = (ci + ai) % 3 !== 2;
        const withPre = (ci + di) % 2 === 0;
        const title = `${activation}, ${dtype}, M ${M}, N ${N}, K ${K}, ${LINEAR_LAYOUTS[layout]}${withBias ? '' : ', no bias'}${withPre ? ', pre-activation' : ''}`;
        itK(title, () =>
          tidy(() => {
            const r = rng(M * 10007 + N * 101 + K + di * 7 + ai);
            const { x, w, b: b0 } = linearInputs(r, M, N, K, dtype, layout);
            const b = withBias ? b0 : null;
            const outF = sentinel([M, N], dtype);
            const preF = withPre ? sentinel([M, N], dtype) : null;
            candidateKernel('linearBiasActivation')(outF, preF, x, w, b, activation);
            if (!KERNEL_DEVICE) {
              // the composition is linearActivation's on the CPU (linear, then the unary op)
              expect(values(outF)).toEqual(values(linearActivation(x, w, b, activation)));
              if (preF) expect(values(preF)).toEqual(values(linear(x, w, b)));
              return;
            }
            const exact = rowDots(x, w, b);
            const got = values(outF);
            const bad = notRoundedOnce(got, exact, K, dtype, activation);
            if (bad >= 0)
              expect.fail(
                `out element ${bad}: ${CANDIDATE} ${got[bad]}, float64 ${actF64(exact.sum[bad], activation)}: not act(x w^T + b) rounded once`,
              );
            if (preF) {
              const pre = values(preF);
              const badPre = notRoundedOnce(pre, exact, K, dtype, null);
              if (badPre >= 0)
                expect.fail(
                  `preAct element ${badPre}: ${CANDIDATE} ${pre[badPre]}, float64 ${exact.sum[badPre]}: not rounded once`,
                );
            }
          }),
        );
      }
    }
  }

  // (on a GPU the check allows cuBLASLt's rounding of the product, which the composition also does)
  it.skipIf(REAL_GPU)(
    'the single-rounding check catches the composition, which rounds three times (bfloat16, GELU)',
    () =>
      tidy(() => {
        // the check above has teeth: the unfused steps (GEMM, bias add, GELU, each rounded to
        // bfloat16) miss act(x w^T + b) by more than half a unit somewhere
        const r = rng(2024);
        const { x, w, b } = linearInputs(r, 33, 33, 33, 'bfloat16', 0);
        const exact = rowDots(x, w, b);
        const out = sentinel([33, 33], 'bfloat16');
        fallbackKernel('linearBiasActivation')(out, null, x, w, b, 'gelu');
        expect(notRoundedOnce(values(out), exact, 33, 'bfloat16', 'gelu')).toBeGreaterThanOrEqual(0);
      }),
  );

  it.skipIf(KERNEL_DEVICE !== undefined)(
    'the CPU has no kernel: getKernel gives the composition, which frees its temporaries',
    () =>
      tidy(() => {
        expect(hasNativeKernel(cpuBackend, 'linearBiasActivation')).toBe(false);
        expect(getKernel(cpuBackend, 'linearBiasActivation')).toBe(fallbackKernel('linearBiasActivation'));
      }),
  );

  it.skipIf(
    KERNEL_DEVICE === undefined || lacking(['linearBiasActivation', 'linearWeightBiasGrad']).length > 0,
  )('linearActivation() on the device runs the kernels, with the gradients of the composition', () =>
    tidy(() => {
      const dev = KERNEL_DEVICE as string;
      const r = rng(12);
      // bfloat16: linearActivation() on the device gives the kernel's single rounding, bit for bit
      const x16 = randnT(r, [2, 5, 33], 'bfloat16');
      const w16 = randnT(r, [8, 33], 'bfloat16', 0.2);
      const b16 = randnT(r, [8], 'bfloat16');
      for (const activation of LINEAR_ACTIVATIONS) {
        const viaKernel = sentinel([10, 8], 'bfloat16');
        candidateKernel('linearBiasActivation')(viaKernel, null, x16.reshape(10, 33), w16, b16, activation);
        const onDev = linearActivation(x16.to(dev), w16.to(dev), b16.to(dev), activation).to('cpu');
        expect(onDev.shape).toEqual([2, 5, 8]);
        expect(values(onDev), activation).toEqual(values(viaKernel));
      }
      // float32 with gradients against the CPU's composition (the backward reuses the kernel's
      // pre-activation, or ReLU's output, and takes dweight and dbias from linearWeightBiasGrad)
      const xd = randnT(r, [2, 5, 33], 'float32');
      const wd = randnT(r, [16, 33], 'float32', 0.2);
      const bd = randnT(r, [16], 'float32');
      const g = randnT(r, [2, 5, 16], 'float32');
      for (const activation of LINEAR_ACTIVATIONS) {
        const run = (device: string): Tensor[] => {
          const xi = xd.to(device).requiresGrad_(true);
          const wi = wd.to(device).requiresGrad_(true);
          const bi = bd.to(device).requiresGrad_(true);
          const y = linearActivation(xi, wi, bi, activation);
          y.backward(g.to(device));
          return [y, xi.grad as Tensor, wi.grad as Tensor, bi.grad as Tensor].map((t) => t.to('cpu'));
        };
        const cpu = run('cpu');
        const other = run(dev);
        const tol = REAL_GPU && activation === 'gelu-tanh' ? 2e-3 : 1e-5;
        for (const [i, name] of ['y', 'dx', 'dweight', 'dbias'].entries())
          expectSame(other[i], cpu[i], `${activation} ${name}`, { rtol: tol, atol: tol });
      }
    }),
  );
});

describe('linearWeightBiasGrad', () => {
  // gradWeight = g^T x and gradBias = the row sums of g: against a float64 evaluation (one
  // rounding each, float32 accumulation for 16-bit data), and without a device the composition
  // must be the GEMM and the sum of the ops, bit for bit
  const itK = itWith('linearWeightBiasGrad');
  const CASES = [
    [1, 1, 1],
    [7, 33, 5],
    [130, 8, 33],
    [33, 130, 7],
    [0, 5, 3],
    [9, 4, 0],
    [64, 32, 48],
  ];
  const LAYOUTS = ['contiguous', 'g transposed', 'x row-strided'];
  for (const [di, dtype] of LINEAR_DTYPES.entries()) {
    for (const [ci, [M, N, K]] of CASES.entries()) {
      const layout = (ci + di) % LAYOUTS.length;
      itK(`${dtype}, M ${M}, N ${N}, K ${K}, ${LAYOUTS[layout]}`, () =>
        tidy(() => {
          const r = rng(M * 7919 + N * 103 + K + di);
          const g = layout === 1 ? transpose(randnT(r, [N, M], dtype), 0, 1) : randnT(r, [M, N], dtype);
          const x =
            layout === 2
              ? randnT(r, [M, K + 2], dtype).viewAs([M, K], [K + 2, 1], 1)
              : randnT(r, [M, K], dtype);
          const gwF = sentinel([N, K], dtype);
          const gbF = sentinel([N], dtype);
          candidateKernel('linearWeightBiasGrad')(gwF, gbF, g, x);
          if (!KERNEL_DEVICE) {
            expect(values(gwF)).toEqual(values(matmul(transpose(g, 0, 1), x)));
            expect(values(gbF)).toEqual(values(sum(g, 0)));
            return;
          }
          // gradWeight[n, k] = sum_m g^T[n, m] x^T[k, m]; gradBias[n] = sum_m g^T[n, m] * 1
          const gt = transpose(g, 0, 1);
          const dW = rowDots(gt, transpose(x, 0, 1), null);
          const db = rowDots(
            gt,
            make([1, M], dtype, () => 1),
            null,
          );
          for (const [name, t, exact] of [
            ['gradWeight', gwF, dW],
            ['gradBias', gbF, db],
          ] as const) {
            const got = values(t);
            const bad = notRoundedOnce(got, exact, M, dtype, null);
            if (bad >= 0)
              expect.fail(
                `${name} element ${bad}: ${CANDIDATE} ${got[bad]}, float64 ${exact.sum[bad]}: not rounded once`,
              );
          }
        }),
      );
    }
  }

  it.skipIf(KERNEL_DEVICE !== undefined)('the CPU has no kernel: getKernel gives the composition', () => {
    expect(hasNativeKernel(cpuBackend, 'linearWeightBiasGrad')).toBe(false);
    expect(getKernel(cpuBackend, 'linearWeightBiasGrad')).toBe(fallbackKernel('linearWeightBiasGrad'));
  });
});

describe('linearWeightGradAccumulate', () => {
  // mainGrad (float32) += g^T x, the products summed in float32 and added before mainGrad's one
  // rounding: against a float64 evaluation of init + g^T x (the composition and the devices' fused
  // GEMM sum in different orders, so neither is compared bit for bit)
  const itK = itWith('linearWeightGradAccumulate');
  const CASES = [
    [1, 1, 1],
    [7, 33, 5],
    [130, 8, 33],
    [33, 130, 7],
    [9, 4, 12],
    [64, 32, 48],
    [300, 16, 24],
  ];
  const LAYOUTS = ['contiguous', 'g transposed', 'x row-strided'];
  for (const [di, dtype] of (['float32', 'bfloat16', 'float16'] as const).entries()) {
    for (const [ci, [M, N, K]] of CASES.entries()) {
      const layout = (ci + di) % LAYOUTS.length;
      itK(`${dtype}, M ${M}, N ${N}, K ${K}, ${LAYOUTS[layout]}`, () =>
        tidy(() => {
          const r = rng(M * 7717 + N * 101 + K + di);
          const g = layout === 1 ? transpose(randnT(r, [N, M], dtype), 0, 1) : randnT(r, [M, N], dtype);
          const x =
            layout === 2
              ? randnT(r, [M, K + 2], dtype).viewAs([M, K], [K + 2, 1], 1)
              : randnT(r, [M, K], dtype);
          const init = randnT(r, [N, K], 'float32', 4);
          const main = init.clone();
          candidateKernel('linearWeightGradAccumulate')(main, g, x);
          const got = values(main);
          const start = values(init);
          const exact = rowDots(transpose(g, 0, 1), transpose(x, 0, 1), null);
          for (let i = 0; i < got.length; i++) {
            const want = start[i] + exact.sum[i];
            // one float32 rounding of the result, float32 sums of M products and the start value
            const tol =
              0.5 * ulpOf(Math.max(Math.abs(want), Math.abs(got[i])), 'float32') +
              1.2 * (M + 2) * 2 ** -24 * (exact.abs[i] + Math.abs(start[i]));
            if (!(Math.abs(got[i] - want) <= tol))
              expect.fail(
                `mainGrad element ${i}: ${CANDIDATE} ${got[i]}, float64 ${want} (tolerance ${tol})`,
              );
          }
        }),
      );
    }
  }

  itK('M 0 adds nothing', () =>
    tidy(() => {
      const main = randnT(rng(5), [3, 4], 'float32');
      const before = values(main);
      candidateKernel('linearWeightGradAccumulate')(
        main,
        tensor([], { shape: [0, 3], dtype: 'bfloat16' }),
        tensor([], { shape: [0, 4], dtype: 'bfloat16' }),
      );
      expect(values(main)).toEqual(before);
    }),
  );

  it.skipIf(KERNEL_DEVICE !== undefined)('the CPU has no kernel: getKernel gives the composition', () => {
    expect(hasNativeKernel(cpuBackend, 'linearWeightGradAccumulate')).toBe(false);
    expect(getKernel(cpuBackend, 'linearWeightGradAccumulate')).toBe(
      fallbackKernel('linearWeightGradAccumulate'),
    );
  });
});

describe('linearResidual', () => {
  // out = residual + x @ weight^T, the product summed in the accumulator type and the residual
  // added before out's one rounding: against a float64 evaluation (the composition and the
  // devices' GEMM sum in different orders, so neither is compared bit for bit)
  const itK = itWith('linearResidual');
  const CASES = [
    [1, 1, 1],
    [7, 33, 5],
    [130, 8, 33],
    [33, 130, 7],
    [9, 4, 0],
    [64, 32, 48],
  ];
  const LAYOUTS = ['contiguous', 'x transposed', 'residual row-strided', 'in place'] as const;
  for (const [di, dtype] of (['float32', 'bfloat16', 'float16', 'float64'] as const).entries()) {
    for (const [ci, [M, N, K]] of CASES.entries()) {
      const layout = LAYOUTS[(ci + di) % LAYOUTS.length];
      itK(`${dtype}, M ${M}, N ${N}, K ${K}, ${layout}`, () =>
        tidy(() => {
          const r = rng(M * 7919 + N * 131 + K * 7 + di);
          const x =
            layout === 'x transposed' ? transpose(randnT(r, [K, M], dtype), 0, 1) : randnT(r, [M, K], dtype);
          const w = randnT(r, [N, K], dtype, 1 / Math.sqrt(Math.max(K, 1)));
          const res =
            layout === 'residual row-strided'
              ? randnT(r, [M, N + 3], dtype).viewAs([M, N], [N + 3, 1], 1)
              : randnT(r, [M, N], dtype);
          const start = values(res);
          const out = layout === 'in place' ? res : sentinel([M, N], dtype);
          candidateKernel('linearResidual')(out, x, w, res);
          const got = values(out);
          const exact = rowDots(x, w, null);
          const unit = dtype === 'float64' ? 2 ** -53 : 2 ** -24;
          for (let i = 0; i < got.length; i++) {
            const want = start[i] + exact.sum[i];
            // one rounding of the result (cuBLASLt may round a 16-bit product first, as with the
            // bias epilogue: half a unit of the product more on a GPU), the accumulator's sums
            const pre =
              REAL_GPU && (dtype === 'bfloat16' || dtype === 'float16')
                ? 0.5 * ulpOf(exact.abs[i], dtype)
                : 0;
            const tol =
              0.5 * ulpOf(Math.max(Math.abs(want), Math.abs(got[i])), dtype) +
              pre +
              (K + 2) * unit * (exact.abs[i] + Math.abs(start[i]));
            if (!(Math.abs(got[i] - want) <= tol))
              expect.fail(`out element ${i}: ${CANDIDATE} ${got[i]}, float64 ${want} (tolerance ${tol})`);
          }
        }),
      );
    }
  }

  itK('M 0 and N 0 write nothing', () =>
    tidy(() => {
      for (const [M, N] of [
        [0, 3],
        [3, 0],
      ]) {
        const out = sentinel([M, N], 'bfloat16');
        candidateKernel('linearResidual')(
          out,
          randnT(rng(3), [M, 4], 'bfloat16'),
          randnT(rng(4), [N, 4], 'bfloat16'),
          randnT(rng(5), [M, N], 'bfloat16'),
        );
        expect(out.numel).toBe(0);
      }
    }),
  );

  it.skipIf(KERNEL_DEVICE !== undefined)('the CPU has no kernel: getKernel gives the composition', () => {
    expect(hasNativeKernel(cpuBackend, 'linearResidual')).toBe(false);
    expect(getKernel(cpuBackend, 'linearResidual')).toBe(fallbackKernel('linearResidual'));
  });
});

describe('groupedGemm', () => {
  // each problem's c = a @ b against a float64 evaluation (rounded once); without a device the
  // composition must be matmul's product of each problem bit for bit and write nothing outside
  // the outputs (each a view with padded rows into one sentinel-filled buffer)
  const itK = itWith('groupedGemm');
  const SHAPES = [
    [5, 7, 3],
    [1, 9, 17],
    [33, 6, 4],
    [17, 17, 33],
    [2, 1, 5],
    [64, 48, 32],
  ];
  for (const [di, dtype] of LINEAR_DTYPES.entries()) {
    itK(`${dtype}: ${SHAPES.length} products of different shapes, transposed operands, padded outputs`, () =>
      tidy(() => {
        const r = rng(4242 + di);
        const span = (m: number, n: number) => m * (n + 2) + 3;
        const out = sentinel([SHAPES.reduce((s, [m, n]) => s + span(m, n), 0)], dtype);
        const problems: GemmProblem[] = [];
        const inside = new Set<number>();
        let off = 0;
        for (const [i, [m, n, k]] of SHAPES.entries()) {
          const a = i % 2 === 1 ? transpose(randnT(r, [k, m], dtype), 0, 1) : randnT(r, [m, k], dtype);
          const b = i % 3 !== 0 ? transpose(randnT(r, [n, k], dtype), 0, 1) : randnT(r, [k, n], dtype);
          const c = out.viewAs([m, n], [n + 2, 1], off);
          for (let row = 0; row < m; row++) for (let j = 0; j < n; j++) inside.add(off + row * (n + 2) + j);
          off += span(m, n);
          const operand = (t: Tensor) => ({ tensor: t, bs: 0, rs: t.strides[0], cs: t.strides[1] });
          problems.push({ m, n, k, a: operand(a), b: operand(b), c: { tensor: c, bs: 0, rs: n + 2, cs: 1 } });
        }
        candidateKernel('groupedGemm')(problems);
        for (const [i, p] of problems.entries()) {
          const got = values(p.c.tensor.contiguous());
          if (!KERNEL_DEVICE) {
            expect(got, `product ${i}`).toEqual(values(matmul(p.a.tensor, p.b.tensor)));
            continue;
          }
          const exact = rowDots(p.a.tensor, transpose(p.b.tensor, 0, 1), null);
          const bad = notRoundedOnce(got, exact, p.k, dtype, null);
          if (bad >= 0)
            expect.fail(`product ${i} element ${bad}: ${CANDIDATE} ${got[bad]}, float64 ${exact.sum[bad]}`);
        }
        if (!KERNEL_DEVICE) {
          const all = values(out);
          const stray = all.findIndex((v, j) => !inside.has(j) && v !== 7.25);
          expect(stray, 'a write outside every output').toBe(-1);
        }
      }),
    );
  }

  it.skipIf(KERNEL_DEVICE !== undefined)('the CPU has no kernel: getKernel gives the composition', () => {
    expect(hasNativeKernel(cpuBackend, 'groupedGemm')).toBe(false);
    expect(getKernel(cpuBackend, 'groupedGemm')).toBe(fallbackKernel('groupedGemm'));
  });
});

describe('attentionForward / attentionBackward', () => {
  const it = itWith('attentionForward', 'attentionBackward');
  for (const c of ATTN_CASES) {
    for (const dtype of c.dtypes) {
      it(`${c.name}, ${dtype}`, () =>
        tidy(() => {
          const r = rng(c.Sq * 100 + c.Sk * 10 + c.Hq + dtype.length);
          const { q, k, v, opts } = attnInputs(c, dtype, r);
          const lseDtype = dtype === 'float64' ? 'float64' : 'float32';
          const fwd = (f: KernelTable['attentionForward']) => {
            const out = sentinel([c.B, c.Hq, c.Sq, c.Dv], dtype);
            const lse = sentinel([c.B, c.Hq, c.Sq], lseDtype);
            f(out, lse, q, k, v, opts);
            return { out, lse };
          };
          const N = fwd(nativeKernel('attentionForward'));
          const F = fwd(candidateKernel('attentionForward'));
          const tol = dtype === 'float32' ? { rtol: 1e-5, atol: 1e-5 } : {};
          expectSame(F.out, N.out, 'out', tol);
          expectSame(F.lse, N.lse, 'lse', tol);
          if (c.mask === 'bool') expect(values(N.lse)[1]).toBe(NINF);

          const g = randnT(r, [c.B, c.Hq, c.Sq, c.Dv], dtype);
          const bwd = (f: KernelTable['attentionBackward']) => {
            const dq = sentinel(q.shape, dtype);
            const dk = sentinel(k.shape, dtype);
            const dv = sentinel(v.shape, dtype);
            f(dq, dk, dv, g, q, k, v, N.out, N.lse, opts);
            return { dq, dk, dv };
          };
          const dN = bwd(nativeKernel('attentionBackward'));
          const dF = bwd(candidateKernel('attentionBackward'));
          expectSame(dF.dq, dN.dq, 'dq', tol);
          expectSame(dF.dk, dN.dk, 'dk', tol);
          expectSame(dF.dv, dN.dv, 'dv', tol);
        }));
    }
  }
});

// ---- optimizers -------------------------------------------------------------------------------

/** The scalars of an AdamW step with lr 1e-2, betas (0.9, 0.999), eps 1e-8. */
const adamwScalars = (weightDecay: number, step: number) => {
  const [lr, beta1, beta2] = [1e-2, 0.9, 0.999];
  return {
    decay: 1 - lr * weightDecay,
    beta1,
    beta2,
    bc2Sqrt: Math.sqrt(1 - beta2 ** step),
    eps: 1e-8,
    negStep: -(lr / (1 - beta1 ** step)),
  };
};

describe('adamwStep', () => {
  const it = itWith('adamwStep');
  const combos: { p: DType; g: DType }[] = [
    { p: 'float32', g: 'float32' },
    { p: 'bfloat16', g: 'bfloat16' },
    { p: 'bfloat16', g: 'float32' },
    { p: 'float64', g: 'float64' },
  ];
  // the plain update; a gradient scale (a clip coefficient); float32 masters also written into
  // their 16-bit copies
  const extras = (p: DType): { name: string; gradScale?: number; copy?: DType }[] => [
    { name: '' },
    { name: ', gradScale 0.37', gradScale: 0.37 },
    ...(p === 'float32'
      ? [
          { name: ', bfloat16 copy', copy: 'bfloat16' as DType },
          { name: ', gradScale 0.37, float16 copy', gradScale: 0.37, copy: 'float16' as DType },
        ]
      : []),
  ];
  for (const dt of combos) {
    for (const n of WIDTHS) {
      for (const weightDecay of [0, 0.1]) {
        for (const step of [1, 10]) {
          for (const extra of extras(dt.p)) {
            it(`param ${dt.p}, grad ${dt.g}, ${n} elements, weight decay ${weightDecay}, step ${step}${extra.name}`, () =>
              tidy(() => {
                const r = rng(n * 3 + step + weightDecay * 10 + dt.p.length + dt.g.length);
                const state = dt.p === 'float64' ? 'float64' : 'float32';
                const p = randnT(r, [n], dt.p);
                const g = randnT(r, [n], dt.g, 0.1);
                const m = randnT(r, [n], state, 0.05);
                const v = make([n], state, () => 0.01 * r.normal() ** 2);
                const s = {
                  ...adamwScalars(weightDecay, step),
                  ...(extra.gradScale !== undefined ? { gradScale: extra.gradScale } : {}),
                };
                const runK = (k: KernelTable['adamwStep'], grad = g, sc = s) => {
                  const t = {
                    p: clone(p),
                    m: clone(m),
                    v: clone(v),
                    copy: extra.copy ? make([n], extra.copy, () => 7) : null,
                  };
                  k(t.p, grad, t.m, t.v, sc, t.copy);
                  return t;
                };
                const N = runK(nativeKernel('adamwStep'));
                const F = runK(candidateKernel('adamwStep'));
                expectSame(F.p, N.p, 'param');
                expectSame(F.m, N.m, 'exp_avg');
                expectSame(F.v, N.v, 'exp_avg_sq');
                if (extra.copy) {
                  expectSame(F.copy!, N.copy!, 'copy');
                  // the copy is the new parameter rounded to its dtype
                  expect(values(N.copy!)).toEqual(values(N.p.to(extra.copy)));
                }
                if (extra.gradScale !== undefined) {
                  // the same bits as scaling the gradient in place first (as clipping did)
                  const gs = clone(g);
                  cpuBackend.binaryScalar(gs, gs, extra.gradScale, 'mul', false);
                  const { gradScale: _, ...plain } = s;
                  const R = runK(nativeKernel('adamwStep'), gs, plain);
                  expect(values(N.p), 'param vs a pre-scaled gradient').toEqual(values(R.p));
                  expect(values(N.v), 'exp_avg_sq vs a pre-scaled gradient').toEqual(values(R.v));
                }
              }));
          }
        }
      }
    }
  }
});

describe('adamwStep with the gradient scale as a device tensor', () => {
  const it = itWith('adamwStep');
  const combos: { p: DType; g: DType; copy?: DType }[] = [
    { p: 'float32', g: 'float32', copy: 'bfloat16' },
    { p: 'bfloat16', g: 'bfloat16' },
    { p: 'bfloat16', g: 'float32' },
    { p: 'float64', g: 'float64' },
  ];
  // 1003 elements: vector bodies and an odd tail
  const n = 1003;
  for (const dt of combos) {
    for (const scale of [0.37, 1, Number.NaN, INF, NINF]) {
      it(`param ${dt.p}, grad ${dt.g}${dt.copy ? `, ${dt.copy} copy` : ''}, scale ${scale}`, () =>
        tidy(() => {
          const r = rng(dt.p.length * 7 + dt.g.length);
          const state = dt.p === 'float64' ? 'float64' : 'float32';
          const p = randnT(r, [n], dt.p);
          const g = randnT(r, [n], dt.g, 0.1);
          const m = randnT(r, [n], state, 0.05);
          const v = make([n], state, () => 0.01 * r.normal() ** 2);
          const base = adamwScalars(0.1, 3);
          const runK = (k: KernelTable['adamwStep'], sc: Parameters<KernelTable['adamwStep']>[4]) => {
            const t = {
              p: clone(p),
              m: clone(m),
              v: clone(v),
              copy: dt.copy ? make([n], dt.copy, () => 7) : null,
            };
            k(t.p, g, t.m, t.v, sc, t.copy);
            return t;
          };
          const withTensor = { ...base, gradScaleTensor: make([1], 'float64', () => scale) };
          for (const [who, k] of [
            ['native', nativeKernel('adamwStep')],
            [CANDIDATE, candidateKernel('adamwStep')],
          ] as const) {
            // the reference: the same kernel given the scale as a number (finite), or the inputs
            // left as they were
            const R = Number.isFinite(scale)
              ? runK(k, { ...base, gradScale: scale })
              : { p, m, v, copy: dt.copy ? make([n], dt.copy, () => 7) : null };
            const T = runK(k, withTensor);
            expect(values(T.p), `${who} param`).toEqual(values(R.p));
            expect(values(T.m), `${who} exp_avg`).toEqual(values(R.m));
            expect(values(T.v), `${who} exp_avg_sq`).toEqual(values(R.v));
            if (dt.copy) expect(values(T.copy!), `${who} copy`).toEqual(values(R.copy!));
          }
        }));
    }
  }

  it('rejects a scale tensor of another dtype, size or device', () =>
    tidy(() => {
      const p = make([4], 'float32', () => 1);
      const [g, m, v] = [clone(p), clone(p), clone(p)];
      const s = adamwScalars(0, 1);
      for (const k of [nativeKernel('adamwStep'), fallbackKernel('adamwStep')]) {
        expect(() => k(p, g, m, v, { ...s, gradScaleTensor: make([1], 'float32', () => 1) })).toThrow(
          /adamwStep: gradScaleTensor must be a float64 tensor of one element, got/,
        );
        expect(() => k(p, g, m, v, { ...s, gradScaleTensor: make([2], 'float64', () => 1) })).toThrow(
          /gradScaleTensor must be a float64 tensor of one element/,
        );
      }
      registerCoreOnly('scaledev');
      const elsewhere = make([1], 'float64', () => 1).to('scaledev:0');
      expect(() => nativeKernel('adamwStep')(p, g, m, v, { ...s, gradScaleTensor: elsewhere })).toThrow(
        /adamwStep: gradScaleTensor is on scaledev:0 but the parameters are on cpu/,
      );
      expect(values(p)).toEqual([1, 1, 1, 1]);
    }));
});

describe('adamwStepMulti', () => {
  const it = itWith('adamwStepMulti', 'adamwStep');
  type Lists = [Tensor[], Tensor[], Tensor[], Tensor[]];
  const combos: { p: DType; g: DType }[] = [
    { p: 'float32', g: 'float32' },
    { p: 'bfloat16', g: 'bfloat16' },
    { p: 'bfloat16', g: 'float32' },
    { p: 'float64', g: 'float64' },
  ];
  // a few sizes around the CUDA chunk (4,096 elements a block), and more tensors than one CUDA
  // launch takes (48), empty ones among them
  const lists: { name: string; sizes: (r: Rng) => number[] }[] = [
    { name: 'sizes 1, 7, 33, 1000, 70000', sizes: () => [1, 7, 33, 1000, 70000] },
    {
      name: '150 tensors of 0 to 300 elements',
      sizes: (r) => Array.from({ length: 150 }, (_, i) => (i % 37 === 5 ? 0 : r.int(1, 300))),
    },
  ];

  /** A copy of t that starts `shift` elements into a fresh storage (an odd shift defeats vector access). */
  const shifted = (t: Tensor, shift: number): Tensor => {
    if (shift === 0) return clone(t);
    const base = make([t.numel + shift], t.dtype, () => 0);
    return base.viewAs(t.shape, t.strides, shift).copy_(t);
  };

  /** A device copy of the contiguous CPU tensor t at t's offset in its storage (same alignment). */
  function deviceCopyAt(t: Tensor, device: string): { dev: Tensor; back: () => void } {
    const hostSpan = t.viewAs([t.offset + t.numel], [1], 0);
    const devSpan = hostSpan.to(device);
    const dev = devSpan.viewAs(t.shape, t.strides, t.offset);
    return {
      dev,
      back: () => {
        const home = dev.to('cpu');
        t.copy_(home);
        for (const x of [home, dev, devSpan, hostSpan]) x.dispose();
      },
    };
  }

  /** The candidate multi kernel on CPU lists: the composition, or the device's kernel on copies. */
  const multi: KernelTable['adamwStepMulti'] = (ps, gs, ms, vs, s, cs) => {
    if (!KERNEL_DEVICE) return fallbackKernel('adamwStepMulti')(ps, gs, ms, vs, s, cs);
    const device = KERNEL_DEVICE;
    const k = getBackend(device).kernel('adamwStepMulti');
    if (!k) throw new Error(`${device} has no kernel adamwStepMulti`);
    const copies = new Map<Tensor, { dev: Tensor; back: () => void }>();
    const move = (list: readonly Tensor[]): Tensor[] =>
      list.map((t) => {
        let c = copies.get(t);
        if (!c) {
          c = deviceCopyAt(t, device);
          copies.set(t, c);
        }
        return c.dev;
      });
    try {
      const sd = s.gradScaleTensor ? { ...s, gradScaleTensor: move([s.gradScaleTensor])[0] } : s;
      k(move(ps), move(gs), move(ms), move(vs), sd, cs ? move(cs) : null);
    } finally {
      for (const c of copies.values()) c.back();
    }
  };

  /** adamwStep on each tensor of the lists, one call each. */
  const each =
    (one: KernelTable['adamwStep']): KernelTable['adamwStepMulti'] =>
    (ps, gs, ms, vs, s, cs) => {
      for (let i = 0; i < ps.length; i++) one(ps[i], gs[i], ms[i], vs[i], s, cs?.[i] ?? null);
    };

  const scalars = adamwScalars;

  for (const dt of combos) {
    for (const list of lists) {
      for (const [weightDecay, step, withCopies] of [
        [0, 1, false],
        [0.1, 10, false],
        // float32 masters with a gradient scale and their bfloat16 copies
        ...(dt.p === 'float32' ? [[0.1, 10, true] as const] : []),
      ] as const) {
        it(`param ${dt.p}, grad ${dt.g}, ${list.name}, weight decay ${weightDecay}, step ${step}${withCopies ? ', gradScale 0.37, bfloat16 copies' : ''}`, () =>
          tidy(() => {
            const r = rng(list.name.length * 31 + step + weightDecay * 10 + dt.p.length + dt.g.length);
            const state = dt.p === 'float64' ? 'float64' : 'float32';
            // every third tensor sits one element into its storage, so a device sees both layouts
            const inputs = list.sizes(r).map((n, i) => ({
              shift: i % 3 === 1 ? 1 : 0,
              p: randnT(r, [n], dt.p),
              g: randnT(r, [n], dt.g, 0.1),
              m: randnT(r, [n], state, 0.05),
              v: make([n], state, () => 0.01 * r.normal() ** 2),
            }));
            const s = { ...scalars(weightDecay, step), ...(withCopies ? { gradScale: 0.37 } : {}) };
            const copies: Tensor[][] = [];
            const runK = (k: KernelTable['adamwStepMulti']): Lists => {
              const t: Lists = [[], [], [], []];
              for (const x of inputs) {
                [x.p, x.g, x.m, x.v].forEach((y, j) => {
                  t[j].push(shifted(y, x.shift));
                });
              }
              const cs = withCopies
                ? inputs.map((x) =>
                    shifted(
                      make([x.p.numel], 'bfloat16', () => 7),
                      x.shift,
                    ),
                  )
                : null;
              k(t[0], t[1], t[2], t[3], s, cs);
              if (cs) copies.push(cs);
              return t;
            };
            const N = runK(each(nativeKernel('adamwStep')));
            const F = runK(multi);
            // the device's own per-tensor kernel, which the multi-tensor one must match bit for bit
            const D = KERNEL_DEVICE ? runK(each(candidateKernel('adamwStep'))) : N;
            const outputs = [
              [0, 'param'],
              [2, 'exp_avg'],
              [3, 'exp_avg_sq'],
            ] as const;
            for (let i = 0; i < inputs.length; i++) {
              for (const [j, name] of outputs) {
                expectSame(F[j][i], N[j][i], `tensor ${i} ${name}`);
                expect(values(F[j][i]), `tensor ${i} ${name}: ${CANDIDATE} vs its adamwStep`).toEqual(
                  values(D[j][i]),
                );
              }
              if (withCopies) {
                // copies[0]: N's, [1]: F's, [2]: D's (when a device ran)
                expect(values(copies[1][i]), `tensor ${i} copy`).toEqual(values(copies[0][i]));
                expect(values(copies[0][i]), `tensor ${i} copy = param rounded`).toEqual(
                  values(N[0][i].to('bfloat16')),
                );
                if (KERNEL_DEVICE)
                  expect(values(copies[2][i]), `tensor ${i} copy vs adamwStep`).toEqual(values(copies[0][i]));
              }
            }
          }));
      }
    }
  }

  // the scale as a float64 tensor: the number's bits when finite, nothing written when not
  for (const scale of [0.37, Number.NaN]) {
    it(`param float32, grad float32, sizes 1, 7, 33, 1000, 70000, bfloat16 copies, gradScale tensor ${scale}`, () =>
      tidy(() => {
        const r = rng(77);
        const sizes = [1, 7, 33, 1000, 70000];
        const inputs = sizes.map((n, i) => ({
          shift: i % 3 === 1 ? 1 : 0,
          p: randnT(r, [n], 'float32'),
          g: randnT(r, [n], 'float32', 0.1),
          m: randnT(r, [n], 'float32', 0.05),
          v: make([n], 'float32', () => 0.01 * r.normal() ** 2),
        }));
        const run = (k: KernelTable['adamwStepMulti'], s: Parameters<KernelTable['adamwStepMulti']>[4]) => {
          const t: Lists = [[], [], [], []];
          for (const x of inputs) {
            [x.p, x.g, x.m, x.v].forEach((y, j) => {
              t[j].push(shifted(y, x.shift));
            });
          }
          const cs = inputs.map((x) =>
            shifted(
              make([x.p.numel], 'bfloat16', () => 7),
              x.shift,
            ),
          );
          k(t[0], t[1], t[2], t[3], s, cs);
          return [...t, cs];
        };
        const base = scalars(0.1, 10);
        const withTensor = { ...base, gradScaleTensor: make([1], 'float64', () => scale) };
        for (const [who, k] of [
          ['native', nativeKernel('adamwStepMulti')],
          [CANDIDATE, multi],
        ] as const) {
          // the same kernel with the scale as a number, or the inputs as they were
          const R = Number.isFinite(scale)
            ? run(k, { ...base, gradScale: scale })
            : [
                inputs.map((x) => x.p),
                inputs.map((x) => x.g),
                inputs.map((x) => x.m),
                inputs.map((x) => x.v),
                inputs.map((x) => make([x.p.numel], 'bfloat16', () => 7)),
              ];
          const T = run(k, withTensor);
          for (let i = 0; i < inputs.length; i++) {
            for (const [j, name] of [
              [0, 'param'],
              [2, 'exp_avg'],
              [3, 'exp_avg_sq'],
              [4, 'copy'],
            ] as const) {
              expect(values(T[j][i]), `${who} tensor ${i} ${name}`).toEqual(values(R[j][i]));
            }
          }
        }
      }));
  }

  it('rejects lists of different lengths and lists of mixed dtypes, changing nothing', () =>
    tidy(() => {
      const r = rng(4);
      const p32 = randnT(r, [5], 'float32');
      const p16 = randnT(r, [5], 'bfloat16');
      const g = randnT(r, [5], 'float32');
      const m = randnT(r, [5], 'float32');
      const v = make([5], 'float32', () => r.uniform());
      const s = scalars(0.1, 3);
      for (const k of [nativeKernel('adamwStepMulti'), multi]) {
        const p = clone(p32);
        expect(() => k([p, clone(p32)], [g], [m, m], [v, v], s)).toThrow(/adamwStepMulti/);
        expect(() => k([p, clone(p16)], [g, g], [clone(m), clone(m)], [clone(v), clone(v)], s)).toThrow(
          /adamwStepMulti/,
        );
        expect(values(p)).toEqual(values(p32));
      }
    }));

  describeFallbacks('on a backend without adamwStep', () => {
    it('runs the adamwStep composition on each tensor', () =>
      tidy(() => {
        const dev = 'coremulti';
        registerCoreOnly(dev);
        const s = scalars(0.1, 2);
        const run = (k: KernelTable['adamwStepMulti'], device: string): Tensor[] => {
          const t: Lists = [[], [], [], []];
          for (const n of [3, 0, 40]) {
            const rn = rng(n);
            t[0].push(randnT(rn, [n], 'bfloat16').to(device));
            t[1].push(randnT(rn, [n], 'float32', 0.1).to(device));
            t[2].push(randnT(rn, [n], 'float32', 0.05).to(device));
            t[3].push(make([n], 'float32', () => rn.uniform()).to(device));
          }
          k(t[0], t[1], t[2], t[3], s);
          return t.flat().map((x) => x.to('cpu'));
        };
        const viaFallback = run(fallbackKernel('adamwStepMulti'), dev);
        const composed = run(each(fallbackKernel('adamwStep')), 'cpu');
        const native = run(nativeKernel('adamwStepMulti'), 'cpu');
        viaFallback.forEach((t, i) => {
          expect(values(t), `output ${i}`).toEqual(values(composed[i]));
          expectSame(t, native[i], `output ${i}`);
        });
      }));
  });
});

describe('sgdStep', () => {
  const it = itWith('sgdStep');
  const variants: {
    name: string;
    momentum: number;
    dampening: number;
    nesterov: boolean;
    first: boolean;
    weightDecay: number;
  }[] = [
    { name: 'plain', momentum: 0, dampening: 0, nesterov: false, first: false, weightDecay: 0 },
    { name: 'weight decay', momentum: 0, dampening: 0, nesterov: false, first: false, weightDecay: 0.01 },
    {
      name: 'momentum, first step',
      momentum: 0.9,
      dampening: 0,
      nesterov: false,
      first: true,
      weightDecay: 0.01,
    },
    {
      name: 'momentum + dampening',
      momentum: 0.9,
      dampening: 0.1,
      nesterov: false,
      first: false,
      weightDecay: 0,
    },
    { name: 'nesterov', momentum: 0.9, dampening: 0, nesterov: true, first: false, weightDecay: 0.01 },
    {
      name: 'nesterov, first step',
      momentum: 0.8,
      dampening: 0,
      nesterov: true,
      first: true,
      weightDecay: 0,
    },
  ];
  const combos: { p: DType; g: DType }[] = [
    { p: 'float32', g: 'float32' },
    { p: 'bfloat16', g: 'bfloat16' },
    { p: 'bfloat16', g: 'float32' },
    { p: 'float64', g: 'float64' },
  ];
  for (const dt of combos) {
    for (const n of WIDTHS) {
      for (const o of variants) {
        it(`param ${dt.p}, grad ${dt.g}, ${n} elements, ${o.name}`, () =>
          tidy(() => {
            const r = rng(n * 11 + o.momentum * 10 + o.weightDecay * 100 + dt.p.length);
            const state = dt.p === 'float64' ? 'float64' : 'float32';
            const p = randnT(r, [n], dt.p);
            const g = randnT(r, [n], dt.g, 0.1);
            const buf = o.momentum !== 0 ? randnT(r, [n], state, 0.05) : null;
            const s = { lr: 0.05, ...o };
            const runK = (k: KernelTable['sgdStep']) => {
              const t = { p: clone(p), buf: buf ? clone(buf) : null };
              k(t.p, g, t.buf, s);
              return t;
            };
            const N = runK(nativeKernel('sgdStep'));
            const F = runK(candidateKernel('sgdStep'));
            expectSame(F.p, N.p, 'param');
            if (F.buf && N.buf) expectSame(F.buf, N.buf, 'momentum buffer');
          }));
      }
    }
  }
});

/** normPowerSum into a fresh 0-d float64 output (sentinel-filled), read back. */
function powerSum(k: KernelTable['normPowerSum'], t: Tensor, p: number): number {
  const out = sentinel([], 'float64');
  k(t, p, out);
  const v = out.item();
  out.dispose();
  return v;
}

describe('normPowerSum', () => {
  const it = itWith('normPowerSum');
  for (const dtype of FLOATS) {
    for (const n of [1, 7, 33, 20000]) {
      for (const p of [2, INF, 1, 3]) {
        it(`${dtype}, ${n} elements, p = ${p}`, () =>
          tidy(() => {
            const t = randnT(rng(n + p), [n], dtype, 3);
            const a = powerSum(nativeKernel('normPowerSum'), t, p);
            const b = powerSum(candidateKernel('normPowerSum'), t, p);
            expectSameNumber(b, a, 'sum', 1e-12);
          }));
      }
    }
  }

  // accumulate: out + the sum (max(out, the max), NaN winning), the bits of the kernel's own sum
  // added to out in float64 afterwards; the candidate's sum may differ from the CPU's in its last
  // bits (another order of additions), which the cases above bound
  for (const dtype of ['float32', 'bfloat16'] as const) {
    for (const p of [2, INF, 1, 3]) {
      it(`accumulates into out: ${dtype}, p = ${p}`, () =>
        tidy(() => {
          for (const [n, start] of [
            [33, 0.1],
            [20000, 5],
            [0, 2.5],
            [7, Number.NaN],
          ] as const) {
            const t = randnT(rng(n + 11), [n], dtype, 3);
            for (const [label, k] of [
              ['native', nativeKernel('normPowerSum')],
              ['candidate', candidateKernel('normPowerSum')],
            ] as const) {
              const want = combinePowerSums(start, powerSum(k, t, p), p);
              const out = make([], 'float64', () => start);
              k(t, p, out, true);
              const got = out.item();
              expect(Object.is(got, want), `${label} n ${n} start ${start}: ${got} vs ${want}`).toBe(true);
            }
          }
        }));
    }
  }

  it('propagates NaN and inf as the kernel does', () =>
    tidy(() => {
      for (const bad of [Number.NaN, INF]) {
        const t = make([9], 'float32', (i) => (i === 4 ? bad : i - 3));
        for (const p of [2, INF, 1, 0.5]) {
          expectSameNumber(
            powerSum(candidateKernel('normPowerSum'), t, p),
            powerSum(nativeKernel('normPowerSum'), t, p),
            `p = ${p}, ${bad}`,
          );
        }
      }
    }));
});

describe('normPowerSumMulti against one native normPowerSum a tensor', () => {
  const it = itWith('normPowerSumMulti');
  /** The loop of native per-tensor sums the multi kernel stands for: written, then accumulated. */
  const loop = (ts: Tensor[], p: number, start: number | null): number => {
    const out = make([], 'float64', () => start ?? 0);
    let acc = start !== null;
    for (const t of ts) {
      if (t.numel === 0) continue;
      nativeKernel('normPowerSum')(t, p, out, acc);
      acc = true;
    }
    if (!acc) out.fill_(0);
    const v = out.item();
    out.dispose();
    return v;
  };
  const multi = (ts: Tensor[], p: number, start: number | null): number => {
    const out = start === null ? sentinel([], 'float64') : make([], 'float64', () => start);
    candidateKernel('normPowerSumMulti')(ts, p, out, start !== null);
    const v = out.item();
    out.dispose();
    return v;
  };
  // sizes around the device's chunks (4096) and its launch list (48 tensors), an empty tensor, a
  // misaligned view (the elementwise path), and dtype changes inside the list
  const lists: { name: string; make: (r: Rng) => Tensor[] }[] = [
    { name: 'one tensor', make: (r) => [randnT(r, [20000], 'float32', 3)] },
    {
      name: 'odd sizes and an empty tensor',
      make: (r) => [1, 7, 4096, 0, 4097, 33, 12289].map((n) => randnT(r, [n], 'float32', 2)),
    },
    {
      name: '60 tensors (two launch lists), a misaligned slice',
      make: (r) => [
        ...Array.from({ length: 59 }, (_, i) => randnT(r, [1 + ((i * 97) % 700)], 'float32', 1)),
        randnT(r, [1001], 'float32', 1).viewAs([1000], [1], 1),
      ],
    },
    {
      name: 'float32, bfloat16 and float64 runs',
      make: (r) => [
        randnT(r, [300], 'float32', 2),
        randnT(r, [5000], 'bfloat16', 2),
        randnT(r, [77], 'bfloat16', 2),
        randnT(r, [9000], 'float64', 2),
        randnT(r, [12], 'float32', 2),
      ],
    },
  ];
  for (const l of lists) {
    for (const p of [2, INF, 1, 3]) {
      it(`${l.name}, p = ${p}: written, and accumulated into 0.5`, () =>
        tidy(() => {
          const ts = l.make(rng(p * 13 + l.name.length));
          expectSameNumber(multi(ts, p, null), loop(ts, p, null), 'written', 1e-12);
          expectSameNumber(multi(ts, p, 0.5), loop(ts, p, 0.5), 'accumulated', 1e-12);
        }));
    }
  }

  it('an empty list: 0 written, out untouched when accumulating; NaN and inf propagate', () =>
    tidy(() => {
      expect(multi([], 2, null)).toBe(0);
      expect(multi([], 2, 1.25)).toBe(1.25);
      expect(multi([zeros([0])], INF, null)).toBe(0);
      for (const bad of [Number.NaN, INF]) {
        const ts = [
          make([9], 'float32', (i) => i - 3),
          make([5000], 'float32', (i) => (i === 4321 ? bad : 1)),
        ];
        for (const p of [2, INF, 1])
          expectSameNumber(multi(ts, p, null), loop(ts, p, null), `p = ${p}, ${bad}`);
      }
    }));
});

describe('unscaleCheck', () => {
  const it = itWith('unscaleCheck');
  const specials: { name: string; at: number; value: number }[] = [
    { name: 'finite', at: -1, value: 0 },
    { name: 'inf', at: 5, value: INF },
    { name: '-inf', at: 0, value: NINF },
    { name: 'NaN', at: 32, value: Number.NaN },
  ];
  for (const dtype of FLOATS) {
    for (const sp of specials) {
      for (const inv of [1 / 1024, 1 / 3, 1]) {
        it(`${dtype}, ${sp.name}, invScale ${inv}`, () =>
          tidy(() => {
            const r = rng(sp.at + 7);
            const t = make([33], dtype, (i) => (i === sp.at ? sp.value : 100 * r.normal()));
            const tN = clone(t);
            const tF = clone(t);
            // a flag already set stays set; a clear one is set by a non-finite value only
            for (const start of [0, 1]) {
              const fN = make([1], 'float32', () => start);
              const fF = make([1], 'float32', () => start);
              nativeKernel('unscaleCheck')(tN, inv, fN);
              candidateKernel('unscaleCheck')(tF, inv, fF);
              expect(fN.item()).toBe(start === 1 || sp.at >= 0 ? 1 : 0);
              expect(fF.item()).toBe(fN.item());
              expectSame(tF, tN, 't', { ulps: 0, atol: 0, rtol: 0 });
            }
            expectSame(tF, tN, 't', { ulps: 0, atol: 0, rtol: 0 });
          }));
      }
    }
  }
});

// ---- memory -----------------------------------------------------------------------------------

describeFallbacks('memory', () => {
  it('every fallback frees its temporaries: liveStorages is unchanged', () => {
    tidy(() => {
      const r = rng(77);
      const f32 = (shape: number[], scale = 1) => randnT(r, shape, 'float32', scale);
      // inputs and outputs first: the baseline counts them
      const x = logits(r, [4, 7], 'float32');
      const y = sentinel([4, 7], 'float32');
      const dx = sentinel([4, 7], 'float32');
      const g = f32([4, 7]);
      const t = tensor([2, -100, 0, 6], { dtype: 'int64' });
      const tBad = tensor([2, -100, 9, 6], { dtype: 'int64' });
      const lse = sentinel([4], 'float32');
      const loss = sentinel([4], 'float32');
      const gout = f32([4]);
      const xn = f32([3, 2, 5], 2);
      const yn = sentinel([3, 2, 5], 'float32');
      const w = f32([2, 5]);
      const b = f32([2, 5]);
      const mean = sentinel([3], 'float32');
      const rstd = sentinel([3], 'float32');
      const dxn = sentinel([3, 2, 5], 'float32');
      const dw = sentinel([2, 5], 'float32');
      const db = sentinel([2, 5], 'float32');
      const xr = f32([1, 2, 3, 6]);
      const cos = f32([1, 3, 4]);
      const sin = f32([1, 3, 4]);
      const outR = sentinel([1, 2, 3, 6], 'float32');
      const xg = f32([3, 10], 2);
      const outG = sentinel([3, 5], 'float32');
      const gG = f32([3, 5]);
      const dxG = sentinel([3, 10], 'float32');
      const c = ATTN_CASES[7];
      const a = attnInputs(c, 'float32', r);
      const boolMask = attnInputs(ATTN_CASES[9], 'float32', r);
      const out = sentinel([c.B, c.Hq, c.Sq, c.Dv], 'float32');
      const alse = sentinel([c.B, c.Hq, c.Sq], 'float32');
      const ga = f32([c.B, c.Hq, c.Sq, c.Dv]);
      const dq = sentinel(a.q.shape, 'float32');
      const dk = sentinel(a.k.shape, 'float32');
      const dv = sentinel(a.v.shape, 'float32');
      const out2 = sentinel([1, 4, 3, 4], 'float32');
      const lse2 = sentinel([1, 4, 3], 'float32');
      const p = make([9], 'bfloat16', (i) => i - 4);
      const pg = f32([9]);
      const m = f32([9]);
      const v = make([9], 'float32', () => 0.5);
      const buf = f32([9]);
      const bad = make([9], 'float32', (i) => (i === 3 ? Number.NaN : i));
      const stats = sentinel([4], 'float64');
      const norm = sentinel([], 'float64');
      const flag = sentinel([1], 'float32');
      const xl = f32([3, 4]);
      const wl = f32([5, 4]);
      const bl = f32([5]);
      const gl = f32([3, 5]);
      const outL = sentinel([3, 5], 'float32');
      const preL = sentinel([3, 5], 'float32');
      const gwL = sentinel([5, 4], 'float32');
      const gbL = sentinel([5], 'float32');
      const gl16 = gl.to('bfloat16');
      const xl16 = xl.to('bfloat16');

      const before = memoryStats('cpu').liveStorages;
      const k = <K extends KernelName>(name: K) => fallbackKernel(name);
      k('softmax')(y, x, false);
      k('softmax')(y, x, true);
      k('softmaxBackward')(dx, y, g, true);
      k('softmaxBackward')(dx, y, g, false);
      k('crossEntropy')(x, t, lse, loss, -100, 0.1, stats);
      k('crossEntropy')(x, tBad, lse, loss, -100, 0.1, stats);
      k('crossEntropyBackward')(dx, x, t, lse, gout, 0.5, -100, 0.1);
      k('nllLoss')(x, t, loss, -100, stats);
      k('nllLoss')(x, tBad, null, -100, stats);
      k('nllLossBackward')(dx, t, gout, 1, -100);
      k('normRows')(yn, xn, w, b, mean, rstd, 10, 1e-5, true);
      k('normRows')(yn, xn, w, null, null, rstd, 10, 1e-6, false);
      k('normRowsBackward')(dxn, yn, xn, w, mean, rstd, dw, db, 10, true);
      k('normRowsBackward')(dxn, yn, xn, w, null, rstd, dw, null, 10, false);
      k('ropeApply')(outR, xr, cos, sin, false);
      k('ropeApply')(outR, xr, cos, sin, true);
      for (const act of ['swiglu', 'geglu', 'geglu-tanh'] as const) {
        k('gatedActivation')(outG, xg, act);
        k('gatedActivationBackward')(dxG, gG, xg, act);
      }
      k('attentionForward')(out, alse, a.q, a.k, a.v, a.opts);
      k('attentionBackward')(dq, dk, dv, ga, a.q, a.k, a.v, out, alse, a.opts);
      k('attentionForward')(out2, lse2, boolMask.q, boolMask.k, boolMask.v, boolMask.opts);
      k('adamwStep')(p, pg, m, v, {
        decay: 0.99,
        beta1: 0.9,
        beta2: 0.99,
        bc2Sqrt: 0.1,
        eps: 1e-8,
        negStep: -0.01,
      });
      const sgd = { lr: 0.1, momentum: 0.9, dampening: 0, weightDecay: 0.01, nesterov: true, first: false };
      k('sgdStep')(p, pg, buf, sgd);
      k('sgdStep')(p, pg, null, { ...sgd, momentum: 0, nesterov: false });
      for (const pw of [2, INF, 1, 3]) k('normPowerSum')(bad, pw, norm);
      k('unscaleCheck')(bad, 0.5, flag);
      k('unscaleCheck')(m, 1, flag);
      for (const act of LINEAR_ACTIVATIONS) k('linearBiasActivation')(outL, preL, xl, wl, bl, act);
      k('linearBiasActivation')(outL, null, xl, wl, null, 'relu');
      k('linearBias')(outL, xl, wl, bl);
      k('linearWeightBiasGrad')(gwL, gbL, gl, xl);
      k('linearWeightGradAccumulate')(gwL, gl16, xl16);
      expect(memoryStats('cpu').liveStorages).toBe(before);
    });
  });

  it('covers exactly the kernels a new backend does not provide', () => {
    expect(Object.keys(FALLBACK_KERNELS).sort()).toEqual([...COMPOSED, ...DEVICE_ONLY].sort());
    expect(() => fallbackKernel('topk')).toThrow(/no composition/);
  });
});

// ---- the ops on a backend with only core and indexing kernels ---------------------------------

const INDEXING: KernelName[] = [
  'indexSelectRows',
  'indexAddRows',
  'gatherAlong',
  'scatterAddAlong',
  'topk',
  'triangle',
  'oneHot',
];

/** A device type whose backend runs the CPU's core and indexing kernels and nothing else. */
function registerCoreOnly(type: string): Backend {
  const cpu = getBackend('cpu');
  registerBackendType({
    type,
    deviceCount: () => 1,
    create: (index) =>
      ({
        ...cpu,
        device: `${type}:${index}`,
        kernel: (name: KernelName) => (INDEXING.includes(name) ? cpu.kernel(name) : undefined),
      }) as Backend,
  });
  return getBackend(type);
}

describeFallbacks('ops on a backend without named kernels (fallbacks through getKernel)', () => {
  const dev = 'corefb';
  const backend = registerCoreOnly(dev);

  it('getKernel hands out the compositions there and the native kernels on the CPU', () => {
    for (const name of COMPOSED) {
      expect(hasNativeKernel(backend, name)).toBe(false);
      expect(getKernel(backend, name)).toBe(fallbackKernel(name));
      expect(getKernel(getBackend('cpu'), name)).toBe(nativeKernel(name));
    }
  });

  function expectAllSame(res: { cpu: Tensor[]; other: Tensor[] }, tol: Tol = {}): void {
    for (const [i, t] of res.cpu.entries()) expectSame(res.other[i], t, `output ${i}`, tol);
  }

  /** Runs fn on the CPU and on the core-only device; returns both results (the latter copied to the CPU). */
  function both(fn: (device: string) => Tensor[]): { cpu: Tensor[]; other: Tensor[] } {
    return { cpu: fn('cpu'), other: fn(dev).map((t) => t.to('cpu')) };
  }

  it('softmax, logSoftmax, crossEntropy and nllLoss with gradients', () =>
    tidy(() => {
      const r = rng(3);
      const data = logits(r, [4, 3, 7], 'float32');
      const tgt = tensor([
        [0, -100, 6],
        [2, 3, -100],
        [1, 1, 1],
        [-100, 4, 0],
      ]);
      const res = both((device) => {
        const x = data.to(device).requiresGrad_(true);
        const t = tgt.to(device);
        const s = softmax(x, 1);
        const ls = logSoftmax(x, 2);
        const ce = crossEntropy(transpose(x, 1, 2), t, { labelSmoothing: 0.1 });
        const nl = nllLoss(transpose(ls, 1, 2), t, { reduction: 'sum' });
        const total = s.mul(0.5).sum().add(ls.sum().mul(0.01)).add(ce).add(nl.mul(0.1));
        total.backward();
        return [s, ls, ce, nl, x.grad!.clone()];
      });
      expectAllSame(res, { atol: 1e-5 });
    }));

  it('layerNorm, rmsNorm and RoPE with gradients', () =>
    tidy(() => {
      const r = rng(4);
      const xd = randnT(r, [2, 3, 4, 6], 'float32');
      const wd = randnT(r, [6], 'float32');
      const bd = randnT(r, [6], 'float32');
      const cd = make([4, 4], 'float32', (i) => Math.cos(i / 3));
      const sd = make([4, 4], 'float32', (i) => Math.sin(i / 3));
      const res = both((device) => {
        const x = xd.to(device).requiresGrad_(true);
        const w = wd.to(device).requiresGrad_(true);
        const b = bd.to(device).requiresGrad_(true);
        const ln = layerNorm(x, 6, w, b);
        const rms = rmsNorm(x, [6], w);
        const rot = applyRotaryPosEmb(ln, cd.to(device), sd.to(device));
        rot.mul(rms).sum().backward();
        return [ln, rms, rot, x.grad!.clone(), w.grad!.clone(), b.grad!.clone()];
      });
      expectAllSame(res, { atol: 1e-5 });
    }));

  it('gatedActivation (SwiGLU, GeGLU, GeGLU-tanh) with gradients', () =>
    tidy(() => {
      const r = rng(7);
      const xd = randnT(r, [2, 3, 14], 'float32', 2);
      const res = both((device) => {
        const x = xd.to(device).requiresGrad_(true);
        const s = gatedActivation(x, 'swiglu');
        const g = gatedActivation(transpose(x, 0, 1), 'geglu');
        const t = gatedActivation(x, 'geglu-tanh');
        s.mul(transpose(g, 0, 1))
          .add(t)
          .sum()
          .backward();
        return [s, g, t, x.grad!.clone()];
      });
      expectAllSame(res, { atol: 1e-5 });
    }));

  it('linearActivation (ReLU, GELU, GELU-tanh) with gradients', () =>
    tidy(() => {
      const r = rng(8);
      const xd = randnT(r, [2, 3, 6], 'float32');
      const wd = randnT(r, [5, 6], 'float32');
      const bd = randnT(r, [5], 'float32');
      const res = both((device) => {
        const x = xd.to(device).requiresGrad_(true);
        const w = wd.to(device).requiresGrad_(true);
        const b = bd.to(device).requiresGrad_(true);
        const ys = LINEAR_ACTIVATIONS.map((a, i) => linearActivation(x, w, i === 1 ? null : b, a));
        ys[0].add(ys[1]).mul(ys[2]).sum().backward();
        return [...ys, x.grad!.clone(), w.grad!.clone(), b.grad!.clone()];
      });
      expectAllSame(res, { atol: 1e-5 });
    }));

  it('scaledDotProductAttention (GQA, causal, packed) with gradients', () =>
    tidy(() => {
      const r = rng(5);
      const qd = randnT(r, [1, 4, 7, 8], 'float32');
      const kd = randnT(r, [1, 2, 7, 8], 'float32');
      const vd = randnT(r, [1, 2, 7, 8], 'float32');
      const cu = tensor([0, 3, 7]);
      const res = both((device) => {
        const q = qd.to(device).requiresGrad_(true);
        const k = kd.to(device).requiresGrad_(true);
        const v = vd.to(device).requiresGrad_(true);
        const o = scaledDotProductAttention(q, k, v, { isCausal: true, cuSeqlens: cu.to(device) });
        o.square().sum().backward();
        return [o, q.grad!.clone(), k.grad!.clone(), v.grad!.clone()];
      });
      expectAllSame(res, { atol: 1e-5 });
    }));

  it('AdamW, SGD and gradient norms', () =>
    tidy(() => {
      const r = rng(6);
      const pd = randnT(r, [5, 3], 'float32');
      const gd = randnT(r, [5, 3], 'float32');
      const res = both((device) => {
        // clones: on the CPU, to() is a view of pd, which the optimizers update in place
        const a = pd.to(device).clone().requiresGrad_(true);
        const s = pd.to(device).clone().requiresGrad_(true);
        const adam = new AdamW([a], { lr: 0.01, weightDecay: 0.1 });
        const sgd = new SGD([s], { lr: 0.1, momentum: 0.9, nesterov: true });
        for (let i = 0; i < 3; i++) {
          for (const p of [a, s]) {
            p.grad?.dispose();
            p.grad = gd.to(device).mul(i + 1);
          }
          adam.step();
          sgd.step();
        }
        const norm = getTotalNorm([a, s], 2);
        return [a.detach(), s.detach(), tensor(norm, { dtype: 'float64' })];
      });
      // the norm is float64 but of float32 parameters: float32 tolerances
      expectAllSame(res, { rtol: 1e-5, atol: 1e-6 });
    }));
});
