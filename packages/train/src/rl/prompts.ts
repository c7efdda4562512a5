// The RL run's prompts and rewards: JSON lines read and tokenized as `megapatch generate` reads its
// prompts (text, or a chat rendered with the model's template), each line kept whole for the reward
// function; the built-in rule-based rewards (verl's and ChatLearn's are rule-based too) and user
// reward modules.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import type { TemplateMessage, Tokenizer } from '@megapatch/data';
import { TrainError } from '../errors.js';

/** One prompt of the run: its line, its token ids and the line's fields (for the reward). */
export interface RlPrompt {
  /** 1-based line number in the prompts file. */
  line: number;
  ids: number[];
  sample: Record<string, unknown>;
}

/** What a tokenizer needs to render prompts (the chat template is optional). */
type PromptTokenizer = Pick<Tokenizer, 'encode' | 'bosId'> & {
  applyChatTemplateIds?: Tokenizer['applyChatTemplateIds'];
  chatTemplate?: unknown;
};

/**
 * Reads the prompts: JSON lines with "prompt" (text, encoded without special tokens, or with `chat`
 * one user message rendered by the chat template with its generation prompt) or "messages" (a
 * chat); BOS is put in front when the tokenizer has one. Prompts longer than `maxPromptTokens`
 * are left out (verl's filter_overlong_prompts), and counted in `skipped`.
 */
export function readRlPrompts(
  file: string,
  tok: PromptTokenizer,
  opts: { chat: boolean; maxPromptTokens: number },
): { prompts: RlPrompt[]; skipped: number } {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new TrainError(
      'DATA',
      `rl.promptsPath ${file}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`,
    );
  }
  const prompts: RlPrompt[] = [];
  let skipped = 0;
  const lines = text.split('\n');
  for (const [i, raw] of lines.entries()) {
    const line = i + 1;
    if (raw.trim() === '') continue;
    const where = `${file} line ${line}`;
    let sample: unknown;
    try {
      sample = JSON.parse(raw);
    } catch (e) {
      throw new TrainError('DATA', `${where}: not valid JSON (${(e as Error).message})`);
    }
    if (typeof sample !== 'object' || sample === null || Array.isArray(sample)) {
      throw new TrainError('DATA', `${where}: give an object with "prompt" or "messages"`);
    }
    const s = sample as Record<string, unknown>;
    let ids: number[];
    if (Array.isArray(s.messages) || opts.chat) {
      if (!tok.chatTemplate || !tok.applyChatTemplateIds) {
        throw new TrainError(
          'DATA',
          `${where}: the model's tokenizer has no chat template; give {"prompt": "..."} lines${opts.chat ? ' and set rl.chat false' : ''}`,
        );
      }
      const messages = Array.isArray(s.messages)
        ? (s.messages as TemplateMessage[])
        : [{ role: 'user', content: String(s.prompt ?? '') }];
      ids = tok.applyChatTemplateIds(messages, { addGenerationPrompt: true });
    } else if (typeof s.prompt === 'string') {
      ids = s.prompt === '' ? [] : tok.encode(s.prompt, { addSpecialTokens: false });
    } else {
      throw new TrainError('DATA', `${where}: give "prompt" (a string) or "messages" (a list)`);
    }
    if (tok.bosId !== null && ids[0] !== tok.bosId) ids.unshift(tok.bosId);
    if (ids.length === 0) {
      throw new TrainError(
        'DATA',
        `${where}: the prompt is empty and the tokenizer has no BOS token to start from`,
      );
    }
    if (ids.length > opts.maxPromptTokens) {
      skipped++;
      continue;
    }
    prompts.push({ line, ids, sample: s });
  }
  if (prompts.length === 0) {
    throw new TrainError(
      'DATA',
      `rl.promptsPath ${file}: no prompt of at most ${opts.maxPromptTokens} tokens (data.seqLength − rl.maxNewTokens)${skipped ? `; ${skipped} longer ones left out` : ''}`,
    );
  }
  return { prompts, skipped };
}

/** A reward function: the response's text and its prompt line's fields → a number. */
export type RewardFunction = (response: string, sample: Record<string, unknown>) => number | Promise<number>;

/** A number in text: digits with optional thousands commas, sign and decimals. */
const NUMBER = /[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?/g;

function parseNumber(s: string): number | null {
  const v = Number(s.replace(/,/g, ''));
  return Number.isFinite(v) ? v : null;
}

/**
 * The final answer of a text, GSM8K style: the number after the last "####", else inside the last
 * \boxed{...}, else the last number in the text (null when there is none).
 */
export function finalAnswer(text: string): number | null {
  const hashes = text.lastIndexOf('####');
  if (hashes >= 0) {
    const m = text.slice(hashes + 4).match(NUMBER);
    return m ? parseNumber(m[0]) : null;
  }
  const boxed = text.lastIndexOf('\\boxed{');
  if (boxed >= 0) {
    const end = text.indexOf('}', boxed);
    const m = text.slice(boxed + 7, end < 0 ? undefined : end).match(NUMBER);
    if (m) return parseNumber(m[0]);
  }
  const all = text.match(NUMBER);
  return all ? parseNumber(all[all.length - 1]) : null;
}

function answerOf(sample: Record<string, unknown>): string {
  const a = sample.answer ?? sample.ground_truth;
  if (a === undefined || a === null) {
    throw new TrainError(
      'DATA',
      'the built-in rewards read each prompt line\'s "answer" (or "ground_truth"): the line has none',
    );
  }
  return String(a);
}

/** The built-in rewards by name. */
export const BUILTIN_REWARDS: Readonly<Record<string, RewardFunction>> = {
  /** 1 when the response's final number equals the answer's (GSM8K's "#### N" or a number), else 0. */
  math: (response, sample) => {
    const want = finalAnswer(answerOf(sample));
    const got = finalAnswer(response);
    return want !== null && got !== null && Math.abs(want - got) <= 1e-9 * Math.max(1, Math.abs(want))
      ? 1
      : 0;
  },
  /** 1 when the trimmed response equals the trimmed answer, else 0. */
  exact: (response, sample) => (response.trim() === answerOf(sample).trim() ? 1 : 0),
};

/**
 * The reward function `spec` names: a built-in one ("math", "exact"), or a JavaScript module's
 * default export (a path, relative to the working directory).
 */
export async function loadReward(spec: string): Promise<RewardFunction> {
  const builtin = BUILTIN_REWARDS[spec];
  if (builtin) return builtin;
  const file = path.resolve(spec);
  if (!fs.existsSync(file)) {
    throw new TrainError(
      'INVALID_CONFIG',
      `rl.reward ${spec}: neither a built-in reward (${Object.keys(BUILTIN_REWARDS).join(', ')}) nor a file`,
    );
  }
  let mod: { default?: unknown };
  try {
    mod = (await import(pathToFileURL(file).href)) as { default?: unknown };
  } catch (e) {
    throw new TrainError(
      'INVALID_CONFIG',
      `rl.reward ${spec}: the module does not load (${(e as Error).message.split('\n')[0]})`,
    );
  }
  if (typeof mod.default !== 'function') {
    throw new TrainError(
      'INVALID_CONFIG',
      `rl.reward ${spec}: the module's default export must be a function (response, sample) => number`,
    );
  }
  return mod.default as RewardFunction;
}
