// Index kernels (see index.h), the CUDA twin of @megapatch/tensor's native/src/index.cc.
//
// Index validation runs on the device: a scan finds the lowest row-major position whose index
// lies outside [0, size) and writes [position, value] (or [-1, 0]) into the 16 bytes of `bad`,
// which also serve as its scratch word (no allocation per call). Up to kCheckOneBlock indices
// one block scans and reduces in shared memory; above that, a 1-thread kernel initialises the
// word, a grid scan lowers it with atomicMin, and a 1-thread kernel converts it to the doubles.
// The main kernels run regardless and skip rejected indices.
//
// The accumulating kernels must add in the CPU backend's order (increasing index position per
// output element) to be bit-identical with it, and must not use float atomics (their order, hence
// the rounding, changes from run to run). Both therefore sort instead of searching: a bitonic
// sort in a stream-ordered scratch buffer (tiles of 32 KB sorted and merged in shared memory, the
// strides above a tile one launch each) of 64-bit keys whose high bits are the destination and
// whose low bits are the position, so that equal destinations come out in position order. A
// bitonic network is used rather than a radix sort because it is plain kernels the emulator can
// run, and its comparisons do not depend on the data, so the same code sorts any key width.
//  - indexAddRows used to give each output row a block that scanned the whole index, O(S·L)
//    index reads (an embedding backward with a 128k vocabulary and 16k tokens: 2·10^9). Now the
//    index is read once into keys (rejected and `skip` entries get the sentinel row S, which
//    sorts last), a binary search per row finds each row's run of sorted keys, and one thread per
//    output element sums its run in the compute type, rounding once. Rows without a run get the
//    base (or +0) as before. Thread groups are as wide as the row (up to 256), so narrow rows do
//    not leave most of a block idle.
//  - scatterAddAlong gives each line along `dim` to one thread when there are enough lines to
//    fill the GPU or the lines are short; a few long lines used to serialise on a few threads.
//    Those now sort (line, target, position) keys, and the first position of each equal
//    (line, target) run applies the whole run in order, rounding to the output type at each step
//    as the CPU does. One target hit by every position of a line is still serial: the rounding
//    chain of that element is what the CPU computes.
//
// topk sorts each line of up to kTopkSortMax elements in shared memory (bitonic sort of 64-bit
// order keys with the position as tie-break). Longer lines used to take k rounds of a block-wide
// minimum, O(k·R). For k up to kTopkChunkK they are now cut into chunks of kTopkSortMax, each
// sorted by its own block, which keeps its best k (key, position) pairs: the line's top k is among
// them, since the order is strict. The candidates are cut again until one block can sort what is
// left. Larger k (up to the whole line) sorts every line whole with the global bitonic sort of
// (key, position) pairs. Either way NaN ranks above every number, -0 equals +0, and equal values
// come lowest position first, as in the CPU backend.
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "index.h"

namespace mpc {
namespace {

constexpr unsigned long long kNone = ~0ull;
constexpr int kCheckThreads = 512;
constexpr int64_t kCheckOneBlock = int64_t(1) << 20;
constexpr int kSortThreads = 512;
constexpr int kSortSmemBytes = 32768;  // a tile: 4096 keys or 2048 (key, position) pairs
constexpr int kAddThreads = 256;
constexpr int kTopkSortMax = 4096;     // 64-bit keys + int positions: 48 KB of shared memory
constexpr int64_t kTopkChunkK = 1024;  // chunks of kTopkSortMax shrink at least 4x per pass
// One thread per line fills an H100/H200 from about this many lines; below, long lines sort.
constexpr int64_t kScatterManyLines = 4096;
constexpr int64_t kScatterShortLine = 64;

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

// ---- the device sort ---------------------------------------------------------------------------
int64_t pow2_at_least(int64_t v) {
  int64_t n = 1;
  while (n < v) n <<= 1;
  return n;
}
// bits that hold every value below n (at least 1)
int bits_below(int64_t n) {
  int b = 1;
  while (b < 63 && (int64_t(1) << b) < n) b++;
  return b;
}

MP_HD bool pair_less(unsigned long long ka, long long pa, unsigned long long kb, long long pb) {
  return ka < kb || (ka == kb && pa < pb);
}

// A (key, position) pair of topk's whole-line sort; the padding is (kNone, LLONG_MAX).
struct KeyPos {
  unsigned long long k;
  long long p;
};
MP_HD bool sort_before(unsigned long long a, unsigned long long b) { return a < b; }
MP_HD bool sort_before(const KeyPos& a, const KeyPos& b) { return pair_less(a.k, a.p, b.k, b.p); }

template <typename P>
MP_D void bitonic_cmpx(P* a, int64_t lo, int64_t hi, bool up) {
  if (sort_before(a[hi], a[lo]) == up) {
    const P t = a[lo];
    a[lo] = a[hi];
    a[hi] = t;
  }
}

// The bitonic stages of sizes size_lo..size_hi with strides below `tile`, on tiles of a[0, total)
// staged in shared memory. Every `seg` elements form one ascending sorted run at the end (the
// direction of a stage depends on the global position, so the merges of a sort are tile-local).
template <typename P>
__global__ void __launch_bounds__(kSortThreads) bitonic_tile_kernel(P* a, int64_t total, int tile, int64_t size_lo,
                                                                    int64_t size_hi, int64_t seg) {
  MP_DYNAMIC_SMEM(P, buf);
  const int t = threadIdx.x, nt = blockDim.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * tile;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * tile; base < total; base += step) {
    for (int i = t; i < tile; i += nt) buf[i] = a[base + i];
    __syncthreads();
    for (int64_t size = size_lo; size <= size_hi; size <<= 1) {
      for (int stride = static_cast<int>(mn(size, static_cast<int64_t>(tile)) >> 1); stride > 0; stride >>= 1) {
        for (int q = t; q < (tile >> 1); q += nt) {
          const int lo = 2 * q - (q & (stride - 1));
          bitonic_cmpx(buf, lo, lo + stride, size >= seg || ((base + lo) & size) == 0);
        }
        __syncthreads();
      }
    }
    for (int i = t; i < tile; i += nt) a[base + i] = buf[i];
    __syncthreads();
  }
}

// One bitonic stage with a stride of at least a tile, in global memory.
template <typename P>
__global__ void bitonic_step_kernel(P* a, int64_t total, int64_t size, int64_t stride, int64_t seg) {
  const int64_t half = total >> 1;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < half; q += step) {
    const int64_t lo = 2 * q - (q & (stride - 1));
    bitonic_cmpx(a, lo, lo + stride, size >= seg || (lo & size) == 0);
  }
}

// Sorts each run of `seg` (a power of two) elements of a[0, total) ascending; total is a multiple
// of seg. Launches: 1 + sum over the sizes above a tile of (log2(size / tile) + 1).
template <typename P>
void bitonic_sort(cudaStream_t s, P* a, int64_t total, int64_t seg) {
  if (seg < 2) return;
  const int tile = static_cast<int>(mn(seg, static_cast<int64_t>(kSortSmemBytes / sizeof(P))));
  const int threads = mn(tile / 2, kSortThreads);
  const unsigned blocks = grid_for(total / tile, 1);
  const size_t smem = static_cast<size_t>(tile) * sizeof(P);
  auto tk = bitonic_tile_kernel<P>;
  auto sk = bitonic_step_kernel<P>;
  MP_LAUNCH(tk, blocks, threads, smem, s, a, total, tile, static_cast<int64_t>(2), static_cast<int64_t>(tile), seg);
  check_launch("index sort (tiles)");
  for (int64_t size = static_cast<int64_t>(tile) * 2; size <= seg; size <<= 1) {
    for (int64_t stride = size >> 1; stride >= tile; stride >>= 1) {
      MP_LAUNCH(sk, grid_for(total / 2), kThreads, 0, s, a, total, size, stride, seg);
      check_launch("index sort (stage)");
    }
    MP_LAUNCH(tk, blocks, threads, smem, s, a, total, tile, size, size, seg);
    check_launch("index sort (merge)");
  }
}

// the first i in [0, n) with a[i] >= x (n if none)
MP_HD int64_t lower_bound_key(const unsigned long long* a, int64_t n, unsigned long long x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (a[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
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
// keys[i] = (destination row << shift) | i for the L positions, the row S for rejected and `skip`
// entries, and kNone for the padding up to n.
__global__ void add_keys_kernel(unsigned long long* keys, Idx idx, int64_t L, int64_t n, int64_t S, int64_t skip,
                                int shift) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    if (i >= L) {
      keys[i] = kNone;
      continue;
    }
    const int64_t v = idx.at(i);
    const int64_t row = (v < 0 || v >= S || v == skip) ? S : v;
    keys[i] = (static_cast<unsigned long long>(row) << shift) | static_cast<unsigned long long>(i);
  }
}

// start[s] = the first sorted key of row s, for s in [0, S] (start[S] ends row S - 1's run).
__global__ void add_bounds_kernel(int64_t* start, const unsigned long long* keys, int64_t n, int64_t S, int shift) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s <= S; s += step)
    start[s] = lower_bound_key(keys, n, static_cast<unsigned long long>(s) << shift);
}

// One thread per output element: groups of `group` threads take (row, column tile) tasks. start is
// null when the index is empty.
template <typename T>
__global__ void __launch_bounds__(kAddThreads)
    add_rows_kernel(T* out, const T* base, const T* src, const unsigned long long* keys, const int64_t* start,
                    unsigned long long pos_mask, int64_t L, int64_t outer, int64_t S, int64_t inner, int64_t tiles,
                    int group, double alpha) {
  using C = typename Tr<T>::C;
  const C a = static_cast<C>(alpha);
  const int lane = threadIdx.x % group, groups = blockDim.x / group;
  const int64_t tasks = outer * S * tiles;
  const int64_t step = static_cast<int64_t>(gridDim.x) * groups;
  for (int64_t task = static_cast<int64_t>(blockIdx.x) * groups + threadIdx.x / group; task < tasks; task += step) {
    const int64_t item = task / tiles;
    const int64_t j = (task - item * tiles) * group + lane;
    if (j >= inner) continue;
    const int64_t o = item / S, s = item - o * S;
    const int64_t b = start ? start[s] : 0, e = start ? start[s + 1] : 0;
    T* dst = out + item * inner + j;
    const T* brow = base ? base + item * inner + j : nullptr;
    if (b == e) {
      if (!brow) Tr<T>::st(dst, C(0));  // +0 in every format
      else if (brow != dst) *dst = *brow;  // in place (base is out): the row stays as it is
      continue;
    }
    const T* scol = src + o * L * inner + j;
    C acc = C(0);
    for (int64_t q = b; q < e; q++) acc += Tr<T>::ld(scol + static_cast<int64_t>(keys[q] & pos_mask) * inner);
    if (brow) Tr<T>::st(dst, fmac(a, acc, Tr<T>::ld(brow)));
    else Tr<T>::st(dst, a * acc);
  }
}

// add_rows_kernel with 16-byte packs (inner a multiple of V, the three base addresses 16-byte
// aligned): a thread sums V adjacent columns of its output row, each over its run in the same
// order, so the results are add_rows_kernel's bit for bit; a warp moves 512 bytes per row access
// instead of 64 for 16-bit data (an embedding backward writes every row of the table).
template <typename T, int V>
__global__ void __launch_bounds__(kAddThreads)
    add_rows_vec_kernel(T* out, const T* base, const T* src, const unsigned long long* keys, const int64_t* start,
                        unsigned long long pos_mask, int64_t L, int64_t outer, int64_t S, int64_t inner,
                        int64_t tiles, int group, double alpha) {
  using C = typename Tr<T>::C;
  using Pk = Pack<T, V>;
  const C a = static_cast<C>(alpha);
  const int lane = threadIdx.x % group, groups = blockDim.x / group;
  const int64_t nv = inner / V;
  const int64_t tasks = outer * S * tiles;
  const int64_t step = static_cast<int64_t>(gridDim.x) * groups;
  for (int64_t task = static_cast<int64_t>(blockIdx.x) * groups + threadIdx.x / group; task < tasks; task += step) {
    const int64_t item = task / tiles;
    const int64_t jv = (task - item * tiles) * group + lane;
    if (jv >= nv) continue;
    const int64_t o = item / S, s = item - o * S;
    const int64_t b = start ? start[s] : 0, e = start ? start[s + 1] : 0;
    Pk* dst = reinterpret_cast<Pk*>(out + item * inner) + jv;
    const Pk* brow = base ? reinterpret_cast<const Pk*>(base + item * inner) + jv : nullptr;
    if (b == e) {
      if (brow) {
        if (brow != dst) *dst = *brow;  // in place (base is out): the row stays as it is
      } else {
        Pk z;
        for (int k = 0; k < V; k++) Tr<T>::st(&z.v[k], C(0));  // +0 in every format
        *dst = z;
      }
      continue;
    }
    const T* scol = src + o * L * inner + jv * V;
    C acc[V];
    for (int k = 0; k < V; k++) acc[k] = C(0);
    for (int64_t q = b; q < e; q++) {
      const Pk p = *reinterpret_cast<const Pk*>(scol + static_cast<int64_t>(keys[q] & pos_mask) * inner);
      for (int k = 0; k < V; k++) acc[k] += Tr<T>::ld(&p.v[k]);
    }
    if (brow) {
      const Pk bb = *brow;
      for (int k = 0; k < V; k++) acc[k] = fmac(a, acc[k], Tr<T>::ld(&bb.v[k]));
    } else {
      for (int k = 0; k < V; k++) acc[k] = a * acc[k];
    }
    Pk r;
    round_store(r.v, acc);
    *dst = r;
  }
}

template <typename T>
void add_rows_run(cudaStream_t s, const TensorArg& out, const TensorArg* base, const TensorArg& src,
                  const unsigned long long* keys, const int64_t* start, unsigned long long pos_mask, int64_t L,
                  int64_t outer, int64_t S, int64_t inner, double alpha) {
  constexpr int V = 16 / sizeof(T);
  const auto a16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (V > 1 && inner % V == 0 && a16(out.data) && (!base || a16(base->data)) && a16(src.data)) {
    const int64_t nv = inner / V;
    const int group = static_cast<int>(mn(pow2_at_least(nv), static_cast<int64_t>(kAddThreads)));
    const int64_t tiles = (nv + group - 1) / group;
    auto k = add_rows_vec_kernel<T, V>;
    MP_LAUNCH(k, grid_for(outer * S * tiles, kAddThreads / group), kAddThreads, 0, s, out.ptr<T>(),
              base ? base->ptr<T>() : nullptr, src.ptr<T>(), keys, start, pos_mask, L, outer, S, inner, tiles, group,
              alpha);
    check_launch("indexAddRows");
    return;
  }
  const int group = static_cast<int>(mn(pow2_at_least(inner), static_cast<int64_t>(kAddThreads)));
  const int64_t tiles = (inner + group - 1) / group;
  auto k = add_rows_kernel<T>;
  MP_LAUNCH(k, grid_for(outer * S * tiles, kAddThreads / group), kAddThreads, 0, s, out.ptr<T>(),
            base ? base->ptr<T>() : nullptr, src.ptr<T>(), keys, start, pos_mask, L, outer, S, inner, tiles, group,
            alpha);
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

// element offset of line `line` (row-major over g.shape) in tensor `which` of g
MP_HD int64_t line_offset(const Along& g, int64_t line, int which) {
  int64_t off = 0;
  for (int d = g.ndim - 1; d >= 0; d--) {
    const int64_t q = line / g.shape[d];
    off += (line - q * g.shape[d]) * g.st[which][d];
    line = q;
  }
  return off;
}

// g: the line geometry (index's shape without dim; strides of out, src, index there)
template <typename T>
__global__ void scatter_add_kernel(T* out, const T* src, const char* ip, int wide, Along g, int64_t lines, int64_t R,
                                   int64_t ostep, int64_t sstep, int64_t istep, int64_t size, double alpha) {
  using C = typename Tr<T>::C;
  const C al = static_cast<C>(alpha);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t line = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; line < lines; line += step) {
    const int64_t oo = line_offset(g, line, 0), os = line_offset(g, line, 1), oi = line_offset(g, line, 2);
    for (int64_t r = 0; r < R; r++) {
      const int64_t v = read_index(ip, wide, oi + r * istep);
      if (v < 0 || v >= size) continue;
      T* d = out + oo + v * ostep;
      Tr<T>::st(d, fmac(al, Tr<T>::ld(src + os + r * sstep), Tr<T>::ld(d)));
    }
  }
}

// keys[e] = ((line * size + target) << shift) | r for element e = line * R + r, the group
// lines * size for rejected indices, and kNone for the padding up to n.
__global__ void scatter_keys_kernel(unsigned long long* keys, const char* ip, int wide, Along g, int64_t lines,
                                    int64_t R, int64_t istep, int64_t size, int64_t n, int shift) {
  const int64_t used = lines * R;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += step) {
    if (e >= used) {
      keys[e] = kNone;
      continue;
    }
    const int64_t line = e / R, r = e - line * R;
    const int64_t v = read_index(ip, wide, line_offset(g, line, 2) + r * istep);
    const int64_t grp = (v < 0 || v >= size) ? lines * size : line * size + v;
    keys[e] = (static_cast<unsigned long long>(grp) << shift) | static_cast<unsigned long long>(r);
  }
}

// The first sorted key of each (line, target) run applies the run in position order.
template <typename T>
__global__ void scatter_add_sorted_kernel(T* out, const T* src, const unsigned long long* keys, int64_t n, int shift,
                                          Along g, int64_t size, int64_t groups, int64_t ostep, int64_t sstep,
                                          double alpha) {
  using C = typename Tr<T>::C;
  const C al = static_cast<C>(alpha);
  const unsigned long long rmask = (1ull << shift) - 1ull;
  const unsigned long long gend = static_cast<unsigned long long>(groups);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n; q += step) {
    const unsigned long long grp = keys[q] >> shift;
    if (grp >= gend || (q > 0 && (keys[q - 1] >> shift) == grp)) continue;
    const int64_t line = static_cast<int64_t>(grp) / size, v = static_cast<int64_t>(grp) - line * size;
    const T* sl = src + line_offset(g, line, 1);
    T* d = out + line_offset(g, line, 0) + v * ostep;
    T cur = *d;
    for (int64_t p = q; p < n && (keys[p] >> shift) == grp; p++) {
      const int64_t r = static_cast<int64_t>(keys[p] & rmask);
      Tr<T>::st(&cur, fmac(al, Tr<T>::ld(sl + r * sstep), Tr<T>::ld(&cur)));
    }
    *d = cur;
  }
}

template <typename T>
void scatter_add_run(cudaStream_t s, const TensorArg& out, const TensorArg& src, const TensorArg& index, const Along& g,
                     int64_t lines, int64_t R, int64_t ostep, int64_t sstep, int64_t istep, int64_t size, double alpha) {
  const char* ip = static_cast<const char*>(index.data);
  const int wide = index.dtype == DType::I64 ? 1 : 0;
  const int shift = bits_below(R);
  // the keys hold lines * size + 1 groups above `shift` bits
  const bool fits = shift < 62 && lines <= static_cast<int64_t>((1ull << (63 - shift)) / static_cast<uint64_t>(size + 1));
  if (lines >= kScatterManyLines || R <= kScatterShortLine || !fits) {
    auto k = scatter_add_kernel<T>;
    MP_LAUNCH(k, grid_for(lines), kThreads, 0, s, out.ptr<T>(), src.ptr<T>(), ip, wide, g, lines, R, ostep, sstep,
              istep, size, alpha);
    check_launch("scatterAddAlong");
    return;
  }
  const int64_t n = pow2_at_least(lines * R);
  Scratch scratch(static_cast<size_t>(n) * sizeof(unsigned long long), s);
  unsigned long long* keys = scratch.at<unsigned long long>();
  MP_LAUNCH(scatter_keys_kernel, grid_for(n), kThreads, 0, s, keys, ip, wide, g, lines, R, istep, size, n, shift);
  check_launch("scatterAddAlong (keys)");
  bitonic_sort(s, keys, n, n);
  auto k = scatter_add_sorted_kernel<T>;
  MP_LAUNCH(k, grid_for(n), kThreads, 0, s, out.ptr<T>(), src.ptr<T>(), keys, n, shift, g, size, lines * size, ostep,
            sstep, alpha);
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

// One pass over chunks of the lines of x [outer, R, inner]: the input is x itself (ck null) or
// the candidates of the previous pass (len per line); each block sorts a chunk of up to `chunk`
// pairs in shared memory (n, a power of two, slots) and keeps its best k, as candidates (out_len
// per line, chunk c's at c * k) or, on the last pass (one chunk per line), as the result.
struct TopkPass {
  int64_t outer, R, inner, len, chunk, chunks, out_len, k;
  int largest, n;
};

template <typename T>
__global__ void topk_sort_kernel(T* values, int64_t* indices, unsigned long long* ok, int* op, const T* x,
                                 const unsigned long long* ck, const int* cp, TopkPass p) {
  MP_DYNAMIC_SMEM(unsigned long long, keys);
  int* pos = reinterpret_cast<int*>(keys + p.n);
  const int t = threadIdx.x;
  const int nt = blockDim.x;
  const int n = p.n;
  const int64_t tasks = p.outer * p.inner * p.chunks;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t line = task / p.chunks, c = task - line * p.chunks;
    const int64_t o = line / p.inner, i = line - o * p.inner;
    const T* xl = x + o * p.R * p.inner + i;
    const int64_t lo = c * p.chunk;
    const int cnt = static_cast<int>(mn(p.chunk, p.len - lo));
    for (int r = t; r < n; r += nt) {
      if (r >= cnt) {
        keys[r] = kNone;
        pos[r] = INT_MAX;
      } else if (ck) {
        keys[r] = ck[line * p.len + lo + r];
        pos[r] = cp[line * p.len + lo + r];
      } else {
        keys[r] = order_key(Tr<T>::ld(xl + (lo + r) * p.inner), p.largest != 0);
        pos[r] = static_cast<int>(lo + r);
      }
    }
    __syncthreads();
    for (int size = 2; size <= n; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        for (int q = t; q < (n >> 1); q += nt) {
          const int a = 2 * q - (q & (stride - 1));
          const int b = a + stride;
          const bool up = (a & size) == 0;
          const bool b_first = pair_less(keys[b], pos[b], keys[a], pos[a]);
          if (b_first == up) {
            const unsigned long long tk = keys[a];
            keys[a] = keys[b];
            keys[b] = tk;
            const int tp = pos[a];
            pos[a] = pos[b];
            pos[b] = tp;
          }
        }
        __syncthreads();
      }
    }
    if (values) {
      for (int64_t q = t; q < p.k; q += nt) {
        const int64_t at = o * p.k * p.inner + q * p.inner + i;
        values[at] = xl[static_cast<int64_t>(pos[q]) * p.inner];  // the stored value, bit for bit
        indices[at] = pos[q];
      }
    } else {
      const int64_t keep = mn(p.k, static_cast<int64_t>(cnt));
      for (int64_t q = t; q < keep; q += nt) {
        ok[line * p.out_len + c * p.k + q] = keys[q];
        op[line * p.out_len + c * p.k + q] = pos[q];
      }
    }
    __syncthreads();
  }
}

// a[line * seg + r] = (order key, r) for r < R, then the padding
template <typename T>
__global__ void topk_pairs_kernel(KeyPos* a, const T* x, int64_t outer, int64_t R, int64_t inner, int64_t seg,
                                  int largest) {
  const int64_t total = outer * inner * seg;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t line = e / seg, r = e - line * seg;
    KeyPos kp;
    if (r < R) {
      const int64_t o = line / inner, i = line - o * inner;
      kp.k = order_key(Tr<T>::ld(x + (o * R + r) * inner + i), largest != 0);
      kp.p = r;
    } else {
      kp.k = kNone;
      kp.p = LLONG_MAX;
    }
    a[e] = kp;
  }
}

template <typename T>
__global__ void topk_write_kernel(T* values, int64_t* indices, const KeyPos* a, const T* x, int64_t outer, int64_t R,
                                  int64_t inner, int64_t seg, int64_t k) {
  const int64_t total = outer * inner * k;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t line = e / k, q = e - line * k;
    const int64_t o = line / inner, i = line - o * inner;
    const int64_t r = a[line * seg + q].p;
    const int64_t at = (o * k + q) * inner + i;
    values[at] = x[(o * R + r) * inner + i];
    indices[at] = r;
  }
}

template <typename T>
void topk_sort_launch(cudaStream_t s, T* values, int64_t* indices, unsigned long long* ok, int* op, const T* x,
                      const unsigned long long* ck, const int* cp, TopkPass p) {
  p.n = static_cast<int>(pow2_at_least(mn(p.chunk, p.len)));
  const int threads = mx(32, mn(p.n / 2, kSortThreads));
  const size_t smem = static_cast<size_t>(p.n) * (sizeof(unsigned long long) + sizeof(int));
  auto kf = topk_sort_kernel<T>;
  MP_LAUNCH(kf, grid_for(p.outer * p.inner * p.chunks, 1), threads, smem, s, values, indices, ok, op, x, ck, cp, p);
  check_launch("topk");
}

template <typename T>
void topk_run(cudaStream_t s, const TensorArg& values, const TensorArg& indices, const TensorArg& x, int64_t outer,
              int64_t R, int64_t inner, int64_t k, bool largest) {
  const int64_t lines = outer * inner;
  T* vp = values.ptr<T>();
  int64_t* ip = indices.ptr<int64_t>();
  const T* xp = x.ptr<T>();
  if (R > kTopkSortMax && k > kTopkChunkK) {  // sort every line whole
    const int64_t seg = pow2_at_least(R);
    Scratch scratch(static_cast<size_t>(lines * seg) * sizeof(KeyPos), s);
    KeyPos* a = scratch.at<KeyPos>();
    auto fill = topk_pairs_kernel<T>;
    MP_LAUNCH(fill, grid_for(lines * seg), kThreads, 0, s, a, xp, outer, R, inner, seg, largest ? 1 : 0);
    check_launch("topk (keys)");
    bitonic_sort(s, a, lines * seg, seg);
    auto write = topk_write_kernel<T>;
    MP_LAUNCH(write, grid_for(lines * k), kThreads, 0, s, vp, ip, a, xp, outer, R, inner, seg, k);
    check_launch("topk");
    return;
  }
  TopkPass p{outer, R, inner, R, kTopkSortMax, 1, 0, k, largest ? 1 : 0, 0};
  if (R <= kTopkSortMax) {
    p.chunk = R;
    topk_sort_launch<T>(s, vp, ip, nullptr, nullptr, xp, nullptr, nullptr, p);
    return;
  }
  // candidates per line after a pass over len: k from each full chunk, up to k from the last
  auto shrink = [&](int64_t len) {
    const int64_t chunks = (len + kTopkSortMax - 1) / kTopkSortMax;
    return (chunks - 1) * k + mn(k, len - (chunks - 1) * kTopkSortMax);
  };
  const int64_t cap = lines * shrink(R);  // the first pass leaves the most
  const size_t kbytes = static_cast<size_t>(cap) * sizeof(unsigned long long);
  Scratch scratch(2 * (kbytes + static_cast<size_t>(cap) * sizeof(int)), s);
  unsigned long long* kb[2] = {scratch.at<unsigned long long>(), scratch.at<unsigned long long>(kbytes)};
  int* pb[2] = {scratch.at<int>(2 * kbytes), scratch.at<int>(2 * kbytes + static_cast<size_t>(cap) * sizeof(int))};
  const unsigned long long* ck = nullptr;
  const int* cp = nullptr;
  for (int flip = 0; p.len > kTopkSortMax; flip ^= 1) {
    p.chunks = (p.len + kTopkSortMax - 1) / kTopkSortMax;
    p.out_len = shrink(p.len);
    topk_sort_launch<T>(s, nullptr, nullptr, kb[flip], pb[flip], xp, ck, cp, p);
    ck = kb[flip];
    cp = pb[flip];
    p.len = p.out_len;
  }
  p.chunk = p.len;
  p.chunks = 1;
  topk_sort_launch<T>(s, vp, ip, nullptr, nullptr, xp, ck, cp, p);
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
  if (L == 0) {
    MPC_DISPATCH_ALL(out.dtype, add_rows_run, s, out, base, src, nullptr, nullptr, 0ull, L, outer, S, inner, alpha);
    return;
  }
  const int shift = bits_below(L);
  if (shift >= 62 || S >= static_cast<int64_t>(1ull << (63 - shift)))
    throw_error("indexAddRows: rows x index length must stay below 2^63 to sort the index");
  const int64_t n = pow2_at_least(L);
  const size_t kbytes = static_cast<size_t>(n) * sizeof(unsigned long long);
  Scratch scratch(kbytes + static_cast<size_t>(S + 1) * sizeof(int64_t), s);
  unsigned long long* keys = scratch.at<unsigned long long>();
  int64_t* start = scratch.at<int64_t>(kbytes);
  MP_LAUNCH(add_keys_kernel, grid_for(n), kThreads, 0, s, keys, idx, L, n, S, skip, shift);
  check_launch("indexAddRows (keys)");
  bitonic_sort(s, keys, n, n);
  MP_LAUNCH(add_bounds_kernel, grid_for(S + 1), kThreads, 0, s, start, keys, n, S, shift);
  check_launch("indexAddRows (bounds)");
  const unsigned long long mask = (1ull << shift) - 1ull;
  MPC_DISPATCH_ALL(out.dtype, add_rows_run, s, out, base, src, keys, start, mask, L, outer, S, inner, alpha);
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
  if (R > INT_MAX) throw_error("topk: lines longer than 2^31 - 1 elements are not supported");
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
