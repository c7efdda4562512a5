// The README's pipeline at the quick size, through the real `megapatch` command: every stage leaves
// its output (indexed dataset, checkpoint, Hugging Face folder, completions, eval, report) and the
// loss falls. Needs only npm packages (no ../shared). The full size runs under test:heavy.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { QuickstartError } from '../src/errors.js';
import { MARKER, type QuickstartResult, runQuickstart } from '../src/pipeline.js';
import { SIZES } from '../src/sizes.js';

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-quickstart-'));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const MAIN = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'main.js');

describe('quickstart (quick size)', () => {
  const out = path.join(root, 'out');
  let printed = '';
  let result: QuickstartResult;

  it('runs every stage with the megapatch command and prints each command line', async () => {
    result = await runQuickstart({ out, size: SIZES.quick, write: (t) => (printed += t) });
    for (const cmd of [
      '$ megapatch preprocess pretrain --input stories.jsonl --tokenizer model-config --output-prefix data/stories --append-eod',
      '$ megapatch train --config run.yaml',
      "$ megapatch generate --model hf --prompt '",
      '$ megapatch generate --model hf --prompts heldout-prompts.jsonl --max-new-tokens 8 --json',
      '$ megapatch eval --model hf --data heldout.jsonl --seq-length 64 --json',
    ]) {
      expect(printed).toContain(cmd);
    }
    expect(printed).toMatch(/iteration\s+40\/\s+40 \|/);
    expect(printed).toMatch(/held-out accuracy: \d+\/20 stories/);
    expect(printed).toContain('run/report/index.html');
  });

  it('leaves the output of every stage', () => {
    const at = (p: string) => path.join(out, p);
    for (const f of [
      MARKER,
      'stories.jsonl',
      'heldout.jsonl',
      'run.yaml',
      'model-config/config.json',
      'model-config/tokenizer.json',
      'data/stories_text_document.bin',
      'data/stories_text_document.idx',
      'checkpoints/latest_checkpointed_iteration.txt',
      'checkpoints/iter_0000040',
      'hf/config.json',
      'hf/tokenizer.json',
      'run/metrics.jsonl',
      'run/report/index.html',
      'run/report/loss.png',
      'heldout-generations.jsonl',
      'summary.json',
    ]) {
      expect(fs.existsSync(at(f)), f).toBe(true);
    }
    expect(fs.readFileSync(at('checkpoints/latest_checkpointed_iteration.txt'), 'utf8').trim()).toBe('40');
    expect(fs.readdirSync(at('hf')).some((f) => f.endsWith('.safetensors'))).toBe(true);
    const hf = JSON.parse(fs.readFileSync(at('hf/config.json'), 'utf8'));
    expect(hf.architectures).toEqual(['MistralForCausalLM']);
    expect(hf.vocab_size).toBe(32000);
    const generations = fs.readFileSync(at('heldout-generations.jsonl'), 'utf8').trim().split('\n');
    expect(generations.length).toBe(20);
    expect(JSON.parse(generations[0]).prompt).toMatch(/ has a .* The$/);
  });

  it('measures a falling loss, an accuracy and an eval loss', () => {
    expect(result.firstLoss).toBeGreaterThan(10); // ln 32000 = 10.37: the untrained model guesses
    expect(result.lastLoss).toBeLessThan(result.firstLoss - 5);
    expect(result.validLoss).not.toBeNull();
    expect(result.total).toBe(20);
    expect(result.accuracy).toBeGreaterThanOrEqual(0);
    expect(Number.isFinite(result.evalLoss)).toBe(true);
    expect(result.evalTokens).toBe(500 * 12); // BOS + 10 tokens + EOS per story: 12 predicted
    expect(result.evalFloor).toBeCloseTo(Math.log(32 * 12 * 26) / 12, 6);
    expect(result.pngs.length).toBeGreaterThan(0);
    const summary = JSON.parse(fs.readFileSync(path.join(out, 'summary.json'), 'utf8'));
    expect(summary.lastLoss).toBe(result.lastLoss);
  });

  it('replaces its own folder on a rerun, and refuses one it did not write', async () => {
    const other = path.join(root, 'thesis');
    fs.mkdirSync(other);
    fs.writeFileSync(path.join(other, 'chapter1.md'), 'keep me');
    const err = await runQuickstart({ out: other, size: SIZES.quick, write: () => {} }).catch((e) => e);
    expect(err).toBeInstanceOf(QuickstartError);
    expect(err.code).toBe('OUTPUT_EXISTS');
    expect(fs.readdirSync(other)).toEqual(['chapter1.md']);
  });

  it.skipIf(!fs.existsSync(MAIN))('main.js: --help, and a bad --iters is exit 2', () => {
    const help = spawnSync(process.execPath, [MAIN, '--help'], { encoding: 'utf8' });
    expect(help.status).toBe(0);
    expect(help.stdout).toMatch(/usage: quickstart/);
    const bad = spawnSync(process.execPath, [MAIN, '--iters', '0', '--out', path.join(root, 'x')], {
      encoding: 'utf8',
    });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--iters 0: give a positive integer/);
  });
});
