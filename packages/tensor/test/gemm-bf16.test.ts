// bfloat16 GEMM (oneDNN's native bf16 kernels where the CPU has them, fp32 panels otherwise)
// against a float64 product of the same bf16 inputs. Small-integer operands make the fp32
// accumulation exact, so the only rounding left is the final one to bf16 and results must equal
// the round-to-nearest-even of the exact product bit for bit, whatever the layout. Normal-
// distributed operands check realistic values within half a bf16 ulp plus accumulation slack.
import { existsSync, readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import type { Backend, Tensor } from '../src/index.js';
import * as T from '../src/index.js';

const scratch = new Float32Array(1);
const bits = new Uint32Array(scratch.buffer);

/** x rounded to bfloat16, nearest even (x must be exact in float32, as every case here is). */
function roundBf16(x: number): number {
  scratch[0] = x;
  const u = bits[0];
  bits[0] = (((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) << 16) >>> 0;
  return scratch[0];
}

/** One bf16 ulp at |x| (8 significant bits). */
function ulpBf16(x: number): number {
  const a = Math.abs(x);
  return a < 2 ** -126 ? 2 ** -133 : 2 ** (Math.floor(Math.log2(a)) - 7);
}

/** Deterministic integers in [-r, r] (mulberry32), exact in bf16. */
function ints(n: number, r: number, seed: number): number[] {
  let s = seed >>> 0;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out.push((((t ^ (t >>> 14)) >>> 0) % (2 * r + 1)) - r);
  }
  return out;
}

function intTensor(shape: number[], seed: number, r = 8): Tensor {
  const n = shape.reduce((p, s) => p * s, 1);
  return T.tensor(ints(n, r, seed), { dtype: 'bfloat16', shape });
}

const values = (t: Tensor): Float32Array => t.toTypedArray() as Float32Array;
type GemmOperand = Parameters<Backend['gemm']>[4];

interface Product {
  sum: Float64Array; // exact alpha * A @ B + beta * C
  abs: Float64Array; // sum of |alpha * a_ik * b_kj|, the scale of the accumulation error
}

/** float64 batched product of row-major [batch, M, K] and [batch, K, N] value arrays. */
function product(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  batch: number,
  M: number,
  K: number,
  N: number,
  alpha = 1,
  beta = 0,
  c?: ArrayLike<number>,
): Product {
  const sum = new Float64Array(batch * M * N);
  const abs = new Float64Array(batch * M * N);
  for (let p = 0; p < batch; p++)
    for (let i = 0; i < M; i++)
      for (let j = 0; j < N; j++) {
        let s = 0;
        let m = 0;
        for (let k = 0; k < K; k++) {
          const t = a[p * M * K + i * K + k] * b[p * K * N + k * N + j];
          s += t;
          m += Math.abs(t);
        }
        const o = p * M * N + i * N + j;
        sum[o] = alpha * s + (beta !== 0 && c ? beta * c[o] : 0);
        abs[o] = Math.abs(alpha) * m;
      }
  return { sum, abs };
}

/** Checks got == want rounded to bf16; returns how many elements needed the rounding. */
function expectRounded(got: ArrayLike<number>, want: ArrayLike<number>, label: string): number {
  expect(got.length, label).toBe(want.length);
  let rounded = 0;
  for (let i = 0; i < want.length; i++) {
    const w = roundBf16(want[i]);
    if (w !== want[i]) rounded++;
    if (got[i] !== w) expect.fail(`${label} element ${i}: got ${got[i]}, expected ${w} (exact ${want[i]})`);
  }
  return rounded;
}

// Measured on AVX512-BF16 (oneDNN) and on the fp32 panels: every error is at most half a bf16 ulp
// (the result is the correctly rounded product). The slack term covers fp32 accumulation in
// another order; a kernel that truncates instead of rounding, or reads a wrong element, fails.
function expectNear(got: ArrayLike<number>, want: Product, label: string): void {
  expect(got.length, label).toBe(want.sum.length);
  for (let i = 0; i < got.length; i++) {
    const tol = 0.5 * ulpBf16(want.sum[i]) + 2 ** -18 * want.abs[i];
    if (!(Math.abs(got[i] - want.sum[i]) <= tol)) {
      expect.fail(`${label} element ${i}: got ${got[i]}, expected ${want.sum[i]} ± ${tol}`);
    }
  }
}

/** A [rows, cols] view of a bf16 tensor in the given layout ('n' contiguous, 't' a transposed view). */
function layout(shape: number[], kind: 'n' | 't', seed: number): Tensor {
  if (kind === 'n') return intTensor(shape, seed);
  const n = shape.length;
  const base = intTensor([...shape.slice(0, n - 2), shape[n - 1], shape[n - 2]], seed);
  return T.transpose(base, -1, -2);
}

const SIZES = [1, 3, 17, 129];

describe('bf16 GEMM: exact small-integer products', () => {
  afterEach(() => T.emptyCache());

  it('matmul in every transpose layout and odd size equals the rounded exact product', () => {
    let seed = 1;
    for (const M of SIZES)
      for (const K of SIZES)
        for (const N of [1, 17, 129])
          for (const la of ['n', 't'] as const)
            for (const lb of ['n', 't'] as const) {
              T.tidy(() => {
                const a = layout([M, K], la, seed++);
                const b = layout([K, N], lb, seed++);
                const want = product(values(a), values(b), 1, M, K, N);
                expectRounded(values(T.matmul(a, b)), want.sum, `${M}x${K}x${N} ${la}${lb}`);
              });
            }
  });

  it('sums large enough to need rounding (K = 1024, |sum| up to 2^16)', () => {
    T.tidy(() => {
      const a = intTensor([33, 1024], 11);
      const b = T.transpose(intTensor([65, 1024], 12), 0, 1);
      const want = product(values(a), values(b), 1, 33, 1024, 65);
      expect(expectRounded(values(T.matmul(a, b)), want.sum, 'K=1024')).toBeGreaterThan(500);
    });
  });

  it('bmm and broadcast matmul over batched strided views', () => {
    T.tidy(() => {
      const [B, M, K, N] = [5, 17, 33, 129];
      // a: [M, B, K] permuted to [B, M, K] (batch stride K, row stride B*K); b: [B, N, K] transposed
      const a = T.permute(intTensor([M, B, K], 21), [1, 0, 2]);
      const b = T.transpose(intTensor([B, N, K], 22), 1, 2);
      expectRounded(values(T.bmm(a, b)), product(values(a), values(b), B, M, K, N).sum, 'bmm views');
      // [B, M, K] @ [K, N]: one weight for every batch (batch stride 0)
      const w = intTensor([K, N], 23);
      const wb = values(T.expand(T.unsqueeze(w, 0), [B, K, N]));
      expectRounded(values(T.matmul(a, w)), product(values(a), wb, B, M, K, N).sum, 'broadcast weight');
      // [1, M, K] expanded against [2, 3, K, N] with a transposed last pair
      const a1 = intTensor([1, M, K], 24);
      const b4 = T.transpose(intTensor([2, 3, N, K], 25), -1, -2);
      const a4 = values(T.expand(a1, [2, 3, M, K]));
      expectRounded(values(T.matmul(a1, b4)), product(a4, values(b4), 6, M, K, N).sum, 'broadcast batch');
    });
  });

  it('non-contiguous inputs with no unit stride', () => {
    T.tidy(() => {
      // [K, M, 2] -> select -> [K, M] with strides (2M, 2) -> transpose: neither stride is 1
      const a = T.transpose(T.select(intTensor([257, 3, 2], 31), 2, 0), 0, 1);
      const b = T.narrow(intTensor([257, 40], 32), 1, 5, 29);
      const want = product(values(a), values(b), 1, 3, 257, 29);
      expect(expectRounded(values(T.matmul(a, b)), want.sum, 'strided')).toBeGreaterThan(0);
    });
  });

  it('linear over [batch, seq, in] and 1-D operands', () => {
    T.tidy(() => {
      const x = intTensor([2, 9, 129], 41);
      const w = intTensor([17, 129], 42);
      const bias = intTensor([17], 43);
      const wt = values(T.transpose(w, 0, 1));
      const want = product(values(x), wt, 1, 18, 129, 17);
      const bv = values(bias);
      // the product is rounded to bf16 before the bias add, which rounds again
      const got = values(T.linear(x, w, bias));
      for (let i = 0; i < got.length; i++) {
        const w2 = roundBf16(roundBf16(want.sum[i]) + bv[i % 17]);
        if (got[i] !== w2) expect.fail(`linear element ${i}: got ${got[i]}, expected ${w2}`);
      }
      const v = intTensor([129], 44);
      expectRounded(
        values(T.matmul(v, T.transpose(w, 0, 1))),
        product(values(v), wt, 1, 1, 129, 17).sum,
        'vec @ mat',
      );
      expectRounded(values(T.matmul(w, v)), product(values(w), values(v), 1, 17, 129, 1).sum, 'mat @ vec');
    });
  });

  it('K = 0 gives zeros (and linear gives the bias)', () => {
    T.tidy(() => {
      const a = T.zeros([3, 0], { dtype: 'bfloat16' });
      const b = T.zeros([0, 5], { dtype: 'bfloat16' });
      expect(Array.from(values(T.matmul(a, b)))).toEqual(new Array(15).fill(0));
      const bias = intTensor([4], 51);
      const y = T.linear(
        T.zeros([2, 0], { dtype: 'bfloat16' }),
        T.zeros([4, 0], { dtype: 'bfloat16' }),
        bias,
      );
      expect(Array.from(values(y))).toEqual([...values(bias), ...values(bias)]);
    });
  });

  it('alpha and beta on the backend GEMM, with a strided C and a no-unit-stride operand', () => {
    const cpu = T.getBackend('cpu');
    // small products go one per thread, large ones through one threaded product at a time
    for (const [B, M, K, N] of [
      [4, 3, 17, 5],
      [2, 129, 129, 129],
    ]) {
      T.tidy(() => {
        const a = intTensor([B, M, K], 61);
        const bt = intTensor([B, N, K], 62); // used as B^T: row stride 1, column stride K
        const cBase = intTensor([B, M, N + 3], 63); // C is its first N columns: row stride N + 3
        const c0 = values(T.narrow(cBase, 2, 0, N));
        const bv = values(T.transpose(bt, 1, 2));
        const want = product(values(a), bv, B, M, K, N, 0.5, -2, c0);
        const op = (tensor: Tensor, bs: number, rs: number, cs: number): GemmOperand => ({
          tensor,
          bs,
          rs,
          cs,
        });
        cpu.gemm(
          B,
          M,
          N,
          K,
          op(a, M * K, K, 1),
          op(bt, N * K, 1, K),
          op(cBase, M * (N + 3), N + 3, 1),
          0.5,
          -2,
        );
        expectRounded(values(T.narrow(cBase, 2, 0, N)), want.sum, `alpha/beta ${B}x${M}x${K}x${N}`);
        // the columns beyond N are untouched
        const tail = values(T.narrow(cBase, 2, N, 3));
        expect(Array.from(tail)).toEqual(Array.from(values(T.narrow(intTensor([B, M, N + 3], 63), 2, N, 3))));

        // A read with column stride 2 has no unit stride: the fp32-panel path, same result
        const aWide = intTensor([B, M, 2 * K], 64);
        const aStrided = T.tensor(
          Array.from(values(aWide)).filter((_, i) => i % 2 === 0),
          { dtype: 'bfloat16', shape: [B, M, K] },
        );
        const c1 = intTensor([B, M, N], 65);
        const want1 = product(values(aStrided), bv, B, M, K, N, 2, 1, values(c1));
        cpu.gemm(B, M, N, K, op(aWide, 2 * M * K, 2 * K, 2), op(bt, N * K, 1, K), op(c1, M * N, N, 1), 2, 1);
        expectRounded(values(c1), want1.sum, `strided A ${B}x${M}x${K}x${N}`);
      });
    }
  });
});

describe('bf16 GEMM: normal-distributed operands', () => {
  it('matmul, linear and bmm within half a bf16 ulp plus accumulation slack', () => {
    T.manualSeed(7);
    T.tidy(() => {
      for (const [M, K, N] of [
        [3, 17, 129],
        [129, 129, 17],
        [64, 1024, 96],
        [1, 3000, 33],
      ]) {
        const a = T.randn([M, K]).to('bfloat16');
        const b = T.randn([K, N]).to('bfloat16');
        expectNear(
          values(T.matmul(a, b)),
          product(values(a), values(b), 1, M, K, N),
          `matmul ${M}x${K}x${N}`,
        );
        const w = T.randn([N, K]).to('bfloat16');
        const wt = values(T.transpose(w, 0, 1));
        expectNear(values(T.linear(a, w)), product(values(a), wt, 1, M, K, N), `linear ${M}x${K}x${N}`);
      }
      const a = T.randn([6, 33, 64]).to('bfloat16');
      const b = T.transpose(T.randn([6, 65, 64]).to('bfloat16'), 1, 2);
      expectNear(values(T.bmm(a, b)), product(values(a), values(b), 6, 33, 64, 65), 'bmm');
    });
  });
});

describe('bf16 GEMM: gradients', () => {
  it('matmul backward gives the rounded exact gradients', () => {
    T.tidy(() => {
      // both gradients contract over >= 129 terms, so many need rounding
      const [M, K, N] = [129, 65, 257];
      const a = intTensor([M, K], 71).requiresGrad_(true);
      const b = T.transpose(intTensor([N, K], 72), 0, 1)
        .detach()
        .requiresGrad_(true);
      const g = intTensor([M, N], 73);
      T.matmul(a, b).backward(g);
      const gv = values(g);
      const btv = values(T.transpose(b, 0, 1));
      const atv = values(T.transpose(a, 0, 1));
      const ra = expectRounded(values(a.grad as Tensor), product(gv, btv, 1, M, N, K).sum, 'dA = g @ B^T');
      const rb = expectRounded(values(b.grad as Tensor), product(atv, gv, 1, K, M, N).sum, 'dB = A^T @ g');
      expect(Math.min(ra, rb)).toBeGreaterThan(100);
    });
  });

  it('linear and bmm backward over batches', () => {
    T.tidy(() => {
      const [B, S, I, O] = [3, 43, 65, 129];
      const x = intTensor([B, S, I], 81).requiresGrad_(true);
      const w = intTensor([O, I], 82).requiresGrad_(true);
      const bias = intTensor([O], 83).requiresGrad_(true);
      const g = intTensor([B, S, O], 84);
      T.linear(x, w, bias).backward(g);
      const gv = values(g);
      const rx = expectRounded(
        values(x.grad as Tensor),
        product(gv, values(w), 1, B * S, O, I).sum,
        'dx = g @ W',
      );
      const gt = values(T.transpose(T.reshape(g, [B * S, O]), 0, 1));
      const rw = expectRounded(
        values(w.grad as Tensor),
        product(gt, values(x), 1, O, B * S, I).sum,
        'dW = g^T @ x',
      );
      expect(Math.min(rx, rw)).toBeGreaterThan(100);
      const gb = new Array<number>(O).fill(0);
      for (let i = 0; i < gv.length; i++) gb[i % O] += gv[i];
      expectRounded(values(bias.grad as Tensor), gb, 'dbias');

      const p = intTensor([B, S, I], 85).requiresGrad_(true);
      const q = intTensor([B, I, O], 86).requiresGrad_(true);
      T.bmm(p, q).backward(g);
      const qt = values(T.transpose(q, 1, 2));
      const pt = values(T.transpose(p, 1, 2));
      expectRounded(values(p.grad as Tensor), product(gv, qt, B, S, O, I).sum, 'bmm dP');
      expectRounded(values(q.grad as Tensor), product(pt, gv, B, I, S, O).sum, 'bmm dQ');
    });
  });
});

describe('bf16 GEMM: backend information', () => {
  it('reports the engine of bf16 GEMMs and oneDNN', () => {
    const info = T.backendInfo();
    expect(['onednn', 'fp32-panels']).toContain(info.bf16Gemm);
    if (info.onednn === null) {
      expect(info.bf16Gemm).toBe('fp32-panels');
      expect(info.onednnIsa).toBeNull();
      return;
    }
    expect(info.onednn).toMatch(/^\d+\.\d+\.\d+$/);
    expect(typeof info.onednnIsa).toBe('string');
    // oneDNN takes bf16 GEMMs exactly when the CPU has native bf16 dot products
    const cpuinfo = existsSync('/proc/cpuinfo') ? readFileSync('/proc/cpuinfo', 'utf8') : '';
    const native = /\b(avx512_bf16|amx_bf16)\b/.test(cpuinfo);
    if (cpuinfo && !process.env.ONEDNN_MAX_CPU_ISA) {
      expect(info.bf16Gemm).toBe(native ? 'onednn' : 'fp32-panels');
    }
  });
});
