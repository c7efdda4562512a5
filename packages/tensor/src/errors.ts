/** Error codes of @megapatch/tensor; every thrown error is a TensorError with one of them. */
export type TensorErrorCode =
  | 'SHAPE_MISMATCH'
  | 'DTYPE_MISMATCH'
  | 'DEVICE_MISMATCH'
  | 'INVALID_DEVICE'
  | 'INDEX_OUT_OF_RANGE'
  | 'INVALID_ARGUMENT'
  | 'DISPOSED'
  | 'NO_GRAD'
  | 'GRAPH_FREED'
  | 'NATIVE_LOAD'
  | 'UNSUPPORTED';

export class TensorError extends Error {
  readonly code: TensorErrorCode;
  constructor(code: TensorErrorCode, message: string) {
    super(message);
    this.name = 'TensorError';
    this.code = code;
  }
}

export const fmtShape = (s: readonly number[]): string => `[${s.join(',')}]`;

export function shapeError(op: string, msg: string): TensorError {
  return new TensorError('SHAPE_MISMATCH', `${op}: ${msg}`);
}
export function dtypeError(op: string, msg: string): TensorError {
  return new TensorError('DTYPE_MISMATCH', `${op}: ${msg}`);
}
export function argError(op: string, msg: string): TensorError {
  return new TensorError('INVALID_ARGUMENT', `${op}: ${msg}`);
}
export function indexError(op: string, msg: string): TensorError {
  return new TensorError('INDEX_OUT_OF_RANGE', `${op}: ${msg}`);
}
