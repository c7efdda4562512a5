// Loads the Gloo addon. Like @megapatch/tensor's loader, it tries each known location and, when none
// works, throws one message that lists every attempt and says how to build it.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DistributedError } from './errors.js';

/** A finished (or pending) native operation. */
export interface NativeResult {
  done: boolean;
  /** Empty on success, else a DistributedError code. */
  code: string;
  message: string;
  /** Milliseconds the operation ran on its communication thread. */
  ms: number;
}

export interface NativeStoreHandle {
  readonly port: number;
  connect(): Promise<void>;
  set(key: string, value: string | Uint8Array): Promise<void>;
  get(key: string, timeoutMs: number): Promise<Buffer>;
  add(key: string, delta: number): Promise<number>;
  check(keys: readonly string[]): Promise<boolean>;
  wait(keys: readonly string[], timeoutMs: number): Promise<void>;
  numKeys(): Promise<number>;
  deleteKey(key: string): Promise<boolean>;
  compareSet(key: string, expected: string | Uint8Array, desired: string | Uint8Array): Promise<Buffer>;
  close(): void;
}

export interface NativeGroupHandle {
  connect(): number;
  allReduce(address: number, count: number, dtype: number, op: number): number;
  allGather(input: number, outputs: number[], countPerRank: number, dtype: number): number;
  reduceScatter(inputs: number[], output: number, countPerRank: number, dtype: number, op: number): number;
  broadcast(address: number, count: number, dtype: number, root: number): number;
  allToAll(
    input: number,
    output: number,
    inRows: number[],
    outRows: number[],
    rowElems: number,
    dtype: number,
  ): number;
  barrier(): number;
  send(address: number, count: number, dtype: number, peer: number, tag: number): number;
  recv(address: number, count: number, dtype: number, peer: number, tag: number): number;
  waitSync(id: number): NativeResult | null;
  result(id: number): NativeResult | null;
  ref(): void;
  unref(): void;
  destroy(): void;
}

export interface NativeAddon {
  NativeStore: new (host: string, port: number, isServer: boolean, timeoutMs: number) => NativeStoreHandle;
  NativeGroup: new (
    storeHost: string,
    storePort: number,
    prefix: string,
    name: string,
    rank: number,
    size: number,
    globalRanks: number[],
    timeoutMs: number,
    checks: boolean,
    hostname: string,
    iface: string,
    onComplete: (id: number) => void,
  ) => NativeGroupHandle;
  localAddressToward(host: string): string | null;
  buildInfo: { gloo: string; transport: string };
}

const require = createRequire(import.meta.url);
const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

function candidates(): string[] {
  const list: string[] = [];
  if (process.env.MEGAPATCH_PARALLEL_NATIVE) list.push(resolve(process.env.MEGAPATCH_PARALLEL_NATIVE));
  list.push(join(packageRoot, 'build', 'Release', 'megapatch_parallel.node'));
  list.push(join(packageRoot, 'build', 'Debug', 'megapatch_parallel.node'));
  return list;
}

let cached: NativeAddon | undefined;
let cachedPath = '';

/** The Gloo addon, loaded on first use. */
export function loadNative(): NativeAddon {
  if (cached) return cached;
  const errors: string[] = [];
  for (const path of candidates()) {
    if (!existsSync(path)) {
      errors.push(`${path}: not found`);
      continue;
    }
    try {
      cached = require(path) as NativeAddon;
      cachedPath = path;
      return cached;
    } catch (e) {
      errors.push(`${path}: ${(e as Error).message.split('\n')[0]}`);
    }
  }
  throw new DistributedError(
    'NATIVE_LOAD',
    `could not load the Gloo addon of @megapatch/parallel (tried ${errors.join('; ')}); install libgloo-dev ` +
      '(sudo apt-get install -y libgloo-dev) and build it with `pnpm --filter @megapatch/parallel build:native`, ' +
      'or point MEGAPATCH_PARALLEL_NATIVE at a built megapatch_parallel.node',
  );
}

/** Turns an error thrown or returned by the addon into a DistributedError. */
export function nativeError(e: unknown): DistributedError {
  if (e instanceof DistributedError) return e;
  const err = e as { code?: string; message?: string };
  const code = (err.code || 'BACKEND') as DistributedError['code'];
  return new DistributedError(code, err.message ?? String(e));
}

/** What `megapatch info` shows about the collectives backends. */
export interface CollectivesInfo {
  gloo: { available: true; addonPath: string; library: string } | { available: false; error: string };
}

/** Whether the Gloo addon loads, and from where. */
export function collectivesInfo(): CollectivesInfo {
  try {
    const addon = loadNative();
    return {
      gloo: {
        available: true,
        addonPath: cachedPath,
        library: `${addon.buildInfo.gloo}, ${addon.buildInfo.transport}`,
      },
    };
  } catch (e) {
    return { gloo: { available: false, error: (e as Error).message } };
  }
}
