import { type DType, isFloating, type TypedArrayFor } from '../dtype.js';
import { argError, TensorError } from '../errors.js';
import { numel, type Shape } from '../shape.js';
import type { NestedArray, Tensor } from '../tensor.js';
import { alloc, backendFor, type CreateOptions, finishCreate } from './util.js';

function flatten(op: string, data: NestedArray): { shape: number[]; values: (number | boolean)[] } {
  const shape: number[] = [];
  let probe: NestedArray = data;
  while (Array.isArray(probe)) {
    shape.push(probe.length);
    probe = probe[0] as NestedArray;
    if (probe === undefined) break;
  }
  const values: (number | boolean)[] = [];
  const walk = (v: NestedArray, d: number): void => {
    if (d === shape.length) {
      if (Array.isArray(v)) throw argError(op, 'ragged nested array: all rows must have the same length');
      values.push(v);
      return;
    }
    if (!Array.isArray(v) || v.length !== shape[d]) {
      throw argError(op, `ragged nested array at depth ${d}: expected ${shape[d]} elements`);
    }
    for (const x of v) walk(x, d + 1);
  };
  walk(data, 0);
  return { shape, values };
}

type TypedInput = Float32Array | Float64Array | Int32Array | BigInt64Array | Uint8Array | Uint16Array;

function dtypeOfTyped(a: TypedInput): DType {
  if (a instanceof Float32Array) return 'float32';
  if (a instanceof Float64Array) return 'float64';
  if (a instanceof Int32Array) return 'int32';
  if (a instanceof BigInt64Array) return 'int64';
  if (a instanceof Uint8Array) return 'uint8';
  throw argError('fromTypedArray', 'Uint16Array data needs an explicit dtype (bfloat16 or float16)');
}

/**
 * A tensor from a typed array (copied). Uint16Array holds raw bfloat16/float16 words and needs
 * `dtype`. Other typed arrays convert to `dtype` when given.
 */
export function fromTypedArray(data: TypedInput, shape?: Shape, opts: CreateOptions = {}): Tensor {
  const n = data.length;
  const shp = shape ? [...shape] : [n];
  if (numel(shp) !== n) {
    throw new TensorError(
      'SHAPE_MISMATCH',
      `fromTypedArray: shape [${shp}] has ${numel(shp)} elements, data has ${n}`,
    );
  }
  const backend = backendFor(opts.device);
  let src: DType;
  if (data instanceof Uint16Array) {
    if (opts.dtype !== 'bfloat16' && opts.dtype !== 'float16') {
      throw argError('fromTypedArray', 'Uint16Array data needs dtype bfloat16 or float16');
    }
    src = opts.dtype;
  } else {
    src = dtypeOfTyped(data);
  }
  const raw = alloc(backend, shp, src);
  if (n > 0) backend.write(raw, data);
  const dtype = opts.dtype ?? src;
  if (dtype === src) return finishCreate(raw, opts);
  const out = alloc(backend, shp, dtype);
  backend.copy(out, raw);
  raw.dispose();
  return finishCreate(out, opts);
}

/**
 * A tensor from a number, nested arrays or a typed array. The dtype defaults as in PyTorch:
 * bool for booleans, int64 for integers, float32 otherwise.
 */
export function tensor(data: NestedArray | TypedInput, opts: CreateOptions & { shape?: Shape } = {}): Tensor {
  if (ArrayBuffer.isView(data)) return fromTypedArray(data as TypedInput, opts.shape, opts);
  const { shape, values } = flatten('tensor', data);
  const finalShape = opts.shape ? [...opts.shape] : shape;
  if (numel(finalShape) !== values.length) {
    throw new TensorError(
      'SHAPE_MISMATCH',
      `tensor: shape [${finalShape}] does not hold ${values.length} values`,
    );
  }
  let dtype = opts.dtype;
  if (!dtype) {
    if (values.length > 0 && values.every((v) => typeof v === 'boolean')) dtype = 'bool';
    else if (values.length > 0 && values.every((v) => Number.isInteger(v))) dtype = 'int64';
    else dtype = 'float32';
  }
  const nums = values.map((v) => (typeof v === 'boolean' ? (v ? 1 : 0) : v));
  let typed: TypedInput;
  switch (dtype) {
    case 'float64':
      typed = Float64Array.from(nums);
      break;
    case 'int32':
      typed = Int32Array.from(nums);
      break;
    case 'int64':
      typed = BigInt64Array.from(nums.map((v) => BigInt(Math.trunc(v))));
      break;
    case 'uint8':
    case 'bool':
      typed = Uint8Array.from(nums);
      break;
    default:
      typed = Float32Array.from(nums);
  }
  return fromTypedArray(typed, finalShape, { ...opts, dtype });
}

/** Uninitialised memory of the given shape. */
export function empty(shape: Shape, opts: CreateOptions = {}): Tensor {
  return finishCreate(alloc(backendFor(opts.device), shape, opts.dtype ?? 'float32'), opts);
}

export function full(shape: Shape, value: number, opts: CreateOptions = {}): Tensor {
  const t = alloc(backendFor(opts.device), shape, opts.dtype ?? 'float32');
  if (t.numel > 0) t.backend.fill(t, value);
  return finishCreate(t, opts);
}

export function zeros(shape: Shape, opts: CreateOptions = {}): Tensor {
  return finishCreate(alloc(backendFor(opts.device), shape, opts.dtype ?? 'float32', true), opts);
}

export function ones(shape: Shape, opts: CreateOptions = {}): Tensor {
  return full(shape, 1, opts);
}

const likeOpts = (t: Tensor, opts: CreateOptions): CreateOptions => ({
  dtype: t.dtype,
  device: t.device,
  ...opts,
});
export const zerosLike = (t: Tensor, opts: CreateOptions = {}): Tensor => zeros(t.shape, likeOpts(t, opts));
export const onesLike = (t: Tensor, opts: CreateOptions = {}): Tensor => ones(t.shape, likeOpts(t, opts));
export const emptyLike = (t: Tensor, opts: CreateOptions = {}): Tensor => empty(t.shape, likeOpts(t, opts));
export const fullLike = (t: Tensor, value: number, opts: CreateOptions = {}): Tensor =>
  full(t.shape, value, likeOpts(t, opts));

/**
 * Values start, start+step, ... below end (like torch.arange). Integer arguments give int64,
 * otherwise float32.
 */
export function arange(start: number, end?: number, step = 1, opts: CreateOptions = {}): Tensor {
  if (end === undefined) {
    end = start;
    start = 0;
  }
  if (step === 0) throw argError('arange', 'step must be nonzero');
  const n = Math.max(0, Math.ceil((end - start) / step));
  const dtype =
    opts.dtype ??
    ([start, end, step].every((v) => Number.isInteger(v)) ? ('int64' as const) : ('float32' as const));
  const vals = new Float64Array(n);
  for (let i = 0; i < n; i++) vals[i] = start + i * step;
  const t = fromTypedArray(vals, [n], { device: opts.device, dtype });
  if (opts.requiresGrad && !isFloating(dtype))
    throw argError('arange', 'only floating-point tensors can require grad');
  return finishCreate(t, opts);
}

/** n x m identity matrix. */
export function eye(n: number, m = n, opts: CreateOptions = {}): Tensor {
  const vals = new Float64Array(n * m);
  for (let i = 0; i < Math.min(n, m); i++) vals[i * m + i] = 1;
  return finishCreate(
    fromTypedArray(vals, [n, m], { device: opts.device, dtype: opts.dtype ?? 'float32' }),
    opts,
  );
}

export type { TypedArrayFor };
