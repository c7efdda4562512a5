// Self-attention with grouped queries (Llama, Mistral, Qwen2/3): the input norm fused into the QKV
// projection (Transformer Engine's LayerNormLinear), optional QKV bias and per-head q/k norms,
// rotary embeddings in fp32, causal / sliding-window / packed masking, and the row-parallel output.
import type { TransformerConfig } from '@megapatch/convert';
import {
  copyToTensorModelParallelRegion,
  LayerNormColumnParallelLinear,
  type ProcessGroup,
  RowParallelLinear,
  ringAttention,
} from '@megapatch/parallel';
import {
  applyRotaryPosEmb,
  checkpoint,
  type DType,
  type Generator,
  type InitMethod,
  Module,
  scaledDotProductAttention,
  type Tensor,
} from '@megapatch/tensor';
import type { AttentionContext } from './context.js';
import { allToAllAttention } from './cp-all-to-all.js';
import { ModelError } from './errors.js';
import type { ModelFamily } from './families/family.js';
import { Norm } from './norm.js';

/** Construction options every layer receives from the model. */
export interface LayerBuildOptions {
  config: TransformerConfig;
  dtype: DType;
  tpGroup: ProcessGroup;
  sequenceParallel: boolean;
  generator?: Generator;
  initMethod?: InitMethod;
  outputInitMethod?: InitMethod;
  performInitialization: boolean;
  /** What the model's family changes in the shared layers. */
  family: ModelFamily;
  /**
   * The ranks that each hold part of every sequence (Megatron's sequence partition group: TP under
   * sequence parallelism, CP, or TP × CP): the MoE routers' balancing statistics are reduced over
   * it. Null when every rank sees whole sequences.
   */
  sequencePartitionGroup?: ProcessGroup | null;
}

/**
 * The core attention: softmax(q kᵀ·scale) v with the context's mask, causality and packing; with
 * the context's attention dropout (training), the probabilities of layer `dropoutAt.layer`'s heads
 * (this rank's, from global head `headOffset`) are dropped as on one process.
 */
export function coreAttention(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  ctx: AttentionContext,
  scale: number,
  dropoutAt?: { layer: number; headOffset: number },
): Tensor {
  const drop = ctx.dropout && ctx.dropout.attentionDropout > 0 && dropoutAt ? ctx.dropout : null;
  // the mask is a function of its keys: a recomputation draws it again, the same. [b, heads, s, S]:
  // this rank's queries against every key of the row (S = s without context parallelism)
  const dropoutMaskOf = () =>
    drop && dropoutAt
      ? drop.attentionMask(dropoutAt.layer, dropoutAt.headOffset, q.shape[1], {
          dtype: 'float32',
          device: q.device,
        })
      : null;
  const cp = ctx.cpGroup;
  if (cp && cp.size > 1) {
    // context parallelism: ring attention over the cp group on this rank's two chunks
    if (ctx.mask || ctx.cache) {
      throw new ModelError(
        'UNSUPPORTED',
        'context parallelism runs causal attention without a mask or KV cache (no sliding window, attention mask or generation); set contextParallelSize 1',
      );
    }
    if (ctx.cpCommType === 'a2a') {
      if (drop) {
        throw new ModelError(
          'UNSUPPORTED',
          'attention dropout with context parallelism by all-to-all (cpCommType a2a) is not supported; use cpCommType p2p or attentionDropout 0',
        );
      }
      // this rank's heads over whole sequences: plain attention, packed by the global boundaries
      const local = (qq: Tensor, kk: Tensor, vv: Tensor, cu: Tensor | null) => {
        const run = (a: Tensor, b: Tensor, c: Tensor, ...rest: Tensor[]) =>
          scaledDotProductAttention(a, b, c, { isCausal: ctx.causal, cuSeqlens: rest[0] ?? null, scale });
        const args = cu ? [qq, kk, vv, cu] : [qq, kk, vv];
        return ctx.recomputeCoreAttention
          ? checkpoint(run, ...args)
          : run(...(args as [Tensor, Tensor, Tensor]));
      };
      const boundaries =
        ctx.cuSeqlensValues ??
        (ctx.cuSeqlens
          ? Array.from(ctx.cuSeqlens.toTypedArray() as ArrayLike<number | bigint>, Number)
          : null);
      return allToAllAttention(q, k, v, cp, boundaries, local);
    }
    // the boundaries as the host's numbers: the ring plans its calls with them (no read back)
    const cuSeqlens = ctx.cuSeqlensValues ?? ctx.cuSeqlens;
    const ring = (qq: Tensor, kk: Tensor, vv: Tensor) => {
      // each block of the ring takes the columns of the K/V it meets
      const dropoutMask = dropoutMaskOf();
      try {
        return ringAttention(qq, kk, vv, { cpGroup: cp, scale, causal: ctx.causal, cuSeqlens, dropoutMask });
      } finally {
        dropoutMask?.dispose();
      }
    };
    return ctx.recomputeCoreAttention ? checkpoint(ring, q, k, v) : ring(q, k, v);
  }
  const attend = (qq: Tensor, kk: Tensor, vv: Tensor, attnMask: Tensor | null, cuSeqlens: Tensor | null) => {
    const dm = dropoutMaskOf();
    try {
      return scaledDotProductAttention(qq, kk, vv, {
        isCausal: ctx.causal,
        attnMask,
        cuSeqlens,
        scale,
        dropoutMask: dm,
      });
    } finally {
      dm?.dispose();
    }
  };
  if (!ctx.recomputeCoreAttention) return attend(q, k, v, ctx.mask, ctx.cuSeqlens);
  // the mask and boundaries are checkpoint inputs, so the recomputation still holds them
  const extra = [...(ctx.mask ? [ctx.mask] : []), ...(ctx.cuSeqlens ? [ctx.cuSeqlens] : [])];
  const run = (qq: Tensor, kk: Tensor, vv: Tensor, ...rest: Tensor[]) =>
    attend(qq, kk, vv, ctx.mask ? rest[0] : null, ctx.cuSeqlens ? rest[ctx.mask ? 1 : 0] : null);
  return checkpoint(run, q, k, v, ...extra);
}

/** Megatron's SelfAttention with the TE layer spec: `linear_qkv`, `q_layernorm`, `k_layernorm`, `linear_proj`. */
export class SelfAttention extends Module {
  readonly linearQkv: LayerNormColumnParallelLinear;
  readonly qLayernorm: Norm | null;
  readonly kLayernorm: Norm | null;
  readonly linearProj: RowParallelLinear;
  readonly headsPerRank: number;
  readonly groupsPerRank: number;
  readonly headDim: number;

  constructor(
    o: LayerBuildOptions,
    readonly layerNumber: number,
  ) {
    super();
    const c = o.config;
    const tp = o.tpGroup.size;
    this.headDim = c.kvChannels;
    this.headsPerRank = c.numAttentionHeads / tp;
    this.groupsPerRank = c.numQueryGroups / tp;
    const common = {
      tpGroup: o.tpGroup,
      generator: o.generator,
      dtype: o.dtype,
      sequenceParallel: o.sequenceParallel,
      performInitialization: o.performInitialization,
    };
    this.linearQkv = this.registerModule(
      'linear_qkv',
      new LayerNormColumnParallelLinear(
        c.hiddenSize,
        (c.numAttentionHeads + 2 * c.numQueryGroups) * c.kvChannels,
        {
          ...common,
          initMethod: o.initMethod,
          bias: c.addQkvBias,
          partition: 'qkv',
          qkvDims: { numHeads: c.numAttentionHeads, numQueryGroups: c.numQueryGroups, headDim: c.kvChannels },
          normalization: c.normalization,
          eps: c.layernormEpsilon,
          zeroCenteredGamma: o.family.zeroCenteredGamma,
        },
      ),
    );
    this.qLayernorm = c.qkLayernorm
      ? this.registerModule(
          'q_layernorm',
          new Norm(c.kvChannels, c.normalization, c.layernormEpsilon, o.dtype, o.family.zeroCenteredGamma),
        )
      : null;
    this.kLayernorm = c.qkLayernorm
      ? this.registerModule(
          'k_layernorm',
          new Norm(c.kvChannels, c.normalization, c.layernormEpsilon, o.dtype, o.family.zeroCenteredGamma),
        )
      : null;
    this.linearProj = this.registerModule(
      'linear_proj',
      new RowParallelLinear(c.numAttentionHeads * c.kvChannels, c.hiddenSize, {
        ...common,
        initMethod: o.outputInitMethod,
        bias: false,
        inputIsParallel: true,
      }),
    );
  }

  /**
   * x [s, b, h] (sequence-parallel: [s/tp, b, h]) -> [s, b, h] (or [s/tp, b, h]). With `residual`
   * (the output's shape) the output is residual + attention's output, added by linear_proj (in its
   * GEMM where it can: RowParallelLinear).
   */
  forward(x: Tensor, ctx: AttentionContext, residual?: Tensor): Tensor {
    const d = this.headDim;
    const g = this.groupsPerRank;
    const perGroup = this.headsPerRank / g;
    const qkv = this.linearQkv.forward(x).output; // [s, b, g·(perGroup + 2)·d]
    const [s, b] = qkv.shape;
    const grouped = qkv.view(s, b, g, (perGroup + 2) * d);
    // one split (its backward writes the three gradients into one buffer, no zeros and sums)
    const [qg, kg, vg] = grouped.split([perGroup * d, d, d], 3);
    let q: Tensor;
    let k = kg; // [s, b, g, d]
    if (this.qLayernorm) {
      // [s, b, heads, d] -> [b, heads, s, d]
      q = this.headNorm(this.qLayernorm, qg.reshape(s, b, g * perGroup, d));
      q = applyRotaryPosEmb(q.permute(1, 2, 0, 3), ctx.cos, ctx.sin);
    } else if (ctx.cos.ndim === 2 || ctx.cos.shape[0] === 1) {
      // one table for every row (position ids [1, s], or [s]):
      // RoPE reads q where the projection wrote it, seen as [b·g, perGroup, s, d] (b and g merge
      // in that layout; the heads of a group do not merge with g), and writes [b, heads, s, d]
      const q5 = qg
        .view(s, b, g, perGroup, d)
        .permute(1, 2, 3, 0, 4)
        .reshape(b * g, perGroup, s, d);
      q = applyRotaryPosEmb(q5, ctx.cos, ctx.sin).view(b, g * perGroup, s, d);
    } else {
      q = applyRotaryPosEmb(qg.reshape(s, b, g * perGroup, d).permute(1, 2, 0, 3), ctx.cos, ctx.sin);
    }
    if (this.kLayernorm) k = this.headNorm(this.kLayernorm, k);
    k = applyRotaryPosEmb(k.permute(1, 2, 0, 3), ctx.cos, ctx.sin);
    // v as a view: the attention kernels take any strides (a cache or the ring gets its own copy)
    let v = vg.permute(1, 2, 0, 3);
    if (ctx.cache || (ctx.cpGroup && ctx.cpGroup.size > 1)) v = v.contiguous();
    if (ctx.cache) [k, v] = ctx.cache.appendKv(this.layerNumber, k, v);
    const at = { layer: this.layerNumber, headOffset: this.linearProj.tpGroup.rank * this.headsPerRank };
    const out = coreAttention(q, k, v, ctx, 1 / Math.sqrt(d), at); // [b, heads, s, d]
    const merged = out.permute(2, 0, 1, 3).reshape(s, b, this.headsPerRank * d);
    return this.linearProj.forward(merged, residual).output;
  }

  /**
   * A q/k norm over each local head [..., d]. Its weight is shared by the heads of every TP rank,
   * so the norm runs (its own forward) on the weight entered through the TP copy region: backward
   * sums the weight's gradient over TP, as one process computes it (Megatron instead all-reduces
   * q/k layernorm grads in finalize_model_grads).
   */
  private headNorm(norm: Norm, x: Tensor): Tensor {
    const tp = this.linearProj.tpGroup;
    if (tp.size === 1) return norm.forward(x);
    const shared: Norm = Object.assign(Object.create(norm), {
      weight: copyToTensorModelParallelRegion(norm.weight, tp),
      bias: norm.bias && copyToTensorModelParallelRegion(norm.bias, tp),
    });
    return shared.forward(x);
  }
}
