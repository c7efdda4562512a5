// Errors of @megapatch/models: a code for programs, a one-line message for people.

/** What went wrong, for programs. */
export type ModelErrorCode =
  | 'INVALID_CONFIG'
  | 'INVALID_ARGUMENT'
  | 'INVALID_INPUT'
  | 'SHAPE_MISMATCH'
  | 'WRONG_ARCHITECTURE'
  | 'MISSING_TENSOR'
  | 'UNSUPPORTED'
  | 'UNKNOWN_FAMILY';

/** An error of the model package; `message` says what was wrong and how to fix it. */
export class ModelError extends Error {
  constructor(
    readonly code: ModelErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'ModelError';
  }
}
