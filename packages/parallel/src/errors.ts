/** What went wrong, for code that wants to react to a kind of failure. */
export type DistributedErrorCode =
  /** A bad argument: a shape, dtype, rank or size that cannot work. */
  | 'INVALID_ARGUMENT'
  /** The launcher or the environment does not describe a valid job. */
  | 'INVALID_ENVIRONMENT'
  /** An operation or the rendezvous did not complete within its timeout. */
  | 'TIMEOUT'
  /** A peer process died or closed its connection. */
  | 'PEER_LOST'
  /** Ranks called the same collective with different sizes, dtypes or ops. */
  | 'MISMATCH'
  /** The rendezvous store could not be started or reached. */
  | 'STORE'
  /** The group was destroyed, or the process group is not initialised. */
  | 'NOT_INITIALIZED'
  /** The native addon could not be loaded. */
  | 'NATIVE_LOAD'
  /** Anything else reported by the communication library. */
  | 'BACKEND';

/** An error of @megapatch/parallel: one line that names the operation, the group and the ranks. */
export class DistributedError extends Error {
  readonly code: DistributedErrorCode;
  constructor(code: DistributedErrorCode, message: string) {
    super(message);
    this.name = 'DistributedError';
    this.code = code;
  }
}
