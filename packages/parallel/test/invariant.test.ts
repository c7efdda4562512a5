// The parallelism invariant, with real processes started by the launcher behind `megapatch launch`:
// a small GPT built from the tensor-parallel layers, trained for a few AdamW steps with TP, DP, SP
// and the distributed optimizer, gives the losses and the gathered weights of one process.
import { existsSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import { ADDON, expectSameTraining, type Run, train } from './helpers/invariant.js';

const STEPS = 4;

describe.skipIf(!existsSync(ADDON))('any layout trains like one process (fp32, 4 AdamW steps)', () => {
  let reference: Run;
  beforeAll(async () => {
    reference = await train(1, { tp: 1, steps: STEPS });
    expect(reference.losses).toHaveLength(STEPS);
    // the model learns something, so equal losses are not a coincidence of a frozen model
    expect(new Set(reference.losses).size).toBe(STEPS);
  }, 120_000);

  const layouts: [string, number, Record<string, unknown>, number?][] = [
    ['TP2', 2, { tp: 2 }],
    ['TP2 + SP', 2, { tp: 2, sp: true }],
    ['DP2', 2, { tp: 1 }],
    ['DP2 + distributed optimizer', 2, { tp: 1, distOpt: true }],
    ['TP2 x DP2', 4, { tp: 2 }],
    ['TP2 x DP2 + SP + distributed optimizer', 4, { tp: 2, sp: true, distOpt: true }],
    ['TP2 x DP2 on two "nodes" (--nnodes 2 on loopback)', 4, { tp: 2, distOpt: true }, 2],
  ];
  for (const [name, nproc, cfg, nnodes] of layouts) {
    it(`${name} (${nproc} processes)`, async () => {
      const run = await train(nproc, { ...cfg, steps: STEPS }, nnodes);
      const tp = cfg.tp as number;
      expect(run.layout).toEqual({
        tp,
        dp: nproc / tp,
        localQkvRows: reference.layout.localQkvRows / tp,
        sequenceParallel: cfg.sp === true,
      });
      expectSameTraining(run, reference, STEPS);
      if (nproc / tp > 1) expect(run.stats.bucketsLaunchedDuringBackward).toBeGreaterThan(0);
      // native memory is flat from step to step (the optimizer's state exists from the first step)
      expect(new Set(run.liveBytes.slice(1)).size, `live bytes per step: ${run.liveBytes}`).toBe(1);
    }, 120_000);
  }
});
