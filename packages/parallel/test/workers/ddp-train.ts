// One rank of test/ddp-multiprocess.test.ts: trains the MLP with DDP (+ DistributedOptimizer or
// DataParallelOptimizer) on this rank's shard of each global batch, and prints `RESULT <json>` with
// the per-step local losses, step results, sync statistics and final weights. Rank 0 also runs
// the single-process reference on the whole batches (leaving out a batch whose step is skipped).
import { clipGradNorm, crossEntropy, noGrad, setNumThreads, tidy } from '@megapatch/tensor';
import {
  DistributedDataParallel,
  type GradSyncStats,
} from '../../src/distributed/distributed-data-parallel.js';
import { DataParallelOptimizer, DistributedOptimizer } from '../../src/distributed/distributed-optimizer.js';
import { destroyProcessGroup, initProcessGroup } from '../../src/distributed.js';
import { DIMS, HYPER, MLP, makeData, referenceRun, shardOf, weightsOf } from './ddp-common.js';

interface Args {
  distributedOptimizer: boolean;
  bucketSize: number | null;
  steps: number;
  rowsPerRank: number;
  /** Rank and step whose input gets a NaN (the step must be skipped everywhere). */
  nan?: { rank: number; step: number };
  /** Hidden size (default DIMS.hidden) and extra hidden layers (default 0): bigger makes the overlap measurable. */
  hidden?: number;
  extraLayers?: number;
  /** Skip the reference and the weights (for timing runs). */
  timingOnly?: boolean;
}

const args = JSON.parse(process.argv[2] ?? '{}') as Args;
setNumThreads(1);
const world = await initProcessGroup();
const { rank, size } = world;
const dims = { ...DIMS, hidden: args.hidden ?? DIMS.hidden };
const data = makeData(args.steps, args.rowsPerRank * size, 100);
const model = new MLP(dims, 11, 'float32', args.extraLayers ?? 0);
const ddp = new DistributedDataParallel(model, {
  dataParallelGroup: world,
  useDistributedOptimizer: args.distributedOptimizer,
  bucketSize: args.bucketSize,
});
const logs: string[] = [];
const optOptions = { ...HYPER, modelParallelGroup: null, log: (l: string) => logs.push(l) };
const opt = args.distributedOptimizer
  ? new DistributedOptimizer(ddp, optOptions)
  : new DataParallelOptimizer(ddp, optOptions);

const losses: number[] = [];
const steps: { updated: boolean; skipped: boolean; gradNorm: number }[] = [];
const stats: GradSyncStats[] = [];
const backwardMs: number[] = [];
for (let s = 0; s < args.steps; s++) {
  opt.zeroGrad();
  const local = shardOf(data[s], rank, size);
  if (args.nan && args.nan.rank === rank && args.nan.step === s) {
    noGrad(() => local.x.narrow(0, 0, 1).fill_(Number.NaN));
  }
  losses.push(
    tidy(() => {
      const l = crossEntropy(ddp.forward(local.x), local.y);
      const t0 = performance.now();
      l.backward();
      backwardMs.push(performance.now() - t0);
      return l.item();
    }),
  );
  ddp.finishGradSync();
  stats.push(ddp.lastSyncStats());
  steps.push(opt.step());
  local.x.dispose();
  local.y.dispose();
}

const result: Record<string, unknown> = {
  rank,
  losses,
  steps,
  stats,
  backwardMs,
  logs,
  buckets: ddp.buffers.map((b) => b.buckets.length),
  localElements: opt.numLocalElements,
  numParameters: model.numParameters(),
};
if (!args.timingOnly) {
  result.weights = weightsOf(model);
  if (rank === 0) {
    const kept = data.filter((_, s) => !(args.nan && args.nan.step === s));
    result.reference = referenceRun(
      kept,
      11,
      HYPER,
      (ps, max) => clipGradNorm(ps, max),
      dims,
      args.extraLayers ?? 0,
    );
  }
}
console.log(`RESULT ${JSON.stringify(result)}`);
opt.dispose();
ddp.dispose();
model.dispose();
await destroyProcessGroup();
