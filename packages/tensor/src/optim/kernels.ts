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
}

export type AdamWKernel = (p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: AdamWScalars) => void;

/**
 * adamwStep over lists of n tensors that share one set of scalars (one step count, lr and decay):
 * tensor i of each list is an operand of adamwStep, one dtype per list, all contiguous; the
 * results are bit-identical to n adamwStep calls, in fewer device launches.
 */
export type AdamWMultiKernel = (
  params: readonly Tensor[],
  grads: readonly Tensor[],
  expAvgs: readonly Tensor[],
  expAvgSqs: readonly Tensor[],
  s: AdamWScalars,
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
 * double (max |x| for p = Infinity); NaN propagates; 0 for an empty t.
 */
export type NormPowerSumKernel = (t: Tensor, p: number, out: Tensor) => void;
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

const cpuAdamwStep = defineCpuKernel('adamwStep', (p, g, m, v, s) => {
  pack.begin().tensor(p).tensor(g).tensor(m).tensor(v);
  packAdamWScalars(pack, s);
  adamwStep();
});

/**
 * Throws unless the lists of an adamwStepMulti call have one tensor per parameter each and one
 * dtype per list (what lets a device run a whole list with one kernel instantiation).
 */
export function checkAdamWLists(
  params: readonly Tensor[],
  grads: readonly Tensor[],
  expAvgs: readonly Tensor[],
  expAvgSqs: readonly Tensor[],
): void {
  const n = params.length;
  if (grads.length !== n || expAvgs.length !== n || expAvgSqs.length !== n) {
    throw argError(
      'adamwStepMulti',
      `got ${n} params, ${grads.length} grads, ${expAvgs.length} expAvgs and ${expAvgSqs.length} expAvgSqs; pass one of each per parameter`,
    );
  }
  const lists: [string, readonly Tensor[]][] = [
    ['params', params],
    ['grads', grads],
    ['expAvgs', expAvgs],
    ['expAvgSqs', expAvgSqs],
  ];
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
defineCpuKernel('adamwStepMulti', (ps, gs, ms, vs, s) => {
  checkAdamWLists(ps, gs, ms, vs);
  for (let i = 0; i < ps.length; i++) cpuAdamwStep(ps[i], gs[i], ms[i], vs[i], s);
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

defineCpuKernel('normPowerSum', (t, p, out) => {
  checkOutput('normPowerSum', 'out', out, 'float64', 1);
  pack.begin().tensor(t).num(p);
  out.backend.write(out, Float64Array.of(normPowerSum() as number));
});

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
