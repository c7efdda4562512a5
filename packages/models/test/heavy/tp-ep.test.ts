// Heavy (pnpm test:heavy): TP = 2 × EP = 2 on four real processes — experts split over expert-TP = TP
// and placed by EP at once — gives the logits, losses and gradients of one process and of the
// PyTorch fixture, for the MoE families, with and without sequence parallelism.
import { describe, expect, it } from 'vitest';
import { fixtureCheckpoint } from '../helpers/fixtures.js';
import { launchWorkers } from '../helpers/launch.js';
import type { RunResult } from '../workers/parallel-worker.js';

const IDS = ['mixtral', 'qwen3-moe', 'deepseek-v3'];

describe.each([false, true])('TP=2 × EP=2 on four processes, sequence parallel %s', (sp) => {
  it('matches the fixture and one process for mixtral, qwen3-moe and deepseek-v3', async () => {
    const results = (await launchWorkers({
      nproc: 4,
      script: 'parallel-worker.ts',
      config: { tp: 2, ep: 2, runs: IDS.map((id) => ({ id, dir: fixtureCheckpoint(id), sp })) },
    })) as RunResult[];
    for (const id of IDS) {
      const ranks = results.filter((r) => r.id === id).sort((a, b) => a.rank - b.rank);
      expect(ranks.length, id).toBe(4);
      for (const r of ranks) expect(r.error, `${id} rank ${r.rank}`).toBeUndefined();
      const e = ranks[0].errors;
      if (!e) throw new Error(`${id}: rank 0 reported no errors`);
      expect(e.logits, `${id} logits vs fixture`).toBeLessThanOrEqual(1e-5);
      expect(e.loss, `${id} loss vs fixture`).toBeLessThanOrEqual(1e-5);
      expect(e.oneProcess.logits, `${id} logits vs one process`).toBeLessThanOrEqual(1e-5);
      expect(e.oneProcess.grads.max, `${id} ${e.oneProcess.grads.worst} vs one process`).toBeLessThanOrEqual(
        1e-4,
      );
      for (const r of ranks) {
        expect(r.layout).toMatchObject({ tp: 2, ep: 2, etp: 2, sequenceParallel: sp });
        const x = r.shards.experts;
        if (!x) throw new Error('a MoE model reports its experts');
        expect(x.local * 2).toBe(x.total);
        expect(x.fc1.local * 2).toBe(x.fc1.full);
      }
    }
  });
});
