import { access, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer as HfTokenizerImpl } from '@huggingface/tokenizers';
import { DataError } from '../errors.js';
import { ChatTemplate, readJsonFile, type TokenizerConfig, tokenContent } from './chat-template.js';
import type {
  ChatTemplateOptions,
  DecodeOptions,
  EncodeOptions,
  TemplateMessage,
  Tokenizer,
} from './types.js';

/** A Hugging Face `tokenizer.json` + `tokenizer_config.json` tokenizer (via @huggingface/tokenizers). */
export class HfTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number;
  readonly padId: number;
  readonly eodId: number;
  /** The chat template, when the config has one. */
  readonly chatTemplate: ChatTemplate | undefined;
  private readonly impl: HfTokenizerImpl;
  private readonly source: string;

  /**
   * @param tokenizerJson the parsed tokenizer.json
   * @param config the parsed tokenizer_config.json
   * @param source the folder, for error messages
   */
  constructor(tokenizerJson: object, config: TokenizerConfig, source = 'tokenizer') {
    this.source = source;
    try {
      this.impl = new HfTokenizerImpl(tokenizerJson, config);
    } catch (err) {
      throw new DataError('TOKENIZER', `cannot build tokenizer: ${(err as Error).message}`, source);
    }
    this.vocabSize = this.impl.get_vocab(true).size;
    this.bosId = this.specialId(config, 'bos_token') ?? null;
    const eos = this.specialId(config, 'eos_token');
    if (eos === undefined)
      throw new DataError('TOKENIZER', 'tokenizer_config has no usable eos_token', source);
    this.eosId = eos;
    this.padId = this.specialId(config, 'pad_token') ?? eos;
    this.eodId = eos;
    this.chatTemplate = ChatTemplate.fromConfig(config, join(source, 'tokenizer_config.json'));
  }

  encode(text: string, options: EncodeOptions = {}): number[] {
    return this.impl.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
  }

  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    // @huggingface/tokenizers rejects an empty list; an empty sequence is simply empty text.
    if (ids.length === 0) return '';
    // clean_up_tokenization_spaces would rewrite " ." to "." and break exact round trips (Llama-3 sets it true).
    return this.impl.decode(ids as number[], {
      skip_special_tokens: options.skipSpecialTokens ?? false,
      clean_up_tokenization_spaces: false,
    });
  }

  encodeBatch(texts: readonly string[], options: EncodeOptions = {}): number[][] {
    return texts.map((t) => this.encode(t, options));
  }

  tokenToId(token: string): number | undefined {
    return this.impl.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.impl.id_to_token(id);
  }

  applyChatTemplate(messages: readonly TemplateMessage[], options?: ChatTemplateOptions): string {
    if (this.chatTemplate === undefined) {
      throw new DataError('TEMPLATE', 'tokenizer_config.json has no chat_template', this.source);
    }
    return this.chatTemplate.render(messages, options);
  }

  applyChatTemplateIds(messages: readonly TemplateMessage[], options?: ChatTemplateOptions): number[] {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }

  private specialId(
    config: TokenizerConfig,
    key: 'bos_token' | 'eos_token' | 'pad_token',
  ): number | undefined {
    const text = tokenContent(config[key]);
    if (text === undefined) return undefined;
    const id = this.impl.token_to_id(text);
    if (id === undefined)
      throw new DataError('TOKENIZER', `${key} "${text}" is not in the vocabulary`, this.source);
    return id;
  }
}

/** Loads a Hugging Face tokenizer folder (`tokenizer.json`, `tokenizer_config.json`, optional `chat_template.jinja`). */
export async function loadTokenizer(dir: string): Promise<HfTokenizer> {
  const json = await readJsonFile(join(dir, 'tokenizer.json'), 'TOKENIZER');
  const configPath = join(dir, 'tokenizer_config.json');
  const config = (await readJsonFile(configPath, 'TOKENIZER')) as TokenizerConfig;
  if (typeof json !== 'object' || json === null || !('model' in json)) {
    throw new DataError('TOKENIZER', 'not a tokenizer.json (no "model")', join(dir, 'tokenizer.json'));
  }
  if (typeof config !== 'object' || config === null) {
    throw new DataError('TOKENIZER', 'tokenizer_config.json is not an object', configPath);
  }
  // Newer transformers saves the template beside the config instead of inside it.
  const jinjaPath = join(dir, 'chat_template.jinja');
  if (config.chat_template === undefined && (await exists(jinjaPath))) {
    config.chat_template = await readFile(jinjaPath, 'utf8');
  }
  return new HfTokenizer(json, config, dir);
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}
