// Deferred checks (src/sync.ts): a synchronous backend runs a check at once and the op throws; an
// asynchronous one queues it until the next host read on that device, which throws the first
// failure; the queue owns and frees the checked tensors.
import { describe, expect, it } from 'vitest';
import {
  deferCheck,
  memoryStats,
  pendingChecks,
  synchronize,
  TensorError,
  tensor,
  zeros,
} from '../src/index.js';
import { registerReferenceBackend } from '../src/reference.js';

registerReferenceBackend({ type: 'aref', asynchronous: true });
registerReferenceBackend({ type: 'sref' });

const bad = (v: number[]) => (v[0] >= 0 ? new TensorError('INDEX_OUT_OF_RANGE', `bad at ${v[0]}`) : null);

describe('deferCheck', () => {
  it('throws at once on a synchronous device and frees the checked tensor', () => {
    for (const device of ['cpu', 'sref:0']) {
      const live = memoryStats(device).liveStorages;
      expect(() => deferCheck(tensor([3, 0], { dtype: 'float64', device }), bad)).toThrow(/bad at 3/);
      deferCheck(tensor([-1, 0], { dtype: 'float64', device }), bad);
      expect(pendingChecks(device)).toBe(0);
      expect(memoryStats(device).liveStorages).toBe(live);
    }
  });

  it('waits for the next host read on an asynchronous device, on that device only', () => {
    const live = memoryStats('aref:0').liveStorages;
    deferCheck(tensor([-1, 0], { dtype: 'float64', device: 'aref:0' }), bad);
    deferCheck(tensor([5, 2], { dtype: 'float64', device: 'aref:0' }), bad);
    deferCheck(tensor([7, 2], { dtype: 'float32', device: 'aref:0' }), bad);
    expect(pendingChecks('aref:0')).toBe(3);
    // another device's reads do not wait for this one
    expect(zeros([1], { device: 'aref:1' }).toArray()).toEqual([0]);
    expect(pendingChecks('aref:0')).toBe(3);
    const x = zeros([2], { device: 'aref:0' });
    // the first failure is thrown; the later check is dropped with it
    expect(() => x.toTypedArray()).toThrow(/bad at 5/);
    expect(pendingChecks()).toBe(0);
    expect(x.toArray()).toEqual([0, 0]);
    x.dispose();
    expect(memoryStats('aref:0').liveStorages).toBe(live);
  });

  it('synchronize() evaluates every device, and passing checks are silent', () => {
    deferCheck(tensor([-1], { dtype: 'float64', device: 'aref:1' }), bad);
    expect(pendingChecks('aref:1')).toBe(1);
    synchronize();
    expect(pendingChecks()).toBe(0);
    deferCheck(tensor([1], { dtype: 'float64', device: 'aref:1' }), bad);
    expect(() => synchronize('aref:1')).toThrow(/bad at 1/);
  });

  it('a copy to another device reads its source: the source device synchronises first', () => {
    deferCheck(tensor([4], { dtype: 'float64', device: 'aref:0' }), bad);
    const y = tensor([1, 2], { device: 'aref:0' });
    expect(() => y.to('cpu')).toThrow(/bad at 4/);
    expect(y.to('cpu').toArray()).toEqual([1, 2]);
  });
});

describe('a queued check', () => {
  it('outlives the tidy() scope of the op that queued it', async () => {
    const { tidy } = await import('../src/index.js');
    tidy(() => {
      deferCheck(tensor([9], { dtype: 'float64', device: 'aref:0' }), bad);
    });
    expect(pendingChecks('aref:0')).toBe(1);
    expect(() => synchronize('aref:0')).toThrow(/bad at 9/);
  });
});
