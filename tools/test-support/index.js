// Where the shared data folder is: `../shared` beside the repository checkout (or
// MEGAPATCH_SHARED). Tests that read real data from it skip with a one-line reason when it is
// absent, so `pnpm test` passes in a bare clone; CI sets MEGAPATCH_REQUIRE_SHARED=1 so that a
// missing folder fails loudly there instead of silently skipping.
import { existsSync } from 'node:fs';
import { isAbsolute, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));
const candidate = process.env.MEGAPATCH_SHARED
  ? resolve(process.env.MEGAPATCH_SHARED)
  : resolve(REPO_ROOT, '..', 'shared');

/** Absolute path of the shared folder (with its `data/`), or null when it is not there. */
export const SHARED_DIR = existsSync(join(candidate, 'data')) ? candidate : null;

/** Whether the shared folder is there. */
export const hasShared = SHARED_DIR !== null;

/** The one-line reason printed when tests that need the shared folder are skipped. */
export const SHARED_SKIP_REASON = `needs the shared data folder (${join(candidate, 'data')} not found; set MEGAPATCH_SHARED)`;

if (!hasShared && process.env.MEGAPATCH_REQUIRE_SHARED === '1') {
  throw new Error(`MEGAPATCH_REQUIRE_SHARED=1 but ${SHARED_SKIP_REASON}`);
}

/**
 * The Megatron-LM checkpoints @megapatch/convert's tests are written against (make-megatron.py,
 * make-megatron-dist.py): `<name>/hf` (the HF weights) and `<name>/megatron` (the checkpoint).
 */
export function megatronFixture(name) {
  const dir = join(REPO_ROOT, 'packages', 'convert', 'test', 'fixtures', 'megatron', name);
  return { dir, hf: join(dir, 'hf'), megatron: join(dir, 'megatron') };
}

/** A Hugging Face folder of @megapatch/convert's tests whose weights are PyTorch pickles (pytorch_model*.bin). */
export function hfBinFixture(name) {
  return join(REPO_ROOT, 'packages', 'convert', 'test', 'fixtures', 'hf-bin', name);
}

const warned = new Set();

/**
 * Absolute path of `rel` inside the shared folder. When the folder is absent it returns the path
 * it would have, so module-level constants stay strings; guard the tests with {@link sharedIt}
 * or {@link sharedDescribe}.
 */
export function sharedPath(rel) {
  if (isAbsolute(rel)) throw new Error(`sharedPath takes a relative path, got ${rel}`);
  return join(SHARED_DIR ?? candidate, rel);
}

/**
 * Prints the skip reason once per test file (`who` names it) and returns whether to skip.
 * Vitest's `describe.skipIf(skipWithoutShared(import.meta.url))(...)` reads naturally.
 */
export function skipWithoutShared(who) {
  if (hasShared) return false;
  const name = who.startsWith('file:') ? fileURLToPath(who) : who;
  if (!warned.has(name)) {
    warned.add(name);
    console.warn(`[skipped] ${name.slice(REPO_ROOT.length)}: ${SHARED_SKIP_REASON}`);
  }
  return true;
}

// Tensors a test dropped without dispose() are freed by the garbage collector whenever it runs:
// perhaps in the middle of a later test that checks its memory is flat. collectGarbage() runs the
// collector and lets the finalizers free them now.
let gcFn = null;
/** Runs a full garbage collection and waits for the finalizers it queued (FinalizationRegistry). */
export async function collectGarbage() {
  if (!gcFn) {
    const v8 = await import('node:v8');
    const vm = await import('node:vm');
    v8.setFlagsFromString('--expose-gc');
    gcFn = vm.runInNewContext('gc');
  }
  gcFn();
  // the cleanup callbacks run as tasks after the collection: give them a few turns
  for (let i = 0; i < 3; i++) await new Promise((r) => setTimeout(r, 0));
}
