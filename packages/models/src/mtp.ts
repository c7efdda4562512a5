// DeepSeek-V3's multi-token prediction as Megatron-Core builds it: block k sees the embedding of the
// tokens k positions ahead and the previous block's hidden state, projects their concatenation
// back to the hidden size, runs one decoder layer and predicts the token k + 1 positions ahead
// through the shared output layer. Under sequence parallelism the block holds this TP rank's chunk
// of the sequence: eh_proj gathers the sequence, its output is gathered over the hidden dimension
// and scattered back to the chunk (Megatron's MTP does the same).
import {
  ColumnParallelLinear,
  scatterToSequenceParallelRegion,
  setSequenceParallelAttribute,
} from '@megapatch/parallel';
import { cat, Module, type Tensor } from '@megapatch/tensor';
import type { LayerBuildOptions } from './attention.js';
import type { AttentionContext } from './context.js';
import { Norm } from './norm.js';
import { TransformerLayer, type TransformerLayerOptions } from './transformer-layer.js';

/** Megatron's MultiTokenPredictionLayer: `enorm`, `hnorm`, `eh_proj`, `transformer_layer`, `final_layernorm`. */
export class MultiTokenPredictionLayer extends Module {
  readonly enorm: Norm;
  readonly hnorm: Norm;
  readonly ehProj: ColumnParallelLinear;
  readonly transformerLayer: TransformerLayer;
  readonly finalLayernorm: Norm;

  constructor(o: LayerBuildOptions, layerNumber: number, layerOpts: TransformerLayerOptions) {
    super();
    const c = o.config;
    const norm = () =>
      new Norm(c.hiddenSize, c.normalization, c.layernormEpsilon, o.dtype, o.family.zeroCenteredGamma);
    this.enorm = this.registerModule('enorm', norm());
    this.hnorm = this.registerModule('hnorm', norm());
    this.ehProj = this.registerModule(
      'eh_proj',
      new ColumnParallelLinear(2 * c.hiddenSize, c.hiddenSize, {
        tpGroup: o.tpGroup,
        generator: o.generator,
        dtype: o.dtype,
        bias: false,
        gatherOutput: true,
        sequenceParallel: o.sequenceParallel,
        initMethod: o.initMethod,
        performInitialization: o.performInitialization,
      }),
    );
    this.transformerLayer = this.registerModule(
      'transformer_layer',
      new TransformerLayer(o, layerNumber, layerOpts),
    );
    this.finalLayernorm = this.registerModule('final_layernorm', norm());
    if (o.sequenceParallel) {
      for (const n of [this.enorm, this.hnorm, this.finalLayernorm]) {
        for (const p of n.parameters()) setSequenceParallelAttribute(p);
      }
    }
  }

  /**
   * embedded [s, b, h] (embedding of the shifted tokens), hidden [s, b, h] (the previous block's
   * normalised output) -> this block's hidden state before its final norm ([s/tp, b, h] each
   * under sequence parallelism).
   */
  forward(embedded: Tensor, hidden: Tensor, ctx: AttentionContext): Tensor {
    let x = this.ehProj.forward(cat([this.enorm.forward(embedded), this.hnorm.forward(hidden)], -1)).output;
    if (this.ehProj.sequenceParallel) x = scatterToSequenceParallelRegion(x, this.ehProj.tpGroup);
    return this.transformerLayer.forward(x, ctx);
  }
}
