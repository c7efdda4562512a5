// What every attention layer of one forward pass shares: the rotary tables, the mask, packed
// sequence boundaries and, during generation, the KV cache.
import type { ProcessGroup } from '@megapatch/parallel';
import { checkpoint, type Tensor } from '@megapatch/tensor';
import type { LayoutDropout } from './dropout.js';
import type { KVCache } from './kv-cache.js';

/** Per-forward inputs of the attention layers, built once by the model. */
export interface AttentionContext {
  /** cos/sin [b, s, rotaryDim], or [1, s, rotaryDim] for every row alike (float32), for the new tokens. */
  cos: Tensor;
  sin: Tensor;
  /** Boolean mask [b, 1, sq, sk] (true = attend) when causality alone does not describe it. */
  mask: Tensor | null;
  /** Causal with queries and keys aligned at the start (training, no cache). */
  causal: boolean;
  /** Packed sequences (b = 1): cumulative boundaries [nseq + 1]. */
  cuSeqlens: Tensor | null;
  /**
   * The same boundaries on the host, when the caller gave them as numbers or context parallelism
   * needs them (the ring's plan): read back at most once a forward. Null otherwise.
   */
  cuSeqlensValues: readonly number[] | null;
  /**
   * Context parallelism: the group sharing each sequence (each rank holds its two load-balanced
   * chunks; core attention runs as a ring), or null.
   */
  cpGroup: ProcessGroup | null;
  /**
   * How core attention crosses the cp group: 'p2p' (default) a ring of key/value exchanges,
   * 'a2a' two all-to-alls that give each rank cp-th of the heads over whole sequences (Megatron's
   * --cp-comm-type).
   */
  cpCommType?: 'p2p' | 'a2a';
  /** Generation: the cache to read from and append to, and the layer's slot in it. */
  cache: KVCache | null;
  /** Selective recompute of the core attention (its inputs are kept, its internals recomputed). */
  recomputeCoreAttention: boolean;
  /** Selective recompute of MLA's up-projections. */
  recomputeMlaUpProj: boolean;
  /** This forward's dropout (training mode with a rate above 0), else null or absent. */
  dropout?: LayoutDropout | null;
}

/**
 * Runs fn(x, ctx) under activation recompute: the context's tensors travel as inputs of the
 * checkpoint, so the recomputation in backward still holds them after the forward has freed its
 * own references.
 */
export function checkpointWithContext(
  fn: (x: Tensor, ctx: AttentionContext) => Tensor,
  x: Tensor,
  ctx: AttentionContext,
): Tensor {
  const extra = [
    ctx.cos,
    ctx.sin,
    ...(ctx.mask ? [ctx.mask] : []),
    ...(ctx.cuSeqlens ? [ctx.cuSeqlens] : []),
  ];
  return checkpoint(
    (xx, cos, sin, ...rest) =>
      fn(xx, {
        ...ctx,
        cos,
        sin,
        mask: ctx.mask ? rest[0] : null,
        cuSeqlens: ctx.cuSeqlens ? rest[ctx.mask ? 1 : 0] : null,
      }),
    x,
    ...extra,
  );
}
