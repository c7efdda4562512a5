// Context parallelism in one process: the load-balanced split, its inverse, position ids and
// local boundaries of packed rows, their error messages, and ring attention on a group of one
// (which must be exactly the fused attention) with its argument checks. The multi-rank ring runs
// in context-parallel-multiprocess.test.ts.
import {
  arange,
  manualSeed,
  memoryStats,
  randn,
  scaledDotProductAttention,
  type Tensor,
  tensor,
  tidy,
} from '@megapatch/tensor';
import { describe, expect, it } from 'vitest';
import { ringAttention } from '../src/context-parallel/ring-attention.js';
import {
  contextParallelCuSeqlens,
  contextParallelGather,
  contextParallelPlan,
  contextParallelPositionIds,
  contextParallelSplit,
  contextParallelUnsplit,
  padCuSeqlensForContextParallel,
} from '../src/context-parallel/split.js';
import { DistributedError } from '../src/errors.js';
import type { ProcessGroup, Work } from '../src/process-group.js';
import { SingleProcessGroup } from '../src/single-process-group.js';

/** A CP group of `size` that must never communicate (argument checks come first). */
function silentGroup(size: number, rank = 0): ProcessGroup {
  const no = (): Work => {
    throw new Error('no communication expected');
  };
  return {
    backend: 'none',
    name: 'cp',
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

function errorOf(fn: () => unknown): DistributedError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(DistributedError);
    return e as DistributedError;
  }
  throw new Error('expected an error');
}

describe('load-balanced split', () => {
  it('gives rank r chunks r and 2·cp−1−r', () => {
    expect(contextParallelPlan(8, { size: 2, rank: 0 }).tokenIndices).toEqual([0, 1, 6, 7]);
    expect(contextParallelPlan(8, { size: 2, rank: 1 }).tokenIndices).toEqual([2, 3, 4, 5]);
    const p = contextParallelPlan(16, { size: 4, rank: 1 });
    expect(p.tokenIndices).toEqual([2, 3, 12, 13]);
    expect(p.positionIds).toEqual([2, 3, 12, 13]);
    expect(p.localLen).toBe(4);
    expect(p.localCuSeqlens).toBeNull();
  });

  it('splits every sample of a packed row, with per-sample positions and local boundaries', () => {
    const p = contextParallelPlan(12, { size: 2, rank: 0 }, { cuSeqlens: [0, 8, 12] });
    expect(p.tokenIndices).toEqual([0, 1, 6, 7, 8, 11]);
    expect(p.positionIds).toEqual([0, 1, 6, 7, 0, 3]);
    expect(p.localCuSeqlens).toEqual([0, 4, 6]);
    const q = contextParallelPlan(
      12,
      { size: 2, rank: 1 },
      { cuSeqlens: tensor([0, 8, 12], { dtype: 'int64' }) },
    );
    expect(q.tokenIndices).toEqual([2, 3, 4, 5, 9, 10]);
    expect(q.positionIds).toEqual([2, 3, 4, 5, 1, 2]);
  });

  it('splits [s, b, h] along dim 0 (or any seqDim) and any dtype', () =>
    tidy(() => {
      const x = arange(0, 8 * 3 * 2).reshape(8, 3, 2);
      const local = contextParallelSplit(x, { size: 2, rank: 1 });
      expect(local.shape).toEqual([4, 3, 2]);
      expect(local.toArray()).toEqual([2, 3, 4, 5].map((s) => x.select(0, s).toArray() as number[][]));
      const tokens = tensor([[10, 11, 12, 13, 14, 15, 16, 17]], { dtype: 'int64' });
      expect(contextParallelSplit(tokens, { size: 2, rank: 0 }, { seqDim: 1 }).toArray()).toEqual([
        [10, 11, 16, 17],
      ]);
      expect(contextParallelSplit(tokens, { size: 2, rank: 0 }, { seqDim: -1 }).dtype).toBe('int64');
    }));

  it('is differentiable: gradients land on the rank’s rows of the full sequence', () =>
    tidy(() => {
      const x = randn([8, 1, 2]).requiresGrad_();
      contextParallelSplit(x, { size: 2, rank: 0 }).sum().backward();
      expect(x.grad!.sum([1, 2]).toArray()).toEqual([2, 2, 0, 0, 0, 0, 2, 2]);
      x.grad!.dispose();
    }));

  for (const cp of [1, 2, 3, 4]) {
    it(`unsplit inverts the split (cp = ${cp}, plain and packed)`, () =>
      tidy(() => {
        const m = 2 * cp;
        const x = randn([5 * m, 2, 3]);
        for (const cuSeqlens of [null, [0, 2 * m, 2 * m, 3 * m, 5 * m]]) {
          const parts = Array.from({ length: cp }, (_, rank) =>
            contextParallelSplit(x, { size: cp, rank }, { cuSeqlens }),
          );
          const back = contextParallelUnsplit(parts, { cuSeqlens });
          expect(back.sub(x).abs().max().item()).toBe(0);
        }
        const y = randn([2, 4, 3 * m, 5]);
        const parts = Array.from({ length: cp }, (_, rank) =>
          contextParallelSplit(y, { size: cp, rank }, { seqDim: 2 }),
        );
        expect(contextParallelUnsplit(parts, { seqDim: 2 }).sub(y).abs().max().item()).toBe(0);
      }));
  }

  it('gathers over a group of one as the identity', () =>
    tidy(() => {
      const x = randn([8, 2]);
      expect(contextParallelGather(x, new SingleProcessGroup()).sub(x).abs().max().item()).toBe(0);
    }));

  it('gives position ids and local boundaries as tensors', () =>
    tidy(() => {
      const pos = contextParallelPositionIds(12, { size: 2, rank: 1 }, { cuSeqlens: [0, 8, 12] });
      expect(pos.dtype).toBe('int64');
      expect(pos.toArray()).toEqual([2, 3, 4, 5, 1, 2]);
      const cu = contextParallelCuSeqlens([0, 8, 12], 2);
      expect(cu.dtype).toBe('int32');
      expect(cu.toArray()).toEqual([0, 4, 6]);
      const cu64 = contextParallelCuSeqlens(tensor([0, 8, 12, 20], { dtype: 'int64' }), 2);
      expect(cu64.dtype).toBe('int64');
      expect(cu64.toArray()).toEqual([0, 4, 6, 10]);
    }));

  it('pads packed boundaries so that every sample is a multiple of 2·cp', () => {
    expect(padCuSeqlensForContextParallel([0, 5, 12, 13], 2)).toEqual([0, 8, 16, 20]);
    expect(padCuSeqlensForContextParallel([0, 8, 12], 2)).toEqual([0, 8, 12]);
  });

  it('says how to fix a length that does not split', () => {
    const e = errorOf(() => contextParallelPlan(10, { size: 2, rank: 0 }));
    expect(e.code).toBe('INVALID_ARGUMENT');
    expect(e.message).toBe(
      'contextParallelPlan: sequence length 10 is not divisible by 2·cp = 4 (cp = 2); pad the sequence to a multiple of 4 (e.g. 12 tokens)',
    );
    expect(e.message).not.toContain('\n');
    const packed = errorOf(() =>
      contextParallelSplit(randn([13, 1]), { size: 2, rank: 0 }, { cuSeqlens: [0, 8, 13] }),
    );
    expect(packed.message).toContain(
      'sample 1 of the packed row (tokens 8..12, length 5) is not divisible by 2·cp = 4',
    );
    expect(packed.message).toContain('pad each sample at its end to a multiple of 4 (here 8');
    expect(
      errorOf(() => contextParallelPlan(12, { size: 2, rank: 0 }, { cuSeqlens: [0, 8] })).message,
    ).toContain('cuSeqlens ends at 8 but the sequence has 12 tokens');
    expect(errorOf(() => contextParallelPlan(8, { size: 2, rank: 2 })).message).toContain(
      'rank 2 of a context-parallel group of size 2 is not valid',
    );
    expect(
      errorOf(() => contextParallelSplit(randn([8, 2]), { size: 2, rank: 0 }, { seqDim: 2 })).message,
    ).toContain('seqDim 2 is out of range');
  });
});

describe('ring attention on a group of one', () => {
  const cases: {
    name: string;
    hq: number;
    hkv: number;
    d: number;
    dv: number;
    cu?: number[];
    causal?: boolean;
  }[] = [
    { name: 'grouped-query', hq: 4, hkv: 2, d: 16, dv: 16 },
    { name: 'MLA head dims', hq: 2, hkv: 2, d: 24, dv: 16 },
    { name: 'packed', hq: 2, hkv: 1, d: 8, dv: 8, cu: [0, 4, 10, 16] },
    { name: 'not causal', hq: 2, hkv: 2, d: 8, dv: 8, causal: false },
  ];
  for (const c of cases) {
    it(`${c.name}: exactly the fused attention, forward and backward`, () => {
      const before = memoryStats().liveBytes;
      tidy(() => {
        manualSeed(3);
        const b = c.cu ? 1 : 2;
        const s = 16;
        const make = (h: number, d: number) => randn([b, h, s, d]);
        const [q, k, v] = [make(c.hq, c.d), make(c.hkv, c.d), make(c.hkv, c.dv)];
        const g = make(c.hq, c.dv);
        const cu = c.cu ? tensor(c.cu, { dtype: 'int32' }) : null;
        const causal = c.causal ?? true;
        const grads = (fn: (q: Tensor, k: Tensor, v: Tensor) => Tensor) => {
          const leaves = [q, k, v].map((t) => t.clone().requiresGrad_());
          const out = fn(leaves[0], leaves[1], leaves[2]);
          out.backward(g);
          const gs = leaves.map((t) => t.grad!);
          return [out, ...gs];
        };
        const want = grads((a, b2, c2) =>
          scaledDotProductAttention(a, b2, c2, { isCausal: causal, cuSeqlens: cu, scale: 0.2 }),
        );
        const got = grads((a, b2, c2) =>
          ringAttention(a, b2, c2, {
            cpGroup: new SingleProcessGroup('cp'),
            causal,
            cuSeqlens: cu,
            scale: 0.2,
          }),
        );
        for (let i = 0; i < 4; i++) expect(got[i].sub(want[i]).abs().max().item()).toBe(0);
        for (const t of [...got.slice(1), ...want.slice(1)]) t.dispose();
      });
      expect(memoryStats().liveBytes).toBe(before);
    });
  }

  it('rejects what the ring cannot compute, before communicating', () =>
    tidy(() => {
      const cp = silentGroup(2);
      const q = randn([1, 4, 8, 16]);
      const kv = randn([1, 2, 8, 16]);
      const msg = (fn: () => unknown) => errorOf(fn).message;
      expect(
        msg(() =>
          ringAttention(randn([1, 4, 7, 16]), randn([1, 2, 7, 16]), randn([1, 2, 7, 16]), { cpGroup: cp }),
        ),
      ).toBe(
        'ringAttention: the local sequence has 7 tokens, an odd number: each rank holds two equal chunks; split the inputs with contextParallelSplit (sequence length divisible by 2·cp)',
      );
      expect(
        msg(() => ringAttention(q, randn([1, 3, 8, 16]), randn([1, 3, 8, 16]), { cpGroup: cp })),
      ).toContain('query heads (4) must be a multiple of the key/value heads (k 3, v 3)');
      expect(msg(() => ringAttention(q, randn([1, 2, 8, 8]), kv, { cpGroup: cp }))).toContain(
        'head dims of q (16) and k (8) differ',
      );
      expect(msg(() => ringAttention(q, kv, kv.to('bfloat16'), { cpGroup: cp }))).toContain(
        'must share one floating-point dtype',
      );
      expect(msg(() => ringAttention(q, kv, randn([1, 2, 6, 16]), { cpGroup: cp }))).toContain(
        'same local tokens',
      );
      // the dropout mask covers this rank's queries against the whole row's keys: [1, 4, 8, 16]
      expect(msg(() => ringAttention(q, kv, kv, { cpGroup: cp, dropoutMask: randn([1, 4, 8, 8]) }))).toBe(
        "ringAttention: dropoutMask must be a floating-point [1,4,8,16] on cpu (this rank's queries against every key of the whole row), got float32 [1,4,8,8] on cpu",
      );
      const cu = tensor([0, 3, 8], { dtype: 'int32' });
      expect(msg(() => ringAttention(q, kv, kv, { cpGroup: cp, cuSeqlens: cu }))).toContain(
        'sample 0 has 3 local tokens, an odd number',
      );
      const q2 = randn([2, 4, 8, 16]);
      const kv2 = randn([2, 2, 8, 16]);
      expect(
        msg(() =>
          ringAttention(q2, kv2, kv2, { cpGroup: cp, cuSeqlens: tensor([0, 8], { dtype: 'int32' }) }),
        ),
      ).toContain('batch must be 1, got 2');
      expect(
        msg(() => ringAttention(q, kv, kv, { cpGroup: cp, cuSeqlens: tensor([0, 4], { dtype: 'int32' }) })),
      ).toContain('cuSeqlens ends at 4 but the sequence has 8 tokens');
      // the boundaries as numbers: the same checks, on the host
      expect(msg(() => ringAttention(q, kv, kv, { cpGroup: cp, cuSeqlens: [0, 3, 8] }))).toContain(
        'sample 0 has 3 local tokens, an odd number',
      );
      expect(msg(() => ringAttention(q2, kv2, kv2, { cpGroup: cp, cuSeqlens: [0, 8] }))).toContain(
        'batch must be 1, got 2',
      );
      expect(msg(() => ringAttention(q, kv, kv, { cpGroup: cp, cuSeqlens: [0, 4] }))).toContain(
        'cuSeqlens ends at 4 but the sequence has 8 tokens',
      );
      expect(msg(() => ringAttention(q, kv, kv, { cpGroup: cp, cuSeqlens: [0, 6, 4, 8] }))).toContain(
        'cuSeqlens must be non-decreasing integers, got 6 then 4 at index 2',
      );
    }));
});
