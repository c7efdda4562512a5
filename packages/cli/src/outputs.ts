// Where a command writes, made safe: an output never equals, sits inside or contains an input; one
// run at a time writes to it (a lock file beside it); temporaries left by killed runs are removed
// (and said so) before a new run starts; and if this process has to stop, its own temporaries go.
//
// Every writer in megapatch follows one naming rule: a file or folder is written under
// `<name>.tmp-<pid>` and renamed to `<name>` when complete; a folder being replaced is moved to
// `<name>.old-<pid>` for the instant of the swap. A pid that is no longer running marks leftovers.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pathRelation } from '@megapatch/convert';
import { CliError, UsageError } from './errors.js';
import type { Io } from './io.js';

/** `<name>.tmp-<pid>` or `<name>.old-<pid>`. */
const TEMP_NAME = /^(.+)\.(tmp|old)-(\d+)$/;

/** A path given on the command line, with the flag that gave it (for messages). */
export interface FlagPath {
  readonly flag: string;
  readonly path: string;
}

/** Whether process `pid` is running on this host (EPERM: running, as another user). */
export function isProcessAlive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Refuses (exit 2) an output that equals, sits inside or contains one of the inputs. */
export function checkOutputsApart(
  command: string,
  outputs: readonly FlagPath[],
  inputs: readonly FlagPath[],
): void {
  for (const o of outputs) {
    for (const i of inputs) {
      const r = pathRelation(o.path, i.path);
      if (r === 'apart') continue;
      const how = r === 'same' ? 'is the same path as' : r === 'inside' ? 'is inside' : 'contains';
      throw new UsageError(
        `${o.flag} ${o.path} ${how} ${i.flag} ${i.path}; writing there could destroy the input, so choose an ${o.flag} outside it`,
        command,
      );
    }
  }
}

/** What a lock file holds. */
interface LockInfo {
  pid: number;
  host: string;
  command: string;
  started: string;
}

function readLock(file: string): LockInfo | null {
  try {
    const j = JSON.parse(fs.readFileSync(file, 'utf8')) as Partial<LockInfo>;
    if (typeof j.pid !== 'number' || typeof j.host !== 'string') return null;
    return { pid: j.pid, host: j.host, command: String(j.command ?? '?'), started: String(j.started ?? '?') };
  } catch {
    return null;
  }
}

const claimed = new Set<string>();

/** The outputs this process has claimed (to name them in errors that carry no path, like ENOSPC). */
export function claimedOutputs(): string[] {
  return [...claimed];
}

/** A claimed output: locked for this run; release it when the run ends, however it ends. */
export interface OutputClaim {
  readonly path: string;
  readonly lockFile: string;
  release(): void;
}

/**
 * Claims `target` (a folder, or a prefix of files such as a dataset prefix) for this run: takes
 * the lock `<target>.lock`, which a live run elsewhere holds → CliError('LOCKED'); a lock whose
 * process is gone (same host) is taken over with a note. Then removes temporaries of killed runs
 * next to and inside the target, noting each one; and registers a hard-stop cleanup that removes
 * this process's own temporaries and the lock.
 */
export function claimOutput(
  io: Io,
  command: string,
  target: string,
  kind: OutputKind = 'folder',
): OutputClaim {
  const abs = path.resolve(target);
  const lockFile = `${abs}.lock`;
  const parent = path.dirname(abs);
  if (fs.existsSync(parent) && !isDirectory(parent)) {
    // mkdir would say EEXIST, which reads as if the output existed; the truth is ENOTDIR.
    throw Object.assign(new Error(`ENOTDIR: not a directory, mkdir '${abs}'`), {
      code: 'ENOTDIR',
      syscall: 'mkdir',
      path: abs,
    });
  }
  const existed = fs.existsSync(abs);
  const createdDir = fs.mkdirSync(parent, { recursive: true });
  const info: LockInfo = {
    pid: process.pid,
    host: os.hostname(),
    command,
    started: new Date().toISOString(),
  };
  for (let attempt = 0; ; attempt++) {
    try {
      fs.writeFileSync(lockFile, `${JSON.stringify(info)}\n`, { flag: 'wx' });
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 0) throw e;
      const held = readLock(lockFile);
      const stale = held !== null && held.host === info.host && !isProcessAlive(held.pid);
      if (!stale) {
        const who = held
          ? `megapatch ${held.command} (pid ${held.pid} on ${held.host}, since ${held.started})`
          : 'another megapatch run (unreadable lock)';
        throw new CliError(
          'LOCKED',
          `${target} is being written by ${who}; wait for it to finish, or delete ${lockFile} if that run is gone`,
        );
      }
      fs.rmSync(lockFile, { force: true });
      io.note(
        `removed the stale lock ${lockFile} of megapatch ${held.command} (pid ${held.pid}, no longer running)`,
      );
    }
  }
  let released = false;
  claimed.add(abs);
  const removeHardStop = io.onHardStop(() => {
    removeOwnTemporaries(abs, kind);
    release();
  });
  function release(): void {
    if (released) return;
    released = true;
    removeHardStop();
    fs.rmSync(lockFile, { force: true });
    // A folder this run created but left empty (it failed or was stopped) goes again, and so do
    // parent folders made only for the lock.
    if (!existed) removeEmptyDirs(abs, abs);
    if (createdDir !== undefined) removeEmptyDirs(parent, createdDir);
  }
  try {
    for (const t of findTemporaries(abs, kind)) {
      if (t.pid === process.pid || t.alive) continue;
      io.note(settleLeftover(t));
    }
  } catch (e) {
    release();
    throw e;
  }
  return { path: abs, lockFile, release };
}

/**
 * Runs `run` writing to `target`: refuses outputs that overlap an input (exit 2), claims the target
 * (lock, leftovers of killed runs) and releases it however `run` ends. `run` gets the stop signal,
 * which the libraries honour by removing their temporaries and rethrowing its reason.
 */
export async function withOutput<R>(
  io: Io,
  command: string,
  paths: { target: string; kind?: OutputKind; outputs: readonly FlagPath[]; inputs: readonly FlagPath[] },
  run: (signal: AbortSignal) => Promise<R>,
): Promise<R> {
  checkOutputsApart(command, paths.outputs, paths.inputs);
  io.throwIfStopped();
  const claim = claimOutput(io, command, paths.target, paths.kind);
  try {
    return await run(io.signal);
  } finally {
    claim.release();
  }
}

/** A temporary entry found next to or inside an output. */
export interface Temporary {
  /** Absolute path of the entry. */
  readonly path: string;
  /** What it stands for (the path without `.tmp-<pid>` / `.old-<pid>`). */
  readonly final: string;
  readonly kind: 'tmp' | 'old';
  readonly pid: number;
  /** Whether its process is still running on this host. */
  readonly alive: boolean;
}

/**
 * What an output is: a folder (`<out>.tmp-<pid>` beside it, `iter_0000010.tmp-<pid>` inside it), or
 * a prefix of files (`<prefix>_text_document.bin.tmp-<pid>` beside it).
 */
export type OutputKind = 'folder' | 'prefix';

/** Temporaries of `target` (see {@link OutputKind} for where they are looked for). */
export function findTemporaries(target: string, kind: OutputKind = 'folder'): Temporary[] {
  const abs = path.resolve(target);
  const found: Temporary[] = [];
  const scan = (dir: string, keep: (name: string) => boolean) => {
    let names: string[];
    try {
      names = fs.readdirSync(dir);
    } catch {
      return;
    }
    for (const name of names.sort()) {
      const m = TEMP_NAME.exec(name);
      if (!m || !keep(m[1])) continue;
      const pid = Number(m[3]);
      found.push({
        path: path.join(dir, name),
        final: path.join(dir, m[1]),
        kind: m[2] as 'tmp' | 'old',
        pid,
        alive: isProcessAlive(pid),
      });
    }
  };
  const base = path.basename(abs);
  if (kind === 'prefix') {
    scan(
      path.dirname(abs),
      (name) => name === base || name.startsWith(`${base}_`) || name.startsWith(`${base}.`),
    );
  } else {
    scan(path.dirname(abs), (name) => name === base);
    if (isDirectory(abs)) scan(abs, () => true);
  }
  return found;
}

/** Removes a leftover of a dead process, or puts back a folder it had moved aside; returns the note. */
function settleLeftover(t: Temporary): string {
  if (t.kind === 'old' && !fs.existsSync(t.final)) {
    // The process died between moving the old folder aside and moving the new one in.
    fs.renameSync(t.path, t.final);
    return `restored ${t.final} from ${path.basename(t.path)}, left by process ${t.pid} (no longer running) in the middle of replacing it`;
  }
  fs.rmSync(t.path, { recursive: true, force: true });
  return `removed ${t.path}, left by process ${t.pid} (no longer running)`;
}

/** Removes (or puts back) this process's own temporaries of `target`. */
function removeOwnTemporaries(target: string, kind: OutputKind): void {
  for (const t of findTemporaries(target, kind)) if (t.pid === process.pid) settleLeftover(t);
}

function isDirectory(p: string): boolean {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

/** rmdir `dir` and its parents up to and including `top` while they are empty. */
function removeEmptyDirs(dir: string, top: string): void {
  for (let d = dir; ; d = path.dirname(d)) {
    try {
      fs.rmdirSync(d);
    } catch {
      return;
    }
    if (d === top || path.dirname(d) === d) return;
  }
}
