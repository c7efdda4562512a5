// AdamW (Loshchilov & Hutter) with torch.optim.AdamW's semantics: decoupled weight decay
// (p *= 1 - lr * wd), bias-corrected moments, eps added after the square root. Each parameter is
// updated by one fused kernel pass that reads and writes param, grad and both moments.
import { TensorError } from '../errors.js';
import { keep } from '../scope.js';
import { sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';
import { dense, kernelFor, release } from './kernels.js';
import { Optimizer, type ParamGroup, type ParamState, type ParamsInput } from './optimizer.js';

/** Hyperparameters of AdamW (torch defaults, except weightDecay = 0.01 as in torch.optim.AdamW). */
export interface AdamWOptions {
  lr?: number;
  betas?: [number, number];
  eps?: number;
  weightDecay?: number;
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

/** torch.optim.AdamW: decoupled weight decay and bias correction, one fused native pass per parameter. */
export class AdamW extends Optimizer<AdamWGroup, AdamWState> {
  constructor(params: ParamsInput<AdamWGroup>, options: AdamWOptions = {}) {
    super('AdamW', params, {
      lr: options.lr ?? 1e-3,
      betas: options.betas ?? [0.9, 0.999],
      eps: options.eps ?? 1e-8,
      weightDecay: options.weightDecay ?? 0.01,
    });
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
    for (const group of this.paramGroups) {
      const [beta1, beta2] = group.betas;
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
        const bc1 = 1 - beta1 ** st.step;
        const bc2 = 1 - beta2 ** st.step;
        const kernel = kernelFor(p, 'adamwStep');
        const pd = dense(p);
        const gd = dense(grad, grad.dtype === p.dtype || grad.dtype === 'float32' ? grad.dtype : p.dtype);
        kernel(pd, gd, st.expAvg, st.expAvgSq, {
          decay: 1 - group.lr * group.weightDecay,
          beta1,
          beta2,
          bc2Sqrt: Math.sqrt(bc2),
          eps: group.eps,
          negStep: -(group.lr / bc1),
        });
        release(gd, grad, false);
        release(pd, p, true);
      }
    }
  }
}
