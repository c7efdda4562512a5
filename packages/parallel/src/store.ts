// The rendezvous store: a TCP key-value store whose server runs in rank 0's process (on a native
// thread, so a busy or blocked JS thread never stalls the other ranks) and that every rank, rank 0
// included, reaches as a client. It speaks torch 1.13's TCPStore wire protocol.
import { DistributedError } from './errors.js';
import { loadNative, type NativeStoreHandle, nativeError } from './native.js';

export interface TCPStoreOptions {
  /** Host name or address of the server (MASTER_ADDR). */
  host: string;
  /** TCP port of the server (MASTER_PORT); 0 with `isServer` picks a free port. */
  port: number;
  /** Start the server in this process (rank 0). */
  isServer?: boolean;
  /** How long connecting, `get` and `wait` may take by default, in ms (default 300 000). */
  timeoutMs?: number;
}

/** A key-value store shared by every rank: set, get, add, check, wait, compareSet, deleteKey. */
export class TCPStore {
  readonly host: string;
  readonly timeoutMs: number;
  private readonly handle: NativeStoreHandle;
  private closed = false;

  private constructor(host: string, handle: NativeStoreHandle, timeoutMs: number) {
    this.host = host;
    this.handle = handle;
    this.timeoutMs = timeoutMs;
  }

  /** Starts the server (with `isServer`) and connects, retrying until the timeout. */
  static async create(options: TCPStoreOptions): Promise<TCPStore> {
    const timeoutMs = options.timeoutMs ?? 300_000;
    if (!Number.isInteger(options.port) || options.port < 0 || options.port > 65535) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `TCPStore: port must be an integer in [0, 65535], got ${options.port}`,
      );
    }
    const { NativeStore } = loadNative();
    let handle: NativeStoreHandle;
    try {
      handle = new NativeStore(options.host, options.port, options.isServer === true, timeoutMs);
    } catch (e) {
      throw nativeError(e);
    }
    const store = new TCPStore(options.host, handle, timeoutMs);
    try {
      await handle.connect();
    } catch (e) {
      handle.close();
      throw nativeError(e);
    }
    return store;
  }

  /** The server's port (the one picked when created with port 0). */
  get port(): number {
    return this.handle.port;
  }

  private async call<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new DistributedError('NOT_INITIALIZED', 'TCPStore: the store was closed');
    try {
      return await fn();
    } catch (e) {
      throw nativeError(e);
    }
  }

  set(key: string, value: string | Uint8Array): Promise<void> {
    return this.call(() => this.handle.set(key, value));
  }
  /** Waits for the key to exist (up to `timeoutMs`), then returns its value. */
  get(key: string, timeoutMs = this.timeoutMs): Promise<Buffer> {
    return this.call(() => this.handle.get(key, timeoutMs));
  }
  /** Adds `delta` to the integer under `key` (missing keys count as 0) and returns the new value. */
  add(key: string, delta: number): Promise<number> {
    return this.call(() => this.handle.add(key, delta));
  }
  /** Whether every key exists, without waiting. */
  check(keys: readonly string[]): Promise<boolean> {
    return this.call(() => this.handle.check(keys));
  }
  /** Waits until every key exists; rejects with a TIMEOUT DistributedError after `timeoutMs`. */
  wait(keys: readonly string[], timeoutMs = this.timeoutMs): Promise<void> {
    return this.call(() => this.handle.wait(keys, timeoutMs));
  }
  numKeys(): Promise<number> {
    return this.call(() => this.handle.numKeys());
  }
  deleteKey(key: string): Promise<boolean> {
    return this.call(() => this.handle.deleteKey(key));
  }
  /** Sets `key` to `desired` if it holds `expected` (or is missing and `expected` is empty); returns the value now held. */
  compareSet(key: string, expected: string | Uint8Array, desired: string | Uint8Array): Promise<Buffer> {
    return this.call(() => this.handle.compareSet(key, expected, desired));
  }
  /** Disconnects, and stops the server if this process hosts it. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.handle.close();
  }
}
