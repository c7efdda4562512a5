// Errors of the quickstart: a code for programs, a one-line message for people.

/** What went wrong, for programs. */
export type QuickstartErrorCode = 'INVALID_ARGUMENT' | 'OUTPUT_EXISTS' | 'STEP_FAILED' | 'MISSING_PACKAGE';

/** An error of the quickstart; `message` says what was wrong and how to fix it. */
export class QuickstartError extends Error {
  constructor(
    readonly code: QuickstartErrorCode,
    message: string,
    /** The exit code to end with (a failed step passes its own on, 130 for Ctrl-C). */
    readonly exitCode = 1,
  ) {
    super(message);
    this.name = 'QuickstartError';
  }
}
