// Optimizer kernels: CPU registrations of native/src/optim.cc, and the helpers optimizers use
// to call a backend's kernel with contiguous operands. Other backends provide the same names
// through Backend.kernel().
import { packAdamWScalars, packSgd } from '../backend/abi.js';
import { defineCpuKernel, native, pack } from '../backend/cpu.js';
import { getKernel, type KernelName, type KernelTable } from '../backend/kernels.js';
import type { DType } from '../dtype.js';
import { argError, dtypeError, TensorError } from '../errors.js';
import { untrackTensor } from '../scope.js';
import { Tensor } from '../tensor.js';

/** Scalars of one AdamW update, computed in double as torch.optim.AdamW does in Python. */
export interface AdamWScalars {
  decay: number;
  beta1: number;
  beta2: number;
  bc2Sqrt: number;
  eps: number;
  negStep: number;
  /**
   * The update reads each gradient multiplied by this, rounded to the gradient's dtype as an
   * in-place multiply would (Megatron's clip coefficient, folded into the update instead of a
   * pass over the gradients; the gradients themselves are left as they are). 1 or absent: none.
   */
  gradScale?: number;
  /**
   * The gradient scale as a float64 tensor of one element on the parameters' device, in place of
   * `gradScale`: a clip coefficient computed there and not read back. The kernel reads it where it
   * runs; when it is not finite, the kernel writes nothing (parameter, moments and copy keep their
   * values: the step is skipped on the device, as torch's fused AdamW does with `found_inf`).
   */
  gradScaleTensor?: Tensor | null;
}

/**
 * One AdamW update of p with gradient g and moments m, v (see AdamWScalars). `copy`, when given,
 * also receives the updated parameter rounded to its own dtype: a float32 master's bfloat16 or
 * float16 model weight, written by the same pass (contiguous, p's numel).
 */
export type AdamWKernel = (
  p: Tensor,
  g: Tensor,
  m: Tensor,
  v: Tensor,
  s: AdamWScalars,
  copy?: Tensor | null,
) => void;

/**
 * adamwStep over lists of n tensors that share one set of scalars (one step count, lr and decay):
 * tensor i of each list is an operand of adamwStep, one dtype per list, all contiguous; the
 * results are bit-identical to n adamwStep calls, in fewer device launches. `copies`, when given,
 * holds each parameter's copy (adamwStep's `copy`), one dtype for the list.
 */
export type AdamWMultiKernel = (
  params: readonly Tensor[],
  grads: readonly Tensor[],
  expAvgs: readonly Tensor[],
  expAvgSqs: readonly Tensor[],
  s: AdamWScalars,
  copies?: readonly Tensor[] | null,
) => void;

export interface SgdScalars {
  lr: number;
  momentum: number;
  dampening: number;
  weightDecay: number;
  nesterov: boolean;
  first: boolean;
}

export type SgdKernel = (p: Tensor, g: Tensor, buf: Tensor | null, s: SgdScalars) => void;
/**
 * Writes into `out` (a 0-d float64 tensor on t's device) the sum of |x|^p over t, accumulated in
 * double (max |x| for p = Infinity); NaN propagates; 0 for an empty t. With `accumulate`, out
 * becomes out + that sum (max(out, that max), NaN winning) instead: the same bits as a separate
 * float64 add (maximum) of the two, without the scratch scalar and its launch.
 */
export type NormPowerSumKernel = (t: Tensor, p: number, out: Tensor, accumulate?: boolean) => void;
/**
 * The power sum of a list of contiguous tensors (any floating dtypes, empty ones ignored) as if
 * they were one, into `out` as normPowerSum does (written, or with `accumulate` added / maxed into
 * it; 0 for an empty list unless accumulating). A device kernel reads them in few launches (one
 * grid over all their chunks) and may group the float64 terms otherwise than one normPowerSum a
 * tensor; the composition is exactly that loop.
 */
export type NormPowerSumMultiKernel = (
  ts: readonly Tensor[],
  p: number,
  out: Tensor,
  accumulate?: boolean,
) => void;
/**
 * Multiplies t by invScale in place (unless it is 1) and sets `foundInf` (a float32 [1] flag on
 * t's device) to 1 when t held inf or NaN before scaling; the flag is never reset, so one flag
 * can collect the verdicts of many tensors.
 */
export type UnscaleCheckKernel = (t: Tensor, invScale: number, foundInf: Tensor) => void;

// looked up at call time: the addon loads with the first CPU tensor, not with this module
const call =
  (name: string): (() => unknown) =>
  () =>
    (native[name] as () => unknown)();
const adamwStep = call('adamwStep');
const sgdStep = call('sgdStep');
const normPowerSum = call('normPowerSum');
const unscaleCheck = call('unscaleCheck');

const cpuAdamwStep = defineCpuKernel('adamwStep', (p, g, m, v, s, copy) => {
  if (copy) checkAdamWCopy('adamwStep', p, copy);
  const scalars = hostAdamWScalars('adamwStep', p, s);
  if (!scalars) return;
  pack.begin().tensor(p).tensor(g).tensor(m).tensor(v);
  packAdamWScalars(pack, scalars, copy ?? null);
  adamwStep();
});

/**
 * Throws unless `s.gradScaleTensor` (when set) is a float64 tensor of one element on p's device.
 * A device kernel's check before it reads the scale where it runs.
 */
export function checkAdamWScaleTensor(kernel: string, p: Tensor, s: AdamWScalars): void {
  const t = s.gradScaleTensor;
  if (!t) return;
  if (t.dtype !== 'float64' || t.numel !== 1) {
    throw argError(kernel, `gradScaleTensor must be a float64 tensor of one element, got ${t.describe()}`);
  }
  if (t.device !== p.device) {
    throw new TensorError(
      'DEVICE_MISMATCH',
      `${kernel}: gradScaleTensor is on ${t.device} but the parameters are on ${p.device}`,
    );
  }
}

/**
 * The scalars with gradScaleTensor read into gradScale (the CPU computes in order, so the read
 * waits for nothing), or null when that scale is not finite: the update is skipped.
 */
function hostAdamWScalars(kernel: string, p: Tensor, s: AdamWScalars): AdamWScalars | null {
  if (!s.gradScaleTensor) return s;
  checkAdamWScaleTensor(kernel, p, s);
  const scale = s.gradScaleTensor.item();
  if (!Number.isFinite(scale)) return null;
  const { gradScaleTensor: _, ...rest } = s;
  return { ...rest, gradScale: scale };
}

/**
 * Throws unless `copy` can receive p's update (adamwStep's `copy`): p float32, copy a contiguous
 * bfloat16 or float16 tensor with p's numel.
 */
export function checkAdamWCopy(kernel: string, p: Tensor, copy: Tensor): void {
  if (p.dtype !== 'float32' || (copy.dtype !== 'bfloat16' && copy.dtype !== 'float16')) {
    throw dtypeError(
      kernel,
      `a parameter copy is written from a float32 parameter into bfloat16 or float16, got ${p.dtype} into ${copy.dtype}`,
    );
  }
  if (copy.numel !== p.numel || !copy.isContiguous) {
    throw argError(
      kernel,
      `the parameter copy must be contiguous with the parameter's ${p.numel} element(s), got ${copy.describe()}`,
    );
  }
}

/**
 * Throws unless the lists of an adamwStepMulti call have one tensor per parameter each and one
 * dtype per list (what lets a device run a whole list with one kernel instantiation).
 */
export function checkAdamWLists(
  params: readonly Tensor[],
  grads: readonly Tensor[],
  expAvgs: readonly Tensor[],
  expAvgSqs: readonly Tensor[],
  copies?: readonly Tensor[] | null,
): void {
  const n = params.length;
  if (
    grads.length !== n ||
    expAvgs.length !== n ||
    expAvgSqs.length !== n ||
    (copies && copies.length !== n)
  ) {
    throw argError(
      'adamwStepMulti',
      `got ${n} params, ${grads.length} grads, ${expAvgs.length} expAvgs and ${expAvgSqs.length} expAvgSqs${copies ? ` and ${copies.length} copies` : ''}; pass one of each per parameter`,
    );
  }
  const lists: [string, readonly Tensor[]][] = [
    ['params', params],
    ['grads', grads],
    ['expAvgs', expAvgs],
    ['expAvgSqs', expAvgSqs],
  ];
  if (copies) {
    lists.push(['copies', copies]);
    for (let i = 0; i < n; i++) checkAdamWCopy('adamwStepMulti', params[i], copies[i]);
  }
  for (const [what, list] of lists) {
    for (let i = 1; i < n; i++) {
      if (list[i].dtype !== list[0].dtype) {
        throw dtypeError(
          'adamwStepMulti',
          `${what}[${i}] is ${list[i].dtype} but ${what}[0] is ${list[0].dtype}; split the list by dtype`,
        );
      }
    }
  }
}

// The CPU has no launch cost to save: the list is the native per-tensor kernel in a loop.
defineCpuKernel('adamwStepMulti', (ps, gs, ms, vs, s, copies) => {
  checkAdamWLists(ps, gs, ms, vs, copies);
  if (ps.length === 0) return;
  // the scale read once for the list
  const scalars = hostAdamWScalars('adamwStepMulti', ps[0], s);
  if (!scalars) return;
  for (let i = 0; i < ps.length; i++) cpuAdamwStep(ps[i], gs[i], ms[i], vs[i], scalars, copies?.[i] ?? null);
});

defineCpuKernel('sgdStep', (p, g, buf, s) => {
  packSgd(pack, p, g, buf, s);
  sgdStep();
});

/** Throws unless `t` is a contiguous tensor of `dtype` with `n` elements (a kernel's output operand). */
function checkOutput(kernel: string, what: string, t: Tensor, dtype: DType, n: number): void {
  if (t.dtype !== dtype || t.numel !== n || !t.isContiguous) {
    throw new Error(
      `${kernel}: ${what} must be a contiguous ${dtype} tensor of ${n} element(s), got ${t.describe()}`,
    );
  }
}

defineCpuKernel('normPowerSum', (t, p, out, accumulate = false) => {
  checkOutput('normPowerSum', 'out', out, 'float64', 1);
  pack.begin().tensor(t).num(p);
  let v = normPowerSum() as number;
  if (accumulate) v = combinePowerSums(out.item(), v, p);
  out.backend.write(out, Float64Array.of(v));
});

/** Two power sums combined as normPowerSum's `accumulate` does: a + b, or max(a, b) for p = +-Infinity (NaN wins). */
export function combinePowerSums(a: number, b: number, p: number): number {
  if (Math.abs(p) !== Number.POSITIVE_INFINITY) return a + b;
  return Math.max(a, b); // NaN if either is
}

defineCpuKernel('unscaleCheck', (t, invScale, foundInf) => {
  checkOutput('unscaleCheck', 'foundInf', foundInf, 'float32', 1);
  pack.begin().tensor(t).num(invScale);
  if ((unscaleCheck() as number) !== 0) foundInf.backend.write(foundInf, Float32Array.of(1));
});

/** The named kernel of a tensor's backend, or a clear error when the backend lacks it. */
export function kernelFor<K extends KernelName>(t: Tensor, name: K): KernelTable[K] {
  const k = getKernel(t.backend, name);
  if (!k) throw new TensorError('UNSUPPORTED', `${name}: backend "${t.device}" has no ${name} kernel`);
  return k;
}

/**
 * A contiguous tensor of `dtype` with t's values: t itself when it already is one, else an
 * untracked copy that the caller disposes (and copies back when the kernel wrote to it).
 */
export function dense(t: Tensor, dtype: DType = t.dtype): Tensor {
  if (t.isContiguous && t.dtype === dtype) return t;
  const c = Tensor.empty(t.backend, t.shape, dtype);
  untrackTensor(c);
  if (c.numel > 0) c.backend.copy(c, t);
  return c;
}

/** Finishes a dense() operand: writes it back into `orig` when `writeBack`, then frees it. */
export function release(tmp: Tensor, orig: Tensor, writeBack: boolean): void {
  if (tmp === orig) return;
  if (writeBack && tmp.numel > 0) orig.backend.copy(orig, tmp);
  tmp.dispose();
}
