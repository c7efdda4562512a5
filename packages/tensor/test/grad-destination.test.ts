// Gradient destinations (BackwardFn's `dest`): a backward recorded with takesDestinations is offered,
// per input, the region of a split's (unbind's) gradient buffer its gradient ends up in, seen through
// the view ops between; what it writes there is left in place by the split (no copy). Checked with a
// custom op (what is offered, and where not: several uses, a hook, a copy on the way, a region the
// op does not write, a piece without a gradient), then with RoPE and attention on a fused QKV
// projection as the attention layer uses them: the same gradients bit for bit as the chain broken by
// a copy, and no copy in the backward. Nothing is left allocated.
import { afterEach, describe, expect, it } from 'vitest';
import { attachGrad } from '../src/autograd/record.js';
import {
  applyRotaryPosEmb,
  arange,
  type DType,
  getBackend,
  getDefaultDevice,
  hasNativeKernel,
  memoryStats,
  mul,
  noGrad,
  ropeCosSin,
  scaledDotProductAttention,
  sum,
  type Tensor,
  tidy,
} from '../src/index.js';
import { seededNormals } from './fixtures.js';

const values = (t: Tensor | null): number[] => Array.from(t!.toTypedArray() as ArrayLike<number>, Number);

let start = 0;
afterEach(() => {
  expect(memoryStats().liveBytes).toBe(start);
});
const begin = () => {
  start = memoryStats().liveBytes;
};

interface Offer {
  shape: number[];
  strides: number[];
  offset: number;
}

/**
 * y = h * k, recorded with a backward that takes destinations: it writes g * k into dest[0] when
 * offered (unless `ignore`) and returns it, else returns a new tensor; `seen` records each offer.
 */
function scaled(h: Tensor, k: number, seen: (Offer | null)[], ignore = false): Tensor {
  const y = noGrad(() => mul(h, k));
  attachGrad(
    y,
    'ScaledBackward',
    [h],
    [],
    (g, _saved, _pending, dest) => {
      const d = dest?.[0] ?? null;
      seen.push(d && { shape: [...d.shape], strides: [...d.strides], offset: d.offset });
      const gk = mul(g, k);
      if (!d || ignore) return [gk];
      d.backend.copy(d, gk);
      gk.dispose();
      return [d];
    },
    { takesDestinations: true },
  );
  return y;
}

const leaf = (shape: number[], seed: number, dtype: DType = 'float64'): Tensor =>
  noGrad(() => tidy(() => seededNormals(seed)(shape, dtype))).requiresGrad_(true);

/** sum(w * y) with fixed weights w (so every element's gradient differs). */
function weightedSum(y: Tensor, seed: number): Tensor {
  const w = noGrad(() => tidy(() => seededNormals(seed)([...y.shape], y.dtype)));
  const s = sum(mul(y, w));
  w.dispose();
  return s;
}

describe('gradient destinations through views into a split', () => {
  it('offers the region of the split buffer seen through permute / view, and the gradient is right', () => {
    begin();
    const x = leaf([2, 3, 6], 1);
    const ref = leaf([2, 3, 6], 1);
    const seen: (Offer | null)[] = [];
    tidy(() => {
      // [2, 3, 6] -> pieces [2, 3, 2] and [2, 3, 4]; the second viewed as [2, 3, 2, 2], permuted
      const [a, b] = x.split([2, 4], 2);
      const b2 = b.view(2, 3, 2, 2).permute(2, 0, 3, 1);
      const loss = weightedSum(scaled(a.transpose(0, 1), 3, seen), 7).add(
        weightedSum(scaled(b2, -2, seen), 8),
      );
      loss.backward();
      // the same without destinations: the pieces' gradients computed apart, then assembled
      const [ra, rb] = ref.split([2, 4], 2);
      const rb2 = rb.view(2, 3, 2, 2).permute(2, 0, 3, 1);
      weightedSum(mul(ra.transpose(0, 1), 3), 7)
        .add(weightedSum(mul(rb2, -2), 8))
        .backward();
    });
    // x's gradient buffer is [2, 3, 6] contiguous (strides 18, 6, 1): a is columns 0..1, b 2..5
    expect(seen).toEqual(
      expect.arrayContaining([
        { shape: [3, 2, 2], strides: [6, 18, 1], offset: 0 },
        { shape: [2, 2, 2, 3], strides: [2, 18, 1, 6], offset: 2 },
      ]),
    );
    expect(seen.length).toBe(2);
    expect(values(x.grad)).toEqual(values(ref.grad));
    x.dispose();
    ref.dispose();
  });

  it('offers nothing where a piece has several uses, a gradient hook, or a copy on the way', () => {
    begin();
    const x = leaf([4, 3], 2);
    const ref = leaf([4, 3], 2);
    const seen: (Offer | null)[] = [];
    tidy(() => {
      const [a, b, c] = x.split(1, 1);
      const hooked = b.transpose(0, 1);
      hooked.registerHook(() => undefined);
      const loss = weightedSum(scaled(a, 2, seen), 1)
        .add(weightedSum(a, 2)) // a's second use
        .add(weightedSum(scaled(hooked, 3, seen), 3))
        .add(weightedSum(scaled(c.contiguous(), 4, seen), 4)); // a copy node has no forward view
      loss.backward();
      const [ra, rb, rc] = ref.split(1, 1);
      weightedSum(mul(ra, 2), 1)
        .add(weightedSum(ra, 2))
        .add(weightedSum(mul(rb.transpose(0, 1), 3), 3))
        .add(weightedSum(mul(rc.contiguous(), 4), 4))
        .backward();
    });
    expect(seen).toEqual([null, null, null]);
    expect(values(x.grad)).toEqual(values(ref.grad));
    x.dispose();
    ref.dispose();
  });

  it('fills what the producers did not write: an offer left unused, a piece without a gradient', () => {
    begin();
    const x = leaf([3, 5], 3);
    const seen: (Offer | null)[] = [];
    tidy(() => {
      const [a, b, c] = x.unbind(0);
      // a: offered, ignored (returns its own tensor); b: written in place; c: no gradient at all
      void c;
      const loss = weightedSum(scaled(a, 2, seen, true), 5).add(weightedSum(scaled(b, 3, seen), 6));
      loss.backward();
    });
    expect(seen.filter((s) => s).length).toBe(2);
    const w5 = tidy(() => seededNormals(5)([5], 'float64'));
    const w6 = tidy(() => seededNormals(6)([5], 'float64'));
    const expected = [...values(w5).map((v) => 2 * v), ...values(w6).map((v) => 3 * v), 0, 0, 0, 0, 0];
    w5.dispose();
    w6.dispose();
    expect(values(x.grad)).toEqual(expected);
    x.dispose();
  });

  it('frees a buffer whose split never runs its backward (the error path) and leaves nothing', () => {
    begin();
    const x = leaf([2, 4], 4);
    const seen: (Offer | null)[] = [];
    expect(() =>
      tidy(() => {
        const [a] = x.split(2, 1);
        const y = scaled(a, 2, seen);
        // a backward that fails after the destination was handed out
        const z = noGrad(() => mul(y, 1));
        attachGrad(z, 'FailsBackward', [y], [], () => {
          throw new Error('boom');
        });
        sum(z).backward();
      }),
    ).toThrow('boom');
    expect(seen).toEqual([]);
    expect(x.grad).toBeNull();
    x.dispose();
  });
});

describe('the fused QKV projection: RoPE and attention write into its gradient', () => {
  // [s, b, g, (perGroup + 2) d] as the attention layer splits it; q, k rotated, v a view
  const S = 8;
  const B = 2;
  const G = 2;
  const PER = 2;
  const D = 64; // the head dim of the fast paths (RoPE packs, tensor-core attention)

  let counting = false;
  function run(x: Tensor, breakChain: boolean): void {
    const [qg, kg, vg] = x.split([PER * D, D, D], 3);
    const brk = (t: Tensor) => (breakChain ? t.contiguous() : t);
    const pos = arange(0, S, 1, { dtype: 'int64', device: x.device });
    const { cos, sin } = ropeCosSin(pos, D);
    pos.dispose();
    const q5 = brk(qg)
      .view(S, B, G, PER, D)
      .permute(1, 2, 3, 0, 4)
      .reshape(B * G, PER, S, D);
    const q = applyRotaryPosEmb(q5, cos, sin).view(B, G * PER, S, D);
    const k = applyRotaryPosEmb(brk(kg).permute(1, 2, 0, 3), cos, sin);
    const v = brk(vg).permute(1, 2, 0, 3);
    const out = scaledDotProductAttention(q, k, v, { isCausal: true });
    const loss = weightedSum(out, 11);
    counting = true;
    loss.backward();
    counting = false;
    cos.dispose();
    sin.dispose();
  }

  for (const dtype of ['float32', 'bfloat16'] as DType[]) {
    it(`${dtype}: the same gradient as with the chain broken by copies, and no copy in the backward`, () => {
      begin();
      const x = leaf([S, B, G, (PER + 2) * D], 21, dtype);
      const ref = leaf([S, B, G, (PER + 2) * D], 21, dtype);
      const backend = getBackend(getDefaultDevice());
      const copy = backend.copy;
      let copies = 0;
      backend.copy = (dst, src) => {
        if (counting && dst.numel >= S * B * G * D) copies++;
        copy.call(backend, dst, src);
      };
      try {
        tidy(() => run(x, false));
        const direct = copies;
        copies = 0;
        tidy(() => run(ref, true));
        // without destinations the split copies the three pieces' gradients into its buffer (and
        // the broken chain may copy once more where its reshape is not a view); the ops' own
        // copies (a backend without the fused kernels runs their compositions, which copy into
        // the output) are the same either way
        expect(copies - direct, 'copies saved by the destinations').toBeGreaterThanOrEqual(3);
        if (hasNativeKernel(backend, 'ropeApply') && hasNativeKernel(backend, 'attentionBackward')) {
          expect(direct, 'copies of the size of a piece or more, with destinations').toBe(0);
        }
      } finally {
        backend.copy = copy;
      }
      expect(values(x.grad)).toEqual(values(ref.grad));
      expect(values(x.grad).some((v) => v !== 0)).toBe(true);
      x.dispose();
      ref.dispose();
    });
  }
});
