// Softmax family over contiguous rows of the last dimension: softmax / log-softmax and their
// backward, fused cross-entropy (log-sum-exp, loss and label smoothing in one pass per row,
// with a backward that never materialises the softmax) and NLL loss.
// Every kernel computes in float for 16/32-bit inputs and in double for float64.
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "fast-math.h"

// A reduction the compiler may reorder (and so vectorise); plain loops keep strict FP order.
#ifdef _OPENMP
#define MP_PRAGMA(x) _Pragma(#x)
#define MP_SIMD_SUM(var) MP_PRAGMA(omp simd reduction(+ : var))
#define MP_SIMD_MAX(var) MP_PRAGMA(omp simd reduction(max : var))
#define MP_SIMD_MAX_OR(m, flag) MP_PRAGMA(omp simd reduction(max : m) reduction(| : flag))
#else
#define MP_SIMD_SUM(var)
#define MP_SIMD_MAX(var)
#define MP_SIMD_MAX_OR(m, flag)
#endif

namespace mp {

namespace {

template <typename T> using Acc = typename Tr<T>::C;

int64_t last_dim(const TensorArg& t) { return t.ndim == 0 ? 1 : t.shape[t.ndim - 1]; }

void require_contiguous(const TensorArg& t, const char* what) {
  if (!t.contiguous()) throw_error(std::string(what) + " must be contiguous");
}

// Row maximum; NaN wins so that it propagates to the whole row, as in torch.
template <typename T>
Acc<T> row_max(const T* x, int64_t n) {
  using C = Acc<T>;
  C m = -std::numeric_limits<C>::infinity();
  int nan = 0;
  MP_SIMD_MAX_OR(m, nan)
  for (int64_t j = 0; j < n; j++) {
    C v = Tr<T>::ld(x + j);
    nan |= v != v;
    m = v > m ? v : m;
  }
  return nan ? std::numeric_limits<C>::quiet_NaN() : m;
}

// ---- softmax / log-softmax -----------------------------------------------------------------

template <typename T>
void softmax_fwd(const TensorArg& out, const TensorArg& x, bool log) {
  using C = Acc<T>;
  const int64_t n = last_dim(x), rows = n == 0 ? 0 : x.numel() / n;
  const T* xp = x.ptr<T>();
  T* op = out.ptr<T>();
  parallel_for(rows, n * 4, [&](int64_t b, int64_t e) {
    // float rows are staged in the output itself; 16-bit rows need a float buffer so that each
    // value is rounded once
    std::vector<C> scratch(std::is_same<T, C>::value ? 0 : n);
    for (int64_t r = b; r < e; r++) {
      const T* xr = xp + r * n;
      T* yr = op + r * n;
      C m = row_max(xr, n);
      if (m == -std::numeric_limits<C>::infinity()) {
        // fully masked row: softmax is 0 everywhere (log-softmax -inf) instead of NaN
        C fill = log ? -std::numeric_limits<C>::infinity() : C(0);
        for (int64_t j = 0; j < n; j++) Tr<T>::st(yr + j, fill);
        continue;
      }
      if (log) {
        C s = 0;
        MP_SIMD_SUM(s)
        for (int64_t j = 0; j < n; j++) s += exp_nonpos(Tr<T>::ld(xr + j) - m);
        C ls = std::log(s);  // (x - m) - log s: exact subtraction first for large logits
        for (int64_t j = 0; j < n; j++) Tr<T>::st(yr + j, (Tr<T>::ld(xr + j) - m) - ls);
        continue;
      }
      C* buf = std::is_same<T, C>::value ? reinterpret_cast<C*>(yr) : scratch.data();
      C s = 0;
      MP_SIMD_SUM(s)
      for (int64_t j = 0; j < n; j++) {
        C v = exp_nonpos(Tr<T>::ld(xr + j) - m);
        buf[j] = v;
        s += v;
      }
      C inv = C(1) / s;
      for (int64_t j = 0; j < n; j++) Tr<T>::st(yr + j, buf[j] * inv);
    }
  });
}

// softmax: dx = y * (g - sum(g * y)); log-softmax: dx = g - exp(y) * sum(g). A fully masked
// row has y = 0 (softmax) or -inf (log-softmax) everywhere and gets a zero gradient.
template <typename T>
void softmax_bwd(const TensorArg& dx, const TensorArg& y, const TensorArg& g, bool log) {
  using C = Acc<T>;
  const int64_t n = last_dim(y), rows = n == 0 ? 0 : y.numel() / n;
  const T* yp = y.ptr<T>();
  const T* gp = g.ptr<T>();
  T* dp = dx.ptr<T>();
  parallel_for(rows, n * 3, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      const T* yr = yp + r * n;
      const T* gr = gp + r * n;
      T* dr = dp + r * n;
      if (!log) {
        C dot = 0;
        MP_SIMD_SUM(dot)
        for (int64_t j = 0; j < n; j++) dot += Tr<T>::ld(gr + j) * Tr<T>::ld(yr + j);
        for (int64_t j = 0; j < n; j++) Tr<T>::st(dr + j, Tr<T>::ld(yr + j) * (Tr<T>::ld(gr + j) - dot));
        continue;
      }
      C s = 0, ymax = -std::numeric_limits<C>::infinity();
      MP_SIMD_SUM(s)
      for (int64_t j = 0; j < n; j++) s += Tr<T>::ld(gr + j);
      MP_SIMD_MAX(ymax)
      for (int64_t j = 0; j < n; j++) ymax = std::max(ymax, Tr<T>::ld(yr + j));
      if (ymax == -std::numeric_limits<C>::infinity()) {
        for (int64_t j = 0; j < n; j++) Tr<T>::st(dr + j, C(0));
        continue;
      }
      for (int64_t j = 0; j < n; j++) Tr<T>::st(dr + j, Tr<T>::ld(gr + j) - exp_nonpos(Tr<T>::ld(yr + j)) * s);
    }
  });
}

// softmaxForward(out, x, log): x and out contiguous, same dtype.
MP_ENTRY(SoftmaxForwardK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  bool log = a.i32() != 0;
  require_contiguous(x, "softmax: input");
  require_contiguous(out, "softmax: output");
  if (out.dtype != x.dtype) throw_error("softmax: output dtype must equal the input dtype");
  MP_DISPATCH_FLOAT(x.dtype, softmax_fwd, out, x, log);
  return info.Env().Undefined();
}

// softmaxBackward(dx, y, g, log): all contiguous with one dtype.
MP_ENTRY(SoftmaxBackwardK) {
  Args a;
  TensorArg dx = a.tensor(), y = a.tensor(), g = a.tensor();
  bool log = a.i32() != 0;
  require_contiguous(y, "softmaxBackward: output");
  require_contiguous(g, "softmaxBackward: gradient");
  require_contiguous(dx, "softmaxBackward: input gradient");
  if (dx.dtype != y.dtype || g.dtype != y.dtype) throw_error("softmaxBackward: dtypes must match");
  MP_DISPATCH_FLOAT(y.dtype, softmax_bwd, dx, y, g, log);
  return info.Env().Undefined();
}

// ---- cross-entropy and NLL -------------------------------------------------------------------

// Class-index targets, int32 or int64, read as int64.
struct Targets {
  const char* data;
  bool i64;
  int64_t operator[](int64_t r) const {
    return i64 ? reinterpret_cast<const int64_t*>(data)[r] : reinterpret_cast<const int32_t*>(data)[r];
  }
};

Targets targets_of(const TensorArg& t, const char* op) {
  if (t.dtype != DType::I64 && t.dtype != DType::I32) throw_error(std::string(op) + ": target must be int64 or int32");
  require_contiguous(t, op);
  return {t.data, t.dtype == DType::I64};
}

// First row whose target is neither ignoreIndex nor in [0, C), or -1; counts the others. A
// serial scan before the parallel pass keeps the reported row deterministic.
int64_t check_targets(const Targets& t, int64_t rows, int64_t C, int64_t ignore, int64_t& count) {
  count = 0;
  for (int64_t r = 0; r < rows; r++) {
    int64_t v = t[r];
    if (v == ignore) continue;
    if (v < 0 || v >= C) return r;
    count++;
  }
  return -1;
}

// Per-row losses go to `loss` (when given) and are summed per thread chunk in double; the
// chunk sums are added in order, so the total is deterministic for a fixed thread count.
template <typename F>
double sum_rows_chunked(int64_t rows, int64_t cost, F row_loss) {
  int nt = num_threads();
  int64_t chunks = rows * cost >= kParallelGrain ? std::min<int64_t>(nt, rows) : 1;
  if (chunks < 1) chunks = 1;
  std::vector<double> partial(chunks, 0.0);
  parallel_for(chunks, rows / chunks * cost + 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; c++) {
      double s = 0;
      for (int64_t r = rows * c / chunks; r < rows * (c + 1) / chunks; r++) s += row_loss(r);
      partial[c] = s;
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

Napi::Value loss_result(Napi::Env env, int64_t count, double total, int64_t bad) {
  Napi::Array res = Napi::Array::New(env, 3);
  res.Set(uint32_t(0), Napi::Number::New(env, static_cast<double>(count)));
  res.Set(uint32_t(1), Napi::Number::New(env, total));
  res.Set(uint32_t(2), Napi::Number::New(env, static_cast<double>(bad)));
  return res;
}

// loss_r = lse_r - (1 - eps) * x[r, t_r] - eps * mean_c x[r, c]: the smoothed cross-entropy,
// written with log p = x - lse so that one max pass and one exp pass per row suffice.
template <typename T>
void ce_fwd(const TensorArg& x, const Targets& tg, const TensorArg& lse, const TensorArg* loss, int64_t ignore,
            double eps, double& total) {
  using C = Acc<T>;
  const int64_t n = last_dim(x), rows = x.numel() / n;
  const T* xp = x.ptr<T>();
  C* lp = lse.ptr<C>();
  const C ceps = static_cast<C>(eps);
  auto row_loss = [&](int64_t r) -> double {
    const int64_t t = tg[r];
    C value = 0;
    if (t == ignore) {
      lp[r] = 0;  // padding rows cost no exp pass; the backward zeroes them without reading lse
    } else {
      const T* xr = xp + r * n;
      C m = row_max(xr, n);
      C s = 0;
      MP_SIMD_SUM(s)
      for (int64_t j = 0; j < n; j++) s += exp_nonpos(Tr<T>::ld(xr + j) - m);
      C l = m + std::log(s);
      lp[r] = l;
      value = l - (C(1) - ceps) * Tr<T>::ld(xr + t);
      if (eps != 0) {  // skipped otherwise: a -inf logit would turn 0 * sum into NaN
        C sx = 0;
        MP_SIMD_SUM(sx)
        for (int64_t j = 0; j < n; j++) sx += Tr<T>::ld(xr + j);
        value -= ceps * sx / static_cast<C>(n);
      }
    }
    if (loss) Tr<T>::st(loss->ptr<T>() + r, value);
    return static_cast<double>(value);
  };
  total = sum_rows_chunked(rows, n * 3, row_loss);
}

// Reads the upstream gradient of row r: one value per row, or one for all (reduced losses).
template <typename T>
struct RowGrad {
  const T* p;
  int64_t stride;
  Acc<T> operator()(int64_t r) const { return Tr<T>::ld(p + r * stride); }
};

// dx[r, c] = (softmax[r, c] - eps / C - (1 - eps) [c == t_r]) * g_r * scale, 0 on ignored rows.
template <typename T>
void ce_bwd(const TensorArg& dx, const TensorArg& x, const Targets& tg, const TensorArg& lse, const TensorArg& gout,
            double scale, int64_t ignore, double eps) {
  using C = Acc<T>;
  const int64_t n = last_dim(x), rows = x.numel() / n;
  const T* xp = x.ptr<T>();
  T* dp = dx.ptr<T>();
  const C* lp = lse.ptr<C>();
  RowGrad<T> grad{gout.ptr<T>(), gout.numel() == 1 ? 0 : 1};
  const C off = static_cast<C>(eps / static_cast<double>(n)), hit = static_cast<C>(1 - eps);
  parallel_for(rows, n * 2, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      const T* xr = xp + r * n;
      T* dr = dp + r * n;
      int64_t t = tg[r];
      if (t == ignore || t < 0 || t >= n) {  // the forward rejected out-of-range targets
        for (int64_t j = 0; j < n; j++) Tr<T>::st(dr + j, C(0));
        continue;
      }
      const C gs = grad(r) * static_cast<C>(scale), l = lp[r], o = off;
      for (int64_t j = 0; j < n; j++) {
        C p = exp_nonpos(Tr<T>::ld(xr + j) - l);
        Tr<T>::st(dr + j, (p - o) * gs);
      }
      Tr<T>::st(dr + t, (exp_nonpos(Tr<T>::ld(xr + t) - l) - off - hit) * gs);
    }
  });
}

void check_lse(const TensorArg& x, const TensorArg& lse, const char* op) {
  DType want = x.dtype == DType::F64 ? DType::F64 : DType::F32;
  if (lse.dtype != want) throw_error(std::string(op) + ": logsumexp buffer must be float32 (float64 for float64 input)");
  require_contiguous(lse, op);
}

// crossEntropyForward(logits, target, lse, hasLoss, loss?, ignoreIndex, smoothing)
//   -> [non-ignored count, sum of row losses, first bad row or -1]
// logits contiguous [rows, C]; target [rows]; lse [rows] float32 (float64 for float64 logits);
// loss [rows] in the logits dtype. Ignored rows get loss 0 and lse 0.
MP_ENTRY(CrossEntropyForwardK) {
  Args a;
  TensorArg x = a.tensor(), target = a.tensor(), lse = a.tensor();
  bool has_loss = a.i32() != 0;
  TensorArg loss;
  if (has_loss) loss = a.tensor();
  int64_t ignore = a.i64();
  double eps = a.num();
  require_contiguous(x, "crossEntropy: input");
  check_lse(x, lse, "crossEntropy");
  if (has_loss && (loss.dtype != x.dtype || !loss.contiguous())) throw_error("crossEntropy: loss must be contiguous with the input dtype");
  Targets tg = targets_of(target, "crossEntropy");
  const int64_t n = last_dim(x), rows = n == 0 ? 0 : x.numel() / n;
  int64_t count = 0;
  int64_t bad = check_targets(tg, rows, n, ignore, count);
  double total = 0;
  if (bad < 0 && rows > 0) MP_DISPATCH_FLOAT(x.dtype, ce_fwd, x, tg, lse, has_loss ? &loss : nullptr, ignore, eps, total);
  return loss_result(info.Env(), count, total, bad);
}

// crossEntropyBackward(dx, logits, target, lse, gout, scale, ignoreIndex, smoothing)
MP_ENTRY(CrossEntropyBackwardK) {
  Args a;
  TensorArg dx = a.tensor(), x = a.tensor(), target = a.tensor(), lse = a.tensor(), gout = a.tensor();
  double scale = a.num();
  int64_t ignore = a.i64();
  double eps = a.num();
  require_contiguous(x, "crossEntropyBackward: input");
  require_contiguous(dx, "crossEntropyBackward: input gradient");
  require_contiguous(gout, "crossEntropyBackward: gradient");
  check_lse(x, lse, "crossEntropyBackward");
  if (dx.dtype != x.dtype || gout.dtype != x.dtype) throw_error("crossEntropyBackward: dtypes must match");
  Targets tg = targets_of(target, "crossEntropyBackward");
  if (x.numel() > 0) MP_DISPATCH_FLOAT(x.dtype, ce_bwd, dx, x, tg, lse, gout, scale, ignore, eps);
  return info.Env().Undefined();
}

template <typename T>
void nll_fwd(const TensorArg& x, const Targets& tg, const TensorArg* loss, int64_t ignore, double& total) {
  const int64_t n = last_dim(x), rows = x.numel() / n;
  const T* xp = x.ptr<T>();
  total = sum_rows_chunked(rows, 1, [&](int64_t r) -> double {
    int64_t t = tg[r];
    double v = t == ignore ? 0.0 : -static_cast<double>(Tr<T>::ld(xp + r * n + t));
    if (loss) Tr<T>::st(loss->ptr<T>() + r, static_cast<Acc<T>>(v));
    return v;
  });
}

template <typename T>
void nll_bwd(const TensorArg& dx, const Targets& tg, const TensorArg& gout, double scale, int64_t ignore) {
  using C = Acc<T>;
  const int64_t n = last_dim(dx), rows = dx.numel() / n;
  T* dp = dx.ptr<T>();
  RowGrad<T> grad{gout.ptr<T>(), gout.numel() == 1 ? 0 : 1};
  parallel_for(rows, n, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      T* dr = dp + r * n;
      for (int64_t j = 0; j < n; j++) Tr<T>::st(dr + j, C(0));
      int64_t t = tg[r];
      if (t != ignore && t >= 0 && t < n) Tr<T>::st(dr + t, -grad(r) * static_cast<C>(scale));
    }
  });
}

// nllLossForward(logProbs, target, hasLoss, loss?, ignoreIndex) -> [count, total, bad row]
// loss (when given) has the dtype of logProbs.
MP_ENTRY(NllLossForwardK) {
  Args a;
  TensorArg x = a.tensor(), target = a.tensor();
  bool has_loss = a.i32() != 0;
  TensorArg loss;
  if (has_loss) loss = a.tensor();
  int64_t ignore = a.i64();
  require_contiguous(x, "nllLoss: input");
  if (has_loss && loss.dtype != x.dtype) throw_error("nllLoss: loss dtype must equal the input dtype");
  Targets tg = targets_of(target, "nllLoss");
  const int64_t n = last_dim(x), rows = n == 0 ? 0 : x.numel() / n;
  int64_t count = 0;
  int64_t bad = check_targets(tg, rows, n, ignore, count);
  double total = 0;
  if (bad < 0 && rows > 0) MP_DISPATCH_FLOAT(x.dtype, nll_fwd, x, tg, has_loss ? &loss : nullptr, ignore, total);
  return loss_result(info.Env(), count, total, bad);
}

// nllLossBackward(dx, target, gout, scale, ignoreIndex)
MP_ENTRY(NllLossBackwardK) {
  Args a;
  TensorArg dx = a.tensor(), target = a.tensor(), gout = a.tensor();
  double scale = a.num();
  int64_t ignore = a.i64();
  require_contiguous(dx, "nllLossBackward: input gradient");
  require_contiguous(gout, "nllLossBackward: gradient");
  if (gout.dtype != dx.dtype) throw_error("nllLossBackward: dtypes must match");
  Targets tg = targets_of(target, "nllLossBackward");
  if (dx.numel() > 0) MP_DISPATCH_FLOAT(dx.dtype, nll_bwd, dx, tg, gout, scale, ignore);
  return info.Env().Undefined();
}

}  // namespace

void register_softmax(Napi::Env env, Napi::Object exports) {
  exports.Set("softmaxForward", Napi::Function::New(env, SoftmaxForwardK));
  exports.Set("softmaxBackward", Napi::Function::New(env, SoftmaxBackwardK));
  exports.Set("crossEntropyForward", Napi::Function::New(env, CrossEntropyForwardK));
  exports.Set("crossEntropyBackward", Napi::Function::New(env, CrossEntropyBackwardK));
  exports.Set("nllLossForward", Napi::Function::New(env, NllLossForwardK));
  exports.Set("nllLossBackward", Napi::Function::New(env, NllLossBackwardK));
}

}  // namespace mp
