// `megapatch generate` through the real binary on Karpathy's stories260K: the README's greedy text,
// JSON lines, seeded sampling, stop strings, one-line errors for bad flags and bad JSONL, and a
// TP=2 checkpoint run by `megapatch launch --nproc-per-node 2` that prints what one process prints.
// Streaming is tested in-process with a terminal-like output and on a byte-level tokenizer.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { join } from 'node:path';
import { convertHfToMegapatch } from '@megapatch/convert';
import { loadTokenizer } from '@megapatch/data';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Completion, runGenerate, streamablePrefix, TextStream } from '../src/commands/generate.js';
import { memoryIo } from '../src/io.js';
import { BIN, megapatch, oneLine, pathWithMegapatch, QWEN3_TOKENIZER, tempDir } from './helpers.js';

const STORIES = sharedPath('data/models/stories260K/hf');
const README_START =
  'Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n' +
  'Lily\'s mom said, "Lily, let\'s go to the park."';

const root = tempDir('generate');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

/** The JSON lines of a successful run. */
function completions(args: string[]): Completion[] {
  const r = megapatch(['generate', ...args]);
  expect(r.status, r.stderr).toBe(0);
  expect(r.stderr).toBe('');
  return r.stdout
    .trimEnd()
    .split('\n')
    .map((l) => JSON.parse(l) as Completion);
}

describe('streaming keeps characters whole and holds back stop strings', () => {
  it('streamablePrefix drops a trailing U+FFFD, a stop string and the start of one', () => {
    expect(streamablePrefix('ab\uFFFD', [])).toBe('ab');
    expect(streamablePrefix('hello wor', ['world'])).toBe('hello ');
    expect(streamablePrefix('hello world and more', ['world'])).toBe('hello ');
    expect(streamablePrefix('a\n', ['\n\n'])).toBe('a');
    expect(streamablePrefix('abc', ['x', 'yz'])).toBe('abc');
  });

  it('a byte-level tokenizer streams multi-byte characters whole', async () => {
    const tok = await loadTokenizer(QWEN3_TOKENIZER);
    const text = 'héllo 世界 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🪼🦩 龘靐 end';
    const ids = tok.encode(text, { addSpecialTokens: false });
    // some ids hold only part of a character's bytes
    expect(ids.some((id) => tok.decode([id]).includes('\uFFFD'))).toBe(true);
    const pieces: string[] = [];
    const stream = new TextStream(
      (x) => tok.decode(x),
      [],
      (s) => pieces.push(s),
    );
    for (const id of ids) stream.push(id);
    stream.end(tok.decode(ids));
    expect(pieces.join('')).toBe(text);
    for (const p of pieces) expect(p).not.toContain('\uFFFD');
  });
});

describe('megapatch generate: usage errors exit 2 with one line', () => {
  it.each<[string, string[], string]>([
    ['no prompt', ['--model', 'm'], 'missing the prompt: give --prompt TEXT or --prompts FILE.jsonl'],
    [
      'both prompts',
      ['--model', 'm', '--prompt', 'a', '--prompts', 'p.jsonl'],
      'give --prompt or --prompts, not both',
    ],
    ['no model', ['--prompt', 'a'], 'missing --model DIR'],
    [
      'a negative temperature',
      ['--model', 'm', '--prompt', '', '--temperature', '-1'],
      '--temperature: must be >= 0',
    ],
    ['top-p 0', ['--model', 'm', '--prompt', '', '--top-p', '0'], '--top-p: must be > 0'],
    ['top-p above 1', ['--model', 'm', '--prompt', '', '--top_p', '1.5'], '--top-p: must be <= 1'],
    ['a fractional top-k', ['--model', 'm', '--prompt', '', '--top-k', '2.5'], '--top-k: must be an integer'],
    [
      'a word for a count',
      ['--model', 'm', '--prompt', '', '--max-new-tokens', 'many'],
      '--max-new-tokens: must be an integer',
    ],
    [
      'fp16',
      ['--model', 'm', '--prompt', '', '--dtype', 'fp16'],
      "--dtype: must be fp32 or bf16 (or float32, bfloat16), got 'fp16'",
    ],
    [
      'a bad stop list',
      ['--model', 'm', '--prompt', '', '--stop', '[1]'],
      '--stop: must be a non-empty string or a JSON array',
    ],
    [
      'a broken stop list',
      ['--model', 'm', '--prompt', '', '--stop', '["a"'],
      '--stop: "[\\"a\\"" starts with [ but is not a JSON array of strings',
    ],
    [
      'an unknown flag',
      ['--model', 'm', '--prompt', '', '--top-pp', '1'],
      'unknown option --top-pp (did you mean --top-p?)',
    ],
  ])('%s', (_, args, message) => {
    const r = megapatch(['generate', ...args]);
    expect(r.status, r.stderr).toBe(2);
    expect(oneLine(r.stderr)).toContain(`megapatch generate: ${message}`);
    expect(r.stdout).toBe('');
  });

  it('a missing model folder is one line, exit 1', () => {
    const r = megapatch(['generate', '--model', join(root, 'none'), '--prompt', '']);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toBe(`megapatch generate: no such model directory: ${join(root, 'none')}`);
  });
});

describe.skipIf(skipWithoutShared(import.meta.url))('megapatch generate on stories260K', () => {
  let tp2: string;
  beforeAll(async () => {
    tp2 = join(root, 'tp2');
    await convertHfToMegapatch({ hfDir: STORIES, output: tp2, layout: { tp: 2 } });
  });

  it('--json from BOS alone gives the README text, token ids and a speed', () => {
    const [c] = completions(['--model', STORIES, '--prompt', '', '--max-new-tokens', '256', '--json']);
    expect(c.prompt).toBe('');
    expect(c.completion.startsWith(README_START)).toBe(true);
    expect(c.tokenIds).toHaveLength(256);
    expect(c.finishReason).toBe('length');
    expect(c.tokensPerSecond).toBeGreaterThan(0);
    expect(Object.keys(c)).toEqual(['prompt', 'completion', 'tokenIds', 'finishReason', 'tokensPerSecond']);
  });

  it('prints plain text without --json, and the speed on stderr', () => {
    const r = megapatch([
      'generate',
      '--model',
      STORIES,
      '--prompt',
      'Once upon a time',
      '--max-new-tokens',
      '20',
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.startsWith(', there was a little girl named Lily.')).toBe(true);
    expect(oneLine(r.stderr)).toMatch(/^generated 20 tokens in [\d.]+ s \([\d.]+ tokens\/s\)$/);
  });

  it('--prompts gives one line per prompt, each as if it were alone', () => {
    const file = join(root, 'prompts.jsonl');
    fs.writeFileSync(file, '{"prompt": "Tom and Sue"}\n\n{"prompt": ""}\n');
    const args = [
      '--model',
      STORIES,
      '--max-new-tokens',
      '30',
      '--temperature',
      '0.9',
      '--seed',
      '5',
      '--json',
    ];
    const both = completions([...args, '--prompts', file]);
    expect(both.map((c) => c.prompt)).toEqual(['Tom and Sue', '']);
    // the text that follows the prompt keeps its leading space; from BOS alone there is none
    expect(both[0].completion).toMatch(/^ \w/);
    expect(both[1].completion).toMatch(/^\w/);
    expect(both[1]).toEqual({
      ...completions([...args, '--prompt', '']).at(0),
      tokensPerSecond: both[1].tokensPerSecond,
    });
  });

  it('the same seed samples the same text, another seed another', () => {
    const args = [
      '--model',
      STORIES,
      '--prompt',
      '',
      '--max-new-tokens',
      '40',
      '--temperature',
      '1',
      '--top-p',
      '0.9',
      '--json',
    ];
    const a = completions([...args, '--seed', '133742'])[0].tokenIds;
    expect(completions([...args, '--seed', '133742'])[0].tokenIds).toEqual(a);
    expect(completions([...args, '--seed', '7'])[0].tokenIds).not.toEqual(a);
  });

  it('--stop cuts the completion before the first stop string', () => {
    const [c] = completions(['--model', STORIES, '--prompt', '', '--stop', '["park", "Lily"]', '--json']);
    expect(c.finishReason).toBe('stop');
    expect(c.completion).toBe('Once upon a time, there was a little girl named ');
  });

  it('a prompt that starts with BOS gets no second one', () => {
    const [a] = completions(['--model', STORIES, '--prompt', '<s>Once', '--max-new-tokens', '10', '--json']);
    const [b] = completions(['--model', STORIES, '--prompt', 'Once', '--max-new-tokens', '10', '--json']);
    expect(a.tokenIds).toEqual(b.tokenIds);
  });

  it('--chat on a tokenizer without a chat template is one line, exit 1', () => {
    const r = megapatch(['generate', '--model', STORIES, '--prompt', 'hi', '--chat']);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toBe(
      "megapatch generate: --prompt: the model's tokenizer has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja); drop --chat",
    );
  });

  it('bad JSONL lines are one-line errors naming the file and the line', () => {
    const cases: [string, string][] = [
      ['{"prompt": "a"}\n{"prompt": "b"\n', 'line 2: not valid JSON'],
      [
        '{"prompt": "a"}\n\n{"text": "b"}\n',
        'line 3: expected {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]}',
      ],
      ['{"prompt": 3}\n', 'line 1: expected {"prompt": "..."}'],
      [
        '{"messages": [{"role": "user", "content": "hi"}]}\n',
        "line 1: the model's tokenizer has no chat template",
      ],
      ['\n\n', 'holds no prompts'],
    ];
    for (const [i, [text, message]] of cases.entries()) {
      const file = join(root, `bad-${i}.jsonl`);
      fs.writeFileSync(file, text);
      const r = megapatch(['generate', '--model', STORIES, '--prompts', file]);
      expect(r.status, text).toBe(1);
      expect(oneLine(r.stderr)).toContain(`megapatch generate: ${file} ${message}`);
    }
  });

  it('a prompt longer than the model is one line naming it', () => {
    const r = megapatch([
      'generate',
      '--model',
      STORIES,
      '--prompt',
      'Once upon a time',
      '--max-new-tokens',
      '510',
    ]);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toBe(
      "megapatch generate: --prompt: the prompt (5 tokens) + --max-new-tokens 510 exceed the model's 512 positions; shorten it or lower --max-new-tokens",
    );
  });

  it('streams on a terminal: the pieces written are the completion', async () => {
    const io = memoryIo();
    const tty = { ...io, out: { ...io.out, isTTY: true } };
    const pieces: string[] = [];
    const [c] = await runGenerate(
      { model: STORIES, prompt: '', 'max-new-tokens': '60', stop: 'ball' },
      tty,
      (s) => pieces.push(s),
    );
    expect(pieces.length).toBeGreaterThan(10);
    expect(pieces.join('')).toBe(`${c.completion}\n`);
    expect(c.completion.endsWith('a big, red ')).toBe(true);
    expect(io.lines).toEqual([]);
  });

  it('a TP=2 checkpoint under megapatch launch --nproc-per-node 2 prints what one process prints, once', () => {
    const args = ['generate', '--model', tp2, '--prompt', '', '--max-new-tokens', '40', '--json'];
    // `megapatch` on PATH, as a user runs it
    const env = { ...process.env, MEGAPATCH_DEBUG: '', PATH: pathWithMegapatch(root) };
    const r = spawnSync(
      process.execPath,
      [BIN, 'launch', '--nproc-per-node', '2', '--', 'megapatch', ...args],
      {
        encoding: 'utf8',
        env,
      },
    );
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0].startsWith('[rank0]: ')).toBe(true);
    const distributed = JSON.parse(lines[0].slice('[rank0]: '.length)) as Completion;
    const [single] = completions(args.slice(1));
    const hf = completions(['--model', STORIES, ...args.slice(3)]);
    expect(distributed.tokenIds).toEqual(single.tokenIds);
    expect(distributed.completion).toBe(single.completion);
    expect(hf[0].tokenIds).toEqual(single.tokenIds);
    expect(single.completion.startsWith(README_START.slice(0, 100))).toBe(true);
  });
});
