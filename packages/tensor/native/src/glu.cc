// Gated activations (SwiGLU, GeGLU): out = act(gate) * up over the halves of the last dimension of
// x [rows, 2f] (gate first), and the backward dx = [g * up * act'(gate), g * act(gate)].
// act is silu, gelu (erf) or gelu's tanh approximation with the formulas of the unary ops in
// elementwise.cc (fast_silu / fast_silu_grad, and the gelu expressions), evaluated in the compute
// type (float for 16/32-bit floats, double for float64) in the order of the composition
// mul(act(gate), up) and its gradient, so that float32 results equal the composition's.
// Activation codes must match GATED_ACTIVATION_CODES in src/backend/abi.ts.
#include <algorithm>

#include "common.h"
#include "fast-math.h"

namespace mp {

namespace {

enum Act : int { kSwiglu = 0, kGeglu = 1, kGegluTanh = 2 };

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

template <int ACT, typename C>
__attribute__((always_inline)) inline C act_value(C x) {
  if constexpr (ACT == kSwiglu) {
    return fast_silu(x);
  } else if constexpr (ACT == kGeglu) {
    return C(0.5) * x * (C(1) + std::erf(x * C(kInvSqrt2)));
  } else {
    return C(0.5) * x * (C(1) + std::tanh(C(kSqrt2OverPi) * (x + C(0.044715) * x * x * x)));
  }
}

// act(x) and its derivative, sharing the transcendental terms.
template <int ACT, typename C>
__attribute__((always_inline)) inline void act_both(C x, C& value, C& grad) {
  if constexpr (ACT == kSwiglu) {
    value = fast_silu(x);
    grad = fast_silu_grad(x);
  } else if constexpr (ACT == kGeglu) {
    const C cdf = C(0.5) * (C(1) + std::erf(x * C(kInvSqrt2)));
    const C pdf = C(kInvSqrt2Pi) * std::exp(C(-0.5) * x * x);
    value = C(0.5) * x * (C(1) + std::erf(x * C(kInvSqrt2)));
    grad = cdf + x * pdf;
  } else {
    const C inner = C(kSqrt2OverPi) * (x + C(0.044715) * x * x * x);
    const C t = std::tanh(inner);
    const C dinner = C(kSqrt2OverPi) * (C(1) + C(3 * 0.044715) * x * x);
    value = C(0.5) * x * (C(1) + t);
    grad = C(0.5) * (C(1) + t) + C(0.5) * x * (C(1) - t * t) * dinner;
  }
}

// Runs body(row, col0, col1) over the rows * f elements split across the threads (a long row is
// split too), each call a run of columns [col0, col1) of one row.
template <typename F>
void for_runs(int64_t rows, int64_t f, int64_t cost, F body) {
  parallel_for(rows * f, cost, [&](int64_t b, int64_t e) {
    while (b < e) {
      const int64_t row = b / f, col = b - row * f;
      const int64_t n = std::min(f - col, e - b);
      body(row, col, col + n);
      b += n;
    }
  });
}

template <typename T, int ACT>
void forward_run(const TensorArg& out, const TensorArg& x, int64_t rows, int64_t f) {
  const T* xp = x.ptr<T>();
  T* op = out.ptr<T>();
  for_runs(rows, f, ACT == kSwiglu ? 4 : 16, [&](int64_t row, int64_t c0, int64_t c1) {
    const T* gate = xp + row * 2 * f;
    const T* up = gate + f;
    T* o = op + row * f;
    for (int64_t j = c0; j < c1; j++)
      Tr<T>::st(o + j, act_value<ACT>(Tr<T>::ld(gate + j)) * Tr<T>::ld(up + j));
  });
}

template <typename T, int ACT>
void backward_run(const TensorArg& dx, const TensorArg& g, const TensorArg& x, int64_t rows, int64_t f) {
  using C = typename Tr<T>::C;
  const T* xp = x.ptr<T>();
  const T* gp = g.ptr<T>();
  T* dp = dx.ptr<T>();
  for_runs(rows, f, ACT == kSwiglu ? 8 : 24, [&](int64_t row, int64_t c0, int64_t c1) {
    const T* gate = xp + row * 2 * f;
    const T* up = gate + f;
    const T* gr = gp + row * f;
    T* dgate = dp + row * 2 * f;
    T* dup = dgate + f;
    for (int64_t j = c0; j < c1; j++) {
      const C a = Tr<T>::ld(gate + j), u = Tr<T>::ld(up + j), gj = Tr<T>::ld(gr + j);
      C value, grad;
      act_both<ACT>(a, value, grad);
      // the composition's order: d act = g * up, then d gate = d act * act'(gate)
      Tr<T>::st(dgate + j, (gj * u) * grad);
      Tr<T>::st(dup + j, gj * value);
    }
  });
}

template <typename T>
void forward_dispatch(const TensorArg& out, const TensorArg& x, int act, int64_t rows, int64_t f) {
  switch (act) {
    case kSwiglu: forward_run<T, kSwiglu>(out, x, rows, f); break;
    case kGeglu: forward_run<T, kGeglu>(out, x, rows, f); break;
    default: forward_run<T, kGegluTanh>(out, x, rows, f); break;
  }
}

template <typename T>
void backward_dispatch(const TensorArg& dx, const TensorArg& g, const TensorArg& x, int act, int64_t rows,
                       int64_t f) {
  switch (act) {
    case kSwiglu: backward_run<T, kSwiglu>(dx, g, x, rows, f); break;
    case kGeglu: backward_run<T, kGeglu>(dx, g, x, rows, f); break;
    default: backward_run<T, kGegluTanh>(dx, g, x, rows, f); break;
  }
}

// f (half of x's last dimension) after checking the operands: x [..., 2f] and `half` [..., f]
// (out or g) contiguous with rows * f elements, one dtype.
int64_t check_halves(const TensorArg& x, const TensorArg& half, int act, const char* half_name) {
  if (act < kSwiglu || act > kGegluTanh) throw_error("gatedActivation: unknown activation " + std::to_string(act));
  if (x.ndim < 1 || x.shape[x.ndim - 1] % 2 != 0)
    throw_error("gatedActivation: x must be [..., 2f] with an even last dimension");
  const int64_t f = x.shape[x.ndim - 1] / 2;
  if (half.dtype != x.dtype) throw_error(std::string("gatedActivation: ") + half_name + " dtype must equal x's");
  if (half.ndim < 1 || half.shape[half.ndim - 1] != f || half.numel() * 2 != x.numel())
    throw_error(std::string("gatedActivation: ") + half_name + " must be [..., f] for x [..., 2f]");
  if (!x.contiguous() || !half.contiguous())
    throw_error(std::string("gatedActivation: x and ") + half_name + " must be contiguous");
  return f;
}

}  // namespace

// gatedActivationForward(out, x, act)
MP_ENTRY(GatedActivationForwardK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  int act = a.i32();
  const int64_t f = check_halves(x, out, act, "out");
  if (out.numel() == 0) return info.Env().Undefined();
  MP_DISPATCH_FLOAT(x.dtype, forward_dispatch, out, x, act, out.numel() / f, f);
  return info.Env().Undefined();
}

// gatedActivationBackward(dx, g, x, act)
MP_ENTRY(GatedActivationBackwardK) {
  Args a;
  TensorArg dx = a.tensor(), g = a.tensor(), x = a.tensor();
  int act = a.i32();
  const int64_t f = check_halves(x, g, act, "g");
  if (dx.dtype != x.dtype || dx.numel() != x.numel() || !dx.contiguous())
    throw_error("gatedActivation: dx must be contiguous like x, in x's dtype");
  if (g.numel() == 0) return info.Env().Undefined();
  MP_DISPATCH_FLOAT(x.dtype, backward_dispatch, dx, g, x, act, g.numel() / f, f);
  return info.Env().Undefined();
}

void register_glu(Napi::Env env, Napi::Object exports) {
  exports.Set("gatedActivationForward", Napi::Function::New(env, GatedActivationForwardK));
  exports.Set("gatedActivationBackward", Napi::Function::New(env, GatedActivationBackwardK));
}

}  // namespace mp
