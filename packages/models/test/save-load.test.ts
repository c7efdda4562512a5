// Saving and loading: a saved checkpoint exports to the original Hugging Face bytes, any layout
// loads on one process, and weights of another model are refused with a clear error.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  convertHfToMegapatch,
  convertMegapatchToHf,
  ShardedSafetensors,
  writeSafetensors,
} from '@megapatch/convert';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { fromTypedArray, noGrad, type Tensor } from '@megapatch/tensor';
import { afterAll, describe, expect, it } from 'vitest';
import { type GPTModel, loadModel, loadWeights, openWeights, saveModel } from '../src/index.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-save-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const ids = fromTypedArray(BigInt64Array.from([1, 5, 9, 33, 100, 7, 8, 9], BigInt), [2, 4]);

function logitsOf(m: GPTModel): Float32Array {
  return noGrad(() => {
    const l = m.forward(ids).logits as Tensor;
    return m.gatherLogits(l).contiguous().to('float32').toTypedArray() as Float32Array;
  });
}

function hfFolder(id: string, dtype: 'BF16' | 'F32'): string {
  const dir = path.join(tmp, `hf-${id}-${dtype}`);
  if (!fs.existsSync(dir)) {
    const m = SYNTHETIC_MODELS.find((x) => x.id === id);
    writeSyntheticHfCheckpoint(dir, m?.config as Record<string, unknown>, { dtype });
  }
  return dir;
}

function sideFiles(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of fs.readdirSync(dir))
    if (f.endsWith('.json') && !f.includes('index')) out[f] = path.join(dir, f);
  return out;
}

describe.each([
  ['llama-tied', 'F32'],
  ['qwen2-moe', 'BF16'],
  ['deepseek-v3', 'BF16'],
] as const)('%s in %s', (id, dtype) => {
  it('saveModel writes a checkpoint that exports bit-identically to the original', async () => {
    const hf = hfFolder(id, dtype);
    const { model, architecture } = loadModel(hf, { dtype: dtype === 'BF16' ? 'bfloat16' : 'float32' });
    const root = path.join(tmp, `ckpt-${id}`);
    saveModel(model, root, { architecture, huggingfaceFiles: sideFiles(hf) });
    const out = path.join(tmp, `export-${id}`);
    await convertMegapatchToHf({ input: root, output: out });
    const a = ShardedSafetensors.open(hf);
    const b = ShardedSafetensors.open(out);
    expect(b.keys().sort()).toEqual(a.keys().sort());
    for (const k of a.keys()) {
      const x = a.read(k);
      const y = b.read(k);
      expect(y.dtype, k).toBe(x.dtype);
      expect(Buffer.compare(x.data, y.data), k).toBe(0);
    }
    a.close();
    b.close();
    // and it loads back to the same logits
    const again = loadModel(root, { dtype: dtype === 'BF16' ? 'bfloat16' : 'float32' });
    expect(logitsOf(again.model)).toEqual(logitsOf(model));
    again.model.dispose();
    model.dispose();
  });

  it('a checkpoint converted with TP=2 (EP=2) loads on one process', async () => {
    const hf = hfFolder(id, dtype);
    const root = path.join(tmp, `tp2-${id}`);
    await convertHfToMegapatch({
      hfDir: hf,
      output: root,
      layout: { tp: 2, ep: id === 'llama-tied' ? 1 : 2 },
    });
    const direct = loadModel(hf);
    const fromCkpt = loadModel(root);
    expect(fromCkpt.kind).toBe('megapatch');
    expect(logitsOf(fromCkpt.model)).toEqual(logitsOf(direct.model));
    direct.model.dispose();
    fromCkpt.model.dispose();
  });
});

describe('bad weights', () => {
  it('refuses another architecture with one line', () => {
    const w = openWeights(hfFolder('qwen2-moe', 'BF16'));
    const { model } = loadModel(hfFolder('llama-tied', 'F32'));
    expect(() => loadWeights(model, w)).toThrow(
      /the weights are a Qwen2MoeForCausalLM with numLayers|with hiddenSize|with ffnHiddenSize|with numAttentionHeads/,
    );
    w.source.close();
    expect(() => loadModel(hfFolder('llama-tied', 'F32'), { architecture: 'Qwen3ForCausalLM' })).toThrow(
      /holds a LlamaForCausalLM, expected a Qwen3ForCausalLM/,
    );
    model.dispose();
  });

  it('names a folder that is neither format', () => {
    const empty = path.join(tmp, 'empty');
    fs.mkdirSync(empty, { recursive: true });
    expect(() => loadModel(empty)).toThrow(/neither a Hugging Face folder .* nor a megapatch checkpoint/);
    expect(() => loadModel(path.join(tmp, 'missing'))).toThrow(/no such model directory/);
  });

  it('says how to convert a Megatron-LM checkpoint, in either format', () => {
    // the torch format: rank folders, whether the root or the iteration folder is given
    const megatron = path.join(tmp, 'megatron');
    fs.mkdirSync(path.join(megatron, 'iter_0000007', 'mp_rank_00_000'), { recursive: true });
    fs.writeFileSync(path.join(megatron, 'latest_checkpointed_iteration.txt'), '7');
    for (const dir of [megatron, path.join(megatron, 'iter_0000007')]) {
      expect(() => loadModel(dir)).toThrow(
        `is a Megatron-LM checkpoint in the torch format (mp_rank_*/model_optim_rng.pt), not a megapatch checkpoint: convert it with \`megapatch convert megatron-to-megapatch --load ${megatron} --hf-dir`,
      );
    }
    // torch_dist: PyTorch distributed checkpoint files and Megatron's metadata.json
    const dist = path.join(tmp, 'megatron-dist');
    fs.mkdirSync(path.join(dist, 'iter_0000002'), { recursive: true });
    fs.writeFileSync(path.join(dist, 'latest_checkpointed_iteration.txt'), '2');
    fs.writeFileSync(path.join(dist, 'iter_0000002', 'metadata.json'), '{"sharded_backend": "torch_dist"}');
    fs.writeFileSync(path.join(dist, 'iter_0000002', '__0_0.distcp'), '');
    expect(() => loadModel(dist)).toThrow(
      `is a Megatron-LM checkpoint in the torch_dist format (.metadata, *.distcp, common.pt), not a megapatch checkpoint: convert it with \`megapatch convert megatron-to-megapatch --load ${dist} --hf-dir`,
    );
  });

  it('names a missing tensor', () => {
    const dir = path.join(tmp, 'broken');
    const m = SYNTHETIC_MODELS.find((x) => x.id === 'llama-tied');
    const tensors = writeSyntheticHfCheckpoint(dir, m?.config as Record<string, unknown>, {
      maxShardSize: '1GB',
    });
    tensors.delete('model.layers.1.mlp.up_proj.weight');
    writeSafetensors(path.join(dir, 'model.safetensors'), tensors);
    expect(() => loadModel(dir)).toThrow(/tensor model\.layers\.1\.mlp\.up_proj\.weight is missing/);
  });
});
