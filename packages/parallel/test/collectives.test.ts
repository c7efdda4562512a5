// Real processes over Gloo: every collective against a local computation of its result, and the
// failure modes (timeouts, dead peers, mismatched sizes, rendezvous problems) with their messages.
import { existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { expectAllOk, freePort, runWorkers } from './helpers/workers.js';

const here = dirname(fileURLToPath(import.meta.url));
const ADDON = join(here, '..', 'build', 'Release', 'megapatch_parallel.node');

interface Outcome {
  rank: number;
  code?: string | null;
  message?: string;
  ms?: number;
  cases?: number;
  failures?: string[];
  after?: number;
}

describe.skipIf(!existsSync(ADDON))('collectives on Gloo', () => {
  for (const nproc of [2, 3, 4]) {
    it(`every op, dtype and odd size matches a local computation with ${nproc} processes`, async () => {
      const outs = await runWorkers({ nproc, script: 'collectives-worker.ts', timeoutMs: 240_000 });
      expectAllOk(outs);
      for (const o of outs) {
        const r = o.results[0] as Outcome;
        expect(r.failures).toEqual([]);
        expect(r.cases).toBeGreaterThan(250);
      }
    }, 300_000);
  }

  it('tensors on another device (the reference backend) go through host copies with the same results', async () => {
    const outs = await runWorkers({
      nproc: 2,
      script: 'collectives-worker.ts',
      env: { MEGAPATCH_WORKER_DEVICE: 'ref:0' },
      timeoutMs: 240_000,
    });
    expectAllOk(outs);
    for (const o of outs) {
      const r = o.results[0] as Outcome & { device: string };
      expect(r.device).toBe('ref:0');
      expect(r.failures).toEqual([]);
      expect(r.cases).toBeGreaterThan(250);
    }
  }, 300_000);
});

// The NCCL process group on the emulated CUDA backend: the emulator's NCCL runs the collectives
// between the processes (native/emu/nccl_emu.cc in @megapatch/cuda), so the group's real code
// paths (unique id over Gloo, communicators, one NCCL group per exchange) are checked here.
const EMU_ADDON =
  process.env.MEGAPATCH_CUDA_EMU_NATIVE ??
  join(here, '..', '..', 'cuda', 'build', 'Release', 'megapatch_cuda_emu.node');
describe.skipIf(!existsSync(ADDON) || !existsSync(EMU_ADDON))('collectives on emulated CUDA devices', () => {
  for (const nproc of [2, 3]) {
    it(`every op, dtype and odd size goes through NCCL (the emulator's) with ${nproc} processes`, async () => {
      const outs = await runWorkers({
        nproc,
        script: 'collectives-worker.ts',
        env: { MEGAPATCH_WORKER_DEVICE: 'cudaemu', MEGAPATCH_CUDA_EMU_DEVICES: String(nproc) },
        timeoutMs: 240_000,
      });
      expectAllOk(outs);
      for (const o of outs) {
        const r = o.results[0] as Outcome & { device: string; library: string };
        expect(r.device).toBe(`cudaemu:${o.rank}`);
        expect(r.library).toMatch(/^nccl emulated 2\./);
        expect(r.failures).toEqual([]);
        expect(r.cases).toBeGreaterThan(250);
      }
    }, 300_000);
  }

  it('a peer that dies makes the other fail within the timeout, with the op and group named', async () => {
    const [r0, r1] = await fault('device-dead-peer', 2, { MEGAPATCH_DIST_TIMEOUT_S: '2' });
    expect((r1 as { exit?: number }).exit).toBe(7);
    expect(r0.code).toBe('TIMEOUT');
    expect(r0.message).toMatch(
      /^allReduce on group 'world' \(nccl emulated 2\.[\d.]+\): ncclAllReduce failed: .*did not arrive within 2 s/,
    );
    expect(r0.ms).toBeLessThan(8000);
  });

  it('with detail checks (MEGAPATCH_DIST_CHECKS=detail) every op still matches a local computation', async () => {
    const outs = await runWorkers({
      nproc: 2,
      script: 'collectives-worker.ts',
      env: {
        MEGAPATCH_WORKER_DEVICE: 'cudaemu',
        MEGAPATCH_CUDA_EMU_DEVICES: '2',
        MEGAPATCH_DIST_CHECKS: 'detail',
      },
      timeoutMs: 240_000,
    });
    expectAllOk(outs);
    for (const o of outs) {
      const r = o.results[0] as Outcome & { library: string };
      expect(r.library).toMatch(/^nccl emulated 2\./);
      expect(r.failures).toEqual([]);
      expect(r.cases).toBeGreaterThan(250);
    }
  }, 300_000);

  it('with detail checks, ranks that disagree fail together at once, with nothing queued', async () => {
    const outs = await runWorkers({
      nproc: 2,
      script: 'checks-worker.ts',
      args: ['all'],
      env: { MEGAPATCH_CUDA_EMU_DEVICES: '2', MEGAPATCH_DIST_CHECKS: 'detail' },
      timeoutMs: 60_000,
    });
    expectAllOk(outs);
    type Case = Outcome & { case: string; unchanged?: boolean; values?: number[]; received?: number[] };
    const byCase = outs.map((o) => new Map((o.results as Case[]).map((r) => [r.case, r])));
    const both = (name: string) => byCase.map((m) => m.get(name) as Case);
    const line = (rank: number, what: string) => `rank ${rank}: ${what}`;
    const expected: Record<string, string> = {
      size: `allReduce on group 'world': ranks differ in the element count: ${line(0, 'allReduce of 10 x float32, op sum')}; ${line(1, 'allReduce of 12 x float32, op sum')}`,
      dtype: `allReduce on group 'world': ranks differ in the dtype: ${line(0, 'allReduce of 10 x float32, op sum')}; ${line(1, 'allReduce of 10 x float64, op sum')}`,
      reduce: `allReduce on group 'world': ranks differ in the reduction: ${line(0, 'allReduce of 10 x float32, op sum')}; ${line(1, 'allReduce of 10 x float32, op max')}`,
      root: `broadcast on group 'world': ranks differ in the root: ${line(0, 'broadcast of 10 x float32, root 0')}; ${line(1, 'broadcast of 10 x float32, root 1')}`,
      path: "allReduce on group 'world': rank 0 passed a cudaemu tensor (NCCL), rank 1 a cpu tensor (Gloo); put the tensors on the same kind of device on every rank",
      allToAll: "allToAll on group 'world': rank 1 sends 1 row to rank 0, whose outputSplitSizes[1] is 2",
      batchIsendIrecv:
        "batchIsendIrecv on group 'world': rank 0 sends 5 x float32 to rank 1, which receives 4 x float32 from it; both sides of a transfer need the same element count and dtype",
    };
    for (const [name, message] of Object.entries(expected)) {
      for (const r of both(name)) {
        expect(r, name).toMatchObject({ code: 'MISMATCH', message, unchanged: true });
        // one exchange on the host, not the timeout (60 s)
        expect(r.ms, name).toBeLessThan(5000);
      }
    }
    // single sends and receives: each side names its own op
    const [send, recv] = both('send/recv');
    expect(send).toMatchObject({ code: 'MISMATCH', unchanged: true });
    expect(send.message).toMatch(
      /^send on group 'world': rank 0 sends 5 x float32 to rank 1, which receives 4 x float32/,
    );
    expect(recv.message).toBe(send.message?.replace(/^send/, 'recv'));
    expect(recv).toMatchObject({ code: 'MISMATCH', unchanged: true });
    // the collective before them went through NCCL, and the group works after them
    for (const [rank, r] of both('joined').entries()) {
      expect(r.values).toEqual([100, 102, 104]);
      expect(both('after')[rank]).toMatchObject({
        values: [100, 102, 104],
        received: [100 * (1 - rank), 100 * (1 - rank) + 1, 100 * (1 - rank) + 2],
      });
    }
  });

  it('with detail checks, a cuda tensor against a cpu tensor fails before NCCL is set up', async () => {
    const outs = await runWorkers({
      nproc: 2,
      script: 'checks-worker.ts',
      args: ['path-first'],
      env: { MEGAPATCH_CUDA_EMU_DEVICES: '2', MEGAPATCH_DIST_CHECKS: 'detail' },
      timeoutMs: 60_000,
    });
    expectAllOk(outs);
    for (const o of outs) {
      const r = o.results[0] as Outcome & { unchanged: boolean };
      expect(r).toMatchObject({
        code: 'MISMATCH',
        message:
          "allReduce on group 'world': rank 0 passed a cudaemu tensor (NCCL), rank 1 a cpu tensor (Gloo); put the tensors on the same kind of device on every rank",
        unchanged: true,
      });
      expect(r.ms).toBeLessThan(5000);
    }
  });

  it('MEGAPATCH_DEVICE_COLLECTIVES=0 keeps host copies through Gloo, with the same results', async () => {
    const outs = await runWorkers({
      nproc: 2,
      script: 'collectives-worker.ts',
      env: { MEGAPATCH_WORKER_DEVICE: 'cudaemu', MEGAPATCH_DEVICE_COLLECTIVES: '0' },
      timeoutMs: 240_000,
    });
    expectAllOk(outs);
    for (const o of outs) {
      const r = o.results[0] as Outcome & { library: string };
      expect(r.library).toBe('gloo');
      expect(r.failures).toEqual([]);
    }
  }, 300_000);
});

async function fault(mode: string, nproc = 2, extra: Record<string, string> = {}): Promise<Outcome[]> {
  const outs = await runWorkers({
    nproc,
    script: 'faults-worker.ts',
    args: [mode],
    env: extra,
    timeoutMs: 30_000,
  });
  return outs.map((o) => ({ ...(o.results[0] as Outcome), rank: o.rank, exit: o.code }));
}

describe.skipIf(!existsSync(ADDON))('faults give clear errors, never hangs', () => {
  it('a collective a peer never reaches times out naming the op, group, rank and the missing peer', async () => {
    const [r0] = await fault('timeout');
    expect(r0.code).toBe('TIMEOUT');
    expect(r0.message).toMatch(
      /^allReduce on group 'world' \(rank 0 of 2, global rank 0\): timed out after 1500 ms .*peers that did not arrive: global rank 1/,
    );
    expect(r0.ms).toBeLessThan(4000);
  });

  it('a peer that dies makes the others fail', async () => {
    const [r0, r1] = await fault('dead-peer');
    expect((r1 as { exit?: number }).exit).toBe(7);
    expect(['PEER_LOST', 'TIMEOUT']).toContain(r0.code);
    expect(r0.message).toMatch(/allReduce on group 'world' \(rank 0 of 2/);
    expect(r0.ms).toBeLessThan(4000);
  });

  it('mismatched sizes fail on every rank with the ranks and sizes named, and the group stays usable', async () => {
    const outs = await runWorkers({
      nproc: 2,
      script: 'faults-worker.ts',
      args: ['mismatch'],
      timeoutMs: 30_000,
    });
    expectAllOk(outs);
    for (const o of outs) {
      const [err, after] = o.results as Outcome[];
      expect(err.code).toBe('MISMATCH');
      expect(err.message).toContain(
        'global rank 0: allReduce of 10 x float32, op sum; global rank 1: allReduce of 12 x float32',
      );
      expect(after.after).toBe(2);
    }
  });

  it('allToAll split sizes that do not match across ranks fail on every rank', async () => {
    const outs = await fault('a2a-mismatch');
    for (const o of outs) {
      expect(o.code).toBe('MISMATCH');
      expect(o.message).toMatch(/sends \d rows to global rank \d, whose outputSplitSizes\[\d\] is \d/);
    }
  });

  it('a recv smaller than the send fails before any byte lands', async () => {
    const outs = await fault('recv-mismatch');
    expect(outs[1].code).toBe('MISMATCH');
    expect(outs[1].message).toContain('global rank 0 sent 5 x float32 but this rank expects 4 x float32');
  });

  it('a process that leaves without destroyProcessGroup exits cleanly', async () => {
    const outs = await runWorkers({
      nproc: 2,
      script: 'faults-worker.ts',
      args: ['no-destroy'],
      timeoutMs: 30_000,
    });
    expectAllOk(outs);
    for (const o of outs) expect(o.results[0]).toMatchObject({ left: true });
  });

  it('a process that fails with a collective in flight exits at once, not after the timeout', async () => {
    const t0 = Date.now();
    const outs = await runWorkers({
      nproc: 2,
      script: 'faults-worker.ts',
      args: ['throw-in-flight'],
      timeoutMs: 30_000,
    });
    // rank 0 threw (the worker reports it and exits 3) long before the 60 s collective timeout
    expect(outs[0].code).toBe(3);
    expect((outs[0].results[0] as Outcome).message).toBe('rank 0 fails while a collective is in flight');
    expect((outs[0].results[0] as Outcome).ms).toBeLessThan(5000);
    expect(Date.now() - t0).toBeLessThan(20_000);
  });

  it('a world that never completes names the ranks that did not join', async () => {
    // WORLD_SIZE 3, but only ranks 0 and 1 start
    const [r0, r1] = await fault('ok', 2, { WORLD_SIZE: '3', LOCAL_WORLD_SIZE: '3' });
    expect(r0.code).toBe('TIMEOUT');
    expect(r0.message).toMatch(
      /^rendezvous at 127\.0\.0\.1:\d+: rank 2 of world size 3 did not join within 2 s/,
    );
    // rank 1 either times out the same way, sees rank 0 leave first (its store goes with it), or
    // (a loaded machine starting rank 0 late) gives up reaching the store within the same 2 s
    expect(r1.message).toMatch(
      /rank 2 of world size 3 did not join|closed the connection; did rank 0 exit|could not reach the rendezvous store at .* within 2 s/,
    );
    for (const o of [r0, r1]) expect(o.ms).toBeLessThan(6000);
  });

  it('a port in use is reported by rank 0', async () => {
    const port = await freePort();
    const srv = createServer().listen(port, '0.0.0.0');
    await new Promise((r) => srv.once('listening', r));
    try {
      const outs = await runWorkers({
        nproc: 1,
        script: 'faults-worker.ts',
        args: ['ok'],
        port,
        timeoutMs: 30_000,
      });
      const r = outs[0].results[0] as Outcome;
      expect(r.code).toBe('STORE');
      expect(r.message).toBe(
        `MASTER_PORT ${port} on 127.0.0.1 is already in use (another job or a leftover process?); choose a free port with --master-port or MASTER_PORT`,
      );
    } finally {
      srv.close();
    }
  });

  const unsetTorchrun = { RANK: '', WORLD_SIZE: '', LOCAL_RANK: '', LOCAL_WORLD_SIZE: '' };
  const launchers: [string, (rank: number) => Record<string, string>][] = [
    [
      'srun (Slurm variables, the master is the first host of the node list)',
      (rank) => ({
        ...unsetTorchrun,
        MASTER_ADDR: '',
        SLURM_PROCID: String(rank),
        SLURM_NTASKS: '3',
        SLURM_LOCALID: String(rank),
        SLURM_NODEID: '0',
        SLURM_STEP_NODELIST: 'localhost,other[01-02]',
        SLURM_STEP_TASKS_PER_NODE: '3',
      }),
    ],
    [
      'mpirun (Open MPI variables)',
      (rank) => ({
        ...unsetTorchrun,
        OMPI_COMM_WORLD_RANK: String(rank),
        OMPI_COMM_WORLD_SIZE: '3',
        OMPI_COMM_WORLD_LOCAL_RANK: String(rank),
        OMPI_COMM_WORLD_LOCAL_SIZE: '3',
      }),
    ],
  ];
  for (const [name, env] of launchers) {
    it(`workers started by ${name} join without the launcher`, async () => {
      const outs = await runWorkers({
        nproc: 3,
        script: 'faults-worker.ts',
        args: ['sum'],
        env,
        timeoutMs: 30_000,
      });
      expectAllOk(outs);
      const got = outs.map((o) => o.results[0] as { rank: number; size: number; sum: number });
      expect(got.map((g) => g.rank).sort()).toEqual([0, 1, 2]);
      for (const g of got) expect(g).toMatchObject({ size: 3, sum: 3 });
    });
  }

  it('an unreachable master is reported within the rendezvous timeout', async () => {
    const port = await freePort();
    // only rank 1 of 2 starts, so nobody hosts the store
    const outs = await runWorkers({
      nproc: 1,
      script: 'faults-worker.ts',
      args: ['ok'],
      port,
      env: { RANK: '1', WORLD_SIZE: '2', LOCAL_RANK: '1', LOCAL_WORLD_SIZE: '2' },
      timeoutMs: 30_000,
    });
    const r = outs[0].results[0] as Outcome;
    expect(r.code).toBe('TIMEOUT');
    expect(r.message).toMatch(
      new RegExp(
        `could not reach the rendezvous store at 127\\.0\\.0\\.1:${port} within 2 s .*is rank 0 running`,
      ),
    );
    expect(r.ms).toBeLessThan(6000);
  });
});
