// Host launchers of the batched GEMM: for each batch i, C_i = alpha * A_i @ B_i + beta * C_i, the
// contract of @megapatch/tensor's Backend.gemm (native/src/gemm.cc of the CPU backend).
//
// An operand is a base address and element strides: element (r, k) of A_i lives at
// a.data + (i*a.bs + r*a.rs + k*a.cs) * itemsize, any strides (0 batch stride for broadcast,
// transposed or arbitrarily strided views); C has unit column stride (c.cs is ignored). float32,
// float64, bfloat16 and float16; 16-bit products accumulate in float32 and round once into C,
// float64 in double. With beta == 0, C is not read (NaN garbage there does not leak).
//
// An optional epilogue (the fused linear layer; see GemmEpilogue): with v = alpha * (A_i @ B_i) +
// beta * C_i + bias in the accumulator type, aux (the pre-activation) = v and C = act(v), each
// rounded once to the GEMM's dtype; or a bias gradient, the row sums of A. With an epilogue, K == 0
// is allowed (the product is 0).
#pragma once

#include <vector>

#include "common.cuh"

namespace mpc {

struct GemmMat {
  char* data;
  int64_t bs, rs, cs;  // elements
};

// The activation of the epilogue. Must match LINEAR_ACTIVATION_CODES in @megapatch/tensor's
// src/backend/abi.ts. The formulas are the unary ops' (elementwise.cu): relu(v) = v > 0 ? v : 0,
// gelu(v) = v/2 (1 + erf(v/sqrt 2)), gelu-tanh(v) = v/2 (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))).
enum class GemmAct : int { None = 0, Relu = 1, Gelu = 2, GeluTanh = 3 };

// What the GEMM does besides the product, in the accumulator type before the rounding to C. Every
// vector and matrix here has the GEMM's dtype (another dtype is an error), is shared by the batch
// and requires batch == 1 where noted.
//  - bias [N] contiguous: added to every row of C (the same bias for every batch).
//  - aux [M, N] (row stride aux_rs, unit column stride; batch 1): receives the pre-activation
//    alpha * A @ B + beta * C + bias, rounded once (the input of act, kept for the backward).
//  - act: applied after the bias, before C's rounding.
//  - bias_grad [M] contiguous (batch 1, alpha 1, no bias, aux or act): receives the row sums of A,
//    sum_k A[r, k], accumulated in the accumulator type and rounded once: with A = g^T it is the
//    bias gradient of a linear layer whose weight gradient is C = g^T x.
struct GemmEpilogue {
  const char* bias = nullptr;
  char* aux = nullptr;
  int64_t aux_rs = 0;
  GemmAct act = GemmAct::None;
  char* bias_grad = nullptr;
  DType dtype = DType::F32;  // of bias, aux and bias_grad: must be the GEMM's

  bool any() const { return bias || aux || act != GemmAct::None || bias_grad; }
};

// cuBLASLt when the layout allows it (each of A and B has a unit stride in one of its matrix
// dimensions, leading dimensions and batch strides non-negative and non-overlapping) and it has an
// epilogue for the one asked (see gemm.cu), otherwise the tiled kernel below; in the emulator
// always the tiled kernel. Enqueues on `stream` only. M == 0 or N == 0 or batch == 0 leaves C
// alone (a bias gradient is still written when M > 0); K == 0 without an epilogue and non-float
// dtypes are errors (as on the CPU).
void gemm(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, const GemmMat& a,
          const GemmMat& b, const GemmMat& c, double alpha, double beta, const GemmEpilogue* epi = nullptr);

// C += A @ B for one matrix with C float32 and A, B of `dtype` (float32, bfloat16 or float16): the
// products accumulated in float32 and added to C's value before its one rounding (Megatron's
// gradient-accumulation fusion: linear's weight gradient g^T x added straight into the fp32 main
// gradient). cuBLASLt on a GPU (A and B 16-bit, C and D float32, float32 compute), else the tiled
// kernel with a float32 C. M, N or K of 0 adds nothing; other dtypes are errors.
void gemm_accumulate_f32(cudaStream_t stream, DType dtype, int64_t M, int64_t N, int64_t K, const GemmMat& a,
                         const GemmMat& b, const GemmMat& c);

// out = A @ B + R for one matrix of a float dtype (linear's output with the residual added in the
// GEMM): R [M, N] of the GEMM's dtype with row stride r.rs and unit column stride, out = c (row
// stride c.rs); the product is accumulated in the accumulator type and R added before the one
// rounding to out. cuBLASLt on a GPU (its C = R, D = out, beta 1) where the layout allows, else R is
// copied into out and the GEMM runs with beta 1 in place (the emulator's path): the same
// arithmetic. R may not overlap out unless it is out itself. M or N of 0: nothing; K of 0: out = R.
void gemm_residual(cudaStream_t stream, DType dtype, int64_t M, int64_t N, int64_t K, const GemmMat& a,
                   const GemmMat& b, const GemmMat& c, const GemmMat& r);

// The tiled shared-memory kernel for any strides, batch and float dtype (what the emulator runs),
// with the epilogue applied at its store (a bias gradient by a row-sum kernel after it).
void gemm_fallback(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K,
                   const GemmMat& a, const GemmMat& b, const GemmMat& c, double alpha, double beta,
                   const GemmEpilogue* epi = nullptr);

// One product of a grouped GEMM: C = A @ B, M x N x K, operands as in gemm (bs unused).
struct GemmProblem {
  int64_t M, N, K;
  GemmMat a, b, c;
};

// Independent products of one float dtype, C = A @ B each (alpha 1, beta 0: C is written, not
// read): on a GPU one gemm per problem (cuBLASLt; measured faster than cuBLAS's grouped GEMM for
// most MoE shapes), or with MEGAPATCH_GROUPED_GEMM=grouped one cublasGemmGroupedBatchedEx for all
// (its operand addresses uploaded by a small kernel; float64, a layout cuBLAS cannot take or
// addresses and leading dimensions not 16-byte aligned: one gemm per problem); in the emulator the
// grouped tiled kernel, every tile of every problem in one launch, each product bit for bit the
// tiled gemm's. Problems with M or N of 0 are skipped; K == 0 and non-float dtypes are errors, as
// in gemm. MEGAPATCH_GROUPED_GEMM=loop runs one gemm per problem, =tiled the grouped tiled kernel
// on a GPU too.
void grouped_gemm(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps);

// Group sizes on the device (an int64 [count] tensor: a MoE layer's tokens per expert, counted
// where the router ran): which dimension the groups split, 0 the rows (problem g: M = sizes[g], its
// A and C starting at row sizes[0] + ... + sizes[g - 1] of the shared A and C) or 1 the reduction
// (K = sizes[g], A's and B's k starting there: dW_g = dY_g^T X_g), and the rows they split.
struct SizedGroups {
  int64_t split, total;
  const int64_t* sizes;
};

// The grouped GEMM of `ps` (one a group, each given at the first group's start with the split
// dimension 0; their fixed dimensions and strides equal; C written, not read) with the sizes read
// where they are: a small kernel plans the groups on the device in stream order, then the grouped
// kernel runs over a grid sized for the worst case (gemm_sized.cuh), so the host never waits for
// the sizes. A size below 0 counts as 0 and the sizes are clamped to `total` (the caller checks
// them, deferred). A group of K = 0 writes zeros. False, with nothing enqueued, where the mode
// cannot (the loop of cuBLASLt GEMMs, the GPU's default, needs the sizes on the host): the grouped
// tiled kernel (=tiled, and the emulator's default) and the tensor-core kernels (=mma, =wgmma,
// where they take the operands' layout) can.
bool grouped_gemm_sized(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps, const SizedGroups& g);

// The tensor-core grouped kernels (MEGAPATCH_GROUPED_GEMM=mma / =wgmma, gemm_grouped_mma.cu):
// enqueues the products of `ps` (validated, sizes positive) they can take, bf16 / f16 on sm_80+
// with 16-byte aligned layouts (each operand unit-strided in one dimension, the other stride and
// that dimension's extent multiples of 8), one launch per operand layout; returns the others, for
// the caller. `wgmma`: on wgmma where the device and build have it (sm_90a), else on mma.sync.
std::vector<GemmProblem> grouped_mma(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps,
                                     bool wgmma = false);
// The same over device group sizes (grouped_gemm_sized): false, with nothing enqueued, unless the
// kernels take every problem whatever the sizes.
bool grouped_mma_sized(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps, const SizedGroups& g,
                       bool wgmma);

// Copies `n` host words to device memory at dst on `stream`: one small kernel per 480 words, the
// words passed as its parameter (captured at each launch; the caller may reuse them): a table's
// upload in stream order without a synchronising pageable copy.
void upload_words(cudaStream_t stream, const uint64_t* words, int64_t n, uint64_t* dst);

// "cuBLASLt <major>.<minor>.<patch>" (the loaded library's version) or "emulated fallback".
const char* gemm_engine();

}  // namespace mpc
