// split / chunk / unbind are single graph nodes with one output per piece.
import { describe, expect, it } from 'vitest';
import { cat, gradcheck, memoryStats, mul, randn, stack, tensor, tidy, unbind } from '../src/index.js';

describe('multi-output ops', () => {
  it('split: gradients of the used pieces land in place, unused pieces get zeros', () => {
    const x = tensor([1, 2, 3, 4, 5], { dtype: 'float32', requiresGrad: true });
    const [a, , c] = x.split([2, 1, 2]);
    tidy(() => a.mul(10).sum().add(c.mul(c).sum()).backward());
    expect(x.grad!.toArray()).toEqual([10, 10, 0, 8, 10]);
    x.dispose();
  });

  it('unbind: each slice routes its gradient to its row', () => {
    const x = tensor(
      [
        [1, 2],
        [3, 4],
        [5, 6],
      ],
      { dtype: 'float32', requiresGrad: true },
    );
    const rows = unbind(x, 0);
    expect(rows.map((r) => r.toArray())).toEqual([
      [1, 2],
      [3, 4],
      [5, 6],
    ]);
    tidy(() => rows[0].sum().add(rows[2].mul(3).sum()).backward());
    expect(x.grad!.toArray()).toEqual([
      [1, 1],
      [0, 0],
      [3, 3],
    ]);
    const cols = x.unbind(1);
    expect(cols[1].toArray()).toEqual([2, 4, 6]);
    x.dispose();
  });

  it('gradcheck through split, chunk and unbind', () => {
    const x = randn([4, 6], { dtype: 'float64', requiresGrad: true });
    expect(
      gradcheck(
        (t) => {
          const [p, q] = t.split([2, 4], 1);
          return cat([mul(p, p), q.mul(2)], 1);
        },
        [x],
      ),
    ).toBe(true);
    expect(
      gradcheck(
        (t) => {
          const [u, , w] = t.chunk(3, 1);
          return mul(u, w);
        },
        [x],
      ),
    ).toBe(true);
    expect(
      gradcheck(
        (t) => {
          const r = unbind(t, 0);
          return stack([r[3], mul(r[0], r[1])]);
        },
        [x],
      ),
    ).toBe(true);
    x.dispose();
  });

  it('a hook on one piece sees only that piece’s gradient', () => {
    const x = tensor([1, 2, 3, 4], { dtype: 'float32', requiresGrad: true });
    const [a, b] = x.split(2);
    const seen: number[][] = [];
    b.registerHook((g) => {
      seen.push(g.toArray() as number[]);
      return g.mul(2);
    });
    tidy(() => a.sum().add(b.sum()).backward());
    expect(seen).toEqual([[1, 1]]);
    expect(x.grad!.toArray()).toEqual([1, 1, 2, 2]);
    x.dispose();
  });

  it('frees everything after backward', () => {
    const x = randn([8, 16], { requiresGrad: true });
    const before = memoryStats().liveBytes;
    tidy(() => {
      const [p, q] = x.split(8, 1);
      unbind(p, 0)[3].mul(q.sum()).sum().backward();
    });
    x.grad!.dispose();
    x.grad = null;
    expect(memoryStats().liveBytes).toBe(before);
    x.dispose();
  });
});
