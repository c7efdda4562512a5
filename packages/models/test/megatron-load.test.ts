// Megatron-LM checkpoints read in place: with the HF config that describes the model, a checkpoint
// in the torch format (rank files of any TP/PP/EP layout) or the torch_dist format (stacked or
// per-layer keys) loads as the model of the HF weights it was cut from. The checkpoints are
// @megapatch/convert's fixtures, written with PyTorch by Megatron's rules from those HF weights.
import * as path from 'node:path';
import { fromTypedArray, memoryStats, noGrad, type Tensor, tidy } from '@megapatch/tensor';
import { hfBinFixture, megatronFixture } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';
import { type GPTModel, loadModel } from '../src/index.js';

const ids = fromTypedArray(BigInt64Array.from([1, 5, 9, 33, 17, 7, 8, 39], BigInt), [2, 4]);

function logitsOf(m: GPTModel): Float32Array {
  return noGrad(() =>
    tidy(() => {
      const l = m.forward(ids).logits as Tensor;
      return m.gatherLogits(l).contiguous().to('float32').toTypedArray() as Float32Array;
    }),
  );
}

describe('a Megatron-LM checkpoint loads in place with its HF config', () => {
  it.each([
    ['llama-tp2-pp2', 'torch format, TP2 x PP2, TE names'],
    ['qwen2-pp2-vpp2', 'torch format, tied, PP2 x 2 virtual stages, local names'],
    ['mixtral-ep2', 'torch format, EP2, grouped experts'],
    ['llama-dist-tp2', 'torch_dist, stacked layers'],
    ['mixtral-dist-tp2-ep2', 'torch_dist, stacked experts'],
    ['qwen2-dist-singleton', 'torch_dist, a key per layer, fc1 halves'],
  ])('%s (%s): the logits of its HF weights', (name) => {
    const { hf, megatron } = megatronFixture(name);
    const before = memoryStats('cpu').liveBytes;
    const fromHf = loadModel(hf);
    const fromMegatron = loadModel(megatron, { hfConfig: hf });
    expect(fromMegatron.kind).toBe('megatron');
    expect(fromMegatron.architecture).toBe(fromHf.architecture);
    expect(fromMegatron.tokenizerDir).toBe(null); // the fixture's HF folder has no tokenizer
    expect(logitsOf(fromMegatron.model)).toEqual(logitsOf(fromHf.model));
    fromHf.model.dispose();
    fromMegatron.model.dispose();
    expect(memoryStats('cpu').liveBytes).toBe(before);
  });

  it('without the HF config says both routes; with it, refuses a folder that is not Megatron', () => {
    const { hf, megatron: root } = megatronFixture('llama-dist-tp2');
    for (const dir of [root, path.join(root, 'iter_0000005')]) {
      expect(() => loadModel(dir)).toThrow(
        /in the torch_dist format .* convert it with `megapatch convert megatron-to-megapatch .*`, or read it as it is with the HF config \(hfConfig; --hf-dir on the command line\)/,
      );
    }
    expect(() => loadModel(hf, { hfConfig: hf })).toThrow(
      `${hf} is not a Megatron-LM checkpoint (torch or torch_dist format); hfConfig is only for those`,
    );
  });
});

describe('a Hugging Face folder with PyTorch weights (pytorch_model.bin)', () => {
  it('loads as its safetensors twin: the same logits, the same memory after', () => {
    // fixtures/hf-bin/llama: llama-tp2-pp2's HF weights torch.save-d, with views and transposed storages
    const { hf } = megatronFixture('llama-tp2-pp2');
    const before = memoryStats('cpu').liveBytes;
    const fromSafetensors = loadModel(hf);
    const fromPickles = loadModel(hfBinFixture('llama'));
    expect(fromPickles.kind).toBe('hf');
    expect(fromPickles.architecture).toBe('LlamaForCausalLM');
    expect(logitsOf(fromPickles.model)).toEqual(logitsOf(fromSafetensors.model));
    fromSafetensors.model.dispose();
    fromPickles.model.dispose();
    expect(memoryStats('cpu').liveBytes).toBe(before);
  });
});
