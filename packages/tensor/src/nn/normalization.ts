// RMSNorm and LayerNorm layers over the trailing dimensions.
import type { DType } from '../dtype.js';
import { TensorError } from '../errors.js';
import { ones, zeros } from '../ops/creation.js';
import { layerNorm, rmsNorm } from '../ops/norm.js';
import type { Tensor } from '../tensor.js';
import { Module } from './module.js';

function shapeOf(op: string, dim: number | readonly number[]): number[] {
  const shape = typeof dim === 'number' ? [dim] : [...dim];
  if (shape.length === 0 || !shape.every((d) => Number.isInteger(d) && d > 0)) {
    throw new TensorError(
      'INVALID_ARGUMENT',
      `${op}: normalized shape must be positive integers, got [${shape}]`,
    );
  }
  return shape;
}

/** Options of RMSNorm. */
export interface RMSNormOptions {
  /** Added to the mean square (default 1e-5, Megatron's layernorm_epsilon). */
  eps?: number;
  dtype?: DType;
  device?: string;
}

/** Root-mean-square normalisation with a learned scale (weight starts at ones). */
export class RMSNorm extends Module {
  readonly normalizedShape: number[];
  readonly eps: number;
  readonly weight: Tensor;

  constructor(dim: number | readonly number[], options: RMSNormOptions = {}) {
    super();
    this.normalizedShape = shapeOf('RMSNorm', dim);
    this.eps = options.eps ?? 1e-5;
    this.weight = this.registerParameter(
      'weight',
      ones(this.normalizedShape, { dtype: options.dtype ?? 'float32', device: options.device }),
    );
  }

  forward(x: Tensor): Tensor {
    return rmsNorm(x, this.normalizedShape, this.weight, this.eps);
  }
}

/** Options of LayerNorm. */
export interface LayerNormOptions {
  /** Added to the variance (default 1e-5). */
  eps?: number;
  /** Learn a scale (and a shift unless bias is false); default true. */
  elementwiseAffine?: boolean;
  /** Learn a shift (default true; needs elementwiseAffine). */
  bias?: boolean;
  dtype?: DType;
  device?: string;
}

/** Layer normalisation (torch.nn.LayerNorm): weight starts at ones, bias at zeros. */
export class LayerNorm extends Module {
  readonly normalizedShape: number[];
  readonly eps: number;
  readonly weight: Tensor | null;
  readonly bias: Tensor | null;

  constructor(dim: number | readonly number[], options: LayerNormOptions = {}) {
    super();
    this.normalizedShape = shapeOf('LayerNorm', dim);
    this.eps = options.eps ?? 1e-5;
    const affine = options.elementwiseAffine ?? true;
    const opts = { dtype: options.dtype ?? 'float32', device: options.device };
    this.weight = this.registerParameter('weight', affine ? ones(this.normalizedShape, opts) : null);
    this.bias = this.registerParameter(
      'bias',
      affine && options.bias !== false ? zeros(this.normalizedShape, opts) : null,
    );
  }

  forward(x: Tensor): Tensor {
    return layerNorm(x, this.normalizedShape, this.weight, this.bias, this.eps);
  }
}
