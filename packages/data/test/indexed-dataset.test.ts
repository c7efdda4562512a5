import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  DataError,
  IndexedDataset,
  IndexedDatasetBuilder,
  type IndexedDtypeName,
  mergeIndexedDatasets,
} from '../src/index.js';

const FIXTURES = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures', 'indexed');

interface Fixture {
  name: string;
  dtype: IndexedDtypeName;
  documents: number[][][];
  modes?: number[];
}
// Written by scripts/indexed_dataset_fixture.py next to the .idx/.bin files it describes.
const fixtures: Fixture[] = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'fixtures.json'), 'utf8'));

const VECTOR_IDX = Buffer.from(
  (
    '4d4d49444944580000 0100000000000000 08 0200000000000000 0300000000000000 03000000 02000000 ' +
    '0000000000000000 0600000000000000 0000000000000000 0100000000000000 0200000000000000'
  ).replace(/ /g, ''),
  'hex',
);
const VECTOR_BIN = Buffer.from('01000200030004000500', 'hex');

let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'megapatch-indexed-'));
});
afterEach(() => {
  vi.restoreAllMocks();
  fs.rmSync(dir, { recursive: true, force: true });
});

function writeFixture(prefix: string, fx: Fixture): void {
  const builder = new IndexedDatasetBuilder(prefix, { dtype: fx.dtype, multimodal: fx.modes !== undefined });
  let seq = 0;
  for (const doc of fx.documents) {
    const modes = fx.modes?.slice(seq, seq + doc.length);
    builder.addDocument(
      doc.flat(),
      doc.map((s) => s.length),
      modes,
    );
    seq += doc.length;
  }
  builder.finalize();
}

function expectError(fn: () => unknown, code: string, file: string, pattern?: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(DataError);
  const err = caught as DataError;
  expect(err.code).toBe(code);
  expect(err.message).toContain(file);
  if (pattern) expect(err.message).toMatch(pattern);
}

describe('test vector from the reference', () => {
  it('the hex string is 82 bytes', () => {
    expect(VECTOR_IDX.length).toBe(82);
  });

  it('writer produces the exact 82-byte .idx and 10-byte .bin', () => {
    const prefix = path.join(dir, 'v');
    const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
    b.addItem([1, 2, 3]);
    b.endDocument();
    b.addItem([4, 5]);
    b.endDocument();
    b.finalize();
    expect(fs.readFileSync(`${prefix}.idx`).equals(VECTOR_IDX)).toBe(true);
    expect(fs.readFileSync(`${prefix}.bin`).equals(VECTOR_BIN)).toBe(true);
    expect(fs.readdirSync(dir).sort()).toEqual(['v.bin', 'v.idx']);
  });

  it('reader reads it back', () => {
    const prefix = path.join(dir, 'v');
    fs.writeFileSync(`${prefix}.idx`, VECTOR_IDX);
    fs.writeFileSync(`${prefix}.bin`, VECTOR_BIN);
    const ds = IndexedDataset.open(prefix);
    expect(ds.dtype).toEqual({ code: 8, name: 'uint16', itemSize: 2 });
    expect(ds.length).toBe(2);
    expect(ds.numDocuments).toBe(2);
    expect(ds.numTokens).toBe(5);
    expect(Array.from(ds.sequenceLengths)).toEqual([3, 2]);
    expect(Array.from(ds.sequencePointers)).toEqual([0, 6]);
    expect(Array.from(ds.documentIndices)).toEqual([0, 1, 2]);
    expect(ds.sequenceModes).toBeUndefined();
    expect(ds.pathPrefix).toBe(prefix);
    expect(Array.from(ds.get(0))).toEqual([1, 2, 3]);
    expect(Array.from(ds.get(1))).toEqual([4, 5]);
    expect(Array.from(ds.get(0, 1))).toEqual([2, 3]);
    expect(Array.from(ds.get(0, 1, 1))).toEqual([2]);
    expect(ds.get(0, 3).length).toBe(0);
    expect(Array.from(ds.getDocument(1))).toEqual([4, 5]);
    expectError(() => ds.get(2), 'INDEX_OUT_OF_RANGE', prefix);
    expectError(() => ds.get(0, 2, 2), 'INDEX_OUT_OF_RANGE', prefix);
    expectError(() => ds.getDocument(2), 'INDEX_OUT_OF_RANGE', prefix);
    ds.close();
    expectError(() => ds.get(0), 'INVALID_ARGUMENT', prefix, /closed/);
  });
});

describe('numpy-written fixtures', () => {
  it('has the fixtures', () => {
    expect(fixtures.map((f) => f.name)).toContain('multi_uint16');
  });

  for (const fx of fixtures) {
    it(`reads ${fx.name} (${fx.dtype}) exactly`, () => {
      const ds = IndexedDataset.open(path.join(FIXTURES, fx.name));
      const sequences = fx.documents.flat();
      expect(ds.dtype.name).toBe(fx.dtype);
      expect(ds.length).toBe(sequences.length);
      expect(ds.numDocuments).toBe(fx.documents.length);
      expect(ds.numTokens).toBe(sequences.flat().length);
      sequences.forEach((seq, i) => {
        expect(Array.from(ds.get(i))).toEqual(seq);
      });
      fx.documents.forEach((doc, d) => {
        expect(Array.from(ds.getDocument(d))).toEqual(doc.flat());
      });
      expect(ds.sequenceModes ? Array.from(ds.sequenceModes) : undefined).toEqual(fx.modes);
      ds.close();
    });

    it(`writer reproduces ${fx.name} byte for byte`, () => {
      const prefix = path.join(dir, fx.name);
      writeFixture(prefix, fx);
      for (const ext of ['.idx', '.bin']) {
        const ours = fs.readFileSync(prefix + ext);
        const theirs = fs.readFileSync(path.join(FIXTURES, fx.name + ext));
        expect(ours.equals(theirs), `${fx.name}${ext}`).toBe(true);
      }
    });
  }
});

describe('builder', () => {
  it('optimalDtype follows Megatron', () => {
    expect(IndexedDatasetBuilder.optimalDtype(32000)).toBe('uint16');
    expect(IndexedDatasetBuilder.optimalDtype(65499)).toBe('uint16');
    expect(IndexedDatasetBuilder.optimalDtype(65500)).toBe('int32');
    expect(IndexedDatasetBuilder.optimalDtype(151936)).toBe('int32');
  });

  it('rejects tokens that do not fit the dtype, naming the value', () => {
    const prefix = path.join(dir, 'bad');
    const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
    expectError(() => b.addItem([1, 65536]), 'INVALID_ARGUMENT', prefix, /65536/);
    expectError(() => b.addItem([-100]), 'INVALID_ARGUMENT', prefix, /-100/);
    expectError(() => b.addItem([1.5]), 'INVALID_ARGUMENT', prefix, /1\.5/);
    expectError(() => b.addDocument([1, 2, 3], [1, 1]), 'INVALID_ARGUMENT', prefix, /sum to 2/);
    expect(() => new IndexedDatasetBuilder(prefix, { dtype: 'int128' as IndexedDtypeName })).toThrow(
      DataError,
    );
    b.abort();
    expect(fs.readdirSync(dir)).toEqual([]);
  });

  it('a missing output directory is a DataError', () => {
    const prefix = path.join(dir, 'no', 'such', 'dir');
    expectError(() => new IndexedDatasetBuilder(prefix), 'MISSING_FILE', prefix);
  });

  it('an interrupted builder leaves no file under the final names; abort() cleans up', () => {
    const prefix = path.join(dir, 'partial');
    const b = new IndexedDatasetBuilder(prefix, { dtype: 'int32', bufferBytes: 16 });
    for (let i = 0; i < 100; i++) b.addDocument([i, i + 1, i + 2]);
    // No finalize: tokens already streamed to the temporary .bin, nothing under the final names.
    const names = fs.readdirSync(dir);
    expect(names).toEqual([`partial.bin.tmp-${process.pid}`]);
    expect(fs.statSync(path.join(dir, names[0])).size).toBeGreaterThan(0);
    expectError(() => IndexedDataset.open(prefix), 'MISSING_FILE', `${prefix}.idx`);
    b.abort();
    expect(fs.readdirSync(dir)).toEqual([]);
    expectError(() => b.addItem([1]), 'INVALID_ARGUMENT', prefix);
  });

  it('streams through a small buffer and reads back; trailing items form a final document', () => {
    const prefix = path.join(dir, 's');
    const b = new IndexedDatasetBuilder(prefix, { dtype: 'int64', bufferBytes: 24 });
    const docs = Array.from({ length: 20 }, (_, i) => Array.from({ length: i % 7 }, (_, j) => i * 1000 - j));
    for (const d of docs.slice(0, -1)) b.addDocument(d);
    b.addItem(docs[docs.length - 1]);
    b.finalize();
    expectError(() => b.finalize(), 'INVALID_ARGUMENT', prefix, /finalized/);
    const ds = IndexedDataset.open(prefix);
    expect(ds.numDocuments).toBe(20);
    docs.forEach((d, i) => {
      expect(Array.from(ds.getDocument(i))).toEqual(d);
    });
    ds.close();
  });

  it('finalize replaces an existing dataset', () => {
    const prefix = path.join(dir, 'r');
    writeFixture(prefix, fixtures[1]);
    writeFixture(prefix, fixtures[0]);
    expect(fs.readFileSync(`${prefix}.idx`).equals(VECTOR_IDX)).toBe(true);
  });
});

describe('merge', () => {
  it('merging two prefixes equals writing all documents into one', () => {
    const a = fixtures.find((f) => f.name === 'vector_uint16')!;
    const b = fixtures.find((f) => f.name === 'multi_uint16')!;
    const out = path.join(dir, 'merged');
    mergeIndexedDatasets(out, [path.join(FIXTURES, a.name), path.join(FIXTURES, b.name)]);
    const expected = path.join(dir, 'expected');
    writeFixture(expected, { name: 'x', dtype: 'uint16', documents: [...a.documents, ...b.documents] });
    for (const ext of ['.idx', '.bin']) {
      expect(fs.readFileSync(out + ext).equals(fs.readFileSync(expected + ext))).toBe(true);
    }
    const ds = IndexedDataset.open(out);
    expect(ds.numDocuments).toBe(a.documents.length + b.documents.length);
    expect(Array.from(ds.getDocument(3))).toEqual([20, 21, 22]);
    ds.close();
  });

  it('merges multimodal datasets with their modes', () => {
    const fx = fixtures.find((f) => f.name === 'modes_int32')!;
    const out = path.join(dir, 'mm');
    mergeIndexedDatasets(out, [path.join(FIXTURES, fx.name), path.join(FIXTURES, fx.name)]);
    const ds = IndexedDataset.open(out);
    expect(Array.from(ds.sequenceModes!)).toEqual([...fx.modes!, ...fx.modes!]);
    ds.close();
  });

  it('refuses different dtypes with a clear error and writes nothing', () => {
    const out = path.join(dir, 'merged');
    expectError(
      () =>
        mergeIndexedDatasets(out, [path.join(FIXTURES, 'multi_uint16'), path.join(FIXTURES, 'multi_int32')]),
      'INVALID_ARGUMENT',
      out,
      /different dtypes.*uint16.*int32/,
    );
    expect(fs.readdirSync(dir)).toEqual([]);
  });
});

describe('corruption', () => {
  // multi_int32 has N = 4 sequences and D = 5 document indices.
  const N = 4;
  const D = 5;
  let prefix: string;
  let idx: Buffer;
  let bin: Buffer;
  beforeEach(() => {
    prefix = path.join(dir, 'c');
    idx = fs.readFileSync(path.join(FIXTURES, 'multi_int32.idx'));
    bin = fs.readFileSync(path.join(FIXTURES, 'multi_int32.bin'));
  });
  function check(code: string, file: '.idx' | '.bin', pattern: RegExp): void {
    fs.writeFileSync(`${prefix}.idx`, idx);
    fs.writeFileSync(`${prefix}.bin`, bin);
    expectError(() => IndexedDataset.open(prefix), code, prefix + file, pattern);
  }
  const docAt = (i: number) => 34 + 12 * N + 8 * i;

  it('the unmodified copy opens', () => {
    fs.writeFileSync(`${prefix}.idx`, idx);
    fs.writeFileSync(`${prefix}.bin`, bin);
    IndexedDataset.open(prefix).close();
  });
  it('missing .idx or .bin', () => {
    fs.writeFileSync(`${prefix}.idx`, idx);
    expectError(() => IndexedDataset.open(prefix), 'MISSING_FILE', `${prefix}.bin`);
    expectError(
      () => IndexedDataset.open(path.join(dir, 'none')),
      'MISSING_FILE',
      path.join(dir, 'none.idx'),
    );
  });
  it('bad magic', () => {
    idx[0] = 0x58;
    check('CORRUPT_FILE', '.idx', /magic/);
  });
  it('version != 1', () => {
    idx.writeBigUInt64LE(2n, 9);
    check('CORRUPT_FILE', '.idx', /version 2/);
  });
  it('unknown dtype code', () => {
    idx[17] = 9;
    check('CORRUPT_FILE', '.idx', /dtype code 9/);
  });
  it('idx shorter than the header', () => {
    idx = idx.subarray(0, 20);
    check('TRUNCATED_FILE', '.idx', /header/);
  });
  it('idx too short for its counts', () => {
    idx = idx.subarray(0, idx.length - 3);
    check('TRUNCATED_FILE', '.idx', /4 sequences/);
  });
  it('huge sequence count', () => {
    idx.writeBigUInt64LE(1n << 60n, 18);
    check('TRUNCATED_FILE', '.idx', /sequences/);
  });
  it('unexplained trailing bytes', () => {
    idx = Buffer.concat([idx, Buffer.alloc(2)]);
    check('CORRUPT_FILE', '.idx', /bytes; expected/);
  });
  it('document_indices not starting at 0', () => {
    idx.writeBigInt64LE(1n, docAt(0));
    check('CORRUPT_FILE', '.idx', /document_indices\[0\]/);
  });
  it('document_indices decreasing', () => {
    idx.writeBigInt64LE(3n, docAt(1));
    check('CORRUPT_FILE', '.idx', /decrease/);
  });
  it('last document index != sequence count', () => {
    idx.writeBigInt64LE(3n, docAt(D - 1));
    check('CORRUPT_FILE', '.idx', /last document index is 3 but there are 4 sequences/);
  });
  it('pointers inconsistent with lengths', () => {
    idx.writeBigInt64LE(4n, 34 + 4 * N + 8);
    check('CORRUPT_FILE', '.idx', /sequence 1 pointer/);
  });
  it('negative length', () => {
    idx.writeInt32LE(-1, 34 + 4 * (N - 1));
    check('CORRUPT_FILE', '.idx', /negative length/);
  });
  it('.bin shorter than the lengths describe', () => {
    bin = bin.subarray(0, bin.length - 4);
    check('TRUNCATED_FILE', '.bin', /9 int32 tokens \(36 bytes\)/);
  });
  it('.bin longer than the lengths describe', () => {
    bin = Buffer.concat([bin, Buffer.alloc(1)]);
    check('CORRUPT_FILE', '.bin', /37 bytes/);
  });
  it('int64 tokens that do not fit int32 are refused on read', () => {
    const p = path.join(dir, 'big');
    const b = new IndexedDatasetBuilder(p, { dtype: 'int64' });
    b.addDocument([1, 2 ** 40]);
    b.finalize();
    const ds = IndexedDataset.open(p);
    expectError(() => ds.get(0), 'UNSUPPORTED', `${p}.bin`, /1099511627776/);
    expect(Array.from(ds.get(0, 0, 1))).toEqual([1]);
    ds.close();
  });
});

describe('on-demand reads', () => {
  it('get() reads only the requested slice of a large .bin', () => {
    const prefix = path.join(dir, 'large');
    const b = new IndexedDatasetBuilder(prefix, { dtype: 'int32' });
    const seq = new Int32Array(1 << 16);
    for (let d = 0; d < 64; d++) {
      seq.fill(d);
      b.addDocument(seq);
    }
    b.finalize();
    expect(fs.statSync(`${prefix}.bin`).size).toBe(64 * 4 * (1 << 16));

    const readFileSpy = vi.spyOn(fs, 'readFileSync');
    const readSpy = vi.spyOn(fs, 'readSync');
    const ds = IndexedDataset.open(prefix);
    // Only the .idx is read whole.
    expect(readFileSpy.mock.calls.map((c) => c[0])).toEqual([`${prefix}.idx`]);
    readSpy.mockClear();
    const slice = ds.get(37, 1000, 10);
    expect(Array.from(slice)).toEqual(new Array(10).fill(37));
    // Positioned reads: readSync(fd, buffer, offset, length, position).
    const calls = readSpy.mock.calls as unknown as [number, Uint8Array, number, number, number][];
    const bytes = calls.reduce((sum, c) => sum + c[3], 0);
    expect(bytes).toBe(40);
    expect(calls[0][4]).toBe((37 * (1 << 16) + 1000) * 4);
    ds.close();
  });
});
