// Megatron-LM's BlendedDataset (megatron/core/datasets/blended_dataset.py and
// helpers.cpp::build_blending_indices). Blending is deterministic, not random: every output sample
// goes to the dataset that is furthest behind its weighted share, so the mix is exact at every prefix.
import { DataError } from './errors.js';

/** Normalised weights, as Megatron divides each weight by the sum. */
export function normalizeWeights(weights: readonly number[]): number[] {
  if (weights.length === 0 || weights.some((w) => !Number.isFinite(w) || w < 0)) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `blend weights must be a non-empty list of non-negative numbers, got [${weights.join(', ')}]`,
    );
  }
  const sum = weights.reduce((a, b) => a + b, 0);
  if (sum <= 0)
    throw new DataError('INVALID_ARGUMENT', 'blend weights sum to zero; give at least one positive weight');
  return weights.map((w) => w / sum);
}

/** Blending indices: which dataset each output sample comes from, and which sample of that dataset. */
export interface BlendingIndices {
  /** Dataset id per output sample (int16, as Megatron). */
  datasetIndex: Int16Array;
  /** Sample id inside the chosen dataset (int64 values held in float64). */
  datasetSampleIndex: Float64Array;
}

/** Megatron's greedy blending: sample s goes to argmax_d w_d*max(s,1) - count_d, ties to the lowest d. */
export function buildBlendingIndices(weights: readonly number[], size: number): BlendingIndices {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new DataError('INVALID_ARGUMENT', `blend size must be a non-negative integer, got ${size}`);
  }
  const w = normalizeWeights(weights);
  if (w.length > 32767)
    throw new DataError(
      'INVALID_ARGUMENT',
      `at most 32767 datasets can be blended (int16 ids), got ${w.length}`,
    );
  const counts = new Float64Array(w.length);
  const datasetIndex = new Int16Array(size);
  const datasetSampleIndex = new Float64Array(size);
  for (let s = 0; s < size; s++) {
    // max(s, 1) keeps sample 0 from comparing all-zero errors.
    const sd = Math.max(s, 1);
    let best = 0;
    let bestError = w[0] * sd - counts[0];
    for (let d = 1; d < w.length; d++) {
      const error = w[d] * sd - counts[d];
      // Strictly greater: ties stay with the lower index.
      if (error > bestError) {
        bestError = error;
        best = d;
      }
    }
    datasetIndex[s] = best;
    datasetSampleIndex[s] = counts[best];
    counts[best]++;
  }
  return { datasetIndex, datasetSampleIndex };
}

/** Samples Megatron requests from each child: ceil(ceil(size*w)*(1+surplus)), surplus defaulting to 0.005. */
export function samplesPerDataset(weights: readonly number[], size: number, surplus = 0.005): number[] {
  return normalizeWeights(weights).map((w) => Math.ceil(Math.ceil(size * w) * (1 + surplus)));
}

/** What BlendedDataset needs from a child dataset (GPTDataset satisfies it). */
export interface BlendableDataset<T> {
  /** Number of samples. */
  readonly length: number;
  /** Sample i. */
  getItem(i: number): T;
}

/** A blended sample: the child's sample plus the id of the dataset it came from. */
export type BlendedSample<T> = T & { datasetId: number };

/** Megatron's BlendedDataset over several child datasets with deterministic greedy blending. */
export class BlendedDataset<T extends object> {
  /** The blending indices. */
  readonly indices: BlendingIndices;
  /** The normalised weights. */
  readonly weights: number[];
  private readonly datasets: readonly BlendableDataset<T>[];

  /** Blends `datasets` by `weights` into `size` samples; throws if a child would be oversampled. */
  constructor(datasets: readonly BlendableDataset<T>[], weights: readonly number[], size: number) {
    if (datasets.length !== weights.length) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `got ${datasets.length} datasets but ${weights.length} weights; give one weight per dataset`,
      );
    }
    this.datasets = datasets;
    this.weights = normalizeWeights(weights);
    this.indices = buildBlendingIndices(weights, size);
    // Megatron refuses to wrap around a child: each must hold every sample the blend assigns to it.
    const needed = new Float64Array(datasets.length);
    for (let s = 0; s < size; s++) needed[this.indices.datasetIndex[s]]++;
    datasets.forEach((ds, d) => {
      if (needed[d] > ds.length) {
        throw new DataError(
          'INVALID_ARGUMENT',
          `dataset ${d} has ${ds.length} samples but the blend needs ${needed[d]}; build it with at least samplesPerDataset(weights, size)[${d}] samples`,
        );
      }
    });
  }

  /** Number of blended samples. */
  get length(): number {
    return this.indices.datasetIndex.length;
  }

  /** Blended sample i: the chosen child's sample with `datasetId`. */
  getItem(i: number): BlendedSample<T> {
    if (!Number.isInteger(i) || i < 0 || i >= this.length) {
      throw new DataError('INDEX_OUT_OF_RANGE', `blended sample ${i} is outside [0, ${this.length})`);
    }
    const datasetId = this.indices.datasetIndex[i];
    const sample = this.datasets[datasetId].getItem(this.indices.datasetSampleIndex[i]);
    return { ...sample, datasetId };
  }
}
