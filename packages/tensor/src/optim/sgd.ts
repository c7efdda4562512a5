// SGD with torch.optim.SGD's semantics: L2 weight decay added to the gradient, a momentum
// buffer that starts as the first gradient (dampening applies from the second step), and
// optional Nesterov momentum. One fused native pass per parameter.
import { TensorError } from '../errors.js';
import { keep } from '../scope.js';
import { sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';
import { dense, kernelFor, release } from './kernels.js';
import { Optimizer, type ParamGroup, type ParamState, type ParamsInput } from './optimizer.js';

/** Hyperparameters of SGD. */
export interface SGDOptions {
  lr?: number;
  momentum?: number;
  dampening?: number;
  nesterov?: boolean;
  weightDecay?: number;
}

/** A parameter group of SGD. */
export interface SGDGroup extends ParamGroup {
  momentum: number;
  dampening: number;
  nesterov: boolean;
}

/** SGD's per-parameter state: the momentum buffer (null until the first step with momentum). */
export interface SGDState extends ParamState {
  momentumBuffer: Tensor | null;
}

/** torch.optim.SGD: momentum, dampening, Nesterov and L2 weight decay. */
export class SGD extends Optimizer<SGDGroup, SGDState> {
  constructor(params: ParamsInput<SGDGroup>, options: SGDOptions = {}) {
    super('SGD', params, {
      lr: options.lr ?? 1e-3,
      momentum: options.momentum ?? 0,
      dampening: options.dampening ?? 0,
      nesterov: options.nesterov ?? false,
      weightDecay: options.weightDecay ?? 0,
    });
  }

  protected override validateGroup(group: SGDGroup): void {
    super.validateGroup(group);
    if (!(group.momentum >= 0))
      throw new TensorError('INVALID_ARGUMENT', `SGD: invalid momentum ${group.momentum}`);
    if (group.nesterov && (group.momentum <= 0 || group.dampening !== 0)) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        'SGD: Nesterov momentum requires a momentum and zero dampening',
      );
    }
  }

  step(): void {
    for (const group of this.paramGroups) {
      for (const p of group.params) {
        const grad = p.grad;
        if (!grad) continue;
        p.checkAlive('SGD.step');
        grad.checkAlive('SGD.step');
        if (!sameShape(grad.shape, p.shape)) {
          throw new TensorError(
            'SHAPE_MISMATCH',
            `SGD.step: gradient ${grad.describe()} does not match ${p.describe()}`,
          );
        }
        let st = this.state.get(p);
        if (!st) {
          st = { momentumBuffer: null };
          this.state.set(p, st);
        }
        const kernel = kernelFor(p, 'sgdStep');
        let buf: Tensor | null = null;
        const first = group.momentum !== 0 && !st.momentumBuffer;
        if (group.momentum !== 0) {
          // a new buffer's contents are written by the kernel (it starts as the gradient)
          buf = st.momentumBuffer ?? keep(Tensor.empty(p.backend, p.shape, this.stateDtype(p)));
        }
        const pd = dense(p);
        const gd = dense(grad, grad.dtype === p.dtype || grad.dtype === 'float32' ? grad.dtype : p.dtype);
        try {
          kernel(pd, gd, buf, {
            lr: group.lr,
            momentum: group.momentum,
            dampening: group.dampening,
            weightDecay: group.weightDecay,
            nesterov: group.nesterov,
            first,
          });
        } catch (e) {
          if (first) buf?.dispose();
          release(gd, grad, false);
          release(pd, p, false);
          throw e;
        }
        if (first) st.momentumBuffer = buf;
        release(gd, grad, false);
        release(pd, p, true);
      }
    }
  }
}
