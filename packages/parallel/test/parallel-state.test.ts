// Bookkeeping of parallel-state.ts against a stand-in for distributed.js: newGroup hands back plain
// objects carrying the ProcessGroup fields parallel-state reads (rank, size, ranks, name, destroy)
// as seen from one chosen global rank. The describe block at the end runs real processes.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { DistributedError } from '../src/errors.js';
import * as ps from '../src/parallel-state.js';
import type { ProcessGroup } from '../src/process-group.js';
import { computeParallelGroups, GROUP_KINDS, type ParallelGroups } from '../src/rank-generator.js';
import { expectAllOk, runWorkers } from './helpers/workers.js';

// The ProcessGroup fields parallel-state reads, plus a count of destroy() calls.
type FakeGroup = Pick<ProcessGroup, 'rank' | 'size' | 'ranks' | 'name' | 'destroy'> & { destroyed: number };

const dist = vi.hoisted(() => ({
  rank: 0,
  world: 1,
  initialized: true,
  calls: [] as { ranks: number[]; name?: string; timeoutMs?: number }[],
  groups: [] as FakeGroup[],
  /** newGroup rejects on this call (0-based), when set. */
  failAt: -1,
  /** newGroup returns null to members too, when set. */
  dropMembers: false,
}));

vi.mock('../src/distributed.js', () => {
  const make = (ranks: readonly number[], name: string): FakeGroup => {
    const g: FakeGroup = {
      rank: ranks.indexOf(dist.rank),
      size: ranks.length,
      ranks: [...ranks],
      name,
      destroyed: 0,
      destroy() {
        g.destroyed++;
      },
    };
    return g;
  };
  return {
    isInitialized: () => dist.initialized,
    getRank: () => dist.rank,
    getWorldSize: () => dist.world,
    getWorldGroup: () =>
      make(
        Array.from({ length: dist.world }, (_, i) => i),
        'world',
      ),
    destroyGroup: (g: FakeGroup) => g.destroy(),
    newGroup: async (ranks: readonly number[], opts: { name?: string; timeoutMs?: number } = {}) => {
      if (dist.calls.length === dist.failAt) throw new Error('rendezvous failed');
      dist.calls.push({ ranks: [...ranks], ...opts });
      if (!ranks.includes(dist.rank) || dist.dropMembers) return null;
      const g = make(ranks, opts.name ?? '');
      dist.groups.push(g);
      return g;
    },
  };
});

/** Runs initializeModelParallel as global rank `rank` of `world`. */
async function initAs(rank: number, world: number, opts: ps.ModelParallelOptions): Promise<void> {
  dist.rank = rank;
  dist.world = world;
  dist.calls = [];
  dist.groups = [];
  await ps.initializeModelParallel(opts);
}

/** The group of `kind` that holds `rank`. */
function mine(plan: ParallelGroups, kind: keyof ParallelGroups & string, rank: number): number[] | undefined {
  return (plan[kind] as number[][]).find((g) => g.includes(rank));
}

beforeEach(() => {
  dist.initialized = true;
  dist.failAt = -1;
  dist.dropMembers = false;
});

afterEach(() => {
  ps.destroyModelParallel();
});

describe('before initializeModelParallel', () => {
  it('every accessor throws NOT_INITIALIZED naming itself', () => {
    expect(() => ps.getTensorModelParallelGroup()).toThrow(
      new DistributedError(
        'NOT_INITIALIZED',
        'getTensorModelParallelGroup: model parallel groups are not initialised; call initializeModelParallel() first',
      ),
    );
    const accessors: [string, () => unknown][] = [
      ['getTensorModelParallelWorldSize', ps.getTensorModelParallelWorldSize],
      ['getTensorModelParallelRank', ps.getTensorModelParallelRank],
      ['getTensorModelParallelSrcRank', ps.getTensorModelParallelSrcRank],
      ['getPipelineModelParallelGroup', ps.getPipelineModelParallelGroup],
      ['getPipelineModelParallelWorldSize', ps.getPipelineModelParallelWorldSize],
      ['getPipelineModelParallelRank', ps.getPipelineModelParallelRank],
      ['getPipelineModelParallelFirstRank', ps.getPipelineModelParallelFirstRank],
      ['getPipelineModelParallelLastRank', ps.getPipelineModelParallelLastRank],
      ['getPipelineModelParallelNextRank', ps.getPipelineModelParallelNextRank],
      ['getPipelineModelParallelPrevRank', ps.getPipelineModelParallelPrevRank],
      ['isPipelineFirstStage', () => ps.isPipelineFirstStage()],
      ['isPipelineLastStage', () => ps.isPipelineLastStage()],
      ['getDataParallelGroup', () => ps.getDataParallelGroup(true)],
      ['getDataParallelWorldSize', () => ps.getDataParallelWorldSize()],
      ['getDataParallelRank', () => ps.getDataParallelRank()],
      ['getDataParallelSrcRank', () => ps.getDataParallelSrcRank()],
      ['getContextParallelGroup', ps.getContextParallelGroup],
      ['getContextParallelWorldSize', ps.getContextParallelWorldSize],
      ['getContextParallelRank', ps.getContextParallelRank],
      ['getTensorAndDataParallelGroup', () => ps.getTensorAndDataParallelGroup()],
      ['getTensorAndContextParallelGroup', ps.getTensorAndContextParallelGroup],
      ['getModelParallelGroup', ps.getModelParallelGroup],
      ['getEmbeddingGroup', ps.getEmbeddingGroup],
      ['getPositionEmbeddingGroup', ps.getPositionEmbeddingGroup],
      ['getExpertModelParallelGroup', ps.getExpertModelParallelGroup],
      ['getExpertModelParallelWorldSize', ps.getExpertModelParallelWorldSize],
      ['getExpertModelParallelRank', ps.getExpertModelParallelRank],
      ['getExpertTensorParallelGroup', ps.getExpertTensorParallelGroup],
      ['getExpertTensorParallelWorldSize', ps.getExpertTensorParallelWorldSize],
      ['getExpertTensorParallelRank', ps.getExpertTensorParallelRank],
      ['getExpertTensorAndModelParallelGroup', ps.getExpertTensorAndModelParallelGroup],
      ['getExpertTensorModelPipelineParallelGroup', ps.getExpertTensorModelPipelineParallelGroup],
      ['getExpertDataParallelGroup', ps.getExpertDataParallelGroup],
      ['getExpertDataParallelWorldSize', ps.getExpertDataParallelWorldSize],
      ['getExpertDataParallelRank', ps.getExpertDataParallelRank],
      ['getParallelGroupRanks', ps.getParallelGroupRanks],
    ];
    for (const [name, fn] of accessors) {
      expect(fn, name).toThrow(
        `${name}: model parallel groups are not initialised; call initializeModelParallel() first`,
      );
      try {
        fn();
      } catch (err) {
        expect((err as DistributedError).code).toBe('NOT_INITIALIZED');
      }
    }
    expect(ps.modelParallelIsInitialized()).toBe(false);
    expect(ps.getVirtualPipelineModelParallelRank()).toBeNull();
    expect(ps.getVirtualPipelineModelParallelWorldSize()).toBeNull();
  });

  it('initializeModelParallel needs the default process group', async () => {
    dist.initialized = false;
    await expect(ps.initializeModelParallel({ tp: 2 })).rejects.toThrow(
      'initializeModelParallel: the default process group is not initialised; call initProcessGroup() first',
    );
  });
});

describe('initializeModelParallel', () => {
  it('gives every rank of the docstring layout (16 ranks, TP 2, PP 4, DP 2) its groups', async () => {
    for (let rank = 0; rank < 16; rank++) {
      await initAs(rank, 16, { tensorModelParallelSize: 2, pipelineModelParallelSize: 4 });
      expect(ps.modelParallelIsInitialized()).toBe(true);
      const tpRank = rank % 2;
      const dpRank = Math.floor(rank / 2) % 2;
      const ppRank = Math.floor(rank / 4);
      const tpBase = rank - tpRank;
      expect(ps.getTensorModelParallelGroup().ranks).toEqual([tpBase, tpBase + 1]);
      expect(ps.getTensorModelParallelRank()).toBe(tpRank);
      expect(ps.getTensorModelParallelWorldSize()).toBe(2);
      expect(ps.getTensorModelParallelSrcRank()).toBe(tpBase);
      const dpBase = rank - 2 * dpRank;
      expect(ps.getDataParallelGroup().ranks).toEqual([dpBase, dpBase + 2]);
      expect(ps.getDataParallelRank()).toBe(dpRank);
      expect(ps.getDataParallelWorldSize()).toBe(2);
      expect(ps.getDataParallelSrcRank()).toBe(dpBase);
      expect(ps.getDataParallelGroup(true).ranks).toEqual([dpBase, dpBase + 2]);
      const ppBase = rank % 4;
      const pipeline = [ppBase, ppBase + 4, ppBase + 8, ppBase + 12];
      expect(ps.getPipelineModelParallelGroup().ranks).toEqual(pipeline);
      expect(ps.getPipelineModelParallelRank()).toBe(ppRank);
      expect(ps.getPipelineModelParallelWorldSize()).toBe(4);
      expect(ps.getPipelineModelParallelFirstRank()).toBe(ppBase);
      expect(ps.getPipelineModelParallelLastRank()).toBe(ppBase + 12);
      expect(ps.getPipelineModelParallelNextRank()).toBe(pipeline[(ppRank + 1) % 4]);
      expect(ps.getPipelineModelParallelPrevRank()).toBe(pipeline[(ppRank + 3) % 4]);
      expect(ps.isPipelineFirstStage()).toBe(ppRank === 0);
      expect(ps.isPipelineLastStage()).toBe(ppRank === 3);
      const mp = ps.getModelParallelGroup().ranks;
      expect(mp).toEqual(dpRank === 0 ? [0, 1, 4, 5, 8, 9, 12, 13] : [2, 3, 6, 7, 10, 11, 14, 15]);
      const embedding = ps.getEmbeddingGroup();
      expect(embedding?.ranks ?? null).toEqual(ppRank === 0 || ppRank === 3 ? [ppBase, ppBase + 12] : null);
      expect(ps.isRankInEmbeddingGroup()).toBe(ppRank === 0 || ppRank === 3);
      expect(ps.getPositionEmbeddingGroup()?.ranks ?? null).toEqual(ppRank === 0 ? [ppBase] : null);
      expect(ps.isRankInPositionEmbeddingGroup()).toBe(ppRank === 0);
      expect(ps.getContextParallelWorldSize()).toBe(1);
      expect(ps.getContextParallelGroup().ranks).toEqual([rank]);
      expect(ps.getExpertModelParallelWorldSize()).toBe(1);
      expect(ps.getExpertTensorParallelGroup().ranks).toEqual([tpBase, tpBase + 1]);
      expect(ps.getExpertDataParallelGroup().ranks).toEqual([dpBase, dpBase + 2]);

      const created = [...dist.groups];
      // One group of each kind, except the embedding groups that middle stages are not part of.
      expect(created).toHaveLength(GROUP_KINDS.length - (ppRank === 0 ? 0 : ppRank === 3 ? 1 : 2));
      ps.destroyModelParallel();
      expect(created.map((g) => g.destroyed)).toEqual(created.map(() => 1));
      expect(ps.modelParallelIsInitialized()).toBe(false);
    }
  });

  it('calls newGroup for every group list in the same order on every rank, with names and timeout', async () => {
    const opts = { tp: 2, pp: 2, cp: 2, ep: 2, etp: 1, timeoutMs: 5000 };
    const plan = computeParallelGroups(16, opts);
    const expected = GROUP_KINDS.flatMap((kind) => plan[kind].map((ranks) => ranks));
    let first: typeof dist.calls | undefined;
    for (let rank = 0; rank < 16; rank++) {
      await initAs(rank, 16, opts);
      expect(dist.calls.map((c) => c.ranks)).toEqual(expected);
      expect(dist.calls.every((c) => c.timeoutMs === 5000)).toBe(true);
      first ??= dist.calls;
      expect(dist.calls).toEqual(first);
      ps.destroyModelParallel();
    }
    const names = new Set(first?.map((c) => c.name));
    expect([...names]).toEqual([
      'dp-cp',
      'dp',
      'cp',
      'mp',
      'tp',
      'pp',
      'embd',
      'pos-embd',
      'tp-dp-cp',
      'tp-dp',
      'tp-cp',
      'ep',
      'expert-tp',
      'tp-ep',
      'tp-ep-pp',
      'expert-dp',
    ]);
  });

  it('leaves timeoutMs out of newGroup options when not given', async () => {
    await initAs(0, 2, { tp: 2 });
    expect(dist.calls.every((c) => !('timeoutMs' in c))).toBe(true);
  });

  it('lays out context parallelism: 8 ranks with TP 2, CP 2', async () => {
    await initAs(5, 8, { tp: 2, cp: 2 });
    // rank 5 = tp 1 + 2·(cp 0 + 2·dp 1)
    expect(ps.getTensorModelParallelGroup().ranks).toEqual([4, 5]);
    expect(ps.getContextParallelGroup().ranks).toEqual([5, 7]);
    expect(ps.getContextParallelRank()).toBe(0);
    expect(ps.getContextParallelWorldSize()).toBe(2);
    expect(ps.getDataParallelGroup().ranks).toEqual([1, 5]);
    expect(ps.getDataParallelRank()).toBe(1);
    expect(ps.getDataParallelGroup(true).ranks).toEqual([1, 3, 5, 7]);
    expect(ps.getDataParallelWorldSize(true)).toBe(4);
    expect(ps.getDataParallelRank(true)).toBe(2);
    expect(ps.getDataParallelSrcRank(true)).toBe(1);
    expect(ps.getTensorAndContextParallelGroup().ranks).toEqual([4, 5, 6, 7]);
    expect(ps.getTensorAndContextParallelWorldSize()).toBe(4);
    expect(ps.getTensorAndContextParallelRank()).toBe(1);
    expect(ps.getTensorAndDataParallelGroup().ranks).toEqual([0, 1, 4, 5]);
    expect(ps.getTensorAndDataParallelGroup(true).ranks).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
  });

  it('gives the expert groups of 8 ranks with tp 2, pp 2, ep 2, etp 1', async () => {
    const plan = computeParallelGroups(8, { tp: 2, pp: 2, ep: 2, etp: 1 });
    for (let rank = 0; rank < 8; rank++) {
      await initAs(rank, 8, { tp: 2, pp: 2, ep: 2, etp: 1 });
      const ep = mine(plan, 'ep', rank)!;
      expect(ps.getExpertModelParallelGroup().ranks).toEqual(ep);
      expect(ps.getExpertModelParallelRank()).toBe(ep.indexOf(rank));
      expect(ps.getExpertModelParallelWorldSize()).toBe(2);
      expect(ps.getExpertTensorParallelGroup().ranks).toEqual([rank]);
      expect(ps.getExpertTensorParallelRank()).toBe(0);
      expect(ps.getExpertTensorParallelWorldSize()).toBe(1);
      expect(ps.getExpertTensorAndModelParallelGroup().ranks).toEqual(mine(plan, 'tpEp', rank));
      expect(ps.getExpertTensorAndModelParallelWorldSize()).toBe(2);
      expect(ps.getExpertTensorAndModelParallelRank()).toBe(ep.indexOf(rank));
      expect(ps.getExpertTensorModelPipelineParallelGroup().ranks).toEqual(mine(plan, 'tpEpPp', rank));
      const edp = mine(plan, 'expertDp', rank)!;
      expect(ps.getExpertDataParallelGroup().ranks).toEqual(edp);
      expect(ps.getExpertDataParallelWorldSize()).toBe(2);
      expect(ps.getExpertDataParallelRank()).toBe(edp.indexOf(rank));
      // expert order: rank = ep + 2·(dp + 2·pp), while the dense one is rank = tp + 2·(dp + 2·pp)
      expect(ep).toEqual([rank - (rank % 2), rank - (rank % 2) + 1]);
      expect(edp).toEqual([(rank % 2) + 4 * Math.floor(rank / 4), (rank % 2) + 4 * Math.floor(rank / 4) + 2]);
      expect(ps.getParallelGroupRanks()).toEqual(plan);
      ps.destroyModelParallel();
    }
  });

  it('accepts the short keys as the long ones', async () => {
    await initAs(3, 16, {
      tensorModelParallelSize: 2,
      pipelineModelParallelSize: 2,
      contextParallelSize: 2,
      expertModelParallelSize: 2,
      expertTensorParallelSize: 1,
      order: 'tp-cp-ep-dp-pp',
    });
    const long = dist.calls;
    ps.destroyModelParallel();
    await initAs(3, 16, { tp: 2, pp: 2, cp: 2, ep: 2, etp: 1 });
    expect(dist.calls).toEqual(long);
    ps.destroyModelParallel();
    // Both spellings at once are fine when they agree.
    await initAs(3, 16, { tp: 2, tensorModelParallelSize: 2, pp: 2, cp: 2, ep: 2, etp: 1 });
    expect(dist.calls).toEqual(long);
  });

  it('rejects bad options with one actionable line', async () => {
    const cases: [ps.ModelParallelOptions, string][] = [
      [
        { tp: 4 },
        'initializeModelParallel: world size 6 is not divisible by tp 4 × pp 1 × cp 1 = 4; use a world size that is a multiple of 4 or change tp/pp/cp',
      ],
      [
        { tp: 2, ep: 4, etp: 1 },
        'initializeModelParallel: world size 6 is not divisible by etp 1 × ep 4 × pp 1 = 4',
      ],
      [
        { tp: 2, tensorModelParallelSize: 3 },
        'tensorModelParallelSize 3 and tp 2 disagree; pass one of them',
      ],
      [{ tpp: 2 } as ps.ModelParallelOptions, "unknown option 'tpp'"],
      [{ tp: 0 }, 'tp must be a positive integer, got 0'],
      [{ vpp: 2 }, 'virtualPipelineModelParallelSize 2 needs pipelineModelParallelSize > 1'],
      [{ pp: 2, vpp: 0 }, 'virtualPipelineModelParallelSize must be a positive integer, got 0'],
      [{ cp: 2, order: 'tp-dp-pp' }, "cp has size 2 but the order 'tp-dp-pp' does not name it"],
    ];
    for (const [opts, message] of cases) {
      const err = await initAs(0, 6, opts).catch((e: unknown) => e);
      expect(err, message).toBeInstanceOf(DistributedError);
      expect((err as DistributedError).code).toBe('INVALID_ARGUMENT');
      expect((err as DistributedError).message).toContain(message);
      expect((err as DistributedError).message).toMatch(/^initializeModelParallel: [^\n]*$/);
      expect(dist.calls).toHaveLength(0);
      expect(ps.modelParallelIsInitialized()).toBe(false);
    }
  });

  it('refuses to initialise twice, then works again after destroyModelParallel', async () => {
    await initAs(0, 4, { tp: 2 });
    await expect(ps.initializeModelParallel({ tp: 2 })).rejects.toThrow(
      'initializeModelParallel: model parallel groups are already initialised; call destroyModelParallel() first',
    );
    // A second call while the first is still creating groups is refused as well.
    ps.destroyModelParallel();
    dist.calls = [];
    const pending = ps.initializeModelParallel({ tp: 2 });
    await expect(ps.initializeModelParallel({ tp: 2 })).rejects.toThrow('already initialised');
    await pending;
    expect(ps.getTensorModelParallelGroup().ranks).toEqual([0, 1]);
  });

  it('destroyModelParallel is idempotent', async () => {
    ps.destroyModelParallel();
    await initAs(1, 4, { tp: 2 });
    const created = [...dist.groups];
    ps.destroyModelParallel();
    ps.destroyModelParallel();
    expect(created.every((g) => g.destroyed === 1)).toBe(true);
    expect(() => ps.getTensorModelParallelRank()).toThrow('not initialised');
  });

  it('destroys the groups it made when a newGroup call fails, and stays uninitialised', async () => {
    dist.failAt = 20;
    await expect(initAs(2, 8, { tp: 2, pp: 2 })).rejects.toThrow('rendezvous failed');
    expect(dist.groups.length).toBeGreaterThan(0);
    expect(dist.groups.every((g) => g.destroyed === 1)).toBe(true);
    expect(ps.modelParallelIsInitialized()).toBe(false);
    dist.failAt = -1;
    await initAs(2, 8, { tp: 2, pp: 2 });
    expect(ps.getTensorModelParallelRank()).toBe(0);
  });

  it('reports a member that newGroup left out', async () => {
    dist.dropMembers = true;
    const err = await initAs(1, 2, { tp: 2 }).catch((e: unknown) => e);
    expect((err as DistributedError).code).toBe('BACKEND');
    expect((err as DistributedError).message).toBe(
      'initializeModelParallel: newGroup returned no dp-cp group for member rank 1 of [1]',
    );
    expect(ps.modelParallelIsInitialized()).toBe(false);
  });
});

describe('virtual pipeline parallelism', () => {
  it('starts at model chunk 0 and looks at the chunk in isPipelineFirstStage/LastStage', async () => {
    await initAs(0, 4, { pp: 2, vpp: 3 });
    expect(ps.getVirtualPipelineModelParallelWorldSize()).toBe(3);
    expect(ps.getVirtualPipelineModelParallelRank()).toBe(0);
    expect(ps.isPipelineFirstStage()).toBe(true);
    expect(ps.isPipelineLastStage()).toBe(false);
    ps.setVirtualPipelineModelParallelRank(1);
    expect(ps.getVirtualPipelineModelParallelRank()).toBe(1);
    expect(ps.isPipelineFirstStage()).toBe(false);
    expect(ps.isPipelineFirstStage(true)).toBe(true);
    ps.destroyModelParallel();
    expect(ps.getVirtualPipelineModelParallelRank()).toBeNull();
    expect(ps.getVirtualPipelineModelParallelWorldSize()).toBeNull();

    // rank 2 is the last stage of pipeline [0, 2]
    await initAs(2, 4, { pipelineModelParallelSize: 2, virtualPipelineModelParallelSize: 3 });
    expect(ps.isPipelineLastStage()).toBe(false);
    expect(ps.isPipelineLastStage(true)).toBe(true);
    expect(ps.isRankInEmbeddingGroup()).toBe(false);
    expect(ps.isRankInEmbeddingGroup(true)).toBe(true);
    ps.setVirtualPipelineModelParallelRank(2);
    expect(ps.isPipelineLastStage()).toBe(true);
    expect(ps.isRankInEmbeddingGroup()).toBe(true);
    expect(ps.isPipelineFirstStage(true)).toBe(false);
  });

  it('rejects a model chunk outside 0 .. vpp-1', async () => {
    await initAs(0, 4, { pp: 2, vpp: 2 });
    expect(() => ps.setVirtualPipelineModelParallelRank(2)).toThrow(
      'setVirtualPipelineModelParallelRank: 2 is not a model chunk index; pass 0 .. 1',
    );
    expect(() => ps.setVirtualPipelineModelParallelRank(-1)).toThrow(DistributedError);
  });

  it('ignores the chunk without virtual pipelining', async () => {
    await initAs(0, 2, { pp: 2 });
    expect(ps.getVirtualPipelineModelParallelRank()).toBeNull();
    expect(ps.isPipelineFirstStage()).toBe(true);
    expect(ps.isPipelineLastStage()).toBe(false);
  });
});

// Real processes over Gloo; needs the native addon and distributed.ts.
const pkg = join(dirname(fileURLToPath(import.meta.url)), '..');
const haveRuntime =
  existsSync(join(pkg, 'build', 'Release', 'megapatch_parallel.node')) &&
  existsSync(join(pkg, 'src', 'distributed.ts'));

interface WorkerResult {
  rank: number;
  tp: number[];
  pp: number[];
  dp: number[];
  cp: number[];
  ep: number[];
  etp: number[];
  expertDp: number[];
  dpCp: number[];
  mp: number[];
  tpEp: number[];
  tpEpPp: number[];
  embedding: number[] | null;
  tpRank: number;
  ppRank: number;
  dpRank: number;
  tpSum: number;
}

describe.skipIf(!haveRuntime)('initializeModelParallel on 8 processes', () => {
  it.each([
    { tp: 2, pp: 2, ep: 2, etp: 1 },
    { tp: 2, cp: 2, ep: 2, etp: 1 },
  ])('forms the groups computeParallelGroups predicts and all-reduces over TP: %o', async (sizes) => {
    const outcomes = await runWorkers({
      nproc: 8,
      script: 'parallel-state-worker.ts',
      args: [JSON.stringify(sizes)],
    });
    expectAllOk(outcomes);
    const plan = computeParallelGroups(8, sizes);
    for (const o of outcomes) {
      expect(o.results).toHaveLength(1);
      const r = o.results[0] as WorkerResult;
      const rank = o.rank;
      expect(r.rank).toBe(rank);
      const tp = mine(plan, 'tp', rank)!;
      const pp = mine(plan, 'pp', rank)!;
      const dp = mine(plan, 'dp', rank)!;
      expect(r.tp).toEqual(tp);
      expect(r.pp).toEqual(pp);
      expect(r.dp).toEqual(dp);
      expect(r.cp).toEqual(mine(plan, 'cp', rank));
      expect(r.ep).toEqual(mine(plan, 'ep', rank));
      expect(r.etp).toEqual(mine(plan, 'expertTp', rank));
      expect(r.expertDp).toEqual(mine(plan, 'expertDp', rank));
      expect(r.dpCp).toEqual(mine(plan, 'dpCp', rank));
      expect(r.mp).toEqual(mine(plan, 'tpPp', rank));
      expect(r.tpEp).toEqual(mine(plan, 'tpEp', rank));
      expect(r.tpEpPp).toEqual(mine(plan, 'tpEpPp', rank));
      expect(r.embedding).toEqual(mine(plan, 'embedding', rank) ?? null);
      expect(r.tpRank).toBe(tp.indexOf(rank));
      expect(r.ppRank).toBe(pp.indexOf(rank));
      expect(r.dpRank).toBe(dp.indexOf(rank));
      expect(r.tpSum).toBe(tp.reduce((a, b) => a + b, 0));
    }
  });
});
