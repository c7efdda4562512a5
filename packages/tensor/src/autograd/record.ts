import type { Tensor } from '../tensor.js';
import {
  type BackwardFn,
  edgeOf,
  type GradDestination,
  isGradEnabled,
  type MultiBackwardFn,
  Node,
} from './graph.js';

/** Whether an op on these inputs must record a graph node. */
export function needsGrad(...inputs: readonly (Tensor | null | undefined)[]): boolean {
  if (!isGradEnabled()) return false;
  for (const t of inputs) if (t?.requiresGrad) return true;
  return false;
}

export interface AttachOptions {
  /** The backward writes its gradients into BackwardFn's `dest` where given. */
  takesDestinations?: boolean;
  /** For a view op: the forward's view of another tensor (Node.forwardView). */
  forwardView?: (t: Tensor) => Tensor | null;
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
  options?: AttachOptions,
): Tensor {
  const next = inputs.map((t) => (t ? edgeOf(t) : null));
  const saved = save.length > 0 ? save.map((t) => t.viewAs(t.shape, t.strides, t.offset, false)) : null;
  const node = new Node(name, backward, next, saved);
  if (options?.takesDestinations) node.takesDestinations = true;
  if (options?.forwardView) node.forwardView = options.forwardView;
  out.setGradFn(node);
  return out;
}

/**
 * Records an op with several outputs (split, unbind) as one node: its backward receives one
 * gradient per output (null for outputs that got none), so it can assemble the input gradient
 * once instead of summing a full-size gradient per output. With `destination`, the producers of
 * the outputs' gradients may write them straight into that buffer (BackwardFn's `dest`).
 */
export function attachGradMulti(
  outs: readonly Tensor[],
  name: string,
  inputs: readonly (Tensor | null | undefined)[],
  save: readonly Tensor[],
  backward: MultiBackwardFn,
  destination?: GradDestination,
): readonly Tensor[] {
  const next = inputs.map((t) => (t ? edgeOf(t) : null));
  const saved = save.length > 0 ? save.map((t) => t.viewAs(t.shape, t.strides, t.offset, false)) : null;
  const node = new Node(name, backward, next, saved, null, outs.length);
  if (destination) node.destination = destination;
  for (let i = 0; i < outs.length; i++) outs[i].setGradFn(node, i);
  return outs;
}
