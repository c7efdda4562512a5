// Runs real worker processes for multi-process tests: N node processes with torchrun's environment
// (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), each running a
// TypeScript worker script through tsx. A worker reports its result by printing one line
// `RESULT <json>` on stdout.
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freeLoopbackPort } from '../../src/launch/launcher.js';

const here = dirname(fileURLToPath(import.meta.url));
export const WORKERS_DIR = join(here, '..', 'workers');
const TSX = join(here, '..', '..', 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs');

/** A free TCP port on the loopback interface (the launcher's own choice of port). */
export const freePort = freeLoopbackPort;

export interface WorkerOutcome {
  rank: number;
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Every `RESULT <json>` line the worker printed, parsed, in order. */
  results: unknown[];
}

export interface RunWorkersOptions {
  /** Number of processes. */
  nproc: number;
  /** Worker script: a path, or a file name under test/workers/. */
  script: string;
  args?: readonly string[];
  /** Extra environment for every worker, or per rank. */
  env?: Record<string, string> | ((rank: number) => Record<string, string>);
  /** Kill every worker after this long (default 90 s). */
  timeoutMs?: number;
  port?: number;
}

/** Starts the workers and waits for all of them; never throws on a failed worker (tests check codes). */
export async function runWorkers(opts: RunWorkersOptions): Promise<WorkerOutcome[]> {
  const port = opts.port ?? (await freePort());
  const script = opts.script.includes('/') ? opts.script : join(WORKERS_DIR, opts.script);
  const timeoutMs = opts.timeoutMs ?? 90_000;
  const runs = Array.from({ length: opts.nproc }, (_, rank) => {
    const extra = typeof opts.env === 'function' ? opts.env(rank) : (opts.env ?? {});
    const child = spawn(process.execPath, ['--import', TSX, script, ...(opts.args ?? [])], {
      env: {
        ...process.env,
        RANK: String(rank),
        LOCAL_RANK: String(rank),
        WORLD_SIZE: String(opts.nproc),
        LOCAL_WORLD_SIZE: String(opts.nproc),
        MASTER_ADDR: '127.0.0.1',
        MASTER_PORT: String(port),
        MEGAPATCH_NUM_THREADS: '1',
        ...extra,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    return new Promise<WorkerOutcome>((resolve) => {
      child.on('close', (code, signal) => {
        clearTimeout(timer);
        const results = stdout
          .split('\n')
          .filter((l) => l.startsWith('RESULT '))
          .map((l) => JSON.parse(l.slice(7)));
        resolve({ rank, code, signal, stdout, stderr, results });
      });
    });
  });
  return Promise.all(runs);
}

/** Throws with every failed worker's stderr when any worker did not exit 0. */
export function expectAllOk(outcomes: readonly WorkerOutcome[]): void {
  const bad = outcomes.filter((o) => o.code !== 0);
  if (bad.length === 0) return;
  throw new Error(
    bad
      .map(
        (o) =>
          `rank ${o.rank} exited ${o.code ?? o.signal}:\n${o.stderr.slice(-4000)}\n${o.stdout.slice(-2000)}`,
      )
      .join('\n---\n'),
  );
}
