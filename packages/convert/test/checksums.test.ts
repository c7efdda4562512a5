// Format version 2: every piece carries the SHA-256 of its bytes. Writers record it, verify() and
// verifyCheckpoint() check it, and reads check it once per piece, so a damaged file fails loudly
// (naming the file, the tensor and the piece) instead of converting into wrong weights.
import fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import {
  CHECKPOINT_FORMAT_VERSION,
  Checkpoint,
  CheckpointStreamWriter,
  CheckpointWriter,
  convertHfToMegapatch,
  convertMegapatchToHf,
  pieceFileName,
  reshardCheckpoint,
  SafetensorsFile,
  verifyCheckpoint,
} from '../src/index.js';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '../src/testing/index.js';
import { convertError, flipPieceByte, scratch, sha256, snapshot, temporaries } from './helpers.js';

const tmp = scratch('checksums');
const LAYOUT = { tp: 2, pp: 1, ep: 1, etp: 2, dp: 1 };

/** Deterministic bytes. */
function bytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed | 1;
  for (let i = 0; i < n; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

/** A checkpoint with `w` [8, 6] F32 split in two row blocks, `b` [5] BF16 whole and an empty `e`. */
function small(root: string): { w: Uint8Array; b: Uint8Array } {
  const w = bytes(8 * 6 * 4, 1);
  const b = bytes(5 * 2, 2);
  const cw = new CheckpointWriter(root, 3, { layout: LAYOUT, modelConfig: {} });
  for (const tp of [0, 1]) {
    cw.addPiece('w', {
      dtype: 'F32',
      globalShape: [8, 6],
      offsets: [4 * tp, 0],
      shape: [4, 6],
      data: w.subarray(tp * 96, (tp + 1) * 96),
      rank: { tp, pp: 0, ep: 0 },
    });
  }
  cw.addPiece('b', { dtype: 'BF16', globalShape: [5], offsets: [0], shape: [5], data: b });
  cw.addPiece('e', {
    dtype: 'F32',
    globalShape: [0, 4],
    offsets: [0, 0],
    shape: [0, 4],
    data: new Uint8Array(0),
  });
  cw.finalize();
  return { w, b };
}

const llama = SYNTHETIC_MODELS.find((m) => m.id === 'llama')?.config as Record<string, unknown>;

describe('piece checksums (format version 2)', () => {
  it('records the SHA-256 of every piece: of the bytes given, and of the bytes in the file', () => {
    const root = tmp('record');
    const { w, b } = small(root);
    using ck = Checkpoint.open(root);
    expect(CHECKPOINT_FORMAT_VERSION).toBe(2);
    expect(ck.metadata.formatVersion).toBe(2);
    const [p0, p1] = ck.info('w').pieces;
    expect(p0.sha256).toBe(sha256(w.subarray(0, 96)));
    expect(p1.sha256).toBe(sha256(w.subarray(96)));
    expect(ck.info('b').pieces[0].sha256).toBe(sha256(b));
    expect(ck.info('e').pieces[0].sha256).toBe(sha256(new Uint8Array(0)));
    for (const name of ck.tensorNames()) {
      for (const p of ck.info(name).pieces) {
        const f = SafetensorsFile.open(path.join(ck.dir, p.file));
        expect(p.sha256, `${name} ${p.key}`).toBe(sha256(f.read(p.key).data));
        expect(p.sha256).toMatch(/^[0-9a-f]{64}$/);
        f.close();
      }
    }
  });

  it('CheckpointStreamWriter hashes a piece written in many uneven chunks like the whole piece', () => {
    const root = tmp('stream');
    const data = bytes(64 * 16 * 4, 9);
    const plan = [
      {
        name: 'x',
        dtype: 'F32' as const,
        globalShape: [64, 16],
        pieces: [
          { rank: { tp: 0, pp: 0, ep: 0 }, offsets: [0, 0], shape: [40, 16] },
          { rank: { tp: 1, pp: 0, ep: 0 }, offsets: [40, 0], shape: [24, 16] },
        ],
      },
    ];
    const sw = new CheckpointStreamWriter(root, 0, { layout: LAYOUT, modelConfig: {} }, plan);
    const first = data.subarray(0, 40 * 64);
    for (const [a, z] of [
      [0, 1],
      [1, 100],
      [100, 101],
      [101, 2000],
      [2000, first.byteLength],
    ])
      sw.write('x', 0, first.subarray(a, z));
    sw.write('x', 1, data.subarray(40 * 64));
    const meta = sw.finalize();
    expect(meta.tensors.x.pieces.map((p) => p.sha256)).toEqual([
      sha256(first),
      sha256(data.subarray(40 * 64)),
    ]);
    using ck = Checkpoint.open(root);
    expect(Buffer.from(ck.read('x')).equals(Buffer.from(data))).toBe(true);
  });

  it('verify() and reads fail on a flipped byte, naming the file, the tensor and the piece', async () => {
    const root = tmp('flip');
    const { b } = small(root);
    const dir = path.join(root, 'iter_0000003');
    const file1 = pieceFileName({ tp: 1, pp: 0, ep: 0 });
    {
      using ck = Checkpoint.open(root);
      ck.verify();
      flipPieceByte(dir, ck.info('w').pieces[1], 17);
    }
    using ck = Checkpoint.open(root);
    const e = await convertError(
      () => ck.verify(),
      'CORRUPT_FILE',
      file1,
      'tensor "w" piece at [4,0]',
      'SHA-256',
    );
    expect(e.file).toBe(file1);
    await convertError(() => ck.read('w'), 'CORRUPT_FILE', 'tensor "w" piece at [4,0]');
    await convertError(() => ck.readSlice('w', [7, 0], [1, 6]), 'CORRUPT_FILE', '"w"');
    // Another tensor, and the intact piece of the same tensor, still read.
    expect(Buffer.from(ck.read('b')).equals(Buffer.from(b))).toBe(true);
    expect(ck.readSlice('w', [0, 0], [4, 6]).byteLength).toBe(96);
  });

  it('checks a piece once per open checkpoint, and never with verifyChecksums: false', async () => {
    const root = tmp('once');
    const { w } = small(root);
    const dir = path.join(root, 'iter_0000003');
    const ck = Checkpoint.open(root);
    expect(ck.verifyChecksums).toBe(true);
    expect(Buffer.from(ck.read('w')).equals(Buffer.from(w))).toBe(true);
    // Damaged after the first read: this open checkpoint has checked those pieces already.
    flipPieceByte(dir, ck.info('w').pieces[0], 0);
    expect(Buffer.from(ck.read('w')).equals(Buffer.from(w))).toBe(false);
    ck.close();
    using fresh = Checkpoint.open(root);
    await convertError(() => fresh.read('w'), 'CORRUPT_FILE', 'piece at [0,0]');
    using unchecked = Checkpoint.open(root, { verifyChecksums: false });
    expect(unchecked.read('w')[0]).toBe(w[0] ^ 0x10);
    // verify() checks whatever the option says.
    await convertError(() => unchecked.verify(), 'CORRUPT_FILE', '"w"');
  });

  it('hashes a piece in chunks of at most 16 MiB, never the whole piece at once', () => {
    const root = tmp('big');
    const rows = 1280;
    const data = bytes(rows * 4096 * 4, 5); // 20 MiB
    const cw = new CheckpointWriter(root, 0, { layout: LAYOUT, modelConfig: {} });
    cw.addPiece('big', {
      dtype: 'F32',
      globalShape: [rows, 4096],
      offsets: [0, 0],
      shape: [rows, 4096],
      data,
    });
    cw.finalize();
    const spy = vi.spyOn(SafetensorsFile.prototype, 'readByteRange');
    try {
      using ck = Checkpoint.open(root);
      ck.verify();
      const lengths = spy.mock.calls.map((c) => c[2]);
      expect(lengths.length).toBeGreaterThanOrEqual(2);
      expect(Math.max(...lengths)).toBeLessThanOrEqual(16 << 20);
      expect(lengths.reduce((a, n) => a + n, 0)).toBe(data.byteLength);
    } finally {
      spy.mockRestore();
    }
  });

  it('verifyTensor() checks pieces asynchronously and stops with the signal reason', async () => {
    const root = tmp('async');
    small(root);
    const dir = path.join(root, 'iter_0000003');
    using ck = Checkpoint.open(root);
    await ck.verifyTensor('w');
    const reason = { why: 'stop' };
    const ac = new AbortController();
    ac.abort(reason);
    await expect(ck.verifyTensor('b', { signal: ac.signal })).rejects.toBe(reason);
    flipPieceByte(dir, ck.info('b').pieces[0], 3);
    using again = Checkpoint.open(root);
    await convertError(() => again.verifyTensor('b'), 'CORRUPT_FILE', 'tensor "b" piece at [0]');
  });

  it('opens, reads and verifies a version 1 checkpoint (no checksums)', () => {
    const root = tmp('v1');
    const { w, b } = small(root);
    const mp = path.join(root, 'iter_0000003', 'metadata.json');
    const m = JSON.parse(fs.readFileSync(mp, 'utf8'));
    m.formatVersion = 1;
    for (const t of Object.values(m.tensors) as { pieces: { sha256?: string }[] }[])
      for (const p of t.pieces) delete p.sha256;
    fs.writeFileSync(mp, JSON.stringify(m));
    using ck = Checkpoint.open(root);
    expect(ck.metadata.formatVersion).toBe(1);
    expect(Buffer.from(ck.read('w')).equals(Buffer.from(w))).toBe(true);
    expect(Buffer.from(ck.read('b')).equals(Buffer.from(b))).toBe(true);
    ck.verify();
    expect(verifyCheckpoint(ck)).toEqual({
      tensors: 3,
      pieces: 4,
      bytes: 8 * 6 * 4 + 5 * 2,
      checksummedPieces: 0,
      architectureChecked: null,
    });
  });

  it('rejects an unknown format version, and version 2 metadata lacking a checksum', async () => {
    const root = tmp('versions');
    small(root);
    const mp = path.join(root, 'iter_0000003', 'metadata.json');
    const good = JSON.parse(fs.readFileSync(mp, 'utf8'));
    const write = (edit: (m: typeof good) => void) => {
      const m = structuredClone(good);
      edit(m);
      fs.writeFileSync(mp, JSON.stringify(m));
    };
    write((m) => {
      m.formatVersion = 3;
    });
    await convertError(
      () => Checkpoint.open(root),
      'INVALID_FORMAT',
      'metadata.json: field formatVersion: checkpoint format version 3 is not supported (this megapatch reads versions 1 and 2)',
    );
    write((m) => {
      m.formatVersion = '2';
    });
    await convertError(() => Checkpoint.open(root), 'INVALID_FORMAT', 'version "2" is not supported');
    write((m) => {
      delete m.tensors.w.pieces[1].sha256;
    });
    await convertError(
      () => Checkpoint.open(root),
      'INVALID_FORMAT',
      'field tensors.w.pieces.1.sha256: missing',
    );
    write((m) => {
      m.tensors.b.pieces[0].sha256 = 'ABC';
    });
    await convertError(() => Checkpoint.open(root), 'INVALID_FORMAT', 'tensors.b.pieces.0.sha256');
  });
});

describe('conversions from a damaged checkpoint', () => {
  const hfDir = tmp('hf');
  writeSyntheticHfCheckpoint(hfDir, llama, { seed: 11 });
  const name = 'decoder.layers.1.mlp.linear_fc2.weight';

  /** A fresh TP=2 conversion with one byte flipped in the second piece of `name`. */
  async function damaged(): Promise<{ root: string; file: string }> {
    const root = tmp('damaged');
    await convertHfToMegapatch({ hfDir, output: root, layout: { tp: 2 } });
    using ck = Checkpoint.open(root);
    const piece = ck.info(name).pieces[1];
    expect(piece.offsets).toEqual([0, 64]);
    flipPieceByte(ck.dir, piece, 40);
    return { root, file: piece.file };
  }

  it('export fails with CORRUPT_FILE naming the file, the tensor and the piece, and writes nothing', async () => {
    const { root, file } = await damaged();
    const before = snapshot(root);
    const out = tmp('export');
    const e = await convertError(
      () => convertMegapatchToHf({ input: root, output: out }),
      'CORRUPT_FILE',
      `${file}: tensor "${name}" piece at [0,64]`,
    );
    expect(e.message).toContain('restore the checkpoint from a good copy or convert the model again');
    expect(fs.existsSync(out)).toBe(false);
    expect(temporaries(path.dirname(out))).toEqual([]);
    expect(snapshot(root)).toEqual(before);
    // Asked not to check, it exports the damaged bytes.
    await convertMegapatchToHf({ input: root, output: out, verifyChecksums: false });
    expect(fs.existsSync(path.join(out, 'model.safetensors'))).toBe(true);
  });

  it('reshard fails the same way and leaves no iteration folder behind', async () => {
    const { root } = await damaged();
    const out = tmp('reshard');
    await convertError(
      () => reshardCheckpoint({ input: root, output: out, layout: { tp: 1 } }),
      'CORRUPT_FILE',
      `tensor "${name}" piece at [0,64]`,
    );
    expect(fs.readdirSync(out)).toEqual([]);
  });

  it('verifyCheckpoint() reports it too, while an intact conversion verifies with every piece checksummed', async () => {
    const { root } = await damaged();
    using bad = Checkpoint.open(root);
    await convertError(() => verifyCheckpoint(bad), 'CORRUPT_FILE', `"${name}"`);
    const good = tmp('good');
    await convertHfToMegapatch({ hfDir, output: good, layout: { tp: 2 } });
    using ck = Checkpoint.open(good);
    const v = verifyCheckpoint(ck);
    const pieces = Object.values(ck.metadata.tensors).flatMap((t) => t.pieces);
    expect(v).toEqual({
      tensors: ck.tensorNames().length,
      pieces: pieces.length,
      bytes: ck.inspect().bytes,
      checksummedPieces: pieces.length,
      architectureChecked: 'LlamaForCausalLM',
    });
  });
});
