// Optimizers over DistributedDataParallel's gradient buffers. DistributedOptimizer is Megatron's
// ZeRO-1 (optimizer/distrib_optimizer.py): each data-parallel rank owns an even 1/d shard of every
// bucket, keeps fp32 master weights and AdamW moments only for that shard, updates it from the
// reduce-scattered gradients, writes it into the parameter buffer and all-gathers the buckets.
// DataParallelOptimizer is the plain path with the same step: every rank updates every parameter
// from all-reduced gradients (Megatron's Float16OptimizerWithFloat16Params over DDP).
import {
  AdamW,
  type AdamWGroup,
  cat,
  full,
  type GradScaler,
  type GradScalerState,
  type GroupInput,
  keep,
  type Module,
  noGrad,
  type OptimizerStateDict,
  type ParamGroup,
  type Tensor,
  tidy,
  where,
} from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import {
  getExpertTensorModelPipelineParallelGroup,
  getExpertTensorParallelRank,
  getModelParallelGroup,
  getTensorModelParallelRank,
  modelParallelIsInitialized,
} from '../parallel-state.js';
import type { ProcessGroup } from '../process-group.js';
import {
  getTensorModelParallelAttributes,
  setTensorModelParallelAttributes,
} from '../tensor-parallel/attributes.js';
import { gradNormPowerSum } from './clip-grads.js';
import type { DistributedDataParallel } from './distributed-data-parallel.js';
import { flatView } from './param-and-grad-buffer.js';

/** Options of DistributedOptimizer and DataParallelOptimizer (AdamW with Megatron's defaults for the rest). */
export interface DistributedOptimizerOptions {
  lr?: number;
  /** Decoupled weight decay of matrices; biases and 1-D parameters (norms) get none (default 0.01). */
  weightDecay?: number;
  betas?: [number, number];
  eps?: number;
  /** Clip the gradients to this global L2 norm (0: no clipping; default 0). */
  clipGrad?: number;
  /** Ranks holding other pieces of the model, for the gradient norm (default the parallel state's tp-pp group when it is initialised; null: none). */
  modelParallelGroup?: ProcessGroup | null;
  /** This rank's tensor-parallel rank (default the parallel state's when the group comes from it, else 0). */
  tpRank?: number;
  /**
   * Ranks holding other experts or expert pieces (Megatron's expert tp-ep-pp group), for the norm
   * of the expert gradients (DDP's isExpertParameter buffers; default the parallel state's when
   * initialised, else none).
   */
  expertModelParallelGroup?: ProcessGroup | null;
  /**
   * Whether the model holds expert parameters on any rank. The expert norm is a collective over
   * the expert tp-ep-pp group, which spans pipeline stages, so a stage without MoE layers (dense
   * first layers) must still join it. Default: asked of that group once, at construction.
   */
  expertParameters?: boolean;
  /** This rank's expert-tensor-parallel rank (default the parallel state's, else 0). */
  expertTpRank?: number;
  /**
   * Parameters whose gradient another rank also holds and counts (the last pipeline stage's copy
   * of tied word embeddings): left out of the gradient norm, as Megatron's `param_is_not_shared`.
   */
  sharedParams?: readonly Tensor[];
  /** Receives the line logged when a step is skipped (default console.warn). */
  log?: (line: string) => void;
  /**
   * Loss scaling for fp16 (Megatron's DynamicGradScaler or a constant scale): the loss was
   * multiplied by `lossScaler.scale` before backward; each step unscales the gradients, skips the
   * step when any is inf or NaN and updates the scale. Null (default): no scaling (bf16, fp32).
   */
  lossScaler?: GradScaler | null;
  /**
   * Megatron --decoupled-lr / --decoupled-min-lr: the parameters `isParam` names (Megatron's
   * embedding and output-layer weights) go in groups of their own whose learning rate starts at
   * `lr` and whose schedule runs from `lr` to `minLr` (the group's maxLr and minLr, which
   * OptimizerParamScheduler reads). Null (default): one schedule for every parameter.
   */
  decoupledLr?: { lr: number; minLr: number; isParam: (name: string) => boolean } | null;
  /**
   * Megatron --optimizer-cpu-offload: the fp32 master weights and AdamW moments of (a share of) this
   * rank's pieces live in host memory and the update runs there; each step copies their gradients
   * to the host and the updated values back into the model's parameters (Megatron's hybrid-device
   * optimizer). The device keeps only the parameters and gradients of those pieces.
   */
  optimizerCpuOffload?: boolean;
  /**
   * Megatron --optimizer-offload-fraction: the share of this rank's elements offloaded (0 to 1,
   * default 1), taken in parameter order while the offloaded elements stay within it.
   */
  optimizerOffloadFraction?: number;
}

/** What one step did. */
export interface DistributedStepResult {
  /** The parameters were updated. */
  updated: boolean;
  /** Global L2 norm of the gradients before clipping. */
  gradNorm: number;
  /** The gradient norm was NaN or infinite, so nothing changed. */
  skipped: boolean;
}

/** A checkpoint of this rank's shard: the inner AdamW's state and the fp32 masters (own tensors, not copies). */
export interface DistributedOptimizerStateDict {
  dataParallelRank: number;
  dataParallelSize: number;
  optimizer: OptimizerStateDict | null;
  masters: Tensor[];
  /** The loss scaler's state (fp16), else null or absent. */
  gradScaler?: GradScalerState | null;
}

/** The part of one parameter this rank updates. */
interface ShardPiece {
  /** fp32 master values, 1-D: a copy, or for fp32 parameters a view of the model's own values. */
  master: Tensor;
  /** Where the master is written back after the step (the model's values); null when master is that view. */
  modelView: Tensor | null;
  /** The parameter this piece belongs to, and the piece's first element in it (row-major). */
  param: Tensor;
  paramOffset: number;
  /**
   * Offloaded pieces (master on the host): the gradient's view in DDP's buffer on the device (the
   * master's mainGrad, which the norm reads; its .grad is the host copy during a step); else null.
   */
  deviceGrad: Tensor | null;
  /** Where the gradient lives in DDP's buffer: the buffer's flat gradients and the first element. */
  gradAt: { data: Tensor; start: number };
  /** Where the model's values live in DDP's parameter buffer, when it has one (else null). */
  paramAt: { data: Tensor; start: number } | null;
}

/** Where one master piece sits in its parameter: what a checkpoint maps back to logical tensors. */
export interface MasterPiece {
  /** The model parameter. */
  param: Tensor;
  /** Its name in the model (DDP's namedParameters). */
  name: string;
  /** First element of the piece in the flattened parameter. */
  offset: number;
  /** The fp32 master values of the piece (1-D, `numel` elements). */
  master: Tensor;
}

/**
 * The most elements between two offloaded pieces' gradients that one read still spans (DDP pads
 * each parameter's slot to an alignment; a larger gap holds another piece's gradient).
 */
const RUN_GAP = 1024;

/** Pieces by their place in DDP's buffers (buffers in first-seen order, then offset); no place last. */
function inBufferOrder(
  pieces: readonly ShardPiece[],
  at: (p: ShardPiece) => { data: Tensor; start: number } | null,
): ShardPiece[] {
  const buffers = new Map<Tensor, number>();
  for (const p of pieces) {
    const a = at(p);
    if (a && !buffers.has(a.data)) buffers.set(a.data, buffers.size);
  }
  const key = (p: ShardPiece) => {
    const a = at(p);
    return a ? [buffers.get(a.data) as number, a.start] : [buffers.size, 0];
  };
  return [...pieces].sort((x, y) => {
    const [bx, sx] = key(x);
    const [by, sy] = key(y);
    return bx - by || sx - sy;
  });
}

function noWeightDecay(name: string, p: Tensor): boolean {
  // Megatron's default: no decay for biases and every 1-D parameter (norm weights)
  return p.ndim === 1 || name === 'bias' || name.endsWith('.bias');
}

type AnyDdp = DistributedDataParallel<Module & { forward: (...args: never[]) => unknown }>;

/**
 * AdamW's gradient scale for a step, from the global gradient norm (float64 [1]), on its device:
 * Megatron's clip coefficient min(1, clipGrad / (norm + 1e-6)) (1 without clipping), NaN when the
 * norm is not finite (the step is skipped). The host's clipCoefficient in the same float64
 * operations.
 */
function stepScale(norm: Tensor, clipGrad: number): Tensor {
  // finite: x - x is 0 (NaN for inf and NaN)
  const finite = norm.sub(norm).eq(0);
  const coef =
    clipGrad > 0
      ? full([1], clipGrad, { dtype: 'float64', device: norm.device }).div(norm.add(1e-6))
      : full([1], 1, { dtype: 'float64', device: norm.device });
  const clamped = clipGrad > 0 ? where(coef.lt(1), coef, 1) : coef;
  return where(finite, clamped, Number.NaN);
}

/**
 * True when `local` is true on any rank of `group` (a max all-reduce of a host flag through the
 * host's collectives, so that no device is waited for; no group: local).
 */
function anyRank(local: boolean, group: ProcessGroup | null): boolean {
  if (!group || group.size === 1) return local;
  const flag = full([1], local ? 1 : 0, { dtype: 'float32', device: 'cpu' });
  try {
    group.allReduce(flag, 'max').waitSync();
    return flag.item() > 0;
  } finally {
    flag.dispose();
  }
}

abstract class BufferOptimizer {
  readonly ddp: AnyDdp;
  readonly clipGrad: number;
  private readonly sharded: boolean;
  private readonly pieces: ShardPiece[] = [];
  /** null when this rank's shards hold only padding. */
  private readonly inner: AdamW | null;
  private readonly modelParallelGroup: ProcessGroup | null;
  private readonly tpRank: number;
  private readonly expertModelParallelGroup: ProcessGroup | null;
  private readonly expertTpRank: number;
  /** Pieces of expert parameters (their norm is reduced over the expert groups). */
  private readonly expertPieces = new Set<ShardPiece>();
  /** Some rank holds expert parameters: every rank joins the expert norm's collective. */
  private readonly hasExperts: boolean;
  private readonly sharedParams: ReadonlySet<Tensor>;
  private readonly log: (line: string) => void;
  private readonly name: string;
  /** The loss scaler (fp16), or null. */
  readonly lossScaler: GradScaler | null;
  /** modelCopies(), built on the first step. */
  private copies: Map<Tensor, Tensor> | null = null;
  /** A stepOnDevice() waits for its finishStep(). */
  private pendingFinish = false;

  protected constructor(name: string, ddp: AnyDdp, sharded: boolean, options: DistributedOptimizerOptions) {
    this.name = name;
    const fraction = options.optimizerCpuOffload ? (options.optimizerOffloadFraction ?? 1) : 0;
    if (!(fraction >= 0 && fraction <= 1)) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${name}: optimizerOffloadFraction must be from 0 to 1, got ${options.optimizerOffloadFraction}`,
      );
    }
    this.ddp = ddp;
    this.sharded = sharded;
    this.clipGrad = options.clipGrad ?? 0;
    const fromState = options.modelParallelGroup === undefined && modelParallelIsInitialized();
    this.modelParallelGroup = fromState ? getModelParallelGroup() : (options.modelParallelGroup ?? null);
    this.tpRank = options.tpRank ?? (fromState ? getTensorModelParallelRank() : 0);
    const expertFromState = options.expertModelParallelGroup === undefined && modelParallelIsInitialized();
    this.expertModelParallelGroup = expertFromState
      ? getExpertTensorModelPipelineParallelGroup()
      : (options.expertModelParallelGroup ?? null);
    this.expertTpRank = options.expertTpRank ?? (expertFromState ? getExpertTensorParallelRank() : 0);
    this.hasExperts =
      options.expertParameters ??
      anyRank(
        ddp.buffers.some((b) => ddp.isExpertBuffer(b)),
        this.expertModelParallelGroup,
      );
    this.log = options.log ?? ((line) => console.warn(line));
    this.lossScaler = options.lossScaler ?? null;
    this.sharedParams = new Set(options.sharedParams ?? []);
    const names = new Map(ddp.namedParameters().map(([n, p]) => [p, n]));
    const decay: Tensor[] = [];
    const noDecay: Tensor[] = [];
    // with a decoupled learning rate, the embedding and output weights' pieces apart
    const decoupled = options.decoupledLr ?? null;
    const decayDecoupled: Tensor[] = [];
    const noDecayDecoupled: Tensor[] = [];
    noGrad(() => {
      for (const buffer of ddp.buffers) {
        // each buffer is sharded over the group it is reduced over (dp, or expert-dp)
        const { size: dp, rank } = ddp.groupOfBuffer(buffer);
        const expert = ddp.isExpertBuffer(buffer);
        for (const bucket of buffer.buckets) {
          const shard = sharded ? bucket.numel / dp : bucket.numel;
          const lo = bucket.offset + (sharded ? rank * shard : 0);
          const hi = lo + shard;
          for (const p of bucket.params) {
            const slot = buffer.slotOf(p);
            const start = Math.max(lo, slot.start);
            const end = Math.min(hi, slot.end);
            if (end <= start) continue;
            const piece: ShardPiece = {
              ...this.makePiece(p, buffer.paramData, slot.start, start, end - start),
              param: p,
              paramOffset: start - slot.start,
              deviceGrad: null,
              gradAt: { data: buffer.gradData, start },
              paramAt: buffer.paramData ? { data: buffer.paramData, start } : null,
            };
            piece.master.grad = keep(flatView(buffer.gradData, start, [end - start]));
            const n = names.get(p) ?? p.name ?? '';
            piece.master.name = n;
            const a = getTensorModelParallelAttributes(p);
            setTensorModelParallelAttributes(
              piece.master,
              a.tensorModelParallel,
              a.partitionDim,
              a.partitionStride,
            );
            this.pieces.push(piece);
            if (expert) this.expertPieces.add(piece);
          }
        }
      }
      this.offload(fraction);
      for (const piece of this.pieces) {
        const n = piece.master.name ?? '';
        const apart = decoupled?.isParam(n) ?? false;
        if (noWeightDecay(n, piece.param)) (apart ? noDecayDecoupled : noDecay).push(piece.master);
        else (apart ? decayDecoupled : decay).push(piece.master);
      }
    });
    const groups: GroupInput<AdamWGroup>[] = [];
    if (decay.length) groups.push({ params: decay });
    if (noDecay.length) groups.push({ params: noDecay, weightDecay: 0, wdMult: 0 });
    if (decoupled) {
      const lr = { lr: decoupled.lr, maxLr: decoupled.lr, minLr: decoupled.minLr };
      if (decayDecoupled.length) groups.push({ params: decayDecoupled, ...lr });
      if (noDecayDecoupled.length)
        groups.push({ params: noDecayDecoupled, weightDecay: 0, wdMult: 0, ...lr });
    }
    this.inner = groups.length
      ? new AdamW(groups, {
          lr: options.lr,
          betas: options.betas,
          eps: options.eps,
          weightDecay: options.weightDecay,
        })
      : null;
  }

  /**
   * --optimizer-cpu-offload: moves the masters of the first pieces (in parameter order, while
   * their elements stay within the fraction of this rank's) to the host, freeing their device
   * copies; AdamW then keeps their moments there too.
   */
  private offload(fraction: number): void {
    if (fraction === 0) return;
    const total = this.pieces.reduce((n, p) => n + p.master.numel, 0);
    let moved = 0;
    for (const piece of this.pieces) {
      const m = piece.master;
      if (m.device === 'cpu' || moved + m.numel > fraction * total) continue;
      moved += m.numel;
      const host = keep(m.to({ device: 'cpu', dtype: 'float32' }));
      host.name = m.name;
      const a = getTensorModelParallelAttributes(m);
      setTensorModelParallelAttributes(host, a.tensorModelParallel, a.partitionDim, a.partitionStride);
      piece.deviceGrad = m.grad;
      host.mainGrad = m.grad;
      m.grad = null;
      // an fp32 parameter's master was the model's own values: they become where it is written back
      if (piece.modelView === null) piece.modelView = m;
      else m.dispose();
      piece.master = host;
    }
  }

  /** Pieces whose master lives on the host (--optimizer-cpu-offload). */
  private get offloaded(): ShardPiece[] {
    return this.pieces.filter((p) => p.deviceGrad !== null);
  }

  /**
   * Copies the offloaded pieces' gradients to the host as their masters' .grad: one read for each
   * run of pieces that follow each other in DDP's buffer (its alignment padding read along), not
   * one a piece.
   */
  private gradientsToHost(pieces: readonly ShardPiece[]): void {
    const offloaded = inBufferOrder(pieces, (p) => p.gradAt);
    let i = 0;
    while (i < offloaded.length) {
      const first = offloaded[i];
      let end = first.gradAt.start + first.master.numel;
      let j = i + 1;
      while (
        j < offloaded.length &&
        offloaded[j].gradAt.data === first.gradAt.data &&
        offloaded[j].gradAt.start >= end &&
        offloaded[j].gradAt.start - end <= RUN_GAP
      ) {
        end = offloaded[j].gradAt.start + offloaded[j].master.numel;
        j++;
      }
      const run = first.gradAt.data.narrow(0, first.gradAt.start, end - first.gradAt.start);
      const host = run.to('cpu');
      run.dispose();
      for (let k = i; k < j; k++) {
        const p = offloaded[k];
        p.master.grad = keep(host.narrow(0, p.gradAt.start - first.gradAt.start, p.master.numel));
      }
      host.dispose(); // the views hold its storage
      i = j;
    }
  }

  /**
   * Writes the offloaded pieces' masters into the model's values on the device: one upload for
   * each run of pieces side by side in DDP's parameter buffer, else one a piece.
   */
  private writeBack(pieces: readonly ShardPiece[]): void {
    const offloaded = inBufferOrder(pieces, (p) => p.paramAt);
    const upload = (host: Tensor, view: Tensor) => {
      const up = host.to(view.device, view.dtype);
      try {
        view.copy_(up);
      } finally {
        up.dispose();
      }
    };
    let i = 0;
    while (i < offloaded.length) {
      const first = offloaded[i];
      const at = first.paramAt;
      if (!at) {
        upload(first.master, first.modelView as Tensor);
        i++;
        continue;
      }
      let end = at.start + first.master.numel;
      let j = i + 1;
      while (
        j < offloaded.length &&
        offloaded[j].paramAt?.data === at.data &&
        offloaded[j].paramAt?.start === end
      ) {
        end += offloaded[j].master.numel;
        j++;
      }
      const run = j - i === 1 ? first.master : cat(offloaded.slice(i, j).map((p) => p.master));
      const view = at.data.narrow(0, at.start, end - at.start);
      try {
        upload(run, view);
      } finally {
        view.dispose();
        if (run !== first.master) run.dispose();
      }
      i = j;
    }
  }

  private makePiece(
    p: Tensor,
    paramData: Tensor | null,
    paramStart: number,
    start: number,
    n: number,
  ): Pick<ShardPiece, 'master' | 'modelView'> {
    // the model's values of this piece: in the parameter buffer, or (plain path) in the parameter itself
    let modelView: Tensor;
    if (paramData) modelView = flatView(paramData, start, [n]);
    else {
      const flat = p.view(-1);
      modelView = flatView(flat, start - paramStart, [n]);
      flat.dispose();
    }
    keep(modelView);
    // fp32 (and fp64) parameters are their own masters, as in Megatron
    if (p.dtype === 'float32' || p.dtype === 'float64') return { master: modelView, modelView: null };
    return { master: keep(modelView.to('float32')), modelView };
  }

  /** The inner AdamW's groups (what OptimizerParamScheduler updates); empty when this rank owns no elements. */
  get paramGroups(): ParamGroup[] {
    return this.inner?.paramGroups ?? [];
  }

  /** Elements of the parameters this rank updates. */
  get numLocalElements(): number {
    return this.pieces.reduce((n, p) => n + p.master.numel, 0);
  }

  /**
   * The pieces this rank updates, in masterParams order, with their parameter and offset: the
   * distributed optimizer's flat shards mapped back to parameter pieces (for checkpoints).
   */
  get masterPieces(): MasterPiece[] {
    return this.pieces.map((p) => ({
      param: p.param,
      name: p.master.name ?? '',
      offset: p.paramOffset,
      master: p.master,
    }));
  }

  /** The fp32 master pieces this rank updates (1-D, each with its gradient view as .grad). */
  get masterParams(): readonly Tensor[] {
    return this.pieces.map((p) => p.master);
  }

  /**
   * One step: finishes DDP's gradient sync if it is still pending, computes the global gradient
   * norm, skips the step when it is NaN or infinite, else runs AdamW on this rank's masters with the
   * clip coefficient of clipGrad folded in (the gradients are not scaled in place), writing the
   * 16-bit model values in the same pass, and (sharded) all-gathers the parameters. The same as
   * stepOnDevice(), a read of the norm, and finishStep().
   */
  step(): DistributedStepResult {
    const norm = this.stepOnDevice();
    let value: number;
    try {
      value = norm.item();
    } catch (e) {
      // a failed read (a queued check's error, say) leaves no step waiting to be finished
      this.pendingFinish = false;
      throw e;
    } finally {
      norm.dispose();
    }
    return this.finishStep(value);
  }

  /**
   * step() without a read: the norm, the clip coefficient and the skip decision stay on the device
   * (AdamW reads the coefficient there and writes nothing when it is not finite), so the update is
   * queued behind the backward without waiting for it. Returns the global gradient norm, a float64
   * [1] tensor on the gradients' device that the caller frees, to be read with the step's other
   * values (one wait) and passed to finishStep() before the next step.
   */
  stepOnDevice(): Tensor {
    if (this.pendingFinish) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${this.name}.stepOnDevice: the previous step is not finished; pass its gradient norm to finishStep() first`,
      );
    }
    this.ddp.finishGradSync();
    const masters = this.masterParams;
    const scaler = this.lossScaler;
    if (scaler && scaler.scale !== 1) {
      const inv = scaler.invScale;
      noGrad(() => {
        for (const m of masters) {
          // offloaded pieces: their gradients on the device (mainGrad), before they are copied
          const g = m.mainGrad ?? m.grad;
          if (!g) continue;
          const unscaled = g.mul(inv);
          g.copy_(unscaled);
          unscaled.dispose();
        }
      });
    }
    // one all-reduced norm over every piece: an inf or NaN anywhere makes it non-finite everywhere
    const norm = this.gradNormOnDevice();
    try {
      // Clipping and the copy into the model's 16-bit values ride on AdamW's pass (its gradient
      // scale, paramCopies): the same bits as scaling the gradients in place and copying
      // afterwards (which Megatron does in two more passes), without reading and writing them
      // twice more; the gradients keep their unclipped values. A norm that is not finite makes
      // the scale NaN: AdamW then changes nothing.
      const scale = noGrad(() => tidy(() => keep(stepScale(norm, this.clipGrad))));
      const offloaded = this.offloaded;
      try {
        // offloaded pieces: the gradients to the host, the update there (AdamW takes the scale
        // there, a read of the device), the new values back into the model's parameters
        noGrad(() => this.gradientsToHost(offloaded));
        this.inner?.step({ gradScale: scale, paramCopies: this.modelCopies() });
        noGrad(() => {
          this.writeBack(offloaded);
        });
      } finally {
        scale.dispose();
        for (const p of offloaded) {
          p.master.grad?.dispose();
          p.master.grad = null;
        }
      }
      // a skipped step gathers the unchanged parameters: the same values
      if (this.sharded) this.ddp.syncParams();
    } catch (e) {
      norm.dispose();
      throw e;
    }
    this.pendingFinish = true;
    return norm;
  }

  /**
   * The host's part of a stepOnDevice() once its gradient norm has been read: a norm that is not
   * finite means the device skipped the update, so AdamW's step counts are taken back (and the
   * skip logged, without a loss scaler); the loss scaler learns the verdict.
   */
  finishStep(gradNorm: number): DistributedStepResult {
    if (!this.pendingFinish) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${this.name}.finishStep: no step to finish; call stepOnDevice() first`,
      );
    }
    this.pendingFinish = false;
    const finite = Number.isFinite(gradNorm);
    this.lossScaler?.update(!finite);
    if (!finite) {
      this.inner?.revertStepCounts();
      if (!this.lossScaler) {
        this.log(`iteration skipped: gradient norm is ${Number.isNaN(gradNorm) ? 'nan' : 'inf'}`);
      }
      return { updated: false, gradNorm, skipped: true };
    }
    return { updated: true, gradNorm, skipped: false };
  }

  /**
   * The global L2 norm of the gradients as a float64 [1] tensor on their device: dense pieces
   * reduced over the model-parallel group (and dp when sharded), expert pieces over the expert
   * tp-ep-pp group (and expert-dp when sharded), combined as Megatron does, in float64 with the
   * host's operations (sqrt, then sqrt(dense² + expert²)).
   */
  private gradNormOnDevice(): Tensor {
    const dense = this.pieces
      .filter((p) => !this.expertPieces.has(p) && !this.sharedParams.has(p.param))
      .map((p) => p.master);
    const denseOptions = {
      modelParallelGroup: this.modelParallelGroup,
      dataParallelGroup: this.sharded ? this.ddp.dataParallelGroup : null,
      tpRank: this.tpRank,
    };
    const denseSum = gradNormPowerSum(dense, denseOptions);
    if (!this.hasExperts) {
      try {
        return noGrad(() => tidy(() => keep(denseSum.sqrt())));
      } finally {
        denseSum.dispose();
      }
    }
    const sums = [denseSum];
    try {
      sums.push(
        gradNormPowerSum(
          [...this.expertPieces].map((p) => p.master),
          {
            modelParallelGroup: this.expertModelParallelGroup,
            dataParallelGroup: this.sharded ? this.ddp.expertDataParallelGroup : null,
            tpRank: this.expertTpRank,
          },
        ),
      );
      return noGrad(() =>
        tidy(() => {
          const d = sums[0].sqrt();
          const e = sums[1].to(d.device).sqrt();
          return keep(d.mul(d).add(e.mul(e)).sqrt());
        }),
      );
    } finally {
      for (const t of sums) t.dispose();
    }
  }

  /** Master -> the model's values of its piece, for the pieces whose parameters are 16-bit. */
  private modelCopies(): Map<Tensor, Tensor> {
    if (!this.copies) {
      this.copies = new Map();
      for (const p of this.pieces)
        if (p.modelView && p.deviceGrad === null) this.copies.set(p.master, p.modelView);
    }
    return this.copies;
  }

  private copyMastersToModel(): void {
    noGrad(() => {
      for (const p of this.pieces) {
        if (!p.deviceGrad && p.modelView) p.modelView.copy_(p.master);
      }
      this.writeBack(this.offloaded);
    });
    if (this.sharded) this.ddp.syncParams();
  }

  /** Zeroes DDP's gradient buffers (the masters' gradients are views of them). */
  zeroGrad(): void {
    this.ddp.zeroGradBuffer();
  }

  /** This rank's state (see DistributedOptimizerStateDict); the gathered format comes with checkpointing. */
  stateDict(): DistributedOptimizerStateDict {
    return {
      dataParallelRank: this.ddp.dataParallelGroup.rank,
      dataParallelSize: this.ddp.dataParallelGroup.size,
      optimizer: this.inner ? this.inner.stateDict() : null,
      masters: [...this.masterParams],
      gradScaler: this.lossScaler ? this.lossScaler.stateDict() : null,
    };
  }

  /** Restores a stateDict() of the same layout (tensors are copied), writes the masters into the model and syncs the parameters. */
  loadStateDict(sd: DistributedOptimizerStateDict): void {
    const where = `${this.name}.loadStateDict`;
    const { rank, size } = this.ddp.dataParallelGroup;
    if (sd.dataParallelRank !== rank || sd.dataParallelSize !== size) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${where}: the checkpoint is data-parallel rank ${sd.dataParallelRank} of ${sd.dataParallelSize}, this is rank ${rank} of ${size}`,
      );
    }
    if (
      sd.masters.length !== this.pieces.length ||
      sd.masters.some((m, i) => m.numel !== this.pieces[i].master.numel)
    ) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `${where}: the checkpoint's ${sd.masters.length} master pieces do not match this rank's ${this.pieces.length} (another bucket size or model?)`,
      );
    }
    if (this.inner && sd.optimizer) this.inner.loadStateDict(sd.optimizer);
    if (this.lossScaler && sd.gradScaler) this.lossScaler.loadStateDict(sd.gradScaler);
    noGrad(() => {
      sd.masters.forEach((m, i) => {
        const own = this.pieces[i].master;
        if (m === own) return;
        // a master read on another device than its own (the host's, when offloaded)
        const src = m.device === own.device ? m : m.to(own.device);
        own.copy_(src);
        if (src !== m) src.dispose();
      });
    });
    this.copyMastersToModel();
  }

  /** Frees the masters, the moments and the gradient views (DDP and the model are left alone). */
  dispose(): void {
    this.inner?.dispose();
    for (const p of this.pieces) {
      p.master.grad?.dispose();
      p.master.grad = null;
      p.master.mainGrad = null;
      p.deviceGrad?.dispose();
      p.master.dispose();
      p.modelView?.dispose();
    }
    this.pieces.length = 0;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * Megatron's distributed optimizer (ZeRO-1) with AdamW, over a DistributedDataParallel built with
 * useDistributedOptimizer: fp32 masters and moments only for this rank's 1/d of each bucket, so
 * bf16 parameters with fp32 gradients cost 6 + 12/d bytes per parameter instead of 18.
 */
export class DistributedOptimizer extends BufferOptimizer {
  constructor(ddp: AnyDdp, options: DistributedOptimizerOptions = {}) {
    if (!ddp.useDistributedOptimizer) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        'DistributedOptimizer: build the DistributedDataParallel with { useDistributedOptimizer: true } (or use DataParallelOptimizer)',
      );
    }
    super('DistributedOptimizer', ddp, true, options);
  }
}

/**
 * The non-distributed path: AdamW on every parameter from DDP's all-reduced gradients, with fp32
 * masters for bf16/fp16 parameters (18 bytes per bf16 parameter with fp32 gradients).
 */
export class DataParallelOptimizer extends BufferOptimizer {
  constructor(ddp: AnyDdp, options: DistributedOptimizerOptions = {}) {
    if (ddp.useDistributedOptimizer) {
      throw new DistributedError(
        'INVALID_ARGUMENT',
        'DataParallelOptimizer: the DistributedDataParallel reduce-scatters (useDistributedOptimizer); use DistributedOptimizer',
      );
    }
    super('DataParallelOptimizer', ddp, false, options);
  }
}
