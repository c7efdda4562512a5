// Multi-head latent attention (DeepSeek-V2/V3, Moonlight): queries through an optional low-rank
// down/up projection, keys and values from a compressed latent shared by all heads, and a decoupled
// rotary part of the key shared across heads. Megatron-Core names: linear_q_proj or
// linear_q_down_proj + linear_q_up_proj (with the q LoRA norm fused), linear_kv_down_proj,
// linear_kv_up_proj (with the latent norm fused), linear_proj.
// Under sequence parallelism the input is this TP rank's chunk [s/tp, b, h]: the replicated
// down-projections run on it (their gradients summed over TP), the q projection gathers the
// sequence like GQA's linear_qkv, the kv latent and rope key are gathered after the
// down-projection, as Megatron does, and linear_proj reduce-scatters back to the chunk.
import {
  ColumnParallelLinear,
  copyToTensorModelParallelRegion,
  gatherFromSequenceParallelRegion,
  LayerNormColumnParallelLinear,
  RowParallelLinear,
  setSequenceParallelAttribute,
} from '@megapatch/parallel';
import {
  applyRotaryPosEmb,
  cat,
  checkpoint,
  initMethodNormal,
  Linear,
  Module,
  type Tensor,
  zeros_,
} from '@megapatch/tensor';
import { coreAttention, type LayerBuildOptions } from './attention.js';
import type { AttentionContext } from './context.js';
import { ModelError } from './errors.js';
import { yarnMscale } from './rope.js';

/**
 * DeepSeek's checkpoints store the rotary channels of q and k interleaved (pairs (2i, 2i+1)); its
 * RoPE first moves them to the rotate-half layout: [b, h, s, r] -> the even channels, then the odd.
 */
function deinterleave(x: Tensor): Tensor {
  const [b, h, s, r] = x.shape;
  return x
    .reshape(b, h, s, r / 2, 2)
    .transpose(3, 4)
    .reshape(b, h, s, r);
}

/** Megatron's MLASelfAttention. */
export class MLASelfAttention extends Module {
  readonly linearQProj: ColumnParallelLinear | null;
  readonly linearQDownProj: Linear | null;
  readonly linearQUpProj: LayerNormColumnParallelLinear | null;
  readonly linearKvDownProj: Linear;
  readonly linearKvUpProj: LayerNormColumnParallelLinear;
  readonly linearProj: RowParallelLinear;
  readonly headsPerRank: number;
  readonly softmaxScale: number;
  private readonly nope: number;
  private readonly rope: number;
  private readonly vDim: number;
  private readonly kvRank: number;

  constructor(
    o: LayerBuildOptions,
    readonly layerNumber: number,
  ) {
    super();
    const c = o.config;
    const m = c.mla;
    if (!m) throw new ModelError('INVALID_CONFIG', 'MLASelfAttention needs config.mla');
    const tp = o.tpGroup.size;
    if (c.numAttentionHeads % tp !== 0) {
      throw new ModelError(
        'INVALID_CONFIG',
        `numAttentionHeads ${c.numAttentionHeads} is not divisible by TP ${tp}`,
      );
    }
    this.headsPerRank = c.numAttentionHeads / tp;
    this.nope = m.qkNopeHeadDim;
    this.rope = m.qkRopeHeadDim;
    this.vDim = m.vHeadDim;
    this.kvRank = m.kvLoraRank;
    const qHead = m.qkNopeHeadDim + m.qkRopeHeadDim;
    let scale = 1 / Math.sqrt(qHead);
    const rs = c.ropeScaling;
    if (rs.type === 'yarn' && rs.mscaleAllDim) {
      const ms = yarnMscale(rs.factor, rs.mscaleAllDim);
      scale *= ms * ms;
    }
    this.softmaxScale = scale;
    const common = {
      tpGroup: o.tpGroup,
      generator: o.generator,
      dtype: o.dtype,
      performInitialization: o.performInitialization,
      initMethod: o.initMethod,
      bias: false,
    };
    // the projections that take the layer's input (and linear_proj) follow sequence parallelism
    const spCommon = { ...common, sequenceParallel: o.sequenceParallel };
    const h = c.hiddenSize;
    // Megatron builds the down-projections duplicated on every TP rank.
    const replicated = (inF: number, outF: number) => {
      const lin = new Linear(inF, outF, {
        bias: false,
        dtype: o.dtype,
        generator: o.generator,
        initMethod: o.performInitialization ? (o.initMethod ?? initMethodNormal(0.02)) : zeros_,
      });
      if (o.sequenceParallel) for (const p of lin.parameters()) setSequenceParallelAttribute(p);
      return lin;
    };
    if (m.qLoraRank === null) {
      this.linearQProj = this.registerModule(
        'linear_q_proj',
        new ColumnParallelLinear(h, c.numAttentionHeads * qHead, spCommon),
      );
      this.linearQDownProj = null;
      this.linearQUpProj = null;
    } else {
      this.linearQProj = null;
      this.linearQDownProj = this.registerModule('linear_q_down_proj', replicated(h, m.qLoraRank));
      this.linearQUpProj = this.registerModule(
        'linear_q_up_proj',
        new LayerNormColumnParallelLinear(m.qLoraRank, c.numAttentionHeads * qHead, {
          ...spCommon,
          normalization: c.normalization,
          eps: c.layernormEpsilon,
          zeroCenteredGamma: o.family.zeroCenteredGamma,
        }),
      );
    }
    this.linearKvDownProj = this.registerModule(
      'linear_kv_down_proj',
      replicated(h, m.kvLoraRank + m.qkRopeHeadDim),
    );
    this.linearKvUpProj = this.registerModule(
      'linear_kv_up_proj',
      new LayerNormColumnParallelLinear(m.kvLoraRank, c.numAttentionHeads * (m.qkNopeHeadDim + m.vHeadDim), {
        ...common,
        normalization: c.normalization,
        eps: c.layernormEpsilon,
        zeroCenteredGamma: o.family.zeroCenteredGamma,
      }),
    );
    this.linearProj = this.registerModule(
      'linear_proj',
      new RowParallelLinear(c.numAttentionHeads * m.vHeadDim, h, {
        ...spCommon,
        initMethod: o.outputInitMethod,
        inputIsParallel: true,
      }),
    );
  }

  /** Queries [b, heads, s, nope + rope] (rope part rotated) from x [s, b, h] ([s/tp, b, h] under SP). */
  private queries(x: Tensor, s: number, ctx: AttentionContext): Tensor {
    const b = x.shape[1];
    const up = (xx: Tensor) =>
      this.linearQProj
        ? this.linearQProj.forward(xx).output
        : (this.linearQUpProj as LayerNormColumnParallelLinear).forward(
            (this.linearQDownProj as Linear).forward(xx),
          ).output;
    const q = (ctx.recomputeMlaUpProj ? checkpoint(up, x) : up(x))
      .view(s, b, this.headsPerRank, this.nope + this.rope)
      .permute(1, 2, 0, 3);
    const qNope = q.narrow(3, 0, this.nope);
    const qPe = applyRotaryPosEmb(
      deinterleave(q.narrow(3, this.nope, this.rope).contiguous()),
      ctx.cos,
      ctx.sin,
    );
    return cat([qNope, qPe], 3);
  }

  /** x [s, b, h] -> [s, b, h] (both [s/tp, b, h] under sequence parallelism). */
  /** x [s, b, h] -> [s, b, h]; with `residual` ([s, b, h]) the output is residual + attention's output. */
  forward(x: Tensor, ctx: AttentionContext, residual?: Tensor): Tensor {
    const tp = this.linearProj.tpGroup;
    const sp = this.linearProj.sequenceParallel;
    const s = x.shape[0] * (sp ? tp.size : 1);
    const b = x.shape[1];
    const q = this.queries(x, s, ctx);
    let kv = this.linearKvDownProj.forward(x); // [s, b, kvRank + rope]
    // Every use of the gathered latent and rope key holds the whole gradient on each rank (the
    // up-projection's and the copy region's all-reduce), so the gather's backward keeps this
    // rank's rows.
    if (sp) kv = gatherFromSequenceParallelRegion(kv, false, tp);
    let latent = kv.narrow(2, 0, this.kvRank).permute(1, 0, 2).contiguous(); // [b, s, kvRank]
    // The shared rope key feeds every local head: its gradient is summed over the TP ranks.
    const kPeRaw = copyToTensorModelParallelRegion(kv.narrow(2, this.kvRank, this.rope), tp);
    let kPe = applyRotaryPosEmb(
      deinterleave(kPeRaw.permute(1, 0, 2).unsqueeze(1).contiguous()),
      ctx.cos,
      ctx.sin,
    ); // [b, 1, s, rope]
    if (ctx.cache) [latent, kPe] = ctx.cache.appendLatent(this.layerNumber, latent, kPe);
    const sk = latent.shape[1];
    const upKv = (l: Tensor) => this.linearKvUpProj.forward(l).output;
    const kvUp = (ctx.recomputeMlaUpProj ? checkpoint(upKv, latent) : upKv(latent))
      .view(b, sk, this.headsPerRank, this.nope + this.vDim)
      .permute(0, 2, 1, 3); // [b, heads, sk, nope + v]
    const kNope = kvUp.narrow(3, 0, this.nope);
    const v = kvUp.narrow(3, this.nope, this.vDim).contiguous();
    const k = cat([kNope, kPe.expand(b, this.headsPerRank, sk, this.rope)], 3);
    const at = { layer: this.layerNumber, headOffset: this.linearProj.tpGroup.rank * this.headsPerRank };
    const out = coreAttention(q, k, v, ctx, this.softmaxScale, at); // [b, heads, s, v]
    const merged = out.permute(2, 0, 1, 3).reshape(s, b, this.headsPerRank * this.vDim);
    return this.linearProj.forward(merged, residual).output;
  }
}
