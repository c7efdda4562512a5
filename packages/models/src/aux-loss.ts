// Megatron's MoEAuxLossAutoScaler: an auxiliary loss rides on an activation. The forward returns
// the activation unchanged; the backward passes its gradient through and gives the loss the
// gradient `scale`, so the loss is optimised by the main backward pass, recomputation included.
import { attachGrad, full, needsGrad, type Tensor } from '@megapatch/tensor';

/** x unchanged, with `loss` (a scalar) differentiated alongside it with gradient `scale`. */
export function attachAuxLoss(x: Tensor, loss: Tensor, scale: number): Tensor {
  if (!needsGrad(x, loss)) return x;
  // an owned view, as any op's output: tracked by tidy, freed with the scope that made it (an
  // untracked view kept x's storage alive after every step)
  const out = x.viewAs(x.shape, x.strides, x.offset);
  const dtype = loss.dtype;
  return attachGrad(out, 'MoEAuxLossAutoScaler', [x, loss], [], (g) => [g, full([], scale, { dtype })]);
}
