// The collective interface every backend implements (Gloo for CPU tensors here; NCCL for CUDA
// tensors with @megapatch/cuda). Ranks passed to a group's methods are ranks *within the group*
// (0 .. size-1); `group.ranks[i]` is the global rank of group rank i.
import type { Tensor } from '@megapatch/tensor';

/** Reductions. `avg` is a sum divided by the group size (floating-point dtypes only). */
export type ReduceOp = 'sum' | 'avg' | 'max' | 'min';

/**
 * The handle of one collective or point-to-point operation. The operation runs off Node's main
 * thread; ops on one group complete in the order they were issued. The tensors an operation
 * uses stay alive (their storage is retained) until it completes, even if the caller disposes
 * them.
 */
export interface Work {
  /** Resolves when the operation has completed; rejects with a `DistributedError` when it failed. */
  wait(): Promise<void>;
  /**
   * Blocks the calling thread until the operation completes (the event loop stops meanwhile).
   * Layers inside forward/backward use it, since autograd is synchronous; throws on failure.
   */
  waitSync(): void;
  /** Whether the operation has finished (successfully or not). */
  isCompleted(): boolean;
}

/** A group of processes that run collectives together. */
export interface ProcessGroup {
  /** Backend name: 'gloo' (CPU tensors) or 'nccl' (CUDA tensors). */
  readonly backend: string;
  /** A name used in error messages, e.g. 'world', 'tp', 'dp-cp'. */
  readonly name: string;
  /** This process's rank within the group. */
  readonly rank: number;
  /** Number of processes in the group. */
  readonly size: number;
  /** Global ranks of the group's members, in group-rank order. */
  readonly ranks: readonly number[];
  /** Timeout of each operation, in milliseconds. */
  readonly timeoutMs: number;

  /** In place: every rank's `tensor` becomes the reduction over the group. */
  allReduce(tensor: Tensor, op?: ReduceOp): Work;
  /** `outputs[i]` receives rank i's `input` (one tensor per rank, each shaped like `input`). */
  allGather(outputs: readonly Tensor[], input: Tensor): Work;
  /** Rank i's `input` lands in `output` rows [i·n, (i+1)·n) of dim 0 (torch's all_gather_into_tensor). */
  allGatherIntoTensor(output: Tensor, input: Tensor): Work;
  /** `output` = the reduction over ranks of their `inputs[rank]` (one input per rank). */
  reduceScatter(output: Tensor, inputs: readonly Tensor[], op?: ReduceOp): Work;
  /** `output` = the reduction of slice `rank` (along dim 0) of every rank's `input` (torch's reduce_scatter_tensor). */
  reduceScatterTensor(output: Tensor, input: Tensor, op?: ReduceOp): Work;
  /** In place: every rank's `tensor` becomes group rank `src`'s. */
  broadcast(tensor: Tensor, src: number): Work;
  /** Sends `tensor` to group rank `dst` (matched in order with `recv` on `dst`). */
  send(tensor: Tensor, dst: number, tag?: number): Work;
  /** Receives into `tensor` from group rank `src`. */
  recv(tensor: Tensor, src: number, tag?: number): Work;
  /**
   * torch's all_to_all_single: `input` is cut along dim 0 into `inputSplitSizes` (equal parts when
   * omitted), part j goes to rank j; `output` holds the parts received, in rank order, sized by
   * `outputSplitSizes`.
   */
  allToAll(
    output: Tensor,
    input: Tensor,
    outputSplitSizes?: readonly number[],
    inputSplitSizes?: readonly number[],
  ): Work;
  /** Completes when every rank of the group has reached it. */
  barrier(): Work;
  /**
   * torch's batch_isend_irecv: sends and receives that progress together (one NCCL group on a
   * device), so exchanges in a ring or both ways between neighbours cannot block each other.
   * Optional: use the free function {@link batchIsendIrecv}, which falls back to send/recv.
   */
  batchIsendIrecv?(ops: readonly P2POp[]): Work[];
  /** Frees the group's connections and thread; later calls throw. Idempotent. */
  destroy(): void;
}

/** One point-to-point operation of {@link batchIsendIrecv} (torch's P2POp). */
export interface P2POp {
  op: 'isend' | 'irecv';
  tensor: Tensor;
  /** Group rank of the peer. */
  peer: number;
  tag?: number;
}

/**
 * Posts `ops` together (torch.distributed.batch_isend_irecv): through the group's own batching
 * when it has one (NCCL), else as separate sends and receives. Returns one Work per op, in order.
 */
export function batchIsendIrecv(group: ProcessGroup, ops: readonly P2POp[]): Work[] {
  if (group.batchIsendIrecv) return group.batchIsendIrecv(ops);
  return ops.map((o) =>
    o.op === 'isend' ? group.send(o.tensor, o.peer, o.tag) : group.recv(o.tensor, o.peer, o.tag),
  );
}

/**
 * The row counts of an all-to-all over a group of `size` (torch's all_to_all_single rules): the
 * split sizes given, or equal parts of dim 0; and the elements per row. Throws (with `fail`'s
 * message prefix) when input and output differ beyond dim 0 or the splits do not add up.
 */
export function allToAllSplits(
  size: number,
  output: Tensor,
  input: Tensor,
  outputSplitSizes: readonly number[] | undefined,
  inputSplitSizes: readonly number[] | undefined,
  fail: (message: string) => never,
): { ins: number[]; outs: number[]; rowElems: number } {
  const rows = (t: Tensor) => (t.ndim === 0 ? 1 : t.shape[0]);
  const rowElems = (t: Tensor) => (t.ndim <= 1 ? 1 : t.numel / t.shape[0]);
  if (rowElems(input) !== rowElems(output)) {
    fail(`input ${input.describe()} and output ${output.describe()} differ beyond dim 0`);
  }
  const splits = (given: readonly number[] | undefined, t: Tensor, what: string): number[] => {
    if (!given) {
      if (rows(t) % size !== 0) {
        fail(
          `dim 0 of the ${what} ${t.describe()} is not divisible by the group size ${size}; pass split sizes`,
        );
      }
      return new Array(size).fill(rows(t) / size);
    }
    const sum = given.reduce((a, b) => a + b, 0);
    if (given.length !== size || given.some((s) => !Number.isInteger(s) || s < 0) || sum !== rows(t)) {
      fail(
        `${what} split sizes [${given.join(',')}] must be ${size} non-negative integers summing to dim 0 of ${t.describe()}`,
      );
    }
    return [...given];
  };
  return {
    ins: splits(inputSplitSizes, input, 'input'),
    outs: splits(outputSplitSizes, output, 'output'),
    rowElems: rowElems(input),
  };
}
