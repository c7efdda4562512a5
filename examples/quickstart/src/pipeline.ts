// The quickstart end to end, through the real `megapatch` command: stories → `preprocess pretrain`
// with a real tokenizer → `train` a MistralForCausalLM from scratch (checkpoints, Hugging Face
// export, run report) → `generate` on stories it never saw, scored → `eval` on them → a summary.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { bosPrefix } from './bos.js';
import { QuickstartError } from './errors.js';
import { COLOURS, type Fact, factText, makeFacts, NAMES, THINGS } from './facts.js';
import { megapatch } from './megapatch.js';
import { writeModelConfig } from './model-config.js';
import { RUN_PATHS, type RunSize, runConfigYaml } from './run-config.js';
import { parseCompletions, type Scored, scoreCompletions } from './score.js';
import { type QuickstartSize, SIZES } from './sizes.js';

/** Marks a folder the quickstart wrote, so that a rerun may replace it (and nothing else). */
export const MARKER = '.megapatch-quickstart';

/** What to run. */
export interface QuickstartOptions {
  /** The output folder (replaced when a previous quickstart wrote it). */
  out: string;
  /** The run's size (default: SIZES.full). */
  size?: QuickstartSize;
  /** Prints progress (default: process.stdout). */
  write?: (text: string) => void;
}

/** What a run produced and measured. */
export interface QuickstartResult {
  out: string;
  /** Wall-clock seconds of the whole pipeline and of training alone. */
  seconds: number;
  trainSeconds: number;
  trainIters: number;
  /** lm loss of the first and the last iteration, and the last validation loss (nats per token). */
  firstLoss: number;
  lastLoss: number;
  validLoss: number | null;
  /** Held-out stories answered exactly, of those asked. */
  correct: number;
  total: number;
  accuracy: number;
  /** `megapatch eval` on the held-out stories: mean loss (nats per token), perplexity, tokens. */
  evalLoss: number;
  evalPerplexity: number;
  evalTokens: number;
  /** The lowest mean loss a model that reads every story perfectly can reach on them. */
  evalFloor: number;
  samples: Scored[];
  /** The run report: the page and its PNGs. */
  report: string;
  pngs: string[];
  /** The exported Hugging Face folder and the checkpoint folder. */
  hf: string;
  checkpoints: string;
}

/** Empties `out` when a quickstart wrote it; refuses a folder with anything else in it. */
function prepareOut(out: string): void {
  if (fs.existsSync(out)) {
    const entries = fs.readdirSync(out);
    if (entries.length > 0 && !entries.includes(MARKER)) {
      throw new QuickstartError(
        'OUTPUT_EXISTS',
        `${out} exists and was not written by the quickstart; choose another --out (it is never emptied)`,
        2,
      );
    }
    fs.rmSync(out, { recursive: true, force: true });
  }
  fs.mkdirSync(out, { recursive: true });
  fs.writeFileSync(path.join(out, MARKER), 'written by examples/quickstart; a rerun replaces this folder\n');
}

function writeJsonl(file: string, rows: readonly unknown[]): void {
  fs.writeFileSync(file, rows.map((r) => `${JSON.stringify(r)}\n`).join(''));
}

interface TrainLine {
  kind: 'train' | 'valid';
  iteration: number;
  lmLoss: number;
}

/** The train and validation losses of `<runDir>/metrics.jsonl`. */
function readLosses(file: string): { train: TrainLine[]; valid: TrainLine[] } {
  const lines = fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as TrainLine);
  return { train: lines.filter((l) => l.kind === 'train'), valid: lines.filter((l) => l.kind === 'valid') };
}

/**
 * Lowest mean loss on `facts` for a model that has learned to read the stories: the name, colour
 * and thing are drawn uniformly, every other token follows from them. `tokens`: predicted tokens.
 */
export function lossFloor(
  facts: number,
  tokens: number,
  names: number,
  colours: number,
  things: number,
): number {
  return (facts * Math.log(names * colours * things)) / tokens;
}

const fmt = (x: number, digits = 3) => x.toFixed(digits);

/** Runs the whole pipeline in `opts.out`. */
export async function runQuickstart(opts: QuickstartOptions): Promise<QuickstartResult> {
  const t0 = performance.now();
  const size = opts.size ?? SIZES.full;
  const write = opts.write ?? ((t: string) => process.stdout.write(t));
  const say = (line = '') => write(`${line}\n`);
  const out = path.resolve(opts.out);
  const run = (args: string[], echo: 'terminal' | 'quiet' = 'terminal') =>
    megapatch(args, { cwd: out, echo, write });
  prepareOut(out);
  const rel = path.relative(process.cwd(), out) || '.';
  say(`megapatch quickstart in ${rel}/ (every command below runs there)`);

  // 1. data
  const facts = makeFacts(500, size.dataSeed);
  const r: RunSize = size.run;
  const modelDir = path.join(out, path.dirname(RUN_PATHS.modelConfig));
  writeModelConfig(modelDir, r.model, 2 * r.seqLength);
  fs.writeFileSync(path.join(out, 'run.yaml'), runConfigYaml(r));
  const bos = await bosPrefix(modelDir);
  writeJsonl(
    path.join(out, 'stories.jsonl'),
    facts.train.map((f) => ({ text: bos + factText(f) })),
  );
  // eval puts BOS before each document itself
  writeJsonl(
    path.join(out, 'heldout.jsonl'),
    facts.heldOut.map((f) => ({ text: factText(f) })),
  );
  const asked: Fact[] = facts.heldOut.slice(0, size.heldOutPrompts);
  writeJsonl(
    path.join(out, 'heldout-prompts.jsonl'),
    asked.map((f) => ({ prompt: f.prompt })),
  );
  say();
  say(
    `1/5 data: ${facts.train.length} stories in stories.jsonl, ${facts.heldOut.length} more held out in heldout.jsonl` +
      ` (${NAMES.length} names × ${COLOURS.length} colours × ${THINGS.length} things), e.g. "${factText(facts.train[0])}"` +
      (bos ? `; each story starts with ${bos}, the BOS token generate and eval put first` : ''),
  );
  await run([
    'preprocess',
    'pretrain',
    '--input',
    'stories.jsonl',
    '--tokenizer',
    'model-config',
    '--output-prefix',
    'data/stories',
    '--append-eod',
  ]);

  // 2. train
  say();
  say(
    `2/5 train: a MistralForCausalLM from scratch (hidden ${r.model.hiddenSize}, ${r.model.numLayers} layers, ` +
      `${r.model.numHeads} heads / ${r.model.numKeyValueHeads} KV heads, vocabulary 32,000) for ${r.trainIters} ` +
      `iterations of ${r.globalBatchSize} × ${r.seqLength} tokens; config in run.yaml, model in model-config/`,
  );
  const tTrain = performance.now();
  await run(['train', '--config', 'run.yaml']);
  const trainSeconds = (performance.now() - tTrain) / 1000;
  const losses = readLosses(path.join(out, RUN_PATHS.runDir, 'metrics.jsonl'));
  const firstLoss = losses.train[0].lmLoss;
  const lastLoss = (losses.train.at(-1) as TrainLine).lmLoss;
  const validLoss = losses.valid.at(-1)?.lmLoss ?? null;

  // 3. generate
  say();
  say(
    `3/5 generate: the exported Hugging Face model (${RUN_PATHS.exportHf}/) continues stories it never saw`,
  );
  for (const f of asked.slice(0, 3)) {
    await run(['generate', '--model', RUN_PATHS.exportHf, '--prompt', f.prompt, '--max-new-tokens', '8']);
  }
  const stdout = await run(
    [
      'generate',
      '--model',
      RUN_PATHS.exportHf,
      '--prompts',
      'heldout-prompts.jsonl',
      '--max-new-tokens',
      '8',
      '--json',
    ],
    'quiet',
  );
  fs.writeFileSync(path.join(out, 'heldout-generations.jsonl'), stdout);
  const score = scoreCompletions(asked, parseCompletions(stdout));
  say(`(${score.total} completions in heldout-generations.jsonl)`);
  say(
    `held-out accuracy: ${score.correct}/${score.total} stories answered exactly ` +
      `(${fmt(100 * score.accuracy, 1)}%; the right colour in ${score.colourCorrect})`,
  );
  const samples = [
    ...score.items.filter((s) => !s.correct).slice(0, 2),
    ...score.items.filter((s) => s.correct),
  ]
    .slice(0, 6)
    .sort((a, b) => asked.indexOf(a.fact) - asked.indexOf(b.fact));
  for (const s of samples) say(`  ${s.fact.prompt}${s.completion.split('\n')[0]} ${s.correct ? '✓' : '✗'}`);

  // 4. eval
  say();
  say('4/5 eval: mean loss and perplexity on the held-out stories');
  const evalOut = await run([
    'eval',
    '--model',
    RUN_PATHS.exportHf,
    '--data',
    'heldout.jsonl',
    '--seq-length',
    String(r.seqLength),
    '--json',
  ]);
  const ev = JSON.parse(evalOut.trim().split('\n').at(-1) as string) as {
    meanLoss: number;
    perplexity: number;
    tokens: number;
  };
  const evalFloor = lossFloor(facts.heldOut.length, ev.tokens, NAMES.length, COLOURS.length, THINGS.length);
  say(
    `mean loss ${fmt(ev.meanLoss)} nats per token; a perfect reader gets ${fmt(evalFloor)} ` +
      '(only the name, colour and thing of each story are unpredictable)',
  );

  // 5. report
  const reportDir = path.join(out, RUN_PATHS.runDir, 'report');
  const report = path.join(reportDir, 'index.html');
  const pngs = fs.existsSync(reportDir)
    ? fs
        .readdirSync(reportDir)
        .filter((f) => f.endsWith('.png'))
        .sort()
        .map((f) => path.join(reportDir, f))
    : [];
  const seconds = (performance.now() - t0) / 1000;
  const relOut = (p: string) => path.relative(process.cwd(), p);
  say();
  say('5/5 summary');
  say(`  time          ${fmt(seconds, 0)} s in all, ${fmt(trainSeconds, 0)} s of training`);
  say(
    `  lm loss       ${fmt(firstLoss)} at iteration 1 → ${fmt(lastLoss)} at iteration ${r.trainIters}` +
      (validLoss === null ? '' : ` (validation ${fmt(validLoss)})`),
  );
  say(
    `  held-out      ${score.correct}/${score.total} stories answered exactly (${fmt(100 * score.accuracy, 1)}%)`,
  );
  say(
    `  eval          mean loss ${fmt(ev.meanLoss)}, perplexity ${fmt(ev.perplexity)} (floor ${fmt(evalFloor)})`,
  );
  say(`  checkpoints   ${relOut(path.join(out, RUN_PATHS.checkpoints))}/`);
  say(`  hf model      ${relOut(path.join(out, RUN_PATHS.exportHf))}/`);
  say(`  report        ${relOut(report)} (open it in a browser) and ${pngs.length} PNGs beside it`);

  const result: QuickstartResult = {
    out,
    seconds,
    trainSeconds,
    trainIters: r.trainIters,
    firstLoss,
    lastLoss,
    validLoss,
    correct: score.correct,
    total: score.total,
    accuracy: score.accuracy,
    evalLoss: ev.meanLoss,
    evalPerplexity: ev.perplexity,
    evalTokens: ev.tokens,
    evalFloor,
    samples,
    report,
    pngs,
    hf: path.join(out, RUN_PATHS.exportHf),
    checkpoints: path.join(out, RUN_PATHS.checkpoints),
  };
  fs.writeFileSync(path.join(out, 'summary.json'), `${JSON.stringify(result, null, 2)}\n`);
  return result;
}
