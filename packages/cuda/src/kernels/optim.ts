// The optimizer kernels of the CUDA backend (native/src/kernels/optim.cu): the arguments are packed
// as the CPU backend's wrappers in @megapatch/tensor's src/optim/kernels.ts pack them. The two
// kernels that return a value on the CPU write it on the stream instead: normPowerSum into its
// float64 `out` scalar and unscaleCheck into its float32 `foundInf` flag (1 when it found inf or
// NaN, never reset), both passed last. AdamW's kernels take the gradient scale's device tensor
// (AdamWScalars.gradScaleTensor) after their scalars: a flag, then the tensor.
import { type DType, type KernelTable, type Tensor, TensorError } from '@megapatch/tensor';
import { checkAdamWCopy, checkAdamWScaleTensor, packAdamWScalars, packSgd } from '@megapatch/tensor/abi';
import { type Entries, pack } from '../pack.js';

type OptimKernels = Pick<
  KernelTable,
  'adamwStep' | 'adamwStepMulti' | 'sgdStep' | 'normPowerSum' | 'normPowerSumMulti' | 'unscaleCheck'
>;

// Tensors per adamwStepMulti entry call: one launch of optim.h's kAdamWMultiTensors (48), and 48
// parameters' four tensors of up to 16 dimensions fit in the 8,192 argument slots (6,720 at most);
// with a copy each, 40 parameters' five tensors (7,000).
const MULTI_PER_CALL = 48;

type AdamWScalars = Parameters<KernelTable['adamwStep']>[4];
const MULTI_PER_CALL_COPIES = 40;

/** Throws unless `t` is a contiguous tensor of `dtype` with `n` elements (the CPU wrapper's check). */
function checkOutput(kernel: string, what: string, t: Tensor, dtype: DType, n: number): void {
  if (t.dtype !== dtype || t.numel !== n || !t.isContiguous) {
    throw new Error(
      `${kernel}: ${what} must be a contiguous ${dtype} tensor of ${n} element(s), got ${t.describe()}`,
    );
  }
}

/** After the scalars: whether the gradient scale is a device tensor, and that tensor (read by the kernel). */
function packScaleTensor(s: AdamWScalars): void {
  pack.num(s.gradScaleTensor ? 1 : 0);
  if (s.gradScaleTensor) pack.tensor(s.gradScaleTensor);
}

export function optimKernels(call: Entries): OptimKernels {
  return {
    adamwStep(p, g, m, v, s, copy) {
      if (copy) checkAdamWCopy('adamwStep', p, copy);
      checkAdamWScaleTensor('adamwStep', p, s);
      pack.begin().tensor(p).tensor(g).tensor(m).tensor(v);
      packAdamWScalars(pack, s, copy ?? null);
      packScaleTensor(s);
      call.adamwStep();
    },
    adamwStepMulti(ps, gs, ms, vs, s, copies) {
      const n = ps.length;
      if (gs.length !== n || ms.length !== n || vs.length !== n || (copies && copies.length !== n)) {
        throw new TensorError(
          'INVALID_ARGUMENT',
          `adamwStepMulti: got ${n} params, ${gs.length} grads, ${ms.length} expAvgs and ${vs.length} expAvgSqs${copies ? ` and ${copies.length} copies` : ''}; pass one of each per parameter`,
        );
      }
      if (copies) for (let i = 0; i < n; i++) checkAdamWCopy('adamwStepMulti', ps[i], copies[i]);
      if (n > 0) checkAdamWScaleTensor('adamwStepMulti', ps[0], s);
      const per = copies ? MULTI_PER_CALL_COPIES : MULTI_PER_CALL;
      for (let i0 = 0; i0 < n; i0 += per) {
        const i1 = Math.min(n, i0 + per);
        pack
          .begin()
          .num(i1 - i0)
          .num(copies ? 1 : 0);
        for (let i = i0; i < i1; i++) {
          pack.tensor(ps[i]).tensor(gs[i]).tensor(ms[i]).tensor(vs[i]);
          if (copies) pack.tensor(copies[i]);
        }
        packAdamWScalars(pack, s);
        packScaleTensor(s);
        call.adamwStepMulti();
      }
    },
    sgdStep(p, g, buf, s) {
      packSgd(pack, p, g, buf, s);
      call.sgdStep();
    },
    normPowerSum(t, p, out, accumulate = false) {
      checkOutput('normPowerSum', 'out', out, 'float64', 1);
      pack
        .begin()
        .tensor(t)
        .num(p)
        .tensor(out)
        .num(accumulate ? 1 : 0);
      call.normPowerSum();
    },
    normPowerSumMulti(ts, p, out, accumulate = false) {
      checkOutput('normPowerSumMulti', 'out', out, 'float64', 1);
      // runs of one dtype, up to MULTI_PER_CALL tensors an entry call (optim.h's launch list); the
      // first call writes out unless accumulating, the others add into it
      let acc = accumulate;
      let i0 = 0;
      while (i0 < ts.length) {
        let i1 = i0 + 1;
        while (i1 < ts.length && i1 - i0 < MULTI_PER_CALL && ts[i1].dtype === ts[i0].dtype) i1++;
        pack.begin().num(i1 - i0);
        for (let i = i0; i < i1; i++) pack.tensor(ts[i]);
        pack
          .num(p)
          .tensor(out)
          .num(acc ? 1 : 0);
        call.normPowerSumMulti();
        acc = true;
        i0 = i1;
      }
      if (!acc) {
        pack.begin().num(0).num(p).tensor(out).num(0);
        call.normPowerSumMulti();
      }
    },
    unscaleCheck(t, invScale, foundInf) {
      checkOutput('unscaleCheck', 'foundInf', foundInf, 'float32', 1);
      pack.begin().tensor(t).num(invScale).tensor(foundInf);
      call.unscaleCheck();
    },
  };
}
