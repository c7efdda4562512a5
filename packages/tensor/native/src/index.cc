// Index kernels: row gathers and deterministic row accumulation (embedding, index_select,
// index_add), gather and scatter-add along one dimension of strided tensors, top-k along a
// dimension, triangular masks and one-hot encoding.
//
// Every kernel that reads indices validates all of them before it writes anything. On a bad
// index it returns [position, value] of the first offending element (row-major order) and the
// JavaScript side raises the error, so no kernel ever touches memory outside its tensors.
// Index tensors are int32 or int64; kernels that scan them flat expect them contiguous.
#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "common.h"

namespace mp {

// Element reader over an int32 or int64 index tensor (offsets in elements).
struct IndexView {
  const void* p;
  bool wide;
  int64_t operator[](int64_t i) const {
    return wide ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
  }
};

static IndexView index_view(const TensorArg& t) {
  if (t.dtype != DType::I32 && t.dtype != DType::I64) throw_error("index tensors must be int32 or int64");
  return IndexView{t.data, t.dtype == DType::I64};
}

// First position in [0, n) of a contiguous index whose value lies outside [0, size), or -1.
// Each chunk stops at its own first bad element; the smallest of those is the global first.
static int64_t first_bad(IndexView idx, int64_t n, int64_t size) {
  std::atomic<int64_t> bad{-1};
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      int64_t v = idx[i];
      if (v < 0 || v >= size) {
        int64_t cur = bad.load();
        while ((cur < 0 || i < cur) && !bad.compare_exchange_weak(cur, i)) {
        }
        return;
      }
    }
  });
  return bad.load();
}

static Napi::Value report_bad(Napi::Env env, IndexView idx, int64_t pos) {
  Napi::Array r = Napi::Array::New(env, 2);
  r.Set(uint32_t{0}, Napi::Number::New(env, static_cast<double>(pos)));
  r.Set(uint32_t{1}, Napi::Number::New(env, static_cast<double>(idx[pos])));
  return r;
}

// ---- row gather: out[o, i, :] = x[o, index[i], :] ---------------------------------------------
// Rows of one element (selection along the last dimension) are moved as words of their size
// instead of through memcpy.
template <typename U>
static void select_elements(char* out, const char* x, int64_t outer, int64_t S, int64_t L, IndexView idx) {
  U* o = reinterpret_cast<U*>(out);
  const U* xp = reinterpret_cast<const U*>(x);
  parallel_for(outer, L, [&](int64_t b, int64_t e) {
    for (int64_t oo = b; oo < e; oo++)
      for (int64_t i = 0; i < L; i++) o[oo * L + i] = xp[oo * S + idx[i]];
  });
}

// indexSelectRows(out, x, index, outer, S, inner): x [outer, S, inner] and out [outer, L, inner]
// contiguous with the same dtype; a pure byte copy, so every dtype is handled alike.
MP_ENTRY(IndexSelectRowsK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor(), index = a.tensor();
  int64_t outer = a.i64(), S = a.i64(), inner = a.i64();
  IndexView idx = index_view(index);
  int64_t L = index.numel();
  int64_t bad = first_bad(idx, L, S);
  if (bad >= 0) return report_bad(info.Env(), idx, bad);
  const size_t isz = itemsize(x.dtype);
  const size_t row = static_cast<size_t>(inner) * isz;
  char* o = out.data;
  const char* xp = x.data;
  if (row == 0 || outer * L == 0) return info.Env().Undefined();
  if (inner == 1 && (isz == 1 || isz == 2 || isz == 4 || isz == 8)) {
    if (isz == 1) select_elements<uint8_t>(o, xp, outer, S, L, idx);
    else if (isz == 2) select_elements<uint16_t>(o, xp, outer, S, L, idx);
    else if (isz == 4) select_elements<uint32_t>(o, xp, outer, S, L, idx);
    else select_elements<uint64_t>(o, xp, outer, S, L, idx);
    return info.Env().Undefined();
  }
  parallel_for(outer * L, inner, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      int64_t oo = r / L, i = r % L;
      std::memcpy(o + r * row, xp + (oo * S + idx[i]) * row, row);
    }
  });
  return info.Env().Undefined();
}

// ---- deterministic row accumulation ------------------------------------------------------------
// out[o, s, :] = base[o, s, :] + alpha * sum over {i : index[i] == s, index[i] != skip} of
// src[o, i, :], summed in increasing i. The positions are grouped by target row with a counting
// sort, then each output row is produced by one thread from a private accumulator in the compute
// type (float for 16/32-bit floats, double for float64 and integers) and rounded once. No atomics
// and no dependence on the thread count, so results are bitwise reproducible. Rows are handed out
// dynamically because frequent ids (low token ids in BPE vocabularies) make some rows costly.
template <typename T>
static void index_add_rows(const TensorArg& out, const TensorArg* base, const TensorArg& src, IndexView idx, int64_t L,
                           int64_t outer, int64_t S, int64_t inner, double alpha, int64_t skip) {
  using C = typename Tr<T>::C;
  std::vector<int64_t> start(static_cast<size_t>(S) + 1, 0);
  for (int64_t i = 0; i < L; i++) {
    int64_t v = idx[i];
    if (v != skip) start[v + 1]++;
  }
  for (int64_t s = 0; s < S; s++) start[s + 1] += start[s];
  std::vector<int64_t> order(static_cast<size_t>(start[S]));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < L; i++) {
      int64_t v = idx[i];
      if (v != skip) order[fill[v]++] = i;
    }
  }
  T* op = out.ptr<T>();
  const T* bp = base ? base->ptr<T>() : nullptr;
  const T* sp = src.ptr<T>();
  const C a = static_cast<C>(alpha);
  const int64_t items = outer * S;
  const size_t row_bytes = static_cast<size_t>(inner) * sizeof(T);
  const int64_t work = (items + outer * start[S]) * inner;
  const int nt = num_threads();
  const bool par = nt > 1 && items > 1 && work >= kParallelGrain;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(4096, 2048 / (inner + 1)));
  (void)par;
  (void)chunk;
#pragma omp parallel num_threads(nt) if (par)
  {
    std::vector<C> acc(static_cast<size_t>(inner));
#pragma omp for schedule(dynamic, chunk)
    for (int64_t it = 0; it < items; it++) {
      const int64_t o = it / S, s = it % S;
      T* dst = op + it * inner;
      const int64_t b = start[s], e = start[s + 1];
      if (b == e) {
        if (bp) std::memcpy(dst, bp + it * inner, row_bytes);
        else std::memset(dst, 0, row_bytes);  // +0.0 is all-zero bits in every float format
        continue;
      }
      std::fill(acc.begin(), acc.end(), C(0));
      for (int64_t q = b; q < e; q++) {
        const T* row = sp + (o * L + order[q]) * inner;
        for (int64_t j = 0; j < inner; j++) acc[j] += Tr<T>::ld(row + j);
      }
      if (bp) {
        const T* brow = bp + it * inner;
        for (int64_t j = 0; j < inner; j++) Tr<T>::st(dst + j, Tr<T>::ld(brow + j) + a * acc[j]);
      } else {
        for (int64_t j = 0; j < inner; j++) Tr<T>::st(dst + j, a * acc[j]);
      }
    }
  }
}

// indexAddRows(out, hasBase, base?, src, index, outer, S, inner, alpha, skip): out (and base)
// [outer, S, inner], src [outer, L, inner], all contiguous and of one dtype; skip = an index
// value that contributes nothing (the embedding padding row), or -1.
MP_ENTRY(IndexAddRowsK) {
  Args a;
  TensorArg out = a.tensor();
  bool has_base = a.i32() != 0;
  TensorArg base;
  if (has_base) base = a.tensor();
  TensorArg src = a.tensor(), index = a.tensor();
  int64_t outer = a.i64(), S = a.i64(), inner = a.i64();
  double alpha = a.num();
  int64_t skip = a.i64();
  IndexView idx = index_view(index);
  int64_t L = index.numel();
  int64_t bad = first_bad(idx, L, S);
  if (bad >= 0) return report_bad(info.Env(), idx, bad);
  if (outer * S * inner == 0) return info.Env().Undefined();
  MP_DISPATCH_ALL(out.dtype, index_add_rows, out, has_base ? &base : nullptr, src, idx, L, outer, S, inner, alpha,
                    skip);
  return info.Env().Undefined();
}

// ---- gather / scatter-add along a dimension ---------------------------------------------------
// The positions of `shape` are split into lines along `dim` (all other coordinates fixed), and
// the lines into tiles of up to kTile neighbours along the innermost other dimension. fn gets a
// tile as the element offsets of its first line in K tensors (which share the coordinates
// through their own strides), the number of lines, and the per-tensor step between lines.
// Walking a tile row by row (for each step along dim, every line of the tile) reads memory
// in order when dim is not the innermost dimension. Distinct lines never share a coordinate
// outside `dim`, which is what makes scatter-add race-free when tiles run in parallel.
constexpr int64_t kTile = 64;

template <int K, typename F>
static void for_each_tile(int nd, const int64_t* shape, int dim, const int64_t* const* strides, int64_t cost_per_line,
                          F fn) {
  int64_t sh[kMaxDims];
  int64_t st[K][kMaxDims];
  int m = 0;
  for (int d = 0; d < nd; d++) {
    if (d == dim) continue;
    sh[m] = shape[d];
    for (int k = 0; k < K; k++) st[k][m] = strides[k][d];
    m++;
  }
  if (m == 0) {  // 1-D: a single line
    sh[0] = 1;
    for (int k = 0; k < K; k++) st[k][0] = 0;
    m = 1;
  }
  int64_t rows = 1;  // lines counted without the innermost other dimension
  for (int d = 0; d < m - 1; d++) rows *= sh[d];
  const int64_t width = sh[m - 1];
  const int64_t blocks = (width + kTile - 1) / kTile;
  if (rows == 0 || width == 0) return;
  int64_t tstep[K];
  for (int k = 0; k < K; k++) tstep[k] = st[k][m - 1];
  parallel_for(rows * blocks, cost_per_line * std::min(width, kTile), [&](int64_t b, int64_t e) {
    int64_t off[K];
    for (int64_t tile = b; tile < e; tile++) {
      const int64_t blk = tile % blocks;
      int64_t rem = tile / blocks;
      for (int k = 0; k < K; k++) off[k] = blk * kTile * st[k][m - 1];
      for (int d = m - 2; d >= 0; d--) {
        const int64_t c = rem % sh[d];
        rem /= sh[d];
        for (int k = 0; k < K; k++) off[k] += c * st[k][d];
      }
      fn(off, std::min(kTile, width - blk * kTile), tstep);
    }
  });
}

template <typename T>
static void gather_run(const TensorArg& out, const TensorArg& x, const TensorArg& index, int dim, IndexView idx) {
  const int64_t R = index.shape[dim];
  const int64_t os = out.strides[dim], xs = x.strides[dim], is = index.strides[dim];
  T* o = out.ptr<T>();
  const T* xp = x.ptr<T>();
  if (R == 0) return;
  if (index.numel() == R) {  // one long line: gather has no write conflicts, so split the line itself
    parallel_for(R, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; r++) o[r * os] = xp[idx[r * is] * xs];
    });
    return;
  }
  const int64_t* st[3] = {out.strides, x.strides, index.strides};
  for_each_tile<3>(index.ndim, index.shape, dim, st, R, [&](const int64_t* off, int64_t n, const int64_t* ts) {
    for (int64_t r = 0; r < R; r++) {
      T* orow = o + off[0] + r * os;
      const T* xrow = xp + off[1];
      const int64_t irow = off[2] + r * is;
      for (int64_t t = 0; t < n; t++) orow[t * ts[0]] = xrow[t * ts[1] + idx[irow + t * ts[2]] * xs];
    }
  });
}

// gatherAlong(out, x, index, dim): out[p] = x[p with p[dim] = index[p]] for every position p of
// index (out has index's shape). x may have any strides; index must be contiguous.
MP_ENTRY(GatherAlongK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor(), index = a.tensor();
  int dim = a.i32();
  IndexView idx = index_view(index);
  int64_t bad = first_bad(idx, index.numel(), x.shape[dim]);
  if (bad >= 0) return report_bad(info.Env(), idx, bad);
  if (index.numel() == 0) return info.Env().Undefined();
  MP_DISPATCH_ALL(x.dtype, gather_run, out, x, index, dim, idx);
  return info.Env().Undefined();
}

template <typename T>
static void scatter_add_run(const TensorArg& out, const TensorArg& src, const TensorArg& index, int dim, IndexView idx,
                            double alpha) {
  using C = typename Tr<T>::C;
  const int64_t R = index.shape[dim];
  if (R == 0) return;
  const int64_t os = out.strides[dim], ss = src.strides[dim], is = index.strides[dim];
  T* o = out.ptr<T>();
  const T* sp = src.ptr<T>();
  const C al = static_cast<C>(alpha);
  const int64_t* st[3] = {out.strides, src.strides, index.strides};
  // Each line is summed in index order by one thread: deterministic for any thread count.
  for_each_tile<3>(index.ndim, index.shape, dim, st, R, [&](const int64_t* off, int64_t n, const int64_t* ts) {
    for (int64_t r = 0; r < R; r++) {
      T* orow = o + off[0];
      const T* srow = sp + off[1] + r * ss;
      const int64_t irow = off[2] + r * is;
      for (int64_t t = 0; t < n; t++) {
        T* d = orow + t * ts[0] + idx[irow + t * ts[2]] * os;
        Tr<T>::st(d, Tr<T>::ld(d) + al * Tr<T>::ld(srow + t * ts[1]));
      }
    }
  });
}

// scatterAddAlong(out, src, index, dim, alpha): out[p with p[dim] = index[p]] += alpha * src[p]
// for every position p of index, in place on out (which the caller filled with the base values).
MP_ENTRY(ScatterAddAlongK) {
  Args a;
  TensorArg out = a.tensor(), src = a.tensor(), index = a.tensor();
  int dim = a.i32();
  double alpha = a.num();
  IndexView idx = index_view(index);
  int64_t bad = first_bad(idx, index.numel(), out.shape[dim]);
  if (bad >= 0) return report_bad(info.Env(), idx, bad);
  if (index.numel() == 0) return info.Env().Undefined();
  MP_DISPATCH_ALL(out.dtype, scatter_add_run, out, src, index, dim, idx, alpha);
  return info.Env().Undefined();
}

// ---- top-k ------------------------------------------------------------------------------------
// Orders (value, position) pairs for top-k. NaN ranks above every number, as in torch; equal
// values keep the lower position first, so the selection among ties is deterministic.
template <typename C>
struct RankLargest {
  bool operator()(const std::pair<C, int64_t>& a, const std::pair<C, int64_t>& b) const {
    bool an = a.first != a.first, bn = b.first != b.first;
    if (an || bn) return an && bn ? a.second < b.second : an;
    if (a.first != b.first) return a.first > b.first;
    return a.second < b.second;
  }
};
template <typename C>
struct RankSmallest {
  bool operator()(const std::pair<C, int64_t>& a, const std::pair<C, int64_t>& b) const {
    bool an = a.first != a.first, bn = b.first != b.first;
    if (an || bn) return an && bn ? a.second < b.second : bn;
    if (a.first != b.first) return a.first < b.first;
    return a.second < b.second;
  }
};

template <typename T>
static void topk_run(const TensorArg& values, const TensorArg& indices, const TensorArg& x, int64_t outer, int64_t R,
                     int64_t inner, int64_t k, bool largest) {
  using C = typename Tr<T>::C;
  const T* xp = x.ptr<T>();
  T* vp = values.ptr<T>();
  int64_t* ip = indices.ptr<int64_t>();
  parallel_for(outer * inner, R * 4, [&](int64_t b, int64_t e) {
    std::vector<std::pair<C, int64_t>> buf(static_cast<size_t>(R));
    for (int64_t j = b; j < e; j++) {
      const int64_t o = j / inner, i = j % inner;
      const T* line = xp + o * R * inner + i;
      for (int64_t r = 0; r < R; r++) buf[r] = {Tr<T>::ld(line + r * inner), r};
      if (largest) std::partial_sort(buf.begin(), buf.begin() + k, buf.end(), RankLargest<C>());
      else std::partial_sort(buf.begin(), buf.begin() + k, buf.end(), RankSmallest<C>());
      for (int64_t q = 0; q < k; q++) {
        const int64_t at = o * k * inner + q * inner + i;
        vp[at] = line[buf[q].second * inner];  // copy the stored value, not a rounded one
        ip[at] = buf[q].second;
      }
    }
  });
}

// topk(values, indices, x, outer, R, inner, k, largest): x contiguous [outer, R, inner];
// values (x's dtype) and indices (int64) contiguous [outer, k, inner], always sorted.
MP_ENTRY(TopkK) {
  Args a;
  TensorArg values = a.tensor(), indices = a.tensor(), x = a.tensor();
  int64_t outer = a.i64(), R = a.i64(), inner = a.i64(), k = a.i64();
  bool largest = a.i32() != 0;
  if (k < 0 || k > R) throw_error("topk: k out of range");
  if (k == 0 || outer * inner == 0) return info.Env().Undefined();
  MP_DISPATCH_ALL(x.dtype, topk_run, values, indices, x, outer, R, inner, k, largest);
  return info.Env().Undefined();
}

// ---- triangular masks ---------------------------------------------------------------------------
template <typename T>
static void triangle_run(const TensorArg& out, const TensorArg& x, int64_t diagonal, bool upper) {
  const int nd = x.ndim;
  const int64_t M = x.shape[nd - 2], N = x.shape[nd - 1];
  const int64_t rs = x.strides[nd - 2], cs = x.strides[nd - 1];
  const int64_t rows = M == 0 || N == 0 ? 0 : x.numel() / N;
  const T* xp = x.ptr<T>();
  T* op = out.ptr<T>();
  parallel_for(rows, N, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; row++) {
      const int64_t i = row % M;
      int64_t rem = row / M, off = i * rs;
      for (int d = nd - 3; d >= 0; d--) {
        off += (rem % x.shape[d]) * x.strides[d];
        rem /= x.shape[d];
      }
      T* o = op + row * N;
      for (int64_t j = 0; j < N; j++) {
        const bool keep = upper ? j - i >= diagonal : j - i <= diagonal;
        o[j] = keep ? xp[off + j * cs] : T{};
      }
    }
  });
}

// triangle(out, x, diagonal, upper): triu (upper) or tril of the last two dims of x (any
// strides) into contiguous out of the same dtype.
MP_ENTRY(TriangleK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  int64_t diagonal = a.i64();
  bool upper = a.i32() != 0;
  if (x.ndim < 2) throw_error("triangle: needs at least 2 dimensions");
  MP_DISPATCH_ALL(x.dtype, triangle_run, out, x, diagonal, upper);
  return info.Env().Undefined();
}

// ---- one-hot ------------------------------------------------------------------------------------
// oneHot(out, index, classes): out int64 [n, classes], zero-filled by the caller; index
// contiguous with n elements.
MP_ENTRY(OneHotK) {
  Args a;
  TensorArg out = a.tensor(), index = a.tensor();
  int64_t classes = a.i64();
  IndexView idx = index_view(index);
  int64_t n = index.numel();
  int64_t bad = first_bad(idx, n, classes);
  if (bad >= 0) return report_bad(info.Env(), idx, bad);
  int64_t* op = out.ptr<int64_t>();
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) op[i * classes + idx[i]] = 1;
  });
  return info.Env().Undefined();
}

void register_index(Napi::Env env, Napi::Object exports) {
  exports.Set("indexSelectRows", Napi::Function::New(env, IndexSelectRowsK));
  exports.Set("indexAddRows", Napi::Function::New(env, IndexAddRowsK));
  exports.Set("gatherAlong", Napi::Function::New(env, GatherAlongK));
  exports.Set("scatterAddAlong", Napi::Function::New(env, ScatterAddAlongK));
  exports.Set("topk", Napi::Function::New(env, TopkK));
  exports.Set("triangle", Napi::Function::New(env, TriangleK));
  exports.Set("oneHot", Napi::Function::New(env, OneHotK));
}

}  // namespace mp
