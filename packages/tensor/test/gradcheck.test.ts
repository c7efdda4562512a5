// Analytical gradients of every differentiable core op against central finite differences in
// float64 (src/autograd/gradcheck.ts). Inputs are drawn away from points where an op is not
// differentiable (relu/abs at 0, clamp bounds, max/min ties, log/sqrt at 0).
import { afterAll, describe, expect, it } from 'vitest';
import type { Tensor } from '../src/index.js';
import * as T from '../src/index.js';

const gen = new T.Generator(97);
const made: Tensor[] = [];

type Kind = 'normal' | 'positive' | 'nonzero';

/** A float64 leaf requiring grad; 'positive' is |x| + 0.5, 'nonzero' keeps |x| >= 0.3. */
function inp(shape: number[], kind: Kind = 'normal', requiresGrad = true): Tensor {
  const t = T.noGrad(() => {
    const r = T.randn(shape, { dtype: 'float64', generator: gen });
    if (kind === 'normal') return r;
    const a = T.abs(r);
    if (kind === 'positive') {
      const out = T.add(a, 0.5);
      r.dispose();
      a.dispose();
      return out;
    }
    const s = T.add(a, 0.3);
    const sg = T.where(T.ge(r, 0), 1, -1);
    const out = T.mul(s, sg);
    for (const x of [r, a, s, sg]) x.dispose();
    return out;
  });
  if (requiresGrad) t.requiresGrad_(true);
  made.push(t);
  return t;
}

/** Integer-spaced values, shuffled: distinct, so max/min/amax/norm-inf have no ties. */
function distinct(shape: number[]): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const vals = Array.from({ length: n }, (_, i) => (i - n / 2) * 0.37);
  for (let i = n - 1; i > 0; i--) {
    const j = (i * 7919 + 13) % (i + 1);
    [vals[i], vals[j]] = [vals[j], vals[i]];
  }
  const t = T.tensor(vals, { dtype: 'float64', shape }).requiresGrad_(true);
  made.push(t);
  return t;
}

function mask(shape: number[]): Tensor {
  const m = T.noGrad(() => {
    const r = T.rand(shape, { dtype: 'float64', generator: gen });
    const b = T.gt(r, 0.5);
    r.dispose();
    return b;
  });
  made.push(m);
  return m;
}

const check = (fn: (...xs: Tensor[]) => Tensor, inputs: Tensor[], opts?: T.GradcheckOptions) =>
  expect(T.gradcheck(fn, inputs, opts)).toBe(true);

afterAll(() => {
  for (const t of made) t.dispose();
});

describe('gradcheck itself', () => {
  it('rejects a wrong analytical gradient', () => {
    // a hook doubles the gradient flowing back: the finite differences must disagree
    const wrong = (x: Tensor) => {
      const y = T.mul(x, 1);
      // gradcheck also evaluates fn under noGrad, where y records nothing
      if (y.requiresGrad) y.registerHook((g) => T.mul(g, 2));
      return y;
    };
    expect(() => T.gradcheck(wrong, [inp([3])])).toThrow(/analytical/);
  });
  it('requires float64 inputs', () => {
    const x = T.zeros([2]);
    expect(() => T.gradcheck((t) => t, [x])).toThrow(T.TensorError);
    x.dispose();
  });
});

describe('gradcheck: elementwise binary', () => {
  it('add (broadcast, alpha, scalar either side)', () => {
    check((a, b) => T.add(a, b), [inp([3, 4]), inp([4])]);
    check((a, b) => T.add(a, b, -1.5), [inp([2, 1, 3]), inp([4, 1])]);
    check((a) => T.add(a, 2.5), [inp([5])]);
    check((a) => T.add(-1, a), [inp([2, 3])]);
  });
  it('sub', () => {
    check((a, b) => T.sub(a, b), [inp([3, 1]), inp([1, 4])]);
    check((a, b) => T.sub(a, b, 2), [inp([3, 4]), inp([])]);
    check((a) => T.sub(a, 0.5), [inp([4])]);
    check((a) => T.sub(3, a), [inp([2, 2])]);
  });
  it('mul', () => {
    check((a, b) => T.mul(a, b), [inp([2, 3, 4]), inp([3, 1])]);
    check((a) => T.mul(a, a), [inp([5])]);
    check((a) => T.mul(a, -2.5), [inp([3, 2])]);
  });
  it('div', () => {
    check((a, b) => T.div(a, b), [inp([3, 4]), inp([4], 'nonzero')]);
    check((a) => T.div(a, 3), [inp([4])]);
    check((a) => T.div(2, a), [inp([2, 3], 'nonzero')]);
  });
  it('pow', () => {
    check((a, b) => T.pow(a, b), [inp([3, 4], 'positive'), inp([3, 1])]);
    check((a) => T.pow(a, 3), [inp([5])]);
    check((a) => T.pow(a, -1.5), [inp([5], 'positive')]);
    check((a) => T.pow(a, 0), [inp([3])]);
    check((a) => T.pow(1.7, a), [inp([2, 3])]);
  });
  it('maximum and minimum (no ties)', () => {
    check((a, b) => T.maximum(a, b), [inp([3, 4]), inp([4])]);
    check((a, b) => T.minimum(a, b), [inp([2, 3]), inp([2, 3])]);
  });
});

describe('gradcheck: unary', () => {
  const cases: [string, (x: Tensor) => Tensor, Kind][] = [
    ['neg', T.neg, 'normal'],
    ['exp', T.exp, 'normal'],
    ['log', T.log, 'positive'],
    ['sqrt', T.sqrt, 'positive'],
    ['rsqrt', T.rsqrt, 'positive'],
    ['abs', T.abs, 'nonzero'],
    ['tanh', T.tanh, 'normal'],
    ['sigmoid', T.sigmoid, 'normal'],
    ['silu', T.silu, 'normal'],
    ['gelu', (x) => T.gelu(x), 'normal'],
    ['gelu tanh', (x) => T.gelu(x, 'tanh'), 'normal'],
    ['relu', T.relu, 'nonzero'],
    ['sin', T.sin, 'normal'],
    ['cos', T.cos, 'normal'],
    ['square', T.square, 'normal'],
    ['reciprocal', T.reciprocal, 'nonzero'],
    ['log1p', T.log1p, 'positive'],
    ['expm1', T.expm1, 'normal'],
  ];
  it.each(cases)('%s', (_n, f, kind) => {
    check(f, [inp([3, 5], kind)]);
    // a transposed (non-contiguous) operand and a 0-d one
    check((x) => f(T.transpose(x, 0, 1)), [inp([4, 3], kind)]);
    check(f, [inp([], kind)]);
  });
  it('clamp', () => {
    check((x) => T.clamp(x, -0.5, 0.5), [inp([4, 5])]);
    check((x) => T.clamp(x, 0.2), [inp([4, 5])]);
    check((x) => T.clamp(x, null, -0.2), [inp([4, 5])]);
  });
  it('where and maskedFill', () => {
    const c = mask([3, 1]);
    check((x, y) => T.where(c, x, y), [inp([3, 4]), inp([4])]);
    check((x) => T.where(c, x, 2), [inp([3, 4])]);
    check((y) => T.where(c, -1, y), [inp([4])]);
    const m = mask([1, 4]);
    check((x) => T.maskedFill(x, m, 0.25), [inp([3, 4])]);
  });
  it('casts through float32 and bfloat16 pass the gradient back in the source dtype', () => {
    // the forward rounds, so the difference step must be large against the rounding error
    check((x) => T.to(T.to(x, 'float32'), 'float64'), [inp([6])], { eps: 1e-2, atol: 1e-4 });
    // through bf16 the gradient itself is rounded to 8 significant bits on its way back (as in
    // torch), and the forward rounds x +- eps: both are about 2^-8 relative
    check((x) => T.to(T.mul(T.to(x, 'bfloat16'), 2), 'float64'), [inp([6])], {
      eps: 0.5,
      atol: 2e-2,
      rtol: 2e-2,
    });
  });
});

describe('gradcheck: reductions', () => {
  it('sum and mean', () => {
    check((x) => T.sum(x), [inp([3, 4])]);
    check((x) => T.sum(x, [0, 2], true), [inp([2, 3, 4])]);
    check((x) => T.mean(x, 1), [inp([3, 4, 2])]);
    check((x) => T.mean(x, -1, true), [inp([3, 5])]);
    check((x) => T.sum(T.transpose(x, 0, 1), 1), [inp([4, 3])]);
  });
  it('var with corrections', () => {
    check((x) => T.variance(x), [inp([3, 4])]);
    check((x) => T.variance(x, [0, 2], { correction: 0, keepdim: true }), [inp([2, 3, 4])]);
    check((x) => T.variance(x, 1, { correction: 2 }), [inp([3, 5])]);
  });
  it('amax, amin, max(dim), min(dim), max(), min()', () => {
    check((x) => T.amax(x), [distinct([3, 4])]);
    check((x) => T.amin(x, [0, 2], true), [distinct([2, 3, 4])]);
    check((x) => T.max(x, 1).values, [distinct([3, 5])]);
    check((x) => T.min(x, 0, true).values, [distinct([3, 5])]);
    check((x) => T.max(x), [distinct([7])]);
    check((x) => T.min(x), [distinct([2, 2])]);
  });
  it('logsumexp', () => {
    check((x) => T.logsumexp(x, 1), [inp([3, 5])]);
    check((x) => T.logsumexp(x, [0, 2], true), [inp([2, 3, 4])]);
  });
  it.each([1, 2, 3, Number.POSITIVE_INFINITY])('norm p=%s', (p) => {
    const x = p === Number.POSITIVE_INFINITY ? distinct([3, 4]) : inp([3, 4], 'nonzero');
    check((t) => T.norm(t, p), [x]);
    check((t) => T.norm(t, p, 1), [x]);
    check((t) => T.norm(t, p, [0, 1], true), [x]);
  });
  it('cumsum', () => {
    check((x) => T.cumsum(x, 0), [inp([4, 3])]);
    check((x) => T.cumsum(x, -1), [inp([2, 3, 5])]);
    check((x) => T.cumsum(T.transpose(x, 0, 1), 1), [inp([4, 3])]);
  });
});

describe('gradcheck: shapes and views', () => {
  it('view, reshape, flatten, squeeze, unsqueeze', () => {
    check((x) => T.view(x, [6, 2]), [inp([3, 4])]);
    check((x) => T.reshape(T.transpose(x, 0, 1), [-1]), [inp([3, 4])]);
    check((x) => T.flatten(x, 1), [inp([2, 3, 2])]);
    check((x) => T.squeeze(x), [inp([1, 3, 1])]);
    check((x) => T.squeeze(x, 0), [inp([1, 3])]);
    check((x) => T.unsqueeze(x, 1), [inp([3, 2])]);
  });
  it('transpose, permute, expand, contiguous', () => {
    check((x) => T.transpose(x, 0, 2), [inp([2, 3, 4])]);
    check((x) => T.permute(x, [1, 2, 0]), [inp([2, 3, 4])]);
    check((x) => T.expand(x, [2, 3, 4]), [inp([3, 1])]);
    check((x) => T.contiguous(T.transpose(x, 0, 1)), [inp([2, 3])]);
  });
  it('narrow, select, split, chunk', () => {
    check((x) => T.narrow(x, 1, 1, 2), [inp([3, 4])]);
    check((x) => T.select(x, 0, -1), [inp([3, 4])]);
    // weights differ per piece so that every piece's gradient is visible in the projection
    check(
      (x) => {
        const [a, b] = T.split(x, [1, 3], 1);
        return T.add(T.sum(a), T.mul(T.sum(T.square(b)), 2));
      },
      [inp([2, 4])],
    );
    check(
      (x) => {
        const [a, b, c] = T.chunk(x, 3, 0);
        return T.cat([T.mul(c, 3), a, T.exp(b)], 0);
      },
      [inp([5, 2])],
    );
  });
  it('cat and stack', () => {
    check((a, b, c) => T.cat([a, b, c], 1), [inp([2, 3]), inp([2, 1]), inp([2, 2])]);
    check((a, b) => T.stack([a, b], 1), [inp([2, 3]), inp([2, 3])]);
    check((a, b) => T.stack([a, T.transpose(b, 0, 1)], -1), [inp([2, 3]), inp([3, 2])]);
  });
});

describe('gradcheck: matmul family', () => {
  const shapes: [string, number[], number[]][] = [
    ['1-D @ 1-D', [4], [4]],
    ['1-D @ 2-D', [4], [4, 3]],
    ['2-D @ 1-D', [3, 4], [4]],
    ['2-D @ 2-D', [3, 4], [4, 2]],
    ['batched', [2, 3, 4], [2, 4, 2]],
    ['broadcast batch', [2, 1, 3, 4], [3, 4, 2]],
    ['[B,S,K] @ [K,N]', [2, 3, 4], [4, 2]],
    ['1-D @ 3-D', [4], [2, 4, 3]],
    ['3-D @ 1-D', [2, 3, 4], [4]],
    ['2-D @ 3-D', [3, 4], [2, 4, 2]],
  ];
  it.each(shapes)('matmul %s', (_n, sa, sb) => {
    check((a, b) => T.matmul(a, b), [inp(sa), inp(sb)]);
  });
  it('matmul with transposed operands', () => {
    check((a, b) => T.matmul(T.transpose(a, -1, -2), T.transpose(b, -1, -2)), [inp([4, 3]), inp([2, 4])]);
    check((a, b) => T.matmul(T.transpose(a, -1, -2), b), [inp([2, 4, 3]), inp([4, 2])]);
  });
  it('matmul of expanded (stride-0) operands, which BLAS cannot take', () => {
    check((a, b) => T.matmul(T.expand(a, [3, 4]), b), [inp([1, 4]), inp([4, 2])]);
    check((a, b) => T.matmul(a, T.expand(b, [4, 3])), [inp([2, 4]), inp([4, 1])]);
  });
  it('bmm and linear', () => {
    check((a, b) => T.bmm(a, b), [inp([2, 3, 4]), inp([2, 4, 2])]);
    check((x, w, b) => T.linear(x, w, b), [inp([2, 3, 4]), inp([5, 4]), inp([5])]);
    check((x, w) => T.linear(x, w), [inp([3, 4]), inp([2, 4])]);
  });
  it('linearActivation (relu, gelu, gelu-tanh; bias or none; a transposed input)', () => {
    for (const act of ['relu', 'gelu', 'gelu-tanh'] as const) {
      check((x, w, b) => T.linearActivation(x, w, b, act), [inp([2, 3, 4]), inp([5, 4]), inp([5])]);
      check((x, w) => T.linearActivation(x, w, null, act), [inp([3, 4]), inp([2, 4])]);
      check(
        (x, w, b) => T.linearActivation(T.transpose(x, 0, 1), w, b, act),
        [inp([4, 3]), inp([2, 4]), inp([2])],
      );
    }
  });
});

describe('gradcheck: random and recomputation', () => {
  it('dropout with a fixed mask', () => {
    // a fresh generator per call: every evaluation of fn draws the same mask
    check((x) => T.dropout(x, 0.4, true, new T.Generator(5)), [inp([4, 5])]);
  });
  it('checkpoint', () => {
    const w = inp([4, 3]);
    check((x) => T.checkpoint((a) => T.tanh(T.matmul(a, w)), x), [inp([2, 4])]);
  });
});
