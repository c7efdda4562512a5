// DPO end to end on one process (a tiny Llama with a character tokenizer and a chat template, no
// shared data): the loss falls and the accuracy rises; the first update equals Adam's step on the
// DPO gradient computed by hand (the policy equals the reference there, so each pair's gradient is
// −β/2 (∇ log π(chosen) − ∇ log π(rejected)) / n); a resumed run equals a straight one bit for bit;
// memory is flat; bad configs and data fail in one line.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loadTokenizer } from '@megapatch/data';
import { loadModel } from '@megapatch/models';
import { fromTypedArray, logSoftmax, memoryStats, type Tensor, tidy } from '@megapatch/tensor';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { parseRunConfig, type RunConfigInput, train, writeRunReport } from '../src/index.js';
import { charTokenizer, mergedRunConfig, SIMPLE_CHAT_TEMPLATE, tempDir, tinyLlama } from './helpers.js';

const root = tempDir('mp-dpo-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
// every test frees what it allocated: a tensor left to the garbage collector would be freed in a
// later test, in the middle of its flat-memory check
afterEach(() => expect(memoryStats('cpu').liveBytes).toBe(0));
const hf = charTokenizer(tinyLlama(path.join(root, 'hf')), 777, SIMPLE_CHAT_TEMPLATE);
// pairs that prefer short replies made of "y" to ones made of "n"
const questions = ['is it', 'can we', 'do you', 'will it', 'was he', 'are we', 'did it', 'has she'];
const pairsFile = path.join(root, 'pairs.jsonl');
fs.writeFileSync(
  pairsFile,
  `${questions
    .flatMap((q, i) => [
      { prompt: `${q}?`, chosen: 'yes'.repeat(1 + (i % 2)), rejected: 'no'.repeat(1 + (i % 3)) },
      { instruction: `${q} now`, input: '', chosen: 'yes yes', rejected: 'nope' },
    ])
    .map((r) => JSON.stringify(r))
    .join('\n')}\n`,
);

function config(run: string, over: Partial<Record<keyof RunConfigInput, object>> = {}) {
  const base: RunConfigInput = {
    model: { load: hf, dtype: 'fp32' },
    data: { seqLength: 32 },
    training: { microBatchSize: 2, globalBatchSize: 8, trainIters: 12, logInterval: 1, seed: 9 },
    optimizer: { lr: 5e-3, minLr: 5e-3, weightDecay: 0, clipGrad: 1 },
    scheduler: { lrDecayStyle: 'constant' },
    logging: { runDir: path.join(root, run) },
    dpo: { pairsPath: pairsFile, beta: 0.1 },
  };
  return mergedRunConfig(base, over);
}

interface Line {
  kind: string;
  iteration: number;
  lmLoss: number;
  gradNorm: number | null;
  consumedSamples: number;
  memory: { liveBytes: number };
  dpo: Record<string, number>;
}
const metrics = (run: string): Line[] =>
  fs
    .readFileSync(path.join(root, run, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Line);

describe('DPO', () => {
  it('lowers the loss, raises the accuracy, evaluates held-out pairs and keeps the memory flat', async () => {
    const lines: string[] = [];
    const before = memoryStats('cpu').liveBytes;
    const r = await train(
      config('fall', { dpo: { validPairsPath: pairsFile }, training: { evalInterval: 6 } }),
      {
        log: (l) => lines.push(l),
        report: false,
      },
    );
    expect(r.exitReason).toBe('done');
    const all = metrics('fall');
    const m = all.filter((x) => x.kind === 'train');
    expect(m.map((x) => x.consumedSamples)).toEqual(m.map((x) => 8 * x.iteration));
    // the first step: policy = reference, loss ln 2, no margin
    expect(m[0].dpo.loss).toBeCloseTo(Math.LN2, 6);
    expect(m[0].dpo.margin).toBeCloseTo(0, 6);
    const last = m.slice(-3);
    expect(last.reduce((a, x) => a + x.dpo.loss, 0) / 3).toBeLessThan(0.4);
    expect(last.reduce((a, x) => a + x.dpo.accuracy, 0) / 3).toBeGreaterThan(0.8);
    for (const x of m) expect(x.lmLoss).toBe(x.dpo.loss);
    // held-out pairs (here the training ones) before training, at 6 and 12: their loss falls
    const valid = all.filter((x) => x.kind === 'valid');
    expect(valid.map((x) => x.iteration)).toEqual([0, 6, 12]);
    expect(valid[0].dpo.loss).toBeCloseTo(Math.LN2, 6);
    expect(valid[2].dpo.loss).toBeLessThan(0.5);
    expect(valid[2].dpo.accuracy).toBeGreaterThan(0.8);
    expect(lines[0]).toMatch(
      /^DPO: 16 pairs \(16 held out\), 8 per iteration in 4 micro-batch\(es\) of 2 per rank/,
    );
    expect(lines.filter((l) => l.includes(' consumed pairs: '))).toHaveLength(12);
    expect(new Set(m.slice(1).map((x) => x.memory.liveBytes)).size).toBe(1);
    expect(memoryStats('cpu').liveBytes).toBe(before);
    const rep = await writeRunReport(path.join(root, 'fall'));
    expect(rep.pngs.map((p) => path.basename(p)).slice(0, 3)).toEqual([
      'dpo-accuracy.png',
      'dpo-rewards.png',
      'loss.png',
    ]);
    expect(fs.readFileSync(rep.html, 'utf8')).toContain('DPO loss');
  });

  it('makes the first update the DPO step computed by hand', async () => {
    const lr = 1e-3;
    const beta = 0.5;
    const save = path.join(root, 'hand-ckpt');
    await train(
      config('hand', {
        training: { trainIters: 1, globalBatchSize: 16, microBatchSize: 4 },
        optimizer: { lr, minLr: lr, clipGrad: 0, adamEps: 1 },
        // the prompts whole (the default limit is half of seqLength)
        dpo: { beta, maxPromptLength: 24 },
        checkpoint: { save },
      }),
      { log: () => {}, report: false },
    );
    // with the policy equal to the reference, loss = mean ln(1 + e^(−β h)) has gradient
    // −β/2 · (∇ Σ log π(chosen) − ∇ Σ log π(rejected)) / n: summed by hand over the 16 pairs
    // freed (with the gradients) when the test returns
    using before = loadModel(hf, { dtype: 'float32' }).model;
    using after = loadModel(save, { dtype: 'float32' }).model;
    const text = fs.readFileSync(pairsFile, 'utf8').trim().split('\n');
    const tok = await loadTokenizer(hf);
    const enc = (s: string) => tok.encode(s, { addSpecialTokens: false });
    for (const raw of text) {
      const r = JSON.parse(raw) as {
        prompt?: string;
        instruction?: string;
        chosen: string;
        rejected: string;
      };
      const user = r.prompt ?? (r.instruction as string);
      const prompt = [1, ...enc(`q: ${user} a: `)];
      for (const [reply, sign] of [
        [r.chosen, 1],
        [r.rejected, -1],
      ] as const) {
        const ids = [...prompt, ...enc(reply), 2];
        tidy(() => {
          const input = fromTypedArray(BigInt64Array.from(ids.slice(0, -1), BigInt), [1, ids.length - 1]);
          const logp = logSoftmax(before.forward(input).logits as Tensor, -1);
          let sum: Tensor | null = null;
          for (let t = prompt.length - 1; t < ids.length - 1; t++) {
            const v = logp
              .select(1, t)
              .select(1, ids[t + 1])
              .sum();
            sum = sum ? sum.add(v) : v;
          }
          (sum as Tensor).mul((-beta / 2 / text.length) * sign).backward();
        });
      }
    }
    const got = new Map(after.namedParameters());
    let off = 0;
    let step = 0;
    for (const [name, p] of before.namedParameters()) {
      const g = p.grad?.toTypedArray() as Float32Array;
      const w0 = p.toTypedArray() as Float32Array;
      const w1 = got.get(name)?.toTypedArray() as Float32Array;
      for (let i = 0; i < w0.length; i++) {
        const want = w0[i] - (lr * g[i]) / (Math.abs(g[i]) + 1);
        const tol = 1.2e-7 * Math.abs(want) + 2e-3 * Math.abs(want - w0[i]) + 1e-12;
        expect(Math.abs(w1[i] - want), `${name}[${i}]`).toBeLessThanOrEqual(tol);
        off += Math.abs(w1[i] - want);
        step += Math.abs(want - w0[i]);
      }
    }
    expect(step).toBeGreaterThan(0);
    expect(off / step).toBeLessThan(1e-2);
  });

  it('resumes bit for bit, with the ftx term and label smoothing', async () => {
    const over = (run: string, extra: Partial<Record<keyof RunConfigInput, object>> = {}) =>
      config(run, {
        dpo: { ftx: 0.5, labelSmoothing: 0.1 },
        checkpoint: { save: path.join(root, `${run}-ckpt`), saveInterval: 3 },
        ...extra,
      });
    const straight = await train(over('straight', { training: { trainIters: 6 } }), {
      log: () => {},
      report: false,
    });
    await train(over('parts', { training: { trainIters: 6, exitInterval: 3 } }), {
      log: () => {},
      report: false,
    });
    const resumed = await train(
      over('parts', {
        training: { trainIters: 6 },
        checkpoint: { load: path.join(root, 'parts-ckpt'), save: path.join(root, 'parts-ckpt') },
      }),
      { log: () => {}, report: false },
    );
    expect(resumed.losses).toEqual(straight.losses.slice(3));
    const a = metrics('straight');
    const b = metrics('parts');
    expect(b.map((x) => x.dpo)).toEqual(a.map((x) => x.dpo));
    // the objective carries the chosen replies' NLL
    for (const x of a) expect(x.lmLoss).toBeCloseTo(x.dpo.loss + 0.5 * x.dpo.sftLoss, 12);
    expect(a[0].dpo.sftLoss).toBeGreaterThan(1);
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

  it('refuses bad configs and data in one line', async () => {
    const bad = (over: Partial<Record<keyof RunConfigInput, object>>) => () =>
      parseRunConfig(config('x', over));
    expect(bad({ data: { dataPath: ['x'] } })).toThrow(
      /DPO reads its pairs from dpo.pairsPath: drop the data source/,
    );
    expect(bad({ dpo: { lossType: 'hinge', labelSmoothing: 0.1 } })).toThrow(/label smoothing is cDPO's/);
    expect(bad({ rl: { promptsPath: 'p', promptsPerStep: 1 } })).toThrow(/give one of dpo .* and rl/);
    expect(bad({ model: { attentionDropout: 0.1 } })).toThrow(
      /set model.hiddenDropout and model.attentionDropout 0/,
    );
    const run = async (over: Partial<Record<keyof RunConfigInput, object>>) =>
      train(config('bad', { training: { trainIters: 1 }, ...over }), { log: () => {}, report: false });
    await expect(run({ parallel: { contextParallelSize: 2 } })).rejects.toThrow(
      /parallel.contextParallelSize 2: DPO runs with tensor \(and sequence\) and data parallelism only/,
    );
    const noTemplate = charTokenizer(tinyLlama(path.join(root, 'plain')));
    await expect(run({ model: { load: noTemplate } })).rejects.toThrow(/its tokenizer has none/);
    const badPairs = path.join(root, 'bad.jsonl');
    fs.writeFileSync(
      badPairs,
      '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
    );
    await expect(run({ dpo: { pairsPath: badPairs } })).rejects.toThrow(
      /bad.jsonl: line 2: record needs "chosen" and "rejected"/,
    );
    expect(bad({ dpo: { maxPromptLength: 32 } })).toThrow(
      /leaves no room for the reply in data.seqLength 32/,
    );
  });

  it('keeps the end of a long prompt (BOS first) and cuts the conversation to seqLength', async () => {
    // a 41-character question: the prompt "<s>q: xxx…? a: " has 49 tokens, the limit 12
    const long = path.join(root, 'long.jsonl');
    const question = `${'abcdefghij'.repeat(4)}?`;
    fs.writeFileSync(long, `${JSON.stringify({ prompt: question, chosen: 'yes', rejected: 'no no' })}\n`);
    await train(
      config('long', {
        training: { trainIters: 1, globalBatchSize: 1, microBatchSize: 1 },
        dpo: { pairsPath: long, maxPromptLength: 12 },
      }),
      { log: () => {}, report: false },
    );
    const [line] = metrics('long');
    // the first step's log-probabilities are the start model's: computed here on the kept rows
    const tok = await loadTokenizer(hf);
    const model = loadModel(hf, { dtype: 'float32' }).model;
    const prompt = tok.encode(`<s>q: ${question} a: `, { addSpecialTokens: false });
    const kept = [prompt[0], ...prompt.slice(prompt.length - 11)];
    expect(prompt.length).toBeGreaterThan(40);
    expect(kept[0]).toBe(1);
    for (const [reply, key] of [
      ['yes', 'chosenLogp'],
      ['no no', 'rejectedLogp'],
    ] as const) {
      const ids = [...kept, ...tok.encode(reply, { addSpecialTokens: false }), 2];
      const want = tidy(() => {
        const input = fromTypedArray(BigInt64Array.from(ids.slice(0, -1), BigInt), [1, ids.length - 1]);
        const logp = logSoftmax(model.forward(input).logits as Tensor, -1);
        let sum = 0;
        for (let t = kept.length - 1; t < ids.length - 1; t++)
          sum += logp
            .select(1, t)
            .select(1, ids[t + 1])
            .item();
        return sum;
      });
      expect(line.dpo[key]).toBeCloseTo(want, 4);
    }
    model.dispose();
  });
});
