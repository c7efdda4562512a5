import type { GradHook, Node } from './autograd/graph.js';
import { accumulatorOf } from './autograd/graph.js';
import type { Backend } from './backend/backend.js';
import { type AnyTypedArray, type DType, ITEMSIZE, isFloating } from './dtype.js';
import { fmtShape, TensorError } from './errors.js';
import { TENSOR_BRAND, trackTensor, untrackTensor } from './scope.js';
import { contiguousStrides, isContiguous, numel, type Shape } from './shape.js';
import { releaseCollected, Storage } from './storage.js';
import { readChecked, syncBeforeRead } from './sync.js';

// Safety net for tensors dropped without dispose(): their storage reference is released when
// the JS object is collected. Explicit ownership (dispose, using, tidy) is the plan; this only
// keeps a forgotten tensor from leaking forever.
interface Held {
  storage: Storage;
  gradFn: Node | null;
  /** Where the tensor was made (MEGAPATCH_TRACE_COLLECTED=1 only). */
  site: string | null;
}
const finalizer = new FinalizationRegistry<Held>((h) => {
  h.gradFn?.unref();
  // counted: memoryStats().collectedTensors / collectedBytes, collectedTensorSites()
  releaseCollected(h.storage, h.site);
});
const traceCollected = typeof process !== 'undefined' && process.env?.MEGAPATCH_TRACE_COLLECTED === '1';

/** The caller's stack outside this file, for MEGAPATCH_TRACE_COLLECTED. */
function creationSite(): string {
  const lines = (new Error().stack ?? '').split('\n').slice(1);
  return lines
    .filter((l) => !/[/\\]tensor[/\\](src|dist)[/\\](tensor|storage)\.[jt]s/.test(l))
    .slice(0, 12)
    .map((l) => l.trim())
    .join('\n');
}

if (!(Symbol as { dispose?: symbol }).dispose) {
  (Symbol as { dispose?: symbol }).dispose = Symbol.for('Symbol.dispose');
}

export type NestedArray = number | boolean | NestedArray[];

/** Called with a leaf after backward has accumulated its gradient into .grad or .mainGrad. */
export type PostAccumulateGradHook = (param: Tensor) => void;

/**
 * An n-dimensional view (dtype, shape, strides, offset) over reference-counted storage, with
 * autograd. Create tensors with `tensor`, `zeros`, `randn`, ...; free them with `dispose()`,
 * a `using` declaration, or `tidy()`.
 */
// biome-ignore lint/suspicious/noUnsafeDeclarationMerging: the interface below declares the methods that ops/*.ts attach to the prototype
export class Tensor {
  readonly shape: readonly number[];
  readonly strides: readonly number[];
  /** Offset of element 0 in the storage, in elements. */
  readonly offset: number;
  readonly dtype: DType;
  readonly storage: Storage;
  /** Whether gradients flow to this tensor. Set on leaves with requiresGrad_(). */
  requiresGrad = false;
  /** Accumulated gradient of a leaf (or of a tensor that called retainGrad()). */
  grad: Tensor | null = null;
  /**
   * fp32 gradient buffer of a low-precision leaf (Megatron's main_grad): when set, backward
   * accumulates into it instead of .grad. Owned by whoever set it (the mixed-precision optimizer).
   */
  mainGrad: Tensor | null = null;
  /** The node that produced this tensor, or null for leaves. */
  gradFn: Node | null = null;
  /** Which output of gradFn this tensor is (ops with several outputs, such as split). */
  outputNr = 0;
  /** Optional name, used by nn.Module and in error messages. */
  name?: string;
  /** @internal Hooks run by backward after accumulating into this leaf (registerPostAccumulateGradHook). */
  postAccumulateGradHooks: PostAccumulateGradHook[] | null = null;
  private held: Held | null;
  private disposedFlag = false;
  private retainsGrad = false;
  declare readonly [TENSOR_BRAND]: true;

  /** @internal Use the creation functions. */
  constructor(
    storage: Storage,
    shape: Shape,
    strides: readonly number[],
    offset: number,
    dtype: DType,
    owned = true,
  ) {
    this.storage = storage;
    this.shape = shape;
    this.strides = strides;
    this.offset = offset;
    this.dtype = dtype;
    if (owned) {
      this.held = { storage, gradFn: null, site: traceCollected ? creationSite() : null };
      finalizer.register(this, this.held, this.held);
      trackTensor(this);
    } else {
      this.held = null;
    }
  }

  /** @internal A fresh contiguous tensor on a backend. */
  static empty(backend: Backend, shape: Shape, dtype: DType, zero = false): Tensor {
    const n = numel(shape);
    const storage = new Storage(backend, n * ITEMSIZE[dtype], zero);
    return new Tensor(storage, shape, contiguousStrides(shape), 0, dtype);
  }

  /** @internal A fresh dense tensor with the given strides (a permutation of a contiguous layout). */
  static emptyStrided(backend: Backend, shape: Shape, strides: readonly number[], dtype: DType): Tensor {
    const storage = new Storage(backend, numel(shape) * ITEMSIZE[dtype], false);
    return new Tensor(storage, shape, strides, 0, dtype);
  }

  /** @internal A view sharing this tensor's storage (the storage gains a reference). */
  viewAs(shape: Shape, strides: readonly number[], offset: number, owned = true): Tensor {
    this.checkAlive('view');
    this.storage.retain();
    return new Tensor(this.storage, shape, strides, offset, this.dtype, owned);
  }

  get device(): string {
    return this.storage.device;
  }
  get backend(): Backend {
    return this.storage.backend;
  }
  get ndim(): number {
    return this.shape.length;
  }
  get numel(): number {
    return numel(this.shape);
  }
  get isLeaf(): boolean {
    return this.gradFn === null;
  }
  get isContiguous(): boolean {
    return isContiguous(this.shape, this.strides);
  }
  get disposed(): boolean {
    return this.disposedFlag;
  }
  /** Size of one dimension (negative counts from the end), or the whole shape. */
  size(): number[];
  size(dim: number): number;
  size(dim?: number): number | number[] {
    if (dim === undefined) return [...this.shape];
    return this.shape[dim < 0 ? dim + this.shape.length : dim];
  }

  /** Throws when the tensor was disposed. Ops call it on every input. */
  checkAlive(op: string): void {
    if (this.disposedFlag || this.storage.freed) {
      throw new TensorError('DISPOSED', `${op}: tensor ${this.describe()} was disposed and cannot be used`);
    }
  }

  describe(): string {
    return `${this.name ? `"${this.name}" ` : ''}${fmtShape(this.shape)} ${this.dtype}`;
  }

  /** Frees this tensor's reference to its storage (and its .grad). Safe to call twice. */
  dispose(): void {
    if (this.disposedFlag) return;
    this.disposedFlag = true;
    untrackTensor(this);
    if (this.held) {
      finalizer.unregister(this.held);
      this.held = null;
    }
    if (this.gradFn) {
      const n = this.gradFn;
      this.gradFn = null;
      n.unref();
    }
    if (this.grad) {
      this.grad.dispose();
      this.grad = null;
    }
    this.storage.release();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** @internal Sets the node that produced this tensor. */
  setGradFn(node: Node, outputNr = 0): void {
    node.ref();
    this.gradFn = node;
    this.outputNr = outputNr;
    this.requiresGrad = true;
    if (this.held) this.held.gradFn = node;
  }

  /** Marks a leaf as requiring gradients (in place); returns this. */
  requiresGrad_(requires = true): this {
    if (!this.isLeaf) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        'requiresGrad_: only leaf tensors can change requiresGrad; use detach()',
      );
    }
    if (requires && !isFloating(this.dtype)) {
      throw new TensorError(
        'DTYPE_MISMATCH',
        `requiresGrad_: only floating-point tensors can require gradients, got ${this.dtype}`,
      );
    }
    this.requiresGrad = requires;
    return this;
  }

  /**
   * Registers a hook called with the gradient of this tensor during backward; it may return a
   * replacement. Returns a function that removes the hook.
   */
  registerHook(hook: GradHook): () => void {
    if (!this.requiresGrad) {
      throw new TensorError(
        'NO_GRAD',
        "registerHook: cannot register a hook on a tensor that doesn't require grad",
      );
    }
    const hooks = (this.gradFn ?? accumulatorOf(this)).hooksOf(this.gradFn ? this.outputNr : 0);
    hooks.push(hook);
    return () => {
      const i = hooks.indexOf(hook);
      if (i >= 0) hooks.splice(i, 1);
    };
  }

  /**
   * Registers a hook called with this leaf once per backward, after its gradient has been
   * accumulated into .grad (or .mainGrad), as torch's register_post_accumulate_grad_hook.
   * Data parallelism uses it to start a bucket's reduction as soon as its gradients are final.
   * Returns a function that removes the hook.
   */
  registerPostAccumulateGradHook(hook: PostAccumulateGradHook): () => void {
    if (!this.isLeaf) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        'registerPostAccumulateGradHook: only leaf tensors accumulate gradients; use registerHook on a non-leaf',
      );
    }
    if (!this.requiresGrad) {
      throw new TensorError(
        'NO_GRAD',
        "registerPostAccumulateGradHook: cannot register a hook on a tensor that doesn't require grad",
      );
    }
    this.postAccumulateGradHooks ??= [];
    const hooks = this.postAccumulateGradHooks;
    hooks.push(hook);
    return () => {
      const i = hooks.indexOf(hook);
      if (i >= 0) hooks.splice(i, 1);
    };
  }

  /** Keeps .grad on a non-leaf tensor after backward. */
  retainGrad(): void {
    if (this.isLeaf || this.retainsGrad) return;
    this.retainsGrad = true;
    this.registerHook((g) => {
      // accumulates over backward calls, like a leaf's .grad (and torch's retain_grad)
      if (this.grad && !this.grad.disposed) {
        this.grad.backend.binary(this.grad, this.grad, g, 'add');
        return;
      }
      this.grad = g.clone();
      untrackTensor(this.grad);
    });
  }

  /** Reads the elements back into JS as nested arrays (booleans for bool tensors). */
  toArray(): NestedArray {
    const flat = this.toTypedArray();
    const isBool = this.dtype === 'bool';
    const get = (i: number): number | boolean => {
      const v = flat[i];
      if (typeof v === 'bigint') return Number(v);
      return isBool ? v !== 0 : v;
    };
    if (this.shape.length === 0) return get(0);
    let i = 0;
    const build = (d: number): NestedArray[] => {
      const out: NestedArray[] = [];
      for (let k = 0; k < this.shape[d]; k++) out.push(d === this.shape.length - 1 ? get(i++) : build(d + 1));
      return out;
    };
    return build(0);
  }

  /** The single element of a one-element tensor, as a number. */
  item(): number {
    this.checkAlive('item');
    if (this.numel !== 1) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `item: tensor ${this.describe()} has ${this.numel} elements, expected 1`,
      );
    }
    const v = this.toTypedArray()[0];
    return typeof v === 'bigint' ? Number(v) : v;
  }

  /**
   * A copy of the elements in a typed array: Float32Array for float32, bfloat16 and float16,
   * Float64Array, Int32Array, BigInt64Array, Uint8Array for uint8 and bool.
   */
  toTypedArray(): Float32Array | Float64Array | Int32Array | BigInt64Array | Uint8Array {
    this.checkAlive('toTypedArray');
    const readDtype: DType = this.dtype === 'bfloat16' || this.dtype === 'float16' ? 'float32' : this.dtype;
    const src = readDtype === this.dtype && this.isContiguous ? this : this.toContiguousDtype(readDtype);
    try {
      const out = makeTyped(readDtype, this.numel);
      // with the device's queued checks, in one wait where the backend can
      readChecked(src, out);
      return out as Float32Array | Float64Array | Int32Array | BigInt64Array | Uint8Array;
    } finally {
      if (src !== this) src.dispose();
    }
  }

  /** The raw little-endian bytes of the elements in row-major order (16-bit floats as stored). */
  toBytes(): Uint8Array {
    this.checkAlive('toBytes');
    syncBeforeRead(this.device);
    const src = this.isContiguous ? this : this.toContiguousDtype(this.dtype);
    try {
      const out = new Uint8Array(this.numel * ITEMSIZE[this.dtype]);
      if (this.numel > 0) src.backend.read(src, out);
      return out;
    } finally {
      if (src !== this) src.dispose();
    }
  }

  private toContiguousDtype(dtype: DType): Tensor {
    const out = Tensor.empty(this.backend, this.shape, dtype);
    untrackTensor(out);
    out.backend.copy(out, this);
    return out;
  }

  toString(): string {
    return `Tensor(${fmtShape(this.shape)}, ${this.dtype}, ${this.device}${this.requiresGrad ? ', requiresGrad' : ''})`;
  }
}

Object.defineProperty(Tensor.prototype, TENSOR_BRAND, { value: true });

function makeTyped(d: DType, n: number): AnyTypedArray {
  switch (d) {
    case 'float32':
      return new Float32Array(n);
    case 'float64':
      return new Float64Array(n);
    case 'int32':
      return new Int32Array(n);
    case 'int64':
      return new BigInt64Array(n);
    default:
      return new Uint8Array(n);
  }
}

// Methods implemented by the op modules (ops/*.ts assign them on Tensor.prototype).
export interface Tensor {
  // elementwise
  add(other: Tensor | number, alpha?: number): Tensor;
  sub(other: Tensor | number, alpha?: number): Tensor;
  mul(other: Tensor | number): Tensor;
  div(other: Tensor | number): Tensor;
  pow(exponent: Tensor | number): Tensor;
  neg(): Tensor;
  exp(): Tensor;
  log(): Tensor;
  sqrt(): Tensor;
  rsqrt(): Tensor;
  abs(): Tensor;
  tanh(): Tensor;
  sigmoid(): Tensor;
  silu(): Tensor;
  gelu(approximate?: 'none' | 'tanh'): Tensor;
  relu(): Tensor;
  sin(): Tensor;
  cos(): Tensor;
  square(): Tensor;
  reciprocal(): Tensor;
  sign(): Tensor;
  clamp(min?: number | null, max?: number | null): Tensor;
  eq(other: Tensor | number): Tensor;
  ne(other: Tensor | number): Tensor;
  lt(other: Tensor | number): Tensor;
  le(other: Tensor | number): Tensor;
  gt(other: Tensor | number): Tensor;
  ge(other: Tensor | number): Tensor;
  maximum(other: Tensor): Tensor;
  minimum(other: Tensor): Tensor;
  logicalNot(): Tensor;
  maskedFill(mask: Tensor, value: number): Tensor;
  // reductions
  sum(dim?: number | number[] | null, keepdim?: boolean): Tensor;
  mean(dim?: number | number[] | null, keepdim?: boolean): Tensor;
  var(dim?: number | number[] | null, options?: { correction?: number; keepdim?: boolean }): Tensor;
  max(): Tensor;
  max(dim: number, keepdim?: boolean): { values: Tensor; indices: Tensor };
  min(): Tensor;
  min(dim: number, keepdim?: boolean): { values: Tensor; indices: Tensor };
  amax(dim?: number | number[] | null, keepdim?: boolean): Tensor;
  amin(dim?: number | number[] | null, keepdim?: boolean): Tensor;
  argmax(dim?: number, keepdim?: boolean): Tensor;
  argmin(dim?: number, keepdim?: boolean): Tensor;
  logsumexp(dim: number | number[], keepdim?: boolean): Tensor;
  norm(p?: number, dim?: number | number[] | null, keepdim?: boolean): Tensor;
  cumsum(dim: number): Tensor;
  // shape and views
  view(...shape: number[]): Tensor;
  reshape(...shape: number[]): Tensor;
  transpose(dim0: number, dim1: number): Tensor;
  t(): Tensor;
  permute(...dims: number[]): Tensor;
  expand(...shape: number[]): Tensor;
  expandAs(other: Tensor): Tensor;
  squeeze(dim?: number): Tensor;
  unsqueeze(dim: number): Tensor;
  flatten(startDim?: number, endDim?: number): Tensor;
  narrow(dim: number, start: number, length: number): Tensor;
  select(dim: number, index: number): Tensor;
  split(splitSize: number | number[], dim?: number): Tensor[];
  chunk(chunks: number, dim?: number): Tensor[];
  unbind(dim?: number): Tensor[];
  contiguous(): Tensor;
  clone(): Tensor;
  detach(): Tensor;
  /** Another dtype, another device ("cuda:1"), or both (PyTorch's Tensor.to). */
  to(dtype: DType): Tensor;
  to(device: string, dtype?: DType): Tensor;
  to(options: { device?: string; dtype?: DType }): Tensor;
  /** A copy on the CPU (this tensor when already there). */
  cpu(): Tensor;
  float(): Tensor;
  copy_(src: Tensor): this;
  fill_(value: number): this;
  zero_(): this;
  // linear algebra
  matmul(other: Tensor): Tensor;
  // autograd
  backward(gradient?: Tensor, options?: { retainGraph?: boolean }): void;
  // softmax / index families
  softmax(dim: number): Tensor;
  logSoftmax(dim: number): Tensor;
  gather(dim: number, index: Tensor): Tensor;
  indexSelect(dim: number, index: Tensor): Tensor;
  scatterAdd(dim: number, index: Tensor, src: Tensor): Tensor;
  indexAdd(dim: number, index: Tensor, source: Tensor, alpha?: number): Tensor;
  topk(k: number, dim?: number, largest?: boolean, sorted?: boolean): { values: Tensor; indices: Tensor };
  triu(diagonal?: number): Tensor;
  tril(diagonal?: number): Tensor;
}
