// tidy() scopes: every tensor created inside a scope is disposed when the scope ends, except
// the ones the function returns (they move to the enclosing scope) and the ones passed to keep().
import type { Tensor } from './tensor.js';

const scopes: Set<Tensor>[] = [];

export function trackTensor(t: Tensor): void {
  if (scopes.length > 0) scopes[scopes.length - 1].add(t);
}

export function untrackTensor(t: Tensor): void {
  for (let i = scopes.length - 1; i >= 0; i--) if (scopes[i].delete(t)) return;
}

/** Removes a tensor from every tidy scope so that it outlives them; returns it. */
export function keep<T extends Tensor>(t: T): T {
  for (const s of scopes) s.delete(t);
  return t;
}

function collect(value: unknown, out: Set<Tensor>, depth = 0): void {
  if (value === null || typeof value !== 'object' || depth > 4) return;
  if ((value as { [TENSOR_BRAND]?: boolean })[TENSOR_BRAND]) {
    out.add(value as Tensor);
    return;
  }
  if (Array.isArray(value)) for (const v of value) collect(v, out, depth + 1);
  else if (Object.getPrototypeOf(value) === Object.prototype) {
    for (const v of Object.values(value)) collect(v, out, depth + 1);
  }
}

export const TENSOR_BRAND = Symbol.for('megapatch.tensor');

/**
 * Runs fn and disposes every tensor it created that is not part of its result (a tensor, or
 * arrays / plain objects holding tensors). fn must be synchronous.
 */
export function tidy<T>(fn: () => T): T {
  const scope = new Set<Tensor>();
  scopes.push(scope);
  let result: T;
  try {
    result = fn();
  } catch (e) {
    scopes.pop();
    for (const t of scope) t.dispose();
    throw e;
  }
  scopes.pop();
  if (result instanceof Promise) {
    throw new Error('tidy(fn): fn must be synchronous; dispose tensors of async work explicitly');
  }
  const returned = new Set<Tensor>();
  collect(result, returned);
  for (const t of scope) {
    if (returned.has(t)) trackTensor(t);
    else t.dispose();
  }
  return result;
}
