// The optimizer base: parameter groups with their hyperparameters, per-parameter state, and
// checkpointing of both (PyTorch's torch.optim.Optimizer contract, with camelCase names).

import { noGrad } from '../autograd/graph.js';
import type { DType } from '../dtype.js';
import { isFloating } from '../dtype.js';
import { fmtShape, TensorError } from '../errors.js';
import { keep } from '../scope.js';
import { sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';

/** A JSON-serialisable value (the plain part of a state dict). */
export type JsonValue = number | string | boolean | null | JsonValue[] | { [key: string]: JsonValue };

/** One entry of an optimizer's per-parameter state. */
export type StateValue = Tensor | number | boolean | null;

/** Per-parameter optimizer state (e.g. AdamW's step, expAvg, expAvgSq). */
export type ParamState = Record<string, StateValue>;

/**
 * A parameter group: parameters sharing hyperparameters. The optional fields are per-group
 * overrides read by OptimizerParamScheduler (as in Megatron-LM).
 */
export interface ParamGroup {
  params: Tensor[];
  lr: number;
  weightDecay: number;
  maxLr?: number;
  minLr?: number;
  startWd?: number;
  endWd?: number;
  wdMult?: number;
}

/** A parameter group as passed to a constructor: hyperparameters default to the optimizer's. */
export type GroupInput<G extends ParamGroup = ParamGroup> = { params: Iterable<Tensor> } & Partial<
  Omit<G, 'params'>
>;

/** Parameters of an optimizer: tensors (one group) or a list of groups. */
export type ParamsInput<G extends ParamGroup = ParamGroup> = Iterable<Tensor> | readonly GroupInput<G>[];

/**
 * A checkpoint of an optimizer: `state` maps a parameter's index (counting through all groups
 * in order) to its state, `paramGroups` holds each group's hyperparameters and the indices of
 * its parameters. The tensors are the optimizer's own (not copies): serialise or clone them
 * before the next step; everything else is plain JSON.
 */
export interface OptimizerStateDict {
  state: Record<string, Record<string, StateValue>>;
  paramGroups: ({ params: number[] } & { [key: string]: JsonValue })[];
}

function copyJson(v: unknown, where: string): JsonValue {
  if (v === null || typeof v === 'number' || typeof v === 'string' || typeof v === 'boolean') return v;
  if (Array.isArray(v)) return v.map((x) => copyJson(x, where));
  if (typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype) {
    const out: { [key: string]: JsonValue } = {};
    for (const [k, x] of Object.entries(v)) if (x !== undefined) out[k] = copyJson(x, where);
    return out;
  }
  throw new TensorError(
    'INVALID_ARGUMENT',
    `${where}: hyperparameter values must be plain JSON, got ${String(v)}`,
  );
}

function isGroupList<G extends ParamGroup>(items: readonly unknown[]): items is GroupInput<G>[] {
  return (
    items.length > 0 &&
    items.every((x) => !(x instanceof Tensor) && typeof x === 'object' && x !== null && 'params' in x)
  );
}

/** Normalises optimizer parameters to a list of groups (one group for a plain list of tensors). */
export function toParamGroups<G extends ParamGroup>(params: ParamsInput<G>): GroupInput<G>[] {
  const items = [...(params as Iterable<unknown>)];
  if (isGroupList<G>(items)) return items.map((g) => ({ ...g, params: [...g.params] }));
  return items.length === 0 ? [] : [{ params: items as Tensor[] } as unknown as GroupInput<G>];
}

/** Base class of optimizers: groups, state, zeroGrad and checkpointing; subclasses define step(). */
export abstract class Optimizer<G extends ParamGroup = ParamGroup, S extends ParamState = ParamState> {
  /** The parameter groups; schedulers update `lr` / `weightDecay` here between steps. */
  readonly paramGroups: G[] = [];
  /** Hyperparameters a group gets when it does not set them. */
  readonly defaults: Omit<G, 'params'>;
  /** Per-parameter state, created on a parameter's first step. */
  protected readonly state = new Map<Tensor, S>();
  private readonly name: string;

  constructor(name: string, params: ParamsInput<G>, defaults: Omit<G, 'params'>) {
    this.name = name;
    this.defaults = defaults;
    const groups = toParamGroups(params);
    if (groups.length === 0)
      throw new TensorError('INVALID_ARGUMENT', `${name}: got an empty parameter list`);
    for (const g of groups) this.addParamGroup(g);
  }

  /** Adds a group; its missing hyperparameters come from the defaults. */
  addParamGroup(group: GroupInput<G>): void {
    const params = [...group.params];
    const seen = new Set(this.paramGroups.flatMap((g) => g.params));
    for (const p of params) {
      if (!(p instanceof Tensor))
        throw new TensorError('INVALID_ARGUMENT', `${this.name}: parameters must be Tensors`);
      p.checkAlive(this.name);
      if (!isFloating(p.dtype)) {
        throw new TensorError(
          'DTYPE_MISMATCH',
          `${this.name}: can only optimize floating-point tensors, got ${p.describe()}`,
        );
      }
      if (seen.has(p)) {
        throw new TensorError(
          'INVALID_ARGUMENT',
          `${this.name}: parameter ${p.describe()} appears in more than one group`,
        );
      }
      seen.add(p);
    }
    const full = { ...this.defaults, ...group, params } as G;
    for (const [k, v] of Object.entries(full)) if (k !== 'params') copyJson(v, this.name);
    this.validateGroup(full);
    this.paramGroups.push(full);
  }

  /** Throws a TensorError when a group's hyperparameters are out of range. */
  protected validateGroup(group: G): void {
    if (!(group.lr >= 0))
      throw new TensorError('INVALID_ARGUMENT', `${this.name}: invalid learning rate ${group.lr}`);
    if (!(group.weightDecay >= 0)) {
      throw new TensorError('INVALID_ARGUMENT', `${this.name}: invalid weight decay ${group.weightDecay}`);
    }
  }

  /** The dtype of a parameter's state tensors: float32, or float64 for float64 parameters. */
  protected stateDtype(p: Tensor): DType {
    return p.dtype === 'float64' ? 'float64' : 'float32';
  }

  /** Performs one update of every parameter that has a gradient. */
  abstract step(): void;

  /** Frees gradients (setToNone, the default) or zeroes them in place. */
  zeroGrad(setToNone = true): void {
    for (const g of this.paramGroups) {
      for (const p of g.params) {
        if (!p.grad) continue;
        if (setToNone) {
          p.grad.dispose();
          p.grad = null;
        } else {
          const grad = p.grad;
          noGrad(() => grad.zero_());
        }
      }
    }
  }

  /** The state of one parameter (undefined before its first step). */
  stateOf(p: Tensor): Readonly<S> | undefined {
    return this.state.get(p);
  }

  /** A checkpoint of groups and state; see OptimizerStateDict for ownership. */
  stateDict(): OptimizerStateDict {
    const state: OptimizerStateDict['state'] = {};
    const paramGroups: OptimizerStateDict['paramGroups'] = [];
    let index = 0;
    for (const g of this.paramGroups) {
      const ids: number[] = [];
      for (const p of g.params) {
        const s = this.state.get(p);
        if (s) state[String(index)] = { ...s };
        ids.push(index++);
      }
      const hyper: { [key: string]: JsonValue } = {};
      for (const [k, v] of Object.entries(g))
        if (k !== 'params' && v !== undefined) hyper[k] = copyJson(v, this.name);
      paramGroups.push({ ...hyper, params: ids });
    }
    return { state, paramGroups };
  }

  /**
   * Restores a checkpoint made by stateDict() of an optimizer over parameters of the same
   * shapes, in the same group layout. Tensor state is copied (the caller keeps its tensors).
   */
  loadStateDict(sd: OptimizerStateDict): void {
    const where = `${this.name}.loadStateDict`;
    if (sd.paramGroups.length !== this.paramGroups.length) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `${where}: checkpoint has ${sd.paramGroups.length} parameter groups, optimizer has ${this.paramGroups.length}`,
      );
    }
    const byId = new Map<string, Tensor>();
    sd.paramGroups.forEach((sg, gi) => {
      const params = this.paramGroups[gi].params;
      if (sg.params.length !== params.length) {
        throw new TensorError(
          'INVALID_ARGUMENT',
          `${where}: group ${gi} has ${sg.params.length} parameters in the checkpoint, ${params.length} here`,
        );
      }
      sg.params.forEach((id, k) => {
        byId.set(String(id), params[k]);
      });
    });
    // validate everything before changing anything
    for (const [id, entry] of Object.entries(sd.state)) {
      const p = byId.get(id);
      if (!p)
        throw new TensorError(
          'INVALID_ARGUMENT',
          `${where}: state for parameter ${id}, which no group lists`,
        );
      for (const [key, v] of Object.entries(entry)) {
        if (v instanceof Tensor) {
          v.checkAlive(where);
          if (!sameShape(v.shape, p.shape)) {
            throw new TensorError(
              'SHAPE_MISMATCH',
              `${where}: state "${key}" of parameter ${id} has shape ${fmtShape(v.shape)}, the parameter ${fmtShape(p.shape)}`,
            );
          }
        }
      }
    }
    sd.paramGroups.forEach((sg, gi) => {
      const g = this.paramGroups[gi];
      for (const [k, v] of Object.entries(sg)) {
        if (k !== 'params') (g as unknown as Record<string, JsonValue>)[k] = copyJson(v, where);
      }
    });
    const next = new Map<Tensor, S>();
    for (const [id, entry] of Object.entries(sd.state)) {
      const p = byId.get(id)!;
      const old = this.state.get(p) as ParamState | undefined;
      const restored: ParamState = {};
      for (const [key, v] of Object.entries(entry)) {
        restored[key] = v instanceof Tensor ? this.restoreTensor(old?.[key], v, this.stateDtype(p), p) : v;
      }
      if (old)
        for (const [key, v] of Object.entries(old))
          if (v instanceof Tensor && restored[key] !== v) v.dispose();
      next.set(p, restored as S);
    }
    for (const [p, s] of this.state) if (!next.has(p)) disposeState(s);
    this.state.clear();
    for (const [p, s] of next) this.state.set(p, s);
  }

  /**
   * Copies src into the existing state tensor when it fits, else into a new one, on the
   * parameter's device (a state read on another device, the host's, moves there).
   */
  private restoreTensor(existing: StateValue | undefined, src: Tensor, dtype: DType, p: Tensor): Tensor {
    const moved = src.device === p.device ? src : src.to(p.device);
    try {
      if (
        existing instanceof Tensor &&
        !existing.disposed &&
        existing.dtype === dtype &&
        existing.device === p.device &&
        sameShape(existing.shape, moved.shape)
      ) {
        if (existing.numel > 0) existing.backend.copy(existing, moved);
        return existing;
      }
      const t = keep(Tensor.empty(moved.backend, moved.shape, dtype));
      if (t.numel > 0) t.backend.copy(t, moved);
      return t;
    } finally {
      if (moved !== src) moved.dispose();
    }
  }

  /** Frees every state tensor; the optimizer can keep stepping (state restarts). */
  dispose(): void {
    for (const s of this.state.values()) disposeState(s);
    this.state.clear();
  }
}

function disposeState(s: ParamState): void {
  for (const v of Object.values(s)) if (v instanceof Tensor) v.dispose();
}
