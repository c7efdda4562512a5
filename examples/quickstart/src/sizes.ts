// The two sizes of the quickstart: `full` (the README's `pnpm demo`, a few minutes on two cores) and
// `quick` (the same pipeline in seconds, for the default test suite).
import type { RunSize } from './run-config.js';

/** A run size plus what the pipeline around it does. */
export interface QuickstartSize {
  run: RunSize;
  /** Held-out stories given to `megapatch generate` and scored (of the 500). */
  heldOutPrompts: number;
  /** Seed of the stories' shuffle (which ones are held out). */
  dataSeed: number;
}

const model = { hiddenSize: 64, numLayers: 2, numHeads: 4, numKeyValueHeads: 2 };

/**
 * Sizes chosen on two CPU cores: with 32,000 output logits per token the vocabulary is most of the
 * work, so the model is small and the batches are short; what it has to learn (copying the thing and
 * the colour out of the story) appears after a few hundred iterations.
 */
export const SIZES = {
  full: {
    run: {
      model,
      seqLength: 64,
      microBatchSize: 1,
      globalBatchSize: 4,
      trainIters: 800,
      lr: 1e-2,
      minLr: 1e-4,
      warmupIters: 20,
      logInterval: 50,
      evalInterval: 200,
      evalIters: 10,
      saveInterval: 400,
      seed: 1234,
    },
    heldOutPrompts: 500,
    dataSeed: 7,
  },
  quick: {
    run: {
      model,
      seqLength: 64,
      microBatchSize: 1,
      globalBatchSize: 4,
      trainIters: 40,
      lr: 1e-2,
      minLr: 1e-4,
      warmupIters: 5,
      logInterval: 10,
      evalInterval: 20,
      evalIters: 2,
      saveInterval: 20,
      seed: 1234,
    },
    heldOutPrompts: 20,
    dataSeed: 7,
  },
} satisfies Record<string, QuickstartSize>;
