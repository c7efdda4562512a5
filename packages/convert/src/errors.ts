/** Error codes of @megapatch/convert. */
export type ConvertErrorCode =
  | 'INVALID_FORMAT'
  | 'CORRUPT_FILE'
  | 'TRUNCATED_FILE'
  | 'MISSING_FILE'
  | 'MISSING_TENSOR'
  | 'UNEXPECTED_TENSOR'
  | 'SHAPE_MISMATCH'
  | 'INVALID_CONFIG'
  | 'UNKNOWN_ARCHITECTURE'
  | 'INVALID_ARGUMENT'
  | 'UNSUPPORTED';

/** Every error thrown by @megapatch/convert: a code, and a message naming the file or tensor. */
export class ConvertError extends Error {
  readonly code: ConvertErrorCode;
  readonly file?: string;
  constructor(code: ConvertErrorCode, message: string, file?: string) {
    super(file ? `${file}: ${message}` : message);
    this.name = 'ConvertError';
    this.code = code;
    this.file = file;
  }
}
