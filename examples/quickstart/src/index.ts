// The quickstart as a library: the stories, the model and run configs, and the pipeline.

export { bosPrefix } from './bos.js';
export { QuickstartError, type QuickstartErrorCode } from './errors.js';
export { COLOURS, type Fact, type Facts, fact, factText, makeFacts, NAMES, rng, THINGS } from './facts.js';
export { commandLine, megapatch, megapatchBin, type RunOptions } from './megapatch.js';
export { type ModelSize, mistralConfig, writeModelConfig } from './model-config.js';
export {
  lossFloor,
  MARKER,
  type QuickstartOptions,
  type QuickstartResult,
  runQuickstart,
} from './pipeline.js';
export { RUN_PATHS, type RunSize, runConfigYaml } from './run-config.js';
export { Completion, parseCompletions, type Score, type Scored, scoreCompletions } from './score.js';
export { type QuickstartSize, SIZES } from './sizes.js';
export { TOKENIZER_FILES, tokenizerDir } from './tokenizer.js';
