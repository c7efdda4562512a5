// The emulator's dry run (MEGAPATCH_CUDA_EMU_DRY_RUN=1): launches are counted, not run, so a
// workload's host side can be profiled at full size (bench/ours.mts reports the launches of a
// training step). Runs in a child process, as the flag is read once per process.
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { loadEmulatorAddon } from '../src/native.js';

const pkg = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const built = loadEmulatorAddon();
const skip = 'error' in built ? built.error : '';
const TSX = path.join(pkg, 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs');

// a 4096³ bf16 product (hours on the emulator when run), a small round trip and the counts
const SCRIPT = `
import * as T from '@megapatch/tensor';
import { loadEmulatorAddon } from './src/native.ts';
await import('./src/emulator.ts');
const loaded = loadEmulatorAddon();
if ('error' in loaded) throw new Error(loaded.error);
const addon = loaded.addon;
const before = addon.emuStats().launches;
const a = T.zeros([4096, 4096], { device: 'cudaemu:0', dtype: 'bfloat16' });
const c = T.matmul(a, a);
const ids = T.tensor([3, 1, 2], { dtype: 'int64', device: 'cudaemu:0' });
const back = Array.from(ids.toTypedArray(), Number);
T.synchronize('cudaemu:0');
const after = addon.emuStats();
console.log(JSON.stringify({ dryRun: after.dryRun, launches: after.launches - before, back, shape: c.shape }));
`;

function run(dry: boolean) {
  const r = spawnSync(process.execPath, ['--import', TSX, '--input-type=module', '-e', SCRIPT], {
    cwd: pkg,
    encoding: 'utf8',
    timeout: 120_000,
    env: { ...process.env, MEGAPATCH_CUDA_EMU_DRY_RUN: dry ? '1' : '0' },
  });
  expect(r.status, `${r.stdout}${r.stderr}`).toBe(0);
  return JSON.parse(r.stdout.trim().split('\n').at(-1) as string);
}

describe.skipIf(skip !== '')(`the emulator's dry run${skip ? ` (skipped: ${skip})` : ''}`, () => {
  it('counts launches without running them, and small transfers still round-trip', () => {
    const t0 = performance.now();
    const out = run(true);
    expect(out.dryRun).toBe(true);
    expect(out.launches).toBeGreaterThanOrEqual(1); // the GEMM (zeros is a memset)
    expect(out.shape).toEqual([4096, 4096]);
    expect(out.back).toEqual([3, 1, 2]);
    expect(performance.now() - t0).toBeLessThan(60_000);
  });

  it('is off unless asked for', () => {
    const r = spawnSync(
      process.execPath,
      [
        '--import',
        TSX,
        '--input-type=module',
        '-e',
        `import { loadEmulatorAddon } from './src/native.ts';
         const l = loadEmulatorAddon(); console.log(JSON.stringify(l.addon.emuStats()));`,
      ],
      {
        cwd: pkg,
        encoding: 'utf8',
        timeout: 60_000,
        env: { ...process.env, MEGAPATCH_CUDA_EMU_DRY_RUN: '' },
      },
    );
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout.trim()).dryRun).toBe(false);
  });
});
