// The collectives of the token dispatchers, on rows (dim 0) of uneven sizes: each rank of a group
// may hold another number of tokens. The autograd functions pair a collective with its transpose
// as Megatron's tensor-parallel mappings do: all-to-all / the reverse all-to-all, all-gather /
// reduce-scatter, split / gather. Equal sizes use the group's all-gather and reduce-scatter;
// uneven ones go through one all-to-all. Tensors travel flattened to 1-D, which lets any part be
// empty.
import type { ProcessGroup } from '@megapatch/parallel';
import {
  attachGrad,
  cat,
  empty,
  fromTypedArray,
  needsGrad,
  noGrad,
  type Tensor,
  tidy,
} from '@megapatch/tensor';

/** Elements per row of a [n, ...rest] tensor. */
function rowSize(x: Tensor): number {
  return x.shape.slice(1).reduce((a, b) => a * b, 1);
}

function sum(xs: readonly number[]): number {
  return xs.reduce((a, b) => a + b, 0);
}

function allEqual(xs: readonly number[]): boolean {
  return xs.every((v) => v === xs[0]);
}

/** Runs `forward` outside autograd and records `backward` as the gradient of the result. */
function differentiable(
  name: string,
  x: Tensor,
  forward: (x: Tensor) => Tensor,
  backward: (g: Tensor) => Tensor,
): Tensor {
  x.checkAlive(name);
  const out = tidy(() => noGrad(() => forward(x)));
  if (needsGrad(x)) attachGrad(out, name, [x], [], (g) => [tidy(() => backward(g))]);
  return out;
}

// ---- plain collectives (no autograd) --------------------------------------------------------------

/** torch's all_to_all_single on rows: sendCounts[j] rows go to rank j, recvCounts[j] come from it. */
function allToAllRaw(
  x: Tensor,
  sendCounts: readonly number[],
  recvCounts: readonly number[],
  group: ProcessGroup,
): Tensor {
  const rest = x.shape.slice(1);
  const r = rowSize(x);
  const input = x.contiguous().reshape(x.numel);
  const out = empty([sum(recvCounts) * r], { dtype: x.dtype, device: x.device });
  group
    .allToAll(
      out,
      input,
      recvCounts.map((c) => c * r),
      sendCounts.map((c) => c * r),
    )
    .waitSync();
  return out.reshape(sum(recvCounts), ...rest);
}

/** Every rank's rows in rank order, rank j holding counts[j] of them. */
function allGatherRaw(x: Tensor, counts: readonly number[], group: ProcessGroup): Tensor {
  const rest = x.shape.slice(1);
  if (allEqual(counts)) {
    if (counts[0] === 0) return empty([0, ...rest], { dtype: x.dtype, device: x.device });
    const out = empty([counts[0] * group.size, ...rest], { dtype: x.dtype, device: x.device });
    group.allGatherIntoTensor(out, x.contiguous()).waitSync();
    return out;
  }
  // every rank sends its whole block to every rank
  const copies = cat(
    Array.from({ length: group.size }, () => x),
    0,
  );
  return allToAllRaw(
    copies,
    counts.map(() => x.shape[0]),
    counts,
    group,
  );
}

/** The sum over ranks of their block `group.rank` (rank j's block has counts[j] rows). */
function reduceScatterRaw(x: Tensor, counts: readonly number[], group: ProcessGroup): Tensor {
  const rest = x.shape.slice(1);
  const mine = counts[group.rank];
  if (allEqual(counts)) {
    if (mine === 0) return empty([0, ...rest], { dtype: x.dtype, device: x.device });
    const out = empty([mine, ...rest], { dtype: x.dtype, device: x.device });
    group.reduceScatterTensor(out, x.contiguous(), 'sum').waitSync();
    return out;
  }
  const parts = allToAllRaw(
    x,
    counts,
    counts.map(() => mine),
    group,
  );
  // rank order, as a reduction over the group would add them
  let acc = parts.narrow(0, 0, mine);
  for (let j = 1; j < group.size; j++) acc = acc.add(parts.narrow(0, j * mine, mine));
  return acc.contiguous();
}

// ---- autograd functions ---------------------------------------------------------------------------

/**
 * All-to-all of rows over `group`: sendCounts[j] rows of x (in order) go to rank j, and the result
 * holds recvCounts[j] rows from each rank j in rank order. Backward: the reverse all-to-all.
 */
export function allToAllRows(
  x: Tensor,
  sendCounts: readonly number[],
  recvCounts: readonly number[],
  group: ProcessGroup,
): Tensor {
  return differentiable(
    'AllToAllRows',
    x,
    (t) => allToAllRaw(t, sendCounts, recvCounts, group),
    (g) => allToAllRaw(g, recvCounts, sendCounts, group),
  );
}

/**
 * Every rank's rows stacked in rank order (counts[j] from rank j). Backward: each rank keeps the
 * sum over ranks of the gradient of its own rows (the experts of every rank used them).
 */
export function allGatherRows(x: Tensor, counts: readonly number[], group: ProcessGroup): Tensor {
  return differentiable(
    'AllGatherRows',
    x,
    (t) => allGatherRaw(t, counts, group),
    (g) => reduceScatterRaw(g, counts, group),
  );
}

/** The sum over ranks of each rank's block (counts[j] rows for rank j) of x. Backward: all-gather. */
export function reduceScatterRows(x: Tensor, counts: readonly number[], group: ProcessGroup): Tensor {
  return differentiable(
    'ReduceScatterRows',
    x,
    (t) => reduceScatterRaw(t, counts, group),
    (g) => allGatherRaw(g, counts, group),
  );
}

/**
 * This rank's block of rows of x, replicated on the group (blocks of counts[j] rows in rank
 * order). Backward all-gathers the blocks' gradients: Megatron's scatter to the sequence-parallel
 * region, with uneven blocks.
 */
export function splitRows(x: Tensor, counts: readonly number[], group: ProcessGroup): Tensor {
  let start = 0;
  for (let j = 0; j < group.rank; j++) start += counts[j];
  const n = counts[group.rank];
  return differentiable(
    'SplitRows',
    x,
    (t) => t.narrow(0, start, n).contiguous(),
    (g) => allGatherRaw(g, counts, group),
  );
}

/**
 * The blocks of every rank stacked in rank order, replicated on the group. Backward keeps this
 * rank's block of the (replicated) gradient: Megatron's gather from the sequence-parallel region
 * without a tensor-parallel output gradient, with uneven blocks.
 */
export function gatherRows(x: Tensor, counts: readonly number[], group: ProcessGroup): Tensor {
  let start = 0;
  for (let j = 0; j < group.rank; j++) start += counts[j];
  const n = counts[group.rank];
  return differentiable(
    'GatherRows',
    x,
    (t) => allGatherRaw(t, counts, group),
    (g) => g.narrow(0, start, n).contiguous(),
  );
}

/** Every rank's `values` concatenated in rank order, rank j holding counts[j] of them. */
export function allGatherIntsV(
  values: Int32Array,
  counts: readonly number[],
  group: ProcessGroup,
): Int32Array {
  return noGrad(() =>
    tidy(() => {
      const out = allGatherRaw(fromTypedArray(Int32Array.from(values), [values.length]), counts, group);
      return Int32Array.from(out.toTypedArray() as Int32Array);
    }),
  );
}

/** Every rank's `values` (the same length on all ranks), in rank order. */
export function allGatherInts(values: Int32Array, group: ProcessGroup): Int32Array[] {
  const n = values.length;
  const all = allGatherIntsV(values, new Array<number>(group.size).fill(n), group);
  return Array.from({ length: group.size }, (_, j) => all.slice(j * n, (j + 1) * n));
}

/**
 * Every rank's [rows, counts...] in rank order, from this rank's `counts` [E] (integers) on its
 * device: gathered there and read once (Int32Array [E + 1] per rank).
 */
export function allGatherCountsOnDevice(rows: number, counts: Tensor, group: ProcessGroup): Int32Array[] {
  const n = counts.numel + 1;
  const all = noGrad(() =>
    tidy(() => {
      const mine = cat(
        [fromTypedArray(Int32Array.of(rows), [1], { device: counts.device }), counts.to('int32')],
        0,
      );
      const out = allGatherRaw(mine, new Array<number>(group.size).fill(n), group);
      return Int32Array.from(out.toTypedArray() as Int32Array);
    }),
  );
  return Array.from({ length: group.size }, (_, j) => all.slice(j * n, (j + 1) * n));
}
