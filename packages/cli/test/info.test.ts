import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { collectInfo, formatInfo } from '../src/commands/info.js';

const bin = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'megapatch.js');

describe('megapatch info', () => {
  it('reports the package versions, the BLAS in use and CUDA availability', async () => {
    const r = await collectInfo();
    expect(r.packages['@megapatch/tensor']).toMatch(/^\d+\.\d+\.\d+/);
    expect('error' in r.cpu).toBe(false);
    if (!('error' in r.cpu)) {
      expect(['openblas', 'portable']).toContain(r.cpu.blas);
      expect(r.cpu.threads).toBeGreaterThan(0);
    }
    // this machine has no GPU: @megapatch/cuda says why, and what its build holds
    expect(r.cuda.available).toBe(false);
    expect(r.cuda.reason).toMatch(/^(built without CUDA: |no usable GPU: )/);
    const text = formatInfo(r);
    expect(text).toContain('blas');
    expect(text).toContain(`cuda: not available — ${r.cuda.reason}`);
    if (r.cuda.toolkit)
      expect(text).toMatch(/built with CUDA \d+\.\d+\.\d+; runtime \d+\.\d+; driver (none|\d+\.\d+); NCCL/);
  });

  it('runs as a command and prints JSON', () => {
    const out = execFileSync(process.execPath, [bin, 'info', '--json'], {
      encoding: 'utf8',
      env: { ...process.env, MEGAPATCH_NUM_THREADS: '1' },
    });
    const r = JSON.parse(out);
    expect(r.cpu.threads).toBe(1);
    expect(r.cuda.available).toBe(false);
  });
});
