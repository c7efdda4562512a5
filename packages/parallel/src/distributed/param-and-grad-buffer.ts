// Megatron-Core's contiguous parameter and gradient buffers (distributed/param_and_grad_buffer.py,
// optimizer/param_layout.py): the parameters of one dtype live side by side in one flat buffer, in
// reverse order so that backward fills the buffer front to back, cut into buckets that are reduced
// as one collective each. Each parameter's fp32 `.mainGrad` is a view into the gradient buffer, so
// backward accumulates straight into the memory that is communicated.
import { type DType, keep, noGrad, type Tensor, zeros } from '@megapatch/tensor';
import { DistributedError } from '../errors.js';

/** Every parameter starts on a multiple of this many elements (Megatron's pad_param_start). */
export const PARAM_ALIGNMENT = 64;
/** With sharding, a bucket's end is padded to a multiple of lcm(dp, this) (Megatron's pad_bucket_end). */
export const BUCKET_END_ALIGNMENT = 128;

/** Megatron's default bucket size: max(40M, 1M × dp) elements. */
export function defaultBucketSize(dataParallelSize: number): number {
  return Math.max(40_000_000, 1_000_000 * dataParallelSize);
}

function gcd(a: number, b: number): number {
  while (b) [a, b] = [b, a % b];
  return a;
}

/** The multiple a bucket's end is padded to when it is sharded over `dataParallelSize` ranks: lcm(dp, 128). */
export function bucketEndDivisor(dataParallelSize: number): number {
  return (dataParallelSize * BUCKET_END_ALIGNMENT) / gcd(dataParallelSize, BUCKET_END_ALIGNMENT);
}

const roundUp = (n: number, m: number): number => Math.ceil(n / m) * m;

/** How parameters are laid out in a buffer. */
export interface BufferLayoutOptions {
  /** A bucket is closed once it holds at least this many elements; null puts everything in one bucket. */
  bucketSize: number | null;
  /** Size of the data-parallel group the buckets are sharded over. */
  dataParallelSize: number;
  /** Pad each bucket's end to a multiple of lcm(dataParallelSize, 128) so it splits into equal shards (distributed optimizer). */
  padBucketsForSharding: boolean;
}

/** Where one parameter lives: elements [start, end) of the buffer, in bucket `bucket`. */
export interface ParamSlot {
  start: number;
  end: number;
  bucket: number;
}

/** One bucket: elements [start, end) of the buffer; `params` are indices into the input list, in layout order. */
export interface BucketSlot {
  start: number;
  end: number;
  /** Elements up to the end of the bucket's last parameter (end − numelUnpadded is the end padding). */
  numelUnpadded: number;
  params: number[];
}

/** A computed layout: one slot per input parameter (same order as the input) and the buckets. */
export interface BufferLayout {
  params: ParamSlot[];
  buckets: BucketSlot[];
  /** Elements of the whole buffer, padding included. */
  numel: number;
}

/**
 * Lays out parameters of the given sizes as Megatron does: in reverse order (the order backward
 * produces their gradients), each starting on a 64-element boundary, a bucket closing after the
 * parameter that brings it to `bucketSize` elements (a parameter never straddles two buckets),
 * and, for sharding, each bucket's end padded to lcm(dp, 128).
 *
 * Megatron aligns parameter starts only with the distributed optimizer; aligning always keeps one
 * layout for both optimizers, so switching between them does not move any parameter.
 */
export function computeBufferLayout(numels: readonly number[], options: BufferLayoutOptions): BufferLayout {
  const { bucketSize, dataParallelSize, padBucketsForSharding } = options;
  if (!(Number.isInteger(dataParallelSize) && dataParallelSize >= 1)) {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `computeBufferLayout: dataParallelSize must be a positive integer, got ${dataParallelSize}`,
    );
  }
  if (bucketSize !== null && !(Number.isInteger(bucketSize) && bucketSize >= 1)) {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `computeBufferLayout: bucketSize must be a positive integer number of elements or null, got ${bucketSize}`,
    );
  }
  const divisor = padBucketsForSharding ? bucketEndDivisor(dataParallelSize) : 1;
  const params: ParamSlot[] = new Array(numels.length);
  const buckets: BucketSlot[] = [];
  let bucketStart = 0;
  let cursor = 0;
  let current: number[] = [];
  const closeBucket = (paramEnd: number): void => {
    const end = roundUp(paramEnd, divisor);
    buckets.push({ start: bucketStart, end, numelUnpadded: paramEnd - bucketStart, params: current });
    bucketStart = end;
    cursor = end;
    current = [];
  };
  for (let i = numels.length - 1; i >= 0; i--) {
    const start = roundUp(cursor, PARAM_ALIGNMENT);
    const end = start + numels[i];
    params[i] = { start, end, bucket: buckets.length };
    current.push(i);
    cursor = end;
    if (bucketSize !== null && end - bucketStart >= bucketSize) closeBucket(end);
  }
  if (current.length > 0) closeBucket(cursor);
  return { params, buckets, numel: bucketStart };
}

/** Options of a ParamAndGradBuffer. */
export interface ParamAndGradBufferOptions extends BufferLayoutOptions {
  /** dtype of the parameters (all the same). */
  paramDtype: DType;
  /** dtype of the gradient buffer (float32 with Megatron's grad_reduce_in_fp32). */
  gradDtype: DType;
  /** Also keep the parameter values in one contiguous buffer (the distributed optimizer all-gathers into it). */
  withParamBuffer: boolean;
}

/** One bucket of a buffer: the unit of one gradient reduction and one parameter all-gather. */
export interface Bucket {
  readonly index: number;
  /** The bucket's parameters in layout order (the last parameter of the model first). */
  readonly params: readonly Tensor[];
  /** First element of the bucket in the buffer. */
  readonly offset: number;
  /** Elements, padding included (a multiple of lcm(dp, 128) with sharding). */
  readonly numel: number;
  readonly numelUnpadded: number;
  /** 1-D view [numel] of the bucket's gradients. */
  readonly gradData: Tensor;
  /** 1-D view [numel] of the bucket's parameter values, with a parameter buffer. */
  readonly paramData: Tensor | null;
}

/** A 1-D or shaped view of `flat` starting at element `start` (the caller owns it). */
export function flatView(flat: Tensor, start: number, shape: readonly number[]): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const piece = flat.narrow(0, start, n);
  if (shape.length === 1) return piece;
  const shaped = piece.view(...shape);
  piece.dispose();
  return shaped;
}

/**
 * The contiguous gradient buffer (and, optionally, parameter buffer) of parameters sharing one
 * (param dtype, grad dtype) pair. It does not attach anything to the parameters: the caller
 * points each parameter's mainGrad at gradView(p) and, with a parameter buffer, swaps the
 * parameter for paramView(p).
 */
export class ParamAndGradBuffer {
  readonly paramDtype: DType;
  readonly gradDtype: DType;
  readonly layout: BufferLayout;
  /** The parameters (module order): as given, or their buffer views after adoptParamViews(). */
  readonly params: readonly Tensor[];
  /** The flat gradient buffer [numel], zeroed. */
  readonly gradData: Tensor;
  /** The flat parameter buffer [numel] holding a copy of the parameters' values, or null. */
  readonly paramData: Tensor | null;
  readonly buckets: readonly Bucket[];
  private readonly slots = new Map<Tensor, ParamSlot>();

  constructor(params: readonly Tensor[], options: ParamAndGradBufferOptions) {
    if (params.length === 0)
      throw new DistributedError('INVALID_ARGUMENT', 'ParamAndGradBuffer: got no parameters');
    const device = params[0].device;
    for (const p of params) {
      p.checkAlive('ParamAndGradBuffer');
      if (p.dtype !== options.paramDtype || p.device !== device) {
        throw new DistributedError(
          'INVALID_ARGUMENT',
          `ParamAndGradBuffer: parameter ${p.describe()} on ${p.device} does not match the buffer's ${options.paramDtype} on ${device}`,
        );
      }
    }
    this.paramDtype = options.paramDtype;
    this.gradDtype = options.gradDtype;
    this.params = [...params];
    this.layout = computeBufferLayout(
      params.map((p) => p.numel),
      options,
    );
    params.forEach((p, i) => {
      this.slots.set(p, this.layout.params[i]);
    });
    const n = this.layout.numel;
    // keep(): the buffers belong to this object, not to an enclosing tidy() scope
    this.gradData = keep(zeros([n], { dtype: options.gradDtype, device }));
    this.paramData = options.withParamBuffer ? keep(zeros([n], { dtype: options.paramDtype, device })) : null;
    const paramData = this.paramData;
    if (paramData) {
      noGrad(() => {
        for (const p of params) {
          if (p.numel === 0) continue;
          const dst = flatView(paramData, this.slots.get(p)!.start, p.shape);
          dst.copy_(p);
          dst.dispose();
        }
      });
    }
    this.buckets = this.layout.buckets.map((b, index) => ({
      index,
      params: b.params.map((i) => params[i]),
      offset: b.start,
      numel: b.end - b.start,
      numelUnpadded: b.numelUnpadded,
      gradData: keep(this.gradData.narrow(0, b.start, b.end - b.start)),
      paramData: paramData ? keep(paramData.narrow(0, b.start, b.end - b.start)) : null,
    }));
  }

  /** The slot of a parameter of this buffer. */
  slotOf(p: Tensor): ParamSlot {
    const s = this.slots.get(p);
    if (!s)
      throw new DistributedError(
        'INVALID_ARGUMENT',
        `ParamAndGradBuffer: ${p.describe()} is not in this buffer`,
      );
    return s;
  }

  /** A view of p's gradient in the gradient buffer, shaped like p (the caller owns the view). */
  gradView(p: Tensor): Tensor {
    return flatView(this.gradData, this.slotOf(p).start, p.shape);
  }

  /** A view of p's values in the parameter buffer, shaped like p (the caller owns the view). */
  paramView(p: Tensor): Tensor {
    if (!this.paramData)
      throw new DistributedError(
        'INVALID_ARGUMENT',
        'ParamAndGradBuffer.paramView: this buffer has no parameter buffer',
      );
    return flatView(this.paramData, this.slotOf(p).start, p.shape);
  }

  /**
   * Swaps every parameter for a view of the parameter buffer (same shape, name and requiresGrad)
   * in this buffer's own lists; returns old → new so the caller can swap them in the module.
   */
  adoptParamViews(): Map<Tensor, Tensor> {
    const swapped = new Map<Tensor, Tensor>();
    const params = this.params as Tensor[];
    params.forEach((old, i) => {
      const view = keep(this.paramView(old));
      view.name = old.name;
      if (old.requiresGrad) view.requiresGrad_(true);
      swapped.set(old, view);
      this.slots.set(view, this.slots.get(old)!);
      this.slots.delete(old);
      params[i] = view;
    });
    for (const b of this.buckets) {
      const list = b.params as Tensor[];
      list.forEach((old, i) => {
        list[i] = swapped.get(old)!;
      });
    }
    return swapped;
  }

  /** Zeroes every gradient (padding included). */
  zeroGrads(): void {
    noGrad(() => this.gradData.zero_());
  }

  /** Frees the buffers' own references (views handed out keep their memory alive until disposed). */
  dispose(): void {
    for (const b of this.buckets) {
      b.gradData.dispose();
      b.paramData?.dispose();
    }
    this.gradData.dispose();
    this.paramData?.dispose();
  }
}
