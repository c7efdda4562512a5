// Bit-exact reimplementation of the parts of numpy's legacy `numpy.random.RandomState` that
// Megatron-LM's dataset index builders use. Megatron shuffles its document and sample indices with
// `RandomState(seed).shuffle`, so reproducing Megatron's sample order requires reproducing numpy's
// MT19937 stream, its bounded-integer rejection sampler and its Fisher–Yates loop exactly.
import { DataError } from './errors.js';

/** 1-D numeric typed arrays that `NumpyRandomState.shuffle` can permute in place. */
export type ShuffleableArray =
  | Int8Array
  | Uint8Array
  | Int16Array
  | Uint16Array
  | Int32Array
  | Uint32Array
  | Float32Array
  | Float64Array;

const N = 624;
const M = 397;
const MATRIX_A = 0x9908b0df;
const UPPER_MASK = 0x80000000;
const LOWER_MASK = 0x7fffffff;
const TWO_POW_32 = 4294967296;

/** numpy's legacy `RandomState(seed)`: MT19937 seeded with init_genrand, plus `shuffle` and `random_sample`. */
export class NumpyRandomState {
  private readonly key = new Uint32Array(N);
  private pos = N;

  /** Seeds like `numpy.random.RandomState(seed)` with an integer seed in [0, 2^32 - 1]. */
  constructor(seed: number) {
    if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `NumpyRandomState seed must be an integer in [0, 2^32 - 1] (numpy rejects others), got ${seed}`,
      );
    }
    // Knuth's multiplicative initialiser (MT19937 init_genrand), which numpy uses for integer seeds.
    let s = seed >>> 0;
    for (let i = 0; i < N; i++) {
      this.key[i] = s;
      s = (Math.imul(1812433253, (s ^ (s >>> 30)) >>> 0) + i + 1) >>> 0;
    }
    this.pos = N;
  }

  /** Regenerates the 624-word state block (the MT19937 "twist"). */
  private twist(): void {
    const k = this.key;
    let i = 0;
    for (; i < N - M; i++) {
      const y = (k[i] & UPPER_MASK) | (k[i + 1] & LOWER_MASK);
      k[i] = k[i + M] ^ (y >>> 1) ^ (y & 1 ? MATRIX_A : 0);
    }
    for (; i < N - 1; i++) {
      const y = (k[i] & UPPER_MASK) | (k[i + 1] & LOWER_MASK);
      k[i] = k[i + (M - N)] ^ (y >>> 1) ^ (y & 1 ? MATRIX_A : 0);
    }
    const y = (k[N - 1] & UPPER_MASK) | (k[0] & LOWER_MASK);
    k[N - 1] = k[M - 1] ^ (y >>> 1) ^ (y & 1 ? MATRIX_A : 0);
    this.pos = 0;
  }

  /** Next raw 32-bit output as an unsigned number (numpy's `next_uint32`). */
  nextUint32(): number {
    if (this.pos >= N) this.twist();
    let y = this.key[this.pos++];
    // Tempering.
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  /** Uniform double in [0, 1) from 53 random bits, as numpy's legacy `random_sample`. */
  randomSample(): number {
    const a = this.nextUint32() >>> 5;
    const b = this.nextUint32() >>> 6;
    return (a * 67108864 + b) / 9007199254740992;
  }

  /**
   * Uniform integer in [0, max] by numpy's legacy masked rejection (`random_interval`): 32-bit
   * draws when max fits in 32 bits, otherwise 64-bit draws (high word first).
   */
  randomInterval(max: number): number {
    if (!Number.isSafeInteger(max) || max < 0) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `randomInterval max must be a safe non-negative integer, got ${max}`,
      );
    }
    if (max === 0) return 0;
    if (max <= 0xffffffff) {
      // Smallest all-ones mask covering max.
      let mask = max >>> 0;
      mask |= mask >>> 1;
      mask |= mask >>> 2;
      mask |= mask >>> 4;
      mask |= mask >>> 8;
      mask |= mask >>> 16;
      mask >>>= 0;
      for (;;) {
        const v = (this.nextUint32() & mask) >>> 0;
        if (v <= max) return v;
      }
    }
    // max < 2^53 here, so the mask is 2^k - 1 with 32 < k <= 53: split it into high and low words.
    let maskHi = Math.floor(max / TWO_POW_32);
    maskHi |= maskHi >>> 1;
    maskHi |= maskHi >>> 2;
    maskHi |= maskHi >>> 4;
    maskHi |= maskHi >>> 8;
    maskHi |= maskHi >>> 16;
    for (;;) {
      const hi = this.nextUint32();
      const lo = this.nextUint32();
      const v = (hi & maskHi) * TWO_POW_32 + lo;
      if (v <= max) return v;
    }
  }

  /** Shuffles a 1-D typed array in place exactly like numpy's legacy `RandomState.shuffle`. */
  shuffle(array: ShuffleableArray): void {
    // Fisher–Yates from the last element down to index 1, swapping i with randomInterval(i).
    for (let i = array.length - 1; i >= 1; i--) {
      const j = this.randomInterval(i);
      const t = array[i];
      array[i] = array[j];
      array[j] = t;
    }
  }
}
