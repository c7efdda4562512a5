// One source of truth for how a parameter is cut across tensor-parallel ranks: the split rules of
// @megapatch/convert. A layer takes its shard of the full (master) weight through `shardOf`, which
// hands the raw bytes to the converter's transform, so rank r holds byte for byte the piece the
// converter writes for rank r.
import {
  type Partition,
  paddedVocab,
  padVocabRows,
  type QkvDims,
  type SafetensorsDtype,
  type TensorData,
  tpMerge,
  tpMergeGateUp,
  tpMergeQkv,
  tpSplit,
  tpSplitGateUp,
  tpSplitQkv,
  unpadVocabRows,
} from '@megapatch/convert';
import { type DType, fromTypedArray, type Tensor } from '@megapatch/tensor';
import { DistributedError } from '../errors.js';

export type { Partition, QkvDims } from '@megapatch/convert';

/** Options of {@link shardOf} and {@link gatherShards}. */
export interface ShardOptions {
  /** Tensor-parallel size. */
  tp: number;
  /** This rank within the tensor-parallel group (unused by gatherShards). */
  rank: number;
  /** Head geometry of a fused QKV tensor (partition 'qkv'). */
  qkvDims?: QkvDims;
  /** Real vocabulary size (partition 'vocab'; default: the full tensor's rows). */
  vocabSize?: number;
  /** Megatron's --make-vocab-size-divisible-by (partition 'vocab'; default 128). */
  makeVocabSizeDivisibleBy?: number;
}

const TO_SAFETENSORS: Record<DType, SafetensorsDtype> = {
  float32: 'F32',
  float64: 'F64',
  bfloat16: 'BF16',
  float16: 'F16',
  int32: 'I32',
  int64: 'I64',
  uint8: 'U8',
  bool: 'BOOL',
};

const FROM_SAFETENSORS: Partial<Record<SafetensorsDtype, DType>> = Object.fromEntries(
  Object.entries(TO_SAFETENSORS).map(([k, v]) => [v, k as DType]),
);

/** The raw bytes of `t` (row-major, little-endian) in the converter's tensor form. */
export function toTensorData(t: Tensor): TensorData {
  return { dtype: TO_SAFETENSORS[t.dtype], shape: [...t.shape], data: t.toBytes() };
}

/** A new tensor holding the bytes of `d` (copied). */
export function fromTensorData(d: TensorData): Tensor {
  const dtype = FROM_SAFETENSORS[d.dtype];
  if (!dtype) {
    throw new DistributedError('INVALID_ARGUMENT', `fromTensorData: dtype ${d.dtype} has no tensor dtype`);
  }
  // Typed arrays need an aligned buffer; a fresh copy always is.
  const bytes = d.data.byteOffset % 8 === 0 ? d.data : d.data.slice();
  const { buffer, byteOffset, byteLength } = bytes;
  const shape = [...d.shape];
  switch (dtype) {
    case 'float32':
      return fromTypedArray(new Float32Array(buffer, byteOffset, byteLength / 4), shape);
    case 'float64':
      return fromTypedArray(new Float64Array(buffer, byteOffset, byteLength / 8), shape);
    case 'bfloat16':
    case 'float16':
      return fromTypedArray(new Uint16Array(buffer, byteOffset, byteLength / 2), shape, { dtype });
    case 'int32':
      return fromTypedArray(new Int32Array(buffer, byteOffset, byteLength / 4), shape);
    case 'int64':
      return fromTypedArray(new BigInt64Array(buffer, byteOffset, byteLength / 8), shape);
    case 'uint8':
    case 'bool':
      return fromTypedArray(new Uint8Array(buffer, byteOffset, byteLength), shape, { dtype });
  }
}

function qkvDimsOf(where: string, opts: ShardOptions): QkvDims {
  if (!opts.qkvDims) {
    throw new DistributedError('INVALID_ARGUMENT', `${where}: partition 'qkv' needs opts.qkvDims`);
  }
  return opts.qkvDims;
}

/** Rows of the padded vocabulary for a full tensor of `rows` rows. */
function paddedRows(rows: number, opts: ShardOptions): number {
  return paddedVocab(opts.vocabSize ?? rows, opts.makeVocabSizeDivisibleBy ?? 128, opts.tp);
}

/**
 * Rank `opts.rank`'s shard of the full tensor `full` under `partition`, computed by the
 * converter's transform on the raw bytes (so any dtype is cut exactly). 'vocab' first pads dim 0
 * with zero rows to Megatron's padded vocabulary (rows already there are kept). Returns a new
 * tensor; `full` is not changed.
 */
export function shardOf(full: Tensor, partition: Partition, opts: ShardOptions): Tensor {
  const t = toTensorData(full);
  const { tp, rank } = opts;
  switch (partition) {
    case 'replicate':
      return fromTensorData(t);
    case 'split0':
      return fromTensorData(tpSplit(t, { tp, rank, dim: 0 }));
    case 'split1':
      return fromTensorData(tpSplit(t, { tp, rank, dim: 1 }));
    case 'qkv':
      return fromTensorData(tpSplitQkv(t, { ...qkvDimsOf('shardOf', opts), tp, rank }));
    case 'gate_up':
      return fromTensorData(tpSplitGateUp(t, { tp, rank }));
    case 'vocab': {
      const rows = t.shape[0] ?? 0;
      const padded = paddedRows(rows, opts);
      if (rows > padded) {
        throw new DistributedError(
          'INVALID_ARGUMENT',
          `shardOf: a vocab tensor of ${rows} rows is larger than the padded vocabulary ${padded}` +
            ` (vocabSize ${opts.vocabSize ?? rows}); pass the real vocabSize`,
        );
      }
      return fromTensorData(tpSplit(rows < padded ? padVocabRows(t, padded) : t, { tp, rank, dim: 0 }));
    }
  }
}

/**
 * Inverse of {@link shardOf}: the full tensor from every rank's shard (in rank order). 'vocab'
 * drops the padding rows when `opts.vocabSize` is given; 'replicate' returns a copy of part 0.
 */
export function gatherShards(
  parts: readonly Tensor[],
  partition: Partition,
  opts: Partial<ShardOptions> = {},
): Tensor {
  if (parts.length === 0) throw new DistributedError('INVALID_ARGUMENT', 'gatherShards: no shards');
  const data = parts.map(toTensorData);
  switch (partition) {
    case 'replicate':
      return fromTensorData(data[0]);
    case 'split0':
      return fromTensorData(tpMerge(data, 0));
    case 'split1':
      return fromTensorData(tpMerge(data, 1));
    case 'qkv':
      return fromTensorData(
        tpMergeQkv(data, qkvDimsOf('gatherShards', { tp: parts.length, rank: 0, ...opts })),
      );
    case 'gate_up':
      return fromTensorData(tpMergeGateUp(data));
    case 'vocab': {
      const merged = tpMerge(data, 0);
      return fromTensorData(opts.vocabSize === undefined ? merged : unpadVocabRows(merged, opts.vocabSize));
    }
  }
}
