// `megapatch generate`: continue prompts with a model (an HF folder or a megapatch checkpoint) and
// its own tokenizer, chat template and EOS ids. On a terminal the text streams as tokens arrive;
// with --json one object per prompt. Under `megapatch launch --nproc-per-node N` the model runs
// with TP = N and global rank 0 prints. The libraries load inside run(), so help costs nothing.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { HfTokenizer, TemplateMessage } from '@megapatch/data';
import type { FinishReason, GPTModel } from '@megapatch/models';
import { z } from 'zod';
import { type Command, type OptionSpec, type OptionValues, withDefaults } from '../command.js';
import { CliError, UsageError } from '../errors.js';
import { type Io, memoryIo } from '../io.js';
import { int, parseOptions } from '../options.js';

const NAME = 'generate';

/** One prompt to continue: text, or chat messages, with the line of the --prompts file it came from. */
export type PromptSpec = { line: number | null } & ({ prompt: string } | { messages: TemplateMessage[] });

/** What `megapatch generate --json` prints per prompt. */
export interface Completion {
  /** The prompt as given: its text, or the messages of a `{"messages"}` line. */
  prompt: string | TemplateMessage[];
  /** The text that follows the prompt: special tokens (EOS) left out, cut before a stop string. */
  completion: string;
  /** The new token ids (EOS included when it ended the row). */
  tokenIds: number[];
  finishReason: FinishReason;
  tokensPerSecond: number;
}

/** A float flag between `min` and `max`. */
function float(min: number, max: number) {
  return z
    .string()
    .trim()
    .regex(/^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i, 'must be a number')
    .transform(Number)
    .pipe(
      z
        .number()
        .refine((n) => n >= min, `must be >= ${min}`)
        .refine((n) => n <= max, `must be <= ${max}`),
    );
}

/** `--dtype fp32|bf16` (or float32 / bfloat16), as the model dtype. */
export const ModelDtype = z.string().transform((s, ctx) => {
  const d = ({ fp32: 'float32', float32: 'float32', bf16: 'bfloat16', bfloat16: 'bfloat16' } as const)[
    s.toLowerCase() as 'fp32'
  ];
  if (!d)
    ctx.addIssue({ code: 'custom', message: `must be fp32 or bf16 (or float32, bfloat16), got '${s}'` });
  return d ?? 'float32';
});

/** `--model`, `--hf-dir` and `--dtype`, shared with `megapatch eval`. */
export const modelOptions = {
  model: {
    type: 'string',
    value: 'DIR',
    description:
      'a Hugging Face model folder, a megapatch checkpoint (any layout, root or iter_N folder), or a Megatron-LM checkpoint (torch or torch_dist format) with --hf-dir',
    required: true,
    aliases: ['load'],
  },
  'hf-dir': {
    type: 'string',
    value: 'DIR',
    description:
      'with a Megatron-LM checkpoint as --model: the Hugging Face folder whose config.json describes the model (its tokenizer files are used too)',
    aliases: ['hf-ckpt-path'],
  },
  dtype: {
    type: 'string',
    value: 'fp32|bf16',
    description: 'weights and activations dtype (norms, softmax and the loss run in fp32)',
    default: 'fp32',
    presets: { bf16: 'bf16' },
  },
} as const satisfies Record<string, OptionSpec>;

const options = {
  ...modelOptions,
  prompt: {
    type: 'string',
    value: 'TEXT',
    description: 'the prompt; "" is BOS alone',
  },
  prompts: {
    type: 'string',
    value: 'FILE.jsonl',
    description: 'one {"prompt": "..."} or {"messages": [{"role", "content"}, ...]} per line',
  },
  chat: {
    type: 'boolean',
    description:
      "render each prompt as one user message with the tokenizer's chat template and its generation prompt",
  },
  'max-new-tokens': {
    type: 'string',
    value: 'N',
    description: 'tokens to generate at most per prompt',
    default: '128',
    aliases: ['out-seq-length'],
  },
  temperature: {
    type: 'string',
    value: 'T',
    description: '0 is greedy decoding; otherwise sample from softmax(logits / T)',
    default: '0',
  },
  'top-p': {
    type: 'string',
    value: 'P',
    description: 'sample from the smallest set of tokens whose probability reaches P',
    default: '1',
    aliases: ['top_p'],
  },
  'top-k': {
    type: 'string',
    value: 'K',
    description: 'sample from the K most likely tokens (0 = all)',
    default: '0',
    aliases: ['top_k'],
  },
  seed: {
    type: 'string',
    value: 'S',
    description:
      'seed of the sampler; each prompt starts from it, so a prompt gives the same text alone or in a file',
    default: '0',
  },
  stop: {
    type: 'string',
    value: 'STR',
    description:
      'a string that ends the completion (cut from it), or a JSON array of them: \'["\\n\\n", "The end"]\'',
  },
  json: {
    type: 'boolean',
    description:
      'print one {"prompt", "completion", "tokenIds", "finishReason", "tokensPerSecond"} per prompt',
  },
} as const satisfies Record<string, OptionSpec>;

const schema = z.object({
  model: z.string().min(1, 'must not be empty'),
  dtype: ModelDtype,
  hfDir: z.string().min(1, 'must not be empty').optional(),
  prompt: z.string().optional(),
  prompts: z.string().min(1, 'must not be empty').optional(),
  chat: z.boolean(),
  maxNewTokens: int(0, 1 << 20),
  temperature: float(0, 1e6),
  topP: float(0, 1).refine((p) => p > 0, 'must be > 0'),
  topK: int(0, 1 << 30),
  seed: int(0, 2 ** 32 - 1),
  stop: z.string().optional(),
  json: z.boolean(),
});
export type GenerateOptions = z.output<typeof schema>;

/** `--stop`: one string, or a JSON array of non-empty strings. */
export function stopStrings(value: string | undefined, flag = '--stop', command = NAME): string[] {
  if (value === undefined) return [];
  let stops: unknown = [value];
  if (value.trimStart().startsWith('[')) {
    try {
      stops = JSON.parse(value);
    } catch {
      throw new UsageError(
        `${flag}: ${JSON.stringify(value)} starts with [ but is not a JSON array of strings`,
        command,
      );
    }
  }
  if (!Array.isArray(stops) || stops.some((s) => typeof s !== 'string' || s === '')) {
    throw new UsageError(`${flag}: must be a non-empty string or a JSON array of non-empty strings`, command);
  }
  return stops as string[];
}

const PromptLine = z.union([
  z.object({ prompt: z.string() }).strict(),
  z
    .object({
      messages: z
        .array(z.object({ role: z.string().min(1), content: z.string().nullable().optional() }).passthrough())
        .min(1),
    })
    .strict(),
]);

/** The prompts of a JSONL file; a bad line is a one-line error naming the file and the line. */
export function readPromptsFile(file: string): PromptSpec[] {
  const text = fs.readFileSync(file, 'utf8');
  const out: PromptSpec[] = [];
  const lines = text.split('\n');
  for (const [i, raw] of lines.entries()) {
    const line = i + 1;
    if (raw.trim() === '') continue;
    let value: unknown;
    try {
      value = JSON.parse(raw);
    } catch (e) {
      throw new CliError('INVALID_INPUT', `${file} line ${line}: not valid JSON (${(e as Error).message})`);
    }
    const parsed = PromptLine.safeParse(value);
    if (!parsed.success) {
      throw new CliError(
        'INVALID_INPUT',
        `${file} line ${line}: expected {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]}`,
      );
    }
    const d = parsed.data;
    out.push(
      'prompt' in d ? { line, prompt: d.prompt } : { line, messages: d.messages as TemplateMessage[] },
    );
  }
  if (out.length === 0) throw new CliError('INVALID_INPUT', `${file} holds no prompts`);
  return out;
}

/** Where a prompt came from, for messages: `--prompt` or `file line 3`. */
const whereOf = (o: GenerateOptions, p: PromptSpec) =>
  p.line === null ? '--prompt' : `${o.prompts} line ${p.line}`;

/**
 * The token ids of a prompt. Text is encoded without special tokens; with --chat, or for a
 * messages line, the chat template renders it (with the generation prompt). Then BOS is put in
 * front when the tokenizer has one and the ids do not already start with it.
 */
export function promptIds(tok: HfTokenizer, p: PromptSpec, chat: boolean, where: string): number[] {
  let ids: number[];
  if ('messages' in p || chat) {
    if (!tok.chatTemplate) {
      throw new CliError(
        'NO_CHAT_TEMPLATE',
        `${where}: the model's tokenizer has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja); ${'messages' in p ? 'give {"prompt": "..."} lines' : 'drop --chat'}`,
      );
    }
    const messages = 'messages' in p ? p.messages : [{ role: 'user', content: p.prompt }];
    ids = tok.applyChatTemplateIds(messages, { addGenerationPrompt: true });
  } else {
    ids = p.prompt === '' ? [] : tok.encode(p.prompt, { addSpecialTokens: false });
  }
  if (tok.bosId !== null && ids[0] !== tok.bosId) ids.unshift(tok.bosId);
  if (ids.length === 0) {
    throw new CliError(
      'INVALID_INPUT',
      `${where}: the prompt is empty and the tokenizer has no BOS token to start from`,
    );
  }
  return ids;
}

/**
 * Decodes new tokens as the text that follows the prompt: the prompt and the new tokens decoded
 * together, less the prompt's text (special tokens left out), so that the space a SentencePiece
 * tokenizer drops at the start of a text is kept (`"Tom and Sue"` + `" were"`, not `"were"`).
 */
export function completionDecoder(tok: HfTokenizer, promptIds: readonly number[]): (ids: number[]) => string {
  const skip = { skipSpecialTokens: true };
  const head = tok.decode(promptIds, skip);
  return (ids) => {
    const all = tok.decode([...promptIds, ...ids], skip);
    return all.startsWith(head) ? all.slice(head.length) : tok.decode(ids, skip);
  };
}

/** EOS ids: the tokenizer's and those of `dir`/generation_config.json (`eos_token_id`, a number or a list). */
export function eosTokenIds(tok: HfTokenizer, dir: string): number[] {
  const ids = new Set([tok.eosId]);
  const file = path.join(dir, 'generation_config.json');
  if (!fs.existsSync(file)) return [...ids];
  let eos: unknown;
  try {
    eos = (JSON.parse(fs.readFileSync(file, 'utf8')) as { eos_token_id?: unknown }).eos_token_id;
  } catch (e) {
    throw new CliError('INVALID_INPUT', `${file}: not valid JSON (${(e as Error).message})`);
  }
  for (const id of Array.isArray(eos) ? eos : eos === undefined || eos === null ? [] : [eos]) {
    if (!Number.isInteger(id)) {
      throw new CliError('INVALID_INPUT', `${file}: eos_token_id must be an integer or a list of them`);
    }
    ids.add(id as number);
  }
  return [...ids];
}

/**
 * The text of `stops`-free, complete characters that can be shown of `text` while generating: a
 * trailing U+FFFD (a multi-byte character whose other bytes are still to come), anything from a
 * stop string on, and a tail that could still become a stop string are held back.
 */
export function streamablePrefix(text: string, stops: readonly string[]): string {
  let end = text.length;
  while (end > 0 && text.charCodeAt(end - 1) === 0xfffd) end--;
  let t = text.slice(0, end);
  for (const s of stops) {
    const at = t.indexOf(s);
    if (at >= 0) t = t.slice(0, at);
  }
  let hold = 0;
  for (const s of stops) {
    for (let k = Math.min(s.length - 1, t.length); k > hold; k--) {
      if (t.endsWith(s.slice(0, k))) {
        hold = k;
        break;
      }
    }
  }
  return t.slice(0, t.length - hold);
}

/** Writes a row's text as its tokens arrive, decoding all of them each time so characters stay whole. */
export class TextStream {
  private readonly ids: number[] = [];
  private shown = '';

  constructor(
    private readonly decode: (ids: number[]) => string,
    private readonly stops: readonly string[],
    private readonly write: (text: string) => void,
  ) {}

  push(id: number): void {
    this.ids.push(id);
    this.show(streamablePrefix(this.decode(this.ids), this.stops));
  }

  /** Shows the rest of the final completion text. */
  end(completion: string): void {
    this.show(completion);
  }

  private show(text: string): void {
    if (text.length > this.shown.length && text.startsWith(this.shown)) {
      this.write(text.slice(this.shown.length));
      this.shown = text;
    }
  }
}

/** This process's place in a `megapatch launch` job (one process when WORLD_SIZE is unset or 1). */
export interface Job {
  rank: number;
  worldSize: number;
  close(): Promise<void>;
}

/**
 * Joins the job when WORLD_SIZE > 1: the process group, then Megatron's parallel state with
 * TP = WORLD_SIZE, which the model then picks up.
 */
export async function joinJob(): Promise<Job> {
  const world = Number(process.env.WORLD_SIZE ?? '1');
  if (!(world > 1)) return { rank: 0, worldSize: 1, close: async () => {} };
  const p = await import('@megapatch/parallel');
  const group = await p.initProcessGroup();
  try {
    await p.initializeModelParallel({ tp: world });
  } catch (e) {
    await p.destroyProcessGroup();
    throw e;
  }
  return {
    rank: group.rank,
    worldSize: world,
    close: async () => {
      p.destroyModelParallel();
      await p.destroyProcessGroup();
    },
  };
}

/** Runs `fn`; a ModelError it throws says which prompt it was about. */
function aboutPrompt<T>(where: string, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    if (e instanceof Error && e.name === 'ModelError') throw new CliError('MODEL', `${where}: ${e.message}`);
    throw e;
  }
}

/** The tokenizer folder, config and architecture of `dir`, without reading any weights. */
export async function describeModel(dir: string, hfDir?: string) {
  const { openWeights } = await import('@megapatch/models');
  const w = openWeights(dir, { verifyChecksums: false, ...(hfDir !== undefined ? { hfConfig: hfDir } : {}) });
  w.source.close();
  return { tokenizerDir: w.tokenizerDir, config: w.config, architecture: w.architecture, kind: w.kind };
}

/** The tokenizer of `dir` (the HF folder or the checkpoint's huggingface/ files). */
export async function modelTokenizer(dir: string, tokenizerDir: string | null): Promise<HfTokenizer> {
  if (!tokenizerDir) {
    throw new CliError(
      'NO_TOKENIZER',
      `${dir} holds no tokenizer files (a megapatch checkpoint keeps them in huggingface/, a Megatron-LM checkpoint reads them from --hf-dir); convert it again from a Hugging Face folder with its tokenizer, or give an --hf-dir that has them`,
    );
  }
  const { loadTokenizer } = await import('@megapatch/data');
  return loadTokenizer(tokenizerDir);
}

/** Loads the model for this job's layout. */
export async function loadForJob(
  dir: string,
  dtype: 'float32' | 'bfloat16',
  hfDir?: string,
): Promise<GPTModel> {
  const { loadModel } = await import('@megapatch/models');
  return loadModel(dir, { dtype, ...(hfDir !== undefined ? { hfConfig: hfDir } : {}) }).model;
}

/**
 * Runs `megapatch generate` with parsed flag values: prints (or streams) each completion, and
 * returns them. `write` receives streamed text on a terminal: Io prints whole lines, so the
 * pieces of a line go to process.stdout directly.
 */
export async function runGenerate(
  values: OptionValues,
  io: Io = memoryIo(),
  write: (text: string) => void = (t) => process.stdout.write(t),
): Promise<Completion[]> {
  const o = parseOptions(schema, withDefaults(generateCommand, values), NAME);
  if ((o.prompt === undefined) === (o.prompts === undefined)) {
    throw new UsageError(
      o.prompt === undefined
        ? 'missing the prompt: give --prompt TEXT or --prompts FILE.jsonl'
        : 'give --prompt or --prompts, not both',
      NAME,
    );
  }
  const stops = stopStrings(o.stop);
  const specs: PromptSpec[] =
    o.prompts !== undefined ? readPromptsFile(o.prompts) : [{ line: null, prompt: o.prompt as string }];

  const described = await describeModel(o.model, o.hfDir);
  const tok = await modelTokenizer(o.model, described.tokenizerDir);
  const limit = described.config.maxPositionEmbeddings;
  const prompts = specs.map((p) => {
    const ids = promptIds(tok, p, o.chat, whereOf(o, p));
    if (ids.length + o.maxNewTokens > limit) {
      throw new CliError(
        'INVALID_INPUT',
        `${whereOf(o, p)}: the prompt (${ids.length} tokens) + --max-new-tokens ${o.maxNewTokens} exceed the model's ${limit} positions; shorten it or lower --max-new-tokens`,
      );
    }
    return ids;
  });
  const eos = eosTokenIds(tok, described.tokenizerDir as string);

  const job = await joinJob();
  const lead = job.rank === 0;
  const streaming = lead && io.out.isTTY && !o.json;
  const { generate } = await import('@megapatch/models');
  const results: Completion[] = [];
  let model: GPTModel | undefined;
  try {
    model = await loadForJob(o.model, o.dtype, o.hfDir);
    let tokens = 0;
    let seconds = 0;
    for (const [i, ids] of prompts.entries()) {
      const p = specs[i];
      const decode = completionDecoder(tok, ids);
      const stream = streaming ? new TextStream(decode, stops, write) : undefined;
      const eosSet = new Set(eos);
      const m = model;
      const r = aboutPrompt(whereOf(o, p), () =>
        generate(m, [ids], {
          maxNewTokens: o.maxNewTokens,
          temperature: o.temperature,
          topP: o.topP,
          topK: o.topK,
          seed: o.seed,
          eosTokenIds: eos,
          stopStrings: stops,
          decode,
          onToken: stream
            ? (_row, t) => {
                if (!eosSet.has(t)) stream.push(t);
              }
            : undefined,
        }),
      );
      const row = r.rows[0];
      const kept = row.finishReason === 'eos' ? row.tokens.slice(0, -1) : row.tokens;
      const completion = row.finishReason === 'stop' ? (row.text as string) : decode(kept);
      const c: Completion = {
        prompt: 'prompt' in p ? p.prompt : p.messages,
        completion,
        tokenIds: row.tokens,
        finishReason: row.finishReason,
        tokensPerSecond: Math.round(r.tokensPerSecond * 10) / 10,
      };
      results.push(c);
      tokens += row.tokens.length;
      seconds += r.seconds;
      if (lead) {
        if (o.json) io.out.log(JSON.stringify(c));
        else if (stream) {
          stream.end(completion);
          write(i + 1 < prompts.length ? '\n\n' : '\n');
        } else io.out.log(i + 1 < prompts.length ? `${completion}\n` : completion);
      }
      // between prompts, let an interrupt or a closed stdout stop the run
      await new Promise<void>((resolve) => setImmediate(resolve));
      io.throwIfStopped();
    }
    if (lead && !o.json) {
      const rate = seconds > 0 ? (tokens / seconds).toFixed(1) : '0';
      io.note(`generated ${tokens} tokens in ${seconds.toFixed(2)} s (${rate} tokens/s)`);
    }
  } finally {
    model?.dispose();
    await job.close();
  }
  return results;
}

export const generateCommand: Command = {
  name: NAME,
  summary: 'continue prompts with a model and its tokenizer (greedy or sampled, KV cache)',
  description:
    'Continues --prompt, or each line of --prompts, with the model in --model and the tokenizer beside it ' +
    "(the HF folder, or a megapatch checkpoint's huggingface/ files). Prompt text is encoded without " +
    'special tokens; with --chat (or for {"messages"} lines) the chat template renders it with the ' +
    'generation prompt. Then the BOS token is put in front when the tokenizer has one and the ids do not ' +
    'already start with it; --prompt "" is BOS alone. A row ends at an EOS id of the tokenizer or ' +
    'generation_config.json, at a --stop string, or after --max-new-tokens. Decoding is greedy unless ' +
    '--temperature > 0 (generation_config.json sampling defaults are not applied). On a terminal the text ' +
    'streams as it is generated; otherwise each completion is printed when done. Under megapatch launch ' +
    '--nproc-per-node N the model runs with tensor parallelism N and only rank 0 prints.',
  options,
  examples: [
    'generate --model stories260K --prompt "" --max-new-tokens 256',
    'generate --model Qwen3-0.6B --chat --prompt "Name three prime numbers." --temperature 0.7 --top-p 0.8 --seed 1',
    'generate --model ckpt --prompts prompts.jsonl --json --stop \'["\\n\\n"]\'',
    'launch --nproc-per-node 2 -- megapatch generate --model ckpt --prompt "Once upon a time" --json',
  ],
  run: async ({ options: values, io }) => {
    await runGenerate(values, io);
  },
};

export default generateCommand;
