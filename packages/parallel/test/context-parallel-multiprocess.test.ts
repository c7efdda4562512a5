// Ring attention across 2 and 4 real processes (Gloo, one CP group over the whole job): the
// output and the gradients of q, k and v, gathered back to the full sequence, equal single-process
// attention on the full sequence for grouped-query and MLA-like head dims, plain and packed rows,
// causal or not; every exchange is posted before the block it overlaps is computed.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { expectAllOk, runWorkers } from './helpers/workers.js';
import { defaultCases, type RingCaseResult } from './workers/context-parallel-cases.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const ready = existsSync(join(root, 'build', 'Release', 'megapatch_parallel.node'));

interface Trace {
  case: 'trace';
  rank: number;
  cp: number;
  log: string[];
  same: boolean;
}

/** The trace with runs of one kernel collapsed: 'forward', 'forward' -> 'forward'. */
function collapse(log: readonly string[]): string[] {
  return log.filter((x, i) => !(x === log[i - 1] && (x === 'forward' || x === 'backward')));
}

for (const cp of [2, 4]) {
  describe.skipIf(!ready)(`ring attention over ${cp} processes`, () => {
    let results: RingCaseResult[] = [];
    let traces: Trace[] = [];

    beforeAll(async () => {
      const outcomes = await runWorkers({
        nproc: cp,
        script: 'context-parallel-worker.ts',
        timeoutMs: 150_000,
      });
      expectAllOk(outcomes);
      const all = outcomes.flatMap((o) => o.results as (RingCaseResult | Trace)[]);
      results = all.filter((r): r is RingCaseResult => r.case !== 'trace');
      traces = all.filter((r): r is Trace => r.case === 'trace');
    }, 180_000);

    for (const c of defaultCases()) {
      it(`${c.name}: output and dq, dk, dv equal full-sequence attention`, () => {
        const mine = results.filter((r) => r.case === c.name);
        expect(mine.map((r) => r.rank).sort()).toEqual(Array.from({ length: cp }, (_, r) => r));
        for (const r of mine) {
          for (const [name, rel] of Object.entries(r.rel)) {
            expect(rel, `rank ${r.rank} ${name}`).toBeLessThanOrEqual(c.tolerance);
          }
          expect(r.leakedBytes, `rank ${r.rank} frees every tensor`).toBe(0);
        }
      });
    }

    it('posts each K/V exchange before computing the block it overlaps, in forward and backward', () => {
      expect(traces.length).toBe(cp);
      for (const t of traces) {
        expect(t.same, 'the default CP group gives the same output').toBe(true);
        const [fwd, bwd] = t.log
          .join(',')
          .split(',--,')
          .map((part) => part.split(','));
        const step = ['send', 'recv', 'forward', 'wait send', 'wait recv'];
        expect(collapse(fwd)).toEqual([...Array.from({ length: cp - 1 }, () => step).flat(), 'forward']);
        // step 0 sends K/V; later steps send K/V and the running dK/dV; a last hop returns dK/dV
        const first = ['send', 'recv', 'backward', 'wait send', 'wait recv'];
        const middle = [
          'send',
          'recv',
          'send',
          'recv',
          'backward',
          'wait send',
          'wait recv',
          'wait send',
          'wait recv',
        ];
        const last = ['send', 'recv', 'backward', 'wait send', 'wait recv'];
        const hop = ['send', 'recv', 'wait send', 'wait recv'];
        expect(collapse(bwd)).toEqual([
          ...first,
          ...Array.from({ length: cp - 2 }, () => middle).flat(),
          ...last,
          ...hop,
        ]);
      }
    });
  });
}
