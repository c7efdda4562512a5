// @megapatch/cuda on a machine without a usable GPU (CI, this project's CPU machines): the addon
// builds with or without the CUDA toolkit, cudaInfo() says what it found without throwing, and
// importing the package throws one line that says why it cannot run here. A build forced without
// CUDA (MEGAPATCH_NO_CUDA=1) reports that as its reason.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { cudaInfo } from '../src/info.js';

const pkg = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const tsx = path.join(pkg, 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-cuda-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Imports the package in a child process (its addon from `native` when given). */
function importPackage(native?: string) {
  const script = `
    import(${JSON.stringify(path.join(pkg, 'src', 'index.ts'))}).then(
      () => console.log(JSON.stringify({ ok: true })),
      (e) => console.log(JSON.stringify({ ok: false, name: e.name, code: e.code, message: e.message })),
    );
    const { cudaInfo } = await import(${JSON.stringify(path.join(pkg, 'src', 'info.ts'))});
    console.log(JSON.stringify(cudaInfo()));
  `;
  const r = spawnSync(process.execPath, ['--import', tsx, '--input-type=module', '-e', script], {
    encoding: 'utf8',
    env: { ...process.env, ...(native ? { MEGAPATCH_CUDA_NATIVE: native } : {}) },
  });
  expect(r.stderr).toBe('');
  const lines = r.stdout
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l));
  const imported = lines.find((l) => 'ok' in l);
  const info = lines.find((l) => 'available' in l);
  return { imported, info };
}

describe('cudaInfo', () => {
  it('reports what the build and the machine offer, and why CUDA is unavailable', () => {
    const info = cudaInfo();
    expect(info.available).toBe(info.devices.length > 0);
    if (!info.built) {
      expect(info.reason).toMatch(
        /^built without CUDA: (no CUDA compiler \(nvcc\)|built with MEGAPATCH_NO_CUDA|CMake found the CUDA compiler .* but no cuBLAS)/,
      );
      expect(info.toolkit).toBeNull();
    } else {
      expect(info.toolkit).toMatch(/^\d+\.\d+\.\d+$/);
      expect(info.runtime).toMatch(/^\d+\.\d+$/);
      if (!info.available) expect(info.reason).toMatch(/^no usable GPU: /);
    }
  });
});

describe('importing @megapatch/cuda', () => {
  it('registers the backend where a GPU is usable, else throws one line that says why not', () => {
    const { imported, info } = importPackage();
    if (info.available) {
      expect(imported.ok).toBe(true);
      return;
    }
    expect(imported.ok).toBe(false);
    expect(imported.name).toBe('CudaError');
    expect(imported.code).toBe('UNAVAILABLE');
    expect(imported.message).toBe(`@megapatch/cuda: CUDA is not available: ${info.reason}`);
    expect(imported.message).not.toContain('\n');
  });

  it('loads only the build MEGAPATCH_CUDA_NATIVE names, and says why when it cannot', () => {
    // a file that is no shared object: dlopen refuses it (before: the package's own build loaded)
    const bad = path.join(tmp, 'not-an-addon.node');
    fs.writeFileSync(bad, 'not an ELF file');
    const { imported, info } = importPackage(bad);
    expect(info).toMatchObject({ available: false, built: false });
    expect(info.reason).toMatch(/^the addon of @megapatch\/cuda is not built \(.*not-an-addon\.node: /);
    expect(info.reason).not.toContain(path.join('build', 'Release'));
    expect(imported).toMatchObject({ ok: false, code: 'UNAVAILABLE' });
    expect(imported.message).not.toContain('\n');
  });

  it('built with MEGAPATCH_NO_CUDA set, the addon says so (the reason keeps ; and quotes)', () => {
    const out = path.join(tmp, 'build');
    const r = spawnSync('npx', ['cmake-js', 'compile', '--out', out], {
      cwd: pkg,
      encoding: 'utf8',
      // the emulator build is not what this test is about (and takes minutes)
      env: { ...process.env, MEGAPATCH_NO_CUDA: '1; "on purpose"', MEGAPATCH_NO_CUDA_EMULATOR: '1' },
    });
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toContain(
      'building @megapatch/cuda without CUDA: built with MEGAPATCH_NO_CUDA=1; "on purpose"',
    );
    const { imported, info } = importPackage(path.join(out, 'Release', 'megapatch_cuda.node'));
    expect(info).toMatchObject({
      available: false,
      built: false,
      reason: 'built without CUDA: built with MEGAPATCH_NO_CUDA=1; "on purpose"',
    });
    expect(imported).toMatchObject({
      ok: false,
      code: 'UNAVAILABLE',
      message:
        '@megapatch/cuda: CUDA is not available: built without CUDA: built with MEGAPATCH_NO_CUDA=1; "on purpose"',
    });
  });
});
