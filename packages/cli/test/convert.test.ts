import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Checkpoint, ShardedSafetensors } from '@megapatch/convert';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { hfBinFixture, megatronFixture } from '@megapatch/test-support';
import { afterAll, describe, expect, it } from 'vitest';
import { inspectCheckpoint, runInspect } from '../src/commands/ckpt.js';
import {
  runHfToMegapatch,
  runMegapatchToHf,
  runMegapatchToMegatron,
  runReshard,
} from '../src/commands/convert.js';
import { memoryIo } from '../src/io.js';

const here = dirname(fileURLToPath(import.meta.url));
const bin = join(here, '..', 'bin', 'megapatch.js');
const root = fs.mkdtempSync(join(os.tmpdir(), 'megapatch-cli-convert-'));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

const capture = () => memoryIo();
/** The files holding the pieces of tensor `name` of the checkpoint at `root`. */
function readPieceFiles(root: string, name: string): string[] {
  const iter = fs.readFileSync(join(root, 'latest_checkpointed_iteration.txt'), 'utf8').trim();
  const meta = JSON.parse(
    fs.readFileSync(join(root, `iter_${iter.padStart(7, '0')}`, 'metadata.json'), 'utf8'),
  );
  return [...new Set<string>(meta.tensors[name].pieces.map((p: { file: string }) => p.file))];
}
const config = (id: string) => SYNTHETIC_MODELS.find((m) => m.id === id)?.config as Record<string, unknown>;

describe('megapatch convert / ckpt inspect', () => {
  const hf = join(root, 'hf');
  writeSyntheticHfCheckpoint(hf, config('qwen2-moe'), { seed: 11 });

  it('converts HF -> megapatch (tp 2, pp 2, ep 2) -> reshard -> HF and prints summaries', async () => {
    const out = capture();
    const s = await runHfToMegapatch(
      { 'hf-dir': hf, out: join(root, 'mp'), tp: '2', pp: '2', ep: '2', dtype: 'bf16' },
      out,
    );
    expect(out.lines[0]).toMatch(/^writing [\d.]+ kB$/);
    expect(out.lines[1]).toBe(`megapatch checkpoint (tp=2 pp=2 ep=2 etp=2): ${join(root, 'mp')}`);
    expect(out.lines.join('\n')).toMatch(/\d+ tensors, [\d,]+ parameters, [\d.]+ kB in 8 file\(s\)/);
    expect(out.lines.join('\n')).toContain('carried over: config.json, generation_config.json');
    const r = inspectCheckpoint(join(root, 'mp'), { verify: true, tensors: true });
    expect(r.layout).toEqual({ tp: 2, pp: 2, ep: 2, etp: 2, dp: 1 });
    expect(r.architecture).toBe('Qwen2MoeForCausalLM');
    expect(r.files).toBe(8);
    expect(r.tensorCount).toBe(s.tensors);
    // Vocabulary padding (1000 -> 1024 rows at tp 2) is counted in the checkpoint, not in the summary.
    expect(r.parameterCount - s.parameters).toBe(2 * (1024 - 1000) * 64);
    expect(r.tensors?.find((t) => t.name === 'embedding.word_embeddings.weight')).toEqual({
      name: 'embedding.word_embeddings.weight',
      dtype: 'BF16',
      shape: [1024, 64],
      pieces: 2,
    });

    const one = join(root, 'mp1');
    await runReshard({ in: join(root, 'mp'), out: one }, capture());
    expect(inspectCheckpoint(one).layout).toEqual({ tp: 1, pp: 1, ep: 1, etp: 1, dp: 1 });
    const back = join(root, 'back');
    const o2 = capture();
    await runMegapatchToHf({ in: one, out: back, 'max-shard-size': '100KB' }, o2);
    expect(fs.existsSync(join(back, 'model.safetensors.index.json'))).toBe(true);
    expect(o2.lines[1]).toBe(`Hugging Face folder: ${back}`);
  });

  it('rejects bad options with the flag name', async () => {
    await expect(
      runHfToMegapatch({ 'hf-dir': hf, out: join(root, 'x'), tp: '0' }, capture()),
    ).rejects.toThrow(/--tp: must be >= 1/);
    await expect(
      runHfToMegapatch({ 'hf-dir': hf, out: join(root, 'x'), dtype: 'int8' }, capture()),
    ).rejects.toThrow(/--dtype: must be bf16, fp16 or fp32/);
    await expect(
      runHfToMegapatch({ 'hf-dir': hf, out: join(root, 'x'), pp: '3' }, capture()),
    ).rejects.toThrow('pp=3 does not divide numLayers 4');
  });

  it('cuts uneven pipeline stages with Megatron flags and records them in the checkpoint', async () => {
    const hf5 = join(root, 'hf5');
    writeSyntheticHfCheckpoint(hf5, { ...config('llama'), num_hidden_layers: 5 }, { seed: 3 });
    const uneven = join(root, 'uneven');
    const out = capture();
    await runHfToMegapatch(
      { 'hf-dir': hf5, out: uneven, pp: '2', 'decoder-first-pipeline-num-layers': '2' },
      out,
    );
    expect(out.lines[1]).toBe(
      `megapatch checkpoint (tp=1 pp=2 ep=1 etp=1 decoder-first-pipeline-num-layers=2): ${uneven}`,
    );
    expect(inspectCheckpoint(uneven).layout).toEqual({
      tp: 1,
      pp: 2,
      ep: 1,
      etp: 1,
      dp: 1,
      decoderFirstPipelineNumLayers: 2,
    });
    expect(readPieceFiles(uneven, 'decoder.layers.1.self_attention.linear_qkv.weight')).toEqual([
      'model_rank_tp0_pp0_ep0.safetensors',
    ]);
    expect(readPieceFiles(uneven, 'decoder.layers.2.self_attention.linear_qkv.weight')).toEqual([
      'model_rank_tp0_pp1_ep0.safetensors',
    ]);

    // The same stages spelled as a layout string give the same checkpoint, layout aside.
    const spelled = join(root, 'spelled');
    const o2 = capture();
    await runReshard(
      { in: uneven, out: spelled, pp: '2', 'pipeline-model-parallel-layout': 'Ett|t*3,L' },
      o2,
    );
    expect(o2.lines).toContain(
      `megapatch checkpoint (tp=1 pp=2 ep=1 etp=1 pipeline-model-parallel-layout="Ett|t*3,L"): ${spelled}`,
    );
    expect(inspectCheckpoint(spelled).layout.pipelineModelParallelLayout).toBe('Ett|t*3,L');
    const iter = (r: string) => join(r, 'iter_0000000');
    const files = fs.readdirSync(iter(uneven)).filter((f) => f.endsWith('.safetensors'));
    expect(files).toHaveLength(2);
    for (const f of files) {
      expect(fs.readFileSync(join(iter(spelled), f)).equals(fs.readFileSync(join(iter(uneven), f))), f).toBe(
        true,
      );
    }
    expect(readPieceFiles(spelled, 'decoder.layers.2.self_attention.linear_qkv.weight')).toEqual([
      'model_rank_tp0_pp1_ep0.safetensors',
    ]);

    // From the command line (Megatron's names), with the interleaved schedule's virtual stages.
    const vpp = join(root, 'vpp');
    const text = execFileSync(
      process.execPath,
      [
        bin,
        'convert',
        'hf-to-megapatch',
        '--load',
        hf,
        '--save',
        vpp,
        '--pipeline-model-parallel-size',
        '2',
        '--num-virtual-stages-per-pipeline-rank',
        '2',
        '--decoder-first-pipeline-num-layers',
        '2',
        '--decoder-last-pipeline-num-layers',
        '2',
      ],
      { encoding: 'utf8' },
    );
    expect(text).toContain(
      'megapatch checkpoint (tp=1 pp=2 ep=1 etp=1 vpp=2 decoder-first-pipeline-num-layers=2 decoder-last-pipeline-num-layers=2)',
    );
    // Four layers in four chunks of one: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3.
    const stage = (i: number) => readPieceFiles(vpp, `decoder.layers.${i}.self_attention.linear_qkv.weight`);
    expect([0, 1, 2, 3].map(stage).map((f) => f[0].match(/_pp(\d)_/)?.[1])).toEqual(['0', '1', '0', '1']);
  });

  it('rejects uneven stages that do not fit, naming the flag or the fix', async () => {
    await expect(
      runHfToMegapatch(
        { 'hf-dir': hf, out: join(root, 'x'), pp: '2', 'decoder-first-pipeline-num-layers': '0' },
        capture(),
      ),
    ).rejects.toThrow('--decoder-first-pipeline-num-layers: must be >= 1');
    await expect(
      runHfToMegapatch({ 'hf-dir': hf, out: join(root, 'x'), pp: '3' }, capture()),
    ).rejects.toThrow(
      'set decoderFirstPipelineNumLayers / decoderLastPipelineNumLayers or pipelineModelParallelLayout',
    );
    await expect(
      runHfToMegapatch(
        { 'hf-dir': hf, out: join(root, 'x'), pp: '2', 'pipeline-model-parallel-layout': 'Et*3|t,L' },
        capture(),
      ),
    ).resolves.toBeDefined();
    await expect(
      runHfToMegapatch(
        { 'hf-dir': hf, out: join(root, 'y'), pp: '3', 'pipeline-model-parallel-layout': 'Et*3|t,L' },
        capture(),
      ),
    ).rejects.toThrow('has 2 stages, not a multiple of pp=3');
    expect(fs.existsSync(join(root, 'y'))).toBe(false);
  });

  it('runs from the command line, and inspect accepts an iteration folder', () => {
    const out = join(root, 'cli');
    const text = execFileSync(
      process.execPath,
      [
        bin,
        'convert',
        'hf-to-megapatch',
        '--hf-dir',
        hf,
        '--out',
        out,
        '--tp',
        '2',
        '--ep',
        '2',
        '--etp',
        '1',
      ],
      { encoding: 'utf8' },
    );
    expect(text).toContain('megapatch checkpoint (tp=2 pp=1 ep=2 etp=1)');
    const shown = execFileSync(process.execPath, [bin, 'ckpt', 'inspect', join(out, 'iter_0000000')], {
      encoding: 'utf8',
    });
    expect(shown).toContain('layout             tp=2 pp=1 ep=2 etp=1 dp=1');
    expect(shown).toContain('architecture       Qwen2MoeForCausalLM');
    const io = memoryIo();
    runInspect(out, { json: true }, io);
    expect(JSON.parse(io.lines[0]).layout.etp).toBe(1);
  });

  it("writes a Megatron torch-format checkpoint with Megatron's flags and reads it back", async () => {
    const meg = join(root, 'megatron');
    const text = execFileSync(
      process.execPath,
      [
        bin,
        'convert',
        'megapatch-to-megatron',
        '--load',
        join(root, 'mp'),
        '--save',
        meg,
        '--tensor-model-parallel-size',
        '2',
        '--expert-model-parallel-size',
        '2',
        '--moe-grouped-gemm',
      ],
      { encoding: 'utf8' },
    );
    expect(text).toContain(`Megatron torch-format checkpoint (tp=2 pp=1 ep=2 etp=2): ${meg}`);
    expect(fs.readdirSync(join(meg, 'iter_0000000')).sort()).toEqual([
      'mp_rank_00_000',
      'mp_rank_00_001',
      'mp_rank_01_000',
      'mp_rank_01_001',
    ]);
    const back = join(root, 'from-megatron');
    const read = execFileSync(
      process.execPath,
      [bin, 'convert', 'megatron-to-megapatch', '--load', meg, '--hf-ckpt-path', hf, '--out', back],
      { encoding: 'utf8' },
    );
    expect(read).toContain(`megapatch checkpoint (the Megatron layout): ${back}`);
    // the same tensors as the checkpoint it came from, resharded to that layout here
    const want = join(root, 'mp-tp2-ep2');
    await runReshard({ in: join(root, 'mp'), out: want, tp: '2', ep: '2' }, capture());
    const a = Checkpoint.open(back);
    const b = Checkpoint.open(want);
    expect(a.tensorNames().sort()).toEqual(b.tensorNames().sort());
    for (const n of b.tensorNames())
      expect(Buffer.from(a.read(n)).equals(Buffer.from(b.read(n))), n).toBe(true);
    a.close();
    b.close();
    await expect(
      runMegapatchToMegatron(
        { in: join(root, 'mp'), out: join(root, 'x'), 'transformer-impl': 'te' },
        capture(),
      ),
    ).rejects.toThrow(/--transformer-impl.*must be 'transformer_engine' or 'local'/);
  });

  it('ckpt inspect describes a Megatron checkpoint, and with --hf-dir checks it holds that model', () => {
    const dist = megatronFixture('llama-dist-tp2');
    const text = execFileSync(
      process.execPath,
      [bin, 'ckpt', 'inspect', dist.megatron, '--hf-dir', dist.hf],
      {
        encoding: 'utf8',
      },
    );
    expect(text).toContain('format             Megatron-LM torch_dist (.metadata, *.distcp, common.pt)');
    expect(text).toContain('iteration          5 (consumed samples 160)');
    expect(text).toContain(
      'model (args)       4 layers, hidden 16, ffn 32, 4 heads, 2 query groups, padded vocab 48, bfloat16',
    );
    expect(text).toContain('layout (args)      tp=2 pp=1 ep=1 etp=2 vpp=1');
    expect(text).toContain('tensors            9 (BF16 9) in 53 chunks');
    expect(text).toContain(
      'verified           every tensor of LlamaForCausalLM is there at its shape (10,640 parameters)',
    );
    const legacy = megatronFixture('mixtral-ep2');
    const io = memoryIo();
    runInspect(legacy.megatron, { json: true, tensors: true }, io);
    const r = JSON.parse(io.lines[0]);
    expect([r.kind, r.format, r.layout.ep, r.tensors.length, r.checked]).toEqual([
      'megatron',
      'torch',
      2,
      21,
      null,
    ]);
    // another model: the first tensor that is not part of it, one line, exit 1
    const wrong = spawnSync(
      process.execPath,
      [bin, 'ckpt', 'inspect', legacy.megatron, '--hf-dir', dist.hf],
      {
        encoding: 'utf8',
      },
    );
    expect(wrong.status).toBe(1);
    expect(wrong.stderr.trim().split('\n')).toHaveLength(1);
    // --hf-dir on a megapatch checkpoint is a usage error
    const mp = spawnSync(process.execPath, [bin, 'ckpt', 'inspect', join(root, 'mp'), '--hf-dir', dist.hf], {
      encoding: 'utf8',
    });
    expect(mp.status).toBe(2);
    expect(mp.stderr).toContain('--hf-dir is for a Megatron-LM checkpoint');
  });

  it("megatron-to-hf writes the HF weights a Megatron checkpoint was cut from, with Pai's flags", () => {
    const { hf, megatron } = megatronFixture('qwen2-dist-singleton');
    const out = join(root, 'mcore2hf');
    const text = execFileSync(
      process.execPath,
      [bin, 'convert', 'megatron-to-hf', '--load', megatron, '--hf-ckpt-path', hf, '--save', out],
      { encoding: 'utf8' },
    );
    expect(text).toContain(`Hugging Face folder: ${out}`);
    const a = ShardedSafetensors.open(out);
    const b = ShardedSafetensors.open(hf);
    expect(a.keys().sort()).toEqual(b.keys().sort());
    for (const k of b.keys())
      expect(Buffer.from(a.read(k).data).equals(Buffer.from(b.read(k).data)), k).toBe(true);
    a.close();
    b.close();
  });

  it('reads HF folders whose weights are PyTorch pickles (pytorch_model*.bin), in and as --hf-ckpt-path', () => {
    const run = (...args: string[]) =>
      execFileSync(process.execPath, [bin, 'convert', ...args], { encoding: 'utf8' });
    // llama: torch.save of llama-tp2-pp2's HF weights; the same checkpoint as from its safetensors
    const fromBin = join(root, 'from-bin');
    const fromSt = join(root, 'from-st');
    run('hf-to-megapatch', '--load', hfBinFixture('llama'), '--save', fromBin, '--tp', '2');
    run('hf-to-megapatch', '--load', megatronFixture('llama-tp2-pp2').hf, '--save', fromSt, '--tp', '2');
    const a = Checkpoint.open(fromBin);
    const b = Checkpoint.open(fromSt);
    expect(a.tensorNames().sort()).toEqual(b.tensorNames().sort());
    for (const n of b.tensorNames())
      expect(Buffer.from(a.read(n)).equals(Buffer.from(b.read(n))), n).toBe(true);
    a.close();
    b.close();
    // megatron-to-hf keeps the dtype of --hf-ckpt-path's weights: float32 pickles in two shards
    const { megatron } = megatronFixture('qwen2-pp2-vpp2');
    const out = join(root, 'mcore2hf-f32');
    run('megatron-to-hf', '--load', megatron, '--hf-ckpt-path', hfBinFixture('qwen2-sharded'), '--save', out);
    const got = ShardedSafetensors.open(out);
    const want = ShardedSafetensors.open(megatronFixture('qwen2-pp2-vpp2').hf);
    expect(got.keys().sort()).toEqual(want.keys().sort());
    for (const k of want.keys()) {
      expect(got.info(k).dtype, k).toBe('F32');
      const f32 = new Float32Array(Uint8Array.from(got.read(k).data).buffer);
      const bf16 = new Uint16Array(Uint8Array.from(want.read(k).data).buffer);
      expect(Array.from(f32), k).toEqual(
        Array.from(bf16, (x) => new Float32Array(new Uint32Array([x << 16]).buffer)[0]),
      );
    }
    expect(fs.readdirSync(out).filter((f) => f.startsWith('pytorch_model'))).toEqual([]);
    got.close();
    want.close();
  });

  it('reads a Megatron-Core torch_dist checkpoint (the fixture @megapatch/convert tests against)', () => {
    const fixture = megatronFixture('llama-dist-tp2').dir;
    const fromMegatron = (out: string, ...layout: string[]) =>
      execFileSync(
        process.execPath,
        [
          bin,
          'convert',
          'megatron-to-megapatch',
          '--load',
          join(fixture, 'megatron'),
          '--hf-dir',
          join(fixture, 'hf'),
          '--out',
          out,
          ...layout,
        ],
        { encoding: 'utf8' },
      );
    const out = join(root, 'from-torch-dist');
    const text = fromMegatron(out);
    expect(text).toContain(`megapatch checkpoint (the Megatron layout): ${out}`);
    const shown = execFileSync(process.execPath, [bin, 'ckpt', 'inspect', join(out, 'iter_0000005')], {
      encoding: 'utf8',
    });
    expect(shown).toContain('layout             tp=2 pp=1 ep=1 etp=2 dp=1');
    expect(shown).toContain('architecture       LlamaForCausalLM');
    // the layout flags choose another layout
    const one = join(root, 'from-torch-dist-pp2');
    const again = fromMegatron(one, '--tp', '1', '--pipeline-model-parallel-size', '2');
    expect(again).toContain(`megapatch checkpoint (tp=1 pp=2): ${one}`);
    expect(execFileSync(process.execPath, [bin, 'ckpt', 'inspect', one], { encoding: 'utf8' })).toContain(
      'layout             tp=1 pp=2 ep=1 etp=1 dp=1',
    );
  });
});
