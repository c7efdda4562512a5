// The CLI's errors and exit codes. A user error is one line — what, where, how to fix — and an exit
// code a script can branch on: 2 for a bad command line, 1 for a run that failed, 128 + the signal
// number for an interrupt (130 SIGINT, 143 SIGTERM, 141 for a reader that closed our stdout).

/** Exit codes of the `megapatch` command. */
export const EXIT = {
  ok: 0,
  failure: 1,
  usage: 2,
  SIGINT: 130,
  SIGPIPE: 141,
  SIGTERM: 143,
} as const;

/** A bad command line: unknown flag, bad value, missing argument. Exit 2. */
export class UsageError extends Error {
  readonly code = 'USAGE';
  /** The command it is about (`convert hf-to-megapatch`), or undefined for the top level. */
  readonly command?: string;
  constructor(message: string, command?: string) {
    super(message);
    this.name = 'UsageError';
    this.command = command;
  }
}

/** A run that cannot go on for a reason the user can fix (an existing output, a held lock). Exit 1. */
export class CliError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = 'CliError';
    this.code = code;
  }
}

/** Why a run was stopped from outside: a signal, or stdout closed by its reader. */
export type StopReason = 'SIGINT' | 'SIGTERM' | 'EPIPE';

/** Thrown (as an AbortSignal's reason) when the run is interrupted; never printed as a failure. */
export class Interrupted extends Error {
  readonly reason: StopReason;
  constructor(reason: StopReason) {
    super(reason === 'EPIPE' ? 'stdout was closed by its reader' : `interrupted by ${reason}`);
    this.name = 'Interrupted';
    this.reason = reason;
  }
}

/** The exit code for a stop reason. */
export function exitCodeOf(reason: StopReason): number {
  return reason === 'EPIPE' ? EXIT.SIGPIPE : EXIT[reason];
}

// Library errors carry a code and a message that already names the file; they are recognised by
// name so that loading the CLI never loads the libraries.
const LIBRARY_ERRORS = new Set([
  'ConvertError',
  'DataError',
  'DistributedError',
  'ModelError',
  'TensorError',
  'TrainError',
]);

const ERRNO_TEXT: Record<string, [what: string, fix: string]> = {
  EACCES: ['permission denied', 'check the permissions of the path or choose another location'],
  EPERM: ['operation not permitted', 'check the permissions of the path or choose another location'],
  ENOSPC: ['no space left on the device', 'free some space or write somewhere else'],
  EDQUOT: ['disk quota exceeded', 'free some space or write somewhere else'],
  EEXIST: ['it already exists', 'remove it or choose another location'],
  ENOTDIR: ['a part of the path is a file, not a folder', 'check the path'],
  EISDIR: ['it is a folder, not a file', 'check the path'],
  ENOENT: ['no such file or folder', 'check the path'],
  EROFS: ['the file system is read-only', 'write somewhere else'],
  ENOTEMPTY: ['the folder is not empty', 'empty it or choose another location'],
  EMFILE: ['too many open files', 'raise the limit with ulimit -n'],
  ENAMETOOLONG: ['the name is too long', 'use a shorter path'],
  EXDEV: ['it would cross file systems', 'keep the output on the same file system as its temporary files'],
  EIO: ['an input/output error occurred', 'check the disk'],
  EBUSY: ['the resource is busy', 'retry once the other process is done with it'],
};

const SYSCALL_TEXT: Record<string, string> = {
  open: 'open',
  read: 'read',
  write: 'write',
  mkdir: 'create the folder',
  mkdtemp: 'create a temporary folder',
  rmdir: 'remove the folder',
  rm: 'remove',
  unlink: 'remove',
  rename: 'rename',
  copyfile: 'copy',
  scandir: 'list the folder',
  opendir: 'list the folder',
  stat: 'read',
  lstat: 'read',
  access: 'access',
  ftruncate: 'size',
  fsync: 'flush',
  close: 'close',
  symlink: 'link',
  realpath: 'resolve',
};

interface ErrnoLike {
  code?: unknown;
  syscall?: unknown;
  path?: unknown;
  dest?: unknown;
  message: string;
}

/** A file-system error as one line naming the operation and the path; undefined when it is not one. */
export function describeErrno(e: ErrnoLike, context?: string): string | undefined {
  if (typeof e.code !== 'string' || !(e.code in ERRNO_TEXT)) return undefined;
  const [what, fix] = ERRNO_TEXT[e.code];
  const op = typeof e.syscall === 'string' ? (SYSCALL_TEXT[e.syscall] ?? e.syscall) : 'access';
  const target =
    typeof e.path === 'string'
      ? ` ${e.path}${typeof e.dest === 'string' ? ` to ${e.dest}` : ''}`
      : context === 'stdout'
        ? ' to stdout'
        : context
          ? ` (while writing ${context})`
          : '';
  return `cannot ${op}${target}: ${what} (${e.code}); ${fix}`;
}

/** The one line printed for an error; `where` names what the run was writing, for errors without a path. */
export function describeError(e: unknown, where?: string): string {
  if (e instanceof UsageError || e instanceof CliError) return e.message;
  if (e instanceof Error) {
    if (LIBRARY_ERRORS.has(e.name)) return oneLine(e.message);
    const errno = describeErrno(e as ErrnoLike, where);
    if (errno) return errno;
    if (e.name === 'AbortError') return 'interrupted';
    return `${oneLine(e.message)} (an unexpected error: rerun with --debug for the stack trace, and please report it)`;
  }
  return String(e);
}

/** The exit code for an error that ended a run. */
export function exitCodeOfError(e: unknown): number {
  if (e instanceof UsageError) return EXIT.usage;
  if (e instanceof Interrupted) return exitCodeOf(e.reason);
  return EXIT.failure;
}

/** Joins the lines of a multi-line message, so that an error is always one line. */
function oneLine(s: string): string {
  return s.trim().replace(/\s*\n\s*/g, '; ');
}
