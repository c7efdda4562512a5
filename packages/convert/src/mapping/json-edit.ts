// Edits top-level members of a JSON object in place, keeping every other byte of the text. A
// parse/stringify round trip would turn `0.0` into `0`, and transformers 5 rejects an int where its
// config dataclass declares a float, so exported config.json files are edited, never re-serialised.
import { ConvertError } from '../errors.js';

interface Member {
  key: string;
  /** Offset of the opening quote of the key. */
  start: number;
  /** Offset just after the value. */
  end: number;
  valueStart: number;
}

function skipWs(text: string, i: number): number {
  while (i < text.length && /\s/.test(text[i])) i++;
  return i;
}

// Offset just after the JSON string starting at i (an opening quote).
function skipString(text: string, i: number): number {
  for (let j = i + 1; j < text.length; j++) {
    if (text[j] === '\\') j++;
    else if (text[j] === '"') return j + 1;
  }
  throw new ConvertError('INVALID_FORMAT', 'unterminated string in JSON');
}

// Offset just after the JSON value starting at i.
function skipValue(text: string, i: number): number {
  if (text[i] === '"') return skipString(text, i);
  if (text[i] === '{' || text[i] === '[') {
    let depth = 0;
    for (let j = i; j < text.length; j++) {
      const c = text[j];
      if (c === '"') j = skipString(text, j) - 1;
      else if (c === '{' || c === '[') depth++;
      else if (c === '}' || c === ']') {
        depth--;
        if (depth === 0) return j + 1;
      }
    }
    throw new ConvertError('INVALID_FORMAT', 'unbalanced brackets in JSON');
  }
  let j = i;
  while (j < text.length && !/[\s,}\]]/.test(text[j])) j++;
  return j;
}

function members(text: string): { list: Member[]; close: number } {
  let i = skipWs(text, 0);
  if (text[i] !== '{') throw new ConvertError('INVALID_FORMAT', 'JSON text is not an object');
  i = skipWs(text, i + 1);
  const list: Member[] = [];
  while (text[i] !== '}') {
    const start = i;
    const keyEnd = skipString(text, i);
    const key = JSON.parse(text.slice(start, keyEnd)) as string;
    i = skipWs(text, keyEnd);
    if (text[i] !== ':')
      throw new ConvertError('INVALID_FORMAT', `expected ':' after key ${JSON.stringify(key)}`);
    const valueStart = skipWs(text, i + 1);
    const end = skipValue(text, valueStart);
    list.push({ key, start, end, valueStart });
    i = skipWs(text, end);
    if (text[i] === ',') i = skipWs(text, i + 1);
    else if (text[i] !== '}')
      throw new ConvertError('INVALID_FORMAT', `expected ',' or '}' after ${JSON.stringify(key)}`);
  }
  return { list, close: i };
}

/**
 * Sets (`set`, values written with JSON.stringify) and deletes (`remove`) top-level members of the
 * JSON object `text`; all other text, number spellings included, is kept as it was.
 */
export function editJsonObject(
  text: string,
  edits: { set?: Record<string, unknown>; remove?: readonly string[] },
): string {
  JSON.parse(text);
  let out = text;
  for (const key of edits.remove ?? []) {
    const { list } = members(out);
    const k = list.findIndex((m) => m.key === key);
    if (k < 0) continue;
    // Drop the member with the separator that follows it, or (for the last one) the one before it.
    const from = k === list.length - 1 && k > 0 ? list[k - 1].end : list[k].start;
    const to = k === list.length - 1 ? list[k].end : list[k + 1].start;
    out = out.slice(0, from) + out.slice(to);
  }
  for (const [key, value] of Object.entries(edits.set ?? {})) {
    const { list, close } = members(out);
    const m = list.find((x) => x.key === key);
    const json = JSON.stringify(value);
    if (m) {
      out = out.slice(0, m.valueStart) + json + out.slice(m.end);
    } else if (list.length === 0) {
      out = `${out.slice(0, close)}${JSON.stringify(key)}: ${json}${out.slice(close)}`;
    } else {
      const last = list[list.length - 1];
      // Repeat the whitespace that precedes the last member, so the indentation matches.
      const lineStart = out.lastIndexOf('\n', last.start);
      const indent = lineStart >= 0 ? out.slice(lineStart, last.start) : ' ';
      out = `${out.slice(0, last.end)},${indent}${JSON.stringify(key)}: ${json}${out.slice(last.end)}`;
    }
  }
  JSON.parse(out);
  return out;
}
