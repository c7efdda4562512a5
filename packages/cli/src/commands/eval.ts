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
import { EVAL_TASKS, type TaskEvalReport } from './eval-task.js';
import { describeModel, joinJob, loadForJob, ModelDtype, modelOptions, modelTokenizer } from './generate.js';
import { fileLines, LineWriter, parseRecord } from './jsonl.js';

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
  task: {
    type: 'string',
    value: 'perplexity|multiple-choice|loglikelihood|generate-until',
    description:
      "perplexity (the default) scores whole documents; multiple-choice, loglikelihood and generate-until score a JSONL of benchmark documents as lm-evaluation-harness's tasks of those kinds",
    default: 'perplexity',
  },
  'context-key': {
    type: 'string',
    value: 'KEY',
    description: 'tasks: field holding the context (the question) of a document',
    default: 'context',
  },
  'choices-key': {
    type: 'string',
    value: 'KEY',
    description: 'multiple-choice: field holding the list of answers',
    default: 'choices',
  },
  'label-key': {
    type: 'string',
    value: 'KEY',
    description: 'multiple-choice: field holding the index of the right answer (from 0)',
    default: 'label',
  },
  'continuation-key': {
    type: 'string',
    value: 'KEY',
    description:
      'loglikelihood, generate-until: field holding the continuation (the target) to score or match',
    default: 'continuation',
  },
  'target-delimiter': {
    type: 'string',
    value: 'TEXT',
    description:
      "tasks: put between the context and each continuation (lm-evaluation-harness's target_delimiter)",
    default: ' ',
  },
  until: {
    type: 'string',
    value: 'STR',
    description:
      'generate-until: a string that ends a generation, or a JSON array of them (default "\\n\\n"; EOS always ends it)',
  },
  'max-gen-toks': {
    type: 'string',
    value: 'N',
    description: 'generate-until: tokens to generate at most per document',
    default: '256',
  },
  'answer-regex': {
    type: 'string',
    value: 'REGEX',
    description:
      'generate-until: the prediction is the first group of the first match in the generation (the whole match without groups; no match: "[invalid]")',
  },
  'add-bos': {
    type: 'boolean',
    description:
      "tasks: start every context with the tokenizer's BOS (lm-evaluation-harness's add_bos_token)",
  },
  'per-doc': {
    type: 'string',
    value: 'OUT.jsonl',
    description:
      'tasks: write one line per document: {"doc", "loglikelihoods", "greedy", "pred", "predNorm", "label"} (multiple-choice) or {"doc", "loglikelihood", "greedy", "tokens"}',
  },
  overwrite: overwriteOption,
  json: {
    type: 'boolean',
    description:
      'print the report as one JSON object ({"model", "data", "format", "seqLength", "sequences", "tokens", "meanLoss", "perplexity", ...} for perplexity; {"task", "documents", "requests", "acc", "accStderr", "accNorm", ...} for a task)',
  },
} as const;

const schema = z.object({
  model: z.string().min(1, 'must not be empty'),
  dtype: ModelDtype,
  hfDir: z.string().min(1, 'must not be empty').optional(),
  data: z.string().min(1, 'must not be empty'),
  seqLength: int(1, MAX_SEQ_LENGTH),
  batchSize: int(1, 1 << 16),
  jsonKey: z.string().min(1, 'must not be empty'),
  perTokenLogprobs: z.string().min(1, 'must not be empty').optional(),
  task: z.enum(EVAL_TASKS, {
    message: "must be 'perplexity', 'multiple-choice', 'loglikelihood' or 'generate-until'",
  }),
  contextKey: z.string().min(1, 'must not be empty'),
  choicesKey: z.string().min(1, 'must not be empty'),
  labelKey: z.string().min(1, 'must not be empty'),
  continuationKey: z.string().min(1, 'must not be empty'),
  targetDelimiter: z.string(),
  addBos: z.boolean(),
  until: z.string().optional(),
  maxGenToks: int(1, MAX_SEQ_LENGTH),
  answerRegex: z.string().min(1, 'must not be empty').optional(),
  perDoc: z.string().min(1, 'must not be empty').optional(),
  overwrite: z.boolean(),
  json: z.boolean(),
});

/** Flags that belong to one kind of evaluation: perplexity's, or the tasks'. */
const PERPLEXITY_ONLY = ['json-key', 'per-token-logprobs'];
const TASK_ONLY = [
  'until',
  'max-gen-toks',
  'answer-regex',
  'context-key',
  'choices-key',
  'label-key',
  'continuation-key',
  'target-delimiter',
  'add-bos',
  'per-doc',
];

/** Parses `megapatch eval`'s flags, refusing those of the other kind of evaluation. */
function parseEval(values: OptionValues) {
  const o = parseOptions(schema, withDefaults(evalCommand, values), NAME);
  // the parser fills in defaults: a flag counts as given when its value differs from its default
  const given = (names: string[]) =>
    names.filter((n) => {
      const spec = (evalCommand.options as Record<string, { default?: unknown; type: string }>)[n];
      return (
        values[n] !== undefined &&
        values[n] !== (spec.default ?? (spec.type === 'boolean' ? false : undefined))
      );
    });
  const wrong = o.task === 'perplexity' ? given(TASK_ONLY) : given(PERPLEXITY_ONLY);
  if (wrong.length > 0) {
    throw new UsageError(
      `--${wrong[0]} does not apply to --task ${o.task}${o.task === 'perplexity' ? ' (give --task multiple-choice, loglikelihood or generate-until)' : ''}`,
      NAME,
    );
  }
  return o;
}

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
  const o = parseEval(values);
  if (o.task !== 'perplexity') {
    throw new UsageError(`--task ${o.task} is run by runEvalTask, not runEval`, NAME);
  }
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
  const described = await describeModel(o.model, o.hfDir);
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
    const m = await loadForJob(o.model, o.dtype, o.hfDir);
    model = m;
    const settings = { seqLength: o.seqLength, batchSize: o.batchSize };
    if (out !== undefined && lead) {
      const inputs = [
        { flag: '--model', path: o.model },
        ...(o.hfDir !== undefined ? [{ flag: '--hf-dir', path: o.hfDir }] : []),
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

/** Runs `megapatch eval --task multiple-choice | loglikelihood` with parsed flag values. */
export async function runEvalTask(values: OptionValues, io: Io = memoryIo()): Promise<TaskEvalReport> {
  const o = parseEval(values);
  if (o.task === 'perplexity')
    throw new UsageError('runEvalTask needs --task multiple-choice or loglikelihood', NAME);
  const { runTaskEval } = await import('./eval-task.js');
  return runTaskEval({ ...o, task: o.task }, io);
}

export const evalCommand: Command = {
  name: NAME,
  summary:
    'mean loss and perplexity of a model on held-out data, or benchmark accuracy (multiple choice, log-likelihood)',
  description:
    'Scores every document of --data with the model in --model: each document is cut into windows of ' +
    '--seq-length + 1 tokens that overlap by one (inputs = window[:-1], labels = window[1:]), so every token ' +
    'after the first of a document is predicted once, from at most --seq-length earlier tokens of the same ' +
    'document (windows never cross documents). The mean loss is the mean of -log p(token) in nats over those ' +
    "tokens; perplexity is its exp. Text JSONL lines are tokenised as Megatron-LM's preprocess_data.py does " +
    'with a Hugging Face tokenizer and --append-eod: BOS when the tokenizer has one, the text without other ' +
    'special tokens, then EOD. {"ids": [...]} lines and indexed datasets (<prefix>.bin / .idx, e.g. from ' +
    'megapatch preprocess pretrain) are scored as they are, one sequence per document. Under megapatch launch ' +
    '--nproc-per-node N the model runs with tensor parallelism N and only rank 0 prints and writes. ' +
    '--task multiple-choice reads {"context", "choices", "label"} lines and reports acc and acc_norm (the ' +
    "highest log-likelihood, and per character of the choice, is the label's) with standard errors; --task " +
    'loglikelihood reads {"context", "continuation"} lines and reports the mean log-likelihood, perplexity and ' +
    'how often the continuation is the greedy one. Both score as lm-evaluation-harness does: target delimiter ' +
    'between context and continuation, trailing spaces of the context moved to the continuation, context + ' +
    'continuation encoded together, at most --seq-length + 1 tokens kept (the context cut from the left).',
  options,
  examples: [
    'eval --model stories260K --data valid.jsonl --seq-length 256',
    'eval --model ckpt --data data/c4_text_document --seq-length 2048 --bf16 --json',
    'eval --model Qwen3-0.6B --data valid.jsonl --seq-length 1024 --per-token-logprobs logprobs.jsonl',
    'eval --model Qwen3-0.6B --task multiple-choice --data hellaswag.jsonl --seq-length 2048 --per-doc hs.jsonl',
  ],
  run: async ({ options: values, io }) => {
    if (values.task === undefined || values.task === 'perplexity') await runEval(values, io);
    else await runEvalTask(values, io);
  },
};

export default evalCommand;
