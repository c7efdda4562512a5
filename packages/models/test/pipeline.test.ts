// Pipeline stages of GPTModel: each stage builds and loads only its global layers (HF folder or
// megapatch checkpoint, even and uneven cuts); stages chained by hand in one process, and run on
// real processes under the 1F1B schedule (test/workers/pipeline-worker.ts), give the one-process
// losses and gradients, the tied embeddings' summed gradient included.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fromTypedArray, Generator, randint, type Tensor } from '@megapatch/tensor';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ModelError } from '../src/errors.js';
import type { GPTModel, GPTModelOptions } from '../src/gpt-model.js';
import { loadModel, saveModel } from '../src/load.js';
import { fixtureCheckpoint } from './helpers/fixtures.js';
import { launchWorkers } from './helpers/launch.js';
import {
  byLogicalName,
  compareNamed,
  deeperFixture,
  type IdsBatch,
  oneProcessReference,
} from './helpers/pipeline.js';
import type { PipelineRunResult, PipelineWorkerConfig } from './workers/pipeline-worker.js';

const TOL = 1e-5;

type StageOptions = Pick<
  GPTModelOptions,
  'decoderFirstPipelineNumLayers' | 'decoderLastPipelineNumLayers' | 'pipelineModelParallelLayout'
>;

function loadStages(dir: string, pp: number, split: StageOptions = {}): GPTModel[] {
  return Array.from(
    { length: pp },
    (_, r) => loadModel(dir, { pipelineModelParallelSize: pp, pipelineStage: { ppRank: r }, ...split }).model,
  );
}

function batchOf(seed: number, vocab: number, b = 2, s = 8): IdsBatch {
  const g = new Generator(seed);
  return {
    ids: randint(0, vocab, [b, s], { generator: g }),
    labels: randint(0, vocab, [b, s], { generator: g }),
  };
}

/**
 * Runs the stages one after the other on one micro-batch as the schedule would (each stage's input
 * a fresh leaf, its gradient sent back), then sums the shared embedding copies' gradients.
 */
function runChain(stages: GPTModel[], { ids, labels, cuSeqlens }: IdsBatch): number {
  const inputs: (Tensor | null)[] = [];
  const outputs: Tensor[] = [];
  let h: Tensor | null = null;
  for (const st of stages) {
    const x = h ? h.detach().requiresGrad_() : null;
    const o = st.forward(st.preProcess || st.mtp ? ids : null, {
      hiddenStates: x,
      labels: st.postProcess ? labels : undefined,
      cuSeqlens,
    });
    inputs.push(x);
    outputs.push((o.loss ?? o.hiddenStates) as Tensor);
    h = o.hiddenStates;
  }
  const loss = (outputs.at(-1) as Tensor).mean();
  loss.backward();
  for (let i = stages.length - 2; i >= 0; i--) outputs[i].backward((inputs[i + 1] as Tensor).grad as Tensor);
  const shared = stages.map((s) => s.sharedEmbeddingWeight()).filter((w): w is Tensor => w !== null);
  if (shared.length === 2) {
    const [a, b] = shared.map((w) => w.grad as Tensor);
    const sum = a.add(b);
    a.copy_(sum);
    b.copy_(sum);
  }
  return loss.item();
}

/** Gradients of all stages by logical name (a shared copy appears once: they are equal). */
function stageGrads(stages: GPTModel[]): Map<string, Float64Array> {
  const out = new Map<string, Float64Array>();
  for (const st of stages) for (const [n, g] of byLogicalName(st, 'grad')) out.set(n, g);
  return out;
}

describe('building one stage', () => {
  let dir: string;
  let full: GPTModel;
  beforeAll(() => {
    dir = fixtureCheckpoint('llama');
    full = loadModel(dir).model;
  });
  afterAll(() => full.dispose());

  it('stage k of pp = 2 holds global layers 2k, 2k + 1 with the full model weights', () => {
    const want = byLogicalName(full, 'weight');
    for (const [r, st] of loadStages(dir, 2).entries()) {
      expect([...st.decoder.layers].map((l) => l.layerNumber)).toEqual([2 * r, 2 * r + 1]);
      expect([st.preProcess, st.postProcess]).toEqual([r === 0, r === 1]);
      expect(st.embedding !== null).toBe(r === 0); // untied: no copy on the last stage
      expect(st.outputLayer !== null).toBe(r === 1);
      expect(st.decoder.finalLayernorm !== null).toBe(r === 1);
      expect(st.sharedEmbeddingWeight()).toBeNull();
      const got = byLogicalName(st, 'weight');
      const names = [...got.keys()];
      expect(names).toContain(`decoder.layers.${2 * r + 1}.mlp.linear_fc2.weight`);
      expect(names.some((n) => n.startsWith(`decoder.layers.${2 * (1 - r)}.`))).toBe(false);
      expect(compareNamed(got, want).max).toBe(0);
      st.dispose();
    }
  });

  it('loads the same stage from a megapatch checkpoint', () => {
    const ckpt = saveModel(full, path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'mp-pp-')), 'ckpt'), {
      architecture: 'LlamaForCausalLM',
    });
    const st = loadModel(ckpt, { pipelineModelParallelSize: 2, pipelineStage: { ppRank: 1 } }).model;
    expect([...st.decoder.layers].map((l) => l.layerNumber)).toEqual([2, 3]);
    expect(compareNamed(byLogicalName(st, 'weight'), byLogicalName(full, 'weight')).max).toBe(0);
    expect(() => saveModel(st, path.join(ckpt, '..', 'again'), { architecture: 'LlamaForCausalLM' })).toThrow(
      ModelError,
    );
    st.dispose();
  });

  it('refuses a stage outside the pipeline and a split that does not fit', () => {
    expect(() => loadModel(dir, { pipelineModelParallelSize: 2, pipelineStage: { ppRank: 2 } })).toThrow(
      /pipeline rank 2/,
    );
    expect(() => loadModel(dir, { pipelineModelParallelSize: 3 })).toThrow(ModelError);
  });

  it('a later stage needs the hidden states', () => {
    const [, st] = loadStages(dir, 2);
    expect(() => st.forward(null)).toThrow(/hidden states/);
    st.dispose();
  });
});

describe('stages chained in one process match one process', () => {
  const cases: { what: string; id: string; layers: number; pp: number; split?: StageOptions }[] = [
    { what: 'llama, pp = 2', id: 'llama', layers: 4, pp: 2 },
    {
      what: 'tied llama, pp = 4, decoderFirstPipelineNumLayers = 3',
      id: 'llama-tied',
      layers: 6,
      pp: 4,
      split: { decoderFirstPipelineNumLayers: 3 },
    },
    {
      what: 'tied llama, pp = 3, layout "E|t*4|t,L"',
      id: 'llama-tied',
      layers: 5,
      pp: 3,
      split: { pipelineModelParallelLayout: 'E|t*4|t,L' },
    },
    { what: 'qwen3-moe, pp = 2', id: 'qwen3-moe', layers: 4, pp: 2 },
  ];
  it.each(cases)('$what', ({ id, layers, pp, split }) => {
    const dir = layers === 4 ? fixtureCheckpoint(id) : deeperFixture(id, layers);
    const stages = loadStages(dir, pp, split);
    const vocab = stages[0].config.vocabSize;
    const batch = batchOf(7, vocab);
    const ref = oneProcessReference(dir, [batch]);
    const loss = runChain(stages, batch);
    expect(Math.abs(loss - ref.losses[0]) / ref.losses[0]).toBeLessThanOrEqual(TOL);
    const grads = stageGrads(stages);
    expect(grads.size).toBe(ref.grads.size); // every parameter on exactly one stage (copies merged)
    const c = compareNamed(grads, ref.grads);
    expect(c.max, `gradient of ${c.worst}`).toBeLessThanOrEqual(TOL);
    if (!stages[0].config.untieEmbeddingsAndOutputWeights) {
      const [first, last] = [stages[0], stages[pp - 1]].map((s) => s.sharedEmbeddingWeight());
      expect(first).not.toBeNull();
      expect(last).not.toBeNull();
    }
    for (const s of stages) s.dispose();
  });
});

describe('every stage builds its attention context', () => {
  it('packed rows (cuSeqlens): pp = 2 matches one process', () => {
    const dir = fixtureCheckpoint('llama');
    const stages = loadStages(dir, 2);
    const batch = {
      ...batchOf(3, stages[0].config.vocabSize, 1, 8),
      cuSeqlens: fromTypedArray(new Int32Array([0, 3, 8]), [3]),
    };
    const ref = oneProcessReference(dir, [batch]);
    const plain = oneProcessReference(dir, [{ ids: batch.ids, labels: batch.labels }]);
    expect(Math.abs(plain.losses[0] - ref.losses[0])).toBeGreaterThan(1e-4); // the packing matters
    const loss = runChain(stages, batch);
    expect(Math.abs(loss - ref.losses[0]) / ref.losses[0]).toBeLessThanOrEqual(TOL);
    const c = compareNamed(stageGrads(stages), ref.grads);
    expect(c.max, `gradient of ${c.worst}`).toBeLessThanOrEqual(TOL);
    for (const s of stages) s.dispose();
  });
});

describe('1F1B on real processes matches one process', () => {
  const runs: (PipelineWorkerConfig & { what: string })[] = [
    { what: 'llama, pp = 2, 4 micro-batches', dir: '', id: 'llama', layers: 4, pp: 2, microbatches: 4 },
    {
      what: 'tied llama, pp = 4 (3, 1, 1, 1), 5 micro-batches',
      dir: '',
      id: 'llama-tied',
      layers: 6,
      pp: 4,
      microbatches: 5,
      split: { decoderFirstPipelineNumLayers: 3 },
    },
  ];
  it.each(runs)(
    '$what',
    async (run) => {
      const dir = run.layers === 4 ? fixtureCheckpoint(run.id) : deeperFixture(run.id, run.layers);
      const results = (await launchWorkers({
        nproc: run.pp,
        script: 'pipeline-worker.ts',
        config: { ...run, dir },
        timeoutMs: 240_000,
      })) as PipelineRunResult[];
      expect(results.length).toBe(run.pp);
      for (const r of results) {
        expect(r.error, `rank ${r.rank}`).toBeUndefined();
        expect(r.grads.max, `rank ${r.rank}: gradient of ${r.grads.worst}`).toBeLessThanOrEqual(TOL);
        expect(r.grads.count).toBeGreaterThan(0);
      }
      const [first, last] = [0, run.pp - 1].map(
        (k) => results.find((r) => r.rank === k) as PipelineRunResult,
      );
      expect(last.losses.length).toBe(run.microbatches);
      expect(last.lossError).toBeLessThanOrEqual(TOL);
      if (run.id === 'llama-tied') {
        // the summed gradient of both copies equals the one-process embedding gradient
        for (const r of [first, last]) expect(r.sharedEmbeddingError).toBeLessThanOrEqual(TOL);
      } else {
        for (const r of results) expect(r.sharedEmbeddingError).toBeNull();
      }
    },
    300_000,
  );
});
