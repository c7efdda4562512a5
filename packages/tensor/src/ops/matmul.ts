// matmul (torch.matmul semantics, batch broadcasting), bmm and linear, all on the backend's
// batched GEMM. Operands are passed with their strides, so transposed views cost no copy.

import { addedToMainGrad } from '../autograd/engine.js';
import { leafHasGradHooks, noGrad } from '../autograd/graph.js';
import { attachGrad, needsGrad } from '../autograd/record.js';
import type { GemmOperand } from '../backend/backend.js';
import { type DType, isFloating } from '../dtype.js';
import { dtypeError, fmtShape, shapeError } from '../errors.js';
import { broadcastShapes, numel, viewStrides } from '../shape.js';
import { Tensor } from '../tensor.js';
import { add, sumToShape } from './elementwise.js';
import { contiguous, expand, reshape, squeeze, transpose, unsqueeze } from './shape.js';
import { alloc, inputsBackend } from './util.js';

/** Views a [..., r, c] tensor as a GEMM operand over `batch` matrices, copying when needed. */
function operand(x: Tensor, batchShape: readonly number[]): { op: GemmOperand; temp: Tensor[] } {
  const temp: Tensor[] = [];
  const r = x.shape[x.ndim - 2];
  const c = x.shape[x.ndim - 1];
  let t = x;
  const full = [...batchShape, r, c];
  if (t.ndim !== full.length || t.shape.some((s, i) => s !== full[i])) {
    t = expand(t, full);
    temp.push(t);
  }
  let rs = t.strides[t.ndim - 2];
  let cs = t.strides[t.ndim - 1];
  const unit = cs === 1 || rs === 1 || c === 1 || r === 1;
  let bs = 0;
  const nb = numel(batchShape);
  if (batchShape.length > 0 && nb > 1) {
    const st = viewStrides(batchShape, t.strides.slice(0, batchShape.length), [nb]);
    if (st && unit) bs = st[0];
    else {
      t = contiguous(t);
      temp.push(t);
      rs = c;
      cs = 1;
      bs = r * c;
    }
  } else if (!unit) {
    t = contiguous(t);
    temp.push(t);
    rs = c;
    cs = 1;
  }
  return { op: { tensor: t, bs, rs, cs }, temp };
}

/** out[b] = a[b] @ b[b] on already-shaped operands; returns a new [...batch, M, N] tensor. */
function gemmBatched(a: Tensor, b: Tensor, batchShape: readonly number[]): Tensor {
  const backend = inputsBackend('matmul', a, b);
  const M = a.shape[a.ndim - 2];
  const K = a.shape[a.ndim - 1];
  const N = b.shape[b.ndim - 1];
  const out = alloc(backend, [...batchShape, M, N], a.dtype, K === 0);
  if (K === 0 || out.numel === 0) return out;
  const A = operand(a, batchShape);
  const B = operand(b, batchShape);
  backend.gemm(numel(batchShape), M, N, K, A.op, B.op, { tensor: out, bs: M * N, rs: N, cs: 1 }, 1, 0);
  for (const t of [...A.temp, ...B.temp]) t.dispose();
  return out;
}

function checkMatmul(op: string, a: Tensor, b: Tensor): void {
  if (a.ndim === 0 || b.ndim === 0) throw shapeError(op, 'both arguments need at least 1 dimension');
  if (a.dtype !== b.dtype) throw dtypeError(op, `dtypes differ: ${a.dtype} and ${b.dtype}`);
  if (!isFloating(a.dtype)) throw dtypeError(op, `expected floating-point tensors, got ${a.dtype}`);
  const k1 = a.shape[a.ndim - 1];
  const k2 = b.ndim === 1 ? b.shape[0] : b.shape[b.ndim - 2];
  if (k1 !== k2) {
    throw shapeError(
      op,
      `${fmtShape(a.shape)} @ ${fmtShape(b.shape)}: inner dimensions ${k1} and ${k2} differ`,
    );
  }
}

/** Matrix product with torch.matmul's rules for 1-D operands and broadcast batch dimensions. */
export function matmul(a: Tensor, b: Tensor): Tensor {
  inputsBackend('matmul', a, b);
  checkMatmul('matmul', a, b);
  const a2 = a.ndim === 1 ? unsqueeze(a, 0) : a;
  const b2 = b.ndim === 1 ? unsqueeze(b, 1) : b;
  let out: Tensor;
  // [..., M, K] @ [K, N] with a flattenable batch: one GEMM of (batch*M) rows
  const rows = numel(a2.shape.slice(0, -1));
  const K = a2.shape[a2.ndim - 1];
  if (b2.ndim === 2 && a2.ndim > 2 && viewStrides(a2.shape, a2.strides, [rows, K])) {
    const af = reshape(a2, [rows, K]);
    const o = gemmBatched(af, b2, []);
    af.dispose();
    out = reshape(o, [...a2.shape.slice(0, -1), b2.shape[1]]);
    o.dispose();
  } else {
    const batch = broadcastShapes('matmul', a2.shape.slice(0, -2), b2.shape.slice(0, -2));
    out = gemmBatched(a2, b2, batch);
  }
  if (a.ndim === 1 || b.ndim === 1) {
    const sq = a.ndim === 1 && b.ndim === 1 ? reshape(out, []) : squeeze(out, a.ndim === 1 ? -2 : -1);
    out.dispose();
    out = sq;
  }
  if (a2 !== a) a2.dispose();
  if (b2 !== b) b2.dispose();
  if (needsGrad(a, b)) {
    const ra = a.requiresGrad;
    const rb = b.requiresGrad;
    const save: Tensor[] = [];
    if (rb) save.push(a);
    if (ra) save.push(b);
    attachGrad(out, 'MmBackward', [a, b], save, (g, s) => {
      const xa = rb ? s[0] : null;
      const xb = ra ? s[rb ? 1 : 0] : null;
      return matmulGrads(g, a.shape, b.shape, xa, xb);
    });
  }
  return out;
}

function matmulGrads(
  g: Tensor,
  aShape: readonly number[],
  bShape: readonly number[],
  a: Tensor | null,
  b: Tensor | null,
): (Tensor | null)[] {
  // lift 1-D cases to matrices, as the forward did
  const a1 = aShape.length === 1;
  const b1 = bShape.length === 1;
  let gg = g;
  if (a1 && b1) gg = reshape(g, [1, 1]);
  else if (a1) gg = unsqueeze(g, -2);
  else if (b1) gg = unsqueeze(g, -1);
  let ga: Tensor | null = null;
  let gb: Tensor | null = null;
  if (b) {
    const bm = b1 ? unsqueeze(b, 1) : b;
    const bt = transpose(bm, -1, -2);
    const full = matmul(gg, bt);
    bt.dispose();
    if (bm !== b) bm.dispose();
    const shape2 = a1 ? [1, aShape[0]] : aShape;
    const red = sumToShape(full, shape2);
    full.dispose();
    ga = a1 ? reshape(red, aShape) : red;
    if (ga !== red) red.dispose();
  }
  if (a) {
    const am = a1 ? unsqueeze(a, 0) : a;
    const bShape2 = b1 ? [bShape[0], 1] : bShape;
    let full: Tensor;
    if (bShape2.length === 2 && am.ndim > 2) {
      // weight-style gradient: one GEMM over all batch rows
      const rows = numel(am.shape.slice(0, -1));
      const af = reshape(am, [rows, am.shape[am.ndim - 1]]);
      const gf = reshape(gg, [rows, gg.shape[gg.ndim - 1]]);
      const aft = transpose(af, 0, 1);
      full = matmul(aft, gf);
      for (const t of [af, gf, aft]) t.dispose();
    } else {
      const at = transpose(am, -1, -2);
      full = matmul(at, gg);
      at.dispose();
    }
    if (am !== a) am.dispose();
    const red = sumToShape(full, bShape2);
    full.dispose();
    gb = b1 ? reshape(red, bShape) : red;
    if (gb !== red) red.dispose();
  }
  if (gg !== g) gg.dispose();
  return [ga, gb];
}

/** Batched product of [B, M, K] and [B, K, N]. */
export function bmm(a: Tensor, b: Tensor): Tensor {
  if (a.ndim !== 3 || b.ndim !== 3 || a.shape[0] !== b.shape[0]) {
    throw shapeError(
      'bmm',
      `expected [B, M, K] and [B, K, N], got ${fmtShape(a.shape)} and ${fmtShape(b.shape)}`,
    );
  }
  return matmul(a, b);
}

/** The shape checks of linear (x [..., in], weight [out, in], bias [out]), naming `op`. */
export function checkLinear(op: string, x: Tensor, weight: Tensor, bias?: Tensor | null): void {
  if (weight.ndim !== 2) throw shapeError(op, `weight must be [out, in], got ${fmtShape(weight.shape)}`);
  if (x.ndim === 0) throw shapeError(op, `input must be [..., ${weight.shape[1]}], got a 0-d tensor`);
  if (x.shape[x.ndim - 1] !== weight.shape[1]) {
    throw shapeError(
      op,
      `input ${fmtShape(x.shape)} has ${x.shape[x.ndim - 1]} features, weight ${fmtShape(weight.shape)} expects ${weight.shape[1]}`,
    );
  }
  if (bias && (bias.ndim !== 1 || bias.shape[0] !== weight.shape[0])) {
    throw shapeError(op, `bias ${fmtShape(bias.shape)} must be [${weight.shape[0]}]`);
  }
}

/**
 * y [..., out] = x [..., in] @ weight[out, in]^T + bias [out], as torch.nn.functional.linear; the
 * bias goes into the GEMM's epilogue where the backend has its own linearBias kernel.
 */
export function linear(x: Tensor, weight: Tensor, bias?: Tensor | null): Tensor {
  inputsBackend('linear', x, weight, bias);
  checkLinear('linear', x, weight, bias);
  const fused = bias ? linearFused(x, weight, bias) : null;
  if (fused) return fused;
  if (!bias) return linearNoBias(x, weight);
  const wt = transpose(weight, 0, 1);
  const y = matmul(x, wt);
  wt.dispose();
  const out = add(y, bias);
  y.dispose();
  return out;
}

/**
 * x @ weight^T with one LinearBackward node (linearGrads): the weight's gradient comes out as g^T x
 * in the weight's own [N, K] layout, where the graph of matmul(x, weight^T) would give a
 * transposed view of x^T g (which every consumer, the fp32 main-gradient accumulation first, then
 * reads across its rows).
 */
function linearNoBias(x: Tensor, weight: Tensor): Tensor {
  const out = noGrad(() => {
    const wt = transpose(weight, 0, 1);
    const y = matmul(x, wt);
    wt.dispose();
    return y;
  });
  attachLinearBackward(out, x, weight, null);
  return out;
}

/**
 * out's LinearBackward node (linearGrads) for out = x @ weight^T (+ bias): saves what the unfused
 * graph (MmBackward of x @ weight^T, AddBackward of the bias) would save. With `residual` (out =
 * residual + x @ weight^T, no bias) the node is LinearResidualBackward and the residual's gradient
 * is the output's.
 */
function attachLinearBackward(
  out: Tensor,
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  residual: Tensor | null = null,
): void {
  const extra = bias ?? residual;
  if (!needsGrad(x, weight, extra)) return;
  const rx = x.requiresGrad;
  const rw = weight.requiresGrad;
  const rb = bias?.requiresGrad ?? false;
  const rr = residual?.requiresGrad ?? false;
  const xShape = x.shape;
  const save: Tensor[] = [];
  if (rw) save.push(x);
  if (rx) save.push(weight);
  const inputs = extra ? [x, weight, extra] : [x, weight];
  const leaf = rw && weight.isLeaf ? weight : null;
  attachGrad(out, residual ? 'LinearResidualBackward' : 'LinearBackward', inputs, save, (g, s) => {
    const grads = linearGrads(g, xShape, rw ? s[0] : null, rx ? s[rw ? 1 : 0] : null, rb, leaf);
    return residual ? [grads[0], grads[1], rr ? g : null] : grads.slice(0, inputs.length);
  });
}

/** The dtypes of the fused linear kernels (linearBias, linearBiasActivation, linearWeightBiasGrad). */
export const FUSED_DTYPES: ReadonlySet<DType> = new Set(['float32', 'bfloat16', 'float16', 'float64']);

/**
 * x [..., K] @ weight[N, K]^T + bias [N] -> [..., N] through the backend's own linearBias kernel
 * (the bias added in the GEMM's epilogue, one rounding); null where it does not apply: no such
 * kernel (the CPU: its unfused numerics stay), mixed or non-float dtypes, leading dimensions that
 * do not flatten into rows without a copy, or a strided bias. The backward is linearGrads.
 */
function linearFused(x: Tensor, weight: Tensor, bias: Tensor): Tensor | null {
  const backend = x.backend;
  // the backend's own kernel only: getKernel's composition would be the unfused path again
  const kernel = backend.kernel('linearBias');
  const dtype = x.dtype;
  if (!kernel || !FUSED_DTYPES.has(dtype) || weight.dtype !== dtype || bias.dtype !== dtype) return null;
  const [N, K] = weight.shape;
  if (N > 1 && bias.strides[0] !== 1) return null;
  const lead = x.shape.slice(0, -1);
  const M = numel(lead);
  const xStrides = viewStrides(x.shape, x.strides, [M, K]);
  if (!xStrides) return null;
  const out = alloc(backend, [...lead, N], dtype);
  if (out.numel > 0) {
    const x2 = x.viewAs([M, K], xStrides, x.offset);
    const out2 = out.viewAs([M, N], [N, 1], 0);
    try {
      kernel(out2, x2, weight, bias);
    } catch (e) {
      out.dispose();
      throw e;
    } finally {
      x2.dispose();
      out2.dispose();
    }
  }
  attachLinearBackward(out, x, weight, bias);
  return out;
}

/**
 * residual + x @ weight^T: linear without a bias, then the residual added, as one GEMM where the
 * backend has its own linearResidual kernel (CUDA: cuBLASLt reading the residual as its C with
 * beta 1), so the sum is written once and a 16-bit result rounded once; elsewhere (the CPU) linear
 * then add, their numerics unchanged. residual has the output's shape [..., out]; its gradient is
 * the output's. What a transformer layer does with its attention projection and MLP output and the
 * residual stream.
 */
export function linearResidual(x: Tensor, weight: Tensor, residual: Tensor): Tensor {
  inputsBackend('linearResidual', x, weight, residual);
  checkLinear('linearResidual', x, weight, null);
  const outShape = [...x.shape.slice(0, -1), weight.shape[0]];
  if (residual.ndim !== outShape.length || residual.shape.some((d, i) => d !== outShape[i])) {
    throw shapeError(
      'linearResidual',
      `residual ${fmtShape(residual.shape)} must have the output's shape ${fmtShape(outShape)}`,
    );
  }
  const fused = linearResidualFused(x, weight, residual);
  if (fused) return fused;
  const y = linear(x, weight);
  const out = add(residual, y);
  y.dispose();
  return out;
}

/**
 * linearResidual through the backend's own kernel; null where it does not apply (no kernel, mixed
 * or non-float dtypes, an input or residual whose leading dimensions do not flatten into rows
 * without a copy, a residual without unit column stride).
 */
function linearResidualFused(x: Tensor, weight: Tensor, residual: Tensor): Tensor | null {
  const backend = x.backend;
  const kernel = backend.kernel('linearResidual');
  const dtype = x.dtype;
  if (!kernel || !FUSED_DTYPES.has(dtype) || weight.dtype !== dtype || residual.dtype !== dtype) return null;
  const [N, K] = weight.shape;
  const lead = x.shape.slice(0, -1);
  const M = numel(lead);
  const xStrides = viewStrides(x.shape, x.strides, [M, K]);
  const rStrides = viewStrides(residual.shape, residual.strides, [M, N]);
  if (!xStrides || !rStrides || (N > 1 && rStrides[1] !== 1)) return null;
  const out = alloc(backend, [...lead, N], dtype);
  if (out.numel > 0) {
    const x2 = x.viewAs([M, K], xStrides, x.offset);
    const r2 = residual.viewAs([M, N], [rStrides[0], 1], residual.offset);
    const out2 = out.viewAs([M, N], [N, 1], 0);
    try {
      kernel(out2, x2, weight, r2);
    } catch (e) {
      out.dispose();
      throw e;
    } finally {
      x2.dispose();
      r2.dispose();
      out2.dispose();
    }
  }
  attachLinearBackward(out, x, weight, null, residual);
  return out;
}

let gradientAccumulationFusion = true;

/**
 * Megatron's gradient-accumulation fusion (`--gradient-accumulation-fusion`, on by default as in
 * Megatron's training scripts): where a linear layer's weight is a leaf with a float32 `.mainGrad`
 * (data parallelism's gradient buffer, the mixed-precision optimizers), no tensor hooks, and the
 * backend has its own `linearWeightGradAccumulate` kernel (CUDA: one cuBLASLt GEMM with a float32
 * output and beta 1), the weight-gradient GEMM adds g^T x straight into mainGrad in float32: the
 * gradient is neither written in the 16-bit dtype nor added by a second kernel, and it is not
 * rounded to 16 bits first. Elsewhere (the CPU) nothing changes. `false` turns it off everywhere
 * (`--no-gradient-accumulation-fusion`).
 */
export function setGradientAccumulationFusion(enabled: boolean): void {
  gradientAccumulationFusion = enabled;
}

/** Whether gradient-accumulation fusion is on (setGradientAccumulationFusion). */
export function getGradientAccumulationFusion(): boolean {
  return gradientAccumulationFusion;
}

/** The dtypes of linearWeightGradAccumulate's g and x. */
const ACCUMULATE_DTYPES: ReadonlySet<DType> = new Set(['float32', 'bfloat16', 'float16']);

/**
 * The float32 main gradient of `leaf` when gradient-accumulation fusion applies to it (the fusion
 * on, a contiguous float32 `.mainGrad` of the leaf's shape on its backend, no tensor hooks, a
 * 16/32-bit float leaf, and a backend with its own linearWeightGradAccumulate kernel: the devices
 * where the fusion exists), else null. The embedding backward adds its rows there itself.
 */
export function fusedMainGradOf(leaf: Tensor): Tensor | null {
  if (!gradientAccumulationFusion || !leaf.isLeaf) return null;
  const main = leaf.mainGrad;
  if (!main || main.disposed || main.dtype !== 'float32' || !main.isContiguous) return null;
  if (
    main.backend !== leaf.backend ||
    main.ndim !== leaf.ndim ||
    main.shape.some((d, i) => d !== leaf.shape[i])
  )
    return null;
  if (!ACCUMULATE_DTYPES.has(leaf.dtype) || leafHasGradHooks(leaf)) return null;
  return leaf.backend.kernel('linearWeightGradAccumulate') ? main : null;
}

/**
 * mainGrad += g2^T x2 for `leaf` through the backend's own linearWeightGradAccumulate kernel, and
 * the marker gradient the engine then skips; null (nothing done) where the fusion does not apply.
 */
function accumulateWeightGrad(leaf: Tensor, g2: Tensor, x: Tensor, M: number, K: number): Tensor | null {
  const main = fusedMainGradOf(leaf);
  if (!main || main.backend !== g2.backend || !ACCUMULATE_DTYPES.has(g2.dtype) || x.dtype !== g2.dtype)
    return null;
  const kernel = g2.backend.kernel('linearWeightGradAccumulate');
  if (!kernel) return null;
  const x2 = reshape(x, [M, K]);
  try {
    kernel(main, g2, x2);
  } finally {
    x2.dispose();
  }
  return addedToMainGrad(leaf);
}

/**
 * The gradients [dx, dweight, dbias] of y = x @ weight^T + bias from g = dy [..., N]: dx = g @
 * weight where weight is given (x needs a gradient), dweight = g^T x where x is given, dbias =
 * the row sums of g when `biasGrad`. With `leaf` (the weight, when it is a leaf parameter) and
 * gradient-accumulation fusion applying to it, dweight goes straight into leaf.mainGrad (see
 * setGradientAccumulationFusion) and the returned dweight is the engine's marker. Otherwise dweight
 * and dbias come from the backend's own linearWeightBiasGrad kernel (one GEMM whose epilogue also
 * sums g's rows, each rounded once) where it has one and both are wanted, or from a GEMM and a sum.
 */
export function linearGrads(
  g: Tensor,
  xShape: readonly number[],
  x: Tensor | null,
  weight: Tensor | null,
  biasGrad: boolean,
  leaf: Tensor | null = null,
): [Tensor | null, Tensor | null, Tensor | null] {
  const N = g.shape[g.ndim - 1];
  const K = xShape[xShape.length - 1];
  const M = numel(xShape.slice(0, -1));
  const gx = weight ? matmul(g, weight) : null;
  if (!x && !biasGrad) return [gx, null, null];
  const g2 = reshape(g, [M, N]);
  if (x && leaf) {
    const fused = accumulateWeightGrad(leaf, g2, x, M, K);
    if (fused) {
      const gb = biasGrad ? sumToShape(g2, [N]) : null;
      g2.dispose();
      return [gx, fused, gb];
    }
  }
  const kernel = g.backend.kernel('linearWeightBiasGrad');
  const dtype = g.dtype;
  if (x && biasGrad && kernel && FUSED_DTYPES.has(dtype) && x.dtype === dtype) {
    const x2 = reshape(x, [M, K]);
    const gw = alloc(g.backend, [N, K], dtype);
    const gb = alloc(g.backend, [N], dtype);
    try {
      kernel(gw, gb, g2, x2);
    } catch (e) {
      gw.dispose();
      gb.dispose();
      throw e;
    } finally {
      x2.dispose();
      g2.dispose();
    }
    return [gx, gw, gb];
  }
  let gw: Tensor | null = null;
  if (x) {
    const x2 = reshape(x, [M, K]);
    const gt = transpose(g2, 0, 1);
    gw = matmul(gt, x2);
    gt.dispose();
    x2.dispose();
  }
  const gb = biasGrad ? sumToShape(g2, [N]) : null;
  g2.dispose();
  return [gx, gw, gb];
}

Object.assign(Tensor.prototype, {
  matmul(this: Tensor, other: Tensor) {
    return matmul(this, other);
  },
});
