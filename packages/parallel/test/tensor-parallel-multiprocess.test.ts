// Tensor-parallel mappings, layers, cross-entropy and RNG tracker across 2 and 4 real processes
// (Gloo, float32): every rank runs the cases of workers/tp-cases.ts against the single-process
// reference built from the same seeds and reports each comparison; this file checks them all.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { expectAllOk, runWorkers } from './helpers/workers.js';
import type { CaseResult } from './workers/tp-cases.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const ready =
  existsSync(join(root, 'build', 'Release', 'megapatch_parallel.node')) &&
  existsSync(join(root, 'src', 'distributed.ts'));

for (const tp of [2, 4]) {
  describe.skipIf(!ready)(`tensor parallelism over ${tp} processes`, () => {
    let results: CaseResult[] = [];

    beforeAll(async () => {
      const outcomes = await runWorkers({ nproc: tp, script: 'tp-worker.ts', timeoutMs: 180_000 });
      expectAllOk(outcomes);
      results = outcomes.flatMap((o) => o.results as CaseResult[]);
    }, 240_000);

    it('every rank reports the same cases', () => {
      const names = (r: number) => results.filter((x) => x.rank === r && x.tp === tp).map((x) => x.case);
      expect(names(0).length).toBeGreaterThan(30);
      expect(names(0)).toContain('rng');
      expect(names(0)).toContain('default group');
      for (let r = 1; r < tp; r++) expect(names(r)).toEqual(names(0));
    });

    for (const prefix of ['mapping/', 'layer/', 'crossEntropy', 'default group']) {
      it(`${prefix.replace('/', '')}: every rank matches the single-process computation`, () => {
        const mine = results.filter((x) => x.case.startsWith(prefix));
        expect(mine.length).toBeGreaterThan(0);
        const failed = mine.flatMap((x) =>
          x.checks
            .filter((c) => !c.ok)
            .map((c) => `rank ${x.rank} ${x.case} / ${c.name}: ${c.detail} (max |d| ${c.maxAbs})`),
        );
        expect(failed).toEqual([]);
      });
    }

    it('mappings are bit-identical (torch.equal)', () => {
      const mappings = results.filter((x) => x.case.startsWith('mapping/'));
      expect(mappings.every((x) => x.checks.every((c) => c.exact))).toBe(true);
    });

    it('layer weights are exact shards of the TP=1 weights', () => {
      const inits = results.flatMap((x) => x.checks.filter((c) => c.name.startsWith('weight = shard')));
      expect(inits.length).toBeGreaterThan(0);
      expect(inits.every((c) => c.exact)).toBe(true);
    });

    it('weight gradients are bit-identical slices of the TP=1 weight gradients', () => {
      const grads = results.flatMap((x) => x.checks.filter((c) => c.name === 'weight grad'));
      expect(grads.length).toBeGreaterThan(0);
      expect(grads.filter((c) => !c.exact)).toEqual([]);
    });

    it('dropout masks differ across TP ranks inside the model-parallel fork and agree outside', () => {
      const rng = results.filter((x) => x.case === 'rng');
      expect(rng.length).toBe(tp);
      expect(rng.flatMap((x) => x.checks.filter((c) => !c.ok))).toEqual([]);
      const inside = rng.map((x) => x.values?.inside);
      const outside = rng.map((x) => x.values?.outside);
      expect(new Set(inside).size).toBe(tp);
      expect(new Set(rng.map((x) => x.values?.inside2)).size).toBe(tp);
      expect(new Set(outside).size).toBe(1);
    });
  });
}
