// Learning-rate and weight-decay schedules with the semantics of Megatron-LM's
// OptimizerParamScheduler: linear warm-up from initLr to maxLr, then a decay style down to minLr
// by lrDecaySteps (minLr afterwards), and an optional weight-decay ramp from startWd to endWd.
import { TensorError } from '../errors.js';
import type { ParamGroup } from './optimizer.js';

/** How the learning rate decays after warm-up. */
export type LrDecayStyle = 'constant' | 'linear' | 'cosine' | 'inverse-square-root' | 'WSD';
/** The anneal shape of the last wsdDecaySteps of a WSD schedule. */
export type WsdDecayStyle = 'linear' | 'cosine' | 'exponential' | 'minus_sqrt';
/** How weight decay moves from startWd to endWd. */
export type WdIncrementStyle = 'constant' | 'linear' | 'cosine';

/** Anything with parameter groups whose lr / weightDecay the scheduler sets. */
export interface SchedulableOptimizer {
  readonly paramGroups: ParamGroup[];
}

/** Options of OptimizerParamScheduler (Megatron's argument names, camelCased). */
export interface OptimizerParamSchedulerOptions {
  optimizer: SchedulableOptimizer;
  /** Learning rate at step 0 of the warm-up (default 0). */
  initLr?: number;
  maxLr: number;
  /** Default 0. */
  minLr?: number;
  /** Default 0 (no warm-up). */
  lrWarmupSteps?: number;
  lrDecaySteps: number;
  lrDecayStyle: LrDecayStyle;
  /** WSD only: the length of the final anneal. */
  wsdDecaySteps?: number;
  /** WSD only (default 'exponential', Megatron's command-line default). */
  lrWsdDecayStyle?: WsdDecayStyle;
  /**
   * Weight-decay schedule. When neither startWd nor endWd is given the scheduler leaves each
   * group's weightDecay alone; when one is given it is used for both.
   */
  startWd?: number;
  endWd?: number;
  /** Default lrDecaySteps. */
  wdIncrementSteps?: number;
  /** Default 'constant' (startWd must then equal endWd), otherwise 'linear' or 'cosine'. */
  wdIncrementStyle?: WdIncrementStyle;
  /** loadStateDict takes the checkpoint's schedule values (default true). */
  useCheckpointOptParamScheduler?: boolean;
  /** loadStateDict keeps this scheduler's schedule values and only restores the step (default false). */
  overrideOptParamScheduler?: boolean;
}

/** The checkpoint of a scheduler (Megatron's keys, camelCased): plain JSON. */
export interface OptimizerParamSchedulerState {
  maxLr: number;
  minLr: number;
  lrWarmupSteps: number;
  lrDecaySteps: number;
  lrDecayStyle: LrDecayStyle;
  numSteps: number;
  startWd: number | null;
  endWd: number | null;
  wdIncrementSteps: number;
  wdIncrementStyle: WdIncrementStyle;
}

const DECAY_STYLES: readonly LrDecayStyle[] = ['constant', 'linear', 'cosine', 'inverse-square-root', 'WSD'];
const WSD_STYLES: readonly WsdDecayStyle[] = ['linear', 'cosine', 'exponential', 'minus_sqrt'];
const WD_STYLES: readonly WdIncrementStyle[] = ['constant', 'linear', 'cosine'];

function invalid(msg: string): TensorError {
  return new TensorError('INVALID_ARGUMENT', `OptimizerParamScheduler: ${msg}`);
}

/**
 * Anneals the learning rate and weight decay of an optimizer's groups, exactly as Megatron-LM's
 * OptimizerParamScheduler. Groups may override maxLr, minLr, startWd, endWd and set wdMult.
 * Like Megatron, the constructor applies step 0 to the optimizer.
 */
export class OptimizerParamScheduler {
  readonly optimizer: SchedulableOptimizer;
  initLr: number;
  maxLr: number;
  minLr: number;
  lrWarmupSteps: number;
  lrDecaySteps: number;
  lrDecayStyle: LrDecayStyle;
  wsdDecaySteps: number | undefined;
  lrWsdDecayStyle: WsdDecayStyle;
  startWd: number | null;
  endWd: number | null;
  wdIncrementSteps: number;
  wdIncrementStyle: WdIncrementStyle;
  /** Steps taken so far (Megatron counts samples when the batch size ramps up; any unit works). */
  numSteps = 0;
  private readonly useCheckpoint: boolean;
  private readonly override: boolean;

  constructor(options: OptimizerParamSchedulerOptions) {
    this.optimizer = options.optimizer;
    this.initLr = options.initLr ?? 0;
    this.maxLr = options.maxLr;
    this.minLr = options.minLr ?? 0;
    this.lrWarmupSteps = options.lrWarmupSteps ?? 0;
    this.lrDecaySteps = options.lrDecaySteps;
    this.lrDecayStyle = options.lrDecayStyle;
    this.wsdDecaySteps = options.wsdDecaySteps;
    this.lrWsdDecayStyle = options.lrWsdDecayStyle ?? 'exponential';
    this.startWd = options.startWd ?? options.endWd ?? null;
    this.endWd = options.endWd ?? options.startWd ?? null;
    this.wdIncrementSteps = options.wdIncrementSteps ?? options.lrDecaySteps;
    this.wdIncrementStyle = options.wdIncrementStyle ?? 'constant';
    this.useCheckpoint = options.useCheckpointOptParamScheduler ?? true;
    this.override = options.overrideOptParamScheduler ?? false;

    if (!(this.minLr >= 0)) throw invalid(`minLr must be >= 0, got ${this.minLr}`);
    if (!(this.maxLr >= this.minLr)) throw invalid(`maxLr (${this.maxLr}) must be >= minLr (${this.minLr})`);
    if (!(this.initLr <= this.maxLr))
      throw invalid(`initLr (${this.initLr}) must be <= maxLr (${this.maxLr})`);
    if (!(this.lrDecaySteps > 0)) throw invalid(`lrDecaySteps must be > 0, got ${this.lrDecaySteps}`);
    if (!(this.lrWarmupSteps < this.lrDecaySteps)) {
      throw invalid(`lrWarmupSteps (${this.lrWarmupSteps}) must be < lrDecaySteps (${this.lrDecaySteps})`);
    }
    if (!DECAY_STYLES.includes(this.lrDecayStyle))
      throw invalid(`unknown lrDecayStyle "${this.lrDecayStyle}"`);
    if (this.lrDecayStyle === 'WSD') {
      if (!(this.wsdDecaySteps !== undefined && this.wsdDecaySteps > 0))
        throw invalid('WSD needs wsdDecaySteps > 0');
      if (!WSD_STYLES.includes(this.lrWsdDecayStyle))
        throw invalid(`unknown lrWsdDecayStyle "${this.lrWsdDecayStyle}"`);
    }
    if (!WD_STYLES.includes(this.wdIncrementStyle))
      throw invalid(`unknown wdIncrementStyle "${this.wdIncrementStyle}"`);
    if (this.startWd !== null && this.endWd !== null) {
      if (!(this.startWd >= 0)) throw invalid(`startWd must be >= 0, got ${this.startWd}`);
      if (!(this.endWd >= this.startWd))
        throw invalid(`endWd (${this.endWd}) must be >= startWd (${this.startWd})`);
      if (this.wdIncrementStyle === 'constant' && this.startWd !== this.endWd) {
        throw invalid(
          "wdIncrementStyle 'constant' needs startWd === endWd; use 'linear' or 'cosine' to ramp",
        );
      }
    }
    if (this.override && this.useCheckpoint) {
      throw invalid('overrideOptParamScheduler and useCheckpointOptParamScheduler are both set');
    }
    this.step(0);
  }

  /** The learning rate at `step` (default: the current step) for a group's maxLr/minLr overrides. */
  getLr(step: number = this.numSteps, group?: Partial<ParamGroup>): number {
    const maxLr = group?.maxLr ?? this.maxLr;
    const minLr = group?.minLr ?? this.minLr;
    const warmup = this.lrWarmupSteps;
    if (warmup > 0 && step <= warmup) return this.initLr + ((maxLr - this.initLr) * step) / warmup;
    if (this.lrDecayStyle === 'constant') return maxLr;
    if (step > this.lrDecaySteps) return minLr;
    if (this.lrDecayStyle === 'inverse-square-root') {
      const lr = (maxLr * Math.sqrt(Math.max(warmup, 1))) / Math.sqrt(Math.max(step, 1));
      return Math.max(minLr, lr);
    }
    const ratio = (step - warmup) / (this.lrDecaySteps - warmup);
    let coeff: number;
    switch (this.lrDecayStyle) {
      case 'linear':
        coeff = 1 - ratio;
        break;
      case 'cosine':
        coeff = 0.5 * (Math.cos(Math.PI * ratio) + 1);
        break;
      case 'WSD':
        coeff = this.wsdCoeff(step);
        break;
    }
    return minLr + coeff * (maxLr - minLr);
  }

  private wsdCoeff(step: number): number {
    const decay = this.wsdDecaySteps!;
    const annealStart = this.lrDecaySteps - decay;
    if (step <= annealStart) return 1;
    const r = (step - annealStart) / decay;
    switch (this.lrWsdDecayStyle) {
      case 'linear':
        return 1 - r;
      case 'cosine':
        return 0.5 * (Math.cos(Math.PI * r) + 1);
      case 'exponential':
        return 2 * 0.5 ** r - 1;
      case 'minus_sqrt':
        return 1 - Math.sqrt(r);
    }
  }

  /** The weight decay at `step` (before a group's wdMult), or null when wd is not scheduled. */
  getWd(step: number = this.numSteps, group?: Partial<ParamGroup>): number | null {
    if (this.startWd === null || this.endWd === null) return null;
    const startWd = group?.startWd ?? this.startWd;
    const endWd = group?.endWd ?? this.endWd;
    if (step > this.wdIncrementSteps) return endWd;
    if (this.wdIncrementStyle === 'constant') return endWd;
    const ratio = step / this.wdIncrementSteps;
    const coeff = this.wdIncrementStyle === 'linear' ? ratio : 0.5 * (Math.cos(Math.PI * (1 - ratio)) + 1);
    return startWd + coeff * (endWd - startWd);
  }

  /** Advances by `increment` steps and sets lr (and weightDecay when scheduled) on every group. */
  step(increment = 1): void {
    this.numSteps += increment;
    for (const group of this.optimizer.paramGroups) {
      group.lr = this.getLr(this.numSteps, group);
      const wd = this.getWd(this.numSteps, group);
      if (wd !== null) group.weightDecay = wd * (group.wdMult ?? 1);
    }
  }

  /** The scheduler's checkpoint (plain JSON). */
  stateDict(): OptimizerParamSchedulerState {
    return {
      maxLr: this.maxLr,
      minLr: this.minLr,
      lrWarmupSteps: this.lrWarmupSteps,
      lrDecaySteps: this.lrDecaySteps,
      lrDecayStyle: this.lrDecayStyle,
      numSteps: this.numSteps,
      startWd: this.startWd,
      endWd: this.endWd,
      wdIncrementSteps: this.wdIncrementSteps,
      wdIncrementStyle: this.wdIncrementStyle,
    };
  }

  /**
   * Restores a checkpoint: the schedule values come from the checkpoint (default), from this
   * scheduler (overrideOptParamScheduler), or must match (useCheckpointOptParamScheduler false);
   * then the step count is restored and applied to the optimizer.
   */
  loadStateDict(sd: OptimizerParamSchedulerState): void {
    const pick = <T>(mine: T, saved: T, name: string): T => {
      if (this.override) return mine;
      if (!this.useCheckpoint && mine !== saved) {
        throw invalid(`${name} is ${String(mine)} here but ${String(saved)} in the checkpoint`);
      }
      return saved;
    };
    this.maxLr = pick(this.maxLr, sd.maxLr, 'maxLr');
    this.minLr = pick(this.minLr, sd.minLr, 'minLr');
    this.lrWarmupSteps = pick(this.lrWarmupSteps, sd.lrWarmupSteps, 'lrWarmupSteps');
    this.lrDecaySteps = pick(this.lrDecaySteps, sd.lrDecaySteps, 'lrDecaySteps');
    this.lrDecayStyle = pick(this.lrDecayStyle, sd.lrDecayStyle, 'lrDecayStyle');
    this.startWd = pick(this.startWd, sd.startWd, 'startWd');
    this.endWd = pick(this.endWd, sd.endWd, 'endWd');
    this.wdIncrementSteps = pick(this.wdIncrementSteps, sd.wdIncrementSteps, 'wdIncrementSteps');
    this.wdIncrementStyle = pick(this.wdIncrementStyle, sd.wdIncrementStyle, 'wdIncrementStyle');
    this.numSteps = 0;
    this.step(sd.numSteps);
  }
}
