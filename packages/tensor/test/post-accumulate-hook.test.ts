// registerPostAccumulateGradHook: runs after backward accumulated a leaf's gradient (into .grad
// or .mainGrad), once per backward per leaf, in the order backward reaches the leaves; removable;
// refused on non-leaves and on tensors that do not require grad.
import { afterEach, describe, expect, it } from 'vitest';
import type { Tensor } from '../src/index.js';
import * as T from '../src/index.js';
import { expectTensorError } from './fixtures.js';

const vals = (t: Tensor | null): number[] => Array.from(t!.toTypedArray() as Float32Array);
const leaf = (data: number[], dtype: T.DType = 'float32') => T.tensor(data, { dtype }).requiresGrad_(true);

let start = 0;
const begin = () => {
  start = T.memoryStats().liveBytes;
};
afterEach(() => {
  expect(T.memoryStats().liveBytes).toBe(start);
});

describe('registerPostAccumulateGradHook', () => {
  it('sees the accumulated .grad, and runs in backward order (last layer first)', () => {
    begin();
    const w1 = leaf([2]);
    const w2 = leaf([3]);
    const seen: [string, number[]][] = [];
    w1.registerPostAccumulateGradHook((p) => seen.push(['w1', vals(p.grad)]));
    w2.registerPostAccumulateGradHook((p) => seen.push(['w2', vals(p.grad)]));
    const x = T.tensor([5]);
    // y = (x * w1) * w2: w2's gradient is final before w1's is computed
    T.tidy(() => T.sum(T.mul(T.mul(x, w1), w2)).backward());
    expect(seen).toEqual([
      ['w2', [10]],
      ['w1', [15]],
    ]);
    // the second backward accumulates first, then the hook sees the sum
    seen.length = 0;
    T.tidy(() => T.sum(T.mul(T.mul(x, w1), w2)).backward());
    expect(seen).toEqual([
      ['w2', [20]],
      ['w1', [30]],
    ]);
    for (const t of [w1, w2, x]) t.dispose();
  });

  it('is called once per backward for a leaf used several times', () => {
    begin();
    const w = leaf([1, 2]);
    let calls = 0;
    w.registerPostAccumulateGradHook(() => calls++);
    // three uses of w feed one accumulator: gradients are summed before the accumulation
    T.tidy(() => T.sum(T.add(T.mul(w, w), T.mul(w, 3))).backward());
    expect(calls).toBe(1);
    expect(vals(w.grad)).toEqual([5, 7]);
    w.dispose();
  });

  it('runs after registerHook (which runs before accumulation) and every hook in registration order', () => {
    begin();
    const w = leaf([1]);
    const order: string[] = [];
    w.registerHook((g) => {
      order.push(`pre:${w.grad === null ? 'none' : vals(w.grad)}`);
      return g;
    });
    w.registerPostAccumulateGradHook((p) => order.push(`post1:${vals(p.grad)}`));
    w.registerPostAccumulateGradHook((p) => order.push(`post2:${vals(p.grad)}`));
    T.tidy(() => T.mul(w, 4).sum().backward());
    expect(order).toEqual(['pre:none', 'post1:4', 'post2:4']);
    w.dispose();
  });

  it('is removed by the returned function (also from inside a hook)', () => {
    begin();
    const w = leaf([1]);
    let a = 0;
    let b = 0;
    const removeA = w.registerPostAccumulateGradHook(() => a++);
    const removeB: () => void = w.registerPostAccumulateGradHook(() => {
      b++;
      removeB();
    });
    T.tidy(() => T.mul(w, 2).sum().backward());
    removeA();
    removeA();
    T.tidy(() => T.mul(w, 2).sum().backward());
    expect([a, b]).toEqual([1, 1]);
    expect(vals(w.grad)).toEqual([4]);
    w.dispose();
  });

  it('sees the fp32 mainGrad of a bf16 leaf (and .grad stays empty)', () => {
    begin();
    const w = leaf([1, 2], 'bfloat16');
    w.mainGrad = T.zeros([2], { dtype: 'float32' });
    const seen: number[][] = [];
    w.registerPostAccumulateGradHook((p) => {
      expect(p.grad).toBeNull();
      seen.push(vals(p.mainGrad));
    });
    T.tidy(() => T.mul(w, 3).sum().backward());
    T.tidy(() => T.mul(w, 0.5).sum().backward());
    expect(seen).toEqual([
      [3, 3],
      [3.5, 3.5],
    ]);
    w.mainGrad.dispose();
    w.dispose();
  });

  it('runs when backward starts at the leaf itself, and not for leaves that got no gradient', () => {
    begin();
    const w = leaf([1, 2]);
    const unused = leaf([7]);
    let calls = 0;
    let unusedCalls = 0;
    w.registerPostAccumulateGradHook(() => calls++);
    unused.registerPostAccumulateGradHook(() => unusedCalls++);
    T.tidy(() => w.backward(T.tensor([1, 1])));
    expect(calls).toBe(1);
    expect(unusedCalls).toBe(0);
    w.dispose();
    unused.dispose();
  });

  it('runs for parameters inside checkpoint() during the recomputation', () => {
    begin();
    const w = leaf([2]);
    let seen: number[] = [];
    w.registerPostAccumulateGradHook((p) => {
      seen = vals(p.grad);
    });
    const x = T.tensor([3]);
    T.tidy(() =>
      T.checkpoint((xi) => T.mul(xi, w), x)
        .sum()
        .backward(),
    );
    expect(seen).toEqual([3]);
    x.dispose();
    w.dispose();
  });

  it('is refused on a non-leaf and on a tensor that does not require grad', () => {
    begin();
    const w = leaf([1]);
    T.tidy(() => {
      const y = T.mul(w, 2);
      expectTensorError(() => y.registerPostAccumulateGradHook(() => {}), 'INVALID_ARGUMENT', /leaf/);
    });
    const c = T.tensor([1]);
    expectTensorError(() => c.registerPostAccumulateGradHook(() => {}), 'NO_GRAD');
    c.dispose();
    w.dispose();
  });
});
