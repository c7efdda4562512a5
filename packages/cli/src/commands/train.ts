// `megapatch train --config run.yaml [--section.key value ...]`: trains with @megapatch/train. The
// config file holds the run (Megatron's argument names in camelCase, by section); dotted flags
// override single keys, and a misspelled one names the nearest valid key. Under `megapatch launch
// --nproc-per-node N -- megapatch train ...` the workers form the data/tensor-parallel job.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Command } from '../command.js';
import { UsageError } from '../errors.js';

const NAME = 'train';

const command: Command = {
  name: NAME,
  summary: 'pre-train or fine-tune a model from a run config (Megatron semantics)',
  description:
    'Reads the run config (YAML or JSON: model, data, training, optimizer, scheduler, parallel, ' +
    'checkpoint and logging sections; an rl section trains with GRPO from prompts and a reward, a dpo section ' +
    'with DPO on preference pairs, instead of a data source), applies --section.key value overrides, and trains: one ' +
    'Megatron-style line per logInterval, every metric of every iteration in <runDir>/metrics.jsonl, ' +
    'checkpoints every saveInterval. Megatron long flags set their key too (--train-iters, --lr, ' +
    '--load, --save, --finetune, --bf16, --tensor-model-parallel-size, --data-path, --export-hf), so a ' +
    "Megatron or Pai-Megatron-Patch run script's command line runs as it is: its architecture flags " +
    "(--num-layers, --hidden-size, ...) are checked against the model's config, implementation choices " +
    '(--transformer-impl, --overlap-grad-reduce, ...) are accepted and named on stderr, features megapatch ' +
    'lacks (--fp8-format, ...) are refused. SIGINT or SIGTERM saves a checkpoint (when checkpoint.save is set) ' +
    'after the iteration in progress, however long the save takes, and exits (a second signal ' +
    'stops at once; MEGAPATCH_STOP_GRACE_S limits the wait). Start several processes with megapatch launch.',
  options: {
    config: { type: 'string', value: 'FILE', description: 'the run config (.yaml, .yml or .json)' },
  },
  dottedOverrides: true,
  // a first SIGINT/SIGTERM lets the iteration finish and the checkpoint be written, however long
  // that takes (a large model's save takes more than the default 10 s); a second stops at once
  stopGraceMs: null,
  examples: [
    'train --config examples/llama3/tiny-pretrain.yaml',
    'train --config run.yaml --training.trainIters 100 --optimizer.lr 1e-4',
    'train --config run.yaml --load ckpt --finetune --lr 1e-5 --export-hf out-hf',
    'train --load qwen3-hf --save ck --data-path data_text_document --seq-length 4096 --num-layers 28 --hidden-size 1024 --train-iters 500 --lr 1e-5 --global-batch-size 64 --tensorboard-dir runs/q',
    'launch --nproc-per-node 2 -- megapatch train --config run.yaml',
    'train --config examples/grpo/stories-grpo.yaml --rl.groupSize 4 --rl.klLossCoef 0.05',
  ],
  async run({ options, overrides, io }) {
    const file = typeof options.config === 'string' ? options.config : null;
    if (!file && (overrides ?? []).length === 0) {
      throw new UsageError('give --config FILE (and optionally --section.key value overrides)', NAME);
    }
    const { loadRunConfig, resolveOverride, TrainError, train } = await import('@megapatch/train');
    // a flag that names no config key is a usage error (exit 2), like any unknown option
    for (const [flag, value] of overrides ?? []) {
      try {
        resolveOverride(flag, value);
      } catch (e) {
        if (e instanceof TrainError && e.code === 'UNKNOWN_KEY') {
          const hint = e.message.includes('(did you mean') ? '' : `; see megapatch help ${NAME}`;
          throw new UsageError(`${e.message}${hint}`, NAME);
        }
        // a Megatron flag for a feature megapatch lacks (--fp8-format, --optimizer sgd)
        if (e instanceof TrainError && e.code === 'UNSUPPORTED') throw new UsageError(e.message, NAME);
        throw e;
      }
    }
    const config = loadRunConfig(file, overrides ?? [], { notice: (line) => io.note(line) });
    // the first SIGINT/SIGTERM stops the run after the current iteration (saving a checkpoint)
    const stop = new AbortController();
    io.signal.addEventListener('abort', () => stop.abort(), { once: true });
    // A second signal (or a run that does not stop in time) exits at once: remove this process's
    // unfinished checkpoint folder then, so nothing half-written is left.
    const save = config.checkpoint.save;
    const remove = io.onHardStop(() => {
      if (!save || !fs.existsSync(save)) return;
      for (const f of fs.readdirSync(save)) {
        if (f.endsWith(`.tmp-${process.pid}`))
          fs.rmSync(path.join(save, f), { recursive: true, force: true });
      }
    });
    let r: Awaited<ReturnType<typeof train>>;
    try {
      r = await train(config, { log: (line) => io.out.log(line), signal: stop.signal });
    } finally {
      remove();
    }
    if (r.exitReason === 'signal') {
      io.note(`stopped at iteration ${r.iteration}${save ? `; checkpoint saved in ${save}` : ''}`);
      io.throwIfStopped(); // exit 130 / 143, as for any interrupted command
    }
  },
};

export default command;
