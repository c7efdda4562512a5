// Normalisation over the trailing N elements of contiguous rows: LayerNorm (centred) and
// RMSNorm, with the weight and bias applied in the same pass. Statistics and arithmetic are in
// float for 16/32-bit inputs (double for float64); the per-row mean and rstd are saved in that
// precision for the backward, which also produces the weight and bias gradients.
#include <algorithm>
#include <vector>

#include "common.h"

#ifdef _OPENMP
#define MP_PRAGMA(x) _Pragma(#x)
#define MP_SIMD_SUM(var) MP_PRAGMA(omp simd reduction(+ : var))
#define MP_SIMD_SUM2(a, b) MP_PRAGMA(omp simd reduction(+ : a, b))
#else
#define MP_SIMD_SUM(var)
#define MP_SIMD_SUM2(a, b)
#endif

namespace mp {

namespace {

template <typename T> using Acc = typename Tr<T>::C;

// Optional operands arrive as a flag followed by the tensor.
struct Maybe {
  bool present = false;
  TensorArg t;
};
Maybe maybe_tensor(Args& a) {
  Maybe m;
  m.present = a.i32() != 0;
  if (m.present) m.t = a.tensor();
  return m;
}

void check(bool ok, const std::string& msg) {
  if (!ok) throw_error(msg);
}

void check_param(const Maybe& p, const TensorArg& x, int64_t n, const char* what) {
  if (!p.present) return;
  check(p.t.dtype == x.dtype, std::string("norm: ") + what + " dtype must equal the input dtype");
  check(p.t.contiguous() && p.t.numel() == n, std::string("norm: ") + what + " must be contiguous with N elements");
}

void check_stat(const Maybe& s, const TensorArg& x, int64_t rows, const char* what) {
  if (!s.present) return;
  DType want = x.dtype == DType::F64 ? DType::F64 : DType::F32;
  check(s.t.dtype == want, std::string("norm: ") + what + " must be float32 (float64 for float64 input)");
  check(s.t.contiguous() && s.t.numel() == rows, std::string("norm: ") + what + " must be contiguous with one value per row");
}

// y = (x - mean) * rstd * w + b per row; RMSNorm has no mean (Center = false) and no bias.
template <typename T, bool Center>
void norm_fwd(const TensorArg& y, const TensorArg& x, const Maybe& w, const Maybe& bias, const Maybe& mean_out,
              const TensorArg& rstd_out, int64_t n, double eps) {
  using C = Acc<T>;
  const int64_t rows = x.numel() / n;
  const T* xp = x.ptr<T>();
  T* yp = y.ptr<T>();
  const T* wp = w.present ? w.t.ptr<T>() : nullptr;
  const T* bp = bias.present ? bias.t.ptr<T>() : nullptr;
  C* mp_ = mean_out.present ? mean_out.t.ptr<C>() : nullptr;
  C* rp = rstd_out.ptr<C>();
  const C inv_n = C(1) / static_cast<C>(n), ceps = static_cast<C>(eps);
  parallel_for(rows, n * 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      const T* xr = xp + r * n;
      T* yr = yp + r * n;
      C mu = 0;
      if (Center) {
        C s = 0;
        MP_SIMD_SUM(s)
        for (int64_t j = 0; j < n; j++) s += Tr<T>::ld(xr + j);
        mu = s * inv_n;
      }
      // the second moment about the mean (two passes: no cancellation for large offsets)
      C ss = 0;
      MP_SIMD_SUM(ss)
      for (int64_t j = 0; j < n; j++) {
        C d = Tr<T>::ld(xr + j) - mu;
        ss += d * d;
      }
      C rstd = C(1) / std::sqrt(ss * inv_n + ceps);
      if (mp_) mp_[r] = mu;
      rp[r] = rstd;
      if (wp && bp) {
        for (int64_t j = 0; j < n; j++)
          Tr<T>::st(yr + j, (Tr<T>::ld(xr + j) - mu) * rstd * Tr<T>::ld(wp + j) + Tr<T>::ld(bp + j));
      } else if (wp) {
        for (int64_t j = 0; j < n; j++) Tr<T>::st(yr + j, (Tr<T>::ld(xr + j) - mu) * rstd * Tr<T>::ld(wp + j));
      } else if (bp) {
        for (int64_t j = 0; j < n; j++) Tr<T>::st(yr + j, (Tr<T>::ld(xr + j) - mu) * rstd + Tr<T>::ld(bp + j));
      } else {
        for (int64_t j = 0; j < n; j++) Tr<T>::st(yr + j, (Tr<T>::ld(xr + j) - mu) * rstd);
      }
    }
  });
}

// With xhat = (x - mean) * rstd and dy = g * w:
//   dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat))   (RMSNorm: without the mean(dy) term)
//   dw = sum over rows of g * xhat,  db = sum over rows of g.
// dw and db accumulate per row chunk (one chunk per thread) in float / double and the chunks
// are added in order at the end, so the result does not depend on thread scheduling.
template <typename T, bool Center>
void norm_bwd(const TensorArg& dx, const TensorArg& g, const TensorArg& x, const Maybe& w, const Maybe& mean,
              const TensorArg& rstd, const Maybe& dw, const Maybe& db, int64_t n) {
  using C = Acc<T>;
  const int64_t rows = x.numel() / n;
  const T* xp = x.ptr<T>();
  const T* gp = g.ptr<T>();
  T* dxp = dx.ptr<T>();
  const T* wp = w.present ? w.t.ptr<T>() : nullptr;
  const C* mp_ = mean.present ? mean.t.ptr<C>() : nullptr;
  const C* rp = rstd.ptr<C>();
  const bool want_dw = dw.present, want_db = db.present;
  const C inv_n = C(1) / static_cast<C>(n);

  int64_t chunks = rows * n >= kParallelGrain ? std::min<int64_t>(num_threads(), rows) : 1;
  if (chunks < 1) chunks = 1;
  std::vector<C> pw(want_dw ? chunks * n : 0, C(0)), pb(want_db ? chunks * n : 0, C(0));

  parallel_for(chunks, rows / chunks * n * 6 + 1, [&](int64_t cb, int64_t ce) {
    std::vector<C> dy(n);
    for (int64_t c = cb; c < ce; c++) {
      C* accw = want_dw ? pw.data() + c * n : nullptr;
      C* accb = want_db ? pb.data() + c * n : nullptr;
      for (int64_t r = rows * c / chunks; r < rows * (c + 1) / chunks; r++) {
        const T* xr = xp + r * n;
        const T* gr = gp + r * n;
        T* dr = dxp + r * n;
        const C mu = mp_ ? mp_[r] : C(0), rs = rp[r];
        C sdy = 0, sdyx = 0;
        if (wp) {
          MP_SIMD_SUM2(sdy, sdyx)
          for (int64_t j = 0; j < n; j++) {
            C d = Tr<T>::ld(gr + j) * Tr<T>::ld(wp + j);
            dy[j] = d;
            sdy += d;
            sdyx += d * (Tr<T>::ld(xr + j) - mu);
          }
        } else {
          MP_SIMD_SUM2(sdy, sdyx)
          for (int64_t j = 0; j < n; j++) {
            C d = Tr<T>::ld(gr + j);
            dy[j] = d;
            sdy += d;
            sdyx += d * (Tr<T>::ld(xr + j) - mu);
          }
        }
        // mean(dy * xhat) = rstd * mean(dy * (x - mu))
        const C k1 = Center ? sdy * inv_n : C(0), k2 = sdyx * rs * inv_n;
        for (int64_t j = 0; j < n; j++) {
          C xhat = (Tr<T>::ld(xr + j) - mu) * rs;
          Tr<T>::st(dr + j, rs * (dy[j] - k1 - xhat * k2));
        }
        if (accw) {
          for (int64_t j = 0; j < n; j++) accw[j] += Tr<T>::ld(gr + j) * ((Tr<T>::ld(xr + j) - mu) * rs);
        }
        if (accb) {
          for (int64_t j = 0; j < n; j++) accb[j] += Tr<T>::ld(gr + j);
        }
      }
    }
  });

  auto finish = [&](const std::vector<C>& part, const TensorArg& out) {
    T* op = out.ptr<T>();
    for (int64_t j = 0; j < n; j++) {
      C s = 0;
      for (int64_t c = 0; c < chunks; c++) s += part[c * n + j];
      Tr<T>::st(op + j, s);
    }
  };
  if (want_dw) finish(pw, dw.t);
  if (want_db) finish(pb, db.t);
}

template <typename T>
void fwd_dispatch(const TensorArg& y, const TensorArg& x, const Maybe& w, const Maybe& b, const Maybe& mean,
                  const TensorArg& rstd, int64_t n, double eps, bool center) {
  if (center) norm_fwd<T, true>(y, x, w, b, mean, rstd, n, eps);
  else norm_fwd<T, false>(y, x, w, b, mean, rstd, n, eps);
}

template <typename T>
void bwd_dispatch(const TensorArg& dx, const TensorArg& g, const TensorArg& x, const Maybe& w, const Maybe& mean,
                  const TensorArg& rstd, const Maybe& dw, const Maybe& db, int64_t n, bool center) {
  if (center) norm_bwd<T, true>(dx, g, x, w, mean, rstd, dw, db, n);
  else norm_bwd<T, false>(dx, g, x, w, mean, rstd, dw, db, n);
}

// normForward(y, x, hasW, w?, hasB, b?, hasMean, mean?, rstd, N, eps, center)
// x and y contiguous [rows, N]; w, b [N] with the input dtype; mean, rstd [rows] float32
// (float64 for float64 input). center = 1 for LayerNorm, 0 for RMSNorm.
MP_ENTRY(NormForwardK) {
  Args a;
  TensorArg y = a.tensor(), x = a.tensor();
  Maybe w = maybe_tensor(a), b = maybe_tensor(a), mean = maybe_tensor(a);
  TensorArg rstd = a.tensor();
  int64_t n = a.i64();
  double eps = a.num();
  bool center = a.i32() != 0;
  check(n > 0 && x.numel() % n == 0, "normForward: N must divide the number of elements");
  check(x.contiguous() && y.contiguous(), "normForward: input and output must be contiguous");
  check(y.dtype == x.dtype, "normForward: output dtype must equal the input dtype");
  int64_t rows = x.numel() / n;
  check_param(w, x, n, "weight");
  check_param(b, x, n, "bias");
  check_stat(mean, x, rows, "mean");
  check_stat(Maybe{true, rstd}, x, rows, "rstd");
  if (rows > 0) MP_DISPATCH_FLOAT(x.dtype, fwd_dispatch, y, x, w, b, mean, rstd, n, eps, center);
  return info.Env().Undefined();
}

// normBackward(dx, g, x, hasW, w?, hasMean, mean?, rstd, hasDw, dw?, hasDb, db?, N, center)
MP_ENTRY(NormBackwardK) {
  Args a;
  TensorArg dx = a.tensor(), g = a.tensor(), x = a.tensor();
  Maybe w = maybe_tensor(a), mean = maybe_tensor(a);
  TensorArg rstd = a.tensor();
  Maybe dw = maybe_tensor(a), db = maybe_tensor(a);
  int64_t n = a.i64();
  bool center = a.i32() != 0;
  check(n > 0 && x.numel() % n == 0, "normBackward: N must divide the number of elements");
  check(x.contiguous() && g.contiguous() && dx.contiguous(), "normBackward: x, g and dx must be contiguous");
  check(g.dtype == x.dtype && dx.dtype == x.dtype, "normBackward: dtypes must match");
  check(g.numel() == x.numel() && dx.numel() == x.numel(), "normBackward: g and dx must match x");
  int64_t rows = x.numel() / n;
  check_param(w, x, n, "weight");
  check_param(dw, x, n, "weight gradient");
  check_param(db, x, n, "bias gradient");
  check_stat(mean, x, rows, "mean");
  check_stat(Maybe{true, rstd}, x, rows, "rstd");
  MP_DISPATCH_FLOAT(x.dtype, bwd_dispatch, dx, g, x, w, mean, rstd, dw, db, n, center);
  return info.Env().Undefined();
}

}  // namespace

void register_norm(Napi::Env env, Napi::Object exports) {
  exports.Set("normForward", Napi::Function::New(env, NormForwardK));
  exports.Set("normBackward", Napi::Function::New(env, NormBackwardK));
}

}  // namespace mp
