// The backend's NCCL entries in one process: the library report, a communicator of one rank (what
// a one-GPU machine can run; on a GPU set MEGAPATCH_TEST_DEVICE=cuda:0), every operation's result
// and the errors of bad arguments. Several ranks are tested with real processes in
// @megapatch/parallel (test/collectives.test.ts, through the emulator's NCCL).
import { fromTypedArray, getBackend, synchronize, type Tensor, zeros } from '@megapatch/tensor';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadAddon, loadEmulatorAddon } from '../src/native.js';

const device = process.env.MEGAPATCH_TEST_DEVICE ?? 'cudaemu:0';
const onGpu = device.startsWith('cuda:');
const built = onGpu ? loadAddon() : loadEmulatorAddon();
const skip = 'error' in built ? built.error : '';

const values = (t: Tensor) => Array.from(t.toTypedArray() as ArrayLike<number>, Number);
const make = (xs: number[], dtype: 'float32' | 'bfloat16' | 'int64' = 'float32') =>
  fromTypedArray(Float64Array.from(xs), [xs.length]).to(dtype).to(device);

describe.skipIf(skip !== '')(`NCCL on ${device}${skip ? ` (skipped: ${skip})` : ''}`, () => {
  beforeAll(async () => {
    await import(onGpu ? '../src/index.js' : '../src/emulator.js');
  });

  it('reports the library and runs every operation on a communicator of one rank', () => {
    const coll = getBackend(device).collectives?.();
    if (!coll) throw new Error(`no NCCL on ${device}`);
    expect(coll.name).toMatch(onGpu ? /^nccl 2\.\d+\.\d+$/ : /^nccl emulated 2\.\d+\.\d+$/);
    expect(coll.idBytes).toBe(128);
    const id = coll.uniqueId();
    expect(id.length).toBe(128);
    const comm = coll.connect(id, 1, 0);
    try {
      for (const dtype of ['float32', 'bfloat16', 'int64'] as const) {
        const x = make([1, -2, 3.5, 7], dtype);
        for (const op of ['sum', 'max', 'min'] as const) {
          const y = zeros([4], { dtype, device });
          comm.allReduce(x, y, op);
          expect(values(y)).toEqual(values(x));
        }
        const g = zeros([4], { dtype, device });
        comm.allGather(x, g);
        comm.broadcast(g, g, 0);
        const r = zeros([4], { dtype, device });
        comm.reduceScatter(g, r, 'sum');
        expect(values(r)).toEqual(values(x));
      }
      // avg over one rank is the value itself
      const a = make([0.5, 3]);
      comm.allReduce(a, a, 'avg');
      expect(values(a)).toEqual([0.5, 3]);
      synchronize(device);
      expect(comm.asyncError()).toBe('');
      // bad arguments: a peer outside the communicator, a wrong count, a tensor of another device
      expect(() => comm.sendRecv([{ kind: 'send', peer: 1, tensor: a }])).toThrow(/peer 1 is not a rank/);
      expect(() => comm.allGather(a, zeros([3], { device }))).toThrow(/must have 2 element/);
      expect(() => comm.allReduce(zeros([2]), zeros([2]), 'sum')).toThrow(/is not on/);
    } finally {
      comm.destroy();
    }
    comm.destroy();
    expect(() => comm.allReduce(make([1]), make([1]), 'sum')).toThrow(/destroyed/);
  });

  // (real NCCL would try to reach the address inside the id; only the emulator checks it)
  it.skipIf(onGpu)('refuses an id that the library did not make', () => {
    const coll = getBackend(device).collectives?.();
    if (!coll) throw new Error(`no NCCL on ${device}`);
    expect(() => coll.connect(new Uint8Array(128), 1, 0)).toThrow(/ncclCommInitRank failed/);
  });
});
