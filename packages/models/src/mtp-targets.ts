// The inputs and targets of the multi-token-prediction depths, as Megatron's roll_tensor makes
// them: at depth k the token ids, the labels and the loss mask are those of the main model shifted
// k positions to the left, each packed sample on its own (a sample never borrows the next one's
// tokens), the vacated last positions of every sequence set to 0. With context parallelism a
// rank holds two chunks of each sequence, so a shift needs tokens that live on other ranks: the
// three small integer rows are gathered over the CP group once per forward, shifted on the full
// sequence and split back (Megatron exchanges the boundary tokens; the result is the same).
import { contextParallelGather, contextParallelPlan, type ProcessGroup } from '@megapatch/parallel';
import { fromTypedArray, type Tensor } from '@megapatch/tensor';
import { ModelError } from './errors.js';

/** One MTP depth's ids [b, s] (int64), labels [b, s] (int64) and loss mask [b, s] (float32), local. */
export interface MtpDepthTargets {
  ids: Tensor;
  labels: Tensor;
  mask: Tensor;
  /** Tokens the depth's loss averages over: its mask summed over the whole sequence (every CP rank). */
  count: number;
}

/** What {@link mtpTargets} needs: the main forward's local rows and layout. */
export interface MtpTargetsInput {
  ids: Tensor;
  labels: Tensor;
  /** [b, s] float: the main loss mask (default all ones). */
  lossMask: Tensor | null;
  /** Packed row (b = 1): this rank's sample boundaries (the full row's divided by cp under CP). */
  cuSeqlens: Tensor | null;
  cpGroup: ProcessGroup | null;
}

function numbers(t: Tensor): Float64Array {
  return Float64Array.from(t.toTypedArray() as ArrayLike<number | bigint>, Number);
}

/** The targets of depths 1 .. depths (tensors owned by the caller). */
export function mtpTargets(input: MtpTargetsInput, depths: number): MtpDepthTargets[] {
  const [b, sLocal] = input.ids.shape;
  for (const [what, t] of [
    ['labels', input.labels],
    ['lossMask', input.lossMask],
  ] as const) {
    if (t && (t.ndim !== 2 || t.shape[0] !== b || t.shape[1] !== sLocal)) {
      throw new ModelError(
        'SHAPE_MISMATCH',
        `MTP ${what} [${t.shape}] must match the input ids [${b}, ${sLocal}]`,
      );
    }
  }
  const cp = input.cpGroup && input.cpGroup.size > 1 ? input.cpGroup : null;
  const cpSize = cp ? cp.size : 1;
  const s = sLocal * cpSize;
  const localCu = input.cuSeqlens ? Array.from(numbers(input.cuSeqlens)) : null;
  const cu = localCu ? localCu.map((x) => x * cpSize) : null;
  // rows 0..b-1 ids, b..2b-1 labels, 2b..3b-1 mask: [3b, s] on the full sequence
  const rows = new Float64Array(3 * b * sLocal);
  rows.set(numbers(input.ids), 0);
  rows.set(numbers(input.labels), b * sLocal);
  if (input.lossMask) rows.set(numbers(input.lossMask), 2 * b * sLocal);
  else rows.fill(1, 2 * b * sLocal);
  let full: Float64Array = rows;
  if (cp) {
    const local = fromTypedArray(rows, [3 * b, sLocal]);
    const gathered = contextParallelGather(local, cp, { seqDim: 1, cuSeqlens: cu });
    full = Float64Array.from(gathered.toTypedArray() as Float64Array);
    local.dispose();
    gathered.dispose();
  }
  // the sequences a shift stays inside: each packed sample, or each row
  const segments: [number, number][] = [];
  for (let r = 0; r < b; r++) {
    if (cu) for (let i = 0; i + 1 < cu.length; i++) segments.push([r * s + cu[i], r * s + cu[i + 1]]);
    else segments.push([r * s, (r + 1) * s]);
  }
  const index = cp
    ? contextParallelPlan(s, { size: cpSize, rank: cp.rank }, { cuSeqlens: cu }).tokenIndices
    : null;
  const out: MtpDepthTargets[] = [];
  const cur = full.slice();
  for (let k = 1; k <= depths; k++) {
    for (let part = 0; part < 3; part++) {
      const base = part * b * s;
      for (const [start, end] of segments) {
        if (end <= start) continue;
        for (let i = base + start; i < base + end - 1; i++) cur[i] = cur[i + 1];
        cur[base + end - 1] = 0;
      }
    }
    let count = 0;
    for (let i = 2 * b * s; i < 3 * b * s; i++) count += cur[i];
    const take = (part: number) => {
      const base = part * b * s;
      const o = new Float64Array(b * sLocal);
      for (let r = 0; r < b; r++) {
        for (let j = 0; j < sLocal; j++) o[r * sLocal + j] = cur[base + r * s + (index ? index[j] : j)];
      }
      return o;
    };
    out.push({
      ids: fromTypedArray(BigInt64Array.from(take(0), BigInt), [b, sLocal]),
      labels: fromTypedArray(BigInt64Array.from(take(1), BigInt), [b, sLocal]),
      mask: fromTypedArray(Float32Array.from(take(2)), [b, sLocal]),
      count,
    });
  }
  return out;
}
