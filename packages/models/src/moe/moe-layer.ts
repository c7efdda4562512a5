// Megatron's MoELayer: router, token dispatcher, routed experts and optional shared experts.
// The dispatcher (token-dispatcher.ts: 'allgather' or 'alltoall', Megatron's
// moe_token_dispatcher_type) hands this rank's experts their tokens grouped by expert; the local
// experts run as one grouped GEMM per projection (fc1 and fc2, @megapatch/tensor's groupedLinear,
// like Megatron's GroupedMLP) around one activation over all tokens, and the dispatcher brings the
// outputs back to the tokens' ranks. Under sequence parallelism the layer sees this TP
// rank's chunk of the sequence [s/tp, b, h]: the router and the dispatcher work on it as it is,
// and the shared experts gather it and reduce-scatter their output like the dense MLP.
import { type ProcessGroup, setSequenceParallelAttribute } from '@megapatch/parallel';
import {
  empty,
  groupedLinear,
  initMethodNormal,
  linear,
  Module,
  ModuleList,
  SharedGroupSizes,
  Tensor,
  zeros_,
} from '@megapatch/tensor';
import type { LayerBuildOptions } from '../attention.js';
import { ModelError } from '../errors.js';
import { gatedActivation, MLP } from '../mlp.js';
import { MoEAllGatherTokenDispatcher } from './allgather-dispatcher.js';
import { MoEAlltoAllTokenDispatcher } from './alltoall-dispatcher.js';
import { type RouterLossOptions, type Routing, TopKRouter } from './router.js';
import type { CapacityOptions } from './routing-map.js';
import type { MoETokenDispatcherType, TokenDispatcher } from './token-dispatcher.js';

/** Expert-parallel settings of a MoE layer. */
export interface ExpertParallelOptions {
  /** Expert-parallel group (experts are split into contiguous blocks over it). */
  epGroup: ProcessGroup;
  /** Expert tensor-parallel group (each expert's FFN split over it). */
  etpGroup: ProcessGroup;
}

/** How a MoE layer moves and drops tokens. */
export interface MoELayerOptions {
  /** Megatron's moe_token_dispatcher_type (default 'allgather'). */
  tokenDispatcherType?: MoETokenDispatcherType;
  /** Token dropping at a capacity (Megatron's moe_expert_capacity_factor ...); null or absent: dropless. */
  capacity?: CapacityOptions | null;
}

/** The routed experts of this rank, `local_experts.{e}` as Megatron's SequentialMLP names them. */
export class Experts extends Module {
  readonly localExperts: ModuleList<MLP>;
  readonly firstExpert: number;
  readonly numLocalExperts: number;

  constructor(o: LayerBuildOptions, ep: ExpertParallelOptions) {
    super();
    const moe = o.config.moe;
    if (!moe) throw new ModelError('INVALID_CONFIG', 'Experts need config.moe');
    const epSize = ep.epGroup.size;
    if (moe.numExperts % epSize !== 0) {
      throw new ModelError(
        'INVALID_CONFIG',
        `numExperts ${moe.numExperts} is not divisible by the expert-parallel size ${epSize}`,
      );
    }
    this.numLocalExperts = moe.numExperts / epSize;
    this.firstExpert = ep.epGroup.rank * this.numLocalExperts;
    this.localExperts = this.registerModule(
      'local_experts',
      new ModuleList(
        Array.from(
          { length: this.numLocalExperts },
          () => new MLP(o, moe.moeFfnHiddenSize, { fusedNorm: false, skipReduce: true, group: ep.etpGroup }),
        ),
      ),
    );
  }

  /**
   * Outputs [N, h] of the local experts for tokens [N, h] grouped by expert (tokensPerExpert[e]
   * rows for local expert e, in order; numbers, or an integer tensor where the tokens are); with
   * expert-TP, this rank's partial sums.
   */
  forward(tokens: Tensor, tokensPerExpert: readonly number[] | Tensor): Tensor {
    const mlps = Array.from({ length: this.numLocalExperts }, (_, e) => this.localExperts.get(e));
    // sizes on the device: fc1 and fc2 read them once between them where the grouped GEMM needs
    // them on the host (a GPU's default loop of GEMMs), not at all where it plans them there
    const sizes = tokensPerExpert instanceof Tensor ? new SharedGroupSizes(tokensPerExpert) : tokensPerExpert;
    // MLP.forward's skipReduce path (linear, gatedActivation, linear; the expert MLPs have no
    // bias) for all experts at once: two grouped GEMMs, per expert the same products, around one
    // activation over every token. An expert without tokens still gets (zero) weight gradients,
    // like every other parameter, as Megatron's grouped GEMM gives them.
    const h = groupedLinear(
      tokens,
      mlps.map((m) => m.linearFc1.weight as Tensor),
      sizes,
    );
    return groupedLinear(
      gatedActivation(h, this.localExperts.get(0).activation),
      mlps.map((m) => m.linearFc2.weight),
      sizes,
    );
  }
}

/** Megatron's SharedExpertMLP: a SwiGLU MLP over every token, optionally gated (Qwen2-MoE). */
export class SharedExperts extends MLP {
  readonly gateWeight: Tensor | null;

  constructor(o: LayerBuildOptions, ffn: number, gate: boolean) {
    super(o, ffn, { fusedNorm: false });
    if (gate) {
      const w = empty([1, o.config.hiddenSize], { dtype: o.dtype });
      if (o.performInitialization) initMethodNormal(0.02)(w, o.generator);
      else zeros_(w);
      this.gateWeight = this.registerParameter('gate_weight', w);
      // the gate sees this rank's chunk only under SP: its gradient is summed over TP
      if (o.sequenceParallel) setSequenceParallelAttribute(this.gateWeight);
    } else this.gateWeight = null;
  }

  override forward(x: Tensor): Tensor {
    const y = super.forward(x);
    if (!this.gateWeight) return y;
    return y.mul(linear(x, this.gateWeight).sigmoid());
  }
}

/** Megatron's MoELayer (`router`, `experts`, `shared_experts`) with its token dispatcher. */
export class MoELayer extends Module {
  readonly router: TopKRouter;
  readonly experts: Experts;
  readonly sharedExperts: SharedExperts | null;
  readonly tokenDispatcher: TokenDispatcher;
  /** Routing of the last forward (for logging and tests). */
  lastRouting: Routing | null = null;

  constructor(
    o: LayerBuildOptions,
    ep: ExpertParallelOptions,
    losses: RouterLossOptions,
    options: MoELayerOptions = {},
  ) {
    super();
    const moe = o.config.moe;
    if (!moe) throw new ModelError('INVALID_CONFIG', 'MoELayer needs config.moe');
    const capacity = options.capacity ?? null;
    if (capacity && !(capacity.capacityFactor > 0)) {
      throw new ModelError(
        'INVALID_CONFIG',
        `moeExpertCapacityFactor must be a positive number, got ${capacity.capacityFactor}; leave it unset for dropless MoE`,
      );
    }
    this.router = this.registerModule(
      'router',
      new TopKRouter(
        moe,
        o.config.hiddenSize,
        {
          dtype: o.dtype,
          generator: o.generator,
          performInitialization: o.performInitialization,
          sequenceParallelGroup: o.sequenceParallel ? o.tpGroup : null,
          sequencePartitionGroup: o.sequencePartitionGroup ?? null,
        },
        losses,
        capacity,
      ),
    );
    this.experts = this.registerModule('experts', new Experts(o, ep));
    const dispatcherOptions = {
      tpGroup: o.tpGroup,
      sequenceParallel: o.sequenceParallel,
      epGroup: ep.epGroup,
      etpGroup: ep.etpGroup,
      numExperts: moe.numExperts,
      firstExpert: this.experts.firstExpert,
      numLocalExperts: this.experts.numLocalExperts,
    };
    const type = options.tokenDispatcherType ?? 'allgather';
    if (type === 'allgather') this.tokenDispatcher = new MoEAllGatherTokenDispatcher(dispatcherOptions);
    else if (type === 'alltoall') this.tokenDispatcher = new MoEAlltoAllTokenDispatcher(dispatcherOptions);
    else {
      throw new ModelError(
        'INVALID_CONFIG',
        `unknown MoE token dispatcher '${type}'; use 'allgather' or 'alltoall'`,
      );
    }
    this.sharedExperts =
      moe.sharedExpertIntermediateSize > 0
        ? this.registerModule(
            'shared_experts',
            new SharedExperts(o, moe.sharedExpertIntermediateSize, moe.sharedExpertGate),
          )
        : null;
  }

  /** x [s, b, h] (already normalised; [s/tp, b, h] under sequence parallelism) -> the same shape. */
  forward(x: Tensor): Tensor {
    const [s, b, h] = x.shape;
    const flat = x.reshape(s * b, h);
    const routing = this.router.forward(flat, b);
    this.lastRouting = routing;
    const d = this.tokenDispatcher.dispatch(flat, routing);
    let out = d.combine(this.experts.forward(d.tokens, d.tokensPerExpert)).view(s, b, h);
    if (this.sharedExperts) out = out.add(this.sharedExperts.forward(x));
    return out;
  }
}
