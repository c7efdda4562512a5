// The calling convention of megapatch's native backends (the CPU addon here, @megapatch/cuda's
// addon): JavaScript writes a kernel's arguments into a Float64Array the addon was given once
// (setArgBuffer) and calls the entry with no JS arguments, which keeps a call to a few hundred
// nanoseconds. A tensor is written as (address of element 0 of its view, dtype code, ndim,
// shape..., strides in elements...); op and distribution codes are the tables below. Every native
// backend reads the same layout, so these codes must match the native enums (common.h here,
// common.cuh and the kernel files in @megapatch/cuda).

import { DTYPE_CODES, ITEMSIZE } from '../dtype.js';
import type { GatedActivation } from '../ops/glu.js';
import type { LinearActivation } from '../ops/linear-activation.js';
import type { AdamWScalars, SgdScalars } from '../optim/kernels.js';
import type { Tensor } from '../tensor.js';
import type { BinaryOp, GemmOperand, RandomDist, ReduceOp, UnaryOp } from './backend.js';

export { DTYPE_CODES, ITEMSIZE };

export const UNARY_CODES: Readonly<Record<UnaryOp, number>> = {
  neg: 0,
  exp: 1,
  log: 2,
  sqrt: 3,
  rsqrt: 4,
  abs: 5,
  tanh: 6,
  sigmoid: 7,
  silu: 8,
  gelu: 9,
  geluTanh: 10,
  relu: 11,
  sin: 12,
  cos: 13,
  square: 14,
  reciprocal: 15,
  sign: 16,
  log1p: 17,
  expm1: 18,
  floor: 19,
  ceil: 20,
  round: 21,
  clamp: 22,
  logicalNot: 23,
  isnan: 24,
  isinf: 25,
};

export const BINARY_CODES: Readonly<Record<BinaryOp, number>> = {
  add: 0,
  sub: 1,
  mul: 2,
  div: 3,
  pow: 4,
  maximum: 5,
  minimum: 6,
  eq: 7,
  ne: 8,
  lt: 9,
  le: 10,
  gt: 11,
  ge: 12,
  logicalAnd: 13,
  logicalOr: 14,
  siluBackward: 15,
  geluBackward: 16,
  geluTanhBackward: 17,
  sigmoidBackward: 18,
  tanhBackward: 19,
  reluBackward: 20,
  atan2: 21,
};

export const REDUCE_CODES: Readonly<Record<ReduceOp, number>> = {
  sum: 0,
  mean: 1,
  max: 2,
  min: 3,
  argmax: 4,
  argmin: 5,
  var: 6,
  logsumexp: 7,
  norm: 8,
  prod: 9,
};

export const DIST_CODES: Readonly<Record<RandomDist, number>> = {
  uniform: 0,
  normal: 1,
  randint: 2,
  bernoulli: 3,
};

/** The activation argument of the gated-activation kernels (native/src/glu.cc, kernels/glu.cu). */
export const GATED_ACTIVATION_CODES: Readonly<Record<GatedActivation, number>> = {
  swiglu: 0,
  geglu: 1,
  'geglu-tanh': 2,
};

/**
 * The activation argument of the linear-activation kernel (@megapatch/cuda's kernels/gemm.h
 * GemmAct; 0 there is no activation).
 */
export const LINEAR_ACTIVATION_CODES: Readonly<Record<LinearActivation, number>> = {
  relu: 1,
  gelu: 2,
  'gelu-tanh': 3,
};

/**
 * Writes kernel arguments into its buffer `args`: `pack.begin()`, then `tensor()` / `num()` in the
 * order the native entry reads them, then call the entry with no arguments.
 */
export interface Packer {
  /** The buffer to hand to the addon's setArgBuffer. */
  readonly args: Float64Array;
  begin(): Packer;
  tensor(t: Tensor): Packer;
  num(v: number): Packer;
  /** Address of element 0 of a tensor's view. */
  address(t: Tensor): number;
}

/** A packer with its own argument buffer (8192 doubles: 16-dimensional tensors by the dozen). */
export function createPacker(size = 8192): Packer {
  const args = new Float64Array(size);
  let pos = 0;
  const packer: Packer = {
    args,
    begin() {
      pos = 0;
      return packer;
    },
    tensor(t) {
      const shape = t.shape;
      const strides = t.strides;
      const nd = shape.length;
      args[pos] = t.storage.address + t.offset * ITEMSIZE[t.dtype];
      args[pos + 1] = DTYPE_CODES[t.dtype];
      args[pos + 2] = nd;
      for (let i = 0; i < nd; i++) {
        args[pos + 3 + i] = shape[i];
        args[pos + 3 + nd + i] = strides[i];
      }
      pos += 3 + 2 * nd;
      return packer;
    },
    num(v) {
      args[pos++] = v;
      return packer;
    },
    address(t) {
      return t.storage.address + t.offset * ITEMSIZE[t.dtype];
    },
  };
  return packer;
}

// ---- the arguments of the entries every native backend shares --------------------------------
// Each writes one entry's arguments after pack.begin(), in the order the native entry reads them
// (the CPU addon's native/src and @megapatch/cuda's native/src/backend read the same layout).

/** gemm(dtype, batch, M, N, K, A, B (address, batch/row/column strides), C (address, bs, rs), alpha, beta). */
export function packGemm(
  pack: Packer,
  batch: number,
  M: number,
  N: number,
  K: number,
  a: GemmOperand,
  b: GemmOperand,
  c: GemmOperand,
  alpha: number,
  beta: number,
): void {
  pack.begin().num(DTYPE_CODES[c.tensor.dtype]).num(batch).num(M).num(N).num(K);
  for (const m of [a, b]) pack.num(pack.address(m.tensor)).num(m.bs).num(m.rs).num(m.cs);
  pack.num(pack.address(c.tensor)).num(c.bs).num(c.rs).num(alpha).num(beta);
}

const U32 = 2 ** 32;

/** philox(out, dist, seed low / high 32 bits, offset, a, b): the Philox streams of random(). */
export function packPhilox(
  pack: Packer,
  out: Tensor,
  dist: RandomDist,
  seed: bigint,
  offset: bigint | number,
  a: number,
  b: number,
): void {
  const s = BigInt.asUintN(64, seed);
  pack
    .begin()
    .tensor(out)
    .num(DIST_CODES[dist])
    .num(Number(s % BigInt(U32)))
    .num(Number(s / BigInt(U32)))
    .num(Number(offset))
    .num(a)
    .num(b);
}

/**
 * The scalars of an AdamW update (after its tensors), then the gradient scale and, for adamwStep,
 * whether a parameter copy follows and the copy (`copy` undefined: adamwStepMulti, whose copies
 * travel with each parameter's tensors).
 */
export function packAdamWScalars(pack: Packer, s: AdamWScalars, copy?: Tensor | null): void {
  pack
    .num(s.decay)
    .num(s.beta1)
    .num(1 - s.beta1)
    .num(s.beta2)
    .num(1 - s.beta2)
    .num(s.bc2Sqrt)
    .num(s.eps)
    .num(s.negStep)
    .num(s.gradScale ?? 1);
  if (copy !== undefined) {
    pack.num(copy ? 1 : 0);
    if (copy) pack.tensor(copy);
  }
}

/** sgdStep(p, g, has buffer, buffer?, -lr, momentum, 1 - dampening, weight decay, nesterov, first). */
export function packSgd(pack: Packer, p: Tensor, g: Tensor, buf: Tensor | null, s: SgdScalars): void {
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
}
