// SFT preprocessing into two Megatron indexed datasets plus a JSON sidecar.
//
// Format "megapatch-sft" version 1. For output prefix P:
// - `P_sft_tokens.{bin,idx}`: a Megatron indexed dataset (MMIDIDX v1) of token ids, dtype by
//   vocabulary size (uint16 below 65500 ids, else int32). One document = one sequence = one
//   sample: the T unshifted ids of the rendered conversation, T <= seqLength + 1.
// - `P_sft_loss_mask.{bin,idx}`: an indexed dataset with dtype uint8 and exactly the same
//   sequence lengths and documents. mask[j] = 1 iff token j is a training target (part of an
//   assistant reply, end-of-turn token included), else 0; mask[0] is always 0 since the first
//   token is never predicted. Turn loss weights are reduced to 0/1.
// - `P_sft.json`: the sidecar (SftSidecar below): format, version, tokenizer, dtypes, counts.
// Training reads sample i as Megatron does with an appended extra token: input = tokens[0..T-1),
// labels = tokens[1..T), lossMask = mask[1..T); that triple equals buildSftSamples' inputIds,
// (unmasked) labels and lossMask. Unlike Pai-Megatron-Patch's idxmap format, nothing is encoded
// in the ids: there are no -100 labels and no negative end-of-sample markers (which uint16 cannot
// hold), and sample boundaries are the sequence boundaries of the index.
//
// With `workers` > 1, rendering and tokenisation run in a worker_threads pool (see pool.ts and
// worker.mjs): the main thread reads and parses records, sends batches of ChatSamples with their
// line numbers, and applies the length policy and counts to the replies strictly in input order,
// so the files, stats and bad-line reports are the same whatever the worker count.
import { renameSync, rmSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { DataError } from '../errors.js';
import { IndexedDatasetBuilder } from '../indexed-dataset.js';
import { detectSftFormat, parseSftRecord } from '../sft/readers.js';
import { tokenizeChat } from '../sft/render.js';
import type { ChatSample, ChatTokenizer } from '../sft/types.js';
import { loadTokenizer } from '../tokenizer/hf.js';
import { checkOutputs } from './outputs.js';
import { type BatchRunner, inProcessRunner, OrderedBatches, WorkerPool } from './pool.js';
import { assertTokenizerDir, type BadLine, type PreprocessProgress } from './pretrain.js';
import { checkInputFile, type InputFormat, readRecords } from './readers.js';

/** Name and version of the SFT output format, stored in the sidecar. */
export const SFT_FORMAT = { name: 'megapatch-sft', version: 1 } as const;

/** Options of preprocessSft. */
export interface PreprocessSftOptions {
  /** Alpaca / ShareGPT / OpenAI-messages records as a JSON array, JSONL or parquet. */
  input: string;
  tokenizerDir: string;
  /** Writes `<outputPrefix>_sft_tokens.*`, `<outputPrefix>_sft_loss_mask.*` and `<outputPrefix>_sft.json`. */
  outputPrefix: string;
  /** Most training positions per sample (stored samples have at most seqLength + 1 tokens). */
  seqLength: number;
  /** Longer samples are dropped (default, like Pai) or cut to seqLength positions. */
  truncation?: 'drop' | 'truncate';
  /** Fail at the first bad record, or record that is not valid UTF-8, instead of counting it. */
  strict?: boolean;
  format?: InputFormat;
  /** Rendering + tokenizer threads; 1 tokenises in this thread. Same output whatever the count. Default 1. */
  workers?: number;
  /** Records per batch sent to a worker. Default 64. */
  batchSize?: number;
  /** Called after every written batch with the running totals; `bytes` counts the UTF-8 bytes
   * of the message contents of the parsed records (dropped ones included). */
  onProgress?: (progress: PreprocessProgress) => void;
  /**
   * Cancels the run: checked between records and batches; on abort the workers are stopped, no
   * output or temporary file is left, and `signal.reason` is thrown unchanged.
   */
  signal?: AbortSignal;
  /** Replace existing outputs (only files preprocessing writes are replaced). Default false. */
  overwrite?: boolean;
}

/** A batch of parsed conversations for encodeSftBatch, with their 1-based input lines. */
export interface SftBatchRequest {
  lines: number[];
  chats: ChatSample[];
}

/**
 * Rendered and tokenised conversations, untruncated: the ids of all good samples concatenated,
 * the matching 0/1 loss masks (mask[j] = 1 iff token j has a positive weight, mask[0] = 0), one
 * length per request entry (0 for failed ones) and the failures with their lines.
 */
export interface SftEncodedBatch {
  ids: Int32Array;
  masks: Uint8Array;
  lengths: Int32Array;
  errors: BadLine[];
}

/**
 * Renders and tokenises a batch of conversations (tokenizeChat); a DataError of one sample becomes
 * an entry of `errors`, any other error fails the batch. Used in-process and by the worker threads.
 * @internal
 */
export function encodeSftBatch(tokenizer: ChatTokenizer, req: SftBatchRequest): SftEncodedBatch {
  const lengths = new Int32Array(req.chats.length);
  const errors: BadLine[] = [];
  const encoded: ReturnType<typeof tokenizeChat>[] = [];
  let total = 0;
  req.chats.forEach((chat, i) => {
    try {
      const tok = tokenizeChat(tokenizer, chat);
      encoded.push(tok);
      lengths[i] = tok.ids.length;
      total += tok.ids.length;
    } catch (e) {
      if (!(e instanceof DataError)) throw e;
      errors.push({ line: req.lines[i], reason: e.message });
    }
  });
  const ids = new Int32Array(total);
  const masks = new Uint8Array(total);
  let at = 0;
  for (const tok of encoded) {
    ids.set(tok.ids, at);
    for (let j = 1; j < tok.ids.length; j++) if (tok.weight[j] > 0) masks[at + j] = 1;
    at += tok.ids.length;
  }
  return { ids, masks, lengths, errors };
}

/** One input record of a batch, in order: parsed (sent for tokenisation) or bad. */
type BatchEntry = { line: number; reason?: undefined } | { line: number; reason: string };

function contentBytes(chat: ChatSample): number {
  let n = 0;
  for (const m of chat.messages) if (typeof m.content === 'string') n += Buffer.byteLength(m.content, 'utf8');
  return n;
}

/** The `<prefix>_sft.json` sidecar describing an SFT output. */
export interface SftSidecar {
  format: typeof SFT_FORMAT.name;
  version: typeof SFT_FORMAT.version;
  tokenizer: string;
  vocabSize: number;
  eodId: number;
  padId: number;
  /** Dataset prefixes, relative to the sidecar's folder. */
  tokens: { prefix: string; dtype: string };
  lossMask: { prefix: string; dtype: 'uint8' };
  seqLength: number;
  truncation: 'drop' | 'truncate';
  /** Training convention, in words, for readers of the file. */
  layout: string;
  samples: number;
  /** Stored tokens (sum of T over samples). */
  tokensStored: number;
  /** Tokens with mask 1. */
  lossTokens: number;
  dropped: number;
  truncated: number;
  badRecords: number;
}

/** What preprocessSft wrote. */
export interface PreprocessSftResult extends PreprocessProgress {
  samples: number;
  /** Records read, good and bad (blank lines are not records). */
  records: number;
  /** Records whose bytes were not valid UTF-8, decoded with U+FFFD replacement (bad ones included). */
  invalidUtf8: number;
  /** Samples not written: longer than seqLength with truncation 'drop', or without loss tokens. */
  dropped: number;
  truncated: number;
  lossTokens: number;
  badLines: BadLine[];
  tokensPrefix: string;
  lossMaskPrefix: string;
  sidecar: string;
}

/** Why samples were not written, for the NO_OUTPUT message. */
interface SftLosses {
  records: number;
  bad: BadLine[];
  /** Dropped for length (truncation 'drop'), and the longest of them in tokens. */
  tooLong: number;
  longest: number;
  /** Dropped because no token within the budget carries loss. */
  noLoss: number;
}

/** The NO_OUTPUT error of an SFT run that wrote no sample: each cause with its count and fix. */
function noSampleError(input: string, seqLength: number, l: SftLosses): DataError {
  if (l.records === 0) {
    return new DataError('NO_OUTPUT', 'no sample written: the input has no records', input);
  }
  const causes: string[] = [];
  const all = (n: number, noun: string): string => (n === l.records ? `all ${n} ${noun}` : `${n} ${noun}`);
  if (l.bad.length > 0) {
    const first = l.bad[0];
    causes.push(
      `${all(l.bad.length, l.bad.length === 1 ? 'record is bad' : 'records are bad')} (first: line ${first.line}: ${first.reason}); fix the records or check that this is the intended input`,
    );
  }
  if (l.tooLong > 0) {
    causes.push(
      `${all(l.tooLong, l.tooLong === 1 ? 'sample is' : 'samples are')} longer than seqLength ${seqLength} (the longest has ${l.longest} tokens); pass a larger --seq-length or --truncation truncate`,
    );
  }
  if (l.noLoss > 0) {
    causes.push(
      `${all(l.noLoss, l.noLoss === 1 ? 'sample has' : 'samples have')} no loss tokens (no assistant token within seqLength ${seqLength}, or loss_weight 0 on every assistant turn); give them assistant replies with loss or pass a larger --seq-length`,
    );
  }
  return new DataError('NO_OUTPUT', `no sample written: ${causes.join('; ')}`, input);
}

/**
 * Tokenises SFT conversations into token and loss-mask indexed datasets (format documented above).
 * Fails with TEMPLATE before reading the input when the tokenizer has no chat template, and with
 * NO_OUTPUT, leaving no file, when no sample would be written.
 */
export async function preprocessSft(opts: PreprocessSftOptions): Promise<PreprocessSftResult> {
  const { signal } = opts;
  signal?.throwIfAborted();
  const truncation = opts.truncation ?? 'drop';
  if (!Number.isInteger(opts.seqLength) || opts.seqLength < 1) {
    throw new DataError('INVALID_ARGUMENT', `seqLength must be a positive integer, got ${opts.seqLength}`);
  }
  if (truncation !== 'drop' && truncation !== 'truncate') {
    throw new DataError(
      'INVALID_ARGUMENT',
      `truncation must be 'drop' or 'truncate', got ${String(truncation)}`,
    );
  }
  const workers = opts.workers ?? 1;
  const batchSize = opts.batchSize ?? 64;
  if (!Number.isInteger(workers) || workers < 1) {
    throw new DataError('INVALID_ARGUMENT', `workers must be a positive integer, got ${workers}`);
  }
  if (!Number.isInteger(batchSize) || batchSize < 1) {
    throw new DataError('INVALID_ARGUMENT', `batchSize must be a positive integer, got ${batchSize}`);
  }
  const format = checkInputFile(opts.input, opts.format);
  assertTokenizerDir(opts.tokenizerDir);
  const tokensPrefix = `${opts.outputPrefix}_sft_tokens`;
  const lossMaskPrefix = `${opts.outputPrefix}_sft_loss_mask`;
  const sidecar = `${opts.outputPrefix}_sft.json`;
  checkOutputs(
    [
      { path: `${tokensPrefix}.bin`, kind: 'bin' },
      { path: `${tokensPrefix}.idx`, kind: 'idx' },
      { path: `${lossMaskPrefix}.bin`, kind: 'bin' },
      { path: `${lossMaskPrefix}.idx`, kind: 'idx' },
      { path: sidecar, kind: 'sidecar' },
    ],
    { input: opts.input, tokenizerDir: opts.tokenizerDir, overwrite: opts.overwrite ?? false },
  );
  // The main thread needs the tokenizer anyway, for the vocabulary size and the sidecar.
  const tokenizer = await loadTokenizer(opts.tokenizerDir);
  signal?.throwIfAborted();
  if (tokenizer.chatTemplate === undefined) {
    throw new DataError(
      'TEMPLATE',
      'tokenizer has no chat template (tokenizer_config.json "chat_template" or chat_template.jinja); SFT rendering needs one',
      opts.tokenizerDir,
    );
  }
  const dtype = IndexedDatasetBuilder.optimalDtype(tokenizer.vocabSize);
  const start = performance.now();
  const totals: PreprocessProgress = { documents: 0, tokens: 0, bytes: 0, seconds: 0 };
  const counts = { dropped: 0, truncated: 0, lossTokens: 0 };
  const badLines: BadLine[] = [];
  const losses: SftLosses = { records: 0, bad: badLines, tooLong: 0, longest: 0, noLoss: 0 };
  let invalidUtf8 = 0;
  const bad = (line: number, reason: string): void => {
    if (opts.strict) throw new DataError('INVALID_FORMAT', `line ${line}: ${reason}`, opts.input);
    badLines.push({ line, reason });
  };

  let runner: BatchRunner<SftBatchRequest, SftEncodedBatch> | undefined;
  const builders: IndexedDatasetBuilder[] = [];
  const finalized: string[] = [];
  let ok = false;
  try {
    runner =
      workers === 1
        ? inProcessRunner((req: SftBatchRequest) => encodeSftBatch(tokenizer, req))
        : new WorkerPool<SftBatchRequest, SftEncodedBatch>(workers, {
            task: 'sft',
            tokenizerDir: opts.tokenizerDir,
          });
    const tokens = new IndexedDatasetBuilder(tokensPrefix, { dtype });
    builders.push(tokens);
    const masks = new IndexedDatasetBuilder(lossMaskPrefix, { dtype: 'uint8' });
    builders.push(masks);
    // Applied to each batch in input order: bad records, tokenisation failures and the length policy.
    const write = (batch: SftEncodedBatch, meta: { entries: BatchEntry[]; bytes: number }): void => {
      const failed = new Map(batch.errors.map((e) => [e.line, e.reason]));
      let k = 0; // index of the next tokenised sample in the batch
      let at = 0; // its offset in ids/masks
      for (const entry of meta.entries) {
        if (entry.reason !== undefined) {
          bad(entry.line, entry.reason);
          continue;
        }
        const len = batch.lengths[k++];
        const ids = batch.ids.subarray(at, at + len);
        const fullMask = batch.masks.subarray(at, at + len);
        at += len;
        const failure = failed.get(entry.line);
        if (failure !== undefined) {
          bad(entry.line, failure);
          continue;
        }
        // The same length policy as buildSftSamples, applied to unshifted ids: T-1 positions.
        const tooLong = len - 1 > opts.seqLength;
        if (tooLong && truncation === 'drop') {
          counts.dropped++;
          losses.tooLong++;
          losses.longest = Math.max(losses.longest, len);
          continue;
        }
        const t = Math.min(len, opts.seqLength + 1);
        const mask = fullMask.subarray(0, t);
        let loss = 0;
        for (let j = 1; j < t; j++) loss += mask[j];
        // No target left (prompt fills the budget, or zero-weight turns): nothing to learn from.
        if (loss === 0) {
          counts.dropped++;
          losses.noLoss++;
          continue;
        }
        if (tooLong) counts.truncated++;
        tokens.addDocument(ids.subarray(0, t));
        masks.addDocument(mask);
        counts.lossTokens += loss;
        totals.documents++;
        totals.tokens += t;
      }
      totals.bytes += meta.bytes;
      totals.seconds = (performance.now() - start) / 1000;
      opts.onProgress?.({ ...totals });
    };
    const batches = new OrderedBatches(runner, workers * 2, write, signal);

    let req: SftBatchRequest = { lines: [], chats: [] };
    let pending = { entries: [] as BatchEntry[], bytes: 0 };
    for await (const r of readRecords(opts.input, { format })) {
      signal?.throwIfAborted();
      losses.records++;
      if (r.invalidUtf8) {
        if (opts.strict)
          throw new DataError('INVALID_FORMAT', `line ${r.lineNumber}: invalid UTF-8`, opts.input);
        invalidUtf8++;
      }
      if ('reason' in r) {
        pending.entries.push({ line: r.lineNumber, reason: r.reason });
      } else {
        try {
          const chat = parseSftRecord(r.record, detectSftFormat(r.record));
          req.lines.push(r.lineNumber);
          req.chats.push(chat);
          pending.entries.push({ line: r.lineNumber });
          pending.bytes += contentBytes(chat);
        } catch (e) {
          if (!(e instanceof DataError)) throw e;
          pending.entries.push({ line: r.lineNumber, reason: e.message });
        }
      }
      if (pending.entries.length >= batchSize) {
        await batches.submit(req, pending);
        req = { lines: [], chats: [] };
        pending = { entries: [], bytes: 0 };
      }
    }
    if (pending.entries.length > 0) await batches.submit(req, pending);
    await batches.drain();
    if (totals.documents === 0) throw noSampleError(opts.input, opts.seqLength, losses);
    signal?.throwIfAborted();
    const sidecarMeta: SftSidecar = {
      format: SFT_FORMAT.name,
      version: SFT_FORMAT.version,
      tokenizer: resolve(opts.tokenizerDir),
      vocabSize: tokenizer.vocabSize,
      eodId: tokenizer.eodId,
      padId: tokenizer.padId,
      tokens: { prefix: basename(tokensPrefix), dtype },
      lossMask: { prefix: basename(lossMaskPrefix), dtype: 'uint8' },
      seqLength: opts.seqLength,
      truncation,
      layout:
        'one sequence per sample in both datasets, same lengths; input=tokens[:-1], labels=tokens[1:], loss_mask=mask[1:]',
      samples: totals.documents,
      tokensStored: totals.tokens,
      lossTokens: counts.lossTokens,
      dropped: counts.dropped,
      truncated: counts.truncated,
      badRecords: badLines.length,
    };
    // The sidecar is written last and, when replacing an older output, removed first: whoever
    // finds a sidecar finds the complete set of datasets it describes.
    rmSync(sidecar, { force: true });
    tokens.finalize();
    finalized.push(tokensPrefix);
    masks.finalize();
    finalized.push(lossMaskPrefix);
    // Written to a temporary name and renamed, like the datasets, so a reader never sees half a file.
    const tmp = `${sidecar}.tmp-${process.pid}`;
    try {
      writeFileSync(tmp, `${JSON.stringify(sidecarMeta, null, 2)}\n`);
      renameSync(tmp, sidecar);
    } finally {
      rmSync(tmp, { force: true });
    }
    ok = true;
  } finally {
    if (!ok) {
      for (const b of builders) b.abort();
      // A failure after the first finalize() would leave half an output; remove it.
      for (const prefix of finalized) {
        rmSync(`${prefix}.idx`, { force: true });
        rmSync(`${prefix}.bin`, { force: true });
      }
    }
    await runner?.close();
  }
  totals.seconds = (performance.now() - start) / 1000;
  opts.onProgress?.({ ...totals });
  return {
    ...totals,
    ...counts,
    samples: totals.documents,
    records: losses.records,
    invalidUtf8,
    badLines,
    tokensPrefix,
    lossMaskPrefix,
    sidecar,
  };
}

function basename(prefix: string): string {
  const i = Math.max(prefix.lastIndexOf('/'), prefix.lastIndexOf('\\'));
  return prefix.slice(i + 1);
}
