// Runs driven the way Megatron run scripts drive them: the architecture flags checked before the
// run builds anything, checkpoints saved and resumed without the optimizer or RNG state
// (--no-save-optim, --no-load-optim, --no-save-rng, --no-load-rng), --load on a folder with no
// checkpoint yet (the first run of a job that restarts itself) and on a converted model (Megatron's
// release checkpoint), and the schedule flags (--lr-warmup-fraction, --lr-warmup-init, the weight
// decay ramp).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Checkpoint, convertHfToMegapatch } from '@megapatch/convert';
import { afterAll, describe, expect, it } from 'vitest';
import { loadRunConfig, parseRunConfig, type RunConfigInput, readScalarEvents, train } from '../src/index.js';
import { mergedRunConfig, patternCorpus, tempDir, tinyLlama } from './helpers.js';

const root = tempDir('mp-megatron-run-');
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
      trainIters: 6,
      logInterval: 100,
      evalInterval: null,
      seed: 7,
    },
    optimizer: { lr: 3e-3, minLr: 3e-4, weightDecay: 0.01, clipGrad: 1 },
    scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 2 },
    logging: { runDir: path.join(root, run) },
  };
  return mergedRunConfig(base, over);
}

async function run(c: ReturnType<typeof config>) {
  const lines: string[] = [];
  const r = await train(c, { log: (l) => lines.push(l), report: false });
  const metrics = fs
    .readFileSync(path.join(c.logging.runDir, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .filter((m) => m.kind === 'train');
  return {
    ...r,
    lines,
    lrs: metrics.map((m) => m.lr as number),
    iterations: metrics.map((m) => m.iteration),
  };
}

/** Every line of a run's metrics.jsonl. */
const lines = (c: ReturnType<typeof config>) =>
  fs
    .readFileSync(path.join(c.logging.runDir, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l));

const metadata = (ckpt: string, iteration: number) =>
  JSON.parse(
    fs.readFileSync(path.join(ckpt, `iter_${String(iteration).padStart(7, '0')}`, 'metadata.json'), 'utf8'),
  );

describe('Megatron run scripts', () => {
  it('checks the architecture flags against the model before building it', async () => {
    await expect(
      train(
        config('arch', {
          model: { load: hf, dtype: 'fp32', architecture: { numLayers: 4, hiddenSize: 4096 } },
        }),
      ),
    ).rejects.toThrow(
      /^--hidden-size 4096 does not describe the model: it has 64 \(.*hf\); correct the flag \(model.architecture.hiddenSize\)/,
    );
    // nothing was written: the check comes first
    expect(fs.existsSync(path.join(root, 'arch', 'metrics.jsonl'))).toBe(false);
    // a model built from its config is checked too, and flags that describe it pass
    const r = await run(
      config('arch-ok', {
        model: {
          load: hf,
          dtype: 'fp32',
          architecture: { numLayers: 4, hiddenSize: 64, swiglu: true, disableBiasLinear: true },
        },
        training: { trainIters: 3 },
      }),
    );
    expect(r.iteration).toBe(3);
  });

  it('--no-save-optim and --no-load-optim: the weights and position resume, the optimizer and schedule start fresh', async () => {
    const lean = path.join(root, 'ck-lean');
    const full = path.join(root, 'ck-full');
    await run(
      config('lean', { checkpoint: { save: lean, saveInterval: 3, noSaveOptim: true, noSaveRng: true } }),
    );
    await run(config('full', { checkpoint: { save: full, saveInterval: 3 } }));
    // no optimizer state, LR schedule or RNG in the lean checkpoint; all of them in the full one
    const m = metadata(lean, 6);
    expect(m.optimizer).toBeUndefined();
    expect(m.scheduler).toBeUndefined();
    expect(m.rng).toBeUndefined();
    expect(Object.keys(m.tensors).some((n) => n.startsWith('optimizer.'))).toBe(false);
    const f = metadata(full, 6);
    expect(f.optimizer.step).toBe(6);
    expect(f.rng).toBeDefined();
    expect(Object.keys(f.tensors).some((n) => n.startsWith('optimizer.exp_avg.'))).toBe(true);

    const more = { trainIters: 9 };
    const fromLean = await run(config('from-lean', { checkpoint: { load: lean }, training: more }));
    expect(
      fromLean.lines.some((l) =>
        /at iteration 6 .*the optimizer state and LR schedule start fresh \(the checkpoint was saved without them\)/.test(
          l,
        ),
      ),
    ).toBe(true);
    const skipOptim = await run(
      config('skip-optim', { checkpoint: { load: full, noLoadOptim: true }, training: more }),
    );
    expect(skipOptim.lines.some((l) => /start fresh \(checkpoint.noLoadOptim\)/.test(l))).toBe(true);
    const resumed = await run(config('resumed', { checkpoint: { load: full }, training: more }));
    expect(fromLean.iterations).toEqual([7, 8, 9]);
    // the same weights and data position with a fresh optimizer: the same losses, bit for bit
    expect(skipOptim.losses).toEqual(fromLean.losses);
    // a fresh LR schedule warms up again (Megatron restores the schedule with the optimizer)
    expect(fromLean.lrs[0]).toBeCloseTo(1.5e-3, 12);
    expect(resumed.lrs[0]).not.toBeCloseTo(1.5e-3, 6);
    // the optimizer's moments matter: a full resume trains differently
    expect(resumed.losses[0]).toBe(fromLean.losses[0]);
    expect(resumed.losses[1]).not.toBe(fromLean.losses[1]);
    // --override-opt_param-scheduler: this config's schedule at the checkpoint's step (56 samples at
    // iteration 7); without it the checkpoint's (decayed to its minLr 3e-4 by step 48)
    const schedule = { lrDecayStyle: 'cosine', lrWarmupIters: 2 };
    const newLr = { lr: 1e-3, minLr: 1e-4, weightDecay: 0.01, clipGrad: 1 };
    const overridden = await run(
      config('override', {
        checkpoint: { load: full },
        training: more,
        optimizer: newLr,
        scheduler: { ...schedule, overrideOptParamScheduler: true },
      }),
    );
    expect(overridden.lrs[0]).toBeCloseTo(1e-4 + 0.9e-3 * 0.5 * (1 + Math.cos((Math.PI * 40) / 56)), 12);
    const kept = await run(config('kept', { checkpoint: { load: full }, training: more, optimizer: newLr }));
    expect(kept.lrs[0]).toBeCloseTo(3e-4, 12);
    // --no-load-rng: said in the log
    const noRng = await run(
      config('no-rng', { checkpoint: { load: full, noLoadRng: true }, training: more }),
    );
    expect(
      noRng.lines.some((l) =>
        /loaded checkpoint .* at iteration 6 \(48 samples consumed\) without its RNG state$/.test(l),
      ),
    ).toBe(true);
    expect(noRng.losses).toEqual(resumed.losses);
  });

  it('--load on a folder with no checkpoint yet starts from the model; the same command then resumes', async () => {
    const ck = path.join(root, 'ck-restart');
    const job = (iters: number) =>
      config(`restart-${iters}`, {
        checkpoint: { load: ck, save: ck, saveInterval: 2 },
        training: { trainIters: iters },
        // the schedule of the whole job, as a restarted job's script states it
        scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 2, lrDecayIters: 6 },
      });
    const first = await run(job(4));
    expect(first.lines[0]).toBe(`checkpoint.load ${ck} holds no checkpoint yet: starting from ${hf}`);
    expect(first.iterations).toEqual([1, 2, 3, 4]);
    const second = await run(job(6));
    expect(
      second.lines.some((l) =>
        l.startsWith(`loaded checkpoint ${path.join(ck, 'iter_0000004')} at iteration 4`),
      ),
    ).toBe(true);
    expect(second.iterations).toEqual([5, 6]);
    // the same as one run of 6 iterations
    const straight = await run(
      config('straight-6', { checkpoint: { save: path.join(root, 'ck-straight') } }),
    );
    expect([...first.losses, ...second.losses]).toEqual(straight.losses);
    // with nothing to start from, the error says so
    const empty = path.join(root, 'ck-empty');
    fs.mkdirSync(empty);
    await expect(
      train(
        parseRunConfig({ ...config('no-source'), model: { dtype: 'fp32' }, checkpoint: { load: empty } }),
        { log: () => {} },
      ),
    ).rejects.toThrow(
      `checkpoint.load ${empty} holds no checkpoint, and there is no model.load or model.config to start from`,
    );
  });

  it('--hidden-dropout and --attention-dropout: a restarted job and recomputed layers drop what one straight run drops', async () => {
    const dropout = { hiddenDropout: 0.1, attentionDropout: 0.1 };
    const ck = path.join(root, 'ck-dropout');
    const job = (iters: number) =>
      config(`dropout-${iters}`, {
        model: dropout,
        checkpoint: { load: ck, save: ck, saveInterval: 2 },
        training: { trainIters: iters },
        scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 2, lrDecayIters: 6 },
      });
    const first = await run(job(3));
    const second = await run(job(6));
    expect(second.iterations).toEqual([4, 5, 6]);
    const straight = await run(config('dropout-straight', { model: dropout }));
    expect([...first.losses, ...second.losses]).toEqual(straight.losses);
    // recomputed layers drop what their forward dropped: --recompute-method uniform in groups of 2
    // layers, and block, give the losses of the run without recompute
    for (const [method, n] of [
      ['uniform', 2],
      ['block', 1],
    ] as const) {
      const full = { recomputeGranularity: 'full', recomputeMethod: method, recomputeNumLayers: n };
      const r = await run(config(`dropout-${method}`, { model: { ...dropout, ...full } }));
      for (let i = 0; i < 6; i++) {
        expect(
          Math.abs(r.losses[i] - straight.losses[i]) / straight.losses[i],
          `${method} step ${i + 1}`,
        ).toBeLessThan(1e-6);
      }
    }
    // and dropout changed them
    const plain = await run(config('dropout-plain'));
    for (let i = 0; i < 6; i++) expect(straight.losses[i]).not.toBe(plain.losses[i]);
  });

  it('--load of a converted model or a Hugging Face folder starts at iteration 0 from its weights, like model.load', async () => {
    const converted = path.join(root, 'converted');
    await convertHfToMegapatch({ hfDir: hf, output: converted });
    const fromConverted = await run(
      config('from-converted', { model: { dtype: 'fp32' }, checkpoint: { load: converted } }),
    );
    expect(
      fromConverted.lines.some((l) =>
        /holds no training state \(a converted model\), so the run starts at iteration 0/.test(l),
      ),
    ).toBe(true);
    const fromHf = await run(config('from-hf'));
    expect(fromConverted.iterations).toEqual([1, 2, 3, 4, 5, 6]);
    expect(fromConverted.losses).toEqual(fromHf.losses);
    // --load of a Hugging Face folder: the same
    const loadHf = await run(
      config('load-hf', { model: { load: null, dtype: 'fp32' }, checkpoint: { load: hf } }),
    );
    expect(loadHf.lines[0]).toBe(
      `checkpoint.load ${hf} is a Hugging Face model: starting from its weights at iteration 0`,
    );
    expect(loadHf.losses).toEqual(fromHf.losses);
    await expect(
      train(config('load-hf-twice', { checkpoint: { load: hf } }), { log: () => {} }),
    ).rejects.toThrow(
      `checkpoint.load ${hf} is a Hugging Face model, and model.load names another start: give one`,
    );
  });

  it("Megatron's test evaluation when the run ends: the split's test part, or --test-data-path", async () => {
    // a split with a test part: evalIters global batches of it after the last iteration
    const split = config('test-split', {
      data: { dataPath: [data], split: '80,10,10', seqLength: 32, eodTokenId: 2 },
      training: { evalInterval: 3, evalIters: 2 },
    });
    const r = await run(split);
    const test = lines(split).filter((m) => m.kind === 'test');
    expect(test).toHaveLength(1);
    expect(test[0]).toMatchObject({ iteration: 6, consumedSamples: 48 });
    expect(Number.isFinite(test[0].lmLoss)).toBe(true);
    const at = r.lines.findIndex((l) =>
      l.startsWith(' validation loss at iteration 6 on test set | lm loss value: '),
    );
    expect(at, r.lines.join('\n')).toBeGreaterThan(0);
    expect(r.lines[at - 1]).toMatch(/^-+$/);
    // the validation data once more, as test data read whole: the last validation's loss exactly
    const valid = patternCorpus(path.join(root, 'test-corpus'), 60);
    const perSplit = config('test-per-split', {
      data: {
        dataPath: null,
        trainDataPath: [data],
        validDataPath: [valid],
        testDataPath: [valid],
        seqLength: 32,
        eodTokenId: 2,
      },
      training: { evalInterval: 6, evalIters: 2 },
    });
    await run(perSplit);
    const m = lines(perSplit);
    // the validation at iteration 6 read the first 2 batches (the finished run's the next 2), as
    // the test evaluation reads its first 2
    const [first, end] = m.filter((x) => x.kind === 'valid');
    const t = m.filter((x) => x.kind === 'test');
    expect([first.iteration, end.iteration]).toEqual([6, 6]);
    expect(end.lmLoss).not.toBe(first.lmLoss);
    expect(t.map((x) => [x.iteration, x.lmLoss])).toEqual([[6, first.lmLoss]]);
    // no test part, no test evaluation
    const none = config('no-test', { training: { evalInterval: 3, evalIters: 2 } });
    await run(none);
    expect(lines(none).filter((x) => x.kind === 'test')).toEqual([]);
    expect(() => config('bad', { data: { dataPath: [data], testDataPath: [valid], seqLength: 32 } })).toThrow(
      /data.testDataPath: goes with data.trainDataPath/,
    );
  });

  it("each evaluation reads the next validation batches (Megatron's consumed_valid_samples), across a restart too", async () => {
    const ck = path.join(root, 'ck-valid');
    const job = (iters: number, run: string, save: string | null) =>
      config(run, {
        ...(save ? { checkpoint: { load: save, save, saveInterval: 2 } } : {}),
        training: { trainIters: iters, evalInterval: 2, evalIters: 1 },
        scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 2, lrDecayIters: 6 },
      });
    const straight = job(6, 'valid-straight', null);
    await run(straight);
    const valid = (c: ReturnType<typeof config>) =>
      lines(c)
        .filter((m) => m.kind === 'valid')
        .map((m) => [m.iteration, m.lmLoss]);
    const all = valid(straight);
    // iterations 2, 4, 6 and the finished run's: four batches, four losses
    expect(all.map(([i]) => i)).toEqual([2, 4, 6, 6]);
    expect(new Set(all.map(([, l]) => l)).size).toBe(4);
    const first = job(4, 'valid-first', ck);
    await run(first);
    const second = job(6, 'valid-second', ck);
    await run(second);
    // the first job's periodic validations, then the resumed job's: the straight run's exactly
    // (the first job's own finished-run validation read a batch the checkpoint did not count)
    expect([...valid(first).slice(0, 2), ...valid(second)]).toEqual(all);
  });

  it('--train-data-path and --valid-data-path: each read whole, no split', async () => {
    const valid = patternCorpus(path.join(root, 'valid-corpus'), 60);
    const perSplit = config('per-split', {
      data: { dataPath: null, trainDataPath: [data], validDataPath: [valid], seqLength: 32, eodTokenId: 2 },
      training: { evalInterval: 3, evalIters: 2 },
    });
    const r = await run(perSplit);
    // the training data is all of it: the losses of dataPath with the split 100,0,0
    const whole = await run(
      config('whole', { data: { dataPath: [data], split: '100,0,0', seqLength: 32, eodTokenId: 2 } }),
    );
    expect(r.losses).toEqual(whole.losses);
    const validations = lines(perSplit).filter((m) => m.kind === 'valid');
    expect(validations.map((m) => m.iteration)).toEqual([3, 6, 6]);
    // the validation data is the other corpus, whole: 60 documents of 20-50 tokens give more than 2 × 8 samples
    expect(validations.every((m) => Number.isFinite(m.lmLoss))).toBe(true);
    // no --valid-data-path: no validation
    const noValid = config('no-valid', {
      data: { dataPath: null, trainDataPath: [data], seqLength: 32, eodTokenId: 2 },
      training: { evalInterval: 3, evalIters: 2 },
    });
    await run(noValid);
    expect(lines(noValid).filter((m) => m.kind === 'valid')).toEqual([]);
    expect(() =>
      config('bad', { data: { dataPath: [data], validDataPath: [valid], seqLength: 32 } }),
    ).toThrow(/data.validDataPath: goes with data.trainDataPath/);
    expect(() => config('bad', { data: { dataPath: [data], trainDataPath: [data], seqLength: 32 } })).toThrow(
      /data: give exactly one of data.dataPath .*, data.trainDataPath .* and data.sft/,
    );
  });

  it("--tensorboard-dir: the metrics as TensorBoard events, under Megatron's tags", async () => {
    const tb = path.join(root, 'tb');
    const c = config('tb-run', {
      logging: { runDir: path.join(root, 'tb-run'), tensorboardDir: tb },
      training: { evalInterval: 3, evalIters: 1 },
    });
    await run(c);
    const files = fs.readdirSync(tb);
    expect(files.length).toBe(1);
    expect(files[0]).toMatch(/^events\.out\.tfevents\.\d{10}\./);
    const events = readScalarEvents(path.join(tb, files[0]));
    const metrics = fs
      .readFileSync(path.join(root, 'tb-run', 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    const series = (tag: string) => events.filter((e) => e.tag === tag).map((e) => [e.step, e.value]);
    const train = metrics.filter((m) => m.kind === 'train');
    expect(series('lm loss')).toEqual(train.map((m) => [m.iteration, Math.fround(m.lmLoss)]));
    expect(series('learning-rate')).toEqual(train.map((m) => [m.iteration, Math.fround(m.lr)]));
    expect(series('grad-norm')).toEqual(train.map((m) => [m.iteration, Math.fround(m.gradNorm)]));
    expect(series('batch-size')).toEqual(train.map((m) => [m.iteration, 8]));
    expect(series('lm loss validation')).toEqual(
      metrics.filter((m) => m.kind === 'valid').map((m) => [m.iteration, Math.fround(m.lmLoss)]),
    );
    expect(series('lm loss validation').map(([s]) => s)).toEqual([3, 6, 6]);
    // Megatron's "vs samples" twins: the same values against the consumed samples (8 an iteration)
    expect(series('lm loss vs samples')).toEqual(
      train.map((m) => [m.consumedSamples, Math.fround(m.lmLoss)]),
    );
    expect(series('learning-rate vs samples').map(([s]) => s)).toEqual([8, 16, 24, 32, 40, 48]);
    for (const tag of [
      'grad-norm',
      'batch-size',
      'loss-scale',
      'lm loss validation',
      'lm loss validation ppl',
    ]) {
      expect(
        series(`${tag} vs samples`).map(([, v]) => v),
        tag,
      ).toEqual(series(tag).map(([, v]) => v));
    }
    expect(series('lm loss validation vs samples').map(([s]) => s)).toEqual([24, 48, 48]);
    expect(series('iteration-time vs samples')).toEqual([]);
    // a command line with --tensorboard-dir and no run folder writes the run there
    const fromFlags = loadRunConfig(null, [
      ['model.load', hf],
      ['data-path', data],
      ['seq-length', '32'],
      ['global-batch-size', '8'],
      ['train-iters', '2'],
      ['lr', '1e-3'],
      ['tensorboard-dir', path.join(root, 'tb-flags')],
    ]);
    expect(fromFlags.logging).toEqual({
      runDir: path.join(root, 'tb-flags'),
      tensorboardDir: path.join(root, 'tb-flags'),
    });
  });

  it('--decoupled-lr: the embedding and output layer on their own schedule', async () => {
    // a decoupled rate equal to the other: the same run, bit for bit
    const base = await run(config('dec-base'));
    const same = await run(
      config('dec-same', {
        optimizer: { lr: 3e-3, minLr: 3e-4, weightDecay: 0.01, clipGrad: 1, decoupledLr: 3e-3 },
      }),
    );
    expect(same.losses).toEqual(base.losses);
    // a decoupled rate of 0: the (tied) embedding stays as loaded, everything else trains
    const ck = path.join(root, 'ck-dec');
    const frozen = await run(
      config('dec-frozen', {
        optimizer: {
          lr: 3e-3,
          minLr: 3e-4,
          weightDecay: 0.01,
          clipGrad: 1,
          decoupledLr: 0,
          decoupledMinLr: 0,
        },
        checkpoint: { save: ck },
      }),
    );
    expect(
      frozen.lines.some((l) =>
        /learning rate: 1\.500000E-03 \| decoupled learning rate: 0\.000000E\+00 \|/.test(l),
      ),
    ).toBe(true);
    const converted = path.join(root, 'dec-initial');
    await convertHfToMegapatch({ hfDir: hf, output: converted });
    const initial = Checkpoint.open(converted);
    const trained = Checkpoint.open(ck);
    const whole = (c: Checkpoint, name: string) => Buffer.from(c.read(name));
    expect(
      whole(trained, 'embedding.word_embeddings.weight').equals(
        whole(initial, 'embedding.word_embeddings.weight'),
      ),
    ).toBe(true);
    const fc1 = 'decoder.layers.0.mlp.linear_fc1.weight';
    expect(whole(trained, fc1).equals(whole(initial, fc1))).toBe(false);
    initial.close();
    trained.close();
    expect(() => config('dec-bad', { optimizer: { lr: 3e-3, minLr: 3e-4, decoupledLr: 1e-4 } })).toThrow(
      /optimizer.decoupledMinLr: 0.0003 \(minLr\) is above optimizer.decoupledLr \(0.0001\)/,
    );
  });

  it('--train-samples, --lr-decay-samples and --lr-warmup-samples: the run and schedule counted in samples', async () => {
    // whole batches: the iteration-based run of 6 × 8 samples with a 2-iteration warm-up, bit for bit
    const iters = await run(config('by-iters'));
    const samples = await run(
      config('by-samples', {
        training: { trainIters: null, trainSamples: 48, logInterval: 6 },
        scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 0, lrWarmupSamples: 16 },
      }),
    );
    expect(samples.iterations).toEqual([1, 2, 3, 4, 5, 6]);
    expect(samples.losses).toEqual(iters.losses);
    expect(samples.lrs).toEqual(iters.lrs);
    expect(samples.lines.some((l) => /iteration\s+6\/\s+6 \|/.test(l))).toBe(true);
    // counts that are not whole batches: 52 samples make 6 iterations; the schedule runs in samples
    // (Megatron's get_lr at 8, 16, ..., 48 samples: warm-up to 12, cosine to 44, then minLr)
    const odd = await run(
      config('odd-samples', {
        training: { trainIters: null, trainSamples: 52 },
        scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 0, lrWarmupSamples: 12, lrDecaySamples: 44 },
      }),
    );
    expect(odd.iterations).toEqual([1, 2, 3, 4, 5, 6]);
    const lr = (n: number) => {
      if (n <= 12) return (3e-3 * n) / 12;
      if (n > 44) return 3e-4;
      return 3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + Math.cos((Math.PI * (n - 12)) / (44 - 12)));
    };
    for (const [i, x] of odd.lrs.entries()) expect(x, `iteration ${i + 1}`).toBeCloseTo(lr(8 * (i + 1)), 12);
  });

  it('--rampup-batch-size: the global batch grows over the first samples, the schedule counts them', async () => {
    const schedule = { lrDecayStyle: 'cosine', lrWarmupIters: 0, lrWarmupSamples: 8 };
    const tb = path.join(root, 'tb-ramp');
    // 4 samples a step up to 16 samples, then 8: 4 + 4 + 4 + 4 + 4 × 8 = 48 samples in 8 iterations
    const ramp = config('ramp', {
      training: { trainIters: null, trainSamples: 48, rampupBatchSize: [4, 4, 16], logInterval: 1 },
      scheduler: schedule,
      logging: { runDir: path.join(root, 'ramp'), tensorboardDir: tb },
    });
    const r = await run(ramp);
    const m = lines(ramp).filter((x) => x.kind === 'train');
    expect(m.map((x) => x.globalBatchSize)).toEqual([4, 4, 4, 4, 8, 8, 8, 8]);
    expect(m.map((x) => x.consumedSamples)).toEqual([4, 8, 12, 16, 24, 32, 40, 48]);
    expect(r.lines.filter((l) => l.includes('global batch size:     4 |'))).toHaveLength(4);
    expect(
      r.lines.some((l) =>
        /iteration\s+8\/\s+8 \| consumed samples:\s+48 \|.*global batch size:\s+8 \|/.test(l),
      ),
    ).toBe(true);
    const events = readScalarEvents(path.join(tb, fs.readdirSync(tb)[0]));
    expect(events.filter((e) => e.tag === 'batch-size').map((e) => e.value)).toEqual([
      4, 4, 4, 4, 8, 8, 8, 8,
    ]);
    // the first four steps are those of a run with a global batch of 4 (the same samples, the same
    // learning rates: the schedule advances by the samples of each step), bit for bit
    const four = await run(
      config('four', {
        training: { trainIters: null, trainSamples: 48, globalBatchSize: 4 },
        scheduler: schedule,
      }),
    );
    expect(r.losses.slice(0, 4)).toEqual(four.losses.slice(0, 4));
    expect(r.lrs.slice(0, 4)).toEqual(four.lrs.slice(0, 4));
    expect(r.losses[4]).not.toBe(four.losses[4]);
  });

  it('--lr-warmup-fraction, --lr-warmup-init and the weight-decay ramp', async () => {
    // warm-up over a quarter of 8 decay iterations (2 iterations = 16 samples), from 1e-4
    const r = await run(
      config('warmup', {
        scheduler: {
          lrDecayStyle: 'cosine',
          lrWarmupIters: 0,
          lrWarmupFraction: 0.25,
          lrWarmupInit: 1e-4,
          lrDecayIters: 8,
        },
      }),
    );
    expect(r.lrs[0]).toBeCloseTo(1e-4 + (3e-3 - 1e-4) * 0.5, 12);
    expect(r.lrs[1]).toBeCloseTo(3e-3, 12);
    expect(r.lrs[2]).toBeCloseTo(3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + Math.cos(Math.PI / 6)), 12);
    // a constant weight-decay schedule is the plain weight decay, bit for bit (norms still undecayed)
    const plain = await run(
      config('wd-plain', { optimizer: { lr: 3e-3, minLr: 3e-4, weightDecay: 0.3, clipGrad: 1 } }),
    );
    const constant = await run(
      config('wd-constant', {
        optimizer: {
          lr: 3e-3,
          minLr: 3e-4,
          weightDecay: 0.01,
          startWeightDecay: 0.3,
          endWeightDecay: 0.3,
          clipGrad: 1,
        },
      }),
    );
    expect(constant.losses).toEqual(plain.losses);
    const ramp = await run(
      config('wd-ramp', {
        optimizer: {
          lr: 3e-3,
          minLr: 3e-4,
          startWeightDecay: 0,
          endWeightDecay: 0.3,
          weightDecayIncrStyle: 'linear',
          clipGrad: 1,
        },
      }),
    );
    const none = await run(
      config('wd-none', { optimizer: { lr: 3e-3, minLr: 3e-4, weightDecay: 0, clipGrad: 1 } }),
    );
    // the ramp starts at 0: the first step's update equals no decay's, later ones differ from both
    expect(ramp.losses[1]).toBe(none.losses[1]);
    expect(ramp.losses[5]).not.toBe(none.losses[5]);
    expect(ramp.losses[5]).not.toBe(plain.losses[5]);
  });
});
