// The conversion plan: the weight rules of an architecture, applied to one TransformerConfig and
// one parallel layout, become a list of Megatron tensors. Each knows its global shape, how its rows
// are assembled from Hugging Face tensors (row runs) and how it is cut into per-rank pieces. The
// importer, the exporter and the resharder all stream bytes along this plan.
import type { PieceRank } from '../checkpoint/writer.js';
import { ConvertError } from '../errors.js';
import {
  type PipelineSplit,
  type PipelineStages,
  pipelineStages,
  resolvePipelineSplit,
} from '../pipeline-layout.js';
import type { ArchitectureSpec, HfTensorShape, WeightOp } from '../specs/types.js';
import { findWeightRules } from '../specs/types.js';
import { paddedVocabSize, type TransformerConfig } from '../transformer-config.js';

/**
 * A Megatron parallel layout: the sizes of the TP, PP, EP and expert-TP groups, and how the
 * decoder layers are cut into pipeline stages (even unless a {@link PipelineSplit} setting is given).
 */
export interface ParallelLayout extends PipelineSplit {
  /** Tensor-parallel size. */
  readonly tp: number;
  /** Pipeline-parallel size. */
  readonly pp: number;
  /** Expert-parallel size. */
  readonly ep: number;
  /** Expert tensor-parallel size (Megatron's default: equal to `tp`). */
  readonly etp: number;
}

/** How a Megatron tensor is cut across ranks. */
export type Partition =
  /** One full copy (stored once). */
  | 'replicate'
  /** Column parallel: even split of dim 0. */
  | 'split0'
  /** Row parallel: even split of dim 1. */
  | 'split1'
  /** Vocabulary parallel: dim 0 padded to a multiple of makeVocabSizeDivisibleBy × TP, then split. */
  | 'vocab'
  /** Fused QKV: dim 0 split into whole query groups (a contiguous run of rows per rank). */
  | 'qkv'
  /** Fused SwiGLU fc1 `[gate; up]`: rank r holds `[gate_r; up_r]`, two pieces of the global tensor. */
  | 'gate_up';

/** Rows [start, start + count) of a Megatron tensor come from rows of an HF tensor (null: zero padding). */
export interface RowRun {
  readonly start: number;
  readonly count: number;
  readonly source: string | null;
  readonly sourceStart: number;
}

/** One planned piece of a Megatron tensor: its owning rank and its box of the global tensor. */
export interface PlannedPiece {
  readonly rank: PieceRank;
  readonly offsets: number[];
  readonly shape: number[];
}

/** One Megatron tensor of a conversion plan. */
export interface MegatronTensorPlan {
  /** Megatron-Core name with global layer and expert indices. */
  readonly name: string;
  readonly globalShape: number[];
  readonly partition: Partition;
  /** Global expert index, for expert tensors (split by expert-TP, placed by EP). */
  readonly expert?: number;
  /** Pipeline rank holding the tensor (the `pp` of its pieces' files). */
  readonly stage: number;
  /** Where the rows come from, in increasing row order. */
  readonly rows: RowRun[];
  /** Megatron keeps this tensor in this dtype whatever the model dtype. */
  readonly fixedDtype?: 'F32';
  /** Pieces for the layout, in the order the writer numbers them. */
  readonly pieces: PlannedPiece[];
}

/** An HF tensor that is a copy of (the first rows of) a Megatron tensor: MTP heads, a tied lm_head. */
export interface DuplicatePlan {
  readonly hf: string;
  readonly megatron: string;
  /** The HF tensor the Megatron tensor is imported from (the one the copy must equal). */
  readonly primary: string;
  readonly shape: number[];
}

/** A whole conversion plan. */
export interface ConversionPlan {
  readonly spec: ArchitectureSpec;
  readonly config: TransformerConfig;
  readonly layout: ParallelLayout;
  /** What each pipeline rank (and virtual stage) holds. */
  readonly pipeline: PipelineStages;
  /** Every tensor of an HF checkpoint of this config, in the spec's order. */
  readonly hfTensors: HfTensorShape[];
  /** Megatron tensors, in the order their first HF source appears. */
  readonly tensors: MegatronTensorPlan[];
  readonly duplicates: DuplicatePlan[];
}

/**
 * Fills in `etp` (default `tp`) and the other sizes (default 1), and checks each is a positive
 * integer; the pipeline split is normalized by {@link resolvePipelineSplit} (`vpp` kept only above
 * 1, derived from a layout string; the other settings only when set).
 */
export function resolveLayout(layout: Partial<ParallelLayout> = {}): ParallelLayout {
  const tp = layout.tp ?? 1;
  const out = { tp, pp: layout.pp ?? 1, ep: layout.ep ?? 1, etp: layout.etp ?? tp };
  for (const [k, v] of Object.entries(out)) {
    if (!Number.isSafeInteger(v) || v < 1) {
      throw new ConvertError('INVALID_ARGUMENT', `layout ${k}=${v} must be a positive integer`);
    }
  }
  return { ...out, ...resolvePipelineSplit(out.pp, layout) };
}

/** The pipeline stages of `cfg` cut by `layout` (see {@link pipelineStages}). */
export function layoutPipelineStages(cfg: TransformerConfig, layout: ParallelLayout): PipelineStages {
  return pipelineStages({ ...layout, numLayers: cfg.numLayers, mtpNumLayers: cfg.mtpNumLayers });
}

function divides(what: string, n: number, by: number, size: string, why: string): void {
  if (n % by !== 0) {
    throw new ConvertError('INVALID_ARGUMENT', `${size}=${by} does not divide ${what} ${n} (${why})`);
  }
}

/**
 * Checks that `layout` can hold `cfg`: the pipeline split fits its layers, every other split is
 * even and keeps heads and groups whole. Returns the pipeline stages.
 */
export function checkLayout(cfg: TransformerConfig, layout: ParallelLayout): PipelineStages {
  const { tp, ep, etp } = layout;
  const pipeline = layoutPipelineStages(cfg, layout);
  divides(
    'numAttentionHeads',
    cfg.numAttentionHeads,
    tp,
    'tp',
    'each tensor-parallel rank holds whole heads',
  );
  if (!cfg.mla) {
    divides(
      'numQueryGroups',
      cfg.numQueryGroups,
      tp,
      'tp',
      'each tensor-parallel rank holds whole KV groups',
    );
  }
  const dense = !cfg.moe || cfg.moe.layerPattern.includes('dense');
  if (dense) divides('ffnHiddenSize', cfg.ffnHiddenSize, tp, 'tp', 'the dense MLP is split across TP');
  if (cfg.mtpNumLayers > 0)
    divides('hiddenSize', cfg.hiddenSize, tp, 'tp', 'the MTP eh_proj is split across TP');
  if (cfg.moe) {
    divides(
      'numExperts',
      cfg.moe.numExperts,
      ep,
      'ep',
      'each expert-parallel rank holds the same number of experts',
    );
    divides(
      'moeFfnHiddenSize',
      cfg.moe.moeFfnHiddenSize,
      etp,
      'etp',
      'expert MLPs are split across expert-TP',
    );
    if (cfg.moe.sharedExpertIntermediateSize > 0) {
      divides(
        'sharedExpertIntermediateSize',
        cfg.moe.sharedExpertIntermediateSize,
        tp,
        'tp',
        'the shared expert is split across TP',
      );
    }
  } else if (ep > 1 || etp !== tp) {
    throw new ConvertError('INVALID_ARGUMENT', `ep=${ep} / etp=${etp} need a mixture-of-experts model`);
  }
  return pipeline;
}

function partitionOf(op: WeightOp): Partition {
  switch (op.type) {
    case 'replicate':
      return 'replicate';
    case 'vocab':
      return 'vocab';
    case 'split':
      return op.dim === 0 ? 'split0' : 'split1';
    case 'qkv':
      return 'qkv';
    case 'gate_up':
      return 'gate_up';
    case 'expert':
      return partitionOf(op.inner);
    case 'duplicate':
      throw new ConvertError('INVALID_ARGUMENT', 'a duplicate rule has no partition');
  }
}

/** Even split of `n` into `parts`: the start and size of part `i`. */
function share(n: number, parts: number, i: number): [number, number] {
  const s = n / parts;
  return [i * s, s];
}

/** The pieces of a tensor of `globalShape` with `partition` across `size` ranks. */
function cut(
  globalShape: readonly number[],
  partition: Partition,
  size: number,
  rank: (r: number) => PieceRank,
): PlannedPiece[] {
  const full = (r: number, offsets: number[], shape: number[]) => ({ rank: rank(r), offsets, shape });
  const zeros = globalShape.map(() => 0);
  // One rank holds the whole tensor, fused fc1 included ([gate; up] is then one box).
  if (partition === 'replicate' || size === 1) return [full(0, zeros, [...globalShape])];
  const out: PlannedPiece[] = [];
  if (partition === 'gate_up') {
    const f = globalShape[0] / 2;
    for (let r = 0; r < size; r++) {
      const [start, n] = share(f, size, r);
      // Rank r's [gate_r; up_r] is two boxes of the global [gate; up].
      for (const half of [0, f]) {
        out.push(full(r, [half + start, ...zeros.slice(1)], [n, ...globalShape.slice(1)]));
      }
    }
    return out;
  }
  const dim = partition === 'split1' ? 1 : 0;
  for (let r = 0; r < size; r++) {
    const [start, n] = share(globalShape[dim], size, r);
    const offsets = [...zeros];
    const shape = [...globalShape];
    offsets[dim] = start;
    shape[dim] = n;
    out.push(full(r, offsets, shape));
  }
  return out;
}

function shapeEq(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

interface Source {
  readonly hf: HfTensorShape;
  readonly op: WeightOp;
  readonly bindings: Record<string, number>;
  readonly fixedDtype?: 'F32';
}

/**
 * Plans the conversion of `cfg` (built by `spec`) to `layout`: groups the HF tensors by the
 * Megatron tensor their rule names, derives global shapes and row runs, and cuts the pieces.
 */
export function planConversion(
  spec: ArchitectureSpec,
  cfg: TransformerConfig,
  layoutIn: Partial<ParallelLayout> = {},
): ConversionPlan {
  const layout = resolveLayout(layoutIn);
  const pipeline = checkLayout(cfg, layout);
  const hfTensors = spec.expectedHfTensors(cfg);
  const groups = new Map<string, Source[]>();
  const duplicates: { hf: HfTensorShape; megatron: string }[] = [];
  for (const hf of hfTensors) {
    const matches = findWeightRules(spec.weightRules, hf.name, cfg);
    if (matches.length !== 1) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `${spec.architectures[0]}: HF tensor ${JSON.stringify(hf.name)} matches ${matches.length} weight rules, expected 1`,
      );
    }
    const [{ rule, megatron }] = matches;
    if (rule.op.type === 'duplicate') {
      duplicates.push({ hf, megatron });
      continue;
    }
    const list = groups.get(megatron) ?? [];
    list.push({
      hf,
      op: rule.op,
      bindings: bindingsOf(rule.megatron, megatron),
      ...(rule.dtype ? { fixedDtype: rule.dtype } : {}),
    });
    groups.set(megatron, list);
  }
  const tensors: MegatronTensorPlan[] = [];
  for (const [name, sources] of groups) tensors.push(planTensor(name, sources, cfg, layout, pipeline));
  const byName = new Map(tensors.map((t) => [t.name, t]));
  const dupPlans = duplicates.map(({ hf, megatron }) => {
    const target = byName.get(megatron);
    const primary = target?.rows.find((r) => r.source !== null)?.source;
    if (!target || !primary) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `${spec.architectures[0]}: HF tensor ${JSON.stringify(hf.name)} duplicates ${megatron}, which no other tensor provides`,
      );
    }
    return { hf: hf.name, megatron, primary, shape: [...hf.shape] };
  });
  return { spec, config: cfg, layout, pipeline, hfTensors, tensors, duplicates: dupPlans };
}

// Placeholder values of a filled Megatron name, recovered by matching it against its pattern.
function bindingsOf(pattern: string, name: string): Record<string, number> {
  const keys: string[] = [];
  const re = pattern
    .split(/\{(layer|expert|mtp|mtpLayer)\}/)
    .map((part, i) => {
      if (i % 2 === 1) {
        keys.push(part);
        return '(\\d+)';
      }
      return part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    })
    .join('');
  const m = new RegExp(`^${re}$`).exec(name);
  const out: Record<string, number> = {};
  keys.forEach((k, i) => {
    out[k] = Number(m?.[i + 1]);
  });
  return out;
}

function planTensor(
  name: string,
  sources: Source[],
  cfg: TransformerConfig,
  layout: ParallelLayout,
  pipeline: PipelineStages,
): MegatronTensorPlan {
  const first = sources[0];
  const partition = partitionOf(first.op);
  const expert = first.bindings.expert;
  const where = `Megatron tensor ${JSON.stringify(name)}`;
  for (const s of sources) {
    if (partitionOf(s.op) !== partition || s.bindings.expert !== expert) {
      throw new ConvertError('INVALID_ARGUMENT', `${where}: its HF sources disagree on how it is split`);
    }
  }
  const part = (p: string): Source => {
    const s = sources.find((x) => {
      const op = x.op.type === 'expert' ? x.op.inner : x.op;
      return 'part' in op && op.part === p;
    });
    if (!s) throw new ConvertError('INVALID_ARGUMENT', `${where}: no HF source for its ${p} part`);
    return s;
  };
  let globalShape: number[];
  const rows: RowRun[] = [];
  const rest = first.hf.shape.slice(1);
  const packed = sources.find((x) => {
    const op = x.op.type === 'expert' ? x.op.inner : x.op;
    return 'part' in op && (op.part === 'qkv' || op.part === 'gate_up');
  });
  if (packed && sources.length !== 1) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `${where}: ${packed.hf.name} packs all its parts, yet ${sources.length - 1} other HF tensors map to it`,
    );
  }
  if (packed && partition === 'qkv') {
    // HF [q (all heads); k; v] → Megatron's [q_g; k_g; v_g] per query group
    const t = packed.hf;
    const g = cfg.numQueryGroups;
    const d = cfg.kvChannels;
    const qRows = (cfg.numAttentionHeads / g) * d;
    if (t.shape[0] !== (qRows + 2 * d) * g) {
      throw new ConvertError(
        'SHAPE_MISMATCH',
        `${t.name}: shape [${t.shape.join(',')}] does not fit ${cfg.numAttentionHeads} query and ${g} key/value heads of head dim ${d}`,
      );
    }
    for (let i = 0; i < g; i++) {
      const base = i * (qRows + 2 * d);
      rows.push({ start: base, count: qRows, source: t.name, sourceStart: i * qRows });
      rows.push({ start: base + qRows, count: d, source: t.name, sourceStart: qRows * g + i * d });
      rows.push({ start: base + qRows + d, count: d, source: t.name, sourceStart: (qRows + d) * g + i * d });
    }
    globalShape = [...t.shape];
  } else if (packed) {
    // HF [gate; up] is Megatron's global fc1 as it is
    const t = packed.hf;
    if (t.shape[0] % 2 !== 0) {
      throw new ConvertError('SHAPE_MISMATCH', `${t.name}: ${t.shape[0]} rows cannot be [gate; up] halves`);
    }
    rows.push({ start: 0, count: t.shape[0], source: t.name, sourceStart: 0 });
    globalShape = [...t.shape];
  } else if (partition === 'qkv') {
    const q = part('q').hf;
    const k = part('k').hf;
    const v = part('v').hf;
    const g = cfg.numQueryGroups;
    const d = cfg.kvChannels;
    const qRows = (cfg.numAttentionHeads / g) * d;
    for (const [t, n] of [
      [q, qRows * g],
      [k, d * g],
      [v, d * g],
    ] as const) {
      if (t.shape[0] !== n || !shapeEq(t.shape.slice(1), rest)) {
        throw new ConvertError(
          'SHAPE_MISMATCH',
          `${t.name}: shape [${t.shape.join(',')}] does not fit ${g} query groups of head dim ${d}`,
        );
      }
    }
    for (let i = 0; i < g; i++) {
      const base = i * (qRows + 2 * d);
      rows.push({ start: base, count: qRows, source: q.name, sourceStart: i * qRows });
      rows.push({ start: base + qRows, count: d, source: k.name, sourceStart: i * d });
      rows.push({ start: base + qRows + d, count: d, source: v.name, sourceStart: i * d });
    }
    globalShape = [(qRows + 2 * d) * g, ...rest];
  } else if (partition === 'gate_up') {
    const gate = part('gate').hf;
    const up = part('up').hf;
    if (!shapeEq(gate.shape, up.shape)) {
      throw new ConvertError(
        'SHAPE_MISMATCH',
        `${up.name}: shape [${up.shape.join(',')}] differs from ${gate.name} [${gate.shape.join(',')}]`,
      );
    }
    const f = gate.shape[0];
    rows.push({ start: 0, count: f, source: gate.name, sourceStart: 0 });
    rows.push({ start: f, count: f, source: up.name, sourceStart: 0 });
    globalShape = [2 * f, ...rest];
  } else {
    if (sources.length !== 1) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `${where}: ${sources.length} HF tensors map to it, expected 1`,
      );
    }
    const n = first.hf.shape.length === 0 ? 1 : first.hf.shape[0];
    rows.push({ start: 0, count: n, source: first.hf.name, sourceStart: 0 });
    globalShape = [...first.hf.shape];
    if (partition === 'vocab') {
      const padded = paddedVocabSize(n, cfg.makeVocabSizeDivisibleBy, layout.tp);
      if (padded > n) rows.push({ start: n, count: padded - n, source: null, sourceStart: 0 });
      globalShape = [padded, ...rest];
    }
  }
  if (
    (partition === 'split1' && globalShape.length < 2) ||
    (partition !== 'replicate' && globalShape.length < 1)
  ) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `${where}: shape [${globalShape.join(',')}] cannot be ${partition}`,
    );
  }
  const stage = stageOf(name, first.bindings, pipeline);
  const isExpert = expert !== undefined;
  const size = isExpert ? layout.etp : layout.tp;
  const epRank = isExpert && cfg.moe ? Math.floor(expert / (cfg.moe.numExperts / layout.ep)) : 0;
  const dim = partition === 'split1' ? 1 : 0;
  if (partition !== 'replicate') {
    const n = partition === 'gate_up' ? globalShape[0] / 2 : globalShape[dim];
    if (n % size !== 0) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `${where}: dim ${dim} of shape [${globalShape.join(',')}] cannot be split ${size} ways (${isExpert ? 'etp' : 'tp'}=${size})`,
      );
    }
  }
  const pieces = cut(globalShape, partition, size, (r) => ({ tp: r, pp: stage, ep: epRank }));
  return {
    name,
    globalShape,
    partition,
    ...(isExpert ? { expert } : {}),
    stage,
    rows,
    ...(first.fixedDtype ? { fixedDtype: first.fixedDtype } : {}),
    pieces,
  };
}

/**
 * Pipeline rank of a tensor: its decoder or MTP layer's, the first for the embedding, the final
 * norm's (next to the last decoder layer when there are MTP layers), else the loss stage's.
 */
function stageOf(name: string, bindings: Record<string, number>, pipeline: PipelineStages): number {
  const rankOf = (i: number) => pipeline.stages[i].ppRank;
  if (bindings.layer !== undefined) return rankOf(pipeline.layerStage[bindings.layer]);
  if (bindings.mtp !== undefined) return rankOf(pipeline.mtpStage[bindings.mtp]);
  if (name.startsWith('embedding.')) return 0;
  if (name.startsWith('decoder.final_layernorm.')) return rankOf(pipeline.finalLayernormStage);
  // The output layer sits on the loss stage: the last rank.
  return pipeline.pp - 1;
}
