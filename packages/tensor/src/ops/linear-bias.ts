// The fused linear layer's GEMM kernels: the forward with the bias added in the GEMM's epilogue,
// before the output is rounded (written once, a 16-bit result rounded once), and the backward's
// weight and bias gradients from one GEMM whose epilogue also sums the rows of the upstream
// gradient. Devices with GEMM epilogues (cuBLASLt's CUBLASLT_EPILOGUE_BIAS and _BGRADB, the CUDA
// tiled kernel) provide them; `linear` calls them only where the backend has them natively, so the
// CPU keeps its unfused GEMM + add numerics.

import type { Tensor } from '../tensor.js';

/**
 * out [M, N] = x [M, K] @ weight[N, K]^T + bias [N]: out and bias contiguous, x and weight any
 * 2-D strides, one floating dtype for all four. The sum is accumulated in float32 (float64 for
 * float64) and the bias is added before the single rounding to out's dtype; K may be 0 (out =
 * bias).
 */
export type LinearBiasKernel = (out: Tensor, x: Tensor, weight: Tensor, bias: Tensor) => void;

/**
 * The weight and bias gradients of linear from the upstream gradient g [M, N] and the input x
 * [M, K]: gradWeight [N, K] = g^T @ x and gradBias [N] = sum over the M rows of g. gradWeight and
 * gradBias contiguous, g and x any 2-D strides, one floating dtype for all four. Both are
 * accumulated in float32 (float64 for float64) and rounded once; M may be 0 (both zero).
 */
export type LinearWeightBiasGradKernel = (gradWeight: Tensor, gradBias: Tensor, g: Tensor, x: Tensor) => void;

/**
 * Megatron's gradient-accumulation fusion: mainGrad [N, K] += g^T @ x, for linear's weight
 * gradient accumulated straight into a float32 main gradient (the weight gradient never exists in
 * g's dtype). mainGrad float32 and contiguous; g [M, N] and x [M, K] any 2-D strides, one dtype of
 * float32, bfloat16 or float16. The products are accumulated in float32 and added to mainGrad's
 * value before the single rounding to float32; M == 0 adds nothing.
 */
export type LinearWeightGradAccumulateKernel = (mainGrad: Tensor, g: Tensor, x: Tensor) => void;

/**
 * out [M, N] = residual [M, N] + x [M, K] @ weight[N, K]^T, for a linear layer whose output joins
 * a residual stream (the attention projection, the MLP's output): the product is accumulated in
 * float32 (float64 for float64) and the residual added before the single rounding to out's dtype.
 * out contiguous rows, residual any row stride with unit column stride (it may be out itself,
 * else it must not overlap out), x and weight any 2-D strides, one floating dtype for all four; K
 * may be 0 (out = residual).
 */
export type LinearResidualKernel = (out: Tensor, x: Tensor, weight: Tensor, residual: Tensor) => void;
