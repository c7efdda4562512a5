// The CUDA emulator (native/emu): its self-test program, built with the host C++ compiler, runs
// the emulator's kernels (barriers, warp shuffles and votes, partial warps, dynamic shared memory,
// atomics, 3-D grids, intrinsics) and checks that divergent barriers, __trap and bad launch
// configurations are reported. The same self-test compiles with nvcc for a GPU.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const pkg = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const hasGxx = spawnSync('g++', ['--version'], { encoding: 'utf8' }).status === 0;
const skipped = hasGxx ? '' : ' (skipped: g++ is not installed)';
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-cuda-emu-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe('CUDA emulator', () => {
  it.skipIf(!hasGxx)(
    `passes its self-test${skipped}`,
    () => {
      const exe = path.join(tmp, 'selftest');
      execFileSync(
        'g++',
        [
          '-std=c++17',
          '-O1',
          '-x',
          'c++',
          '-DMEGAPATCH_CUDA_EMULATOR=1',
          '-I',
          'native/emu',
          '-I',
          'native/src/kernels',
          'native/emu/test/selftest.cu',
          'native/emu/emu.cc',
          '-o',
          exe,
        ],
        { cwd: pkg, timeout: 120_000, stdio: ['ignore', 'pipe', 'pipe'] },
      );
      const run = spawnSync(exe, [], { encoding: 'utf8', timeout: 120_000 });
      const out = `${run.stdout}${run.stderr}`;
      expect(out).toMatch(/^ok \d+ checks$/m);
      expect(run.status, out).toBe(0);
    },
    240_000,
  );
});
