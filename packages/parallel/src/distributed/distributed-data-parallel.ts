// Megatron-Core's DistributedDataParallel (distributed/distributed_data_parallel.py): the model's
// gradients accumulate into contiguous fp32 buckets, and as soon as the last gradient of a bucket
// has been accumulated during backward, that bucket's reduction is started on the communication
// thread while backward goes on with the earlier layers. finishGradSync() waits for what is
// still in flight. With the distributed optimizer the reduction is a reduce-scatter (each rank keeps
// the reduced 1/d shard it updates) and the parameters themselves move into a contiguous buffer
// that the optimizer all-gathers into after its step.
import { isFloating, keep, type Module, type Tensor } from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import {
  getDataParallelGroup,
  getExpertDataParallelGroup,
  modelParallelIsInitialized,
} from '../parallel-state.js';
import type { ProcessGroup, ReduceOp, Work } from '../process-group.js';
import {
  getTensorModelParallelAttributes,
  setSequenceParallelAttribute,
  setTensorModelParallelAttributes,
} from '../tensor-parallel/attributes.js';
import { type Bucket, defaultBucketSize, flatView, ParamAndGradBuffer } from './param-and-grad-buffer.js';

/** Options of DistributedDataParallel (Megatron's DistributedDataParallelConfig, camelCased). */
export interface DistributedDataParallelOptions {
  /** The group gradients are averaged over: Megatron's dp-cp group (default getDataParallelGroup(true)). */
  dataParallelGroup?: ProcessGroup;
  /** Start each bucket's reduction from backward as soon as its gradients are ready (default true). */
  overlapGradReduce?: boolean;
  /** Reduce-scatter instead of all-reduce and keep parameters in a contiguous buffer, for DistributedOptimizer (default false). */
  useDistributedOptimizer?: boolean;
  /**
   * Elements per bucket (default Megatron's max(40M, 1M × dp)); null for one bucket per buffer.
   * Without overlapGradReduce there is always one bucket per buffer, as in Megatron.
   */
  bucketSize?: number | null;
  /** Accumulate and reduce gradients in fp32 whatever the parameter dtype (default true). */
  gradReduceInFp32?: boolean;
  /** Average with the collective's 'avg' instead of scaling by 1/dp before a 'sum' (default false, as in Megatron). */
  averageInCollective?: boolean;
  /**
   * Which parameters are experts of an expert-parallel MoE layer (Megatron's `allreduce = False`
   * parameters): they get their own buffers, reduced over `expertDataParallelGroup` (default:
   * none).
   */
  isExpertParameter?: (name: string, param: Tensor) => boolean;
  /**
   * The group expert gradients are summed over (Megatron's expert-data-parallel group; default the
   * parallel state's when it is initialised, else dataParallelGroup). They are scaled by 1/dp of
   * the dense data-parallel group first, as Megatron does: each expert already saw the tokens of
   * every rank of its expert-parallel group.
   */
  expertDataParallelGroup?: ProcessGroup;
}

/** How the last gradient synchronisation went. */
export interface GradSyncStats {
  /** Buckets reduced. */
  buckets: number;
  /** Buckets whose reduction was started from a gradient hook, i.e. while backward was still running. */
  bucketsLaunchedDuringBackward: number;
  /**
   * Sum of the reductions' durations, in ms: as reported by the backend (Gloo: time on the
   * communication thread), else from the later of launch and the previous op's completion to when
   * the op was first seen complete (an upper bound: completions are noticed at gradient hooks and
   * in finishGradSync).
   */
  commMs: number;
  /** Time finishGradSync spent waiting for reductions, in ms: the communication backward did not hide. */
  exposedMs: number;
}

interface BucketState {
  bucket: Bucket;
  /** The group this bucket is reduced over (dp, or expert-dp for expert buffers). */
  group: ProcessGroup;
  /** Factor applied to the bucket's gradients before the reduction. */
  scale: number;
  /** This rank's shard of the bucket's gradients (reduce-scatter output), with the distributed optimizer. */
  gradShard: Tensor | null;
  ready: Set<Tensor>;
  work: Work | null;
  launchedAt: number;
  launchedInBackward: boolean;
  doneAt: number | null;
}

type ForwardFn = (...args: never[]) => unknown;

/**
 * How long an op ran on the communication thread, when its backend reports it (the Gloo group's
 * works carry `ms`); otherwise the time is taken from launch and completion.
 */
function opMs(work: Work): number | undefined {
  const ms = (work as Work & { ms?: unknown }).ms;
  return typeof ms === 'number' && ms > 0 ? ms : undefined;
}

/**
 * Data parallelism over `dataParallelGroup` with Megatron's contiguous gradient buckets and
 * overlapped reductions. Gradients are averaged over the group. With useDistributedOptimizer, the
 * module's parameters are replaced by views of the contiguous parameter buffer: take
 * `module.parameters()` (or `ddp.parameters()`) after wrapping, not before.
 *
 * One step: `zeroGradBuffer()`, forward/backward (earlier micro-batches inside `noSync`),
 * `finishGradSync()`, then the optimizer.
 */
export class DistributedDataParallel<M extends Module & { forward: ForwardFn }> {
  readonly module: M;
  readonly dataParallelGroup: ProcessGroup;
  readonly overlapGradReduce: boolean;
  readonly useDistributedOptimizer: boolean;
  /** Bucket size in elements (null: one bucket per buffer). */
  readonly bucketSize: number | null;
  /**
   * One buffer per (param dtype, grad dtype, dense or expert), in the order their first parameter
   * appears in the module.
   */
  readonly buffers: readonly ParamAndGradBuffer[];
  /** The group expert gradients are reduced over (dataParallelGroup when there are none). */
  readonly expertDataParallelGroup: ProcessGroup;
  private readonly expertBuffers = new Set<ParamAndGradBuffer>();
  /** Runs the wrapped module's forward. */
  readonly forward: M['forward'];
  private readonly reduceOp: ReduceOp;
  private readonly states: BucketState[] = [];
  private readonly stateOf = new Map<Tensor, BucketState>();
  private readonly removeHooks: (() => void)[] = [];
  private readonly mainGrads: Tensor[] = [];
  /** Launch order of the reductions in flight (ops on one group complete in this order). */
  private inFlight: BucketState[] = [];
  private syncDisabled = 0;
  /** Gradients were accumulated since the last synchronisation. */
  private pending = false;
  private stats: GradSyncStats = { buckets: 0, bucketsLaunchedDuringBackward: 0, commMs: 0, exposedMs: 0 };
  private disposed = false;

  constructor(module: M, options: DistributedDataParallelOptions = {}) {
    this.module = module;
    this.dataParallelGroup = options.dataParallelGroup ?? getDataParallelGroup(true);
    this.overlapGradReduce = options.overlapGradReduce ?? true;
    this.useDistributedOptimizer = options.useDistributedOptimizer ?? false;
    const dp = this.dataParallelGroup.size;
    this.bucketSize = this.overlapGradReduce
      ? options.bucketSize === undefined
        ? defaultBucketSize(dp)
        : options.bucketSize
      : null;
    const averageInCollective = options.averageInCollective ?? false;
    this.reduceOp = averageInCollective ? 'avg' : 'sum';
    const isExpert = options.isExpertParameter ?? (() => false);
    const names = new Map(module.namedParameters().map(([n, p]) => [p, n]));
    const expertParams = new Set(
      module.parameters().filter((p) => p.requiresGrad && isExpert(names.get(p) ?? p.name ?? '', p)),
    );
    this.expertDataParallelGroup =
      options.expertDataParallelGroup ??
      (expertParams.size > 0 && options.dataParallelGroup === undefined && modelParallelIsInitialized()
        ? getExpertDataParallelGroup()
        : this.dataParallelGroup);
    const edp = this.expertDataParallelGroup.size;
    // Megatron: dense gradients × 1/dp then summed over dp; expert gradients × 1/dp then summed
    // over expert-dp (with averaging in the collective: × edp/dp, then averaged over expert-dp)
    const denseScale = averageInCollective ? 1 : 1 / dp;
    const expertScale = averageInCollective ? edp / dp : 1 / dp;
    const gradReduceInFp32 = options.gradReduceInFp32 ?? true;

    const params = module.parameters().filter((p) => p.requiresGrad);
    if (params.length === 0)
      throw new DistributedError(
        'INVALID_ARGUMENT',
        'DistributedDataParallel: the module has no trainable parameters',
      );
    for (const p of params) {
      if (p.mainGrad) {
        throw new DistributedError(
          'INVALID_ARGUMENT',
          `DistributedDataParallel: parameter ${p.describe()} already has a mainGrad (another optimizer or DDP owns it); wrap the module before building an optimizer`,
        );
      }
      if (!p.isContiguous || !isFloating(p.dtype)) {
        throw new DistributedError(
          'INVALID_ARGUMENT',
          `DistributedDataParallel: parameter ${p.describe()} must be a contiguous floating-point tensor`,
        );
      }
    }
    const groups = new Map<string, Tensor[]>();
    for (const p of params) {
      const kind = expertParams.has(p) ? 'expert' : 'dense';
      const key = `${p.dtype}/${gradReduceInFp32 ? 'float32' : p.dtype}/${p.device}/${kind}`;
      const list = groups.get(key) ?? [];
      list.push(p);
      groups.set(key, list);
    }
    this.buffers = [...groups.values()].map((ps) => {
      const expert = expertParams.has(ps[0]);
      const buffer = new ParamAndGradBuffer(ps, {
        paramDtype: ps[0].dtype,
        gradDtype: gradReduceInFp32 ? 'float32' : ps[0].dtype,
        bucketSize: this.bucketSize,
        dataParallelSize: expert ? edp : dp,
        padBucketsForSharding: this.useDistributedOptimizer,
        withParamBuffer: this.useDistributedOptimizer,
      });
      if (expert) this.expertBuffers.add(buffer);
      return buffer;
    });
    if (this.useDistributedOptimizer) this.moveParamsIntoBuffers();
    for (const buffer of this.buffers) {
      const group = this.groupOfBuffer(buffer);
      for (const bucket of buffer.buckets) {
        const shard = bucket.numel / group.size;
        const state: BucketState = {
          bucket,
          group,
          scale: this.expertBuffers.has(buffer) ? expertScale : denseScale,
          gradShard: this.useDistributedOptimizer
            ? keep(flatView(bucket.gradData, group.rank * shard, [shard]))
            : null,
          ready: new Set(),
          work: null,
          launchedAt: 0,
          launchedInBackward: false,
          doneAt: null,
        };
        this.states.push(state);
        for (const p of bucket.params) this.stateOf.set(p, state);
      }
      for (const p of buffer.params) {
        // kept: the views belong to this wrapper, not to an enclosing tidy() scope
        const g = keep(buffer.gradView(p));
        this.mainGrads.push(g);
        p.mainGrad = g;
        this.removeHooks.push(p.registerPostAccumulateGradHook((param) => this.onGradReady(param)));
      }
    }
    this.forward = module.forward.bind(module) as M['forward'];
  }

  /**
   * With the distributed optimizer the parameters must live in the parameter buffer, which the
   * optimizer all-gathers into. A Tensor's storage cannot be re-pointed, so each parameter is
   * replaced in the module tree by a view of the buffer (Module.replaceTensors, as Module.to does);
   * the old tensor is disposed, so gradient hooks must be registered on the new parameters, after
   * wrapping. This
   * keeps one copy of the weights (Megatron's 6 + 12/d bytes per parameter) instead of copying
   * the buffer out into separate parameters after every all-gather. Tensor-parallel attributes
   * move to the new tensors.
   */
  private moveParamsIntoBuffers(): void {
    const replaced = new Map<Tensor, Tensor>();
    for (const buffer of this.buffers) {
      for (const [old, view] of buffer.adoptParamViews()) {
        const a = getTensorModelParallelAttributes(old);
        setTensorModelParallelAttributes(view, a.tensorModelParallel, a.partitionDim, a.partitionStride);
        if (a.sequenceParallel) setSequenceParallelAttribute(view, true);
        replaced.set(old, view);
      }
    }
    this.module.replaceTensors(replaced);
  }

  /** The group a buffer's gradients are reduced over (and its shards are owned within). */
  groupOfBuffer(buffer: ParamAndGradBuffer): ProcessGroup {
    return this.expertBuffers.has(buffer) ? this.expertDataParallelGroup : this.dataParallelGroup;
  }

  /** Whether a buffer holds expert parameters (reduced over the expert-data-parallel group). */
  isExpertBuffer(buffer: ParamAndGradBuffer): boolean {
    return this.expertBuffers.has(buffer);
  }

  /** The module's parameters (after wrapping). */
  parameters(): Tensor[] {
    return this.module.parameters();
  }

  /** The module's parameters with their dotted names (after wrapping). */
  namedParameters(): [string, Tensor][] {
    return this.module.namedParameters();
  }

  private onGradReady(param: Tensor): void {
    this.pending = true;
    if (this.syncDisabled > 0 || !this.overlapGradReduce) return;
    this.poll();
    const state = this.stateOf.get(param)!;
    if (state.work) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `DistributedDataParallel: the gradient of ${param.describe()} changed after its bucket's reduction started; ` +
          'run one backward per step, with the earlier micro-batches inside ddp.noSync()',
      );
    }
    state.ready.add(param);
    if (state.ready.size === state.bucket.params.length) this.launch(state, true);
  }

  private launch(state: BucketState, inBackward: boolean): void {
    const g = state.bucket.gradData;
    if (state.scale !== 1) g.backend.binaryScalar(g, g, state.scale, 'mul');
    state.launchedAt = performance.now();
    state.launchedInBackward = inBackward;
    state.doneAt = null;
    state.work = state.gradShard
      ? state.group.reduceScatterTensor(state.gradShard, g, this.reduceOp)
      : state.group.allReduce(g, this.reduceOp);
    this.inFlight.push(state);
  }

  /** Notes the completion time of reductions that have finished (in order: a later op never finishes first). */
  private poll(): void {
    const now = performance.now();
    for (const s of this.inFlight) {
      if (s.doneAt !== null) continue;
      if (!s.work!.isCompleted()) return;
      s.doneAt = now;
    }
  }

  /** Launches what backward did not; false when there is nothing to synchronise. */
  private launchRemaining(): boolean {
    this.checkAlive('finishGradSync');
    if (!this.pending && this.inFlight.length === 0) return false;
    for (const s of this.states) if (!s.work) this.launch(s, false);
    return true;
  }

  /**
   * Finishes the gradient synchronisation: starts the reductions backward did not start (all of
   * them without overlapGradReduce) and blocks until every one has completed. Afterwards each
   * mainGrad holds the gradient averaged over the group (only this rank's shard of each bucket
   * with the distributed optimizer). A no-op when no gradient arrived since the last call.
   */
  finishGradSync(): void {
    if (!this.launchRemaining()) return;
    let exposed = 0;
    for (const s of this.inFlight) {
      if (s.doneAt !== null) continue;
      if (!s.work!.isCompleted()) {
        const t0 = performance.now();
        s.work!.waitSync();
        exposed += performance.now() - t0;
      }
      s.doneAt = performance.now();
    }
    this.endSync(exposed);
  }

  /** finishGradSync without blocking the event loop. */
  async finishGradSyncAsync(): Promise<void> {
    if (!this.launchRemaining()) return;
    let exposed = 0;
    for (const s of this.inFlight) {
      if (s.doneAt !== null) continue;
      if (!s.work!.isCompleted()) {
        const t0 = performance.now();
        await s.work!.wait();
        exposed += performance.now() - t0;
      }
      s.doneAt = performance.now();
    }
    this.endSync(exposed);
  }

  private endSync(exposedMs: number): void {
    let commMs = 0;
    let prevDone = 0;
    for (const s of this.inFlight) {
      const start = Math.max(s.launchedAt, prevDone);
      commMs += opMs(s.work!) ?? Math.max(0, s.doneAt! - start);
      prevDone = s.doneAt!;
    }
    this.stats = {
      buckets: this.inFlight.length,
      bucketsLaunchedDuringBackward: this.inFlight.filter((s) => s.launchedInBackward).length,
      commMs,
      exposedMs,
    };
    this.resetBuckets();
  }

  private resetBuckets(): void {
    this.pending = false;
    for (const s of this.states) {
      s.ready.clear();
      s.work = null;
    }
    this.inFlight = [];
  }

  /** Waits for reductions still in flight without recording statistics (before touching the buffers). */
  private drain(): void {
    for (const s of this.inFlight) s.work!.waitSync();
    this.resetBuckets();
  }

  /** Statistics of the last finishGradSync. */
  lastSyncStats(): GradSyncStats {
    return { ...this.stats };
  }

  /** Zeroes the gradient buffers (start of a step); waits first for any reduction still in flight. */
  zeroGradBuffer(): void {
    this.checkAlive('zeroGradBuffer');
    this.drain();
    for (const b of this.buffers) b.zeroGrads();
  }

  /**
   * Runs fn with gradient synchronisation off: backward only accumulates into the buffers. Wrap
   * every micro-batch but the last; the last one's backward launches the reductions. fn may be
   * async (synchronisation stays off until its promise settles).
   */
  noSync<T>(fn: () => T): T {
    this.syncDisabled++;
    let result: T;
    try {
      result = fn();
    } catch (e) {
      this.syncDisabled--;
      throw e;
    }
    if (result instanceof Promise) {
      return result.finally(() => {
        this.syncDisabled--;
      }) as T;
    }
    this.syncDisabled--;
    return result;
  }

  /** Copies data-parallel rank 0's parameters to every rank (when ranks were initialised differently). */
  broadcastParams(): void {
    this.checkAlive('broadcastParams');
    const works: Work[] = [];
    for (const b of this.buffers) {
      const group = this.groupOfBuffer(b);
      if (b.paramData) works.push(group.broadcast(b.paramData, 0));
      else for (const p of b.params) works.push(group.broadcast(p, 0));
    }
    for (const w of works) w.waitSync();
  }

  /**
   * Starts the all-gather of every bucket's parameter buffer from each rank's updated shard
   * (distributed optimizer); returns the handles.
   */
  startParamSync(): Work[] {
    this.checkAlive('startParamSync');
    if (!this.useDistributedOptimizer) return [];
    const works: Work[] = [];
    for (const s of this.states) {
      const data = s.bucket.paramData!;
      const shard = s.bucket.numel / s.group.size;
      const mine = flatView(data, s.group.rank * shard, [shard]);
      works.push(s.group.allGatherIntoTensor(data, mine));
      // the collective retains the storage until it completes
      mine.dispose();
    }
    return works;
  }

  /** All-gathers the updated parameter shards and waits (distributed optimizer). */
  syncParams(): void {
    for (const w of this.startParamSync()) w.waitSync();
  }

  private checkAlive(op: string): void {
    if (this.disposed)
      throw new DistributedError(
        'NOT_INITIALIZED',
        `DistributedDataParallel.${op}: this wrapper was disposed`,
      );
  }

  /**
   * Waits for reductions in flight, removes the hooks, clears the parameters' mainGrad and frees
   * the gradient buffers. The parameters stay usable (with the distributed optimizer they keep the
   * parameter buffer alive). The module itself is not disposed.
   */
  dispose(): void {
    if (this.disposed) return;
    this.drain();
    this.disposed = true;
    for (const r of this.removeHooks) r();
    for (const b of this.buffers) for (const p of b.params) p.mainGrad = null;
    for (const g of this.mainGrads) g.dispose();
    for (const s of this.states) s.gradShard?.dispose();
    for (const b of this.buffers) b.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
