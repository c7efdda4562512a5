import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  embedding,
  Generator,
  gather,
  getNumThreads,
  gradcheck,
  indexAdd,
  indexSelect,
  memoryStats,
  oneHot,
  randn,
  scatterAdd,
  setNumThreads,
  type Tensor,
  TensorError,
  tensor,
  tidy,
  topk,
  transpose,
  tril,
  triu,
} from '../src/index.js';
import {
  callAndSync,
  expectClose,
  type FixtureCase,
  fromFixture,
  loadFixture,
  settledLiveBytes,
} from './fixtures.js';

const cases = loadFixture('indexing');

function num(c: FixtureCase, key: string): number {
  return c.args[key] as number;
}

/** Runs the op a fixture case describes; returns its outputs by fixture name. */
function runCase(c: FixtureCase, t: Record<string, Tensor>): Record<string, Tensor> {
  switch (c.args.op) {
    case 'embedding':
      return { out: embedding(t.input, t.weight, { paddingIdx: c.args.paddingIdx as number | undefined }) };
    case 'indexSelect':
      return { out: indexSelect(t.x, num(c, 'dim'), t.index) };
    case 'gather':
      return { out: gather(t.x, num(c, 'dim'), t.index) };
    case 'scatterAdd':
      return { out: scatterAdd(t.x, num(c, 'dim'), t.index, t.src) };
    case 'indexAdd':
      return { out: indexAdd(t.x, num(c, 'dim'), t.index, t.source, num(c, 'alpha')) };
    case 'topk': {
      const r = topk(t.x, num(c, 'k'), num(c, 'dim'), c.args.largest as boolean);
      return { values: r.values, indices: r.indices };
    }
    case 'triu':
      return { out: triu(t.x, num(c, 'diagonal')) };
    case 'tril':
      return { out: tril(t.x, num(c, 'diagonal')) };
    case 'oneHot':
      return { out: oneHot(t.indices, num(c, 'numClasses')) };
    default:
      throw new Error(`unknown fixture op ${String(c.args.op)}`);
  }
}

describe('indexing: PyTorch fixtures', () => {
  for (const c of cases) {
    it(c.name, () => {
      const inputs: Record<string, Tensor> = {};
      for (const [name, f] of Object.entries(c.inputs)) {
        if (name !== 'gout') inputs[name] = fromFixture(f, name in c.grads);
      }
      const outs = runCase(c, inputs);
      for (const [name, expected] of Object.entries(c.outputs)) {
        expect(outs[name].dtype, `${c.name} ${name} dtype`).toBe(expected.dtype);
        expectClose(outs[name], expected, undefined, `${c.name} ${name}`);
      }
      if (c.inputs.gout) {
        const gout = fromFixture(c.inputs.gout);
        (outs.out ?? outs.values).backward(gout);
        gout.dispose();
        for (const [name, expected] of Object.entries(c.grads)) {
          const g = inputs[name].grad;
          expect(g, `${c.name} grad of ${name}`).not.toBeNull();
          expectClose(g as Tensor, expected, undefined, `${c.name} grad ${name}`);
        }
      }
      for (const t of [...Object.values(outs), ...Object.values(inputs)]) t.dispose();
    });
  }
});

describe('indexing: gradcheck (float64)', () => {
  const gen = new Generator(7);
  const f64 = (shape: number[]): Tensor =>
    randn(shape, { dtype: 'float64', generator: gen }).requiresGrad_(true);
  const check = (fn: (...xs: Tensor[]) => Tensor, inputs: Tensor[]): void => {
    expect(gradcheck(fn, inputs)).toBe(true);
    for (const x of inputs) x.dispose();
  };

  // no paddingIdx here: the padding row deliberately gets no gradient although the output reads
  // it (torch semantics), which a finite-difference check would report; the fixtures cover it
  it('embedding with repeated ids', () => {
    const ids = tensor([
      [0, 2, 2, 4],
      [1, 2, 0, 3],
    ]);
    check((w) => embedding(ids, w), [f64([5, 3])]);
    ids.dispose();
  });

  it('indexSelect (and through a transposed view)', () => {
    const index = tensor([3, 0, 3, 1], { dtype: 'int32' });
    check((x) => indexSelect(x, 1, index), [f64([3, 4])]);
    check((x) => indexSelect(transpose(x, 0, 1), 0, index), [f64([3, 4])]);
    index.dispose();
  });

  it('gather', () => {
    const index = tensor([
      [0, 4, 4],
      [2, 1, 2],
      [3, 3, 0],
    ]);
    check((x) => gather(x, 1, index), [f64([3, 5])]);
    check((x) => gather(x, 0, index.clamp(0, 2)), [f64([3, 4])]);
    index.dispose();
  });

  it('scatterAdd w.r.t. input and src (src larger than index)', () => {
    const index = tensor([
      [0, 3],
      [2, 0],
      [0, 1],
    ]);
    check((x, src) => scatterAdd(x, 0, index, src), [f64([4, 3]), f64([4, 2])]);
    index.dispose();
  });

  it('indexAdd w.r.t. input and source', () => {
    const index = tensor([1, 3, 1]);
    check((x, s) => indexAdd(x, 1, index, s, 1.5), [f64([2, 4, 3]), f64([2, 3, 3])]);
    index.dispose();
  });

  it('topk values', () => {
    check((x) => topk(x, 3, 1).values, [f64([4, 6])]);
    check((x) => topk(x, 2, 0, false).values, [f64([5, 3])]);
  });

  it('triu and tril', () => {
    check((x) => triu(x, 1), [f64([2, 3, 4])]);
    check((x) => tril(transpose(x, 0, 1), -1), [f64([4, 3])]);
  });
});

/** Asserts that fn throws a TensorError with this code whose message matches every pattern. */
function expectError(fn: () => unknown, code: string, ...patterns: RegExp[]): void {
  let err: unknown;
  try {
    callAndSync(fn);
  } catch (e) {
    err = e;
  }
  expect(err, 'expected a TensorError').toBeInstanceOf(TensorError);
  const te = err as TensorError;
  expect(te.code, te.message).toBe(code);
  for (const p of patterns) expect(te.message).toMatch(p);
}

describe('indexing: errors', () => {
  it('out-of-range ids and indices throw INDEX_OUT_OF_RANGE naming the op, value and size', () => {
    const before = memoryStats().liveBytes;
    tidy(() => {
      const w = randn([5, 3]);
      expectError(
        () => embedding(tensor([0, 7, 1]), w),
        'INDEX_OUT_OF_RANGE',
        /^embedding:/,
        /\b7\b/,
        /\b5 rows/,
      );
      expectError(() => embedding(tensor([-1]), w), 'INDEX_OUT_OF_RANGE', /embedding/, /-1/);
      const x = randn([4, 6]);
      expectError(
        () => gather(x, 1, tensor([[0], [6], [1], [2]])),
        'INDEX_OUT_OF_RANGE',
        /^gather:/,
        /\b6\b/,
        /size 6/,
      );
      expectError(
        () => indexSelect(x, 0, tensor([1, 4])),
        'INDEX_OUT_OF_RANGE',
        /^indexSelect:/,
        /\b4\b/,
        /size 4/,
      );
      expectError(() => indexSelect(x, 0, tensor([-1])), 'INDEX_OUT_OF_RANGE', /indexSelect/);
      expectError(
        () => scatterAdd(x, 0, tensor([[9, 0]]), randn([1, 2])),
        'INDEX_OUT_OF_RANGE',
        /^scatterAdd:/,
        /\b9\b/,
      );
      expectError(
        () => indexAdd(x, 1, tensor([6]), randn([4, 1])),
        'INDEX_OUT_OF_RANGE',
        /^indexAdd:/,
        /\b6\b/,
      );
      expectError(() => oneHot(tensor([1, 5]), 5), 'INDEX_OUT_OF_RANGE', /^oneHot:/, /\b5\b/);
      expectError(() => oneHot(tensor([1, -2])), 'INDEX_OUT_OF_RANGE', /oneHot/);
    });
    // nothing allocated by the failed calls survives
    expect(memoryStats().liveBytes).toBe(before);
  });

  it('wrong index dtypes throw DTYPE_MISMATCH', () => {
    tidy(() => {
      const x = randn([3, 4]);
      const fidx = tensor([0, 1], { dtype: 'float32' });
      expectError(() => embedding(fidx, x), 'DTYPE_MISMATCH', /^embedding:/, /float32/);
      expectError(() => indexSelect(x, 0, fidx), 'DTYPE_MISMATCH', /^indexSelect:/);
      expectError(() => gather(x, 0, tensor([[0, 1]], { dtype: 'uint8' })), 'DTYPE_MISMATCH', /^gather:/);
      expectError(() => scatterAdd(x, 0, tensor([[true]]), x), 'DTYPE_MISMATCH', /^scatterAdd:/);
      expectError(() => oneHot(fidx, 3), 'DTYPE_MISMATCH', /^oneHot:/);
      expectError(
        () => scatterAdd(x, 0, tensor([[0]]), randn([1, 1], { dtype: 'float64' })),
        'DTYPE_MISMATCH',
        /^scatterAdd:/,
        /float64/,
      );
      expectError(
        () => indexAdd(x, 0, tensor([0]), randn([1, 4], { dtype: 'float64' })),
        'DTYPE_MISMATCH',
        /^indexAdd:/,
      );
    });
  });

  it('shape mismatches throw SHAPE_MISMATCH, bad arguments INVALID_ARGUMENT', () => {
    tidy(() => {
      const x = randn([3, 4]);
      expectError(() => embedding(tensor([0]), randn([5])), 'SHAPE_MISMATCH', /^embedding:/, /2-D/);
      expectError(() => gather(x, 1, tensor([0, 1])), 'SHAPE_MISMATCH', /^gather:/);
      expectError(
        () => gather(x, 1, tensor([[0], [1], [2], [0]])),
        'SHAPE_MISMATCH',
        /^gather:/,
        /dimension 0/,
      );
      expectError(() => indexSelect(x, 0, tensor([[0]])), 'SHAPE_MISMATCH', /^indexSelect:/);
      expectError(
        () => indexAdd(x, 0, tensor([0, 1]), randn([2, 3])),
        'SHAPE_MISMATCH',
        /^indexAdd:/,
        /\[2,4\]/,
      );
      expectError(
        () => scatterAdd(x, 0, tensor([[0, 1, 2]]), randn([1, 2])),
        'SHAPE_MISMATCH',
        /^scatterAdd:/,
      );
      expectError(() => scatterAdd(x, 0, tensor([0]), randn([1])), 'SHAPE_MISMATCH', /^scatterAdd:/);
      expectError(() => triu(randn([4])), 'SHAPE_MISMATCH', /^triu:/);
      expectError(() => tril(randn([4])), 'SHAPE_MISMATCH', /^tril:/);
      expectError(() => topk(x, 5), 'INVALID_ARGUMENT', /^topk:/, /k = 5/);
      expectError(() => embedding(tensor([0]), x, { paddingIdx: 3 }), 'INVALID_ARGUMENT', /paddingIdx/);
      expectError(() => gather(x, 2, tensor([[0]])), 'INDEX_OUT_OF_RANGE', /^gather:/, /dimension 2/);
    });
  });
});

describe('indexing: behaviour', () => {
  it('Tensor methods', () => {
    tidy(() => {
      const x = tensor([
        [1, 2, 3],
        [4, 5, 6],
      ]);
      expect(x.gather(1, tensor([[2], [0]])).toArray()).toEqual([[3], [4]]);
      expect(x.indexSelect(1, tensor([2, 2])).toArray()).toEqual([
        [3, 3],
        [6, 6],
      ]);
      expect(x.scatterAdd(0, tensor([[1, 1, 0]]), tensor([[10, 20, 30]])).toArray()).toEqual([
        [1, 2, 33],
        [14, 25, 6],
      ]);
      expect(
        x
          .indexAdd(
            0,
            tensor([1, 1]),
            tensor([
              [1, 1, 1],
              [2, 2, 2],
            ]),
            10,
          )
          .toArray(),
      ).toEqual([
        [1, 2, 3],
        [34, 35, 36],
      ]);
      expect(x.triu(1).toArray()).toEqual([
        [0, 2, 3],
        [0, 0, 6],
      ]);
      expect(x.tril().toArray()).toEqual([
        [1, 0, 0],
        [4, 5, 0],
      ]);
      const r = x.topk(2);
      expect(r.values.toArray()).toEqual([
        [3, 2],
        [6, 5],
      ]);
      expect(r.indices.dtype).toBe('int64');
    });
  });

  it('topk ties are taken lowest index first; sorted=false gives the same result', () => {
    tidy(() => {
      const x = tensor([1, 3, 3, 2, 3]);
      const a = topk(x, 2);
      expect(a.indices.toArray()).toEqual([1, 2]);
      const b = topk(x, 3, 0, true, false);
      expect(b.values.toArray()).toEqual([3, 3, 3]);
      expect(b.indices.toArray()).toEqual([1, 2, 4]);
      const s = topk(x, 2, 0, false);
      expect(s.values.toArray()).toEqual([1, 2]);
      expect(s.indices.toArray()).toEqual([0, 3]);
      const nan = topk(tensor([1, Number.NaN, 2]), 1);
      expect(Number.isNaN(nan.values.item())).toBe(true);
      expect(topk(tensor([5, 1]), 0).values.shape).toEqual([0]);
      expect(topk(tensor(4.5), 1).values.item()).toBe(4.5);
    });
  });

  it('empty indices, int32 ids, expanded inputs and oneHot', () => {
    tidy(() => {
      const x = randn([3, 4]);
      expect(indexSelect(x, 1, tensor([], { dtype: 'int64' })).shape).toEqual([3, 0]);
      const e = embedding(tensor([[2, 0]], { dtype: 'int32' }), x);
      expect(e.shape).toEqual([1, 2, 4]);
      expectClose(e, {
        shape: [1, 2, 4],
        dtype: 'float32',
        data: [
          ...(x.select(0, 2).toTypedArray() as Float32Array),
          ...(x.select(0, 0).toTypedArray() as Float32Array),
        ],
      });
      // a stride-0 input reads the broadcast values
      const row = tensor([[1, 2, 3]]).expand(4, 3);
      expect(gather(row, 0, tensor([[3, 0, 1]])).toArray()).toEqual([[1, 2, 3]]);
      expect(oneHot(tensor([2, 0], { dtype: 'int32' })).toArray()).toEqual([
        [0, 0, 1],
        [1, 0, 0],
      ]);
      expect(oneHot(tensor([1]), 4).dtype).toBe('int64');
    });
  });

  it('gather and scatterAdd over many lines of a strided input match a JS reference', () => {
    tidy(() => {
      const gen = new Generator(5);
      // 150 lines along dim 0 span several kernel tiles; the transposed view is non-contiguous
      const base = randn([150, 4], { generator: gen });
      const x = transpose(base, 0, 1);
      const idxData = new BigInt64Array(6 * 130).map((_, i) => BigInt((i * 7 + (i >> 3)) % 4));
      const index = tensor(idxData, { shape: [6, 130] });
      const src = randn([6, 140], { generator: gen });
      const xs = x.toArray() as number[][];
      const ss = src.toArray() as number[][];
      const got = gather(x, 0, index).toArray() as number[][];
      const sum = scatterAdd(x, 0, index, src).toArray() as number[][];
      const want = xs.map((row) => [...row]);
      for (let r = 0; r < 6; r++) {
        for (let j = 0; j < 130; j++) {
          const v = Number(idxData[r * 130 + j]);
          expect(got[r][j]).toBe(xs[v][j]);
          want[v][j] += ss[r][j];
        }
      }
      for (let i = 0; i < 4; i++) for (let j = 0; j < 150; j++) expect(sum[i][j]).toBeCloseTo(want[i][j], 5);
    });
  });

  describe('embedding backward at scale', () => {
    let threads = 1;
    beforeAll(() => {
      threads = getNumThreads();
    });
    afterAll(() => setNumThreads(threads));

    it('matches a float64 reference and is bitwise identical for 1 and 2 threads', () => {
      const V = 1000;
      const H = 48;
      const gen = new Generator(3);
      const w = randn([V, H], { generator: gen }).requiresGrad_(true);
      // skewed ids (low rows frequent, as in BPE token streams), including the padding row
      let seed = 12345;
      const idData = new BigInt64Array(40 * 128).map(() => {
        seed = (seed * 1103515245 + 12345) % 2147483648;
        return BigInt(Math.floor(V * (seed / 2147483648) ** 3));
      });
      idData[5] = 7n;
      const ids = tensor(idData, { shape: [40, 128] });
      const gout = randn([40, 128, H], { generator: gen });
      const grads: Float32Array[] = [];
      for (const n of [1, 2]) {
        setNumThreads(n);
        tidy(() => embedding(ids, w, { paddingIdx: 7 }).backward(gout));
        grads.push(w.grad?.toTypedArray() as Float32Array);
        w.grad?.dispose();
        w.grad = null;
      }
      expect(Buffer.from(grads[0].buffer).equals(Buffer.from(grads[1].buffer))).toBe(true);
      const idv = ids.toTypedArray() as BigInt64Array;
      const gv = gout.toTypedArray() as Float32Array;
      const ref = new Float64Array(V * H);
      idv.forEach((id, i) => {
        const v = Number(id);
        if (v === 7) return;
        for (let j = 0; j < H; j++) ref[v * H + j] += gv[i * H + j];
      });
      for (let j = 0; j < H; j++) expect(grads[0][7 * H + j]).toBe(0);
      let worst = 0;
      for (let i = 0; i < ref.length; i++) worst = Math.max(worst, Math.abs(grads[0][i] - ref[i]));
      expect(worst).toBeLessThan(1e-4);
      for (const t of [w, ids, gout]) t.dispose();
    });
  });
});

describe('indexing: memory', () => {
  const gen = new Generator(11);
  const leaf = (shape: number[]): Tensor => randn(shape, { generator: gen }).requiresGrad_(true);
  const ops: [string, (xs: Tensor[]) => Tensor, number[][]][] = [
    ['embedding', ([w]) => embedding(tensor([[1, 1, 0]]), w, { paddingIdx: 0 }), [[4, 3]]],
    ['indexSelect', ([x]) => indexSelect(transpose(x, 0, 1), 1, tensor([2, 0, 2])), [[3, 4]]],
    [
      'gather',
      ([x]) =>
        gather(
          x,
          1,
          tensor([
            [0, 0],
            [3, 1],
            [2, 2],
          ]),
        ),
      [[3, 4]],
    ],
    [
      'scatterAdd',
      ([x, s]) => scatterAdd(x, 0, tensor([[1, 1, 0, 2]]), s),
      [
        [3, 4],
        [2, 4],
      ],
    ],
    [
      'scatterAdd bf16',
      ([x, s]) => scatterAdd(x.to('bfloat16'), 1, tensor([[1], [1], [0]]), s.to('bfloat16')),
      [
        [3, 4],
        [3, 2],
      ],
    ],
    [
      'indexAdd',
      ([x, s]) => indexAdd(x, 1, tensor([3, 3]), s, 2),
      [
        [3, 4],
        [3, 2],
      ],
    ],
    ['topk', ([x]) => topk(x, 2, 0).values, [[3, 4]]],
    ['triu', ([x]) => triu(x, -1), [[2, 3, 4]]],
    ['tril', ([x]) => tril(transpose(x, 1, 2)), [[2, 3, 4]]],
  ];
  for (const [name, fn, shapes] of ops) {
    it(`${name}: forward + backward inside tidy frees everything`, () => {
      const leaves = shapes.map(leaf);
      const before = settledLiveBytes();
      tidy(() => {
        const out = fn(leaves);
        const g = randn(out.shape, { generator: gen, dtype: out.dtype });
        out.backward(g);
      });
      for (const l of leaves) {
        expect(l.grad, `${name} gradient`).not.toBeNull();
        l.grad?.dispose();
        l.grad = null;
      }
      expect(settledLiveBytes()).toBe(before);
      for (const l of leaves) l.dispose();
    });
  }
});
