// Reverse-mode backward over the recorded graph: nodes are visited in an order where every
// node runs after all the nodes that feed it gradient, gradients are summed per node, and
// leaves accumulate into .grad in place.
import { TensorError } from '../errors.js';
import { keep, tidy } from '../scope.js';
import { sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';
import type { Node } from './graph.js';
import { noGrad } from './graph.js';

export interface BackwardOptions {
  /** Keep saved tensors so that backward can run through the graph again. */
  retainGraph?: boolean;
}

function topoCounts(root: Node): Map<Node, number> {
  const deps = new Map<Node, number>();
  const stack: Node[] = [root];
  deps.set(root, 0);
  while (stack.length) {
    const n = stack.pop()!;
    for (const p of n.next) {
      if (!p) continue;
      const c = deps.get(p);
      if (c === undefined) {
        deps.set(p, 1);
        stack.push(p);
      } else {
        deps.set(p, c + 1);
      }
    }
  }
  return deps;
}

function runHooks(node: Node, grad: Tensor): Tensor {
  if (!node.preHooks) return grad;
  for (const h of node.preHooks) {
    const r = h(grad);
    if (r && r !== grad) {
      grad.dispose();
      grad = r;
    }
  }
  return grad;
}

function accumulate(leaf: Tensor, grad: Tensor): void {
  if (!sameShape(grad.shape, leaf.shape)) {
    throw new TensorError(
      'SHAPE_MISMATCH',
      `backward: gradient ${grad.describe()} does not match leaf ${leaf.describe()}`,
    );
  }
  if (leaf.mainGrad) {
    // mixed precision: accumulate in the fp32 buffer (the cast happens inside the add)
    const g32 = grad.dtype === leaf.mainGrad.dtype ? grad : grad.to(leaf.mainGrad.dtype);
    leaf.mainGrad.backend.binary(leaf.mainGrad, leaf.mainGrad, g32, 'add');
    if (g32 !== grad) g32.dispose();
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
  leaf.grad.backend.binary(
    leaf.grad,
    leaf.grad,
    grad.dtype === leaf.grad.dtype ? grad : grad.to(leaf.grad.dtype),
    'add',
  );
  grad.dispose();
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
    const deps = topoCounts(rootNode);
    const grads = new Map<Node, Tensor>([[rootNode, seed]]);
    const ready: Node[] = [rootNode];
    while (ready.length) {
      const node = ready.pop()!;
      let g = grads.get(node);
      grads.delete(node);
      if (g) g = runHooks(node, g);
      if (node.variable) {
        if (g) accumulate(node.variable, g);
        continue;
      }
      let inGrads: readonly (Tensor | null | undefined)[] = [];
      if (g) {
        const gg = g;
        inGrads = tidy(() =>
          node.apply(gg).map((x) => (x === gg ? gg.viewAs(gg.shape, gg.strides, gg.offset) : x)),
        );
        g.dispose();
      }
      node.next.forEach((p, i) => {
        const gi = inGrads[i];
        if (!p) {
          gi?.dispose();
          return;
        }
        if (gi) {
          const prev = grads.get(p);
          if (prev) {
            const sum = prev.add(gi);
            prev.dispose();
            gi.dispose();
            grads.set(p, sum);
          } else {
            grads.set(p, gi);
          }
        }
        const c = deps.get(p)! - 1;
        deps.set(p, c);
        if (c === 0) ready.push(p);
      });
      for (let i = node.next.length; i < inGrads.length; i++) inGrads[i]?.dispose();
      if (!options.retainGraph) node.freeSaved();
    }
    for (const g of grads.values()) g.dispose();
  });
}

function onesLike(t: Tensor): Tensor {
  const o = Tensor.empty(t.backend, t.shape, t.dtype);
  o.backend.fill(o, 1);
  return o;
}

Tensor.prototype.backward = function (this: Tensor, gradient?: Tensor, options?: BackwardOptions): void {
  backward(this, gradient, options);
};
