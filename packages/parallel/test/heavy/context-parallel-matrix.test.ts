// pnpm test:heavy: ring attention on longer sequences, DeepSeek's MLA head dims (192 / 128),
// rows packed with many samples and bf16, for cp = 2, 3 and 4, and CP groups that are not the
// whole job (TP2 x CP2: groups {0, 2} and {1, 3}).
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { expectAllOk, runWorkers } from '../helpers/workers.js';
import { heavyCases, type RingCaseResult } from '../workers/context-parallel-cases.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const ready = existsSync(join(root, 'build', 'Release', 'megapatch_parallel.node'));

const layouts: { name: string; nproc: number; env: Record<string, string> }[] = [
  { name: 'CP2', nproc: 2, env: {} },
  { name: 'CP3', nproc: 3, env: {} },
  { name: 'CP4', nproc: 4, env: {} },
  { name: 'TP2 x CP2', nproc: 4, env: { TP_SIZE: '2', CP_SIZE: '2' } },
];

for (const layout of layouts) {
  describe.skipIf(!ready)(`ring attention, ${layout.name}`, () => {
    let results: RingCaseResult[] = [];
    beforeAll(async () => {
      const outcomes = await runWorkers({
        nproc: layout.nproc,
        script: 'context-parallel-worker.ts',
        args: ['heavy'],
        env: layout.env,
        timeoutMs: 800_000,
      });
      expectAllOk(outcomes);
      results = outcomes.flatMap((o) => o.results as RingCaseResult[]);
    }, 850_000);

    for (const c of heavyCases()) {
      it(`${c.name}: output and dq, dk, dv equal full-sequence attention on every rank`, () => {
        const mine = results.filter((r) => r.case === c.name);
        expect(mine.length).toBe(layout.nproc);
        for (const r of mine) {
          for (const [name, rel] of Object.entries(r.rel)) {
            expect(rel, `cp rank ${r.rank} ${name}`).toBeLessThanOrEqual(c.tolerance);
          }
          expect(r.leakedBytes).toBe(0);
        }
      });
    }
  });
}
