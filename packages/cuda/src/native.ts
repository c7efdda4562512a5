// Loads the addon of @megapatch/cuda (native/src). It is always built (without CUDA on machines
// that lack the toolkit), so a failure to load it is itself the reason CUDA is unavailable.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** What the addon's info() returns (see native/src/info.cc). */
export interface NativeInfo {
  built: boolean;
  /** Built without CUDA: why. */
  reason?: string;
  toolkit?: string;
  runtime?: string;
  driver?: string;
  nccl?: string;
  deviceError?: string;
  devices?: {
    index: number;
    name: string;
    totalMemory: number;
    computeCapability: string;
    multiProcessors: number;
    l2CacheBytes: number;
    sharedMemoryPerBlockOptin: number;
  }[];
}

/** The backend's entries (native/src/backend/*.cc): present in a CUDA build and in the emulator. */
export interface BackendAddon {
  emulator: boolean;
  /** The kernel families beyond the core that this build has (native/src/backend/state.cc). */
  families: string[];
  setArgBuffer(buf: Float64Array): void;
  setDevice(index: number): void;
  deviceCount(): number;
  synchronize(): void;
  alloc(bytes: number, zero: boolean): number;
  free(address: number): void;
  emptyCache(): void;
  cachedBytes(): number;
  memGetInfo(): [number, number];
  readInto(address: number, bytes: number, dst: ArrayBufferView): void;
  /** Each address's bytes into its typed array, through page-locked memory, with one wait. */
  readIntoMany(addresses: Float64Array, bytes: Float64Array, dsts: ArrayBufferView[]): void;
  /** Queues an upload through the device's page-locked staging ring (a large one waits). */
  writeFrom(address: number, src: ArrayBufferView): void;
  /** The staging ring's size per device from its next idle moment on (0: uploads wait). */
  setStagingBytes(bytes: number): void;
  uploadStats(): { staged: number; direct: number; waits: number; stagingBytes: number };
  /** How often the host waited for a device since the process started. */
  hostWaits(): number;
  gemmEngine(): string;
  /**
   * The emulator only: kernel launches and cudaStreamWaitEvent calls (forks and joins between
   * streams) since the process started, and whether MEGAPATCH_CUDA_EMU_DRY_RUN is on (launches
   * counted, not run: a host-side profile).
   */
  emuStats?(): { launches: number; streamWaits: number; dryRun: boolean };
  /** The kernel profiler's marks (native/src/backend/profile.cc; src/profile.ts uses them). */
  profileMark?(): number;
  profileCollect?(): { ms: Float64Array; mallocs: number; hostWaits: number };
  [entry: string]: unknown;
}

export interface Addon extends Partial<BackendAddon> {
  info(): NativeInfo;
}

const require = createRequire(import.meta.url);
// src/ (tests) or dist/ (the built package): the package root is one level up either way
const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** The addon, or the reason it could not be loaded (every path tried). */
export function loadAddon(): { addon: Addon } | { error: string } {
  return load<Addon>(process.env.MEGAPATCH_CUDA_NATIVE, 'megapatch_cuda.node');
}

/** The emulator build of the backend (megapatch_cuda_emu.node), or why it could not be loaded. */
export function loadEmulatorAddon(): { addon: BackendAddon } | { error: string } {
  return load<BackendAddon>(process.env.MEGAPATCH_CUDA_EMU_NATIVE, 'megapatch_cuda_emu.node');
}

// An override (MEGAPATCH_CUDA_NATIVE, MEGAPATCH_CUDA_EMU_NATIVE) is the only path tried: a build the
// user named that does not load is reported, never replaced by the package's own.
function load<T>(override: string | undefined, file: string): { addon: T } | { error: string } {
  const tried: string[] = [];
  const paths = override ? [resolve(override)] : [join(packageRoot, 'build', 'Release', file)];
  for (const p of paths) {
    if (!existsSync(p)) {
      tried.push(`${p}: not found`);
      continue;
    }
    try {
      return { addon: require(p) as T };
    } catch (e) {
      tried.push(`${p}: ${(e as Error).message.split('\n')[0]}`);
    }
  }
  return {
    error: `the addon of @megapatch/cuda is not built (${tried.join('; ')}); build it with \`pnpm --filter @megapatch/cuda build:native\``,
  };
}
