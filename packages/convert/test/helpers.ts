// Helpers shared by the checkpoint-safety tests: scratch folders, byte-exact folder snapshots,
// damaging one byte of a stored piece, and catching the error a call throws.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, expect } from 'vitest';
import {
  Checkpoint,
  type CheckpointPiece,
  ConvertError,
  SafetensorsFile,
  type TransformerConfigInput,
} from '../src/index.js';

/** A scratch-folder factory whose root is removed after the file's tests. */
export function scratch(prefix: string): (label: string) => string {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), `megapatch-${prefix}-`));
  afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
  let n = 0;
  return (label) => path.join(root, `${n++}-${label}`);
}

/** Every entry under `dir` (relative path → SHA-256 of a file's bytes, or `dir` / `link -> target`). */
export function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (rel: string) => {
    for (const e of fs.readdirSync(path.join(dir, rel), { withFileTypes: true })) {
      const r = path.join(rel, e.name);
      const full = path.join(dir, r);
      if (e.isSymbolicLink()) out[r] = `link -> ${fs.readlinkSync(full)}`;
      else if (e.isDirectory()) {
        out[r] = 'dir';
        walk(r);
      } else out[r] = createHash('sha256').update(fs.readFileSync(full)).digest('hex');
    }
  };
  walk('');
  return out;
}

/** SHA-256 (lowercase hex) of some bytes. */
export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Flips one bit of byte `at` of a piece's data (inside its safetensors file, header untouched). */
export function flipPieceByte(iterDir: string, piece: CheckpointPiece, at = 0): void {
  const file = path.join(iterDir, piece.file);
  const f = SafetensorsFile.open(file);
  const [begin, end] = f.byteRange(piece.key);
  f.close();
  expect(begin + at).toBeLessThan(end);
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, begin + at);
    b[0] ^= 0x10;
    fs.writeSync(fd, b, 0, 1, begin + at);
  } finally {
    fs.closeSync(fd);
  }
}

/** The error `f` throws (or its promise rejects with); fails the test when nothing is thrown. */
export async function thrown(f: () => unknown): Promise<unknown> {
  try {
    await f();
  } catch (e) {
    return e;
  }
  throw new Error('expected an error');
}

/** The ConvertError `f` throws, checked for its code and message fragments. */
export async function convertError(
  f: () => unknown,
  code: string,
  ...mentions: string[]
): Promise<ConvertError> {
  const e = await thrown(f);
  expect(e).toBeInstanceOf(ConvertError);
  const err = e as ConvertError;
  expect(err.code, err.message).toBe(code);
  for (const m of mentions) expect(err.message).toContain(m);
  return err;
}

/** Names under `dir` (recursively) that look like a temporary of a conversion. */
export function temporaries(dir: string): string[] {
  if (!fs.existsSync(dir)) return [];
  return Object.keys(snapshot(dir)).filter((p) => /\.tmp-\d+|\.old-\d+/.test(p));
}

/** A minimal dense model, for tests of TransformerConfig's own checks. */
export const TINY_DENSE: TransformerConfigInput = {
  numLayers: 2,
  hiddenSize: 8,
  ffnHiddenSize: 16,
  numAttentionHeads: 2,
  numQueryGroups: 1,
  kvChannels: 4,
  layernormEpsilon: 1e-5,
  rotaryBase: 10000,
  untieEmbeddingsAndOutputWeights: true,
  vocabSize: 10,
  maxPositionEmbeddings: 32,
};

/** Expects `fn` to throw a ConvertError with `code` whose message contains every one of `parts`. */
export function expectError(fn: () => unknown, code: string, ...parts: string[]): ConvertError {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(ConvertError);
  const ce = err as ConvertError;
  expect(ce.code).toBe(code);
  for (const p of parts) expect(ce.message).toContain(p);
  return ce;
}

/** Two checkpoints hold the same tensors (names, dtypes, global shapes, bytes) in the same layout. */
export function expectSameCheckpoints(got: string, want: string): void {
  using a = Checkpoint.open(got);
  using b = Checkpoint.open(want);
  expect(a.tensorNames().sort()).toEqual(b.tensorNames().sort());
  for (const n of b.tensorNames()) {
    expect(a.info(n).dtype, n).toBe(b.info(n).dtype);
    expect(a.info(n).globalShape, n).toEqual(b.info(n).globalShape);
    expect(Buffer.from(a.read(n)).equals(Buffer.from(b.read(n))), n).toBe(true);
  }
  expect(a.metadata.layout).toEqual(b.metadata.layout);
}
