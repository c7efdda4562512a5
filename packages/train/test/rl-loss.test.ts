// GRPO's advantages, policy losses (PPO clip with dual clip, GSPO), KL estimators and loss
// aggregations against PyTorch's float64 values and gradients (fixtures/make-rl-loss.py), and the
// aggregation of parts (micro-batches, ranks) adding up to the whole batch's loss.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fromTypedArray, type Tensor, tidy } from '@megapatch/tensor';
import { describe, expect, it } from 'vitest';
import {
  aggregateLoss,
  grpoAdvantages,
  type KlType,
  klPenalty,
  type LossAggregation,
  policyGradientLosses,
} from '../src/index.js';

interface Fixture {
  B: number;
  S: number;
  mask: number[];
  old: number[];
  logp: number[];
  ref: number[];
  advantages: number[];
  kl: Record<KlType, number[]>;
  rewards: number[];
  advantageCases: { groupSize: number; normalizeByStd: boolean; epsilon: number; advantages: number[] }[];
  cases: {
    mode: 'vanilla' | 'gspo';
    aggregation: LossAggregation;
    klType: KlType | null;
    klCoef: number;
    clipRatioLow: number;
    clipRatioHigh: number;
    clipRatioC: number | null;
    loss: number;
    grad: number[];
    clipFraction: number;
    approxKl: number;
    dualClipped: boolean;
  }[];
}

const fx = JSON.parse(
  fs.readFileSync(path.join(import.meta.dirname, 'fixtures', 'rl-loss.json'), 'utf8'),
) as Fixture;
const t = (v: number[], shape: number[]) => fromTypedArray(Float64Array.from(v), shape);
const close = (a: ArrayLike<number>, b: ArrayLike<number>, tol = 1e-12) => {
  expect(a.length).toBe(b.length);
  for (let i = 0; i < a.length; i++)
    expect(Math.abs(a[i] - b[i])).toBeLessThanOrEqual(tol * (1 + Math.abs(b[i])));
};

describe('GRPO advantages', () => {
  it('are the rewards normalised within each group, as torch computes them', () => {
    for (const c of fx.advantageCases) {
      const a = grpoAdvantages(fx.rewards, c.groupSize, {
        normalizeByStd: c.normalizeByStd,
        epsilon: c.epsilon,
      });
      close(a, c.advantages);
    }
  });
  it('refuse rewards that do not make whole groups', () => {
    expect(() => grpoAdvantages([1, 2, 3], 2)).toThrow(/whole groups of 2/);
  });
});

describe('KL estimators', () => {
  it('match the fixture for every type', () => {
    const { B, S } = fx;
    for (const k of ['kl', 'abs', 'mse', 'low_var_kl'] as const) {
      const v = tidy(
        () => klPenalty(t(fx.logp, [B, S]), t(fx.ref, [B, S]), k).toTypedArray() as Float64Array,
      );
      close(v, fx.kl[k]);
    }
  });
});

describe('GRPO policy loss', () => {
  it('gives PyTorch loss, gradient, clip fraction and approximate KL in every mode', () => {
    const { B, S } = fx;
    for (const c of fx.cases) {
      const logp = t(fx.logp, [B, S]).requiresGrad_();
      const mask = t(fx.mask, [B, S]);
      const r = tidy(() => {
        const terms = policyGradientLosses({
          logProbs: logp,
          oldLogProbs: t(fx.old, [B, S]),
          advantages: t(fx.advantages, [B, 1]),
          mask,
          clipRatioLow: c.clipRatioLow,
          clipRatioHigh: c.clipRatioHigh,
          clipRatioC: c.clipRatioC,
          mode: c.mode,
        });
        let loss: Tensor = aggregateLoss(terms.losses, mask, c.aggregation);
        if (c.klType !== null)
          loss = loss.add(
            aggregateLoss(klPenalty(logp, t(fx.ref, [B, S]), c.klType), mask, c.aggregation).mul(c.klCoef),
          );
        loss.backward();
        const tokens = mask.sum().item();
        return {
          loss: loss.item(),
          clip: terms.clipped.to('float64').mul(mask).sum().item() / tokens,
          approxKl: terms.approxKl.mul(mask).sum().item() / tokens,
        };
      });
      const label = `${c.mode} ${c.aggregation} ${c.klType}`;
      expect(Math.abs(r.loss - c.loss), label).toBeLessThan(1e-12);
      expect(r.clip, label).toBeCloseTo(c.clipFraction, 12);
      expect(r.approxKl, label).toBeCloseTo(c.approxKl, 12);
      close(logp.grad?.toTypedArray() as Float64Array, c.grad);
      // the fixture exercises both sides of the clip
      if (c.mode === 'vanilla') {
        expect(c.clipFraction).toBeGreaterThan(0);
        expect(c.dualClipped).toBe(true);
      }
      logp.dispose();
    }
  });

  it('adds up over parts of a batch: micro-batches with the whole batch totals give its loss', () => {
    const { B, S } = fx;
    for (const mode of [
      'token-mean',
      'seq-mean-token-sum',
      'seq-mean-token-mean',
      'seq-mean-token-sum-norm',
    ] as const) {
      tidy(() => {
        const losses = t(fx.logp, [B, S]).neg();
        const mask = t(fx.mask, [B, S]);
        const whole = aggregateLoss(losses, mask, mode).item();
        const totals = { tokens: mask.sum().item(), sequences: B, normLength: S };
        let sum = 0;
        for (const [start, n] of [
          [0, 1],
          [1, 3],
          [4, 2],
        ])
          sum += aggregateLoss(losses.narrow(0, start, n), mask.narrow(0, start, n), mode, totals).item();
        expect(sum).toBeCloseTo(whole, 12);
      });
    }
  });
});
