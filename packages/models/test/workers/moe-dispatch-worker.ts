// One rank of test/moe-dispatch.test.ts (and test/heavy/moe-dispatch.test.ts): builds a fixture
// MoE model for this rank's TP / EP / expert-TP layout with a token dispatcher and optional
// capacity, feeds each data-parallel rank its rows of a deterministic batch, and compares the
// gathered logits, the loss, the gathered full gradients and the global expert load with the same
// model on one process. Token dropping depends on the tokens of each router call, so the one-process
// model is fed the data-parallel ranks' rows one call after another (gradients accumulated with
// weight 1/DP, as DDP averages them). Runs of the same model and capacity are also compared with
// each other: the first run of a group (the allgather dispatcher) is the reference of the next.
// With sequence parallelism each TP rank routes and dispatches its chunk of the sequence; the
// load-balancing and z losses (runs with auxLoss) are then still the whole sequence's.
// argv[2]: DispatchWorkerConfig as JSON. Prints one `RESULT <json>` line per run on every rank
// (the measures on global rank 0 only).
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
import { cat, empty, fromTypedArray, noGrad, type Tensor, zeros } from '@megapatch/tensor';
import type { GPTModel, GPTModelOptions } from '../../src/gpt-model.js';
import { loadModel } from '../../src/load.js';
import { relMaxError } from '../helpers/fixtures.js';

export interface DispatchRun {
  id: string;
  dir: string;
  dispatcher: 'allgather' | 'alltoall';
  capacityFactor?: number;
  dropPolicy?: 'probs' | 'position';
  pad?: boolean;
  /** Recompute the MoE blocks in backward. */
  recompute?: boolean;
  /** Sequence length of this run (default: the config's). */
  seq?: number;
  /** Train with the load-balancing aux loss (coefficient 1e-2) and the z-loss (1e-3). */
  auxLoss?: boolean;
  /** The aux loss per sample (Megatron's seq_aux_loss) instead of over the micro-batch. */
  seqAux?: boolean;
}

export interface DispatchWorkerConfig {
  tp: number;
  ep: number;
  etp?: number;
  /** Megatron's sequence parallelism (the sequence length must be a multiple of TP). */
  sequenceParallel?: boolean;
  /** Rows of the batch per data-parallel rank and their length. */
  rowsPerRank: number;
  seq: number;
  runs: DispatchRun[];
}

export interface DispatchResult {
  /** Index of the run in the config. */
  run: number;
  id: string;
  dispatcher: string;
  /** Model, capacity and recompute settings: runs with the same key compute the same thing. */
  key: string;
  rank: number;
  layout: { tp: number; ep: number; etp: number; dp: number; expertDp: number; sequenceParallel: boolean };
  /** Rank 0 only. */
  errors?: {
    logits: number;
    loss: number;
    grads: { worst: string; max: number; count: number };
    /** Largest difference between the TP copies of a replicated gradient. */
    replicaSpread: number;
    /** Global expert load (tokens per expert per layer, summed over TP × DP) equals one process's. */
    loadEqual: boolean;
    loadTotal: number;
    /** Top-k choices dropped at the capacity and padding pairs, on this rank's last forward. */
    dropped: number;
    padded: number;
    /**
     * Relative errors of the aux and z losses (summed over the MoE layers, averaged over DP)
     * against one process, and their values there (runs with auxLoss; else null).
     */
    routerLosses: { aux: number; z: number; auxValue: number; zValue: number } | null;
    /** Against the first run with the same key (null for that run). */
    vsFirst: { logits: number; grads: number } | null;
  };
  error?: string;
}

type Full = Map<string, Float64Array>;

const cfg = JSON.parse(process.argv[2] ?? '{}') as DispatchWorkerConfig;
const world = await initProcessGroup({ timeoutMs: 60_000 });
await initializeModelParallel({ tp: cfg.tp, ep: cfg.ep, etp: cfg.etp, timeoutMs: 60_000 });
const firstOfKey = new Map<string, { logits: Float64Array; grads: Full }>();
for (const [index, run] of cfg.runs.entries()) {
  const key = keyOf(run);
  let result: DispatchResult;
  try {
    result = runOne(run, index, key);
  } catch (e) {
    result = {
      run: index,
      id: run.id,
      dispatcher: run.dispatcher,
      key,
      rank: world.rank,
      layout: { tp: 0, ep: 0, etp: 0, dp: 0, expertDp: 0, sequenceParallel: false },
      error: String((e as Error).stack ?? e),
    };
  }
  console.log(`RESULT ${JSON.stringify(result)}`);
}
destroyModelParallel();
await destroyProcessGroup();

function keyOf(r: DispatchRun): string {
  const cap =
    r.capacityFactor === undefined ? 'dropless' : `cf${r.capacityFactor}-${r.dropPolicy ?? 'probs'}`;
  return `${r.id} ${cap}${r.pad ? '-pad' : ''}${r.recompute ? ' recompute' : ''}${r.auxLoss ? ' aux' : ''}${r.seqAux ? ' seqaux' : ''} seq${r.seq ?? cfg.seq}`;
}

function optionsOf(r: DispatchRun): GPTModelOptions {
  return {
    moeTokenDispatcherType: r.dispatcher,
    moeExpertCapacityFactor: r.capacityFactor ?? null,
    moeTokenDropPolicy: r.dropPolicy ?? 'probs',
    moePadExpertInputToCapacity: r.pad ?? false,
    recompute: r.recompute ? { granularity: 'selective', modules: ['moe'] } : null,
    moeAuxLossCoeff: r.auxLoss ? 1e-2 : 0,
    moeZLossCoeff: r.auxLoss ? 1e-3 : 0,
    moeRouterLoadBalancingType: r.seqAux ? 'seq_aux_loss' : 'aux_loss',
    // one process (TP = 1) runs without it whatever is asked
    sequenceParallel: cfg.sequenceParallel ?? false,
  };
}

/** The aux and z losses of the last forward, summed over the model's MoE layers. */
function routerLosses(model: GPTModel): { aux: number; z: number } {
  let aux = 0;
  let z = 0;
  for (const [, m] of model.moeLayers()) {
    aux += m.lastRouting?.auxLoss?.item() ?? 0;
    z += m.lastRouting?.zLoss?.item() ?? 0;
  }
  return { aux, z };
}

/** A deterministic batch [dp · rowsPerRank, seq] of ids and labels. */
function batchOf(config: TransformerConfig, rows: number, seq: number): { ids: Tensor; labels: Tensor } {
  const n = rows * seq;
  const ids = new BigInt64Array(n);
  const labels = new BigInt64Array(n);
  let s = 12345;
  const next = () => {
    s = (s * 1103515245 + 12345) % 2147483648;
    return BigInt(s % config.vocabSize);
  };
  for (let i = 0; i < n; i++) ids[i] = next();
  for (let i = 0; i < n; i++) labels[i] = next();
  return { ids: fromTypedArray(ids, [rows, seq]), labels: fromTypedArray(labels, [rows, seq]) };
}

/** Mean loss of rows plus a tenth of the MTP losses: the objective of one DP rank. */
function objective(model: GPTModel, ids: Tensor, labels: Tensor): Tensor {
  const out = model.forward(ids, { labels });
  let l = (out.loss as Tensor).mean();
  for (const m of out.mtpLosses) l = l.add(m.mul(0.1));
  return l;
}

function runOne(run: DispatchRun, index: number, key: string): DispatchResult {
  const { model, architecture, config } = loadModel(run.dir, optionsOf(run));
  const dp = getDataParallelGroup();
  const expertDp = getExpertDataParallelGroup();
  const { ids, labels } = batchOf(config, dp.size * cfg.rowsPerRank, run.seq ?? cfg.seq);
  const rowsOf = (r: number, t: Tensor) => t.narrow(0, r * cfg.rowsPerRank, cfg.rowsPerRank).contiguous();
  const myIds = rowsOf(dp.rank, ids);
  const myLabels = rowsOf(dp.rank, labels);

  const logits = noGrad(() => {
    const local = model.gatherLogits(model.forward(myIds).logits as Tensor).contiguous();
    return toF64(dp.size > 1 ? cat(allGather(local, dp), 0) : local);
  });
  const loss = objective(model, myIds, myLabels);
  const globalLoss = meanOverDp(loss.item(), dp);
  const rl = routerLosses(model);
  const aux = { aux: meanOverDp(rl.aux, dp), z: meanOverDp(rl.z, dp) };
  // the routing's ids and pairs live on the device until backward frees the graph: read them first
  let dropped = 0;
  let padded = 0;
  for (const [, m] of model.moeLayers()) {
    const r = m.lastRouting;
    if (!r) continue;
    const real = r.routingMap.slot.filter((s) => s >= 0).length;
    dropped += r.indices.length - real;
    padded += r.routingMap.slot.length - real;
  }
  loss.backward();
  const { full, spread } = gatheredGrads(model, architecture, dp, expertDp);
  const load = model.takeGlobalExpertLoad();
  const result: DispatchResult = {
    run: index,
    id: run.id,
    dispatcher: run.dispatcher,
    key,
    rank: world.rank,
    layout: {
      tp: model.tpGroup.size,
      ep: model.epGroup.size,
      etp: model.etpGroup.size,
      dp: dp.size,
      expertDp: expertDp.size,
      sequenceParallel: model.sequenceParallel,
    },
  };
  if (world.rank === 0) {
    const ref = oneProcess(run, ids, labels, dp.size, architecture, config);
    let loadEqual = load.size === ref.load.size && load.size > 0;
    let loadTotal = 0;
    for (const [layer, counts] of ref.load) {
      const got = load.get(layer);
      loadTotal += counts.reduce((a, b) => a + b, 0);
      if (!got || got.some((v, e) => v !== counts[e])) loadEqual = false;
    }
    const first = firstOfKey.get(key);
    const rel = (got: number, want: number) => Math.abs(got - want) / Math.abs(want);
    result.errors = {
      logits: relMaxError(logits, ref.logits),
      loss: Math.abs(globalLoss - ref.loss) / Math.abs(ref.loss),
      grads: compare(full, ref.grads),
      replicaSpread: spread,
      loadEqual,
      loadTotal,
      dropped,
      padded,
      routerLosses: run.auxLoss
        ? {
            aux: rel(aux.aux, ref.aux.aux),
            z: rel(aux.z, ref.aux.z),
            auxValue: ref.aux.aux,
            zValue: ref.aux.z,
          }
        : null,
      vsFirst: first
        ? { logits: relMaxError(logits, first.logits), grads: compare(full, first.grads).max }
        : null,
    };
    if (!first) firstOfKey.set(key, { logits, grads: full });
  }
  model.dispose();
  return result;
}

/** The model on this process alone, fed the DP ranks' rows one router call after another. */
function oneProcess(
  run: DispatchRun,
  ids: Tensor,
  labels: Tensor,
  dpSize: number,
  architecture: string,
  config: TransformerConfig,
): {
  logits: Float64Array;
  loss: number;
  grads: Full;
  load: Map<number, Float64Array>;
  aux: { aux: number; z: number };
} {
  const single = new SingleProcessGroup();
  const { model } = loadModel(run.dir, {
    ...optionsOf(run),
    tpGroup: single,
    epGroup: single,
    etpGroup: single,
  });
  // each call stands for one DP rank, whose aux-loss gradients DDP averages too
  model.auxLossScale = 1 / dpSize;
  const logits: Tensor[] = [];
  let loss = 0;
  const aux = { aux: 0, z: 0 };
  for (let r = 0; r < dpSize; r++) {
    const rows = (t: Tensor) => t.narrow(0, r * cfg.rowsPerRank, cfg.rowsPerRank).contiguous();
    logits.push(noGrad(() => model.gatherLogits(model.forward(rows(ids)).logits as Tensor).contiguous()));
    const l = objective(model, rows(ids), rows(labels));
    loss += l.item() / dpSize;
    const rl = routerLosses(model);
    aux.aux += rl.aux / dpSize;
    aux.z += rl.z / dpSize;
    l.mul(1 / dpSize).backward();
  }
  const plans = planOf(architecture, config);
  const grads: Full = new Map();
  for (const [name, p] of model.namedParameters()) {
    let g = p.grad ?? zeros(p.shape);
    if (plans.get(name)?.partition === 'vocab') g = g.narrow(0, 0, config.vocabSize);
    grads.set(name, toF64(g));
  }
  const load = model.takeExpertLoad();
  const out = { logits: toF64(cat(logits, 0)), loss, grads, load, aux };
  model.dispose();
  return out;
}

/**
 * Every gradient as the full Megatron tensor: dense gradients averaged over DP, expert gradients
 * scaled by 1/DP and summed over expert-DP (Megatron's DDP), TP / expert-TP shards merged with the
 * conversion plan's partition, each EP rank's experts at their global index.
 */
function gatheredGrads(
  model: GPTModel,
  architecture: string,
  dp: ProcessGroup,
  expertDp: ProcessGroup,
): { full: Full; spread: number } {
  const c = model.config;
  const plans = planOf(architecture, c);
  const ep = model.epGroup;
  // norms, router and gates saw this rank's chunk only: Megatron's finalize_model_grads sums them
  if (model.sequenceParallel) allreduceSequenceParallelGrads(model.parameters(), model.tpGroup);
  const perRank = c.moe ? c.moe.numExperts / ep.size : 0;
  const full: Full = new Map();
  let spread = 0;
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
    const group = m ? model.etpGroup : model.tpGroup;
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
      full.set(m ? nameOf(r) : local, toF64(t));
    });
  }
  return { full, spread };
}

/** Max relative error of each gradient against the reference's, and the worst parameter. */
function compare(got: Full, want: Full): { worst: string; max: number; count: number } {
  let worst = '';
  let max = -1;
  for (const [name, w] of want) {
    const g = got.get(name);
    const e = g && g.length === w.length ? relMaxError(g, w) : Number.MAX_VALUE;
    if (e > max) {
      max = e;
      worst = name;
    }
  }
  if (got.size !== want.size)
    return { worst: 'a parameter without a twin', max: Number.MAX_VALUE, count: got.size };
  return { worst, max, count: want.size };
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

function meanOverDp(v: number, dp: ProcessGroup): number {
  if (dp.size === 1) return v;
  const t = zeros([1]).add(v);
  dp.allReduce(t, 'sum').waitSync();
  return t.item() / dp.size;
}

function toF64(t: Tensor): Float64Array {
  return Float64Array.from(t.contiguous().to('float32').toTypedArray() as Float32Array);
}
