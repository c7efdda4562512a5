// Megatron-Core's parallel state (megatron/core/parallel_state.py) in camelCase: one call creates
// the process groups of every parallel kind that this rank belongs to, laid out in Megatron's rank
// order, and the accessors hand them out. State is per process, like Megatron's module globals.
import { destroyGroup, getRank, getWorldSize, isInitialized, newGroup } from './distributed.js';
import { DistributedError } from './errors.js';
import type { ProcessGroup } from './process-group.js';
import { GROUP_KINDS, type GroupKind, type ParallelGroups, planParallelGroups } from './rank-generator.js';

/** The sizes of initializeModelParallel, by Megatron's names or the short ones (not both differently). */
export interface ModelParallelOptions {
  tensorModelParallelSize?: number;
  tp?: number;
  pipelineModelParallelSize?: number;
  pp?: number;
  /** Model chunks per pipeline stage for the interleaved schedule; needs pp > 1. */
  virtualPipelineModelParallelSize?: number;
  vpp?: number;
  contextParallelSize?: number;
  cp?: number;
  expertModelParallelSize?: number;
  ep?: number;
  /** Default: the tensor-parallel size. */
  expertTensorParallelSize?: number;
  etp?: number;
  /** Axes from fastest- to slowest-varying (default 'tp-cp-ep-dp-pp'). */
  order?: string;
  /** Timeout of every operation on the new groups, in milliseconds. */
  timeoutMs?: number;
}

// Megatron's name of each size, then ours.
const SIZE_KEYS = [
  ['tensorModelParallelSize', 'tp'],
  ['pipelineModelParallelSize', 'pp'],
  ['virtualPipelineModelParallelSize', 'vpp'],
  ['contextParallelSize', 'cp'],
  ['expertModelParallelSize', 'ep'],
  ['expertTensorParallelSize', 'etp'],
] as const;
type ShortKey = (typeof SIZE_KEYS)[number][1];
const KNOWN_KEYS = new Set<string>([...SIZE_KEYS.flat(), 'order', 'timeoutMs']);

// The name each group is created with (seen in error messages), by kind.
const GROUP_NAMES: Record<GroupKind, string> = {
  dpCp: 'dp-cp',
  dp: 'dp',
  cp: 'cp',
  tpPp: 'mp',
  tp: 'tp',
  pp: 'pp',
  embedding: 'embd',
  positionEmbedding: 'pos-embd',
  tpDpCp: 'tp-dp-cp',
  tpDp: 'tp-dp',
  tpCp: 'tp-cp',
  ep: 'ep',
  expertTp: 'expert-tp',
  tpEp: 'tp-ep',
  tpEpPp: 'tp-ep-pp',
  expertDp: 'expert-dp',
};

interface State {
  plan: ParallelGroups;
  /** This rank's group of each kind; null where it belongs to none (embedding groups only). */
  groups: Record<GroupKind, ProcessGroup | null>;
  /** Every group newGroup returned, destroyed by destroyModelParallel. */
  created: ProcessGroup[];
}

let state: State | null = null;
let initializing = false;
let virtualRank: number | null = null;
let virtualWorldSize: number | null = null;

function notInitialized(op: string): DistributedError {
  return new DistributedError(
    'NOT_INITIALIZED',
    `${op}: model parallel groups are not initialised; call initializeModelParallel() first`,
  );
}

function invalid(message: string): DistributedError {
  return new DistributedError('INVALID_ARGUMENT', `initializeModelParallel: ${message}`);
}

// This rank's group of `kind`; `op` names the accessor in the error.
function groupOf(op: string, kind: GroupKind): ProcessGroup {
  if (!state) throw notInitialized(op);
  const group = state.groups[kind];
  if (!group)
    throw new DistributedError(
      'NOT_INITIALIZED',
      `${op}: this rank belongs to no ${GROUP_NAMES[kind]} group`,
    );
  return group;
}

// Merges Megatron's long keys with the short ones; a size given both ways must agree.
function readSizes(opts: ModelParallelOptions): Partial<Record<ShortKey, number>> {
  for (const key of Object.keys(opts)) {
    if (!KNOWN_KEYS.has(key)) {
      throw invalid(`unknown option '${key}'; use ${[...KNOWN_KEYS].join(', ')}`);
    }
  }
  const sizes: Partial<Record<ShortKey, number>> = {};
  for (const [long, short] of SIZE_KEYS) {
    const a = opts[long];
    const b = opts[short];
    if (a !== undefined && b !== undefined && a !== b) {
      throw invalid(`${long} ${a} and ${short} ${b} disagree; pass one of them`);
    }
    const v = a ?? b;
    if (v !== undefined) sizes[short] = v;
  }
  return sizes;
}

/**
 * Creates the process groups of Megatron's parallel layout (tp, pp, dp, cp, their combinations,
 * embedding groups and the expert grid). Every rank must call it with the same options after
 * initProcessGroup(); it calls newGroup for every group list in one order on every rank.
 */
export async function initializeModelParallel(opts: ModelParallelOptions = {}): Promise<void> {
  if (state || initializing) {
    throw invalid('model parallel groups are already initialised; call destroyModelParallel() first');
  }
  if (!isInitialized()) {
    throw new DistributedError(
      'NOT_INITIALIZED',
      'initializeModelParallel: the default process group is not initialised; call initProcessGroup() first',
    );
  }
  const { tp, pp, vpp, cp, ep, etp } = readSizes(opts);
  const plan = planParallelGroups('initializeModelParallel', getWorldSize(), {
    tp,
    pp,
    cp,
    ep,
    etp,
    order: opts.order,
  });
  if (vpp !== undefined) {
    if (!Number.isInteger(vpp) || vpp < 1) {
      throw invalid(`virtualPipelineModelParallelSize must be a positive integer, got ${vpp}`);
    }
    if (plan.sizes.pp < 2) {
      throw invalid(
        `virtualPipelineModelParallelSize ${vpp} needs pipelineModelParallelSize > 1 (the interleaved schedule); set pp ≥ 2 or drop vpp`,
      );
    }
  }

  const rank = getRank();
  const groups = Object.fromEntries(GROUP_KINDS.map((k) => [k, null])) as Record<
    GroupKind,
    ProcessGroup | null
  >;
  const created: ProcessGroup[] = [];
  initializing = true;
  try {
    for (const kind of GROUP_KINDS) {
      const groupOpts =
        opts.timeoutMs === undefined
          ? { name: GROUP_NAMES[kind] }
          : { name: GROUP_NAMES[kind], timeoutMs: opts.timeoutMs };
      for (const ranks of plan[kind]) {
        const group = await newGroup(ranks, groupOpts);
        if (group) created.push(group);
        if (!ranks.includes(rank)) continue;
        if (!group) {
          throw new DistributedError(
            'BACKEND',
            `initializeModelParallel: newGroup returned no ${GROUP_NAMES[kind]} group for member rank ${rank} of [${ranks}]`,
          );
        }
        groups[kind] = group;
      }
    }
  } catch (err) {
    for (const g of created) destroyGroup(g);
    throw err;
  } finally {
    initializing = false;
  }
  state = { plan, groups, created };
  virtualRank = vpp === undefined ? null : 0;
  virtualWorldSize = vpp ?? null;
}

/** Whether the tensor-, pipeline- and data-parallel groups exist. */
export function modelParallelIsInitialized(): boolean {
  return state !== null;
}

/** Destroys every group initializeModelParallel created and resets the state; idempotent. */
export function destroyModelParallel(): void {
  const old = state;
  state = null;
  virtualRank = null;
  virtualWorldSize = null;
  if (!old) return;
  for (const g of old.created) destroyGroup(g);
}

/** The rank lists of every group kind of the current layout (all ranks' groups, not only this rank's). */
export function getParallelGroupRanks(): ParallelGroups {
  if (!state) throw notInitialized('getParallelGroupRanks');
  return state.plan;
}

// Tensor model parallel.

/** This rank's tensor-model-parallel group. */
export function getTensorModelParallelGroup(): ProcessGroup {
  return groupOf('getTensorModelParallelGroup', 'tp');
}
export function getTensorModelParallelWorldSize(): number {
  return groupOf('getTensorModelParallelWorldSize', 'tp').size;
}
export function getTensorModelParallelRank(): number {
  return groupOf('getTensorModelParallelRank', 'tp').rank;
}
/** Global rank of TP rank 0 in this rank's tensor-model-parallel group. */
export function getTensorModelParallelSrcRank(): number {
  return groupOf('getTensorModelParallelSrcRank', 'tp').ranks[0];
}

// Pipeline model parallel.

export function getPipelineModelParallelGroup(): ProcessGroup {
  return groupOf('getPipelineModelParallelGroup', 'pp');
}
export function getPipelineModelParallelWorldSize(): number {
  return groupOf('getPipelineModelParallelWorldSize', 'pp').size;
}
export function getPipelineModelParallelRank(): number {
  return groupOf('getPipelineModelParallelRank', 'pp').rank;
}
/** Global rank of the first stage of this rank's pipeline. */
export function getPipelineModelParallelFirstRank(): number {
  return groupOf('getPipelineModelParallelFirstRank', 'pp').ranks[0];
}
/** Global rank of the last stage of this rank's pipeline. */
export function getPipelineModelParallelLastRank(): number {
  const g = groupOf('getPipelineModelParallelLastRank', 'pp');
  return g.ranks[g.size - 1];
}
/** Global rank of the next stage (the first after the last, as in Megatron). */
export function getPipelineModelParallelNextRank(): number {
  const g = groupOf('getPipelineModelParallelNextRank', 'pp');
  return g.ranks[(g.rank + 1) % g.size];
}
/** Global rank of the previous stage (the last before the first). */
export function getPipelineModelParallelPrevRank(): number {
  const g = groupOf('getPipelineModelParallelPrevRank', 'pp');
  return g.ranks[(g.rank - 1 + g.size) % g.size];
}

/**
 * Whether this rank runs the first pipeline stage; with virtual pipelining and `ignoreVirtual`
 * false, also whether the current model chunk is the first.
 */
export function isPipelineFirstStage(ignoreVirtual = false): boolean {
  const g = groupOf('isPipelineFirstStage', 'pp');
  if (!ignoreVirtual && virtualWorldSize !== null && virtualRank !== 0) return false;
  return g.rank === 0;
}

/**
 * Whether this rank runs the last pipeline stage; with virtual pipelining and `ignoreVirtual`
 * false, also whether the current model chunk is the last.
 */
export function isPipelineLastStage(ignoreVirtual = false): boolean {
  const g = groupOf('isPipelineLastStage', 'pp');
  if (!ignoreVirtual && virtualWorldSize !== null && virtualRank !== virtualWorldSize - 1) return false;
  return g.rank === g.size - 1;
}

/** The current model chunk of the interleaved schedule (null without virtual pipelining). */
export function getVirtualPipelineModelParallelRank(): number | null {
  return virtualRank;
}
/** Model chunks per pipeline stage (null without virtual pipelining). */
export function getVirtualPipelineModelParallelWorldSize(): number | null {
  return virtualWorldSize;
}
/** Sets the current model chunk (0 .. vpp-1) that isPipelineFirstStage/LastStage look at. */
export function setVirtualPipelineModelParallelRank(rank: number): void {
  if (!Number.isInteger(rank) || rank < 0 || (virtualWorldSize !== null && rank >= virtualWorldSize)) {
    const range = virtualWorldSize === null ? 'a non-negative integer' : `0 .. ${virtualWorldSize - 1}`;
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `setVirtualPipelineModelParallelRank: ${rank} is not a model chunk index; pass ${range}`,
    );
  }
  virtualRank = rank;
}

// Data and context parallel.

/** This rank's data-parallel group; with `withContextParallel`, the dp-cp group (gradients reduce over it). */
export function getDataParallelGroup(withContextParallel = false): ProcessGroup {
  return groupOf('getDataParallelGroup', withContextParallel ? 'dpCp' : 'dp');
}
export function getDataParallelWorldSize(withContextParallel = false): number {
  return groupOf('getDataParallelWorldSize', withContextParallel ? 'dpCp' : 'dp').size;
}
export function getDataParallelRank(withContextParallel = false): number {
  return groupOf('getDataParallelRank', withContextParallel ? 'dpCp' : 'dp').rank;
}
/** Global rank of DP rank 0 in this rank's data-parallel group. */
export function getDataParallelSrcRank(withContextParallel = false): number {
  return groupOf('getDataParallelSrcRank', withContextParallel ? 'dpCp' : 'dp').ranks[0];
}

export function getContextParallelGroup(): ProcessGroup {
  return groupOf('getContextParallelGroup', 'cp');
}
export function getContextParallelWorldSize(): number {
  return groupOf('getContextParallelWorldSize', 'cp').size;
}
export function getContextParallelRank(): number {
  return groupOf('getContextParallelRank', 'cp').rank;
}

// Combined groups.

/** tp-dp group (tp-dp-cp with `withContextParallel`): Megatron's FP8 amax and MoE router reductions. */
export function getTensorAndDataParallelGroup(withContextParallel = false): ProcessGroup {
  return groupOf('getTensorAndDataParallelGroup', withContextParallel ? 'tpDpCp' : 'tpDp');
}
export function getTensorAndContextParallelGroup(): ProcessGroup {
  return groupOf('getTensorAndContextParallelGroup', 'tpCp');
}
export function getTensorAndContextParallelWorldSize(): number {
  return groupOf('getTensorAndContextParallelWorldSize', 'tpCp').size;
}
export function getTensorAndContextParallelRank(): number {
  return groupOf('getTensorAndContextParallelRank', 'tpCp').rank;
}
/** The tp-pp group: every rank that holds a piece of one model replica. */
export function getModelParallelGroup(): ProcessGroup {
  return groupOf('getModelParallelGroup', 'tpPp');
}

// Embedding groups: only the first and last pipeline stages belong, so other ranks get null.

/** The group of the first and last stage of this rank's pipeline (tied embeddings); null on other stages. */
export function getEmbeddingGroup(): ProcessGroup | null {
  if (!state) throw notInitialized('getEmbeddingGroup');
  return state.groups.embedding;
}
/** The group of the first stage of this rank's pipeline (position embeddings); null on other stages. */
export function getPositionEmbeddingGroup(): ProcessGroup | null {
  if (!state) throw notInitialized('getPositionEmbeddingGroup');
  return state.groups.positionEmbedding;
}
/** Whether this rank is in an embedding group (with `ignoreVirtual` false, also on the right model chunk). */
export function isRankInEmbeddingGroup(ignoreVirtual = false): boolean {
  const g = getEmbeddingGroup();
  if (!g) return false;
  if (ignoreVirtual) return true;
  if (g.rank === 0) return isPipelineFirstStage(false);
  if (g.rank === g.size - 1) return isPipelineLastStage(false);
  return true;
}
export function isRankInPositionEmbeddingGroup(): boolean {
  return getPositionEmbeddingGroup() !== null;
}

// Expert grid: tp = etp, ep, dp = world/(etp·ep·pp), pp.

export function getExpertModelParallelGroup(): ProcessGroup {
  return groupOf('getExpertModelParallelGroup', 'ep');
}
export function getExpertModelParallelWorldSize(): number {
  return groupOf('getExpertModelParallelWorldSize', 'ep').size;
}
export function getExpertModelParallelRank(): number {
  return groupOf('getExpertModelParallelRank', 'ep').rank;
}
export function getExpertTensorParallelGroup(): ProcessGroup {
  return groupOf('getExpertTensorParallelGroup', 'expertTp');
}
export function getExpertTensorParallelWorldSize(): number {
  return groupOf('getExpertTensorParallelWorldSize', 'expertTp').size;
}
export function getExpertTensorParallelRank(): number {
  return groupOf('getExpertTensorParallelRank', 'expertTp').rank;
}
/** The expert tp-ep group (the token dispatcher's all-to-all spans it). */
export function getExpertTensorAndModelParallelGroup(): ProcessGroup {
  return groupOf('getExpertTensorAndModelParallelGroup', 'tpEp');
}
export function getExpertTensorAndModelParallelWorldSize(): number {
  return groupOf('getExpertTensorAndModelParallelWorldSize', 'tpEp').size;
}
export function getExpertTensorAndModelParallelRank(): number {
  return groupOf('getExpertTensorAndModelParallelRank', 'tpEp').rank;
}
/** The expert tp-ep-pp group: every rank that holds a piece of one expert-model replica. */
export function getExpertTensorModelPipelineParallelGroup(): ProcessGroup {
  return groupOf('getExpertTensorModelPipelineParallelGroup', 'tpEpPp');
}
/** Expert-data-parallel group: expert gradients reduce over it. */
export function getExpertDataParallelGroup(): ProcessGroup {
  return groupOf('getExpertDataParallelGroup', 'expertDp');
}
export function getExpertDataParallelWorldSize(): number {
  return groupOf('getExpertDataParallelWorldSize', 'expertDp').size;
}
export function getExpertDataParallelRank(): number {
  return groupOf('getExpertDataParallelRank', 'expertDp').rank;
}
