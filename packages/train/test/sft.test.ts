// SFT in the trainer: `megapatch preprocess sft` output (here written directly, and for the real
// stories260K model through the real preprocessing), packed or padded, loss on assistant tokens
// only, the per-sequence loss; the loss falls and the exported model generates.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { IndexedDatasetBuilder } from '@megapatch/data';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { afterAll, describe, expect, it } from 'vitest';
import { parseRunConfig, train } from '../src/index.js';
import { buildSftDataset } from '../src/sft.js';
import { tempDir, tinyLlama } from './helpers.js';

const root = tempDir('mp-sft-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

/** An SFT dataset of `n` conversations: a prompt of 4–8 tokens, then a reply of 5 tokens with loss. */
function writeSft(prefix: string, n: number, seqLength: number): void {
  const tokens = new IndexedDatasetBuilder(`${prefix}_sft_tokens`, { dtype: 'uint16' });
  const mask = new IndexedDatasetBuilder(`${prefix}_sft_loss_mask`, { dtype: 'uint8' });
  for (let i = 0; i < n; i++) {
    const promptLen = 4 + (i % 5);
    const prompt = Array.from({ length: promptLen }, (_, j) => 20 + ((i * 13 + j * 7) % 300));
    const reply = Array.from({ length: 5 }, (_, j) => 400 + ((prompt[0] + j) % 50));
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

describe('SFT rows', () => {
  const prefix = path.join(root, 'chat');
  writeSft(prefix, 60, 32);

  it('packs samples into rows with cuSeqlens, loss only on replies, per-sequence weights', () => {
    const rows = buildSftDataset({
      prefix,
      split: '100,0,0',
      which: 'train',
      seqLength: 32,
      numRows: 10,
      seed: 1,
      packing: true,
      perSequenceLoss: true,
    });
    const r = rows.getItem(0);
    expect(r.tokens.length).toBe(32);
    expect(r.cuSeqlens?.[0]).toBe(0);
    const cu = Array.from(r.cuSeqlens as Int32Array);
    expect(cu.length).toBeGreaterThan(2); // several samples in a row
    // the padding tail is the last (loss-free) sequence
    const real = cu.length - 2;
    for (let k = 0; k < real; k++) {
      expect(r.positionIds[cu[k]]).toBe(0); // positions restart per sample
      // each sample's loss weights sum to 1 (per-sequence loss); its prompt carries none
      let w = 0;
      for (let j = cu[k]; j < cu[k + 1]; j++) w += r.lossMask[j];
      expect(w).toBeCloseTo(1, 6);
      expect(r.lossMask[cu[k]]).toBe(0);
    }
    expect(cu.at(-1)).toBe(32);
    for (let j = cu[real] as number; j < 32; j++) expect(r.lossMask[j]).toBe(0); // padding tail
    const padded = buildSftDataset({
      prefix,
      split: '100,0,0',
      which: 'train',
      seqLength: 32,
      numRows: 10,
      seed: 1,
      packing: false,
      perSequenceLoss: false,
    });
    expect(padded.getItem(0).cuSeqlens).toBeUndefined();
    expect(padded.rowsPerEpoch).toBe(60);
    expect(rows.rowsPerEpoch).toBeLessThan(60);
  });

  it.each([
    ['packed', { packing: true, perSequenceLoss: false }, 1],
    ['padded, per-sequence loss', { packing: false, perSequenceLoss: true }, 2],
  ] as const)('%s: the loss falls', async (name, sft, mbs) => {
    const hf = tinyLlama(path.join(root, `hf-${mbs}`));
    const r = await train(
      parseRunConfig({
        model: { load: hf, dtype: 'fp32' },
        data: { sft: { prefix, ...sft }, seqLength: 32, split: '90,10,0' },
        training: {
          microBatchSize: mbs,
          globalBatchSize: 4,
          trainIters: 12,
          evalInterval: 6,
          evalIters: 1,
          logInterval: 100,
        },
        optimizer: { lr: 3e-3 },
        logging: { runDir: path.join(root, `run-${name.replace(/\W+/g, '-')}`) },
      }),
      { log: () => {}, report: false },
    );
    expect(r.losses[11]).toBeLessThan(r.losses[0] - 1);
  });
});

const SKIP = skipWithoutShared(import.meta.url);
describe.skipIf(SKIP)('SFT of the real stories260K model', () => {
  it('lowers its loss on a small chat set, and the exported folder generates', async () => {
    // stories260K's tokenizer has no chat template: a copy of the folder gets a simple one
    const hf = path.join(root, 'stories');
    fs.cpSync(sharedPath('data/models/stories260K/hf'), hf, { recursive: true });
    const tc = JSON.parse(fs.readFileSync(path.join(hf, 'tokenizer_config.json'), 'utf8'));
    tc.chat_template =
      "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n{% else %}Answer: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}";
    fs.writeFileSync(path.join(hf, 'tokenizer_config.json'), JSON.stringify(tc));
    const chats = path.join(root, 'chats.jsonl');
    const names = ['Lily', 'Tom', 'Sue', 'Ben', 'Max', 'Mia', 'Sam', 'Ann'];
    const things = ['a red ball', 'a big dog', 'a small cat', 'a blue car', 'a tall tree', 'a happy bird'];
    const lines: string[] = [];
    for (const n of names) {
      for (const t of things) {
        lines.push(
          JSON.stringify({ instruction: `What did ${n} see?`, input: '', output: `${n} saw ${t}.` }),
        );
      }
    }
    fs.writeFileSync(chats, `${lines.join('\n')}\n`);
    const bin = path.join(__dirname, '..', '..', 'cli', 'bin', 'megapatch.js');
    const prefix = path.join(root, 'stories-sft');
    const pre = spawnSync(
      process.execPath,
      [
        bin,
        'preprocess',
        'sft',
        '--input',
        chats,
        '--tokenizer',
        hf,
        '--output-prefix',
        prefix,
        '--seq-length',
        '64',
      ],
      { encoding: 'utf8' },
    );
    expect(pre.status, pre.stderr).toBe(0);
    const out = path.join(root, 'stories-export');
    const r = await train(
      parseRunConfig({
        model: { load: hf, dtype: 'fp32' },
        data: { sft: { prefix }, seqLength: 64, split: '100,0,0' },
        training: {
          microBatchSize: 1,
          globalBatchSize: 4,
          trainIters: 30,
          evalInterval: null,
          logInterval: 100,
        },
        optimizer: { lr: 2e-3, minLr: 2e-4 },
        scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 3 },
        checkpoint: { save: path.join(root, 'stories-ckpt'), exportHf: out },
        logging: { runDir: path.join(root, 'run-stories') },
      }),
      { log: () => {}, report: false },
    );
    const first = r.losses.slice(0, 3).reduce((a, b) => a + b) / 3;
    const last = r.losses.slice(-3).reduce((a, b) => a + b) / 3;
    expect(last).toBeLessThan(first * 0.6);
    const gen = spawnSync(
      process.execPath,
      [
        bin,
        'generate',
        '--model',
        out,
        '--chat',
        '--prompt',
        'What did Lily see?',
        '--max-new-tokens',
        '12',
        '--json',
      ],
      { encoding: 'utf8' },
    );
    expect(gen.status, gen.stderr).toBe(0);
    const g = JSON.parse(gen.stdout.trim().split('\n')[0]);
    expect(g.completion).toMatch(/Lily saw/);
  });
});
