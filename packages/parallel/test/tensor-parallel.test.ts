// Tensor-parallel layers, mappings, cross-entropy and RNG tracker in one process: on a group of
// one every layer must equal the plain @megapatch/tensor computation and communicate nothing;
// layers built for TP=2 and 4 (construction only) must hold exact shards of the TP=1 weights.
import {
  crossEntropy,
  dropout,
  embedding,
  Generator,
  getRngState,
  gradcheck,
  initMethodNormal,
  layerNorm,
  linear,
  manualSeed,
  memoryStats,
  noGrad,
  ones,
  randint,
  randn,
  resetPeakMemoryStats,
  rmsNorm,
  type Tensor,
  tidy,
  zeros,
} from '@megapatch/tensor';
import { describe, expect, it } from 'vitest';
import { DistributedError } from '../src/errors.js';
import { getTensorModelParallelAttributes } from '../src/tensor-parallel/attributes.js';
import { vocabParallelCrossEntropy } from '../src/tensor-parallel/cross-entropy.js';
import {
  ColumnParallelLinear,
  LayerNormColumnParallelLinear,
  padVocabSize,
  RowParallelLinear,
  VocabParallelEmbedding,
  vocabRangeFromGlobalVocabSize,
} from '../src/tensor-parallel/layers.js';
import {
  copyToTensorModelParallelRegion,
  gatherFromSequenceParallelRegion,
  gatherFromTensorModelParallelRegion,
  reduceFromTensorModelParallelRegion,
  reduceScatterToSequenceParallelRegion,
  scatterToSequenceParallelRegion,
  scatterToTensorModelParallelRegion,
} from '../src/tensor-parallel/mappings.js';
import { getRngTracker, modelParallelManualSeed } from '../src/tensor-parallel/random.js';
import { allreduceSequenceParallelGrads } from '../src/tensor-parallel/sequence-parallel-grads.js';
import { gatherShards, shardOf } from '../src/tensor-parallel/sharding.js';
import { allCases, shapeOnlyGroup, soloGroup } from './workers/tp-cases.js';

const bytes = (t: Tensor | null) => Buffer.from((t as Tensor).toBytes());
const expectSame = (got: Tensor | null, want: Tensor) => {
  expect(got?.shape).toEqual(want.shape);
  expect(Buffer.compare(bytes(got), bytes(want))).toBe(0);
};
const expectClose = (got: Tensor | null, want: Tensor, tol = 1e-6) => {
  expect(got?.shape).toEqual(want.shape);
  const a = (got as Tensor).toTypedArray() as Float32Array;
  const b = want.toTypedArray() as Float32Array;
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  expect(max).toBeLessThanOrEqual(tol);
};

describe('mappings on a group of one', () => {
  const mappings = {
    copyToTensorModelParallelRegion,
    reduceFromTensorModelParallelRegion,
    scatterToTensorModelParallelRegion,
    gatherFromTensorModelParallelRegion,
    scatterToSequenceParallelRegion,
    gatherFromSequenceParallelRegion: (x: Tensor, g: ReturnType<typeof soloGroup>) =>
      gatherFromSequenceParallelRegion(x, true, g),
    reduceScatterToSequenceParallelRegion,
  };
  for (const [name, fn] of Object.entries(mappings)) {
    it(`${name} is the identity forward and backward, with no communication`, () => {
      tidy(() => {
        const g = soloGroup();
        const x = randn([4, 2, 6], { generator: new Generator(1) }).requiresGrad_();
        const y = fn(x, g);
        expectSame(y, x);
        const dy = randn([4, 2, 6], { generator: new Generator(2) });
        y.backward(dy);
        expectSame(x.grad, dy);
        expect(g.calls).toBe(0);
      });
    });
  }
});

describe('layers on a group of one equal the plain ops', () => {
  const x = () => randn([5, 3, 16], { generator: new Generator(7) });

  it('ColumnParallelLinear = linear, weight = the master weight of the same generator', () => {
    tidy(() => {
      const g = soloGroup();
      const layer = new ColumnParallelLinear(16, 12, { tpGroup: g, generator: new Generator(3) });
      const master = initMethodNormal(0.02)(zeros([12, 16]), new Generator(3));
      expectSame(layer.weight, master);
      expect(layer.bias?.shape).toEqual([12]);
      noGrad(() => layer.bias?.copy_(randn([12], { generator: new Generator(4) })));
      const xa = x().requiresGrad_();
      const xb = x().requiresGrad_();
      const { output, bias } = layer.forward(xa);
      expect(bias).toBeNull();
      const want = linear(xb, master.detach().requiresGrad_(), layer.bias?.detach());
      expectSame(output, want);
      const dy = randn([5, 3, 12], { generator: new Generator(5) });
      output.backward(dy);
      want.backward(dy);
      expectSame(xa.grad, xb.grad as Tensor);
      expect(g.calls).toBe(0);
      expect(layer.namedParameters().map(([n]) => n)).toEqual(['weight', 'bias']);
      expect(getTensorModelParallelAttributes(layer.weight as Tensor)).toMatchObject({
        tensorModelParallel: true,
        partitionDim: 0,
      });
      expect(getTensorModelParallelAttributes(layer.bias as Tensor).tensorModelParallel).toBe(true);
    });
  });

  it('ColumnParallelLinear: skipBiasAdd returns the bias, gatherOutput and a supplied weight', () => {
    tidy(() => {
      const g = soloGroup();
      const layer = new ColumnParallelLinear(16, 8, { tpGroup: g, skipBiasAdd: true, gatherOutput: true });
      const r = layer.forward(x());
      expect(r.bias).toBe(layer.bias);
      expectSame(r.output, linear(x(), layer.weight as Tensor));
      const tied = new ColumnParallelLinear(16, 8, {
        tpGroup: g,
        skipWeightParamAllocation: true,
        bias: false,
      });
      expect(tied.weight).toBeNull();
      expect(() => tied.forward(x())).toThrow(DistributedError);
      const w = randn([8, 16], { generator: new Generator(9) });
      expectSame(tied.forward(x(), w).output, linear(x(), w));
      expect(() => tied.forward(x(), randn([16, 8]))).toThrow(/expected \[8,16\]/);
    });
  });

  it('RowParallelLinear = linear with the bias added after the reduction', () => {
    tidy(() => {
      const g = soloGroup();
      const layer = new RowParallelLinear(16, 10, {
        tpGroup: g,
        inputIsParallel: true,
        generator: new Generator(11),
      });
      noGrad(() => layer.bias?.copy_(randn([10], { generator: new Generator(12) })));
      expectSame(layer.forward(x()).output, linear(x(), layer.weight).add(layer.bias as Tensor));
      expect(getTensorModelParallelAttributes(layer.weight).partitionDim).toBe(1);
      expect(getTensorModelParallelAttributes(layer.bias as Tensor).tensorModelParallel).toBe(false);
      expect(() => new RowParallelLinear(16, 10, { tpGroup: g, sequenceParallel: true })).toThrow(
        /sequenceParallel needs inputIsParallel/,
      );
      const sp = new RowParallelLinear(16, 10, { tpGroup: g, inputIsParallel: true, sequenceParallel: true });
      expect(getTensorModelParallelAttributes(sp.bias as Tensor).sequenceParallel).toBe(true);
      expect(g.calls).toBe(0);
    });
  });

  for (const normalization of ['RMSNorm', 'LayerNorm'] as const) {
    it(`LayerNormColumnParallelLinear (${normalization}) = linear(norm(x))`, () => {
      tidy(() => {
        const g = soloGroup();
        const layer = new LayerNormColumnParallelLinear(16, 8, { tpGroup: g, normalization, eps: 1e-6 });
        const names = layer.namedParameters().map(([n]) => n);
        expect(names).toEqual(
          normalization === 'LayerNorm'
            ? ['layer_norm_weight', 'layer_norm_bias', 'weight', 'bias']
            : ['layer_norm_weight', 'weight', 'bias'],
        );
        noGrad(() => layer.layerNormWeight.copy_(randn([16], { generator: new Generator(13) })));
        const normed =
          normalization === 'RMSNorm'
            ? rmsNorm(x(), [16], layer.layerNormWeight, 1e-6)
            : layerNorm(x(), [16], layer.layerNormWeight, layer.layerNormBias, 1e-6);
        expectSame(layer.forward(x()).output, linear(normed, layer.weight as Tensor, layer.bias));
        const spLayer = new LayerNormColumnParallelLinear(16, 8, {
          tpGroup: g,
          normalization,
          sequenceParallel: true,
        });
        expect(getTensorModelParallelAttributes(spLayer.layerNormWeight).sequenceParallel).toBe(true);
        expect(getTensorModelParallelAttributes(layer.layerNormWeight).sequenceParallel).toBeUndefined();
      });
    });
  }

  it('VocabParallelEmbedding = embedding; reduceScatterEmbeddings gives [s, b, h]', () => {
    tidy(() => {
      const g = soloGroup();
      const layer = new VocabParallelEmbedding(32, 6, { tpGroup: g, generator: new Generator(14) });
      const ids = randint(0, 32, [2, 5], { generator: new Generator(15) });
      expectSame(layer.forward(ids), embedding(ids, layer.weight));
      const rs = new VocabParallelEmbedding(32, 6, {
        tpGroup: g,
        generator: new Generator(14),
        reduceScatterEmbeddings: true,
      });
      expectSame(rs.forward(ids), embedding(ids, layer.weight).transpose(0, 1).contiguous());
      expect(() => rs.forward(randint(0, 32, [10]))).toThrow(/needs ids \[b, s\]/);
      expect(g.calls).toBe(0);
    });
  });

  it('vocabulary helpers follow Megatron', () => {
    expect(padVocabSize(1000)).toBe(1024);
    expect(padVocabSize(50257, 128, 8)).toBe(51200);
    expect(padVocabSize(777, 128, 2)).toBe(1024);
    expect(vocabRangeFromGlobalVocabSize(1024, 3, 4)).toEqual([768, 1024]);
    expect(() => vocabRangeFromGlobalVocabSize(1000, 0, 3)).toThrow(DistributedError);
  });

  it('allreduceSequenceParallelGrads is a no-op on a group of one', () => {
    const g = soloGroup();
    const layer = new LayerNormColumnParallelLinear(16, 8, { tpGroup: g, sequenceParallel: true });
    layer.forward(x()).output.sum().backward();
    const before = bytes(layer.layerNormWeight.grad);
    allreduceSequenceParallelGrads(layer.parameters(), g);
    expect(Buffer.compare(bytes(layer.layerNormWeight.grad), before)).toBe(0);
    expect(g.calls).toBe(0);
    layer.dispose();
  });
});

describe('memory', () => {
  it('a training step of every layer and the loss leaves live memory flat', () => {
    const g = soloGroup();
    const lnc = new LayerNormColumnParallelLinear(16, 32, {
      tpGroup: g,
      normalization: 'RMSNorm',
      sequenceParallel: true,
    });
    const row = new RowParallelLinear(32, 16, { tpGroup: g, inputIsParallel: true, sequenceParallel: true });
    const emb = new VocabParallelEmbedding(32, 16, { tpGroup: g, reduceScatterEmbeddings: true });
    const head = new ColumnParallelLinear(16, 32, { tpGroup: g, sequenceParallel: true });
    const ids = randint(0, 32, [2, 4], { generator: new Generator(1) });
    const target = randint(0, 30, [4, 2], { generator: new Generator(2) });
    const live: number[] = [];
    for (let step = 0; step < 4; step++) {
      tidy(() => {
        const h = emb.forward(ids);
        const y = row.forward(lnc.forward(h).output.silu()).output.add(h);
        const loss = vocabParallelCrossEntropy(head.forward(y).output, target, 0.1, {
          tpGroup: g,
          vocabSize: 30,
        });
        loss.mean().backward();
      });
      for (const m of [lnc, row, emb, head]) {
        allreduceSequenceParallelGrads(m.parameters(), g);
        m.zeroGrad();
      }
      live.push(memoryStats().liveBytes);
    }
    expect(live[3]).toBe(live[1]);
    expect(live[2]).toBe(live[1]);
    for (const t of [ids, target]) t.dispose();
    for (const m of [lnc, row, emb, head]) m.dispose();
  });
});

describe('layers built for TP > 1 hold exact shards of the TP=1 weights', () => {
  const qkvDims = { numHeads: 8, numQueryGroups: 4, headDim: 2 };
  for (const tp of [2, 4]) {
    it(`TP=${tp}: column (split0, qkv, gate_up), row, LayerNorm+column and embedding`, () => {
      tidy(() => {
        const solo = soloGroup();
        const seed = () => new Generator(21);
        const cases = [
          { partition: 'split0' as const, out: 24 },
          { partition: 'qkv' as const, out: (8 + 2 * 4) * 2 },
          { partition: 'gate_up' as const, out: 32 },
        ];
        for (const { partition, out } of cases) {
          const full = new ColumnParallelLinear(12, out, {
            tpGroup: solo,
            partition,
            qkvDims,
            generator: seed(),
          });
          const parts = Array.from(
            { length: tp },
            (_, r) =>
              new ColumnParallelLinear(12, out, {
                tpGroup: shapeOnlyGroup(tp, r),
                partition,
                qkvDims,
                generator: seed(),
              }).weight as Tensor,
          );
          parts.forEach((p, r) => {
            expectSame(p, shardOf(full.weight as Tensor, partition, { tp, rank: r, qkvDims }));
          });
          expectSame(gatherShards(parts, partition, { qkvDims }), full.weight as Tensor);
          const ln = new LayerNormColumnParallelLinear(12, out, {
            tpGroup: shapeOnlyGroup(tp, tp - 1),
            partition,
            qkvDims,
            generator: seed(),
          });
          expectSame(ln.weight, parts[tp - 1]);
          expect(ln.bias?.shape).toEqual([out / tp]);
        }
        const row = new RowParallelLinear(16, 12, { tpGroup: solo, generator: seed() });
        const rowParts = Array.from(
          { length: tp },
          (_, r) =>
            new RowParallelLinear(16, 12, {
              tpGroup: shapeOnlyGroup(tp, r),
              inputIsParallel: true,
              generator: seed(),
            }),
        );
        expectSame(
          gatherShards(
            rowParts.map((l) => l.weight),
            'split1',
          ),
          row.weight,
        );
        expect(rowParts[0].bias?.shape).toEqual([12]);
        const emb = new VocabParallelEmbedding(64, 4, { tpGroup: solo, generator: seed() });
        const embParts = Array.from(
          { length: tp },
          (_, r) => new VocabParallelEmbedding(64, 4, { tpGroup: shapeOnlyGroup(tp, r), generator: seed() }),
        );
        expect(embParts[1].vocabStartIndex).toBe(64 / tp);
        expectSame(
          gatherShards(
            embParts.map((l) => l.weight),
            'vocab',
          ),
          emb.weight,
        );
      });
    });
  }

  it('bfloat16: the float32 master weight is cast, then cut', () => {
    tidy(() => {
      const master = initMethodNormal(0.02)(zeros([16, 8]), new Generator(22));
      for (let r = 0; r < 2; r++) {
        const layer = new ColumnParallelLinear(8, 16, {
          tpGroup: shapeOnlyGroup(2, r),
          dtype: 'bfloat16',
          partition: 'gate_up',
          generator: new Generator(22),
        });
        expect(layer.bias?.dtype).toBe('bfloat16');
        expectSame(layer.weight, shardOf(master.to('bfloat16'), 'gate_up', { tp: 2, rank: r }));
      }
    });
  });

  it('rejects sizes that cannot be split', () => {
    const g = shapeOnlyGroup(4, 0);
    expect(() => new ColumnParallelLinear(8, 6, { tpGroup: g })).toThrow(/not divisible by the TP size 4/);
    expect(() => new ColumnParallelLinear(8, 12, { tpGroup: g, partition: 'gate_up' })).toThrow(/ffn/);
    expect(() => new ColumnParallelLinear(8, 16, { tpGroup: g, partition: 'qkv' })).toThrow(/needs qkvDims/);
    expect(
      () =>
        new ColumnParallelLinear(8, 16, {
          tpGroup: g,
          partition: 'qkv',
          qkvDims: { numHeads: 4, numQueryGroups: 2, headDim: 2 },
        }),
    ).toThrow(/numQueryGroups 2 is not divisible/);
    expect(() => new RowParallelLinear(6, 8, { tpGroup: g })).toThrow(/inputSize 6/);
    expect(() => new VocabParallelEmbedding(10, 8, { tpGroup: g })).toThrow(/padVocabSize/);
  });
});

describe('vocabParallelCrossEntropy on a group of one', () => {
  const logits = (dtype: 'float32' | 'float64' = 'float32', v = 11) =>
    randn([3, 2, v], { generator: new Generator(31), std: 2, dtype });
  const target = (v = 11) => randint(0, v, [3, 2], { generator: new Generator(32) });

  it('equals crossEntropy per token, forward and backward', () => {
    tidy(() => {
      const g = soloGroup();
      const a = logits().requiresGrad_();
      const b = logits().requiresGrad_();
      const loss = vocabParallelCrossEntropy(a, target(), 0, { tpGroup: g });
      expect(loss.dtype).toBe('float32');
      const want = crossEntropy(b.reshape(-1, 11), target().reshape(-1), { reduction: 'none' }).reshape(3, 2);
      expectClose(loss, want, 2e-6);
      const dl = randn([3, 2], { generator: new Generator(33) });
      loss.backward(dl);
      want.backward(dl);
      expectClose(a.grad, b.grad as Tensor, 1e-6);
      expect(g.calls).toBe(0);
    });
  });

  it('label smoothing α is crossEntropy with α·K/(K-1), as Megatron defines it', () => {
    tidy(() => {
      const g = soloGroup();
      const a = logits().requiresGrad_();
      const b = logits().requiresGrad_();
      const loss = vocabParallelCrossEntropy(a, target(), 0.1, { tpGroup: g });
      const want = crossEntropy(b.reshape(-1, 11), target().reshape(-1), {
        reduction: 'none',
        labelSmoothing: (0.1 * 11) / 10,
      }).reshape(3, 2);
      expectClose(loss, want, 2e-6);
      loss.sum().backward();
      want.sum().backward();
      expectClose(a.grad, b.grad as Tensor, 1e-6);
    });
  });

  it('vocabSize masks padded logits out: padding changes no loss and gets no gradient', () => {
    tidy(() => {
      const g = soloGroup();
      for (const smoothing of [0, 0.2]) {
        const padded = logits('float32', 16).requiresGrad_();
        const real = logits('float32', 16).narrow(-1, 0, 11).contiguous().requiresGrad_();
        const t = target(11);
        const loss = vocabParallelCrossEntropy(padded, t, smoothing, { tpGroup: g, vocabSize: 11 });
        const want = vocabParallelCrossEntropy(real, t, smoothing, { tpGroup: g });
        expectClose(loss, want, 1e-6);
        loss.sum().backward();
        want.sum().backward();
        expectClose(padded.grad?.narrow(-1, 0, 11).contiguous() ?? null, real.grad as Tensor, 1e-7);
        expectSame(padded.grad?.narrow(-1, 11, 5).contiguous() ?? null, zeros([3, 2, 5]));
      }
    });
  });

  it('matches finite differences in float64 (gradcheck), with and without smoothing and padding', () => {
    const g = soloGroup();
    for (const [smoothing, vocabSize] of [
      [0, undefined],
      [0.15, undefined],
      [0.15, 9],
    ] as const) {
      const x = logits('float64').requiresGrad_();
      const t = target(9);
      expect(
        gradcheck((l) => vocabParallelCrossEntropy(l, t, smoothing, { tpGroup: g, vocabSize }), [x]),
      ).toBe(true);
      x.dispose();
      t.dispose();
    }
  });

  it('keeps bfloat16 logits in bfloat16 for the gradient and computes in float32', () => {
    tidy(() => {
      const g = soloGroup();
      const x = logits().to('bfloat16').requiresGrad_();
      const loss = vocabParallelCrossEntropy(x, target(), 0, { tpGroup: g });
      expect(loss.dtype).toBe('float32');
      loss.sum().backward();
      expect(x.grad?.dtype).toBe('bfloat16');
    });
  });

  it('allocates no [tokens, V] tensor in the forward and keeps none for the backward but the logits', () => {
    const g = soloGroup();
    const [rows, v] = [64, 1000];
    const oneFloatTensor = rows * v * 4;
    for (const [dtype, smoothing] of [
      ['float32', 0],
      ['bfloat16', 0.1],
    ] as const) {
      tidy(() => {
        const x = randn([rows, v], { generator: new Generator(34), dtype }).requiresGrad_();
        const t = randint(0, 900, [rows], { generator: new Generator(35) });
        const base = memoryStats().liveBytes;
        resetPeakMemoryStats();
        // vocabSize 900 of 1000: the real columns are a strided view of the padded slice
        const loss = vocabParallelCrossEntropy(x, t, smoothing, { tpGroup: g, vocabSize: 900 });
        expect(memoryStats().peakBytes - base).toBeLessThan(oneFloatTensor / 32);
        expect(memoryStats().liveBytes - base).toBeLessThan(oneFloatTensor / 32);
        loss.sum().backward();
        // the backward's only large allocation is the gradient itself
        const gradBytes = rows * v * (dtype === 'float32' ? 4 : 2);
        expect(memoryStats().peakBytes - base).toBeLessThan(gradBytes + oneFloatTensor / 32);
        expect(x.grad?.dtype).toBe(dtype);
      });
    }
  });

  it('rejects bad arguments', () => {
    const g = soloGroup();
    expect(() => vocabParallelCrossEntropy(logits(), randint(0, 11, [3]), 0, { tpGroup: g })).toThrow(
      /does not match/,
    );
    expect(() => vocabParallelCrossEntropy(logits(), target(), 1, { tpGroup: g })).toThrow(/labelSmoothing/);
    expect(() => vocabParallelCrossEntropy(logits(), target(), 0, { tpGroup: g, vocabSize: 12 })).toThrow(
      /vocabSize/,
    );
    expect(() => vocabParallelCrossEntropy(logits(), target().float(), 0, { tpGroup: g })).toThrow(
      /int64 or int32/,
    );
  });
});

describe('RNG tracker', () => {
  it('forks a per-TP-rank stream and restores the default one', () => {
    tidy(() => {
      const x = ones([128]);
      const masks = [0, 1].map((tpRank) => {
        modelParallelManualSeed(99, { tpRank, epRank: 0, etpRank: 0 });
        const before = getRngState();
        const inside = getRngTracker().fork(() => dropout(x, 0.5));
        expect(getRngState()).toEqual(before);
        const outside = dropout(x, 0.5);
        return { inside: bytes(inside), outside: bytes(outside) };
      });
      expect(Buffer.compare(masks[0].inside, masks[1].inside)).not.toBe(0);
      expect(Buffer.compare(masks[0].outside, masks[1].outside)).toBe(0);
    });
  });

  it('states round-trip through getStates/setStates and forks nest', () => {
    tidy(() => {
      const tracker = getRngTracker();
      modelParallelManualSeed(5, { tpRank: 2, epRank: 1, etpRank: 0 });
      expect(Object.keys(tracker.getStates()).sort()).toEqual([
        'data-parallel-rng',
        'expert-parallel-rng',
        'model-parallel-rng',
      ]);
      expect(tracker.getStates()['model-parallel-rng'].seed).toBe(String(5 + 2718 + 2));
      expect(tracker.getStates()['expert-parallel-rng'].seed).toBe(String(5 + 1024 + 100));
      const saved = tracker.getStates();
      const x = ones([64]);
      const first = tracker.fork(() => {
        const a = dropout(x, 0.3);
        const nested = tracker.fork('expert-parallel-rng', () => dropout(x, 0.3));
        const b = dropout(x, 0.3);
        return [a, nested, b].map(bytes);
      });
      tracker.setStates(saved);
      const again = tracker.fork(() => {
        const a = dropout(x, 0.3);
        const nested = tracker.fork('expert-parallel-rng', () => dropout(x, 0.3));
        const b = dropout(x, 0.3);
        return [a, nested, b].map(bytes);
      });
      expect(again).toEqual(first);
      // the nested fork did not disturb the outer stream: a then b is a's generator drawing twice
      const gen = new Generator(5 + 2718 + 2);
      dropout(x, 0.3, true, gen);
      expect(Buffer.compare(first[2], bytes(dropout(x, 0.3, true, gen)))).toBe(0);
    });
  });

  it('refuses duplicate names and seeds, unknown states and async functions', () => {
    const tracker = getRngTracker();
    tracker.reset();
    expect(tracker.isInitialized()).toBe(false);
    tracker.add('a', 1);
    expect(() => tracker.add('b', 1)).toThrow(/seed 1 already exists/);
    expect(() => tracker.add('a', 2)).toThrow(/'a' already exists/);
    expect(() => tracker.fork('nope', () => 0)).toThrow(/not added/);
    expect(() => tracker.fork('a', async () => 0)).toThrow(/promise/);
    const before = getRngState();
    expect(() =>
      tracker.fork('a', () => {
        throw new Error('boom');
      }),
    ).toThrow('boom');
    expect(getRngState()).toEqual(before);
    manualSeed(0);
  });
});

describe('shared multi-process cases on a group of one (checks the harness)', () => {
  it('every case passes and communicates nothing', () => {
    const g = soloGroup();
    const results = allCases(g);
    const failed = results.flatMap((r) => r.checks.filter((c) => !c.ok).map((c) => ({ case: r.case, ...c })));
    expect(failed).toEqual([]);
    expect(results.length).toBeGreaterThan(20);
    expect(g.calls).toBe(0);
  });
});
