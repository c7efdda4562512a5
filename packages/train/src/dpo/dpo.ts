// DPO: the run loop of preference optimisation (a run config with a `dpo` section). Each step
// reads training.globalBatchSize pairs in a seeded order (reshuffled each pass), in Megatron's
// micro-batch order over the data-parallel ranks; a micro-batch runs its pairs' chosen and rejected
// conversations as one batch through the policy and through the frozen reference model, sums each
// reply's log-probabilities (the final assistant turn only), and lowers the DPO loss averaged over
// the step's pairs (plus dpo.ftx times the chosen replies' per-token NLL). Data, tensor and
// sequence parallelism; every layout gives the losses of one process.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type PreferenceSample, readPreferenceFile, shiftTokens, tokenizePreference } from '@megapatch/data';
import type { GPTModel } from '@megapatch/models';
import {
  destroyModelParallel,
  destroyProcessGroup,
  registerSequenceParallelGradHooks,
} from '@megapatch/parallel';
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
import { buildReference, epochOrder, exp, runTokenizer } from '../rl/grpo.js';
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
  reduceAndRead,
  stopAfterIteration,
  type TrainMetrics,
  type TrainOptions,
  type TrainResult,
  tensorboardScalars,
} from '../trainer.js';
import { dpoLoss } from './loss.js';

/** The DPO numbers of one iteration (the `dpo` field of its metrics line), means over its pairs. */
export interface DpoMetrics {
  /** The DPO loss (without the ftx term). */
  loss: number;
  /** Fraction of pairs whose chosen reply's implicit reward beats the rejected one's. */
  accuracy: number;
  /** Implicit rewards β (log π − log π_ref) of the chosen and rejected replies, and their difference. */
  chosenReward: number;
  rejectedReward: number;
  margin: number;
  /** Summed log-probabilities of the chosen and rejected replies under the policy. */
  chosenLogp: number;
  rejectedLogp: number;
  /** The chosen replies' per-token NLL (the ftx term before its weight). */
  sftLoss: number;
}

/** One conversation as a row: inputs, next-token labels (0 where masked) and the reply's mask. */
interface Row {
  inputs: number[];
  labels: number[];
  mask: number[];
}

/** One pair as token rows. */
interface PairRows {
  chosen: Row;
  rejected: Row;
}

/** Refuses the layouts DPO does not run on (before any process group is formed). */
export function checkDpoLayout(config: RunConfig): void {
  const p = config.parallel;
  for (const [key, v] of [
    ['pipelineModelParallelSize', p.pipelineModelParallelSize],
    ['contextParallelSize', p.contextParallelSize],
    ['expertModelParallelSize', p.expertModelParallelSize],
  ] as const) {
    if (v > 1) {
      throw new TrainError(
        'INVALID_CONFIG',
        `parallel.${key} ${v}: DPO runs with tensor (and sequence) and data parallelism only; set it to 1`,
      );
    }
  }
}

/**
 * A pair's rows: a prompt longer than maxPromptLength keeps its end (TRL's keep_end; BOS stays),
 * then each conversation is cut to seqLength + 1 tokens (the reply's end cut) and shifted into
 * inputs and next-token labels with the reply's mask; null when a reply has no token left.
 */
function pairRows(
  tok: Parameters<typeof tokenizePreference>[0] & { bosId: number | null },
  s: PreferenceSample,
  seqLength: number,
  maxPromptLength: number,
): PairRows | null {
  const t = tokenizePreference(tok, s);
  const keepEnd = (chat: typeof t.chosen): typeof t.chosen => {
    const promptLength = chat.weight.findIndex((w) => w > 0);
    const over = promptLength - maxPromptLength;
    if (promptLength < 0 || over <= 0) return chat;
    const head = tok.bosId !== null && chat.ids[0] === tok.bosId ? 1 : 0;
    return {
      ids: [...chat.ids.slice(0, head), ...chat.ids.slice(head + over)],
      weight: Float32Array.from([...chat.weight.subarray(0, head), ...chat.weight.subarray(head + over)]),
    };
  };
  const row = (full: typeof t.chosen): Row => {
    const x = shiftTokens(keepEnd(full), seqLength);
    return {
      inputs: Array.from(x.inputIds),
      labels: Array.from(x.labels, (l) => Math.max(l, 0)),
      mask: Array.from(x.lossMask, (w) => (w > 0 ? 1 : 0)),
    };
  };
  const chosen = row(t.chosen);
  const rejected = row(t.rejected);
  if (!chosen.mask.some(Boolean) || !rejected.mask.some(Boolean)) return null;
  return { chosen, rejected };
}

/** A micro-batch of pairs as tensors: the b chosen rows then the b rejected ones [2b, L]. */
interface DpoMicro {
  tokens: Tensor;
  labels: Tensor;
  mask: Tensor;
  pairs: number;
  /** Reply tokens of each chosen row (the ftx term's per-token mean). */
  chosenTokens: Tensor;
}

function microOf(pairs: readonly PairRows[], multiple: number): DpoMicro {
  const rows = [...pairs.map((p) => p.chosen), ...pairs.map((p) => p.rejected)];
  const b = rows.length;
  const L = Math.ceil(Math.max(...rows.map((r) => r.inputs.length)) / multiple) * multiple;
  const tokens = new BigInt64Array(b * L);
  const labels = new BigInt64Array(b * L);
  const mask = new Float32Array(b * L);
  rows.forEach((r, i) => {
    for (let t = 0; t < r.inputs.length; t++) {
      tokens[i * L + t] = BigInt(r.inputs[t]);
      labels[i * L + t] = BigInt(r.labels[t]);
      mask[i * L + t] = r.mask[t];
    }
  });
  const device = getDefaultDevice();
  const onDevice = (host: Tensor) => hostToDevice(host, device);
  const chosenTokens = Float32Array.from(pairs, (p) => p.chosen.mask.reduce((a, m) => a + m, 0));
  return {
    tokens: onDevice(fromTypedArray(tokens, [b, L])),
    labels: onDevice(fromTypedArray(labels, [b, L])),
    mask: onDevice(fromTypedArray(mask, [b, L])),
    pairs: pairs.length,
    chosenTokens: onDevice(fromTypedArray(chosenTokens, [pairs.length])),
  };
}

function disposeMicro(m: DpoMicro): void {
  for (const t of [m.tokens, m.labels, m.mask, m.chosenTokens]) t.dispose();
}

/** Summed reply log-probabilities [2b] of a micro-batch's rows under `model`. */
function replyLogps(model: GPTModel, m: DpoMicro): Tensor {
  const out = model.forward(m.tokens, { labels: m.labels });
  return (out.loss as Tensor).mul(m.mask).sum(-1).neg();
}

/** The DPO run (see the file's head); `train` calls it for a config with a `dpo` section. */
export async function trainDpo(
  config: RunConfig,
  opts: TrainOptions,
  owned: { dispose(): void }[],
  layout: Layout,
  log: (line: string) => void,
): Promise<TrainResult> {
  const dpo = config.dpo;
  if (!dpo) throw new TrainError('INVALID_ARGUMENT', 'internal: trainDpo needs a dpo section');
  const tr = config.training;
  const logRank = layout.rank === 0;
  const dp = layout.dp.size;
  const gbs = tr.globalBatchSize;
  const mbs = tr.microBatchSize;
  if (gbs % (mbs * dp) !== 0) {
    throw new TrainError(
      'INVALID_CONFIG',
      `training.globalBatchSize ${gbs} pairs is not a multiple of microBatchSize ${mbs} × data-parallel size ${dp}`,
    );
  }
  const numMicro = gbs / (mbs * dp);
  manualSeed(tr.seed);
  fs.mkdirSync(config.logging.runDir, { recursive: true });
  if (logRank)
    fs.writeFileSync(path.join(config.logging.runDir, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
  const resumeIteration = config.checkpoint.load
    ? resolveCheckpointIteration(config.checkpoint.load, log)
    : undefined;

  // the pairs, rendered with the chat template, before any weights are read
  const { tok } = await runTokenizer(config, resumeIteration, 'DPO renders the pairs with its chat template');
  if (!tok.chatTemplate) {
    throw new TrainError(
      'INVALID_CONFIG',
      "DPO renders each pair's conversation with the model's chat template, and its tokenizer has none (no chat_template in tokenizer_config.json, no chat_template.jinja)",
    );
  }
  const maxPromptLength = dpo.maxPromptLength ?? Math.floor(config.data.seqLength / 2);
  const readPairs = (file: string) => {
    let samples: PreferenceSample[];
    try {
      samples = readPreferenceFile(file);
    } catch (e) {
      throw new TrainError('DATA', `${file}: ${(e as Error).message}`);
    }
    const rows: PairRows[] = [];
    let skipped = 0;
    for (const s of samples) {
      const r = pairRows(tok, s, config.data.seqLength, maxPromptLength);
      if (r) rows.push(r);
      else skipped++;
    }
    if (skipped > 0)
      log(
        `warning: ${file}: ${skipped} of ${samples.length} pairs leave no reply token within data.seqLength ${config.data.seqLength} and are left out`,
      );
    if (rows.length === 0)
      throw new TrainError('DATA', `${file}: no pair fits data.seqLength ${config.data.seqLength}`);
    return rows;
  };
  const pairs = readPairs(dpo.pairsPath);
  const validPairs = dpo.validPairsPath ? readPairs(dpo.validPairsPath) : null;

  const { model, architecture, hfSource } = buildModel(config, layout, resumeIteration);
  owned.push(model);
  const ddp = makeDdp(config, layout, model, [model]);
  owned.push(ddp);
  if (config.parallel.sequenceParallel) registerSequenceParallelGradHooks(ddp.parameters(), layout.tp);
  const optimizer = makeOptimizer(config, layout, [model], ddp, log);
  owned.push(optimizer);
  const trainIters = trainIterations(config);
  const scheduler = makeScheduler(config, optimizer, trainIters);
  const refSource = dpo.referenceModel ?? config.model.load;
  if (!refSource) throw new TrainError('INVALID_CONFIG', 'DPO needs dpo.referenceModel (or model.load)');
  const reference = buildReference(config, layout, refSource, model.config.vocabSize);
  owned.push(reference);

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
    `DPO: ${pairs.length} pairs${validPairs ? ` (${validPairs.length} held out)` : ''}, ${gbs} per iteration in ${numMicro} micro-batch(es) of ${mbs} per rank; ${dpo.lossType} loss, beta ${dpo.beta}${dpo.ftx > 0 ? `, ftx ${dpo.ftx}` : ''}`,
  );
  const orders = new Map<number, number[]>();
  const pairAt = (g: number): PairRows => {
    const epoch = Math.floor(g / pairs.length);
    let order = orders.get(epoch);
    if (!order) {
      orders.clear();
      order = epochOrder(pairs.length, tr.seed, epoch);
      orders.set(epoch, order);
    }
    return pairs[order[g % pairs.length]];
  };
  const lengthMultiple = config.parallel.sequenceParallel ? layout.tp.size : 1;
  const dpRank = layout.dp.rank;

  const metricsFd = logRank
    ? fs.openSync(path.join(config.logging.runDir, 'metrics.jsonl'), state.iteration > 0 ? 'a' : 'w')
    : null;
  const tensorboard =
    logRank && config.logging.tensorboardDir !== null
      ? new TensorBoardWriter(config.logging.tensorboardDir)
      : null;
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

  /** Sums over one micro-batch (on the device until read): loss, ftx, accuracy, rewards, logps. */
  interface Sums {
    loss: DeviceSum;
    sft: DeviceSum;
    correct: DeviceSum;
    chosenReward: DeviceSum;
    rejectedReward: DeviceSum;
    chosenLogp: DeviceSum;
    rejectedLogp: DeviceSum;
  }
  const newSums = (): Sums => ({
    loss: new DeviceSum(),
    sft: new DeviceSum(),
    correct: new DeviceSum(),
    chosenReward: new DeviceSum(),
    rejectedReward: new DeviceSum(),
    chosenLogp: new DeviceSum(),
    rejectedLogp: new DeviceSum(),
  });
  /** The step's (or evaluation's) objective of one micro-batch, its sums added; `total` pairs in the whole batch. */
  const microObjective = (m: DpoMicro, sums: Sums, total: number): Tensor => {
    const ref = noGrad(() => replyLogps(reference, m).detach());
    const logp = replyLogps(model, m);
    const b = m.pairs;
    const pc = logp.narrow(0, 0, b);
    const pr = logp.narrow(0, b, b);
    const r = dpoLoss({
      policyChosen: pc,
      policyRejected: pr,
      refChosen: ref.narrow(0, 0, b),
      refRejected: ref.narrow(0, b, b),
      beta: dpo.beta,
      lossType: dpo.lossType,
      labelSmoothing: dpo.labelSmoothing,
    });
    const loss = r.losses.sum().div(total);
    const sft = pc.neg().div(m.chosenTokens).sum().div(total);
    sums.loss.add(loss);
    sums.sft.add(sft);
    noGrad(() => {
      sums.correct.add(r.chosenRewards.gt(r.rejectedRewards).to('float32').sum());
      sums.chosenReward.add(r.chosenRewards.sum());
      sums.rejectedReward.add(r.rejectedRewards.sum());
      sums.chosenLogp.add(pc.detach().sum());
      sums.rejectedLogp.add(pr.detach().sum());
    });
    return dpo.ftx > 0 ? loss.add(sft.mul(dpo.ftx)) : loss;
  };
  const readSums = (sums: Sums, pairsTotal: number, along: Tensor[] = []) => {
    const [loss, sft, correct, cr, rr, cl, rl, ...rest] = reduceAndRead(
      [
        sums.loss,
        sums.sft,
        sums.correct,
        sums.chosenReward,
        sums.rejectedReward,
        sums.chosenLogp,
        sums.rejectedLogp,
      ],
      [1, 1, pairsTotal, pairsTotal, pairsTotal, pairsTotal, pairsTotal],
      [layout.dp],
      along,
    );
    const m: DpoMetrics = {
      loss,
      accuracy: correct,
      chosenReward: cr,
      rejectedReward: rr,
      margin: cr - rr,
      chosenLogp: cl,
      rejectedLogp: rl,
      sftLoss: sft,
    };
    return { m, rest };
  };
  let evaluatedAt: number | null = null;
  /** The held-out pairs' DPO numbers (each rank every dp-th micro-batch of mbs pairs). */
  const evaluate = (dataset: 'validation set' | null = null) => {
    if (!validPairs) return;
    const sums = newSums();
    model.eval();
    for (let start = dpRank * mbs; start < validPairs.length; start += mbs * dp) {
      const m = microOf(validPairs.slice(start, start + mbs), lengthMultiple);
      try {
        noGrad(() => tidy(() => void microObjective(m, sums, validPairs.length)));
      } finally {
        disposeMicro(m);
      }
    }
    model.train();
    const { m } = readSums(sums, validPairs.length);
    evaluatedAt = state.iteration;
    const line = {
      kind: 'valid' as const,
      iteration: state.iteration,
      consumedSamples: state.consumedSamples,
      lmLoss: m.loss,
      perplexity: null,
      dpo: m,
      time: new Date().toISOString(),
    };
    if (metricsFd !== null) fs.writeSync(metricsFd, `${JSON.stringify(line)}\n`);
    tensorboard?.addScalars(state.iteration, {
      'dpo/val_loss': m.loss,
      'dpo/val_accuracy': m.accuracy,
      'dpo/val_margin': m.margin,
    });
    const text = ` validation at iteration ${state.iteration}${dataset ? ` on ${dataset}` : ''} | dpo loss: ${exp(m.loss)} | accuracy: ${m.accuracy.toFixed(4)} | margin: ${exp(m.margin)} | `;
    const rule = '-'.repeat(text.length + 1);
    for (const l of [rule, text, rule]) log(l);
  };

  try {
    if (state.iteration === 0) evaluate();
    model.train();
    while (state.iteration < trainIters) {
      const stepStart = performance.now();
      const timers = { dataMs: 0, forwardMs: 0, backwardMs: 0, optimizerMs: 0, commMs: 0, exposedCommMs: 0 };
      // this rank's micro-batches, in Megatron's order: pair C + i·mbs·dp + rank·mbs + j
      const micros: DpoMicro[] = [];
      let tokenCount = 0;
      try {
        for (let i = 0; i < numMicro; i++) {
          const first = state.consumedSamples + i * mbs * dp + dpRank * mbs;
          const rows = Array.from({ length: mbs }, (_, j) => pairAt(first + j));
          for (const p of rows) tokenCount += p.chosen.inputs.length + p.rejected.inputs.length;
          micros.push(microOf(rows, lengthMultiple));
        }
        timers.dataMs = performance.now() - stepStart;
        optimizer.zeroGrad();
        const lossScale = optimizer.lossScaler?.scale ?? 1;
        model.auxLossScale = lossScale / numMicro;
        const sums = newSums();
        for (const [i, m] of micros.entries()) {
          const run = i < micros.length - 1 ? <T>(f: () => T) => ddp.noSync(f) : <T>(f: () => T) => f();
          run(() =>
            tidy(() => {
              const f0 = performance.now();
              const objective = microObjective(m, sums, gbs);
              const b0 = performance.now();
              timers.forwardMs += b0 - f0;
              // DDP averages over the data-parallel ranks: each rank's part is a sum, so ×dp
              const scale = dp * lossScale;
              (scale !== 1 ? objective.mul(scale) : objective).backward();
              timers.backwardMs += performance.now() - b0;
            }),
          );
        }
        const o0 = performance.now();
        const gradNormOnDevice = optimizer.stepOnDevice();
        timers.optimizerMs = performance.now() - o0;
        const sync = ddp.lastSyncStats();
        timers.commMs = sync.commMs;
        timers.exposedCommMs = sync.exposedMs;
        const { m, rest } = readSums(sums, gbs, [gradNormOnDevice]);
        const r = optimizer.finishStep(rest[0]);
        if (r.updated) scheduler.step(gbs);
        else state.skippedIterations++;
        state.iteration++;
        state.consumedSamples += gbs;
        const [tokens] = allReduceNumbers([tokenCount], layout.dp);
        const lmLoss = m.loss + dpo.ftx * m.sftLoss;
        losses.push(lmLoss);
        const elapsed = performance.now() - stepStart;
        for (const mm of micros.splice(0)) disposeMicro(mm);
        const mem = memoryStats(getDefaultDevice());
        const metrics: TrainMetrics & { dpo: DpoMetrics } = {
          kind: 'train',
          iteration: state.iteration,
          consumedSamples: state.consumedSamples,
          globalBatchSize: gbs,
          elapsedMs: elapsed,
          lr: scheduler.getLr(),
          lmLoss,
          gradNorm: Number.isFinite(r.gradNorm) ? r.gradNorm : null,
          skippedIterations: state.skippedIterations,
          lossScale,
          tokensPerSecond: tokens / (elapsed / 1000),
          tflops: null,
          memory: { liveBytes: mem.liveBytes, peakBytes: mem.peakBytes, cachedBytes: mem.cachedBytes },
          timers,
          dpo: m,
          time: new Date().toISOString(),
        };
        if (metricsFd !== null) fs.writeSync(metricsFd, `${JSON.stringify(metrics)}\n`);
        tensorboard?.addScalars(state.iteration, {
          ...tensorboardScalars(metrics, gbs),
          'dpo/loss': m.loss,
          'dpo/accuracy': m.accuracy,
          'dpo/margin': m.margin,
          'dpo/chosen_reward': m.chosenReward,
          'dpo/rejected_reward': m.rejectedReward,
        });
        if (state.iteration % tr.logInterval === 0 || state.iteration === 1) {
          let s = ` [${new Date().toISOString().replace('T', ' ').slice(0, 19)}]`;
          s += ` iteration ${String(state.iteration).padStart(8)}/${String(trainIters).padStart(8)} |`;
          s += ` consumed pairs: ${String(state.consumedSamples).padStart(10)} |`;
          s += ` elapsed time per iteration (ms): ${elapsed.toFixed(1)} | learning rate: ${exp(metrics.lr)} |`;
          s += ` dpo loss: ${exp(m.loss)} |${dpo.ftx > 0 ? ` sft loss: ${exp(m.sftLoss)} |` : ''}`;
          s += ` accuracy: ${m.accuracy.toFixed(4)} | margin: ${exp(m.margin)} |`;
          s += ` chosen reward: ${exp(m.chosenReward)} | rejected reward: ${exp(m.rejectedReward)} |`;
          if (metrics.gradNorm !== null) s += ` grad norm: ${metrics.gradNorm.toFixed(3)} |`;
          log(s);
        }
      } finally {
        for (const mm of micros) disposeMicro(mm);
      }
      if (tr.evalInterval && state.iteration % tr.evalInterval === 0) evaluate();
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
    if (exitReason === 'done' && evaluatedAt !== state.iteration) evaluate('validation set');
  } finally {
    if (metricsFd !== null) fs.closeSync(metricsFd);
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
