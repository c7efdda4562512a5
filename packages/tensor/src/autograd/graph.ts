// The recorded graph: one Node per differentiable op call, each holding the tensors its
// backward needs (as its own references, so user code may dispose the originals) and edges to
// the nodes that produced its inputs. Leaves requiring grad get an accumulator node.
import { TensorError } from '../errors.js';
import type { Tensor } from '../tensor.js';

let gradEnabled = true;

export function isGradEnabled(): boolean {
  return gradEnabled;
}

/** Sets grad mode and returns the previous one. */
export function setGradEnabled(enabled: boolean): boolean {
  const prev = gradEnabled;
  gradEnabled = enabled;
  return prev;
}

/** Runs fn without recording the graph (like `with torch.no_grad()`). */
export function noGrad<T>(fn: () => T): T {
  const prev = setGradEnabled(false);
  try {
    return fn();
  } finally {
    gradEnabled = prev;
  }
}

/** Runs fn with graph recording on, even inside noGrad. */
export function enableGrad<T>(fn: () => T): T {
  const prev = setGradEnabled(true);
  try {
    return fn();
  } finally {
    gradEnabled = prev;
  }
}

/**
 * Gradients w.r.t. an op's inputs, in input order; null for inputs that get none. `pending`, when
 * the engine gives it, holds for each input the gradient already waiting for it from the input's
 * other uses (null where none, or where it shares memory with anything else): a backward may add
 * its own gradient into that tensor in place and return that very tensor for the input, and the
 * engine then adds nothing (one pass over the gradient instead of a write and a separate add).
 * `dest`, given only to backwards recorded with `takesDestinations`, holds for each input a tensor
 * of the input's shape and dtype (or null) where the gradient is to end up anyway: a region of the
 * buffer in which a split assembles its input's gradient, seen through the views between them. A
 * backward may write the input's gradient there (any strides) and return that very tensor; the
 * split then finds it in place and copies nothing.
 */
export type BackwardFn = (
  grad: Tensor,
  saved: readonly Tensor[],
  pending?: readonly (Tensor | null)[],
  dest?: readonly (Tensor | null)[],
) => readonly (Tensor | null | undefined)[];

/**
 * A multi-output op that assembles its input's gradient in one buffer (split, unbind): `region(nr)`
 * allocates the buffer on first use and returns a view of output nr's region in it (a tensor of
 * that output's shape), which a gradient may be written into before the op's backward runs;
 * `release()` frees the buffer if the backward never took it.
 */
export interface GradDestination {
  region(nr: number): Tensor;
  release(): void;
}

/**
 * Backward of an op with several outputs (split, unbind): one gradient per output, null for
 * outputs that received none.
 */
export type MultiBackwardFn = (
  grads: readonly (Tensor | null)[],
  saved: readonly Tensor[],
) => readonly (Tensor | null | undefined)[];

/** A gradient hook: may return a replacement gradient. */
// biome-ignore lint/suspicious/noConfusingVoidType: a hook that returns nothing keeps the gradient, as in PyTorch
export type GradHook = (grad: Tensor) => Tensor | undefined | void;

/** Where a gradient flows: output `nr` of `node`. */
export interface Edge {
  node: Node;
  nr: number;
}

export class Node {
  readonly name: string;
  /** For each input: the node output its gradient flows to, or null. */
  next: (Edge | null)[];
  saved: Tensor[] | null;
  backwardFn: BackwardFn | MultiBackwardFn | null;
  readonly numOutputs: number;
  /** Hooks on the gradient of each output (tensor hooks of non-leaf tensors), by output number. */
  preHooks: GradHook[][] | null = null;
  /** Accumulator nodes: the leaf tensor whose .grad they fill. */
  readonly variable: Tensor | null;
  /**
   * Single-output view ops (view, permute, transpose, unsqueeze): the forward's view applied to
   * another tensor of the input's shape, or null where its strides do not allow a view. The engine
   * maps a destination for the input's gradient to one for the output's through it.
   */
  forwardView: ((t: Tensor) => Tensor | null) | null = null;
  /** Multi-output ops that assemble their input's gradient in one buffer (split, unbind). */
  destination: GradDestination | null = null;
  /** Whether the backward takes BackwardFn's `dest` (only such nodes are offered destinations). */
  takesDestinations = false;
  private refs = 0;
  savedFreed = false;

  constructor(
    name: string,
    backwardFn: BackwardFn | MultiBackwardFn | null,
    next: (Edge | null)[],
    saved: Tensor[] | null,
    variable: Tensor | null = null,
    numOutputs = 1,
  ) {
    this.name = name;
    this.backwardFn = backwardFn;
    this.next = next;
    this.saved = saved;
    this.variable = variable;
    this.numOutputs = numOutputs;
    for (const e of next) e?.node.ref();
  }

  ref(): void {
    this.refs++;
  }

  /** Drops one reference; the last one frees the saved tensors and the edges. */
  unref(): void {
    if (--this.refs > 0) return;
    this.freeSaved();
    this.destination?.release();
    this.destination = null;
    this.forwardView = null;
    const next = this.next;
    this.next = [];
    this.backwardFn = null;
    for (const e of next) e?.node.unref();
  }

  freeSaved(): void {
    if (!this.saved) return;
    for (const t of this.saved) t.dispose();
    this.saved = null;
    this.savedFreed = true;
  }

  hooksOf(nr: number): GradHook[] {
    this.preHooks ??= [];
    this.preHooks[nr] ??= [];
    return this.preHooks[nr];
  }

  /**
   * Runs the backward with one gradient per output (null where none arrived) and, per input, the
   * gradient already waiting for it that the backward may add into (BackwardFn's `pending`) and
   * where its gradient may be written (BackwardFn's `dest`).
   */
  apply(
    grads: readonly (Tensor | null)[],
    pending?: readonly (Tensor | null)[],
    dest?: readonly (Tensor | null)[],
  ): readonly (Tensor | null | undefined)[] {
    if (!this.backwardFn || (this.savedFreed && this.saved === null)) {
      throw new TensorError(
        'GRAPH_FREED',
        `backward through ${this.name} a second time: its saved tensors were freed. ` +
          'Pass { retainGraph: true } to the first backward() if you need to call it twice.',
      );
    }
    if (this.numOutputs === 1)
      return (this.backwardFn as BackwardFn)(grads[0]!, this.saved ?? [], pending, dest);
    return (this.backwardFn as MultiBackwardFn)(grads, this.saved ?? []);
  }
}

/** Cached accumulator nodes of leaf tensors. */
const accumulators = new WeakMap<Tensor, Node>();

export function accumulatorOf(leaf: Tensor): Node {
  let n = accumulators.get(leaf);
  if (!n) {
    n = new Node('AccumulateGrad', null, [], null, leaf);
    n.ref(); // held by the leaf for its lifetime
    accumulators.set(leaf, n);
  }
  return n;
}

/** Whether a leaf has tensor hooks (registerHook) on its gradient, which must see that gradient. */
export function leafHasGradHooks(leaf: Tensor): boolean {
  const hooks = accumulators.get(leaf)?.preHooks?.[0];
  return hooks !== undefined && hooks.length > 0;
}

export function edgeOf(t: Tensor): Edge | null {
  if (!t.requiresGrad) return null;
  return t.gradFn ? { node: t.gradFn, nr: t.outputNr } : { node: accumulatorOf(t), nr: 0 };
}
