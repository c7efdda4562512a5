// Megatron-LM GPTDataset index building (megatron/core/datasets/gpt_dataset.py + helpers.cpp),
// reproduced step for step so that sample i holds the same tokens as in Megatron for the same data,
// split, seed, sequence length and sample count. The order of RandomState calls matters: one
// numpy RandomState(seed) shuffles the document index first, then the shuffle index.
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { totalmem } from 'node:os';
import { join } from 'node:path';
import { DataError } from './errors.js';
import { NumpyRandomState } from './numpy-random.js';
import type { LowLevelDataset } from './types.js';

/** Megatron's three dataset splits, in split-string order. */
export type SplitName = 'train' | 'valid' | 'test';

/** Split matrix: per split a [begin, end) fraction pair, or null when the split is empty. */
export type SplitMatrix = [[number, number] | null, [number, number] | null, [number, number] | null];

const SPLIT_NAMES: readonly SplitName[] = ['train', 'valid', 'test'];

/** Samples are seq_len + 1 tokens long (tokens and labels are the same window shifted by one). */
const ADD_EXTRA_TOKEN = 1;

/** Below this fraction of an epoch taken from the last epoch, Megatron shuffles that epoch on its own. */
const SEPARATE_FINAL_EPOCH_THRESHOLD = 0.8;

/** Parses a Megatron split string like "969,30,1" into the normalised split matrix. */
export function parseSplit(split: string): SplitMatrix {
  // Megatron extracts every run of digits and dots, so "0.7 0.2 0.1" and "98,2" are accepted too.
  const parts = (split.match(/[.0-9]+/g) ?? []).map(Number);
  if (parts.length === 0 || parts.length > 3 || parts.some((x) => !Number.isFinite(x) || x < 0)) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `split "${split}" must hold 1 to 3 non-negative numbers for train, valid and test, e.g. "969,30,1"`,
    );
  }
  while (parts.length < 3) parts.push(0);
  const sum = parts[0] + parts[1] + parts[2];
  if (sum <= 0)
    throw new DataError(
      'INVALID_ARGUMENT',
      `split "${split}" sums to zero; give at least one positive weight`,
    );
  const normalised = parts.map((x) => x / sum);
  // Bookends are accumulated left to right like itertools.accumulate, so the floats match Python.
  const bookends = [0];
  for (const x of normalised) bookends.push(bookends[bookends.length - 1] + x);
  const row = (i: number): [number, number] | null =>
    bookends[i] === bookends[i + 1] ? null : [bookends[i], bookends[i + 1]];
  return [row(0), row(1), row(2)];
}

/** Python 3's round() for non-negative floats: half to even, as Megatron's split boundaries use. */
function pythonRound(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** Megatron's split range over sequence ids: [round(beg*N), round(end*N)), or null for an empty split. */
export function splitRange(
  matrix: SplitMatrix,
  split: SplitName,
  numSequences: number,
): [number, number] | null {
  const row = matrix[SPLIT_NAMES.indexOf(split)];
  if (row === null) return null;
  return [pythonRound(row[0] * numSequences), pythonRound(row[1] * numSequences)];
}

/** Smallest epoch count whose tokens cover numSamples*seqLen + 1 (1 when numSamples is undefined). */
export function computeNumEpochs(
  tokensPerEpoch: number,
  sequenceLength: number,
  numSamples?: number,
): number {
  if (numSamples === undefined) return 1;
  if (tokensPerEpoch <= 0) {
    throw new DataError('INVALID_ARGUMENT', 'the split holds no tokens; choose a larger split or more data');
  }
  const requested = numSamples * sequenceLength + ADD_EXTRA_TOKEN;
  // Megatron counts epochs up one at a time; the quotient gets there at once (a huge request must
  // not spin), and the two steps fix any rounding of the division.
  let epochs = Math.max(1, Math.ceil(requested / tokensPerEpoch));
  while (epochs * tokensPerEpoch < requested) epochs++;
  while (epochs > 1 && (epochs - 1) * tokensPerEpoch >= requested) epochs--;
  return epochs;
}

/**
 * Document index: the split's sequence ids repeated numEpochs times and shuffled (int32); with a
 * separate final epoch, the first numEpochs-1 epochs and the last are shuffled independently.
 */
export function buildDocumentIndex(
  documents: Int32Array,
  numEpochs: number,
  rng: NumpyRandomState,
  separateFinalEpoch: boolean,
): Int32Array {
  if (!separateFinalEpoch || numEpochs === 1) {
    // Equivalent to mgrid[0:epochs, 0:len(docs)][1] filled with the ids, flattened.
    const out = new Int32Array(numEpochs * documents.length);
    for (let e = 0; e < numEpochs; e++) out.set(documents, e * documents.length);
    rng.shuffle(out);
    return out;
  }
  const first = buildDocumentIndex(documents, numEpochs - 1, rng, false);
  const last = buildDocumentIndex(documents, 1, rng, false);
  const out = new Int32Array(first.length + last.length);
  out.set(first, 0);
  out.set(last, first.length);
  return out;
}

/**
 * Sample index (helpers.cpp build_sample_idx): flattened [numSamples+1, 2] rows of
 * (position in the document index, token offset); consecutive samples share one token.
 */
export function buildSampleIndex(
  sizes: Int32Array,
  documentIndex: Int32Array,
  sequenceLength: number,
  numEpochs: number,
  tokensPerEpoch: number,
  dropLastPartialSequence = true,
): Int32Array {
  const total = numEpochs * tokensPerEpoch - ADD_EXTRA_TOKEN;
  const numSamples = dropLastPartialSequence
    ? Math.floor(total / sequenceLength)
    : Math.ceil(total / sequenceLength);
  const out = new Int32Array(2 * (numSamples + 1));
  let docPos = 0;
  let offset = 0;
  // Row 0 is (0, 0).
  for (let row = 1; row <= numSamples; row++) {
    let remaining = sequenceLength + ADD_EXTRA_TOKEN;
    while (remaining !== 0) {
      const docLength = sizes[documentIndex[docPos]] - offset;
      remaining -= docLength;
      if (remaining <= 0) {
        // The sample ends inside this document; step back one token so the next sample starts
        // on the label of this sample's last position.
        offset += remaining + docLength - ADD_EXTRA_TOKEN;
        remaining = 0;
      } else {
        if (docPos === documentIndex.length - 1) {
          // Ran out of documents: only the (partial) last sample may do that.
          offset = sizes[documentIndex[docPos]] - ADD_EXTRA_TOKEN;
          break;
        }
        docPos++;
        offset = 0;
      }
    }
    out[2 * row] = docPos;
    out[2 * row + 1] = offset;
  }
  return out;
}

/**
 * Shuffle index: arange(numSamples) shuffled, then (when totalSize > numSamples) the tail range
 * shuffled separately; uint32 unless totalSize >= 2^32 - 2 (then float64 holding int64 values).
 */
export function buildShuffleIndex(
  numSamples: number,
  totalSize: number,
  rng: NumpyRandomState,
): Uint32Array | Float64Array {
  const out = totalSize >= 0xffffffff - 1 ? new Float64Array(totalSize) : new Uint32Array(totalSize);
  for (let i = 0; i < totalSize; i++) out[i] = i;
  rng.shuffle(out.subarray(0, numSamples));
  if (numSamples < totalSize) rng.shuffle(out.subarray(numSamples, totalSize));
  return out;
}

/** Options of `GPTDataset.build`. */
export interface GPTDatasetOptions {
  /** The low-level (indexed) dataset to sample from. */
  dataset: LowLevelDataset;
  /** Which split of `splitString` this dataset covers. */
  split: SplitName;
  /** Megatron split string, e.g. "969,30,1". */
  splitString: string;
  /** Tokens per sample (seq_len). */
  sequenceLength: number;
  /** Requested samples; decides the epoch count (undefined: one epoch). */
  numSamples?: number;
  /** Seed of the single numpy RandomState used for both shuffles. */
  seed: number;
  /** Directory for the cached index files; no caching when undefined. */
  cacheDir?: string;
  /** Restart position ids after every EOD token. */
  resetPositionIds: boolean;
  /** Mask attention across documents (reported as cuSeqlens). */
  resetAttentionMask: boolean;
  /** Zero the loss mask where the input token is EOD. */
  eodMaskLoss: boolean;
  /** The tokenizer's end-of-document id. */
  eodTokenId: number;
  /** Pad id used when a (validation) sample is short; Megatron's default is -1. */
  padTokenId?: number;
  /** Keep the final partial sample (Megatron's drop_last_partial_validation_sequence=false); default true = drop. */
  dropLastPartialSequence?: boolean;
  /** Extra fields added to the cache description (e.g. the tokenizer name), so caches do not collide. */
  descriptionExtra?: Record<string, string | number | boolean>;
  /**
   * Most bytes the document, sample and shuffle indices may take (see estimateGptIndexBytes);
   * a larger request fails before anything is allocated. Default: half of the machine's memory.
   */
  maxIndexBytes?: number;
}

/** What estimateGptIndexBytes needs: the parts of GPTDatasetOptions that size the indices. */
export type GptIndexEstimateOptions = Pick<
  GPTDatasetOptions,
  'dataset' | 'split' | 'splitString' | 'sequenceLength' | 'numSamples' | 'dropLastPartialSequence'
>;

/** The sizes of the indices GPTDataset.build allocates (and caches) for a split. */
export interface GptIndexEstimate {
  /** Epochs the indices span. */
  numEpochs: number;
  /** Samples the indices describe (at least numSamples). */
  samples: number;
  /** Bytes of the document index: int32 per document per epoch. */
  documentIndexBytes: number;
  /** Bytes of the sample index: two int32 per sample, plus one row. */
  sampleIndexBytes: number;
  /** Bytes of the shuffle index: uint32 per sample (float64 from 2^32 - 2 samples on). */
  shuffleIndexBytes: number;
  totalBytes: number;
}

/** One training sample, shifted into inputs and labels. */
export interface GPTSample {
  /** Input ids, length seq_len. */
  tokens: Int32Array;
  /** Next-token targets, length seq_len. */
  labels: Int32Array;
  /** 1 where the loss counts, 0 for EOD inputs (eodMaskLoss) and padded labels. */
  lossMask: Float32Array;
  /** Position ids, restarted after EOD when resetPositionIds. */
  positionIds: Int32Array;
  /** Document boundaries inside the sample, [0, ..., seq_len], when resetAttentionMask. */
  cuSeqlens?: Int32Array;
}

const BIN_MAGIC = 0x5849504d; // "MPIX" little-endian
const DTYPE_INT32 = 1;
const DTYPE_UINT32 = 2;
const DTYPE_FLOAT64 = 3;
const HEADER_BYTES = 16;

type IndexArray = Int32Array | Uint32Array | Float64Array;

/** Writes via a temp file + rename so a concurrent reader never sees a half-written file. */
function atomicWrite(path: string, data: Uint8Array | string): void {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    writeFileSync(tmp, data);
    renameSync(tmp, path);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw new DataError(
      'INVALID_ARGUMENT',
      `cannot write cache file (${(err as Error).message}); check cacheDir permissions`,
      path,
    );
  }
}

function encodeIndex(array: IndexArray): Uint8Array {
  const out = new Uint8Array(HEADER_BYTES + array.byteLength);
  const view = new DataView(out.buffer);
  view.setUint32(0, BIN_MAGIC, true);
  view.setUint8(
    4,
    array instanceof Int32Array ? DTYPE_INT32 : array instanceof Uint32Array ? DTYPE_UINT32 : DTYPE_FLOAT64,
  );
  view.setFloat64(8, array.length, true);
  // Typed arrays are little-endian on every platform Node supports.
  out.set(new Uint8Array(array.buffer, array.byteOffset, array.byteLength), HEADER_BYTES);
  return out;
}

function decodeIndex(path: string): IndexArray {
  const buf = readFileSync(path);
  const fix = 'delete the cache files of this dataset so they are rebuilt';
  if (buf.byteLength < HEADER_BYTES)
    throw new DataError('TRUNCATED_FILE', `index cache shorter than its header; ${fix}`, path);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (view.getUint32(0, true) !== BIN_MAGIC)
    throw new DataError('CORRUPT_FILE', `bad magic in index cache; ${fix}`, path);
  const dtype = view.getUint8(4);
  const count = view.getFloat64(8, true);
  const width = dtype === DTYPE_FLOAT64 ? 8 : 4;
  if (dtype < DTYPE_INT32 || dtype > DTYPE_FLOAT64)
    throw new DataError('CORRUPT_FILE', `unknown dtype ${dtype}; ${fix}`, path);
  if (buf.byteLength !== HEADER_BYTES + count * width) {
    throw new DataError(
      'TRUNCATED_FILE',
      `expected ${count} elements, file has ${buf.byteLength} bytes; ${fix}`,
      path,
    );
  }
  // slice() copies into a fresh, aligned ArrayBuffer.
  const body = buf.buffer.slice(buf.byteOffset + HEADER_BYTES, buf.byteOffset + buf.byteLength);
  return dtype === DTYPE_INT32
    ? new Int32Array(body)
    : dtype === DTYPE_UINT32
      ? new Uint32Array(body)
      : new Float64Array(body);
}

/** Validates the options that shape the indices and resolves the split's range of sequences. */
function resolveSplit(options: GptIndexEstimateOptions): { matrix: SplitMatrix; range: [number, number] } {
  const { dataset, split, splitString, sequenceLength, numSamples } = options;
  if (!Number.isInteger(sequenceLength) || sequenceLength < 1) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `sequenceLength must be a positive integer, got ${sequenceLength}`,
    );
  }
  if (numSamples !== undefined && (!Number.isSafeInteger(numSamples) || numSamples < 0)) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `numSamples must be a non-negative integer below 2^53 or undefined, got ${numSamples}`,
    );
  }
  if (!SPLIT_NAMES.includes(split)) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `split must be one of ${SPLIT_NAMES.join(', ')}, got ${String(split)}`,
    );
  }
  const matrix = parseSplit(splitString);
  const range = splitRange(matrix, split, dataset.length);
  if (range === null || range[0] >= range[1]) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `split "${splitString}" gives the ${split} split no sequences of ${dataset.length}; give it a positive weight or use more data`,
    );
  }
  return { matrix, range };
}

/** Index sizes from the split's document and token counts, with the builders' arithmetic. */
function indexSizes(
  documents: number,
  tokensPerEpoch: number,
  sequenceLength: number,
  numSamples: number | undefined,
  dropLast: boolean,
): GptIndexEstimate {
  const numEpochs = computeNumEpochs(tokensPerEpoch, sequenceLength, numSamples);
  const total = numEpochs * tokensPerEpoch - ADD_EXTRA_TOKEN;
  const samples = Math.max(
    0,
    dropLast ? Math.floor(total / sequenceLength) : Math.ceil(total / sequenceLength),
  );
  const documentIndexBytes = 4 * numEpochs * documents;
  const sampleIndexBytes = 4 * 2 * (samples + 1);
  const shuffleIndexBytes = (samples >= 0xffffffff - 1 ? 8 : 4) * samples;
  return {
    numEpochs,
    samples,
    documentIndexBytes,
    sampleIndexBytes,
    shuffleIndexBytes,
    totalBytes: documentIndexBytes + sampleIndexBytes + shuffleIndexBytes,
  };
}

/**
 * The bytes of the document, sample and shuffle indices GPTDataset.build would allocate for these
 * options, computed in O(documents) without allocating them; throws what build throws for bad options.
 */
export function estimateGptIndexBytes(options: GptIndexEstimateOptions): GptIndexEstimate {
  const { range } = resolveSplit(options);
  return indexSizes(
    range[1] - range[0],
    sumTokens(options.dataset.sequenceLengths, range),
    options.sequenceLength,
    options.numSamples,
    options.dropLastPartialSequence ?? true,
  );
}

/** Bytes for people: 15.2 GB, 812.0 MB, 4.0 kB. */
function formatBytes(bytes: number): string {
  const units = ['B', 'kB', 'MB', 'GB', 'TB', 'PB'];
  let i = 0;
  while (i < units.length - 1 && bytes >= 1000 ** (i + 1)) i++;
  return i === 0 ? `${bytes} B` : `${(bytes / 1000 ** i).toFixed(1)} ${units[i]}`;
}

/** Refuses index sizes above the limit, or beyond what int32 sample-index positions can address. */
function checkIndexSizes(estimate: GptIndexEstimate, options: GPTDatasetOptions): void {
  const limit = options.maxIndexBytes ?? totalmem() / 2;
  if (!(limit > 0)) {
    throw new DataError('INVALID_ARGUMENT', `maxIndexBytes must be a positive number, got ${limit}`);
  }
  const request = options.numSamples === undefined ? 'one epoch' : `numSamples ${options.numSamples}`;
  if (estimate.totalBytes > limit) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `${request} needs ${formatBytes(estimate.totalBytes)} of sample indices (document ${formatBytes(estimate.documentIndexBytes)}, sample ${formatBytes(estimate.sampleIndexBytes)}, shuffle ${formatBytes(estimate.shuffleIndexBytes)}), above the limit of ${formatBytes(limit)}; request fewer samples or raise maxIndexBytes`,
    );
  }
  // The sample index stores positions in the document index as int32.
  const entries = estimate.documentIndexBytes / 4;
  if (entries > 0x7fffffff) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `${request} needs a document index of ${entries} entries, more than the int32 sample index can address; request fewer samples`,
    );
  }
}

/** Megatron-compatible GPT pre-training dataset over a LowLevelDataset. */
export class GPTDataset {
  /** Shuffled sequence ids, repeated once per epoch. */
  readonly documentIndex: Int32Array;
  /** Flattened [length+1, 2] (document-index position, offset) rows. */
  readonly sampleIndex: Int32Array;
  /** Permutation of sample ids. */
  readonly shuffleIndex: Uint32Array | Float64Array;
  /** Epochs the indices span. */
  readonly numEpochs: number;
  /** Whether the last epoch was shuffled on its own (the 0.80 rule). */
  readonly separateFinalEpoch: boolean;
  /** The split's [begin, end) range of sequence ids. */
  readonly sequenceRange: [number, number];
  /** The JSON description hashed into the cache key. */
  readonly description: string;
  /** Whether the indices were loaded from the cache. */
  readonly loadedFromCache: boolean;
  private readonly options: GPTDatasetOptions;

  private constructor(
    options: GPTDatasetOptions,
    fields: {
      documentIndex: Int32Array;
      sampleIndex: Int32Array;
      shuffleIndex: Uint32Array | Float64Array;
      numEpochs: number;
      separateFinalEpoch: boolean;
      sequenceRange: [number, number];
      description: string;
      loadedFromCache: boolean;
    },
  ) {
    this.options = options;
    this.documentIndex = fields.documentIndex;
    this.sampleIndex = fields.sampleIndex;
    this.shuffleIndex = fields.shuffleIndex;
    this.numEpochs = fields.numEpochs;
    this.separateFinalEpoch = fields.separateFinalEpoch;
    this.sequenceRange = fields.sequenceRange;
    this.description = fields.description;
    this.loadedFromCache = fields.loadedFromCache;
  }

  /**
   * Builds (or loads from `cacheDir`) the document, sample and shuffle indices. Fails with
   * INVALID_ARGUMENT before allocating anything when they would exceed `maxIndexBytes`.
   */
  static build(options: GPTDatasetOptions): GPTDataset {
    const { dataset, split, splitString, sequenceLength, numSamples, seed } = options;
    const { matrix, range } = resolveSplit(options);
    const tokensPerEpoch = sumTokens(dataset.sequenceLengths, range);
    const dropLast = options.dropLastPartialSequence ?? true;
    checkIndexSizes(
      indexSizes(range[1] - range[0], tokensPerEpoch, sequenceLength, numSamples, dropLast),
      options,
    );
    const description = JSON.stringify({
      class: 'GPTDataset',
      dataset_path: dataset.pathPrefix,
      num_samples: numSamples ?? null,
      index_split: split,
      random_seed: seed,
      sequence_length: sequenceLength,
      split: splitString,
      split_matrix: matrix,
      add_extra_token_to_sequence: ADD_EXTRA_TOKEN,
      drop_last_partial_sequence: dropLast,
      num_sequences: dataset.length,
      extra: options.descriptionExtra ?? {},
    });

    let paths: { description: string; document: string; sample: string; shuffle: string } | undefined;
    if (options.cacheDir !== undefined) {
      const md5 = createHash('md5').update(description).digest('hex');
      const base = join(options.cacheDir, `${md5}-GPTDataset-${split}-`);
      paths = {
        description: `${base}description.txt`,
        document: `${base}document_index.bin`,
        sample: `${base}sample_index.bin`,
        shuffle: `${base}shuffle_index.bin`,
      };
      // description.txt is written last, so its presence means the three index files are complete.
      if (
        existsSync(paths.description) &&
        readFileSync(paths.description, 'utf8') === description &&
        existsSync(paths.document) &&
        existsSync(paths.sample) &&
        existsSync(paths.shuffle)
      ) {
        const documentIndex = decodeIndex(paths.document);
        const sampleIndex = decodeIndex(paths.sample);
        const shuffleIndex = decodeIndex(paths.shuffle);
        if (
          !(documentIndex instanceof Int32Array) ||
          !(sampleIndex instanceof Int32Array) ||
          shuffleIndex instanceof Int32Array
        ) {
          throw new DataError(
            'CORRUPT_FILE',
            'index cache has unexpected dtypes; delete these cache files',
            paths.document,
          );
        }
        const documents = range[1] - range[0];
        const numEpochs = documents > 0 ? documentIndex.length / documents : 0;
        return new GPTDataset(options, {
          documentIndex,
          sampleIndex,
          shuffleIndex,
          numEpochs,
          separateFinalEpoch: finalEpochRule(tokensPerEpoch, sequenceLength, numEpochs, numSamples).separate,
          sequenceRange: range,
          description,
          loadedFromCache: true,
        });
      }
    }

    const documents = Int32Array.from({ length: range[1] - range[0] }, (_, i) => range[0] + i);
    const numEpochs = computeNumEpochs(tokensPerEpoch, sequenceLength, numSamples);
    const rule = finalEpochRule(tokensPerEpoch, sequenceLength, numEpochs, numSamples);
    const rng = new NumpyRandomState(seed);
    const documentIndex = buildDocumentIndex(documents, numEpochs, rng, rule.separate);
    const sampleIndex = buildSampleIndex(
      dataset.sequenceLengths,
      documentIndex,
      sequenceLength,
      numEpochs,
      tokensPerEpoch,
      dropLast,
    );
    const total = sampleIndex.length / 2 - 1;
    const shuffleIndex = buildShuffleIndex(rule.separate ? rule.samplesSansFinalEpoch : total, total, rng);

    if (paths !== undefined && options.cacheDir !== undefined) {
      mkdirSync(options.cacheDir, { recursive: true });
      atomicWrite(paths.document, encodeIndex(documentIndex));
      atomicWrite(paths.sample, encodeIndex(sampleIndex));
      atomicWrite(paths.shuffle, encodeIndex(shuffleIndex));
      atomicWrite(paths.description, description);
    }
    return new GPTDataset(options, {
      documentIndex,
      sampleIndex,
      shuffleIndex,
      numEpochs,
      separateFinalEpoch: rule.separate,
      sequenceRange: range,
      description,
      loadedFromCache: false,
    });
  }

  /** Number of samples (rows of the sample index minus one; at least numSamples). */
  get length(): number {
    return this.sampleIndex.length / 2 - 1;
  }

  /** The raw seq_len+1 token window of sample i (after the shuffle), padded with padTokenId if short. */
  getText(i: number): Int32Array {
    if (!Number.isInteger(i) || i < 0 || i >= this.length) {
      throw new DataError('INDEX_OUT_OF_RANGE', `sample ${i} is outside [0, ${this.length})`);
    }
    const { dataset, sequenceLength } = this.options;
    const pad = this.options.padTokenId ?? -1;
    const j = this.shuffleIndex[i];
    const beg = this.sampleIndex[2 * j];
    const begOffset = this.sampleIndex[2 * j + 1];
    const end = this.sampleIndex[2 * j + 2];
    const endOffset = this.sampleIndex[2 * j + 3];
    const text = new Int32Array(sequenceLength + ADD_EXTRA_TOKEN).fill(pad);
    let filled = 0;
    if (beg === end) {
      const part = dataset.get(this.documentIndex[beg], begOffset, endOffset - begOffset + ADD_EXTRA_TOKEN);
      text.set(part.subarray(0, text.length), 0);
      filled = part.length;
    } else {
      for (let k = beg; k <= end && filled < text.length; k++) {
        const seq = this.documentIndex[k];
        const offset = k === beg ? begOffset : 0;
        const part =
          k === end
            ? dataset.get(seq, offset, Math.min(endOffset + ADD_EXTRA_TOKEN, dataset.sequenceLengths[seq]))
            : dataset.get(seq, offset);
        const take = Math.min(part.length, text.length - filled);
        text.set(part.subarray(0, take), filled);
        filled += take;
      }
    }
    return text;
  }

  /** Sample i as tokens, labels, loss mask, position ids and (with resetAttentionMask) cuSeqlens. */
  getItem(i: number): GPTSample {
    const { sequenceLength, eodTokenId, eodMaskLoss, resetPositionIds, resetAttentionMask } = this.options;
    const pad = this.options.padTokenId ?? -1;
    const text = this.getText(i);
    const tokens = text.slice(0, sequenceLength);
    const labels = text.slice(1);
    const lossMask = new Float32Array(sequenceLength).fill(1);
    const positionIds = new Int32Array(sequenceLength);
    const bounds = [0];
    let docStart = 0;
    for (let p = 0; p < sequenceLength; p++) {
      positionIds[p] = resetPositionIds ? p - docStart : p;
      if (tokens[p] === eodTokenId) {
        if (eodMaskLoss) lossMask[p] = 0;
        // The next document starts after the EOD token.
        docStart = p + 1;
        if (p + 1 < sequenceLength) bounds.push(p + 1);
      }
    }
    // Padding is masked from the loss and replaced by 0 afterwards, as Megatron does.
    for (let p = 0; p < sequenceLength; p++) {
      if (labels[p] === pad) {
        lossMask[p] = 0;
        labels[p] = 0;
      }
      if (tokens[p] === pad) tokens[p] = 0;
    }
    bounds.push(sequenceLength);
    const sample: GPTSample = { tokens, labels, lossMask, positionIds };
    if (resetAttentionMask) sample.cuSeqlens = Int32Array.from(bounds);
    return sample;
  }
}

function sumTokens(sizes: Int32Array, range: [number, number]): number {
  let total = 0;
  for (let s = range[0]; s < range[1]; s++) total += sizes[s];
  return total;
}

/** The 0.80 rule: shuffle the final epoch separately when it contributes few samples. */
function finalEpochRule(
  tokensPerEpoch: number,
  sequenceLength: number,
  numEpochs: number,
  numSamples: number | undefined,
): { separate: boolean; samplesSansFinalEpoch: number } {
  if (numEpochs === 1 || numSamples === undefined) return { separate: false, samplesSansFinalEpoch: 0 };
  const sansFinal = Math.floor(((numEpochs - 1) * tokensPerEpoch - ADD_EXTRA_TOKEN) / sequenceLength);
  const fromFinal = numSamples - sansFinal;
  const perEpoch = Math.floor((tokensPerEpoch - ADD_EXTRA_TOKEN) / sequenceLength);
  if (fromFinal < 0 || fromFinal > perEpoch + 1) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `inconsistent epoch arithmetic (${fromFinal} samples from the final epoch of ${perEpoch}); report this with the dataset sizes`,
    );
  }
  return {
    separate: fromFinal < Math.trunc(SEPARATE_FINAL_EPOCH_THRESHOLD * perEpoch),
    samplesSansFinalEpoch: sansFinal,
  };
}
