// Megatron's model-parallel RNG tracker (tensor_parallel/random.py): named generator states that
// `fork` swaps into the default generator for the duration of a function, so dropout inside the
// tensor-parallel region draws a different stream on each TP rank while everything outside it
// draws the same stream on every TP rank.
import { defaultGenerator, Generator, type RngState } from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import {
  getExpertModelParallelRank,
  getExpertTensorParallelRank,
  getTensorModelParallelRank,
  modelParallelIsInitialized,
} from '../parallel-state.js';

/** State used for dropout inside the tensor-parallel region (differs across TP ranks). */
export const MODEL_PARALLEL_RNG_TRACKER_NAME = 'model-parallel-rng';
/** State of the expert layers (differs across expert-parallel and expert-TP ranks). */
export const EXPERT_PARALLEL_RNG_TRACKER_NAME = 'expert-parallel-rng';
/** A copy of the default state's seed (the same on every TP rank). */
export const DATA_PARALLEL_RNG_TRACKER_NAME = 'data-parallel-rng';

const DEFAULT_STATE = 'default-rng';

function fail(message: string): never {
  throw new DistributedError('INVALID_ARGUMENT', message);
}

/** Named generator states, swapped into the default generator by {@link RngStatesTracker.fork}. */
export class RngStatesTracker {
  private states = new Map<string, RngState>();
  private seeds = new Set<string>();
  private initialized = false;
  // The state whose stream the default generator is drawing now.
  private current = DEFAULT_STATE;

  /** Whether a state was added or set. */
  isInitialized(): boolean {
    return this.initialized;
  }

  /** Forgets every state and seed. */
  reset(): void {
    this.states = new Map();
    this.seeds = new Set();
    this.initialized = false;
    this.current = DEFAULT_STATE;
  }

  /** A copy of every tracked state, by name (plain data: save it with a checkpoint). */
  getStates(): Record<string, RngState> {
    return Object.fromEntries([...this.states].map(([k, v]) => [k, { ...v }]));
  }

  /** Replaces the tracked states (e.g. from a checkpoint). */
  setStates(states: Record<string, RngState>): void {
    this.initialized = true;
    this.states = new Map(Object.entries(states).map(([k, v]) => [k, { ...v }]));
  }

  /** Tracks a new state `name` seeded with `seed`; a name or seed may be added once. */
  add(name: string, seed: number | bigint): void {
    this.initialized = true;
    const key = BigInt(seed).toString();
    if (this.seeds.has(key)) fail(`RNG tracker: seed ${key} already exists`);
    if (this.states.has(name)) fail(`RNG tracker: state '${name}' already exists`);
    this.seeds.add(key);
    this.states.set(name, new Generator(seed).getState());
  }

  /**
   * Runs `fn` with the default generator drawing from state `name`, then stores where that state
   * got to and puts the previous state back (also when `fn` throws). `fn` must be synchronous:
   * random draws after an await would leave the fork. Forks nest.
   */
  fork<T>(name: string, fn: () => T): T;
  fork<T>(fn: () => T): T;
  fork<T>(nameOrFn: string | (() => T), maybeFn?: () => T): T {
    const name = typeof nameOrFn === 'string' ? nameOrFn : MODEL_PARALLEL_RNG_TRACKER_NAME;
    const fn = typeof nameOrFn === 'string' ? maybeFn : nameOrFn;
    if (!fn) fail('RNG tracker fork: no function to run');
    const state = this.states.get(name);
    if (!state) fail(`RNG tracker: state '${name}' is not added`);
    const outer = this.current;
    const outerState = defaultGenerator.getState();
    if (outer !== DEFAULT_STATE) this.states.set(outer, outerState);
    defaultGenerator.setState(state);
    this.current = name;
    let result: T;
    try {
      result = fn();
    } finally {
      this.states.set(name, defaultGenerator.getState());
      defaultGenerator.setState(outer === DEFAULT_STATE ? outerState : (this.states.get(outer) as RngState));
      this.current = outer;
    }
    if (result instanceof Promise) {
      fail('RNG tracker fork: the function returned a promise; draws after an await would escape the fork');
    }
    return result;
  }
}

const tracker = new RngStatesTracker();

/** The process-wide RNG tracker (Megatron's get_cuda_rng_tracker). */
export function getRngTracker(): RngStatesTracker {
  return tracker;
}

/** Ranks for {@link modelParallelManualSeed}; each defaults to the parallel state's value. */
export interface ModelParallelSeedOptions {
  tpRank?: number;
  /** Expert-parallel rank (default: the parallel state's when initialised, else 0). */
  epRank?: number;
  /** Expert tensor-parallel rank (default: the parallel state's when initialised, else 0). */
  etpRank?: number;
}

/**
 * Megatron's model_parallel_cuda_manual_seed: seeds the default generator with `seed` (the same
 * on every TP rank) and resets the tracker to three states: 'data-parallel-rng' (seed),
 * 'model-parallel-rng' (seed + 2718 + tpRank) and 'expert-parallel-rng'
 * (seed + 1024 + 100·epRank + etpRank).
 */
export function modelParallelManualSeed(seed: number, opts: ModelParallelSeedOptions = {}): void {
  if (!Number.isSafeInteger(seed) || seed < 0)
    fail(`modelParallelManualSeed: seed must be a non-negative integer, got ${seed}`);
  const initialized = modelParallelIsInitialized();
  const tpRank = opts.tpRank ?? getTensorModelParallelRank();
  const epRank = opts.epRank ?? (initialized ? getExpertModelParallelRank() : 0);
  const etpRank = opts.etpRank ?? (initialized ? getExpertTensorParallelRank() : 0);
  tracker.reset();
  defaultGenerator.manualSeed(seed);
  tracker.add(DATA_PARALLEL_RNG_TRACKER_NAME, seed);
  tracker.add(MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tpRank);
  tracker.add(EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * epRank + etpRank);
}
