// One decoder layer with Megatron-Core's names (TE layer spec): attention with its input norm, then
// a dense MLP (pre-MLP norm fused into fc1) or a MoE layer (separate `pre_mlp_layernorm`).
import { setSequenceParallelAttribute } from '@megapatch/parallel';
import { checkpoint, Module, type Tensor } from '@megapatch/tensor';
import { type LayerBuildOptions, SelfAttention } from './attention.js';
import { attachAuxLoss } from './aux-loss.js';
import { type AttentionContext, checkpointWithContext } from './context.js';
import { MLASelfAttention } from './mla.js';
import { MLP } from './mlp.js';
import { type ExpertParallelOptions, MoELayer, type MoELayerOptions } from './moe/moe-layer.js';
import type { RouterLossOptions } from './moe/router.js';
import { Norm } from './norm.js';

/** Options of a layer beyond those shared by all modules. */
export interface TransformerLayerOptions {
  kind: 'dense' | 'moe';
  expertParallel: ExpertParallelOptions;
  routerLosses: RouterLossOptions;
  /** Token dispatcher and capacity of MoE layers (default: allgather, dropless). */
  moe?: MoELayerOptions;
  /** Recompute the whole layer in backward (Megatron --recompute-granularity full). */
  recomputeFull: boolean;
  /** Recompute the MoE block in backward (--recompute-modules moe). */
  recomputeMoe: boolean;
  /** Recompute a dense layer's MLP (with its norm) in backward (--recompute-modules mlp). */
  recomputeMlp?: boolean;
  /** Gradient given to the aux losses (Megatron's MoEAuxLossAutoScaler scale). */
  auxLossScale: () => number;
}

/** Megatron's TransformerLayer. */
export class TransformerLayer extends Module {
  readonly inputLayernorm: Norm | null;
  readonly selfAttention: SelfAttention | MLASelfAttention;
  readonly preMlpLayernorm: Norm | null;
  readonly mlp: MLP | MoELayer;

  constructor(
    o: LayerBuildOptions,
    readonly layerNumber: number,
    private readonly opts: TransformerLayerOptions,
  ) {
    super();
    const c = o.config;
    if (c.mla) {
      // MLA keeps its input norm separate (Megatron's MLA spec).
      this.inputLayernorm = this.registerModule(
        'input_layernorm',
        new Norm(c.hiddenSize, c.normalization, c.layernormEpsilon, o.dtype, o.family.zeroCenteredGamma),
      );
      this.selfAttention = this.registerModule('self_attention', new MLASelfAttention(o, layerNumber));
    } else {
      this.inputLayernorm = null;
      this.selfAttention = this.registerModule('self_attention', new SelfAttention(o, layerNumber));
    }
    if (opts.kind === 'moe') {
      this.preMlpLayernorm = this.registerModule(
        'pre_mlp_layernorm',
        new Norm(c.hiddenSize, c.normalization, c.layernormEpsilon, o.dtype, o.family.zeroCenteredGamma),
      );
      this.mlp = this.registerModule(
        'mlp',
        new MoELayer(o, opts.expertParallel, opts.routerLosses, opts.moe),
      );
    } else {
      this.preMlpLayernorm = null;
      this.mlp = this.registerModule('mlp', new MLP(o, c.ffnHiddenSize, { fusedNorm: true }));
    }
    // The unfused norms see this rank's chunk under sequence parallelism: gradients summed over TP.
    if (o.sequenceParallel) {
      for (const norm of [this.inputLayernorm, this.preMlpLayernorm]) {
        for (const p of norm?.parameters() ?? []) setSequenceParallelAttribute(p);
      }
    }
  }

  /** x [s, b, h] -> [s, b, h] ([s/tp, b, h] under sequence parallelism). */
  forward(x: Tensor, ctx: AttentionContext): Tensor {
    if (this.opts.recomputeFull) return checkpointWithContext((xx, c) => this.body(xx, c), x, ctx);
    return this.body(x, ctx);
  }

  private body(x: Tensor, ctx: AttentionContext): Tensor {
    const attnIn = this.inputLayernorm ? this.inputLayernorm.forward(x) : x;
    const drop = ctx.dropout && ctx.dropout.hiddenDropout > 0 ? ctx.dropout : null;
    const n = this.layerNumber;
    // the residual adds go into the output projections (their GEMMs where the backend can); with
    // hidden dropout they follow it (Megatron's bias-dropout-add: residual + dropout(out))
    const h = drop
      ? x.add(drop.hidden(this.selfAttention.forward(attnIn, ctx), n, 'attention-output'))
      : this.selfAttention.forward(attnIn, ctx, x);
    if (this.mlp instanceof MoELayer) {
      const moe = this.mlp;
      const norm = this.preMlpLayernorm as Norm;
      const run = (hh: Tensor) => this.moeBlock(moe, norm.forward(hh));
      const out = this.opts.recomputeMoe && !this.opts.recomputeFull ? checkpoint(run, h) : run(h);
      return h.add(drop ? drop.hidden(out, n, 'mlp-output') : out);
    }
    const mlp = this.mlp;
    if (drop) {
      const run = (hh: Tensor) => mlp.forward(hh);
      const out = this.opts.recomputeMlp && !this.opts.recomputeFull ? checkpoint(run, h) : run(h);
      return h.add(drop.hidden(out, n, 'mlp-output'));
    }
    if (this.opts.recomputeMlp && !this.opts.recomputeFull) return checkpoint((hh) => mlp.forward(hh, hh), h);
    return mlp.forward(h, h);
  }

  private moeBlock(moe: MoELayer, x: Tensor): Tensor {
    let out = moe.forward(x);
    const r = moe.lastRouting;
    if (r?.auxLoss) out = attachAuxLoss(out, r.auxLoss, this.opts.auxLossScale());
    if (r?.zLoss) out = attachAuxLoss(out, r.zLoss, this.opts.auxLossScale());
    return out;
  }
}
