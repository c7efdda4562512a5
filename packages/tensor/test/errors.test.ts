// Error reporting: every misuse throws a TensorError with the right code and a message that
// names what was wrong (shapes, dims, dtypes).
import { afterAll, describe, expect, it } from 'vitest';
import type { Tensor, TensorErrorCode } from '../src/index.js';
import * as T from '../src/index.js';

const made: Tensor[] = [];
const t = (x: Tensor) => {
  made.push(x);
  return x;
};
afterAll(() => {
  for (const x of made) x.dispose();
});

/** Runs fn (inside tidy) and returns the TensorError it throws, checking its code. */
function errorOf(fn: () => unknown, code: TensorErrorCode): T.TensorError {
  try {
    T.tidy(() => {
      fn();
    });
  } catch (e) {
    expect(e).toBeInstanceOf(T.TensorError);
    expect(e).toBeInstanceOf(Error);
    const err = e as T.TensorError;
    expect(err.name).toBe('TensorError');
    expect(err.code, err.message).toBe(code);
    return err;
  }
  return expect.fail(`expected a TensorError ${code}`);
}

describe('shape errors', () => {
  it('matmul names both shapes and the inner dimensions', () => {
    const err = errorOf(() => T.matmul(t(T.zeros([2, 3])), t(T.zeros([4, 5]))), 'SHAPE_MISMATCH');
    expect(err.message).toBe('matmul: [2,3] @ [4,5]: inner dimensions 3 and 4 differ');
    errorOf(() => T.matmul(t(T.zeros([3])), t(T.zeros([4]))), 'SHAPE_MISMATCH');
    errorOf(() => T.matmul(t(T.zeros([])), t(T.zeros([4]))), 'SHAPE_MISMATCH');
    errorOf(() => T.matmul(t(T.zeros([2, 2, 3])), t(T.zeros([3, 3, 1]))), 'SHAPE_MISMATCH');
    errorOf(() => T.bmm(t(T.zeros([2, 3])), t(T.zeros([3, 4]))), 'SHAPE_MISMATCH');
    const lin = errorOf(() => T.linear(t(T.zeros([2, 3])), t(T.zeros([4, 5]))), 'SHAPE_MISMATCH');
    expect(lin.message).toContain('[2,3]');
    expect(lin.message).toContain('[4,5]');
  });

  it('broadcasting errors name both shapes', () => {
    const err = errorOf(() => T.add(t(T.zeros([2, 3])), t(T.zeros([4]))), 'SHAPE_MISMATCH');
    expect(err.message).toContain('[2,3]');
    expect(err.message).toContain('[4]');
    const w = errorOf(
      () => T.where(t(T.zeros([2], { dtype: 'bool' })), t(T.zeros([3])), 0),
      'SHAPE_MISMATCH',
    );
    expect(w.message).toContain('[2]');
    expect(w.message).toContain('[3]');
    const m = errorOf(
      () => T.maskedFill(t(T.zeros([3])), t(T.zeros([2, 3], { dtype: 'bool' })), 1),
      'SHAPE_MISMATCH',
    );
    expect(m.message).toContain('[2,3]');
  });

  it('view of a non-contiguous tensor suggests reshape', () => {
    const x = t(T.zeros([3, 4]));
    const err = errorOf(() => x.t().view(12), 'SHAPE_MISMATCH');
    expect(err.message).toMatch(/reshape/);
    expect(err.message).toContain('[4,3]');
  });

  it('invalid shapes for view, reshape and expand', () => {
    const x = t(T.zeros([3, 4]));
    errorOf(() => x.view(5, 3), 'SHAPE_MISMATCH');
    errorOf(() => x.reshape(-1, 5), 'SHAPE_MISMATCH');
    errorOf(() => x.reshape(-1, -1), 'INVALID_ARGUMENT');
    errorOf(() => x.expand(3, 5), 'SHAPE_MISMATCH');
    errorOf(() => x.expand(4), 'SHAPE_MISMATCH');
    errorOf(() => x.permute(0), 'INVALID_ARGUMENT');
    errorOf(() => x.permute(0, 0), 'INVALID_ARGUMENT');
  });

  it('cat with mismatched shapes names them', () => {
    const err = errorOf(() => T.cat([t(T.zeros([2, 3])), t(T.zeros([2, 4]))], 0), 'SHAPE_MISMATCH');
    expect(err.message).toContain('[2,3]');
    expect(err.message).toContain('[2,4]');
    errorOf(() => T.cat([t(T.zeros([2, 3])), t(T.zeros([3]))]), 'SHAPE_MISMATCH');
    errorOf(() => T.cat([]), 'INVALID_ARGUMENT');
    errorOf(() => T.stack([t(T.zeros([2])), t(T.zeros([3]))]), 'SHAPE_MISMATCH');
    errorOf(() => T.split(t(T.zeros([5])), [2, 2]), 'SHAPE_MISMATCH');
  });

  it('tensor() rejects ragged arrays and wrong shapes', () => {
    errorOf(() => T.tensor([[1, 2], [3]]), 'INVALID_ARGUMENT');
    errorOf(() => T.tensor([1, 2, 3], { shape: [2, 2] }), 'SHAPE_MISMATCH');
  });
});

describe('index errors', () => {
  it('narrow out of range', () => {
    const x = t(T.zeros([3, 4]));
    const err = errorOf(() => x.narrow(1, 2, 3), 'INDEX_OUT_OF_RANGE');
    expect(err.message).toContain('[2, 5)');
    errorOf(() => x.narrow(0, -4, 1), 'INDEX_OUT_OF_RANGE');
    errorOf(() => x.narrow(0, 1, -1), 'INDEX_OUT_OF_RANGE');
  });

  it('select and dims out of range', () => {
    const x = t(T.zeros([3, 4]));
    errorOf(() => x.select(0, 3), 'INDEX_OUT_OF_RANGE');
    errorOf(() => x.select(1, -5), 'INDEX_OUT_OF_RANGE');
    errorOf(() => T.sum(x, 2), 'INDEX_OUT_OF_RANGE');
    errorOf(() => x.transpose(0, -3), 'INDEX_OUT_OF_RANGE');
    errorOf(() => x.unsqueeze(4), 'INDEX_OUT_OF_RANGE');
    errorOf(() => T.cumsum(x, 2), 'INDEX_OUT_OF_RANGE');
    errorOf(() => T.sum(x, [0, 0]), 'INVALID_ARGUMENT');
  });
});

describe('0-d tensors', () => {
  it('cannot be sliced or concatenated (this used to read through a NaN offset)', () => {
    const s = t(T.tensor(1.5));
    errorOf(() => T.select(s, 0, 0), 'INDEX_OUT_OF_RANGE');
    errorOf(() => T.narrow(s, 0, 0, 1), 'INDEX_OUT_OF_RANGE');
    errorOf(() => T.split(s, 1), 'INDEX_OUT_OF_RANGE');
    errorOf(() => T.chunk(s, 1), 'INDEX_OUT_OF_RANGE');
    errorOf(() => T.cat([s, s]), 'SHAPE_MISMATCH');
  });
});

describe('native limits', () => {
  it('more than 16 dimensions is an error, not a buffer overflow in the kernels', () => {
    const shape = Array.from({ length: 17 }, (_, i) => (i === 0 ? 2 : 1));
    expect(() => T.tidy(() => T.ones(shape))).toThrow(/at most 16 dimensions, got 17/);
    const ok = T.ones(shape.slice(1));
    expect(T.sum(T.exp(ok)).item()).toBeCloseTo(Math.E, 6);
    ok.dispose();
  });
});

describe('dtype errors', () => {
  it('requiresGrad_ on an integer tensor', () => {
    const err = errorOf(() => t(T.tensor([1, 2])).requiresGrad_(), 'DTYPE_MISMATCH');
    expect(err.message).toContain('int64');
    errorOf(() => T.zeros([2], { dtype: 'bool', requiresGrad: true }), 'DTYPE_MISMATCH');
  });

  it('matmul of different or integer dtypes', () => {
    errorOf(() => T.matmul(t(T.zeros([2, 2])), t(T.zeros([2, 2], { dtype: 'float64' }))), 'DTYPE_MISMATCH');
    errorOf(
      () => T.matmul(t(T.zeros([2, 2], { dtype: 'int64' })), t(T.zeros([2, 2], { dtype: 'int64' }))),
      'DTYPE_MISMATCH',
    );
  });

  it('var needs a floating-point tensor', () => {
    errorOf(() => T.variance(t(T.tensor([1, 2, 4]))), 'DTYPE_MISMATCH');
  });

  it('where and maskedFill need bool conditions', () => {
    errorOf(() => T.where(t(T.zeros([2])), t(T.zeros([2])), 0), 'DTYPE_MISMATCH');
    errorOf(() => T.maskedFill(t(T.zeros([2])), t(T.zeros([2])), 0), 'DTYPE_MISMATCH');
  });
});

describe('argument and autograd errors', () => {
  it('requiresGrad_ on a non-leaf', () => {
    const x = t(T.zeros([2]).requiresGrad_(true));
    errorOf(() => T.mul(x, 2).requiresGrad_(false), 'INVALID_ARGUMENT');
  });

  it('in-place writes to tensors that require grad', () => {
    const x = t(T.zeros([2]).requiresGrad_(true));
    errorOf(() => x.fill_(1), 'INVALID_ARGUMENT');
    errorOf(() => t(T.zeros([2])).copy_(x), 'INVALID_ARGUMENT');
  });

  it('sub(number, tensor) with alpha', () => {
    const before = T.memoryStats().liveBytes;
    errorOf(() => T.sub(1, t(T.ones([2])), 2), 'INVALID_ARGUMENT');
    // nothing was allocated before the argument check
    expect(T.memoryStats().liveBytes).toBe(before);
  });

  it('item on a tensor with several elements', () => {
    const err = errorOf(() => t(T.zeros([2, 2])).item(), 'INVALID_ARGUMENT');
    expect(err.message).toContain('4 elements');
  });

  it('backward misuse', () => {
    const x = t(T.ones([3]).requiresGrad_(true));
    errorOf(() => T.mul(x, 2).backward(), 'INVALID_ARGUMENT');
    errorOf(() => t(T.ones([])).backward(), 'NO_GRAD');
  });

  it('random and dropout arguments', () => {
    errorOf(() => T.randint(3, 3, [2]), 'INVALID_ARGUMENT');
    errorOf(() => T.dropout(t(T.ones([2])), 1.5), 'INVALID_ARGUMENT');
    errorOf(() => T.arange(0, 1, 0), 'INVALID_ARGUMENT');
  });

  it('disposed tensors', () => {
    const x = T.ones([2]);
    x.dispose();
    const err = errorOf(() => T.exp(x), 'DISPOSED');
    expect(err.message).toContain('[2] float32');
  });
});

describe('reductions that need floating point', () => {
  it('logsumexp and norm of an integer tensor throw DTYPE_MISMATCH', () => {
    const x = T.tensor([1, 2, 3]);
    for (const f of [() => T.logsumexp(x, 0), () => T.norm(x)]) {
      try {
        f();
        expect.fail('expected a TensorError');
      } catch (e) {
        expect(e).toBeInstanceOf(T.TensorError);
        expect((e as T.TensorError).code).toBe('DTYPE_MISMATCH');
      }
    }
    x.dispose();
  });

  it('checkpoint of a function that returns its input leaves the input a leaf', () => {
    const x = T.tensor([1, 2], { dtype: 'float32', requiresGrad: true });
    const y = T.checkpoint((t) => t, x);
    expect(x.isLeaf).toBe(true);
    expect(y).not.toBe(x);
    y.sum().backward();
    expect(x.grad!.toArray()).toEqual([1, 1]);
    x.dispose();
  });
});
