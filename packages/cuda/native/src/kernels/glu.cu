// Gated activations (see glu.h), with the semantics of @megapatch/tensor's native/src/glu.cc: act
// is silu, gelu (erf) or gelu's tanh approximation with the expressions of the unary ops
// (elementwise.cu), evaluated in float for 16/32-bit data (double for float64) in the order of the
// composition mul(act(gate), up) and its gradient, and rounded once to the storage dtype. With
// 16-bit data silu's sigmoid is the special-function unit's (sigmoid_of below) and the rounding the
// hardware's conversion, two values an instruction (round_store, common.cuh): the loops issue 15 instructions
// an element forward and 23 backward (bf16, 16-byte vectors; 40 and 58 with expf, an IEEE division
// and the portable rounding), which a memory-bound kernel at 4.8 TB/s can afford.
//
// Elementwise over rows: thread x walks the vectors of a half row (gate and up of one row are two
// runs of f elements, 2f apart from the next row's), thread y the rows; blocks of 256 threads are
// 32..256 wide (the smallest power of two covering a half row, so short rows pack several per
// block), and both loops are grid-stride. Each thread moves 16 bytes per operand and access
// (8 bfloat16 / float16, 4 float32, 2 float64) when f is a multiple of that width and every
// pointer is 16-byte aligned; otherwise one element at a time.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "glu.h"

// loop unrolling hint for nvcc (the host compiler of the emulator does not know the pragma)
#ifdef __CUDACC__
#define MPGLU_UNROLL _Pragma("unroll")
#else
#define MPGLU_UNROLL
#endif

namespace mpc {
namespace {

// Must match GATED_ACTIVATION_CODES in @megapatch/tensor's src/backend/abi.ts.
enum Act : int { kSwiglu = 0, kGeglu = 1, kGegluTanh = 2 };

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

MP_D float gexp(float x) { return expf(x); }
MP_D double gexp(double x) { return exp(x); }
MP_D float gerf(float x) { return erff(x); }
MP_D double gerf(double x) { return erf(x); }
MP_D float gtanh(float x) { return tanhf(x); }
MP_D double gtanh(double x) { return tanh(x); }

// V elements of T loaded or stored with one access (V * sizeof(T) bytes, aligned to that).
template <typename T, int V> struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// 16-bit storage (bf16, f16) and silu: the sigmoid 1 / (1 + e^-x) on the special-function unit,
// e^-x as ex2.approx of -x log2(e) and the reciprocal approximate (__expf, __fdividef: 2 and 1-2
// instructions instead of expf's ~10 and an IEEE division's ~10 with its slow-path branch); their
// relative error (~1e-6 for |x| up to ~20) is far below the result's rounding to 16 bits (2^-9 for
// bf16), so the rounded results are the accurate ones but for a rare last bit (the kernel test's
// tolerance: 2 units in the last place). For e^-x = inf (x < -88) __fdividef gives 0, as 1 / inf.
// The emulator's __expf and __fdividef are the accurate functions.
template <bool FAST> MP_D float sigmoid_of(float x) {
  if constexpr (FAST) return __fdividef(1.0f, 1.0f + __expf(-x));
  else return 1.0f / (1.0f + gexp(-x));
}
template <bool FAST> MP_D double sigmoid_of(double x) { return 1.0 / (1.0 + gexp(-x)); }

// act(x), as the unary op computes it (FAST: silu's sigmoid above)
template <int ACT, bool FAST = false, typename C> MP_D C act_value(C x) {
  if constexpr (ACT == kSwiglu) {
    return x * sigmoid_of<FAST>(x);
  } else if constexpr (ACT == kGeglu) {
    return C(0.5) * x * (C(1) + gerf(x * C(kInvSqrt2)));
  } else {
    return C(0.5) * x * (C(1) + gtanh(C(kSqrt2OverPi) * (x + C(0.044715) * x * x * x)));
  }
}

// act(x) and act'(x) (the unary op's backward with a unit gradient), sharing the transcendentals
template <int ACT, bool FAST = false, typename C> MP_D void act_both(C x, C& value, C& grad) {
  if constexpr (ACT == kSwiglu) {
    const C s = sigmoid_of<FAST>(x);
    value = x * s;
    grad = s * (C(1) + x * (C(1) - s));
  } else if constexpr (ACT == kGeglu) {
    const C cdf = C(0.5) * (C(1) + gerf(x * C(kInvSqrt2)));
    const C pdf = C(kInvSqrt2Pi) * gexp(C(-0.5) * x * x);
    value = C(0.5) * x * (C(1) + gerf(x * C(kInvSqrt2)));
    grad = cdf + x * pdf;
  } else {
    const C inner = C(kSqrt2OverPi) * (x + C(0.044715) * x * x * x);
    const C t = gtanh(inner);
    const C dinner = C(kSqrt2OverPi) * (C(1) + C(3 * 0.044715) * x * x);
    value = C(0.5) * x * (C(1) + t);
    grad = C(0.5) * (C(1) + t) + C(0.5) * x * (C(1) - t * t) * dinner;
  }
}

constexpr int kBlock = 256;
#ifdef MEGAPATCH_CUDA_EMULATOR
constexpr int64_t kMaxGridX = 2;  // few blocks: the grid-stride loops run
constexpr int64_t kMaxGridY = 4;
#else
constexpr int64_t kMaxGridX = 1 << 16;
constexpr int64_t kMaxGridY = 65535;
#endif

// out [rows, f] = act(gate) * up; nv = f / V vectors per half row. U: vectors a thread loads
// before its first store (columns c, c + col_step, ...; MEGAPATCH_GLU_UNROLL, a variant the bench times).
template <typename T, int ACT, int V, int U = 1>
__global__ void __launch_bounds__(kBlock) glu_fwd_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t rows,
                                                          int64_t f) {
  using C = typename Tr<T>::C;
  using W = Vec<T, V>;
  const int64_t nv = f / V;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const W* gate = reinterpret_cast<const W*>(x + r * 2 * f);
    const W* up = gate + nv;
    W* o = reinterpret_cast<W*>(out + r * f);
    for (int64_t c = col0; c < nv; c += col_step * U) {
      W a[U], b[U];
      MPGLU_UNROLL
      for (int u = 0; u < U; u++) {
        if (c + u * col_step < nv) {
          a[u] = gate[c + u * col_step];
          b[u] = up[c + u * col_step];
        }
      }
      MPGLU_UNROLL
      for (int u = 0; u < U; u++) {
        if (c + u * col_step >= nv) break;
        C r[V];
        MPGLU_UNROLL
        for (int k = 0; k < V; k++) r[k] = act_value<ACT, kHalf16<T>>(Tr<T>::ld(&a[u].v[k])) * Tr<T>::ld(&b[u].v[k]);
        W y;
        round_store(y.v, r);
        o[c + u * col_step] = y;
      }
    }
  }
}

// dx [rows, 2f] = [(g * up) * act'(gate), g * act(gate)] (bf16 silu with 16-byte vectors: 40
// registers, 6 blocks an SM; 74 before the 16-bit path's sigmoid and rounding)
template <typename T, int ACT, int V, int U = 1>
__global__ void __launch_bounds__(kBlock) glu_bwd_kernel(T* __restrict__ dx, const T* __restrict__ g,
                                                          const T* __restrict__ x, int64_t rows, int64_t f) {
  using C = typename Tr<T>::C;
  using W = Vec<T, V>;
  const int64_t nv = f / V;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const W* gate = reinterpret_cast<const W*>(x + r * 2 * f);
    const W* up = gate + nv;
    const W* gr = reinterpret_cast<const W*>(g + r * f);
    W* dgate = reinterpret_cast<W*>(dx + r * 2 * f);
    W* dup = dgate + nv;
    for (int64_t c = col0; c < nv; c += col_step * U) {
      W a[U], b[U], gv[U];
      MPGLU_UNROLL
      for (int u = 0; u < U; u++) {
        if (c + u * col_step < nv) {
          a[u] = gate[c + u * col_step];
          b[u] = up[c + u * col_step];
          gv[u] = gr[c + u * col_step];
        }
      }
      MPGLU_UNROLL
      for (int u = 0; u < U; u++) {
        if (c + u * col_step >= nv) break;
        C ra[V], rb[V];
        MPGLU_UNROLL
        for (int k = 0; k < V; k++) {
          const C gk = Tr<T>::ld(&gv[u].v[k]);
          C value, grad;
          act_both<ACT, kHalf16<T>>(Tr<T>::ld(&a[u].v[k]), value, grad);
          ra[k] = (gk * Tr<T>::ld(&b[u].v[k])) * grad;
          rb[k] = gk * value;
        }
        W da, db;
        round_store(da.v, ra);
        round_store(db.v, rb);
        dgate[c + u * col_step] = da;
        dup[c + u * col_step] = db;
      }
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Block and grid for rows of nv vectors: x the smallest power of two >= nv in [32, kBlock], y the
// rest of the block's threads.
struct Plan {
  dim3 block, grid;
};
inline Plan plan(int64_t rows, int64_t nv, int U) {
  int tx = 32;
  while (tx < nv && tx < kBlock) tx *= 2;
  const int ty = kBlock / tx;
  Plan p;
  p.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  p.grid = dim3(static_cast<unsigned>(mx(mn(ceil_div(nv, int64_t(tx) * U), kMaxGridX), static_cast<int64_t>(1))),
                static_cast<unsigned>(mx(mn(ceil_div(rows, ty), kMaxGridY), static_cast<int64_t>(1))));
  return p;
}

// MEGAPATCH_GLU_UNROLL=2 or 4: vectors a thread loads before its first store (1 by default; a
// variant the bench times)
inline int glu_unroll() {
  const char* e = std::getenv("MEGAPATCH_GLU_UNROLL");
  return e && e[0] == '4' ? 4 : e && e[0] == '2' ? 2 : 1;
}

template <typename T, int ACT, int V>
void fwd_launch(cudaStream_t s, T* out, const T* x, int64_t rows, int64_t f) {
  const int U = glu_unroll();
  const Plan p = plan(rows, f / V, U);
  auto k = U == 4 ? glu_fwd_kernel<T, ACT, V, 4> : U == 2 ? glu_fwd_kernel<T, ACT, V, 2> : glu_fwd_kernel<T, ACT, V, 1>;
  MP_LAUNCH(k, p.grid, p.block, 0, s, out, x, rows, f);
  check_launch("gated_activation_forward");
}

template <typename T, int ACT, int V>
void bwd_launch(cudaStream_t s, T* dx, const T* g, const T* x, int64_t rows, int64_t f) {
  const int U = glu_unroll();
  const Plan p = plan(rows, f / V, U);
  auto k = U == 4 ? glu_bwd_kernel<T, ACT, V, 4> : U == 2 ? glu_bwd_kernel<T, ACT, V, 2> : glu_bwd_kernel<T, ACT, V, 1>;
  MP_LAUNCH(k, p.grid, p.block, 0, s, dx, g, x, rows, f);
  check_launch("gated_activation_backward");
}

template <typename T, int V>
void fwd_act(cudaStream_t s, T* out, const T* x, int act, int64_t rows, int64_t f) {
  switch (act) {
    case kSwiglu: fwd_launch<T, kSwiglu, V>(s, out, x, rows, f); break;
    case kGeglu: fwd_launch<T, kGeglu, V>(s, out, x, rows, f); break;
    default: fwd_launch<T, kGegluTanh, V>(s, out, x, rows, f); break;
  }
}

template <typename T, int V>
void bwd_act(cudaStream_t s, T* dx, const T* g, const T* x, int act, int64_t rows, int64_t f) {
  switch (act) {
    case kSwiglu: bwd_launch<T, kSwiglu, V>(s, dx, g, x, rows, f); break;
    case kGeglu: bwd_launch<T, kGeglu, V>(s, dx, g, x, rows, f); break;
    default: bwd_launch<T, kGegluTanh, V>(s, dx, g, x, rows, f); break;
  }
}

template <typename T>
void fwd_typed(cudaStream_t s, const TensorArg& out, const TensorArg& x, int act, int64_t rows, int64_t f) {
  constexpr int V = 16 / sizeof(T);
  T* op = out.ptr<T>();
  const T* xp = x.ptr<T>();
  if (f % V == 0 && aligned16(op) && aligned16(xp)) fwd_act<T, V>(s, op, xp, act, rows, f);
  else fwd_act<T, 1>(s, op, xp, act, rows, f);
}

template <typename T>
void bwd_typed(cudaStream_t s, const TensorArg& dx, const TensorArg& g, const TensorArg& x, int act, int64_t rows,
               int64_t f) {
  constexpr int V = 16 / sizeof(T);
  T* dp = dx.ptr<T>();
  const T* gp = g.ptr<T>();
  const T* xp = x.ptr<T>();
  if (f % V == 0 && aligned16(dp) && aligned16(gp) && aligned16(xp)) bwd_act<T, V>(s, dp, gp, xp, act, rows, f);
  else bwd_act<T, 1>(s, dp, gp, xp, act, rows, f);
}

// f (half of x's last dimension) after checking the operands as the CPU entry does: x [..., 2f]
// and `half` [..., f] (out or g) contiguous with rows * f elements, one dtype.
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

void gated_activation_forward(cudaStream_t s, const TensorArg& out, const TensorArg& x, int act) {
  const int64_t f = check_halves(x, out, act, "out");
  if (out.numel() == 0) return;
  MPC_DISPATCH_FLOAT(x.dtype, fwd_typed, s, out, x, act, out.numel() / f, f);
}

void gated_activation_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& g, const TensorArg& x,
                               int act) {
  const int64_t f = check_halves(x, g, act, "g");
  if (dx.dtype != x.dtype || dx.numel() != x.numel() || !dx.contiguous())
    throw_error("gatedActivation: dx must be contiguous like x, in x's dtype");
  if (g.numel() == 0) return;
  MPC_DISPATCH_FLOAT(x.dtype, bwd_typed, s, dx, g, x, act, g.numel() / f, f);
}

}  // namespace mpc
