// The PyTorch reference fixtures of the built-in families (scripts/reference.py) and the HF
// checkpoints they were computed from; the measures come from @megapatch/models/testing.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FIXTURE_MODELS, writeFixtureCheckpoint } from '../../scripts/write-fixture-checkpoints.js';
import { type ReferenceFixture, readReferenceFixture } from '../../src/testing/index.js';

export { cosine, hfRowsInMegatron, relMaxError } from '../../src/testing/index.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const FIXTURE_DIR = path.join(HERE, '..', 'fixtures');
export const FIXTURE_IDS = FIXTURE_MODELS.map((m) => m.id);

/** A fixture with its model id. */
export interface Fixture extends ReferenceFixture {
  id: string;
}

export function readFixture(id: string): Fixture {
  return { id, ...readReferenceFixture(path.join(FIXTURE_DIR, `${id}.safetensors`)) };
}

const built = new Map<string, string>();
/** The F32 HF folder of fixture model `id` (written once per test process into a temp dir). */
export function fixtureCheckpoint(id: string): string {
  let dir = built.get(id);
  if (!dir) {
    dir = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'mp-models-')), id);
    writeFixtureCheckpoint(dir, id);
    built.set(id, dir);
  }
  return dir;
}
