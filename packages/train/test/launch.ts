// Runs a train worker (test/workers/*.ts) on real processes: the launcher of @megapatch/parallel
// starts `nproc` node processes with torchrun's environment, each running the TypeScript worker
// through tsx with one compute thread. A worker reports by printing `RESULT <json>` lines on stdout.
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { launch } from '@megapatch/parallel/launch';

const here = dirname(fileURLToPath(import.meta.url));
const WORKERS_DIR = join(here, 'workers');
const TSX = join(here, '..', 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs');

/** Options of {@link launchWorkers}. */
export interface LaunchWorkersOptions {
  /** Processes on this node. */
  nproc: number;
  /** Worker script: a file name under test/workers/. */
  script: string;
  /** Passed to every worker as argv[2], as JSON. */
  config: unknown;
  /** Stop every worker after this long (default 120 s). */
  timeoutMs?: number;
  /** More environment variables for the workers. */
  env?: Record<string, string>;
}

/**
 * Runs the workers to the end and returns every `RESULT` line of every rank, parsed, in the order
 * printed; throws with the tail of the workers' output when one fails or the time runs out.
 */
export async function launchWorkers(opts: LaunchWorkersOptions): Promise<unknown[]> {
  let out = '';
  let err = '';
  const abort = new AbortController();
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    const result = await launch({
      command: process.execPath,
      args: ['--import', TSX, join(WORKERS_DIR, opts.script), JSON.stringify(opts.config)],
      nprocPerNode: opts.nproc,
      env: { ...process.env, MEGAPATCH_NUM_THREADS: '1', ...opts.env },
      handleSignals: false,
      prefixOutput: true,
      killGraceMs: 2_000,
      signal: abort.signal,
      stdout: (t) => (out += t),
      stderr: (t) => (err += t),
    });
    if (!result.ok) {
      const why = abort.signal.aborted ? `timed out after ${timeoutMs} ms` : result.message;
      throw new Error(`${opts.script}: ${why}\n${err.slice(-4000)}\n${out.slice(-2000)}`);
    }
  } finally {
    clearTimeout(timer);
  }
  // With prefixed output a line reads `[rank<R>]: RESULT {...}`.
  return out
    .split('\n')
    .map((l) => /^(?:\[rank\d+\]: )?RESULT (.*)$/.exec(l)?.[1])
    .filter((j): j is string => j !== undefined)
    .map((j) => JSON.parse(j) as unknown);
}
