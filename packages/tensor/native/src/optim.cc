// Optimizer kernels: fused AdamW and SGD updates (one pass over param, grad and state), the
// per-tensor pieces of gradient-norm clipping, and the unscale + non-finite check of mixed
// precision. All tensors are contiguous (the TypeScript side makes copies when they are not).
//
// Arithmetic follows the order of torch.optim's single-tensor implementations so that fp32
// results agree with PyTorch to rounding: every scalar coefficient arrives as a double computed
// in JavaScript (as Python would) and is cast once to the compute type, as ATen does with a
// Python scalar.
#include <algorithm>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace mp {

// Optimizer state is float32 for every parameter dtype except float64, whose state (and math)
// stays double.
template <typename P> struct StateOf { using T = float; };
template <> struct StateOf<double> { using T = double; };

static void check_same_numel(const char* op, const TensorArg& a, const TensorArg& b) {
  if (a.numel() != b.numel()) throw_error(std::string(op) + ": tensors have different sizes");
}

static void check_contiguous(const char* op, const TensorArg& t) {
  if (!t.contiguous()) throw_error(std::string(op) + ": tensors must be contiguous");
}

template <typename P>
static void check_state(const char* op, const TensorArg& s) {
  DType want = std::is_same<P, double>::value ? DType::F64 : DType::F32;
  if (s.dtype != want) throw_error(std::string(op) + ": state dtype must be float32 (float64 for float64 params)");
}

// ---- AdamW -----------------------------------------------------------------------------------
struct AdamWScalars {
  double decay;        // 1 - lr * weight_decay
  double beta1, one_minus_beta1, beta2, one_minus_beta2;
  double bc2_sqrt;     // sqrt(1 - beta2^step)
  double eps;
  double neg_step;     // -lr / (1 - beta1^step)
  double grad_scale;   // the gradient is read as round_G(g * grad_scale) (1: as is)
};

// Q: the dtype of the parameter copy (void: none), written from the updated parameter.
template <typename P, typename G, typename Q>
static void adamw_run(const TensorArg& p, const TensorArg& g, const TensorArg& m, const TensorArg& v,
                      const TensorArg* copy, const AdamWScalars& h) {
  using C = typename Tr<P>::C;
  using S = typename StateOf<P>::T;
  check_state<P>("adamw", m);
  check_state<P>("adamw", v);
  P* pp = p.ptr<P>();
  const G* gp = g.ptr<G>();
  S* mp = m.ptr<S>();
  S* vp = v.ptr<S>();
  Q* qp = copy ? copy->ptr<Q>() : nullptr;
  const C decay = static_cast<C>(h.decay), b1 = static_cast<C>(h.beta1), omb1 = static_cast<C>(h.one_minus_beta1),
          b2 = static_cast<C>(h.beta2), omb2 = static_cast<C>(h.one_minus_beta2),
          bc2 = static_cast<C>(h.bc2_sqrt), eps = static_cast<C>(h.eps), ns = static_cast<C>(h.neg_step);
  using GC = typename Tr<G>::C;
  const bool scaled = h.grad_scale != 1.0;
  const GC gs = static_cast<GC>(h.grad_scale);
  parallel_for(p.numel(), 16, [=](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      C x = Tr<P>::ld(pp + i) * decay;
      GC graw = Tr<G>::ld(gp + i);
      if (scaled) {
        // as binaryScalar's in-place multiply: in the gradient's compute type, rounded to its dtype
        G r;
        Tr<G>::st(&r, graw * gs);
        graw = Tr<G>::ld(&r);
      }
      C gr = static_cast<C>(graw);
      C mi = static_cast<C>(mp[i]) * b1 + omb1 * gr;
      C vi = static_cast<C>(vp[i]) * b2 + omb2 * gr * gr;
      C denom = std::sqrt(vi) / bc2 + eps;
      mp[i] = static_cast<S>(mi);
      vp[i] = static_cast<S>(vi);
      Tr<P>::st(pp + i, x + ns * mi / denom);
      if constexpr (!std::is_void<Q>::value) Tr<Q>::st(qp + i, Tr<P>::ld(pp + i));
    }
  });
}

template <typename P, typename G>
static void adamw_copy_dispatch(const TensorArg& p, const TensorArg& g, const TensorArg& m, const TensorArg& v,
                                const TensorArg* copy, const AdamWScalars& h) {
  if (!copy) return adamw_run<P, G, void>(p, g, m, v, copy, h);
  if constexpr (std::is_same<P, float>::value) {
    if (copy->dtype == DType::BF16) return adamw_run<P, G, bf16>(p, g, m, v, copy, h);
    if (copy->dtype == DType::F16) return adamw_run<P, G, f16>(p, g, m, v, copy, h);
  }
  throw_error("adamw: a parameter copy is written from a float32 parameter into bfloat16 or float16");
}

template <typename P>
static void adamw_dispatch(const TensorArg& p, const TensorArg& g, const TensorArg& m, const TensorArg& v,
                           const TensorArg* copy, const AdamWScalars& h) {
  if (g.dtype == p.dtype) adamw_copy_dispatch<P, P>(p, g, m, v, copy, h);
  else if (g.dtype == DType::F32) adamw_copy_dispatch<P, float>(p, g, m, v, copy, h);
  else throw_error("adamw: grad dtype must be the param dtype or float32");
}

// adamwStep(param, grad, expAvg, expAvgSq, decay, beta1, 1-beta1, beta2, 1-beta2, bc2Sqrt, eps, negStep,
// gradScale, hasCopy, [copy])
MP_ENTRY(AdamWStepK) {
  Args a;
  TensorArg p = a.tensor(), g = a.tensor(), m = a.tensor(), v = a.tensor();
  AdamWScalars h;
  h.decay = a.num();
  h.beta1 = a.num();
  h.one_minus_beta1 = a.num();
  h.beta2 = a.num();
  h.one_minus_beta2 = a.num();
  h.bc2_sqrt = a.num();
  h.eps = a.num();
  h.neg_step = a.num();
  h.grad_scale = a.num();
  const bool has_copy = a.num() != 0;
  TensorArg copy;
  if (has_copy) copy = a.tensor();
  for (const TensorArg* t : {&p, &g, &m, &v}) {
    check_contiguous("adamw", *t);
    check_same_numel("adamw", p, *t);
  }
  if (has_copy) {
    check_contiguous("adamw", copy);
    check_same_numel("adamw", p, copy);
  }
  MP_DISPATCH_FLOAT(p.dtype, adamw_dispatch, p, g, m, v, has_copy ? &copy : nullptr, h);
  return info.Env().Undefined();
}

// ---- SGD -------------------------------------------------------------------------------------
struct SgdScalars {
  double neg_lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, first;  // first: the momentum buffer starts as the (decayed) gradient
};

template <typename P, typename G>
static void sgd_run(const TensorArg& p, const TensorArg& g, const TensorArg* buf, const SgdScalars& h) {
  using C = typename Tr<P>::C;
  using S = typename StateOf<P>::T;
  if (buf) check_state<P>("sgd", *buf);
  P* pp = p.ptr<P>();
  const G* gp = g.ptr<G>();
  S* bp = buf ? buf->ptr<S>() : nullptr;
  const C nlr = static_cast<C>(h.neg_lr), mom = static_cast<C>(h.momentum),
          omd = static_cast<C>(h.one_minus_dampening), wd = static_cast<C>(h.weight_decay);
  const bool decay = h.weight_decay != 0, nesterov = h.nesterov, first = h.first;
  parallel_for(p.numel(), 8, [=](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      C x = Tr<P>::ld(pp + i);
      C d = static_cast<C>(Tr<G>::ld(gp + i));
      if (decay) d = d + wd * x;
      if (bp) {
        C bi = first ? d : static_cast<C>(bp[i]) * mom + omd * d;
        bp[i] = static_cast<S>(bi);
        d = nesterov ? d + mom * bi : bi;
      }
      Tr<P>::st(pp + i, x + nlr * d);
    }
  });
}

template <typename P>
static void sgd_dispatch(const TensorArg& p, const TensorArg& g, const TensorArg* buf, const SgdScalars& h) {
  if (g.dtype == p.dtype) sgd_run<P, P>(p, g, buf, h);
  else if (g.dtype == DType::F32) sgd_run<P, float>(p, g, buf, h);
  else throw_error("sgd: grad dtype must be the param dtype or float32");
}

// sgdStep(param, grad, hasBuf, [buf], -lr, momentum, 1-dampening, weightDecay, nesterov, first)
MP_ENTRY(SgdStepK) {
  Args a;
  TensorArg p = a.tensor(), g = a.tensor();
  bool has_buf = a.i32() != 0;
  TensorArg buf;
  if (has_buf) buf = a.tensor();
  SgdScalars h;
  h.neg_lr = a.num();
  h.momentum = a.num();
  h.one_minus_dampening = a.num();
  h.weight_decay = a.num();
  h.nesterov = a.i32() != 0;
  h.first = a.i32() != 0;
  check_contiguous("sgd", p);
  check_contiguous("sgd", g);
  check_same_numel("sgd", p, g);
  if (has_buf) {
    check_contiguous("sgd", buf);
    check_same_numel("sgd", p, buf);
  }
  MP_DISPATCH_FLOAT(p.dtype, sgd_dispatch, p, g, has_buf ? &buf : nullptr, h);
  return info.Env().Undefined();
}

// ---- gradient norms --------------------------------------------------------------------------
// Partial sums are taken over fixed-size blocks and added in block order, so the result does not
// depend on the thread count (a resumed run reproduces the same clipping bit for bit).
constexpr int64_t kNormBlock = 16384;

template <typename T>
static double norm_block(const T* x, int64_t n, double p) {
  double s = 0;
  if (std::isinf(p)) {
    for (int64_t i = 0; i < n; i++) {
      double v = std::fabs(static_cast<double>(Tr<T>::ld(x + i)));
      if (v != v) return v;  // NaN propagates, as in torch.max
      if (v > s) s = v;
    }
  } else if (p == 2) {
    for (int64_t i = 0; i < n; i++) {
      double v = Tr<T>::ld(x + i);
      s += v * v;
    }
  } else if (p == 1) {
    for (int64_t i = 0; i < n; i++) s += std::fabs(static_cast<double>(Tr<T>::ld(x + i)));
  } else {
    for (int64_t i = 0; i < n; i++) s += std::pow(std::fabs(static_cast<double>(Tr<T>::ld(x + i))), p);
  }
  return s;
}

template <typename T>
static void norm_run(const TensorArg& t, double p, double& out) {
  const T* x = t.ptr<T>();
  int64_t n = t.numel(), blocks = (n + kNormBlock - 1) / kNormBlock;
  std::vector<double> part(static_cast<size_t>(blocks), 0.0);
  parallel_for(blocks, kNormBlock, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; k++) {
      int64_t lo = k * kNormBlock, hi = std::min(n, lo + kNormBlock);
      part[static_cast<size_t>(k)] = norm_block<T>(x + lo, hi - lo, p);
    }
  });
  double s = 0;
  for (double v : part) {
    if (std::isinf(p)) s = (v != v || s != s) ? std::numeric_limits<double>::quiet_NaN() : std::max(s, v);
    else s += v;
  }
  out = s;
}

// normPowerSum(t, p) -> sum(|x|^p) for finite p, max(|x|) for p = inf (NaN propagates). The
// caller combines tensors and takes the 1/p power.
MP_ENTRY(NormPowerSumK) {
  Args a;
  TensorArg t = a.tensor();
  double p = a.num();
  check_contiguous("normPowerSum", t);
  double out = 0;
  MP_DISPATCH_FLOAT(t.dtype, norm_run, t, p, out);
  return Napi::Number::New(info.Env(), out);
}

// ---- unscale and check ----------------------------------------------------------------------
template <typename T>
static void unscale_run(const TensorArg& t, double inv_scale, bool& found) {
  using C = typename Tr<T>::C;
  T* x = t.ptr<T>();
  int64_t n = t.numel(), blocks = (n + kNormBlock - 1) / kNormBlock;
  std::vector<char> bad(static_cast<size_t>(blocks), 0);
  const C s = static_cast<C>(inv_scale);
  const bool scale = inv_scale != 1.0;
  parallel_for(blocks, kNormBlock, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; k++) {
      int64_t lo = k * kNormBlock, hi = std::min(n, lo + kNormBlock);
      char f = 0;
      for (int64_t i = lo; i < hi; i++) {
        C v = Tr<T>::ld(x + i);
        if (!std::isfinite(v)) f = 1;
        if (scale) Tr<T>::st(x + i, v * s);
      }
      bad[static_cast<size_t>(k)] = f;
    }
  });
  found = false;
  for (char f : bad) found = found || f != 0;
}

// unscaleCheck(t, invScale) -> 1 when t holds inf or NaN (checked before scaling), else 0; t is
// multiplied by invScale in place unless it is 1.
MP_ENTRY(UnscaleCheckK) {
  Args a;
  TensorArg t = a.tensor();
  double inv = a.num();
  check_contiguous("unscaleCheck", t);
  bool found = false;
  MP_DISPATCH_FLOAT(t.dtype, unscale_run, t, inv, found);
  return Napi::Number::New(info.Env(), found ? 1 : 0);
}

void register_optim(Napi::Env env, Napi::Object exports) {
  exports.Set("adamwStep", Napi::Function::New(env, AdamWStepK));
  exports.Set("sgdStep", Napi::Function::New(env, SgdStepK));
  exports.Set("normPowerSum", Napi::Function::New(env, NormPowerSumK));
  exports.Set("unscaleCheck", Napi::Function::New(env, UnscaleCheckK));
}

}  // namespace mp
