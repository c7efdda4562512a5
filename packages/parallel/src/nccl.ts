// ProcessGroup on a device's collective library (NCCL for CUDA tensors, through @megapatch/cuda's
// backend): the operations are queued on the device's stream, ordered with the kernels that
// produce and consume their tensors, so a Work is complete as far as every later kernel or host
// read is concerned when the call returns (as torch's NCCL work after wait()). A Gloo group makes
// one of these per device on the first collective over that device's tensors (all ranks reach
// that call together), sending NCCL's unique id from its rank 0 to the others over Gloo.
import {
  cat,
  type DeviceCollectives,
  type DeviceCommunicator,
  type DType,
  empty,
  noGrad,
  type Tensor,
  tidy,
} from '@megapatch/tensor';
import type { PeerCheck } from './collective-checks.js';
import { DistributedError } from './errors.js';
import { allToAllSplits, type P2POp, type ProcessGroup, type ReduceOp, type Work } from './process-group.js';

const SUPPORTED: ReadonlySet<DType> = new Set<DType>([
  'float32',
  'bfloat16',
  'float16',
  'float64',
  'int32',
  'int64',
  'uint8',
  'bool',
]);

/** A Work that had finished when it was returned (its failure was thrown by the call itself). */
const DONE: Work = {
  wait: () => Promise.resolve(),
  waitSync: () => {},
  isCompleted: () => true,
};

/**
 * Runs every check (each one consumes its peer's side, so none may be skipped), then throws the
 * first failure.
 */
function verifyAll(checks: readonly ((() => void) | undefined)[]): void {
  let first: unknown = null;
  for (const verify of checks) {
    try {
      verify?.();
    } catch (e) {
      first ??= e;
    }
  }
  if (first) throw first;
}

/** Options of a {@link NcclProcessGroup}: who the group is and the communicator it runs on. */
export interface NcclGroupOptions {
  name: string;
  rank: number;
  ranks: readonly number[];
  timeoutMs: number;
  /** The device of every tensor of the group, e.g. 'cuda:0'. */
  device: string;
  /** The library that made `comm` (its name appears in errors). */
  library: string;
  comm: DeviceCommunicator;
  /** A host-side barrier over the same ranks (the Gloo group's). */
  barrier: () => Work;
  /**
   * With detail checks: compares each send and receive with its peer's side before it is queued
   * (the Gloo group's messages). Collectives are checked by the Gloo group before they get here.
   */
  peerCheck?: PeerCheck;
}

/** A ProcessGroup over one device communicator (NCCL). Made by a Gloo group; see the file comment. */
export class NcclProcessGroup implements ProcessGroup {
  readonly backend = 'nccl';
  readonly name: string;
  readonly rank: number;
  readonly size: number;
  readonly ranks: readonly number[];
  readonly timeoutMs: number;
  /** The device of the group's tensors. */
  readonly device: string;
  /** The collective library and its version. */
  readonly library: string;
  private comm: DeviceCommunicator | null;
  private readonly hostBarrier: () => Work;
  private readonly peerCheck: PeerCheck | undefined;

  constructor(o: NcclGroupOptions) {
    this.name = o.name;
    this.rank = o.rank;
    this.ranks = [...o.ranks];
    this.size = o.ranks.length;
    this.timeoutMs = o.timeoutMs;
    this.device = o.device;
    this.library = o.library;
    this.comm = o.comm;
    this.hostBarrier = o.barrier;
    this.peerCheck = o.peerCheck;
  }

  /**
   * Joins the communicator of a group: group rank 0 makes the id and `shareId` gives every rank
   * rank 0's bytes (the Gloo group broadcasts them); blocks until every rank has joined.
   */
  static connect(
    collectives: DeviceCollectives,
    shareId: (id: Uint8Array) => Uint8Array,
    o: Omit<NcclGroupOptions, 'comm' | 'library'>,
  ): NcclProcessGroup {
    // only rank 0 calls uniqueId (NCCL's starts a bootstrap listener there)
    const mine = o.rank === 0 ? collectives.uniqueId() : new Uint8Array(collectives.idBytes);
    const id = shareId(mine);
    const comm = collectives.connect(id, o.ranks.length, o.rank);
    return new NcclProcessGroup({ ...o, comm, library: collectives.name });
  }

  private fail(op: string, message: string): never {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `${op} on group '${this.name}' (${this.library}): ${message}`,
    );
  }

  private live(op: string): DeviceCommunicator {
    if (!this.comm)
      throw new DistributedError('NOT_INITIALIZED', `${op} on group '${this.name}': the group was destroyed`);
    return this.comm;
  }

  private check(op: string, t: Tensor, what = 'tensor'): void {
    t.checkAlive(op);
    if (t.device !== this.device) this.fail(op, `the ${what} ${t.describe()} is not on ${this.device}`);
    if (!t.isContiguous) this.fail(op, `the ${what} ${t.describe()} is not contiguous; pass t.contiguous()`);
    if (!SUPPORTED.has(t.dtype)) this.fail(op, `dtype ${t.dtype} is not supported`);
  }

  private checkOp(op: string, t: Tensor, red: ReduceOp): void {
    if (red === 'avg' && !(t.dtype.startsWith('float') || t.dtype === 'bfloat16')) {
      this.fail(op, `'avg' needs a floating-point tensor, got ${t.dtype}`);
    }
    if (!['sum', 'avg', 'max', 'min'].includes(red)) this.fail(op, `unknown reduction '${red}'`);
  }

  private checkPeer(op: string, peer: number, what: string): void {
    if (!Number.isInteger(peer) || peer < 0 || peer >= this.size) {
      this.fail(op, `${what} ${peer} is not a rank of this group of ${this.size}`);
    }
  }

  /**
   * Sends and receives posted one at a time wait here (their storage retained) until something
   * waits on one of them or the group runs another operation; then they go as one NCCL group.
   * NCCL orders a send on the stream before later work, so posting `send` then `recv` on two
   * neighbours one by one would block both (Gloo's sends are asynchronous, and so must these be).
   * With detail checks, each one's side goes to its peer when it is posted, and the batch waits
   * for the peers' sides before it is queued.
   */
  private queued: { kind: 'send' | 'recv'; peer: number; tensor: Tensor; verify?: () => void }[] = [];

  private flush(): void {
    if (!this.queued.length) return;
    const ops = this.queued;
    this.queued = [];
    try {
      verifyAll(ops.map((o) => o.verify));
      this.run('send/recv', (c) => c.sendRecv(ops));
    } finally {
      for (const o of ops) o.tensor.storage.release();
    }
  }

  private queue(kind: 'send' | 'recv', peer: number, tensor: Tensor): Work {
    this.live(kind);
    const verify = this.peerCheck?.post(kind, kind, peer, tensor);
    tensor.storage.retain();
    this.queued.push({ kind, peer, tensor, verify });
    return {
      wait: () => {
        try {
          this.flush();
        } catch (e) {
          return Promise.reject(e);
        }
        return Promise.resolve();
      },
      waitSync: () => this.flush(),
      isCompleted: () => {
        try {
          this.flush();
        } catch {
          // reported by wait() / waitSync()
        }
        return true;
      },
    };
  }

  /** Wraps the communicator's errors (a dead peer, a bad argument) as DistributedErrors. */
  private run(op: string, f: (c: DeviceCommunicator) => void): Work {
    const c = this.live(op);
    this.flush();
    try {
      noGrad(() => f(c));
    } catch (e) {
      if (e instanceof DistributedError) throw e;
      const message = (e as Error).message;
      const code = /did not arrive/.test(message)
        ? 'TIMEOUT'
        : /remote process|failed rank|rank of the communicator failed/.test(message)
          ? 'PEER_LOST'
          : 'BACKEND';
      throw new DistributedError(code, `${op} on group '${this.name}' (${this.library}): ${message}`);
    }
    return DONE;
  }

  allReduce(tensor: Tensor, op: ReduceOp = 'sum'): Work {
    this.check('allReduce', tensor);
    this.checkOp('allReduce', tensor, op);
    return this.run('allReduce', (c) => c.allReduce(tensor, tensor, op));
  }

  allGather(outputs: readonly Tensor[], input: Tensor): Work {
    this.check('allGather', input, 'input');
    this.perRank('allGather', outputs, input);
    return this.run('allGather', (c) =>
      tidy(() => {
        const flat = empty([this.size * input.numel], { dtype: input.dtype, device: this.device });
        c.allGather(input, flat);
        outputs.forEach((o, r) => {
          o.copy_(flat.narrow(0, r * input.numel, input.numel).view(...o.shape));
        });
      }),
    );
  }

  allGatherIntoTensor(output: Tensor, input: Tensor): Work {
    this.check('allGatherIntoTensor', input, 'input');
    this.check('allGatherIntoTensor', output, 'output');
    this.sameDtype('allGatherIntoTensor', input, output);
    if (output.numel !== input.numel * this.size) {
      this.fail(
        'allGatherIntoTensor',
        `output ${output.describe()} must hold ${this.size} × ${input.numel} elements`,
      );
    }
    return this.run('allGatherIntoTensor', (c) => c.allGather(input, output));
  }

  reduceScatter(output: Tensor, inputs: readonly Tensor[], op: ReduceOp = 'sum'): Work {
    this.check('reduceScatter', output, 'output');
    this.checkOp('reduceScatter', output, op);
    this.perRank('reduceScatter', inputs, output);
    return this.run('reduceScatter', (c) =>
      tidy(() => {
        const flat = cat(
          inputs.map((t) => t.reshape(-1)),
          0,
        );
        c.reduceScatter(flat, output, op);
      }),
    );
  }

  reduceScatterTensor(output: Tensor, input: Tensor, op: ReduceOp = 'sum'): Work {
    this.check('reduceScatterTensor', output, 'output');
    this.check('reduceScatterTensor', input, 'input');
    this.sameDtype('reduceScatterTensor', input, output);
    this.checkOp('reduceScatterTensor', output, op);
    if (input.numel !== output.numel * this.size) {
      this.fail(
        'reduceScatterTensor',
        `input ${input.describe()} must hold ${this.size} × ${output.numel} elements`,
      );
    }
    return this.run('reduceScatterTensor', (c) => c.reduceScatter(input, output, op));
  }

  broadcast(tensor: Tensor, src: number): Work {
    this.check('broadcast', tensor);
    this.checkPeer('broadcast', src, 'src');
    return this.run('broadcast', (c) => c.broadcast(tensor, tensor, src));
  }

  /** Sends to group rank `dst`; NCCL has no tags: transfers between two ranks match in issue order. */
  send(tensor: Tensor, dst: number, _tag = 0): Work {
    this.check('send', tensor);
    this.checkPeer('send', dst, 'dst');
    if (dst === this.rank) this.fail('send', 'cannot send to itself');
    return this.queue('send', dst, tensor);
  }

  /** Receives from group rank `src` (in issue order; see send). */
  recv(tensor: Tensor, src: number, _tag = 0): Work {
    this.check('recv', tensor);
    this.checkPeer('recv', src, 'src');
    if (src === this.rank) this.fail('recv', 'cannot receive from itself');
    return this.queue('recv', src, tensor);
  }

  /** The sends and receives as one NCCL group (they progress together; see P2POp). */
  batchIsendIrecv(ops: readonly P2POp[]): Work[] {
    for (const o of ops) {
      const what = o.op === 'isend' ? 'send' : 'recv';
      this.check('batchIsendIrecv', o.tensor, `tensor to ${what}`);
      this.checkPeer('batchIsendIrecv', o.peer, 'peer');
      if (o.peer === this.rank) this.fail('batchIsendIrecv', `cannot ${what} to or from itself`);
    }
    if (this.peerCheck) {
      const check = this.peerCheck;
      // every side goes out before any is waited for, so neighbours that exchange both ways meet
      verifyAll(
        ops.map((o) => check.post('batchIsendIrecv', o.op === 'isend' ? 'send' : 'recv', o.peer, o.tensor)),
      );
    }
    this.run('batchIsendIrecv', (c) =>
      c.sendRecv(
        ops.map((o) => ({ kind: o.op === 'isend' ? 'send' : 'recv', peer: o.peer, tensor: o.tensor })),
      ),
    );
    return ops.map(() => DONE);
  }

  allToAll(
    output: Tensor,
    input: Tensor,
    outputSplitSizes?: readonly number[],
    inputSplitSizes?: readonly number[],
  ): Work {
    this.check('allToAll', input, 'input');
    this.check('allToAll', output, 'output');
    this.sameDtype('allToAll', input, output);
    const {
      ins,
      outs,
      rowElems: per,
    } = allToAllSplits(this.size, output, input, outputSplitSizes, inputSplitSizes, (m) =>
      this.fail('allToAll', m),
    );
    return this.run('allToAll', (c) =>
      tidy(() => {
        const src = input.reshape(-1);
        const dst = output.reshape(-1);
        const part = (t: Tensor, sizes: number[], r: number) => {
          const start = sizes.slice(0, r).reduce((a, b) => a + b, 0) * per;
          return t.narrow(0, start, sizes[r] * per);
        };
        // this rank's own part is a copy on the device; the others travel in one NCCL group
        const ops: { kind: 'send' | 'recv'; peer: number; tensor: Tensor }[] = [];
        for (let r = 0; r < this.size; r++) {
          if (r === this.rank) {
            if (ins[r] !== outs[r])
              this.fail('allToAll', `rank ${r} sends itself ${ins[r]} rows but expects ${outs[r]}`);
            if (ins[r] > 0) part(dst, outs, r).copy_(part(src, ins, r));
            continue;
          }
          if (ins[r] > 0) ops.push({ kind: 'send', peer: r, tensor: part(src, ins, r) });
          if (outs[r] > 0) ops.push({ kind: 'recv', peer: r, tensor: part(dst, outs, r) });
        }
        if (ops.length) c.sendRecv(ops);
      }),
    );
  }

  /** A host barrier over the group's ranks (the Gloo group's). */
  barrier(): Work {
    return this.hostBarrier();
  }

  destroy(): void {
    const c = this.comm;
    this.comm = null;
    for (const o of this.queued) o.tensor.storage.release();
    this.queued = [];
    c?.destroy();
  }

  private sameDtype(op: string, a: Tensor, b: Tensor): void {
    if (a.dtype !== b.dtype)
      this.fail(op, `input ${a.describe()} and output ${b.describe()} differ in dtype`);
  }

  /** One tensor per rank, each contiguous on the device and like `other` in dtype and count. */
  private perRank(op: string, list: readonly Tensor[], other: Tensor): void {
    if (list.length !== this.size)
      this.fail(op, `expected ${this.size} tensors (one per rank), got ${list.length}`);
    for (const t of list) {
      this.check(op, t);
      this.sameDtype(op, other, t);
      if (t.numel !== other.numel)
        this.fail(op, `${t.describe()} must have ${other.numel} elements like ${other.describe()}`);
    }
  }
}
