// The per-shard kernels of the vocabulary-parallel cross-entropy (src/ops/cross-entropy-shard.ts):
// the row maximum over the real columns (read in place, padding skipped), one read of a rank's
// logits [rows, P] for the row statistics that the tensor-parallel group sums
// (target logit, Σ exp, Σ of the shifted logits), and one read-and-write for the gradient, which
// recomputes the softmax from the logits instead of keeping it from the forward. Columns at and
// after localReal are vocabulary padding: the forward skips them and the backward writes 0 there.
// Compute type: float for 16/32-bit logits, double for float64.
#include <limits>

#include "common.h"
#include "fast-math.h"

#ifdef _OPENMP
#define MP_SHARD_PRAGMA(x) _Pragma(#x)
#else
#define MP_SHARD_PRAGMA(x)
#endif

namespace mp {

namespace {

template <typename T> using Acc = typename Tr<T>::C;

struct ShardTargets {
  const char* data;
  bool i64;
  int64_t operator[](int64_t r) const {
    return i64 ? reinterpret_cast<const int64_t*>(data)[r] : reinterpret_cast<const int32_t*>(data)[r];
  }
};

struct Shape2 {
  int64_t rows, cols;
};

// Rows come from the target: with P = 0 the logits have no elements but the rows still exist.
Shape2 check_logits(const TensorArg& x, const TensorArg& target, const char* op) {
  if (x.dtype != DType::F32 && x.dtype != DType::F64 && x.dtype != DType::BF16 && x.dtype != DType::F16)
    throw_error(std::string(op) + ": logits must be floating point");
  if (!x.contiguous()) throw_error(std::string(op) + ": logits must be contiguous");
  if (target.dtype != DType::I64 && target.dtype != DType::I32)
    throw_error(std::string(op) + ": target must be int64 or int32");
  if (!target.contiguous()) throw_error(std::string(op) + ": target must be contiguous");
  const int64_t cols = x.ndim == 0 ? 1 : x.shape[x.ndim - 1], rows = target.numel();
  if (x.numel() != rows * cols)
    throw_error(std::string(op) + ": logits must have one row of " + std::to_string(cols) + " per target (" +
                std::to_string(rows) + " targets)");
  return {rows, cols};
}

// A per-row vector [rows] in the compute type of the logits.
void check_row_vector(const TensorArg& v, const TensorArg& x, int64_t rows, const char* op, const char* what) {
  const DType want = x.dtype == DType::F64 ? DType::F64 : DType::F32;
  if (v.dtype != want || !v.contiguous() || v.numel() != rows)
    throw_error(std::string(op) + ": " + what + " must be contiguous [" + std::to_string(rows) + "] in " +
                (want == DType::F64 ? "float64" : "float32"));
}

// Maximum of the real columns; a NaN wins (as the core amax), an empty range gives -inf.
template <typename T>
void shard_max(const TensorArg& out, const TensorArg& x, Shape2 s, int64_t real) {
  using C = Acc<T>;
  const T* xp = x.ptr<T>();
  C* op = out.ptr<C>();
  parallel_for(s.rows, real + 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      const T* xr = xp + r * s.cols;
      C m = -std::numeric_limits<C>::infinity();
      int nan = 0;
      MP_SHARD_PRAGMA(omp simd reduction(max : m) reduction(| : nan))
      for (int64_t j = 0; j < real; j++) {
        const C v = Tr<T>::ld(xr + j);
        nan |= v != v;
        m = v > m ? v : m;
      }
      op[r] = nan ? std::numeric_limits<C>::quiet_NaN() : m;
    }
  });
}

template <typename T>
void shard_fwd(const TensorArg& pred, const TensorArg& sum_exp, const TensorArg* shifted_sum, const TensorArg& x,
               const ShardTargets& tg, const TensorArg& row_max, Shape2 s, int64_t start, int64_t real) {
  using C = Acc<T>;
  const T* xp = x.ptr<T>();
  C* pp = pred.ptr<C>();
  C* ep = sum_exp.ptr<C>();
  C* qp = shifted_sum ? shifted_sum->ptr<C>() : nullptr;
  const C* maxp = row_max.ptr<C>();
  parallel_for(s.rows, real * 2 + 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      const T* xr = xp + r * s.cols;
      const C m = maxp[r];
      C se = 0;
      if (qp) {
        C sq = 0;
        MP_SHARD_PRAGMA(omp simd reduction(+ : se, sq))
        for (int64_t j = 0; j < real; j++) {
          const C d = Tr<T>::ld(xr + j) - m;
          se += exp_nonpos(d);
          sq += d;
        }
        qp[r] = sq;
      } else {
        MP_SHARD_PRAGMA(omp simd reduction(+ : se))
        for (int64_t j = 0; j < real; j++) se += exp_nonpos(Tr<T>::ld(xr + j) - m);
      }
      ep[r] = se;
      // a target on another rank, in the padding or outside the vocabulary contributes 0 here
      const int64_t t = tg[r] - start;
      pp[r] = t >= 0 && t < real ? Tr<T>::ld(xr + t) - m : C(0);
    }
  });
}

template <typename T>
void shard_bwd(const TensorArg& dx, const TensorArg& x, const ShardTargets& tg, const TensorArg& row_max,
               const TensorArg& lse, const TensorArg& grad, Shape2 s, int64_t start, int64_t real, double alpha,
               int64_t vocab) {
  using C = Acc<T>;
  const T* xp = x.ptr<T>();
  T* dp = dx.ptr<T>();
  const C* maxp = row_max.ptr<C>();
  const C* lp = lse.ptr<C>();
  const C* gp = grad.ptr<C>();
  const C off = static_cast<C>(alpha / static_cast<double>(vocab)), hit = static_cast<C>(1 - alpha);
  parallel_for(s.rows, s.cols * 2, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      const T* xr = xp + r * s.cols;
      T* dr = dp + r * s.cols;
      const C m = maxp[r], l = lp[r], g = gp[r];
      // (x - max) - lse <= 0 because lse >= 0 (the row's maximum alone adds exp(0) to Σ exp)
      for (int64_t j = 0; j < real; j++) Tr<T>::st(dr + j, (exp_nonpos((Tr<T>::ld(xr + j) - m) - l) - off) * g);
      for (int64_t j = real; j < s.cols; j++) Tr<T>::st(dr + j, C(0));
      const int64_t t = tg[r] - start;
      if (t >= 0 && t < real) Tr<T>::st(dr + t, (exp_nonpos((Tr<T>::ld(xr + t) - m) - l) - off - hit) * g);
    }
  });
}

void check_layout(int64_t real, int64_t cols, const char* op) {
  if (real < 0 || real > cols)
    throw_error(std::string(op) + ": localReal must be in [0, " + std::to_string(cols) + "], got " +
                std::to_string(real));
}

// crossEntropyShardMax(rowMax, logits, localReal); rows = rowMax's element count
MP_ENTRY(CrossEntropyShardMaxK) {
  const char* op = "crossEntropyShardMax";
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  const int64_t real = a.i64();
  if (x.dtype != DType::F32 && x.dtype != DType::F64 && x.dtype != DType::BF16 && x.dtype != DType::F16)
    throw_error(std::string(op) + ": logits must be floating point");
  if (!x.contiguous()) throw_error(std::string(op) + ": logits must be contiguous");
  const Shape2 s{out.numel(), x.ndim == 0 ? 1 : x.shape[x.ndim - 1]};
  if (x.numel() != s.rows * s.cols)
    throw_error(std::string(op) + ": rowMax must have one element per row of the logits");
  check_layout(real, s.cols, op);
  check_row_vector(out, x, s.rows, op, "rowMax");
  if (s.rows > 0) MP_DISPATCH_FLOAT(x.dtype, shard_max, out, x, s, real);
  return info.Env().Undefined();
}

// crossEntropyShardForward(predicted, sumExp, hasShiftedSum, shiftedSum?, logits, target, rowMax,
// start, localReal)
MP_ENTRY(CrossEntropyShardForwardK) {
  const char* op = "crossEntropyShard";
  Args a;
  TensorArg pred = a.tensor(), sum_exp = a.tensor();
  const bool has_shifted = a.i32() != 0;
  TensorArg shifted;
  if (has_shifted) shifted = a.tensor();
  TensorArg x = a.tensor(), target = a.tensor(), row_max = a.tensor();
  const int64_t start = a.i64(), real = a.i64();
  const Shape2 s = check_logits(x, target, op);
  check_layout(real, s.cols, op);
  check_row_vector(pred, x, s.rows, op, "predicted");
  check_row_vector(sum_exp, x, s.rows, op, "sumExp");
  if (has_shifted) check_row_vector(shifted, x, s.rows, op, "shiftedSum");
  check_row_vector(row_max, x, s.rows, op, "rowMax");
  const ShardTargets tg{target.data, target.dtype == DType::I64};
  if (s.rows > 0)
    MP_DISPATCH_FLOAT(x.dtype, shard_fwd, pred, sum_exp, has_shifted ? &shifted : nullptr, x, tg, row_max, s, start,
                      real);
  return info.Env().Undefined();
}

// crossEntropyShardBackward(dx, logits, target, rowMax, logSumExp, gradLoss, start, localReal,
// smoothing, vocabSize)
MP_ENTRY(CrossEntropyShardBackwardK) {
  const char* op = "crossEntropyShardBackward";
  Args a;
  TensorArg dx = a.tensor(), x = a.tensor(), target = a.tensor(), row_max = a.tensor(), lse = a.tensor(),
            grad = a.tensor();
  const int64_t start = a.i64(), real = a.i64();
  const double alpha = a.num();
  const int64_t vocab = a.i64();
  const Shape2 s = check_logits(x, target, op);
  check_layout(real, s.cols, op);
  if (dx.dtype != x.dtype || !dx.contiguous() || dx.numel() != x.numel())
    throw_error(std::string(op) + ": dx must be contiguous like the logits, in their dtype");
  check_row_vector(row_max, x, s.rows, op, "rowMax");
  check_row_vector(lse, x, s.rows, op, "logSumExp");
  check_row_vector(grad, x, s.rows, op, "gradLoss");
  if (vocab < 1) throw_error(std::string(op) + ": vocabSize must be at least 1");
  const ShardTargets tg{target.data, target.dtype == DType::I64};
  if (x.numel() > 0)
    MP_DISPATCH_FLOAT(x.dtype, shard_bwd, dx, x, tg, row_max, lse, grad, s, start, real, alpha, vocab);
  return info.Env().Undefined();
}

}  // namespace

void register_cross_entropy_shard(Napi::Env env, Napi::Object exports) {
  exports.Set("crossEntropyShardMax", Napi::Function::New(env, CrossEntropyShardMaxK));
  exports.Set("crossEntropyShardForward", Napi::Function::New(env, CrossEntropyShardForwardK));
  exports.Set("crossEntropyShardBackward", Napi::Function::New(env, CrossEntropyShardBackwardK));
}

}  // namespace mp
