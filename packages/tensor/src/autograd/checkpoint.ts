// Activation recomputation: run a function without keeping its activations, and run it again
// during backward (Megatron's recompute / torch.utils.checkpoint in its reentrant form).
import { detach } from '../ops/shape.js';
import { defaultGenerator } from '../random.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { backward } from './engine.js';
import { enableGrad, isGradEnabled, noGrad } from './graph.js';
import { attachGrad } from './record.js';

/**
 * Runs fn(...inputs) without recording its internals; during backward, fn is run again with
 * the same RNG state (so dropout masks repeat) and differentiated. Parameters used inside fn
 * receive their gradients during that recomputation. fn must return one tensor.
 */
export function checkpoint(fn: (...inputs: Tensor[]) => Tensor, ...inputs: Tensor[]): Tensor {
  const rng = defaultGenerator.getState();
  const result = noGrad(() => fn(...inputs));
  // the node is attached to the output: never to an input that fn handed back unchanged
  const out = inputs.includes(result) ? result.viewAs(result.shape, result.strides, result.offset) : result;
  // recorded whenever grad mode is on: parameters inside fn may need grad even if no input does
  if (!isGradEnabled()) return out;
  attachGrad(out, 'CheckpointBackward', inputs, inputs, (g, saved) => {
    const after = defaultGenerator.getState();
    defaultGenerator.setState(rng);
    try {
      return enableGrad(() =>
        tidy(() => {
          const xs = saved.map((s, i) => {
            const d = detach(s);
            if (inputs[i].requiresGrad) d.requiresGrad_(true);
            return d;
          });
          const y = fn(...xs);
          backward(y, g);
          return xs.map((x) => {
            const gr = x.grad;
            x.grad = null;
            return gr;
          });
        }),
      );
    } finally {
      defaultGenerator.setState(after);
    }
  });
  return out;
}
