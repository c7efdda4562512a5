import { type Backend, getBackend, getDefaultDevice, normalizeDevice } from './backend/backend.js';

interface DeviceStats {
  liveBytes: number;
  peakBytes: number;
  liveStorages: number;
  allocations: number;
  collectedTensors: number;
  collectedBytes: number;
}

const stats = new Map<string, DeviceStats>();

function statsFor(device: string): DeviceStats {
  let s = stats.get(device);
  if (!s) {
    s = {
      liveBytes: 0,
      peakBytes: 0,
      liveStorages: 0,
      allocations: 0,
      collectedTensors: 0,
      collectedBytes: 0,
    };
    stats.set(device, s);
  }
  return s;
}

/**
 * A block of backend memory shared by every tensor viewing it. Each Tensor object holds one
 * reference; the block is freed when the last one is released.
 */
export class Storage {
  readonly backend: Backend;
  readonly address: number;
  readonly nbytes: number;
  private refs = 1;

  constructor(backend: Backend, nbytes: number, zero: boolean) {
    this.backend = backend;
    this.nbytes = nbytes;
    this.address = backend.alloc(nbytes, zero);
    const s = statsFor(backend.device);
    s.liveBytes += nbytes;
    s.liveStorages++;
    s.allocations++;
    if (s.liveBytes > s.peakBytes) s.peakBytes = s.liveBytes;
  }

  get device(): string {
    return this.backend.device;
  }

  get freed(): boolean {
    return this.refs <= 0;
  }

  /** Number of tensor objects referencing this storage. */
  get refCount(): number {
    return this.refs;
  }

  retain(): void {
    this.refs++;
  }

  release(): void {
    if (this.refs <= 0) return;
    if (--this.refs === 0) {
      this.backend.free(this.address);
      const s = statsFor(this.backend.device);
      s.liveBytes -= this.nbytes;
      s.liveStorages--;
    }
  }
}

export interface MemoryStats {
  /** Bytes held by live storages. */
  liveBytes: number;
  /** The largest liveBytes seen since the start or the last resetPeakMemoryStats(). */
  peakBytes: number;
  /** Number of live storages. */
  liveStorages: number;
  /** Storages allocated since the start. */
  allocations: number;
  /**
   * Tensors dropped without dispose() (and outside tidy) that the garbage collector released since
   * the start: a leak the safety net caught late. A training loop should keep this at 0: the
   * collector does not see native or device memory, so it may run long after the memory is needed.
   * MEGAPATCH_TRACE_COLLECTED=1 records where each was made ({@link collectedTensorSites}).
   */
  collectedTensors: number;
  /** Bytes of the storages whose last reference those releases dropped (freed by the collector). */
  collectedBytes: number;
  /** Bytes kept by the backend's caching allocator for reuse (not in use by any tensor). */
  cachedBytes: number;
}

/**
 * Live and peak memory of one device ("cuda" means cuda:0); by default the default device
 * (setDefaultDevice, "cpu" at start), as torch.cuda.memory_stats() takes the current device.
 */
export function memoryStats(device = getDefaultDevice()): MemoryStats {
  device = normalizeDevice(device);
  let cachedBytes = 0;
  try {
    cachedBytes = getBackend(device).cachedBytes?.() ?? 0;
  } catch {
    // no backend registered for this device: nothing is cached there
  }
  return { ...statsFor(device), cachedBytes };
}

/**
 * @internal The garbage collector released a tensor dropped without dispose(): releases its storage
 * reference and counts it (with its bytes when that was the storage's last reference).
 */
export function releaseCollected(storage: Storage, site: string | null): void {
  const last = storage.refCount === 1;
  const device = storage.device;
  const bytes = last ? storage.nbytes : 0;
  storage.release();
  const s = statsFor(device);
  s.collectedTensors++;
  s.collectedBytes += bytes;
  if (site !== null) {
    const key = `${device}\n${site}`;
    const e = sites.get(key) ?? { device, site, tensors: 0, bytes: 0 };
    e.tensors++;
    e.bytes += bytes;
    sites.set(key, e);
  }
}

/** Where tensors the garbage collector released were made (MEGAPATCH_TRACE_COLLECTED=1). */
export interface CollectedSite {
  device: string;
  /** The stack where the tensor was made, innermost frame first. */
  site: string;
  tensors: number;
  bytes: number;
}

const sites = new Map<string, CollectedSite>();

/**
 * With MEGAPATCH_TRACE_COLLECTED=1 (each tensor records the stack that made it, a cost for
 * debugging only): the places whose tensors the garbage collector released because nobody disposed
 * them, most bytes first; of one device, or of all. Empty without the variable.
 */
export function collectedTensorSites(device?: string): CollectedSite[] {
  const d = device === undefined ? null : normalizeDevice(device);
  return [...sites.values()]
    .filter((e) => d === null || e.device === d)
    .sort((a, b) => b.bytes - a.bytes || b.tensors - a.tensors)
    .map((e) => ({ ...e }));
}

/** Returns the cached free blocks of a device's allocator (default: the default device) to the system. */
export function emptyCache(device = getDefaultDevice()): void {
  getBackend(normalizeDevice(device)).emptyCache?.();
}

/** Sets the peak of a device (default: the default device) to its current live bytes. */
export function resetPeakMemoryStats(device = getDefaultDevice()): void {
  const s = statsFor(normalizeDevice(device));
  s.peakBytes = s.liveBytes;
}
