// Errors of @megapatch/train: a code for programs, a one-line message for people.

/** What went wrong, for programs. */
export type TrainErrorCode =
  | 'INVALID_CONFIG'
  | 'UNKNOWN_KEY'
  | 'INVALID_ARGUMENT'
  | 'CHECKPOINT'
  | 'DATA'
  | 'UNSUPPORTED';

/** An error of the training engine; `message` says what was wrong and how to fix it. */
export class TrainError extends Error {
  constructor(
    readonly code: TrainErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'TrainError';
  }
}
