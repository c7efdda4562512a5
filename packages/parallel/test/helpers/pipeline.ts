// The multi-process pipeline checks shared by test/pipeline-multiprocess.test.ts and
// test/heavy/pipeline-matrix.test.ts: runs test/workers/pipeline-worker.ts on `pp` processes with
// a list of cases and checks each case against the single-process reference, its schedule, flat
// memory, and (jitter cases) the same case without delays.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { pipelineSchedule } from '../../src/pipeline/schedules.js';
import { maxRelDiff } from '../workers/ddp-common.js';
import type { PipelineCase } from '../workers/pipeline-worker.js';
import { expectAllOk, runWorkers } from './workers.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const ready = existsSync(join(root, 'build', 'Release', 'megapatch_parallel.node'));

interface Reference {
  losses: number[][];
  evalLosses: number[];
  weights: Record<string, number[]>;
}
interface CaseResult {
  case: string;
  rank: number;
  losses: number[][];
  evalLosses: number[];
  order: string[][];
  liveBytes: number[];
  noSyncCalls: number;
  finalized: number;
  weights: Record<string, number[]>;
  reference?: Reference;
}

const rel = (a: number, b: number) => Math.abs(a - b) / Math.max(Math.abs(b), 1e-12);

function expectedOrder(c: PipelineCase, pp: number, rank: number): string[] {
  return pipelineSchedule({
    pipelineParallelSize: pp,
    pipelineParallelRank: rank,
    numMicrobatches: c.numMicrobatches,
    virtualPipelineParallelSize: c.vpp,
    microbatchGroupSizePerVpStage: c.groupSize,
  }).steps.map((s) => `${s.kind === 'forward' ? 'F' : 'B'}${s.microbatch}.${s.chunk}`);
}

export type { PipelineCase };

/**
 * One describe block: every case on `pp` processes (a case named 'x jitter' is compared with the
 * case 'x', which must be in the list). `timeoutMs` kills the workers: a deadlock fails there.
 */
export function describePipelineSuite(pp: number, cases: PipelineCase[], timeoutMs = 60_000): void {
  describe.skipIf(!ready)(`pipeline parallelism over ${pp} processes`, () => {
    let results: CaseResult[] = [];
    beforeAll(async () => {
      const out = await runWorkers({
        nproc: pp,
        script: 'pipeline-worker.ts',
        args: [JSON.stringify(cases)],
        // a hang (a deadlocked schedule) fails here instead of waiting for Gloo's timeout
        timeoutMs,
      });
      expectAllOk(out);
      results = out.flatMap((o) => o.results as CaseResult[]);
    }, timeoutMs + 30_000);
    const of = (name: string) => results.filter((r) => r.case === name).sort((a, b) => a.rank - b.rank);

    for (const c of cases.filter((x) => x.jitter === undefined)) {
      it(`${c.name}: same losses and weights as one process with gradient accumulation`, () => {
        const rs = of(c.name);
        expect(rs.length).toBe(pp);
        const ref = rs[0].reference!;
        // the last stage reports every microbatch's loss; the others none
        const last = rs[pp - 1];
        expect(last.losses.map((l) => l.length)).toEqual(ref.losses.map((l) => l.length));
        const lossDiffs = last.losses.flatMap((step, s) => step.map((l, i) => rel(l, ref.losses[s][i])));
        expect(Math.max(...lossDiffs)).toBeLessThan(1e-5);
        expect(last.evalLosses.length).toBe(ref.evalLosses.length);
        expect(Math.max(...last.evalLosses.map((l, i) => rel(l, ref.evalLosses[i])))).toBeLessThan(1e-5);
        for (const r of rs.slice(0, -1)) expect(r.losses.every((l) => l.length === 0)).toBe(true);
        // every parameter of the stack lives on some rank and matches the reference
        const seen = new Set<string>();
        for (const r of rs) {
          const mine = Object.fromEntries(Object.keys(r.weights).map((n) => [n, ref.weights[n]]));
          expect(maxRelDiff(r.weights, mine)).toBeLessThan(1e-5);
          for (const n of Object.keys(r.weights)) seen.add(n);
        }
        expect([...seen].sort()).toEqual(Object.keys(ref.weights).sort());
        if (c.tied) {
          // both copies of the tied embedding moved together
          expect(rs[0].weights['embedding.weight']).toEqual(rs[pp - 1].weights['embedding.weight']);
        }
      });

      it(`${c.name}: each rank runs its schedule's steps; grad sync off but for each chunk's last microbatch; memory is flat`, () => {
        const chunks = c.vpp ?? 1;
        for (const r of of(c.name)) {
          for (const order of r.order) expect(order).toEqual(expectedOrder(c, pp, r.rank));
          expect(r.noSyncCalls).toBe(c.steps * chunks * (c.numMicrobatches - 1));
          expect(r.finalized).toBe(c.steps);
          // the first step creates the momentum buffers; afterwards nothing accumulates
          expect(new Set(r.liveBytes.slice(1)).size).toBe(1);
        }
      });
    }

    for (const c of cases.filter((x) => x.jitter !== undefined)) {
      it(`${c.name}: random delays on every rank change nothing (no deadlock, bit-identical results)`, () => {
        const calm = of(c.name.replace(' jitter', ''));
        const shaken = of(c.name);
        expect(shaken.length).toBe(pp);
        shaken.forEach((r, rank) => {
          expect(r.losses).toEqual(calm[rank].losses);
          expect(r.evalLosses).toEqual(calm[rank].evalLosses);
          expect(r.weights).toEqual(calm[rank].weights);
          expect(r.order).toEqual(calm[rank].order);
        });
      });
    }
  });
}
