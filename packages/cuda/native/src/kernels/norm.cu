// LayerNorm / RMSNorm and RoPE (see norm.h), with the semantics of @megapatch/tensor's
// native/src/norm.cc and rope.cc: statistics and arithmetic in float for 16/32-bit inputs (double
// for float64), two-pass variance (mean, then squared deviations), the saved mean and rstd in that
// precision, and the same expressions evaluated in the same order.
//
// Norm forward / dx backward: a group of G threads per row, G = 32 (one warp per row, 4 rows per
// block) for rows of at most 1024 elements, else the whole block (128..1024 threads). The group's
// threads read consecutive vectors of 16 bytes when the row length and the pointers allow it
// (coalesced), reduce with warp shuffles and, for a block, per-warp partials in shared memory
// summed by every thread in the same order (deterministic; every thread gets the same bits). The
// row's values are kept in dynamic shared memory (compute type) between the passes when they fit,
// so x (and g) are read from global memory once. The forward of rows of 32 V nvl elements (nvl <= 16:
// bf16 rows of 256 .. 4096) instead keeps each row in a warp's registers (norm_fwd_warp_kernel).
//
// dweight / dbias, fused (the default for 16-byte rows whose cache fits): the dx kernel also sums
// g * xhat and g of the columns each thread owns over the rows it handles (a grid of at most
// kFusedBlocks blocks, several rows each), one partial row per block, added up by a second small
// kernel; g and x are read once. Otherwise a separate pass: chunks of rows per block of 32 x Y
// threads owning 32 (or 32 V) consecutive columns, thread (c, y) summing rows y, y + Y, ... of its
// column, the Y partials of a column added in order of y in shared memory, then the chunks' partials
// in order. Both orders are fixed by the shape: deterministic.
//
// RoPE: elementwise over (row, channel pair) with rows = B * H * S; thread x walks the D - R/2
// items of a row (R/2 rotated pairs, then the pass-through channels R..D), thread y the rows.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "norm.h"

// loop unrolling hints for nvcc (the host compiler of the emulator does not know the pragma)
#ifdef __CUDACC__
#define MPN_UNROLL _Pragma("unroll")
#define MPN_UNROLL4 _Pragma("unroll 4")
#else
#define MPN_UNROLL
#define MPN_UNROLL4
#endif

namespace mpc {
namespace {

// ---- helpers -----------------------------------------------------------------------------------

// V elements of T loaded or stored with one access (V * sizeof(T) bytes, aligned to that).
template <typename T, int V> struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// o = prev + o, each rounded to T: the gradient already in dx plus the new one (rounded first), as
// the binary add computes it
template <typename T, int V> MP_D void add_rounded(Vec<T, V>& o, const Vec<T, V>& prev) {
  using C = typename Tr<T>::C;
  C v[V];
MPN_UNROLL
  for (int k = 0; k < V; k++) v[k] = Tr<T>::ld(&prev.v[k]) + Tr<T>::ld(&o.v[k]);
  round_store(o.v, v);
}

MP_D float msqrt(float v) { return sqrtf(v); }
MP_D double msqrt(double v) { return sqrt(v); }

template <typename C> MP_D C warp_sum(C v) {
  // butterfly: every lane ends with the same bits (each step adds the same two values)
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums a and b over the row's group: the warp, or (blockDim.x > 32, then blockDim.y == 1) the
// block. Every thread of the group gets the same result. `red` is 64 values of shared memory.
template <typename C> MP_D void group_sum2(C& a, C& b, C* red) {
  a = warp_sum(a);
  b = warp_sum(b);
  if (blockDim.x > 32) {
    const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if ((threadIdx.x & 31) == 0) {
      red[warp] = a;
      red[32 + warp] = b;
    }
    __syncthreads();
    C sa = 0, sb = 0;
    for (int i = 0; i < nw; i++) {
      sa += red[i];
      sb += red[32 + i];
    }
    __syncthreads();  // red is reused by the next row
    a = sa;
    b = sb;
  }
}

// loads vector j of a row into f in the compute type
template <typename T, int V>
MP_D void load_vec(const T* row, int64_t j, typename Tr<T>::C (&f)[V]) {
  const Vec<T, V> q = reinterpret_cast<const Vec<T, V>*>(row)[j];
MPN_UNROLL
  for (int k = 0; k < V; k++) f[k] = Tr<T>::ld(&q.v[k]);
}

// ---- norm forward ------------------------------------------------------------------------------

// y = (x - mu) * rstd * w + b per row. Cache: the row in the compute type in dynamic shared
// memory (n values per row of the block; element k of vector j at k * nv + j, conflict-free).
template <typename T, bool Center, int V, bool Cache>
__global__ void __launch_bounds__(1024) norm_fwd_kernel(T* y, const T* x, const T* w, const T* b, typename Tr<T>::C* mean,
                                typename Tr<T>::C* rstd, int64_t rows, int64_t n, typename Tr<T>::C eps) {
  using C = typename Tr<T>::C;
  __shared__ C red[64];
  MP_DYNAMIC_SMEM(C, smem);
  C* cache = Cache ? smem + static_cast<int64_t>(threadIdx.y) * n : nullptr;
  const int G = blockDim.x, t = threadIdx.x;
  const int64_t nv = n / V;
  const C inv_n = C(1) / static_cast<C>(n);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const T* xr = x + r * n;
    C mu = 0;
    if (Center) {
      C s = 0, unused = 0;
      for (int64_t j = t; j < nv; j += G) {
        C f[V];
        load_vec<T, V>(xr, j, f);
MPN_UNROLL
        for (int k = 0; k < V; k++) {
          if (Cache) cache[k * nv + j] = f[k];
          s += f[k];
        }
      }
      group_sum2(s, unused, red);
      mu = s * inv_n;
    }
    // the second moment about the mean
    C ss = 0, unused = 0;
    for (int64_t j = t; j < nv; j += G) {
      C f[V];
      if (Cache && Center) {
MPN_UNROLL
        for (int k = 0; k < V; k++) f[k] = cache[k * nv + j];
      } else {
        load_vec<T, V>(xr, j, f);
        if (Cache) {
MPN_UNROLL
          for (int k = 0; k < V; k++) cache[k * nv + j] = f[k];
        }
      }
MPN_UNROLL
      for (int k = 0; k < V; k++) {
        C d = f[k] - mu;
        ss += d * d;
      }
    }
    group_sum2(ss, unused, red);
    const C rs = C(1) / msqrt(ss * inv_n + eps);
    if (t == 0) {
      if (mean) mean[r] = mu;
      rstd[r] = rs;
    }
    Vec<T, V>* yr = reinterpret_cast<Vec<T, V>*>(y + r * n);
    for (int64_t j = t; j < nv; j += G) {
      C f[V], fw[V] = {}, fb[V] = {};  // (initialised: quiets -Wmaybe-uninitialized)
      if (Cache) {
MPN_UNROLL
        for (int k = 0; k < V; k++) f[k] = cache[k * nv + j];
      } else {
        load_vec<T, V>(xr, j, f);
      }
      if (w) load_vec<T, V>(w, j, fw);
      if (b) load_vec<T, V>(b, j, fb);
      C v[V];
MPN_UNROLL
      for (int k = 0; k < V; k++) {
        v[k] = (f[k] - mu) * rs;
        if (w) v[k] = v[k] * fw[k];
        if (b) v[k] = v[k] + fb[k];
      }
      Vec<T, V> o;
      round_store(o.v, v);
      yr[j] = o;
    }
  }
}

// Register-resident rows (the default for rows of 32 V nvl elements, nvl <= MAXV, see
// fwd_launch_v): one warp per row, lane l holding vectors l, l + 32, ..., l + 32 (nvl - 1) of it
// (every load of the row issued before the first use: nvl 16-byte loads in flight a lane), the
// statistics reduced by warp shuffles alone: no shared memory, no barrier. The block-per-row
// kernel above ran at 2.1 TB/s on an H200 at the 1B step's rows of 2048 bf16 (run d): its blocks
// wait at their barriers between loading a row and storing it. Same expressions; the sums run in
// another order (each lane over its vectors, then the butterfly).
template <typename T, bool Center, int V, int MAXV>
__global__ void __launch_bounds__(128) norm_fwd_warp_kernel(T* y, const T* x, const T* w, const T* b,
                                                            typename Tr<T>::C* mean, typename Tr<T>::C* rstd,
                                                            int64_t rows, int64_t n, int nvl, typename Tr<T>::C eps) {
  using C = typename Tr<T>::C;
  using W = Vec<T, V>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const C inv_n = C(1) / static_cast<C>(n);
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
    const W* xr = reinterpret_cast<const W*>(x + r * n);
    W q[MAXV];
MPN_UNROLL
    for (int i = 0; i < MAXV; i++)
      if (i < nvl) q[i] = xr[lane + 32 * i];
    C mu = 0;
    if (Center) {
      C s = 0;
MPN_UNROLL
      for (int i = 0; i < MAXV; i++)
        if (i < nvl)
MPN_UNROLL
          for (int k = 0; k < V; k++) s += Tr<T>::ld(&q[i].v[k]);
      mu = warp_sum(s) * inv_n;
    }
    // the second moment about the mean
    C ss = 0;
MPN_UNROLL
    for (int i = 0; i < MAXV; i++)
      if (i < nvl)
MPN_UNROLL
        for (int k = 0; k < V; k++) {
          const C d = Tr<T>::ld(&q[i].v[k]) - mu;
          ss += d * d;
        }
    ss = warp_sum(ss);
    const C rs = C(1) / msqrt(ss * inv_n + eps);
    if (lane == 0) {
      if (mean) mean[r] = mu;
      rstd[r] = rs;
    }
    W* yr = reinterpret_cast<W*>(y + r * n);
MPN_UNROLL
    for (int i = 0; i < MAXV; i++) {
      if (i >= nvl) break;
      const int64_t j = lane + 32 * i;
      C fw[V] = {}, fb[V] = {};  // (initialised: quiets -Wmaybe-uninitialized)
      if (w) load_vec<T, V>(w, j, fw);
      if (b) load_vec<T, V>(b, j, fb);
      C v[V];
MPN_UNROLL
      for (int k = 0; k < V; k++) {
        v[k] = (Tr<T>::ld(&q[i].v[k]) - mu) * rs;
        if (w) v[k] = v[k] * fw[k];
        if (b) v[k] = v[k] + fb[k];
      }
      W o;
      round_store(o.v, v);
      yr[j] = o;
    }
  }
}

// Column c's sums over the first Y rows of two shared [rows][ld] partial arrays, in row order (the
// fixed order of the weight-gradient reductions).
template <typename C> MP_D void column_sums(const C* a, const C* b, int ld, int Y, int c, C& sa, C& sb) {
  sa = 0;
  sb = 0;
  for (int i = 0; i < Y; i++) {
    sa += a[i * ld + c];
    sb += b[i * ld + c];
  }
}

// ---- norm backward: dx -------------------------------------------------------------------------

// the fused weight-gradient variant's most threads a block (its registers: up to 255 a thread)
constexpr int kFusedThreads = 256;

// acc: dx holds a gradient already and gets dx + (the result rounded to T), the binary add's bits.
// With d = x - mu, dy = g * w: sdy = sum dy, sdyx = sum dy * d, k1 = mean(dy) (LayerNorm),
// k2 = sdyx * rstd / n, dx = rstd * (dy - k1 - d * rstd * k2). Cache: dy and d of the row
// (2n values per row of the block).
//
// PV > 0 (Cache only; every thread owns at most PV vectors of a row: t, t + G, ..., the same columns
// in every row it sees) also sums the weight / bias gradients of those columns over the rows this
// thread handles, in registers, with norm_params_kernel's expressions: after the last row the
// block's row groups are added in order of threadIdx.y through shared memory and written to the
// partials pw / pb [gridDim.x, n] (compute type; null: not wanted; PB: pb is wanted), which
// norm_partials_finish_kernel adds up. The grid depends only on the shape: deterministic. g and x
// are then read once per backward instead of twice (dx here, then the separate weight pass).
template <typename T, bool Center, int V, bool Cache, int PV = 0, bool PB = false>
__global__ void __launch_bounds__(PV > 0 ? kFusedThreads : 1024) norm_bwd_kernel(T* dx, const T* g, const T* x, const T* w, const typename Tr<T>::C* mean,
                                const typename Tr<T>::C* rstd, int64_t rows, int64_t n,
                                typename Tr<T>::C* pw, typename Tr<T>::C* pb, bool acc) {
  using C = typename Tr<T>::C;
  static_assert(PV == 0 || Cache, "the fused weight gradient reduces through the row cache");
  constexpr int NP = PV > 0 ? PV : 1;
  __shared__ C red[64];
  MP_DYNAMIC_SMEM(C, smem);
  C* cdy = Cache ? smem + static_cast<int64_t>(threadIdx.y) * 2 * n : nullptr;
  C* cd = Cache ? cdy + n : nullptr;
  const int G = blockDim.x, t = threadIdx.x;
  const int64_t nv = n / V;
  const C inv_n = C(1) / static_cast<C>(n);
  C aw[NP][V] = {}, ab[NP][V] = {};
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const T* xr = x + r * n;
    const T* gr = g + r * n;
    const C mu = mean ? mean[r] : C(0), rs = rstd[r];
    C sdy = 0, sdyx = 0;
    // with acc, at most 2 slots and no bias (RMSNorm, the Llama step's), the waiting gradient's
    // vectors of this thread, loaded with g and x (not after the row's reduction, where each load
    // would be a round trip of its own); elsewhere the registers would cost more than the wait
    // (ptxas, sm_90, bf16: 4 slots 90 -> 165-204, a bias 80 -> 95)
    constexpr bool kPre = PV > 0 && PV <= 2 && !PB;
    Vec<T, V> pv[kPre ? PV : 1];
    // vector j of the row; q: its slot among this thread's (PV > 0)
    auto first = [&](int64_t j, int q) {
      C fg[V], fx[V], fw[V] = {};
      if constexpr (kPre) {
        if (acc) pv[q] = reinterpret_cast<const Vec<T, V>*>(dx + r * n)[j];
      }
      load_vec<T, V>(gr, j, fg);
      load_vec<T, V>(xr, j, fx);
      if (w) load_vec<T, V>(w, j, fw);
MPN_UNROLL
      for (int k = 0; k < V; k++) {
        const C dy = w ? fg[k] * fw[k] : fg[k];
        const C d = fx[k] - mu;
        sdy += dy;
        sdyx += dy * d;
        if (Cache) {
          cdy[k * nv + j] = dy;
          cd[k * nv + j] = d;
        }
        if constexpr (PV > 0) {
          if (pw) aw[q][k] += fg[k] * ((fx[k] - mu) * rs);
          if constexpr (PB) ab[q][k] += fg[k];
        }
      }
    };
    if constexpr (PV > 0) {
MPN_UNROLL
      for (int q = 0; q < PV; q++) {
        const int64_t j = t + static_cast<int64_t>(q) * G;
        if (j < nv) first(j, q);
      }
    } else {
      for (int64_t j = t; j < nv; j += G) first(j, 0);
    }
    group_sum2(sdy, sdyx, red);
    // mean(dy * xhat) = rstd * mean(dy * (x - mu))
    const C k1 = Center ? sdy * inv_n : C(0), k2 = sdyx * rs * inv_n;
    Vec<T, V>* dr = reinterpret_cast<Vec<T, V>*>(dx + r * n);
    if constexpr (kPre) {
      // the slots' dx from the row cache, each added to its prefetched waiting vector
MPN_UNROLL
      for (int q = 0; q < PV; q++) {
        const int64_t j = t + static_cast<int64_t>(q) * G;
        if (j >= nv) continue;
        C v[V];
MPN_UNROLL
        for (int k = 0; k < V; k++) {
          const C dy = cdy[k * nv + j], xhat = cd[k * nv + j] * rs;
          v[k] = rs * (dy - k1 - xhat * k2);
        }
        Vec<T, V> o;
        round_store(o.v, v);
        if (acc) add_rounded(o, pv[q]);
        dr[j] = o;
      }
      continue;
    }
    for (int64_t j = t; j < nv; j += G) {
      C dy[V], d[V];
      if (Cache) {
MPN_UNROLL
        for (int k = 0; k < V; k++) {
          dy[k] = cdy[k * nv + j];
          d[k] = cd[k * nv + j];
        }
      } else {
        C fg[V], fw[V] = {};
        load_vec<T, V>(gr, j, fg);
        load_vec<T, V>(xr, j, d);
        if (w) load_vec<T, V>(w, j, fw);
MPN_UNROLL
        for (int k = 0; k < V; k++) {
          dy[k] = w ? fg[k] * fw[k] : fg[k];
          d[k] = d[k] - mu;
        }
      }
      C v[V];
MPN_UNROLL
      for (int k = 0; k < V; k++) {
        const C xhat = d[k] * rs;
        v[k] = rs * (dy[k] - k1 - xhat * k2);
      }
      Vec<T, V> o;
      round_store(o.v, v);
      if (acc) add_rounded(o, dr[j]);
      dr[j] = o;
    }
  }
  if constexpr (PV > 0) {
    // the row groups' sums through the cache (2n values a group: weight, then bias), in the
    // cache's conflict-free [k nv + j] order, then each column over threadIdx.y in order
    __syncthreads();  // the last row's cache reads are done
    C* sw = smem + static_cast<int64_t>(threadIdx.y) * 2 * n;
MPN_UNROLL
    for (int q = 0; q < PV; q++) {
      const int64_t j = t + static_cast<int64_t>(q) * G;
      if (j < nv) {
MPN_UNROLL
        for (int k = 0; k < V; k++) {
          sw[k * nv + j] = aw[q][k];
          sw[n + k * nv + j] = ab[q][k];
        }
      }
    }
    __syncthreads();
    const int Y = blockDim.y;
    for (int64_t c = static_cast<int64_t>(threadIdx.y) * G + t; c < n; c += static_cast<int64_t>(G) * Y) {
      const int64_t at = (c % V) * nv + c / V;
      C s_w = 0, s_b = 0;
      for (int y = 0; y < Y; y++) {
        s_w += smem[static_cast<int64_t>(y) * 2 * n + at];
        s_b += smem[static_cast<int64_t>(y) * 2 * n + n + at];
      }
      if (pw) pw[static_cast<int64_t>(blockIdx.x) * n + c] = s_w;
      if (pb) pb[static_cast<int64_t>(blockIdx.x) * n + c] = s_b;
    }
  }
}

// ---- norm backward: dweight / dbias ------------------------------------------------------------

constexpr int kParamCols = 32;
constexpr int kParamMaxY = 16;

// dw[j] = sum_r g[r, j] * ((x[r, j] - mu[r]) * rstd[r]), db[j] = sum_r g[r, j], in two launches:
// blockIdx.y = chunk c sums rows [c R, (c + 1) R) of the block's 32 columns (blockDim (32, Y): Y
// row groups, then a tree over them in shared memory) into the compute-type partials pw[c n + j],
// pb[c n + j]; norm_params_finish_kernel adds the chunks' partials in chunk order. Enough chunks
// run that the whole GPU works on the rows (one block per 32 columns alone left it mostly idle:
// 64 blocks for 2048 columns), and the order of the additions is fixed: deterministic.
template <typename T>
__global__ void __launch_bounds__(kParamCols * kParamMaxY)
    norm_params_kernel(typename Tr<T>::C* pw_out, typename Tr<T>::C* pb_out, const T* g, const T* x,
                       const typename Tr<T>::C* mean, const typename Tr<T>::C* rstd, int64_t rows, int64_t n,
                       int64_t rows_per_chunk, bool want_w) {
  using C = typename Tr<T>::C;
  __shared__ C pw[kParamMaxY][kParamCols + 1];
  __shared__ C pb[kParamMaxY][kParamCols + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, Y = blockDim.y;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * rows_per_chunk, r1 = mn(r0 + rows_per_chunk, rows);
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * kParamCols; c0 < n;
       c0 += static_cast<int64_t>(gridDim.x) * kParamCols) {
    const int64_t j = c0 + tx;
    C aw = 0, ab = 0;
    if (j < n) {
MPN_UNROLL4
      for (int64_t r = r0 + ty; r < r1; r += Y) {
        const C gv = Tr<T>::ld(g + r * n + j);
        if (want_w) {
          const C mu = mean ? mean[r] : C(0);
          aw += gv * ((Tr<T>::ld(x + r * n + j) - mu) * rstd[r]);
        }
        ab += gv;
      }
    }
    pw[ty][tx] = aw;
    pb[ty][tx] = ab;
    __syncthreads();
    if (ty == 0 && j < n) {
      C sw, sb;
      column_sums(&pw[0][0], &pb[0][0], kParamCols + 1, Y, tx, sw, sb);
      pw_out[chunk * n + j] = sw;
      pb_out[chunk * n + j] = sb;
    }
    __syncthreads();
  }
}

// norm_params_kernel with 16-byte loads: lane tx of a block sums the V adjacent columns
// c0 + tx V .. c0 + tx V + V - 1 (a warp reads 32 V columns of a row, 512 bytes for 16-bit data),
// rows r0 + ty, r0 + ty + Y, ... of its chunk, then the same tree over ty in shared memory. The
// rows each partial sums, and their order, are norm_params_kernel's for the same chunks.
template <typename T, int V>
__global__ void __launch_bounds__(kParamCols * kParamMaxY)
    norm_params_vec_kernel(typename Tr<T>::C* pw_out, typename Tr<T>::C* pb_out, const T* g, const T* x,
                           const typename Tr<T>::C* mean, const typename Tr<T>::C* rstd, int64_t rows, int64_t n,
                           int64_t rows_per_chunk, bool want_w) {
  using C = typename Tr<T>::C;
  constexpr int W = kParamCols * V;  // columns a block sums
  __shared__ C pw[kParamMaxY][W + 1];
  __shared__ C pb[kParamMaxY][W + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, Y = blockDim.y;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * rows_per_chunk, r1 = mn(r0 + rows_per_chunk, rows);
  const int64_t nv = n / V;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * kParamCols; c0 < nv;
       c0 += static_cast<int64_t>(gridDim.x) * kParamCols) {
    const int64_t jv = c0 + tx;  // the vector of V columns this lane sums
    C aw[V] = {}, ab[V] = {};
    if (jv < nv) {
MPN_UNROLL4
      for (int64_t r = r0 + ty; r < r1; r += Y) {
        C gv[V];
        load_vec<T, V>(g + r * n, jv, gv);
        if (want_w) {
          C xv[V];
          load_vec<T, V>(x + r * n, jv, xv);
          const C mu = mean ? mean[r] : C(0), rs = rstd[r];
MPN_UNROLL
          for (int k = 0; k < V; k++) aw[k] += gv[k] * ((xv[k] - mu) * rs);
        }
MPN_UNROLL
        for (int k = 0; k < V; k++) ab[k] += gv[k];
      }
    }
MPN_UNROLL
    for (int k = 0; k < V; k++) {
      pw[ty][tx * V + k] = aw[k];
      pb[ty][tx * V + k] = ab[k];
    }
    __syncthreads();
    // every thread of the block finishes some of the W columns, each over ty in order
    for (int col = ty * kParamCols + tx; col < W; col += Y * kParamCols) {
      const int64_t j = c0 * V + col;
      if (j < n) {
        C sw, sb;
        column_sums(&pw[0][0], &pb[0][0], W + 1, Y, col, sw, sb);
        pw_out[chunk * n + j] = sw;
        pb_out[chunk * n + j] = sb;
      }
    }
    __syncthreads();
  }
}

// a weight / bias gradient element: stored in T, or (acc32, the fp32 main gradient of
// gradient-accumulation fusion) added to a float32 element unrounded
template <typename T> MP_D void put_param(void* p, int64_t j, typename Tr<T>::C v, bool acc32) {
  if (acc32) static_cast<float*>(p)[j] += static_cast<float>(v);
  else Tr<T>::st(static_cast<T*>(p) + j, v);
}

template <typename T>
__global__ void norm_params_finish_kernel(void* dw, void* db, const typename Tr<T>::C* pw, const typename Tr<T>::C* pb,
                                          int64_t chunks, int64_t n, bool acc32) {
  using C = typename Tr<T>::C;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    C sw = 0, sb = 0;
    for (int64_t c = 0; c < chunks; c++) {
      sw += pw[c * n + j];
      sb += pb[c * n + j];
    }
    if (dw) put_param<T>(dw, j, sw, acc32);
    if (db) put_param<T>(db, j, sb, acc32);
  }
}

// dw[j] = sum_c pw[c n + j], db likewise, over the P partial rows of the fused backward: block
// (32 columns, Y), thread (x, y) sums partial rows y, y + Y, ... of its column, then the Y sums are
// added in order of y (fixed order: deterministic). Null dw / db: not wanted.
template <typename T>
__global__ void __launch_bounds__(kParamCols * kParamMaxY)
    norm_partials_finish_kernel(void* dw, void* db, const typename Tr<T>::C* pw, const typename Tr<T>::C* pb, int64_t P,
                                int64_t n, bool acc32) {
  using C = typename Tr<T>::C;
  __shared__ C sw[kParamMaxY][kParamCols + 1];
  __shared__ C sb[kParamMaxY][kParamCols + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, Y = blockDim.y;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * kParamCols; c0 < n;
       c0 += static_cast<int64_t>(gridDim.x) * kParamCols) {
    const int64_t j = c0 + tx;
    C aw = 0, ab = 0;
    if (j < n) {
MPN_UNROLL4
      for (int64_t c = ty; c < P; c += Y) {
        if (dw) aw += pw[c * n + j];
        if (db) ab += pb[c * n + j];
      }
    }
    sw[ty][tx] = aw;
    sb[ty][tx] = ab;
    __syncthreads();
    if (ty == 0 && j < n) {
      C s_w, s_b;
      column_sums(&sw[0][0], &sb[0][0], kParamCols + 1, Y, tx, s_w, s_b);
      if (dw) put_param<T>(dw, j, s_w, acc32);
      if (db) put_param<T>(db, j, s_b, acc32);
    }
    __syncthreads();
  }
}

// ---- RoPE --------------------------------------------------------------------------------------

struct RopeGeo {
  int64_t H, S, half, m, rows;  // m = D - half items per row
  int64_t xs[4], os[4], cs[3], ss[3];  // element strides
};

template <typename TX, typename TC> struct RopeComputeT { using type = float; };
template <typename TC> struct RopeComputeT<double, TC> { using type = double; };
template <typename TX> struct RopeComputeT<TX, double> { using type = double; };
template <> struct RopeComputeT<double, double> { using type = double; };

// forward  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
// inverse  y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1
// (one function for both kernels below: the same expressions, so the same contractions)
template <typename C>
MP_D void rope_pair(C x1, C x2, C c1, C c2, C s1, C s2, int inverse, C& y1, C& y2) {
  if (inverse) {
    y1 = x1 * c1 + x2 * s2;
    y2 = x2 * c2 - x1 * s1;
  } else {
    y1 = x1 * c1 - x2 * s1;
    y2 = x2 * c2 + x1 * s2;
  }
}

// Any strides and rotary widths: one row (b, h, s) per thread row, one pair per thread.
template <typename TX, typename TC>
__global__ void rope_kernel(TX* out, const TX* x, const TC* cs, const TC* sn, RopeGeo geo, int inverse) {
  using C = typename RopeComputeT<TX, TC>::type;
  using XC = typename Tr<TX>::C;
  const int64_t half = geo.half;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < geo.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t s = row % geo.S, bh = row / geo.S, h = bh % geo.H, b = bh / geo.H;
    const TX* xr = x + b * geo.xs[0] + h * geo.xs[1] + s * geo.xs[2];
    TX* o = out + b * geo.os[0] + h * geo.os[1] + s * geo.os[2];
    const TC* c = cs + b * geo.cs[0] + s * geo.cs[1];
    const TC* sv = sn + b * geo.ss[0] + s * geo.ss[1];
    const int64_t xs = geo.xs[3], os = geo.os[3], ccs = geo.cs[2], sns = geo.ss[2];
    for (int64_t j = threadIdx.x; j < geo.m; j += blockDim.x) {
      if (j < half) {
        const C x1 = static_cast<C>(Tr<TX>::ld(xr + j * xs)), x2 = static_cast<C>(Tr<TX>::ld(xr + (j + half) * xs));
        const C c1 = static_cast<C>(Tr<TC>::ld(c + j * ccs)), c2 = static_cast<C>(Tr<TC>::ld(c + (j + half) * ccs));
        const C s1 = static_cast<C>(Tr<TC>::ld(sv + j * sns)), s2 = static_cast<C>(Tr<TC>::ld(sv + (j + half) * sns));
        C y1, y2;
        rope_pair(x1, x2, c1, c2, s1, s2, inverse, y1, y2);
        Tr<TX>::st(o + j * os, static_cast<XC>(y1));
        Tr<TX>::st(o + (j + half) * os, static_cast<XC>(y2));
      } else {
        const int64_t jj = j + half;  // R .. D: copied unchanged
        o[jj * os] = xr[jj * xs];
      }
    }
  }
}

// The fast path (rope_vec_ok): the rotary dimension is the head dim, x, out, cos and sin rows are
// contiguous and their row strides and addresses aligned to packs of V elements. Thread `it` owns
// V pairs (columns c V .. c V + V - 1 and their partners half on) of position (b, s) and applies
// its cos/sin, read once, to the HC heads blockIdx.y HC .. + HC - 1: one 16-byte load / store per
// V elements of x and out, index arithmetic in 32 bits (B S half / V < 2^31). The generic kernel
// above moves one pair per thread with two 64-bit divisions a row (0.78 TB/s on an H200 in the
// 1B training step). Same arithmetic per element as rope_kernel (rope_pair).
constexpr int kRopeHeads = 4;
template <typename TX, typename TC, int V>
__global__ void rope_vec_kernel(TX* out, const TX* x, const TC* cs, const TC* sn, RopeGeo geo, uint32_t cpr,
                                uint32_t items, int inverse) {
  using XC = typename Tr<TX>::C;
  const uint32_t it = blockIdx.x * blockDim.x + threadIdx.x;
  if (it >= items) return;
  const uint32_t pos = it / cpr, c = it - pos * cpr;  // pos = b S + s
  const uint32_t S = static_cast<uint32_t>(geo.S), b = pos / S, s = pos - b * S;
  const int64_t j = static_cast<int64_t>(c) * V, half = geo.half;
  const TC* cr = cs + b * geo.cs[0] + s * geo.cs[1] + j;
  const TC* sr = sn + b * geo.ss[0] + s * geo.ss[1] + j;
  const Pack<TC, V> c1 = *reinterpret_cast<const Pack<TC, V>*>(cr);
  const Pack<TC, V> c2 = *reinterpret_cast<const Pack<TC, V>*>(cr + half);
  const Pack<TC, V> s1 = *reinterpret_cast<const Pack<TC, V>*>(sr);
  const Pack<TC, V> s2 = *reinterpret_cast<const Pack<TC, V>*>(sr + half);
  const TX* xr = x + b * geo.xs[0] + s * geo.xs[2] + j;
  TX* orow = out + b * geo.os[0] + s * geo.os[2] + j;
  const int64_t h0 = static_cast<int64_t>(blockIdx.y) * kRopeHeads;
  const int nh = static_cast<int>(mn(static_cast<int64_t>(kRopeHeads), geo.H - h0));
  // every head's packs are loaded before the first store (out may alias x: in place), so the
  // thread has its 2 kRopeHeads loads in flight at once instead of two a head
  Pack<TX, V> a[kRopeHeads], bb[kRopeHeads];
MPN_UNROLL
  for (int q = 0; q < kRopeHeads; q++) {
    if (q < nh) {
      const TX* xh = xr + (h0 + q) * geo.xs[1];
      a[q] = *reinterpret_cast<const Pack<TX, V>*>(xh);
      bb[q] = *reinterpret_cast<const Pack<TX, V>*>(xh + half);
    }
  }
MPN_UNROLL
  for (int q = 0; q < kRopeHeads; q++) {
    if (q >= nh) break;
    XC v1[V], v2[V];
MPN_UNROLL
    for (int e = 0; e < V; e++) {
      float r1, r2;
      rope_pair<float>(Tr<TX>::ld(&a[q].v[e]), Tr<TX>::ld(&bb[q].v[e]), Tr<TC>::ld(&c1.v[e]), Tr<TC>::ld(&c2.v[e]),
                       Tr<TC>::ld(&s1.v[e]), Tr<TC>::ld(&s2.v[e]), inverse, r1, r2);
      v1[e] = static_cast<XC>(r1);
      v2[e] = static_cast<XC>(r2);
    }
    Pack<TX, V> y1, y2;
    round_store(y1.v, v1);
    round_store(y2.v, v2);
    TX* oh = orow + (h0 + q) * geo.os[1];
    *reinterpret_cast<Pack<TX, V>*>(oh) = y1;
    *reinterpret_cast<Pack<TX, V>*>(oh + half) = y2;
  }
}

// ---- host --------------------------------------------------------------------------------------

#ifdef MEGAPATCH_CUDA_EMULATOR
constexpr int64_t kMaxGrid = 4;     // few blocks: the grid-stride loops run
constexpr int kMaxRowThreads = 256;
constexpr int kParamY = 8;
#else
constexpr int64_t kMaxGrid = 1 << 20;
constexpr int kMaxRowThreads = 1024;
constexpr int kParamY = kParamMaxY;
#endif
constexpr int64_t kParamBlocks = 2048;   // the weight-gradient pass: blocks to aim for
constexpr int kFusedPV = 4;              // the fused backward: vectors a thread may own (registers)
#ifdef MEGAPATCH_CUDA_EMULATOR
constexpr int64_t kFusedBlocks = 3;      // few blocks: several rows a block, partial rows summed
#else
constexpr int64_t kFusedBlocks = 512;    // the fused backward's grid at most (partial rows of dw)
#endif
constexpr int64_t kParamChunkRows = 64;  // and the fewest rows a block sums
constexpr int64_t kWarpRowMax = 1024;  // rows up to this many elements: one warp per row
constexpr int kWarpRows = 4;           // rows (warps) per block then
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kMaxCacheBytes = 96 * 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// MEGAPATCH_NORM_BWD_FUSED=0 keeps the separate weight-gradient pass (the fused one is the default)
bool fused_norm_backward() {
  const char* e = std::getenv("MEGAPATCH_NORM_BWD_FUSED");
  return !(e && std::strcmp(e, "0") == 0);
}

// MEGAPATCH_NORM_FWD=block keeps the block-per-row forward for the rows the warp kernel takes
bool warp_norm_forward() {
  const char* e = std::getenv("MEGAPATCH_NORM_FWD");
  return !(e && std::strcmp(e, "block") == 0);
}

inline void fail_if(bool bad, const std::string& msg) {
  if (bad) throw_error(msg);
}

void check_param(const TensorArg* p, const TensorArg& x, int64_t n, const char* what) {
  if (!p) return;
  fail_if(p->dtype != x.dtype, std::string("norm: ") + what + " dtype must equal the input dtype");
  fail_if(!(p->contiguous() && p->numel() == n), std::string("norm: ") + what + " must be contiguous with N elements");
}

void check_stat(const TensorArg* s, const TensorArg& x, int64_t rows, const char* what) {
  if (!s) return;
  DType want = x.dtype == DType::F64 ? DType::F64 : DType::F32;
  fail_if(s->dtype != want, std::string("norm: ") + what + " must be float32 (float64 for float64 input)");
  fail_if(!(s->contiguous() && s->numel() == rows),
          std::string("norm: ") + what + " must be contiguous with one value per row");
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The row geometry of a norm launch: group size G (blockDim.x), rows per block (blockDim.y), grid.
struct RowPlan {
  dim3 block, grid;
};
inline RowPlan row_plan(int64_t rows, int64_t n, int64_t nv) {
  RowPlan p;
  if (n <= kWarpRowMax) {
    p.block = dim3(32, kWarpRows);
  } else {
    // about 4 vectors per thread, 128 .. kMaxRowThreads threads
    int64_t G = ceil_div(ceil_div(nv, 4), 32) * 32;
    G = mx(mn(G, static_cast<int64_t>(kMaxRowThreads)), static_cast<int64_t>(128));
    p.block = dim3(static_cast<unsigned>(G), 1);
  }
  p.grid = dim3(static_cast<unsigned>(mx(mn(ceil_div(rows, p.block.y), kMaxGrid), static_cast<int64_t>(1))));
  return p;
}

template <typename K> void allow_smem(K k, size_t bytes) {
  if (bytes > kDefaultSmem)
    check(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
          "norm: shared memory");
}

template <typename T, bool Center, int V>
void fwd_launch_v(cudaStream_t s, T* y, const T* x, const T* w, const T* b, typename Tr<T>::C* mean,
                  typename Tr<T>::C* rstd, int64_t rows, int64_t n, double eps) {
  using C = typename Tr<T>::C;
  const C ceps = static_cast<C>(eps);
  // rows of 32 V nvl elements (nvl <= 16) in registers, a warp each (norm_fwd_warp_kernel), unless
  // MEGAPATCH_NORM_FWD=block
  if constexpr (V > 1 && sizeof(C) == 4) {
    const int64_t nvl = n / (32 * V);
    if (n % (32 * V) == 0 && nvl >= 1 && nvl <= 16 && warp_norm_forward()) {
      const int64_t blocks = mx(mn(ceil_div(rows, int64_t(4)), kMaxGrid), int64_t(1));
      if (nvl <= 4) {
        auto k = norm_fwd_warp_kernel<T, Center, V, 4>;
        MP_LAUNCH(k, dim3(static_cast<unsigned>(blocks)), dim3(128), 0, s, y, x, w, b, mean, rstd, rows, n,
                  static_cast<int>(nvl), ceps);
      } else if (nvl <= 8) {
        auto k = norm_fwd_warp_kernel<T, Center, V, 8>;
        MP_LAUNCH(k, dim3(static_cast<unsigned>(blocks)), dim3(128), 0, s, y, x, w, b, mean, rstd, rows, n,
                  static_cast<int>(nvl), ceps);
      } else {
        auto k = norm_fwd_warp_kernel<T, Center, V, 16>;
        MP_LAUNCH(k, dim3(static_cast<unsigned>(blocks)), dim3(128), 0, s, y, x, w, b, mean, rstd, rows, n,
                  static_cast<int>(nvl), ceps);
      }
      check_launch("norm_forward");
      return;
    }
  }
  const RowPlan p = row_plan(rows, n, n / V);
  const size_t bytes = static_cast<size_t>(p.block.y) * static_cast<size_t>(n) * sizeof(C);
  if (bytes <= kMaxCacheBytes) {
    auto k = norm_fwd_kernel<T, Center, V, true>;
    allow_smem(k, bytes);
    MP_LAUNCH(k, p.grid, p.block, bytes, s, y, x, w, b, mean, rstd, rows, n, ceps);
  } else {
    auto k = norm_fwd_kernel<T, Center, V, false>;
    MP_LAUNCH(k, p.grid, p.block, 0, s, y, x, w, b, mean, rstd, rows, n, ceps);
  }
  check_launch("norm_forward");
}

template <typename T>
void fwd_typed(cudaStream_t s, const TensorArg& y, const TensorArg& x, const TensorArg* w, const TensorArg* b,
               const TensorArg* mean, const TensorArg& rstd, int64_t rows, int64_t n, double eps, bool center) {
  using C = typename Tr<T>::C;
  T* yp = y.ptr<T>();
  const T* xp = x.ptr<T>();
  const T* wp = w ? w->ptr<T>() : nullptr;
  const T* bp = b ? b->ptr<T>() : nullptr;
  C* mp = mean ? mean->ptr<C>() : nullptr;
  C* rp = rstd.ptr<C>();
  constexpr int V = 16 / sizeof(T);
  const bool vec = n % V == 0 && aligned16(yp) && aligned16(xp) && (!wp || aligned16(wp)) && (!bp || aligned16(bp));
  if (vec) {
    if (center) fwd_launch_v<T, true, V>(s, yp, xp, wp, bp, mp, rp, rows, n, eps);
    else fwd_launch_v<T, false, V>(s, yp, xp, wp, bp, mp, rp, rows, n, eps);
  } else {
    if (center) fwd_launch_v<T, true, 1>(s, yp, xp, wp, bp, mp, rp, rows, n, eps);
    else fwd_launch_v<T, false, 1>(s, yp, xp, wp, bp, mp, rp, rows, n, eps);
  }
}

template <typename T>
void params_launch(cudaStream_t s, const TensorArg* dw, const TensorArg* db, const TensorArg& g, const TensorArg& x,
                   const typename Tr<T>::C* mp, const typename Tr<T>::C* rp, int64_t rows, int64_t n, bool acc32) {
  using C = typename Tr<T>::C;
  // 16-byte loads where every row starts 16-byte aligned (each block then sums 32 V columns)
  constexpr int V = 16 / sizeof(T);
  const bool vec = V > 1 && n % V == 0 && aligned16(g.ptr<T>()) && aligned16(x.ptr<T>());
  // about kParamBlocks blocks in all, chunks of at least kParamChunkRows rows
  const int64_t tiles = mx(ceil_div(n, kParamCols * (vec ? V : 1)), int64_t(1));
  const int64_t chunks = mx(mn(mn(ceil_div(kParamBlocks, tiles), ceil_div(rows, kParamChunkRows)), int64_t(65535)),
                            int64_t(1));
  const int64_t per = mx(ceil_div(rows, chunks), int64_t(1));
  Scratch ws(static_cast<size_t>(2 * chunks * n) * sizeof(C), s);
  C* pw = ws.at<C>();
  C* pb = pw + chunks * n;
  dim3 block(kParamCols, kParamY);
  dim3 grid(static_cast<unsigned>(mn(tiles, kMaxGrid)), static_cast<unsigned>(chunks));
  if (vec) {
    auto k = norm_params_vec_kernel<T, V>;
    MP_LAUNCH(k, grid, block, 0, s, pw, pb, g.ptr<T>(), x.ptr<T>(), mp, rp, rows, n, per, dw != nullptr);
  } else {
    auto k = norm_params_kernel<T>;
    MP_LAUNCH(k, grid, block, 0, s, pw, pb, g.ptr<T>(), x.ptr<T>(), mp, rp, rows, n, per, dw != nullptr);
  }
  check_launch("norm_backward_params");
  auto f = norm_params_finish_kernel<T>;
  MP_LAUNCH(f, grid_for(n), kThreads, 0, s, dw ? static_cast<void*>(dw->data) : nullptr,
            db ? static_cast<void*>(db->data) : nullptr, static_cast<const C*>(pw), static_cast<const C*>(pb), chunks, n,
            acc32);
  check_launch("norm_backward_params (finish)");
}

// The fused backward (dx and the weight / bias gradients in one pass over g and x, see
// norm_bwd_kernel's PV) where the row cache fits and each thread owns at most kFusedPV vectors;
// false: not taken (the caller runs the separate weight pass).
template <typename T, bool Center, int V>
bool bwd_fused_launch_v(cudaStream_t s, T* dx, const T* g, const T* x, const T* w, const typename Tr<T>::C* mean,
                        const typename Tr<T>::C* rstd, int64_t rows, int64_t n, void* dw, void* db, bool acc,
                        bool acc32) {
  using C = typename Tr<T>::C;
  const int64_t nv = n / V;
  RowPlan p = row_plan(rows, n, nv);
  const size_t bytes = static_cast<size_t>(p.block.y) * 2 * static_cast<size_t>(n) * sizeof(C);
  if (bytes > kMaxCacheBytes || ceil_div(nv, p.block.x) > kFusedPV || p.block.x * p.block.y > kFusedThreads ||
      (!dw && !db))
    return false;
  const int64_t P = mx(mn(ceil_div(rows, p.block.y), kFusedBlocks), int64_t(1));
  p.grid = dim3(static_cast<unsigned>(P));
  Scratch ws(static_cast<size_t>(2 * P * n) * sizeof(C), s);
  C* pw = dw ? ws.at<C>() : nullptr;
  C* pb = db ? ws.at<C>() + P * n : nullptr;
  // the fewest vector slots that hold a thread's share (registers: 2 or kFusedPV per gradient)
  const bool two = ceil_div(nv, p.block.x) <= 2;
  auto k = db ? (two ? norm_bwd_kernel<T, Center, V, true, 2, true> : norm_bwd_kernel<T, Center, V, true, kFusedPV, true>)
              : (two ? norm_bwd_kernel<T, Center, V, true, 2, false> : norm_bwd_kernel<T, Center, V, true, kFusedPV, false>);
  allow_smem(k, bytes);
  MP_LAUNCH(k, p.grid, p.block, bytes, s, dx, g, x, w, mean, rstd, rows, n, pw, pb, acc);
  check_launch("norm_backward (fused weight gradient)");
  auto f = norm_partials_finish_kernel<T>;
  const dim3 fblock(kParamCols, kParamY);
  const dim3 fgrid(static_cast<unsigned>(mn(ceil_div(n, kParamCols), kMaxGrid)));
  MP_LAUNCH(f, fgrid, fblock, 0, s, dw, db, static_cast<const C*>(pw), static_cast<const C*>(pb), P, n, acc32);
  check_launch("norm_backward (weight gradient partials)");
  return true;
}

template <typename T, bool Center, int V>
void bwd_launch_v(cudaStream_t s, T* dx, const T* g, const T* x, const T* w, const typename Tr<T>::C* mean,
                  const typename Tr<T>::C* rstd, int64_t rows, int64_t n, bool acc) {
  using C = typename Tr<T>::C;
  const RowPlan p = row_plan(rows, n, n / V);
  const size_t bytes = static_cast<size_t>(p.block.y) * 2 * static_cast<size_t>(n) * sizeof(C);
  if (bytes <= kMaxCacheBytes) {
    auto k = norm_bwd_kernel<T, Center, V, true>;
    allow_smem(k, bytes);
    MP_LAUNCH(k, p.grid, p.block, bytes, s, dx, g, x, w, mean, rstd, rows, n, static_cast<C*>(nullptr),
              static_cast<C*>(nullptr), acc);
  } else {
    auto k = norm_bwd_kernel<T, Center, V, false>;
    MP_LAUNCH(k, p.grid, p.block, 0, s, dx, g, x, w, mean, rstd, rows, n, static_cast<C*>(nullptr),
              static_cast<C*>(nullptr), acc);
  }
  check_launch("norm_backward");
}

template <typename T>
void bwd_typed(cudaStream_t s, const TensorArg& dx, const TensorArg& g, const TensorArg& x, const TensorArg* w,
               const TensorArg* mean, const TensorArg& rstd, const TensorArg* dw, const TensorArg* db, int64_t rows,
               int64_t n, bool center, bool acc, bool acc32) {
  using C = typename Tr<T>::C;
  T* dxp = dx.ptr<T>();
  const T* gp = g.ptr<T>();
  const T* xp = x.ptr<T>();
  const T* wp = w ? w->ptr<T>() : nullptr;
  const C* mp = mean ? mean->ptr<C>() : nullptr;
  const C* rp = rstd.ptr<C>();
  void* dwp = dw ? static_cast<void*>(dw->data) : nullptr;
  void* dbp = db ? static_cast<void*>(db->data) : nullptr;
  bool fused = false;
  if (rows > 0) {
    constexpr int V = 16 / sizeof(T);
    const bool vec = n % V == 0 && aligned16(dxp) && aligned16(gp) && aligned16(xp) && (!wp || aligned16(wp));
    // the fused weight gradient for 16-byte rows (MEGAPATCH_NORM_BWD_FUSED=0: the separate pass)
    if (vec && (dw || db) && fused_norm_backward()) {
      fused = center ? bwd_fused_launch_v<T, true, V>(s, dxp, gp, xp, wp, mp, rp, rows, n, dwp, dbp, acc, acc32)
                     : bwd_fused_launch_v<T, false, V>(s, dxp, gp, xp, wp, mp, rp, rows, n, dwp, dbp, acc, acc32);
    }
    if (fused) {
      // done
    } else if (vec) {
      if (center) bwd_launch_v<T, true, V>(s, dxp, gp, xp, wp, mp, rp, rows, n, acc);
      else bwd_launch_v<T, false, V>(s, dxp, gp, xp, wp, mp, rp, rows, n, acc);
    } else {
      if (center) bwd_launch_v<T, true, 1>(s, dxp, gp, xp, wp, mp, rp, rows, n, acc);
      else bwd_launch_v<T, false, 1>(s, dxp, gp, xp, wp, mp, rp, rows, n, acc);
    }
  }
  // zeros for 0 rows, as the CPU kernel
  if ((dw || db) && !fused) params_launch<T>(s, dw, db, g, x, mp, rp, rows, n, acc32);
}

constexpr int kRopeThreads = 128;
// rope_vec_kernel's conditions (see there)
bool rope_vec_ok(const RopeGeo& geo, const TensorArg& x, const TensorArg& out, const TensorArg& cs,
                 const TensorArg& sn, bool full, int V, size_t xbytes, size_t cbytes) {
  if (!full || geo.half % V != 0 || geo.H > 65535 * static_cast<int64_t>(kRopeHeads)) return false;
  if (geo.xs[3] != 1 || geo.os[3] != 1 || geo.cs[2] != 1 || geo.ss[2] != 1) return false;
  for (int i = 0; i < 3; i++)
    if (geo.xs[i] % V != 0 || geo.os[i] % V != 0) return false;
  for (int i = 0; i < 2; i++)
    if (geo.cs[i] % V != 0 || geo.ss[i] % V != 0) return false;
  const auto aligned = [](const void* p, size_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; };
  if (!aligned(x.data, V * xbytes) || !aligned(out.data, V * xbytes) || !aligned(cs.data, V * cbytes) ||
      !aligned(sn.data, V * cbytes))
    return false;
  const int64_t items = (geo.rows / geo.H) * (geo.half / V);  // B S half / V
  return items < (int64_t(1) << 31) - kRopeThreads;
}

template <typename TX, typename TC>
void rope_typed2(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& cs, const TensorArg& sn,
                 bool inverse) {
  RopeGeo geo;
  const int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3], R = cs.shape[2];
  geo.H = H;
  geo.S = S;
  geo.half = R / 2;
  geo.m = D - R / 2;
  geo.rows = B * H * S;
  for (int i = 0; i < 4; i++) {
    geo.xs[i] = x.strides[i];
    geo.os[i] = out.strides[i];
  }
  for (int i = 0; i < 3; i++) {
    geo.cs[i] = cs.strides[i];
    geo.ss[i] = sn.strides[i];
  }
  if (geo.m <= 0 || geo.rows <= 0) return;
  if constexpr (!std::is_same<TX, double>::value && !std::is_same<TC, double>::value) {
    constexpr int V = 16 / sizeof(TX);  // 8 for 16-bit x, 4 for float32
    if (rope_vec_ok(geo, x, out, cs, sn, R == D, V, sizeof(TX), sizeof(TC))) {
      const uint32_t cpr = static_cast<uint32_t>(geo.half / V);
      const uint32_t items = static_cast<uint32_t>(B * S) * cpr;
      dim3 grid(static_cast<unsigned>(ceil_div(items, kRopeThreads)), static_cast<unsigned>(ceil_div(H, kRopeHeads)));
      auto k = rope_vec_kernel<TX, TC, V>;
      MP_LAUNCH(k, grid, dim3(kRopeThreads), 0, s, out.ptr<TX>(), x.ptr<TX>(), cs.ptr<TC>(), sn.ptr<TC>(), geo, cpr,
                items, inverse ? 1 : 0);
      check_launch("rope_apply");
      return;
    }
  }
  const int tx = static_cast<int>(mn(static_cast<int64_t>(256), ceil_div(geo.m, 32) * 32));
  const int ty = mx(1, 256 / tx);
  dim3 block(tx, ty);
  dim3 grid(static_cast<unsigned>(mx(mn(ceil_div(geo.rows, ty), kMaxGrid), static_cast<int64_t>(1))));
  auto k = rope_kernel<TX, TC>;
  MP_LAUNCH(k, grid, block, 0, s, out.ptr<TX>(), x.ptr<TX>(), cs.ptr<TC>(), sn.ptr<TC>(), geo, inverse ? 1 : 0);
  check_launch("rope_apply");
}

template <typename TX>
void rope_typed(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& cs, const TensorArg& sn,
                bool inverse) {
  switch (cs.dtype) {
    case DType::F32: rope_typed2<TX, float>(s, out, x, cs, sn, inverse); break;
    case DType::F64: rope_typed2<TX, double>(s, out, x, cs, sn, inverse); break;
    case DType::BF16: rope_typed2<TX, bf16>(s, out, x, cs, sn, inverse); break;
    case DType::F16: rope_typed2<TX, f16>(s, out, x, cs, sn, inverse); break;
    default: throw_error("rope: cos/sin must be floating-point");
  }
}

}  // namespace

void norm_forward(cudaStream_t s, const TensorArg& y, const TensorArg& x, const TensorArg* weight,
                  const TensorArg* bias, const TensorArg* mean, const TensorArg& rstd, int64_t n, double eps,
                  bool center) {
  fail_if(!(n > 0 && x.numel() % n == 0), "normForward: N must divide the number of elements");
  fail_if(!(x.contiguous() && y.contiguous()), "normForward: input and output must be contiguous");
  fail_if(y.dtype != x.dtype, "normForward: output dtype must equal the input dtype");
  fail_if(y.numel() != x.numel(), "normForward: output must have as many elements as the input");
  const int64_t rows = x.numel() / n;
  check_param(weight, x, n, "weight");
  check_param(bias, x, n, "bias");
  check_stat(mean, x, rows, "mean");
  check_stat(&rstd, x, rows, "rstd");
  if (rows > 0) MPC_DISPATCH_FLOAT(x.dtype, fwd_typed, s, y, x, weight, bias, mean, rstd, rows, n, eps, center);
}

void norm_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& g, const TensorArg& x,
                   const TensorArg* weight, const TensorArg* mean, const TensorArg& rstd, const TensorArg* dweight,
                   const TensorArg* dbias, int64_t n, bool center, bool accumulate, bool params_into_main) {
  fail_if(!(n > 0 && x.numel() % n == 0), "normBackward: N must divide the number of elements");
  fail_if(!(x.contiguous() && g.contiguous() && dx.contiguous()), "normBackward: x, g and dx must be contiguous");
  fail_if(g.dtype != x.dtype || dx.dtype != x.dtype, "normBackward: dtypes must match");
  fail_if(g.numel() != x.numel() || dx.numel() != x.numel(), "normBackward: g and dx must match x");
  const int64_t rows = x.numel() / n;
  check_param(weight, x, n, "weight");
  if (params_into_main) {
    fail_if(x.dtype == DType::F64, "normBackward: float64 parameters have no float32 main gradient to add into");
    for (const TensorArg* p : {dweight, dbias})
      fail_if(p && !(p->dtype == DType::F32 && p->contiguous() && p->numel() == n),
              "normBackward: a main gradient must be a contiguous float32 tensor with N elements");
  } else {
    check_param(dweight, x, n, "weight gradient");
    check_param(dbias, x, n, "bias gradient");
  }
  check_stat(mean, x, rows, "mean");
  check_stat(&rstd, x, rows, "rstd");
  MPC_DISPATCH_FLOAT(x.dtype, bwd_typed, s, dx, g, x, weight, mean, rstd, dweight, dbias, rows, n, center, accumulate,
                     params_into_main);
}

void rope_apply(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& cs, const TensorArg& sn,
                bool inverse) {
  if (x.ndim != 4 || out.ndim != 4 || cs.ndim != 3 || sn.ndim != 3) throw_error("rope: bad argument ranks");
  if (out.dtype != x.dtype) throw_error("rope: output dtype must equal the input dtype");
  if (cs.dtype != sn.dtype) throw_error("rope: cos and sin must share a dtype");
  if (cs.shape[2] % 2 != 0 || cs.shape[2] > x.shape[3]) throw_error("rope: bad rotary dimension");
  if (x.numel() == 0) return;
  for (int i = 0; i < 4; i++)
    if (out.shape[i] != x.shape[i]) throw_error("rope: output shape must equal the input shape");
  for (int i = 0; i < 3; i++)
    if (sn.shape[i] != cs.shape[i]) throw_error("rope: cos and sin shapes differ");
  if (cs.shape[0] != x.shape[0] || cs.shape[1] != x.shape[2]) throw_error("rope: cos/sin must be [B, S, R]");
  MPC_DISPATCH_FLOAT(x.dtype, rope_typed, s, out, x, cs, sn, inverse);
}

}  // namespace mpc
