// ProcessGroup on Gloo: CPU tensors, collectives on each group's communication threads.
import {
  type DType,
  empty,
  fromTypedArray,
  keep,
  noGrad,
  type Storage,
  type Tensor,
} from '@megapatch/tensor';
import {
  agreeOnCall,
  type CollectiveCall,
  type CollectiveChecks,
  compareTransfer,
  type HostExchange,
  type PeerCheck,
  transferSide,
} from './collective-checks.js';
import { DistributedError } from './errors.js';
import { loadNative, type NativeGroupHandle, type NativeResult, nativeError } from './native.js';
import { NcclProcessGroup } from './nccl.js';
import { allToAllSplits, type P2POp, type ProcessGroup, type ReduceOp, type Work } from './process-group.js';

const DTYPE_CODE: Partial<Record<DType, number>> = {
  float32: 0,
  bfloat16: 1,
  float16: 2,
  int32: 3,
  int64: 4,
  float64: 5,
  uint8: 6,
  bool: 6,
};
const ITEM: Partial<Record<DType, number>> = {
  float32: 4,
  bfloat16: 2,
  float16: 2,
  int32: 4,
  int64: 8,
  float64: 8,
  uint8: 1,
  bool: 1,
};
const OP_CODE: Record<ReduceOp, number> = { sum: 0, avg: 1, max: 2, min: 3 };
// Gloo p2p tags of the detail checks' transfer sides, above the users' tags [0, 2^20): a side of
// a send travels on one, a side of a receive on the other, so each direction matches in order.
const SEND_SIDE_TAG = 2 ** 20;
const RECV_SIDE_TAG = 2 ** 20 + 1;

/** Where a Gloo group meets: the store address and a key prefix unique to the group. */
export interface GlooGroupOptions {
  storeHost: string;
  storePort: number;
  prefix: string;
  name: string;
  /** This process's rank in the group. */
  rank: number;
  /** Global ranks of the members, in group-rank order. */
  ranks: readonly number[];
  timeoutMs: number;
  /**
   * Exchange each collective's sizes first and fail with a clear message when ranks disagree;
   * 'detail' also checks NCCL's operations and the path each rank's tensors take.
   */
  checkCollectives: CollectiveChecks;
  /** Address other ranks reach this process at, or '' with `iface`. */
  hostname: string;
  /** Network interface to use instead of `hostname` (GLOO_SOCKET_IFNAME). */
  iface: string;
}

class GlooWork implements Work {
  private settled = false;
  private error: DistributedError | null = null;
  private readonly promise: Promise<void>;
  private resolveFn!: () => void;
  private rejectFn!: (e: DistributedError) => void;
  /** Milliseconds the operation ran on the communication thread (after completion). */
  ms = 0;

  constructor(
    private readonly group: GlooProcessGroup,
    readonly id: number,
    private storages: Storage[],
  ) {
    this.promise = new Promise<void>((res, rej) => {
      this.resolveFn = res;
      this.rejectFn = rej;
    });
    // a failure is reported by wait()/waitSync(); an unobserved one must not crash the process
    this.promise.catch(() => {});
  }

  /** @internal Called once with the native result. */
  complete(r: NativeResult): void {
    if (this.settled) return;
    this.settled = true;
    this.ms = r.ms;
    for (const s of this.storages) s.release();
    this.storages = [];
    if (r.code) {
      this.error = new DistributedError(r.code as DistributedError['code'], r.message);
      this.rejectFn(this.error);
    } else {
      this.resolveFn();
    }
  }

  wait(): Promise<void> {
    return this.promise;
  }

  waitSync(): void {
    if (!this.settled) this.group.waitNative(this);
    if (this.error) throw this.error;
  }

  isCompleted(): boolean {
    return this.settled;
  }
}

/**
 * The work of a collective on tensors of another device, run on host copies: when it completes
 * (wait, waitSync, or isCompleted seeing it done), the host results are copied into the device
 * tensors that receive output, and the copies are freed.
 */
class HostStagedWork implements Work {
  private done = false;
  constructor(
    private readonly inner: Work,
    private readonly finish: (ok: boolean) => void,
  ) {}

  private settle(ok: boolean): void {
    if (this.done) return;
    this.done = true;
    this.finish(ok);
  }

  async wait(): Promise<void> {
    try {
      await this.inner.wait();
    } catch (e) {
      this.settle(false);
      throw e;
    }
    this.settle(true);
  }

  waitSync(): void {
    try {
      this.inner.waitSync();
    } catch (e) {
      this.settle(false);
      throw e;
    }
    this.settle(true);
  }

  /**
   * True once the results are in the device tensors: callers (DDP) that see a completed work do
   * not wait on it, so the copy back happens here when the host op has finished.
   */
  isCompleted(): boolean {
    if (!this.inner.isCompleted()) return false;
    if (!this.done) {
      try {
        this.waitSync();
      } catch {
        // the failure is reported by wait() / waitSync()
      }
    }
    return true;
  }
}

/** The library each device's collectives joined in this process (device -> e.g. 'nccl 2.21.5'). */
const deviceLibraries = new Map<string, string>();

/**
 * The collective library this process's groups use for `device`'s tensors ('nccl 2.21.5'), or
 * null before one joined (or when they travel through host copies over Gloo).
 */
export function deviceCollectivesLibrary(device: string): string | null {
  return deviceLibraries.get(device) ?? null;
}

/** A ProcessGroup over Gloo. Create it with `newGroup()` (or `initProcessGroup()` for the world). */
export class GlooProcessGroup implements ProcessGroup {
  readonly backend = 'gloo';
  readonly name: string;
  readonly rank: number;
  readonly size: number;
  readonly ranks: readonly number[];
  readonly timeoutMs: number;
  private native: NativeGroupHandle | null;
  private readonly pending = new Map<number, GlooWork>();
  /** Per device: the group over its collective library, or null for host copies. */
  private readonly deviceGroups = new Map<string, NcclProcessGroup | null>();
  private readonly checks: CollectiveChecks;

  private constructor(options: GlooGroupOptions) {
    this.name = options.name;
    this.rank = options.rank;
    this.size = options.ranks.length;
    this.ranks = [...options.ranks];
    this.timeoutMs = options.timeoutMs;
    this.checks = options.checkCollectives;
    const { NativeGroup } = loadNative();
    try {
      this.native = new NativeGroup(
        options.storeHost,
        options.storePort,
        options.prefix,
        options.name,
        options.rank,
        this.size,
        [...options.ranks],
        options.timeoutMs,
        options.checkCollectives !== false,
        options.hostname,
        options.iface,
        (id) => this.onComplete(id),
      );
    } catch (e) {
      throw nativeError(e);
    }
  }

  /** Creates the group and waits until every member has connected (a rendezvous through the store). */
  static async connect(options: GlooGroupOptions): Promise<GlooProcessGroup> {
    const g = new GlooProcessGroup(options);
    try {
      await g.track(g.handle('rendezvous').connect(), []).wait();
    } catch (e) {
      g.destroy();
      throw e;
    }
    return g;
  }

  private handle(op: string): NativeGroupHandle {
    if (!this.native) {
      throw new DistributedError('NOT_INITIALIZED', `${op} on group '${this.name}': the group was destroyed`);
    }
    return this.native;
  }

  private track(id: number, tensors: readonly Tensor[]): GlooWork {
    const storages = tensors.map((t) => {
      t.storage.retain();
      return t.storage;
    });
    const work = new GlooWork(this, id, storages);
    const native = this.native!;
    // an operation that already finished (or was refused at once) is settled here; reading its
    // result makes the native side forget it, so its completion callback finds nothing
    const early = native.result(id);
    if (early?.done) {
      work.complete(early);
      return work;
    }
    if (this.pending.size === 0) native.ref();
    this.pending.set(id, work);
    return work;
  }

  private settle(work: GlooWork, r: NativeResult): void {
    work.complete(r);
    if (this.pending.delete(work.id) && this.pending.size === 0) this.native?.unref();
  }

  private onComplete(id: number): void {
    const work = this.pending.get(id);
    const r = this.native?.result(id);
    if (work && r) this.settle(work, r);
  }

  /** @internal Blocks until `work` completes. */
  waitNative(work: GlooWork): void {
    const native = this.handle('wait');
    const r = native.waitSync(work.id);
    if (r) {
      native.result(work.id); // forget it natively; the completion callback then finds nothing
      this.settle(work, r);
    }
  }

  // ---------------------------------------------------------------------------------------------

  /**
   * The device whose collective library (NCCL for CUDA tensors) would run an operation over
   * `tensors`, without joining it yet; null when they are CPU tensors, span devices, or the device
   * has no library (then they travel through host copies). MEGAPATCH_DEVICE_COLLECTIVES=0 keeps
   * host copies.
   */
  private deviceOf(tensors: readonly Tensor[]): string | null {
    const device = tensors[0]?.device;
    if (!device || device === 'cpu' || tensors.some((t) => t.device !== device)) return null;
    const known = this.deviceGroups.get(device);
    if (known !== undefined) return known ? device : null;
    const usable =
      process.env.MEGAPATCH_DEVICE_COLLECTIVES !== '0' &&
      (tensors[0].backend.collectives?.() ?? null) !== null;
    if (!usable) this.deviceGroups.set(device, null);
    return usable ? device : null;
  }

  /**
   * The group over the collective library of `tensors`' device (see deviceOf), joined on first
   * use. Every rank reaches the first collective on a device together, so they join the
   * communicator together; group rank 0's id reaches the others by a Gloo broadcast.
   */
  private viaDevice(tensors: readonly Tensor[]): NcclProcessGroup | null {
    const device = this.deviceOf(tensors);
    if (!device) return null;
    const known = this.deviceGroups.get(device);
    if (known) return known;
    this.handle('collective');
    const collectives = tensors[0].backend.collectives?.();
    if (!collectives) return null;
    const group = NcclProcessGroup.connect(
      collectives,
      (id) => {
        const t = fromTypedArray(Uint8Array.from(id), [id.length], { device: 'cpu' });
        try {
          this.hostBroadcast(t, 0).waitSync();
          return Uint8Array.from(t.toTypedArray() as Uint8Array);
        } finally {
          t.dispose();
        }
      },
      {
        name: this.name,
        rank: this.rank,
        ranks: this.ranks,
        timeoutMs: this.timeoutMs,
        device,
        barrier: () => this.barrier(),
        peerCheck: this.checks === 'detail' && this.size > 1 ? this.peerCheck() : undefined,
      },
    );
    this.deviceGroups.set(device, group);
    deviceLibraries.set(device, group.library);
    return group;
  }

  /**
   * Runs a collective over `tensors` on their device's library (NCCL) or on Gloo. With detail
   * checks, every rank first agrees on `call` and on the path (before joining NCCL, so that a rank
   * on the other path meets this check rather than the communicator's setup).
   */
  private route(
    call: Omit<CollectiveCall, 'device' | 'nccl'>,
    tensors: readonly Tensor[],
    onDevice: (group: NcclProcessGroup) => Work,
    onHost: () => Work,
  ): Work {
    this.handle(call.op);
    const device = this.deviceOf(tensors);
    if (this.checks === 'detail') {
      agreeOnCall(this, { ...call, device: tensors[0]?.device ?? '', nccl: device !== null }, this.exchange);
    }
    const group = device ? this.viaDevice(tensors) : null;
    return group ? onDevice(group) : onHost();
  }

  /** The host collectives the detail checks run on: blocking, on CPU copies, unchecked themselves. */
  private readonly exchange: HostExchange = {
    max: (values) => {
      const t = fromTypedArray(values, [values.length], { device: 'cpu' });
      try {
        this.hostAllReduce(t, 'max').waitSync();
        return Float64Array.from(t.toTypedArray() as Float64Array);
      } finally {
        t.dispose();
      }
    },
    gather: (bytes) => {
      const input = fromTypedArray(bytes, [bytes.length], { device: 'cpu' });
      const output = empty([this.size * bytes.length], { dtype: 'uint8', device: 'cpu' });
      try {
        this.hostAllGatherIntoTensor(output, input).waitSync();
        const all = Uint8Array.from(output.toTypedArray() as Uint8Array);
        return Array.from({ length: this.size }, (_, r) =>
          all.subarray(r * bytes.length, (r + 1) * bytes.length),
        );
      } finally {
        input.dispose();
        output.dispose();
      }
    },
  };

  /**
   * The detail check of NCCL's sends and receives: each side of a transfer goes to the peer as a
   * Gloo message (posted at once, so neither side waits to send it) on the tag of its direction.
   */
  private peerCheck(): PeerCheck {
    return {
      post: (op, kind, peer, tensor) => {
        const mine = fromTypedArray(transferSide(tensor), [2], { device: 'cpu' });
        try {
          // the work keeps the storage until the message has gone
          this.hostSend(mine, peer, kind === 'send' ? SEND_SIDE_TAG : RECV_SIDE_TAG);
        } finally {
          mine.dispose();
        }
        const theirs = empty([2], { dtype: 'float64', device: 'cpu' });
        let work: Work;
        try {
          work = this.hostRecv(theirs, peer, kind === 'send' ? RECV_SIDE_TAG : SEND_SIDE_TAG);
        } catch (e) {
          theirs.dispose();
          throw e;
        }
        return () => {
          try {
            work.waitSync();
            const side = Float64Array.from(theirs.toTypedArray() as Float64Array);
            compareTransfer(this, op, kind, peer, tensor, side);
          } finally {
            theirs.dispose();
          }
        };
      },
    };
  }

  /** The library that collectives over `device`'s tensors use: e.g. 'nccl 2.21.5', or 'gloo' (host copies). */
  collectivesFor(device: string): string {
    if (device === 'cpu') return 'gloo';
    return this.deviceGroups.get(device)?.library ?? 'gloo';
  }

  /**
   * Gloo moves host memory. Tensors on another device (a GPU before NCCL, the reference backend)
   * travel through CPU copies, as PyTorch's Gloo backend does for CUDA tensors: `run` gets the
   * host tensors, and the device tensors flagged in `receives` get their results when the work is
   * waited on. Returns null when every tensor is already on the CPU.
   */
  private viaHost(
    tensors: readonly Tensor[],
    receives: readonly boolean[],
    run: (host: Tensor[]) => Work,
  ): Work | null {
    if (tensors.every((t) => t.device === 'cpu')) return null;
    const host = tensors.map((t) => {
      t.checkAlive('collective');
      if (t.device === 'cpu') return t;
      // owned by the work until it completes, whatever tidy() scope the caller is in
      return keep(noGrad(() => t.detach().to('cpu')));
    });
    const staged = host.filter((h, i) => h !== tensors[i]);
    let inner: Work;
    try {
      inner = run(host);
    } catch (e) {
      for (const h of staged) h.dispose();
      throw e;
    }
    return new HostStagedWork(inner, (ok) => {
      try {
        if (ok) {
          noGrad(() => {
            tensors.forEach((t, i) => {
              if (!receives[i] || host[i] === t) return;
              const back = host[i].to(t.device);
              t.copy_(back);
              back.dispose();
            });
          });
        }
      } finally {
        for (const h of staged) h.dispose();
      }
    });
  }

  private check(op: string, t: Tensor, what = 'tensor'): number {
    t.checkAlive(op);
    if (t.device !== 'cpu') {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${op} on group '${this.name}': the ${what} is on ${t.device}; Gloo handles CPU tensors (NCCL handles CUDA ones)`,
      );
    }
    if (!t.isContiguous) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${op} on group '${this.name}': the ${what} ${t.describe()} is not contiguous; pass t.contiguous()`,
      );
    }
    const code = DTYPE_CODE[t.dtype];
    if (code === undefined) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${op} on group '${this.name}': dtype ${t.dtype} is not supported`,
      );
    }
    return code;
  }

  private sameDtype(op: string, a: Tensor, b: Tensor): void {
    if (a.dtype !== b.dtype) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${op} on group '${this.name}': input ${a.describe()} and output ${b.describe()} differ in dtype`,
      );
    }
  }

  /** A list with one tensor per rank, each like `other` in dtype and element count. */
  private checkPerRank(
    op: string,
    list: readonly Tensor[],
    what: string,
    other: Tensor,
    otherWhat: string,
  ): void {
    if (list.length !== this.size) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${op} on group '${this.name}': expected ${this.size} ${what} tensors (one per rank), got ${list.length}`,
      );
    }
    for (const t of list) {
      this.check(op, t, what);
      if (what === 'input') this.sameDtype(op, t, other);
      else this.sameDtype(op, other, t);
      if (t.numel !== other.numel) {
        throw new DistributedError(
          'INVALID_ARGUMENT',
          `${op} on group '${this.name}': ${what} ${t.describe()} must have as many elements as the ${otherWhat} ${other.describe()}`,
        );
      }
    }
  }

  private static addr(t: Tensor): number {
    return t.storage.address + t.offset * (ITEM[t.dtype] as number);
  }

  private reduction(op: string, t: Tensor, reduce: ReduceOp): number {
    const code = OP_CODE[reduce];
    if (code === undefined) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${op}: unknown reduction '${reduce}' (sum, avg, max or min)`,
      );
    }
    if (reduce === 'avg' && !['float32', 'float64', 'bfloat16', 'float16'].includes(t.dtype)) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${op}: 'avg' needs a floating-point tensor, got ${t.dtype}`,
      );
    }
    if (t.dtype === 'bool' || t.dtype === 'uint8') {
      throw new DistributedError('INVALID_ARGUMENT', `${op}: ${t.dtype} tensors cannot be reduced`);
    }
    return code;
  }

  allReduce(tensor: Tensor, op: ReduceOp = 'sum'): Work {
    return this.route(
      { op: 'allReduce', kind: 'allReduce', dtype: tensor.dtype, count: tensor.numel, reduce: op },
      [tensor],
      (dev) => dev.allReduce(tensor, op),
      () => this.hostAllReduce(tensor, op),
    );
  }

  private hostAllReduce(tensor: Tensor, op: ReduceOp): Work {
    const staged = this.viaHost([tensor], [true], ([h]) => this.hostAllReduce(h, op));
    if (staged) return staged;
    const dt = this.check('allReduce', tensor);
    const red = this.reduction('allReduce', tensor, op);
    const n = this.handle('allReduce');
    return this.track(n.allReduce(GlooProcessGroup.addr(tensor), tensor.numel, dt, red), [tensor]);
  }

  allGather(outputs: readonly Tensor[], input: Tensor): Work {
    return this.route(
      { op: 'allGather', kind: 'allGather', dtype: input.dtype, count: input.numel },
      [input, ...outputs],
      (dev) => dev.allGather(outputs, input),
      () => this.hostAllGather(outputs, input),
    );
  }

  private hostAllGather(outputs: readonly Tensor[], input: Tensor): Work {
    const staged = this.viaHost([input, ...outputs], [false, ...outputs.map(() => true)], ([h, ...hs]) =>
      this.hostAllGather(hs, h),
    );
    if (staged) return staged;
    const dt = this.check('allGather', input, 'input');
    this.checkPerRank('allGather', outputs, 'output', input, 'input');
    const n = this.handle('allGather');
    const outs = outputs.map((o) => GlooProcessGroup.addr(o));
    // one output per rank even when size is 1 (the native side treats a single output as flat)
    return this.track(n.allGather(GlooProcessGroup.addr(input), outs, input.numel, dt), [input, ...outputs]);
  }

  allGatherIntoTensor(output: Tensor, input: Tensor): Work {
    return this.route(
      { op: 'allGatherIntoTensor', kind: 'allGather', dtype: input.dtype, count: input.numel },
      [output, input],
      (dev) => dev.allGatherIntoTensor(output, input),
      () => this.hostAllGatherIntoTensor(output, input),
    );
  }

  private hostAllGatherIntoTensor(output: Tensor, input: Tensor): Work {
    const staged = this.viaHost([output, input], [true, false], ([o, i]) =>
      this.hostAllGatherIntoTensor(o, i),
    );
    if (staged) return staged;
    const dt = this.check('allGatherIntoTensor', input, 'input');
    this.check('allGatherIntoTensor', output, 'output');
    this.sameDtype('allGatherIntoTensor', input, output);
    if (output.numel !== input.numel * this.size) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `allGatherIntoTensor on group '${this.name}': output ${output.describe()} must hold ${this.size} × ${input.numel} elements (input ${input.describe()})`,
      );
    }
    const n = this.handle('allGatherIntoTensor');
    return this.track(
      n.allGather(GlooProcessGroup.addr(input), [GlooProcessGroup.addr(output)], input.numel, dt),
      [input, output],
    );
  }

  reduceScatter(output: Tensor, inputs: readonly Tensor[], op: ReduceOp = 'sum'): Work {
    return this.route(
      { op: 'reduceScatter', kind: 'reduceScatter', dtype: output.dtype, count: output.numel, reduce: op },
      [output, ...inputs],
      (dev) => dev.reduceScatter(output, inputs, op),
      () => this.hostReduceScatter(output, inputs, op),
    );
  }

  private hostReduceScatter(output: Tensor, inputs: readonly Tensor[], op: ReduceOp): Work {
    const staged = this.viaHost([output, ...inputs], [true, ...inputs.map(() => false)], ([o, ...is]) =>
      this.hostReduceScatter(o, is, op),
    );
    if (staged) return staged;
    const dt = this.check('reduceScatter', output, 'output');
    const red = this.reduction('reduceScatter', output, op);
    this.checkPerRank('reduceScatter', inputs, 'input', output, 'output');
    const n = this.handle('reduceScatter');
    const ins = inputs.map((t) => GlooProcessGroup.addr(t));
    // the native side treats a single input as a flat tensor; with size 1 that is the same thing
    return this.track(n.reduceScatter(ins, GlooProcessGroup.addr(output), output.numel, dt, red), [
      output,
      ...inputs,
    ]);
  }

  reduceScatterTensor(output: Tensor, input: Tensor, op: ReduceOp = 'sum'): Work {
    return this.route(
      {
        op: 'reduceScatterTensor',
        kind: 'reduceScatter',
        dtype: output.dtype,
        count: output.numel,
        reduce: op,
      },
      [output, input],
      (dev) => dev.reduceScatterTensor(output, input, op),
      () => this.hostReduceScatterTensor(output, input, op),
    );
  }

  private hostReduceScatterTensor(output: Tensor, input: Tensor, op: ReduceOp): Work {
    const staged = this.viaHost([output, input], [true, false], ([o, i]) =>
      this.hostReduceScatterTensor(o, i, op),
    );
    if (staged) return staged;
    const dt = this.check('reduceScatterTensor', output, 'output');
    this.check('reduceScatterTensor', input, 'input');
    this.sameDtype('reduceScatterTensor', input, output);
    const red = this.reduction('reduceScatterTensor', output, op);
    if (input.numel !== output.numel * this.size) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `reduceScatterTensor on group '${this.name}': input ${input.describe()} must hold ${this.size} × ${output.numel} elements (output ${output.describe()})`,
      );
    }
    const n = this.handle('reduceScatterTensor');
    return this.track(
      n.reduceScatter([GlooProcessGroup.addr(input)], GlooProcessGroup.addr(output), output.numel, dt, red),
      [output, input],
    );
  }

  private checkPeer(op: string, peer: number, what: string): void {
    if (!Number.isInteger(peer) || peer < 0 || peer >= this.size) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${op} on group '${this.name}': ${what} ${peer} is not a rank of this group of ${this.size} (group ranks are 0..${this.size - 1})`,
      );
    }
  }

  broadcast(tensor: Tensor, src: number): Work {
    return this.route(
      { op: 'broadcast', kind: 'broadcast', dtype: tensor.dtype, count: tensor.numel, root: src },
      [tensor],
      (dev) => dev.broadcast(tensor, src),
      () => this.hostBroadcast(tensor, src),
    );
  }

  private hostBroadcast(tensor: Tensor, src: number): Work {
    const staged = this.viaHost([tensor], [true], ([h]) => this.hostBroadcast(h, src));
    if (staged) return staged;
    const dt = this.check('broadcast', tensor);
    this.checkPeer('broadcast', src, 'src');
    const n = this.handle('broadcast');
    return this.track(n.broadcast(GlooProcessGroup.addr(tensor), tensor.numel, dt, src), [tensor]);
  }

  send(tensor: Tensor, dst: number, tag = 0): Work {
    checkTag('send', tag);
    const dev = this.viaDevice([tensor]);
    if (dev) return dev.send(tensor, dst, tag);
    return this.hostSend(tensor, dst, tag);
  }

  private hostSend(tensor: Tensor, dst: number, tag: number): Work {
    const staged = this.viaHost([tensor], [false], ([h]) => this.hostSend(h, dst, tag));
    if (staged) return staged;
    const dt = this.check('send', tensor);
    this.checkPeer('send', dst, 'dst');
    if (dst === this.rank)
      throw new DistributedError('INVALID_ARGUMENT', `send on group '${this.name}': cannot send to itself`);
    const n = this.handle('send');
    return this.track(n.send(GlooProcessGroup.addr(tensor), tensor.numel, dt, dst, tag), [tensor]);
  }

  recv(tensor: Tensor, src: number, tag = 0): Work {
    checkTag('recv', tag);
    const dev = this.viaDevice([tensor]);
    if (dev) return dev.recv(tensor, src, tag);
    return this.hostRecv(tensor, src, tag);
  }

  private hostRecv(tensor: Tensor, src: number, tag: number): Work {
    const staged = this.viaHost([tensor], [true], ([h]) => this.hostRecv(h, src, tag));
    if (staged) return staged;
    const dt = this.check('recv', tensor);
    this.checkPeer('recv', src, 'src');
    if (src === this.rank)
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `recv on group '${this.name}': cannot receive from itself`,
      );
    const n = this.handle('recv');
    return this.track(n.recv(GlooProcessGroup.addr(tensor), tensor.numel, dt, src, tag), [tensor]);
  }

  /** Sends and receives posted together: one NCCL group for device tensors, else Gloo's (already asynchronous) send/recv. */
  batchIsendIrecv(ops: readonly P2POp[]): Work[] {
    const dev = ops.length ? this.viaDevice(ops.map((o) => o.tensor)) : null;
    if (dev) return dev.batchIsendIrecv(ops);
    return ops.map((o) =>
      o.op === 'isend' ? this.send(o.tensor, o.peer, o.tag) : this.recv(o.tensor, o.peer, o.tag),
    );
  }

  allToAll(
    output: Tensor,
    input: Tensor,
    outputSplitSizes?: readonly number[],
    inputSplitSizes?: readonly number[],
  ): Work {
    // the split sizes are checked here, on every path, before the ranks compare them
    const { ins, outs, rowElems } = allToAllSplits(
      this.size,
      output,
      input,
      outputSplitSizes,
      inputSplitSizes,
      (m) => {
        throw new DistributedError('INVALID_ARGUMENT', `allToAll on group '${this.name}': ${m}`);
      },
    );
    return this.route(
      { op: 'allToAll', kind: 'allToAll', dtype: input.dtype, count: rowElems, splits: { ins, outs } },
      [output, input],
      (dev) => dev.allToAll(output, input, outputSplitSizes, inputSplitSizes),
      () => this.hostAllToAll(output, input, ins, outs, rowElems),
    );
  }

  private hostAllToAll(output: Tensor, input: Tensor, ins: number[], outs: number[], rowElems: number): Work {
    const staged = this.viaHost([output, input], [true, false], ([o, i]) =>
      this.hostAllToAll(o, i, ins, outs, rowElems),
    );
    if (staged) return staged;
    const dt = this.check('allToAll', input, 'input');
    this.check('allToAll', output, 'output');
    this.sameDtype('allToAll', input, output);
    const n = this.handle('allToAll');
    return this.track(
      n.allToAll(GlooProcessGroup.addr(input), GlooProcessGroup.addr(output), ins, outs, rowElems, dt),
      [input, output],
    );
  }

  barrier(): Work {
    // no tensors, so never on a device
    return this.route(
      { op: 'barrier', kind: 'barrier' },
      [],
      (dev) => dev.barrier(),
      () => this.track(this.handle('barrier').barrier(), []),
    );
  }

  destroy(): void {
    const native = this.native;
    if (!native) return;
    for (const g of this.deviceGroups.values()) g?.destroy();
    this.deviceGroups.clear();
    this.native = null;
    native.destroy();
    for (const work of this.pending.values()) {
      work.complete({
        done: true,
        code: 'NOT_INITIALIZED',
        message: `group '${this.name}' was destroyed`,
        ms: 0,
      });
    }
    this.pending.clear();
  }
}

function checkTag(op: string, tag: number): void {
  if (!Number.isInteger(tag) || tag < 0 || tag >= 2 ** 20) {
    throw new DistributedError('INVALID_ARGUMENT', `${op}: tag must be an integer in [0, 2^20), got ${tag}`);
  }
}
