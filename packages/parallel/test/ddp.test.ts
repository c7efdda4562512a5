// DistributedDataParallel in one process: the buffer layout (reverse order, 64-element starts,
// bucket boundaries, lcm(dp, 128) padding, checked for several dp sizes on the layout function),
// mainGrad views, reductions launched from backward bucket by bucket, noSync, statistics, the
// parameter swap of the distributed optimizer path, and clean disposal. Groups are size-1
// LocalGroups whose ops complete at once.
import { crossEntropy, memoryStats, noGrad, type Tensor, tensor, tidy, zeros } from '@megapatch/tensor';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DistributedDataParallel } from '../src/distributed/distributed-data-parallel.js';
import {
  bucketEndDivisor,
  computeBufferLayout,
  defaultBucketSize,
  PARAM_ALIGNMENT,
  ParamAndGradBuffer,
} from '../src/distributed/param-and-grad-buffer.js';
import { DistributedError } from '../src/errors.js';
import {
  getTensorModelParallelAttributes,
  setTensorModelParallelAttributes,
} from '../src/tensor-parallel/attributes.js';
import { DIMS, LocalGroup, MLP, makeData } from './workers/ddp-common.js';

const vals = (t: Tensor | null): number[] => Array.from(noGrad(() => t!.toTypedArray()) as Float32Array);

let start = 0;
beforeEach(() => {
  start = memoryStats().liveBytes;
});
afterEach(() => {
  // every test frees what it made
  expect(memoryStats().liveBytes).toBe(start);
});

describe('buffer layout', () => {
  it('lays parameters out in reverse order, each on a 64-element boundary', () => {
    const l = computeBufferLayout([10, 100, 3, 64], {
      bucketSize: null,
      dataParallelSize: 1,
      padBucketsForSharding: false,
    });
    // the last parameter comes first
    expect(l.params.map((s) => [s.start, s.end])).toEqual([
      [256, 266],
      [128, 228],
      [64, 67],
      [0, 64],
    ]);
    for (const s of l.params) expect(s.start % PARAM_ALIGNMENT).toBe(0);
    expect(l.buckets).toEqual([{ start: 0, end: 266, numelUnpadded: 266, params: [3, 2, 1, 0] }]);
    expect(l.numel).toBe(266);
  });

  it('closes a bucket after the parameter that reaches bucketSize; no parameter straddles two', () => {
    const numels = [500, 40, 40, 300, 10];
    const l = computeBufferLayout(numels, {
      bucketSize: 100,
      dataParallelSize: 1,
      padBucketsForSharding: false,
    });
    // reverse: 10 @0 (bucket 0 continues), 300 @64..364 closes bucket 0; 40 @364→384..424, 40 @448..488 closes
    // bucket 1 (488 − 364 ≥ 100); 500 alone in bucket 2
    expect(l.buckets.map((b) => [b.start, b.end, b.params])).toEqual([
      [0, 364, [4, 3]],
      [364, 488, [2, 1]],
      [488, 1012, [0]],
    ]);
    l.params.forEach((s, i) => {
      const b = l.buckets[s.bucket];
      expect(s.start).toBeGreaterThanOrEqual(b.start);
      expect(s.end).toBeLessThanOrEqual(b.end);
      expect(s.end - s.start).toBe(numels[i]);
      expect(s.start % PARAM_ALIGNMENT).toBe(0);
    });
  });

  it.each([1, 2, 3, 4, 6, 8, 256])('pads bucket ends to lcm(dp, 128) for sharding (dp = %i)', (dp) => {
    const divisor = bucketEndDivisor(dp);
    expect(divisor % 128).toBe(0);
    expect(divisor % dp).toBe(0);
    expect(divisor).toBe(dp === 3 ? 384 : dp === 6 ? 384 : Math.max(dp, 128));
    const numels = [1000, 7, 333, 129, 1];
    const l = computeBufferLayout(numels, {
      bucketSize: 300,
      dataParallelSize: dp,
      padBucketsForSharding: true,
    });
    for (const b of l.buckets) {
      expect(b.start % divisor).toBe(0);
      expect((b.end - b.start) % divisor).toBe(0);
      expect((b.end - b.start) % dp).toBe(0);
      // padding is less than one divisor
      expect(b.end - b.start - b.numelUnpadded).toBeLessThan(divisor);
    }
    expect(l.numel).toBe(l.buckets[l.buckets.length - 1].end);
  });

  it("uses Megatron's default bucket size and rejects bad sizes", () => {
    expect(defaultBucketSize(8)).toBe(40_000_000);
    expect(defaultBucketSize(64)).toBe(64_000_000);
    expect(() =>
      computeBufferLayout([1], { bucketSize: 0, dataParallelSize: 1, padBucketsForSharding: false }),
    ).toThrow(DistributedError);
    expect(() =>
      computeBufferLayout([1], { bucketSize: null, dataParallelSize: 0, padBucketsForSharding: false }),
    ).toThrow(/dataParallelSize/);
  });
});

describe('ParamAndGradBuffer', () => {
  it('copies parameters into the parameter buffer and hands out views shaped like them (0-d and empty too)', () => {
    const ps = [tensor([[1, 2, 3]], { dtype: 'float32' }), tensor(4, { dtype: 'float32' }), zeros([0, 3])];
    const buffer = new ParamAndGradBuffer(ps, {
      paramDtype: 'float32',
      gradDtype: 'float32',
      bucketSize: null,
      dataParallelSize: 2,
      padBucketsForSharding: true,
      withParamBuffer: true,
    });
    expect(buffer.layout.numel).toBe(128);
    ps.forEach((p) => {
      const g = buffer.gradView(p);
      const v = buffer.paramView(p);
      expect([g.shape, v.shape]).toEqual([p.shape, p.shape]);
      expect(vals(v)).toEqual(vals(p));
      for (const t of [g, v]) t.dispose();
    });
    const swapped = buffer.adoptParamViews();
    expect(buffer.params.map((p) => swapped.get(ps[buffer.params.indexOf(p)]) === p)).toEqual([
      true,
      true,
      true,
    ]);
    expect(buffer.buckets[0].params).toEqual([...buffer.params].reverse());
    for (const p of buffer.params) p.dispose();
    for (const p of ps) p.dispose();
    buffer.dispose();
  });
});

/** Builds model + DDP with three buckets (one per Linear). */
function setup(options: { useDistributedOptimizer?: boolean; overlapGradReduce?: boolean } = {}) {
  const model = new MLP(DIMS, 7);
  const group = new LocalGroup();
  // fc3 (≈245 elements) fills bucket 0, fc2 (2352) bucket 1, fc1 (624) bucket 2
  const ddp = new DistributedDataParallel(model, { dataParallelGroup: group, bucketSize: 200, ...options });
  return { model, group, ddp };
}

function lossOf(model: MLP, batch: { x: Tensor; y: Tensor }): number {
  return tidy(() => {
    const l = crossEntropy(model.forward(batch.x), batch.y);
    l.backward();
    return l.item();
  });
}

describe('DistributedDataParallel (one process)', () => {
  it('points every mainGrad into the bucketed fp32 buffer, last layer in bucket 0', () => {
    const { model, ddp } = setup();
    const [buffer] = ddp.buffers;
    expect(ddp.buffers.length).toBe(1);
    expect(buffer.buckets.map((b) => b.params.map((p) => p.numel))).toEqual([
      [DIMS.out, DIMS.out * DIMS.hidden],
      [DIMS.hidden, DIMS.hidden * DIMS.hidden],
      [DIMS.hidden, DIMS.hidden * DIMS.in],
    ]);
    for (const [, p] of model.namedParameters()) {
      expect(p.mainGrad).not.toBeNull();
      expect(p.mainGrad!.storage).toBe(buffer.gradData.storage);
      expect(p.mainGrad!.offset).toBe(buffer.slotOf(p).start);
      expect(p.mainGrad!.dtype).toBe('float32');
      expect(p.mainGrad!.shape).toEqual(p.shape);
    }
    ddp.dispose();
    expect(model.fc1.weight.mainGrad).toBeNull();
    model.dispose();
  });

  it('launches each bucket from backward as soon as its last gradient is in, in backward order', () => {
    const { model, group, ddp } = setup();
    const [batch] = makeData(1, 8, 1);
    // at each launch: has the first layer's gradient arrived yet?
    const fc1Seen: boolean[] = [];
    group.onOp = () => fc1Seen.push(vals(model.fc1.weight.mainGrad).some((v) => v !== 0));
    lossOf(model, batch);
    const buckets = ddp.buffers[0].buckets;
    expect(group.ops.map((o) => [o.op, o.offset, o.numel])).toEqual(
      buckets.map((b) => ['allReduce', b.offset, b.numel]),
    );
    // buckets 0 and 1 went out while backward had not reached fc1 yet
    expect(fc1Seen).toEqual([false, false, true]);
    ddp.finishGradSync();
    expect(ddp.lastSyncStats()).toMatchObject({ buckets: 3, bucketsLaunchedDuringBackward: 3 });
    // a second finishGradSync has nothing to do
    ddp.finishGradSync();
    expect(group.ops.length).toBe(3);
    ddp.dispose();
    model.dispose();
    for (const t of [batch.x, batch.y]) t.dispose();
  });

  it('gives the same gradients as plain backward (dp = 1)', () => {
    const { model, ddp } = setup();
    const ref = new MLP(DIMS, 7);
    const [batch] = makeData(1, 8, 2);
    const a = lossOf(model, batch);
    const b = lossOf(ref, batch);
    ddp.finishGradSync();
    expect(a).toBe(b);
    const refGrads = new Map(ref.namedParameters().map(([n, p]) => [n, vals(p.grad)]));
    for (const [n, p] of model.namedParameters()) {
      expect(p.grad).toBeNull();
      expect(vals(p.mainGrad)).toEqual(refGrads.get(n));
    }
    ddp.dispose();
    for (const m of [model, ref]) m.dispose();
    for (const t of [batch.x, batch.y]) t.dispose();
  });

  it('noSync: earlier micro-batches only accumulate; the last one launches the reductions', () => {
    const { model, group, ddp } = setup();
    const ref = new MLP(DIMS, 7);
    const data = makeData(3, 4, 3);
    ddp.noSync(() => {
      lossOf(model, data[0]);
      lossOf(model, data[1]);
    });
    expect(group.ops.length).toBe(0);
    lossOf(model, data[2]);
    expect(group.ops.length).toBe(3);
    ddp.finishGradSync();
    for (const b of data) lossOf(ref, b);
    const refGrads = new Map(ref.namedParameters().map(([n, p]) => [n, vals(p.grad)]));
    for (const [n, p] of model.namedParameters()) {
      const got = vals(p.mainGrad);
      const want = refGrads.get(n)!;
      got.forEach((g, i) => {
        expect(Math.abs(g - want[i])).toBeLessThan(1e-6);
      });
    }
    // zeroGradBuffer clears the gradients for the next step
    ddp.zeroGradBuffer();
    expect(vals(model.fc2.weight.mainGrad).every((v) => v === 0)).toBe(true);
    ddp.dispose();
    for (const m of [model, ref]) m.dispose();
    for (const b of data) for (const t of [b.x, b.y]) t.dispose();
  });

  it('noSync accepts an async function and restores synchronisation after it settles', async () => {
    const { model, group, ddp } = setup();
    const [batch] = makeData(1, 4, 4);
    await ddp.noSync(async () => {
      await Promise.resolve();
      lossOf(model, batch);
    });
    expect(group.ops.length).toBe(0);
    lossOf(model, batch);
    expect(group.ops.length).toBe(3);
    await ddp.finishGradSyncAsync();
    expect(ddp.lastSyncStats().buckets).toBe(3);
    ddp.dispose();
    model.dispose();
    for (const t of [batch.x, batch.y]) t.dispose();
  });

  it('without overlapGradReduce: one bucket, reduced in finishGradSync', () => {
    const { model, group, ddp } = setup({ overlapGradReduce: false });
    const [batch] = makeData(1, 4, 5);
    expect(ddp.buffers[0].buckets.length).toBe(1);
    lossOf(model, batch);
    expect(group.ops.length).toBe(0);
    ddp.finishGradSync();
    expect(group.ops.length).toBe(1);
    expect(ddp.lastSyncStats()).toMatchObject({ buckets: 1, bucketsLaunchedDuringBackward: 0 });
    ddp.dispose();
    model.dispose();
    for (const t of [batch.x, batch.y]) t.dispose();
  });

  it('refuses a second backward into a bucket whose reduction already started', () => {
    const { model, ddp } = setup();
    const [batch] = makeData(1, 4, 6);
    lossOf(model, batch);
    expect(() => lossOf(model, batch)).toThrow(/noSync/);
    ddp.finishGradSync();
    ddp.dispose();
    model.dispose();
    for (const t of [batch.x, batch.y]) t.dispose();
  });

  it('with the distributed optimizer: parameters become views of the padded parameter buffer', () => {
    const model = new MLP(DIMS, 7);
    setTensorModelParallelAttributes(model.fc2.weight, true, 0);
    const old = model.fc2.weight;
    const before = vals(old);
    const ddp = new DistributedDataParallel(model, {
      dataParallelGroup: new LocalGroup(),
      bucketSize: 200,
      useDistributedOptimizer: true,
    });
    const [buffer] = ddp.buffers;
    expect(old.disposed).toBe(true);
    const now = model.fc2.weight;
    expect(now).not.toBe(old);
    expect(model.parameters()).toContain(now);
    expect(now.storage).toBe(buffer.paramData!.storage);
    expect(now.offset).toBe(buffer.slotOf(now).start);
    expect(vals(now)).toEqual(before);
    expect(now.name).toBe('weight');
    expect(now.requiresGrad).toBe(true);
    expect(getTensorModelParallelAttributes(now).tensorModelParallel).toBe(true);
    for (const b of buffer.buckets) expect(b.numel % 128).toBe(0);
    // forward and backward run on the swapped parameters
    const [batch] = makeData(1, 4, 8);
    lossOf(model, batch);
    ddp.finishGradSync();
    expect(vals(now.mainGrad).some((v) => v !== 0)).toBe(true);
    ddp.dispose();
    model.dispose();
    for (const t of [batch.x, batch.y]) t.dispose();
  });

  it('refuses a parameter that already has a mainGrad', () => {
    const model = new MLP(DIMS, 7);
    const ddp = new DistributedDataParallel(model, { dataParallelGroup: new LocalGroup() });
    expect(() => new DistributedDataParallel(model, { dataParallelGroup: new LocalGroup() })).toThrow(
      /already has a mainGrad/,
    );
    ddp.dispose();
    model.dispose();
  });
});
