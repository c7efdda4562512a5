// Heavy (pnpm test:heavy): the allgather and alltoall token dispatchers on four real processes —
// EP = 4, and TP = 2 × EP = 2 with expert-TP 1 or 2 — give the logits, loss, gradients and global
// expert load of one process, dropless and with a capacity factor, and agree with each other; TP = 2
// × EP = 2 with sequence parallelism (dropless) gives the aux and z losses of one process too.
import { beforeAll, describe, it } from 'vitest';
import { type DispatchCase, expectCase, runCases } from '../helpers/moe-dispatch.js';
import type { DispatchResult } from '../workers/moe-dispatch-worker.js';

const CASES: DispatchCase[] = [
  { id: 'mixtral', what: '4 experts, top-2' },
  { id: 'qwen3-moe', what: 'normalised top-2' },
  { id: 'deepseek-v3', what: 'grouped sigmoid experts, shared expert, MTP' },
  { id: 'deepseek-v3', what: 'MoE recompute', recompute: true },
  { id: 'mixtral', what: 'capacity 0.5, drop by probs', capacityFactor: 0.5 },
  { id: 'qwen3-moe', what: 'capacity 1, drop by position', capacityFactor: 1, dropPolicy: 'position' },
  { id: 'deepseek-v3', what: 'capacity 0.75, drop by probs, padded', capacityFactor: 0.75, pad: true },
];

const LAYOUTS = [
  { name: 'EP = 4', tp: 1, ep: 4, etp: 1, dp: 4, expertDp: 1 },
  { name: 'TP = 2 × EP = 2, expert-TP = 1', tp: 2, ep: 2, etp: 1, dp: 2, expertDp: 2 },
  { name: 'TP = 2 × EP = 2, expert-TP = 2', tp: 2, ep: 2, etp: 2, dp: 2, expertDp: 1 },
];

describe.each(LAYOUTS)('$name on four processes', ({ name: _, ...layout }) => {
  let results: DispatchResult[][];
  beforeAll(async () => {
    results = await runCases(
      4,
      { tp: layout.tp, ep: layout.ep, etp: layout.etp, rowsPerRank: 1, seq: 7 },
      CASES,
    );
  });
  it.each(CASES)('$id ($what): alltoall = allgather = one process', (c) => {
    expectCase(results, CASES, c, 4, layout);
  });
});

const SP_CASES: DispatchCase[] = [
  { id: 'mixtral', what: '4 experts, top-2, aux and z losses', auxLoss: true },
  { id: 'qwen3-moe', what: 'normalised top-2' },
  { id: 'deepseek-v3', what: 'grouped sigmoid experts, shared expert, MTP, aux and z losses', auxLoss: true },
  { id: 'deepseek-v3', what: 'MoE recompute', recompute: true },
];

describe.each([1, 2])(
  'TP = 2 × EP = 2 with sequence parallelism, expert-TP = %i on four processes',
  (etp) => {
    let results: DispatchResult[][];
    beforeAll(async () => {
      results = await runCases(
        4,
        { tp: 2, ep: 2, etp, sequenceParallel: true, rowsPerRank: 1, seq: 8 },
        SP_CASES,
      );
    });
    it.each(SP_CASES)('$id ($what): alltoall = allgather = one process', (c) => {
      expectCase(results, SP_CASES, c, 4, {
        tp: 2,
        ep: 2,
        etp,
        dp: 2,
        expertDp: etp === 1 ? 2 : 1,
        sequenceParallel: true,
      });
    });
  },
);
