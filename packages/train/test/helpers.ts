// A tiny model and corpus for training tests: a synthetic Llama HF folder (F32) and an indexed
// dataset of short patterned documents the model can learn.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { IndexedDatasetBuilder } from '@megapatch/data';
import { parseRunConfig, type RunConfigInput } from '../src/index.js';

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** An HF folder of a small Llama (4 layers, hidden 64, GQA, vocab 1000) with F32 weights. */
export function tinyLlama(dir: string, id = 'llama-tied'): string {
  const m = SYNTHETIC_MODELS.find((x) => x.id === id);
  writeSyntheticHfCheckpoint(dir, m?.config as Record<string, unknown>, {
    dtype: 'F32',
    maxShardSize: '1GB',
  });
  return dir;
}

/** `docs` documents of counting patterns (each ends with EOD `eod`): `<prefix>.bin/.idx`. */
export function patternCorpus(prefix: string, docs = 400, eod = 2, vocab = 700): string {
  const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
  let a = 12345;
  for (let d = 0; d < docs; d++) {
    a = (a * 1103515245 + 12345) % 2147483648;
    const start = 10 + (a % 50);
    const step = 1 + (a % 3);
    const len = 20 + (a % 30);
    const doc: number[] = [];
    for (let i = 0; i < len; i++) doc.push(10 + ((start + i * step) % (vocab - 20)));
    doc.push(eod);
    b.addDocument(doc);
  }
  b.finalize();
  return prefix;
}

/**
 * The run config of the layout tests: six steps of 4 micro-batches of 2 × 32 tokens over `data`
 * with the model at `hf` (fp32), the given parallel section and model options, in `<root>/<run>`.
 */
export function layoutRunConfig(o: {
  root: string;
  hf: string;
  data: string;
  run: string;
  parallel?: Record<string, unknown>;
  model?: Record<string, unknown>;
}) {
  return {
    model: { load: o.hf, dtype: 'fp32', ...o.model },
    data: {
      dataPath: [o.data],
      seqLength: 32,
      split: '90,10,0',
      eodTokenId: 2,
      dataCachePath: path.join(o.root, 'cache'),
    },
    training: {
      microBatchSize: 2,
      globalBatchSize: 8,
      trainIters: 6,
      logInterval: 100,
      evalInterval: null,
      seed: 3,
    },
    optimizer: { lr: 3e-3, minLr: 3e-4, clipGrad: 1 },
    scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 1 },
    parallel: o.parallel ?? {},
    logging: { runDir: path.join(o.root, o.run) },
  };
}

/**
 * Makes a layoutRunConfig train on the packed SFT rows at `prefix` (writeSft, seqLength 32): each
 * sample padded to a multiple of 4 (2·cp at CP=2, so that one process sees the same rows), micro
 * batch 1 (a packed row), 4 rows a step.
 */
export function usePackedSft(c: Record<string, Record<string, unknown>>, prefix: string, root: string): void {
  c.data = {
    sft: { prefix, padToMultipleOf: 4 },
    seqLength: 32,
    split: '100,0,0',
    dataCachePath: path.join(root, 'cache'),
  };
  c.training = { ...c.training, microBatchSize: 1, globalBatchSize: 4 };
}

/**
 * An SFT dataset of `n` conversations: a prompt of 4–8 tokens, then a reply of 5 tokens (or
 * `replyLength(i)`) with loss.
 */
export function writeSft(
  prefix: string,
  n: number,
  seqLength: number,
  replyLength: (i: number) => number = () => 5,
): void {
  const tokens = new IndexedDatasetBuilder(`${prefix}_sft_tokens`, { dtype: 'uint16' });
  const mask = new IndexedDatasetBuilder(`${prefix}_sft_loss_mask`, { dtype: 'uint8' });
  for (let i = 0; i < n; i++) {
    const promptLen = 4 + (i % 5);
    const prompt = Array.from({ length: promptLen }, (_, j) => 20 + ((i * 13 + j * 7) % 300));
    const reply = Array.from({ length: replyLength(i) }, (_, j) => 400 + ((prompt[0] + j) % 50));
    tokens.addDocument([1, ...prompt, ...reply, 2]);
    mask.addDocument([0, ...prompt.map(() => 0), ...reply.map(() => 1), 1]);
  }
  tokens.finalize();
  mask.finalize();
  fs.writeFileSync(
    `${prefix}_sft.json`,
    JSON.stringify({ format: 'megapatch-sft', version: 1, seqLength, padId: 0 }),
  );
}

/** `base` with each section of `over` merged into base's section (one level deep), validated. */
export function mergedRunConfig(
  base: RunConfigInput,
  over: Partial<Record<keyof RunConfigInput, object>> = {},
) {
  const merged: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(over)) merged[k] = { ...(base as Record<string, object>)[k], ...v };
  return parseRunConfig(merged);
}

/** The characters of {@link charTokenizer}: one token each, ids 3.. (0 unk, 1 BOS, 2 EOS). */
export const TOKENIZER_CHARS = 'abcdefghijklmnopqrstuvwxyz .,!?';

/**
 * Writes a character-level tokenizer (tokenizer.json, tokenizer_config.json) of `vocabSize` ids
 * into `dir` (a synthetic model's folder): <unk>, <s> (BOS), </s> (EOS), then one token per
 * character of {@link TOKENIZER_CHARS}, then `<xN>` tokens to fill the vocabulary; with
 * `chatTemplate`, that chat template ({@link SIMPLE_CHAT_TEMPLATE}: "q: ... a: ...</s>").
 */
export function charTokenizer(dir: string, vocabSize = 777, chatTemplate?: string): string {
  const names = ['<unk>', '<s>', '</s>', ...TOKENIZER_CHARS];
  while (names.length < vocabSize) names.push(`<x${names.length}>`);
  const json = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: names.slice(0, 3).map((content, id) => ({
      id,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    normalizer: null,
    pre_tokenizer: null,
    post_processor: null,
    decoder: { type: 'Fuse' },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: '<unk>',
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      vocab: Object.fromEntries(names.map((n, i) => [n, i])),
      merges: [],
    },
  };
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(json));
  fs.writeFileSync(
    path.join(dir, 'tokenizer_config.json'),
    JSON.stringify({
      bos_token: '<s>',
      eos_token: '</s>',
      unk_token: '<unk>',
      ...(chatTemplate ? { chat_template: chatTemplate } : {}),
    }),
  );
  return dir;
}

/** A chat template for {@link charTokenizer}: BOS, then "q: <user>" and "a: <assistant></s>" turns. */
export const SIMPLE_CHAT_TEMPLATE =
  "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}q: {{ m['content'] }} {% elif m['role'] == 'assistant' %}a: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}a: {% endif %}";
