// Megatron-Core's rank layout (megatron/core/parallel_state.py): the world is a grid of parallel
// axes laid out in an order string such as 'tp-cp-ep-dp-pp', the leftmost axis with stride 1, so
// rank = tp + TP·(cp + CP·(dp + DP·pp)) in the default order and TP peers are neighbours (same
// NVLink island). A group of kind 'tp-dp' holds the ranks that differ only in their tp and dp
// coordinates. Pure arithmetic: no process groups, no I/O.
import { DistributedError } from './errors.js';

/** The parallel axes of the grid. */
export type ParallelAxis = 'tp' | 'cp' | 'ep' | 'dp' | 'pp';

/** Megatron's default order: TP fastest-varying, PP slowest. */
export const DEFAULT_ORDER = 'tp-cp-ep-dp-pp';

// Megatron appends the axes an order leaves out in this order (the keys of its name_to_size map).
const AXES: readonly ParallelAxis[] = ['tp', 'pp', 'dp', 'ep', 'cp'];

export interface RankGeneratorOptions {
  /** Tensor-parallel size. */
  tp: number;
  /** Expert-parallel size (1 in the dense generator). */
  ep: number;
  /** Data-parallel size. */
  dp: number;
  /** Pipeline-parallel size. */
  pp: number;
  /** Context-parallel size (1 in the expert generator). */
  cp: number;
  /** Axes from fastest- to slowest-varying, joined by '-' (default 'tp-cp-ep-dp-pp'). */
  order?: string;
  /** Added to every rank of every group (default 0). */
  rankOffset?: number;
}

/** Every group of rank lists of each kind that Megatron's initialize_model_parallel forms. */
export interface ParallelGroups {
  worldSize: number;
  /** The order string, lower-cased. */
  order: string;
  /** Sizes of both grids: the dense one (tp·cp·dp·pp) and the expert one (etp·ep·expertDp·pp). */
  sizes: { tp: number; pp: number; cp: number; dp: number; ep: number; etp: number; expertDp: number };
  /** 'dp': Megatron's data-parallel groups (_DATA_PARALLEL_GROUP). */
  dp: number[][];
  /** 'dp-cp': data-parallel groups with context parallelism (_DATA_PARALLEL_GROUP_WITH_CP). */
  dpCp: number[][];
  /** 'cp': context-parallel groups. */
  cp: number[][];
  /** 'tp': tensor-model-parallel groups. */
  tp: number[][];
  /** 'pp': pipeline-model-parallel groups. */
  pp: number[][];
  /** 'tp-pp': model-parallel groups (_MODEL_PARALLEL_GROUP). */
  tpPp: number[][];
  /** 'tp-cp': tensor-and-context-parallel groups. */
  tpCp: number[][];
  /** 'tp-dp-cp': tensor-and-data-parallel groups with context parallelism. */
  tpDpCp: number[][];
  /** 'tp-dp': tensor-and-data-parallel groups. */
  tpDp: number[][];
  /** First and last rank of each pipeline group (only that rank when pp = 1). */
  embedding: number[][];
  /** First rank of each pipeline group. */
  positionEmbedding: number[][];
  /** Expert grid 'ep': expert-model-parallel groups. */
  ep: number[][];
  /** Expert grid 'tp': expert-tensor-parallel groups. */
  expertTp: number[][];
  /** Expert grid 'tp-ep': _EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP. */
  tpEp: number[][];
  /** Expert grid 'tp-ep-pp': _EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP. */
  tpEpPp: number[][];
  /** Expert grid 'dp': expert-data-parallel groups. */
  expertDp: number[][];
}

/** The group kinds of `ParallelGroups`, in the order Megatron creates their process groups. */
export const GROUP_KINDS = [
  'dpCp',
  'dp',
  'cp',
  'tpPp',
  'tp',
  'pp',
  'embedding',
  'positionEmbedding',
  'tpDpCp',
  'tpDp',
  'tpCp',
  'ep',
  'expertTp',
  'tpEp',
  'tpEpPp',
  'expertDp',
] as const;

export type GroupKind = (typeof GROUP_KINDS)[number];

export interface ComputeParallelGroupsOptions {
  tp?: number;
  pp?: number;
  cp?: number;
  ep?: number;
  /** Expert tensor-parallel size (default: tp). */
  etp?: number;
  order?: string;
}

function invalid(op: string, message: string): DistributedError {
  return new DistributedError('INVALID_ARGUMENT', `${op}: ${message}`);
}

function checkSize(op: string, name: string, value: number): void {
  if (!Number.isInteger(value) || value < 1) {
    throw invalid(op, `${name} must be a positive integer, got ${value}; pass a size of 1 or more`);
  }
}

function product(values: readonly number[]): number {
  return values.reduce((a, b) => a * b, 1);
}

/**
 * The groups of `worldSize` ranks laid out on a grid of `parallelSizes` (fastest-varying first)
 * whose members differ only along the axes where `mask` is true. Group g fixes the unmasked
 * coordinates to g written in the mixed radix of the unmasked sizes; member i takes the masked
 * coordinates from i the same way. Megatron's generate_masked_orthogonal_rank_groups.
 */
export function generateMaskedOrthogonalRankGroups(
  worldSize: number,
  parallelSizes: readonly number[],
  mask: readonly boolean[],
): number[][] {
  const op = 'generateMaskedOrthogonalRankGroups';
  if (parallelSizes.length !== mask.length) {
    throw invalid(
      op,
      `${parallelSizes.length} sizes but ${mask.length} mask entries; pass one mask entry per axis`,
    );
  }
  for (const [i, s] of parallelSizes.entries()) checkSize(op, `parallelSizes[${i}]`, s);
  if (product(parallelSizes) !== worldSize) {
    throw invalid(
      op,
      `world size ${worldSize} is not the product of the sizes [${parallelSizes}] = ${product(parallelSizes)}; pass sizes that multiply to the world size`,
    );
  }
  const strides: number[] = [];
  let stride = 1;
  for (const s of parallelSizes) {
    strides.push(stride);
    stride *= s;
  }
  const pick = (want: boolean) => ({
    sizes: parallelSizes.filter((_, i) => mask[i] === want),
    strides: strides.filter((_, i) => mask[i] === want),
  });
  const inside = pick(true);
  const across = pick(false);
  const groupSize = product(inside.sizes);
  const numGroups = worldSize / groupSize;
  const groups: number[][] = [];
  for (let g = 0; g < numGroups; g++) {
    const base = offsetOf(g, across.sizes, across.strides);
    const ranks: number[] = [];
    for (let i = 0; i < groupSize; i++) ranks.push(base + offsetOf(i, inside.sizes, inside.strides));
    groups.push(ranks);
  }
  return groups;
}

// Writes `index` in the mixed radix `sizes` (first digit fastest) and weighs each digit by its stride.
function offsetOf(index: number, sizes: readonly number[], strides: readonly number[]): number {
  let offset = 0;
  for (let k = 0; k < sizes.length; k++) {
    offset += (index % sizes[k]) * strides[k];
    index = Math.floor(index / sizes[k]);
  }
  return offset;
}

/**
 * Splits an order string into axes, lower-cased, and appends (as Megatron does) the axes it leaves
 * out, which must then have size 1.
 */
function parseOrder(op: string, order: string, sizes: Record<ParallelAxis, number>): ParallelAxis[] {
  const tokens = order.toLowerCase().split('-');
  const axes: ParallelAxis[] = [];
  for (const t of tokens) {
    if (!(AXES as readonly string[]).includes(t)) {
      throw invalid(
        op,
        `order '${order}' has an unknown axis '${t}'; use axes from tp, cp, ep, dp, pp joined by '-'`,
      );
    }
    if (axes.includes(t as ParallelAxis)) {
      throw invalid(op, `order '${order}' names ${t} twice; name each axis once, e.g. '${DEFAULT_ORDER}'`);
    }
    axes.push(t as ParallelAxis);
  }
  for (const a of AXES) {
    if (axes.includes(a)) continue;
    if (sizes[a] !== 1) {
      throw invalid(
        op,
        `${a} has size ${sizes[a]} but the order '${order}' does not name it; add ${a} to the order, e.g. '${DEFAULT_ORDER}'`,
      );
    }
    axes.push(a);
  }
  return axes;
}

/** Megatron's RankGenerator: the rank groups of one grid (dense: ep = 1; expert: cp = 1). */
export class RankGenerator {
  readonly tp: number;
  readonly ep: number;
  readonly dp: number;
  readonly pp: number;
  readonly cp: number;
  readonly rankOffset: number;
  readonly worldSize: number;
  /** The order, lower-cased, with the axes it left out appended. */
  readonly order: string;
  /** Size of each axis of `order`, in that order. */
  readonly orderedSizes: readonly number[];
  private readonly axes: readonly ParallelAxis[];

  constructor({ tp, ep, dp, pp, cp, order = DEFAULT_ORDER, rankOffset = 0 }: RankGeneratorOptions) {
    const op = 'RankGenerator';
    const sizes = { tp, ep, dp, pp, cp };
    for (const a of AXES) checkSize(op, a, sizes[a]);
    if (!Number.isInteger(rankOffset) || rankOffset < 0) {
      throw invalid(op, `rankOffset must be a non-negative integer, got ${rankOffset}`);
    }
    // CP lives only in the dense grid and EP only in the expert grid; one grid with both is a mistake.
    if (ep > 1 && cp > 1) {
      throw invalid(
        op,
        `ep ${ep} and cp ${cp} are both > 1 in one generator; build the dense grid with ep 1 and the expert grid with cp 1`,
      );
    }
    this.axes = parseOrder(op, order, sizes);
    this.tp = tp;
    this.ep = ep;
    this.dp = dp;
    this.pp = pp;
    this.cp = cp;
    this.rankOffset = rankOffset;
    this.worldSize = tp * ep * dp * pp * cp;
    this.order = this.axes.join('-');
    this.orderedSizes = this.axes.map((a) => sizes[a]);
  }

  /** The rank groups of a kind such as 'tp', 'dp-cp' or 'tp-ep-pp' (axes in any order). */
  getRanks(token: string): number[][] {
    const mask = this.axes.map(() => false);
    for (const t of token.toLowerCase().split('-')) {
      const i = this.axes.indexOf(t as ParallelAxis);
      if (i < 0) {
        throw invalid(
          'RankGenerator.getRanks',
          `unknown axis '${t}' in '${token}'; use axes from ${this.order}`,
        );
      }
      mask[i] = true;
    }
    const groups = generateMaskedOrthogonalRankGroups(this.worldSize, this.orderedSizes, mask);
    if (this.rankOffset === 0) return groups;
    return groups.map((g) => g.map((r) => r + this.rankOffset));
  }
}

/** Compares two lists of rank groups element by element. */
function sameGroups(a: readonly number[][], b: readonly number[][]): boolean {
  return (
    a.length === b.length && a.every((g, i) => g.length === b[i].length && g.every((r, j) => r === b[i][j]))
  );
}

/** `computeParallelGroups` with errors that name `op` (initializeModelParallel reuses it). */
export function planParallelGroups(
  op: string,
  worldSize: number,
  opts: ComputeParallelGroupsOptions,
): ParallelGroups {
  const { tp = 1, pp = 1, cp = 1, ep = 1, order = DEFAULT_ORDER } = opts;
  const etp = opts.etp ?? tp;
  checkSize(op, 'world size', worldSize);
  for (const [name, v] of Object.entries({ tp, pp, cp, ep, etp })) checkSize(op, name, v);

  const modelSize = tp * pp * cp;
  if (worldSize % modelSize !== 0) {
    throw invalid(
      op,
      `world size ${worldSize} is not divisible by tp ${tp} × pp ${pp} × cp ${cp} = ${modelSize}; use a world size that is a multiple of ${modelSize} or change tp/pp/cp`,
    );
  }
  const expertModelSize = etp * ep * pp;
  if (worldSize % expertModelSize !== 0) {
    throw invalid(
      op,
      `world size ${worldSize} is not divisible by etp ${etp} × ep ${ep} × pp ${pp} = ${expertModelSize}; use a world size that is a multiple of ${expertModelSize} or change etp/ep/pp`,
    );
  }
  const dp = worldSize / modelSize;
  const expertDp = worldSize / expertModelSize;
  // Check the order against both grids here so that its errors name `op`, not RankGenerator.
  parseOrder(op, order, { tp, cp, dp, pp, ep: 1 });
  parseOrder(op, order, { tp: etp, cp: 1, dp: expertDp, pp, ep });
  const lowerOrder = order.toLowerCase();
  // With pp not the slowest axis, the pp stride depends on the axes before it, so the two grids
  // only agree on pipeline stages when their data-parallel sizes match (Megatron asserts this).
  if (!lowerOrder.endsWith('pp') && pp > 1 && expertDp !== dp) {
    throw invalid(
      op,
      `order '${order}' does not end with pp, so with pp ${pp} the expert data-parallel size ${expertDp} must equal the data-parallel size ${dp}; make etp × ep equal tp × cp or put pp last`,
    );
  }

  const dense = new RankGenerator({ tp, ep: 1, dp, pp, cp, order });
  const expert = new RankGenerator({ tp: etp, ep, dp: expertDp, pp, cp: 1, order });
  const ppGroups = dense.getRanks('pp');
  const expertPpGroups = expert.getRanks('pp');
  // Experts and attention of one layer live on the same pipeline stage, so both grids must agree.
  if (!sameGroups(ppGroups, expertPpGroups)) {
    throw invalid(
      op,
      `the dense and expert grids give different pipeline groups for order '${order}' (first: [${ppGroups[0]}] vs [${expertPpGroups[0]}]); put pp last in the order or make etp equal tp`,
    );
  }

  return {
    worldSize,
    order: lowerOrder,
    sizes: { tp, pp, cp, dp, ep, etp, expertDp },
    dp: dense.getRanks('dp'),
    dpCp: dense.getRanks('dp-cp'),
    cp: dense.getRanks('cp'),
    tp: dense.getRanks('tp'),
    pp: ppGroups,
    tpPp: dense.getRanks('tp-pp'),
    tpCp: dense.getRanks('tp-cp'),
    tpDpCp: dense.getRanks('tp-dp-cp'),
    tpDp: dense.getRanks('tp-dp'),
    embedding: ppGroups.map((g) => (g.length === 1 ? [g[0]] : [g[0], g[g.length - 1]])),
    positionEmbedding: ppGroups.map((g) => [g[0]]),
    ep: expert.getRanks('ep'),
    expertTp: expert.getRanks('tp'),
    tpEp: expert.getRanks('tp-ep'),
    tpEpPp: expert.getRanks('tp-ep-pp'),
    expertDp: expert.getRanks('dp'),
  };
}

/**
 * Every group's rank lists for `worldSize` ranks, as Megatron's initialize_model_parallel forms
 * them: the dense grid (tp, cp, dp = world/(tp·pp·cp), pp) and the expert grid (etp, ep,
 * expertDp = world/(etp·ep·pp), pp), which must share their pipeline groups.
 */
export function computeParallelGroups(
  worldSize: number,
  opts: ComputeParallelGroupsOptions = {},
): ParallelGroups {
  return planParallelGroups('computeParallelGroups', worldSize, opts);
}
