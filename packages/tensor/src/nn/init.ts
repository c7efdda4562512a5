// Parameter initialisers (torch.nn.init names, camelCased) and Megatron-LM's init methods. They
// overwrite a tensor in place, outside autograd, and draw from the given Generator (the default
// one otherwise). Values are drawn in float32 and rounded into the tensor's dtype, so a seed gives
// the same initial model in every precision, up to that rounding.

import { isFloating } from '../dtype.js';
import { TensorError } from '../errors.js';
import { type Generator, randn, uniform } from '../random.js';
import type { Tensor } from '../tensor.js';

/** Initialises a tensor in place and returns it (Megatron's init_method). */
export type InitMethod = (t: Tensor, generator?: Generator) => Tensor;

/** Activation names understood by calculateGain. */
export type Nonlinearity =
  | 'linear'
  | 'conv1d'
  | 'conv2d'
  | 'conv3d'
  | 'sigmoid'
  | 'tanh'
  | 'relu'
  | 'leaky_relu'
  | 'selu';

function checkTarget(op: string, t: Tensor): void {
  t.checkAlive(op);
  if (!isFloating(t.dtype))
    throw new TensorError('DTYPE_MISMATCH', `${op}: expected a floating-point tensor, got ${t.describe()}`);
}

function overwrite(t: Tensor, src: Tensor): Tensor {
  if (t.numel > 0) t.backend.copy(t, src);
  src.dispose();
  return t;
}

/** Fills t with samples of N(mean, std^2). */
export function normal_(t: Tensor, mean = 0, std = 1, generator?: Generator): Tensor {
  checkTarget('normal_', t);
  if (!(std >= 0)) throw new TensorError('INVALID_ARGUMENT', `normal_: std must be >= 0, got ${std}`);
  return overwrite(t, randn(t.shape, { mean, std, generator, device: t.device }));
}

/** Fills t with samples of U(a, b). */
export function uniform_(t: Tensor, a = 0, b = 1, generator?: Generator): Tensor {
  checkTarget('uniform_', t);
  if (!(b >= a)) throw new TensorError('INVALID_ARGUMENT', `uniform_: expected a <= b, got [${a}, ${b}]`);
  return overwrite(t, uniform(t.shape, a, b, { generator, device: t.device }));
}

/** Fills t with a constant. */
export function constant_(t: Tensor, value: number): Tensor {
  t.checkAlive('constant_');
  if (t.numel > 0) t.backend.fill(t, value);
  return t;
}

/** Fills t with zeros. */
export function zeros_(t: Tensor): Tensor {
  return constant_(t, 0);
}

/** Fills t with ones. */
export function ones_(t: Tensor): Tensor {
  return constant_(t, 1);
}

/** The recommended gain for an activation (torch.nn.init.calculate_gain). */
export function calculateGain(nonlinearity: Nonlinearity, param?: number): number {
  switch (nonlinearity) {
    case 'linear':
    case 'conv1d':
    case 'conv2d':
    case 'conv3d':
    case 'sigmoid':
      return 1;
    case 'tanh':
      return 5 / 3;
    case 'relu':
      return Math.SQRT2;
    case 'leaky_relu': {
      const slope = param ?? 0.01;
      return Math.sqrt(2 / (1 + slope * slope));
    }
    case 'selu':
      return 3 / 4;
  }
}

/** fan_in and fan_out of a weight ([out, in, ...receptive field]), as torch computes them. */
export function calculateFanInAndFanOut(t: Tensor): { fanIn: number; fanOut: number } {
  if (t.ndim < 2) {
    throw new TensorError(
      'INVALID_ARGUMENT',
      `fan in and fan out need a tensor with at least 2 dimensions, got ${t.describe()}`,
    );
  }
  let receptive = 1;
  for (let i = 2; i < t.ndim; i++) receptive *= t.shape[i];
  return { fanIn: t.shape[1] * receptive, fanOut: t.shape[0] * receptive };
}

/** Options of kaimingUniform_. */
export interface KaimingOptions {
  /** Negative slope of the rectifier after this layer (leaky_relu only). */
  a?: number;
  mode?: 'fan_in' | 'fan_out';
  nonlinearity?: Nonlinearity;
  generator?: Generator;
}

/** He initialisation: U(-b, b) with b = gain * sqrt(3 / fan). */
export function kaimingUniform_(t: Tensor, options: KaimingOptions = {}): Tensor {
  checkTarget('kaimingUniform_', t);
  const { fanIn, fanOut } = calculateFanInAndFanOut(t);
  const fan = (options.mode ?? 'fan_in') === 'fan_in' ? fanIn : fanOut;
  if (fan === 0) return t;
  const gain = calculateGain(options.nonlinearity ?? 'leaky_relu', options.a ?? 0);
  const bound = Math.sqrt(3) * (gain / Math.sqrt(fan));
  return uniform_(t, -bound, bound, options.generator);
}

/** Glorot initialisation: U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out)). */
export function xavierUniform_(t: Tensor, gain = 1, generator?: Generator): Tensor {
  checkTarget('xavierUniform_', t);
  const { fanIn, fanOut } = calculateFanInAndFanOut(t);
  const bound = gain * Math.sqrt(6 / (fanIn + fanOut));
  return uniform_(t, -bound, bound, generator);
}

/** Megatron's init_method_normal: N(0, sigma^2). */
export function initMethodNormal(sigma: number): InitMethod {
  return (t, generator) => normal_(t, 0, sigma, generator);
}

/** Megatron's scaled_init_method_normal for output projections: N(0, (sigma / sqrt(2 * numLayers))^2). */
export function scaledInitMethodNormal(sigma: number, numLayers: number): InitMethod {
  if (!(numLayers > 0))
    throw new TensorError(
      'INVALID_ARGUMENT',
      `scaledInitMethodNormal: numLayers must be > 0, got ${numLayers}`,
    );
  return initMethodNormal(sigma / Math.sqrt(2 * numLayers));
}
