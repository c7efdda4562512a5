// Reductions and cumulative sums (see reduce.h), with the semantics of @megapatch/tensor's
// native/src/reduce.cc: every reduction accumulates in double; max/min/argmax/argmin return the
// first NaN if there is one, else the first extreme; var is two-pass (mean, then squared
// deviations) with the correction p; logsumexp subtracts the maximum (and returns it when it is
// not finite); norm has the cases p = 2, 1, +-inf (fmax of |x|, NaNs skipped) and the general
// sum |x|^p.
//
// Layout: x is contiguous [outer, R, inner]; each of the outer * inner outputs reduces R
// elements with stride inner. Two kernels:
//   - reduce_rows (inner == 1): a group of G threads (a warp, or the whole block) per row; the
//     group's threads read consecutive elements (coalesced), accumulate privately, then combine
//     with warp shuffles and, for G > 32, shared memory.
//   - reduce_cols (everything else): a block of X x Y threads; threadIdx.x walks consecutive
//     outputs (consecutive inner positions: coalesced across threads), threadIdx.y splits R;
//     partials are combined over y in shared memory.
// Both loop over their outputs with a grid stride. When there are too few outputs to fill the
// GPU and R is long, R is also split into chunks over gridDim.y: each block writes the partial
// state of its chunk to a workspace (cudaMallocAsync on the stream) and reduce_finish combines
// the chunks of each output in order (var with Chan's pairwise formula, logsumexp by rescaling to
// the larger maximum) and writes the result. Results are deterministic (no atomics).
//
// cumsum: one thread per (outer, inner) line scanning R in order in double, as the CPU. For
// inner == 1 a warp handles 32 rows and stages 32 x 32 tiles through shared memory so that loads
// and stores stay coalesced. Few long lines of integers scan in chunks, in int64 (cumsum_chunk_*).
#include <climits>
#include <cmath>
#include <type_traits>

#include "reduce.h"

namespace mpc {
namespace {

// What a kernel instance computes; norm's order is a runtime mode (see norm_mode).
enum Kind : int { kSum = 0, kProd, kMax, kMin, kVar, kLse, kNorm };

// The partial state of a reduction over a range of r.
//   sum/prod/norm: a = accumulator.
//   max/min: a = best value, i = its r (LLONG_MAX: empty).
//   var: a = mean, b = sum of squared deviations from it, i = count (pass 1: a = sum).
//   logsumexp: a = maximum (NaN when any element is NaN), b = sum of exp(x - a) (pass 1: a only).
struct St {
  double a;
  double b;
  long long i;
};

MP_HD bool is_nan(double v) { return v != v; }
MP_HD bool is_finite(double v) { return v - v == v - v; }

// norm: 0 => p == 2, 1 => p == 1, 2 => p = +-inf, 3 => general p
inline int norm_mode(double p) {
  if (p == 2) return 0;
  if (p == 1) return 1;
  if (std::isinf(p)) return 2;
  return 3;
}

template <int K> MP_D St st_init() {
  St s;
  s.a = 0;
  s.b = 0;
  s.i = 0;
  if (K == kProd) s.a = 1;
  if (K == kMax) { s.a = -HUGE_VAL; s.i = LLONG_MAX; }
  if (K == kMin) { s.a = HUGE_VAL; s.i = LLONG_MAX; }
  if (K == kLse) s.a = -HUGE_VAL;
  return s;
}

// Pass 1: element v at position r, taken in increasing r by each thread.
template <int K> MP_D void st_add(St& s, double v, long long r, int nmode, double p) {
  if (K == kSum || K == kVar) {
    s.a += v;
  } else if (K == kProd) {
    s.a *= v;
  } else if (K == kMax || K == kMin) {
    if (!is_nan(s.a) && (s.i == LLONG_MAX || is_nan(v) || (K == kMax ? v > s.a : v < s.a))) {
      s.a = v;
      s.i = r;
    }
  } else if (K == kLse) {
    if (v > s.a || is_nan(v)) {
      if (!is_nan(s.a)) s.a = v;
    }
  } else {  // kNorm
    double av = fabs(v);
    if (nmode == 0) s.a += v * v;
    else if (nmode == 1) s.a += av;
    else if (nmode == 2) s.a = fmax(s.a, av);
    else s.a += pow(av, p);
  }
}

// Pass-1 states of disjoint ranges (either order).
template <int K> MP_D St st_comb(const St& x, const St& y, int nmode) {
  St r = x;
  if (K == kSum || K == kVar) {
    r.a = x.a + y.a;
  } else if (K == kProd) {
    r.a = x.a * y.a;
  } else if (K == kMax || K == kMin) {
    bool xn = is_nan(x.a), yn = is_nan(y.a);
    if (xn || yn) {
      if (xn && yn) return x.i <= y.i ? x : y;
      return xn ? x : y;
    }
    if (x.i == LLONG_MAX) return y;
    if (y.i == LLONG_MAX) return x;
    if (K == kMax ? y.a > x.a : y.a < x.a) return y;
    if (y.a == x.a && y.i < x.i) return y;
    return x;
  } else if (K == kLse) {
    if (is_nan(x.a)) return x;
    if (is_nan(y.a)) return y;
    r.a = x.a > y.a ? x.a : y.a;
  } else {  // kNorm
    r.a = nmode == 2 ? fmax(x.a, y.a) : x.a + y.a;
  }
  return r;
}

template <int K, int PASS> MP_D St st_comb_pass(const St& x, const St& y, int nmode) {
  if constexpr (PASS == 2) {
    St r = x;
    r.b = x.b + y.b;
    return r;
  }
  return st_comb<K>(x, y, nmode);
}

template <int K, int PASS> MP_D St st_shfl_xor(const St& s, int mask) {
  St r = s;
  r.a = __shfl_xor_sync(0xffffffffu, s.a, mask);
  // b only in pass 2, i only for max/min
  if constexpr (PASS == 2) r.b = __shfl_xor_sync(0xffffffffu, s.b, mask);
  if constexpr (PASS == 1 && (K == kMax || K == kMin)) r.i = __shfl_xor_sync(0xffffffffu, s.i, mask);
  return r;
}

// Combines the states of the partial ranges of two chunks of R (chunk x before chunk y), after
// both passes.
template <int K> MP_D St st_merge(const St& x, const St& y, int nmode) {
  if (K == kVar) {  // Chan et al.: pairwise (count, mean, M2)
    if (x.i == 0) return y;
    if (y.i == 0) return x;
    double nx = static_cast<double>(x.i), ny = static_cast<double>(y.i), n = nx + ny;
    double d = y.a - x.a;
    St r;
    r.i = x.i + y.i;
    r.a = x.a + d * (ny / n);
    r.b = x.b + y.b + d * d * (nx * ny / n);
    return r;
  }
  if (K == kLse) {
    if (is_nan(x.a)) return x;
    if (is_nan(y.a)) return y;
    St r;
    r.i = 0;
    r.a = x.a > y.a ? x.a : y.a;
    if (!is_finite(r.a)) {
      r.b = 0;
      return r;
    }
    r.b = (x.a == -HUGE_VAL ? 0.0 : x.b * exp(x.a - r.a)) + (y.a == -HUGE_VAL ? 0.0 : y.b * exp(y.a - r.a));
    return r;
  }
  return st_comb<K>(x, y, nmode);
}

// The output of a complete state: value (and index for max/min).
template <typename T, int K>
MP_D void st_write(const St& s, int64_t j, void* out, int64_t* idx, int op, int64_t R, double p, int nmode,
                   bool mean_by_product) {
  // the index of max/min (0 for the other reductions, as the CPU)
  const int64_t index = (K == kMax || K == kMin) ? s.i : 0;
  if (op == kReduceArgmax || op == kReduceArgmin) {
    static_cast<int64_t*>(out)[j] = index;
    if (idx) idx[j] = index;
    return;
  }
  double v = s.a;
  if (K == kSum) {
    if (op == kReduceMean) v = mean_by_product ? s.a * (1.0 / static_cast<double>(R)) : s.a / static_cast<double>(R);
  } else if (K == kVar) {
    double denom = static_cast<double>(R) - p;
    v = denom > 0 ? s.b / denom : static_cast<double>(NAN);
  } else if (K == kLse) {
    if (is_finite(s.a)) v = s.a + log(s.b);
  } else if (K == kNorm) {
    if (nmode == 0) v = sqrt(s.a);
    else if (nmode == 3) v = pow(s.a, 1.0 / p);
  }
  Tr<T>::st(static_cast<T*>(out) + j, static_cast<typename Tr<T>::C>(v));
  if (idx) idx[j] = index;
}

template <typename T> MP_D double ldd(const T* p) { return static_cast<double>(Tr<T>::ld(p)); }

// ---- inner == 1: a group of G threads per row ------------------------------------------------

constexpr int kRowBlock = 256;

// Reduces the pass-PASS state over the G consecutive threads of each group; every thread of the
// group gets the result. Reached by every thread of the block.
template <int K, int G, int PASS> MP_D St row_group_reduce(St s, St* sm, int nmode) {
  for (int o = 16; o > 0; o >>= 1) s = st_comb_pass<K, PASS>(s, st_shfl_xor<K, PASS>(s, o), nmode);
  if constexpr (G > 32) {
    int w = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) sm[w] = s;
    __syncthreads();
    int w0 = static_cast<int>(threadIdx.x / G) * (G / 32);
    s = sm[w0];
    for (int k = 1; k < G / 32; k++) s = st_comb_pass<K, PASS>(s, sm[w0 + k], nmode);
    __syncthreads();
  }
  return s;
}

// grid: (row blocks, chunks); block: kRowBlock threads = kRowBlock / G rows of G threads.
// ws == nullptr: one chunk, results written to out; else the chunk states go to ws[chunk][row].
template <typename T, int K, int G>
__global__ void reduce_rows(const T* x, void* out, int64_t* idx, int64_t outer, int64_t R, int64_t chunk_len,
                            St* ws, int op, double p, int nmode) {
  __shared__ St sm[kRowBlock / 32];
  constexpr int RB = kRowBlock / G;
  const int g = static_cast<int>(threadIdx.x) / G, gi = static_cast<int>(threadIdx.x) % G;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * chunk_len;
  const int64_t r1 = mn(R, r0 + chunk_len);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RB; base < outer;
       base += static_cast<int64_t>(gridDim.x) * RB) {
    const int64_t row = base + g;
    const bool valid = row < outer;
    const T* xr = x + (valid ? row : 0) * R;
    St s = st_init<K>();
    if (valid)
      for (int64_t r = r0 + gi; r < r1; r += G) st_add<K>(s, ldd(xr + r), r, nmode, p);
    s = row_group_reduce<K, G, 1>(s, sm, nmode);
    if constexpr (K == kVar || K == kLse) {
      const double c = K == kVar ? s.a / static_cast<double>(r1 - r0) : s.a;
      s.b = 0;
      if (valid && (K == kVar || is_finite(c))) {
        for (int64_t r = r0 + gi; r < r1; r += G) {
          double v = ldd(xr + r);
          if (K == kVar) {
            double d = v - c;
            s.b += d * d;
          } else {
            s.b += exp(v - c);
          }
        }
      }
      s = row_group_reduce<K, G, 2>(s, sm, nmode);
      s.a = c;
      s.i = r1 - r0;
    }
    if (valid && gi == 0) {
      if (ws) ws[static_cast<int64_t>(blockIdx.y) * outer + row] = s;
      else st_write<T, K>(s, row, out, idx, op, R, p, nmode, false);
    }
  }
}

// ---- general: X consecutive outputs x Y threads along R per block ----------------------------

constexpr int kColBlock = 256;

// Reduces over threadIdx.y in shared memory (blockDim.y a power of two); every thread of a column
// gets the result.
template <int K, int PASS> MP_D St col_reduce(St s, St* sm, int nmode) {
  const int X = blockDim.x, Y = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  sm[ty * X + tx] = s;
  __syncthreads();
  for (int h = Y / 2; h > 0; h >>= 1) {
    if (ty < h) sm[ty * X + tx] = st_comb_pass<K, PASS>(sm[ty * X + tx], sm[(ty + h) * X + tx], nmode);
    __syncthreads();
  }
  s = sm[tx];
  __syncthreads();
  return s;
}

template <typename T, int K>
__global__ void reduce_cols(const T* x, void* out, int64_t* idx, int64_t outer, int64_t R, int64_t inner,
                            int64_t chunk_len, St* ws, int op, double p, int nmode) {
  __shared__ St sm[kColBlock];
  const int X = blockDim.x, Y = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int64_t nout = outer * inner;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * chunk_len;
  const int64_t r1 = mn(R, r0 + chunk_len);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * X; base < nout; base += static_cast<int64_t>(gridDim.x) * X) {
    const int64_t j = base + tx;
    const bool valid = j < nout;
    const int64_t o = valid ? j / inner : 0, i = valid ? j - o * inner : 0;
    const T* xl = x + o * R * inner + i;
    St s = st_init<K>();
    if (valid)
      for (int64_t r = r0 + ty; r < r1; r += Y) st_add<K>(s, ldd(xl + r * inner), r, nmode, p);
    s = col_reduce<K, 1>(s, sm, nmode);
    if constexpr (K == kVar || K == kLse) {
      const double c = K == kVar ? s.a / static_cast<double>(r1 - r0) : s.a;
      s.b = 0;
      if (valid && (K == kVar || is_finite(c))) {
        for (int64_t r = r0 + ty; r < r1; r += Y) {
          double v = ldd(xl + r * inner);
          if (K == kVar) {
            double d = v - c;
            s.b += d * d;
          } else {
            s.b += exp(v - c);
          }
        }
      }
      s = col_reduce<K, 2>(s, sm, nmode);
      s.a = c;
      s.i = r1 - r0;
    }
    if (valid && ty == 0) {
      if (ws) ws[static_cast<int64_t>(blockIdx.y) * nout + j] = s;
      else st_write<T, K>(s, j, out, idx, op, R, p, nmode, inner > 1);
    }
  }
}

// ---- chunked: combine the chunk states of each output ----------------------------------------

template <typename T, int K>
__global__ void reduce_finish(const St* ws, int chunks, int64_t nout, void* out, int64_t* idx, int op, int64_t R,
                              double p, int nmode, bool mean_by_product) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nout;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    St s = ws[j];
    for (int c = 1; c < chunks; c++) s = st_merge<K>(s, ws[static_cast<int64_t>(c) * nout + j], nmode);
    st_write<T, K>(s, j, out, idx, op, R, p, nmode, mean_by_product);
  }
}

// ---- host ------------------------------------------------------------------------------------

#ifdef MEGAPATCH_CUDA_EMULATOR
// small, so that the conformance tests exercise the chunked path
constexpr int64_t kTargetBlocks = 4;
constexpr int64_t kMinChunkElems = 16;
constexpr int64_t kMaxGridX = 4;
#else
constexpr int64_t kTargetBlocks = 1024;    // ~8 blocks per SM on an H100/H200
constexpr int64_t kMinChunkElems = 16384;  // elements a block reads at least per chunk
constexpr int64_t kMaxGridX = 65535;
#endif

// Stream-ordered workspace of the chunked path. The emulator runs launches synchronously and has
// no memory pools: plain cudaMalloc / cudaFree are equivalent there.
inline void* workspace_alloc(size_t bytes, cudaStream_t stream) {
  void* w = nullptr;
#ifdef MEGAPATCH_CUDA_EMULATOR
  (void)stream;
  check(cudaMalloc(&w, bytes), "reduce: workspace");
#else
  check(cudaMallocAsync(&w, bytes, stream), "reduce: workspace");
#endif
  return w;
}
inline void workspace_free(void* w, cudaStream_t stream) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  (void)stream;
  check(cudaFree(w), "reduce: workspace");
#else
  check(cudaFreeAsync(w, stream), "reduce: workspace");
#endif
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int pow2_ceil(int64_t v) {
  int r = 1;
  while (r < v && r < (1 << 30)) r <<= 1;
  return r;
}

// Chunks of R for `tasks` blocks that each read `per_r` elements per r.
inline int64_t choose_chunks(int64_t tasks, int64_t R, int64_t per_r) {
  if (tasks >= kTargetBlocks) return 1;
  int64_t want = ceil_div(kTargetBlocks, tasks);
  int64_t most = (R * per_r) / kMinChunkElems;  // chunks of at least kMinChunkElems
  int64_t c = mn(want, most);
  c = mn(c, static_cast<int64_t>(65535));
  return c < 2 ? 1 : c;
}

template <typename T, int K>
void reduce_launch(cudaStream_t stream, const TensorArg& x, const TensorArg& out, const TensorArg* indices,
                   int64_t outer, int64_t R, int64_t inner, int op, double p) {
  const T* xp = x.ptr<T>();
  void* op_out = out.data;
  int64_t* ip = indices ? indices->ptr<int64_t>() : nullptr;
  const int nmode = K == kNorm ? norm_mode(p) : 0;
  const int64_t nout = outer * inner;

  bool rows = inner == 1 && R >= 32;
  int G = 32;
  dim3 block(kRowBlock), grid;
  int64_t tasks, per_r;
  if (rows) {
    G = (R > 1024 || (outer <= 32 && R > 256)) ? 256 : 32;
    const int64_t rb = kRowBlock / G;
    tasks = ceil_div(outer, rb);
    per_r = rb;
  } else {
    int Y = mn(8, pow2_ceil(R));
    int X = static_cast<int>(mn(static_cast<int64_t>(kColBlock / Y), static_cast<int64_t>(pow2_ceil(nout))));
    Y = mn(kColBlock / X, pow2_ceil(R));
    block = dim3(X, Y);
    tasks = ceil_div(nout, X);
    per_r = X;
  }
  int64_t chunks = choose_chunks(tasks, R, per_r);
  int64_t chunk_len = ceil_div(R, chunks);
  chunks = ceil_div(R, chunk_len);
  grid = dim3(static_cast<unsigned>(mn(tasks, kMaxGridX)), static_cast<unsigned>(chunks));

  St* ws = chunks > 1 ? static_cast<St*>(workspace_alloc(static_cast<size_t>(chunks * nout) * sizeof(St), stream))
                       : nullptr;
  if (rows) {
    if (G == 256) {
      auto k = reduce_rows<T, K, 256>;
      MP_LAUNCH(k, grid, block, 0, stream, xp, op_out, ip, outer, R, chunk_len, ws, op, p, nmode);
    } else {
      auto k = reduce_rows<T, K, 32>;
      MP_LAUNCH(k, grid, block, 0, stream, xp, op_out, ip, outer, R, chunk_len, ws, op, p, nmode);
    }
    check_launch("reduce_rows");
  } else {
    auto k = reduce_cols<T, K>;
    MP_LAUNCH(k, grid, block, 0, stream, xp, op_out, ip, outer, R, inner, chunk_len, ws, op, p, nmode);
    check_launch("reduce_cols");
  }
  if (ws) {
    auto k = reduce_finish<T, K>;
    MP_LAUNCH(k, grid_for(nout), kThreads, 0, stream, static_cast<const St*>(ws), static_cast<int>(chunks), nout,
              op_out, ip, op, R, p, nmode, inner > 1);
    check_launch("reduce_finish");
    workspace_free(ws, stream);
  }
}

template <typename T>
void reduce_t(cudaStream_t s, const TensorArg& x, const TensorArg& out, const TensorArg* indices, int64_t outer,
              int64_t R, int64_t inner, int op, double p) {
  switch (op) {
    case kReduceSum: case kReduceMean: reduce_launch<T, kSum>(s, x, out, indices, outer, R, inner, op, p); break;
    case kReduceProd: reduce_launch<T, kProd>(s, x, out, indices, outer, R, inner, op, p); break;
    case kReduceMax: case kReduceArgmax: reduce_launch<T, kMax>(s, x, out, indices, outer, R, inner, op, p); break;
    case kReduceMin: case kReduceArgmin: reduce_launch<T, kMin>(s, x, out, indices, outer, R, inner, op, p); break;
    case kReduceVar: reduce_launch<T, kVar>(s, x, out, indices, outer, R, inner, op, p); break;
    case kReduceLogsumexp: reduce_launch<T, kLse>(s, x, out, indices, outer, R, inner, op, p); break;
    case kReduceNorm: reduce_launch<T, kNorm>(s, x, out, indices, outer, R, inner, op, p); break;
    default: throw_error("unknown reduction " + std::to_string(op));
  }
}

// ---- cumsum ----------------------------------------------------------------------------------

// One thread per (outer, inner) line; consecutive threads take consecutive inner positions.
template <typename T>
__global__ void cumsum_cols(const T* x, T* out, int64_t outer, int64_t R, int64_t inner) {
  const int64_t n = outer * inner;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = j / inner, i = j - o * inner;
    const T* xp = x + o * R * inner + i;
    T* op = out + o * R * inner + i;
    double s = 0;
    for (int64_t r = 0; r < R; r++) {
      s += static_cast<double>(Tr<T>::ld(xp + r * inner));
      Tr<T>::st(op + r * inner, static_cast<typename Tr<T>::C>(s));
    }
  }
}

constexpr int kScanWarps = 4;

// inner == 1: each warp scans 32 rows, 32 columns at a time through a shared tile (loads and
// stores along rows, the scan of lane l along row l).
template <typename T>
__global__ void cumsum_rows(const T* x, T* out, int64_t outer, int64_t R) {
  using C = typename Tr<T>::C;
  __shared__ C tile[kScanWarps][32][33];
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  C(*t)[33] = tile[w];
  for (int64_t rb = (static_cast<int64_t>(blockIdx.x) * kScanWarps + w) * 32; rb < outer;
       rb += static_cast<int64_t>(gridDim.x) * kScanWarps * 32) {
    const int nrows = static_cast<int>(mn(static_cast<int64_t>(32), outer - rb));
    double s = 0;
    for (int64_t c0 = 0; c0 < R; c0 += 32) {
      const int ncols = static_cast<int>(mn(static_cast<int64_t>(32), R - c0));
      if (lane < ncols)
        for (int k = 0; k < nrows; k++) t[k][lane] = Tr<T>::ld(x + (rb + k) * R + c0 + lane);
      __syncwarp();
      if (lane < nrows) {
        for (int c = 0; c < ncols; c++) {
          s += static_cast<double>(t[lane][c]);
          t[lane][c] = static_cast<C>(s);
        }
      }
      __syncwarp();
      if (lane < ncols)
        for (int k = 0; k < nrows; k++) Tr<T>::st(out + (rb + k) * R + c0 + lane, t[k][lane]);
      __syncwarp();
    }
  }
}

// Few long lines of integers (the MoE routing map's [T, E] hits scanned down T, a long 1-D index
// scan): one thread a line would add R elements in a row with most of the GPU idle. They take three
// passes over chunks of each line instead, in int64 (exact in any order, so the result is the
// in-order scan's): each chunk's sum, each line's exclusive scan of its chunk sums (the chunks'
// offsets), then each chunk's scan from its offset. Index j = (o * chunks + c) * inner + i: the
// threads of a warp take consecutive i, as cumsum_cols does.
constexpr int64_t kScanPairs = 32768;  // (line, chunk) pairs the chunked passes aim for
constexpr int64_t kScanMinChunk = 32;  // rows a chunk holds at least

template <typename T>
__global__ void cumsum_chunk_sums(const T* x, int64_t* sums, int64_t outer, int64_t R, int64_t inner, int64_t len,
                                  int64_t chunks) {
  const int64_t n = outer * chunks * inner;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t oc = j / inner, i = j - oc * inner, o = oc / chunks, c = oc - o * chunks;
    const T* xp = x + o * R * inner + i;
    int64_t acc = 0;
    for (int64_t r = c * len, end = mn(R, r + len); r < end; r++) acc += static_cast<int64_t>(xp[r * inner]);
    sums[j] = acc;
  }
}

__global__ void cumsum_chunk_offsets(int64_t* sums, int64_t outer, int64_t inner, int64_t chunks) {
  const int64_t n = outer * inner;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = j / inner, i = j - o * inner;
    int64_t acc = 0;
    for (int64_t c = 0; c < chunks; c++) {
      int64_t* p = sums + (o * chunks + c) * inner + i;
      const int64_t v = *p;
      *p = acc;
      acc += v;
    }
  }
}

template <typename T>
__global__ void cumsum_chunk_scan(const T* x, T* out, const int64_t* offsets, int64_t outer, int64_t R,
                                  int64_t inner, int64_t len, int64_t chunks) {
  const int64_t n = outer * chunks * inner;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t oc = j / inner, i = j - oc * inner, o = oc / chunks, c = oc - o * chunks;
    const int64_t base = o * R * inner + i;
    int64_t acc = offsets[j];
    for (int64_t r = c * len, end = mn(R, r + len); r < end; r++) {
      acc += static_cast<int64_t>(x[base + r * inner]);
      out[base + r * inner] = static_cast<T>(acc);
    }
  }
}

template <typename T>
void cumsum_t(cudaStream_t s, const TensorArg& x, const TensorArg& out, int64_t outer, int64_t R, int64_t inner) {
  const T* xp = x.ptr<T>();
  T* op = out.ptr<T>();
  if constexpr (std::is_same<T, int64_t>::value || std::is_same<T, int32_t>::value) {
    const int64_t lines = outer * inner;
    if (lines < kScanPairs && R >= 2 * kScanMinChunk) {
      const int64_t want = mn(ceil_div(kScanPairs, lines), R / kScanMinChunk);
      const int64_t len = ceil_div(R, want), chunks = ceil_div(R, len), pairs = lines * chunks;
      Scratch sums(static_cast<size_t>(pairs) * sizeof(int64_t), s);
      int64_t* sp = sums.at<int64_t>();
      auto k1 = cumsum_chunk_sums<T>;
      MP_LAUNCH(k1, grid_for(pairs), kThreads, 0, s, xp, sp, outer, R, inner, len, chunks);
      check_launch("cumsum_chunk_sums");
      auto k2 = cumsum_chunk_offsets;
      MP_LAUNCH(k2, grid_for(lines), kThreads, 0, s, sp, outer, inner, chunks);
      check_launch("cumsum_chunk_offsets");
      auto k3 = cumsum_chunk_scan<T>;
      MP_LAUNCH(k3, grid_for(pairs), kThreads, 0, s, xp, op, sp, outer, R, inner, len, chunks);
      check_launch("cumsum_chunk_scan");
      return;
    }
  }
  if (inner == 1 && R > 1) {
    const int64_t warps = ceil_div(outer, 32);
    const unsigned blocks = static_cast<unsigned>(mn(ceil_div(warps, kScanWarps), kMaxGridX));
    auto k = cumsum_rows<T>;
    MP_LAUNCH(k, blocks, kScanWarps * 32, 0, s, xp, op, outer, R);
    check_launch("cumsum_rows");
  } else {
    auto k = cumsum_cols<T>;
    MP_LAUNCH(k, grid_for(outer * inner), kThreads, 0, s, xp, op, outer, R, inner);
    check_launch("cumsum_cols");
  }
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw_error(msg);
}

}  // namespace

void reduce(cudaStream_t s, const TensorArg& x, const TensorArg& out, const TensorArg* indices, int64_t outer,
            int64_t R, int64_t inner, int op, double p) {
  if (R == 0) throw_error("reduce: cannot reduce over an empty dimension");
  if (op < 0 || op >= kReduceOpCount) throw_error("unknown reduction " + std::to_string(op));
  const bool arg = op == kReduceArgmax || op == kReduceArgmin;
  require(out.dtype == (arg ? DType::I64 : x.dtype),
          std::string("reduce: the output must be ") + (arg ? "int64" : dtype_name(x.dtype)) + ", got " +
              dtype_name(out.dtype));
  require(!indices || indices->dtype == DType::I64,
          std::string("reduce: indices must be int64, got ") + (indices ? dtype_name(indices->dtype) : ""));
  if (outer <= 0 || inner <= 0) return;
  MPC_DISPATCH_ALL(x.dtype, reduce_t, s, x, out, indices, outer, R, inner, op, p);
}

void cumsum(cudaStream_t s, const TensorArg& x, const TensorArg& out, int64_t outer, int64_t R, int64_t inner) {
  require(out.dtype == x.dtype, std::string("cumsum: the output must be ") + dtype_name(x.dtype) + ", got " +
                                    dtype_name(out.dtype));
  if (outer <= 0 || R <= 0 || inner <= 0) return;
  MPC_DISPATCH_ALL(x.dtype, cumsum_t, s, x, out, outer, R, inner);
}

}  // namespace mpc
