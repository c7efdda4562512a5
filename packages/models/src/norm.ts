// The norm of a TransformerConfig (RMSNorm or LayerNorm) over the last dimension, computed in fp32
// whatever the activation dtype, with Megatron's parameter names (`weight`, and `bias` for LayerNorm).
import { type DType, layerNorm, Module, ones, rmsNorm, type Tensor, zeros } from '@megapatch/tensor';

/** RMSNorm or LayerNorm over the last `size` features. */
export class Norm extends Module {
  readonly weight: Tensor;
  readonly bias: Tensor | null;

  constructor(
    readonly size: number,
    readonly kind: 'RMSNorm' | 'LayerNorm',
    readonly eps: number,
    dtype: DType = 'float32',
  ) {
    super();
    this.weight = this.registerParameter('weight', ones([size], { dtype }));
    this.bias = this.registerParameter('bias', kind === 'LayerNorm' ? zeros([size], { dtype }) : null);
  }

  forward(x: Tensor): Tensor {
    return this.kind === 'RMSNorm'
      ? rmsNorm(x, [this.size], this.weight, this.eps)
      : layerNorm(x, [this.size], this.weight, this.bias, this.eps);
  }
}
