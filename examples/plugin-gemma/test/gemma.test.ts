// The Gemma plugin end to end: config parsing, logits/loss/gradient parity with the independent
// PyTorch reference (scripts/reference.py), conversion in a TP=2 layout and back, generation, and
// what megapatch says about a Gemma folder when the plugin is not imported.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  ConvertError,
  convertHfToMegapatch,
  convertMegapatchToHf,
  parseHfConfig,
  ShardedSafetensors,
} from '@megapatch/convert';
import {
  GPTModel,
  generate,
  getModelFamily,
  loadModel,
  loadWeights,
  type ModelFamily,
  openWeights,
} from '@megapatch/models';
import { fromTypedArray, noGrad, type Tensor } from '@megapatch/tensor';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GEMMA_TEST_CONFIG } from '../scripts/write-checkpoint.js';
import { gemmaFamily, gemmaSpec, registerGemma } from '../src/index.js';
import { cosine, gemmaCheckpoint, hfRowsInMegatron, readFixture, relMaxError, tempDir } from './helpers.js';

const PKG = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const fx = readFixture();
const tmp = tempDir('mp-gemma-');
let hfDir = '';
const models: GPTModel[] = [];

beforeAll(() => {
  hfDir = gemmaCheckpoint(tmp.dir);
});
afterAll(() => {
  for (const m of models) m.dispose();
  tmp.remove();
});

/** The model's logits [b, s, vocab] (padding columns dropped) as float64. */
function logitsOf(model: GPTModel, ids: Tensor): Float64Array {
  const logits = noGrad(() => model.forward(ids).logits as Tensor);
  const real = model.gatherLogits(logits).contiguous().to('float32');
  return Float64Array.from(real.toTypedArray() as Float32Array);
}

function load(dir: string, opts: Parameters<typeof loadModel>[1] = {}): GPTModel {
  const { model } = loadModel(dir, opts);
  models.push(model);
  return model;
}

function configWith(fields: Record<string, unknown>): Record<string, unknown> {
  const c: Record<string, unknown> = { ...GEMMA_TEST_CONFIG, ...fields };
  for (const [k, v] of Object.entries(fields)) if (v === undefined) delete c[k];
  return c;
}

describe('config.json', () => {
  it('parses into the TransformerConfig of the synthetic Gemma', () => {
    const { spec, transformerConfig } = parseHfConfig(hfDir);
    expect(spec).toBe(gemmaSpec);
    expect(transformerConfig).toEqual({
      numLayers: 3,
      hiddenSize: 48,
      ffnHiddenSize: 128,
      numAttentionHeads: 4,
      numQueryGroups: 2,
      kvChannels: 16,
      normalization: 'RMSNorm',
      layernormEpsilon: 1e-6,
      addQkvBias: false,
      qkLayernorm: false,
      rotaryBase: 10000,
      rotaryPercent: 1,
      ropeScaling: { type: 'none' },
      untieEmbeddingsAndOutputWeights: false,
      vocabSize: 1000,
      makeVocabSizeDivisibleBy: 128,
      maxPositionEmbeddings: 256,
      slidingWindow: null,
      moe: null,
      mla: null,
      mtpNumLayers: 0,
    });
  });

  it("takes GemmaConfig's defaults for the fields a config may leave out", () => {
    const cfg = parseHfConfig(
      configWith({
        hidden_act: undefined,
        head_dim: undefined,
        rms_norm_eps: undefined,
        tie_word_embeddings: undefined,
        max_position_embeddings: undefined,
        hidden_size: 3072,
        num_attention_heads: 16,
        num_key_value_heads: 16,
      }),
    ).transformerConfig;
    expect(cfg).toMatchObject({
      kvChannels: 256,
      layernormEpsilon: 1e-6,
      untieEmbeddingsAndOutputWeights: false,
      maxPositionEmbeddings: 8192,
    });
  });

  it('accepts the tanh GELU under either field name and refuses other activations', () => {
    for (const ok of [
      { hidden_act: 'gelu' },
      { hidden_act: 'gelu_pytorch_tanh' },
      { hidden_act: undefined, hidden_activation: 'gelu_pytorch_tanh' },
      { hidden_act: 'gelu', hidden_activation: null },
    ]) {
      expect(() => parseHfConfig(configWith(ok)), JSON.stringify(ok)).not.toThrow();
    }
    for (const [bad, field] of [
      [{ hidden_act: 'silu' }, 'hidden_act'],
      [{ hidden_activation: 'gelu' }, 'hidden_activation'],
      [{ hidden_activation: 'relu' }, 'hidden_activation'],
    ] as const) {
      const e = (() => {
        try {
          parseHfConfig(configWith(bad));
        } catch (err) {
          return err;
        }
      })();
      expect(e, JSON.stringify(bad)).toBeInstanceOf(ConvertError);
      expect((e as ConvertError).code).toBe('INVALID_CONFIG');
      expect((e as ConvertError).message).toContain(`field "${field}"`);
      expect((e as ConvertError).message).toContain('gelu_pytorch_tanh');
    }
  });

  it('requires num_key_value_heads (GemmaConfig would assume 16)', () => {
    expect(() => parseHfConfig(configWith({ num_key_value_heads: undefined }))).toThrow(
      /field "num_key_value_heads"/,
    );
  });
});

describe('registration', () => {
  it('registers the spec and the family once, and again without complaint', () => {
    expect(getModelFamily('GemmaForCausalLM')).toBe(gemmaFamily);
    expect(() => registerGemma()).not.toThrow();
    expect(getModelFamily('GemmaForCausalLM')).toBe(gemmaFamily);
  });
});

describe('against the PyTorch reference', () => {
  it('builds every norm to scale by (1 + weight): the fused input and pre-MLP norms, the final norm', () => {
    const model = load(hfDir);
    const norms = model.namedModules().filter(([, m]) => 'zeroCenteredGamma' in m);
    expect(norms.length).toBe(2 * GEMMA_TEST_CONFIG.num_hidden_layers + 1);
    const plain = norms.filter(
      ([, m]) => !(m as unknown as { zeroCenteredGamma: boolean }).zeroCenteredGamma,
    );
    expect(
      plain.map(([name]) => name),
      'norms that scale by the stored weight itself',
    ).toEqual([]);
  });

  it('fp32 logits, loss and gradients', () => {
    const { model, config } = loadModel(hfDir);
    models.push(model);
    const ids = fx.ids('input_ids');
    expect(relMaxError(logitsOf(model, ids), fx.get('logits').data), 'logits').toBeLessThan(1e-5);

    const out = model.forward(ids, { labels: fx.ids('labels') });
    const loss = (out.loss as Tensor).mean();
    const want = fx.get('loss').data[0];
    expect(Math.abs(loss.item() - want) / want, 'loss').toBeLessThan(1e-5);
    loss.backward();
    const params = new Map(model.namedParameters());
    expect(fx.grads).toEqual(
      expect.arrayContaining([
        'model.embed_tokens.weight',
        'model.norm.weight',
        'model.layers.0.mlp.gate_proj.weight',
      ]),
    );
    for (const hf of fx.grads) {
      const ref = fx.get(`grad.${hf}`);
      const runs = hfRowsInMegatron(gemmaSpec, config, hf);
      expect(runs.length, hf).toBeGreaterThan(0);
      const cols = ref.shape.length > 1 ? ref.shape.slice(1).reduce((a, b) => a * b, 1) : 1;
      const rows = fx.rowSubset(hf);
      const hfRows = rows ? Math.max(...rows) + 1 : ref.shape[0];
      const full = new Float64Array(hfRows * cols);
      for (const r of runs) {
        const p = params.get(r.name);
        expect(p?.grad, `gradient of ${r.name}`).toBeTruthy();
        const g = ((p as Tensor).grad as Tensor).to('float32').toTypedArray() as Float32Array;
        const n = Math.min(r.count, hfRows - r.sourceStart);
        for (let i = 0; i < n * cols; i++) full[r.sourceStart * cols + i] = g[r.start * cols + i];
      }
      const got = rows ? new Float64Array(rows.length * cols) : full;
      if (rows) {
        for (const [j, row] of rows.entries()) got.set(full.subarray(row * cols, (row + 1) * cols), j * cols);
      }
      expect(relMaxError(got, ref.data), `gradient of ${hf}`).toBeLessThan(1e-4);
    }
  });

  it('bf16 logits keep cosine ≥ 0.999', () => {
    const model = load(hfDir, { dtype: 'bfloat16' });
    const logits = noGrad(() => model.forward(fx.ids('input_ids')).logits as Tensor);
    expect(logits.dtype).toBe('bfloat16');
    const real = model.gatherLogits(logits).contiguous().to('float32').toTypedArray() as Float32Array;
    expect(cosine(Float64Array.from(real), fx.get('logits').data)).toBeGreaterThan(0.999);
  });

  // The fixture would catch a family that forgot any one of Gemma's changes.
  it.each([
    ['zeroCenteredGamma', { zeroCenteredGamma: false }],
    ['activation', { activation: 'geglu' }],
    ['embeddingMultiplier', { embeddingMultiplier: undefined }],
  ] as const)('without %s the logits are far off', (_, change) => {
    const family: ModelFamily = { ...gemmaFamily, name: 'not-gemma', ...change };
    const weights = openWeights(hfDir);
    const model = new GPTModel(weights.config, { family, performInitialization: false });
    models.push(model);
    try {
      loadWeights(model, weights);
    } finally {
      weights.source.close();
    }
    expect(relMaxError(logitsOf(model, fx.ids('input_ids')), fx.get('logits').data)).toBeGreaterThan(1e-4);
  });
});

describe('conversion', () => {
  it('converts to a TP=2 checkpoint that loads to the same logits, and back to identical tensors', async () => {
    const ckpt = path.join(tmp.dir, 'ckpt-tp2');
    await convertHfToMegapatch({ hfDir, output: ckpt, layout: { tp: 2 } });
    const ids = fx.ids('input_ids');
    const fromHf = logitsOf(load(hfDir), ids);
    const loaded = loadModel(ckpt);
    models.push(loaded.model);
    expect(loaded.kind).toBe('megapatch');
    expect(loaded.architecture).toBe('GemmaForCausalLM');
    expect(relMaxError(logitsOf(loaded.model, ids), fromHf)).toBe(0);

    const back = path.join(tmp.dir, 'hf-back');
    await convertMegapatchToHf({ input: ckpt, output: back });
    const a = ShardedSafetensors.open(hfDir);
    const b = ShardedSafetensors.open(back);
    try {
      expect(b.keys().sort()).toEqual(a.keys().sort());
      for (const name of a.keys()) {
        const x = a.read(name);
        const y = b.read(name);
        expect([y.dtype, y.shape], name).toEqual([x.dtype, x.shape]);
        expect(Buffer.compare(y.data, x.data), name).toBe(0);
      }
    } finally {
      a.close();
      b.close();
    }
    const config = JSON.parse(fs.readFileSync(path.join(back, 'config.json'), 'utf8'));
    expect(config.architectures).toEqual(['GemmaForCausalLM']);
  });
});

describe('generation', () => {
  it('greedy generate equals the argmax of recomputing the whole sequence', () => {
    const model = load(hfDir);
    const { rows } = generate(model, [[2]], { maxNewTokens: 5 });
    const tokens = rows[0].tokens;
    expect(tokens).toHaveLength(5);
    const vocab = GEMMA_TEST_CONFIG.vocab_size;
    for (let k = 0; k < tokens.length; k++) {
      const seq = [2, ...tokens.slice(0, k)];
      const logits = logitsOf(model, fromTypedArray(BigInt64Array.from(seq, BigInt), [1, seq.length]));
      const last = logits.subarray((seq.length - 1) * vocab, seq.length * vocab);
      let best = 0;
      for (let v = 1; v < vocab; v++) if (last[v] > last[best]) best = v;
      expect(tokens[k], `token ${k}`).toBe(best);
    }
  });
});

/** Runs an ES module script in a fresh node process in this package; returns its last stdout line as JSON. */
function runChild(script: string, env: Record<string, string> = {}): Record<string, unknown> {
  const stdout = execFileSync(process.execPath, ['--input-type=module', '-e', script], {
    cwd: PKG,
    env: { ...process.env, ...env },
    encoding: 'utf8',
  });
  return JSON.parse(stdout.trim().split('\n').at(-1) as string);
}

describe('two copies of the built package', () => {
  it("register once: the second finds the first one's registration and leaves it", () => {
    const dist = path.join(PKG, 'dist', 'index.js');
    expect(fs.existsSync(dist), 'build the package first (pnpm build)').toBe(true);
    // A query string makes Node load a second instance of the module over the same registries.
    const out = runChild(
      `
      import { getArchitectureSpec } from '@megapatch/convert';
      import { getModelFamily } from '@megapatch/models';
      const url = new URL('./dist/index.js', 'file://' + process.cwd() + '/').href;
      const a = await import(url);
      const b = await import(url + '?copy');
      console.log(JSON.stringify({
        distinct: a.gemmaFamily !== b.gemmaFamily,
        family: getModelFamily('GemmaForCausalLM') === a.gemmaFamily,
        spec: getArchitectureSpec('GemmaForCausalLM') === a.gemmaSpec,
      }));`,
    );
    expect(out).toEqual({ distinct: true, family: true, spec: true });
  });
});

describe('without the plugin', () => {
  it('a fresh process that does not import it calls GemmaForCausalLM unknown, with a hint', () => {
    // Only @megapatch/convert and @megapatch/models, resolved from this package like any user's code.
    const script = `
      import { parseHfConfig } from '@megapatch/convert';
      import { getModelFamily, loadModel } from '@megapatch/models';
      const dir = process.env.GEMMA_DIR;
      const out = {};
      for (const [k, f] of [
        ['family', () => getModelFamily('GemmaForCausalLM')],
        ['config', () => parseHfConfig(dir)],
        ['load', () => loadModel(dir)],
      ]) {
        try { f(); out[k] = null; } catch (e) { out[k] = { code: e.code, message: e.message }; }
      }
      console.log(JSON.stringify(out));`;
    const out = runChild(script, { GEMMA_DIR: hfDir }) as Record<string, { code: string; message: string }>;
    expect(out.family.code).toBe('UNKNOWN_FAMILY');
    expect(out.family.message).toContain('no model family builds "GemmaForCausalLM"');
    expect(out.family.message).toContain('--plugin');
    for (const k of ['config', 'load']) {
      expect(out[k].code, k).toBe('UNKNOWN_ARCHITECTURE');
      expect(out[k].message, k).toContain('unknown architecture "GemmaForCausalLM"; known: ');
      expect(out[k].message, k).toContain('LlamaForCausalLM');
    }
  });
});
