/**
 * One chat message as Hugging Face chat templates read it; the object reaches the template unchanged.
 * No index signature, so SFT's stricter `TemplateMessage` objects are assignable to it.
 */
export interface TemplateMessage {
  role: string;
  content?: string | null;
  /** Assistant tool calls (`{type, function: {name, arguments}}` or `{name, arguments}`). */
  tool_calls?: readonly unknown[];
  /** Qwen3 thinking text of an assistant turn. */
  reasoning_content?: string;
  /** Name of the tool whose output a `tool` message carries. */
  name?: string;
  tool_call_id?: string;
}

/** Options of `Tokenizer.applyChatTemplate`. */
export interface ChatTemplateOptions {
  /** Append the prompt that opens the assistant's turn (HF `add_generation_prompt`). */
  addGenerationPrompt?: boolean;
  /** JSON-schema tool definitions, passed to the template as `tools`. */
  tools?: unknown[];
  /** Extra template variables (e.g. `enable_thinking`), like HF's `**kwargs`. */
  templateVars?: Record<string, unknown>;
}

/** Options of `Tokenizer.encode`. */
export interface EncodeOptions {
  /** Add the model's special tokens (BOS for Llama); default true, as in HF. */
  addSpecialTokens?: boolean;
}

/** Options of `Tokenizer.decode`. */
export interface DecodeOptions {
  /** Drop special tokens from the output; default false. */
  skipSpecialTokens?: boolean;
}

/** The tokenizer used by the rest of @megapatch/data. */
export interface Tokenizer {
  /** Number of ids, added tokens included (`len(tokenizer)` in HF). */
  readonly vocabSize: number;
  /** Beginning-of-sequence id, or null when the model has none (Qwen). */
  readonly bosId: number | null;
  /** End-of-sequence id. */
  readonly eosId: number;
  /** Padding id: the configured pad token, else eos. */
  readonly padId: number;
  /** The id appended after each document by `--append-eod` (eos for these models). */
  readonly eodId: number;
  /** Encodes text to ids; special tokens written in the text are recognised. */
  encode(text: string, options?: EncodeOptions): number[];
  /** Decodes ids to text. */
  decode(ids: readonly number[], options?: DecodeOptions): string;
  /** Encodes several texts. */
  encodeBatch(texts: readonly string[], options?: EncodeOptions): number[][];
  /** Id of a token string (byte-level form, e.g. `Ġworld`), or undefined. */
  tokenToId(token: string): number | undefined;
  /** Token string of an id, or undefined. */
  idToToken(id: number): string | undefined;
  /** Renders the chat template to a string. */
  applyChatTemplate(messages: readonly TemplateMessage[], options?: ChatTemplateOptions): string;
  /** Renders the chat template and encodes it without adding special tokens (the template writes them). */
  applyChatTemplateIds(messages: readonly TemplateMessage[], options?: ChatTemplateOptions): number[];
}
