// The model zoo on other backends: with the default device set to the pure-TypeScript reference
// backend of @megapatch/tensor (ref:0), or to the CUDA backend's kernels run by its CPU emulator
// (cudaemu:0, from @megapatch/cuda/emulator), every fixture model loads its weights there, and its
// loss (with MTP) and gradients equal the CPU run's. Nothing in the models names a device.
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  AdamW,
  fromTypedArray,
  getBackend,
  getDefaultDevice,
  pendingChecks,
  setDefaultDevice,
  synchronize,
  type Tensor,
  tidy,
} from '@megapatch/tensor';
import { registerReferenceBackend } from '@megapatch/tensor/reference';
import { afterEach, describe, expect, it } from 'vitest';
import { sampleOnDevice } from '../src/generate.js';
import { leftPaddedPositionsOnDevice, packedPositionsOnDevice } from '../src/gpt-model.js';
import { type GPTModel, generate, loadModel, sampleToken, samplingRng } from '../src/index.js';
import { fixtureCheckpoint } from './helpers/fixtures.js';
import { recordReads } from './helpers/reads.js';

registerReferenceBackend();
afterEach(() => setDefaultDevice('cpu'));

/** Why the CUDA emulator could not be registered (its addon is built with @megapatch/cuda), or null. */
let emulator: string | null = null;
try {
  await import('@megapatch/cuda/emulator');
} catch (e) {
  emulator = (e as Error).message.split('\n')[0];
}

const IDS = [1, 5, 9, 33, 100, 7, 8, 9, 4, 77, 12, 3];

/** generate() with the llama fixture on cudaemu:0: each row's tokens, and what it read back (checks aside). */
function generateOnEmulator(prompts: number[][], opts: Parameters<typeof generate>[2]) {
  setDefaultDevice('cudaemu:0');
  const { model } = loadModel(fixtureCheckpoint('llama'));
  try {
    const reads: string[] = [];
    const stop = recordReads(getBackend('cudaemu:0'), (t) => {
      if (t.dtype !== 'float64') reads.push(`${t.dtype}[${t.shape}]`);
    });
    try {
      return { tokens: generate(model, prompts, opts).rows.map((r) => r.tokens), reads };
    } finally {
      stop();
    }
  } finally {
    model.dispose();
  }
}

/**
 * Loss, gradients and the loss after one AdamW step, on the default device; with `dropout`, hidden
 * and attention dropout 0.2 keyed alike on every device (Philox draws the same stream everywhere).
 */
function run(id: string, dropout = false) {
  const { model } = loadModel(
    fixtureCheckpoint(id),
    dropout ? { hiddenDropout: 0.2, attentionDropout: 0.2 } : {},
  );
  try {
    const ids = fromTypedArray(BigInt64Array.from(IDS, BigInt), [2, 6]);
    const labels = fromTypedArray(BigInt64Array.from([...IDS.slice(1), 2], BigInt), [2, 6]);
    const keys = dropout ? { dropout: { seed: 5, rowIds: [10, 11] } } : {};
    const objective = () => {
      const out = model.forward(ids, { labels, ...keys });
      let l = (out.loss as Tensor).mean();
      for (const m of out.mtpLosses) l = l.add(m.mul(0.1));
      return l;
    };
    const l = objective();
    l.backward();
    const grads = model
      .namedParameters()
      .map(([n, p]) => [n, Float32Array.from((p.grad as Tensor).toTypedArray() as Float32Array)] as const);
    new AdamW(model.parameters(), { lr: 1e-2 }).step();
    return {
      loss: l.item(),
      after: objective().item(),
      grads,
      devices: [...new Set(model.parameters().map((p) => p.device))],
    };
  } finally {
    model.dispose();
  }
}

const FAMILIES = [
  'llama',
  'llama-tied',
  'mistral',
  'qwen2',
  'qwen3',
  'mixtral',
  'qwen2-moe',
  'qwen3-moe',
  'deepseek-v2',
  'deepseek-v3',
  'moonlight',
  'phi3',
  'phi3-longrope',
  'phi4-mini',
];

describe.each([
  ['ref:0', 'the reference backend', null],
  ['cudaemu:0', 'the CUDA kernels (emulated)', emulator],
])('%s', (device, what, unavailable) => {
  // on a machine without the emulator's addon: one skipped line that says why
  if (unavailable !== null) it.skip(`${device}: ${unavailable}`, () => {});
  it.runIf(unavailable === null).each([
    ...FAMILIES.map((id) => [id, false] as const),
    // the masks and the attention's composition with its dropout run there too
    ['llama', true] as const,
    ['deepseek-v3', true] as const,
  ])(`%s (dropout: %s) on ${what} gives the CPU loss, gradients and AdamW step`, (id, dropout) => {
    const cpu = run(id, dropout);
    setDefaultDevice(device);
    expect(getDefaultDevice()).toBe(device);
    const other = run(id, dropout);
    expect(other.devices).toEqual([device]);
    expect(Math.abs(other.loss - cpu.loss) / cpu.loss).toBeLessThan(1e-5);
    expect(Math.abs(other.after - cpu.after) / cpu.after).toBeLessThan(1e-4);
    for (const [i, [name, g]] of cpu.grads.entries()) {
      const h = other.grads[i][1];
      let diff = 0;
      let scale = 1e-6;
      for (let j = 0; j < g.length; j++) {
        diff = Math.max(diff, Math.abs(g[j] - h[j]));
        scale = Math.max(scale, Math.abs(g[j]));
      }
      expect(diff / scale, name).toBeLessThan(1e-4);
    }
  });
});

describe('position ids shared by every row', () => {
  it('[1, s] gives the logits of the same positions repeated [b, s], and of the default positions', () => {
    const { model } = loadModel(fixtureCheckpoint('llama'));
    try {
      const tokens = fromTypedArray(BigInt64Array.from(IDS, BigInt), [2, 6]);
      const row = [0, 1, 2, 3, 4, 5];
      const logits = (pos?: Tensor) => {
        const out = model.forward(tokens, pos ? { positionIds: pos } : {});
        return Array.from((out.logits as Tensor).toTypedArray() as Float32Array);
      };
      const shared = logits(fromTypedArray(BigInt64Array.from(row, BigInt), [1, 6]));
      expect(shared).toEqual(logits(fromTypedArray(BigInt64Array.from([...row, ...row], BigInt), [2, 6])));
      expect(shared).toEqual(logits());
      expect(() =>
        model.forward(tokens, { positionIds: fromTypedArray(BigInt64Array.from(row, BigInt), [6]) }),
      ).toThrow('position ids must be [2, 6] (or [1, 6]: the same for every row), got [6]');
    } finally {
      model.dispose();
    }
  });
});

// On an asynchronous device the forward waits for nothing: the token id and position checks are
// queued with the ops' own (and fail at the device's next read), and the rotary rows are gathered
// from a table made once per device, instead of reading the ids back to compute them on the host.
describe.runIf(emulator === null)('a forward on cudaemu:0 does not read the device', () => {
  const ids = (v: number[]) => fromTypedArray(BigInt64Array.from(v, BigInt), [2, 6], { device: 'cudaemu:0' });

  it('queues its checks, and gives the loss the CPU gives', () => {
    const { model: cpuModel } = loadModel(fixtureCheckpoint('llama'));
    const positions = [0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2];
    let cpuLoss: number;
    try {
      const out = cpuModel.forward(fromTypedArray(BigInt64Array.from(IDS, BigInt), [2, 6]), {
        labels: fromTypedArray(BigInt64Array.from([...IDS.slice(1), 2], BigInt), [2, 6]),
        positionIds: fromTypedArray(BigInt64Array.from(positions, BigInt), [2, 6]),
      });
      cpuLoss = (out.loss as Tensor).mean().item();
    } finally {
      cpuModel.dispose();
    }
    setDefaultDevice('cudaemu:0');
    const { model } = loadModel(fixtureCheckpoint('llama'));
    try {
      synchronize('cudaemu:0');
      const out = model.forward(ids(IDS), {
        labels: ids([...IDS.slice(1), 2]),
        positionIds: ids(positions),
      });
      // ids, labels and positions: queued, not read (a read would have evaluated the queue)
      expect(pendingChecks('cudaemu:0')).toBeGreaterThanOrEqual(3);
      const loss = (out.loss as Tensor).mean().item();
      expect(pendingChecks('cudaemu:0')).toBe(0);
      expect(Math.abs(loss - cpuLoss) / cpuLoss).toBeLessThan(1e-5);
    } finally {
      model.dispose();
    }
  });

  it("makes a packed row's positions where cuSeqlens lives, as the host loop does", () => {
    const cases: [number[], number, number[]][] = [
      [[0, 5, 12], 12, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]],
      [[0, 5, 5, 12], 12, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]], // an empty sample
      [[0, 0, 3, 4], 6, [0, 1, 2, 0, 0, 0]], // empty first; tokens past the last boundary get 0
      [[0, 1, 2, 3], 3, [0, 0, 0]],
      [[0, 7], 7, [0, 1, 2, 3, 4, 5, 6]],
    ];
    for (const device of ['cpu', 'cudaemu:0']) {
      for (const [cu, s, want] of cases) {
        const got = packedPositionsOnDevice(fromTypedArray(Int32Array.from(cu), [cu.length], { device }), s);
        expect([device, got.shape, Array.from(got.toTypedArray() as BigInt64Array, Number)]).toEqual([
          device,
          [1, s],
          want,
        ]);
        got.dispose();
      }
    }
  });

  it("makes left-padded rows' positions where the attention mask lives, as the host loop does", () => {
    // [mask rows, new tokens s, positions of the last s keys]
    const cases: [number[][], number, number[][]][] = [
      [
        [
          [0, 0, 1, 1, 1],
          [1, 1, 1, 1, 1],
        ],
        5,
        [
          [0, 0, 0, 1, 2],
          [0, 1, 2, 3, 4],
        ],
      ],
      [
        [
          [0, 1, 1, 1],
          [0, 0, 0, 1],
        ],
        1,
        [[2], [0]],
      ], // a decoding step after left-padded prompts
      [[[1, 0, 1, 1]], 3, [[0, 1, 2]]], // a hole: padding gets 0, the next real token counts on
    ];
    for (const device of ['cpu', 'cudaemu:0']) {
      for (const [rows, s, want] of cases) {
        const mask = fromTypedArray(Uint8Array.from(rows.flat()), [rows.length, rows[0].length], { device });
        const got = leftPaddedPositionsOnDevice(mask.to('bool'), s);
        expect([device, got.shape, Array.from(got.toTypedArray() as BigInt64Array, Number)]).toEqual([
          device,
          [rows.length, s],
          want.flat(),
        ]);
        got.dispose();
        mask.dispose();
      }
    }
  });

  it.each([
    [[0, 5, 12]],
    [[0, 5, 5, 12]], // an empty sample
    [[0, 12]],
    [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]],
  ])(
    'a packed forward without position ids (%j) makes them on the device, or from the boundaries given as numbers: no read, the CPU logits',
    (cu) => {
      let asNumbers = false;
      const forward = (model: GPTModel, device: string) =>
        model.forward(fromTypedArray(BigInt64Array.from(IDS, BigInt), [1, 12], { device }), {
          cuSeqlens: asNumbers ? cu : fromTypedArray(Int32Array.from(cu), [cu.length], { device }),
        });
      const { model: cpuModel } = loadModel(fixtureCheckpoint('llama'));
      let want: Float32Array;
      try {
        want = (forward(cpuModel, 'cpu').logits as Tensor).toTypedArray() as Float32Array;
      } finally {
        cpuModel.dispose();
      }
      setDefaultDevice('cudaemu:0');
      const { model } = loadModel(fixtureCheckpoint('llama'));
      try {
        for (const numbers of [false, true]) {
          asNumbers = numbers;
          synchronize('cudaemu:0');
          const reads: string[] = [];
          const stop = recordReads(getBackend('cudaemu:0'), (t) => {
            if (t.dtype !== 'float64') reads.push(`${t.dtype}[${t.shape}]`);
          });
          let out: ReturnType<typeof model.forward>;
          try {
            out = forward(model, 'cudaemu:0');
          } finally {
            stop();
          }
          expect(reads, `numbers ${numbers}`).toEqual([]);
          const got = (out.logits as Tensor).toTypedArray() as Float32Array;
          let diff = 0;
          // (the padded vocabulary's logits are -Infinity on both)
          for (let i = 0; i < want.length; i++)
            if (got[i] !== want[i]) diff = Math.max(diff, Math.abs(got[i] - want[i]));
          expect(diff, `numbers ${numbers}`).toBeLessThan(1e-4);
        }
      } finally {
        model.dispose();
      }
    },
  );

  it.each([
    ['llama', 'nothing'],
    ['deepseek-v3', 'nothing either: not the tokens per expert (MoE), not cuSeqlens for the MTP shifts'],
  ])('a packed %s forward (cuSeqlens and position ids on the device) reads back %s', (id) => {
    const packed = (device: string) => {
      const on = (v: number[], shape: number[]) =>
        fromTypedArray(BigInt64Array.from(v, BigInt), shape, { device });
      return {
        labels: on([...IDS.slice(1), 2], [1, 12]),
        positionIds: on([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [1, 12]),
        cuSeqlens: fromTypedArray(Int32Array.from([0, 5, 12]), [3], { device }),
      };
    };
    const lossOf = (out: ReturnType<GPTModel['forward']>) => {
      let l = (out.loss as Tensor).mean();
      for (const m of out.mtpLosses) l = l.add(m);
      return l.item();
    };
    const { model: cpuModel } = loadModel(fixtureCheckpoint(id));
    let cpuLoss: number;
    try {
      cpuLoss = lossOf(
        cpuModel.forward(fromTypedArray(BigInt64Array.from(IDS, BigInt), [1, 12]), packed('cpu')),
      );
    } finally {
      cpuModel.dispose();
    }
    setDefaultDevice('cudaemu:0');
    const { model } = loadModel(fixtureCheckpoint(id));
    try {
      const x = fromTypedArray(BigInt64Array.from(IDS, BigInt), [1, 12], { device: 'cudaemu:0' });
      const inputs = packed('cudaemu:0');
      synchronize('cudaemu:0');
      const reads: string[] = [];
      const stop = recordReads(x.backend, (t) => {
        if (t.dtype !== 'float64') reads.push(`${t.dtype}[${t.shape}]`);
      });
      let out: ReturnType<typeof model.forward>;
      try {
        out = model.forward(x, inputs);
      } finally {
        stop();
      }
      // every attention layer's cuSeqlens check is queued with the ids' and labels' checks (and a
      // MoE layer's check of its group sizes): the MoE layers' tokens per expert stay on the
      // device as their grouped GEMMs' sizes
      expect(reads).toEqual([]);
      expect(pendingChecks('cudaemu:0')).toBeGreaterThan(model.config.numLayers);
      expect(Math.abs(lossOf(out) - cpuLoss) / cpuLoss).toBeLessThan(1e-5);
    } finally {
      model.dispose();
    }
  });

  it('a MoE forward reads nothing back: not the tokens per expert (the grouped GEMMs take them on the device), the scores, the ids or the MTP targets', () => {
    for (const id of ['mixtral', 'moonlight', 'deepseek-v3']) {
      setDefaultDevice('cudaemu:0');
      const { model } = loadModel(fixtureCheckpoint(id));
      try {
        const x = ids(IDS);
        const reads: string[] = [];
        const stop = recordReads(x.backend, (t) => reads.push(`${t.dtype}[${t.shape}]`));
        let out: ReturnType<typeof model.forward>;
        try {
          out = model.forward(x, { labels: ids([...IDS.slice(1), 2]) });
        } finally {
          stop();
        }
        // the routing map is built on the device and its counts are the grouped GEMMs' sizes
        // there (the emulator's grouped kernel plans the groups where they are), and the MTP
        // targets (DeepSeek-V3's fixture) are shifted there, its MTP block being MoE too: the
        // forward queues its checks and reads nothing
        expect(reads, id).toEqual([]);
        expect(pendingChecks('cudaemu:0'), id).toBeGreaterThan(model.moeLayers().length);
        expect((out.loss as Tensor).mean().item()).toBeGreaterThan(0);
      } finally {
        model.dispose();
      }
    }
  });

  it("a GPU's default grouped mode (a loop of GEMMs) reads a MoE layer's tokens per expert, once a layer: the same loss", () => {
    // the mode is read once a process: the forward again in a child with MEGAPATCH_GROUPED_GEMM=loop,
    // where groupedLinear reads its sizes (int64 [E]) back before the GEMMs use them
    const forward = (env: Record<string, string>) => {
      const here = path.dirname(fileURLToPath(import.meta.url));
      const script = `
        const T = await import('@megapatch/tensor');
        await import('@megapatch/cuda/emulator');
        const { loadModel } = await import(${JSON.stringify(path.join(here, '..', 'src', 'index.ts'))});
        const { fixtureCheckpoint } = await import(${JSON.stringify(path.join(here, 'helpers', 'fixtures.ts'))});
        const { recordReads } = await import(${JSON.stringify(path.join(here, 'helpers', 'reads.ts'))});
        T.setDefaultDevice('cudaemu:0');
        const { model } = loadModel(fixtureCheckpoint('mixtral'));
        const ids = (v) => T.fromTypedArray(BigInt64Array.from(v, BigInt), [1, v.length], { device: 'cudaemu:0' });
        const x = ids(${JSON.stringify(IDS)});
        const labels = ids(${JSON.stringify([...IDS.slice(1), 2])});
        T.synchronize('cudaemu:0');
        const reads = [];
        const stop = recordReads(x.backend, (t) => { if (t.dtype !== 'float64') reads.push(t.dtype + '[' + t.shape + ']'); });
        const out = model.forward(x, { labels });
        stop();
        console.log(JSON.stringify({ reads, loss: out.loss.mean().item(), layers: model.moeLayers().length, E: model.config.moe.numExperts }));
      `;
      const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
        cwd: path.join(here, '..'),
        encoding: 'utf8',
        env: { ...process.env, ...env },
      });
      expect(r.stderr).toBe('');
      return JSON.parse(r.stdout.trim().split('\n').at(-1) ?? '{}');
    };
    const loop = forward({ MEGAPATCH_GROUPED_GEMM: 'loop' });
    const planned = forward({});
    expect(loop.reads).toEqual(Array(loop.layers).fill(`int64[${loop.E}]`));
    expect(planned.reads).toEqual([]);
    expect(loop.loss).toBe(planned.loss);
  });

  it.each(['llama', 'deepseek-v3'])(
    'a %s training step waits for the device at its reads alone: uploads queue',
    async (id) => {
      const { startKernelProfile, stopKernelProfile } = await import('@megapatch/cuda/emulator');
      setDefaultDevice('cudaemu:0');
      const { model } = loadModel(fixtureCheckpoint(id));
      try {
        const opt = new AdamW(model.parameters(), { lr: 1e-2 });
        const step = () => {
          // the batch comes from the host each step, as the trainer's does
          const out = model.forward(ids(IDS), { labels: ids([...IDS.slice(1), 2]) });
          let l = (out.loss as Tensor).mean();
          for (const m of out.mtpLosses) l = l.add(m.mul(0.1));
          l.backward();
          opt.step();
          opt.zeroGrad();
          return l.item();
        };
        step(); // the first step makes the tables and optimizer state
        const backend = getBackend('cudaemu:0');
        const { read, readMany, write, synchronize: sync } = backend;
        const counts = { reads: 0, writes: 0, syncs: 0, batched: 0 };
        backend.read = (t, dst) => {
          counts.reads++;
          read.call(backend, t, dst);
        };
        // the queued checks: read together, one wait each time
        backend.readMany = (ts, dsts) => {
          counts.reads++;
          counts.batched += ts.length;
          readMany?.call(backend, ts, dsts);
        };
        backend.write = (t, src) => {
          counts.writes++;
          write.call(backend, t, src);
        };
        backend.synchronize = () => {
          counts.syncs++;
          sync?.call(backend);
        };
        startKernelProfile('cudaemu:0');
        try {
          step();
        } finally {
          Object.assign(backend, { read, readMany, write, synchronize: sync });
        }
        const p = stopKernelProfile('cudaemu:0');
        // the ids, labels, positions (and a MoE layer's arange and balancing counts) were uploaded
        expect(counts.writes).toBeGreaterThanOrEqual(id === 'llama' ? 3 : 10);
        expect(p.hostWaits).toBe(counts.reads + counts.syncs);
        // and a read takes the checks queued since the last one along, in its one wait: one wait,
        // at the loss (DeepSeek-V3's fixture: 1 for its checks; 5 while each MoE router's counts
        // were read for the grouped GEMMs, 77 before that, 89 when uploads waited too)
        expect(p.hostWaits).toBe(1);
        expect(counts.batched).toBeGreaterThan(id === 'llama' ? 3 : 30);
      } finally {
        model.dispose();
      }
    },
  );

  it('greedy generation on cudaemu:0 picks the CPU tokens and reads back only the ids it chose', () => {
    const prompts = [
      [1, 5, 9, 33],
      [2, 7],
    ];
    const { model: cpuModel } = loadModel(fixtureCheckpoint('llama'));
    let want: number[][];
    try {
      want = generate(cpuModel, prompts, { maxNewTokens: 5 }).rows.map((r) => r.tokens);
    } finally {
      cpuModel.dispose();
    }
    const { tokens, reads } = generateOnEmulator(prompts, { maxNewTokens: 5 });
    expect(tokens).toEqual(want);
    // one [2, 1] of ids a step: not two rows of the vocabulary
    expect(reads).toEqual(Array(5).fill('int64[2,1]'));
  });

  it('top-k sampling takes the k best where the logits are: the tokens of sampling the whole rows, on the CPU and on cudaemu:0, which reads back b·k of them', () => {
    const prompt = [1, 5, 9, 33];
    const opts = { maxNewTokens: 12, temperature: 0.3, topK: 5, seed: 11 };
    const { model: cpuModel } = loadModel(fixtureCheckpoint('llama'));
    let want: number[];
    let cpu: number[];
    try {
      // the rule on the host: every step recomputes the sequence and samples its last row whole
      const rand = samplingRng(opts.seed);
      const seq = [...prompt];
      want = [];
      for (let i = 0; i < opts.maxNewTokens; i++) {
        const row = tidy(() => {
          const logits = cpuModel.forward(fromTypedArray(BigInt64Array.from(seq, BigInt), [1, seq.length]))
            .logits as Tensor;
          const v = cpuModel.config.vocabSize;
          return Float32Array.from(
            (logits.toTypedArray() as Float32Array)
              .subarray((seq.length - 1) * logits.shape[2])
              .subarray(0, v),
          );
        });
        const tok = sampleToken(row, opts, rand);
        want.push(tok);
        seq.push(tok);
      }
      cpu = generate(cpuModel, [prompt], opts).rows[0].tokens;
    } finally {
      cpuModel.dispose();
    }
    expect(cpu).toEqual(want);
    const { tokens, reads } = generateOnEmulator([prompt], opts);
    expect(tokens[0]).toEqual(want);
    expect(reads).toEqual(Array(12).fill(['float32[1,1,5]', 'int64[1,1,5]']).flat());
  });

  it('temperature and top-p sampling draw where the logits are: the CPU tokens, on cudaemu:0, which reads back b ids (top-p: the row sums and the best logits)', () => {
    const prompts = [
      [1, 5, 9, 33],
      [2, 7],
    ];
    const steps = 8;
    // a seed per row too: each row's draws from its own generator, on the device as on the host
    const variants: { topP?: number; seed?: number[] }[] = [
      {},
      { topP: 0.9 },
      { topP: 0.3 },
      { seed: [5, 6] },
      { topP: 0.9, seed: [6, 5] },
    ];
    for (const extra of variants) {
      const opts = { maxNewTokens: steps, temperature: 0.8, seed: 5 as number | number[], ...extra };
      const { model: cpuModel } = loadModel(fixtureCheckpoint('llama'));
      let want: number[][];
      let vocab: number;
      try {
        want = generate(cpuModel, prompts, opts).rows.map((r) => r.tokens);
        vocab = cpuModel.config.vocabSize;
      } finally {
        cpuModel.dispose();
      }
      setDefaultDevice('cudaemu:0');
      const { model } = loadModel(fixtureCheckpoint('llama'));
      const reads: string[] = [];
      const stop = recordReads(getBackend('cudaemu:0'), (t) => reads.push(`${t.dtype}[${t.shape}]`));
      let tokens: number[][];
      try {
        tokens = generate(model, prompts, opts).rows.map((r) => r.tokens);
      } finally {
        stop();
        model.dispose();
      }
      const what = JSON.stringify(extra);
      expect(tokens, what).toEqual(want);
      // never a row of the vocabulary: b drawn ids a step, or with top-p the sums with the m best
      // logits and their ids in one float64 read (m = the vocabulary of this fixture)
      const mine = reads.filter((r) => !r.startsWith('float64') || r.startsWith('float64[2,'));
      expect(mine, what).toEqual(
        Array(steps).fill('topP' in extra ? `float64[2,${2 * vocab + 1}]` : 'int64[2]'),
      );
    }
  });

  it('sampleOnDevice follows sampleToken: inverse CDF in id order, the nucleus grown past 1024 ids, ties, -inf, inactive rows', () => {
    const n = 5000;
    const b = 4;
    const gen = samplingRng(99);
    const rows = Array.from({ length: b }, (_, r) =>
      Float32Array.from({ length: n }, (_, i) => {
        if (r === 1 && i % 7 === 0) return Number.NEGATIVE_INFINITY;
        if (r === 2) return Math.round(gen() * 4) / 2; // many ties
        return (r === 3 ? 0.05 : 3) * (gen() - 0.5); // row 3 nearly flat: its nucleus outgrows 1024
      }),
    );
    const flat = new Float32Array(b * n);
    for (const [r, row] of rows.entries()) flat.set(row, r * n);
    for (const device of ['cpu', 'cudaemu:0']) {
      for (const opts of [
        { temperature: 0.7 },
        { temperature: 1.3, topP: 0.95 },
        { temperature: 0.5, topP: 0.5 },
      ]) {
        for (const seed of [1, 2, 3]) {
          const active = [true, true, seed !== 2, true];
          const hostRand = samplingRng(seed);
          const want = rows.map((row, r) => (active[r] ? sampleToken(row, opts, hostRand) : -1));
          const x = fromTypedArray(flat, [b, n]);
          const onDevice = x.to(device);
          const got = sampleOnDevice(onDevice, opts, samplingRng(seed), active);
          for (const t of [x, onDevice]) t.dispose();
          expect(got, `${device} ${JSON.stringify(opts)} seed ${seed}`).toEqual(want);
        }
      }
    }
  });

  it('reports a token id or a position out of range at the next read, in the model words', () => {
    setDefaultDevice('cudaemu:0');
    const { model } = loadModel(fixtureCheckpoint('llama'));
    try {
      const vocab = model.config.vocabSize;
      const bad = [...IDS];
      bad[8] = vocab + 3;
      const out = model.forward(ids(bad));
      expect(() => (out.logits as Tensor).sum().item()).toThrow(
        `input ids: token id ${vocab + 3} at [1, 2] is outside the vocabulary [0, ${vocab})`,
      );
      const max = model.config.maxPositionEmbeddings;
      const pos = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, max];
      const out2 = model.forward(ids(IDS), { positionIds: ids(pos) });
      expect(() => (out2.logits as Tensor).sum().item()).toThrow(
        `position ${max} is outside the model's ${max} positions (maxPositionEmbeddings); shorten the sequence`,
      );
    } finally {
      model.dispose();
    }
  });
});
