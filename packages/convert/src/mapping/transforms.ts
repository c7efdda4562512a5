// Pure layout transforms between Hugging Face tensors and Megatron-Core parameters: fused QKV and
// SwiGLU fc1, tensor-parallel splits and vocabulary padding. They move raw bytes only, so every
// dtype (BF16 and FP8 included) round-trips exactly and no value is ever reinterpreted.
import { ConvertError } from '../errors.js';
import { byteLengthOf, DTYPE_SIZE } from '../safetensors/dtype.js';
import type { TensorData } from '../safetensors/file.js';

/** Attention head geometry of a fused `linear_qkv` (H query heads in G KV groups of `headDim`). */
export interface QkvDims {
  numHeads: number;
  numQueryGroups: number;
  headDim: number;
}

/** Where one tensor-parallel shard sits: `rank` of `tp`. */
export interface TpRank {
  tp: number;
  rank: number;
}

const fmt = (shape: readonly number[]): string => `[${shape.join(',')}]`;

function fail(message: string): never {
  throw new ConvertError('SHAPE_MISMATCH', message);
}

function checkPositiveInt(where: string, name: string, n: number): void {
  if (!Number.isSafeInteger(n) || n < 1) {
    throw new ConvertError('INVALID_ARGUMENT', `${where}: ${name} must be a positive integer, got ${n}`);
  }
}

// A tensor whose byte length disagrees with its shape would make every offset below wrong.
function checkTensor(where: string, t: TensorData): void {
  const want = byteLengthOf(t.dtype, t.shape, where);
  if (t.data.byteLength !== want) {
    fail(`${where}: ${t.dtype} ${fmt(t.shape)} needs ${want} bytes, got ${t.data.byteLength}`);
  }
}

function checkDim(where: string, t: TensorData, dim: number): void {
  if (!Number.isInteger(dim) || dim < 0 || dim >= t.shape.length) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `${where}: dim ${dim} is out of range for shape ${fmt(t.shape)}`,
    );
  }
}

function product(dims: readonly number[]): number {
  let n = 1;
  for (const d of dims) n *= d;
  return n;
}

/** Copies `count` entries starting at `start` along `dim` (any rank ≥ 1). */
export function sliceDim(t: TensorData, dim: number, start: number, count: number): TensorData {
  checkTensor('sliceDim', t);
  checkDim('sliceDim', t, dim);
  const size = t.shape[dim] as number;
  if (
    !Number.isInteger(start) ||
    !Number.isInteger(count) ||
    start < 0 ||
    count < 0 ||
    start + count > size
  ) {
    fail(`sliceDim: [${start}, ${start + count}) is out of range for dim ${dim} of ${fmt(t.shape)}`);
  }
  const outer = product(t.shape.slice(0, dim));
  // Bytes of one index step along `dim`: everything to its right is contiguous.
  const inner = product(t.shape.slice(dim + 1)) * DTYPE_SIZE[t.dtype];
  const shape = t.shape.slice();
  shape[dim] = count;
  const out = new Uint8Array(outer * count * inner);
  for (let o = 0; o < outer; o++) {
    const from = (o * size + start) * inner;
    out.set(t.data.subarray(from, from + count * inner), o * count * inner);
  }
  return { dtype: t.dtype, shape, data: out };
}

/** Concatenates tensors along `dim`; dtype, rank and all other dims must agree. */
export function concatDim(parts: readonly TensorData[], dim: number): TensorData {
  const first = parts[0];
  if (!first) throw new ConvertError('INVALID_ARGUMENT', 'concatDim: no tensors to concatenate');
  parts.forEach((p, i) => {
    checkTensor(`concatDim part ${i}`, p);
  });
  checkDim('concatDim', first, dim);
  for (const [i, p] of parts.entries()) {
    const same =
      p.dtype === first.dtype &&
      p.shape.length === first.shape.length &&
      p.shape.every((d, j) => j === dim || d === first.shape[j]);
    if (!same) {
      fail(
        `concatDim: part ${i} ${p.dtype} ${fmt(p.shape)} does not match part 0 ${first.dtype} ${fmt(first.shape)} outside dim ${dim}`,
      );
    }
  }
  const outer = product(first.shape.slice(0, dim));
  const inner = product(first.shape.slice(dim + 1)) * DTYPE_SIZE[first.dtype];
  const total = parts.reduce((s, p) => s + (p.shape[dim] as number), 0);
  const shape = first.shape.slice();
  shape[dim] = total;
  const out = new Uint8Array(outer * total * inner);
  let at = 0;
  // Row-major: for each outer index, the parts' blocks follow one another.
  for (let o = 0; o < outer; o++) {
    for (const p of parts) {
      const block = (p.shape[dim] as number) * inner;
      out.set(p.data.subarray(o * block, (o + 1) * block), at);
      at += block;
    }
  }
  return { dtype: first.dtype, shape, data: out };
}

/** Copies rows [start, start + count) of dim 0. */
export function sliceRows(t: TensorData, start: number, count: number): TensorData {
  return sliceDim(t, 0, start, count);
}

/** Stacks tensors along dim 0. */
export function concatRows(parts: readonly TensorData[]): TensorData {
  return concatDim(parts, 0);
}

function checkQkvDims(where: string, d: QkvDims): void {
  checkPositiveInt(where, 'numHeads', d.numHeads);
  checkPositiveInt(where, 'numQueryGroups', d.numQueryGroups);
  checkPositiveInt(where, 'headDim', d.headDim);
  if (d.numHeads % d.numQueryGroups !== 0) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `${where}: numHeads ${d.numHeads} is not a multiple of numQueryGroups ${d.numQueryGroups}`,
    );
  }
}

function checkRows(where: string, name: string, t: TensorData, rows: number, what: string): void {
  checkTensor(`${where} ${name}`, t);
  if (t.shape.length < 1 || t.shape[0] !== rows) {
    fail(`${where}: ${name} ${fmt(t.shape)} does not match ${what} = ${rows} rows`);
  }
}

/**
 * Megatron `linear_qkv` weight or bias from HF q/k/v: per KV group g, [q heads of g; k_g; v_g],
 * i.e. shape [(numHeads + 2·numQueryGroups)·headDim, ...].
 */
export function fuseQkv(parts: { q: TensorData; k: TensorData; v: TensorData }, dims: QkvDims): TensorData {
  checkQkvDims('fuseQkv', dims);
  const { numHeads: h, numQueryGroups: g, headDim: d } = dims;
  const { q, k, v } = parts;
  checkRows('fuseQkv', 'q', q, h * d, 'numHeads*headDim');
  checkRows('fuseQkv', 'k', k, g * d, 'numQueryGroups*headDim');
  checkRows('fuseQkv', 'v', v, g * d, 'numQueryGroups*headDim');
  const qRows = (h / g) * d;
  const blocks: TensorData[] = [];
  for (let i = 0; i < g; i++) {
    blocks.push(sliceRows(q, i * qRows, qRows), sliceRows(k, i * d, d), sliceRows(v, i * d, d));
  }
  // concatRows also rejects q/k/v that differ in dtype or trailing shape.
  return concatRows(blocks);
}

/** Exact inverse of {@link fuseQkv}: the HF q, k and v tensors. */
export function splitQkv(fused: TensorData, dims: QkvDims): { q: TensorData; k: TensorData; v: TensorData } {
  checkQkvDims('splitQkv', dims);
  const { numHeads: h, numQueryGroups: g, headDim: d } = dims;
  checkRows('splitQkv', 'fused', fused, (h + 2 * g) * d, '(numHeads+2*numQueryGroups)*headDim');
  const qRows = (h / g) * d;
  const group = qRows + 2 * d;
  const qs: TensorData[] = [];
  const ks: TensorData[] = [];
  const vs: TensorData[] = [];
  for (let i = 0; i < g; i++) {
    qs.push(sliceRows(fused, i * group, qRows));
    ks.push(sliceRows(fused, i * group + qRows, d));
    vs.push(sliceRows(fused, i * group + qRows + d, d));
  }
  return { q: concatRows(qs), k: concatRows(ks), v: concatRows(vs) };
}

/** Megatron SwiGLU `linear_fc1` [2·ffn, ...] = [gate; up]. */
export function fuseGateUp(gate: TensorData, up: TensorData): TensorData {
  checkTensor('fuseGateUp gate', gate);
  checkTensor('fuseGateUp up', up);
  if (gate.dtype !== up.dtype || fmt(gate.shape) !== fmt(up.shape)) {
    fail(`fuseGateUp: up ${up.dtype} ${fmt(up.shape)} does not match gate ${gate.dtype} ${fmt(gate.shape)}`);
  }
  return concatRows([gate, up]);
}

/** Exact inverse of {@link fuseGateUp}. */
export function splitGateUp(fused: TensorData): { gate: TensorData; up: TensorData } {
  checkTensor('splitGateUp', fused);
  const rows = fused.shape[0];
  if (rows === undefined || rows % 2 !== 0) {
    fail(`splitGateUp: fused ${fmt(fused.shape)} has no even number of rows to halve into [gate; up]`);
  }
  const half = rows / 2;
  return { gate: sliceRows(fused, 0, half), up: sliceRows(fused, half, half) };
}

function checkTpRank(where: string, r: TpRank): void {
  checkPositiveInt(where, 'tp', r.tp);
  if (!Number.isInteger(r.rank) || r.rank < 0 || r.rank >= r.tp) {
    throw new ConvertError('INVALID_ARGUMENT', `${where}: rank ${r.rank} is out of range for tp ${r.tp}`);
  }
}

/** Rank `rank`'s even share of `t` along `dim` (0 = column parallel, 1 = row parallel). */
export function tpSplit(t: TensorData, opts: TpRank & { dim: number }): TensorData {
  checkTpRank('tpSplit', opts);
  checkTensor('tpSplit', t);
  checkDim('tpSplit', t, opts.dim);
  const size = t.shape[opts.dim] as number;
  if (size % opts.tp !== 0) {
    fail(`tpSplit: dim ${opts.dim} of shape ${fmt(t.shape)} is not divisible by tp ${opts.tp}`);
  }
  const share = size / opts.tp;
  return sliceDim(t, opts.dim, opts.rank * share, share);
}

/** Inverse of {@link tpSplit}: the ranks' shares (in rank order) joined along `dim`. */
export function tpMerge(parts: readonly TensorData[], dim: number): TensorData {
  return concatDim(parts, dim);
}

/**
 * Rank `rank`'s shard of a fused `linear_qkv`: KV groups [r·G/tp, (r+1)·G/tp), each still
 * [q heads; k; v]. The fused layout is group-major, so this is one contiguous run of rows.
 */
export function tpSplitQkv(fused: TensorData, opts: QkvDims & TpRank): TensorData {
  checkQkvDims('tpSplitQkv', opts);
  checkTpRank('tpSplitQkv', opts);
  const { numHeads: h, numQueryGroups: g, headDim: d, tp, rank } = opts;
  checkRows('tpSplitQkv', 'fused', fused, (h + 2 * g) * d, '(numHeads+2*numQueryGroups)*headDim');
  // Megatron gives each rank whole KV groups; it cannot split one group's k/v across ranks.
  if (g % tp !== 0)
    fail(`tpSplitQkv: numQueryGroups ${g} of ${fmt(fused.shape)} is not divisible by tp ${tp}`);
  const rows = (fused.shape[0] as number) / tp;
  return sliceRows(fused, rank * rows, rows);
}

/** Inverse of {@link tpSplitQkv}: the full fused `linear_qkv` from every rank's shard. */
export function tpMergeQkv(parts: readonly TensorData[], dims: QkvDims): TensorData {
  checkQkvDims('tpMergeQkv', dims);
  const { numHeads: h, numQueryGroups: g, headDim: d } = dims;
  const tp = parts.length;
  if (tp < 1 || g % tp !== 0) fail(`tpMergeQkv: numQueryGroups ${g} is not divisible by ${tp} parts`);
  const rows = ((h + 2 * g) * d) / tp;
  parts.forEach((p, i) => {
    checkRows('tpMergeQkv', `part ${i}`, p, rows, '(numHeads+2*numQueryGroups)*headDim/tp');
  });
  return concatRows(parts);
}

/** Rank `rank`'s shard of a fused fc1 [gate; up]: [gate_r; up_r], as Megatron column-parallel fc1 holds it. */
export function tpSplitGateUp(fused: TensorData, opts: TpRank): TensorData {
  checkTpRank('tpSplitGateUp', opts);
  const { gate, up } = splitGateUp(fused);
  const ffn = gate.shape[0] as number;
  if (ffn % opts.tp !== 0) {
    fail(`tpSplitGateUp: ffn ${ffn} of fused ${fmt(fused.shape)} is not divisible by tp ${opts.tp}`);
  }
  return concatRows([tpSplit(gate, { ...opts, dim: 0 }), tpSplit(up, { ...opts, dim: 0 })]);
}

/** Inverse of {@link tpSplitGateUp}: [gate; up] from every rank's [gate_r; up_r] (in rank order). */
export function tpMergeGateUp(parts: readonly TensorData[]): TensorData {
  if (parts.length === 0) throw new ConvertError('INVALID_ARGUMENT', 'tpMergeGateUp: no parts to merge');
  const halves = parts.map((p) => splitGateUp(p));
  return concatRows([...halves.map((x) => x.gate), ...halves.map((x) => x.up)]);
}

/** Megatron's padded vocabulary: `vocab` rounded up to a multiple of divisibleBy·tp. */
export function paddedVocab(vocab: number, divisibleBy: number, tp: number): number {
  checkPositiveInt('paddedVocab', 'vocab', vocab);
  checkPositiveInt('paddedVocab', 'divisibleBy', divisibleBy);
  checkPositiveInt('paddedVocab', 'tp', tp);
  const multiple = divisibleBy * tp;
  return Math.ceil(vocab / multiple) * multiple;
}

/** Appends zero rows to an embedding / output layer so it has `paddedSize` rows. */
export function padVocabRows(t: TensorData, paddedSize: number): TensorData {
  checkTensor('padVocabRows', t);
  const rows = t.shape[0];
  if (rows === undefined || !Number.isInteger(paddedSize) || paddedSize < rows) {
    fail(`padVocabRows: cannot pad ${fmt(t.shape)} to ${paddedSize} rows`);
  }
  const shape = t.shape.slice();
  shape[0] = paddedSize;
  // A fresh Uint8Array is zero-filled, which is +0 in every float dtype.
  const data = new Uint8Array(byteLengthOf(t.dtype, shape));
  data.set(t.data);
  return { dtype: t.dtype, shape, data };
}

/** Drops the padding rows again: the first `vocab` rows. */
export function unpadVocabRows(t: TensorData, vocab: number): TensorData {
  checkTensor('unpadVocabRows', t);
  const rows = t.shape[0];
  if (rows === undefined || !Number.isInteger(vocab) || vocab < 0 || vocab > rows) {
    fail(`unpadVocabRows: cannot keep ${vocab} rows of ${fmt(t.shape)}`);
  }
  return sliceRows(t, 0, vocab);
}
