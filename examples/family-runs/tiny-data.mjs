#!/usr/bin/env node
// The data of the families' tiny runs, which have no tokenizer: documents of counting patterns as a
// Megatron indexed dataset (what `megapatch preprocess pretrain` writes) and short chats that
// continue such a pattern as `megapatch preprocess sft` writes them. Token ids: 0 pad, 1 BOS,
// 2 EOS / end of document, 3 and 4 mark the user and assistant turns, 10..489 the pattern.
//
//   node ../family-runs/tiny-data.mjs [dir]   (default runs/data: what the tiny-*.yaml read)
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { IndexedDatasetBuilder } from '@megapatch/data';

export const PAD = 0;
export const BOS = 1;
export const EOD = 2;
const USER = 3;
const ASSISTANT = 4;
const FIRST = 10;
const SPAN = 480;

/** Prefix of the pre-training dataset inside `dir` (`<prefix>.bin/.idx`). */
export const PRETRAIN_PREFIX = 'pretrain_text_document';
/** Output prefix of the SFT set inside `dir` (`<prefix>_sft_tokens`, `_sft_loss_mask`, `_sft.json`). */
export const SFT_PREFIX = 'chat';

/**
 * A small deterministic generator (a linear congruential one, as Megatron's tests use).
 * @param {number} seed
 */
function lcg(seed) {
  let a = seed;
  return () => {
    a = (a * 1103515245 + 12345) % 2147483648;
    return a;
  };
}

/**
 * `n` tokens of the pattern starting at `start` with stride `step`.
 * @param {number} start
 * @param {number} step
 * @param {number} n
 * @returns {number[]}
 */
function pattern(start, step, n) {
  return Array.from({ length: n }, (_, i) => FIRST + ((start + i * step) % SPAN));
}

/**
 * Writes `docs` documents of 20–49 pattern tokens, each ended by EOD: `<prefix>.bin/.idx`.
 * @param {string} prefix
 * @param {number} [docs]
 * @returns {string} the prefix
 */
export function writeTinyPretrainData(prefix, docs = 400) {
  const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
  const next = lcg(12345);
  for (let d = 0; d < docs; d++) {
    const a = next();
    b.addDocument([...pattern(a % SPAN, 1 + (a % 3), 20 + (a % 30)), EOD]);
  }
  b.finalize();
  return prefix;
}

/**
 * Writes `samples` chats: BOS, USER, 4–8 pattern tokens, ASSISTANT, the next 5 of the pattern, EOS;
 * the loss is on the reply and its EOS only. The sidecar says the rows were made for `seqLength`.
 * @param {string} prefix
 * @param {number} [samples]
 * @param {number} [seqLength]
 * @returns {string} the prefix
 */
export function writeTinySftData(prefix, samples = 240, seqLength = 64) {
  const tokens = new IndexedDatasetBuilder(`${prefix}_sft_tokens`, { dtype: 'uint16' });
  const mask = new IndexedDatasetBuilder(`${prefix}_sft_loss_mask`, { dtype: 'uint8' });
  const next = lcg(777);
  for (let i = 0; i < samples; i++) {
    const a = next();
    const n = 4 + (a % 5);
    const all = pattern(a % SPAN, 1 + (a % 3), n + 5);
    const prompt = all.slice(0, n);
    const reply = all.slice(n);
    tokens.addDocument([BOS, USER, ...prompt, ASSISTANT, ...reply, EOD]);
    mask.addDocument([0, 0, ...prompt.map(() => 0), 0, ...reply.map(() => 1), 1]);
  }
  tokens.finalize();
  mask.finalize();
  fs.writeFileSync(
    `${prefix}_sft.json`,
    `${JSON.stringify({ format: 'megapatch-sft', version: 1, seqLength, padId: PAD, samples })}\n`,
  );
  return prefix;
}

/**
 * Writes both into `dir`; returns their prefixes.
 * @param {string} dir
 * @returns {{ pretrain: string, sft: string }}
 */
export function writeTinyData(dir) {
  fs.mkdirSync(dir, { recursive: true });
  return {
    pretrain: writeTinyPretrainData(path.join(dir, PRETRAIN_PREFIX)),
    sft: writeTinySftData(path.join(dir, SFT_PREFIX)),
  };
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const dir = process.argv[2] ?? path.join('runs', 'data');
  const p = writeTinyData(dir);
  console.log(`wrote ${p.pretrain}.{bin,idx} (pre-training) and ${p.sft}_sft_* (SFT)`);
}
