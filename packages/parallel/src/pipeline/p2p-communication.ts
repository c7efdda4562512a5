// Megatron's P2PCommunicator (megatron/core/pipeline_parallel/p2p_communication.py): activations go
// to the next pipeline stage, their gradients to the previous one, over the pipeline group (ranks
// wrap around, so the last stage's next is the first, as the interleaved schedule needs).
//
// Every exchange posts its sends first and only then its receives. A send never blocks the caller
// (the Gloo group posts it at once and its completion is awaited later), so two neighbours that
// both send and receive in one exchange cannot wait on each other: what NCCL gets from
// batch_isend_irecv, Gloo gets from posted sends. Activations and gradients travel under two tags,
// so on a two-stage pipeline, where the previous and the next rank are the same process, a
// gradient can never be taken for an activation.
import { type DType, empty, getDefaultDevice, noGrad, type Tensor } from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import { batchIsendIrecv, type P2POp, type ProcessGroup, type Work } from '../process-group.js';

/** Tag of activations sent to the next stage. */
export const PIPELINE_FORWARD_TAG = 0x5f00;
/** Tag of activation gradients sent to the previous stage. */
export const PIPELINE_BACKWARD_TAG = 0x5f01;

export interface P2PCommunicatorOptions {
  /** The pipeline group: group rank i runs stage i. */
  ppGroup: ProcessGroup;
  /** Shape of every tensor exchanged: [seq (/ cp, / tp with sequence parallelism), microBatchSize, hidden]. */
  tensorShape: readonly number[];
  /** dtype of the exchanged tensors (Megatron's pipeline_dtype; default float32). */
  pipelineDtype?: DType;
  /** Device of the receive buffers (default: the default device, where the stage computes). */
  device?: string;
}

/** What one exchange received, and a promise that settles once it has all arrived. */
export interface ExchangeResult {
  /** The activation from the previous stage (when asked for), valid once `done` resolves. */
  tensorRecvPrev: Tensor | null;
  /** The gradient from the next stage (when asked for), valid once `done` resolves. */
  tensorRecvNext: Tensor | null;
  /** Resolves when every receive has landed; rejects with the group's DistributedError. */
  done: Promise<void>;
}

/** Point-to-point exchanges between adjacent pipeline stages, named as Megatron's. */
export class P2PCommunicator {
  readonly ppGroup: ProcessGroup;
  readonly tensorShape: readonly number[];
  readonly pipelineDtype: DType;
  readonly device: string;
  /** Group rank of the next stage ((rank + 1) mod size). */
  readonly nextRank: number;
  /** Group rank of the previous stage ((rank − 1) mod size). */
  readonly prevRank: number;
  private sends: Work[] = [];

  constructor(options: P2PCommunicatorOptions) {
    const { ppGroup, tensorShape } = options;
    if (!tensorShape.every((d) => Number.isInteger(d) && d > 0)) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `P2PCommunicator: tensorShape [${tensorShape.join(', ')}] must hold positive integers ([seqLength, microBatchSize, hiddenSize])`,
      );
    }
    this.ppGroup = ppGroup;
    this.tensorShape = [...tensorShape];
    this.pipelineDtype = options.pipelineDtype ?? 'float32';
    this.device = options.device ?? getDefaultDevice();
    this.nextRank = (ppGroup.rank + 1) % ppGroup.size;
    this.prevRank = (ppGroup.rank - 1 + ppGroup.size) % ppGroup.size;
  }

  get isPpFirstStage(): boolean {
    return this.ppGroup.rank === 0;
  }
  get isPpLastStage(): boolean {
    return this.ppGroup.rank === this.ppGroup.size - 1;
  }
  get totalStages(): number {
    return this.ppGroup.size;
  }
  get currentStage(): number {
    return this.ppGroup.rank;
  }

  private checkSend(what: string, t: Tensor): void {
    t.checkAlive(`P2PCommunicator: ${what}`);
    const same =
      t.shape.length === this.tensorShape.length && t.shape.every((d, i) => d === this.tensorShape[i]);
    if (!same || t.dtype !== this.pipelineDtype) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `P2PCommunicator: ${what} on pipeline stage ${this.ppGroup.rank} is ${t.describe()} but stages exchange ` +
          `[${this.tensorShape.join(', ')}] ${this.pipelineDtype} ([seqLength, microBatchSize, hiddenSize] in pipelineDtype); ` +
          'make every stage return that shape, or fix seqLength / microBatchSize / hiddenSize',
      );
    }
  }

  /** Forgets sends that have completed, so the list stays as short as the sends in flight. */
  private trimSends(): void {
    if (this.sends.length > 8) this.sends = this.sends.filter((w) => !w.isCompleted());
  }

  /**
   * Megatron's _communicate: sends `tensorSendNext` (an activation) to the next stage and
   * `tensorSendPrev` (a gradient) to the previous one, then receives from either side into new
   * tensors of `tensorShape` that the caller owns. The sends are not awaited here (see waitForSends).
   */
  communicate(options: {
    tensorSendNext?: Tensor | null;
    tensorSendPrev?: Tensor | null;
    recvPrev?: boolean;
    recvNext?: boolean;
  }): ExchangeResult {
    const { tensorSendNext, tensorSendPrev } = options;
    if (tensorSendNext) this.checkSend('the activation sent to the next stage', tensorSendNext);
    if (tensorSendPrev) this.checkSend('the gradient sent to the previous stage', tensorSendPrev);
    if ((tensorSendNext || tensorSendPrev || options.recvPrev || options.recvNext) && this.ppGroup.size < 2) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `P2PCommunicator: pipeline group '${this.ppGroup.name}' has one stage; there is no neighbour to exchange with`,
      );
    }
    // one batch (torch's batch_isend_irecv, Megatron's batch_p2p_comm): on NCCL the sends and
    // receives progress together, so neighbours that send to each other cannot block
    const ops: P2POp[] = [];
    const temps: Tensor[] = [];
    const owned: Tensor[] = [];
    // the group retains a send's storage until it completes (or orders it on the device stream),
    // so a temporary contiguous copy can go as soon as it is posted
    const sendOp = (t: Tensor, peer: number, tag: number) => {
      const data = t.isContiguous ? t : noGrad(() => t.contiguous());
      if (data !== t) temps.push(data);
      ops.push({ op: 'isend', tensor: data, peer, tag });
    };
    const recvOp = (peer: number, tag: number): Tensor => {
      const t = empty(this.tensorShape, { dtype: this.pipelineDtype, device: this.device });
      owned.push(t);
      ops.push({ op: 'irecv', tensor: t, peer, tag });
      return t;
    };
    if (tensorSendNext) sendOp(tensorSendNext, this.nextRank, PIPELINE_FORWARD_TAG);
    if (tensorSendPrev) sendOp(tensorSendPrev, this.prevRank, PIPELINE_BACKWARD_TAG);
    const tensorRecvPrev = options.recvPrev ? recvOp(this.prevRank, PIPELINE_FORWARD_TAG) : null;
    const tensorRecvNext = options.recvNext ? recvOp(this.nextRank, PIPELINE_BACKWARD_TAG) : null;
    let posted: Work[];
    try {
      posted = ops.length ? batchIsendIrecv(this.ppGroup, ops) : [];
    } catch (e) {
      for (const t of owned) t.dispose();
      throw e;
    } finally {
      for (const t of temps) t.dispose();
    }
    const works: Work[] = [];
    posted.forEach((w, i) => {
      if (ops[i].op === 'isend') this.sends.push(w);
      else works.push(w);
    });
    this.trimSends();
    const done = Promise.all(works.map((w) => w.wait())).then(() => undefined);
    // a failure is reported to whoever awaits `done`; an unobserved one must not crash the process
    done.catch(() => {});
    return { tensorRecvPrev, tensorRecvNext, done };
  }

  private async exchange(options: Parameters<P2PCommunicator['communicate']>[0]): Promise<ExchangeResult> {
    const r = this.communicate(options);
    try {
      await r.done;
    } catch (e) {
      r.tensorRecvPrev?.dispose();
      r.tensorRecvNext?.dispose();
      throw e;
    }
    return r;
  }

  /** Receives an activation from the previous stage (null on the first stage). */
  async recvForward(isFirstStage = this.isPpFirstStage): Promise<Tensor | null> {
    if (isFirstStage) return null;
    return (await this.exchange({ recvPrev: true })).tensorRecvPrev;
  }

  /** Receives a gradient from the next stage (null on the last stage). */
  async recvBackward(isLastStage = this.isPpLastStage): Promise<Tensor | null> {
    if (isLastStage) return null;
    return (await this.exchange({ recvNext: true })).tensorRecvNext;
  }

  /** Sends an activation to the next stage (nothing on the last stage). */
  sendForward(outputTensor: Tensor | null, isLastStage = this.isPpLastStage): void {
    if (!isLastStage && outputTensor) this.communicate({ tensorSendNext: outputTensor });
  }

  /** Sends a gradient to the previous stage (nothing on the first stage). */
  sendBackward(inputTensorGrad: Tensor | null, isFirstStage = this.isPpFirstStage): void {
    if (!isFirstStage && inputTensorGrad) this.communicate({ tensorSendPrev: inputTensorGrad });
  }

  /** Sends an activation to the next stage and receives the gradient for an earlier one from it. */
  async sendForwardRecvBackward(
    outputTensor: Tensor | null,
    isLastStage = this.isPpLastStage,
  ): Promise<Tensor | null> {
    if (isLastStage) return null;
    return (await this.exchange({ tensorSendNext: outputTensor, recvNext: true })).tensorRecvNext;
  }

  /** Sends a gradient to the previous stage and receives the next activation from it. */
  async sendBackwardRecvForward(
    inputTensorGrad: Tensor | null,
    isFirstStage = this.isPpFirstStage,
  ): Promise<Tensor | null> {
    if (isFirstStage) return null;
    return (await this.exchange({ tensorSendPrev: inputTensorGrad, recvPrev: true })).tensorRecvPrev;
  }

  /** Sends an activation to the next stage and, with `recvPrev`, receives one from the previous stage. */
  async sendForwardRecvForward(outputTensor: Tensor | null, recvPrev: boolean): Promise<Tensor | null> {
    return (await this.exchange({ tensorSendNext: outputTensor, recvPrev })).tensorRecvPrev;
  }

  /** Sends a gradient to the previous stage and, with `recvNext`, receives one from the next stage. */
  async sendBackwardRecvBackward(inputTensorGrad: Tensor | null, recvNext: boolean): Promise<Tensor | null> {
    return (await this.exchange({ tensorSendPrev: inputTensorGrad, recvNext })).tensorRecvNext;
  }

  /** Both directions at once: [activation from the previous stage, gradient from the next]. */
  async sendForwardBackwardRecvForwardBackward(
    outputTensor: Tensor | null,
    inputTensorGrad: Tensor | null,
    recvPrev: boolean,
    recvNext: boolean,
  ): Promise<[Tensor | null, Tensor | null]> {
    const r = await this.exchange({
      tensorSendNext: outputTensor,
      tensorSendPrev: inputTensorGrad,
      recvPrev,
      recvNext,
    });
    return [r.tensorRecvPrev, r.tensorRecvNext];
  }

  /** Waits until every send posted so far has been received (and reports a failed one). */
  async waitForSends(): Promise<void> {
    const sends = this.sends;
    this.sends = [];
    await Promise.all(sends.map((w) => w.wait()));
  }
}
