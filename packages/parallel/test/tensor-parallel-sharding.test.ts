// shardOf against the converter: a synthetic Hugging Face checkpoint is converted at TP=1 (the full
// Megatron tensors) and at TP=2; every split tensor's rank-r pieces must be byte for byte
// shardOf(full, partition, {tp: 2, rank: r}), and gatherShards must give the full tensor back.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  Checkpoint,
  type CheckpointTensor,
  concatRows,
  convertHfToMegapatch,
  type Partition,
  parseHfConfig,
  planConversion,
  SafetensorsFile,
  ShardedSafetensors,
} from '@megapatch/convert';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { fromTypedArray, type Tensor, tidy } from '@megapatch/tensor';
import { afterAll, describe, expect, it } from 'vitest';
import { fromTensorData, gatherShards, shardOf, toTensorData } from '../src/tensor-parallel/sharding.js';

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'megapatch-tp-sharding-'));
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

/** What TP rank `r` holds of `t`: its pieces in its file, stacked in row order. */
function rankLocal(ckpt: Checkpoint, t: CheckpointTensor, r: number): Uint8Array {
  const file = `model_rank_tp${r}_pp0_ep0.safetensors`;
  const pieces = t.pieces.filter((p) => p.file === file).sort((a, b) => a.offsets[0] - b.offsets[0]);
  const f = SafetensorsFile.open(path.join(ckpt.dir, file));
  try {
    return concatRows(pieces.map((p) => f.read(p.key))).data;
  } finally {
    f.close();
  }
}

const same = (a: Uint8Array, b: Uint8Array) => Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;

describe('shardOf gives the converter pieces byte for byte', () => {
  const covered = new Set<Partition>();

  for (const id of ['qwen3', 'deepseek-v2']) {
    it(`${id}: every split tensor at TP=2 (BF16)`, async () => {
      const model = SYNTHETIC_MODELS.find((m) => m.id === id);
      if (!model) throw new Error(`no synthetic model ${id}`);
      const hfDir = path.join(tmpRoot, `${id}-hf`);
      writeSyntheticHfCheckpoint(hfDir, model.config, { seed: 7 });
      const tp1 = path.join(tmpRoot, `${id}-tp1`);
      const tp2 = path.join(tmpRoot, `${id}-tp2`);
      await convertHfToMegapatch({ hfDir, output: tp1, layout: { tp: 1 } });
      await convertHfToMegapatch({ hfDir, output: tp2, layout: { tp: 2 } });
      const { spec, transformerConfig: cfg } = parseHfConfig(hfDir);
      const plan = planConversion(spec, cfg, { tp: 2 });
      const qkvDims = {
        numHeads: cfg.numAttentionHeads,
        numQueryGroups: cfg.numQueryGroups,
        headDim: cfg.kvChannels,
      };
      const vocabOpts = { vocabSize: cfg.vocabSize, makeVocabSizeDivisibleBy: cfg.makeVocabSizeDivisibleBy };
      const full1 = Checkpoint.open(tp1);
      const sharded = Checkpoint.open(tp2);
      const hf = ShardedSafetensors.open(hfDir);
      let checked = 0;
      try {
        for (const t of plan.tensors) {
          if (t.partition === 'replicate') continue;
          tidy(() => {
            const info = full1.info(t.name);
            const full = fromTensorData({
              dtype: info.dtype,
              shape: info.globalShape,
              data: full1.read(t.name),
            });
            const opts = { tp: 2, qkvDims, ...vocabOpts };
            const parts: Tensor[] = [];
            for (let r = 0; r < 2; r++) {
              const mine = shardOf(full, t.partition, { ...opts, rank: r });
              expect(
                same(mine.toBytes(), rankLocal(sharded, sharded.info(t.name), r)),
                `${t.name} rank ${r}`,
              ).toBe(true);
              parts.push(mine);
            }
            const back = gatherShards(parts, t.partition, opts);
            if (t.partition === 'vocab') {
              // The unpadded Hugging Face table pads to the same pieces, and unpads back to itself.
              const source = t.rows[0].source as string;
              const table = fromTensorData(hf.read(source));
              for (let r = 0; r < 2; r++) {
                expect(
                  same(shardOf(table, 'vocab', { ...opts, rank: r }).toBytes(), parts[r].toBytes()),
                ).toBe(true);
              }
              expect(same(back.toBytes(), table.toBytes()), t.name).toBe(true);
            } else {
              expect(same(back.toBytes(), full.toBytes()), t.name).toBe(true);
            }
            covered.add(t.partition);
            checked++;
          });
        }
      } finally {
        full1.close();
        sharded.close();
        hf.close();
      }
      expect(checked).toBeGreaterThan(10);
    });
  }

  it('covered qkv, gate_up, split0, split1 and vocab', () => {
    expect([...covered].sort()).toEqual(['gate_up', 'qkv', 'split0', 'split1', 'vocab']);
  });
});

describe('tensor bytes', () => {
  it('round-trip every dtype through TensorData', () => {
    tidy(() => {
      const src = fromTypedArray(new Float32Array([1.5, -2.25, 3, 0.125, -0, 7]), [2, 3]);
      for (const dtype of ['float32', 'float64', 'bfloat16', 'float16', 'int32', 'int64', 'uint8'] as const) {
        const t = src.abs().to(dtype);
        const d = toTensorData(t);
        expect(d.shape).toEqual([2, 3]);
        const back = fromTensorData(d);
        expect(back.dtype).toBe(dtype);
        expect(same(back.toBytes(), t.toBytes())).toBe(true);
      }
    });
  });

  it("rejects a vocab tensor larger than the padded vocabulary and 'qkv' without dims", () => {
    tidy(() => {
      const t = fromTypedArray(new Float32Array(300 * 2), [300, 2]);
      expect(() => shardOf(t, 'vocab', { tp: 2, rank: 0, vocabSize: 100 })).toThrow(
        /larger than the padded vocabulary 256/,
      );
      expect(() => shardOf(t, 'qkv', { tp: 2, rank: 0 })).toThrow(/needs opts.qkvDims/);
    });
  });
});
