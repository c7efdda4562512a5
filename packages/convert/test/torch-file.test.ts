// torch.save files: fixtures written by the real torch.save (test/fixtures/torch/make-fixtures.py),
// files we write checked by the real torch.load (check-written.py), and the pickle codec.
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { DTYPE_SIZE, type SafetensorsDtype, typedView } from '../src/safetensors.js';
import {
  PyFloat,
  PyGlobal,
  PyObject,
  PyTuple,
  pickle,
  type TorchDtype,
  TorchFile,
  TorchFileWriter,
  TorchTensor,
  type TorchTensorRef,
  torchTensors,
  unpickle,
} from '../src/torch/index.js';
import { ZipWriter } from '../src/torch/zip.js';
import { expectError, scratch } from './helpers.js';

const FIXTURES = path.join(import.meta.dirname, 'fixtures', 'torch');
const PYTHON = '/usr/bin/python3';
const haveTorch = spawnSync(PYTHON, ['-c', 'import torch'], { stdio: 'ignore' }).status === 0;
const tmp = scratch('torch');

interface ExpectedTensor {
  dtype: SafetensorsDtype;
  shape: number[];
  stride: number[];
  storage_offset: number;
  requires_grad: boolean;
  contiguous: boolean;
  hex: string;
  values?: (number | string | boolean)[];
}
const expected = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'expected.json'), 'utf8')) as {
  args: Record<string, unknown>;
  checkpoint_version: number;
  iteration: number;
  model: Record<string, ExpectedTensor | null>;
  extra_state_bytes: string;
  random_rng_state: [number, number[]];
  np_rng_state: { name: string; keys_hex: string; pos: number; cached_gaussian: number };
  torch_rng_state: ExpectedTensor;
  shared_storage: [string, string];
  pickles: Record<string, string>;
};

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const fromHex = (s: string) => new Uint8Array(Buffer.from(s, 'hex'));

/** IEEE half → number, written here rather than taken from src so that it checks the bytes independently. */
function halfToNumber(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** Elements of row-major bytes in the form make-fixtures.py writes them. */
function values(dtype: SafetensorsDtype, data: Uint8Array): (number | string | boolean)[] {
  const view = typedView(dtype, data);
  if (dtype === 'BF16')
    return [...view].map((x) => new Float32Array(new Uint32Array([Number(x) << 16]).buffer)[0]);
  if (dtype === 'F16') return [...view].map((x) => halfToNumber(Number(x)));
  if (dtype === 'BOOL') return [...view].map((x) => x !== 0);
  return [...view].map((x) => (typeof x === 'bigint' ? String(x) : x));
}

const globalName = (v: unknown) => (v instanceof PyGlobal ? `${v.module}.${v.name}` : v);

describe('TorchFile reads what torch 1.13 torch.save wrote', () => {
  const file = path.join(FIXTURES, 'megatron.pt');

  it('gives the args, scalars and every tensor of a Megatron-like checkpoint', () => {
    const f = TorchFile.open(file);
    const root = f.root as Map<string, unknown>;
    expect([...root.keys()]).toEqual(['args', 'checkpoint_version', 'iteration', 'model', 'rng_state']);
    const args = root.get('args') as PyObject;
    expect(args).toBeInstanceOf(PyObject);
    expect([args.module, args.name]).toEqual(['argparse', 'Namespace']);
    const attrs = Object.fromEntries(
      [...(args.state as Map<string, unknown>)].map(([k, v]) => [k, globalName(v)]),
    );
    expect(attrs).toEqual(expected.args);
    expect(root.get('checkpoint_version')).toBe(expected.checkpoint_version);
    expect(root.get('iteration')).toBe(expected.iteration);

    const model = root.get('model') as Map<string, unknown>;
    expect([...model.keys()]).toEqual(Object.keys(expected.model));
    for (const [name, e] of Object.entries(expected.model)) {
      const t = model.get(name);
      if (e === null) {
        if (name.endsWith('linear_fc1._extra_state')) {
          // io.BytesIO: built by NEWOBJ, its state (value, position, __dict__) set by BUILD
          expect(t).toMatchObject({ module: '_io', name: 'BytesIO' });
          const [value, position] = (t as PyObject).state as unknown[];
          expect([hex(value as Uint8Array), position]).toEqual([expected.extra_state_bytes, 0]);
        } else expect(t).toBeNull();
        continue;
      }
      expect(t, name).toBeInstanceOf(TorchTensor);
      const tt = t as TorchTensor;
      expect([tt.dtype, tt.shape, tt.stride, tt.storageOffset, tt.requiresGrad, tt.contiguous], name).toEqual(
        [e.dtype, e.shape, e.stride, e.storage_offset, e.requires_grad, e.contiguous],
      );
      const data = f.read(tt);
      expect(hex(data), name).toBe(e.hex);
      expect(values(e.dtype, data), name).toEqual(e.values);
    }
    const [a, b] = expected.shared_storage.map((n) => model.get(n) as TorchTensor);
    expect(a.storageKey).toBe(b.storageKey);
    expect(a.storageNumel).toBe(20);
    f.close();
  });

  it('gives the RNG states: Python random tuples, a numpy array object, the torch generator tensor', () => {
    const f = TorchFile.open(file);
    const rng = ((f.root as Map<string, unknown>).get('rng_state') as Map<string, unknown>[])[0];
    const [version, words, gauss] = rng.get('random_rng_state') as unknown[];
    expect([version, [...(words as number[])], gauss]).toEqual([...expected.random_rng_state, null]);
    expect(Object.isFrozen(words)).toBe(true);
    const [name, keys, pos, hasGauss, cached] = rng.get('np_rng_state') as unknown[];
    expect([name, pos, hasGauss, cached]).toEqual([
      expected.np_rng_state.name,
      expected.np_rng_state.pos,
      0,
      expected.np_rng_state.cached_gaussian,
    ]);
    const array = keys as PyObject;
    expect([array.module, array.name, globalName(array.args[0])]).toEqual([
      'numpy.core.multiarray',
      '_reconstruct',
      'numpy.ndarray',
    ]);
    const [, shape, dtype, , raw] = array.state as unknown[];
    expect(shape).toEqual([624]);
    expect((dtype as PyObject).args[0]).toBe('u4');
    expect(hex(raw as Uint8Array)).toBe(expected.np_rng_state.keys_hex);
    const t = rng.get('torch_rng_state') as TorchTensor;
    expect([t.dtype, t.shape]).toEqual(['U8', expected.torch_rng_state.shape]);
    expect(hex(f.read(t))).toBe(expected.torch_rng_state.hex);
    f.close();
  });

  it('lists tensors with their key paths', () => {
    const f = TorchFile.open(file);
    const names = torchTensors(f.root).map(([n]) => n);
    const tensorsInModel = Object.entries(expected.model).filter(([, e]) => e !== null);
    expect(names).toEqual([...tensorsInModel.map(([n]) => `model.${n}`), 'rng_state.0.torch_rng_state']);
    expect(torchTensors((f.root as Map<string, unknown>).get('model'), 'm')[0][0]).toBe(
      'm.embedding.word_embeddings.weight',
    );
    f.close();
  });

  it('readRows reads only the rows of a contiguous tensor, and gathers rows of a strided view', () => {
    const f = TorchFile.open(file);
    const model = (f.root as Map<string, unknown>).get('model') as Map<string, TorchTensor>;
    const emb = model.get('embedding.word_embeddings.weight')!;
    const full = f.read(emb);
    const reads = vi.spyOn(fs, 'readSync');
    const rows = f.readRows(emb, 1, 2);
    const bytesRead = reads.mock.calls.reduce((n, c) => n + ((c as unknown[])[3] as number), 0);
    reads.mockRestore();
    expect(rows).toEqual(full.subarray(16, 48));
    expect(bytesRead).toBe(32);
    const fc1 = model.get('decoder.layers.0.mlp.linear_fc1.weight')!; // [5, 3], stride [1, 5]
    expect(f.readRows(fc1, 2, 3)).toEqual(f.read(fc1).subarray(2 * 12, 5 * 12));
    expect(f.readRows(fc1, 5, 0)).toEqual(new Uint8Array(0));
    expectError(() => f.readRows(fc1, 4, 2), 'INVALID_ARGUMENT', 'rows [4, 6)', 'megatron.pt');
    expectError(() => f.readRows(model.get('scale')!, 0, 1), 'INVALID_ARGUMENT', '0-d');
    f.close();
    expectError(() => f.read(emb), 'INVALID_ARGUMENT', 'closed');
  });

  it.each(['U8', 'BF16', 'F32', 'I64'] as const)(
    'gathers strided views of %s elements (transposed, stepped, offset) as their elements in order',
    (dtype) => {
      const esz = DTYPE_SIZE[dtype];
      const f = tmp(`strided-${dtype}.pt`);
      const w = new TorchFileWriter(f);
      const ref = w.tensor(dtype, [6, 10]);
      w.writeRoot(new Map([['w', ref]]));
      const bytes = randomBytes(60 * esz);
      w.write(ref, bytes);
      w.finish();
      using tf = TorchFile.open(f);
      const t = (tf.root as Map<string, TorchTensor>).get('w')!;
      const view = (shape: number[], stride: number[], offset: number) =>
        new TorchTensor(t.dtype, shape, stride, offset, t.storageKey, t.storageNumel, false);
      /** The elements of the view read one by one from the storage bytes. */
      const expected = (shape: number[], stride: number[], offset: number) => {
        const out: Uint8Array[] = [];
        const walk = (d: number, at: number) => {
          if (d === shape.length) out.push(bytes.subarray(at * esz, (at + 1) * esz));
          else for (let i = 0; i < shape[d]; i++) walk(d + 1, at + i * stride[d]);
        };
        walk(0, offset);
        return Buffer.concat(out);
      };
      for (const [shape, stride, offset] of [
        [[10, 6], [1, 10], 0], // the transpose
        [[3, 5], [20, 2], 3], // every other row and column, from element 3
        [[2, 3, 4], [1, 20, 2], 1], // three dimensions, none contiguous
      ] as [number[], number[], number][]) {
        expect(Buffer.from(tf.read(view(shape, stride, offset))), `${shape} ${stride}`).toEqual(
          expected(shape, stride, offset),
        );
      }
    },
  );

  it('readBox cuts a box out of a contiguous tensor and of a strided view', () => {
    using f = TorchFile.open(file);
    const model = (f.root as Map<string, unknown>).get('model') as Map<string, TorchTensor>;
    /** Rows r0..r1, columns c0..c1 of row-major bytes with `cols` columns of `esz` bytes. */
    const slice = (b: Uint8Array, cols: number, esz: number, [r0, r1]: number[], [c0, c1]: number[]) =>
      Buffer.concat(
        Array.from({ length: r1 - r0 }, (_, r) =>
          b.subarray(((r0 + r) * cols + c0) * esz, ((r0 + r) * cols + c1) * esz),
        ),
      );
    const emb = model.get('embedding.word_embeddings.weight')!;
    const [, cols] = emb.shape;
    const esz = f.read(emb).byteLength / emb.numel;
    expect(Buffer.from(f.readBox(emb, [1, 2], [2, 3]))).toEqual(
      slice(f.read(emb), cols, esz, [1, 3], [2, 5]),
    );
    const fc1 = model.get('decoder.layers.0.mlp.linear_fc1.weight')!; // [5, 3], stride [1, 5]
    expect(Buffer.from(f.readBox(fc1, [1, 1], [3, 2]))).toEqual(slice(f.read(fc1), 3, 4, [1, 4], [1, 3]));
    expect(f.readBox(fc1, [5, 0], [0, 3])).toEqual(new Uint8Array(0));
    expectError(() => f.readBox(fc1, [4, 0], [2, 3]), 'INVALID_ARGUMENT', 'outside a tensor of shape [5,3]');
  });

  it('openRegion reads a torch.save file stored inside a larger file, and leaves the descriptor open', () => {
    const whole = fs.readFileSync(file);
    const big = path.join(tmp('region'), 'blobs.bin');
    fs.mkdirSync(path.dirname(big), { recursive: true });
    fs.writeFileSync(big, Buffer.concat([Buffer.alloc(1000, 7), whole, Buffer.alloc(333, 9)]));
    const fd = fs.openSync(big, 'r');
    try {
      const inner = TorchFile.openRegion(fd, 1000, whole.byteLength, big);
      using plain = TorchFile.open(file);
      const names = (m: TorchFile) => torchTensors(m.root).map(([n]) => n);
      expect(names(inner)).toEqual(names(plain));
      const a = torchTensors(inner.root);
      const b = torchTensors(plain.root);
      for (const [i, [n, t]] of a.entries()) expect(inner.read(t), n).toEqual(plain.read(b[i][1]));
      inner.close();
      expect(fs.fstatSync(fd).size).toBe(whole.byteLength + 1333); // still open
      expectError(
        () => TorchFile.openRegion(fd, 1000, whole.byteLength - 200, big),
        'TRUNCATED_FILE',
        'truncated',
      );
    } finally {
      fs.closeSync(fd);
    }
  });

  it('refuses the legacy pre-1.6 format, compressed entries and a missing storage record, naming the file', () => {
    expectError(
      () => TorchFile.open(path.join(FIXTURES, 'legacy.pt')),
      'UNSUPPORTED',
      'legacy.pt',
      'legacy (pre-1.6)',
    );
    expectError(
      () => TorchFile.open(path.join(FIXTURES, 'compressed.pt')),
      'UNSUPPORTED',
      'compressed.pt',
      'compressed',
    );
    expectError(
      () => TorchFile.open(path.join(FIXTURES, 'missing-storage.pt')),
      'CORRUPT_FILE',
      'missing-storage.pt',
      'tiny/data/0',
    );
  });
});

describe('TorchFile reads the forms newer torch writes', () => {
  // What torch 2.x's Tensor._reduce_ex_internal and Parameter.__reduce_ex__ pickle (read from
  // torch/_tensor.py), written here with our pickle and zip writers since torch 1.13 cannot.
  class Pid {
    constructor(readonly tuple: PyTuple) {}
  }
  const storage = (type: string, key: string, numel: number) =>
    new Pid(new PyTuple(['storage', new PyGlobal('torch', type), key, 'cpu', numel]));
  const hooks = () => new PyObject('collections', 'OrderedDict');
  const v2 = (s: Pid, shape: number[]) =>
    new PyObject('torch._utils', '_rebuild_tensor_v2', [
      s,
      0,
      new PyTuple(shape),
      new PyTuple([1]),
      false,
      hooks(),
    ]);

  it('reads _rebuild_tensor_v3 over an UntypedStorage, parameters with state, tensor subclasses', () => {
    const fp8 = new PyObject('torch._utils', '_rebuild_tensor_v3', [
      storage('UntypedStorage', '0', 6),
      0,
      new PyTuple([2, 3]),
      new PyTuple([3, 1]),
      false,
      hooks(),
      new PyGlobal('torch', 'float8_e4m3fn'),
    ]);
    const u16 = new PyObject('torch._utils', '_rebuild_tensor_v3', [
      storage('UntypedStorage', '1', 8),
      1,
      new PyTuple([2]),
      new PyTuple([2]),
      false,
      hooks(),
      new PyGlobal('torch', 'uint16'),
    ]);
    const param = new PyObject('torch._utils', '_rebuild_parameter_with_state', [
      v2(storage('BFloat16Storage', '2', 2), [2]),
      true,
      hooks(),
      new Map(),
    ]);
    const sub = new PyObject('torch._tensor', '_rebuild_from_type_v2', [
      new PyGlobal('torch._utils', '_rebuild_tensor_v2'),
      new PyGlobal('torch', 'Tensor'),
      new PyTuple([storage('FloatStorage', '3', 1), 0, new PyTuple([1]), new PyTuple([1]), false, hooks()]),
      new Map(),
    ]);
    const root = new Map<string, unknown>([
      ['fp8', fp8],
      ['u16', u16],
      ['param', param],
      ['sub', sub],
    ]);
    const data = ['060504030201', '0100020003000400', '803f0040', '0000c03f'].map(fromHex);
    const file = tmp('torch2.pt');
    const fd = fs.openSync(file, 'w');
    const zip = new ZipWriter(fd);
    zip.add(
      'model_optim_rng/data.pkl',
      pickle(root, { persistentId: (v) => (v instanceof Pid ? v.tuple : undefined) }),
    );
    zip.add('model_optim_rng/byteorder', new TextEncoder().encode('little'));
    for (const [i, d] of data.entries()) zip.add(`model_optim_rng/data/${i}`, d);
    zip.add('model_optim_rng/version', new TextEncoder().encode('3\n'));
    zip.add('model_optim_rng/.data/serialization_id', new TextEncoder().encode('0123456789'));
    zip.finish();
    fs.closeSync(fd);

    const f = TorchFile.open(file);
    const got = f.root as Map<string, TorchTensor>;
    const summary = (t: TorchTensor) => [t.dtype, t.shape, t.storageNumel, t.requiresGrad, hex(f.read(t))];
    expect(summary(got.get('fp8')!)).toEqual(['F8_E4M3', [2, 3], 6, false, '060504030201']);
    expect(summary(got.get('u16')!)).toEqual(['U16', [2], 4, false, '02000400']);
    expect(summary(got.get('param')!)).toEqual(['BF16', [2], 2, true, '803f0040']);
    expect(summary(got.get('sub')!)).toEqual(['F32', [1], 1, false, '0000c03f']);
    f.close();
  });
});

const ALL_DTYPES: TorchDtype[] = ['F32', 'BF16', 'F16', 'F64', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL'];

/** Random bytes of a tensor (0/1 for BOOL). */
function randomData(dtype: TorchDtype, shape: number[]): Uint8Array {
  const n = shape.reduce((a, b) => a * b, 1) * DTYPE_SIZE[dtype];
  const b = new Uint8Array(randomBytes(n));
  return dtype === 'BOOL' ? b.map((x) => x & 1) : b;
}

/**
 * Writes `parts` (name → dtype, shape) into a Map under 'model', each tensor in chunks of `chunk`
 * bytes; `aliases` adds model entries naming another part's placeholder (or null: None), `root`
 * more root entries, and `beforeFinish` runs once all data is written.
 */
function writeModel(
  file: string,
  parts: [string, TorchDtype, number[]][],
  opts: {
    root?: [string, unknown][];
    aliases?: [string, string | null][];
    chunk?: number;
    beforeFinish?: () => void;
  } = {},
) {
  const chunk = opts.chunk ?? 1000;
  const w = new TorchFileWriter(file);
  const refs = new Map<string, TorchTensorRef>(parts.map(([n, d, s]) => [n, w.tensor(d, s)]));
  const data = new Map(parts.map(([n, d, s]) => [n, randomData(d, s)]));
  const model = new Map<string, unknown>(refs);
  for (const [n, of] of opts.aliases ?? []) model.set(n, of === null ? null : refs.get(of));
  w.writeRoot(new Map<string, unknown>([['model', model], ...(opts.root ?? [])]));
  for (const [n, ref] of refs) {
    const b = data.get(n)!;
    for (let at = 0; at < b.byteLength; at += chunk) w.write(ref, b.subarray(at, at + chunk));
  }
  opts.beforeFinish?.();
  w.finish();
  return { data, refs };
}

describe('TorchFileWriter → TorchFile', () => {
  it('round-trips every dtype, a multi-chunk tensor, an empty and a 0-d tensor, a shared placeholder', () => {
    const file = path.join(tmp('roundtrip'), 'model_optim_rng.pt');
    fs.mkdirSync(path.dirname(file));
    const parts: [string, TorchDtype, number[]][] = [
      ...ALL_DTYPES.map((d, i): [string, TorchDtype, number[]] => [`t.${d}`, d, [i + 1, 3]]),
      ['big', 'F32', [64, 33]],
      ['empty', 'BF16', [0, 7]],
      ['scalar', 'F64', []],
    ];
    // 999-byte chunks split the elements of 'big'
    const { data } = writeModel(file, parts, {
      root: [['iteration', 3]],
      aliases: [['tied', 't.F32']],
      chunk: 999,
      beforeFinish: () => expect(fs.existsSync(file)).toBe(false),
    });
    expect(fs.readdirSync(path.dirname(file))).toEqual(['model_optim_rng.pt']);

    const f = TorchFile.open(file);
    const got = (f.root as Map<string, unknown>).get('model') as Map<string, TorchTensor>;
    for (const [n, d, s] of parts) {
      const t = got.get(n)!;
      expect([t.dtype, t.shape, t.contiguous, t.requiresGrad], n).toEqual([d, s, true, false]);
      expect(f.read(t), n).toEqual(data.get(n));
    }
    expect(got.get('tied')).toBe(got.get('t.F32'));
    expect(f.readRows(got.get('big')!, 10, 5)).toEqual(data.get('big')!.subarray(10 * 132, 15 * 132));
    f.close();
  });

  it('writes zip64 end records past 65535 entries, and reads them back', () => {
    const file = tmp('zip64.pt');
    const w = new TorchFileWriter(file);
    const refs = Array.from({ length: 70_000 }, () => w.tensor('U8', [0]));
    w.writeRoot(refs);
    w.finish();
    const f = TorchFile.open(file);
    expect((f.root as TorchTensor[]).length).toBe(70_000);
    f.close();
    const z = spawnSync(
      PYTHON,
      [
        '-c',
        'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); print(len(z.infolist()), z.testzip())',
        file,
      ],
      {
        encoding: 'utf8',
      },
    );
    expect(z.stdout.trim()).toBe('70003 None');
  });

  it.skipIf(!process.env.MEGAPATCH_BIG_FILES)(
    'writes a 4.1 GiB tensor with zip64 sizes and offsets (set MEGAPATCH_BIG_FILES=1: writes 4 GiB to the temp dir)',
    () => {
      const file = tmp('big.pt');
      const w = new TorchFileWriter(file);
      const big = w.tensor('U8', [2 ** 32 + 2 ** 27]);
      const after = w.tensor('I32', [3]);
      w.writeRoot(
        new Map([
          ['big', big],
          ['after', after],
        ]),
      );
      const chunk = new Uint8Array(1 << 26).map((_, i) => i % 251);
      for (let i = 0; i < big.byteLength / chunk.byteLength; i++) w.write(big, chunk);
      w.write(after, new Uint8Array(new Int32Array([7, -8, 9]).buffer));
      w.finish();
      const f = TorchFile.open(file);
      const root = f.root as Map<string, TorchTensor>;
      expect(f.readRows(root.get('big')!, 2 ** 32 + 5, 3)).toEqual(chunk.subarray(5, 8));
      expect([...new Int32Array(f.read(root.get('after')!).buffer)]).toEqual([7, -8, 9]);
      f.close();
      const zipCheck =
        'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); print(z.testzip(), z.getinfo("archive/data/1").header_offset > 2**32)';
      expect(spawnSync(PYTHON, ['-c', zipCheck, file], { encoding: 'utf8' }).stdout.trim()).toBe('None True');
      if (haveTorch) {
        const code =
          'import sys, torch; d = torch.load(sys.argv[1]); print(d["big"].shape[0], d["big"][-1].item(), d["after"].tolist())';
        const r = spawnSync(PYTHON, ['-c', code, file], { encoding: 'utf8' });
        expect(r.stdout.trim()).toBe(`${2 ** 32 + 2 ** 27} ${(2 ** 26 - 1) % 251} [7, -8, 9]`);
      }
      fs.rmSync(file);
    },
    600_000,
  );
});

describe.skipIf(!haveTorch)('torch.load reads what TorchFileWriter wrote', () => {
  it('loads a Megatron-shaped checkpoint: Namespace args, float version, dtypes, values, sharing', () => {
    const dir = tmp('python');
    fs.mkdirSync(dir);
    const file = path.join(dir, 'model_optim_rng.pt');
    const args = new Map<string, unknown>([
      ['num_layers', 2],
      ['hidden_size', 4],
      ['params_dtype', new PyGlobal('torch', 'bfloat16')],
      ['lr', 3e-4],
      ['bf16', true],
      ['kv_channels', null],
      ['data_path', ['1.0', 'corpus']],
      ['status', new PyGlobal('http', 'HTTPStatus.OK')],
    ]);
    const shared = ['shared'];
    const sample = new Map<string, unknown>([
      ['tuple', new PyTuple([1, new PyTuple([2, 3]), new PyTuple([])])],
      ['set', new Set([1, 2, 3])],
      ['bytes', new Uint8Array([0, 255, 32, 97, 98, 99])],
      ['empty_bytes', new Uint8Array(0)],
      ['big', 2n ** 70n],
      ['neg_big', -(2n ** 65n) - 1n],
      ['neg', -12345],
      ['int32_min', -(2 ** 31)],
      ['u32_max', 2 ** 32 - 1],
      ['float', 1.5],
      ['float_int', new PyFloat(3)],
      ['neg_zero', -0],
      ['unicode', 'h\u00e9llo \u2713 \u{1d11e}'],
      ['none', undefined],
      ['bools', [true, false]],
      ['nested', [[1, [2, new Map([['k', new PyTuple([null])]])]]]],
      ['enum', new PyGlobal('http', 'HTTPStatus.OK')],
      ['dtype', new PyGlobal('torch', 'float16')],
      ['shared', [shared, shared]],
    ]);
    const parts: [string, TorchDtype, number[]][] = [
      ['embedding.word_embeddings.weight', 'BF16', [8, 4]],
      ['decoder.layers.0.self_attention.linear_qkv.weight', 'F32', [12, 4]],
      ['decoder.layers.0.self_attention.linear_qkv.bias', 'F16', [12]],
      ['decoder.final_layernorm.weight', 'F64', [4]],
      ['position', 'I64', [5]],
      ['i32', 'I32', [2, 2]],
      ['i16', 'I16', [3]],
      ['i8', 'I8', [3]],
      ['u8', 'U8', [3]],
      ['mask', 'BOOL', [4]],
      ['empty', 'F32', [0, 3]],
      ['scalar', 'F64', []],
    ];
    const { data } = writeModel(file, parts, {
      root: [
        ['args', new PyObject('argparse', 'Namespace', [], args)],
        ['checkpoint_version', new PyFloat(3)],
        ['iteration', 100],
        ['sample', sample],
      ],
      aliases: [
        ['decoder.layers.0.self_attention.linear_qkv._extra_state', null],
        ['output_layer.weight', 'embedding.word_embeddings.weight'],
      ],
      chunk: Number.MAX_SAFE_INTEGER,
    });

    const torchName: Record<string, string> = {
      F32: 'float32',
      BF16: 'bfloat16',
      F16: 'float16',
      F64: 'float64',
      I64: 'int64',
      I32: 'int32',
      I16: 'int16',
      I8: 'int8',
      U8: 'uint8',
      BOOL: 'bool',
    };
    const expectedJson = {
      args: {
        num_layers: 2,
        hidden_size: 4,
        lr: 3e-4,
        bf16: true,
        kv_channels: null,
        data_path: ['1.0', 'corpus'],
      },
      tensors: Object.fromEntries(
        parts.map(([n, d, s]) => [n, { dtype: `torch.${torchName[d]}`, shape: s, hex: hex(data.get(n)!) }]),
      ),
      same: [['embedding.word_embeddings.weight', 'output_layer.weight']],
      none: ['decoder.layers.0.self_attention.linear_qkv._extra_state'],
    };
    const json = path.join(dir, 'expected.json');
    fs.writeFileSync(json, JSON.stringify(expectedJson));
    // A file of tensors and plain values only, which torch.load(weights_only=True) must accept.
    const plain = path.join(dir, 'weights.pt');
    const w2 = new TorchFileWriter(plain);
    const wRef = w2.tensor('BF16', [3, 5]);
    // (no float: torch 1.13's weights-only unpickler lacks BINFLOAT, whoever wrote the file)
    w2.writeRoot(
      new Map<string, unknown>([
        ['w', wRef],
        ['step', 5],
        ['names', ['a']],
      ]),
    );
    w2.write(wRef, randomData('BF16', [3, 5]));
    w2.finish();

    const r = spawnSync(PYTHON, [path.join(FIXTURES, 'check-written.py'), file, json, plain], {
      encoding: 'utf8',
    });
    expect(r.stderr.split('\n').filter((l) => /Error|Traceback/.test(l))).toEqual([]);
    expect(r.stdout.trim()).toBe('ok');
  });
});

describe('errors name the file and the problem', () => {
  it('refuses a truncated file, a non-zip and a missing file', () => {
    const file = tmp('whole.pt');
    writeModel(file, [['w', 'F32', [16, 16]]]);
    const bytes = fs.readFileSync(file);
    const cut = tmp('cut.pt');
    for (const n of [bytes.byteLength - 10, Math.floor(bytes.byteLength / 2), 100]) {
      fs.writeFileSync(cut, bytes.subarray(0, n));
      expectError(() => TorchFile.open(cut), 'TRUNCATED_FILE', 'cut.pt', 'truncated');
    }
    const text = tmp('notes.pt');
    fs.writeFileSync(text, 'not a checkpoint\n');
    expectError(() => TorchFile.open(text), 'INVALID_FORMAT', 'notes.pt', 'not a zip');
    const empty = tmp('empty.pt');
    fs.writeFileSync(empty, '');
    expectError(() => TorchFile.open(empty), 'INVALID_FORMAT', 'empty.pt');
    expectError(() => TorchFile.open(tmp('absent.pt')), 'MISSING_FILE', 'absent.pt');
  });

  it('refuses a damaged data.pkl', () => {
    const file = tmp('damaged.pt');
    writeModel(file, [['w', 'F32', [2]]]);
    const bytes = fs.readFileSync(file);
    const at = bytes.indexOf('_rebuild_tensor_v2');
    bytes[bytes.indexOf('\n', at) + 1] = 0x01; // the opcode after the GLOBAL's name lines
    fs.writeFileSync(file, bytes);
    expectError(() => TorchFile.open(file), 'UNSUPPORTED', 'damaged.pt', 'data.pkl', 'opcode 0x1');
  });

  it('checks the bytes written per tensor, their order, and cleans up on abort', () => {
    const dir = tmp('writer');
    fs.mkdirSync(dir);
    const file = path.join(dir, 'out.pt');
    const w = new TorchFileWriter(file);
    const a = w.tensor('F32', [2, 2]);
    const b = w.tensor('BF16', [3]);
    expectError(() => w.tensor('F8_E4M3', [2]), 'INVALID_ARGUMENT', 'F8_E4M3', 'out.pt');
    expectError(() => w.write(a, new Uint8Array(4)), 'INVALID_ARGUMENT', 'before writeRoot');
    const c = w.tensor('I8', [1]);
    expectError(() => w.writeRoot([a, b]), 'INVALID_ARGUMENT', 'placeholder 2', 'not in the root');
    w.writeRoot([a, b, c]);
    expectError(() => w.write(a, new Uint8Array(17)), 'SHAPE_MISMATCH', 'gets 17 bytes', 'has 16', 'out.pt');
    w.write(a, new Uint8Array(12));
    expectError(() => w.write(b, new Uint8Array(2)), 'SHAPE_MISMATCH', 'tensor 0', 'got 12 of its 16 bytes');
    w.write(a, new Uint8Array(4));
    w.write(b, new Uint8Array(2));
    expectError(() => w.write(a, new Uint8Array(1)), 'INVALID_ARGUMENT', 'already written');
    expectError(() => w.finish(), 'SHAPE_MISMATCH', 'tensor 1', 'got 2 of its 6 bytes');
    expect(fs.readdirSync(dir)).toEqual([]);
    expectError(() => w.write(b, new Uint8Array(1)), 'INVALID_ARGUMENT', 'closed');

    const w2 = new TorchFileWriter(file);
    const r = w2.tensor('U8', [8]);
    w2.writeRoot(r);
    w2.write(r, new Uint8Array(3));
    expect(fs.readdirSync(dir)).toEqual([`out.pt.tmp-${process.pid}`]);
    w2.abort();
    expect(fs.readdirSync(dir)).toEqual([]);
  });
});

describe('pickle', () => {
  // The object make-fixtures.py pickled, as the reader must give it.
  const shared = ['shared'];
  const sample = new Map<string, unknown>([
    ['tuple', [1, [2, 3], []]],
    ['set', new Set([1, 2, 3])],
    ['frozenset', new Set(['a'])],
    ['bytes', new Uint8Array([0, 255, 32, 97, 98, 99])],
    ['empty_bytes', new Uint8Array(0)],
    ['bytearray', new Uint8Array([120, 121])],
    ['big', 2n ** 70n],
    ['neg_big', -(2n ** 65n) - 1n],
    ['neg', -12345],
    ['int32_min', -(2 ** 31)],
    ['u32_max', 2 ** 32 - 1],
    ['float', 1.5],
    ['float_int', 3],
    ['unicode', 'h\u00e9llo \u2713 \u{1d11e}'],
    ['none', null],
    ['bools', [true, false]],
    ['nested', [[1, [2, new Map([['k', [null]]])]]]],
    ['shared', [shared, shared]],
  ]);

  it.each(['2', '3', '4', '5'])("reads Python's protocol %s pickle of nested values", (protocol) => {
    const got = unpickle(fromHex(expected.pickles[protocol])) as Map<string, unknown>;
    expect(got).toEqual(sample);
    expect(Object.isFrozen(got.get('tuple'))).toBe(true);
    expect(Array.isArray(got.get('bools')) && !Object.isFrozen(got.get('bools'))).toBe(true);
    const [s0, s1] = got.get('shared') as unknown[];
    expect(s0).toBe(s1);
  });

  it('round-trips each value kind through our pickle and unpickle', () => {
    const list = [1, 2];
    const obj = new PyObject('argparse', 'Namespace', [], new Map<string, unknown>([['lr', 0.1]]));
    const many = Array.from({ length: 300 }, (_, i) => [i]); // past 256 memo entries: LONG_BINPUT / LONG_BINGET
    const value = new Map<unknown, unknown>([
      ['none', undefined],
      ['null', null],
      ['bools', [true, false]],
      [
        'ints',
        [0, 255, 256, 65535, 65536, -1, 2 ** 31 - 1, 2 ** 31, -(2 ** 31) - 1, 2 ** 53 - 1, -(2 ** 53) + 1],
      ],
      ['bigints', [5n, -(2n ** 63n), 2n ** 64n, 2n ** 100n - 1n]],
      ['floats', [0.5, -1e300, Number.POSITIVE_INFINITY, 2 ** 60, new PyFloat(3)]],
      ['nan', Number.NaN],
      ['str', 'h\u00e9llo \u{1d11e}'],
      ['bytes', new Uint8Array([0, 128, 255])],
      ['tuple', new PyTuple([1, 'a', new PyTuple([])])],
      ['frozen', Object.freeze([1, 2, 3, 4])],
      ['set', new Set(['x', 'y'])],
      ['plain', { a: 1 }],
      [7, 'int key'],
      ['global', new PyGlobal('torch', 'bfloat16')],
      ['dotted', new PyGlobal('http', 'HTTPStatus.OK')],
      ['object', obj],
      ['again', obj],
      ['list twice', [list, list]],
      ['many', [...many, ...many]],
    ]);
    const got = unpickle(pickle(value)) as Map<unknown, unknown>;
    expect(got.get('none')).toBeNull();
    expect(got.get('ints')).toEqual(value.get('ints'));
    expect(got.get('bigints')).toEqual([5, -(2n ** 63n), 2n ** 64n, 2n ** 100n - 1n]);
    expect(got.get('floats')).toEqual([0.5, -1e300, Number.POSITIVE_INFINITY, 2 ** 60, 3]);
    expect(got.get('nan')).toBeNaN();
    expect(got.get('tuple')).toEqual([1, 'a', []]);
    expect(Object.isFrozen(got.get('tuple')) && Object.isFrozen(got.get('frozen'))).toBe(true);
    expect(got.get('plain')).toEqual(new Map([['a', 1]]));
    expect(got.get(7)).toBe('int key');
    expect(got.get('dotted')).toEqual(new PyGlobal('http', 'HTTPStatus.OK'));
    expect(got.get('object')).toEqual(obj);
    expect(got.get('again')).toBe(got.get('object'));
    const [l0, l1] = got.get('list twice') as unknown[];
    expect(l0).toBe(l1);
    const m = got.get('many') as unknown[][];
    expect(m[299]).toEqual([299]);
    expect(m[299]).toBe(m[599]);
    for (const k of ['bools', 'str', 'bytes', 'set', 'global']) expect(got.get(k), k).toEqual(value.get(k));
    expect(() => pickle(new Date())).toThrow(/cannot write a Date/);
    expect(() => pickle(() => 1)).toThrow(/cannot write a function/);
  });

  it('reads instances of list and dict subclasses, and persistent ids through persistentLoad', () => {
    const dict = new PyObject('m', 'MyDict');
    dict.items = new Map([['a', 1]]);
    const list = new PyObject('m', 'MyList');
    list.items = [1, 2];
    const pid = { id: 'pid' };
    const bytes = pickle([dict, list, pid], {
      persistentId: (v) => (v === pid ? new PyTuple(['storage', 3]) : undefined),
    });
    const got = unpickle(bytes, { persistentLoad: (p) => `loaded ${(p as unknown[])[1]}` }) as unknown[];
    expect(got).toEqual([dict, list, 'loaded 3']);
    expectError(() => unpickle(bytes), 'CORRUPT_FILE', 'persistentLoad');
    expectError(() => unpickle(bytes.subarray(0, bytes.byteLength - 3)), 'CORRUPT_FILE', 'pickle');
  });
});
