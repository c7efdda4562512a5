// Megatron's pipeline schedules as pure plans: the per-rank order of forward and backward steps of
// 1F1B and interleaved 1F1B equals Megatron's (orders written out by hand from its algorithm, and
// the examples in its own docstrings), warm-up counts follow its formulas, its validity checks are
// kept, and every rank's exchanges match its neighbours' and complete without deadlock, whether
// sends are posted (our Gloo runtime) or rendezvous as in Megatron's batch_isend_irecv.
import { describe, expect, it } from 'vitest';
import { DistributedError } from '../src/errors.js';
import {
  convertScheduleTableToOrder,
  getPpRankMicrobatches,
  getScheduleTable,
  type MicrobatchChunk,
  type PipelineSchedule,
  type PipelineStep,
  pipelineSchedule,
  scheduleKind,
} from '../src/pipeline/schedules.js';

/** Steps written compactly: 'F3' / 'B3' (1F1B), 'F3.1' / 'B3.1' (interleaved: microbatch.chunk). */
function fmt(steps: readonly PipelineStep[], withChunk: boolean): string {
  return steps
    .map((s) => `${s.kind === 'forward' ? 'F' : 'B'}${s.microbatch}${withChunk ? `.${s.chunk}` : ''}`)
    .join(' ');
}

function schedule(
  pp: number,
  rank: number,
  m: number,
  vpp: number | null = null,
  g?: number,
  forwardOnly = false,
) {
  return pipelineSchedule({
    pipelineParallelSize: pp,
    pipelineParallelRank: rank,
    numMicrobatches: m,
    virtualPipelineParallelSize: vpp,
    microbatchGroupSizePerVpStage: g,
    forwardOnly,
  });
}

describe('schedule kind (get_forward_backward_func)', () => {
  it('picks no pipelining, 1F1B or interleaving as Megatron does', () => {
    expect(scheduleKind(1)).toBe('no-pipelining');
    expect(scheduleKind(1, 2)).toBe('no-pipelining');
    expect(scheduleKind(2)).toBe('1f1b');
    expect(scheduleKind(2, null)).toBe('1f1b');
    expect(scheduleKind(4, 2)).toBe('interleaved');
    // any virtual size, 1 included, selects interleaving
    expect(scheduleKind(2, 1)).toBe('interleaved');
  });
});

describe('no pipelining', () => {
  it('runs forward and backward of each microbatch in turn', () => {
    expect(fmt(schedule(1, 0, 3).steps, false)).toBe('F0 B0 F1 B1 F2 B2');
    expect(fmt(schedule(1, 0, 3, null, undefined, true).steps, false)).toBe('F0 F1 F2');
    expect(schedule(1, 0, 3).actions.every((a) => a.kind !== 'exchange')).toBe(true);
  });
});

describe('1F1B (forward_backward_pipelining_without_interleaving)', () => {
  // pp − rank − 1 warm-up forwards, then forward/backward pairs, then the cool-down backwards
  const expected: Record<string, string[]> = {
    'pp4 m6': [
      'F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5',
      'F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5',
      'F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5',
      'F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5',
    ],
    // fewer microbatches than stages: the warm-up is capped
    'pp4 m2': ['F0 F1 B0 B1', 'F0 F1 B0 B1', 'F0 F1 B0 B1', 'F0 B0 F1 B1'],
    'pp2 m4': ['F0 F1 B0 F2 B1 F3 B2 B3', 'F0 B0 F1 B1 F2 B2 F3 B3'],
    'pp3 m1': ['F0 B0', 'F0 B0', 'F0 B0'],
  };
  for (const [name, orders] of Object.entries(expected)) {
    it(`${name}: every rank's order is Megatron's`, () => {
      const [pp, m] = name.match(/\d+/g)!.map(Number);
      orders.forEach((order, rank) => {
        const s = schedule(pp, rank, m);
        expect(s.kind).toBe('1f1b');
        expect(fmt(s.steps, false)).toBe(order);
        expect(s.numWarmupMicrobatches).toBe(Math.min(pp - rank - 1, m));
      });
    });
  }

  it('the 1F1B order is convert_schedule_table_to_order with one chunk and pp − rank − 1 warm-up steps', () => {
    for (const [pp, m] of [
      [2, 5],
      [4, 8],
      [3, 2],
    ]) {
      for (let rank = 0; rank < pp; rank++) {
        const s = schedule(pp, rank, m);
        const order = convertScheduleTableToOrder(s.numWarmupMicrobatches, 1, getScheduleTable(m, 1, pp));
        expect(s.steps.map((x) => (x.kind === 'forward' ? 1 : -1))).toEqual(order);
      }
    }
  });

  it('the exchanges are Megatron’s calls at Megatron’s points (pp 3, rank 1, 3 microbatches)', () => {
    const s = schedule(3, 1, 3);
    const names = s.actions.map((a) =>
      a.kind === 'exchange' ? a.name : `${a.kind === 'forward' ? 'F' : 'B'}${a.microbatch}`,
    );
    expect(names).toEqual([
      'recvForward',
      'F0',
      'sendForward',
      'recvForward',
      'F1',
      'sendForwardRecvBackward',
      'B0',
      'sendBackwardRecvForward',
      'F2',
      'sendForwardRecvBackward',
      'B1',
      'sendBackward',
      'recvBackward',
      'B2',
      'sendBackward',
    ]);
  });

  it('forwardOnly keeps the forward order and drops every backward', () => {
    const s = schedule(4, 1, 5, null, undefined, true);
    expect(fmt(s.steps, false)).toBe('F0 F1 F2 F3 F4');
    expect(s.actions.every((a) => a.kind !== 'exchange' || (!a.recvNext && !a.sendPrev))).toBe(true);
  });
});

describe('interleaved 1F1B (forward_backward_pipelining_with_interleaving)', () => {
  it('get_schedule_table reproduces the tables of Megatron’s docstrings', () => {
    // schedules.py: PP2 N3M5 VP2 (group size 3, 5 microbatches, 2 chunks)
    const t = getScheduleTable(5, 2, 3);
    expect(t.map((e) => e.microbatch)).toEqual([0, 1, 2, 0, 1, 2, 3, 4, 3, 4]);
    expect(t.map((e) => e.chunk)).toEqual([0, 0, 0, 1, 1, 1, 0, 0, 1, 1]);
    // model_parallel_config.py: PP=2 VP=2, group size 2, 4 microbatches: 0 1 0 1 2 3 2 3
    expect(getScheduleTable(4, 2, 2).map((e) => e.microbatch)).toEqual([0, 1, 0, 1, 2, 3, 2, 3]);
  });

  it('convert_schedule_table_to_order gives the docstring’s order for PP2 N3M5 VP2 with 5 warm-up steps', () => {
    const order = convertScheduleTableToOrder(5, 2, getScheduleTable(5, 2, 3));
    expect(order.join(' ')).toBe('1 1 1 2 2 2 -2 1 -2 1 -2 2 -1 2 -1 -1 -2 -2 -1 -1');
  });

  // Worked by hand from Megatron's loops: warm-up forwards of table[0..w), then forward table[w+k]
  // with backward of table[k] on the mirrored chunk, then the remaining backwards.
  const expected: Record<string, { warmup: number[]; orders: string[] }> = {
    'pp2 vpp2 m5 g3': {
      warmup: [5, 3],
      orders: [
        'F0.0 F1.0 F2.0 F0.1 F1.1 F2.1 B0.1 F3.0 B1.1 F4.0 B2.1 F3.1 B0.0 F4.1 B1.0 B2.0 B3.1 B4.1 B3.0 B4.0',
        'F0.0 F1.0 F2.0 F0.1 B0.1 F1.1 B1.1 F2.1 B2.1 F3.0 B0.0 F4.0 B1.0 F3.1 B2.0 F4.1 B3.1 B4.1 B3.0 B4.0',
      ],
    },
    'pp2 vpp2 m4 g2': {
      warmup: [4, 2],
      orders: [
        'F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0',
        'F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0',
      ],
    },
    // more warm-up than microbatches on rank 0: everything is warm-up, then all the backwards
    'pp2 vpp3 m2 g2': {
      warmup: [6, 4],
      orders: [
        'F0.0 F1.0 F0.1 F1.1 F0.2 F1.2 B0.2 B1.2 B0.1 B1.1 B0.0 B1.0',
        'F0.0 F1.0 F0.1 F1.1 F0.2 B0.2 F1.2 B1.2 B0.1 B1.1 B0.0 B1.0',
      ],
    },
  };
  for (const [name, { warmup, orders }] of Object.entries(expected)) {
    it(`${name}: every rank's order is Megatron's`, () => {
      const [pp, vpp, m, g] = name.match(/\d+/g)!.map(Number);
      orders.forEach((order, rank) => {
        const s = schedule(pp, rank, m, vpp, g);
        expect(s.kind).toBe('interleaved');
        expect(s.numWarmupMicrobatches).toBe(warmup[rank]);
        expect(fmt(s.steps, true)).toBe(order);
      });
    });
  }

  it('warm-up = (pp − rank − 1)·2 + (chunks − 1)·groupSize, capped at the total (get_pp_rank_microbatches)', () => {
    for (const [pp, vpp, m, g] of [
      [4, 2, 8, 4],
      [4, 3, 12, 4],
      [2, 2, 6, 3],
      [3, 2, 7, 4],
      [4, 2, 4, 4],
    ]) {
      for (let rank = 0; rank < pp; rank++) {
        const s = schedule(pp, rank, m, vpp, g);
        const w = Math.min((pp - rank - 1) * 2 + (vpp - 1) * g, m * vpp);
        expect(s.numWarmupMicrobatches).toBe(w);
        expect(s.areAllMicrobatchesInWarmup).toBe(w === m * vpp);
        expect(s.steps.slice(0, w).every((x) => x.kind === 'forward')).toBe(true);
        const order = convertScheduleTableToOrder(w, vpp, getScheduleTable(m, vpp, g));
        // a forward of chunk c is c + 1, a backward −(c + 1)
        expect(s.steps.map((x) => (x.kind === 'forward' ? x.chunk + 1 : -(x.chunk + 1)))).toEqual(order);
        expect(
          getPpRankMicrobatches({
            numMicrobatches: m,
            numModelChunks: vpp,
            microbatchGroupSizePerVpStage: g,
            pipelineParallelSize: pp,
            pipelineParallelRank: rank,
            virtualPipelineParallelSize: vpp,
          }).numWarmupMicrobatches,
        ).toBe(w);
      }
    }
  });

  it('the default group size is the pipeline size (depth-first)', () => {
    expect(schedule(4, 0, 8, 2).microbatchGroupSizePerVpStage).toBe(4);
    expect(schedule(4, 0, 8, 2).numWarmupMicrobatches).toBe(3 * 2 + 4);
  });

  it('forwardOnly runs every forward as warm-up, in table order', () => {
    const s = schedule(2, 0, 4, 2, undefined, true);
    expect(fmt(s.steps, true)).toBe('F0.0 F1.0 F0.1 F1.1 F2.0 F3.0 F2.1 F3.1');
    expect(s.numWarmupMicrobatches).toBe(8);
  });
});

describe('invariants over many layouts', () => {
  const valid = (pp: number, m: number, g: number) => g >= pp && g <= m && (m % g === 0 || m % g >= pp);
  const layouts: [number, number | null, number, number | undefined][] = [];
  for (let pp = 1; pp <= 5; pp++) {
    for (let m = 1; m <= 9; m++) {
      layouts.push([pp, null, m, undefined]);
      if (pp === 1) continue;
      for (const vpp of [1, 2, 3]) {
        for (let g = pp; g <= m; g++) if (valid(pp, m, g)) layouts.push([pp, vpp, m, g]);
      }
    }
  }

  it('each (microbatch, chunk) runs forward once and backward once after it; chunks run microbatches in order', () => {
    for (const [pp, vpp, m, g] of layouts) {
      for (let rank = 0; rank < pp; rank++) {
        for (const forwardOnly of [false, true]) {
          const s = schedule(pp, rank, m, vpp, g, forwardOnly);
          const chunks = vpp ?? 1;
          const where = new Map<string, number>();
          s.steps.forEach((x, i) => {
            const k = `${x.kind}${x.microbatch}.${x.chunk}`;
            expect(where.has(k), `${k} twice`).toBe(false);
            where.set(k, i);
          });
          expect(where.size).toBe(m * chunks * (forwardOnly ? 1 : 2));
          for (let c = 0; c < chunks; c++) {
            for (let mb = 0; mb < m; mb++) {
              const f = where.get(`forward${mb}.${c}`)!;
              expect(f).toBeDefined();
              if (mb > 0) expect(f).toBeGreaterThan(where.get(`forward${mb - 1}.${c}`)!);
              if (forwardOnly) continue;
              const b = where.get(`backward${mb}.${c}`)!;
              expect(b).toBeGreaterThan(f);
              if (mb > 0) expect(b).toBeGreaterThan(where.get(`backward${mb - 1}.${c}`)!);
            }
          }
          // steady state: forward and backward alternate
          const steady = s.steps.filter((x) => x.phase === 'steady');
          if (s.kind !== 'no-pipelining' && !forwardOnly) {
            expect(steady.map((x) => x.kind)).toEqual(
              steady.map((_, i) => (i % 2 === 0 ? 'forward' : 'backward')),
            );
            expect(s.steps.filter((x) => x.phase === 'warmup').length).toBe(s.numWarmupMicrobatches);
          }
        }
      }
    }
  });

  // Runs every rank's plan together. Sends go into FIFO channels per (source, destination,
  // direction); an exchange completes once its receives matched a send (posted sends, as the Gloo
  // runtime) or once its sends were received too (rendezvous, as Megatron's batched isend/irecv).
  // Each receive must get the tensor of the step it is meant for, and compute steps must find
  // their inputs.
  function simulate(plans: readonly PipelineSchedule[], rendezvous: boolean): void {
    const pp = plans.length;
    const chunks = plans[0].numModelChunks;
    type Msg = { key: MicrobatchChunk; matched: boolean };
    const channels = new Map<string, { sends: Msg[]; recvs: { want: MicrobatchChunk; msg: Msg | null }[] }>();
    const chan = (src: number, dst: number, dir: string) => {
      const id = `${src}>${dst}:${dir}`;
      if (!channels.has(id)) channels.set(id, { sends: [], recvs: [] });
      return channels.get(id)!;
    };
    const match = () => {
      for (const c of channels.values()) {
        const pendingSends = c.sends.filter((s) => !s.matched);
        const pendingRecvs = c.recvs.filter((r) => !r.msg);
        for (let i = 0; i < Math.min(pendingSends.length, pendingRecvs.length); i++) {
          pendingSends[i].matched = true;
          pendingRecvs[i].msg = pendingSends[i];
        }
      }
    };
    const pc = new Array(pp).fill(0);
    const posted: ({ sends: Msg[]; recvs: { want: MicrobatchChunk; msg: Msg | null }[] } | null)[] =
      new Array(pp).fill(null);
    const have = plans.map(() => new Set<string>());
    const k = (x: MicrobatchChunk) => `${x.microbatch}.${x.chunk}`;
    let progress = true;
    while (progress) {
      progress = false;
      for (let r = 0; r < pp; r++) {
        const actions = plans[r].actions;
        while (pc[r] < actions.length) {
          const a = actions[pc[r]];
          if (a.kind === 'forward') {
            if (!(r === 0 && a.chunk === 0))
              expect(have[r].has(`in${k(a)}`), `rank ${r} F${k(a)} input`).toBe(true);
            have[r].add(`out${k(a)}`);
          } else if (a.kind === 'backward') {
            expect(have[r].has(`out${k(a)}`)).toBe(true);
            if (!(r === pp - 1 && a.chunk === chunks - 1))
              expect(have[r].has(`grad${k(a)}`), `rank ${r} B${k(a)} grad`).toBe(true);
            have[r].add(`ingrad${k(a)}`);
          } else if (a.kind === 'exchange') {
            if (!posted[r]) {
              const p = { sends: [] as Msg[], recvs: [] as { want: MicrobatchChunk; msg: Msg | null }[] };
              const next = (r + 1) % pp;
              const prev = (r - 1 + pp) % pp;
              if (a.sendNext) {
                expect(have[r].has(`out${k(a.sendNext)}`)).toBe(true);
                // the next rank's chunk: the same, or one more when wrapping from the last rank to the first
                const m: Msg = {
                  key: {
                    microbatch: a.sendNext.microbatch,
                    chunk: a.sendNext.chunk + (r === pp - 1 ? 1 : 0),
                  },
                  matched: false,
                };
                chan(r, next, 'fwd').sends.push(m);
                p.sends.push(m);
              }
              if (a.sendPrev) {
                expect(have[r].has(`ingrad${k(a.sendPrev)}`)).toBe(true);
                const m: Msg = {
                  key: { microbatch: a.sendPrev.microbatch, chunk: a.sendPrev.chunk - (r === 0 ? 1 : 0) },
                  matched: false,
                };
                chan(r, prev, 'bwd').sends.push(m);
                p.sends.push(m);
              }
              if (a.recvPrev) {
                const rv = { want: a.recvPrev, msg: null };
                chan(prev, r, 'fwd').recvs.push(rv);
                p.recvs.push(rv);
              }
              if (a.recvNext) {
                const rv = { want: a.recvNext, msg: null };
                chan(next, r, 'bwd').recvs.push(rv);
                p.recvs.push(rv);
              }
              posted[r] = p;
              match();
            }
            const p = posted[r]!;
            if (p.recvs.some((x) => !x.msg) || (rendezvous && p.sends.some((x) => !x.matched))) break;
            for (const x of p.recvs) {
              expect(x.msg!.key, `rank ${r} received the wrong tensor`).toEqual(x.want);
              have[r].add(`${a.recvPrev && x.want === a.recvPrev ? 'in' : 'grad'}${k(x.want)}`);
            }
            posted[r] = null;
          }
          pc[r]++;
          progress = true;
        }
      }
    }
    const stuck = pc
      .map((p, r) => (p < plans[r].actions.length ? `rank ${r} at action ${p}` : null))
      .filter(Boolean);
    expect(stuck, 'deadlock').toEqual([]);
    for (const c of channels.values()) expect(c.sends.every((s) => s.matched)).toBe(true);
  }

  it('every exchange matches its neighbour’s and the whole pipeline completes (posted sends and rendezvous)', () => {
    let simulated = 0;
    for (const [pp, vpp, m, g] of layouts) {
      if (pp === 1) continue;
      for (const forwardOnly of [false, true]) {
        const plans = Array.from({ length: pp }, (_, rank) => schedule(pp, rank, m, vpp, g, forwardOnly));
        simulate(plans, false);
        simulate(plans, true);
        simulated++;
      }
    }
    expect(simulated).toBeGreaterThan(200);
  });
});

describe('Megatron’s validity checks', () => {
  const fails = (f: () => unknown, pattern: RegExp) => {
    try {
      f();
    } catch (e) {
      expect(e).toBeInstanceOf(DistributedError);
      expect((e as DistributedError).code).toBe('INVALID_ARGUMENT');
      expect((e as Error).message).toMatch(pattern);
      expect((e as Error).message).not.toContain('\n');
      return;
    }
    throw new Error('expected an error');
  };

  it('the group size must lie in [pp, numMicrobatches]', () => {
    fails(
      () => schedule(4, 0, 3, 2),
      /microbatchGroupSizePerVpStage 4 must lie in \[pipelineParallelSize 4, numMicrobatches 3\]; use at least 4 microbatches/,
    );
    fails(
      () => schedule(4, 0, 8, 2, 3),
      /microbatchGroupSizePerVpStage 3 must lie in \[pipelineParallelSize 4, numMicrobatches 8\]/,
    );
    fails(() => schedule(2, 0, 4, 2, 5), /group size 5 must lie|microbatchGroupSizePerVpStage 5 must lie/);
  });

  it('a last partial group smaller than pp is refused (with the default group size: numMicrobatches must be a multiple of pp)', () => {
    fails(
      () => schedule(4, 0, 9, 2),
      /numMicrobatches 9 leaves a last group of 1 microbatches \(group size 4\), fewer than pipelineParallelSize 4/,
    );
    fails(() => schedule(2, 0, 5, 2), /last group of 1/);
    // a remainder of at least pp is fine (Megatron's own example: PP2, group size 3, 5 microbatches)
    expect(schedule(2, 0, 5, 2, 3).steps.length).toBe(20);
    expect(schedule(4, 0, 12, 2, 4).steps.length).toBe(48);
  });

  it('other bad layouts', () => {
    fails(() => schedule(1, 0, 4, 2), /does not support model chunking/);
    fails(() => schedule(4, 4, 8), /pipelineParallelRank 4 is not a stage of a 4-stage pipeline/);
    fails(() => schedule(2, 0, 0), /numMicrobatches must be an integer ≥ 1, got 0/);
    fails(() => schedule(2, 0, 4, 0), /virtualPipelineParallelSize must be an integer ≥ 1/);
    fails(() => schedule(2, 0, 4, null, 2), /applies to the interleaved schedule only/);
  });
});
