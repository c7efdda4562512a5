// Host synchronisation. On an asynchronous backend (a GPU's stream) a kernel returns before its
// results exist, so anything that needs a value on the host waits for the device: reading a tensor
// is the only synchronisation point. Checks that a kernel can only answer after running (a target
// class out of range, an index outside a table) therefore do not read their verdict at once: the
// op queues it here with the small tensor the kernel wrote, and the next host read on that device
// (or synchronize()) evaluates the queue and throws the first failure, naming the op that queued
// it, as PyTorch's CUDA device-side assertions surface at the next synchronisation. A synchronous
// backend (the CPU) evaluates every check at once, so its errors come from the op itself.
import { activeBackends, getBackend, normalizeDevice } from './backend/backend.js';
import { keep } from './scope.js';
import type { Tensor } from './tensor.js';

interface PendingCheck {
  values: Tensor;
  verdict: (values: number[]) => Error | null;
}

const pending = new Map<string, PendingCheck[]>();

/** Checks queued before a device synchronises on its own (bounds the memory of a long queue). */
const MAX_PENDING = 1024;

/** A typed array for a check's values (float32 or float64, contiguous: deferCheck's rule). */
function hostArray(t: Tensor): Float32Array | Float64Array {
  if (t.dtype !== 'float64' && t.dtype !== 'float32') {
    throw new Error(`deferCheck: values must be float32 or float64, got ${t.dtype}`);
  }
  if (!t.isContiguous) throw new Error('deferCheck: values must be contiguous');
  return t.dtype === 'float64' ? new Float64Array(t.numel) : new Float32Array(t.numel);
}

/** The values of a small tensor without flushing the queue (the check is the flush). */
function readRaw(t: Tensor): number[] {
  const out = hostArray(t);
  if (t.numel > 0) t.backend.read(t, out);
  return Array.from(out);
}

/**
 * Queues a check of `values` (a small contiguous float32/float64 tensor the caller will not touch
 * again: the queue owns and frees it). `verdict` gets its elements on the host and returns the
 * error to throw, or null. Synchronous backends run the verdict at once.
 */
export function deferCheck(values: Tensor, verdict: (values: number[]) => Error | null): void {
  const backend = values.backend;
  if (backend.synchronous !== false) {
    let err: Error | null;
    try {
      err = verdict(readRaw(values));
    } finally {
      values.dispose();
    }
    if (err) throw err;
    return;
  }
  // the queue owns it now: no tidy() scope that ends before the next read may free it
  keep(values);
  const list = pending.get(backend.device) ?? [];
  pending.set(backend.device, list);
  list.push({ values, verdict });
  if (list.length >= MAX_PENDING) synchronize(backend.device);
}

/** Number of checks waiting on a device (all devices without one). */
export function pendingChecks(device?: string): number {
  if (device !== undefined) return pending.get(device)?.length ?? 0;
  let n = 0;
  for (const l of pending.values()) n += l.length;
  return n;
}

/**
 * Waits for a device (every device without one) and evaluates the checks queued on it, in order;
 * throws the first failure (the later checks are dropped with it, as the device state after a
 * failed check is not meaningful). Called by every host read.
 */
export function synchronize(device?: string): void {
  // wait for the devices' queued kernels (torch.cuda.synchronize), then evaluate their checks; a
  // backend that reads several tensors at once reads a device's queue with its one wait
  const backends = device === undefined ? activeBackends() : [getBackend(device)];
  for (const b of backends) {
    if (!(b.readMany && (pending.get(b.device)?.length ?? 0) > 0)) b.synchronize?.();
  }
  const devices = device === undefined ? [...pending.keys()] : [normalizeDevice(device)];
  for (const d of devices) settle(d);
}

/**
 * Takes device `d`'s queue and evaluates it, throwing its first failure (the checks after it are
 * dropped; every check's tensor is freed). A backend with readMany reads the queue in one wait,
 * with `extra` (a tensor and its destination) when given; otherwise check by check, and `extra`
 * is not read (the caller reads it).
 */
function settle(d: string, extra?: { t: Tensor; dst: ArrayBufferView }): void {
  const list = pending.get(d);
  if (!list || list.length === 0) return;
  pending.delete(d);
  let failure: Error | null = null;
  try {
    const backend = list[0].values.backend;
    if (backend.readMany) {
      const values = list.map((c) => hostArray(c.values));
      const ts = list.map((c) => c.values);
      if (extra) backend.readMany([...ts, extra.t], [...values, extra.dst]);
      else backend.readMany(ts, values);
      for (let i = 0; i < list.length && !failure; i++) failure = list[i].verdict(Array.from(values[i]));
    } else {
      for (const c of list) if (!failure) failure = c.verdict(readRaw(c.values));
    }
  } finally {
    for (const c of list) c.values.dispose();
  }
  if (failure) throw failure;
}

/**
 * @internal A host read of a contiguous tensor into `dst`. A backend that reads several tensors
 * at once reads the device's queued checks with it, in its one wait; then the first failing check
 * throws (its values are not returned). Otherwise the queue is evaluated first, then `t` is read.
 */
export function readChecked(t: Tensor, dst: ArrayBufferView): void {
  const backend = t.backend;
  if (backend.readMany && t.numel > 0 && (pending.get(backend.device)?.length ?? 0) > 0) {
    settle(backend.device, { t, dst });
    return;
  }
  syncBeforeRead(t.device);
  if (t.numel > 0) backend.read(t, dst);
}

/** @internal Host reads call this: evaluates the device's queue when it has one. */
export function syncBeforeRead(device: string): void {
  if (pending.size > 0 && pending.has(device)) synchronize(device);
}
