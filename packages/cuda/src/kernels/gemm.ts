// The GEMM-family named kernels of the CUDA backend (native/src/kernels/gemm.cu): linear with its
// bias and activation applied in the GEMM's epilogue (cuBLASLt's CUBLASLT_EPILOGUE_BIAS,
// RELU_BIAS, GELU_AUX_BIAS..., or the tiled kernel's store), so the output is written once and a
// 16-bit result is rounded once, and linear's weight and bias gradients from one GEMM (cuBLASLt's
// CUBLASLT_EPILOGUE_BGRADB, or the tiled kernel and a row sum).
import type { KernelTable } from '@megapatch/tensor';
import { DTYPE_CODES, LINEAR_ACTIVATION_CODES } from '@megapatch/tensor/abi';
import { address, type Entries, pack } from '../pack.js';

type GemmKernels = Pick<KernelTable, 'linearBias' | 'linearBiasActivation' | 'linearWeightBiasGrad'>;

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

    linearBiasActivation(out, preAct, x, weight, bias, activation) {
      const [M, K] = x.shape;
      const N = weight.shape[0];
      // as linearBias; a null bias or preAct goes as address 0
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
        .num(bias ? address(bias) : 0)
        .num(DTYPE_CODES[(bias ?? out).dtype])
        .num(preAct ? address(preAct) : 0)
        .num(N)
        .num(DTYPE_CODES[(preAct ?? out).dtype])
        .num(LINEAR_ACTIVATION_CODES[activation]);
      call.linearActivation();
    },

    linearWeightBiasGrad(gradWeight, gradBias, g, x) {
      const [M, N] = g.shape;
      const K = x.shape[1];
      // gradWeight [N, K] = g^T [N, M] @ x [M, K]: the GEMM's A is g read transposed (its strides
      // swapped), and gradBias, the row sums of that A, is the epilogue's bias gradient
      pack
        .begin()
        .num(DTYPE_CODES[gradWeight.dtype])
        .num(N)
        .num(K)
        .num(M)
        .num(address(g))
        .num(g.strides[1])
        .num(g.strides[0])
        .num(address(x))
        .num(x.strides[0])
        .num(x.strides[1])
        .num(address(gradWeight))
        .num(K)
        .num(address(gradBias))
        .num(DTYPE_CODES[gradBias.dtype]);
      call.linearWeightBiasGrad();
    },
  };
}
