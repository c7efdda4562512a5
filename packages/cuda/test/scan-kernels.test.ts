// cumsum's chunked path (native/src/kernels/reduce.cu, cumsum_chunk_*) on the emulator (or a GPU): integer
// lines few and long enough to be scanned in chunks (chunk sums, their offsets, each chunk's scan)
// must give the CPU backend's values exactly, across chunk boundaries, uneven last chunks, an inner
// stride (the MoE routing map's [T, E] scanned down T) and int32 / int64; short or many lines and
// floats keep the in-order scan, checked beside them.
import { cumsum, type DType, tensor, tidy } from '@megapatch/tensor';
import { describe, expect, it } from 'vitest';
import { deviceUnderTest } from './device-under-test.js';

// MEGAPATCH_TEST_DEVICE=cuda:0 runs the same on a GPU (gpu/run.sh's scan step)
const { device: DEV, skip, register } = deviceUnderTest();
if (!skip) await register();

/** Seeded integers in [-range, range) (an LCG), or 0/1 hits when range is 0. */
function ints(n: number, seed: number, range: number): number[] {
  let a = seed;
  return Array.from({ length: n }, () => {
    a = (a * 1103515245 + 12345) % 2147483648;
    return range === 0 ? (a % 3 === 0 ? 1 : 0) : (a % (2 * range)) - range;
  });
}

function scanOn(device: string, data: number[], shape: number[], dtype: DType, dim: number): number[] {
  return tidy(() => {
    const x = tensor(data, { shape, dtype }).to(device);
    const y = cumsum(x, dim);
    return Array.from(y.toTypedArray() as ArrayLike<number | bigint>, Number);
  });
}

describe.skipIf(skip !== '')(`cumsum on few long integer lines${skip ? ` (skipped: ${skip})` : ''}`, () => {
  it.each([
    // [shape, dim, dtype, range]
    [[4096, 64], 0, 'int64', 0], // a routing map's hits [T, E] down T: 64 lines of 4096
    [[1, 100_003], 1, 'int64', 1000], // one long line, inner 1, an uneven last chunk
    [[3, 5000, 2], 1, 'int32', 50_000], // outer and inner strides, int32
    [[2, 65, 3], 1, 'int64', 7], // just past the chunked path's minimum length
    [[2, 63, 3], 1, 'int64', 7], // just below it: the in-order scan
    [[40_000, 3], 1, 'int64', 9], // many short lines: the in-order scan
  ] as const)('%j along %i, %s: the CPU values', (shape, dim, dtype, range) => {
    const n = (shape as readonly number[]).reduce((a, b) => a * b, 1);
    const data = ints(n, n + dim, range);
    const want = scanOn('cpu', data, [...shape], dtype, dim);
    const got = scanOn(DEV, data, [...shape], dtype, dim);
    let first = -1;
    for (let i = 0; i < want.length && first < 0; i++) if (got[i] !== want[i]) first = i;
    expect(first, 'first differing element').toBe(-1);
  });

  it('floats keep the in-order scan in double: the CPU bits on a long line', () => {
    const data = ints(20_000, 5, 1 << 20).map((v) => v * 2 ** -17 + 0.1);
    expect(scanOn(DEV, data, [1, 20_000], 'float32', 1)).toEqual(
      scanOn('cpu', data, [1, 20_000], 'float32', 1),
    );
  });
});
