// The SwiGLU MLP: fc1 produces [gate; up] (column parallel, each rank holding [gate_r; up_r]), fc2
// is row parallel. In dense layers the pre-MLP norm is fused into fc1 (TE's LayerNormLinear).
import {
  ColumnParallelLinear,
  LayerNormColumnParallelLinear,
  type ProcessGroup,
  RowParallelLinear,
} from '@megapatch/parallel';
import { gatedActivation as fusedGatedActivation, linear, Module, type Tensor } from '@megapatch/tensor';
import type { LayerBuildOptions } from './attention.js';
import type { GatedActivation } from './families/family.js';

/** silu(gate) · up of fc1's output [..., 2f] (gate first) -> [..., f]. */
export function swiglu(x: Tensor): Tensor {
  return gatedActivation(x, 'swiglu');
}

/**
 * act(gate) · up of fc1's output [..., 2f] (gate first) -> [..., f]: @megapatch/tensor's fused
 * gatedActivation, one kernel forward and one backward that keeps only fc1's output alive.
 */
export function gatedActivation(x: Tensor, act: GatedActivation): Tensor {
  return fusedGatedActivation(x, act);
}

/** Options of {@link MLP}. */
export interface MLPOptions {
  /** Fuse the pre-MLP norm into fc1 (dense layers with the TE spec). */
  fusedNorm: boolean;
  /** Keep the output as this rank's partial sum (the MoE layer reduces once for all experts). */
  skipReduce?: boolean;
  /** The group fc1/fc2 are split over (default the TP group; experts use the expert-TP group). */
  group?: ProcessGroup;
}

/** Megatron's MLP: `linear_fc1` ([gate; up], norm fused or not) and `linear_fc2`. */
export class MLP extends Module {
  readonly linearFc1: LayerNormColumnParallelLinear | ColumnParallelLinear;
  readonly linearFc2: RowParallelLinear;
  private readonly skipReduce: boolean;

  constructor(o: LayerBuildOptions, ffnHiddenSize: number, opts: MLPOptions) {
    super();
    const c = o.config;
    const group = opts.group ?? o.tpGroup;
    const common = {
      tpGroup: group,
      generator: o.generator,
      dtype: o.dtype,
      sequenceParallel: opts.skipReduce ? false : o.sequenceParallel,
      performInitialization: o.performInitialization,
      bias: false,
    };
    this.linearFc1 = this.registerModule(
      'linear_fc1',
      opts.fusedNorm
        ? new LayerNormColumnParallelLinear(c.hiddenSize, 2 * ffnHiddenSize, {
            ...common,
            initMethod: o.initMethod,
            partition: 'gate_up',
            normalization: c.normalization,
            eps: c.layernormEpsilon,
            zeroCenteredGamma: o.family.zeroCenteredGamma,
          })
        : new ColumnParallelLinear(c.hiddenSize, 2 * ffnHiddenSize, {
            ...common,
            initMethod: o.initMethod,
            partition: 'gate_up',
          }),
    );
    this.linearFc2 = this.registerModule(
      'linear_fc2',
      new RowParallelLinear(ffnHiddenSize, c.hiddenSize, {
        ...common,
        initMethod: o.outputInitMethod,
        inputIsParallel: true,
      }),
    );
    this.skipReduce = opts.skipReduce ?? false;
    this.activation = o.family.activation ?? 'swiglu';
  }
  /** The gated activation between fc1 and fc2 (the family's, SwiGLU by default). */
  readonly activation: GatedActivation;

  /**
   * x [..., h] -> [..., h]; with skipReduce, this rank's partial sum (and no input copy region).
   * With `residual` ([..., h], not with skipReduce) the output is residual + the MLP's output, the
   * residual added by linear_fc2 (in its GEMM where it can: RowParallelLinear).
   */
  forward(x: Tensor, residual?: Tensor): Tensor {
    if (this.skipReduce) {
      if (residual) throw new Error('MLP.forward: a residual cannot be added to a partial sum (skipReduce)');
      // The caller already entered the parallel region: plain local matmuls.
      return linear(
        gatedActivation(linear(x, this.linearFc1.weight as Tensor), this.activation),
        this.linearFc2.weight,
      );
    }
    const h = this.linearFc1.forward(x).output;
    return this.linearFc2.forward(gatedActivation(h, this.activation), residual).output;
  }
}
