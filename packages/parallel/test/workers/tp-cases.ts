// The tensor-parallel checks shared by the single-process tests and the multi-process worker
// (tp-worker.ts): each case builds the single-process reference (a TP=1 layer or plain ops, on a
// group of one) and the parallel computation on `group`, from the same seeds, and records how
// this rank's results compare with the matching slice of the reference.
import { createHash } from 'node:crypto';
import {
  cat,
  crossEntropy,
  dropout,
  Generator,
  noGrad,
  ones,
  randint,
  randn,
  type Tensor,
  tidy,
} from '@megapatch/tensor';
import type { ProcessGroup, Work } from '../../src/process-group.js';
import { vocabParallelCrossEntropy } from '../../src/tensor-parallel/cross-entropy.js';
import {
  ColumnParallelLinear,
  type ColumnPartition,
  LayerNormColumnParallelLinear,
  RowParallelLinear,
  VocabParallelEmbedding,
} from '../../src/tensor-parallel/layers.js';
import {
  copyToTensorModelParallelRegion,
  gatherFromSequenceParallelRegion,
  gatherFromTensorModelParallelRegion,
  reduceFromTensorModelParallelRegion,
  reduceScatterToSequenceParallelRegion,
  scatterToSequenceParallelRegion,
  scatterToTensorModelParallelRegion,
} from '../../src/tensor-parallel/mappings.js';
import { getRngTracker, modelParallelManualSeed } from '../../src/tensor-parallel/random.js';
import { allreduceSequenceParallelGrads } from '../../src/tensor-parallel/sequence-parallel-grads.js';
import { type QkvDims, shardOf } from '../../src/tensor-parallel/sharding.js';

const done: Work = { wait: async () => {}, waitSync: () => {}, isCompleted: () => true };

/** A group of one process whose operations complete at once (with size-1 semantics), counting calls. */
export function soloGroup(name = 'solo'): ProcessGroup & { calls: number } {
  const g = {
    backend: 'none',
    name,
    rank: 0,
    size: 1,
    ranks: [0] as readonly number[],
    timeoutMs: 0,
    calls: 0,
    allReduce: () => call(),
    allGather: (outputs: readonly Tensor[], input: Tensor) => copy(outputs[0], input),
    allGatherIntoTensor: (output: Tensor, input: Tensor) => copy(output, input),
    reduceScatter: (output: Tensor, inputs: readonly Tensor[]) => copy(output, inputs[0]),
    reduceScatterTensor: (output: Tensor, input: Tensor) => copy(output, input),
    broadcast: () => call(),
    send: (): Work => {
      throw new Error('a group of one has no peer to send to');
    },
    recv: (): Work => {
      throw new Error('a group of one has no peer to receive from');
    },
    allToAll: (output: Tensor, input: Tensor) => copy(output, input),
    barrier: () => call(),
    destroy: () => {},
  };
  const call = (): Work => {
    g.calls++;
    return done;
  };
  const copy = (dst: Tensor, src: Tensor): Work => {
    noGrad(() => dst.copy_(src));
    return call();
  };
  return g;
}

/** A group of `size` used only to build layers (their shards); any operation on it throws. */
export function shapeOnlyGroup(size: number, rank: number): ProcessGroup {
  const no = (): Work => {
    throw new Error('shapeOnlyGroup: no communication in construction tests');
  };
  return {
    backend: 'none',
    name: `shape-only-${size}`,
    rank,
    size,
    ranks: Array.from({ length: size }, (_, i) => i),
    timeoutMs: 0,
    allReduce: no,
    allGather: no,
    allGatherIntoTensor: no,
    reduceScatter: no,
    reduceScatterTensor: no,
    broadcast: no,
    send: no,
    recv: no,
    allToAll: no,
    barrier: no,
    destroy: () => {},
  };
}

/** One comparison of this rank's tensor with the reference. */
export interface Check {
  name: string;
  ok: boolean;
  /** Bit-identical (same shape, dtype and bytes). */
  exact: boolean;
  maxAbs: number;
  detail?: string;
}

/** What one case reports (one `RESULT` line per case in the worker). */
export interface CaseResult {
  case: string;
  rank: number;
  tp: number;
  checks: Check[];
  /** Free-form values compared across ranks by the test (RNG hashes). */
  values?: Record<string, string>;
}

/** Collects the comparisons of one case. */
export class Checks {
  readonly list: Check[] = [];

  /** Bit-identical, as Megatron's torch.equal checks. */
  equal(name: string, got: Tensor | null, want: Tensor): void {
    this.compare(name, got, want, 0, 0, true);
  }

  /** |got - want| <= atol + rtol·|want| everywhere. */
  close(name: string, got: Tensor | null, want: Tensor, rtol = 1e-5, atol = 1e-6): void {
    this.compare(name, got, want, rtol, atol, false);
  }

  /** A condition that must hold. */
  that(name: string, ok: boolean, detail?: string): void {
    this.list.push({ name, ok, exact: ok, maxAbs: 0, ...(ok || !detail ? {} : { detail }) });
  }

  private compare(
    name: string,
    got: Tensor | null,
    want: Tensor,
    rtol: number,
    atol: number,
    exactOnly: boolean,
  ): void {
    if (!got) {
      this.list.push({
        name,
        ok: false,
        exact: false,
        maxAbs: Number.NaN,
        detail: 'no tensor (missing grad?)',
      });
      return;
    }
    if (got.shape.join(',') !== want.shape.join(',') || got.dtype !== want.dtype) {
      this.list.push({
        name,
        ok: false,
        exact: false,
        maxAbs: Number.NaN,
        detail: `got [${got.shape}] ${got.dtype}, want [${want.shape}] ${want.dtype}`,
      });
      return;
    }
    const exact = Buffer.compare(Buffer.from(got.toBytes()), Buffer.from(want.toBytes())) === 0;
    const a = got.toTypedArray();
    const b = want.toTypedArray();
    let maxAbs = 0;
    let bad = -1;
    for (let i = 0; i < a.length; i++) {
      const x = Number(a[i]);
      const y = Number(b[i]);
      const d = Math.abs(x - y);
      if (d > maxAbs || Number.isNaN(d)) maxAbs = Number.isNaN(d) ? Number.POSITIVE_INFINITY : d;
      if (bad < 0 && !(x === y || d <= atol + rtol * Math.abs(y))) bad = i;
    }
    const ok = exactOnly ? exact : bad < 0;
    const detail = ok
      ? undefined
      : bad >= 0
        ? `element ${bad}: got ${a[bad]}, want ${b[bad]}`
        : 'bytes differ';
    this.list.push({ name, ok, exact, maxAbs, ...(detail ? { detail } : {}) });
  }
}

// Small sizes, divisible by every TP size tested (1, 2, 4).
const S = 8;
const B = 2;
const H = 8;

const gen = (seed: number) => new Generator(seed);

/** Integer values in [-8, 8] as float32, so that sums are exact in any order. */
function ints(seed: number, shape: number[]): Tensor {
  return tidy(() => randint(-8, 9, shape, { generator: gen(seed) }).to('float32'));
}

function gaussian(seed: number, shape: number[], std = 1): Tensor {
  return randn(shape, { generator: gen(seed), std });
}

/** Sum of the tensors made by `make(q)` for q = 0..tp-1, in rank order. */
function sumOver(tp: number, make: (q: number) => Tensor): Tensor {
  return tidy(() => {
    let acc = make(0);
    for (let q = 1; q < tp; q++) acc = acc.add(make(q));
    return acc;
  });
}

function catOver(tp: number, dim: number, make: (q: number) => Tensor): Tensor {
  return tidy(() =>
    cat(
      Array.from({ length: tp }, (_, q) => make(q)),
      dim,
    ),
  );
}

function rowsOf(t: Tensor, tp: number, r: number): Tensor {
  const n = t.shape[0] / tp;
  return t.narrow(0, r * n, n).contiguous();
}

function colsOf(t: Tensor, tp: number, r: number): Tensor {
  const n = t.shape[t.ndim - 1] / tp;
  return t.narrow(-1, r * n, n).contiguous();
}

/** This rank's slice of the last dim of `t` in the layout of a column-parallel output. */
function outputShard(
  t: Tensor,
  partition: ColumnPartition,
  tp: number,
  r: number,
  qkvDims?: QkvDims,
): Tensor {
  return tidy(() => {
    const last = t.shape[t.ndim - 1];
    const lead = t.shape.slice(0, -1);
    const flat = t.reshape(-1, last).t().contiguous();
    const shard = shardOf(flat, partition, { tp, rank: r, qkvDims });
    return shard
      .t()
      .contiguous()
      .reshape(...lead, -1);
  });
}

function leaf(t: Tensor): Tensor {
  return t.detach().requiresGrad_();
}

/** Every mapping, forward and backward, against single-process concatenations and sums (exact). */
export function mappingCases(group: ProcessGroup): CaseResult[] {
  const tp = group.size;
  const r = group.rank;
  const out: CaseResult[] = [];
  const run = (name: string, body: (c: Checks) => void) => {
    const c = new Checks();
    tidy(() => body(c));
    out.push({ case: `mapping/${name}`, rank: r, tp, checks: c.list });
  };
  const full = [S, B, H];
  const lastShard = [S, B, H / tp];
  const seqShard = [S / tp, B, H];

  run('copyToTensorModelParallelRegion', (c) => {
    const x = leaf(ints(1, full));
    const y = copyToTensorModelParallelRegion(x, group);
    c.equal('forward', y, ints(1, full));
    y.backward(ints(100 + r, full));
    c.equal(
      'backward',
      x.grad,
      sumOver(tp, (q) => ints(100 + q, full)),
    );
  });
  run('reduceFromTensorModelParallelRegion', (c) => {
    const x = leaf(ints(200 + r, full));
    const y = reduceFromTensorModelParallelRegion(x, group);
    c.equal(
      'forward',
      y,
      sumOver(tp, (q) => ints(200 + q, full)),
    );
    y.backward(ints(300, full));
    c.equal('backward', x.grad, ints(300, full));
  });
  run('scatterToTensorModelParallelRegion', (c) => {
    const x = leaf(ints(400, full));
    const y = scatterToTensorModelParallelRegion(x, group);
    c.equal('forward', y, colsOf(ints(400, full), tp, r));
    y.backward(ints(500 + r, lastShard));
    c.equal(
      'backward',
      x.grad,
      catOver(tp, -1, (q) => ints(500 + q, lastShard)),
    );
  });
  run('gatherFromTensorModelParallelRegion', (c) => {
    const x = leaf(ints(600 + r, lastShard));
    const y = gatherFromTensorModelParallelRegion(x, group);
    c.equal(
      'forward',
      y,
      catOver(tp, -1, (q) => ints(600 + q, lastShard)),
    );
    y.backward(ints(700, full));
    c.equal('backward', x.grad, colsOf(ints(700, full), tp, r));
  });
  run('gatherFromTensorModelParallelRegion (non-contiguous input)', (c) => {
    // [B, S, H/tp] transposed to [S, B, H/tp]: a strided view going into the collective
    const x = leaf(ints(650 + r, [B, S, H / tp]));
    const y = gatherFromTensorModelParallelRegion(x.transpose(0, 1), group);
    c.equal(
      'forward',
      y,
      catOver(tp, -1, (q) => ints(650 + q, [B, S, H / tp]).transpose(0, 1)),
    );
    y.backward(ints(750, full));
    c.equal('backward', x.grad, colsOf(ints(750, full), tp, r).transpose(0, 1).contiguous());
  });
  run('scatterToSequenceParallelRegion', (c) => {
    const x = leaf(ints(800, full));
    const y = scatterToSequenceParallelRegion(x, group);
    c.equal('forward', y, rowsOf(ints(800, full), tp, r));
    y.backward(ints(900 + r, seqShard));
    c.equal(
      'backward',
      x.grad,
      catOver(tp, 0, (q) => ints(900 + q, seqShard)),
    );
  });
  run('gatherFromSequenceParallelRegion', (c) => {
    const x = leaf(ints(1000 + r, seqShard));
    const y = gatherFromSequenceParallelRegion(x, true, group);
    c.equal(
      'forward',
      y,
      catOver(tp, 0, (q) => ints(1000 + q, seqShard)),
    );
    y.backward(ints(1100 + r, full));
    c.equal(
      'backward (reduce-scatter)',
      x.grad,
      rowsOf(
        sumOver(tp, (q) => ints(1100 + q, full)),
        tp,
        r,
      ),
    );
  });
  run('gatherFromSequenceParallelRegion (tensorParallelOutputGrad false)', (c) => {
    const x = leaf(ints(1000 + r, seqShard));
    const y = gatherFromSequenceParallelRegion(x, false, group);
    c.equal(
      'forward',
      y,
      catOver(tp, 0, (q) => ints(1000 + q, seqShard)),
    );
    y.backward(ints(1200, full));
    c.equal('backward (split)', x.grad, rowsOf(ints(1200, full), tp, r));
  });
  run('reduceScatterToSequenceParallelRegion', (c) => {
    const x = leaf(ints(1300 + r, full));
    const y = reduceScatterToSequenceParallelRegion(x, group);
    c.equal(
      'forward',
      y,
      rowsOf(
        sumOver(tp, (q) => ints(1300 + q, full)),
        tp,
        r,
      ),
    );
    y.backward(ints(1400 + r, seqShard));
    c.equal(
      'backward',
      x.grad,
      catOver(tp, 0, (q) => ints(1400 + q, seqShard)),
    );
  });
  return out;
}

/** Sets a parameter's values (outside autograd). */
function assign(p: Tensor | null, v: Tensor): void {
  if (p) noGrad(() => p.copy_(v));
}

const QKV: QkvDims = { numHeads: 4, numQueryGroups: 4, headDim: 4 };
const IN = 16;

function columnOutputSize(partition: ColumnPartition): number {
  if (partition === 'qkv') return (QKV.numHeads + 2 * QKV.numQueryGroups) * QKV.headDim;
  return 32;
}

/** Column, row, LayerNorm+column and embedding layers at TP=tp (± SP) against the TP=1 layer of the same seed. */
export function layerCases(group: ProcessGroup): CaseResult[] {
  const tp = group.size;
  const r = group.rank;
  const solo = soloGroup();
  const out: CaseResult[] = [];
  const run = (name: string, body: (c: Checks) => void) => {
    const c = new Checks();
    tidy(() => body(c));
    out.push({ case: `layer/${name}`, rank: r, tp, checks: c.list });
  };

  for (const partition of ['split0', 'qkv', 'gate_up'] as const) {
    for (const [sp, gatherOutput] of [
      [false, false],
      [true, false],
      [false, true],
      [true, true],
    ] as const) {
      run(
        `ColumnParallelLinear ${partition}${sp ? ' SP' : ''}${gatherOutput ? ' gatherOutput' : ''}`,
        (c) => {
          const outSize = columnOutputSize(partition);
          const qkvDims = partition === 'qkv' ? QKV : undefined;
          const common = { partition, qkvDims, gatherOutput };
          const ref = new ColumnParallelLinear(IN, outSize, { ...common, tpGroup: solo, generator: gen(42) });
          const par = new ColumnParallelLinear(IN, outSize, {
            ...common,
            tpGroup: group,
            sequenceParallel: sp,
            generator: gen(42),
          });
          const shard = (t: Tensor) => shardOf(t, partition, { tp, rank: r, qkvDims });
          c.equal('weight = shard of the TP=1 weight', par.weight, shard(ref.weight as Tensor));
          const bias = gaussian(43, [outSize]);
          assign(ref.bias, bias);
          assign(par.bias, shard(bias));
          const x = gaussian(44, [S, B, IN]);
          const xr = leaf(x);
          const xp = leaf(sp ? rowsOf(x, tp, r) : x);
          const yr = ref.forward(xr).output;
          const yp = par.forward(xp).output;
          // gatherOutput concatenates the ranks' outputs, which is the TP=1 order except for
          // gate_up ([gate_0; up_0; gate_1; up_1; ...]).
          const localOut = (t: Tensor) =>
            gatherOutput
              ? catOver(tp, -1, (q) => outputShard(t, partition, tp, q, qkvDims))
              : outputShard(t, partition, tp, r, qkvDims);
          c.close('output', yp, localOut(yr));
          const dy = gaussian(45, [S, B, outSize]);
          yr.backward(dy);
          yp.backward(localOut(dy));
          c.close('input grad', xp.grad, sp ? rowsOf(xr.grad as Tensor, tp, r) : (xr.grad as Tensor));
          c.close('weight grad', par.weight?.grad ?? null, shard(ref.weight?.grad as Tensor));
          c.close('bias grad', par.bias?.grad ?? null, shard(ref.bias?.grad as Tensor));
        },
      );
    }
  }

  for (const [inputIsParallel, sp] of [
    [true, false],
    [false, false],
    [true, true],
  ] as const) {
    run(`RowParallelLinear${inputIsParallel ? ' inputIsParallel' : ''}${sp ? ' SP' : ''}`, (c) => {
      const inSize = 32;
      const outSize = 16;
      const ref = new RowParallelLinear(inSize, outSize, { tpGroup: solo, generator: gen(52) });
      const par = new RowParallelLinear(inSize, outSize, {
        tpGroup: group,
        generator: gen(52),
        inputIsParallel,
        sequenceParallel: sp,
      });
      c.equal(
        'weight = shard of the TP=1 weight',
        par.weight,
        shardOf(ref.weight, 'split1', { tp, rank: r }),
      );
      const bias = gaussian(53, [outSize]);
      assign(ref.bias, bias);
      assign(par.bias, bias);
      const x = gaussian(54, [S, B, inSize]);
      const xr = leaf(x);
      const xp = leaf(inputIsParallel ? colsOf(x, tp, r) : x);
      const yr = ref.forward(xr).output;
      const yp = par.forward(xp).output;
      c.close('output', yp, sp ? rowsOf(yr, tp, r) : yr);
      const dy = gaussian(55, [S, B, outSize]);
      yr.backward(dy);
      yp.backward(sp ? rowsOf(dy, tp, r) : dy);
      allreduceSequenceParallelGrads(par.parameters(), group);
      const gx = xr.grad as Tensor;
      c.close('input grad', xp.grad, inputIsParallel ? colsOf(gx, tp, r) : gx);
      c.close('weight grad', par.weight.grad, shardOf(ref.weight.grad as Tensor, 'split1', { tp, rank: r }));
      c.close('bias grad', par.bias?.grad ?? null, ref.bias?.grad as Tensor);
    });
  }

  for (const normalization of ['RMSNorm', 'LayerNorm'] as const) {
    for (const [partition, sp] of [
      ['split0', false],
      ['split0', true],
      ['gate_up', true],
    ] as const) {
      run(`LayerNormColumnParallelLinear ${normalization} ${partition}${sp ? ' SP' : ''}`, (c) => {
        const outSize = 32;
        const common = { normalization, partition, eps: 1e-5 };
        const ref = new LayerNormColumnParallelLinear(IN, outSize, {
          ...common,
          tpGroup: solo,
          generator: gen(62),
        });
        const par = new LayerNormColumnParallelLinear(IN, outSize, {
          ...common,
          tpGroup: group,
          sequenceParallel: sp,
          generator: gen(62),
        });
        const shard = (t: Tensor) => shardOf(t, partition, { tp, rank: r });
        c.equal('weight = shard of the TP=1 weight', par.weight, shard(ref.weight as Tensor));
        c.that(
          'parameter names',
          par
            .namedParameters()
            .map(([n]) => n)
            .join(',') ===
            (normalization === 'LayerNorm'
              ? 'layer_norm_weight,layer_norm_bias,weight,bias'
              : 'layer_norm_weight,weight,bias'),
        );
        const gamma = gaussian(63, [IN], 0.5).add(1);
        const beta = gaussian(64, [IN], 0.1);
        for (const m of [ref, par]) {
          assign(m.layerNormWeight, gamma);
          assign(m.layerNormBias, beta);
        }
        const bias = gaussian(65, [outSize]);
        assign(ref.bias, bias);
        assign(par.bias, shard(bias));
        const x = gaussian(66, [S, B, IN]);
        const xr = leaf(x);
        const xp = leaf(sp ? rowsOf(x, tp, r) : x);
        const yr = ref.forward(xr).output;
        const yp = par.forward(xp).output;
        c.close('output', yp, outputShard(yr, partition, tp, r));
        const dy = gaussian(67, [S, B, outSize]);
        yr.backward(dy);
        yp.backward(outputShard(dy, partition, tp, r));
        allreduceSequenceParallelGrads(par.parameters(), group);
        c.close('input grad', xp.grad, sp ? rowsOf(xr.grad as Tensor, tp, r) : (xr.grad as Tensor));
        c.close('layer_norm_weight grad', par.layerNormWeight.grad, ref.layerNormWeight.grad as Tensor);
        if (normalization === 'LayerNorm') {
          c.close('layer_norm_bias grad', par.layerNormBias?.grad ?? null, ref.layerNormBias?.grad as Tensor);
        }
        c.close('weight grad', par.weight?.grad ?? null, shard(ref.weight?.grad as Tensor));
        c.close('bias grad', par.bias?.grad ?? null, shard(ref.bias?.grad as Tensor));
      });
    }
  }

  for (const sp of [false, true]) {
    run(`VocabParallelEmbedding${sp ? ' reduceScatterEmbeddings' : ''}`, (c) => {
      const vocab = 64;
      const dim = 8;
      const ref = new VocabParallelEmbedding(vocab, dim, {
        tpGroup: solo,
        generator: gen(72),
        reduceScatterEmbeddings: sp,
      });
      const par = new VocabParallelEmbedding(vocab, dim, {
        tpGroup: group,
        generator: gen(72),
        reduceScatterEmbeddings: sp,
      });
      c.equal(
        'weight = shard of the TP=1 weight',
        par.weight,
        shardOf(ref.weight, 'split0', { tp, rank: r }),
      );
      const ids = randint(0, vocab, [B, S], { generator: gen(73) });
      const yr = ref.forward(ids);
      const yp = par.forward(ids);
      c.close('output', yp, sp ? rowsOf(yr, tp, r) : yr);
      const dy = gaussian(74, [...yr.shape]);
      yr.backward(dy);
      yp.backward(sp ? rowsOf(dy, tp, r) : dy);
      c.close('weight grad', par.weight.grad, shardOf(ref.weight.grad as Tensor, 'split0', { tp, rank: r }));
    });
  }
  return out;
}

/** vocabParallelCrossEntropy against crossEntropy of the full logits (± label smoothing, ± padded vocab). */
export function crossEntropyCases(group: ProcessGroup): CaseResult[] {
  const tp = group.size;
  const r = group.rank;
  const out: CaseResult[] = [];
  const V = 64;
  for (const [smoothing, vocabSize] of [
    [0, V],
    [0.1, V],
    [0, 37],
    [0.2, 37],
  ] as const) {
    const c = new Checks();
    tidy(() => {
      const logits = gaussian(80, [S, B, V], 3);
      const target = randint(0, vocabSize, [S, B], { generator: gen(81) });
      const full = leaf(logits);
      // Megatron's smoothing α gives every other class α/(K-1): torch's label smoothing α·K/(K-1).
      const torchSmoothing = (smoothing * vocabSize) / (vocabSize - 1);
      const want = crossEntropy(full.narrow(-1, 0, vocabSize).reshape(-1, vocabSize), target.reshape(-1), {
        reduction: 'none',
        labelSmoothing: torchSmoothing,
      }).reshape(S, B);
      const local = leaf(colsOf(logits, tp, r));
      const loss = vocabParallelCrossEntropy(local, target, smoothing, {
        tpGroup: group,
        ...(vocabSize < V ? { vocabSize } : {}),
      });
      c.close('loss', loss, want);
      const dl = gaussian(82, [S, B]);
      want.backward(dl);
      loss.backward(dl);
      c.close('logits grad', local.grad, colsOf(full.grad as Tensor, tp, r));
    });
    out.push({
      case: `crossEntropy smoothing=${smoothing} vocabSize=${vocabSize}/${V}`,
      rank: r,
      tp,
      checks: c.list,
    });
  }
  return out;
}

function maskHash(t: Tensor): string {
  return createHash('sha256').update(t.toBytes()).digest('hex').slice(0, 16);
}

/**
 * Dropout masks drawn inside the tracker's 'model-parallel-rng' fork (different per TP rank) and
 * outside it (the same on every TP rank), as hashes for the test to compare across ranks.
 */
export function rngCase(tpRank: number, tp: number): CaseResult {
  const c = new Checks();
  const values: Record<string, string> = {};
  tidy(() => {
    modelParallelManualSeed(1234, { tpRank, epRank: 0, etpRank: 0 });
    const x = ones([256]);
    const inside = getRngTracker().fork(() => dropout(x, 0.5));
    const outside = dropout(x, 0.5);
    const inside2 = getRngTracker().fork('model-parallel-rng', () => dropout(x, 0.5));
    values.inside = maskHash(inside);
    values.outside = maskHash(outside);
    values.inside2 = maskHash(inside2);
    // The streams are plain Philox generators: seed, and seed + 2718 + tpRank inside the fork.
    const tpGen = gen(1234 + 2718 + tpRank);
    c.equal('inside = model-parallel stream', inside, dropout(x, 0.5, true, tpGen));
    c.equal('second fork continues the stream', inside2, dropout(x, 0.5, true, tpGen));
    c.equal('outside = default stream', outside, dropout(x, 0.5, true, gen(1234)));
  });
  return { case: 'rng', rank: tpRank, tp, checks: c.list, values };
}

/** Every case on `group`. */
export function allCases(group: ProcessGroup): CaseResult[] {
  return [
    ...mappingCases(group),
    ...layerCases(group),
    ...crossEntropyCases(group),
    rngCase(group.rank, group.size),
  ];
}
