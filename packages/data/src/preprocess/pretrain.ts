// Pre-training preprocessing: text documents to a Megatron `.bin`/`.idx` pair, the way
// Megatron-LM's tools/preprocess_data.py (and Pai-Megatron-Patch's preprocess_data_megatron.py)
// do it: one document = one sequence, tokenised without special tokens, optionally followed by
// the EOD token, dtype chosen by vocabulary size.
import { existsSync } from 'node:fs';
import { DataError } from '../errors.js';
import { IndexedDatasetBuilder } from '../indexed-dataset.js';
import { loadTokenizer } from '../tokenizer/hf.js';
import type { Tokenizer } from '../tokenizer/types.js';
import { checkOutputs } from './outputs.js';
import { type BatchRunner, inProcessRunner, OrderedBatches, WorkerPool } from './pool.js';
import { type BadRecord, checkInputFile, type InputFormat, readDocuments } from './readers.js';

/** Options of preprocessPretrain. */
export interface PreprocessPretrainOptions {
  /** Input file: .jsonl, .json (array or JSON lines), .parquet or .txt (one document per line). */
  input: string;
  /** Field holding the text (JSON/parquet); also names the output, as in Megatron. Default "text". */
  jsonKey?: string;
  /** Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json). */
  tokenizerDir: string;
  /** Output prefix: writes `<outputPrefix>_<jsonKey>_document.{bin,idx}`. */
  outputPrefix: string;
  /** Append the tokenizer's EOD id to every document (Megatron's --append-eod). */
  appendEod?: boolean;
  /** Tokenizer threads; 1 tokenises in this thread. Default 1. */
  workers?: number;
  /** Fail at the first bad record, or record that is not valid UTF-8, instead of counting it. */
  strict?: boolean;
  /** Force the input format instead of guessing it from the extension. */
  format?: InputFormat;
  /** Documents per batch sent to a worker. Default 64. */
  batchSize?: number;
  /** Called after every written batch with the running totals. */
  onProgress?: (progress: PreprocessProgress) => void;
  /**
   * Cancels the run: checked between records and batches; on abort the workers are stopped, no
   * output or temporary file is left, and `signal.reason` is thrown unchanged.
   */
  signal?: AbortSignal;
  /** Replace existing outputs (only files preprocessing writes are replaced). Default false. */
  overwrite?: boolean;
}

/** Running totals reported while preprocessing. */
export interface PreprocessProgress {
  documents: number;
  tokens: number;
  /** UTF-8 bytes of the document texts processed so far. */
  bytes: number;
  seconds: number;
}

/** A record that was skipped: its 1-based line (element, row) and the reason. */
export interface BadLine {
  line: number;
  reason: string;
}

/** What preprocessPretrain wrote. */
export interface PreprocessPretrainResult extends PreprocessProgress {
  /** The dataset prefix written (`.bin`/`.idx` next to it). */
  datasetPrefix: string;
  /** Token dtype of the `.bin`. */
  dtype: string;
  /** Records read, good and bad (blank lines are not records). */
  records: number;
  /** Records whose bytes were not valid UTF-8, decoded with U+FFFD replacement (bad ones included). */
  invalidUtf8: number;
  badLines: BadLine[];
}

/** A tokenised batch: ids of all documents concatenated, and one length per document. */
export interface EncodedBatch {
  tokens: Int32Array;
  lengths: Int32Array;
}

/**
 * Encodes a batch into one flat Int32Array and per-document lengths. Used in-process and by the
 * worker threads (worker.mjs imports it from the built package), so both encode identically.
 * @internal
 */
export function encodePretrainBatch(
  tokenizer: Tokenizer,
  texts: readonly string[],
  appendEod: boolean,
): EncodedBatch {
  const encoded = tokenizer.encodeBatch(texts, { addSpecialTokens: false });
  const lengths = new Int32Array(encoded.length);
  let total = 0;
  for (let i = 0; i < encoded.length; i++) {
    lengths[i] = encoded[i].length + (appendEod ? 1 : 0);
    total += lengths[i];
  }
  const tokens = new Int32Array(total);
  let at = 0;
  for (const ids of encoded) {
    tokens.set(ids, at);
    at += ids.length;
    if (appendEod) tokens[at++] = tokenizer.eodId;
  }
  return { tokens, lengths };
}

/** Fails with MISSING_FILE unless `dir` holds tokenizer.json and tokenizer_config.json. */
export function assertTokenizerDir(dir: string): void {
  for (const name of ['tokenizer.json', 'tokenizer_config.json']) {
    if (!existsSync(`${dir}/${name}`)) {
      throw new DataError('MISSING_FILE', `tokenizer folder has no ${name}`, dir);
    }
  }
}

/** How many keys of a record a message lists at most. */
const MAX_KEYS_SHOWN = 8;

/** The NO_OUTPUT error of a run that read `records` records and wrote no document. */
function noDocumentError(input: string, records: number, firstBad: BadRecord | undefined): DataError {
  if (records === 0 || firstBad === undefined) {
    return new DataError('NO_OUTPUT', 'no document written: the input has no records', input);
  }
  const what = `all ${records} record${records === 1 ? ' is' : 's are'} bad (first: line ${firstBad.lineNumber}: ${firstBad.reason})`;
  const keys = firstBad.keys;
  let fix = 'fix the records or check that this is the intended input';
  if (keys !== undefined && keys.length > 0) {
    const shown = keys.slice(0, MAX_KEYS_SHOWN).map((k) => `"${k}"`);
    if (keys.length > MAX_KEYS_SHOWN) shown.push('...');
    fix = `pass --json-key with a field the records have (line ${firstBad.lineNumber} has ${shown.join(', ')})`;
  }
  return new DataError('NO_OUTPUT', `no document written: ${what}; ${fix}`, input);
}

/**
 * Tokenises a text corpus into `<outputPrefix>_<jsonKey>_document.{bin,idx}` (Megatron's
 * preprocess_data.py naming), one sequence per document, in input order whatever the worker count.
 * Fails with NO_OUTPUT, leaving no file, when no document would be written.
 */
export async function preprocessPretrain(opts: PreprocessPretrainOptions): Promise<PreprocessPretrainResult> {
  const { signal } = opts;
  signal?.throwIfAborted();
  const jsonKey = opts.jsonKey ?? 'text';
  const workers = opts.workers ?? 1;
  const batchSize = opts.batchSize ?? 64;
  const appendEod = opts.appendEod ?? false;
  if (!Number.isInteger(workers) || workers < 1) {
    throw new DataError('INVALID_ARGUMENT', `workers must be a positive integer, got ${workers}`);
  }
  if (!Number.isInteger(batchSize) || batchSize < 1) {
    throw new DataError('INVALID_ARGUMENT', `batchSize must be a positive integer, got ${batchSize}`);
  }
  const format = checkInputFile(opts.input, opts.format);
  assertTokenizerDir(opts.tokenizerDir);
  const datasetPrefix = `${opts.outputPrefix}_${jsonKey}_document`;
  checkOutputs(
    [
      { path: `${datasetPrefix}.bin`, kind: 'bin' },
      { path: `${datasetPrefix}.idx`, kind: 'idx' },
    ],
    { input: opts.input, tokenizerDir: opts.tokenizerDir, overwrite: opts.overwrite ?? false },
  );
  // The main thread needs the tokenizer anyway, for the vocabulary size that picks the dtype.
  const tokenizer = await loadTokenizer(opts.tokenizerDir);
  signal?.throwIfAborted();
  const dtype = IndexedDatasetBuilder.optimalDtype(tokenizer.vocabSize);
  const start = performance.now();
  const totals: PreprocessProgress = { documents: 0, tokens: 0, bytes: 0, seconds: 0 };
  const badLines: BadLine[] = [];
  let records = 0;
  let invalidUtf8 = 0;
  let firstBad: BadRecord | undefined;

  let runner: BatchRunner<{ texts: string[] }, EncodedBatch> | undefined;
  let builder: IndexedDatasetBuilder | undefined;
  let ok = false;
  try {
    runner =
      workers === 1
        ? inProcessRunner((req: { texts: string[] }) => encodePretrainBatch(tokenizer, req.texts, appendEod))
        : new WorkerPool<{ texts: string[] }, EncodedBatch>(workers, {
            task: 'pretrain',
            tokenizerDir: opts.tokenizerDir,
            appendEod,
          });
    const out = new IndexedDatasetBuilder(datasetPrefix, { dtype });
    builder = out;
    const write = (batch: EncodedBatch, bytes: number): void => {
      let at = 0;
      for (const len of batch.lengths) {
        out.addDocument(batch.tokens.subarray(at, at + len));
        at += len;
      }
      totals.documents += batch.lengths.length;
      totals.tokens += batch.tokens.length;
      totals.bytes += bytes;
      totals.seconds = (performance.now() - start) / 1000;
      opts.onProgress?.({ ...totals });
    };
    const batches = new OrderedBatches(runner, workers * 2, write, signal);

    let texts: string[] = [];
    let bytes = 0;
    for await (const r of readDocuments(opts.input, jsonKey, { format })) {
      signal?.throwIfAborted();
      records++;
      if (r.invalidUtf8) {
        if (opts.strict)
          throw new DataError('INVALID_FORMAT', `line ${r.lineNumber}: invalid UTF-8`, opts.input);
        invalidUtf8++;
      }
      if ('reason' in r) {
        if (opts.strict) {
          throw new DataError('INVALID_FORMAT', `line ${r.lineNumber}: ${r.reason}`, opts.input);
        }
        firstBad ??= r;
        badLines.push({ line: r.lineNumber, reason: r.reason });
        continue;
      }
      texts.push(r.text);
      bytes += Buffer.byteLength(r.text, 'utf8');
      if (texts.length >= batchSize) {
        await batches.submit({ texts }, bytes);
        texts = [];
        bytes = 0;
      }
    }
    if (texts.length > 0) await batches.submit({ texts }, bytes);
    await batches.drain();
    if (totals.documents === 0) throw noDocumentError(opts.input, records, firstBad);
    signal?.throwIfAborted();
    out.finalize();
    ok = true;
  } finally {
    if (!ok) builder?.abort();
    await runner?.close();
  }
  totals.seconds = (performance.now() - start) / 1000;
  return { ...totals, datasetPrefix, dtype, records, invalidUtf8, badLines };
}
