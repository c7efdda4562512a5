// TP = 2, and EP = 2 for MoE, give the same logits, losses and gradients as one process: every
// layout runs on two real processes (test/workers/parallel-worker.ts under the launcher), each
// loading only its slices of the fixture's HF folder, and is compared with the PyTorch fixture and
// with the same model on one process. Bad layouts are refused in-process with one clear error.
import { getTensorModelParallelAttributes, type ProcessGroup } from '@megapatch/parallel';
import { fromTypedArray } from '@megapatch/tensor';
import { beforeAll, describe, expect, it } from 'vitest';
import { ModelError } from '../src/errors.js';
import { GPTModel, type GPTModelOptions } from '../src/gpt-model.js';
import { openWeights } from '../src/load.js';
import { fixtureCheckpoint } from './helpers/fixtures.js';
import { launchWorkers } from './helpers/launch.js';
import type { RunResult, WorkerConfig } from './workers/parallel-worker.js';

const LOGITS_TOL = 1e-5;
const LOSS_TOL = 1e-5;
const GRAD_TOL = 1e-4;

/** Runs one layout on two processes; the results of every run, by run key, per rank. */
async function runLayout(config: WorkerConfig): Promise<Map<string, RunResult[]>> {
  const results = (await launchWorkers({ nproc: 2, script: 'parallel-worker.ts', config })) as RunResult[];
  const byRun = new Map<string, RunResult[]>();
  for (const r of results) {
    const key = runKey(r);
    byRun.set(
      key,
      [...(byRun.get(key) ?? []), r].sort((a, b) => a.rank - b.rank),
    );
  }
  return byRun;
}

interface Run {
  id: string;
  sp?: boolean;
  zeroCenteredGamma?: boolean;
  dropout?: boolean;
}

function runKey(r: Run): string {
  return `${r.id}${r.sp ? ' +sp' : ''}${r.zeroCenteredGamma ? ' +zero-centred' : ''}${r.dropout ? ' +dropout' : ''}`;
}

/**
 * Both ranks finished the run; rank 0's errors against one process are within tolerance, and
 * against the fixture too unless the run changed the model (zero-centred norms).
 */
function expectParity(ranks: RunResult[] | undefined): RunResult[] {
  expect(ranks?.length, 'a result from each of the 2 ranks').toBe(2);
  const [r0, r1] = ranks as RunResult[];
  for (const r of [r0, r1]) expect(r.error, `rank ${r.rank}`).toBeUndefined();
  const e = r0.errors;
  if (!e) throw new Error('rank 0 reported no errors');
  if (r0.zeroCenteredGamma) {
    // (1 + w) norms make another model: far from the plain fixture, compared with one process only.
    expect(e.logits, 'zero-centred norms change the logits').toBeGreaterThan(1e-2);
  } else if (r0.dropout) {
    // dropout changes the outputs: compared with one process dropping the same elements
    expect(e.logits, 'dropout changes the logits').toBeGreaterThan(1e-2);
  } else expectFixtureParity(e);
  expect(e.oneProcess.logits, 'logits vs one process').toBeLessThanOrEqual(LOGITS_TOL);
  const g = e.oneProcess.grads;
  expect(g.max, `gradient of ${g.worst} vs one process`).toBeLessThanOrEqual(GRAD_TOL);
  expect(g.replicaSpread, 'replicated gradients agree on the TP ranks').toBeLessThanOrEqual(1e-6);
  if (e.mtpLoss !== null) {
    const m = e.oneProcess.mtpGrads;
    expect(m, 'MTP gradients compared').not.toBeNull();
    expect(m?.max, `MTP-loss gradient of ${m?.worst} vs one process`).toBeLessThanOrEqual(GRAD_TOL);
  }
  return [r0, r1];
}

function expectFixtureParity(e: NonNullable<RunResult['errors']>): void {
  expect(e.logits, 'gathered logits vs the fixture').toBeLessThanOrEqual(LOGITS_TOL);
  expect(e.loss, 'loss vs the fixture').toBeLessThanOrEqual(LOSS_TOL);
  if (e.mtpLoss !== null) expect(e.mtpLoss, 'MTP loss vs the fixture').toBeLessThanOrEqual(LOSS_TOL);
  expect(Object.keys(e.fixtureGrads).length).toBeGreaterThan(2);
  for (const [hf, err] of Object.entries(e.fixtureGrads)) {
    expect(err, `gradient of ${hf} vs the fixture`).toBeLessThanOrEqual(GRAD_TOL);
  }
}

const TP_RUNS: (Run & { what: string })[] = [
  { id: 'llama', what: 'GQA with 2 KV groups' },
  { id: 'llama', what: 'GQA, sequence parallel', sp: true },
  { id: 'qwen2', what: 'QKV bias, tied output' },
  { id: 'qwen3', what: 'QK norm, head_dim ≠ hidden/heads' },
  { id: 'qwen3', what: 'QK norm, zero-centred (1 + w) norms', zeroCenteredGamma: true },
  { id: 'llama-tied', what: 'tied output layer' },
  { id: 'deepseek-v3', what: 'MLA with q LoRA, MoE, MTP' },
  { id: 'mixtral', what: 'MoE, experts split by expert-TP' },
  { id: 'qwen2-moe', what: 'MoE with a gated shared expert' },
  { id: 'mixtral', what: 'MoE, sequence parallel', sp: true },
  { id: 'qwen3-moe', what: 'MoE with QK norm, sequence parallel', sp: true },
  { id: 'qwen2-moe', what: 'gated shared expert, sequence parallel', sp: true },
  { id: 'deepseek-v3', what: 'MLA with q LoRA, MoE, MTP, sequence parallel', sp: true },
  { id: 'deepseek-v2', what: 'MLA without q LoRA, MoE, sequence parallel', sp: true },
  { id: 'llama', what: 'hidden and attention dropout, sequence parallel', sp: true, dropout: true },
  { id: 'deepseek-v3', what: 'dropout in MLA, MoE and MTP (its embedding too)', dropout: true },
  {
    id: 'phi4-mini',
    what: 'packed qkv_proj and gate_up_proj, 6 of 8 channels rotating, longrope, sequence parallel',
    sp: true,
  },
];
const EP_RUNS: (Run & { what: string })[] = [
  { id: 'mixtral', what: '4 experts, top-2' },
  { id: 'qwen3-moe', what: '4 experts, normalised top-2' },
  { id: 'deepseek-v3', what: '8 grouped sigmoid experts, shared expert, MTP' },
  { id: 'mixtral', what: 'hidden and attention dropout, each rank its row', dropout: true },
];

describe('TP=2 on two processes', () => {
  let runs: Map<string, RunResult[]>;
  beforeAll(async () => {
    runs = await runLayout({
      tp: 2,
      ep: 1,
      runs: TP_RUNS.map(({ what: _, ...r }) => ({ ...r, dir: fixtureCheckpoint(r.id) })),
    });
  });

  it.each(TP_RUNS)('$id ($what) matches the fixture and one process', (run) => {
    const ranks = expectParity(runs.get(runKey(run)));
    for (const r of ranks) {
      expect(r.layout).toMatchObject({
        tp: 2,
        ep: 1,
        etp: 2,
        dp: 1,
        tpRank: r.rank,
        sequenceParallel: run.sp ?? false,
      });
      // Both TP ranks feed the whole batch.
      expect(r.batchRows).toEqual([0, 1]);
      const s = r.shards;
      for (const rows of [s.vocab, s.attention, ...(s.denseFc1 ? [s.denseFc1] : [])]) {
        expect(rows.local * 2, `${rows.name} holds 1/TP of the rows`).toBe(rows.full);
      }
      if (s.experts) {
        expect(s.experts.local, 'every TP rank holds every expert').toBe(s.experts.total);
        expect(s.experts.fc1.local * 2, 'experts split by expert-TP').toBe(s.experts.fc1.full);
      }
    }
  });
});

describe('EP=2 on two processes (TP=1, each rank half of the batch)', () => {
  let runs: Map<string, RunResult[]>;
  beforeAll(async () => {
    runs = await runLayout({
      tp: 1,
      ep: 2,
      runs: EP_RUNS.map(({ what: _, ...r }) => ({ ...r, dir: fixtureCheckpoint(r.id) })),
    });
  });

  it.each(EP_RUNS)('$id ($what) matches the fixture and one process', (run) => {
    const ranks = expectParity(runs.get(runKey(run)));
    for (const r of ranks) {
      expect(r.layout).toMatchObject({
        tp: 1,
        ep: 2,
        etp: 1,
        dp: 2,
        epRank: r.rank,
        sequenceParallel: false,
      });
      // The EP ranks are the dense part's DP ranks: each feeds its own row.
      expect(r.batchRows).toEqual([r.rank]);
      const x = r.shards.experts;
      if (!x) throw new Error('a MoE model reports its experts');
      expect(x.local * 2, 'each EP rank holds E/EP experts').toBe(x.total);
      expect(x.first).toBe(r.rank * x.local);
      expect(x.fc1.local, 'no expert-TP split').toBe(x.fc1.full);
      expect(r.shards.attention.local).toBe(r.shards.attention.full);
    }
  });
});

/** A group of `size` processes that this process pretends to be rank 0 of; it runs no collectives. */
function fakeGroup(size: number, name: string): ProcessGroup {
  const none = (): never => {
    throw new Error(`${name}: a fake group runs no collectives`);
  };
  return {
    backend: 'none',
    name,
    rank: 0,
    size,
    ranks: Array.from({ length: size }, (_, i) => i),
    timeoutMs: 0,
    allReduce: none,
    allGather: none,
    allGatherIntoTensor: none,
    reduceScatter: none,
    reduceScatterTensor: none,
    broadcast: none,
    send: none,
    recv: none,
    allToAll: none,
    barrier: none,
    destroy: () => {},
  };
}

function configOf(id: string) {
  const w = openWeights(fixtureCheckpoint(id));
  w.source.close();
  return w.config;
}

/** The ModelError that building `id` with `opts` throws. */
function buildError(id: string, opts: GPTModelOptions): ModelError {
  try {
    new GPTModel(configOf(id), { performInitialization: false, ...opts }).dispose();
  } catch (e) {
    expect(e).toBeInstanceOf(ModelError);
    return e as ModelError;
  }
  throw new Error(`building ${id} did not fail`);
}

describe('bad layouts give one clear error', () => {
  it('tp that does not divide the attention heads', () => {
    const e = buildError('llama', { tpGroup: fakeGroup(3, 'tp') });
    expect(e.code).toBe('INVALID_CONFIG');
    expect(e.message).toMatch(
      /tp=3 .*8 attention heads; use a tensorModelParallelSize that divides 8 \(1, 2, 4, 8\)/,
    );
  });

  it('tp that does not divide the query groups (GQA with 2 KV heads)', () => {
    const e = buildError('llama', { tpGroup: fakeGroup(4, 'tp') });
    expect(e.code).toBe('INVALID_CONFIG');
    expect(e.message).toMatch(/tp=4 .*2 query groups/);
  });

  it('tp that does not divide the MLA heads', () => {
    const e = buildError('deepseek-v3', { tpGroup: fakeGroup(8, 'tp') });
    expect(e.code).toBe('INVALID_CONFIG');
    expect(e.message).toMatch(/tp=8 .*4 attention heads/);
  });

  it('ep that does not divide the experts', () => {
    const e = buildError('mixtral', { epGroup: fakeGroup(3, 'ep') });
    expect(e.code).toBe('INVALID_CONFIG');
    expect(e.message).toMatch(/ep=3 .*4 experts; use an expertModelParallelSize that divides 4 \(1, 2, 4\)/);
  });

  it('ep on a dense model', () => {
    const e = buildError('llama', { epGroup: fakeGroup(2, 'ep') });
    expect(e.code).toBe('INVALID_CONFIG');
    expect(e.message).toMatch(/ep=2 needs a MoE model/);
  });

  it("expert-TP that does not divide the experts' FFN", () => {
    const e = buildError('mixtral', { etpGroup: fakeGroup(64, 'etp') });
    expect(e.code).toBe('INVALID_CONFIG');
    expect(e.message).toMatch(/etp=64 .*moeFfnHiddenSize 96/);
  });

  it('sequence parallelism with MoE and MLA builds, marking the parameters that see a chunk', () => {
    for (const id of ['mixtral', 'deepseek-v2', 'deepseek-v3']) {
      const model = new GPTModel(configOf(id), {
        tpGroup: fakeGroup(2, 'tp'),
        sequenceParallel: true,
        performInitialization: false,
      });
      expect(model.sequenceParallel, id).toBe(true);
      const marked = [...model.namedParameters()]
        .filter(([, p]) => getTensorModelParallelAttributes(p).sequenceParallel)
        .map(([n]) => n);
      const [i] = model.moeLayers()[0];
      expect(marked, id).toContain(`decoder.layers.${i}.mlp.router.weight`);
      expect(marked, id).toContain(`decoder.layers.${i}.pre_mlp_layernorm.weight`);
      if (id !== 'mixtral') {
        expect(marked, id).toContain('decoder.layers.0.input_layernorm.weight');
        expect(marked, id).toContain('decoder.layers.0.self_attention.linear_kv_down_proj.weight');
      }
      // split parameters hold whole gradients: never summed over TP
      expect(
        marked.some((n) => n.includes('local_experts') || n.endsWith('linear_proj.weight')),
        id,
      ).toBe(false);
      model.dispose();
    }
  });

  it('sequence parallelism with a sequence that TP does not divide', () => {
    const model = new GPTModel(configOf('llama'), {
      tpGroup: fakeGroup(2, 'tp'),
      sequenceParallel: true,
      performInitialization: false,
    });
    const ids = fromTypedArray(new BigInt64Array(7), [1, 7]);
    expect(() => model.forward(ids)).toThrow(/sequence length 7 is not divisible by TP 2/);
    model.dispose();
  });
});
