// Optimizer kernels (see optim.h): the semantics of @megapatch/tensor's native/src/optim.cc.
//
// AdamW, SGD and unscaleCheck are elementwise grid-stride loops; each thread handles V
// consecutive elements with one vector load/store per operand (16 bytes for 4-byte state, 8 for
// 16-bit params) when every operand is aligned to its vector size, else V = 1. The tail past the
// last whole vector is done elementwise by the same launch. Arithmetic follows the CPU kernel's
// order of operations with every scalar cast once from double to the compute type (float for
// float32/bfloat16/float16 params, double for float64).
//
// normPowerSumMulti sums a list of tensors in few launches the same way, its blocks striding over
// the chunks of every tensor of the launch (see norm_multi_kernel).
//
// The multi-tensor AdamW (apex's multi_tensor_apply, without its device-side list) passes up to
// kAdamWMultiTensors tensors' pointers and sizes in the kernel's by-value argument, so a whole
// list costs a few launches and no host-to-device copy. Each tensor is cut into chunks of
// kAdamWChunk elements, one block per chunk; block b finds its tensor t as the last one whose
// first block first[t] is <= b (first holds the prefix sums of the chunk counts). Every element
// goes through the single-tensor kernel's adamw_elem, so both give the same bits.
//
// normPowerSum accumulates in double: each thread over its grid-stride share, then a fixed
// warp-shuffle + shared-memory tree per block into a per-block partial (a static device array of
// kNormMaxBlocks doubles), and the last block to finish (a ticket counter) combines the partials
// in block order with the same tree and writes `out` (accumulating: out + that, or max(out, that),
// the same bits as a separate float64 add / maximum). The grid depends only on the element
// count, so results are reproducible bit for bit. The counter and partials are per device; one
// stream per device (and the emulator's serialized launches) keeps launches from overlapping.
#include "optim.h"

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace mpc {
namespace {

// ---- vector loads ----------------------------------------------------------------------------
template <int B> struct RawOf;
template <> struct RawOf<2> { using T = unsigned short; };
template <> struct RawOf<4> { using T = unsigned; };
template <> struct RawOf<8> { using T = uint2; };
template <> struct RawOf<16> { using T = uint4; };

// V elements of T seen as one raw 2/4/8/16-byte word
template <typename T, int V> union Pk {
  typename RawOf<static_cast<int>(sizeof(T)) * V>::T raw;
  T e[V];
};

template <typename T, int V> MP_D Pk<T, V> ldv(const T* p) {
  Pk<T, V> k;
#ifdef MEGAPATCH_CUDA_EMULATOR
  std::memcpy(&k.raw, p, sizeof(k.raw));
#else
  k.raw = *reinterpret_cast<const decltype(k.raw)*>(p);
#endif
  return k;
}
template <typename T, int V> MP_D void stv(T* p, const Pk<T, V>& k) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  std::memcpy(p, &k.raw, sizeof(k.raw));
#else
  *reinterpret_cast<decltype(k.raw)*>(p) = k.raw;
#endif
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

MP_D int64_t global_thread() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
MP_D int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Optimizer state is float32 for every parameter dtype except float64 (state and math in double).
template <typename P> struct StateOf { using T = float; };
template <> struct StateOf<double> { using T = double; };

// Elements per thread and vector: 4 (16-byte float32 state), 2 for float64.
template <typename P> constexpr int vec_of() { return sizeof(typename Tr<P>::C) == 8 ? 2 : 4; }

// ---- AdamW -----------------------------------------------------------------------------------
template <typename C> struct AdamWC {
  C decay, b1, omb1, b2, omb2, bc2, eps, ns;
  float gsf;   // the gradient scale in a float gradient's compute type
  double gsd;  // and in a float64 gradient's
  bool scaled;
  const double* gsp;  // when set: the scale is read here on the device (see AdamWParams)
};

// The device's gradient scale into h, when it has one: false when it is not finite (the update
// is skipped, every thread returning before it writes anything).
template <typename C> MP_D bool adamw_take_scale(AdamWC<C>& h) {
  if (!h.gsp) return true;
  const double d = *h.gsp;
  if (!(d - d == 0.0)) return false;  // inf - inf and NaN - NaN are NaN
  h.gsf = static_cast<float>(d);
  h.gsd = d;
  h.scaled = d != 1.0;
  return true;
}

// Q: the dtype of the parameter copy (void: none); q points at this element's copy.
template <typename P, typename G, typename Q>
MP_D void adamw_elem(P& pe, const G& ge, typename StateOf<P>::T& me, typename StateOf<P>::T& ve, Q* q,
                     const AdamWC<typename Tr<P>::C>& h) {
  using C = typename Tr<P>::C;
  using S = typename StateOf<P>::T;
  using GC = typename Tr<G>::C;
  C x = Tr<P>::ld(&pe) * h.decay;
  GC graw = Tr<G>::ld(&ge);
  if (h.scaled) {
    // as binaryScalar's in-place multiply: in the gradient's compute type, rounded to its dtype
    G r;
    Tr<G>::st(&r, graw * static_cast<GC>(sizeof(GC) == 8 ? h.gsd : h.gsf));
    graw = Tr<G>::ld(&r);
  }
  C gr = static_cast<C>(graw);
  C mi = static_cast<C>(me) * h.b1 + h.omb1 * gr;
  C vi = static_cast<C>(ve) * h.b2 + h.omb2 * gr * gr;
  C denom = sqrt(vi) / h.bc2 + h.eps;
  me = static_cast<S>(mi);
  ve = static_cast<S>(vi);
  Tr<P>::st(&pe, x + h.ns * mi / denom);
  if constexpr (!std::is_void<Q>::value) Tr<Q>::st(q, static_cast<typename Tr<Q>::C>(Tr<P>::ld(&pe)));
}

// V elements from `o` (a multiple of V, every pointer V-aligned there) through one vector load and
// store of each operand; the single-tensor and multi-tensor kernels share it, so they agree bit for bit.
template <typename P, typename G, typename Q, int V>
MP_D void adamw_vec(P* p, const G* g, typename StateOf<P>::T* m, typename StateOf<P>::T* v, Q* q, int64_t o,
                    const AdamWC<typename Tr<P>::C>& h) {
  using S = typename StateOf<P>::T;
  Pk<P, V> pk = ldv<P, V>(p + o);
  Pk<G, V> gk = ldv<G, V>(g + o);
  Pk<S, V> mk = ldv<S, V>(m + o);
  Pk<S, V> vk = ldv<S, V>(v + o);
  for (int j = 0; j < V; j++) adamw_elem<P, G, void>(pk.e[j], gk.e[j], mk.e[j], vk.e[j], nullptr, h);
  if constexpr (!std::is_void<Q>::value) {
    // the copy rounded after the updates, all V at once (round_store: 16-bit pairs by one conversion)
    using QC = typename Tr<Q>::C;
    QC qv[V];
    for (int j = 0; j < V; j++) qv[j] = static_cast<QC>(Tr<P>::ld(&pk.e[j]));
    Pk<Q, V> qk;
    round_store(qk.e, qv);
    stv<Q, V>(q + o, qk);
  }
  stv<S, V>(m + o, mk);
  stv<S, V>(v + o, vk);
  stv<P, V>(p + o, pk);
}

template <typename Q> MP_D Q* at(Q* q, int64_t i) {
  if constexpr (std::is_void<Q>::value) return nullptr;
  else return q + i;
}

template <typename P, typename G, typename Q, int V>
__global__ void adamw_kernel(P* p, const G* g, typename StateOf<P>::T* m, typename StateOf<P>::T* v, Q* q, int64_t n,
                             AdamWC<typename Tr<P>::C> h0) {
  AdamWC<typename Tr<P>::C> h = h0;
  if (!adamw_take_scale(h)) return;
  const int64_t nv = n / V, stride = grid_threads();
  for (int64_t i = global_thread(); i < nv; i += stride) {
    adamw_vec<P, G, Q, V>(p, g, m, v, q, i * V, h);
  }
  for (int64_t i = nv * V + global_thread(); i < n; i += stride)
    adamw_elem<P, G, Q>(p[i], g[i], m[i], v[i], at(q, i), h);
}

// The update's scalars cast once from double to the compute type.
template <typename C> AdamWC<C> adamw_consts(const AdamWParams& hp) {
  AdamWC<C> h;
  h.decay = static_cast<C>(hp.decay);
  h.b1 = static_cast<C>(hp.beta1);
  h.omb1 = static_cast<C>(hp.one_minus_beta1);
  h.b2 = static_cast<C>(hp.beta2);
  h.omb2 = static_cast<C>(hp.one_minus_beta2);
  h.bc2 = static_cast<C>(hp.bc2_sqrt);
  h.eps = static_cast<C>(hp.eps);
  h.ns = static_cast<C>(hp.neg_step);
  h.gsf = static_cast<float>(hp.grad_scale);
  h.gsd = hp.grad_scale;
  h.scaled = hp.grad_scale != 1.0;
  h.gsp = hp.grad_scale_ptr;
  return h;
}

template <typename P>
void check_adamw_state(const TensorArg& m, const TensorArg& v) {
  const DType want = sizeof(typename StateOf<P>::T) == 8 ? DType::F64 : DType::F32;
  if (m.dtype != want || v.dtype != want)
    throw_error("adamw: state dtype must be float32 (float64 for float64 params)");
}

// whether all operands allow vec_of<P>()-wide loads and stores
template <typename P, typename G, typename Q>
bool adamw_vec_ok(const TensorArg& p, const TensorArg& g, const TensorArg& m, const TensorArg& v,
                  const TensorArg* q) {
  using S = typename StateOf<P>::T;
  constexpr int V = vec_of<P>();
  bool ok = aligned(p.data, sizeof(P) * V) && aligned(g.data, sizeof(G) * V) && aligned(m.data, sizeof(S) * V) &&
            aligned(v.data, sizeof(S) * V);
  if constexpr (!std::is_void<Q>::value) ok = ok && aligned(q->data, sizeof(Q) * V);
  return ok;
}

template <typename P, typename G, typename Q>
void adamw_run(cudaStream_t s, const TensorArg& p, const TensorArg& g, const TensorArg& m, const TensorArg& v,
               const TensorArg* q, const AdamWParams& hp) {
  using C = typename Tr<P>::C;
  using S = typename StateOf<P>::T;
  check_adamw_state<P>(m, v);
  const int64_t n = p.numel();
  if (n == 0) return;
  const AdamWC<C> h = adamw_consts<C>(hp);
  constexpr int V = vec_of<P>();
  Q* qp = nullptr;
  if constexpr (!std::is_void<Q>::value) qp = q->ptr<Q>();
  if (adamw_vec_ok<P, G, Q>(p, g, m, v, q)) {
    auto k = adamw_kernel<P, G, Q, V>;
    MP_LAUNCH(k, grid_for((n + V - 1) / V), kThreads, 0, s, p.ptr<P>(), g.ptr<G>(), m.ptr<S>(), v.ptr<S>(), qp, n, h);
  } else {
    auto k = adamw_kernel<P, G, Q, 1>;
    MP_LAUNCH(k, grid_for(n), kThreads, 0, s, p.ptr<P>(), g.ptr<G>(), m.ptr<S>(), v.ptr<S>(), qp, n, h);
  }
  check_launch("adamwStep");
}

// F<P, G, Q>(...) with Q the copy's storage type (void without a copy): copies are written from
// float32 parameters into bfloat16 or float16
#define MPC_ADAMW_COPY(F, copy_dtype, ...)                                                         \
  do {                                                                                             \
    if (!(copy_dtype)) return F<P, G, void>(__VA_ARGS__);                                          \
    if constexpr (std::is_same<P, float>::value) {                                                 \
      if (*(copy_dtype) == DType::BF16) return F<P, G, bf16>(__VA_ARGS__);                         \
      if (*(copy_dtype) == DType::F16) return F<P, G, f16>(__VA_ARGS__);                           \
    }                                                                                              \
    throw_error("adamw: a parameter copy is written from a float32 parameter into bfloat16 or float16"); \
  } while (0)

template <typename P, typename G>
void adamw_copy_dispatch(cudaStream_t s, const TensorArg& p, const TensorArg& g, const TensorArg& m,
                         const TensorArg& v, const TensorArg* q, const AdamWParams& h) {
  const DType* qd = q ? &q->dtype : nullptr;
  MPC_ADAMW_COPY(adamw_run, qd, s, p, g, m, v, q, h);
}

template <typename P>
void adamw_dispatch(cudaStream_t s, const TensorArg& p, const TensorArg& g, const TensorArg& m, const TensorArg& v,
                    const TensorArg* q, const AdamWParams& h) {
  if (g.dtype == p.dtype) adamw_copy_dispatch<P, P>(s, p, g, m, v, q, h);
  else if (g.dtype == DType::F32) adamw_copy_dispatch<P, float>(s, p, g, m, v, q, h);
  else throw_error("adamw: grad dtype must be the param dtype or float32");
}

// ---- AdamW over a list of tensors ------------------------------------------------------------
// Elements per block: a multiple of every vector width, 16 per thread of a kThreads block.
constexpr int64_t kAdamWChunk = 16 * kThreads;

// The operands of one launch, passed by value (about 2.5 KB for 48 tensors).
template <typename P, typename G> struct AdamWList {
  using S = typename StateOf<P>::T;
  P* p[kAdamWMultiTensors];
  const G* g[kAdamWMultiTensors];
  S* m[kAdamWMultiTensors];
  S* v[kAdamWMultiTensors];
  void* q[kAdamWMultiTensors];  // the copies (of the kernel's Q), or null
  int64_t n[kAdamWMultiTensors];
  int first[kAdamWMultiTensors + 1];  // first block of tensor t; first[count] is the grid size
  unsigned long long vec;             // bit t: tensor t's operands are aligned for V-wide access
  int count;
};

template <typename P, typename G, typename Q, int V>
__global__ void adamw_multi_kernel(AdamWList<P, G> L, AdamWC<typename Tr<P>::C> h0) {
  using S = typename StateOf<P>::T;
  AdamWC<typename Tr<P>::C> h = h0;
  if (!adamw_take_scale(h)) return;
  const int b = static_cast<int>(blockIdx.x);
  int t = 0;
  while (t + 1 < L.count && L.first[t + 1] <= b) t++;  // block-uniform
  const int64_t begin = static_cast<int64_t>(b - L.first[t]) * kAdamWChunk;
  const int64_t end = mn(L.n[t], begin + kAdamWChunk);
  P* p = L.p[t];
  const G* g = L.g[t];
  S* m = L.m[t];
  S* v = L.v[t];
  Q* q = static_cast<Q*>(L.q[t]);
  const int64_t tid = threadIdx.x, stride = blockDim.x;
  int64_t tail = begin;
  if ((L.vec >> t) & 1ull) {
    const int64_t nv = (end - begin) / V;  // begin is a multiple of V: kAdamWChunk is
    for (int64_t i = tid; i < nv; i += stride) {
      adamw_vec<P, G, Q, V>(p, g, m, v, q, begin + i * V, h);
    }
    tail = begin + nv * V;
  }
  for (int64_t i = tail + tid; i < end; i += stride) adamw_elem<P, G, Q>(p[i], g[i], m[i], v[i], at(q, i), h);
}

template <typename P, typename G, typename Q>
void adamw_multi_run(cudaStream_t s, const TensorArg* p, const TensorArg* g, const TensorArg* m, const TensorArg* v,
                     const TensorArg* q, int count, const AdamWParams& hp) {
  using C = typename Tr<P>::C;
  using S = typename StateOf<P>::T;
  for (int i = 0; i < count; i++) check_adamw_state<P>(m[i], v[i]);
  const AdamWC<C> h = adamw_consts<C>(hp);
  AdamWList<P, G> L;
  L.count = 0;
  L.first[0] = 0;
  L.vec = 0;
  auto flush = [&]() {
    if (L.count == 0) return;
    auto k = adamw_multi_kernel<P, G, Q, vec_of<P>()>;
    MP_LAUNCH(k, static_cast<unsigned>(L.first[L.count]), kThreads, 0, s, L, h);
    check_launch("adamwStepMulti");
    L.count = 0;
    L.vec = 0;
  };
  for (int i = 0; i < count; i++) {
    const int64_t n = p[i].numel();
    if (n == 0) continue;
    const int t = L.count;
    L.p[t] = p[i].ptr<P>();
    L.g[t] = g[i].ptr<G>();
    L.m[t] = m[i].ptr<S>();
    L.v[t] = v[i].ptr<S>();
    L.q[t] = q ? q[i].data : nullptr;
    L.n[t] = n;
    L.first[t + 1] = L.first[t] + static_cast<int>((n + kAdamWChunk - 1) / kAdamWChunk);
    if (adamw_vec_ok<P, G, Q>(p[i], g[i], m[i], v[i], q ? &q[i] : nullptr)) L.vec |= 1ull << t;
    if (++L.count == kAdamWMultiTensors) flush();
  }
  flush();
}

template <typename P, typename G>
void adamw_multi_copy_dispatch(cudaStream_t s, const TensorArg* p, const TensorArg* g, const TensorArg* m,
                               const TensorArg* v, const TensorArg* q, int count, const AdamWParams& h) {
  const DType* qd = q ? &q[0].dtype : nullptr;
  MPC_ADAMW_COPY(adamw_multi_run, qd, s, p, g, m, v, q, count, h);
}

template <typename P>
void adamw_multi_dispatch(cudaStream_t s, const TensorArg* p, const TensorArg* g, const TensorArg* m,
                          const TensorArg* v, const TensorArg* q, int count, const AdamWParams& h) {
  if (g[0].dtype == p[0].dtype) adamw_multi_copy_dispatch<P, P>(s, p, g, m, v, q, count, h);
  else if (g[0].dtype == DType::F32) adamw_multi_copy_dispatch<P, float>(s, p, g, m, v, q, count, h);
  else throw_error("adamw: grad dtype must be the param dtype or float32");
}

// ---- SGD -------------------------------------------------------------------------------------
template <typename C> struct SgdC {
  C nlr, mom, omd, wd;
  bool decay, nesterov, first;
};

template <typename P, typename G>
MP_D void sgd_elem(P& pe, const G& ge, typename StateOf<P>::T* be, const SgdC<typename Tr<P>::C>& h) {
  using C = typename Tr<P>::C;
  using S = typename StateOf<P>::T;
  C x = Tr<P>::ld(&pe);
  C d = static_cast<C>(Tr<G>::ld(&ge));
  if (h.decay) d = d + h.wd * x;
  if (be) {
    C bi = h.first ? d : static_cast<C>(*be) * h.mom + h.omd * d;
    *be = static_cast<S>(bi);
    d = h.nesterov ? d + h.mom * bi : bi;
  }
  Tr<P>::st(&pe, x + h.nlr * d);
}

template <typename P, typename G, int V>
__global__ void sgd_kernel(P* p, const G* g, typename StateOf<P>::T* buf, int64_t n, SgdC<typename Tr<P>::C> h) {
  using S = typename StateOf<P>::T;
  const int64_t nv = n / V, stride = grid_threads();
  for (int64_t i = global_thread(); i < nv; i += stride) {
    const int64_t o = i * V;
    Pk<P, V> pk = ldv<P, V>(p + o);
    Pk<G, V> gk = ldv<G, V>(g + o);
    if (buf) {
      Pk<S, V> bk = ldv<S, V>(buf + o);
      for (int j = 0; j < V; j++) sgd_elem<P, G>(pk.e[j], gk.e[j], &bk.e[j], h);
      stv<S, V>(buf + o, bk);
    } else {
      for (int j = 0; j < V; j++) sgd_elem<P, G>(pk.e[j], gk.e[j], nullptr, h);
    }
    stv<P, V>(p + o, pk);
  }
  for (int64_t i = nv * V + global_thread(); i < n; i += stride)
    sgd_elem<P, G>(p[i], g[i], buf ? buf + i : nullptr, h);
}

template <typename P, typename G>
void sgd_run(cudaStream_t s, const TensorArg& p, const TensorArg& g, const TensorArg* buf, const SgdParams& hp) {
  using C = typename Tr<P>::C;
  using S = typename StateOf<P>::T;
  const DType want = sizeof(S) == 8 ? DType::F64 : DType::F32;
  if (buf && buf->dtype != want) throw_error("sgd: state dtype must be float32 (float64 for float64 params)");
  const int64_t n = p.numel();
  if (n == 0) return;
  SgdC<C> h;
  h.nlr = static_cast<C>(hp.neg_lr);
  h.mom = static_cast<C>(hp.momentum);
  h.omd = static_cast<C>(hp.one_minus_dampening);
  h.wd = static_cast<C>(hp.weight_decay);
  h.decay = hp.weight_decay != 0;
  h.nesterov = hp.nesterov;
  h.first = hp.first;
  S* bp = buf ? buf->ptr<S>() : nullptr;
  constexpr int V = vec_of<P>();
  const bool vec = aligned(p.data, sizeof(P) * V) && aligned(g.data, sizeof(G) * V) &&
                   (!bp || aligned(bp, sizeof(S) * V));
  if (vec) {
    auto k = sgd_kernel<P, G, V>;
    MP_LAUNCH(k, grid_for((n + V - 1) / V), kThreads, 0, s, p.ptr<P>(), g.ptr<G>(), bp, n, h);
  } else {
    auto k = sgd_kernel<P, G, 1>;
    MP_LAUNCH(k, grid_for(n), kThreads, 0, s, p.ptr<P>(), g.ptr<G>(), bp, n, h);
  }
  check_launch("sgdStep");
}

template <typename P>
void sgd_dispatch(cudaStream_t s, const TensorArg& p, const TensorArg& g, const TensorArg* buf, const SgdParams& h) {
  if (g.dtype == p.dtype) sgd_run<P, P>(s, p, g, buf, h);
  else if (g.dtype == DType::F32) sgd_run<P, float>(s, p, g, buf, h);
  else throw_error("sgd: grad dtype must be the param dtype or float32");
}

// ---- normPowerSum ----------------------------------------------------------------------------
constexpr int kNormMaxBlocks = 1024;
constexpr int kNormThreads = 256;
enum NormMode : int { kNormMax = 0, kNormAbs = 1, kNormSquare = 2, kNormPow = 3 };

__device__ double g_norm_partials[kNormMaxBlocks];
__device__ unsigned int g_norm_done = 0;

// max with the first NaN winning (as torch.max); the sum otherwise
template <int M> MP_D double norm_combine(double a, double b) {
  if (M == kNormMax) return a != a ? a : (b != b ? b : (b > a ? b : a));
  return a + b;
}

template <int M> MP_D double norm_term(double x, double p) {
  if (M == kNormSquare) return x * x;
  if (M == kNormPow) return pow(fabs(x), p);
  return fabs(x);
}

// The combination of every thread's value in a fixed tree (warp shuffles, then the warps' values
// by warp 0), returned to every thread. Every thread of the block must call it.
template <int M> MP_D double norm_block_reduce(double a) {
  __shared__ double warp_vals[kNormThreads / 32];
  __shared__ double result;
  const int lane = static_cast<int>(threadIdx.x) & 31, w = static_cast<int>(threadIdx.x) >> 5;
  for (int o = 16; o > 0; o >>= 1) a = norm_combine<M>(a, __shfl_xor_sync(0xffffffffu, a, o));
  __syncthreads();  // earlier readers of warp_vals / result are done
  if (lane == 0) warp_vals[w] = a;
  __syncthreads();
  if (w == 0) {
    const int nw = static_cast<int>(blockDim.x) >> 5;
    double b = lane < nw ? warp_vals[lane] : 0.0;  // 0 is the identity of both (|x| >= 0)
    for (int o = 16; o > 0; o >>= 1) b = norm_combine<M>(b, __shfl_xor_sync(0xffffffffu, b, o));
    if (lane == 0) result = b;
  }
  __syncthreads();
  return result;
}

// The end of a norm launch: the block's value (each thread's `acc`) into its partial, and the last
// block to finish combines the grid's partials in block order into out (added / maxed into it with
// `accumulate`). Every thread of the block must call it.
template <int M> MP_D void norm_finish(double acc, double* out, bool accumulate) {
  acc = norm_block_reduce<M>(acc);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    g_norm_partials[blockIdx.x] = acc;
    __threadfence();
    const unsigned ticket = atomicAdd(&g_norm_done, 1u);
    last = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (last) {  // block-uniform
    __threadfence();
    const volatile double* parts = g_norm_partials;
    double b = 0;
    for (int i = static_cast<int>(threadIdx.x); i < static_cast<int>(gridDim.x); i += static_cast<int>(blockDim.x))
      b = norm_combine<M>(b, parts[i]);
    b = norm_block_reduce<M>(b);
    if (threadIdx.x == 0) {
      *out = accumulate ? norm_combine<M>(*out, b) : b;
      g_norm_done = 0;  // ready for the next launch on this device
    }
  }
}

template <typename T, int V, int M>
__global__ void __launch_bounds__(kNormThreads) norm_kernel(const T* x, int64_t n, double p, double* out, bool accumulate) {
  const int64_t nv = n / V, stride = grid_threads();
  double acc = 0;
  for (int64_t i = global_thread(); i < nv; i += stride) {
    Pk<T, V> k = ldv<T, V>(x + i * V);
    for (int j = 0; j < V; j++)
      acc = norm_combine<M>(acc, norm_term<M>(static_cast<double>(Tr<T>::ld(&k.e[j])), p));
  }
  for (int64_t i = nv * V + global_thread(); i < n; i += stride)
    acc = norm_combine<M>(acc, norm_term<M>(static_cast<double>(Tr<T>::ld(x + i)), p));
  norm_finish<M>(acc, out, accumulate);
}

template <typename T, int M>
void norm_launch(cudaStream_t s, const TensorArg& t, double p, double* out, bool acc) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const int64_t n = t.numel();
  if (aligned(t.data, 16)) {
    auto k = norm_kernel<T, V, M>;
    const unsigned blocks = mn(grid_for((n + V - 1) / V, kNormThreads), static_cast<unsigned>(kNormMaxBlocks));
    MP_LAUNCH(k, blocks, kNormThreads, 0, s, t.ptr<const T>(), n, p, out, acc);
  } else {
    auto k = norm_kernel<T, 1, M>;
    const unsigned blocks = mn(grid_for(n, kNormThreads), static_cast<unsigned>(kNormMaxBlocks));
    MP_LAUNCH(k, blocks, kNormThreads, 0, s, t.ptr<const T>(), n, p, out, acc);
  }
}

// ---- normPowerSum over a list of tensors ------------------------------------------------------
// The tensors' chunks of kNormChunk elements in list order; block b sums chunks b, b + grid, ...
// (a fixed grid: at most kNormMaxBlocks blocks), so one launch reads many small tensors with the
// bandwidth of one large one. The per-block partials and their combination are the single-tensor
// kernel's; the grouping of the terms differs from one launch a tensor (float64 sums).
constexpr int kNormMultiTensors = 48;
constexpr int64_t kNormChunk = 4096;  // a multiple of every vector width
template <typename T> struct NormList {
  const T* x[kNormMultiTensors];
  int64_t n[kNormMultiTensors];
  int64_t first[kNormMultiTensors + 1];  // first chunk of tensor t; first[count]: the chunks in all
  unsigned long long vec;                // bit t: tensor t is 16-byte aligned
  int count;
};

template <typename T, int V, int M>
__global__ void __launch_bounds__(kNormThreads) norm_multi_kernel(NormList<T> L, double p, double* out, bool accumulate) {
  double acc = 0;
  int t = 0;
  for (int64_t c = blockIdx.x; c < L.first[L.count]; c += gridDim.x) {
    while (L.first[t + 1] <= c) t++;  // block-uniform; chunks only grow
    const T* x = L.x[t];
    const int64_t begin = (c - L.first[t]) * kNormChunk, end = mn(L.n[t], begin + kNormChunk);
    int64_t tail = begin;
    if ((L.vec >> t) & 1ull) {
      const int64_t nv = (end - begin) / V;
      for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
        Pk<T, V> k = ldv<T, V>(x + begin + i * V);
        for (int j = 0; j < V; j++)
          acc = norm_combine<M>(acc, norm_term<M>(static_cast<double>(Tr<T>::ld(&k.e[j])), p));
      }
      tail = begin + nv * V;
    }
    for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x)
      acc = norm_combine<M>(acc, norm_term<M>(static_cast<double>(Tr<T>::ld(x + i)), p));
  }
  norm_finish<M>(acc, out, accumulate);
}

template <typename T, int M>
void norm_multi_launch(cudaStream_t s, const NormList<T>& L, double p, double* out, bool acc) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const int64_t chunks = L.first[L.count];
  const unsigned blocks = static_cast<unsigned>(mn(chunks, static_cast<int64_t>(kNormMaxBlocks)));
  auto k = norm_multi_kernel<T, V, M>;
  MP_LAUNCH(k, blocks, kNormThreads, 0, s, L, p, out, acc);
  check_launch("normPowerSumMulti");
}

template <typename T>
void norm_multi_run(cudaStream_t s, const TensorArg* ts, int count, double p, double* out, bool acc) {
  NormList<T> L;
  L.count = 0;
  L.first[0] = 0;
  L.vec = 0;
  bool written = acc;  // the first launch writes out unless accumulating
  auto flush = [&]() {
    if (L.count == 0) return;
    if (std::isinf(p)) norm_multi_launch<T, kNormMax>(s, L, p, out, written);
    else if (p == 2) norm_multi_launch<T, kNormSquare>(s, L, p, out, written);
    else if (p == 1) norm_multi_launch<T, kNormAbs>(s, L, p, out, written);
    else norm_multi_launch<T, kNormPow>(s, L, p, out, written);
    written = true;
    L.count = 0;
    L.vec = 0;
  };
  for (int i = 0; i < count; i++) {
    const int64_t n = ts[i].numel();
    if (n == 0) continue;
    const int t = L.count;
    L.x[t] = ts[i].ptr<T>();
    L.n[t] = n;
    L.first[t + 1] = L.first[t] + (n + kNormChunk - 1) / kNormChunk;
    if (aligned(ts[i].data, 16)) L.vec |= 1ull << t;
    if (++L.count == kNormMultiTensors) flush();
  }
  flush();
  if (!written) {  // nothing to sum and out not accumulated: out = 0
    check(cudaMemsetAsync(out, 0, sizeof(double), s), "normPowerSumMulti: zero");
  }
}

template <typename T>
void norm_run(cudaStream_t s, const TensorArg& t, double p, double* out, bool acc) {
  if (std::isinf(p)) norm_launch<T, kNormMax>(s, t, p, out, acc);
  else if (p == 2) norm_launch<T, kNormSquare>(s, t, p, out, acc);
  else if (p == 1) norm_launch<T, kNormAbs>(s, t, p, out, acc);
  else norm_launch<T, kNormPow>(s, t, p, out, acc);
  check_launch("normPowerSum");
}

// ---- unscaleCheck ----------------------------------------------------------------------------
template <typename C> MP_D bool finite(C v) { return v - v == C(0); }  // false for inf and NaN

template <typename T, int V, bool Scale>
__global__ void unscale_kernel(T* x, int64_t n, typename Tr<T>::C s, float* found) {
  using C = typename Tr<T>::C;
  const int64_t nv = n / V, stride = grid_threads();
  bool bad = false;
  for (int64_t i = global_thread(); i < nv; i += stride) {
    Pk<T, V> k = ldv<T, V>(x + i * V);
    for (int j = 0; j < V; j++) {
      C v = Tr<T>::ld(&k.e[j]);
      if (!finite(v)) bad = true;
      if (Scale) Tr<T>::st(&k.e[j], v * s);
    }
    if (Scale) stv<T, V>(x + i * V, k);
  }
  for (int64_t i = nv * V + global_thread(); i < n; i += stride) {
    C v = Tr<T>::ld(x + i);
    if (!finite(v)) bad = true;
    if (Scale) Tr<T>::st(x + i, v * s);
  }
  if (bad) *found = 1.0f;  // a plain store: every writer writes the same value
}

template <typename T, bool Scale>
void unscale_launch(cudaStream_t s, const TensorArg& t, typename Tr<T>::C sc, float* found) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const int64_t n = t.numel();
  if (aligned(t.data, sizeof(T) * V)) {
    auto k = unscale_kernel<T, V, Scale>;
    MP_LAUNCH(k, grid_for((n + V - 1) / V), kThreads, 0, s, t.ptr<T>(), n, sc, found);
  } else {
    auto k = unscale_kernel<T, 1, Scale>;
    MP_LAUNCH(k, grid_for(n), kThreads, 0, s, t.ptr<T>(), n, sc, found);
  }
}

template <typename T>
void unscale_run(cudaStream_t s, const TensorArg& t, double inv_scale, float* found) {
  using C = typename Tr<T>::C;
  if (t.numel() == 0) return;
  if (inv_scale != 1.0) unscale_launch<T, true>(s, t, static_cast<C>(inv_scale), found);
  else unscale_launch<T, false>(s, t, C(1), found);
  check_launch("unscaleCheck");
}

// ---- argument checks (the CPU backend's messages) --------------------------------------------
void check_same_numel(const char* op, const TensorArg& a, const TensorArg& b) {
  if (a.numel() != b.numel()) throw_error(std::string(op) + ": tensors have different sizes");
}
void check_contiguous(const char* op, const TensorArg& t) {
  if (!t.contiguous()) throw_error(std::string(op) + ": tensors must be contiguous");
}

}  // namespace

void adamw_step(cudaStream_t s, const TensorArg& p, const TensorArg& g, const TensorArg& m, const TensorArg& v,
                const TensorArg* copy, const AdamWParams& h) {
  for (const TensorArg* t : {&p, &g, &m, &v, copy}) {
    if (!t) continue;
    check_contiguous("adamw", *t);
    check_same_numel("adamw", p, *t);
  }
  MPC_DISPATCH_FLOAT(p.dtype, adamw_dispatch, s, p, g, m, v, copy, h);
}

void adamw_step_multi(cudaStream_t s, const TensorArg* p, const TensorArg* g, const TensorArg* m,
                      const TensorArg* v, const TensorArg* copies, int count, const AdamWParams& h) {
  if (count <= 0) return;
  for (int i = 0; i < count; i++) {
    for (const TensorArg* t : {&p[i], &g[i], &m[i], &v[i], copies ? &copies[i] : nullptr}) {
      if (!t) continue;
      check_contiguous("adamw", *t);
      check_same_numel("adamw", p[i], *t);
    }
    if (p[i].dtype != p[0].dtype || g[i].dtype != g[0].dtype || m[i].dtype != m[0].dtype ||
        v[i].dtype != v[0].dtype || (copies && copies[i].dtype != copies[0].dtype))
      throw_error("adamwStepMulti: every list must hold one dtype; split the lists by dtype");
  }
  MPC_DISPATCH_FLOAT(p[0].dtype, adamw_multi_dispatch, s, p, g, m, v, copies, count, h);
}

void sgd_step(cudaStream_t s, const TensorArg& p, const TensorArg& g, const TensorArg* buf, const SgdParams& h) {
  check_contiguous("sgd", p);
  check_contiguous("sgd", g);
  check_same_numel("sgd", p, g);
  if (buf) {
    check_contiguous("sgd", *buf);
    check_same_numel("sgd", p, *buf);
  }
  MPC_DISPATCH_FLOAT(p.dtype, sgd_dispatch, s, p, g, buf, h);
}

void norm_power_sum(cudaStream_t s, const TensorArg& t, double p, const TensorArg& out, bool accumulate) {
  check_contiguous("normPowerSum", t);
  if (out.dtype != DType::F64 || out.numel() != 1)
    throw_error("normPowerSum: out must be a float64 tensor of 1 element");
  MPC_DISPATCH_FLOAT(t.dtype, norm_run, s, t, p, out.ptr<double>(), accumulate);
}

void norm_power_sum_multi(cudaStream_t s, const TensorArg* ts, int count, double p, const TensorArg& out,
                          bool accumulate) {
  if (out.dtype != DType::F64 || out.numel() != 1)
    throw_error("normPowerSumMulti: out must be a float64 tensor of 1 element");
  for (int i = 0; i < count; i++) {
    check_contiguous("normPowerSumMulti", ts[i]);
    if (ts[i].dtype != ts[0].dtype)
      throw_error("normPowerSumMulti: every tensor of a list must have one dtype; split the list by dtype");
  }
  if (count == 0) {
    if (!accumulate) check(cudaMemsetAsync(out.ptr<double>(), 0, sizeof(double), s), "normPowerSumMulti: zero");
    return;
  }
  MPC_DISPATCH_FLOAT(ts[0].dtype, norm_multi_run, s, ts, count, p, out.ptr<double>(), accumulate);
}

void unscale_check(cudaStream_t s, const TensorArg& t, double inv_scale, const TensorArg& found_inf) {
  check_contiguous("unscaleCheck", t);
  if (found_inf.dtype != DType::F32 || found_inf.numel() != 1)
    throw_error("unscaleCheck: foundInf must be a float32 tensor of 1 element");
  MPC_DISPATCH_FLOAT(t.dtype, unscale_run, s, t, inv_scale, found_inf.ptr<float>());
}

}  // namespace mpc
