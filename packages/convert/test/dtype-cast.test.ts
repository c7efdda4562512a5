import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConvertError } from '../src/errors.js';
import { castElements, dequantizeFp8Blocks, fp8ToNumber, isFloatDtype } from '../src/mapping/dtype-cast.js';
import type { SafetensorsDtype } from '../src/safetensors/dtype.js';

// References come from scripts/fixtures_dtype.py (torch 1.13, numpy and an exact rational
// rounding); fp8 is checked against a decoder written here from the format definitions.
const FIXTURES = path.join(import.meta.dirname, 'fixtures', 'dtype');
const readJson = (name: string) => JSON.parse(fs.readFileSync(path.join(FIXTURES, name), 'utf8'));

type Wide = 'F64' | 'F32' | 'F16' | 'BF16';
const SIZE: Record<Wide, number> = { F64: 8, F32: 4, F16: 2, BF16: 2 };
// [exponent bits, mantissa bits]
const FORMAT: Record<Wide, [number, number]> = { F64: [11, 52], F32: [8, 23], F16: [5, 10], BF16: [8, 7] };

/** Little-endian element `i` of `bytes` as a bigint bit pattern. */
function wordAt(bytes: Uint8Array, i: number, size: number): bigint {
  let v = 0n;
  for (let k = size - 1; k >= 0; k--) v = (v << 8n) | BigInt(bytes[i * size + k]);
  return v;
}

function isNanBits(bits: bigint, dtype: Wide): boolean {
  const [e, m] = FORMAT[dtype];
  const expMask = (1n << BigInt(e)) - 1n;
  return ((bits >> BigInt(m)) & expMask) === expMask && (bits & ((1n << BigInt(m)) - 1n)) !== 0n;
}

function isQuietNan(bits: bigint, dtype: Wide): boolean {
  return isNanBits(bits, dtype) && ((bits >> BigInt(FORMAT[dtype][1] - 1)) & 1n) === 1n;
}

function bytesOf(words: bigint[], size: number): Uint8Array {
  const out = new Uint8Array(words.length * size);
  words.forEach((w, i) => {
    for (let k = 0; k < size; k++) out[i * size + k] = Number((w >> BigInt(8 * k)) & 0xffn);
  });
  return out;
}

const hex = (v: bigint, size: number) => `0x${v.toString(16).padStart(size * 2, '0')}`;

/**
 * Compares cast output with expected words: bit for bit, except that NaN inputs only need a
 * quiet NaN out. Returns the mismatches (empty when all agree).
 */
function mismatches(
  input: Uint8Array,
  from: Wide,
  to: Wide,
  expected: Uint8Array,
  labels?: string[],
): string[] {
  const got = castElements(input, from, to);
  expect(got.byteLength).toBe(expected.byteLength);
  const n = input.byteLength / SIZE[from];
  const bad: string[] = [];
  for (let i = 0; i < n; i++) {
    const x = wordAt(input, i, SIZE[from]);
    const g = wordAt(got, i, SIZE[to]);
    const e = wordAt(expected, i, SIZE[to]);
    const ok = isNanBits(x, from) ? isQuietNan(g, to) : g === e;
    if (!ok) {
      bad.push(
        `${labels?.[i] ?? `#${i}`}: ${hex(x, SIZE[from])} -> ${hex(g, SIZE[to])}, want ${hex(e, SIZE[to])}`,
      );
    }
  }
  return bad;
}

interface CaseFile {
  from: Wide;
  to: Wide;
  reference: string;
  note: string;
  edge: [string, string, string][];
  random: { count: number; input: string; expected: string };
}

describe('castElements against torch / numpy / exact references', () => {
  const files = fs.readdirSync(FIXTURES).filter((f) => /^F\d+_to_\w+\.json$/.test(f));
  it('has the fixture files', () => {
    expect(files.sort()).toEqual([
      'F32_to_BF16.json',
      'F32_to_F16.json',
      'F64_to_BF16.json',
      'F64_to_F16.json',
      'F64_to_F32.json',
    ]);
  });
  for (const file of files) {
    const c = readJson(file) as CaseFile;
    it(`${c.from} -> ${c.to}: edge cases (${c.edge.length})`, () => {
      const input = bytesOf(
        c.edge.map((e) => BigInt(e[1])),
        SIZE[c.from],
      );
      const expected = bytesOf(
        c.edge.map((e) => BigInt(e[2])),
        SIZE[c.to],
      );
      const labels = c.edge.map((e) => e[0]);
      expect(mismatches(input, c.from, c.to, expected, labels)).toEqual([]);
    });
    it(`${c.from} -> ${c.to}: random and near-tie values (${c.random.count})`, () => {
      const input = new Uint8Array(Buffer.from(c.random.input, 'base64'));
      const expected = new Uint8Array(Buffer.from(c.random.expected, 'base64'));
      expect(input.byteLength).toBe(c.random.count * SIZE[c.from]);
      expect(mismatches(input, c.from, c.to, expected)).toEqual([]);
    });
  }

  it('F64 -> BF16 rounds once (torch 1.13 double-rounds through F32 here)', () => {
    const x = 1 + 2 ** -8 + 2 ** -40; // just above a BF16 halfway point; exactly halfway in F32
    const out = castElements(new Uint8Array(new Float64Array([x, -x]).buffer), 'F64', 'BF16');
    expect(Array.from(new Uint16Array(out.buffer))).toEqual([0x3f81, 0xbf81]);
    const viaF32 = castElements(
      castElements(new Uint8Array(new Float64Array([x]).buffer), 'F64', 'F32'),
      'F32',
      'BF16',
    );
    expect(new Uint16Array(viaF32.buffer)[0]).toBe(0x3f80);
  });
});

describe('castElements on all 65536 16-bit inputs', () => {
  const ex = readJson('exhaustive16.json') as {
    canonicalNaN: Record<string, string>;
    cases: Record<string, { sha256: string; sample: [string, string][] }>;
  };
  const words = new Uint16Array(65536).map((_, i) => i);
  const input = new Uint8Array(words.buffer);
  for (const [key, c] of Object.entries(ex.cases)) {
    const [from, to] = key.split('>') as [Wide, Wide];
    it(`${from} -> ${to} matches torch (sha256 of all outputs)`, () => {
      const out = castElements(input, from, to);
      const size = SIZE[to];
      const canon = BigInt(ex.canonicalNaN[to]);
      const canonical = new Uint8Array(out);
      for (let i = 0; i < 65536; i++) {
        if (!isNanBits(BigInt(i), from)) continue;
        const got = wordAt(out, i, size);
        expect(isQuietNan(got, to), `${hex(BigInt(i), 2)} -> ${hex(got, size)}`).toBe(true);
        canonical.set(bytesOf([canon], size), i * size);
      }
      // The sample gives a readable first failure before the hash comparison.
      for (const [x, y] of c.sample) {
        expect(hex(wordAt(canonical, Number(x), size), size), `${from} ${x}`).toBe(y);
      }
      expect(createHash('sha256').update(canonical).digest('hex')).toBe(c.sha256);
    });
  }

  it('F16 and BF16 -> F32 agree with an independent decoder, and widen exactly to F64', () => {
    const f16Value = (h: number) => {
      const s = h & 0x8000 ? -1 : 1;
      const e = (h >> 10) & 31;
      const m = h & 1023;
      if (e === 31) return m ? Number.NaN : s * Number.POSITIVE_INFINITY;
      return s * (e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15));
    };
    const f32 = new Float32Array(castElements(input, 'F16', 'F32').buffer);
    const f64 = new Float64Array(castElements(input, 'F16', 'F64').buffer);
    const b64 = new Float64Array(castElements(input, 'BF16', 'F64').buffer);
    const b32 = new Float32Array(castElements(input, 'BF16', 'F32').buffer);
    const bad: number[] = [];
    for (let h = 0; h < 65536; h++) {
      const v = f16Value(h);
      if (!Object.is(f32[h], v) || !Object.is(f64[h], v) || !Object.is(b64[h], b32[h])) bad.push(h);
    }
    expect(bad).toEqual([]);
  });
});

// ---------------------------------------------------------------------------------------------
// fp8

/** Decoder from the format definitions: 1 sign bit, `e` exponent bits with `bias`, `m` mantissa bits. */
function decodeFp8(byte: number, dtype: 'F8_E4M3' | 'F8_E5M2'): number {
  const [e, m, bias] = dtype === 'F8_E4M3' ? [4, 3, 7] : [5, 2, 15];
  const sign = byte >> 7 ? -1 : 1;
  const exp = (byte >> m) & ((1 << e) - 1);
  const man = byte & ((1 << m) - 1);
  const expMax = (1 << e) - 1;
  if (dtype === 'F8_E4M3' && exp === expMax && man === (1 << m) - 1) return Number.NaN; // fn: no Inf
  if (dtype === 'F8_E5M2' && exp === expMax) return man === 0 ? sign * Number.POSITIVE_INFINITY : Number.NaN;
  const frac = man / 2 ** m;
  return exp === 0 ? sign * frac * 2 ** (1 - bias) : sign * (1 + frac) * 2 ** (exp - bias);
}

const ALL_BYTES = new Uint8Array(256).map((_, i) => i);

describe('fp8', () => {
  for (const dtype of ['F8_E4M3', 'F8_E5M2'] as const) {
    it(`${dtype}: fp8ToNumber matches the format definition on all 256 bytes`, () => {
      for (let b = 0; b < 256; b++)
        expect(Object.is(fp8ToNumber(b, dtype), decodeFp8(b, dtype)), `byte ${b}`).toBe(true);
    });

    it(`${dtype}: casts to F32, F64, F16 and BF16 are exact`, () => {
      const f32 = new Float32Array(castElements(ALL_BYTES, dtype, 'F32').buffer);
      const f64 = new Float64Array(castElements(ALL_BYTES, dtype, 'F64').buffer);
      const f16 = new Uint16Array(castElements(ALL_BYTES, dtype, 'F16').buffer);
      const bf16 = new Uint16Array(castElements(ALL_BYTES, dtype, 'BF16').buffer);
      // F16/BF16 results widened back through the exhaustively tested 16-bit -> F64 casts.
      const f16w = new Float64Array(castElements(new Uint8Array(f16.buffer), 'F16', 'F64').buffer);
      const bf16w = new Float64Array(castElements(new Uint8Array(bf16.buffer), 'BF16', 'F64').buffer);
      for (let b = 0; b < 256; b++) {
        const want = decodeFp8(b, dtype);
        for (const got of [f32[b], f64[b], f16w[b], bf16w[b]])
          expect(Object.is(got, want), `byte ${b}`).toBe(true);
        if (Number.isNaN(want)) {
          expect(f16[b] & 0x7e00).toBe(0x7e00);
          expect(bf16[b] & 0x7fc0).toBe(0x7fc0);
        }
      }
    });
  }

  it('published anchor values', () => {
    expect(fp8ToNumber(0x7e, 'F8_E4M3')).toBe(448);
    expect(fp8ToNumber(0xfe, 'F8_E4M3')).toBe(-448);
    expect(fp8ToNumber(0x01, 'F8_E4M3')).toBe(2 ** -9);
    expect(fp8ToNumber(0x7f, 'F8_E4M3')).toBeNaN();
    expect(fp8ToNumber(0xff, 'F8_E4M3')).toBeNaN();
    expect(fp8ToNumber(0x78, 'F8_E4M3')).toBe(256); // exponent 15 is finite in the fn variant
    expect(fp8ToNumber(0x38, 'F8_E4M3')).toBe(1);
    expect(Object.is(fp8ToNumber(0x80, 'F8_E4M3'), -0)).toBe(true);
    expect(fp8ToNumber(0x7b, 'F8_E5M2')).toBe(57344);
    expect(fp8ToNumber(0x7c, 'F8_E5M2')).toBe(Number.POSITIVE_INFINITY);
    expect(fp8ToNumber(0xfc, 'F8_E5M2')).toBe(Number.NEGATIVE_INFINITY);
    expect(fp8ToNumber(0x7d, 'F8_E5M2')).toBeNaN();
    expect(fp8ToNumber(0x01, 'F8_E5M2')).toBe(2 ** -16);
    expect(fp8ToNumber(0x3c, 'F8_E5M2')).toBe(1);
  });

  it('fp8ToNumber rejects bytes out of range', () => {
    for (const bad of [-1, 256, 1.5]) {
      expect(() => fp8ToNumber(bad, 'F8_E4M3')).toThrow(
        expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
      );
    }
  });
});

describe('dequantizeFp8Blocks', () => {
  const R = 5;
  const C = 7;
  const block: [number, number] = [2, 3];
  const scaleShape: [number, number] = [Math.ceil(R / 2), Math.ceil(C / 3)];
  // Deterministic weights covering many bytes (NaN bytes excluded from the reference check below).
  const data = new Uint8Array(R * C).map((_, i) => (i * 37 + 11) % 256);
  const scaleInv = new Float32Array(scaleShape[0] * scaleShape[1]).map((_, i) =>
    Math.fround(0.37 + i * 1.913),
  );

  /** Hand-written reference: float32 product, read back as F32 bits. */
  function reference(dtype: 'F8_E4M3' | 'F8_E5M2'): Float32Array {
    const out = new Float32Array(R * C);
    for (let i = 0; i < R; i++) {
      for (let j = 0; j < C; j++) {
        const s = scaleInv[Math.floor(i / block[0]) * scaleShape[1] + Math.floor(j / block[1])];
        out[i * C + j] = Math.fround(Math.fround(decodeFp8(data[i * C + j], dtype)) * s);
      }
    }
    return out;
  }

  for (const dtype of ['F8_E4M3', 'F8_E5M2'] as const) {
    it(`${dtype}: full tensor to F32, BF16 and F16 matches the reference`, () => {
      const ref = reference(dtype);
      const refBytes = new Uint8Array(ref.buffer);
      const args = { data, dtype, rowStart: 0, rows: R, cols: C, scaleInv, scaleShape, blockSize: block };
      const f32 = new Float32Array(dequantizeFp8Blocks({ ...args, to: 'F32' }).buffer);
      for (let k = 0; k < R * C; k++) expect(Object.is(f32[k], ref[k]), `element ${k}`).toBe(true);
      // BF16/F16 results are the F32 products rounded once (castElements is checked against torch above).
      for (const to of ['BF16', 'F16'] as const) {
        const got = dequantizeFp8Blocks({ ...args, to });
        expect(Buffer.from(got).equals(Buffer.from(castElements(refBytes, 'F32', to)))).toBe(true);
      }
    });
  }

  it('a chunk with rowStart > 0 gives the matching rows of the full result', () => {
    const base = {
      dtype: 'F8_E4M3' as const,
      cols: C,
      scaleInv,
      scaleShape,
      blockSize: block,
      to: 'BF16' as const,
    };
    const full = dequantizeFp8Blocks({ ...base, data, rowStart: 0, rows: R });
    for (const [start, rows] of [
      [1, 3],
      [3, 2],
      [4, 1],
      [2, 0],
    ]) {
      const chunk = dequantizeFp8Blocks({
        ...base,
        data: data.subarray(start * C, (start + rows) * C),
        rowStart: start,
        rows,
      });
      expect(
        Buffer.from(chunk).equals(Buffer.from(full.subarray(start * C * 2, (start + rows) * C * 2))),
      ).toBe(true);
    }
  });

  it('a DeepSeek-shaped 128x128 block example', () => {
    const rows = 130;
    const cols = 260;
    const w = new Uint8Array(rows * cols).fill(0x38); // 1.0
    const s = new Float32Array([2, 3, 4, 5, 6, 7]); // [ceil(130/128), ceil(260/128)] = [2, 3]
    const out = new Float32Array(
      dequantizeFp8Blocks({
        data: w,
        dtype: 'F8_E4M3',
        rowStart: 0,
        rows,
        cols,
        scaleInv: s,
        scaleShape: [2, 3],
        blockSize: [128, 128],
        to: 'F32',
      }).buffer,
    );
    expect([out[0], out[127], out[128], out[256], out[129 * cols], out[129 * cols + 259]]).toEqual([
      2, 2, 3, 4, 5, 7,
    ]);
  });

  it('rejects inconsistent shapes and arguments', () => {
    const args = {
      data,
      dtype: 'F8_E4M3' as const,
      rowStart: 0,
      rows: R,
      cols: C,
      scaleInv,
      scaleShape,
      blockSize: block,
      to: 'F32' as const,
    };
    const code = (c: string) => expect.objectContaining({ name: 'ConvertError', code: c });
    expect(() => dequantizeFp8Blocks({ ...args, data: data.subarray(1) })).toThrow(code('SHAPE_MISMATCH'));
    expect(() => dequantizeFp8Blocks({ ...args, scaleShape: [3, 2] })).toThrow(code('SHAPE_MISMATCH'));
    expect(() => dequantizeFp8Blocks({ ...args, scaleInv: scaleInv.subarray(1) })).toThrow(
      code('SHAPE_MISMATCH'),
    );
    // Rows 4..5 need scale row 2, which a [3, 3] scale tensor has; rows 5..6 need row 3, which it lacks.
    expect(() =>
      dequantizeFp8Blocks({ ...args, data: data.subarray(0, 2 * C), rowStart: 4, rows: 2 }),
    ).not.toThrow();
    expect(() =>
      dequantizeFp8Blocks({ ...args, data: data.subarray(0, 2 * C), rowStart: 5, rows: 2 }),
    ).toThrow(/scale row 3/);
    expect(() => dequantizeFp8Blocks({ ...args, blockSize: [0, 3] })).toThrow(code('INVALID_ARGUMENT'));
    expect(() => dequantizeFp8Blocks({ ...args, rowStart: -1 })).toThrow(code('INVALID_ARGUMENT'));
    expect(() => dequantizeFp8Blocks({ ...args, dtype: 'F16' as 'F8_E4M3' })).toThrow(
      code('INVALID_ARGUMENT'),
    );
    expect(() => dequantizeFp8Blocks({ ...args, to: 'F64' as 'F32' })).toThrow(code('INVALID_ARGUMENT'));
  });
});

describe('castElements contract', () => {
  it('from === to returns the same buffer', () => {
    const data = new Uint8Array([1, 2, 3, 4]);
    expect(castElements(data, 'F32', 'F32')).toBe(data);
    expect(castElements(data, 'I32', 'I32')).toBe(data);
  });

  it('handles unaligned input views and leaves the input untouched', () => {
    const values = [1.5, -2.25, 65504, 1e-7];
    const aligned = new Uint8Array(new Float32Array(values).buffer);
    const backing = new Uint8Array(aligned.byteLength + 3);
    backing.set(aligned, 1);
    const unaligned = backing.subarray(1, 1 + aligned.byteLength);
    const before = backing.slice();
    for (const to of ['BF16', 'F16', 'F64'] as const) {
      expect(
        Buffer.from(castElements(unaligned, 'F32', to)).equals(Buffer.from(castElements(aligned, 'F32', to))),
      ).toBe(true);
    }
    expect(backing).toEqual(before);
    expect(Array.from(new Float64Array(castElements(unaligned, 'F32', 'F64').buffer))).toEqual(
      values.map((v) => Math.fround(v)),
    );
  });

  it('empty input gives empty output', () => {
    expect(castElements(new Uint8Array(0), 'BF16', 'F32').byteLength).toBe(0);
  });

  it('isFloatDtype', () => {
    const yes: SafetensorsDtype[] = ['F64', 'F32', 'F16', 'BF16', 'F8_E4M3', 'F8_E5M2'];
    const no: SafetensorsDtype[] = ['F8_E8M0', 'C64', 'I32', 'U8', 'BOOL', 'I64'];
    for (const d of yes) expect(isFloatDtype(d)).toBe(true);
    for (const d of no) expect(isFloatDtype(d)).toBe(false);
  });

  it('rejects casts to fp8 and between non-float dtypes with UNSUPPORTED naming both dtypes', () => {
    const cases: [SafetensorsDtype, SafetensorsDtype][] = [
      ['F32', 'F8_E4M3'],
      ['BF16', 'F8_E5M2'],
      ['F8_E4M3', 'F8_E5M2'],
      ['I32', 'F32'],
      ['F32', 'I32'],
      ['BOOL', 'U8'],
      ['F8_E8M0', 'F32'],
    ];
    for (const [from, to] of cases) {
      let err: unknown;
      try {
        castElements(new Uint8Array(8), from, to, 'model.layers.0.mlp.weight');
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(ConvertError);
      expect((err as ConvertError).code).toBe('UNSUPPORTED');
      expect((err as ConvertError).message).toContain(from);
      expect((err as ConvertError).message).toContain(to);
      expect((err as ConvertError).message).toContain('model.layers.0.mlp.weight');
    }
  });

  it('rejects byte lengths that are not a whole number of elements', () => {
    expect(() => castElements(new Uint8Array(6), 'F32', 'BF16', 'w')).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT', message: expect.stringContaining('w: 6 bytes') }),
    );
    expect(() => castElements(new Uint8Array(3), 'BF16', 'F32')).toThrow(ConvertError);
    expect(() => castElements(new Uint8Array(12), 'F64', 'F32')).toThrow(ConvertError);
  });
});
