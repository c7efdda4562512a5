// The log lines against lines written out by hand from Megatron's format strings
// (megatron/training/training.py `training_log` and `evaluate_and_print_results`).
import { describe, expect, it } from 'vitest';
import { TrainError } from '../src/errors.js';
import { formatTrainingLogLine, formatValidationLogLines, type TrainingLogFields } from '../src/log-line.js';

// Local time, as Megatron's datetime.now(): the line reads the same in every time zone.
const TIME = new Date(2026, 7, 22, 15, 22, 22, 123);

const BF16: TrainingLogFields = {
  time: TIME,
  iteration: 10,
  trainIters: 100,
  consumedSamples: 320,
  elapsedMsPerIteration: 123.4,
  throughputTflopsPerGpu: 1.25,
  learningRate: 1e-4,
  globalBatchSize: 32,
  lmLoss: 1.2345678,
  lossScale: 1,
  gradNorm: 0.0625,
  skippedIterations: 0,
  nanIterations: 0,
};

describe('formatTrainingLogLine', () => {
  it("writes Megatron's line for a bf16 dense run", () => {
    // 1.25 and 0.0625 are exact ties: Python rounds them half to even (1.2, 0.062).
    expect(formatTrainingLogLine(BF16)).toBe(
      ' [2026-08-22 15:22:22.123000] iteration       10/     100 | consumed samples:          320 |' +
        ' elapsed time per iteration (ms): 123.4 | throughput per GPU (TFLOP/s/GPU): 1.2 |' +
        ' learning rate: 1.000000E-04 | global batch size:    32 | lm loss: 1.234568E+00 |' +
        ' loss scale: 1.0 | grad norm: 0.062 | number of skipped iterations:   0 |' +
        ' number of nan iterations:   0 |',
    );
  });

  it('writes the decoupled learning rate after the other, as Megatron with --decoupled-lr did (2024-25 releases)', () => {
    expect(formatTrainingLogLine({ ...BF16, decoupledLearningRate: 5e-4 })).toContain(
      ' learning rate: 1.000000E-04 | decoupled learning rate: 5.000000E-04 | global batch size:    32 |',
    );
  });

  it('writes every field: fp16, MoE and MTP losses, then the megapatch fields', () => {
    const line = formatTrainingLogLine({
      time: TIME,
      iteration: 1000,
      trainIters: 1000,
      consumedSamples: 123_456_789,
      skippedSamples: 5,
      elapsedMsPerIteration: 2048.25,
      throughputTflopsPerGpu: 412.35,
      learningRate: 3e-4,
      globalBatchSize: 1024,
      lmLoss: 2.5,
      loadBalancingLoss: 1.0012,
      zLoss: 0.000123456789,
      mtpLosses: [2.75, 3.125],
      lossScale: 65536,
      gradNorm: 12.3456,
      numZerosInGrad: 7,
      paramsNorm: 301.23456,
      skippedIterations: 1,
      nanIterations: 2,
      tokensPerSecond: 2560,
      memoryLiveGiB: 1.5,
      memoryPeakGiB: 3.456,
    });
    expect(line).toBe(
      ' [2026-08-22 15:22:22.123000] iteration     1000/    1000 | consumed samples:    123456789 |' +
        ' skipped samples:            5 | elapsed time per iteration (ms): 2048.2 |' +
        ' throughput per GPU (TFLOP/s/GPU): 412.4 | learning rate: 3.000000E-04 |' +
        ' global batch size:  1024 | lm loss: 2.500000E+00 | load_balancing_loss: 1.001200E+00 |' +
        ' z_loss: 1.234568E-04 | mtp_1 loss: 2.750000E+00 | mtp_2 loss: 3.125000E+00 |' +
        ' loss scale: 65536.0 | grad norm: 12.346 | num zeros: 7.0 | params norm: 301.235 |' +
        ' number of skipped iterations:   1 | number of nan iterations:   2 |' +
        ' tokens per second: 2560.0 | memory live (GiB): 1.50 | memory peak (GiB): 3.46 |',
    );
  });

  it('leaves out absent fields, no skipped samples, and negative or NaN losses', () => {
    const line = formatTrainingLogLine({
      ...BF16,
      time: new Date(2026, 0, 2, 3, 4, 5, 6),
      skippedSamples: 0,
      throughputTflopsPerGpu: null,
      learningRate: null,
      lmLoss: -1,
      zLoss: Number.NaN,
      mtpLosses: [Number.POSITIVE_INFINITY],
      lossScale: null,
      gradNorm: null,
      memoryLiveGiB: null,
    });
    expect(line).toBe(
      ' [2026-01-02 03:04:05.006000] iteration       10/     100 | consumed samples:          320 |' +
        ' elapsed time per iteration (ms): 123.4 | global batch size:    32 | mtp_1 loss: INF |' +
        ' number of skipped iterations:   0 | number of nan iterations:   0 |',
    );
  });

  it('rejects a count that is not an integer, as Python {:d} does', () => {
    expect(() => formatTrainingLogLine({ ...BF16, consumedSamples: 1.5 })).toThrow(TrainError);
  });
});

describe('formatValidationLogLines', () => {
  it("frames the line in dashes one longer than it, as Megatron's evaluate_and_print_results", () => {
    const line =
      ' validation loss at iteration 100 | lm loss value: 0.000000E+00 | lm loss PPL: 1.000000E+00 | ';
    expect(line.length).toBe(94);
    expect(formatValidationLogLines({ iteration: 100, lmLoss: 0 })).toEqual([
      '-'.repeat(95),
      line,
      '-'.repeat(95),
    ]);
  });

  it('names the data set after training and caps the perplexity at e^20', () => {
    const [rule, line] = formatValidationLogLines({
      iteration: 5,
      lmLoss: 25,
      dataset: 'test set',
      setName: 'wiki',
    });
    expect(line).toBe(
      ' validation-wiki loss at iteration 5 on test set | lm loss value: 2.500000E+01 | lm loss PPL: 4.851652E+08 | ',
    );
    expect(rule).toBe('-'.repeat(110));
    // Python's min(20, nan) is 20.
    expect(formatValidationLogLines({ iteration: 1, lmLoss: Number.NaN })[1]).toBe(
      ' validation loss at iteration 1 | lm loss value: NAN | lm loss PPL: 4.851652E+08 | ',
    );
  });
});
