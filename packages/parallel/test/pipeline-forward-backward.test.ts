// The forward-backward functions in one process. Without pipelining: Megatron's loss scaling
// (1/numMicrobatches, numTokens, the context-parallel factor), gradScaleFunc, noSyncFunc,
// finalizeModelGradsFunc and forwardOnly, against a hand-written accumulation loop. With
// pipelining: every stage of 1F1B and interleaved pipelines (2–4 stages, odd microbatch counts,
// group sizes) runs as an async task of this process over an in-memory pipeline group, and the
// gradients equal the unsplit model's. Also backwardStep, the exchanges' checks, the embedding
// all-reduce helper and the argument errors. Every test frees what it made.
import {
  Generator,
  Linear,
  Module,
  ModuleList,
  memoryStats,
  noGrad,
  randn,
  type Tensor,
  tensor,
  tidy,
  zeros,
} from '@megapatch/tensor';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DistributedError } from '../src/errors.js';
import { allreduceEmbeddingGrads } from '../src/pipeline/embedding-grads.js';
import {
  backwardStep,
  type ForwardBackwardArgs,
  forwardBackwardNoPipelining,
  forwardBackwardPipeliningWithInterleaving,
  forwardBackwardPipeliningWithoutInterleaving,
  getForwardBackwardFunc,
} from '../src/pipeline/forward-backward.js';
import { P2PCommunicator } from '../src/pipeline/p2p-communication.js';
import type { ProcessGroup, ReduceOp, Work } from '../src/process-group.js';
import { SingleProcessGroup } from '../src/single-process-group.js';

const S = 3;
const B = 2;
const H = 4;
const f32 = (v: number[]) => tensor(v, { dtype: 'float32' });
const maxDiff = (a: readonly number[], b: readonly number[]) =>
  a.length === b.length ? Math.max(0, ...a.map((v, i) => Math.abs(v - b[i]))) : Number.POSITIVE_INFINITY;
const vals = (t: Tensor | null): number[] => Array.from(noGrad(() => t!.toTypedArray()) as Float32Array);

let start = 0;
beforeEach(() => {
  start = memoryStats().liveBytes;
});
afterEach(() => {
  expect(memoryStats().liveBytes).toBe(start);
});

/** Layers [first, first + n) of a stack of residual tanh blocks on [S, B, H]. */
class Blocks extends Module {
  readonly layers: ModuleList<Linear>;
  constructor(
    readonly first: number,
    n: number,
  ) {
    super();
    const list = Array.from(
      { length: n },
      (_, j) => new Linear(H, H, { generator: new Generator(50 + first + j) }),
    );
    this.layers = this.registerModule('layers', new ModuleList(list));
  }
  forward(x: Tensor): Tensor {
    let h = x;
    for (const l of this.layers) h = h.add(l.forward(h).tanh());
    return h;
  }
  grads(): Record<string, number[]> {
    const out: Record<string, number[]> = {};
    let j = this.first;
    for (const l of this.layers) {
      out[`${j}.weight`] = vals(l.weight.grad);
      out[`${j}.bias`] = vals(l.bias!.grad);
      j++;
    }
    return out;
  }
}

interface Mb {
  x: Tensor;
  y: Tensor;
}
const makeData = (m: number): Mb[] => {
  const g = new Generator(9);
  return Array.from({ length: m }, () => ({
    x: randn([S, B, H], { generator: g }),
    y: randn([S, B, H], { generator: g }),
  }));
};
const freeData = (d: Mb[]) => {
  for (const mb of d) {
    mb.x.dispose();
    mb.y.dispose();
  }
};

/** The forward step of every test: the first stage reads x, the last compares with y. */
function forwardStep(it: Iterator<Mb> | null, model: Blocks, ctx: { inputTensor: Tensor | null }) {
  const mb = it!.next().value as Mb;
  const out = model.forward(ctx.inputTensor ?? mb.x);
  const lossFunc = (o: Tensor) => {
    const l = o.sub(mb.y).square().mean();
    return [l, l.item()] as const;
  };
  return [out, lossFunc] as const;
}

/** Pipeline groups of one process: sends are copied into FIFO mailboxes per (source, destination, tag). */
class Hub {
  private readonly boxes = new Map<string, { msgs: Tensor[]; waiting: { t: Tensor; done: () => void }[] }>();
  private box(src: number, dst: number, tag: number) {
    const k = `${src}>${dst}:${tag}`;
    if (!this.boxes.has(k)) this.boxes.set(k, { msgs: [], waiting: [] });
    return this.boxes.get(k)!;
  }
  private static deliver(dst: Tensor, msg: Tensor): void {
    noGrad(() => dst.copy_(msg));
    msg.dispose();
  }
  send(t: Tensor, src: number, dst: number, tag: number): void {
    const b = this.box(src, dst, tag);
    const msg = noGrad(() => t.clone());
    const w = b.waiting.shift();
    if (w) {
      Hub.deliver(w.t, msg);
      w.done();
    } else b.msgs.push(msg);
  }
  recv(t: Tensor, src: number, dst: number, tag: number): Promise<void> {
    const b = this.box(src, dst, tag);
    const msg = b.msgs.shift();
    if (msg) {
      Hub.deliver(t, msg);
      return Promise.resolve();
    }
    return new Promise((done) => b.waiting.push({ t, done }));
  }
  /** Nothing left in flight. */
  idle(): boolean {
    return [...this.boxes.values()].every((b) => b.msgs.length === 0 && b.waiting.length === 0);
  }
}

const workOf = (p: Promise<void>): Work => {
  let done = false;
  void p.then(() => {
    done = true;
  });
  return {
    wait: () => p,
    waitSync: () => {
      throw new Error('MemoryGroup: waitSync would block the only thread');
    },
    isCompleted: () => done,
  };
};

class MemoryGroup implements ProcessGroup {
  readonly backend = 'memory';
  readonly name = 'pp';
  readonly ranks: readonly number[];
  readonly timeoutMs = 1000;
  readonly allReduced: Tensor[] = [];
  constructor(
    private readonly hub: Hub,
    readonly rank: number,
    readonly size: number,
  ) {
    this.ranks = Array.from({ length: size }, (_, i) => i);
  }
  send(t: Tensor, dst: number, tag = 0): Work {
    this.hub.send(t, this.rank, dst, tag);
    return workOf(Promise.resolve());
  }
  recv(t: Tensor, src: number, tag = 0): Work {
    return workOf(this.hub.recv(t, src, this.rank, tag));
  }
  allReduce(t: Tensor, _op?: ReduceOp): Work {
    this.allReduced.push(t);
    return { wait: () => Promise.resolve(), waitSync: () => {}, isCompleted: () => true };
  }
  private unused(): never {
    throw new Error('MemoryGroup: not used by these tests');
  }
  allGather(): Work {
    return this.unused();
  }
  allGatherIntoTensor(): Work {
    return this.unused();
  }
  reduceScatter(): Work {
    return this.unused();
  }
  reduceScatterTensor(): Work {
    return this.unused();
  }
  broadcast(): Work {
    return this.unused();
  }
  allToAll(): Work {
    return this.unused();
  }
  barrier(): Work {
    return this.unused();
  }
  destroy(): void {}
}

const base = { seqLength: S, microBatchSize: B, hiddenSize: H };

describe('getForwardBackwardFunc', () => {
  it('picks Megatron’s function for the layout', () => {
    expect(getForwardBackwardFunc(1)).toBe(forwardBackwardNoPipelining);
    expect(getForwardBackwardFunc(4)).toBe(forwardBackwardPipeliningWithoutInterleaving);
    expect(getForwardBackwardFunc(4, null)).toBe(forwardBackwardPipeliningWithoutInterleaving);
    expect(getForwardBackwardFunc(4, 2)).toBe(forwardBackwardPipeliningWithInterleaving);
    // without a parallel state: one stage
    expect(getForwardBackwardFunc()).toBe(forwardBackwardNoPipelining);
  });
});

describe('forwardBackwardNoPipelining', () => {
  it('accumulates loss / numMicrobatches over the microbatches, as a hand-written loop', async () => {
    const data = makeData(3);
    const model = new Blocks(0, 2);
    const ref = new Blocks(0, 2);
    const reduced = await forwardBackwardNoPipelining({
      ...base,
      forwardStepFunc: forwardStep,
      dataIterator: data[Symbol.iterator](),
      model,
      numMicrobatches: 3,
    });
    const losses = data.map(({ x, y }) =>
      tidy(() => {
        const l = ref.forward(x).sub(y).square().mean();
        l.div(3).backward();
        return l.item();
      }),
    );
    expect(reduced).toEqual(losses);
    expect(model.grads()).toEqual(ref.grads());
    model.dispose();
    ref.dispose();
    freeData(data);
  });

  it('numTokens losses, calculatePerTokenLoss, the context-parallel factor, gradScaleFunc, noSync and finalize', async () => {
    const data = makeData(4);
    const run = async (args: Partial<ForwardBackwardArgs<Blocks, Mb, number>>, threeTuple: boolean) => {
      const model = new Blocks(0, 1);
      const calls = { noSync: 0, finalize: [] as (number | null)[] };
      await forwardBackwardNoPipelining<Blocks, Mb, number>({
        ...base,
        forwardStepFunc: (it, m) => {
          const mb = it!.next().value as Mb;
          const out = m.forward(mb.x);
          return [
            out,
            (o: Tensor) => {
              const l = o.sub(mb.y).square().sum();
              return threeTuple ? ([l, 5, 0] as const) : ([l, 0] as const);
            },
          ];
        },
        dataIterator: data[Symbol.iterator](),
        model,
        numMicrobatches: 4,
        noSyncFunc: (fn) => {
          calls.noSync++;
          return fn();
        },
        finalizeModelGradsFunc: (models, numTokens) => {
          expect(models).toEqual([model]);
          calls.finalize.push(numTokens);
        },
        ...args,
      });
      const g = vals(model.layers.get(0).weight.grad);
      model.dispose();
      return { g, calls };
    };
    const plain = await run({}, false);
    expect(plain.calls).toEqual({ noSync: 3, finalize: [null] });
    const close = (a: number[], b: number[], f: number) =>
      expect(
        maxDiff(
          a,
          b.map((v) => v * f),
        ),
      ).toBeLessThan(1e-5);
    // [loss, numTokens, reduced]: divided by numTokens too
    close((await run({}, true)).g, plain.g, 1 / 5);
    // calculatePerTokenLoss: not divided at all, and finalize gets the token count
    const perToken = await run({ calculatePerTokenLoss: true }, true);
    close(perToken.g, plain.g, 4);
    expect(perToken.calls.finalize).toEqual([20]);
    close((await run({ contextParallelSize: 3 }, false)).g, plain.g, 3);
    close((await run({ gradScaleFunc: (l) => l.mul(8) }, false)).g, plain.g, 8);
    freeData(data);
  });

  it('forwardOnly runs no backward and no finalize', async () => {
    const data = makeData(2);
    const model = new Blocks(0, 1);
    let finalized = false;
    const reduced = await forwardBackwardNoPipelining({
      ...base,
      forwardStepFunc: forwardStep,
      dataIterator: data[Symbol.iterator](),
      model: [model],
      numMicrobatches: 2,
      forwardOnly: true,
      finalizeModelGradsFunc: () => {
        finalized = true;
      },
    });
    expect(reduced.length).toBe(2);
    expect(model.layers.get(0).weight.grad).toBeNull();
    expect(finalized).toBe(false);
    model.dispose();
    freeData(data);
  });
});

describe('pipelines of in-memory stages', () => {
  const layouts: { pp: number; vpp: number | null; m: number; g?: number }[] = [
    { pp: 2, vpp: null, m: 1 },
    { pp: 2, vpp: null, m: 5 },
    { pp: 3, vpp: null, m: 2 },
    { pp: 4, vpp: null, m: 7 },
    { pp: 2, vpp: 2, m: 4 },
    { pp: 2, vpp: 3, m: 2 },
    { pp: 2, vpp: 2, m: 5, g: 3 },
    { pp: 3, vpp: 2, m: 6 },
    { pp: 3, vpp: 2, m: 7, g: 4 },
    { pp: 4, vpp: 2, m: 4 },
    { pp: 2, vpp: 1, m: 3, g: 3 },
  ];
  for (const { pp, vpp, m, g } of layouts) {
    const name = `pp ${pp}${vpp === null ? '' : ` vpp ${vpp}`}, ${m} microbatches${g ? `, group size ${g}` : ''}`;
    it(`${name}: every stage's gradients equal the unsplit model's, and nothing stays in flight`, async () => {
      const chunks = vpp ?? 1;
      const data = makeData(m);
      const hub = new Hub();
      const ranks = Array.from({ length: pp }, (_, rank) => ({
        group: new MemoryGroup(hub, rank, pp),
        models: Array.from({ length: chunks }, (_, k) => new Blocks(k * pp + rank, 1)),
      }));
      const fb = getForwardBackwardFunc(pp, vpp);
      const run = (forwardOnly: boolean) =>
        Promise.all(
          ranks.map(({ group, models }) =>
            fb<Blocks, Mb, number>({
              ...base,
              forwardStepFunc: forwardStep,
              dataIterator:
                vpp === null ? data[Symbol.iterator]() : models.map(() => data[Symbol.iterator]()),
              model: vpp === null ? models[0] : models,
              numMicrobatches: m,
              microbatchGroupSizePerVpStage: g,
              ppGroup: group,
              forwardOnly,
            }),
          ),
        );
      const reduced = await run(false);
      const evalReduced = await run(true);
      expect(hub.idle()).toBe(true);

      const ref = new Blocks(0, pp * chunks);
      const refReduced = await forwardBackwardNoPipelining({
        ...base,
        forwardStepFunc: forwardStep,
        dataIterator: data[Symbol.iterator](),
        model: ref,
        numMicrobatches: m,
      });
      const expected = ref.grads();
      const got = Object.assign({}, ...ranks.flatMap((r) => r.models.map((mod) => mod.grads())));
      expect(Object.keys(got).sort()).toEqual(Object.keys(expected).sort());
      for (const [k, v] of Object.entries(expected)) expect(maxDiff(got[k], v)).toBeLessThan(1e-6);
      // the last stage reports each microbatch's loss, training and forward-only alike
      expect(reduced[pp - 1].length).toBe(m);
      expect(maxDiff(reduced[pp - 1], refReduced)).toBeLessThan(1e-6);
      expect(maxDiff(evalReduced[pp - 1], refReduced)).toBeLessThan(1e-6);
      expect(reduced.slice(0, -1).every((r) => r.length === 0)).toBe(true);
      ref.dispose();
      for (const r of ranks) for (const mod of r.models) mod.dispose();
      freeData(data);
    });
  }
});

describe('backwardStep', () => {
  it('backpropagates from the loss or from a given gradient and hands back the input’s gradient', () => {
    const w = f32([2, 3]).requiresGrad_();
    const input = f32([1, 1]).requiresGrad_();
    const out = tidy(() => input.mul(w));
    const outGrad = f32([1, 10]);
    const g = backwardStep(input, out, outGrad);
    expect(vals(g)).toEqual([2, 30]);
    expect(vals(w.grad)).toEqual([1, 10]);
    expect(input.grad).toBeNull();
    // an input the stage never used gets a zero gradient (the previous stage waits for one)
    const unused = zeros([2]).requiresGrad_();
    const loss = tidy(() => w.sum());
    const z = backwardStep(unused, loss, null, (l) => l.mul(2));
    expect(vals(z)).toEqual([0, 0]);
    expect(vals(w.grad)).toEqual([3, 12]);
    for (const t of [w, input, out, outGrad, g!, unused, loss, z!]) t.dispose();
  });
});

describe('P2PCommunicator', () => {
  it('refuses a tensor of the wrong shape or dtype with the shape it expects', () => {
    const comm = new P2PCommunicator({ ppGroup: new MemoryGroup(new Hub(), 0, 2), tensorShape: [S, B, H] });
    const bad = zeros([S, B, H + 1]);
    expect(() => comm.sendForward(bad)).toThrow(
      /the activation sent to the next stage on pipeline stage 0 is \[3,2,5\] float32 but stages exchange \[3, 2, 4\] float32/,
    );
    bad.dispose();
    expect(comm.nextRank).toBe(1);
    expect(comm.prevRank).toBe(1);
    expect(comm.isPpFirstStage && !comm.isPpLastStage).toBe(true);
    expect(() => new P2PCommunicator({ ppGroup: new SingleProcessGroup(), tensorShape: [S, 0, H] })).toThrow(
      /tensorShape \[3, 0, 4\] must hold positive integers/,
    );
  });

  it('the first stage receives nothing forward and the last nothing backward', async () => {
    const hub = new Hub();
    const first = new P2PCommunicator({ ppGroup: new MemoryGroup(hub, 0, 2), tensorShape: [2] });
    const last = new P2PCommunicator({ ppGroup: new MemoryGroup(hub, 1, 2), tensorShape: [2] });
    expect(await first.recvForward()).toBeNull();
    expect(await last.recvBackward()).toBeNull();
    const a = f32([1, 2]);
    const b = f32([3, 4]);
    // both send before they receive: neither waits on the other
    const [fromFirst, fromLast] = await Promise.all([
      first.sendForwardRecvBackward(a),
      last.sendBackwardRecvForward(b),
    ]);
    expect(vals(fromFirst)).toEqual([3, 4]);
    expect(vals(fromLast)).toEqual([1, 2]);
    await Promise.all([first.waitForSends(), last.waitForSends()]);
    for (const t of [a, b, fromFirst!, fromLast!]) t.dispose();
  });
});

describe('allreduceEmbeddingGrads', () => {
  it('sums .mainGrad where set, else .grad, over the embedding group; a no-op off a group of one', () => {
    const group = new MemoryGroup(new Hub(), 0, 2);
    const a = zeros([2]).requiresGrad_();
    const b = zeros([2]).requiresGrad_();
    a.grad = f32([1, 2]);
    b.mainGrad = f32([3, 4]);
    allreduceEmbeddingGrads([a, null, b], group);
    expect(group.allReduced.length).toBe(2);
    expect(group.allReduced[0]).toBe(a.grad);
    expect(group.allReduced[1]).toBe(b.mainGrad);
    const single = new MemoryGroup(new Hub(), 0, 1);
    allreduceEmbeddingGrads(a, single);
    allreduceEmbeddingGrads(a, null);
    // no parallel state: no embedding group
    allreduceEmbeddingGrads(a);
    expect(single.allReduced).toEqual([]);
    b.mainGrad.dispose();
    a.dispose();
    b.dispose();
  });
});

describe('argument errors', () => {
  const data = () => [][Symbol.iterator]() as Iterator<Mb>;
  const expectError = async (p: Promise<unknown>, code: string, pattern: RegExp) => {
    const e = await p.then(
      () => null,
      (err) => err,
    );
    expect(e).toBeInstanceOf(DistributedError);
    expect(e.code).toBe(code);
    expect(e.message).toMatch(pattern);
  };

  it('names the function and says what to pass', async () => {
    const model = new Blocks(0, 1);
    const args = { ...base, forwardStepFunc: forwardStep, dataIterator: data(), model, numMicrobatches: 2 };
    await expectError(
      forwardBackwardPipeliningWithInterleaving(args),
      'INVALID_ARGUMENT',
      /^forwardBackwardPipeliningWithInterleaving: the interleaved schedule expects `model` to be the list/,
    );
    await expectError(
      forwardBackwardPipeliningWithoutInterleaving({ ...args, model: [model, model] }),
      'INVALID_ARGUMENT',
      /the non-interleaved pipeline schedule does not support model chunking \(got 2 chunks/,
    );
    await expectError(
      forwardBackwardPipeliningWithoutInterleaving(args),
      'NOT_INITIALIZED',
      /no pipeline group; pass ppGroup or call initializeModelParallel\(\) first/,
    );
    const ppGroup = new MemoryGroup(new Hub(), 0, 2);
    await expectError(
      forwardBackwardPipeliningWithInterleaving({
        ...args,
        model: [model],
        dataIterator: [data()],
        ppGroup,
        numMicrobatches: 3,
      }),
      'INVALID_ARGUMENT',
      /^forwardBackwardPipeliningWithInterleaving: numMicrobatches 3 leaves a last group of 1/,
    );
    await expectError(
      forwardBackwardPipeliningWithoutInterleaving({
        ...args,
        ppGroup,
        seqLength: 5,
        contextParallelSize: 2,
      }),
      'INVALID_ARGUMENT',
      /seqLength 5 is not divisible by contextParallelSize 2; pad the sequences/,
    );
    model.dispose();
  });

  it('a last stage without a loss function, and a stage output of the wrong shape', async () => {
    const model = new Blocks(0, 1);
    const d = makeData(1);
    await expectError(
      forwardBackwardNoPipelining({
        ...base,
        forwardStepFunc: (it, m: Blocks) => [m.forward((it!.next().value as Mb).x), null],
        dataIterator: d[Symbol.iterator](),
        model,
        numMicrobatches: 1,
      }),
      'INVALID_ARGUMENT',
      /forwardStepFunc returned no loss function on the last stage \(microbatch 0\)/,
    );
    await expectError(
      forwardBackwardPipeliningWithoutInterleaving({
        ...base,
        hiddenSize: H + 1,
        forwardStepFunc: forwardStep,
        dataIterator: d[Symbol.iterator](),
        model,
        numMicrobatches: 1,
        ppGroup: new MemoryGroup(new Hub(), 0, 2),
      }),
      'INVALID_ARGUMENT',
      /is \[3,2,4\] float32 but stages exchange \[3, 2, 5\] float32 .* fix seqLength \/ microBatchSize \/ hiddenSize/,
    );
    model.dispose();
    freeData(d);
  });
});
