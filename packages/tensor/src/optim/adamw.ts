// AdamW (Loshchilov & Hutter) with torch.optim.AdamW's semantics: decoupled weight decay
// (p *= 1 - lr * wd), bias-corrected moments, eps added after the square root. Each parameter is
// updated by one fused kernel pass that reads and writes param, grad and both moments; the
// parameters of a group that share a step count, dtypes and device go to the backend in one
// multi-tensor call, so that a GPU launches a kernel per few dozen tensors instead of per tensor.
import { hasNativeKernel } from '../backend/kernels.js';
import { TensorError } from '../errors.js';
import { keep } from '../scope.js';
import { sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';
import { type AdamWScalars, dense, kernelFor, release } from './kernels.js';
import { Optimizer, type ParamGroup, type ParamState, type ParamsInput } from './optimizer.js';

/** Hyperparameters of AdamW (torch defaults, except weightDecay = 0.01 as in torch.optim.AdamW). */
export interface AdamWOptions {
  lr?: number;
  betas?: [number, number];
  eps?: number;
  weightDecay?: number;
  /**
   * torch's `foreach`: true updates the parameters that share a step count, dtypes and device
   * with one multi-tensor kernel call (adamwStepMulti), false with one adamwStep call each;
   * unset, the multi-tensor kernel is used where the backend has its own (CUDA, CPU). The results
   * are bit-identical either way.
   */
  foreach?: boolean;
}

/** Options of one AdamW step. */
export interface AdamWStepOptions {
  /**
   * Each gradient is read multiplied by this, rounded to the gradient's dtype, as if it had been
   * scaled in place first (a gradient-clipping coefficient, folded into the update's pass); the
   * gradients themselves are left unchanged. A finite number; default 1.
   *
   * Or a float64 tensor of one element on the parameters' device: the scale computed there and not
   * read back (a clip coefficient from the device's gradient norm), so the step queues without
   * waiting for the device. A value that is not finite skips the update there (parameters,
   * moments and copies keep their values); the step counts this call advanced are then taken
   * back with {@link AdamW.revertStepCounts} once the caller has read the verdict. Parameters on
   * another device (an optimizer state offloaded to the host) get a copy of it, made once a step
   * (for the host: a read of the device).
   */
  gradScale?: number | Tensor;
  /**
   * Parameter -> copy: the update also writes each listed parameter's new value, rounded, into its
   * copy (float32 masters into their bfloat16 / float16 model weights), in the same pass.
   */
  paramCopies?: ReadonlyMap<Tensor, Tensor>;
}

/** A parameter group of AdamW. */
export interface AdamWGroup extends ParamGroup {
  betas: [number, number];
  eps: number;
}

/** AdamW's per-parameter state: the step count and the two moment estimates (fp32). */
export interface AdamWState extends ParamState {
  step: number;
  expAvg: Tensor;
  expAvgSq: Tensor;
}

/** torch.optim.AdamW: decoupled weight decay and bias correction, one fused pass per parameter, batched into multi-tensor kernel calls. */
export class AdamW extends Optimizer<AdamWGroup, AdamWState> {
  private readonly foreach: boolean | undefined;
  /** The states whose step count the last step() advanced (see revertStepCounts). */
  private lastStepped: AdamWState[] = [];

  constructor(params: ParamsInput<AdamWGroup>, options: AdamWOptions = {}) {
    super('AdamW', params, {
      lr: options.lr ?? 1e-3,
      betas: options.betas ?? [0.9, 0.999],
      eps: options.eps ?? 1e-8,
      weightDecay: options.weightDecay ?? 0.01,
    });
    this.foreach = options.foreach;
  }

  protected override validateGroup(group: AdamWGroup): void {
    super.validateGroup(group);
    const [b1, b2] = group.betas;
    if (!(b1 >= 0 && b1 < 1))
      throw new TensorError('INVALID_ARGUMENT', `AdamW: invalid beta1 ${b1}, expected [0, 1)`);
    if (!(b2 >= 0 && b2 < 1))
      throw new TensorError('INVALID_ARGUMENT', `AdamW: invalid beta2 ${b2}, expected [0, 1)`);
    if (!(group.eps >= 0)) throw new TensorError('INVALID_ARGUMENT', `AdamW: invalid eps ${group.eps}`);
  }

  step(options: AdamWStepOptions = {}): void {
    const gradScale = options.gradScale ?? 1;
    if (typeof gradScale === 'number' && !Number.isFinite(gradScale)) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `AdamW.step: gradScale must be a finite number, got ${gradScale}`,
      );
    }
    if (gradScale instanceof Tensor) {
      gradScale.checkAlive('AdamW.step');
      if (gradScale.dtype !== 'float64' || gradScale.numel !== 1) {
        throw new TensorError(
          'INVALID_ARGUMENT',
          `AdamW.step: a gradScale tensor must be float64 with one element, got ${gradScale.describe()}`,
        );
      }
    }
    const copies = options.paramCopies ?? null;
    // every gradient is checked before any parameter changes
    const live = this.paramGroups.map((group) => this.withGrads(group, copies));
    // the scale on every device that holds parameters: copies owned by this step
    const scales = new Map<string, Tensor>();
    try {
      if (gradScale instanceof Tensor) {
        scales.set(gradScale.device, gradScale);
        for (const p of live.flat()) {
          if (!scales.has(p.device)) scales.set(p.device, keep(gradScale.to(p.device)));
        }
      }
      this.lastStepped = [];
      this.paramGroups.forEach((group, i) => {
        this.stepGroup(group, live[i], gradScale, copies, scales);
      });
    } finally {
      for (const t of scales.values()) if (t !== gradScale) t.dispose();
    }
  }

  /**
   * Takes back the step counts that the last step() advanced: after a step with a gradScale tensor
   * that turned out not to be finite (the update was skipped on the device, which the caller
   * learns when it reads the scale or the norm it came from), so that the next step's bias
   * correction counts only the updates that happened. At most once per step().
   */
  revertStepCounts(): void {
    for (const st of this.lastStepped) st.step -= 1;
    this.lastStepped = [];
  }

  /** The group's parameters that have a gradient, after checking it (and a copy) against the parameter. */
  private withGrads(group: AdamWGroup, copies: ReadonlyMap<Tensor, Tensor> | null): Tensor[] {
    const live: Tensor[] = [];
    for (const p of group.params) {
      const grad = p.grad;
      if (!grad) continue;
      p.checkAlive('AdamW.step');
      grad.checkAlive('AdamW.step');
      if (!sameShape(grad.shape, p.shape)) {
        throw new TensorError(
          'SHAPE_MISMATCH',
          `AdamW.step: gradient ${grad.describe()} does not match ${p.describe()}`,
        );
      }
      const copy = copies?.get(p);
      if (copy) {
        copy.checkAlive('AdamW.step');
        if (!sameShape(copy.shape, p.shape) || copy.device !== p.device) {
          throw new TensorError(
            'SHAPE_MISMATCH',
            `AdamW.step: parameter copy ${copy.describe()} does not match ${p.describe()}`,
          );
        }
        if (p.dtype !== 'float32' || (copy.dtype !== 'bfloat16' && copy.dtype !== 'float16')) {
          throw new TensorError(
            'DTYPE_MISMATCH',
            `AdamW.step: a parameter copy is written from a float32 parameter into bfloat16 or float16, got ${p.dtype} into ${copy.dtype}`,
          );
        }
      }
      live.push(p);
    }
    return live;
  }

  /** One update of `live` (parameters of `group` with checked gradients). */
  private stepGroup(
    group: AdamWGroup,
    live: Tensor[],
    gradScale: number | Tensor,
    copies: ReadonlyMap<Tensor, Tensor> | null,
    scales: ReadonlyMap<string, Tensor>,
  ): void {
    const [beta1, beta2] = group.betas;
    const scalars = (step: number, device: string): AdamWScalars => ({
      decay: 1 - group.lr * group.weightDecay,
      beta1,
      beta2,
      bc2Sqrt: Math.sqrt(1 - beta2 ** step),
      eps: group.eps,
      negStep: -(group.lr / (1 - beta1 ** step)),
      ...(typeof gradScale === 'number' ? { gradScale } : { gradScaleTensor: scales.get(device) as Tensor }),
    });
    // parameters that share a step count, dtypes and device: one multi-tensor call each
    const batches = new Map<string, { step: number; items: [Tensor, Tensor, AdamWState, Tensor | null][] }>();
    for (const p of live) {
      const grad = p.grad as Tensor;
      const copy = copies?.get(p) ?? null;
      let st = this.state.get(p);
      if (!st) {
        const dtype = this.stateDtype(p);
        st = {
          step: 0,
          expAvg: keep(Tensor.empty(p.backend, p.shape, dtype, true)),
          expAvgSq: keep(Tensor.empty(p.backend, p.shape, dtype, true)),
        };
        this.state.set(p, st);
      }
      st.step += 1;
      this.lastStepped.push(st);
      const gradDtype = grad.dtype === p.dtype || grad.dtype === 'float32' ? grad.dtype : p.dtype;
      const direct =
        p.isContiguous && grad.isContiguous && grad.dtype === gradDtype && (!copy || copy.isContiguous);
      if (direct && this.useMulti(p)) {
        const key = `${st.step}|${p.device}|${p.dtype}|${grad.dtype}|${st.expAvg.dtype}|${copy?.dtype ?? '-'}`;
        const batch = batches.get(key) ?? { step: st.step, items: [] };
        batch.items.push([p, grad, st, copy]);
        batches.set(key, batch);
        continue;
      }
      const kernel = kernelFor(p, 'adamwStep');
      const pd = dense(p);
      const gd = dense(grad, gradDtype);
      const cd = copy ? dense(copy) : null;
      kernel(pd, gd, st.expAvg, st.expAvgSq, scalars(st.step, p.device), cd);
      if (cd && copy) release(cd, copy, true);
      release(gd, grad, false);
      release(pd, p, true);
    }
    for (const { step, items } of batches.values()) {
      if (items.length === 1) {
        const [p, g, st, copy] = items[0];
        kernelFor(p, 'adamwStep')(p, g, st.expAvg, st.expAvgSq, scalars(step, p.device), copy);
        continue;
      }
      const withCopies = items[0][3] !== null;
      kernelFor(items[0][0], 'adamwStepMulti')(
        items.map((x) => x[0]),
        items.map((x) => x[1]),
        items.map((x) => x[2].expAvg),
        items.map((x) => x[2].expAvgSq),
        scalars(step, items[0][0].device),
        withCopies ? items.map((x) => x[3] as Tensor) : null,
      );
    }
  }

  /** Whether p's update may go through the multi-tensor kernel (see AdamWOptions.foreach). */
  private useMulti(p: Tensor): boolean {
    if (this.foreach !== undefined) return this.foreach;
    return hasNativeKernel(p.backend, 'adamwStepMulti');
  }
}
