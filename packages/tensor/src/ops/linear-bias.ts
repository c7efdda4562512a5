// The fused linear layer: one GEMM whose epilogue adds the bias before the output is rounded, so
// the output is written once and a 16-bit result is rounded once. Devices with a GEMM epilogue
// (cuBLASLt's CUBLASLT_EPILOGUE_BIAS, the CUDA tiled kernel) provide it; `linear` calls it only
// where the backend has it natively, so the CPU keeps its unfused GEMM + add numerics.

import type { Tensor } from '../tensor.js';

/**
 * out [M, N] = x [M, K] @ weight[N, K]^T + bias [N]: out and bias contiguous, x and weight any
 * 2-D strides, one floating dtype for all four. The sum is accumulated in float32 (float64 for
 * float64) and the bias is added before the single rounding to out's dtype; K may be 0 (out =
 * bias).
 */
export type LinearBiasKernel = (out: Tensor, x: Tensor, weight: Tensor, bias: Tensor) => void;
