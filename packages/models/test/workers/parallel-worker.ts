// One rank of test/parallel.test.ts: loads fixture models for this rank's TP / EP layout, runs the
// fixture batch and compares the gathered logits, the losses and the gathered full gradients with
// the PyTorch fixture and with the same model on one process (built on rank 0 with single-process
// groups). Under EP = 2 with TP = 1 the two ranks are also the data-parallel ranks of the dense
// part, so each takes its own half of the batch (one row): the experts then see the other rank's
// tokens only through the dispatcher, and the gradients are reduced as Megatron's DDP does
// (dense: averaged over DP; experts: scaled by 1/DP, summed over expert-DP).
// A run may swap in a family with zero-centred norms (Gemma's (1 + w)): then only the comparison
// with one process applies, the fixture being of the plain model.
// A run may also train with hidden and attention dropout (0.2 each), the masks keyed by the rows'
// global indices: every layout must drop what one process drops.
// argv[2]: {"tp": n, "ep": n, "runs": [{"id", "dir": HF folder, "sp": bool, "zeroCenteredGamma": bool, "dropout": bool}]}
// Prints one `RESULT <json>` line per run on every rank (the errors on global rank 0 only).
import { getArchitectureSpec, planConversion, type TransformerConfig } from '@megapatch/convert';
import {
  allreduceSequenceParallelGrads,
  destroyModelParallel,
  destroyProcessGroup,
  gatherShards,
  getDataParallelGroup,
  getExpertDataParallelGroup,
  initializeModelParallel,
  initProcessGroup,
  type Partition,
  type ProcessGroup,
  SingleProcessGroup,
} from '@megapatch/parallel';
import { cat, empty, noGrad, type Tensor, zeros } from '@megapatch/tensor';
import { getModelFamily, type ModelFamily } from '../../src/families/index.js';
import type { GPTModel } from '../../src/gpt-model.js';
import { loadModel, openWeights } from '../../src/load.js';
import { MoELayer } from '../../src/moe/moe-layer.js';
import { hfRowsInMegatron, readFixture, relMaxError } from '../helpers/fixtures.js';

export interface WorkerConfig {
  tp: number;
  ep: number;
  runs: { id: string; dir: string; sp?: boolean; zeroCenteredGamma?: boolean; dropout?: boolean }[];
}

/** Local rows of a sharded parameter next to the rows of the whole tensor. */
export interface ShardRows {
  name: string;
  local: number;
  full: number;
}

/** Max relative error of each gathered gradient against the one-process model, and the worst. */
export interface GradComparison {
  worst: string;
  max: number;
  count: number;
  /** Largest relative difference between the copies of a replicated gradient on the TP ranks. */
  replicaSpread: number;
}

export interface RunResult {
  id: string;
  rank: number;
  sp: boolean;
  zeroCenteredGamma: boolean;
  dropout: boolean;
  layout: {
    tp: number;
    ep: number;
    etp: number;
    dp: number;
    tpRank: number;
    epRank: number;
    sequenceParallel: boolean;
  };
  /** Rows of the batch this rank fed. */
  batchRows: number[];
  shards: {
    vocab: ShardRows;
    attention: ShardRows;
    denseFc1: ShardRows | null;
    experts: { local: number; total: number; first: number; fc1: ShardRows } | null;
  };
  /** Rank 0 only. */
  errors?: {
    logits: number;
    loss: number;
    mtpLoss: number | null;
    /** Fixture gradients (HF name -> max relative error). */
    fixtureGrads: Record<string, number>;
    oneProcess: { logits: number; grads: GradComparison; mtpGrads: GradComparison | null };
  };
  error?: string;
}

type Full = Map<string, { shape: number[]; data: Float64Array }>;

const DROPOUT = { hiddenDropout: 0.2, attentionDropout: 0.2 };
const DROPOUT_SEED = 1234;

const cfg = JSON.parse(process.argv[2] ?? '{}') as WorkerConfig;
const world = await initProcessGroup({ timeoutMs: 60_000 });
await initializeModelParallel({ tp: cfg.tp, ep: cfg.ep, timeoutMs: 60_000 });
for (const run of cfg.runs) {
  const variant = {
    sp: run.sp ?? false,
    zeroCenteredGamma: run.zeroCenteredGamma ?? false,
    dropout: run.dropout ?? false,
  };
  let result: RunResult | (typeof variant & { id: string; rank: number; error: string });
  try {
    result = runOne(run.id, run.dir, variant);
  } catch (e) {
    result = { id: run.id, rank: world.rank, ...variant, error: String((e as Error).stack ?? e) };
  }
  console.log(`RESULT ${JSON.stringify(result)}`);
}
destroyModelParallel();
await destroyProcessGroup();

function runOne(
  id: string,
  dir: string,
  variant: { sp: boolean; zeroCenteredGamma: boolean; dropout: boolean },
): RunResult {
  const { sp } = variant;
  const fx = readFixture(id);
  const family = familyOf(dir, variant.zeroCenteredGamma);
  const rates = variant.dropout ? DROPOUT : {};
  const { model, architecture, config } = loadModel(dir, { sequenceParallel: sp, family, ...rates });
  const dp = getDataParallelGroup();
  const ids = fx.ids('input_ids');
  const labels = fx.ids('labels');
  const batch = ids.shape[0];
  if (batch % dp.size !== 0) throw new Error(`batch ${batch} does not split over DP ${dp.size}`);
  const per = batch / dp.size;
  const myIds = ids.narrow(0, dp.rank * per, per).contiguous();
  const myLabels = labels.narrow(0, dp.rank * per, per).contiguous();
  const root = world.rank === 0;
  // the dropout masks' keys: each row's index in the whole batch
  const keys = {
    dropout: { seed: DROPOUT_SEED, rowIds: Array.from({ length: per }, (_, i) => dp.rank * per + i) },
  };

  // Logits of this rank's rows over the whole vocabulary, then of the whole batch.
  const logits = noGrad(() => {
    const local = model.gatherLogits(model.forward(myIds, keys).logits as Tensor).contiguous();
    return toF64(dp.size > 1 ? cat(allGather(local, dp), 0) : local);
  });

  // The mean loss of the batch (equal rows per DP rank) and its gradients.
  const out = model.forward(myIds, { labels: myLabels, ...keys });
  const loss = (out.loss as Tensor).mean();
  const globalLoss = meanOverDp(loss.item(), dp);
  const globalMtp = out.mtpLosses.length > 0 ? meanOverDp(out.mtpLosses[0].item(), dp) : null;
  loss.backward();
  const grads = gatheredGrads(model, architecture, sp);

  let mtpGrads: { full: Full; spread: number } | null = null;
  if (config.mtpNumLayers > 0) {
    model.zeroGrad();
    const o = model.forward(myIds, { labels: myLabels, ...keys });
    sum(o.mtpLosses).backward();
    mtpGrads = gatheredGrads(model, architecture, sp);
  }

  const result: RunResult = {
    id,
    rank: world.rank,
    ...variant,
    layout: {
      tp: model.tpGroup.size,
      ep: model.epGroup.size,
      etp: model.etpGroup.size,
      dp: dp.size,
      tpRank: model.tpGroup.rank,
      epRank: model.epGroup.rank,
      sequenceParallel: model.sequenceParallel,
    },
    batchRows: Array.from({ length: per }, (_, i) => dp.rank * per + i),
    shards: shardsOf(model, config),
  };
  if (root) {
    const fixtureGrads: Record<string, number> = {};
    for (const hf of fx.grads) fixtureGrads[hf] = fixtureGradError(fx, architecture, config, grads.full, hf);
    const ref = oneProcess(dir, family, ids, labels, config, architecture, variant.dropout);
    result.errors = {
      logits: relMaxError(logits, fx.get('logits').data),
      loss: Math.abs(globalLoss - fx.get('loss').data[0]) / fx.get('loss').data[0],
      mtpLoss:
        globalMtp === null
          ? null
          : Math.abs(globalMtp - fx.get('mtp_loss_1').data[0]) / fx.get('mtp_loss_1').data[0],
      fixtureGrads,
      oneProcess: {
        logits: relMaxError(logits, ref.logits),
        grads: compare(grads, ref.grads),
        mtpGrads: mtpGrads && ref.mtpGrads ? compare(mtpGrads, ref.mtpGrads) : null,
      },
    };
  }
  model.dispose();
  return result;
}

/** The same model on this process alone (single-process groups), on the whole batch. */
function oneProcess(
  dir: string,
  family: ModelFamily,
  ids: Tensor,
  labels: Tensor,
  config: TransformerConfig,
  architecture: string,
  dropout: boolean,
): { logits: Float64Array; grads: Full; mtpGrads: Full | null } {
  const single = new SingleProcessGroup();
  const rates = dropout ? DROPOUT : {};
  const { model } = loadModel(dir, { tpGroup: single, epGroup: single, etpGroup: single, family, ...rates });
  const keys = { dropout: { seed: DROPOUT_SEED, rowIds: Array.from({ length: ids.shape[0] }, (_, i) => i) } };
  const logits = noGrad(() =>
    toF64(model.gatherLogits(model.forward(ids, keys).logits as Tensor).contiguous()),
  );
  (model.forward(ids, { labels, ...keys }).loss as Tensor).mean().backward();
  const grads = localGrads(model, architecture, config);
  let mtpGrads: Full | null = null;
  if (config.mtpNumLayers > 0) {
    model.zeroGrad();
    sum(model.forward(ids, { labels, ...keys }).mtpLosses).backward();
    mtpGrads = localGrads(model, architecture, config);
  }
  model.dispose();
  return { logits, grads, mtpGrads };
}

/** The family of the fixture's architecture, or a copy whose norms scale by (1 + w). */
function familyOf(dir: string, zeroCenteredGamma: boolean): ModelFamily {
  const w = openWeights(dir);
  w.source.close();
  const family = getModelFamily(w.architecture);
  return zeroCenteredGamma ? { ...family, name: `${family.name}-zero-centred`, zeroCenteredGamma } : family;
}

/** Gradients of a one-process model by logical name, vocabulary padding dropped. */
function localGrads(model: GPTModel, architecture: string, config: TransformerConfig): Full {
  const plans = planOf(architecture, config);
  const out: Full = new Map();
  for (const [name, p] of model.namedParameters()) {
    let g = p.grad ?? zeros(p.shape);
    if (plans.get(name)?.partition === 'vocab') g = g.narrow(0, 0, config.vocabSize);
    out.set(name, { shape: [...g.shape], data: toF64(g.contiguous()) });
  }
  return out;
}

/**
 * Every gradient of `model` as the full Megatron tensor, on every rank: sequence-parallel norms
 * summed over TP, dense gradients averaged over DP, expert gradients scaled by 1/DP and summed
 * over expert-DP (Megatron's DDP), then TP shards merged (gatherShards with the partition of the
 * conversion plan) and each EP rank's experts placed at their global index. Also returns how far
 * the TP copies of replicated gradients disagree.
 */
function gatheredGrads(model: GPTModel, architecture: string, sp: boolean): { full: Full; spread: number } {
  const c = model.config;
  const plans = planOf(architecture, c);
  const tp = model.tpGroup;
  const ep = model.epGroup;
  const dp = getDataParallelGroup();
  const expertDp = getExpertDataParallelGroup();
  if (sp) allreduceSequenceParallelGrads(model.parameters(), tp);
  const full: Full = new Map();
  let spread = 0;
  const perRank = c.moe ? c.moe.numExperts / ep.size : 0;
  for (const [local, p] of model.namedParameters()) {
    const m = /^(.*\.local_experts\.)(\d+)(\..*)$/.exec(local);
    const nameOf = (epRank: number) => (m ? `${m[1]}${epRank * perRank + Number(m[2])}${m[3]}` : local);
    const plan = plans.get(nameOf(ep.rank));
    if (!plan) throw new Error(`parameter ${local} has no tensor in the conversion plan`);
    let g = noGrad(() => (p.grad ? p.grad.to('float32').clone() : zeros(p.shape)));
    if (m) {
      g = noGrad(() => g.mul(1 / dp.size));
      expertDp.allReduce(g, 'sum').waitSync();
    } else if (dp.size > 1) {
      dp.allReduce(g, 'sum').waitSync();
      g = noGrad(() => g.mul(1 / dp.size));
    }
    const group = m ? model.etpGroup : tp;
    let whole = g;
    if (group.size > 1) {
      const parts = allGather(g, group);
      if (plan.partition === 'replicate') {
        const first = toF64(parts[0]);
        for (const q of parts.slice(1)) spread = Math.max(spread, relMaxError(toF64(q), first));
      }
      whole = gatherShards(parts, plan.partition as Partition, {
        qkvDims: { numHeads: c.numAttentionHeads, numQueryGroups: c.numQueryGroups, headDim: c.kvChannels },
        vocabSize: c.vocabSize,
      });
    } else if (plan.partition === 'vocab') whole = g.narrow(0, 0, c.vocabSize).contiguous();
    const copies = m && ep.size > 1 ? allGather(whole, ep) : [whole];
    copies.forEach((t, r) => {
      full.set(m ? nameOf(r) : local, { shape: [...t.shape], data: toF64(t) });
    });
  }
  return { full, spread };
}

/** Max relative error of each gradient against the one-process model's. */
function compare(got: { full: Full; spread: number }, want: Full): GradComparison {
  let worst = '';
  let max = -1;
  for (const [name, w] of want) {
    const g = got.full.get(name);
    // a missing or misshapen gradient: MAX_VALUE, as Infinity would print as null
    const e = g && g.data.length === w.data.length ? relMaxError(g.data, w.data) : Number.MAX_VALUE;
    if (e > max) {
      max = e;
      worst = name;
    }
  }
  if (got.full.size !== want.size) {
    const extra = [...got.full.keys()].find((k) => !want.has(k));
    return {
      worst: `parameter ${extra} has no one-process twin`,
      max: Number.MAX_VALUE,
      count: got.full.size,
      replicaSpread: got.spread,
    };
  }
  return { worst, max, count: want.size, replicaSpread: got.spread };
}

/** Max relative error of the gathered gradient of HF tensor `hf` against the fixture (as parity.test.ts). */
function fixtureGradError(
  fx: ReturnType<typeof readFixture>,
  architecture: string,
  config: TransformerConfig,
  grads: Full,
  hf: string,
): number {
  const want = fx.get(`grad.${hf}`);
  const runs = hfRowsInMegatron(architecture, config, hf);
  if (runs.length === 0) throw new Error(`no Megatron tensor holds ${hf}`);
  const cols = want.shape.length > 1 ? want.shape.slice(1).reduce((a, b) => a * b, 1) : 1;
  const rows = fx.rowSubset(hf);
  const hfRows = rows ? Math.max(...rows) + 1 : want.shape[0];
  const whole = new Float64Array(hfRows * cols);
  for (const r of runs) {
    // a tied embedding is the output layer too; its parameter carries both gradients
    const g = grads.get(r.name) ?? grads.get('embedding.word_embeddings.weight');
    if (!g) throw new Error(`no gradient of ${r.name}`);
    const n = Math.min(r.count, hfRows - r.sourceStart);
    whole.set(g.data.subarray(r.start * cols, (r.start + n) * cols), r.sourceStart * cols);
  }
  const got = rows ? new Float64Array(rows.length * cols) : whole;
  if (rows)
    for (const [j, row] of rows.entries()) got.set(whole.subarray(row * cols, (row + 1) * cols), j * cols);
  return relMaxError(got, want.data);
}

/** What this rank holds of the vocabulary, the attention projection, the dense MLP and the experts. */
function shardsOf(model: GPTModel, c: TransformerConfig): RunResult['shards'] {
  const params = new Map(model.namedParameters());
  const rows = (name: string, full: number): ShardRows => {
    const p = params.get(name);
    if (!p) throw new Error(`no parameter ${name}`);
    return { name, local: p.shape[0], full };
  };
  const attention = c.mla
    ? rows(
        'decoder.layers.0.self_attention.linear_kv_up_proj.weight',
        c.numAttentionHeads * (c.mla.qkNopeHeadDim + c.mla.vHeadDim),
      )
    : rows(
        'decoder.layers.0.self_attention.linear_qkv.weight',
        (c.numAttentionHeads + 2 * c.numQueryGroups) * c.kvChannels,
      );
  const denseAt = [...model.decoder.layers].findIndex((l) => !(l.mlp instanceof MoELayer));
  const moe = model
    .moeLayers()
    .filter(([l]) => l < c.numLayers)
    .at(-1); // the decoder's last
  return {
    vocab: rows('embedding.word_embeddings.weight', model.paddedVocabSize),
    attention,
    denseFc1:
      denseAt < 0 ? null : rows(`decoder.layers.${denseAt}.mlp.linear_fc1.weight`, 2 * c.ffnHiddenSize),
    experts:
      moe && c.moe
        ? {
            local: moe[1].experts.numLocalExperts,
            total: c.moe.numExperts,
            first: moe[1].experts.firstExpert,
            fc1: rows(
              `decoder.layers.${moe[0]}.mlp.experts.local_experts.0.linear_fc1.weight`,
              2 * c.moe.moeFfnHiddenSize,
            ),
          }
        : null,
  };
}

function planOf(architecture: string, c: TransformerConfig) {
  return new Map(planConversion(getArchitectureSpec(architecture), c, {}).tensors.map((t) => [t.name, t]));
}

/** Every rank's copy of `t` (same shape on all), in group rank order. */
function allGather(t: Tensor, group: ProcessGroup): Tensor[] {
  const src = t.contiguous();
  const outs = Array.from({ length: group.size }, () => empty([...src.shape], { dtype: src.dtype }));
  group.allGather(outs, src).waitSync();
  return outs;
}

/** The mean over the DP ranks of a per-rank scalar (every rank holds as many tokens). */
function meanOverDp(v: number, dp: ProcessGroup): number {
  if (dp.size === 1) return v;
  const t = zeros([1]).add(v);
  dp.allReduce(t, 'sum').waitSync();
  return t.item() / dp.size;
}

function sum(ts: Tensor[]): Tensor {
  return ts.reduce((a, b) => a.add(b));
}

function toF64(t: Tensor): Float64Array {
  return Float64Array.from(t.contiguous().to('float32').toTypedArray() as Float32Array);
}
