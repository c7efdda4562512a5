import { describe, expect, it } from 'vitest';
import { ConvertError, editJsonObject, exportedHfConfig } from '../src/index.js';

const CONFIG = `{
  "architectures": ["DeepseekV2ForCausalLM"],
  "attention_dropout": 0.0,
  "quantization_config": {"fmt": "e4m3", "weight_block_size": [128, 128], "nested": {"s": "}\\"{"}},
  "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
  "torch_dtype": "float8",
  "vocab_size": 1000
}
`;

describe('editJsonObject', () => {
  it('deletes and sets top-level members and keeps every other byte (0.0 stays 0.0)', () => {
    const out = editJsonObject(CONFIG, { remove: ['quantization_config'], set: { torch_dtype: 'bfloat16' } });
    expect(out).toBe(CONFIG.replace(/ {2}"quantization_config": .*\n/, '').replace('"float8"', '"bfloat16"'));
    expect(out).toContain('"attention_dropout": 0.0,');
    expect(out).toContain('"rope_theta": 10000.0');
  });

  it('removes the last member with the comma before it and appends new members with the same indentation', () => {
    const out = editJsonObject(CONFIG, { remove: ['vocab_size'], set: { dtype: 'bfloat16' } });
    expect(out.endsWith('  "torch_dtype": "float8",\n  "dtype": "bfloat16"\n}\n')).toBe(true);
    expect(JSON.parse(out).vocab_size).toBeUndefined();
    expect(editJsonObject('{}', { set: { a: 1 } })).toBe('{"a": 1}');
    expect(editJsonObject('{"a": 1}', { remove: ['a'] })).toBe('{}');
  });

  it('rejects text that is not a JSON object', () => {
    expect(() => editJsonObject('[1, 2]', { remove: ['a'] })).toThrow(ConvertError);
    expect(() => editJsonObject('{"a": ', {})).toThrow();
  });
});

describe('exportedHfConfig', () => {
  it('drops quantization_config, writes the dtype in the field transformers uses, and changes nothing else', () => {
    const v5 =
      '{\n  "dtype": "bfloat16",\n  "router_jitter_noise": 0.0,\n  "quantization_config": {"a": 1}\n}';
    expect(exportedHfConfig(v5, 'BF16')).toBe('{\n  "dtype": "bfloat16",\n  "router_jitter_noise": 0.0\n}');
    expect(exportedHfConfig(v5, 'F32')).toBe('{\n  "dtype": "float32",\n  "router_jitter_noise": 0.0\n}');
    const v4 = '{"torch_dtype": "bfloat16", "x": 1.50}';
    expect(exportedHfConfig(v4, 'BF16')).toBe(v4);
    expect(exportedHfConfig('{"x": 2.0}', 'F16')).toBe('{"x": 2.0, "torch_dtype": "float16"}');
    expect(exportedHfConfig(v4, null)).toBe(v4);
  });
});
