// A real model end to end: Karpathy's stories260K (a Llama in HF format). Greedy decoding from BOS
// reproduces the text of its README, from the HF folder and from a TP=2 megapatch checkpoint loaded
// on one process; sampling is seeded; a batch equals each prompt alone; stop strings cut the text.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { convertHfToMegapatch } from '@megapatch/convert';
import { type HfTokenizer, loadTokenizer } from '@megapatch/data';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type GPTModel, generate, loadModel } from '../src/index.js';

const ROOT = sharedPath('data/models/stories260K');
const HF = path.join(ROOT, 'hf');

/** The greedy sample of the README: the block after `./run ... -t 0.0`. */
function readmeGreedyText(): string {
  const lines = fs.readFileSync(path.join(ROOT, 'karpathy-stories260K-readme.md'), 'utf8').split('\n');
  const start = lines.findIndex((l) => l.startsWith('$ ./run') && l.includes('-t 0.0'));
  const end = lines.findIndex((l, i) => i > start && l.startsWith('```'));
  return lines.slice(start + 1, end).join('\n');
}

describe.skipIf(skipWithoutShared(import.meta.url))('stories260K', () => {
  let tok: HfTokenizer;
  let model: GPTModel;
  let bos: number;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-stories-'));
  const decode = (ids: number[]) => tok.decode(ids);
  const greedy = (m: GPTModel, n: number) =>
    generate(m, [[bos]], { maxNewTokens: n, decode, eosTokenIds: [tok.eosId] });

  beforeAll(async () => {
    tok = await loadTokenizer(HF);
    bos = tok.bosId as number;
    ({ model } = loadModel(HF));
  });
  afterAll(() => {
    model?.dispose();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('greedy decoding from BOS alone reproduces the README', () => {
    const want = readmeGreedyText();
    expect(want.startsWith('Once upon a time, there was a little girl named Lily.')).toBe(true);
    const r = greedy(model, 256);
    const text = r.rows[0].text as string;
    // llama2.c's run prints 255 tokens after BOS; the README's text ends there.
    expect(text.slice(0, want.length)).toBe(want);
    expect(r.tokensPerSecond).toBeGreaterThan(0);
  });

  it('a TP=2 megapatch checkpoint loaded on one process gives the same tokens', async () => {
    const ckpt = path.join(tmp, 'tp2');
    await convertHfToMegapatch({ hfDir: HF, output: ckpt, layout: { tp: 2 } });
    const loaded = loadModel(ckpt);
    try {
      expect(loaded.kind).toBe('megapatch');
      expect(loaded.architecture).toBe('LlamaForCausalLM');
      expect(loaded.tokenizerDir).not.toBeNull();
      const fromCkpt = greedy(loaded.model, 256).rows[0];
      expect(fromCkpt.tokens).toEqual(greedy(model, 256).rows[0].tokens);
      expect((fromCkpt.text as string).slice(0, 200)).toBe(readmeGreedyText().slice(0, 200));
    } finally {
      loaded.model.dispose();
    }
  });

  it('sampling with a seed reproduces, and another seed differs', () => {
    const sample = (seed: number) =>
      generate(model, [[bos]], { maxNewTokens: 60, temperature: 1, topP: 0.9, seed }).rows[0].tokens;
    const a = sample(133742);
    expect(sample(133742)).toEqual(a);
    expect(sample(7)).not.toEqual(a);
    expect(
      generate(model, [[bos]], { maxNewTokens: 60, temperature: 0.8, topK: 5, seed: 3 }).rows[0].tokens,
    ).toEqual(
      generate(model, [[bos]], { maxNewTokens: 60, temperature: 0.8, topK: 5, seed: 3 }).rows[0].tokens,
    );
  });

  it('a batch of prompts of different lengths gives each prompt its own tokens', () => {
    const prompts = [
      [bos],
      [bos, ...tok.encode('Once upon a time, there was a dog', { addSpecialTokens: false })],
      [bos, ...tok.encode('Tom and Sue went to the', { addSpecialTokens: false })],
    ];
    const batch = generate(model, prompts, { maxNewTokens: 40 });
    for (const [i, p] of prompts.entries()) {
      expect(batch.rows[i].tokens, `prompt ${i}`).toEqual(
        generate(model, [p], { maxNewTokens: 40 }).rows[0].tokens,
      );
    }
  });

  it('a stop string ends the row and is cut from the text', () => {
    const r = generate(model, [[bos]], { maxNewTokens: 100, decode, stopStrings: ['Lily', 'park'] });
    expect(r.rows[0].finishReason).toBe('stop');
    expect(r.rows[0].text).toBe('Once upon a time, there was a little girl named ');
    expect(r.rows[0].tokens.length).toBeLessThan(20);
  });
});
