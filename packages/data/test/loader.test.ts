import { describe, expect, it } from 'vitest';
import {
  type CollatedBatch,
  DataError,
  DataLoader,
  GPTDataset,
  globalBatches,
  globalBatchesSync,
  type LoaderState,
  type LowLevelDataset,
  MegatronPretrainingRandomSampler,
  MegatronPretrainingSampler,
  type NumericArray,
  numMicrobatches,
} from '../src/index.js';

/** Sample i is {x: [i, i]}, so a batch's indices can be read back from its data. */
function toyDataset(length: number) {
  return { length, getItem: (i: number) => ({ x: Int32Array.from([i, i]) }) };
}

/** The sample indices of a collated toy batch: every row is [i, i]. */
function rows(batch: CollatedBatch): number[] {
  const { data, shape } = batch.x;
  return Array.from({ length: shape[0] }, (_, r) => Number(data[r * shape[1]]));
}

/** A collated field's values as plain numbers. */
function values(data: NumericArray): number[] {
  return Array.from(data as ArrayLike<number | bigint>, Number);
}

function sampler(
  rank: number,
  size: number,
  opts: { total?: number; consumed?: number; mbs?: number; dropLast?: boolean } = {},
) {
  return new MegatronPretrainingSampler({
    totalSamples: opts.total ?? 40,
    consumedSamples: opts.consumed ?? 0,
    microBatchSize: opts.mbs ?? 2,
    dataParallelRank: rank,
    dataParallelSize: size,
    dropLast: opts.dropLast,
  });
}

function expectDataError(fn: () => unknown, code = 'INVALID_ARGUMENT'): void {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(DataError);
    expect((err as DataError).code).toBe(code);
    return;
  }
  throw new Error('expected a DataError');
}

describe('MegatronPretrainingSampler', () => {
  for (const size of [2, 4]) {
    it(`gives ${size} ranks contiguous, disjoint slices covering each global group`, () => {
      const mbs = 3;
      const perRank = Array.from({ length: size }, (_, r) => [...sampler(r, size, { total: 50, mbs })]);
      const group = mbs * size;
      const steps = Math.floor(50 / group);
      for (const batches of perRank) expect(batches).toHaveLength(steps);
      for (let s = 0; s < steps; s++) {
        const union: number[] = [];
        for (let r = 0; r < size; r++) {
          const b = perRank[r][s];
          // Rank r owns [r*mbs, (r+1)*mbs) of the group.
          expect(b).toEqual(Array.from({ length: mbs }, (_, k) => s * group + r * mbs + k));
          union.push(...b);
        }
        expect(union).toEqual(Array.from({ length: group }, (_, k) => s * group + k));
      }
    });
  }

  it('drops the last incomplete group by default and slices it like Megatron otherwise', () => {
    // 11 samples, group of 4: groups [0..3], [4..7], remainder [8, 9, 10].
    expect([...sampler(0, 2, { total: 11 })]).toEqual([
      [0, 1],
      [4, 5],
    ]);
    expect([...sampler(1, 2, { total: 11 })]).toEqual([
      [2, 3],
      [6, 7],
    ]);
    expect([...sampler(0, 2, { total: 11, dropLast: false })]).toEqual([
      [0, 1],
      [4, 5],
      [8, 9],
    ]);
    expect([...sampler(1, 2, { total: 11, dropLast: false })]).toEqual([[2, 3], [6, 7], [10]]);
    // With 4 ranks the remainder [8, 9, 10] leaves rank 3 an empty slice, as Python's batch[6:8].
    expect([...sampler(3, 4, { total: 11, mbs: 2, dropLast: false })].at(-1)).toEqual([]);
  });

  it('starts at consumedSamples', () => {
    expect([...sampler(1, 2, { total: 16, consumed: 8 })]).toEqual([
      [10, 11],
      [14, 15],
    ]);
  });

  it('validates its arguments like Megatron', () => {
    expectDataError(() => sampler(0, 2, { total: 10, consumed: 10 }));
    expectDataError(() => sampler(2, 2));
    expectDataError(() => sampler(0, 0));
    expectDataError(() => sampler(0, 2, { mbs: 0 }));
    expectDataError(() => sampler(0, 2, { total: 0 }));
    expectDataError(() => sampler(-1, 2));
  });
});

describe('MegatronPretrainingRandomSampler', () => {
  const make = (rank: number, consumed = 0) =>
    new MegatronPretrainingRandomSampler({
      totalSamples: 21,
      consumedSamples: consumed,
      microBatchSize: 2,
      dataParallelRank: rank,
      dataParallelSize: 2,
    });
  const take = (it: Iterable<number[]>, n: number) => {
    const out: number[][] = [];
    for (const b of it) {
      out.push(b);
      if (out.length === n) break;
    }
    return out;
  };

  it('shuffles each rank bucket per epoch and cycles over epochs', () => {
    // 21 samples, group 4: buckets of 10 per rank ([0,10) and [10,20)); sample 20 is never used.
    const r0 = take(make(0), 10);
    const r1 = take(make(1), 10);
    const epoch0 = r0.slice(0, 5).flat();
    expect([...epoch0].sort((a, b) => a - b)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect([...r1.slice(0, 5).flat()].sort((a, b) => a - b)).toEqual([
      10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
    ]);
    expect(r0.slice(5).flat()).not.toEqual(epoch0);
    expect([...r0.slice(5).flat()].sort((a, b) => a - b)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  });

  it('resumes at consumedSamples mid-epoch and across epochs', () => {
    const full = take(make(1), 12);
    expect(take(make(1, 3 * 4), 9)).toEqual(full.slice(3));
    expect(take(make(1, 7 * 4), 5)).toEqual(full.slice(7));
  });

  it('rejects consumedSamples off the group grid', () => {
    expectDataError(() => make(0, 3));
  });
});

describe('DataLoader', () => {
  it('collates micro-batches into [mbs, seq] and counts global samples', () => {
    const loader = new DataLoader({
      dataset: toyDataset(40),
      sampler: sampler(1, 4, { mbs: 2 }),
      prefetch: 0,
    });
    const first = loader.nextSync();
    expect(first.done).toBe(false);
    const batch = first.value as CollatedBatch;
    expect(batch.x.shape).toEqual([2, 2]);
    expect(batch.x.data).toBeInstanceOf(Int32Array);
    expect(values(batch.x.data)).toEqual([2, 2, 3, 3]);
    expect(loader.consumedSamples).toBe(8);
    loader.nextSync();
    expect(loader.consumedSamples).toBe(16);
    const rest = [...loader];
    expect(rest).toHaveLength(3);
    expect(loader.consumedSamples).toBe(40);
    expect(loader.nextSync().done).toBe(true);
  });

  it('counts only existing samples for a short last group (dropLast=false)', () => {
    const loader = new DataLoader({
      dataset: toyDataset(11),
      sampler: sampler(1, 2, { total: 11, dropLast: false }),
    });
    expect([...loader].map(rows)).toEqual([[2, 3], [6, 7], [10]]);
    expect(loader.consumedSamples).toBe(11);
  });

  it('yields the same batches with and without prefetch', async () => {
    const plain = new DataLoader({
      dataset: toyDataset(40),
      sampler: sampler(0, 2, { mbs: 3 }),
      prefetch: 0,
    });
    const expected = [...plain].map(rows);
    const prefetched = new DataLoader({
      dataset: toyDataset(40),
      sampler: sampler(0, 2, { mbs: 3 }),
      prefetch: 3,
    });
    const got: number[][] = [];
    for await (const b of prefetched) {
      got.push(rows(b));
      // Give the background callbacks time to run ahead of the consumer.
      await new Promise((r) => setImmediate(r));
    }
    expect(got).toEqual(expected);
    expect(prefetched.consumedSamples).toBe(plain.consumedSamples);
  });

  it('builds batches ahead in the background without counting them as consumed', async () => {
    const built: number[] = [];
    const dataset = {
      length: 40,
      getItem: (i: number) => {
        built.push(i);
        return { x: Int32Array.from([i, i]) };
      },
    };
    const loader = new DataLoader({ dataset, sampler: sampler(0, 2), prefetch: 2 });
    for (let k = 0; k < 5; k++) await new Promise((r) => setImmediate(r));
    // Two micro-batches of two samples each, built before anyone asked.
    expect(built).toEqual([0, 1, 4, 5]);
    expect(loader.consumedSamples).toBe(0);
    expect(loader.stateDict().consumedSamples).toBe(0);
    loader.close();
  });

  it('resumes exactly from a JSON state after k steps', async () => {
    for (const size of [2, 4]) {
      for (let rank = 0; rank < size; rank++) {
        const full = [
          ...new DataLoader({ dataset: toyDataset(60), sampler: sampler(rank, size, { total: 60 }) }),
        ].map(rows);
        const k = 3;
        const first = new DataLoader({
          dataset: toyDataset(60),
          sampler: sampler(rank, size, { total: 60 }),
          prefetch: 2,
        });
        for (let i = 0; i < k; i++) await first.next();
        // Let prefetch run ahead: the saved state must still point at step k.
        await new Promise((r) => setImmediate(r));
        const state = JSON.parse(JSON.stringify(first.stateDict())) as LoaderState;
        expect(state).toEqual({
          consumedSamples: k * 2 * size,
          totalSamples: 60,
          microBatchSize: 2,
          dataParallelRank: rank,
          dataParallelSize: size,
          dropLast: true,
          sampler: 'pretraining',
        });
        const resumed = DataLoader.fromState(state, toyDataset(60));
        expect([...resumed].map(rows)).toEqual(full.slice(k));
        // loadStateDict rewinds an existing loader as well, dropping its prefetched batches.
        const rewound = new DataLoader({
          dataset: toyDataset(60),
          sampler: sampler(rank, size, { total: 60 }),
        });
        rewound.nextSync();
        rewound.nextSync();
        rewound.nextSync();
        rewound.nextSync();
        rewound.loadStateDict(state);
        expect([...rewound].map(rows)).toEqual(full.slice(k));
      }
    }
  });

  it('resumes the random sampler from state', () => {
    const make = () =>
      new MegatronPretrainingRandomSampler({
        totalSamples: 24,
        consumedSamples: 0,
        microBatchSize: 2,
        dataParallelRank: 1,
        dataParallelSize: 2,
      });
    const a = new DataLoader({ dataset: toyDataset(24), sampler: make(), prefetch: 0 });
    const full = Array.from({ length: 10 }, () => rows(a.nextSync().value as CollatedBatch));
    const b = new DataLoader({ dataset: toyDataset(24), sampler: make() });
    for (let i = 0; i < 4; i++) b.nextSync();
    const state = JSON.parse(JSON.stringify(b.stateDict())) as LoaderState;
    expect(state.sampler).toBe('pretraining-random');
    const resumed = DataLoader.fromState(state, toyDataset(24));
    expect(Array.from({ length: 6 }, () => rows(resumed.nextSync().value as CollatedBatch))).toEqual(
      full.slice(4),
    );
    b.close();
    resumed.close();
  });

  it('rejects a state of another layout and a malformed state', () => {
    const loader = new DataLoader({ dataset: toyDataset(40), sampler: sampler(0, 2) });
    expectDataError(() => loader.loadStateDict({ ...loader.stateDict(), dataParallelSize: 4 }));
    expectDataError(() =>
      loader.loadStateDict({ ...loader.stateDict(), sampler: 'nope' } as unknown as LoaderState),
    );
    expectDataError(() =>
      DataLoader.fromState({ ...loader.stateDict(), consumedSamples: 40 }, toyDataset(40)),
    );
    expectDataError(() => new DataLoader({ dataset: toyDataset(10), sampler: sampler(0, 2) }));
    loader.close();
  });

  it('reports a failing getItem when that batch is reached', async () => {
    const dataset = {
      length: 40,
      getItem: (i: number) => {
        if (i === 4) throw new DataError('INDEX_OUT_OF_RANGE', 'boom');
        return { x: Int32Array.from([i, i]) };
      },
    };
    const loader = new DataLoader({ dataset, sampler: sampler(0, 2), prefetch: 2 });
    await new Promise((r) => setImmediate(r));
    expect(rows((await loader.next()).value as CollatedBatch)).toEqual([0, 1]);
    await expect(loader.next()).rejects.toThrow('boom');
  });
});

describe('globalBatches', () => {
  it('validates num_microbatches like Megatron', () => {
    expect(numMicrobatches({ globalBatchSize: 16, microBatchSize: 2, dataParallelSize: 2 })).toBe(4);
    expectDataError(() => numMicrobatches({ globalBatchSize: 10, microBatchSize: 2, dataParallelSize: 4 }));
    expectDataError(() => numMicrobatches({ globalBatchSize: 0, microBatchSize: 2, dataParallelSize: 1 }));
    const loader = new DataLoader({ dataset: toyDataset(40), sampler: sampler(0, 2) });
    expectDataError(() =>
      globalBatches(loader, { globalBatchSize: 16, microBatchSize: 4, dataParallelSize: 2 }),
    );
    expectDataError(() =>
      globalBatchesSync(loader, { globalBatchSize: 6, microBatchSize: 2, dataParallelSize: 2 }),
    );
    loader.close();
  });

  it('groups micro-batches per step and advances consumedSamples by the global batch size', async () => {
    const options = { globalBatchSize: 8, microBatchSize: 2, dataParallelSize: 2 };
    const perRank: number[][][] = [];
    for (const rank of [0, 1]) {
      const loader = new DataLoader({ dataset: toyDataset(40), sampler: sampler(rank, 2, { total: 40 }) });
      const steps: number[][] = [];
      for await (const step of globalBatches(loader, options)) {
        expect(step).toHaveLength(2);
        steps.push(step.flatMap(rows));
        expect(loader.consumedSamples).toBe(steps.length * 8);
      }
      // 40 samples = 10 micro-batch steps = 5 global steps.
      expect(steps).toHaveLength(5);
      perRank.push(steps);
    }
    for (let s = 0; s < 5; s++) {
      const union = [...perRank[0][s], ...perRank[1][s]].sort((a, b) => a - b);
      expect(union).toEqual(Array.from({ length: 8 }, (_, k) => s * 8 + k));
    }
  });

  it('drops an incomplete last step (sync)', () => {
    const loader = new DataLoader({
      dataset: toyDataset(20),
      sampler: sampler(0, 2, { total: 20 }),
      prefetch: 0,
    });
    // 5 micro-batch steps, 2 per global step: the fifth is dropped.
    expect([
      ...globalBatchesSync(loader, { globalBatchSize: 8, microBatchSize: 2, dataParallelSize: 2 }),
    ]).toHaveLength(2);
  });
});

describe('DataLoader over GPTDataset', () => {
  it('yields GPT batches of shape [mbs, seqLength]', () => {
    const lengths = [7, 12, 5, 9, 20, 3, 11, 8];
    const dataset: LowLevelDataset = {
      sequenceLengths: Int32Array.from(lengths),
      documentIndices: Float64Array.from({ length: lengths.length + 1 }, (_, i) => i),
      length: lengths.length,
      pathPrefix: 'memory:loader-test',
      get(index: number, offset = 0, length?: number): Int32Array {
        const n = length ?? lengths[index] - offset;
        return Int32Array.from({ length: n }, (_, k) => index * 100 + offset + k + 1);
      },
    };
    const seqLength = 6;
    const gpt = GPTDataset.build({
      dataset,
      split: 'train',
      splitString: '1',
      sequenceLength: seqLength,
      numSamples: 24,
      seed: 1234,
      resetPositionIds: false,
      resetAttentionMask: false,
      eodMaskLoss: false,
      eodTokenId: 0,
    });
    const mbs = 2;
    const loader = new DataLoader({
      dataset: gpt,
      sampler: new MegatronPretrainingSampler({
        totalSamples: 24,
        consumedSamples: 0,
        microBatchSize: mbs,
        dataParallelRank: 1,
        dataParallelSize: 2,
      }),
      prefetch: 0,
    });
    const batches = [...loader];
    expect(batches).toHaveLength(6);
    for (const [step, b] of batches.entries()) {
      expect(Object.keys(b).sort()).toEqual(['labels', 'lossMask', 'positionIds', 'tokens']);
      expect(b.tokens.shape).toEqual([mbs, seqLength]);
      expect(b.labels.shape).toEqual([mbs, seqLength]);
      expect(b.lossMask.data).toBeInstanceOf(Float32Array);
      // Rank 1 of 2 takes samples 4*step + 2 and 4*step + 3.
      const expected = [gpt.getItem(4 * step + 2), gpt.getItem(4 * step + 3)];
      expect(values(b.tokens.data)).toEqual(expected.flatMap((s) => Array.from(s.tokens)));
      expect(values(b.labels.data)).toEqual(expected.flatMap((s) => Array.from(s.labels)));
    }
    expect(loader.consumedSamples).toBe(24);
  });
});
