// HfMegatronView reads an HF folder as the Megatron tensors of its plan: every box equals the same
// box of the checkpoint the converter writes. Also the sliding-window settings of the dense specs
// and CheckpointWriter's side files.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  Checkpoint,
  CheckpointWriter,
  convertHfToMegapatch,
  HF_FILES_DIR,
  HfMegatronView,
  parseHfConfig,
} from '../src/index.js';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '../src/testing/index.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'megapatch-hfview-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function synthetic(id: string): Record<string, unknown> {
  const m = SYNTHETIC_MODELS.find((x) => x.id === id);
  if (!m) throw new Error(id);
  return m.config;
}

describe.each(['llama-tied', 'qwen2-moe', 'deepseek-v3'])('HfMegatronView of %s', (id) => {
  it('gives the bytes of the converted checkpoint for whole tensors and boxes', async () => {
    const hf = path.join(tmp, `hf-${id}`);
    writeSyntheticHfCheckpoint(hf, synthetic(id));
    const root = path.join(tmp, `ck-${id}`);
    await convertHfToMegapatch({ hfDir: hf, output: root });
    const view = HfMegatronView.open(hf);
    const ck = Checkpoint.open(root);
    expect(view.tensorNames()).toEqual(ck.tensorNames());
    expect(view.architecture).toBe(ck.metadata.architecture);
    for (const name of view.tensorNames()) {
      const a = view.info(name);
      const b = ck.info(name);
      expect(a.dtype, name).toBe(b.dtype);
      expect(a.globalShape, name).toEqual(b.globalShape);
      expect(
        Buffer.compare(
          view.readSlice(
            name,
            a.globalShape.map(() => 0),
            a.globalShape,
          ),
          ck.read(name),
        ),
        name,
      ).toBe(0);
      if (a.globalShape.length === 2 && a.globalShape[0] > 3 && a.globalShape[1] > 3) {
        const offsets = [1, 2];
        const shape = [a.globalShape[0] - 3, a.globalShape[1] - 3];
        expect(
          Buffer.compare(view.readSlice(name, offsets, shape), ck.readSlice(name, offsets, shape)),
          name,
        ).toBe(0);
      }
    }
    expect(() => view.info('nope')).toThrow(/no Megatron tensor "nope"/);
    expect(() => view.readSlice('decoder.final_layernorm.weight', [0], [1e6])).toThrow(/outside/);
    view.close();
    ck.close();
  });
});

describe('sliding window', () => {
  const cfg = (id: string, extra: Record<string, unknown>) =>
    parseHfConfig({ ...synthetic(id), ...extra }).transformerConfig;
  it('Mistral applies sliding_window (4096 when absent, none when null or 0)', () => {
    expect(cfg('mistral', { sliding_window: 128 }).slidingWindow).toBe(128);
    const { sliding_window: _, ...noField } = synthetic('mistral');
    expect(parseHfConfig(noField).transformerConfig.slidingWindow).toBe(4096);
    expect(cfg('mistral', { sliding_window: null }).slidingWindow).toBeNull();
    expect(cfg('mistral', { sliding_window: 0 }).slidingWindow).toBeNull();
  });
  it('Qwen applies it only with use_sliding_window, and refuses a window in some layers only', () => {
    expect(cfg('qwen2', { use_sliding_window: false, sliding_window: 64 }).slidingWindow).toBeNull();
    expect(
      cfg('qwen2', { use_sliding_window: true, sliding_window: 64, max_window_layers: 0 }).slidingWindow,
    ).toBe(64);
    expect(
      cfg('qwen2', { use_sliding_window: true, sliding_window: 64, max_window_layers: 4 }).slidingWindow,
    ).toBeNull();
    expect(() =>
      cfg('qwen2', { use_sliding_window: true, sliding_window: 64, max_window_layers: 2 }),
    ).toThrow(/a sliding window in layers 2\.\. only is not supported/);
    expect(cfg('llama', { sliding_window: 64 }).slidingWindow).toBeNull();
  });
});

describe('CheckpointWriter.addFile', () => {
  it('writes side files into huggingface/ and records them', () => {
    const root = path.join(tmp, 'side');
    const w = new CheckpointWriter(root, 0, {
      layout: { tp: 1, pp: 1, ep: 1, etp: 1, dp: 1 },
      modelConfig: {},
    });
    w.addPiece('x', { dtype: 'F32', globalShape: [1], offsets: [0], shape: [1], data: new Uint8Array(4) });
    w.addFile('config.json', '{"a":1}');
    const meta = w.finalize();
    expect(meta.huggingface?.files).toEqual(['config.json']);
    expect(fs.readFileSync(path.join(root, 'iter_0000000', HF_FILES_DIR, 'config.json'), 'utf8')).toBe(
      '{"a":1}',
    );
  });
});
