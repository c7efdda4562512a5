// Sequence packing of SFT samples into fixed-length rows for THD (varlen) attention, as
// Pai-Megatron-Patch does with MP_SFT_PACKING: several samples per row, position ids restarting
// at every sample, cu_seqlens marking the sample boundaries. No sample is ever split across rows.
import { DataError } from '../errors.js';
import { IGNORE_INDEX, type SftSample } from './render.js';

/** How samples are assigned to rows. */
export type PackingStrategy = 'best-fit-decreasing' | 'greedy';

/** Options of packSamples. */
export interface PackOptions {
  /** 'best-fit-decreasing' (default) sorts by length and puts each sample in the fullest row it
   * fits; 'greedy' keeps file order and opens a new row when the next sample does not fit
   * (Pai-Megatron-Patch's `--sequence-packing`). */
  strategy?: PackingStrategy;
  /** Token id written into the unused tail of each row. Default 0. */
  padId?: number;
  /** Pai-Megatron-Patch per-sequence loss: divide each sample's loss mask by its own number of
   * loss tokens so that every sample weighs the same regardless of length. */
  perSequenceLoss?: boolean;
}

/**
 * One packed row of exactly seqLength positions. Samples occupy [cuSeqlens[i], cuSeqlens[i+1]);
 * the last entry of cuSeqlens is the used length. The tail after it is padding: padId inputs,
 * IGNORE_INDEX labels, zero loss, and it belongs to no sequence. Its position ids continue the
 * last sample's count instead of restarting at 0, so that a consumer deriving boundaries from
 * position_ids == 0 (as Pai-Megatron-Patch does) does not see spurious sequences in it.
 */
export interface PackedRow {
  inputIds: Int32Array;
  labels: Int32Array;
  lossMask: Float32Array;
  positionIds: Int32Array;
  /** Int32 cumulative sample starts within the row, length numSamples + 1. */
  cuSeqlens: Int32Array;
  /** Indices into the input array of the samples in this row, in row order. */
  sampleIndices: number[];
}

/** Packed rows and packingEfficiency = real tokens / (rows × seqLength). */
export interface PackResult {
  rows: PackedRow[];
  packingEfficiency: number;
  realTokens: number;
}

function assignGreedy(lengths: number[], seqLength: number): number[][] {
  const bins: number[][] = [];
  let current: number[] = [];
  let used = 0;
  lengths.forEach((len, i) => {
    if (used + len > seqLength && current.length > 0) {
      bins.push(current);
      current = [];
      used = 0;
    }
    current.push(i);
    used += len;
  });
  if (current.length > 0) bins.push(current);
  return bins;
}

function assignBestFitDecreasing(lengths: number[], seqLength: number): number[][] {
  // Stable sort keeps equal-length samples in file order, so the result is deterministic.
  const order = lengths.map((_, i) => i).sort((a, b) => lengths[b] - lengths[a] || a - b);
  const bins: number[][] = [];
  // byFree[c] lists the rows with exactly c free positions: best fit is then the first non-empty
  // bucket at or above the sample's length, found in O(seqLength) without a balanced tree.
  const byFree: number[][] = Array.from({ length: seqLength + 1 }, () => []);
  const free: number[] = [];
  for (const i of order) {
    const len = lengths[i];
    let c = len;
    while (c <= seqLength && byFree[c].length === 0) c++;
    let bin: number;
    if (c <= seqLength) {
      bin = byFree[c].pop()!;
    } else {
      bin = bins.length;
      bins.push([]);
      free.push(seqLength);
    }
    bins[bin].push(i);
    free[bin] -= len;
    byFree[free[bin]].push(bin);
  }
  return bins;
}

/** Packs samples into rows of exactly seqLength positions; throws if a sample is longer. */
export function packSamples(
  samples: readonly SftSample[],
  seqLength: number,
  opts: PackOptions = {},
): PackResult {
  const strategy = opts.strategy ?? 'best-fit-decreasing';
  const padId = opts.padId ?? 0;
  if (!Number.isInteger(seqLength) || seqLength < 1) {
    throw new DataError('INVALID_ARGUMENT', `seqLength must be a positive integer, got ${seqLength}`);
  }
  const lengths = samples.map((s, i) => {
    const len = s.inputIds.length;
    if (len > seqLength) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `sample ${i} has ${len} tokens, more than seqLength ${seqLength}; truncate or drop it first`,
      );
    }
    if (len === 0) throw new DataError('INVALID_ARGUMENT', `sample ${i} is empty`);
    return len;
  });
  let bins: number[][];
  if (strategy === 'greedy') bins = assignGreedy(lengths, seqLength);
  else if (strategy === 'best-fit-decreasing') bins = assignBestFitDecreasing(lengths, seqLength);
  else throw new DataError('INVALID_ARGUMENT', `unknown packing strategy ${String(strategy)}`);

  let realTokens = 0;
  const rows = bins.map((bin): PackedRow => {
    const inputIds = new Int32Array(seqLength).fill(padId);
    const labels = new Int32Array(seqLength).fill(IGNORE_INDEX);
    const lossMask = new Float32Array(seqLength);
    const positionIds = new Int32Array(seqLength);
    const cuSeqlens = new Int32Array(bin.length + 1);
    let off = 0;
    bin.forEach((si, k) => {
      const s = samples[si];
      const len = s.inputIds.length;
      inputIds.set(s.inputIds, off);
      labels.set(s.labels, off);
      let scale = 1;
      if (opts.perSequenceLoss) {
        let total = 0;
        for (const w of s.lossMask) total += w;
        // A sample without loss tokens stays all-zero instead of dividing by zero.
        scale = total > 0 ? 1 / total : 0;
      }
      for (let j = 0; j < len; j++) {
        lossMask[off + j] = s.lossMask[j] * scale;
        positionIds[off + j] = j;
      }
      off += len;
      cuSeqlens[k + 1] = off;
    });
    const lastStart = cuSeqlens[bin.length - 1];
    for (let j = off; j < seqLength; j++) positionIds[j] = j - lastStart;
    realTokens += off;
    return { inputIds, labels, lossMask, positionIds, cuSeqlens, sampleIndices: bin };
  });
  const packingEfficiency = rows.length === 0 ? 0 : realTokens / (rows.length * seqLength);
  return { rows, packingEfficiency, realTokens };
}
