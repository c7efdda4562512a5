// The default process group (the world) and new groups, as torch.distributed's init_process_group,
// new_group and destroy_process_group: rank 0 hosts the rendezvous store, every rank joins, and
// each group rendezvouses under its own key prefix.
import { hostname as osHostname } from 'node:os';
import { type CollectiveChecks, collectiveChecksFromEnv } from './collective-checks.js';
import { DistributedError } from './errors.js';
import { GlooProcessGroup } from './gloo.js';
import { type DistributedEnvironment, detectEnvironment } from './launch/env.js';
import { loadNative } from './native.js';
import type { ProcessGroup } from './process-group.js';
import { TCPStore } from './store.js';

/** Ten minutes, as PyTorch's default collective timeout for Gloo. */
export const DEFAULT_TIMEOUT_MS = 600_000;

export interface InitProcessGroupOptions {
  /** Only 'gloo' for now; 'nccl' arrives with @megapatch/cuda. */
  backend?: 'gloo';
  /** Defaults come from the environment (megapatch launch / torchrun, Slurm, Open MPI). */
  rank?: number;
  worldSize?: number;
  masterAddr?: string;
  masterPort?: number;
  /** Timeout of each collective, in ms (default 10 minutes, or MEGAPATCH_DIST_TIMEOUT_S). */
  timeoutMs?: number;
  /** How long ranks wait for each other to join, in ms (default 5 minutes, or MEGAPATCH_RENDEZVOUS_TIMEOUT_S). */
  rendezvousTimeoutMs?: number;
  /**
   * Exchange each collective's op, dtype and size before running it, so that ranks that disagree
   * fail with a message naming them instead of corrupting memory. `true` (the default) checks Gloo's
   * collectives inside their first message; `'detail'` (MEGAPATCH_DIST_CHECKS=detail) also checks
   * NCCL's collectives, sends and receives, and that every rank's tensors take the same path (NCCL
   * or Gloo), at the price of a host round trip per operation; `false` (MEGAPATCH_DIST_CHECKS=0)
   * checks nothing.
   */
  checkCollectives?: CollectiveChecks;
}

interface World {
  env: DistributedEnvironment;
  store: TCPStore;
  group: GlooProcessGroup;
  groups: Set<GlooProcessGroup>;
  timeoutMs: number;
  checks: CollectiveChecks;
  hostname: string;
  iface: string;
  created: number;
}

let world: World | null = null;

function envMs(name: string): number | undefined {
  const v = process.env[name];
  if (v === undefined || v === '') return undefined;
  const s = Number(v);
  if (!(s > 0))
    throw new DistributedError('INVALID_ENVIRONMENT', `${name}=${v} must be a positive number of seconds`);
  return s * 1000;
}

function positiveMs(name: string, v: number | undefined): number | undefined {
  if (v !== undefined && !(Number.isFinite(v) && v > 0)) {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `initProcessGroup: ${name} must be a positive number of ms, got ${v}`,
    );
  }
  return v;
}

/** Whether initProcessGroup() has run (and destroyProcessGroup() has not). */
export function isInitialized(): boolean {
  return world !== null;
}

function current(op: string): World {
  if (!world) {
    throw new DistributedError(
      'NOT_INITIALIZED',
      `${op}: the default process group is not initialised; call initProcessGroup() first`,
    );
  }
  return world;
}

/**
 * Joins the job: rank 0 starts the rendezvous store at MASTER_ADDR:MASTER_PORT, every rank
 * connects and registers, and the world group connects. Fails within the rendezvous timeout with
 * a message naming the ranks that never joined.
 */
export async function initProcessGroup(options: InitProcessGroupOptions = {}): Promise<ProcessGroup> {
  if (world) {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      'initProcessGroup: the default process group is already initialised',
    );
  }
  if (options.backend !== undefined && options.backend !== 'gloo') {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `initProcessGroup: unknown backend '${options.backend}' (only 'gloo' is available)`,
    );
  }
  const detected = detectEnvironment();
  const env: DistributedEnvironment = {
    ...detected,
    rank: options.rank ?? detected.rank,
    worldSize: options.worldSize ?? detected.worldSize,
    masterAddr: options.masterAddr ?? detected.masterAddr,
    masterPort: options.masterPort ?? detected.masterPort,
  };
  if (
    !Number.isInteger(env.worldSize) ||
    env.worldSize < 1 ||
    !Number.isInteger(env.rank) ||
    env.rank < 0 ||
    env.rank >= env.worldSize
  ) {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `initProcessGroup: rank ${env.rank} is not in [0, world size ${env.worldSize})`,
    );
  }
  const timeoutMs =
    positiveMs('timeoutMs', options.timeoutMs) ?? envMs('MEGAPATCH_DIST_TIMEOUT_S') ?? DEFAULT_TIMEOUT_MS;
  const rdvMs =
    positiveMs('rendezvousTimeoutMs', options.rendezvousTimeoutMs) ??
    envMs('MEGAPATCH_RENDEZVOUS_TIMEOUT_S') ??
    300_000;
  if (![undefined, true, false, 'detail'].includes(options.checkCollectives)) {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `initProcessGroup: checkCollectives must be true, false or 'detail', got ${String(options.checkCollectives)}`,
    );
  }
  const checks = options.checkCollectives ?? collectiveChecksFromEnv();
  const iface = process.env.GLOO_SOCKET_IFNAME ?? '';
  const native = loadNative();
  const hostname =
    process.env.MEGAPATCH_GLOO_HOSTNAME ||
    (iface ? '' : (native.localAddressToward(env.masterAddr) ?? '127.0.0.1'));

  const where = `${env.masterAddr}:${env.masterPort}`;
  const store = await TCPStore.create({
    host: env.masterAddr,
    port: env.masterPort,
    isServer: env.rank === 0,
    timeoutMs: rdvMs,
  });
  try {
    await store.set(`megapatch/join/${env.rank}`, `${osHostname()} ${process.pid}`);
    const keys = Array.from({ length: env.worldSize }, (_, r) => `megapatch/join/${r}`);
    try {
      await store.wait(keys, rdvMs);
    } catch (e) {
      if ((e as DistributedError).code !== 'TIMEOUT') throw e;
      const missing: number[] = [];
      for (let r = 0; r < env.worldSize; r++) if (!(await store.check([keys[r]]))) missing.push(r);
      throw new DistributedError(
        'TIMEOUT',
        `rendezvous at ${where}: rank${missing.length > 1 ? 's' : ''} ${missing.join(', ')} of world size ${env.worldSize} ` +
          `did not join within ${rdvMs / 1000} s; check that every rank started and that WORLD_SIZE is right`,
      );
    }
    const group = await GlooProcessGroup.connect({
      storeHost: env.masterAddr,
      storePort: store.port,
      prefix: 'megapatch/g0',
      name: 'world',
      rank: env.rank,
      ranks: Array.from({ length: env.worldSize }, (_, r) => r),
      timeoutMs,
      checkCollectives: checks,
      hostname,
      iface,
    });
    world = { env, store, group, groups: new Set([group]), timeoutMs, checks, hostname, iface, created: 0 };
    return group;
  } catch (e) {
    store.close();
    throw e;
  }
}

/** The world group. */
export function getWorldGroup(): ProcessGroup {
  return current('getWorldGroup').group;
}
/** This process's global rank. */
export function getRank(): number {
  return current('getRank').env.rank;
}
/** Number of processes in the job. */
export function getWorldSize(): number {
  return current('getWorldSize').env.worldSize;
}
/** The environment the job was started with (rank, local rank, node rank, master address). */
export function getEnvironment(): DistributedEnvironment {
  return { ...current('getEnvironment').env };
}
/** The rendezvous store of the job. */
export function getStore(): TCPStore {
  return current('getStore').store;
}

/**
 * A group of the given global ranks, as torch's new_group: every rank of the job calls it for
 * every group, in the same order; members get the group, the others null.
 */
export async function newGroup(
  ranks: readonly number[],
  options: { name?: string; timeoutMs?: number } = {},
): Promise<ProcessGroup | null> {
  const w = current('newGroup');
  const id = ++w.created;
  const name = options.name ?? `group${id}`;
  const seen = new Set<number>();
  for (const r of ranks) {
    if (!Number.isInteger(r) || r < 0 || r >= w.env.worldSize || seen.has(r)) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `newGroup '${name}': ranks [${ranks.join(',')}] must be distinct integers in [0, ${w.env.worldSize})`,
      );
    }
    seen.add(r);
  }
  if (ranks.length === 0) {
    throw new DistributedError('INVALID_ARGUMENT', `newGroup '${name}': a group needs at least one rank`);
  }
  const rank = ranks.indexOf(w.env.rank);
  if (rank < 0) return null;
  const group = await GlooProcessGroup.connect({
    storeHost: w.env.masterAddr,
    storePort: w.store.port,
    prefix: `megapatch/g${id}`,
    name,
    rank,
    ranks,
    timeoutMs: positiveMs('timeoutMs', options.timeoutMs) ?? w.timeoutMs,
    checkCollectives: w.checks,
    hostname: w.hostname,
    iface: w.iface,
  });
  w.groups.add(group);
  return group;
}

/** Destroys one group made by newGroup. */
export function destroyGroup(group: ProcessGroup): void {
  group.destroy();
  world?.groups.delete(group as GlooProcessGroup);
}

/**
 * Leaves the job: destroys every group; rank 0 keeps the store up until every rank has left (or
 * a minute has passed), so no rank loses the store while it still needs it.
 */
export async function destroyProcessGroup(): Promise<void> {
  const w = world;
  if (!w) return;
  world = null;
  for (const g of w.groups) g.destroy();
  try {
    await w.store.set(`megapatch/leave/${w.env.rank}`, '1');
    if (w.env.rank === 0) {
      const keys = Array.from({ length: w.env.worldSize }, (_, r) => `megapatch/leave/${r}`);
      await w.store.wait(keys, 60_000).catch(() => {});
    }
  } catch {
    // the store host is gone already: nothing left to coordinate
  } finally {
    w.store.close();
  }
}
