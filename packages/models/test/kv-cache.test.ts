// Decoding with the KV cache gives the logits and tokens of recomputing the whole sequence, for
// every attention variant (GQA, sliding window, MLA with its latent cache) and for left-padded
// batches of prompts of different lengths.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fromTypedArray, noGrad, type Tensor } from '@megapatch/tensor';
import { afterAll, describe, expect, it } from 'vitest';
import { type GPTModel, generate, KVCache, loadModel } from '../src/index.js';
import { fixtureCheckpoint, relMaxError } from './helpers/fixtures.js';

const models: GPTModel[] = [];
afterAll(() => {
  for (const m of models) m.dispose();
});

function load(id: string): GPTModel {
  const { model } = loadModel(fixtureCheckpoint(id));
  models.push(model);
  return model;
}

function ids(rows: number[][]): Tensor {
  return fromTypedArray(BigInt64Array.from(rows.flat(), BigInt), [rows.length, rows[0].length]);
}

function rowLogits(model: GPTModel, t: Tensor, pos: number): Float32Array {
  const l = model
    .gatherLogits(t.narrow(1, pos, 1))
    .contiguous()
    .to('float32');
  return l.toTypedArray() as Float32Array;
}

describe.each(['llama', 'mistral', 'qwen3', 'mixtral', 'deepseek-v2', 'deepseek-v3'])('%s', (id) => {
  it('cached decoding equals recomputing the sequence', () => {
    const model = load(id);
    noGrad(() => {
      const seq = [5, 17, 301, 42, 7, 99, 250, 13, 60, 2, 444, 31];
      const full = model.forward(ids([seq])).logits as Tensor;
      const cache = new KVCache(1, seq.length);
      const prompt = 4;
      let out = model.forward(ids([seq.slice(0, prompt)]), { kvCache: cache }).logits as Tensor;
      expect(relMaxError(rowLogits(model, out, prompt - 1), rowLogits(model, full, prompt - 1))).toBeLessThan(
        1e-5,
      );
      for (let t = prompt; t < seq.length; t++) {
        out = model.forward(ids([[seq[t]]]), { kvCache: cache }).logits as Tensor;
        expect(relMaxError(rowLogits(model, out, 0), rowLogits(model, full, t)), `step ${t}`).toBeLessThan(
          1e-5,
        );
      }
      expect(cache.length).toBe(seq.length);
      cache.dispose();
    });
  });

  it('a batch of prompts of different lengths decodes as each prompt alone', () => {
    const model = load(id);
    const prompts = [
      [1, 50, 60, 70, 80],
      [1, 9],
      [1, 300, 301],
    ];
    const batch = generate(model, prompts, { maxNewTokens: 6 });
    for (const [r, p] of prompts.entries()) {
      const alone = generate(model, [p], { maxNewTokens: 6 });
      expect(batch.rows[r].tokens, `row ${r}`).toEqual(alone.rows[0].tokens);
      // greedy tokens are the argmax of a full recomputation
      const seq = [...p, ...alone.rows[0].tokens];
      const full = noGrad(() => model.forward(ids([seq])).logits as Tensor);
      for (let j = 0; j < alone.rows[0].tokens.length; j++) {
        const l = rowLogits(model, full, p.length - 1 + j);
        expect(l.indexOf(Math.max(...l))).toBe(alone.rows[0].tokens[j]);
      }
    }
  });
});

describe('generation options', () => {
  it('sampling reproduces with a seed and follows top-k', () => {
    const model = load('llama');
    const opts = { maxNewTokens: 8, temperature: 1.5, topK: 3, topP: 0.95, seed: 7 };
    const a = generate(model, [[1, 2, 3]], opts);
    const b = generate(model, [[1, 2, 3]], opts);
    const c = generate(model, [[1, 2, 3]], { ...opts, seed: 8 });
    expect(a.rows[0].tokens).toEqual(b.rows[0].tokens);
    expect(c.rows[0].tokens).not.toEqual(a.rows[0].tokens);
    // every sampled token is among the 3 most likely of its step
    const seq = [1, 2, 3, ...a.rows[0].tokens];
    const full = noGrad(() => model.forward(ids([seq])).logits as Tensor);
    for (let j = 0; j < a.rows[0].tokens.length; j++) {
      const l = Array.from(rowLogits(model, full, 2 + j));
      const top3 = l
        .map((v, i) => [v, i])
        .sort((x, y) => y[0] - x[0])
        .slice(0, 3)
        .map((x) => x[1]);
      expect(top3).toContain(a.rows[0].tokens[j]);
    }
  });

  it('with a seed per row, groups generated together sample what each samples alone', () => {
    const model = load('llama');
    // three groups, EOS ending some rows; prompts of one length, so that the batch's logits are bit
    // for bit each group's (padding may move their last bits, and, rarely, a draw)
    const groups = [
      { prompt: [1, 2, 3, 4], seed: 11 },
      { prompt: [1, 50, 60, 70], seed: 12 },
      { prompt: [1, 9, 8, 7], seed: 13 },
    ];
    for (const sampling of [
      { temperature: 1.3 },
      { temperature: 1.3, topK: 5 },
      { temperature: 1.3, topP: 0.9 },
    ]) {
      const opts = { maxNewTokens: 10, eosTokenIds: [7, 42], ...sampling };
      const prompts = groups.flatMap((g) => [g.prompt, g.prompt, g.prompt]);
      const seeds = groups.flatMap((g) => [g.seed, g.seed, g.seed]);
      const together = generate(model, prompts, { ...opts, seed: seeds }).rows;
      const alone = groups.flatMap(
        (g) => generate(model, [g.prompt, g.prompt, g.prompt], { ...opts, seed: g.seed }).rows,
      );
      expect(together, JSON.stringify(sampling)).toEqual(alone);
      // the rows of a group differ from each other (one generator, drawn in row order)
      expect(new Set(alone.map((r) => r.tokens.join(','))).size).toBeGreaterThan(3);
    }
    expect(() => generate(model, [[1], [2]], { seed: [1] })).toThrow(
      /seed has 1 entries for 2 prompts; give one per prompt/,
    );
  });

  it('stops at EOS and reports why', () => {
    const model = load('llama');
    const greedy = generate(model, [[1, 2, 3]], { maxNewTokens: 5 });
    const eos = greedy.rows[0].tokens[2];
    const r = generate(model, [[1, 2, 3]], { maxNewTokens: 5, eosTokenIds: [eos] });
    expect(r.rows[0].finishReason).toBe('eos');
    expect(r.rows[0].tokens.at(-1)).toBe(eos);
    expect(r.rows[0].tokens.length).toBe(greedy.rows[0].tokens.indexOf(eos) + 1);
    expect(greedy.rows[0].finishReason).toBe('length');
  });

  it('refuses bad input with one clear line', () => {
    const model = load('llama');
    expect(() => generate(model, [[]])).toThrow(/prompt 0 is empty/);
    expect(() => generate(model, [[1]], { topP: 0 })).toThrow(/topP must be in/);
    expect(() => generate(model, [[1]], { maxNewTokens: 1000 })).toThrow(/exceed the model's 256 positions/);
    expect(() => model.forward(ids([[1, 1000]]))).toThrow(
      /token id 1000 at \[0, 1\] is outside the vocabulary \[0, 1000\)/,
    );
    expect(() => model.forward(ids([Array.from({ length: 257 }, () => 1)]))).toThrow(
      /outside the model's 256 positions/,
    );
  });
});

describe.each([
  // Phi-3.5's shape: whole heads rotate
  ['phi3-longrope', [40, 300, 2000, 9000]],
  // Phi-4-mini's: 6 of each head's 8 channels rotate, one factor a rotating pair
  ['phi4-mini', [40, 300, 2000]],
])("%s: decoding across longrope's original context (8 positions here)", (id, farFactors) => {
  /** Greedy tokens of recomputing the whole sequence at every step (no cache), as its last row's argmax. */
  function greedyByRecomputing(model: GPTModel, prompt: number[], n: number): number[] {
    const seq = [...prompt];
    const out: number[] = [];
    noGrad(() => {
      for (let i = 0; i < n; i++) {
        const l = model.forward(ids([seq])).logits as Tensor;
        const row = rowLogits(model, l, seq.length - 1);
        let best = 0;
        for (let k = 1; k < row.length; k++) if (row[k] > row[best]) best = k;
        out.push(best);
        seq.push(best);
        l.dispose();
      }
    });
    return out;
  }

  it('generate() recomputes the cache with the long factors when the sequence passes it', () => {
    // the fixture's weights with long factors far from the short ones, so that rotating the
    // cached keys with the wrong ones changes the greedy tokens
    const dir = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'mp-longrope-')), 'hf');
    fs.cpSync(fixtureCheckpoint(id), dir, { recursive: true });
    const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    cfg.rope_scaling.long_factor = farFactors;
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(cfg));
    const { model } = loadModel(dir);
    models.push(model);
    // a 5-token prompt: the first 3 new tokens fit the original context (short factors), the
    // 4th step's sequence of 9 passes it, and every forward from there rotates with the long ones
    const prompt = [1, 50, 60, 70, 80];
    const want = greedyByRecomputing(model, prompt, 9);
    // the lengths generate() runs: the prompt, single tokens, the whole 9 tokens once, single tokens
    const lengths: number[] = [];
    const forward = model.forward.bind(model);
    model.forward = ((input: Tensor, opts?: Parameters<GPTModel['forward']>[1]) => {
      lengths.push(input.shape[1]);
      return forward(input, opts);
    }) as GPTModel['forward'];
    const got = generate(model, [prompt], { maxNewTokens: 9 }).rows[0].tokens;
    model.forward = forward;
    expect(got).toEqual(want);
    expect(lengths).toEqual([5, 1, 1, 1, 9, 1, 1, 1, 1]);
    expect(model.rotary.usesLongFactors(9)).toBe(true);
    expect(model.rotary.usesLongFactors(8)).toBe(false);
    // why: decoding the 9th position against keys cached with the short factors is another model
    noGrad(() => {
      const seq = [...prompt, ...want.slice(0, 4)];
      const cache = new KVCache(1, 9);
      model.forward(ids([seq.slice(0, 8)]), { kvCache: cache }).logits?.dispose();
      const stale = model.forward(ids([seq.slice(8)]), { kvCache: cache }).logits as Tensor;
      const fresh = model.forward(ids([seq])).logits as Tensor;
      expect(relMaxError(rowLogits(model, stale, 0), rowLogits(model, fresh, 8))).toBeGreaterThan(1e-3);
      cache.dispose();
    });
  });

  it('a forward rotates with the short factors up to the original context, the long ones past it', () => {
    const model = load(id);
    noGrad(() => {
      const seq = [5, 17, 301, 42, 7, 99, 250, 13, 60, 2, 444, 31];
      const long = model.forward(ids([seq])).logits as Tensor;
      const short = model.forward(ids([seq.slice(0, 8)])).logits as Tensor;
      // the same prefix, other factors: the logits of position 0 agree (no rotation at 0), the later ones do not
      expect(relMaxError(rowLogits(model, short, 0), rowLogits(model, long, 0))).toBeLessThan(1e-5);
      expect(relMaxError(rowLogits(model, short, 7), rowLogits(model, long, 7))).toBeGreaterThan(1e-4);
    });
  });
});
