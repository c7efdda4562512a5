// Normalisation over trailing dimensions: RMSNorm and LayerNorm, each one fused kernel that
// computes the statistics in float32 (float64 for float64 input) and applies the weight and
// bias in the same pass, and one backward kernel that also reduces the weight / bias gradients.

import { addedToMainGrad } from '../autograd/engine.js';
import { attachGrad, needsGrad } from '../autograd/record.js';
import { defineCpuKernel, native, pack } from '../backend/cpu.js';
import { type DType, isFloating } from '../dtype.js';
import { argError, dtypeError, fmtShape, shapeError } from '../errors.js';
import { sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';
import { fusedMainGradOf } from './matmul.js';
import { alloc, contiguousRaw, inputsBackend, kernelOf } from './util.js';

/**
 * y = (x - mean) * rstd * weight + bias over rows of N elements (RMSNorm: center = false, no
 * mean, no bias). x, y contiguous [rows, N]; weight, bias [N] in x's dtype; mean and rstd
 * [rows] float32 (float64 for float64 x) are written for the backward.
 */
export type NormKernel = (
  y: Tensor,
  x: Tensor,
  weight: Tensor | null,
  bias: Tensor | null,
  mean: Tensor | null,
  rstd: Tensor,
  n: number,
  eps: number,
  center: boolean,
) => void;
/**
 * dx, and dweight / dbias when given (summed over rows), from the saved statistics. With
 * `accumulate`, dx (contiguous) already holds a gradient and receives dx + the input gradient
 * rounded to dx's dtype: the bits of writing the input gradient and adding it to dx afterwards.
 * With `paramsIntoMain`, dweight / dbias are the parameters' float32 main gradients (contiguous,
 * gradient-accumulation fusion) and the sums are added to them in float32 instead of being written
 * in x's dtype (on a backend without it in its own pass: written in x's dtype, then accumulated).
 */
export type NormBackwardKernel = (
  dx: Tensor,
  g: Tensor,
  x: Tensor,
  weight: Tensor | null,
  mean: Tensor | null,
  rstd: Tensor,
  dweight: Tensor | null,
  dbias: Tensor | null,
  n: number,
  center: boolean,
  accumulate?: boolean,
  paramsIntoMain?: boolean,
) => void;

function optional(t: Tensor | null): void {
  pack.num(t ? 1 : 0);
  if (t) pack.tensor(t);
}

defineCpuKernel('normRows', (y, x, weight, bias, mean, rstd, n, eps, center) => {
  pack.begin().tensor(y).tensor(x);
  optional(weight);
  optional(bias);
  optional(mean);
  pack
    .tensor(rstd)
    .num(n)
    .num(eps)
    .num(center ? 1 : 0);
  native.normForward();
});

defineCpuKernel(
  'normRowsBackward',
  (dx, g, x, weight, mean, rstd, dweight, dbias, n, center, accumulate, paramsIntoMain) => {
    // accumulate: the gradient into a temporary, then added to dx (the engine's add, in place);
    // paramsIntoMain: the parameter gradients into temporaries of x's dtype, then accumulated
    const out = accumulate ? Tensor.empty(dx.backend, dx.shape, dx.dtype) : dx;
    const dw = dweight && paramsIntoMain ? Tensor.empty(x.backend, dweight.shape, x.dtype) : dweight;
    const db = dbias && paramsIntoMain ? Tensor.empty(x.backend, dbias.shape, x.dtype) : dbias;
    try {
      pack.begin().tensor(out).tensor(g).tensor(x);
      optional(weight);
      optional(mean);
      pack.tensor(rstd);
      optional(dw);
      optional(db);
      pack.num(n).num(center ? 1 : 0);
      native.normBackward();
      if (accumulate) dx.backend.binary(dx, dx, out, 'add');
      if (paramsIntoMain) accumulateParams([dweight, dbias], [dw, db]);
    } finally {
      if (out !== dx) out.dispose();
      if (dw !== dweight) dw?.dispose();
      if (db !== dbias) db?.dispose();
    }
  },
);

/** main += grad (cast to main's dtype) for each pair: the accumulateGrad kernel. */
function accumulateParams(mains: readonly (Tensor | null)[], grads: readonly (Tensor | null)[]): void {
  mains.forEach((m, i) => {
    const g = grads[i];
    if (m && g) kernelOf(m.backend, 'accumulateGrad', 'normBackward')(m, g);
  });
}

function checkParam(op: string, name: string, p: Tensor | null, x: Tensor, shape: readonly number[]): void {
  if (!p) return;
  if (!sameShape(p.shape, shape)) {
    throw shapeError(op, `${name} ${fmtShape(p.shape)} does not match normalizedShape ${fmtShape(shape)}`);
  }
  if (p.dtype !== x.dtype)
    throw dtypeError(op, `${name} dtype ${p.dtype} does not match input dtype ${x.dtype}`);
}

function normOp(
  op: 'rmsNorm' | 'layerNorm',
  x: Tensor,
  normalizedShape: number | readonly number[],
  weight: Tensor | null,
  bias: Tensor | null,
  eps: number,
): Tensor {
  const backend = inputsBackend(op, x, weight, bias);
  const center = op === 'layerNorm';
  const shape = typeof normalizedShape === 'number' ? [normalizedShape] : [...normalizedShape];
  if (!isFloating(x.dtype)) throw dtypeError(op, `expected a floating-point input, got ${x.describe()}`);
  if (shape.length === 0 || shape.some((s) => !Number.isInteger(s) || s < 0)) {
    throw argError(op, `normalizedShape must be a non-empty list of sizes, got ${fmtShape(shape)}`);
  }
  const lead = x.ndim - shape.length;
  if (lead < 0 || !sameShape(x.shape.slice(lead), shape)) {
    throw shapeError(op, `input ${fmtShape(x.shape)} does not end with normalizedShape ${fmtShape(shape)}`);
  }
  checkParam(op, 'weight', weight, x, shape);
  checkParam(op, 'bias', bias, x, shape);
  if (!(eps >= 0) || !Number.isFinite(eps))
    throw argError(op, `eps must be a finite number >= 0, got ${eps}`);

  const n = shape.reduce((a, b) => a * b, 1);
  const rows = n === 0 ? 0 : x.numel / n;
  const statDtype: DType = x.dtype === 'float64' ? 'float64' : 'float32';
  const forward = kernelOf(backend, 'normRows', op);
  const xc = contiguousRaw(x);
  const wc = weight ? contiguousRaw(weight) : null;
  const bc = bias ? contiguousRaw(bias) : null;
  const mean = center ? alloc(backend, [rows], statDtype) : null;
  const rstd = alloc(backend, [rows], statDtype);
  const y = alloc(backend, x.shape, x.dtype);
  if (n > 0) forward(y, xc, wc, bc, mean, rstd, n, eps, center);
  bc?.dispose();

  if (needsGrad(x, weight, bias)) {
    const dtype = x.dtype;
    const xShape = x.shape;
    const wantX = x.requiresGrad;
    const wantW = weight?.requiresGrad ?? false;
    const wantB = bias?.requiresGrad ?? false;
    const save = [xc, rstd];
    if (mean) save.push(mean);
    if (wc) save.push(wc);
    attachGrad(
      y,
      center ? 'LayerNormBackward' : 'RmsNormBackward',
      [x, weight, bias],
      save,
      (g, saved, pending) => {
        const [xs, rs] = saved;
        const ms = mean ? saved[2] : null;
        const ws = wc ? saved[mean ? 3 : 2] : null;
        const gc = contiguousRaw(g, dtype);
        // the gradient waiting for x from its other uses (a residual stream's): added into in place
        const waiting = pending?.[0];
        const into =
          wantX &&
          n > 0 &&
          waiting &&
          waiting.dtype === dtype &&
          sameShape(waiting.shape, xShape) &&
          waiting.isContiguous
            ? waiting
            : null;
        const dx = into ?? alloc(xs.backend, xShape, dtype);
        // gradient-accumulation fusion: the weight (and bias) gradients added into their float32
        // main gradients by the kernel, where every wanted one has one
        const mainW = wantW && weight ? fusedMainGradOf(weight) : null;
        const mainB = wantB && bias ? fusedMainGradOf(bias) : null;
        const intoMain =
          n > 0 && (wantW || wantB) && (!wantW || mainW !== null) && (!wantB || mainB !== null);
        const dw = wantW ? (intoMain ? mainW : alloc(xs.backend, shape, dtype, n === 0)) : null;
        const db = wantB ? (intoMain ? mainB : alloc(xs.backend, shape, dtype, n === 0)) : null;
        if (n > 0)
          kernelOf(xs.backend, 'normRowsBackward', op)(
            dx,
            gc,
            xs,
            ws,
            ms,
            rs,
            dw,
            db,
            n,
            center,
            into !== null,
            intoMain,
          );
        gc.dispose();
        if (!wantX) dx.dispose();
        if (intoMain)
          return [
            wantX ? dx : null,
            wantW && weight ? addedToMainGrad(weight) : null,
            wantB && bias ? addedToMainGrad(bias) : null,
          ];
        return [wantX ? dx : null, dw, db];
      },
    );
  }
  xc.dispose();
  wc?.dispose();
  mean?.dispose();
  rstd.dispose();
  return y;
}

/**
 * Root-mean-square normalisation over the trailing `normalizedShape` dimensions (torch 2.4
 * rms_norm): x [..., *normalizedShape] -> same shape and dtype, y = x / sqrt(mean(x^2) + eps) *
 * weight. The default eps is 1e-6, as in Llama configurations (torch defaults to the dtype's
 * machine epsilon); pass the model's value.
 */
export function rmsNorm(
  x: Tensor,
  normalizedShape: number | readonly number[],
  weight: Tensor | null = null,
  eps = 1e-6,
): Tensor {
  return normOp('rmsNorm', x, normalizedShape, weight ?? null, null, eps);
}

/**
 * Layer normalisation over the trailing `normalizedShape` dimensions (torch layer_norm):
 * x [..., *normalizedShape] -> same shape and dtype, y = (x - mean) / sqrt(var + eps) * weight
 * + bias with the biased variance.
 */
export function layerNorm(
  x: Tensor,
  normalizedShape: number | readonly number[],
  weight: Tensor | null = null,
  bias: Tensor | null = null,
  eps = 1e-5,
): Tensor {
  return normOp('layerNorm', x, normalizedShape, weight ?? null, bias ?? null, eps);
}
