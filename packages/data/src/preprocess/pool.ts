// The worker-thread pool shared by preprocessPretrain and preprocessSft.
//
// Every worker runs src/preprocess/worker.mjs (dist/worker.mjs once built), loads the tokenizer
// itself from its folder and answers one batch at a time; the pool queues batches in submission
// order and hands each reply back to the caller, which writes results in input order.
import { existsSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { DataError } from '../errors.js';

/** The task a worker performs, chosen once per pool through workerData. */
export type WorkerTask =
  | { task: 'pretrain'; tokenizerDir: string; appendEod: boolean }
  | { task: 'sft'; tokenizerDir: string };

/** Runs batches of type `Req` to results of type `Res`, in this thread or in a worker pool. */
export interface BatchRunner<Req, Res> {
  run(request: Req): Promise<Res>;
  close(): Promise<void>;
}

/** A runner that calls `fn` in this thread (workers = 1). */
export function inProcessRunner<Req, Res>(fn: (request: Req) => Res): BatchRunner<Req, Res> {
  return { run: async (request) => fn(request), close: async () => {} };
}

interface Job {
  id: number;
  request: object;
  resolve: (reply: never) => void;
  reject: (e: Error) => void;
}

/** The worker script: src/preprocess/worker.mjs from source, dist/worker.mjs once bundled. */
function workerUrl(): URL {
  const url = new URL('./worker.mjs', import.meta.url);
  if (!existsSync(url)) {
    throw new DataError(
      'MISSING_FILE',
      'the tokenizer worker script is missing (build the package)',
      url.pathname,
    );
  }
  return url;
}

/**
 * A fixed pool of worker threads, one batch at a time each, jobs queued in submission order.
 * A request object is posted as `{id, ...request}`; the worker answers `{id, ...result}` (typed
 * arrays transferred) or `{id, error}`, which rejects that batch with a TOKENIZER DataError.
 */
export class WorkerPool<Req extends object, Res> implements BatchRunner<Req, Res> {
  private readonly idle: Worker[] = [];
  private readonly all: Worker[] = [];
  private readonly queue: Job[] = [];
  private readonly busy = new Map<Worker, Job>();
  private nextId = 0;
  private failure: Error | undefined;

  constructor(size: number, data: WorkerTask) {
    const url = workerUrl();
    const { tokenizerDir } = data;
    for (let i = 0; i < size; i++) {
      const w = new Worker(url, { workerData: data });
      w.on('message', (msg: { id: number; error?: string }) => this.onReply(w, msg));
      w.on('error', (e) =>
        this.fail(new DataError('TOKENIZER', `tokenizer worker failed: ${e.message}`, tokenizerDir)),
      );
      w.on('exit', (code) => {
        if (code !== 0)
          this.fail(new DataError('TOKENIZER', `tokenizer worker exited with code ${code}`, tokenizerDir));
      });
      this.all.push(w);
      this.idle.push(w);
    }
  }

  run(request: Req): Promise<Res> {
    return new Promise<Res>((resolve, reject) => {
      if (this.failure) return reject(this.failure);
      this.queue.push({ id: this.nextId++, request, resolve: resolve as (r: never) => void, reject });
      this.pump();
    });
  }

  private pump(): void {
    while (this.idle.length > 0 && this.queue.length > 0) {
      const w = this.idle.pop() as Worker;
      const job = this.queue.shift() as Job;
      this.busy.set(w, job);
      w.postMessage({ ...job.request, id: job.id });
    }
  }

  private onReply(w: Worker, msg: { id: number; error?: string }): void {
    const job = this.busy.get(w);
    this.busy.delete(w);
    this.idle.push(w);
    if (job) {
      if (msg.error !== undefined) {
        job.reject(new DataError('TOKENIZER', `tokenizer worker: ${msg.error}`));
      } else {
        job.resolve(msg as never);
      }
    }
    this.pump();
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    for (const job of [...this.busy.values(), ...this.queue]) job.reject(e);
    this.busy.clear();
    this.queue.length = 0;
  }

  async close(): Promise<void> {
    // Fail first so that pending batches settle and the exits caused by terminate() are not
    // reported as errors.
    this.fail(new DataError('INVALID_ARGUMENT', 'worker pool closed'));
    await Promise.all(this.all.map((w) => w.terminate()));
  }
}

/** Settles like `promise`, or rejects with `signal.reason` as soon as the signal aborts. */
export function abortable<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (signal === undefined) return promise;
  return new Promise<T>((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const onAbort = (): void => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}

/**
 * Keeps batches in flight, oldest first: awaiting the head keeps the output in input order while
 * the runner works ahead; two per worker keeps every worker fed while the main thread writes.
 * With a signal, an abort stops the wait for the head batch at once and rethrows `signal.reason`.
 */
export class OrderedBatches<Req, Res, Meta> {
  private readonly inflight: { promise: Promise<Res>; meta: Meta }[] = [];

  constructor(
    private readonly runner: BatchRunner<Req, Res>,
    private readonly maxInflight: number,
    private readonly write: (result: Res, meta: Meta) => void,
    private readonly signal?: AbortSignal,
  ) {}

  /** Submits a batch, then writes finished head batches until fewer than maxInflight are pending. */
  async submit(request: Req, meta: Meta): Promise<void> {
    this.signal?.throwIfAborted();
    const promise = this.runner.run(request);
    // Rejections are handled when the batch reaches the head; this keeps Node from calling an
    // earlier rejection unhandled while we await a different batch.
    promise.catch(() => {});
    this.inflight.push({ promise, meta });
    while (this.inflight.length >= this.maxInflight) await this.writeHead();
  }

  /** Writes every pending batch, in order. */
  async drain(): Promise<void> {
    while (this.inflight.length > 0) await this.writeHead();
  }

  private async writeHead(): Promise<void> {
    const head = this.inflight.shift();
    if (!head) return;
    const result = await abortable(head.promise, this.signal);
    this.signal?.throwIfAborted();
    this.write(result, head.meta);
  }
}
