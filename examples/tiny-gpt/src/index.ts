export { GPT, GPTConfig } from './model.js';
export {
  additionTask,
  type Batch,
  type PuzzleTask,
  rng,
  sortTask,
  type Task,
  type TextTask,
  textTask,
} from './tasks.js';
export {
  evaluatePuzzle,
  type StepInfo,
  sampleText,
  type TrainOptions,
  train,
  trainAsync,
  validationLoss,
} from './train.js';
