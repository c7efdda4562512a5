// `megapatch train` through the real binary: a YAML run config with dotted overrides, a misspelled
// key named with its nearest valid one, and SIGTERM saving a checkpoint the next run resumes from.
import type { ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { IndexedDatasetBuilder } from '@megapatch/data';
import { afterAll, describe, expect, it } from 'vitest';
import { finished, megapatch, pathWithMegapatch, startMegapatch, tempDir, waitFor } from './helpers.js';

const root = tempDir('mp-cli-train');
const running: ChildProcess[] = [];
afterAll(() => {
  // a run left behind by a failed test must not keep the machine busy
  for (const c of running) if (c.exitCode === null) c.kill('SIGKILL');
  fs.rmSync(root, { recursive: true, force: true });
});
const hf = path.join(root, 'hf');
writeSyntheticHfCheckpoint(
  hf,
  SYNTHETIC_MODELS.find((m) => m.id === 'llama-tied')?.config as Record<string, unknown>,
  {
    dtype: 'F32',
  },
);
const corpus = path.join(root, 'corpus');
{
  const b = new IndexedDatasetBuilder(corpus, { dtype: 'uint16' });
  for (let d = 0; d < 300; d++)
    b.addDocument([...Array.from({ length: 30 }, (_, i) => 10 + ((d * 7 + i * 3) % 600)), 2]);
  b.finalize();
}

function writeConfig(name: string, extra = ''): string {
  const file = path.join(root, `${name}.yaml`);
  fs.writeFileSync(
    file,
    `model:
  load: ${hf}
  dtype: fp32
data:
  dataPath: [${corpus}]
  seqLength: 32
  split: "95,5,0"
  eodTokenId: 2
training:
  microBatchSize: 2
  globalBatchSize: 4
  trainIters: 6
  logInterval: 2
  evalInterval: null
optimizer:
  lr: 0.002
logging:
  runDir: ${path.join(root, `run-${name}`)}
${extra}`,
  );
  return file;
}

describe('megapatch train', () => {
  it('trains from a YAML config with dotted overrides and logs Megatron lines', () => {
    const r = megapatch([
      'train',
      '--config',
      writeConfig('a'),
      '--training.trainIters',
      '4',
      '--optimizer.lr=0.003',
    ]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/iteration\s+4\/\s*4 \| consumed samples:\s+16 \|/);
    expect(r.stdout).toMatch(/learning rate: 3\.000000E-03|learning rate: [0-9.]+E-0[34]/);
    const metrics = fs
      .readFileSync(path.join(root, 'run-a', 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n');
    expect(metrics.length).toBe(4);
  });

  it('names the nearest key of a misspelled override or config key', () => {
    const r = megapatch(['train', '--config', writeConfig('b'), '--training.trainIter', '4']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/unknown key --training\.trainIter \(did you mean --training\.trainIters\?\)/);
    const bad = megapatch(['train', '--config', writeConfig('c', 'optimiser:\n  lr: 1\n')]);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/unknown key optimiser \(did you mean optimizer\?\)/);
  });

  it("accepts Megatron's long flag names and names the nearest of a misspelled one", () => {
    const r = megapatch([
      'train',
      '--config',
      writeConfig('m'),
      '--train-iters',
      '2',
      '--lr=0.001',
      '--log-interval',
      '1',
      '--data-path',
      corpus,
      '--use-distributed-optimizer',
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/iteration\s+1\/\s*2 \|.*learning rate: 5\.000000E-04/);
    const bad = megapatch(['train', '--config', writeConfig('n'), '--train-iter', '2']);
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/unknown option --train-iter \(did you mean --train-iters\?\)/);
  });

  it("runs a Megatron / Pai-Megatron-Patch script's command line as it is", () => {
    // the flags of Pai-Megatron-Patch's run_mcore_*.sh (no megapatch key among them)
    const run = path.join(root, 'run-script');
    const save = path.join(root, 'ckpt-script');
    const script = `--load ${hf} --save ${save} --data-path ${corpus} --split 95,5,0 --dataset MMAP
      --seq-length 32 --max-position-embeddings 256 --micro-batch-size 2 --global-batch-size 4
      --train-iters 4 --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 1
      --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.008
      --attention-dropout 0.0 --hidden-dropout 0.1 --log-interval 1 --log-throughput
      --eval-interval 10000 --eval-iters 1 --save-interval 2 --tensorboard-dir ${run}
      --tensorboard-queue-size 1 --log-timers-to-tensorboard --tensor-model-parallel-size 1
      --pipeline-model-parallel-size 1 --no-load-optim --no-load-rng --no-save-optim --num-workers 8
      --patch-tokenizer-type LLamaTokenizer --extra-vocab-size 0 --num-layers 4 --hidden-size 64
      --num-attention-heads 4 --ffn-hidden-size 128 --swiglu --normalization RMSNorm --norm-epsilon 1e-5
      --use-rotary-position-embeddings --position-embedding-type rope --rotary-base 10000
      --disable-bias-linear --ckpt-format torch_dist --transformer-impl transformer_engine
      --cross-entropy-loss-fusion --recompute-activations --use-distributed-optimizer
      --overlap-grad-reduce --overlap-param-gather --train-mode pretrain`
      .split(/\s+/)
      .filter(Boolean);
    const r = megapatch(['train', ...script]);
    expect(r.status, r.stderr).toBe(0);
    // one line says what megapatch needed nothing for
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(
      /^Megatron flags megapatch needs nothing for: --dataset \(pre-training reads Megatron indexed datasets\); .*--transformer-impl \(megapatch has one implementation of each layer\)/,
    );
    // the dropout flags are settings of their own (the run drops 10% of the hidden states)
    expect(r.stderr).not.toContain('dropout');
    const used = JSON.parse(fs.readFileSync(path.join(run, 'config.json'), 'utf8'));
    expect(used.model).toMatchObject({ hiddenDropout: 0.1, attentionDropout: 0 });
    expect(r.stdout).toContain(
      `checkpoint.load ${hf} is a Hugging Face model: starting from its weights at iteration 0`,
    );
    expect(r.stdout).toMatch(/iteration\s+4\/\s*4 \|/);
    // metrics and report where the script keeps its TensorBoard events; checkpoints without optimizer state
    expect(
      fs.readFileSync(path.join(run, 'metrics.jsonl'), 'utf8').trim().split('\n').length,
    ).toBeGreaterThanOrEqual(4);
    // and TensorBoard's event file beside them
    expect(fs.readdirSync(run).filter((f) => f.startsWith('events.out.tfevents.')).length).toBe(1);
    const meta = JSON.parse(fs.readFileSync(path.join(save, 'iter_0000004', 'metadata.json'), 'utf8'));
    expect(meta.optimizer).toBeUndefined();
    // a flag that states another model stops the run before it starts (exit 1)
    const wrong = megapatch(['train', ...script.map((w) => (w === '64' ? '4096' : w))]);
    expect(wrong.status).toBe(1);
    expect(wrong.stderr).toMatch(
      /--hidden-size 4096 does not describe the model: it has 64 \(.*hf\); correct the flag/,
    );
    // a feature megapatch lacks is a usage error naming why (exit 2)
    const fp8 = megapatch(['train', ...script, '--fp8-format', 'hybrid', '--fp8-recipe', 'blockwise']);
    expect(fp8.status).toBe(2);
    expect(fp8.stderr).toMatch(
      /--fp8-format: megapatch trains in bf16, fp16 or fp32: there is no FP8 training/,
    );
  });

  it('SIGTERM saves a checkpoint and exits 143; the next run resumes from it', async () => {
    const save = path.join(root, 'ckpt');
    const cfg = writeConfig('d', `checkpoint:\n  save: ${save}\n`);
    const child = startMegapatch([
      'train',
      '--config',
      cfg,
      '--training.trainIters',
      '100000',
      '--training.logInterval',
      '1',
    ]);
    let out = '';
    child.stdout?.on('data', (d) => (out += d));
    const done = finished(child);
    await waitFor(() => /iteration\s+3\//.test(out), 60_000, 'three iterations');
    child.kill('SIGTERM');
    const r = await done;
    expect(r.status).toBe(143);
    expect(r.stderr).toMatch(/stopped at iteration \d+; checkpoint saved in/);
    const iteration = Number(fs.readFileSync(path.join(save, 'latest_checkpointed_iteration.txt'), 'utf8'));
    expect(iteration).toBeGreaterThanOrEqual(3);
    expect(fs.readdirSync(save).filter((f) => f.includes('.tmp-'))).toEqual([]);
    const again = megapatch([
      'train',
      '--config',
      cfg,
      '--load',
      save,
      '--train-iters',
      String(iteration + 2),
      // every iteration logged: the interrupted one may be odd (the config logs every 2nd)
      '--log-interval',
      '1',
      '--logging.runDir',
      path.join(root, 'run-d2'),
    ]);
    expect(again.status, again.stderr).toBe(0);
    expect(again.stdout).toMatch(new RegExp(`iteration\\s+${iteration + 2}/`));
    expect(again.stdout).toMatch(new RegExp(`loaded checkpoint .* at iteration ${iteration}`));
  });
  it('under megapatch launch --nproc-per-node 2 (DP=2) logs the losses of one process, once', () => {
    const env = { PATH: pathWithMegapatch(root) };
    const lmLosses = (runDir: string) =>
      fs
        .readFileSync(path.join(root, runDir, 'metrics.jsonl'), 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l))
        .filter((m) => m.kind === 'train')
        .map((m) => m.lmLoss as number);
    const one = megapatch([
      'train',
      '--config',
      writeConfig('l1'),
      '--train-iters',
      '4',
      '--log-interval',
      '1',
    ]);
    expect(one.status, one.stderr).toBe(0);
    const two = megapatch(
      [
        'launch',
        '--nproc-per-node',
        '2',
        '--',
        'megapatch',
        'train',
        '--config',
        writeConfig('l2'),
        '--train-iters',
        '4',
        '--log-interval',
        '1',
      ],
      env,
    );
    expect(two.status, two.stderr).toBe(0);
    // rank 0 logs; each line once
    expect(two.stdout.match(/iteration\s+4\/\s*4 \|/g)).toHaveLength(1);
    expect(two.stdout).toMatch(/\[rank0\]: .*iteration\s+1\//);
    const a = lmLosses('run-l1');
    const b = lmLosses('run-l2');
    expect(b).toHaveLength(4);
    for (let i = 0; i < 4; i++) expect(Math.abs(b[i] - a[i]) / a[i], `step ${i + 1}`).toBeLessThan(1e-5);
  });

  it('checks the layout before training, with errors that say how to fix it', () => {
    const env = { PATH: pathWithMegapatch(root) };
    const launch = (...flags: string[]) =>
      megapatch(
        [
          'launch',
          '--nproc-per-node',
          '2',
          '--',
          'megapatch',
          'train',
          '--config',
          writeConfig('lay'),
          ...flags,
        ],
        env,
      );
    const tp = launch('--tensor-model-parallel-size', '3');
    expect(tp.status).not.toBe(0);
    expect(tp.stderr).toMatch(
      /world size 2 is not divisible by tp 3 × pp 1 × cp 1 = 3; use a world size that is a multiple of 3/,
    );
    const cp = launch('--context-parallel-size', '2', '--seq-length', '30');
    expect(cp.status).not.toBe(0);
    expect(cp.stderr).toMatch(/data\.seqLength 30 is not a multiple of 2 × contextParallelSize \(4\)/);
    const reset = launch('--context-parallel-size', '2', '--reset-attention-mask');
    expect(reset.status).not.toBe(0);
    expect(reset.stderr).toMatch(
      /data\.resetAttentionMask packs pretraining documents of any length, but contextParallelSize 2 needs each packed sample to be a multiple of 4 tokens/,
    );
    const ep = launch('--expert-model-parallel-size', '2');
    expect(ep.status).not.toBe(0);
    expect(ep.stderr).toMatch(/ep=2 needs a MoE model; this one is dense \(set expertModelParallelSize 1\)/);
  });

  it('a save killed with SIGKILL is skipped on load: the run resumes from the previous checkpoint', async () => {
    // Saves every iteration; the run is killed the moment a save's temporary folder appears. A
    // save can finish between the poll and the kill, so a few runs are tried until one leaves an
    // unfinished save behind.
    let caught = false;
    for (let attempt = 0; attempt < 6 && !caught; attempt++) {
      const save = path.join(root, `ck-kill-${attempt}`);
      const child = startMegapatch([
        'train',
        '--config',
        writeConfig(`k${attempt}`),
        '--save',
        save,
        '--save-interval',
        '1',
        '--train-iters',
        '100000',
        '--log-interval',
        '1',
      ]);
      running.push(child);
      const done = finished(child);
      const tmp = () => (fs.existsSync(save) ? fs.readdirSync(save).filter((f) => f.includes('.tmp-')) : []);
      await waitFor(
        () => tmp().length > 0 && fs.existsSync(path.join(save, 'latest_checkpointed_iteration.txt')),
        60_000,
        'a save under way',
      );
      child.kill('SIGKILL');
      await done;
      const left = tmp();
      if (left.length === 0) continue;
      caught = true;
      const latest = Number(fs.readFileSync(path.join(save, 'latest_checkpointed_iteration.txt'), 'utf8'));
      const r = megapatch([
        'train',
        '--config',
        writeConfig(`k${attempt}-resume`),
        '--load',
        save,
        '--train-iters',
        String(latest + 1),
        '--log-interval',
        '1',
      ]);
      expect(r.status, r.stderr).toBe(0);
      const out = r.stdout + r.stderr;
      expect(out).toMatch(
        new RegExp(`warning: ignoring .*${left[0].replaceAll('.', '\\.')}: a save that did not finish`),
      );
      expect(out).toMatch(new RegExp(`loaded checkpoint .* at iteration ${latest}`));
      expect(out).toMatch(new RegExp(`iteration\\s+${latest + 1}/`));
    }
    expect(caught, 'no run was killed during a save').toBe(true);
  }, 180_000);
});
