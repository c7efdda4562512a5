// Writes the F32 Hugging Face checkpoints the logits-parity fixtures were computed from: each
// synthetic model of @megapatch/convert with the overrides of fixture-models.json (the single source
// of the fixture list), seed 0. Tests import writeFixtureCheckpoint to rebuild the same bytes.
// Usage: tsx scripts/write-fixture-checkpoints.ts <outDir>   → <outDir>/<id>/
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';

/** One fixture model: a synthetic model id and the config.json keys that replace its own. */
export interface FixtureModel {
  id: string;
  /** Shallow merge: a nested object such as rope_scaling replaces the synthetic one whole. */
  overrides: Record<string, unknown>;
}

const HERE = path.dirname(fileURLToPath(import.meta.url));

/** The fixture models, in the order of fixture-models.json. */
export const FIXTURE_MODELS: FixtureModel[] = JSON.parse(
  fs.readFileSync(path.join(HERE, 'fixture-models.json'), 'utf8'),
);

/** The full HF config.json of fixture model `id` (synthetic config with the overrides applied). */
export function fixtureConfig(id: string): Record<string, unknown> {
  const fixture = FIXTURE_MODELS.find((m) => m.id === id);
  const synthetic = SYNTHETIC_MODELS.find((m) => m.id === id);
  if (!fixture || !synthetic) {
    throw new Error(`unknown fixture model "${id}" (known: ${FIXTURE_MODELS.map((m) => m.id).join(', ')})`);
  }
  return { ...synthetic.config, ...fixture.overrides };
}

/** Writes fixture model `id` as an F32 HF folder at `dir` (seed 0, one model.safetensors). */
export function writeFixtureCheckpoint(dir: string, id: string): void {
  writeSyntheticHfCheckpoint(dir, fixtureConfig(id), { dtype: 'F32', seed: 0, maxShardSize: '1GB' });
}

function main(): void {
  const outDir = process.argv[2];
  if (!outDir) {
    console.error('usage: tsx scripts/write-fixture-checkpoints.ts <outDir>');
    process.exit(2);
  }
  for (const { id } of FIXTURE_MODELS) {
    writeFixtureCheckpoint(path.join(outDir, id), id);
    console.log(`wrote ${path.join(outDir, id)}`);
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) main();
