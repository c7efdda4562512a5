// Index kernels (see index.h), the CUDA twin of @megapatch/tensor's native/src/index.cc.
//
// Index validation runs on the device: a scan finds the lowest row-major position whose index
// lies outside [0, size) and writes [position, value] (or [-1, 0]) into the 16 bytes of `bad`,
// which also serve as its scratch word (no allocation per call). Up to kCheckOneBlock indices
// one block scans and reduces in shared memory; above that, a 1-thread kernel initialises the
// word, a grid scan lowers it with atomicMin, and a 1-thread kernel converts it to the doubles.
// The main kernels run regardless and skip rejected indices.
//
// The accumulating kernels are deterministic and add in the CPU backend's order, without
// atomics: indexAddRows gives each output row to one block, which scans the index in order,
// compacts the matching positions with warp ballots and sums their source rows in the compute
// type (float for 16/32-bit floats, double for float64 and integers), rounding once;
// scatterAddAlong gives each line along `dim` (distinct lines never share an output element) to
// one thread, which adds in increasing index position, rounding to the output type each time.
//
// topk sorts each line of up to kTopkSortMax elements in shared memory (bitonic sort of 64-bit
// order keys with the position as tie-break); longer lines take k rounds of a block-wide
// minimum over the pairs above the previous pick. Either way NaN ranks above every number,
// -0 equals +0, and equal values come lowest position first, as in the CPU backend.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "index.h"

namespace mpc {
namespace {

constexpr unsigned long long kNone = ~0ull;
constexpr int kCheckThreads = 512;
constexpr int64_t kCheckOneBlock = int64_t(1) << 20;
constexpr int kAddMaxThreads = 1024;
constexpr int kAddJ = 4;  // output columns per thread in one pass of indexAddRows
constexpr int kTopkSortMax = 4096;
constexpr int kTopkThreads = 256;

MP_D int popc32(unsigned x) {
#ifdef __CUDA_ARCH__
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

MP_HD unsigned long long dbits(double d) {
#ifdef __CUDA_ARCH__
  return static_cast<unsigned long long>(__double_as_longlong(d));
#else
  unsigned long long u;
  std::memcpy(&u, &d, 8);
  return u;
#endif
}

MP_HD float fmac(float a, float b, float c) { return fmaf(a, b, c); }
MP_HD double fmac(double a, double b, double c) { return fma(a, b, c); }

// ---- index tensors ----------------------------------------------------------------------------
// An int32/int64 index tensor read by row-major position (dimensions coalesced on the host, so a
// contiguous index takes one multiply).
struct Idx {
  const char* p;
  int wide;
  int ndim;
  int64_t shape[kMaxDims];
  int64_t stride[kMaxDims];  // bytes

  MP_HD int64_t at(int64_t i) const {
    int64_t off = 0;
    if (ndim == 1) {
      off = i * stride[0];
    } else {
      for (int d = ndim - 1; d >= 0; d--) {
        const int64_t q = i / shape[d];
        off += (i - q * shape[d]) * stride[d];
        i = q;
      }
    }
    const char* q = p + off;
    return wide ? *reinterpret_cast<const int64_t*>(q) : static_cast<int64_t>(*reinterpret_cast<const int32_t*>(q));
  }
};

void check_index_dtype(const TensorArg& t) {
  if (t.dtype != DType::I32 && t.dtype != DType::I64) throw_error("index tensors must be int32 or int64");
}

Idx make_idx(const TensorArg& t) {
  check_index_dtype(t);
  const TensorArg* ops[1] = {&t};
  Strided<1> s = make_strided<1>(t, ops);
  Idx r;
  r.p = t.data;
  r.wide = t.dtype == DType::I64 ? 1 : 0;
  r.ndim = s.ndim;
  for (int d = 0; d < s.ndim; d++) {
    r.shape[d] = s.shape[d];
    r.stride[d] = s.strides[0][d];
  }
  return r;
}

MP_HD int64_t read_index(const char* p, int wide, int64_t elem) {
  return wide ? reinterpret_cast<const int64_t*>(p)[elem] : static_cast<int64_t>(reinterpret_cast<const int32_t*>(p)[elem]);
}

// ---- the `bad` report -------------------------------------------------------------------------
MP_D void write_report(unsigned long long* bad, int64_t bstride, unsigned long long pos, const Idx& idx) {
  if (pos == kNone) {
    bad[0] = dbits(-1.0);
    bad[bstride] = dbits(0.0);
  } else {
    bad[0] = dbits(static_cast<double>(pos));
    bad[bstride] = dbits(static_cast<double>(idx.at(static_cast<int64_t>(pos))));
  }
}

__global__ void check_one_block_kernel(Idx idx, int64_t n, int64_t size, unsigned long long* bad, int64_t bstride) {
  __shared__ unsigned long long best[kCheckThreads];
  const int t = threadIdx.x;
  unsigned long long mine = kNone;
  for (int64_t i = t; i < n; i += blockDim.x) {
    const int64_t v = idx.at(i);
    if (v < 0 || v >= size) {
      mine = static_cast<unsigned long long>(i);
      break;
    }
  }
  best[t] = mine;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (t < w) best[t] = mn(best[t], best[t + w]);
    __syncthreads();
  }
  if (t == 0) write_report(bad, bstride, best[0], idx);
}

__global__ void check_init_kernel(unsigned long long* bad) { bad[0] = kNone; }

__global__ void check_scan_kernel(Idx idx, int64_t n, int64_t size, unsigned long long* bad) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t v = idx.at(i);
    if (v < 0 || v >= size) {
      atomicMin(bad, static_cast<unsigned long long>(i));
      break;
    }
  }
}

__global__ void check_finish_kernel(Idx idx, unsigned long long* bad, int64_t bstride) {
  const unsigned long long pos = bad[0];
  write_report(bad, bstride, pos, idx);
}

void check_bad_arg(const TensorArg& bad) {
  if (bad.dtype != DType::F64 || bad.ndim != 1 || bad.shape[0] != 2)
    throw_error("index kernels report into a float64 tensor of shape [2]");
}

// Enqueues the scan of the n indices of idx against [0, size) that fills `bad`.
void check_indices(cudaStream_t s, const Idx& idx, int64_t n, int64_t size, const TensorArg& bad) {
  unsigned long long* word = reinterpret_cast<unsigned long long*>(bad.data);
  const int64_t bstride = bad.strides[0];
  if (n <= kCheckOneBlock) {
    MP_LAUNCH(check_one_block_kernel, 1, kCheckThreads, 0, s, idx, n, size, word, bstride);
    check_launch("index check");
    return;
  }
  MP_LAUNCH(check_init_kernel, 1, 1, 0, s, word);
  check_launch("index check (init)");
  MP_LAUNCH(check_scan_kernel, grid_for(n), kThreads, 0, s, idx, n, size, word);
  check_launch("index check (scan)");
  MP_LAUNCH(check_finish_kernel, 1, 1, 0, s, idx, word, bstride);
  check_launch("index check (finish)");
}

// ---- raw words for dtype-agnostic copies ------------------------------------------------------
struct alignas(16) W16 {
  unsigned long long a, b;
};

// bytes of the widest word (<= 16) dividing `bytes` with every pointer aligned to it
int word_size(int64_t bytes, const void* const* ptrs, int n) {
  for (int w = 16; w > 1; w /= 2) {
    if (bytes % w != 0) continue;
    bool ok = true;
    for (int k = 0; k < n; k++)
      if (reinterpret_cast<uintptr_t>(ptrs[k]) % w != 0) ok = false;
    if (ok) return w;
  }
  return 1;
}

// ---- indexSelectRows ----------------------------------------------------------------------------
template <typename W>
__global__ void select_rows_kernel(W* out, const W* x, Idx idx, int64_t L, int64_t S, int64_t wpr, int64_t total) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t r = e / wpr, q = e - r * wpr;
    const int64_t o = r / L, i = r - o * L;
    const int64_t v = idx.at(i);
    if (v < 0 || v >= S) continue;
    out[e] = x[(o * S + v) * wpr + q];
  }
}

template <typename W>
void select_rows_run(cudaStream_t s, const TensorArg& out, const TensorArg& x, const Idx& idx, int64_t outer, int64_t L,
                     int64_t S, int64_t row_bytes) {
  const int64_t wpr = row_bytes / static_cast<int64_t>(sizeof(W));
  const int64_t total = outer * L * wpr;
  auto k = select_rows_kernel<W>;
  MP_LAUNCH(k, grid_for(total), kThreads, 0, s, out.ptr<W>(), x.ptr<W>(), idx, L, S, wpr, total);
  check_launch("indexSelectRows");
}

// ---- indexAddRows -------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kAddMaxThreads) add_rows_kernel(T* out, const T* base, const T* src, Idx idx, int64_t L, int64_t outer, int64_t S,
                                int64_t inner, double alpha, int64_t skip) {
  using C = typename Tr<T>::C;
  __shared__ int64_t list[kAddMaxThreads];
  __shared__ int wcnt[kAddMaxThreads / 32];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, nw = blockDim.x >> 5;
  const int64_t nt = blockDim.x;
  const C a = static_cast<C>(alpha);
  const int64_t items = outer * S;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t o = item / S, s = item - o * S;
    T* dst = out + item * inner;
    const T* brow = base ? base + item * inner : nullptr;
    for (int64_t j0 = 0; j0 < inner; j0 += kAddJ * nt) {
      C acc[kAddJ];
      for (int jj = 0; jj < kAddJ; jj++) acc[jj] = C(0);
      bool any = false;
      for (int64_t c0 = 0; c0 < L; c0 += nt) {
        const int64_t i = c0 + t;
        bool m = false;
        if (i < L) {
          const int64_t v = idx.at(i);
          m = v == s && v != skip;
        }
        const unsigned bal = __ballot_sync(0xffffffffu, m);
        if (lane == 0) wcnt[warp] = popc32(bal);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < nw; w++) {
          const int c = wcnt[w];
          if (w < warp) before += c;
          total += c;
        }
        if (m) list[before + popc32(bal & ((1u << lane) - 1u))] = i;
        __syncthreads();
        for (int q = 0; q < total; q++) {  // the matching positions, in increasing order
          const T* row = src + (o * L + list[q]) * inner;
          for (int jj = 0; jj < kAddJ; jj++) {
            const int64_t j = j0 + jj * nt + t;
            if (j < inner) acc[jj] += Tr<T>::ld(row + j);
          }
        }
        if (total > 0) any = true;
        __syncthreads();
      }
      for (int jj = 0; jj < kAddJ; jj++) {
        const int64_t j = j0 + jj * nt + t;
        if (j >= inner) continue;
        if (!any) {
          if (brow) dst[j] = brow[j];
          else Tr<T>::st(dst + j, C(0));  // +0 in every format
        } else if (brow) {
          Tr<T>::st(dst + j, fmac(a, acc[jj], Tr<T>::ld(brow + j)));
        } else {
          Tr<T>::st(dst + j, a * acc[jj]);
        }
      }
    }
  }
}

template <typename T>
void add_rows_run(cudaStream_t s, const TensorArg& out, const TensorArg* base, const TensorArg& src, const Idx& idx,
                  int64_t L, int64_t outer, int64_t S, int64_t inner, double alpha, int64_t skip) {
  const int threads = inner > kAddJ * 256 ? kAddMaxThreads : 256;
  auto k = add_rows_kernel<T>;
  MP_LAUNCH(k, grid_for(outer * S, 1), threads, 0, s, out.ptr<T>(), base ? base->ptr<T>() : nullptr, src.ptr<T>(),
            idx, L, outer, S, inner, alpha, skip);
  check_launch("indexAddRows");
}

// ---- gatherAlong / scatterAddAlong --------------------------------------------------------------
// The positions of index's shape with element strides of three tensors (the third is the index).
struct Along {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t st[3][kMaxDims];
};

template <typename W>
__global__ void gather_kernel(W* out, const W* x, const char* ip, int wide, Along g, int64_t xstep, int64_t size,
                              int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += step) {
    int64_t rem = e, oo = 0, ox = 0, oi = 0;
    for (int d = g.ndim - 1; d >= 0; d--) {
      const int64_t q = rem / g.shape[d], c = rem - q * g.shape[d];
      rem = q;
      oo += c * g.st[0][d];
      ox += c * g.st[1][d];
      oi += c * g.st[2][d];
    }
    const int64_t v = read_index(ip, wide, oi);
    if (v < 0 || v >= size) continue;
    out[oo] = x[ox + v * xstep];
  }
}

template <typename W>
void gather_run(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& index, const Along& g,
                int64_t xstep, int64_t size, int64_t n) {
  auto k = gather_kernel<W>;
  MP_LAUNCH(k, grid_for(n), kThreads, 0, s, out.ptr<W>(), x.ptr<W>(), static_cast<const char*>(index.data),
            index.dtype == DType::I64 ? 1 : 0, g, xstep, size, n);
  check_launch("gatherAlong");
}

// g: the line geometry (index's shape without dim; strides of out, src, index there)
template <typename T>
__global__ void scatter_add_kernel(T* out, const T* src, const char* ip, int wide, Along g, int64_t lines, int64_t R,
                                   int64_t ostep, int64_t sstep, int64_t istep, int64_t size, double alpha) {
  using C = typename Tr<T>::C;
  const C al = static_cast<C>(alpha);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t line = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; line < lines; line += step) {
    int64_t rem = line, oo = 0, os = 0, oi = 0;
    for (int d = g.ndim - 1; d >= 0; d--) {
      const int64_t q = rem / g.shape[d], c = rem - q * g.shape[d];
      rem = q;
      oo += c * g.st[0][d];
      os += c * g.st[1][d];
      oi += c * g.st[2][d];
    }
    for (int64_t r = 0; r < R; r++) {
      const int64_t v = read_index(ip, wide, oi + r * istep);
      if (v < 0 || v >= size) continue;
      T* d = out + oo + v * ostep;
      Tr<T>::st(d, fmac(al, Tr<T>::ld(src + os + r * sstep), Tr<T>::ld(d)));
    }
  }
}

template <typename T>
void scatter_add_run(cudaStream_t s, const TensorArg& out, const TensorArg& src, const TensorArg& index, const Along& g,
                     int64_t lines, int64_t R, int64_t ostep, int64_t sstep, int64_t istep, int64_t size, double alpha) {
  auto k = scatter_add_kernel<T>;
  MP_LAUNCH(k, grid_for(lines), kThreads, 0, s, out.ptr<T>(), src.ptr<T>(), static_cast<const char*>(index.data),
            index.dtype == DType::I64 ? 1 : 0, g, lines, R, ostep, sstep, istep, size, alpha);
  check_launch("scatterAddAlong");
}

// ---- topk -------------------------------------------------------------------------------------
// Order keys: ascending key = better. Numbers map monotonically (with -0 as +0); NaN is the best
// for largest and the worst for smallest, equal NaNs tie (then the lower position wins).
MP_HD unsigned long long order_key(float v, bool largest) {
  if (v != v) return largest ? 0ull : kNone;
  if (v == 0.0f) v = 0.0f;
  const uint32_t u = f32_bits(v);
  const uint32_t k = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return largest ? static_cast<unsigned long long>(~k) : static_cast<unsigned long long>(k);
}
MP_HD unsigned long long order_key(double v, bool largest) {
  if (v != v) return largest ? 0ull : kNone;
  if (v == 0.0) v = 0.0;
  const unsigned long long u = dbits(v);
  const unsigned long long k = (u >> 63) ? ~u : (u | (1ull << 63));
  return largest ? ~k : k;
}
MP_HD bool pair_less(unsigned long long ka, long long pa, unsigned long long kb, long long pb) {
  return ka < kb || (ka == kb && pa < pb);
}

template <typename T>
__global__ void topk_sort_kernel(T* values, int64_t* indices, const T* x, int64_t outer, int64_t R, int64_t inner,
                                 int64_t k, int largest, int n) {
  MP_DYNAMIC_SMEM(unsigned long long, keys);
  int* pos = reinterpret_cast<int*>(keys + n);
  const int t = threadIdx.x;
  const int nt = blockDim.x;
  const int64_t lines = outer * inner;
  for (int64_t line = blockIdx.x; line < lines; line += gridDim.x) {
    const int64_t o = line / inner, i = line - o * inner;
    const T* xl = x + o * R * inner + i;
    for (int r = t; r < n; r += nt) {
      if (r < R) {
        keys[r] = order_key(Tr<T>::ld(xl + r * inner), largest != 0);
        pos[r] = r;
      } else {
        keys[r] = kNone;
        pos[r] = 0x7fffffff;
      }
    }
    __syncthreads();
    for (int size = 2; size <= n; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        for (int q = t; q < (n >> 1); q += nt) {
          const int lo = 2 * q - (q & (stride - 1));
          const int hi = lo + stride;
          const bool up = (lo & size) == 0;
          const bool hi_first = pair_less(keys[hi], pos[hi], keys[lo], pos[lo]);
          if (hi_first == up) {
            const unsigned long long tk = keys[lo];
            keys[lo] = keys[hi];
            keys[hi] = tk;
            const int tp = pos[lo];
            pos[lo] = pos[hi];
            pos[hi] = tp;
          }
        }
        __syncthreads();
      }
    }
    for (int64_t q = t; q < k; q += nt) {
      const int64_t at = o * k * inner + q * inner + i;
      values[at] = xl[static_cast<int64_t>(pos[q]) * inner];  // the stored value, bit for bit
      indices[at] = pos[q];
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void topk_select_kernel(T* values, int64_t* indices, const T* x, int64_t outer, int64_t R, int64_t inner,
                                   int64_t k, int largest) {
  __shared__ unsigned long long sk[kTopkThreads];
  __shared__ long long sp[kTopkThreads];
  const int t = threadIdx.x;
  const int64_t lines = outer * inner;
  for (int64_t line = blockIdx.x; line < lines; line += gridDim.x) {
    const int64_t o = line / inner, i = line - o * inner;
    const T* xl = x + o * R * inner + i;
    unsigned long long pk = 0;  // the previous pick; (0, -1) is below every pair
    long long pp = -1;
    for (int64_t q = 0; q < k; q++) {
      unsigned long long bk = kNone;
      long long bp = 0x7fffffffffffffffll;
      for (int64_t r = t; r < R; r += blockDim.x) {
        const unsigned long long kk = order_key(Tr<T>::ld(xl + r * inner), largest != 0);
        if (pair_less(pk, pp, kk, r) && pair_less(kk, r, bk, bp)) {
          bk = kk;
          bp = r;
        }
      }
      sk[t] = bk;
      sp[t] = bp;
      __syncthreads();
      for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (t < w && pair_less(sk[t + w], sp[t + w], sk[t], sp[t])) {
          sk[t] = sk[t + w];
          sp[t] = sp[t + w];
        }
        __syncthreads();
      }
      pk = sk[0];
      pp = sp[0];
      if (t == 0) {
        const int64_t at = o * k * inner + q * inner + i;
        values[at] = xl[pp * inner];
        indices[at] = pp;
      }
      __syncthreads();
    }
  }
}

template <typename T>
void topk_run(cudaStream_t s, const TensorArg& values, const TensorArg& indices, const TensorArg& x, int64_t outer,
              int64_t R, int64_t inner, int64_t k, bool largest) {
  const int64_t lines = outer * inner;
  if (R <= kTopkSortMax) {
    int n = 1;
    while (n < R) n <<= 1;
    const int threads = mx(32, mn(n / 2, 512));
    const size_t smem = static_cast<size_t>(n) * (sizeof(unsigned long long) + sizeof(int));
    auto kf = topk_sort_kernel<T>;
    MP_LAUNCH(kf, grid_for(lines, 1), threads, smem, s, values.ptr<T>(), indices.ptr<int64_t>(), x.ptr<T>(), outer, R,
              inner, k, largest ? 1 : 0, n);
  } else {
    auto kf = topk_select_kernel<T>;
    MP_LAUNCH(kf, grid_for(lines, 1), kTopkThreads, 0, s, values.ptr<T>(), indices.ptr<int64_t>(), x.ptr<T>(), outer,
              R, inner, k, largest ? 1 : 0);
  }
  check_launch("topk");
}

// ---- triangle -----------------------------------------------------------------------------------
struct Tri {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t xs[kMaxDims];  // elements
};

template <typename W>
__global__ void triangle_kernel(W* out, const W* x, Tri g, int64_t M, int64_t N, int64_t diagonal, int upper,
                                int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += step) {
    const int64_t r = e / N, j = e - r * N;
    const int64_t i = r % M;
    const bool keep = upper ? j - i >= diagonal : j - i <= diagonal;
    if (!keep) {
      out[e] = W(0);
      continue;
    }
    int64_t rem = e, off = 0;
    for (int d = g.ndim - 1; d >= 0; d--) {
      const int64_t q = rem / g.shape[d];
      off += (rem - q * g.shape[d]) * g.xs[d];
      rem = q;
    }
    out[e] = x[off];
  }
}

template <typename W>
void triangle_run(cudaStream_t s, const TensorArg& out, const TensorArg& x, const Tri& g, int64_t M, int64_t N,
                  int64_t diagonal, bool upper, int64_t n) {
  auto k = triangle_kernel<W>;
  MP_LAUNCH(k, grid_for(n), kThreads, 0, s, out.ptr<W>(), x.ptr<W>(), g, M, N, diagonal, upper ? 1 : 0, n);
  check_launch("triangle");
}

// ---- oneHot -------------------------------------------------------------------------------------
__global__ void one_hot_kernel(int64_t* out, Idx idx, int64_t n, int64_t classes) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t v = idx.at(i);
    if (v < 0 || v >= classes) continue;
    out[i * classes + v] = 1;
  }
}

// The element strides of `t` over the positions of `shape` except dimension `skip` (-1: none).
void strides_without(const TensorArg& t, int skip, int64_t* out) {
  int m = 0;
  for (int d = 0; d < t.ndim; d++)
    if (d != skip) out[m++] = t.strides[d];
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

void index_select_rows(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& index,
                       int64_t outer, int64_t S, int64_t inner, const TensorArg& bad) {
  check_bad_arg(bad);
  const Idx idx = make_idx(index);
  const int64_t L = index.numel();
  check_indices(s, idx, L, S, bad);
  const int64_t row = inner * itemsize(x.dtype);
  if (row == 0 || outer * L == 0) return;
  const void* ptrs[2] = {out.data, x.data};
  switch (word_size(row, ptrs, 2)) {
    case 16: select_rows_run<W16>(s, out, x, idx, outer, L, S, row); break;
    case 8: select_rows_run<uint64_t>(s, out, x, idx, outer, L, S, row); break;
    case 4: select_rows_run<uint32_t>(s, out, x, idx, outer, L, S, row); break;
    case 2: select_rows_run<uint16_t>(s, out, x, idx, outer, L, S, row); break;
    default: select_rows_run<uint8_t>(s, out, x, idx, outer, L, S, row); break;
  }
}

void index_add_rows(cudaStream_t s, const TensorArg& out, const TensorArg* base, const TensorArg& src,
                    const TensorArg& index, int64_t outer, int64_t S, int64_t inner, double alpha, int64_t skip,
                    const TensorArg& bad) {
  check_bad_arg(bad);
  const Idx idx = make_idx(index);
  const int64_t L = index.numel();
  check_indices(s, idx, L, S, bad);
  if (outer * S * inner == 0) return;
  MPC_DISPATCH_ALL(out.dtype, add_rows_run, s, out, base, src, idx, L, outer, S, inner, alpha, skip);
}

void gather_along(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& index, int dim,
                  const TensorArg& bad) {
  check_bad_arg(bad);
  const Idx idx = make_idx(index);
  if (dim < 0 || dim >= x.ndim || index.ndim != x.ndim || out.ndim != index.ndim)
    throw_error("gatherAlong: index and out must have x's rank and dim must be one of its dimensions");
  const int64_t n = index.numel();
  const int64_t size = x.shape[dim];
  check_indices(s, idx, n, size, bad);
  if (n == 0) return;
  Along g;
  g.ndim = index.ndim;
  for (int d = 0; d < index.ndim; d++) {
    g.shape[d] = index.shape[d];
    g.st[0][d] = out.strides[d];
    g.st[1][d] = d == dim ? 0 : x.strides[d];
    g.st[2][d] = index.strides[d];
  }
  const int64_t xstep = x.strides[dim];
  switch (itemsize(x.dtype)) {
    case 8: gather_run<uint64_t>(s, out, x, index, g, xstep, size, n); break;
    case 4: gather_run<uint32_t>(s, out, x, index, g, xstep, size, n); break;
    case 2: gather_run<uint16_t>(s, out, x, index, g, xstep, size, n); break;
    default: gather_run<uint8_t>(s, out, x, index, g, xstep, size, n); break;
  }
}

void scatter_add_along(cudaStream_t s, const TensorArg& out, const TensorArg& src, const TensorArg& index, int dim,
                       double alpha, const TensorArg& bad) {
  check_bad_arg(bad);
  const Idx idx = make_idx(index);
  if (dim < 0 || dim >= out.ndim || index.ndim != out.ndim || src.ndim != index.ndim)
    throw_error("scatterAddAlong: index and src must have out's rank and dim must be one of its dimensions");
  const int64_t n = index.numel();
  const int64_t size = out.shape[dim];
  check_indices(s, idx, n, size, bad);
  if (n == 0) return;
  Along g;
  g.ndim = index.ndim - 1;
  int m = 0;
  for (int d = 0; d < index.ndim; d++)
    if (d != dim) g.shape[m++] = index.shape[d];
  strides_without(out, dim, g.st[0]);
  strides_without(src, dim, g.st[1]);
  strides_without(index, dim, g.st[2]);
  const int64_t R = index.shape[dim];
  const int64_t lines = n / R;
  MPC_DISPATCH_ALL(out.dtype, scatter_add_run, s, out, src, index, g, lines, R, out.strides[dim], src.strides[dim],
                   index.strides[dim], size, alpha);
}

void topk_along(cudaStream_t s, const TensorArg& values, const TensorArg& indices, const TensorArg& x,
                int64_t outer, int64_t R, int64_t inner, int64_t k, bool largest) {
  if (k < 0 || k > R) throw_error("topk: k out of range");
  if (k == 0 || outer * inner == 0) return;
  if (indices.dtype != DType::I64) throw_error("topk: indices must be int64");
  if (values.dtype != x.dtype) throw_error("topk: values must have x's dtype");
  MPC_DISPATCH_ALL(x.dtype, topk_run, s, values, indices, x, outer, R, inner, k, largest);
}

void triangle_mask(cudaStream_t s, const TensorArg& out, const TensorArg& x, int64_t diagonal, bool upper) {
  if (x.ndim < 2) throw_error("triangle: needs at least 2 dimensions");
  const int64_t n = x.numel();
  if (n == 0) return;
  const int64_t M = x.shape[x.ndim - 2], N = x.shape[x.ndim - 1];
  Tri g;
  g.ndim = x.ndim;
  for (int d = 0; d < x.ndim; d++) {
    g.shape[d] = x.shape[d];
    g.xs[d] = x.strides[d];
  }
  switch (itemsize(x.dtype)) {
    case 8: triangle_run<uint64_t>(s, out, x, g, M, N, diagonal, upper, n); break;
    case 4: triangle_run<uint32_t>(s, out, x, g, M, N, diagonal, upper, n); break;
    case 2: triangle_run<uint16_t>(s, out, x, g, M, N, diagonal, upper, n); break;
    default: triangle_run<uint8_t>(s, out, x, g, M, N, diagonal, upper, n); break;
  }
}

void one_hot(cudaStream_t s, const TensorArg& out, const TensorArg& index, int64_t classes, const TensorArg& bad) {
  check_bad_arg(bad);
  const Idx idx = make_idx(index);
  const int64_t n = index.numel();
  check_indices(s, idx, n, classes, bad);
  if (n == 0 || classes == 0) return;
  MP_LAUNCH(one_hot_kernel, grid_for(n), kThreads, 0, s, out.ptr<int64_t>(), idx, n, classes);
  check_launch("oneHot");
}

}  // namespace mpc
