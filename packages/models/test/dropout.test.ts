// Hidden and attention dropout (Megatron's --hidden-dropout, --attention-dropout) on one process:
// masks keyed by (seed, layer, site, row id, token place), so a row drops the same elements
// whatever else is in the batch, a recomputed layer drops what the forward dropped, and evaluation
// drops nothing. The layouts (TP, SP, EP with DP) are checked on real processes in parallel.test.ts.
import { contextParallelPlan } from '@megapatch/parallel';
import { AdamW, fromTypedArray, memoryStats, type Tensor, tidy } from '@megapatch/tensor';
import { afterAll, describe, expect, it } from 'vitest';
import { dropoutKey, type GPTModel, keepMask, loadModel, ModelError, tokenSlots } from '../src/index.js';
import { fixtureCheckpoint } from './helpers/fixtures.js';

const ids = fromTypedArray(BigInt64Array.from([1, 5, 9, 33, 100, 7, 8, 9, 4, 77, 12, 3], BigInt), [2, 6]);
const labels = fromTypedArray(BigInt64Array.from([5, 9, 33, 100, 7, 8, 9, 4, 77, 12, 3, 2], BigInt), [2, 6]);
const owned: { dispose(): void }[] = [];
afterAll(() => {
  for (const m of owned) m.dispose();
});

const rates = { hiddenDropout: 0.3, attentionDropout: 0.3 };
const keys = (rowIds: number[], seed = 1234) => ({ dropout: { seed, rowIds } });

function model(id: string, opts: Parameters<typeof loadModel>[1] = {}): GPTModel {
  const m = loadModel(fixtureCheckpoint(id), opts).model;
  owned.push(m);
  return m;
}

const values = (t: Tensor): number[] => Array.from(t.to('float32').toTypedArray() as Float32Array);

function lossAndGrads(
  m: GPTModel,
  o: Parameters<GPTModel['forward']>[1],
): { loss: number[]; grads: Map<string, number[]> } {
  m.zeroGrad();
  const loss = m.forward(ids, { labels, ...o }).loss as Tensor;
  loss.mean().backward();
  const grads = new Map(m.namedParameters().map(([n, p]) => [n, values(p.grad as Tensor)]));
  return { loss: values(loss), grads };
}

function expectClose(a: number[], b: number[], tol: number, label: string): void {
  expect(a.length, label).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++)
    worst = Math.max(worst, Math.abs(a[i] - b[i]) / Math.max(1e-6, Math.abs(b[i])));
  expect(worst, label).toBeLessThanOrEqual(tol);
}

describe('keepMask', () => {
  it('drops a fraction p, scales the rest by 1/(1-p), and a row depends on its slot only', () => {
    const key = dropoutKey(1234n, 3, 'mlp-output', 17);
    const all = keepMask(
      key,
      Array.from({ length: 200 }, (_, i) => i),
      61,
      0.25,
      { dtype: 'float32', device: 'cpu' },
    );
    const v = values(all);
    const zeros = v.filter((x) => x === 0).length / v.length;
    expect(Math.abs(zeros - 0.25)).toBeLessThan(0.015); // 12,200 draws: sd 0.004
    for (const x of v) if (x !== 0) expect(x).toBeCloseTo(1 / 0.75, 6);
    // rows 7, 8, 9 and the out-of-order rows 150, 3 drawn alone equal those rows of the whole
    const some = values(keepMask(key, [7, 8, 9, 150, 3], 61, 0.25, { dtype: 'float32', device: 'cpu' }));
    [7, 8, 9, 150, 3].forEach((slot, i) => {
      expect(some.slice(i * 61, (i + 1) * 61)).toEqual(v.slice(slot * 61, (slot + 1) * 61));
    });
    // another row, layer or site draws another mask
    for (const other of [
      dropoutKey(1234n, 3, 'mlp-output', 18),
      dropoutKey(1234n, 4, 'mlp-output', 17),
      dropoutKey(1234n, 3, 'attention-output', 17),
      dropoutKey(1235n, 3, 'mlp-output', 17),
    ]) {
      const o = values(keepMask(other, [0, 1, 2], 61, 0.25, { dtype: 'float32', device: 'cpu' }));
      expect(o).not.toEqual(v.slice(0, 3 * 61));
    }
    all.dispose();
  });

  it("tokenSlots gives each context-parallel chunk's place in the row, as contextParallelPlan does", () => {
    for (const cp of [
      { rank: 0, size: 2 },
      { rank: 1, size: 2 },
      { rank: 2, size: 4 },
    ]) {
      const plain = contextParallelPlan(32, cp);
      expect(tokenSlots(32 / cp.size, cp, null)).toEqual(plain.tokenIndices);
      const cu = [0, 8 * cp.size, 8 * cp.size, 24 * cp.size];
      const packed = contextParallelPlan(24 * cp.size, cp, { cuSeqlens: cu });
      expect(tokenSlots(24, cp, packed.localCuSeqlens as number[])).toEqual(packed.tokenIndices);
    }
    expect(tokenSlots(5, null, null)).toEqual([0, 1, 2, 3, 4]);
  });
});

describe('GPTModel with dropout', () => {
  it('drops in training mode only: evaluation and rate 0 give the plain model', () => {
    const plain = model('llama');
    const dropped = model('llama', rates);
    const want = values(plain.forward(ids, { labels }).loss as Tensor);
    const train = values(dropped.forward(ids, { labels, ...keys([0, 1]) }).loss as Tensor);
    expect(train).not.toEqual(want);
    dropped.eval();
    expect(values(dropped.forward(ids, { labels, ...keys([0, 1]) }).loss as Tensor)).toEqual(want);
    dropped.train();
  });

  it('the same keys drop the same elements; another seed or row id drops others', () => {
    const m = model('llama', rates);
    const a = values(m.forward(ids, { labels, ...keys([0, 1]) }).loss as Tensor);
    expect(values(m.forward(ids, { labels, ...keys([0, 1]) }).loss as Tensor)).toEqual(a);
    expect(values(m.forward(ids, { labels, ...keys([0, 1], 99) }).loss as Tensor)).not.toEqual(a);
    const moved = values(m.forward(ids, { labels, ...keys([0, 5]) }).loss as Tensor);
    expect(moved.slice(0, 6)).toEqual(a.slice(0, 6)); // row 0 unchanged
    expect(moved.slice(6)).not.toEqual(a.slice(6));
    // without keys: fresh row ids from the default generator, so two forwards differ
    const x = values(m.forward(ids, { labels }).loss as Tensor);
    const y = values(m.forward(ids, { labels }).loss as Tensor);
    expect(x).not.toEqual(y);
  });

  it('a row drops what it drops whatever else is in the batch', () => {
    const m = model('llama', rates);
    const both = values(m.forward(ids, { labels, ...keys([40, 41]) }).loss as Tensor);
    const row = (r: number) => {
      const one = (t: Tensor) => t.narrow(0, r, 1).contiguous();
      return values(m.forward(one(ids), { labels: one(labels), ...keys([40 + r]) }).loss as Tensor);
    };
    expectClose(row(0), both.slice(0, 6), 1e-5, 'row 0 alone');
    expectClose(row(1), both.slice(6), 1e-5, 'row 1 alone');
  });

  it('full and selective recompute drop what the forward dropped: the same loss and gradients', () => {
    const ref = lossAndGrads(model('llama', rates), keys([3, 4]));
    for (const recompute of [
      { granularity: 'full' as const },
      { granularity: 'selective' as const, modules: ['core_attn' as const, 'mlp' as const] },
    ]) {
      const got = lossAndGrads(model('llama', { ...rates, recompute }), keys([3, 4]));
      expectClose(got.loss, ref.loss, 1e-6, `${recompute.granularity} loss`);
      for (const [n, g] of ref.grads)
        expectClose(got.grads.get(n) as number[], g, 1e-5, `${recompute.granularity} ${n}`);
    }
  });

  it('MLA, MoE and MTP (DeepSeek-V3) train with dropout, packed rows too', () => {
    const m = model('deepseek-v3', rates);
    const plain = model('deepseek-v3');
    const out = m.forward(ids, { labels, ...keys([0, 1]) });
    const base = plain.forward(ids, { labels });
    expect(values(out.loss as Tensor)).not.toEqual(values(base.loss as Tensor));
    expect(values(out.mtpLosses[0])).not.toEqual(values(base.mtpLosses[0]));
    // packed: one row of two samples
    const flat = (t: Tensor) => t.reshape(1, 12);
    const packed = m.forward(flat(ids), { labels: flat(labels), cuSeqlens: [0, 6, 12], ...keys([8]) });
    expect(values(packed.loss as Tensor).every(Number.isFinite)).toBe(true);
  });

  it('training with dropout frees every mask: memory is flat from step to step', () => {
    const m = model('deepseek-v3', { ...rates, recompute: { granularity: 'full' } });
    const opt = new AdamW(m.parameters(), { lr: 1e-3 });
    const live: number[] = [];
    for (let step = 0; step < 4; step++) {
      tidy(() => {
        const out = m.forward(ids, { labels, ...keys([2 * step, 2 * step + 1]) });
        (out.loss as Tensor).mean().add(out.mtpLosses[0]).backward();
      });
      opt.step();
      m.zeroGrad();
      live.push(memoryStats().liveBytes);
    }
    for (let s = 2; s < 4; s++) expect(live[s], `step ${s}`).toBe(live[1]);
    opt.dispose?.();
  });

  it('rejects a rate outside [0, 1) and row ids that do not fit the batch', () => {
    expect(() => model('llama', { hiddenDropout: 1 })).toThrow(/hiddenDropout must be in \[0, 1\), got 1/);
    expect(() => model('llama', { attentionDropout: -0.1 })).toThrow(ModelError);
    const m = model('llama', rates);
    expect(() => m.forward(ids, { labels, ...keys([0]) })).toThrow(
      /dropout.rowIds must give a non-negative integer id to each of the 2 rows, got \[0\] \(1\)/,
    );
    expect(() => m.forward(ids, { labels, ...keys([0, 1.5]) })).toThrow(/dropout.rowIds/);
  });
});
