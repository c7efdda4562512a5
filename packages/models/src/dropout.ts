// Dropout whose masks do not depend on the parallel layout (Megatron's --hidden-dropout and
// --attention-dropout). Each mask element is one Philox draw addressed by what it drops, not by
// who draws it: the key mixes the seed, the layer, the site and the row's id (the trainer gives
// each sample's index in the run), and the counter is the element's place in its row (the token's
// index in the whole sequence, the head's index among all heads). So one process, any tensor,
// sequence, context, pipeline or data-parallel layout, a recomputed layer and a run resumed in
// another layout all drop the same elements, and the losses stay those of one process.
// Megatron instead draws from per-rank generator states (its RNG tracker), whose masks change
// with the layout.
import { cat, Generator, noGrad, rand, stack, type Tensor, tidy } from '@megapatch/tensor';
import { ModelError } from './errors.js';

/** Where a forward's dropout masks come from (GPTForwardOptions.dropout). */
export interface DropoutKeys {
  /** Seed of every mask (the trainer: Megatron's --seed). */
  seed: number | bigint;
  /**
   * An id of each row of the batch, unique over the run (the trainer: each sample's index in the
   * order the run reads them, the same on every layout).
   */
  rowIds: readonly number[];
}

/** The places a mask is drawn for: the embedding, the attention probabilities, the two residual branches. */
export type DropoutSite = 'embedding' | 'attention' | 'attention-output' | 'mlp-output';

const SITES: Record<DropoutSite, bigint> = {
  embedding: 0n,
  attention: 1n,
  'attention-output': 2n,
  'mlp-output': 3n,
};

const MASK64 = (1n << 64n) - 1n;

/** SplitMix64's finaliser: a 64-bit mix in which every input bit changes about half the output bits. */
function mix64(v: bigint): bigint {
  let x = (v + 0x9e3779b97f4a7c15n) & MASK64;
  x = ((x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  x = ((x ^ (x >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return x ^ (x >> 31n);
}

/** The Philox key of one (layer, site, row): seed, layer, site and row mixed in turn. */
export function dropoutKey(seed: bigint, layer: number, site: DropoutSite, row: number): bigint {
  const at = mix64(mix64(seed) ^ BigInt(layer * 4) ^ SITES[site]);
  return mix64(at ^ BigInt(row));
}

/**
 * Keep multipliers [slots.length, width] (0 = dropped, else 1/(1-p)) in `dtype` on `device`:
 * element (t, j) is draw j of the Philox stream `key` from counter block slots[t]·⌈width/4⌉, so a
 * row of the mask depends on its slot only. Consecutive slots are drawn in one call.
 */
export function keepMask(
  key: bigint,
  slots: readonly number[],
  width: number,
  p: number,
  like: { dtype: Tensor['dtype']; device: string },
): Tensor {
  const blocks = Math.ceil(width / 4);
  const scale = p >= 1 ? 0 : 1 / (1 - p);
  return noGrad(() =>
    tidy(() => {
      const parts: Tensor[] = [];
      for (let i = 0; i < slots.length; ) {
        let n = 1;
        while (i + n < slots.length && slots[i + n] === slots[i] + n) n++;
        const g = new Generator(key);
        g.setState({ seed: key.toString(), offset: (BigInt(slots[i]) * BigInt(blocks)).toString() });
        const u = rand([n, 4 * blocks], { generator: g, device: like.device });
        parts.push(
          u
            .narrow(1, 0, width)
            .lt(1 - p)
            .to(like.dtype)
            .mul(scale),
        );
        i += n;
      }
      return parts.length === 1 ? parts[0].contiguous() : cat(parts, 0);
    }),
  );
}

/**
 * One forward's dropout: the rates, the keys and where this rank's tokens sit in their rows. Built
 * by GPTModel in training mode when a rate is above 0, shared by every layer through the context.
 */
export class LayoutDropout {
  private readonly seed: bigint;
  private readonly rowIds: readonly number[];

  /**
   * @param slots the index in the whole row of each token of this rank's sequence (0..s-1, or the
   *   two chunks of each sequence under context parallelism), before the sequence-parallel split
   * @param sp the sequence-parallel rank and size (the hidden states hold chunk `rank` of `slots`)
   * @param rowLength the whole row's tokens (slots.length × cp)
   */
  constructor(
    readonly hiddenDropout: number,
    readonly attentionDropout: number,
    keys: DropoutKeys,
    private readonly slots: readonly number[],
    private readonly sp: { rank: number; size: number },
    private readonly rowLength: number = slots.length,
  ) {
    this.seed = BigInt.asUintN(64, BigInt(keys.seed));
    this.rowIds = keys.rowIds;
  }

  /** Hidden dropout of x [s, b, h] ([s/tp, b, h] under sequence parallelism) at (layer, site). */
  hidden(x: Tensor, layer: number, site: DropoutSite): Tensor {
    const p = this.hiddenDropout;
    if (p === 0) return x;
    const [s, b, h] = x.shape;
    const slots =
      s === this.slots.length ? this.slots : this.slots.slice(this.sp.rank * s, (this.sp.rank + 1) * s);
    if (slots.length !== s || b !== this.rowIds.length) {
      throw new ModelError(
        'SHAPE_MISMATCH',
        `hidden dropout: hidden states [${x.shape}] do not match the forward's ${this.slots.length} tokens and ${this.rowIds.length} rows`,
      );
    }
    const mask = noGrad(() =>
      tidy(() => {
        const rows = this.rowIds.map((r) => keepMask(dropoutKey(this.seed, layer, site, r), slots, h, p, x));
        return b === 1 ? rows[0].unsqueeze(1) : stack(rows, 1); // [s, b, h]
      }),
    );
    try {
      return x.mul(mask);
    } finally {
      mask.dispose();
    }
  }

  /**
   * Multipliers [b, heads, s, S] of the attention probabilities of this rank's queries against
   * every key of the whole row (S its length; s = S without context parallelism), for `heads` heads
   * starting at global head `headOffset`: query row i of head g draws from counter block
   * (g·S + slot_i)·⌈S/4⌉ of the row's key, one draw per key.
   */
  attentionMask(
    layer: number,
    headOffset: number,
    heads: number,
    like: { dtype: Tensor['dtype']; device: string },
  ): Tensor {
    const s = this.rowLength;
    const p = this.attentionDropout;
    return noGrad(() =>
      tidy(() => {
        const rows = this.rowIds.map((r) => {
          const key = dropoutKey(this.seed, layer, 'attention', r);
          const perHead: Tensor[] = [];
          for (let h = 0; h < heads; h++) {
            const g = headOffset + h;
            perHead.push(
              keepMask(
                key,
                this.slots.map((t) => g * s + t),
                s,
                p,
                like,
              ),
            );
          }
          return stack(perHead, 0); // [heads, s, s]
        });
        return stack(rows, 0);
      }),
    );
  }
}

/**
 * The index in its whole row of each of this rank's tokens when the inputs are its
 * context-parallel chunks (contextParallelSplit: chunks r and 2·cp-1-r of every sequence, or of
 * every packed sample with local boundaries `cuSeqlens`), else 0..s-1.
 */
export function tokenSlots(
  s: number,
  cp: { rank: number; size: number } | null,
  cuSeqlens: readonly number[] | null,
): number[] {
  if (!cp || cp.size === 1) return Array.from({ length: s }, (_, i) => i);
  const chunks = 2 * cp.size;
  const samples = cuSeqlens ?? [0, s];
  const out: number[] = [];
  for (let i = 0; i + 1 < samples.length; i++) {
    const local = samples[i + 1] - samples[i];
    const c = local / 2; // each rank holds two chunks of every sample
    const start = samples[i] * cp.size; // where the sample starts in the whole row
    for (const chunk of [cp.rank, chunks - 1 - cp.rank]) {
      for (let j = 0; j < c; j++) out.push(start + chunk * c + j);
    }
  }
  return out;
}
