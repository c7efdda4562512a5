import { describe, expect, it } from 'vitest';
import {
  ConvertError,
  concatDim,
  concatRows,
  fuseGateUp,
  fuseQkv,
  paddedVocab,
  padVocabRows,
  type SafetensorsDtype,
  sliceDim,
  sliceRows,
  splitGateUp,
  splitQkv,
  type TensorData,
  tpMerge,
  tpMergeGateUp,
  tpMergeQkv,
  tpSplit,
  tpSplitGateUp,
  tpSplitQkv,
  unpadVocabRows,
} from '../src/index.js';

// Test tensors hold small integer "codes" that name where each element came from. The codes fit
// in 16 bits, so BF16 tensors store them as raw words and F32 tensors as exact floats; either way
// the layout can be checked element by element and round trips compared byte by byte.
type Dtype = Extract<SafetensorsDtype, 'F32' | 'BF16'>;
const DTYPES: Dtype[] = ['F32', 'BF16'];

function make(dtype: Dtype, shape: number[], code: (row: number, col: number) => number): TensorData {
  const rows = shape[0] ?? 1;
  const cols = shape.length > 1 ? (shape[1] ?? 1) : 1;
  const arr = dtype === 'F32' ? new Float32Array(rows * cols) : new Uint16Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) arr[r * cols + c] = code(r, c);
  return { dtype, shape, data: new Uint8Array(arr.buffer) };
}

function codes(t: TensorData): number[] {
  const buf = t.data.slice().buffer;
  return Array.from(t.dtype === 'F32' ? new Float32Array(buf) : new Uint16Array(buf));
}

const KIND = { q: 0, k: 1, v: 2, gate: 0, up: 1 } as const;
// kind, head (or row block), row inside the head, column.
const code = (kind: number, head: number, r: number, col: number): number =>
  kind * 4096 + head * 256 + r * 16 + col;

interface Geo {
  name: string;
  h: number;
  g: number;
  d: number;
}
const GEOS: Geo[] = [
  { name: 'MHA', h: 4, g: 4, d: 2 },
  { name: 'GQA 8/4', h: 8, g: 4, d: 2 },
  { name: 'GQA 8/2', h: 8, g: 2, d: 3 },
];
const HIDDEN = 3;

// HF q/k/v for a geometry; `bias` gives 1-D [out] tensors (column fixed at 0).
function hfQkv(
  dtype: Dtype,
  geo: Geo,
  bias = false,
  headOffset = 0,
  groupOffset = 0,
  nh = geo.h,
  ng = geo.g,
) {
  const { d } = geo;
  const shape = (rows: number) => (bias ? [rows] : [rows, HIDDEN]);
  return {
    q: make(dtype, shape(nh * d), (row, c) => code(KIND.q, headOffset + Math.floor(row / d), row % d, c)),
    k: make(dtype, shape(ng * d), (row, c) => code(KIND.k, groupOffset + Math.floor(row / d), row % d, c)),
    v: make(dtype, shape(ng * d), (row, c) => code(KIND.v, groupOffset + Math.floor(row / d), row % d, c)),
  };
}

// Expected Megatron linear_qkv codes for groups [g0, g1), written out independently of the code under test.
function expectedQkvCodes(geo: Geo, g0: number, g1: number, cols: number): number[] {
  const out: number[] = [];
  const perGroup = geo.h / geo.g;
  for (let g = g0; g < g1; g++) {
    for (let j = 0; j < perGroup; j++) {
      for (let r = 0; r < geo.d; r++)
        for (let c = 0; c < cols; c++) out.push(code(KIND.q, g * perGroup + j, r, c));
    }
    for (let r = 0; r < geo.d; r++) for (let c = 0; c < cols; c++) out.push(code(KIND.k, g, r, c));
    for (let r = 0; r < geo.d; r++) for (let c = 0; c < cols; c++) out.push(code(KIND.v, g, r, c));
  }
  return out;
}

function expectConvertError(fn: () => unknown, code: string, ...fragments: string[]): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(ConvertError);
  const err = caught as ConvertError;
  expect(err.code).toBe(code);
  for (const f of fragments) expect(err.message).toContain(f);
}

const dims = (geo: Geo) => ({ numHeads: geo.h, numQueryGroups: geo.g, headDim: geo.d });

describe('slice and concat', () => {
  for (const dtype of DTYPES) {
    it(`slices and concatenates along dims 0 and 1 (${dtype})`, () => {
      const t = make(dtype, [4, 5], (r, c) => r * 16 + c);
      const rows = sliceRows(t, 1, 2);
      expect(rows.shape).toEqual([2, 5]);
      expect(codes(rows)).toEqual([16, 17, 18, 19, 20, 32, 33, 34, 35, 36]);
      const cols = sliceDim(t, 1, 3, 2);
      expect(cols.shape).toEqual([4, 2]);
      expect(codes(cols)).toEqual([3, 4, 19, 20, 35, 36, 51, 52]);
      const back = concatDim([sliceDim(t, 1, 0, 3), cols], 1);
      expect(back.shape).toEqual([4, 5]);
      expect(back.data).toEqual(t.data);
      expect(concatRows([sliceRows(t, 0, 1), sliceRows(t, 1, 3)]).data).toEqual(t.data);
    });
  }

  it('slices a 3-D tensor along the middle dim', () => {
    const t = make('F32', [2, 6], (r, c) => r * 16 + c);
    const t3: TensorData = { ...t, shape: [2, 3, 2] };
    const s = sliceDim(t3, 1, 1, 1);
    expect(s.shape).toEqual([2, 1, 2]);
    expect(codes(s)).toEqual([2, 3, 18, 19]);
  });

  it('rejects bad ranges, mismatched parts and wrong byte lengths', () => {
    const t = make('F32', [4, 5], () => 0);
    expectConvertError(() => sliceRows(t, 3, 2), 'SHAPE_MISMATCH', '[3, 5)', '[4,5]');
    expectConvertError(() => sliceDim(t, 2, 0, 1), 'INVALID_ARGUMENT', 'dim 2');
    expectConvertError(
      () => concatRows([t, make('F32', [1, 4], () => 0)]),
      'SHAPE_MISMATCH',
      'part 1',
      '[1,4]',
    );
    expectConvertError(() => concatRows([t, make('BF16', [1, 5], () => 0)]), 'SHAPE_MISMATCH', 'BF16');
    expectConvertError(() => concatRows([]), 'INVALID_ARGUMENT');
    expectConvertError(() => sliceRows({ ...t, shape: [5, 5] }, 0, 1), 'SHAPE_MISMATCH', '100 bytes', '80');
  });
});

describe('fused QKV', () => {
  for (const dtype of DTYPES) {
    for (const geo of GEOS) {
      for (const bias of [false, true]) {
        const what = `${geo.name} ${dtype}${bias ? ' bias' : ''}`;
        const cols = bias ? 1 : HIDDEN;

        it(`fuses per KV group and splits back exactly (${what})`, () => {
          const parts = hfQkv(dtype, geo, bias);
          const fused = fuseQkv(parts, dims(geo));
          const rows = (geo.h + 2 * geo.g) * geo.d;
          expect(fused.shape).toEqual(bias ? [rows] : [rows, HIDDEN]);
          expect(codes(fused)).toEqual(expectedQkvCodes(geo, 0, geo.g, cols));
          const back = splitQkv(fused, dims(geo));
          for (const key of ['q', 'k', 'v'] as const) {
            expect(back[key].shape).toEqual(parts[key].shape);
            expect(back[key].data).toEqual(parts[key].data);
          }
        });

        for (const tp of [1, 2, 4]) {
          if (geo.g % tp !== 0) continue;
          it(`tp ${tp}: each rank holds its own groups' [q, k, v] and merging restores the whole (${what})`, () => {
            const fused = fuseQkv(hfQkv(dtype, geo, bias), dims(geo));
            const gpr = geo.g / tp;
            const hpr = geo.h / tp;
            const shards: TensorData[] = [];
            for (let rank = 0; rank < tp; rank++) {
              const shard = tpSplitQkv(fused, { ...dims(geo), tp, rank });
              expect(codes(shard)).toEqual(expectedQkvCodes(geo, rank * gpr, (rank + 1) * gpr, cols));
              // The same shard fused directly from only this rank's heads (as a TP-local layer would).
              const local = hfQkv(dtype, geo, bias, rank * hpr, rank * gpr, hpr, gpr);
              const direct = fuseQkv(local, { numHeads: hpr, numQueryGroups: gpr, headDim: geo.d });
              expect(shard.shape).toEqual(direct.shape);
              expect(shard.data).toEqual(direct.data);
              shards.push(shard);
            }
            const merged = tpMergeQkv(shards, dims(geo));
            expect(merged.shape).toEqual(fused.shape);
            expect(merged.data).toEqual(fused.data);
          });
        }
      }
    }
  }

  it('names the tensor, its shape and the expected rows on a mismatch', () => {
    const geo = { name: 'x', h: 8, g: 4, d: 2 };
    const { q, v } = hfQkv('F32', geo);
    const bigK = make('F32', [16, HIDDEN], () => 0);
    expectConvertError(
      () => fuseQkv({ q, k: bigK, v }, dims(geo)),
      'SHAPE_MISMATCH',
      'fuseQkv: k [16,3] does not match numQueryGroups*headDim = 8 rows',
    );
    const k = make('F32', [8, 2], () => 0);
    expectConvertError(() => fuseQkv({ q, k, v }, dims(geo)), 'SHAPE_MISMATCH', 'part');
    expectConvertError(
      () => fuseQkv({ q, k: v, v }, { numHeads: 6, numQueryGroups: 4, headDim: 2 }),
      'INVALID_ARGUMENT',
      'numHeads 6',
    );
    const fused = fuseQkv(hfQkv('F32', geo), dims(geo));
    expectConvertError(
      () => splitQkv(sliceRows(fused, 0, 20), dims(geo)),
      'SHAPE_MISMATCH',
      'fused [20,3]',
      '32 rows',
    );
    expectConvertError(
      () => tpSplitQkv(fused, { ...dims(geo), tp: 8, rank: 0 }),
      'SHAPE_MISMATCH',
      'tp 8',
      '[32,3]',
    );
    expectConvertError(
      () => tpSplitQkv(fused, { ...dims(geo), tp: 2, rank: 2 }),
      'INVALID_ARGUMENT',
      'rank 2',
    );
    expectConvertError(() => tpMergeQkv([fused, fused], dims(geo)), 'SHAPE_MISMATCH', 'part 0');
  });
});

describe('fused gate/up', () => {
  const FFN = 8;
  for (const dtype of DTYPES) {
    const gate = make(dtype, [FFN, HIDDEN], (r, c) => code(KIND.gate, r, 0, c));
    const up = make(dtype, [FFN, HIDDEN], (r, c) => code(KIND.up, r, 0, c));

    it(`fuses as [gate; up] and splits back (${dtype})`, () => {
      const fused = fuseGateUp(gate, up);
      expect(fused.shape).toEqual([2 * FFN, HIDDEN]);
      const expected: number[] = [];
      for (const kind of [KIND.gate, KIND.up]) {
        for (let r = 0; r < FFN; r++) for (let c = 0; c < HIDDEN; c++) expected.push(code(kind, r, 0, c));
      }
      expect(codes(fused)).toEqual(expected);
      const back = splitGateUp(fused);
      expect(back.gate.data).toEqual(gate.data);
      expect(back.up.data).toEqual(up.data);
    });

    for (const tp of [1, 2, 4]) {
      it(`tp ${tp}: rank r holds [gate_r; up_r] and merging restores fc1 (${dtype})`, () => {
        const fused = fuseGateUp(gate, up);
        const per = FFN / tp;
        const shards: TensorData[] = [];
        for (let rank = 0; rank < tp; rank++) {
          const shard = tpSplitGateUp(fused, { tp, rank });
          const expected: number[] = [];
          for (const kind of [KIND.gate, KIND.up]) {
            for (let r = rank * per; r < (rank + 1) * per; r++) {
              for (let c = 0; c < HIDDEN; c++) expected.push(code(kind, r, 0, c));
            }
          }
          expect(shard.shape).toEqual([2 * per, HIDDEN]);
          expect(codes(shard)).toEqual(expected);
          shards.push(shard);
        }
        expect(tpMergeGateUp(shards).data).toEqual(fused.data);
      });
    }
  }

  it('rejects mismatched halves and indivisible splits', () => {
    const gate = make('F32', [6, HIDDEN], () => 0);
    expectConvertError(
      () =>
        fuseGateUp(
          gate,
          make('F32', [4, HIDDEN], () => 0),
        ),
      'SHAPE_MISMATCH',
      'up',
      '[4,3]',
      '[6,3]',
    );
    expectConvertError(() => splitGateUp(make('F32', [5, HIDDEN], () => 0)), 'SHAPE_MISMATCH', '[5,3]');
    expectConvertError(
      () => tpSplitGateUp(fuseGateUp(gate, gate), { tp: 4, rank: 0 }),
      'SHAPE_MISMATCH',
      'ffn 6',
      'tp 4',
    );
    expectConvertError(() => tpMergeGateUp([]), 'INVALID_ARGUMENT');
  });
});

describe('plain tensor parallel', () => {
  for (const dtype of DTYPES) {
    for (const tp of [1, 2, 4]) {
      for (const dim of [0, 1]) {
        it(`${dim === 0 ? 'column' : 'row'} parallel tp ${tp} round trips (${dtype})`, () => {
          const t = make(dtype, [8, 12], (r, c) => r * 16 + c);
          const parts = Array.from({ length: tp }, (_, rank) => tpSplit(t, { dim, tp, rank }));
          for (const [rank, p] of parts.entries()) {
            const expected: number[] = [];
            const rows = dim === 0 ? 8 / tp : 8;
            const cols = dim === 1 ? 12 / tp : 12;
            for (let r = 0; r < rows; r++) {
              for (let c = 0; c < cols; c++) {
                const gr = dim === 0 ? rank * rows + r : r;
                const gc = dim === 1 ? rank * cols + c : c;
                expected.push(gr * 16 + gc);
              }
            }
            expect(p.shape).toEqual([rows, cols]);
            expect(codes(p)).toEqual(expected);
          }
          const merged = tpMerge(parts, dim);
          expect(merged.shape).toEqual([8, 12]);
          expect(merged.data).toEqual(t.data);
        });
      }
    }
  }

  it('splits a 1-D bias along dim 0', () => {
    const b = make('BF16', [8], (r) => r);
    expect(codes(tpSplit(b, { dim: 0, tp: 4, rank: 3 }))).toEqual([6, 7]);
  });

  it('rejects an indivisible dim, naming the shape and tp', () => {
    const t = make('F32', [6, 10], () => 0);
    expectConvertError(() => tpSplit(t, { dim: 1, tp: 4, rank: 0 }), 'SHAPE_MISMATCH', '[6,10]', 'tp 4');
    expectConvertError(() => tpSplit(t, { dim: 0, tp: 0, rank: 0 }), 'INVALID_ARGUMENT', 'tp');
    expectConvertError(() => tpSplit(t, { dim: 2, tp: 2, rank: 0 }), 'INVALID_ARGUMENT', 'dim 2');
  });
});

describe('vocabulary padding', () => {
  it('rounds up to a multiple of divisibleBy × tp', () => {
    expect(paddedVocab(151936, 128, 1)).toBe(151936);
    expect(paddedVocab(151936, 128, 8)).toBe(152576);
    expect(paddedVocab(32000, 128, 2)).toBe(32000);
    expect(paddedVocab(50257, 128, 1)).toBe(50304);
    expect(paddedVocab(1, 1, 1)).toBe(1);
    expectConvertError(() => paddedVocab(100, 0, 1), 'INVALID_ARGUMENT', 'divisibleBy');
  });

  for (const dtype of DTYPES) {
    it(`pads with zero rows and unpads exactly (${dtype})`, () => {
      const t = make(dtype, [5, HIDDEN], (r, c) => 1 + r * 16 + c);
      const size = paddedVocab(5, 4, 2);
      expect(size).toBe(8);
      const padded = padVocabRows(t, size);
      expect(padded.shape).toEqual([8, HIDDEN]);
      const expected = codes(t).concat(new Array(3 * HIDDEN).fill(0));
      expect(codes(padded)).toEqual(expected);
      const back = unpadVocabRows(padded, 5);
      expect(back.shape).toEqual([5, HIDDEN]);
      expect(back.data).toEqual(t.data);
    });
  }

  it('rejects shrinking by padding and growing by unpadding', () => {
    const t = make('F32', [5, HIDDEN], () => 0);
    expectConvertError(() => padVocabRows(t, 4), 'SHAPE_MISMATCH', '[5,3]', '4 rows');
    expectConvertError(() => unpadVocabRows(t, 6), 'SHAPE_MISMATCH', '6 rows', '[5,3]');
  });
});
