// The detail checks' agreement and messages, with the ranks simulated in one process: every rank
// runs agreeOnCall in lockstep against an exchange that combines what all ranks passed.
import { zeros } from '@megapatch/tensor';
import { afterEach, describe, expect, it } from 'vitest';
import {
  agreeOnCall,
  type CollectiveCall,
  collectiveChecksFromEnv,
  compareTransfer,
  type GroupShape,
} from '../src/collective-checks.js';
import { DistributedError } from '../src/errors.js';

class Pause extends Error {}

/**
 * Runs agreeOnCall for every rank of a group of `calls.length` ranks. Round k of the exchange is
 * played by running every rank again from the start: rounds before k replay their combined
 * results, round k records each rank's input and stops. Returns each rank's error (or null).
 */
function simulate(calls: CollectiveCall[], ranks = calls.map((_, r) => r), name = 'tp'): (Error | null)[] {
  const size = calls.length;
  const rounds: { kind: 'max' | 'gather'; result: Float64Array | Uint8Array[] }[] = [];
  for (;;) {
    const inputs: (Float64Array | Uint8Array)[] = [];
    let kind: 'max' | 'gather' | null = null;
    const outcome = calls.map((c, rank): Error | null | 'paused' => {
      let round = 0;
      const step = (k: 'max' | 'gather', input: Float64Array | Uint8Array) => {
        if (round < rounds.length) return rounds[round++].result;
        kind = k;
        inputs[rank] = input;
        throw new Pause();
      };
      const g: GroupShape = { name, rank, size, ranks };
      try {
        agreeOnCall(g, c, {
          max: (v) => step('max', v) as Float64Array,
          gather: (b) => step('gather', b) as Uint8Array[],
        });
        return null;
      } catch (e) {
        return e instanceof Pause ? 'paused' : (e as Error);
      }
    });
    if (!outcome.includes('paused')) return outcome as (Error | null)[];
    expect(outcome.every((o) => o === 'paused')).toBe(true);
    if (kind === 'max') {
      const all = inputs as Float64Array[];
      rounds.push({ kind, result: all[0].map((_, k) => Math.max(...all.map((a) => a[k]))) });
    } else {
      rounds.push({ kind: 'gather', result: inputs as Uint8Array[] });
    }
  }
}

const allReduce = (device: string, count: number, extra: Partial<CollectiveCall> = {}): CollectiveCall => ({
  op: 'allReduce',
  kind: 'allReduce',
  device,
  nccl: device.startsWith('cuda'),
  dtype: 'float32',
  count,
  reduce: 'sum',
  ...extra,
});

function messages(errors: (Error | null)[]): string[] {
  for (const e of errors) {
    expect(e).toBeInstanceOf(DistributedError);
    expect((e as DistributedError).code).toBe('MISMATCH');
  }
  return errors.map((e) => (e as Error).message);
}

describe('detail checks: agreement on a collective', () => {
  it('ranks that agree pass, also on different devices of the same kind', () => {
    expect(simulate([allReduce('cuda:0', 8), allReduce('cuda:1', 8), allReduce('cuda:2', 8)])).toEqual([
      null,
      null,
      null,
    ]);
  });

  it('a group of one exchanges nothing', () => {
    const g: GroupShape = { name: 'solo', rank: 0, size: 1, ranks: [3] };
    const never = () => {
      throw new Error('exchanged');
    };
    expect(() => agreeOnCall(g, allReduce('cuda:0', 1), { max: never, gather: never })).not.toThrow();
  });

  it('a size mismatch names what differs and every rank, with global ranks in a subgroup', () => {
    const msgs = messages(simulate([allReduce('cuda:0', 10), allReduce('cuda:1', 12)], [4, 5]));
    expect(msgs[0]).toBe(
      "allReduce on group 'tp': ranks differ in the element count: rank 0 (global 4): allReduce of 10 x float32, op sum; rank 1 (global 5): allReduce of 12 x float32, op sum",
    );
    expect(msgs[1]).toBe(msgs[0]);
  });

  it('several differences are all named', () => {
    const [m] = messages(
      simulate([allReduce('cuda:0', 10), allReduce('cuda:1', 12, { dtype: 'bfloat16', reduce: 'max' })]),
    );
    expect(m).toContain('ranks differ in the dtype, the element count and the reduction: ');
    expect(m).toContain('rank 1: allReduce of 12 x bfloat16, op max');
  });

  it('a cuda tensor on one rank and a cpu tensor on another: the path message', () => {
    const msgs = messages(simulate([allReduce('cuda:0', 4), allReduce('cpu', 4), allReduce('cuda:2', 4)]));
    expect(msgs).toEqual(
      Array(3).fill(
        "allReduce on group 'tp': rank 0 passed a cuda tensor (NCCL), rank 1 a cpu tensor (Gloo), rank 2 a cuda tensor (NCCL); put the tensors on the same kind of device on every rank",
      ),
    );
  });

  it('the same device on a rank without NCCL points at the library, and different ops are named', () => {
    const gathered: CollectiveCall = {
      op: 'allGatherIntoTensor',
      kind: 'allGather',
      device: 'cuda:1',
      nccl: false,
      dtype: 'float32',
      count: 4,
    };
    const [m] = messages(
      simulate([{ ...gathered, op: 'allGather', device: 'cuda:0', nccl: true }, gathered]),
    );
    expect(m).toBe(
      "allGather on group 'tp': rank 0 passed a cuda tensor to allGather (NCCL), rank 1 a cuda tensor to allGatherIntoTensor (Gloo); the ranks on Gloo move them through host copies: give every rank the device library (NCCL), or set MEGAPATCH_DEVICE_COLLECTIVES alike on every rank",
    );
  });

  it('different collectives are listed with their paths', () => {
    const msgs = messages(
      simulate([allReduce('cuda:0', 4), { op: 'barrier', kind: 'barrier', device: '', nccl: false }]),
    );
    expect(msgs[0]).toBe(
      "allReduce on group 'tp': ranks called different collectives: rank 0: allReduce of 4 x float32, op sum on cuda:0 (NCCL); rank 1: barrier",
    );
    expect(msgs[1]).toBe(msgs[0].replace(/^allReduce/, 'barrier'));
  });

  it('a root mismatch on broadcast', () => {
    const b = (root: number): CollectiveCall => ({
      op: 'broadcast',
      kind: 'broadcast',
      device: 'cuda:0',
      nccl: true,
      dtype: 'int64',
      count: 3,
      root,
    });
    expect(messages(simulate([b(0), b(1)]))[0]).toBe(
      "broadcast on group 'tp': ranks differ in the root: rank 0: broadcast of 3 x int64, root 0; rank 1: broadcast of 3 x int64, root 1",
    );
  });

  it('all-to-all split sizes on NCCL are checked against the peers', () => {
    const a2a = (ins: number[], outs: number[]): CollectiveCall => ({
      op: 'allToAll',
      kind: 'allToAll',
      device: 'cuda:0',
      nccl: true,
      dtype: 'float32',
      count: 2,
      splits: { ins, outs },
    });
    expect(simulate([a2a([1, 2], [1, 3]), a2a([3, 1], [2, 1])])).toEqual([null, null]);
    expect(messages(simulate([a2a([1, 2], [1, 3]), a2a([2, 1], [2, 1])]))[0]).toBe(
      "allToAll on group 'tp': rank 1 sends 2 rows to rank 0, whose outputSplitSizes[1] is 3",
    );
  });
});

describe('detail checks: the two sides of a transfer', () => {
  const g: GroupShape = { name: 'pp', rank: 1, size: 4, ranks: [0, 2, 4, 6] };

  it('matching sides pass', () => {
    const t = zeros([5]);
    expect(() => compareTransfer(g, 'send', 'send', 2, t, Float64Array.of(0, 5))).not.toThrow();
  });

  it('the sender and the receiver report the same line', () => {
    const send = () => compareTransfer(g, 'send', 'send', 2, zeros([5]), Float64Array.of(0, 4));
    expect(send).toThrow(
      "send on group 'pp': rank 1 (global 2) sends 5 x float32 to rank 2 (global 4), which receives 4 x float32 from it; both sides of a transfer need the same element count and dtype",
    );
    const recv = () =>
      compareTransfer(
        g,
        'batchIsendIrecv',
        'recv',
        0,
        zeros([4], { dtype: 'bfloat16' }),
        Float64Array.of(0, 4),
      );
    expect(recv).toThrow(
      "batchIsendIrecv on group 'pp': rank 0 sends 4 x float32 to rank 1 (global 2), which receives 4 x bfloat16 from it",
    );
  });
});

describe('MEGAPATCH_DIST_CHECKS', () => {
  const saved = process.env.MEGAPATCH_DIST_CHECKS;
  afterEach(() => {
    if (saved === undefined) delete process.env.MEGAPATCH_DIST_CHECKS;
    else process.env.MEGAPATCH_DIST_CHECKS = saved;
  });
  const read = (v: string | undefined) => {
    if (v === undefined) delete process.env.MEGAPATCH_DIST_CHECKS;
    else process.env.MEGAPATCH_DIST_CHECKS = v;
    return collectiveChecksFromEnv();
  };

  it('is on by default, off with 0, detail with detail', () => {
    expect(read(undefined)).toBe(true);
    expect(read('1')).toBe(true);
    expect(read('0')).toBe(false);
    expect(read('detail')).toBe('detail');
    expect(read('DETAIL')).toBe('detail');
  });

  it('anything else is an error naming the values it takes', () => {
    expect(() => read('yes')).toThrow(/^MEGAPATCH_DIST_CHECKS=yes must be 0 .*, 1 .* or detail/);
  });
});
