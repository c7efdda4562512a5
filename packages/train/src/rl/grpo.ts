// GRPO: the run loop of reinforcement learning from rewards (a run config with an `rl` section).
// Each iteration takes the next prompts, generates a group of responses to each with the policy
// (the rollout, with the KV cache of @megapatch/models), scores them with the reward function,
// turns the rewards into group-normalised advantages, and updates the policy with the PPO clipped
// loss (plus a KL loss against a frozen reference model) on mini-batches of responses. Tensor and
// data parallelism as in pre-training: the TP ranks of a replica generate together; the data-
// parallel ranks generate different prompts. Every layout generates and trains on the same
// responses: each prompt's group is generated alone from a seed of its index in the run, and each
// mini-batch holds the same prompts whichever rank holds them, so the losses and weights are those
// of one process (to floating-point tolerance).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loadTokenizer } from '@megapatch/data';
import { type Generation, type GPTModel, generate, openWeights, samplingRng } from '@megapatch/models';
import { destroyModelParallel, destroyProcessGroup } from '@megapatch/parallel';
import {
  fromTypedArray,
  getDefaultDevice,
  manualSeed,
  memoryStats,
  noGrad,
  type Tensor,
  tidy,
} from '@megapatch/tensor';
import {
  loadTrainingCheckpoint,
  resolveCheckpointIteration,
  saveTrainingCheckpoint,
  type TrainingState,
} from '../checkpoint.js';
import { type RunConfig, trainIterations } from '../config.js';
import { TrainError } from '../errors.js';
import { TensorBoardWriter } from '../report/tensorboard.js';
import {
  allReduceNumbers,
  buildModel,
  DeviceSum,
  finishRun,
  hostToDevice,
  type Layout,
  makeDdp,
  makeOptimizer,
  makeScheduler,
  megatronSource,
  reduceAndRead,
  stopAfterIteration,
  type TrainMetrics,
  type TrainOptions,
  type TrainResult,
  tensorboardScalars,
} from '../trainer.js';
import { aggregateLoss, grpoAdvantages, klPenalty, policyGradientLosses } from './loss.js';
import { loadReward, type RlPrompt, readRlPrompts } from './prompts.js';

/** The RL numbers of one iteration (the `rl` field of its metrics line). */
export interface RlMetrics {
  /** Mean, standard deviation (population), minimum and maximum of the iteration's rewards. */
  rewardMean: number;
  rewardStd: number;
  rewardMin: number;
  rewardMax: number;
  /** Mean response length in tokens, and the fraction of responses cut at rl.maxNewTokens. */
  responseLength: number;
  clippedResponses: number;
  /** Means over the iteration's updates: the policy-gradient loss, the KL loss (unweighted). */
  pgLoss: number;
  klLoss: number;
  /** Fraction of response tokens whose ratio was clipped, and the approximate KL to the rollout policy. */
  clipFraction: number;
  approxKl: number;
  /** Optimizer updates of the iteration (mini-batches × ppoEpochs). */
  updates: number;
  /** Time of the rollout (generation and rewards) and of the updates (log-probabilities included), ms. */
  rolloutMs: number;
  updateMs: number;
}

/** A 32-bit seed mixed from two numbers (splitmix-style), for each prompt's rollout. */
export function mixSeed(a: number, b: number): number {
  let x = (Math.imul(a >>> 0, 0x9e3779b1) ^ Math.imul((b >>> 0) + 0x7f4a7c15, 0x85ebca77)) >>> 0;
  x = Math.imul(x ^ (x >>> 16), 0x7feb352d) >>> 0;
  x = Math.imul(x ^ (x >>> 15), 0x846ca68b) >>> 0;
  return (x ^ (x >>> 16)) >>> 0;
}

/** The prompts' order of one epoch: a permutation of 0..n−1 from the run's seed and the epoch. */
export function epochOrder(n: number, seed: number, epoch: number): number[] {
  const order = Array.from({ length: n }, (_, i) => i);
  const rand = samplingRng(mixSeed(seed, 0x10000 + epoch));
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

/** EOS ids: the tokenizer's and `dir`/generation_config.json's `eos_token_id` (a number or a list). */
function eosIds(eos: number, dir: string): number[] {
  const ids = new Set([eos]);
  const file = path.join(dir, 'generation_config.json');
  if (!fs.existsSync(file)) return [...ids];
  let v: unknown;
  try {
    v = (JSON.parse(fs.readFileSync(file, 'utf8')) as { eos_token_id?: unknown }).eos_token_id;
  } catch (e) {
    throw new TrainError('DATA', `${file}: not valid JSON (${(e as Error).message})`);
  }
  for (const id of Array.isArray(v) ? v : v === undefined || v === null ? [] : [v]) {
    if (Number.isInteger(id)) ids.add(id as number);
  }
  return [...ids];
}

/** One response of the rollout. */
interface Response {
  /** The prompt's index in the run (iteration × promptsPerStep + its place). */
  promptIndex: number;
  promptIds: number[];
  tokens: number[];
  reward: number;
  advantage: number;
  truncated: boolean;
}

/** A micro-batch of responses as tensors: inputs, labels and the response-token mask [b, L]. */
interface RlMicro {
  tokens: Tensor;
  labels: Tensor;
  mask: Tensor;
  advantages: Tensor;
  maskSum: number;
  /** Log-probabilities of the policy before the updates (several updates a rollout) and of the reference. */
  old: Tensor | null;
  ref: Tensor | null;
}

function microOf(rows: readonly Response[]): RlMicro {
  const b = rows.length;
  const L = Math.max(...rows.map((r) => r.promptIds.length + r.tokens.length - 1));
  const tokens = new BigInt64Array(b * L);
  const labels = new BigInt64Array(b * L);
  const mask = new Float32Array(b * L);
  let maskSum = 0;
  rows.forEach((r, i) => {
    const all = [...r.promptIds, ...r.tokens];
    for (let t = 0; t < all.length - 1; t++) {
      tokens[i * L + t] = BigInt(all[t]);
      labels[i * L + t] = BigInt(all[t + 1]);
      // the positions that predict a response token
      if (t >= r.promptIds.length - 1) {
        mask[i * L + t] = 1;
        maskSum++;
      }
    }
  });
  const device = getDefaultDevice();
  const onDevice = (host: Tensor) => hostToDevice(host, device);
  return {
    tokens: onDevice(fromTypedArray(tokens, [b, L])),
    labels: onDevice(fromTypedArray(labels, [b, L])),
    mask: onDevice(fromTypedArray(mask, [b, L])),
    advantages: onDevice(
      fromTypedArray(
        Float32Array.from(rows, (r) => r.advantage),
        [b, 1],
      ),
    ),
    maskSum,
    old: null,
    ref: null,
  };
}

function disposeMicros(ms: readonly RlMicro[]): void {
  for (const m of ms) for (const t of [m.tokens, m.labels, m.mask, m.advantages, m.old, m.ref]) t?.dispose();
}

/** Log-probabilities [b, L] of the micro-batch's labels under `model` (no gradient). */
function logProbsOf(model: GPTModel, m: RlMicro, temperature: number): Tensor {
  return noGrad(() =>
    tidy(() => (model.forward(m.tokens, { labels: m.labels, temperature }).loss as Tensor).neg().detach()),
  );
}

/**
 * The tokenizer of the model a run starts from (its folder, or a checkpoint's huggingface/ files),
 * read without the weights; `why` ends the error when there is none.
 */
export async function runTokenizer(
  config: RunConfig,
  resumeIteration: number | undefined,
  why: string,
): Promise<{ tok: Awaited<ReturnType<typeof loadTokenizer>>; dir: string }> {
  const from = config.checkpoint.load ?? config.model.load;
  let dir: string | null;
  if (from) {
    const opened = openWeights(from, {
      ...(config.checkpoint.load && resumeIteration !== undefined ? { iteration: resumeIteration } : {}),
      verifyChecksums: false,
      ...megatronSource(config, from),
    });
    opened.source.close();
    dir = opened.tokenizerDir;
  } else {
    const c = config.model.config as string;
    dir = fs.statSync(c).isDirectory() ? c : path.dirname(c);
  }
  if (!dir) {
    throw new TrainError(
      'INVALID_CONFIG',
      `${why}: start from a model with its tokenizer files (a Hugging Face folder, or a checkpoint converted from one)`,
    );
  }
  try {
    return { tok: await loadTokenizer(dir), dir };
  } catch (e) {
    throw new TrainError(
      'INVALID_CONFIG',
      `${dir}: no usable tokenizer (${(e as Error).message.split('\n')[0]}); ${why}`,
    );
  }
}

/** The frozen reference model (the policy's start, or `source`), built for this layout, in eval mode. */
export function buildReference(
  config: RunConfig,
  layout: Layout,
  source: string,
  vocabSize: number,
): GPTModel {
  const ref = buildModel(
    {
      ...config,
      model: {
        ...config.model,
        load: source,
        recomputeGranularity: null,
        recomputeMethod: null,
        recomputeNumLayers: null,
      },
      checkpoint: { ...config.checkpoint, load: null },
    },
    layout,
    undefined,
  ).model;
  ref.eval();
  if (ref.config.vocabSize !== vocabSize) {
    ref.dispose();
    throw new TrainError(
      'INVALID_CONFIG',
      `the reference model ${source} has a vocabulary of ${ref.config.vocabSize}, the policy ${vocabSize}: give the model the run started from`,
    );
  }
  return ref;
}

/** Refuses the layouts GRPO does not run on (before any process group is formed). */
export function checkRlLayout(config: RunConfig): void {
  const p = config.parallel;
  for (const [key, v] of [
    ['pipelineModelParallelSize', p.pipelineModelParallelSize],
    ['contextParallelSize', p.contextParallelSize],
    ['expertModelParallelSize', p.expertModelParallelSize],
  ] as const) {
    if (v > 1) {
      throw new TrainError(
        'INVALID_CONFIG',
        `parallel.${key} ${v}: reinforcement learning (rl) runs with tensor and data parallelism only (the rollout generates on each replica whole); set it to 1`,
      );
    }
  }
  if (p.sequenceParallel) {
    throw new TrainError(
      'INVALID_CONFIG',
      'parallel.sequenceParallel: the rollout generates one token at a time, which sequence parallelism cannot split over the TP ranks; set it false for reinforcement learning',
    );
  }
}

/** The GRPO run (see the file's head); `train` calls it for a config with an `rl` section. */
export async function trainGrpo(
  config: RunConfig,
  opts: TrainOptions,
  owned: { dispose(): void }[],
  layout: Layout,
  log: (line: string) => void,
): Promise<TrainResult> {
  const rl = config.rl;
  if (!rl) throw new TrainError('INVALID_ARGUMENT', 'internal: trainGrpo needs an rl section');
  const tr = config.training;
  const logRank = layout.rank === 0;
  const dp = layout.dp.size;
  const n = rl.groupSize;
  const P = rl.promptsPerStep;
  const gbs = tr.globalBatchSize;
  const mbs = tr.microBatchSize;
  const promptsPerMini = gbs / n;
  if (promptsPerMini % dp !== 0) {
    throw new TrainError(
      'INVALID_CONFIG',
      `training.globalBatchSize ${gbs} holds ${promptsPerMini} prompt groups, which do not split over ${dp} data-parallel ranks: make globalBatchSize / rl.groupSize a multiple of ${dp}`,
    );
  }
  const rankPrompts = promptsPerMini / dp;
  if ((rankPrompts * n) % mbs !== 0) {
    throw new TrainError(
      'INVALID_CONFIG',
      `each rank's ${rankPrompts * n} responses of a mini-batch do not make whole micro-batches of training.microBatchSize ${mbs}`,
    );
  }
  const miniBatches = (P * n) / gbs;
  const updatesPerRollout = miniBatches * rl.ppoEpochs;
  manualSeed(tr.seed);
  fs.mkdirSync(config.logging.runDir, { recursive: true });
  if (logRank)
    fs.writeFileSync(path.join(config.logging.runDir, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);

  const resumeIteration = config.checkpoint.load
    ? resolveCheckpointIteration(config.checkpoint.load, log)
    : undefined;
  // the tokenizer, the prompts and the reward before any weights are read: a bad prompt line or
  // reward module fails in seconds, not after the model loads
  const { tok, dir: tokenizerDir } = await runTokenizer(
    config,
    resumeIteration,
    'reinforcement learning decodes the responses for the reward',
  );
  const eos = eosIds(tok.eosId, tokenizerDir);
  const { prompts, skipped } = readRlPrompts(rl.promptsPath, tok, {
    chat: rl.chat,
    maxPromptTokens: config.data.seqLength - rl.maxNewTokens,
  });
  if (skipped > 0)
    log(
      `warning: ${skipped} of ${prompts.length + skipped} prompts are longer than data.seqLength − rl.maxNewTokens (${config.data.seqLength - rl.maxNewTokens} tokens) and are left out`,
    );
  const reward = await loadReward(rl.reward);
  const validPrompts = rl.validPromptsPath
    ? readRlPrompts(rl.validPromptsPath, tok, {
        chat: rl.chat,
        maxPromptTokens: config.data.seqLength - rl.maxNewTokens,
      }).prompts
    : null;
  const { model, architecture, hfSource } = buildModel(config, layout, resumeIteration);
  owned.push(model);
  const cfg = model.config;
  if (config.data.seqLength > cfg.maxPositionEmbeddings) {
    throw new TrainError(
      'INVALID_CONFIG',
      `data.seqLength ${config.data.seqLength} (prompt + response) exceeds the model's ${cfg.maxPositionEmbeddings} positions`,
    );
  }
  const ddp = makeDdp(config, layout, model, [model]);
  owned.push(ddp);
  const optimizer = makeOptimizer(config, layout, [model], ddp, log);
  owned.push(optimizer);
  const trainIters = trainIterations(config);
  const scheduler = makeScheduler(config, optimizer, trainIters);

  // the frozen reference policy of the KL loss: the model the run started from
  let reference: GPTModel | null = null;
  if (rl.klLossCoef > 0) {
    const source = rl.referenceModel ?? config.model.load;
    if (!source) {
      throw new TrainError('INVALID_CONFIG', 'rl.klLossCoef > 0 needs rl.referenceModel (or model.load)');
    }
    reference = buildReference(config, layout, source, cfg.vocabSize);
    owned.push(reference);
  }

  let state: TrainingState = { iteration: 0, consumedSamples: 0, skippedIterations: 0 };
  if (config.checkpoint.load && !config.checkpoint.finetune) {
    state = loadTrainingCheckpoint(config.checkpoint.load, {
      model,
      chunks: [model],
      optimizer,
      scheduler,
      architecture,
      log,
      iteration: resumeIteration,
      loadOptim: !config.checkpoint.noLoadOptim,
      loadRng: !config.checkpoint.noLoadRng,
    });
  }

  log(
    `GRPO: ${prompts.length} prompts, ${P} per iteration × ${n} responses; ${miniBatches} mini-batch(es) of ${gbs} responses × ${rl.ppoEpochs} epoch(s) = ${updatesPerRollout} update(s) per iteration${reference ? `; KL loss ${rl.klLossType} × ${rl.klLossCoef}` : ''}`,
  );
  const orders = new Map<number, number[]>();
  const promptAt = (g: number): RlPrompt => {
    const epoch = Math.floor(g / prompts.length);
    let order = orders.get(epoch);
    if (!order) {
      orders.clear();
      order = epochOrder(prompts.length, tr.seed, epoch);
      orders.set(epoch, order);
    }
    return prompts[order[g % prompts.length]];
  };
  // decodes a response as the text that follows its prompt (a SentencePiece tokenizer's leading
  // space kept), special tokens left out
  const decodeResponse = (promptIds: readonly number[], ids: readonly number[]) => {
    const skip = { skipSpecialTokens: true };
    const head = tok.decode(promptIds, skip);
    const all = tok.decode([...promptIds, ...ids], skip);
    return all.startsWith(head) ? all.slice(head.length) : tok.decode(ids, skip);
  };

  /** A response's text and reward (a finite number, or a one-line error naming the prompt's line). */
  const score = async (prompt: RlPrompt, tokens: readonly number[], file: string) => {
    const text = decodeResponse(prompt.ids, tokens);
    let r: number;
    try {
      r = await reward(text, prompt.sample);
    } catch (e) {
      throw new TrainError('DATA', `rl.reward on ${file} line ${prompt.line}: ${(e as Error).message}`);
    }
    if (typeof r !== 'number' || !Number.isFinite(r)) {
      throw new TrainError(
        'DATA',
        `rl.reward returned ${String(r)} for a response to ${file} line ${prompt.line}: give a finite number`,
      );
    }
    return { text, reward: r };
  };

  const metricsFd = logRank
    ? fs.openSync(path.join(config.logging.runDir, 'metrics.jsonl'), state.iteration > 0 ? 'a' : 'w')
    : null;
  const tensorboard =
    logRank && config.logging.tensorboardDir !== null
      ? new TensorBoardWriter(config.logging.tensorboardDir)
      : null;
  // rl.saveRollouts: each replica's responses (its first TP rank writes them)
  let rolloutsFd: number | null = null;
  if (rl.saveRollouts && layout.tp.rank === 0) {
    const dir = path.join(config.logging.runDir, 'rollouts');
    fs.mkdirSync(dir, { recursive: true });
    rolloutsFd = fs.openSync(path.join(dir, `dp${layout.dp.rank}.jsonl`), state.iteration > 0 ? 'a' : 'w');
  }
  const losses: number[] = [];
  const checkpoints: string[] = [];
  let savedIteration: number | null = null;
  let exitReason: TrainResult['exitReason'] = 'done';
  let metricsClosed = false;
  const t0 = performance.now();
  const save = () => {
    if (!config.checkpoint.save) return;
    const dir = saveTrainingCheckpoint(config.checkpoint.save, {
      model,
      chunks: [model],
      optimizer,
      scheduler,
      architecture,
      state,
      config,
      hfSource,
      keep: config.checkpoint.ckptKeep,
      layout,
    });
    savedIteration = state.iteration;
    if (dir) checkpoints.push(dir);
  };
  const aggregation = rl.lossAggregation;
  const dpRank = layout.dp.rank;
  let validatedAt: number | null = null;
  /**
   * The mean reward of one response to each held-out prompt (the data-parallel ranks take every
   * dp-th prompt; each prompt's response from a seed of its index), logged as a validation line.
   */
  const validate = async (dataset: 'validation set' | null = null) => {
    if (!validPrompts) return;
    let sum = 0;
    let count = 0;
    let length = 0;
    const indices: number[] = [];
    for (let i = dpRank; i < validPrompts.length; i += dp) indices.push(i);
    for (let at = 0; at < indices.length; at += rl.promptsPerGenerate) {
      const batch = indices.slice(at, at + rl.promptsPerGenerate);
      const rows = generate(
        model,
        batch.map((i) => validPrompts[i].ids),
        {
          maxNewTokens: rl.maxNewTokens,
          temperature: rl.validTemperature,
          topP: rl.topP,
          topK: rl.topK,
          seed: batch.map((i) => mixSeed(tr.seed ^ 0x5bd1e995, i)),
          eosTokenIds: eos,
        },
      ).rows;
      for (const [k, i] of batch.entries()) {
        sum += (await score(validPrompts[i], rows[k].tokens, rl.validPromptsPath as string)).reward;
        count++;
        length += rows[k].tokens.length;
      }
    }
    const [s, c, l] = allReduceNumbers([sum, count, length], layout.dp);
    validatedAt = state.iteration;
    const m = {
      kind: 'valid' as const,
      iteration: state.iteration,
      consumedSamples: state.consumedSamples,
      lmLoss: null,
      perplexity: null,
      rl: { rewardMean: s / c, responseLength: l / c, prompts: c },
      time: new Date().toISOString(),
    };
    if (metricsFd !== null) fs.writeSync(metricsFd, `${JSON.stringify(m)}\n`);
    tensorboard?.addScalars(state.iteration, { 'rl/val_reward_mean': m.rl.rewardMean });
    const line = ` validation reward at iteration ${state.iteration}${dataset ? ` on ${dataset}` : ''} | reward mean: ${exp(m.rl.rewardMean)} | response length: ${m.rl.responseLength.toFixed(1)} | prompts: ${c} | `;
    const rule = '-'.repeat(line.length + 1);
    for (const l2 of [rule, line, rule]) log(l2);
  };

  try {
    // verl validates before training
    if (state.iteration === 0) await validate();
    while (state.iteration < trainIters) {
      const stepStart = performance.now();
      // this rank's prompts: in mini-batch k, the prompts k·(gbs/n) + rank·(gbs/n/dp) + j
      const mine: number[] = [];
      for (let k = 0; k < miniBatches; k++)
        for (let j = 0; j < rankPrompts; j++)
          mine.push(state.iteration * P + k * promptsPerMini + dpRank * rankPrompts + j);
      // the rollout: each prompt's group drawn from a generator seeded by its index in the run,
      // rl.promptsPerGenerate groups to a generate call
      const responses: Response[] = [];
      const generated = new Map<number, Generation[]>();
      for (let at = 0; at < mine.length; at += rl.promptsPerGenerate) {
        const batch = mine.slice(at, at + rl.promptsPerGenerate);
        const rows = generate(
          model,
          batch.flatMap((g) => Array.from({ length: n }, () => promptAt(g).ids)),
          {
            maxNewTokens: rl.maxNewTokens,
            temperature: rl.temperature,
            topP: rl.topP,
            topK: rl.topK,
            seed: batch.flatMap((g) => Array.from({ length: n }, () => mixSeed(tr.seed, g))),
            eosTokenIds: eos,
          },
        ).rows;
        for (const [k, g] of batch.entries()) generated.set(g, rows.slice(k * n, (k + 1) * n));
      }
      for (const g of mine) {
        const prompt = promptAt(g);
        const rows = generated.get(g) as Generation[];
        const rewards: number[] = [];
        const texts: string[] = [];
        for (const row of rows) {
          const scored = await score(prompt, row.tokens, rl.promptsPath);
          texts.push(scored.text);
          rewards.push(scored.reward);
        }
        const adv = grpoAdvantages(rewards, n, {
          normalizeByStd: rl.normAdvByStd,
          epsilon: rl.advantageEpsilon,
        });
        for (const [i, row] of rows.entries()) {
          responses.push({
            promptIndex: g,
            promptIds: prompt.ids,
            tokens: row.tokens,
            reward: rewards[i],
            advantage: adv[i],
            truncated: row.finishReason === 'length',
          });
          if (rolloutsFd !== null) {
            const line = {
              iteration: state.iteration + 1,
              promptIndex: g,
              line: prompt.line,
              promptIds: prompt.ids,
              tokens: row.tokens,
              response: texts[i],
              finishReason: row.finishReason,
              reward: rewards[i],
              advantage: adv[i],
            };
            fs.writeSync(rolloutsFd, `${JSON.stringify(line)}\n`);
          }
        }
      }
      const rolloutMs = performance.now() - stepStart;
      // the update's times (the log-probabilities of the rollout and reference policies counted
      // as forward time); the rollout counts as the step's data time
      const timers = {
        dataMs: rolloutMs,
        forwardMs: 0,
        backwardMs: 0,
        optimizerMs: 0,
        commMs: 0,
        exposedCommMs: 0,
      };
      const u0 = performance.now();
      // this rank's micro-batches of each mini-batch, with the log-probabilities they need
      const perMini = rankPrompts * n;
      const minis: RlMicro[][] = [];
      const runUpdates = () => {
        for (let k = 0; k < miniBatches; k++) {
          const micros: RlMicro[] = [];
          minis.push(micros);
          for (let s = 0; s < perMini; s += mbs) {
            const m = microOf(responses.slice(k * perMini + s, k * perMini + s + mbs));
            micros.push(m);
            const f0 = performance.now();
            if (updatesPerRollout > 1) m.old = logProbsOf(model, m, rl.temperature);
            if (reference) m.ref = logProbsOf(reference, m, rl.temperature);
            timers.forwardMs += performance.now() - f0;
          }
        }
        const sums = { pg: 0, kl: 0, clip: 0, approxKl: 0, tokens: 0 };
        let gradNorm: number | null = null;
        let updated = false;
        model.train();
        for (let epoch = 0; epoch < rl.ppoEpochs; epoch++) {
          for (const micros of minis) {
            const local = micros.reduce((a, m) => a + m.maskSum, 0);
            const [tokens] = allReduceNumbers([local], layout.dp);
            const totals = { tokens, sequences: gbs, normLength: rl.maxNewTokens };
            optimizer.zeroGrad();
            // MoE aux losses: averaged over the mini-batch's micro-batches, as pre-training's
            // (and times fp16's loss scale)
            model.auxLossScale = (optimizer.lossScaler?.scale ?? 1) / micros.length;
            const pgSum = new DeviceSum();
            const klSum = new DeviceSum();
            const clipSum = new DeviceSum();
            const aklSum = new DeviceSum();
            for (const [i, m] of micros.entries()) {
              const run = i < micros.length - 1 ? <T>(f: () => T) => ddp.noSync(f) : <T>(f: () => T) => f();
              run(() =>
                tidy(() => {
                  const f0 = performance.now();
                  const out = model.forward(m.tokens, { labels: m.labels, temperature: rl.temperature });
                  const logp = (out.loss as Tensor).neg();
                  const terms = policyGradientLosses({
                    logProbs: logp,
                    oldLogProbs: m.old ?? logp.detach(),
                    advantages: m.advantages,
                    mask: m.mask,
                    clipRatioLow: rl.clipRatioLow,
                    clipRatioHigh: rl.clipRatioHigh,
                    clipRatioC: rl.clipRatioC,
                    mode: rl.policyLoss,
                  });
                  const pg = aggregateLoss(terms.losses, m.mask, aggregation, totals);
                  let objective = pg;
                  pgSum.add(pg);
                  clipSum.add(terms.clipped.mul(m.mask).sum());
                  aklSum.add(terms.approxKl.mul(m.mask).sum());
                  if (reference && m.ref) {
                    const kl = aggregateLoss(
                      klPenalty(logp, m.ref, rl.klLossType),
                      m.mask,
                      aggregation,
                      totals,
                    );
                    klSum.add(kl);
                    objective = objective.add(kl.mul(rl.klLossCoef));
                  }
                  // DDP averages the gradients over the data-parallel ranks: each rank's part is a
                  // sum of the mini-batch's loss, so ×dp; fp16: times the loss scale, which the
                  // optimizer divides out of the gradients
                  const scale = dp * (optimizer.lossScaler?.scale ?? 1);
                  const b0 = performance.now();
                  timers.forwardMs += b0 - f0;
                  (scale !== 1 ? objective.mul(scale) : objective).backward();
                  timers.backwardMs += performance.now() - b0;
                }),
              );
            }
            const o0 = performance.now();
            const gradNormOnDevice = optimizer.stepOnDevice();
            timers.optimizerMs += performance.now() - o0;
            const sync = ddp.lastSyncStats();
            timers.commMs += sync.commMs;
            timers.exposedCommMs += sync.exposedMs;
            const [pg, kl, clip, akl, norm] = reduceAndRead(
              [pgSum, klSum, clipSum, aklSum],
              [1, 1, 1, 1],
              [layout.dp],
              [gradNormOnDevice],
            );
            const r = optimizer.finishStep(norm);
            if (r.updated) updated = true;
            else state.skippedIterations++;
            gradNorm = Number.isFinite(r.gradNorm) ? r.gradNorm : null;
            sums.pg += pg;
            sums.kl += kl;
            sums.clip += clip;
            sums.approxKl += akl;
            sums.tokens += tokens;
          }
        }
        if (updated) scheduler.step(gbs);
        return { sums, gradNorm };
      };
      let done: ReturnType<typeof runUpdates>;
      try {
        done = runUpdates();
      } finally {
        for (const micros of minis) disposeMicros(micros);
      }
      const { sums, gradNorm } = done;
      state.iteration++;
      state.consumedSamples += P;
      // the iteration's rewards and lengths over the data-parallel ranks
      const rewardsHere = responses.map((r) => r.reward);
      const [count, rSum, rSq, lenSum, cut, promptTokens] = allReduceNumbers(
        [
          responses.length,
          rewardsHere.reduce((a, b) => a + b, 0),
          rewardsHere.reduce((a, b) => a + b * b, 0),
          responses.reduce((a, r) => a + r.tokens.length, 0),
          responses.filter((r) => r.truncated).length,
          responses.reduce((a, r) => a + r.promptIds.length, 0),
        ],
        layout.dp,
      );
      const [rMax, negMin] = allReduceNumbers(
        [Math.max(...rewardsHere), -Math.min(...rewardsHere)],
        layout.dp,
        'max',
      );
      const rewardMean = rSum / count;
      const pgLoss = sums.pg / updatesPerRollout;
      const klLoss = sums.kl / updatesPerRollout;
      const lmLoss = pgLoss + (reference ? rl.klLossCoef * klLoss : 0);
      losses.push(lmLoss);
      const updateMs = performance.now() - u0;
      const elapsed = performance.now() - stepStart;
      const mem = memoryStats(getDefaultDevice());
      const rlMetrics: RlMetrics = {
        rewardMean,
        rewardStd: Math.sqrt(Math.max(0, rSq / count - rewardMean * rewardMean)),
        rewardMin: -negMin,
        rewardMax: rMax,
        responseLength: lenSum / count,
        clippedResponses: cut / count,
        pgLoss,
        klLoss,
        clipFraction: sums.clip / Math.max(sums.tokens, 1),
        approxKl: sums.approxKl / Math.max(sums.tokens, 1),
        updates: updatesPerRollout,
        rolloutMs,
        updateMs,
      };
      const metrics: TrainMetrics & { rl: RlMetrics } = {
        kind: 'train',
        iteration: state.iteration,
        consumedSamples: state.consumedSamples,
        globalBatchSize: gbs,
        elapsedMs: elapsed,
        lr: scheduler.getLr(),
        lmLoss,
        gradNorm,
        skippedIterations: state.skippedIterations,
        lossScale: optimizer.lossScaler?.scale ?? 1,
        // the tokens of the iteration's sequences (prompts and responses), as pre-training counts them
        tokensPerSecond: (promptTokens + lenSum) / (elapsed / 1000),
        tflops: null,
        memory: { liveBytes: mem.liveBytes, peakBytes: mem.peakBytes, cachedBytes: mem.cachedBytes },
        timers,
        rl: rlMetrics,
        time: new Date().toISOString(),
      };
      if (metricsFd !== null) fs.writeSync(metricsFd, `${JSON.stringify(metrics)}\n`);
      if (tensorboard) {
        tensorboard.addScalars(state.iteration, {
          ...tensorboardScalars(metrics, gbs),
          'rl/reward_mean': rlMetrics.rewardMean,
          'rl/reward_std': rlMetrics.rewardStd,
          'rl/response_length': rlMetrics.responseLength,
          'rl/pg_loss': rlMetrics.pgLoss,
          'rl/kl_loss': reference ? rlMetrics.klLoss : null,
          'rl/clip_fraction': rlMetrics.clipFraction,
          'rl/approx_kl': rlMetrics.approxKl,
        });
      }
      if (state.iteration % tr.logInterval === 0 || state.iteration === 1) {
        log(
          formatRlLogLine(
            state.iteration,
            trainIters,
            state.consumedSamples,
            elapsed,
            metrics.lr,
            gradNorm,
            rlMetrics,
            reference !== null,
          ),
        );
      }
      if (tr.evalInterval && state.iteration % tr.evalInterval === 0) await validate();
      const saveNow =
        config.checkpoint.saveInterval && state.iteration % config.checkpoint.saveInterval === 0;
      if (saveNow) save();
      const stop = await stopAfterIteration(config, opts, layout, state.iteration, t0);
      if (stop) {
        if (!saveNow) save();
        exitReason = stop;
        break;
      }
    }
    if (exitReason === 'done' && config.checkpoint.save && savedIteration !== state.iteration) save();
    // the finished run's validation (unless the last iteration's was just made)
    if (exitReason === 'done' && validatedAt !== state.iteration) await validate('validation set');
  } finally {
    if (metricsFd !== null) fs.closeSync(metricsFd);
    if (rolloutsFd !== null) fs.closeSync(rolloutsFd);
    tensorboard?.close();
    metricsClosed = true;
    for (const o of owned.splice(0).reverse()) o.dispose();
    if (layout.distributed) {
      destroyModelParallel();
      await destroyProcessGroup();
    }
  }
  await finishRun(config, opts, { logRank, exitReason, metricsClosed, log });
  return { iteration: state.iteration, losses, checkpoints, exitReason };
}

/** A number as Megatron's log lines print losses (`1.234567E-03`). */
export const exp = (v: number) =>
  v
    .toExponential(6)
    .replace(/e([+-])(\d)$/, 'e$10$2')
    .toUpperCase();

/** The RL iteration's console line, in the style of Megatron's training line. */
function formatRlLogLine(
  iteration: number,
  trainIters: number,
  consumedPrompts: number,
  elapsedMs: number,
  lr: number,
  gradNorm: number | null,
  m: RlMetrics,
  withKl: boolean,
): string {
  let s = ` [${new Date().toISOString().replace('T', ' ').slice(0, 19)}]`;
  s += ` iteration ${String(iteration).padStart(8)}/${String(trainIters).padStart(8)} |`;
  s += ` consumed prompts: ${String(consumedPrompts).padStart(10)} |`;
  s += ` elapsed time per iteration (ms): ${elapsedMs.toFixed(1)} | rollout (ms): ${m.rolloutMs.toFixed(1)} |`;
  s += ` learning rate: ${exp(lr)} |`;
  s += ` reward mean: ${exp(m.rewardMean)} | reward std: ${exp(m.rewardStd)} |`;
  s += ` response length: ${m.responseLength.toFixed(1)} | pg loss: ${exp(m.pgLoss)} |`;
  if (withKl) s += ` kl loss: ${exp(m.klLoss)} |`;
  s += ` clip fraction: ${m.clipFraction.toFixed(4)} | approx kl: ${exp(m.approxKl)} |`;
  if (gradNorm !== null) s += ` grad norm: ${gradNorm.toFixed(3)} |`;
  return s;
}
