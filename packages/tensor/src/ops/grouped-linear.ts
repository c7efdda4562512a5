// Grouped linear (the grouped GEMM of MoE experts): consecutive row groups of one input, each
// through its own weight, written straight into their rows of one output. The products go to the
// backend's groupedGemm kernel as one list (one launch on the CUDA backend: cuBLAS's grouped GEMM
// on a GPU); a backend without it runs its core GEMM once per group with operands viewed in place.
// Either way each group performs the same product as `linear` on that group's rows: results equal
// `cat(groups.map((e) => linear(x_e, W_e)))` bit for bit where the grouped kernel computes each
// product as the backend's gemm does (the CPU, the CUDA emulator), within the GEMM's rounding on a
// GPU, without the narrow/cat copies and with one autograd node instead of one per group.

import { noGrad } from '../autograd/graph.js';
import { attachGrad, needsGrad } from '../autograd/record.js';
import type { GemmOperand } from '../backend/backend.js';
import { getKernel } from '../backend/kernels.js';
import { isFloating } from '../dtype.js';
import { argError, dtypeError, fmtShape, shapeError } from '../errors.js';
import { tidy } from '../scope.js';
import { deferCheck } from '../sync.js';
import type { Tensor } from '../tensor.js';
import { cat } from './shape.js';
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

/**
 * A grouped GEMM whose group sizes are on the device (MoE's tokens per expert, counted where the
 * router ran), so that the host need not wait for them: problem g covers rows [s_g, s_g + n_g) of
 * the split, s_g the sum of the sizes before it. Each problem is given at row 0 of the split with
 * the split dimension 0, its other dimensions fixed: 'rows' splits m (a's and c's rows move by
 * s_g, m = n_g: x W^T and dy W), 'k' the reduction (a's columns and b's rows move, k = n_g; a group
 * of k = 0 writes zeros: dy_g^T x_g). The backend plans the groups where the sizes are; it reads
 * them with sizes below 0 as 0 and clamped to `total` (the caller checks them, deferred).
 * Returns false, having done nothing, where it cannot: the caller reads the sizes and runs
 * groupedGemm.
 */
export type GroupedGemmSizedKernel = (call: SizedGroupedGemm) => boolean;

/** A grouped GEMM over device group sizes (see GroupedGemmSizedKernel). */
export interface SizedGroupedGemm {
  /** The group sizes, int64 [G] (contiguous), on the operands' device. */
  sizes: Tensor;
  /** Which dimension the groups split: m ('rows') or k. */
  split: 'rows' | 'k';
  /** The rows the groups split (the sizes' sum). */
  total: number;
  /** One problem a group, at the split's row 0, the split dimension 0; the same strides for all. */
  problems: readonly GemmProblem[];
}

const OP = 'groupedLinear';

/**
 * Throws one line for anything groupedLinear cannot take; returns [N, K, F]. Sizes on the device
 * (null here) are checked by their caller.
 */
function check(
  x: Tensor,
  weights: readonly Tensor[],
  groupSizes: readonly number[] | null,
): [number, number, number] {
  if (x.ndim !== 2) throw shapeError(OP, `x must be [N, K], got ${fmtShape(x.shape)}`);
  if (weights.length === 0) throw argError(OP, 'needs at least one group (one weight)');
  if (groupSizes && groupSizes.length !== weights.length) {
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
  if (groupSizes) checkSizes(groupSizes, x.shape);
  return [N, K, w0.shape[0]];
}

/** Throws one line unless the sizes are non-negative integers summing to x's rows. */
function checkSizes(groupSizes: readonly number[], xShape: readonly number[]): void {
  let total = 0;
  groupSizes.forEach((n, e) => {
    if (!Number.isInteger(n) || n < 0) throw badSize(e, n);
    total += n;
  });
  if (total !== xShape[0]) throw badTotal(total, xShape);
}

/** The one-line errors of bad sizes, on the host or in the deferred check of device sizes. */
const badSize = (e: number, n: number) =>
  argError(OP, `group size ${e} is ${n}; sizes must be non-negative integers`);
const badTotal = (total: number, xShape: readonly number[]) =>
  shapeError(OP, `group sizes sum to ${total} but x ${fmtShape(xShape)} has ${xShape[0]} rows`);
const badCount = (groups: number, shape: readonly number[]) =>
  shapeError(OP, `groupSizes must be [${groups}] (one size per weight), got ${fmtShape(shape)}`);

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

/** An integer tensor's values on the host (a read: the host waits for its device). */
function readSizes(t: Tensor): number[] {
  return Array.from(t.toTypedArray() as ArrayLike<number | bigint>, Number);
}

/**
 * A grouped linear layer's group sizes: on the host, or on the device with the kernel that takes
 * them there; their host copy is read at the first need (a kernel that could not take them).
 */
class GroupSizes {
  constructor(
    private hostSizes: readonly number[] | null,
    readonly device: Tensor | null,
    readonly kernel: GroupedGemmSizedKernel | null,
    /** x's shape, for the check of sizes read back (before any host GEMM uses them). */
    private readonly xShape: readonly number[] = [],
    /** Where sizes read back go too (a SharedGroupSizes). */
    private readonly shared: SharedGroupSizes | null = null,
  ) {}

  /** Whether the host has them (given, or read back). */
  get isRead(): boolean {
    return this.hostSizes !== null;
  }

  host(): readonly number[] {
    if (!this.hostSizes) {
      const read = readSizes(this.device as Tensor);
      checkSizes(read, this.xShape);
      this.hostSizes = read;
      if (this.shared) this.shared.host = read;
    }
    return this.hostSizes;
  }

  /** The same sizes over the graph's saved view of the device tensor; host only once read. */
  saved(device: Tensor | null): GroupSizes {
    return this.hostSizes || !device
      ? new GroupSizes(this.host(), null, null)
      : new GroupSizes(null, device, this.kernel, this.xShape, this.shared);
  }
}

/**
 * Sizes given as a tensor: kept on the device where the backend is asynchronous and has the kernel
 * (then `owned` is an int64 copy this call made, or null), else read now.
 */
function tensorSizes(
  backend: Tensor['backend'],
  t: Tensor,
  groups: number,
  xShape: readonly number[],
  shared: SharedGroupSizes | null,
): { sizes: GroupSizes; owned: Tensor | null } {
  if (t.ndim !== 1 || t.shape[0] !== groups) {
    throw badCount(groups, t.shape);
  }
  if (t.dtype !== 'int64' && t.dtype !== 'int32') {
    throw dtypeError(OP, `groupSizes must be an int64 or int32 tensor, got ${t.describe()}`);
  }
  const kernel = backend.synchronous === false ? (backend.kernel('groupedGemmSized') ?? null) : null;
  if (!kernel) {
    const read = readSizes(t);
    if (shared) shared.host = read;
    return { sizes: new GroupSizes(read, null, null), owned: null };
  }
  const owned =
    t.dtype === 'int64' && t.isContiguous ? null : noGrad(() => tidy(() => t.to('int64').contiguous()));
  return { sizes: new GroupSizes(null, owned ?? t, kernel, xShape, shared), owned };
}

/**
 * Queues the host check of device sizes (non-negative, summing to N) as a deferred check: the next
 * host read raises the host check's error. The kernels clamp the sizes meanwhile.
 */
function deferSizesCheck(sizes: Tensor, x: Tensor): void {
  const values = noGrad(() =>
    tidy(() => {
      const s = sizes.to('float64'); // exact: sizes stay far below 2^53
      return cat([s.amin().reshape(1), s.argmin().to('float64').reshape(1), s.sum().reshape(1)]);
    }),
  );
  deferCheck(values, ([min, at, total]) => {
    if (min < 0) return badSize(at, min);
    return total !== x.shape[0] ? badTotal(total, x.shape) : null;
  });
}

/**
 * Rows of out = the same rows of a @ b_e by group (groupProblems), the sizes where they are; true
 * when the backend planned the groups there.
 */
function rowsGemm(
  out: Tensor,
  a: Tensor,
  bs: readonly Tensor[],
  transposeB: boolean,
  sizes: GroupSizes,
): boolean {
  if (sizes.device && sizes.kernel) {
    const [N, O] = out.shape;
    const problems = bs.map((b) => ({
      m: 0,
      n: O,
      k: a.shape[1],
      a: operand(a, false),
      b: operand(b, transposeB),
      c: { tensor: out, bs: N * O, rs: O, cs: 1 },
    }));
    if (sizes.kernel({ sizes: sizes.device, split: 'rows', total: N, problems })) return true;
  }
  groupedGemm(out, a, bs, transposeB, sizes.host());
  return false;
}

/**
 * dW_e [F, K] = g_e^T [F, n] @ x_e [n, K] for the groups whose weight wants a gradient (null for the
 * others), in the weight's own layout: the product linear's backward computes, so the two agree
 * bit for bit on every backend whose grouped kernel computes each product as its gemm does; all
 * groups' products in one grouped GEMM (zeros for an empty group, so every weight gets a gradient).
 */
function weightGrads(
  gs: Tensor,
  xs: Tensor,
  gradW: readonly boolean[],
  sizes: GroupSizes,
): (Tensor | null)[] {
  const backend = gs.backend;
  const [N, F] = gs.shape;
  const K = xs.shape[1];
  if (sizes.device && sizes.kernel && N > 0 && F > 0 && K > 0 && gradW.every(Boolean)) {
    const dws = gradW.map(() => alloc(backend, [F, K], gs.dtype));
    const problems = dws.map((dw) => ({
      m: F,
      n: K,
      k: 0,
      a: operand(gs, true),
      b: operand(xs, false),
      c: { tensor: dw, bs: F * K, rs: K, cs: 1 },
    }));
    let done = false;
    try {
      done = sizes.kernel({ sizes: sizes.device, split: 'k', total: N, problems });
    } finally {
      if (!done) for (const t of dws) t.dispose();
    }
    if (done) return dws;
  }
  const dws: (Tensor | null)[] = [];
  const problems: GemmProblem[] = [];
  const views: Tensor[] = [];
  let start = 0;
  sizes.host().forEach((n, e) => {
    if (!gradW[e]) dws.push(null);
    else if (n === 0 || F === 0 || K === 0) dws.push(alloc(backend, [F, K], gs.dtype, true));
    else {
      const dw = alloc(backend, [F, K], gs.dtype);
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
    throw e;
  }
  return dws;
}

/**
 * Group sizes on the device shared by several grouped linear layers over the same rows (a MoE
 * layer's fc1 and fc2): where a backend needs them on the host, the first layer to need them reads
 * them and the others take that copy, so the host waits once. Their values must not change while
 * the layers use them.
 */
export class SharedGroupSizes {
  /** The sizes once a layer read them back (null until then). */
  host: readonly number[] | null = null;
  /** @internal The rows a deferred check of the device sizes was queued for (once for all layers). */
  checkedRows = -1;

  constructor(readonly sizes: Tensor) {}
}

/**
 * y [N, F] of x [N, K] in consecutive row groups: rows [s_e, s_e + groupSizes[e]) of y are the same
 * rows of x times weights[e]^T, weights[e] [F, K] as in `linear` (no bias). One autograd node:
 * dx by the same grouped GEMM with the weights, dW_e = dy_e^T x_e (zeros for an empty group, so
 * every weight gets a gradient).
 *
 * `groupSizes` may be a tensor (int64 or int32 [G], on x's device), as MoE layers count their
 * tokens per expert where the router ran: on a CUDA device whose grouped mode plans the groups
 * there (the grouped tiled kernel, MEGAPATCH_GROUPED_GEMM=mma / wgmma) nothing waits for them, and
 * a bad size (negative, or a sum other than N) is raised at the next host read, as PyTorch's
 * device-side checks are; elsewhere they are read at once (on a GPU whose mode needs them on the
 * host: one wait). Layers over the same rows share one read through a {@link SharedGroupSizes}.
 */
export function groupedLinear(
  x: Tensor,
  weights: readonly Tensor[],
  groupSizes: readonly number[] | Tensor | SharedGroupSizes,
): Tensor {
  const shared = groupSizes instanceof SharedGroupSizes ? groupSizes : null;
  const given = shared ? shared.sizes : Array.isArray(groupSizes) ? null : (groupSizes as Tensor);
  const backend = inputsBackend(OP, x, ...weights, given);
  let owned: Tensor | null = null;
  let sizes: GroupSizes;
  if (shared?.host) {
    if (shared.host.length !== weights.length) {
      throw badCount(weights.length, [shared.host.length]);
    }
    sizes = new GroupSizes([...shared.host], null, null);
  } else if (given) ({ sizes, owned } = tensorSizes(backend, given, weights.length, x.shape, shared));
  else sizes = new GroupSizes([...(groupSizes as readonly number[])], null, null);
  try {
    const [N, K, F] = check(x, weights, sizes.device ? null : sizes.host());
    const out = alloc(backend, [N, F], x.dtype, K === 0);
    let planned = false;
    if (K > 0 && out.numel > 0) {
      const xs = unitStrided(x);
      const ws = weights.map(unitStrided);
      try {
        planned = rowsGemm(out, xs, ws, true, sizes);
      } catch (e) {
        out.dispose();
        throw e;
      } finally {
        for (const t of [xs, ...ws]) t.dispose();
      }
    }
    // sizes the device planned are checked there, raised at the next read (those read back were
    // checked on the host before a GEMM used them); shared ones once for the same rows
    if (sizes.device && (planned || !sizes.isRead) && shared?.checkedRows !== N) {
      deferSizesCheck(sizes.device, x);
      if (shared) shared.checkedRows = N;
    }
    if (!needsGrad(x, ...weights)) return out;
    const gradX = x.requiresGrad;
    const gradW = weights.map((w) => w.requiresGrad);
    const anyW = gradW.some(Boolean);
    // dx needs the weights, the weight gradients need x; the device sizes go along unless the
    // forward had to read them
    const keep = sizes.device && !sizes.isRead ? sizes.device : null;
    const save = [...(anyW ? [x] : []), ...(gradX ? weights : []), ...(keep ? [keep] : [])];
    return attachGrad(out, 'GroupedLinearBackward', [x, ...weights], save, (g, s) => {
      const sz = sizes.saved(keep ? s[s.length - 1] : null);
      const gs = unitStrided(g);
      const xs = anyW ? unitStrided(s[0]) : null;
      const ws = gradX ? s.slice(anyW ? 1 : 0, (anyW ? 1 : 0) + weights.length).map(unitStrided) : [];
      let dx: Tensor | null = null;
      try {
        if (gradX) {
          dx = alloc(backend, [N, K], g.dtype, F === 0);
          if (F > 0 && dx.numel > 0) rowsGemm(dx, gs, ws, false, sz);
        }
        const dws = xs ? weightGrads(gs, xs, gradW, sz) : gradW.map(() => null);
        return [dx, ...dws];
      } catch (e) {
        dx?.dispose();
        throw e;
      } finally {
        for (const t of [gs, ...(xs ? [xs] : []), ...ws]) t.dispose();
      }
    });
  } finally {
    owned?.dispose();
  }
}
