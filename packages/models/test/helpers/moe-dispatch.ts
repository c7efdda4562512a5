// The MoE dispatcher cases of test/moe-dispatch.test.ts and test/heavy/moe-dispatch.test.ts: each
// case runs with the allgather dispatcher, then with alltoall, on real processes
// (test/workers/moe-dispatch-worker.ts), and must match one process and each other.
import { expect } from 'vitest';
import type { DispatchResult, DispatchRun, DispatchWorkerConfig } from '../workers/moe-dispatch-worker.js';
import { fixtureCheckpoint } from './fixtures.js';
import { launchWorkers } from './launch.js';

/** fp32 relative tolerance of logits, loss and gradients. */
const TOL = 1e-5;

/** A model and capacity setting. */
export interface DispatchCase {
  id: string;
  what: string;
  capacityFactor?: number;
  dropPolicy?: 'probs' | 'position';
  pad?: boolean;
  /** The capacity is above every expert's count: padding only. */
  dropsNothing?: boolean;
  recompute?: boolean;
  /** Sequence length (default: the layout's). */
  seq?: number;
  /** Train with the load-balancing aux loss and the z-loss, and compare them with one process. */
  auxLoss?: boolean;
  /** With auxLoss: Megatron's seq_aux_loss (per sample) instead of the micro-batch's. */
  seqAux?: boolean;
}

/** Case i runs as runs 2i (allgather) and 2i + 1 (alltoall); the results per run, ranks in order. */
export async function runCases(
  nproc: number,
  layout: Omit<DispatchWorkerConfig, 'runs'>,
  cases: readonly DispatchCase[],
): Promise<DispatchResult[][]> {
  const runs: DispatchRun[] = cases.flatMap(({ what: _, ...c }) =>
    (['allgather', 'alltoall'] as const).map((dispatcher) => ({
      ...c,
      dispatcher,
      dir: fixtureCheckpoint(c.id),
    })),
  );
  const results = (await launchWorkers({
    nproc,
    script: 'moe-dispatch-worker.ts',
    config: { ...layout, runs },
    timeoutMs: 300_000,
  })) as DispatchResult[];
  return runs.map((_, i) => results.filter((r) => r.run === i).sort((a, b) => a.rank - b.rank));
}

/** Case i ran on every rank with both dispatchers and matches one process and the other dispatcher. */
export function expectCase(
  results: DispatchResult[][],
  cases: readonly DispatchCase[],
  c: DispatchCase,
  nproc: number,
  layout: Partial<DispatchResult['layout']>,
): void {
  const i = cases.indexOf(c);
  for (const [j, dispatcher] of ['allgather', 'alltoall'].entries()) {
    const ranks = results[2 * i + j];
    expect(ranks.length, `${dispatcher}: a result from each rank`).toBe(nproc);
    for (const r of ranks) {
      expect(r.error, `${dispatcher} rank ${r.rank}`).toBeUndefined();
      expect(r.dispatcher).toBe(dispatcher);
      expect(r.layout).toMatchObject(layout);
    }
    const e = ranks[0].errors;
    if (!e) throw new Error(`${dispatcher}: rank 0 reported no measures`);
    expect(e.logits, `${dispatcher}: logits vs one process`).toBeLessThanOrEqual(TOL);
    expect(e.loss, `${dispatcher}: loss vs one process`).toBeLessThanOrEqual(TOL);
    expect(e.grads.max, `${dispatcher}: gradient of ${e.grads.worst} vs one process`).toBeLessThanOrEqual(
      TOL,
    );
    expect(e.replicaSpread, `${dispatcher}: replicated gradients agree over TP`).toBeLessThanOrEqual(1e-6);
    expect(e.loadEqual, `${dispatcher}: the global expert load equals one process's`).toBe(true);
    expect(e.loadTotal).toBeGreaterThan(0);
    if (c.capacityFactor === undefined || c.dropsNothing) expect(e.dropped, 'nothing dropped').toBe(0);
    else expect(e.dropped, 'the capacity drops tokens').toBeGreaterThan(0);
    if (c.pad) expect(e.padded, 'padding pairs').toBeGreaterThan(0);
    else expect(e.padded).toBe(0);
    if (c.auxLoss) {
      const l = e.routerLosses;
      if (!l) throw new Error(`${dispatcher}: no router losses reported`);
      expect(l.auxValue, 'an aux loss was computed').toBeGreaterThan(0);
      expect(l.zValue, 'a z-loss was computed').toBeGreaterThan(0);
      expect(l.aux, `${dispatcher}: aux loss vs one process`).toBeLessThanOrEqual(TOL);
      expect(l.z, `${dispatcher}: z-loss vs one process`).toBeLessThanOrEqual(TOL);
    } else expect(e.routerLosses).toBeNull();
    if (dispatcher === 'alltoall') {
      const v = e.vsFirst;
      if (!v) throw new Error('alltoall was not compared with allgather');
      expect(v.logits, 'alltoall vs allgather logits').toBeLessThanOrEqual(TOL);
      expect(v.grads, 'alltoall vs allgather gradients').toBeLessThanOrEqual(TOL);
    } else expect(e.vsFirst).toBeNull();
  }
}
