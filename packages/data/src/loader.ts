// Data loading in the style of Megatron-LM's pre-training loop (megatron/legacy/data/data_samplers.py):
// a batch sampler hands each data-parallel rank its micro-batch of sample indices, the loader turns
// indices into collated batches and counts consumed (global) samples so that a run resumes exactly
// where it stopped, and `globalBatches` groups micro-batches into Megatron's num_microbatches per step.
//
// `getItem` is synchronous, so "background" prefetch means batches are built in setImmediate callbacks
// that interleave with the training loop's own awaits (device work, logging, checkpoint I/O); it does
// not use another thread.
import { DataError } from './errors.js';
import { NumpyRandomState } from './numpy-random.js';

/** Which sampler a loader state was saved from. */
export type SamplerKind = 'pretraining' | 'pretraining-random';

/** Options shared by Megatron's pre-training samplers. */
export interface SamplerOptions {
  /** Samples in the dataset (Megatron passes len(dataset)). */
  totalSamples: number;
  /** Global samples already consumed by earlier steps (Megatron's consumed_train_samples). */
  consumedSamples: number;
  /** Samples per micro-batch on one rank. */
  microBatchSize: number;
  /** This rank's index in the data-parallel group. */
  dataParallelRank: number;
  /** Ranks in the data-parallel group. */
  dataParallelSize: number;
}

/** A batch sampler: yields one rank's micro-batches of sample indices, starting at `consumedSamples`. */
export interface BatchSampler extends Iterable<number[]> {
  /** The sampler's name in saved state. */
  readonly kind: SamplerKind;
  readonly totalSamples: number;
  readonly consumedSamples: number;
  readonly microBatchSize: number;
  readonly dataParallelRank: number;
  readonly dataParallelSize: number;
  /** Whether a last incomplete global batch is dropped. */
  readonly dropLast: boolean;
  /** The same sampler, restarted at `consumedSamples` global samples. */
  withConsumedSamples(consumedSamples: number): BatchSampler;
}

function checkInteger(name: string, value: number, min: number): void {
  if (!Number.isSafeInteger(value) || value < min) {
    throw new DataError('INVALID_ARGUMENT', `${name} must be an integer >= ${min}, got ${value}`);
  }
}

/** Megatron's sampler assertions, as DataErrors. */
function validateSamplerOptions(o: SamplerOptions): void {
  checkInteger('totalSamples', o.totalSamples, 1);
  checkInteger('consumedSamples', o.consumedSamples, 0);
  checkInteger('microBatchSize', o.microBatchSize, 1);
  checkInteger('dataParallelSize', o.dataParallelSize, 1);
  checkInteger('dataParallelRank', o.dataParallelRank, 0);
  if (o.consumedSamples >= o.totalSamples) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `no samples left to consume: consumedSamples ${o.consumedSamples} >= totalSamples ${o.totalSamples}`,
    );
  }
  if (o.dataParallelRank >= o.dataParallelSize) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `dataParallelRank ${o.dataParallelRank} must be smaller than dataParallelSize ${o.dataParallelSize}`,
    );
  }
}

/** Megatron's MegatronPretrainingSampler: sequential indices, each rank taking its contiguous slice of every global micro-batch group. */
export class MegatronPretrainingSampler implements BatchSampler {
  readonly kind = 'pretraining' as const;
  readonly totalSamples: number;
  readonly consumedSamples: number;
  readonly microBatchSize: number;
  readonly dataParallelRank: number;
  readonly dataParallelSize: number;
  readonly dropLast: boolean;

  constructor(options: SamplerOptions & { dropLast?: boolean }) {
    validateSamplerOptions(options);
    this.totalSamples = options.totalSamples;
    this.consumedSamples = options.consumedSamples;
    this.microBatchSize = options.microBatchSize;
    this.dataParallelRank = options.dataParallelRank;
    this.dataParallelSize = options.dataParallelSize;
    this.dropLast = options.dropLast ?? true;
  }

  /** Restarted at `consumedSamples`, with the same configuration. */
  withConsumedSamples(consumedSamples: number): MegatronPretrainingSampler {
    return new MegatronPretrainingSampler({ ...this, consumedSamples });
  }

  *[Symbol.iterator](): Iterator<number[]> {
    const group = this.microBatchSize * this.dataParallelSize;
    const start = this.dataParallelRank * this.microBatchSize;
    // Every rank walks the same global index stream, so the ranks' slices are disjoint and together
    // cover each group of `group` consecutive indices.
    let first = this.consumedSamples;
    for (; first + group <= this.totalSamples; first += group) {
      yield range(first + start, first + start + this.microBatchSize);
    }
    if (first < this.totalSamples && !this.dropLast) {
      // Like Python's batch[start:end] on the remainder: short, or empty for the last ranks. An
      // empty slice is still yielded so that every rank takes the same number of steps.
      const lo = Math.min(first + start, this.totalSamples);
      const hi = Math.min(first + start + this.microBatchSize, this.totalSamples);
      yield range(lo, hi);
    }
  }
}

function range(lo: number, hi: number): number[] {
  const out: number[] = [];
  for (let i = lo; i < hi; i++) out.push(i);
  return out;
}

/**
 * Megatron's MegatronPretrainingRandomSampler with data sharding (the "cyclic" loader): the data
 * is split into one bucket per rank, each bucket is shuffled per epoch with the epoch as seed, and
 * iteration cycles over epochs without end. The shuffle is numpy's RandomState(epoch) permutation,
 * not torch.randperm, so the order differs from Megatron's although the structure is the same.
 */
export class MegatronPretrainingRandomSampler implements BatchSampler {
  readonly kind = 'pretraining-random' as const;
  readonly totalSamples: number;
  readonly consumedSamples: number;
  readonly microBatchSize: number;
  readonly dataParallelRank: number;
  readonly dataParallelSize: number;
  /** The tail that does not fill a global batch is never sampled, as in Megatron. */
  readonly dropLast = true;

  constructor(options: SamplerOptions) {
    // Megatron allows consumed >= total here (later epochs), so only the other checks apply.
    validateSamplerOptions({ ...options, consumedSamples: 0 });
    checkInteger('consumedSamples', options.consumedSamples, 0);
    this.totalSamples = options.totalSamples;
    this.consumedSamples = options.consumedSamples;
    this.microBatchSize = options.microBatchSize;
    this.dataParallelRank = options.dataParallelRank;
    this.dataParallelSize = options.dataParallelSize;
    const group = this.microBatchSize * this.dataParallelSize;
    if (this.totalSamples < group) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `totalSamples ${this.totalSamples} is smaller than one global micro-batch group (${group})`,
      );
    }
    if (this.consumedSamples % group !== 0) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `consumedSamples ${this.consumedSamples} must be a multiple of microBatchSize * dataParallelSize = ${group}`,
      );
    }
  }

  /** Restarted at `consumedSamples`, with the same configuration. */
  withConsumedSamples(consumedSamples: number): MegatronPretrainingRandomSampler {
    return new MegatronPretrainingRandomSampler({ ...this, consumedSamples });
  }

  *[Symbol.iterator](): Iterator<number[]> {
    const group = this.microBatchSize * this.dataParallelSize;
    const activeTotal = this.totalSamples - (this.totalSamples % group);
    const bucketSize = Math.floor(this.totalSamples / group) * this.microBatchSize;
    const bucketStart = this.dataParallelRank * bucketSize;
    let consumed = this.consumedSamples;
    for (;;) {
      const epoch = Math.floor(consumed / activeTotal);
      // Each rank has consumed 1/size of the epoch's global samples from its own bucket.
      const offset = (consumed % activeTotal) / this.dataParallelSize;
      const perm = Int32Array.from({ length: bucketSize }, (_, i) => i);
      new NumpyRandomState(epoch % 2 ** 32).shuffle(perm);
      for (let i = offset; i + this.microBatchSize <= bucketSize; i += this.microBatchSize) {
        const batch: number[] = [];
        for (let k = 0; k < this.microBatchSize; k++) batch.push(bucketStart + perm[i + k]);
        consumed += group;
        yield batch;
      }
    }
  }
}

/** A map-style dataset: random access to samples by index. */
export interface MapDataset<T> {
  readonly length: number;
  getItem(index: number): T;
}

/** Numeric typed arrays the default collate can stack. */
export type NumericArray =
  | Int8Array
  | Uint8Array
  | Int16Array
  | Uint16Array
  | Int32Array
  | Uint32Array
  | Float32Array
  | Float64Array
  | BigInt64Array;

/** One collated field: rows stacked row-major. */
export interface CollatedField {
  /** The rows one after another: [rows, seq] row-major when the rows are equal in length. */
  data: NumericArray;
  /** [rows, seq] for equal-length rows; [rows, -1] for ragged rows (see rowOffsets). */
  shape: [number, number];
  /** Start of every row in `data` plus the end; only for ragged rows such as cuSeqlens. */
  rowOffsets?: Int32Array;
}

/** The default collate's output: one stacked field per sample field. */
export type CollatedBatch = Record<string, CollatedField>;

function isNumericArray(x: unknown): x is NumericArray {
  return ArrayBuffer.isView(x) && !(x instanceof DataView);
}

/**
 * Stacks samples whose fields are typed arrays into one typed array per field of shape [rows, seq].
 * Fields absent (undefined) in every sample are left out; rows of unequal length are concatenated
 * with `rowOffsets`, because per-sample document boundaries (cuSeqlens) differ in length.
 */
export function defaultCollate<T extends object>(samples: readonly T[]): CollatedBatch {
  const out: CollatedBatch = {};
  if (samples.length === 0) return out;
  const keys = Object.keys(samples[0]);
  for (const key of keys) {
    const rows = samples.map((s) => (s as Record<string, unknown>)[key]);
    if (rows.every((r) => r === undefined)) continue;
    const first = rows[0];
    if (
      !isNumericArray(first) ||
      !rows.every((r) => isNumericArray(r) && r.constructor === first.constructor)
    ) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `defaultCollate: field "${key}" must be a typed array of one type in every sample; pass a collate function`,
      );
    }
    const arrays = rows as NumericArray[];
    const total = arrays.reduce((n, a) => n + a.length, 0);
    const Ctor = first.constructor as new (length: number) => NumericArray;
    const data = new Ctor(total);
    const offsets = new Int32Array(arrays.length + 1);
    arrays.forEach((a, i) => {
      // Same constructor for every row (checked above), so set() copies element for element.
      (data as { set(src: ArrayLike<number | bigint>, offset: number): void }).set(a, offsets[i]);
      offsets[i + 1] = offsets[i] + a.length;
    });
    const equal = arrays.every((a) => a.length === first.length);
    out[key] = equal
      ? { data, shape: [arrays.length, first.length] }
      : { data, shape: [arrays.length, -1], rowOffsets: offsets };
  }
  return out;
}

/** Plain-JSON loader state: enough to rebuild the sampler at the exact next sample. */
export interface LoaderState {
  consumedSamples: number;
  totalSamples: number;
  microBatchSize: number;
  dataParallelRank: number;
  dataParallelSize: number;
  dropLast: boolean;
  sampler: SamplerKind;
}

/** Options of `DataLoader`. */
export interface DataLoaderOptions<T, B> {
  dataset: MapDataset<T>;
  sampler: BatchSampler;
  /** Turns one micro-batch of samples into a batch; default `defaultCollate`. */
  collate?: (samples: T[]) => B;
  /** Batches built ahead in the background (setImmediate); 0 turns prefetch off. Default 2. */
  prefetch?: number;
}

type Slot<B> = { ok: true; batch: B; advance: number } | { ok: false; error: unknown };

function checkState(state: unknown): LoaderState {
  const s = state as Partial<LoaderState> | null;
  const ints = [
    'consumedSamples',
    'totalSamples',
    'microBatchSize',
    'dataParallelRank',
    'dataParallelSize',
  ] as const;
  if (s === null || typeof s !== 'object') {
    throw new DataError('INVALID_ARGUMENT', 'loader state must be an object from DataLoader.stateDict()');
  }
  for (const k of ints) {
    if (typeof s[k] !== 'number' || !Number.isSafeInteger(s[k])) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `loader state field ${k} must be an integer, got ${String(s[k])}`,
      );
    }
  }
  if (s.sampler !== 'pretraining' && s.sampler !== 'pretraining-random') {
    throw new DataError('INVALID_ARGUMENT', `loader state has unknown sampler ${String(s.sampler)}`);
  }
  if (typeof s.dropLast !== 'boolean') {
    throw new DataError('INVALID_ARGUMENT', 'loader state field dropLast must be a boolean');
  }
  return s as LoaderState;
}

/** Builds the sampler a saved state describes. */
export function samplerFromState(state: LoaderState): BatchSampler {
  const s = checkState(state);
  const options: SamplerOptions = {
    totalSamples: s.totalSamples,
    consumedSamples: s.consumedSamples,
    microBatchSize: s.microBatchSize,
    dataParallelRank: s.dataParallelRank,
    dataParallelSize: s.dataParallelSize,
  };
  return s.sampler === 'pretraining'
    ? new MegatronPretrainingSampler({ ...options, dropLast: s.dropLast })
    : new MegatronPretrainingRandomSampler(options);
}

/**
 * Micro-batch loader over a map-style dataset and a Megatron batch sampler. `next()` is async and
 * prefetches; `nextSync()` / the sync iterator serve simple loops. Both share one queue, so mixing
 * them keeps the order.
 */
export class DataLoader<T, B = CollatedBatch> implements AsyncIterable<B>, Iterable<B> {
  readonly dataset: MapDataset<T>;
  readonly prefetch: number;
  private sampler: BatchSampler;
  private readonly collate: (samples: T[]) => B;
  private indices: Iterator<number[]>;
  private consumed: number;
  private queue: Slot<B>[] = [];
  /** Samples the sampler has handed out, counted as the queue fills (ahead of `consumed`). */
  private produced: number;
  private exhausted = false;
  private pumping = false;
  /** Bumped by loadStateDict/close so that a pending background callback drops its work. */
  private generation = 0;

  constructor(options: DataLoaderOptions<T, B>) {
    const prefetch = options.prefetch ?? 2;
    checkInteger('prefetch', prefetch, 0);
    if (options.sampler.totalSamples > options.dataset.length) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `sampler totalSamples ${options.sampler.totalSamples} exceeds the dataset length ${options.dataset.length}`,
      );
    }
    this.dataset = options.dataset;
    this.prefetch = prefetch;
    this.sampler = options.sampler;
    // Without a collate, B is CollatedBatch; defaultCollate validates the fields at run time.
    this.collate = options.collate ?? ((samples: T[]) => defaultCollate(samples as object[]) as B);
    this.indices = this.sampler[Symbol.iterator]();
    this.consumed = this.sampler.consumedSamples;
    this.produced = this.consumed;
    // Start building ahead right away, so the first step need not wait.
    this.schedule();
  }

  /** Rebuilds a loader from `stateDict()` output (after a JSON round trip) over the same dataset. */
  static fromState<T, B = CollatedBatch>(
    state: LoaderState,
    dataset: MapDataset<T>,
    options: Omit<DataLoaderOptions<T, B>, 'dataset' | 'sampler'> = {},
  ): DataLoader<T, B> {
    return new DataLoader<T, B>({ ...options, dataset, sampler: samplerFromState(state) });
  }

  /** Global samples consumed by the batches handed out so far (Megatron's consumed_train_samples). */
  get consumedSamples(): number {
    return this.consumed;
  }

  /** The sampler currently driving the loader. */
  get currentSampler(): BatchSampler {
    return this.sampler;
  }

  /** Plain-JSON state; prefetched but not yet handed-out batches are not counted. */
  stateDict(): LoaderState {
    return {
      consumedSamples: this.consumed,
      totalSamples: this.sampler.totalSamples,
      microBatchSize: this.sampler.microBatchSize,
      dataParallelRank: this.sampler.dataParallelRank,
      dataParallelSize: this.sampler.dataParallelSize,
      dropLast: this.sampler.dropLast,
      sampler: this.sampler.kind,
    };
  }

  /** Resumes at a saved state; the layout (sizes, rank, sampler) must match this loader's. */
  loadStateDict(state: LoaderState): void {
    const s = checkState(state);
    const mine = this.stateDict();
    for (const k of [
      'totalSamples',
      'microBatchSize',
      'dataParallelRank',
      'dataParallelSize',
      'dropLast',
      'sampler',
    ] as const) {
      if (s[k] !== mine[k]) {
        throw new DataError(
          'INVALID_ARGUMENT',
          `loader state ${k} is ${String(s[k])} but this loader has ${String(mine[k])}; build it with DataLoader.fromState`,
        );
      }
    }
    this.reset(this.sampler.withConsumedSamples(s.consumedSamples));
  }

  /** Stops background prefetch and drops queued batches; later calls report the end. */
  close(): void {
    this.generation++;
    this.queue = [];
    this.exhausted = true;
  }

  /** The next micro-batch, built now when nothing is prefetched. */
  nextSync(): IteratorResult<B, undefined> {
    if (this.queue.length === 0) this.fill();
    const slot = this.queue.shift();
    this.schedule();
    if (slot === undefined) return { done: true, value: undefined };
    if (!slot.ok) throw slot.error;
    this.consumed += slot.advance;
    return { done: false, value: slot.batch };
  }

  /** The next micro-batch, async so that the background prefetch can run between calls. */
  async next(): Promise<IteratorResult<B, undefined>> {
    return this.nextSync();
  }

  [Symbol.iterator](): Iterator<B, undefined> {
    return { next: () => this.nextSync() };
  }

  [Symbol.asyncIterator](): AsyncIterator<B, undefined> {
    return { next: () => this.next() };
  }

  private reset(sampler: BatchSampler): void {
    this.generation++;
    this.sampler = sampler;
    this.indices = sampler[Symbol.iterator]();
    this.consumed = sampler.consumedSamples;
    this.produced = this.consumed;
    this.queue = [];
    this.exhausted = false;
    this.pumping = false;
    this.schedule();
  }

  /** Builds one batch into the queue, or marks the end. */
  private fill(): void {
    if (this.exhausted) return;
    let next: IteratorResult<number[]>;
    try {
      next = this.indices.next();
    } catch (error) {
      this.exhausted = true;
      this.queue.push({ ok: false, error });
      return;
    }
    if (next.done) {
      this.exhausted = true;
      return;
    }
    // A micro-batch step stands for one global group; the short last group (dropLast=false)
    // counts only the samples that exist, so consumedSamples never passes totalSamples.
    const group = this.sampler.microBatchSize * this.sampler.dataParallelSize;
    const advance =
      this.sampler.kind === 'pretraining'
        ? Math.min(group, this.sampler.totalSamples - this.produced)
        : group;
    this.produced += advance;
    try {
      const samples = next.value.map((i) => this.dataset.getItem(i));
      this.queue.push({ ok: true, batch: this.collate(samples), advance });
    } catch (error) {
      // The error surfaces when the training loop reaches this batch, not earlier.
      this.exhausted = true;
      this.queue.push({ ok: false, error });
    }
  }

  /** Keeps `prefetch` batches queued, one per setImmediate so the event loop stays responsive. */
  private schedule(): void {
    if (this.pumping || this.exhausted || this.queue.length >= this.prefetch) return;
    this.pumping = true;
    const generation = this.generation;
    setImmediate(() => {
      if (generation !== this.generation) return;
      this.pumping = false;
      if (this.queue.length < this.prefetch) this.fill();
      this.schedule();
    });
  }
}

/** Megatron's global batch layout. */
export interface GlobalBatchOptions {
  globalBatchSize: number;
  microBatchSize: number;
  dataParallelSize: number;
}

/** Megatron's num_microbatches: globalBatchSize / (microBatchSize * dataParallelSize), which must divide. */
export function numMicrobatches(options: GlobalBatchOptions): number {
  checkInteger('globalBatchSize', options.globalBatchSize, 1);
  checkInteger('microBatchSize', options.microBatchSize, 1);
  checkInteger('dataParallelSize', options.dataParallelSize, 1);
  const perStep = options.microBatchSize * options.dataParallelSize;
  if (options.globalBatchSize % perStep !== 0) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `global batch size (${options.globalBatchSize}) is not divisible by micro batch size (${options.microBatchSize}) times data parallel size (${options.dataParallelSize})`,
    );
  }
  return options.globalBatchSize / perStep;
}

function checkLayout<T, B>(loader: DataLoader<T, B>, options: GlobalBatchOptions): number {
  const n = numMicrobatches(options);
  const s = loader.currentSampler;
  if (s.microBatchSize !== options.microBatchSize || s.dataParallelSize !== options.dataParallelSize) {
    throw new DataError(
      'INVALID_ARGUMENT',
      `loader has microBatchSize ${s.microBatchSize} and dataParallelSize ${s.dataParallelSize}, but the global batch asks for ${options.microBatchSize} and ${options.dataParallelSize}`,
    );
  }
  return n;
}

/** This rank's micro-batches of each training step, num_microbatches at a time; an incomplete last step is dropped. */
export function globalBatches<T, B>(
  loader: DataLoader<T, B>,
  options: GlobalBatchOptions,
): AsyncGenerator<B[]> {
  // Validated here, eagerly, rather than at the first next() of the generator.
  const n = checkLayout(loader, options);
  return (async function* () {
    for (;;) {
      const step: B[] = [];
      while (step.length < n) {
        const r = await loader.next();
        if (r.done) return;
        step.push(r.value);
      }
      yield step;
    }
  })();
}

/** Synchronous `globalBatches`. */
export function globalBatchesSync<T, B>(
  loader: DataLoader<T, B>,
  options: GlobalBatchOptions,
): Generator<B[]> {
  const n = checkLayout(loader, options);
  return (function* () {
    for (;;) {
      const step: B[] = [];
      while (step.length < n) {
        const r = loader.nextSync();
        if (r.done) return;
        step.push(r.value);
      }
      yield step;
    }
  })();
}
