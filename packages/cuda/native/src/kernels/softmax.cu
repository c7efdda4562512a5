// Softmax family kernels (see softmax.h), the CUDA twin of @megapatch/tensor's
// native/src/softmax.cc.
//
// Rows. Every row kernel gives a row to a group of threads: one warp per row for rows of up to
// kWarpRowMax elements (8 rows per 256-thread block), one block per row above that (128 to 1024
// threads, so that a 32k-152k vocabulary row takes a few 16-byte loads per thread); blocks stride
// over the rows. A group reads its row in 16-byte packs (the unaligned head and the tail one
// element at a time) and reduces with warp shuffles, then across the warps of a block through
// shared memory; every thread folds the per-warp values in the same order, so all threads hold the
// same bits and the result does not depend on scheduling.
//
// Softmax and cross-entropy read a row once for its statistics with the online (streaming)
// log-sum-exp: each thread keeps (max m, sum s of exp(x - m)) and rescales s when m grows, and the
// pairs merge as (max, s1 exp(m1 - m) + s2 exp(m2 - m)). Rows behave as in the CPU kernels: a NaN
// (or +inf) anywhere makes the row NaN; a softmax row that is -inf everywhere gives zeros
// (log-softmax -inf); cross-entropy of such a row is NaN.
//
// Losses. The targets are checked first by a one-block kernel, which writes count, bad row and
// bad value into `stats` (and a total of 0); the row kernel reads the bad row from `stats` and does
// nothing when there is one (so lse and loss stay as they were), else writes lse / loss and each
// row's loss, in double, to a stream-ordered workspace; a one-block kernel then sums the workspace
// in a fixed order into the total. No floating-point atomics: the total is deterministic.
//
// Vocabulary-parallel cross-entropy shards. The row maximum reads the real columns of a row once;
// the forward reads them again with the group's maximum already known (no online rescaling); for a
// group of one rank both run in one pass (online); the backward maps the row once. All use the row groups above and reduce in a fixed order, so they
// are deterministic.
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "softmax.h"

namespace mpc {
namespace {

#ifdef MEGAPATCH_CUDA_EMULATOR
constexpr int kMaxRowThreads = 256;  // the emulator runs each thread as a fiber: keep blocks small
constexpr int kOneBlockThreads = 256;
constexpr int64_t kMaxGrid = 8;
#else
constexpr int kMaxRowThreads = 1024;
constexpr int kOneBlockThreads = 1024;
constexpr int64_t kMaxGrid = int64_t(1) << 24;
#endif
constexpr int kWarpRowMax = 1024;  // rows up to this many elements go one per warp
constexpr int kWarpBlock = 256;    // threads of a warp-per-row block
constexpr unsigned kFull = 0xffffffffu;

// LOSS_STATS of @megapatch/tensor (src/ops/softmax.ts)
constexpr int kStatCount = 0, kStatTotal = 1, kStatBadRow = 2, kStatBadValue = 3;

template <typename T> using Acc = typename Tr<T>::C;

MP_D float ex(float v) { return expf(v); }
MP_D double ex(double v) { return exp(v); }
MP_D float lg(float v) { return logf(v); }
MP_D double lg(double v) { return log(v); }
template <typename C> MP_D C pinf() { return static_cast<C>(INFINITY); }
template <typename C> MP_D C qnan() { return static_cast<C>(NAN); }

// ---- row groups -------------------------------------------------------------------------------
// kWarp: a warp per row (lane, 32 threads, rows by warp); otherwise the block.
template <bool kWarp> MP_D int g_tid() {
  return kWarp ? static_cast<int>(threadIdx.x % 32) : static_cast<int>(threadIdx.x);
}
template <bool kWarp> MP_D int g_size() { return kWarp ? 32 : static_cast<int>(blockDim.x); }
template <bool kWarp> MP_D int64_t g_first() {
  return kWarp ? static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32
               : static_cast<int64_t>(blockIdx.x);
}
template <bool kWarp> MP_D int64_t g_step() {
  return kWarp ? static_cast<int64_t>(gridDim.x) * (blockDim.x / 32) : static_cast<int64_t>(gridDim.x);
}

// Online log-sum-exp state of a set of values: max m, s = sum exp(v - m), and their plain sum sx
// (for label smoothing). m is never NaN; a NaN value makes s NaN, which every merge keeps.
template <typename C> struct Online {
  C m, s, sx;
};

template <bool kSum, typename C> MP_D void online_add(Online<C>& o, C v) {
  if (v > o.m) {
    o.s = o.s * ex(o.m - v) + C(1);
    o.m = v;
  } else {
    o.s += v == -pinf<C>() ? C(0) : ex(v - o.m);  // -inf adds 0 (also when m is -inf)
  }
  if (kSum) o.sx += v;
}

struct MergeOnline {
  template <typename C> MP_D Online<C> operator()(const Online<C>& a, const Online<C>& b) const {
    Online<C> r;
    r.m = a.m > b.m ? a.m : b.m;
    r.s = r.m == -pinf<C>() ? a.s + b.s : a.s * ex(a.m - r.m) + b.s * ex(b.m - r.m);
    r.sx = a.sx + b.sx;
    return r;
  }
};
struct SumOp {
  template <typename V> MP_D V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {  // NaN never wins (as std::max with the running maximum first)
  template <typename V> MP_D V operator()(V a, V b) const { return b > a ? b : a; }
};
struct MinOp {
  template <typename V> MP_D V operator()(V a, V b) const { return b < a ? b : a; }
};

template <typename V> MP_D V shfl_xor(V v, int o) { return __shfl_xor_sync(kFull, v, o); }
template <typename C> MP_D Online<C> shfl_xor(const Online<C>& v, int o) {
  return Online<C>{__shfl_xor_sync(kFull, v.m, o), __shfl_xor_sync(kFull, v.s, o), __shfl_xor_sync(kFull, v.sx, o)};
}
template <typename V> MP_D V shfl0(V v) { return __shfl_sync(kFull, v, 0); }
template <typename C> MP_D Online<C> shfl0(const Online<C>& v) {
  return Online<C>{__shfl_sync(kFull, v.m, 0), __shfl_sync(kFull, v.s, 0), __shfl_sync(kFull, v.sx, 0)};
}

// All-reduce over the warp; lane 0's result is broadcast, so every lane holds the same bits even
// where the compiler fused a multiply-add on one side of a non-symmetric merge.
template <typename V, typename Op> MP_D V warp_all(V v, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
  return shfl0(v);
}

// All-reduce over the group (warp or block); smem holds 32 values of V. Every thread of a block
// must call it (it has barriers); it starts with a barrier, so smem may be reused back to back.
template <bool kWarp, typename V, typename Op> MP_D V group_all(V v, Op op, V* smem) {
  v = warp_all(v, op);
  if (!kWarp) {
    const int nw = static_cast<int>(blockDim.x / 32);
    __syncthreads();
    if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
    __syncthreads();
    v = smem[0];
    for (int w = 1; w < nw; w++) v = op(v, smem[w]);
  }
  return v;
}

// ---- row access in 16-byte packs ----------------------------------------------------------------
template <typename T> struct alignas(16) Pack {
  T v[16 / sizeof(T)];
};

MP_D unsigned phase(const void* p) { return static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u); }

// Elements of a row at p before its first 16-byte boundary (n when p is not element-aligned).
template <typename T> MP_D int64_t lead(const T* p, int64_t n) {
  const unsigned a = phase(p);
  if (a % sizeof(T) != 0) return n;
  const int64_t h = static_cast<int64_t>(((16u - a) & 15u) / sizeof(T));
  return h < n ? h : n;
}

// f(a_j, b_j) for the elements j of a row of n that thread tid of nt owns (b_j is 0 when NI is 1).
// Two packs per thread are loaded before either is used, so that more loads are in flight.
template <int NI, typename T, typename F>
MP_D void row_read(const T* a, const T* b, int64_t n, int tid, int nt, F&& f) {
  using C = Acc<T>;
  constexpr int V = 16 / sizeof(T);
  int64_t h = lead(a, n);
  if (NI == 2 && phase(a) != phase(b)) h = n;
  for (int64_t j = tid; j < h; j += nt) f(Tr<T>::ld(a + j), NI == 2 ? Tr<T>::ld(b + j) : C(0));
  const int64_t nv = (n - h) / V;
  const Pack<T>* pa = reinterpret_cast<const Pack<T>*>(a + h);
  const Pack<T>* pb = reinterpret_cast<const Pack<T>*>((NI == 2 ? b : a) + h);
  auto use = [&](const Pack<T>& va, const Pack<T>& vb) {
    for (int i = 0; i < V; i++) f(Tr<T>::ld(&va.v[i]), NI == 2 ? Tr<T>::ld(&vb.v[i]) : C(0));
  };
  int64_t k = tid;
  for (; k + nt < nv; k += 2 * static_cast<int64_t>(nt)) {
    const Pack<T> a0 = pa[k], a1 = pa[k + nt];
    const Pack<T> b0 = NI == 2 ? pb[k] : a0, b1 = NI == 2 ? pb[k + nt] : a1;
    use(a0, b0);
    use(a1, b1);
  }
  if (k < nv) {
    const Pack<T> a0 = pa[k];
    const Pack<T> b0 = NI == 2 ? pb[k] : a0;
    use(a0, b0);
  }
  for (int64_t j = h + nv * V + tid; j < n; j += nt) f(Tr<T>::ld(a + j), NI == 2 ? Tr<T>::ld(b + j) : C(0));
}

// y_j = f(a_j, b_j, j) for the elements j of a row of n that thread tid of nt owns (NI inputs;
// the missing ones read as 0). Two packs per thread are loaded before either is stored.
template <int NI, typename T, typename F>
MP_D void row_map(T* y, const T* a, const T* b, int64_t n, int tid, int nt, F&& f) {
  using C = Acc<T>;
  constexpr int V = 16 / sizeof(T);
  int64_t h = lead(y, n);
  if ((NI >= 1 && phase(a) != phase(y)) || (NI == 2 && phase(b) != phase(y))) h = n;
  for (int64_t j = tid; j < h; j += nt)
    Tr<T>::st(y + j, f(NI >= 1 ? Tr<T>::ld(a + j) : C(0), NI == 2 ? Tr<T>::ld(b + j) : C(0), j));
  const int64_t nv = (n - h) / V;
  Pack<T>* py = reinterpret_cast<Pack<T>*>(y + h);
  const Pack<T>* pa = reinterpret_cast<const Pack<T>*>((NI >= 1 ? a : y) + h);
  const Pack<T>* pb = reinterpret_cast<const Pack<T>*>((NI == 2 ? b : NI == 1 ? a : y) + h);
  auto make = [&](const Pack<T>& va, const Pack<T>& vb, int64_t k) {
    const int64_t j0 = h + k * V;
    C r[V];
    for (int i = 0; i < V; i++)
      r[i] = f(NI >= 1 ? Tr<T>::ld(&va.v[i]) : C(0), NI == 2 ? Tr<T>::ld(&vb.v[i]) : C(0), j0 + i);
    Pack<T> out;
    round_store(out.v, r);
    return out;
  };
  int64_t k = tid;
  if (NI == 0) {
    const Pack<T> z{};
    for (; k < nv; k += nt) py[k] = make(z, z, k);
  } else {
    for (; k + nt < nv; k += 2 * static_cast<int64_t>(nt)) {
      const Pack<T> a0 = pa[k], a1 = pa[k + nt];
      const Pack<T> b0 = NI == 2 ? pb[k] : a0, b1 = NI == 2 ? pb[k + nt] : a1;
      py[k] = make(a0, b0, k);
      py[k + nt] = make(a1, b1, k + nt);
    }
    if (k < nv) {
      const Pack<T> a0 = pa[k];
      const Pack<T> b0 = NI == 2 ? pb[k] : a0;
      py[k] = make(a0, b0, k);
    }
  }
  for (int64_t j = h + nv * V + tid; j < n; j += nt)
    Tr<T>::st(y + j, f(NI >= 1 ? Tr<T>::ld(a + j) : C(0), NI == 2 ? Tr<T>::ld(b + j) : C(0), j));
}

// ---- softmax / log-softmax --------------------------------------------------------------------

template <typename T, bool kWarp>
__global__ void __launch_bounds__(kWarp ? kWarpBlock : kMaxRowThreads)
softmax_fwd_kernel(T* y, const T* x, int64_t rows, int64_t n, int is_log) {
  using C = Acc<T>;
  __shared__ Online<C> red[32];
  const int tid = g_tid<kWarp>(), nt = g_size<kWarp>();
  for (int64_t r = g_first<kWarp>(); r < rows; r += g_step<kWarp>()) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    Online<C> o{-pinf<C>(), C(0), C(0)};
    row_read<1>(xr, xr, n, tid, nt, [&](C v, C) { online_add<false>(o, v); });
    o = group_all<kWarp>(o, MergeOnline(), red);
    C m = o.m;
    const C s = o.s;
    if (s != s || m == pinf<C>()) {
      m = qnan<C>();  // a NaN (or +inf) in the row: NaN everywhere, as exp(inf - inf) gives
    } else if (m == -pinf<C>()) {
      // fully masked row: softmax is 0 everywhere (log-softmax -inf) instead of NaN
      const C fill = is_log ? -pinf<C>() : C(0);
      row_map<0>(yr, xr, xr, n, tid, nt, [&](C, C, int64_t) { return fill; });
      continue;
    }
    if (is_log) {
      const C ls = lg(s);  // (x - m) - log s: exact subtraction first for large logits
      row_map<1>(yr, xr, xr, n, tid, nt, [&](C v, C, int64_t) { return (v - m) - ls; });
    } else {
      const C inv = C(1) / s;
      row_map<1>(yr, xr, xr, n, tid, nt, [&](C v, C, int64_t) { return ex(v - m) * inv; });
    }
  }
}

// softmax: dx = y * (g - sum(g * y)); log-softmax: dx = g - exp(y) * sum(g), 0 on a row whose
// output is -inf everywhere.
template <typename T, bool kWarp>
__global__ void __launch_bounds__(kWarp ? kWarpBlock : kMaxRowThreads)
softmax_bwd_kernel(T* dx, const T* y, const T* g, int64_t rows, int64_t n, int is_log) {
  using C = Acc<T>;
  __shared__ C red[32];
  const int tid = g_tid<kWarp>(), nt = g_size<kWarp>();
  for (int64_t r = g_first<kWarp>(); r < rows; r += g_step<kWarp>()) {
    const T* yr = y + r * n;
    const T* gr = g + r * n;
    T* dr = dx + r * n;
    if (!is_log) {
      C dot = 0;
      row_read<2>(gr, yr, n, tid, nt, [&](C gv, C yv) { dot += gv * yv; });
      dot = group_all<kWarp>(dot, SumOp(), red);
      row_map<2>(dr, yr, gr, n, tid, nt, [&](C yv, C gv, int64_t) { return yv * (gv - dot); });
      continue;
    }
    C s = 0, ymax = -pinf<C>();
    row_read<2>(gr, yr, n, tid, nt, [&](C gv, C yv) {
      s += gv;
      ymax = yv > ymax ? yv : ymax;
    });
    s = group_all<kWarp>(s, SumOp(), red);
    ymax = group_all<kWarp>(ymax, MaxOp(), red);
    if (ymax == -pinf<C>()) {
      row_map<0>(dr, yr, yr, n, tid, nt, [&](C, C, int64_t) { return C(0); });
      continue;
    }
    row_map<2>(dr, gr, yr, n, tid, nt, [&](C gv, C yv, int64_t) { return gv - ex(yv) * s; });
  }
}

// ---- targets and loss statistics -----------------------------------------------------------------

// Class-index targets, int32 or int64, contiguous, read as int64.
struct Targets {
  const void* p;
  int wide;
  MP_D int64_t at(int64_t r) const {
    return wide ? static_cast<const int64_t*>(p)[r] : static_cast<int64_t>(static_cast<const int32_t*>(p)[r]);
  }
};

// stats = [non-ignored rows before the first bad one (all when none), 0, first bad row or -1, its
// target or 0]. One block.
__global__ void __launch_bounds__(kOneBlockThreads)
loss_check_kernel(Targets tg, int64_t rows, int64_t classes, int64_t ignore, double* stats) {
  __shared__ long long red[32];
  const int tid = threadIdx.x, nt = blockDim.x;
  constexpr int U = 4;  // targets loaded per thread before any is tested (loads in flight)
  long long first = LLONG_MAX;
  for (int64_t base = 0; base < rows && first == LLONG_MAX; base += static_cast<int64_t>(U) * nt) {
    int64_t v[U];
    for (int u = 0; u < U; u++) {
      const int64_t r = base + static_cast<int64_t>(u) * nt + tid;
      v[u] = r < rows ? tg.at(r) : ignore;
    }
    for (int u = 0; u < U; u++) {  // rows increase with u: the first hit is this thread's lowest
      if (first == LLONG_MAX && v[u] != ignore && (v[u] < 0 || v[u] >= classes))
        first = base + static_cast<int64_t>(u) * nt + tid;
    }
  }
  first = group_all<false>(first, MinOp(), red);
  const int64_t end = first == LLONG_MAX ? rows : static_cast<int64_t>(first);
  long long count = 0;
  for (int64_t base = 0; base < end; base += static_cast<int64_t>(U) * nt) {
    int64_t v[U];
    for (int u = 0; u < U; u++) {
      const int64_t r = base + static_cast<int64_t>(u) * nt + tid;
      v[u] = r < end ? tg.at(r) : ignore;
    }
    for (int u = 0; u < U; u++) count += v[u] != ignore ? 1 : 0;
  }
  count = group_all<false>(count, SumOp(), red);
  if (tid == 0) {
    stats[kStatCount] = static_cast<double>(count);
    stats[kStatTotal] = 0.0;
    stats[kStatBadRow] = first == LLONG_MAX ? -1.0 : static_cast<double>(first);
    stats[kStatBadValue] = first == LLONG_MAX ? 0.0 : static_cast<double>(tg.at(first));
  }
}

// stats total = sum of the row losses in ws, in a fixed order; nothing when a target was bad (the
// row kernel then wrote no row loss and the check kernel left the total 0). One block.
__global__ void __launch_bounds__(kOneBlockThreads)
loss_total_kernel(const double* ws, int64_t rows, double* stats) {
  __shared__ double red[32];
  if (stats[kStatBadRow] >= 0) return;
  const int tid = threadIdx.x, nt = blockDim.x;
  double s = 0;
  for (int64_t r = tid; r < rows; r += nt) s += ws[r];
  s = group_all<false>(s, SumOp(), red);
  if (tid == 0) stats[kStatTotal] = s;
}

// ---- cross-entropy ------------------------------------------------------------------------------

// loss_r = lse_r - (1 - eps) x[r, t_r] - eps mean_c x[r, c], lse_r = m + log(sum exp(x - m));
// ignored rows get lse 0 and loss 0 (and cost no pass over the row).
template <typename T, bool kWarp>
__global__ void __launch_bounds__(kWarp ? kWarpBlock : kMaxRowThreads)
ce_fwd_kernel(const T* x, Targets tg, Acc<T>* lse, T* loss, double* ws, const double* stats, int64_t rows,
              int64_t n, int64_t ignore, Acc<T> ceps, int smooth) {
  using C = Acc<T>;
  __shared__ Online<C> red[32];
  if (stats[kStatBadRow] >= 0) return;  // a bad target: lse and loss stay as they were
  const int tid = g_tid<kWarp>(), nt = g_size<kWarp>();
  for (int64_t r = g_first<kWarp>(); r < rows; r += g_step<kWarp>()) {
    const int64_t t = tg.at(r);
    if (t == ignore) {
      if (tid == 0) {
        lse[r] = C(0);
        if (loss) Tr<T>::st(loss + r, C(0));
        ws[r] = 0.0;
      }
      continue;
    }
    const T* xr = x + r * n;
    Online<C> o{-pinf<C>(), C(0), C(0)};
    if (smooth) {
      row_read<1>(xr, xr, n, tid, nt, [&](C v, C) { online_add<true>(o, v); });
    } else {
      row_read<1>(xr, xr, n, tid, nt, [&](C v, C) { online_add<false>(o, v); });
    }
    o = group_all<kWarp>(o, MergeOnline(), red);
    if (tid == 0) {
      // a row of -inf (exp(-inf - -inf)) or with +inf or NaN has lse NaN, as on the CPU
      const C l = (o.m == pinf<C>() || o.m == -pinf<C>()) ? qnan<C>() : o.m + lg(o.s);
      lse[r] = l;
      C value = l - (C(1) - ceps) * Tr<T>::ld(xr + t);
      if (smooth) value -= ceps * o.sx / static_cast<C>(n);  // skipped otherwise: -inf * 0 is NaN
      if (loss) Tr<T>::st(loss + r, value);
      ws[r] = static_cast<double>(value);
    }
  }
}

// dx[r, c] = (exp(x - lse) - eps / C - (1 - eps) [c == t_r]) * gout[r] * scale, 0 on rows whose
// target is ignored or out of range.
template <typename T, bool kWarp>
__global__ void __launch_bounds__(kWarp ? kWarpBlock : kMaxRowThreads)
ce_bwd_kernel(T* dx, const T* x, Targets tg, const Acc<T>* lse, const T* gout, int64_t gstride, int64_t rows,
              int64_t n, Acc<T> scale, int64_t ignore, Acc<T> off, Acc<T> hit) {
  using C = Acc<T>;
  const int tid = g_tid<kWarp>(), nt = g_size<kWarp>();
  for (int64_t r = g_first<kWarp>(); r < rows; r += g_step<kWarp>()) {
    const T* xr = x + r * n;
    T* dr = dx + r * n;
    const int64_t t = tg.at(r);
    if (t == ignore || t < 0 || t >= n) {
      row_map<0>(dr, xr, xr, n, tid, nt, [&](C, C, int64_t) { return C(0); });
      continue;
    }
    const C gs = Tr<T>::ld(gout + r * gstride) * scale, l = lse[r];
    row_map<1>(dr, xr, xr, n, tid, nt, [&](C v, C, int64_t j) {
      const C p = ex(v - l) - off;
      return (j == t ? p - hit : p) * gs;
    });
  }
}

// ---- NLL ------------------------------------------------------------------------------------------

// loss_r = -x[r, t_r] (0 on ignored rows), one thread per row.
template <typename T>
__global__ void nll_fwd_kernel(const T* x, Targets tg, T* loss, double* ws, const double* stats, int64_t rows,
                               int64_t n, int64_t ignore) {
  if (stats[kStatBadRow] >= 0) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += step) {
    const int64_t t = tg.at(r);
    const double v = t == ignore ? 0.0 : -static_cast<double>(Tr<T>::ld(x + r * n + t));
    if (loss) Tr<T>::st(loss + r, static_cast<Acc<T>>(v));
    ws[r] = v;
  }
}

// dx[r, t_r] = -gout[r] * scale, 0 elsewhere and on rows whose target is ignored or out of range.
template <typename T, bool kWarp>
__global__ void __launch_bounds__(kWarp ? kWarpBlock : kMaxRowThreads)
nll_bwd_kernel(T* dx, Targets tg, const T* gout, int64_t gstride, int64_t rows, int64_t n, Acc<T> scale,
               int64_t ignore) {
  using C = Acc<T>;
  const int tid = g_tid<kWarp>(), nt = g_size<kWarp>();
  for (int64_t r = g_first<kWarp>(); r < rows; r += g_step<kWarp>()) {
    T* dr = dx + r * n;
    const int64_t t = tg.at(r);
    const bool hit = t != ignore && t >= 0 && t < n;
    const C v = hit ? -Tr<T>::ld(gout + r * gstride) * scale : C(0);
    row_map<0>(dr, dr, dr, n, tid, nt, [&](C, C, int64_t j) { return hit && j == t ? v : C(0); });
  }
}

// ---- vocabulary-parallel cross-entropy shards ------------------------------------------------------

struct MaxNanOp {  // a NaN wins, as in the core amax
  template <typename V> MP_D V operator()(V a, V b) const { return a != a ? a : (b != b || b > a) ? b : a; }
};

// out = the maximum of the real columns [0, real) of each row; -inf when real is 0.
template <typename T, bool kWarp>
__global__ void __launch_bounds__(kWarp ? kWarpBlock : kMaxRowThreads)
ce_shard_max_kernel(const T* x, Acc<T>* out, int64_t rows, int64_t n, int64_t real) {
  using C = Acc<T>;
  __shared__ C red[32];
  const int tid = g_tid<kWarp>(), nt = g_size<kWarp>();
  for (int64_t r = g_first<kWarp>(); r < rows; r += g_step<kWarp>()) {
    const T* xr = x + r * n;
    C m = -pinf<C>();
    row_read<1>(xr, xr, real, tid, nt, [&](C v, C) { m = MaxNanOp()(m, v); });
    m = group_all<kWarp>(m, MaxNanOp(), red);
    if (tid == 0) out[r] = m;
  }
}

// Over the real columns [0, real) of a row, d = x - max: sum_exp = sum exp(d), shifted = sum d (kSum),
// predicted = d at the target's column when that column is a real one of this shard, else 0.
template <typename T, bool kWarp, bool kSum>
__global__ void __launch_bounds__(kWarp ? kWarpBlock : kMaxRowThreads)
ce_shard_fwd_kernel(const T* x, Targets tg, const Acc<T>* row_max, Acc<T>* pred, Acc<T>* sum_exp, Acc<T>* shifted,
                    int64_t rows, int64_t n, int64_t start, int64_t real) {
  using C = Acc<T>;
  __shared__ C red[32];
  const int tid = g_tid<kWarp>(), nt = g_size<kWarp>();
  for (int64_t r = g_first<kWarp>(); r < rows; r += g_step<kWarp>()) {
    const T* xr = x + r * n;
    const C m = row_max[r];
    C se = 0, sq = 0;
    row_read<1>(xr, xr, real, tid, nt, [&](C v, C) {
      const C d = v - m;
      se += ex(d);
      if (kSum) sq += d;
    });
    se = group_all<kWarp>(se, SumOp(), red);
    if (kSum) sq = group_all<kWarp>(sq, SumOp(), red);
    if (tid == 0) {
      sum_exp[r] = se;
      if (kSum) shifted[r] = sq;
      const int64_t t = tg.at(r) - start;
      pred[r] = t >= 0 && t < real ? Tr<T>::ld(xr + t) - m : C(0);
    }
  }
}

// Both of the above in one pass (a vocabulary held whole by one rank): the row's maximum with the
// max kernel's semantics (a NaN wins) beside the online (max, sum of exp) pair, merged over the
// group; then the statistics against that maximum. Where no NaN or +inf is in the row and some real
// logit is above -inf, the online pair's max is that maximum and its sum is sum exp(x - max); the
// others get the two-pass values exactly (NaN). shifted = sum x - real max.
template <typename T, bool kWarp, bool kSum>
__global__ void __launch_bounds__(kWarp ? kWarpBlock : kMaxRowThreads)
ce_shard_fused_kernel(const T* x, Targets tg, Acc<T>* row_max, Acc<T>* pred, Acc<T>* sum_exp, Acc<T>* shifted,
                      int64_t rows, int64_t n, int64_t start, int64_t real) {
  using C = Acc<T>;
  __shared__ Online<C> red[32];
  __shared__ C redm[32];
  const int tid = g_tid<kWarp>(), nt = g_size<kWarp>();
  for (int64_t r = g_first<kWarp>(); r < rows; r += g_step<kWarp>()) {
    const T* xr = x + r * n;
    Online<C> o{-pinf<C>(), C(0), C(0)};
    C mx = -pinf<C>();
    row_read<1>(xr, xr, real, tid, nt, [&](C v, C) {
      online_add<kSum>(o, v);
      mx = MaxNanOp()(mx, v);
    });
    o = group_all<kWarp>(o, MergeOnline(), red);
    mx = group_all<kWarp>(mx, MaxNanOp(), redm);
    if (tid == 0) {
      const bool bad = mx != mx || mx == pinf<C>() || (mx == -pinf<C>() && real > 0);
      row_max[r] = mx;
      sum_exp[r] = bad ? qnan<C>() : o.s;
      if (kSum) shifted[r] = real > 0 ? o.sx - static_cast<C>(real) * mx : C(0);
      const int64_t t = tg.at(r) - start;
      pred[r] = t >= 0 && t < real ? Tr<T>::ld(xr + t) - mx : C(0);
    }
  }
}

// dx = (exp((x - max) - lse) - off - hit [column is the target]) * grad[row] over the real
// columns, 0 on the padding ones (their logits are read but never used).
template <typename T, bool kWarp>
__global__ void __launch_bounds__(kWarp ? kWarpBlock : kMaxRowThreads)
ce_shard_bwd_kernel(T* dx, const T* x, Targets tg, const Acc<T>* row_max, const Acc<T>* lse, const Acc<T>* grad,
                    int64_t rows, int64_t n, int64_t start, int64_t real, Acc<T> off, Acc<T> hit) {
  using C = Acc<T>;
  const int tid = g_tid<kWarp>(), nt = g_size<kWarp>();
  for (int64_t r = g_first<kWarp>(); r < rows; r += g_step<kWarp>()) {
    const T* xr = x + r * n;
    T* dr = dx + r * n;
    const C m = row_max[r], l = lse[r], g = grad[r];
    const int64_t t = tg.at(r) - start;
    row_map<1>(dr, xr, xr, n, tid, nt, [&](C v, C, int64_t j) {
      if (j >= real) return C(0);
      const C p = ex((v - m) - l) - off;
      return (j == t ? p - hit : p) * g;
    });
  }
}

// ---- host -------------------------------------------------------------------------------------------

int64_t last_dim(const TensorArg& t) { return t.ndim == 0 ? 1 : t.shape[t.ndim - 1]; }

void require_contiguous(const TensorArg& t, const char* what) {
  if (!t.contiguous()) throw_error(std::string(what) + " must be contiguous");
}

void require_float(const TensorArg& t) {
  if (t.dtype != DType::F32 && t.dtype != DType::F64 && t.dtype != DType::BF16 && t.dtype != DType::F16)
    throw_error("expected a floating-point dtype");
}

Targets targets_of(const TensorArg& t, const char* op) {
  if (t.dtype != DType::I64 && t.dtype != DType::I32) throw_error(std::string(op) + ": target must be int64 or int32");
  require_contiguous(t, op);
  return Targets{t.data, t.dtype == DType::I64 ? 1 : 0};
}

void check_lse(const TensorArg& x, const TensorArg& lse, const char* op) {
  DType want = x.dtype == DType::F64 ? DType::F64 : DType::F32;
  if (lse.dtype != want) throw_error(std::string(op) + ": logsumexp buffer must be float32 (float64 for float64 input)");
  require_contiguous(lse, op);
}

void check_stats(const TensorArg& stats) {
  if (stats.dtype != DType::F64 || stats.numel() != 4 || !stats.contiguous())
    throw_error("loss kernel: stats must be a contiguous float64 [4] tensor");
}

// one element per row (the CPU kernels assume it; out of bounds is worse on a GPU)
void require_rows(const TensorArg& t, int64_t rows, const char* what) {
  if (t.numel() != rows)
    throw_error(std::string(what) + " must have one element per row (" + std::to_string(rows) + "), got " +
                std::to_string(t.numel()));
}

// the upstream gradient of a loss: one value per row, or one for all rows
int64_t gout_stride(const TensorArg& gout, int64_t rows, const char* op) {
  if (gout.numel() == 1) return 0;
  if (gout.numel() != rows)
    throw_error(std::string(op) + ": gradient must have one element per row (" + std::to_string(rows) +
                ") or one in all, got " + std::to_string(gout.numel()));
  return 1;
}

int pow2_at_least(int64_t v) {
  int r = 1;
  while (r < v && r < (1 << 30)) r <<= 1;
  return r;
}

// Launch geometry of a row kernel: a warp per row for short rows, else a block per row.
struct RowGeo {
  bool warp;
  unsigned grid, threads;
};

template <typename T> RowGeo row_geo(int64_t rows, int64_t n) {
  RowGeo g;
  if (n <= kWarpRowMax) {
    const int64_t per = kWarpBlock / 32;
    g.warp = true;
    g.threads = kWarpBlock;
    g.grid = static_cast<unsigned>(mn((rows + per - 1) / per, kMaxGrid));
  } else {
    const int64_t packs = (n * static_cast<int64_t>(sizeof(T)) + 15) / 16;
    g.warp = false;
    g.threads = static_cast<unsigned>(mn(mx(pow2_at_least((packs + 1) / 2), 128), kMaxRowThreads));
    g.grid = static_cast<unsigned>(mn(rows, kMaxGrid));
  }
  return g;
}

// Stream-ordered workspace. The emulator runs launches synchronously and has no memory pools:
// plain cudaMalloc / cudaFree are equivalent there.
void* ws_alloc(size_t bytes, cudaStream_t stream) {
  void* w = nullptr;
#ifdef MEGAPATCH_CUDA_EMULATOR
  (void)stream;
  check(cudaMalloc(&w, bytes), "loss: workspace");
#else
  check(cudaMallocAsync(&w, bytes, stream), "loss: workspace");
#endif
  return w;
}
void ws_free(void* w, cudaStream_t stream) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  (void)stream;
  check(cudaFree(w), "loss: workspace");
#else
  check(cudaFreeAsync(w, stream), "loss: workspace");
#endif
}

template <typename T>
void softmax_fwd_t(cudaStream_t s, const TensorArg& out, const TensorArg& x, int64_t rows, int64_t n, bool log) {
  const RowGeo g = row_geo<T>(rows, n);
  if (g.warp) {
    auto k = softmax_fwd_kernel<T, true>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, out.ptr<T>(), x.ptr<T>(), rows, n, log ? 1 : 0);
  } else {
    auto k = softmax_fwd_kernel<T, false>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, out.ptr<T>(), x.ptr<T>(), rows, n, log ? 1 : 0);
  }
  check_launch("softmax");
}

template <typename T>
void softmax_bwd_t(cudaStream_t s, const TensorArg& dx, const TensorArg& y, const TensorArg& gr, int64_t rows,
                   int64_t n, bool log) {
  const RowGeo g = row_geo<T>(rows, n);
  if (g.warp) {
    auto k = softmax_bwd_kernel<T, true>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, dx.ptr<T>(), y.ptr<T>(), gr.ptr<T>(), rows, n, log ? 1 : 0);
  } else {
    auto k = softmax_bwd_kernel<T, false>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, dx.ptr<T>(), y.ptr<T>(), gr.ptr<T>(), rows, n, log ? 1 : 0);
  }
  check_launch("softmaxBackward");
}

template <typename T>
void ce_fwd_t(cudaStream_t s, const TensorArg& x, const Targets& tg, const TensorArg& lse, const TensorArg* loss,
              double* ws, const double* stats, int64_t rows, int64_t n, int64_t ignore, double eps) {
  using C = Acc<T>;
  const RowGeo g = row_geo<T>(rows, n);
  T* lp = loss ? loss->ptr<T>() : nullptr;
  const C ceps = static_cast<C>(eps);
  const int smooth = eps != 0 ? 1 : 0;
  if (g.warp) {
    auto k = ce_fwd_kernel<T, true>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, x.ptr<T>(), tg, lse.ptr<C>(), lp, ws, stats, rows, n, ignore, ceps, smooth);
  } else {
    auto k = ce_fwd_kernel<T, false>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, x.ptr<T>(), tg, lse.ptr<C>(), lp, ws, stats, rows, n, ignore, ceps, smooth);
  }
  check_launch("crossEntropy");
}

template <typename T>
void ce_bwd_t(cudaStream_t s, const TensorArg& dx, const TensorArg& x, const Targets& tg, const TensorArg& lse,
              const TensorArg& gout, int64_t gstride, int64_t rows, int64_t n, double scale, int64_t ignore,
              double eps) {
  using C = Acc<T>;
  const RowGeo g = row_geo<T>(rows, n);
  const C cs = static_cast<C>(scale);
  const C off = static_cast<C>(eps / static_cast<double>(n)), hit = static_cast<C>(1 - eps);
  if (g.warp) {
    auto k = ce_bwd_kernel<T, true>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, dx.ptr<T>(), x.ptr<T>(), tg, lse.ptr<C>(), gout.ptr<T>(), gstride, rows,
              n, cs, ignore, off, hit);
  } else {
    auto k = ce_bwd_kernel<T, false>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, dx.ptr<T>(), x.ptr<T>(), tg, lse.ptr<C>(), gout.ptr<T>(), gstride, rows,
              n, cs, ignore, off, hit);
  }
  check_launch("crossEntropyBackward");
}

template <typename T>
void nll_fwd_t(cudaStream_t s, const TensorArg& x, const Targets& tg, const TensorArg* loss, double* ws,
               const double* stats, int64_t rows, int64_t n, int64_t ignore) {
  auto k = nll_fwd_kernel<T>;
  MP_LAUNCH(k, grid_for(rows), kThreads, 0, s, x.ptr<T>(), tg, loss ? loss->ptr<T>() : nullptr, ws, stats, rows, n,
            ignore);
  check_launch("nllLoss");
}

template <typename T>
void nll_bwd_t(cudaStream_t s, const TensorArg& dx, const Targets& tg, const TensorArg& gout, int64_t gstride,
               int64_t rows, int64_t n, double scale, int64_t ignore) {
  using C = Acc<T>;
  const RowGeo g = row_geo<T>(rows, n);
  const C cs = static_cast<C>(scale);
  if (g.warp) {
    auto k = nll_bwd_kernel<T, true>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, dx.ptr<T>(), tg, gout.ptr<T>(), gstride, rows, n, cs, ignore);
  } else {
    auto k = nll_bwd_kernel<T, false>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, dx.ptr<T>(), tg, gout.ptr<T>(), gstride, rows, n, cs, ignore);
  }
  check_launch("nllLossBackward");
}

template <typename T>
void ce_shard_max_t(cudaStream_t s, const TensorArg& out, const TensorArg& x, int64_t rows, int64_t n, int64_t real) {
  using C = Acc<T>;
  const RowGeo g = row_geo<T>(rows, real);
  if (g.warp) {
    auto k = ce_shard_max_kernel<T, true>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, x.ptr<T>(), out.ptr<C>(), rows, n, real);
  } else {
    auto k = ce_shard_max_kernel<T, false>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, x.ptr<T>(), out.ptr<C>(), rows, n, real);
  }
  check_launch("crossEntropyShardMax");
}

template <typename T, bool kSum>
void ce_shard_fwd_launch(cudaStream_t s, const RowGeo& g, const T* x, const Targets& tg, const Acc<T>* row_max,
                         Acc<T>* pred, Acc<T>* sum_exp, Acc<T>* shifted, int64_t rows, int64_t n, int64_t start,
                         int64_t real) {
  if (g.warp) {
    auto k = ce_shard_fwd_kernel<T, true, kSum>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, x, tg, row_max, pred, sum_exp, shifted, rows, n, start, real);
  } else {
    auto k = ce_shard_fwd_kernel<T, false, kSum>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, x, tg, row_max, pred, sum_exp, shifted, rows, n, start, real);
  }
}

template <typename T>
void ce_shard_fwd_t(cudaStream_t s, const TensorArg& pred, const TensorArg& sum_exp, const TensorArg* shifted,
                    const TensorArg& x, const Targets& tg, const TensorArg& row_max, int64_t rows, int64_t n,
                    int64_t start, int64_t real) {
  using C = Acc<T>;
  const RowGeo g = row_geo<T>(rows, real);
  if (shifted) {
    ce_shard_fwd_launch<T, true>(s, g, x.ptr<T>(), tg, row_max.ptr<C>(), pred.ptr<C>(), sum_exp.ptr<C>(),
                                 shifted->ptr<C>(), rows, n, start, real);
  } else {
    ce_shard_fwd_launch<T, false>(s, g, x.ptr<T>(), tg, row_max.ptr<C>(), pred.ptr<C>(), sum_exp.ptr<C>(), nullptr,
                                  rows, n, start, real);
  }
  check_launch("crossEntropyShard");
}

template <typename T, bool kSum>
void ce_shard_fused_launch(cudaStream_t s, const RowGeo& g, const T* x, const Targets& tg, Acc<T>* row_max,
                           Acc<T>* pred, Acc<T>* sum_exp, Acc<T>* shifted, int64_t rows, int64_t n, int64_t start,
                           int64_t real) {
  if (g.warp) {
    auto k = ce_shard_fused_kernel<T, true, kSum>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, x, tg, row_max, pred, sum_exp, shifted, rows, n, start, real);
  } else {
    auto k = ce_shard_fused_kernel<T, false, kSum>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, x, tg, row_max, pred, sum_exp, shifted, rows, n, start, real);
  }
}

template <typename T>
void ce_shard_fused_t(cudaStream_t s, const TensorArg& row_max, const TensorArg& pred, const TensorArg& sum_exp,
                      const TensorArg* shifted, const TensorArg& x, const Targets& tg, int64_t rows, int64_t n,
                      int64_t start, int64_t real) {
  using C = Acc<T>;
  const RowGeo g = row_geo<T>(rows, real);
  if (shifted) {
    ce_shard_fused_launch<T, true>(s, g, x.ptr<T>(), tg, row_max.ptr<C>(), pred.ptr<C>(), sum_exp.ptr<C>(),
                                   shifted->ptr<C>(), rows, n, start, real);
  } else {
    ce_shard_fused_launch<T, false>(s, g, x.ptr<T>(), tg, row_max.ptr<C>(), pred.ptr<C>(), sum_exp.ptr<C>(),
                                    nullptr, rows, n, start, real);
  }
  check_launch("crossEntropyShardMaxStats");
}

template <typename T>
void ce_shard_bwd_t(cudaStream_t s, const TensorArg& dx, const TensorArg& x, const Targets& tg,
                    const TensorArg& row_max, const TensorArg& lse, const TensorArg& grad, int64_t rows, int64_t n,
                    int64_t start, int64_t real, double alpha, int64_t vocab) {
  using C = Acc<T>;
  const RowGeo g = row_geo<T>(rows, n);
  const C off = static_cast<C>(alpha / static_cast<double>(vocab)), hit = static_cast<C>(1 - alpha);
  if (g.warp) {
    auto k = ce_shard_bwd_kernel<T, true>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, dx.ptr<T>(), x.ptr<T>(), tg, row_max.ptr<C>(), lse.ptr<C>(), grad.ptr<C>(),
              rows, n, start, real, off, hit);
  } else {
    auto k = ce_shard_bwd_kernel<T, false>;
    MP_LAUNCH(k, g.grid, g.threads, 0, s, dx.ptr<T>(), x.ptr<T>(), tg, row_max.ptr<C>(), lse.ptr<C>(), grad.ptr<C>(),
              rows, n, start, real, off, hit);
  }
  check_launch("crossEntropyShardBackward");
}

// A [rows] vector of the shard kernels, in the compute type of the logits.
void require_row_vector(const TensorArg& v, const TensorArg& x, int64_t rows, const char* op, const char* what) {
  const DType want = x.dtype == DType::F64 ? DType::F64 : DType::F32;
  if (v.dtype != want || !v.contiguous() || v.numel() != rows)
    throw_error(std::string(op) + ": " + what + " must be contiguous [" + std::to_string(rows) + "] in " +
                (want == DType::F64 ? "float64" : "float32"));
}

// Rows come from the target (with P = 0 the logits are empty but the rows exist); returns P.
int64_t shard_cols(const TensorArg& x, const TensorArg& target, int64_t real, const char* op) {
  require_contiguous(x, op);
  require_float(x);
  const int64_t n = last_dim(x), rows = target.numel();
  if (x.numel() != rows * n)
    throw_error(std::string(op) + ": logits must have one row of " + std::to_string(n) + " per target (" +
                std::to_string(rows) + " targets)");
  if (real < 0 || real > n)
    throw_error(std::string(op) + ": localReal must be in [0, " + std::to_string(n) + "], got " + std::to_string(real));
  return n;
}

// The target check that starts every loss: fills stats (total 0).
void launch_check(cudaStream_t s, const Targets& tg, int64_t rows, int64_t classes, int64_t ignore, double* stats) {
  MP_LAUNCH(loss_check_kernel, 1, kOneBlockThreads, 0, s, tg, rows, classes, ignore, stats);
  check_launch("loss target check");
}

void launch_total(cudaStream_t s, const double* ws, int64_t rows, double* stats) {
  MP_LAUNCH(loss_total_kernel, 1, kOneBlockThreads, 0, s, ws, rows, stats);
  check_launch("loss total");
}

}  // namespace

void softmax_forward(cudaStream_t s, const TensorArg& out, const TensorArg& x, bool log) {
  require_contiguous(x, "softmax: input");
  require_contiguous(out, "softmax: output");
  if (out.dtype != x.dtype) throw_error("softmax: output dtype must equal the input dtype");
  require_float(x);
  const int64_t n = last_dim(x), rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return;
  if (out.numel() != x.numel()) throw_error("softmax: output must have the input's element count");
  MPC_DISPATCH_FLOAT(x.dtype, softmax_fwd_t, s, out, x, rows, n, log);
}

void softmax_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& y, const TensorArg& g, bool log) {
  require_contiguous(y, "softmaxBackward: output");
  require_contiguous(g, "softmaxBackward: gradient");
  require_contiguous(dx, "softmaxBackward: input gradient");
  if (dx.dtype != y.dtype || g.dtype != y.dtype) throw_error("softmaxBackward: dtypes must match");
  require_float(y);
  const int64_t n = last_dim(y), rows = n == 0 ? 0 : y.numel() / n;
  if (rows == 0) return;
  if (dx.numel() != y.numel() || g.numel() != y.numel())
    throw_error("softmaxBackward: output, gradient and input gradient must have one element count");
  MPC_DISPATCH_FLOAT(y.dtype, softmax_bwd_t, s, dx, y, g, rows, n, log);
}

void cross_entropy_forward(cudaStream_t s, const TensorArg& x, const TensorArg& target, const TensorArg& lse,
                           const TensorArg* loss, int64_t ignore, double eps, const TensorArg& stats) {
  require_contiguous(x, "crossEntropy: input");
  check_lse(x, lse, "crossEntropy");
  if (loss && (loss->dtype != x.dtype || !loss->contiguous()))
    throw_error("crossEntropy: loss must be contiguous with the input dtype");
  Targets tg = targets_of(target, "crossEntropy");
  check_stats(stats);
  double* st = stats.ptr<double>();
  const int64_t n = last_dim(x), rows = n == 0 ? 0 : x.numel() / n;
  if (rows > 0) {
    require_float(x);
    require_rows(target, rows, "crossEntropy: target");
    require_rows(lse, rows, "crossEntropy: logsumexp buffer");
    if (loss) require_rows(*loss, rows, "crossEntropy: loss");
  }
  launch_check(s, tg, rows, n, ignore, st);
  if (rows == 0) return;
  double* ws = static_cast<double*>(ws_alloc(static_cast<size_t>(rows) * sizeof(double), s));
  MPC_DISPATCH_FLOAT(x.dtype, ce_fwd_t, s, x, tg, lse, loss, ws, st, rows, n, ignore, eps);
  launch_total(s, ws, rows, st);
  ws_free(ws, s);
}

void cross_entropy_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& x, const TensorArg& target,
                            const TensorArg& lse, const TensorArg& gout, double scale, int64_t ignore, double eps) {
  require_contiguous(x, "crossEntropyBackward: input");
  require_contiguous(dx, "crossEntropyBackward: input gradient");
  require_contiguous(gout, "crossEntropyBackward: gradient");
  check_lse(x, lse, "crossEntropyBackward");
  if (dx.dtype != x.dtype || gout.dtype != x.dtype) throw_error("crossEntropyBackward: dtypes must match");
  Targets tg = targets_of(target, "crossEntropyBackward");
  if (x.numel() == 0) return;
  require_float(x);
  const int64_t n = last_dim(x), rows = x.numel() / n;
  if (dx.numel() != x.numel()) throw_error("crossEntropyBackward: input gradient must have the input's element count");
  require_rows(target, rows, "crossEntropyBackward: target");
  require_rows(lse, rows, "crossEntropyBackward: logsumexp buffer");
  const int64_t gstride = gout_stride(gout, rows, "crossEntropyBackward");
  MPC_DISPATCH_FLOAT(x.dtype, ce_bwd_t, s, dx, x, tg, lse, gout, gstride, rows, n, scale, ignore, eps);
}

void nll_loss_forward(cudaStream_t s, const TensorArg& x, const TensorArg& target, const TensorArg* loss,
                      int64_t ignore, const TensorArg& stats) {
  require_contiguous(x, "nllLoss: input");
  if (loss && loss->dtype != x.dtype) throw_error("nllLoss: loss dtype must equal the input dtype");
  Targets tg = targets_of(target, "nllLoss");
  check_stats(stats);
  double* st = stats.ptr<double>();
  const int64_t n = last_dim(x), rows = n == 0 ? 0 : x.numel() / n;
  if (rows > 0) {
    require_float(x);
    require_rows(target, rows, "nllLoss: target");
    if (loss) {
      require_contiguous(*loss, "nllLoss: loss");
      require_rows(*loss, rows, "nllLoss: loss");
    }
  }
  launch_check(s, tg, rows, n, ignore, st);
  if (rows == 0) return;
  double* ws = static_cast<double*>(ws_alloc(static_cast<size_t>(rows) * sizeof(double), s));
  MPC_DISPATCH_FLOAT(x.dtype, nll_fwd_t, s, x, tg, loss, ws, st, rows, n, ignore);
  launch_total(s, ws, rows, st);
  ws_free(ws, s);
}

void nll_loss_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& target, const TensorArg& gout,
                       double scale, int64_t ignore) {
  require_contiguous(dx, "nllLossBackward: input gradient");
  require_contiguous(gout, "nllLossBackward: gradient");
  if (gout.dtype != dx.dtype) throw_error("nllLossBackward: dtypes must match");
  Targets tg = targets_of(target, "nllLossBackward");
  if (dx.numel() == 0) return;
  require_float(dx);
  const int64_t n = last_dim(dx), rows = dx.numel() / n;
  require_rows(target, rows, "nllLossBackward: target");
  const int64_t gstride = gout_stride(gout, rows, "nllLossBackward");
  MPC_DISPATCH_FLOAT(dx.dtype, nll_bwd_t, s, dx, tg, gout, gstride, rows, n, scale, ignore);
}

void cross_entropy_shard_max(cudaStream_t s, const TensorArg& row_max, const TensorArg& x, int64_t real) {
  const char* op = "crossEntropyShardMax";
  require_contiguous(x, op);
  require_float(x);
  const int64_t n = last_dim(x), rows = row_max.numel();
  if (x.numel() != rows * n) throw_error(std::string(op) + ": rowMax must have one element per row of the logits");
  if (real < 0 || real > n)
    throw_error(std::string(op) + ": localReal must be in [0, " + std::to_string(n) + "], got " + std::to_string(real));
  require_row_vector(row_max, x, rows, op, "rowMax");
  if (rows == 0) return;
  MPC_DISPATCH_FLOAT(x.dtype, ce_shard_max_t, s, row_max, x, rows, n, real);
}

void cross_entropy_shard_forward(cudaStream_t s, const TensorArg& predicted, const TensorArg& sum_exp,
                                 const TensorArg* shifted_sum, const TensorArg& x, const TensorArg& target,
                                 const TensorArg& row_max, int64_t start, int64_t real) {
  const char* op = "crossEntropyShard";
  Targets tg = targets_of(target, op);
  const int64_t n = shard_cols(x, target, real, op), rows = target.numel();
  require_row_vector(predicted, x, rows, op, "predicted");
  require_row_vector(sum_exp, x, rows, op, "sumExp");
  if (shifted_sum) require_row_vector(*shifted_sum, x, rows, op, "shiftedSum");
  require_row_vector(row_max, x, rows, op, "rowMax");
  if (rows == 0) return;
  MPC_DISPATCH_FLOAT(x.dtype, ce_shard_fwd_t, s, predicted, sum_exp, shifted_sum, x, tg, row_max, rows, n, start,
                     real);
}

void cross_entropy_shard_max_stats(cudaStream_t s, const TensorArg& row_max, const TensorArg& predicted,
                                   const TensorArg& sum_exp, const TensorArg* shifted_sum, const TensorArg& x,
                                   const TensorArg& target, int64_t start, int64_t real) {
  const char* op = "crossEntropyShardMaxStats";
  Targets tg = targets_of(target, op);
  const int64_t n = shard_cols(x, target, real, op), rows = target.numel();
  require_row_vector(row_max, x, rows, op, "rowMax");
  require_row_vector(predicted, x, rows, op, "predicted");
  require_row_vector(sum_exp, x, rows, op, "sumExp");
  if (shifted_sum) require_row_vector(*shifted_sum, x, rows, op, "shiftedSum");
  if (rows == 0) return;
  // MEGAPATCH_CE_ONE_PASS=0: the max kernel, then the forward's (two reads of the logits, the same
  // bits as a group of several ranks gets); for comparing the two on a GPU
  const char* e = std::getenv("MEGAPATCH_CE_ONE_PASS");
  if (e && e[0] == '0') {
    MPC_DISPATCH_FLOAT(x.dtype, ce_shard_max_t, s, row_max, x, rows, n, real);
    MPC_DISPATCH_FLOAT(x.dtype, ce_shard_fwd_t, s, predicted, sum_exp, shifted_sum, x, tg, row_max, rows, n, start,
                       real);
    return;
  }
  MPC_DISPATCH_FLOAT(x.dtype, ce_shard_fused_t, s, row_max, predicted, sum_exp, shifted_sum, x, tg, rows, n, start,
                     real);
}

void cross_entropy_shard_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& x, const TensorArg& target,
                                  const TensorArg& row_max, const TensorArg& lse, const TensorArg& grad,
                                  int64_t start, int64_t real, double alpha, int64_t vocab) {
  const char* op = "crossEntropyShardBackward";
  Targets tg = targets_of(target, op);
  const int64_t n = shard_cols(x, target, real, op), rows = target.numel();
  if (dx.dtype != x.dtype || !dx.contiguous() || dx.numel() != x.numel())
    throw_error(std::string(op) + ": dx must be contiguous like the logits, in their dtype");
  require_row_vector(row_max, x, rows, op, "rowMax");
  require_row_vector(lse, x, rows, op, "logSumExp");
  require_row_vector(grad, x, rows, op, "gradLoss");
  if (vocab < 1) throw_error(std::string(op) + ": vocabSize must be at least 1");
  if (x.numel() == 0) return;
  MPC_DISPATCH_FLOAT(x.dtype, ce_shard_bwd_t, s, dx, x, tg, row_max, lse, grad, rows, n, start, real, alpha, vocab);
}

}  // namespace mpc
