// Megatron's MoELayer: router, routed experts and optional shared experts. Tokens are grouped by
// expert and each local expert runs one matmul pair over all of its tokens (no per-token loops).
// With expert parallelism the tokens of the EP group are all-gathered, each rank runs its own
// experts, and the partial outputs are reduce-scattered back (Megatron's allgather dispatcher).
import {
  copyToTensorModelParallelRegion,
  gatherFromSequenceParallelRegion,
  type ProcessGroup,
  reduceFromTensorModelParallelRegion,
  reduceScatterToSequenceParallelRegion,
} from '@megapatch/parallel';
import {
  cat,
  empty,
  fromTypedArray,
  indexAdd,
  indexSelect,
  initMethodNormal,
  linear,
  Module,
  ModuleList,
  noGrad,
  type Tensor,
  zeros,
  zeros_,
} from '@megapatch/tensor';
import type { LayerBuildOptions } from '../attention.js';
import { ModelError } from '../errors.js';
import { MLP } from '../mlp.js';
import { type RouterLossOptions, type Routing, TopKRouter } from './router.js';

/** Expert-parallel settings of a MoE layer. */
export interface ExpertParallelOptions {
  /** Expert-parallel group (experts are split into contiguous blocks over it). */
  epGroup: ProcessGroup;
  /** Expert tensor-parallel group (each expert's FFN split over it). */
  etpGroup: ProcessGroup;
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
   * Partial outputs [T, h] of this rank's experts for tokens x [T, h] routed by `indices` [T·k]
   * (global expert ids) with weights probs [T, k]; tokens routed elsewhere get zeros.
   */
  forward(x: Tensor, indices: Int32Array, probs: Tensor): Tensor {
    const [T, h] = x.shape;
    const k = indices.length / T;
    const perExpert: number[][] = Array.from({ length: this.numLocalExperts }, () => []);
    for (let slot = 0; slot < indices.length; slot++) {
      const local = indices[slot] - this.firstExpert;
      if (local >= 0 && local < this.numLocalExperts) perExpert[local].push(slot);
    }
    const flatProbs = probs.reshape(T * k);
    const outs: Tensor[] = [];
    const rows: number[] = [];
    // An expert without tokens still runs on an empty batch, so its weights get (zero) gradients
    // like every other parameter, as Megatron's grouped GEMM gives them.
    perExpert.forEach((slots, e) => {
      const tokens = Int32Array.from(slots, (s) => Math.floor(s / k));
      const tokenIdx = fromTypedArray(tokens, [tokens.length]);
      const slotIdx = fromTypedArray(Int32Array.from(slots), [slots.length]);
      const y = this.localExperts.get(e).forward(indexSelect(x, 0, tokenIdx));
      const w = indexSelect(flatProbs, 0, slotIdx).unsqueeze(1).to(y.dtype);
      outs.push(y.mul(w));
      for (const t of tokens) rows.push(t);
    });
    const base = zeros([T, h], { dtype: x.dtype });
    if (outs.length === 0) return base.add(x.mul(0)); // keeps x in the graph (zero gradient)
    return indexAdd(base, 0, fromTypedArray(Int32Array.from(rows), [rows.length]), cat(outs, 0));
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
    } else this.gateWeight = null;
  }

  override forward(x: Tensor): Tensor {
    const y = super.forward(x);
    if (!this.gateWeight) return y;
    return y.mul(linear(x, this.gateWeight).sigmoid());
  }
}

/** Megatron's MoELayer (`router`, `experts`, `shared_experts`). */
export class MoELayer extends Module {
  readonly router: TopKRouter;
  readonly experts: Experts;
  readonly sharedExperts: SharedExperts | null;
  /** Routing of the last forward (for logging and tests). */
  lastRouting: Routing | null = null;

  constructor(
    o: LayerBuildOptions,
    private readonly ep: ExpertParallelOptions,
    losses: RouterLossOptions,
  ) {
    super();
    const moe = o.config.moe;
    if (!moe) throw new ModelError('INVALID_CONFIG', 'MoELayer needs config.moe');
    if (o.sequenceParallel) {
      throw new ModelError(
        'UNSUPPORTED',
        'sequence parallelism with MoE layers is not supported yet; set sequenceParallel to false',
      );
    }
    if (ep.etpGroup.size > 1 && ep.etpGroup !== o.tpGroup) {
      throw new ModelError(
        'UNSUPPORTED',
        'expert tensor parallelism must equal tensor parallelism (etp = tp) for now',
      );
    }
    this.router = this.registerModule(
      'router',
      new TopKRouter(
        moe,
        o.config.hiddenSize,
        { dtype: o.dtype, generator: o.generator, performInitialization: o.performInitialization },
        losses,
      ),
    );
    this.experts = this.registerModule('experts', new Experts(o, ep));
    this.sharedExperts =
      moe.sharedExpertIntermediateSize > 0
        ? this.registerModule(
            'shared_experts',
            new SharedExperts(o, moe.sharedExpertIntermediateSize, moe.sharedExpertGate),
          )
        : null;
  }

  /** x [s, b, h] (already normalised) -> [s, b, h]. */
  forward(x: Tensor): Tensor {
    const [s, b, h] = x.shape;
    const flat = x.reshape(s * b, h);
    const routing = this.router.forward(flat);
    this.lastRouting = routing;
    let hidden = flat;
    let probs = routing.probs;
    let indices = routing.indices;
    const { epGroup, etpGroup } = this.ep;
    if (epGroup.size > 1) {
      hidden = gatherFromSequenceParallelRegion(flat, true, epGroup);
      probs = gatherFromSequenceParallelRegion(probs, true, epGroup);
      indices = allGatherIndices(indices, epGroup);
    }
    if (etpGroup.size > 1) {
      hidden = copyToTensorModelParallelRegion(hidden, etpGroup);
      probs = copyToTensorModelParallelRegion(probs, etpGroup);
    }
    let out = this.experts.forward(hidden, indices, probs);
    if (etpGroup.size > 1) out = reduceFromTensorModelParallelRegion(out, etpGroup);
    if (epGroup.size > 1) out = reduceScatterToSequenceParallelRegion(out, epGroup);
    out = out.view(s, b, h);
    if (this.sharedExperts) out = out.add(this.sharedExperts.forward(x));
    return out;
  }
}

/** The expert ids of every EP rank, in rank order (no gradient). */
function allGatherIndices(indices: Int32Array, group: ProcessGroup): Int32Array {
  return noGrad(() => {
    const local = fromTypedArray(Int32Array.from(indices), [indices.length]);
    const all = empty([indices.length * group.size], { dtype: 'int32' });
    group.allGatherIntoTensor(all, local).waitSync();
    const out = Int32Array.from(all.toTypedArray() as Int32Array);
    local.dispose();
    all.dispose();
    return out;
  });
}
