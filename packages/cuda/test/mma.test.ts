// The warp-level matrix primitives of native/src/kernels/mma.cuh (mma.sync m16n8k16 bf16/f16 with
// fp32 accumulators, ldmatrix x1/x2/x4 and .trans, 16-bit packing): their self-test program
// (native/emu/test/mma_selftest.cu), built with the host compiler against the emulator, multiplies
// random tiles through the primitives and compares with plain loops over the PTX ISA's fragment
// layouts. Two builds: the emulator's own exchange, and the __shfl_sync variant that pre-sm_80 GPUs
// use (MPC_MMA_SHFL). The same program compiles with nvcc and runs on a GPU.
// Then the tensor-core attention kernels (attention.cu, bf16 / f16 with D, Dv in {64, 128} and MLA's
// (192, 128); forward and backward) on the emulator against the CUDA-core kernels
// (MEGAPATCH_ATTENTION_MMA=0) and the CPU backend, with and without the cp.async prefetch of the
// next tile (MEGAPATCH_ATTENTION_PIPELINE=0), with 64- and 128-row forward tiles
// (MEGAPATCH_ATTENTION_FWD_ROWS=128), with 128-key forward tiles (MEGAPATCH_ATTENTION_FWD_KEYS=128), with the products on wgmma (MEGAPATCH_ATTENTION_WGMMA=64
// and =1, with and without MEGAPATCH_ATTENTION_WGMMA_OVERLAP, one or two warpgroups a block,
// warp-specialised; MEGAPATCH_ATTENTION_WGMMA_BWD=1, 2, ws), and
// with the fused single-pass backward (MEGAPATCH_ATTENTION_BWD=fused).
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  Generator,
  randn,
  scaledDotProductAttention as sdpa,
  type Tensor,
  tensor,
  tidy,
} from '@megapatch/tensor';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { deviceUnderTest } from './device-under-test.js';

const pkg = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const hasGxx = spawnSync('g++', ['--version'], { encoding: 'utf8' }).status === 0;
const skipped = hasGxx ? '' : ' (skipped: g++ is not installed)';
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-cuda-mma-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function buildAndRun(name: string, defines: string[]): void {
  const exe = path.join(tmp, name);
  execFileSync(
    'g++',
    [
      '-std=c++17',
      '-O1',
      '-x',
      'c++',
      '-DMEGAPATCH_CUDA_EMULATOR=1',
      ...defines,
      '-I',
      'native/emu',
      '-I',
      'native/src/kernels',
      'native/emu/test/mma_selftest.cu',
      'native/emu/emu.cc',
      '-o',
      exe,
    ],
    { cwd: pkg, timeout: 120_000, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const run = spawnSync(exe, [], { encoding: 'utf8', timeout: 120_000 });
  const out = `${run.stdout}${run.stderr}`;
  expect(out).toMatch(/^ok \d+ checks/m);
  expect(run.status, out).toBe(0);
}

// (on a GPU run, gpu/run.sh builds the self-test with nvcc instead: its mma-selftest step)
describe.skipIf(process.env.MEGAPATCH_TEST_DEVICE?.startsWith('cuda:') ?? false)(
  'warp matrix primitives (mma.cuh)',
  () => {
    it.skipIf(!hasGxx)(
      `pass their self-test under the emulator${skipped}`,
      () => buildAndRun('mma', []),
      240_000,
    );
    it.skipIf(!hasGxx)(
      `pass their self-test with the shuffle variant${skipped}`,
      () => buildAndRun('mma-shfl', ['-DMPC_MMA_SHFL=1']),
      240_000,
    );
  },
);

// ---- the tensor-core attention kernels on the emulator (or a GPU) -----------------------------
// MEGAPATCH_TEST_DEVICE=cuda:0 runs them on a GPU (gpu/run.sh's attn-gpu step): the same
// comparisons, where the emulator's exact ones hold on the tensor cores too (the same instructions
// in the same order); wgmma against mma.sync is within the tolerances there (other instructions).
const { device: DEV, onGpu, skip: noAddon, register } = deviceUnderTest();

interface MmaCase {
  name: string;
  dtype: 'bfloat16' | 'float16';
  B: number;
  Hq: number;
  Hkv: number;
  Sq: number;
  Sk: number;
  D: number;
  Dv: number;
  causal?: boolean;
  mask?: 'bool' | 'float';
  cu?: number[];
  kTransposed?: boolean;
}

const MMA_CASES: MmaCase[] = [
  {
    name: 'GQA, Sq 70 / Sk 100, D 64',
    dtype: 'bfloat16',
    B: 2,
    Hq: 4,
    Hkv: 2,
    Sq: 70,
    Sk: 100,
    D: 64,
    Dv: 64,
  },
  {
    name: 'causal, S 80, D 128',
    dtype: 'float16',
    B: 1,
    Hq: 2,
    Hkv: 1,
    Sq: 80,
    Sk: 80,
    D: 128,
    Dv: 128,
    causal: true,
  },
  {
    name: 'causal Sq 40 < Sk 90, D 128 / Dv 64, k transposed',
    dtype: 'bfloat16',
    B: 1,
    Hq: 2,
    Hkv: 2,
    Sq: 40,
    Sk: 90,
    D: 128,
    Dv: 64,
    causal: true,
    kTransposed: true,
  },
  {
    name: 'bool mask with dead rows + causal, D 64 / Dv 128',
    dtype: 'bfloat16',
    B: 1,
    Hq: 2,
    Hkv: 1,
    Sq: 67,
    Sk: 67,
    D: 64,
    Dv: 128,
    causal: true,
    mask: 'bool',
  },
  {
    name: 'additive mask, D 64',
    dtype: 'float16',
    B: 2,
    Hq: 2,
    Hkv: 2,
    Sq: 33,
    Sk: 129,
    D: 64,
    Dv: 64,
    mask: 'float',
  },
  {
    name: 'cuSeqlens + causal + GQA, D 64',
    dtype: 'bfloat16',
    B: 1,
    Hq: 4,
    Hkv: 2,
    Sq: 150,
    Sk: 150,
    D: 64,
    Dv: 64,
    causal: true,
    cu: [0, 17, 60, 61, 150],
  },
  {
    // the training shape in small: causal GQA with tiles that every row sees whole (the kernels'
    // fast path without per-element checks) as well as diagonal ones
    name: 'causal GQA, S 200, D 64',
    dtype: 'bfloat16',
    B: 1,
    Hq: 4,
    Hkv: 2,
    Sq: 200,
    Sk: 200,
    D: 64,
    Dv: 64,
    causal: true,
  },
  {
    // MLA (DeepSeek-V3, Moonlight): q/k heads of 128 + 64 rope dims, v heads of 128, Hq = Hkv
    name: 'MLA heads D 192 / Dv 128, causal, Sq 70',
    dtype: 'bfloat16',
    B: 1,
    Hq: 2,
    Hkv: 2,
    Sq: 70,
    Sk: 70,
    D: 192,
    Dv: 128,
    causal: true,
  },
  {
    name: 'MLA heads D 192 / Dv 128, cuSeqlens + causal, k transposed',
    dtype: 'float16',
    B: 1,
    Hq: 1,
    Hkv: 1,
    Sq: 90,
    Sk: 90,
    D: 192,
    Dv: 128,
    causal: true,
    cu: [0, 33, 34, 90],
    kTransposed: true,
  },
  {
    name: 'MLA heads D 192 / Dv 128, Sq 20 < Sk 75, additive mask',
    dtype: 'bfloat16',
    B: 1,
    Hq: 2,
    Hkv: 1,
    Sq: 20,
    Sk: 75,
    D: 192,
    Dv: 128,
    mask: 'float',
  },
];

const tick = () => new Promise<void>((resolve) => setImmediate(resolve));

/** fn() with the environment variable `name` set to `value` (the native side reads it per call). */
// The emulator's priority-schedule seeds for case i: i + 1, or MEGAPATCH_TEST_EMU_SEEDS seeds (pnpm
// test:heavy), distinct across the cases.
function prioritySeeds(i: number): number[] {
  const raw = process.env.MEGAPATCH_TEST_EMU_SEEDS ?? '1';
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1)
    throw new Error(`MEGAPATCH_TEST_EMU_SEEDS=${raw}: expected a positive integer`);
  return Array.from({ length: n }, (_, k) => 1 + i + k * MMA_CASES.length);
}

function withEnv<T>(name: string, value: string, fn: () => T): T {
  const prev = process.env[name];
  process.env[name] = value;
  try {
    return fn();
  } finally {
    if (prev === undefined) delete process.env[name];
    else process.env[name] = prev;
  }
}

const numbers = (t: Tensor): number[] =>
  Array.from(t.to('cpu').to('float32').toTypedArray() as ArrayLike<number>);

describe.skipIf(noAddon !== '')(
  `tensor-core attention on ${onGpu ? DEV : 'the emulator'}${noAddon ? ` (skipped: ${noAddon})` : ''}`,
  () => {
    beforeAll(async () => {
      await register();
    });
    for (const c of MMA_CASES) {
      // a minute a seed: pnpm test:heavy runs 8 a case, beside the other packages' heavy tests on
      // the same cores (alone, the longest case takes ~35 s with 8)
      const timeout = 60_000 * prioritySeeds(0).length;
      it(`${c.name}, ${c.dtype}: forward and backward match the CUDA-core kernels and the CPU`, {
        timeout,
      }, async () => {
        const gen = new Generator(c.Sq * 7 + c.Sk + c.D);
        const { q, k, v, mask, cu, gout } = tidy(() => {
          const q = randn([c.B, c.Hq, c.Sq, c.D], { generator: gen }).to(c.dtype);
          const k = c.kTransposed
            ? randn([c.B, c.Sk, c.Hkv, c.D], { generator: gen }).to(c.dtype).transpose(1, 2)
            : randn([c.B, c.Hkv, c.Sk, c.D], { generator: gen }).to(c.dtype);
          // |v| <= 1 bounds the error of rounding P to 16 bits in P V (below)
          const v = randn([c.B, c.Hkv, c.Sk, c.Dv], { generator: gen }).tanh().to(c.dtype);
          let mask: Tensor | null = null;
          if (c.mask === 'bool') {
            const vals = Array.from({ length: c.Sq * c.Sk }, (_, i) =>
              Math.floor(i / c.Sk) % 7 === 3 ? false : ((i * 2654435761) >>> 0) % 10 < 7,
            );
            mask = tensor(Uint8Array.from(vals, Number), { shape: [c.Sq, c.Sk], dtype: 'bool' });
          } else if (c.mask === 'float') {
            mask = randn([c.B, 1, c.Sq, c.Sk], { generator: gen }).to(c.dtype);
          }
          const cu = c.cu ? tensor(c.cu, { dtype: 'int64' }) : null;
          const gout = randn([c.B, c.Hq, c.Sq, c.Dv], { generator: gen }).to(c.dtype);
          return { q, k, v, mask, cu, gout };
        });
        try {
          // out, then dq, dk, dv of sum(out * gout); the runs yield to the event loop between them
          // (tick: a file of long synchronous tests starves the worker's messages to vitest)
          const run = (dev: string) =>
            tidy(() => {
              const [ql, kl, vl] = [q, k, v].map((t) => t.to(dev).detach().requiresGrad_(true));
              const out = sdpa(ql, kl, vl, {
                isCausal: c.causal ?? false,
                attnMask: mask ? mask.to(dev) : null,
                cuSeqlens: cu ? cu.to(dev) : null,
              });
              out.backward(gout.to(dev));
              return [out, ql.grad!, kl.grad!, vl.grad!].map(numbers);
            });
          const fmaAll = withEnv('MEGAPATCH_ATTENTION_MMA', '0', () => run(DEV));
          await tick();
          const mmaAll = run(DEV);
          await tick();
          // the same arithmetic with each tile loaded between two barriers instead of prefetched
          // by cp.async (the emulator delays those copies until their wait): the same bits
          const unpipelined = withEnv('MEGAPATCH_ATTENTION_PIPELINE', '0', () => run(DEV));
          await tick();
          for (let o = 0; o < 4; o++)
            expect(unpipelined[o], `output ${o} without cp.async`).toEqual(mmaAll[o]);
          // 128-row forward tiles (two m-tiles a warp) do each row's arithmetic in the same order
          // when their key tiles are those of the 64-row blocks: the same width (64 keys; 32 with
          // Dv 128) and the same start (key 0; with cuSeqlens a block's first key tile starts at
          // its first row's sequence). Otherwise the online softmax rescales at other tile
          // boundaries: checked below within the tolerances of the CUDA-core comparison
          const rows128 = withEnv('MEGAPATCH_ATTENTION_FWD_ROWS', '128', () => run(DEV));
          await tick();
          if (!c.cu && c.Dv === 64)
            for (let o = 0; o < 4; o++)
              expect(rows128[o], `output ${o} with 128-row forward tiles`).toEqual(mmaAll[o]);
          // FlashAttention-2's single backward pass (dQ summed over key tiles by atomics): the
          // forward and dK, dV are the same arithmetic, bit for bit; dQ adds the same rounded dS K
          // products in another order (checked below within the tolerances)
          const fused = withEnv('MEGAPATCH_ATTENTION_BWD', 'fused', () => run(DEV));
          await tick();
          for (const o of [0, 2, 3]) expect(fused[o], `output ${o}, fused backward`).toEqual(mmaAll[o]);
          // variants for measuring on a GPU (D + Dv <= 128): dK/dV tiles of 32 queries add the same
          // products in the same order; uncapped registers change no arithmetic
          for (const [name, value] of [
            ['MEGAPATCH_ATTENTION_BWD_BQ', '32'],
            ['MEGAPATCH_ATTENTION_OCC', '0'],
            ['MEGAPATCH_ATTENTION_DQ_OCC', '1'],
          ] as const) {
            const variant = withEnv(name, value, () => run(DEV));
            await tick();
            for (let o = 0; o < 4; o++)
              expect(variant[o], `output ${o} with ${name}=${value}`).toEqual(mmaAll[o]);
          }
          // 128 keys a forward tile on mma.sync (MEGAPATCH_ATTENTION_FWD_KEYS=128, D + Dv <= 128):
          // the online softmax rescales at other tile boundaries (checked below within the
          // tolerances); the same products in the same order as the wgmma forward's 128-key tiles
          // (below: the same bits on the emulator)
          const keys128 = withEnv('MEGAPATCH_ATTENTION_FWD_KEYS', '128', () => run(DEV));
          await tick();
          // the forward on wgmma (sm_90a; the emulator carries each wgmma out at its wait), with
          // the next tile's scores overlapping this tile's P V (the default) and without: with 64
          // keys a tile both do the same products in the same order as mma.sync, the same bits;
          // with 128 the online softmax rescales at other tile boundaries (checked below within
          // the tolerances of the CUDA-core comparison), the same bits with and without overlap.
          // On a GPU (other instructions than mma.sync) all are checked within the tolerances.
          // The backward's products on wgmma (MEGAPATCH_ATTENTION_WGMMA_BWD=1: dK/dV where D + Dv
          // <= 128, dQ where D + Dv <= 192) are the same as mma.sync's, in the same order; with two
          // warpgroups a block (=2) too (the emulator adds a product's k terms one by one in order,
          // so tiles that start elsewhere give the same sums; a GPU's tensor cores need not), and
          // with dK/dV and dQ warp-specialised (=ws: a loader warpgroup and two of 64 keys, or of 64
          // queries).
          // Two warpgroups a block (MEGAPATCH_ATTENTION_FWD_ROWS=128: 128 query rows sharing each
          // K/V tile) do each row's arithmetic as one warpgroup does when the key tiles start at the
          // same key (not so with cuSeqlens, as for the 128-row mma.sync tiles above).
          // Warp-specialised (MEGAPATCH_ATTENTION_WGMMA_WS=1, D + Dv <= 128: a loader warpgroup and
          // two consumers of 64 rows and 64-key tiles): the same arithmetic again.
          const wgmma = async (keys: string, overlap: string, bwd = '0', rows = '64', ws = '0') => {
            const r = withEnv('MEGAPATCH_ATTENTION_WGMMA', keys, () =>
              withEnv('MEGAPATCH_ATTENTION_WGMMA_OVERLAP', overlap, () =>
                withEnv('MEGAPATCH_ATTENTION_WGMMA_BWD', bwd, () =>
                  withEnv('MEGAPATCH_ATTENTION_FWD_ROWS', rows, () =>
                    withEnv('MEGAPATCH_ATTENTION_WGMMA_WS', ws, () => run(DEV)),
                  ),
                ),
              ),
            );
            await tick();
            return r;
          };
          // the warp-specialised forms under the priority schedule, a run a seed
          const priorityRuns = async () => {
            const out: Record<string, number[][]> = {};
            for (const seed of prioritySeeds(MMA_CASES.indexOf(c)))
              out[`warp-specialised, priority ${seed}`] = await withEnv(
                'MEGAPATCH_CUDA_EMU_SCHEDULE',
                `priority:${seed}`,
                () => wgmma('64', '1', 'ws', '64', '1'),
              );
            return out;
          };
          // (MEGAPATCH_TEST_WGMMA=0: without them; gpu/run.sh when the self-test failed on the GPU)
          const withWgmma = process.env.MEGAPATCH_TEST_WGMMA !== '0';
          const wgRuns: Record<string, number[][]> = withWgmma
            ? {
                '64': await wgmma('64', '1'),
                '64, no overlap': await wgmma('64', '0'),
                '128': await wgmma('1', '1'),
                '128, no overlap': await wgmma('128', '0'),
                backward: await wgmma('0', '1', '1'),
                'backward, two warpgroups': await wgmma('0', '1', '2'),
                '64, two warpgroups': await wgmma('64', '1', '0', '128'),
                '128, two warpgroups': await wgmma('1', '1', '0', '128'),
                '128, two warpgroups, no overlap': await wgmma('1', '0', '0', '128'),
                // (MEGAPATCH_TEST_WGMMA_WS=0: without it; gpu/run.sh checks it in a step of its own)
                ...(process.env.MEGAPATCH_TEST_WGMMA_WS === '0'
                  ? {}
                  : {
                      'warp-specialised': await wgmma('64', '1', '0', '64', '1'),
                      'backward, warp-specialised': await wgmma('0', '1', 'ws'),
                      // the emulator running each block's threads last to first: the consumers
                      // before the loader (a stage read before it is filled shows)
                      ...(onGpu
                        ? {}
                        : {
                            'warp-specialised, reversed': await withEnv(
                              'MEGAPATCH_CUDA_EMU_SCHEDULE',
                              'reverse',
                              () => wgmma('64', '1', 'ws', '64', '1'),
                            ),
                            // random warp ranks, the highest-ranked ready warp always next: a
                            // consumer runs as far ahead of the loader as the barriers let it (a
                            // stage read before it is filled, or refilled before it is read,
                            // shows); a seed a case, MEGAPATCH_TEST_EMU_SEEDS a case (pnpm
                            // test:heavy)
                            ...(await priorityRuns()),
                          }),
                    }),
              }
            : {};
          if (!onGpu && withWgmma)
            for (let o = 0; o < 4; o++) {
              expect(wgRuns['64'][o], `output ${o} with wgmma, 64 keys a tile`).toEqual(mmaAll[o]);
              expect(wgRuns['64, no overlap'][o], `output ${o} with wgmma, 64 keys, no overlap`).toEqual(
                mmaAll[o],
              );
              expect(wgRuns.backward[o], `output ${o} with the backward on wgmma`).toEqual(mmaAll[o]);
              expect(
                wgRuns['backward, two warpgroups'][o],
                `output ${o}, backward on two warpgroups`,
              ).toEqual(mmaAll[o]);
              // (the forward's key tiles start elsewhere with cuSeqlens, and its output enters the
              // gradients through delta: checked below within the tolerances then)
              if (wgRuns['warp-specialised, reversed'] && !c.cu)
                expect(
                  wgRuns['warp-specialised, reversed'][o],
                  `output ${o}, warp-specialised, reversed`,
                ).toEqual(mmaAll[o]);
              for (const [label, w] of Object.entries(wgRuns))
                if (label.startsWith('warp-specialised, priority') && !c.cu)
                  expect(w[o], `output ${o}, ${label}`).toEqual(mmaAll[o]);
              if (wgRuns['backward, warp-specialised'])
                expect(
                  wgRuns['backward, warp-specialised'][o],
                  `output ${o}, backward warp-specialised`,
                ).toEqual(mmaAll[o]);
              expect(wgRuns['128, no overlap'][o], `output ${o} with wgmma, 128 keys, no overlap`).toEqual(
                wgRuns['128'][o],
              );
              if (c.D + c.Dv <= 128)
                expect(keys128[o], `output ${o}, mma.sync with 128 keys a tile`).toEqual(wgRuns['128'][o]);
              expect(
                wgRuns['128, two warpgroups, no overlap'][o],
                `output ${o} with wgmma, 128 keys, two warpgroups, no overlap`,
              ).toEqual(wgRuns['128, two warpgroups'][o]);
              if (!c.cu) {
                expect(wgRuns['64, two warpgroups'][o], `output ${o} with wgmma, two warpgroups`).toEqual(
                  mmaAll[o],
                );
                if (wgRuns['warp-specialised'])
                  expect(wgRuns['warp-specialised'][o], `output ${o} with wgmma, warp-specialised`).toEqual(
                    mmaAll[o],
                  );
                expect(
                  wgRuns['128, two warpgroups'][o],
                  `output ${o} with wgmma, 128 keys, two warpgroups`,
                ).toEqual(wgRuns['128'][o]);
              }
            }
          const cpuAll = run('cpu');
          const [mma, fma, cpu] = [mmaAll[0], fmaAll[0], cpuAll[0]];
          // Both kernels round out to the storage dtype (2 ulps of |out|); the tensor-core one
          // also rounds P to it before P V: at most u * sum_j p_j |v_j| / l <= u * max |v| = u.
          const u = c.dtype === 'bfloat16' ? 2 ** -8 : 2 ** -11;
          let differs = 0;
          for (let i = 0; i < mma.length; i++) {
            const tol = 2 * u * Math.abs(fma[i]) + u;
            expect(Math.abs(mma[i] - fma[i]), `out[${i}] vs CUDA cores`).toBeLessThanOrEqual(tol);
            expect(Math.abs(mma[i] - cpu[i]), `out[${i}] vs CPU`).toBeLessThanOrEqual(tol);
            expect(Math.abs(rows128[0][i] - fma[i]), `out[${i}], 128-row tiles`).toBeLessThanOrEqual(tol);
            expect(Math.abs(keys128[0][i] - fma[i]), `out[${i}], 128-key tiles`).toBeLessThanOrEqual(tol);
            for (const [label, w] of Object.entries(wgRuns))
              expect(Math.abs(w[0][i] - fma[i]), `out[${i}], wgmma ${label}`).toBeLessThanOrEqual(tol);
            if (mma[i] !== fma[i]) differs++;
          }
          // the tensor-core path ran (its rounding of P differs somewhere)
          expect(differs).toBeGreaterThan(0);
          // Gradients: P and dS are rounded to 16 bits before the products dV += P^T dO,
          // dK += dS^T Q, dQ += dS K (and out differs by its rounding, which enters delta): bounded
          // here by 16 u of the gradient's largest magnitude, plus 2 ulps of the value.
          for (const [gi, name] of [
            [1, 'dq'],
            [2, 'dk'],
            [3, 'dv'],
          ] as const) {
            const [gm, gf, gc] = [mmaAll[gi], fmaAll[gi], cpuAll[gi]];
            const scale = gf.reduce((a, x) => Math.max(a, Math.abs(x)), 0);
            for (let i = 0; i < gm.length; i++) {
              const tol = 16 * u * scale + 2 * u * Math.abs(gf[i]);
              expect(Math.abs(gm[i] - gf[i]), `${name}[${i}] vs CUDA cores`).toBeLessThanOrEqual(tol);
              expect(Math.abs(gm[i] - gc[i]), `${name}[${i}] vs CPU`).toBeLessThanOrEqual(tol);
              const g128 = rows128[gi][i];
              expect(Math.abs(g128 - gf[i]), `${name}[${i}], 128-row tiles`).toBeLessThanOrEqual(tol);
              const k128 = keys128[gi][i];
              expect(Math.abs(k128 - gf[i]), `${name}[${i}], 128-key tiles`).toBeLessThanOrEqual(tol);
              for (const [label, w] of Object.entries(wgRuns))
                expect(Math.abs(w[gi][i] - gf[i]), `${name}[${i}], wgmma ${label}`).toBeLessThanOrEqual(tol);
              const gfu = fused[gi][i];
              expect(Math.abs(gfu - gf[i]), `${name}[${i}], fused backward`).toBeLessThanOrEqual(tol);
            }
          }
        } finally {
          for (const t of [q, k, v, mask, cu, gout]) t?.dispose();
        }
      });
    }
  },
);
