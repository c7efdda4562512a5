// One rank of bench/pipeline-bubble.mjs: every rank is one stage of a single pipeline (pp = world
// size) over a stack of Linear+GELU blocks, run through Megatron's 1F1B schedule and the
// interleaved one (v model chunks per rank). Per rank it times the busy time (the compute of every
// forward and backward step: from the schedule's onStep until the next send, receive, step or the
// end) and the wall time of the whole forward-backward; rank 0 prints one `RESULT <json>` line per
// case with the bubble 1 − busy/wall averaged over the ranks (median of the measured iterations).
// argv[2]: {"layers", "hidden", "seq", "microBatch", "ms": [..], "vs": [1, 2], "iters", "warmup"}
import {
  fromTypedArray,
  Generator,
  Linear,
  Module,
  ModuleList,
  randn,
  setNumThreads,
} from '@megapatch/tensor';
import {
  destroyModelParallel,
  destroyProcessGroup,
  getForwardBackwardFunc,
  getPipelineModelParallelGroup,
  initializeModelParallel,
  initProcessGroup,
} from '../dist/index.js';

const cfg = JSON.parse(process.argv[2]);
const { layers, hidden, seq, microBatch, iters, warmup } = cfg;
setNumThreads(1);
await initProcessGroup({ timeoutMs: 120_000 });
await initializeModelParallel({ pp: Number(process.env.WORLD_SIZE) });
const pp = getPipelineModelParallelGroup();
const p = pp.size;
const now = () => performance.now();
const median = (a) => [...a].sort((x, y) => x - y)[a.length >> 1];

/** `n` blocks h → gelu(W h + b), the virtual stage `stage` of the stack. */
class Chunk extends Module {
  constructor(stage, n) {
    super();
    const blocks = Array.from(
      { length: n },
      (_, j) => new Linear(hidden, hidden, { generator: new Generator(100 + stage * n + j) }),
    );
    this.blocks = this.registerModule('blocks', new ModuleList(blocks));
  }
  forward(h) {
    let x = h;
    for (const b of this.blocks) x = b.forward(x).gelu();
    return x;
  }
}

// busy time: an interval opens when the schedule starts a compute step and closes at the next
// send or receive it posts, the next step, or the end
let busy = 0;
let open = null;
const close = () => {
  if (open !== null) busy += now() - open;
  open = null;
};
const timedGroup = new Proxy(pp, {
  get(target, key) {
    const v = Reflect.get(target, key, target);
    if (typeof v !== 'function') return v;
    if (key === 'send' || key === 'recv') {
      return (...a) => {
        close();
        return v.apply(target, a);
      };
    }
    return v.bind(target);
  },
});

async function runCase(v, m) {
  if (layers % (p * v) !== 0) throw new Error(`${layers} layers do not split into ${p}×${v} stages`);
  const perChunk = layers / (p * v);
  // Megatron's interleaved layout: chunk k of rank r is virtual stage k·p + r
  const chunks = Array.from({ length: v }, (_, k) => new Chunk(k * p + pp.rank, perChunk));
  const inputs = Array.from({ length: m }, (_, i) =>
    randn([seq, microBatch, hidden], { generator: new Generator(7 + i) }),
  );
  const fb = getForwardBackwardFunc(p, v > 1 ? v : null);
  const iterator = () => inputs[Symbol.iterator]();
  const samples = [];
  for (let it = 0; it < warmup + iters; it++) {
    for (const c of chunks) c.zeroGrad();
    busy = 0;
    open = null;
    pp.barrier().waitSync();
    const t0 = now();
    await fb({
      forwardStepFunc: (data, model, ctx) => {
        const x = data.next().value;
        const out = model.forward(ctx.inputTensor ?? x);
        return [out, (o) => [o.mul(o).mean(), 0]];
      },
      dataIterator: v > 1 ? chunks.map(iterator) : iterator(),
      model: v > 1 ? chunks : chunks[0],
      numMicrobatches: m,
      seqLength: seq,
      microBatchSize: microBatch,
      hiddenSize: hidden,
      ppGroup: timedGroup,
      onStep: () => {
        close();
        open = now();
      },
      finalizeModelGradsFunc: close,
    });
    close();
    const wall = now() - t0;
    if (it >= warmup) samples.push([1 - busy / wall, wall, busy]);
  }
  // average over the ranks, iteration by iteration
  const sums = samples.map((s) => {
    const t = fromTypedArray(Float32Array.from(s), [3]);
    pp.allReduce(t, 'sum').waitSync();
    const avg = Array.from(t.toTypedArray(), (x) => x / p);
    t.dispose();
    return avg;
  });
  for (const c of chunks) c.dispose();
  for (const t of inputs) t.dispose();
  return {
    p,
    m,
    v,
    bubble: median(sums.map((s) => s[0])),
    wallMs: median(sums.map((s) => s[1])),
    busyMs: median(sums.map((s) => s[2])),
    perRank: samples.length,
  };
}

for (const v of cfg.vs) {
  for (const m of cfg.ms) {
    const r = await runCase(v, m);
    if (pp.rank === 0) console.log(`RESULT ${JSON.stringify(r)}`);
  }
}
destroyModelParallel();
await destroyProcessGroup();
