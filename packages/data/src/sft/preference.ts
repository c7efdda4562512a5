// Preference pairs (DPO and its kin): a prompt conversation with a chosen and a rejected reply, in
// the shapes LLaMA-Factory and TRL use — ShareGPT (`conversations` with `chosen` / `rejected`
// turns), Alpaca (`instruction`, `input`, `chosen`, `rejected` strings) and TRL's (`prompt`,
// `chosen`, `rejected`: strings or message lists) — and their rendering through the chat template,
// where only the final reply carries loss.
import { readFileSync } from 'node:fs';
import { DataError } from '../errors.js';
import { parseAlpaca, parseOpenAi, parseShareGpt } from './readers.js';
import type { TokenizedChat } from './render.js';
import type { ChatMessage, ChatTokenizer } from './types.js';

/** A prompt conversation and two replies to it, the chosen one preferred. */
export interface PreferenceSample {
  /** The conversation before the reply (system, user, earlier turns). */
  messages: ChatMessage[];
  chosen: ChatMessage;
  rejected: ChatMessage;
  tools?: unknown[];
}

const bad = (message: string) => new DataError('INVALID_FORMAT', message);
const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

/** A reply: a string, a ShareGPT turn {from, value}, a message {role, content}, or a list ending in one. */
function reply(v: unknown, field: string): ChatMessage {
  if (typeof v === 'string') return { role: 'assistant', content: v };
  if (Array.isArray(v)) {
    if (v.length === 0) throw bad(`field "${field}" is an empty list`);
    return reply(v[v.length - 1], `${field}[${v.length - 1}]`);
  }
  if (isObject(v)) {
    const content = v.value ?? v.content;
    const role = v.from ?? v.role;
    if (typeof content !== 'string') throw bad(`field "${field}" needs a string "value" or "content"`);
    if (role !== undefined && !['gpt', 'assistant'].includes(String(role)))
      throw bad(`field "${field}" is a "${String(role)}" turn; the reply must be the assistant's`);
    return { role: 'assistant', content };
  }
  throw bad(`field "${field}" must be a string, a turn or a list of messages`);
}

/** The prompt conversation of a record, parsed as its SFT shape with an empty reply dropped again. */
function promptOf(record: Record<string, unknown>): { messages: ChatMessage[]; tools?: unknown[] } {
  const drop = (s: { messages: ChatMessage[]; tools?: unknown[] }) => ({
    messages: s.messages.slice(0, -1),
    ...(s.tools ? { tools: s.tools } : {}),
  });
  if (Array.isArray(record.conversations)) {
    return drop(
      parseShareGpt({ ...record, conversations: [...record.conversations, { from: 'gpt', value: '' }] }),
    );
  }
  if ('instruction' in record) return drop(parseAlpaca({ ...record, output: '' }));
  if (typeof record.prompt === 'string') return { messages: [{ role: 'user', content: record.prompt }] };
  if (Array.isArray(record.prompt)) {
    return drop(parseOpenAi({ messages: [...record.prompt, { role: 'assistant', content: '' }] }));
  }
  throw bad('record has no prompt: give "conversations" (ShareGPT), "instruction" (Alpaca) or "prompt"');
}

/** Parses one preference record (see the file's head for the shapes). */
export function parsePreferenceRecord(record: unknown): PreferenceSample {
  if (!isObject(record)) throw bad('record is not an object');
  if (record.chosen === undefined || record.rejected === undefined)
    throw bad('record needs "chosen" and "rejected" replies');
  const prompt = promptOf(record);
  if (prompt.messages.length === 0) throw bad('the prompt conversation is empty');
  return { ...prompt, chosen: reply(record.chosen, 'chosen'), rejected: reply(record.rejected, 'rejected') };
}

/** Reads preference pairs from the text of a JSON array or a JSONL file; a bad record is an error naming it. */
export function readPreferenceText(text: string, file?: string): PreferenceSample[] {
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  const parse = (record: unknown, pos: string) => {
    try {
      return parsePreferenceRecord(record);
    } catch (e) {
      if (e instanceof DataError) throw new DataError(e.code, `${pos}: ${e.message}`, file);
      throw e;
    }
  };
  if (text.trimStart().startsWith('[')) {
    let records: unknown;
    try {
      records = JSON.parse(text);
    } catch (e) {
      throw new DataError('INVALID_FORMAT', `not valid JSON: ${(e as Error).message}`, file);
    }
    return (records as unknown[]).map((r, i) => parse(r, `record ${i}`));
  }
  const out: PreferenceSample[] = [];
  for (const [i, raw] of text.split('\n').entries()) {
    if (raw.trim() === '') continue;
    let record: unknown;
    try {
      record = JSON.parse(raw);
    } catch {
      throw new DataError('INVALID_FORMAT', `line ${i + 1}: not valid JSON`, file);
    }
    out.push(parse(record, `line ${i + 1}`));
  }
  return out;
}

/** Reads preference pairs from a JSON-array or JSONL file. */
export function readPreferenceFile(path: string): PreferenceSample[] {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch {
    throw new DataError('MISSING_FILE', 'cannot read file', path);
  }
  return readPreferenceText(text, path);
}

/**
 * The chosen and the rejected conversation tokenised with the chat template; only the final
 * reply's tokens (its end-of-turn token included) carry weight. The reply's span is what the full
 * conversation adds to the prompt rendered with the generation prompt (which must be a prefix of
 * it); earlier turns are not checked, so templates that rewrite past turns (Qwen3 drops their
 * reasoning) still render the final reply exactly.
 */
export function tokenizePreference(
  tokenizer: ChatTokenizer,
  sample: PreferenceSample,
): { chosen: TokenizedChat; rejected: TokenizedChat } {
  const tools = sample.tools ? { tools: sample.tools } : {};
  const encode = (text: string) => tokenizer.encode(text, { addSpecialTokens: false });
  const prompt = encode(
    tokenizer.applyChatTemplate(sample.messages, { ...tools, addGenerationPrompt: true }),
  );
  const render = (reply: ChatMessage): TokenizedChat => {
    const ids = encode(tokenizer.applyChatTemplate([...sample.messages, reply], { ...tools }));
    let i = 0;
    while (i < prompt.length && prompt[i] === ids[i]) i++;
    if (i < prompt.length) {
      throw new DataError(
        'TEMPLATE',
        `chat template is not prefix-stable: the prompt with the generation prompt diverges from the conversation with its reply at token ${i} (${prompt[i]} vs ${ids[i] ?? 'end'})`,
      );
    }
    // the reply ends at its last end-of-turn token (Qwen puts a "\n" after <|im_end|>)
    let end = ids.length;
    const lastEos = ids.lastIndexOf(tokenizer.eosId, end - 1);
    if (lastEos >= prompt.length) end = lastEos + 1;
    const weight = new Float32Array(ids.length);
    weight.fill(1, prompt.length, end);
    return { ids, weight };
  };
  return { chosen: render(sample.chosen), rejected: render(sample.rejected) };
}
