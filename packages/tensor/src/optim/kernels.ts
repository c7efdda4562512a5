// Optimizer kernels: CPU registrations of native/src/optim.cc, and the helpers optimizers use
// to call a backend's kernel with contiguous operands. Other backends provide the same names
// through Backend.kernel().
import { defineCpuKernel, native, pack } from '../backend/cpu.js';
import { getKernel, type KernelName, type KernelTable } from '../backend/kernels.js';
import type { DType } from '../dtype.js';
import { TensorError } from '../errors.js';
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

export interface SgdScalars {
  lr: number;
  momentum: number;
  dampening: number;
  weightDecay: number;
  nesterov: boolean;
  first: boolean;
}

export type SgdKernel = (p: Tensor, g: Tensor, buf: Tensor | null, s: SgdScalars) => void;
/** Sum of |x|^p over a tensor (max |x| for p = Infinity); NaN propagates. */
export type NormPowerSumKernel = (t: Tensor, p: number) => number;
/** Multiplies t by invScale in place; returns whether t held a non-finite value. */
export type UnscaleCheckKernel = (t: Tensor, invScale: number) => boolean;

// looked up at call time: the addon loads with the first CPU tensor, not with this module
const call =
  (name: string): (() => unknown) =>
  () =>
    (native[name] as () => unknown)();
const adamwStep = call('adamwStep');
const sgdStep = call('sgdStep');
const normPowerSum = call('normPowerSum');
const unscaleCheck = call('unscaleCheck');

defineCpuKernel('adamwStep', (p, g, m, v, s) => {
  pack
    .begin()
    .tensor(p)
    .tensor(g)
    .tensor(m)
    .tensor(v)
    .num(s.decay)
    .num(s.beta1)
    .num(1 - s.beta1)
    .num(s.beta2)
    .num(1 - s.beta2)
    .num(s.bc2Sqrt)
    .num(s.eps)
    .num(s.negStep);
  adamwStep();
});

defineCpuKernel('sgdStep', (p, g, buf, s) => {
  pack
    .begin()
    .tensor(p)
    .tensor(g)
    .num(buf ? 1 : 0);
  if (buf) pack.tensor(buf);
  pack
    .num(-s.lr)
    .num(s.momentum)
    .num(1 - s.dampening)
    .num(s.weightDecay)
    .num(s.nesterov ? 1 : 0)
    .num(s.first ? 1 : 0);
  sgdStep();
});

defineCpuKernel('normPowerSum', (t, p) => {
  pack.begin().tensor(t).num(p);
  return normPowerSum() as number;
});

defineCpuKernel('unscaleCheck', (t, invScale) => {
  pack.begin().tensor(t).num(invScale);
  return (unscaleCheck() as number) !== 0;
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
