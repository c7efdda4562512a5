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
import { renameSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { DataError } from '../errors.js';
import { IndexedDatasetBuilder } from '../indexed-dataset.js';
import { detectSftFormat, parseSftRecord } from '../sft/readers.js';
import { tokenizeChat } from '../sft/render.js';
import type { ChatSample } from '../sft/types.js';
import { loadTokenizer } from '../tokenizer/hf.js';
import type { BadLine, PreprocessProgress } from './pretrain.js';
import { assertInputFile, type InputFormat, readRecords } from './readers.js';

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
  /** Fail at the first bad record instead of counting and skipping it. */
  strict?: boolean;
  format?: InputFormat;
  onProgress?: (progress: PreprocessProgress) => void;
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
  dropped: number;
  truncated: number;
  lossTokens: number;
  badLines: BadLine[];
  tokensPrefix: string;
  lossMaskPrefix: string;
  sidecar: string;
}

/** Tokenises SFT conversations into token and loss-mask indexed datasets (format documented above). */
export async function preprocessSft(opts: PreprocessSftOptions): Promise<PreprocessSftResult> {
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
  assertInputFile(opts.input);
  const tokenizer = await loadTokenizer(opts.tokenizerDir);
  const tokensPrefix = `${opts.outputPrefix}_sft_tokens`;
  const lossMaskPrefix = `${opts.outputPrefix}_sft_loss_mask`;
  const sidecar = `${opts.outputPrefix}_sft.json`;
  const dtype = IndexedDatasetBuilder.optimalDtype(tokenizer.vocabSize);
  const start = performance.now();
  const totals: PreprocessProgress = { documents: 0, tokens: 0, bytes: 0, seconds: 0 };
  const counts = { dropped: 0, truncated: 0, lossTokens: 0 };
  const badLines: BadLine[] = [];
  const bad = (line: number, reason: string): void => {
    if (opts.strict) throw new DataError('INVALID_FORMAT', `line ${line}: ${reason}`, opts.input);
    badLines.push({ line, reason });
  };

  const tokens = new IndexedDatasetBuilder(tokensPrefix, { dtype });
  const masks = new IndexedDatasetBuilder(lossMaskPrefix, { dtype: 'uint8' });
  let ok = false;
  try {
    for await (const r of readRecords(opts.input, { format: opts.format })) {
      if ('reason' in r) {
        bad(r.lineNumber, r.reason);
        continue;
      }
      let chat: ChatSample;
      try {
        chat = parseSftRecord(r.record, detectSftFormat(r.record));
      } catch (e) {
        if (!(e instanceof DataError)) throw e;
        bad(r.lineNumber, e.message);
        continue;
      }
      let tok: ReturnType<typeof tokenizeChat>;
      try {
        tok = tokenizeChat(tokenizer, chat);
      } catch (e) {
        if (!(e instanceof DataError)) throw e;
        bad(r.lineNumber, e.message);
        continue;
      }
      // The same length policy as buildSftSamples, applied to unshifted ids: T-1 positions.
      const tooLong = tok.ids.length - 1 > opts.seqLength;
      if (tooLong && truncation === 'drop') {
        counts.dropped++;
        continue;
      }
      const t = Math.min(tok.ids.length, opts.seqLength + 1);
      const mask = new Uint8Array(t);
      let loss = 0;
      for (let j = 1; j < t; j++) {
        if (tok.weight[j] > 0) {
          mask[j] = 1;
          loss++;
        }
      }
      // No target left (prompt fills the budget, or zero-weight turns): nothing to learn from.
      if (loss === 0) {
        counts.dropped++;
        continue;
      }
      if (tooLong) counts.truncated++;
      tokens.addDocument(tok.ids.slice(0, t));
      masks.addDocument(mask);
      counts.lossTokens += loss;
      totals.documents++;
      totals.tokens += t;
      totals.seconds = (performance.now() - start) / 1000;
      if (totals.documents % 64 === 0) opts.onProgress?.({ ...totals });
    }
    tokens.finalize();
    masks.finalize();
    const meta: SftSidecar = {
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
    // Written to a temporary name and renamed, like the datasets, so a reader never sees half a file.
    const tmp = `${sidecar}.tmp-${process.pid}`;
    writeFileSync(tmp, `${JSON.stringify(meta, null, 2)}\n`);
    renameSync(tmp, sidecar);
    ok = true;
  } finally {
    if (!ok) {
      tokens.abort();
      masks.abort();
    }
  }
  totals.seconds = (performance.now() - start) / 1000;
  opts.onProgress?.({ ...totals });
  return { ...totals, ...counts, samples: totals.documents, badLines, tokensPrefix, lossMaskPrefix, sidecar };
}

function basename(prefix: string): string {
  const i = Math.max(prefix.lastIndexOf('/'), prefix.lastIndexOf('\\'));
  return prefix.slice(i + 1);
}
