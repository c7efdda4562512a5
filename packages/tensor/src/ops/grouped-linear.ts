// Grouped linear (the grouped GEMM of MoE experts): consecutive row groups of one input, each
// through its own weight, written straight into their rows of one output. The products go to the
// backend's groupedGemm kernel as one list (one launch on the CUDA backend: cuBLAS's grouped GEMM
// on a GPU); a backend without it runs its core GEMM once per group with operands viewed in place.
// Either way each group performs the same product as `linear` on that group's rows: results equal
// `cat(groups.map((e) => linear(x_e, W_e)))` bit for bit where the grouped kernel computes each
// product as the backend's gemm does (the CPU, the CUDA emulator), within the GEMM's rounding on a
// GPU, without the narrow/cat copies and with one autograd node instead of one per group.

import { attachGrad, needsGrad } from '../autograd/record.js';
import type { GemmOperand } from '../backend/backend.js';
import { getKernel } from '../backend/kernels.js';
import { isFloating } from '../dtype.js';
import { argError, dtypeError, fmtShape, shapeError } from '../errors.js';
import type { Tensor } from '../tensor.js';
import { alloc, inputsBackend } from './util.js';

/** One product of a grouped GEMM: c [m, n] = a [m, k] @ b [k, n] (the operands' bs is unused). */
export interface GemmProblem {
  m: number;
  n: number;
  k: number;
  a: GemmOperand;
  b: GemmOperand;
  c: GemmOperand;
}

/**
 * Independent GEMMs of one floating dtype, c = a @ b each (c is written, never read), in as few
 * launches as the backend can (MoE's expert GEMMs: one per projection). a and b any 2-D strides,
 * c a unit column stride (cs = 1); m, n and k positive; no c overlaps another problem's operands.
 * Without the kernel, one core `gemm` per problem.
 */
export type GroupedGemmKernel = (problems: readonly GemmProblem[]) => void;

const OP = 'groupedLinear';

/** Throws one line for anything groupedLinear cannot take; returns [N, K, F]. */
function check(
  x: Tensor,
  weights: readonly Tensor[],
  groupSizes: readonly number[],
): [number, number, number] {
  if (x.ndim !== 2) throw shapeError(OP, `x must be [N, K], got ${fmtShape(x.shape)}`);
  if (weights.length === 0) throw argError(OP, 'needs at least one group (one weight)');
  if (groupSizes.length !== weights.length) {
    throw argError(
      OP,
      `${groupSizes.length} group sizes for ${weights.length} weights; pass one size per weight`,
    );
  }
  if (!isFloating(x.dtype)) throw dtypeError(OP, `expected a floating-point input, got ${x.describe()}`);
  const [N, K] = x.shape;
  const w0 = weights[0];
  if (w0.ndim !== 2) throw shapeError(OP, `weights must be [out, in], got ${fmtShape(w0.shape)}`);
  weights.forEach((w, e) => {
    if (w.dtype !== x.dtype)
      throw dtypeError(OP, `weight ${e} is ${w.dtype} but x is ${x.dtype}; cast one of them`);
    if (w.ndim !== 2 || w.shape[0] !== w0.shape[0] || w.shape[1] !== w0.shape[1]) {
      throw shapeError(
        OP,
        `weight ${e} is ${fmtShape(w.shape)} but weight 0 is ${fmtShape(w0.shape)}; all groups need one shape`,
      );
    }
  });
  if (w0.shape[1] !== K) {
    throw shapeError(
      OP,
      `x ${fmtShape(x.shape)} has ${K} features, the weights ${fmtShape(w0.shape)} expect ${w0.shape[1]}`,
    );
  }
  let total = 0;
  groupSizes.forEach((n, e) => {
    if (!Number.isInteger(n) || n < 0)
      throw argError(OP, `group size ${e} is ${n}; sizes must be non-negative integers`);
    total += n;
  });
  if (total !== N)
    throw shapeError(OP, `group sizes sum to ${total} but x ${fmtShape(x.shape)} has ${N} rows`);
  return [N, K, w0.shape[0]];
}

/** A 2-D tensor the GEMM can read (one unit stride): t itself (a new view) or a contiguous copy. */
function unitStrided(t: Tensor): Tensor {
  const [r, c] = t.shape;
  if (t.strides[0] === 1 || t.strides[1] === 1 || r <= 1 || c <= 1)
    return t.viewAs(t.shape, t.strides, t.offset, false);
  // a plain copy outside the graph: the op records its own node
  const copy = alloc(t.backend, t.shape, t.dtype);
  t.backend.copy(copy, t);
  return copy;
}

/** Rows [start, start + n) of a 2-D tensor as a new view (its storage gains a reference). */
function rows(t: Tensor, start: number, n: number): Tensor {
  return t.viewAs([n, t.shape[1]], t.strides, t.offset + start * t.strides[0], false);
}

/** t [r, c] as a GEMM operand, transposed (read as [c, r]) or not. */
function operand(t: Tensor, transposed: boolean): GemmOperand {
  const [rs, cs] = t.strides;
  return transposed ? { tensor: t, bs: 0, rs: cs, cs: rs } : { tensor: t, bs: 0, rs, cs };
}

/**
 * The problems of "group e's rows of out [N, O] (contiguous) = group e's rows of a [N, I] @ b_e",
 * where b_e is bs[e] [I, O], or bs[e]^T when bs[e] is [O, I] and transposeB is set; empty groups
 * have none. Each problem's a and c are new views (the caller disposes them).
 */
function groupProblems(
  out: Tensor,
  a: Tensor,
  bs: readonly Tensor[],
  transposeB: boolean,
  groupSizes: readonly number[],
): GemmProblem[] {
  const [, O] = out.shape;
  const I = a.shape[1];
  const problems: GemmProblem[] = [];
  let start = 0;
  groupSizes.forEach((n, e) => {
    if (n > 0) {
      const ae = rows(a, start, n);
      const ce = rows(out, start, n);
      problems.push({
        m: n,
        n: O,
        k: I,
        a: operand(ae, false),
        b: operand(bs[e], transposeB),
        c: { tensor: ce, bs: n * O, rs: O, cs: 1 },
      });
    }
    start += n;
  });
  return problems;
}

/** Runs the problems through the backend's grouped kernel (else one gemm each), then frees the views. */
function runGrouped(problems: GemmProblem[], views: Tensor[]): void {
  try {
    if (problems.length > 0) {
      const kernel = getKernel(problems[0].c.tensor.backend, 'groupedGemm');
      if (!kernel) throw new Error('groupedLinear: no groupedGemm kernel or composition is registered');
      kernel(problems);
    }
  } finally {
    for (const v of views) v.dispose();
  }
}

/** Group e's rows of out = group e's rows of a @ b_e, as one grouped GEMM (see groupProblems). */
function groupedGemm(
  out: Tensor,
  a: Tensor,
  bs: readonly Tensor[],
  transposeB: boolean,
  groupSizes: readonly number[],
): void {
  const problems = groupProblems(out, a, bs, transposeB, groupSizes);
  runGrouped(
    problems,
    problems.flatMap((p) => [p.a.tensor, p.c.tensor]),
  );
}

/**
 * y [N, F] of x [N, K] in consecutive row groups: rows [s_e, s_e + groupSizes[e]) of y are the same
 * rows of x times weights[e]^T, weights[e] [F, K] as in `linear` (no bias). One autograd node:
 * dx by the same grouped GEMM with the weights, dW_e = dy_e^T x_e (zeros for an empty group, so
 * every weight gets a gradient).
 */
export function groupedLinear(x: Tensor, weights: readonly Tensor[], groupSizes: readonly number[]): Tensor {
  const backend = inputsBackend(OP, x, ...weights);
  const [N, K, F] = check(x, weights, groupSizes);
  const out = alloc(backend, [N, F], x.dtype, K === 0);
  if (K > 0 && out.numel > 0) {
    const xs = unitStrided(x);
    const ws = weights.map(unitStrided);
    groupedGemm(out, xs, ws, true, groupSizes);
    for (const t of [xs, ...ws]) t.dispose();
  }
  if (!needsGrad(x, ...weights)) return out;
  const sizes = [...groupSizes];
  const gradX = x.requiresGrad;
  const gradW = weights.map((w) => w.requiresGrad);
  const anyW = gradW.some(Boolean);
  // dx needs the weights, the weight gradients need x
  const save = [...(anyW ? [x] : []), ...(gradX ? weights : [])];
  return attachGrad(out, 'GroupedLinearBackward', [x, ...weights], save, (g, s) => {
    const gs = unitStrided(g);
    const xs = anyW ? unitStrided(s[0]) : null;
    const ws = gradX ? s.slice(anyW ? 1 : 0).map(unitStrided) : [];
    let dx: Tensor | null = null;
    if (gradX) {
      dx = alloc(backend, [N, K], g.dtype, F === 0);
      if (F > 0 && dx.numel > 0) groupedGemm(dx, gs, ws, false, sizes);
    }
    // dW_e [F, K] = g_e^T [F, n] @ x_e [n, K], in the weight's own layout: the product linear's
    // backward computes, so the two agree bit for bit on every backend whose grouped kernel
    // computes each product as its gemm does; all groups' products in one grouped GEMM
    const dws: (Tensor | null)[] = [];
    const problems: GemmProblem[] = [];
    const views: Tensor[] = [];
    let start = 0;
    sizes.forEach((n, e) => {
      if (!gradW[e] || !xs) dws.push(null);
      else if (n === 0 || F === 0 || K === 0) dws.push(alloc(backend, [F, K], g.dtype, true));
      else {
        const dw = alloc(backend, [F, K], g.dtype);
        const xe = rows(xs, start, n);
        const ge = rows(gs, start, n);
        problems.push({
          m: F,
          n: K,
          k: n,
          a: operand(ge, true),
          b: operand(xe, false),
          c: { tensor: dw, bs: F * K, rs: K, cs: 1 },
        });
        views.push(xe, ge);
        dws.push(dw);
      }
      start += n;
    });
    try {
      runGrouped(problems, views);
    } catch (e) {
      for (const t of dws) t?.dispose();
      dx?.dispose();
      throw e;
    }
    for (const t of [gs, ...(xs ? [xs] : []), ...ws]) t.dispose();
    return [dx, ...dws];
  });
}
