// Shared by test/pipeline.test.ts and its worker: tiny fixture models with more layers, gradients
// by logical (global) name, and the one-process reference of a run of micro-batches.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { SingleProcessGroup } from '@megapatch/parallel';
import type { Tensor } from '@megapatch/tensor';
import { fixtureConfig } from '../../scripts/write-fixture-checkpoints.js';
import type { GPTModel } from '../../src/gpt-model.js';
import { loadModel, logicalName } from '../../src/load.js';

/** Writes fixture model `id` with `layers` decoder layers as an F32 HF folder; returns the folder. */
export function deeperFixture(id: string, layers: number): string {
  const dir = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'mp-pipeline-')), `${id}-${layers}`);
  writeSyntheticHfCheckpoint(
    dir,
    { ...fixtureConfig(id), num_hidden_layers: layers },
    { dtype: 'F32', seed: 0, maxShardSize: '1GB' },
  );
  return dir;
}

/** One micro-batch of ids and labels. */
export interface IdsBatch {
  ids: Tensor;
  labels: Tensor;
  /** Packed rows (b = 1): sample boundaries. */
  cuSeqlens?: Tensor;
}

/** Parameters (and their gradients) of a stage by logical name. */
export function byLogicalName(model: GPTModel, what: 'weight' | 'grad'): Map<string, Float64Array> {
  const out = new Map<string, Float64Array>();
  for (const [local, p] of model.namedParameters()) {
    const t = what === 'weight' ? p : p.grad;
    if (!t) continue;
    out.set(logicalName(model, local), Float64Array.from(t.to('float32').toTypedArray() as Float32Array));
  }
  return out;
}

/**
 * The one-process model on the same micro-batches, with the schedule's averaging (mean loss per
 * micro-batch, divided by their number): the losses and the accumulated gradients by name.
 */
export function oneProcessReference(
  dir: string,
  batches: IdsBatch[],
): { losses: number[]; grads: Map<string, Float64Array>; weights: Map<string, Float64Array> } {
  const single = new SingleProcessGroup();
  const { model } = loadModel(dir, {
    tpGroup: single,
    epGroup: single,
    etpGroup: single,
    cpGroup: single,
    ppGroup: single,
  });
  const losses: number[] = [];
  for (const { ids, labels, cuSeqlens } of batches) {
    const loss = (model.forward(ids, { labels, cuSeqlens }).loss as Tensor).mean();
    losses.push(loss.item());
    loss.div(batches.length).backward();
  }
  const out = { losses, grads: byLogicalName(model, 'grad'), weights: byLogicalName(model, 'weight') };
  model.dispose();
  return out;
}

/** Max relative error (max |a − b| / max |b|) of each named tensor of `got` against `want`. */
export function compareNamed(
  got: Map<string, Float64Array>,
  want: Map<string, Float64Array>,
): { max: number; worst: string; count: number } {
  let max = 0;
  let worst = '';
  for (const [name, a] of got) {
    const b = want.get(name);
    if (!b || b.length !== a.length)
      return { max: Number.POSITIVE_INFINITY, worst: `${name} (missing)`, count: 0 };
    let diff = 0;
    let scale = 0;
    for (let i = 0; i < a.length; i++) {
      diff = Math.max(diff, Math.abs(a[i] - b[i]));
      scale = Math.max(scale, Math.abs(b[i]));
    }
    const e = diff / Math.max(scale, 1e-30);
    if (e >= max) {
      max = e;
      worst = name;
    }
  }
  return { max, worst, count: got.size };
}
