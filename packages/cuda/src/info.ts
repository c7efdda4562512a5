// @megapatch/cuda/info: what CUDA this machine and this build offer, without ever throwing (for
// `megapatch info` and for checks before a run).
import { type BackendAddon, loadAddon } from './native.js';
import { ncclLibrary } from './nccl.js';

/** One GPU. */
export interface CudaDevice {
  index: number;
  name: string;
  /** Bytes of device memory. */
  totalMemory: number;
  /** e.g. "9.0" for Hopper. */
  computeCapability: string;
  multiProcessors: number;
  l2CacheBytes: number;
  /** The most shared memory a block can opt into, in bytes. */
  sharedMemoryPerBlockOptin: number;
}

/** What {@link cudaInfo} reports. */
export interface CudaInfo {
  /** A CUDA build and at least one GPU it can use. */
  available: boolean;
  /** Why not (or, when available, a one-line summary). */
  reason: string;
  /** The addon was built with CUDA. */
  built: boolean;
  /** CUDA toolkit the addon was built with, e.g. "13.0.88". */
  toolkit: string | null;
  /** CUDA runtime linked in, e.g. "13.0". */
  runtime: string | null;
  /** Highest CUDA version the installed driver supports, e.g. "13.0"; null without a driver. */
  driver: string | null;
  /**
   * NCCL that the process groups load (libnccl.so.2, or MEGAPATCH_NCCL_LIBRARY), else the one the
   * build linked for this report, e.g. "2.27.3"; null when there is none.
   */
  nccl: string | null;
  /** Why the process groups cannot load NCCL (null when they can, or without a CUDA build). */
  ncclError: string | null;
  devices: CudaDevice[];
}

/** The CUDA build, driver, runtime, NCCL and GPUs of this machine. Never throws. */
export function cudaInfo(): CudaInfo {
  const loaded = loadAddon();
  const none = { toolkit: null, runtime: null, driver: null, nccl: null, ncclError: null, devices: [] };
  if ('error' in loaded) return { available: false, reason: loaded.error, built: false, ...none };
  const n = loaded.addon.info();
  if (!n.built) {
    return {
      available: false,
      reason: `built without CUDA: ${n.reason ?? 'unknown reason'}`,
      built: false,
      ...none,
    };
  }
  const devices = n.devices ?? [];
  let lib: { version?: string; error?: string };
  try {
    lib = ncclLibrary(loaded.addon as BackendAddon);
  } catch (e) {
    lib = { error: (e as Error).message };
  }
  const base = {
    built: true,
    toolkit: n.toolkit ?? null,
    runtime: n.runtime ?? null,
    driver: n.driver ?? null,
    nccl: lib.version ?? n.nccl ?? null,
    ncclError: lib.version ? null : (lib.error ?? null),
    devices,
  };
  if (devices.length === 0) {
    const why = n.driver
      ? (n.deviceError ?? 'the driver reports no GPU')
      : `no NVIDIA driver is installed${n.deviceError ? ` (${n.deviceError})` : ''}`;
    return { available: false, reason: `no usable GPU: ${why}`, ...base };
  }
  const names = devices.map((d) => `${d.name} (sm_${d.computeCapability.replace('.', '')})`).join(', ');
  return {
    available: true,
    reason: `${devices.length} GPU${devices.length > 1 ? 's' : ''}: ${names}`,
    ...base,
  };
}
