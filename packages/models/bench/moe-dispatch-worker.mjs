// One rank of bench/moe-dispatch.mjs: a MoELayer (hidden, experts, top-k, SwiGLU experts) split
// over expert parallelism = world size, built twice from the same seed, once with the allgather
// token dispatcher and once with alltoall. For each token count per rank it times, alternating the
// two dispatchers iteration by iteration, (a) forward + backward of the whole layer and (b) the
// dispatcher alone in a forward without gradients (dispatch + combine, the experts' matmuls left
// out). Times are the slowest rank's, after a barrier; rank 0 prints one `RESULT <json>` line per
// token count with the medians in ms.
// argv[2]: {"tokens": [..], "hidden", "experts", "topk", "ffn", "iters", "warmup"}
import { makeTransformerConfig } from '@megapatch/convert';
import {
  destroyModelParallel,
  destroyProcessGroup,
  getExpertModelParallelGroup,
  getExpertTensorParallelGroup,
  getTensorModelParallelGroup,
  initializeModelParallel,
  initProcessGroup,
} from '@megapatch/parallel';
import { fromTypedArray, Generator, noGrad, randn, setNumThreads, tidy } from '@megapatch/tensor';
import { getModelFamily, MoELayer } from '../dist/index.js';

const cfg = JSON.parse(process.argv[2]);
setNumThreads(1);
const world = await initProcessGroup({ timeoutMs: 120_000 });
await initializeModelParallel({ ep: world.size, timeoutMs: 120_000 });
const ep = getExpertModelParallelGroup();
const now = () => performance.now();
const median = (a) => [...a].sort((x, y) => x - y)[a.length >> 1];

const config = makeTransformerConfig({
  numLayers: 1,
  hiddenSize: cfg.hidden,
  ffnHiddenSize: cfg.ffn,
  numAttentionHeads: 4,
  numQueryGroups: 4,
  kvChannels: cfg.hidden / 4,
  layernormEpsilon: 1e-6,
  rotaryBase: 10000,
  untieEmbeddingsAndOutputWeights: true,
  vocabSize: 128,
  maxPositionEmbeddings: 4096,
  moe: {
    numExperts: cfg.experts,
    routerTopk: cfg.topk,
    moeFfnHiddenSize: cfg.ffn,
    layerPattern: ['moe'],
  },
});

const layerOf = (type) =>
  new MoELayer(
    {
      config,
      dtype: 'float32',
      tpGroup: getTensorModelParallelGroup(),
      sequenceParallel: false,
      generator: new Generator(1234),
      performInitialization: true,
      family: getModelFamily('Qwen3MoeForCausalLM'),
    },
    { epGroup: ep, etpGroup: getExpertTensorParallelGroup() },
    { auxLossCoeff: 0, zLossCoeff: 0 },
    { tokenDispatcherType: type },
  );
const layers = { allgather: layerOf('allgather'), alltoall: layerOf('alltoall') };

/** The slowest rank's time of `fn` (ms), all ranks starting together. */
function timed(fn) {
  ep.barrier().waitSync();
  const t0 = now();
  fn();
  const t = fromTypedArray(Float32Array.of(now() - t0), [1]);
  ep.allReduce(t, 'max').waitSync();
  const ms = t.item();
  t.dispose();
  return ms;
}

function fwdBwd(layer, x, g) {
  tidy(() => layer.forward(x).backward(g));
  layer.zeroGrad();
  x.grad = null;
}

/** Forward without gradients, timing only the dispatcher's dispatch and combine. */
function dispatchOnly(layer, flat) {
  return noGrad(() =>
    tidy(() => {
      const routing = layer.router.forward(flat);
      ep.barrier().waitSync();
      const t0 = now();
      const d = layer.tokenDispatcher.dispatch(flat, routing);
      const t1 = now();
      const y = layer.experts.forward(d.tokens, d.tokensPerExpert);
      const t2 = now();
      d.combine(y);
      const t = fromTypedArray(Float32Array.of(t1 - t0 + (now() - t2)), [1]);
      ep.allReduce(t, 'max').waitSync();
      return t.item();
    }),
  );
}

for (const n of cfg.tokens) {
  const gen = new Generator(99 + world.rank);
  const x = randn([n, 1, cfg.hidden], { generator: gen }).requiresGrad_();
  const g = randn([n, 1, cfg.hidden], { generator: gen });
  const flat = noGrad(() => x.reshape(n, cfg.hidden).contiguous());
  const times = { allgather: [], alltoall: [] };
  const disp = { allgather: [], alltoall: [] };
  for (let it = 0; it < cfg.warmup + cfg.iters; it++) {
    // alternate which dispatcher goes first, so that drifts in the machine's load hit both
    const order = it % 2 ? ['alltoall', 'allgather'] : ['allgather', 'alltoall'];
    for (const type of order) {
      const ms = timed(() => fwdBwd(layers[type], x, g));
      const d = dispatchOnly(layers[type], flat);
      if (it >= cfg.warmup) {
        times[type].push(ms);
        disp[type].push(d);
      }
    }
  }
  if (world.rank === 0) {
    console.log(
      `RESULT ${JSON.stringify({
        tokens: n,
        ep: ep.size,
        fwdBwd: { allgather: median(times.allgather), alltoall: median(times.alltoall) },
        dispatch: { allgather: median(disp.allgather), alltoall: median(disp.alltoall) },
      })}`,
    );
  }
  for (const t of [x, g, flat]) t.dispose();
}
for (const l of Object.values(layers)) l.dispose();
destroyModelParallel();
await destroyProcessGroup();
