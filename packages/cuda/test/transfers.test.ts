// Transfers with as few waits as possible.
//
// Uploads without a wait. writeFrom copies a typed array into the device's page-locked staging
// ring and queues the copy from there; the host waits only when the ring is full of copies still
// queued, or for an upload over half the ring. The emulator runs such copies late (at the next
// launch, copy or synchronisation, as a GPU's copy engine reads page-locked memory after the call
// returned), so a ring that reused bytes before their copy ran would upload the wrong values here.
//
// Queued checks read with one wait: the index and loss-target checks an asynchronous device queues
// (tensor's sync.ts) are read together at the next read, through readIntoMany.
import {
  fromTypedArray,
  memoryStats,
  pendingChecks,
  randn,
  synchronize,
  type Tensor,
  tensor,
} from '@megapatch/tensor';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { BackendAddon } from '../src/native.js';
import { deviceUnderTest } from './device-under-test.js';

// MEGAPATCH_TEST_DEVICE=cuda:0 runs the same on a GPU (gpu/run.sh's scan step), where the copies
// really run late: cuda:1 stands for the second device when there is one
const { device: DEV, onGpu, addon: loaded, skip, register } = deviceUnderTest();
const addon = loaded as BackendAddon;
const DEV2 = onGpu ? (!skip && addon.deviceCount() > 1 ? 'cuda:1' : DEV) : 'cudaemu:1';
const DEFAULT = 16 << 20;

/** n values of upload number i (distinct in every upload and position). */
const valuesOf = (i: number, n: number) => Float32Array.from({ length: n }, (_, j) => i * 1000 + j + 0.5);

describe.skipIf(skip !== '')(
  `uploads through page-locked staging${skip ? ` (skipped: ${skip})` : ''}`,
  () => {
    beforeAll(async () => {
      await register();
    });
    afterEach(() => {
      synchronize();
      addon.setStagingBytes(DEFAULT);
    });

    /** Uploads, then the host waits and the uploads' counts it caused. */
    const measure = (body: () => void) => {
      const w0 = addon.hostWaits();
      const u0 = addon.uploadStats();
      body();
      const u = addon.uploadStats();
      return {
        hostWaits: addon.hostWaits() - w0,
        staged: u.staged - u0.staged,
        direct: u.direct - u0.direct,
        ringWaits: u.waits - u0.waits,
      };
    };

    it('queues an upload that fits the ring without waiting, also between kernels', () => {
      synchronize(DEV);
      const xs: Tensor[] = [];
      const ys: Tensor[] = [];
      const counts = measure(() => {
        for (let i = 0; i < 20; i++) {
          const x = fromTypedArray(valuesOf(i, 300), [300], { device: DEV });
          xs.push(x);
          ys.push(x.mul(2)); // a kernel reading the upload: the stream orders it after the copy
        }
      });
      expect(counts).toEqual({ hostWaits: 0, staged: 20, direct: 0, ringWaits: 0 });
      for (let i = 0; i < 20; i++) {
        expect(Array.from(xs[i].toTypedArray() as Float32Array)).toEqual(Array.from(valuesOf(i, 300)));
        expect(Array.from(ys[i].toTypedArray() as Float32Array)).toEqual(
          Array.from(valuesOf(i, 300), (v) => 2 * v),
        );
      }
      for (const t of [...xs, ...ys]) t.dispose();
    });

    it('waits for the oldest queued copy when the ring is full, and never reuses bytes still to be copied', () => {
      addon.setStagingBytes(4096);
      synchronize(DEV);
      const xs: Tensor[] = [];
      const sizes = [100, 500, 7, 300, 256, 511, 64, 1, 400, 129]; // 4 to 2044 bytes, uneven around the ring
      // on a GPU the copies queue behind a long product (the emulator runs them late by itself)
      const busy = onGpu
        ? randn([8192, 8192], { device: DEV }).matmul(randn([8192, 8192], { device: DEV }))
        : null;
      const counts = measure(() => {
        // no kernel in between: every copy is still queued when the next upload takes its bytes
        for (let i = 0; i < 60; i++) {
          const n = sizes[i % sizes.length];
          xs.push(fromTypedArray(valuesOf(i, n), [n], { device: DEV }));
        }
      });
      expect(counts.staged).toBe(60);
      expect(counts.direct).toBe(0);
      expect(counts.ringWaits).toBeGreaterThan(5);
      expect(counts.hostWaits).toBe(counts.ringWaits);
      for (let i = 0; i < 60; i++) {
        expect(Array.from(xs[i].toTypedArray() as Float32Array), `upload ${i}`).toEqual(
          Array.from(valuesOf(i, sizes[i % sizes.length])),
        );
        xs[i].dispose();
      }
      busy?.dispose();
    });

    it('copies an upload over half the ring directly, waiting for the stream', () => {
      addon.setStagingBytes(4096);
      synchronize(DEV);
      let x: Tensor | null = null;
      const counts = measure(() => {
        x = fromTypedArray(valuesOf(3, 513), [513], { device: DEV }); // 2052 bytes
      });
      expect(counts).toEqual({ hostWaits: 1, staged: 0, direct: 1, ringWaits: 0 });
      expect(Array.from((x as unknown as Tensor).toTypedArray() as Float32Array)).toEqual(
        Array.from(valuesOf(3, 513)),
      );
      (x as unknown as Tensor).dispose();
    });

    it('with setStagingBytes(0) every upload waits, as before the ring', () => {
      addon.setStagingBytes(0);
      synchronize(DEV);
      const xs: Tensor[] = [];
      const counts = measure(() => {
        for (let i = 0; i < 3; i++) xs.push(fromTypedArray(valuesOf(i, 10), [10], { device: DEV }));
      });
      expect(counts).toEqual({ hostWaits: 3, staged: 0, direct: 3, ringWaits: 0 });
      for (let i = 0; i < 3; i++)
        expect(Array.from(xs[i].toTypedArray() as Float32Array)).toEqual(Array.from(valuesOf(i, 10)));
      for (const t of xs) t.dispose();
      expect(() => addon.setStagingBytes(-1)).toThrow(/setStagingBytes: expected 0 to 4 GiB/);
    });

    it('keeps a ring per device: uploads to two devices interleaved arrive intact', () => {
      addon.setStagingBytes(2048);
      synchronize();
      const xs: Tensor[] = [];
      measure(() => {
        for (let i = 0; i < 40; i++) {
          xs.push(fromTypedArray(valuesOf(i, 90 + i), [90 + i], { device: i % 2 ? DEV2 : DEV }));
        }
      });
      for (let i = 0; i < 40; i++) {
        expect(xs[i].device).toBe(i % 2 ? DEV2 : DEV);
        expect(Array.from(xs[i].toTypedArray() as Float32Array)).toEqual(Array.from(valuesOf(i, 90 + i)));
        xs[i].dispose();
      }
    });
  },
);

describe.skipIf(skip !== '')(`queued checks${skip ? ` (skipped: ${skip})` : ''}`, () => {
  beforeAll(async () => {
    await register();
  });

  it('reads every queued check of a device with one wait, and throws the first failure', () => {
    const table = randn([10, 4]).to(DEV);
    synchronize(DEV);
    const live0 = memoryStats(DEV).liveBytes;
    const rows: Tensor[] = [];
    const index = (v: number[]) => {
      const i = tensor(v, { dtype: 'int64' }).to(DEV);
      rows.push(i);
      return i;
    };
    for (let i = 0; i < 30; i++) rows.push(table.indexSelect(0, index([i % 10, (i * 7) % 10])));
    expect(pendingChecks(DEV)).toBe(30);
    const w0 = addon.hostWaits();
    synchronize(DEV);
    expect(addon.hostWaits() - w0).toBe(1);
    expect(pendingChecks(DEV)).toBe(0);
    const want = table.cpu().toArray() as number[][];
    expect(rows[2 * 13 + 1].cpu().toArray()).toEqual([want[3], want[1]]);
    // a bad index among good ones: its own message, and every queued check's memory freed
    for (let i = 0; i < 5; i++) rows.push(table.indexSelect(0, index([i])));
    rows.push(table.indexSelect(0, index([2, 12])));
    rows.push(table.indexSelect(0, index([-20])));
    expect(pendingChecks(DEV)).toBe(7);
    expect(() => synchronize(DEV)).toThrow(
      'indexSelect: index 12 (at position 1 of the index) is out of range for dimension 0 of size 10',
    );
    expect(pendingChecks(DEV)).toBe(0);
    for (const r of rows) r.dispose();
    expect(memoryStats(DEV).liveBytes).toBe(live0);
    table.dispose();
  });
});
