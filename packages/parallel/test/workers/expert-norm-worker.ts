// One rank of the expert-norm test in test/ddp-multiprocess.test.ts: two pipeline-like stages, the
// first without expert parameters (DeepSeek's dense first layers), the second with its fc2 marked
// as an expert. The expert norm is a collective over a group spanning both stages, so the first
// rank must join it. Prints `RESULT {"rank", "gradNorm", "dense", "expert"}` for each optimizer.
import { crossEntropy, setNumThreads, tidy } from '@megapatch/tensor';
import { DistributedDataParallel } from '../../src/distributed/distributed-data-parallel.js';
import { DataParallelOptimizer, DistributedOptimizer } from '../../src/distributed/distributed-optimizer.js';
import { destroyProcessGroup, initProcessGroup } from '../../src/distributed.js';
import { SingleProcessGroup } from '../../src/single-process-group.js';
import { DIMS, HYPER, MLP, makeData } from './ddp-common.js';

setNumThreads(1);
const world = await initProcessGroup();
const single = new SingleProcessGroup();
for (const sharded of [false, true]) {
  const model = new MLP(DIMS, 5 + world.rank, 'float32');
  const ddp = new DistributedDataParallel(model, {
    dataParallelGroup: single,
    expertDataParallelGroup: single,
    useDistributedOptimizer: sharded,
    isExpertParameter: (name) => world.rank === 1 && name.startsWith('fc2.'),
  });
  const options = { ...HYPER, modelParallelGroup: world, expertModelParallelGroup: world };
  const opt = sharded ? new DistributedOptimizer(ddp, options) : new DataParallelOptimizer(ddp, options);
  const [batch] = makeData(1, 8, 21);
  opt.zeroGrad();
  tidy(() => crossEntropy(ddp.forward(batch.x), batch.y).backward());
  ddp.finishGradSync();
  // this rank's squared gradient sums, dense and expert, before the step changes anything
  let dense = 0;
  let expert = 0;
  for (const [name, p] of model.namedParameters()) {
    const g = p.mainGrad?.toTypedArray() as Float32Array;
    const s = g.reduce((a, v) => a + v * v, 0);
    if (world.rank === 1 && name.startsWith('fc2.')) expert += s;
    else dense += s;
  }
  const { gradNorm } = opt.step();
  console.log(`RESULT ${JSON.stringify({ rank: world.rank, sharded, gradNorm, dense, expert })}`);
  batch.x.dispose();
  batch.y.dispose();
  ddp.dispose();
  model.dispose();
}
await destroyProcessGroup();
