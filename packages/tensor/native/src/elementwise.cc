// Elementwise kernels: unary math, binary arithmetic and comparisons (tensor-tensor with
// broadcasting, and tensor-scalar), the fused activation backward helpers, and `where`.
// Op codes must match UNARY / BINARY in src/backend/cpu.ts.
#include <type_traits>

#include "common.h"
#include "fast-math.h"

namespace mp {

enum Unary : int {
  kNeg = 0, kExp, kLog, kSqrt, kRsqrt, kAbs, kTanh, kSigmoid, kSilu, kGelu, kGeluTanh, kRelu, kSin, kCos,
  kSquare, kReciprocal, kSign, kLog1p, kExpm1, kFloor, kCeil, kRound, kClamp, kLogicalNot, kIsNan, kIsInf,
};

enum Binary : int {
  kAdd = 0, kSub, kMul, kDiv, kPow, kMaximum, kMinimum, kEq, kNe, kLt, kLe, kGt, kGe, kAnd, kOr,
  kSiluBackward, kGeluBackward, kGeluTanhBackward, kSigmoidBackward, kTanhBackward, kReluBackward, kAtan2,
};

// Out of line so that the inlined op switches stay small.
[[noreturn]] __attribute__((noinline)) static void unknown_op(const char* kind, int op) {
  throw_error(std::string("unknown ") + kind + " op " + std::to_string(op));
}

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

// always_inline: with a constant op the switch folds away and the calling loop vectorises
template <typename C>
__attribute__((always_inline)) inline C unary_op(int op, C x, C p0, C p1) {
  switch (op) {
    case kNeg: return -x;
    case kExp: return std::exp(x);
    case kLog: return std::log(x);
    case kSqrt: return std::sqrt(x);
    case kRsqrt: return C(1) / std::sqrt(x);
    case kAbs: return std::fabs(x);
    case kTanh: return std::tanh(x);
    case kSigmoid: return fast_sigmoid(x);
    case kSilu: return fast_silu(x);
    case kGelu: return C(0.5) * x * (C(1) + std::erf(x * C(kInvSqrt2)));
    case kGeluTanh: return C(0.5) * x * (C(1) + std::tanh(C(kSqrt2OverPi) * (x + C(0.044715) * x * x * x)));
    case kRelu: return x > C(0) ? x : C(0);
    case kSin: return std::sin(x);
    case kCos: return std::cos(x);
    case kSquare: return x * x;
    case kReciprocal: return C(1) / x;
    case kSign: return x > C(0) ? C(1) : (x < C(0) ? C(-1) : C(0));
    case kLog1p: return std::log1p(x);
    case kExpm1: return std::expm1(x);
    case kFloor: return std::floor(x);
    case kCeil: return std::ceil(x);
    case kRound: return std::nearbyint(x);
    case kClamp: {  // NaN bounds mean "no bound"
      C y = x;
      if (!std::isnan(p0) && y < p0) y = p0;
      if (!std::isnan(p1) && y > p1) y = p1;
      return y;
    }
    case kLogicalNot: return x == C(0) ? C(1) : C(0);
    case kIsNan: return std::isnan(x) ? C(1) : C(0);
    case kIsInf: return std::isinf(x) ? C(1) : C(0);
  }
  unknown_op("unary", op);
}

template <typename C>
__attribute__((always_inline)) inline C binary_op(int op, C a, C b) {
  switch (op) {
    case kAdd: return a + b;
    case kSub: return a - b;
    case kMul: return a * b;
    case kDiv: return a / b;
    case kPow: return std::pow(a, b);
    case kMaximum: return (a != a || a > b) ? a : b;  // NaN propagates like torch.maximum
    case kMinimum: return (a != a || a < b) ? a : b;
    case kEq: return a == b;
    case kNe: return a != b;
    case kLt: return a < b;
    case kLe: return a <= b;
    case kGt: return a > b;
    case kGe: return a >= b;
    case kAnd: return (a != C(0)) && (b != C(0));
    case kOr: return (a != C(0)) || (b != C(0));
    case kSiluBackward: return b * fast_silu_grad(a);  // a = x, b = grad
    case kGeluBackward: {
      C cdf = C(0.5) * (C(1) + std::erf(a * C(kInvSqrt2)));
      C pdf = C(kInvSqrt2Pi) * std::exp(C(-0.5) * a * a);
      return b * (cdf + a * pdf);
    }
    case kGeluTanhBackward: {
      C inner = C(kSqrt2OverPi) * (a + C(0.044715) * a * a * a);
      C t = std::tanh(inner);
      C dinner = C(kSqrt2OverPi) * (C(1) + C(3 * 0.044715) * a * a);
      return b * (C(0.5) * (C(1) + t) + C(0.5) * a * (C(1) - t * t) * dinner);
    }
    case kSigmoidBackward: return b * a * (C(1) - a);  // a = sigmoid output
    case kTanhBackward: return b * (C(1) - a * a);     // a = tanh output
    case kReluBackward: return a > C(0) ? b : C(0);
    case kAtan2: return std::atan2(a, b);
  }
  unknown_op("binary", op);
}

// The op switch sits inside the run loop; the compiler hoists it out (unswitching) for the
// contiguous case, which keeps the simple ops vectorised.
template <typename TI, typename TO>
static void unary_run(const TensorArg& out, const TensorArg& x, int op, double p0, double p1) {
  using C = typename Tr<TI>::C;
  int64_t so[kMaxDims], sx[kMaxDims];
  broadcast_byte_strides(out, out.ndim, out.shape, so);
  broadcast_byte_strides(x, out.ndim, out.shape, sx);
  const int64_t* st[2] = {so, sx};
  StridedLoop<2> loop(out.ndim, out.shape, st);
  char* base[2] = {out.data, x.data};
  C c0 = static_cast<C>(p0), c1 = static_cast<C>(p1);
  int64_t cost = (op == kNeg || op == kAbs || op == kRelu || op == kSquare || op == kClamp) ? 1 : 8;
  loop.run(base, cost, [=](char* const* p, int64_t n, const int64_t* s) {
    TO* o = reinterpret_cast<TO*>(p[0]);
    const TI* i = reinterpret_cast<const TI*>(p[1]);
    int64_t a = s[0] / static_cast<int64_t>(sizeof(TO)), b = s[1] / static_cast<int64_t>(sizeof(TI));
    if (a == 1 && b == 1) {
      // the hot ops get a loop with the op fixed at compile time, which the compiler vectorises
      auto fixed = [&](auto tag) {
        constexpr int OP = decltype(tag)::value;
        for (int64_t k = 0; k < n; k++)
          Tr<TO>::st(o + k, static_cast<typename Tr<TO>::C>(unary_op<C>(OP, Tr<TI>::ld(i + k), c0, c1)));
      };
      switch (op) {
        case kSilu: fixed(std::integral_constant<int, kSilu>{}); break;
        case kSigmoid: fixed(std::integral_constant<int, kSigmoid>{}); break;
        case kNeg: fixed(std::integral_constant<int, kNeg>{}); break;
        case kRelu: fixed(std::integral_constant<int, kRelu>{}); break;
        case kSquare: fixed(std::integral_constant<int, kSquare>{}); break;
        case kRsqrt: fixed(std::integral_constant<int, kRsqrt>{}); break;
        default:
          for (int64_t k = 0; k < n; k++)
            Tr<TO>::st(o + k, static_cast<typename Tr<TO>::C>(unary_op<C>(op, Tr<TI>::ld(i + k), c0, c1)));
      }
    } else {
      for (int64_t k = 0; k < n; k++)
        Tr<TO>::st(o + k * a, static_cast<typename Tr<TO>::C>(unary_op<C>(op, Tr<TI>::ld(i + k * b), c0, c1)));
    }
  });
}

template <typename TI>
static void unary_dispatch(const TensorArg& out, const TensorArg& x, int op, double p0, double p1) {
  if (out.dtype == DType::Bool) unary_run<TI, boolean>(out, x, op, p0, p1);
  else if (out.dtype == x.dtype) unary_run<TI, TI>(out, x, op, p0, p1);
  else throw_error("unary: output dtype must equal the input dtype or be bool");
}

// unary(out, x, op, p0, p1)
MP_ENTRY(UnaryK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  int op = a.i32();
  double p0 = a.num(), p1 = a.num();
  MP_DISPATCH_ALL(x.dtype, unary_dispatch, out, x, op, p0, p1);
  return info.Env().Undefined();
}

template <typename TI, typename TO>
static void binary_run(const TensorArg& out, const TensorArg& x, const TensorArg& y, int op, double alpha) {
  using C = typename Tr<TI>::C;
  int64_t so[kMaxDims], sx[kMaxDims], sy[kMaxDims];
  broadcast_byte_strides(out, out.ndim, out.shape, so);
  broadcast_byte_strides(x, out.ndim, out.shape, sx);
  broadcast_byte_strides(y, out.ndim, out.shape, sy);
  const int64_t* st[3] = {so, sx, sy};
  StridedLoop<3> loop(out.ndim, out.shape, st);
  char* base[3] = {out.data, x.data, y.data};
  C al = static_cast<C>(alpha);
  bool scaled = (op == kAdd || op == kSub) && alpha != 1.0;
  int64_t cost = op >= kSiluBackward || op == kPow ? 8 : 1;
  loop.run(base, cost, [=](char* const* p, int64_t n, const int64_t* s) {
    TO* o = reinterpret_cast<TO*>(p[0]);
    const TI* u = reinterpret_cast<const TI*>(p[1]);
    const TI* v = reinterpret_cast<const TI*>(p[2]);
    int64_t a = s[0] / static_cast<int64_t>(sizeof(TO)), b = s[1] / static_cast<int64_t>(sizeof(TI)),
            c = s[2] / static_cast<int64_t>(sizeof(TI));
    if (a == 1 && b == 1 && c == 1 && !scaled) {
      auto fixed = [&](auto tag) {
        constexpr int OP = decltype(tag)::value;
        for (int64_t k = 0; k < n; k++)
          Tr<TO>::st(o + k, static_cast<typename Tr<TO>::C>(binary_op<C>(OP, Tr<TI>::ld(u + k), Tr<TI>::ld(v + k))));
      };
      switch (op) {
        case kAdd: fixed(std::integral_constant<int, kAdd>{}); break;
        case kSub: fixed(std::integral_constant<int, kSub>{}); break;
        case kMul: fixed(std::integral_constant<int, kMul>{}); break;
        case kDiv: fixed(std::integral_constant<int, kDiv>{}); break;
        case kSiluBackward: fixed(std::integral_constant<int, kSiluBackward>{}); break;
        default:
          for (int64_t k = 0; k < n; k++)
            Tr<TO>::st(o + k,
                       static_cast<typename Tr<TO>::C>(binary_op<C>(op, Tr<TI>::ld(u + k), Tr<TI>::ld(v + k))));
      }
    } else if (a == 1 && b == 1 && c == 0 && !scaled) {
      C w = Tr<TI>::ld(v);
      for (int64_t k = 0; k < n; k++)
        Tr<TO>::st(o + k, static_cast<typename Tr<TO>::C>(binary_op<C>(op, Tr<TI>::ld(u + k), w)));
    } else {
      for (int64_t k = 0; k < n; k++) {
        C rhs = Tr<TI>::ld(v + k * c);
        if (scaled) rhs *= al;
        Tr<TO>::st(o + k * a, static_cast<typename Tr<TO>::C>(binary_op<C>(op, Tr<TI>::ld(u + k * b), rhs)));
      }
    }
  });
}

template <typename TI>
static void binary_dispatch(const TensorArg& out, const TensorArg& x, const TensorArg& y, int op, double alpha) {
  if (out.dtype == DType::Bool && x.dtype != DType::Bool) binary_run<TI, boolean>(out, x, y, op, alpha);
  else if (out.dtype == x.dtype) binary_run<TI, TI>(out, x, y, op, alpha);
  else throw_error("binary: output dtype must equal the input dtype or be bool");
}

// binary(out, x, y, op, alpha): out = x OP (alpha * y) for add/sub, x OP y otherwise.
MP_ENTRY(BinaryK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor(), y = a.tensor();
  int op = a.i32();
  double alpha = a.num();
  if (x.dtype != y.dtype) throw_error("binary: operands must share a dtype");
  MP_DISPATCH_ALL(x.dtype, binary_dispatch, out, x, y, op, alpha);
  return info.Env().Undefined();
}

template <typename TI, typename TO>
static void scalar_run(const TensorArg& out, const TensorArg& x, double scalar, int op, bool reverse) {
  using C = typename Tr<TI>::C;
  int64_t so[kMaxDims], sx[kMaxDims];
  broadcast_byte_strides(out, out.ndim, out.shape, so);
  broadcast_byte_strides(x, out.ndim, out.shape, sx);
  const int64_t* st[2] = {so, sx};
  StridedLoop<2> loop(out.ndim, out.shape, st);
  char* base[2] = {out.data, x.data};
  C sc = static_cast<C>(scalar);
  int64_t cost = op == kPow ? 8 : 1;
  loop.run(base, cost, [=](char* const* p, int64_t n, const int64_t* s) {
    TO* o = reinterpret_cast<TO*>(p[0]);
    const TI* u = reinterpret_cast<const TI*>(p[1]);
    int64_t a = s[0] / static_cast<int64_t>(sizeof(TO)), b = s[1] / static_cast<int64_t>(sizeof(TI));
    if (reverse) {
      for (int64_t k = 0; k < n; k++)
        Tr<TO>::st(o + k * a, static_cast<typename Tr<TO>::C>(binary_op<C>(op, sc, Tr<TI>::ld(u + k * b))));
    } else if (a == 1 && b == 1) {
      for (int64_t k = 0; k < n; k++)
        Tr<TO>::st(o + k, static_cast<typename Tr<TO>::C>(binary_op<C>(op, Tr<TI>::ld(u + k), sc)));
    } else {
      for (int64_t k = 0; k < n; k++)
        Tr<TO>::st(o + k * a, static_cast<typename Tr<TO>::C>(binary_op<C>(op, Tr<TI>::ld(u + k * b), sc)));
    }
  });
}

template <typename TI>
static void scalar_dispatch(const TensorArg& out, const TensorArg& x, double s, int op, bool reverse) {
  if (out.dtype == DType::Bool && x.dtype != DType::Bool) scalar_run<TI, boolean>(out, x, s, op, reverse);
  else if (out.dtype == x.dtype) scalar_run<TI, TI>(out, x, s, op, reverse);
  else throw_error("binaryScalar: output dtype must equal the input dtype or be bool");
}

// binaryScalar(out, x, scalar, op, reverse): out = x OP s, or s OP x when reverse.
MP_ENTRY(BinaryScalarK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  double s = a.num();
  int op = a.i32();
  bool reverse = a.i32() != 0;
  MP_DISPATCH_ALL(x.dtype, scalar_dispatch, out, x, s, op, reverse);
  return info.Env().Undefined();
}

template <typename T>
static void where_run(const TensorArg& out, const TensorArg& cond, const TensorArg& x, const TensorArg& y) {
  int64_t so[kMaxDims], sc[kMaxDims], sx[kMaxDims], sy[kMaxDims];
  broadcast_byte_strides(out, out.ndim, out.shape, so);
  broadcast_byte_strides(cond, out.ndim, out.shape, sc);
  broadcast_byte_strides(x, out.ndim, out.shape, sx);
  broadcast_byte_strides(y, out.ndim, out.shape, sy);
  const int64_t* st[4] = {so, sc, sx, sy};
  StridedLoop<4> loop(out.ndim, out.shape, st);
  char* base[4] = {out.data, cond.data, x.data, y.data};
  loop.run(base, 1, [](char* const* p, int64_t n, const int64_t* s) {
    T* o = reinterpret_cast<T*>(p[0]);
    const uint8_t* c = reinterpret_cast<const uint8_t*>(p[1]);
    const T* u = reinterpret_cast<const T*>(p[2]);
    const T* v = reinterpret_cast<const T*>(p[3]);
    int64_t a = s[0] / static_cast<int64_t>(sizeof(T)), b = s[1], d = s[2] / static_cast<int64_t>(sizeof(T)),
            e = s[3] / static_cast<int64_t>(sizeof(T));
    for (int64_t k = 0; k < n; k++) o[k * a] = c[k * b] ? u[k * d] : v[k * e];
  });
}

// where(out, cond(bool), x, y)
MP_ENTRY(WhereK) {
  Args a;
  TensorArg out = a.tensor(), cond = a.tensor(), x = a.tensor(), y = a.tensor();
  if (cond.dtype != DType::Bool && cond.dtype != DType::U8) throw_error("where: condition must be bool");
  MP_DISPATCH_ALL(x.dtype, where_run, out, cond, x, y);
  return info.Env().Undefined();
}

void register_elementwise(Napi::Env env, Napi::Object exports) {
  exports.Set("unary", Napi::Function::New(env, UnaryK));
  exports.Set("binary", Napi::Function::New(env, BinaryK));
  exports.Set("binaryScalar", Napi::Function::New(env, BinaryScalarK));
  exports.Set("where", Napi::Function::New(env, WhereK));
}

}  // namespace mp
