import { afterEach, describe, expect, it } from 'vitest';
import {
  cat,
  Generator,
  getBackend,
  getDefaultDevice,
  getNumThreads,
  gradcheck,
  memoryStats,
  narrow,
  rand,
  randn,
  scaledDotProductAttention,
  setNumThreads,
  type Tensor,
  TensorError,
  tensor,
  tidy,
} from '../src/index.js';
import {
  disposeAll,
  expectClose,
  type FixtureTensor,
  fromFixture,
  loadFixture,
  settledLiveBytes,
} from './fixtures.js';

const sdpa = scaledDotProductAttention;

// Additive masks store -inf as null (JSON has no infinities).
function maskFromFixture(f: FixtureTensor): Tensor {
  if (f.dtype === 'bool') return fromFixture(f);
  const vals = (f.data as (number | null)[]).map((v) => (v === null ? Number.NEGATIVE_INFINITY : v));
  return tensor(Float32Array.from(vals), { shape: f.shape, dtype: f.dtype });
}

const asNumbers = (t: Tensor): number[] => Array.from(t.toTypedArray() as ArrayLike<number>);

describe('scaledDotProductAttention fixtures (PyTorch reference)', () => {
  for (const c of loadFixture('attention')) {
    it(c.name, () => {
      const q = fromFixture(c.inputs.q, true);
      const k = fromFixture(c.inputs.k, true);
      const v = fromFixture(c.inputs.v, true);
      const gout = fromFixture(c.inputs.gout);
      const mask = c.inputs.mask ? maskFromFixture(c.inputs.mask) : null;
      const cu = c.inputs.cuSeqlens ? fromFixture(c.inputs.cuSeqlens) : null;
      const scale = c.args.scale as number | null;
      const out = sdpa(q, k, v, {
        attnMask: mask,
        isCausal: c.args.isCausal as boolean,
        scale: scale ?? undefined,
        cuSeqlens: cu,
      });
      const tol = c.inputs.q.dtype === 'float32' ? { atol: 2e-5, rtol: 1e-4 } : undefined;
      expectClose(out, c.outputs.out, tol, 'out');
      out.backward(gout);
      expectClose(q.grad!, c.grads.q, tol, 'dq');
      expectClose(k.grad!, c.grads.k, tol, 'dk');
      expectClose(v.grad!, c.grads.v, tol, 'dv');
      disposeAll(q, k, v, gout, mask, cu, out);
    });
  }
});

interface RefOptions {
  causal?: boolean;
  scale?: number;
  cu?: number[];
  /** allow(b, h, i, j) for a bool mask, or an additive value. */
  allow?: (b: number, h: number, i: number, j: number) => boolean;
  /** Dropout multiplier of probability (b, h, i, j): out = (P ∘ drop) V. */
  drop?: (b: number, h: number, i: number, j: number) => number;
}

// Plain float64 loops: the attention forward and its gradients, for shapes larger than the
// fixtures (several key and query blocks).
function naiveAttention(q: Tensor, k: Tensor, v: Tensor, gout: Tensor, o: RefOptions) {
  const [B, Hq, Sq, D] = q.shape;
  const [, Hkv, Sk] = k.shape;
  const Dv = v.shape[3];
  const G = Hq / Hkv;
  const scale = o.scale ?? 1 / Math.sqrt(D);
  const Q = asNumbers(q);
  const K = asNumbers(k);
  const V = asNumbers(v);
  const GO = asNumbers(gout);
  const seg = new Array<number>(Sq).fill(0);
  if (o.cu) for (let s = 0; s + 1 < o.cu.length; s++) for (let i = o.cu[s]; i < o.cu[s + 1]; i++) seg[i] = s;
  const out = new Float64Array(B * Hq * Sq * Dv);
  const dq = new Float64Array(Q.length);
  const dk = new Float64Array(K.length);
  const dv = new Float64Array(V.length);
  for (let b = 0; b < B; b++)
    for (let h = 0; h < Hq; h++) {
      const kh = Math.floor(h / G);
      const qo = (b * Hq + h) * Sq;
      const ko = (b * Hkv + kh) * Sk;
      for (let i = 0; i < Sq; i++) {
        const p = new Float64Array(Sk);
        let mx = Number.NEGATIVE_INFINITY;
        for (let j = 0; j < Sk; j++) {
          let ok = !o.causal || j <= i;
          if (o.cu) ok &&= seg[i] === seg[j];
          if (o.allow) ok &&= o.allow(b, h, i, j);
          if (!ok) {
            p[j] = Number.NEGATIVE_INFINITY;
            continue;
          }
          let s = 0;
          for (let d = 0; d < D; d++) s += Q[(qo + i) * D + d] * K[(ko + j) * D + d];
          p[j] = s * scale;
          mx = Math.max(mx, p[j]);
        }
        if (mx === Number.NEGATIVE_INFINITY) continue;
        let l = 0;
        for (let j = 0; j < Sk; j++) l += p[j] = Math.exp(p[j] - mx);
        for (let j = 0; j < Sk; j++) p[j] /= l;
        // with dropout multipliers m: out = Σ p m v, dP = m (dO · v), delta = Σ p dP
        const dp = new Float64Array(Sk);
        let delta = 0;
        for (let j = 0; j < Sk; j++) {
          const m = o.drop ? o.drop(b, h, i, j) : 1;
          for (let d = 0; d < Dv; d++) {
            out[(qo + i) * Dv + d] += p[j] * m * V[(ko + j) * Dv + d];
            dp[j] += GO[(qo + i) * Dv + d] * V[(ko + j) * Dv + d];
            dv[(ko + j) * Dv + d] += p[j] * m * GO[(qo + i) * Dv + d];
          }
          dp[j] *= m;
          delta += p[j] * dp[j];
        }
        for (let j = 0; j < Sk; j++) {
          const ds = p[j] * (dp[j] - delta) * scale;
          for (let d = 0; d < D; d++) {
            dq[(qo + i) * D + d] += ds * K[(ko + j) * D + d];
            dk[(ko + j) * D + d] += ds * Q[(qo + i) * D + d];
          }
        }
      }
    }
  return { out, dq, dk, dv };
}

function expectArrayClose(
  actual: Tensor,
  expected: Float64Array,
  atol: number,
  rtol: number,
  label: string,
): void {
  const a = asNumbers(actual);
  expect(a.length, label).toBe(expected.length);
  for (let i = 0; i < a.length; i++) {
    if (!(Math.abs(a[i] - expected[i]) <= atol + rtol * Math.abs(expected[i]))) {
      expect.fail(`${label} element ${i}: got ${a[i]}, expected ${expected[i]}`);
    }
  }
}

interface Problem {
  B: number;
  Hq: number;
  Hkv: number;
  Sq: number;
  Sk: number;
  D: number;
  Dv?: number;
}

/** A bool mask [1, Hq, Sq, Sk] of allow(0, h, i, j). */
function boolMask(p: Problem, allow: NonNullable<RefOptions['allow']>): Tensor {
  const vals: boolean[] = [];
  for (let h = 0; h < p.Hq; h++)
    for (let i = 0; i < p.Sq; i++) for (let j = 0; j < p.Sk; j++) vals.push(allow(0, h, i, j));
  return tensor(Uint8Array.from(vals, Number), { shape: [1, p.Hq, p.Sq, p.Sk], dtype: 'bool' });
}

function leaves(p: Problem, dtype: 'float32' | 'float64', seed: number) {
  const gen = new Generator(seed);
  const opts = { dtype, generator: gen, requiresGrad: true } as const;
  const q = randn([p.B, p.Hq, p.Sq, p.D], opts);
  const k = randn([p.B, p.Hkv, p.Sk, p.D], opts);
  const v = randn([p.B, p.Hkv, p.Sk, p.Dv ?? p.D], opts);
  const gout = randn([p.B, p.Hq, p.Sq, p.Dv ?? p.D], { dtype, generator: gen });
  return { q, k, v, gout };
}

describe('scaledDotProductAttention against float64 loops (several blocks)', () => {
  const threads = getNumThreads();
  afterEach(() => setNumThreads(threads));

  const problems: [string, Problem, RefOptions][] = [
    ['multi-block non-causal GQA', { B: 1, Hq: 4, Hkv: 2, Sq: 150, Sk: 150, D: 16 }, {}],
    ['multi-block causal', { B: 2, Hq: 2, Hkv: 1, Sq: 140, Sk: 140, D: 8 }, { causal: true }],
    [
      'multi-block causal Sq < Sk, Dv != D',
      { B: 1, Hq: 2, Hkv: 2, Sq: 70, Sk: 200, D: 8, Dv: 12 },
      { causal: true },
    ],
    [
      'varlen causal GQA, long and empty sequences',
      { B: 1, Hq: 4, Hkv: 1, Sq: 210, Sk: 210, D: 8 },
      { causal: true, cu: [0, 100, 100, 133, 210] },
    ],
    [
      'bool mask with fully masked rows',
      { B: 1, Hq: 3, Hkv: 3, Sq: 90, Sk: 130, D: 8 },
      { allow: (_b, h, i, j) => i % 17 !== 5 && (i * 7 + j * 3 + h) % 5 !== 0 },
    ],
  ];
  // 1 thread runs the per-kv-head backward; 3 threads with a single (batch, kv head) the split one
  for (const nt of [1, 3]) {
    for (const [name, p, o] of problems) {
      it(`${name} (${nt} thread${nt > 1 ? 's' : ''})`, () => {
        setNumThreads(nt);
        const { q, k, v, gout } = leaves(p, 'float32', 11);
        const mask = o.allow ? boolMask(p, o.allow) : null;
        const cu = o.cu ? tensor(o.cu, { dtype: 'int64' }) : null;
        const out = sdpa(q, k, v, { isCausal: o.causal, scale: o.scale, attnMask: mask, cuSeqlens: cu });
        out.backward(gout);
        const ref = naiveAttention(q, k, v, gout, o);
        expectArrayClose(out, ref.out, 1e-5, 1e-4, 'out');
        expectArrayClose(q.grad!, ref.dq, 2e-5, 2e-4, 'dq');
        expectArrayClose(k.grad!, ref.dk, 2e-5, 2e-4, 'dk');
        expectArrayClose(v.grad!, ref.dv, 2e-5, 2e-4, 'dv');
        disposeAll(q, k, v, gout, out, mask, cu);
      });
    }
  }
});

describe('scaledDotProductAttention with dropout', () => {
  // multipliers 0 or 1/(1-p) at a fixed pseudo-random pattern, as a [B, Hq, Sq, Sk] tensor
  const pattern = (p: Problem, rate: number, dtype: 'float32' | 'float64' = 'float32') => {
    const drop = (b: number, h: number, i: number, j: number) =>
      ((b * 131 + h * 71 + i * 37 + j * 19) % 10) / 10 < rate ? 0 : 1 / (1 - rate);
    const vals: number[] = [];
    for (let b = 0; b < p.B; b++)
      for (let h = 0; h < p.Hq; h++)
        for (let i = 0; i < p.Sq; i++) for (let j = 0; j < p.Sk; j++) vals.push(drop(b, h, i, j));
    return { drop, mask: tensor(vals, { shape: [p.B, p.Hq, p.Sq, p.Sk], dtype }) };
  };

  it.each([
    ['causal GQA', { B: 2, Hq: 4, Hkv: 2, Sq: 40, Sk: 40, D: 8 }, { causal: true }],
    [
      'varlen causal, Dv != D',
      { B: 1, Hq: 2, Hkv: 1, Sq: 50, Sk: 50, D: 8, Dv: 6 },
      { causal: true, cu: [0, 17, 17, 50] },
    ],
    [
      'bool mask with fully masked rows',
      { B: 1, Hq: 2, Hkv: 2, Sq: 30, Sk: 45, D: 4 },
      { allow: (_b: number, h: number, i: number, j: number) => i % 11 !== 3 && (i + 2 * j + h) % 4 !== 0 },
    ],
  ] as [string, Problem, RefOptions][])(
    'dropoutMask: %s against float64 loops (forward and backward)',
    (_name, p, o) => {
      const { q, k, v, gout } = leaves(p, 'float32', 21);
      const { drop, mask: dm } = pattern(p, 0.3);
      const mask = o.allow ? boolMask(p, o.allow) : null;
      const cu = o.cu ? tensor(o.cu, { dtype: 'int64' }) : null;
      const out = sdpa(q, k, v, { isCausal: o.causal, attnMask: mask, cuSeqlens: cu, dropoutMask: dm });
      out.backward(gout);
      const ref = naiveAttention(q, k, v, gout, { ...o, drop });
      expectArrayClose(out, ref.out, 1e-5, 1e-4, 'out');
      expectArrayClose(q.grad!, ref.dq, 2e-5, 2e-4, 'dq');
      expectArrayClose(k.grad!, ref.dk, 2e-5, 2e-4, 'dk');
      expectArrayClose(v.grad!, ref.dv, 2e-5, 2e-4, 'dv');
      // and without the mask the result differs (the multipliers were applied)
      const plain = naiveAttention(q, k, v, gout, o);
      expect(asNumbers(out).some((x, i) => Math.abs(x - plain.out[i]) > 1e-3)).toBe(true);
      disposeAll(q, k, v, gout, out, mask, cu, dm);
    },
  );

  it('dropoutMask gradcheck (float64, GQA causal, a broadcast mask)', () => {
    const p = { B: 1, Hq: 4, Hkv: 2, Sq: 5, Sk: 5, D: 3 };
    const { q, k, v, gout } = leaves(p, 'float64', 4);
    gout.dispose();
    // [Hq, Sq, Sk] broadcast over the batch
    const dm = pattern({ ...p, B: 1 }, 0.4, 'float64').mask.reshape(p.Hq, p.Sq, p.Sk);
    const ok = gradcheck((a, b, c) => sdpa(a, b, c, { isCausal: true, dropoutMask: dm }), [q, k, v], {
      atol: 1e-6,
      rtol: 1e-5,
    });
    expect(ok).toBe(true);
    disposeAll(q, k, v, dm);
  });

  it("a mask of ones gives the fused kernels' result; dropoutP draws its mask from the generator", () => {
    const p = { B: 1, Hq: 2, Hkv: 1, Sq: 24, Sk: 24, D: 8 };
    const { q, k, v, gout } = leaves(p, 'float32', 9);
    const fused = sdpa(q, k, v, { isCausal: true });
    fused.backward(gout);
    const grads = [q, k, v].map((t) => asNumbers(t.grad!));
    for (const t of [q, k, v]) {
      t.grad?.dispose();
      t.grad = null;
    }
    const ones = tensor(new Array(p.Sq * p.Sk).fill(1), { shape: [p.Sq, p.Sk], dtype: 'float32' });
    const composed = sdpa(q, k, v, { isCausal: true, dropoutMask: ones });
    composed.backward(gout);
    const close = (a: number[], b: number[], label: string) => {
      for (let i = 0; i < a.length; i++) expect(Math.abs(a[i] - b[i]), `${label} ${i}`).toBeLessThan(1e-5);
    };
    close(asNumbers(composed), asNumbers(fused), 'out');
    for (const [i, t] of [q, k, v].entries()) close(asNumbers(t.grad!), grads[i], `grad ${i}`);
    // dropoutP = the mask rand(...) < 1 - p scaled by 1/(1-p), drawn from the generator given
    const drawn = sdpa(q, k, v, { isCausal: true, dropoutP: 0.25, generator: new Generator(77) });
    const u = rand([p.B, p.Hq, p.Sq, p.Sk], { generator: new Generator(77) });
    const m = u
      .lt(0.75)
      .to('float32')
      .mul(1 / 0.75);
    const given = sdpa(q, k, v, { isCausal: true, dropoutMask: m });
    expect(asNumbers(drawn)).toEqual(asNumbers(given));
    disposeAll(q, k, v, gout, fused, ones, composed, drawn, u, m, given);
  });

  it('dropoutP zeroes a fraction p of the probabilities and scales the rest by 1/(1-p)', () => {
    // q = 0: every probability is 1/Sk; v = identity: out[i, j] = P[i, j] · M[i, j]
    const S = 64;
    const q = tensor(new Array(S * 4).fill(0), { shape: [1, 1, S, 4], dtype: 'float32' });
    const k = randn([1, 1, S, 4], { generator: new Generator(1) });
    const eyeV: number[] = [];
    for (let i = 0; i < S; i++) for (let j = 0; j < S; j++) eyeV.push(i === j ? 1 : 0);
    const v = tensor(eyeV, { shape: [1, 1, S, S], dtype: 'float32' });
    const out = sdpa(q, k, v, { dropoutP: 0.2, generator: new Generator(3) });
    const vals = asNumbers(out).map((x) => x * S);
    const zeros = vals.filter((x) => x === 0).length / vals.length;
    expect(Math.abs(zeros - 0.2)).toBeLessThan(0.02); // 4096 draws: sd 0.006
    for (const x of vals) if (x !== 0) expect(Math.abs(x - 1.25)).toBeLessThan(1e-5);
    // a second draw from the same generator differs; p = 0 is the plain attention
    const again = sdpa(q, k, v, { dropoutP: 0.2, generator: new Generator(4) });
    expect(asNumbers(again)).not.toEqual(asNumbers(out));
    disposeAll(q, k, v, out, again);
  });

  it('rejects a bad dropoutP, both options, an integer mask and a mask of the wrong shape', () => {
    const p = { B: 1, Hq: 2, Hkv: 2, Sq: 3, Sk: 3, D: 2 };
    const { q, k, v, gout } = leaves(p, 'float32', 2);
    const ones = tensor([1, 1, 1], { shape: [3], dtype: 'float32' });
    expect(() => sdpa(q, k, v, { dropoutP: 1.5 })).toThrow(/dropoutP must be in \[0, 1\], got 1.5/);
    expect(() => sdpa(q, k, v, { dropoutP: 0.1, dropoutMask: ones })).toThrow(
      /dropoutP or dropoutMask, not both/,
    );
    const ints = tensor([1, 1, 1], { dtype: 'int32' });
    expect(() => sdpa(q, k, v, { dropoutMask: ints })).toThrow(
      /dropoutMask must be floating-point, got int32/,
    );
    const wrong = tensor([1, 1], { shape: [2], dtype: 'float32' });
    expect(() => sdpa(q, k, v, { dropoutMask: wrong })).toThrow(/dropoutMask \[2\] does not broadcast/);
    disposeAll(q, k, v, gout, ones, ints, wrong);
  });
});

describe('scaledDotProductAttention gradcheck (float64)', () => {
  const cases: [
    string,
    Problem,
    (p: Problem) => { mask?: Tensor; cu?: Tensor; causal?: boolean; scale?: number },
  ][] = [
    ['plain', { B: 2, Hq: 2, Hkv: 2, Sq: 4, Sk: 4, D: 3 }, () => ({})],
    ['GQA causal', { B: 1, Hq: 4, Hkv: 2, Sq: 5, Sk: 5, D: 3 }, () => ({ causal: true })],
    [
      'Sq != Sk causal, Dv != D, scale',
      { B: 1, Hq: 2, Hkv: 1, Sq: 3, Sk: 5, D: 2, Dv: 4 },
      () => ({ causal: true, scale: 0.7 }),
    ],
    [
      'bool mask with a fully masked row',
      { B: 1, Hq: 2, Hkv: 1, Sq: 4, Sk: 5, D: 3 },
      () => ({
        mask: tensor(
          [
            [true, false, true, true, false],
            [false, false, false, false, false],
            [true, true, false, true, true],
            [false, true, true, false, true],
          ],
          { dtype: 'bool' },
        ),
      }),
    ],
    [
      'additive mask per head',
      { B: 1, Hq: 2, Hkv: 2, Sq: 3, Sk: 4, D: 3 },
      (p) => ({ mask: randn([1, p.Hq, p.Sq, p.Sk], { dtype: 'float64', generator: new Generator(5) }) }),
    ],
    [
      'varlen causal GQA',
      { B: 1, Hq: 2, Hkv: 1, Sq: 7, Sk: 7, D: 2 },
      () => ({ cu: tensor([0, 2, 3, 7], { dtype: 'int32' }), causal: true }),
    ],
  ];
  for (const [name, p, make] of cases) {
    it(name, () => {
      const { q, k, v, gout } = leaves(p, 'float64', 3);
      gout.dispose();
      const o = make(p);
      const ok = gradcheck(
        (a, b, c) => sdpa(a, b, c, { attnMask: o.mask, cuSeqlens: o.cu, isCausal: o.causal, scale: o.scale }),
        [q, k, v],
        { atol: 1e-6, rtol: 1e-5 },
      );
      expect(ok).toBe(true);
      disposeAll(q, k, v, o.mask, o.cu);
    });
  }
});

describe('scaledDotProductAttention semantics', () => {
  it('varlen equals running each sequence on its own', () => {
    const lens = [5, 11, 3];
    const total = lens.reduce((a, b) => a + b, 0);
    const { q, k, v, gout } = leaves({ B: 1, Hq: 4, Hkv: 2, Sq: total, Sk: total, D: 8 }, 'float32', 21);
    const cu = tensor([0, 5, 16, 19], { dtype: 'int32' });
    const packed = sdpa(q, k, v, { cuSeqlens: cu, isCausal: true });
    packed.backward(gout);
    let start = 0;
    for (const n of lens) {
      tidy(() => {
        const part = (t: Tensor) => narrow(t, 2, start, n).detach().requiresGrad_(true);
        const [qs, ks, vs] = [part(q), part(k), part(v)];
        const o = sdpa(qs, ks, vs, { isCausal: true });
        o.backward(narrow(gout, 2, start, n));
        const same = (a: Tensor, b: Tensor, label: string) =>
          expectArrayClose(a, Float64Array.from(asNumbers(b)), 1e-6, 1e-5, label);
        same(narrow(packed, 2, start, n), o, 'out');
        same(narrow(q.grad!, 2, start, n), qs.grad!, 'dq');
        same(narrow(k.grad!, 2, start, n), ks.grad!, 'dk');
        same(narrow(v.grad!, 2, start, n), vs.grad!, 'dv');
        for (const t of [qs, ks, vs]) t.grad?.dispose();
      });
      start += n;
    }
    disposeAll(q, k, v, gout, cu, packed);
  });

  it('GQA equals repeating the kv heads', () => {
    const { q, k, v, gout } = leaves({ B: 2, Hq: 6, Hkv: 2, Sq: 9, Sk: 9, D: 8 }, 'float32', 8);
    const gqa = sdpa(q, k, v, { isCausal: true });
    gqa.backward(gout);
    tidy(() => {
      // kv head j serves query heads 3j, 3j+1, 3j+2
      const rep = (t: Tensor) => {
        const heads = [0, 0, 0, 1, 1, 1].map((h) => narrow(t, 1, h, 1));
        return cat(heads, 1).detach().requiresGrad_(true);
      };
      const kr = rep(k);
      const vr = rep(v);
      const qd = q.detach().requiresGrad_(true);
      const full = sdpa(qd, kr, vr, { isCausal: true });
      full.backward(gout);
      expectArrayClose(gqa, Float64Array.from(asNumbers(full)), 1e-6, 1e-5, 'out');
      expectArrayClose(q.grad!, Float64Array.from(asNumbers(qd.grad!)), 1e-6, 1e-5, 'dq');
      const sumGroups = (g: Tensor) => {
        const a = asNumbers(g);
        const per = 9 * 8;
        const r = new Float64Array(2 * 2 * per);
        for (let b = 0; b < 2; b++)
          for (let h = 0; h < 6; h++)
            for (let e = 0; e < per; e++)
              r[(b * 2 + Math.floor(h / 3)) * per + e] += a[(b * 6 + h) * per + e];
        return r;
      };
      expectArrayClose(k.grad!, sumGroups(kr.grad!), 1e-5, 1e-5, 'dk');
      expectArrayClose(v.grad!, sumGroups(vr.grad!), 1e-5, 1e-5, 'dv');
      for (const t of [qd, kr, vr]) t.grad?.dispose();
    });
    disposeAll(q, k, v, gout, gqa);
  });

  it('a row with nothing to attend to gives zeros and zero gradients', () => {
    const { q, k, v, gout } = leaves({ B: 1, Hq: 2, Hkv: 2, Sq: 3, Sk: 4, D: 4 }, 'float32', 4);
    const mask = tensor(
      [
        [true, true, false, true],
        [false, false, false, false],
        [true, false, false, false],
      ],
      { dtype: 'bool' },
    );
    const neg = Number.NEGATIVE_INFINITY;
    const additive = tensor([
      [0, 1, neg, 0],
      [neg, neg, neg, neg],
      [0.5, neg, neg, neg],
    ]);
    for (const m of [mask, additive]) {
      const out = sdpa(q, k, v, { attnMask: m });
      out.backward(gout);
      const o = asNumbers(out);
      const dq = asNumbers(q.grad!);
      expect(o.every(Number.isFinite)).toBe(true);
      expect(asNumbers(k.grad!).every(Number.isFinite)).toBe(true);
      for (const h of [0, 1]) {
        expect(o.slice((h * 3 + 1) * 4, (h * 3 + 2) * 4)).toEqual([0, 0, 0, 0]);
        expect(dq.slice((h * 3 + 1) * 4, (h * 3 + 2) * 4)).toEqual([0, 0, 0, 0]);
      }
      // keys no query may see get no gradient
      const dk = asNumbers(k.grad!);
      for (const h of [0, 1]) expect(dk.slice((h * 4 + 2) * 4, (h * 4 + 3) * 4)).toEqual([0, 0, 0, 0]);
      out.dispose();
      for (const t of [q, k, v]) {
        t.grad?.dispose();
        t.grad = null;
      }
    }
    disposeAll(q, k, v, gout, mask, additive);
  });

  it('no keys at all (Sk = 0) gives zeros', () => {
    const { q, k, v, gout } = leaves({ B: 1, Hq: 2, Hkv: 1, Sq: 3, Sk: 0, D: 4 }, 'float32', 4);
    const out = sdpa(q, k, v);
    expect(asNumbers(out).every((x) => x === 0)).toBe(true);
    out.backward(gout);
    expect(asNumbers(q.grad!).every((x) => x === 0)).toBe(true);
    disposeAll(q, k, v, gout, out);
  });

  for (const [dtype, tol] of [
    ['bfloat16', 3e-2],
    ['float16', 4e-3],
  ] as const) {
    it(`${dtype} follows float32 within its rounding (forward and backward)`, () => {
      const { q, k, v, gout } = leaves({ B: 1, Hq: 4, Hkv: 2, Sq: 80, Sk: 80, D: 16 }, 'float32', 9);
      const ref = sdpa(q, k, v, { isCausal: true });
      ref.backward(gout);
      tidy(() => {
        const [ql, kl, vl] = [q, k, v].map((t) => t.to(dtype).detach().requiresGrad_(true));
        const out = sdpa(ql, kl, vl, { isCausal: true });
        expect(out.dtype).toBe(dtype);
        out.backward(gout.to(dtype));
        expect(ql.grad!.dtype).toBe(dtype);
        // inputs are rounded too, so compare loosely
        const close = (a: Tensor, b: Tensor, label: string) =>
          expectArrayClose(a.to('float32'), Float64Array.from(asNumbers(b)), tol, tol, label);
        close(out, ref, 'out');
        close(ql.grad!, q.grad!, 'dq');
        close(kl.grad!, k.grad!, 'dk');
        close(vl.grad!, v.grad!, 'dv');
        for (const t of [ql, kl, vl]) t.grad?.dispose();
      });
      disposeAll(q, k, v, gout, ref);
    });
  }

  it('the output and dq, dk, dv keep the memory order of q, k, v where the backend prefers it (else contiguous)', () =>
    tidy(() => {
      const prefers = getBackend(getDefaultDevice()).preferInputLayout === true;
      const gen = new Generator(11);
      const [B, H, Hkv, S, D] = [2, 4, 2, 9, 8];
      // views of [s, b, heads, d] buffers, as the attention layer passes them
      const bases = [H, Hkv, Hkv].map((h) => randn([S, B, h, D], { generator: gen }).requiresGrad_(true));
      const [q, k, v] = bases.map((t) => t.detach().permute(1, 2, 0, 3));
      const g = randn([S, B, H, D], { generator: gen });
      // the gradients as the op returns them, at the (non-leaf) views (a leaf's .grad is its own copy)
      const layouts: boolean[] = [];
      const [qv, kv, vv] = bases.map((t) => {
        const view = t.permute(1, 2, 0, 3);
        view.registerHook((grad) => {
          layouts.push(prefers ? grad.permute(2, 0, 1, 3).isContiguous : grad.isContiguous);
        });
        return view;
      });
      const out = sdpa(qv, kv, vv, { isCausal: true });
      expect(out.isContiguous).toBe(!prefers);
      expect(out.permute(2, 0, 1, 3).isContiguous).toBe(prefers);
      // gradOut arrives as the layer's: through the permute back to [s, b, h, d]
      out.permute(2, 0, 1, 3).backward(g);
      expect(layouts).toEqual([true, true, true]);
      // the same values as with contiguous inputs
      const [qc, kc, vc] = [q, k, v].map((t) => t.contiguous().requiresGrad_(true));
      const outC = sdpa(qc, kc, vc, { isCausal: true });
      expect(outC.isContiguous).toBe(true);
      outC.backward(g.permute(1, 2, 0, 3).contiguous());
      expect(asNumbers(out.contiguous())).toEqual(asNumbers(outC));
      bases.forEach((t, i) => {
        expect(asNumbers(t.grad!.permute(1, 2, 0, 3).contiguous())).toEqual(asNumbers([qc, kc, vc][i].grad!));
      });
    }));

  it('scale defaults to 1/sqrt(D)', () => {
    const { q, k, v, gout } = leaves({ B: 1, Hq: 1, Hkv: 1, Sq: 5, Sk: 6, D: 9 }, 'float32', 2);
    const a = sdpa(q, k, v);
    const b = sdpa(q, k, v, { scale: 1 / 3 });
    expect(asNumbers(a)).toEqual(asNumbers(b));
    disposeAll(q, k, v, gout, a, b);
  });
});

describe('scaledDotProductAttention errors', () => {
  const make = (shape: number[], dtype: 'float32' | 'float64' = 'float32') =>
    randn(shape, { dtype, generator: new Generator(1) });
  const expectCode = (fn: () => unknown, code: string, text?: RegExp) => {
    try {
      fn();
    } catch (e) {
      expect(e).toBeInstanceOf(TensorError);
      expect((e as TensorError).code).toBe(code);
      if (text) expect((e as Error).message).toMatch(text);
      return;
    }
    expect.fail('expected a TensorError');
  };
  it('rejects bad shapes, dtypes, masks and cuSeqlens', () => {
    tidy(() => {
      const q = make([1, 4, 6, 8]);
      const k = make([1, 2, 6, 8]);
      const v = make([1, 2, 6, 8]);
      expectCode(() => sdpa(q, make([1, 2, 6, 4]), v), 'SHAPE_MISMATCH', /head dims/);
      expectCode(() => sdpa(q, make([1, 3, 6, 8]), make([1, 3, 6, 8])), 'SHAPE_MISMATCH', /multiple/);
      expectCode(() => sdpa(q, k, make([1, 2, 5, 8])), 'SHAPE_MISMATCH');
      expectCode(() => sdpa(make([4, 6, 8]), k, v), 'SHAPE_MISMATCH');
      expectCode(() => sdpa(q, make([2, 2, 6, 8]), make([2, 2, 6, 8])), 'SHAPE_MISMATCH', /batch/);
      expectCode(() => sdpa(q, k.to('float64'), v), 'DTYPE_MISMATCH');
      expectCode(() => sdpa(q, k, v, { attnMask: make([1, 3, 6, 6]) }), 'SHAPE_MISMATCH', /broadcast/);
      expectCode(
        () => sdpa(q, k, v, { attnMask: tensor([1, 2, 3, 4, 5, 6], { dtype: 'int32' }) }),
        'DTYPE_MISMATCH',
      );
      const q2 = make([2, 4, 6, 8]);
      const k2 = make([2, 2, 6, 8]);
      const cu = tensor([0, 2, 6], { dtype: 'int32' });
      expectCode(() => sdpa(q2, k2, k2, { cuSeqlens: cu }), 'SHAPE_MISMATCH', /batch must be 1/);
      // the values of cuSeqlens: raised by the op on a synchronous backend, at the next read on
      // an asynchronous one (the check is queued where cuSeqlens lives)
      expectCode(
        () => sdpa(q, k, v, { cuSeqlens: tensor([0, 4, 2, 6], { dtype: 'int32' }) }).toTypedArray(),
        'INVALID_ARGUMENT',
        /non-decreasing/,
      );
      expectCode(
        () => sdpa(q, k, v, { cuSeqlens: tensor([0, 2, 5], { dtype: 'int64' }) }).toTypedArray(),
        'INVALID_ARGUMENT',
        /end at/,
      );
      expectCode(
        () => sdpa(q, k, v, { cuSeqlens: tensor([1, 2, 6], { dtype: 'int64' }) }).toTypedArray(),
        'INVALID_ARGUMENT',
        /start at 0/,
      );
      expectCode(() => sdpa(q, k, v, { cuSeqlens: tensor([0, 2.5, 6]) }), 'DTYPE_MISMATCH');
      expectCode(
        () => sdpa(q, make([1, 2, 7, 8]), make([1, 2, 7, 8]), { cuSeqlens: cu }),
        'SHAPE_MISMATCH',
        /Sq = Sk/,
      );
      expectCode(() => sdpa(q, k, v, { scale: Number.NaN }), 'INVALID_ARGUMENT');
    });
  });
});

describe('scaledDotProductAttention memory', () => {
  it('frees every temporary after forward + backward', () => {
    const { q, k, v, gout } = leaves({ B: 1, Hq: 4, Hkv: 2, Sq: 70, Sk: 70, D: 8 }, 'float32', 6);
    const mask = tensor(
      Uint8Array.from({ length: 70 * 70 }, (_, i) => (i % 3 ? 1 : 0)),
      {
        shape: [70, 70],
        dtype: 'bool',
      },
    );
    const cu = tensor([0, 30, 70], { dtype: 'int32' });
    const start = settledLiveBytes();
    for (const opts of [{ isCausal: true }, { attnMask: mask }, { cuSeqlens: cu, isCausal: true }]) {
      tidy(() => {
        const out = sdpa(q, k, v, opts);
        out.backward(gout);
      });
      for (const t of [q, k, v]) {
        t.grad?.dispose();
        t.grad = null;
      }
      expect(settledLiveBytes()).toBe(start);
    }
    // the graph keeps its own references: disposing inputs before backward is safe
    tidy(() => {
      const [q2, k2, v2] = [q, k, v].map((t) => t.detach().requiresGrad_(true));
      const out = sdpa(q2, k2, v2, { isCausal: true });
      q2.dispose();
      out.backward(gout);
      expect(k2.grad).not.toBeNull();
      q2.grad?.dispose();
      k2.grad?.dispose();
      v2.grad?.dispose();
    });
    expect(settledLiveBytes()).toBe(start);
    disposeAll(q, k, v, gout, mask, cu);
  });
});
