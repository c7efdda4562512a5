// Hugging Face folders whose weights are PyTorch pickles (pytorch_model.bin, or shards with
// pytorch_model.bin.index.json), written by the real torch.save (fixtures/hf-bin/make-hf-bin.py,
// torch 1.13) from the weights of the tiny safetensors models in fixtures/megatron/<name>/hf: each
// must convert, byte for byte, as its safetensors twin does, through every reader of HF folders.
import fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { Checkpoint } from '../src/checkpoint/index.js';
import {
  castElements,
  convertHfToMegapatch,
  convertMegapatchToHf,
  HfMegatronView,
  openHfWeights,
  PYTORCH_INDEX_FILE,
  PYTORCH_SINGLE_FILE,
  TorchBinWeights,
} from '../src/mapping/index.js';
import { ShardedSafetensors } from '../src/safetensors/sharded.js';
import { TorchFileWriter } from '../src/torch/torch-file.js';
import { convertError, expectError, expectSameCheckpoints, scratch } from './helpers.js';

const FIXTURES = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures');
const tmp = scratch('hf-bin');

interface Case {
  readonly name: string;
  /** The safetensors twin (same config.json, same weights). */
  readonly twin: string;
  /** The dtype the pickles were saved in, when the twin's differs (the twin is cast to it). */
  readonly dtype?: 'F32';
}
const CASES: Case[] = [
  { name: 'llama', twin: 'llama-tp2-pp2' },
  { name: 'qwen2-sharded', twin: 'qwen2-pp2-vpp2', dtype: 'F32' },
];
const binDir = (c: Case) => path.join(FIXTURES, 'hf-bin', c.name);
const twinDir = (c: Case) => path.join(FIXTURES, 'megatron', c.twin, 'hf');

/** A copy of `from` with its weight files changed by `edit` (a scratch folder). */
function copyOf(from: string, label: string, edit: (dir: string) => void = () => {}): string {
  const dir = tmp(label);
  fs.cpSync(from, dir, { recursive: true });
  edit(dir);
  return dir;
}

describe.each(CASES)('PyTorch weights of an HF folder: $name', (c) => {
  it('hold the tensors of the safetensors twin (names, shapes, values)', () => {
    using bin = openHfWeights(binDir(c));
    using st = ShardedSafetensors.open(twinDir(c));
    expect(bin).toBeInstanceOf(TorchBinWeights);
    const tied = bin.has('lm_head.weight') && !st.has('lm_head.weight');
    expect(bin.keys().sort()).toEqual([...st.keys(), ...(tied ? ['lm_head.weight'] : [])].sort());
    for (const k of st.keys()) {
      const want = st.read(k);
      const got = bin.read(k);
      expect(got.dtype, k).toBe(c.dtype ?? want.dtype);
      expect(got.shape, k).toEqual(want.shape);
      expect(Buffer.from(got.data).equals(castElements(want.data, want.dtype, got.dtype, k)), k).toBe(true);
      // rows, as the converters stream them
      const rows = want.shape[0] ?? 0;
      if (want.shape.length > 0 && rows > 2) {
        const r = bin.readRows(k, 1, rows - 2);
        const full = bin.read(k).data;
        const rowBytes = full.byteLength / rows;
        expect(r.shape).toEqual([rows - 2, ...want.shape.slice(1)]);
        expect(Buffer.from(r.data).equals(full.subarray(rowBytes, rowBytes * (rows - 1))), k).toBe(true);
      }
    }
    expect(bin.files()).toEqual(
      c.name === 'llama'
        ? [PYTORCH_SINGLE_FILE]
        : ['pytorch_model-00001-of-00002.bin', 'pytorch_model-00002-of-00002.bin'],
    );
  });

  it.each([{}, { tp: 2, pp: 2 }])(
    'convert to the checkpoint the safetensors give (layout %o)',
    async (layout) => {
      const got = tmp(`${c.name}-bin-${layout.tp ?? 1}`);
      await convertHfToMegapatch({ hfDir: binDir(c), output: got, layout });
      const want = tmp(`${c.name}-st-${layout.tp ?? 1}`);
      await convertHfToMegapatch({
        hfDir: twinDir(c),
        output: want,
        layout,
        ...(c.dtype ? { dtype: c.dtype } : {}),
      });
      expectSameCheckpoints(got, want);
    },
  );

  it('read in place as the safetensors twin (HfMegatronView, as loadModel reads an HF folder)', () => {
    using got = {
      v: HfMegatronView.open(binDir(c)),
      [Symbol.dispose]() {
        this.v.close();
      },
    };
    using want = {
      v: HfMegatronView.open(twinDir(c)),
      [Symbol.dispose]() {
        this.v.close();
      },
    };
    expect(got.v.tensorNames()).toEqual(want.v.tensorNames());
    for (const n of want.v.tensorNames()) {
      const w = want.v.info(n);
      const g = got.v.info(n);
      expect(g.globalShape, n).toEqual(w.globalShape);
      const offsets = w.globalShape.map(() => 0);
      const a = got.v.readSlice(n, offsets, w.globalShape);
      const b = castElements(want.v.readSlice(n, offsets, w.globalShape), w.dtype, g.dtype, n);
      expect(Buffer.from(a).equals(Buffer.from(b)), n).toBe(true);
    }
  });
});

describe('PyTorch weights of an HF folder: around the files', () => {
  const llama = CASES[0];
  const qwen = CASES[1];

  it('take second place to safetensors in the same folder, as in transformers', async () => {
    // a folder with both: the pickles are not even opened (this one is not a torch file)
    const dir = copyOf(twinDir(llama), 'both', (d) =>
      fs.writeFileSync(path.join(d, PYTORCH_SINGLE_FILE), 'junk'),
    );
    using w = openHfWeights(dir);
    expect(w).toBeInstanceOf(ShardedSafetensors);
  });

  it('are not carried into the export: the index of the pickles is left behind', async () => {
    const ck = tmp('carry-ckpt');
    await convertHfToMegapatch({ hfDir: binDir(qwen), output: ck });
    const out = tmp('carry-hf');
    await convertMegapatchToHf({ input: ck, output: out });
    const files = fs.readdirSync(out).sort();
    expect(files).toContain('config.json');
    expect(files).toContain('model.safetensors');
    expect(files.filter((f) => f.startsWith('pytorch_model'))).toEqual([]);
    using back = ShardedSafetensors.open(out);
    using bin = openHfWeights(binDir(qwen));
    for (const k of back.keys())
      expect(Buffer.from(back.read(k).data).equals(Buffer.from(bin.read(k).data)), k).toBe(true);
    using ckpt = Checkpoint.open(ck);
    expect(ckpt.info('embedding.word_embeddings.weight').dtype).toBe('F32');
  });

  it('name a shard the index lists but the folder lacks', async () => {
    const dir = copyOf(binDir(qwen), 'no-shard', (d) =>
      fs.rmSync(path.join(d, 'pytorch_model-00002-of-00002.bin')),
    );
    const e = await convertError(
      () => convertHfToMegapatch({ hfDir: dir, output: tmp('o1') }),
      'MISSING_FILE',
      PYTORCH_INDEX_FILE,
    );
    expect(e.file).toBe('pytorch_model-00002-of-00002.bin');
  });

  it('name a tensor the index places in a shard that does not hold it', () => {
    const dir = copyOf(binDir(qwen), 'moved', (d) => {
      const f = path.join(d, PYTORCH_INDEX_FILE);
      const j = JSON.parse(fs.readFileSync(f, 'utf8'));
      j.weight_map['model.norm.weight'] =
        j.weight_map['model.norm.weight'] === 'pytorch_model-00001-of-00002.bin'
          ? 'pytorch_model-00002-of-00002.bin'
          : 'pytorch_model-00001-of-00002.bin';
      fs.writeFileSync(f, JSON.stringify(j));
    });
    expectError(() => openHfWeights(dir), 'MISSING_TENSOR', 'model.norm.weight', PYTORCH_INDEX_FILE);
  });

  it('refuse a shard name that leaves the folder', () => {
    const dir = copyOf(binDir(qwen), 'escape', (d) => {
      const f = path.join(d, PYTORCH_INDEX_FILE);
      const j = JSON.parse(fs.readFileSync(f, 'utf8'));
      j.weight_map['model.norm.weight'] = '../../etc/passwd';
      fs.writeFileSync(f, JSON.stringify(j));
    });
    expectError(() => openHfWeights(dir), 'INVALID_FORMAT', 'not a plain file name', PYTORCH_INDEX_FILE);
  });

  it('refuse a torch file that is not a state dict, saying what it holds', () => {
    const dir = copyOf(twinDir(llama), 'training-ckpt', (d) => {
      fs.rmSync(path.join(d, 'model.safetensors'));
      const w = new TorchFileWriter(path.join(d, PYTORCH_SINGLE_FILE));
      const t = w.tensor('F32', [2]);
      w.writeRoot(
        new Map<string, unknown>([
          ['model', new Map([['w', t]])],
          ['iteration', 3],
        ]),
      );
      w.write(t, new Uint8Array(8));
      w.finish();
    });
    expectError(
      () => openHfWeights(dir),
      'INVALID_FORMAT',
      'its entry "model" is a dict, not a tensor',
      PYTORCH_SINGLE_FILE,
    );
  });

  it('name a truncated pickle', async () => {
    const dir = copyOf(binDir(llama), 'truncated', (d) => {
      const f = path.join(d, PYTORCH_SINGLE_FILE);
      fs.truncateSync(f, fs.statSync(f).size - 100);
    });
    const e = await convertError(
      () => convertHfToMegapatch({ hfDir: dir, output: tmp('o2') }),
      'TRUNCATED_FILE',
      'truncated',
    );
    expect(e.file).toContain(PYTORCH_SINGLE_FILE);
    expect(fs.existsSync(tmp('o2'))).toBe(false);
  });

  it('say what is missing in a folder with no weights, and what other files are not', () => {
    const dir = copyOf(twinDir(llama), 'meta', (d) => {
      fs.rmSync(path.join(d, 'model.safetensors'));
      fs.writeFileSync(path.join(d, 'consolidated.00.pth'), 'x');
    });
    expectError(
      () => openHfWeights(dir),
      'MISSING_FILE',
      `no model.safetensors, model.safetensors.index.json, ${PYTORCH_SINGLE_FILE} or ${PYTORCH_INDEX_FILE}`,
      "consolidated.00.pth is not a Hugging Face model's weights",
    );
  });
});
