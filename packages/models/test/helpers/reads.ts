// Watching what a backend reads back to the host (the waits for an asynchronous device).
import type { Backend, Tensor } from '@megapatch/tensor';

/**
 * Calls `seen` with every tensor the backend reads back (one at a time, or several with one wait
 * through readMany: a read takes the queued checks along); returns the function that stops it.
 */
export function recordReads(backend: Backend, seen: (t: Tensor) => void): () => void {
  const { read, readMany } = backend;
  backend.read = (t, dst) => {
    seen(t);
    read.call(backend, t, dst);
  };
  if (readMany)
    backend.readMany = (ts, dsts) => {
      for (const t of ts) seen(t);
      readMany.call(backend, ts, dsts);
    };
  return () => Object.assign(backend, { read, readMany });
}
