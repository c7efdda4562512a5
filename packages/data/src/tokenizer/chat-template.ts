import { readFile } from 'node:fs/promises';
import { Template } from '@huggingface/jinja';
import { DataError } from '../errors.js';
import type { ChatTemplateOptions, TemplateMessage } from './types.js';

/** A special token in tokenizer_config.json: a plain string or a serialized AddedToken. */
export type ConfigToken = string | { content: string } | null | undefined;

/** The parts of tokenizer_config.json that chat templates and special ids use. */
export interface TokenizerConfig {
  chat_template?: string | { name: string; template: string }[] | null;
  bos_token?: ConfigToken;
  eos_token?: ConfigToken;
  pad_token?: ConfigToken;
  unk_token?: ConfigToken;
  sep_token?: ConfigToken;
  cls_token?: ConfigToken;
  mask_token?: ConfigToken;
  additional_special_tokens?: ConfigToken[];
  [key: string]: unknown;
}

/** The text of a config token, whichever form it was written in. */
export function tokenContent(token: ConfigToken): string | undefined {
  if (token === null || token === undefined) return undefined;
  if (typeof token === 'string') return token;
  return typeof token.content === 'string' ? token.content : undefined;
}

// The special-token names transformers puts into the template context (its `special_tokens_map`).
const SPECIAL_KEYS = [
  'bos_token',
  'eos_token',
  'unk_token',
  'sep_token',
  'pad_token',
  'cls_token',
  'mask_token',
] as const;

// @huggingface/jinja defines these globals itself and refuses to redeclare them.
const RESERVED_VARS = new Set([
  'raise_exception',
  'strftime_now',
  'range',
  'true',
  'false',
  'none',
  'True',
  'False',
  'None',
]);

/** A compiled Hugging Face chat template with the special tokens of its tokenizer_config. */
export class ChatTemplate {
  private readonly template: Template;
  private readonly tools: Template | undefined;
  private readonly context: Record<string, unknown>;
  private readonly source: string | undefined;

  /**
   * @param template the Jinja source, or HF's list of named templates (`default`, `tool_use`)
   * @param specialTokens bos_token, eos_token, … as the template context sees them
   * @param source the file the template came from, for error messages
   */
  constructor(
    template: NonNullable<TokenizerConfig['chat_template']>,
    specialTokens: Record<string, unknown> = {},
    source?: string,
  ) {
    this.source = source;
    this.context = specialTokens;
    if (typeof template === 'string') {
      this.template = this.compile(template);
    } else {
      // transformers picks `tool_use` when tools are given and it exists, else `default`.
      const byName = new Map(template.map((t) => [t.name, t.template]));
      const main = byName.get('default') ?? template[0]?.template;
      if (main === undefined) throw new DataError('TEMPLATE', 'chat_template list is empty', source);
      this.template = this.compile(main);
      const toolUse = byName.get('tool_use');
      this.tools = toolUse === undefined ? undefined : this.compile(toolUse);
    }
  }

  /** Builds the template from a parsed tokenizer_config.json; undefined when it has none. */
  static fromConfig(config: TokenizerConfig, source?: string): ChatTemplate | undefined {
    if (config.chat_template === undefined || config.chat_template === null) return undefined;
    return new ChatTemplate(config.chat_template, specialTokensOf(config), source);
  }

  /** Renders messages the way transformers' `apply_chat_template(tokenize=False)` does. */
  render(messages: readonly TemplateMessage[], options: ChatTemplateOptions = {}): string {
    const vars = options.templateVars ?? {};
    for (const key of Object.keys(vars)) {
      if (RESERVED_VARS.has(key)) {
        throw new DataError(
          'INVALID_ARGUMENT',
          `template variable "${key}" is a built-in and cannot be overridden`,
        );
      }
    }
    const tools = options.tools !== undefined && options.tools.length > 0 ? options.tools : undefined;
    const template = tools !== undefined && this.tools !== undefined ? this.tools : this.template;
    try {
      return template.render({
        ...this.context,
        ...vars,
        messages,
        // HF passes tools=None when absent; templates test `{% if tools %}`.
        tools: tools ?? null,
        add_generation_prompt: options.addGenerationPrompt ?? false,
      });
    } catch (err) {
      // raise_exception and runtime errors come out of jinja as plain Errors.
      throw new DataError('TEMPLATE', `chat template failed: ${(err as Error).message}`, this.source);
    }
  }

  private compile(text: string): Template {
    try {
      return new Template(text);
    } catch (err) {
      throw new DataError('TEMPLATE', `chat template does not parse: ${(err as Error).message}`, this.source);
    }
  }
}

/** The special-token variables transformers passes to chat templates, from a tokenizer_config. */
export function specialTokensOf(config: TokenizerConfig): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of SPECIAL_KEYS) {
    const text = tokenContent(config[key]);
    if (text !== undefined) out[key] = text;
  }
  if (Array.isArray(config.additional_special_tokens)) {
    out.additional_special_tokens = config.additional_special_tokens
      .map(tokenContent)
      .filter((t) => t !== undefined);
  }
  return out;
}

/** Reads a JSON file, with DataErrors that name it. */
export async function readJsonFile(path: string, code: 'TOKENIZER' | 'TEMPLATE'): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT')
      throw new DataError('MISSING_FILE', 'file not found', path);
    throw new DataError(code, `cannot read: ${(err as Error).message}`, path);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new DataError(code, `invalid JSON: ${(err as Error).message}`, path);
  }
}

/** Loads the chat template of a tokenizer_config.json file. */
export async function loadChatTemplate(configPath: string): Promise<ChatTemplate> {
  const config = (await readJsonFile(configPath, 'TEMPLATE')) as TokenizerConfig;
  const template = ChatTemplate.fromConfig(config, configPath);
  if (template === undefined) throw new DataError('TEMPLATE', 'no chat_template in this file', configPath);
  return template;
}
