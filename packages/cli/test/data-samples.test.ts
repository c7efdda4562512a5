import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { IndexedDatasetBuilder } from '@megapatch/data';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { trainingSamples } from '../src/commands/data.js';

const bin = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'megapatch.js');
let dir: string;
let prefix: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'mp-samples-'));
  prefix = join(dir, 'corpus_text_document');
  // 40 documents whose tokens encode (document, position): doc*100 + pos
  const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
  for (let d = 0; d < 40; d++) {
    const len = 3 + ((d * 7) % 11);
    b.addDocument(Array.from({ length: len }, (_, p) => d * 100 + p));
  }
  b.finalize();
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('megapatch data samples', () => {
  it('prints samples as JSON lines: seqLength tokens, labels shifted by one', () => {
    const out = execFileSync(
      process.execPath,
      [
        bin,
        'data',
        'samples',
        '--data-path',
        prefix,
        '--split',
        '90,10,0',
        '--seq-length',
        '8',
        '--train-samples',
        '30',
        '--start',
        '2',
        '--count',
        '3',
      ],
      { encoding: 'utf8' },
    );
    const lines = out
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    expect(lines.map((l) => l.index)).toEqual([2, 3, 4]);
    for (const s of lines) {
      expect(s.tokens).toHaveLength(8);
      expect(s.labels).toHaveLength(8);
      expect(s.labels.slice(0, 7)).toEqual(s.tokens.slice(1));
      // tokens come from the training split: the first 90% of the 40 documents
      for (const t of s.tokens) expect(Math.floor(t / 100)).toBeLessThan(36);
    }
  });

  it('is deterministic for a seed and changes with it', async () => {
    const take = (seed: number) =>
      trainingSamples({
        'data-path': prefix,
        'seq-length': '8',
        'train-samples': '30',
        seed: String(seed),
        count: '5',
        'cache-dir': join(dir, 'cache'),
      });
    expect(await take(7)).toEqual(await take(7));
    expect(await take(7)).not.toEqual(await take(8));
  });

  it('reports a missing dataset with the file name', async () => {
    await expect(
      trainingSamples({ 'data-path': join(dir, 'nope'), 'seq-length': '8', 'train-samples': '4' }),
    ).rejects.toThrow(/nope\.idx/);
  });
});
