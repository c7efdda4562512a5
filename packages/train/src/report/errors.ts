// The run report's one error class: a code a caller can branch on and a one-line message that names
// the file (and line) and the fix.

/** Why a report could not be written. */
export type ReportErrorCode = 'NO_RUN' | 'NO_METRICS' | 'BAD_METRICS' | 'BAD_CONFIG' | 'BAD_OUTPUT';

/** A run folder or metrics file the report cannot use. */
export class ReportError extends Error {
  readonly code: ReportErrorCode;
  constructor(code: ReportErrorCode, message: string) {
    super(message);
    this.name = 'ReportError';
    this.code = code;
  }
}
