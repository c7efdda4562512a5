// verifyCheckpoint(): besides every piece's presence, shape and checksum, a checkpoint that records
// its architecture must list every tensor that architecture's plan needs, with the planned shape.
import fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Checkpoint, convertHfToMegapatch, verifyCheckpoint } from '../src/index.js';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '../src/testing/index.js';
import { convertError, scratch } from './helpers.js';

const tmp = scratch('verify');
const config = (id: string) => SYNTHETIC_MODELS.find((m) => m.id === id)?.config as Record<string, unknown>;

/** Converts synthetic model `id` and returns the checkpoint root and its metadata.json path. */
async function converted(id: string, layout = { tp: 2 }): Promise<{ root: string; meta: string }> {
  const hf = tmp(`${id}-hf`);
  writeSyntheticHfCheckpoint(hf, config(id), { seed: 3 });
  const root = tmp(`${id}-mp`);
  await convertHfToMegapatch({ hfDir: hf, output: root, layout });
  return { root, meta: path.join(root, 'iter_0000000', 'metadata.json') };
}

function editMetadata(
  file: string,
  edit: (m: { tensors: Record<string, { globalShape: number[] }> }) => void,
) {
  const m = JSON.parse(fs.readFileSync(file, 'utf8'));
  edit(m);
  fs.writeFileSync(file, JSON.stringify(m));
}

describe('verifyCheckpoint', () => {
  it('accepts complete conversions of every architecture (vocabulary padded for TP=2)', async () => {
    for (const id of ['llama', 'qwen3-moe', 'deepseek-v3']) {
      const { root } = await converted(id, { tp: 2 });
      using ck = Checkpoint.open(root);
      const v = verifyCheckpoint(ck);
      expect(v.architectureChecked, id).toBe(ck.metadata.architecture);
      expect(v.checksummedPieces).toBe(v.pieces);
      expect(ck.info('embedding.word_embeddings.weight').globalShape[0] % 256).toBe(0);
    }
  });

  it('names the first tensor (in plan order) missing from metadata.json, and counts the others', async () => {
    const { root, meta } = await converted('llama');
    editMetadata(meta, (m) => {
      delete m.tensors['decoder.final_layernorm.weight'];
    });
    using ck = Checkpoint.open(root);
    const e = await convertError(
      () => verifyCheckpoint(ck),
      'MISSING_TENSOR',
      'metadata.json: checkpoint lacks tensor "decoder.final_layernorm.weight" that LlamaForCausalLM needs',
    );
    expect(e.message).not.toContain('more)');
    expect(e.message).toContain('save or convert it again');
    editMetadata(meta, (m) => {
      delete m.tensors['decoder.layers.3.mlp.linear_fc2.weight'];
      delete m.tensors['output_layer.weight'];
    });
    using ck2 = Checkpoint.open(root);
    await convertError(
      () => verifyCheckpoint(ck2),
      'MISSING_TENSOR',
      'metadata.json: checkpoint lacks tensor "decoder.final_layernorm.weight" (and 2 more) that LlamaForCausalLM needs',
    );
  });

  it('names a tensor whose global shape disagrees with the recorded model config', async () => {
    const { root, meta } = await converted('llama', { tp: 1 });
    // A consistent tiling of a wrong shape: the piece and the global shape agree, the plan does not.
    editMetadata(meta, (m) => {
      const t = m.tensors['decoder.final_layernorm.weight'] as unknown as {
        globalShape: number[];
        pieces: { shape: number[] }[];
      };
      t.globalShape = [32];
      t.pieces[0].shape = [32];
    });
    using ck = Checkpoint.open(root);
    await convertError(
      () => verifyCheckpoint(ck),
      'SHAPE_MISMATCH',
      'metadata.json: tensor decoder.final_layernorm.weight has global shape [32], the model config implies [64]',
    );
  });

  it('checks only pieces when metadata records no architecture', async () => {
    const { root, meta } = await converted('llama');
    editMetadata(meta, (m) => {
      delete (m as { architecture?: string }).architecture;
      delete m.tensors['decoder.final_layernorm.weight'];
    });
    using ck = Checkpoint.open(root);
    expect(verifyCheckpoint(ck).architectureChecked).toBeNull();
  });
});
