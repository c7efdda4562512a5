// The inputs and targets of the multi-token-prediction depths, as Megatron's roll_tensor makes
// them: at depth k the token ids, the labels and the loss mask are those of the main model shifted
// k positions to the left, each packed sample on its own (a sample never borrows the next one's
// tokens), the vacated last positions of every sequence set to 0. With context parallelism a
// rank holds two chunks of each sequence, so a shift needs tokens that live on other ranks: the
// three small rows are gathered over the CP group once per forward, shifted on the full sequence
// and split back (Megatron exchanges the boundary tokens; the result is the same). The shifts are
// gathers (indexSelect) on the ids' device, with indices the host knows from the layout alone or,
// for packed rows, computed where cuSeqlens lives; the token counts stay there too: nothing is read
// back (under CP the host plans the split with cuSeqlens, as before).
import { contextParallelGather, contextParallelPlan, type ProcessGroup } from '@megapatch/parallel';
import {
  arange,
  cat,
  cumsum,
  fromTypedArray,
  full,
  indexSelect,
  noGrad,
  ones,
  scatterAdd,
  type Tensor,
  tidy,
  where,
  zeros,
} from '@megapatch/tensor';
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
  /** The same boundaries on the host when known (spares reading them back under CP). */
  cuSeqlensValues?: readonly number[] | null;
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
  // packed rows without CP: the samples' bounds are used where cuSeqlens lives (deviceShift);
  // under CP the host plans the split with them
  const packedHere = !cp && input.cuSeqlens !== null;
  const localCu =
    input.cuSeqlens && !packedHere ? (input.cuSeqlensValues ?? Array.from(numbers(input.cuSeqlens))) : null;
  const cu = localCu ? localCu.map((x) => x * cpSize) : null;
  // the sequences a shift stays inside: each packed sample, or each row
  const segments: [number, number][] = [];
  for (let r = 0; r < b && !packedHere; r++) {
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
      const onDevice = (idx: Int32Array | Tensor) =>
        idx instanceof Int32Array ? fromTypedArray(idx, [idx.length], { device }) : idx;
      // k shifts to the left within a segment: position i takes i + k, or the 0 when i + k leaves
      // it; positions outside every segment keep their own value
      const from = new Int32Array(b * s);
      const local = new Int32Array(b * sLocal);
      const out: MtpDepthTargets[] = [];
      for (let k = 1; k <= depths; k++) {
        // the positions this rank's rows read (at), and those of the whole sequence (for the count)
        let at: Int32Array | Tensor = local;
        let whole: Int32Array | Tensor = local;
        if (packedHere) {
          at = deviceShift(input.cuSeqlens as Tensor, b, s, k, device);
          whole = at;
        } else {
          for (let i = 0; i < b * s; i++) from[i] = i;
          for (const [start, end] of segments)
            for (let i = start; i < end; i++) from[i] = i + k < end ? i + k : b * s;
          for (let r = 0; r < b; r++)
            for (let j = 0; j < sLocal; j++) local[r * sLocal + j] = from[r * s + (index ? index[j] : j)];
          if (index) whole = from;
        }
        const rows = onDevice(at); // uploaded once for the three rows
        const m = indexSelect(mask, 0, rows);
        out.push({
          ids: indexSelect(ids, 0, rows).view(b, sLocal),
          labels: indexSelect(labels, 0, rows).view(b, sLocal),
          mask: m.view(b, sLocal),
          count: (whole === at ? m : indexSelect(mask, 0, onDevice(whole))).sum(),
        });
      }
      return out;
    }),
  );
}

/**
 * The positions depth k reads [b·s] (int64, on the ids' device) for rows of s tokens packed at
 * the boundaries cu: position i of every row takes i + k when no boundary lies in (i, i + k] (the
 * same sample: a boundary count `seg` up to each position, from a cumsum of marks at the
 * boundaries, is equal at both), the appended 0 (at b·s) when the shift leaves its sample, and
 * itself from cu's last boundary on (outside every sample), as the host's segments give.
 */
function deviceShift(cu: Tensor, b: number, s: number, k: number, device: string): Tensor {
  const int64 = { dtype: 'int64' as const, device };
  const c = cu.to(device, 'int64');
  const n = c.shape[0];
  const marks = scatterAdd(zeros([s + 1], int64), 0, c, ones([n], int64));
  const seg = cumsum(marks, 0).narrow(0, 0, s);
  const i = arange(0, s, 1, int64);
  const ahead = k < s ? cat([seg.narrow(0, k, s - k), full([k], -1, int64)], 0) : full([s], -1, int64);
  const row = where(i.lt(c.narrow(0, n - 1, 1)), where(ahead.eq(seg), i.add(k), -1), i); // [s]
  const rows = row.view(1, s).expand(b, s);
  return where(rows.ge(0), rows.add(arange(0, b * s, s, int64).view(b, 1)), b * s).reshape(b * s);
}
