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

interface Addon {
  info(): NativeInfo;
}

const require = createRequire(import.meta.url);
// src/ (tests) or dist/ (the built package): the package root is one level up either way
const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** The addon, or the reason it could not be loaded (every path tried). */
export function loadAddon(): { addon: Addon } | { error: string } {
  const tried: string[] = [];
  const paths = [
    ...(process.env.MEGAPATCH_CUDA_NATIVE ? [resolve(process.env.MEGAPATCH_CUDA_NATIVE)] : []),
    join(packageRoot, 'build', 'Release', 'megapatch_cuda.node'),
  ];
  for (const p of paths) {
    if (!existsSync(p)) {
      tried.push(`${p}: not found`);
      continue;
    }
    try {
      return { addon: require(p) as Addon };
    } catch (e) {
      tried.push(`${p}: ${(e as Error).message.split('\n')[0]}`);
    }
  }
  return {
    error: `the addon of @megapatch/cuda is not built (${tried.join('; ')}); build it with \`pnpm --filter @megapatch/cuda build:native\``,
  };
}
