// Random numbers: one Philox 4x32-10 stream per generator, addressed by (seed, offset), so the
// same seed gives the same numbers on every backend. A draw of n values consumes ceil(n / 4)
// counter blocks.
import { attachGrad, needsGrad } from './autograd/record.js';
import { isFloating } from './dtype.js';
import { argError } from './errors.js';
import { mul } from './ops/elementwise.js';
import { alloc, backendFor, type CreateOptions, finishCreate, inputsBackend } from './ops/util.js';
import type { Shape } from './shape.js';
import type { Tensor } from './tensor.js';

/** The state of a generator: plain data, saved and restored as JSON-friendly strings. */
export interface RngState {
  seed: string;
  offset: string;
}

export class Generator {
  private seedValue: bigint;
  private offsetValue = 0n;

  constructor(seed: number | bigint = 0x2b992ddfa23249d6n) {
    this.seedValue = BigInt.asUintN(64, BigInt(seed));
  }

  manualSeed(seed: number | bigint): this {
    this.seedValue = BigInt.asUintN(64, BigInt(seed));
    this.offsetValue = 0n;
    return this;
  }

  initialSeed(): bigint {
    return this.seedValue;
  }

  getState(): RngState {
    return { seed: this.seedValue.toString(), offset: this.offsetValue.toString() };
  }

  setState(state: RngState): void {
    this.seedValue = BigInt(state.seed);
    this.offsetValue = BigInt(state.offset);
  }

  /** A new generator continuing from this one's state (fork). */
  fork(): Generator {
    const g = new Generator(this.seedValue);
    g.offsetValue = this.offsetValue;
    return g;
  }

  /** Reserves the counter blocks for n values; returns the first block's offset. */
  advance(n: number): bigint {
    const start = this.offsetValue;
    this.offsetValue += BigInt(Math.ceil(n / 4));
    return start;
  }
}

/** The default generator used when none is given. */
export const defaultGenerator = new Generator();

/** Seeds the default generator. */
export function manualSeed(seed: number | bigint): Generator {
  return defaultGenerator.manualSeed(seed);
}

export function getRngState(): RngState {
  return defaultGenerator.getState();
}

export function setRngState(state: RngState): void {
  defaultGenerator.setState(state);
}

export interface RandomOptions extends CreateOptions {
  generator?: Generator;
}

function draw(
  shape: Shape,
  dist: 'uniform' | 'normal' | 'randint' | 'bernoulli',
  a: number,
  b: number,
  opts: RandomOptions,
  dflt: 'float32' | 'int64',
): Tensor {
  const backend = backendFor(opts.device);
  const t = alloc(backend, shape, opts.dtype ?? dflt);
  const gen = opts.generator ?? defaultGenerator;
  if (t.numel > 0) backend.random(t, dist, gen.initialSeed(), gen.advance(t.numel), a, b);
  return finishCreate(t, opts);
}

/** Uniform samples in [0, 1). */
export function rand(shape: Shape, opts: RandomOptions = {}): Tensor {
  return draw(shape, 'uniform', 0, 1, opts, 'float32');
}

/** Uniform samples in [low, high). */
export function uniform(shape: Shape, low: number, high: number, opts: RandomOptions = {}): Tensor {
  return draw(shape, 'uniform', low, high, opts, 'float32');
}

/** Standard normal samples (or mean/std). */
export function randn(shape: Shape, opts: RandomOptions & { mean?: number; std?: number } = {}): Tensor {
  return draw(shape, 'normal', opts.mean ?? 0, opts.std ?? 1, opts, 'float32');
}

/** Integers uniform in [low, high) (int64 unless dtype says otherwise). */
export function randint(low: number, high: number, shape: Shape, opts: RandomOptions = {}): Tensor {
  if (!(high > low)) throw argError('randint', `high (${high}) must be greater than low (${low})`);
  return draw(shape, 'randint', low, high, opts, 'int64');
}

/**
 * Inverted dropout: zeroes each element with probability p and scales the rest by 1/(1-p).
 * Identity when not training or p = 0.
 */
export function dropout(x: Tensor, p = 0.5, training = true, generator?: Generator): Tensor {
  const backend = inputsBackend('dropout', x);
  if (!(p >= 0 && p <= 1)) throw argError('dropout', `p must be in [0, 1], got ${p}`);
  if (!isFloating(x.dtype)) throw argError('dropout', `expected a floating-point tensor, got ${x.dtype}`);
  if (!training || p === 0) return mul(x, 1);
  const keep = alloc(backend, x.shape, x.dtype);
  const gen = generator ?? defaultGenerator;
  if (keep.numel > 0) backend.random(keep, 'bernoulli', gen.initialSeed(), gen.advance(keep.numel), 1 - p, 0);
  const scale = p === 1 ? 0 : 1 / (1 - p);
  const mask = mul(keep, scale);
  keep.dispose();
  const out = noGradMul(x, mask);
  if (needsGrad(x)) attachGrad(out, 'DropoutBackward', [x], [mask], (g, [m]) => [mul(g, m)]);
  mask.dispose();
  return out;
}

function noGradMul(x: Tensor, m: Tensor): Tensor {
  const out = alloc(x.backend, x.shape, x.dtype);
  x.backend.binary(out, x, m, 'mul');
  return out;
}
