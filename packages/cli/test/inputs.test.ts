// Inputs that produce nothing, or too much, and checkpoints that lie: clear errors before anything
// is written or allocated, through the real binary.
import * as fs from 'node:fs';
import { join } from 'node:path';
import { CHECKPOINT_METADATA_FILE } from '@megapatch/convert';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { IndexedDatasetBuilder } from '@megapatch/data';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BAD_FRACTION_WARNING } from '../src/commands/preprocess.js';
import { megapatch, oneLine, QWEN3_TOKENIZER, tempDir } from './helpers.js';

const root = tempDir('inputs');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const config = (id: string) => SYNTHETIC_MODELS.find((m) => m.id === id)?.config as Record<string, unknown>;

const write = (name: string, text: string | Buffer) => {
  const p = join(root, name);
  fs.writeFileSync(p, text);
  return p;
};

/** The files of `root` whose names start with `prefix` (none may be left by a failed run). */
const outputsOf = (prefix: string) => fs.readdirSync(root).filter((n) => n.startsWith(prefix));

/** `megapatch preprocess <kind>` with the npm Qwen3 tokenizer, writing under `root`. */
const preprocess =
  (kind: 'pretrain' | 'sft') =>
  (input: string, prefix: string, ...extra: string[]) =>
    megapatch([
      'preprocess',
      kind,
      '--input',
      input,
      '--tokenizer',
      QWEN3_TOKENIZER,
      '--output-prefix',
      join(root, prefix),
      ...extra,
    ]);
const pretrain = preprocess('pretrain');
const sft = preprocess('sft');

describe('preprocess inputs that produce nothing fail clearly (exit 1, no files)', () => {
  it('an empty input', () => {
    const r = pretrain(write('empty.jsonl', ''), 'empty');
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/no document written.*no records/);
    expect(outputsOf('empty_')).toEqual([]);
  });

  it('a binary input', () => {
    const r = pretrain(
      write('binary.jsonl', Buffer.from([0x50, 0x4b, 0x03, 0x04, 0, 0, 0, 1, 2, 3, 0xff, 0xfe])),
      'binary',
    );
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/binary/);
    expect(outputsOf('binary_')).toEqual([]);
  });

  it('a wrong --json-key names the keys the records have', () => {
    const input = write(
      'keys.jsonl',
      `${JSON.stringify({ content: 'a b c', id: 1 })}\n${JSON.stringify({ content: 'd', id: 2 })}\n`,
    );
    const r = pretrain(input, 'keys');
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/no "text" field.*--json-key.*content/);
    expect(outputsOf('keys_')).toEqual([]);
  });

  it('every SFT sample dropped by --seq-length says how long they are', () => {
    const input = write(
      'alpaca.json',
      JSON.stringify([
        {
          instruction: 'Tell me a long story about a cat',
          input: '',
          output: 'Once upon a time there was a cat who lived in a house.',
        },
      ]),
    );
    const r = sft(input, 'short', '--seq-length', '4');
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toMatch(
      /no sample written: all 1 sample is longer than seqLength 4 \(the longest has \d+ tokens\); pass a larger --seq-length or --truncation truncate/,
    );
    expect(outputsOf('short_')).toEqual([]);
  });

  it('a tokenizer without a chat template fails before reading the input', () => {
    const tok = join(root, 'no-template');
    fs.mkdirSync(tok);
    fs.copyFileSync(join(QWEN3_TOKENIZER, 'tokenizer.json'), join(tok, 'tokenizer.json'));
    const cfg = JSON.parse(fs.readFileSync(join(QWEN3_TOKENIZER, 'tokenizer_config.json'), 'utf8'));
    delete cfg.chat_template;
    fs.writeFileSync(join(tok, 'tokenizer_config.json'), JSON.stringify(cfg));
    const input = write(
      'chat.jsonl',
      `${JSON.stringify({
        messages: [
          { role: 'user', content: 'hi' },
          { role: 'assistant', content: 'hello' },
        ],
      })}\n`,
    );
    const r = megapatch([
      'preprocess',
      'sft',
      '--input',
      input,
      '--tokenizer',
      tok,
      '--output-prefix',
      join(root, 'notpl'),
      '--seq-length',
      '64',
    ]);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/no chat template/);
    expect(outputsOf('notpl_')).toEqual([]);
  });
});

describe('preprocess warnings and UTF-8', () => {
  it(`warns when more than ${BAD_FRACTION_WARNING * 100}% of the records are bad`, () => {
    const lines = ['{"text": "good one"}', '{"text": "good two"}', 'not json', '{"text": 3}'];
    const r = pretrain(write('some-bad.jsonl', `${lines.join('\n')}\n`), 'somebad');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toContain('warning: 2 of 4 records (50.0%) were bad and skipped');
  });

  it('accepts a UTF-8 BOM, and --strict rejects invalid UTF-8 naming the line', () => {
    const bom = pretrain(
      write(
        'bom.jsonl',
        Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from('{"text": "with a BOM"}\n')]),
      ),
      'bom',
    );
    expect(bom.status, bom.stderr).toBe(0);
    expect(bom.stdout).toContain('documents: 1,');
    const bad = write(
      'latin1.jsonl',
      Buffer.concat([Buffer.from('{"text": "ok"}\n{"text": "caf'), Buffer.from([0xe9]), Buffer.from('"}\n')]),
    );
    const lax = pretrain(bad, 'latin1');
    expect(lax.status, lax.stderr).toBe(0);
    expect(lax.stderr).toContain('not valid UTF-8');
    const strict = pretrain(bad, 'latin1s', '--strict');
    expect(strict.status).toBe(1);
    expect(oneLine(strict.stderr)).toMatch(/line 2: invalid UTF-8/);
    expect(outputsOf('latin1s_')).toEqual([]);
  });

  it('caps --workers at the available cores with a warning', () => {
    const r = pretrain(write('w.jsonl', '{"text": "a"}\n'), 'w', '--workers', '4000');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/warning: --workers 4000 is more than the \d+ available cores; using \d+/);
  });
});

describe('sizes are checked before anything is allocated', () => {
  const prefix = join(root, 'small_text_document');
  const samples = (...args: string[]) =>
    megapatch(['data', 'samples', '--data-path', prefix, '--seq-length', '8', ...args]);
  beforeAll(() => {
    const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
    for (let d = 0; d < 20; d++) b.addDocument(Array.from({ length: 10 }, (_, i) => d * 10 + i));
    b.finalize();
  });

  it('data samples --train-samples 1e11 and 1e9 fail at once with the memory they would need', () => {
    for (const n of ['1e11', '1e9']) {
      const t0 = performance.now();
      const r = samples('--train-samples', n);
      expect(performance.now() - t0).toBeLessThan(10_000);
      expect(r.status, n).toBe(2);
      expect(oneLine(r.stderr)).toMatch(
        new RegExp(
          `^megapatch data samples: --train-samples ${Number(n)} needs [\\d.]+ [GT]B of sample indices .*, more than half of this machine's memory \\([\\d.]+ GB\\); ask for fewer samples$`,
        ),
      );
    }
  });

  it('data samples --start past the end is a usage error', () => {
    const r = samples('--train-samples', '10', '--start', '500');
    expect(r.status).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/--start 500 is past the end: the training split has \d+ samples/);
  });

  it('model info rejects 1e9 layers at once, inconsistent MoE groups and unimplemented activations', () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ ...config('llama'), num_hidden_layers: 1e9 }, /num_hidden_layers/],
      [{ ...config('llama'), hidden_act: 'gelu' }, /hidden_act.*gelu.*silu|gelu.*SwiGLU/],
      [{ ...config('deepseek-v3'), n_routed_experts: 256, n_group: 7 }, /group/],
      [{ ...config('deepseek-v3'), topk_group: 9, n_group: 4 }, /topk_group|groupTopk/],
    ];
    for (const [cfg, message] of cases) {
      const file = write('config.json', JSON.stringify(cfg));
      const t0 = performance.now();
      const r = megapatch(['model', 'info', '--config', file]);
      expect(performance.now() - t0).toBeLessThan(10_000);
      expect(r.status, JSON.stringify(cfg).slice(0, 80)).toBe(1);
      expect(oneLine(r.stderr)).toMatch(message);
    }
  });
});

describe('ckpt inspect --verify', () => {
  const hf = join(root, 'hf');
  const ckpt = join(root, 'ckpt');
  beforeAll(() => {
    writeSyntheticHfCheckpoint(hf, config('qwen2'), { seed: 9 });
    const r = megapatch(['convert', 'hf-to-megapatch', '--hf-dir', hf, '--out', ckpt, '--tp', '2']);
    expect(r.status, r.stderr).toBe(0);
  });

  it('passes on a good checkpoint, checking checksums and the tensors the architecture needs', () => {
    const r = megapatch(['ckpt', 'inspect', ckpt, '--verify']);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(
      /verified +\d+ pieces present with their dtype and shape, every checksum matches, every tensor Qwen2ForCausalLM needs is there/,
    );
  });

  it('finds a flipped bit in a piece, and a conversion from it fails instead of exporting it', () => {
    const copy = join(root, 'flipped');
    fs.cpSync(ckpt, copy, { recursive: true });
    const file = join(copy, 'iter_0000000', 'model_rank_tp1_pp0_ep0.safetensors');
    const bytes = fs.readFileSync(file);
    bytes[bytes.length - 3] ^= 0x10;
    fs.writeFileSync(file, bytes);
    const r = megapatch(['ckpt', 'inspect', copy, '--verify']);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toMatch(
      /embedding\.word_embeddings\.weight.*SHA-256 of its bytes is .*, metadata\.json records .*the file is damaged/,
    );
    expect(megapatch(['ckpt', 'inspect', copy]).status).toBe(0);
    const e = megapatch(['convert', 'megapatch-to-hf', '--in', copy, '--out', join(root, 'flipped-hf')]);
    expect(e.status).toBe(1);
    expect(oneLine(e.stderr)).toMatch(/SHA-256 of its bytes is .*the file is damaged/);
    expect(fs.existsSync(join(root, 'flipped-hf'))).toBe(false);
  });

  it('names a tensor the architecture needs that metadata.json lacks', () => {
    const copy = join(root, 'missing');
    fs.cpSync(ckpt, copy, { recursive: true });
    const meta = join(copy, 'iter_0000000', CHECKPOINT_METADATA_FILE);
    const m = JSON.parse(fs.readFileSync(meta, 'utf8'));
    delete m.tensors['decoder.final_layernorm.weight'];
    fs.writeFileSync(meta, JSON.stringify(m));
    const r = megapatch(['ckpt', 'inspect', copy, '--verify']);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toContain('decoder.final_layernorm.weight');
  });
});
