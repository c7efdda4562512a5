// Readers for the three SFT corpus shapes used by LLaMA-Factory / Pai-Megatron-Patch: Alpaca,
// ShareGPT (with tools) and OpenAI `messages`. Every record is normalised to a ChatSample.
import { readFileSync } from 'node:fs';
import { DataError } from '../errors.js';
import type { ChatMessage, ChatRole, ChatSample, ToolCall } from './types.js';

/** The record shapes the readers understand. */
export type SftFormat = 'alpaca' | 'sharegpt' | 'openai';

/** A record that could not be parsed: its 1-based line (JSONL) or 0-based index (JSON array). */
export interface SftRecordError {
  /** 1-based line number for JSONL input. */
  line?: number;
  /** 0-based position for JSON-array input. */
  index?: number;
  message: string;
}

/** Options of readSftText / readSftFile. */
export interface ReadSftOptions {
  /** Force one format instead of detecting it per record. */
  format?: SftFormat;
  /** Throw on the first bad record instead of skipping it. */
  strict?: boolean;
}

/** Samples read from a file, the skipped records, and how many records had each format. */
export interface ReadSftResult {
  samples: ChatSample[];
  errors: SftRecordError[];
  formats: Record<SftFormat, number>;
}

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function bad(message: string): DataError {
  return new DataError('INVALID_FORMAT', message);
}

function str(v: unknown, field: string): string {
  if (typeof v !== 'string') throw bad(`field "${field}" must be a string`);
  return v;
}

function optStr(v: unknown, field: string): string | undefined {
  return v === undefined || v === null ? undefined : str(v, field);
}

/** Guesses the format of one record from its keys; undefined when none fits. */
export function detectSftFormat(record: unknown): SftFormat | undefined {
  if (!isObject(record)) return undefined;
  if (Array.isArray(record.messages)) return 'openai';
  if (Array.isArray(record.conversations)) return 'sharegpt';
  if ('instruction' in record && 'output' in record) return 'alpaca';
  return undefined;
}

// Tools arrive either as a JSON string (glaive/LLaMA-Factory) or as an array. Bare function
// schemas are wrapped as {type: 'function', function} because that is what HF templates and
// the OpenAI API expect.
function parseTools(v: unknown): unknown[] | undefined {
  if (v === undefined || v === null || v === '') return undefined;
  let tools = v;
  if (typeof v === 'string') {
    try {
      tools = JSON.parse(v);
    } catch {
      throw bad('field "tools" is not valid JSON');
    }
  }
  if (!Array.isArray(tools)) throw bad('field "tools" must be a list');
  if (tools.length === 0) return undefined;
  return tools.map((t) =>
    isObject(t) && t.type === undefined && 'name' in t ? { type: 'function', function: t } : t,
  );
}

function toolCall(v: unknown): ToolCall {
  // OpenAI shape nests the call under `function` with string arguments.
  const call = isObject(v) && isObject(v.function) ? v.function : v;
  if (!isObject(call) || typeof call.name !== 'string') throw bad('tool call needs a string "name"');
  let args = call.arguments ?? {};
  if (typeof args === 'string') {
    try {
      args = JSON.parse(args);
    } catch {
      // Arguments that are not JSON are kept verbatim; the template will quote them.
    }
  }
  return { name: call.name, arguments: args };
}

function checkConversation(messages: ChatMessage[]): ChatMessage[] {
  if (!messages.some((m) => m.role === 'assistant')) throw bad('conversation has no assistant turn');
  return messages;
}

/** Alpaca: instruction (+ "\n" + input) as the user turn, output as the assistant turn, after
 * an optional system prompt and `history` pairs. */
export function parseAlpaca(record: unknown): ChatSample {
  if (!isObject(record)) throw bad('record is not an object');
  const instruction = str(record.instruction, 'instruction');
  const input = optStr(record.input, 'input');
  const output = str(record.output, 'output');
  const system = optStr(record.system, 'system');
  const messages: ChatMessage[] = [];
  if (system) messages.push({ role: 'system', content: system });
  if (record.history !== undefined && record.history !== null) {
    if (!Array.isArray(record.history)) throw bad('field "history" must be a list of [user, assistant]');
    record.history.forEach((pair, i) => {
      if (!Array.isArray(pair) || pair.length !== 2) throw bad(`history[${i}] must be [user, assistant]`);
      messages.push({ role: 'user', content: str(pair[0], `history[${i}][0]`) });
      messages.push({ role: 'assistant', content: str(pair[1], `history[${i}][1]`) });
    });
  }
  // LLaMA-Factory joins instruction and input with a newline when input is non-empty.
  messages.push({ role: 'user', content: input ? `${instruction}\n${input}` : instruction });
  messages.push({ role: 'assistant', content: output });
  const sample: ChatSample = { messages: checkConversation(messages) };
  const tools = parseTools(record.tools);
  if (tools) sample.tools = tools;
  return sample;
}

const SHAREGPT_ROLES: Record<string, ChatRole | 'function_call'> = {
  human: 'user',
  user: 'user',
  gpt: 'assistant',
  assistant: 'assistant',
  system: 'system',
  function_call: 'function_call',
  observation: 'tool',
  tool: 'tool',
};

/** ShareGPT: `conversations` of {from, value}; function_call turns become assistant tool calls
 * and observation turns become tool turns. */
export function parseShareGpt(record: unknown): ChatSample {
  if (!isObject(record) || !Array.isArray(record.conversations))
    throw bad('record has no "conversations" list');
  const messages: ChatMessage[] = [];
  const system = optStr(record.system, 'system');
  if (system) messages.push({ role: 'system', content: system });
  record.conversations.forEach((turn, i) => {
    if (!isObject(turn)) throw bad(`conversations[${i}] is not an object`);
    const from = str(turn.from, `conversations[${i}].from`);
    const value = str(turn.value, `conversations[${i}].value`);
    const role = SHAREGPT_ROLES[from];
    if (!role) throw bad(`conversations[${i}] has unknown role "${from}"`);
    if (role !== 'function_call') {
      messages.push({ role, content: value });
      return;
    }
    // A function_call value is one call or a list of calls as JSON; if it does not parse it
    // stays plain assistant text rather than losing the sample.
    let parsed: unknown;
    try {
      parsed = JSON.parse(value);
    } catch {
      messages.push({ role: 'assistant', content: value });
      return;
    }
    const calls = (Array.isArray(parsed) ? parsed : [parsed]).map(toolCall);
    messages.push({ role: 'assistant', content: '', tool_calls: calls });
  });
  const sample: ChatSample = { messages: checkConversation(messages) };
  const tools = parseTools(record.tools);
  if (tools) sample.tools = tools;
  return sample;
}

function messageContent(v: unknown, where: string): string {
  if (v === null || v === undefined) return '';
  if (typeof v === 'string') return v;
  if (!Array.isArray(v)) throw bad(`${where}.content must be a string or a list of parts`);
  return v
    .map((part, j) => {
      if (!isObject(part)) throw bad(`${where}.content[${j}] is not an object`);
      if (part.type !== 'text')
        throw new DataError(
          'UNSUPPORTED',
          `${where}.content[${j}] has type "${String(part.type)}"; only text is supported`,
        );
      // LLaMA-Factory v1 uses `value`, OpenAI uses `text`.
      return str(part.value ?? part.text, `${where}.content[${j}].value`);
    })
    .join('');
}

const OPENAI_ROLES: ReadonlySet<string> = new Set(['system', 'user', 'assistant', 'tool']);

/** OpenAI `messages`: role/content with content a string or a list of text parts; keeps
 * `tool_calls` and per-turn `loss_weight`. */
export function parseOpenAi(record: unknown): ChatSample {
  if (!isObject(record) || !Array.isArray(record.messages)) throw bad('record has no "messages" list');
  const messages = record.messages.map((m, i): ChatMessage => {
    const where = `messages[${i}]`;
    if (!isObject(m)) throw bad(`${where} is not an object`);
    const role = str(m.role, `${where}.role`);
    if (!OPENAI_ROLES.has(role)) throw bad(`${where} has unknown role "${role}"`);
    const msg: ChatMessage = { role: role as ChatRole, content: messageContent(m.content, where) };
    if (Array.isArray(m.tool_calls) && m.tool_calls.length > 0) msg.tool_calls = m.tool_calls.map(toolCall);
    if (m.loss_weight !== undefined) {
      if (typeof m.loss_weight !== 'number' || !(m.loss_weight >= 0))
        throw bad(`${where}.loss_weight must be a number >= 0`);
      msg.loss_weight = m.loss_weight;
    }
    return msg;
  });
  const sample: ChatSample = { messages: checkConversation(messages) };
  const tools = parseTools(record.tools);
  if (tools) sample.tools = tools;
  return sample;
}

/** Parses one record in the given format, or in the detected one; throws DataError. */
export function parseSftRecord(record: unknown, format?: SftFormat): ChatSample {
  const f = format ?? detectSftFormat(record);
  switch (f) {
    case 'alpaca':
      return parseAlpaca(record);
    case 'sharegpt':
      return parseShareGpt(record);
    case 'openai':
      return parseOpenAi(record);
    default:
      throw bad(
        'record matches no SFT format (alpaca instruction/output, sharegpt conversations, openai messages)',
      );
  }
}

/** Reads SFT samples from the text of a JSON array or a JSONL file (a leading byte order mark is skipped). */
export function readSftText(text: string, opts: ReadSftOptions = {}, file?: string): ReadSftResult {
  // Editors on Windows start UTF-8 files with U+FEFF, which JSON.parse rejects.
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  const result: ReadSftResult = { samples: [], errors: [], formats: { alpaca: 0, sharegpt: 0, openai: 0 } };
  const take = (record: unknown, where: { line?: number; index?: number }): void => {
    try {
      const format = opts.format ?? detectSftFormat(record);
      result.samples.push(parseSftRecord(record, format));
      if (format) result.formats[format]++;
    } catch (e) {
      if (!(e instanceof DataError)) throw e;
      const pos = where.line !== undefined ? `line ${where.line}` : `record ${where.index}`;
      if (opts.strict) throw new DataError(e.code, `${pos}: ${e.message}`, file);
      result.errors.push({ ...where, message: e.message });
    }
  };
  // A JSON array starts with '['; JSONL records are objects, so their text starts with '{'.
  if (text.trimStart().startsWith('[')) {
    let records: unknown;
    try {
      records = JSON.parse(text);
    } catch (e) {
      throw new DataError('INVALID_FORMAT', `not valid JSON: ${(e as Error).message}`, file);
    }
    (records as unknown[]).forEach((r, index) => {
      take(r, { index });
    });
    return result;
  }
  const lines = text.split('\n');
  lines.forEach((raw, i) => {
    if (raw.trim() === '') return;
    let record: unknown;
    try {
      record = JSON.parse(raw);
    } catch {
      const message = 'line is not valid JSON';
      if (opts.strict) throw new DataError('INVALID_FORMAT', `line ${i + 1}: ${message}`, file);
      result.errors.push({ line: i + 1, message });
      return;
    }
    take(record, { line: i + 1 });
  });
  return result;
}

/** Reads SFT samples from a JSON-array or JSONL file. */
export function readSftFile(path: string, opts: ReadSftOptions = {}): ReadSftResult {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch {
    throw new DataError('MISSING_FILE', 'cannot read file', path);
  }
  return readSftText(text, opts, path);
}
