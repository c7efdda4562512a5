// Batched GEMM: C[b] = alpha * A[b] @ B[b] + beta * C[b] for float32/float64 through OpenBLAS
// (any transpose of A and B expressed by their strides), bfloat16 through oneDNN's native bf16
// GEMM where the CPU has bf16 dot products, other bfloat16/float16 products through float32
// panels, and a portable blocked GEMM when OpenBLAS is not available.
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "common.h"

#ifdef MEGAPATCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

#ifdef MEGAPATCH_HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>

// Exported by libdnnl with C linkage but declared only in oneDNN's internal headers (CMakeLists.txt
// checks that it links). Row-major C = alpha * op(A) @ op(B) + beta * C, op(X) = X for 'N' and
// X^T for 'T', with A and B bf16 (passed as their 16-bit words) and C fp32, accumulated in fp32.
extern "C" dnnl_status_t dnnl_gemm_bf16bf16f32(char transa, char transb, dnnl_dim_t M, dnnl_dim_t N, dnnl_dim_t K,
                                               float alpha, const uint16_t* A, dnnl_dim_t lda, const uint16_t* B,
                                               dnnl_dim_t ldb, float beta, float* C, dnnl_dim_t ldc);
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

#ifdef MEGAPATCH_HAVE_DNNL
// oneDNN's bf16 GEMM pays off only with native bf16 dot products (AVX512-BF16, AMX): on plain
// AVX-512 it emulates them, slower than the fp32 panels, and below AVX-512 it refuses the call.
static bool dnnl_bf16_native() {
  static const bool native = [] {
    auto isa = static_cast<unsigned>(dnnl_get_effective_cpu_isa());
    auto need = static_cast<unsigned>(dnnl_cpu_isa_avx512_core_bf16);  // ISA values are feature bit sets
    return (isa & need) == need;
  }();
  return native;
}

// Rows [r0, r1) between a bf16 matrix (row stride rs, unit column stride) and a dense fp32 one of
// n columns; the way back rounds to nearest even like every bf16 store.
static void bf16_rows_to_f32(const bf16* src, int64_t rs, int64_t n, float* dst, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r++)
    for (int64_t j = 0; j < n; j++) dst[r * n + j] = bf16_to_f32(src[r * rs + j].bits);
}
static void f32_rows_to_bf16(const float* src, int64_t n, bf16* dst, int64_t rs, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r++)
    for (int64_t j = 0; j < n; j++) dst[r * rs + j].bits = f32_to_bf16(src[r * n + j]);
}
#endif

// bf16 GEMM through oneDNN: each product in fp32, rounded once into C. Returns false, having
// written nothing, when oneDNN is absent, the CPU lacks native bf16, or an operand has no unit
// stride; the caller then takes the fp32 panels.
static bool gemm_bf16_dnnl(int64_t batch, int64_t M, int64_t N, int64_t K, const Mat& a, const Mat& b, const Mat& c,
                           double alpha, double beta) {
#ifdef MEGAPATCH_HAVE_DNNL
  bool ta, tb;
  int64_t lda, ldb;
  if (!dnnl_bf16_native() || !blas_layout(M, K, a.rs, a.cs, ta, lda) || !blas_layout(K, N, b.rs, b.cs, tb, ldb))
    return false;
  // C[i] = alpha A[i] @ B[i] + beta C[i] through the M x N fp32 product pc, which needs no
  // initialising: with beta == 0 oneDNN never reads it (BLAS convention), otherwise C is loaded
  // into it first. oneDNN threads the product on our OpenMP pool (omp_get_max_threads, set by
  // setNumThreads) and runs on one thread when called inside a parallel region; `split` spreads
  // the conversions over the pool too.
  auto product = [&](int64_t i, float* pc, bool split) {
    auto rows = [&](auto fn) {
      if (split) parallel_for(M, N, fn);
      else fn(0, M);
    };
    bf16* C = reinterpret_cast<bf16*>(c.base) + i * c.bs;
    if (beta != 0) rows([&](int64_t r0, int64_t r1) { bf16_rows_to_f32(C, c.rs, N, pc, r0, r1); });
    dnnl_status_t st = dnnl_gemm_bf16bf16f32(
        ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, static_cast<float>(alpha),
        reinterpret_cast<const uint16_t*>(a.base) + i * a.bs, lda,
        reinterpret_cast<const uint16_t*>(b.base) + i * b.bs, ldb, static_cast<float>(beta), pc, N);
    if (st == dnnl_success) rows([&](int64_t r0, int64_t r1) { f32_rows_to_bf16(pc, N, C, c.rs, r0, r1); });
    return st;
  };
  std::atomic<int> status{dnnl_success};
  double work = static_cast<double>(M) * N * K;
  if (batch > 1 && work < kGemmParallelWork) {
    // many small products: one whole product per thread
    parallel_for(batch, static_cast<int64_t>(work), [&](int64_t lo, int64_t hi) {
      std::unique_ptr<float[]> pc(new float[M * N]);
      for (int64_t i = lo; i < hi && status == dnnl_success; i++) {
        dnnl_status_t st = product(i, pc.get(), false);
        if (st != dnnl_success) status = st;
      }
    });
  } else {
    std::unique_ptr<float[]> pc(new float[M * N]);
    for (int64_t i = 0; i < batch && status == dnnl_success; i++) status = product(i, pc.get(), true);
  }
  // the layout and ISA checks above leave oneDNN nothing to refuse; a failure is a bug to report
  if (status != dnnl_success)
    throw_error("matmul: oneDNN bf16 GEMM failed with status " + std::to_string(status.load()) + " for M=" +
                std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K));
  return true;
#else
  return false;
#endif
}

// buildInfo() fields of the GEMM: the engine of bf16 products, oneDNN's version and the ISA
// it dispatches to (null without oneDNN).
void describe_gemm(Napi::Env env, Napi::Object info) {
#ifdef MEGAPATCH_HAVE_DNNL
  const dnnl_version_t* v = dnnl_version();
  info.Set("bf16Gemm", dnnl_bf16_native() ? "onednn" : "fp32-panels");
  info.Set("onednn", std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch));
  std::string isa = dnnl_cpu_isa2str(dnnl_get_effective_cpu_isa());
  const std::string prefix = "cpu_isa_";
  if (isa.compare(0, prefix.size(), prefix) == 0) isa.erase(0, prefix.size());
  info.Set("onednnIsa", isa);
#else
  info.Set("bf16Gemm", "fp32-panels");
  info.Set("onednn", env.Null());
  info.Set("onednnIsa", env.Null());
#endif
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
    case DType::BF16:
      if (!gemm_bf16_dnnl(batch, M, N, K, A, B, C, alpha, beta)) gemm_half<bf16>(batch, M, N, K, A, B, C, alpha, beta);
      break;
    case DType::F16: gemm_half<f16>(batch, M, N, K, A, B, C, alpha, beta); break;
    default: throw_error("matmul: integer and bool dtypes are not supported");
  }
  return info.Env().Undefined();
}

void register_gemm(Napi::Env env, Napi::Object exports) { exports.Set("gemm", Napi::Function::New(env, GemmK)); }

}  // namespace mp
