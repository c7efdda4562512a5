// `megapatch eval`: the mean loss and perplexity of a model on held-out data (a text JSONL, an ids
// JSONL or a Megatron indexed dataset), optionally with every token's log-probability written as
// JSON lines. Under `megapatch launch --nproc-per-node N` the model runs with TP = N and rank 0
// prints and writes.
import * as fs from 'node:fs';
import type { HfTokenizer, IndexedDataset } from '@megapatch/data';
import type { GPTModel, SequenceLogprobs } from '@megapatch/models';
import { z } from 'zod';
import { type Command, type OptionValues, withDefaults } from '../command.js';
import { CliError, UsageError } from '../errors.js';
import { type Io, memoryIo } from '../io.js';
import { int, overwriteOption, parseOptions } from '../options.js';
import { withOutput } from '../outputs.js';
import { MAX_SEQ_LENGTH } from './data.js';
import { describeModel, joinJob, loadForJob, ModelDtype, modelOptions, modelTokenizer } from './generate.js';

const NAME = 'eval';

const options = {
  ...modelOptions,
  data: {
    type: 'string',
    value: 'PATH',
    description:
      'a JSONL of {"text": "..."} (see --json-key) or {"ids": [...]} lines, or an indexed-dataset prefix (<prefix>.bin / .idx)',
    required: true,
    aliases: ['data-path'],
  },
  'seq-length': {
    type: 'string',
    value: 'N',
    description:
      'tokens the model sees per window; longer documents are cut into windows of N + 1 tokens overlapping by one',
    required: true,
  },
  'batch-size': {
    type: 'string',
    value: 'N',
    description: 'windows per forward pass',
    default: '8',
    aliases: ['micro-batch-size'],
  },
  'json-key': {
    type: 'string',
    value: 'KEY',
    description: 'field holding the text in a text JSONL',
    default: 'text',
    aliases: ['json-keys'],
  },
  'per-token-logprobs': {
    type: 'string',
    value: 'OUT.jsonl',
    description: 'write {"ids", "logprobs"} per document: logprobs[i] = log p(ids[i + 1] | ids[0..i])',
  },
  overwrite: overwriteOption,
  json: {
    type: 'boolean',
    description:
      'print one {"model", "data", "format", "seqLength", "sequences", "tokens", "meanLoss", "perplexity", "seconds", "tokensPerSecond"}',
  },
} as const;

const schema = z.object({
  model: z.string().min(1, 'must not be empty'),
  dtype: ModelDtype,
  data: z.string().min(1, 'must not be empty'),
  seqLength: int(1, MAX_SEQ_LENGTH),
  batchSize: int(1, 1 << 16),
  jsonKey: z.string().min(1, 'must not be empty'),
  perTokenLogprobs: z.string().min(1, 'must not be empty').optional(),
  overwrite: z.boolean(),
  json: z.boolean(),
});

/** How the data was read. */
export type DataFormat = 'text-jsonl' | 'ids-jsonl' | 'indexed';

/** What `megapatch eval --json` prints. */
export interface EvalReport {
  model: string;
  data: string;
  format: DataFormat;
  seqLength: number;
  sequences: number;
  tokens: number;
  meanLoss: number;
  perplexity: number;
  seconds: number;
  tokensPerSecond: number;
}

/** The indexed-dataset prefix `data` names (`x`, `x.bin` or `x.idx` with both files there), or null. */
function indexedPrefix(data: string): string | null {
  const prefix = /\.(bin|idx)$/.test(data) ? data.slice(0, -4) : data;
  return fs.existsSync(`${prefix}.bin`) && fs.existsSync(`${prefix}.idx`) ? prefix : null;
}

/** The lines of a file, read in chunks, with their 1-based numbers (blank lines skipped). */
function* fileLines(file: string): Generator<{ line: number; text: string }> {
  const fd = fs.openSync(file, 'r');
  try {
    const chunk = Buffer.alloc(1 << 20);
    const decoder = new TextDecoder();
    let rest = '';
    let line = 0;
    for (;;) {
      const n = fs.readSync(fd, chunk, 0, chunk.length, null);
      rest += n > 0 ? decoder.decode(chunk.subarray(0, n), { stream: true }) : decoder.decode();
      const parts = rest.split('\n');
      rest = n > 0 ? (parts.pop() as string) : '';
      for (const text of parts) {
        line++;
        if (text.trim() !== '') yield { line, text };
      }
      if (n === 0) return;
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** One JSONL record as an object; anything else is a one-line error naming the line. */
function parseRecord(file: string, line: number, text: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new CliError('INVALID_INPUT', `${file} line ${line}: not valid JSON (${(e as Error).message})`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) {
    throw new CliError('INVALID_INPUT', `${file} line ${line}: expected a JSON object`);
  }
  return v as Record<string, unknown>;
}

/** The format of a JSONL file, from its first record: `{"ids"}` lines, or text. */
function jsonlFormat(file: string): DataFormat {
  const first = fileLines(file).next();
  if (first.done) throw new CliError('INVALID_INPUT', `${file} holds no documents`);
  return 'ids' in parseRecord(file, first.value.line, first.value.text) ? 'ids-jsonl' : 'text-jsonl';
}

/**
 * The documents of a JSONL file as token ids: `{"ids"}` lines as they are; text lines as
 * Megatron-LM's preprocess_data.py writes them with a Hugging Face tokenizer and --append-eod: BOS
 * (when the tokenizer has one), the text without other special tokens, then EOD.
 */
function* jsonlDocuments(
  file: string,
  jsonKey: string,
  vocabSize: number,
  tok: HfTokenizer | null,
): Generator<number[]> {
  for (const { line, text } of fileLines(file)) {
    const record = parseRecord(file, line, text);
    if (tok) {
      const t = record[jsonKey];
      if (typeof t !== 'string') {
        throw new CliError(
          'INVALID_INPUT',
          `${file} line ${line}: no string field "${jsonKey}" (set --json-key, or give {"ids": [...]} on every line)`,
        );
      }
      const ids = tok.encode(t, { addSpecialTokens: false });
      yield [...(tok.bosId === null ? [] : [tok.bosId]), ...ids, tok.eodId];
      continue;
    }
    const ids = record.ids;
    if (!Array.isArray(ids)) {
      throw new CliError(
        'INVALID_INPUT',
        `${file} line ${line}: expected {"ids": [...]} like the first line`,
      );
    }
    const bad = ids.findIndex((x) => !(Number.isInteger(x) && x >= 0 && x < vocabSize));
    if (bad >= 0) {
      throw new CliError(
        'INVALID_INPUT',
        `${file} line ${line}: ids[${bad}] = ${JSON.stringify(ids[bad])} is not a token id of the model (0 to ${vocabSize - 1})`,
      );
    }
    yield ids as number[];
  }
}

/** The sequences of an indexed dataset, checked against the vocabulary. */
function* indexedDocuments(ds: IndexedDataset, prefix: string, vocabSize: number): Generator<Int32Array> {
  for (let i = 0; i < ds.length; i++) {
    const ids = ds.get(i);
    const bad = ids.findIndex((x) => x < 0 || x >= vocabSize);
    if (bad >= 0) {
      throw new CliError(
        'INVALID_INPUT',
        `${prefix}.bin: sequence ${i} has token ${ids[bad]} at position ${bad}, outside the model's vocabulary (0 to ${vocabSize - 1}); was it tokenised for another model?`,
      );
    }
    yield ids;
  }
}

/** Writes JSON lines to `<file>.tmp-<pid>`, renamed to `file` when complete. */
class LineWriter {
  private readonly tmp: string;
  private fd: number | undefined;

  constructor(private readonly file: string) {
    this.tmp = `${file}.tmp-${process.pid}`;
    this.fd = fs.openSync(this.tmp, 'w');
  }

  write(line: string): void {
    fs.writeSync(this.fd as number, `${line}\n`);
  }

  commit(): void {
    fs.fsyncSync(this.fd as number);
    fs.closeSync(this.fd as number);
    this.fd = undefined;
    fs.renameSync(this.tmp, this.file);
  }

  abort(): void {
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
    fs.rmSync(this.tmp, { force: true });
  }
}

/** Whether `file` is a --per-token-logprobs output: a file whose first line is `{"ids", "logprobs"}`. */
function isLogprobsFile(file: string): boolean {
  if (!fs.statSync(file).isFile()) return false;
  const first = fileLines(file).next();
  if (first.done) return true;
  try {
    const v = JSON.parse(first.value.text) as Record<string, unknown>;
    return Array.isArray(v?.ids) && Array.isArray(v?.logprobs);
  } catch {
    return false;
  }
}

/** A document's `{"ids", "logprobs"}` line; each log-probability is the float32 value the loss gave, in 9 digits. */
const logprobLine = (s: SequenceLogprobs) =>
  JSON.stringify({
    ids: s.ids,
    logprobs: Array.from(s.logprobs, (x) => Number(Math.fround(x).toPrecision(9))),
  });

/** Totals of {@link scoreDocuments}. */
interface Totals {
  sequences: number;
  tokens: number;
  /** Sum of −log p over the scored tokens. */
  loss: number;
  seconds: number;
}

/**
 * Scores documents in groups of about four batches, turning the event loop between groups so that
 * an interrupt stops the run; a progress line goes to stderr every few seconds.
 */
async function scoreDocuments(
  model: GPTModel,
  documents: Iterable<ArrayLike<number>>,
  o: { seqLength: number; batchSize: number },
  io: Io,
  onSequence: ((s: SequenceLogprobs) => void) | undefined,
  lead: boolean,
): Promise<Totals> {
  const { evaluate } = await import('@megapatch/models');
  const t0 = performance.now();
  let lastNote = t0;
  const totals: Totals = { sequences: 0, tokens: 0, loss: 0, seconds: 0 };
  const iterator = documents[Symbol.iterator]();
  for (let done = false; !done; ) {
    const group: ArrayLike<number>[] = [];
    let windows = 0;
    while (windows < 4 * o.batchSize) {
      const next = iterator.next();
      if (next.done) {
        done = true;
        break;
      }
      group.push(next.value);
      windows += Math.ceil(Math.max(0, next.value.length - 1) / o.seqLength);
    }
    if (group.length === 0) break;
    const r = evaluate(model, group, { ...o, onSequence });
    totals.sequences += r.sequences;
    if (r.tokens > 0) {
      totals.tokens += r.tokens;
      totals.loss += r.meanLoss * r.tokens;
    }
    await new Promise<void>((resolve) => setImmediate(resolve));
    io.throwIfStopped();
    const now = performance.now();
    if (lead && now - lastNote > 5000) {
      lastNote = now;
      const rate = (totals.tokens / ((now - t0) / 1000)).toFixed(1);
      io.note(`progress: ${totals.sequences} documents, ${totals.tokens} tokens, ${rate} tokens/s`);
    }
  }
  totals.seconds = (performance.now() - t0) / 1000;
  return totals;
}

/** Runs `megapatch eval` with parsed flag values; prints the report and returns it. */
export async function runEval(values: OptionValues, io: Io = memoryIo()): Promise<EvalReport> {
  const o = parseOptions(schema, withDefaults(evalCommand, values), NAME);
  const prefix = indexedPrefix(o.data);
  if (!prefix && !fs.existsSync(o.data)) {
    throw new UsageError(
      `--data ${o.data}: no such file, and no ${o.data}.bin / ${o.data}.idx; give a JSONL file or an indexed-dataset prefix`,
      NAME,
    );
  }
  const out = o.perTokenLogprobs;
  if (out !== undefined && fs.existsSync(out)) {
    if (!o.overwrite) {
      throw new CliError('EXISTS', `--per-token-logprobs ${out} exists; pass --overwrite to replace it`);
    }
    if (!isLogprobsFile(out)) {
      throw new CliError(
        'NOT_OURS',
        `--per-token-logprobs ${out} is not a file megapatch eval wrote (its first line is not {"ids", "logprobs"}); --overwrite replaces only those, so remove it yourself or choose another path`,
      );
    }
  }
  const described = await describeModel(o.model);
  const { maxPositionEmbeddings, vocabSize } = described.config;
  if (o.seqLength > maxPositionEmbeddings) {
    throw new UsageError(
      `--seq-length ${o.seqLength} exceeds the model's ${maxPositionEmbeddings} positions (max_position_embeddings)`,
      NAME,
    );
  }
  const { IndexedDataset } = await import('@megapatch/data');
  const ds = prefix ? IndexedDataset.open(prefix) : null;
  const job = await joinJob();
  const lead = job.rank === 0;
  let model: GPTModel | undefined;
  let totals: Totals;
  let format: DataFormat;
  try {
    format = ds ? 'indexed' : jsonlFormat(o.data);
    const tok = format === 'text-jsonl' ? await modelTokenizer(o.model, described.tokenizerDir) : null;
    const documents =
      ds && prefix
        ? indexedDocuments(ds, prefix, vocabSize)
        : jsonlDocuments(o.data, o.jsonKey, vocabSize, tok);
    const m = await loadForJob(o.model, o.dtype);
    model = m;
    const settings = { seqLength: o.seqLength, batchSize: o.batchSize };
    if (out !== undefined && lead) {
      const inputs = [
        { flag: '--model', path: o.model },
        ...(prefix
          ? ['.bin', '.idx'].map((e) => ({ flag: '--data', path: `${prefix}${e}` }))
          : [{ flag: '--data', path: o.data }]),
      ];
      const outputs = [{ flag: '--per-token-logprobs', path: out }];
      totals = await withOutput(io, NAME, { target: out, outputs, inputs }, async () => {
        const writer = new LineWriter(out);
        try {
          const t = await scoreDocuments(
            m,
            documents,
            settings,
            io,
            (s) => writer.write(logprobLine(s)),
            lead,
          );
          if (t.tokens > 0) writer.commit();
          else writer.abort();
          return t;
        } catch (e) {
          writer.abort();
          throw e;
        }
      });
    } else totals = await scoreDocuments(m, documents, settings, io, undefined, lead);
  } finally {
    model?.dispose();
    ds?.close();
    await job.close();
  }
  if (totals.tokens === 0) {
    throw new CliError(
      'INVALID_INPUT',
      `${o.data}: nothing to score (${totals.sequences} documents, none with 2 tokens or more)`,
    );
  }
  const meanLoss = totals.loss / totals.tokens;
  const report: EvalReport = {
    model: o.model,
    data: prefix ?? o.data,
    format,
    seqLength: o.seqLength,
    sequences: totals.sequences,
    tokens: totals.tokens,
    meanLoss,
    perplexity: Math.exp(meanLoss),
    seconds: totals.seconds,
    tokensPerSecond: totals.seconds > 0 ? totals.tokens / totals.seconds : 0,
  };
  if (lead) {
    if (o.json) io.out.log(JSON.stringify(report));
    else {
      io.out.log(`mean loss: ${meanLoss.toFixed(6)}, perplexity: ${report.perplexity.toFixed(4)}`);
      io.out.log(
        `documents: ${report.sequences}, tokens: ${report.tokens}, seconds: ${report.seconds.toFixed(2)}, ` +
          `tokens/s: ${report.tokensPerSecond.toFixed(1)}`,
      );
      if (out !== undefined) io.out.log(`wrote ${out}`);
    }
  }
  return report;
}

export const evalCommand: Command = {
  name: NAME,
  summary: 'mean loss and perplexity of a model on held-out data, with per-token log-probabilities',
  description:
    'Scores every document of --data with the model in --model: each document is cut into windows of ' +
    '--seq-length + 1 tokens that overlap by one (inputs = window[:-1], labels = window[1:]), so every token ' +
    'after the first of a document is predicted once, from at most --seq-length earlier tokens of the same ' +
    'document (windows never cross documents). The mean loss is the mean of -log p(token) in nats over those ' +
    "tokens; perplexity is its exp. Text JSONL lines are tokenised as Megatron-LM's preprocess_data.py does " +
    'with a Hugging Face tokenizer and --append-eod: BOS when the tokenizer has one, the text without other ' +
    'special tokens, then EOD. {"ids": [...]} lines and indexed datasets (<prefix>.bin / .idx, e.g. from ' +
    'megapatch preprocess pretrain) are scored as they are, one sequence per document. Under megapatch launch ' +
    '--nproc-per-node N the model runs with tensor parallelism N and only rank 0 prints and writes.',
  options,
  examples: [
    'eval --model stories260K --data valid.jsonl --seq-length 256',
    'eval --model ckpt --data data/c4_text_document --seq-length 2048 --bf16 --json',
    'eval --model Qwen3-0.6B --data valid.jsonl --seq-length 1024 --per-token-logprobs logprobs.jsonl',
  ],
  run: async ({ options: values, io }) => {
    await runEval(values, io);
  },
};

export default evalCommand;
