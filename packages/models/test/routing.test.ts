// The router's top-k on the scores' device (topkRouting) against its host reference
// (selectExperts): the same expert ids for every rule (plain top-k, the expert bias, group-limited
// routing with and without it), with scores drawn from a few values so that ties are common; and
// the dropless routing map built on the device (routingMapOnDevice) against the host's
// (buildRoutingMap), and the same with a capacity (capacityRoutingMapOnDevice: both drop policies,
// with and without padding, weights with many ties): on the CPU, on the pure-TypeScript reference
// backend and on the CUDA kernels run by their emulator.
import type { MoeConfig } from '@megapatch/convert';
import { fromTypedArray, getBackend, type Tensor } from '@megapatch/tensor';
import { registerReferenceBackend } from '@megapatch/tensor/reference';
import { describe, expect, it } from 'vitest';
import { selectExperts, topkRouting } from '../src/index.js';
import {
  buildRoutingMap,
  capacityRoutingMapOnDevice,
  readInts,
  routingMapOnDevice,
} from '../src/moe/routing-map.js';
import { recordReads } from './helpers/reads.js';

registerReferenceBackend();

/** Why the CUDA emulator could not be registered (its addon is built with @megapatch/cuda), or null. */
let emulator: string | null = null;
try {
  await import('@megapatch/cuda/emulator');
} catch (e) {
  emulator = (e as Error).message.split('\n')[0];
}

type Rule = Pick<MoeConfig, 'numExperts' | 'routerTopk' | 'numGroups' | 'groupTopk' | 'expertBias'>;

const RULES: [string, Rule][] = [
  [
    'Mixtral: 8 experts, top-2',
    { numExperts: 8, routerTopk: 2, numGroups: 1, groupTopk: 1, expertBias: false },
  ],
  [
    'Moonlight-like: 64, top-6',
    { numExperts: 64, routerTopk: 6, numGroups: 1, groupTopk: 1, expertBias: false },
  ],
  ['expert bias: 16, top-4', { numExperts: 16, routerTopk: 4, numGroups: 1, groupTopk: 1, expertBias: true }],
  [
    'DeepSeek-V3-like: 32 in 8 groups, best 4 by their top-2 sums, top-8, bias',
    { numExperts: 32, routerTopk: 8, numGroups: 8, groupTopk: 4, expertBias: true },
  ],
  [
    'DeepSeek-V2-like: 16 in 4 groups, best group by its best score, top-3',
    { numExperts: 16, routerTopk: 3, numGroups: 4, groupTopk: 1, expertBias: false },
  ],
];

/** T·n values from a small LCG: `levels` distinct ones (many ties) or near-continuous ones. */
function draw(n: number, seed: number, levels: number): Float32Array {
  let a = seed;
  return Float32Array.from({ length: n }, () => {
    a = (a * 1103515245 + 12345) % 2147483648;
    return Math.floor((a / 2147483648) * levels) / levels;
  });
}

/** Each token's k distinct experts [T·k], from a permutation drawn per token. */
function drawIds(T: number, E: number, k: number): Int32Array {
  const ids = new Int32Array(T * k);
  let a = T * 31 + E;
  for (let t = 0; t < T; t++) {
    const perm = Array.from({ length: E }, (_, e) => e);
    for (let i = E - 1; i > 0; i--) {
      a = (a * 1103515245 + 12345) % 2147483648;
      const j = a % (i + 1);
      [perm[i], perm[j]] = [perm[j], perm[i]];
    }
    ids.set(perm.slice(0, k), t * k);
  }
  return ids;
}

function ids(t: Tensor): number[] {
  return Array.from(t.to('int32').toTypedArray() as Int32Array);
}

const DEVICES: [string, string | null][] = [
  ['cpu', null],
  ['ref:0', null],
  ['cudaemu:0', emulator],
];

describe.each(DEVICES)('topkRouting on %s', (device, unavailable) => {
  if (unavailable !== null) it.skip(`${device}: ${unavailable}`, () => {});
  it.runIf(unavailable === null).each(RULES)('%s: the host reference ids', (_name, m) => {
    const T = 97;
    const E = m.numExperts;
    for (const [seed, levels] of [
      [1, 8],
      [2, 1 << 20],
    ]) {
      const scores = draw(T * E, seed, levels);
      const bias = m.expertBias ? draw(E, seed + 7, 4).map((b) => b / 4) : null;
      const want = Array.from(selectExperts(scores, bias, T, m));
      const got = topkRouting(
        fromTypedArray(scores, [T, E], { device }),
        bias ? fromTypedArray(bias, [E], { device }) : null,
        m,
      );
      expect(got.device).toBe(device);
      expect(got.shape).toEqual([T, m.routerTopk]);
      expect(ids(got), `seed ${seed}, ${levels} levels`).toEqual(want);
    }
  });
});

describe.each(DEVICES)('routingMapOnDevice on %s', (device, unavailable) => {
  if (unavailable !== null) it.skip(`${device}: ${unavailable}`, () => {});
  it.runIf(unavailable === null).each([
    [0, 4, 2],
    [1, 8, 2],
    [37, 8, 2],
    [97, 64, 6],
    [300, 16, 5],
  ])('%i tokens, %i experts, top-%i: the host map, pair by pair', (T, E, k) => {
    const ids = drawIds(T, E, k);
    const want = buildRoutingMap(ids, T, E, null, () => new Float32Array());
    const got = routingMapOnDevice(
      fromTypedArray(
        BigInt64Array.from(ids, (v) => BigInt(v)),
        [T, k],
        { device },
      ),
      E,
    );
    for (const t of [got.token, got.slot, got.counts]) expect(t.device).toBe(device);
    expect(Array.from(readInts(got.counts))).toEqual(Array.from(want.counts));
    expect(Array.from(readInts(got.token))).toEqual(Array.from(want.token));
    expect(Array.from(readInts(got.slot))).toEqual(Array.from(want.slot));
  });
});

describe('selectExperts', () => {
  it('takes the lower id on ties, and restricts the choice to the best groups', () => {
    const m: Rule = { numExperts: 8, routerTopk: 3, numGroups: 4, groupTopk: 2, expertBias: false };
    // groups by their best score: g0 0.5, g1 0.9, g2 0.9, g3 0.2 → g1 and g2 (equal, both kept)
    const scores = Float32Array.from([0.5, 0.5, 0.9, 0.1, 0.9, 0.9, 0.2, 0.2]);
    expect(Array.from(selectExperts(scores, null, 1, m))).toEqual([2, 4, 5]);
    // the best group only: g1 and g2 tie at 0.9 → g1, whose experts are 2 and 3
    const one = { ...m, routerTopk: 2, groupTopk: 1 };
    expect(Array.from(selectExperts(scores, null, 1, one))).toEqual([2, 3]);
    expect(ids(topkRouting(fromTypedArray(scores, [1, 8]), null, one))).toEqual([2, 3]);
  });
});

describe.each(DEVICES)('capacityRoutingMapOnDevice on %s', (device, unavailable) => {
  if (unavailable !== null) it.skip(`${device}: ${unavailable}`, () => {});
  it.runIf(unavailable === null).each([
    [0, 4, 2],
    [1, 8, 2],
    [6, 4, 2],
    [37, 8, 2],
    [97, 64, 6],
    [300, 16, 5],
  ])('%i tokens, %i experts, top-%i: the host map for each policy, factor and padding', (T, E, k) => {
    const idx = drawIds(T, E, k);
    const ids = fromTypedArray(
      BigInt64Array.from(idx, (v) => BigInt(v)),
      [T, k],
      { device },
    );
    for (const capacityFactor of [0.25, 0.5, 1, 1.5, 100]) {
      for (const levels of [4, 1 << 20]) {
        const w = draw(T * k, T + capacityFactor * 10 + levels, levels);
        const weights = fromTypedArray(w, [T, k], { device });
        for (const dropPolicy of ['probs', 'position'] as const) {
          for (const padToCapacity of [false, true]) {
            const capacity = { capacityFactor, dropPolicy, padToCapacity };
            const what = `factor ${capacityFactor}, ${levels} levels, ${dropPolicy}, pad ${padToCapacity}`;
            const want = buildRoutingMap(idx, T, E, capacity, () => w);
            const reads: string[] = [];
            const stop = recordReads(getBackend(device), (t) => {
              // float64 [2]: the deferred index checks, read with the counts
              if (t.dtype !== 'float64') reads.push(`${t.dtype}[${t.shape}]`);
            });
            let got: ReturnType<typeof capacityRoutingMapOnDevice>;
            try {
              got = capacityRoutingMapOnDevice(ids, weights, E, capacity);
            } finally {
              stop();
            }
            // with padding every expert's count is known: nothing read; without, the counts once
            expect(reads, what).toEqual(padToCapacity || T === 0 ? [] : [`int32[${E}]`]);
            const { map, kept, routed } = got;
            for (const t of [map.device?.token, map.device?.slot, kept, routed])
              expect(t?.device).toBe(device);
            expect(map.capacity, what).toBe(want.capacity);
            expect(map.padded, what).toBe(padToCapacity);
            expect(Array.from(map.counts), what).toEqual(Array.from(want.counts));
            expect(Array.from(map.token), what).toEqual(Array.from(want.token));
            expect(Array.from(map.slot), what).toEqual(Array.from(want.slot));
            // the kept choices (the load) and the choices before dropping (the balancing loss's)
            const keptWant = new Array<number>(E).fill(0);
            let p = 0;
            for (let e = 0; e < E; e++)
              for (let i = 0; i < want.counts[e]; i++, p++) if (want.slot[p] >= 0) keptWant[e]++;
            expect(Array.from(readInts(kept)), what).toEqual(keptWant);
            const routedWant = new Array<number>(E).fill(0);
            for (const e of idx) routedWant[e]++;
            expect(Array.from(readInts(routed)), what).toEqual(routedWant);
            for (const t of [map.device?.token, map.device?.slot, kept, routed]) t?.dispose();
          }
        }
      }
    }
    ids.dispose();
  });
});
