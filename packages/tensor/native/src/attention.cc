// Fused scaled-dot-product attention, flash-attention style on the CPU.
//
// Forward: one task per (batch, query head, block of query rows). Keys are visited in blocks;
// each block's scores come from one small GEMM, are masked, and folded into a running (max, sum)
// softmax so the [Sq, Sk] matrix never exists beyond one block. The per-row logsumexp is saved.
// Backward: probabilities are recomputed from the saved logsumexp block by block. Two schedules
// avoid write races on the gradients:
//  - per kv head: a task owns one (batch, kv head) and every query head of its group, so it
//    accumulates dq, dk and dv alone. No extra work, used when there are enough kv heads to keep
//    every thread busy;
//  - split: tasks over (batch, kv head, key block) produce dk/dv, then tasks over (batch, query
//    head, query block) produce dq. Scores are computed twice, but any shape parallelises.
// Arithmetic is fp32 for fp32/bf16/fp16 inputs and fp64 for float64 (used by gradcheck).
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "fast-math.h"

#ifdef MEGAPATCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace mp {

namespace {

constexpr int kBlockQ = 64;
// OpenBLAS runs a GEMM on one thread when M*N*K stays at or below this (SMP_THRESHOLD_MIN times
// the default GEMM_MULTITHREAD_THRESHOLD). Tiles are sized to stay under it so that the calls
// made from inside our parallel region never start BLAS threads of their own.
constexpr int64_t kSingleThreadGemm = 65536 * 4;

// ---- small GEMMs on tiles --------------------------------------------------------------------
// C[M, N] = alpha * op(A) @ op(B) + beta * C, row-major with leading dimensions. op(A) = A^T when
// ta (A is stored K x M), op(B) = B^T when tb (B is stored N x K).
template <typename C>
void tile_gemm_portable(bool ta, bool tb, int M, int N, int K, C alpha, const C* A, int64_t lda, const C* B,
                        int64_t ldb, C beta, C* Cm, int64_t ldc, std::vector<C>& panel) {
  const C* Bp = B;
  int64_t ldbp = ldb;
  if (tb) {
    // the inner loop wants contiguous columns of op(B)
    panel.resize(static_cast<size_t>(K) * N);
    for (int k = 0; k < K; k++)
      for (int j = 0; j < N; j++) panel[static_cast<size_t>(k) * N + j] = B[j * ldb + k];
    Bp = panel.data();
    ldbp = N;
  }
  for (int i = 0; i < M; i++) {
    C* c = Cm + i * ldc;
    if (beta == C(0)) {
      for (int j = 0; j < N; j++) c[j] = C(0);
    } else if (beta != C(1)) {
      for (int j = 0; j < N; j++) c[j] *= beta;
    }
    for (int k = 0; k < K; k++) {
      const C av = alpha * (ta ? A[k * lda + i] : A[i * lda + k]);
      const C* b = Bp + k * ldbp;
      for (int j = 0; j < N; j++) c[j] += av * b[j];
    }
  }
}

template <typename C>
void tile_gemm(bool ta, bool tb, int M, int N, int K, C alpha, const C* A, int64_t lda, const C* B, int64_t ldb,
               C beta, C* Cm, int64_t ldc, std::vector<C>& panel) {
  if (M == 0 || N == 0) return;
#ifdef MEGAPATCH_HAVE_OPENBLAS
  const auto opa = ta ? CblasTrans : CblasNoTrans;
  const auto opb = tb ? CblasTrans : CblasNoTrans;
  if (beta == C(0)) {
    // OpenBLAS applies beta = 0 in a separate pass over C that costs more, on these tile
    // sizes, than clearing C here and accumulating into it
    for (int i = 0; i < M; i++) std::fill(Cm + i * ldc, Cm + i * ldc + N, C(0));
    beta = C(1);
  }
  if constexpr (std::is_same<C, float>::value) {
    cblas_sgemm(CblasRowMajor, opa, opb, M, N, K, alpha, A, static_cast<int>(lda), B, static_cast<int>(ldb), beta, Cm,
                static_cast<int>(ldc));
  } else {
    cblas_dgemm(CblasRowMajor, opa, opb, M, N, K, alpha, A, static_cast<int>(lda), B, static_cast<int>(ldb), beta, Cm,
                static_cast<int>(ldc));
  }
  (void)panel;
#else
  tile_gemm_portable<C>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc, panel);
#endif
}

// ---- row primitives written so that the compiler vectorises them -----------------------------
// Under the default -ftrapping-math GCC will not if-convert float comparisons, which keeps any
// loop containing one scalar; the selects below therefore work on the bit patterns (exp_nonpos
// in fast-math.h is written the same way).

// Float bit patterns mapped to integers of the same order, so the maximum is an integer max.
inline int32_t ordered_bits(float x) {
  const int32_t i = static_cast<int32_t>(bits_of(x));
  return i < 0 ? i ^ 0x7FFFFFFF : i;
}

inline float row_max(const float* x, int n) {
  int32_t m = ordered_bits(-std::numeric_limits<float>::infinity());
  for (int j = 0; j < n; j++) {
    const int32_t o = ordered_bits(x[j]);
    m = o > m ? o : m;
  }
  return float_of(static_cast<uint32_t>(m < 0 ? m ^ 0x7FFFFFFF : m));
}

inline double row_max(const double* x, int n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
  return m;
}

// Sum over 8 independent lanes: one accumulator would serialise the loop, and without
// -ffast-math the compiler may not reassociate it.
template <typename C>
C row_sum(const C* x, int n) {
  C lanes[8] = {};
  int j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; u++) lanes[u] += x[j + u];
  C s = 0;
  for (int u = 0; u < 8; u++) s += lanes[u];
  for (; j < n; j++) s += x[j];
  return s;
}

// ---- the problem -----------------------------------------------------------------------------
struct Problem {
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0, Dv = 0, group = 1;
  int bk = 64;  // key block
  bool causal = false;
  double scale = 1;
  bool has_mask = false;
  TensorArg mask;                       // [B, Hq, Sq, Sk] view (stride 0 where broadcast)
  std::vector<int64_t> seg_lo, seg_hi;  // per token: its sequence's key range (varlen only)

  // Keys row i may attend to, before the explicit mask: [lo, hi).
  void row_range(int64_t i, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = Sk;
    if (!seg_lo.empty()) {
      lo = seg_lo[static_cast<size_t>(i)];
      hi = seg_hi[static_cast<size_t>(i)];
    }
    if (causal) hi = std::min(hi, i + 1);
  }
};

// Adds the explicit mask of row (b, h, i), keys [j0, j0 + n), to s: bool false gives -inf,
// floating values are added.
template <typename C>
void add_mask_row(const TensorArg& m, int64_t b, int64_t h, int64_t i, int64_t j0, int n, C* s) {
  const int64_t base = b * m.strides[0] + h * m.strides[1] + i * m.strides[2] + j0 * m.strides[3];
  const int64_t st = m.strides[3];
  const C ninf = -std::numeric_limits<C>::infinity();
  switch (m.dtype) {
    case DType::Bool: {
      const uint8_t* p = reinterpret_cast<const uint8_t*>(m.data) + base;
      for (int j = 0; j < n; j++) s[j] = p[j * st] ? s[j] : ninf;
      break;
    }
    case DType::F32: {
      const float* p = m.ptr<float>() + base;
      for (int j = 0; j < n; j++) s[j] += static_cast<C>(p[j * st]);
      break;
    }
    case DType::F64: {
      const double* p = m.ptr<double>() + base;
      for (int j = 0; j < n; j++) s[j] += static_cast<C>(p[j * st]);
      break;
    }
    case DType::BF16: {
      const bf16* p = m.ptr<bf16>() + base;
      for (int j = 0; j < n; j++) s[j] += static_cast<C>(Tr<bf16>::ld(p + j * st));
      break;
    }
    case DType::F16: {
      const f16* p = m.ptr<f16>() + base;
      for (int j = 0; j < n; j++) s[j] += static_cast<C>(Tr<f16>::ld(p + j * st));
      break;
    }
    default: break;  // rejected before any parallel region
  }
}

// Rows [r0, r0 + n) of the (b, h) matrix of a [B, H, S, cols] operand, in compute type: the
// storage itself when its layout already suits BLAS, otherwise a packed copy in buf.
template <typename T, typename C>
const C* rows_view(const TensorArg& t, int64_t b, int64_t h, int64_t r0, int n, int64_t cols, std::vector<C>& buf,
                   int64_t& ld) {
  const T* base = t.ptr<T>() + b * t.strides[0] + h * t.strides[1] + r0 * t.strides[2];
  const int64_t rs = t.strides[2], cs = t.strides[3];
  if constexpr (std::is_same<T, C>::value) {
    if (cols >= 1 && (cs == 1 || cols == 1)) {
      if (n <= 1) {
        ld = cols;
        return base;
      }
      if (rs >= cols) {
        ld = rs;
        return base;
      }
    }
  }
  const int64_t w = std::max<int64_t>(cols, 1);
  buf.resize(static_cast<size_t>(n * w));
  for (int r = 0; r < n; r++)
    for (int64_t c = 0; c < cols; c++) buf[static_cast<size_t>(r * w + c)] = static_cast<C>(Tr<T>::ld(base + r * rs + c * cs));
  ld = w;
  return buf.data();
}

// Per-thread scratch, grown on first use.
template <typename C>
struct Scratch {
  std::vector<C> q, k, v, go, s, dp, acc, dq, dk, dv, m, l, panel;
  std::vector<int64_t> lo, hi;
};

// Runs fn(task, scratch) for every task; tasks are handed out dynamically because causal and
// varlen blocks differ in cost.
template <typename C, typename F>
void run_tasks(int64_t n, int64_t cost, F fn) {
#ifdef _OPENMP
  const int nt = num_threads();
  if (nt > 1 && n > 1 && n * cost >= kParallelGrain) {
    const int team = static_cast<int>(std::min<int64_t>(nt, n));
#pragma omp parallel num_threads(team)
    {
      Scratch<C> sc;
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < n; t++) fn(t, sc);
    }
    return;
  }
#endif
  Scratch<C> sc;
  for (int64_t t = 0; t < n; t++) fn(t, sc);
}

// Key ranges of the query rows [i0, i0 + nq); returns the union [blo, bhi) (empty: blo >= bhi).
void block_ranges(const Problem& P, int64_t i0, int nq, std::vector<int64_t>& lo, std::vector<int64_t>& hi,
                  int64_t& blo, int64_t& bhi) {
  lo.resize(static_cast<size_t>(nq));
  hi.resize(static_cast<size_t>(nq));
  blo = P.Sk;
  bhi = 0;
  for (int r = 0; r < nq; r++) {
    P.row_range(i0 + r, lo[r], hi[r]);
    if (lo[r] < hi[r]) {
      blo = std::min(blo, lo[r]);
      bhi = std::max(bhi, hi[r]);
    }
  }
}

// ---- forward ---------------------------------------------------------------------------------
template <typename T>
void forward(const Problem& P, const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& o,
             const TensorArg& lse) {
  using C = typename Tr<T>::C;
  const C ninf = -std::numeric_limits<C>::infinity();
  const int BK = P.bk;
  const int64_t nqb = (P.Sq + kBlockQ - 1) / kBlockQ;
  const int64_t ntask = P.B * P.Hq * nqb;
  run_tasks<C>(ntask, kBlockQ * std::max<int64_t>(P.Sk, 1) * (P.D + P.Dv), [&](int64_t t, Scratch<C>& sc) {
    // the last query blocks of a causal head are the most expensive: hand them out first
    const int64_t qb = nqb - 1 - t % nqb, h = (t / nqb) % P.Hq, b = t / (nqb * P.Hq), kh = h / P.group;
    const int64_t i0 = qb * kBlockQ;
    const int nq = static_cast<int>(std::min<int64_t>(kBlockQ, P.Sq - i0));
    int64_t blo, bhi;
    block_ranges(P, i0, nq, sc.lo, sc.hi, blo, bhi);
    sc.acc.assign(static_cast<size_t>(nq * P.Dv), C(0));
    sc.m.assign(static_cast<size_t>(nq), ninf);
    sc.l.assign(static_cast<size_t>(nq), C(0));
    sc.s.resize(static_cast<size_t>(kBlockQ * BK));
    C* acc = sc.acc.data();
    C* s = sc.s.data();
    if (blo < bhi) {
      int64_t ldq, ldk, ldv;
      const C* Q = rows_view<T, C>(q, b, h, i0, nq, P.D, sc.q, ldq);
      for (int64_t j0 = blo; j0 < bhi; j0 += BK) {
        const int nk = static_cast<int>(std::min<int64_t>(BK, bhi - j0));
        const C* K = rows_view<T, C>(k, b, kh, j0, nk, P.D, sc.k, ldk);
        const C* V = rows_view<T, C>(v, b, kh, j0, nk, P.Dv, sc.v, ldv);
        tile_gemm<C>(false, true, nq, nk, static_cast<int>(P.D), static_cast<C>(P.scale), Q, ldq, K, ldk, C(0), s, BK,
                     sc.panel);
        bool any = false;
        for (int r = 0; r < nq; r++) {
          C* sr = s + r * BK;
          const int a = static_cast<int>(std::max<int64_t>(sc.lo[r], j0) - j0);
          const int e = static_cast<int>(std::min<int64_t>(sc.hi[r], j0 + nk) - j0);
          if (a >= e) {
            std::fill(sr, sr + nk, C(0));
            continue;
          }
          if (P.has_mask) add_mask_row<C>(P.mask, b, h, i0 + r, j0 + a, e - a, sr + a);
          std::fill(sr, sr + a, C(0));
          std::fill(sr + e, sr + nk, C(0));
          const C mx = row_max(sr + a, e - a);
          if (mx == ninf) {
            std::fill(sr + a, sr + e, C(0));
            continue;
          }
          const C mold = sc.m[r];
          const C mnew = mold > mx ? mold : mx;
          for (int j = a; j < e; j++) sr[j] = exp_nonpos(sr[j] - mnew);
          const C sum = row_sum(sr + a, e - a);
          if (mold != ninf && mold != mnew) {
            const C corr = exp_nonpos(mold - mnew);
            sc.l[r] *= corr;
            C* ar = acc + r * P.Dv;
            for (int64_t d = 0; d < P.Dv; d++) ar[d] *= corr;
          }
          sc.l[r] += sum;
          sc.m[r] = mnew;
          any = true;
        }
        if (any)
          tile_gemm<C>(false, false, nq, static_cast<int>(P.Dv), nk, C(1), s, BK, V, ldv, C(1), acc, P.Dv, sc.panel);
      }
    }
    C* lrow = lse.ptr<C>() + b * lse.strides[0] + h * lse.strides[1] + i0 * lse.strides[2];
    for (int r = 0; r < nq; r++) {
      T* orow = o.ptr<T>() + b * o.strides[0] + h * o.strides[1] + (i0 + r) * o.strides[2];
      const C l = sc.l[r];
      // a row with nothing to attend to gives zeros (and lse = -inf, which backward reads as "no
      // gradient") instead of the NaN of 0/0
      const C inv = l > C(0) ? C(1) / l : C(0);
      const C* ar = acc + r * P.Dv;
      for (int64_t d = 0; d < P.Dv; d++) Tr<T>::st(orow + d * o.strides[3], ar[d] * inv);
      lrow[r * lse.strides[2]] = l > C(0) ? sc.m[r] + std::log(l) : ninf;
    }
  });
}

// ---- backward --------------------------------------------------------------------------------
struct Grads {
  TensorArg dq, dk, dv, go, q, k, v, o, lse;
};

// One (query block, key block) pair of the backward. Q/dO/lse/delta cover the query rows
// [i0, i0 + nq), K/V the keys [j0, j0 + nk). Accumulates dV += P^T dO and dK += scale dS^T Q
// when dK is given (ld D / Dv), and dQ += scale dS K when dQ is given (ld D).
template <typename C>
void backward_block(const Problem& P, int64_t b, int64_t h, int64_t i0, int nq, const int64_t* lo, const int64_t* hi,
                    const C* Q, int64_t ldq, const C* dO, int64_t lddo, const C* lse, const C* delta, int64_t j0,
                    int nk, const C* K, int64_t ldk, const C* V, int64_t ldv, C* dK, C* dV, C* dQ, Scratch<C>& sc) {
  const int BK = P.bk;
  const C ninf = -std::numeric_limits<C>::infinity();
  sc.s.resize(static_cast<size_t>(kBlockQ * BK));
  sc.dp.resize(static_cast<size_t>(kBlockQ * BK));
  C* s = sc.s.data();
  C* dp = sc.dp.data();
  tile_gemm<C>(false, true, nq, nk, static_cast<int>(P.D), static_cast<C>(P.scale), Q, ldq, K, ldk, C(0), s, BK,
               sc.panel);
  bool any = false;
  for (int r = 0; r < nq; r++) {
    C* sr = s + r * BK;
    const int a = static_cast<int>(std::max<int64_t>(lo[r], j0) - j0);
    const int e = static_cast<int>(std::min<int64_t>(hi[r], j0 + nk) - j0);
    const C L = lse[r];
    if (a >= e || L == ninf) {
      std::fill(sr, sr + nk, C(0));
      continue;
    }
    if (P.has_mask) add_mask_row<C>(P.mask, b, h, i0 + r, j0 + a, e - a, sr + a);
    std::fill(sr, sr + a, C(0));
    std::fill(sr + e, sr + nk, C(0));
    for (int j = a; j < e; j++) sr[j] = exp_nonpos(sr[j] - L);
    any = true;
  }
  if (!any) return;
  const int D = static_cast<int>(P.D), Dv = static_cast<int>(P.Dv);
  if (dV) tile_gemm<C>(true, false, nk, Dv, nq, C(1), s, BK, dO, lddo, C(1), dV, Dv, sc.panel);
  tile_gemm<C>(false, true, nq, nk, Dv, C(1), dO, lddo, V, ldv, C(0), dp, BK, sc.panel);
  for (int r = 0; r < nq; r++) {
    const C* pr = s + r * BK;
    C* dr = dp + r * BK;
    const C dl = delta[r];
    for (int j = 0; j < nk; j++) dr[j] = pr[j] * (dr[j] - dl);
  }
  const C sc_ = static_cast<C>(P.scale);
  if (dK) tile_gemm<C>(true, false, nk, D, nq, sc_, dp, BK, Q, ldq, C(1), dK, D, sc.panel);
  if (dQ) tile_gemm<C>(false, false, nq, D, nk, sc_, dp, BK, K, ldk, C(1), dQ, D, sc.panel);
}

// Writes a [n, cols] compute-type block into rows [r0, r0 + n) of the (b, h) matrix of dst.
template <typename T, typename C>
void store_rows(const TensorArg& dst, int64_t b, int64_t h, int64_t r0, int n, int64_t cols, const C* src) {
  for (int r = 0; r < n; r++) {
    T* row = dst.ptr<T>() + b * dst.strides[0] + h * dst.strides[1] + (r0 + r) * dst.strides[2];
    for (int64_t c = 0; c < cols; c++) Tr<T>::st(row + c * dst.strides[3], src[r * cols + c]);
  }
}

template <typename T>
void backward(const Problem& P, const Grads& G) {
  using C = typename Tr<T>::C;
  const int BK = P.bk;
  const int64_t nqb = (P.Sq + kBlockQ - 1) / kBlockQ;
  const int64_t nkb = (P.Sk + BK - 1) / BK;
  const int64_t D = P.D, Dv = P.Dv;

  // delta_i = sum_d dO[i, d] O[i, d], the row term of the softmax backward
  std::vector<C> delta(static_cast<size_t>(P.B * P.Hq * P.Sq));
  parallel_for(P.B * P.Hq * P.Sq, Dv * 2, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; row++) {
      const int64_t i = row % P.Sq, h = (row / P.Sq) % P.Hq, b = row / (P.Sq * P.Hq);
      const T* gr = G.go.ptr<T>() + b * G.go.strides[0] + h * G.go.strides[1] + i * G.go.strides[2];
      const T* orow = G.o.ptr<T>() + b * G.o.strides[0] + h * G.o.strides[1] + i * G.o.strides[2];
      C acc = 0;
      for (int64_t d = 0; d < Dv; d++)
        acc += static_cast<C>(Tr<T>::ld(gr + d * G.go.strides[3])) * static_cast<C>(Tr<T>::ld(orow + d * G.o.strides[3]));
      delta[static_cast<size_t>(row)] = acc;
    }
  });
  auto lse_rows = [&](int64_t b, int64_t h, int64_t i0) {
    return G.lse.ptr<C>() + b * G.lse.strides[0] + h * G.lse.strides[1] + i0 * G.lse.strides[2];
  };
  auto delta_rows = [&](int64_t b, int64_t h, int64_t i0) { return delta.data() + (b * P.Hq + h) * P.Sq + i0; };
  // lse is contiguous (allocated by the op), so lse_rows(...)[r] addresses row i0 + r

  // dq of one query block over all the key blocks it attends to, written to G.dq; when dk_base and
  // dv_base are given (indexed by absolute key row), dk and dv accumulate there too.
  auto query_block = [&](Scratch<C>& sc, int64_t b, int64_t h, int64_t kh, int64_t qb, C* dk_base, C* dv_base) {
    const int64_t i0 = qb * kBlockQ;
    const int nq = static_cast<int>(std::min<int64_t>(kBlockQ, P.Sq - i0));
    int64_t blo, bhi;
    block_ranges(P, i0, nq, sc.lo, sc.hi, blo, bhi);
    sc.dq.assign(static_cast<size_t>(nq * D), C(0));
    if (blo < bhi) {
      int64_t ldq, lddo, ldk, ldv;
      const C* Q = rows_view<T, C>(G.q, b, h, i0, nq, D, sc.q, ldq);
      const C* dO = rows_view<T, C>(G.go, b, h, i0, nq, Dv, sc.go, lddo);
      for (int64_t j0 = blo; j0 < bhi; j0 += BK) {
        const int nk = static_cast<int>(std::min<int64_t>(BK, bhi - j0));
        const C* K = rows_view<T, C>(G.k, b, kh, j0, nk, D, sc.k, ldk);
        const C* V = rows_view<T, C>(G.v, b, kh, j0, nk, Dv, sc.v, ldv);
        backward_block<C>(P, b, h, i0, nq, sc.lo.data(), sc.hi.data(), Q, ldq, dO, lddo, lse_rows(b, h, i0),
                          delta_rows(b, h, i0), j0, nk, K, ldk, V, ldv, dk_base ? dk_base + j0 * D : nullptr,
                          dv_base ? dv_base + j0 * Dv : nullptr, sc.dq.data(), sc);
      }
    }
    store_rows<T, C>(G.dq, b, h, i0, nq, D, sc.dq.data());
  };

  const int nt = num_threads();
  const int64_t owners = P.B * P.Hkv;
  const bool per_kv_head = nt <= 1 || (owners >= nt && (owners % nt == 0 || owners >= 4 * nt));
  const int64_t cost_qk = kBlockQ * std::max<int64_t>(P.Sk, 1) * (2 * D + 2 * Dv);

  if (per_kv_head) {
    run_tasks<C>(owners, cost_qk * nqb * P.group, [&](int64_t t, Scratch<C>& sc) {
      const int64_t b = t / P.Hkv, kh = t % P.Hkv;
      sc.dk.assign(static_cast<size_t>(P.Sk * D), C(0));
      sc.dv.assign(static_cast<size_t>(P.Sk * Dv), C(0));
      for (int64_t g = 0; g < P.group; g++)
        for (int64_t qb = 0; qb < nqb; qb++) query_block(sc, b, kh * P.group + g, kh, qb, sc.dk.data(), sc.dv.data());
      for (int64_t j0 = 0; j0 < P.Sk; j0 += kBlockQ) {
        const int n = static_cast<int>(std::min<int64_t>(kBlockQ, P.Sk - j0));
        store_rows<T, C>(G.dk, b, kh, j0, n, D, sc.dk.data() + j0 * D);
        store_rows<T, C>(G.dv, b, kh, j0, n, Dv, sc.dv.data() + j0 * Dv);
      }
    });
    return;
  }

  // split schedule, pass 1: dk and dv per (batch, kv head, key block)
  run_tasks<C>(P.B * P.Hkv * nkb, cost_qk * nqb * P.group / std::max<int64_t>(nkb, 1) + 1,
               [&](int64_t t, Scratch<C>& sc) {
                 const int64_t kb = t % nkb, kh = (t / nkb) % P.Hkv, b = t / (nkb * P.Hkv);
                 const int64_t j0 = kb * BK;
                 const int nk = static_cast<int>(std::min<int64_t>(BK, P.Sk - j0));
                 sc.dk.assign(static_cast<size_t>(nk * D), C(0));
                 sc.dv.assign(static_cast<size_t>(nk * Dv), C(0));
                 int64_t ldk, ldv;
                 const C* K = rows_view<T, C>(G.k, b, kh, j0, nk, D, sc.k, ldk);
                 const C* V = rows_view<T, C>(G.v, b, kh, j0, nk, Dv, sc.v, ldv);
                 for (int64_t g = 0; g < P.group; g++) {
                   const int64_t h = kh * P.group + g;
                   for (int64_t qb = 0; qb < nqb; qb++) {
                     const int64_t i0 = qb * kBlockQ;
                     const int nq = static_cast<int>(std::min<int64_t>(kBlockQ, P.Sq - i0));
                     int64_t blo, bhi;
                     block_ranges(P, i0, nq, sc.lo, sc.hi, blo, bhi);
                     if (std::max(blo, j0) >= std::min(bhi, j0 + nk)) continue;
                     int64_t ldq, lddo;
                     const C* Q = rows_view<T, C>(G.q, b, h, i0, nq, D, sc.q, ldq);
                     const C* dO = rows_view<T, C>(G.go, b, h, i0, nq, Dv, sc.go, lddo);
                     backward_block<C>(P, b, h, i0, nq, sc.lo.data(), sc.hi.data(), Q, ldq, dO, lddo,
                                       lse_rows(b, h, i0), delta_rows(b, h, i0), j0, nk, K, ldk, V, ldv,
                                       sc.dk.data(), sc.dv.data(), nullptr, sc);
                   }
                 }
                 store_rows<T, C>(G.dk, b, kh, j0, nk, D, sc.dk.data());
                 store_rows<T, C>(G.dv, b, kh, j0, nk, Dv, sc.dv.data());
               });
  // pass 2: dq per (batch, query head, query block)
  run_tasks<C>(P.B * P.Hq * nqb, cost_qk, [&](int64_t t, Scratch<C>& sc) {
    const int64_t qb = nqb - 1 - t % nqb, h = (t / nqb) % P.Hq, b = t / (nqb * P.Hq);
    query_block(sc, b, h, h / P.group, qb, nullptr, nullptr);
  });
}

// ---- argument parsing shared by both entries -------------------------------------------------
// Reads: has_mask, [mask], has_cu, [cu], causal, scale, after q, k, v were read.
void read_options(Args& a, Problem& P, const TensorArg& q, const TensorArg& k, const TensorArg& v) {
  if (q.ndim != 4 || k.ndim != 4 || v.ndim != 4) throw_error("attention: q, k, v must be 4-D");
  P.B = q.shape[0];
  P.Hq = q.shape[1];
  P.Sq = q.shape[2];
  P.D = q.shape[3];
  P.Hkv = k.shape[1];
  P.Sk = k.shape[2];
  P.Dv = v.shape[3];
  if (k.dtype != q.dtype || v.dtype != q.dtype) throw_error("attention: q, k, v must share a dtype");
  if (P.Hkv == 0 || P.Hq % P.Hkv != 0) throw_error("attention: query heads must be a multiple of kv heads");
  P.group = P.Hq / P.Hkv;
  P.has_mask = a.i32() != 0;
  if (P.has_mask) {
    P.mask = a.tensor();
    if (P.mask.ndim != 4) throw_error("attention: the mask must be passed as a 4-D view");
    const DType md = P.mask.dtype;
    if (md != DType::Bool && md != DType::F32 && md != DType::F64 && md != DType::BF16 && md != DType::F16)
      throw_error("attention: the mask must be bool or floating-point");
  }
  if (a.i32() != 0) {
    TensorArg cu = a.tensor();
    const int64_t n = cu.numel();
    if (cu.ndim != 1 || n < 2) throw_error("attention: cuSeqlens must be 1-D with at least 2 entries");
    if (P.B != 1 || P.Sq != P.Sk) throw_error("attention: varlen needs B = 1 and Sq = Sk");
    P.seg_lo.resize(static_cast<size_t>(P.Sq));
    P.seg_hi.resize(static_cast<size_t>(P.Sq));
    auto at = [&](int64_t i) -> int64_t {
      if (cu.dtype == DType::I32) return cu.ptr<int32_t>()[i * cu.strides[0]];
      if (cu.dtype == DType::I64) return cu.ptr<int64_t>()[i * cu.strides[0]];
      throw_error("attention: cuSeqlens must be int32 or int64");
    };
    if (at(0) != 0 || at(n - 1) != P.Sq) throw_error("attention: cuSeqlens must start at 0 and end at the token count");
    for (int64_t s = 0; s + 1 < n; s++) {
      const int64_t lo = at(s), hi = at(s + 1);
      if (hi < lo) throw_error("attention: cuSeqlens must be non-decreasing");
      for (int64_t i = lo; i < hi; i++) {
        P.seg_lo[static_cast<size_t>(i)] = lo;
        P.seg_hi[static_cast<size_t>(i)] = hi;
      }
    }
  }
  P.causal = a.i32() != 0;
  P.scale = a.num();
  const int64_t width = std::max<int64_t>(std::max<int64_t>(P.D, P.Dv), 1);
  const int64_t bk = kSingleThreadGemm / (kBlockQ * width);
  P.bk = static_cast<int>(std::max<int64_t>(8, std::min<int64_t>(64, bk)));
}

template <typename T>
void forward_entry(const Problem& P, const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& o,
                   const TensorArg& lse) {
  forward<T>(P, q, k, v, o, lse);
}

template <typename T>
void backward_entry(const Problem& P, const Grads& G) {
  backward<T>(P, G);
}

}  // namespace

// attentionForward(out [B,Hq,Sq,Dv], lse [B,Hq,Sq], q, k, v, hasMask, [mask], hasCu, [cu], causal, scale)
MP_ENTRY(AttentionForwardK) {
  Args a;
  TensorArg o = a.tensor(), lse = a.tensor(), q = a.tensor(), k = a.tensor(), v = a.tensor();
  Problem P;
  read_options(a, P, q, k, v);
  if (o.dtype != q.dtype) throw_error("attention: output dtype must equal the input dtype");
  const DType lse_dt = q.dtype == DType::F64 ? DType::F64 : DType::F32;
  if (lse.dtype != lse_dt || lse.ndim != 3) throw_error("attention: bad logsumexp buffer");
  if (o.numel() == 0) return info.Env().Undefined();
  switch (q.dtype) {
    case DType::F32: forward_entry<float>(P, q, k, v, o, lse); break;
    case DType::F64: forward_entry<double>(P, q, k, v, o, lse); break;
    case DType::BF16: forward_entry<bf16>(P, q, k, v, o, lse); break;
    case DType::F16: forward_entry<f16>(P, q, k, v, o, lse); break;
    default: throw_error("attention: expected floating-point inputs");
  }
  return info.Env().Undefined();
}

// attentionBackward(dq, dk, dv, gradOut, q, k, v, out, lse, hasMask, [mask], hasCu, [cu], causal, scale)
MP_ENTRY(AttentionBackwardK) {
  Args a;
  Grads G;
  G.dq = a.tensor();
  G.dk = a.tensor();
  G.dv = a.tensor();
  G.go = a.tensor();
  G.q = a.tensor();
  G.k = a.tensor();
  G.v = a.tensor();
  G.o = a.tensor();
  G.lse = a.tensor();
  Problem P;
  read_options(a, P, G.q, G.k, G.v);
  for (const TensorArg* t : {&G.dq, &G.dk, &G.dv, &G.go, &G.o})
    if (t->dtype != G.q.dtype) throw_error("attention backward: gradients must share the input dtype");
  if (G.dq.numel() + G.dk.numel() + G.dv.numel() == 0) return info.Env().Undefined();
  switch (G.q.dtype) {
    case DType::F32: backward_entry<float>(P, G); break;
    case DType::F64: backward_entry<double>(P, G); break;
    case DType::BF16: backward_entry<bf16>(P, G); break;
    case DType::F16: backward_entry<f16>(P, G); break;
    default: throw_error("attention: expected floating-point inputs");
  }
  return info.Env().Undefined();
}

void register_attention(Napi::Env env, Napi::Object exports) {
  exports.Set("attentionForward", Napi::Function::New(env, AttentionForwardK));
  exports.Set("attentionBackward", Napi::Function::New(env, AttentionBackwardK));
}

}  // namespace mp
