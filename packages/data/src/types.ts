/** Token array types a Megatron indexed dataset can hold. */
export type TokenArray =
  | Uint8Array
  | Int8Array
  | Int16Array
  | Uint16Array
  | Int32Array
  | BigInt64Array
  | Float32Array
  | Float64Array;

/**
 * What GPTDataset needs from a low-level dataset (Megatron's IndexedDataset): the length of every
 * sequence, the document boundaries, and random access to tokens. `IndexedDataset` implements it;
 * tests may use an in-memory one.
 */
export interface LowLevelDataset {
  /** Tokens per sequence, int32[N]. */
  readonly sequenceLengths: Int32Array;
  /** Document boundaries as sequence indices: [0, ..., N] (length = documents + 1). */
  readonly documentIndices: Float64Array;
  /** Number of sequences. */
  readonly length: number;
  /** `length` tokens (default: to the end) of sequence `index` starting at token `offset`, as int32. */
  get(index: number, offset?: number, length?: number): Int32Array;
  /** A stable description used in cache keys (e.g. the path prefix). */
  readonly pathPrefix: string;
}
