// The training loop end to end on one process: the loss falls, metrics and log lines are written,
// and a run of 2N steps equals a run of N steps resumed for N more, bit for bit (fp32 and bf16).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ShardedSafetensors } from '@megapatch/convert';
import { afterAll, describe, expect, it } from 'vitest';
import { loadRunConfig, parseRunConfig, type RunConfigInput, train } from '../src/index.js';
import { mergedRunConfig, patternCorpus, tempDir, tinyLlama } from './helpers.js';

const root = tempDir('mp-train-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const hf = tinyLlama(path.join(root, 'hf'));
const data = patternCorpus(path.join(root, 'corpus'));

function config(run: string, over: Partial<Record<keyof RunConfigInput, object>> = {}) {
  const base: RunConfigInput = {
    model: { load: hf, dtype: 'fp32' },
    data: { dataPath: [data], seqLength: 32, split: '90,10,0', eodTokenId: 2 },
    training: {
      microBatchSize: 2,
      globalBatchSize: 8,
      trainIters: 12,
      logInterval: 4,
      evalInterval: 6,
      evalIters: 2,
      seed: 7,
    },
    optimizer: { lr: 3e-3, minLr: 3e-4, weightDecay: 0.01, clipGrad: 1 },
    scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 2 },
    logging: { runDir: path.join(root, run) },
  };
  return mergedRunConfig(base, over);
}

describe('train', () => {
  it('lowers the loss and writes metrics, log lines and validation', async () => {
    const lines: string[] = [];
    const r = await train(config('run-a'), { log: (l) => lines.push(l) });
    expect(r.iteration).toBe(12);
    expect(r.exitReason).toBe('done');
    expect(r.losses[11]).toBeLessThan(r.losses[0] - 0.8);
    const metrics = fs
      .readFileSync(path.join(root, 'run-a', 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    expect(metrics.filter((m) => m.kind === 'train').length).toBe(12);
    // every 6 iterations, and the finished run's (Megatron's "on validation set")
    expect(metrics.filter((m) => m.kind === 'valid').map((m) => m.iteration)).toEqual([6, 12, 12]);
    expect(
      lines.some((l) => /validation loss at iteration 12 on validation set \| lm loss value: /.test(l)),
    ).toBe(true);
    expect(lines.some((l) => /iteration\s+4\/\s*12 \| consumed samples:\s+32 \|/.test(l))).toBe(true);
    expect(lines.some((l) => /validation loss at iteration 6 \| lm loss value: /.test(l))).toBe(true);
    // the run report is written when the run ends
    expect(fs.existsSync(path.join(root, 'run-a', 'report', 'index.html'))).toBe(true);
    expect(lines.some((l) => /^run report: /.test(l))).toBe(true);
    // native memory is flat from step to step once the optimizer state exists
    const live = metrics.filter((m) => m.kind === 'train').map((m) => m.memory.liveBytes);
    for (let i = 2; i < live.length; i++) expect(live[i], `live bytes after step ${i + 1}`).toBe(live[1]);
    // warm-up 2 iterations, then cosine to minLr at iteration 12 (counted in samples, as Megatron)
    const lrs = metrics.filter((m) => m.kind === 'train').map((m) => m.lr);
    expect(lrs[0]).toBeCloseTo(1.5e-3, 9);
    expect(lrs[1]).toBeCloseTo(3e-3, 9);
    expect(lrs[11]).toBeCloseTo(3e-4, 9);
  });

  it.each(['fp32', 'bf16', 'fp16'] as const)(
    '%s: 2N steps equal N steps resumed for N more, bit for bit',
    async (dtype) => {
      // fp16: a loss scale that overflows at first and then grows, on both sides of the resume
      const optimizer = dtype === 'fp16' ? { initialLossScale: 2 ** 20, lossScaleWindow: 3 } : {};
      const full = await train(
        config(`full-${dtype}`, {
          model: { load: hf, dtype },
          optimizer,
          checkpoint: { save: path.join(root, `ck-full-${dtype}`), saveInterval: 6 },
        }),
        { log: () => {}, report: false },
      );
      const ck = path.join(root, `ck-full-${dtype}`);
      const firstHalf = await train(
        config(`half-${dtype}`, {
          model: { load: hf, dtype },
          optimizer,
          training: { exitInterval: 6 },
          checkpoint: { save: path.join(root, `ck-half-${dtype}`) },
        }),
        { log: () => {}, report: false },
      );
      expect(firstHalf.exitReason).toBe('exit-interval');
      expect(firstHalf.losses).toEqual(full.losses.slice(0, 6));
      const resumed = await train(
        config(`resumed-${dtype}`, {
          model: { load: null, dtype },
          optimizer,
          checkpoint: {
            load: path.join(root, `ck-half-${dtype}`),
            save: path.join(root, `ck-resumed-${dtype}`),
          },
        }),
        { log: () => {}, report: false },
      );
      expect(resumed.losses).toEqual(full.losses.slice(6));
      // the final weights are the same bytes
      const a = fs.readdirSync(path.join(ck, 'iter_0000012')).filter((f) => f.endsWith('.safetensors'));
      for (const f of a) {
        const x = fs.readFileSync(path.join(ck, 'iter_0000012', f));
        const y = fs.readFileSync(path.join(root, `ck-resumed-${dtype}`, 'iter_0000012', f));
        expect(Buffer.compare(x, y), f).toBe(0);
      }
    },
  );
});

describe('fp16', () => {
  it("scales the loss with Megatron's dynamic scale: overflowing steps are skipped and the scale backs off, then grows", async () => {
    const lines: string[] = [];
    const r = await train(
      config('fp16', {
        model: { load: hf, dtype: 'fp16' },
        training: { trainIters: 30, logInterval: 1, evalInterval: null },
        optimizer: { initialLossScale: 2 ** 22, lossScaleWindow: 2, hysteresis: 2 },
      }),
      { log: (l) => lines.push(l), report: false },
    );
    const steps = fs
      .readFileSync(path.join(root, 'fp16', 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l))
      .filter((m) => m.kind === 'train');
    // the rule, replayed from the logged scales and skips: after `hysteresis` overflowing steps
    // (counted since the last growth) the scale halves on every further overflow; after
    // lossScaleWindow clean steps it doubles and the hysteresis budget is refilled
    let scale = 2 ** 22;
    let hysteresis = 2;
    let clean = 0;
    let skipped = 0;
    for (const m of steps) {
      expect(m.lossScale, `iteration ${m.iteration}`).toBe(scale);
      const overflow = m.skippedIterations > skipped;
      skipped = m.skippedIterations;
      expect(overflow, `iteration ${m.iteration}: a skipped step has no gradient norm`).toBe(
        m.gradNorm === null,
      );
      if (overflow) {
        clean = 0;
        hysteresis--;
        if (hysteresis <= 0) scale = Math.max(scale / 2, 1);
      } else if (++clean === 2) {
        clean = 0;
        hysteresis = 2;
        scale *= 2;
      }
    }
    expect(skipped).toBeGreaterThan(2); // 2^22 overflows fp16 gradients at first
    expect(steps.some((m, i) => i > 0 && m.lossScale > steps[i - 1].lossScale)).toBe(true);
    expect(lines.some((l) => /loss scale: 4194304\.0 \|/.test(l))).toBe(true);
    const trained = r.losses.filter((_, i) => steps[i].gradNorm !== null);
    expect(trained.at(-1)).toBeLessThan(r.losses[0] - 0.5);
  });
});

describe('run config', () => {
  it('names the nearest key of a misspelled one', () => {
    expect(() =>
      parseRunConfig({ ...config('x'), training: { ...config('x').training, trainIter: 3 } }),
    ).toThrow(/unknown key training\.trainIter \(did you mean training\.trainIters\?\)/);
    // nested sections take three-part keys
    const sft = loadRunConfig(null, [
      ['model.load', 'x'],
      ['data.sft.prefix', 'p'],
      ['data.seqLength', '8'],
      ['training.globalBatchSize', '4'],
      ['training.trainIters', '2'],
      ['optimizer.lr', '0.1'],
      ['logging.runDir', 'r'],
    ]);
    expect(sft.data.sft?.prefix).toBe('p');
    expect(() => loadRunConfig(null, [['data.sft.prefx', 'p']])).toThrow(
      /did you mean --data\.sft\.prefix\?/,
    );
    expect(() => loadRunConfig(null, [['optimizer.lrr', '1']])).toThrow(
      /unknown key --optimizer\.lrr \(did you mean --optimizer\.lr\?\)/,
    );
  });

  it("refuses a schedule Megatron's scheduler would assert on, in the config's words", () => {
    const bad = (over: Parameters<typeof config>[1]) => () => config('x', over);
    expect(bad({ training: { trainIters: 1 }, scheduler: { lrWarmupIters: 1 } })).toThrow(
      'config: scheduler.lrWarmupIters: 1 warm-up iterations leave none to decay over: make it less than training.trainIters (1; scheduler.lrDecayIters defaults to it)',
    );
    expect(bad({ scheduler: { lrWarmupIters: 5, lrDecayIters: 5 } })).toThrow(
      'config: scheduler.lrWarmupIters: 5 warm-up iterations leave none to decay over: make it less than scheduler.lrDecayIters (5)',
    );
    expect(bad({ optimizer: { lr: 1e-4, minLr: 1e-3 } })).toThrow(
      'config: optimizer.minLr: 0.001 is above optimizer.lr (0.0001): the schedule decays from lr down to minLr',
    );
    expect(bad({ training: { trainIters: 2 }, scheduler: { lrWarmupIters: 1 } })).not.toThrow();
  });

  it("takes Megatron's long flag names", () => {
    const c = loadRunConfig(null, [
      ['load', 'ck'],
      ['finetune', 'true'],
      ['model.load', 'x'],
      ['bf16', 'true'],
      ['data-path', '0.3 a 0.7 b'],
      ['seq-length', '8'],
      ['micro-batch-size', '2'],
      ['global-batch-size', '4'],
      ['train-iters', '2'],
      ['lr', '1e-4'],
      ['lr-decay-style', 'cosine'],
      ['tensor-model-parallel-size', '2'],
      ['sequence-parallel', 'true'],
      ['recompute-modules', 'core_attn moe'],
      ['save', 's'],
      ['export-hf', 'out'],
      ['run-dir', 'r'],
    ]);
    expect(c.checkpoint).toMatchObject({ load: 'ck', finetune: true, save: 's', exportHf: 'out' });
    expect(c.model).toMatchObject({ load: 'x', dtype: 'bf16', recomputeModules: ['core_attn', 'moe'] });
    expect(c.data.dataPath).toEqual([0.3, 'a', 0.7, 'b']);
    expect(c.training).toMatchObject({ microBatchSize: 2, globalBatchSize: 4, trainIters: 2 });
    expect(c.optimizer.lr).toBe(1e-4);
    expect(c.scheduler.lrDecayStyle).toBe('cosine');
    expect(c.parallel).toMatchObject({ tensorModelParallelSize: 2, sequenceParallel: true });
    expect(() => loadRunConfig(null, [['tensor-model-paralel-size', '2']])).toThrow(
      /unknown option --tensor-model-paralel-size \(did you mean --tensor-model-parallel-size\?\)/,
    );
    expect(() => loadRunConfig(null, [['bf16', 'yes']])).toThrow(/--bf16 takes no value/);
    const base: [string, string][] = [
      ['model.config', 'x'],
      ['data-path', 'a'],
      ['seq-length', '8'],
      ['global-batch-size', '4'],
      ['train-iters', '2'],
      ['lr', '1e-4'],
      ['run-dir', 'r'],
    ];
    expect(loadRunConfig(null, base).training.gradientAccumulationFusion).toBe(true);
    expect(
      loadRunConfig(null, [...base, ['no-gradient-accumulation-fusion', 'true']]).training
        .gradientAccumulationFusion,
    ).toBe(false);
    expect(
      loadRunConfig(null, [...base, ['gradient-accumulation-fusion', 'false']]).training
        .gradientAccumulationFusion,
    ).toBe(false);
    // Megatron's MoE balancing flags (Pai-Megatron-Patch's DeepSeek-V3 script passes these)
    const moe = loadRunConfig(null, [
      ...base,
      ['moe-router-load-balancing-type', 'seq_aux_loss'],
      ['moe-aux-loss-coeff', '1e-4'],
    ]).model;
    expect(moe).toMatchObject({ moeRouterLoadBalancingType: 'seq_aux_loss', moeAuxLossCoeff: 1e-4 });
    expect(loadRunConfig(null, base).model.moeRouterLoadBalancingType).toBe('aux_loss');
    expect(() => loadRunConfig(null, [...base, ['moe-router-load-balancing-type', 'sinkhorn']])).toThrow(
      /model\.moeRouterLoadBalancingType/,
    );
  });
});

describe('checkpoints on disk', () => {
  it('a save left unfinished is ignored with a warning, and a broken latest falls back to the previous one', async () => {
    const save = path.join(root, 'ck-broken');
    await train(
      config('broken', {
        training: { trainIters: 4, evalInterval: null },
        checkpoint: { save, saveInterval: 2 },
      }),
      { log: () => {}, report: false },
    );
    // a killed save: a temporary folder, and the newest iteration without its metadata
    fs.mkdirSync(path.join(save, 'iter_0000006.tmp-99999'));
    fs.rmSync(path.join(save, 'iter_0000004', 'metadata.json'));
    const lines: string[] = [];
    const r = await train(
      config('broken-resume', {
        training: { trainIters: 5, evalInterval: null },
        checkpoint: { load: save },
      }),
      { log: (l) => lines.push(l), report: false },
    );
    expect(
      lines.some((l) => /warning: ignoring .*iter_0000006\.tmp-99999: a save that did not finish/.test(l)),
    ).toBe(true);
    expect(lines.some((l) => /warning: skipping checkpoint .*iter_0000004/.test(l))).toBe(true);
    expect(lines.some((l) => /loaded checkpoint .* at iteration 2/.test(l))).toBe(true);
    expect(r.losses.length).toBe(3);
  });

  it("DeepSeek-V3's aux-loss-free balancing moves each router's expert bias by rate · sign(mean load − load), from the loads the metrics log", async () => {
    const hf = tinyLlama(path.join(root, 'hf-dsv3-bias'), 'deepseek-v3');
    const out = path.join(root, 'hf-dsv3-bias-out');
    const rate = 1e-3;
    await train(
      config('dsv3-bias', {
        model: { load: hf, dtype: 'fp32', moeRouterBiasUpdateRate: rate },
        training: { trainIters: 3, evalInterval: null, logInterval: 1 },
        scheduler: { lrWarmupIters: 0 },
        checkpoint: { save: path.join(root, 'ck-dsv3-bias'), exportHf: out },
      }),
      { log: () => {}, report: false },
    );
    const steps = fs
      .readFileSync(path.join(root, 'dsv3-bias', 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l))
      .filter((m) => m.kind === 'train');
    expect(steps.length).toBe(3);
    const biasOf = (dir: string, layer: string) => {
      const st = ShardedSafetensors.open(dir);
      try {
        const t = st.read(`model.layers.${layer}.mlp.gate.e_score_correction_bias`);
        return new Float32Array(
          t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength),
        );
      } finally {
        st.close();
      }
    };
    const layers = Object.keys(steps[0].moe.expertLoad);
    // decoder layers 1-3 are MoE (the first is dense), and so is the MTP block (layer 4, as
    // Hugging Face numbers it): Megatron updates every router's bias, the MTP block's too
    expect(layers).toEqual(['1', '2', '3', '4']);
    for (const layer of layers) {
      // the update of each step, replayed on the host in float32 from the logged global loads
      const want = biasOf(hf, layer);
      for (const m of steps) {
        const load = m.moe.expertLoad[layer] as number[];
        const mean = load.reduce((a, b) => a + b, 0) / load.length;
        load.forEach((l, e) => {
          want[e] = Math.fround(want[e] + rate * Math.sign(mean - l));
        });
      }
      const got = biasOf(out, layer);
      expect(Array.from(got), `layer ${layer}`).toEqual(Array.from(want));
      expect(Array.from(got), `layer ${layer} moved`).not.toEqual(Array.from(biasOf(hf, layer)));
    }
  });

  it('finetune loads the weights only and exportHf writes a Hugging Face folder', async () => {
    const save = path.join(root, 'ck-ft');
    const out = path.join(root, 'hf-out');
    const r = await train(
      config('ft', {
        training: { trainIters: 2, evalInterval: null },
        scheduler: { lrWarmupIters: 0 },
        checkpoint: { load: path.join(root, 'ck-full-fp32'), finetune: true, save, exportHf: out },
      }),
      { log: () => {}, report: false },
    );
    expect(r.iteration).toBe(2);
    expect(fs.existsSync(path.join(out, 'config.json'))).toBe(true);
    expect(fs.readdirSync(out).some((f) => f.endsWith('.safetensors'))).toBe(true);
  });
});
