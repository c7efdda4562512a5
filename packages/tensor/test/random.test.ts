// Random numbers: Philox 4x32-10 against the Random123 known-answer vectors, the definition of
// the streams (seed, offset) in terms of Philox blocks, generator state handling, distribution
// statistics, and dropout.
import { describe, expect, it } from 'vitest';
import type { Tensor } from '../src/index.js';
import * as T from '../src/index.js';
import { loadNative } from '../src/native.js';

const { addon } = loadNative();
const hex = (words: number[]) => words.map((w) => (w >>> 0).toString(16).padStart(8, '0'));

/** Reads a tensor and disposes it. */
function take(t: Tensor): number[] {
  const v = Array.from(t.toTypedArray() as ArrayLike<number | bigint>, Number);
  t.dispose();
  return v;
}

describe('Philox 4x32-10', () => {
  // Random123 1.x, examples/kat_vectors: "philox4x32 10 <ctr x4> <key x2> <expected x4>"
  it.each([
    [
      [0, 0, 0, 0],
      [0, 0],
      ['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8'],
    ],
    [
      [0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff],
      [0xffffffff, 0xffffffff],
      ['408f276d', '41c83b0e', 'a20bc7c6', '6d5451fd'],
    ],
    [
      [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
      [0xa4093822, 0x299f31d0],
      ['d16cfe09', '94fdcceb', '5001e420', '24126ea1'],
    ],
  ])('known-answer vector %#', (ctr, key, expected) => {
    expect(hex(addon.philoxBlock(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1]))).toEqual(expected);
  });
});

describe('streams are Philox blocks addressed by (seed, offset)', () => {
  const seed = 0x12345678_9abcdef0n;
  const kLo = 0x9abcdef0;
  const kHi = 0x12345678;
  /** Word i of the stream starting at block `offset`: counter (offset + i/4, 0, 0, 0). */
  const word = (offset: number, i: number) =>
    addon.philoxBlock(offset + Math.floor(i / 4), 0, 0, 0, kLo, kHi)[i % 4] >>> 0;

  it('rand float64 is word * 2^-32; consecutive draws take ceil(n / 4) blocks', () => {
    const g = new T.Generator(seed);
    const a = take(T.rand([6], { dtype: 'float64', generator: g }));
    const b = take(T.rand([5], { dtype: 'float64', generator: g }));
    expect(a).toEqual(Array.from({ length: 6 }, (_, i) => word(0, i) / 2 ** 32));
    // the first draw used blocks 0 and 1 (6 values, two words of block 1 unused)
    expect(b).toEqual(Array.from({ length: 5 }, (_, i) => word(2, i) / 2 ** 32));
    expect(g.getState()).toEqual({ seed: seed.toString(), offset: '4' });
  });

  it('rand float32 keeps the top 24 bits of each word (exact in float32)', () => {
    const g = new T.Generator(seed);
    const a = take(T.rand([7], { generator: g }));
    expect(a).toEqual(Array.from({ length: 7 }, (_, i) => (word(0, i) >>> 8) / 2 ** 24));
  });

  it('randn is Box-Muller on pairs of words', () => {
    const g = new T.Generator(seed);
    const a = take(T.randn([8], { dtype: 'float64', generator: g, mean: 1, std: 2 }));
    const u = (i: number) => (word(0, i) + 0.5) / 2 ** 32;
    const expected: number[] = [];
    for (let i = 0; i < 8; i += 2) {
      const r = Math.sqrt(-2 * Math.log(u(i)));
      const th = 2 * Math.PI * u(i + 1);
      expected.push(1 + 2 * r * Math.cos(th), 1 + 2 * r * Math.sin(th));
    }
    a.forEach((v, i) => {
      expect(v).toBeCloseTo(expected[i], 12);
    });
  });
});

describe('generator state', () => {
  it('manualSeed makes draws reproducible', () => {
    T.manualSeed(7);
    const a = take(T.randn([64]));
    T.manualSeed(7);
    const b = take(T.randn([64]));
    T.manualSeed(8);
    const c = take(T.randn([64]));
    expect(b).toEqual(a);
    expect(c).not.toEqual(a);
    expect(T.defaultGenerator.initialSeed()).toBe(8n);
  });

  it('getRngState / setRngState replay the same numbers (state survives JSON)', () => {
    T.manualSeed(42);
    take(T.rand([3]));
    const s = JSON.parse(JSON.stringify(T.getRngState()));
    const a = take(T.randn([9]));
    const a2 = take(T.rand([5]));
    T.setRngState(s);
    expect(take(T.randn([9]))).toEqual(a);
    expect(take(T.rand([5]))).toEqual(a2);
  });

  it('fork continues from the current state and then advances independently', () => {
    const g = new T.Generator(11);
    take(T.rand([10], { generator: g }));
    const f = g.fork();
    const fromFork = take(T.rand([6], { generator: f }));
    take(T.rand([6], { generator: f }));
    // drawing from the fork did not move g
    expect(take(T.rand([6], { generator: g }))).toEqual(fromFork);
  });

  it('explicit generators do not touch the default one', () => {
    T.manualSeed(3);
    const s = T.getRngState();
    take(T.randn([10], { generator: new T.Generator(1) }));
    expect(T.getRngState()).toEqual(s);
  });
});

describe('distributions', () => {
  it('randn: mean 0 and std 1 over 1e6 samples', () => {
    const v = T.randn([1_000_000], { generator: new T.Generator(2024) });
    const a = v.toTypedArray() as Float32Array;
    v.dispose();
    let s = 0;
    let s2 = 0;
    for (const x of a) {
      s += x;
      s2 += x * x;
    }
    const mean = s / a.length;
    const std = Math.sqrt(s2 / a.length - mean * mean);
    expect(Math.abs(mean)).toBeLessThan(0.01);
    expect(Math.abs(std - 1)).toBeLessThan(0.01);
  });

  it('rand: in [0, 1) with mean 1/2, also in bfloat16 where 1.0 is one rounding away', () => {
    const gen = new T.Generator(99);
    const a = take(T.rand([1_000_000], { generator: gen }));
    let lo = 1;
    let hi = 0;
    let s = 0;
    for (const x of a) {
      lo = Math.min(lo, x);
      hi = Math.max(hi, x);
      s += x;
    }
    expect(lo).toBeGreaterThanOrEqual(0);
    expect(hi).toBeLessThan(1);
    expect(Math.abs(s / a.length - 0.5)).toBeLessThan(0.01);
    // bf16 keeps 8 significant bits: a rounded draw above 1 - 2^-9 would become 1.0
    const b = take(T.rand([200_000], { dtype: 'bfloat16', generator: gen }));
    expect(b.reduce((m, v) => Math.max(m, v), 0)).toBeLessThan(1);
    expect(b.reduce((m, v) => Math.min(m, v), 1)).toBeGreaterThanOrEqual(0);
  });

  it('uniform(low, high) stays in its range', () => {
    const a = take(T.uniform([100_000], -3, -1, { generator: new T.Generator(5) }));
    expect(Math.min(...a)).toBeGreaterThanOrEqual(-3);
    expect(Math.max(...a)).toBeLessThan(-1);
  });

  it('randint: int64 in [low, high), every value drawn about equally often', () => {
    const t = T.randint(-3, 5, [80_000], { generator: new T.Generator(6) });
    expect(t.dtype).toBe('int64');
    const a = take(t);
    const counts = new Map<number, number>();
    for (const x of a) counts.set(x, (counts.get(x) ?? 0) + 1);
    expect([...counts.keys()].sort((p, q) => p - q)).toEqual([-3, -2, -1, 0, 1, 2, 3, 4]);
    for (const c of counts.values()) expect(Math.abs(c / a.length - 1 / 8)).toBeLessThan(0.01);
  });
});

describe('dropout', () => {
  it('keeps about 1 - p of the elements and scales them by 1 / (1 - p)', () => {
    const x = T.ones([100_000]);
    const y = take(T.dropout(x, 0.3, true, new T.Generator(8)));
    x.dispose();
    const zeros = y.filter((v) => v === 0).length;
    expect(Math.abs(zeros / y.length - 0.3)).toBeLessThan(0.01);
    const scale = Math.fround(1 / 0.7);
    expect(y.every((v) => v === 0 || v === scale)).toBe(true);
  });

  it('is the identity when not training or p = 0, and zero for p = 1', () => {
    const x = T.randn([50], { generator: new T.Generator(1) });
    const xv = Array.from(x.toTypedArray() as Float32Array);
    expect(take(T.dropout(x, 0.5, false))).toEqual(xv);
    expect(take(T.dropout(x, 0))).toEqual(xv);
    expect(take(T.dropout(x, 1)).every((v) => v === 0)).toBe(true);
    x.dispose();
  });

  it('is reproducible from the default generator state', () => {
    const x = T.ones([64]);
    T.manualSeed(5);
    const a = take(T.dropout(x, 0.5));
    T.manualSeed(5);
    const b = take(T.dropout(x, 0.5));
    expect(b).toEqual(a);
    x.dispose();
  });

  it('backward applies the same mask and scale', () => {
    const x = T.randn([1000], { generator: new T.Generator(2) }).requiresGrad_(true);
    const g = T.randn([1000], { generator: new T.Generator(3) });
    const y = T.dropout(x, 0.4, true, new T.Generator(4));
    y.backward(g);
    const xv = Array.from(x.toTypedArray() as Float32Array);
    const yv = take(y);
    const gv = take(g);
    const grad = Array.from(x.grad!.toTypedArray() as Float32Array);
    const scale = Math.fround(1 / 0.6);
    for (let i = 0; i < xv.length; i++) {
      const kept = yv[i] !== 0;
      // where y kept x (x * scale), the gradient is g * scale; elsewhere it is 0
      if (kept) expect(yv[i]).toBe(Math.fround(xv[i] * scale));
      if (kept) expect(grad[i]).toBe(Math.fround(gv[i] * scale));
      else expect(Math.abs(grad[i])).toBe(0); // g * 0 may be -0
    }
    x.dispose();
  });
});
