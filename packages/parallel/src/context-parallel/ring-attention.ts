// Ring attention over the context-parallel group (Megatron's cp_comm_type 'p2p', Transformer
// Engine's AttnFuncWithCPAndKVP2P). Each rank holds the queries, keys and values of its two
// load-balanced chunks (r and 2·cp−1−r, see split.ts); K/V travel around the ring, rank r → r+1,
// so that at step i rank r attends to the K/V of rank r−i. With causal attention the chunk pairs
// fall into three kinds:
//   step 0       (diagonal): the local chunks against themselves, causal (positions increase
//                             along the local sequence, so one top-left causal call covers it);
//   step i ≤ r   (lower):     K/V of an earlier rank: its first chunk is older than both local
//                             query chunks and fully visible, its second chunk is newer and
//                             hidden, so all queries attend to the first half of K/V;
//   step i > r   (upper):     K/V of a later rank: both its chunks are newer than chunk r and
//                             older than chunk 2·cp−1−r, so only the second half of the queries
//                             attends, to all of K/V.
// Packed rows apply this per sample. Partial results merge with the log-sum-exp rule in fp32.
// The exchange of step i+1 is posted before step i is computed, so transfer overlaps compute.
// Backward sends K/V around the ring again together with the running dK/dV of the block each
// rank just used; after cp steps and a last hop every rank holds the gradients of its own K/V.
import {
  type AttentionBackwardKernel,
  type AttentionForwardKernel,
  attachGrad,
  type DType,
  empty,
  full,
  getFallbackKernel,
  getKernel,
  isFloating,
  log1p,
  maximum,
  minimum,
  needsGrad,
  noGrad,
  type Tensor,
  tensor,
  tidy,
  zeros,
} from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import { getContextParallelGroup } from '../parallel-state.js';
import { batchIsendIrecv, type ProcessGroup, type Work } from '../process-group.js';
import { type CuSeqlens, contextParallelPlan, readCuSeqlens } from './split.js';

/** Options of {@link ringAttention}. */
export interface RingAttentionOptions {
  /** The context-parallel group (default: the parallel state's). */
  cpGroup?: ProcessGroup;
  /** Score scale; 1/sqrt(qk head dim) by default. */
  scale?: number;
  /** Causal attention in the full sequence (default true); false attends to every key (of the sample). */
  causal?: boolean;
  /**
   * Packed row (b = 1): this rank's sample boundaries [nseq + 1], i.e. the full row's divided by
   * cp (contextParallelCuSeqlens). Tokens attend only within their sample. The host plans the
   * ring's calls from the boundaries: given as numbers they are copied to the device for the
   * kernels (no wait); given as a tensor on an asynchronous device they are read back (a wait).
   */
  cuSeqlens?: CuSeqlens | null;
  /**
   * Attention dropout: the multipliers (0 = dropped, else the scale) of this rank's queries
   * against every key of the whole row, [b, hq, s/cp, s·cp] with the keys in the row's order (the
   * rows of a full [b, hq, S, S] mask, split along dim 2 by contextParallelSplit). Each block takes
   * the columns of the K/V it meets; the attention then runs as its composition from core ops.
   */
  dropoutMask?: Tensor | null;
}

// p2p tags on the CP group (< 2^20): K/V blocks, and the running dK/dV in backward
const KV_TAG = 0x4b56;
const DKV_TAG = 0x4b57;

const OP = 'ringAttention';

function fail(message: string): never {
  throw new DistributedError('INVALID_ARGUMENT', `${OP}: ${message}`);
}

/** A sample's tokens on this rank, [start, start + len): its two chunks, each len/2. */
interface Segment {
  start: number;
  len: number;
}

/** One kernel call of a block: query rows and key rows of the local sequence. */
interface Call {
  q0: number;
  qn: number;
  k0: number;
  kn: number;
}

type Section = 'whole' | 'lower' | 'upper';

function sectionOf(step: number, rank: number, causal: boolean): Section {
  if (step === 0 || !causal) return 'whole';
  return step <= rank ? 'lower' : 'upper';
}

function callsOf(section: 'lower' | 'upper', segments: readonly Segment[]): Call[] {
  return segments
    .filter((s) => s.len > 0)
    .map(({ start, len }) =>
      section === 'lower'
        ? { q0: start, qn: len, k0: start, kn: len / 2 }
        : { q0: start + len / 2, qn: len / 2, k0: start, kn: len },
    );
}

/** Everything a block needs besides q, k, v. */
interface Problem {
  group: ProcessGroup;
  causal: boolean;
  scale: number;
  segments: Segment[];
  accDtype: DType;
  forward: AttentionForwardKernel;
  backward: AttentionBackwardKernel;
  /** Dropout: the whole-row index of every token of each CP rank, else null. */
  keySlots: number[][] | null;
}

/**
 * The dropout multipliers of the K/V block from rank `src`: the mask's columns of its tokens
 * (call inside a tidy scope: the index and the block are temporaries).
 */
function blockMask(P: Problem, mask: Tensor | null, src: number): Tensor | null {
  if (!mask || !P.keySlots) return null;
  const index = tensor(BigInt64Array.from(P.keySlots[src], BigInt), { dtype: 'int64', device: mask.device });
  return mask.indexSelect(3, index);
}

/** out [b, hq, s, dv] (q's dtype) and lse [b, hq, s] (accDtype) of q against one K/V block. */
function forwardBlock(
  P: Problem,
  section: Section,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  cu: Tensor | null,
  dm: Tensor | null,
): { out: Tensor; lse: Tensor } {
  const [b, hq, s] = q.shape;
  const dv = v.shape[3];
  const opts = { device: q.device };
  // rows a section does not compute must read as "attended to nothing": out 0, lse −∞
  const partial = section === 'upper';
  const out = partial
    ? zeros([b, hq, s, dv], { ...opts, dtype: q.dtype })
    : empty([b, hq, s, dv], { ...opts, dtype: q.dtype });
  const lse = partial
    ? full([b, hq, s], -Infinity, { ...opts, dtype: P.accDtype })
    : empty([b, hq, s], { ...opts, dtype: P.accDtype });
  if (section === 'whole') {
    P.forward(out, lse, q, k, v, {
      mask: null,
      cuSeqlens: cu,
      causal: P.causal,
      scale: P.scale,
      dropout: dm,
    });
    return { out, lse };
  }
  tidy(() => {
    for (const c of callsOf(section, P.segments)) {
      P.forward(
        out.narrow(2, c.q0, c.qn),
        lse.narrow(2, c.q0, c.qn),
        q.narrow(2, c.q0, c.qn),
        k.narrow(2, c.k0, c.kn),
        v.narrow(2, c.k0, c.kn),
        {
          mask: null,
          cuSeqlens: null,
          causal: false,
          scale: P.scale,
          dropout: dm ? dm.narrow(2, c.q0, c.qn).narrow(3, c.k0, c.kn) : null,
        },
      );
    }
  });
  return { out, lse };
}

/** dq, dk, dv (q's dtype) of one block, from the final out and lse of the whole ring. */
function backwardBlock(
  P: Problem,
  section: Section,
  g: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  cu: Tensor | null,
  dm: Tensor | null,
): { dq: Tensor; dk: Tensor; dv: Tensor } {
  const like = (t: Tensor, zero: boolean) =>
    zero
      ? zeros(t.shape, { dtype: t.dtype, device: t.device })
      : empty(t.shape, { dtype: t.dtype, device: t.device });
  // lower writes the gradients of the first K/V half only, upper those of the second query half
  const dq = like(q, section === 'upper');
  const dk = like(k, section === 'lower');
  const dv = like(v, section === 'lower');
  if (section === 'whole') {
    P.backward(dq, dk, dv, g, q, k, v, out, lse, {
      mask: null,
      cuSeqlens: cu,
      causal: P.causal,
      scale: P.scale,
      dropout: dm,
    });
    return { dq, dk, dv };
  }
  tidy(() => {
    for (const c of callsOf(section, P.segments)) {
      const rq = (t: Tensor) => t.narrow(2, c.q0, c.qn);
      const rk = (t: Tensor) => t.narrow(2, c.k0, c.kn);
      P.backward(rq(dq), rk(dk), rk(dv), rq(g), rq(q), rk(k), rk(v), rq(out), rq(lse), {
        mask: null,
        cuSeqlens: null,
        causal: false,
        scale: P.scale,
        dropout: dm ? dm.narrow(2, c.q0, c.qn).narrow(3, c.k0, c.kn) : null,
      });
    }
  });
  return { dq, dk, dv };
}

/** The log-sum-exp merge of a block's (out, lse) into the running (fp32) result. */
function merge(acc: { out: Tensor; lse: Tensor }, blk: { out: Tensor; lse: Tensor }, dtype: DType) {
  return tidy(() => {
    // every row attends at least to itself at step 0, so acc.lse is finite: no −∞ − −∞ here
    const hi = maximum(acc.lse, blk.lse);
    const lo = minimum(acc.lse, blk.lse);
    const lse = hi.add(log1p(lo.sub(hi).exp()));
    const wAcc = acc.lse.sub(lse).exp().unsqueeze(-1);
    const wBlk = blk.lse.sub(lse).exp().unsqueeze(-1);
    const out = acc.out.mul(wAcc).add(blk.out.to(dtype).mul(wBlk));
    return { out, lse };
  });
}

/** K and V flattened into one contiguous buffer [k.numel + v.numel] for the ring. */
function packKv(k: Tensor, v: Tensor, dtype: DType): Tensor {
  const buf = empty([k.numel + v.numel], { dtype, device: k.device });
  tidy(() => {
    buf
      .narrow(0, 0, k.numel)
      .view(...k.shape)
      .copy_(k);
    buf
      .narrow(0, k.numel, v.numel)
      .view(...v.shape)
      .copy_(v);
  });
  return buf;
}

/** Views of K and V in a packed buffer (the caller owns both). */
function unpackKv(buf: Tensor, kShape: readonly number[], vShape: readonly number[]): [Tensor, Tensor] {
  const kn = kShape.reduce((a, b) => a * b, 1);
  const vn = vShape.reduce((a, b) => a * b, 1);
  return [buf.narrow(0, 0, kn).view(...kShape), buf.narrow(0, kn, vn).view(...vShape)];
}

/** Posts a send to the next rank and a receive from the previous one; returns both works. */
function exchange(group: ProcessGroup, send: Tensor, recv: Tensor, tag: number): Work[] {
  const n = group.size;
  return batchIsendIrecv(group, [
    { op: 'isend', tensor: send, peer: (group.rank + 1) % n, tag },
    { op: 'irecv', tensor: recv, peer: (group.rank + n - 1) % n, tag },
  ]);
}

function waitAll(works: readonly Work[]): void {
  for (const w of works) w.waitSync();
}

function ringForward(
  P: Problem,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  cu: Tensor | null,
  mask: Tensor | null,
): { out: Tensor; lse: Tensor } {
  const { group } = P;
  const n = group.size;
  let kv = n > 1 ? packKv(k, v, k.dtype) : null;
  let acc: { out: Tensor; lse: Tensor } | null = null;
  try {
    for (let i = 0; i < n; i++) {
      // post the next step's K/V before computing this one
      const next = i + 1 < n ? empty([kv!.numel], { dtype: k.dtype, device: k.device }) : null;
      const works = next ? exchange(group, kv!, next, KV_TAG) : [];
      const merged = tidy(() => {
        const [kb, vb] = i === 0 ? [k, v] : unpackKv(kv!, k.shape, v.shape);
        const dm = blockMask(P, mask, (group.rank - i + n) % n);
        const blk = forwardBlock(P, sectionOf(i, group.rank, P.causal), q, kb, vb, cu, dm);
        if (!acc) return { out: blk.out.to(P.accDtype), lse: blk.lse };
        return merge(acc, blk, P.accDtype);
      });
      if (acc) {
        acc.out.dispose();
        acc.lse.dispose();
      }
      acc = merged;
      waitAll(works);
      kv?.dispose();
      kv = next;
    }
  } catch (e) {
    acc?.out.dispose();
    acc?.lse.dispose();
    throw e;
  } finally {
    kv?.dispose();
  }
  const result = acc!;
  const out = result.out.to(q.dtype);
  result.out.dispose();
  return { out, lse: result.lse };
}

function ringBackward(
  P: Problem,
  g: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  cu: Tensor | null,
  mask: Tensor | null,
): [Tensor, Tensor, Tensor] {
  const { group } = P;
  const n = group.size;
  const dev = { device: q.device };
  const dkvLen = k.numel + v.numel;
  let dq = zeros(q.shape, { ...dev, dtype: P.accDtype });
  let kv = n > 1 ? packKv(k, v, k.dtype) : null;
  // the running dK/dV of the block this rank used last, to be passed on to the next rank
  let dkv: Tensor | null = null;
  try {
    for (let i = 0; i < n; i++) {
      // message i: the K/V for step i+1 and the dK/dV of step i−1; this rank receives the
      // dK/dV so far of the block it uses now, from the rank that used it just before
      const works: Work[] = [];
      const nextKv = i + 1 < n ? empty([dkvLen], { ...dev, dtype: k.dtype }) : null;
      if (nextKv) works.push(...exchange(group, kv!, nextKv, KV_TAG));
      const dkvIn = i > 0 ? empty([dkvLen], { ...dev, dtype: P.accDtype }) : null;
      if (dkvIn) works.push(...exchange(group, dkv!, dkvIn, DKV_TAG));
      const [dqNew, blk] = tidy(() => {
        const [kb, vb] = i === 0 ? [k, v] : unpackKv(kv!, k.shape, v.shape);
        const dm = blockMask(P, mask, (group.rank - i + n) % n);
        const d = backwardBlock(P, sectionOf(i, group.rank, P.causal), g, q, kb, vb, out, lse, cu, dm);
        const flat = packKv(d.dk, d.dv, P.accDtype);
        return [dq.add(d.dq.to(P.accDtype)), flat];
      });
      dq.dispose();
      dq = dqNew;
      waitAll(works);
      dkv?.dispose();
      if (dkvIn) {
        dkv = tidy(() => dkvIn.add(blk));
        dkvIn.dispose();
        blk.dispose();
      } else dkv = blk;
      kv?.dispose();
      kv = nextKv;
    }
    // the last hop: the block used at step cp−1 is the next rank's own
    if (n > 1) {
      const mine = empty([dkvLen], { ...dev, dtype: P.accDtype });
      waitAll(exchange(group, dkv!, mine, DKV_TAG));
      dkv!.dispose();
      dkv = mine;
    }
    const [dkAcc, dvAcc] = unpackKv(dkv!, k.shape, v.shape);
    const grads: [Tensor, Tensor, Tensor] = [dq.to(q.dtype), dkAcc.to(k.dtype), dvAcc.to(v.dtype)];
    dkAcc.dispose();
    dvAcc.dispose();
    return grads;
  } finally {
    dq.dispose();
    kv?.dispose();
    dkv?.dispose();
  }
}

/** The local sample layout: one segment per sample of a packed row, or the whole local sequence. */
function segmentsOf(vals: readonly number[] | null, seqLen: number): Segment[] {
  if (!vals) return [{ start: 0, len: seqLen }];
  const segments: Segment[] = [];
  for (let i = 0; i + 1 < vals.length; i++) {
    const len = vals[i + 1] - vals[i];
    if (len % 2 !== 0) {
      fail(
        `sample ${i} has ${len} local tokens, an odd number: cuSeqlens must be this rank's boundaries (the full row's divided by cp, from contextParallelCuSeqlens) with every sample split into 2·cp chunks`,
      );
    }
    segments.push({ start: vals[i], len });
  }
  return segments;
}

/**
 * Causal self-attention of the load-balanced local chunks against the whole sequence, over the
 * context-parallel group: q [b, hq, s/cp, dqk], k [b, hkv, s/cp, dqk], v [b, hkv, s/cp, dv] ->
 * [b, hq, s/cp, dv] in q's dtype, exactly like scaledDotProductAttention on the full sequence
 * restricted to this rank's tokens. Grouped-query (hq a multiple of hkv) and different qk / v
 * head dims (MLA); fp32 softmax for bf16/fp16 inputs. Differentiable in q, k and v; the
 * gradients of k and v are those of this rank's own K/V. Every rank of the group must call it
 * with the same shapes and boundaries.
 */
export function ringAttention(q: Tensor, k: Tensor, v: Tensor, options: RingAttentionOptions = {}): Tensor {
  const group = options.cpGroup ?? getContextParallelGroup();
  for (const t of [q, k, v]) t.checkAlive(OP);
  if (q.ndim !== 4 || k.ndim !== 4 || v.ndim !== 4) {
    fail(`q, k, v must be [b, heads, s, d], got [${q.shape}], [${k.shape}] and [${v.shape}]`);
  }
  if (!isFloating(q.dtype) || k.dtype !== q.dtype || v.dtype !== q.dtype) {
    fail(`q, k, v must share one floating-point dtype, got ${q.dtype}, ${k.dtype} and ${v.dtype}`);
  }
  if (k.device !== q.device || v.device !== q.device) {
    fail(`q, k, v must be on one device, got ${q.device}, ${k.device} and ${v.device}`);
  }
  const [b, hq, s, dqk] = q.shape;
  const [bk, hkv, sk, dk] = k.shape;
  const [bv, hv, sv] = v.shape;
  if (bk !== b || bv !== b) fail(`batch sizes differ: q ${b}, k ${bk}, v ${bv}`);
  if (sk !== s || sv !== s)
    fail(`q, k, v must hold the same local tokens, got lengths ${s}, ${sk} and ${sv}`);
  if (dk !== dqk) fail(`head dims of q (${dqk}) and k (${dk}) differ`);
  if (hv !== hkv || hkv === 0 || hq % hkv !== 0) {
    fail(`query heads (${hq}) must be a multiple of the key/value heads (k ${hkv}, v ${hv})`);
  }
  if (s % 2 !== 0) {
    fail(
      `the local sequence has ${s} tokens, an odd number: each rank holds two equal chunks; split the inputs with contextParallelSplit (sequence length divisible by 2·cp)`,
    );
  }
  const scale = options.scale ?? 1 / Math.sqrt(dqk);
  if (!Number.isFinite(scale)) fail(`scale must be a finite number, got ${scale}`);
  const packed = options.cuSeqlens ?? null;
  if (packed !== null && b !== 1) {
    fail(`cuSeqlens packs samples into one row: batch must be 1, got ${b}`);
  }
  const values = packed === null ? null : readCuSeqlens(OP, packed, s);
  const segments = segmentsOf(values, s);
  const dropout = options.dropoutMask ?? null;
  if (dropout) {
    const want = [b, hq, s, s * group.size];
    if (!isFloating(dropout.dtype) || dropout.device !== q.device || dropout.shape.join() !== want.join()) {
      fail(
        `dropoutMask must be a floating-point [${want}] on ${q.device} (this rank's queries against every key of the whole row), got ${dropout.dtype} [${dropout.shape}] on ${dropout.device}`,
      );
    }
  }
  // the backend's fused kernels, or their composition from core ops (any backend; with dropout,
  // which the fused kernels lack)
  const forward = dropout ? getFallbackKernel('attentionForward') : getKernel(q.backend, 'attentionForward');
  const backward = dropout
    ? getFallbackKernel('attentionBackward')
    : getKernel(q.backend, 'attentionBackward');
  if (!forward || !backward) {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `${OP}: the ${q.device} backend has no fused attention kernels`,
    );
  }
  const P: Problem = {
    group,
    causal: options.causal ?? true,
    scale,
    segments,
    accDtype: q.dtype === 'float64' ? 'float64' : 'float32',
    forward,
    backward,
    keySlots: dropout ? keySlotsOf(group.size, s, values) : null,
  };
  // the kernels' boundaries: the given tensor, or the numbers copied to q's device (the graph
  // keeps its own reference for the backward)
  const uploaded =
    values !== null && Array.isArray(packed)
      ? tensor(Int32Array.from(values), { dtype: 'int32', device: q.device })
      : null;
  const cu = packed === null ? null : (uploaded ?? (packed as Tensor));
  try {
    const { out, lse } = noGrad(() => ringForward(P, q, k, v, cu, dropout));
    if (needsGrad(q, k, v)) {
      const save = [q, k, v, out, lse, ...(cu ? [cu] : []), ...(dropout ? [dropout] : [])];
      const hasCu = cu !== null;
      attachGrad(out, 'RingAttentionBackward', [q, k, v], save, (grad, saved) => {
        const [qs, ks, vs, os, ls] = saved;
        const gg = grad.dtype === qs.dtype ? grad : grad.to(qs.dtype);
        const ms = dropout ? saved[saved.length - 1] : null;
        return ringBackward(P, gg, qs, ks, vs, os, ls, hasCu ? saved[5] : null, ms);
      });
    }
    lse.dispose();
    return out;
  } finally {
    uploaded?.dispose();
  }
}

/**
 * Dropout: for each CP rank, the index in the whole row of each of its local tokens (its chunks of
 * every sample, as contextParallelPlan splits the row).
 */
function keySlotsOf(n: number, s: number, local: readonly number[] | null): number[][] {
  const cuSeqlens = local ? local.map((x) => x * n) : null;
  return Array.from({ length: n }, (_, rank) => [
    ...contextParallelPlan(s * n, { rank, size: n }, { cuSeqlens }).tokenIndices,
  ]);
}
