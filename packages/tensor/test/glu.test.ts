// gatedActivation (SwiGLU / GeGLU): PyTorch fixtures, equality with the composition of the unary
// ops (chunk -> silu / gelu -> mul) forward and backward in every float dtype with odd sizes and
// non-contiguous inputs, finite differences in float64, errors, empty tensors, and what the
// autograd node keeps alive (only its input, where the composition also keeps act(gate)).
import { describe, expect, it } from 'vitest';
import {
  type DType,
  type GatedActivation,
  Generator,
  gatedActivation,
  gelu,
  gradcheck,
  memoryStats,
  mul,
  narrow,
  randn,
  silu,
  type Tensor,
  tensor,
  tidy,
  transpose,
  zeros,
} from '../src/index.js';
import { disposeAll, expectClose, expectTensorError, fromFixture, loadFixture } from './fixtures.js';

const ACTIVATIONS: GatedActivation[] = ['swiglu', 'geglu', 'geglu-tanh'];

/** The unfused formula: act(gate) * up with gate, up = x.chunk(2, -1). */
function composition(x: Tensor, activation: GatedActivation): Tensor {
  const [gate, up] = x.chunk(2, -1);
  const a = activation === 'swiglu' ? silu(gate) : gelu(gate, activation === 'geglu-tanh' ? 'tanh' : 'none');
  return mul(a, up);
}

const values = (t: Tensor): number[] => Array.from(t.toTypedArray() as ArrayLike<number>);

/** |a - e| <= atol + rtol |e| elementwise, naming the first bad element. */
function expectNear(actual: Tensor, expected: Tensor, atol: number, rtol: number, label: string): void {
  expect(actual.shape, `${label} shape`).toEqual(expected.shape);
  expect(actual.dtype, `${label} dtype`).toBe(expected.dtype);
  const a = values(actual);
  const e = values(expected);
  for (let i = 0; i < e.length; i++) {
    if (!(Math.abs(a[i] - e[i]) <= atol + rtol * Math.abs(e[i])))
      expect.fail(`${label} element ${i}: fused ${a[i]}, composition ${e[i]}`);
  }
}

describe('gatedActivation: PyTorch fixtures', () => {
  for (const c of loadFixture('glu')) {
    it(c.name, () => {
      const activation = c.args.activation as GatedActivation;
      const x = fromFixture(c.inputs.x, true);
      const gout = fromFixture(c.inputs.gout);
      const out = gatedActivation(x, activation);
      expect(out.dtype).toBe(x.dtype);
      expectClose(out, c.outputs.out, undefined, `${c.name} out`);
      out.backward(gout);
      expectClose(x.grad!, c.grads.x, undefined, `${c.name} dx`);
      disposeAll(out, x, gout);
    });
  }
});

describe('gatedActivation', () => {
  // 16-bit floats: the composition rounds act(gate) (and in the backward g * up) to the dtype
  // before the next product, the fused kernel rounds once
  const TOL: Record<string, { atol: number; rtol: number }> = {
    float32: { atol: 1e-6, rtol: 1e-6 },
    float64: { atol: 1e-14, rtol: 1e-13 },
    bfloat16: { atol: 1e-2, rtol: 1.6e-2 },
    float16: { atol: 1e-3, rtol: 2e-3 },
  };
  const layouts = ['contiguous', 'transposed', 'sliced', 'offset'] as const;
  /**
   * x [.., 2f] as the layout asks: contiguous, a transposed view, every other column of a wider
   * tensor, or a contiguous view starting one element into its storage (unaligned for vector loads).
   */
  function input(
    gen: Generator,
    rows: number,
    f: number,
    dtype: DType,
    layout: (typeof layouts)[number],
  ): Tensor {
    return tidy(() => {
      if (layout === 'contiguous') return randn([3, rows, 2 * f], { generator: gen, std: 2 }).to(dtype);
      if (layout === 'transposed')
        return transpose(randn([3, 2 * f, rows], { generator: gen, std: 2 }).to(dtype), 1, 2);
      if (layout === 'offset') {
        const flat = randn([rows * 2 * f + 1], { generator: gen, std: 2 }).to(dtype);
        return narrow(flat, 0, 1, rows * 2 * f).reshape(rows, 2 * f);
      }
      const wide = randn([rows, 2 * f, 2], { generator: gen, std: 2 }).to(dtype);
      return narrow(wide, 2, 1, 1).squeeze(2);
    });
  }

  for (const dtype of ['float32', 'float64', 'bfloat16', 'float16'] as DType[]) {
    for (const activation of ACTIVATIONS) {
      it(`equals the composition forward and backward: ${activation}, ${dtype}, odd sizes, strided inputs`, () => {
        const gen = new Generator(activation.length * 7 + dtype.length);
        for (const [rows, f] of [
          [1, 1],
          [5, 7],
          [3, 33],
          [2, 64],
        ]) {
          for (const layout of layouts) {
            tidy(() => {
              const base = input(gen, rows, f, dtype, layout);
              const contiguous =
                layout === 'contiguous' || layout === 'offset' || (layout === 'transposed' && rows === 1);
              expect(base.isContiguous).toBe(contiguous);
              const g = randn([...base.shape.slice(0, -1), f], { generator: gen }).to(dtype);
              const label = `${activation} ${dtype} [${base.shape}] ${layout}`;
              const grads: Tensor[] = [];
              const outs: Tensor[] = [];
              for (const fn of [gatedActivation, composition]) {
                const x = base.detach().requiresGrad_(true);
                const y = fn(x, activation);
                y.backward(g);
                outs.push(y.detach());
                grads.push(x.grad!);
              }
              const t = TOL[dtype];
              expectNear(outs[0], outs[1], t.atol, t.rtol, `${label} out`);
              expectNear(grads[0], grads[1], t.atol, t.rtol, `${label} dx`);
            });
          }
        }
      });
    }
  }

  it('matches finite differences in float64 (contiguous and strided inputs)', () => {
    const gen = new Generator(31);
    for (const activation of ACTIVATIONS) {
      const x = randn([3, 2, 10], { dtype: 'float64', generator: gen, std: 2 }).requiresGrad_();
      const base = randn([4, 6], { dtype: 'float64', generator: gen });
      const xt = transpose(base, 0, 1).detach().requiresGrad_();
      expect(gradcheck((t) => gatedActivation(t, activation), [x])).toBe(true);
      expect(gradcheck((t) => gatedActivation(t, activation), [xt])).toBe(true);
      // second use of the output in the graph: the gradient accumulates through both paths
      expect(gradcheck((t) => gatedActivation(t, activation).mul(gatedActivation(t, activation)), [x])).toBe(
        true,
      );
      disposeAll(x, base, xt);
    }
  });

  it('keeps the shape of the leading dimensions and works on empty tensors', () => {
    for (const shape of [
      [0, 4],
      [3, 0],
      [2, 0, 6],
    ]) {
      tidy(() => {
        const x = zeros(shape).requiresGrad_(true);
        const y = gatedActivation(x, 'swiglu');
        expect(y.shape).toEqual([...shape.slice(0, -1), shape[shape.length - 1] / 2]);
        y.sum().backward();
        expect(x.grad!.shape).toEqual(shape);
      });
    }
    tidy(() => {
      const y = gatedActivation(tensor([2.5, 3]), 'geglu');
      expect(y.shape).toEqual([1]);
    });
  });

  it('rejects odd last dimensions, 0-d and integer inputs, and unknown activations', () => {
    const x = randn([2, 7]);
    const s = tensor(1.5);
    const i = tensor([[1, 2]], { dtype: 'int32' });
    const ok = randn([2, 8]);
    expectTensorError(
      () => gatedActivation(x, 'swiglu'),
      'SHAPE_MISMATCH',
      /gatedActivation: x must be \[\.\.\., 2f\].*\[2,7\]/,
    );
    expectTensorError(() => gatedActivation(s, 'swiglu'), 'SHAPE_MISMATCH', /gatedActivation/);
    expectTensorError(
      () => gatedActivation(i, 'geglu'),
      'DTYPE_MISMATCH',
      /gatedActivation: expected a floating-point/,
    );
    expectTensorError(
      () => gatedActivation(ok, 'relu' as GatedActivation),
      'INVALID_ARGUMENT',
      /gatedActivation: activation must be/,
    );
    disposeAll(x, s, i, ok);
  });

  it('saves only its input for the backward: act(gate) is not kept, as the composition keeps it', () => {
    const rows = 6;
    const f = 40;
    for (const dtype of ['float32', 'bfloat16'] as DType[]) {
      const w = randn([rows, 2 * f])
        .to(dtype)
        .requiresGrad_(true);
      const device = w.device;
      const item = dtype === 'float32' ? 4 : 2;
      const kept: number[] = [];
      for (const fn of [gatedActivation, composition]) {
        // h: a non-leaf activation (as fc1's output), which both forms need for the backward
        const h = w.mul(2);
        const before = memoryStats(device).liveBytes;
        const y = fn(h, 'swiglu');
        h.dispose();
        kept.push(memoryStats(device).liveBytes - before - y.numel * item);
        const total = y.sum();
        total.backward();
        disposeAll(total, y);
      }
      expect(kept[0]).toBe(0);
      expect(kept[1]).toBe(rows * f * item);
      disposeAll(w.grad, w);
    }
  });

  it('frees every temporary of forward + backward', () => {
    const gen = new Generator(17);
    const x = randn([3, 4, 10], { generator: gen }).requiresGrad_();
    const device = x.device;
    const before = memoryStats(device).liveBytes;
    tidy(() => {
      const a = gatedActivation(x, 'swiglu');
      const b = gatedActivation(x.transpose(0, 1), 'geglu');
      const c = gatedActivation(x.to('bfloat16'), 'geglu-tanh').float();
      a.mul(b.transpose(0, 1)).sum().add(c.square().sum()).backward();
    });
    x.grad!.dispose();
    x.grad = null;
    expect(memoryStats(device).liveBytes).toBe(before);
    x.dispose();
  });
});
