import fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  Checkpoint,
  type CheckpointLayout,
  CheckpointWriter,
  ConvertError,
  DTYPE_SIZE,
  iterationDirName,
  LATEST_ITERATION_FILE,
  pieceFileName,
  type Region,
  type SafetensorsDtype,
  writeSafetensors,
} from '../src/index.js';

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'megapatch-ckpt-'));
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
let counter = 0;
const tmp = () => path.join(tmpRoot, String(counter++));

const LAYOUT: CheckpointLayout = { tp: 2, pp: 1, ep: 1, etp: 1, dp: 1 };
const MODEL_CONFIG = { numLayers: 2, hiddenSize: 8 };

// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
function randomBytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed | 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

const numel = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);

// Reference slicer, element by element, independent of the code under test.
function sliceRef(data: Uint8Array, global: readonly number[], esz: number, r: Region): Uint8Array {
  const out = new Uint8Array(numel(r.shape) * esz);
  const n = numel(r.shape);
  for (let i = 0; i < n; i++) {
    let rest = i;
    let flat = 0;
    let stride = 1;
    for (let d = r.shape.length - 1; d >= 0; d--) {
      const idx = rest % r.shape[d];
      rest = Math.floor(rest / r.shape[d]);
      flat += (r.offsets[d] + idx) * stride;
      stride *= global[d];
    }
    out.set(data.subarray(flat * esz, flat * esz + esz), i * esz);
  }
  return out;
}

// Splits `global` into `n` contiguous chunks along `dim` (the last ones smaller when uneven).
function split(global: readonly number[], dim: number, n: number): Region[] {
  const size = Math.ceil(global[dim] / n);
  const out: Region[] = [];
  for (let k = 0; k < n; k++) {
    const start = Math.min(k * size, global[dim]);
    const end = Math.min(start + size, global[dim]);
    out.push({
      offsets: global.map((_, d) => (d === dim ? start : 0)),
      shape: global.map((g, d) => (d === dim ? end - start : g)),
    });
  }
  return out;
}

interface Original {
  dtype: SafetensorsDtype;
  shape: number[];
  data: Uint8Array;
  /** Dim split across TP=2 ranks, or null when replicated. */
  splitDim: number | null;
}

function originals(): Map<string, Original> {
  const specs: [string, SafetensorsDtype, number[], number | null][] = [
    ['embedding.word_embeddings.weight', 'F32', [8, 6], 0],
    ['decoder.layers.0.self_attention.linear_proj.weight', 'BF16', [4, 10], 1],
    ['decoder.layers.0.mlp.linear_fc1.weight', 'F32', [6, 4, 5], 1],
    ['decoder.layers.0.self_attention.linear_qkv.bias', 'BF16', [12], 0],
    ['decoder.final_layernorm.weight', 'F32', [7], null],
    ['decoder.layers.0.extra', 'BF16', [3, 5, 4], null],
    ['decoder.layers.0.uneven', 'F32', [5, 3], 0],
  ];
  const m = new Map<string, Original>();
  specs.forEach(([name, dtype, shape, splitDim], i) => {
    m.set(name, { dtype, shape, splitDim, data: randomBytes(numel(shape) * DTYPE_SIZE[dtype], 1000 + i) });
  });
  return m;
}

function save(root: string, tensors: Map<string, Original>, iteration = 100): CheckpointWriter {
  const w = new CheckpointWriter(root, iteration, {
    layout: LAYOUT,
    modelConfig: MODEL_CONFIG,
    consumedSamples: 3200,
  });
  for (const [name, t] of tensors) {
    const boxes = t.splitDim === null ? split(t.shape, 0, 1) : split(t.shape, t.splitDim, 2);
    boxes.forEach((b, tp) => {
      w.addPiece(name, {
        dtype: t.dtype,
        globalShape: t.shape,
        ...b,
        data: sliceRef(t.data, t.shape, DTYPE_SIZE[t.dtype], b),
        rank: { tp, pp: 0, ep: 0 },
      });
    });
  }
  return w;
}

function expectError(f: () => unknown, code: string, ...mentions: string[]): void {
  let err: unknown;
  try {
    f();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(ConvertError);
  expect((err as ConvertError).code).toBe(code);
  for (const m of mentions) expect((err as ConvertError).message).toContain(m);
}

describe('checkpoint round trip', () => {
  const root = tmp();
  const tensors = originals();
  save(root, tensors).finalize();

  it('uses the Megatron directory and tracker names', () => {
    expect(iterationDirName(100)).toBe('iter_0000100');
    expect(fs.readdirSync(root).sort()).toEqual(['iter_0000100', LATEST_ITERATION_FILE]);
    expect(fs.readFileSync(path.join(root, LATEST_ITERATION_FILE), 'utf8').trim()).toBe('100');
    expect(fs.readdirSync(path.join(root, 'iter_0000100')).sort()).toEqual([
      'metadata.json',
      pieceFileName({ tp: 0, pp: 0, ep: 0 }),
      pieceFileName({ tp: 1, pp: 0, ep: 0 }),
    ]);
  });

  it('reads every tensor back whole, bit-identical', () => {
    using ck = Checkpoint.open(root);
    expect(ck.iteration).toBe(100);
    expect(ck.tensorNames()).toEqual([...tensors.keys()].sort());
    for (const [name, t] of tensors) {
      const info = ck.info(name);
      expect(info.dtype).toBe(t.dtype);
      expect(info.globalShape).toEqual(t.shape);
      expect(info.pieces.length).toBe(t.splitDim === null ? 1 : 2);
      expect(Buffer.from(ck.read(name)).equals(Buffer.from(t.data))).toBe(true);
    }
  });

  it('reads slices for TP=1..4 along every dim, bit-identical to slicing the original', () => {
    using ck = Checkpoint.open(root, { iteration: 100 });
    let checked = 0;
    for (const [name, t] of tensors) {
      for (let dim = 0; dim < t.shape.length; dim++) {
        for (const n of [1, 2, 3, 4]) {
          for (const box of split(t.shape, dim, n)) {
            const got = ck.readSlice(name, box.offsets, box.shape);
            const want = sliceRef(t.data, t.shape, DTYPE_SIZE[t.dtype], box);
            expect(Buffer.from(got).equals(Buffer.from(want)), `${name} dim ${dim} n ${n}`).toBe(true);
            checked++;
          }
        }
      }
    }
    expect(checked).toBeGreaterThan(100);
  });

  it('reads an arbitrary interior box spanning pieces', () => {
    using ck = Checkpoint.open(root);
    const name = 'decoder.layers.0.mlp.linear_fc1.weight';
    const t = tensors.get(name) as Original;
    const box = { offsets: [1, 1, 2], shape: [4, 2, 3] };
    expect(Buffer.from(ck.readSlice(name, box.offsets, box.shape))).toEqual(
      Buffer.from(sliceRef(t.data, t.shape, 4, box)),
    );
    expectError(() => ck.readSlice(name, [0, 0, 0], [7, 4, 5]), 'INVALID_ARGUMENT', name);
    expectError(() => ck.info('nope'), 'MISSING_TENSOR', 'nope');
  });

  it('summarizes with inspect()', () => {
    using ck = Checkpoint.open(root);
    const s = ck.inspect();
    expect(s.iteration).toBe(100);
    expect(s.consumedSamples).toBe(3200);
    expect(s.layout).toEqual(LAYOUT);
    expect(s.tensorCount).toBe(tensors.size);
    const all = [...tensors.values()];
    expect(s.parameterCount).toBe(all.reduce((a, t) => a + numel(t.shape), 0));
    expect(s.bytes).toBe(all.reduce((a, t) => a + t.data.byteLength, 0));
    expect(s.dtypes).toEqual({ F32: 4, BF16: 3 });
    ck.verify();
  });

  it('reshards: slices read for TP=4 (and TP=1) written as new checkpoints read back equal', () => {
    using src = Checkpoint.open(root);
    for (const n of [4, 1]) {
      const dst = tmp();
      const w = new CheckpointWriter(dst, 7, { layout: { ...LAYOUT, tp: n }, modelConfig: MODEL_CONFIG });
      for (const name of src.tensorNames()) {
        const info = src.info(name);
        // Split along the last dim this time, to cross the saved dim-0 split.
        const dim = info.globalShape.length - 1;
        split(info.globalShape, dim, n).forEach((box, tp) => {
          w.addPiece(name, {
            dtype: info.dtype,
            globalShape: info.globalShape,
            ...box,
            data: src.readSlice(name, box.offsets, box.shape),
            rank: { tp, pp: 0, ep: 0 },
          });
        });
      }
      w.finalize();
      using back = Checkpoint.open(dst);
      expect(back.metadata.layout.tp).toBe(n);
      for (const [name, t] of tensors) {
        expect(back.info(name).pieces.length).toBe(n);
        expect(Buffer.from(back.read(name)).equals(Buffer.from(t.data))).toBe(true);
      }
    }
  });
});

describe('atomicity', () => {
  it('writes the latest tracker only after finalize, and a second save replaces it', () => {
    const root = tmp();
    const w = save(root, originals(), 5);
    // While writing, only the temporary directory exists.
    expect(fs.readdirSync(root)).toEqual([`iter_0000005.tmp-${process.pid}`]);
    w.finalize();
    expect(fs.readdirSync(root).sort()).toEqual(['iter_0000005', LATEST_ITERATION_FILE]);
    const w2 = save(root, originals(), 10);
    expect(fs.readFileSync(path.join(root, LATEST_ITERATION_FILE), 'utf8').trim()).toBe('5');
    w2.finalize();
    expect(fs.readFileSync(path.join(root, LATEST_ITERATION_FILE), 'utf8').trim()).toBe('10');
    expect(Checkpoint.open(root).iteration).toBe(10);
    expect(Checkpoint.open(root, { iteration: 5 }).iteration).toBe(5);
    // Saving the same iteration again replaces it.
    save(root, originals(), 10).finalize();
    expect(fs.readdirSync(root).sort()).toEqual(['iter_0000005', 'iter_0000010', LATEST_ITERATION_FILE]);
  });

  it('an aborted writer leaves no iter_* directory', () => {
    const root = tmp();
    const w = save(root, originals(), 1);
    w.abort();
    expect(fs.readdirSync(root)).toEqual([]);
    expectError(
      () =>
        w.addPiece('x', {
          dtype: 'F32',
          globalShape: [1],
          offsets: [0],
          shape: [1],
          data: new Uint8Array(4),
        }),
      'INVALID_ARGUMENT',
    );
    expectError(() => Checkpoint.open(root), 'MISSING_FILE', LATEST_ITERATION_FILE);
  });
});

describe('tiling validation at finalize', () => {
  const piece = (offsets: readonly number[], shape: readonly number[]) => ({
    dtype: 'F32' as const,
    globalShape: [4, 4],
    offsets,
    shape,
    data: new Uint8Array(numel(shape) * 4),
  });
  const cases: [string, Region[], string][] = [
    [
      'gap',
      [
        { offsets: [0, 0], shape: [2, 4] },
        { offsets: [3, 0], shape: [1, 4] },
      ],
      'gap',
    ],
    [
      'overlap',
      [
        { offsets: [0, 0], shape: [3, 4] },
        { offsets: [2, 0], shape: [2, 4] },
      ],
      'overlap',
    ],
    [
      'out of bounds',
      [
        { offsets: [0, 0], shape: [2, 4] },
        { offsets: [2, 2], shape: [2, 4] },
      ],
      'outside',
    ],
  ];
  for (const [label, boxes, word] of cases) {
    it(`rejects a ${label} and leaves nothing behind`, () => {
      const root = tmp();
      const w = new CheckpointWriter(root, 1, { layout: LAYOUT, modelConfig: MODEL_CONFIG });
      boxes.forEach((b, tp) => {
        w.addPiece('w', { ...piece(b.offsets, b.shape), rank: { tp, pp: 0, ep: 0 } });
      });
      expectError(() => w.finalize(), 'SHAPE_MISMATCH', '"w"', word);
      expect(fs.readdirSync(root)).toEqual([]);
    });
  }

  it('rejects pieces disagreeing on dtype or global shape, and wrong byte lengths', () => {
    const w = new CheckpointWriter(tmp(), 1, { layout: LAYOUT, modelConfig: MODEL_CONFIG });
    w.addPiece('w', piece([0, 0], [2, 4]));
    expectError(
      () => w.addPiece('w', { ...piece([2, 0], [2, 4]), globalShape: [4, 5] }),
      'SHAPE_MISMATCH',
      '"w"',
    );
    expectError(() => w.addPiece('w', { ...piece([2, 0], [2, 4]), dtype: 'I32' }), 'SHAPE_MISMATCH', '"w"');
    expectError(
      () => w.addPiece('w', { ...piece([2, 0], [2, 4]), data: new Uint8Array(3) }),
      'SHAPE_MISMATCH',
      '"w"',
    );
    w.abort();
  });

  it('accepts two pieces of one tensor on the same rank and 0-d tensors', () => {
    const root = tmp();
    const w = new CheckpointWriter(root, 2, { layout: LAYOUT, modelConfig: MODEL_CONFIG });
    const data = randomBytes(64, 7);
    w.addPiece('w', { ...piece([0, 0], [2, 4]), data: data.subarray(0, 32) });
    w.addPiece('w', { ...piece([2, 0], [2, 4]), data: data.subarray(32) });
    w.addPiece('step', { dtype: 'I64', globalShape: [], offsets: [], shape: [], data: randomBytes(8, 3) });
    w.finalize();
    using ck = Checkpoint.open(root);
    expect(Buffer.from(ck.read('w'))).toEqual(Buffer.from(data));
    expect(Buffer.from(ck.read('step'))).toEqual(Buffer.from(randomBytes(8, 3)));
    expect(new Set(ck.info('w').pieces.map((p) => p.key)).size).toBe(2);
  });
});

describe('damaged checkpoints', () => {
  const setup = () => {
    const root = tmp();
    save(root, originals(), 3).finalize();
    return { root, dir: path.join(root, 'iter_0000003') };
  };
  const name = 'embedding.word_embeddings.weight';
  const file1 = pieceFileName({ tp: 1, pp: 0, ep: 0 });

  it('reports a missing piece file by name, with the tensor', () => {
    const { root, dir } = setup();
    fs.rmSync(path.join(dir, file1));
    using ck = Checkpoint.open(root);
    expectError(() => ck.read(name), 'MISSING_FILE', file1, name);
    // A slice that needs only rank 0's piece still reads.
    expect(ck.readSlice(name, [0, 0], [4, 6]).byteLength).toBe(96);
    expectError(() => ck.verify(), 'MISSING_FILE', file1);
  });

  it('reports a truncated piece file by name', () => {
    const { root, dir } = setup();
    const p = path.join(dir, file1);
    fs.truncateSync(p, fs.statSync(p).size - 10);
    using ck = Checkpoint.open(root);
    expectError(() => ck.read(name), 'TRUNCATED_FILE', file1);
  });

  it('reports a piece missing from its file by tensor and file', () => {
    const { root, dir } = setup();
    writeSafetensors(path.join(dir, file1), [
      { name: 'other', dtype: 'F32', shape: [1], data: new Uint8Array(4) },
    ]);
    using ck = Checkpoint.open(root);
    expectError(() => ck.read(name), 'MISSING_TENSOR', name, file1);
  });

  it('reports invalid metadata.json naming the field', () => {
    const { root, dir } = setup();
    const mp = path.join(dir, 'metadata.json');
    const good = JSON.parse(fs.readFileSync(mp, 'utf8'));
    const bad = (edit: (m: Record<string, unknown>) => void, field: string) => {
      const m = structuredClone(good);
      edit(m);
      fs.writeFileSync(mp, JSON.stringify(m));
      expectError(() => Checkpoint.open(root), 'INVALID_FORMAT', field);
    };
    bad((m) => {
      m.formatVersion = 3;
    }, 'checkpoint format version 3 is not supported');
    bad((m) => {
      (m.layout as Record<string, unknown>).tp = 0;
    }, 'layout.tp');
    bad((m) => {
      (m.tensors as Record<string, { dtype: string }>)[name].dtype = 'F99';
    }, `tensors.${name}.dtype`);
    bad((m) => {
      (m.tensors as Record<string, { pieces: { file: string }[] }>)[name].pieces[0].file = '../x.safetensors';
    }, `tensors.${name}.pieces.0.file`);
    bad((m) => {
      (m.tensors as Record<string, { pieces: unknown[] }>)[name].pieces.pop();
    }, `tensors.${name}.pieces`);
    fs.writeFileSync(mp, '{');
    expectError(() => Checkpoint.open(root), 'INVALID_FORMAT', 'metadata.json');
  });
});

describe('metadata sections', () => {
  it('round-trips config, tokenizer, optimizer, scheduler, rng and data-loader state', () => {
    const root = tmp();
    const sections = {
      optimizer: { type: 'adam', step: 42, betas: [0.9, 0.95] },
      scheduler: { lr: 3e-4, warmupSteps: 100, numSteps: 42 },
      rng: { seed: 1234, state: [1, 2, 3] },
      dataLoader: { epoch: 0, position: 3200, shuffled: true },
    };
    const w = new CheckpointWriter(root, 42, {
      layout: { tp: 1, pp: 2, ep: 4, etp: 1, dp: 8 },
      modelConfig: MODEL_CONFIG,
      consumedSamples: 10_752,
      tokenizer: { files: ['tokenizer.json', 'tokenizer_config.json'] },
      ...sections,
    });
    w.addPiece('optimizer.exp_avg.w', {
      dtype: 'F32',
      globalShape: [2],
      offsets: [0],
      shape: [2],
      data: randomBytes(8, 9),
    });
    const written = w.finalize();
    using ck = Checkpoint.open(root);
    expect(ck.metadata).toEqual(written);
    expect(ck.metadata).toMatchObject({
      formatVersion: 2,
      iteration: 42,
      consumedSamples: 10_752,
      modelConfig: MODEL_CONFIG,
      tokenizer: { files: ['tokenizer.json', 'tokenizer_config.json'] },
      layout: { tp: 1, pp: 2, ep: 4, etp: 1, dp: 8 },
      ...sections,
    });
  });

  it('omits absent sections', () => {
    const root = tmp();
    new CheckpointWriter(root, 0, { layout: LAYOUT, modelConfig: {} }).finalize();
    using ck = Checkpoint.open(root);
    expect(Object.keys(ck.metadata).sort()).toEqual(
      ['consumedSamples', 'formatVersion', 'iteration', 'layout', 'modelConfig', 'tensors'].sort(),
    );
    expect(ck.inspect().tensorCount).toBe(0);
  });
});
