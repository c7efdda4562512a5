import type { Backend } from '../backend/backend.js';
import { getBackend, getDefaultDevice } from '../backend/backend.js';
import { getKernel, type KernelName, type KernelTable } from '../backend/kernels.js';
import type { DType } from '../dtype.js';
import { TensorError } from '../errors.js';
import type { Shape } from '../shape.js';
import { Tensor } from '../tensor.js';

export interface CreateOptions {
  dtype?: DType;
  device?: string;
  requiresGrad?: boolean;
}

export function backendFor(device: string | undefined): Backend {
  return getBackend(device ?? getDefaultDevice());
}

/** Checks that every input is alive and on one device; returns that device's backend. */
export function inputsBackend(op: string, ...ts: readonly (Tensor | null | undefined)[]): Backend {
  let b: Backend | undefined;
  for (const t of ts) {
    if (!t) continue;
    if (!(t instanceof Tensor))
      throw new TensorError('INVALID_ARGUMENT', `${op}: expected a Tensor, got ${typeof t}`);
    t.checkAlive(op);
    if (!b) b = t.backend;
    else if (t.backend !== b) {
      throw new TensorError(
        'DEVICE_MISMATCH',
        `${op}: tensors are on different devices (${b.device} and ${t.device})`,
      );
    }
  }
  if (!b) throw new TensorError('INVALID_ARGUMENT', `${op}: needs at least one tensor`);
  return b;
}

/** A new contiguous tensor on a backend. */
export function alloc(backend: Backend, shape: Shape, dtype: DType, zero = false): Tensor {
  return Tensor.empty(backend, shape, dtype, zero);
}

/**
 * Where a backward writes input i's gradient: BackwardFn's dest[i] (the region of a split's
 * gradient buffer it ends up in, any strides) when given with `dtype`, else allocLike(like).
 */
export function gradDestination(
  dest: readonly (Tensor | null)[] | undefined,
  i: number,
  shape: Shape,
  dtype: DType,
  like: Tensor,
): Tensor {
  const d = dest?.[i];
  if (d && d.dtype === dtype && d.shape.length === shape.length && d.shape.every((s, k) => s === shape[k]))
    return d;
  return allocLike(like.backend, shape, dtype, like);
}

/**
 * A fresh dense tensor of `shape` for an op's output computed from `like`: where the backend
 * prefers it (Backend.preferInputLayout: the CUDA backend), its dimensions lie in memory in the
 * order of `like`'s strides (largest outermost; equal strides keep their order), so that the
 * output of an op on a permuted view keeps the view's memory order and the inverse permutation is
 * contiguous again (PyTorch's preserve_format; a strided slice, attention's q, k, v inside the fused
 * QKV projection, keeps its order too). Otherwise, or for a contiguous `like`, a contiguous tensor.
 */
export function allocLike(backend: Backend, shape: Shape, dtype: DType, like: Tensor): Tensor {
  if (!backend.preferInputLayout || like.isContiguous || shape.length !== like.ndim)
    return alloc(backend, shape, dtype);
  const order = shape.map((_, d) => d).sort((a, b) => like.strides[b] - like.strides[a] || a - b);
  const strides = new Array<number>(shape.length);
  let step = 1;
  for (let i = order.length - 1; i >= 0; i--) {
    strides[order[i]] = step;
    step *= shape[order[i]];
  }
  return Tensor.emptyStrided(backend, shape, strides, dtype);
}

export function finishCreate(t: Tensor, opts: CreateOptions | undefined): Tensor {
  if (opts?.requiresGrad) t.requiresGrad_(true);
  return t;
}

/** The backend's kernel `name` (its own, else the composition); an error naming `op` when neither exists. */
export function kernelOf<K extends KernelName>(backend: Backend, name: K, op: string): KernelTable[K] {
  const k = getKernel(backend, name);
  if (!k)
    throw new TensorError('UNSUPPORTED', `${op}: the ${backend.device} backend has no "${name}" kernel`);
  return k;
}

/** A contiguous tensor of `dtype` with x's values (an alias when x already is one), outside the graph. */
export function contiguousRaw(x: Tensor, dtype: DType = x.dtype): Tensor {
  if (x.isContiguous && dtype === x.dtype) return x.viewAs(x.shape, x.strides, x.offset, false);
  const c = alloc(x.backend, x.shape, dtype);
  if (c.numel > 0) x.backend.copy(c, x);
  return c;
}
