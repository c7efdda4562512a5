// The KV cache of generation: per layer, the keys and values of every token seen so far (grouped
// heads, after RoPE) or, for MLA, the normalised compressed latent and the rotated shared rope key,
// from which keys and values are re-expanded. Storage is preallocated to a capacity and owned by
// the cache: dispose() frees it.
import { cat, empty, keep, noGrad, type Tensor } from '@megapatch/tensor';
import { ModelError } from './errors.js';

interface Slot {
  a: Tensor; // k [b, hkv, cap, d] | latent [b, cap, r]
  b: Tensor; // v [b, hkv, cap, dv] | kPe [b, 1, cap, rope]
}

/** Cached keys/values for `batch` rows of up to `capacity` tokens. */
export class KVCache implements Disposable {
  /** Tokens cached so far (the same for every layer once a forward completes). */
  length = 0;
  private readonly slots = new Map<number, Slot>();
  private pending = 0;

  constructor(
    readonly batch: number,
    readonly capacity: number,
  ) {
    if (!(Number.isInteger(capacity) && capacity > 0)) {
      throw new ModelError(
        'INVALID_ARGUMENT',
        `KVCache capacity must be a positive integer, got ${capacity}`,
      );
    }
  }

  /** Checks that `n` new tokens fit; called by the model before a forward. */
  reserve(n: number): void {
    if (this.length + n > this.capacity) {
      throw new ModelError(
        'INVALID_INPUT',
        `the KV cache holds ${this.capacity} tokens; ${this.length} are cached and ${n} more do not fit`,
      );
    }
    this.pending = n;
  }

  /** Called by the model after every layer appended its tokens. */
  commit(): void {
    this.length += this.pending;
    this.pending = 0;
  }

  private store(layer: number, x: Tensor, y: Tensor, dim: number): [Tensor, Tensor] {
    let slot = this.slots.get(layer);
    const shapeA = [...x.shape];
    const shapeB = [...y.shape];
    shapeA[dim] = this.capacity;
    shapeB[2] = this.capacity;
    if (!slot) {
      // owned by the cache, not by the tidy scope of the forward that created it
      slot = { a: keep(empty(shapeA, { dtype: x.dtype })), b: keep(empty(shapeB, { dtype: y.dtype })) };
      this.slots.set(layer, slot);
    }
    const n = x.shape[dim];
    const s = slot;
    noGrad(() => {
      s.a.narrow(dim, this.length, n).copy_(x.detach());
      s.b.narrow(2, this.length, n).copy_(y.detach());
    });
    // The new tokens keep their autograd history; the cached part is constant.
    if (this.length === 0) return [x, y];
    return [cat([s.a.narrow(dim, 0, this.length), x], dim), cat([s.b.narrow(2, 0, this.length), y], 2)];
  }

  /** Appends k [b, hkv, n, d] and v [b, hkv, n, dv]; returns all cached keys and values. */
  appendKv(layer: number, k: Tensor, v: Tensor): [Tensor, Tensor] {
    return this.store(layer, k, v, 2);
  }

  /** Appends the latent [b, n, r] and rope key [b, 1, n, rope]; returns all cached ones. */
  appendLatent(layer: number, latent: Tensor, kPe: Tensor): [Tensor, Tensor] {
    return this.store(layer, latent, kPe, 1);
  }

  /** Frees the cache's storage. */
  dispose(): void {
    for (const s of this.slots.values()) {
      s.a.dispose();
      s.b.dispose();
    }
    this.slots.clear();
    this.length = 0;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
