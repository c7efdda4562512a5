import type { Tensor } from '../tensor.js';
import { type BackwardFn, edgeOf, isGradEnabled, type MultiBackwardFn, Node } from './graph.js';

/** Whether an op on these inputs must record a graph node. */
export function needsGrad(...inputs: readonly (Tensor | null | undefined)[]): boolean {
  if (!isGradEnabled()) return false;
  for (const t of inputs) if (t?.requiresGrad) return true;
  return false;
}

/**
 * Records `out = op(inputs)` in the graph. `save` lists tensors the backward needs: the node
 * keeps its own references to them, so callers may dispose the originals. `backward` returns
 * one gradient per input.
 */
export function attachGrad(
  out: Tensor,
  name: string,
  inputs: readonly (Tensor | null | undefined)[],
  save: readonly Tensor[],
  backward: BackwardFn,
): Tensor {
  const next = inputs.map((t) => (t ? edgeOf(t) : null));
  const saved = save.length > 0 ? save.map((t) => t.viewAs(t.shape, t.strides, t.offset, false)) : null;
  const node = new Node(name, backward, next, saved);
  out.setGradFn(node);
  return out;
}

/**
 * Records an op with several outputs (split, unbind) as one node: its backward receives one
 * gradient per output (null for outputs that got none), so it can assemble the input gradient
 * once instead of summing a full-size gradient per output.
 */
export function attachGradMulti(
  outs: readonly Tensor[],
  name: string,
  inputs: readonly (Tensor | null | undefined)[],
  save: readonly Tensor[],
  backward: MultiBackwardFn,
): readonly Tensor[] {
  const next = inputs.map((t) => (t ? edgeOf(t) : null));
  const saved = save.length > 0 ? save.map((t) => t.viewAs(t.shape, t.strides, t.offset, false)) : null;
  const node = new Node(name, backward, next, saved, null, outs.length);
  for (let i = 0; i < outs.length; i++) outs[i].setGradFn(node, i);
  return outs;
}
