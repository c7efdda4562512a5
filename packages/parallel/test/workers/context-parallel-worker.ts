// One rank of the context-parallel tests: the ranks of the job form CP groups (Megatron's parallel
// state; by default one group of the whole job), each rank runs the ring-attention cases (context-parallel-cases.ts;
// argument 'heavy' for the big matrix) and prints one `RESULT <json>` line per case. It also
// records the order of the ring's sends, receives, waits and attention kernels in one call, so
// the test can check that each exchange is posted before the block it overlaps is computed.
import { type KernelName, manualSeed, randn, type Tensor, tidy } from '@megapatch/tensor';
import { ringAttention } from '../../src/context-parallel/ring-attention.js';
import { contextParallelSplit } from '../../src/context-parallel/split.js';
import { destroyProcessGroup, initProcessGroup } from '../../src/distributed.js';
import {
  destroyModelParallel,
  getContextParallelGroup,
  initializeModelParallel,
} from '../../src/parallel-state.js';
import type { ProcessGroup, Work } from '../../src/process-group.js';
import { defaultCases, heavyCases, runCase } from './context-parallel-cases.js';

const world = await initProcessGroup();
// CP_SIZE and TP_SIZE (heavy runs) place the CP groups inside a bigger layout: tp-cp-ep-dp-pp order
const tpSize = Number(process.env.TP_SIZE ?? 1);
await initializeModelParallel({
  tensorModelParallelSize: tpSize,
  contextParallelSize: Number(process.env.CP_SIZE ?? world.size / tpSize),
});
const cp = getContextParallelGroup();
const cases = process.argv[2] === 'heavy' ? heavyCases() : defaultCases();

for (const [i, c] of cases.entries()) {
  console.log(`RESULT ${JSON.stringify(runCase(c, cp, 1000 + i))}`);
}

/** The CP group with every send, recv and wait appended to `log`. */
function tracedGroup(group: ProcessGroup, log: string[]): ProcessGroup {
  const traced = (what: string, work: Work): Work => ({
    wait: () => work.wait(),
    waitSync: () => {
      log.push(`wait ${what}`);
      work.waitSync();
    },
    isCompleted: () => work.isCompleted(),
  });
  return Object.assign(Object.create(group) as ProcessGroup, {
    send: (t: Tensor, dst: number, tag?: number) => {
      log.push('send');
      return traced('send', group.send(t, dst, tag));
    },
    recv: (t: Tensor, src: number, tag?: number) => {
      log.push('recv');
      return traced('recv', group.recv(t, src, tag));
    },
  });
}

// The trace: the default group (no cpGroup option) and the attention kernels, wrapped for one call.
if (process.argv[2] !== 'heavy') {
  const log: string[] = [];
  tidy(() => {
    manualSeed(7);
    const s = 8 * cp.size;
    const [q, k, v] = [0, 1, 2].map(() =>
      contextParallelSplit(randn([1, 2, s, 8]), cp, { seqDim: 2 }).requiresGrad_(),
    );
    const backend = q.backend;
    const original = backend.kernel;
    const traceKernel = (name: KernelName) => {
      const kernel = original.call(backend, name) as ((...args: unknown[]) => unknown) | undefined;
      if (!kernel || !name.startsWith('attention')) return kernel;
      return (...args: unknown[]) => {
        log.push(name === 'attentionForward' ? 'forward' : 'backward');
        return kernel(...args);
      };
    };
    // the lookup is generic in the kernel's type; the wrapper keeps whatever type was asked for
    backend.kernel = traceKernel as unknown as typeof backend.kernel;
    try {
      const traced = tracedGroup(cp, log);
      const out = ringAttention(q, k, v, { cpGroup: traced });
      log.push('--');
      out.backward(out.detach().mul(0).add(1));
      log.push('--');
      // the default group gives the same result
      const again = ringAttention(q, k, v);
      const same = again.sub(out).abs().max().item() === 0;
      for (const t of [q, k, v]) t.grad?.dispose();
      console.log(`RESULT ${JSON.stringify({ case: 'trace', rank: cp.rank, cp: cp.size, log, same })}`);
    } finally {
      backend.kernel = original;
    }
  });
}

destroyModelParallel();
await destroyProcessGroup();
