// One rank of test/tensor-parallel-multiprocess.test.ts: joins the job, sets up Megatron's
// parallel state with every rank in one tensor-parallel group, runs the shared tensor-parallel
// cases (tp-cases.ts) on that group and prints one `RESULT <json>` line per case.
import { ones, tidy } from '@megapatch/tensor';
import { destroyProcessGroup, initProcessGroup } from '../../src/distributed.js';
import {
  destroyModelParallel,
  getTensorModelParallelGroup,
  initializeModelParallel,
} from '../../src/parallel-state.js';
import { ColumnParallelLinear } from '../../src/tensor-parallel/layers.js';
import { copyToTensorModelParallelRegion } from '../../src/tensor-parallel/mappings.js';
import { allCases, type CaseResult, Checks } from './tp-cases.js';

const world = await initProcessGroup();
await initializeModelParallel({ tensorModelParallelSize: world.size });
const tp = getTensorModelParallelGroup();
const results: CaseResult[] = allCases(tp);

// Without an explicit group, layers and mappings use the parallel state's TP group.
const c = new Checks();
tidy(() => {
  const layer = new ColumnParallelLinear(8, 4 * tp.size);
  c.that('layer group', layer.tpGroup === tp);
  const x = ones([2, 1, 3]).requiresGrad_();
  copyToTensorModelParallelRegion(x).backward(ones([2, 1, 3]));
  c.equal('copy backward sums over the default group', x.grad, ones([2, 1, 3]).mul(tp.size));
});
results.push({ case: 'default group', rank: tp.rank, tp: tp.size, checks: c.list });

for (const result of results) console.log(`RESULT ${JSON.stringify(result)}`);
destroyModelParallel();
await destroyProcessGroup();
