// One rank of test/parallel-state.test.ts: initialises Megatron's parallel state with the sizes in
// argv[2] (JSON), prints this rank's groups as `RESULT <json>`, and checks an all-reduce over TP.
import { tensor } from '@megapatch/tensor';
import { destroyProcessGroup, getRank, initProcessGroup } from '../../src/distributed.js';
import {
  destroyModelParallel,
  getContextParallelGroup,
  getDataParallelGroup,
  getDataParallelRank,
  getEmbeddingGroup,
  getExpertDataParallelGroup,
  getExpertModelParallelGroup,
  getExpertTensorAndModelParallelGroup,
  getExpertTensorModelPipelineParallelGroup,
  getExpertTensorParallelGroup,
  getModelParallelGroup,
  getPipelineModelParallelGroup,
  getPipelineModelParallelRank,
  getTensorModelParallelGroup,
  getTensorModelParallelRank,
  initializeModelParallel,
  type ModelParallelOptions,
} from '../../src/parallel-state.js';

const sizes = JSON.parse(process.argv[2] ?? '{}') as ModelParallelOptions;

await initProcessGroup();
await initializeModelParallel(sizes);
const rank = getRank();

const tp = getTensorModelParallelGroup();
const t = tensor([rank], { dtype: 'float32' });
tp.allReduce(t).waitSync();
const tpSum = t.item();
t.dispose();
const expected = tp.ranks.reduce((a, b) => a + b, 0);
if (tpSum !== expected) {
  throw new Error(`rank ${rank}: all-reduce over TP group [${tp.ranks}] gave ${tpSum}, expected ${expected}`);
}

const result = {
  rank,
  tp: tp.ranks,
  pp: getPipelineModelParallelGroup().ranks,
  dp: getDataParallelGroup().ranks,
  cp: getContextParallelGroup().ranks,
  ep: getExpertModelParallelGroup().ranks,
  etp: getExpertTensorParallelGroup().ranks,
  expertDp: getExpertDataParallelGroup().ranks,
  dpCp: getDataParallelGroup(true).ranks,
  mp: getModelParallelGroup().ranks,
  tpEp: getExpertTensorAndModelParallelGroup().ranks,
  tpEpPp: getExpertTensorModelPipelineParallelGroup().ranks,
  embedding: getEmbeddingGroup()?.ranks ?? null,
  tpRank: getTensorModelParallelRank(),
  ppRank: getPipelineModelParallelRank(),
  dpRank: getDataParallelRank(),
  tpSum,
};
console.log(`RESULT ${JSON.stringify(result)}`);

destroyModelParallel();
await destroyProcessGroup();
