// The fused linear layer with an activation: out = act(x @ weight^T + bias) from one GEMM whose
// epilogue adds the bias and applies the activation in the accumulator before the output is
// rounded, and writes the pre-activation for the backward when one will run (so the backward does
// not recompute the GEMM). Backends with GEMM epilogues provide the kernel (CUDA: cuBLASLt's
// GELU_AUX_BIAS / RELU_BIAS epilogues or the tiled kernel's store); elsewhere, the CPU included,
// the op is the composition act(linear(x, weight, bias)) of the unfused ops, bit for bit.

import { attachGrad, needsGrad } from '../autograd/record.js';
import { LINEAR_ACTIVATION_CODES } from '../backend/abi.js';
import type { BinaryOp } from '../backend/backend.js';
import { isFloating } from '../dtype.js';
import { argError, dtypeError } from '../errors.js';
import { numel, viewStrides } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { gelu, relu } from './elementwise.js';
import { checkLinear, FUSED_DTYPES, linear, linearGrads } from './matmul.js';
import { alloc, contiguousRaw, inputsBackend } from './util.js';

/**
 * The activation after the linear layer, with the formula of the unary op: relu, gelu with erf
 * (`gelu(x)`) or gelu's tanh approximation (`gelu(x, 'tanh')`), as torch's F.relu, F.gelu and
 * F.gelu(approximate='tanh').
 */
export type LinearActivation = 'relu' | 'gelu' | 'gelu-tanh';

/**
 * out [M, N] = act(x [M, K] @ weight[N, K]^T + bias [N]) with a null bias adding nothing; preAct
 * [M, N] (null: not written) receives the pre-activation x @ weight^T + bias. out, preAct and
 * bias contiguous, x and weight any 2-D strides, one floating dtype for all. The product is
 * accumulated in float32 (float64 for float64), the bias added and the activation applied in that
 * type, and out and preAct are each rounded once to the dtype; K may be 0. A backend whose GEMM
 * has no epilogue for an activation may apply it to the pre-activation rounded to the dtype
 * instead (PyTorch's order, one rounding more): the CUDA backend does so for the erf GELU.
 */
export type LinearBiasActivationKernel = (
  out: Tensor,
  preAct: Tensor | null,
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  activation: LinearActivation,
) => void;

/** act(x) by the unary op. */
function activate(x: Tensor, activation: LinearActivation): Tensor {
  return activation === 'relu' ? relu(x) : gelu(x, activation === 'gelu-tanh' ? 'tanh' : 'none');
}

/** The core binary kernel of act's backward: (saved value, gradient) -> gradient of act's input. */
const BACKWARD_OP: Readonly<Record<LinearActivation, BinaryOp>> = {
  relu: 'reluBackward',
  gelu: 'geluBackward',
  'gelu-tanh': 'geluTanhBackward',
};

/**
 * act(x @ weight^T + bias) -> [..., out] for x [..., in], weight [out, in] and bias [out] or null,
 * as torch's act(F.linear(x, weight, bias)) with act F.relu, F.gelu or F.gelu(approximate='tanh').
 * Where the backend has its own linearBiasActivation kernel, one GEMM adds the bias and applies the
 * activation before the single rounding of the output (float32 accumulation for 16-bit data), and
 * the backward reuses the pre-activation the kernel kept (ReLU: the output) instead of recomputing
 * the GEMM; its weight and bias gradients come from one linearWeightBiasGrad kernel where there is
 * one. Elsewhere (the CPU) it is the composition of linear and the unary op, bit for bit.
 */
export function linearActivation(
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null | undefined,
  activation: LinearActivation,
): Tensor {
  const op = 'linearActivation';
  inputsBackend(op, x, weight, bias);
  if (!Object.hasOwn(LINEAR_ACTIVATION_CODES, activation)) {
    throw argError(op, `activation must be 'relu', 'gelu' or 'gelu-tanh', got ${String(activation)}`);
  }
  checkLinear(op, x, weight, bias);
  if (!isFloating(x.dtype)) throw dtypeError(op, `expected a floating-point input, got ${x.describe()}`);
  for (const [name, t] of [
    ['weight', weight],
    ['bias', bias],
  ] as const) {
    if (t && t.dtype !== x.dtype)
      throw dtypeError(op, `${name} is ${t.dtype} but x is ${x.dtype}; use one dtype`);
  }
  const fused = linearActivationFused(x, weight, bias ?? null, activation);
  if (fused) return fused;
  const y = linear(x, weight, bias);
  const out = activate(y, activation);
  y.dispose();
  return out;
}

/**
 * The fused path through the backend's own kernel; null where it does not apply: no such kernel
 * (getKernel's composition would be the unfused path again), mixed or non-float dtypes, leading
 * dimensions that do not flatten into rows without a copy, or a strided bias.
 */
function linearActivationFused(
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  activation: LinearActivation,
): Tensor | null {
  const backend = x.backend;
  const kernel = backend.kernel('linearBiasActivation');
  const dtype = x.dtype;
  if (!kernel || !FUSED_DTYPES.has(dtype) || weight.dtype !== dtype || (bias && bias.dtype !== dtype))
    return null;
  const [N, K] = weight.shape;
  if (bias && N > 1 && bias.strides[0] !== 1) return null;
  const lead = x.shape.slice(0, -1);
  const M = numel(lead);
  const xStrides = viewStrides(x.shape, x.strides, [M, K]);
  if (!xStrides) return null;
  const grad = needsGrad(x, weight, bias);
  // ReLU's backward reads its output (as relu's own does); GELU's reads the pre-activation
  const keepPre = grad && activation !== 'relu';
  const out = alloc(backend, [...lead, N], dtype);
  const pre = keepPre ? alloc(backend, [...lead, N], dtype) : null;
  if (out.numel > 0) {
    const x2 = x.viewAs([M, K], xStrides, x.offset);
    const out2 = out.viewAs([M, N], [N, 1], 0);
    const pre2 = pre ? pre.viewAs([M, N], [N, 1], 0) : null;
    try {
      kernel(out2, pre2, x2, weight, bias, activation);
    } catch (e) {
      out.dispose();
      pre?.dispose();
      throw e;
    } finally {
      x2.dispose();
      out2.dispose();
      pre2?.dispose();
    }
  }
  if (grad) {
    const rx = x.requiresGrad;
    const rw = weight.requiresGrad;
    const rb = bias?.requiresGrad ?? false;
    const xShape = x.shape;
    const save: Tensor[] = [pre ?? out];
    if (rw) save.push(x);
    if (rx) save.push(weight);
    const leaf = rw && weight.isLeaf ? weight : null;
    attachGrad(out, 'LinearActivationBackward', [x, weight, bias], save, (g, s) => {
      const xs = rw ? s[1] : null;
      const ws = rx ? s[rw ? 2 : 1] : null;
      const gPre = activationGrad(s[0], g, activation);
      try {
        return linearGrads(gPre, xShape, xs, ws, rb, leaf);
      } finally {
        gPre.dispose();
      }
    });
  }
  pre?.dispose(); // the node keeps its own reference
  return out;
}

/** g * act'(input) from the saved pre-activation (ReLU: the output) by the core backward kernel. */
function activationGrad(saved: Tensor, g: Tensor, activation: LinearActivation): Tensor {
  const gc = contiguousRaw(g, saved.dtype);
  const d = alloc(saved.backend, saved.shape, saved.dtype);
  try {
    if (d.numel > 0) saved.backend.binary(d, saved, gc, BACKWARD_OP[activation]);
  } catch (e) {
    d.dispose();
    throw e;
  } finally {
    gc.dispose();
  }
  return d;
}
