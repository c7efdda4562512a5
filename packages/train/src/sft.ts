// SFT data for the trainer: the output of `megapatch preprocess sft` (`<P>_sft_tokens`,
// `<P>_sft_loss_mask`, `<P>_sft.json`) read as Megatron does (input = tokens[:-1], labels =
// tokens[1:], loss on assistant tokens only), shuffled per epoch with the run's seed, and either
// packed into rows of seqLength (samples separated by cuSeqlens, positions restarting per sample:
// no attention across samples) or padded one sample per row. Pai-Megatron-Patch's per-sequence
// loss weighs every sample equally instead of every token.
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  type GPTSample,
  IGNORE_INDEX,
  IndexedDataset,
  NumpyRandomState,
  packSamples,
  parseSplit,
  type SftSample,
  splitRange,
} from '@megapatch/data';
import { TrainError } from './errors.js';

/** Options of {@link buildSftDataset}. */
export interface SftDatasetOptions {
  /** The output prefix given to `megapatch preprocess sft`. */
  prefix: string;
  split: string;
  which: 'train' | 'valid' | 'test';
  seqLength: number;
  /** Rows needed (the data repeats in new shuffles, epoch after epoch, until there are enough). */
  numRows: number;
  seed: number;
  packing: boolean;
  perSequenceLoss: boolean;
  /**
   * Pad every sample (no loss) to a multiple of this many tokens before packing (default 1): with
   * context parallelism each packed sample must split into 2·cp chunks, as Megatron pads it.
   */
  padToMultipleOf?: number;
}

/** `s` padded with `padId` tokens that carry no loss to a multiple of `k` tokens. */
function padSample(s: SftSample, k: number, padId: number): SftSample {
  const n = s.inputIds.length;
  const m = Math.ceil(n / k) * k;
  if (m === n) return s;
  const inputIds = new Int32Array(m).fill(padId);
  const labels = new Int32Array(m).fill(IGNORE_INDEX);
  const lossMask = new Float32Array(m);
  inputIds.set(s.inputIds);
  labels.set(s.labels);
  lossMask.set(s.lossMask);
  return { inputIds, labels, lossMask };
}

/** Rows of SFT samples, as the trainer's micro-batches read them. */
export interface SftRows {
  readonly length: number;
  getItem(i: number): GPTSample;
  /** Samples of the split, and rows per epoch. */
  readonly samples: number;
  readonly rowsPerEpoch: number;
}

function readSample(tokens: IndexedDataset, mask: IndexedDataset, i: number): SftSample {
  const ids = tokens.get(i);
  const m = mask.get(i);
  const n = ids.length - 1;
  const labels = new Int32Array(n);
  const lossMask = new Float32Array(n);
  for (let j = 0; j < n; j++) {
    const on = m[j + 1] > 0;
    labels[j] = on ? ids[j + 1] : IGNORE_INDEX;
    lossMask[j] = on ? 1 : 0;
  }
  return { inputIds: ids.subarray(0, n), labels, lossMask };
}

/** One row as the model reads it: ignored labels become token 0 with no loss. */
function toSample(
  inputIds: Int32Array,
  labels: Int32Array,
  lossMask: Float32Array,
  positionIds: Int32Array,
  cu?: Int32Array,
): GPTSample {
  const l = Int32Array.from(labels, (v) => (v === IGNORE_INDEX ? 0 : v));
  return { tokens: inputIds, labels: l, lossMask, positionIds, ...(cu ? { cuSeqlens: cu } : {}) };
}

/** The SFT rows of one split. */
export function buildSftDataset(o: SftDatasetOptions): SftRows {
  const sidecar = `${o.prefix}_sft.json`;
  if (!fs.existsSync(sidecar)) {
    throw new TrainError(
      'DATA',
      `data.sft.prefix ${o.prefix}: no ${path.basename(sidecar)}; write it with megapatch preprocess sft`,
    );
  }
  const meta = JSON.parse(fs.readFileSync(sidecar, 'utf8')) as { seqLength: number; padId: number };
  const tokens = IndexedDataset.open(`${o.prefix}_sft_tokens`);
  const mask = IndexedDataset.open(`${o.prefix}_sft_loss_mask`);
  const total = tokens.sequenceLengths.length;
  const range = splitRange(parseSplit(o.split), o.which, total);
  if (!range || range[1] <= range[0]) {
    throw new TrainError('DATA', `the ${o.which} split of ${total} SFT samples is empty: check data.split`);
  }
  const [lo, hi] = range;
  const samples: SftSample[] = [];
  for (let i = lo; i < hi; i++) {
    const s = readSample(tokens, mask, i);
    if (s.inputIds.length > o.seqLength) {
      throw new TrainError(
        'DATA',
        `SFT sample ${i} has ${s.inputIds.length} input tokens, more than data.seqLength ${o.seqLength} (it was preprocessed for ${meta.seqLength})`,
      );
    }
    samples.push(s);
  }
  tokens.close();
  mask.close();
  const padId = meta.padId ?? 0;
  const k = o.padToMultipleOf ?? 1;
  if (k > 1) {
    if (o.seqLength % k !== 0) {
      throw new TrainError(
        'DATA',
        `data.seqLength ${o.seqLength} is not a multiple of the sample padding ${k}`,
      );
    }
    for (let i = 0; i < samples.length; i++) samples[i] = padSample(samples[i], k, padId);
  }
  // one epoch of rows in the order of a seeded shuffle
  const epochRows = (epoch: number): GPTSample[] => {
    const order = Int32Array.from(samples.keys());
    new NumpyRandomState(o.seed + epoch).shuffle(order);
    const shuffled = Array.from(order, (k) => samples[k]);
    if (o.packing) {
      const packed = packSamples(shuffled, o.seqLength, {
        strategy: 'greedy',
        padId,
        perSequenceLoss: o.perSequenceLoss,
      });
      return packed.rows.map((r) => {
        // the padding tail becomes a sequence of its own (no loss), so the boundaries cover the row
        const last = r.cuSeqlens[r.cuSeqlens.length - 1];
        const cu = last < o.seqLength ? Int32Array.from([...r.cuSeqlens, o.seqLength]) : r.cuSeqlens;
        return toSample(r.inputIds, r.labels, r.lossMask, r.positionIds, cu);
      });
    }
    return shuffled.map((s) => {
      const n = s.inputIds.length;
      const ids = new Int32Array(o.seqLength).fill(padId);
      const labels = new Int32Array(o.seqLength).fill(IGNORE_INDEX);
      const lossMask = new Float32Array(o.seqLength);
      const pos = new Int32Array(o.seqLength);
      ids.set(s.inputIds);
      labels.set(s.labels);
      let count = 0;
      for (let j = 0; j < n; j++) count += s.lossMask[j] > 0 ? 1 : 0;
      for (let j = 0; j < n; j++)
        lossMask[j] = o.perSequenceLoss && count > 0 ? s.lossMask[j] / count : s.lossMask[j];
      for (let j = 0; j < o.seqLength; j++) pos[j] = j;
      return toSample(ids, labels, lossMask, pos);
    });
  };
  const rows: GPTSample[] = [];
  let epoch = 0;
  let perEpoch = 0;
  while (rows.length < o.numRows) {
    const e = epochRows(epoch++);
    perEpoch = e.length;
    rows.push(...e);
    if (epoch > 100_000) throw new TrainError('DATA', 'the SFT data yields no rows');
  }
  return { length: rows.length, getItem: (i) => rows[i], samples: samples.length, rowsPerEpoch: perEpoch };
}
