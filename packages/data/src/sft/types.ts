// Shared SFT types. The tokenizer is described by a minimal interface so that this module does not
// depend on any particular tokenizer implementation.

/** Roles after normalisation; ShareGPT's human/gpt/function_call/observation map onto these. */
export type ChatRole = 'system' | 'user' | 'assistant' | 'tool';

/** One tool call made by an assistant turn, in the shape HF chat templates read. */
export interface ToolCall {
  name: string;
  /** Parsed JSON arguments (templates serialise them with `tojson`). */
  arguments: unknown;
}

/** One chat turn. Field names follow the HF chat-template convention (`tool_calls`), since the
 * message objects are handed to the template as they are. */
export interface ChatMessage {
  role: ChatRole;
  content: string;
  tool_calls?: ToolCall[];
  /** Loss weight of an assistant turn (LLaMA-Factory v1 `loss_weight`); 0 disables its loss. */
  loss_weight?: number;
}

/** A normalised SFT conversation with the tool schemas it may use. */
export interface ChatSample {
  messages: ChatMessage[];
  tools?: unknown[];
}

/** What SFT rendering needs from a tokenizer. */
export interface ChatTokenizer {
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  applyChatTemplate(
    messages: ChatMessage[],
    opts?: { addGenerationPrompt?: boolean; tools?: unknown[] },
  ): string;
  eosId: number;
  padId: number;
}
