// Megatron-Core's pipeline schedules (megatron/core/pipeline_parallel/schedules.py) as pure
// functions: for one pipeline rank, the ordered forward and backward steps of no pipelining, 1F1B
// and interleaved 1F1B, and the batched exchanges with the neighbouring stages between them, at the
// points where Megatron makes them (its non-overlapped path: each exchange sends, then receives,
// then waits). Nothing here touches tensors or processes; forward-backward.ts runs these plans.
import { DistributedError } from '../errors.js';

/** Which of Megatron's three forward-backward functions a layout uses. */
export type PipelineScheduleKind = 'no-pipelining' | '1f1b' | 'interleaved';

/** Where a compute step falls: warm-up forwards, the one-forward-one-backward steady state, or cool-down backwards. */
export type PipelinePhase = 'warmup' | 'steady' | 'cooldown';

/** A microbatch on one model chunk (a virtual stage of this rank; chunk 0 without interleaving). */
export interface MicrobatchChunk {
  readonly microbatch: number;
  readonly chunk: number;
}

/** One compute step of a pipeline rank. */
export interface PipelineStep extends MicrobatchChunk {
  readonly kind: 'forward' | 'backward';
  readonly phase: PipelinePhase;
}

/** Megatron's names of the batched exchanges (p2p_communication.py), in camelCase. */
export type PipelineExchangeName =
  | 'recvForward'
  | 'recvBackward'
  | 'sendForward'
  | 'sendBackward'
  | 'sendForwardRecvBackward'
  | 'sendBackwardRecvForward'
  | 'sendForwardRecvForward'
  | 'sendBackwardRecvBackward'
  | 'sendForwardBackwardRecvForwardBackward';

/**
 * One batched exchange with the neighbouring ranks (the previous and next rank of the pipeline
 * group, wrapping around). Every field names the tensor by the step it belongs to on this rank:
 * `sendNext` is the output of forward(sendNext), `sendPrev` the input gradient of
 * backward(sendPrev), `recvPrev` the input of forward(recvPrev), `recvNext` the output gradient of
 * backward(recvNext). null: nothing in that direction.
 */
export interface PipelineExchange {
  readonly kind: 'exchange';
  readonly name: PipelineExchangeName;
  readonly sendNext: MicrobatchChunk | null;
  readonly sendPrev: MicrobatchChunk | null;
  readonly recvPrev: MicrobatchChunk | null;
  readonly recvNext: MicrobatchChunk | null;
}

/** A compute step or an exchange, in the order a rank performs them. */
export type PipelineAction = PipelineStep | PipelineExchange;

/** The layout and sizes a schedule is computed for. */
export interface PipelineScheduleOptions {
  /** Number of pipeline stages (the pipeline group's size). */
  pipelineParallelSize: number;
  /** This rank's stage, 0 .. pipelineParallelSize-1. */
  pipelineParallelRank: number;
  /** Microbatches per global batch on this data-parallel rank. */
  numMicrobatches: number;
  /**
   * Model chunks per rank for the interleaved schedule (Megatron's virtual pipeline size); null or
   * undefined without interleaving. As in get_forward_backward_func, any value (1 included)
   * selects the interleaved schedule when pipelineParallelSize > 1.
   */
  virtualPipelineParallelSize?: number | null;
  /**
   * Consecutive microbatches a virtual stage runs before moving to the next chunk (interleaved
   * only); must lie in [pipelineParallelSize, numMicrobatches]. Default pipelineParallelSize
   * (Megatron's depth-first schedule).
   */
  microbatchGroupSizePerVpStage?: number;
  /** Forward passes only (evaluation): no backward steps and no gradient exchanges. */
  forwardOnly?: boolean;
}

/** Megatron's get_pp_rank_microbatches: how many steps of this rank are warm-up and how many remain. */
export interface PpRankMicrobatches {
  /** numMicrobatches × model chunks. */
  totalNumMicrobatches: number;
  /** Whether the warm-up covers every forward (no steady state). */
  areAllMicrobatchesInWarmup: boolean;
  numWarmupMicrobatches: number;
  /** Forwards of the steady state (each paired with a backward). */
  numMicrobatchesRemaining: number;
}

/** One rank's complete plan for one global batch. */
export interface PipelineSchedule extends PpRankMicrobatches {
  readonly kind: PipelineScheduleKind;
  readonly pipelineParallelSize: number;
  readonly pipelineParallelRank: number;
  readonly numMicrobatches: number;
  readonly numModelChunks: number;
  /** The group size in effect (pipelineParallelSize unless given; 1 without interleaving). */
  readonly microbatchGroupSizePerVpStage: number;
  readonly forwardOnly: boolean;
  /** The compute steps alone, in order. */
  readonly steps: readonly PipelineStep[];
  /** Compute steps and exchanges, in order: what forwardBackward runs. */
  readonly actions: readonly PipelineAction[];
}

function invalid(op: string, message: string): DistributedError {
  return new DistributedError('INVALID_ARGUMENT', `${op}: ${message}`);
}

function checkInt(op: string, name: string, v: number, min: number): void {
  if (!Number.isInteger(v) || v < min) throw invalid(op, `${name} must be an integer ≥ ${min}, got ${v}`);
}

/** Megatron's get_forward_backward_func choice: no pipelining for one stage, interleaved when a virtual size is set, else 1F1B. */
export function scheduleKind(
  pipelineParallelSize: number,
  virtualPipelineParallelSize?: number | null,
): PipelineScheduleKind {
  if (pipelineParallelSize > 1) {
    return virtualPipelineParallelSize === undefined || virtualPipelineParallelSize === null
      ? '1f1b'
      : 'interleaved';
  }
  return 'no-pipelining';
}

/**
 * Megatron's get_pp_rank_microbatches. Warm-up forwards: all of them with forwardOnly; else
 * pp − rank − 1 for 1F1B; (pp − rank − 1)·2 + (chunks − 1)·groupSize for interleaving; 0 without
 * pipelining. Capped at the total, which sets areAllMicrobatchesInWarmup.
 */
export function getPpRankMicrobatches(options: {
  numMicrobatches: number;
  numModelChunks: number;
  microbatchGroupSizePerVpStage: number;
  pipelineParallelSize: number;
  pipelineParallelRank: number;
  /** null: 1F1B (without interleaving). */
  virtualPipelineParallelSize: number | null;
  forwardOnly?: boolean;
}): PpRankMicrobatches {
  const { numMicrobatches, numModelChunks, microbatchGroupSizePerVpStage: groupSize } = options;
  const { pipelineParallelSize: pp, pipelineParallelRank: rank, virtualPipelineParallelSize: vpp } = options;
  const totalNumMicrobatches = numMicrobatches * numModelChunks;
  let numWarmupMicrobatches: number;
  if (options.forwardOnly) numWarmupMicrobatches = totalNumMicrobatches;
  else if (pp > 1) {
    numWarmupMicrobatches =
      vpp === null ? pp - rank - 1 : (pp - rank - 1) * 2 + (numModelChunks - 1) * groupSize;
  } else numWarmupMicrobatches = 0;
  let areAllMicrobatchesInWarmup = false;
  if (numWarmupMicrobatches >= totalNumMicrobatches) {
    numWarmupMicrobatches = totalNumMicrobatches;
    areAllMicrobatchesInWarmup = true;
  }
  return {
    totalNumMicrobatches,
    areAllMicrobatchesInWarmup,
    numWarmupMicrobatches,
    numMicrobatchesRemaining: totalNumMicrobatches - numWarmupMicrobatches,
  };
}

/**
 * Megatron's get_schedule_table: the forward order of (microbatch, chunk) on every rank of the
 * interleaved schedule. Microbatches go in groups of `microbatchGroupSizePerVpStage`; each group
 * runs through chunk 0, then chunk 1, …; the last group takes whatever microbatches are left.
 * E.g. 5 microbatches, 2 chunks, group size 3: (0,0) (1,0) (2,0) (0,1) (1,1) (2,1) (3,0) (4,0) (3,1) (4,1).
 */
export function getScheduleTable(
  numMicrobatches: number,
  numModelChunks: number,
  microbatchGroupSizePerVpStage: number,
): MicrobatchChunk[] {
  const table: MicrobatchChunk[] = [];
  for (let first = 0; first < numMicrobatches; first += microbatchGroupSizePerVpStage) {
    const end = Math.min(first + microbatchGroupSizePerVpStage, numMicrobatches);
    for (let chunk = 0; chunk < numModelChunks; chunk++) {
      for (let microbatch = first; microbatch < end; microbatch++) table.push({ microbatch, chunk });
    }
  }
  return table;
}

/**
 * Megatron's convert_schedule_table_to_order (transformer/cuda_graphs.py): the chunk order of one
 * rank as numbers, chunk + 1 for a forward and −(chunk + 1) for a backward (a backward runs the
 * table's chunk mirrored, so Megatron writes it as table chunk − chunks): the warm-up forwards,
 * then forward and backward in turn, then the cool-down backwards.
 */
export function convertScheduleTableToOrder(
  numWarmupMicrobatches: number,
  numModelChunks: number,
  scheduleTable: readonly MicrobatchChunk[],
): number[] {
  const forward = scheduleTable.map((e) => e.chunk + 1);
  const backward = scheduleTable.map((e) => e.chunk - numModelChunks);
  const order = forward.slice(0, numWarmupMicrobatches);
  for (let i = numWarmupMicrobatches; i < forward.length; i++) {
    order.push(forward[i], backward[i - numWarmupMicrobatches]);
  }
  if (numWarmupMicrobatches > 0) order.push(...backward.slice(backward.length - numWarmupMicrobatches));
  return order;
}

/**
 * The interleaved schedule's checks, as Megatron makes them: the group size must lie in
 * [pp, numMicrobatches], and a last, partial group must hold 0 or at least pp microbatches.
 * (Megatron no longer asks numMicrobatches to be a multiple of pp; with the default group size
 * pp these two checks amount to that.)
 */
function checkInterleaved(op: string, pp: number, numMicrobatches: number, groupSize: number): void {
  if (groupSize > numMicrobatches || groupSize < pp) {
    throw invalid(
      op,
      `microbatchGroupSizePerVpStage ${groupSize} must lie in [pipelineParallelSize ${pp}, numMicrobatches ${numMicrobatches}]; ` +
        (numMicrobatches < pp
          ? `use at least ${pp} microbatches`
          : `pick a group size between ${pp} and ${numMicrobatches}`),
    );
  }
  const last = numMicrobatches % groupSize;
  if (last > 0 && last < pp) {
    throw invalid(
      op,
      `numMicrobatches ${numMicrobatches} leaves a last group of ${last} microbatches (group size ${groupSize}), fewer than ` +
        `pipelineParallelSize ${pp}, which stalls the pipeline; make numMicrobatches a multiple of ${groupSize} or leave a remainder of at least ${pp}`,
    );
  }
}

const key = (microbatch: number, chunk: number): MicrobatchChunk => ({ microbatch, chunk });

function exchange(
  name: PipelineExchangeName,
  parts: Partial<Pick<PipelineExchange, 'sendNext' | 'sendPrev' | 'recvPrev' | 'recvNext'>>,
): PipelineExchange | null {
  const e: PipelineExchange = {
    kind: 'exchange',
    name,
    sendNext: parts.sendNext ?? null,
    sendPrev: parts.sendPrev ?? null,
    recvPrev: parts.recvPrev ?? null,
    recvNext: parts.recvNext ?? null,
  };
  return e.sendNext || e.sendPrev || e.recvPrev || e.recvNext ? e : null;
}

/** Collects actions, dropping exchanges with nothing to move (Megatron skips those calls on the first or last stage). */
class Plan {
  readonly actions: PipelineAction[] = [];
  forward(microbatch: number, chunk: number, phase: PipelinePhase): void {
    this.actions.push({ kind: 'forward', microbatch, chunk, phase });
  }
  backward(microbatch: number, chunk: number, phase: PipelinePhase): void {
    this.actions.push({ kind: 'backward', microbatch, chunk, phase });
  }
  exchange(e: PipelineExchange | null): void {
    if (e) this.actions.push(e);
  }
}

function planNoPipelining(m: number, forwardOnly: boolean): Plan {
  const plan = new Plan();
  for (let i = 0; i < m; i++) {
    plan.forward(i, 0, 'steady');
    if (!forwardOnly) plan.backward(i, 0, 'steady');
  }
  return plan;
}

// forward_backward_pipelining_without_interleaving: pp − rank − 1 warm-up forwards (whatever
// forwardOnly says), then one forward and one backward per step, then the cool-down backwards.
function planOneFOneB(pp: number, rank: number, m: number, forwardOnly: boolean, warmup: number): Plan {
  const plan = new Plan();
  const first = rank === 0;
  const last = rank === pp - 1;
  const remaining = m - warmup;
  const recvForward = (mb: number) => (first ? null : exchange('recvForward', { recvPrev: key(mb, 0) }));
  const sendForward = (mb: number) => (last ? null : exchange('sendForward', { sendNext: key(mb, 0) }));
  for (let i = 0; i < warmup; i++) {
    plan.exchange(recvForward(i));
    plan.forward(i, 0, 'warmup');
    plan.exchange(sendForward(i));
  }
  if (remaining > 0) plan.exchange(recvForward(warmup));
  for (let i = 0; i < remaining; i++) {
    const f = warmup + i;
    const lastIteration = i === remaining - 1;
    plan.forward(f, 0, 'steady');
    if (forwardOnly) {
      plan.exchange(sendForward(f));
      if (!lastIteration) plan.exchange(recvForward(f + 1));
      continue;
    }
    if (!last)
      plan.exchange(exchange('sendForwardRecvBackward', { sendNext: key(f, 0), recvNext: key(i, 0) }));
    plan.backward(i, 0, 'steady');
    if (first) continue;
    plan.exchange(
      lastIteration
        ? exchange('sendBackward', { sendPrev: key(i, 0) })
        : exchange('sendBackwardRecvForward', { sendPrev: key(i, 0), recvPrev: key(f + 1, 0) }),
    );
  }
  if (forwardOnly) return plan;
  for (let i = 0; i < warmup; i++) {
    const b = remaining + i;
    if (!last) plan.exchange(exchange('recvBackward', { recvNext: key(b, 0) }));
    plan.backward(b, 0, 'cooldown');
    if (!first) plan.exchange(exchange('sendBackward', { sendPrev: key(b, 0) }));
  }
  return plan;
}

// forward_backward_pipelining_with_interleaving without overlap_p2p_comm. Virtual step k runs the
// forward of table[k]; backward step k runs table[k]'s microbatch on the mirrored chunk
// (chunks − 1 − chunk). Each exchange sends this step's tensors and receives the next step's.
function planInterleaved(
  pp: number,
  rank: number,
  m: number,
  chunks: number,
  groupSize: number,
  forwardOnly: boolean,
  counts: PpRankMicrobatches,
): Plan {
  const plan = new Plan();
  const table = getScheduleTable(m, chunks, groupSize);
  const total = counts.totalNumMicrobatches;
  const warmup = counts.numWarmupMicrobatches;
  const remaining = counts.numMicrobatchesRemaining;
  const firstPp = rank === 0;
  const lastPp = rank === pp - 1;
  // the first virtual stage (chunk 0 of rank 0) reads data; the last (last chunk of the last rank) computes the loss
  const vFirst = (chunk: number) => firstPp && chunk === 0;
  const vLast = (chunk: number) => lastPp && chunk === chunks - 1;
  const chunkOf = (k: number, forward: boolean) => {
    const c = table[k % total].chunk;
    return forward ? c : chunks - 1 - c;
  };
  const fwd = (k: number) => key(table[k].microbatch, chunkOf(k, true));
  const bwd = (k: number) => key(table[k].microbatch, chunkOf(k, false));
  // Receives into a chunk arrive in microbatch order, so the j-th one for a chunk is microbatch j.
  const receivedPrev = new Array<number>(chunks).fill(0);
  const receivedNext = new Array<number>(chunks).fill(0);
  const nextPrev = (chunk: number) => key(receivedPrev[chunk]++, chunk);
  const nextNext = (chunk: number) => key(receivedNext[chunk]++, chunk);

  // Megatron's recv_tensor_from_previous_stage: whether the exchange after virtual step k receives,
  // and into which chunk. The leading stage (rank 0 forward, the last rank backward) runs pp − 1
  // steps ahead of the ending stage, whose step k − (pp − 1) produced what arrives now.
  const recvFromPreviousStage = (k: number, forward: boolean): { recv: boolean; chunk: number } => {
    const leading = forward ? firstPp : lastPp;
    if (!leading) return { recv: true, chunk: chunkOf(k + 1, forward) };
    const lastChunk = forward ? chunks - 1 : 0;
    let recv = true;
    let chunk: number;
    if (k < pp - 1) {
      recv = false;
      chunk = chunkOf(k + 1, forward);
    } else chunk = chunkOf(k - (pp - 1), forward);
    if (chunk === lastChunk) recv = false;
    return { recv, chunk: forward ? chunk + 1 : chunk - 1 };
  };

  if (!vFirst(0)) plan.exchange(exchange('recvForward', { recvPrev: nextPrev(0) }));
  for (let k = 0; k < warmup; k++) {
    const f = fwd(k);
    const prev = recvFromPreviousStage(k, true);
    const recvPrev = prev.recv && k !== total - 1;
    plan.forward(f.microbatch, f.chunk, 'warmup');
    const sendNext = vLast(f.chunk) ? null : f;
    if (k === warmup - 1 && !forwardOnly && !counts.areAllMicrobatchesInWarmup) {
      plan.exchange(
        exchange('sendForwardBackwardRecvForwardBackward', {
          sendNext,
          recvPrev: recvPrev ? nextPrev(prev.chunk) : null,
          recvNext: lastPp ? null : nextNext(chunks - 1),
        }),
      );
    } else {
      plan.exchange(
        exchange('sendForwardRecvForward', { sendNext, recvPrev: recvPrev ? nextPrev(prev.chunk) : null }),
      );
    }
  }
  for (let k = 0; k < remaining; k++) {
    const f = fwd(k + warmup);
    const b = bwd(k);
    plan.forward(f.microbatch, f.chunk, 'steady');
    plan.backward(b.microbatch, b.chunk, 'steady');
    const prev = recvFromPreviousStage(k + warmup, true);
    const next = recvFromPreviousStage(k, false);
    const recvPrev = prev.recv && k !== remaining - 1;
    plan.exchange(
      exchange('sendForwardBackwardRecvForwardBackward', {
        sendNext: vLast(f.chunk) ? null : f,
        sendPrev: vFirst(b.chunk) ? null : b,
        recvPrev: recvPrev ? nextPrev(prev.chunk) : null,
        recvNext: next.recv ? nextNext(next.chunk) : null,
      }),
    );
  }
  if (forwardOnly) return plan;
  if (counts.areAllMicrobatchesInWarmup && !lastPp) {
    plan.exchange(exchange('recvBackward', { recvNext: nextNext(chunks - 1) }));
  }
  for (let k = remaining; k < total; k++) {
    const b = bwd(k);
    const next = recvFromPreviousStage(k, false);
    const recvNext = next.recv && k !== total - 1;
    plan.backward(b.microbatch, b.chunk, 'cooldown');
    plan.exchange(
      exchange('sendBackwardRecvBackward', {
        sendPrev: vFirst(b.chunk) ? null : b,
        recvNext: recvNext ? nextNext(next.chunk) : null,
      }),
    );
  }
  return plan;
}

/**
 * The plan of one pipeline rank for one global batch, as Megatron's schedules run it: the kind
 * (get_forward_backward_func), the warm-up and remaining counts (get_pp_rank_microbatches), the
 * compute steps and the exchanges with the neighbouring stages. Throws a DistributedError for
 * the layouts Megatron rejects.
 */
export function pipelineSchedule(options: PipelineScheduleOptions): PipelineSchedule {
  const op = 'pipelineSchedule';
  const { pipelineParallelSize: pp, pipelineParallelRank: rank, numMicrobatches: m } = options;
  checkInt(op, 'pipelineParallelSize', pp, 1);
  if (!Number.isInteger(rank) || rank < 0 || rank >= pp) {
    throw invalid(op, `pipelineParallelRank ${rank} is not a stage of a ${pp}-stage pipeline (0..${pp - 1})`);
  }
  checkInt(op, 'numMicrobatches', m, 1);
  const vpp = options.virtualPipelineParallelSize ?? null;
  if (vpp !== null) checkInt(op, 'virtualPipelineParallelSize', vpp, 1);
  const forwardOnly = options.forwardOnly ?? false;
  const kind = scheduleKind(pp, vpp);
  const chunks = vpp ?? 1;
  if (kind === 'no-pipelining' && chunks > 1) {
    throw invalid(
      op,
      `the schedule without pipelining does not support model chunking (virtualPipelineParallelSize ${vpp} with one stage); drop virtualPipelineParallelSize or use pipelineParallelSize > 1`,
    );
  }
  let groupSize = 1;
  if (kind === 'interleaved') {
    groupSize = options.microbatchGroupSizePerVpStage ?? pp;
    checkInt(op, 'microbatchGroupSizePerVpStage', groupSize, 1);
    checkInterleaved(op, pp, m, groupSize);
  } else if (
    options.microbatchGroupSizePerVpStage !== undefined &&
    options.microbatchGroupSizePerVpStage !== 1
  ) {
    throw invalid(
      op,
      `microbatchGroupSizePerVpStage applies to the interleaved schedule only (this is ${kind}); set virtualPipelineParallelSize or drop it`,
    );
  }

  let counts: PpRankMicrobatches;
  let plan: Plan;
  if (kind === 'interleaved') {
    counts = getPpRankMicrobatches({
      numMicrobatches: m,
      numModelChunks: chunks,
      microbatchGroupSizePerVpStage: groupSize,
      pipelineParallelSize: pp,
      pipelineParallelRank: rank,
      virtualPipelineParallelSize: vpp,
      forwardOnly,
    });
    plan = planInterleaved(pp, rank, m, chunks, groupSize, forwardOnly, counts);
  } else if (kind === '1f1b') {
    // forward_backward_pipelining_without_interleaving computes its own warm-up: pp − rank − 1
    // even with forwardOnly (the forwards then pair with nothing).
    const warmup = Math.min(pp - rank - 1, m);
    counts = {
      totalNumMicrobatches: m,
      areAllMicrobatchesInWarmup: warmup === m,
      numWarmupMicrobatches: warmup,
      numMicrobatchesRemaining: m - warmup,
    };
    plan = planOneFOneB(pp, rank, m, forwardOnly, warmup);
  } else {
    counts = {
      totalNumMicrobatches: m,
      areAllMicrobatchesInWarmup: false,
      numWarmupMicrobatches: 0,
      numMicrobatchesRemaining: m,
    };
    plan = planNoPipelining(m, forwardOnly);
  }
  const steps = plan.actions.filter((a): a is PipelineStep => a.kind !== 'exchange');
  return {
    kind,
    pipelineParallelSize: pp,
    pipelineParallelRank: rank,
    numMicrobatches: m,
    numModelChunks: chunks,
    microbatchGroupSizePerVpStage: groupSize,
    forwardOnly,
    ...counts,
    steps,
    actions: plan.actions,
  };
}
