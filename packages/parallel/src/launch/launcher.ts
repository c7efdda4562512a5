// megapatch's torchrun: starts the workers of one node with the environment torchrun gives them,
// passes their output on line by line (`[rank3]: ...`), forwards SIGINT/SIGTERM, and stops the
// whole node when one worker fails, reporting the first failure and its exit code.
import { type ChildProcess, spawn } from 'node:child_process';
import { createServer } from 'node:net';
import * as os from 'node:os';
import { DistributedError } from '../errors.js';
import { DEFAULT_MASTER_PORT, LOOPBACK_ADDR } from './env.js';

/** The signals a launcher forwards to its workers. */
export type LaunchSignal = 'SIGINT' | 'SIGTERM';

/** What to start, where it sits in the job, and how to stop it. */
export interface LaunchOptions {
  /** The program each worker runs (a name on PATH or a path). */
  command: string;
  /** Its arguments, the same for every worker. */
  args?: readonly string[];
  /** Workers on this node. */
  nprocPerNode: number;
  /** Nodes in the job (default 1); each runs its own launcher with the same nprocPerNode. */
  nnodes?: number;
  /** This node's index, 0 .. nnodes-1 (default 0). */
  nodeRank?: number;
  /** Host of the rendezvous store: required when nnodes > 1, else 127.0.0.1. */
  masterAddr?: string;
  /** Its port: default a free loopback port on one node, 29500 on several. */
  masterPort?: number;
  /** The environment the workers inherit (default process.env); the launcher's variables go on top. */
  env?: NodeJS.ProcessEnv;
  /** Working directory of the workers (default this process's). */
  cwd?: string;
  /** Prefix each line with `[rank<R>]: ` (default true). */
  prefixOutput?: boolean;
  /** Milliseconds between SIGTERM and SIGKILL when stopping workers (default 10 000). */
  killGraceMs?: number;
  /** Aborting it stops the workers as a SIGTERM would (SIGINT when the abort reason is 'SIGINT'). */
  signal?: AbortSignal;
  /** Forward SIGINT/SIGTERM received by this process to the workers (default true). */
  handleSignals?: boolean;
  /** Receives the workers' stdout as whole lines, each ending in a newline (default process.stdout). */
  stdout?: (text: string) => void;
  /** Receives the workers' stderr the same way (default process.stderr). */
  stderr?: (text: string) => void;
}

/** How one worker ended. */
export interface WorkerExit {
  rank: number;
  localRank: number;
  pid: number;
  /** Exit code, or null when a signal ended it. */
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** How a launch ended. */
export interface LaunchResult {
  /** Every worker exited 0 and nothing interrupted the launcher. */
  ok: boolean;
  /**
   * 0 on success; else the first failed worker's exit code (128 + signal number when a signal
   * killed it), or 130 / 143 when the launcher was interrupted by SIGINT / SIGTERM.
   */
  exitCode: number;
  /** One line on what happened: `rank 2 (local rank 2, pid 1234) exited with code 3`. */
  message: string;
  /** The first worker that failed; later exits are consequences of stopping the others. */
  failure?: WorkerExit;
  /** The signal (or abort) that stopped the launch before any worker failed. */
  interrupted?: LaunchSignal;
  /** Whether some worker had to be killed with SIGKILL (grace period over, or a second signal). */
  forcedKill: boolean;
  /** Every worker, by local rank. */
  workers: WorkerExit[];
  worldSize: number;
  masterAddr: string;
  masterPort: number;
}

const DEFAULT_KILL_GRACE_MS = 10_000;
/** A worker line longer than this is passed on in pieces rather than held whole. */
const MAX_LINE_CHARS = 1 << 20;
/** How long to wait for a worker's output pipes after it exited (a child it left may hold them). */
const OUTPUT_DRAIN_MS = 2_000;

const badOption = (message: string) => new DistributedError('INVALID_ARGUMENT', message);

/** The launch with every default filled in and every value checked. */
interface Plan {
  command: string;
  args: readonly string[];
  nproc: number;
  nnodes: number;
  nodeRank: number;
  masterAddr: string;
  masterPort: number;
  env: NodeJS.ProcessEnv;
  cwd?: string;
  prefix: boolean;
  graceMs: number;
  stdout: (text: string) => void;
  stderr: (text: string) => void;
}

function checkInt(name: string, value: number, min: number, max = Number.MAX_SAFE_INTEGER): void {
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    const range =
      max === Number.MAX_SAFE_INTEGER ? `an integer >= ${min}` : `an integer from ${min} to ${max}`;
    throw badOption(`${name} must be ${range}, got ${value}`);
  }
}

async function plan(o: LaunchOptions): Promise<Plan> {
  if (typeof o.command !== 'string' || o.command === '') {
    throw badOption('command is empty: give the program each worker runs');
  }
  checkInt('nprocPerNode', o.nprocPerNode, 1);
  const nnodes = o.nnodes ?? 1;
  checkInt('nnodes', nnodes, 1);
  const nodeRank = o.nodeRank ?? 0;
  checkInt('nodeRank', nodeRank, 0, nnodes - 1);
  if (o.masterPort !== undefined) checkInt('masterPort', o.masterPort, 1, 65535);
  const graceMs = o.killGraceMs ?? DEFAULT_KILL_GRACE_MS;
  if (!(graceMs >= 0 && Number.isFinite(graceMs)))
    throw badOption(`killGraceMs must be >= 0, got ${graceMs}`);
  if (nnodes > 1 && !o.masterAddr) {
    throw badOption(
      `a job of ${nnodes} nodes needs masterAddr, the host of node 0 that every node can reach (and the same masterPort on every node)`,
    );
  }
  const masterPort = o.masterPort ?? (nnodes > 1 ? DEFAULT_MASTER_PORT : await freeLoopbackPort());
  return {
    command: o.command,
    args: o.args ?? [],
    nproc: o.nprocPerNode,
    nnodes,
    nodeRank,
    masterAddr: o.masterAddr || LOOPBACK_ADDR,
    masterPort,
    env: o.env ?? process.env,
    cwd: o.cwd,
    prefix: o.prefixOutput ?? true,
    graceMs,
    stdout: o.stdout ?? ((t) => process.stdout.write(t)),
    stderr: o.stderr ?? ((t) => process.stderr.write(t)),
  };
}

/** A TCP port that was free on the loopback interface a moment ago (bound to port 0, then closed). */
export function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, LOOPBACK_ADDR, () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** The cores this process may use. */
const cores = () =>
  typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;

/**
 * The environment of local worker `localRank`: torchrun's variables, and thread counts that share
 * the cores among the node's workers (oversubscribed OpenMP threads made 2 threads 3.5x slower
 * than 1 here) unless the user set them.
 */
function workerEnvironment(
  p: Pick<Plan, 'nproc' | 'nnodes' | 'nodeRank' | 'masterAddr' | 'masterPort' | 'env'>,
  localRank: number,
): NodeJS.ProcessEnv {
  const worldSize = p.nnodes * p.nproc;
  const rank = String(p.nodeRank * p.nproc + localRank);
  const threads = String(Math.max(1, Math.floor(cores() / p.nproc)));
  return {
    ...p.env,
    RANK: rank,
    LOCAL_RANK: String(localRank),
    WORLD_SIZE: String(worldSize),
    LOCAL_WORLD_SIZE: String(p.nproc),
    GROUP_RANK: String(p.nodeRank),
    GROUP_WORLD_SIZE: String(p.nnodes),
    ROLE_NAME: 'default',
    ROLE_RANK: rank,
    ROLE_WORLD_SIZE: String(worldSize),
    MASTER_ADDR: p.masterAddr,
    MASTER_PORT: String(p.masterPort),
    MEGAPATCH_NUM_THREADS: p.env.MEGAPATCH_NUM_THREADS || threads,
    OMP_NUM_THREADS: p.env.OMP_NUM_THREADS || threads,
  };
}

/** Passes text on in whole lines, each with `prefix`; `end` flushes a last line without its newline. */
function lineWriter(prefix: string, sink: (text: string) => void) {
  let partial = '';
  const emit = (lines: string) =>
    sink(prefix ? `${prefix}${lines.replaceAll('\n', `\n${prefix}`)}\n` : `${lines}\n`);
  return {
    push(chunk: string) {
      const text = partial + chunk;
      const cut = text.lastIndexOf('\n');
      if (cut < 0) {
        partial = text;
        if (partial.length > MAX_LINE_CHARS) {
          emit(partial);
          partial = '';
        }
        return;
      }
      partial = text.slice(cut + 1);
      emit(text.slice(0, cut));
    },
    end() {
      if (partial) emit(partial);
      partial = '';
    },
  };
}

/** A started worker. */
interface Worker {
  rank: number;
  localRank: number;
  child: ChildProcess;
  /** Set on exit: how it ended. */
  exit?: { code: number | null; signal: NodeJS.Signals | null };
  /** Resolves once its output is flushed (or it could not be started). */
  done: Promise<void>;
}

/** Sends `sig` to a worker's process group (the worker and anything it started), if it still runs. */
function signalWorker(w: Worker, sig: NodeJS.Signals): void {
  if (w.exit || w.child.pid === undefined) return;
  try {
    process.kill(-w.child.pid, sig);
  } catch {
    try {
      w.child.kill(sig);
    } catch {
      // it exited meanwhile
    }
  }
}

const exitCodeOfSignal = (sig: NodeJS.Signals) => 128 + (os.constants.signals[sig] ?? 0);

function describeExit(w: WorkerExit): string {
  const who = `rank ${w.rank} (local rank ${w.localRank}, pid ${w.pid})`;
  return w.signal ? `${who} was killed by ${w.signal}` : `${who} exited with code ${w.code}`;
}

/** A spawn failure as one line naming the command. */
function spawnFailure(command: string, e: NodeJS.ErrnoException): DistributedError {
  const why =
    e.code === 'ENOENT'
      ? 'no such program (ENOENT); check its name, that it is on PATH, or give its path'
      : e.code === 'EACCES'
        ? 'permission denied (EACCES); make it executable, or run it through its interpreter'
        : `${e.message}${e.code ? ` (${e.code})` : ''}`;
  return new DistributedError(
    'INVALID_ARGUMENT',
    `cannot start the worker command ${JSON.stringify(command)}: ${why}`,
  );
}

/**
 * Starts `nprocPerNode` workers of `command` on this node with torchrun's environment (RANK,
 * LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE, ROLE_*, MASTER_ADDR,
 * MASTER_PORT, MEGAPATCH_NUM_THREADS, OMP_NUM_THREADS) and resolves when all have exited. Their
 * output comes through whole lines, prefixed `[rank<R>]: `. When a worker fails, the others get
 * SIGTERM, then SIGKILL after `killGraceMs`; SIGINT/SIGTERM to this process (or `signal`) are
 * forwarded the same way, and a second one kills at once. Rejects with a `DistributedError` for
 * bad options or a command that cannot be started; a failed worker resolves with `ok: false`.
 */
export async function launch(options: LaunchOptions): Promise<LaunchResult> {
  const p = await plan(options);
  const worldSize = p.nnodes * p.nproc;
  let failure: WorkerExit | undefined;
  /** Workers still running when the first one failed: the ones the failure stopped. */
  let stoppedByFailure = 0;
  let interrupted: LaunchSignal | undefined;
  let spawnError: DistributedError | undefined;
  let stopping = false;
  let forcedKill = false;
  let graceTimer: NodeJS.Timeout | undefined;
  const workers: Worker[] = [];

  const killAll = () => {
    for (const w of workers) {
      if (!w.exit && w.child.pid !== undefined) forcedKill = true;
      signalWorker(w, 'SIGKILL');
    }
  };
  /** Signals every running worker; the first stop also starts the grace period, a later one kills. */
  const stop = (sig: NodeJS.Signals) => {
    if (stopping) return killAll();
    stopping = true;
    for (const w of workers) signalWorker(w, sig);
    graceTimer = setTimeout(killAll, p.graceMs);
  };
  const interrupt = (sig: LaunchSignal) => {
    if (!stopping) interrupted = sig;
    stop(sig);
  };
  const onSigint = () => interrupt('SIGINT');
  const onSigterm = () => interrupt('SIGTERM');
  const onAbort = () => interrupt(options.signal?.reason === 'SIGINT' ? 'SIGINT' : 'SIGTERM');
  // If this process exits while workers run (process.exit elsewhere), they must not be left behind.
  const onExit = () => {
    for (const w of workers) signalWorker(w, 'SIGKILL');
  };

  const handleSignals = options.handleSignals ?? true;
  if (handleSignals) {
    process.on('SIGINT', onSigint);
    process.on('SIGTERM', onSigterm);
  }
  process.on('exit', onExit);
  options.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    if (options.signal?.aborted) onAbort();
    else {
      for (let localRank = 0; localRank < p.nproc && !stopping; localRank++) {
        try {
          workers.push(start(localRank));
        } catch (e) {
          // spawn throws at once for arguments it rejects (a NUL byte in the command, say)
          spawnError ??= spawnFailure(p.command, e as NodeJS.ErrnoException);
          stop('SIGTERM');
        }
      }
    }
    await Promise.all(workers.map((w) => w.done));
  } finally {
    clearTimeout(graceTimer);
    if (handleSignals) {
      process.off('SIGINT', onSigint);
      process.off('SIGTERM', onSigterm);
    }
    process.off('exit', onExit);
    options.signal?.removeEventListener('abort', onAbort);
  }
  if (spawnError) throw spawnError;

  const exits: WorkerExit[] = workers.map((w) => ({
    rank: w.rank,
    localRank: w.localRank,
    pid: w.child.pid ?? 0,
    code: w.exit?.code ?? null,
    signal: w.exit?.signal ?? null,
  }));
  const base = { forcedKill, workers: exits, worldSize, masterAddr: p.masterAddr, masterPort: p.masterPort };
  if (failure) {
    const n = stoppedByFailure;
    const stopped = n > 0 ? `; stopped the ${n} other worker${n === 1 ? '' : 's'} still running` : '';
    return {
      ...base,
      ok: false,
      exitCode: failure.signal ? exitCodeOfSignal(failure.signal) : (failure.code ?? 1),
      message: `${describeExit(failure)}${stopped}`,
      failure,
    };
  }
  if (interrupted) {
    const killed = forcedKill ? '; the workers that did not stop were killed with SIGKILL' : '';
    return {
      ...base,
      ok: false,
      exitCode: exitCodeOfSignal(interrupted),
      message: `interrupted by ${interrupted}; forwarded it to the ${workers.length} worker(s)${killed}`,
      interrupted,
    };
  }
  return {
    ...base,
    ok: true,
    exitCode: 0,
    message: `all ${workers.length} worker(s) exited with code 0`,
  };

  function start(localRank: number): Worker {
    const rank = p.nodeRank * p.nproc + localRank;
    // A process group of its own, so that a signal reaches whatever the worker started, and a
    // terminal's Ctrl-C reaches only the launcher, which forwards it once.
    const child = spawn(p.command, [...p.args], {
      cwd: p.cwd,
      env: workerEnvironment(p, localRank),
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    const w: Worker = { rank, localRank, child, done: Promise.resolve() };
    const prefix = p.prefix ? `[rank${rank}]: ` : '';
    const out = lineWriter(prefix, p.stdout);
    const err = lineWriter(prefix, p.stderr);
    child.stdout?.setEncoding('utf8').on('data', (s: string) => out.push(s));
    child.stderr?.setEncoding('utf8').on('data', (s: string) => err.push(s));
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (child.pid !== undefined) return;
      spawnError ??= spawnFailure(p.command, e);
      if (!stopping) stop('SIGTERM');
    });
    let drainTimer: NodeJS.Timeout | undefined;
    child.on('exit', (code, signal) => {
      w.exit = { code, signal };
      if (!stopping && (code !== 0 || signal !== null)) {
        failure = { rank, localRank, pid: child.pid ?? 0, code, signal };
        stoppedByFailure = workers.filter((x) => !x.exit).length;
        stop('SIGTERM');
      }
      drainTimer = setTimeout(() => {
        child.stdout?.destroy();
        child.stderr?.destroy();
      }, OUTPUT_DRAIN_MS);
    });
    w.done = new Promise<void>((resolve) =>
      child.on('close', () => {
        clearTimeout(drainTimer);
        out.end();
        err.end();
        resolve();
      }),
    );
    return w;
  }
}
