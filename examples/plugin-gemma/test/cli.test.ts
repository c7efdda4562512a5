// `--plugin` end to end through the real megapatch binary: without the plugin the CLI does not know
// Gemma; with it, model info, conversion and evaluation work (generation is tested through the API).
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { writeGemmaCheckpoint } from '../scripts/write-checkpoint.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PLUGIN = path.join(HERE, '..');
const BIN = path.join(PLUGIN, 'node_modules', '@megapatch', 'cli', 'bin', 'megapatch.js');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gemma-cli-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const hf = path.join(tmp, 'hf');
writeGemmaCheckpoint(hf);

function megapatchIn(cwd: string, ...args: string[]) {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', cwd, timeout: 120_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}
const megapatch = (...args: string[]) => megapatchIn(PLUGIN, ...args);

describe('megapatch --plugin', () => {
  it('without the plugin, Gemma is an unknown architecture', () => {
    const r = megapatch('model', 'info', '--config', hf);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/unknown architecture "GemmaForCausalLM"/);
  });

  it('model info, convert and eval work with it (by path or by package name)', () => {
    const info = megapatch('model', 'info', '--plugin', '.', '--config', hf);
    expect(info.err).toBe('');
    expect(info.out).toMatch(/GemmaForCausalLM/);
    // a project that installed the plugin: found by name in its node_modules
    const project = path.join(tmp, 'project');
    fs.mkdirSync(path.join(project, 'node_modules', '@megapatch'), { recursive: true });
    fs.symlinkSync(PLUGIN, path.join(project, 'node_modules', '@megapatch', 'plugin-gemma'));
    const byName = megapatchIn(
      project,
      'model',
      'info',
      '--config',
      hf,
      '--plugin',
      '@megapatch/plugin-gemma',
    );
    expect(byName.code, byName.err).toBe(0);

    const ckpt = path.join(tmp, 'ckpt');
    const conv = megapatch(
      'convert',
      'hf-to-megapatch',
      '--plugin',
      '.',
      '--hf-dir',
      hf,
      '--out',
      ckpt,
      '--tp',
      '2',
    );
    expect(conv.code, conv.err).toBe(0);

    const data = path.join(tmp, 'ids.jsonl');
    fs.writeFileSync(data, `${JSON.stringify({ ids: [2, 17, 300, 41, 5, 999, 3, 8, 12] })}\n`);
    const fromHf = megapatch(
      'eval',
      '--plugin',
      '.',
      '--model',
      hf,
      '--data',
      data,
      '--seq-length',
      '8',
      '--json',
    );
    const fromCkpt = megapatch(
      'eval',
      '--plugin',
      '.',
      '--model',
      ckpt,
      '--data',
      data,
      '--seq-length',
      '8',
      '--json',
    );
    expect(fromHf.code, fromHf.err).toBe(0);
    expect(fromCkpt.code, fromCkpt.err).toBe(0);
    const a = JSON.parse(fromHf.out);
    const b = JSON.parse(fromCkpt.out);
    expect(a.meanLoss).toBeGreaterThan(0);
    expect(b.meanLoss).toBe(a.meanLoss);

    const missing = megapatch('model', 'info', '--plugin', './nope', '--config', hf);
    expect(missing.code).toBe(1);
    expect(missing.err).toMatch(/plugin \.\/nope: no such file or folder/);
  });
});
