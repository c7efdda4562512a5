// The streaming converters on synthetic HF checkpoints of every architecture: HF -> megapatch
// (TP=2, PP=2, EP=2) -> megapatch (1, 1, 1) -> HF must give back the input bytes, and each rank's
// pieces must equal what the documented Megatron layouts give, computed here from the HF tensors
// with the layout transforms (themselves checked against element loops in transforms.test.ts).
import fs from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { afterAll, describe, expect, it, vi } from 'vitest';
import {
  Checkpoint,
  type CheckpointTensor,
  ConvertError,
  checkTiling,
  concatRows,
  convertHfToMegapatch,
  convertMegapatchToHf,
  findWeightRules,
  fuseGateUp,
  fuseQkv,
  type PipelineSplit,
  paddedVocab,
  padVocabRows,
  parseHfConfig,
  planConversion,
  reshardCheckpoint,
  SafetensorsFile,
  ShardedSafetensors,
  type TensorData,
  type TransformerConfig,
  tpSplit,
  tpSplitGateUp,
  tpSplitQkv,
  type WeightOp,
  writeSafetensors,
} from '../src/index.js';
import { f32ToBf16Bits, SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '../src/testing/index.js';

const realWriteSync = fs.writeSync;

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'megapatch-convert-'));
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
let counter = 0;
const tmp = (label: string) => path.join(tmpRoot, `${counter++}-${label}`);

const model = (id: string) => {
  const m = SYNTHETIC_MODELS.find((x) => x.id === id);
  if (!m) throw new Error(`no synthetic model ${id}`);
  return m;
};

interface Layout {
  tp: number;
  pp: number;
  ep: number;
  etp: number;
}

/** Every tensor of an HF folder, read whole. */
function readHf(dir: string): Map<string, TensorData> {
  const st = ShardedSafetensors.open(dir);
  try {
    return new Map(st.keys().map((k) => [k, st.read(k)]));
  } finally {
    st.close();
  }
}

/** What rank (tp r, ep e) of a Megatron model holds for `name`, from the HF tensors and the documented layouts. */
function expectedLocal(
  name: string,
  hf: Map<string, TensorData>,
  cfg: TransformerConfig,
  rules: ReturnType<typeof parseHfConfig>['spec']['weightRules'],
  size: number,
  r: number,
  tpForVocab: number,
): TensorData {
  const sources: { hf: string; op: WeightOp }[] = [];
  for (const k of hf.keys()) {
    for (const m of findWeightRules(rules, k, cfg)) {
      if (m.megatron === name && m.rule.op.type !== 'duplicate') sources.push({ hf: k, op: m.rule.op });
    }
  }
  const op0 = sources[0].op;
  const op = op0.type === 'expert' ? op0.inner : op0;
  const byPart = (p: string) => {
    const s = sources.find((x) => {
      const o = x.op.type === 'expert' ? x.op.inner : x.op;
      return 'part' in o && o.part === p;
    });
    return hf.get(s?.hf as string) as TensorData;
  };
  // a packed HF tensor (Phi-3's qkv_proj = [q; k; v], gate_up_proj = [gate; up]) cut into its parts by rows
  const rowsOf = (t: TensorData, from: number, n: number): TensorData => {
    const rowBytes = t.data.byteLength / t.shape[0];
    return {
      dtype: t.dtype,
      shape: [n, ...t.shape.slice(1)],
      data: t.data.subarray(from * rowBytes, (from + n) * rowBytes),
    };
  };
  switch (op.type) {
    case 'qkv': {
      const dims = {
        numHeads: cfg.numAttentionHeads,
        numQueryGroups: cfg.numQueryGroups,
        headDim: cfg.kvChannels,
      };
      const packed = op.part === 'qkv' ? hf.get(sources[0].hf) : undefined;
      const qn = cfg.numAttentionHeads * cfg.kvChannels;
      const kn = cfg.numQueryGroups * cfg.kvChannels;
      const parts = packed
        ? { q: rowsOf(packed, 0, qn), k: rowsOf(packed, qn, kn), v: rowsOf(packed, qn + kn, kn) }
        : { q: byPart('q'), k: byPart('k'), v: byPart('v') };
      return tpSplitQkv(fuseQkv(parts, dims), {
        ...dims,
        tp: size,
        rank: r,
      });
    }
    case 'gate_up': {
      const packed = op.part === 'gate_up' ? hf.get(sources[0].hf) : undefined;
      const f = packed ? packed.shape[0] / 2 : 0;
      const [gate, up] = packed
        ? [rowsOf(packed, 0, f), rowsOf(packed, f, f)]
        : [byPart('gate'), byPart('up')];
      return tpSplitGateUp(fuseGateUp(gate, up), { tp: size, rank: r });
    }
    case 'split':
      return tpSplit(hf.get(sources[0].hf) as TensorData, { tp: size, rank: r, dim: op.dim });
    case 'vocab': {
      const t = hf.get(sources[0].hf) as TensorData;
      const padded = padVocabRows(t, paddedVocab(cfg.vocabSize, cfg.makeVocabSizeDivisibleBy, tpForVocab));
      return tpSplit(padded, { tp: size, rank: r, dim: 0 });
    }
    default:
      return hf.get(sources[0].hf) as TensorData;
  }
}

/** Rank-local tensor assembled from the checkpoint pieces a rank's file holds, in row order. */
function actualLocal(ckptDir: string, t: CheckpointTensor, file: string): Uint8Array {
  const pieces = t.pieces.filter((p) => p.file === file).sort((a, b) => a.offsets[0] - b.offsets[0]);
  const f = SafetensorsFile.open(path.join(ckptDir, file));
  try {
    const parts = pieces.map((p) => f.read(p.key));
    // Pieces of one rank are boxes along one dim; a row split concatenates rows, a column split
    // leaves one piece per rank.
    return concatRows(parts).data;
  } finally {
    f.close();
  }
}

/** Checks each piece's owner and bytes against the documented Megatron layout. */
function checkPieces(ckptRoot: string, hf: Map<string, TensorData>, layout: Layout): number {
  const ckpt = Checkpoint.open(ckptRoot);
  const { spec, transformerConfig: cfg } = parseHfConfig(path.join(ckpt.dir, 'huggingface', 'config.json'));
  let checked = 0;
  try {
    for (const name of ckpt.tensorNames()) {
      const t = ckpt.info(name);
      const expert = /\.local_experts\.(\d+)\./.exec(name);
      const layer = /^decoder\.layers\.(\d+)\./.exec(name);
      const size = expert ? layout.etp : layout.tp;
      // Documented placement: contiguous layer blocks per stage, embedding first, the rest last;
      // expert e on EP rank floor(e / (E / ep)).
      const stage = layer
        ? Math.floor(Number(layer[1]) / (cfg.numLayers / layout.pp))
        : name.startsWith('embedding.')
          ? 0
          : layout.pp - 1;
      const epRank = expert ? Math.floor(Number(expert[1]) / ((cfg.moe?.numExperts ?? 1) / layout.ep)) : 0;
      const files = [...new Set(t.pieces.map((p) => p.file))];
      for (const file of files) {
        const m = /^model_rank_tp(\d+)_pp(\d+)_ep(\d+)\.safetensors$/.exec(file);
        expect(m, file).not.toBeNull();
        expect([Number(m?.[2]), Number(m?.[3])], `${name} in ${file}`).toEqual([stage, epRank]);
      }
      const replicated =
        files.length === 1 &&
        t.pieces.length === 1 &&
        t.pieces[0].shape.every((d, i) => d === t.globalShape[i]);
      const ranks = replicated ? [0] : Array.from({ length: size }, (_, r) => r);
      if (!replicated) expect(files.length, name).toBe(size);
      for (const r of ranks) {
        const file = `model_rank_tp${r}_pp${stage}_ep${epRank}.safetensors`;
        const want = expectedLocal(name, hf, cfg, spec.weightRules, replicated ? 1 : size, r, layout.tp);
        const got = actualLocal(ckpt.dir, t, file);
        expect(Buffer.compare(Buffer.from(got), Buffer.from(want.data)), `${name} rank ${r}`).toBe(0);
        checked++;
      }
    }
  } finally {
    ckpt.close();
  }
  return checked;
}

function expectSameHf(a: Map<string, TensorData>, b: Map<string, TensorData>): void {
  expect([...b.keys()].sort()).toEqual([...a.keys()].sort());
  for (const [k, t] of a) {
    const u = b.get(k) as TensorData;
    expect(u.dtype, k).toBe(t.dtype);
    expect(u.shape, k).toEqual(t.shape);
    expect(Buffer.compare(Buffer.from(u.data), Buffer.from(t.data)), k).toBe(0);
  }
}

describe('HF -> megapatch (TP2 PP2 EP2) -> megapatch (1,1,1) -> HF', () => {
  for (const m of SYNTHETIC_MODELS) {
    it(`${m.id}: bit-identical round trip, pieces as documented`, async () => {
      const hfDir = tmp(`${m.id}-hf`);
      writeSyntheticHfCheckpoint(hfDir, m.config, { seed: 7, maxShardSize: 200_000 });
      const hf = readHf(hfDir);
      const { transformerConfig: cfg } = parseHfConfig(hfDir);
      const layout: Layout = {
        tp: 2,
        pp: 2,
        ep: cfg.moe ? 2 : 1,
        etp: cfg.moe && m.id.includes('qwen3') ? 1 : 2,
      };
      const sharded = tmp(`${m.id}-tp2`);
      // A tiny chunk makes every tensor cross many chunk and run boundaries.
      await convertHfToMegapatch({ hfDir, output: sharded, layout, chunkBytes: 3000 });
      expect(checkPieces(sharded, hf, layout)).toBeGreaterThan(0);

      const single = tmp(`${m.id}-tp1`);
      await reshardCheckpoint({ input: sharded, output: single, layout: { tp: 1, pp: 1, ep: 1 } });
      const ck = Checkpoint.open(single);
      for (const n of ck.tensorNames()) expect(ck.info(n).pieces.length, n).toBe(1);
      ck.close();
      checkPieces(single, hf, { tp: 1, pp: 1, ep: 1, etp: 1 });

      const back = tmp(`${m.id}-back`);
      await convertMegapatchToHf({ input: single, output: back, maxShardSize: 300_000 });
      expectSameHf(hf, readHf(back));
      // Straight from the sharded layout too, in one shard.
      const back2 = tmp(`${m.id}-back2`);
      await convertMegapatchToHf({ input: sharded, output: back2, maxShardSize: '1GB' });
      expect(fs.existsSync(path.join(back2, 'model.safetensors'))).toBe(true);
      expectSameHf(hf, readHf(back2));
      for (const f of ['generation_config.json', 'tokenizer.json', 'tokenizer_config.json']) {
        expect(fs.readFileSync(path.join(back, f)).equals(fs.readFileSync(path.join(hfDir, f))), f).toBe(
          true,
        );
      }
      expect(JSON.parse(fs.readFileSync(path.join(back, 'config.json'), 'utf8'))).toEqual(
        JSON.parse(fs.readFileSync(path.join(hfDir, 'config.json'), 'utf8')),
      );
    });
  }
});

// Independent FP8 E4M3 (fn) decoder from the format definition: bias 7, 3 mantissa bits, no Inf.
function e4m3(b: number): number {
  const s = b & 0x80 ? -1 : 1;
  const e = (b >> 3) & 15;
  const m = b & 7;
  if (e === 15 && m === 7) return Number.NaN;
  return s * (e === 0 ? m * 2 ** -9 : (1 + m / 8) * 2 ** (e - 7));
}

describe('dtype casts and FP8 block scales', () => {
  it('dequantizes DeepSeek-V3 FP8 block-scaled weights to BF16 and drops quantization_config on export', async () => {
    const m = model('deepseek-v3');
    const hfDir = tmp('fp8-hf');
    const block: [number, number] = [16, 24];
    const written = writeSyntheticHfCheckpoint(hfDir, m.config, { seed: 3, fp8: { blockSize: block } });
    const out = tmp('fp8-mp');
    await convertHfToMegapatch({ hfDir, output: out, layout: { tp: 2, ep: 2 } });
    const back = tmp('fp8-back');
    await convertMegapatchToHf({ input: out, output: back });
    const got = readHf(back);
    let fp8 = 0;
    for (const [name, t] of written) {
      if (name.endsWith('_scale_inv')) {
        expect(got.has(name)).toBe(false);
        continue;
      }
      const g = got.get(name) as TensorData;
      if (t.dtype !== 'F8_E4M3') {
        expect(Buffer.compare(Buffer.from(g.data), Buffer.from(t.data)), name).toBe(0);
        continue;
      }
      fp8++;
      expect(g.dtype).toBe('BF16');
      const scale = new Float32Array((written.get(`${name}_scale_inv`) as TensorData).data.slice().buffer);
      const [rows, cols] = t.shape;
      const sc = Math.ceil(cols / block[1]);
      const dv = new DataView(g.data.buffer, g.data.byteOffset, g.data.byteLength);
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < cols; c++) {
          const v = Math.fround(
            e4m3(t.data[r * cols + c]) * scale[Math.floor(r / block[0]) * sc + Math.floor(c / block[1])],
          );
          const bits = f32ToBf16Bits(v);
          if (dv.getUint16((r * cols + c) * 2, true) !== bits) {
            throw new Error(
              `${name}[${r},${c}]: got ${dv.getUint16((r * cols + c) * 2, true)}, want ${bits}`,
            );
          }
        }
      }
    }
    expect(fp8).toBeGreaterThan(20);
    const cfg = JSON.parse(fs.readFileSync(path.join(back, 'config.json'), 'utf8'));
    expect(cfg.quantization_config).toBeUndefined();
    expect(cfg.torch_dtype).toBe('bfloat16');
    // The exported folder is a plain BF16 checkpoint that converts again.
    await convertHfToMegapatch({ hfDir: back, output: tmp('fp8-again') });
  });

  it('casts F32 weights to BF16 on import (round to nearest even) and widens back exactly', async () => {
    const hfDir = tmp('f32-hf');
    const written = writeSyntheticHfCheckpoint(hfDir, model('qwen3').config, { seed: 5, dtype: 'F32' });
    const out = tmp('f32-mp');
    const s = await convertHfToMegapatch({ hfDir, output: out, layout: { tp: 2 }, dtype: 'BF16' });
    expect(s.bytes).toBeGreaterThan(0);
    const back = tmp('f32-back');
    await convertMegapatchToHf({ input: out, output: back, dtype: 'F32' });
    const got = readHf(back);
    for (const [name, t] of written) {
      const g = got.get(name) as TensorData;
      expect(g.dtype).toBe('F32');
      const src = new Float32Array(t.data.slice().buffer);
      const dst = new Float32Array(g.data.slice().buffer);
      const u = new Uint32Array(dst.buffer);
      for (let i = 0; i < src.length; i++) {
        const want = f32ToBf16Bits(src[i]) << 16;
        if (u[i] >>> 0 !== want >>> 0) throw new Error(`${name}[${i}]: ${dst[i]} is not bf16(${src[i]})`);
      }
    }
    expect(JSON.parse(fs.readFileSync(path.join(back, 'config.json'), 'utf8')).torch_dtype).toBe('float32');
  });
});

/** Rewrites an HF folder as one model.safetensors after `edit` changes its tensors and config. */
function rewriteHf(
  from: string,
  to: string,
  edit: (t: Map<string, TensorData>, cfg: Record<string, unknown>) => void,
): void {
  const tensors = readHf(from);
  const cfg = JSON.parse(fs.readFileSync(path.join(from, 'config.json'), 'utf8'));
  edit(tensors, cfg);
  fs.mkdirSync(to, { recursive: true });
  writeSafetensors(
    path.join(to, 'model.safetensors'),
    [...tensors].map(([name, t]) => ({ name, ...t })),
  );
  fs.writeFileSync(path.join(to, 'config.json'), JSON.stringify(cfg));
}

async function convertError(p: Promise<unknown>): Promise<ConvertError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(ConvertError);
    return e as ConvertError;
  }
  throw new Error('expected a ConvertError');
}

describe('bad inputs', () => {
  const base = tmp('bad-base');
  writeSyntheticHfCheckpoint(base, model('llama').config, { seed: 1 });
  const dsBase = tmp('bad-ds');
  writeSyntheticHfCheckpoint(dsBase, model('deepseek-v3').config, { seed: 1 });

  it('names a pytorch_model.bin that is not a torch.save file', async () => {
    const dir = tmp('pickle');
    fs.mkdirSync(dir);
    fs.copyFileSync(path.join(base, 'config.json'), path.join(dir, 'config.json'));
    fs.writeFileSync(path.join(dir, 'pytorch_model.bin'), 'not a zip, not a pickle');
    const e = await convertError(convertHfToMegapatch({ hfDir: dir, output: tmp('o') }));
    expect(e.file).toContain('pytorch_model.bin');
    expect(fs.existsSync(tmp('o'))).toBe(false);
  });

  it('names a missing tensor', async () => {
    const dir = tmp('missing');
    rewriteHf(base, dir, (t) => t.delete('model.layers.2.mlp.up_proj.weight'));
    const e = await convertError(convertHfToMegapatch({ hfDir: dir, output: tmp('o') }));
    expect(e.code).toBe('MISSING_TENSOR');
    expect(e.message).toContain('model.layers.2.mlp.up_proj.weight');
  });

  it('names a tensor whose shape disagrees with config.json', async () => {
    const dir = tmp('shape');
    rewriteHf(base, dir, (_, cfg) => {
      cfg.intermediate_size = 96;
    });
    const e = await convertError(convertHfToMegapatch({ hfDir: dir, output: tmp('o') }));
    expect(e.code).toBe('SHAPE_MISMATCH');
    expect(e.message).toMatch(/mlp\.(gate|up|down)_proj\.weight has shape \[/);
  });

  it('rejects tensors the architecture does not describe', async () => {
    const dir = tmp('extra');
    rewriteHf(base, dir, (t) =>
      t.set('model.layers.0.self_attn.rotary_emb.inv_freq', t.get('model.norm.weight') as TensorData),
    );
    const e = await convertError(convertHfToMegapatch({ hfDir: dir, output: tmp('o') }));
    expect(e.code).toBe('UNEXPECTED_TENSOR');
    expect(e.message).toContain('rotary_emb.inv_freq');
  });

  it('explains a layout the model cannot be split into', async () => {
    const e = await convertError(convertHfToMegapatch({ hfDir: base, output: tmp('o'), layout: { tp: 3 } }));
    expect(e.code).toBe('INVALID_ARGUMENT');
    expect(e.message).toContain('tp=3 does not divide numAttentionHeads 8');
    const e2 = await convertError(convertHfToMegapatch({ hfDir: base, output: tmp('o'), layout: { ep: 2 } }));
    expect(e2.message).toContain('mixture-of-experts');
    const e3 = await convertError(convertHfToMegapatch({ hfDir: base, output: tmp('o'), layout: { pp: 3 } }));
    expect(e3.message).toContain('pp=3 does not divide numLayers 4');
  });

  it('refuses to replace an existing checkpoint or folder unless asked', async () => {
    const out = tmp('exists');
    await convertHfToMegapatch({ hfDir: base, output: out });
    const e = await convertError(convertHfToMegapatch({ hfDir: base, output: out }));
    expect(e.message).toContain('already exists');
    await convertHfToMegapatch({ hfDir: base, output: out, overwrite: true, layout: { tp: 2 } });
    expect(Checkpoint.open(out).metadata.layout.tp).toBe(2);
    const hfOut = tmp('hf-exists');
    fs.mkdirSync(hfOut);
    fs.writeFileSync(path.join(hfOut, 'keep.txt'), 'x');
    const e2 = await convertError(convertMegapatchToHf({ input: out, output: hfOut }));
    // A folder megapatch did not export: the message says so, and does not suggest overwrite.
    expect(e2.message).toContain('holds "keep.txt", which megapatch did not write');
    expect(fs.readFileSync(path.join(hfOut, 'keep.txt'), 'utf8')).toBe('x');
  });

  it('refuses MTP embedding copies that differ from the main embedding', async () => {
    const dir = tmp('mtp');
    rewriteHf(dsBase, dir, (t) => {
      const e = t.get('model.layers.4.embed_tokens.weight') as TensorData;
      const data = e.data.slice();
      data[10] ^= 1;
      t.set('model.layers.4.embed_tokens.weight', { ...e, data });
    });
    const e = await convertError(convertHfToMegapatch({ hfDir: dir, output: tmp('o') }));
    expect(e.code).toBe('UNSUPPORTED');
    expect(e.message).toContain('model.layers.4.embed_tokens.weight differs from model.embed_tokens.weight');
  });

  it('accepts a tied lm_head saved anyway when it equals the embedding, and refuses it otherwise', async () => {
    const tied = tmp('tied');
    writeSyntheticHfCheckpoint(tied, model('llama-tied').config, { seed: 2 });
    const same = tmp('tied-same');
    rewriteHf(tied, same, (t) => t.set('lm_head.weight', t.get('model.embed_tokens.weight') as TensorData));
    await convertHfToMegapatch({ hfDir: same, output: tmp('o') });
    const differs = tmp('tied-differs');
    rewriteHf(tied, differs, (t) => {
      const e = t.get('model.embed_tokens.weight') as TensorData;
      t.set('lm_head.weight', { ...e, data: e.data.map((b) => b ^ 4) });
    });
    const e = await convertError(convertHfToMegapatch({ hfDir: differs, output: tmp('o') }));
    expect(e.message).toContain('config.json ties them');
  });

  it('leaves nothing behind when a conversion fails half-way', async () => {
    const out = tmp('half');
    let calls = 0;
    const spy = vi.spyOn(fs, 'writeSync').mockImplementation(((...args: Parameters<typeof fs.writeSync>) => {
      if (++calls === 40) throw new Error('disk full');
      return realWriteSync(...args);
    }) as typeof fs.writeSync);
    // The converter imports node:fs as a namespace: push the spy into its named exports.
    syncBuiltinESMExports();
    try {
      await expect(
        convertHfToMegapatch({ hfDir: base, output: out, layout: { tp: 2 }, chunkBytes: 2048 }),
      ).rejects.toThrow('disk full');
    } finally {
      spy.mockRestore();
      syncBuiltinESMExports();
    }
    expect(calls).toBeGreaterThanOrEqual(40);
    expect(fs.readdirSync(out)).toEqual([]);
  });

  it('says what is wrong with a checkpoint that does not record its architecture', async () => {
    const out = tmp('noarch');
    await convertHfToMegapatch({ hfDir: base, output: out });
    const ck = Checkpoint.open(out);
    const metaFile = path.join(ck.dir, 'metadata.json');
    ck.close();
    const meta = JSON.parse(fs.readFileSync(metaFile, 'utf8'));
    delete meta.architecture;
    fs.writeFileSync(metaFile, JSON.stringify(meta));
    const e = await convertError(convertMegapatchToHf({ input: out, output: tmp('o') }));
    expect(e.message).toContain('no "architecture"');
  });
});

describe('checkpoints saved by transformers itself', () => {
  it('converts DeepSeek-V3 without its MTP layers when the folder has none (save_pretrained drops them)', async () => {
    const full = tmp('ds-full');
    writeSyntheticHfCheckpoint(full, model('deepseek-v3').config, { seed: 4 });
    const noMtp = tmp('ds-nomtp');
    rewriteHf(full, noMtp, (t) => {
      for (const k of [...t.keys()]) if (k.startsWith('model.layers.4.')) t.delete(k);
    });
    const out = tmp('ds-nomtp-mp');
    await convertHfToMegapatch({ hfDir: noMtp, output: out, layout: { tp: 2, ep: 2 } });
    const ck = Checkpoint.open(out);
    expect(ck.metadata.modelConfig.mtpNumLayers).toBe(0);
    expect(ck.tensorNames().some((n) => n.startsWith('mtp.'))).toBe(false);
    ck.close();
    const back = tmp('ds-nomtp-back');
    await convertMegapatchToHf({ input: out, output: back });
    expectSameHf(readHf(noMtp), readHf(back));
  });
});

describe('dtypes Megatron fixes', () => {
  it('keeps the expert bias in fp32 inside megapatch and gives back the HF dtype it came in', async () => {
    const full = tmp('bias-full');
    writeSyntheticHfCheckpoint(full, model('moonlight').config, { seed: 6 });
    const bf16 = tmp('bias-bf16');
    rewriteHf(full, bf16, (t) => {
      for (const [k, v] of t) {
        if (!k.endsWith('e_score_correction_bias')) continue;
        const f = new Float32Array(v.data.slice().buffer);
        const data = new Uint8Array(f.length * 2);
        const dv = new DataView(data.buffer);
        f.forEach((x, i) => {
          dv.setUint16(2 * i, f32ToBf16Bits(x), true);
        });
        t.set(k, { dtype: 'BF16', shape: v.shape, data });
      }
    });
    const out = tmp('bias-mp');
    await convertHfToMegapatch({ hfDir: bf16, output: out, layout: { tp: 2, pp: 2, ep: 2 } });
    const ck = Checkpoint.open(out);
    expect(ck.info('decoder.layers.1.mlp.router.expert_bias').dtype).toBe('F32');
    expect(ck.metadata.huggingface?.dtypes?.['model.layers.1.mlp.gate.e_score_correction_bias']).toBe('BF16');
    ck.close();
    const single = tmp('bias-single');
    await reshardCheckpoint({ input: out, output: single, layout: {} });
    const back = tmp('bias-back');
    await convertMegapatchToHf({ input: single, output: back });
    expectSameHf(readHf(bf16), readHf(back));
  });
});

describe.skipIf(skipWithoutShared(import.meta.url))('plans for the real models at Megatron scale', () => {
  const configs = sharedPath('data/configs');
  const layouts: [string, { tp: number; pp: number; ep?: number; etp?: number } & PipelineSplit][] = [
    ['Llama-3.1-8B.json', { tp: 8, pp: 4 }],
    ['Llama-3.2-1B.json', { tp: 4, pp: 2 }],
    ['Qwen2.5-3B.json', { tp: 2, pp: 4 }],
    ['Qwen2.5-7B-Instruct.json', { tp: 4, pp: 4 }],
    ['Qwen3-0.6B.json', { tp: 4, pp: 7 }],
    ['Mixtral-8x7B-v0.1.json', { tp: 4, pp: 4, ep: 8 }],
    ['Qwen1.5-MoE-A2.7B.finetune-resave.json', { tp: 2, pp: 2, ep: 4 }],
    ['Qwen3-30B-A3B.json', { tp: 4, pp: 4, ep: 8, etp: 1 }],
    // 61 layers: pp=8 needs uneven stages (5 + 6 × 8 + 8 layers).
    [
      'DeepSeek-V3.json',
      { tp: 8, pp: 8, ep: 64, etp: 1, decoderFirstPipelineNumLayers: 5, decoderLastPipelineNumLayers: 8 },
    ],
    ['DeepSeek-V3.json', { tp: 4, pp: 16, ep: 8, etp: 1, pipelineModelParallelLayout: 'Et|(tt|)*30mL' }],
    ['Moonlight-16B-A3B-Instruct.thirdparty-copy.json', { tp: 4, pp: 3, ep: 8 }],
  ];
  for (const [file, layout] of layouts) {
    it(`${file}: ${JSON.stringify(layout)} covers every HF tensor once and tiles every Megatron tensor`, () => {
      const { spec, transformerConfig: cfg } = parseHfConfig(path.join(configs, file));
      const plan = planConversion(spec, cfg, layout);
      const used = new Map<string, number>();
      for (const t of plan.tensors) {
        for (const r of t.rows) if (r.source) used.set(r.source, (used.get(r.source) ?? 0) + r.count);
        checkTiling(t.name, t.globalShape, t.pieces);
        const ranks = new Set(t.pieces.map((p) => p.rank.tp));
        const size = t.expert === undefined ? plan.layout.tp : plan.layout.etp;
        expect(ranks.size, t.name).toBe(t.partition === 'replicate' ? 1 : size);
      }
      for (const d of plan.duplicates) used.set(d.hf, d.shape[0]);
      for (const h of plan.hfTensors) expect(used.get(h.name), h.name).toBe(h.shape[0] ?? 1);
      expect(used.size).toBe(plan.hfTensors.length);
      const emb = plan.tensors.find((t) => t.name === 'embedding.word_embeddings.weight');
      expect((emb?.globalShape[0] ?? 0) % (128 * layout.tp)).toBe(0);
      expect(new Set(plan.tensors.map((t) => t.stage)).size).toBe(layout.pp);
      if (cfg.moe) {
        const eps = new Set(plan.tensors.flatMap((t) => t.pieces.map((p) => p.rank.ep)));
        expect(eps.size).toBe(layout.ep ?? 1);
      }
    });
  }
});
