// Gated activations of the GLU family (SwiGLU, GeGLU): out = act(gate) * up over the two halves of
// the last dimension, one fused kernel forward and one backward. The node saves only its input,
// where the composition chunk -> silu / gelu -> mul also keeps act(gate) alive for the backward.

import { attachGrad, needsGrad } from '../autograd/record.js';
import { GATED_ACTIVATION_CODES } from '../backend/abi.js';
import { defineCpuKernel, native, pack } from '../backend/cpu.js';
import { isFloating } from '../dtype.js';
import { argError, dtypeError, fmtShape, shapeError } from '../errors.js';
import type { Tensor } from '../tensor.js';
import { alloc, contiguousRaw, inputsBackend, kernelOf } from './util.js';

/**
 * The activation of the gate: silu (SwiGLU), gelu with erf (GeGLU) or gelu's tanh approximation
 * (GeGLU-tanh), each with the formula of the unary op (silu, gelu, gelu(x, 'tanh')).
 */
export type GatedActivation = 'swiglu' | 'geglu' | 'geglu-tanh';

// ---- kernels ----------------------------------------------------------------------------------

/**
 * out [..., f] = act(gate) * up with gate = x[..., :f] and up = x[..., f:] of x [..., 2f]; x and
 * out contiguous, one floating dtype. Computed in float32 for 16/32-bit floats (float64 for
 * float64) and rounded once.
 */
export type GatedActivationKernel = (out: Tensor, x: Tensor, activation: GatedActivation) => void;
/**
 * dx [..., 2f] = [g * up * act'(gate), g * act(gate)] from the upstream gradient g [..., f] and
 * the saved input x [..., 2f]; all contiguous in x's dtype, the same precision as the forward.
 */
export type GatedActivationBackwardKernel = (
  dx: Tensor,
  g: Tensor,
  x: Tensor,
  activation: GatedActivation,
) => void;

defineCpuKernel('gatedActivation', (out, x, activation) => {
  pack.begin().tensor(out).tensor(x).num(GATED_ACTIVATION_CODES[activation]);
  native.gatedActivationForward();
});

defineCpuKernel('gatedActivationBackward', (dx, g, x, activation) => {
  pack.begin().tensor(dx).tensor(g).tensor(x).num(GATED_ACTIVATION_CODES[activation]);
  native.gatedActivationBackward();
});

// ---- the op -----------------------------------------------------------------------------------

/**
 * act(gate) * up of x [..., 2f] with the gate first (gate = x[..., :f], up = x[..., f:]) ->
 * [..., f] in x's dtype: SwiGLU (silu), GeGLU (gelu, erf) or GeGLU-tanh (gelu, tanh approximation).
 * Equals `mul(act(gate), up)` of the unary ops, computed in float32 for 16-bit inputs (float64
 * for float64) and rounded once. One kernel each way; the backward saves only x.
 */
export function gatedActivation(x: Tensor, activation: GatedActivation): Tensor {
  const op = 'gatedActivation';
  const backend = inputsBackend(op, x);
  if (!isFloating(x.dtype)) throw dtypeError(op, `expected a floating-point input, got ${x.describe()}`);
  if (!Object.hasOwn(GATED_ACTIVATION_CODES, activation)) {
    throw argError(op, `activation must be 'swiglu', 'geglu' or 'geglu-tanh', got ${String(activation)}`);
  }
  const last = x.ndim === 0 ? 0 : x.shape[x.ndim - 1];
  if (x.ndim === 0 || last % 2 !== 0) {
    throw shapeError(
      op,
      `x must be [..., 2f] (gate and up halves of an even last dimension), got ${fmtShape(x.shape)}`,
    );
  }
  const f = last / 2;
  const shape = [...x.shape.slice(0, -1), f];
  const forward = kernelOf(backend, 'gatedActivation', op);
  const xc = contiguousRaw(x);
  const out = alloc(backend, shape, x.dtype);
  if (out.numel > 0) forward(out, xc, activation);
  if (needsGrad(x)) {
    const dtype = x.dtype;
    const xShape = x.shape;
    attachGrad(out, 'GatedActivationBackward', [x], [xc], (g, [xs]) => {
      const gc = contiguousRaw(g, dtype);
      const dx = alloc(xs.backend, xShape, dtype);
      try {
        if (dx.numel > 0) kernelOf(xs.backend, 'gatedActivationBackward', op)(dx, gc, xs, activation);
      } catch (e) {
        dx.dispose();
        throw e;
      } finally {
        gc.dispose();
      }
      return [dx];
    });
  }
  xc.dispose();
  return out;
}
