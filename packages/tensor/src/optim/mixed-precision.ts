// Mixed-precision training after Megatron-LM's Float16OptimizerWithFloat16Params: bf16/fp16
// model parameters get fp32 master copies and fp32 gradient buffers (param.mainGrad, into which
// backward accumulates across micro-batches); the inner optimizer steps the masters, and the
// result is rounded back into the model parameters.
import { noGrad } from '../autograd/graph.js';
import type { Backend } from '../backend/backend.js';
import { TensorError } from '../errors.js';
import { keep, untrackTensor } from '../scope.js';
import { sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';
import { AdamW, type AdamWOptions } from './adamw.js';
import { clipTensorsWithNorm, getTotalNorm } from './clip-grad.js';
import type { GradScaler, GradScalerState } from './grad-scaler.js';
import { kernelFor } from './kernels.js';
import type { SchedulableOptimizer } from './lr-scheduler.js';
import {
  type Optimizer,
  type OptimizerStateDict,
  type ParamGroup,
  type ParamsInput,
  toParamGroups,
} from './optimizer.js';

/** Builds the inner optimizer over the fp32 master parameters (same group layout as given). */
export type InnerOptimizerFactory = (masterParams: ParamsInput) => Optimizer;

/** Options of MixedPrecisionOptimizer. */
export interface MixedPrecisionOptions {
  /** Loss scaling for fp16 (DynamicGradScaler / ConstantGradScaler); bf16 normally needs none. */
  lossScaler?: GradScaler | null;
  /** Clip the main gradients to this global L2 norm before the update (0 or absent: no clipping). */
  clipGrad?: number;
  /**
   * Without a loss scaler, still check the gradients for inf/NaN and skip such steps (default
   * true; Megatron skips only when it has a scaler).
   */
  skipNonFinite?: boolean;
}

/** What one step did: whether it was skipped, the gradient norm (when clipping) and the loss scale after it. */
export interface MixedPrecisionStepResult {
  skipped: boolean;
  gradNorm: number | null;
  lossScale: number;
}

/** Checkpoint of a MixedPrecisionOptimizer: inner optimizer, scaler, and the fp32 masters (own tensors, not copies). */
export interface MixedPrecisionStateDict {
  optimizer: OptimizerStateDict;
  gradScaler: GradScalerState | null;
  masters: Tensor[];
}

const LOW_PRECISION = new Set(['bfloat16', 'float16']);

/**
 * Megatron's Float16OptimizerWithFloat16Params: fp32 masters and main grads for bf16/fp16
 * parameters (fp32 parameters are their own masters). Each step unscales (with a loss scaler)
 * and checks the main grads for inf/NaN, skips the step if any (zeroing them), optionally clips,
 * steps the inner optimizer, copies the masters back into the model parameters, and zeroes the
 * main grads for the next accumulation.
 */
export class MixedPrecisionOptimizer implements SchedulableOptimizer {
  /** The inner optimizer, over the fp32 masters. */
  readonly optimizer: Optimizer;
  readonly lossScaler: GradScaler | null;
  readonly clipGrad: number;
  readonly skipNonFinite: boolean;
  private readonly params: Tensor[];
  private readonly masters: Tensor[];
  private readonly mainGrads: Tensor[];

  constructor(
    inner: InnerOptimizerFactory | AdamWOptions,
    params: ParamsInput,
    options: MixedPrecisionOptions = {},
  ) {
    this.lossScaler = options.lossScaler ?? null;
    this.clipGrad = options.clipGrad ?? 0;
    this.skipNonFinite = options.skipNonFinite ?? true;
    const groups = toParamGroups(params);
    this.params = groups.flatMap((g) => g.params as Tensor[]);
    if (this.params.length === 0)
      throw new TensorError('INVALID_ARGUMENT', 'MixedPrecisionOptimizer: got an empty parameter list');
    if (new Set(this.params).size !== this.params.length) {
      throw new TensorError('INVALID_ARGUMENT', 'MixedPrecisionOptimizer: a parameter is listed twice');
    }
    for (const p of this.params) {
      p.checkAlive('MixedPrecisionOptimizer');
      if (p.dtype !== 'float32' && !LOW_PRECISION.has(p.dtype)) {
        throw new TensorError(
          'DTYPE_MISMATCH',
          `MixedPrecisionOptimizer: parameters must be bfloat16, float16 or float32, got ${p.describe()}`,
        );
      }
      if (!p.requiresGrad || !p.isLeaf) {
        throw new TensorError(
          'INVALID_ARGUMENT',
          `MixedPrecisionOptimizer: parameter ${p.describe()} must be a leaf that requires grad`,
        );
      }
      if (p.mainGrad) {
        throw new TensorError(
          'INVALID_ARGUMENT',
          `MixedPrecisionOptimizer: parameter ${p.describe()} already has a mainGrad (another optimizer owns it)`,
        );
      }
    }
    this.masters = this.params.map((p) => {
      if (p.dtype === 'float32') return p;
      const m = keep(noGrad(() => p.to('float32')));
      m.name = p.name;
      return m;
    });
    this.mainGrads = this.params.map((p) => keep(Tensor.empty(p.backend, p.shape, 'float32', true)));
    this.params.forEach((p, i) => {
      p.mainGrad = this.mainGrads[i];
    });
    const toMaster = new Map(this.params.map((p, i) => [p, this.masters[i]]));
    const masterGroups = groups.map((g) => ({
      ...g,
      params: (g.params as Tensor[]).map((p) => toMaster.get(p)!),
    }));
    try {
      this.optimizer = typeof inner === 'function' ? inner(masterGroups) : new AdamW(masterGroups, inner);
    } catch (e) {
      // give the parameters back so that another optimizer can own them
      this.params.forEach((p, i) => {
        p.mainGrad = null;
        this.mainGrads[i].dispose();
        if (this.masters[i] !== p) this.masters[i].dispose();
      });
      throw e;
    }
  }

  /** The inner optimizer's groups (what a scheduler updates). */
  get paramGroups(): ParamGroup[] {
    return this.optimizer.paramGroups;
  }

  /** The fp32 master parameters, in parameter order. */
  get masterParams(): readonly Tensor[] {
    return this.masters;
  }

  /** The current loss scale (1 without a scaler). */
  get lossScale(): number {
    return this.lossScaler ? this.lossScaler.scale : 1;
  }

  /** loss * lossScale, to call backward on (a new tensor the caller owns). */
  scaleLoss(loss: Tensor): Tensor {
    return loss.mul(this.lossScale);
  }

  /** Zeroes the fp32 main gradients. */
  zeroGrad(): void {
    for (const g of this.mainGrads) if (g.numel > 0) g.backend.fill(g, 0);
  }

  /** One optimizer step; see the class comment. */
  step(): MixedPrecisionStepResult {
    for (const g of this.mainGrads) g.checkAlive('MixedPrecisionOptimizer.step');
    if (this.lossScaler || this.skipNonFinite) {
      const found = this.unscaleAndCheck(this.lossScaler ? this.lossScaler.invScale : 1);
      this.lossScaler?.update(found);
      if (found) {
        this.zeroGrad();
        return { skipped: true, gradNorm: null, lossScale: this.lossScale };
      }
    }
    let gradNorm: number | null = null;
    if (this.clipGrad > 0) {
      gradNorm = getTotalNorm(this.mainGrads, 2);
      clipTensorsWithNorm(this.mainGrads, this.clipGrad, gradNorm);
    }
    this.attachGrads();
    this.optimizer.step();
    this.copyMastersToParams();
    this.zeroGrad();
    return { skipped: false, gradNorm, lossScale: this.lossScale };
  }

  /**
   * Unscales every main grad in place and says whether any held inf or NaN: the kernels set one
   * float32 flag per device (no early exit: every tensor must be unscaled), and each flag is
   * read once, so a step synchronises once per device here rather than once per tensor.
   */
  private unscaleAndCheck(invScale: number): boolean {
    const flags = new Map<Backend, Tensor>();
    try {
      for (const g of this.mainGrads) {
        if (g.numel === 0) continue;
        const kernel = kernelFor(g, 'unscaleCheck');
        let flag = flags.get(g.backend);
        if (!flag) {
          flag = Tensor.empty(g.backend, [1], 'float32', true);
          untrackTensor(flag);
          flags.set(g.backend, flag);
        }
        kernel(g, invScale, flag);
      }
      let found = false;
      for (const flag of flags.values()) if (flag.item() !== 0) found = true;
      return found;
    } finally {
      for (const flag of flags.values()) flag.dispose();
    }
  }

  /** Points each master's .grad at its main grad (a view; the buffer stays this optimizer's). */
  private attachGrads(): void {
    this.masters.forEach((m, i) => {
      const g = this.mainGrads[i];
      if (m.grad && !m.grad.disposed && m.grad.storage === g.storage) return;
      m.grad?.dispose();
      m.grad = keep(g.viewAs(g.shape, g.strides, g.offset));
    });
  }

  private copyMastersToParams(): void {
    this.params.forEach((p, i) => {
      const m = this.masters[i];
      if (m !== p && p.numel > 0) p.backend.copy(p, m);
    });
  }

  /** A checkpoint; see MixedPrecisionStateDict. */
  stateDict(): MixedPrecisionStateDict {
    return {
      optimizer: this.optimizer.stateDict(),
      gradScaler: this.lossScaler ? this.lossScaler.stateDict() : null,
      masters: [...this.masters],
    };
  }

  /** Restores a checkpoint (tensors are copied) and rounds the masters into the model parameters. */
  loadStateDict(sd: MixedPrecisionStateDict): void {
    if (sd.masters.length !== this.masters.length) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `MixedPrecisionOptimizer.loadStateDict: checkpoint has ${sd.masters.length} master parameters, optimizer has ${this.masters.length}`,
      );
    }
    sd.masters.forEach((src, i) => {
      src.checkAlive('MixedPrecisionOptimizer.loadStateDict');
      if (!sameShape(src.shape, this.masters[i].shape)) {
        throw new TensorError(
          'SHAPE_MISMATCH',
          `MixedPrecisionOptimizer.loadStateDict: master ${i} has shape [${src.shape}] in the checkpoint, [${this.masters[i].shape}] here`,
        );
      }
    });
    this.optimizer.loadStateDict(sd.optimizer);
    if (this.lossScaler && sd.gradScaler) this.lossScaler.loadStateDict(sd.gradScaler);
    sd.masters.forEach((src, i) => {
      const m = this.masters[i];
      if (src !== m && m.numel > 0) m.backend.copy(m, src);
    });
    this.copyMastersToParams();
  }

  /** Frees masters, main grads and optimizer state, and clears param.mainGrad. */
  dispose(): void {
    this.optimizer.dispose();
    this.params.forEach((p, i) => {
      const m = this.masters[i];
      if (m.grad) {
        m.grad.dispose();
        m.grad = null;
      }
      if (m !== p) m.dispose();
      if (p.mainGrad === this.mainGrads[i]) p.mainGrad = null;
      this.mainGrads[i].dispose();
    });
  }
}
