// Megatron-LM legacy checkpoints (`--ckpt-format torch`) both ways, against checkpoints that
// fixtures/megatron/make-megatron.py wrote with PyTorch from tiny HF models by Megatron's rules
// (written there, not derived from megapatch): importing one must give, byte for byte, the
// megapatch checkpoint that the HF weights convert to in the same layout; exporting that checkpoint
// must give Megatron's files tensor for tensor, with the local names, chunks and args Megatron uses.
// Where Debian's python3-torch is installed, torch.load reads the exported files too.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import {
  Checkpoint,
  convertHfToMegapatch,
  convertMegapatchToMegatron,
  convertMegatronToMegapatch,
  MEGATRON_RANK_FILE,
  MegatronLegacyView,
  type MegatronNaming,
  type ParallelLayout,
  parseHfConfig,
} from '../src/index.js';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '../src/testing/index.js';
import { PyFloat, PyGlobal, type PyObject } from '../src/torch/pickle.js';
import { TorchFile, TorchFileWriter, TorchTensor } from '../src/torch/torch-file.js';
import { expectError, expectSameCheckpoints, scratch } from './helpers.js';

const FIXTURES = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures', 'megatron');
const tmp = scratch('megatron');

interface Case {
  name: string;
  layout: Partial<ParallelLayout>;
  naming: MegatronNaming;
}
const CASES: Case[] = [
  { name: 'llama-tp2-pp2', layout: { tp: 2, pp: 2 }, naming: {} },
  { name: 'mixtral-ep2', layout: { ep: 2 }, naming: { moeGroupedGemm: true } },
  // tied: the loss stage holds Megatron's copy of the embedding as output_layer.weight
  { name: 'qwen2-pp2-vpp2', layout: { pp: 2, vpp: 2 }, naming: { transformerImpl: 'local' } },
];

const hfDir = (c: Case) => path.join(FIXTURES, c.name, 'hf');
const megatronDir = (c: Case) => path.join(FIXTURES, c.name, 'megatron');
const ITERATION = 3;

/** The megapatch checkpoint of the case's HF weights (vocabulary padded as the fixture's args say). */
async function fromHf(c: Case, layout: Partial<ParallelLayout>): Promise<string> {
  const out = tmp(`${c.name}-hf`);
  await convertHfToMegapatch({
    hfDir: hfDir(c),
    output: out,
    layout,
    makeVocabSizeDivisibleBy: 8,
    iteration: ITERATION,
  });
  return out;
}

/** Model chunk → local name → tensor of a rank file, `_extra_state` entries left out. */
function modelOf(f: TorchFile): Map<string, Map<string, TorchTensor>> {
  const out = new Map<string, Map<string, TorchTensor>>();
  for (const [k, v] of f.root as Map<string, unknown>) {
    if (!/^model\d*$/.test(k)) continue;
    const m = new Map<string, TorchTensor>();
    for (const [n, t] of v as Map<string, unknown>)
      if (!n.endsWith('_extra_state')) m.set(n, t as TorchTensor);
    out.set(k, m);
  }
  return out;
}

// Debian's python3-torch (not installed by CI): the check is skipped without it
const hasTorch = spawnSync('/usr/bin/python3', ['-c', 'import torch'], { stdio: 'ignore' }).status === 0;

describe.each(CASES)('Megatron torch format: $name', (c) => {
  it('imports as the megapatch checkpoint of the HF weights in the same layout', async () => {
    const out = tmp(`${c.name}-import`);
    const s = await convertMegatronToMegapatch({ input: megatronDir(c), hfDir: hfDir(c), output: out });
    expect(s.tensors).toBeGreaterThan(0);
    expectSameCheckpoints(out, await fromHf(c, c.layout));
    // into another layout: every piece reassembled from the rank files (QKV groups, [gate; up],
    // row-parallel columns, the vocabulary padding of another TP)
    const one = tmp(`${c.name}-import-1`);
    await convertMegatronToMegapatch({
      input: megatronDir(c),
      hfDir: hfDir(c),
      output: one,
      layout: { tp: 1, pp: 1, ep: 1 },
    });
    expectSameCheckpoints(one, await fromHf(c, {}));
    const ck = Checkpoint.open(out);
    expect(ck.metadata.iteration).toBe(ITERATION);
    expect(ck.metadata.consumedSamples).toBe(96);
    expect(fs.existsSync(path.join(ck.dir, 'huggingface', 'config.json'))).toBe(true);
    ck.close();
    // the iteration and the consumed samples go back to Megatron's args
    const again = tmp(`${c.name}-again`);
    await convertMegapatchToMegatron({ input: out, output: again, ...c.naming });
    const rank = fs.readdirSync(path.join(again, 'iter_0000003'))[0];
    const f = TorchFile.open(path.join(again, 'iter_0000003', rank, MEGATRON_RANK_FILE));
    const args = ((f.root as Map<string, unknown>).get('args') as PyObject).state as Map<string, unknown>;
    expect([args.get('iteration'), args.get('consumed_train_samples')]).toEqual([ITERATION, 96]);
    f.close();
  });

  it("exports the files Megatron wrote: names, chunks, shapes, dtypes and bytes; args as Megatron's", async () => {
    const src = await fromHf(c, {});
    const out = tmp(`${c.name}-export`);
    await convertMegapatchToMegatron({ input: src, output: out, layout: c.layout, ...c.naming });
    expect(fs.readFileSync(path.join(out, 'latest_checkpointed_iteration.txt'), 'utf8')).toBe(
      String(ITERATION),
    );
    const iter = path.join(megatronDir(c), 'iter_0000003');
    const ranks = fs.readdirSync(iter).sort();
    expect(fs.readdirSync(path.join(out, 'iter_0000003')).sort()).toEqual(ranks);
    for (const r of ranks) {
      const want = TorchFile.open(path.join(iter, r, MEGATRON_RANK_FILE));
      const got = TorchFile.open(path.join(out, 'iter_0000003', r, MEGATRON_RANK_FILE));
      try {
        const wm = modelOf(want);
        const gm = modelOf(got);
        expect([...gm.keys()], r).toEqual([...wm.keys()]);
        for (const [chunk, tensors] of wm) {
          const g = gm.get(chunk) as Map<string, TorchTensor>;
          expect([...g.keys()].sort(), `${r} ${chunk}`).toEqual([...tensors.keys()].sort());
          for (const [n, t] of tensors) {
            const u = g.get(n) as TorchTensor;
            expect([u.dtype, u.shape], `${r} ${n}`).toEqual([t.dtype, t.shape]);
            expect(Buffer.from(got.read(u)).equals(Buffer.from(want.read(t))), `${r} ${n}`).toBe(true);
          }
        }
        const root = got.root as Map<string, unknown>;
        expect(root.get('iteration')).toBe(ITERATION);
        expect(root.get('checkpoint_version')).toBe(3);
        const args = root.get('args') as PyObject;
        expect([args.module, args.name]).toEqual(['argparse', 'Namespace']);
        const wantArgs = ((want.root as Map<string, unknown>).get('args') as PyObject).state as Map<
          string,
          unknown
        >;
        const a = args.state as Map<string, unknown>;
        for (const k of [
          'num_layers',
          'hidden_size',
          'num_attention_heads',
          'num_query_groups',
          'ffn_hidden_size',
          'padded_vocab_size',
          'make_vocab_size_divisible_by',
          'tensor_model_parallel_size',
          'pipeline_model_parallel_size',
          'expert_model_parallel_size',
          'virtual_pipeline_model_parallel_size',
          'transformer_impl',
          'moe_grouped_gemm',
        ]) {
          expect(a.get(k), k).toEqual(wantArgs.get(k));
        }
        expect(a.get('params_dtype')).toEqual(new PyGlobal('torch', 'bfloat16'));
      } finally {
        want.close();
        got.close();
      }
    }
    // and back: the export imports as the checkpoint it came from, in the Megatron layout
    const back = tmp(`${c.name}-back`);
    await convertMegatronToMegapatch({ input: out, hfDir: hfDir(c), output: back });
    expectSameCheckpoints(back, await fromHf(c, c.layout));
  });

  it.skipIf(!hasTorch)('torch.load reads the export as it reads the files Megatron wrote', async () => {
    const out = tmp(`${c.name}-torch`);
    await convertMegapatchToMegatron({
      input: await fromHf(c, {}),
      output: out,
      layout: c.layout,
      ...c.naming,
    });
    const r = spawnSync(
      '/usr/bin/python3',
      [
        path.join(FIXTURES, 'check-export.py'),
        path.join(megatronDir(c), 'iter_0000003'),
        path.join(out, 'iter_0000003'),
      ],
      { encoding: 'utf8' },
    );
    expect(r.stderr + r.stdout).toContain('same model tensors');
    expect(r.status).toBe(0);
  });
});

describe('Megatron torch format: every architecture both ways', () => {
  // MLA, MTP, shared experts, the F32 expert bias, expert TP: megapatch (TP1) -> Megatron at
  // TP2 x PP2 (x EP2) -> megapatch gives the checkpoint HF converts to in that layout
  it.each(SYNTHETIC_MODELS.map((m, i) => [m.id, m, i] as const))('%s', async (_id, m, i) => {
    const hf = tmp(`syn-${m.id}`);
    writeSyntheticHfCheckpoint(hf, m.config, { seed: 11 });
    const moe =
      'num_local_experts' in m.config || 'n_routed_experts' in m.config || 'num_experts' in m.config;
    const layout: Partial<ParallelLayout> = { tp: 2, pp: 2, ...(moe ? { ep: 2 } : {}) };
    const naming: MegatronNaming = {
      transformerImpl: i % 2 ? 'local' : 'transformer_engine',
      moeGroupedGemm: i % 3 === 0,
    };
    const src = tmp(`syn-${m.id}-mp`);
    await convertHfToMegapatch({ hfDir: hf, output: src });
    const meg = tmp(`syn-${m.id}-megatron`);
    await convertMegapatchToMegatron({ input: src, output: meg, layout, ...naming });
    // the RoPE scaling in the args, as Megatron's flags give it
    {
      const iter = path.join(meg, 'iter_0000000');
      using f = TorchFile.open(path.join(iter, fs.readdirSync(iter)[0], 'model_optim_rng.pt'));
      const a = ((f.root as Map<string, unknown>).get('args') as PyObject).state as Map<string, unknown>;
      const cfg = parseHfConfig(hf).transformerConfig;
      const rope = cfg.ropeScaling;
      const float = (x: unknown) => (x instanceof PyFloat ? x.value : x);
      expect(a.get('use_rope_scaling'), m.id).toBe(rope.type === 'llama3');
      // the share of each head that rotates (Phi-4-mini: 0.75)
      expect(float(a.get('rotary_percent')), m.id).toBe(m.id === 'phi4-mini' ? 0.75 : 1);
      if (rope.type === 'llama3') expect(float(a.get('rope_scaling_factor'))).toBe(rope.factor);
      if (rope.type === 'yarn') {
        expect([
          a.get('rope_type'),
          float(a.get('rotary_scaling_factor')),
          float(a.get('mscale_all_dim')),
        ]).toEqual(['yarn', rope.factor, rope.mscaleAllDim]);
      }
      // MLA's rope_type (Megatron's default for MLA is yarn); none for the other attentions
      expect(a.get('rope_type')).toBe(cfg.mla ? (rope.type === 'yarn' ? 'yarn' : 'rope') : null);
    }
    const back = tmp(`syn-${m.id}-back`);
    await convertMegatronToMegapatch({ input: meg, hfDir: hf, output: back });
    const want = tmp(`syn-${m.id}-want`);
    await convertHfToMegapatch({ hfDir: hf, output: want, layout });
    expectSameCheckpoints(back, want);
  });
});

describe('Megatron torch format: errors', () => {
  const llama = CASES[0];

  it('names the argument that disagrees with config.json', () => {
    const hf = tmp('hf-wrong');
    fs.mkdirSync(hf);
    const cfg = JSON.parse(fs.readFileSync(path.join(hfDir(llama), 'config.json'), 'utf8'));
    fs.writeFileSync(path.join(hf, 'config.json'), JSON.stringify({ ...cfg, num_hidden_layers: 2 }));
    const e = expectError(() => MegatronLegacyView.open(megatronDir(llama), hf), 'SHAPE_MISMATCH');
    expect(e.message).toMatch(/args\.num_layers is 4, .* implies 2/);
  });

  it("refuses a config.json rotating another share of each head than the checkpoint's args", async () => {
    const m = SYNTHETIC_MODELS.find((x) => x.id === 'phi3') as (typeof SYNTHETIC_MODELS)[number];
    const hf = tmp('rotary-hf');
    writeSyntheticHfCheckpoint(hf, m.config, { seed: 3 });
    const mp = tmp('rotary-mp');
    await convertHfToMegapatch({ hfDir: hf, output: mp });
    const meg = tmp('rotary-megatron');
    await convertMegapatchToMegatron({ input: mp, output: meg });
    // the same shapes, half of each head rotating: another model than the one trained
    const half = tmp('rotary-half');
    fs.mkdirSync(half);
    fs.writeFileSync(
      path.join(half, 'config.json'),
      JSON.stringify({ ...m.config, partial_rotary_factor: 0.5 }),
    );
    expectError(
      () => MegatronLegacyView.open(meg, half),
      'INVALID_CONFIG',
      'args.rotary_percent is 1, ',
      'implies 0.5 (partial_rotary_factor): the checkpoint was trained rotating another share of each head',
    );
    MegatronLegacyView.open(meg, hf).close();
  });

  it('names a missing rank folder and a folder that is not a Megatron checkpoint', () => {
    const copy = tmp('missing-rank');
    fs.cpSync(megatronDir(llama), copy, { recursive: true });
    fs.rmSync(path.join(copy, 'iter_0000003', 'mp_rank_01_001'), { recursive: true });
    expectError(
      () => MegatronLegacyView.open(copy, hfDir(llama)),
      'MISSING_FILE',
      'tp=2 pp=2 ep=1, but mp_rank_01_001 is missing',
    );
    const empty = tmp('empty');
    fs.mkdirSync(empty);
    expectError(
      () => MegatronLegacyView.open(empty, hfDir(llama)),
      'MISSING_FILE',
      'no latest_checkpointed_iteration.txt',
    );
  });

  it('names a tensor that is not part of the model, and one that is missing', () => {
    const variant = (c: Case, label: string, over: Record<string, unknown>, code: string) => {
      const cfg = JSON.parse(fs.readFileSync(path.join(hfDir(c), 'config.json'), 'utf8'));
      const hf = tmp(label);
      fs.mkdirSync(hf);
      fs.writeFileSync(path.join(hf, 'config.json'), JSON.stringify({ ...cfg, ...over }));
      return expectError(() => MegatronLegacyView.open(megatronDir(c), hf), code);
    };
    // a Llama of the Qwen2 checkpoint's sizes has no QKV biases
    const llama = variant(
      CASES[2],
      'hf-llama',
      { architectures: ['LlamaForCausalLM'], model_type: 'llama' },
      'UNEXPECTED_TENSOR',
    );
    expect(llama.message).toMatch(
      /mp_rank_00_000\/model_optim_rng\.pt: model0\.decoder\.layers\.0\.self_attention\.linear_qkv\.bias, .* are not part of LlamaForCausalLM/,
    );
    // Qwen2 of the Llama checkpoint's sizes has QKV biases it lacks
    const qwen = variant(
      CASES[0],
      'hf-qwen2',
      { architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2' },
      'MISSING_TENSOR',
    );
    expect(qwen.message).toMatch(
      /mp_rank_00_000\/model_optim_rng\.pt: no model\.decoder\.layers\.0\.self_attention\.linear_qkv\.bias \(megapatch decoder\.layers\.0\.self_attention\.linear_qkv\.bias\)/,
    );
  });

  it('counts the virtual stages from the model chunks when the args do not give them', async () => {
    const c = CASES[2];
    const copy = tmp('no-vpp-arg');
    fs.cpSync(megatronDir(c), copy, { recursive: true });
    const iter = path.join(copy, 'iter_0000003');
    for (const rank of fs.readdirSync(iter)) {
      // the same file, with args.virtual_pipeline_model_parallel_size None (older Megatron args)
      const file = path.join(iter, rank, MEGATRON_RANK_FILE);
      const f = TorchFile.open(file);
      const w = new TorchFileWriter(file);
      const copies: [TorchTensor, ReturnType<TorchFileWriter['tensor']>][] = [];
      const swap = (v: unknown): unknown => {
        if (v instanceof TorchTensor) {
          const ref = w.tensor(v.dtype, v.shape);
          copies.push([v, ref]);
          return ref;
        }
        if (Array.isArray(v)) return Object.isFrozen(v) ? Object.freeze(v.map(swap)) : v.map(swap);
        return v instanceof Map ? new Map([...v].map(([k, x]) => [k, swap(x)])) : v;
      };
      const root = swap(f.root) as Map<string, unknown>;
      ((root.get('args') as PyObject).state as Map<string, unknown>).set(
        'virtual_pipeline_model_parallel_size',
        null,
      );
      w.writeRoot(root);
      for (const [t, ref] of copies) w.write(ref, f.read(t));
      f.close();
      w.finish();
    }
    const view = MegatronLegacyView.open(copy, hfDir(c));
    expect(view.plan.layout.vpp).toBe(2);
    expect(view.args.get('virtual_pipeline_model_parallel_size')).toBe(null);
    view.close();
  });

  it('opened as a megapatch checkpoint, says how to convert it', () => {
    expectError(
      () => Checkpoint.open(megatronDir(llama)),
      'INVALID_FORMAT',
      'iter_0000003 is a Megatron-LM checkpoint in the torch format',
      `megapatch convert megatron-to-megapatch --load ${megatronDir(llama)} --hf-dir`,
    );
  });

  it('refuses to replace an existing iteration without overwrite, and leaves no temporary', async () => {
    const src = await fromHf(llama, {});
    const out = tmp('exists');
    await convertMegapatchToMegatron({ input: src, output: out, layout: { tp: 2 } });
    await expect(convertMegapatchToMegatron({ input: src, output: out, layout: { tp: 2 } })).rejects.toThrow(
      /iter_0000003: exists; pass overwrite/,
    );
    await convertMegapatchToMegatron({ input: src, output: out, layout: { tp: 1 }, overwrite: true });
    expect(fs.readdirSync(path.join(out, 'iter_0000003'))).toEqual(['mp_rank_00']);
    expect(fs.readdirSync(out).sort()).toEqual(['iter_0000003', 'latest_checkpointed_iteration.txt']);
  });

  it('reads the values it does not map: a float, a torch dtype inside the Namespace', () => {
    const f = TorchFile.open(
      path.join(megatronDir(llama), 'iter_0000003', 'mp_rank_00_000', MEGATRON_RANK_FILE),
    );
    const root = f.root as Map<string, unknown>;
    expect(root.get('checkpoint_version')).toBe(3);
    expect(((root.get('args') as PyObject).state as Map<string, unknown>).get('params_dtype')).toEqual(
      new PyGlobal('torch', 'bfloat16'),
    );
    f.close();
  });
});
