// MoE models on the device against the CPU: the fixture checkpoints of @megapatch/models (Mixtral:
// top-2 softmax; DeepSeek-V3: sigmoid routing in groups with the expert bias, MLA, a shared expert,
// MTP; Qwen3-MoE: normalised top-k) load with the default device set to the one under test, and the
// loss, every gradient and the loss after one AdamW step must match the CPU's (fp32; GEMMs without
// TF32), the routing chosen the same (the router's top-k, group-limited routing and routing map run
// on the device since session 35: topk, cumsum, scatterAdd there), with at most the tokens per
// expert read back a MoE layer during a forward (none where the grouped GEMM takes them on the
// device: the emulator's grouped tiled kernel; a GPU's default loop of GEMMs reads them). With a
// capacity (Mixtral dropping by weight, Qwen3-MoE by position and padded: the map built on the
// device since session 40) the pairs each expert computed must be the CPU's too.
// usage (repository root): packages/cuda/node_modules/.bin/tsx packages/cuda/gpu/moe-check.mts [cuda:0 | cudaemu:0]
// Prints "MOE OK: ..." or "MOE FAIL: ..." lines; exits 1 on a failure.
import { register } from 'node:module';

register('../bench/src-resolve.mjs', import.meta.url);

const device = process.argv[2] ?? 'cuda:0';
const emu = device.startsWith('cudaemu');
const T: typeof import('@megapatch/tensor') = await import('@megapatch/tensor');
await import(emu ? '../src/emulator.js' : '../src/index.js');
// not dependencies of @megapatch/cuda: named through variables (src-resolve.mjs finds them)
const modelsModule = '@megapatch/models';
const M: typeof import('@megapatch/models') = await import(modelsModule);
const { fixtureCheckpoint } = await import('../../models/test/helpers/fixtures.js');

const IDS = [1, 5, 9, 33, 100, 7, 8, 9, 4, 77, 12, 3];
let failures = 0;

function run(id: string, options: import('@megapatch/models').GPTModelOptions) {
  const { model } = M.loadModel(fixtureCheckpoint(id), options);
  try {
    const ids = T.fromTypedArray(BigInt64Array.from(IDS, BigInt), [2, 6]);
    const labels = T.fromTypedArray(BigInt64Array.from([...IDS.slice(1), 2], BigInt), [2, 6]);
    const objective = () => {
      const out = model.forward(ids, { labels });
      let l = (out.loss as import('@megapatch/tensor').Tensor).mean();
      for (const m of out.mtpLosses) l = l.add(m.mul(0.1));
      return l;
    };
    const backend = ids.backend;
    const { read, readMany } = backend;
    const reads: string[] = [];
    // what the forward reads back (float64: the deferred checks, read along with a read), one at a
    // time or several in one wait
    const seen = (t: import('@megapatch/tensor').Tensor) => {
      if (t.dtype !== 'float64') reads.push(`${t.dtype}[${t.shape}]`);
    };
    backend.read = (t, dst) => {
      seen(t);
      read.call(backend, t, dst);
    };
    if (readMany)
      backend.readMany = (ts, dsts) => {
        for (const t of ts) seen(t);
        readMany.call(backend, ts, dsts);
      };
    let l: import('@megapatch/tensor').Tensor;
    try {
      l = objective();
    } finally {
      Object.assign(backend, { read, readMany });
    }
    const routes = model.moeLayers().map(([, m]) => Array.from(m.lastRouting?.indices ?? []));
    const pairs = model.moeLayers().map(([, m]) => {
      const map = m.lastRouting?.routingMap;
      return map ? [Array.from(map.counts), Array.from(map.token), Array.from(map.slot)] : [];
    });
    l.backward();
    const grads = model
      .namedParameters()
      .map(([n, p]) => [n, Float32Array.from(p.grad?.toTypedArray() as Float32Array)] as const);
    new T.AdamW(model.parameters(), { lr: 1e-2 }).step();
    return { loss: l.item(), after: objective().item(), grads, routes, pairs, reads };
  } finally {
    model.dispose();
  }
}

const CASES: [string, string, import('@megapatch/models').GPTModelOptions][] = [
  ['mixtral', 'mixtral', {}],
  ['deepseek-v3', 'deepseek-v3', {}],
  ['qwen3-moe', 'qwen3-moe', {}],
  ['mixtral, capacity 0.5 by weight', 'mixtral', { moeExpertCapacityFactor: 0.5 }],
  [
    'qwen3-moe, capacity 0.75 by position, padded',
    'qwen3-moe',
    { moeExpertCapacityFactor: 0.75, moeTokenDropPolicy: 'position', moePadExpertInputToCapacity: true },
  ],
];

for (const [label, id, options] of CASES) {
  try {
    T.setDefaultDevice('cpu');
    const cpu = run(id, options);
    T.setDefaultDevice(device);
    const dev = run(id, options);
    T.setDefaultDevice('cpu');
    const problems: string[] = [];
    const rel = (a: number, b: number) => Math.abs(a - b) / Math.max(Math.abs(b), 1e-12);
    if (rel(dev.loss, cpu.loss) > 1e-5) problems.push(`loss ${dev.loss} vs ${cpu.loss}`);
    if (rel(dev.after, cpu.after) > 1e-4) problems.push(`loss after AdamW ${dev.after} vs ${cpu.after}`);
    let worst = 0;
    let worstName = '';
    for (const [i, [name, g]] of cpu.grads.entries()) {
      const h = dev.grads[i][1];
      let diff = 0;
      let scale = 1e-6;
      for (let j = 0; j < g.length; j++) {
        diff = Math.max(diff, Math.abs(g[j] - h[j]));
        scale = Math.max(scale, Math.abs(g[j]));
      }
      if (diff / scale > worst) [worst, worstName] = [diff / scale, name];
    }
    if (worst > 1e-4) problems.push(`gradient ${worstName}: ${worst.toExponential(2)} of its largest`);
    if (JSON.stringify(dev.routes) !== JSON.stringify(cpu.routes))
      problems.push('the routing differs from the CPU');
    if (JSON.stringify(dev.pairs) !== JSON.stringify(cpu.pairs))
      problems.push("the routing map's pairs differ from the CPU's");
    // the E counts of a MoE layer (int64 where groupedLinear reads its sizes, int32 where a
    // dispatcher does), and nothing where the grouped mode takes them on the device
    const counts = dev.reads.filter((r) => /^int(32|64)\[\d+\]$/.test(r)).length;
    if (dev.reads.length !== counts) problems.push(`forward read back ${dev.reads.join(' ')}`);
    // padded to the capacity, every expert's size follows from the tokens: nothing to read, in
    // any grouped mode
    if (options.moePadExpertInputToCapacity && counts > 0)
      problems.push(`a padded map's forward read ${dev.reads.join(' ')}`);
    if (problems.length) {
      failures++;
      console.log(`MOE FAIL: ${label}: ${problems.join('; ')}`);
    } else {
      console.log(
        `MOE OK: ${label}: loss ${dev.loss.toPrecision(7)} (CPU ${cpu.loss.toPrecision(7)}), gradients within ${worst.toExponential(1)}, routing equal, ${counts} reads of counts in the forward`,
      );
    }
  } catch (e) {
    failures++;
    console.log(`MOE FAIL: ${label}: ${(e as Error).message.split('\n')[0]}`);
  }
}
process.exit(failures ? 1 : 0);
