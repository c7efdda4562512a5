/** Error codes of @megapatch/data. */
export type DataErrorCode =
  | 'INVALID_FORMAT'
  | 'CORRUPT_FILE'
  | 'TRUNCATED_FILE'
  | 'MISSING_FILE'
  | 'INVALID_ARGUMENT'
  | 'INDEX_OUT_OF_RANGE'
  | 'TOKENIZER'
  | 'TEMPLATE'
  | 'UNSUPPORTED'
  /** Preprocessing would write no document or sample; the message says why. */
  | 'NO_OUTPUT'
  /** An output file exists and may not (or cannot safely) be replaced. */
  | 'OUTPUT_EXISTS';

/** Every error thrown by @megapatch/data: a code, and a message naming the file, line or field. */
export class DataError extends Error {
  readonly code: DataErrorCode;
  /** The file the error is about, when there is one. */
  readonly file?: string;
  constructor(code: DataErrorCode, message: string, file?: string) {
    super(file ? `${file}: ${message}` : message);
    this.name = 'DataError';
    this.code = code;
    this.file = file;
  }
}
