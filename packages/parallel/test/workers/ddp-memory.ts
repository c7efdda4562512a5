// One rank of the memory test in test/ddp-multiprocess.test.ts: a bf16 MLP with fp32 gradient
// buffers; measures memoryStats().liveBytes around building the model, DDP and the optimizer (and
// its first step, which allocates the AdamW moments), and prints `RESULT <json>`.
import { crossEntropy, memoryStats, setNumThreads, tidy } from '@megapatch/tensor';
import { DistributedDataParallel } from '../../src/distributed/distributed-data-parallel.js';
import { DataParallelOptimizer, DistributedOptimizer } from '../../src/distributed/distributed-optimizer.js';
import { destroyProcessGroup, initProcessGroup } from '../../src/distributed.js';
import { DIMS, HYPER, MLP, makeData, shardOf } from './ddp-common.js';

const args = JSON.parse(process.argv[2] ?? '{}') as {
  distributedOptimizer: boolean;
  hidden: number;
  bucketSize: number;
};
setNumThreads(1);
const world = await initProcessGroup();
const { rank, size } = world;
const [batch] = makeData(1, 4 * size, 3);
const local = shardOf(batch, rank, size);
const x = local.x.to('bfloat16');

const live = () => memoryStats().liveBytes;
const b0 = live();
const model = new MLP({ ...DIMS, hidden: args.hidden }, 5, 'bfloat16');
const modelBytes = live() - b0;
const b1 = live();
const ddp = new DistributedDataParallel(model, {
  dataParallelGroup: world,
  useDistributedOptimizer: args.distributedOptimizer,
  bucketSize: args.bucketSize,
});
const ddpBytes = live() - b1;
const b2 = live();
const optOptions = { ...HYPER, modelParallelGroup: null };
const opt = args.distributedOptimizer
  ? new DistributedOptimizer(ddp, optOptions)
  : new DataParallelOptimizer(ddp, optOptions);
tidy(() => crossEntropy(ddp.forward(x).float(), local.y).backward());
const r = opt.step();
const optimizerBytes = live() - b2;

console.log(
  `RESULT ${JSON.stringify({
    rank,
    numParameters: model.numParameters(),
    bufferNumel: ddp.buffers.map((b) => b.layout.numel),
    localElements: opt.numLocalElements,
    modelBytes,
    ddpBytes,
    optimizerBytes,
    updated: r.updated,
  })}`,
);
opt.dispose();
ddp.dispose();
model.dispose();
await destroyProcessGroup();
