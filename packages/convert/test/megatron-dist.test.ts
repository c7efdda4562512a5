// Megatron-Core distributed checkpoints (`--ckpt-format torch_dist`) into megapatch, against
// checkpoints that fixtures/megatron/make-megatron-dist.py wrote with PyTorch from tiny HF models by
// Megatron-Core's rules (written there, not derived from megapatch): importing one must give, byte
// for byte, the megapatch checkpoint the HF weights convert to. The synthetic architectures (MLA,
// MTP, shared experts, the F32 expert bias) go through a distributed checkpoint written from their
// TP=1 Megatron tensors (writeMegatronDistCheckpoint), in each of Megatron's three key forms.
import fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import {
  Checkpoint,
  convertHfToMegapatch,
  convertMegapatchToMegatron,
  convertMegatronToHf,
  convertMegatronToMegapatch,
  DcpCheckpoint,
  inspectMegatronCheckpoint,
  MegatronDistView,
  megatronCheckpointDir,
  openMegatronCheckpoint,
  type ParallelLayout,
  ShardedSafetensors,
} from '../src/index.js';
import {
  type MegatronDistForm,
  SYNTHETIC_MODELS,
  writeMegatronDistCheckpoint,
  writeSyntheticHfCheckpoint,
} from '../src/testing/index.js';
import { type PyObject, pickle, unpickle } from '../src/torch/pickle.js';
import { expectError, expectSameCheckpoints, scratch } from './helpers.js';

const FIXTURES = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures', 'megatron');
const tmp = scratch('megatron-dist');
const ITERATION = 5;

interface Case {
  name: string;
  /** The layout it was trained with (the args'). */
  layout: Partial<ParallelLayout>;
}
const CASES: Case[] = [
  // TE names, layers stacked [L, …], 2 TP chunks per layer, [gate; up] as 4 chunks
  { name: 'llama-dist-tp2', layout: { tp: 2 } },
  // local names, experts stacked [L, E, …] and cut by expert TP
  { name: 'mixtral-dist-tp2-ep2', layout: { tp: 2, ep: 2 } },
  // tied, QKV biases, singleton_local_shards: a key per layer, fc1 as _w and _v
  { name: 'qwen2-dist-singleton', layout: { tp: 2 } },
  // singleton_local_shards with experts: a key per layer and expert
  { name: 'mixtral-dist-singleton', layout: { ep: 2 } },
];
const hfDir = (c: Case) => path.join(FIXTURES, c.name, 'hf');
const megatronDir = (c: Case) => path.join(FIXTURES, c.name, 'megatron');
const iterDir = (c: Case) => path.join(megatronDir(c), `iter_000000${ITERATION}`);

async function fromHf(hf: string, layout: Partial<ParallelLayout>, divisible?: number): Promise<string> {
  const out = tmp('hf');
  await convertHfToMegapatch({
    hfDir: hf,
    output: out,
    layout,
    iteration: ITERATION,
    ...(divisible !== undefined ? { makeVocabSizeDivisibleBy: divisible } : {}),
  });
  return out;
}

describe.each(CASES)('Megatron torch_dist format: $name', (c) => {
  it('imports as the megapatch checkpoint of the HF weights, in its layout and in TP1', async () => {
    const out = tmp(`${c.name}-import`);
    const s = await convertMegatronToMegapatch({ input: megatronDir(c), hfDir: hfDir(c), output: out });
    expect(s.tensors).toBeGreaterThan(0);
    expectSameCheckpoints(out, await fromHf(hfDir(c), c.layout, 8));
    {
      using ck = Checkpoint.open(out);
      expect(ck.metadata.iteration).toBe(ITERATION);
      expect(ck.metadata.consumedSamples).toBe(160);
      expect(fs.existsSync(path.join(ck.dir, 'huggingface', 'config.json'))).toBe(true);
    }
    const one = tmp(`${c.name}-import-1`);
    await convertMegatronToMegapatch({
      input: iterDir(c),
      hfDir: hfDir(c),
      output: one,
      layout: { tp: 1, pp: 1, ep: 1 },
    });
    expectSameCheckpoints(one, await fromHf(hfDir(c), {}, 8));
  });
});

describe('Megatron torch_dist format: the PyTorch distributed checkpoint', () => {
  it('reads every chunk list, dtype and size, skipping byte objects', () => {
    using d = DcpCheckpoint.open(iterDir(CASES[0]));
    const qkv = d.tensors.get('decoder.layers.self_attention.linear_qkv.weight')!;
    // 4 layers x 2 TP shards; hidden 16, 2 groups of (2 q + k + v) heads of 4
    expect(qkv.size).toEqual([4, 32, 16]);
    expect(qkv.dtype).toBe('BF16');
    expect(qkv.chunks.map((ch) => ch.offsets)).toEqual(
      [0, 1, 2, 3].flatMap((l) => [
        [l, 0, 0],
        [l, 16, 0],
      ]),
    );
    const fc1 = d.tensors.get('decoder.layers.mlp.linear_fc1.weight')!;
    expect(fc1.chunks.map((ch) => ch.offsets[1]).slice(0, 4)).toEqual([0, 16, 32, 48]);
    expect(d.tensors.get('optimizer.state.exp_avg.decoder.final_layernorm.weight')?.dtype).toBe('F32');
    expect([...d.objects].some((k) => k.includes('_extra_state'))).toBe(true);
    // a box across chunks: rows 12..20 of layer 2 (both TP shards), columns 3..9
    const box = d.readBox('decoder.layers.self_attention.linear_qkv.weight', [2, 12, 3], [1, 8, 6]);
    const whole = d.readBox('decoder.layers.self_attention.linear_qkv.weight', [2, 0, 0], [1, 32, 16]);
    const want = new Uint8Array(8 * 6 * 2);
    for (let r = 0; r < 8; r++)
      want.set(whole.subarray(((12 + r) * 16 + 3) * 2, ((12 + r) * 16 + 9) * 2), r * 12);
    expect(Buffer.from(box).equals(Buffer.from(want))).toBe(true);
  });
});

describe('Megatron torch_dist format: the view', () => {
  it("opens the root or the iteration folder, with the args' layout and iteration", () => {
    for (const dir of [megatronDir(CASES[1]), iterDir(CASES[1])]) {
      const view = MegatronDistView.open(dir, hfDir(CASES[1]));
      expect([view.iteration, view.layout.tp, view.layout.ep, view.dir]).toEqual([
        ITERATION,
        2,
        2,
        iterDir(CASES[1]),
      ]);
      expect(view.info('decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight')).toEqual({
        dtype: 'BF16',
        globalShape: [64, 16],
      });
      view.close();
    }
  });
});

describe('Megatron checkpoints of either format', () => {
  it('openMegatronCheckpoint picks the reader; megatronCheckpointDir finds the iteration folder or null', async () => {
    const legacy = path.join(FIXTURES, 'llama-tp2-pp2');
    const a = openMegatronCheckpoint(path.join(legacy, 'megatron'), path.join(legacy, 'hf'));
    const b = openMegatronCheckpoint(megatronDir(CASES[0]), hfDir(CASES[0]));
    expect([a.constructor.name, a.layout.tp, a.layout.pp, a.iteration]).toEqual([
      'MegatronLegacyView',
      2,
      2,
      3,
    ]);
    expect([b.constructor.name, b.layout.tp, b.iteration]).toEqual(['MegatronDistView', 2, ITERATION]);
    a.close();
    b.close();
    expect(megatronCheckpointDir(megatronDir(CASES[0]))).toBe(iterDir(CASES[0]));
    expect(megatronCheckpointDir(iterDir(CASES[0]))).toBe(iterDir(CASES[0]));
    expect(megatronCheckpointDir(path.join(legacy, 'megatron'))).toBe(
      path.join(legacy, 'megatron', 'iter_0000003'),
    );
    // not Megatron's: an HF folder, a megapatch checkpoint, a missing folder
    expect(megatronCheckpointDir(hfDir(CASES[0]))).toBe(null);
    expect(megatronCheckpointDir(await fromHf(hfDir(CASES[0]), {}))).toBe(null);
    expect(megatronCheckpointDir(path.join(FIXTURES, 'no-such'))).toBe(null);
  });
});

/** Both folders hold the same safetensors tensors: names, dtypes, shapes and bytes. */
function expectSameHfTensors(got: string, want: string): void {
  const a = ShardedSafetensors.open(got);
  const b = ShardedSafetensors.open(want);
  try {
    expect(a.keys().sort()).toEqual(b.keys().sort());
    for (const k of b.keys()) {
      expect(a.info(k).dtype, k).toBe(b.info(k).dtype);
      expect(a.info(k).shape, k).toEqual(b.info(k).shape);
      expect(Buffer.from(a.read(k).data).equals(Buffer.from(b.read(k).data)), k).toBe(true);
    }
  } finally {
    a.close();
    b.close();
  }
}

describe('inspectMegatronCheckpoint', () => {
  it('reads the args, layout, files and stored tensors of either format', () => {
    const dist = inspectMegatronCheckpoint(megatronDir(CASES[1]));
    expect([dist.format, dist.dir, dist.iteration, dist.optimizer]).toEqual([
      'torch_dist',
      iterDir(CASES[1]),
      ITERATION,
      true,
    ]);
    expect(dist.layout).toEqual({ tp: 2, pp: 1, ep: 2, etp: 2, vpp: 1 });
    expect(dist.args.transformer_impl).toBe('local');
    expect(dist.args.params_dtype).toBe('torch.bfloat16');
    const fc1 = dist.tensors.find((t) => t.name === 'decoder.layers.mlp.experts.experts.linear_fc1.weight');
    // 2 layers x 4 experts x [gate; up] in 2 TP shards each
    expect(fc1).toEqual({ name: fc1?.name, dtype: 'BF16', shape: [2, 4, 64, 16], parts: 32 });
    expect(dist.tensors.some((t) => t.name.startsWith('optimizer.'))).toBe(false);
    expect(dist.files).toBe(fs.readdirSync(iterDir(CASES[1])).length);
    const legacy = inspectMegatronCheckpoint(path.join(FIXTURES, 'llama-tp2-pp2', 'megatron'));
    expect([legacy.format, legacy.iteration, legacy.files, legacy.layout.tp, legacy.layout.pp]).toEqual([
      'torch',
      3,
      4,
      2,
      2,
    ]);
    // local layer 0 of each stage: a TP shard of its QKV in every rank file (2 TP x 2 PP)
    expect(
      legacy.tensors.find((t) => t.name === 'model.decoder.layers.0.self_attention.linear_qkv.weight'),
    ).toEqual({
      name: 'model.decoder.layers.0.self_attention.linear_qkv.weight',
      dtype: 'BF16',
      shape: [16, 16],
      parts: 4,
    });
    expectError(
      () => inspectMegatronCheckpoint(hfDir(CASES[0])),
      'INVALID_FORMAT',
      'is not a Megatron-LM checkpoint',
    );
  });
});

describe('Megatron checkpoints straight to Hugging Face (convertMegatronToHf)', () => {
  const legacy = ['llama-tp2-pp2', 'mixtral-ep2', 'qwen2-pp2-vpp2'];
  it.each([...legacy, ...CASES.map((c) => c.name)])(
    '%s gives back the HF weights it was cut from',
    async (name) => {
      const hf = path.join(FIXTURES, name, 'hf');
      const out = tmp(`${name}-to-hf`);
      const s = await convertMegatronToHf({
        input: path.join(FIXTURES, name, 'megatron'),
        hfDir: hf,
        output: out,
      });
      expectSameHfTensors(out, hf);
      expect(fs.readFileSync(path.join(out, 'config.json'), 'utf8')).toBe(
        fs.readFileSync(path.join(hf, 'config.json'), 'utf8'),
      );
      expect(s.carried).toEqual(['config.json']);
      // an export replaces its own earlier export only with overwrite
      await expect(
        convertMegatronToHf({ input: path.join(FIXTURES, name, 'megatron'), hfDir: hf, output: out }),
      ).rejects.toThrow(/already exists \(pass overwrite to replace it\)/);
    },
  );

  it.each(SYNTHETIC_MODELS.map((m) => [m.id, m] as const))(
    '%s: HF -> megapatch -> Megatron TP2 x PP2 (x EP2) -> HF gives the same tensors',
    async (_id, m) => {
      const hf = tmp(`h2h-${m.id}`);
      writeSyntheticHfCheckpoint(hf, m.config, { seed: 17 });
      const moe =
        'num_local_experts' in m.config || 'n_routed_experts' in m.config || 'num_experts' in m.config;
      const src = tmp(`h2h-${m.id}-mp`);
      await convertHfToMegapatch({ hfDir: hf, output: src });
      const meg = tmp(`h2h-${m.id}-megatron`);
      await convertMegapatchToMegatron({
        input: src,
        output: meg,
        layout: { tp: 2, pp: 2, ...(moe ? { ep: 2 } : {}) },
      });
      const out = tmp(`h2h-${m.id}-out`);
      await convertMegatronToHf({ input: meg, hfDir: hf, output: out });
      expectSameHfTensors(out, hf);
    },
  );

  it('an interrupted export leaves no temporary and no output', async () => {
    const name = 'llama-dist-tp2';
    const out = tmp('to-hf-aborted');
    const ac = new AbortController();
    const run = convertMegatronToHf({
      input: path.join(FIXTURES, name, 'megatron'),
      hfDir: path.join(FIXTURES, name, 'hf'),
      output: out,
      chunkBytes: 256,
      signal: ac.signal,
      onProgress: () => ac.abort(new Error('stop')),
    });
    await expect(run).rejects.toThrow('stop');
    expect(fs.existsSync(out)).toBe(false);
    expect(fs.readdirSync(path.dirname(out)).filter((f) => f.startsWith(path.basename(out)))).toEqual([]);
  });
});

describe('Megatron torch_dist format: every architecture, in each key form', () => {
  it.each(SYNTHETIC_MODELS.map((m) => [m.id, m] as const))('%s', async (_id, m) => {
    const hf = tmp(`syn-${m.id}`);
    writeSyntheticHfCheckpoint(hf, m.config, { seed: 13 });
    const src = tmp(`syn-${m.id}-mp`);
    await convertHfToMegapatch({ hfDir: hf, output: src });
    const want = await fromHf(hf, {});
    const names = Checkpoint.open(src);
    const layers = new Set(
      names
        .tensorNames()
        .map((n) => /^decoder\.layers\.(\d+)\./.exec(n)?.[1])
        .filter(Boolean),
    );
    // Megatron stacks the layers only when every layer has the same tensors
    const rests = [...layers].map((g) =>
      names
        .tensorNames()
        .filter((n) => n.startsWith(`decoder.layers.${g}.`))
        .map((n) => n.slice(`decoder.layers.${g}.`.length))
        .sort()
        .join(' '),
    );
    names.close();
    const forms: MegatronDistForm[] =
      new Set(rests).size === 1 ? ['stacked', 'per-layer', 'singleton'] : ['per-layer', 'singleton'];
    for (const form of forms) {
      const dist = tmp(`syn-${m.id}-${form}`);
      writeMegatronDistCheckpoint(src, dist, { form, args: { tensor_model_parallel_size: 1 } });
      const back = tmp(`syn-${m.id}-${form}-back`);
      await convertMegatronToMegapatch({ input: dist, hfDir: hf, output: back });
      expectSameCheckpoints(back, want);
    }
  });
});

describe('Megatron torch_dist format: errors', () => {
  const llama = CASES[0];

  /** A copy of the llama case whose .metadata is `edit`ed (the unpickled Metadata, pickled back). */
  function withMetadata(
    label: string,
    edit: (sdm: Map<string, PyObject>, storage: Map<PyObject, PyObject>) => void,
  ) {
    const copy = tmp(label);
    fs.cpSync(megatronDir(llama), copy, { recursive: true });
    const file = path.join(copy, `iter_000000${ITERATION}`, '.metadata');
    const meta = unpickle(fs.readFileSync(file)) as PyObject;
    const state = meta.state as Map<string, unknown>;
    edit(
      state.get('state_dict_metadata') as Map<string, PyObject>,
      state.get('storage_data') as Map<PyObject, PyObject>,
    );
    fs.writeFileSync(file, pickle(meta));
    return copy;
  }
  const hfVariant = (c: Case, label: string, over: Record<string, unknown>) => {
    const cfg = JSON.parse(fs.readFileSync(path.join(hfDir(c), 'config.json'), 'utf8'));
    const hf = tmp(label);
    fs.mkdirSync(hf);
    fs.writeFileSync(path.join(hf, 'config.json'), JSON.stringify({ ...cfg, ...over }));
    return hf;
  };

  it('names the argument that disagrees with config.json', () => {
    const hf = hfVariant(llama, 'hf-layers', { num_hidden_layers: 2 });
    const e = expectError(() => MegatronDistView.open(iterDir(llama), hf), 'SHAPE_MISMATCH');
    expect(e.message).toMatch(/common\.pt: args\.num_layers is 4, .* implies 2/);
  });

  it('names a tensor that is missing, and one that is not part of the model', () => {
    // Qwen2 of the Llama checkpoint's sizes has QKV biases it lacks
    const qwen = hfVariant(llama, 'hf-qwen2', { architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2' });
    expectError(
      () => MegatronDistView.open(iterDir(llama), qwen),
      'MISSING_TENSOR',
      '.metadata: no decoder.layers.self_attention.linear_qkv.bias[0] (megapatch decoder.layers.0.self_attention.linear_qkv.bias)',
    );
    // a Llama of the Qwen2 checkpoint's sizes has no QKV biases
    const c = CASES[2];
    const l = hfVariant(c, 'hf-llama', { architectures: ['LlamaForCausalLM'], model_type: 'llama' });
    expectError(
      () => MegatronDistView.open(iterDir(c), l),
      'UNEXPECTED_TENSOR',
      'decoder.layers.0.self_attention.linear_qkv.bias, decoder.layers.1.self_attention.linear_qkv.bias, decoder.layers.2.self_attention.linear_qkv.bias and 1 more are not part of LlamaForCausalLM',
    );
  });

  it('names a chunk that is not stored, a truncated file and a storage transform', async () => {
    const key = 'decoder.layers.mlp.linear_fc2.weight';
    const lost = withMetadata('lost-chunk', (sdm) => {
      const chunks = (sdm.get(key)!.state as Map<string, unknown[]>).get('chunks')!;
      chunks.pop();
    });
    expectError(
      () => MegatronDistView.open(path.join(lost, `iter_000000${ITERATION}`), hfDir(llama)),
      'CORRUPT_FILE',
      `${key}: its chunks hold 1792 of its 2048 elements`,
    );
    // as many elements, but the last chunk replaced by a second copy of the first: a hole, an overlap
    const doubled = withMetadata('doubled-chunk', (sdm) => {
      const chunks = (sdm.get(key)!.state as Map<string, unknown[]>).get('chunks')!;
      chunks[chunks.length - 1] = chunks[0];
    });
    expectError(
      () => DcpCheckpoint.open(path.join(doubled, `iter_000000${ITERATION}`)),
      'CORRUPT_FILE',
      `${key}: the chunks at [0,0,0] of size [1,16,16] and [0,0,0] of size [1,16,16] overlap, so part of it is not stored`,
    );
    const transformed = withMetadata('transformed', (_sdm, storage) => {
      const info = [...storage.values()][0];
      (info.state as Map<string, unknown>).set('transform_descriptors', ['zstd']);
    });
    expectError(
      () => DcpCheckpoint.open(path.join(transformed, `iter_000000${ITERATION}`)),
      'UNSUPPORTED',
      'transforms zstd',
    );

    const cut = tmp('truncated');
    fs.cpSync(megatronDir(llama), cut, { recursive: true });
    const file = path.join(cut, `iter_000000${ITERATION}`, '__1_1.distcp');
    fs.truncateSync(file, fs.statSync(file).size - 100);
    const out = tmp('truncated-out');
    await expect(
      convertMegatronToMegapatch({ input: cut, hfDir: hfDir(llama), output: out }),
    ).rejects.toThrow(/__1_1\.distcp: .* runs past the end of the file/);
    expect(fs.existsSync(path.join(out, `iter_000000${ITERATION}`))).toBe(false);
  });

  it('refuses another sharded backend, and a folder without common.pt', () => {
    const zarr = tmp('zarr');
    fs.cpSync(megatronDir(llama), zarr, { recursive: true });
    const it = path.join(zarr, `iter_000000${ITERATION}`);
    fs.writeFileSync(path.join(it, 'metadata.json'), '{"sharded_backend": "zarr"}');
    expectError(
      () => MegatronDistView.open(it, hfDir(llama)),
      'UNSUPPORTED',
      'the sharded backend is "zarr"',
    );
    fs.writeFileSync(path.join(it, 'metadata.json'), '{"sharded_backend": "torch_dist"}');
    fs.rmSync(path.join(it, 'common.pt'));
    expectError(() => MegatronDistView.open(it, hfDir(llama)), 'MISSING_FILE', 'no common.pt');
  });

  it('opened as a megapatch checkpoint, says how to convert it', () => {
    expectError(
      () => Checkpoint.open(megatronDir(llama)),
      'INVALID_FORMAT',
      `iter_000000${ITERATION} is a Megatron-LM checkpoint in the torch_dist format`,
      `megapatch convert megatron-to-megapatch --load ${megatronDir(llama)} --hf-dir`,
    );
  });
});
