// Batched GEMM: C[b] = alpha * A[b] @ B[b] + beta * C[b] for float32/float64 through OpenBLAS
// (any transpose of A and B expressed by their strides), bfloat16/float16 through float32 panels,
// and a portable blocked GEMM when OpenBLAS is not available.
#include <algorithm>
#include <vector>

#include "common.h"

#ifdef MEGAPATCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace mp {

// One operand matrix: element (i, j) of batch b lives at base + b*bs + i*rs + j*cs (elements).
struct Mat {
  char* base;
  int64_t bs, rs, cs;
};

// Decides the BLAS layout of a rows x cols view: returns false when neither stride is unit.
static bool blas_layout(int64_t rows, int64_t cols, int64_t rs, int64_t cs, bool& trans, int64_t& ld) {
  if (cs == 1 || cols == 1) {
    trans = false;
    ld = rows == 1 ? std::max<int64_t>(cols, 1) : rs;
    return ld >= std::max<int64_t>(cols, 1);
  }
  if (rs == 1 || rows == 1) {
    trans = true;
    ld = cols == 1 ? std::max<int64_t>(rows, 1) : cs;
    return ld >= std::max<int64_t>(rows, 1);
  }
  return false;
}

// Portable blocked GEMM on one matrix (row-major C with unit column stride).
template <typename T>
static void gemm_portable(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t ars, int64_t acs, const T* B,
                          int64_t brs, int64_t bcs, T beta, T* C, int64_t crs) {
  constexpr int64_t KC = 256, NC = 512;
  std::vector<T> bp(static_cast<size_t>(KC * NC));
  for (int64_t i = 0; i < M; i++)
    for (int64_t j = 0; j < N; j++) C[i * crs + j] = beta == T(0) ? T(0) : C[i * crs + j] * beta;
  for (int64_t j0 = 0; j0 < N; j0 += NC) {
    int64_t nc = std::min(NC, N - j0);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      int64_t kc = std::min(KC, K - k0);
      for (int64_t k = 0; k < kc; k++)
        for (int64_t j = 0; j < nc; j++) bp[k * nc + j] = B[(k0 + k) * brs + (j0 + j) * bcs];
      parallel_for(M, kc * nc, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) {
          T* c = C + i * crs + j0;
          for (int64_t k = 0; k < kc; k++) {
            T av = alpha * A[i * ars + (k0 + k) * acs];
            const T* brow = bp.data() + k * nc;
            for (int64_t j = 0; j < nc; j++) c[j] += av * brow[j];
          }
        }
      });
    }
  }
}

template <typename T>
static void blas_call(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const T* A, int64_t lda,
                      const T* B, int64_t ldb, double beta, T* C, int64_t ldc) {
#ifdef MEGAPATCH_HAVE_OPENBLAS
  if constexpr (std::is_same<T, float>::value) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K,
                static_cast<float>(alpha), A, lda, B, ldb, static_cast<float>(beta), C, ldc);
  } else {
    cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
                B, ldb, beta, C, ldc);
  }
#endif
}

// Below this many multiply-adds a GEMM runs on one thread.
constexpr double kGemmParallelWork = 1 << 18;

template <typename T>
static void gemm_one(int64_t M, int64_t N, int64_t K, double alpha, const T* A, int64_t ars, int64_t acs, const T* B,
                     int64_t brs, int64_t bcs, double beta, T* C, int64_t crs) {
#ifdef MEGAPATCH_HAVE_OPENBLAS
  bool ta, tb;
  int64_t lda, ldb;
  if (blas_layout(M, K, ars, acs, ta, lda) && blas_layout(K, N, brs, bcs, tb, ldb)) {
    // OpenBLAS runs single-threaded (see addon.cc): one thread pool, ours, so that OpenMP workers
    // never spin against OpenBLAS's own threads. Large products are split into panels of C rows
    // (or columns when C is wide), one per thread.
    int nt = num_threads();
    double work = static_cast<double>(M) * N * K;
#ifdef _OPENMP
    if (nt > 1 && work >= kGemmParallelWork && !omp_in_parallel()) {
      bool by_rows = M >= N;
      int64_t extent = by_rows ? M : N;
      int chunks = static_cast<int>(std::min<int64_t>(nt, std::max<int64_t>(1, extent / 16)));
#pragma omp parallel num_threads(chunks)
      {
        int t = omp_get_thread_num(), team = omp_get_num_threads();
        int64_t b = extent * t / team, e = extent * (t + 1) / team;
        if (b < e) {
          if (by_rows) blas_call<T>(ta, tb, e - b, N, K, alpha, A + b * ars, lda, B, ldb, beta, C + b * crs, crs);
          else blas_call<T>(ta, tb, M, e - b, K, alpha, A, lda, B + b * bcs, ldb, beta, C + b, crs);
        }
      }
      return;
    }
#endif
    blas_call<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, crs);
    return;
  }
#endif
  gemm_portable<T>(M, N, K, static_cast<T>(alpha), A, ars, acs, B, brs, bcs, static_cast<T>(beta), C, crs);
}

// Copies a strided rows x cols matrix of T into a contiguous float panel.
template <typename T>
static void to_panel(const T* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, float* dst) {
  parallel_for(rows, cols, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++)
      for (int64_t j = 0; j < cols; j++) dst[i * cols + j] = Tr<T>::ld(src + i * rs + j * cs);
  });
}

template <typename T>
static void gemm_half(int64_t batch, int64_t M, int64_t N, int64_t K, const Mat& a, const Mat& b, const Mat& c,
                      double alpha, double beta) {
  std::vector<float> pa(static_cast<size_t>(M * K)), pb(static_cast<size_t>(K * N)), pc(static_cast<size_t>(M * N));
  const T* prev_a = nullptr;
  const T* prev_b = nullptr;
  for (int64_t i = 0; i < batch; i++) {
    const T* A = reinterpret_cast<const T*>(a.base) + i * a.bs;
    const T* B = reinterpret_cast<const T*>(b.base) + i * b.bs;
    T* C = reinterpret_cast<T*>(c.base) + i * c.bs;
    if (A != prev_a) to_panel<T>(A, M, K, a.rs, a.cs, pa.data());
    if (B != prev_b) to_panel<T>(B, K, N, b.rs, b.cs, pb.data());
    prev_a = A;
    prev_b = B;
    if (beta != 0) to_panel<T>(C, M, N, c.rs, 1, pc.data());
    gemm_one<float>(M, N, K, alpha, pa.data(), K, 1, pb.data(), N, 1, beta, pc.data(), N);
    parallel_for(M, N, [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; r++)
        for (int64_t j = 0; j < N; j++) Tr<T>::st(C + r * c.rs + j, pc[r * N + j]);
    });
  }
}

template <typename T>
static void gemm_full(int64_t batch, int64_t M, int64_t N, int64_t K, const Mat& a, const Mat& b, const Mat& c,
                      double alpha, double beta) {
  double work = static_cast<double>(M) * N * K;
  if (batch > 1 && work < kGemmParallelWork) {
    // many small products: one whole product per thread
    parallel_for(batch, static_cast<int64_t>(work), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; i++) {
        gemm_one<T>(M, N, K, alpha, reinterpret_cast<const T*>(a.base) + i * a.bs, a.rs, a.cs,
                    reinterpret_cast<const T*>(b.base) + i * b.bs, b.rs, b.cs, beta,
                    reinterpret_cast<T*>(c.base) + i * c.bs, c.rs);
      }
    });
    return;
  }
  for (int64_t i = 0; i < batch; i++) {
    gemm_one<T>(M, N, K, alpha, reinterpret_cast<const T*>(a.base) + i * a.bs, a.rs, a.cs,
                reinterpret_cast<const T*>(b.base) + i * b.bs, b.rs, b.cs, beta,
                reinterpret_cast<T*>(c.base) + i * c.bs, c.rs);
  }
}

// gemm(dtype, batch, M, N, K, A(ptr,bs,rs,cs), B(ptr,bs,rs,cs), C(ptr,bs,rs), alpha, beta)
MP_ENTRY(GemmK) {
  Args a;
  DType dt = static_cast<DType>(a.i32());
  int64_t batch = a.i64(), M = a.i64(), N = a.i64(), K = a.i64();
  Mat A{static_cast<char*>(a.ptr()), a.i64(), a.i64(), a.i64()};
  Mat B{static_cast<char*>(a.ptr()), a.i64(), a.i64(), a.i64()};
  Mat C{static_cast<char*>(a.ptr()), a.i64(), a.i64(), 1};
  double alpha = a.num(), beta = a.num();
  if (M == 0 || N == 0) return info.Env().Undefined();
  if (K == 0) throw_error("gemm: K == 0 must be handled by the caller");
  switch (dt) {
    case DType::F32: gemm_full<float>(batch, M, N, K, A, B, C, alpha, beta); break;
    case DType::F64: gemm_full<double>(batch, M, N, K, A, B, C, alpha, beta); break;
    case DType::BF16: gemm_half<bf16>(batch, M, N, K, A, B, C, alpha, beta); break;
    case DType::F16: gemm_half<f16>(batch, M, N, K, A, B, C, alpha, beta); break;
    default: throw_error("matmul: integer and bool dtypes are not supported");
  }
  return info.Env().Undefined();
}

void register_gemm(Napi::Env env, Napi::Object exports) { exports.Set("gemm", Napi::Function::New(env, GemmK)); }

}  // namespace mp
