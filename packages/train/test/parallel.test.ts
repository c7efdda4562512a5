// The trainer's invariant: data, tensor, context and expert parallelism on real processes
// give the per-step losses of one process, in fp32 (the same global batches in Megatron's order).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseRunConfig, train } from '../src/index.js';
import { layoutRunConfig, patternCorpus, tempDir, tinyLlama, usePackedSft, writeSft } from './helpers.js';
import { launchWorkers } from './launch.js';

const root = tempDir('mp-train-par-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const hf = tinyLlama(path.join(root, 'hf'));
const data = patternCorpus(path.join(root, 'corpus'));

function config(run: string, parallel: Record<string, unknown> = {}) {
  return layoutRunConfig({ root, hf, data, run, parallel });
}

/** A run's metrics.jsonl values of `key` for the lines of `kind`. */
function metricsOf(run: string, kind: string, key: string): number[] {
  return fs
    .readFileSync(path.join(root, run, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .filter((m) => m.kind === kind)
    .map((m) => m[key] as number);
}

/** Rank 0's per-step losses of `config` trained on two processes. */
async function lossesOnTwo(config: object): Promise<number[]> {
  const [r] = (await launchWorkers({ nproc: 2, script: 'train-worker.ts', config })) as {
    losses: number[];
  }[];
  return r.losses;
}

/** The losses of `got`, step by step, within 1e-5 (relative) of `want`'s, as many steps. */
function expectLosses(got: number[], want: number[], label: string): void {
  expect(got.length, label).toBe(want.length);
  for (let i = 0; i < want.length; i++)
    expect(Math.abs(got[i] - want[i]) / want[i], `${label} step ${i + 1}`).toBeLessThan(1e-5);
}

describe('train on several processes', () => {
  // with two validations (iterations 3 and 6) of 2 global batches
  const withEval = (run: string, parallel: Record<string, unknown> = {}) => {
    const c = config(run, parallel) as Record<string, Record<string, unknown>>;
    c.training = { ...c.training, evalInterval: 3, evalIters: 2 };
    return c;
  };
  let reference: number[];
  it('one process', async () => {
    reference = (await train(parseRunConfig(withEval('one')), { log: () => {}, report: false })).losses;
    expect(reference.length).toBe(6);
  });

  it.each([
    ['DP=2', {}],
    ['TP=2', { tensorModelParallelSize: 2 }],
    ['TP=2 + sequence parallelism', { tensorModelParallelSize: 2, sequenceParallel: true }],
    ['CP=2', { contextParallelSize: 2 }],
    // Megatron's --cp-comm-type a2a: each rank attends with half the heads over whole sequences
    ['CP=2 by all-to-all', { contextParallelSize: 2, cpCommType: 'a2a' }],
    ['PP=2', { pipelineModelParallelSize: 2 }],
    [
      // Megatron's --num-layers-per-virtual-pipeline-stage: 4 layers / (2 stages × 1) = 2 chunks a rank
      'PP=2, interleaved with 2 virtual stages',
      { pipelineModelParallelSize: 2, numLayersPerVirtualPipelineStage: 1 },
    ],
  ])('%s gives the losses of one process', async (name, parallel) => {
    const [r] = (await launchWorkers({
      nproc: 2,
      script: 'train-worker.ts',
      config: withEval(`run-${name.replace(/\W+/g, '-')}`, parallel),
    })) as { losses: number[] }[];
    expect(r.losses.length).toBe(6);
    for (let i = 0; i < 6; i++) {
      expect(Math.abs(r.losses[i] - reference[i]) / reference[i], `${name} step ${i + 1}`).toBeLessThan(1e-5);
    }
    if ('numLayersPerVirtualPipelineStage' in parallel) {
      const used = JSON.parse(
        fs.readFileSync(path.join(root, `run-${name.replace(/\W+/g, '-')}`, 'config.json'), 'utf8'),
      );
      expect(used.parallel.virtualPipelineModelParallelSize).toBe(2);
    }
    // the gradient norms too (AdamW would hide a gradient off by a constant factor in the losses)
    const run = `run-${name.replace(/\W+/g, '-')}`;
    const a = metricsOf('one', 'train', 'gradNorm');
    const b = metricsOf(run, 'train', 'gradNorm');
    for (let i = 0; i < 6; i++)
      expect(Math.abs(b[i] - a[i]) / a[i], `${name} grad norm ${i + 1}`).toBeLessThan(1e-4);
    // and the validation losses (the forward-only pass of each layout, summed over its ranks):
    // iterations 3 and 6, and the finished run's on the next validation batches
    const va = metricsOf('one', 'valid', 'lmLoss');
    const vb = metricsOf(run, 'valid', 'lmLoss');
    expect(va.length).toBe(3);
    expect(vb.length, name).toBe(3);
    for (let i = 0; i < 3; i++)
      expect(Math.abs(vb[i] - va[i]) / va[i], `${name} validation ${i + 1}`).toBeLessThan(1e-5);
  });
});

describe('dropout', () => {
  // Megatron's hidden and attention dropout: the masks are keyed by each sample's index in the run
  // and each token's place in its row, so every layout drops what one process drops
  const withDropout = (run: string, parallel: Record<string, unknown>, attention: number) => {
    const c = config(run, parallel) as Record<string, Record<string, unknown>>;
    c.model = { ...c.model, hiddenDropout: 0.1, attentionDropout: attention };
    return c;
  };
  const one: Record<number, number[]> = {};
  it('one process: dropout changes the losses', async () => {
    const plain = (await train(parseRunConfig(config('drop-plain')), { log: () => {}, report: false }))
      .losses;
    for (const attention of [0.1, 0]) {
      one[attention] = (
        await train(parseRunConfig(withDropout(`drop-one-${attention}`, {}, attention)), {
          log: () => {},
          report: false,
        })
      ).losses;
      expect(one[attention].length).toBe(6);
      // the first step's loss already differs (the forward drops), and every later one
      for (let i = 0; i < 6; i++)
        expect(Math.abs(one[attention][i] - plain[i]), `step ${i + 1}`).toBeGreaterThan(1e-4);
    }
  });

  it.each([
    ['DP=2', {}, 0.1],
    ['TP=2 + sequence parallelism', { tensorModelParallelSize: 2, sequenceParallel: true }, 0.1],
    ['PP=2', { pipelineModelParallelSize: 2 }, 0.1],
    ['CP=2', { contextParallelSize: 2 }, 0.1],
    ['CP=2 without attention dropout', { contextParallelSize: 2 }, 0],
  ] as const)('%s gives the losses of one process', async (name, parallel, attention) => {
    const run = `drop-${name.replace(/\W+/g, '-')}`;
    expectLosses(await lossesOnTwo(withDropout(run, parallel, attention)), one[attention], name);
    const a = metricsOf(`drop-one-${attention}`, 'train', 'gradNorm');
    const b = metricsOf(run, 'train', 'gradNorm');
    for (let i = 0; i < 6; i++)
      expect(Math.abs(b[i] - a[i]) / a[i], `${name} grad norm ${i + 1}`).toBeLessThan(1e-4);
  });
});

describe('decoupled learning rate', () => {
  // Megatron's --decoupled-lr: the embedding and output layer on a schedule of their own. Under the
  // distributed optimizer a rank's shard may hold only some of the groups, and under pipeline
  // parallelism a stage holds the embedding or the output layer only
  const decoupled = (run: string, parallel: Record<string, unknown>) => {
    const c = config(run, parallel) as Record<string, Record<string, unknown>>;
    c.optimizer = { ...c.optimizer, decoupledLr: 2e-2, decoupledMinLr: 2e-3 };
    return c;
  };
  let one: number[];
  it('one process', async () => {
    one = (await train(parseRunConfig(decoupled('dlr-one', {})), { log: () => {}, report: false })).losses;
    const plain = (await train(parseRunConfig(config('dlr-plain')), { log: () => {}, report: false })).losses;
    // the first update runs at the warm-up's lr 0: the runs part from step 3
    expect(one.slice(0, 2)).toEqual(plain.slice(0, 2));
    for (let i = 2; i < 6; i++) expect(Math.abs(one[i] - plain[i]), `step ${i + 1}`).toBeGreaterThan(1e-4);
  });

  it.each([
    ['DP=2 with the distributed optimizer', { useDistributedOptimizer: true }],
    [
      'PP=2 with the distributed optimizer over DP=1',
      { pipelineModelParallelSize: 2, useDistributedOptimizer: true },
    ],
  ])('%s gives the losses of one process', async (name, parallel) => {
    const run = `dlr-${name.replace(/\W+/g, '-')}`;
    expectLosses(await lossesOnTwo(decoupled(run, parallel)), one, name);
    const want = metricsOf('dlr-one', 'train', 'decoupledLr');
    expect(want.length).toBe(6);
    expect(metricsOf(run, 'train', 'decoupledLr')).toEqual(want);
  });
});

describe('batch-size ramp-up', () => {
  // Megatron's --rampup-batch-size 4 4 16 over 48 samples: steps of 4 micro-batch rows, then 8
  const ramped = (run: string, parallel: Record<string, unknown>) => {
    const c = config(run, parallel) as Record<string, Record<string, unknown>>;
    c.training = { ...c.training, trainIters: null, trainSamples: 48, rampupBatchSize: [4, 4, 16] };
    c.scheduler = { lrDecayStyle: 'cosine', lrWarmupSamples: 8 };
    return c;
  };
  let one: number[];
  it('one process', async () => {
    one = (await train(parseRunConfig(ramped('ramp-one', {})), { log: () => {}, report: false })).losses;
    expect(one.length).toBe(8);
  });

  it.each([
    ['DP=2', {}],
    ['PP=2', { pipelineModelParallelSize: 2 }],
  ])('%s gives the losses of one process', async (name, parallel) => {
    expectLosses(await lossesOnTwo(ramped(`ramp-${name.replace(/\W+/g, '-')}`, parallel)), one, name);
  });
});

describe('per-token loss', () => {
  it('calculatePerTokenLoss on packed SFT rows: DP=2 gives the losses and gradient norms of one process, and the gradients differ from the mean of micro-batch means', async () => {
    const prefix = path.join(root, 'sft-per-token');
    // replies of 1 to 16 tokens: micro-batches carry different numbers of loss tokens
    writeSft(prefix, 80, 32, (i) => 1 + ((i * 7) % 16));
    const cfg = (run: string, perToken: boolean) => {
      const c = config(run) as Record<string, Record<string, unknown>>;
      usePackedSft(c, prefix, root);
      c.training = { ...c.training, calculatePerTokenLoss: perToken };
      return c;
    };
    const quiet = { log: () => {}, report: false };
    const one = (await train(parseRunConfig(cfg('per-token-one', true)), quiet)).losses;
    await train(parseRunConfig(cfg('per-token-off', false)), quiet);
    const [two] = (await launchWorkers({
      nproc: 2,
      script: 'train-worker.ts',
      config: cfg('per-token-two', true),
    })) as { losses: number[] }[];
    expect(two.losses.length).toBe(one.length);
    for (let i = 0; i < one.length; i++)
      expect(Math.abs(two.losses[i] - one[i]) / one[i], `step ${i + 1}`).toBeLessThan(1e-5);
    const a = metricsOf('per-token-one', 'train', 'gradNorm');
    const b = metricsOf('per-token-two', 'train', 'gradNorm');
    const off = metricsOf('per-token-off', 'train', 'gradNorm');
    for (let i = 0; i < a.length; i++)
      expect(Math.abs(b[i] - a[i]) / a[i], `grad norm ${i + 1}`).toBeLessThan(1e-4);
    // the option changes the objective: one token mean over the global batch
    expect(Math.abs(off[0] - a[0]) / a[0]).toBeGreaterThan(1e-3);
  });
});

describe('MoE with aux and z losses', () => {
  it('DP=2 gives the losses of one process (the aux losses are averaged over micro-batches)', async () => {
    const moeHf = tinyLlama(path.join(root, 'hf-mixtral'), 'mixtral');
    const cfg = (run: string) => {
      const c = config(run) as Record<string, Record<string, unknown>>;
      c.model = { load: moeHf, dtype: 'fp32', moeAuxLossCoeff: 0.01, moeZLossCoeff: 0.001 };
      return c;
    };
    const one = (await train(parseRunConfig(cfg('moe-one')), { log: () => {}, report: false })).losses;
    const [two] = (await launchWorkers({ nproc: 2, script: 'train-worker.ts', config: cfg('moe-two') })) as {
      losses: number[];
    }[];
    for (let i = 0; i < 6; i++)
      expect(Math.abs(two.losses[i] - one[i]) / one[i], `step ${i + 1}`).toBeLessThan(1e-5);
  });

  it("Megatron's seq_aux_loss (per sample of a micro-batch of 2): CP=2 gives the losses of one process, which differ from aux_loss's", async () => {
    const moeHf = tinyLlama(path.join(root, 'hf-mixtral-seqaux'), 'mixtral');
    const cfg = (run: string, type: string, parallel: Record<string, unknown> = {}) => {
      const c = config(run, parallel) as Record<string, Record<string, unknown>>;
      // a large coefficient, so that the balancing term moves the losses within 6 steps
      c.model = { load: moeHf, dtype: 'fp32', moeAuxLossCoeff: 1, moeRouterLoadBalancingType: type };
      return c;
    };
    const quiet = { log: () => {}, report: false };
    const one = (await train(parseRunConfig(cfg('seqaux-one', 'seq_aux_loss')), quiet)).losses;
    const aux = (await train(parseRunConfig(cfg('seqaux-aux', 'aux_loss')), quiet)).losses;
    const [cp2] = (await launchWorkers({
      nproc: 2,
      script: 'train-worker.ts',
      config: cfg('seqaux-cp-two', 'seq_aux_loss', { contextParallelSize: 2 }),
    })) as { losses: number[] }[];
    for (let i = 0; i < 6; i++)
      expect(Math.abs(cp2.losses[i] - one[i]) / one[i], `CP=2 step ${i + 1}`).toBeLessThan(1e-5);
    // the per-sample loss is another objective: its gradients move the runs apart after the first
    // step (the logged loss is the language model's)
    expect(Math.max(...aux.map((a, i) => Math.abs(a - one[i]) / one[i]))).toBeGreaterThan(1e-6);
  });
});

describe('expert parallelism', () => {
  it('EP=2 (with and without the distributed optimizer) gives the losses of one process, and its checkpoint resumes on one process', async () => {
    const moeHf = tinyLlama(path.join(root, 'hf-mixtral-ep'), 'mixtral');
    const cfg = (run: string, parallel: Record<string, unknown>, extra: Record<string, object> = {}) => {
      const c = config(run, parallel) as Record<string, Record<string, unknown>>;
      c.model = { load: moeHf, dtype: 'fp32', moeAuxLossCoeff: 0.01, moeZLossCoeff: 0.001 };
      for (const [k, v] of Object.entries(extra)) c[k] = { ...c[k], ...v };
      return c;
    };
    const one = (await train(parseRunConfig(cfg('ep-one', {})), { log: () => {}, report: false })).losses;
    const ep2 = async (
      name: string,
      parallel: Record<string, unknown>,
      extra: Record<string, object> = {},
    ) => {
      const [r] = (await launchWorkers({
        nproc: 2,
        script: 'train-worker.ts',
        config: cfg(name, { expertModelParallelSize: 2, ...parallel }, extra),
      })) as { losses: number[] }[];
      return r.losses;
    };
    const close = (a: number[], b: number[], what: string) => {
      expect(a.length, what).toBe(b.length);
      for (let i = 0; i < a.length; i++)
        expect(Math.abs(a[i] - b[i]) / b[i], `${what} step ${i + 1}`).toBeLessThan(1e-5);
    };
    close(await ep2('ep-two', {}), one, 'EP=2');
    close(await ep2('ep-two-do', { useDistributedOptimizer: true }), one, 'EP=2 + distributed optimizer');
    // context parallelism with MoE: the routers' aux and z losses use the whole sequences' statistics
    const [cp2] = (await launchWorkers({
      nproc: 2,
      script: 'train-worker.ts',
      config: cfg('moe-cp-two', { contextParallelSize: 2 }),
    })) as { losses: number[] }[];
    close(cp2.losses, one, 'CP=2 (MoE with aux and z losses)');
    close(
      await ep2('ep-two-a2a', {}, { model: { moeTokenDispatcherType: 'alltoall' } }),
      one,
      'EP=2, all-to-all dispatcher',
    );
    // three steps at EP=2 saved, then resumed on one process (another layout)
    const save = path.join(root, 'ck-ep');
    const half = await ep2('ep-half', {}, { training: { exitInterval: 3 }, checkpoint: { save } });
    close(half, one.slice(0, 3), 'EP=2 first half');
    const resumed = await train(parseRunConfig(cfg('ep-resumed', {}, { checkpoint: { load: save } })), {
      log: () => {},
      report: false,
    });
    close(resumed.losses, one.slice(3), 'resumed on one process');
  });
});

describe('context parallelism with packed rows', () => {
  it('CP=2 on packed SFT rows (samples padded to a multiple of 2·cp) gives the losses of one process, with dropout too', async () => {
    const prefix = path.join(root, 'sft-cp');
    writeSft(prefix, 80, 32);
    const cfg = (run: string, parallel: Record<string, unknown>, dropout = 0) => {
      const c = config(run, parallel) as Record<string, Record<string, unknown>>;
      // one process pads the samples as CP=2 does, so both see the same packed rows
      usePackedSft(c, prefix, root);
      c.model = { ...c.model, hiddenDropout: dropout, attentionDropout: dropout };
      return c;
    };
    // and with dropout: each sample's chunks drop what one process drops
    for (const dropout of [0, 0.1]) {
      const one = (
        await train(parseRunConfig(cfg(`cp-sft-one-${dropout}`, {}, dropout)), {
          log: () => {},
          report: false,
        })
      ).losses;
      const two = await lossesOnTwo(cfg(`cp-sft-two-${dropout}`, { contextParallelSize: 2 }, dropout));
      expectLosses(two, one, `dropout ${dropout}`);
      if (dropout === 0) {
        // by all-to-all: the samples' global boundaries on every rank, the same losses
        const a2a = await lossesOnTwo(cfg('cp-sft-a2a', { contextParallelSize: 2, cpCommType: 'a2a' }));
        expectLosses(a2a, one, 'all-to-all');
      }
    }
    // attention dropout needs the ring: refused with the config
    expect(() =>
      parseRunConfig(cfg('cp-a2a-drop', { contextParallelSize: 2, cpCommType: 'a2a' }, 0.1)),
    ).toThrow(
      /parallel.cpCommType: a2a runs attention without dropout, but model.attentionDropout is 0.1: set it to 0 or use cpCommType p2p/,
    );
  });
});

describe('context parallelism with multi-token prediction', () => {
  it('DeepSeek-V3 (MLA, MoE, MTP) at CP=2, on plain and on packed SFT rows, gives the losses, MTP losses and gradient norms of one process', async () => {
    const dsv3 = tinyLlama(path.join(root, 'hf-dsv3-cp'), 'deepseek-v3');
    const prefix = path.join(root, 'sft-mtp-cp');
    writeSft(prefix, 80, 32);
    const cfg = (run: string, parallel: Record<string, unknown>, packed: boolean) => {
      const c = config(run, parallel) as Record<string, Record<string, unknown>>;
      c.model = { load: dsv3, dtype: 'fp32', moeAuxLossCoeff: 0.01, mtpLossScalingFactor: 0.3 };
      if (packed) {
        // the MTP shift stays inside each packed sample and follows the SFT loss mask
        usePackedSft(c, prefix, root);
      }
      return c;
    };
    const metrics = (run: string) =>
      fs
        .readFileSync(path.join(root, run, 'metrics.jsonl'), 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l))
        .filter((m) => m.kind === 'train');
    for (const [packed, comm] of [
      [false, 'p2p'],
      [true, 'p2p'],
      // MLA's heads split by all-to-all, on packed rows
      [true, 'a2a'],
    ] as const) {
      const tag = `${packed ? 'packed' : 'plain'}-${comm}`;
      const oneRun = `mtp-cp-one-${packed ? 'packed' : 'plain'}`;
      if (comm === 'p2p')
        await train(parseRunConfig(cfg(oneRun, {}, packed)), { log: () => {}, report: false });
      await launchWorkers({
        nproc: 2,
        script: 'train-worker.ts',
        config: cfg(`mtp-cp-two-${tag}`, { contextParallelSize: 2, cpCommType: comm }, packed),
      });
      const [one, two] = [metrics(oneRun), metrics(`mtp-cp-two-${tag}`)];
      expect(two.length, tag).toBe(6);
      for (let i = 0; i < 6; i++) {
        const what = `${tag} step ${i + 1}`;
        expect(Math.abs(two[i].lmLoss - one[i].lmLoss) / one[i].lmLoss, `${what} lm loss`).toBeLessThan(1e-5);
        expect(one[i].moe.mtpLoss, `${what} MTP loss logged`).toBeGreaterThan(0);
        expect(
          Math.abs(two[i].moe.mtpLoss - one[i].moe.mtpLoss) / one[i].moe.mtpLoss,
          `${what} MTP loss`,
        ).toBeLessThan(1e-5);
        expect(
          Math.abs(two[i].gradNorm - one[i].gradNorm) / one[i].gradNorm,
          `${what} grad norm`,
        ).toBeLessThan(1e-4);
      }
    }
  });
});

describe('pipeline parallelism', () => {
  it('an interleaved PP=2 checkpoint resumes on one process with the losses of one process, and a one-process checkpoint resumes at PP=2', async () => {
    const one = (await train(parseRunConfig(config('pp-one')), { log: () => {}, report: false })).losses;
    const pp2 = async (name: string, extra: Record<string, object>, vpp: number | null = null) => {
      const c = config(name, {
        pipelineModelParallelSize: 2,
        virtualPipelineModelParallelSize: vpp,
      }) as Record<string, Record<string, unknown>>;
      for (const [k, v] of Object.entries(extra)) c[k] = { ...c[k], ...v };
      const [r] = (await launchWorkers({ nproc: 2, script: 'train-worker.ts', config: c })) as {
        losses: number[];
      }[];
      return r.losses;
    };
    const close = (a: number[], b: number[], what: string) => {
      expect(a.length, what).toBe(b.length);
      for (let i = 0; i < a.length; i++)
        expect(Math.abs(a[i] - b[i]) / b[i], `${what} step ${i + 1}`).toBeLessThan(1e-5);
    };
    const save = path.join(root, 'ck-pp');
    // saved by the interleaved schedule (2 chunks per rank), resumed on one process
    close(
      await pp2('pp-half', { training: { exitInterval: 3 }, checkpoint: { save } }, 2),
      one.slice(0, 3),
      'PP=2 × 2 virtual stages, first half',
    );
    const c = config('pp-resumed-one') as Record<string, Record<string, unknown>>;
    c.checkpoint = { load: save };
    close(
      (await train(parseRunConfig(c), { log: () => {}, report: false })).losses,
      one.slice(3),
      'resumed on one process',
    );
    // and the other way: three steps on one process, the rest at PP=2
    const save1 = path.join(root, 'ck-pp-one');
    const h = config('pp-one-half') as Record<string, Record<string, unknown>>;
    h.training = { ...h.training, exitInterval: 3 };
    h.checkpoint = { save: save1 };
    await train(parseRunConfig(h), { log: () => {}, report: false });
    close(await pp2('pp-resumed', { checkpoint: { load: save1 } }), one.slice(3), 'resumed at PP=2');
  });
});

describe('checkpoints across layouts', () => {
  it('DP=2 with the distributed optimizer resumes bit for bit, and one process resumes its checkpoint', async () => {
    const distOpt = { useDistributedOptimizer: true };
    const run = async (name: string, extra: Record<string, unknown>, nproc = 2) => {
      const cfg = config(name, distOpt) as Record<string, Record<string, unknown>>;
      for (const [k, v] of Object.entries(extra)) cfg[k] = { ...cfg[k], ...(v as object) };
      if (nproc === 1) {
        cfg.parallel = {};
        return (await train(parseRunConfig(cfg), { log: () => {}, report: false })).losses;
      }
      const [r] = (await launchWorkers({ nproc, script: 'train-worker.ts', config: cfg })) as {
        losses: number[];
      }[];
      return r.losses;
    };
    const full = await run('do-full', {});
    const half = await run('do-half', {
      training: { exitInterval: 3 },
      checkpoint: { save: path.join(root, 'ck-do') },
    });
    expect(half).toEqual(full.slice(0, 3));
    const resumed = await run('do-resumed', { checkpoint: { load: path.join(root, 'ck-do') } });
    expect(resumed).toEqual(full.slice(3));
    // the same checkpoint on one process (another layout): the same losses within fp32 tolerance
    const single = await run('do-single', { checkpoint: { load: path.join(root, 'ck-do') } }, 1);
    for (let i = 0; i < 3; i++) expect(Math.abs(single[i] - full[3 + i]) / full[3 + i]).toBeLessThan(1e-5);
  });
});

describe('stopping and saving on several processes', () => {
  type Result = { iteration: number; exitReason: string; checkpoints: string[]; losses: number[] };
  const run = async (name: string, extra: Record<string, Record<string, unknown>>, env = {}) => {
    const cfg = config(name) as Record<string, Record<string, unknown>>;
    for (const [k, v] of Object.entries(extra)) cfg[k] = { ...cfg[k], ...v };
    const [r] = (await launchWorkers({ nproc: 2, script: 'train-worker.ts', config: cfg, env })) as Result[];
    return r;
  };

  it('a save interval that divides the run saves each interval once, the last included, on every rank alike', async () => {
    // the end of the run saves unless the last iteration was just saved: every rank must decide
    // alike (only rank 0 learns the folders; the others used to save again and wait alone)
    const save = path.join(root, 'ck-interval');
    // (with the distributed optimizer a save gathers the optimizer's shards: a collective)
    const r = await run('save-interval', {
      training: { trainIters: 4 },
      parallel: { useDistributedOptimizer: true },
      checkpoint: { save, saveInterval: 2 },
    });
    expect(r.exitReason).toBe('done');
    expect(r.checkpoints).toEqual(['iter_0000002', 'iter_0000004']);
    expect(
      fs
        .readdirSync(save)
        .filter((f) => f.startsWith('iter_'))
        .sort(),
    ).toEqual(['iter_0000002', 'iter_0000004']);
  });

  it('a signal that reaches one rank stops every rank at the same iteration, with one checkpoint', async () => {
    // rank 1 alone is stopped (as by SIGTERM) during the run; rank 0 never is, yet ends with it
    const save = path.join(root, 'ck-signal');
    const r = await run(
      'signal-one-rank',
      { training: { trainIters: 100_000, logInterval: 1000 }, checkpoint: { save } },
      { MEGAPATCH_TEST_ABORT_RANK: '1', MEGAPATCH_TEST_ABORT_AFTER_MS: '3000' },
    );
    expect(r.exitReason).toBe('signal');
    expect(r.iteration).toBeGreaterThan(0);
    expect(r.iteration).toBeLessThan(100_000);
    const iter = `iter_${String(r.iteration).padStart(7, '0')}`;
    expect(r.checkpoints).toEqual([iter]);
    expect(fs.readdirSync(save).filter((f) => f.startsWith('iter_'))).toEqual([iter]);
  });
});

describe('a TP=2 checkpoint', () => {
  it('resumes on one process with the losses of an uninterrupted TP=2 run', async () => {
    const tp2 = { tensorModelParallelSize: 2 };
    const [full] = (await launchWorkers({
      nproc: 2,
      script: 'train-worker.ts',
      config: config('tp-full', tp2),
    })) as {
      losses: number[];
    }[];
    const halfCfg = config('tp-half', tp2) as Record<string, Record<string, unknown>>;
    halfCfg.training = { ...halfCfg.training, exitInterval: 3 };
    halfCfg.checkpoint = { save: path.join(root, 'ck-tp') };
    await launchWorkers({ nproc: 2, script: 'train-worker.ts', config: halfCfg });
    const oneCfg = config('tp-one') as Record<string, Record<string, unknown>>;
    oneCfg.checkpoint = { load: path.join(root, 'ck-tp') };
    const single = (await train(parseRunConfig(oneCfg), { log: () => {}, report: false })).losses;
    for (let i = 0; i < 3; i++)
      expect(Math.abs(single[i] - full.losses[3 + i]) / full.losses[3 + i]).toBeLessThan(1e-5);
  });
});
