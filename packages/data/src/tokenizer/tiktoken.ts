import { readFile } from 'node:fs/promises';
import { DataError } from '../errors.js';
import { ChatTemplate } from './chat-template.js';
import type {
  ChatTemplateOptions,
  DecodeOptions,
  EncodeOptions,
  TemplateMessage,
  Tokenizer,
} from './types.js';

/** How to read a tiktoken rank file: the split regex, the special tokens and which of them play which role. */
export interface TiktokenOptions {
  /** The pre-tokenizer regex as the model publishes it (Python/Oniguruma syntax; translated for JS). */
  pattern: string;
  /** Special token text → id; these are recognised in encoded text and never merged. */
  specialTokens: Readonly<Record<string, number>>;
  /** Beginning-of-sequence token, added by `encode` when `addBos` is true. */
  bosToken?: string;
  /** End-of-sequence token (also the eod and, without `padToken`, the pad). */
  eosToken: string;
  /** Padding token. */
  padToken?: string;
  /** Prepend bos when `encode` is asked for special tokens (Llama-3 yes, Qwen no). */
  addBos?: boolean;
  /** Unicode normalization applied to text before splitting (Qwen normalizes to NFC). */
  normalize?: 'NFC' | 'NFKC';
  /** Jinja chat template, rendered with bos_token/eos_token/pad_token. */
  chatTemplate?: string;
}

// Llama 3.1+ special tokens, as in meta-llama/llama-models `models/llama3/tokenizer.py`.
function llama3Specials(): Record<string, number> {
  const named = [
    '<|begin_of_text|>',
    '<|end_of_text|>',
    '<|reserved_special_token_0|>',
    '<|reserved_special_token_1|>',
    '<|finetune_right_pad_id|>',
    '<|reserved_special_token_2|>',
    '<|start_header_id|>',
    '<|end_header_id|>',
    '<|eom_id|>',
    '<|eot_id|>',
    '<|python_tag|>',
  ];
  const out: Record<string, number> = {};
  named.forEach((t, i) => {
    out[t] = 128000 + i;
  });
  for (let id = 128000 + named.length, k = 3; id < 128256; id++, k++)
    out[`<|reserved_special_token_${k}|>`] = id;
  return out;
}

/** Llama-3's `tokenizer.model` (meta-llama/llama-models). */
export const llama3TiktokenOptions: TiktokenOptions = {
  pattern:
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
  specialTokens: llama3Specials(),
  bosToken: '<|begin_of_text|>',
  eosToken: '<|end_of_text|>',
  addBos: true,
};

const QWEN_SPECIALS = [
  '<|endoftext|>',
  '<|im_start|>',
  '<|im_end|>',
  '<|object_ref_start|>',
  '<|object_ref_end|>',
  '<|box_start|>',
  '<|box_end|>',
  '<|quad_start|>',
  '<|quad_end|>',
  '<|vision_start|>',
  '<|vision_end|>',
  '<|vision_pad|>',
  '<|image_pad|>',
  '<|video_pad|>',
  '<tool_call>',
  '</tool_call>',
  '<|fim_prefix|>',
  '<|fim_middle|>',
  '<|fim_suffix|>',
  '<|fim_pad|>',
  '<|repo_name|>',
  '<|file_sep|>',
  '<tool_response>',
  '</tool_response>',
  '<think>',
  '</think>',
];

/**
 * Qwen's `qwen.tiktoken` with the Qwen3 added tokens (151643–151668). The eos is `<|endoftext|>`, the
 * document separator of pre-training; the instruct configs' `<|im_end|>` ends chat turns instead.
 */
export const qwenTiktokenOptions: TiktokenOptions = {
  pattern:
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
  specialTokens: Object.fromEntries(QWEN_SPECIALS.map((t, i) => [t, 151643 + i])),
  eosToken: '<|endoftext|>',
  padToken: '<|endoftext|>',
  addBos: false,
  normalize: 'NFC',
};

// Characters that Unicode simple case folding (used by tiktoken's Rust regex and Oniguruma) adds to ASCII letters.
const EXTRA_FOLDS: Record<string, string> = { s: '\u017f', k: '\u212a' };

/**
 * Translates a tiktoken pattern to a JS `u`-mode regex source. `(?i:…)` groups are not valid in Node 20,
 * so their letters become case classes; `\s`/`\S` become `\p{White_Space}` because JS's `\s` adds U+FEFF
 * and lacks U+0085, unlike Rust's.
 */
export function translateTiktokenPattern(pattern: string): string {
  let out = '';
  let caseless = false;
  let depth = 0; // open groups inside the current (?i: group
  let inClass = false;
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i] as string;
    if (c === '\\') {
      const next = pattern[i + 1];
      if (next === undefined)
        throw new DataError('INVALID_ARGUMENT', `pattern ends with a backslash: ${pattern}`);
      i++;
      if (next === 's') out += '\\p{White_Space}';
      else if (next === 'S') out += '\\P{White_Space}';
      else out += `\\${next}`;
      continue;
    }
    if (inClass) {
      if (c === ']') inClass = false;
      out += c;
      continue;
    }
    if (c === '[') {
      if (caseless) throw new DataError('UNSUPPORTED', `character class inside (?i:…) in ${pattern}`);
      inClass = true;
      out += c;
    } else if (pattern.startsWith('(?i:', i)) {
      if (caseless) throw new DataError('UNSUPPORTED', `nested (?i:…) in ${pattern}`);
      caseless = true;
      depth = 0;
      out += '(?:';
      i += 3;
    } else if (caseless && c === '(') {
      depth++;
      out += c;
    } else if (caseless && c === ')') {
      if (depth === 0) caseless = false;
      else depth--;
      out += c;
    } else if (caseless && /[a-zA-Z]/.test(c)) {
      const lo = c.toLowerCase();
      out += `[${lo}${lo.toUpperCase()}${EXTRA_FOLDS[lo] ?? ''}]`;
    } else {
      out += c;
    }
  }
  if (caseless || inClass) throw new DataError('INVALID_ARGUMENT', `unbalanced pattern: ${pattern}`);
  return out;
}

// GPT-2's byte → printable character map, so token strings look like tokenizer.json's (`Ġworld`).
const BYTE_TO_CHAR: string[] = (() => {
  const map: string[] = new Array(256);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    map[b] = String.fromCharCode(printable ? b : 256 + n++);
  }
  return map;
})();
const CHAR_TO_BYTE = new Map(BYTE_TO_CHAR.map((ch, b) => [ch, b]));

function escapeRegex(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

const CACHE_LIMIT = 200_000;

/**
 * A byte-level BPE tokenizer over tiktoken ranks. Token bytes are held as latin1 strings (one char per
 * byte) so Map lookups stay string-keyed and cheap.
 */
export class TiktokenTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number;
  readonly padId: number;
  readonly eodId: number;
  private readonly ranks: Map<string, number>;
  private readonly decoder: string[];
  private readonly specials: Map<string, number>;
  private readonly specialById: Map<number, string>;
  private readonly splitter: RegExp;
  private readonly specialSplitter: RegExp | undefined;
  private readonly cache = new Map<string, number[]>();
  private readonly addBos: boolean;
  private readonly normalize: 'NFC' | 'NFKC' | undefined;
  private readonly chatTemplate: ChatTemplate | undefined;
  private readonly source: string;

  /**
   * @param ranks token bytes (latin1 string) → rank
   * @param options pattern, special tokens and roles
   * @param source the rank file, for error messages
   */
  constructor(ranks: Map<string, number>, options: TiktokenOptions, source = 'tiktoken') {
    this.source = source;
    this.ranks = ranks;
    this.decoder = [];
    for (const [bytes, rank] of ranks) this.decoder[rank] = bytes;
    this.specials = new Map(Object.entries(options.specialTokens));
    this.specialById = new Map([...this.specials].map(([t, id]) => [id, t]));
    let maxId = this.decoder.length - 1;
    for (const [token, id] of this.specials) {
      if (this.decoder[id] !== undefined) {
        throw new DataError('TOKENIZER', `special token ${token} reuses rank ${id}`, source);
      }
      maxId = Math.max(maxId, id);
    }
    this.vocabSize = maxId + 1;
    try {
      this.splitter = new RegExp(translateTiktokenPattern(options.pattern), 'gu');
    } catch (err) {
      if (err instanceof DataError) throw err;
      throw new DataError('TOKENIZER', `pattern does not compile: ${(err as Error).message}`, source);
    }
    // Longest first, so a special that is a prefix of another never wins.
    const names = [...this.specials.keys()].sort((a, b) => b.length - a.length);
    this.specialSplitter = names.length > 0 ? new RegExp(names.map(escapeRegex).join('|'), 'gu') : undefined;
    const id = (token: string | undefined, role: string): number | undefined => {
      if (token === undefined) return undefined;
      const found = this.specials.get(token) ?? this.tokenToId(token);
      if (found === undefined)
        throw new DataError('TOKENIZER', `${role} token ${token} is not defined`, source);
      return found;
    };
    this.bosId = id(options.bosToken, 'bos') ?? null;
    this.eosId = id(options.eosToken, 'eos') as number;
    this.padId = id(options.padToken, 'pad') ?? this.eosId;
    this.eodId = this.eosId;
    this.addBos = options.addBos ?? false;
    this.normalize = options.normalize;
    this.chatTemplate =
      options.chatTemplate === undefined
        ? undefined
        : new ChatTemplate(
            options.chatTemplate,
            { bos_token: options.bosToken, eos_token: options.eosToken, pad_token: options.padToken },
            source,
          );
  }

  encode(text: string, options: EncodeOptions = {}): number[] {
    const out: number[] = [];
    if ((options.addSpecialTokens ?? true) && this.addBos && this.bosId !== null) out.push(this.bosId);
    if (this.specialSplitter === undefined) {
      this.encodeOrdinary(text, out);
      return out;
    }
    let last = 0;
    for (const m of text.matchAll(this.specialSplitter)) {
      const at = m.index as number;
      if (at > last) this.encodeOrdinary(text.slice(last, at), out);
      out.push(this.specials.get(m[0]) as number);
      last = at + m[0].length;
    }
    if (last < text.length) this.encodeOrdinary(text.slice(last), out);
    return out;
  }

  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    let bytes = '';
    for (const id of ids) {
      const piece = this.decoder[id];
      if (piece !== undefined) {
        bytes += piece;
        continue;
      }
      const special = this.specialById.get(id);
      if (special === undefined)
        throw new DataError('INDEX_OUT_OF_RANGE', `token id ${id} is not in the vocabulary`, this.source);
      // Specials are text, not ranks: add their UTF-8 bytes to the byte string.
      if (!options.skipSpecialTokens) bytes += Buffer.from(special, 'utf8').toString('latin1');
    }
    // Buffer's UTF-8 decoder replaces invalid sequences with U+FFFD, as tiktoken's decode(errors="replace").
    return Buffer.from(bytes, 'latin1').toString('utf8');
  }

  encodeBatch(texts: readonly string[], options?: EncodeOptions): number[][] {
    return texts.map((t) => this.encode(t, options));
  }

  tokenToId(token: string): number | undefined {
    const special = this.specials.get(token);
    if (special !== undefined) return special;
    let bytes = '';
    for (const ch of token) {
      const b = CHAR_TO_BYTE.get(ch);
      if (b === undefined) return undefined;
      bytes += String.fromCharCode(b);
    }
    return this.ranks.get(bytes);
  }

  idToToken(id: number): string | undefined {
    const bytes = this.decoder[id];
    if (bytes === undefined) return this.specialById.get(id);
    let out = '';
    for (let i = 0; i < bytes.length; i++) out += BYTE_TO_CHAR[bytes.charCodeAt(i)];
    return out;
  }

  applyChatTemplate(messages: readonly TemplateMessage[], options?: ChatTemplateOptions): string {
    if (this.chatTemplate === undefined)
      throw new DataError('TEMPLATE', 'no chatTemplate was given', this.source);
    return this.chatTemplate.render(messages, options);
  }

  applyChatTemplateIds(messages: readonly TemplateMessage[], options?: ChatTemplateOptions): number[] {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }

  private encodeOrdinary(text: string, out: number[]): void {
    const normalized = this.normalize === undefined ? text : text.normalize(this.normalize);
    for (const m of normalized.matchAll(this.splitter)) {
      const piece = m[0];
      // ASCII pieces are already their own latin1 byte string; others need UTF-8 encoding first.
      // biome-ignore lint/suspicious/noControlCharactersInRegex: the range is the ASCII test itself
      const bytes = /^[\x00-\x7f]*$/.test(piece) ? piece : Buffer.from(piece, 'utf8').toString('latin1');
      const whole = this.ranks.get(bytes);
      if (whole !== undefined) {
        out.push(whole);
        continue;
      }
      let ids = this.cache.get(bytes);
      if (ids === undefined) {
        ids = this.bytePairMerge(bytes);
        if (this.cache.size >= CACHE_LIMIT) this.cache.clear();
        this.cache.set(bytes, ids);
      }
      for (const id of ids) out.push(id);
    }
  }

  /** tiktoken's merge: repeatedly join the adjacent pair whose concatenation has the lowest rank. */
  private bytePairMerge(bytes: string): number[] {
    const starts: number[] = [];
    for (let i = 0; i <= bytes.length; i++) starts.push(i);
    const pairRank = (i: number): number =>
      i + 2 < starts.length
        ? (this.ranks.get(bytes.slice(starts[i], starts[i + 2])) ?? Number.POSITIVE_INFINITY)
        : Number.POSITIVE_INFINITY;
    const rankOf: number[] = [];
    for (let i = 0; i < starts.length - 2; i++) rankOf.push(pairRank(i));
    for (;;) {
      let best = Number.POSITIVE_INFINITY;
      let at = -1;
      for (let i = 0; i < rankOf.length; i++) {
        const r = rankOf[i] as number;
        if (r < best) {
          best = r;
          at = i;
        }
      }
      if (at < 0) break;
      starts.splice(at + 1, 1);
      rankOf.splice(at + 1, 1);
      rankOf[at] = pairRank(at);
      if (at > 0) rankOf[at - 1] = pairRank(at - 1);
      if (rankOf.length > starts.length - 2) rankOf.length = starts.length - 2;
    }
    const ids: number[] = [];
    for (let i = 0; i + 1 < starts.length; i++) {
      const id = this.ranks.get(bytes.slice(starts[i], starts[i + 1]));
      if (id === undefined) {
        throw new DataError(
          'TOKENIZER',
          `byte sequence has no rank (is every single byte ranked?)`,
          this.source,
        );
      }
      ids.push(id);
    }
    return ids;
  }
}

/** Parses a tiktoken rank file (`<base64 token> <rank>` per line) into latin1 byte strings → rank. */
export function parseTiktokenRanks(text: string, source = 'tiktoken'): Map<string, number> {
  const ranks = new Map<string, number>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = (lines[i] as string).trim();
    if (line === '') continue;
    const space = line.indexOf(' ');
    const rank = Number(line.slice(space + 1));
    if (space <= 0 || !Number.isInteger(rank) || rank < 0) {
      throw new DataError('INVALID_FORMAT', `line ${i + 1}: expected "<base64> <rank>"`, source);
    }
    ranks.set(Buffer.from(line.slice(0, space), 'base64').toString('latin1'), rank);
  }
  if (ranks.size === 0) throw new DataError('INVALID_FORMAT', 'no ranks', source);
  return ranks;
}

/** Loads a tiktoken rank file (Llama-3 `tokenizer.model`, `qwen.tiktoken`) with the given options or a preset. */
export async function loadTiktokenTokenizer(
  path: string,
  options: TiktokenOptions,
): Promise<TiktokenTokenizer> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT')
      throw new DataError('MISSING_FILE', 'file not found', path);
    throw new DataError('TOKENIZER', `cannot read: ${(err as Error).message}`, path);
  }
  return new TiktokenTokenizer(parseTiktokenRanks(text, path), options, path);
}
