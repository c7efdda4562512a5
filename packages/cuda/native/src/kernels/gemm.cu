// Batched GEMM: C_i = alpha * A_i @ B_i + beta * C_i (see gemm.h for the operand layout).
//
// Two paths:
//  - gemm_fallback: a tiled shared-memory kernel for any strides, batch (0 batch stride for
//    broadcast) and float dtype, accumulating in float32 (double for float64), with the epilogue
//    (bias, pre-activation, activation) applied at its store and a bias gradient by a row-sum
//    kernel. It is what the emulator runs, and the GPU's path for the layouts and epilogues
//    cuBLASLt cannot take.
//  - cuBLASLt (GPU builds only): the row-major product C[M,N] = A[M,K] B[K,N] is the column-major
//    product C^T[N,M] = B^T[N,K] A^T[K,M], so cuBLASLt's "A" is our B and its "B" is our A. An
//    operand is usable when one of its matrix strides is 1; its descriptor, the matmul descriptor
//    (with its epilogue) and the heuristic's algorithm are cached per device, shape and epilogue.
#include "gemm.h"

#include "elementwise.h"
#include "gemm_sized.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace mpc {

// ---- the tiled kernel ------------------------------------------------------------------------
namespace {

MP_D float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
MP_D double fma_acc(double a, double b, double c) { return fma(a, b, c); }

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;

MP_D float act_erf(float x) { return erff(x); }
MP_D double act_erf(double x) { return erf(x); }
MP_D float act_tanh(float x) { return tanhf(x); }
MP_D double act_tanh(double x) { return tanh(x); }

// The epilogue's activation (a GemmAct code, not None) with the unary ops' expressions
// (elementwise.cu), in the accumulator type.
template <typename C> MP_D C epilogue_act(int act, C v) {
  if (act == static_cast<int>(GemmAct::Relu)) return v > C(0) ? v : C(0);
  if (act == static_cast<int>(GemmAct::Gelu)) return C(0.5) * v * (C(1) + act_erf(v * C(kInvSqrt2)));
  return C(0.5) * v * (C(1) + act_tanh(C(kSqrt2OverPi) * (v + C(0.044715) * v * v * v)));
}

// One block computes a BM x BN tile of C for a run of (batch, row-tile) pairs (gridDim.y and
// gridDim.z are capped; the block loops over the rest); each thread TM x TN outputs: rows
// ty*TM + i, columns tx + j*TX (adjacent threads write adjacent columns of C). A and B go through
// shared memory as k-major BK-deep slices, converted to the accumulator type on load; the load
// order follows the operand's fast dimension (a_kfast: A's column stride is the smaller, so
// adjacent threads read adjacent k; b_nfast: likewise B's columns) so global reads coalesce for
// row-major and transposed operands alike. Out-of-range rows, columns and k read as 0; the
// results of out-of-range rows and columns are never stored, so no padding reaches C. The
// epilogue works on the accumulator-type value before the store rounds: a non-null bias adds
// bias[n] to column n, a non-null aux (batch 1) receives that value (the pre-activation, rounded
// once), and act (a GemmAct code) is applied to what C receives.
// One BM x BN tile of C at (m0, n0) for the block (As and Bs: its shared slices).
template <typename T, int BM, int BN, int BK, int TM, int TN, typename TC = T>
MP_D void gemm_tile(typename Tr<T>::C (*As)[BM + 1], typename Tr<T>::C (*Bs)[BN + 1], int64_t M, int64_t N,
                    int64_t K, const T* Az, int64_t ars, int64_t acs, int a_kfast, const T* Bz, int64_t brs,
                    int64_t bcs, int b_nfast, TC* Cz, int64_t crs, int64_t m0, int64_t n0, typename Tr<T>::C alpha,
                    typename Tr<T>::C beta, const T* bias, T* aux, int64_t aux_rs, int act) {
  using Acc = typename Tr<T>::C;
  constexpr int TX = BN / TN;
  constexpr int NT = (BM / TM) * TX;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX, ty = tid / TX;
  Acc acc[TM][TN];
MP_UNROLL
  for (int i = 0; i < TM; i++)
MP_UNROLL
    for (int j = 0; j < TN; j++) acc[i][j] = Acc(0);

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    for (int e = tid; e < BM * BK; e += NT) {
      int r, kk;
      if (a_kfast) {
        r = e / BK;
        kk = e % BK;
      } else {
        kk = e / BM;
        r = e % BM;
      }
      const int64_t gr = m0 + r, gk = k0 + kk;
      As[kk][r] = (gr < M && gk < K) ? Tr<T>::ld(Az + gr * ars + gk * acs) : Acc(0);
    }
    for (int e = tid; e < BK * BN; e += NT) {
      int n, kk;
      if (b_nfast) {
        kk = e / BN;
        n = e % BN;
      } else {
        n = e / BK;
        kk = e % BK;
      }
      const int64_t gn = n0 + n, gk = k0 + kk;
      Bs[kk][n] = (gn < N && gk < K) ? Tr<T>::ld(Bz + gk * brs + gn * bcs) : Acc(0);
    }
    __syncthreads();
MP_UNROLL
    for (int kk = 0; kk < BK; kk++) {
      Acc av[TM], bv[TN];
MP_UNROLL
      for (int i = 0; i < TM; i++) av[i] = As[kk][ty * TM + i];
MP_UNROLL
      for (int j = 0; j < TN; j++) bv[j] = Bs[kk][tx + j * TX];
MP_UNROLL
      for (int i = 0; i < TM; i++)
MP_UNROLL
        for (int j = 0; j < TN; j++) acc[i][j] = fma_acc(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }

MP_UNROLL
  for (int i = 0; i < TM; i++) {
    const int64_t r = m0 + ty * TM + i;
    if (r >= M) continue;
MP_UNROLL
    for (int j = 0; j < TN; j++) {
      const int64_t n = n0 + tx + j * TX;
      if (n >= N) continue;
      TC* p = Cz + r * crs + n;
      Acc v = alpha * acc[i][j];
      if (beta != Acc(0)) v = fma_acc(beta, static_cast<Acc>(Tr<TC>::ld(p)), v);  // beta == 0: C is not read
      if (bias) v += Tr<T>::ld(bias + n);
      if (aux) Tr<T>::st(aux + r * aux_rs + n, v);
      if (act != 0) v = epilogue_act(act, v);
      Tr<TC>::st(p, v);
    }
  }
}

template <typename T, int BM, int BN, int BK, int TM, int TN, typename TC = T>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    gemm_tiled_kernel(int64_t batch, int64_t M, int64_t N, int64_t K, const T* A, int64_t abs_, int64_t ars,
                      int64_t acs, int a_kfast, const T* B, int64_t bbs, int64_t brs, int64_t bcs, int b_nfast, TC* C,
                      int64_t cbs, int64_t crs, typename Tr<T>::C alpha, typename Tr<T>::C beta, const T* bias,
                      T* aux, int64_t aux_rs, int act) {
  using Acc = typename Tr<T>::C;
  __shared__ Acc As[BK][BM + 1];
  __shared__ Acc Bs[BK][BN + 1];
  const int64_t mtiles = (M + BM - 1) / BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  for (int64_t z = blockIdx.z; z < batch; z += gridDim.z)
    for (int64_t mt = blockIdx.y; mt < mtiles; mt += gridDim.y)
      gemm_tile<T, BM, BN, BK, TM, TN, TC>(As, Bs, M, N, K, A + z * abs_, ars, acs, a_kfast, B + z * bbs, brs,
                                           bcs, b_nfast, C + z * cbs, crs, mt * BM, n0, alpha, beta, bias, aux, aux_rs, act);
}

// One problem of the grouped tiled kernel, as the device reads it from the uploaded table: its
// operands (element strides), the load orders of launch_tiled, and its first tile in the launch's
// numbering (tiles of a problem: row-major over its m-tiles x n-tiles).
struct GroupedEntry {
  const char* a;
  const char* b;
  char* c;
  int64_t M, N, K, ars, acs, brs, bcs, crs, a_kfast, b_nfast, tile_start, ntiles_n;
};
static_assert(sizeof(GroupedEntry) % 8 == 0, "GroupedEntry is uploaded as 64-bit words");

// Every tile of every problem of `table` (count entries, tile_start ascending): a grid-stride loop
// over the tiles, each block finding its problem by binary search and computing the tile with
// gemm_tile (alpha 1, beta 0, no epilogue), so each product is the tiled kernel's bit for bit.
// total_dev: the tile count on the device (a plan of device group sizes wrote it; the grid was
// sized for the most there can be), else total_tiles.
template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    gemm_grouped_tiled_kernel(const GroupedEntry* table, int64_t count, int64_t total_tiles, const int64_t* total_dev) {
  using Acc = typename Tr<T>::C;
  __shared__ Acc As[BK][BM + 1];
  __shared__ Acc Bs[BK][BN + 1];
  if (total_dev) total_tiles = *total_dev;
  for (int64_t t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    int64_t lo = 0, hi = count - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (table[mid].tile_start <= t) lo = mid;
      else hi = mid - 1;
    }
    const GroupedEntry& e = table[lo];
    const int64_t local = t - e.tile_start;
    gemm_tile<T, BM, BN, BK, TM, TN>(As, Bs, e.M, e.N, e.K, reinterpret_cast<const T*>(e.a), e.ars, e.acs,
                                     static_cast<int>(e.a_kfast), reinterpret_cast<const T*>(e.b), e.brs, e.bcs,
                                     static_cast<int>(e.b_nfast), reinterpret_cast<T*>(e.c), e.crs,
                                     (local / e.ntiles_n) * BM, (local % e.ntiles_n) * BN, Acc(1), Acc(0), nullptr,
                                     nullptr, 0, 0);
  }
}

// Writes n <= kStoreWords 64-bit words, passed by value as the kernel's parameter, to dst: how a
// small host table reaches the device in stream order without a synchronising pageable copy.
constexpr int kStoreWords = 480;  // 3840 bytes: within the 4 KiB of kernel parameters
struct StoreWords {
  uint64_t w[kStoreWords];
};
__global__ void __launch_bounds__(128) store_words_kernel(StoreWords words, int n, uint64_t* dst) {
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) dst[i] = words.w[i];
}

}  // namespace

// (gemm.h)
void upload_words(cudaStream_t stream, const uint64_t* words, int64_t n, uint64_t* dst) {
  for (int64_t i = 0; i < n; i += kStoreWords) {
    const int chunk = static_cast<int>(mn(n - i, int64_t(kStoreWords)));
    StoreWords w;
    std::memcpy(w.w, words + i, static_cast<size_t>(chunk) * sizeof(uint64_t));
    MP_LAUNCH(store_words_kernel, dim3(1), dim3(128), 0, stream, w, chunk, dst + i);
    check_launch("store_words_kernel");
  }
}

namespace {

// bias_grad[r] = sum_k A[r, k] over the first M rows of A (its strides), in the accumulator type
// and rounded once. A block covers 32 rows: thread x one row, thread y every 8th k from y; the 8
// partial sums of a row meet in shared memory and are added in y order, so the result does not
// depend on the grid.
template <typename T>
__global__ void __launch_bounds__(256)
    row_sum_kernel(int64_t M, int64_t K, const T* A, int64_t rs, int64_t cs, T* out) {
  using Acc = typename Tr<T>::C;
  __shared__ Acc part[8][33];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * 32; r0 < M; r0 += static_cast<int64_t>(gridDim.x) * 32) {
    const int64_t r = r0 + tx;
    Acc s = Acc(0);
    if (r < M)
      for (int64_t k = ty; k < K; k += 8) s += Tr<T>::ld(A + r * rs + k * cs);
    part[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && r < M) {
      Acc t = part[0][tx];
      for (int y = 1; y < 8; y++) t += part[y][tx];
      Tr<T>::st(out + r, t);
    }
    __syncthreads();
  }
}

template <typename T>
void launch_row_sums(cudaStream_t stream, int64_t M, int64_t K, const GemmMat& a, char* out) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  constexpr int64_t kMaxBlocks = 2;  // few blocks: the grid-stride loop runs
#else
  constexpr int64_t kMaxBlocks = 65535;
#endif
  const int64_t blocks = mn((M + 31) / 32, kMaxBlocks);
  auto k = row_sum_kernel<T>;
  MP_LAUNCH(k, dim3(static_cast<unsigned>(blocks)), dim3(32, 8), 0, stream, M, K,
            reinterpret_cast<const T*>(a.data), a.rs, a.cs, reinterpret_cast<T*>(out));
  check_launch("row_sum_kernel");
}

// The bias gradient of an epilogue, when it has one: the row sums of A (batch 1).
void run_row_sums(cudaStream_t stream, DType dtype, int64_t M, int64_t K, const GemmMat& a, const GemmEpilogue* epi) {
  if (!epi || !epi->bias_grad || M == 0) return;
  MPC_DISPATCH_FLOAT(dtype, launch_row_sums, stream, M, K, a, epi->bias_grad);
}

int64_t iabs64(int64_t v) { return v < 0 ? -v : v; }

// The tiled kernels' tile: BM x BN outputs per block, BK-deep slices, TM x TN outputs per thread.
#ifdef MEGAPATCH_CUDA_EMULATOR
// small tiles and few threads: every thread is a fiber in the emulator
constexpr int BM = 16, BN = 16, BK = 16, TM = 2, TN = 2;
#else
constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;
#endif
constexpr int NT = (BM / TM) * (BN / TN);

// The fast dimension of each operand decides its tile-load order (see gemm_tile): A's k, B's n.
int a_kfast(const GemmMat& a) { return a.cs == 1 ? 1 : a.rs == 1 ? 0 : (iabs64(a.cs) <= iabs64(a.rs) ? 1 : 0); }
int b_nfast(const GemmMat& b) { return b.cs == 1 ? 1 : b.rs == 1 ? 0 : (iabs64(b.cs) <= iabs64(b.rs) ? 1 : 0); }

template <typename T, typename TC = T>
void launch_tiled(cudaStream_t stream, int64_t batch, int64_t M, int64_t N, int64_t K, const GemmMat& a,
                  const GemmMat& b, const GemmMat& c, double alpha, double beta, const GemmEpilogue* epi) {
  using Acc = typename Tr<T>::C;
  const int64_t ntiles = (N + BN - 1) / BN, mtiles = (M + BM - 1) / BM;
  if (ntiles > 0x7fffffff) throw_error("matmul: N = " + std::to_string(N) + " is too large for the GEMM kernel");
  dim3 grid(static_cast<unsigned>(ntiles), static_cast<unsigned>(mn(mtiles, int64_t(65535))),
            static_cast<unsigned>(mn(batch, int64_t(65535))));
  auto k = gemm_tiled_kernel<T, BM, BN, BK, TM, TN, TC>;
  MP_LAUNCH(k, grid, dim3(NT), 0, stream, batch, M, N, K, reinterpret_cast<const T*>(a.data), a.bs, a.rs, a.cs,
            a_kfast(a), reinterpret_cast<const T*>(b.data), b.bs, b.rs, b.cs, b_nfast(b), reinterpret_cast<TC*>(c.data),
            c.bs, c.rs, static_cast<Acc>(alpha), static_cast<Acc>(beta),
            epi ? reinterpret_cast<const T*>(epi->bias) : static_cast<const T*>(nullptr),
            epi ? reinterpret_cast<T*>(epi->aux) : static_cast<T*>(nullptr), epi ? epi->aux_rs : int64_t(0),
            epi ? static_cast<int>(epi->act) : 0);
  check_launch("gemm_tiled_kernel");
}

// The CPU backend's argument checks and the epilogue's; false when there is no product to compute
// (a bias gradient may still be due). With an epilogue, K == 0 is a product of zeros (the tiled
// kernel's loop over k runs no step) followed by the epilogue.
bool gemm_args_ok(DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, double alpha,
                  const GemmEpilogue* epi) {
  if (dtype != DType::F32 && dtype != DType::F64 && dtype != DType::BF16 && dtype != DType::F16)
    throw_error("matmul: integer and bool dtypes are not supported");
  const bool has_epi = epi && epi->any();
  if (has_epi && (epi->bias || epi->aux || epi->bias_grad) && epi->dtype != dtype)
    throw_error(std::string("linear: the ") + (epi->bias ? "bias" : epi->aux ? "pre-activation" : "bias gradient") +
                " is " + dtype_name(epi->dtype) + " but the GEMM is " + dtype_name(dtype) +
                "; cast it to the input's dtype");
  if (has_epi && (epi->aux || epi->bias_grad) && batch > 1)
    throw_error("gemm: an epilogue with a pre-activation or a bias gradient takes one matrix, got a batch of " +
                std::to_string(batch));
  if (has_epi && epi->bias_grad && (epi->bias || epi->aux || epi->act != GemmAct::None || alpha != 1.0))
    throw_error("gemm: a bias gradient epilogue takes no bias, pre-activation or activation, and alpha 1");
  if (M == 0 || N == 0 || batch == 0) return false;
  if (K == 0 && !has_epi) throw_error("gemm: K == 0 must be handled by the caller");
  if (M < 0 || N < 0 || K < 0 || batch < 0)
    throw_error("gemm: negative size (batch " + std::to_string(batch) + ", M " + std::to_string(M) + ", N " +
                std::to_string(N) + ", K " + std::to_string(K) + ")");
  return true;
}

// The tiled kernel with the epilogue at its store (not the bias gradient: run_row_sums).
void run_fallback(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K,
                  const GemmMat& a, const GemmMat& b, const GemmMat& c, double alpha, double beta,
                  const GemmEpilogue* epi) {
  switch (dtype) {
    case DType::F32: launch_tiled<float>(stream, batch, M, N, K, a, b, c, alpha, beta, epi); break;
    case DType::F64: launch_tiled<double>(stream, batch, M, N, K, a, b, c, alpha, beta, epi); break;
    case DType::BF16: launch_tiled<bf16>(stream, batch, M, N, K, a, b, c, alpha, beta, epi); break;
    case DType::F16: launch_tiled<f16>(stream, batch, M, N, K, a, b, c, alpha, beta, epi); break;
    default: throw_error("matmul: integer and bool dtypes are not supported");
  }
}

// The checks of gemm_accumulate_f32; false when there is nothing to add (an empty C or K == 0).
bool accumulate_args_ok(DType dtype, int64_t M, int64_t N, int64_t K) {
  if (dtype != DType::F32 && dtype != DType::BF16 && dtype != DType::F16)
    throw_error(std::string("linearWeightGradAccumulate: the gradient and input must be float32, bfloat16 or "
                            "float16, got ") +
                dtype_name(dtype));
  if (M < 0 || N < 0 || K < 0)
    throw_error("linearWeightGradAccumulate: negative size (M " + std::to_string(M) + ", N " + std::to_string(N) +
                ", K " + std::to_string(K) + ")");
  return M > 0 && N > 0 && K > 0;
}

// The tiled kernel with a float32 C read and written (alpha 1, beta 1).
void run_accumulate_tiled(cudaStream_t stream, DType dtype, int64_t M, int64_t N, int64_t K, const GemmMat& a,
                          const GemmMat& b, const GemmMat& c) {
  switch (dtype) {
    case DType::F32: launch_tiled<float, float>(stream, 1, M, N, K, a, b, c, 1.0, 1.0, nullptr); break;
    case DType::BF16: launch_tiled<bf16, float>(stream, 1, M, N, K, a, b, c, 1.0, 1.0, nullptr); break;
    default: launch_tiled<f16, float>(stream, 1, M, N, K, a, b, c, 1.0, 1.0, nullptr); break;
  }
}

// Whether cuBLASLt has one epilogue for `e`'s activation (lt_epilogue builds on it): none, ReLU
// without its input kept, the tanh GELU. The erf GELU has no epilogue, and RELU_AUX keeps a bit
// mask, not the pre-activation.
bool lt_has_activation(const GemmEpilogue* e) {
  if (!e) return true;
  switch (e->act) {
    case GemmAct::None: return true;
    case GemmAct::Relu: return e->aux == nullptr;
    case GemmAct::GeluTanh: return true;
    default: return false;
  }
}

// An activation cuBLASLt has no epilogue for, in two steps instead of the tiled kernel's fused
// store: `product(target, bias_epi)` enqueues the GEMM with only the bias in its epilogue, writing
// the pre-activation into aux (or straight into C when it is not kept), and the unary kernel then
// writes act(pre-activation) into C. The order of PyTorch's unfused linear + activation: the
// pre-activation is rounded once before the activation reads it. False (nothing enqueued) when the
// activation needs no split, or the GEMM is a batch, or a kept pre-activation would need C's
// old values (beta != 0), or `product` declines.
template <typename Product>
bool gemm_split_activation(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, const GemmMat& c,
                           double beta, const GemmEpilogue* epi, Product product) {
  if (lt_has_activation(epi) || batch != 1 || (epi->aux && beta != 0)) return false;
  GemmEpilogue bias_only;
  bias_only.bias = epi->bias;
  bias_only.dtype = epi->dtype;
  const GemmMat target = epi->aux ? GemmMat{epi->aux, 0, epi->aux_rs, 1} : GemmMat{c.data, 0, c.rs, 1};
  if (!product(target, &bias_only)) return false;
  auto matrix = [&](char* data, int64_t rs) {
    TensorArg t;
    t.data = data;
    t.dtype = dtype;
    t.ndim = 2;
    t.shape[0] = M;
    t.shape[1] = N;
    t.strides[0] = rs;
    t.strides[1] = 1;
    return t;
  };
  const int op = epi->act == GemmAct::Relu ? kRelu : epi->act == GemmAct::Gelu ? kGelu : kGeluTanh;
  unary(stream, matrix(c.data, c.rs), matrix(target.data, target.rs), op, 0, 0);
  return true;
}

// The products of `ps` (validated, sizes positive) on the grouped tiled kernel: the problem table
// uploaded into scratch (store_words_kernel), then one launch for every tile of every problem.
template <typename T>
void launch_grouped_tiled(cudaStream_t stream, const std::vector<GemmProblem>& ps) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  constexpr int64_t kMaxBlocks = 3;  // few blocks: the grid-stride loop runs
#else
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
#endif
  std::vector<GroupedEntry> table;
  table.reserve(ps.size());
  int64_t total = 0;
  for (const GemmProblem& p : ps) {
    const int64_t ntn = (p.N + BN - 1) / BN, ntm = (p.M + BM - 1) / BM;
    table.push_back(GroupedEntry{p.a.data, p.b.data, p.c.data, p.M, p.N, p.K, p.a.rs, p.a.cs, p.b.rs, p.b.cs,
                                 p.c.rs, a_kfast(p.a), b_nfast(p.b), total, ntn});
    total += ntm * ntn;
  }
  const int64_t words = static_cast<int64_t>(table.size() * sizeof(GroupedEntry) / sizeof(uint64_t));
  Scratch scratch(table.size() * sizeof(GroupedEntry), stream);
  upload_words(stream, reinterpret_cast<const uint64_t*>(table.data()), words, scratch.at<uint64_t>());
  auto k = gemm_grouped_tiled_kernel<T, BM, BN, BK, TM, TN>;
  MP_LAUNCH(k, dim3(static_cast<unsigned>(mn(total, kMaxBlocks))), dim3(NT), 0, stream,
            scratch.at<const GroupedEntry>(), static_cast<int64_t>(table.size()), total,
            static_cast<const int64_t*>(nullptr));
  check_launch("gemm_grouped_tiled_kernel");
}

void run_grouped_tiled(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps) {
  MPC_DISPATCH_FLOAT(dtype, launch_grouped_tiled, stream, ps);
}

// The grouped tiled kernel over device group sizes: the table with the split dimension 0, planned
// on the device, then a grid for the most tiles there can be.
template <typename T>
void launch_grouped_tiled_sized(cudaStream_t stream, const std::vector<GemmProblem>& ps, const SizedGroups& g) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  constexpr int64_t kMaxBlocks = 3;
#else
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
#endif
  std::vector<GroupedEntry> table;
  table.reserve(ps.size());
  for (const GemmProblem& p : ps) {
    const int64_t ntn = (p.N + BN - 1) / BN;
    table.push_back(GroupedEntry{p.a.data, p.b.data, p.c.data, g.split == 0 ? 0 : p.M, p.N, g.split == 0 ? p.K : 0,
                                 p.a.rs, p.a.cs, p.b.rs, p.b.cs, p.c.rs, a_kfast(p.a), b_nfast(p.b), 0, ntn});
  }
  const GemmProblem& p0 = ps.front();
  const int64_t most = sized_max_tiles(g.split, g.total, static_cast<int64_t>(ps.size()), p0.M, (p0.N + BN - 1) / BN, BM);
  if (most == 0) return;
  const size_t bytes = table.size() * sizeof(GroupedEntry);
  Scratch scratch(bytes + sizeof(int64_t), stream);
  upload_words(stream, reinterpret_cast<const uint64_t*>(table.data()), static_cast<int64_t>(bytes / sizeof(uint64_t)),
               scratch.at<uint64_t>());
  MP_LAUNCH((plan_sized_kernel<GroupedEntry, BM>), dim3(1), dim3(1), 0, stream, scratch.at<GroupedEntry>(),
            static_cast<int64_t>(table.size()), sized_plan(p0, g, sizeof(T)), scratch.at<int64_t>(bytes));
  check_launch("plan_sized_kernel");
  auto k = gemm_grouped_tiled_kernel<T, BM, BN, BK, TM, TN>;
  MP_LAUNCH(k, dim3(static_cast<unsigned>(mn(most, kMaxBlocks))), dim3(NT), 0, stream,
            scratch.at<const GroupedEntry>(), static_cast<int64_t>(table.size()), most,
            scratch.at<const int64_t>(bytes));
  check_launch("gemm_grouped_tiled_kernel");
}

// The problems with work to do, after the gemm's checks on each (a product with M or N of 0 has
// nothing to write; K == 0 is the caller's, as for gemm).
std::vector<GemmProblem> grouped_work(DType dtype, const std::vector<GemmProblem>& ps) {
  std::vector<GemmProblem> work;
  for (const GemmProblem& p : ps)
    if (gemm_args_ok(dtype, 1, p.M, p.N, p.K, 1.0, nullptr)) work.push_back(p);
  return work;
}

// MEGAPATCH_GROUPED_GEMM: how grouped_gemm runs its products: "loop" one gemm per problem,
// "tiled" the grouped tiled kernel (the emulator's path, on a GPU too), "grouped" the engine's
// grouped GEMM (cuBLAS's on a GPU, the tiled kernel in the emulator). Unset: the emulator runs its
// grouped tiled kernel; a GPU runs the loop of cuBLASLt GEMMs, which measured faster than cuBLAS's
// grouped GEMM on an H200 for 2 of 3 MoE shapes (Mixtral-like E8: 696 vs 280 TFLOP/s;
// Moonlight-like E64 fc1: 317 vs 273; fc2: 181 vs 259).
// "streams" the loop spread over a few streams (below); "mma" the tensor-core grouped kernel of
// gemm_grouped_mma.cu (bf16 / f16 on sm_80+; the problems it cannot take, fp32 included, by the
// loop), "wgmma" its wgmma form (sm_90a; elsewhere as "mma").
enum class GroupedMode { Grouped, Loop, Tiled, Streams, Mma, Wgmma };
GroupedMode grouped_mode() {
  static const GroupedMode mode = [] {
    const char* v = std::getenv("MEGAPATCH_GROUPED_GEMM");
    const std::string s = v ? v : "";
    if (s == "loop") return GroupedMode::Loop;
    if (s == "tiled") return GroupedMode::Tiled;
    if (s == "streams") return GroupedMode::Streams;
    if (s == "grouped") return GroupedMode::Grouped;
    if (s == "mma") return GroupedMode::Mma;
    if (s == "wgmma") return GroupedMode::Wgmma;
    if (!s.empty())
      throw_error("groupedGemm: MEGAPATCH_GROUPED_GEMM must be loop, streams, grouped, tiled, mma or wgmma, got '" + s +
                  "'");
#ifdef MEGAPATCH_CUDA_EMULATOR
    return GroupedMode::Grouped;
#else
    return GroupedMode::Loop;
#endif
  }();
  return mode;
}

// ---- MEGAPATCH_GROUPED_GEMM=streams: the loop's products on several streams at once -------------
// A 64-expert MoE's products are small (384 rows each at the bench's Moonlight-like shape: a few
// dozen output tiles, against 132 SMs), so one GEMM at a time leaves most of the GPU idle. Here they
// are spread over lanes: the caller's stream and up to kMaxGroupedLanes - 1 side streams of the
// device, forked from the caller's stream by an event and joined back by events before the call
// returns (no host wait; the caller's later work, frees of the operands included, is ordered after
// every product). Products go largest first to the lane with the fewest FLOPs so far. Each side
// lane has its own cuBLASLt workspace (gemm_lane's slot), as cuBLASLt requires of concurrent calls.
// MEGAPATCH_GROUPED_STREAMS: the number of lanes (4; 2 to 8).
// one gemm per problem, in order, on the caller's stream
void grouped_loop(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& work) {
  for (const GemmProblem& p : work) gemm(stream, dtype, 1, p.M, p.N, p.K, p.a, p.b, p.c, 1.0, 0.0);
}
constexpr int kMaxGroupedLanes = 8;
// Per build (below): whether side lanes 0..n-1 have what gemm_lane needs (false: the plain loop
// runs instead); one product on lane `slot` (-1: the caller's stream, else a side lane) with
// stream `s`.
bool gemm_lanes_ready(int n);
void gemm_lane(cudaStream_t s, int slot, DType dtype, const GemmProblem& p);
int grouped_lanes() {
  static const int n = [] {
    const char* v = std::getenv("MEGAPATCH_GROUPED_STREAMS");
    if (!v || !*v) return 4;
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    if (*end != '\0' || x < 2 || x > kMaxGroupedLanes)
      throw_error(std::string("groupedGemm: MEGAPATCH_GROUPED_STREAMS must be an integer from 2 to ") +
                  std::to_string(kMaxGroupedLanes) + ", got '" + v + "'");
    return static_cast<int>(x);
  }();
  return n;
}
struct GroupedStreams {
  cudaStream_t side[kMaxGroupedLanes - 1] = {};
  cudaEvent_t fork = nullptr;
  cudaEvent_t join[kMaxGroupedLanes - 1] = {};
};
// the current device's side streams and events, made on first use and kept
GroupedStreams& grouped_streams_of_device() {
  return per_current_device<GroupedStreams>("groupedGemm", [](GroupedStreams& g) {
    for (int i = 0; i < kMaxGroupedLanes - 1; i++) {
      check(cudaStreamCreateWithFlags(&g.side[i], cudaStreamNonBlocking), "groupedGemm: side stream");
      check(cudaEventCreateWithFlags(&g.join[i], cudaEventDisableTiming), "groupedGemm: event");
    }
    check(cudaEventCreateWithFlags(&g.fork, cudaEventDisableTiming), "groupedGemm: event");
  });
}

void grouped_streams(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& work) {
  const int lanes = static_cast<int>(std::min<size_t>(static_cast<size_t>(grouped_lanes()), work.size()));
  if (lanes < 2 || !gemm_lanes_ready(lanes - 1)) return grouped_loop(stream, dtype, work);
  // largest first, each to the least loaded lane (lane 0: the caller's stream)
  std::vector<size_t> order(work.size());
  for (size_t i = 0; i < order.size(); i++) order[i] = i;
  auto flops = [&](size_t i) { return static_cast<double>(work[i].M) * work[i].N * work[i].K; };
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return flops(x) > flops(y); });
  std::vector<int> lane_of(work.size());
  std::vector<double> load(static_cast<size_t>(lanes), 0.0);
  for (size_t i : order) {
    const int l = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    lane_of[i] = l;
    load[static_cast<size_t>(l)] += flops(i);
  }
  GroupedStreams& g = grouped_streams_of_device();
  check(cudaEventRecord(g.fork, stream), "groupedGemm: fork");
  for (int l = 1; l < lanes; l++) check(cudaStreamWaitEvent(g.side[l - 1], g.fork, 0), "groupedGemm: fork");
  // the join runs whatever happens between (a failed enqueue leaves no side lane unjoined)
  auto join = [&](bool checked) {
    for (int l = 1; l < lanes; l++) {
      const cudaError_t r = cudaEventRecord(g.join[l - 1], g.side[l - 1]);
      const cudaError_t w = r == cudaSuccess ? cudaStreamWaitEvent(stream, g.join[l - 1], 0) : r;
      if (checked) check(w, "groupedGemm: join");
    }
  };
  try {
    for (size_t i : order) {
      const int l = lane_of[i];
      gemm_lane(l == 0 ? stream : g.side[l - 1], l - 1, dtype, work[i]);
    }
  } catch (...) {
    join(false);
    throw;
  }
  join(true);
}

// The modes that take device group sizes: the grouped tiled kernel (=tiled; in the emulator its
// default too) and the tensor-core kernels (=mma, =wgmma) where they take every problem.
bool sized_by_mode(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps, const SizedGroups& g) {
  const GroupedMode mode = grouped_mode();
#ifdef MEGAPATCH_CUDA_EMULATOR
  const bool tiled = mode == GroupedMode::Tiled || mode == GroupedMode::Grouped;
#else
  const bool tiled = mode == GroupedMode::Tiled;
#endif
  if (tiled) {
    MPC_DISPATCH_FLOAT(dtype, launch_grouped_tiled_sized, stream, ps, g);
    return true;
  }
  if (mode == GroupedMode::Mma || mode == GroupedMode::Wgmma)
    return grouped_mma_sized(stream, dtype, ps, g, mode == GroupedMode::Wgmma);
  return false;
}

// The modes every build shares; false for the engine's own grouped GEMM.
bool grouped_by_mode(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& work) {
  switch (grouped_mode()) {
    case GroupedMode::Loop: grouped_loop(stream, dtype, work); return true;
    case GroupedMode::Tiled: run_grouped_tiled(stream, dtype, work); return true;
    case GroupedMode::Streams: grouped_streams(stream, dtype, work); return true;
    case GroupedMode::Mma:
    case GroupedMode::Wgmma: {
      const std::vector<GemmProblem> rest = grouped_mma(stream, dtype, work, grouped_mode() == GroupedMode::Wgmma);
      if (!rest.empty()) grouped_loop(stream, dtype, rest);
      return true;
    }
    default: return false;
  }
}

}  // namespace

bool grouped_gemm_sized(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps, const SizedGroups& g) {
  if (ps.empty()) return true;
  if (g.split != 0 && g.split != 1) throw_error("groupedGemmSized: the split must be 0 (rows) or 1 (k)");
  if (g.total < 0) throw_error("groupedGemmSized: negative row count " + std::to_string(g.total));
  // the fixed dimensions as gemm checks them (the split one stands in as 1)
  const GemmProblem& p0 = ps.front();
  for (const GemmProblem& p : ps) {
    if (p.N != p0.N || p.M != p0.M || p.K != p0.K)
      throw_error("groupedGemmSized: every problem needs the same fixed dimensions");
    if (!gemm_args_ok(dtype, 1, g.split == 0 ? 1 : p.M, p.N, g.split == 0 ? p.K : 1, 1.0, nullptr)) return true;
  }
  return sized_by_mode(stream, dtype, ps, g);
}

void gemm_fallback(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K,
                   const GemmMat& a, const GemmMat& b, const GemmMat& c, double alpha, double beta,
                   const GemmEpilogue* epi) {
  if (gemm_args_ok(dtype, batch, M, N, K, alpha, epi))
    run_fallback(stream, dtype, batch, M, N, K, a, b, c, alpha, beta, epi);
  run_row_sums(stream, dtype, M, K, a, epi);
}

// ---- the cuBLASLt problem of a GEMM (pure host logic, compiled in both builds so that the
// emulator tests can check the layout mapping) ---------------------------------------------------
namespace gemm_map {

// Column-major description of X^T, where X is a rows x cols view with element (i, j) at
// i*rs + j*cs: with cuBLASLt's op applied, the stored matrix L gives op(L) = X^T (cols x rows).
//  - X row-major (cs == 1): X^T is column-major already: L = cols x rows, ld = rs, op N.
//  - X column-major (rs == 1): L = X (rows x cols, ld = cs), op T.
// A dimension of size 1 takes any stride. False when neither applies or ld is too small (ld must
// be at least L's rows, so that columns of L do not overlap; a negative or zero ld never passes).
struct LtOperand {
  bool trans;
  uint64_t rows, cols;
  int64_t ld;
};
bool lt_operand(int64_t rows, int64_t cols, int64_t rs, int64_t cs, LtOperand& o) {
  if (cs == 1 || cols == 1) {
    o.trans = false;
    o.rows = static_cast<uint64_t>(cols);
    o.cols = static_cast<uint64_t>(rows);
    o.ld = rows == 1 ? cols : rs;
    if (o.ld >= cols) return true;
  }
  if (rs == 1 || rows == 1) {
    o.trans = true;
    o.rows = static_cast<uint64_t>(rows);
    o.cols = static_cast<uint64_t>(cols);
    o.ld = cols == 1 ? rows : cs;
    if (o.ld >= rows) return true;
  }
  return false;
}

struct LtProblem {
  LtOperand a, b;  // cuBLASLt's A (our B) and B (our A)
  uint64_t m, n, k;
  int64_t ldc;
  int64_t bs_a, bs_b, bs_c;  // elements
};

// C^T (N x M) = B^T (N x K) A^T (K x M), column-major: cuBLASLt's m = N, n = M, k = K, its A is
// our B (op(A) = B^T) and its B our A (op(B) = A^T); D = C with ldc = C's row stride. Batch
// strides are those of cuBLASLt's A, B, C (0 for batch 1). False when a layout does not fit.
bool lt_problem(int64_t batch, int64_t M, int64_t N, int64_t K, const GemmMat& a, const GemmMat& b, const GemmMat& c,
                LtProblem& p) {
  constexpr int64_t kInt32Max = 0x7fffffff;
  if (M < 1 || N < 1 || K < 1 || batch < 1) return false;
  if (M > kInt32Max || N > kInt32Max || K > kInt32Max) return false;
  if (!lt_operand(K, N, b.rs, b.cs, p.a)) return false;
  if (!lt_operand(M, K, a.rs, a.cs, p.b)) return false;
  p.m = static_cast<uint64_t>(N);
  p.n = static_cast<uint64_t>(M);
  p.k = static_cast<uint64_t>(K);
  p.ldc = M == 1 ? N : c.rs;
  if (p.ldc < N) return false;
  p.bs_a = batch == 1 ? 0 : b.bs;
  p.bs_b = batch == 1 ? 0 : a.bs;
  p.bs_c = batch == 1 ? 0 : c.bs;
  if (p.bs_a < 0 || p.bs_b < 0) return false;  // 0 (broadcast) is fine
  if (batch > 1 && p.bs_c < p.ldc * (M - 1) + N) return false;  // the batch's outputs must not overlap
  return true;
}

}  // namespace gemm_map

}  // namespace mpc

namespace mpc {

// gemm_residual's checks; false: nothing to compute (M or N of 0)
bool residual_args_ok(DType dtype, int64_t M, int64_t N, int64_t K) {
  if (dtype != DType::F32 && dtype != DType::F64 && dtype != DType::BF16 && dtype != DType::F16)
    throw_error(std::string("linearResidual: expected a float dtype, got ") + dtype_name(dtype));
  if (M < 0 || N < 0 || K < 0)
    throw_error("linearResidual: negative size (M " + std::to_string(M) + ", N " + std::to_string(N) + ", K " +
                std::to_string(K) + ")");
  return M > 0 && N > 0;
}

// out = R (rows of N elements), then out += A @ B through gemm with beta 1 (K of 0: the copy alone)
void residual_by_copy(cudaStream_t stream, DType dtype, int64_t M, int64_t N, int64_t K, const GemmMat& a,
                      const GemmMat& b, const GemmMat& c, const GemmMat& r) {
  const size_t isz = static_cast<size_t>(itemsize(dtype));
  if (r.data != c.data || r.rs != c.rs)
    check(cudaMemcpy2DAsync(c.data, static_cast<size_t>(c.rs) * isz, r.data, static_cast<size_t>(r.rs) * isz,
                            static_cast<size_t>(N) * isz, static_cast<size_t>(M), cudaMemcpyDeviceToDevice, stream),
          "linearResidual: copying the residual");
  if (K > 0) gemm(stream, dtype, 1, M, N, K, a, b, c, 1.0, 1.0);
}

}  // namespace mpc

#ifdef MEGAPATCH_CUDA_EMULATOR

namespace mpc {

// The tiled kernel, with the GPU's choices: an activation cuBLASLt has no epilogue for is split
// the way the GPU splits it (the tiled kernel standing in for cuBLASLt), so the emulator runs
// the GPU's path; gemm_fallback keeps the fused store.
void gemm(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, const GemmMat& a,
          const GemmMat& b, const GemmMat& c, double alpha, double beta, const GemmEpilogue* epi) {
  const bool work = gemm_args_ok(dtype, batch, M, N, K, alpha, epi);
  auto tiled = [&](const GemmMat& target, const GemmEpilogue* e) {
    run_fallback(stream, dtype, 1, M, N, K, a, b, target, alpha, beta, e);
    return true;
  };
  if (work && gemm_split_activation(stream, dtype, batch, M, N, c, beta, epi, tiled)) return;
  gemm_fallback(stream, dtype, batch, M, N, K, a, b, c, alpha, beta, epi);
}

namespace {
bool gemm_lanes_ready(int) { return true; }
void gemm_lane(cudaStream_t s, int, DType dtype, const GemmProblem& p) {
  gemm(s, dtype, 1, p.M, p.N, p.K, p.a, p.b, p.c, 1.0, 0.0);
}
}  // namespace

// The grouped tiled kernel: one launch for all products (plus the table's upload).
void grouped_gemm(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps) {
  const std::vector<GemmProblem> work = grouped_work(dtype, ps);
  if (work.empty() || grouped_by_mode(stream, dtype, work)) return;
  run_grouped_tiled(stream, dtype, work);
}

void gemm_accumulate_f32(cudaStream_t stream, DType dtype, int64_t M, int64_t N, int64_t K, const GemmMat& a,
                         const GemmMat& b, const GemmMat& c) {
  if (accumulate_args_ok(dtype, M, N, K)) run_accumulate_tiled(stream, dtype, M, N, K, a, b, c);
}

void gemm_residual(cudaStream_t stream, DType dtype, int64_t M, int64_t N, int64_t K, const GemmMat& a,
                   const GemmMat& b, const GemmMat& c, const GemmMat& r) {
  if (residual_args_ok(dtype, M, N, K)) residual_by_copy(stream, dtype, M, N, K, a, b, c, r);
}

const char* gemm_engine() { return "emulated fallback"; }

}  // namespace mpc

#else  // the cuBLASLt path

#include <cublasLt.h>
#include <cublas_v2.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace mpc {

int current_device();  // backend/glue: the device entries run on

namespace {

void lt_check(cublasStatus_t st, const char* call) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw_error(std::string("matmul: ") + call + " failed: " + cublasLtGetStatusName(st) + " (" +
                cublasLtGetStatusString(st) + ")");
}

constexpr size_t kWorkspaceBytes = size_t(32) << 20;
constexpr size_t kMaxPlans = 512;
constexpr int64_t kMaxLtBatch = 65535;  // larger batches run as several calls

// What cuBLASLt needs to describe one GEMM; everything that shapes the plan is in the key.
struct PlanKey {
  int64_t v[25];
  bool operator==(const PlanKey& o) const { return std::memcmp(v, o.v, sizeof v) == 0; }
};
struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    uint64_t h = 0x9e3779b97f4a7c15ull;
    for (int64_t x : k.v) {
      h ^= static_cast<uint64_t>(x) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
      h *= 0xff51afd7ed558ccdull;
    }
    return static_cast<size_t>(h ^ (h >> 33));
  }
};

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;  // cuBLASLt's A (our B), B (our A), C = D
  cublasLtMatmulAlgo_t algo;
  bool ok = false;  // false: no algorithm for this problem, the tiled kernel runs it
  // MEGAPATCH_GEMM_AUTOTUNE=1: the heuristic's other algorithms, timed against `algo` at the
  // plan's first call (then cleared)
  std::vector<cublasLtMatmulAlgo_t> candidates;

  void destroy() {
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
    op = nullptr;
    la = lb = lc = nullptr;
  }
};

// Per-device cuBLASLt state, made on first use and kept for the life of the process (never
// destroyed: at exit the CUDA context may be gone before static destructors run).
struct LtDevice {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  std::unordered_map<PlanKey, Plan, PlanKeyHash> plans;
  // the side lanes' workspaces of MEGAPATCH_GROUPED_GEMM=streams (workspace_bytes each), made on
  // first use
  void* lane_workspace[kMaxGroupedLanes - 1] = {};
  cublasHandle_t blas = nullptr;  // cuBLAS (its grouped GEMM), made on first use
  bool grouped_declined[4] = {false, false, false, false};  // per DType code: cuBLAS said NOT_SUPPORTED
};

std::mutex g_lt_mutex;  // guards the device table and the plan caches
std::vector<LtDevice*>& lt_devices() {
  static auto* v = new std::vector<LtDevice*>();
  return *v;
}

LtDevice& lt_device(int dev) {
  auto& devs = lt_devices();
  if (dev < 0) throw_error("matmul: invalid current device " + std::to_string(dev));
  if (static_cast<size_t>(dev) >= devs.size()) devs.resize(static_cast<size_t>(dev) + 1, nullptr);
  if (!devs[dev]) {
    auto* d = new LtDevice();
    cublasStatus_t st = cublasLtCreate(&d->handle);
    if (st != CUBLAS_STATUS_SUCCESS) {
      delete d;
      lt_check(st, "cublasLtCreate");
    }
    // without its workspace (device memory exhausted) cuBLASLt still runs, with fewer algorithms
    if (cudaMalloc(&d->workspace, kWorkspaceBytes) == cudaSuccess) {
      d->workspace_bytes = kWorkspaceBytes;
    } else {
      d->workspace = nullptr;
      (void)cudaGetLastError();  // not a launch error: clear it
    }
    devs[dev] = d;
  }
  return *devs[dev];
}

// The largest power of two (at most 256, cuBLASLt's default requirement) dividing the address
// of every batch's matrix.
uint32_t lt_alignment(const void* p, int64_t bs_bytes, int64_t batch) {
  uint64_t v = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)) | 256u;
  if (batch > 1) v |= static_cast<uint64_t>(bs_bytes);
  return static_cast<uint32_t>(v & (~v + 1));
}

// MEGAPATCH_GEMM_AUTOTUNE=1: each new GEMM plan (one per shape, layout and epilogue) asks cuBLASLt's
// heuristic for its kAutotuneCandidates best algorithms and times them on the call's operands (a
// scratch output, three runs each after one warm-up, the stream synchronised once) instead of
// taking the first; for measuring on a GPU whether the heuristic's choice leaves speed behind.
constexpr int kAutotuneCandidates = 8;
bool gemm_autotune() {
  const char* e = std::getenv("MEGAPATCH_GEMM_AUTOTUNE");
  return e && std::strcmp(e, "1") == 0;
}

bool allow_tf32() {
  const char* e = std::getenv("MEGAPATCH_ALLOW_TF32");
  return e && std::strcmp(e, "1") == 0;
}

struct LtTypes {
  cudaDataType_t data, scale;
  cublasComputeType_t compute;
};
LtTypes lt_types(DType dtype, bool tf32) {
  switch (dtype) {
    case DType::F32: return {CUDA_R_32F, CUDA_R_32F, tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F};
    case DType::F64: return {CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F};
    case DType::BF16: return {CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F};
    default: return {CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F};
  }
}

cublasLtMatrixLayout_t lt_layout(cudaDataType_t type, uint64_t rows, uint64_t cols, int64_t ld, int64_t batch,
                                 int64_t bs) {
  cublasLtMatrixLayout_t l = nullptr;
  lt_check(cublasLtMatrixLayoutCreate(&l, type, rows, cols, ld), "cublasLtMatrixLayoutCreate");
  if (batch > 1) {
    int32_t count = static_cast<int32_t>(batch);
    cublasStatus_t st =
        cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count));
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &bs, sizeof(bs));
    if (st != CUBLAS_STATUS_SUCCESS) {
      cublasLtMatrixLayoutDestroy(l);
      lt_check(st, "cublasLtMatrixLayoutSetAttribute");
    }
  }
  return l;
}

// The cuBLASLt side of a GemmEpilogue. D is our C^T (N x M, column-major), so:
//  - our per-column bias [N] is a per-row bias of D, what the *_BIAS epilogues add (a vector of
//    D's row count, batch stride 0: one bias for all);
//  - the pre-activation aux [M, N] with row stride aux_rs is a column-major N x M matrix with
//    leading dimension aux_rs, what GELU_AUX* writes (the GELU input in D's type; its ld must be
//    a multiple of 8 and at least D's rows);
//  - the row sums of our A are the column sums of op(cuBLASLt's B) = A^T over the GEMM's k, a
//    vector of D's column count: CUBLASLT_EPILOGUE_BGRADB (BGRADA would sum our B).
// cuBLASLt's GELU is the tanh approximation (PyTorch's _addmm_activation uses it for
// gelu(approximate='tanh') and applies gelu(..., 'tanh') itself where the epilogue is unavailable),
// so it serves GemmAct::GeluTanh; the erf GELU has no epilogue. RELU_AUX writes a bit mask, not
// the pre-activation, so ReLU with an aux has none either.
struct LtEpilogue {
  cublasLtEpilogue_t code = CUBLASLT_EPILOGUE_DEFAULT;
  const void* vec = nullptr;  // the bias (BIAS_POINTER) or the bias gradient (BGRADB's output)
  void* aux = nullptr;
  int64_t aux_ld = 0;
};

// The epilogue of `e` (null: none) in cuBLASLt's terms; false when cuBLASLt has none for it.
bool lt_epilogue(const GemmEpilogue* e, LtEpilogue& out) {
  out = LtEpilogue();
  if (!e || !e->any()) return true;
  if (e->bias_grad) {
    out.code = CUBLASLT_EPILOGUE_BGRADB;
    out.vec = e->bias_grad;
    return true;
  }
  if (!lt_has_activation(e)) return false;  // the erf GELU, ReLU keeping its input
  const bool bias = e->bias != nullptr, aux = e->aux != nullptr;
  out.vec = e->bias;
  out.aux = e->aux;
  out.aux_ld = e->aux_rs;
  switch (e->act) {
    case GemmAct::Relu: out.code = bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU; return true;
    case GemmAct::GeluTanh:
      out.code = aux ? (bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX)
                     : (bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU);
      return true;
    default:  // None: a bias alone; a kept pre-activation without an activation has no epilogue
      if (aux) return false;
      out.code = CUBLASLT_EPILOGUE_BIAS;
      return true;
  }
}

// Builds the plan of one problem: descriptors and the heuristic's best algorithm (ok = false,
// descriptors destroyed, when cuBLASLt has none). Throws on any other cuBLASLt error, except with
// an epilogue: one that cuBLASLt or its heuristic rejects in any way leaves the problem to the
// tiled kernel. The epilogue's pointers are the current call's; the heuristic reads their
// alignment from the addresses, and gemm_lt sets the addresses of each later call on the cached
// descriptor.
Plan make_plan(LtDevice& d, const LtTypes& ty, bool is16, const gemm_map::LtOperand& la, const gemm_map::LtOperand& lb, uint64_t m,
               uint64_t n, int64_t ldc, int64_t batch, int64_t bs_a, int64_t bs_b, int64_t bs_c,
               const uint32_t align[3], const LtEpilogue& e, cudaDataType_t ctype) {
  Plan p;
  cublasLtMatmulPreference_t pref = nullptr;
  try {
    lt_check(cublasLtMatmulDescCreate(&p.op, ty.compute, ty.scale), "cublasLtMatmulDescCreate");
    cublasOperation_t ta = la.trans ? CUBLAS_OP_T : CUBLAS_OP_N, tb = lb.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
    lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)),
             "cublasLtMatmulDescSetAttribute(TRANSA)");
    lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)),
             "cublasLtMatmulDescSetAttribute(TRANSB)");
    const bool has_epi = e.code != CUBLASLT_EPILOGUE_DEFAULT;
    if (has_epi) {
      bool set = cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &e.code, sizeof(e.code)) ==
                 CUBLAS_STATUS_SUCCESS;
      if (set && e.vec && e.code != CUBLASLT_EPILOGUE_BGRADB) {
        // a bias of D's type (a bias gradient's type is D's by default)
        int32_t bias_type = static_cast<int32_t>(ty.data);
        set = cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                             sizeof(bias_type)) == CUBLAS_STATUS_SUCCESS;
      }
      if (set && e.vec)
        set = cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &e.vec, sizeof(e.vec)) ==
              CUBLAS_STATUS_SUCCESS;
      if (set && e.aux) {
        // the GELU input in D's type (EPILOGUE_AUX_DATA_TYPE left at its default)
        set = cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &e.aux,
                                             sizeof(e.aux)) == CUBLAS_STATUS_SUCCESS &&
              cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &e.aux_ld,
                                             sizeof(e.aux_ld)) == CUBLAS_STATUS_SUCCESS;
      }
      if (!set) {
        p.destroy();
        p.ok = false;
        return p;
      }
    }
    p.la = lt_layout(ty.data, la.rows, la.cols, la.ld, batch, bs_a);
    p.lb = lt_layout(ty.data, lb.rows, lb.cols, lb.ld, batch, bs_b);
    p.lc = lt_layout(ctype, m, n, ldc, batch, bs_c);

    lt_check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    uint64_t ws = d.workspace_bytes;
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
             "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align[0],
                                                  sizeof(uint32_t)),
             "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_A_BYTES)");
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align[1],
                                                  sizeof(uint32_t)),
             "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_B_BYTES)");
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align[2],
                                                  sizeof(uint32_t)),
             "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_C_BYTES)");
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align[2],
                                                  sizeof(uint32_t)),
             "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_D_BYTES)");
    {
      // split-K partial sums: never reduced in place in D (its order is not fixed run to run); for
      // 16-bit outputs they stay in float32 (as the CPU's float32 panels), never in the output type
      uint32_t mask = is16 ? uint32_t(CUBLASLT_REDUCTION_SCHEME_NONE) | uint32_t(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE)
                           : uint32_t(CUBLASLT_REDUCTION_SCHEME_MASK) & ~uint32_t(CUBLASLT_REDUCTION_SCHEME_INPLACE);
      lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask,
                                                    sizeof(mask)),
               "cublasLtMatmulPreferenceSetAttribute(REDUCTION_SCHEME_MASK)");
    }

    // the heuristic's best; with MEGAPATCH_GEMM_AUTOTUNE=1 its next ones too, timed at the first call
    const int want = gemm_autotune() ? kAutotuneCandidates : 1;
    std::vector<cublasLtMatmulHeuristicResult_t> all(static_cast<size_t>(want));
    std::memset(all.data(), 0, all.size() * sizeof(cublasLtMatmulHeuristicResult_t));
    int found = 0;
    cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(d.handle, p.op, p.la, p.lb, p.lc, p.lc, pref, want, all.data(), &found);
    cublasLtMatmulPreferenceDestroy(pref);
    pref = nullptr;
    const cublasLtMatmulHeuristicResult_t& res = all[0];
    const bool rejected = has_epi && (st != CUBLAS_STATUS_SUCCESS || res.state != CUBLAS_STATUS_SUCCESS);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || rejected || (st == CUBLAS_STATUS_SUCCESS && found == 0)) {
      p.destroy();
      p.ok = false;
      return p;
    }
    lt_check(st, "cublasLtMatmulAlgoGetHeuristic");
    lt_check(res.state, "cublasLtMatmulAlgoGetHeuristic (result state)");
    p.algo = res.algo;
    for (int i = 1; i < found; i++)
      if (all[i].state == CUBLAS_STATUS_SUCCESS) p.candidates.push_back(all[i].algo);
    p.ok = true;
    return p;
  } catch (...) {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    p.destroy();
    throw;
  }
}

// Times p.algo and p.candidates on this call's operands and keeps the fastest in p.algo: each
// writes a scratch D of `dbytes` (beta 0, so C is neither read nor written; an epilogue's bias
// gradient or pre-activation is written, then rewritten by the call that follows). Candidates
// that cuBLASLt refuses are skipped. Synchronises the stream once per candidate.
void autotune_plan(LtDevice& d, Plan& p, const void* A, const void* B, size_t dbytes, bool f64, double alpha,
                   cudaStream_t stream) {
  std::vector<cublasLtMatmulAlgo_t> algos{p.algo};
  algos.insert(algos.end(), p.candidates.begin(), p.candidates.end());
  p.candidates.clear();
  Scratch out(dbytes, stream);
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  check(cudaEventCreate(&e0), "gemm autotune: event");
  check(cudaEventCreate(&e1), "gemm autotune: event");
  const float al32 = static_cast<float>(alpha), be32 = 0.0f;
  const double al64 = alpha, be64 = 0.0;
  const void* al = f64 ? static_cast<const void*>(&al64) : static_cast<const void*>(&al32);
  const void* be = f64 ? static_cast<const void*>(&be64) : static_cast<const void*>(&be32);
  float best = 0.0f;
  size_t pick = 0;
  bool any = false;
  for (size_t i = 0; i < algos.size(); i++) {
    auto run = [&]() {
      return cublasLtMatmul(d.handle, p.op, al, A, p.la, B, p.lb, be, out.at<char>(), p.lc, out.at<char>(), p.lc,
                            &algos[i], d.workspace, d.workspace_bytes, stream);
    };
    if (run() != CUBLAS_STATUS_SUCCESS) continue;  // warm-up; a refused algorithm is skipped
    bool ok = cudaEventRecord(e0, stream) == cudaSuccess;
    for (int r = 0; r < 3 && ok; r++) ok = run() == CUBLAS_STATUS_SUCCESS;
    ok = ok && cudaEventRecord(e1, stream) == cudaSuccess && cudaEventSynchronize(e1) == cudaSuccess;
    float ms = 0.0f;
    ok = ok && cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess;
    if (ok && (!any || ms < best)) {
      best = ms;
      pick = i;
      any = true;
    }
  }
  (void)cudaGetLastError();
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  p.algo = algos[pick];
}

// Runs the GEMM and its epilogue (bias gradient included) through cuBLASLt; false (nothing
// enqueued) when the layout, the epilogue, its vectors' alignment or cuBLASLt does not allow it.
// c_f32: C (and D) are float32 whatever A and B are (gemm_accumulate_f32; no epilogue, batch 1).
// c_in: C is read from there (same layout as c, batch 1, beta 1; gemm_residual) and D written to c.
// lane: a grouped GEMM's side lane (gemm_lane): its own workspace, and no autotuning there (that
// would time on the main workspace while the caller's stream may be using it).
bool gemm_lt(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, const GemmMat& a,
             const GemmMat& b, const GemmMat& c, double alpha, double beta, const GemmEpilogue* epi,
             bool c_f32 = false, const char* c_in = nullptr, int lane = -1) {
  gemm_map::LtProblem pr;
  if (!gemm_map::lt_problem(batch, M, N, K, a, b, c, pr)) return false;
  LtEpilogue e;
  if (!lt_epilogue(epi, e)) return false;
  // the epilogue's vector loads want 16-byte alignment; a view at an odd offset takes the tiled kernel
  const uint32_t vec_align = e.vec ? lt_alignment(e.vec, 0, 1) : 0;
  if (e.vec && vec_align < 16) return false;
  const uint32_t aux_align = e.aux ? lt_alignment(e.aux, 0, 1) : 0;
  if (e.aux && (aux_align < 16 || e.aux_ld % 8 != 0 || e.aux_ld < N)) return false;
  const gemm_map::LtOperand &la = pr.a, &lb = pr.b;
  const int64_t ldc = pr.ldc, bs_a = pr.bs_a, bs_b = pr.bs_b, bs_c = pr.bs_c;

  const int64_t isz = itemsize(dtype), csz = c_f32 ? int64_t(4) : isz;
  const bool tf32 = dtype == DType::F32 && allow_tf32();
  const bool is16 = dtype == DType::BF16 || dtype == DType::F16;
  const LtTypes ty = lt_types(dtype, tf32);
  const cudaDataType_t ctype = c_f32 ? CUDA_R_32F : ty.data;
  // C's alignment: the output's, and the separate input's where there is one (the smaller)
  const uint32_t c_align = c_in ? mn(lt_alignment(c.data, bs_c * csz, batch), lt_alignment(c_in, bs_c * csz, batch))
                                : lt_alignment(c.data, bs_c * csz, batch);
  const uint32_t align[3] = {lt_alignment(b.data, bs_a * isz, batch), lt_alignment(a.data, bs_b * isz, batch),
                             c_align};

  std::lock_guard<std::mutex> lock(g_lt_mutex);
  LtDevice& d = lt_device(current_device());
  void* workspace = d.workspace;
  if (lane >= 0) {
    workspace = d.lane_workspace[lane];
    if (d.workspace_bytes > 0 && !workspace) throw_error("matmul: grouped GEMM lane without its workspace");
  }

  for (int64_t b0 = 0; b0 < batch; b0 += kMaxLtBatch) {
    const int64_t nb = mn(batch - b0, kMaxLtBatch);
    PlanKey key;
    int64_t* v = key.v;
    v[0] = static_cast<int64_t>(dtype);
    v[1] = tf32;
    v[2] = la.trans;
    v[3] = lb.trans;
    v[4] = M;
    v[5] = N;
    v[6] = K;
    v[7] = la.ld;
    v[8] = lb.ld;
    v[9] = ldc;
    v[10] = nb;
    v[11] = nb > 1 ? bs_a : 0;
    v[12] = nb > 1 ? bs_b : 0;
    v[13] = nb > 1 ? bs_c : 0;
    v[14] = beta == 0;
    v[15] = align[0];
    v[16] = align[1];
    v[17] = align[2];
    v[18] = static_cast<int64_t>(d.workspace_bytes);
    v[19] = vec_align;  // 0: no bias (or bias gradient); else its alignment
    v[20] = static_cast<int64_t>(e.code);
    v[21] = e.aux_ld;
    v[22] = aux_align;
    v[23] = c_f32;
    v[24] = gemm_autotune();

    auto it = d.plans.find(key);
    if (it == d.plans.end()) {
      if (d.plans.size() >= kMaxPlans) {
        for (auto& kv : d.plans) kv.second.destroy();
        d.plans.clear();
      }
      Plan p = make_plan(d, ty, is16, la, lb, static_cast<uint64_t>(N), static_cast<uint64_t>(M), ldc, nb,
                         v[11], v[12], v[13], align, e, ctype);
      it = d.plans.emplace(key, p).first;
    }
    Plan& p = it->second;
    const char* A = b.data + b0 * bs_a * isz;  // cuBLASLt's A is our B
    const char* B = a.data + b0 * bs_b * isz;
    char* C = c.data + b0 * bs_c * csz;
    if (!p.ok) {
      if (b0 == 0 || c_f32) return false;  // nothing enqueued yet (c_f32: batch 1): the caller runs the tiled kernel
      // a last, shorter chunk cuBLASLt has no algorithm for: the tiled kernel runs it
      GemmMat ca{const_cast<char*>(B), bs_b, a.rs, a.cs}, cb{const_cast<char*>(A), bs_a, b.rs, b.cs},
          cc{C, bs_c, c.rs, 1};
      run_fallback(stream, dtype, nb, M, N, K, ca, cb, cc, alpha, beta, epi);
      continue;
    }
    // the cached descriptor holds the pointers of the call that made it: point it at this one's
    // (cuBLASLt reads the descriptor when the call is enqueued; the lock keeps calls apart)
    if (e.vec)
      lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &e.vec, sizeof(e.vec)),
               "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
    if (e.aux)
      lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &e.aux, sizeof(e.aux)),
               "cublasLtMatmulDescSetAttribute(EPILOGUE_AUX_POINTER)");
    if (!p.candidates.empty() && lane < 0) {
      if (nb == 1) autotune_plan(d, p, A, B, static_cast<size_t>(ldc) * static_cast<size_t>(M) * csz,
                                 dtype == DType::F64, alpha, stream);
      else p.candidates.clear();
    }
    const char* Cin = c_in ? c_in + b0 * bs_c * csz : C;  // C read from, D (C) written
    if (dtype == DType::F64) {
      double al = alpha, be = beta;
      lt_check(cublasLtMatmul(d.handle, p.op, &al, A, p.la, B, p.lb, &be, Cin, p.lc, C, p.lc, &p.algo, workspace,
                              d.workspace_bytes, stream),
               "cublasLtMatmul");
    } else {
      float al = static_cast<float>(alpha), be = static_cast<float>(beta);
      lt_check(cublasLtMatmul(d.handle, p.op, &al, A, p.la, B, p.lb, &be, Cin, p.lc, C, p.lc, &p.algo, workspace,
                              d.workspace_bytes, stream),
               "cublasLtMatmul");
    }
  }
  return true;
}

// the side lanes' workspaces (gemm_lt's `lane`); false when one cannot be had (the plain loop
// runs; a failed cudaMalloc is not a launch error: cleared)
bool gemm_lanes_ready(int n) {
  std::lock_guard<std::mutex> lock(g_lt_mutex);
  LtDevice& d = lt_device(current_device());
  if (d.workspace_bytes == 0) return true;  // cuBLASLt runs without one on every lane
  for (int i = 0; i < n; i++) {
    if (d.lane_workspace[i]) continue;
    if (cudaMalloc(&d.lane_workspace[i], d.workspace_bytes) != cudaSuccess) {
      d.lane_workspace[i] = nullptr;
      (void)cudaGetLastError();
      return false;
    }
  }
  return true;
}
void gemm_lane(cudaStream_t s, int slot, DType dtype, const GemmProblem& p) {
  if (gemm_lt(s, dtype, 1, p.M, p.N, p.K, p.a, p.b, p.c, 1.0, 0.0, nullptr, false, nullptr, slot)) return;
  run_fallback(s, dtype, 1, p.M, p.N, p.K, p.a, p.b, p.c, 1.0, 0.0, nullptr);
}

// All products in one cublasGemmGroupedBatchedEx call, each problem its own group (group size 1)
// in the row-major mapping of gemm_lt (cuBLAS's A is our B, its B our A); the device arrays of
// operand addresses are uploaded into scratch by store_words_kernel. False (nothing enqueued) for
// float64, a layout cuBLAS cannot take, or a dtype cuBLAS declined before.
bool grouped_blas(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps) {
  if (dtype == DType::F64 || ps.size() > 0x7fffffff) return false;
  const size_t G = ps.size();
  std::vector<cublasOperation_t> ta(G), tb(G);
  std::vector<int> m(G), n(G), k(G), lda(G), ldb(G), ldc(G), size(G, 1);
  std::vector<uint64_t> ptrs(3 * G);
  const int64_t isz = itemsize(dtype);
  for (size_t i = 0; i < G; i++) {
    const GemmProblem& p = ps[i];
    gemm_map::LtProblem pr;
    if (!gemm_map::lt_problem(1, p.M, p.N, p.K, p.a, p.b, p.c, pr)) return false;
    if (pr.a.ld > 0x7fffffff || pr.b.ld > 0x7fffffff || pr.ldc > 0x7fffffff) return false;
    // cuBLAS cannot see the addresses (they are in device memory) and assumes 16-byte aligned
    // matrices and leading dimensions: anything else faults ("misaligned address", measured)
    for (const void* m : {static_cast<const void*>(p.a.data), static_cast<const void*>(p.b.data),
                          static_cast<const void*>(p.c.data)})
      if (reinterpret_cast<uintptr_t>(m) % 16 != 0) return false;
    if ((pr.a.ld * isz) % 16 != 0 || (pr.b.ld * isz) % 16 != 0 || (pr.ldc * isz) % 16 != 0) return false;
    ta[i] = pr.a.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
    tb[i] = pr.b.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
    m[i] = static_cast<int>(pr.m);
    n[i] = static_cast<int>(pr.n);
    k[i] = static_cast<int>(pr.k);
    lda[i] = static_cast<int>(pr.a.ld);
    ldb[i] = static_cast<int>(pr.b.ld);
    ldc[i] = static_cast<int>(pr.ldc);
    ptrs[i] = reinterpret_cast<uintptr_t>(p.b.data);
    ptrs[G + i] = reinterpret_cast<uintptr_t>(p.a.data);
    ptrs[2 * G + i] = reinterpret_cast<uintptr_t>(p.c.data);
  }
  const LtTypes ty = lt_types(dtype, dtype == DType::F32 && allow_tf32());
  std::vector<float> alpha(G, 1.0f), beta(G, 0.0f);  // host pointer mode: read during the call

  std::lock_guard<std::mutex> lock(g_lt_mutex);
  LtDevice& d = lt_device(current_device());
  const int code = static_cast<int>(dtype);
  if (d.grouped_declined[code]) return false;
  if (!d.blas) {
    cublasStatus_t st = cublasCreate(&d.blas);
    if (st != CUBLAS_STATUS_SUCCESS) {
      d.blas = nullptr;
      lt_check(st, "cublasCreate");
    }
  }
  lt_check(cublasSetStream(d.blas, stream), "cublasSetStream");
  Scratch scratch(3 * G * sizeof(uint64_t), stream);
  upload_words(stream, ptrs.data(), static_cast<int64_t>(3 * G), scratch.at<uint64_t>());
  const void* const* A = scratch.at<const void* const>();
  const void* const* B = scratch.at<const void* const>(G * sizeof(uint64_t));
  void* const* C = scratch.at<void* const>(2 * G * sizeof(uint64_t));
  const cublasStatus_t st = cublasGemmGroupedBatchedEx(
      d.blas, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(), A, ty.data, lda.data(), B, ty.data,
      ldb.data(), beta.data(), C, ty.data, ldc.data(), static_cast<int>(G), size.data(), ty.compute);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED) {
    d.grouped_declined[code] = true;  // the uploads ran for nothing; the caller loops from now on
    return false;
  }
  lt_check(st, "cublasGemmGroupedBatchedEx");
  return true;
}

}  // namespace

void gemm(cudaStream_t stream, DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, const GemmMat& a,
          const GemmMat& b, const GemmMat& c, double alpha, double beta, const GemmEpilogue* epi) {
  const bool work = gemm_args_ok(dtype, batch, M, N, K, alpha, epi);
  if (work && gemm_lt(stream, dtype, batch, M, N, K, a, b, c, alpha, beta, epi)) return;  // BGRADB included
  // the erf GELU, a ReLU keeping its input: cuBLASLt with the bias epilogue, then the activation
  auto lt = [&](const GemmMat& target, const GemmEpilogue* e) {
    return gemm_lt(stream, dtype, 1, M, N, K, a, b, target, alpha, beta, e);
  };
  if (work && gemm_split_activation(stream, dtype, batch, M, N, c, beta, epi, lt)) return;
  if (work) run_fallback(stream, dtype, batch, M, N, K, a, b, c, alpha, beta, epi);
  run_row_sums(stream, dtype, M, K, a, epi);
}

void gemm_accumulate_f32(cudaStream_t stream, DType dtype, int64_t M, int64_t N, int64_t K, const GemmMat& a,
                         const GemmMat& b, const GemmMat& c) {
  if (!accumulate_args_ok(dtype, M, N, K)) return;
  if (gemm_lt(stream, dtype, 1, M, N, K, a, b, c, 1.0, 1.0, nullptr, true)) return;
  run_accumulate_tiled(stream, dtype, M, N, K, a, b, c);
}

// cuBLASLt with C = R and D = out (R with out's row stride, K > 0, not overlapping out unless it is
// out), else the copy and an in-place GEMM
void gemm_residual(cudaStream_t stream, DType dtype, int64_t M, int64_t N, int64_t K, const GemmMat& a,
                   const GemmMat& b, const GemmMat& c, const GemmMat& r) {
  if (!residual_args_ok(dtype, M, N, K)) return;
  if (K > 0 && r.rs == c.rs && gemm_lt(stream, dtype, 1, M, N, K, a, b, c, 1.0, 1.0, nullptr, false, r.data))
    return;
  residual_by_copy(stream, dtype, M, N, K, a, b, c, r);
}

// cuBLAS's grouped GEMM for all products at once; what it cannot take, one gemm per problem
// (cuBLASLt, or the tiled kernel).
void grouped_gemm(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps) {
  const std::vector<GemmProblem> work = grouped_work(dtype, ps);
  if (work.empty() || grouped_by_mode(stream, dtype, work) || grouped_blas(stream, dtype, work)) return;
  grouped_loop(stream, dtype, work);
}

const char* gemm_engine() {
  static const std::string name = [] {
    size_t v = cublasLtGetVersion();  // major * 10000 + minor * 100 + patch
    return "cuBLASLt " + std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." +
           std::to_string(v % 100);
  }();
  return name.c_str();
}

}  // namespace mpc

#endif  // MEGAPATCH_CUDA_EMULATOR
