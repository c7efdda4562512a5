// Autograd behaviour: accumulation, retainGraph, grad modes, detach, hooks, retainGrad, shared
// inputs and diamonds, non-scalar backward, checkpoint (with parameters and dropout) and the
// fp32 mainGrad of a bf16 leaf. Expected values are derived by hand from the math.
import { afterEach, describe, expect, it } from 'vitest';
import { attachGrad } from '../src/autograd/record.js';
import type { Tensor } from '../src/index.js';
import * as T from '../src/index.js';
import { expectTensorError } from './fixtures.js';

const vals = (t: Tensor | null): number[] => Array.from(t!.toTypedArray() as Float32Array | Float64Array);

function expectValues(t: Tensor | null, expected: number[], tol = 1e-6): void {
  expect(t, 'tensor').not.toBeNull();
  const got = vals(t);
  expect(got.length).toBe(expected.length);
  got.forEach((g, i) => {
    expect(Math.abs(g - expected[i]), `element ${i}: ${g} vs ${expected[i]}`).toBeLessThanOrEqual(tol);
  });
}

const leaf = (data: number[], shape?: number[], dtype: T.DType = 'float64') =>
  T.tensor(data, { dtype, shape }).requiresGrad_(true);

let start = 0;
afterEach(() => {
  // every test cleans up after itself: nothing is left allocated
  expect(T.memoryStats().liveBytes).toBe(start);
});
const begin = () => {
  start = T.memoryStats().liveBytes;
};

describe('gradient accumulation and graph lifetime', () => {
  it('accumulates .grad over two backward calls', () => {
    begin();
    const x = leaf([1, 2, 3]);
    T.tidy(() => T.sum(T.mul(x, x)).backward());
    expectValues(x.grad, [2, 4, 6]);
    T.tidy(() => T.sum(T.mul(x, 3)).backward());
    expectValues(x.grad, [5, 7, 9]);
    x.dispose();
  });

  it('a second backward without retainGraph throws GRAPH_FREED; with it, it works', () => {
    begin();
    const x = leaf([0.5, -1]);
    T.tidy(() => {
      const y = T.sum(T.exp(x));
      y.backward(undefined, { retainGraph: true });
      y.backward();
      expectValues(x.grad, [2 * Math.exp(0.5), 2 * Math.exp(-1)], 1e-12);
      expectTensorError(() => y.backward(), 'GRAPH_FREED');
    });
    T.tidy(() => {
      const y = T.sum(T.mul(x, x));
      y.backward();
      expectTensorError(() => y.backward(), 'GRAPH_FREED');
    });
    x.dispose();
  });

  it('backward on a leaf root fills its own .grad', () => {
    begin();
    const x = leaf([3]);
    x.backward();
    expectValues(x.grad, [1]);
    x.dispose();
  });

  it('isLeaf, requiresGrad and gradFn follow the recorded graph', () => {
    begin();
    T.tidy(() => {
      const x = leaf([1, 2]);
      const c = T.tensor([1, 1], { dtype: 'float64' });
      const y = T.mul(x, c);
      expect(x.isLeaf).toBe(true);
      expect(y.isLeaf).toBe(false);
      expect(y.requiresGrad).toBe(true);
      expect(y.gradFn?.name).toBe('MulBackward');
      const z = T.add(c, 1);
      expect(z.requiresGrad).toBe(false);
      expect(z.gradFn).toBeNull();
    });
  });
});

describe('grad modes and detach', () => {
  it('noGrad records nothing and restores the mode, even when fn throws', () => {
    begin();
    const x = leaf([1, 2]);
    T.tidy(() => {
      const y = T.noGrad(() => {
        expect(T.isGradEnabled()).toBe(false);
        return T.mul(x, 2);
      });
      expect(T.isGradEnabled()).toBe(true);
      expect(y.requiresGrad).toBe(false);
      expect(y.gradFn).toBeNull();
      expect(() =>
        T.noGrad(() => {
          throw new Error('boom');
        }),
      ).toThrow('boom');
      expect(T.isGradEnabled()).toBe(true);
      // enableGrad inside noGrad records again
      const z = T.noGrad(() => T.enableGrad(() => T.mul(x, 2)));
      expect(z.requiresGrad).toBe(true);
    });
    x.dispose();
  });

  it('detach shares storage but stops the gradient', () => {
    begin();
    const x = leaf([1, 2, 3]);
    T.tidy(() => {
      const d = x.detach();
      expect(d.requiresGrad).toBe(false);
      expect(d.storage).toBe(x.storage);
      // d(x.detach() * x)/dx = x.detach(): the detached factor contributes no gradient
      T.sum(T.mul(d, x)).backward();
      expectValues(x.grad, [1, 2, 3]);
      // writes through the detached view are visible in x
      T.noGrad(() => d.fill_(7));
      expectValues(x, [7, 7, 7]);
    });
    x.dispose();
  });
});

describe('hooks and retainGrad', () => {
  it('a hook on a leaf can replace its gradient, and can be removed', () => {
    begin();
    const x = leaf([1, 2]);
    const remove = x.registerHook((g) => T.mul(g, 10));
    T.tidy(() => T.sum(T.mul(x, 3)).backward());
    expectValues(x.grad, [30, 30]);
    remove();
    T.tidy(() => T.sum(T.mul(x, 3)).backward());
    expectValues(x.grad, [33, 33]);
    x.dispose();
  });

  it('a hook on an intermediate sees its gradient and changes what flows upstream', () => {
    begin();
    const x = leaf([1, 2]);
    const seen: number[][] = [];
    T.tidy(() => {
      const y = T.mul(x, 2);
      y.registerHook((g) => {
        seen.push(vals(g));
      });
      const z = T.mul(x, 2);
      z.registerHook((g) => T.neg(g));
      T.sum(T.add(T.mul(y, y), z)).backward();
    });
    // dL/dy = 2y = 4x; z's gradient (1) is negated before reaching x
    expect(seen).toEqual([[4, 8]]);
    expectValues(x.grad, [4 * 2 * 1 - 2, 4 * 2 * 2 - 2]);
    x.dispose();
  });

  it('registerHook on a tensor without grad throws NO_GRAD', () => {
    begin();
    const c = T.ones([2]);
    expectTensorError(() => c.registerHook(() => undefined), 'NO_GRAD');
    c.dispose();
  });

  it('retainGrad keeps (and accumulates) the gradient of a non-leaf', () => {
    begin();
    const x = leaf([1, -2]);
    T.tidy(() => {
      const y = T.mul(x, 3);
      const w = T.mul(x, 3);
      y.retainGrad();
      const loss = T.sum(T.add(T.square(y), w));
      loss.backward(undefined, { retainGraph: true });
      expectValues(y.grad, [6, -12]); // 2y
      expect(w.grad).toBeNull(); // not retained
      loss.backward();
      expectValues(y.grad, [12, -24]);
      y.dispose();
      expect(y.grad).toBeNull();
    });
    x.dispose();
  });
});

describe('graph shapes', () => {
  it('shared inputs: d(x*x)/dx = 2x', () => {
    begin();
    const x = leaf([1.5, -2]);
    T.tidy(() => T.sum(T.mul(x, x)).backward());
    expectValues(x.grad, [3, -4]);
    x.dispose();
  });

  it('diamond: a = exp(x); L = sum(2a + sin(a)) gives (2 + cos(a)) * exp(x)', () => {
    begin();
    const xs = [0.3, -0.7, 1.1];
    const x = leaf(xs);
    T.tidy(() => {
      const a = T.exp(x);
      T.sum(T.add(T.mul(a, 2), T.sin(a))).backward();
    });
    expectValues(
      x.grad,
      xs.map((v) => (2 + Math.cos(Math.exp(v))) * Math.exp(v)),
      1e-12,
    );
    x.dispose();
  });

  it('backward(gradient) for a non-scalar output', () => {
    begin();
    const x = leaf([1, 2, 3, 4, 5, 6], [2, 3]);
    T.tidy(() => {
      const y = T.mul(x, 3);
      expectTensorError(() => y.backward(), 'INVALID_ARGUMENT');
      expectTensorError(() => y.backward(T.ones([3], { dtype: 'float64' })), 'SHAPE_MISMATCH');
      y.backward(
        T.tensor(
          [
            [1, 0, -1],
            [2, 0.5, 0],
          ],
          { dtype: 'float64' },
        ),
      );
    });
    expectValues(x.grad, [3, 0, -3, 6, 1.5, 0]);
    x.dispose();
  });

  it('backward of a tensor that does not require grad throws NO_GRAD', () => {
    begin();
    const c = T.ones([]);
    expectTensorError(() => c.backward(), 'NO_GRAD');
    c.dispose();
  });

  it('gradients flow across dtype casts in the leaf dtype', () => {
    begin();
    const x = leaf([1, 2], undefined, 'float32');
    T.tidy(() => T.sum(T.mul(T.to(x, 'bfloat16'), 4)).backward());
    expect(x.grad!.dtype).toBe('float32');
    expectValues(x.grad, [4, 4]);
    x.dispose();
  });
});

describe('checkpoint', () => {
  function block(x: Tensor, w: Tensor, b: Tensor): Tensor {
    const h = T.gelu(T.linear(x, w, b));
    return T.mul(T.dropout(h, 0.3), h);
  }

  function grads(useCheckpoint: boolean) {
    T.manualSeed(1234);
    const gen = new T.Generator(5);
    const x = T.randn([4, 6], { dtype: 'float64', generator: gen }).requiresGrad_(true);
    const w = T.randn([5, 6], { dtype: 'float64', generator: gen }).requiresGrad_(true);
    const b = T.randn([5], { dtype: 'float64', generator: gen }).requiresGrad_(true);
    const out = T.tidy(() => {
      // w and b are parameters used inside fn, not inputs of the checkpoint
      const y = useCheckpoint ? T.checkpoint((xi) => block(xi, w, b), x) : block(x, w, b);
      const loss = T.sum(T.mul(y, y));
      const yv = vals(y);
      const afterForward = T.getRngState();
      loss.backward();
      // the recomputation replays the RNG and then restores it
      expect(T.getRngState()).toEqual(afterForward);
      return { yv };
    });
    const r = { y: out.yv, x: vals(x.grad), w: vals(w.grad), b: vals(b.grad) };
    for (const t of [x, w, b]) t.dispose();
    return r;
  }

  it('gives the same outputs and gradients (inputs, parameters, dropout) as the plain run', () => {
    begin();
    const plain = grads(false);
    const ck = grads(true);
    // dropout masks differ unless the recomputation replays the RNG: some outputs are zero
    expect(plain.y.some((v) => v === 0)).toBe(true);
    expect(ck.y).toEqual(plain.y);
    for (const k of ['x', 'w', 'b'] as const) {
      expect(ck[k].length).toBe(plain[k].length);
      ck[k].forEach((v, i) => {
        expect(v).toBeCloseTo(plain[k][i], 12);
      });
    }
  });

  it('parameters get gradients even when no input requires grad', () => {
    begin();
    const w = leaf([2, -1]);
    const x = T.tensor([3, 4], { dtype: 'float64' });
    T.tidy(() => {
      const y = T.checkpoint((xi) => T.sum(T.mul(T.mul(xi, w), w)), x);
      y.backward();
    });
    expectValues(w.grad, [2 * 3 * 2, 2 * 4 * -1]); // d(x w^2)/dw = 2xw
    w.dispose();
    x.dispose();
  });

  it('records nothing under noGrad', () => {
    begin();
    const x = leaf([1]);
    T.tidy(() => {
      const y = T.noGrad(() => T.checkpoint((a) => T.mul(a, 2), x));
      expect(y.requiresGrad).toBe(false);
    });
    x.dispose();
  });
});

describe('mainGrad', () => {
  it('a bf16 leaf accumulates into its fp32 mainGrad instead of .grad', () => {
    begin();
    const w = T.tensor([1, 2, 3], { dtype: 'bfloat16' }).requiresGrad_(true);
    // 256 + 1 is not representable in bf16 (its spacing there is 2): the sum must be fp32
    w.mainGrad = T.full([3], 256, { dtype: 'float32' });
    T.tidy(() => T.sum(w).backward());
    T.tidy(() => T.sum(T.mul(w, 0.5)).backward());
    expect(w.grad).toBeNull();
    expect(w.mainGrad.dtype).toBe('float32');
    expectValues(w.mainGrad, [257.5, 257.5, 257.5], 0);
    w.mainGrad.dispose();
    w.dispose();
  });

  it('gradient-accumulation fusion changes nothing on the CPU (it has no fused kernel)', () => {
    begin();
    expect(T.getGradientAccumulationFusion()).toBe(true);
    const run = (fusion: boolean): number[] => {
      T.setGradientAccumulationFusion(fusion);
      const w = T.tensor([0.5, -1.25, 2, 0.75, 1.5, -0.5], {
        dtype: 'bfloat16',
        shape: [2, 3],
      }).requiresGrad_(true);
      w.mainGrad = T.full([2, 3], 256, { dtype: 'float32' });
      T.tidy(() => {
        const x = T.tensor([1.5, 2.25, -3, 0.125, 4, -1, 2, 0.5, 3], { dtype: 'bfloat16', shape: [3, 3] });
        T.linear(x, w).sum().backward();
      });
      expect(w.grad).toBeNull();
      const out = Array.from(w.mainGrad.toTypedArray() as Float32Array);
      w.mainGrad.dispose();
      w.dispose();
      return out;
    };
    try {
      const fused = run(true);
      expect(run(false)).toEqual(fused);
      // column sums of x added to 256, in fp32
      expect(fused).toEqual([259.625, 262.75, 255, 259.625, 262.75, 255]);
    } finally {
      T.setGradientAccumulationFusion(true);
    }
  });
});

describe('gradients waiting from other uses (pending)', () => {
  /**
   * y = h (values copied) with a backward that adds its gradient into the gradient already waiting
   * for h when the engine offers one (returning that tensor), else returns a copy; `seen` records
   * what it was offered.
   */
  function addsIntoPending(h: Tensor, seen: (Tensor | null)[]): Tensor {
    const y = T.noGrad(() => h.clone());
    attachGrad(y, 'AddsIntoPendingBackward', [h], [], (g, _saved, pending) => {
      const p = pending?.[0] ?? null;
      seen.push(p);
      if (!p) return [g.clone()];
      p.backend.binary(p, p, g, 'add');
      return [p];
    });
    return y;
  }

  it('offers a backward the dense gradient already waiting for its input; adding into it gives the sum', () => {
    begin();
    const x = leaf([1, 2, 3]);
    const seen: (Tensor | null)[] = [];
    T.tidy(() => {
      const h = T.mul(x, 2);
      // the engine runs h * 3's backward first (the later input of the add), whose gradient for h
      // then waits while the custom backward runs
      const z = T.add(addsIntoPending(h, seen), T.mul(h, 3));
      T.sum(z).backward();
    });
    expect(seen.length).toBe(1);
    expect(seen[0]).not.toBeNull();
    expectValues(x.grad, [8, 8, 8]); // 2 * (1 + 3)
    x.dispose();
  });

  it('offers nothing where the waiting gradient shares memory (an add passes one gradient to both inputs)', () => {
    begin();
    const x = leaf([1, 2, 3]);
    const q = leaf([5, 6, 7]);
    const seen: (Tensor | null)[] = [];
    T.tidy(() => {
      const h = T.mul(x, 2);
      // h + q's backward hands the same (dense) gradient to h and to q: adding into h's would
      // change q's
      const z = T.add(addsIntoPending(h, seen), T.add(h, q));
      z.backward(T.tensor([1, 1, 1], { dtype: 'float64' }));
    });
    expect(seen).toEqual([null]);
    expectValues(q.grad, [1, 1, 1]);
    expectValues(x.grad, [4, 4, 4]); // 2 * (1 + 1)
    x.dispose();
    q.dispose();
  });

  it('offers nothing when no other gradient is waiting yet', () => {
    begin();
    const x = leaf([1, 2]);
    const seen: (Tensor | null)[] = [];
    T.tidy(() => T.sum(addsIntoPending(T.mul(x, 2), seen)).backward());
    expect(seen).toEqual([null]);
    expectValues(x.grad, [2, 2]);
    x.dispose();
  });
});
