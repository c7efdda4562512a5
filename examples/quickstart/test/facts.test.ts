// The stories: deterministic, the held-out ones never in training, every name, colour and thing a
// single token of the real tokenizer (so the answer is one copied token each), and the scorer.
import { loadTokenizer } from '@megapatch/data';
import { describe, expect, it } from 'vitest';
import { COLOURS, factText, makeFacts, NAMES, THINGS } from '../src/facts.js';
import { parseCompletions, scoreCompletions } from '../src/score.js';
import { tokenizerDir } from '../src/tokenizer.js';

describe('stories', () => {
  it('are every combination, shuffled the same way each time, 500 held out', () => {
    const a = makeFacts();
    const b = makeFacts();
    expect(a.train.length + a.heldOut.length).toBe(NAMES.length * COLOURS.length * THINGS.length);
    expect(a.heldOut.length).toBe(500);
    expect(a.heldOut.map(factText)).toEqual(b.heldOut.map(factText));
    const train = new Set(a.train.map(factText));
    expect(a.heldOut.filter((f) => train.has(factText(f)))).toEqual([]);
    expect(factText(a.train[0])).toMatch(/^[A-Z][a-z]+ has a [a-z]+ [a-z]+\. The [a-z]+ is [a-z]+\.$/);
  });

  it('use words that are one token each of the 32,000-token tokenizer', async () => {
    const tok = await loadTokenizer(tokenizerDir());
    expect(tok.vocabSize).toBe(32000);
    // the normalizer puts "▁" before the text, so "red" alone is the "▁red" of "has a red hat"
    const long = [...NAMES, ...COLOURS, ...THINGS].filter(
      (w) => tok.encode(w, { addSpecialTokens: false }).length !== 1,
    );
    expect(long).toEqual([]);
  });

  it('score a completion right only when it starts with the answer', () => {
    const { heldOut } = makeFacts();
    const facts = heldOut.slice(0, 3);
    const lines = [
      { prompt: facts[0].prompt, completion: facts[0].answer, finishReason: 'eos' },
      { prompt: facts[1].prompt, completion: ` ${facts[1].thing} is plaid.`, finishReason: 'eos' },
      { prompt: facts[2].prompt, completion: `${facts[2].answer} The`, finishReason: 'length' },
    ];
    const score = scoreCompletions(facts, parseCompletions(lines.map((l) => JSON.stringify(l)).join('\n')));
    expect(score.items.map((s) => s.correct)).toEqual([true, false, true]);
    expect(score.accuracy).toBeCloseTo(2 / 3);
    expect(() => scoreCompletions(facts, [])).toThrow(/0 completions for 3 prompts/);
  });
});
