// The ring-attention cases shared by the default and heavy multi-process tests
// (context-parallel-worker.ts runs them): each case builds the full q, k, v and upstream gradient
// from a seed on every rank, runs the single-process causal attention on the full sequence as the
// reference, then ring attention on this rank's load-balanced chunks, gathers the output and the
// gradients of q, k, v back to the full sequence and reports the relative difference.
import {
  type DType,
  manualSeed,
  memoryStats,
  rand,
  randn,
  scaledDotProductAttention,
  type Tensor,
  tensor,
  tidy,
} from '@megapatch/tensor';
import { ringAttention } from '../../src/context-parallel/ring-attention.js';
import {
  contextParallelCuSeqlens,
  contextParallelGather,
  contextParallelSplit,
} from '../../src/context-parallel/split.js';
import type { ProcessGroup } from '../../src/process-group.js';

export interface RingCase {
  name: string;
  batch: number;
  heads: number;
  /** Key/value heads (grouped-query when fewer than heads). */
  kvHeads: number;
  qkHeadDim: number;
  vHeadDim: number;
  /** Full sequence length (a multiple of 2·cp); ignored when `sampleChunks` is given. */
  seqLen: number;
  /** Packed row: each sample's length in units of 2·cp tokens. */
  sampleChunks?: number[];
  /** Packed row: give ringAttention this rank's boundaries as numbers (default: a tensor). */
  boundariesAsNumbers?: boolean;
  causal?: boolean;
  scale?: number;
  dtype?: DType;
  /** Attention dropout with this rate: one full mask, its rows split over the ranks. */
  dropout?: number;
  /** Largest relative difference allowed (max |ring − reference| / max |reference|). */
  tolerance: number;
}

export interface RingCaseResult {
  case: string;
  rank: number;
  cp: number;
  /** Relative difference of each compared tensor. */
  rel: Record<string, number>;
  tolerance: number;
  /** Live bytes after the case minus before it (every tensor freed: 0). */
  leakedBytes: number;
}

const NOT_CAUSAL: RingCase = {
  name: 'gqa not causal',
  batch: 2,
  heads: 2,
  kvHeads: 1,
  qkHeadDim: 8,
  vHeadDim: 8,
  seqLen: 0,
  causal: false,
  tolerance: 1e-5,
};

/** The default cases: GQA and MLA-like head dims, plain and packed rows, causal and not, dropout. */
export function defaultCases(): RingCase[] {
  return [
    { name: 'gqa', batch: 2, heads: 4, kvHeads: 2, qkHeadDim: 16, vHeadDim: 16, seqLen: 0, tolerance: 1e-5 },
    {
      name: 'mla',
      batch: 1,
      heads: 2,
      kvHeads: 2,
      qkHeadDim: 24,
      vHeadDim: 16,
      seqLen: 0,
      scale: 0.3,
      tolerance: 1e-5,
    },
    {
      name: 'gqa packed',
      batch: 1,
      heads: 4,
      kvHeads: 1,
      qkHeadDim: 16,
      vHeadDim: 16,
      seqLen: 0,
      sampleChunks: [3, 1, 2, 2],
      tolerance: 1e-5,
    },
    {
      name: 'mla packed',
      batch: 1,
      heads: 2,
      kvHeads: 2,
      qkHeadDim: 24,
      vHeadDim: 16,
      seqLen: 0,
      sampleChunks: [1, 4, 1],
      boundariesAsNumbers: true,
      tolerance: 1e-5,
    },
    NOT_CAUSAL,
    {
      name: 'packed not causal',
      batch: 1,
      heads: 2,
      kvHeads: 2,
      qkHeadDim: 8,
      vHeadDim: 8,
      seqLen: 0,
      sampleChunks: [2, 1, 3],
      boundariesAsNumbers: true,
      causal: false,
      tolerance: 1e-5,
    },
    // attention dropout: the ring takes this rank's rows of one full mask, each block its columns
    {
      name: 'gqa dropout',
      batch: 2,
      heads: 4,
      kvHeads: 2,
      qkHeadDim: 8,
      vHeadDim: 8,
      seqLen: 0,
      dropout: 0.3,
      tolerance: 1e-5,
    },
    {
      name: 'mla packed dropout',
      batch: 1,
      heads: 2,
      kvHeads: 2,
      qkHeadDim: 12,
      vHeadDim: 8,
      seqLen: 0,
      sampleChunks: [2, 1, 3],
      boundariesAsNumbers: true,
      dropout: 0.2,
      tolerance: 1e-5,
    },
    { ...NOT_CAUSAL, name: 'not causal dropout', batch: 1, dropout: 0.5 },
    // bf16 against the single-process bf16 kernel: per-block rounding of the outputs is the difference
    {
      name: 'gqa bf16',
      batch: 1,
      heads: 4,
      kvHeads: 2,
      qkHeadDim: 16,
      vHeadDim: 16,
      seqLen: 0,
      dtype: 'bfloat16',
      tolerance: 2e-2,
    },
  ];
}

/** The heavy matrix: longer sequences, DeepSeek's MLA head dims (192 / 128), many samples. */
export function heavyCases(): RingCase[] {
  return [
    {
      name: 'gqa long',
      batch: 2,
      heads: 8,
      kvHeads: 2,
      qkHeadDim: 64,
      vHeadDim: 64,
      seqLen: 384,
      tolerance: 1e-5,
    },
    {
      name: 'mla 192/128',
      batch: 1,
      heads: 4,
      kvHeads: 4,
      qkHeadDim: 192,
      vHeadDim: 128,
      seqLen: 192,
      tolerance: 1e-5,
    },
    {
      name: 'mla 192/128 packed',
      batch: 1,
      heads: 4,
      kvHeads: 4,
      qkHeadDim: 192,
      vHeadDim: 128,
      seqLen: 0,
      sampleChunks: [5, 1, 9, 2, 1],
      tolerance: 1e-5,
    },
    {
      name: 'gqa packed many',
      batch: 1,
      heads: 8,
      kvHeads: 2,
      qkHeadDim: 32,
      vHeadDim: 32,
      seqLen: 0,
      sampleChunks: [1, 1, 2, 1, 7, 3, 1, 12],
      tolerance: 1e-5,
    },
    {
      name: 'gqa bf16 long',
      batch: 1,
      heads: 8,
      kvHeads: 2,
      qkHeadDim: 64,
      vHeadDim: 64,
      seqLen: 384,
      dtype: 'bfloat16',
      tolerance: 2e-2,
    },
  ];
}

function relDiff(got: Tensor, want: Tensor): number {
  return tidy(() => {
    const g = got.to('float32');
    const w = want.to('float32');
    const num = g.sub(w).abs().max().item();
    const den = w.abs().max().item();
    return den === 0 ? num : num / den;
  });
}

/** Runs one case on this rank of `cp` and reports the comparison. */
export function runCase(c: RingCase, cp: ProcessGroup, seed: number): RingCaseResult {
  const before = memoryStats().liveBytes;
  const dtype = c.dtype ?? 'float32';
  const chunks = 2 * cp.size;
  const lengths = c.sampleChunks?.map((n) => n * chunks);
  const seqLen = lengths ? lengths.reduce((a, b) => a + b, 0) : c.seqLen || 8 * chunks;
  let cuList: number[] | null = null;
  if (lengths) {
    cuList = [0];
    for (const n of lengths) cuList.push(cuList[cuList.length - 1] + n);
  }
  const causal = c.causal ?? true;
  const rel = tidy(() => {
    manualSeed(seed);
    const q = randn([c.batch, c.heads, seqLen, c.qkHeadDim]).to(dtype);
    const k = randn([c.batch, c.kvHeads, seqLen, c.qkHeadDim]).to(dtype);
    const v = randn([c.batch, c.kvHeads, seqLen, c.vHeadDim]).to(dtype);
    const g = randn([c.batch, c.heads, seqLen, c.vHeadDim]).to(dtype);
    const cuFull = cuList ? tensor(Int32Array.from(cuList), { dtype: 'int32' }) : null;
    const p = c.dropout ?? 0;
    const mask =
      p > 0
        ? rand([c.batch, c.heads, seqLen, seqLen])
            .lt(1 - p)
            .to('float32')
            .mul(1 / (1 - p))
        : null;

    // the reference: one process, the whole sequence
    const [qr, kr, vr] = [q, k, v].map((t) => t.clone().requiresGrad_());
    const ref = scaledDotProductAttention(qr, kr, vr, {
      isCausal: causal,
      cuSeqlens: cuFull,
      scale: c.scale,
      dropoutMask: mask,
    });
    ref.backward(g);

    // context parallel: this rank's chunks, ring attention, then everything gathered back
    const split = { seqDim: 2, cuSeqlens: cuList };
    const [ql, kl, vl] = [q, k, v].map((t) => contextParallelSplit(t, cp, split).requiresGrad_());
    const gl = contextParallelSplit(g, cp, split);
    const cuLocal = !cuList
      ? null
      : c.boundariesAsNumbers
        ? cuList.map((x) => x / cp.size)
        : contextParallelCuSeqlens(cuList, cp.size);
    // this rank's query rows of the mask, every key of the row
    const dropoutMask = mask ? contextParallelSplit(mask, cp, split) : null;
    const out = ringAttention(ql, kl, vl, {
      cpGroup: cp,
      scale: c.scale,
      causal,
      cuSeqlens: cuLocal,
      dropoutMask,
    });
    out.backward(gl);
    const gather = (t: Tensor) => contextParallelGather(t, cp, split);
    const result = {
      out: relDiff(gather(out), ref),
      dq: relDiff(gather(ql.grad!), qr.grad!),
      dk: relDiff(gather(kl.grad!), kr.grad!),
      dv: relDiff(gather(vl.grad!), vr.grad!),
    };
    for (const t of [qr, kr, vr, ql, kl, vl]) t.grad?.dispose();
    return result;
  });
  return {
    case: c.name,
    rank: cp.rank,
    cp: cp.size,
    rel,
    tolerance: c.tolerance,
    leakedBytes: memoryStats().liveBytes - before,
  };
}
