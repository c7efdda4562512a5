// The index-checking kernels (indexSelectRows, indexAddRows, gatherAlong, scatterAddAlong, oneHot)
// write their verdict into a small float64 device tensor, and the ops queue its check (sync.ts):
// on the CPU a rejected index still throws from the op, with the same message as before and
// nothing left allocated; on an asynchronous device the op returns and the next host read on that
// device throws instead.
import { beforeEach, describe, expect, it } from 'vitest';
import {
  embedding,
  gather,
  getBackend,
  indexAdd,
  indexSelect,
  type KernelName,
  memoryStats,
  oneHot,
  pendingChecks,
  registerBackendType,
  reshape,
  scaledDotProductAttention,
  scatterAdd,
  synchronize,
  type Tensor,
  TensorError,
  tensor,
  tidy,
  transpose,
  zeros,
} from '../src/index.js';
import { createReferenceBackendType, registerReferenceBackend } from '../src/reference.js';

registerBackendType(createReferenceBackendType({ type: 'aref', asynchronous: true }));
registerReferenceBackend(); // ref:0, synchronous, for the kernels' own contract

const ASYNC = 'aref:0';

/** 0, 1, 2, ... in a float32 tensor of the given shape. */
function seq(shape: number[], device: string): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  return tensor(
    Array.from({ length: n }, (_, i) => i),
    { device, dtype: 'float32', shape },
  );
}

interface Case {
  name: string;
  /** The error message the op has always thrown for the bad inputs. */
  message: string;
  /** The op's inputs on a device: with the rejected index, or all indices valid. */
  inputs: (device: string, valid: boolean) => Tensor[];
  run: (xs: Tensor[]) => Tensor;
}

const CASES: Case[] = [
  {
    name: 'indexSelect',
    message: 'indexSelect: index 4 (at position 1 of the index) is out of range for dimension 0 of size 4',
    inputs: (device, valid) => [seq([4, 3], device), tensor([1, valid ? 3 : 4], { device })],
    run: ([x, i]) => indexSelect(x, 0, i),
  },
  {
    name: 'indexAdd',
    message: 'indexAdd: index 6 (at position 0 of the index) is out of range for dimension 1 of size 6',
    inputs: (device, valid) => [
      seq([4, 6], device),
      tensor([valid ? 5 : 6], { device }),
      seq([4, 1], device),
    ],
    run: ([x, i, s]) => indexAdd(x, 1, i, s),
  },
  {
    name: 'gather',
    message: 'gather: index 3 (at position 2 of the index) is out of range for dimension 1 of size 3',
    inputs: (device, valid) => [
      seq([2, 3], device),
      tensor(
        [
          [0, 1],
          [valid ? 2 : 3, 0],
        ],
        { device },
      ),
    ],
    run: ([x, i]) => gather(x, 1, i),
  },
  {
    // a transposed index is copied to a contiguous temporary first, which must be freed too
    name: 'gather (strided index)',
    message: 'gather: index 3 (at position 1 of the index) is out of range for dimension 1 of size 3',
    inputs: (device, valid) => [
      seq([2, 3], device),
      tensor(
        [
          [0, 1],
          [valid ? 2 : 3, 0],
        ],
        { device },
      ),
    ],
    run: ([x, i]) => {
      const t = transpose(i, 0, 1);
      try {
        return gather(x, 1, t);
      } finally {
        t.dispose();
      }
    },
  },
  {
    name: 'scatterAdd',
    message: 'scatterAdd: index -2 (at position 1 of the index) is out of range for dimension 0 of size 2',
    inputs: (device, valid) => [
      seq([2, 3], device),
      tensor([[0, valid ? 1 : -2, valid ? 1 : 7]], { device }),
      seq([1, 3], device),
    ],
    run: ([x, i, s]) => scatterAdd(x, 0, i, s),
  },
  {
    name: 'oneHot',
    message: 'oneHot: class value 5 (at position 3) is out of range for 4 classes',
    inputs: (device, valid) => [tensor([0, 1, 2, valid ? 3 : 5], { device })],
    run: ([i]) => oneHot(i, 4),
  },
  {
    name: 'embedding',
    message: 'embedding: id 7 (at position 2 of the input) is out of range for a vocabulary of V = 5 rows',
    inputs: (device, valid) => [
      tensor(
        [
          [1, 2],
          [valid ? 4 : 7, 0],
        ],
        { device },
      ),
      seq([5, 3], device),
    ],
    run: ([ids, w]) => embedding(ids, w),
  },
  {
    // 16-bit floats go through a float32 accumulator and a cast back, both freed on failure
    name: 'scatterAdd (bfloat16)',
    message: 'scatterAdd: index 2 (at position 0 of the index) is out of range for dimension 0 of size 2',
    inputs: (device, valid) => [
      zeros([2, 3], { device, dtype: 'bfloat16' }),
      tensor([[valid ? 1 : 2, 0, 1]], { device }),
      zeros([1, 3], { device, dtype: 'bfloat16' }),
    ],
    run: ([x, i, s]) => scatterAdd(x, 0, i, s),
  },
];

/** The error f throws (fails the test when it returns). */
function errorOf(f: () => unknown): TensorError {
  try {
    f();
  } catch (e) {
    return e as TensorError;
  }
  throw new Error('expected an error');
}

function live(device: string): number {
  return memoryStats(device).liveStorages;
}

function disposeAll(ts: Tensor[]): void {
  for (const t of ts) t.dispose();
}

beforeEach(() => {
  // a failed test must not leave its checks to the next one
  try {
    synchronize();
  } catch {
    // dropped on purpose
  }
});

describe('deferred index checks: the CPU throws from the op', () => {
  for (const c of CASES) {
    it(`${c.name}: same error, nothing left allocated`, () => {
      const xs = c.inputs('cpu', false);
      const before = live('cpu');
      const e = errorOf(() => c.run(xs));
      expect(e).toBeInstanceOf(TensorError);
      expect(e.code).toBe('INDEX_OUT_OF_RANGE');
      expect(e.message).toBe(c.message);
      expect(live('cpu')).toBe(before);
      expect(pendingChecks('cpu')).toBe(0);
      disposeAll(xs);
    });
  }

  it('the same errors inside tidy(), and valid indices throw nothing', () => {
    for (const c of CASES) {
      const before = live('cpu');
      tidy(() => {
        expect(errorOf(() => c.run(c.inputs('cpu', false))).message).toBe(c.message);
        const out = c.run(c.inputs('cpu', true));
        expect(out.numel).toBeGreaterThan(0);
      });
      expect(live('cpu'), c.name).toBe(before);
    }
  });
});

describe('deferred index checks: an asynchronous device throws at its next host read', () => {
  for (const c of CASES) {
    it(`${c.name}: the op returns, an unrelated read throws its error`, () => {
      const xs = c.inputs(ASYNC, false);
      const before = live(ASYNC);
      const out = c.run(xs);
      expect(out.device).toBe(ASYNC);
      expect(pendingChecks(ASYNC)).toBe(1);
      out.dispose();
      const probe = zeros([1], { device: ASYNC });
      const e = errorOf(() => probe.toTypedArray());
      expect(e).toBeInstanceOf(TensorError);
      expect(e.code).toBe('INDEX_OUT_OF_RANGE');
      expect(e.message).toBe(c.message);
      // the queue is empty and the device reads again
      expect(pendingChecks(ASYNC)).toBe(0);
      expect(probe.toArray()).toEqual([0]);
      probe.dispose();
      expect(live(ASYNC)).toBe(before);
      disposeAll(xs);
    });

    it(`${c.name}: valid indices queue a check that passes at the read`, () => {
      const xs = c.inputs(ASYNC, true);
      const before = live(ASYNC);
      const out = c.run(xs);
      expect(pendingChecks(ASYNC)).toBe(1);
      const got = out.toArray();
      expect(pendingChecks(ASYNC)).toBe(0);
      // the same values as the CPU
      const cpuIn = c.inputs('cpu', true);
      const want = c.run(cpuIn);
      expect(got).toEqual(want.toArray());
      want.dispose();
      disposeAll(cpuIn);
      out.dispose();
      expect(live(ASYNC)).toBe(before);
      disposeAll(xs);
    });
  }

  it('a copy to the CPU throws the queued error, read in the same wait, and leaves nothing on the CPU', () => {
    for (const c of CASES) {
      const xs = c.inputs(ASYNC, false);
      const out = c.run(xs);
      const probe = seq([2, 3], ASYNC);
      const before = [live(ASYNC), live('cpu')];
      const b = getBackend(ASYNC);
      const { read, readMany } = b;
      const calls: string[] = [];
      let inMany = false; // the reference backend's readMany reads one by one
      b.read = (t, dst) => {
        if (!inMany) calls.push('read');
        read.call(b, t, dst);
      };
      b.readMany = (ts, dsts) => {
        calls.push(`readMany ${ts.length}`);
        inMany = true;
        try {
          readMany?.call(b, ts, dsts);
        } finally {
          inMany = false;
        }
      };
      try {
        expect(() => probe.to('cpu')).toThrow(c.message);
      } finally {
        Object.assign(b, { read, readMany });
      }
      // the check and the probe's bytes together
      expect(calls).toEqual(['readMany 2']);
      // the check's small tensor went with it; nothing was left on the CPU
      expect([live(ASYNC), live('cpu')]).toEqual([before[0] - 1, before[1]]);
      expect(pendingChecks(ASYNC)).toBe(0);
      expect(probe.to('cpu').toArray()).toEqual([
        [0, 1, 2],
        [3, 4, 5],
      ]);
      probe.dispose();
      out.dispose();
      disposeAll(xs);
    }
  });

  it('two bad ops: the first error is thrown, the second dropped, memory comes back', () => {
    for (let k = 0; k < CASES.length; k++) {
      const first = CASES[k];
      const second = CASES[(k + 1) % CASES.length];
      const a = first.inputs(ASYNC, false);
      const b = second.inputs(ASYNC, false);
      const before = live(ASYNC);
      const outA = first.run(a);
      const outB = second.run(b);
      expect(pendingChecks(ASYNC)).toBe(2);
      outA.dispose();
      outB.dispose();
      const probe = zeros([1], { device: ASYNC });
      expect(errorOf(() => probe.item()).message, first.name).toBe(first.message);
      expect(pendingChecks(ASYNC)).toBe(0);
      expect(probe.item()).toBe(0);
      probe.dispose();
      expect(live(ASYNC), `${first.name} then ${second.name}`).toBe(before);
      disposeAll(a);
      disposeAll(b);
    }
  });

  it('a queued check outlives the tidy() scope of its op', () => {
    const c = CASES[0];
    const before = live(ASYNC);
    tidy(() => {
      c.run(c.inputs(ASYNC, false));
    });
    // the op's output and inputs are gone; the check's own tensor is still queued
    expect(pendingChecks(ASYNC)).toBe(1);
    expect(live(ASYNC)).toBe(before + 1);
    const probe = zeros([1], { device: ASYNC });
    expect(errorOf(() => probe.toTypedArray()).message).toBe(c.message);
    probe.dispose();
    expect(live(ASYNC)).toBe(before);
  });

  it('gradients through the index ops queue their checks too and pass on valid indices', () => {
    const before = live(ASYNC);
    tidy(() => {
      const w = seq([5, 3], ASYNC).requiresGrad_();
      const y = embedding(tensor([1, 4, 1], { device: ASYNC }), w);
      const x = seq([2, 3], ASYNC).requiresGrad_();
      const g = gather(
        x,
        1,
        tensor(
          [
            [0, 2],
            [1, 1],
          ],
          { device: ASYNC },
        ),
      );
      expect(pendingChecks(ASYNC)).toBe(2);
      y.sum().add(g.sum()).backward();
      // the backward kernels (indexAddRows, scatterAddAlong) queued theirs behind the forward ones
      expect(pendingChecks(ASYNC)).toBe(4);
      expect(w.grad!.toArray()).toEqual([
        [0, 0, 0],
        [2, 2, 2],
        [0, 0, 0],
        [0, 0, 0],
        [1, 1, 1],
      ]);
      expect(pendingChecks(ASYNC)).toBe(0);
      expect(x.grad!.toArray()).toEqual([
        [1, 0, 1],
        [0, 2, 0],
      ]);
    });
    expect(live(ASYNC)).toBe(before);
  });
});

// ---- the kernels' contract -------------------------------------------------------------------

interface KernelCase {
  name: KernelName;
  /** [position, value] of the first rejected index. */
  rejected: [number, number];
  call: (device: string, valid: boolean, bad: Tensor) => Tensor[];
}

const KERNELS: KernelCase[] = [
  {
    name: 'indexSelectRows',
    rejected: [1, 4],
    call: (device, valid, bad) => {
      const x = seq([4, 3], device);
      const i = tensor([1, valid ? 3 : 4], { device });
      const out = zeros([2, 3], { device });
      getBackend(device).kernel('indexSelectRows')!(out, x, i, 1, 4, 3, bad);
      return [x, i, out];
    },
  },
  {
    name: 'indexAddRows',
    rejected: [1, 4],
    call: (device, valid, bad) => {
      const s = seq([2, 3], device);
      const i = tensor([1, valid ? 3 : 4], { device });
      const out = zeros([4, 3], { device });
      getBackend(device).kernel('indexAddRows')!(out, null, s, i, 1, 4, 3, 1, -1, bad);
      return [s, i, out];
    },
  },
  {
    name: 'gatherAlong',
    rejected: [2, 3],
    call: (device, valid, bad) => {
      const x = seq([2, 3], device);
      const i = tensor(
        [
          [0, 1],
          [valid ? 2 : 3, 0],
        ],
        { device },
      );
      const out = zeros([2, 2], { device });
      getBackend(device).kernel('gatherAlong')!(out, x, i, 1, bad);
      return [x, i, out];
    },
  },
  {
    name: 'scatterAddAlong',
    rejected: [1, -2],
    call: (device, valid, bad) => {
      const s = seq([1, 3], device);
      const i = reshape(tensor([0, valid ? 1 : -2, 1], { device }), [1, 3]);
      const out = zeros([2, 3], { device });
      getBackend(device).kernel('scatterAddAlong')!(out, s, i, 0, 1, bad);
      return [s, i, out];
    },
  },
  {
    name: 'oneHot',
    rejected: [3, 5],
    call: (device, valid, bad) => {
      const i = tensor([0, 1, 2, valid ? 3 : 5], { device });
      const out = zeros([4, 4], { device, dtype: 'int64' });
      getBackend(device).kernel('oneHot')!(out, i, 4, bad);
      return [i, out];
    },
  },
];

describe('index kernels write their verdict into `bad`', () => {
  for (const device of ['cpu', 'ref:0', ASYNC]) {
    it(`${device}: [position, value] of the first rejected index, else [-1, 0]`, () => {
      tidy(() => {
        for (const k of KERNELS) {
          for (const valid of [true, false]) {
            const bad = tensor([7, 7], { device, dtype: 'float64' });
            k.call(device, valid, bad);
            expect(bad.toArray(), `${k.name} ${valid}`).toEqual(valid ? [-1, 0] : k.rejected);
          }
        }
      });
    });
  }
});

describe('synchronize waits for the devices', () => {
  it('synchronize(device) calls that backend’s synchronize; synchronize() every device in use', () => {
    const base = createReferenceBackendType({ type: 'wref', deviceCount: 2, asynchronous: true });
    const waits: string[] = [];
    registerBackendType({
      type: 'wref',
      deviceCount: () => 2,
      create: (i) => {
        const b = base.create(i);
        // the reference backend with a synchronize that records the wait
        return Object.assign(Object.create(b), { synchronize: () => waits.push(b.device) });
      },
    });
    const a = tensor([1, 2], { device: 'wref:0' });
    const b = tensor([1, 2], { device: 'wref:1' });
    synchronize('wref:1');
    expect(waits).toEqual(['wref:1']);
    waits.length = 0;
    synchronize();
    expect(waits.sort()).toEqual(['wref:0', 'wref:1']);
    a.dispose();
    b.dispose();
  });
});

describe('packed attention checks cuSeqlens where it lives', () => {
  const qkv = (device: string) => [
    seq([1, 2, 6, 4], device),
    seq([1, 2, 6, 4], device),
    seq([1, 2, 6, 4], device),
  ];
  const sdpa = (device: string, cu: number[]) => {
    const [q, k, v] = qkv(device).map((t) => t.div(24));
    return scaledDotProductAttention(q, k, v, {
      isCausal: true,
      cuSeqlens: tensor(cu, { device, dtype: 'int32' }),
    });
  };
  const messageOf = (fn: () => unknown) => {
    try {
      fn();
    } catch (e) {
      return (e as Error).message;
    }
    return null;
  };

  it.each([
    [[0, 4, 2, 6], 'be non-decreasing, got 4 then 2 at index 2'],
    [[0, 2, 5], 'end at the token count 6, got 5'],
    [[1, 2, 6], 'start at 0, got 1'],
    [[0, 6, 6, 3], 'be non-decreasing, got 6 then 3 at index 3'],
  ])('%j: the op returns on an asynchronous device, the next read throws the CPU message', (cu, what) => {
    const cpu = messageOf(() => sdpa('cpu', cu));
    expect(cpu).toBe(`scaledDotProductAttention: cuSeqlens must ${what}`);
    synchronize(ASYNC);
    const out = sdpa(ASYNC, cu);
    expect(pendingChecks(ASYNC)).toBeGreaterThan(0);
    expect(messageOf(() => out.sum().item())).toBe(cpu);
    expect(pendingChecks(ASYNC)).toBe(0);
  });

  it('a valid cuSeqlens: no read before the result is, and the CPU values', () => {
    synchronize(ASYNC);
    const out = sdpa(ASYNC, [0, 2, 2, 6]);
    expect(pendingChecks(ASYNC)).toBeGreaterThan(0);
    const got = out.toTypedArray() as Float32Array;
    const want = sdpa('cpu', [0, 2, 2, 6]).toTypedArray() as Float32Array;
    expect(pendingChecks(ASYNC)).toBe(0);
    for (let i = 0; i < want.length; i++) expect(got[i]).toBeCloseTo(want[i], 5);
  });
});
