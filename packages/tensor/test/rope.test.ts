import { describe, expect, it } from 'vitest';
import {
  add,
  applyRotaryPosEmb,
  arange,
  cat,
  Generator,
  getBackend,
  getDefaultDevice,
  gradcheck,
  memoryStats,
  mul,
  narrow,
  neg,
  type RopeScaling,
  randn,
  ropeCosSin,
  type Tensor,
  TensorError,
  tensor,
  tidy,
} from '../src/index.js';
import { expectClose, fromFixture, loadFixture } from './fixtures.js';

const asNumbers = (t: Tensor): number[] => Array.from(t.toTypedArray() as ArrayLike<number>);

describe('RoPE fixtures (HF Llama reference)', () => {
  for (const c of loadFixture('rope')) {
    it(c.name, () => {
      if (c.args.op === 'cosSin') {
        const pos = fromFixture(c.inputs.positionIds);
        const scaling = (c.args.scaling as RopeScaling | null) ?? undefined;
        const { cos, sin } = ropeCosSin(pos, c.args.dim as number, { base: c.args.base as number, scaling });
        // torch's fp32 cos/sin/pow may differ from correctly rounded results by an ulp, which at
        // angles of thousands of radians moves the value by a few 1e-5 at most (the table of 8b
        // llama3 uses position 70000)
        expect(cos.dtype).toBe('float32');
        expectClose(cos, c.outputs.cos, { atol: 1e-5, rtol: 1e-5 }, 'cos');
        expectClose(sin, c.outputs.sin, { atol: 1e-5, rtol: 1e-5 }, 'sin');
        for (const t of [pos, cos, sin]) t.dispose();
        return;
      }
      const x = fromFixture(c.inputs.x, true);
      const cos = fromFixture(c.inputs.cos);
      const sin = fromFixture(c.inputs.sin);
      const gout = fromFixture(c.inputs.gout);
      const out = applyRotaryPosEmb(x, cos, sin);
      expect(out.dtype).toBe(x.dtype);
      expectClose(out, c.outputs.out, undefined, 'out');
      out.backward(gout);
      expectClose(x.grad!, c.grads.x, undefined, 'dx');
      for (const t of [x, cos, sin, gout, out]) t.dispose();
    });
  }
});

// HF's formula with generic ops: x[..., :R] * cos + rotate_half(x[..., :R]) * sin, rest passed.
function composite(x: Tensor, cos: Tensor, sin: Tensor): Tensor {
  return tidy(() => {
    const R = cos.shape[cos.ndim - 1];
    const D = x.shape[3];
    const c = cos.ndim === 3 ? cos.unsqueeze(1) : cos;
    const s = sin.ndim === 3 ? sin.unsqueeze(1) : sin;
    const rot = narrow(x, 3, 0, R);
    const half = R / 2;
    const rh = cat([neg(narrow(rot, 3, half, half)), narrow(rot, 3, 0, half)], 3);
    const y = add(mul(rot, c), mul(rh, s));
    return R === D ? y : cat([y, narrow(x, 3, R, D - R)], 3);
  });
}

describe('applyRotaryPosEmb', () => {
  it('matches the composite formula, with shared and per-batch tables and partial rotary', () => {
    const gen = new Generator(3);
    for (const [shape, R, batchTables] of [
      [[2, 3, 9, 16], 16, false],
      [[2, 2, 5, 12], 8, true],
      [[1, 4, 33, 64], 32, false],
    ] as [number[], number, boolean][]) {
      tidy(() => {
        const [B, , S] = shape;
        const pos = batchTables ? randn([B, S], { generator: gen }).abs().mul(50).to('int64') : arange(0, S);
        const { cos, sin } = ropeCosSin(pos, R);
        const x = randn(shape, { generator: gen });
        const ours = applyRotaryPosEmb(x, cos, sin);
        const ref = composite(x, cos, sin);
        const a = asNumbers(ours);
        const b = asNumbers(ref);
        for (let i = 0; i < a.length; i++) expect(Math.abs(a[i] - b[i])).toBeLessThan(1e-6);
      });
    }
  });

  it('a [1, S, R] table serves every batch row as the [S, R] table does (forward and backward)', () => {
    tidy(() => {
      const gen = new Generator(4);
      const { cos, sin } = ropeCosSin(arange(0, 7), 8);
      const [c1, s1] = [cos, sin].map((t) => t.reshape(1, 7, 8));
      const x = randn([3, 2, 7, 8], { generator: gen, requiresGrad: true });
      const x2 = x.detach().requiresGrad_(true);
      const g = randn([3, 2, 7, 8], { generator: gen });
      const y1 = applyRotaryPosEmb(x, c1, s1);
      const y2 = applyRotaryPosEmb(x2, cos, sin);
      expect(asNumbers(y1)).toEqual(asNumbers(y2));
      y1.backward(g);
      y2.backward(g);
      expect(asNumbers(x.grad!)).toEqual(asNumbers(x2.grad!));
      // a batch of tables that is neither 1 nor B is refused
      const two = cat([c1, c1], 0);
      expect(() => applyRotaryPosEmb(x, two, two)).toThrow(/\[S, R\], \[1, S, R\] or \[B, S, R\] with B = 3/);
    });
  });

  it('backward rotates by the opposite angle', () => {
    tidy(() => {
      const { cos, sin } = ropeCosSin(arange(0, 7), 8);
      const x = randn([1, 2, 7, 8], { generator: new Generator(4), requiresGrad: true });
      const y = applyRotaryPosEmb(x, cos, sin);
      // the map is a rotation, so its gradient applied to y gives back x
      y.backward(y.detach());
      const a = asNumbers(x.grad!);
      const b = asNumbers(x);
      for (let i = 0; i < a.length; i++) expect(Math.abs(a[i] - b[i])).toBeLessThan(1e-5);
      x.grad!.dispose();
    });
  });

  it("the output and x's gradient keep x's memory order where the backend prefers it (else contiguous)", () => {
    tidy(() => {
      const prefers = getBackend(getDefaultDevice()).preferInputLayout === true;
      const { cos, sin } = ropeCosSin(arange(0, 7), 8);
      const gen = new Generator(5);
      const base = randn([7, 2, 3, 8], { generator: gen, requiresGrad: true }); // [s, b, h, d]
      const x = base.detach().permute(1, 2, 0, 3);
      // the gradient as the op returns it, at the (non-leaf) view (a leaf's .grad is its own copy)
      const xv = base.permute(1, 2, 0, 3);
      let gradLayout = false;
      xv.registerHook((grad) => {
        gradLayout = prefers ? grad.permute(2, 0, 1, 3).isContiguous : grad.isContiguous;
      });
      const y = applyRotaryPosEmb(xv, cos, sin);
      expect(y.isContiguous).toBe(!prefers);
      expect(y.permute(2, 0, 1, 3).isContiguous).toBe(prefers);
      const g = randn([7, 2, 3, 8], { generator: gen }).permute(1, 2, 0, 3);
      // the gradient arrives as in the attention layer: through a permute back to [s, b, h, d]
      y.permute(2, 0, 1, 3).backward(g.permute(2, 0, 1, 3));
      expect(gradLayout).toBe(true);
      // the same values as on contiguous operands
      const xc = x.contiguous().requiresGrad_(true);
      const yc = applyRotaryPosEmb(xc, cos, sin);
      yc.backward(g.contiguous());
      expect(asNumbers(y.contiguous())).toEqual(asNumbers(yc));
      expect(asNumbers(base.grad!.permute(1, 2, 0, 3).contiguous())).toEqual(asNumbers(xc.grad!));
    });
  });

  it('gradcheck in float64 (full, partial rotary, per-batch tables, strided x)', () => {
    const gen = new Generator(9);
    const configs: [number[], number, boolean, boolean][] = [
      [[2, 2, 3, 8], 8, false, false],
      [[1, 2, 4, 10], 6, false, false],
      [[2, 1, 3, 6], 6, true, false],
      [[1, 2, 3, 8], 8, false, true],
    ];
    for (const [shape, R, batchTables, strided] of configs) {
      tidy(() => {
        const [B, , S] = shape;
        const pos = batchTables
          ? tensor(
              [...Array(B * S).keys()].map((i) => (i * 7) % 11),
              { shape: [B, S] },
            )
          : arange(3, 3 + S);
        const t = ropeCosSin(pos, R);
        const cos = t.cos.to('float64');
        const sin = t.sin.to('float64');
        let x = randn(shape, { dtype: 'float64', generator: gen });
        if (strided)
          x = randn([shape[0], shape[2], shape[1], shape[3]], { dtype: 'float64', generator: gen }).transpose(
            1,
            2,
          );
        const leaf = x.detach().requiresGrad_(true);
        expect(gradcheck((a) => applyRotaryPosEmb(a, cos, sin), [leaf])).toBe(true);
        leaf.grad?.dispose();
      });
    }
  });

  it('bfloat16 input computes in fp32 and returns bfloat16', () => {
    tidy(() => {
      const { cos, sin } = ropeCosSin(arange(0, 5), 16);
      const x = randn([1, 2, 5, 16], { generator: new Generator(5) }).to('bfloat16');
      const y = applyRotaryPosEmb(x, cos, sin);
      expect(y.dtype).toBe('bfloat16');
      const ref = applyRotaryPosEmb(x.to('float32'), cos, sin).to('bfloat16');
      expect(asNumbers(y)).toEqual(asNumbers(ref));
    });
  });

  it('rejects bad arguments', () => {
    tidy(() => {
      const { cos, sin } = ropeCosSin(arange(0, 5), 8);
      const x = randn([1, 2, 5, 8]);
      const code = (fn: () => unknown): string => {
        try {
          fn();
        } catch (e) {
          expect(e).toBeInstanceOf(TensorError);
          return (e as TensorError).code;
        }
        return 'no error';
      };
      expect(code(() => applyRotaryPosEmb(randn([2, 5, 8]), cos, sin))).toBe('SHAPE_MISMATCH');
      expect(code(() => applyRotaryPosEmb(randn([1, 2, 6, 8]), cos, sin))).toBe('SHAPE_MISMATCH');
      expect(code(() => applyRotaryPosEmb(randn([1, 2, 5, 4]), cos, sin))).toBe('SHAPE_MISMATCH');
      expect(code(() => applyRotaryPosEmb(x, narrow(cos, 1, 0, 3), narrow(sin, 1, 0, 3)))).toBe(
        'SHAPE_MISMATCH',
      );
      expect(code(() => applyRotaryPosEmb(x, cos, narrow(sin, 0, 0, 4)))).toBe('SHAPE_MISMATCH');
      expect(
        code(() => applyRotaryPosEmb(x, cos.unsqueeze(0).expand(3, 5, 8), sin.unsqueeze(0).expand(3, 5, 8))),
      ).toBe('SHAPE_MISMATCH');
      expect(code(() => applyRotaryPosEmb(x, cos, sin.to('float64')))).toBe('DTYPE_MISMATCH');
      expect(code(() => applyRotaryPosEmb(x.to('int32'), cos, sin))).toBe('DTYPE_MISMATCH');
      expect(code(() => ropeCosSin(tensor([0.5, 1.5]), 8))).toBe('DTYPE_MISMATCH');
      expect(code(() => ropeCosSin(arange(0, 4), 7))).toBe('INVALID_ARGUMENT');
      expect(code(() => ropeCosSin(arange(0, 4).reshape(1, 2, 2), 8))).toBe('SHAPE_MISMATCH');
      expect(
        code(() =>
          ropeCosSin(arange(0, 4), 8, {
            scaling: {
              type: 'llama3',
              factor: 8,
              lowFreqFactor: 4,
              highFreqFactor: 1,
              originalMaxPositionEmbeddings: 64,
            },
          }),
        ),
      ).toBe('INVALID_ARGUMENT');
    });
  });

  it('ropeCosSin accepts int32 positions and shapes [S, dim] / [B, S, dim]', () => {
    tidy(() => {
      const a = ropeCosSin(tensor([0, 3, 9], { dtype: 'int32' }), 8);
      const b = ropeCosSin(tensor([[0, 3, 9]]), 8);
      expect(a.cos.shape).toEqual([3, 8]);
      expect(b.sin.shape).toEqual([1, 3, 8]);
      expect(asNumbers(a.cos)).toEqual(asNumbers(b.cos));
      // position 0: cos 1, sin 0
      expect(asNumbers(a.cos).slice(0, 8)).toEqual([1, 1, 1, 1, 1, 1, 1, 1]);
      expect(asNumbers(a.sin).slice(0, 8)).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    });
  });

  it('frees every temporary after forward + backward', () => {
    const { cos, sin } = ropeCosSin(arange(0, 9), 8);
    const x = randn([2, 3, 9, 12], { requiresGrad: true });
    const g = randn([2, 3, 9, 12]);
    const start = memoryStats().liveBytes;
    tidy(() => {
      applyRotaryPosEmb(x, cos, sin).backward(g);
    });
    x.grad?.dispose();
    x.grad = null;
    expect(memoryStats().liveBytes).toBe(start);
    for (const t of [cos, sin, x, g]) t.dispose();
  });
});
