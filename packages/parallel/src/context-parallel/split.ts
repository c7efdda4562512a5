// Megatron's load-balanced context-parallel split (get_batch_on_this_cp_rank): a sequence is cut
// into 2·cp equal chunks and CP rank r keeps chunks r and 2·cp−1−r, so that under causal attention
// every rank gets the same amount of work (an early chunk sees few keys, its partner many).
// Packed rows (Megatron's THD format, Transformer Engine's cu_seqlens) split each sample the same
// way, so every sample's length must be a multiple of 2·cp; the local boundaries are the global
// ones divided by cp. Everything here is index bookkeeping: no communication except the gather.
import { cat, empty, type Tensor, tensor, tidy } from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import type { ProcessGroup } from '../process-group.js';

/** A CP rank: a ProcessGroup, or just its size and this rank's place in it. */
export interface ContextParallelRank {
  readonly size: number;
  readonly rank: number;
}

/** Cumulative sample boundaries of a packed row: int32/int64 [nseq + 1] or plain numbers. */
export type CuSeqlens = Tensor | readonly number[];

/** Options of the split functions. */
export interface ContextParallelSplitOptions {
  /** The sequence dimension (default 0: Megatron's [s, b, h]; use 2 for attention's [b, h, s, d]). */
  seqDim?: number;
  /** Packed row: the boundaries of its samples in the full sequence (0 … seqLen). */
  cuSeqlens?: CuSeqlens | null;
}

/** Where this rank's tokens come from, for one sequence or packed row. */
export interface ContextParallelPlan {
  readonly cpSize: number;
  readonly cpRank: number;
  /** Full sequence length. */
  readonly seqLen: number;
  /** Tokens on this rank: seqLen / cp. */
  readonly localLen: number;
  /** Index in the full sequence of each local token, in local order. */
  readonly tokenIndices: readonly number[];
  /** Position of each local token: its index within its sample (packed) or the sequence. */
  readonly positionIds: readonly number[];
  /** Packed rows: the full boundaries and this rank's (each divided by cp); null otherwise. */
  readonly cuSeqlens: readonly number[] | null;
  readonly localCuSeqlens: readonly number[] | null;
}

function fail(op: string, message: string): never {
  throw new DistributedError('INVALID_ARGUMENT', `${op}: ${message}`);
}

function checkRank(op: string, cp: ContextParallelRank): void {
  if (
    !Number.isInteger(cp.size) ||
    cp.size < 1 ||
    !Number.isInteger(cp.rank) ||
    cp.rank < 0 ||
    cp.rank >= cp.size
  ) {
    fail(op, `rank ${cp.rank} of a context-parallel group of size ${cp.size} is not valid`);
  }
}

/** The boundaries as numbers, checked: [0, …, seqLen], non-decreasing integers. */
export function readCuSeqlens(op: string, cu: CuSeqlens, seqLen?: number): number[] {
  let vals: number[];
  if (Array.isArray(cu)) vals = [...(cu as readonly number[])];
  else {
    const t = cu as Tensor;
    if (t.dtype !== 'int32' && t.dtype !== 'int64')
      fail(op, `cuSeqlens must be int32 or int64, got ${t.dtype}`);
    if (t.ndim !== 1) fail(op, `cuSeqlens must be 1-D [nseq + 1], got [${t.shape}]`);
    vals = Array.from(t.toTypedArray() as ArrayLike<number | bigint>, Number);
  }
  if (vals.length < 2 || vals[0] !== 0) {
    fail(op, `cuSeqlens must start at 0 and hold at least 2 entries, got [${vals}]`);
  }
  for (let i = 1; i < vals.length; i++) {
    if (!Number.isInteger(vals[i]) || vals[i] < vals[i - 1]) {
      fail(op, `cuSeqlens must be non-decreasing integers, got ${vals[i - 1]} then ${vals[i]} at index ${i}`);
    }
  }
  const last = vals[vals.length - 1];
  if (seqLen !== undefined && last !== seqLen) {
    fail(op, `cuSeqlens ends at ${last} but the sequence has ${seqLen} tokens`);
  }
  return vals;
}

/** Sample boundaries rounded up so that every sample's length is a multiple of 2·cp (pad at each sample's end). */
export function padCuSeqlensForContextParallel(cuSeqlens: CuSeqlens, cpSize: number): number[] {
  const cu = readCuSeqlens('padCuSeqlensForContextParallel', cuSeqlens);
  const m = 2 * cpSize;
  const out = [0];
  for (let i = 1; i < cu.length; i++) out.push(out[i - 1] + Math.ceil((cu[i] - cu[i - 1]) / m) * m);
  return out;
}

/**
 * Which tokens of a sequence of `seqLen` tokens (or of a packed row with `cuSeqlens`) CP rank
 * `cp.rank` holds: chunks r and 2·cp−1−r of the sequence, or of every sample.
 */
export function contextParallelPlan(
  seqLen: number,
  cp: ContextParallelRank,
  options: { cuSeqlens?: CuSeqlens | null } = {},
): ContextParallelPlan {
  const op = 'contextParallelPlan';
  checkRank(op, cp);
  const n = cp.size;
  const r = cp.rank;
  const chunks = 2 * n;
  const cu = options.cuSeqlens ? readCuSeqlens(op, options.cuSeqlens, seqLen) : null;
  const samples = cu ?? [0, seqLen];
  if (!cu && seqLen % chunks !== 0) {
    const up = Math.ceil(seqLen / chunks) * chunks;
    fail(
      op,
      `sequence length ${seqLen} is not divisible by 2·cp = ${chunks} (cp = ${n}); pad the sequence to a multiple of ${chunks} (e.g. ${up} tokens)`,
    );
  }
  const tokenIndices: number[] = [];
  const positionIds: number[] = [];
  for (let s = 0; s + 1 < samples.length; s++) {
    const start = samples[s];
    const len = samples[s + 1] - start;
    if (len % chunks !== 0) {
      const up = Math.ceil(len / chunks) * chunks;
      fail(
        op,
        `sample ${s} of the packed row (tokens ${start}..${start + len - 1}, length ${len}) is not divisible by 2·cp = ${chunks}; pad each sample at its end to a multiple of ${chunks} (here ${up}; padCuSeqlensForContextParallel gives the boundaries), as Transformer Engine requires for packed sequences with context parallelism`,
      );
    }
    const c = len / chunks;
    for (const chunk of [r, chunks - 1 - r]) {
      for (let j = 0; j < c; j++) {
        tokenIndices.push(start + chunk * c + j);
        positionIds.push(chunk * c + j);
      }
    }
  }
  return {
    cpSize: n,
    cpRank: r,
    seqLen,
    localLen: seqLen / n,
    tokenIndices,
    positionIds,
    cuSeqlens: cu,
    localCuSeqlens: cu ? cu.map((x) => x / n) : null,
  };
}

function seqDimOf(op: string, x: Tensor, seqDim: number | undefined): number {
  const d = seqDim ?? 0;
  const nd = d < 0 ? d + x.ndim : d;
  if (!Number.isInteger(nd) || nd < 0 || nd >= x.ndim) {
    fail(op, `seqDim ${d} is out of range for a tensor of shape [${x.shape}]`);
  }
  return nd;
}

function indexTensor(values: readonly number[], device: string): Tensor {
  return tensor(Int32Array.from(values), { dtype: 'int32', device });
}

/**
 * This CP rank's part of a full sequence: x [s, b, ...] (sequence along `seqDim`, default 0) ->
 * [s/cp, b, ...] holding chunks r and 2·cp−1−r, concatenated (with `cuSeqlens`: those chunks of
 * every sample, sample after sample). Differentiable; any dtype.
 */
export function contextParallelSplit(
  x: Tensor,
  cp: ContextParallelRank,
  options: ContextParallelSplitOptions = {},
): Tensor {
  const op = 'contextParallelSplit';
  x.checkAlive(op);
  const d = seqDimOf(op, x, options.seqDim);
  const plan = contextParallelPlan(x.shape[d], cp, { cuSeqlens: options.cuSeqlens });
  if (cp.size === 1) return x.narrow(d, 0, x.shape[d]);
  return tidy(() => x.indexSelect(d, indexTensor(plan.tokenIndices, x.device)));
}

/**
 * The inverse of {@link contextParallelSplit} without communication: `parts[r]` is CP rank r's
 * local tensor (sequence along `seqDim`); returns the full sequence. `cuSeqlens` are the full
 * row's boundaries, as given to the split. Differentiable.
 */
export function contextParallelUnsplit(
  parts: readonly Tensor[],
  options: ContextParallelSplitOptions = {},
): Tensor {
  const op = 'contextParallelUnsplit';
  if (parts.length === 0) fail(op, 'expected one tensor per CP rank, got none');
  const n = parts.length;
  const d = seqDimOf(op, parts[0], options.seqDim);
  const localLen = parts[0].shape[d];
  for (const [r, p] of parts.entries()) {
    p.checkAlive(op);
    if (p.ndim !== parts[0].ndim || p.shape.some((s, i) => s !== parts[0].shape[i])) {
      fail(op, `rank ${r}'s part [${p.shape}] differs in shape from rank 0's [${parts[0].shape}]`);
    }
  }
  const seqLen = localLen * n;
  // the concatenation of the parts is rank 0's tokens, then rank 1's, …: invert that order
  const inverse = new Array<number>(seqLen);
  for (let r = 0; r < n; r++) {
    const plan = contextParallelPlan(seqLen, { size: n, rank: r }, { cuSeqlens: options.cuSeqlens });
    plan.tokenIndices.forEach((g, j) => {
      inverse[g] = r * localLen + j;
    });
  }
  if (n === 1) return parts[0].narrow(d, 0, localLen);
  return tidy(() => cat(parts, d).indexSelect(d, indexTensor(inverse, parts[0].device)));
}

/**
 * The full sequence back from every CP rank's part (all-gather over `cpGroup`, then
 * {@link contextParallelUnsplit}): xLocal [s/cp, b, ...] -> [s, b, ...] on every rank. Not
 * differentiable (the result is a plain tensor); meant for outputs, checks and logging.
 */
export function contextParallelGather(
  xLocal: Tensor,
  cpGroup: ProcessGroup,
  options: ContextParallelSplitOptions = {},
): Tensor {
  const op = 'contextParallelGather';
  xLocal.checkAlive(op);
  seqDimOf(op, xLocal, options.seqDim);
  return tidy(() => {
    const input = xLocal.detach().contiguous();
    const parts = Array.from({ length: cpGroup.size }, () =>
      empty(input.shape, { dtype: input.dtype, device: input.device }),
    );
    if (cpGroup.size > 1) cpGroup.allGather(parts, input).waitSync();
    else parts[0].copy_(input);
    return contextParallelUnsplit(parts, options);
  });
}

/** Position ids [s/cp] (int64) of this rank's tokens: the index in the sequence, or within the sample for packed rows. */
export function contextParallelPositionIds(
  seqLen: number,
  cp: ContextParallelRank,
  options: { cuSeqlens?: CuSeqlens | null; device?: string } = {},
): Tensor {
  const plan = contextParallelPlan(seqLen, cp, options);
  return tensor(BigInt64Array.from(plan.positionIds, BigInt), { dtype: 'int64', device: options.device });
}

/**
 * A packed row's boundaries on every CP rank (each sample keeps 2 of its 2·cp chunks, so each
 * boundary is divided by cp): int32 [nseq + 1], or the input's dtype and device when it is a
 * tensor. This is what ringAttention's `cuSeqlens` expects.
 */
export function contextParallelCuSeqlens(cuSeqlens: CuSeqlens, cpSize: number): Tensor {
  const op = 'contextParallelCuSeqlens';
  const cu = readCuSeqlens(op, cuSeqlens);
  const plan = contextParallelPlan(cu[cu.length - 1], { size: cpSize, rank: 0 }, { cuSeqlens: cu });
  const local = plan.localCuSeqlens as readonly number[];
  if (Array.isArray(cuSeqlens)) return tensor(Int32Array.from(local), { dtype: 'int32' });
  const t = cuSeqlens as Tensor;
  return t.dtype === 'int64'
    ? tensor(BigInt64Array.from(local, BigInt), { dtype: 'int64', device: t.device })
    : tensor(Int32Array.from(local), { dtype: 'int32', device: t.device });
}
