// Linear and Dropout layers.
import type { DType } from '../dtype.js';
import { TensorError } from '../errors.js';
import { empty } from '../ops/creation.js';
import { linear } from '../ops/matmul.js';
import { dropout, type Generator } from '../random.js';
import type { Tensor } from '../tensor.js';
import { calculateFanInAndFanOut, type InitMethod, kaimingUniform_, uniform_, zeros_ } from './init.js';
import { Module } from './module.js';

/** Options of Linear. */
export interface LinearOptions {
  /** Learn an additive bias (default true). */
  bias?: boolean;
  dtype?: DType;
  device?: string;
  generator?: Generator;
  /**
   * Initialises the weight instead of PyTorch's default (e.g. Megatron's initMethodNormal);
   * the bias then starts at zero, as in Megatron.
   */
  initMethod?: InitMethod;
}

/** y = x W^T + b with weight [out, in], initialised like torch.nn.Linear (kaiming-uniform weight, uniform bias). */
export class Linear extends Module {
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly weight: Tensor;
  readonly bias: Tensor | null;

  constructor(inFeatures: number, outFeatures: number, options: LinearOptions = {}) {
    super();
    if (
      !(Number.isInteger(inFeatures) && inFeatures >= 0 && Number.isInteger(outFeatures) && outFeatures >= 0)
    ) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `Linear: feature counts must be non-negative integers, got ${inFeatures} and ${outFeatures}`,
      );
    }
    this.inFeatures = inFeatures;
    this.outFeatures = outFeatures;
    const opts = { dtype: options.dtype ?? 'float32', device: options.device };
    this.weight = this.registerParameter('weight', empty([outFeatures, inFeatures], opts));
    this.bias = this.registerParameter('bias', options.bias === false ? null : empty([outFeatures], opts));
    const gen = options.generator;
    if (options.initMethod) {
      options.initMethod(this.weight, gen);
      if (this.bias) zeros_(this.bias);
      return;
    }
    // torch's default: kaiming_uniform_(a = sqrt(5)) works out to U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    kaimingUniform_(this.weight, { a: Math.sqrt(5), generator: gen });
    if (this.bias) {
      const { fanIn } = calculateFanInAndFanOut(this.weight);
      const bound = fanIn > 0 ? 1 / Math.sqrt(fanIn) : 0;
      uniform_(this.bias, -bound, bound, gen);
    }
  }

  forward(x: Tensor): Tensor {
    return linear(x, this.weight, this.bias);
  }
}

/** Options of Dropout. */
export interface DropoutOptions {
  generator?: Generator;
}

/** Inverted dropout with probability p, active only in training mode. */
export class Dropout extends Module {
  readonly p: number;
  readonly generator: Generator | undefined;

  constructor(p = 0.5, options: DropoutOptions = {}) {
    super();
    if (!(p >= 0 && p <= 1))
      throw new TensorError('INVALID_ARGUMENT', `Dropout: p must be in [0, 1], got ${p}`);
    this.p = p;
    this.generator = options.generator;
  }

  forward(x: Tensor): Tensor {
    return dropout(x, this.p, this.training, this.generator);
  }
}
