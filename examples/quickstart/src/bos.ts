// Megatron-LM's preprocess_data.py tokenises with a Hugging Face tokenizer's __call__, which puts
// BOS first (Llama, Mistral), and `megapatch generate` / `megapatch eval` put BOS before every
// prompt and document; a model trained on documents without it never saw the token its prompts
// start with. When `megapatch preprocess pretrain` would write documents without BOS, the stories
// carry it as text ("<s>", a special token the tokenizer recognises), so training sees what
// generation and evaluation show the model.
import { encodePretrainBatch, loadTokenizer } from '@megapatch/data';

/** The text to put before each story: the BOS token when preprocessing would not add it, else "". */
export async function bosPrefix(tokenizerDir: string): Promise<string> {
  const tok = await loadTokenizer(tokenizerDir);
  if (tok.bosId === null) return '';
  // what `megapatch preprocess pretrain --append-eod` writes for a document
  const { tokens } = encodePretrainBatch(tok, ['a'], true);
  return tokens[0] === tok.bosId ? '' : (tok.idToToken(tok.bosId) ?? '');
}
