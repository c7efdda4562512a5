// Scaled dot-product attention with torch.nn.functional.scaled_dot_product_attention semantics,
// plus grouped-query attention and packed variable-length rows, on a fused flash-attention style
// kernel (native/src/attention.cc) that saves only the per-row logsumexp for the backward.
import { noGrad } from '../autograd/graph.js';
import { attachGrad, needsGrad } from '../autograd/record.js';
import { defineCpuKernel, native, pack } from '../backend/cpu.js';
import { getFallbackKernel, getKernel } from '../backend/kernels.js';
import { isFloating } from '../dtype.js';
import { argError, dtypeError, fmtShape, shapeError, TensorError } from '../errors.js';
import { defaultGenerator, type Generator, rand } from '../random.js';
import { tidy } from '../scope.js';
import { deferCheck } from '../sync.js';
import type { Tensor } from '../tensor.js';
import { cat } from './shape.js';
import { alloc, allocLike, gradDestination, inputsBackend } from './util.js';

export interface AttentionOptions {
  /**
   * bool (true = attend) or additive floating-point mask, broadcastable to [B, Hq, Sq, Sk]. It is
   * a constant: no gradient flows to it. Combines with isCausal and cuSeqlens (all must allow).
   */
  attnMask?: Tensor | null;
  /** Query i attends to keys j <= i (top-left aligned, as tril(ones(Sq, Sk))). */
  isCausal?: boolean;
  /** Score scale; 1/sqrt(D) by default. */
  scale?: number;
  /**
   * Packed variable-length rows (int32/int64 [nseq + 1], cumulative starts from 0 to the token
   * count): needs B = 1 and Sq = Sk; tokens attend only within their own sequence.
   */
  cuSeqlens?: Tensor | null;
  /**
   * Dropout on the attention probabilities (torch's `dropout_p`): each is zeroed with probability
   * p and the others scaled by 1/(1-p), drawn from `generator` (default: the default generator).
   * Apply it in training only, as torch's callers do. Default 0.
   */
  dropoutP?: number;
  /**
   * The dropout multipliers themselves, broadcastable to [B, Hq, Sq, Sk] (0 = dropped, else the
   * scale, e.g. 1/(1-p)): for masks drawn by the caller at positions of its own (a constant, no
   * gradient flows to it). Excludes dropoutP.
   */
  dropoutMask?: Tensor | null;
  /** Generator of dropoutP's mask (default: the default generator). */
  generator?: Generator;
}

/** Options the kernels receive once validated: the masks as [B, Hq, Sq, Sk] views. */
export interface AttentionKernelOptions {
  mask: Tensor | null;
  cuSeqlens: Tensor | null;
  causal: boolean;
  scale: number;
  /**
   * Dropout multipliers of the probabilities (out = (P ∘ dropout) V), or null/absent. Only the
   * composition from core ops receives them: the fused kernels have no dropout.
   */
  dropout?: Tensor | null;
}

/** out [B, Hq, Sq, Dv] and lse [B, Hq, Sq] (float64 for float64 inputs, else float32) from q, k, v. */
export type AttentionForwardKernel = (
  out: Tensor,
  lse: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  opts: AttentionKernelOptions,
) => void;

/** dq, dk, dv from the upstream gradient and the forward's inputs, output and lse. */
export type AttentionBackwardKernel = (
  dq: Tensor,
  dk: Tensor,
  dv: Tensor,
  gradOut: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  opts: AttentionKernelOptions,
) => void;

function packOptions(o: AttentionKernelOptions): void {
  pack.num(o.mask ? 1 : 0);
  if (o.mask) pack.tensor(o.mask);
  pack.num(o.cuSeqlens ? 1 : 0);
  if (o.cuSeqlens) pack.tensor(o.cuSeqlens);
  pack.num(o.causal ? 1 : 0).num(o.scale);
}

defineCpuKernel('attentionForward', (out, lse, q, k, v, opts) => {
  pack.begin().tensor(out).tensor(lse).tensor(q).tensor(k).tensor(v);
  packOptions(opts);
  native.attentionForward();
});

defineCpuKernel('attentionBackward', (dq, dk, dv, g, q, k, v, out, lse, opts) => {
  pack
    .begin()
    .tensor(dq)
    .tensor(dk)
    .tensor(dv)
    .tensor(g)
    .tensor(q)
    .tensor(k)
    .tensor(v)
    .tensor(out)
    .tensor(lse);
  packOptions(opts);
  native.attentionBackward();
});

const OP = 'scaledDotProductAttention';

// The mask as a [B, Hq, Sq, Sk] view with stride 0 along broadcast dimensions.
function maskView(mask: Tensor, target: readonly number[], name = 'attnMask'): Tensor {
  if (mask.dtype !== 'bool' && !isFloating(mask.dtype)) {
    throw dtypeError(OP, `${name} must be bool or floating-point, got ${mask.dtype}`);
  }
  if (mask.ndim > 4) throw shapeError(OP, `${name} ${fmtShape(mask.shape)} has more than 4 dimensions`);
  const lead = 4 - mask.ndim;
  const strides: number[] = [];
  for (let i = 0; i < 4; i++) {
    const src = i - lead;
    if (src < 0) {
      strides.push(0);
      continue;
    }
    const have = mask.shape[src];
    if (have === target[i]) strides.push(have === 1 ? 0 : mask.strides[src]);
    else if (have === 1) strides.push(0);
    else {
      throw shapeError(
        OP,
        `${name} ${fmtShape(mask.shape)} does not broadcast to [B, Hq, Sq, Sk] = ${fmtShape(target)}`,
      );
    }
  }
  return mask.viewAs(target, strides, mask.offset);
}

function checkCuSeqlens(cu: Tensor, B: number, Sq: number, Sk: number): void {
  if (cu.dtype !== 'int32' && cu.dtype !== 'int64')
    throw dtypeError(OP, `cuSeqlens must be int32 or int64, got ${cu.dtype}`);
  if (cu.ndim !== 1 || cu.shape[0] < 2) {
    throw shapeError(OP, `cuSeqlens must be [nseq + 1] with at least 2 entries, got ${fmtShape(cu.shape)}`);
  }
  if (B !== 1) throw shapeError(OP, `cuSeqlens packs sequences into one row: batch must be 1, got ${B}`);
  if (Sq !== Sk) throw shapeError(OP, `cuSeqlens needs Sq = Sk (packed self-attention), got ${Sq} and ${Sk}`);
  if (cu.backend.synchronous === false) {
    deferCuSeqlensCheck(cu, Sq);
    return;
  }
  const vals = Array.from(cu.toTypedArray() as ArrayLike<number | bigint>, Number);
  if (vals[0] !== 0) throw argError(OP, `cuSeqlens must start at 0, got ${vals[0]}`);
  for (let i = 1; i < vals.length; i++) {
    if (vals[i] < vals[i - 1]) {
      throw argError(
        OP,
        `cuSeqlens must be non-decreasing, got ${vals[i - 1]} then ${vals[i]} at index ${i}`,
      );
    }
  }
  const last = vals[vals.length - 1];
  if (last !== Sq) throw argError(OP, `cuSeqlens must end at the token count ${Sq}, got ${last}`);
}

/**
 * The same checks where cuSeqlens lives, on an asynchronous device: its first and last values,
 * whether a step decreases, the first such step and its two values, computed there and queued as
 * a deferred check (sync.ts), so that packed attention does not wait for the device at every
 * layer; the next host read raises the host check's error. The kernels clamp every range to the
 * rows, so a bad cuSeqlens yields wrong values until then, never an access outside the tensors.
 */
function deferCuSeqlensCheck(cu: Tensor, Sq: number): void {
  const n = cu.shape[0];
  const values = noGrad(() =>
    tidy(() => {
      const c = cu.to('float64'); // exact: boundaries stay far below 2^53
      const prev = c.narrow(0, 0, n - 1);
      const next = c.narrow(0, 1, n - 1);
      const down = next.lt(prev).to('int32');
      const at = down.argmax().reshape(1); // the first decreasing step (0 when none)
      return cat([
        c.narrow(0, 0, 1),
        c.narrow(0, n - 1, 1),
        down.amax().to('float64').reshape(1),
        at.to('float64'),
        prev.gather(0, at),
        next.gather(0, at),
      ]);
    }),
  );
  deferCheck(values, ([first, last, anyDown, at, a, b]) => {
    if (first !== 0) return argError(OP, `cuSeqlens must start at 0, got ${first}`);
    if (anyDown) {
      return argError(OP, `cuSeqlens must be non-decreasing, got ${a} then ${b} at index ${at + 1}`);
    }
    if (last !== Sq) return argError(OP, `cuSeqlens must end at the token count ${Sq}, got ${last}`);
    return null;
  });
}

/**
 * Attention softmax(q k^T * scale + mask) v for q [B, Hq, Sq, D], k [B, Hkv, Sk, D],
 * v [B, Hkv, Sk, Dv] → [B, Hq, Sq, Dv] in q's dtype (fp32 math for 16-bit inputs). Hq must be a
 * multiple of Hkv (query head h reads kv head floor(h / (Hq / Hkv)), without copying K/V). Rows
 * with nothing to attend to give zeros and zero gradients. Differentiable in q, k and v. With
 * dropout (dropoutP or dropoutMask) it runs as the composition from core ops on every backend
 * (the fused kernels have none), keeping the mask for the backward.
 */
export function scaledDotProductAttention(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  options: AttentionOptions = {},
): Tensor {
  const attnMask = options.attnMask ?? null;
  const cuSeqlens = options.cuSeqlens ?? null;
  const backend = inputsBackend(OP, q, k, v, attnMask, cuSeqlens, options.dropoutMask ?? null);
  if (q.ndim !== 4 || k.ndim !== 4 || v.ndim !== 4) {
    throw shapeError(
      OP,
      `q, k, v must be [B, H, S, D], got ${fmtShape(q.shape)}, ${fmtShape(k.shape)} and ${fmtShape(v.shape)}`,
    );
  }
  if (!isFloating(q.dtype)) throw dtypeError(OP, `expected floating-point inputs, got ${q.dtype}`);
  if (k.dtype !== q.dtype || v.dtype !== q.dtype) {
    throw dtypeError(OP, `q, k, v must share a dtype, got ${q.dtype}, ${k.dtype} and ${v.dtype}`);
  }
  const [B, Hq, Sq, D] = q.shape;
  const [Bk, Hkv, Sk, Dk] = k.shape;
  const [Bv, Hv, Sv, Dv] = v.shape;
  if (Bk !== B || Bv !== B) throw shapeError(OP, `batch sizes differ: q ${B}, k ${Bk}, v ${Bv}`);
  if (Dk !== D) throw shapeError(OP, `head dims differ: q has ${D}, k has ${Dk}`);
  if (Hv !== Hkv || Sv !== Sk) {
    throw shapeError(OP, `k ${fmtShape(k.shape)} and v ${fmtShape(v.shape)} must agree on heads and length`);
  }
  if (Hkv === 0 || Hq % Hkv !== 0) {
    throw shapeError(OP, `query heads (${Hq}) must be a multiple of key/value heads (${Hkv})`);
  }
  const scale = options.scale ?? 1 / Math.sqrt(D);
  if (!Number.isFinite(scale)) throw argError(OP, `scale must be a finite number, got ${scale}`);
  if (cuSeqlens) checkCuSeqlens(cuSeqlens, B, Sq, Sk);
  const dropout = dropoutOf(options, q, [B, Hq, Sq, Sk]);
  const fwd = dropout ? getFallbackKernel('attentionForward') : getKernel(backend, 'attentionForward');
  const bwd = dropout ? getFallbackKernel('attentionBackward') : getKernel(backend, 'attentionBackward');
  if (!fwd || !bwd) {
    dropout?.dispose();
    throw new TensorError('UNSUPPORTED', `${OP}: no fused attention kernels on ${backend.device}`);
  }

  const mask = attnMask ? maskView(attnMask, [B, Hq, Sq, Sk]) : null;
  const opts: AttentionKernelOptions = { mask, cuSeqlens, causal: options.isCausal ?? false, scale, dropout };
  // out in q's memory order where the backend prefers it (allocLike): with q a view of [s, b, h, d]
  // rows, out.permute(2, 0, 1, 3) is contiguous and the backward's gradOut arrives without a copy
  const out = allocLike(backend, [B, Hq, Sq, Dv], q.dtype, q);
  const lse = alloc(backend, [B, Hq, Sq], q.dtype === 'float64' ? 'float64' : 'float32');
  fwd(out, lse, q, k, v, opts);
  if (needsGrad(q, k, v)) {
    const save = [q, k, v, out, lse];
    if (mask) save.push(mask);
    if (cuSeqlens) save.push(cuSeqlens);
    if (dropout) save.push(dropout);
    // the closure keeps plain values only: the tensors it needs come back through `saved`
    const { causal } = opts;
    const dtype = q.dtype;
    const hasMask = mask !== null;
    const hasCu = cuSeqlens !== null;
    const hasDropout = dropout !== null;
    // the gradients go where the engine says they end up (dest: v's region of the fused QKV
    // projection's gradient when v is a view of it), else into new tensors in q, k, v's layouts
    attachGrad(
      out,
      'ScaledDotProductAttentionBackward',
      [q, k, v],
      save,
      (g, s, _pending, dest) => {
        const [qs, ks, vs, os, ls] = s;
        const ms = hasMask ? s[5] : null;
        const cs = hasCu ? s[hasMask ? 6 : 5] : null;
        const ds = hasDropout ? s[s.length - 1] : null;
        const gg = g.dtype === dtype ? g : g.to(dtype);
        const dq = gradDestination(dest, 0, qs.shape, dtype, qs);
        const dk = gradDestination(dest, 1, ks.shape, dtype, ks);
        const dv = gradDestination(dest, 2, vs.shape, dtype, vs);
        bwd(dq, dk, dv, gg, qs, ks, vs, os, ls, { mask: ms, cuSeqlens: cs, causal, scale, dropout: ds });
        if (gg !== g) gg.dispose();
        return [dq, dk, dv];
      },
      { takesDestinations: true },
    );
  }
  lse.dispose();
  mask?.dispose();
  dropout?.dispose();
  return out;
}

/**
 * The dropout multipliers as a [B, Hq, Sq, Sk] view (a given mask), or drawn for dropoutP (the
 * kept probability 1 - p scaled by 1/(1-p), in the compute type), or null without dropout.
 */
function dropoutOf(o: AttentionOptions, q: Tensor, target: number[]): Tensor | null {
  const p = o.dropoutP ?? 0;
  if (!(p >= 0 && p <= 1)) throw argError(OP, `dropoutP must be in [0, 1], got ${p}`);
  if (o.dropoutMask) {
    if (p > 0) throw argError(OP, 'give dropoutP or dropoutMask, not both');
    if (!isFloating(o.dropoutMask.dtype)) {
      throw dtypeError(OP, `dropoutMask must be floating-point, got ${o.dropoutMask.dtype}`);
    }
    return maskView(o.dropoutMask, target, 'dropoutMask');
  }
  if (p === 0) return null;
  const dtype = q.dtype === 'float64' ? 'float64' : 'float32';
  return noGrad(() =>
    tidy(() => {
      const u = rand(target, { generator: o.generator ?? defaultGenerator, device: q.device, dtype });
      return u
        .lt(1 - p)
        .to(dtype)
        .mul(p === 1 ? 0 : 1 / (1 - p));
    }),
  );
}
