// Megatron's forward-backward functions (megatron/core/pipeline_parallel/schedules.py): run the
// forward and backward passes of every microbatch of one global batch on a model split into
// pipeline stages, following the plan of schedules.ts. The first stage reads its input from the
// data; the others receive activations; the last stage computes the loss; backward starts from
// the loss or from the gradient received from the next stage and sends the input's gradient back.
//
// Ownership: the schedule owns every tensor it receives and every output a forward step returns,
// and frees each as soon as the backward (or, with forwardOnly, the send) no longer needs it.
// forwardStepFunc and its loss function run inside a tidy() scope, so their temporaries go too.
import { type DType, type Tensor, tidy, zerosLike } from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import {
  getPipelineModelParallelGroup,
  getPipelineModelParallelWorldSize,
  getVirtualPipelineModelParallelWorldSize,
  modelParallelIsInitialized,
} from '../parallel-state.js';
import type { ProcessGroup } from '../process-group.js';
import { P2PCommunicator } from './p2p-communication.js';
import {
  type MicrobatchChunk,
  type PipelineExchange,
  type PipelineSchedule,
  type PipelineScheduleKind,
  type PipelineStep,
  pipelineSchedule,
  scheduleKind,
} from './schedules.js';

/** An iterator over microbatches, as Megatron's data_iterator (null on stages that read no data). */
export type DataIterator<D> = Iterator<D> | null;

/** What a forward step knows about the microbatch it runs. */
export interface ForwardStepContext {
  readonly microbatch: number;
  /** Model chunk (Megatron's vp_stage); 0 without interleaving. */
  readonly modelChunk: number;
  /**
   * The activation received from the previous stage, [seq, microBatch, hidden]; null on the first
   * stage, which reads its input from the data. Owned by the schedule: do not dispose it.
   */
  readonly inputTensor: Tensor | null;
  /** Whether this is the first virtual stage (rank 0, chunk 0): the one that reads the data. */
  readonly isFirstStage: boolean;
  /** Whether this is the last virtual stage: the one whose loss function runs. */
  readonly isLastStage: boolean;
  /** Whether this is the chunk's first microbatch of the batch. */
  readonly isFirstMicrobatch: boolean;
}

/**
 * Turns the last stage's output into the loss, as Megatron's loss_func: [loss, reduced] (the loss
 * is then averaged over the microbatches) or [loss, numTokens, reduced] (divided by numTokens
 * too, unless calculatePerTokenLoss). `reduced` (e.g. `{ lmLoss: loss.item() }`) is collected
 * per microbatch; any tensors in it belong to the caller.
 */
export type LossFunc<R> = (outputTensor: Tensor) => readonly [Tensor, R] | readonly [Tensor, number, R];

/**
 * Megatron's forward_step_func: reads the microbatch from `dataIterator` (where this stage needs
 * data), runs `model` on it (or on `context.inputTensor`), and returns the output tensor with the
 * loss function that the last stage applies to it (others may return null).
 */
export type ForwardStepFunc<M, D, R> = (
  dataIterator: DataIterator<D>,
  model: M,
  context: ForwardStepContext,
) => readonly [Tensor, LossFunc<R> | null | undefined];

/** The arguments of every forward-backward function (Megatron's, in camelCase). */
export interface ForwardBackwardArgs<M, D = unknown, R = unknown> {
  forwardStepFunc: ForwardStepFunc<M, D, R>;
  /** One iterator, or one per model chunk for the interleaved schedule. */
  dataIterator: DataIterator<D> | readonly DataIterator<D>[];
  /** This rank's model, or its chunks (virtual stages) for the interleaved schedule. */
  model: M | readonly M[];
  numMicrobatches: number;
  /** Sequence length of every microbatch (the first dimension of the exchanged activations). */
  seqLength: number;
  microBatchSize: number;
  /** Hidden size: the last dimension of the exchanged activations (Megatron's config.hidden_size). */
  hiddenSize: number;
  /** Forward passes only: no backward and no gradients (evaluation). */
  forwardOnly?: boolean;
  /** The pipeline group (default: the parallel state's). */
  ppGroup?: ProcessGroup;
  /** Interleaved schedule: microbatches per virtual stage before switching chunk (default the pipeline size). */
  microbatchGroupSizePerVpStage?: number;
  /** dtype of the exchanged activations and gradients (Megatron's pipeline_dtype; default float32). */
  pipelineDtype?: DType;
  /** Device of the receive buffers (default: the default device, where the stage computes). */
  device?: string;
  /** Context-parallel size: the sequence is split over it (default 1); [seq/cp, …] travel, and 2-element losses are scaled by it. */
  contextParallelSize?: number;
  /** With sequence parallelism the activations travel split over tensor-parallel ranks: [seq/cp/tp, …]. */
  sequenceParallel?: boolean;
  /** Tensor-parallel size, used with sequenceParallel (default 1). */
  tensorModelParallelSize?: number;
  /** The losses of [loss, numTokens, reduced] loss functions are not divided by numTokens (Megatron's calculate_per_token_loss). */
  calculatePerTokenLoss?: boolean;
  /** Applied to the loss before backward on the last stage (loss scaling for fp16). */
  gradScaleFunc?: (loss: Tensor) => Tensor;
  /**
   * Runs a backward with gradient synchronisation off, e.g. `(fn) => ddp.noSync(fn)`. Every
   * backward but the last microbatch's (of each chunk) runs inside it, as Megatron's no_sync_func.
   */
  noSyncFunc?: <T>(fn: () => T) => T;
  /** Called once after the last backward (not with forwardOnly): DP gradient sync, embedding all-reduce… */
  finalizeModelGradsFunc?: (model: readonly M[], numTokens: number | null) => void | Promise<void>;
  /** Called before each compute step (tracing, tests). */
  onStep?: (step: PipelineStep) => void | Promise<void>;
}

/** A forward-backward function: resolves with the `reduced` value of each microbatch on the last stage (empty elsewhere). */
export type ForwardBackwardFunc = <M, D = unknown, R = unknown>(
  args: ForwardBackwardArgs<M, D, R>,
) => Promise<R[]>;

/**
 * Megatron's backward_step: backward from the stage's output (from the loss, through
 * gradScaleFunc, when `outputTensorGrad` is null) and returns the gradient of `inputTensor`
 * (zeros when the stage did not use it; null when there is no input). The caller owns the result.
 */
export function backwardStep(
  inputTensor: Tensor | null,
  outputTensor: Tensor,
  outputTensorGrad: Tensor | null,
  gradScaleFunc?: (loss: Tensor) => Tensor,
): Tensor | null {
  tidy(() => {
    const out = !outputTensorGrad && gradScaleFunc ? gradScaleFunc(outputTensor) : outputTensor;
    // a stage whose output needs no gradient (nothing trainable upstream) has nothing to do
    if (out.requiresGrad) out.backward(outputTensorGrad ?? undefined);
  });
  if (!inputTensor) return null;
  const grad = inputTensor.grad;
  inputTensor.grad = null;
  // the previous stage waits for a gradient whatever happens here
  return grad ?? zerosLike(inputTensor);
}

const keyOf = (k: MicrobatchChunk) => `${k.microbatch}:${k.chunk}`;

function invalid(op: string, message: string): DistributedError {
  return new DistributedError('INVALID_ARGUMENT', `${op}: ${message}`);
}

function internal(op: string, what: string, k: MicrobatchChunk): DistributedError {
  return new DistributedError(
    'BACKEND',
    `${op}: no ${what} for microbatch ${k.microbatch} of chunk ${k.chunk}; the schedule is inconsistent (please report this)`,
  );
}

/** [seq/cp (/tp with sequence parallelism), microBatchSize, hidden], as Megatron's get_tensor_shapes. */
function tensorShapeOf(op: string, args: ForwardBackwardArgs<unknown, unknown, unknown>): number[] {
  const cp = args.contextParallelSize ?? 1;
  const tp = args.sequenceParallel ? (args.tensorModelParallelSize ?? 1) : 1;
  for (const [name, v] of [
    ['seqLength', args.seqLength],
    ['microBatchSize', args.microBatchSize],
    ['hiddenSize', args.hiddenSize],
    ['contextParallelSize', cp],
    ['tensorModelParallelSize', tp],
  ] as const) {
    if (!Number.isInteger(v) || v < 1) throw invalid(op, `${name} must be a positive integer, got ${v}`);
  }
  if (args.seqLength % (cp * tp) !== 0) {
    throw invalid(
      op,
      `seqLength ${args.seqLength} is not divisible by contextParallelSize ${cp}${args.sequenceParallel ? ` × tensorModelParallelSize ${tp} (sequence parallelism)` : ''}; pad the sequences`,
    );
  }
  return [args.seqLength / cp / tp, args.microBatchSize, args.hiddenSize];
}

/** The models and iterators of each chunk, checked against the schedule kind as Megatron does. */
function chunksOf<M, D>(
  op: string,
  kind: PipelineScheduleKind,
  model: M | readonly M[],
  dataIterator: DataIterator<D> | readonly DataIterator<D>[],
): { models: readonly M[]; iterators: readonly DataIterator<D>[] } {
  if (kind === 'interleaved') {
    if (!Array.isArray(model)) {
      throw invalid(
        op,
        'the interleaved schedule expects `model` to be the list of this rank’s model chunks',
      );
    }
    if (!Array.isArray(dataIterator) || dataIterator.length !== model.length) {
      throw invalid(
        op,
        `the interleaved schedule expects one data iterator per model chunk (${model.length}); pass a list`,
      );
    }
    return { models: model, iterators: dataIterator };
  }
  const models = Array.isArray(model) ? (model as readonly M[]) : [model as M];
  const iterators = Array.isArray(dataIterator)
    ? (dataIterator as readonly DataIterator<D>[])
    : [dataIterator as DataIterator<D>];
  const what =
    kind === 'no-pipelining' ? 'the schedule without pipelining' : 'the non-interleaved pipeline schedule';
  if (models.length !== 1 || iterators.length !== 1) {
    throw invalid(
      op,
      `${what} does not support model chunking (got ${models.length} chunks and ${iterators.length} iterators); pass one model, or use the interleaved schedule`,
    );
  }
  return { models, iterators };
}

async function runSchedule<M, D, R>(
  op: string,
  kind: PipelineScheduleKind,
  args: ForwardBackwardArgs<M, D, R>,
): Promise<R[]> {
  const { models, iterators } = chunksOf(op, kind, args.model, args.dataIterator);
  const forwardOnly = args.forwardOnly ?? false;
  let ppGroup: ProcessGroup | null = null;
  if (kind !== 'no-pipelining') {
    if (args.ppGroup) ppGroup = args.ppGroup;
    else if (modelParallelIsInitialized()) ppGroup = getPipelineModelParallelGroup();
    else {
      throw new DistributedError(
        'NOT_INITIALIZED',
        `${op}: no pipeline group; pass ppGroup or call initializeModelParallel() first`,
      );
    }
  }
  let schedule: PipelineSchedule;
  try {
    schedule = pipelineSchedule({
      pipelineParallelSize: ppGroup?.size ?? 1,
      pipelineParallelRank: ppGroup?.rank ?? 0,
      numMicrobatches: args.numMicrobatches,
      virtualPipelineParallelSize: kind === 'interleaved' ? models.length : null,
      microbatchGroupSizePerVpStage: kind === 'interleaved' ? args.microbatchGroupSizePerVpStage : undefined,
      forwardOnly,
    });
  } catch (e) {
    if (e instanceof DistributedError)
      throw new DistributedError(e.code, e.message.replace('pipelineSchedule', op));
    throw e;
  }
  const comm = ppGroup
    ? new P2PCommunicator({
        ppGroup,
        tensorShape: tensorShapeOf(op, args as ForwardBackwardArgs<unknown, unknown, unknown>),
        pipelineDtype: args.pipelineDtype,
        device: args.device,
      })
    : null;

  const m = schedule.numMicrobatches;
  const chunks = schedule.numModelChunks;
  const pp = schedule.pipelineParallelSize;
  const rank = schedule.pipelineParallelRank;
  const cp = args.contextParallelSize ?? 1;
  const isFirst = (chunk: number) => rank === 0 && chunk === 0;
  const isLast = (chunk: number) => rank === pp - 1 && chunk === chunks - 1;

  // live tensors by "microbatch:chunk"; whatever is left when a step fails is freed in `finally`
  const inputs = new Map<string, Tensor>();
  const outputs = new Map<string, Tensor>();
  const outputGrads = new Map<string, Tensor>();
  const inputGrads = new Map<string, Tensor>();
  const take = (map: Map<string, Tensor>, k: MicrobatchChunk, what: string): Tensor => {
    const t = map.get(keyOf(k));
    if (!t) throw internal(op, what, k);
    map.delete(keyOf(k));
    return t;
  };
  const forwardDataStore: R[] = [];
  let totalNumTokens = 0;
  const seen = new Set<number>();

  const forward = async (step: PipelineStep): Promise<void> => {
    const { microbatch, chunk } = step;
    const first = isFirst(chunk);
    const last = isLast(chunk);
    const input = first ? null : (inputs.get(keyOf(step)) ?? null);
    if (!first && !input) throw internal(op, 'received activation', step);
    await args.onStep?.(step);
    const model = models[chunk];
    const setInput = (model as { setInputTensor?: (t: Tensor | null) => void } | null)?.setInputTensor;
    if (typeof setInput === 'function') setInput.call(model, input);
    const context: ForwardStepContext = {
      microbatch,
      modelChunk: chunk,
      inputTensor: input,
      isFirstStage: first,
      isLastStage: last,
      isFirstMicrobatch: !seen.has(chunk),
    };
    seen.add(chunk);
    const result = tidy(() => {
      const [output, lossFunc] = args.forwardStepFunc(iterators[chunk], model, context);
      if (!last) return { output, reduced: undefined as R | undefined, numTokens: 0 };
      if (!lossFunc) {
        throw invalid(
          op,
          `forwardStepFunc returned no loss function on the last stage (microbatch ${microbatch}); return [output, lossFunc]`,
        );
      }
      const r = lossFunc(output);
      let loss = r[0];
      let numTokens = 0;
      if (r.length === 3) {
        numTokens = r[1];
        if (!args.calculatePerTokenLoss) loss = loss.div(Math.max(numTokens, 1)).div(m);
      } else {
        // Megatron's legacy averaging: over the microbatches, scaled by the context-parallel size
        if (cp !== 1) loss = loss.mul(cp);
        loss = loss.div(m);
      }
      return { output: loss, reduced: r[r.length - 1] as R, numTokens };
    });
    totalNumTokens += result.numTokens;
    if (last) forwardDataStore.push(result.reduced as R);
    if (forwardOnly) {
      if (input) {
        inputs.delete(keyOf(step));
        input.dispose();
      }
      if (last) {
        result.output.dispose();
        return;
      }
    }
    outputs.set(keyOf(step), result.output);
  };

  const backward = async (step: PipelineStep): Promise<void> => {
    const first = isFirst(step.chunk);
    const input = first ? null : take(inputs, step, 'received activation');
    const output = outputs.get(keyOf(step)) ?? null;
    const grad = isLast(step.chunk) ? null : (outputGrads.get(keyOf(step)) ?? null);
    try {
      if (!output) throw internal(op, 'forward output', step);
      if (!isLast(step.chunk) && !grad) throw internal(op, 'received gradient', step);
      await args.onStep?.(step);
      const run = () => backwardStep(input, output, grad, args.gradScaleFunc);
      const inputGrad = args.noSyncFunc && step.microbatch !== m - 1 ? args.noSyncFunc(run) : run();
      if (inputGrad) inputGrads.set(keyOf(step), inputGrad);
    } finally {
      outputs.delete(keyOf(step));
      outputGrads.delete(keyOf(step));
      output?.dispose();
      grad?.dispose();
      input?.dispose();
    }
  };

  const exchange = async (e: PipelineExchange): Promise<void> => {
    const sendNext = e.sendNext ? outputs.get(keyOf(e.sendNext)) : null;
    if (e.sendNext && !sendNext) throw internal(op, 'forward output to send', e.sendNext);
    const sendPrev = e.sendPrev ? take(inputGrads, e.sendPrev, 'input gradient to send') : null;
    let r: ReturnType<P2PCommunicator['communicate']>;
    try {
      r = comm!.communicate({
        tensorSendNext: sendNext,
        tensorSendPrev: sendPrev,
        recvPrev: e.recvPrev !== null,
        recvNext: e.recvNext !== null,
      });
    } finally {
      // a posted send keeps its storage alive until it completes
      sendPrev?.dispose();
    }
    if (forwardOnly && e.sendNext) {
      outputs.delete(keyOf(e.sendNext));
      sendNext!.dispose();
    }
    if (e.recvPrev) inputs.set(keyOf(e.recvPrev), r.tensorRecvPrev!);
    if (e.recvNext) outputGrads.set(keyOf(e.recvNext), r.tensorRecvNext!);
    await r.done;
    if (!forwardOnly && r.tensorRecvPrev) r.tensorRecvPrev.requiresGrad_();
  };

  try {
    for (const action of schedule.actions) {
      if (action.kind === 'exchange') await exchange(action);
      else if (action.kind === 'forward') await forward(action);
      else await backward(action);
    }
    await comm?.waitForSends();
  } finally {
    for (const map of [inputs, outputs, outputGrads, inputGrads]) {
      for (const t of map.values()) t.dispose();
      map.clear();
    }
  }
  if (!forwardOnly && args.finalizeModelGradsFunc) {
    await args.finalizeModelGradsFunc(models, args.calculatePerTokenLoss ? totalNumTokens : null);
  }
  return forwardDataStore;
}

/** Megatron's forward_backward_no_pipelining: forward and backward of each microbatch in turn, on one stage. */
export const forwardBackwardNoPipelining: ForwardBackwardFunc = (args) =>
  runSchedule('forwardBackwardNoPipelining', 'no-pipelining', args);

/** Megatron's forward_backward_pipelining_without_interleaving: 1F1B with pp − rank − 1 warm-up forwards. */
export const forwardBackwardPipeliningWithoutInterleaving: ForwardBackwardFunc = (args) =>
  runSchedule('forwardBackwardPipeliningWithoutInterleaving', '1f1b', args);

/** Megatron's forward_backward_pipelining_with_interleaving: interleaved 1F1B over the model chunks of `model`. */
export const forwardBackwardPipeliningWithInterleaving: ForwardBackwardFunc = (args) =>
  runSchedule('forwardBackwardPipeliningWithInterleaving', 'interleaved', args);

/**
 * Megatron's get_forward_backward_func: no pipelining for one stage, interleaving when a virtual
 * size is set, else 1F1B. Without arguments the sizes come from the parallel state (one stage
 * when it is not initialised); a given ppSize with no vpSize means no interleaving.
 */
export function getForwardBackwardFunc(ppSize?: number, vpSize?: number | null): ForwardBackwardFunc {
  let pp = ppSize;
  let vp = vpSize ?? null;
  if (pp === undefined) {
    const init = modelParallelIsInitialized();
    pp = init ? getPipelineModelParallelWorldSize() : 1;
    if (vpSize === undefined) vp = init ? getVirtualPipelineModelParallelWorldSize() : null;
  }
  const kind = scheduleKind(pp, vp);
  if (kind === 'interleaved') return forwardBackwardPipeliningWithInterleaving;
  if (kind === '1f1b') return forwardBackwardPipeliningWithoutInterleaving;
  return forwardBackwardNoPipelining;
}
