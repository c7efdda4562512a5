// Loss scalers for fp16 training with Megatron-LM's semantics. The scale is kept as a float32
// value (Megatron holds it in a float32 tensor), so growth and backoff round the same way.
import { TensorError } from '../errors.js';

/** The checkpoint of a grad scaler (plain JSON). */
export interface GradScalerState {
  scale: number;
  growthTracker?: number;
  hysteresisTracker?: number;
}

/** A loss scaler: the loss is multiplied by `scale` before backward, gradients by `invScale` after. */
export interface GradScaler {
  readonly scale: number;
  /** 1 / scale, rounded to float32 (the factor the gradients are multiplied by). */
  readonly invScale: number;
  /** Called once per step with whether the gradients held inf or NaN. */
  update(foundInf: boolean): void;
  stateDict(): GradScalerState;
  loadStateDict(sd: GradScalerState): void;
}

function positive(name: string, v: number): void {
  if (!(v > 0)) throw new TensorError('INVALID_ARGUMENT', `grad scaler: ${name} must be > 0, got ${v}`);
}

/** A loss scale that never changes (steps with inf/NaN gradients are still skipped). */
export class ConstantGradScaler implements GradScaler {
  private value: number;

  constructor(scale: number) {
    positive('scale', scale);
    this.value = Math.fround(scale);
  }

  get scale(): number {
    return this.value;
  }

  get invScale(): number {
    return Math.fround(1 / this.value);
  }

  update(_foundInf: boolean): void {}

  stateDict(): GradScalerState {
    return { scale: this.value };
  }

  loadStateDict(sd: GradScalerState): void {
    positive('scale', sd.scale);
    this.value = Math.fround(sd.scale);
  }
}

/** Options of DynamicGradScaler (Megatron's defaults for fp16). */
export interface DynamicGradScalerOptions {
  initialScale?: number;
  minScale?: number;
  growthFactor?: number;
  backoffFactor?: number;
  growthInterval?: number;
  hysteresis?: number;
}

/**
 * Megatron's dynamic loss scale: after `hysteresis` steps with inf/NaN gradients (counted since
 * the last growth) the scale is multiplied by backoffFactor (not below minScale); after
 * growthInterval consecutive clean steps it is multiplied by growthFactor and the hysteresis
 * budget is refilled.
 */
export class DynamicGradScaler implements GradScaler {
  readonly minScale: number;
  readonly growthFactor: number;
  readonly backoffFactor: number;
  readonly growthInterval: number;
  readonly hysteresis: number;
  private value: number;
  private growthTracker = 0;
  private hysteresisTracker: number;

  constructor(options: DynamicGradScalerOptions = {}) {
    const initial = options.initialScale ?? 2 ** 32;
    this.minScale = Math.fround(options.minScale ?? 1);
    this.growthFactor = Math.fround(options.growthFactor ?? 2);
    this.backoffFactor = Math.fround(options.backoffFactor ?? 0.5);
    this.growthInterval = options.growthInterval ?? 1000;
    this.hysteresis = options.hysteresis ?? 2;
    positive('initialScale', initial);
    positive('minScale', this.minScale);
    if (!(this.minScale <= initial)) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `grad scaler: minScale (${this.minScale}) must be <= initialScale (${initial})`,
      );
    }
    if (!(this.growthFactor > 1)) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `grad scaler: growthFactor must be > 1, got ${this.growthFactor}`,
      );
    }
    if (!(this.backoffFactor > 0 && this.backoffFactor < 1)) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `grad scaler: backoffFactor must be in (0, 1), got ${this.backoffFactor}`,
      );
    }
    if (!(Number.isInteger(this.growthInterval) && this.growthInterval > 0)) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `grad scaler: growthInterval must be a positive integer, got ${this.growthInterval}`,
      );
    }
    if (!(Number.isInteger(this.hysteresis) && this.hysteresis > 0)) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `grad scaler: hysteresis must be a positive integer, got ${this.hysteresis}`,
      );
    }
    this.value = Math.fround(initial);
    this.hysteresisTracker = this.hysteresis;
  }

  get scale(): number {
    return this.value;
  }

  get invScale(): number {
    return Math.fround(1 / this.value);
  }

  update(foundInf: boolean): void {
    if (foundInf) {
      this.growthTracker = 0;
      this.hysteresisTracker -= 1;
      if (this.hysteresisTracker <= 0) {
        this.value = Math.max(Math.fround(this.value * this.backoffFactor), this.minScale);
      }
    } else {
      this.growthTracker += 1;
      if (this.growthTracker === this.growthInterval) {
        this.growthTracker = 0;
        this.hysteresisTracker = this.hysteresis;
        this.value = Math.fround(this.value * this.growthFactor);
      }
    }
  }

  stateDict(): GradScalerState {
    return {
      scale: this.value,
      growthTracker: this.growthTracker,
      hysteresisTracker: this.hysteresisTracker,
    };
  }

  loadStateDict(sd: GradScalerState): void {
    positive('scale', sd.scale);
    this.value = Math.fround(sd.scale);
    this.growthTracker = sd.growthTracker ?? 0;
    this.hysteresisTracker = sd.hysteresisTracker ?? this.hysteresis;
  }
}
