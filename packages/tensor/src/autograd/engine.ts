// Reverse-mode backward over the recorded graph: nodes are visited in an order where every
// node runs after all the nodes that feed it gradient, gradients are summed per node, and
// leaves accumulate into .grad in place.
import { getKernel } from '../backend/kernels.js';
import { TensorError } from '../errors.js';
import { keep, tidy } from '../scope.js';
import { sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';
import type { Edge, GradDestination, GradHook, Node } from './graph.js';
import { noGrad } from './graph.js';

/**
 * Named kernel `accumulateGrad(dst, src)`: dst += src, with src (same shape, any strides, any
 * floating dtype) first rounded to dst's dtype, then added in dst's compute type (float32 for
 * 16/32-bit floats, float64 for float64): the result of `dst.add_(src.to(dst.dtype))` without the
 * cast's temporary. dst is contiguous (a gradient or fp32 main-gradient buffer).
 */
export type AccumulateGradKernel = (dst: Tensor, src: Tensor) => void;

export interface BackwardOptions {
  /** Keep saved tensors so that backward can run through the graph again. */
  retainGraph?: boolean;
}

/**
 * For every node reachable from root: how many edges lead into it (deps: the node is ready when
 * they have all delivered), and per output how many (uses: 1 means one consumer alone feeds that
 * output's gradient).
 */
function topoCounts(root: Node): { deps: Map<Node, number>; uses: Map<Node, number[]> } {
  const deps = new Map<Node, number>();
  const uses = new Map<Node, number[]>();
  const stack: Node[] = [root];
  deps.set(root, 0);
  while (stack.length) {
    const n = stack.pop()!;
    for (const e of n.next) {
      if (!e) continue;
      let u = uses.get(e.node);
      if (!u) {
        u = new Array<number>(e.node.numOutputs).fill(0);
        uses.set(e.node, u);
      }
      u[e.nr]++;
      const c = deps.get(e.node);
      if (c === undefined) {
        deps.set(e.node, 1);
        stack.push(e.node);
      } else {
        deps.set(e.node, c + 1);
      }
    }
  }
  return { deps, uses };
}

/** The gradients addedToMainGrad returned: accumulateInto skips them. */
const inMainGrad = new WeakSet<Tensor>();

/**
 * What a backward function returns for a leaf whose gradient it has already added to the leaf's
 * fp32 `.mainGrad` itself (Megatron's gradient-accumulation fusion: the weight-gradient GEMM
 * accumulates into the main gradient). Zeros of the leaf's shape and dtype (a stride-0 view of one
 * element), so that where the leaf has other uses their gradients summed with it are still right;
 * the accumulation skips it alone but still runs the leaf's post-accumulate hooks (data
 * parallelism's bucket readiness). Call it only for a leaf with a mainGrad and no tensor hooks.
 */
export function addedToMainGrad(leaf: Tensor): Tensor {
  const one = Tensor.empty(leaf.backend, [], leaf.dtype, true);
  const zeros = one.viewAs(
    leaf.shape,
    leaf.shape.map(() => 0),
    0,
  );
  one.dispose();
  inMainGrad.add(zeros);
  return zeros;
}

function runHooks(hooks: readonly GradHook[] | undefined, grad: Tensor): Tensor {
  if (!hooks) return grad;
  for (const h of hooks) {
    const r = h(grad);
    if (r && r !== grad) {
      grad.dispose();
      grad = r;
    }
  }
  return grad;
}

/** Accumulates into a leaf, then runs its post-accumulate hooks (a copy of the list, so a hook may remove itself). */
function accumulate(leaf: Tensor, grad: Tensor): void {
  accumulateInto(leaf, grad);
  const hooks = leaf.postAccumulateGradHooks;
  if (hooks?.length) for (const h of [...hooks]) h(leaf);
}

function accumulateInto(leaf: Tensor, grad: Tensor): void {
  if (inMainGrad.has(grad) && leaf.mainGrad) {
    grad.dispose(); // already in leaf.mainGrad
    return;
  }
  if (!sameShape(grad.shape, leaf.shape)) {
    throw new TensorError(
      'SHAPE_MISMATCH',
      `backward: gradient ${grad.describe()} does not match leaf ${leaf.describe()}`,
    );
  }
  if (leaf.mainGrad) {
    // mixed precision: accumulate in the fp32 buffer (the cast happens inside the kernel)
    addInto(leaf.mainGrad, grad);
    grad.dispose();
    return;
  }
  if (!leaf.grad) {
    // .grad is updated in place later, so it must own its memory: take the gradient only when
    // nothing else shares its storage, otherwise copy (expanded views become contiguous too).
    const exclusive =
      grad.dtype === leaf.dtype && grad.isContiguous && grad.offset === 0 && grad.storage.refCount === 1;
    leaf.grad = keep(exclusive ? grad : grad.dtype === leaf.dtype ? grad.clone() : grad.to(leaf.dtype));
    if (!exclusive) grad.dispose();
    return;
  }
  addInto(leaf.grad, grad);
  grad.dispose();
}

/** dst += src (cast to dst's dtype): the add itself, or the accumulateGrad kernel across dtypes. */
function addInto(dst: Tensor, src: Tensor): void {
  if (src.dtype === dst.dtype) {
    dst.backend.binary(dst, dst, src, 'add');
    return;
  }
  const k = getKernel(dst.backend, 'accumulateGrad');
  if (!k) throw new TensorError('UNSUPPORTED', `backward: no accumulateGrad kernel on ${dst.device}`);
  k(dst, src);
}

/** Computes gradients of `root` w.r.t. every leaf that requires grad, accumulating into .grad. */
export function backward(root: Tensor, gradient?: Tensor, options: BackwardOptions = {}): void {
  root.checkAlive('backward');
  if (!root.requiresGrad) {
    throw new TensorError('NO_GRAD', 'backward: tensor does not require grad and has no grad_fn');
  }
  if (!gradient && root.numel !== 1) {
    throw new TensorError(
      'INVALID_ARGUMENT',
      `backward: grad can be implicitly created only for scalar outputs, got ${root.describe()}; pass a gradient`,
    );
  }
  if (gradient && !sameShape(gradient.shape, root.shape)) {
    throw new TensorError(
      'SHAPE_MISMATCH',
      `backward: gradient ${gradient.describe()} does not match ${root.describe()}`,
    );
  }
  noGrad(() => {
    const seed = tidy(() => (gradient ? gradient.to(root.dtype).clone() : onesLike(root)));
    const rootNode = root.gradFn;
    if (!rootNode) {
      accumulate(root, seed);
      return;
    }
    const { deps, uses } = topoCounts(rootNode);
    // gradients waiting for each node, one slot per output
    const grads = new Map<Node, (Tensor | null)[]>([[rootNode, slots(rootNode, root.outputNr, seed)]]);
    const ready: Node[] = [rootNode];
    // the buffers handed out as destinations, freed at the end if their backward never took them
    const handed = new Set<GradDestination>();
    try {
      while (ready.length) {
        const node = ready.pop()!;
        const gs = grads.get(node) ?? [];
        grads.delete(node);
        for (let k = 0; k < gs.length; k++) {
          const g = gs[k];
          if (g) gs[k] = runHooks(node.preHooks?.[k], g);
        }
        if (node.variable) {
          if (gs[0]) accumulate(node.variable, gs[0]);
          continue;
        }
        let inGrads: readonly (Tensor | null | undefined)[] = [];
        let pending: (Tensor | null)[] = [];
        if (gs.some((g) => g)) {
          const given = Array.from({ length: node.numOutputs }, (_, k) => gs[k] ?? null);
          // a backward that passes a gradient through unchanged gets its own view of it
          const own = (x: Tensor | null | undefined): Tensor | null | undefined =>
            x && given.includes(x) ? x.viewAs(x.shape, x.strides, x.offset) : x;
          pending = pendingGrads(node, grads);
          const dest = node.takesDestinations
            ? node.next.map((e) => destinationOf(e, uses, handed))
            : undefined;
          try {
            inGrads = tidy(() => node.apply(given, pending, dest).map(own));
          } finally {
            if (dest) {
              for (let i = 0; i < dest.length; i++) if (dest[i] && inGrads[i] !== dest[i]) dest[i]!.dispose();
            }
          }
          for (const g of given) g?.dispose();
        }
        node.next.forEach((e, i) => {
          const gi = inGrads[i];
          if (!e) {
            gi?.dispose();
            return;
          }
          if (gi) {
            const slot = grads.get(e.node) ?? [];
            const prev = slot[e.nr];
            if (prev && gi === prev && pending[i] === prev) {
              // the backward added its gradient into the waiting one (BackwardFn's pending)
            } else if (prev && inMainGrad.has(gi)) {
              gi.dispose(); // zeros already in the leaf's mainGrad: prev stands for the sum
            } else if (prev && inMainGrad.has(prev)) {
              slot[e.nr] = gi;
              prev.dispose();
            } else if (prev) {
              slot[e.nr] = prev.add(gi);
              prev.dispose();
              gi.dispose();
            } else {
              slot[e.nr] = gi;
            }
            grads.set(e.node, slot);
          }
          const c = deps.get(e.node)! - 1;
          deps.set(e.node, c);
          if (c === 0) ready.push(e.node);
        });
        for (let i = node.next.length; i < inGrads.length; i++) inGrads[i]?.dispose();
        if (!options.retainGraph) node.freeSaved();
      }
      for (const gs of grads.values()) for (const g of gs) g?.dispose();
    } finally {
      for (const d of handed) d.release();
    }
  });
}

/**
 * Where the gradient flowing along `e` ends up anyway, when one consumer alone feeds it: the region
 * of a split's (unbind's) gradient buffer for that output, seen through the view ops between (each
 * node's forwardView); null where there is none, where an output on the way has other uses or
 * gradient hooks, or where a view's strides do not allow it.
 */
function destinationOf(
  e: Edge | null,
  uses: Map<Node, number[]>,
  handed: Set<GradDestination>,
): Tensor | null {
  if (!e) return null;
  const n = e.node;
  if (uses.get(n)?.[e.nr] !== 1 || n.variable || n.preHooks?.[e.nr]?.length) return null;
  if (n.destination) {
    handed.add(n.destination);
    return n.destination.region(e.nr);
  }
  if (!n.forwardView) return null;
  const base = destinationOf(n.next[0], uses, handed);
  if (!base) return null;
  const v = n.forwardView(base);
  base.dispose();
  return v;
}

/**
 * For each input of `node`: the gradient already waiting for it (from the input's other uses) when
 * the backward may add into it in place: a dense buffer that nothing else shares (not a view of
 * another gradient or of a saved tensor, not a main-gradient marker); only the first of several
 * inputs fed by the same tensor gets it.
 */
function pendingGrads(node: Node, grads: Map<Node, (Tensor | null)[]>): (Tensor | null)[] {
  const seen = new Map<Node, Set<number>>();
  return node.next.map((e) => {
    if (!e) return null;
    let nrs = seen.get(e.node);
    if (!nrs) {
      nrs = new Set();
      seen.set(e.node, nrs);
    }
    if (nrs.has(e.nr)) return null; // another input fed by the same tensor: it has the offer
    nrs.add(e.nr);
    const prev = grads.get(e.node)?.[e.nr];
    if (!prev || inMainGrad.has(prev)) return null;
    return prev.isContiguous && prev.offset === 0 && prev.storage.refCount === 1 ? prev : null;
  });
}

function slots(node: Node, nr: number, g: Tensor): (Tensor | null)[] {
  const s: (Tensor | null)[] = new Array(node.numOutputs).fill(null);
  s[nr] = g;
  return s;
}

function onesLike(t: Tensor): Tensor {
  const o = Tensor.empty(t.backend, t.shape, t.dtype);
  o.backend.fill(o, 1);
  return o;
}

Tensor.prototype.backward = function (this: Tensor, gradient?: Tensor, options?: BackwardOptions): void {
  backward(this, gradient, options);
};
