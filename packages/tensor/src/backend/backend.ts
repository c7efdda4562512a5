import { TensorError } from '../errors.js';
import type { Tensor } from '../tensor.js';
import type { KernelName, KernelTable } from './kernels.js';

export type UnaryOp =
  | 'neg'
  | 'exp'
  | 'log'
  | 'sqrt'
  | 'rsqrt'
  | 'abs'
  | 'tanh'
  | 'sigmoid'
  | 'silu'
  | 'gelu'
  | 'geluTanh'
  | 'relu'
  | 'sin'
  | 'cos'
  | 'square'
  | 'reciprocal'
  | 'sign'
  | 'log1p'
  | 'expm1'
  | 'floor'
  | 'ceil'
  | 'round'
  | 'clamp'
  | 'logicalNot'
  | 'isnan'
  | 'isinf';

export type BinaryOp =
  | 'add'
  | 'sub'
  | 'mul'
  | 'div'
  | 'pow'
  | 'maximum'
  | 'minimum'
  | 'eq'
  | 'ne'
  | 'lt'
  | 'le'
  | 'gt'
  | 'ge'
  | 'logicalAnd'
  | 'logicalOr'
  | 'siluBackward'
  | 'geluBackward'
  | 'geluTanhBackward'
  | 'sigmoidBackward'
  | 'tanhBackward'
  | 'reluBackward'
  | 'atan2';

export type ReduceOp =
  | 'sum'
  | 'mean'
  | 'max'
  | 'min'
  | 'argmax'
  | 'argmin'
  | 'var'
  | 'logsumexp'
  | 'norm'
  | 'prod';

export type RandomDist = 'uniform' | 'normal' | 'randint' | 'bernoulli';

/** One matrix operand of a batched GEMM: element (i, j) of batch b at offset b*bs + i*rs + j*cs. */
export interface GemmOperand {
  tensor: Tensor;
  bs: number;
  rs: number;
  cs: number;
}

/**
 * A device backend: memory and a table of kernels. Kernels write into `out` tensors that the
 * op layer allocated; they never allocate tensors themselves. Fused kernels beyond this core
 * set are looked up by name with `kernel()`.
 */
export interface Backend {
  readonly device: string;
  /**
   * false for a backend whose kernels run asynchronously (a GPU stream): checks that need a
   * kernel's result are then queued until the next host read (see sync.ts). Default true.
   */
  readonly synchronous?: boolean;
  /**
   * true where fused ops that make a fresh output from a permuted view (RoPE, attention, and their
   * input gradients) should lay it out in the view's memory order, as PyTorch's preserve_format
   * (the attention layer's [b, h, s, d] views of [s, b, h, d] rows then need no copies around the
   * attention kernels); default false: contiguous outputs (the CPU's kernels prefer them).
   */
  readonly preferInputLayout?: boolean;
  alloc(bytes: number, zero: boolean): number;
  /** Returns a block; a caching backend may keep it for the next alloc of that size. */
  free(address: number): void;
  /**
   * Waits until every kernel queued on this device has finished (asynchronous backends; a GPU
   * stream's synchronize). Errors of earlier kernels surface here.
   */
  synchronize?(): void;
  /** Releases cached free blocks to the system (caching backends). */
  emptyCache?(): void;
  /** Bytes held in the backend's cache of free blocks. */
  cachedBytes?(): number;
  /** dst = cast(src), src broadcast to dst's shape; any strides. */
  copy(dst: Tensor, src: Tensor): void;
  fill(t: Tensor, value: number): void;
  /** Raw bytes of a contiguous tensor into a typed array (and back). */
  read(t: Tensor, dst: ArrayBufferView): void;
  /**
   * Several contiguous tensors' bytes, each into its typed array, with one wait for the device
   * (optional: asynchronous backends; the queued checks of sync.ts are read this way).
   */
  readMany?(ts: Tensor[], dsts: ArrayBufferView[]): void;
  write(t: Tensor, src: ArrayBufferView): void;
  unary(out: Tensor, x: Tensor, op: UnaryOp, p0?: number, p1?: number): void;
  binary(out: Tensor, x: Tensor, y: Tensor, op: BinaryOp, alpha?: number): void;
  binaryScalar(out: Tensor, x: Tensor, s: number, op: BinaryOp, reverse?: boolean): void;
  where(out: Tensor, cond: Tensor, x: Tensor, y: Tensor): void;
  /** x contiguous, viewed as [outer, R, inner]; out [outer, inner]; indices int64 for max/min. */
  reduce(
    x: Tensor,
    out: Tensor,
    indices: Tensor | null,
    outer: number,
    R: number,
    inner: number,
    op: ReduceOp,
    p: number,
  ): void;
  cumsum(x: Tensor, out: Tensor, outer: number, R: number, inner: number): void;
  /** c = alpha · a @ b + beta · c per batch; a and b any strides, c a unit column stride (cs = 1). */
  gemm(
    batch: number,
    M: number,
    N: number,
    K: number,
    a: GemmOperand,
    b: GemmOperand,
    c: GemmOperand,
    alpha: number,
    beta: number,
  ): void;
  /** Fills a contiguous tensor from the Philox stream (seed, offset counted in 4-word blocks). */
  random(out: Tensor, dist: RandomDist, seed: bigint, offset: bigint, a: number, b: number): void;
  /** A named kernel of the {@link KernelTable}, or undefined when this backend has none. */
  kernel<K extends KernelName>(name: K): KernelTable[K] | undefined;
  /**
   * The device's collective library (NCCL for CUDA devices), which @megapatch/parallel's process
   * groups use for this device's tensors instead of host copies; absent when the device has none.
   */
  collectives?(): DeviceCollectives | null;
}

/** A reduction of a device collective. */
export type DeviceReduceOp = 'sum' | 'avg' | 'max' | 'min';

/**
 * A device's collective communication library (NCCL for CUDA), as its backend offers it: a
 * communicator of `size` ranks is joined by every rank with the id one of them made.
 */
export interface DeviceCollectives {
  /** The library and its version, e.g. 'nccl 2.21.5'. */
  readonly name: string;
  /** Bytes of a communicator id (NCCL_UNIQUE_ID_BYTES). */
  readonly idBytes: number;
  /** A fresh communicator id (NCCL's 128-byte unique id), made on one rank and sent to the others. */
  uniqueId(): Uint8Array;
  /** Joins communicator `id` as `rank` of `size` on this backend's device; blocks until all ranks joined. */
  connect(id: Uint8Array, size: number, rank: number): DeviceCommunicator;
}

/**
 * One communicator on one device. Operations are queued on the device's stream in call order
 * (ordered with its kernels) on contiguous tensors of this device; counts are element counts.
 */
export interface DeviceCommunicator {
  /** recv = reduction over ranks of send (recv may be send). */
  allReduce(send: Tensor, recv: Tensor, op: DeviceReduceOp): void;
  /** recv = rank `root`'s send (recv may be send). */
  broadcast(send: Tensor, recv: Tensor, root: number): void;
  /** recv (size · send.numel elements) = every rank's send, in rank order. */
  allGather(send: Tensor, recv: Tensor): void;
  /** recv = reduction over ranks of part `rank` of send (send has size · recv.numel elements). */
  reduceScatter(send: Tensor, recv: Tensor, op: DeviceReduceOp): void;
  /**
   * Point-to-point transfers that progress together (one NCCL group): each sends `tensor` to, or
   * receives it from, `peer`; transfers between two ranks match in the order they were issued.
   */
  sendRecv(ops: readonly { kind: 'send' | 'recv'; peer: number; tensor: Tensor }[]): void;
  /** '' or the error a queued operation ran into (a peer that died, a network error). */
  asyncError(): string;
  /** Frees the communicator (abort: without waiting for queued operations). Idempotent. */
  destroy(abort?: boolean): void;
}

/**
 * A kind of device with numbered instances ("cuda" → cuda:0, cuda:1, …). Each index gets its own
 * Backend (its own memory, streams and statistics), made on first use.
 */
export interface BackendType {
  /** Device type, e.g. "cuda". */
  readonly type: string;
  /** How many devices of this type the machine has. */
  deviceCount(): number;
  /** The backend of device `index` (0 ≤ index < deviceCount()); its `device` is "<type>:<index>". */
  create(index: number): Backend;
}

const backends = new Map<string, Backend>();
const types = new Map<string, BackendType>();
const lazy = new Map<string, () => Backend>();
let defaultDevice = 'cpu';

const DEVICE_RE = /^([a-z][a-z0-9_]*)(?::(\d+))?$/;

function deviceError(message: string): TensorError {
  return new TensorError('INVALID_DEVICE', message);
}

/** Registers a backend for a device without numbered instances ("cpu"). */
export function registerBackend(backend: Backend): void {
  backends.set(backend.device, backend);
}

/**
 * Registers a backend that is built on first use (the CPU backend loads its native addon only
 * when a CPU tensor is made).
 */
export function registerLazyBackend(device: string, make: () => Backend): void {
  lazy.set(device, make);
}

/** Registers a device type with numbered instances ("cuda:0", "cuda:1", …). */
export function registerBackendType(type: BackendType): void {
  if (!DEVICE_RE.test(type.type) || type.type.includes(':')) {
    throw deviceError(`registerBackendType: "${type.type}" is not a valid device type name`);
  }
  types.set(type.type, type);
  for (const d of [...backends.keys()]) if (d.startsWith(`${type.type}:`)) backends.delete(d);
}

/**
 * The canonical name of a device: "cpu" for the CPU ("cpu:0" too), "<type>:<index>" for numbered
 * devices ("cuda" is "cuda:0", as PyTorch's current device). Throws on a malformed name.
 */
export function normalizeDevice(device: string): string {
  const m = typeof device === 'string' ? DEVICE_RE.exec(device.trim()) : null;
  if (!m) {
    throw deviceError(
      `invalid device "${String(device)}": expected "cpu", "<type>" or "<type>:<index>" (e.g. "cuda:1")`,
    );
  }
  const [, type, index] = m;
  if (types.has(type)) return `${type}:${index ?? 0}`;
  if (index !== undefined && index !== '0') {
    if (backends.has(type) || lazy.has(type)) {
      throw deviceError(`device "${device}": ${type} has a single device, ${type} (or ${type}:0)`);
    }
    return `${type}:${index}`;
  }
  return type;
}

export function getBackend(device: string): Backend {
  const name = normalizeDevice(device);
  const have = backends.get(name);
  if (have) return have;
  const make = lazy.get(name);
  if (make) {
    const b = make();
    backends.set(name, b);
    lazy.delete(name);
    return b;
  }
  const [type, idx] = name.split(':');
  const t = types.get(type);
  if (t) {
    const index = Number(idx);
    const n = t.deviceCount();
    if (index >= n) {
      throw deviceError(
        `device "${name}" does not exist: this machine has ${n} ${type} device${n === 1 ? '' : 's'}${n > 0 ? ` (${type}:0 … ${type}:${n - 1})` : ''}`,
      );
    }
    const b = t.create(index);
    if (b.device !== name) {
      throw deviceError(`the ${type} backend made device "${b.device}" when asked for "${name}"`);
    }
    backends.set(name, b);
    return b;
  }
  throw deviceError(
    `no backend registered for device "${device}"` +
      (type === 'cuda' ? ' (import @megapatch/cuda on a machine with an NVIDIA GPU)' : '') +
      `; registered: ${listBackends().join(', ')}`,
  );
}

/** @internal The backends made so far (devices in use), for waiting on all of them. */
export function activeBackends(): Backend[] {
  return [...backends.values()];
}

/** Registered devices and device types ("cpu", "cuda" for numbered ones). */
export function listBackends(): string[] {
  return [...new Set([...backends.keys(), ...lazy.keys(), ...types.keys()])].filter(
    (d) => !d.includes(':') || !types.has(d.split(':')[0]),
  );
}

/** Number of devices of a type: 1 for single devices ("cpu"), 0 for an unregistered type. */
export function deviceCount(type: string): number {
  const t = types.get(type);
  if (t) return t.deviceCount();
  return backends.has(type) || lazy.has(type) ? 1 : 0;
}

/**
 * The device of tensors made without a `device` option (PyTorch's torch.set_default_device);
 * "cpu" at start.
 */
export function setDefaultDevice(device: string): void {
  const name = normalizeDevice(device);
  getBackend(name);
  defaultDevice = name;
}

export function getDefaultDevice(): string {
  return defaultDevice;
}
