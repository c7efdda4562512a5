// Megatron's tensor-parallel region mappings: each is an autograd function whose forward and
// backward are a pair of collectives over the tensor-parallel group (copy: identity / all-reduce,
// reduce: all-reduce / identity, scatter / gather along the hidden or sequence dimension). A group
// of size 1 makes every mapping an identity without communication. Activations are
// [seq, batch, hidden]; "first dim" is the sequence, "last dim" the hidden (or vocab) dimension.
import { attachGrad, empty, needsGrad, noGrad, permute, type Tensor, tidy } from '@megapatch/tensor';
import { DistributedError } from '../errors.js';
import { getTensorModelParallelGroup } from '../parallel-state.js';
import type { ProcessGroup } from '../process-group.js';

/** The given group, or the tensor-model-parallel group of the parallel state. */
export function resolveTpGroup(tpGroup?: ProcessGroup): ProcessGroup {
  return tpGroup ?? getTensorModelParallelGroup();
}

function divisible(op: string, what: string, n: number, size: number, group: ProcessGroup): number {
  if (n % size !== 0) {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `${op}: ${what} ${n} is not divisible by the size ${size} of group '${group.name}'`,
    );
  }
  return n / size;
}

// ---- collectives on plain tensors (no autograd); each returns a new tensor ---------------------

/** Sum over the group; a new contiguous tensor (the input is not changed). */
function allReduceSum(x: Tensor, group: ProcessGroup): Tensor {
  if (group.size === 1) return x.detach();
  const out = x.clone();
  group.allReduce(out, 'sum').waitSync();
  return out;
}

/** This rank's slice of the last dim. */
function splitLastDim(x: Tensor, group: ProcessGroup, op: string): Tensor {
  if (group.size === 1) return x.detach();
  const n = divisible(op, 'last dimension', x.shape[x.ndim - 1], group.size, group);
  return x.narrow(-1, group.rank * n, n).contiguous();
}

/** This rank's rows of the first dim. */
function splitFirstDim(x: Tensor, group: ProcessGroup, op: string): Tensor {
  if (group.size === 1) return x.detach();
  const n = divisible(op, 'first dimension', x.shape[0], group.size, group);
  return x.narrow(0, group.rank * n, n).contiguous();
}

/** Every rank's tensor stacked along the first dim, in rank order. */
function gatherFirstDim(x: Tensor, group: ProcessGroup): Tensor {
  if (group.size === 1) return x.detach();
  const input = x.contiguous();
  const out = empty([x.shape[0] * group.size, ...x.shape.slice(1)], { dtype: x.dtype, device: x.device });
  group.allGatherIntoTensor(out, input).waitSync();
  input.dispose();
  return out;
}

/** Every rank's tensor concatenated along the last dim, in rank order. */
function gatherLastDim(x: Tensor, group: ProcessGroup): Tensor {
  if (group.size === 1) return x.detach();
  return tidy(() => {
    // The gather lands rank-major ([size, ...x.shape]); moving the rank axis next to the last
    // dim and copying gives the concatenation along it.
    const n = group.size;
    const stacked = gatherFirstDim(x.reshape(1, ...x.shape), group);
    const d = x.ndim;
    const order = [...Array.from({ length: d - 1 }, (_, i) => i + 1), 0, d];
    return permute(stacked, order)
      .contiguous()
      .reshape(...x.shape.slice(0, -1), x.shape[d - 1] * n);
  });
}

/** Sum over the group, each rank keeping its rows of the first dim. */
function reduceScatterFirstDim(x: Tensor, group: ProcessGroup, op: string): Tensor {
  if (group.size === 1) return x.detach();
  const n = divisible(op, 'first dimension', x.shape[0], group.size, group);
  const input = x.contiguous();
  const out = empty([n, ...x.shape.slice(1)], { dtype: x.dtype, device: x.device });
  group.reduceScatterTensor(out, input, 'sum').waitSync();
  input.dispose();
  return out;
}

// ---- autograd functions --------------------------------------------------------------------------

/** Runs `forward` outside autograd and records `backward` as the gradient of the result. */
function regionFunction(
  name: string,
  x: Tensor,
  forward: (x: Tensor) => Tensor,
  backward: (g: Tensor) => Tensor,
): Tensor {
  x.checkAlive(name);
  const out = tidy(() => noGrad(() => forward(x)));
  if (needsGrad(x)) attachGrad(out, name, [x], [], (g) => [backward(g)]);
  return out;
}

/** Forward identity, backward all-reduce (sum) of the gradient over the group. Input [*]. */
export function copyToTensorModelParallelRegion(x: Tensor, tpGroup?: ProcessGroup): Tensor {
  const group = resolveTpGroup(tpGroup);
  return regionFunction(
    'CopyToTensorModelParallelRegion',
    x,
    (t) => t.detach(),
    (g) => allReduceSum(g, group),
  );
}

/** Forward all-reduce (sum) over the group, backward identity. Input [*]. */
export function reduceFromTensorModelParallelRegion(x: Tensor, tpGroup?: ProcessGroup): Tensor {
  const group = resolveTpGroup(tpGroup);
  return regionFunction(
    'ReduceFromTensorModelParallelRegion',
    x,
    (t) => allReduceSum(t, group),
    (g) => g,
  );
}

/** Forward keeps this rank's slice of the last dim ([..., h] -> [..., h/tp]), backward all-gathers it. */
export function scatterToTensorModelParallelRegion(x: Tensor, tpGroup?: ProcessGroup): Tensor {
  const group = resolveTpGroup(tpGroup);
  const name = 'ScatterToTensorModelParallelRegion';
  return regionFunction(
    name,
    x,
    (t) => splitLastDim(t, group, name),
    (g) => gatherLastDim(g, group),
  );
}

/** Forward all-gathers the last dim ([..., h/tp] -> [..., h]), backward keeps this rank's slice. */
export function gatherFromTensorModelParallelRegion(x: Tensor, tpGroup?: ProcessGroup): Tensor {
  const group = resolveTpGroup(tpGroup);
  const name = 'GatherFromTensorModelParallelRegion';
  return regionFunction(
    name,
    x,
    (t) => gatherLastDim(t, group),
    (g) => splitLastDim(g, group, name),
  );
}

/** Forward keeps this rank's rows of dim 0 ([s, b, h] -> [s/tp, b, h]), backward all-gathers dim 0. */
export function scatterToSequenceParallelRegion(x: Tensor, tpGroup?: ProcessGroup): Tensor {
  const group = resolveTpGroup(tpGroup);
  const name = 'ScatterToSequenceParallelRegion';
  return regionFunction(
    name,
    x,
    (t) => splitFirstDim(t, group, name),
    (g) => gatherFirstDim(g, group),
  );
}

/**
 * Forward all-gathers dim 0 ([s/tp, b, h] -> [s, b, h]). Backward reduce-scatters dim 0 when the
 * region after the gather is tensor-parallel (each rank holds a partial gradient), or keeps this
 * rank's rows when it is duplicated (`tensorParallelOutputGrad` false: every rank holds the same
 * gradient).
 */
export function gatherFromSequenceParallelRegion(
  x: Tensor,
  tensorParallelOutputGrad = true,
  tpGroup?: ProcessGroup,
): Tensor {
  const group = resolveTpGroup(tpGroup);
  const name = 'GatherFromSequenceParallelRegion';
  return regionFunction(
    name,
    x,
    (t) => gatherFirstDim(t, group),
    (g) => (tensorParallelOutputGrad ? reduceScatterFirstDim(g, group, name) : splitFirstDim(g, group, name)),
  );
}

/** Forward reduce-scatters dim 0 ([s, b, h] partial sums -> [s/tp, b, h]), backward all-gathers dim 0. */
export function reduceScatterToSequenceParallelRegion(x: Tensor, tpGroup?: ProcessGroup): Tensor {
  const group = resolveTpGroup(tpGroup);
  const name = 'ReduceScatterToSequenceParallelRegion';
  return regionFunction(
    name,
    x,
    (t) => reduceScatterFirstDim(t, group, name),
    (g) => gatherFirstDim(g, group),
  );
}
