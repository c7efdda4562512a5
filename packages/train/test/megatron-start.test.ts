// A run that starts from a Megatron-LM checkpoint read in place (model.hfConfig: the HF config that
// describes it): from the torch format and the torch_dist format, through model.load and through
// Megatron's --load, it trains exactly as the run that starts from the HF weights the checkpoint was
// cut from (@megapatch/convert's fixtures, written with PyTorch by Megatron's rules).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { megatronFixture } from '@megapatch/test-support';
import { afterAll, describe, expect, it } from 'vitest';
import { parseRunConfig, type RunConfigInput, train } from '../src/index.js';
import { patternCorpus, tempDir } from './helpers.js';

const root = tempDir('mp-train-megatron-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
// ids 10..29 and EOD 2: inside the fixtures' 40-token vocabulary
const data = patternCorpus(path.join(root, 'corpus'), 200, 2, 40);

function config(
  run: string,
  model: Record<string, unknown>,
  checkpoint: Record<string, unknown> = {},
): RunConfigInput {
  return {
    model: { dtype: 'fp32', ...model },
    data: {
      dataPath: [data],
      seqLength: 32,
      split: '90,10,0',
      eodTokenId: 2,
      dataCachePath: path.join(root, 'cache'),
    },
    training: {
      microBatchSize: 2,
      globalBatchSize: 4,
      trainIters: 4,
      logInterval: 100,
      evalInterval: null,
      seed: 5,
    },
    optimizer: { lr: 3e-3, minLr: 3e-4, clipGrad: 1 },
    scheduler: { lrDecayStyle: 'cosine', lrWarmupIters: 1 },
    checkpoint,
    logging: { runDir: path.join(root, run) },
  };
}

describe('training from a Megatron-LM checkpoint read in place', () => {
  it.each(['llama-tp2-pp2', 'llama-dist-tp2'])(
    '%s: the losses of its HF weights, by model.load and by --load',
    async (name) => {
      const { hf, megatron } = megatronFixture(name);
      const want = await train(parseRunConfig(config(`${name}-hf`, { load: hf })));
      const viaModel = await train(parseRunConfig(config(`${name}-model`, { load: megatron, hfConfig: hf })));
      const lines: string[] = [];
      const viaLoad = await train(
        parseRunConfig(config(`${name}-load`, { hfConfig: hf }, { load: megatron })),
        {
          log: (l) => lines.push(l),
        },
      );
      expect(viaModel.losses).toEqual(want.losses);
      expect(viaLoad.losses).toEqual(want.losses);
      expect(viaLoad.iteration).toBe(4);
      expect(
        lines.some((l) =>
          l.includes(
            `checkpoint.load ${megatron} is a Megatron-LM checkpoint: starting from its weights at iteration 0`,
          ),
        ),
      ).toBe(true);
    },
  );

  it('needs model.hfConfig for a Megatron checkpoint, and refuses it for anything else', async () => {
    const { hf, megatron } = megatronFixture('llama-dist-tp2');
    await expect(train(parseRunConfig(config('no-hf', { load: megatron })))).rejects.toThrow(
      `model.load ${megatron} is a Megatron-LM checkpoint: give model.hfConfig (--hf-ckpt-path)`,
    );
    await expect(train(parseRunConfig(config('no-hf-load', {}, { load: megatron })))).rejects.toThrow(
      `checkpoint.load ${megatron} is a Megatron-LM checkpoint: give model.hfConfig (--hf-ckpt-path)`,
    );
    await expect(train(parseRunConfig(config('hf-extra', { load: hf, hfConfig: hf })))).rejects.toThrow(
      `model.hfConfig describes a Megatron-LM checkpoint, but model.load ${hf} is not one: drop it`,
    );
  });
});
