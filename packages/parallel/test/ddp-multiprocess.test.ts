// DDP and the distributed optimizer on 2 and 4 real processes over Gloo: N AdamW steps (with
// clipping) on per-rank shards give the losses and weights of one process on the whole batches;
// several buckets, reductions launched during backward; bytes per parameter of bf16 params with
// fp32 grads follow Megatron's 6 + 12/d (18 without sharding); a NaN on one rank skips the step on
// every rank. Skipped until the Gloo addon and the runtime exist.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import type { GradSyncStats } from '../src/distributed/distributed-data-parallel.js';
import { expectAllOk, runWorkers, type WorkerOutcome } from './helpers/workers.js';
import { maxRelDiff } from './workers/ddp-common.js';

const pkg = join(dirname(fileURLToPath(import.meta.url)), '..');
const haveRuntime =
  existsSync(join(pkg, 'build', 'Release', 'megapatch_parallel.node')) &&
  existsSync(join(pkg, 'src', 'distributed.ts'));

interface TrainResult {
  rank: number;
  losses: number[];
  steps: { updated: boolean; skipped: boolean; gradNorm: number | null }[];
  stats: GradSyncStats[];
  backwardMs: number[];
  logs: string[];
  buckets: number[];
  localElements: number;
  numParameters: number;
  weights?: Record<string, number[]>;
  reference?: { losses: number[]; gradNorms: number[]; weights: Record<string, number[]> };
}

async function train(nproc: number, args: Record<string, unknown>): Promise<TrainResult[]> {
  const out = await runWorkers({
    nproc,
    script: 'ddp-train.ts',
    args: [JSON.stringify(args)],
    timeoutMs: 120_000,
  });
  expectAllOk(out);
  return out.map((o: WorkerOutcome) => o.results[0] as TrainResult);
}

/** The global loss of each step: the mean of the ranks' local means (equal shard sizes). */
const globalLosses = (rs: TrainResult[]) =>
  rs[0].losses.map((_, s) => rs.reduce((a, r) => a + r.losses[s], 0) / rs.length);

describe.skipIf(!haveRuntime)('DDP on several processes', () => {
  describe.each([2, 4])('%i processes', (nproc) => {
    it.each([
      ['all-reduce + DataParallelOptimizer', false],
      ['reduce-scatter + DistributedOptimizer', true],
    ])('%s: same losses and weights as one process on the whole batch', async (_, distributedOptimizer) => {
      const steps = 5;
      const rs = await train(nproc, { distributedOptimizer, bucketSize: 300, steps, rowsPerRank: 8 });
      const ref = rs[0].reference!;
      // several buckets, launched from backward
      expect(rs[0].buckets[0]).toBe(3);
      for (const r of rs) {
        for (const st of r.stats) {
          expect(st.buckets).toBe(3);
          expect(st.bucketsLaunchedDuringBackward).toBeGreaterThanOrEqual(1);
          expect(st.commMs).toBeGreaterThanOrEqual(0);
          expect(st.exposedMs).toBeGreaterThanOrEqual(0);
        }
        expect(r.steps.every((s) => s.updated && !s.skipped)).toBe(true);
      }
      globalLosses(rs).forEach((l, s) => {
        expect(Math.abs(l - ref.losses[s]) / ref.losses[s]).toBeLessThan(1e-5);
      });
      rs[0].steps.forEach((st, s) => {
        expect(Math.abs(st.gradNorm! - ref.gradNorms[s]) / ref.gradNorms[s]).toBeLessThan(1e-5);
      });
      for (const r of rs) {
        expect(maxRelDiff(r.weights!, ref.weights)).toBeLessThan(1e-5);
        // every rank ends with the very same weights
        expect(maxRelDiff(r.weights!, rs[0].weights!)).toBe(0);
      }
      if (distributedOptimizer) {
        // the shards cover every element exactly once
        expect(rs.reduce((n, r) => n + r.localElements, 0)).toBe(rs[0].numParameters);
      }
    });

    it('a NaN on one rank skips the step on every rank, and training goes on', async () => {
      const nan = { rank: nproc - 1, step: 2 };
      const rs = await train(nproc, {
        distributedOptimizer: true,
        bucketSize: 300,
        steps: 4,
        rowsPerRank: 4,
        nan,
      });
      for (const r of rs) {
        expect(r.steps.map((s) => s.skipped)).toEqual([false, false, true, false]);
        expect(r.steps[2]).toEqual({ updated: false, skipped: true, gradNorm: null });
        expect(r.logs).toEqual(['iteration skipped: gradient norm is nan']);
      }
      // the skipped step left no trace: the reference never saw that batch
      const ref = rs[0].reference!;
      for (const r of rs) expect(maxRelDiff(r.weights!, ref.weights)).toBeLessThan(1e-5);
    });
  });

  it.each([2, 4])(
    'bf16 params with fp32 grads: 6 + 12/d bytes per parameter with the distributed optimizer, 18 without (d = %i)',
    async (nproc) => {
      const run = async (distributedOptimizer: boolean) => {
        const out = await runWorkers({
          nproc,
          script: 'ddp-memory.ts',
          args: [JSON.stringify({ distributedOptimizer, hidden: 256, bucketSize: 20_000 })],
        });
        expectAllOk(out);
        return out.map(
          (o) =>
            o.results[0] as {
              numParameters: number;
              bufferNumel: number[];
              localElements: number;
              modelBytes: number;
              ddpBytes: number;
              optimizerBytes: number;
              updated: boolean;
            },
        );
      };
      for (const distributed of [true, false]) {
        const rs = await run(distributed);
        for (const r of rs) {
          const n = r.numParameters;
          const padded = r.bufferNumel.reduce((a, b) => a + b, 0);
          expect(r.updated).toBe(true);
          expect(r.modelBytes).toBe(2 * n);
          const perParam = (r.modelBytes + r.ddpBytes + r.optimizerBytes) / n;
          const formula = distributed ? 6 + 12 / nproc : 18;
          // exact accounting: buffers (padding included) and 12 bytes per element this rank updates
          if (distributed) {
            expect(r.ddpBytes).toBe(6 * padded - 2 * n);
            expect(r.optimizerBytes).toBe(12 * r.localElements);
          } else {
            expect(r.ddpBytes).toBe(4 * padded);
            expect(r.optimizerBytes).toBe(12 * n);
          }
          // Megatron's formula, up to the padding (64-element starts, lcm(d, 128) bucket ends): the
          // buffers carry it, and a rank's shard holds between padded/d − padding and padded/d elements
          expect(Math.abs(perParam - formula)).toBeLessThanOrEqual((18 * (padded - n)) / n);
          expect((padded - n) / n).toBeLessThan(0.01);
          console.log(
            `d=${nproc} ${distributed ? 'distributed' : 'plain'}: ${perParam.toFixed(3)} bytes/param (formula ${formula})`,
          );
        }
      }
    },
  );

  it('a rank without expert parameters still joins the expert norm of a group that has them (no hang)', async () => {
    const out = await runWorkers({ nproc: 2, script: 'expert-norm-worker.ts', timeoutMs: 60_000 });
    expectAllOk(out);
    const rs = out.flatMap((o) => o.results) as {
      rank: number;
      sharded: boolean;
      gradNorm: number;
      dense: number;
      expert: number;
    }[];
    for (const sharded of [false, true]) {
      const [r0, r1] = [0, 1].map((k) => rs.find((r) => r.rank === k && r.sharded === sharded)!);
      expect(r0.expert, 'the first stage holds no experts').toBe(0);
      expect(r1.expert).toBeGreaterThan(0);
      const total = Math.sqrt(r0.dense + r1.dense + r1.expert);
      for (const r of [r0, r1])
        expect(Math.abs(r.gradNorm - total) / total, `rank ${r.rank}`).toBeLessThan(1e-5);
    }
  });
});
