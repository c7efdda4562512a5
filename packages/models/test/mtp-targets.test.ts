// Multi-token prediction's shifted targets (mtp-targets.ts) on hand-worked rows: packed samples
// never borrow the next one's tokens, the vacated positions are 0, the mask shifts with the labels
// and the count is the shifted mask's sum; on the CPU and on the emulated CUDA backend, where the
// targets stay on the device (no read back).
import { fromTypedArray, pendingChecks, synchronize, type Tensor } from '@megapatch/tensor';
import { describe, expect, it } from 'vitest';
import { mtpTargets } from '../src/mtp-targets.js';

let emulator: string | null = null;
try {
  await import('@megapatch/cuda/emulator');
} catch (e) {
  emulator = (e as Error).message.split('\n')[0];
}

const nums = (t: Tensor) => Array.from(t.toTypedArray() as ArrayLike<number | bigint>, Number);
const int64 = (v: number[], shape: number[], device: string) =>
  fromTypedArray(BigInt64Array.from(v, BigInt), shape, { device });

describe.each([
  ['cpu', null],
  ['cudaemu:0', emulator],
])('mtpTargets on %s', (device, unavailable) => {
  if (unavailable !== null) it.skip(`${device}: ${unavailable}`, () => {});
  it.runIf(unavailable === null)('shifts a packed row within each sample, with its mask', () => {
    const ids = int64([10, 11, 12, 13, 14, 15, 16, 17], [1, 8], device);
    const labels = int64([11, 12, 99, 14, 15, 16, 17, 99], [1, 8], device);
    const lossMask = fromTypedArray(Float32Array.from([1, 1, 0, 1, 1, 1, 1, 0]), [1, 8], { device });
    const cuSeqlens = fromTypedArray(Int32Array.from([0, 3, 8]), [3]);
    synchronize(device);
    const [d1, d2] = mtpTargets({ ids, labels, lossMask, cuSeqlens, cpGroup: null }, 2);
    for (const t of [d1.ids, d1.labels, d1.mask, d1.count, d2.ids]) expect(t.device).toBe(device);
    expect(d1.ids.shape).toEqual([1, 8]);
    expect(d1.ids.dtype).toBe('int64');
    expect(d1.mask.dtype).toBe('float32');
    expect(nums(d1.ids)).toEqual([11, 12, 0, 14, 15, 16, 17, 0]);
    expect(nums(d1.labels)).toEqual([12, 99, 0, 15, 16, 17, 99, 0]);
    expect(nums(d1.mask)).toEqual([1, 0, 0, 1, 1, 1, 0, 0]);
    expect(d1.count.item()).toBe(4);
    expect(nums(d2.ids)).toEqual([12, 0, 0, 15, 16, 17, 0, 0]);
    expect(nums(d2.labels)).toEqual([99, 0, 0, 16, 17, 99, 0, 0]);
    expect(nums(d2.mask)).toEqual([0, 0, 0, 1, 1, 0, 0, 0]);
    expect(d2.count.item()).toBe(2);
  });

  it.runIf(unavailable === null)(
    'an empty sample, and positions past the last boundary keep their own',
    () => {
      const ids = int64([10, 11, 12, 13, 14, 15, 16, 17], [1, 8], device);
      const labels = int64([20, 21, 22, 23, 24, 25, 26, 27], [1, 8], device);
      // samples [0, 3), [3, 3) (empty), [3, 6); positions 6 and 7 lie outside every sample
      const cuSeqlens = fromTypedArray(Int32Array.from([0, 3, 3, 6]), [4], { device });
      synchronize(device);
      const [d1, d2, d4] = mtpTargets({ ids, labels, lossMask: null, cuSeqlens, cpGroup: null }, 4).filter(
        (_, i) => i !== 2,
      );
      if (device !== 'cpu') expect(pendingChecks(device)).toBeGreaterThan(0); // nothing read back
      expect(nums(d1.ids)).toEqual([11, 12, 0, 14, 15, 0, 16, 17]);
      expect(nums(d1.mask)).toEqual([1, 1, 0, 1, 1, 0, 1, 1]);
      expect(d1.count.item()).toBe(6);
      expect(nums(d2.labels)).toEqual([22, 0, 0, 25, 0, 0, 26, 27]);
      expect(d2.count.item()).toBe(4);
      // depth 4 is longer than every sample
      expect(nums(d4.ids)).toEqual([0, 0, 0, 0, 0, 0, 16, 17]);
      expect(d4.count.item()).toBe(2);
    },
  );

  it.runIf(unavailable === null)('shifts each row of a batch, mask all ones without one', () => {
    const ids = int64([1, 2, 3, 4, 5, 6], [2, 3], device);
    const labels = int64([2, 3, 7, 5, 6, 8], [2, 3], device);
    const [d1] = mtpTargets({ ids, labels, lossMask: null, cuSeqlens: null, cpGroup: null }, 1);
    if (device !== 'cpu') expect(pendingChecks(device)).toBeGreaterThan(0); // queued, not read yet
    expect(nums(d1.ids)).toEqual([2, 3, 0, 5, 6, 0]);
    expect(nums(d1.labels)).toEqual([3, 7, 0, 6, 8, 0]);
    expect(nums(d1.mask)).toEqual([1, 1, 0, 1, 1, 0]);
    expect(d1.count.item()).toBe(4);
  });
});
