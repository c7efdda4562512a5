// DPO's sigmoid (with cDPO's label smoothing), hinge and IPO losses, their gradients and the
// implicit rewards against PyTorch's float64 values (fixtures/make-dpo-loss.py), for margins of
// either sign and for a run's first step, where every margin is exactly 0.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fromTypedArray, tidy } from '@megapatch/tensor';
import { describe, expect, it } from 'vitest';
import { type DpoLossType, dpoLoss } from '../src/index.js';

interface Fixture {
  policyChosen: number[];
  policyRejected: number[];
  cases: {
    inputs: 'random' | 'start';
    refChosen: number[];
    refRejected: number[];
    lossType: DpoLossType;
    beta: number;
    labelSmoothing: number;
    losses: number[];
    loss: number;
    gradChosen: number[];
    gradRejected: number[];
    chosenRewards: number[];
    rejectedRewards: number[];
  }[];
}
const fx = JSON.parse(
  fs.readFileSync(path.join(import.meta.dirname, 'fixtures', 'dpo-loss.json'), 'utf8'),
) as Fixture;
const t = (v: number[]) => fromTypedArray(Float64Array.from(v), [v.length]);
const close = (a: ArrayLike<number>, b: ArrayLike<number>, label: string) => {
  expect(a.length, label).toBe(b.length);
  for (let i = 0; i < b.length; i++)
    expect(Math.abs(a[i] - b[i]), `${label}[${i}]`).toBeLessThanOrEqual(1e-12 * (1 + Math.abs(b[i])));
};

describe('DPO losses', () => {
  it('give PyTorch losses, gradients and rewards for every type', () => {
    for (const c of fx.cases) {
      const label = `${c.inputs}: ${c.lossType} beta ${c.beta} ls ${c.labelSmoothing}`;
      const pc = t(fx.policyChosen).requiresGrad_();
      const pr = t(fx.policyRejected).requiresGrad_();
      const r = tidy(() => {
        const out = dpoLoss({
          policyChosen: pc,
          policyRejected: pr,
          refChosen: t(c.refChosen),
          refRejected: t(c.refRejected),
          beta: c.beta,
          lossType: c.lossType,
          labelSmoothing: c.labelSmoothing,
        });
        const loss = out.losses.mean();
        loss.backward();
        return {
          losses: Array.from(out.losses.toTypedArray() as Float64Array),
          loss: loss.item(),
          chosen: Array.from(out.chosenRewards.toTypedArray() as Float64Array),
          rejected: Array.from(out.rejectedRewards.toTypedArray() as Float64Array),
        };
      });
      close(r.losses, c.losses, `${label} losses`);
      expect(Math.abs(r.loss - c.loss), label).toBeLessThan(1e-12 * (1 + c.loss));
      close(pc.grad?.toTypedArray() as Float64Array, c.gradChosen, `${label} d/dchosen`);
      close(pr.grad?.toTypedArray() as Float64Array, c.gradRejected, `${label} d/drejected`);
      close(r.chosen, c.chosenRewards, `${label} chosen rewards`);
      close(r.rejected, c.rejectedRewards, `${label} rejected rewards`);
    }
    // the hinge's flat side is reached: a pair with zero loss and zero gradient
    const hinge = fx.cases.find((c) => c.lossType === 'hinge' && c.beta === 1);
    expect(hinge?.losses.some((l) => l === 0)).toBe(true);
  });

  it('refuses a β of 0 and unknown loss types', () => {
    const z = t([0]);
    const o = { policyChosen: z, policyRejected: z, refChosen: z, refRejected: z };
    expect(() => dpoLoss({ ...o, beta: 0, lossType: 'sigmoid' })).toThrow(/beta must be > 0, got 0/);
    expect(() => dpoLoss({ ...o, beta: 0.1, lossType: 'kto' as DpoLossType })).toThrow(
      /unknown DPO loss kto/,
    );
  });
});
