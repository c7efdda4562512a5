// The GEMM-family named kernels of the CUDA backend (native/src/kernels/gemm.cu): linear with its
// bias added in the GEMM's epilogue (cuBLASLt's CUBLASLT_EPILOGUE_BIAS, or the tiled kernel's
// store), so the output is written once and a 16-bit result is rounded once.
import type { KernelTable } from '@megapatch/tensor';
import { DTYPE_CODES } from '@megapatch/tensor/abi';
import { address, type Entries, pack } from '../pack.js';

type GemmKernels = Pick<KernelTable, 'linearBias'>;

export function gemmKernels(call: Entries): GemmKernels {
  return {
    linearBias(out, x, weight, bias) {
      const [M, K] = x.shape;
      const N = weight.shape[0];
      // out = x @ weight^T: the GEMM's B is weight [N, K] read as [K, N], its strides swapped
      pack
        .begin()
        .num(DTYPE_CODES[out.dtype])
        .num(M)
        .num(N)
        .num(K)
        .num(address(x))
        .num(x.strides[0])
        .num(x.strides[1])
        .num(address(weight))
        .num(weight.strides[1])
        .num(weight.strides[0])
        .num(address(out))
        .num(N)
        .num(address(bias))
        .num(DTYPE_CODES[bias.dtype]);
      call.linearBias();
    },
  };
}
