import type { Tensor } from '../tensor.js';

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
  alloc(bytes: number, zero: boolean): number;
  /** Returns a block; a caching backend may keep it for the next alloc of that size. */
  free(address: number): void;
  /** Releases cached free blocks to the system (caching backends). */
  emptyCache?(): void;
  /** Bytes held in the backend's cache of free blocks. */
  cachedBytes?(): number;
  /** dst = cast(src), src broadcast to dst's shape; any strides. */
  copy(dst: Tensor, src: Tensor): void;
  fill(t: Tensor, value: number): void;
  /** Raw bytes of a contiguous tensor into a typed array (and back). */
  read(t: Tensor, dst: ArrayBufferView): void;
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
  /** A fused kernel by name, or undefined when this backend has none. */
  kernel<F extends (...args: never[]) => unknown>(name: string): F | undefined;
}

const backends = new Map<string, Backend>();

/** Registers a backend for a device type ("cpu", "cuda"). */
export function registerBackend(backend: Backend): void {
  backends.set(backend.device, backend);
}

export function getBackend(device: string): Backend {
  const b = backends.get(device) ?? backends.get(device.split(':')[0]);
  if (!b) {
    throw new Error(
      `no backend registered for device "${device}"` +
        (device.startsWith('cuda') ? ' (import @megapatch/cuda on a machine with an NVIDIA GPU)' : ''),
    );
  }
  return b;
}

export function listBackends(): string[] {
  return [...backends.keys()];
}
