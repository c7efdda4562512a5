// Rotary position embeddings of every TransformerConfig: plain, linear, llama3, yarn and longrope
// scaling, with tables computed in fp32 as Hugging Face computes them, so a converted model rotates
// its queries and keys exactly as the original does.
import type { RopeScaling } from '@megapatch/convert';
import { embedding, fromTypedArray, keep, ropeCosSin, type Tensor } from '@megapatch/tensor';
import { ModelError } from './errors.js';

const f = Math.fround;

/** Yarn's attention temperature: 0.1·mscale·ln(factor) + 1 for factor > 1, else 1. */
export function yarnMscale(factor: number, mscale = 1): number {
  return factor <= 1 ? 1 : 0.1 * mscale * Math.log(factor) + 1;
}

/** Yarn's frequencies: interpolated below the correction range, extrapolated above it, blended in between. */
function yarnInverseFrequencies(dim: number, base: number, s: Extract<RopeScaling, { type: 'yarn' }>) {
  const half = dim / 2;
  const correction = (rotations: number) =>
    (dim * Math.log(s.originalMaxPositionEmbeddings / (rotations * 2 * Math.PI))) / (2 * Math.log(base));
  const low = Math.max(Math.floor(correction(s.betaFast)), 0);
  let high = Math.min(Math.ceil(correction(s.betaSlow)), dim - 1);
  if (high === low) high += 0.001;
  const inv = new Float32Array(half);
  for (let k = 0; k < half; k++) {
    const posFreq = f(base ** f((2 * k) / dim));
    const extrapolated = f(1 / posFreq);
    const interpolated = f(1 / f(s.factor * posFreq));
    const ramp = Math.min(Math.max((k - low) / (high - low), 0), 1);
    const keep = f(1 - ramp); // weight of the extrapolated (unscaled) frequency
    inv[k] = f(f(interpolated * f(1 - keep)) + f(extrapolated * keep));
  }
  return inv;
}

/**
 * LongRoPE's frequencies for one factor list: 1 / (factor[k] · base^(2k/dim)), each step in fp32 as
 * transformers' `_compute_longrope_parameters` takes them.
 */
function longropeInverseFrequencies(dim: number, base: number, factors: readonly number[]): Float32Array {
  const inv = new Float32Array(dim / 2);
  for (let k = 0; k < dim / 2; k++) inv[k] = f(1 / f(f(factors[k]) * f(base ** f((2 * k) / dim))));
  return inv;
}

/**
 * cos/sin tables of one model's RoPE; positions are per token, so packed rows restart at 0. The
 * rows of positions 0 .. n-1 are computed once per device on the host (fp32, as before) and copied
 * there; a forward gathers its positions' rows on the device, so it neither reads the positions
 * back nor computes on the host (no synchronisation of a GPU). A row depends on its position only,
 * so the gathered values are the ones computed for those positions directly.
 */
export class RotaryEmbedding {
  /** Factor on cos and sin (yarn's mscale ratio, longrope's attention factor; 1 otherwise). */
  readonly mscale: number;
  /** Frequencies computed here (yarn; longrope's short and long ones), else null. */
  private readonly inv: { plain: Float32Array | null; long: Float32Array | null };
  /** Per device (and longrope's `long` variant): the rows of positions [0, rows), owned here (see dispose). */
  private readonly tables = new Map<string, { rows: number; cos: Tensor; sin: Tensor }>();

  constructor(
    readonly dim: number,
    readonly base: number,
    readonly scaling: RopeScaling,
  ) {
    if (!Number.isInteger(dim) || dim <= 0 || dim % 2 !== 0) {
      throw new ModelError(
        'INVALID_CONFIG',
        `the rotary dimension must be a positive even integer, got ${dim}`,
      );
    }
    if (scaling.type === 'yarn') {
      this.inv = { plain: yarnInverseFrequencies(dim, base, scaling), long: null };
      this.mscale =
        yarnMscale(scaling.factor, scaling.mscale) / yarnMscale(scaling.factor, scaling.mscaleAllDim);
    } else if (scaling.type === 'longrope') {
      for (const [name, list] of [
        ['shortFactor', scaling.shortFactor],
        ['longFactor', scaling.longFactor],
      ] as const) {
        if (list.length !== dim / 2) {
          throw new ModelError(
            'INVALID_CONFIG',
            `longrope's ${name} has ${list.length} entries; a rotary dimension of ${dim} needs ${dim / 2}`,
          );
        }
      }
      this.inv = {
        plain: longropeInverseFrequencies(dim, base, scaling.shortFactor),
        long: longropeInverseFrequencies(dim, base, scaling.longFactor),
      };
      this.mscale = scaling.attentionFactor;
    } else {
      this.inv = { plain: null, long: null };
      this.mscale = 1;
    }
  }

  /**
   * cos/sin [b, s, dim] (float32, rotate-half layout) for integer positions [b, s] (or [s]),
   * every position below `rows` (the table holds at least that many positions on their device; a
   * position outside it is the gather's deferred index error). Without `rows` the positions are
   * read to find their largest. `context` is the largest position + 1 when the caller knows it
   * exactly: longrope takes its long factors when that exceeds the original context, as
   * transformers does for each forward; where it is not known the positions are read for it.
   */
  forward(positionIds: Tensor, rows?: number, context?: number | null): { cos: Tensor; sin: Tensor } {
    // without `rows`, the largest position read from the ids (a wait on an asynchronous device)
    const need = rows ?? maxOf(positionIds) + 1;
    const long =
      this.scaling.type === 'longrope' &&
      this.usesLongFactors(context ?? (rows === undefined ? need : maxOf(positionIds) + 1));
    const t = this.table(positionIds.device, need, long);
    return { cos: embedding(positionIds, t.cos), sin: embedding(positionIds, t.sin) };
  }

  /** Whether a forward whose largest position + 1 is `context` uses longrope's long factors. */
  usesLongFactors(context: number): boolean {
    return this.scaling.type === 'longrope' && context > this.scaling.originalMaxPositionEmbeddings;
  }

  /** The table of `device` with at least `rows` positions (grown by doubling, at least 256). */
  private table(device: string, rows: number, long = false): { rows: number; cos: Tensor; sin: Tensor } {
    const key = long ? `${device}/long` : device;
    const known = this.tables.get(key);
    if (known && known.rows >= rows) return known;
    let n = Math.max(256, known ? known.rows : 0);
    while (n < rows) n *= 2;
    const pos = fromTypedArray(
      BigInt64Array.from({ length: n }, (_, i) => BigInt(i)),
      [n],
      { device: 'cpu' },
    );
    let host: { cos: Tensor; sin: Tensor };
    try {
      host = this.compute(pos, long);
    } finally {
      pos.dispose();
    }
    let made = host;
    if (device !== 'cpu') {
      try {
        made = { cos: host.cos.to(device), sin: host.sin.to(device) };
      } finally {
        host.cos.dispose();
        host.sin.dispose();
      }
    }
    // cached across forwards: no tidy() scope of a caller may free them
    keep(made.cos);
    keep(made.sin);
    if (known) {
      known.cos.dispose();
      known.sin.dispose();
    }
    const entry = { rows: n, cos: made.cos, sin: made.sin };
    this.tables.set(key, entry);
    return entry;
  }

  /** Frees the cached tables (the model's dispose calls it). */
  dispose(): void {
    for (const t of this.tables.values()) {
      t.cos.dispose();
      t.sin.dispose();
    }
    this.tables.clear();
  }

  /** cos/sin [..., dim] for CPU positions, computed on the host (longrope: its long factors or short ones). */
  private compute(positionIds: Tensor, long: boolean): { cos: Tensor; sin: Tensor } {
    const s = this.scaling;
    if (s.type === 'none') return ropeCosSin(positionIds, this.dim, { base: this.base });
    if (s.type === 'linear' || s.type === 'llama3') {
      return ropeCosSin(positionIds, this.dim, { base: this.base, scaling: s });
    }
    const inv = (long ? this.inv.long : this.inv.plain) as Float32Array;
    const pos = positionIds.toTypedArray() as ArrayLike<number | bigint>;
    const n = pos.length;
    const half = this.dim / 2;
    const cos = new Float32Array(n * this.dim);
    const sin = new Float32Array(n * this.dim);
    const m = f(this.mscale);
    for (let i = 0; i < n; i++) {
      const p = f(Number(pos[i]));
      for (let k = 0; k < half; k++) {
        const angle = f(p * inv[k]);
        const c = f(f(Math.cos(angle)) * m);
        const sn = f(f(Math.sin(angle)) * m);
        cos[i * this.dim + k] = c;
        cos[i * this.dim + k + half] = c;
        sin[i * this.dim + k] = sn;
        sin[i * this.dim + k + half] = sn;
      }
    }
    const shape = [...positionIds.shape, this.dim];
    return {
      cos: fromTypedArray(cos, shape, { device: 'cpu' }),
      sin: fromTypedArray(sin, shape, { device: 'cpu' }),
    };
  }
}

function maxOf(ids: Tensor): number {
  const v = ids.toTypedArray() as ArrayLike<number | bigint>;
  let top = -1;
  for (let i = 0; i < v.length; i++) top = Math.max(top, Number(v[i]));
  return top;
}
