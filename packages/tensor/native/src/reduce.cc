// Reductions along one dimension of a contiguous tensor viewed as [outer, R, inner]:
// sum, mean, max/min (values and indices), argmax/argmin, var (with a correction), logsumexp,
// p-norm and prod. Sums accumulate in double.
// Op codes must match REDUCE in src/backend/cpu.ts.
#include <limits>
#include <vector>

#include "common.h"

namespace mp {

enum Reduce : int { kSum = 0, kMean, kMax, kMin, kArgmax, kArgmin, kVar, kLogsumexp, kNorm, kProd };

// Reduces one [R] line with stride `inner`; writes value (and index for max/min).
template <typename T>
static void reduce_line(const T* x, int64_t R, int64_t stride, int op, double p, double& value, int64_t& index) {
  switch (op) {
    case kSum: case kMean: {
      double s = 0;
      for (int64_t r = 0; r < R; r++) s += Tr<T>::ld(x + r * stride);
      value = op == kMean ? s / static_cast<double>(R) : s;
      return;
    }
    case kProd: {
      double s = 1;
      for (int64_t r = 0; r < R; r++) s *= Tr<T>::ld(x + r * stride);
      value = s;
      return;
    }
    case kMax: case kArgmax: case kMin: case kArgmin: {
      bool is_max = op == kMax || op == kArgmax;
      double best = Tr<T>::ld(x);
      int64_t bi = 0;
      if (best != best) { value = best; index = 0; return; }
      for (int64_t r = 1; r < R; r++) {
        double v = Tr<T>::ld(x + r * stride);
        if (v != v) { best = v; bi = r; break; }  // NaN wins, as in torch
        if (is_max ? v > best : v < best) { best = v; bi = r; }
      }
      value = best;
      index = bi;
      return;
    }
    case kVar: {  // two-pass for accuracy; p = correction (1 = unbiased)
      double s = 0;
      for (int64_t r = 0; r < R; r++) s += Tr<T>::ld(x + r * stride);
      double mean = s / static_cast<double>(R), ss = 0;
      for (int64_t r = 0; r < R; r++) {
        double d = Tr<T>::ld(x + r * stride) - mean;
        ss += d * d;
      }
      double denom = static_cast<double>(R) - p;
      value = denom > 0 ? ss / denom : std::numeric_limits<double>::quiet_NaN();
      return;
    }
    case kLogsumexp: {
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t r = 0; r < R; r++) {
        double v = Tr<T>::ld(x + r * stride);
        if (v > m || v != v) m = v;
      }
      if (std::isinf(m) || m != m) { value = m; return; }
      double s = 0;
      for (int64_t r = 0; r < R; r++) s += std::exp(Tr<T>::ld(x + r * stride) - m);
      value = m + std::log(s);
      return;
    }
    case kNorm: {
      double s = 0;
      if (p == 2) {
        for (int64_t r = 0; r < R; r++) { double v = Tr<T>::ld(x + r * stride); s += v * v; }
        value = std::sqrt(s);
      } else if (p == 1) {
        for (int64_t r = 0; r < R; r++) s += std::fabs(static_cast<double>(Tr<T>::ld(x + r * stride)));
        value = s;
      } else if (std::isinf(p)) {
        for (int64_t r = 0; r < R; r++) s = std::fmax(s, std::fabs(static_cast<double>(Tr<T>::ld(x + r * stride))));
        value = s;
      } else {
        for (int64_t r = 0; r < R; r++) s += std::pow(std::fabs(static_cast<double>(Tr<T>::ld(x + r * stride))), p);
        value = std::pow(s, 1.0 / p);
      }
      return;
    }
  }
  throw_error("unknown reduction " + std::to_string(op));
}

template <typename T>
static void reduce_run(const TensorArg& x, const TensorArg& out, const TensorArg* idx, int64_t outer, int64_t R,
                       int64_t inner, int op, double p) {
  const T* xp = x.ptr<T>();
  bool write_value = op != kArgmax && op != kArgmin;
  // out has the input dtype for values; argmax/argmin write int64 into `out` directly.
  parallel_for(outer * inner, R, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; j++) {
      int64_t o = j / inner, i = j % inner;
      double v;
      int64_t k = 0;
      reduce_line<T>(xp + o * R * inner + i, R, inner, op, p, v, k);
      if (write_value) Tr<T>::st(out.ptr<T>() + j, static_cast<typename Tr<T>::C>(v));
      else out.ptr<int64_t>()[j] = k;
      if (idx) idx->ptr<int64_t>()[j] = k;
    }
  });
}

// Sum over R when inner > 1: accumulate rows so that memory is read in order.
template <typename T>
static void sum_rows(const TensorArg& x, const TensorArg& out, int64_t outer, int64_t R, int64_t inner, bool mean) {
  const T* xp = x.ptr<T>();
  parallel_for(outer, R * inner, [&](int64_t b, int64_t e) {
    std::vector<double> acc(inner);
    for (int64_t o = b; o < e; o++) {
      std::fill(acc.begin(), acc.end(), 0.0);
      const T* base = xp + o * R * inner;
      for (int64_t r = 0; r < R; r++)
        for (int64_t i = 0; i < inner; i++) acc[i] += Tr<T>::ld(base + r * inner + i);
      double scale = mean ? 1.0 / static_cast<double>(R) : 1.0;
      for (int64_t i = 0; i < inner; i++)
        Tr<T>::st(out.ptr<T>() + o * inner + i, static_cast<typename Tr<T>::C>(acc[i] * scale));
    }
  });
}

template <typename T>
static void reduce_dispatch(const TensorArg& x, const TensorArg& out, const TensorArg* idx, int64_t outer, int64_t R,
                            int64_t inner, int op, double p) {
  if ((op == kSum || op == kMean) && inner > 1) {
    sum_rows<T>(x, out, outer, R, inner, op == kMean);
  } else {
    reduce_run<T>(x, out, idx, outer, R, inner, op, p);
  }
}

// reduce(x, out, hasIndices, indices?, outer, R, inner, op, p): x contiguous.
MP_ENTRY(ReduceK) {
  Args a;
  TensorArg x = a.tensor(), out = a.tensor();
  bool has_idx = a.i32() != 0;
  TensorArg idx;
  if (has_idx) idx = a.tensor();
  int64_t outer = a.i64(), R = a.i64(), inner = a.i64();
  int op = a.i32();
  double p = a.num();
  if (R == 0) throw_error("reduce: cannot reduce over an empty dimension");
  MP_DISPATCH_ALL(x.dtype, reduce_dispatch, x, out, has_idx ? &idx : nullptr, outer, R, inner, op, p);
  return info.Env().Undefined();
}

// cumsum(x, out, outer, R, inner): contiguous, accumulates in double.
template <typename T>
static void cumsum_run(const TensorArg& x, const TensorArg& out, int64_t outer, int64_t R, int64_t inner) {
  parallel_for(outer * inner, R, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; j++) {
      int64_t o = j / inner, i = j % inner;
      const T* xp = x.ptr<T>() + o * R * inner + i;
      T* op = out.ptr<T>() + o * R * inner + i;
      double s = 0;
      for (int64_t r = 0; r < R; r++) {
        s += Tr<T>::ld(xp + r * inner);
        Tr<T>::st(op + r * inner, static_cast<typename Tr<T>::C>(s));
      }
    }
  });
}

MP_ENTRY(CumsumK) {
  Args a;
  TensorArg x = a.tensor(), out = a.tensor();
  int64_t outer = a.i64(), R = a.i64(), inner = a.i64();
  MP_DISPATCH_ALL(x.dtype, cumsum_run, x, out, outer, R, inner);
  return info.Env().Undefined();
}

void register_reduce(Napi::Env env, Napi::Object exports) {
  exports.Set("reduce", Napi::Function::New(env, ReduceK));
  exports.Set("cumsum", Napi::Function::New(env, CumsumK));
}

}  // namespace mp
