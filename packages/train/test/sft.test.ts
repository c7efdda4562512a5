// SFT in the trainer: `megapatch preprocess sft` output (here written directly, and for the real
// stories260K model in the cli's tests, through the real commands), packed or padded, loss on assistant tokens
// only, the per-sequence loss; the loss falls and the exported model generates.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseRunConfig, train } from '../src/index.js';
import { buildSftDataset } from '../src/sft.js';
import { tempDir, tinyLlama, writeSft } from './helpers.js';

const root = tempDir('mp-sft-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

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
