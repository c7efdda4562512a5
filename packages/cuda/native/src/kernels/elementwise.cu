// Elementwise kernels (see elementwise.h). One grid-stride loop per operation over the output's
// elements; operands are addressed through byte strides (0 on broadcast dimensions), with the
// dimensions coalesced on the host so that contiguous tensors take one division per element. The
// op switch is a template parameter, so each kernel instance is straight-line code.
#include <cmath>

#include "elementwise.h"

namespace mpc {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

// float and double overloads of the math the ops use
MP_HD float m_exp(float x) { return expf(x); }
MP_HD double m_exp(double x) { return exp(x); }
MP_HD float m_log(float x) { return logf(x); }
MP_HD double m_log(double x) { return log(x); }
MP_HD float m_sqrt(float x) { return sqrtf(x); }
MP_HD double m_sqrt(double x) { return sqrt(x); }
MP_HD float m_tanh(float x) { return tanhf(x); }
MP_HD double m_tanh(double x) { return tanh(x); }
MP_HD float m_erf(float x) { return erff(x); }
MP_HD double m_erf(double x) { return erf(x); }
MP_HD float m_sin(float x) { return sinf(x); }
MP_HD double m_sin(double x) { return sin(x); }
MP_HD float m_cos(float x) { return cosf(x); }
MP_HD double m_cos(double x) { return cos(x); }
MP_HD float m_log1p(float x) { return log1pf(x); }
MP_HD double m_log1p(double x) { return log1p(x); }
MP_HD float m_expm1(float x) { return expm1f(x); }
MP_HD double m_expm1(double x) { return expm1(x); }
MP_HD float m_floor(float x) { return floorf(x); }
MP_HD double m_floor(double x) { return floor(x); }
MP_HD float m_ceil(float x) { return ceilf(x); }
MP_HD double m_ceil(double x) { return ceil(x); }
MP_HD float m_rint(float x) { return rintf(x); }  // round half to even, as nearbyint
MP_HD double m_rint(double x) { return rint(x); }
MP_HD float m_fabs(float x) { return fabsf(x); }
MP_HD double m_fabs(double x) { return fabs(x); }
MP_HD float m_pow(float a, float b) { return powf(a, b); }
MP_HD double m_pow(double a, double b) { return pow(a, b); }
MP_HD float m_atan2(float a, float b) { return atan2f(a, b); }
MP_HD double m_atan2(double a, double b) { return atan2(a, b); }
template <typename C> MP_HD bool m_isnan(C x) { return x != x; }
template <typename C> MP_HD bool m_isinf(C x) { return x - x != x - x && x == x; }

template <typename C> MP_HD C sigmoid(C x) { return C(1) / (C(1) + m_exp(-x)); }

template <int OP, typename C> MP_HD C unary_op(C x, C p0, C p1) {
  if constexpr (OP == kNeg) return -x;
  else if constexpr (OP == kExp) return m_exp(x);
  else if constexpr (OP == kLog) return m_log(x);
  else if constexpr (OP == kSqrt) return m_sqrt(x);
  else if constexpr (OP == kRsqrt) return C(1) / m_sqrt(x);
  else if constexpr (OP == kAbs) return m_fabs(x);
  else if constexpr (OP == kTanh) return m_tanh(x);
  else if constexpr (OP == kSigmoid) return sigmoid(x);
  else if constexpr (OP == kSilu) return x * sigmoid(x);
  else if constexpr (OP == kGelu) return C(0.5) * x * (C(1) + m_erf(x * C(kInvSqrt2)));
  else if constexpr (OP == kGeluTanh)
    return C(0.5) * x * (C(1) + m_tanh(C(kSqrt2OverPi) * (x + C(0.044715) * x * x * x)));
  else if constexpr (OP == kRelu) return x > C(0) ? x : C(0);
  else if constexpr (OP == kSin) return m_sin(x);
  else if constexpr (OP == kCos) return m_cos(x);
  else if constexpr (OP == kSquare) return x * x;
  else if constexpr (OP == kReciprocal) return C(1) / x;
  else if constexpr (OP == kSign) return x > C(0) ? C(1) : (x < C(0) ? C(-1) : C(0));
  else if constexpr (OP == kLog1p) return m_log1p(x);
  else if constexpr (OP == kExpm1) return m_expm1(x);
  else if constexpr (OP == kFloor) return m_floor(x);
  else if constexpr (OP == kCeil) return m_ceil(x);
  else if constexpr (OP == kRound) return m_rint(x);
  else if constexpr (OP == kClamp) {  // NaN bounds mean "no bound"
    C y = x;
    if (!m_isnan(p0) && y < p0) y = p0;
    if (!m_isnan(p1) && y > p1) y = p1;
    return y;
  } else if constexpr (OP == kLogicalNot) return x == C(0) ? C(1) : C(0);
  else if constexpr (OP == kIsNan) return m_isnan(x) ? C(1) : C(0);
  else return m_isinf(x) ? C(1) : C(0);  // kIsInf
}

template <int OP, typename C> MP_HD C binary_op(C a, C b) {
  if constexpr (OP == kAdd) return a + b;
  else if constexpr (OP == kSub) return a - b;
  else if constexpr (OP == kMul) return a * b;
  else if constexpr (OP == kDiv) return a / b;
  else if constexpr (OP == kPow) return m_pow(a, b);
  else if constexpr (OP == kMaximum) return (a != a || a > b) ? a : b;  // NaN propagates like torch.maximum
  else if constexpr (OP == kMinimum) return (a != a || a < b) ? a : b;
  else if constexpr (OP == kEq) return a == b;
  else if constexpr (OP == kNe) return a != b;
  else if constexpr (OP == kLt) return a < b;
  else if constexpr (OP == kLe) return a <= b;
  else if constexpr (OP == kGt) return a > b;
  else if constexpr (OP == kGe) return a >= b;
  else if constexpr (OP == kAnd) return (a != C(0)) && (b != C(0));
  else if constexpr (OP == kOr) return (a != C(0)) || (b != C(0));
  else if constexpr (OP == kSiluBackward) {  // a = x, b = grad: s (1 + x (1 - s))
    C s = sigmoid(a);
    return b * (s * (C(1) + a * (C(1) - s)));
  } else if constexpr (OP == kGeluBackward) {
    C cdf = C(0.5) * (C(1) + m_erf(a * C(kInvSqrt2)));
    C pdf = C(kInvSqrt2Pi) * m_exp(C(-0.5) * a * a);
    return b * (cdf + a * pdf);
  } else if constexpr (OP == kGeluTanhBackward) {
    C inner = C(kSqrt2OverPi) * (a + C(0.044715) * a * a * a);
    C t = m_tanh(inner);
    C dinner = C(kSqrt2OverPi) * (C(1) + C(3 * 0.044715) * a * a);
    return b * (C(0.5) * (C(1) + t) + C(0.5) * a * (C(1) - t * t) * dinner);
  } else if constexpr (OP == kSigmoidBackward) return b * a * (C(1) - a);  // a = sigmoid output
  else if constexpr (OP == kTanhBackward) return b * (C(1) - a * a);       // a = tanh output
  else if constexpr (OP == kReluBackward) return a > C(0) ? b : C(0);
  else return m_atan2(a, b);  // kAtan2
}

// ---- kernels ---------------------------------------------------------------------------------

template <typename TI, typename TO>
__global__ void copy_kernel(Strided<2> it, char* dst, const char* src, int64_t n) {
  int64_t off[2];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    it.offsets(i, off);
    Tr<TO>::st(reinterpret_cast<TO*>(dst + off[0]),
               static_cast<typename Tr<TO>::C>(Tr<TI>::ld(reinterpret_cast<const TI*>(src + off[1]))));
  }
}

template <typename T> __global__ void fill_kernel(Strided<1> it, char* dst, T v, int64_t n) {
  int64_t off[1];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    it.offsets(i, off);
    *reinterpret_cast<T*>(dst + off[0]) = v;
  }
}

template <int OP, typename TI, typename TO>
__global__ void unary_kernel(Strided<2> it, char* out, const char* x, typename Tr<TI>::C p0,
                             typename Tr<TI>::C p1, int64_t n) {
  using C = typename Tr<TI>::C;
  int64_t off[2];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    it.offsets(i, off);
    C v = unary_op<OP, C>(Tr<TI>::ld(reinterpret_cast<const TI*>(x + off[1])), p0, p1);
    Tr<TO>::st(reinterpret_cast<TO*>(out + off[0]), static_cast<typename Tr<TO>::C>(v));
  }
}

// x OP (alpha * y) for add/sub when scaled, x OP y otherwise; with `scalar_mode` 1 the right
// operand is the scalar s, with 2 the left one is (s OP x).
template <int OP, typename TI, typename TO>
__global__ void binary_kernel(Strided<3> it, char* out, const char* x, const char* y, typename Tr<TI>::C alpha,
                              bool scaled, int scalar_mode, typename Tr<TI>::C s, int64_t n) {
  using C = typename Tr<TI>::C;
  int64_t off[3];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    it.offsets(i, off);
    C u = Tr<TI>::ld(reinterpret_cast<const TI*>(x + off[1]));
    C v;
    if (scalar_mode == 0) {
      v = Tr<TI>::ld(reinterpret_cast<const TI*>(y + off[2]));
      if (scaled) v *= alpha;
    } else {
      v = s;
    }
    C r = scalar_mode == 2 ? binary_op<OP, C>(v, u) : binary_op<OP, C>(u, v);
    Tr<TO>::st(reinterpret_cast<TO*>(out + off[0]), static_cast<typename Tr<TO>::C>(r));
  }
}

template <typename T>
__global__ void where_kernel(Strided<4> it, char* out, const char* cond, const char* x, const char* y, int64_t n) {
  int64_t off[4];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    it.offsets(i, off);
    *reinterpret_cast<T*>(out + off[0]) = *reinterpret_cast<const uint8_t*>(cond + off[1])
                                              ? *reinterpret_cast<const T*>(x + off[2])
                                              : *reinterpret_cast<const T*>(y + off[3]);
  }
}

// ---- the packed path ---------------------------------------------------------------------------
// When every operand's innermost (merged) dimension is contiguous, a multiple of V elements long
// (or the only dimension), and every operand is aligned to its pack, each thread moves V elements
// of each operand per iteration, as one load / store of up to 16 bytes (V = 16 bytes / the widest
// element), and the index is computed once per pack: `pit` iterates over packs (the innermost
// extent divided by V, its byte strides multiplied by V; one dimension needs no division). A
// one-dimensional iteration's last n % V elements go one at a time. Transposes that keep rows
// contiguous (attention's [s, b, h, d] <-> [b, h, s, d]) and broadcasts over rows take this path
// too. The results are the element kernels' bit for bit (the same op in the same compute type,
// per element). (Pack: common.cuh.)
template <typename A, typename B> constexpr int pack_width() {
  return 16 / static_cast<int>(sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
}
template <typename T, int V> MP_HD const Pack<T, V>& pack_at(const char* base, int64_t off) {
  return *reinterpret_cast<const Pack<T, V>*>(base + off);
}
template <typename T, int V> MP_HD Pack<T, V>& pack_at(char* base, int64_t off) {
  return *reinterpret_cast<Pack<T, V>*>(base + off);
}

template <typename TI, typename TO, int V>
__global__ void copy_pack_kernel(Strided<2> pit, char* dst, const char* src, int64_t packs, int64_t n) {
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t off[2];
  for (int64_t i = t0; i < packs; i += step) {
    pit.offsets(i, off);
    const Pack<TI, V> a = pack_at<TI, V>(src, off[1]);
    typename Tr<TO>::C v[V];
    for (int j = 0; j < V; j++) v[j] = static_cast<typename Tr<TO>::C>(Tr<TI>::ld(&a.v[j]));
    Pack<TO, V> r;
    round_store(r.v, v);
    pack_at<TO, V>(dst, off[0]) = r;
  }
  for (int64_t i = packs * V + t0; i < n; i += step)
    Tr<TO>::st(reinterpret_cast<TO*>(dst) + i,
               static_cast<typename Tr<TO>::C>(Tr<TI>::ld(reinterpret_cast<const TI*>(src) + i)));
}

template <int OP, typename TI, typename TO, int V>
__global__ void unary_pack_kernel(Strided<2> pit, char* out, const char* x, typename Tr<TI>::C p0,
                                  typename Tr<TI>::C p1, int64_t packs, int64_t n) {
  using C = typename Tr<TI>::C;
  using CO = typename Tr<TO>::C;
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t off[2];
  for (int64_t i = t0; i < packs; i += step) {
    pit.offsets(i, off);
    const Pack<TI, V> a = pack_at<TI, V>(x, off[1]);
    CO v[V];
    for (int j = 0; j < V; j++) v[j] = static_cast<CO>(unary_op<OP, C>(Tr<TI>::ld(&a.v[j]), p0, p1));
    Pack<TO, V> r;
    round_store(r.v, v);
    pack_at<TO, V>(out, off[0]) = r;
  }
  for (int64_t i = packs * V + t0; i < n; i += step)
    Tr<TO>::st(reinterpret_cast<TO*>(out) + i,
               static_cast<CO>(unary_op<OP, C>(Tr<TI>::ld(reinterpret_cast<const TI*>(x) + i), p0, p1)));
}

// as binary_kernel; y is not read in the scalar modes
template <int OP, typename TI, typename TO, int V>
__global__ void binary_pack_kernel(Strided<3> pit, char* out, const char* x, const char* y, typename Tr<TI>::C alpha,
                                   bool scaled, int scalar_mode, typename Tr<TI>::C s, int64_t packs, int64_t n) {
  using C = typename Tr<TI>::C;
  using CO = typename Tr<TO>::C;
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  auto one = [&](C u, const TI* yp) -> CO {
    C v;
    if (scalar_mode == 0) {
      v = Tr<TI>::ld(yp);
      if (scaled) v *= alpha;
    } else {
      v = s;
    }
    return static_cast<CO>(scalar_mode == 2 ? binary_op<OP, C>(v, u) : binary_op<OP, C>(u, v));
  };
  int64_t off[3];
  for (int64_t i = t0; i < packs; i += step) {
    pit.offsets(i, off);
    const Pack<TI, V> a = pack_at<TI, V>(x, off[1]);
    Pack<TI, V> b;
    if (scalar_mode == 0) b = pack_at<TI, V>(y, off[2]);
    CO v[V];
    for (int j = 0; j < V; j++) v[j] = one(Tr<TI>::ld(&a.v[j]), &b.v[j]);
    Pack<TO, V> r;
    round_store(r.v, v);
    pack_at<TO, V>(out, off[0]) = r;
  }
  for (int64_t i = packs * V + t0; i < n; i += step)
    Tr<TO>::st(reinterpret_cast<TO*>(out) + i,
               one(Tr<TI>::ld(reinterpret_cast<const TI*>(x) + i), reinterpret_cast<const TI*>(y) + i));
}

// dst += src rounded to dst's dtype (accumulateGrad): element by element, and packed
template <typename TD, typename TS> MP_HD void accumulate_one(TD* d, const TS* sp) {
  using C = typename Tr<TD>::C;
  TD r;  // src rounded to dst's dtype, as the cast would store it
  Tr<TD>::st(&r, static_cast<C>(Tr<TS>::ld(sp)));
  Tr<TD>::st(d, Tr<TD>::ld(d) + Tr<TD>::ld(&r));
}

template <typename TD, typename TS>
__global__ void accumulate_kernel(Strided<2> it, char* dst, const char* src, int64_t n) {
  int64_t off[2];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    it.offsets(i, off);
    accumulate_one(reinterpret_cast<TD*>(dst + off[0]), reinterpret_cast<const TS*>(src + off[1]));
  }
}

template <typename TD, typename TS, int V>
__global__ void accumulate_pack_kernel(Strided<2> pit, char* dst, const char* src, int64_t packs, int64_t n) {
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t off[2];
  for (int64_t i = t0; i < packs; i += step) {
    pit.offsets(i, off);
    Pack<TD, V> d = pack_at<TD, V>(static_cast<const char*>(dst), off[0]);
    const Pack<TS, V> a = pack_at<TS, V>(src, off[1]);
    for (int j = 0; j < V; j++) accumulate_one(&d.v[j], &a.v[j]);
    pack_at<TD, V>(dst, off[0]) = d;
  }
  for (int64_t i = packs * V + t0; i < n; i += step)
    accumulate_one(reinterpret_cast<TD*>(dst) + i, reinterpret_cast<const TS*>(src) + i);
}

// Whether the iteration `it` over operands at `ptrs` (element sizes `sizes`) can take the packed
// path with V elements a pack; if so, `pit` iterates over the packs, `packs` of them.
template <int N>
bool packable(const Strided<N>& it, const void* const (&ptrs)[N], const int (&sizes)[N], int V, Strided<N>& pit,
              int64_t& packs) {
  if (it.ndim < 1) return false;
  const int L = it.ndim - 1;
  if (it.ndim > 1 && it.shape[L] % V != 0) return false;
  for (int k = 0; k < N; k++) {
    const int64_t pb = static_cast<int64_t>(sizes[k]) * V;  // bytes of a pack
    if (it.strides[k][L] != sizes[k]) return false;
    if (reinterpret_cast<uintptr_t>(ptrs[k]) % static_cast<uintptr_t>(pb) != 0) return false;
    for (int d = 0; d < L; d++)
      if (it.strides[k][d] % pb != 0) return false;
  }
  pit = it;
  pit.shape[L] = it.shape[L] / V;
  for (int k = 0; k < N; k++) pit.strides[k][L] = static_cast<int64_t>(sizes[k]) * V;
  packs = 1;
  for (int d = 0; d <= L; d++) packs *= pit.shape[d];
  return true;
}

// ---- launchers -------------------------------------------------------------------------------

// A kernel of one destination (TD) and one source (TS): `packed` (pack iteration, dst, src, packs,
// n) when both take the packed path, else `elem` (iteration, dst, src, n); pointers as bytes.
template <typename TD, typename TS>
static void launch_pair(cudaStream_t s, const Strided<2>& it, const TensorArg& dst, const TensorArg& src, int64_t n,
                        void (*packed)(Strided<2>, char*, const char*, int64_t, int64_t),
                        void (*elem)(Strided<2>, char*, const char*, int64_t), int V, const char* name) {
  Strided<2> pit;
  int64_t packs = 0;
  if (packable<2>(it, {dst.data, src.data}, {int(sizeof(TD)), int(sizeof(TS))}, V, pit, packs)) {
    MP_LAUNCH(packed, grid_for(mx(packs, int64_t(1))), kThreads, 0, s, pit, dst.data,
              static_cast<const char*>(src.data), packs, n);
  } else {
    MP_LAUNCH(elem, grid_for(n), kThreads, 0, s, it, dst.data, static_cast<const char*>(src.data), n);
  }
  check_launch(name);
}

template <typename TI, typename TO>
static void copy_typed(cudaStream_t s, const Strided<2>& it, const TensorArg& dst, const TensorArg& src, int64_t n) {
  constexpr int V = pack_width<TI, TO>();
  launch_pair<TO, TI>(s, it, dst, src, n, copy_pack_kernel<TI, TO, V>, copy_kernel<TI, TO>, V, "copy");
}

template <typename TI>
static void copy_from(cudaStream_t s, const Strided<2>& it, const TensorArg& dst, const TensorArg& src, int64_t n) {
  switch (dst.dtype) {
    case DType::F32: copy_typed<TI, float>(s, it, dst, src, n); break;
    case DType::F64: copy_typed<TI, double>(s, it, dst, src, n); break;
    case DType::BF16: copy_typed<TI, bf16>(s, it, dst, src, n); break;
    case DType::F16: copy_typed<TI, f16>(s, it, dst, src, n); break;
    case DType::I32: copy_typed<TI, int32_t>(s, it, dst, src, n); break;
    case DType::I64: copy_typed<TI, int64_t>(s, it, dst, src, n); break;
    case DType::U8: copy_typed<TI, uint8_t>(s, it, dst, src, n); break;
    case DType::Bool: copy_typed<TI, boolean>(s, it, dst, src, n); break;
  }
}

void copy(cudaStream_t s, const TensorArg& dst, const TensorArg& src) {
  int64_t n = dst.numel();
  if (n == 0) return;
  if (dst.dtype == src.dtype && dst.contiguous() && src.contiguous() && n == src.numel()) {
    check(cudaMemcpyAsync(dst.data, src.data, n * itemsize(dst.dtype), cudaMemcpyDeviceToDevice, s), "copy");
    return;
  }
  const TensorArg* ops[2] = {&dst, &src};
  Strided<2> it = make_strided<2>(dst, ops);
  MPC_DISPATCH_ALL(src.dtype, copy_from, s, it, dst, src, n);
}

template <typename T> static void fill_typed(cudaStream_t s, const TensorArg& t, double value) {
  int64_t n = t.numel();
  if (n == 0) return;
  if (value == 0.0 && !std::signbit(value) && t.contiguous()) {  // +0 is all-zero bytes in every dtype
    check(cudaMemsetAsync(t.data, 0, n * sizeof(T), s), "fill");
    return;
  }
  T v;
  Tr<T>::st(&v, static_cast<typename Tr<T>::C>(value));
  const TensorArg* ops[1] = {&t};
  Strided<1> it = make_strided<1>(t, ops);
  auto k = fill_kernel<T>;
  MP_LAUNCH(k, grid_for(n), kThreads, 0, s, it, t.data, v, n);
  check_launch("fill");
}

void fill(cudaStream_t s, const TensorArg& t, double value) { MPC_DISPATCH_ALL(t.dtype, fill_typed, s, t, value); }

// Compile-time op dispatch: Table<N, F>::call(op, ...) calls F::template run<op>(...).
template <int I, int N, typename F> struct OpTable {
  template <typename... A> static void call(int op, A&&... args) {
    if (op == I) F::template run<I>(args...);
    else OpTable<I + 1, N, F>::call(op, args...);
  }
};
template <int N, typename F> struct OpTable<N, N, F> {
  template <typename... A> static void call(int op, A&&...) {
    throw_error("unknown elementwise op " + std::to_string(op));
  }
};

template <typename TI, typename TO> struct UnaryRun {
  template <int OP>
  static void run(cudaStream_t s, const Strided<2>& it, const TensorArg& out, const TensorArg& x, double p0, double p1,
                  int64_t n) {
    using C = typename Tr<TI>::C;
    constexpr int V = pack_width<TI, TO>();
    Strided<2> pit;
    int64_t packs = 0;
    if (packable<2>(it, {out.data, x.data}, {int(sizeof(TO)), int(sizeof(TI))}, V, pit, packs)) {
      auto k = unary_pack_kernel<OP, TI, TO, V>;
      MP_LAUNCH(k, grid_for(mx(packs, int64_t(1))), kThreads, 0, s, pit, out.data, static_cast<const char*>(x.data),
                static_cast<C>(p0), static_cast<C>(p1), packs, n);
    } else {
      auto k = unary_kernel<OP, TI, TO>;
      MP_LAUNCH(k, grid_for(n), kThreads, 0, s, it, out.data, static_cast<const char*>(x.data), static_cast<C>(p0),
                static_cast<C>(p1), n);
    }
    check_launch("unary");
  }
};

template <typename TI>
static void unary_dispatch(cudaStream_t s, const TensorArg& out, const TensorArg& x, int op, double p0, double p1) {
  int64_t n = out.numel();
  if (op < 0 || op >= kUnaryCount) throw_error("unknown unary op " + std::to_string(op));
  if (n == 0) return;
  const TensorArg* ops[2] = {&out, &x};
  Strided<2> it = make_strided<2>(out, ops);
  if (out.dtype == DType::Bool) OpTable<0, kUnaryCount, UnaryRun<TI, boolean>>::call(op, s, it, out, x, p0, p1, n);
  else if (out.dtype == x.dtype) OpTable<0, kUnaryCount, UnaryRun<TI, TI>>::call(op, s, it, out, x, p0, p1, n);
  else throw_error("unary: output dtype must equal the input dtype or be bool");
}

void unary(cudaStream_t s, const TensorArg& out, const TensorArg& x, int op, double p0, double p1) {
  MPC_DISPATCH_ALL(x.dtype, unary_dispatch, s, out, x, op, p0, p1);
}

template <typename TI, typename TO> struct BinaryRun {
  template <int OP>
  static void run(cudaStream_t s, const Strided<3>& it, const TensorArg& out, const TensorArg& x, const char* y,
                  double alpha, bool scaled, int mode, double scalar, int64_t n) {
    using C = typename Tr<TI>::C;
    constexpr int V = pack_width<TI, TO>();
    // in the scalar modes y stands for x (its strides are x's; it is never read)
    Strided<3> pit;
    int64_t packs = 0;
    if (packable<3>(it, {out.data, x.data, mode == 0 ? y : x.data}, {int(sizeof(TO)), int(sizeof(TI)), int(sizeof(TI))},
                    V, pit, packs)) {
      auto k = binary_pack_kernel<OP, TI, TO, V>;
      MP_LAUNCH(k, grid_for(mx(packs, int64_t(1))), kThreads, 0, s, pit, out.data, static_cast<const char*>(x.data), y,
                static_cast<C>(alpha), scaled, mode, static_cast<C>(scalar), packs, n);
    } else {
      auto k = binary_kernel<OP, TI, TO>;
      MP_LAUNCH(k, grid_for(n), kThreads, 0, s, it, out.data, static_cast<const char*>(x.data), y,
                static_cast<C>(alpha), scaled, mode, static_cast<C>(scalar), n);
    }
    check_launch("binary");
  }
};

template <typename TI>
static void binary_dispatch(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& y, int op,
                            double alpha) {
  if (op < 0 || op >= kBinaryCount) throw_error("unknown binary op " + std::to_string(op));
  int64_t n = out.numel();
  if (n == 0) return;
  const TensorArg* ops[3] = {&out, &x, &y};
  Strided<3> it = make_strided<3>(out, ops);
  bool scaled = (op == kAdd || op == kSub) && alpha != 1.0;
  const char* yp = y.data;
  if (out.dtype == DType::Bool && x.dtype != DType::Bool)
    OpTable<0, kBinaryCount, BinaryRun<TI, boolean>>::call(op, s, it, out, x, yp, alpha, scaled, 0, 0.0, n);
  else if (out.dtype == x.dtype)
    OpTable<0, kBinaryCount, BinaryRun<TI, TI>>::call(op, s, it, out, x, yp, alpha, scaled, 0, 0.0, n);
  else throw_error("binary: output dtype must equal the input dtype or be bool");
}

void binary(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& y, int op, double alpha) {
  if (x.dtype != y.dtype) throw_error("binary: operands must share a dtype");
  MPC_DISPATCH_ALL(x.dtype, binary_dispatch, s, out, x, y, op, alpha);
}

template <typename TI>
static void scalar_dispatch(cudaStream_t s, const TensorArg& out, const TensorArg& x, double scalar, int op,
                            bool reverse) {
  if (op < 0 || op >= kBinaryCount) throw_error("unknown binary op " + std::to_string(op));
  int64_t n = out.numel();
  if (n == 0) return;
  // the scalar takes the place of y; its strides are never read
  const TensorArg* ops[3] = {&out, &x, &x};
  Strided<3> it = make_strided<3>(out, ops);
  int mode = reverse ? 2 : 1;
  if (out.dtype == DType::Bool && x.dtype != DType::Bool)
    OpTable<0, kBinaryCount, BinaryRun<TI, boolean>>::call(op, s, it, out, x, nullptr, 1.0, false, mode, scalar, n);
  else if (out.dtype == x.dtype)
    OpTable<0, kBinaryCount, BinaryRun<TI, TI>>::call(op, s, it, out, x, nullptr, 1.0, false, mode, scalar, n);
  else throw_error("binaryScalar: output dtype must equal the input dtype or be bool");
}

void binary_scalar(cudaStream_t s, const TensorArg& out, const TensorArg& x, double scalar, int op, bool reverse) {
  MPC_DISPATCH_ALL(x.dtype, scalar_dispatch, s, out, x, scalar, op, reverse);
}

template <typename T>
static void where_typed(cudaStream_t s, const TensorArg& out, const TensorArg& cond, const TensorArg& x,
                        const TensorArg& y) {
  int64_t n = out.numel();
  if (n == 0) return;
  const TensorArg* ops[4] = {&out, &cond, &x, &y};
  Strided<4> it = make_strided<4>(out, ops);
  auto k = where_kernel<T>;
  MP_LAUNCH(k, grid_for(n), kThreads, 0, s, it, out.data, static_cast<const char*>(cond.data),
            static_cast<const char*>(x.data), static_cast<const char*>(y.data), n);
  check_launch("where");
}

void where(cudaStream_t s, const TensorArg& out, const TensorArg& cond, const TensorArg& x, const TensorArg& y) {
  if (cond.dtype != DType::Bool && cond.dtype != DType::U8) throw_error("where: condition must be bool");
  MPC_DISPATCH_ALL(x.dtype, where_typed, s, out, cond, x, y);
}

// ---- accumulateGrad ----------------------------------------------------------------------------

template <typename TD, typename TS>
static void accumulate_typed(cudaStream_t s, const TensorArg& dst, const TensorArg& src) {
  const int64_t n = dst.numel();
  const TensorArg* ops[2] = {&dst, &src};
  Strided<2> it = make_strided<2>(dst, ops);
  constexpr int V = pack_width<TD, TS>();
  launch_pair<TD, TS>(s, it, dst, src, n, accumulate_pack_kernel<TD, TS, V>, accumulate_kernel<TD, TS>, V,
                      "accumulateGrad");
}

template <typename TD>
static void accumulate_into(cudaStream_t s, const TensorArg& dst, const TensorArg& src) {
  switch (src.dtype) {
    case DType::F32: accumulate_typed<TD, float>(s, dst, src); break;
    case DType::F64: accumulate_typed<TD, double>(s, dst, src); break;
    case DType::BF16: accumulate_typed<TD, bf16>(s, dst, src); break;
    case DType::F16: accumulate_typed<TD, f16>(s, dst, src); break;
    default: throw_error("accumulateGrad: the source must be floating-point");
  }
}

void accumulate_grad(cudaStream_t s, const TensorArg& dst, const TensorArg& src) {
  if (dst.ndim != src.ndim) throw_error("accumulateGrad: dst and src must have the same shape");
  for (int i = 0; i < dst.ndim; i++)
    if (dst.shape[i] != src.shape[i]) throw_error("accumulateGrad: dst and src must have the same shape");
  if (dst.numel() == 0) return;
  switch (dst.dtype) {
    case DType::F32: accumulate_into<float>(s, dst, src); break;
    case DType::F64: accumulate_into<double>(s, dst, src); break;
    case DType::BF16: accumulate_into<bf16>(s, dst, src); break;
    case DType::F16: accumulate_into<f16>(s, dst, src); break;
    default: throw_error("accumulateGrad: the destination must be floating-point");
  }
}

}  // namespace mpc
