// The Gemma fixture (scripts/reference.py) and the checkpoint it was computed from; the reader and
// the error measures come from @megapatch/models/testing, as for the built-in families.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type ReferenceFixture, readReferenceFixture } from '@megapatch/models/testing';
import { writeGemmaCheckpoint } from '../scripts/write-checkpoint.js';

export { cosine, hfRowsInMegatron, relMaxError } from '@megapatch/models/testing';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const FIXTURE = path.join(HERE, 'fixtures', 'gemma.safetensors');

export function readFixture(file = FIXTURE): ReferenceFixture {
  return readReferenceFixture(file);
}

/** A fresh temporary folder, removed by the returned function. */
export function tempDir(prefix: string): { dir: string; remove: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, remove: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** Writes the synthetic Gemma checkpoint into `root`/gemma and returns that folder. */
export function gemmaCheckpoint(root: string): string {
  const dir = path.join(root, 'gemma');
  writeGemmaCheckpoint(dir);
  return dir;
}
