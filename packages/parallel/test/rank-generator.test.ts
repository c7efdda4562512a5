import { describe, expect, it } from 'vitest';
import { DistributedError } from '../src/errors.js';
import {
  computeParallelGroups,
  GROUP_KINDS,
  generateMaskedOrthogonalRankGroups,
  type ParallelGroups,
  RankGenerator,
} from '../src/rank-generator.js';

type Coords = Record<string, number>;

/**
 * Groups by brute force: visit every coordinate of the grid `sizes` (slowest axis outermost), take
 * its rank from `rankOf`, and gather ranks that agree on every axis outside `inside`. Groups come
 * out ascending and sorted by their first rank, which is how the generator lists them.
 */
function bruteGroups(sizes: Coords, inside: string[], rankOf: (c: Coords) => number): number[][] {
  const axes = Object.keys(sizes);
  const byKey = new Map<string, number[]>();
  const visit = (k: number, c: Coords) => {
    if (k < 0) {
      const key = axes
        .filter((a) => !inside.includes(a))
        .map((a) => c[a])
        .join(',');
      const list = byKey.get(key) ?? [];
      list.push(rankOf(c));
      byKey.set(key, list);
      return;
    }
    for (let i = 0; i < sizes[axes[k]]; i++) visit(k - 1, { ...c, [axes[k]]: i });
  };
  visit(axes.length - 1, {});
  const groups = [...byKey.values()].map((g) => g.sort((a, b) => a - b));
  return groups.sort((a, b) => a[0] - b[0]);
}

// Megatron's default order tp-cp-ep-dp-pp on the dense grid (ep = 1).
const denseRank = (s: Coords) => (c: Coords) => c.tp + s.tp * (c.cp + s.cp * (c.dp + s.dp * c.pp));
// The same order on the expert grid (cp = 1, tp = etp).
const expertRank = (s: Coords) => (c: Coords) => c.tp + s.tp * (c.ep + s.ep * (c.dp + s.dp * c.pp));

function expectPartition(groups: number[][], worldSize: number): void {
  const seen = groups.flat().sort((a, b) => a - b);
  expect(seen).toEqual(Array.from({ length: worldSize }, (_, i) => i));
}

function expectInvalid(fn: () => unknown, message: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(DistributedError);
  expect((caught as DistributedError).code).toBe('INVALID_ARGUMENT');
  expect((caught as DistributedError).message).toMatch(message);
  expect((caught as DistributedError).message).not.toContain('\n');
}

describe('generateMaskedOrthogonalRankGroups', () => {
  it('matches the worked example of Megatron docstring (sizes [2, 3, 4], dp masked)', () => {
    const groups = generateMaskedOrthogonalRankGroups(24, [2, 3, 4], [false, true, false]);
    expect(groups).toHaveLength(8);
    expect(groups[0]).toEqual([0, 2, 4]);
    expect(groups[1]).toEqual([1, 3, 5]);
    expect(groups[7]).toEqual([19, 21, 23]);
  });

  it('gives the dp groups of order tp-pp-dp with sizes 2-2-2', () => {
    expect(generateMaskedOrthogonalRankGroups(8, [2, 2, 2], [false, false, true])).toEqual([
      [0, 4],
      [1, 5],
      [2, 6],
      [3, 7],
    ]);
  });

  it('gives one group of everyone with every axis masked, and singletons with none', () => {
    expect(generateMaskedOrthogonalRankGroups(6, [2, 3], [true, true])).toEqual([[0, 1, 2, 3, 4, 5]]);
    expect(generateMaskedOrthogonalRankGroups(6, [2, 3], [false, false])).toEqual([
      [0],
      [1],
      [2],
      [3],
      [4],
      [5],
    ]);
  });

  it('rejects mismatched lengths, sizes that do not multiply to the world, and bad sizes', () => {
    expectInvalid(() => generateMaskedOrthogonalRankGroups(4, [2, 2], [true]), /2 sizes but 1 mask entries/);
    expectInvalid(
      () => generateMaskedOrthogonalRankGroups(8, [2, 2], [true, false]),
      /world size 8 is not the product of the sizes \[2,2\] = 4/,
    );
    expectInvalid(
      () => generateMaskedOrthogonalRankGroups(0, [0, 2], [true, false]),
      /parallelSizes\[0\] must be a positive integer, got 0/,
    );
  });
});

describe('RankGenerator', () => {
  it('reproduces the docstring layout of 16 ranks with TP 2, PP 4, DP 2', () => {
    const gen = new RankGenerator({ tp: 2, ep: 1, dp: 2, pp: 4, cp: 1 });
    expect(gen.worldSize).toBe(16);
    expect(gen.getRanks('tp')).toEqual([
      [0, 1],
      [2, 3],
      [4, 5],
      [6, 7],
      [8, 9],
      [10, 11],
      [12, 13],
      [14, 15],
    ]);
    expect(gen.getRanks('dp')).toEqual([
      [0, 2],
      [1, 3],
      [4, 6],
      [5, 7],
      [8, 10],
      [9, 11],
      [12, 14],
      [13, 15],
    ]);
    expect(gen.getRanks('pp')).toEqual([
      [0, 4, 8, 12],
      [1, 5, 9, 13],
      [2, 6, 10, 14],
      [3, 7, 11, 15],
    ]);
    expect(gen.getRanks('tp-pp')).toEqual([
      [0, 1, 4, 5, 8, 9, 12, 13],
      [2, 3, 6, 7, 10, 11, 14, 15],
    ]);
  });

  it('reads a token whatever the order of its axes', () => {
    const gen = new RankGenerator({ tp: 2, ep: 1, dp: 2, pp: 2, cp: 2 });
    expect(gen.getRanks('cp-dp')).toEqual(gen.getRanks('dp-cp'));
    expect(gen.getRanks('pp-tp')).toEqual(gen.getRanks('tp-pp'));
  });

  it('appends the axes the order leaves out, with size 1, in the order Megatron does', () => {
    const gen = new RankGenerator({ tp: 2, ep: 1, dp: 4, pp: 1, cp: 1, order: 'TP-DP' });
    expect(gen.order).toBe('tp-dp-pp-ep-cp');
    expect(gen.orderedSizes).toEqual([2, 4, 1, 1, 1]);
    expect(gen.getRanks('dp')).toEqual([
      [0, 2, 4, 6],
      [1, 3, 5, 7],
    ]);
    expect(gen.getRanks('cp')).toEqual([[0], [1], [2], [3], [4], [5], [6], [7]]);
  });

  it('adds rankOffset to every rank', () => {
    const gen = new RankGenerator({ tp: 2, ep: 1, dp: 2, pp: 1, cp: 1, rankOffset: 8 });
    expect(gen.getRanks('tp')).toEqual([
      [8, 9],
      [10, 11],
    ]);
    expect(gen.getRanks('dp')).toEqual([
      [8, 10],
      [9, 11],
    ]);
  });

  it('rejects ep > 1 with cp > 1, bad orders, unknown tokens and bad sizes', () => {
    expectInvalid(
      () => new RankGenerator({ tp: 1, ep: 2, dp: 1, pp: 1, cp: 2 }),
      /^RankGenerator: ep 2 and cp 2 are both > 1 in one generator; build the dense grid with ep 1/,
    );
    expectInvalid(
      () => new RankGenerator({ tp: 2, ep: 1, dp: 2, pp: 2, cp: 1, order: 'tp-dp' }),
      /pp has size 2 but the order 'tp-dp' does not name it; add pp to the order/,
    );
    expectInvalid(
      () => new RankGenerator({ tp: 2, ep: 1, dp: 1, pp: 1, cp: 1, order: 'tp-xp-dp' }),
      /order 'tp-xp-dp' has an unknown axis 'xp'/,
    );
    expectInvalid(
      () => new RankGenerator({ tp: 2, ep: 1, dp: 1, pp: 1, cp: 1, order: 'tp-dp-tp' }),
      /order 'tp-dp-tp' names tp twice/,
    );
    expectInvalid(
      () => new RankGenerator({ tp: 0, ep: 1, dp: 1, pp: 1, cp: 1 }),
      /tp must be a positive integer, got 0/,
    );
    expectInvalid(
      () => new RankGenerator({ tp: 1, ep: 1, dp: 1.5, pp: 1, cp: 1 }),
      /dp must be a positive integer/,
    );
    expectInvalid(
      () => new RankGenerator({ tp: 1, ep: 1, dp: 1, pp: 1, cp: 1, rankOffset: -1 }),
      /rankOffset must be a non-negative integer/,
    );
    const gen = new RankGenerator({ tp: 2, ep: 1, dp: 1, pp: 1, cp: 1 });
    expectInvalid(() => gen.getRanks('tp-xx'), /unknown axis 'xx' in 'tp-xx'/);
    expectInvalid(() => gen.getRanks(''), /unknown axis ''/);
  });
});

describe('computeParallelGroups', () => {
  it('reproduces the docstring layout of 16 ranks with TP 2, PP 4 (DP 2)', () => {
    const g = computeParallelGroups(16, { tp: 2, pp: 4 });
    expect(g.sizes).toEqual({ tp: 2, pp: 4, cp: 1, dp: 2, ep: 1, etp: 2, expertDp: 2 });
    expect(g.order).toBe('tp-cp-ep-dp-pp');
    expect(g.tp).toEqual([
      [0, 1],
      [2, 3],
      [4, 5],
      [6, 7],
      [8, 9],
      [10, 11],
      [12, 13],
      [14, 15],
    ]);
    expect(g.dp).toEqual([
      [0, 2],
      [1, 3],
      [4, 6],
      [5, 7],
      [8, 10],
      [9, 11],
      [12, 14],
      [13, 15],
    ]);
    expect(g.pp).toEqual([
      [0, 4, 8, 12],
      [1, 5, 9, 13],
      [2, 6, 10, 14],
      [3, 7, 11, 15],
    ]);
    expect(g.tpPp).toEqual([
      [0, 1, 4, 5, 8, 9, 12, 13],
      [2, 3, 6, 7, 10, 11, 14, 15],
    ]);
    expect(g.embedding).toEqual([
      [0, 12],
      [1, 13],
      [2, 14],
      [3, 15],
    ]);
    expect(g.positionEmbedding).toEqual([[0], [1], [2], [3]]);
    // Without CP the CP-including groups equal their CP-less twins and cp groups are singletons.
    expect(g.dpCp).toEqual(g.dp);
    expect(g.tpCp).toEqual(g.tp);
    expect(g.tpDpCp).toEqual(g.tpDp);
    expect(g.cp).toEqual(Array.from({ length: 16 }, (_, i) => [i]));
    expect(g.tpDp).toEqual([
      [0, 1, 2, 3],
      [4, 5, 6, 7],
      [8, 9, 10, 11],
      [12, 13, 14, 15],
    ]);
  });

  it('lays out context parallelism: 8 ranks with TP 2, CP 2, DP 2', () => {
    const g = computeParallelGroups(8, { tp: 2, cp: 2 });
    expect(g.sizes.dp).toBe(2);
    expect(g.cp).toEqual([
      [0, 2],
      [1, 3],
      [4, 6],
      [5, 7],
    ]);
    expect(g.dp).toEqual([
      [0, 4],
      [1, 5],
      [2, 6],
      [3, 7],
    ]);
    expect(g.dpCp).toEqual([
      [0, 2, 4, 6],
      [1, 3, 5, 7],
    ]);
    expect(g.tpCp).toEqual([
      [0, 1, 2, 3],
      [4, 5, 6, 7],
    ]);
    expect(g.tpDpCp).toEqual([[0, 1, 2, 3, 4, 5, 6, 7]]);
    // The expert grid has no CP: its data-parallel groups span the dense CP ranks as well.
    expect(g.expertDp).toEqual(g.dpCp);
  });

  it('matches the docstring CP example: 8 ranks with TP 4, CP 2', () => {
    expect(computeParallelGroups(8, { tp: 4, cp: 2 }).cp).toEqual([
      [0, 4],
      [1, 5],
      [2, 6],
      [3, 7],
    ]);
  });

  it('gives the embedding group of a single stage as that rank alone', () => {
    const g = computeParallelGroups(4, { tp: 2 });
    expect(g.embedding).toEqual([[0], [1], [2], [3]]);
    expect(g.positionEmbedding).toEqual([[0], [1], [2], [3]]);
  });

  describe('expert grid (rank = tp + TP·(ep + EP·(dp + DP·pp)) with tp = etp)', () => {
    const cases = [
      { world: 8, tp: 2, pp: 1, ep: 2, etp: 1 },
      { world: 8, tp: 2, pp: 1, ep: 4, etp: 1 },
      { world: 8, tp: 1, pp: 2, ep: 2, etp: 2 },
      { world: 16, tp: 2, pp: 2, ep: 2, etp: 2 },
      { world: 12, tp: 1, pp: 1, ep: 3, etp: 2 },
    ];
    for (const c of cases) {
      it(`world ${c.world}, tp ${c.tp}, pp ${c.pp}, ep ${c.ep}, etp ${c.etp}`, () => {
        const g = computeParallelGroups(c.world, c);
        const s = { tp: c.etp, ep: c.ep, dp: c.world / (c.etp * c.ep * c.pp), pp: c.pp };
        const rank = expertRank(s);
        expect(g.sizes.expertDp).toBe(s.dp);
        expect(g.ep).toEqual(bruteGroups(s, ['ep'], rank));
        expect(g.expertTp).toEqual(bruteGroups(s, ['tp'], rank));
        expect(g.tpEp).toEqual(bruteGroups(s, ['tp', 'ep'], rank));
        expect(g.tpEpPp).toEqual(bruteGroups(s, ['tp', 'ep', 'pp'], rank));
        expect(g.expertDp).toEqual(bruteGroups(s, ['dp'], rank));
      });
    }

    it('spells out 8 ranks with tp 2, ep 2, etp 1', () => {
      const g = computeParallelGroups(8, { tp: 2, ep: 2, etp: 1 });
      expect(g.ep).toEqual([
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
      ]);
      expect(g.expertTp).toEqual([[0], [1], [2], [3], [4], [5], [6], [7]]);
      expect(g.tpEp).toEqual(g.ep);
      expect(g.expertDp).toEqual([
        [0, 2, 4, 6],
        [1, 3, 5, 7],
      ]);
    });

    it('spells out 8 ranks with tp 2, ep 4, etp 1', () => {
      const g = computeParallelGroups(8, { tp: 2, ep: 4, etp: 1 });
      expect(g.ep).toEqual([
        [0, 1, 2, 3],
        [4, 5, 6, 7],
      ]);
      expect(g.expertDp).toEqual([
        [0, 4],
        [1, 5],
        [2, 6],
        [3, 7],
      ]);
    });

    it('spells out 8 ranks with tp 1, pp 2, ep 2, etp 2', () => {
      const g = computeParallelGroups(8, { tp: 1, pp: 2, ep: 2, etp: 2 });
      expect(g.ep).toEqual([
        [0, 2],
        [1, 3],
        [4, 6],
        [5, 7],
      ]);
      expect(g.expertTp).toEqual([
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
      ]);
      expect(g.tpEp).toEqual([
        [0, 1, 2, 3],
        [4, 5, 6, 7],
      ]);
      expect(g.tpEpPp).toEqual([[0, 1, 2, 3, 4, 5, 6, 7]]);
      expect(g.expertDp).toEqual([[0], [1], [2], [3], [4], [5], [6], [7]]);
      expect(g.pp).toEqual([
        [0, 4],
        [1, 5],
        [2, 6],
        [3, 7],
      ]);
    });

    it('defaults etp to tp', () => {
      const g = computeParallelGroups(8, { tp: 2, ep: 2 });
      expect(g.sizes.etp).toBe(2);
      expect(g.expertTp).toEqual(g.tp);
    });
  });

  it('follows rank = tp + TP·(cp + CP·(dp + DP·pp)) and partitions the world for every kind', () => {
    let layouts = 0;
    for (const tp of [1, 2, 3]) {
      for (const cp of [1, 2]) {
        for (const pp of [1, 2, 3]) {
          for (const dp of [1, 2, 4]) {
            const world = tp * cp * pp * dp;
            const g = computeParallelGroups(world, { tp, cp, pp });
            const s = { tp, cp, dp, pp };
            const rank = denseRank(s);
            expect(g.sizes.dp).toBe(dp);
            expect(g.tp).toEqual(bruteGroups(s, ['tp'], rank));
            expect(g.cp).toEqual(bruteGroups(s, ['cp'], rank));
            expect(g.dp).toEqual(bruteGroups(s, ['dp'], rank));
            expect(g.pp).toEqual(bruteGroups(s, ['pp'], rank));
            expect(g.dpCp).toEqual(bruteGroups(s, ['dp', 'cp'], rank));
            expect(g.tpPp).toEqual(bruteGroups(s, ['tp', 'pp'], rank));
            expect(g.tpCp).toEqual(bruteGroups(s, ['tp', 'cp'], rank));
            expect(g.tpDp).toEqual(bruteGroups(s, ['tp', 'dp'], rank));
            expect(g.tpDpCp).toEqual(bruteGroups(s, ['tp', 'dp', 'cp'], rank));
            for (const kind of GROUP_KINDS) {
              if (kind === 'embedding' || kind === 'positionEmbedding') continue;
              expectPartition(g[kind], world);
            }
            layouts++;
          }
        }
      }
    }
    expect(layouts).toBe(54);
  });

  it('partitions the world in every expert kind over a sweep of ep and etp', () => {
    for (const [world, tp, pp, ep, etp] of [
      [16, 2, 2, 4, 1],
      [16, 4, 1, 2, 2],
      [24, 2, 3, 2, 2],
      [24, 1, 2, 3, 4],
      [32, 2, 2, 8, 1],
    ]) {
      const g: ParallelGroups = computeParallelGroups(world, { tp, pp, ep, etp });
      for (const kind of ['ep', 'expertTp', 'tpEp', 'tpEpPp', 'expertDp'] as const)
        expectPartition(g[kind], world);
      expect(g.ep.every((r) => r.length === ep)).toBe(true);
      expect(g.expertTp.every((r) => r.length === etp)).toBe(true);
      expect(g.expertDp.every((r) => r.length === world / (etp * ep * pp))).toBe(true);
    }
  });

  it('puts every rank in exactly one embedding group when each pipeline has one or two stages', () => {
    for (const pp of [1, 2]) {
      const g = computeParallelGroups(8, { tp: 2, pp });
      expectPartition(g.embedding, 8);
    }
    // Middle stages belong to no embedding group.
    const g = computeParallelGroups(8, { pp: 4 });
    expect(g.embedding.flat().sort((a, b) => a - b)).toEqual([0, 1, 6, 7]);
  });

  it('supports the tp-cp-ep-pp-dp order: rank = tp + TP·(cp + CP·(pp + PP·dp))', () => {
    const order = 'tp-cp-ep-pp-dp';
    for (const [world, tp, cp, pp] of [
      [8, 2, 1, 2],
      [16, 2, 2, 2],
      [12, 1, 2, 3],
    ]) {
      // With pp not last, Megatron needs equal dense and expert DP sizes, so etp = tp·cp here.
      const g = computeParallelGroups(world, { tp, cp, pp, etp: tp * cp, order });
      const s = { tp, cp, pp, dp: world / (tp * cp * pp) };
      const rank = (c: Coords) => c.tp + s.tp * (c.cp + s.cp * (c.pp + s.pp * c.dp));
      expect(g.order).toBe(order);
      expect(g.tp).toEqual(bruteGroups(s, ['tp'], rank));
      expect(g.cp).toEqual(bruteGroups(s, ['cp'], rank));
      expect(g.pp).toEqual(bruteGroups(s, ['pp'], rank));
      expect(g.dp).toEqual(bruteGroups(s, ['dp'], rank));
      expect(g.dpCp).toEqual(bruteGroups(s, ['dp', 'cp'], rank));
      expect(g.tpPp).toEqual(bruteGroups(s, ['tp', 'pp'], rank));
    }
    const g = computeParallelGroups(8, { tp: 2, pp: 2, order });
    expect(g.pp).toEqual([
      [0, 2],
      [1, 3],
      [4, 6],
      [5, 7],
    ]);
    expect(g.dp).toEqual([
      [0, 4],
      [1, 5],
      [2, 6],
      [3, 7],
    ]);
    // Experts with etp·ep = tp·cp keep the same pipeline stride and data-parallel size.
    const moe = computeParallelGroups(8, { tp: 2, pp: 2, ep: 2, etp: 1, order });
    expect(moe.pp).toEqual(g.pp);
    expect(moe.ep).toEqual([
      [0, 1],
      [2, 3],
      [4, 5],
      [6, 7],
    ]);
    expect(moe.expertDp).toEqual(g.dp);
  });

  describe('errors', () => {
    it('world size not divisible by tp·pp·cp', () => {
      expectInvalid(
        () => computeParallelGroups(6, { tp: 4 }),
        /^computeParallelGroups: world size 6 is not divisible by tp 4 × pp 1 × cp 1 = 4; use a world size that is a multiple of 4 or change tp\/pp\/cp$/,
      );
      expectInvalid(() => computeParallelGroups(8, { tp: 2, pp: 2, cp: 3 }), /tp 2 × pp 2 × cp 3 = 12/);
    });

    it('world size not divisible by etp·ep·pp', () => {
      expectInvalid(
        () => computeParallelGroups(8, { tp: 2, ep: 3, etp: 1 }),
        /^computeParallelGroups: world size 8 is not divisible by etp 1 × ep 3 × pp 1 = 3; use a world size that is a multiple of 3 or change etp\/ep\/pp$/,
      );
      expectInvalid(
        () => computeParallelGroups(8, { tp: 1, pp: 2, ep: 4, etp: 2 }),
        /etp 2 × ep 4 × pp 2 = 16/,
      );
    });

    it('non-positive or fractional sizes and world sizes', () => {
      expectInvalid(() => computeParallelGroups(8, { tp: 0 }), /tp must be a positive integer, got 0/);
      expectInvalid(() => computeParallelGroups(8, { pp: -2 }), /pp must be a positive integer, got -2/);
      expectInvalid(() => computeParallelGroups(8, { cp: 1.5 }), /cp must be a positive integer, got 1.5/);
      expectInvalid(() => computeParallelGroups(8, { ep: 0 }), /ep must be a positive integer/);
      expectInvalid(() => computeParallelGroups(8, { etp: -1 }), /etp must be a positive integer/);
      expectInvalid(() => computeParallelGroups(0), /world size must be a positive integer, got 0/);
    });

    it('an order that leaves out an axis of size > 1, or is malformed', () => {
      expectInvalid(
        () => computeParallelGroups(8, { tp: 2, cp: 2, order: 'tp-dp-pp' }),
        /^computeParallelGroups: cp has size 2 but the order 'tp-dp-pp' does not name it/,
      );
      expectInvalid(
        () => computeParallelGroups(8, { ep: 2, order: 'tp-cp-dp-pp' }),
        /ep has size 2 but the order 'tp-cp-dp-pp' does not name it/,
      );
      expectInvalid(() => computeParallelGroups(8, { order: 'tp-cp-ep-dp-pq' }), /unknown axis 'pq'/);
    });

    it('pp not last with different dense and expert data-parallel sizes', () => {
      expectInvalid(
        () => computeParallelGroups(8, { tp: 2, pp: 2, ep: 2, etp: 2, order: 'tp-cp-ep-pp-dp' }),
        /order 'tp-cp-ep-pp-dp' does not end with pp, so with pp 2 the expert data-parallel size 1 must equal the data-parallel size 2/,
      );
    });

    it('dense and expert grids with different pipeline groups', () => {
      expectInvalid(
        () => computeParallelGroups(8, { tp: 2, pp: 2, ep: 2, etp: 1, order: 'tp-pp-cp-ep-dp' }),
        /the dense and expert grids give different pipeline groups for order 'tp-pp-cp-ep-dp' \(first: \[0,2\] vs \[0,1\]\)/,
      );
    });

    it('ep > 1 with cp > 1 is fine across the two grids', () => {
      const g = computeParallelGroups(8, { tp: 1, cp: 2, ep: 2 });
      expect(g.cp).toEqual([
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
      ]);
      expect(g.ep).toEqual(g.cp);
    });
  });
});
