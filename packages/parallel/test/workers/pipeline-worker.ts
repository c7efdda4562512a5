// One rank of test/pipeline-multiprocess.test.ts: every rank is one stage of a single pipeline
// (pp = world size). For each case it trains a small stack, embedding → residual Linear+SiLU
// blocks → output layer (tied to the embedding or not), split into stages (and virtual stages),
// for a few SGD steps with several microbatches through Megatron's schedule, then runs one
// forward-only pass, and prints `RESULT <json>` with its losses, weights (by global name), the
// steps it ran and its live memory per step. Rank 0 also runs the same steps on the whole model
// in one process, with gradient accumulation over the same microbatches: the reference.
// With `jitter`, every rank sleeps a seeded random few ms before each send, receive and step.
import {
  crossEntropy,
  Embedding,
  Generator,
  Linear,
  Module,
  ModuleList,
  memoryStats,
  noGrad,
  randint,
  SGD,
  setNumThreads,
  type Tensor,
  tidy,
} from '@megapatch/tensor';
import { destroyProcessGroup, initProcessGroup } from '../../src/distributed.js';
import {
  destroyModelParallel,
  getEmbeddingGroup,
  getPipelineModelParallelGroup,
  initializeModelParallel,
} from '../../src/parallel-state.js';
import { allreduceEmbeddingGrads } from '../../src/pipeline/embedding-grads.js';
import { type DataIterator, getForwardBackwardFunc } from '../../src/pipeline/forward-backward.js';
import type { PipelineStep } from '../../src/pipeline/schedules.js';
import type { ProcessGroup, ReduceOp, Work } from '../../src/process-group.js';

export interface PipelineCase {
  name: string;
  /** Model chunks per rank (null: 1F1B). */
  vpp: number | null;
  numMicrobatches: number;
  groupSize?: number;
  layers: number;
  steps: number;
  tied: boolean;
  /** Seed of the random delays (none without it). */
  jitter?: number;
}

const DIMS = { vocab: 13, hidden: 8, seq: 4, microBatch: 2 };
const LR = 0.1;
const MOMENTUM = 0.9;

/** Residual blocks h + silu(W h + b); the first holds the embedding, the last the output layer. */
class Stage extends Module {
  readonly embedding: Embedding | null;
  readonly layers: ModuleList<Linear>;
  /** Tied: a copy of the embedding (logits = h Eᵀ); untied: its own [vocab, hidden] Linear. */
  readonly output: Embedding | Linear | null;
  constructor(
    readonly firstLayer: number,
    numLayers: number,
    pre: boolean,
    readonly isLast: boolean,
    readonly tied: boolean,
  ) {
    super();
    const { vocab, hidden } = DIMS;
    // Every parameter has its own seed, so any split of the stack starts from the same weights; a
    // tied output copy on another stage starts equal to the embedding, as Megatron's initial
    // embedding broadcast makes it.
    const emb = () => new Embedding(vocab, hidden, { generator: new Generator(1000) });
    this.embedding = pre ? this.registerModule('embedding', emb()) : null;
    const layers = Array.from(
      { length: numLayers },
      (_, j) => new Linear(hidden, hidden, { generator: new Generator(2000 + firstLayer + j) }),
    );
    this.layers = this.registerModule('layers', new ModuleList(layers));
    // one stage holding both ends uses the embedding itself
    this.output =
      isLast && !(pre && tied)
        ? this.registerModule(
            'output',
            tied ? emb() : new Linear(hidden, vocab, { bias: false, generator: new Generator(3000) }),
          )
        : null;
  }

  /** [seq, batch] token ids (first stage) or [seq, batch, hidden] → [seq, batch, hidden] or logits [seq, batch, vocab]. */
  forward(input: Tensor | null, tokens: Tensor): Tensor {
    let h = this.embedding ? this.embedding.forward(tokens) : input!;
    for (const layer of this.layers) h = h.add(layer.forward(h).silu());
    if (this.output instanceof Linear) return this.output.forward(h);
    const tiedWeight = this.output?.weight ?? (this.isLast && this.embedding ? this.embedding.weight : null);
    return tiedWeight ? h.matmul(tiedWeight.t()) : h;
  }

  /** Parameters under their names in the whole stack (a tied output copy is 'embedding.weight' too). */
  globalNamed(): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    if (this.embedding) out.push(['embedding.weight', this.embedding.weight]);
    let j = this.firstLayer;
    for (const l of this.layers) {
      out.push([`layers.${j}.weight`, l.weight], [`layers.${j}.bias`, l.bias!]);
      j++;
    }
    if (this.output) out.push([this.tied ? 'embedding.weight' : 'output.weight', this.output.weight]);
    return out;
  }

  /** The weight the first and last stage share (tied embeddings), on the stage that holds it. */
  sharedWeight(): Tensor | null {
    if (!this.tied) return null;
    return this.embedding?.weight ?? (this.output instanceof Embedding ? this.output.weight : null);
  }
}

interface Microbatch {
  tokens: Tensor;
  labels: Tensor;
}

/** The same microbatches on every rank: steps × numMicrobatches of [seq, batch] ids and labels. */
function makeData(steps: number, m: number): Microbatch[][] {
  const g = new Generator(77);
  const shape = [DIMS.seq, DIMS.microBatch];
  return Array.from({ length: steps }, () =>
    Array.from({ length: m }, () => ({
      tokens: randint(0, DIMS.vocab, shape, { generator: g }),
      labels: randint(0, DIMS.vocab, shape, { generator: g }),
    })),
  );
}

const lossOf = (logits: Tensor, labels: Tensor) =>
  crossEntropy(logits.reshape(-1, DIMS.vocab), labels.reshape(-1));

function weightsOf(named: [string, Tensor][]): Record<string, number[]> {
  return Object.fromEntries(
    named.map(([n, p]) => [n, Array.from(noGrad(() => p.toTypedArray()) as Float32Array)]),
  );
}

/** Seeded delays: a sleep that blocks this rank (the event loop too), as a slow process would. */
function jitterer(seed: number | undefined, rank: number): (() => void) | null {
  if (seed === undefined) return null;
  let s = (seed * 7919 + rank * 104729) >>> 0;
  const cell = new Int32Array(new SharedArrayBuffer(4));
  return () => {
    s = (Math.imul(s ^ (s >>> 15), 2246822519) + 0x6d2b79f5) >>> 0;
    Atomics.wait(cell, 0, 0, s % 6);
  };
}

/** The pipeline group, with a random delay before every send and receive is posted. */
class JitterGroup implements ProcessGroup {
  readonly backend: string;
  readonly name: string;
  readonly rank: number;
  readonly size: number;
  readonly ranks: readonly number[];
  readonly timeoutMs: number;
  constructor(
    private readonly inner: ProcessGroup,
    private readonly delay: () => void,
  ) {
    this.backend = inner.backend;
    this.name = inner.name;
    this.rank = inner.rank;
    this.size = inner.size;
    this.ranks = inner.ranks;
    this.timeoutMs = inner.timeoutMs;
  }
  send(t: Tensor, dst: number, tag?: number): Work {
    this.delay();
    return this.inner.send(t, dst, tag);
  }
  recv(t: Tensor, src: number, tag?: number): Work {
    this.delay();
    return this.inner.recv(t, src, tag);
  }
  allReduce(t: Tensor, op?: ReduceOp): Work {
    return this.inner.allReduce(t, op);
  }
  allGather(o: readonly Tensor[], i: Tensor): Work {
    return this.inner.allGather(o, i);
  }
  allGatherIntoTensor(o: Tensor, i: Tensor): Work {
    return this.inner.allGatherIntoTensor(o, i);
  }
  reduceScatter(o: Tensor, i: readonly Tensor[], op?: ReduceOp): Work {
    return this.inner.reduceScatter(o, i, op);
  }
  reduceScatterTensor(o: Tensor, i: Tensor, op?: ReduceOp): Work {
    return this.inner.reduceScatterTensor(o, i, op);
  }
  broadcast(t: Tensor, src: number): Work {
    return this.inner.broadcast(t, src);
  }
  allToAll(o: Tensor, i: Tensor, os?: readonly number[], is?: readonly number[]): Work {
    return this.inner.allToAll(o, i, os, is);
  }
  barrier(): Work {
    return this.inner.barrier();
  }
  destroy(): void {}
}

const stepName = (s: PipelineStep) => `${s.kind === 'forward' ? 'F' : 'B'}${s.microbatch}.${s.chunk}`;

async function runCase(c: PipelineCase, pp: ProcessGroup): Promise<Record<string, unknown>> {
  const { rank, size } = pp;
  const chunks = c.vpp ?? 1;
  const perStage = c.layers / (size * chunks);
  // Megatron's interleaved layout: chunk k of rank r is virtual stage k·pp + r
  const models = Array.from({ length: chunks }, (_, k) => {
    const stage = k * size + rank;
    return new Stage(stage * perStage, perStage, stage === 0, stage === size * chunks - 1, c.tied);
  });
  const named = models.flatMap((m) => m.globalNamed());
  const opt = new SGD(
    named.map(([, p]) => p),
    { lr: LR, momentum: MOMENTUM },
  );
  const delay = jitterer(c.jitter, rank);
  const group = delay ? new JitterGroup(pp, delay) : pp;
  const data = makeData(c.steps + 1, c.numMicrobatches);
  const forwardBackward = getForwardBackwardFunc(size, c.vpp);
  const order: string[][] = [];
  const losses: number[][] = [];
  const liveBytes: number[] = [];
  let noSyncCalls = 0;
  let finalized = 0;

  const run = async (batch: Microbatch[], forwardOnly: boolean, steps: string[]) => {
    const iterator = (): DataIterator<Microbatch> => batch[Symbol.iterator]();
    return forwardBackward<Stage, Microbatch, number>({
      forwardStepFunc: (it, model, ctx) => {
        const mb = it!.next().value as Microbatch;
        if (mb !== batch[ctx.microbatch])
          throw new Error(`chunk ${ctx.modelChunk} read the wrong microbatch`);
        const out = model.forward(ctx.inputTensor, mb.tokens);
        return [
          out,
          (o: Tensor) => {
            const l = lossOf(o, mb.labels);
            return [l, l.item()] as const;
          },
        ];
      },
      dataIterator: c.vpp === null ? iterator() : models.map(iterator),
      model: c.vpp === null ? models[0] : models,
      numMicrobatches: c.numMicrobatches,
      seqLength: DIMS.seq,
      microBatchSize: DIMS.microBatch,
      hiddenSize: DIMS.hidden,
      forwardOnly,
      ppGroup: group,
      microbatchGroupSizePerVpStage: c.groupSize,
      noSyncFunc: (fn) => {
        noSyncCalls++;
        return fn();
      },
      finalizeModelGradsFunc: (chunksOfModel) => {
        finalized++;
        // tied embeddings: the first stage's embedding and the last stage's output copy
        const shared = chunksOfModel.map((m) => m.sharedWeight()).find((w) => w) ?? null;
        allreduceEmbeddingGrads(shared, getEmbeddingGroup());
      },
      onStep: async (step) => {
        steps.push(stepName(step));
        delay?.();
      },
    });
  };

  for (let s = 0; s < c.steps; s++) {
    opt.zeroGrad();
    const steps: string[] = [];
    losses.push(await run(data[s], false, steps));
    order.push(steps);
    opt.step();
    liveBytes.push(memoryStats().liveBytes);
  }
  opt.zeroGrad();
  const evalLosses = await run(data[c.steps], true, []);

  const result: Record<string, unknown> = {
    case: c.name,
    rank,
    losses,
    evalLosses,
    order,
    liveBytes,
    noSyncCalls,
    finalized,
    weights: weightsOf(named),
  };
  if (rank === 0) result.reference = reference(c, data);
  opt.dispose();
  for (const m of models) m.dispose();
  for (const batch of data) {
    for (const mb of batch) {
      mb.tokens.dispose();
      mb.labels.dispose();
    }
  }
  return result;
}

/** One process, the whole stack, each microbatch's loss / numMicrobatches backpropagated in turn. */
function reference(c: PipelineCase, data: Microbatch[][]) {
  const model = new Stage(0, c.layers, true, true, c.tied);
  const named = model.globalNamed();
  const opt = new SGD(
    named.map(([, p]) => p),
    { lr: LR, momentum: MOMENTUM },
  );
  const m = c.numMicrobatches;
  const losses: number[][] = [];
  for (let s = 0; s < c.steps; s++) {
    opt.zeroGrad();
    losses.push(
      data[s].map((mb) =>
        tidy(() => {
          const l = lossOf(model.forward(null, mb.tokens), mb.labels);
          l.div(m).backward();
          return l.item();
        }),
      ),
    );
    opt.step();
  }
  const evalLosses = data[c.steps].map((mb) =>
    tidy(() => lossOf(model.forward(null, mb.tokens), mb.labels).item()),
  );
  const weights = weightsOf(named);
  opt.dispose();
  model.dispose();
  return { losses, evalLosses, weights };
}

const cases = JSON.parse(process.argv[2] ?? '[]') as PipelineCase[];
setNumThreads(1);
await initProcessGroup({ timeoutMs: 60_000 });
const world = await initializeModelParallel({
  pipelineModelParallelSize: Number(process.env.WORLD_SIZE),
}).then(() => getPipelineModelParallelGroup());
for (const c of cases) console.log(`RESULT ${JSON.stringify(await runCase(c, world))}`);
destroyModelParallel();
await destroyProcessGroup();
