// DPO of the real stories260K model on LLaMA-Factory's dpo_en_demo.json (300 ShareGPT preference
// pairs) through `megapatch train`: a copy of stories260K gets a simple chat template, 260 pairs
// train and 40 are held out (long prompts keep their end); the DPO loss falls from ln 2 (well below
// on the second pass) with the implicit-reward accuracy up, the held-out loss falls below ln 2,
// and the model exports.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { afterAll, describe, expect, it } from 'vitest';
import { megapatch, tempDir } from './helpers.js';

const root = tempDir('mp-cli-dpo');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

describe.skipIf(skipWithoutShared(import.meta.url))('DPO of the real stories260K model', () => {
  it("learns LLaMA-Factory's preference demo: loss down from ln 2, accuracy up, held-out pairs evaluated", () => {
    const hf = path.join(root, 'stories');
    fs.cpSync(sharedPath('data/models/stories260K/hf'), hf, { recursive: true });
    const tc = JSON.parse(fs.readFileSync(path.join(hf, 'tokenizer_config.json'), 'utf8'));
    tc.chat_template =
      "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n{% else %}Answer: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}";
    fs.writeFileSync(path.join(hf, 'tokenizer_config.json'), JSON.stringify(tc));
    const pairs = JSON.parse(
      fs.readFileSync(sharedPath('data/corpus/llamafactory_dpo_en_demo.json'), 'utf8'),
    );
    fs.writeFileSync(path.join(root, 'train.json'), JSON.stringify(pairs.slice(0, 260)));
    fs.writeFileSync(path.join(root, 'valid.json'), JSON.stringify(pairs.slice(260)));
    const runDir = path.join(root, 'run');
    const config = path.join(root, 'dpo.yaml');
    fs.writeFileSync(
      config,
      `model: { load: ${hf}, dtype: fp32 }
data: { seqLength: 256 }
training: { microBatchSize: 4, globalBatchSize: 16, trainIters: 24, logInterval: 4, evalInterval: 12, seed: 1234 }
optimizer: { lr: 1.0e-4, minLr: 1.0e-4, weightDecay: 0.0, clipGrad: 1.0 }
scheduler: { lrDecayStyle: constant }
dpo: { pairsPath: ${path.join(root, 'train.json')}, validPairsPath: ${path.join(root, 'valid.json')}, beta: 0.1 }
checkpoint: { save: ${path.join(root, 'ckpt')} }
logging: { runDir: ${runDir} }
`,
    );
    const out = path.join(root, 'hf-out');
    const run = megapatch(['train', '--config', config, '--export-hf', out]);
    expect(run.status, run.stderr).toBe(0);
    expect(run.stdout).toMatch(
      /^DPO: 260 pairs \(40 held out\), 16 per iteration in 4 micro-batch\(es\) of 4 per rank; sigmoid loss, beta 0.1/m,
    );
    expect(run.stdout).toMatch(/iteration +24\/ +24 \| consumed pairs: +384 \|.* dpo loss: .* accuracy: /);
    const lines = fs
      .readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map(
        (l) => JSON.parse(l) as { kind: string; iteration: number; dpo: { loss: number; accuracy: number } },
      );
    const steps = lines.filter((l) => l.kind === 'train').map((l) => l.dpo);
    expect(steps).toHaveLength(24);
    expect(steps[0].loss).toBeCloseTo(Math.LN2, 5);
    // the second pass over the 260 pairs (from iteration 17) meets pairs the policy has learned
    const last = steps.slice(-4);
    expect(last.reduce((a, s) => a + s.loss, 0) / 4).toBeLessThan(0.35);
    expect(last.reduce((a, s) => a + s.accuracy, 0) / 4).toBeGreaterThan(0.85);
    // the held-out pairs: ln 2 before training, below it at the end
    const valid = lines.filter((l) => l.kind === 'valid');
    expect(valid.map((l) => l.iteration)).toEqual([0, 12, 24]);
    expect(valid[0].dpo.loss).toBeCloseTo(Math.LN2, 5);
    expect(valid[2].dpo.loss).toBeLessThan(0.68);
    expect(fs.existsSync(path.join(out, 'model.safetensors'))).toBe(true);
    // the exported folder loads and generates with its chat template
    const gen = megapatch([
      'generate',
      '--model',
      out,
      '--chat',
      '--prompt',
      'Hi!',
      '--max-new-tokens',
      '8',
      '--json',
    ]);
    expect(gen.status, gen.stderr).toBe(0);
  }, 300_000);
});
