// pnpm bench for @megapatch/models: the MoE router (TopKRouter.forward: the fp32 router GEMM, the
// scores, top-k with the expert bias and group-limited routing, the routing weights and the routing
// map) at 4096 tokens of hidden 1024, for three routing rules, against the same computation in
// PyTorch on the same threads (bench/torch_router.py: torch.topk on the scores, the pairs sorted by
// expert with a stable argsort), measured in the same run. For the record, the time the host
// selection took before the router chose on the scores' device (selectExperts on scores read back).
// With a capacity (padded, factor 1): the map built on the router's device against PyTorch's
// Megatron-style one, and for the record the former host map (buildRoutingMap on read-back ids).
// Prints one JSON line per case: {"name", "unit", "ours", "reference", "referenceName", "ratio"}.
// Usage: node bench/router.mjs [--tokens N] [--iters N]
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { MoeConfig } from '@megapatch/convert';
import { Generator, getNumThreads, randn, tidy } from '@megapatch/tensor';
import { buildRoutingMap, selectExperts, TopKRouter } from '../dist/index.js';

const here = dirname(fileURLToPath(import.meta.url));
const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
};
const threads = getNumThreads();
const tokens = arg('tokens', 4096);
const hidden = 1024;
const iters = arg('iters', 10);
const RULES = [
  { name: 'mixtral-e8-top2', numExperts: 8, routerTopk: 2, scoreFunction: 'softmax' },
  {
    name: 'moonlight-e64-top6',
    numExperts: 64,
    routerTopk: 6,
    scoreFunction: 'sigmoid',
    expertBias: true,
    normTopkProb: true,
  },
  {
    name: 'deepseek-v3-e256-top8-groups',
    numExperts: 256,
    routerTopk: 8,
    scoreFunction: 'sigmoid',
    expertBias: true,
    numGroups: 8,
    groupTopk: 4,
    normTopkProb: true,
    routedScalingFactor: 2.5,
  },
];

// Token dropping at capacity factor 1, padded (Megatron's drop-and-pad): the capacity map built
// where the ids are, against PyTorch's Megatron-style map (topk down the tokens of the scattered
// weights, the pairs by masked_select on the transposed map).
const CAPACITY = { capacityFactor: 1, dropPolicy: 'probs', padToCapacity: true };
const CAPACITY_RULES = RULES.slice(1).map((r) => ({
  ...r,
  name: `${r.name}-capacity1-pad`,
  capacity: CAPACITY,
}));

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function ours(rule) {
  const moe = MoeConfig.parse({
    ...rule,
    name: undefined,
    capacity: undefined,
    moeFfnHiddenSize: 512,
    layerPattern: ['moe'],
  });
  const router = new TopKRouter(
    moe,
    hidden,
    { dtype: 'float32', generator: new Generator(1), performInitialization: true },
    { auxLossCoeff: 0, zLossCoeff: 0 },
    rule.capacity ?? null,
  );
  const x = randn([tokens, hidden], { generator: new Generator(2) });
  const times = [];
  const hostTimes = [];
  for (let i = 0; i < iters + 2; i++) {
    const t0 = performance.now();
    let ids = null;
    let weights = null;
    tidy(() => {
      const r = router.forward(x);
      r.probs.toTypedArray(); // the weights are ready
      r.routingMap.device?.slot.toTypedArray(); // and the map
      if (rule.capacity && i >= 2 && i < 5) {
        ids = r.indices;
        weights = r.probs.toTypedArray();
      }
    });
    const t1 = performance.now();
    if (i >= 2) times.push(t1 - t0);
    if (ids) {
      // the former host map: the ids and weights read back, the capacity applied in JavaScript
      const h0 = performance.now();
      buildRoutingMap(ids, tokens, moe.numExperts, rule.capacity, () => weights);
      hostTimes.push(performance.now() - h0);
    } else if (i >= 2 && i < 5) {
      // the former host selection: the scores read back, top-k per token in JavaScript
      const scores = tidy(() => {
        const logits = x.matmul(router.weight.t());
        const s = moe.scoreFunction === 'softmax' ? logits.softmax(-1) : logits.sigmoid();
        return s.toTypedArray();
      });
      const bias = router.expertBias ? router.expertBias.toTypedArray() : null;
      const h0 = performance.now();
      selectExperts(scores, bias, tokens, moe);
      hostTimes.push(performance.now() - h0);
    }
  }
  router.dispose();
  x.dispose();
  return { ms: median(times), hostSelectMs: median(hostTimes) };
}

const torchOut = JSON.parse(
  execFileSync(
    process.env.MEGAPATCH_PYTHON ?? '/usr/bin/python3',
    [
      join(here, 'torch_router.py'),
      JSON.stringify({ threads, tokens, hidden, iters, rules: [...RULES, ...CAPACITY_RULES] }),
    ],
    { encoding: 'utf8' },
  ),
);
const ref = `PyTorch ${torchOut.torch} CPU, ${threads} threads`;
for (const rule of [...RULES, ...CAPACITY_RULES]) {
  const o = ours(rule);
  const t = torchOut.ms[rule.name];
  console.log(
    JSON.stringify({
      name: `router-fwd-${rule.name}-${tokens}tok`,
      unit: 'ms',
      ours: Number(o.ms.toPrecision(4)),
      reference: Number(t.toPrecision(4)),
      referenceName: ref,
      ratio: Number((o.ms / t).toFixed(3)),
      [rule.capacity ? 'hostCapacityMapBeforeMs' : 'hostSelectionBeforeMs']: Number(
        o.hostSelectMs.toPrecision(4),
      ),
    }),
  );
}
