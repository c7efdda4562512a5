// Host launchers of the batched GEMM: for each batch i, C_i = alpha * A_i @ B_i + beta * C_i, the
// contract of @megapatch/tensor's Backend.gemm (native/src/gemm.cc of the CPU backend).
//
// An operand is a base address and element strides: element (r, k) of A_i lives at
// a.data + (i*a.bs + r*a.rs + k*a.cs) * itemsize, any strides (0 batch stride for broadcast,
// transposed or arbitrarily strided views); C has unit column stride (c.cs is ignored). float32,
// float64, bfloat16 and float16; 16-bit products accumulate in float32 and round once into C,
// float64 in double. With beta == 0, C is not read (NaN garbage there does not leak).
//
// An optional bias [N] (the epilogue of a linear layer): C_i[r, n] = alpha * (A_i @ B_i)[r, n] +
// beta * C_i[r, n] + bias[n], added in the accumulator type before C's single rounding, the same
// bias for every batch. With a bias, K == 0 is allowed (C = beta * C + bias).
#pragma once

#include "common.cuh"

namespace mpc {

struct GemmMat {
  char* data;
  int64_t bs, rs, cs;  // elements
};

// The epilogue's bias: N contiguous elements of the GEMM's dtype (another dtype is an error).
struct GemmBias {
  const char* data;
  DType dtype;
};

// cuBLASLt when the layout allows it (each of A and B has a unit stride in one of its matrix
// dimensions, leading dimensions and batch strides non-negative and non-overlapping), otherwise
// the tiled kernel below; in the emulator always the tiled kernel. Enqueues on `stream` only.
// M == 0 or N == 0 or batch == 0 is a no-op; K == 0 (without a bias) and non-float dtypes are
// errors (as on the CPU). A bias goes to cuBLASLt as CUBLASLT_EPILOGUE_BIAS when its address is
// 16-byte aligned and cuBLASLt has an algorithm for it, else to the tiled kernel.
void gemm(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, const GemmMat& a,
          const GemmMat& b, const GemmMat& c, double alpha, double beta, const GemmBias* bias = nullptr);

// The tiled shared-memory kernel for any strides, batch and float dtype (what the emulator runs).
void gemm_fallback(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K,
                   const GemmMat& a, const GemmMat& b, const GemmMat& c, double alpha, double beta,
                   const GemmBias* bias = nullptr);

// "cuBLASLt <major>.<minor>.<patch>" (the loaded library's version) or "emulated fallback".
const char* gemm_engine();

}  // namespace mpc
