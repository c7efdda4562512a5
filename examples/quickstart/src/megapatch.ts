// Runs the real `megapatch` command, as a user would type it: prints the command line, then streams
// what it prints (stdout through this process, stderr straight to the terminal).
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { QuickstartError } from './errors.js';

/** bin/megapatch.js of the workspace's @megapatch/cli. */
export function megapatchBin(): string {
  const require = createRequire(import.meta.url);
  const bin = path.join(path.dirname(require.resolve('@megapatch/cli/package.json')), 'bin', 'megapatch.js');
  if (!fs.existsSync(path.join(path.dirname(bin), '..', 'dist', 'index.js'))) {
    throw new QuickstartError(
      'MISSING_PACKAGE',
      '@megapatch/cli is not built; run pnpm build at the root (pnpm demo does)',
    );
  }
  return bin;
}

/** Where a command's stdout goes besides being returned. */
export type Echo = 'terminal' | 'quiet';

/** How to run one command. */
export interface RunOptions {
  /** The working folder (the paths in `args` are relative to it). */
  cwd: string;
  /** `terminal`: print stdout as it comes (default); `quiet`: only collect it. */
  echo?: Echo;
  /** Prints the command line and the output (default: process.stdout). */
  write?: (text: string) => void;
}

/** Quotes an argument for the printed command line when a shell would need it. */
function shellQuote(arg: string): string {
  return /^[\w./:=@,+-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", "'\\''")}'`;
}

/** The command line as printed: `$ megapatch <args>`. */
export function commandLine(args: readonly string[]): string {
  return `$ megapatch ${args.map(shellQuote).join(' ')}`;
}

/**
 * Runs `megapatch ...args` with this Node.js and resolves with its stdout; a failure (or an
 * interrupt: the child saves and exits 130/143 on Ctrl-C) rejects with its exit code.
 */
export function megapatch(args: readonly string[], opts: RunOptions): Promise<string> {
  const write = opts.write ?? ((t: string) => process.stdout.write(t));
  write(`${commandLine(args)}\n`);
  const child = spawn(process.execPath, [megapatchBin(), ...args], {
    cwd: opts.cwd,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const chunks: Buffer[] = [];
  child.stdout.on('data', (d: Buffer) => {
    chunks.push(d);
    if (opts.echo !== 'quiet') write(d.toString('utf8'));
  });
  return new Promise((resolve, reject) => {
    child.on('error', (e) =>
      reject(new QuickstartError('STEP_FAILED', `cannot start megapatch ${args[0]}: ${e.message}`)),
    );
    child.on('close', (code, signal) => {
      if (code === 0) return resolve(Buffer.concat(chunks).toString('utf8'));
      const exit = code ?? (signal === 'SIGINT' ? 130 : signal === 'SIGTERM' ? 143 : 1);
      const why = code === null ? `was stopped by ${signal}` : `exited with code ${code}`;
      reject(new QuickstartError('STEP_FAILED', `megapatch ${args[0]} ${why}`, exit));
    });
  });
}
