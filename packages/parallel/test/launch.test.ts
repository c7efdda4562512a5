// The launcher with real worker processes (test/workers/launch-*.mjs): torchrun's environment,
// whole prefixed lines, the first failure stopping the rest, signals forwarded and escalated, and
// two launchers forming one job of two nodes.
import { type ChildProcess, spawn } from 'node:child_process';
import * as os from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { DistributedError } from '../src/errors.js';
import { type LaunchOptions, type LaunchResult, launch } from '../src/launch/launcher.js';
import { freePort } from './helpers/workers.js';

const here = dirname(fileURLToPath(import.meta.url));
const ENV_WORKER = join(here, 'workers', 'launch-env.mjs');
const ROLE_WORKER = join(here, 'workers', 'launch-role.mjs');
const TSX = join(here, '..', 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs');
const LAUNCHER = pathToFileURL(join(here, '..', 'src', 'launch', 'launcher.ts')).href;

/** Output sinks that record what the launcher wrote, and the lines so far. */
function capture(onLine?: (line: string) => void) {
  const chunks = { out: [] as string[], err: [] as string[] };
  const lines = (which: 'out' | 'err') => chunks[which].join('').split('\n').slice(0, -1);
  const sink = (which: 'out' | 'err') => (text: string) => {
    chunks[which].push(text);
    if (onLine) for (const l of text.split('\n').slice(0, -1)) onLine(l);
  };
  return { chunks, lines, stdout: sink('out'), stderr: sink('err') };
}

/** Runs `launch` in this process with the role worker (one role per rank) and recorded output. */
async function runRoles(roles: string[], extra: Partial<LaunchOptions> = {}) {
  const io = capture();
  const t0 = Date.now();
  const result = await launch({
    command: process.execPath,
    args: [ROLE_WORKER, ...roles],
    nprocPerNode: roles.length,
    handleSignals: false,
    stdout: io.stdout,
    stderr: io.stderr,
    ...extra,
  });
  return { result, ms: Date.now() - t0, out: io.lines('out'), err: io.lines('err') };
}

/** The `ENV {...}` lines of the env worker, by rank. */
function envByRank(lines: string[]): Map<number, Record<string, string>> {
  const byRank = new Map<number, Record<string, string>>();
  for (const l of lines) {
    const m = /^(?:\[rank(\d+)\]: )?ENV (.*)$/.exec(l);
    if (!m) continue;
    const env = JSON.parse(m[2]) as Record<string, string>;
    byRank.set(Number(env.RANK), env);
  }
  return byRank;
}

describe('launch: environment and output', () => {
  it('three workers get torchrun variables, shared-out thread counts and whole prefixed lines', async () => {
    const io = capture();
    const result = await launch({
      command: process.execPath,
      args: [ENV_WORKER],
      nprocPerNode: 3,
      handleSignals: false,
      env: { ...process.env, MEGAPATCH_NUM_THREADS: '', OMP_NUM_THREADS: '' },
      stdout: io.stdout,
      stderr: io.stderr,
    });
    expect(result).toMatchObject({
      ok: true,
      exitCode: 0,
      worldSize: 3,
      masterAddr: '127.0.0.1',
      forcedKill: false,
    });
    expect(result.workers.map((w) => [w.rank, w.localRank, w.code, w.signal])).toEqual([
      [0, 0, 0, null],
      [1, 1, 0, null],
      [2, 2, 0, null],
    ]);
    const threads = String(Math.max(1, Math.floor(os.availableParallelism() / 3)));
    const envs = envByRank(io.lines('out'));
    for (const rank of [0, 1, 2]) {
      expect(envs.get(rank)).toEqual({
        RANK: String(rank),
        LOCAL_RANK: String(rank),
        WORLD_SIZE: '3',
        LOCAL_WORLD_SIZE: '3',
        GROUP_RANK: '0',
        GROUP_WORLD_SIZE: '1',
        ROLE_RANK: String(rank),
        ROLE_WORLD_SIZE: '3',
        MASTER_ADDR: '127.0.0.1',
        MASTER_PORT: String(result.masterPort),
        MEGAPATCH_NUM_THREADS: threads,
        OMP_NUM_THREADS: threads,
      });
    }
    expect(result.masterPort).toBeGreaterThan(0);
    // Every write is whole lines; the line written in pieces arrives whole; the last line without
    // its newline is flushed at exit.
    for (const chunk of [...io.chunks.out, ...io.chunks.err]) expect(chunk.endsWith('\n')).toBe(true);
    const out = io.lines('out');
    expect(out).toHaveLength(9);
    for (const rank of [0, 1, 2]) {
      expect(out).toContain(`[rank${rank}]: piece-a piece-b piece-c ${rank}`);
      expect(out).toContain(`[rank${rank}]: tail without newline ${rank}`);
    }
    expect(io.lines('err').sort()).toEqual([0, 1, 2].map((r) => `[rank${r}]: to stderr from ${r}`));
  });

  it('keeps thread counts the user set, and prints bare lines with prefixOutput: false', async () => {
    const io = capture();
    await launch({
      command: process.execPath,
      args: [ENV_WORKER],
      nprocPerNode: 2,
      handleSignals: false,
      prefixOutput: false,
      env: { ...process.env, MEGAPATCH_NUM_THREADS: '7', OMP_NUM_THREADS: '5' },
      stdout: io.stdout,
      stderr: io.stderr,
    });
    const envs = envByRank(io.lines('out'));
    expect(envs.get(1)).toMatchObject({ RANK: '1', MEGAPATCH_NUM_THREADS: '7', OMP_NUM_THREADS: '5' });
    expect(io.lines('out')).toContain('tail without newline 0');
    expect(io.lines('err').sort()).toEqual(['to stderr from 0', 'to stderr from 1']);
  });

  it('two launchers with --nnodes 2 form one job: world ranks 0..3', async () => {
    const port = await freePort();
    const node = (nodeRank: number) => {
      const io = capture();
      const done = launch({
        command: process.execPath,
        args: [ENV_WORKER],
        nprocPerNode: 2,
        nnodes: 2,
        nodeRank,
        masterAddr: '127.0.0.1',
        masterPort: port,
        handleSignals: false,
        stdout: io.stdout,
        stderr: io.stderr,
      });
      return done.then((result) => ({ result, envs: envByRank(io.lines('out')), out: io.lines('out') }));
    };
    const [a, b] = await Promise.all([node(0), node(1)]);
    expect(a.result.ok && b.result.ok).toBe(true);
    expect([...a.envs.keys()].sort()).toEqual([0, 1]);
    expect([...b.envs.keys()].sort()).toEqual([2, 3]);
    for (const [rank, env] of [...a.envs, ...b.envs]) {
      expect(env).toMatchObject({
        LOCAL_RANK: String(rank % 2),
        WORLD_SIZE: '4',
        LOCAL_WORLD_SIZE: '2',
        GROUP_RANK: String(Math.floor(rank / 2)),
        GROUP_WORLD_SIZE: '2',
        MASTER_ADDR: '127.0.0.1',
        MASTER_PORT: String(port),
      });
    }
    expect(b.out).toContain('[rank3]: tail without newline 3');
  });

  it('several nodes without a port use 29500', async () => {
    const io = capture();
    const r = await launch({
      command: process.execPath,
      args: [ENV_WORKER],
      nprocPerNode: 1,
      nnodes: 2,
      nodeRank: 1,
      masterAddr: 'head-node',
      handleSignals: false,
      stdout: io.stdout,
      stderr: io.stderr,
    });
    expect(r.masterPort).toBe(29500);
    expect(envByRank(io.lines('out')).get(1)).toMatchObject({
      MASTER_ADDR: 'head-node',
      MASTER_PORT: '29500',
    });
  });
});

describe('launch: failures', () => {
  it('one worker exits 3 while the others sleep: they are stopped at once and the code is 3', async () => {
    const { result, ms } = await runRoles(['sleep', 'sleep', 'exit=3']);
    expect(ms).toBeLessThan(5_000); // the sleepers would run 30 s
    expect(result.ok).toBe(false);
    expect(result.exitCode).toBe(3);
    const pid = result.workers[2].pid;
    expect(result.message).toBe(
      `rank 2 (local rank 2, pid ${pid}) exited with code 3; stopped the 2 other workers still running`,
    );
    expect(result.failure).toEqual({ rank: 2, localRank: 2, pid, code: 3, signal: null });
    expect(result.workers.map((w) => w.signal)).toEqual(['SIGTERM', 'SIGTERM', null]);
    expect(result.forcedKill).toBe(false);
  });

  it('a worker killed by a signal: "was killed by SIGKILL", exit code 137', async () => {
    const { result } = await runRoles(['sleep', 'signal=SIGKILL']);
    expect(result.exitCode).toBe(137);
    expect(result.message).toMatch(
      /^rank 1 \(local rank 1, pid \d+\) was killed by SIGKILL; stopped the 1 other worker still running$/,
    );
    expect(result.failure?.signal).toBe('SIGKILL');
  });

  it('a worker that ignores SIGTERM is killed once the grace period is over', async () => {
    const controller = new AbortController();
    let ready = 0;
    let abortedAt = 0;
    const io = capture((l) => {
      if (l.endsWith(': ready') && ++ready === 2) {
        abortedAt = Date.now();
        controller.abort();
      }
    });
    const result = await launch({
      command: process.execPath,
      args: [ROLE_WORKER, 'trap', 'ignore'],
      nprocPerNode: 2,
      killGraceMs: 400,
      handleSignals: false,
      signal: controller.signal,
      stdout: io.stdout,
      stderr: io.stderr,
    });
    const ms = Date.now() - abortedAt;
    expect(result).toMatchObject({ exitCode: 143, interrupted: 'SIGTERM', forcedKill: true });
    expect(result.message).toBe(
      'interrupted by SIGTERM; forwarded it to the 2 worker(s); the workers that did not stop were killed with SIGKILL',
    );
    expect(io.lines('out')).toEqual(
      expect.arrayContaining(['[rank0]: got SIGTERM', '[rank1]: ignoring SIGTERM']),
    );
    expect(result.workers.map((w) => [w.code, w.signal])).toEqual([
      [0, null],
      [null, 'SIGKILL'],
    ]);
    expect(ms).toBeGreaterThanOrEqual(400);
    expect(ms).toBeLessThan(5_000);
  });

  it('a command that cannot be started is an error naming it', async () => {
    const err = await launch({
      command: 'megapatch-no-such-program',
      nprocPerNode: 2,
      handleSignals: false,
    }).catch((e) => e);
    expect(err).toBeInstanceOf(DistributedError);
    expect(err.code).toBe('INVALID_ARGUMENT');
    expect(err.message).toBe(
      'cannot start the worker command "megapatch-no-such-program": no such program (ENOENT); check its name, that it is on PATH, or give its path',
    );
  });

  it('a command spawn refuses outright is the same kind of error', async () => {
    const err = await launch({ command: 'bad\0name', nprocPerNode: 2, handleSignals: false }).catch((e) => e);
    expect(err).toBeInstanceOf(DistributedError);
    expect(err.message).toMatch(/^cannot start the worker command "bad\\u0000name": .*null bytes/);
  });

  it.each<[string, Partial<LaunchOptions>, string]>([
    ['no workers', { nprocPerNode: 0 }, 'nprocPerNode must be an integer >= 1, got 0'],
    ['a fractional count', { nprocPerNode: 1.5 }, 'nprocPerNode must be an integer >= 1, got 1.5'],
    [
      'a node rank past the nodes',
      { nnodes: 2, nodeRank: 2, masterAddr: 'h' },
      'nodeRank must be an integer from 0 to 1, got 2',
    ],
    ['several nodes without an address', { nnodes: 2 }, 'a job of 2 nodes needs masterAddr'],
    ['a bad port', { masterPort: 65536 }, 'masterPort must be an integer from 1 to 65535, got 65536'],
    ['a negative grace period', { killGraceMs: -1 }, 'killGraceMs must be >= 0, got -1'],
    ['an empty command', { command: '' }, 'command is empty'],
  ])('bad options: %s', async (_, bad, message) => {
    const err = await launch({
      command: process.execPath,
      nprocPerNode: 1,
      handleSignals: false,
      ...bad,
    }).catch((e) => e);
    expect(err).toBeInstanceOf(DistributedError);
    expect(err.code).toBe('INVALID_ARGUMENT');
    expect(err.message).toContain(message);
  });

  it('a child a worker left behind holding its output does not keep the launcher waiting', async () => {
    const io = capture();
    const t0 = Date.now();
    const r = await launch({
      command: '/bin/sh',
      args: ['-c', 'sleep 4 & echo started'],
      nprocPerNode: 1,
      handleSignals: false,
      stdout: io.stdout,
      stderr: io.stderr,
    });
    expect(r.ok).toBe(true);
    expect(Date.now() - t0).toBeLessThan(3_500);
    expect(io.lines('out')).toEqual(['[rank0]: started']);
  });
});

describe('launch: signals', () => {
  it('an AbortSignal with reason SIGINT is forwarded as SIGINT: exit code 130', async () => {
    const controller = new AbortController();
    let ready = 0;
    const io = capture((l) => {
      if (l.endsWith(': ready') && ++ready === 2) controller.abort('SIGINT');
    });
    const r = await launch({
      command: process.execPath,
      args: [ROLE_WORKER, 'trap'],
      nprocPerNode: 2,
      handleSignals: false,
      signal: controller.signal,
      stdout: io.stdout,
      stderr: io.stderr,
    });
    expect(r).toMatchObject({ ok: false, exitCode: 130, interrupted: 'SIGINT', forcedKill: false });
    expect(r.message).toBe('interrupted by SIGINT; forwarded it to the 2 worker(s)');
    expect(io.lines('out')).toEqual(expect.arrayContaining(['[rank0]: got SIGINT', '[rank1]: got SIGINT']));
    expect(r.workers.map((w) => w.code)).toEqual([0, 0]);
  });

  it('an already aborted signal starts nothing', async () => {
    const r = await launch({
      command: process.execPath,
      nprocPerNode: 2,
      handleSignals: false,
      signal: AbortSignal.abort(),
    });
    expect(r).toMatchObject({ ok: false, exitCode: 143, interrupted: 'SIGTERM', workers: [] });
  });

  /** The launcher as its own process (through tsx), so that signals can be sent to it. */
  function startLauncher(options: Omit<LaunchOptions, 'command'>): ChildProcess {
    const code = [
      'const { launch } = await import(process.env.LAUNCHER);',
      'const r = await launch({ command: process.execPath, ...JSON.parse(process.env.LAUNCH_OPTIONS) });',
      "process.stderr.write('RESULT ' + JSON.stringify(r) + '\\n');",
      'process.exit(r.exitCode);',
    ].join('\n');
    return spawn(process.execPath, ['--import', TSX, '--input-type=module', '-e', code], {
      env: { ...process.env, LAUNCHER, LAUNCH_OPTIONS: JSON.stringify(options) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
  }

  /** Collects a launcher process's output, calling `onLine` for each stdout line, until it exits. */
  function run(child: ChildProcess, onLine: (line: string) => void) {
    let stdout = '';
    let stderr = '';
    let partial = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
      const lines = (partial + d).split('\n');
      partial = lines.pop() ?? '';
      for (const l of lines) onLine(l);
    });
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    return new Promise<{ code: number | null; stdout: string; result: LaunchResult }>((resolve) =>
      child.on('close', (code) => {
        const line = stderr.split('\n').find((l) => l.startsWith('RESULT '));
        if (!line) throw new Error(`the launcher printed no result:\n${stderr}`);
        resolve({ code, stdout, result: JSON.parse(line.slice(7)) as LaunchResult });
      }),
    );
  }

  it('SIGTERM to the launcher is forwarded to every worker, and the launcher exits 143', async () => {
    const child = startLauncher({ args: [ROLE_WORKER, 'trap'], nprocPerNode: 3 });
    let ready = 0;
    const { code, stdout, result } = await run(child, (l) => {
      if (l.endsWith(': ready') && ++ready === 3) child.kill('SIGTERM');
    });
    expect(code).toBe(143);
    for (const rank of [0, 1, 2]) expect(stdout).toContain(`[rank${rank}]: got SIGTERM\n`);
    expect(result).toMatchObject({ interrupted: 'SIGTERM', exitCode: 143, forcedKill: false });
  });

  it('a second SIGINT kills workers that ignore the first', async () => {
    const child = startLauncher({ args: [ROLE_WORKER, 'ignore'], nprocPerNode: 2, killGraceMs: 60_000 });
    let ready = 0;
    let ignoring = 0;
    const t0 = Date.now();
    const { code, stdout, result } = await run(child, (l) => {
      if (l.endsWith(': ready') && ++ready === 2) child.kill('SIGINT');
      if (l.endsWith(': ignoring SIGINT') && ++ignoring === 2) child.kill('SIGINT');
    });
    expect(code).toBe(130);
    expect(stdout).toContain('[rank1]: ignoring SIGINT');
    expect(result.workers.map((w) => w.signal)).toEqual(['SIGKILL', 'SIGKILL']);
    expect(result).toMatchObject({ interrupted: 'SIGINT', forcedKill: true });
    expect(result.message).toContain('were killed');
    expect(Date.now() - t0).toBeLessThan(20_000);
  });
});
