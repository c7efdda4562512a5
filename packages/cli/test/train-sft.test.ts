// Fine-tuning the real stories260K model through the commands a user runs: `megapatch preprocess
// sft` on a chat set, `megapatch train` from a YAML file with `--export-hf`, then `megapatch
// generate --chat` on the exported folder answers as it was taught.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { afterAll, describe, expect, it } from 'vitest';
import { megapatch, tempDir } from './helpers.js';

const root = tempDir('mp-cli-sft');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

describe.skipIf(skipWithoutShared(import.meta.url))('SFT of the real stories260K model', () => {
  it('lowers its loss on a small chat set, and the exported folder generates', () => {
    // stories260K's tokenizer has no chat template: a copy of the folder gets a simple one
    const hf = path.join(root, 'stories');
    fs.cpSync(sharedPath('data/models/stories260K/hf'), hf, { recursive: true });
    const tc = JSON.parse(fs.readFileSync(path.join(hf, 'tokenizer_config.json'), 'utf8'));
    tc.chat_template =
      "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n{% else %}Answer: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}";
    fs.writeFileSync(path.join(hf, 'tokenizer_config.json'), JSON.stringify(tc));
    const chats = path.join(root, 'chats.jsonl');
    const names = ['Lily', 'Tom', 'Sue', 'Ben', 'Max', 'Mia', 'Sam', 'Ann'];
    const things = ['a red ball', 'a big dog', 'a small cat', 'a blue car', 'a tall tree', 'a happy bird'];
    const lines: string[] = [];
    for (const n of names) {
      for (const t of things) {
        lines.push(
          JSON.stringify({ instruction: `What did ${n} see?`, input: '', output: `${n} saw ${t}.` }),
        );
      }
    }
    fs.writeFileSync(chats, `${lines.join('\n')}\n`);
    const prefix = path.join(root, 'stories-sft');
    const pre = megapatch([
      'preprocess',
      'sft',
      '--input',
      chats,
      '--tokenizer',
      hf,
      '--output-prefix',
      prefix,
      '--seq-length',
      '64',
    ]);
    expect(pre.status, pre.stderr).toBe(0);
    const out = path.join(root, 'stories-export');
    const runDir = path.join(root, 'run-stories');
    const config = path.join(root, 'sft.yaml');
    fs.writeFileSync(
      config,
      `model:
  load: ${hf}
  dtype: fp32
data:
  sft:
    prefix: ${prefix}
  seqLength: 64
  split: "100,0,0"
training:
  microBatchSize: 1
  globalBatchSize: 4
  trainIters: 30
  evalInterval: null
  logInterval: 100
optimizer:
  lr: 0.002
  minLr: 0.0002
scheduler:
  lrDecayStyle: cosine
  lrWarmupIters: 3
checkpoint:
  save: ${path.join(root, 'stories-ckpt')}
logging:
  runDir: ${runDir}
`,
    );
    const run = megapatch(['train', '--config', config, '--export-hf', out]);
    expect(run.status, run.stderr).toBe(0);
    const losses = fs
      .readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l))
      .filter((m) => m.lmLoss !== undefined && m.evaluation === undefined)
      .map((m) => m.lmLoss as number);
    expect(losses).toHaveLength(30);
    const first = losses.slice(0, 3).reduce((a, b) => a + b) / 3;
    const last = losses.slice(-3).reduce((a, b) => a + b) / 3;
    expect(last).toBeLessThan(first * 0.6);
    const gen = megapatch([
      'generate',
      '--model',
      out,
      '--chat',
      '--prompt',
      'What did Lily see?',
      '--max-new-tokens',
      '12',
      '--json',
    ]);
    expect(gen.status, gen.stderr).toBe(0);
    const g = JSON.parse(gen.stdout.trim().split('\n')[0]);
    expect(g.completion).toMatch(/Lily saw/);
  }, 300_000);
});
