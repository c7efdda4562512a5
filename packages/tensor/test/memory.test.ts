// Ownership of native memory: dispose, views sharing storage, tidy scopes, `using`
// declarations, the graph's saved tensors, and a whole training step returning to its start.
import { describe, expect, it } from 'vitest';
import type { Tensor } from '../src/index.js';
import * as T from '../src/index.js';

const live = () => T.memoryStats().liveBytes;

function expectDisposedError(fn: () => unknown): void {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(T.TensorError);
    expect((e as T.TensorError).code).toBe('DISPOSED');
    return;
  }
  expect.fail('expected a DISPOSED TensorError');
}

describe('dispose', () => {
  it('frees the storage: liveBytes and liveStorages drop', () => {
    const before = T.memoryStats();
    const t = T.zeros([10, 25]);
    const during = T.memoryStats();
    expect(during.liveBytes - before.liveBytes).toBe(10 * 25 * 4);
    expect(during.liveStorages - before.liveStorages).toBe(1);
    expect(during.allocations - before.allocations).toBe(1);
    t.dispose();
    expect(t.disposed).toBe(true);
    const after = T.memoryStats();
    expect(after.liveBytes).toBe(before.liveBytes);
    expect(after.liveStorages).toBe(before.liveStorages);
  });

  it('is safe to call twice', () => {
    const before = live();
    const a = T.ones([8], { dtype: 'float64' });
    const b = T.ones([8], { dtype: 'float64' });
    a.dispose();
    a.dispose();
    // the second dispose must not release b's bytes or anything else
    expect(live() - before).toBe(64);
    b.dispose();
    expect(live()).toBe(before);
  });

  it('using a disposed tensor throws DISPOSED', () => {
    const before = live();
    const x = T.ones([2, 3]);
    const y = T.ones([3, 2]);
    x.dispose();
    expectDisposedError(() => x.add(1));
    expectDisposedError(() => T.matmul(x, y));
    expectDisposedError(() => x.toArray());
    expectDisposedError(() => x.item());
    expectDisposedError(() => x.view(6));
    expectDisposedError(() => x.detach());
    expectDisposedError(() => T.sum(x));
    expectDisposedError(() => T.cat([y, x]));
    y.dispose();
    expect(live()).toBe(before);
  });

  it('dispose also frees .grad', () => {
    const before = live();
    const x = T.ones([4]).requiresGrad_(true);
    T.tidy(() => T.sum(T.mul(x, 2)).backward());
    expect(live() - before).toBe(32); // x and x.grad
    const g = x.grad!;
    x.dispose();
    expect(g.disposed).toBe(true);
    expect(live()).toBe(before);
  });
});

describe('views', () => {
  it('keep the storage alive until the last view is disposed', () => {
    const before = live();
    const x = T.arange(0, 12, 1, { dtype: 'float32' });
    const v = x.view(3, 4);
    const t = v.transpose(0, 1);
    const n = T.narrow(x, 0, 2, 3);
    expect(x.storage.refCount).toBe(4);
    expect(live() - before).toBe(48); // one storage for all four
    x.dispose();
    v.dispose();
    expect(live() - before).toBe(48);
    expect(t.toArray()).toEqual([
      [0, 4, 8],
      [1, 5, 9],
      [2, 6, 10],
      [3, 7, 11],
    ]);
    expect(n.toArray()).toEqual([2, 3, 4]);
    t.dispose();
    expect(live() - before).toBe(48);
    n.dispose();
    expect(n.storage.freed).toBe(true);
    expect(live()).toBe(before);
  });
});

describe('tidy', () => {
  it('frees everything created inside except the returned tensor', () => {
    const before = live();
    const keepOut = T.ones([3]);
    const r = T.tidy(() => {
      const a = T.mul(keepOut, 2);
      const b = T.exp(a);
      return T.add(b, a);
    });
    // only r (and keepOut, created outside) remain
    expect(live() - before).toBe(24);
    expect(r.disposed).toBe(false);
    expect(keepOut.disposed).toBe(false);
    r.dispose();
    keepOut.dispose();
    expect(live()).toBe(before);
  });

  it('keeps tensors returned in arrays and objects, and the ones passed to keep()', () => {
    const before = live();
    let inner: Tensor | null = null;
    let kept: Tensor | null = null;
    const out = T.tidy(() => {
      inner = T.zeros([2]);
      kept = T.keep(T.zeros([5]));
      T.zeros([100]); // dropped
      return { list: [T.ones([1]), T.ones([2])], nested: { t: T.ones([3]) }, n: 4 };
    });
    expect(out.n).toBe(4);
    expect(out.list.map((t) => t.disposed)).toEqual([false, false]);
    expect(out.nested.t.disposed).toBe(false);
    expect(inner!.disposed).toBe(true);
    expect(kept!.disposed).toBe(false);
    expect(live() - before).toBe((1 + 2 + 3 + 5) * 4);
    for (const t of [...out.list, out.nested.t, kept!]) t.dispose();
    expect(live()).toBe(before);
  });

  it('nested tidy hands its result to the enclosing scope', () => {
    const before = live();
    let fromInner: Tensor | null = null;
    const outer = T.tidy(() => {
      fromInner = T.tidy(() => {
        T.ones([50]);
        return T.ones([2]);
      });
      expect(live() - before).toBe(8); // the inner scope freed its [50]
      return T.mul(fromInner, 3);
    });
    // fromInner belonged to the outer scope, which freed it
    expect(fromInner!.disposed).toBe(true);
    expect(outer.toArray()).toEqual([3, 3]);
    outer.dispose();
    expect(live()).toBe(before);
  });

  it('frees the scope and rethrows when fn throws', () => {
    const before = live();
    let made: Tensor | null = null;
    expect(() =>
      T.tidy(() => {
        made = T.ones([10]);
        throw new Error('inside');
      }),
    ).toThrow('inside');
    expect(made!.disposed).toBe(true);
    expect(live()).toBe(before);
  });

  it('rejects async functions', () => {
    expect(() => T.tidy(async () => 1)).toThrow(/synchronous/);
  });
});

describe('using declarations', () => {
  it('dispose at the end of the block', () => {
    const before = live();
    let seen: Tensor | null = null;
    {
      using t = T.ones([16]);
      using v = t.view(4, 4);
      seen = v;
      expect(live() - before).toBe(64); // one storage shared by t and its view
      using s = T.sum(v);
      expect(s.item()).toBe(16);
    }
    expect(seen!.disposed).toBe(true);
    expect(live()).toBe(before);
  });

  it('dispose when the block throws', () => {
    const before = live();
    let seen: Tensor | null = null;
    expect(() => {
      using t = T.ones([16]);
      seen = t;
      throw new Error('inside');
    }).toThrow('inside');
    expect(seen!.disposed).toBe(true);
    expect(live()).toBe(before);
  });
});

describe('graph memory', () => {
  it('saved tensors are released when the output is disposed or after backward', () => {
    const before = live();
    const x = T.randn([64]).requiresGrad_(true);
    const base = live();
    const y = T.exp(x); // saves its output
    const y2 = T.sigmoid(y);
    y.dispose();
    // the graph of y2 still holds y's storage (saved by ExpBackward, needed by SigmoidBackward)
    expect(live()).toBeGreaterThan(base);
    y2.dispose();
    expect(live()).toBe(base);

    // the intermediates are disposed by tidy, but the graph of z still holds what backward needs
    const z = T.tidy(() => T.sum(T.tanh(T.exp(x))));
    expect(live() - before).toBeGreaterThan(64 * 4 + 4);
    T.tidy(() => z.backward());
    // only x, x.grad and z remain: the saved activations were freed by backward
    expect(live() - before).toBe(64 * 4 * 2 + 4);
    z.dispose();
    x.dispose();
    expect(live()).toBe(before);
  });

  it('peakBytes tracks the maximum and resets to the live bytes', () => {
    const t = T.zeros([1000]);
    const peak = T.memoryStats().peakBytes;
    expect(peak).toBeGreaterThanOrEqual(live());
    t.dispose();
    expect(T.memoryStats().peakBytes).toBe(peak);
    T.resetPeakMemoryStats();
    expect(T.memoryStats().peakBytes).toBe(live());
  });
});

describe('a training step inside tidy', () => {
  it('returns liveBytes to its start, plus the .grad of the leaves', () => {
    const gen = new T.Generator(3);
    const params = [
      T.randn([16, 8], { generator: gen, std: 0.3 }),
      T.randn([16], { generator: gen }),
      T.randn([4, 16], { generator: gen, std: 0.3 }),
      T.randn([4], { generator: gen }),
    ].map((p) => p.requiresGrad_(true));
    const [w1, b1, w2, b2] = params;
    const x = T.randn([5, 3, 8], { generator: gen });
    const target = T.randn([5, 3, 4], { generator: gen });
    const start = T.memoryStats();
    for (let step = 0; step < 2; step++) {
      const loss = T.tidy(() => {
        const h = T.gelu(T.linear(x, w1, b1));
        const d = T.dropout(h, 0.1);
        const y = T.linear(d, w2, b2);
        const l = T.mean(T.square(T.sub(y, target)));
        l.backward();
        return l.item();
      });
      expect(Number.isFinite(loss)).toBe(true);
      const gradBytes = params.reduce((s, p) => s + p.numel * 4, 0);
      expect(live() - start.liveBytes).toBe(gradBytes);
      expect(T.memoryStats().liveStorages - start.liveStorages).toBe(params.length);
    }
    for (const p of params) expect(p.grad?.shape).toEqual(p.shape);
    for (const p of params) {
      p.grad!.dispose();
      p.grad = null;
    }
    expect(live()).toBe(start.liveBytes);
    for (const t of [...params, x, target]) t.dispose();
  });
});
