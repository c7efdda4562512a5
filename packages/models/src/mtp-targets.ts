// The inputs and targets of the multi-token-prediction depths, as Megatron's roll_tensor makes
// them: at depth k the token ids, the labels and the loss mask are those of the main model shifted
// k positions to the left, each packed sample on its own (a sample never borrows the next one's
// tokens), the vacated last positions of every sequence set to 0. With context parallelism a
// rank holds two chunks of each sequence, so a shift needs tokens that live on other ranks: the
// three small rows are gathered over the CP group once per forward, shifted on the full sequence
// and split back (Megatron exchanges the boundary tokens; the result is the same). The shifts are
// gathers (indexSelect) on the ids' device with indices the host knows from the layout alone, and
// the token counts stay there too: nothing is read back (a packed row's cuSeqlens aside).
import { contextParallelGather, contextParallelPlan, type ProcessGroup } from '@megapatch/parallel';
import { cat, fromTypedArray, indexSelect, noGrad, ones, type Tensor, tidy, zeros } from '@megapatch/tensor';
import { ModelError } from './errors.js';

/** One MTP depth's ids [b, s] (int64), labels [b, s] (int64) and loss mask [b, s] (float32), local. */
export interface MtpDepthTargets {
  ids: Tensor;
  labels: Tensor;
  mask: Tensor;
  /**
   * Tokens the depth's loss averages over: its mask summed over the whole sequence (every CP rank),
   * a 0-d float32 tensor on the ids' device (nothing is read back).
   */
  count: Tensor;
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
  // the sequences a shift stays inside: each packed sample, or each row
  const segments: [number, number][] = [];
  for (let r = 0; r < b; r++) {
    if (cu) for (let i = 0; i + 1 < cu.length; i++) segments.push([r * s + cu[i], r * s + cu[i + 1]]);
    else segments.push([r * s, (r + 1) * s]);
  }
  const index = cp
    ? contextParallelPlan(s, { size: cpSize, rank: cp.rank }, { cuSeqlens: cu }).tokenIndices
    : null;
  const device = input.ids.device;
  return noGrad(() =>
    tidy(() => {
      // the rows on the full sequence (gathered over CP), flat, with a 0 appended at b·s for the
      // positions a shift vacates
      const flat = (t: Tensor) => {
        const full = cp ? contextParallelGather(t, cp, { seqDim: 1, cuSeqlens: cu }) : t;
        return cat([full.reshape(b * s), zeros([1], { dtype: t.dtype, device })], 0);
      };
      const ids = flat(input.ids);
      const labels = flat(input.labels);
      const mask = flat(input.lossMask ? input.lossMask.to('float32') : ones([b, sLocal], { device }));
      const pick = (t: Tensor, idx: Int32Array) =>
        indexSelect(t, 0, fromTypedArray(idx, [idx.length], { device }));
      // k shifts to the left within a segment: position i takes i + k, or the 0 when i + k leaves
      // it; positions outside every segment keep their own value
      const from = new Int32Array(b * s);
      const local = new Int32Array(b * sLocal);
      const out: MtpDepthTargets[] = [];
      for (let k = 1; k <= depths; k++) {
        for (let i = 0; i < b * s; i++) from[i] = i;
        for (const [start, end] of segments)
          for (let i = start; i < end; i++) from[i] = i + k < end ? i + k : b * s;
        for (let r = 0; r < b; r++)
          for (let j = 0; j < sLocal; j++) local[r * sLocal + j] = from[r * s + (index ? index[j] : j)];
        out.push({
          ids: pick(ids, local).view(b, sLocal),
          labels: pick(labels, local).view(b, sLocal),
          mask: pick(mask, local).view(b, sLocal),
          count: pick(mask, from).sum(),
        });
      }
      return out;
    }),
  );
}
