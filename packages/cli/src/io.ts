// What a command talks to: stdout lines, warnings and notes on stderr, the stop signal (SIGINT,
// SIGTERM, or stdout closed by its reader) and the cleanups to run if the process must stop now.

/** Lines of results on stdout, and whether stdout is a terminal (progress bars) or not (plain lines). */
export interface Output {
  log: (line: string) => void;
  isTTY: boolean;
}

/** Everything a command uses besides its options. */
export interface Io {
  /** Results (stdout). */
  readonly out: Output;
  /** `warning: ...` on stderr. */
  warn(line: string): void;
  /** A note on stderr (stale files removed, locks taken over). */
  note(line: string): void;
  /** Whether help may use colour (a terminal, and NO_COLOR unset). */
  readonly color: boolean;
  /** Aborted when the run must stop: an Interrupted reason for signals and a closed stdout. */
  readonly signal: AbortSignal;
  /**
   * Registers a synchronous cleanup that runs if the process has to exit before the command
   * returns (a second Ctrl-C, a command that does not stop in time). Returns its remover.
   */
  onHardStop(cleanup: () => void): () => void;
  /** Throws the stop reason if the run was stopped. */
  throwIfStopped(): void;
}

/** An Io that writes nowhere but `lines`, never stops and runs no cleanup: for tests and library use. */
export function memoryIo(
  lines: string[] = [],
  errors: string[] = [],
): Io & { lines: string[]; errors: string[] } {
  const controller = new AbortController();
  return {
    lines,
    errors,
    out: { log: (l) => lines.push(l), isTTY: false },
    warn: (l) => errors.push(`warning: ${l}`),
    note: (l) => errors.push(l),
    color: false,
    signal: controller.signal,
    onHardStop: () => () => {},
    throwIfStopped: () => controller.signal.throwIfAborted(),
  };
}

/** The process's Io: created once by `main`, which owns the signal handlers. */
export class ProcessIo implements Io {
  readonly out: Output;
  readonly color: boolean;
  private readonly controller = new AbortController();
  private readonly cleanups = new Set<() => void>();
  private stdoutClosed = false;

  constructor(
    private readonly stdout: NodeJS.WriteStream = process.stdout,
    private readonly stderr: NodeJS.WriteStream = process.stderr,
  ) {
    this.out = {
      log: (line) => this.write(line),
      isTTY: stdout.isTTY === true,
    };
    this.color = stdout.isTTY === true && !process.env.NO_COLOR && process.env.TERM !== 'dumb';
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** Whether any cleanup is registered (a command is writing something). */
  get writing(): boolean {
    return this.cleanups.size > 0;
  }

  /** Marks stdout as closed by its reader: later lines are dropped instead of raising EPIPE again. */
  closeStdout(): void {
    this.stdoutClosed = true;
  }

  warn(line: string): void {
    this.error(`warning: ${line}`);
  }

  note(line: string): void {
    this.error(line);
  }

  /** A line on stderr; a closed stderr is ignored (there is nowhere left to report to). */
  error(line: string): void {
    try {
      this.stderr.write(`${line}\n`);
    } catch {
      // stderr closed too: nothing to do
    }
  }

  onHardStop(cleanup: () => void): () => void {
    this.cleanups.add(cleanup);
    return () => this.cleanups.delete(cleanup);
  }

  throwIfStopped(): void {
    this.controller.signal.throwIfAborted();
  }

  /** Aborts the run with `reason` (an {@link Interrupted}, or the error that ends it); false if already stopped. */
  stop(reason: Error): boolean {
    if (this.controller.signal.aborted) return false;
    this.controller.abort(reason);
    return true;
  }

  /** Runs every registered cleanup once (errors in one do not skip the others). */
  runCleanups(): void {
    for (const c of [...this.cleanups]) {
      this.cleanups.delete(c);
      try {
        c();
      } catch {
        // best effort: the process is exiting
      }
    }
  }

  private write(line: string): void {
    if (this.stdoutClosed) return;
    this.stdout.write(`${line}\n`);
  }
}
