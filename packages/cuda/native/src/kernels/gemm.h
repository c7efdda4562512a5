// Host launchers of the batched GEMM: for each batch i, C_i = alpha * A_i @ B_i + beta * C_i, the
// contract of @megapatch/tensor's Backend.gemm (native/src/gemm.cc of the CPU backend).
//
// An operand is a base address and element strides: element (r, k) of A_i lives at
// a.data + (i*a.bs + r*a.rs + k*a.cs) * itemsize, any strides (0 batch stride for broadcast,
// transposed or arbitrarily strided views); C has unit column stride (c.cs is ignored). float32,
// float64, bfloat16 and float16; 16-bit products accumulate in float32 and round once into C,
// float64 in double. With beta == 0, C is not read (NaN garbage there does not leak).
#pragma once

#include "common.cuh"

namespace mpc {

struct GemmMat {
  char* data;
  int64_t bs, rs, cs;  // elements
};

// cuBLASLt when the layout allows it (each of A and B has a unit stride in one of its matrix
// dimensions, leading dimensions and batch strides non-negative and non-overlapping), otherwise
// the tiled kernel below; in the emulator always the tiled kernel. Enqueues on `stream` only.
// M == 0 or N == 0 or batch == 0 is a no-op; K == 0 and non-float dtypes are errors (as on the CPU).
void gemm(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, const GemmMat& a,
          const GemmMat& b, const GemmMat& c, double alpha, double beta);

// The tiled shared-memory kernel for any strides, batch and float dtype (what the emulator runs).
void gemm_fallback(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K,
                   const GemmMat& a, const GemmMat& b, const GemmMat& c, double alpha, double beta);

// "cuBLASLt <major>.<minor>.<patch>" (the loaded library's version) or "emulated fallback".
const char* gemm_engine();

}  // namespace mpc
