import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { findWeightRules, parseHfConfig, ShardedSafetensors } from '../src/index.js';
import {
  f32ToBf16Bits,
  f32ToE4m3Bits,
  f32ToF16Bits,
  SYNTHETIC_MODELS,
  writeSyntheticHfCheckpoint,
} from '../src/testing/index.js';

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'megapatch-synth-'));
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
let counter = 0;
const tmp = () => path.join(tmpRoot, String(counter++));

/** float8_e4m3fn bits → value, by the format's formula. */
function decodeE4m3(b: number): number {
  const sign = b & 0x80 ? -1 : 1;
  const e = (b >> 3) & 0xf;
  const m = b & 7;
  if (e === 15 && m === 7) return Number.NaN;
  return sign * (e === 0 ? (m / 8) * 2 ** -6 : (1 + m / 8) * 2 ** (e - 7));
}

function f32s(data: Uint8Array): Float32Array {
  return new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
}

describe('synthetic model configs', () => {
  it('cover every built-in architecture and the required variants', () => {
    const ids = SYNTHETIC_MODELS.map((m) => m.id);
    expect(ids).toEqual(
      expect.arrayContaining([
        'llama',
        'llama-tied',
        'mistral',
        'qwen2',
        'qwen3',
        'mixtral',
        'qwen2-moe',
        'qwen3-moe',
        'deepseek-v2',
        'deepseek-v3',
        'moonlight',
      ]),
    );
    expect(new Set(ids).size).toBe(ids.length);
  });

  it.each(SYNTHETIC_MODELS)('$id parses and converts with TP=2, PP=2, EP=2', ({ config }) => {
    const { spec, transformerConfig: c } = parseHfConfig(config);
    for (const { name } of spec.expectedHfTensors(c))
      expect(findWeightRules(spec.weightRules, name, c), name).toHaveLength(1);
    expect(c.numLayers % 2).toBe(0);
    expect(c.numAttentionHeads % 2).toBe(0);
    if (!c.mla) expect(c.numQueryGroups % 2 === 0 && c.numQueryGroups >= 2).toBe(true);
    expect(c.ffnHiddenSize % 2).toBe(0);
    expect(c.vocabSize % 128).not.toBe(0);
    if (c.moe) {
      expect(c.moe.numExperts % 2).toBe(0);
      expect(c.moe.moeFfnHiddenSize % 2).toBe(0);
      expect(c.moe.sharedExpertIntermediateSize % 2).toBe(0);
    }
  });

  it('have the structural features each architecture is meant to exercise', () => {
    const tc = (id: string) =>
      parseHfConfig(SYNTHETIC_MODELS.find((m) => m.id === id)!.config).transformerConfig;
    expect(tc('llama')).toMatchObject({ numAttentionHeads: 8, numQueryGroups: 2 });
    expect(tc('llama').ropeScaling.type).toBe('llama3');
    expect(tc('llama-tied')).toMatchObject({ untieEmbeddingsAndOutputWeights: false, numQueryGroups: 4 });
    expect(tc('qwen2')).toMatchObject({ addQkvBias: true, untieEmbeddingsAndOutputWeights: false });
    const q3 = tc('qwen3');
    expect(q3.qkLayernorm).toBe(true);
    expect(q3.kvChannels).not.toBe(q3.hiddenSize / q3.numAttentionHeads);
    expect(tc('mixtral').moe).toMatchObject({ numExperts: 4, routerTopk: 2 });
    expect(tc('qwen2-moe').moe).toMatchObject({ sharedExpertGate: true, numExperts: 4 });
    expect(tc('qwen2-moe').moe?.layerPattern).toEqual(['dense', 'moe', 'moe', 'moe']);
    expect(tc('deepseek-v2').mla?.qLoraRank).toBeNull();
    const v3 = tc('deepseek-v3');
    expect(v3.mla?.qLoraRank).toBe(24);
    expect(v3.moe).toMatchObject({ numGroups: 4, groupTopk: 2, expertBias: true });
    expect(v3.moe?.layerPattern[0]).toBe('dense');
    expect(v3.mtpNumLayers).toBe(1);
    expect(tc('moonlight')).toMatchObject({ mtpNumLayers: 0, mla: { qLoraRank: null } });
  });
});

describe('writeSyntheticHfCheckpoint', () => {
  it.each(SYNTHETIC_MODELS)(
    '$id: writes a sharded HF folder holding exactly the expected tensors',
    ({ config }) => {
      const dir = tmp();
      const written = writeSyntheticHfCheckpoint(dir, config, { maxShardSize: 64 * 1024 });
      for (const f of [
        'config.json',
        'generation_config.json',
        'tokenizer.json',
        'tokenizer_config.json',
        'special_tokens_map.json',
        'model.safetensors.index.json',
      ])
        expect(fs.existsSync(path.join(dir, f)), f).toBe(true);
      const { spec, transformerConfig: cfg } = parseHfConfig(dir);
      const expected = spec.expectedHfTensors(cfg);
      using st = ShardedSafetensors.open(dir);
      expect(st.files().length).toBeGreaterThan(1);
      expect(st.keys().sort()).toEqual(expected.map((t) => t.name).sort());
      for (const { name, shape } of expected) {
        const info = st.info(name);
        expect(info.shape, name).toEqual(shape);
        expect(info.dtype, name).toBe(name.endsWith('e_score_correction_bias') ? 'F32' : 'BF16');
        expect(Buffer.from(st.read(name).data).equals(Buffer.from(written.get(name)!.data)), name).toBe(true);
      }
      expect(st.has('lm_head.weight')).toBe(cfg.untieEmbeddingsAndOutputWeights);
      // MTP copies repeat the main embedding and output layer byte for byte.
      const head = cfg.untieEmbeddingsAndOutputWeights ? 'lm_head.weight' : 'model.embed_tokens.weight';
      for (let k = 0; k < cfg.mtpNumLayers; k++) {
        const p = `model.layers.${cfg.numLayers + k}.`;
        expect(Buffer.from(st.read(`${p}embed_tokens.weight`).data)).toEqual(
          Buffer.from(st.read('model.embed_tokens.weight').data),
        );
        expect(Buffer.from(st.read(`${p}shared_head.head.weight`).data)).toEqual(
          Buffer.from(st.read(head).data),
        );
      }
    },
  );

  it('writes one model.safetensors when the shard limit is huge, and marks the dtype in config.json', () => {
    const dir = tmp();
    const config = SYNTHETIC_MODELS.find((m) => m.id === 'qwen3')!.config;
    writeSyntheticHfCheckpoint(dir, config, { maxShardSize: '5GB', dtype: 'F16' });
    expect(fs.existsSync(path.join(dir, 'model.safetensors'))).toBe(true);
    expect(fs.existsSync(path.join(dir, 'model.safetensors.index.json'))).toBe(false);
    expect(JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')).torch_dtype).toBe('float16');
    using st = ShardedSafetensors.open(dir);
    expect(st.files()).toEqual(['model.safetensors']);
    expect(st.info('model.norm.weight').dtype).toBe('F16');
  });

  it('is deterministic per seed, with weights ~N(0, 0.02) and norms ~1', () => {
    const config = SYNTHETIC_MODELS.find((m) => m.id === 'llama')!.config;
    const a = writeSyntheticHfCheckpoint(tmp(), config, { seed: 7, dtype: 'F32' });
    const b = writeSyntheticHfCheckpoint(tmp(), config, { seed: 7, dtype: 'F32' });
    const c = writeSyntheticHfCheckpoint(tmp(), config, { seed: 8, dtype: 'F32' });
    const w = 'model.layers.1.mlp.down_proj.weight';
    expect(Buffer.from(a.get(w)!.data).equals(Buffer.from(b.get(w)!.data))).toBe(true);
    expect(Buffer.from(a.get(w)!.data).equals(Buffer.from(c.get(w)!.data))).toBe(false);
    const v = f32s(a.get(w)!.data);
    const mean = v.reduce((s, x) => s + x, 0) / v.length;
    const std = Math.sqrt(v.reduce((s, x) => s + (x - mean) ** 2, 0) / v.length);
    expect(Math.abs(mean)).toBeLessThan(0.002);
    expect(std).toBeGreaterThan(0.018);
    expect(std).toBeLessThan(0.022);
    const norm = f32s(a.get('model.layers.0.input_layernorm.weight')!.data);
    for (const x of norm) expect(Math.abs(x - 1)).toBeLessThan(0.15);
    // The BF16 file holds the round-to-nearest-even of the same float32 values.
    const bf = writeSyntheticHfCheckpoint(tmp(), config, { seed: 7 }).get(w)!;
    const bits = new DataView(bf.data.buffer, bf.data.byteOffset, bf.data.byteLength);
    v.forEach((x, i) => {
      if (bits.getUint16(i * 2, true) !== f32ToBf16Bits(x)) throw new Error(`element ${i}`);
    });
  });

  it('stores DeepSeek-V3 Linear weights as block-wise FP8 with _scale_inv', () => {
    const config = SYNTHETIC_MODELS.find((m) => m.id === 'deepseek-v3')!.config;
    const blockSize: [number, number] = [16, 16];
    const dir = tmp();
    const fp8 = writeSyntheticHfCheckpoint(dir, config, { fp8: { blockSize } });
    const original = writeSyntheticHfCheckpoint(tmp(), config, { dtype: 'F32' });
    const json = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    expect(json.quantization_config).toEqual({
      quant_method: 'fp8',
      fmt: 'e4m3',
      activation_scheme: 'dynamic',
      weight_block_size: [16, 16],
    });
    const { spec, transformerConfig: cfg } = parseHfConfig(dir);
    using st = ShardedSafetensors.open(dir);
    const quantized = [
      'model.layers.0.self_attn.q_a_proj.weight',
      'model.layers.0.self_attn.q_b_proj.weight',
      'model.layers.0.self_attn.kv_a_proj_with_mqa.weight',
      'model.layers.0.self_attn.kv_b_proj.weight',
      'model.layers.0.self_attn.o_proj.weight',
      'model.layers.0.mlp.gate_proj.weight',
      'model.layers.1.mlp.experts.7.down_proj.weight',
      'model.layers.1.mlp.shared_experts.up_proj.weight',
      'model.layers.4.eh_proj.weight',
      'model.layers.4.mlp.experts.0.gate_proj.weight',
    ];
    for (const name of quantized) {
      const info = st.info(name);
      expect(info.dtype, name).toBe('F8_E4M3');
      const scale = st.info(`${name}_scale_inv`);
      expect(scale.dtype).toBe('F32');
      expect(scale.shape).toEqual([Math.ceil(info.shape[0] / 16), Math.ceil(info.shape[1] / 16)]);
    }
    // q_a_proj [24, 64] has a partial block row.
    expect(st.info('model.layers.0.self_attn.q_a_proj.weight_scale_inv').shape).toEqual([2, 4]);
    for (const name of [
      'model.embed_tokens.weight',
      'lm_head.weight',
      'model.layers.1.mlp.gate.weight',
      'model.layers.1.input_layernorm.weight',
      'model.layers.4.shared_head.head.weight',
      'model.layers.4.enorm.weight',
    ]) {
      expect(st.info(name).dtype, name).toBe('BF16');
      expect(st.has(`${name}_scale_inv`), name).toBe(false);
    }
    expect(st.info('model.layers.1.mlp.gate.e_score_correction_bias').dtype).toBe('F32');
    // Every expected tensor is present; the only extras are the scales of the fp8 weights.
    const expected = new Set(spec.expectedHfTensors(cfg).map((t) => t.name));
    for (const k of st.keys()) {
      if (expected.has(k)) continue;
      expect(k.endsWith('_scale_inv'), k).toBe(true);
      expect(st.info(k.slice(0, -'_scale_inv'.length)).dtype).toBe('F8_E4M3');
    }
    expect([...fp8.keys()].filter((k) => k.endsWith('_scale_inv')).length).toBeGreaterThan(quantized.length);

    // Dequantize by formula and compare with the float32 originals (same seed).
    for (const name of quantized) {
      const [rows, cols] = st.info(name).shape;
      const q = st.read(name).data;
      const s = f32s(st.read(`${name}_scale_inv`).data);
      const w = f32s(original.get(name)!.data);
      const bc = Math.ceil(cols / 16);
      let checked = 0;
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < cols; c++) {
          const scale = s[Math.floor(r / 16) * bc + Math.floor(c / 16)];
          const x = w[r * cols + c];
          if (Math.abs(x / scale) < 2 ** -6) continue; // subnormal e4m3
          const deq = decodeE4m3(q[r * cols + c]) * scale;
          if (Math.abs(deq - x) > Math.abs(x) / 16 + 1e-12)
            throw new Error(`${name}[${r},${c}]: ${deq} vs ${x}`);
          checked++;
        }
      }
      expect(checked).toBeGreaterThan(rows * cols * 0.9);
    }
  });
});

describe('float encoders', () => {
  it('round float32 to bf16, f16 and e4m3 to nearest even', () => {
    expect(f32ToBf16Bits(1)).toBe(0x3f80);
    // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties to the even mantissa (1).
    expect(f32ToBf16Bits(1 + 2 ** -8)).toBe(0x3f80);
    expect(f32ToBf16Bits(1 + 3 * 2 ** -8)).toBe(0x3f82);
    expect(f32ToBf16Bits(-2)).toBe(0xc000);
    expect(f32ToF16Bits(1)).toBe(0x3c00);
    expect(f32ToF16Bits(1 / 3)).toBe(0x3555);
    expect(f32ToF16Bits(65504)).toBe(0x7bff);
    expect(f32ToF16Bits(65520)).toBe(0x7c00);
    expect(f32ToF16Bits(2 ** -24)).toBe(0x0001);
    expect(f32ToF16Bits(2 ** -25)).toBe(0x0000);
    expect(f32ToF16Bits(-(2 ** -14))).toBe(0x8400);
    expect(f32ToE4m3Bits(1)).toBe(0x38);
    expect(f32ToE4m3Bits(448)).toBe(0x7e);
    expect(f32ToE4m3Bits(1000)).toBe(0x7e);
    expect(f32ToE4m3Bits(-1000)).toBe(0xfe);
    expect(f32ToE4m3Bits(2 ** -9)).toBe(0x01);
    expect(f32ToE4m3Bits(2 ** -6)).toBe(0x08);
    // 1.0625 is halfway between 1 and 1.125: ties to even (1).
    expect(f32ToE4m3Bits(1.0625)).toBe(0x38);
    expect(f32ToE4m3Bits(1.1875)).toBe(0x3a);
    expect(f32ToE4m3Bits(Number.NaN)).toBe(0x7f);
    for (let b = 0; b < 256; b++) {
      if ((b & 0x7f) === 0x7f) continue;
      const v = decodeE4m3(b);
      expect(f32ToE4m3Bits(v), `0x${b.toString(16)}`).toBe(b);
    }
  });
});
