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
    /** Scale by (1 + weight), the weight starting at 0 (Gemma; TE's zero_centered_gamma). */
    readonly zeroCenteredGamma = false,
  ) {
    super();
    this.weight = this.registerParameter('weight', (zeroCenteredGamma ? zeros : ones)([size], { dtype }));
    this.bias = this.registerParameter('bias', kind === 'LayerNorm' ? zeros([size], { dtype }) : null);
  }

  forward(x: Tensor): Tensor {
    const w = this.zeroCenteredGamma ? this.weight.add(1) : this.weight;
    return this.kind === 'RMSNorm'
      ? rmsNorm(x, [this.size], w, this.eps)
      : layerNorm(x, [this.size], w, this.bias, this.eps);
  }
}
