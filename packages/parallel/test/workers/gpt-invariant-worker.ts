// The invariant of every parallel layout: a small GPT built from the tensor-parallel layers, trained
// with data parallelism (optionally sequence parallelism and the distributed optimizer), gives the
// same per-step losses and the same gathered weights as one process.
// argv[2]: {"tp": n, "sp": bool, "distOpt": bool, "steps": n, "bucketSize": n}
// Prints `RESULT {"losses": [...], "weights": {name: number[]}}` on global rank 0.
import {
  empty,
  fromTypedArray,
  Generator,
  Module,
  ModuleList,
  memoryStats,
  RMSNorm,
  scaledDotProductAttention,
  type Tensor,
  tidy,
} from '@megapatch/tensor';
import { DistributedDataParallel } from '../../src/distributed/distributed-data-parallel.js';
import { DataParallelOptimizer, DistributedOptimizer } from '../../src/distributed/distributed-optimizer.js';
import { destroyProcessGroup, initProcessGroup } from '../../src/distributed.js';
import {
  destroyModelParallel,
  getDataParallelGroup,
  getDataParallelRank,
  getDataParallelWorldSize,
  getTensorModelParallelGroup,
  initializeModelParallel,
} from '../../src/parallel-state.js';
import type { ProcessGroup } from '../../src/process-group.js';
import { setSequenceParallelAttribute } from '../../src/tensor-parallel/attributes.js';
import { vocabParallelCrossEntropy } from '../../src/tensor-parallel/cross-entropy.js';
import {
  ColumnParallelLinear,
  LayerNormColumnParallelLinear,
  RowParallelLinear,
  VocabParallelEmbedding,
} from '../../src/tensor-parallel/layers.js';
import { registerSequenceParallelGradHooks } from '../../src/tensor-parallel/sequence-parallel-grads.js';
import { gatherShards, type Partition } from '../../src/tensor-parallel/sharding.js';

const cfg = JSON.parse(process.argv[2] ?? '{}') as {
  tp?: number;
  sp?: boolean;
  distOpt?: boolean;
  steps?: number;
  bucketSize?: number;
};
const TP = cfg.tp ?? 1;
const SP = cfg.sp === true && TP > 1;
const STEPS = cfg.steps ?? 4;

const VOCAB = 60; // real vocabulary; the tables are padded to 64
const PADDED = 64;
const H = 32;
const HEADS = 8;
const GROUPS = 4; // divisible by TP 1, 2 and 4
const HEAD_DIM = 4;
const FFN = 64;
const LAYERS = 2;
const SEQ = 16;
const GLOBAL_BATCH = 4;

class Layer extends Module {
  readonly qkv: LayerNormColumnParallelLinear;
  readonly proj: RowParallelLinear;
  readonly fc1: LayerNormColumnParallelLinear;
  readonly fc2: RowParallelLinear;

  constructor(
    gen: Generator,
    private readonly tp: ProcessGroup,
  ) {
    super();
    const common = { tpGroup: tp, generator: gen, sequenceParallel: SP, bias: false };
    this.qkv = this.registerModule(
      'linear_qkv',
      new LayerNormColumnParallelLinear(H, (HEADS + 2 * GROUPS) * HEAD_DIM, {
        ...common,
        partition: 'qkv',
        qkvDims: { numHeads: HEADS, numQueryGroups: GROUPS, headDim: HEAD_DIM },
        normalization: 'RMSNorm',
      }),
    );
    this.proj = this.registerModule(
      'linear_proj',
      new RowParallelLinear(HEADS * HEAD_DIM, H, { ...common, inputIsParallel: true }),
    );
    this.fc1 = this.registerModule(
      'linear_fc1',
      new LayerNormColumnParallelLinear(H, 2 * FFN, {
        ...common,
        partition: 'gate_up',
        normalization: 'RMSNorm',
      }),
    );
    this.fc2 = this.registerModule(
      'linear_fc2',
      new RowParallelLinear(FFN, H, { ...common, inputIsParallel: true }),
    );
  }

  /** x [s(/tp under SP), b, h] -> the same shape. */
  forward(x: Tensor): Tensor {
    const groups = GROUPS / this.tp.size;
    const qkv = this.qkv.forward(x).output; // [s, b, groups·(2+1+1)·d]
    const [s, b] = qkv.shape;
    const perGroup = (HEADS / GROUPS + 2) * HEAD_DIM;
    const g = qkv.view(s, b, groups, perGroup);
    const q = g
      .narrow(3, 0, (HEADS / GROUPS) * HEAD_DIM)
      .reshape(s, b, groups * (HEADS / GROUPS), HEAD_DIM)
      .permute(1, 2, 0, 3);
    const k = g.narrow(3, (HEADS / GROUPS) * HEAD_DIM, HEAD_DIM).permute(1, 2, 0, 3);
    const v = g.narrow(3, (HEADS / GROUPS + 1) * HEAD_DIM, HEAD_DIM).permute(1, 2, 0, 3);
    const attn = scaledDotProductAttention(q.contiguous(), k.contiguous(), v.contiguous(), {
      isCausal: true,
    });
    const ctx = attn.permute(2, 0, 1, 3).reshape(s, b, (HEADS / this.tp.size) * HEAD_DIM);
    const h1 = x.add(this.proj.forward(ctx).output);
    const fc1 = this.fc1.forward(h1).output;
    const [gate, up] = fc1.chunk(2, -1);
    return h1.add(this.fc2.forward(gate.silu().mul(up)).output);
  }
}

class Embedding extends Module {
  readonly word: VocabParallelEmbedding;
  constructor(gen: Generator, tp: ProcessGroup) {
    super();
    this.word = this.registerModule(
      'word_embeddings',
      new VocabParallelEmbedding(PADDED, H, { tpGroup: tp, generator: gen, reduceScatterEmbeddings: SP }),
    );
  }
}

class Decoder extends Module {
  readonly layers: ModuleList<Layer>;
  readonly finalNorm: RMSNorm;
  constructor(gen: Generator, tp: ProcessGroup) {
    super();
    this.layers = this.registerModule(
      'layers',
      new ModuleList(Array.from({ length: LAYERS }, () => new Layer(gen, tp))),
    );
    this.finalNorm = this.registerModule('final_layernorm', new RMSNorm(H));
    if (SP) setSequenceParallelAttribute(this.finalNorm.weight);
  }
}

class TinyGpt extends Module {
  readonly embedding: Embedding;
  readonly decoder: Decoder;
  readonly output: ColumnParallelLinear;

  constructor(
    gen: Generator,
    private readonly tp: ProcessGroup,
  ) {
    super();
    this.embedding = this.registerModule('embedding', new Embedding(gen, tp));
    this.decoder = this.registerModule('decoder', new Decoder(gen, tp));
    this.output = this.registerModule(
      'output_layer',
      new ColumnParallelLinear(H, PADDED, { tpGroup: tp, generator: gen, bias: false, sequenceParallel: SP }),
    );
  }

  /** tokens [b, s], labels [b, s] -> mean loss over tokens. */
  forward(tokens: Tensor, labels: Tensor): Tensor {
    let x = this.embedding.word.forward(tokens);
    if (!SP) x = x.transpose(0, 1).contiguous(); // [s, b, h]
    for (const layer of this.decoder.layers) x = layer.forward(x);
    x = this.decoder.finalNorm.forward(x);
    const logits = this.output.forward(x).output; // [s, b, V/tp]
    const loss = vocabParallelCrossEntropy(logits, labels.transpose(0, 1).contiguous(), 0, {
      vocabSize: VOCAB,
      tpGroup: this.tp,
    });
    return loss.mean();
  }
}

function partitionOf(name: string): Partition {
  if (name.endsWith('linear_qkv.weight')) return 'qkv';
  if (name.endsWith('linear_fc1.weight')) return 'gate_up';
  if (name.endsWith('linear_proj.weight') || name.endsWith('linear_fc2.weight')) return 'split1';
  if (name.includes('word_embeddings') || name.startsWith('embedding') || name.startsWith('output_layer'))
    return 'split0';
  return 'replicate';
}

await initProcessGroup({ timeoutMs: 120_000 });
await initializeModelParallel({ tp: TP });
const tp = getTensorModelParallelGroup();
const dp = getDataParallelGroup(true);
const dpRank = getDataParallelRank(true);
const dpSize = getDataParallelWorldSize(true);

// Every rank draws the same full master weights in the same order, then keeps its shard.
const model = new TinyGpt(new Generator(1234), tp);
const ddp = new DistributedDataParallel(model, {
  dataParallelGroup: dp,
  useDistributedOptimizer: cfg.distOpt === true,
  bucketSize: cfg.bucketSize ?? 2000,
});
// after wrapping (the distributed optimizer moves parameters into its buffer): the norms' gradients
// are summed over TP in backward, before DDP reduces their bucket
if (SP) registerSequenceParallelGradHooks(model.parameters(), tp);
const optOptions = { lr: 3e-3, weightDecay: 0.1, clipGrad: 1.0, modelParallelGroup: tp, tpRank: tp.rank };
const opt = cfg.distOpt
  ? new DistributedOptimizer(ddp, optOptions)
  : new DataParallelOptimizer(ddp, optOptions);

// The global batch of every step, the same on every rank; DP rank d trains rows [d·b, (d+1)·b).
let seed = 99;
// mulberry32: a small deterministic stream of token ids, the same on every rank
const nextToken = (): number => {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) % VOCAB;
};
const perRank = GLOBAL_BATCH / dpSize;
const losses: number[] = [];
const gradNorms: number[] = [];
const liveBytes: number[] = [];
for (let step = 0; step < STEPS; step++) {
  const all = new Int32Array(GLOBAL_BATCH * (SEQ + 1));
  for (let i = 0; i < all.length; i++) all[i] = nextToken();
  const rows = all.subarray(dpRank * perRank * (SEQ + 1), (dpRank + 1) * perRank * (SEQ + 1));
  const loss = tidy(() => {
    const batch = fromTypedArray(rows, [perRank, SEQ + 1]).to('int64');
    const tokens = batch.narrow(1, 0, SEQ).contiguous();
    const labels = batch.narrow(1, 1, SEQ).contiguous();
    const l = ddp.forward(tokens, labels);
    l.backward();
    const value = l.detach().contiguous();
    return value;
  });
  ddp.finishGradSync();
  const r = opt.step();
  opt.zeroGrad();
  // the logged loss: the mean over the global batch (equal tokens per rank)
  dp.allReduce(loss, 'avg').waitSync();
  losses.push(loss.item());
  gradNorms.push(r.gradNorm);
  loss.dispose();
  liveBytes.push(memoryStats().liveBytes);
}

// Gather the full weights on DP rank 0 of each TP group.
const weights: Record<string, number[]> = {};
for (const [name, p] of model.namedParameters()) {
  const part = partitionOf(name);
  let full: Tensor;
  if (part === 'replicate' || tp.size === 1) {
    full = p.detach().contiguous();
  } else {
    const local = p.detach().contiguous();
    const parts = Array.from({ length: tp.size }, () => empty(local.shape, { dtype: local.dtype }));
    tp.allGather(parts, local).waitSync();
    full = gatherShards(parts, part, {
      tp: tp.size,
      qkvDims: { numHeads: HEADS, numQueryGroups: GROUPS, headDim: HEAD_DIM },
    });
  }
  weights[name] = Array.from(full.toTypedArray() as Float32Array);
}
if (Number(process.env.RANK) === 0) {
  // what this rank really held, so that a test cannot pass by running the whole model everywhere
  const layout = {
    tp: tp.size,
    dp: dpSize,
    localQkvRows: [...model.decoder.layers][0].qkv.weight?.shape[0],
    sequenceParallel: SP,
  };
  console.log(
    `RESULT ${JSON.stringify({ losses, gradNorms, weights, stats: ddp.lastSyncStats(), layout, liveBytes })}`,
  );
}
ddp.dispose();
destroyModelParallel();
await destroyProcessGroup();
