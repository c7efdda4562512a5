// Boxes of N-d row-major tensors: tiling checks and copying the overlap of two boxes.
import { ConvertError } from '../errors.js';

/** A box of a global tensor: start index and extent per dim. */
export interface Region {
  readonly offsets: readonly number[];
  readonly shape: readonly number[];
}

/** Element count of a shape. */
export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** The overlap of two boxes of the same rank, or null when it holds no element. */
export function intersect(a: Region, b: Region): Region | null {
  const offsets: number[] = [];
  const shape: number[] = [];
  for (let d = 0; d < a.shape.length; d++) {
    const lo = Math.max(a.offsets[d], b.offsets[d]);
    const hi = Math.min(a.offsets[d] + a.shape[d], b.offsets[d] + b.shape[d]);
    if (hi <= lo) return null;
    offsets.push(lo);
    shape.push(hi - lo);
  }
  return { offsets, shape };
}

/** True when `inner` lies inside a tensor of shape `outer`. */
export function inBounds(r: Region, globalShape: readonly number[]): boolean {
  return (
    r.offsets.length === globalShape.length &&
    r.shape.length === globalShape.length &&
    r.offsets.every((o, d) => Number.isSafeInteger(o) && o >= 0 && o + r.shape[d] <= globalShape[d]) &&
    r.shape.every((s) => Number.isSafeInteger(s) && s >= 0)
  );
}

/**
 * Checks that `pieces` tile `globalShape` exactly. In-bounds boxes that pairwise do not overlap and
 * whose volumes add up to the global volume cover it with no gap, so no cell-by-cell scan is needed.
 */
export function checkTiling(
  name: string,
  globalShape: readonly number[],
  pieces: readonly Region[],
  file?: string,
): void {
  const where = `tensor ${JSON.stringify(name)}`;
  const fmt = (r: Region) => `offsets [${r.offsets.join(',')}] shape [${r.shape.join(',')}]`;
  for (const p of pieces) {
    if (!inBounds(p, globalShape)) {
      throw new ConvertError(
        'SHAPE_MISMATCH',
        `${where}: piece at ${fmt(p)} is outside the global shape [${globalShape.join(',')}]`,
        file,
      );
    }
  }
  for (let i = 0; i < pieces.length; i++) {
    for (let j = i + 1; j < pieces.length; j++) {
      if (numel(pieces[i].shape) > 0 && numel(pieces[j].shape) > 0 && intersect(pieces[i], pieces[j])) {
        throw new ConvertError(
          'SHAPE_MISMATCH',
          `${where}: pieces at ${fmt(pieces[i])} and ${fmt(pieces[j])} overlap`,
          file,
        );
      }
    }
  }
  const covered = pieces.reduce((s, p) => s + numel(p.shape), 0);
  const total = numel(globalShape);
  if (covered !== total) {
    throw new ConvertError(
      'SHAPE_MISMATCH',
      `${where}: pieces cover ${covered} of its ${total} elements (a gap in the global shape [${globalShape.join(',')}])`,
      file,
    );
  }
}

/** Row-major strides (in elements) of a shape. */
function strides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length).fill(1);
  for (let d = shape.length - 2; d >= 0; d--) s[d] = s[d + 1] * shape[d + 1];
  return s;
}

/**
 * Copies the box `region` (global coordinates) from `src` (holding box `srcBox`) into `dst`
 * (holding box `dstBox`); `region` must lie inside both. Copies contiguous runs of the last dim.
 */
export function copyRegion(
  src: Uint8Array,
  srcBox: Region,
  dst: Uint8Array,
  dstBox: Region,
  region: Region,
  elemSize: number,
): void {
  const rank = region.shape.length;
  if (rank === 0) {
    dst.set(src.subarray(0, elemSize), 0);
    return;
  }
  if (numel(region.shape) === 0) return;
  // Whole rows in both boxes: the overlap is one contiguous block on each side.
  let wholeRows = true;
  for (let d = 1; d < rank; d++) {
    if (region.shape[d] !== srcBox.shape[d] || region.shape[d] !== dstBox.shape[d]) wholeRows = false;
  }
  if (wholeRows) {
    const row = numel(region.shape.slice(1)) * elemSize;
    const s0 = (region.offsets[0] - srcBox.offsets[0]) * row;
    const d0 = (region.offsets[0] - dstBox.offsets[0]) * row;
    dst.set(src.subarray(s0, s0 + region.shape[0] * row), d0);
    return;
  }
  const ss = strides(srcBox.shape);
  const ds = strides(dstBox.shape);
  const runBytes = region.shape[rank - 1] * elemSize;
  // Odometer over every dim but the last.
  const idx = new Array<number>(rank - 1).fill(0);
  for (;;) {
    let so = 0;
    let doff = 0;
    for (let d = 0; d < rank; d++) {
      const g = region.offsets[d] + (d < rank - 1 ? idx[d] : 0);
      so += (g - srcBox.offsets[d]) * ss[d];
      doff += (g - dstBox.offsets[d]) * ds[d];
    }
    dst.set(src.subarray(so * elemSize, so * elemSize + runBytes), doff * elemSize);
    let d = rank - 2;
    while (d >= 0) {
      idx[d]++;
      if (idx[d] < region.shape[d]) break;
      idx[d] = 0;
      d--;
    }
    if (d < 0) return;
  }
}
