// One rank of test/pipeline.test.ts: loads this rank's pipeline stage of a fixture model, runs a
// few micro-batches through Megatron's 1F1B schedule of @megapatch/parallel with gptForwardStep,
// sums the shared embedding gradients over the embedding group, and compares the losses (last
// stage) and this stage's gradients by global name with the one-process model.
// argv[2]: PipelineWorkerConfig. Prints one `RESULT <json>` line.
import {
  allreduceEmbeddingGrads,
  destroyModelParallel,
  destroyProcessGroup,
  forwardBackwardPipeliningWithoutInterleaving,
  initializeModelParallel,
  initProcessGroup,
} from '@megapatch/parallel';
import { Generator, randint } from '@megapatch/tensor';
import { loadModel, logicalName } from '../../src/load.js';
import { type GPTMicrobatch, gptForwardStep } from '../../src/pipeline.js';
import { byLogicalName, compareNamed, type IdsBatch, oneProcessReference } from '../helpers/pipeline.js';

export interface PipelineWorkerConfig {
  /** HF folder of the model. */
  dir: string;
  id: string;
  layers: number;
  pp: number;
  microbatches: number;
  split?: { decoderFirstPipelineNumLayers?: number; decoderLastPipelineNumLayers?: number };
}

export interface PipelineRunResult {
  rank: number;
  layers: number[];
  /** Losses of the micro-batches (last stage). */
  losses: number[];
  /** Largest relative error of a loss against one process (last stage; 0 elsewhere). */
  lossError: number;
  grads: { max: number; worst: string; count: number };
  /** The shared embedding copy's gradient against one process (null when the stage has none). */
  sharedEmbeddingError: number | null;
  error?: string;
}

const cfg = JSON.parse(process.argv[2] ?? '{}') as PipelineWorkerConfig;
const world = await initProcessGroup({ timeoutMs: 60_000 });
await initializeModelParallel({ pp: cfg.pp, timeoutMs: 60_000 });
let result: PipelineRunResult;
try {
  result = await runOne();
} catch (e) {
  result = {
    rank: world.rank,
    layers: [],
    losses: [],
    lossError: Number.NaN,
    grads: { max: Number.NaN, worst: '', count: 0 },
    sharedEmbeddingError: null,
    error: String((e as Error).stack ?? e),
  };
}
console.log(`RESULT ${JSON.stringify(result)}`);
destroyModelParallel();
await destroyProcessGroup();

async function runOne(): Promise<PipelineRunResult> {
  const { model, config } = loadModel(cfg.dir, { ...cfg.split });
  const [b, s] = [2, 8];
  const g = new Generator(11); // every rank draws the same micro-batches
  const batches: IdsBatch[] = Array.from({ length: cfg.microbatches }, () => ({
    ids: randint(0, config.vocabSize, [b, s], { generator: g }),
    labels: randint(0, config.vocabSize, [b, s], { generator: g }),
  }));
  const data: GPTMicrobatch[] = batches.map(({ ids, labels }) => ({ tokens: ids, labels }));
  const reports = await forwardBackwardPipeliningWithoutInterleaving({
    forwardStepFunc: gptForwardStep(),
    dataIterator: data[Symbol.iterator](),
    model,
    numMicrobatches: cfg.microbatches,
    seqLength: s,
    microBatchSize: b,
    hiddenSize: config.hiddenSize,
    finalizeModelGradsFunc: () => allreduceEmbeddingGrads(model.sharedEmbeddingWeight()),
  });
  const ref = oneProcessReference(cfg.dir, batches);
  const losses = reports.map((r) => r.lmLoss);
  const lossError = losses.reduce((m, l, i) => Math.max(m, Math.abs(l - ref.losses[i]) / ref.losses[i]), 0);
  const grads = compareNamed(byLogicalName(model, 'grad'), ref.grads);
  const shared = model.sharedEmbeddingWeight();
  let sharedEmbeddingError: number | null = null;
  if (shared) {
    const name = [...model.namedParameters()].find(([, p]) => p === shared)?.[0] as string;
    const logical = logicalName(model, name);
    const got = new Map([[logical, Float64Array.from(shared.grad?.toTypedArray() as Float32Array)]]);
    sharedEmbeddingError = compareNamed(got, ref.grads).max;
  }
  const layers = [...model.decoder.layers].map((l) => l.layerNumber);
  model.dispose();
  return { rank: world.rank, layers, losses, lossError, grads, sharedEmbeddingError };
}
