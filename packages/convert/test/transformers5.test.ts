// Configs written by transformers 5.17 itself (save_pretrained of tiny random models, from
// scripts/gpu_transformers_check.py on the GPU machine): transformers 5 moved rope settings into
// `rope_parameters`, renamed Qwen3-MoE's expert count and writes floats such as `0.0` that its
// config classes check strictly, so the exported config.json must keep them byte for byte.
import fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { convertHfToMegapatch, convertMegapatchToHf, fp8ToNumber, parseHfConfig } from '../src/index.js';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '../src/testing/index.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const dir = path.join(here, 'fixtures', 'transformers5');
const read = (name: string) => JSON.parse(fs.readFileSync(path.join(dir, `${name}.json`), 'utf8'));
// The fixtures are named after the synthetic models whose configs the GPU script mirrors (the
// Phi-3 ones, added later, have none yet: the script runs where transformers 5 is installed).
const NAMES = SYNTHETIC_MODELS.map((m) => m.id).filter((id) => fs.existsSync(path.join(dir, `${id}.json`)));
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'megapatch-tf5-'));
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

describe('transformers 5 config.json', () => {
  it('reads rope_parameters, num_local_experts and the rest', () => {
    const llama = parseHfConfig(read('llama')).transformerConfig;
    expect(llama.rotaryBase).toBe(10000);
    expect(llama.ropeScaling).toEqual({
      type: 'llama3',
      factor: 8,
      lowFreqFactor: 1,
      highFreqFactor: 4,
      originalMaxPositionEmbeddings: 64,
    });
    expect(parseHfConfig(read('llama-tied')).transformerConfig.untieEmbeddingsAndOutputWeights).toBe(false);
    const mixtral = parseHfConfig(read('mixtral')).transformerConfig;
    expect(mixtral.rotaryBase).toBe(1e6);
    expect(mixtral.ropeScaling).toEqual({ type: 'none' });
    const q3moe = parseHfConfig(read('qwen3-moe')).transformerConfig;
    expect([q3moe.moe?.numExperts, q3moe.kvChannels]).toEqual([4, 32]);
    expect(parseHfConfig(read('qwen2-moe')).transformerConfig.moe?.sharedExpertIntermediateSize).toBe(64);
    const v3 = parseHfConfig(read('deepseek-v3')).transformerConfig;
    expect([v3.mtpNumLayers, v3.mla?.qLoraRank, v3.moe?.numGroups]).toEqual([1, 32, 2]);
    expect(parseHfConfig(read('moonlight')).transformerConfig.mla?.qLoraRank).toBeNull();
  });

  it('has a config written by transformers 5 for every synthetic model but the Phi-3 ones', () => {
    expect(SYNTHETIC_MODELS.map((m) => m.id).filter((id) => !NAMES.includes(id))).toEqual([
      'phi3',
      'phi3-longrope',
      'phi4-mini',
    ]);
  });

  for (const name of NAMES) {
    it(`${name}: converts there and back with config.json unchanged byte for byte`, async () => {
      const hf = path.join(tmpRoot, `${name}-hf`);
      writeSyntheticHfCheckpoint(hf, read(name), { seed: 9 });
      // Keep transformers' own text (0.0, nulls, key order) rather than the helper's rewrite.
      fs.copyFileSync(path.join(dir, `${name}.json`), path.join(hf, 'config.json'));
      const cfg = parseHfConfig(hf).transformerConfig;
      const mp = path.join(tmpRoot, `${name}-mp`);
      await convertHfToMegapatch({ hfDir: hf, output: mp, layout: { tp: 2, pp: 2, ep: cfg.moe ? 2 : 1 } });
      const back = path.join(tmpRoot, `${name}-back`);
      await convertMegapatchToHf({ input: mp, output: back });
      expect(fs.readFileSync(path.join(back, 'config.json'), 'utf8')).toBe(
        fs.readFileSync(path.join(dir, `${name}.json`), 'utf8'),
      );
    });
  }
});

describe('FP8 decoding', () => {
  it("matches torch's float8_e4m3fn and float8_e5m2 on all 256 bytes", () => {
    const torchTable = JSON.parse(
      fs.readFileSync(path.join(here, 'fixtures', 'dtype', 'fp8_torch.json'), 'utf8'),
    );
    const enc = (v: number) =>
      Number.isNaN(v) ? 'nan' : !Number.isFinite(v) ? (v > 0 ? 'inf' : '-inf') : Object.is(v, -0) ? '-0' : v;
    for (const dtype of ['F8_E4M3', 'F8_E5M2'] as const) {
      const ours = Array.from({ length: 256 }, (_, b) => enc(fp8ToNumber(b, dtype)));
      expect(ours).toEqual(torchTable[dtype]);
    }
  });
});
