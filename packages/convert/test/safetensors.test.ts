import fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import {
  DTYPE_SIZE,
  findDuplicateKey,
  parseSize,
  planShards,
  readSafetensorsIndex,
  type SafetensorsDtype,
  SafetensorsFile,
  SafetensorsWriter,
  ShardedSafetensors,
  type TensorInput,
  typedView,
  writeSafetensors,
  writeShardedSafetensors,
} from '../src/index.js';
import { expectError } from './helpers.js';

const FIXTURES = path.join(import.meta.dirname, 'fixtures', 'safetensors');
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'megapatch-st-'));
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
let counter = 0;
const tmp = (name = 'model.safetensors') => {
  const dir = path.join(tmpRoot, String(counter++));
  fs.mkdirSync(dir);
  return path.join(dir, name);
};

interface Expected {
  metadata: Record<string, string>;
  order: string[];
  tensors: Record<string, { dtype: SafetensorsDtype; shape: number[]; values: (number | string)[] }>;
}
const expected = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'mixed.expected.json'), 'utf8')) as Expected;

/** Decoded values of a tensor in the form the Python generator wrote them. */
function values(dtype: SafetensorsDtype, data: Uint8Array): (number | string)[] {
  const view = typedView(dtype, data);
  if (view instanceof BigInt64Array || view instanceof BigUint64Array) return [...view].map(String);
  return [...view];
}

const bytes = (...xs: number[]) => new Uint8Array(xs);
const f32 = (...xs: number[]) => new Uint8Array(new Float32Array(xs).buffer);

/** Builds a file from a header (object or raw text), a data buffer and an optional length override. */
function rawFile(header: unknown, data: Uint8Array, opts: { length?: bigint; pad?: string } = {}): string {
  const text = (typeof header === 'string' ? header : JSON.stringify(header)) + (opts.pad ?? '');
  const h = Buffer.from(text, 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(opts.length ?? BigInt(h.length));
  const p = tmp('bad.safetensors');
  fs.writeFileSync(p, Buffer.concat([len, h, data]));
  return p;
}

describe('reading files written by an independent Python writer', () => {
  it('reads every tensor, dtype, shape and value', () => {
    using f = SafetensorsFile.open(path.join(FIXTURES, 'mixed.safetensors'));
    expect(f.keys()).toEqual(expected.order);
    expect({ ...f.metadata }).toEqual(expected.metadata);
    for (const [name, e] of Object.entries(expected.tensors)) {
      const t = f.read(name);
      expect(t.dtype).toBe(e.dtype);
      expect(t.shape).toEqual(e.shape);
      expect(f.info(name).byteLength).toBe(t.data.byteLength);
      expect(values(t.dtype, t.data)).toEqual(e.values);
    }
  });

  it('reproduces the Python bytes exactly given the same order', () => {
    const src = path.join(FIXTURES, 'mixed.safetensors');
    using f = SafetensorsFile.open(src);
    const tensors = f.keys().map((name) => ({ name, ...f.read(name) }));
    const out = tmp();
    writeSafetensors(out, tensors, { metadata: { ...f.metadata }, order: 'given' });
    expect(Buffer.compare(fs.readFileSync(out), fs.readFileSync(src))).toBe(0);
  });

  it('reads the Python sharded checkpoint through the index', () => {
    using ck = ShardedSafetensors.open(path.join(FIXTURES, 'sharded'));
    expect(ck.files()).toEqual(['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']);
    expect(ck.keys().sort()).toEqual([...expected.order].sort());
    expect(ck.info('u16').file).toBe('model-00002-of-00002.safetensors');
    for (const [name, e] of Object.entries(expected.tensors)) {
      expect(values(e.dtype, ck.read(name).data)).toEqual(e.values);
    }
    const idx = readSafetensorsIndex(path.join(FIXTURES, 'sharded'));
    const sum = expected.order.reduce((s, n) => s + ck.info(n).byteLength, 0);
    expect(idx.totalSize).toBe(sum);
  });
});

describe('writer', () => {
  const all: TensorInput[] = (Object.keys(DTYPE_SIZE) as SafetensorsDtype[]).map((dtype, i) => {
    const shape = [2, 3];
    const data = new Uint8Array(6 * DTYPE_SIZE[dtype]).map((_, j) => (j * 7 + i) & 0xff);
    return { name: `t.${dtype}`, dtype, shape, data };
  });
  const extra: TensorInput[] = [
    { name: 'empty', dtype: 'F32', shape: [0, 4], data: new Uint8Array(0) },
    { name: 'empty.bf16', dtype: 'BF16', shape: [3, 0], data: new Uint8Array(0) },
    { name: 'scalar', dtype: 'F64', shape: [], data: new Uint8Array(new Float64Array([Math.PI]).buffer) },
    { name: 'ü-name', dtype: 'BOOL', shape: [4], data: bytes(1, 0, 0, 1) },
  ];

  it('round-trips every dtype, empty tensors and 0-d scalars', () => {
    const p = tmp();
    writeSafetensors(p, [...all, ...extra], { metadata: { format: 'pt' } });
    using f = SafetensorsFile.open(p);
    expect(f.metadata).toEqual({ format: 'pt' });
    for (const t of [...all, ...extra]) {
      const r = f.read(t.name);
      expect(r.dtype).toBe(t.dtype);
      expect(r.shape).toEqual(t.shape);
      expect(r.data).toEqual(t.data);
    }
    expect((typedView('F64', f.read('scalar').data) as Float64Array)[0]).toBe(Math.PI);
  });

  it('pads the header to 8 bytes and orders by alignment then name', () => {
    const p = tmp();
    writeSafetensors(p, [...extra, ...all]);
    const buf = fs.readFileSync(p);
    const n = Number(buf.readBigUInt64LE(0));
    expect(n % 8).toBe(0);
    expect(buf.subarray(8, 8 + n).toString('utf8')).toMatch(/^\{.*\} *$/);
    using f = SafetensorsFile.open(p);
    const ranges = f.keys().map((k) => ({ k, begin: f.byteRange(k)[0], size: DTYPE_SIZE[f.info(k).dtype] }));
    ranges.sort((a, b) => a.begin - b.begin);
    // Sizes never increase along the file, and every tensor starts aligned to its dtype.
    for (let i = 1; i < ranges.length; i++) expect(ranges[i].size).toBeLessThanOrEqual(ranges[i - 1].size);
    for (const r of ranges) expect(r.begin % r.size).toBe(0);
    expect(ranges.slice(0, 4).map((r) => r.k)).toEqual(['scalar', 't.C64', 't.F64', 't.I64']);
  });

  it('accepts a Map and is deterministic', () => {
    const m = new Map(all.map((t) => [t.name, { dtype: t.dtype, shape: t.shape, data: t.data }]));
    const a = tmp();
    const b = tmp();
    writeSafetensors(a, m);
    writeSafetensors(b, [...all].reverse());
    expect(Buffer.compare(fs.readFileSync(a), fs.readFileSync(b))).toBe(0);
  });

  it('streams tensors in chunks and out of order, atomically', () => {
    const p = tmp();
    const w = new SafetensorsWriter(p, [
      { name: 'a', dtype: 'F32', shape: [2, 2] },
      { name: 'b', dtype: 'U8', shape: [3] },
    ]);
    expect(fs.existsSync(p)).toBe(false);
    w.write('b', bytes(1, 2, 3));
    w.write('a', f32(1, 2));
    w.write('a', f32(3, 4));
    expectError(() => w.write('b', bytes(4)), 'SHAPE_MISMATCH', 'tensor "b"');
    w.finish();
    using f = SafetensorsFile.open(p);
    expect([...(typedView('F32', f.read('a').data) as Float32Array)]).toEqual([1, 2, 3, 4]);
    expect(fs.readdirSync(path.dirname(p))).toEqual(['model.safetensors']);
  });

  it('refuses incomplete tensors and leaves no file behind', () => {
    const p = tmp();
    const w = new SafetensorsWriter(p, [{ name: 'a', dtype: 'F32', shape: [2] }]);
    w.write('a', f32(1));
    expectError(() => w.finish(), 'SHAPE_MISMATCH', 'got 4 of its 8 bytes');
    expect(fs.readdirSync(path.dirname(p))).toEqual([]);
    expectError(
      () => writeSafetensors(p, [{ name: 'x', dtype: 'F32', shape: [3], data: f32(1) }]),
      'SHAPE_MISMATCH',
    );
    expect(fs.readdirSync(path.dirname(p))).toEqual([]);
  });

  it('rejects bad inputs', () => {
    const p = tmp();
    const d = f32(1);
    expectError(
      () => writeSafetensors(p, [{ name: 'a', dtype: 'X' as SafetensorsDtype, shape: [1], data: d }]),
      'INVALID_ARGUMENT',
    );
    expectError(
      () =>
        writeSafetensors(p, [
          { name: 'a', dtype: 'F32', shape: [1], data: d },
          { name: 'a', dtype: 'F32', shape: [1], data: d },
        ]),
      'INVALID_ARGUMENT',
      'duplicate',
    );
    expectError(
      () => writeSafetensors(p, [{ name: '__metadata__', dtype: 'F32', shape: [1], data: d }]),
      'INVALID_ARGUMENT',
    );
    expectError(
      () => writeSafetensors(p, [{ name: 'a', dtype: 'F32', shape: [-1], data: d }]),
      'INVALID_ARGUMENT',
    );
  });
});

describe('readRows', () => {
  it('reads only the requested rows with positioned reads', () => {
    const p = path.join(FIXTURES, 'mixed.safetensors');
    using f = SafetensorsFile.open(p);
    const [begin] = f.byteRange('rows');
    const spy = vi.spyOn(fs, 'readSync');
    try {
      const r = f.readRows('rows', 3, 2);
      expect(r.shape).toEqual([2, 4]);
      expect([...(typedView('F32', r.data) as Float32Array)]).toEqual([12, 13, 14, 15, 16, 17, 18, 19]);
      expect(spy).toHaveBeenCalledTimes(1);
      const [, , , length, position] = spy.mock.calls[0] as unknown as [
        number,
        Uint8Array,
        number,
        number,
        number,
      ];
      expect(length).toBe(32);
      expect(position).toBe(begin + 3 * 16);
    } finally {
      spy.mockRestore();
    }
    expect(f.readRows('rows', 10, 0).data.byteLength).toBe(0);
    expectError(() => f.readRows('rows', 9, 2), 'INVALID_ARGUMENT', 'mixed.safetensors', 'rows [9, 11)');
    expectError(() => f.readRows('scalar', 0, 1), 'INVALID_ARGUMENT', '0-d');
    expectError(() => f.read('nope'), 'MISSING_TENSOR', 'mixed.safetensors', '"nope"');
  });

  it('readByteRange reads any byte range of a tensor, and refuses one outside it', () => {
    using f = SafetensorsFile.open(path.join(FIXTURES, 'mixed.safetensors'));
    const whole = f.read('rows').data;
    expect(Buffer.from(f.readByteRange('rows', 5, 23))).toEqual(Buffer.from(whole.subarray(5, 28)));
    expect(f.readByteRange('rows', whole.byteLength, 0).byteLength).toBe(0);
    expectError(
      () => f.readByteRange('rows', whole.byteLength - 4, 5),
      'INVALID_ARGUMENT',
      'mixed.safetensors',
      `bytes [${whole.byteLength - 4}, ${whole.byteLength + 1}) are outside tensor "rows"`,
    );
    expectError(() => f.readByteRange('rows', -1, 2), 'INVALID_ARGUMENT', 'outside');
  });

  it('opening reads only the header', () => {
    const spy = vi.spyOn(fs, 'readSync');
    try {
      SafetensorsFile.open(path.join(FIXTURES, 'mixed.safetensors')).close();
      const total = spy.mock.calls.reduce((s, c) => s + ((c as unknown[])[3] as number), 0);
      const n = Number(fs.readFileSync(path.join(FIXTURES, 'mixed.safetensors')).readBigUInt64LE(0));
      expect(total).toBe(8 + n);
    } finally {
      spy.mockRestore();
    }
  });
});

describe('corrupt files are rejected naming the file and the problem', () => {
  const ok = { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } };
  const data = f32(1, 2);

  it('accepts the well-formed baseline with space padding', () => {
    SafetensorsFile.open(rawFile(ok, data, { pad: '   ' })).close();
  });

  it.each([
    [
      'header length past the file',
      () => rawFile(ok, data, { length: 4000n }),
      'TRUNCATED_FILE',
      'header length 4000',
    ],
    [
      'header length over the limit',
      () => rawFile(ok, data, { length: 1n << 40n }),
      'CORRUPT_FILE',
      'exceeds',
    ],
    ['header not JSON', () => rawFile('{"a": ', bytes()), 'CORRUPT_FILE', 'not valid JSON'],
    ['header not starting with {', () => rawFile(' {}', bytes()), 'CORRUPT_FILE', "start with '{'"],
    ['header a JSON array', () => rawFile('[1]', bytes()), 'CORRUPT_FILE', "start with '{'"],
    ['padding not spaces', () => rawFile(ok, data, { pad: '\n' }), 'CORRUPT_FILE', 'padded'],
    [
      'unknown dtype',
      () => rawFile({ a: { dtype: 'F128', shape: [2], data_offsets: [0, 8] } }, data),
      'CORRUPT_FILE',
      'unknown dtype "F128"',
    ],
    [
      'sub-byte dtype',
      () => rawFile({ a: { dtype: 'F4', shape: [2], data_offsets: [0, 1] } }, bytes(0)),
      'UNSUPPORTED',
      'F4',
    ],
    [
      'negative dim',
      () => rawFile({ a: { dtype: 'U8', shape: [-1], data_offsets: [0, 0] } }, bytes()),
      'CORRUPT_FILE',
      'shape',
    ],
    [
      'bad offsets',
      () => rawFile({ a: { dtype: 'U8', shape: [1], data_offsets: [1, 0] } }, bytes(0)),
      'CORRUPT_FILE',
      'data_offsets',
    ],
    [
      'offsets outside the file',
      () => rawFile({ a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, data),
      'TRUNCATED_FILE',
      'run past the end',
    ],
    [
      'size mismatch',
      () =>
        rawFile({ 'lm_head.weight': { dtype: 'F32', shape: [2, 2], data_offsets: [0, 12] } }, f32(1, 2, 3)),
      'CORRUPT_FILE',
      'tensor "lm_head.weight" data_offsets [0, 12] do not match shape [2,2] F32 (16 bytes)',
    ],
    [
      'overlap',
      () =>
        rawFile(
          {
            a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
            b: { dtype: 'F32', shape: [1], data_offsets: [4, 8] },
          },
          data,
        ),
      'CORRUPT_FILE',
      'overlap',
    ],
    [
      'hole between tensors',
      () =>
        rawFile(
          {
            a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] },
            b: { dtype: 'F32', shape: [1], data_offsets: [8, 12] },
          },
          f32(1, 2, 3),
        ),
      'CORRUPT_FILE',
      'hole',
    ],
    ['trailing bytes', () => rawFile(ok, f32(1, 2, 3)), 'CORRUPT_FILE', 'hole'],
    [
      'duplicate key',
      () =>
        rawFile(
          '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
          bytes(1),
        ),
      'CORRUPT_FILE',
      'duplicate key "a"',
    ],
    [
      'duplicate inner key',
      () => rawFile('{"a":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}}', bytes(1)),
      'CORRUPT_FILE',
      'duplicate key "dtype"',
    ],
    [
      'non-string metadata',
      () => rawFile({ __metadata__: { epoch: 3 }, ...ok }, data),
      'CORRUPT_FILE',
      '__metadata__',
    ],
    [
      'file shorter than 8 bytes',
      () => {
        const p = tmp('bad.safetensors');
        fs.writeFileSync(p, bytes(1, 2));
        return p;
      },
      'TRUNCATED_FILE',
      'too short',
    ],
  ])('%s', (_, make, code, message) => {
    expectError(() => SafetensorsFile.open(make()), code, 'bad.safetensors: ', message);
  });

  it('rejects a truncated real file and a missing one', () => {
    const src = fs.readFileSync(path.join(FIXTURES, 'mixed.safetensors'));
    const p = tmp('bad.safetensors');
    fs.writeFileSync(p, src.subarray(0, src.length - 5));
    expectError(() => SafetensorsFile.open(p), 'TRUNCATED_FILE', 'bad.safetensors: ', '"rows"');
    expectError(
      () => SafetensorsFile.open(path.join(tmpRoot, 'none.safetensors')),
      'MISSING_FILE',
      'none.safetensors',
    );
  });

  it('finds duplicate keys despite escapes and nesting', () => {
    expect(findDuplicateKey('{"a\\"b":1,"x":{"a\\"b":[{"k":1},{"k":2}]}}')).toBeUndefined();
    expect(findDuplicateKey('{"a":"\\"b\\"","b":1,"\\u0061":2}')).toBe('a');
  });
});

describe('sharded checkpoints', () => {
  const mk = (name: string, n: number): TensorInput => ({
    name,
    dtype: 'F32',
    shape: [n],
    data: f32(...Array.from({ length: n }, (_, i) => i + name.length)),
  });
  const tensors = [mk('a', 100), mk('b', 50), mk('c', 300), mk('d', 10), mk('e', 10), mk('f', 200)];

  it('respects the maximum shard size and writes a correct index', () => {
    const dir = path.dirname(tmp());
    const idx = writeShardedSafetensors(dir, tensors, { maxShardSize: 1024, metadata: { format: 'pt' } });
    const files = fs.readdirSync(dir).sort();
    expect(files).toEqual([...idx.files, 'model.safetensors.index.json'].sort());
    expect(idx.files[0]).toBe(`model-00001-of-${String(idx.files.length).padStart(5, '0')}.safetensors`);
    for (const f of idx.files) {
      const size = fs.statSync(path.join(dir, f)).size;
      using sf = SafetensorsFile.open(path.join(dir, f));
      // Only a lone tensor may exceed the limit.
      if (size > 1024) expect(sf.keys()).toHaveLength(1);
      expect(sf.metadata).toEqual({ format: 'pt' });
    }
    const read = readSafetensorsIndex(dir);
    expect(read.totalSize).toBe(tensors.reduce((s, t) => s + t.data.byteLength, 0));
    expect(Object.fromEntries(read.weightMap)).toEqual(Object.fromEntries(idx.weightMap));
    using ck = ShardedSafetensors.open(dir);
    for (const t of tensors) {
      expect(ck.read(t.name).data).toEqual(t.data);
      expect(ck.info(t.name).file).toBe(idx.weightMap.get(t.name));
    }
    expect(ck.readRows('c', 5, 2).data).toEqual(tensors[2].data.subarray(20, 28));
  });

  it('keeps an oversized tensor alone and packs the rest tightly', () => {
    const specs = tensors.map(({ name, dtype, shape }) => ({ name, dtype, shape }));
    const plan = planShards(specs, 1024).map((s) => s.map((t) => t.name));
    expect(plan).toEqual([['a', 'b'], ['c'], ['d', 'e'], ['f']]);
    expect(planShards(specs, '1GB')).toHaveLength(1);
    expect(parseSize('5GB')).toBe(5e9);
    expect(parseSize('2GiB')).toBe(2 ** 31);
    expect(parseSize(' 1.5 kb')).toBe(1500);
    expectError(() => parseSize('lots'), 'INVALID_ARGUMENT');
    expectError(() => parseSize(0), 'INVALID_ARGUMENT');
  });

  it('opens a single model.safetensors folder', () => {
    const p = tmp();
    writeSafetensors(p, tensors);
    using ck = ShardedSafetensors.open(path.dirname(p));
    expect(ck.index).toBeUndefined();
    expect(ck.info('f').file).toBe('model.safetensors');
    expectError(() => ck.read('zz'), 'MISSING_TENSOR', '"zz"');
    expectError(() => ShardedSafetensors.open(tmpRoot), 'MISSING_FILE');
  });

  it.each([
    '../outside.safetensors',
    '/etc/passwd',
    'sub/x.safetensors',
    '..\\x.safetensors',
    '..',
    '',
    'C:x',
    7,
  ])('rejects the escaping shard name %j', (name) => {
    const dir = path.dirname(tmp());
    fs.writeFileSync(
      path.join(dir, 'model.safetensors.index.json'),
      JSON.stringify({ metadata: { total_size: 4 }, weight_map: { a: name } }),
    );
    expectError(
      () => ShardedSafetensors.open(dir),
      'INVALID_FORMAT',
      'model.safetensors.index.json',
      'shard file name',
    );
  });

  it('reports a tensor missing from its shard and an unreadable index', () => {
    const dir = path.dirname(tmp());
    writeShardedSafetensors(dir, tensors.slice(0, 2), { maxShardSize: '1MB' });
    const ip = path.join(dir, 'model.safetensors.index.json');
    const idx = JSON.parse(fs.readFileSync(ip, 'utf8')) as { weight_map: Record<string, string> };
    idx.weight_map.ghost = 'model-00001-of-00001.safetensors';
    fs.writeFileSync(ip, JSON.stringify(idx));
    expectError(
      () => ShardedSafetensors.open(dir),
      'MISSING_TENSOR',
      'model-00001-of-00001.safetensors',
      '"ghost"',
    );
    fs.writeFileSync(ip, '{');
    expectError(() => readSafetensorsIndex(dir), 'INVALID_FORMAT', 'not valid JSON');
  });
});
