// Logits parity of every family against the independent PyTorch reference (scripts/reference.py):
// fp32 logits, the loss and gradients of several parameters, packed rows, MTP, and bf16.
import { fromTypedArray, type Tensor } from '@megapatch/tensor';
import { afterAll, describe, expect, it } from 'vitest';
import { type GPTModel, loadModel } from '../src/index.js';
import {
  cosine,
  FIXTURE_IDS,
  fixtureCheckpoint,
  hfRowsInMegatron,
  readFixture,
  relMaxError,
} from './helpers/fixtures.js';

/** Logits [b, s, vocab] of the model's padded output, as float64. */
function realLogits(model: GPTModel, logits: Tensor): Float64Array {
  const real = model.gatherLogits(logits).contiguous().to('float32');
  return Float64Array.from(real.toTypedArray() as Float32Array);
}

const models: GPTModel[] = [];
afterAll(() => {
  for (const m of models) m.dispose();
});

describe.each(FIXTURE_IDS)('%s against the PyTorch reference', (id) => {
  const fx = readFixture(id);

  it('fp32 logits, loss and gradients', () => {
    const { model, architecture, config } = loadModel(fixtureCheckpoint(id));
    models.push(model);
    const ids = fx.ids('input_ids');
    const logits = model.forward(ids).logits as Tensor;
    const ref = fx.get('logits');
    expect(relMaxError(realLogits(model, logits), ref.data), 'logits').toBeLessThan(1e-5);

    const out = model.forward(ids, { labels: fx.ids('labels') });
    const loss = (out.loss as Tensor).mean();
    expect(Math.abs(loss.item() - fx.get('loss').data[0]) / fx.get('loss').data[0], 'loss').toBeLessThan(
      1e-5,
    );
    if (fx.has('mtp_loss_1')) {
      expect(out.mtpLosses.length).toBe(1);
      expect(
        Math.abs(out.mtpLosses[0].item() - fx.get('mtp_loss_1').data[0]) / fx.get('mtp_loss_1').data[0],
        'MTP loss',
      ).toBeLessThan(1e-5);
    }
    loss.backward();
    const params = new Map(model.namedParameters());
    expect(fx.grads.length).toBeGreaterThan(2);
    for (const hf of fx.grads) {
      const want = fx.get(`grad.${hf}`);
      const runs = hfRowsInMegatron(architecture, config, hf);
      expect(runs.length, hf).toBeGreaterThan(0);
      const cols = want.shape.length > 1 ? want.shape.slice(1).reduce((a, b) => a * b, 1) : 1;
      const rows = fx.rowSubset(hf);
      const hfRows = rows ? Math.max(...rows) + 1 : want.shape[0];
      const full = new Float64Array(hfRows * cols);
      for (const r of runs) {
        // a tied embedding is the output layer too; its parameter carries both gradients
        const p = params.get(r.name) ?? params.get('embedding.word_embeddings.weight');
        const g = ((p as Tensor).grad as Tensor).to('float32').toTypedArray() as Float32Array;
        const n = Math.min(r.count, hfRows - r.sourceStart);
        for (let i = 0; i < n * cols; i++) full[r.sourceStart * cols + i] = g[r.start * cols + i];
      }
      const got = rows ? new Float64Array(rows.length * cols) : full;
      if (rows) {
        for (const [j, row] of rows.entries()) got.set(full.subarray(row * cols, (row + 1) * cols), j * cols);
      }
      expect(relMaxError(got, want.data), `gradient of ${hf}`).toBeLessThan(1e-4);
    }
  });

  it('packed rows attend within their own sample', () => {
    const { model } = loadModel(fixtureCheckpoint(id));
    models.push(model);
    const cu = fx.get('packed_cu_seqlens');
    const logits = model.forward(fx.ids('packed_input_ids'), {
      positionIds: fx.ids('packed_position_ids'),
      cuSeqlens: fromTypedArray(Int32Array.from(cu.data), [cu.data.length]),
    }).logits as Tensor;
    expect(relMaxError(realLogits(model, logits), fx.get('packed_logits').data)).toBeLessThan(1e-5);
  });

  it('bf16 logits keep cosine ≥ 0.999', () => {
    const { model } = loadModel(fixtureCheckpoint(id), { dtype: 'bfloat16' });
    models.push(model);
    const logits = model.forward(fx.ids('input_ids')).logits as Tensor;
    expect(logits.dtype).toBe('bfloat16');
    expect(cosine(realLogits(model, logits), fx.get('logits').data)).toBeGreaterThan(0.999);
  });
});
