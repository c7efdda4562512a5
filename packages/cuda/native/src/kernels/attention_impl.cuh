// The fused attention kernels and their launches (see attention.cu for the algorithms), shared by
// the translation units that instantiate them: attention.cu (the CUDA-core kernels, the delta and
// dispatch) and attention_mma_*.cu (the tensor-core kernels of a few head-dim pairs each), so that
// nvcc compiles the tensor-core instantiations in parallel rather than in one file of minutes.
// Everything lives in mpc::att with external linkage: templates, and non-template functions
// declared inline (one definition across the units).
#pragma once

#include "attention.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "mma.cuh"

namespace mpc {

namespace att {

// loops over compile-time register tiles (nvcc unrolls them; the host compiler of the emulator
// does not know the pragma)
#ifdef __CUDACC__
#define ATT_UNROLL _Pragma("unroll")
#else
#define ATT_UNROLL
#endif

constexpr int kAttThreads = 128;
constexpr int kTX = 8;   // lanes per row group
constexpr int kTY = 16;  // row groups per block
constexpr size_t kMaxSmem = 227 * 1024;
constexpr size_t kDefaultSmem = 48 * 1024;

MP_D float att_exp(float x) { return expf(x); }
MP_D double att_exp(double x) { return exp(x); }
MP_D float att_log(float x) { return logf(x); }
MP_D double att_log(double x) { return log(x); }
// The tensor-core kernels' softmax runs in log2 units, FlashAttention's way: scores scaled by
// scale * log2(e) in one multiply and exponentiated in base 2 (one MUFU.EX2 on a GPU, where expf
// needs a range reduction around it); the saved logsumexp stays in natural units.
constexpr double kLog2e = 1.4426950408889634;
constexpr float kLn2f = 0.6931471805599453f;
// exp2 as the one instruction PTX's ex2.approx.ftz.f32 is (what FlashAttention's fast-math build
// issues). exp2f wraps the same MUFU.EX2 in a compare and two multiplies, only to return subnormal
// results for x < -126; those flush to zero here, which changes no probability a softmax can see
// (p < 2^-126 beside the row maximum's 1) and takes three of the four instructions an element off
// the kernels' issue-bound loops. The emulator flushes the same.
MP_D float att_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return x < -126.0f ? 0.0f : exp2f(x);
#endif
}

// A [B, H, S, X] (or [B, H, S] for lse) operand: element 0 and element strides.
struct Mat {
  char* p;
  int64_t s[4];
};
struct MaskDesc {
  const char* p;  // null: no mask
  int dtype;
  int64_t s[4];
};
struct CuDesc {
  const char* p;  // null: no packed rows
  int is64;
  int64_t stride;
  int64_t n;  // entries (nseq + 1)
};

struct Params {
  int64_t B, Hq, Hkv, Sq, Sk, group;
  int D, Dv;
  int causal;
  double scale;
  int64_t ntiles;  // tiles along the block's own sequence dimension
  Mat q, k, v, o, go, dq, dk, dv, lse;
  MaskDesc mask;
  CuDesc cu;
  void* delta;  // backward: [B * Hq * Sq] of the compute type
  void* dqacc;  // fused tensor-core backward: float32 [B, Hq, Sq, D], the sums of dS K
  int vec;      // tensor-core path: bit 0 q, 1 k, 2 v, 3 gradOut rows are 16-byte aligned and contiguous
};

template <typename T> MP_D T* mat_ptr(const Mat& m, int64_t b, int64_t h) {
  return reinterpret_cast<T*>(m.p) + b * m.s[0] + h * m.s[1];
}

MP_D int64_t cu_at(const CuDesc& c, int64_t s) {
  return c.is64 ? reinterpret_cast<const int64_t*>(c.p)[s * c.stride]
                : static_cast<int64_t>(reinterpret_cast<const int32_t*>(c.p)[s * c.stride]);
}

// The packed sequence of token t (cu[s] <= t < cu[s + 1], from cu[0] = 0 <= t < cu[n - 1] = S).
MP_D void seq_of(const CuDesc& cu, int64_t t, int64_t& lo, int64_t& hi) {
  int64_t l = 0, r = cu.n - 1;
  while (r - l > 1) {
    const int64_t m = (l + r) >> 1;
    if (cu_at(cu, m) <= t) l = m;
    else r = m;
  }
  lo = cu_at(cu, l);
  hi = cu_at(cu, l + 1);
}

// Keys row i may attend to before the explicit mask: [lo, hi) (empty for rows past Sq).
MP_D void row_range(const Params& P, int64_t i, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = P.Sk;
  if (i < 0 || i >= P.Sq) {
    hi = 0;
    return;
  }
  if (P.cu.p) {
    seq_of(P.cu, i, lo, hi);
    lo = mx(lo, int64_t(0));
    hi = mn(hi, P.Sk);
  }
  if (P.causal) hi = mn(hi, i + 1);
}

// The score of (b, h, i, j) with the explicit mask applied: bool false gives -inf, floating
// values are added (after conversion to the compute type, as the CPU kernel does).
// `unit` multiplies a floating mask value first (log2(e) for scores in log2 units; 1 is exact).
template <typename C>
MP_D C apply_mask(const MaskDesc& m, int64_t b, int64_t h, int64_t i, int64_t j, C s, C unit = C(1)) {
  const int64_t off = b * m.s[0] + h * m.s[1] + i * m.s[2] + j * m.s[3];
  switch (m.dtype) {
    case static_cast<int>(DType::Bool):
      return reinterpret_cast<const uint8_t*>(m.p)[off] ? s : static_cast<C>(-INFINITY);
    case static_cast<int>(DType::F32):
      return s + static_cast<C>(reinterpret_cast<const float*>(m.p)[off]) * unit;
    case static_cast<int>(DType::F64):
      return s + static_cast<C>(reinterpret_cast<const double*>(m.p)[off]) * unit;
    case static_cast<int>(DType::BF16):
      return s + static_cast<C>(bf16_to_f32(reinterpret_cast<const uint16_t*>(m.p)[off])) * unit;
    case static_cast<int>(DType::F16):
      return s + static_cast<C>(f16_to_f32(reinterpret_cast<const uint16_t*>(m.p)[off])) * unit;
    default:
      return s;
  }
}

// dst[r * ld + c] = src row r0 + r, column c0 + c (zeros for rows at or past `total`), for
// r < rows, c < cols, by the whole block.
template <typename T, typename C>
MP_D void load_tile(C* dst, int ld, const T* base, int64_t rs, int64_t cs, int64_t r0, int rows, int64_t total,
                    int c0, int cols) {
  const int n = rows * cols;
  for (int idx = threadIdx.x; idx < n; idx += kAttThreads) {
    const int r = idx / cols, c = idx - r * cols;
    const int64_t row = r0 + r;
    dst[r * ld + c] = row < total ? static_cast<C>(Tr<T>::ld(base + row * rs + static_cast<int64_t>(c0 + c) * cs))
                                  : C(0);
  }
}

// s[r][c] = sum_{d < n} A[(ty * RM + r) * lda + d] * Bm[(tx + 8 c) * ldb + d]
// (mma.sync / wgmma would replace this loop.)
template <typename C, int RM, int CN>
MP_D void dot_tile(C (&s)[RM][CN], const C* A, int lda, const C* Bm, int ldb, int n, int ty, int tx) {
ATT_UNROLL
  for (int r = 0; r < RM; r++)
ATT_UNROLL
    for (int c = 0; c < CN; c++) s[r][c] = C(0);
  const C* a0 = A + ty * RM * lda;
  const C* b0 = Bm + tx * ldb;
  for (int d = 0; d < n; d++) {
    C a[RM], bv[CN];
ATT_UNROLL
    for (int r = 0; r < RM; r++) a[r] = a0[r * lda + d];
ATT_UNROLL
    for (int c = 0; c < CN; c++) bv[c] = b0[c * kTX * ldb + d];
ATT_UNROLL
    for (int r = 0; r < RM; r++)
ATT_UNROLL
      for (int c = 0; c < CN; c++) s[r][c] += a[r] * bv[c];
  }
}

// acc[r][k] += sum_{j < n} Pm[(ty * RM + r) * ldp + j] * M[j * ldm + col0 + tx + 8 k], for the
// columns tx + 8 k < ncols (the others read a valid column and are never stored).
template <typename C, int RM, int WC>
MP_D void acc_tile(C (&acc)[RM][WC], const C* Pm, int ldp, const C* M, int ldm, int n, int ty, int tx, int col0,
                   int ncols) {
  const C* p0 = Pm + ty * RM * ldp;
  const C* m0 = M + col0;
  for (int j = 0; j < n; j++) {
    C p[RM];
ATT_UNROLL
    for (int r = 0; r < RM; r++) p[r] = p0[r * ldp + j];
    const C* mr = m0 + j * ldm;
ATT_UNROLL
    for (int k = 0; k < WC; k++) {
      const C mv = mr[mn(tx + kTX * k, ncols - 1)];
ATT_UNROLL
      for (int r = 0; r < RM; r++) acc[r][k] += p[r] * mv;
    }
  }
}

// max / sum over the 8 lanes of a row group (the same bits on every lane)
template <typename C> MP_D C group_max(C v) {
ATT_UNROLL
  for (int off = kTX / 2; off > 0; off >>= 1) {
    const C o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}
template <typename C> MP_D C group_sum(C v) {
ATT_UNROLL
  for (int off = kTX / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---- forward ---------------------------------------------------------------------------------
// Block: (b, h, query tile) from blockIdx.x, output columns [blockIdx.z * W, + W) of Dv.
// Shared: Q [BR][D+1], K [BC][D+1], V [BC][wv+1] (the chunk's columns), P [BR][BC+1].
template <typename T, int RM, int CN, int W>
__global__ void __launch_bounds__(kAttThreads) attn_fwd_kernel(Params P) {
  using C = typename Tr<T>::C;
  constexpr int BR = kTY * RM, BC = kTX * CN, WC = W / kTX;
  MP_DYNAMIC_SMEM(C, sm);
  const int D = P.D;
  const int ldq = D + 1;
  const int col0 = static_cast<int>(blockIdx.z) * W;
  const int wv = mn(W, P.Dv - col0);
  const int ldv = wv + 1;
  C* Qs = sm;
  C* Ks = Qs + BR * ldq;
  C* Vs = Ks + BC * ldq;
  C* Ps = Vs + BC * ldv;
  const int tid = threadIdx.x, tx = tid % kTX, ty = tid / kTX;
  const int64_t x = blockIdx.x, nbh = P.B * P.Hq;
  const int64_t qt = P.ntiles - 1 - x / nbh, bh = x % nbh;  // longest first (see "Block order")
  const int64_t h = bh % P.Hq, b = bh / P.Hq, kh = h / P.group;
  const int64_t i0 = qt * BR;
  const C scale = static_cast<C>(P.scale);
  const C ninf = static_cast<C>(-INFINITY);

  load_tile<T, C>(Qs, ldq, mat_ptr<const T>(P.q, b, h), P.q.s[2], P.q.s[3], i0, BR, P.Sq, 0, D);
  const T* kb = mat_ptr<const T>(P.k, b, kh);
  const T* vb = mat_ptr<const T>(P.v, b, kh);

  int64_t lo[RM], hi[RM];
  C m[RM], l[RM], acc[RM][WC];
ATT_UNROLL
  for (int r = 0; r < RM; r++) {
    row_range(P, i0 + ty * RM + r, lo[r], hi[r]);
    m[r] = ninf;
    l[r] = C(0);
ATT_UNROLL
    for (int k = 0; k < WC; k++) acc[r][k] = C(0);
  }
  // lo and hi are non-decreasing in the row: the block's keys lie in [lo(first), hi(last))
  int64_t blo, bhi, unused;
  row_range(P, i0, blo, unused);
  row_range(P, mn(i0 + BR, P.Sq) - 1, unused, bhi);

  for (int64_t j0 = blo; j0 < bhi; j0 += BC) {
    __syncthreads();  // the previous tile's readers are done
    load_tile<T, C>(Ks, ldq, kb, P.k.s[2], P.k.s[3], j0, BC, P.Sk, 0, D);
    load_tile<T, C>(Vs, ldv, vb, P.v.s[2], P.v.s[3], j0, BC, P.Sk, col0, wv);
    __syncthreads();
    C s[RM][CN];
    dot_tile<C, RM, CN>(s, Qs, ldq, Ks, ldq, D, ty, tx);
ATT_UNROLL
    for (int r = 0; r < RM; r++) {
      const int64_t i = i0 + ty * RM + r;
      C rmax = ninf;
ATT_UNROLL
      for (int c = 0; c < CN; c++) {
        const int64_t j = j0 + tx + kTX * c;
        C v = ninf;
        if (j >= lo[r] && j < hi[r]) {
          v = s[r][c] * scale;
          if (P.mask.p) v = apply_mask<C>(P.mask, b, h, i, j, v);
        }
        s[r][c] = v;
        rmax = v > rmax ? v : rmax;
      }
      rmax = group_max(rmax);
      // a row whose scores in this tile are all -inf takes nothing from it
      const bool live = rmax != ninf;
      const C mnew = live ? (m[r] > rmax ? m[r] : rmax) : m[r];
      C sum = C(0);
ATT_UNROLL
      for (int c = 0; c < CN; c++) {
        const C p = live ? att_exp(s[r][c] - mnew) : C(0);
        s[r][c] = p;
        sum += p;
      }
      sum = group_sum(sum);
      if (live) {
        if (m[r] != ninf && m[r] != mnew) {
          const C corr = att_exp(m[r] - mnew);
          l[r] *= corr;
ATT_UNROLL
          for (int k = 0; k < WC; k++) acc[r][k] *= corr;
        }
        l[r] += sum;
        m[r] = mnew;
      }
ATT_UNROLL
      for (int c = 0; c < CN; c++) Ps[(ty * RM + r) * (BC + 1) + tx + kTX * c] = s[r][c];
    }
    __syncthreads();
    acc_tile<C, RM, WC>(acc, Ps, BC + 1, Vs, ldv, BC, ty, tx, 0, wv);
  }

  T* ob = mat_ptr<T>(P.o, b, h);
  C* lb = reinterpret_cast<C*>(P.lse.p) + b * P.lse.s[0] + h * P.lse.s[1];
ATT_UNROLL
  for (int r = 0; r < RM; r++) {
    const int64_t i = i0 + ty * RM + r;
    if (i >= P.Sq) continue;
    // a row with nothing to attend to gives zeros and lse = -inf (backward: no gradient)
    const C inv = l[r] > C(0) ? C(1) / l[r] : C(0);
    T* orow = ob + i * P.o.s[2];
ATT_UNROLL
    for (int k = 0; k < WC; k++) {
      const int c = tx + kTX * k;
      if (c < wv) Tr<T>::st(orow + static_cast<int64_t>(col0 + c) * P.o.s[3], acc[r][k] * inv);
    }
    if (blockIdx.z == 0 && tx == 0) lb[i * P.lse.s[2]] = l[r] > C(0) ? m[r] + att_log(l[r]) : ninf;
  }
}

// ---- tensor-core forward (bf16 / f16 inputs, D and Dv in {64, 128}, or MLA's 192 / 128) ------
// FlashAttention-2 on mma.sync m16n8k16 (mma.cuh). Block: 4 warps, (b, h, tile of 64 query rows)
// from blockIdx.x; warp w owns query rows 16 w .. 16 w + 15 of the tile. Shared memory holds Q
// [64][D], K [64][D] and V [64][Dv] in the storage dtype (rows padded by 8 elements = 16 bytes, so
// the 8 row addresses of an ldmatrix fall in distinct bank groups). Per key tile of 64:
//   S = Q K^T: A = Q fragments (ldmatrix_x4, kept in registers for the whole kernel), B = K rows
//     (ldmatrix_x4: two 8-key n-tiles x 16 d per call), fp32 accumulators s[8][4]: lane (g, t)
//     holds rows g and g + 8, keys 8 n + 2 t + {0, 1};
//   scale, mask and online softmax in fp32 on those accumulators; each row's 8 columns of an
//     n-tile live in the 4 lanes of a group, so row max / sum take two xor shuffles;
//   O += P V: P rounded to the storage dtype in registers (the accumulators of n-tiles 2 s, 2 s + 1
//     are the A fragment of k-step s), B = V rows (ldmatrix_x4_trans: 16 keys x two 8-column
//     n-tiles per call), fp32 accumulators o[Dv / 8][4].
// The results match the CUDA-core kernel's up to the rounding of P to 16 bits in P V (the row sums
// l use the fp32 P, as FlashAttention-2 does) and the summation order of the dot products.
constexpr int kMmaWarps = kAttThreads / 32;
constexpr int kMmaBR = 16 * kMmaWarps;  // query rows per block
constexpr int kMmaBC = 64;              // keys per tile
constexpr int kMmaPad = 8;              // elements of padding per shared row

// 16 bytes from global memory (aligned)
MP_D void copy16(uint16_t* dst, const void* src) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}
MP_D void zero16(uint16_t* dst) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  std::memset(dst, 0, 16);
#else
  *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
#endif
}

// dst[r * (W + pad) + c] = the 16-bit bits of src row r0 + r, column c (zeros for rows at or past
// `total`), r < rows, c < W, by the whole block (NT threads); `vec`: rows are 16-byte aligned and
// contiguous.
template <typename T, int W, int NT = kAttThreads>
MP_D void load_tile16(uint16_t* dst, const T* base, int64_t rs, int64_t cs, int64_t r0, int rows, int64_t total,
                      bool vec) {
  constexpr int ld = W + kMmaPad;
  if (vec) {
    constexpr int chunks = W / 8;
    for (int idx = threadIdx.x; idx < rows * chunks; idx += NT) {
      const int r = idx / chunks, c = (idx - r * chunks) * 8;
      const int64_t row = r0 + r;
      if (row < total) copy16(dst + r * ld + c, base + row * rs + c);
      else zero16(dst + r * ld + c);
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * W; idx += NT) {
      const int r = idx / W, c = idx - r * W;
      const int64_t row = r0 + r;
      dst[r * ld + c] = row < total ? base[row * rs + c * cs].bits : uint16_t(0);
    }
  }
}

// The same as load_tile16 for ROWS rows that are 16-byte aligned and contiguous, through cp.async:
// the caller commits the group and waits for it (mma.cuh); rows at or past `total` are zeroed by
// plain stores (visible after the barrier that follows the wait). 16-byte chunk idx of the tile is
// row idx / (W / 8), columns 8 (idx % (W / 8)); thread tid copies chunks tid, tid + NT, ... Where
// NT is a multiple of the chunks a row (and the tile of the threads), a thread's chunks share their
// columns and lie RSTEP rows apart: the addresses are worked out once a call and each chunk is an
// add and a copy (the tile loops of the kernels below were issue-bound on this address arithmetic:
// ~130 instructions for every four chunks in the sm_90 code), with the row checks only in a tile
// that crosses `total`. Rows the threads do not divide go in column groups of 64 elements.
template <typename T, int W, int ROWS, int NT = kAttThreads>
MP_D void load_tile16_async(uint16_t* dst, const T* base, int64_t rs, int64_t r0, int64_t total) {
  constexpr int ld = W + kMmaPad, chunks = W / 8;
  // column groups of G elements: the whole row where the threads divide it, else 64 columns (MLA's
  // 192 on 128 threads: three groups of 8 chunks)
  constexpr bool rowwise = NT % chunks == 0 && (ROWS * chunks) % NT == 0;
  constexpr int G = rowwise ? W : 64, gchunks = G / 8;
  if constexpr (W % G == 0 && NT % gchunks == 0 && (ROWS * gchunks) % NT == 0) {
    constexpr int RSTEP = NT / gchunks, K = ROWS * gchunks / NT;
    const int tid = threadIdx.x, rt = tid / gchunks, c = (tid % gchunks) * 8;
    uint16_t* d = dst + rt * ld + c;
    const T* src = base + (r0 + rt) * rs + c;
    const int64_t step = RSTEP * rs;
    if (r0 + ROWS <= total) {
ATT_UNROLL
      for (int gi = 0; gi < W / G; gi++)
ATT_UNROLL
        for (int k = 0; k < K; k++) cp_async16(d + k * RSTEP * ld + gi * G, src + k * step + gi * G);
    } else {
ATT_UNROLL
      for (int gi = 0; gi < W / G; gi++)
ATT_UNROLL
        for (int k = 0; k < K; k++) {
          if (r0 + rt + k * RSTEP < total) cp_async16(d + k * RSTEP * ld + gi * G, src + k * step + gi * G);
          else zero16(d + k * RSTEP * ld + gi * G);
        }
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * chunks; idx += NT) {
      const int r = idx / chunks, c = (idx - r * chunks) * 8;
      const int64_t row = r0 + r;
      if (row < total) cp_async16(dst + r * ld + c, base + row * rs + c);
      else zero16(dst + r * ld + c);
    }
  }
}

// Rows r0 .. r0 + ROWS - 1 (ROWS a multiple of 8) of a [*, W] operand with 16-byte aligned,
// contiguous rows, through cp.async, into wgmma's core-matrix layout without swizzling (mma.cuh):
// element (r, c) at ((r / 8) (W / 8) + c / 8) 64 + (r % 8) 8 + c % 8. 16-byte chunk idx is row
// 8 (idx / W) + idx % 8, columns 8 ((idx / 8) % (W / 8)) and lands at element 8 idx, so the
// threads of a warp fill consecutive shared memory. Rows at or past `total` are zeroed. NT: the
// threads copying (threadIdx.x < NT). Where NT is a multiple of W, a thread's chunks (tid, tid +
// NT, ...) share their columns and lie 8 NT / W rows apart: addresses worked out once, as in
// load_tile16_async.
template <typename T, int W, int ROWS, int NT = kAttThreads>
MP_D void load_tile_cm_async(uint16_t* dst, const T* base, int64_t rs, int64_t r0, int64_t total) {
  constexpr int chunks = W / 8;
  if constexpr (NT % W == 0 && (ROWS * chunks) % NT == 0) {
    constexpr int RSTEP = 8 * NT / W, K = ROWS * chunks / NT;
    const int tid = threadIdx.x, rt = (tid / W) * 8 + (tid & 7), c = ((tid >> 3) % chunks) * 8;
    uint16_t* d = dst + 8 * tid;
    const T* src = base + (r0 + rt) * rs + c;
    const int64_t step = RSTEP * rs;
    if (r0 + ROWS <= total) {
ATT_UNROLL
      for (int k = 0; k < K; k++) cp_async16(d + 8 * NT * k, src + k * step);
    } else {
ATT_UNROLL
      for (int k = 0; k < K; k++) {
        if (r0 + rt + k * RSTEP < total) cp_async16(d + 8 * NT * k, src + k * step);
        else zero16(d + 8 * NT * k);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * chunks; idx += NT) {
      const int r = (idx / W) * 8 + (idx & 7), c = ((idx >> 3) % chunks) * 8;
      const int64_t row = r0 + r;
      if (row < total) cp_async16(dst + 8 * idx, base + row * rs + c);
      else zero16(dst + 8 * idx);
    }
  }
}

// acc (+)= A B over KS k-steps of 16 on wgmma (issued, not committed): A's fragments a[ks], B a
// tile in core matrices of rows of W elements (load_tile_cm_async). KMAJOR: k runs along the
// tile's columns and n along its rows (LBO: the next 8 columns, 128 bytes; SBO: the next 8 rows,
// 16 W bytes), as K rows are for Q K^T; otherwise k runs along the rows and n along the columns
// (MN-major: LBO 16 W, SBO 128), as V rows are for P V. `overwrite`: the first step drops acc.
template <typename T, int N, bool KMAJOR, int W, int KS>
MP_D void wgmma_tile(float (&acc)[N / 8][4], const uint32_t (&a)[KS][4], const uint16_t* tile, bool overwrite) {
  // k-step ks's B starts 128 ks (K-major) or 16 W ks (MN-major) elements on: its descriptor is the
  // first one's with that many bytes / 16 added to the start address field (which cannot carry
  // out: every shared address / 16 is below 2^14), one add instead of a descriptor a step
  const uint64_t d0 = KMAJOR ? wgmma_desc(tile, 128, 16 * W) : wgmma_desc(tile, 16 * W, 128);
  constexpr uint64_t step = KMAJOR ? 128 * 2 / 16 : 16 * W * 2 / 16;
ATT_UNROLL
  for (int ks = 0; ks < KS; ks++) {
    const int scale = ks > 0 || !overwrite ? 1 : 0;
    wgmma_rs<T, N, !KMAJOR>(acc, a[ks], d0 + step * static_cast<uint64_t>(ks), scale);
  }
}

// Named barriers of the warp-specialised forward (ids 1 .. 10; 0 is __syncthreads'): full and
// empty of stage st and consumer c at kWsFull / kWsEmpty + 2 st + c, the consumers' turns at
// kWsTurn + c.
constexpr int kWsFull = 1, kWsEmpty = 5, kWsTurn = 9;
// The loader's side of stage st for its tile tt: before filling it, wait until both consumers gave
// it back (from the third tile on); once filled (this thread's cp.async copies issued), wait for
// the copies, make them visible to wgmma and hand the stage to both consumers.
MP_D void ws_stage_wait_empty(int st, int64_t tt) {
  if (tt < 2) return;
  bar_sync(kWsEmpty + 2 * st, 2 * kAttThreads);
  bar_sync(kWsEmpty + 2 * st + 1, 2 * kAttThreads);
}
MP_D void ws_stage_filled(int st) {
  cp_async_wait<0>();
  fence_proxy_async();  // this thread's copies, for the consumers' wgmma
  bar_arrive(kWsFull + 2 * st, 2 * kAttThreads);
  bar_arrive(kWsFull + 2 * st + 1, 2 * kAttThreads);
}
// setmaxnreg (sm_90a): a warpgroup gives registers back to the block's pool / takes them from it
// (multiples of 8 in 24 .. 256; the same for the warpgroup's every thread). The emulator checks the
// counts and that the warpgroups' sum fits the block (emu::setmaxnreg); elsewhere nothing.
template <int N> MP_D void setmaxnreg_dec() {
#if defined(MPC_WGMMA_PTX)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  ::emu::setmaxnreg(N, false, __FILE__, __LINE__);
#endif
}
template <int N> MP_D void setmaxnreg_inc() {
#if defined(MPC_WGMMA_PTX)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  ::emu::setmaxnreg(N, true, __FILE__, __LINE__);
#endif
}

// PIPE (K and V rows 16-byte aligned and contiguous): two K/V buffers; the next tile's cp.async
// copies are in flight while the current tile is multiplied. Otherwise one buffer, loaded through
// registers between the barriers.
// RM: 16-row m-tiles per warp. RM = 1: 64 query rows a block, Q fragments kept in registers for
// the whole kernel. RM = 2: 128 rows (FlashAttention-2's forward tile), each K and V fragment read
// from shared memory serves both m-tiles (half the shared-memory reads per product), and Q's
// fragments are read from shared memory per key tile instead (registers: o and s double; with
// Dv = 128 the key tile shrinks to 32, as nvcc spills registers at 64 there: fwd_mma_bc).
// v[i] = max(v[i], v[i + W]) for i < W, then the same with W / 2 .. 1: v[0] is the maximum of
// v[0 .. 2 W) (fmaxf is exact, so any order gives the sequential maximum's value).
template <int W>
MP_D void max_fold(float (&v)[2 * W]) {
  float h[W];
ATT_UNROLL
  for (int i = 0; i < W; i++) h[i] = fmaxf(v[i], v[i + W]);
  if constexpr (W > 1) {
    max_fold<W / 2>(h);
  }
  v[0] = h[0];
}
// The maximum of half-row hf (elements 2 hf, 2 hf + 1 of each n-tile) of a lane's NS score n-tiles,
// as a tree: log2(2 NS) dependent steps instead of 2 NS.
template <int NS>
MP_D float row_max_tree(const float (&s)[NS][4], int hf) {
  float v[2 * NS];
ATT_UNROLL
  for (int n = 0; n < NS; n++) {
    v[2 * n] = s[n][2 * hf];
    v[2 * n + 1] = s[n][2 * hf + 1];
  }
  max_fold<NS>(v);
  return v[0];
}
template <int RM, int DV> constexpr int fwd_mma_bc() { return RM == 2 && DV >= 128 ? 32 : kMmaBC; }
// MINB: the blocks per SM asked of ptxas (__launch_bounds__), which caps registers per thread (see
// attention_occupancy below); 0 asks nothing (ptxas's own choice: an explicit 1 lets it take up to
// 255 registers, which it does here, 165 instead of 129 for D 64).
// WG (64 or 128; sm_90a, MEGAPATCH_ATTENTION_WGMMA): the two tile products on wgmma instead of
// mma.sync (Hopper's warpgroup MMA, mma.cuh), with WG keys a tile. The block's 4 warps are one
// warpgroup and its 64 query rows the wgmma's M; S = Q K^T takes Q's A fragments from registers
// (as before) and K from shared memory in core matrices (K-major B), O += P V takes P from
// registers and V from shared memory (MN-major B): no ldmatrix of K or V, and each warp's share of
// a product is one instruction per k-step instead of NS or NO. The scores and the output land in
// the same registers as mma.sync's (the layouts agree), so the softmax is the same code; with 64
// keys a tile the arithmetic is the same too (the emulator gives the same bits).
// OVL (with WG): FlashAttention-3's intra-warpgroup overlap: the next tile's Q K^T is issued
// before this tile's P V, and its softmax runs while P V is on the tensor cores (the loop below).
// NWG (with WG): warpgroups a block, each with its 64 query rows (warp w: rows 16 w .. 16 w + 15),
// all multiplying the same K/V tiles: NWG = 2 is FlashAttention-3's 128-row block, each tile
// loaded once for 128 queries (half the shared-memory fills and L2 reads of K and V a query).
// WS (with WG 64, OVL, NWG 2; MEGAPATCH_ATTENTION_WGMMA_WS=1): FlashAttention-3's warp
// specialisation: a third warpgroup (the first, warps 0-3) only loads K/V tiles, the two others
// (warps 4-11: rows 16 (w - 4) ..) only multiply, with no block-wide barrier in the loop: named
// barriers pass each of the two K/V stages from the loader to each consumer (full) and back
// (empty), and a third pair makes the consumers take turns issuing their products (ping-pong: one
// warpgroup's softmax runs while the other's products are on the tensor cores). The loader gives
// up registers to the consumers (setmaxnreg: 40 and 232 a thread).
// BCK (mma.sync, D + Dv <= 128; MEGAPATCH_ATTENTION_FWD_KEYS=128): keys a tile instead of
// fwd_mma_bc's 64, as FlashAttention-2 takes for head dim 64: the per-tile work (rescaling o, the
// row maxima's and sums' shuffles, the barriers, the next tile's copies) spread over twice the
// products (sm_90a machine code, bf16 D 64, fast paths: 638 instructions for 128 mma.sync against
// 380 for 64), at 175 registers and 81 KiB of shared memory a block (2 blocks an SM, against 4).
template <typename T, int D, int DV, bool PIPE, int RM = 1, int MINB = 0, int WG = 0, bool OVL = false, int NWG = 1,
          bool WS = false, int BCK = 0>
__global__ void __launch_bounds__(kAttThreads*(NWG + (WS ? 1 : 0)), MINB) attn_fwd_mma_kernel(Params P) {
  static_assert(WG == 0 || ((WG == 64 || WG == 128) && RM == 1 && PIPE), "wgmma forward: 64 rows, cp.async");
  static_assert(!OVL || WG != 0, "the overlapped order is wgmma's");
  static_assert(NWG == 1 || (WG != 0 && NWG == 2), "two warpgroups a block: wgmma's");
  static_assert(!WS || (WG == 64 && OVL && NWG == 2), "warp-specialised: two consumers of 64-key tiles, overlapped");
  static_assert(BCK == 0 || (WG == 0 && RM == 1 && PIPE && BCK % 64 == 0), "BCK: mma.sync, 64 rows, cp.async");
  constexpr int NT = kAttThreads * (NWG + (WS ? 1 : 0));  // threads a block
  constexpr int LT = WS ? kAttThreads : NT;                // threads that load K/V tiles
  constexpr int BR = kMmaBR * RM * NWG, BC = WG ? WG : BCK ? BCK : fwd_mma_bc<RM, DV>();
  constexpr int LDQ = D + kMmaPad, LDV = DV + kMmaPad;
  constexpr int KD = D / 16, NS = BC / 8, NO = DV / 8, NBUF = PIPE ? 2 : 1;
  constexpr int KT = WG ? BC * D : BC * LDQ, VT = WG ? BC * DV : BC * LDV;  // elements a K / V tile
  constexpr bool QREG = RM == 1;
  MP_DYNAMIC_SMEM(uint16_t, sm);
  uint16_t* Qs = sm;
  uint16_t* Ks0 = Qs + BR * LDQ;  // NBUF tiles [BC][LDQ] (wgmma: core matrices of [BC][D])
  uint16_t* Vs0 = Ks0 + NBUF * KT;  // NBUF tiles [BC][LDV] (wgmma: core matrices of [BC][DV])
  const int tid = threadIdx.x, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int warp = WS ? tid / 32 - 4 : tid / 32;  // the warp's rows 16 warp .. (WS: the loader's < 0)
  const int64_t x = blockIdx.x, nbh = P.B * P.Hq;
  const int64_t qt = P.ntiles - 1 - x / nbh, bh = x % nbh;  // longest first (see "Block order")
  const int64_t h = bh % P.Hq, b = bh / P.Hq, kh = h / P.group;
  const int64_t i0 = qt * BR;
  const float scale2 = static_cast<float>(P.scale * kLog2e);  // scores in log2 units
  const float log2e = static_cast<float>(kLog2e);
  const float ninf = -INFINITY;

  load_tile16<T, D, NT>(Qs, mat_ptr<const T>(P.q, b, h), P.q.s[2], P.q.s[3], i0, BR, P.Sq, P.vec & 1);
  const T* kb = mat_ptr<const T>(P.k, b, kh);
  const T* vb = mat_ptr<const T>(P.v, b, kh);

  // this lane's rows: i0 + 16 (RM warp + r) + g + 8 hf, hf = 0, 1
  int64_t lo[RM][2], hi[RM][2];
  float m[RM][2], l[RM][2], o[RM][NO][4];
ATT_UNROLL
  for (int r = 0; r < RM; r++) {
ATT_UNROLL
    for (int hf = 0; hf < 2; hf++) {
      row_range(P, i0 + 16 * (RM * (WS && warp < 0 ? 0 : warp) + r) + g + 8 * hf, lo[r][hf], hi[r][hf]);
      m[r][hf] = ninf;
      l[r][hf] = 0.0f;
    }
ATT_UNROLL
    for (int n = 0; n < NO; n++)
ATT_UNROLL
      for (int e = 0; e < 4; e++) o[r][n][e] = 0.0f;
  }
  int64_t blo, bhi, unused;
  row_range(P, i0, blo, unused);
  row_range(P, mn(i0 + BR, P.Sq) - 1, unused, bhi);

  // K/V tile starting at key jt into buffer `buf`, as one cp.async group
  auto prefetch = [&](int64_t jt, int buf) {
    if constexpr (WG != 0) {
      load_tile_cm_async<T, D, BC, LT>(Ks0 + buf * KT, kb, P.k.s[2], jt, P.Sk);
      load_tile_cm_async<T, DV, BC, LT>(Vs0 + buf * VT, vb, P.v.s[2], jt, P.Sk);
    } else {
      load_tile16_async<T, D, BC, LT>(Ks0 + buf * KT, kb, P.k.s[2], jt, P.Sk);
      load_tile16_async<T, DV, BC, LT>(Vs0 + buf * VT, vb, P.v.s[2], jt, P.Sk);
    }
    cp_async_commit();
  };
  if (!WS && PIPE && blo < bhi) prefetch(blo, 0);
  __syncthreads();  // Q is in place (WS: the last block-wide barrier)
  // Q's A fragments of m-tile r, k-step kk (from shared memory: Qs is never overwritten)
  auto q_frag = [&](uint32_t (&f)[4], int r, int kk) {
    ldmatrix_x4(f, Qs + (16 * (RM * warp + r) + (lane & 15)) * LDQ + kk * 16 + (lane >> 4) * 8);
  };
  if constexpr (WS) {
    if (tid < kAttThreads) {
      // the loader: tile t into stage t % 2 once both consumers released the tile before it there
      setmaxnreg_dec<40>();
      int st = 0;
      for (int64_t j0 = blo, tt = 0; j0 < bhi; j0 += BC, tt++, st ^= 1) {
        ws_stage_wait_empty(st, tt);
        prefetch(j0, st);
        ws_stage_filled(st);
      }
      return;
    }
    setmaxnreg_inc<232>();
  }
  uint32_t qf[QREG ? KD : 1][4];
  if constexpr (QREG) {
ATT_UNROLL
    for (int kk = 0; kk < KD; kk++) q_frag(qf[kk], 0, kk);
  }

  // The tile products and the online softmax, shared by the loops below. Scores s of the tile
  // whose keys start at j0; the products of the wgmma forms are issued, not waited for.
  auto scores_mma = [&](float (&s)[RM][NS][4], const uint16_t* Ks) {
ATT_UNROLL
    for (int r = 0; r < RM; r++)
ATT_UNROLL
      for (int n = 0; n < NS; n++)
ATT_UNROLL
        for (int e = 0; e < 4; e++) s[r][n][e] = 0.0f;
    // S = Q K^T: per call two n-tiles (keys 16 p .. 16 p + 15) of one k-step, for every m-tile
ATT_UNROLL
    for (int kk = 0; kk < KD; kk++) {
      uint32_t qa[RM][4];
      if constexpr (!QREG) {
ATT_UNROLL
        for (int r = 0; r < RM; r++) q_frag(qa[r], r, kk);
      }
ATT_UNROLL
      for (int p = 0; p < NS / 2; p++) {
        uint32_t kf[4];
        ldmatrix_x4(kf, Ks + (16 * p + (lane & 7) + ((lane >> 4) << 3)) * LDQ + kk * 16 + ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
ATT_UNROLL
        for (int r = 0; r < RM; r++) {
          const uint32_t(&a)[4] = QREG ? qf[QREG ? kk : 0] : qa[r];
          mma_m16n8k16<T>(s[r][2 * p], a, b0, s[r][2 * p]);
          mma_m16n8k16<T>(s[r][2 * p + 1], a, b1, s[r][2 * p + 1]);
        }
      }
    }
  };
  // S = Q K^T on wgmma (issued), one instruction a k-step (the first overwrites s): B = K's core
  // matrices of d 16 kk .. 16 kk + 15, K-major
  auto scores_wg = [&](float (&s)[RM][NS][4], const uint16_t* Ks) {
    if constexpr (WG != 0) wgmma_tile<T, BC, true, D>(s[0], qf, Ks, true);
  };
  // OVL: the factors by which o is rescaled once the pending P V is done (1: unchanged); otherwise
  // the softmax's own (rowcorr)
  float scl[RM][2];
  auto softmax = [&](float (&s)[RM][NS][4], int64_t j0) {
    // scale, mask, online softmax (rows hf = 0: elements 0, 1; hf = 1: elements 2, 3). A tile whose
    // keys every row of the warp attends to, without an explicit mask (all but the diagonal tiles
    // of a causal mask), skips the per-element range checks (warp-uniform: __all_sync).
    bool inside = P.mask.p == nullptr;
ATT_UNROLL
    for (int r = 0; r < RM; r++)
ATT_UNROLL
      for (int hf = 0; hf < 2; hf++) inside = inside && j0 >= lo[r][hf] && j0 + BC <= hi[r][hf];
    // Such tiles keep the raw scores: the row maximum is taken over them and scaled once (the same
    // value, since x -> x * scale2 is monotonic for scale2 > 0), and each probability is one FMA
    // and one exp2 (FlashAttention's order), one multiply an element fewer.
    const bool whole = __all_sync(0xffffffffu, inside);
    const bool raw = whole && scale2 > 0.0f;
ATT_UNROLL
    for (int r = 0; r < RM; r++)
ATT_UNROLL
      for (int hf = 0; hf < 2; hf++) {
        const int64_t i = i0 + 16 * (RM * warp + r) + g + 8 * hf;
        if constexpr (OVL) scl[r][hf] = 1.0f;
        float rmax = ninf;
        // (the maxima as trees: fmaxf is exact, so any order gives the sequential maximum's value,
        // in log2(2 NS) dependent steps instead of 2 NS)
        if (raw) {
          rmax = row_max_tree<NS>(s[r], hf) * scale2;
        } else if (whole) {
ATT_UNROLL
          for (int n = 0; n < NS; n++)
ATT_UNROLL
            for (int c = 0; c < 2; c++) s[r][n][2 * hf + c] *= scale2;
          rmax = row_max_tree<NS>(s[r], hf);
        } else {
ATT_UNROLL
          for (int n = 0; n < NS; n++)
ATT_UNROLL
            for (int c = 0; c < 2; c++) {
              const int64_t j = j0 + 8 * n + 2 * t + c;
              float v = ninf;
              if (j >= lo[r][hf] && j < hi[r][hf]) {
                v = s[r][n][2 * hf + c] * scale2;
                if (P.mask.p) v = apply_mask<float>(P.mask, b, h, i, j, v, log2e);
              }
              s[r][n][2 * hf + c] = v;
              rmax = fmaxf(rmax, v);
            }
        }
        rmax = fmaxf(rmax, __shfl_xor_sync(0xffffffffu, rmax, 1));
        rmax = fmaxf(rmax, __shfl_xor_sync(0xffffffffu, rmax, 2));
        const bool live = rmax != ninf;
        const float mnew = live ? fmaxf(m[r][hf], rmax) : m[r][hf];
        float sum = 0.0f;
        if (raw && live) {
ATT_UNROLL
          for (int n = 0; n < NS; n++)
ATT_UNROLL
            for (int c = 0; c < 2; c++) {
              const float p = att_exp2(fmaf(s[r][n][2 * hf + c], scale2, -mnew));
              s[r][n][2 * hf + c] = p;
              sum += p;
            }
        } else {
ATT_UNROLL
          for (int n = 0; n < NS; n++)
ATT_UNROLL
            for (int c = 0; c < 2; c++) {
              const float p = live ? att_exp2(s[r][n][2 * hf + c] - mnew) : 0.0f;
              s[r][n][2 * hf + c] = p;
              sum += p;
            }
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (live) {
          if (m[r][hf] != ninf && m[r][hf] != mnew) {
            const float corr = att_exp2(m[r][hf] - mnew);
            l[r][hf] *= corr;
            if constexpr (OVL) {
              scl[r][hf] = corr;  // o is rescaled after the pending P V
            } else {
ATT_UNROLL
              for (int n = 0; n < NO; n++) {
                o[r][n][2 * hf] *= corr;
                o[r][n][2 * hf + 1] *= corr;
              }
            }
          }
          l[r][hf] += sum;
          m[r][hf] = mnew;
        }
      }
  };
  auto rescale = [&]() {
ATT_UNROLL
    for (int r = 0; r < RM; r++)
ATT_UNROLL
      for (int hf = 0; hf < 2; hf++)
ATT_UNROLL
        for (int n = 0; n < NO; n++) {
          o[r][n][2 * hf] *= scl[r][hf];
          o[r][n][2 * hf + 1] *= scl[r][hf];
        }
  };
  auto pv_mma = [&](float (&s)[RM][NS][4], const uint16_t* Vs) {
    // O += P V: k-step ks covers keys 16 ks .. 16 ks + 15; per call two 8-column n-tiles, for
    // every m-tile
ATT_UNROLL
    for (int ks = 0; ks < BC / 16; ks++) {
      uint32_t pa[RM][4];
ATT_UNROLL
      for (int r = 0; r < RM; r++) {
        pa[r][0] = pack2<T>(s[r][2 * ks][0], s[r][2 * ks][1]);
        pa[r][1] = pack2<T>(s[r][2 * ks][2], s[r][2 * ks][3]);
        pa[r][2] = pack2<T>(s[r][2 * ks + 1][0], s[r][2 * ks + 1][1]);
        pa[r][3] = pack2<T>(s[r][2 * ks + 1][2], s[r][2 * ks + 1][3]);
      }
ATT_UNROLL
      for (int p = 0; p < NO / 2; p++) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, Vs + (16 * ks + (lane & 7) + ((lane >> 3) & 1) * 8) * LDV + 16 * p + (lane >> 4) * 8);
        const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
ATT_UNROLL
        for (int r = 0; r < RM; r++) {
          mma_m16n8k16<T>(o[r][2 * p], pa[r], b0, o[r][2 * p]);
          mma_m16n8k16<T>(o[r][2 * p + 1], pa[r], b1, o[r][2 * p + 1]);
        }
      }
    }
  };
  // P rounded to 16 bits as wgmma's A operand: k-step ks is the accumulators of n-tiles 2 ks and
  // 2 ks + 1 (the same fragments as mma.sync's)
  constexpr int KP = WG != 0 ? BC / 16 : 1;
  auto pack_p = [&](uint32_t (&pw)[KP][4], const float (&s)[RM][NS][4]) {
    if constexpr (WG != 0) {
ATT_UNROLL
      for (int ks = 0; ks < BC / 16; ks++) {
        pw[ks][0] = pack2<T>(s[0][2 * ks][0], s[0][2 * ks][1]);
        pw[ks][1] = pack2<T>(s[0][2 * ks][2], s[0][2 * ks][3]);
        pw[ks][2] = pack2<T>(s[0][2 * ks + 1][0], s[0][2 * ks + 1][1]);
        pw[ks][3] = pack2<T>(s[0][2 * ks + 1][2], s[0][2 * ks + 1][3]);
      }
    }
  };
  // O += P V on wgmma (issued), one instruction a k-step of 16 keys: B = V's core matrices of keys
  // 16 ks .. 16 ks + 15, MN-major
  auto pv_wg = [&](const uint32_t (&pw)[KP][4], const uint16_t* Vs) {
    if constexpr (WG != 0) wgmma_tile<T, DV, false, DV>(o[0], pw, Vs, false);
  };

  // WS: consumer c (0, 1) waits for its turn to issue products, and passes the turn on
  const int c = WS ? tid / kAttThreads - 1 : 0;
  auto turn = [&] { bar_sync(kWsTurn + c, 2 * kAttThreads); };
  auto pass = [&] { bar_arrive(kWsTurn + 1 - c, 2 * kAttThreads); };
  // One overlapped step (OVL): the scores of the tile at key j1 (K tile Kn) and the pending P V
  // (V tile Vs) issued as two groups, then the scores' softmax while P V runs, then o rescaled and
  // the next P packed. WS: the turn passed once both groups are issued, and named barrier `empty`
  // (if >= 0) arrived at once P V is done.
  auto overlapped = [&](float (&s)[RM][NS][4], uint32_t (&pw)[KP][4], const uint16_t* Kn, const uint16_t* Vs,
                        int64_t j1, int empty) {
    wgmma_fence_operands(s[0]);
    wgmma_fence_operands(o[0]);
    wgmma_fence_operands(pw);
    wgmma_fence();
    scores_wg(s, Kn);
    wgmma_commit();
    pv_wg(pw, Vs);
    wgmma_commit();
    if constexpr (WS) pass();
    wgmma_wait<1>();  // the scores are in; P V may still run
    wgmma_fence_operands(s[0]);
    softmax(s, j1);
    wgmma_wait<0>();
    wgmma_fence_operands(o[0]);
    if (WS && empty >= 0) bar_arrive(empty, 2 * kAttThreads);
    rescale();
    pack_p(pw, s);
  };
  if constexpr (WS) {
    // a consumer: the overlapped order below, each tile's stage taken when its full barrier passes
    // and given back (empty) once its P V is done; the products issued in turns
    if (c == 1) pass();  // consumer 0 issues first
    float s[RM][NS][4];
    uint32_t pw[KP][4];
    if (blo < bhi) {
      bar_sync(kWsFull + c, 2 * kAttThreads);  // tile 0, stage 0
      turn();
      wgmma_fence_operands(s[0]);
      wgmma_fence();
      scores_wg(s, Ks0);
      wgmma_commit();
      pass();
      wgmma_wait<0>();
      wgmma_fence_operands(s[0]);
      softmax(s, blo);
      pack_p(pw, s);
    }
    int st = 0;
    for (int64_t j0 = blo; j0 < bhi; j0 += BC, st ^= 1) {
      const uint16_t* Vs = Vs0 + st * VT;
      if (j0 + BC < bhi) {
        bar_sync(kWsFull + 2 * (st ^ 1) + c, 2 * kAttThreads);  // the next tile, in the other stage
        turn();
        // the stage is refilled by the loader if a tile is left for it
        overlapped(s, pw, Ks0 + (st ^ 1) * KT, Vs, j0 + BC, j0 + 2 * BC < bhi ? kWsEmpty + 2 * st + c : -1);
      } else {
        turn();
        wgmma_fence_operands(o[0]);
        wgmma_fence_operands(pw);
        wgmma_fence();
        pv_wg(pw, Vs);
        wgmma_commit();
        pass();
        wgmma_wait<0>();
        wgmma_fence_operands(o[0]);
      }
    }
  } else if constexpr (OVL) {
    // FlashAttention-3's order within the warpgroup: tile j + 1's scores are multiplied and their
    // softmax taken while tile j's P V runs on the tensor cores (wgmma groups complete in order:
    // the scores are issued first). o's operations stay in the same order (rescale by tile j's
    // factors, add P_j V_j, rescale by tile j + 1's, ...): the same arithmetic as without overlap.
    float s[RM][NS][4];
    uint32_t pw[KP][4];
    if (blo < bhi) {
      if (blo + BC < bhi) {
        prefetch(blo + BC, 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      fence_proxy_async();  // this thread's copies, for wgmma after the barrier
      __syncthreads();
      wgmma_sync([&] { scores_wg(s, Ks0); }, s[0]);
      softmax(s, blo);  // o is still zero: nothing to rescale
      pack_p(pw, s);
    }
    int buf = 0;
    for (int64_t j0 = blo; j0 < bhi; j0 += BC, buf ^= 1) {
      const uint16_t* Vs = Vs0 + buf * VT;
      if (j0 + BC < bhi) {
        cp_async_wait<0>();  // tile j + 1, in buffer buf ^ 1
        fence_proxy_async();
        __syncthreads();
        overlapped(s, pw, Ks0 + (buf ^ 1) * KT, Vs, j0 + BC, -1);
        __syncthreads();  // every warp's P V of buffer buf is done: refill it
        if (j0 + 2 * BC < bhi) prefetch(j0 + 2 * BC, buf);
      } else {
        wgmma_fence_operands(pw);
        wgmma_sync([&] { pv_wg(pw, Vs); }, o[0]);
      }
    }
  } else {
    int buf = 0;
    for (int64_t j0 = blo; j0 < bhi; j0 += BC, buf ^= NBUF - 1) {
      __syncthreads();  // the previous tile's readers are done (its buffer is refilled below)
      if constexpr (PIPE) {
        if (j0 + BC < bhi) {
          prefetch(j0 + BC, buf ^ 1);
          cp_async_wait<1>();  // this tile's group is complete, the next one's in flight
        } else {
          cp_async_wait<0>();
        }
      } else {
        load_tile16<T, D, NT>(Ks0, kb, P.k.s[2], P.k.s[3], j0, BC, P.Sk, (P.vec >> 1) & 1);
        load_tile16<T, DV, NT>(Vs0, vb, P.v.s[2], P.v.s[3], j0, BC, P.Sk, (P.vec >> 2) & 1);
      }
      if constexpr (WG != 0) fence_proxy_async();  // this thread's copies, for wgmma after the barrier
      __syncthreads();
      const uint16_t* Ks = Ks0 + buf * KT;
      const uint16_t* Vs = Vs0 + buf * VT;
      float s[RM][NS][4];
      if constexpr (WG != 0) {
        wgmma_sync([&] { scores_wg(s, Ks); }, s[0]);
      } else {
        scores_mma(s, Ks);
      }
      softmax(s, j0);
      if constexpr (WG != 0) {
        uint32_t pw[KP][4];
        pack_p(pw, s);
        // o is read, and this buffer refilled, after the products
        wgmma_fence_operands(pw);
        wgmma_sync([&] { pv_wg(pw, Vs); }, o[0]);
      } else {
        pv_mma(s, Vs);
      }
    }
  }

  T* ob = mat_ptr<T>(P.o, b, h);
  float* lb = reinterpret_cast<float*>(P.lse.p) + b * P.lse.s[0] + h * P.lse.s[1];
ATT_UNROLL
  for (int r = 0; r < RM; r++)
ATT_UNROLL
    for (int hf = 0; hf < 2; hf++) {
      const int64_t i = i0 + 16 * (RM * warp + r) + g + 8 * hf;
      if (i >= P.Sq) continue;
      const float inv = l[r][hf] > 0.0f ? 1.0f / l[r][hf] : 0.0f;
      T* orow = ob + i * P.o.s[2];
      // a lane's two adjacent outputs as one 4-byte store where the row is contiguous and aligned
      const bool pair = P.o.s[3] == 1 && (reinterpret_cast<uintptr_t>(orow) & 3u) == 0;
ATT_UNROLL
      for (int n = 0; n < NO; n++) {
        if (pair) {
          Pack<T, 2> v;
          Tr<T>::st(&v.v[0], o[r][n][2 * hf] * inv);
          Tr<T>::st(&v.v[1], o[r][n][2 * hf + 1] * inv);
          *reinterpret_cast<Pack<T, 2>*>(orow + 8 * n + 2 * t) = v;
        } else {
ATT_UNROLL
          for (int c = 0; c < 2; c++)
            Tr<T>::st(orow + static_cast<int64_t>(8 * n + 2 * t + c) * P.o.s[3], o[r][n][2 * hf + c] * inv);
        }
      }
      if (t == 0) lb[i * P.lse.s[2]] = l[r][hf] > 0.0f ? m[r][hf] * kLn2f + att_log(l[r][hf]) : ninf;
    }
}

// ---- backward (CUDA cores) --------------------------------------------------------------------------------
// delta[(b * Hq + h) * Sq + i] = sum_d dO[b, h, i, d] * O[b, h, i, d]: one warp per row.
template <typename T>
__global__ void __launch_bounds__(kAttThreads) attn_delta_kernel(Params P) {
  using C = typename Tr<T>::C;
  constexpr int kWarps = kAttThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t rows = P.B * P.Hq * P.Sq;
  C* delta = static_cast<C*>(P.delta);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t i = row % P.Sq, bh = row / P.Sq, h = bh % P.Hq, b = bh / P.Hq;
    const T* g = mat_ptr<const T>(P.go, b, h) + i * P.go.s[2];
    const T* o = mat_ptr<const T>(P.o, b, h) + i * P.o.s[2];
    C acc = C(0);
    for (int d = lane; d < P.Dv; d += 32)
      acc += static_cast<C>(Tr<T>::ld(g + d * P.go.s[3])) * static_cast<C>(Tr<T>::ld(o + d * P.o.s[3]));
ATT_UNROLL
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta[row] = acc;
  }
}

// The same for 16-bit rows of dO and O that are contiguous and 16-byte aligned (P.vec bits 4 and
// 5) with Dv a multiple of 8: 8 lanes per row, each loading 8 elements (16 bytes) of each operand
// at a time, 4 rows a warp (the one-warp-per-row kernel spent its time on index divisions and
// shuffles, not on memory).
template <typename T>
__global__ void __launch_bounds__(kAttThreads) attn_delta_vec_kernel(Params P) {
  constexpr int kRowsPerBlock = kAttThreads / 8;
  const int sub = threadIdx.x % 8, slot = threadIdx.x / 8;
  const int64_t rows = P.B * P.Hq * P.Sq;
  float* delta = static_cast<float*>(P.delta);
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; row0 < rows;
       row0 += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = row0 + slot;  // rows past the end still take part in the shuffles
    float acc = 0.0f;
    if (row < rows) {
      const int64_t i = row % P.Sq, bh = row / P.Sq, h = bh % P.Hq, b = bh / P.Hq;
      const T* g = mat_ptr<const T>(P.go, b, h) + i * P.go.s[2];
      const T* o = mat_ptr<const T>(P.o, b, h) + i * P.o.s[2];
      for (int d0 = 8 * sub; d0 < P.Dv; d0 += 64) {
        const uint4 gv = *reinterpret_cast<const uint4*>(g + d0);
        const uint4 ov = *reinterpret_cast<const uint4*>(o + d0);
        const uint32_t gw[4] = {gv.x, gv.y, gv.z, gv.w}, ow[4] = {ov.x, ov.y, ov.z, ov.w};
ATT_UNROLL
        for (int w = 0; w < 4; w++)
          acc += unpack_lo<T>(gw[w]) * unpack_lo<T>(ow[w]) + unpack_hi<T>(gw[w]) * unpack_hi<T>(ow[w]);
      }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 4);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    if (sub == 0 && row < rows) delta[row] = acc;
  }
}

// Block: (b, kv head, key tile of BR keys) from blockIdx.x, gradient columns [blockIdx.z * W, + W)
// of dK (D) and dV (Dv). Rows of the score tile are keys, columns queries (S^T).
// Shared: K [BR][D+1], V [BR][Dv+1], Q [BC][D+1], dO [BC][Dv+1], P^T and dS^T [BR][BC+1], then
// lse, delta [BC] and the queries' key ranges lo, hi [BC] (int64).
template <typename T, int RM, int CN, int W>
__global__ void __launch_bounds__(kAttThreads) attn_dkdv_kernel(Params P) {
  using C = typename Tr<T>::C;
  constexpr int BR = kTY * RM, BC = kTX * CN, WC = W / kTX;
  MP_DYNAMIC_SMEM(C, sm);
  const int D = P.D, Dv = P.Dv;
  const int ldk = D + 1, ldv = Dv + 1;
  C* Ks = sm;
  C* Vs = Ks + BR * ldk;
  C* Qs = Vs + BR * ldv;
  C* Gs = Qs + BC * ldk;
  C* Ps = Gs + BC * ldv;
  C* Ss = Ps + BR * (BC + 1);
  C* Ls = Ss + BR * (BC + 1);
  C* Dl = Ls + BC;
  int64_t* Lo = reinterpret_cast<int64_t*>(Dl + BC);  // 8-byte aligned: every size above is a multiple of 8
  int64_t* Hi = Lo + BC;
  const int tid = threadIdx.x, tx = tid % kTX, ty = tid / kTX;
  const int64_t x = blockIdx.x, nbk = P.B * P.Hkv;
  const int64_t kt = x / nbk, bk = x % nbk;  // longest first (see "Block order")
  const int64_t kh = bk % P.Hkv, b = bk / P.Hkv;
  const int64_t j0 = kt * BR;
  const int col0 = static_cast<int>(blockIdx.z) * W;
  const int wk = mx(mn(W, D - col0), 0), wv = mx(mn(W, Dv - col0), 0);
  const C scale = static_cast<C>(P.scale);
  const C ninf = static_cast<C>(-INFINITY);
  const C* delta = static_cast<const C*>(P.delta);

  load_tile<T, C>(Ks, ldk, mat_ptr<const T>(P.k, b, kh), P.k.s[2], P.k.s[3], j0, BR, P.Sk, 0, D);
  load_tile<T, C>(Vs, ldv, mat_ptr<const T>(P.v, b, kh), P.v.s[2], P.v.s[3], j0, BR, P.Sk, 0, Dv);

  C dk[RM][WC], dv[RM][WC];
ATT_UNROLL
  for (int r = 0; r < RM; r++)
ATT_UNROLL
    for (int k = 0; k < WC; k++) dk[r][k] = dv[r][k] = C(0);

  // the queries that can see keys [j0, j1): the ranges are monotone in the query, so these form
  // an interval: from the sequence of key j0 (or j0 itself when causal) to the end of the
  // sequence of key j1 - 1 (packed rows have Sq = Sk: keys and queries share the token index)
  const int64_t j1 = mn(j0 + BR, P.Sk);
  int64_t ia = 0, ib = P.Sq;
  if (P.cu.p) {
    int64_t lo, hi;
    seq_of(P.cu, j0, ia, hi);
    seq_of(P.cu, j1 - 1, lo, ib);
    ia = mx(ia, int64_t(0));
    ib = mn(ib, P.Sq);
  }
  if (P.causal) ia = mx(ia, j0);

  for (int64_t g = 0; g < P.group; g++) {
    const int64_t h = kh * P.group + g;
    const T* qb = mat_ptr<const T>(P.q, b, h);
    const T* gb = mat_ptr<const T>(P.go, b, h);
    const C* lb = reinterpret_cast<const C*>(P.lse.p) + b * P.lse.s[0] + h * P.lse.s[1];
    const C* db = delta + (b * P.Hq + h) * P.Sq;
    for (int64_t i0 = ia; i0 < ib; i0 += BC) {
      __syncthreads();  // the previous tile's readers are done
      load_tile<T, C>(Qs, ldk, qb, P.q.s[2], P.q.s[3], i0, BC, P.Sq, 0, D);
      load_tile<T, C>(Gs, ldv, gb, P.go.s[2], P.go.s[3], i0, BC, P.Sq, 0, Dv);
      for (int t = tid; t < BC; t += kAttThreads) {
        const int64_t i = i0 + t;
        const bool in = i < P.Sq;
        Ls[t] = in ? lb[i * P.lse.s[2]] : ninf;
        Dl[t] = in ? db[i] : C(0);
        row_range(P, i, Lo[t], Hi[t]);
      }
      __syncthreads();
      C s[RM][CN], dp[RM][CN];
      dot_tile<C, RM, CN>(s, Ks, ldk, Qs, ldk, D, ty, tx);
      dot_tile<C, RM, CN>(dp, Vs, ldv, Gs, ldv, Dv, ty, tx);
ATT_UNROLL
      for (int r = 0; r < RM; r++) {
        const int64_t j = j0 + ty * RM + r;
ATT_UNROLL
        for (int c = 0; c < CN; c++) {
          const int t = tx + kTX * c;
          const C L = Ls[t];
          C p = C(0);
          if (j >= Lo[t] && j < Hi[t] && L != ninf) {
            C v = s[r][c] * scale;
            if (P.mask.p) v = apply_mask<C>(P.mask, b, h, i0 + t, j, v);
            p = att_exp(v - L);
          }
          Ps[(ty * RM + r) * (BC + 1) + t] = p;
          Ss[(ty * RM + r) * (BC + 1) + t] = p * (dp[r][c] - Dl[t]);
        }
      }
      __syncthreads();
      if (wv > 0) acc_tile<C, RM, WC>(dv, Ps, BC + 1, Gs, ldv, BC, ty, tx, col0, wv);
      if (wk > 0) acc_tile<C, RM, WC>(dk, Ss, BC + 1, Qs, ldk, BC, ty, tx, col0, wk);
    }
  }

  T* dkb = mat_ptr<T>(P.dk, b, kh);
  T* dvb = mat_ptr<T>(P.dv, b, kh);
ATT_UNROLL
  for (int r = 0; r < RM; r++) {
    const int64_t j = j0 + ty * RM + r;
    if (j >= P.Sk) continue;
ATT_UNROLL
    for (int k = 0; k < WC; k++) {
      const int c = tx + kTX * k;
      if (c < wk) Tr<T>::st(dkb + j * P.dk.s[2] + static_cast<int64_t>(col0 + c) * P.dk.s[3], dk[r][k] * scale);
      if (c < wv) Tr<T>::st(dvb + j * P.dv.s[2] + static_cast<int64_t>(col0 + c) * P.dv.s[3], dv[r][k]);
    }
  }
}

// Block: (b, query head, query tile) from blockIdx.x, dQ columns [blockIdx.z * W, + W) of D.
// Shared: Q [BR][D+1], dO [BR][Dv+1], K [BC][D+1], V [BC][Dv+1], dS [BR][BC+1].
template <typename T, int RM, int CN, int W>
__global__ void __launch_bounds__(kAttThreads) attn_dq_kernel(Params P) {
  using C = typename Tr<T>::C;
  constexpr int BR = kTY * RM, BC = kTX * CN, WC = W / kTX;
  MP_DYNAMIC_SMEM(C, sm);
  const int D = P.D, Dv = P.Dv;
  const int ldk = D + 1, ldv = Dv + 1;
  C* Qs = sm;
  C* Gs = Qs + BR * ldk;
  C* Ks = Gs + BR * ldv;
  C* Vs = Ks + BC * ldk;
  C* Ss = Vs + BC * ldv;
  const int tid = threadIdx.x, tx = tid % kTX, ty = tid / kTX;
  const int64_t x = blockIdx.x, nbh = P.B * P.Hq;
  const int64_t qt = P.ntiles - 1 - x / nbh, bh = x % nbh;  // longest first (see "Block order")
  const int64_t h = bh % P.Hq, b = bh / P.Hq, kh = h / P.group;
  const int64_t i0 = qt * BR;
  const int col0 = static_cast<int>(blockIdx.z) * W;
  const int wq = mx(mn(W, D - col0), 0);
  const C scale = static_cast<C>(P.scale);
  const C ninf = static_cast<C>(-INFINITY);

  load_tile<T, C>(Qs, ldk, mat_ptr<const T>(P.q, b, h), P.q.s[2], P.q.s[3], i0, BR, P.Sq, 0, D);
  load_tile<T, C>(Gs, ldv, mat_ptr<const T>(P.go, b, h), P.go.s[2], P.go.s[3], i0, BR, P.Sq, 0, Dv);
  const T* kb = mat_ptr<const T>(P.k, b, kh);
  const T* vb = mat_ptr<const T>(P.v, b, kh);
  const C* lb = reinterpret_cast<const C*>(P.lse.p) + b * P.lse.s[0] + h * P.lse.s[1];
  const C* db = static_cast<const C*>(P.delta) + (b * P.Hq + h) * P.Sq;

  int64_t lo[RM], hi[RM];
  C L[RM], dl[RM], acc[RM][WC];
ATT_UNROLL
  for (int r = 0; r < RM; r++) {
    const int64_t i = i0 + ty * RM + r;
    row_range(P, i, lo[r], hi[r]);
    L[r] = i < P.Sq ? lb[i * P.lse.s[2]] : ninf;
    dl[r] = i < P.Sq ? db[i] : C(0);
    if (L[r] == ninf) hi[r] = lo[r];  // nothing to attend to: no gradient
ATT_UNROLL
    for (int k = 0; k < WC; k++) acc[r][k] = C(0);
  }
  int64_t blo, bhi, unused;
  row_range(P, i0, blo, unused);
  row_range(P, mn(i0 + BR, P.Sq) - 1, unused, bhi);

  for (int64_t j0 = blo; j0 < bhi; j0 += BC) {
    __syncthreads();
    load_tile<T, C>(Ks, ldk, kb, P.k.s[2], P.k.s[3], j0, BC, P.Sk, 0, D);
    load_tile<T, C>(Vs, ldv, vb, P.v.s[2], P.v.s[3], j0, BC, P.Sk, 0, Dv);
    __syncthreads();
    C s[RM][CN], dp[RM][CN];
    dot_tile<C, RM, CN>(s, Qs, ldk, Ks, ldk, D, ty, tx);
    dot_tile<C, RM, CN>(dp, Gs, ldv, Vs, ldv, Dv, ty, tx);
ATT_UNROLL
    for (int r = 0; r < RM; r++) {
      const int64_t i = i0 + ty * RM + r;
ATT_UNROLL
      for (int c = 0; c < CN; c++) {
        const int64_t j = j0 + tx + kTX * c;
        C p = C(0);
        if (j >= lo[r] && j < hi[r]) {
          C v = s[r][c] * scale;
          if (P.mask.p) v = apply_mask<C>(P.mask, b, h, i, j, v);
          p = att_exp(v - L[r]);
        }
        Ss[(ty * RM + r) * (BC + 1) + tx + kTX * c] = p * (dp[r][c] - dl[r]);
      }
    }
    __syncthreads();
    if (wq > 0) acc_tile<C, RM, WC>(acc, Ss, BC + 1, Ks, ldk, BC, ty, tx, col0, wq);
  }

  T* qgb = mat_ptr<T>(P.dq, b, h);
ATT_UNROLL
  for (int r = 0; r < RM; r++) {
    const int64_t i = i0 + ty * RM + r;
    if (i >= P.Sq) continue;
ATT_UNROLL
    for (int k = 0; k < WC; k++) {
      const int c = tx + kTX * k;
      if (c < wq) Tr<T>::st(qgb + i * P.dq.s[2] + static_cast<int64_t>(col0 + c) * P.dq.s[3], acc[r][k] * scale);
    }
  }
}

// ---- tensor-core backward (bf16 / f16 inputs, D and Dv in {64, 128}) -------------------------
// The same decomposition as the CUDA-core kernels (delta, then dk/dv per key tile, then dq per
// query tile), with every tile product on mma.sync. A fragments are read from shared memory by
// ldmatrix at each use (not kept in registers: the accumulators need them); the probabilities P
// and dS = P (dP - delta) are rounded to the storage dtype for the products that take them as A
// operands (dV += P^T dO, dK += dS^T Q, dQ += dS K), as FlashAttention-2 does.

// A fragment of the 16 x 16 block at `As` (row-major, leading dimension ld)
MP_D void mma_load_a(uint32_t (&a)[4], const uint16_t* As, int ld, int lane) {
  ldmatrix_x4(a, As + (lane & 15) * ld + (lane >> 4) * 8);
}
// acc[n] += a * B for n-tiles n < NT, B "n-major": element (k, n) at Bs[n * ld + k] (Bs: k-step's
// first column)
template <typename T, int NT>
MP_D void mma_step_nmajor(float (&acc)[NT][4], const uint32_t (&a)[4], const uint16_t* Bs, int ld, int lane) {
ATT_UNROLL
  for (int p = 0; p < NT / 2; p++) {
    uint32_t f[4];
    ldmatrix_x4(f, Bs + (16 * p + (lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8);
    const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
    mma_m16n8k16<T>(acc[2 * p], a, b0, acc[2 * p]);
    mma_m16n8k16<T>(acc[2 * p + 1], a, b1, acc[2 * p + 1]);
  }
}
// acc[n] += a * B for n-tiles n < NT, B "k-major": element (k, n) at Bs[k * ld + n] (Bs: k-step's
// first row)
template <typename T, int NT>
MP_D void mma_step_kmajor(float (&acc)[NT][4], const uint32_t (&a)[4], const uint16_t* Bs, int ld, int lane) {
ATT_UNROLL
  for (int p = 0; p < NT / 2; p++) {
    uint32_t f[4];
    ldmatrix_x4_trans(f, Bs + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + 16 * p + (lane >> 4) * 8);
    const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
    mma_m16n8k16<T>(acc[2 * p], a, b0, acc[2 * p]);
    mma_m16n8k16<T>(acc[2 * p + 1], a, b1, acc[2 * p + 1]);
  }
}
// the A fragment of a 16 x 16 operand from the accumulators of its two 16 x 8 halves
template <typename T>
MP_D void mma_acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// Block: (b, kv head, tile of 64 keys) from blockIdx.x; warp w owns keys 16 w .. 16 w + 15. Loops
// over the query heads of the group and the query tiles (BQ queries) that can see its keys.
// Shared: K [64][D], V [64][Dv], Q [BQ][D], dO [BQ][Dv] (16-bit, padded rows), then lse, delta
// [BQ] (float) and the queries' key ranges lo, hi [BQ] (int64). PIPE (Q and dO rows 16-byte
// aligned and contiguous): two Q/dO buffers, the next tile (of this head, else of the group's next
// head) prefetched with cp.async while the current one is multiplied.
// DQ (FlashAttention-2's single pass, MEGAPATCH_ATTENTION_BWD=fused): each tile also adds its share
// of dQ, dS K over the block's 64 keys, into the float32 accumulator P.dqacc ([B, Hq, Sq, D],
// zeroed first) with atomics, instead of attn_dq_mma_kernel recomputing S and dP per query tile:
// dS^T goes to shared memory ([64][BQ], rounded to 16 bits as for dK), then warp w multiplies the
// tile's columns [w D / 4, (w + 1) D / 4) of dQ. attn_dq_convert_kernel scales and stores dQ. The
// order of the additions across key tiles is the atomics' (not deterministic on a GPU).
// WG (sm_90a, MEGAPATCH_ATTENTION_WGMMA_BWD; BQ 64, D and Dv in {64, 128}, PIPE, not DQ): the four
// tile products on wgmma: the block's 4 warps are one warpgroup, its 64 keys the wgmma's M; K's
// and V's A fragments are read once into registers, the Q and dO tiles sit in shared memory in
// core matrices (mma.cuh), read as K-major B by S^T = K Q^T and dP^T = V dO^T and as MN-major B by
// dV += P^T dO and dK += dS^T Q. The same products in the same order as mma.sync's (the emulator
// gives the same bits).
// NWG (with WG): warpgroups a block, each with its 64 keys (warp w: keys 16 w .. 16 w + 15), all
// multiplying the same Q/dO tiles (NWG = 2: 128 keys a block, half the tile loads a key).
// WS (with WG, NWG 2; MEGAPATCH_ATTENTION_WGMMA_BWD=ws): warp-specialised as the forward's WS: a
// third warpgroup (warps 0-3) copies the Q/dO tiles and fills the queries' lse, delta and key
// ranges of each of two stages, the two others (warps 4-11) multiply; named barriers pass the
// stages (full, empty), no block-wide barrier in the loop; setmaxnreg 56 / 224.
template <typename T, int D, int DV, int BQ, bool PIPE, bool DQ = false, int MINB = 0, bool WG = false, int NWG = 1,
          bool WS = false>
__global__ void __launch_bounds__(kAttThreads*(NWG + (WS ? 1 : 0)), MINB) attn_dkdv_mma_kernel(Params P) {
  static_assert(!WG || (PIPE && !DQ && BQ == 64 && (D == 64 || D == 128) && (DV == 64 || DV == 128)),
                "wgmma dK/dV: 64-query tiles of D, Dv in {64, 128}, cp.async");
  static_assert(NWG == 1 || (WG && NWG == 2), "two warpgroups a block: wgmma's");
  static_assert(!WS || (WG && NWG == 2), "warp-specialised: two consumers");
  static_assert(WS || BQ <= kAttThreads * NWG, "a thread a query of the tile (fetch, put)");
  constexpr int NT = kAttThreads * (NWG + (WS ? 1 : 0));  // threads a block
  constexpr int NL = WS ? 2 : 1;                          // stages of the queries' lse, delta, ranges
  constexpr int BR = kMmaBR * NWG, LDK = D + kMmaPad, LDV = DV + kMmaPad, NQ = BQ / 8, NBUF = PIPE ? 2 : 1;
  constexpr int LDS = BQ + kMmaPad, MT = BQ / 16, NTW = D / 32;  // dQ: m-tiles, n-tiles per warp
  constexpr int QT = WG ? BQ * D : BQ * LDK, GT = WG ? BQ * DV : BQ * LDV;  // elements a Q / dO tile
  MP_DYNAMIC_SMEM(uint16_t, sm);
  uint16_t* Ks = sm;
  uint16_t* Vs = Ks + BR * LDK;
  uint16_t* Qs0 = Vs + BR * LDV;     // NBUF tiles [BQ][LDK] (wgmma: core matrices of [BQ][D])
  uint16_t* Gs0 = Qs0 + NBUF * QT;  // NBUF tiles [BQ][LDV] (wgmma: core matrices of [BQ][DV])
  float* Ls0 = reinterpret_cast<float*>(Gs0 + NBUF * GT);  // 16-byte aligned: every size above is
  float* Dl0 = Ls0 + NL * BQ;                              // a multiple of 8 elements (NL stages)
  int64_t* Lo0 = reinterpret_cast<int64_t*>(Dl0 + NL * BQ);
  int64_t* Hi0 = Lo0 + NL * BQ;
  uint16_t* Ss = reinterpret_cast<uint16_t*>(Hi0 + NL * BQ);  // DQ: dS^T [64][LDS] (16-byte aligned rows)
  const int tid = threadIdx.x, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int warp = WS ? tid / 32 - 4 : tid / 32;  // the warp's keys 16 warp .. (WS: the loader's < 0)
  const int64_t x = blockIdx.x, nbk = P.B * P.Hkv;
  const int64_t kt = x / nbk, bk = x % nbk;  // longest first (see "Block order")
  const int64_t kh = bk % P.Hkv, b = bk / P.Hkv;
  const int64_t j0 = kt * BR;
  const float scale = static_cast<float>(P.scale);
  const float scale2 = static_cast<float>(P.scale * kLog2e);  // scores and lse in log2 units
  const float log2e = static_cast<float>(kLog2e);
  const float pinf = INFINITY;
  const float* delta = static_cast<const float*>(P.delta);

  load_tile16<T, D, NT>(Ks, mat_ptr<const T>(P.k, b, kh), P.k.s[2], P.k.s[3], j0, BR, P.Sk, (P.vec >> 1) & 1);
  load_tile16<T, DV, NT>(Vs, mat_ptr<const T>(P.v, b, kh), P.v.s[2], P.v.s[3], j0, BR, P.Sk, (P.vec >> 2) & 1);

  float dk[D / 8][4], dv[DV / 8][4];
ATT_UNROLL
  for (int n = 0; n < D / 8; n++)
ATT_UNROLL
    for (int e = 0; e < 4; e++) dk[n][e] = 0.0f;
ATT_UNROLL
  for (int n = 0; n < DV / 8; n++)
ATT_UNROLL
    for (int e = 0; e < 4; e++) dv[n][e] = 0.0f;

  // the queries that can see keys [j0, j1) (see attn_dkdv_kernel)
  const int64_t j1 = mn(j0 + BR, P.Sk);
  int64_t ia = 0, ib = P.Sq;
  if (P.cu.p) {
    int64_t lo, hi;
    seq_of(P.cu, j0, ia, hi);
    seq_of(P.cu, j1 - 1, lo, ib);
    ia = mx(ia, int64_t(0));
    ib = mn(ib, P.Sq);
  }
  if (P.causal) ia = mx(ia, j0);

  // Q/dO tile of query head hq starting at query it into buffer `bf`, as one cp.async group
  auto prefetch = [&](int64_t hq, int64_t it, int bf) {
    if constexpr (WG) {
      load_tile_cm_async<T, D, BQ, NT>(Qs0 + bf * QT, mat_ptr<const T>(P.q, b, hq), P.q.s[2], it, P.Sq);
      load_tile_cm_async<T, DV, BQ, NT>(Gs0 + bf * GT, mat_ptr<const T>(P.go, b, hq), P.go.s[2], it, P.Sq);
    } else {
      load_tile16_async<T, D, BQ, NT>(Qs0 + bf * QT, mat_ptr<const T>(P.q, b, hq), P.q.s[2], it, P.Sq);
      load_tile16_async<T, DV, BQ, NT>(Gs0 + bf * GT, mat_ptr<const T>(P.go, b, hq), P.go.s[2], it, P.Sq);
    }
    cp_async_commit();
  };
  if (!WS && PIPE && ia < ib) prefetch(kh * P.group, ia, 0);
  // query q of the tile from i0 into the stage arrays, its lse and delta given (read where i < Sq);
  // whether it attends to all of the block's keys
  auto store_query = [&](float* Ls, float* Dl, int64_t* Lo, int64_t* Hi, int q, int64_t i0, float lse, float dl) {
    const int64_t i = i0 + q;
    const bool in = i < P.Sq;
    Ls[q] = in ? -lse * log2e : pinf;
    Dl[q] = in ? dl : 0.0f;
    row_range(P, i, Lo[q], Hi[q]);
    return Ls[q] != pinf && Lo[q] <= j0 && Hi[q] >= j0 + BR;
  };
  // the queries' -lse in log2 units (+inf for rows past Sq and rows with no keys: no probability),
  // delta and key ranges for the tile of query head h from query i0, into stage arrays Ls .. Hi
  // (by the threads from `first` on, `n` of them); whether each query attends to all the block's keys
  auto fill = [&](float* Ls, float* Dl, int64_t* Lo, int64_t* Hi, int64_t h, int64_t i0, int first, int n) {
    const float* lb = reinterpret_cast<const float*>(P.lse.p) + b * P.lse.s[0] + h * P.lse.s[1];
    const float* db = delta + (b * P.Hq + h) * P.Sq;
    bool covers = P.mask.p == nullptr;
    for (int q = tid - first; q < BQ; q += n) {
      const int64_t i = i0 + q;
      const bool in = i < P.Sq;
      covers = store_query(Ls, Dl, Lo, Hi, q, i0, in ? lb[i * P.lse.s[2]] : 0.0f, in ? db[i] : 0.0f) && covers;
    }
    return covers;
  };
  // Without warp specialisation every thread fills (at most) one query of the tile, and the lse and
  // delta it needs are read one tile ahead into registers (fetch; put stores them), so the global
  // loads' latency hides behind a tile's products instead of holding the block at the barrier
  // after the fill (the values and their arithmetic are fill's: the same bits).
  struct Ahead {
    float lse, dl;
  };
  auto fetch = [&](int64_t h, int64_t i0) {
    Ahead a{0.0f, 0.0f};
    const int64_t i = i0 + tid;
    if (tid < BQ && i < P.Sq) {
      a.lse = (reinterpret_cast<const float*>(P.lse.p) + b * P.lse.s[0] + h * P.lse.s[1])[i * P.lse.s[2]];
      a.dl = delta[(b * P.Hq + h) * P.Sq + i];
    }
    return a;
  };
  auto put = [&](float* Ls, float* Dl, int64_t* Lo, int64_t* Hi, int64_t i0, const Ahead& a) {
    const bool covers = P.mask.p == nullptr;
    return tid < BQ ? store_query(Ls, Dl, Lo, Hi, tid, i0, a.lse, a.dl) && covers : covers;
  };
  const int64_t ntiles = P.group * (ia < ib ? (ib - ia + BQ - 1) / BQ : 0);  // of the loop below
  // WG: this warp's A fragments of K and V (its 16 keys), read once
  uint32_t kf[WG ? D / 16 : 1][4], vf[WG ? DV / 16 : 1][4];
  if constexpr (WG) {
    __syncthreads();  // K and V are in place (WS: the last block-wide barrier)
    if constexpr (WS) {
      if (tid < kAttThreads) {
        // the loader: tile tt into stage tt % 2 once both consumers released the tile before it there
        setmaxnreg_dec<56>();  // (40 spills the fill's row ranges)
        int st = 0;
        int64_t tt = 0;
        for (int64_t gq = 0; gq < P.group; gq++) {
          const int64_t h = kh * P.group + gq;
          for (int64_t i0 = ia; i0 < ib; i0 += BQ, tt++, st ^= 1) {
            ws_stage_wait_empty(st, tt);
            load_tile_cm_async<T, D, BQ, kAttThreads>(Qs0 + st * QT, mat_ptr<const T>(P.q, b, h), P.q.s[2], i0, P.Sq);
            load_tile_cm_async<T, DV, BQ, kAttThreads>(Gs0 + st * GT, mat_ptr<const T>(P.go, b, h), P.go.s[2], i0, P.Sq);
            cp_async_commit();
            fill(Ls0 + st * BQ, Dl0 + st * BQ, Lo0 + st * BQ, Hi0 + st * BQ, h, i0, 0, kAttThreads);
            ws_stage_filled(st);
          }
        }
        return;
      }
      setmaxnreg_inc<224>();
    }
ATT_UNROLL
    for (int kk = 0; kk < D / 16; kk++) mma_load_a(kf[kk], Ks + warp * 16 * LDK + kk * 16, LDK, lane);
ATT_UNROLL
    for (int kk = 0; kk < DV / 16; kk++) mma_load_a(vf[kk], Vs + warp * 16 * LDV + kk * 16, LDV, lane);
  }
  int buf = 0;
  int64_t tt = 0;  // tiles done
  const int c = WS ? tid / kAttThreads - 1 : 0;  // WS: the consumer
  Ahead ahead{0.0f, 0.0f};  // not WS: the lse and delta of the tile to come
  if constexpr (!WS) {
    if (ia < ib) ahead = fetch(kh * P.group, ia);
  }
  for (int64_t gq = 0; gq < P.group; gq++) {
    const int64_t h = kh * P.group + gq;
    const T* qb = mat_ptr<const T>(P.q, b, h);
    const T* gb = mat_ptr<const T>(P.go, b, h);
    for (int64_t i0 = ia; i0 < ib; i0 += BQ, buf ^= NBUF - 1, tt++) {
      float* Ls = Ls0 + (WS ? buf * BQ : 0);
      float* Dl = Dl0 + (WS ? buf * BQ : 0);
      int64_t* Lo = Lo0 + (WS ? buf * BQ : 0);
      int64_t* Hi = Hi0 + (WS ? buf * BQ : 0);
      if constexpr (WS) {
        bar_sync(kWsFull + 2 * buf + c, 2 * kAttThreads);  // the loader filled stage buf
      } else if constexpr (PIPE) {
        __syncthreads();  // the previous tile's readers are done (its buffer is refilled below)
        const bool same = i0 + BQ < ib;  // the next tile: this head's next, or the next head's first
        if (same || gq + 1 < P.group) {
          prefetch(same ? h : h + 1, same ? i0 + BQ : ia, buf ^ 1);
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
      } else {
        __syncthreads();  // the previous tile's readers are done (its buffer is refilled below)
        load_tile16<T, D, NT>(Qs0, qb, P.q.s[2], P.q.s[3], i0, BQ, P.Sq, P.vec & 1);
        load_tile16<T, DV, NT>(Gs0, gb, P.go.s[2], P.go.s[3], i0, BQ, P.Sq, (P.vec >> 3) & 1);
      }
      if constexpr (WG && !WS) fence_proxy_async();  // this thread's copies, for wgmma after the barrier below
      const uint16_t* Qs = Qs0 + buf * QT;
      const uint16_t* Gs = Gs0 + buf * GT;
      // `whole`: every query of the tile attends to all of the block's BR keys (and no explicit
      // mask): the tile skips the per-element checks. The block's AND of the filling threads'
      // answers; WS: each warp's AND over the loader's stage arrays (the same for every warp)
      bool whole;
      if constexpr (WS) {
        bool covers = P.mask.p == nullptr;
        for (int q = lane; q < BQ; q += 32) covers = covers && Ls[q] != pinf && Lo[q] <= j0 && Hi[q] >= j0 + BR;
        whole = __all_sync(0xffffffffu, covers);
      } else {
        const Ahead cur = ahead;
        // the next tile's: this head's next, or the next head's first
        if (i0 + BQ < ib) ahead = fetch(h, i0 + BQ);
        else if (gq + 1 < P.group) ahead = fetch(h + 1, ia);
        whole = __syncthreads_and(put(Ls, Dl, Lo, Hi, i0, cur)) != 0;
      }
      // S^T = K Q^T and dP^T = V dO^T: rows keys, columns queries
      float st[NQ][4], dpt[NQ][4];
      if constexpr (WG) {
        // B = the Q / dO tile's core matrices of d 16 kk .. 16 kk + 15, K-major (LBO: the next 8 d;
        // SBO: the next 8 queries); the first k-step overwrites the accumulators
        wgmma_sync(
            [&] {
              wgmma_tile<T, BQ, true, D>(st, kf, Qs, true);
              wgmma_tile<T, BQ, true, DV>(dpt, vf, Gs, true);
            },
            st, dpt);
      } else {
ATT_UNROLL
        for (int n = 0; n < NQ; n++)
ATT_UNROLL
          for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.0f;
ATT_UNROLL
        for (int kk = 0; kk < D / 16; kk++) {
          uint32_t a[4];
          mma_load_a(a, Ks + warp * 16 * LDK + kk * 16, LDK, lane);
          mma_step_nmajor<T, NQ>(st, a, Qs + kk * 16, LDK, lane);
        }
ATT_UNROLL
        for (int kk = 0; kk < DV / 16; kk++) {
          uint32_t a[4];
          mma_load_a(a, Vs + warp * 16 * LDV + kk * 16, LDV, lane);
          mma_step_nmajor<T, NQ>(dpt, a, Gs + kk * 16, LDV, lane);
        }
      }
      // P^T and dS^T = P^T (dP^T - delta); the per-element checks only where the tile needs them.
      // Element e of n-tile n is query 8 n + 2 t + (e & 1): one 8-byte load of Ls and Dl a pair.
      if (whole) {
ATT_UNROLL
        for (int n = 0; n < NQ; n++) {
          const float2 nl = *reinterpret_cast<const float2*>(Ls + 8 * n + 2 * t);
          const float2 dl = *reinterpret_cast<const float2*>(Dl + 8 * n + 2 * t);
ATT_UNROLL
          for (int e = 0; e < 4; e++) {
            const float p = att_exp2(fmaf(st[n][e], scale2, e & 1 ? nl.y : nl.x));
            st[n][e] = p;
            dpt[n][e] = p * (dpt[n][e] - (e & 1 ? dl.y : dl.x));
          }
        }
      } else {
ATT_UNROLL
        for (int n = 0; n < NQ; n++)
ATT_UNROLL
          for (int e = 0; e < 4; e++) {
            const int64_t j = j0 + warp * 16 + g + 8 * (e >> 1);
            const int q = 8 * n + 2 * t + (e & 1);
            const float nl = Ls[q];
            float p = 0.0f;
            if (j >= Lo[q] && j < Hi[q] && nl != pinf) {
              // without a mask, the fast path's arithmetic (the same bits for any tiling)
              p = P.mask.p ? att_exp2(apply_mask<float>(P.mask, b, h, i0 + q, j, st[n][e] * scale2, log2e) + nl)
                           : att_exp2(fmaf(st[n][e], scale2, nl));
            }
            st[n][e] = p;
            dpt[n][e] = p * (dpt[n][e] - Dl[q]);
          }
      }
      if constexpr (DQ) {
        // this warp's 16 rows of dS^T, rounded as the A operand of dK below
ATT_UNROLL
        for (int n = 0; n < NQ; n++)
ATT_UNROLL
          for (int hf = 0; hf < 2; hf++)
            *reinterpret_cast<uint32_t*>(Ss + (warp * 16 + g + 8 * hf) * LDS + 8 * n + 2 * t) =
                pack2<T>(dpt[n][2 * hf], dpt[n][2 * hf + 1]);
      }
      // dV += P^T dO, dK += dS^T Q (k-steps over the tile's queries)
      if constexpr (WG) {
        // A = P^T, dS^T rounded to 16 bits; B = the dO / Q tile's core matrices of queries 16 ks ..
        // 16 ks + 15, MN-major (LBO: the next 8 queries; SBO: the next 8 columns)
        uint32_t pa[BQ / 16][4], da[BQ / 16][4];
ATT_UNROLL
        for (int ks = 0; ks < BQ / 16; ks++) {
          mma_acc_to_a<T>(pa[ks], st[2 * ks], st[2 * ks + 1]);
          mma_acc_to_a<T>(da[ks], dpt[2 * ks], dpt[2 * ks + 1]);
        }
        // the tile is read (and refilled after the next barrier) after the products
        wgmma_fence_operands(pa);
        wgmma_fence_operands(da);
        wgmma_sync(
            [&] {
              wgmma_tile<T, DV, false, DV>(dv, pa, Gs, false);
              wgmma_tile<T, D, false, D>(dk, da, Qs, false);
            },
            dv, dk);
        // WS: the stage is the loader's again (if a tile is left for it)
        if (WS && tt + 2 < ntiles) bar_arrive(kWsEmpty + 2 * buf + c, 2 * kAttThreads);
      } else {
ATT_UNROLL
        for (int ks = 0; ks < BQ / 16; ks++) {
          uint32_t a[4];
          mma_acc_to_a<T>(a, st[2 * ks], st[2 * ks + 1]);
          mma_step_kmajor<T, DV / 8>(dv, a, Gs + ks * 16 * LDV, LDV, lane);
          mma_acc_to_a<T>(a, dpt[2 * ks], dpt[2 * ks + 1]);
          mma_step_kmajor<T, D / 8>(dk, a, Qs + ks * 16 * LDK, LDK, lane);
        }
      }
      if constexpr (DQ) {
        __syncthreads();  // every warp's dS^T rows are in place
        // dQ [BQ, D] += dS [BQ, 64 keys] K [64 keys, D]: A = dS read transposed from dS^T, B = K
        // rows (k-major); this warp's columns c0 .. c0 + 8 NTW
        const int c0 = warp * (D / 4);
        float dqa[MT][NTW][4];
ATT_UNROLL
        for (int m = 0; m < MT; m++)
ATT_UNROLL
          for (int n = 0; n < NTW; n++)
ATT_UNROLL
            for (int e = 0; e < 4; e++) dqa[m][n][e] = 0.0f;
ATT_UNROLL
        for (int ks = 0; ks < BR / 16; ks++) {
ATT_UNROLL
          for (int m = 0; m < MT; m++) {
            uint32_t a[4];
            ldmatrix_x4_trans(a, Ss + (16 * ks + (lane & 7) + (lane >> 4) * 8) * LDS + 16 * m + ((lane >> 3) & 1) * 8);
            mma_step_kmajor<T, NTW>(dqa[m], a, Ks + ks * 16 * LDK + c0, LDK, lane);
          }
        }
        // this lane's first element (row i0 + g, columns c0 + 2 t, + 1); its rows i0 + g + r for
        // r < left (one address computed a tile: the others are constant offsets from it; float2
        // reductions on compute capability 9.0)
        float* acc = static_cast<float*>(P.dqacc) + ((b * P.Hq + h) * P.Sq + i0 + g) * D + c0 + 2 * t;
        const int64_t left = P.Sq - i0 - g;
ATT_UNROLL
        for (int m = 0; m < MT; m++)
ATT_UNROLL
          for (int hf = 0; hf < 2; hf++) {
            const int r = 16 * m + 8 * hf;
            if (r >= left) continue;
ATT_UNROLL
            for (int n = 0; n < NTW; n++) atomic_add2(acc + r * D + 8 * n, dqa[m][n][2 * hf], dqa[m][n][2 * hf + 1]);
          }
      }
    }
  }

  // WG: dV goes out through a multiplication by 1 (exact; the compiler keeps it), as dK through its
  // scale: stored as it is, dv's only use after the loop is the 16-bit rounding's bit operations,
  // and the compiler then carries dv through the loop in integer registers, which on wgmma cost
  // 32 register moves into the accumulator's registers and 32 back every tile (tools/sass: the
  // warp-specialised D 64 loop 372 instructions, 308 with the multiplication; mma.sync's
  // accumulators have no such constraint, and its kernel spills a little more with it)
  T* dkb = mat_ptr<T>(P.dk, b, kh);
  T* dvb = mat_ptr<T>(P.dv, b, kh);
ATT_UNROLL
  for (int hf = 0; hf < 2; hf++) {
    const int64_t j = j0 + warp * 16 + g + 8 * hf;
    if (j >= P.Sk) continue;
ATT_UNROLL
    for (int n = 0; n < D / 8; n++)
ATT_UNROLL
      for (int c = 0; c < 2; c++)
        Tr<T>::st(dkb + j * P.dk.s[2] + static_cast<int64_t>(8 * n + 2 * t + c) * P.dk.s[3], dk[n][2 * hf + c] * scale);
ATT_UNROLL
    for (int n = 0; n < DV / 8; n++)
ATT_UNROLL
      for (int c = 0; c < 2; c++)
        Tr<T>::st(dvb + j * P.dv.s[2] + static_cast<int64_t>(8 * n + 2 * t + c) * P.dv.s[3],
                  WG ? __fmul_rn(dv[n][2 * hf + c], 1.0f) : dv[n][2 * hf + c]);
  }
}

// Block: (b, query head, tile of 64 queries) from blockIdx.x; warp w owns rows 16 w .. 16 w + 15.
// Shared: Q [64][D], dO [64][Dv], K [BC][D], V [BC][Dv] (16-bit, padded rows); BC keys per tile.
// PIPE: two K/V buffers, the next tile prefetched with cp.async (as in attn_fwd_mma_kernel).
// MINB: as attn_fwd_mma_kernel's (MEGAPATCH_ATTENTION_DQ_OCC=1 asks for 4 blocks an SM).
// WG (sm_90a, MEGAPATCH_ATTENTION_WGMMA_BWD; BC 64, D and Dv in {64, 128}, PIPE): the three tile
// products on wgmma (the block's 64 queries the wgmma's M): Q's and dO's A fragments read once
// into registers, the K and V tiles in core matrices, K read as K-major B by S = Q K^T and as
// MN-major B by dQ += dS K, V as K-major B by dP = dO V^T. The same products in the same order.
// NWG (with WG): warpgroups a block, each with its 64 queries (warp w: queries 16 w .. 16 w + 15),
// all multiplying the same K/V tiles (NWG = 2: 128 queries a block, half the tile loads a query).
// WS (with WG, NWG 2; MEGAPATCH_ATTENTION_WGMMA_BWD=ws or ws-dq): warp-specialised as the forward's
// WS: a loader warpgroup (the block's first) copies each K/V tile into one of two stages and hands
// it to the two consumer warpgroups of 64 queries through named barriers (kWsFull / kWsEmpty);
// every warpgroup takes the same tiles (the block's key range). setmaxnreg 40 / 232.
template <typename T, int D, int DV, int BC, bool PIPE, int MINB = 0, bool WG = false, int NWG = 1,
          bool WS = false>
__global__ void __launch_bounds__(kAttThreads*(NWG + (WS ? 1 : 0)), MINB) attn_dq_mma_kernel(Params P) {
  static_assert(!WG || (PIPE && BC == 64 && (D == 64 || D == 128) && (DV == 64 || DV == 128)),
                "wgmma dQ: 64-key tiles of D, Dv in {64, 128}, cp.async");
  static_assert(NWG == 1 || (WG && NWG == 2), "two warpgroups a block: wgmma's");
  static_assert(!WS || (WG && NWG == 2), "warp-specialised: two consumers");
  constexpr int NT = kAttThreads * (NWG + (WS ? 1 : 0));  // threads a block
  constexpr int BR = kMmaBR * NWG, LDK = D + kMmaPad, LDV = DV + kMmaPad, NS = BC / 8, NBUF = PIPE ? 2 : 1;
  constexpr int KT = WG ? BC * D : BC * LDK, VT = WG ? BC * DV : BC * LDV;  // elements a K / V tile
  MP_DYNAMIC_SMEM(uint16_t, sm);
  uint16_t* Qs = sm;
  uint16_t* Gs = Qs + BR * LDK;
  uint16_t* Ks0 = Gs + BR * LDV;    // NBUF tiles [BC][LDK] (wgmma: core matrices of [BC][D])
  uint16_t* Vs0 = Ks0 + NBUF * KT;  // NBUF tiles [BC][LDV] (wgmma: core matrices of [BC][DV])
  const int tid = threadIdx.x, lane = tid % 32, g = lane >> 2, t = lane & 3;
  // the warp's queries 16 warp .. (WS: the loader's warps take warp 0's rows, which they never use)
  const int warp = WS ? (tid < kAttThreads ? 0 : tid / 32 - 4) : tid / 32;
  const int64_t x = blockIdx.x, nbh = P.B * P.Hq;
  const int64_t qt = P.ntiles - 1 - x / nbh, bh = x % nbh;  // longest first (see "Block order")
  const int64_t h = bh % P.Hq, b = bh / P.Hq, kh = h / P.group;
  const int64_t i0 = qt * BR;
  const float scale = static_cast<float>(P.scale);
  const float scale2 = static_cast<float>(P.scale * kLog2e);  // scores and lse in log2 units
  const float log2e = static_cast<float>(kLog2e);
  const float ninf = -INFINITY;

  load_tile16<T, D, NT>(Qs, mat_ptr<const T>(P.q, b, h), P.q.s[2], P.q.s[3], i0, BR, P.Sq, P.vec & 1);
  load_tile16<T, DV, NT>(Gs, mat_ptr<const T>(P.go, b, h), P.go.s[2], P.go.s[3], i0, BR, P.Sq, (P.vec >> 3) & 1);
  const T* kb = mat_ptr<const T>(P.k, b, kh);
  const T* vb = mat_ptr<const T>(P.v, b, kh);
  const float* lb = reinterpret_cast<const float*>(P.lse.p) + b * P.lse.s[0] + h * P.lse.s[1];
  const float* db = static_cast<const float*>(P.delta) + (b * P.Hq + h) * P.Sq;

  // nl: -lse in log2 units
  int64_t lo[2], hi[2];
  float nl[2], dl[2], acc[D / 8][4];
  for (int hf = 0; hf < 2; hf++) {
    const int64_t i = i0 + warp * 16 + g + 8 * hf;
    row_range(P, i, lo[hf], hi[hf]);
    const float L = i < P.Sq ? lb[i * P.lse.s[2]] : ninf;
    nl[hf] = -L * log2e;
    dl[hf] = i < P.Sq ? db[i] : 0.0f;
    if (L == ninf) hi[hf] = lo[hf];  // nothing to attend to: no gradient
  }
ATT_UNROLL
  for (int n = 0; n < D / 8; n++)
ATT_UNROLL
    for (int e = 0; e < 4; e++) acc[n][e] = 0.0f;
  int64_t blo, bhi, unused;
  row_range(P, i0, blo, unused);
  row_range(P, mn(i0 + BR, P.Sq) - 1, unused, bhi);

  auto prefetch = [&](int64_t jt, int buf) {
    if constexpr (WG) {
      load_tile_cm_async<T, D, BC, NT>(Ks0 + buf * KT, kb, P.k.s[2], jt, P.Sk);
      load_tile_cm_async<T, DV, BC, NT>(Vs0 + buf * VT, vb, P.v.s[2], jt, P.Sk);
    } else {
      load_tile16_async<T, D, BC, NT>(Ks0 + buf * KT, kb, P.k.s[2], jt, P.Sk);
      load_tile16_async<T, DV, BC, NT>(Vs0 + buf * VT, vb, P.v.s[2], jt, P.Sk);
    }
    cp_async_commit();
  };
  if (!WS && PIPE && blo < bhi) prefetch(blo, 0);
  // WG: this warp's A fragments of Q and dO (its 16 queries), read once
  uint32_t qf[WG ? D / 16 : 1][4], gf[WG ? DV / 16 : 1][4];
  if constexpr (WG) {
    __syncthreads();  // Q and dO are in place (WS: the last block-wide barrier)
    if constexpr (WS) {
      if (tid < kAttThreads) {
        // the loader: key tile tt into stage tt % 2 once both consumers released the tile before it
        setmaxnreg_dec<40>();
        int st = 0;
        int64_t tt = 0;
        for (int64_t j0 = blo; j0 < bhi; j0 += BC, tt++, st ^= 1) {
          ws_stage_wait_empty(st, tt);
          load_tile_cm_async<T, D, BC, kAttThreads>(Ks0 + st * KT, kb, P.k.s[2], j0, P.Sk);
          load_tile_cm_async<T, DV, BC, kAttThreads>(Vs0 + st * VT, vb, P.v.s[2], j0, P.Sk);
          cp_async_commit();
          ws_stage_filled(st);
        }
        return;
      }
      setmaxnreg_inc<232>();
    }
ATT_UNROLL
    for (int kk = 0; kk < D / 16; kk++) mma_load_a(qf[kk], Qs + warp * 16 * LDK + kk * 16, LDK, lane);
ATT_UNROLL
    for (int kk = 0; kk < DV / 16; kk++) mma_load_a(gf[kk], Gs + warp * 16 * LDV + kk * 16, LDV, lane);
  }
  int buf = 0;
  const int c = WS ? tid / kAttThreads - 1 : 0;  // WS: the consumer
  for (int64_t j0 = blo; j0 < bhi; j0 += BC, buf ^= NBUF - 1) {
    if constexpr (WS) {
      bar_sync(kWsFull + 2 * buf + c, 2 * kAttThreads);  // the loader filled stage buf
    } else {
      __syncthreads();  // the previous tile's readers are done (its buffer is refilled below)
      if constexpr (PIPE) {
        if (j0 + BC < bhi) {
          prefetch(j0 + BC, buf ^ 1);
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
      } else {
        load_tile16<T, D, NT>(Ks0, kb, P.k.s[2], P.k.s[3], j0, BC, P.Sk, (P.vec >> 1) & 1);
        load_tile16<T, DV, NT>(Vs0, vb, P.v.s[2], P.v.s[3], j0, BC, P.Sk, (P.vec >> 2) & 1);
      }
      if constexpr (WG) fence_proxy_async();  // this thread's copies, for wgmma after the barrier
      __syncthreads();
    }
    const uint16_t* Ks = Ks0 + buf * KT;
    const uint16_t* Vs = Vs0 + buf * VT;
    float s[NS][4], dp[NS][4];
    if constexpr (WG) {
      // B = the K / V tile's core matrices of d 16 kk .. 16 kk + 15, K-major
      wgmma_sync(
          [&] {
            wgmma_tile<T, BC, true, D>(s, qf, Ks, true);
            wgmma_tile<T, BC, true, DV>(dp, gf, Vs, true);
          },
          s, dp);
    } else {
ATT_UNROLL
      for (int n = 0; n < NS; n++)
ATT_UNROLL
        for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.0f;
ATT_UNROLL
      for (int kk = 0; kk < D / 16; kk++) {
        uint32_t a[4];
        mma_load_a(a, Qs + warp * 16 * LDK + kk * 16, LDK, lane);
        mma_step_nmajor<T, NS>(s, a, Ks + kk * 16, LDK, lane);
      }
ATT_UNROLL
      for (int kk = 0; kk < DV / 16; kk++) {
        uint32_t a[4];
        mma_load_a(a, Gs + warp * 16 * LDV + kk * 16, LDV, lane);
        mma_step_nmajor<T, NS>(dp, a, Vs + kk * 16, LDV, lane);
      }
    }
    // a tile whose keys every row of the warp attends to, without an explicit mask, skips the
    // per-element checks (warp-uniform: __all_sync)
    const bool whole = __all_sync(0xffffffffu, P.mask.p == nullptr && j0 >= lo[0] && j0 + BC <= hi[0] &&
                                                   j0 >= lo[1] && j0 + BC <= hi[1]);
    if (whole) {
ATT_UNROLL
      for (int n = 0; n < NS; n++)
ATT_UNROLL
        for (int e = 0; e < 4; e++) {
          const int hf = e >> 1;
          s[n][e] = att_exp2(fmaf(s[n][e], scale2, nl[hf])) * (dp[n][e] - dl[hf]);
        }
    } else {
ATT_UNROLL
      for (int n = 0; n < NS; n++)
ATT_UNROLL
        for (int e = 0; e < 4; e++) {
          const int hf = e >> 1;
          const int64_t i = i0 + warp * 16 + g + 8 * hf;
          const int64_t j = j0 + 8 * n + 2 * t + (e & 1);
          float p = 0.0f;
          if (j >= lo[hf] && j < hi[hf]) {
            // without a mask, the fast path's arithmetic (the same bits for any tiling)
            p = P.mask.p ? att_exp2(apply_mask<float>(P.mask, b, h, i, j, s[n][e] * scale2, log2e) + nl[hf])
                         : att_exp2(fmaf(s[n][e], scale2, nl[hf]));
          }
          s[n][e] = p * (dp[n][e] - dl[hf]);
        }
    }
    // dQ += dS K
    if constexpr (WG) {
      // A = dS rounded to 16 bits; B = the K tile's core matrices of keys 16 ks .. 16 ks + 15,
      // MN-major (LBO: the next 8 keys; SBO: the next 8 d)
      uint32_t da[BC / 16][4];
ATT_UNROLL
      for (int ks = 0; ks < BC / 16; ks++) mma_acc_to_a<T>(da[ks], s[2 * ks], s[2 * ks + 1]);
      // the tile is read (and refilled after the next barrier) after the products
      wgmma_fence_operands(da);
      wgmma_sync([&] { wgmma_tile<T, D, false, D>(acc, da, Ks, false); }, acc);
      // WS: the stage is the loader's again (if a tile is left for it)
      if (WS && j0 + 2 * BC < bhi) bar_arrive(kWsEmpty + 2 * buf + c, 2 * kAttThreads);
    } else {
ATT_UNROLL
      for (int ks = 0; ks < BC / 16; ks++) {
        uint32_t a[4];
        mma_acc_to_a<T>(a, s[2 * ks], s[2 * ks + 1]);
        mma_step_kmajor<T, D / 8>(acc, a, Ks + ks * 16 * LDK, LDK, lane);
      }
    }
  }

  T* qgb = mat_ptr<T>(P.dq, b, h);
ATT_UNROLL
  for (int hf = 0; hf < 2; hf++) {
    const int64_t i = i0 + warp * 16 + g + 8 * hf;
    if (i >= P.Sq) continue;
ATT_UNROLL
    for (int n = 0; n < D / 8; n++)
ATT_UNROLL
      for (int c = 0; c < 2; c++)
        Tr<T>::st(qgb + i * P.dq.s[2] + static_cast<int64_t>(8 * n + 2 * t + c) * P.dq.s[3], acc[n][2 * hf + c] * scale);
  }
}

// dq[b, h, i, d] = scale * dqacc[((b Hq + h) Sq + i) D + d] (the fused backward's float32 sums)
template <typename T>
__global__ void attn_dq_convert_kernel(Params P) {
  const int64_t n = P.B * P.Hq * P.Sq * P.D;
  const float* acc = static_cast<const float*>(P.dqacc);
  const float scale = static_cast<float>(P.scale);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = e % P.D, r = e / P.D, i = r % P.Sq, bh = r / P.Sq, h = bh % P.Hq, b = bh / P.Hq;
    Tr<T>::st(mat_ptr<T>(P.dq, b, h) + i * P.dq.s[2] + d * P.dq.s[3], acc[e] * scale);
  }
}

// ---- host ------------------------------------------------------------------------------------
inline Mat mat_of(const TensorArg& t) {
  Mat m;
  m.p = t.data;
  for (int d = 0; d < 4; d++) m.s[d] = d < t.ndim ? t.strides[d] : 0;
  return m;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shape and option checks shared by both directions (the CPU kernel's read_options).
inline Params make_params(const TensorArg& q, const TensorArg& k, const TensorArg& v, const AttentionOptions& o) {
  if (q.ndim != 4 || k.ndim != 4 || v.ndim != 4) throw_error("attention: q, k, v must be 4-D");
  if (k.dtype != q.dtype || v.dtype != q.dtype) throw_error("attention: q, k, v must share a dtype");
  Params P{};
  P.B = q.shape[0];
  P.Hq = q.shape[1];
  P.Sq = q.shape[2];
  P.Hkv = k.shape[1];
  P.Sk = k.shape[2];
  if (P.Hkv == 0 || P.Hq % P.Hkv != 0) throw_error("attention: query heads must be a multiple of kv heads");
  if (k.shape[0] != P.B || v.shape[0] != P.B || v.shape[1] != P.Hkv || v.shape[2] != P.Sk ||
      k.shape[3] != q.shape[3])
    throw_error("attention: q, k, v shapes do not agree");
  if (q.shape[3] > INT32_MAX / 2 || v.shape[3] > INT32_MAX / 2) throw_error("attention: head dim too large");
  P.D = static_cast<int>(q.shape[3]);
  P.Dv = static_cast<int>(v.shape[3]);
  P.group = P.Hq / P.Hkv;
  P.q = mat_of(q);
  P.k = mat_of(k);
  P.v = mat_of(v);
  P.mask.p = nullptr;
  if (o.has_mask) {
    const TensorArg& m = o.mask;
    if (m.ndim != 4) throw_error("attention: the mask must be passed as a 4-D view");
    const DType md = m.dtype;
    if (md != DType::Bool && md != DType::F32 && md != DType::F64 && md != DType::BF16 && md != DType::F16)
      throw_error("attention: the mask must be bool or floating-point");
    P.mask.p = m.data;
    P.mask.dtype = static_cast<int>(md);
    for (int d = 0; d < 4; d++) P.mask.s[d] = m.shape[d] == 1 ? 0 : m.strides[d];
  }
  P.cu.p = nullptr;
  if (o.has_cu) {
    const TensorArg& cu = o.cu;
    if (cu.ndim != 1 || cu.numel() < 2) throw_error("attention: cuSeqlens must be 1-D with at least 2 entries");
    if (P.B != 1 || P.Sq != P.Sk) throw_error("attention: varlen needs B = 1 and Sq = Sk");
    if (cu.dtype != DType::I32 && cu.dtype != DType::I64) throw_error("attention: cuSeqlens must be int32 or int64");
    P.cu.p = cu.data;
    P.cu.is64 = cu.dtype == DType::I64 ? 1 : 0;
    P.cu.stride = cu.strides[0];
    P.cu.n = cu.numel();
  }
  P.causal = o.causal ? 1 : 0;
  P.scale = o.scale;
  return P;
}

constexpr int64_t kMaxGridX = 2147483647;

template <typename K>
void launch_tiles(K kernel, const char* name, const Params& P, int64_t blocks, int64_t chunks, size_t smem,
                  cudaStream_t s, int threads = kAttThreads) {
  if (blocks <= 0 || chunks <= 0) return;
  if (smem > kMaxSmem)
    throw_error(std::string("attention: head dims D = ") + std::to_string(P.D) + ", Dv = " + std::to_string(P.Dv) +
                " need " + std::to_string(smem) + " bytes of shared memory per block (at most " +
                std::to_string(kMaxSmem) + "); the CUDA kernels support head dims up to 256");
  if (blocks > kMaxGridX || chunks > 65535) throw_error(std::string(name) + ": too many blocks");
  if (smem > kDefaultSmem)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)), name);
  MP_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks), 1, static_cast<unsigned>(chunks)), dim3(threads), smem, s,
            P);
  check_launch(name);
}

// Shared memory of each kernel's configuration (the layouts in the kernels' comments).
template <typename T, int RM, int CN, int W>
size_t fwd_smem(const Params& P) {
  constexpr size_t BR = kTY * RM, BC = kTX * CN;
  return sizeof(typename Tr<T>::C) * ((BR + BC) * (P.D + 1) + BC * (mn(W, P.Dv) + 1) + BR * (BC + 1));
}
template <typename T, int RM, int CN, int W>
size_t dkdv_smem(const Params& P) {
  constexpr size_t BR = kTY * RM, BC = kTX * CN;
  return sizeof(typename Tr<T>::C) * ((BR + BC) * (P.D + 1 + P.Dv + 1) + 2 * BR * (BC + 1) + 2 * BC) +
         sizeof(int64_t) * 2 * BC;
}
template <typename T, int RM, int CN, int W>
size_t dq_smem(const Params& P) {
  constexpr size_t BR = kTY * RM, BC = kTX * CN;
  return sizeof(typename Tr<T>::C) * ((BR + BC) * (P.D + 1 + P.Dv + 1) + BR * (BC + 1));
}

template <typename T, int RM, int CN, int W>
void forward_cfg(Params P, cudaStream_t s) {
  P.ntiles = cdiv(P.Sq, kTY * RM);
  auto k = attn_fwd_kernel<T, RM, CN, W>;
  launch_tiles(k, "attentionForward", P, P.B * P.Hq * P.ntiles, cdiv(P.Dv, W), fwd_smem<T, RM, CN, W>(P), s);
}

template <typename T, int RM, int CN, int W>
void dkdv_cfg(Params P, cudaStream_t s) {
  P.ntiles = cdiv(P.Sk, kTY * RM);
  auto k = attn_dkdv_kernel<T, RM, CN, W>;
  launch_tiles(k, "attentionBackward (dk, dv)", P, P.B * P.Hkv * P.ntiles, mx(cdiv(mx(P.D, P.Dv), W), int64_t(1)),
               dkdv_smem<T, RM, CN, W>(P), s);
}

template <typename T, int RM, int CN, int W>
void dq_cfg(Params P, cudaStream_t s) {
  P.ntiles = cdiv(P.Sq, kTY * RM);
  auto k = attn_dq_kernel<T, RM, CN, W>;
  launch_tiles(k, "attentionBackward (dq)", P, P.B * P.Hq * P.ntiles, mx(cdiv(P.D, W), int64_t(1)),
               dq_smem<T, RM, CN, W>(P), s);
}

// Configurations by the width of the output chunk (Dv forward, D for dq, the wider of both for
// dk/dv); a configuration whose tiles of the other head dim would not fit in shared memory gives
// way to the next one with fewer rows, so that every pair of head dims up to 256 runs in every
// dtype.
// ---- tensor-core path selection ----
// MEGAPATCH_ATTENTION_MMA=0 forces the CUDA-core kernels (the reference); otherwise bf16 / f16
// inputs with D, Dv in {64, 128} or (D, Dv) = (192, 128) on compute capability 8.0+ take the
// mma.sync kernels.
inline bool mma_allowed() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_MMA");
  return !(e && std::strcmp(e, "0") == 0);
}
// MEGAPATCH_ATTENTION_PIPELINE=0: the tensor-core kernels load each K/V (or Q/dO) tile between two
// barriers instead of prefetching the next one with cp.async (for comparing the two on a GPU).
inline bool pipeline_allowed() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_PIPELINE");
  return !(e && std::strcmp(e, "0") == 0);
}
// With D + Dv <= 128 the forward asks ptxas for 4 blocks an SM (128 registers) and dK/dV for 3
// (168), at the price of some spilled registers (ptxas -v, sm_90, bf16: 44 and 176 bytes of spill
// stores); uncapped they take 129 and 178 registers (3 and 2 blocks an SM). Measured on an H200
// (2026-12-04, run d, B4 Hq32 Hkv8 S2048 D64): forward 0.447 against 0.495 ms, forward + backward
// 1.772 against 1.853 ms, the 1B training step 253.5 against 257.1 ms, so capped is the default;
// MEGAPATCH_ATTENTION_OCC=0 leaves the registers uncapped (same bits).
inline bool attention_occupancy() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_OCC");
  return !(e && std::strcmp(e, "0") == 0);
}
// MEGAPATCH_ATTENTION_BWD_BQ=32: dK/dV tiles of 32 queries instead of 64 when D + Dv <= 128 (half
// the score registers: 157 registers, 3 blocks an SM without spills; twice the tiles). For
// measuring on a GPU.
inline bool dkdv_bq32() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_BWD_BQ");
  return e && std::strcmp(e, "32") == 0;
}
// MEGAPATCH_ATTENTION_DQ_OCC=1: with D + Dv <= 128 the dQ kernel asks ptxas for 4 blocks an SM
// (128 registers) instead of its uncapped 166 (3 blocks), as the default does for the forward and
// dK/dV kernels. For measuring on a GPU (same bits).
inline bool dq_occupancy() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_DQ_OCC");
  return e && std::strcmp(e, "1") == 0;
}
// The device is sm_80+ and the kernels it would run were compiled for sm_80+ (a build for older
// architectures JIT-compiled on a new GPU would run mma.cuh's slow shuffle fallback instead).
inline bool device_has_mma_uncached(int dev) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (major < 8) return false;
#ifndef MEGAPATCH_CUDA_EMULATOR
  cudaFuncAttributes fa;
  auto k = attn_fwd_mma_kernel<bf16, 64, 64, false>;
  if (cudaFuncGetAttributes(&fa, k) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (fa.ptxVersion < 80) return false;
#endif
  return true;
}
inline bool device_has_mma() {
  static std::atomic<int> known[64];  // per device: 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev < 0 || dev >= 64) return device_has_mma_uncached(dev);
  int v = known[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    v = device_has_mma_uncached(dev) ? 2 : 1;
    known[dev].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}
// 16-bit rows of `m` (last stride 1) start on 16-byte boundaries for every (b, h, row)
inline bool rows_aligned16(const Mat& m, int width) {
  if (reinterpret_cast<uintptr_t>(m.p) % 16 != 0) return false;
  if (m.s[3] != 1 && width > 1) return false;
  for (int d = 0; d < 3; d++)
    if (m.s[d] % 8 != 0) return false;
  return true;
}
// The head dims (D, Dv) the tensor-core kernels are built for: 1..4 for (64 | 128, 64 | 128), 5
// for MLA's (192, 128) (DeepSeek-V3, Moonlight: 128 + 64 rope dims of q/k, 128 of v); 0 otherwise.
inline int mma_head_dims(const Params& P) {
  const bool d64 = P.D == 64, d128 = P.D == 128, v64 = P.Dv == 64, v128 = P.Dv == 128;
  if ((d64 || d128) && (v64 || v128)) return (d64 ? 1 : 3) + (v64 ? 0 : 1);
  return P.D == 192 && v128 ? 5 : 0;
}

// MEGAPATCH_ATTENTION_FWD_ROWS=128: the tensor-core forward takes 128 query rows a block (two
// m-tiles a warp) instead of 64 (for comparing the two on a GPU).
inline int fwd_mtiles_per_warp() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_FWD_ROWS");
  return e && std::strcmp(e, "128") == 0 ? 2 : 1;
}
template <typename T, int D, int DV, bool PIPE, int RM, int BCK = 0>
size_t fwd_mma_smem() {
  constexpr size_t nbuf = PIPE ? 2 : 1, bc = BCK ? BCK : fwd_mma_bc<RM, DV>();
  return sizeof(uint16_t) * (kMmaBR * RM * (D + kMmaPad) + nbuf * bc * (D + kMmaPad + DV + kMmaPad));
}
// MEGAPATCH_ATTENTION_FWD_KEYS=128: the mma.sync forward of D + Dv <= 128 takes 128 keys a tile
// (attn_fwd_mma_kernel's BCK; for measuring on a GPU)
inline bool fwd_keys128() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_FWD_KEYS");
  return e && std::strcmp(e, "128") == 0;
}
// The wgmma forward (attn_fwd_mma_kernel's WG): Q (64 NWG rows) padded as before, two K/V tiles of
// WG keys in core matrices (no padding).
template <int D, int DV, int WG, int NWG>
size_t fwd_wgmma_smem() {
  return sizeof(uint16_t) * (kMmaBR * NWG * (D + kMmaPad) + 2 * WG * (D + DV));
}
// MEGAPATCH_ATTENTION_WGMMA=1 (or 128): the tensor-core forward multiplies on wgmma (sm_90a) with
// 128 keys a tile (64 where D + Dv > 128: registers), =64: with 64 keys a tile; where the
// device runs this build's sm_90a code (H100 / H200) and K, V rows are 16-byte aligned and
// contiguous. The next tile's scores overlap this tile's P V (FlashAttention-3's order) unless
// MEGAPATCH_ATTENTION_WGMMA_OVERLAP=0. Not the default until measured on a GPU (bench: "wgmma
// forward").
inline int wgmma_keys_wanted() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_WGMMA");
  if (!e) return 0;
  if (std::strcmp(e, "1") == 0 || std::strcmp(e, "128") == 0) return 128;
  return std::strcmp(e, "64") == 0 ? 64 : 0;
}
// MEGAPATCH_ATTENTION_WGMMA_BWD=1: the tensor-core backward's tile products on wgmma (sm_90a, the
// same devices): dK/dV with 64-query tiles (D + Dv <= 128) and dQ (D, Dv in {64, 128}, D + Dv <=
// 192), where the rows are 16-byte aligned and contiguous. Not the default until measured on a GPU.
// =2: two warpgroups a block (128 keys for dK/dV, 128 queries for dQ, sharing each tile); =ws: as
// =2 with both kernels warp-specialised (a loader warpgroup and the two: the WS of
// attn_dkdv_mma_kernel and attn_dq_mma_kernel, where D + Dv <= 128); =ws-dkdv, =ws-dq: only one.
// Returns the warpgroups a block wanted (0: not on wgmma) plus kBwdWsDkdv and kBwdWsDq.
constexpr int kBwdWsDkdv = 4, kBwdWsDq = 8;
inline int wgmma_bwd_wanted() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_WGMMA_BWD");
  if (!e) return 0;
  if (std::strcmp(e, "ws") == 0) return 2 | kBwdWsDkdv | kBwdWsDq;
  if (std::strcmp(e, "ws-dkdv") == 0) return 2 | kBwdWsDkdv;
  if (std::strcmp(e, "ws-dq") == 0) return 2 | kBwdWsDq;
  return std::strcmp(e, "1") == 0 ? 1 : std::strcmp(e, "2") == 0 ? 2 : 0;
}
// MEGAPATCH_ATTENTION_WGMMA_WS=1 (with MEGAPATCH_ATTENTION_WGMMA): the forward warp-specialised,
// FlashAttention-3's way (attn_fwd_mma_kernel's WS; D + Dv <= 128). Not the default until measured.
inline bool wgmma_ws() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_WGMMA_WS");
  return e && std::strcmp(e, "1") == 0;
}
inline bool wgmma_overlap() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_WGMMA_OVERLAP");
  return !(e && std::strcmp(e, "0") == 0);
}
// (device_has_wgmma: mma.cuh)
// The wgmma forward with WG keys a tile and NWG warpgroups (64 NWG query rows) a block.
template <typename T, int D, int DV, int WG, int NWG>
void forward_wgmma_launch(Params P, bool ovl, cudaStream_t s) {
  P.ntiles = cdiv(P.Sq, kMmaBR * NWG);
  const int64_t blocks = P.B * P.Hq * P.ntiles;
  const size_t smem = fwd_wgmma_smem<D, DV, WG, NWG>();
  if (ovl)
    launch_tiles(attn_fwd_mma_kernel<T, D, DV, true, 1, 0, WG, true, NWG>, "attentionForward", P, blocks, 1, smem, s,
                 kAttThreads * NWG);
  else
    launch_tiles(attn_fwd_mma_kernel<T, D, DV, true, 1, 0, WG, false, NWG>, "attentionForward", P, blocks, 1, smem,
                 s, kAttThreads * NWG);
}
// The warp-specialised kernels hand registers between their warpgroups with setmaxnreg (the
// loader's `dec` to LOADER a thread, the two consumers' `inc` to CONSUMER): an increase waits until
// the block's pool, what the kernel started with (its register count for each of its 384
// threads), holds enough, so a compiler that gave the kernel fewer than (LOADER + 2 CONSUMER) / 3
// registers a thread would hang it. ws_registers_fit says whether the kernel's count covers them
// (ptxas gives these kernels 168, exactly enough); where it does not, the launches take the
// two-warpgroup kernels instead. Asked once per kernel. (The emulator checks setmaxnreg's counts
// against the block itself.)
template <int LOADER, int CONSUMER, typename K> bool ws_registers_fit(K kernel) {
#if defined(MEGAPATCH_CUDA_EMULATOR)
  (void)kernel;
  return true;
#else
  static const bool fit = [&] {
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return 3 * fa.numRegs >= LOADER + 2 * CONSUMER;
  }();
  return fit;
#endif
}
// WG: keys a tile (wgmma_keys_wanted); rows: query rows a block (64 or 128: two warpgroups)
template <typename T, int D, int DV>
void forward_wgmma(Params P, int wg, int rows, cudaStream_t s) {
  const bool ovl = wgmma_overlap();
  // warp-specialised (a loader warpgroup and two consumers, 64-key tiles; D + Dv <= 128: the
  // consumers' 232 registers)
  if constexpr (D + DV <= 128) {
    auto ws = attn_fwd_mma_kernel<T, D, DV, true, 1, 1, 64, true, 2, true>;
    if (wgmma_ws() && ws_registers_fit<40, 232>(ws)) {
      P.ntiles = cdiv(P.Sq, 2 * kMmaBR);
      launch_tiles(ws, "attentionForward", P, P.B * P.Hq * P.ntiles, 1, fwd_wgmma_smem<D, DV, 64, 2>(), s,
                   3 * kAttThreads);
      return;
    }
  }
  // 128 keys a tile only with D + Dv <= 128 (ptxas, sm_90a, bf16 D 64: 180 registers, 254
  // overlapped; D 128 would take 248, and spill overlapped)
  if constexpr (D + DV <= 128) {
    if (wg == 128) {
      if (rows == 128) forward_wgmma_launch<T, D, DV, 128, 2>(P, ovl, s);
      else forward_wgmma_launch<T, D, DV, 128, 1>(P, ovl, s);
      return;
    }
  }
  if (rows == 128) forward_wgmma_launch<T, D, DV, 64, 2>(P, ovl, s);
  else forward_wgmma_launch<T, D, DV, 64, 1>(P, ovl, s);
}
template <typename T, int D, int DV, int RM>
void forward_mma_rows(Params P, cudaStream_t s) {
  P.ntiles = cdiv(P.Sq, kMmaBR * RM);
  P.vec = (rows_aligned16(P.q, D) ? 1 : 0) | (rows_aligned16(P.k, D) ? 2 : 0) | (rows_aligned16(P.v, DV) ? 4 : 0);
  const int64_t blocks = P.B * P.Hq * P.ntiles;
  const bool pipe = (P.vec & 6) == 6 && pipeline_allowed();
  constexpr bool small = D + DV <= 128 && RM == 1;  // MINB 1 otherwise: no other instantiation
  const int wg = pipe ? wgmma_keys_wanted() : 0;
  if (wg != 0 && device_has_wgmma()) {
    // the 128-row form is two warpgroups of 64 rows (RM 2 is mma.sync's)
    forward_wgmma<T, D, DV>(P, wg, 64 * RM, s);
    return;
  }
  if constexpr (small) {
    if (pipe && fwd_keys128()) {
      launch_tiles(attn_fwd_mma_kernel<T, D, DV, true, 1, 0, 0, false, 1, false, 128>, "attentionForward", P, blocks,
                   1, fwd_mma_smem<T, D, DV, true, 1, 128>(), s);
      return;
    }
  }
  if (small && pipe && attention_occupancy()) {
    launch_tiles(attn_fwd_mma_kernel<T, D, DV, true, RM, small ? 4 : 0>, "attentionForward", P, blocks, 1,
                 fwd_mma_smem<T, D, DV, true, RM>(), s);
  } else if (pipe) {
    launch_tiles(attn_fwd_mma_kernel<T, D, DV, true, RM>, "attentionForward", P, blocks, 1,
                 fwd_mma_smem<T, D, DV, true, RM>(), s);
  } else {
    launch_tiles(attn_fwd_mma_kernel<T, D, DV, false, RM>, "attentionForward", P, blocks, 1,
                 fwd_mma_smem<T, D, DV, false, RM>(), s);
  }
}
template <typename T, int D, int DV>
void forward_mma_cfg(const Params& P, cudaStream_t s) {
  if (fwd_mtiles_per_warp() == 2) forward_mma_rows<T, D, DV, 2>(P, s);
  else forward_mma_rows<T, D, DV, 1>(P, s);
}
// true when the tensor-core kernel took the launch
template <typename T>
bool forward_mma(const Params& P, cudaStream_t s) {
  if constexpr (!kHalf16<T>) {
    (void)P;
    (void)s;
    return false;
  } else {
    const int hd = mma_head_dims(P);
    if (hd == 0 || !mma_allowed() || !device_has_mma()) return false;
    if (hd == 1) forward_mma_cfg<T, 64, 64>(P, s);
    else if (hd == 2) forward_mma_cfg<T, 64, 128>(P, s);
    else if (hd == 3) forward_mma_cfg<T, 128, 64>(P, s);
    else if (hd == 4) forward_mma_cfg<T, 128, 128>(P, s);
    else forward_mma_cfg<T, 192, 128>(P, s);
    return true;
  }
}

template <typename T>
void forward_typed(const Params& P, cudaStream_t s) {
  if (forward_mma<T>(P, s)) return;
  if (P.Dv <= 64 && fwd_smem<T, 4, 8, 64>(P) <= kMaxSmem) forward_cfg<T, 4, 8, 64>(P, s);
  else if (P.Dv <= 128 && fwd_smem<T, 4, 4, 128>(P) <= kMaxSmem) forward_cfg<T, 4, 4, 128>(P, s);
  else forward_cfg<T, 2, 4, 256>(P, s);
}

// Stream-ordered workspace. The emulator runs launches synchronously and has no memory pools:
// plain cudaMalloc / cudaFree are equivalent there.
inline void* workspace_alloc(size_t bytes, cudaStream_t stream) {
  void* w = nullptr;
#ifdef MEGAPATCH_CUDA_EMULATOR
  (void)stream;
  check(cudaMalloc(&w, bytes), "attention: workspace");
#else
  check(cudaMallocAsync(&w, bytes, stream), "attention: workspace");
#endif
  return w;
}
inline void workspace_free(void* w, cudaStream_t stream) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  (void)stream;
  check(cudaFree(w), "attention: workspace");
#else
  check(cudaFreeAsync(w, stream), "attention: workspace");
#endif
}

// Tiles of the backward, sized so the fp32 accumulators fit the 255 registers of a thread: the
// dk/dv kernel keeps (D + Dv) / 2 accumulators per lane besides 4 BQ / 8 for S^T and dP^T, the dq
// kernel D / 2 besides BC / 2 for S and dP.
template <typename T, int D, int DV>
constexpr int bwd_mma_bq() {
  return D + DV > 256 ? 16 : D + DV > 128 ? 32 : 64;  // queries per dk/dv tile
}
template <typename T, int D, int DV>
constexpr int bwd_mma_bc() {
  return D > 128 ? 32 : kMmaBC;  // keys per dq tile
}
template <typename T, int D, int DV, bool PIPE, bool DQ = false, size_t BQ = bwd_mma_bq<T, D, DV>(), size_t NWG = 1,
          size_t NL = 1>
size_t dkdv_mma_smem() {
  constexpr size_t nbuf = PIPE ? 2 : 1;
  return sizeof(uint16_t) * (kMmaBR * NWG + nbuf * BQ) * (D + kMmaPad + DV + kMmaPad) +
         NL * BQ * (2 * sizeof(float) + 2 * sizeof(int64_t)) + (DQ ? sizeof(uint16_t) * kMmaBR * (BQ + kMmaPad) : 0);
}
// MEGAPATCH_ATTENTION_BWD=fused: the tensor-core backward in one pass over the key tiles, dQ
// added up with atomics (FlashAttention-2's way), instead of the deterministic dk/dv and dq pair.
inline bool bwd_fused() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_BWD");
  return e && std::strcmp(e, "fused") == 0;
}
// ---- dq beside dk/dv ---------------------------------------------------------------------------
// The dq kernel does not depend on the dk/dv kernel (both read q, k, v, dO, lse and delta and write
// their own outputs), so by default it runs on a second stream of the device, forked from the
// caller's stream after the delta pass and joined back before the backward returns (events, no
// host wait): its short blocks fill the SMs that the dk/dv kernel's last wave leaves idle.
// MEGAPATCH_ATTENTION_BWD_STREAMS=1 keeps both on the caller's stream (the results are the same
// bits either way: every output element is written by one kernel).
inline bool bwd_two_streams() {
  const char* e = std::getenv("MEGAPATCH_ATTENTION_BWD_STREAMS");
  return !(e && std::strcmp(e, "1") == 0);
}
struct SideStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
};
// the current device's side stream and its two events, made on first use and kept
inline SideStream& side_stream() {
  return per_current_device<SideStream>("attentionBackward", [](SideStream& ss) {
    check(cudaStreamCreateWithFlags(&ss.stream, cudaStreamNonBlocking), "attentionBackward: side stream");
    check(cudaEventCreateWithFlags(&ss.fork, cudaEventDisableTiming), "attentionBackward: event");
    check(cudaEventCreateWithFlags(&ss.join, cudaEventDisableTiming), "attentionBackward: event");
  });
}

template <typename T, int D, int DV, bool PIPE, size_t NWG = 1>
size_t dq_mma_smem() {
  constexpr size_t nbuf = PIPE ? 2 : 1;
  return sizeof(uint16_t) * (kMmaBR * NWG + nbuf * bwd_mma_bc<T, D, DV>()) * (D + kMmaPad + DV + kMmaPad);
}
// The warp-specialised wgmma dQ (D + Dv <= 128: the consumers' 232 registers; not instantiated
// elsewhere): 128 queries a block, a loader warpgroup and two consumers.
// Whether it launched (see ws_registers_fit).
template <typename T, int D, int DV, int BC>
bool dq_warp_specialised(Params Pq, cudaStream_t s) {
  if constexpr (D + DV <= 128) {
    auto ws = attn_dq_mma_kernel<T, D, DV, BC, true, 1, true, 2, true>;
    if (!ws_registers_fit<40, 232>(ws)) return false;
    Pq.ntiles = cdiv(Pq.Sq, 2 * kMmaBR);
    launch_tiles(ws, "attentionBackward (dq)", Pq, Pq.B * Pq.Hq * Pq.ntiles, 1, dq_mma_smem<T, D, DV, true, 2>(), s,
                 3 * kAttThreads);
    return true;
  }
  return false;
}
template <typename T, int D, int DV>
void backward_mma_cfg(Params P, cudaStream_t s) {
  P.vec = (rows_aligned16(P.q, D) ? 1 : 0) | (rows_aligned16(P.k, D) ? 2 : 0) | (rows_aligned16(P.v, DV) ? 4 : 0) |
          (rows_aligned16(P.go, DV) ? 8 : 0);
  Params Pk = P;
  Pk.ntiles = cdiv(P.Sk, kMmaBR);
  constexpr int BQ = bwd_mma_bq<T, D, DV>();
  const bool pipe = pipeline_allowed();
  if (bwd_fused()) {
    const size_t acc_bytes = static_cast<size_t>(P.B * P.Hq * P.Sq * D) * sizeof(float);
    void* acc = workspace_alloc(mx(acc_bytes, size_t(4)), s);
    try {
      check(cudaMemsetAsync(acc, 0, acc_bytes, s), "attentionBackward: dQ accumulator");
      Pk.dqacc = acc;
      if ((P.vec & 9) == 9 && pipe) {
        launch_tiles(attn_dkdv_mma_kernel<T, D, DV, BQ, true, true>, "attentionBackward (fused)", Pk,
                     P.B * P.Hkv * Pk.ntiles, 1, dkdv_mma_smem<T, D, DV, true, true>(), s);
      } else {
        launch_tiles(attn_dkdv_mma_kernel<T, D, DV, BQ, false, true>, "attentionBackward (fused)", Pk,
                     P.B * P.Hkv * Pk.ntiles, 1, dkdv_mma_smem<T, D, DV, false, true>(), s);
      }
      const int64_t n = P.B * P.Hq * P.Sq * D;
      if (n > 0) {
        auto k = attn_dq_convert_kernel<T>;
        MP_LAUNCH(k, dim3(grid_for(n)), dim3(kThreads), 0, s, Pk);
        check_launch("attentionBackward (dq convert)");
      }
    } catch (...) {
      workspace_free(acc, s);
      throw;
    }
    workspace_free(acc, s);
    return;
  }
  // dq on the side stream (see bwd_two_streams), forked here (after the delta pass, before dk/dv)
  // and launched after dk/dv: the longest blocks first
  SideStream* side = bwd_two_streams() ? &side_stream() : nullptr;
  cudaStream_t sq = s;
  if (side) {
    check(cudaEventRecord(side->fork, s), "attentionBackward: fork");
    check(cudaStreamWaitEvent(side->stream, side->fork, 0), "attentionBackward: fork");
    sq = side->stream;
  }
  // the measuring variants exist for D + Dv <= 128 only (elsewhere the template arguments below
  // name the default kernel: no other instantiation)
  constexpr bool small = D + DV <= 128;
  constexpr int BQ32 = small ? 32 : BQ, MINB = small ? 3 : 0;
  const int wgn = pipe && device_has_wgmma() ? wgmma_bwd_wanted() : 0;  // warpgroups a block
  constexpr bool wg_dims = (D == 64 || D == 128) && (DV == 64 || DV == 128);
  if (wg_dims && BQ == 64 && wgn != 0 && (P.vec & 9) == 9) {
    if constexpr (wg_dims && BQ == 64) {
      auto ws = attn_dkdv_mma_kernel<T, D, DV, BQ, true, false, 1, true, 2, true>;
      if ((wgn & kBwdWsDkdv) && ws_registers_fit<56, 224>(ws)) {
        Params Pk2 = Pk;
        Pk2.ntiles = cdiv(P.Sk, 2 * kMmaBR);
        launch_tiles(ws, "attentionBackward (dk, dv)", Pk2, P.B * P.Hkv * Pk2.ntiles, 1,
                     dkdv_mma_smem<T, D, DV, true, false, BQ, 2, 2>(), s, 3 * kAttThreads);
      } else if (wgn >= 2) {
        Params Pk2 = Pk;
        Pk2.ntiles = cdiv(P.Sk, 2 * kMmaBR);
        launch_tiles(attn_dkdv_mma_kernel<T, D, DV, BQ, true, false, 0, true, 2>, "attentionBackward (dk, dv)",
                     Pk2, P.B * P.Hkv * Pk2.ntiles, 1, dkdv_mma_smem<T, D, DV, true, false, BQ, 2>(), s,
                     2 * kAttThreads);
      } else {
        launch_tiles(attn_dkdv_mma_kernel<T, D, DV, BQ, true, false, 0, true>, "attentionBackward (dk, dv)", Pk,
                     P.B * P.Hkv * Pk.ntiles, 1, dkdv_mma_smem<T, D, DV, true>(), s);
      }
    }
  } else if (small && (P.vec & 9) == 9 && pipe && dkdv_bq32()) {
    launch_tiles(attn_dkdv_mma_kernel<T, D, DV, BQ32, true>, "attentionBackward (dk, dv)", Pk,
                 P.B * P.Hkv * Pk.ntiles, 1, dkdv_mma_smem<T, D, DV, true, false, BQ32>(), s);
  } else if (small && (P.vec & 9) == 9 && pipe && attention_occupancy()) {
    launch_tiles(attn_dkdv_mma_kernel<T, D, DV, BQ, true, false, MINB>, "attentionBackward (dk, dv)", Pk,
                 P.B * P.Hkv * Pk.ntiles, 1, dkdv_mma_smem<T, D, DV, true>(), s);
  } else if ((P.vec & 9) == 9 && pipe) {
    launch_tiles(attn_dkdv_mma_kernel<T, D, DV, BQ, true>, "attentionBackward (dk, dv)", Pk,
                 P.B * P.Hkv * Pk.ntiles, 1, dkdv_mma_smem<T, D, DV, true>(), s);
  } else {
    launch_tiles(attn_dkdv_mma_kernel<T, D, DV, BQ, false>, "attentionBackward (dk, dv)", Pk,
                 P.B * P.Hkv * Pk.ntiles, 1, dkdv_mma_smem<T, D, DV, false>(), s);
  }
  Params Pq = P;
  Pq.ntiles = cdiv(P.Sq, kMmaBR);
  constexpr int BC = bwd_mma_bc<T, D, DV>();
  constexpr int DQ_MINB = small ? 4 : 0;
  // the caller's stream waits for the side stream's work, whatever happened to the launch
  auto join = [&]() {
    if (!side) return;
    check(cudaEventRecord(side->join, sq), "attentionBackward: join");
    check(cudaStreamWaitEvent(s, side->join, 0), "attentionBackward: join");
  };
  try {
    // (not for D = Dv = 128: Q's and dO's fragments in registers take it to 255 and spills)
    constexpr bool wg_dq = wg_dims && BC == 64 && D + DV <= 192;
    if (wg_dq && wgn != 0 && (P.vec & 6) == 6) {
      if constexpr (wg_dq) {
        if (small && (wgn & kBwdWsDq) && dq_warp_specialised<T, D, DV, BC>(Pq, sq)) {
          // launched
        } else if (wgn >= 2) {
          Params Pq2 = Pq;
          Pq2.ntiles = cdiv(P.Sq, 2 * kMmaBR);
          launch_tiles(attn_dq_mma_kernel<T, D, DV, BC, true, 0, true, 2>, "attentionBackward (dq)", Pq2,
                       P.B * P.Hq * Pq2.ntiles, 1, dq_mma_smem<T, D, DV, true, 2>(), sq, 2 * kAttThreads);
        } else {
          launch_tiles(attn_dq_mma_kernel<T, D, DV, BC, true, 0, true>, "attentionBackward (dq)", Pq,
                       P.B * P.Hq * Pq.ntiles, 1, dq_mma_smem<T, D, DV, true>(), sq);
        }
      }
    } else if (small && (P.vec & 6) == 6 && pipe && dq_occupancy()) {
      launch_tiles(attn_dq_mma_kernel<T, D, DV, BC, true, DQ_MINB>, "attentionBackward (dq)", Pq,
                   P.B * P.Hq * Pq.ntiles, 1, dq_mma_smem<T, D, DV, true>(), sq);
    } else if ((P.vec & 6) == 6 && pipe) {
      launch_tiles(attn_dq_mma_kernel<T, D, DV, BC, true>, "attentionBackward (dq)", Pq, P.B * P.Hq * Pq.ntiles, 1,
                   dq_mma_smem<T, D, DV, true>(), sq);
    } else {
      launch_tiles(attn_dq_mma_kernel<T, D, DV, BC, false>, "attentionBackward (dq)", Pq, P.B * P.Hq * Pq.ntiles, 1,
                   dq_mma_smem<T, D, DV, false>(), sq);
    }
  } catch (...) {
    join();
    throw;
  }
  join();
}
// The tensor-core launches of each head-dim pair are instantiated in their own translation unit
// (attention_mma_*.cu), so that nvcc compiles them side by side: declared here, not instantiated.
extern template void forward_mma_cfg<bf16, 64, 64>(const Params& P, cudaStream_t s);
extern template void backward_mma_cfg<bf16, 64, 64>(Params P, cudaStream_t s);
extern template void forward_mma_cfg<bf16, 64, 128>(const Params& P, cudaStream_t s);
extern template void backward_mma_cfg<bf16, 64, 128>(Params P, cudaStream_t s);
extern template void forward_mma_cfg<bf16, 128, 64>(const Params& P, cudaStream_t s);
extern template void backward_mma_cfg<bf16, 128, 64>(Params P, cudaStream_t s);
extern template void forward_mma_cfg<bf16, 128, 128>(const Params& P, cudaStream_t s);
extern template void backward_mma_cfg<bf16, 128, 128>(Params P, cudaStream_t s);
extern template void forward_mma_cfg<bf16, 192, 128>(const Params& P, cudaStream_t s);
extern template void backward_mma_cfg<bf16, 192, 128>(Params P, cudaStream_t s);
extern template void forward_mma_cfg<f16, 64, 64>(const Params& P, cudaStream_t s);
extern template void backward_mma_cfg<f16, 64, 64>(Params P, cudaStream_t s);
extern template void forward_mma_cfg<f16, 64, 128>(const Params& P, cudaStream_t s);
extern template void backward_mma_cfg<f16, 64, 128>(Params P, cudaStream_t s);
extern template void forward_mma_cfg<f16, 128, 64>(const Params& P, cudaStream_t s);
extern template void backward_mma_cfg<f16, 128, 64>(Params P, cudaStream_t s);
extern template void forward_mma_cfg<f16, 128, 128>(const Params& P, cudaStream_t s);
extern template void backward_mma_cfg<f16, 128, 128>(Params P, cudaStream_t s);
extern template void forward_mma_cfg<f16, 192, 128>(const Params& P, cudaStream_t s);
extern template void backward_mma_cfg<f16, 192, 128>(Params P, cudaStream_t s);

// true when the tensor-core kernels took the dk/dv and dq launches
template <typename T>
bool backward_mma(const Params& P, cudaStream_t s) {
  if constexpr (!kHalf16<T>) {
    (void)P;
    (void)s;
    return false;
  } else {
    const int hd = mma_head_dims(P);
    if (hd == 0 || !mma_allowed() || !device_has_mma()) return false;
    if (hd == 1) backward_mma_cfg<T, 64, 64>(P, s);
    else if (hd == 2) backward_mma_cfg<T, 64, 128>(P, s);
    else if (hd == 3) backward_mma_cfg<T, 128, 64>(P, s);
    else if (hd == 4) backward_mma_cfg<T, 128, 128>(P, s);
    else backward_mma_cfg<T, 192, 128>(P, s);
    return true;
  }
}

template <typename T>
void backward_typed(Params P, cudaStream_t s) {
  using C = typename Tr<T>::C;
  const int64_t rows = P.B * P.Hq * P.Sq;
  void* ws = nullptr;
  if (rows > 0) {
    ws = workspace_alloc(static_cast<size_t>(rows) * sizeof(C), s);
    P.delta = ws;
    bool vec = false;
    if constexpr (kHalf16<T>) {
      vec = P.Dv % 8 == 0 && rows_aligned16(P.go, P.Dv) && rows_aligned16(P.o, P.Dv);
      if (vec) {
        auto k = attn_delta_vec_kernel<T>;
        MP_LAUNCH(k, dim3(grid_for(rows * 8, kAttThreads)), dim3(kAttThreads), 0, s, P);
      }
    }
    if (!vec) {
      auto k = attn_delta_kernel<T>;
      MP_LAUNCH(k, dim3(grid_for(rows * 32, kAttThreads)), dim3(kAttThreads), 0, s, P);
    }
    check_launch("attentionBackward (delta)");
  }
  try {
    if (!backward_mma<T>(P, s)) {
      const int w = mx(P.D, P.Dv);
      if (w <= 64 && dkdv_smem<T, 4, 4, 64>(P) <= kMaxSmem) dkdv_cfg<T, 4, 4, 64>(P, s);
      else if (w <= 128 && dkdv_smem<T, 2, 4, 128>(P) <= kMaxSmem) dkdv_cfg<T, 2, 4, 128>(P, s);
      else dkdv_cfg<T, 1, 4, 256>(P, s);
      if (P.D <= 64 && dq_smem<T, 4, 8, 64>(P) <= kMaxSmem) dq_cfg<T, 4, 8, 64>(P, s);
      else if (P.D <= 128 && dq_smem<T, 4, 4, 128>(P) <= kMaxSmem) dq_cfg<T, 4, 4, 128>(P, s);
      else dq_cfg<T, 2, 2, 256>(P, s);
    }
  } catch (...) {
    if (ws) workspace_free(ws, s);
    throw;
  }
  if (ws) workspace_free(ws, s);
}

}  // namespace att
}  // namespace mpc
