// Megatron-LM's console lines, character for character: the training line of `training_log` and
// the framed validation line of `evaluate_and_print_results` (megatron/training/training.py), with
// megapatch's own fields after Megatron's. Numbers are formatted as Python's str.format formats
// them (the exact binary value rounded half to even, `E+05` exponents), so a megapatch log can be
// diffed against, or parsed like, a Megatron log.
import { TrainError } from './errors.js';

/** The values of one training log line; a null (or absent) optional field is left out. */
export interface TrainingLogFields {
  /** When the line is written; printed in local time with microseconds, like `datetime.now()`. */
  time: Date;
  /** The iteration just completed. */
  iteration: number;
  /** Megatron --train-iters. */
  trainIters: number;
  /** Samples consumed since the start of training (Megatron's consumed_train_samples). */
  consumedSamples: number;
  /** Samples skipped (Megatron's skipped_train_samples); printed only when above 0. */
  skippedSamples?: number;
  /** Mean time of one iteration over the log interval, in milliseconds. */
  elapsedMsPerIteration: number;
  /** Model TFLOP/s per GPU (Megatron --log-throughput), see `tflopsPerSecond`. */
  throughputTflopsPerGpu?: number | null;
  /** Null where the rank has no trainable parameters. */
  learningRate: number | null;
  /** Megatron --decoupled-lr: the embedding and output layer's learning rate (printed after the other). */
  decoupledLearningRate?: number | null;
  globalBatchSize: number;
  /**
   * The losses are means over the interval's advanced iterations; like Megatron, a loss that is
   * negative or NaN is left out. `lm loss`.
   */
  lmLoss: number | null;
  /** MoE auxiliary load-balancing loss, `load_balancing_loss`. */
  loadBalancingLoss?: number | null;
  /** MoE router z-loss, `z_loss`. */
  zLoss?: number | null;
  /** One loss per MTP depth: `mtp_1 loss`, `mtp_2 loss`, ... */
  mtpLosses?: readonly number[];
  /** Megatron prints it always (1.0 without fp16); pass 1 for an identical line, null to leave it out. */
  lossScale: number | null;
  /** Global gradient norm before clipping. */
  gradNorm: number | null;
  /** Zeros in the gradients (Megatron --log-num-zeros-in-grad). */
  numZerosInGrad?: number | null;
  /** Parameter norm (Megatron --log-params-norm). */
  paramsNorm?: number | null;
  /** Iterations of the interval skipped (fp16 overflow). */
  skippedIterations: number;
  /** Iterations of the interval with a NaN or infinite loss. */
  nanIterations: number;
  /** megapatch: tokens trained per second, all ranks together. */
  tokensPerSecond?: number | null;
  /** megapatch: device memory in use now, in GiB. */
  memoryLiveGiB?: number | null;
  /** megapatch: peak device memory, in GiB. */
  memoryPeakGiB?: number | null;
}

/** The values of one validation result. */
export interface ValidationLogFields {
  iteration: number;
  /** Mean `lm loss` over the evaluation iterations. */
  lmLoss: number;
  /**
   * The evaluation after training names its data: `iteration N on validation set` (or `on test
   * set`); null or absent for the evaluations during training.
   */
  dataset?: 'validation set' | 'test set' | null;
  /** One of several validation sets (Megatron --validation-set-names, else its index): `validation-<name>`. */
  setName?: string | number | null;
}

/**
 * Megatron's training log line, e.g. ` [2026-08-22 15:22:22.123000] iteration       10/     100 |
 * consumed samples:          320 | ... | number of nan iterations:   0 |` (one line, no newline).
 */
export function formatTrainingLogLine(f: TrainingLogFields): string {
  let s = ` [${timestamp(f.time)}]`;
  s += ` iteration ${pyInt('iteration', f.iteration, 8)}/${pyInt('trainIters', f.trainIters, 8)} |`;
  s += ` consumed samples: ${pyInt('consumedSamples', f.consumedSamples, 12)} |`;
  if (f.skippedSamples != null && f.skippedSamples > 0) {
    s += ` skipped samples: ${pyInt('skippedSamples', f.skippedSamples, 12)} |`;
  }
  s += ` elapsed time per iteration (ms): ${pyFixed(f.elapsedMsPerIteration, 1)} |`;
  if (f.throughputTflopsPerGpu != null) {
    s += ` throughput per GPU (TFLOP/s/GPU): ${pyFixed(f.throughputTflopsPerGpu, 1)} |`;
  }
  if (f.learningRate != null) s += ` learning rate: ${pyExp(f.learningRate, 6)} |`;
  if (f.decoupledLearningRate != null)
    s += ` decoupled learning rate: ${pyExp(f.decoupledLearningRate, 6)} |`;
  s += ` global batch size: ${pyInt('globalBatchSize', f.globalBatchSize, 5)} |`;
  // Megatron's total_loss_dict order: the loss function's losses, then the MoE tracker's, then MTP's.
  const losses: [string, number | null | undefined][] = [
    ['lm loss', f.lmLoss],
    ['load_balancing_loss', f.loadBalancingLoss],
    ['z_loss', f.zLoss],
    ...(f.mtpLosses ?? []).map((v, i): [string, number] => [`mtp_${i + 1} loss`, v]),
  ];
  for (const [name, v] of losses) if (v != null && v >= 0) s += ` ${name}: ${pyExp(v, 6)} |`;
  if (f.lossScale != null) s += ` loss scale: ${pyFixed(f.lossScale, 1)} |`;
  if (f.gradNorm != null) s += ` grad norm: ${pyFixed(f.gradNorm, 3)} |`;
  if (f.numZerosInGrad != null) s += ` num zeros: ${pyFloatStr(f.numZerosInGrad)} |`;
  if (f.paramsNorm != null) s += ` params norm: ${pyFixed(f.paramsNorm, 3)} |`;
  s += ` number of skipped iterations: ${pyInt('skippedIterations', f.skippedIterations, 3)} |`;
  s += ` number of nan iterations: ${pyInt('nanIterations', f.nanIterations, 3)} |`;
  if (f.tokensPerSecond != null) s += ` tokens per second: ${pyFixed(f.tokensPerSecond, 1)} |`;
  if (f.memoryLiveGiB != null) s += ` memory live (GiB): ${pyFixed(f.memoryLiveGiB, 2)} |`;
  if (f.memoryPeakGiB != null) s += ` memory peak (GiB): ${pyFixed(f.memoryPeakGiB, 2)} |`;
  return s;
}

/**
 * Megatron's validation result: the line ` validation loss at iteration N | lm loss value: X |
 * lm loss PPL: Y | ` between two rules of dashes one longer than it.
 */
export function formatValidationLogLines(f: ValidationLogFields): [string, string, string] {
  const suffix = f.setName != null ? `-${f.setName}` : '';
  const at = `iteration ${f.iteration}${f.dataset ? ` on ${f.dataset}` : ''}`;
  // Megatron's exp(min(20, loss)); Python's min keeps 20 when the loss is NaN.
  const ppl = Math.exp(Number.isNaN(f.lmLoss) ? 20 : Math.min(f.lmLoss, 20));
  const line =
    ` validation${suffix} loss at ${at} | ` +
    `lm loss value: ${pyExp(f.lmLoss, 6)} | lm loss PPL: ${pyExp(ppl, 6)} | `;
  const rule = '-'.repeat(line.length + 1);
  return [rule, line, rule];
}

/** Python's `datetime.strftime('%Y-%m-%d %H:%M:%S.%f')` in local time. */
function timestamp(t: Date): string {
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  return (
    `${p(t.getFullYear(), 4)}-${p(t.getMonth() + 1)}-${p(t.getDate())} ` +
    `${p(t.getHours())}:${p(t.getMinutes())}:${p(t.getSeconds())}.${p(t.getMilliseconds() * 1000, 6)}`
  );
}

/** Python `'{:Nd}'.format(n)`; like Python, a non-integer is an error. */
function pyInt(name: string, n: number, width: number): string {
  if (!Number.isSafeInteger(n)) {
    throw new TrainError('INVALID_ARGUMENT', `log field ${name} must be an integer, got ${n}`);
  }
  return String(n).padStart(width, ' ');
}

/** Python `'{:.Pf}'.format(x)`. */
function pyFixed(x: number, precision: number): string {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? 'nan' : x > 0 ? 'inf' : '-inf';
  const { digits, scale } = exactDecimal(x);
  const n =
    scale <= precision
      ? digits * 10n ** BigInt(precision - scale)
      : divRoundHalfEven(digits, 10n ** BigInt(scale - precision));
  const s = n.toString().padStart(precision + 1, '0');
  return sign(x) + (precision === 0 ? s : `${s.slice(0, -precision)}.${s.slice(-precision)}`);
}

/** Python `'{:.PE}'.format(x)`. */
function pyExp(x: number, precision: number): string {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? 'NAN' : x > 0 ? 'INF' : '-INF';
  const { digits, scale } = exactDecimal(x);
  const keep = precision + 1;
  let n = 0n;
  let e = 0;
  if (digits > 0n) {
    const len = digits.toString().length;
    e = len - 1 - scale;
    n = len > keep ? divRoundHalfEven(digits, 10n ** BigInt(len - keep)) : digits * 10n ** BigInt(keep - len);
    // Rounding up 9.99…95 gives one more digit: 10.00… × 10^e is 1.00… × 10^(e+1).
    if (n === 10n ** BigInt(keep)) {
      n /= 10n;
      e += 1;
    }
  }
  const s = n.toString().padStart(keep, '0');
  const mantissa = precision === 0 ? s : `${s[0]}.${s.slice(1)}`;
  return `${sign(x)}${mantissa}E${e < 0 ? '-' : '+'}${String(Math.abs(e)).padStart(2, '0')}`;
}

/** Python `str(float(x))` for the counts Megatron holds as floats: `12.0`. */
function pyFloatStr(x: number): string {
  return Number.isInteger(x) && Math.abs(x) < 1e16 ? x.toFixed(1) : String(x);
}

function sign(x: number): string {
  return x < 0 || Object.is(x, -0) ? '-' : '';
}

/** |x| = digits × 10^-scale exactly: a double m × 2^-k is m × 5^k × 10^-k. */
function exactDecimal(x: number): { digits: bigint; scale: number } {
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, Math.abs(x));
  const bits = view.getBigUint64(0);
  const biased = Number(bits >> 52n);
  const fraction = bits & ((1n << 52n) - 1n);
  // A normal double is (2^52 + fraction) × 2^(biased − 1075); a subnormal one fraction × 2^-1074.
  const mantissa = biased === 0 ? fraction : fraction | (1n << 52n);
  const exponent = (biased === 0 ? 1 : biased) - 1075;
  if (exponent >= 0) return { digits: mantissa << BigInt(exponent), scale: 0 };
  return { digits: mantissa * 5n ** BigInt(-exponent), scale: -exponent };
}

/** a / b rounded to the nearest integer, ties to even (a, b > 0). */
function divRoundHalfEven(a: bigint, b: bigint): bigint {
  const q = a / b;
  const twiceRest = (a % b) * 2n;
  return twiceRest > b || (twiceRest === b && q % 2n === 1n) ? q + 1n : q;
}
