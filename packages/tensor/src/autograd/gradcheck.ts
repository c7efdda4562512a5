// Finite-difference gradient checking in float64, exported for every package's tests.
import { TensorError } from '../errors.js';
import { fromTypedArray } from '../ops/creation.js';
import { mul } from '../ops/elementwise.js';
import { sum } from '../ops/reduce.js';
import { Generator, randn } from '../random.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { noGrad } from './graph.js';

export interface GradcheckOptions {
  /** Central-difference step. */
  eps?: number;
  atol?: number;
  rtol?: number;
  /** Seed of the random projection of the outputs. */
  seed?: number;
}

/**
 * Checks the analytical gradients of `fn` against central differences. Inputs must be float64;
 * those with requiresGrad are checked. The output is projected on a fixed random tensor v, so one
 * backward pass of sum(fn(x) * v) gives the gradient compared with (L(x+eps) - L(x-eps)) / 2eps
 * for every input element. Returns true, or throws a TensorError naming the first mismatch.
 */
export function gradcheck(
  fn: (...inputs: Tensor[]) => Tensor,
  inputs: Tensor[],
  options: GradcheckOptions = {},
): true {
  const eps = options.eps ?? 1e-6;
  const atol = options.atol ?? 1e-5;
  const rtol = options.rtol ?? 1e-3;
  for (const x of inputs) {
    if (x.dtype !== 'float64')
      throw new TensorError('DTYPE_MISMATCH', `gradcheck: inputs must be float64, got ${x.dtype}`);
  }
  const gen = new Generator(options.seed ?? 1234);
  const probe = noGrad(() => fn(...inputs));
  const v = randn(probe.shape, { dtype: 'float64', generator: gen });
  probe.dispose();
  const loss = (xs: Tensor[]): number =>
    tidy(() => {
      const out = fn(...xs);
      return sum(mul(out, v)).item();
    });

  for (const x of inputs) {
    if (x.grad) {
      x.grad.dispose();
      x.grad = null;
    }
  }
  tidy(() => {
    const out = fn(...inputs);
    sum(mul(out, v)).backward();
  });
  try {
    inputs.forEach((x, i) => {
      if (!x.requiresGrad) return;
      const analytic = x.grad ? (x.grad.toTypedArray() as Float64Array) : new Float64Array(x.numel);
      const base = x.toTypedArray() as Float64Array;
      for (let j = 0; j < base.length; j++) {
        const at = (delta: number): number =>
          noGrad(() => {
            const data = Float64Array.from(base);
            data[j] += delta;
            const xp = fromTypedArray(data, x.shape);
            const xs = inputs.map((y, k) => (k === i ? xp : y));
            const r = loss(xs);
            xp.dispose();
            return r;
          });
        const numeric = (at(eps) - at(-eps)) / (2 * eps);
        const a = analytic[j];
        if (!(Math.abs(a - numeric) <= atol + rtol * Math.abs(numeric))) {
          throw new TensorError(
            'INVALID_ARGUMENT',
            `gradcheck: input ${i} ${x.describe()} element ${j}: analytical ${a} vs numerical ${numeric}`,
          );
        }
      }
    });
  } finally {
    v.dispose();
  }
  return true;
}
