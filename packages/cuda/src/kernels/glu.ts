// The gated activations of the CUDA backend (native/src/kernels/glu.cu): SwiGLU / GeGLU /
// GeGLU-tanh forward and backward, one elementwise kernel each way. The arguments are packed as
// the CPU backend's wrappers in @megapatch/tensor's src/ops/glu.ts pack them (the activation as
// its GATED_ACTIVATION_CODES code).
import type { KernelTable } from '@megapatch/tensor';
import { GATED_ACTIVATION_CODES } from '@megapatch/tensor/abi';
import { type Entries, pack } from '../pack.js';

type GluKernels = Pick<KernelTable, 'gatedActivation' | 'gatedActivationBackward'>;

export function gluKernels(call: Entries): GluKernels {
  return {
    gatedActivation(out, x, activation) {
      pack.begin().tensor(out).tensor(x).num(GATED_ACTIVATION_CODES[activation]);
      call.gatedActivationForward();
    },
    gatedActivationBackward(dx, g, x, activation) {
      pack.begin().tensor(dx).tensor(g).tensor(x).num(GATED_ACTIVATION_CODES[activation]);
      call.gatedActivationBackward();
    },
  };
}
