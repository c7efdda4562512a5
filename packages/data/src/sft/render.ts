// Rendering a ChatSample through the tokenizer's chat template into training tensors where only
// assistant tokens carry loss.
//
// Loss spans are found the way Pai-Megatron-Patch / LLaMA-Factory do it for arbitrary templates:
// for every assistant turn k the template is rendered for messages[0..k) with the generation
// prompt and for messages[0..k] with the turn; the tokens between the two lengths are the turn's
// reply. This only works if each rendered prefix tokenises to a prefix of the full conversation's
// ids, which is asserted (a template that rewrites earlier turns, e.g. one that strips reasoning
// from past turns, breaks it and is reported rather than silently mis-masked).
import { DataError } from '../errors.js';
import type { ChatSample, ChatTokenizer } from './types.js';

/** Label value of positions that carry no loss (PyTorch cross-entropy ignore_index). */
export const IGNORE_INDEX = -100;

/**
 * One training sample in the Megatron convention. With `ids` the T tokens of the rendered
 * conversation: `inputIds = ids[0 .. T-1)` and `labels[i] = ids[i+1]` (the next-token target of
 * position i) when token i+1 carries loss, else IGNORE_INDEX; `lossMask[i]` is the loss weight of
 * predicting ids[i+1] (1, or the turn's loss_weight; 0 where labels is IGNORE_INDEX). All three
 * have length T-1: this is Megatron's `tokens[:-1]` / `labels[1:]`.
 */
export interface SftSample {
  inputIds: Int32Array;
  labels: Int32Array;
  lossMask: Float32Array;
}

/** The unshifted token ids of a conversation and the loss weight of each token as a target. */
export interface TokenizedChat {
  ids: number[];
  /** weight[j] > 0 iff token j is part of an assistant reply (including its end-of-turn token). */
  weight: Float32Array;
}

function encode(tokenizer: ChatTokenizer, text: string): number[] {
  // The template already emits every special token; the tokenizer must not add BOS/EOS again.
  return tokenizer.encode(text, { addSpecialTokens: false });
}

function assertPrefix(prefix: number[], full: number[], what: string): void {
  const n = Math.min(prefix.length, full.length);
  let i = 0;
  while (i < n && prefix[i] === full[i]) i++;
  if (i < prefix.length) {
    throw new DataError(
      'TEMPLATE',
      `chat template is not prefix-stable: the ids of ${what} diverge from the full conversation's at token ${i} ` +
        `(${prefix[i]} vs ${full[i] ?? 'end'}); loss masks cannot be derived from token boundaries`,
    );
  }
}

/** Tokenises a conversation with its chat template and marks the tokens of every assistant turn. */
export function tokenizeChat(tokenizer: ChatTokenizer, sample: ChatSample): TokenizedChat {
  const { messages, tools } = sample;
  const toolOpt = tools && tools.length > 0 ? { tools } : {};
  const ids = encode(tokenizer, tokenizer.applyChatTemplate(messages, { ...toolOpt }));
  const weight = new Float32Array(ids.length);
  messages.forEach((m, k) => {
    if (m.role !== 'assistant') return;
    const turnWeight = m.loss_weight ?? 1;
    const before = encode(
      tokenizer,
      tokenizer.applyChatTemplate(messages.slice(0, k), { ...toolOpt, addGenerationPrompt: true }),
    );
    const upto = encode(tokenizer, tokenizer.applyChatTemplate(messages.slice(0, k + 1), { ...toolOpt }));
    assertPrefix(before, upto, `messages[0..${k}) with the generation prompt`);
    assertPrefix(upto, ids, `messages[0..${k}]`);
    if (turnWeight <= 0) return;
    let end = upto.length;
    // Templates put separators after the end-of-turn token (Qwen's "\n" after <|im_end|>); those
    // are part of the next turn's framing, not of the reply, so the span ends at the last EOS.
    const lastEos = upto.lastIndexOf(tokenizer.eosId, end - 1);
    if (lastEos >= before.length) end = lastEos + 1;
    for (let j = before.length; j < end; j++) weight[j] = turnWeight;
  });
  return { ids, weight };
}

/** Shifts tokenised ids into the Megatron (inputIds, labels, lossMask) triple; keeps at most
 * `maxTokens + 1` ids so that the result has at most `maxTokens` positions. */
export function shiftTokens(chat: TokenizedChat, maxTokens = Number.POSITIVE_INFINITY): SftSample {
  const t = Math.min(chat.ids.length, maxTokens + 1);
  const n = Math.max(t - 1, 0);
  const inputIds = new Int32Array(n);
  const labels = new Int32Array(n);
  const lossMask = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    inputIds[i] = chat.ids[i];
    const w = chat.weight[i + 1];
    labels[i] = w > 0 ? chat.ids[i + 1] : IGNORE_INDEX;
    lossMask[i] = Math.max(w, 0);
  }
  return { inputIds, labels, lossMask };
}

/** Renders one conversation into an SftSample (no length limit). */
export function renderSftSample(tokenizer: ChatTokenizer, sample: ChatSample): SftSample {
  return shiftTokens(tokenizeChat(tokenizer, sample));
}

/** Options of buildSftSamples. */
export interface BuildSftOptions {
  /** Most positions (inputIds length, i.e. T-1) a sample may have; unlimited when absent. */
  maxLength?: number;
  /** What to do with longer samples: drop them, or cut them to maxLength. Default 'drop'. */
  truncation?: 'drop' | 'truncate';
}

/** Counts of a build: samples kept, dropped (too long, or no loss token left), truncated, and
 * the total number of positions kept. */
export interface SftStats {
  samples: number;
  dropped: number;
  truncated: number;
  tokens: number;
}

/** Renders many conversations, applying the length policy, and reports what happened. */
export function buildSftSamples(
  tokenizer: ChatTokenizer,
  samples: Iterable<ChatSample>,
  opts: BuildSftOptions = {},
): { samples: SftSample[]; stats: SftStats } {
  const maxLength = opts.maxLength ?? Number.POSITIVE_INFINITY;
  const truncation = opts.truncation ?? 'drop';
  if (!(maxLength >= 1))
    throw new DataError('INVALID_ARGUMENT', `maxLength must be >= 1, got ${opts.maxLength}`);
  if (truncation !== 'drop' && truncation !== 'truncate') {
    throw new DataError(
      'INVALID_ARGUMENT',
      `truncation must be 'drop' or 'truncate', got ${String(truncation)}`,
    );
  }
  const out: SftSample[] = [];
  const stats: SftStats = { samples: 0, dropped: 0, truncated: 0, tokens: 0 };
  for (const chat of samples) {
    const tok = tokenizeChat(tokenizer, chat);
    const tooLong = tok.ids.length - 1 > maxLength;
    if (tooLong && truncation === 'drop') {
      stats.dropped++;
      continue;
    }
    const s = shiftTokens(tok, maxLength);
    // A sample whose prompt fills the budget (Pai drops prompt >= max length) or whose turns all
    // have zero weight would contribute nothing but padding-like compute.
    if (!s.lossMask.some((w) => w > 0)) {
      stats.dropped++;
      continue;
    }
    if (tooLong) stats.truncated++;
    stats.samples++;
    stats.tokens += s.inputIds.length;
    out.push(s);
  }
  return { samples: out, stats };
}
