// Expert parallelism on two real processes (test/workers/moe-dispatch-worker.ts): the allgather and
// alltoall token dispatchers, with EP = 2, or TP = 2 with expert-TP 1 (each TP rank dispatches its
// share of the tokens) or 2, dropless and with a capacity factor, give the logits, loss, gradients
// and global expert load of the same model on one process (fed the same router calls), and agree
// with each other. test/heavy/moe-dispatch.test.ts runs EP = 4 and TP = 2 × EP = 2 on four.
import { beforeAll, describe, it } from 'vitest';
import { type DispatchCase, expectCase, runCases } from './helpers/moe-dispatch.js';
import type { DispatchResult } from './workers/moe-dispatch-worker.js';

const EP_CASES: DispatchCase[] = [
  { id: 'mixtral', what: '4 experts, top-2' },
  { id: 'qwen3-moe', what: 'normalised top-2' },
  { id: 'deepseek-v3', what: 'grouped sigmoid experts, shared expert, MTP, MoE recompute', recompute: true },
  { id: 'mixtral', what: 'capacity 0.5, drop by probs', capacityFactor: 0.5 },
  {
    id: 'qwen3-moe',
    what: 'capacity 0.75, drop by position, padded',
    capacityFactor: 0.75,
    dropPolicy: 'position',
    pad: true,
  },
];
const TP_CASES: DispatchCase[] = [
  { id: 'mixtral', what: '7 tokens split 4 / 3 over TP' },
  { id: 'mixtral', what: 'one token: the second TP rank dispatches none', seq: 1 },
  { id: 'deepseek-v3', what: 'shared expert, MTP' },
  { id: 'qwen3-moe', what: 'capacity 0.5, drop by probs', capacityFactor: 0.5 },
];

// Dropless, or padded to a capacity no expert reaches: a capacity that drops, drops within each
// rank's chunk, as in Megatron (not one process's result). Padded maps at expert-TP 2 gather the
// blocks without exchanging their counts (every rank's follow from its token count).
const SP_CASES: DispatchCase[] = [
  { id: 'mixtral', what: '4 experts, top-2, aux and z losses', auxLoss: true },
  {
    id: 'mixtral',
    what: 'padded to a capacity above every count (nothing dropped)',
    capacityFactor: 4,
    pad: true,
    dropsNothing: true,
  },
  { id: 'qwen3-moe', what: 'normalised top-2, MoE recompute', recompute: true },
  { id: 'deepseek-v3', what: 'grouped sigmoid experts, shared expert, MTP, aux and z losses', auxLoss: true },
];

// Megatron's seq_aux_loss, per sample of the micro-batch: two rows a rank, so that the samples
// differ from the micro-batch; under SP each rank holds half of every sample's positions.
const SEQ_AUX_CASES: DispatchCase[] = [
  { id: 'mixtral', what: 'seq_aux_loss and the z-loss', auxLoss: true, seqAux: true },
  {
    id: 'deepseek-v3',
    what: 'seq_aux_loss (the unbiased top-k of grouped, biased routing) and the z-loss',
    auxLoss: true,
    seqAux: true,
  },
];

describe('EP = 2 on two processes (TP = 1: the EP ranks are data-parallel ranks)', () => {
  let results: DispatchResult[][];
  beforeAll(async () => {
    results = await runCases(2, { tp: 1, ep: 2, rowsPerRank: 1, seq: 7 }, EP_CASES);
  });
  it.each(EP_CASES)('$id ($what): alltoall = allgather = one process', (c) => {
    expectCase(results, EP_CASES, c, 2, { tp: 1, ep: 2, etp: 1, dp: 2, expertDp: 1 });
  });
});

describe.each([1, 2])('TP = 2, expert-TP = %i on two processes', (etp) => {
  let results: DispatchResult[][];
  beforeAll(async () => {
    results = await runCases(2, { tp: 2, ep: 1, etp, rowsPerRank: 1, seq: 7 }, TP_CASES);
  });
  it.each(TP_CASES)('$id ($what): alltoall = allgather = one process', (c) => {
    expectCase(results, TP_CASES, c, 2, { tp: 2, ep: 1, etp, dp: 1, expertDp: etp === 1 ? 2 : 1 });
  });
});

describe.each([1, 2])('TP = 2 with sequence parallelism, expert-TP = %i on two processes', (etp) => {
  let results: DispatchResult[][];
  beforeAll(async () => {
    results = await runCases(
      2,
      { tp: 2, ep: 1, etp, sequenceParallel: true, rowsPerRank: 1, seq: 8 },
      SP_CASES,
    );
  });
  it.each(SP_CASES)('$id ($what): alltoall = allgather = one process', (c) => {
    expectCase(results, SP_CASES, c, 2, {
      tp: 2,
      ep: 1,
      etp,
      dp: 1,
      expertDp: etp === 1 ? 2 : 1,
      sequenceParallel: true,
    });
  });
});

describe('TP = 2 with sequence parallelism, two rows a rank: the sequence-wise aux loss', () => {
  let results: DispatchResult[][];
  const layout = { tp: 2, ep: 1, etp: 1, sequenceParallel: true, rowsPerRank: 2, seq: 8 };
  beforeAll(async () => {
    results = await runCases(2, layout, SEQ_AUX_CASES);
  });
  it.each(SEQ_AUX_CASES)('$id ($what): alltoall = allgather = one process', (c) => {
    expectCase(results, SEQ_AUX_CASES, c, 2, {
      tp: 2,
      ep: 1,
      etp: 1,
      dp: 1,
      expertDp: 2,
      sequenceParallel: true,
    });
  });
});
