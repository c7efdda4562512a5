#!/usr/bin/env node
// The README's first command (`pnpm demo`): the megapatch pipeline end to end on the CPU.
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { QuickstartError } from './errors.js';
import { runQuickstart } from './pipeline.js';
import { type QuickstartSize, SIZES } from './sizes.js';

const HELP = `usage: quickstart [--out DIR] [--quick] [--iters N]

Writes stories with a seeded generator, tokenises them with a real 32,000-token tokenizer
(megapatch preprocess pretrain), trains a small MistralForCausalLM from scratch (megapatch train:
checkpoints, a Hugging Face export, the run report), lets it answer 500 held-out stories
(megapatch generate) and scores it on them (megapatch eval).

  --out DIR   output folder (default examples/quickstart/out); a rerun replaces it, and a folder
              the quickstart did not write is refused
  --quick     the same pipeline at a tiny size (seconds; what the tests run)
  --iters N   training iterations instead of the size's`;

/** The size the command line asks for. */
function sizeOf(quick: boolean, iters: string | undefined): QuickstartSize {
  const base = quick ? SIZES.quick : SIZES.full;
  if (iters === undefined) return base;
  const n = Number(iters);
  if (!Number.isInteger(n) || n < 1) {
    throw new QuickstartError('INVALID_ARGUMENT', `--iters ${iters}: give a positive integer`, 2);
  }
  const run = { ...base.run, trainIters: n };
  run.warmupIters = Math.min(run.warmupIters, Math.max(1, Math.floor(n / 10)));
  run.evalInterval = Math.min(run.evalInterval, n);
  run.saveInterval = Math.min(run.saveInterval, n);
  return { ...base, run };
}

async function main(): Promise<number> {
  let values: { out?: string; quick?: boolean; iters?: string; help?: boolean };
  try {
    ({ values } = parseArgs({
      args: process.argv.slice(2),
      options: {
        out: { type: 'string' },
        quick: { type: 'boolean' },
        iters: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (e) {
    console.error(`quickstart: ${(e as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  const here = path.dirname(fileURLToPath(import.meta.url));
  const out = values.out ?? path.join(here, '..', 'out');
  // Ctrl-C reaches megapatch too: it saves a checkpoint and exits; wait for it instead of dying first
  const wait = () => {};
  process.on('SIGINT', wait);
  process.on('SIGTERM', wait);
  try {
    await runQuickstart({ out, size: sizeOf(values.quick === true, values.iters) });
    return 0;
  } catch (e) {
    if (e instanceof QuickstartError) {
      console.error(`quickstart: ${e.message}`);
      return e.exitCode;
    }
    throw e;
  }
}

process.exitCode = await main();
