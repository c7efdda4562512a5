import { type Backend, getBackend, getDefaultDevice, normalizeDevice } from './backend/backend.js';

interface DeviceStats {
  liveBytes: number;
  peakBytes: number;
  liveStorages: number;
  allocations: number;
}

const stats = new Map<string, DeviceStats>();

function statsFor(device: string): DeviceStats {
  let s = stats.get(device);
  if (!s) {
    s = { liveBytes: 0, peakBytes: 0, liveStorages: 0, allocations: 0 };
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

/** Returns the cached free blocks of a device's allocator (default: the default device) to the system. */
export function emptyCache(device = getDefaultDevice()): void {
  getBackend(normalizeDevice(device)).emptyCache?.();
}

/** Sets the peak of a device (default: the default device) to its current live bytes. */
export function resetPeakMemoryStats(device = getDefaultDevice()): void {
  const s = statsFor(normalizeDevice(device));
  s.peakBytes = s.liveBytes;
}
