import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';
import { formatModelInfo, modelInfo } from '../src/commands/model.js';

const here = dirname(fileURLToPath(import.meta.url));
const bin = join(here, '..', 'bin', 'megapatch.js');
const configs = sharedPath('data/configs');

describe.skipIf(skipWithoutShared(import.meta.url))('megapatch model info on the real configs', () => {
  it('reports architecture, config and parameter counts of Qwen3-30B-A3B', () => {
    const m = modelInfo(join(configs, 'Qwen3-30B-A3B.json'));
    expect(m.architecture).toBe('Qwen3MoeForCausalLM');
    expect(m.transformerConfig.numLayers).toBe(48);
    expect(m.parameters.total / 1e9).toBeCloseTo(30.5, 1);
    expect(m.parameters.activePerToken).toBeLessThan(m.parameters.total / 8);
    expect(formatModelInfo(m)).toContain('experts            128, top-8');
  });

  it('prints JSON from the command line', () => {
    const out = execFileSync(
      process.execPath,
      [bin, 'model', 'info', '--config', join(configs, 'Llama-3.1-8B.json'), '--json'],
      {
        encoding: 'utf8',
      },
    );
    const m = JSON.parse(out);
    expect(m.architecture).toBe('LlamaForCausalLM');
    expect(Math.round(m.parameters.total / 1e7) / 100).toBe(8.03);
  });

  it('names the file for a config that is not a Hugging Face config', () => {
    expect(() => modelInfo(join(configs, 'deepseek-native', 'deepseek_v3_repo_config_16B.json'))).toThrow(
      /deepseek_v3_repo_config_16B\.json/,
    );
  });
});
