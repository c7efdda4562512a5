#!/usr/bin/env node
// tiny-gpt: trains a small GPT on the CPU. With no arguments it learns 2-digit addition, which it
// generates itself, and ends by solving held-out problems; with --text FILE it trains a
// character-level model on that file and prints a sample.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { backendInfo, manualSeed, memoryStats, setNumThreads } from '@megapatch/tensor';
import { z } from 'zod';
import { GPT } from './model.js';
import { additionTask, rng, sortTask, type Task, textTask } from './tasks.js';
import { evaluatePuzzle, sampleText, train, validationLoss } from './train.js';

const Args = z.object({
  task: z.enum(['add', 'sort']).default('add'),
  text: z.string().optional(),
  iters: z.coerce.number().int().positive().optional(),
  batchSize: z.coerce.number().int().positive().optional(),
  lr: z.coerce.number().positive().optional(),
  layers: z.coerce.number().int().positive().optional(),
  hidden: z.coerce.number().int().positive().optional(),
  heads: z.coerce.number().int().positive().optional(),
  seqLength: z.coerce.number().int().positive().default(128),
  logInterval: z.coerce.number().int().positive().optional(),
  seed: z.coerce.number().int().default(1234),
  threads: z.coerce.number().int().positive().optional(),
  recompute: z.boolean().default(false),
});

const HELP = `usage: tiny-gpt [--task add|sort] [--text FILE] [options]

  --task add|sort      generated task when no --text is given (default add: 2-digit addition)
  --text FILE          train a character-level model on FILE and print a sample
  --iters N            optimizer steps
  --batch-size N       sequences per step
  --lr X               peak learning rate (warm-up then cosine decay to lr/10)
  --layers N --hidden N --heads N    model size
  --seq-length N       context length for --text (default 128)
  --log-interval N     iterations per log line
  --seed N             seed of initialisation and data sampling
  --threads N          native threads (default: MEGAPATCH_NUM_THREADS or all cores)
  --recompute          recompute activations in backward (activation checkpointing)`;

function parse(argv: string[]): z.output<typeof Args> {
  const { values } = parseArgs({
    args: argv,
    options: {
      task: { type: 'string' },
      text: { type: 'string' },
      iters: { type: 'string' },
      'batch-size': { type: 'string' },
      lr: { type: 'string' },
      layers: { type: 'string' },
      hidden: { type: 'string' },
      heads: { type: 'string' },
      'seq-length': { type: 'string' },
      'log-interval': { type: 'string' },
      seed: { type: 'string' },
      threads: { type: 'string' },
      recompute: { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log(HELP);
    process.exit(0);
  }
  const r = Args.safeParse({
    task: values.task,
    text: values.text,
    iters: values.iters,
    batchSize: values['batch-size'],
    lr: values.lr,
    layers: values.layers,
    hidden: values.hidden,
    heads: values.heads,
    seqLength: values['seq-length'],
    logInterval: values['log-interval'],
    seed: values.seed,
    threads: values.threads,
    recompute: values.recompute,
  });
  if (!r.success) {
    const issues = r.error.issues.map((i) => `  --${i.path.join('.')}: ${i.message}`).join('\n');
    console.error(`tiny-gpt: invalid arguments\n${issues}\n\n${HELP}`);
    process.exit(2);
  }
  return r.data;
}

interface TaskDefaults {
  iters: number;
  batchSize: number;
  lr: number;
  /** Warm-up is a tenth of the run, at most this many iterations. */
  maxWarmup: number;
  logInterval: number;
}

/** Trains with the command-line settings, falling back to the task's defaults. */
function trainWith(
  model: GPT,
  task: Task,
  args: z.output<typeof Args>,
  d: TaskDefaults,
  random: () => number,
): void {
  const iters = args.iters ?? d.iters;
  const lr = args.lr ?? d.lr;
  train(
    model,
    task,
    {
      iters,
      batchSize: args.batchSize ?? d.batchSize,
      lr,
      minLr: lr / 10,
      warmupIters: Math.min(d.maxWarmup, Math.floor(iters / 10)),
      weightDecay: 0.1,
      clipGrad: 1.0,
      logInterval: args.logInterval ?? d.logInterval,
      seed: args.seed,
    },
    random,
  );
}

function main(): void {
  const args = parse(process.argv.slice(2));
  if (args.threads) setNumThreads(args.threads);
  manualSeed(args.seed);
  const random = rng(args.seed);
  const info = backendInfo();
  console.log(`tiny-gpt on ${info.blas} GEMM, ${info.simd}, ${info.threads} threads`);

  if (args.text) {
    const text = readFileSync(args.text, 'utf8');
    const task = textTask(text, args.seqLength);
    const model = new GPT({
      vocabSize: task.vocabSize,
      numLayers: args.layers ?? 4,
      hiddenSize: args.hidden ?? 128,
      numAttentionHeads: args.heads ?? 4,
      maxSeqLength: args.seqLength,
      recompute: args.recompute,
      seed: args.seed,
    });
    console.log(
      `text: ${text.length} characters, vocabulary ${task.vocabSize}, unigram entropy ${task.unigramEntropy.toFixed(3)} nats; model ${model.numParameters()} parameters`,
    );
    trainWith(
      model,
      task,
      args,
      { iters: 600, batchSize: 32, lr: 2e-3, maxWarmup: 50, logInterval: 50 },
      random,
    );
    const val = validationLoss(model, task, 32, 20);
    console.log(
      `validation loss ${val.toFixed(3)} nats/char (unigram entropy ${task.unigramEntropy.toFixed(3)})`,
    );
    const prompt = text.slice(0, 20);
    console.log(
      `sample after ${JSON.stringify(prompt)}:\n${prompt}${sampleText(model, task, prompt, 300, random)}`,
    );
    return;
  }

  const task = args.task === 'sort' ? sortTask() : additionTask(2);
  const model = new GPT({
    vocabSize: task.vocabSize,
    numLayers: args.layers ?? 2,
    hiddenSize: args.hidden ?? 64,
    numAttentionHeads: args.heads ?? 4,
    maxSeqLength: task.seqLength,
    recompute: args.recompute,
    seed: args.seed,
  });
  console.log(
    `task ${task.name}: ${task.testProblems.length} held-out problems; model ${model.numParameters()} parameters`,
  );
  trainWith(
    model,
    task,
    args,
    { iters: 1500, batchSize: 128, lr: 3e-3, maxWarmup: 100, logInterval: 100 },
    random,
  );
  const { accuracy, predictions } = evaluatePuzzle(model, task);
  console.log(`held-out accuracy: ${(accuracy * 100).toFixed(1)}% of ${task.testProblems.length} problems`);
  for (let i = 0; i < 5; i++) {
    const p = task.testProblems[i];
    const ok = predictions[i].every((v, j) => v === p.answer[j]);
    console.log(`  ${task.describe(p, predictions[i])} ${ok ? '✓' : '✗'}`);
  }
  console.log(`native memory in use at the end: ${(memoryStats().liveBytes / 1024).toFixed(0)} KiB`);
  model.dispose();
}

main();
