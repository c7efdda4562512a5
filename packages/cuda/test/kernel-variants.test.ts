// The kernel variants that environment switches select at launch time (the GPU bench times each
// beside the default) on the emulator: the gated activation's vectors in flight a thread
// (MEGAPATCH_GLU_UNROLL 1, 2, 4) give the default's bits; the block-per-row norm forward (MEGAPATCH_NORM_FWD=block) and the two-pass
// cross-entropy statistics (MEGAPATCH_CE_ONE_PASS=0) agree with the defaults within their rounding.
import {
  crossEntropyShardMaxStats,
  Generator,
  gatedActivation,
  randint,
  randn,
  rmsNorm,
  type Tensor,
  tidy,
} from '@megapatch/tensor';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadEmulatorAddon } from '../src/native.js';

const built = loadEmulatorAddon();
const skip = 'error' in built ? built.error : '';
const DEV = 'cudaemu:0';

const vals = (t: Tensor): number[] => Array.from(t.cpu().to('float64').toTypedArray() as Float64Array);

/** fn's result with the environment variable `name` set to `value` (restored after). */
function withEnv<T>(name: string, value: string | undefined, fn: () => T): T {
  const prev = process.env[name];
  if (value === undefined) delete process.env[name];
  else process.env[name] = value;
  try {
    return fn();
  } finally {
    if (prev === undefined) delete process.env[name];
    else process.env[name] = prev;
  }
}

describe.skipIf(skip !== '')(`kernel variants on the emulator${skip ? ` (skipped: ${skip})` : ''}`, () => {
  beforeAll(async () => {
    await import('../src/emulator.js');
  });
  afterEach(() => {
    for (const k of ['MEGAPATCH_GLU_UNROLL', 'MEGAPATCH_NORM_FWD', 'MEGAPATCH_CE_ONE_PASS'])
      delete process.env[k];
  });

  it('gated activation: 1, 2 or 4 vectors a thread give the same bits', () => {
    tidy(() => {
      const gen = new Generator().manualSeed(11);
      // half rows of 1000 bf16 (125 vectors: partial unrolled groups) and of 4100 float32 (1025 vectors)
      for (const [rows, f, dtype] of [
        [6, 1000, 'bfloat16'],
        [3, 4100, 'float32'],
      ] as const) {
        const x0 = randn([rows, 2 * f], { generator: gen }).to(DEV, dtype);
        const g = randn([rows, f], { generator: gen }).to(DEV, dtype);
        const run = () =>
          tidy(() => {
            const x = x0.detach().requiresGrad_(true);
            const y = gatedActivation(x, 'swiglu');
            y.backward(g);
            return [vals(y), vals(x.grad!)];
          });
        const [y1, d1] = run();
        for (const u of ['2', '4']) {
          const [yu, du] = withEnv('MEGAPATCH_GLU_UNROLL', u, run);
          expect(yu, `${dtype} forward, ${u} vectors`).toEqual(y1);
          expect(du, `${dtype} backward, ${u} vectors`).toEqual(d1);
        }
      }
    });
  });

  it('norm forward: a row in a warp registers and a row a block agree within their rounding', () => {
    tidy(() => {
      const gen = new Generator().manualSeed(12);
      const x = randn([9, 2048], { generator: gen }).to(DEV, 'bfloat16');
      const w = randn([2048], { generator: gen }).to(DEV, 'bfloat16');
      const warp = vals(rmsNorm(x, [2048], w, 1e-5));
      const block = vals(withEnv('MEGAPATCH_NORM_FWD', 'block', () => rmsNorm(x, [2048], w, 1e-5)));
      let worst = 0;
      for (let i = 0; i < warp.length; i++)
        worst = Math.max(worst, Math.abs(warp[i] - block[i]) / Math.max(Math.abs(block[i]), 1e-3));
      // one bf16 rounding apart at most (the statistics differ in their last float32 bits)
      expect(worst).toBeLessThanOrEqual(2 ** -7);
      expect(warp.some((v, i) => v !== 0 && v === block[i])).toBe(true);
    });
  });

  it('cross-entropy statistics: one pass and two passes agree (the maximum exactly)', () => {
    tidy(() => {
      const gen = new Generator().manualSeed(13);
      const V = 1500;
      const logits = randn([5, V], { generator: gen }).mul(4).to(DEV, 'bfloat16');
      const target = randint(0, V, [5], { generator: gen, dtype: 'int64' }).to(DEV);
      const layout = { start: 0, localReal: V, withShiftedSum: true };
      const one = crossEntropyShardMaxStats(logits, target, layout);
      const two = withEnv('MEGAPATCH_CE_ONE_PASS', '0', () =>
        crossEntropyShardMaxStats(logits, target, layout),
      );
      expect(vals(one.rowMax)).toEqual(vals(two.rowMax));
      const [a, b] = [vals(one.stats), vals(two.stats)];
      for (let i = 0; i < a.length; i++)
        expect(Math.abs(a[i] - b[i]), `stat ${i}`).toBeLessThanOrEqual(1e-4 * Math.max(1, Math.abs(b[i])));
      // predicted (row 0 of the stats) exactly
      expect(a.slice(0, 5)).toEqual(b.slice(0, 5));
    });
  });
});
