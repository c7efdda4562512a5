// The run config `megapatch train` reads: the sections of @megapatch/train's RunConfig, written as
// YAML with a comment per choice, paths relative to the output folder (the run's working folder).
import type { ModelSize } from './model-config.js';

/** How big the run is: the model, the batches, the length and the schedule. */
export interface RunSize {
  model: ModelSize;
  seqLength: number;
  microBatchSize: number;
  globalBatchSize: number;
  trainIters: number;
  lr: number;
  minLr: number;
  warmupIters: number;
  logInterval: number;
  evalInterval: number;
  evalIters: number;
  saveInterval: number;
  seed: number;
}

/** Where the run reads and writes, relative to the output folder. */
export const RUN_PATHS = {
  modelConfig: 'model-config/config.json',
  dataPrefix: 'data/stories_text_document',
  checkpoints: 'checkpoints',
  exportHf: 'hf',
  runDir: 'run',
} as const;

/** The YAML text of the run config. */
export function runConfigYaml(s: RunSize): string {
  return `# megapatch train --config run.yaml (run from this folder; every key is in @megapatch/train's README)
model:
  config: ${RUN_PATHS.modelConfig} # from scratch: a small MistralForCausalLM (Megatron's initialisation)
  dtype: fp32
data:
  dataPath: [${RUN_PATHS.dataPrefix}] # written by megapatch preprocess pretrain
  split: "98,2,0" # train and validation documents, as Megatron's --split
  seqLength: ${s.seqLength}
  eodTokenId: 2 # </s>, appended to every story by --append-eod
  resetAttentionMask: true # packed stories do not attend to each other (Megatron --reset-attention-mask)
  resetPositionIds: true
training:
  microBatchSize: ${s.microBatchSize}
  globalBatchSize: ${s.globalBatchSize}
  trainIters: ${s.trainIters}
  seed: ${s.seed}
  logInterval: ${s.logInterval}
  evalInterval: ${s.evalInterval}
  evalIters: ${s.evalIters}
optimizer:
  lr: ${s.lr}
  minLr: ${s.minLr}
  weightDecay: 0.1
  adamBeta2: 0.95
  clipGrad: 1.0
scheduler:
  lrDecayStyle: cosine
  lrWarmupIters: ${s.warmupIters}
checkpoint:
  save: ${RUN_PATHS.checkpoints} # a training checkpoint every saveInterval and at the end
  saveInterval: ${s.saveInterval}
  exportHf: ${RUN_PATHS.exportHf} # the final model as a Hugging Face folder
logging:
  runDir: ${RUN_PATHS.runDir} # metrics.jsonl and the report
`;
}
