// Rotary position embedding (RoPE) in the HF Llama "rotate half" layout: cos/sin tables with the
// frequencies listed twice, and a fused kernel applying x * cos + rotate_half(x) * sin.
import { attachGrad, needsGrad } from '../autograd/record.js';
import { defineCpuKernel, native, pack } from '../backend/cpu.js';
import { getKernel } from '../backend/kernels.js';
import { isFloating } from '../dtype.js';
import { argError, dtypeError, fmtShape, shapeError, TensorError } from '../errors.js';
import type { Tensor } from '../tensor.js';
import { fromTypedArray } from './creation.js';
import { allocLike, gradDestination, inputsBackend } from './util.js';

/** Frequency scaling of long-context models (HF `rope_scaling`). */
export type RopeScaling =
  | { type: 'linear'; factor: number }
  | {
      type: 'llama3';
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      originalMaxPositionEmbeddings: number;
    };

export interface RopeOptions {
  /** rope_theta; 10000 by default. */
  base?: number;
  scaling?: RopeScaling;
}

/** The fused kernel: out = rope(x) or, with inverse, its transpose (the gradient w.r.t. x). */
export type RopeKernel = (out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, inverse: boolean) => void;

defineCpuKernel('ropeApply', (out, x, cos, sin, inverse) => {
  pack
    .begin()
    .tensor(out)
    .tensor(x)
    .tensor(cos)
    .tensor(sin)
    .num(inverse ? 1 : 0);
  native.ropeApply();
});

const f = Math.fround;

// Every step is rounded to fp32 where HF computes in fp32, so the tables match its values to
// the last bit in almost every entry (torch's fp32 pow/cos may differ by one ulp).
function inverseFrequencies(dim: number, base: number, scaling: RopeScaling | undefined): Float32Array {
  const half = dim / 2;
  const inv = new Float32Array(half);
  for (let k = 0; k < half; k++) inv[k] = f(1 / f(base ** f((2 * k) / dim)));
  if (scaling?.type !== 'llama3') return inv;
  const { factor, lowFreqFactor, highFreqFactor, originalMaxPositionEmbeddings: oldCtx } = scaling;
  const lowWavelen = f(oldCtx / lowFreqFactor);
  const highWavelen = f(oldCtx / highFreqFactor);
  const twoPi = f(2 * Math.PI);
  const out = new Float32Array(half);
  for (let k = 0; k < half; k++) {
    // torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar
    const wavelen = f(f(1 / inv[k]) * twoPi);
    let v = wavelen > lowWavelen ? f(inv[k] / factor) : inv[k];
    const medium = !(wavelen < highWavelen) && !(wavelen > lowWavelen);
    if (medium) {
      const smooth = f(f(f(f(1 / wavelen) * oldCtx) - lowFreqFactor) / f(highFreqFactor - lowFreqFactor));
      v = f(f(f(f(1 - smooth) * v) / factor) + f(smooth * v));
    }
    out[k] = v;
  }
  return out;
}

/**
 * cos/sin tables [S, dim] (positions [S]) or [B, S, dim] (positions [B, S]), float32, HF layout:
 * angle(p, j) = p * inv_freq[j mod dim/2] computed in fp32 as HF does; linear scaling divides the
 * positions by its factor, llama3 scaling rescales inv_freq as HF `_compute_llama3_parameters`.
 */
export function ropeCosSin(
  positionIds: Tensor,
  dim: number,
  options: RopeOptions = {},
): { cos: Tensor; sin: Tensor } {
  inputsBackend('ropeCosSin', positionIds);
  if (positionIds.dtype !== 'int32' && positionIds.dtype !== 'int64') {
    throw dtypeError('ropeCosSin', `positionIds must be int32 or int64, got ${positionIds.dtype}`);
  }
  if (positionIds.ndim !== 1 && positionIds.ndim !== 2) {
    throw shapeError('ropeCosSin', `positionIds must be [S] or [B, S], got ${fmtShape(positionIds.shape)}`);
  }
  if (!Number.isInteger(dim) || dim <= 0 || dim % 2 !== 0) {
    throw argError('ropeCosSin', `dim must be a positive even integer, got ${dim}`);
  }
  const base = options.base ?? 10000;
  if (!(base > 0) || !Number.isFinite(base))
    throw argError('ropeCosSin', `base must be positive, got ${base}`);
  const scaling = options.scaling;
  if (scaling) {
    if (!(scaling.factor > 0))
      throw argError('ropeCosSin', `scaling factor must be positive, got ${scaling.factor}`);
    if (scaling.type === 'llama3') {
      if (!(scaling.highFreqFactor > scaling.lowFreqFactor) || !(scaling.lowFreqFactor > 0)) {
        throw argError('ropeCosSin', 'llama3 scaling needs 0 < lowFreqFactor < highFreqFactor');
      }
      if (!(scaling.originalMaxPositionEmbeddings > 0)) {
        throw argError('ropeCosSin', 'llama3 scaling needs originalMaxPositionEmbeddings > 0');
      }
    } else if (scaling.type !== 'linear') {
      throw argError('ropeCosSin', `unknown scaling type ${(scaling as { type: string }).type}`);
    }
  }
  const inv = inverseFrequencies(dim, base, scaling);
  const linear = scaling?.type === 'linear' ? scaling.factor : 0;
  const raw = positionIds.toTypedArray();
  const n = raw.length;
  const half = dim / 2;
  const cos = new Float32Array(n * dim);
  const sin = new Float32Array(n * dim);
  for (let i = 0; i < n; i++) {
    let p = f(Number(raw[i]));
    if (linear) p = f(p / linear);
    const row = i * dim;
    for (let k = 0; k < half; k++) {
      const angle = f(p * inv[k]);
      const c = f(Math.cos(angle));
      const s = f(Math.sin(angle));
      cos[row + k] = c;
      cos[row + k + half] = c;
      sin[row + k] = s;
      sin[row + k + half] = s;
    }
  }
  const shape = [...positionIds.shape, dim];
  const device = positionIds.device;
  return { cos: fromTypedArray(cos, shape, { device }), sin: fromTypedArray(sin, shape, { device }) };
}

// cos/sin as [B, S, R] views for the kernel (batch stride 0 for shared [S, R] tables).
function tableView(t: Tensor, B: number): Tensor {
  if (t.ndim === 3 && (t.shape[0] === B || B === 1)) return t.viewAs(t.shape, t.strides, t.offset);
  // one table for every batch row: [S, R], or [1, S, R] broadcast over B
  const [S, R] = t.shape.slice(-2);
  const [ss, rs] = t.strides.slice(-2);
  return t.viewAs([B, S, R], [0, ss, rs], t.offset);
}

/**
 * RoPE on x [B, H, S, D] with cos/sin [S, R], [1, S, R] (one table for every batch row, as HF's
 * position_ids [1, S] give) or [B, S, R] (R <= D, even): the first R channels
 * rotate (x * cos + rotate_half(x) * sin), the rest pass through; returns [B, H, S, D] in x's
 * dtype, computed in fp32 for 16-bit inputs. Gradients flow to x only: cos/sin are constants.
 */
export function applyRotaryPosEmb(x: Tensor, cos: Tensor, sin: Tensor): Tensor {
  const backend = inputsBackend('applyRotaryPosEmb', x, cos, sin);
  if (x.ndim !== 4) throw shapeError('applyRotaryPosEmb', `x must be [B, H, S, D], got ${fmtShape(x.shape)}`);
  if (!isFloating(x.dtype)) throw dtypeError('applyRotaryPosEmb', `x must be floating-point, got ${x.dtype}`);
  if (!isFloating(cos.dtype) || cos.dtype !== sin.dtype) {
    throw dtypeError(
      'applyRotaryPosEmb',
      `cos and sin must share a floating-point dtype, got ${cos.dtype} and ${sin.dtype}`,
    );
  }
  if (cos.ndim !== sin.ndim || cos.shape.some((s, i) => s !== sin.shape[i])) {
    throw shapeError('applyRotaryPosEmb', `cos ${fmtShape(cos.shape)} and sin ${fmtShape(sin.shape)} differ`);
  }
  const [B, , S, D] = x.shape;
  const ok =
    (cos.ndim === 2 && cos.shape[0] === S) ||
    (cos.ndim === 3 && (cos.shape[0] === B || cos.shape[0] === 1) && cos.shape[1] === S);
  if (!ok) {
    throw shapeError(
      'applyRotaryPosEmb',
      `cos/sin must be [S, R], [1, S, R] or [B, S, R] with B = ${B}, S = ${S}; got ${fmtShape(cos.shape)} for x ${fmtShape(x.shape)}`,
    );
  }
  const R = cos.shape[cos.ndim - 1];
  if (R % 2 !== 0 || R > D || R === 0) {
    throw shapeError(
      'applyRotaryPosEmb',
      `rotary dim ${R} must be even, nonzero and at most the head dim ${D}`,
    );
  }
  const kernel = getKernel(backend, 'ropeApply');
  if (!kernel)
    throw new TensorError('UNSUPPORTED', `applyRotaryPosEmb: no fused RoPE kernel on ${backend.device}`);
  const c3 = tableView(cos, B);
  const s3 = tableView(sin, B);
  // in x's memory order where the backend prefers it (allocLike): RoPE on a permuted view keeps it
  const out = allocLike(backend, x.shape, x.dtype, x);
  kernel(out, x, c3, s3, false);
  if (needsGrad(x)) {
    const dtype = x.dtype;
    // x's gradient goes where the engine says it ends up (dest: q's or k's region of the fused QKV
    // projection's gradient when x is a view of it), else into a new tensor in g's layout
    attachGrad(
      out,
      'RotaryPosEmbBackward',
      [x],
      [c3, s3],
      (g, [cs, sn], _pending, dest) => {
        const gx = gradDestination(dest, 0, g.shape, dtype, g);
        const gg = g.dtype === dtype ? g : g.to(dtype);
        kernel(gx, gg, cs, sn, true);
        if (gg !== g) gg.dispose();
        return [gx];
      },
      { takesDestinations: true },
    );
  }
  c3.dispose();
  s3.dispose();
  return out;
}
