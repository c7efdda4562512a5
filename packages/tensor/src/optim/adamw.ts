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

  step(): void {
    // every gradient is checked before any parameter changes
    const live = this.paramGroups.map((group) => this.withGrads(group));
    this.paramGroups.forEach((group, i) => {
      this.stepGroup(group, live[i]);
    });
  }

  /** The group's parameters that have a gradient, after checking it against the parameter. */
  private withGrads(group: AdamWGroup): Tensor[] {
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
      live.push(p);
    }
    return live;
  }

  /** One update of `live` (parameters of `group` with checked gradients). */
  private stepGroup(group: AdamWGroup, live: Tensor[]): void {
    const [beta1, beta2] = group.betas;
    const scalars = (step: number): AdamWScalars => ({
      decay: 1 - group.lr * group.weightDecay,
      beta1,
      beta2,
      bc2Sqrt: Math.sqrt(1 - beta2 ** step),
      eps: group.eps,
      negStep: -(group.lr / (1 - beta1 ** step)),
    });
    // parameters that share a step count, dtypes and device: one multi-tensor call each
    const batches = new Map<string, { step: number; items: [Tensor, Tensor, AdamWState][] }>();
    for (const p of live) {
      const grad = p.grad as Tensor;
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
      const gradDtype = grad.dtype === p.dtype || grad.dtype === 'float32' ? grad.dtype : p.dtype;
      const direct = p.isContiguous && grad.isContiguous && grad.dtype === gradDtype;
      if (direct && this.useMulti(p)) {
        const key = `${st.step}|${p.device}|${p.dtype}|${grad.dtype}|${st.expAvg.dtype}`;
        const batch = batches.get(key) ?? { step: st.step, items: [] };
        batch.items.push([p, grad, st]);
        batches.set(key, batch);
        continue;
      }
      const kernel = kernelFor(p, 'adamwStep');
      const pd = dense(p);
      const gd = dense(grad, gradDtype);
      kernel(pd, gd, st.expAvg, st.expAvgSq, scalars(st.step));
      release(gd, grad, false);
      release(pd, p, true);
    }
    for (const { step, items } of batches.values()) {
      if (items.length === 1) {
        const [p, g, st] = items[0];
        kernelFor(p, 'adamwStep')(p, g, st.expAvg, st.expAvgSq, scalars(step));
        continue;
      }
      kernelFor(items[0][0], 'adamwStepMulti')(
        items.map((x) => x[0]),
        items.map((x) => x[1]),
        items.map((x) => x[2].expAvg),
        items.map((x) => x[2].expAvgSq),
        scalars(step),
      );
    }
  }

  /** Whether p's update may go through the multi-tensor kernel (see AdamWOptions.foreach). */
  private useMulti(p: Tensor): boolean {
    if (this.foreach !== undefined) return this.foreach;
    return hasNativeKernel(p.backend, 'adamwStepMulti');
  }
}
