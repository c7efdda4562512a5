// The tensor-core grouped GEMM (MEGAPATCH_GROUPED_GEMM=mma): every 128 x 128 output tile of every
// product of a grouped GEMM in one launch, on mma.sync m16n8k16 (sm_80+, bf16 / f16 inputs, fp32
// accumulators). cuBLASLt has no grouped mode (its batches share one shape) and a MoE layer's
// experts are small products: one GEMM per expert leaves most SMs idle (run a on an H200: 317
// and 181 TFLOP/s for a 64-expert layer's products against 696 for 8 experts), so the tiles of all
// experts share one grid here.
//
// A block (8 warps, 2 x 4, each 64 x 32 of the tile) walks K in steps of 32 through a 4-stage
// cp.async pipeline: A's and B's 128 x 32 slices in shared memory in their global layout (the
// operand's unit-stride dimension contiguous), 16-byte chunks XOR-swizzled so that ldmatrix reads
// them without bank conflicts; ldmatrix (.trans for an M-fast A or an N-fast B) gives the mma
// fragments for all four layouts of A (K- or M-fast) and B (K- or N-fast): the forward x W^T, the
// input gradient dY W and the weight gradient dY^T x of a grouped linear layer.
// The accumulators are rounded once into C (round to nearest even), two columns a store.
// MEGAPATCH_GROUPED_GEMM=wgmma runs the same tiles, ring and A slices on sm_90a's wgmma (below),
// B kept in wgmma's core-matrix layout instead.
//
// What it takes (else the caller's loop runs the problem): bf16 / f16; each operand with a unit
// stride in one of its matrix dimensions, the other stride a multiple of 8 elements, that
// dimension's extent a multiple of 8 (whole 16-byte chunks) and a 16-byte aligned base; a device
// of compute capability 8.0 or more running code compiled for it. The emulator runs the same code
// (mma.cuh emulates ldmatrix, mma.sync and cp.async): each output there is c + a_0 b_0 + ... in k
// order in fp32, with exact 16-bit products, the tiled gemm's bits exactly.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "gemm.h"
#include "gemm_sized.cuh"
#include "mma.cuh"

namespace mpc {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kWarps = 8, kNT = 32 * kWarps;
constexpr int kSlice = kBM * kBK;                             // elements of one operand's stage (BM == BN)
constexpr size_t kSmem = size_t(kStages) * 2 * kSlice * 2;  // bytes: 64 KiB
// the wgmma kernel's ring: 5 slots, k-tiles loaded 3 ahead (a slot is refilled two k-tiles after
// its read, once its wgmmas are waited for; the next k-tile's wgmmas may still run)
constexpr int kStagesW = 5, kAheadW = kStagesW - 2;
static_assert(kBM == kBN, "A's and B's slices share a layout");

// One problem as the device reads it (uploaded with upload_words): operands, the stride that is not
// 1 of each (ld*), which dimension has the unit stride, and its first tile in the launch's numbering
// (a problem's tiles: n fastest over its ntiles_n).
struct MmaEntry {
  const char* a;
  const char* b;
  char* c;
  int64_t M, N, K, lda, ldb, ldc, a_mfast, b_nfast, pairs, tile_start, ntiles_n;
};
static_assert(sizeof(MmaEntry) % 8 == 0, "MmaEntry is uploaded as 64-bit words");

// Element offsets in a stage's slice. K-fast: 128 rows (m or n) of 32 k, 4 chunks of 8 a row, chunk
// c stored at c ^ ((r >> 1) & 3): the 8 rows an ldmatrix reads (a 16-byte chunk each) fall in 8
// different 16-byte bank groups. MN-fast: 32 rows (k) of 128, 16 chunks a row, chunk c at c ^ (r & 7).
MP_D int off_kfast(int r, int k) { return r * kBK + ((((k >> 3) ^ (r >> 1)) & 3) << 3) + (k & 7); }
MP_D int off_mnfast(int k, int r) { return k * kBM + (((r >> 3) ^ (k & 7)) << 3) + (r & 7); }

// Byte offset of chunk (row r of the operand's tile dimension, k) in wgmma's core-matrix layout
// (mma.cuh), no swizzle: K-fast (a K-major B: 8 rows x 16 bytes of k a core matrix; LBO 128 to the
// next 8 k, SBO 512 to the next 8 rows) or MN-fast (an MN-major B of ROWS columns: 8 k x 16 bytes of
// rows; SBO 128 to the next 8 rows, LBO 16 ROWS to the next 8 k).
MP_D int cm_kfast(int r, int k) { return (k >> 3) * 128 + (r >> 3) * 512 + (r & 7) * 16; }
template <int ROWS> MP_D int cm_mnfast(int k, int r) { return (k >> 3) * (ROWS * 16) + (r >> 3) * 128 + (k & 7) * 16; }

// This thread's 16-byte chunks of one operand's slice of ROWS rows (m or n) x 32 k (ROWS / 64 of
// them): where they land in the slice (bytes), where they start in global memory at k-tile 0 and
// how far they move a k-tile, and what must hold for each to be inside the operand (row < R,
// k < K; else it lands as zeros). K-fast: chunk q is row q / 4, k 8 (q % 4); MN-fast: k q / 16,
// rows 8 (q % 16), or with CM (the core-matrix layout) k 8 (q / ROWS) + q % 8, rows
// 8 ((q / 8) % (ROWS / 8)), so that a warp's 32 chunks land in 32 different bank slots there too.
// The thread's next chunk (q + 256) is 64 rows (K-fast) or kDk k (MN-fast) on: 4096 bytes on in
// the slice in every layout. The swizzled (not CM) slices are 128 rows.
template <typename T, bool MNF, bool CM = false, int ROWS = kBM> struct SliceLoader {
  static constexpr int kChunks = ROWS / 64, kDk = CM ? 2048 / ROWS : 16;
  static_assert(CM || ROWS == kBM, "the swizzled slices are 128 rows");
  const T* src[kChunks];
  int dst, kpos;
  bool row_ok[kChunks];
  int64_t step;

  MP_D SliceLoader(const T* g, int64_t ld, int64_t R, int64_t r0, int tid) {
    step = MNF ? int64_t(kBK) * ld : int64_t(kBK);
    const int r = MNF ? (CM ? ((tid >> 3) % (ROWS / 8)) << 3 : (tid & 15) << 3) : tid >> 2;
    const int k = MNF ? (CM ? (tid / ROWS) * 8 + (tid & 7) : tid >> 4) : (tid & 3) << 3;
    dst = CM ? (MNF ? cm_mnfast<ROWS>(k, r) : cm_kfast(r, k)) : 2 * (MNF ? off_mnfast(k, r) : off_kfast(r, k));
    kpos = k;
    MP_UNROLL
    for (int i = 0; i < kChunks; i++) {
      const int64_t gr = r0 + r + (MNF ? 0 : 64 * i), gk = k + (MNF ? kDk * i : 0);
      row_ok[i] = gr < R;
      src[i] = g + (row_ok[i] ? (MNF ? gk * ld + gr : gr * ld + gk) : 0);
    }
  }
  // starts the copies of the next k-tile (the first at the first call) into `slice`; krem: K less
  // the k-tile's first k
  MP_D void load(SmemAddr slice, int krem) {
    MP_UNROLL
    for (int i = 0; i < kChunks; i++) {
      cp_async16_zfill(slice + dst + 4096 * i, src[i], row_ok[i] && kpos + (MNF ? kDk * i : 0) < krem);
      src[i] += step;
    }
  }
};
static_assert(64 * 2 * kBK == 4096 && 16 * 2 * kBM == 4096 && 8 * 512 == 4096 && 2 * 2048 == 4096 && 4096 == 256 * 16,
              "a thread's next chunk is 4096 bytes on");

// Starts the copies of k-tile kt (if there is one) into a ring slot (A's slice, then B's) and
// closes this thread's commit group (empty past the last k-tile, so that the waits count alike).
template <typename LA, typename LB> MP_D void ring_fill(LA& la, LB& lb, SmemAddr slot, int kt, int ktiles, int k32) {
  if (kt < ktiles) {
    la.load(slot, k32 - kt * kBK);
    lb.load(slot + 2 * kSlice, k32 - kt * kBK);
  }
  cp_async_commit();
}

// Tile t of the launch (tile_start ascending): its problem, by binary search, and its origin in
// that problem's C (tiles of 128 rows x BN columns, n fastest).
struct TileAt {
  const MmaEntry& e;
  int64_t m0, n0;
};
template <int BN> MP_D TileAt tile_at(const MmaEntry* table, int64_t count, int64_t t) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid].tile_start <= t) lo = mid;
    else hi = mid - 1;
  }
  const MmaEntry& e = table[lo];
  const int64_t local = t - e.tile_start;
  return TileAt{e, (local / e.ntiles_n) * kBM, (local % e.ntiles_n) * BN};
}

// C's elements col and col + 1 of a row (p: the first), those below N, rounded once; one 32-bit
// store where both are and `pairs` (C's row stride even, its base 4-byte aligned).
template <typename T> MP_D void store2(T* p, int64_t col, int64_t N, bool pairs, float v0, float v1) {
  if (col + 1 < N && pairs) {
    *reinterpret_cast<uint32_t*>(p) = pack2<T>(v0, v1);
  } else {
    if (col < N) Tr<T>::st(p, v0);
    if (col + 1 < N) Tr<T>::st(p + 1, v1);
  }
}

// Every 128 x 128 tile of the table's problems whose layouts are (AMF: A M-fast, else K-fast;
// BNF: B N-fast, else K-fast).
template <typename T, bool AMF, bool BNF>
__global__ void __launch_bounds__(kNT, 2)
    gemm_grouped_mma_kernel(const MmaEntry* table, int64_t count, int64_t total_tiles, const int64_t* total_dev) {
  MP_DYNAMIC_SMEM(T, smem);
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;  // the warp's 64 x 32 of the tile
  // this lane's ldmatrix rows within the slices (matrix lane >> 3, its row lane & 7), in bytes:
  // a[0..3] of an A fragment are (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15);
  // the registers of a B load (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
  // K-fast: the 16 rows of the next fragment are 16 * 64 bytes on (their swizzle is the same), the
  // second k-step flips chunk bit 1 (another base); MN-fast: the next fragment's chunks are
  // swizzled differently (a base each), the second k-step is 16 rows (16 * 256 bytes) on.
  const int lr = lane & 7, lm = lane >> 3;
  constexpr int kRowK = 2 * kBK, kRowMN = 2 * kBM;  // bytes of a K-fast and an MN-fast row
  int abase[AMF ? 4 : 2], bbase[2];
  if constexpr (AMF) {
    MP_UNROLL
    for (int mi = 0; mi < 4; mi++) abase[mi] = 2 * off_mnfast(lr + (lm >> 1) * 8, wm * 64 + mi * 16 + (lm & 1) * 8);
  } else {
    MP_UNROLL
    for (int h = 0; h < 2; h++) abase[h] = 2 * off_kfast(wm * 64 + lr + (lm & 1) * 8, 16 * h + (lm >> 1) * 8);
  }
  MP_UNROLL
  for (int x = 0; x < 2; x++)
    bbase[x] = BNF ? 2 * off_mnfast(lr + (lm & 1) * 8, wn * 32 + x * 16 + (lm >> 1) * 8)  // x: the 16 columns
                   : 2 * off_kfast(wn * 32 + lr + (lm >> 1) * 8, 16 * x + (lm & 1) * 8);  // x: the k-step
  // byte offsets of fragment mi (nj) at k-step h
  auto aoff = [&](int mi, int h) { return AMF ? abase[mi] + h * 16 * kRowMN : abase[h] + mi * 16 * kRowK; };
  auto boff = [&](int nj, int h) { return BNF ? bbase[nj] + h * 16 * kRowMN : bbase[h] + nj * 16 * kRowK; };
  const SmemAddr sm = smem_at(smem);
  constexpr int kSlot = 2 * 2 * kSlice;  // bytes of a ring slot: A's slice, then B's

  if (total_dev) total_tiles = *total_dev;  // planned on the device (gemm_sized.cuh)
  for (int64_t t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    const TileAt at = tile_at<kBN>(table, count, t);
    const MmaEntry& e = at.e;
    const int64_t m0 = at.m0, n0 = at.n0;
    const int64_t M = e.M, N = e.N, K = e.K;
    SliceLoader<T, AMF> la(reinterpret_cast<const T*>(e.a), e.lda, M, m0, tid);
    SliceLoader<T, BNF> lb(reinterpret_cast<const T*>(e.b), e.ldb, N, n0, tid);

    float acc[4][4][4];
    MP_UNROLL
    for (int i = 0; i < 4; i++)
      MP_UNROLL
      for (int j = 0; j < 4; j++)
        MP_UNROLL
        for (int v = 0; v < 4; v++) acc[i][j][v] = 0.0f;

    const int ktiles = static_cast<int>((K + kBK - 1) / kBK), k32 = static_cast<int>(K);  // K < 2^31
    MP_UNROLL
    for (int s = 0; s < kStages - 1; s++) ring_fill(la, lb, sm + s * kSlot, s, ktiles, k32);
    int rd = 0, wr = kStages - 1;  // the slots read and filled this iteration
    for (int kt = 0; kt < ktiles; kt++) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // k-tile kt landed for all; slot wr (read at kt - 1) is free
      ring_fill(la, lb, sm + wr * kSlot, kt + kStages - 1, ktiles, k32);
      const SmemAddr as = sm + rd * kSlot, bs = as + 2 * kSlice;
      MP_UNROLL
      for (int h = 0; h < kBK / 16; h++) {
        uint32_t bf[4][2];
        MP_UNROLL
        for (int nj = 0; nj < 2; nj++) {
          uint32_t r[4];
          if (BNF) ldsm_x4_trans(r, bs + boff(nj, h));
          else ldsm_x4(r, bs + boff(nj, h));
          bf[2 * nj][0] = r[0];
          bf[2 * nj][1] = r[1];
          bf[2 * nj + 1][0] = r[2];
          bf[2 * nj + 1][1] = r[3];
        }
        MP_UNROLL
        for (int mi = 0; mi < 4; mi++) {
          uint32_t af[4];
          if (AMF) ldsm_x4_trans(af, as + aoff(mi, h));
          else ldsm_x4(af, as + aoff(mi, h));
          MP_UNROLL
          for (int ni = 0; ni < 4; ni++) mma_m16n8k16<T>(acc[mi][ni], af, bf[ni], acc[mi][ni]);
        }
      }
      rd = rd == kStages - 1 ? 0 : rd + 1;
      wr = wr == kStages - 1 ? 0 : wr + 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the slices before the next tile's copies

    T* C = reinterpret_cast<T*>(e.c);
    const int g = lane >> 2, q = lane & 3;
    MP_UNROLL
    for (int mi = 0; mi < 4; mi++)
      MP_UNROLL
      for (int h = 0; h < 2; h++) {
        const int64_t r = m0 + wm * 64 + mi * 16 + g + 8 * h;
        if (r >= M) continue;
        MP_UNROLL
        for (int ni = 0; ni < 4; ni++) {
          const int64_t col = n0 + wn * 32 + ni * 8 + 2 * q;
          store2(C + r * e.ldc + col, col, N, e.pairs != 0, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        }
      }
  }
}

// The tiles on wgmma (sm_90a; MEGAPATCH_GROUPED_GEMM=wgmma), 128 x BN (BN 128, or 256 with
// MEGAPATCH_GROUPED_WGMMA_N=256: a quarter fewer bytes read from L2 a FLOP): two warpgroups, each
// 64 rows x BN columns of the tile (acc: two halves of BN / 16 accumulator tiles of 8 columns, warp
// w of the warpgroup rows 16 w .. 16 w + 15, mma.sync's layout), A's fragments from its swizzled
// slice by ldmatrix as above (wgmma's register A), B from its slice in core matrices through a
// descriptor (K-major for a K-fast B, MN-major for an N-fast one): per k-tile of 32 a warpgroup
// issues 4 wgmma m64n(BN / 2)k16 (2 k-steps x 2 halves) as a group and lets it run while it waits
// at the next barrier and issues the next k-tile's (wgmma_wait<1>: the group before is done), so
// a ring slot and a buffer of A fragments are reused only two k-tiles after they were read
// (5 slots: 80 KiB, two blocks an SM, at BN 128; 120 KiB, one block, at 256).
template <int BN> constexpr int kSlotW = 2 * (kSlice + BN * kBK);  // bytes of a ring slot: A, then B
template <int BN> constexpr size_t kSmemW = size_t(kStagesW) * kSlotW<BN>;
template <typename T, bool AMF, bool BNF, int BN>
__global__ void __launch_bounds__(kNT, BN == 128 ? 2 : 1)
    gemm_grouped_wgmma_kernel(const MmaEntry* table, int64_t count, int64_t total_tiles, const int64_t* total_dev) {
  static_assert(BN == 128 || BN == 256, "128 or 256 columns a tile");
  // the warpgroup's columns as two halves of kHN, one wgmma m64nkHNk16 each a k-step (two even at BN
  // 128: issued as (half 0, k-step 0), (1, 0), (0, 1), (1, 1), so that ptxas keeps both k-steps'
  // A fragments in registers of their own; with one m64n128k16 a k-step it gave them the same
  // registers and serialised every wgmma, its warning C7513)
  constexpr int kHalves = 2, kHN = BN / 2;
  MP_DYNAMIC_SMEM(T, smem);
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int lr = lane & 7, lm = lane >> 3;
  const int rows = (warp >> 2) * 64 + (warp & 3) * 16;  // this warp's 16 rows of the tile
  constexpr int kRowMN = 2 * kBM;
  // this lane's ldmatrix row of the warp's A fragment at k-step h (as in the mma.sync kernel)
  int abase[2];
  MP_UNROLL
  for (int h = 0; h < 2; h++)
    abase[h] = AMF ? 2 * off_mnfast(lr + (lm >> 1) * 8, rows + (lm & 1) * 8) + h * 16 * kRowMN
                   : 2 * off_kfast(rows + lr + (lm & 1) * 8, 16 * h + (lm >> 1) * 8);
  const SmemAddr sm = smem_at(smem);
  constexpr int kSlot = kSlotW<BN>;
  // B's descriptor at the start of shared memory; a slot's k-step and second half of columns are a
  // constant number of 16 bytes on (the start address field does not carry: shared addresses / 16
  // stay below 2^14)
  const uint64_t desc0 = BNF ? wgmma_desc(smem, BN * 16, 128) : wgmma_desc(smem, 128, 512);
  constexpr uint64_t kStepDesc = (BNF ? 2 * BN * 16 : 2 * 128) / 16, kHalfDesc = (BNF ? kHN / 8 * 128 : kHN / 8 * 512) / 16;

  if (total_dev) total_tiles = *total_dev;  // planned on the device (gemm_sized.cuh)
  for (int64_t t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    const TileAt at = tile_at<BN>(table, count, t);
    const MmaEntry& e = at.e;
    const int64_t m0 = at.m0, n0 = at.n0;
    const int64_t M = e.M, N = e.N, K = e.K;
    SliceLoader<T, AMF> la(reinterpret_cast<const T*>(e.a), e.lda, M, m0, tid);
    SliceLoader<T, BNF, true, BN> lb(reinterpret_cast<const T*>(e.b), e.ldb, N, n0, tid);

    float acc[kHalves][kHN / 8][4];
    MP_UNROLL
    for (int x = 0; x < kHalves; x++)
      MP_UNROLL
      for (int j = 0; j < kHN / 8; j++)
        MP_UNROLL
        for (int v = 0; v < 4; v++) acc[x][j][v] = 0.0f;

    const int ktiles = static_cast<int>((K + kBK - 1) / kBK), k32 = static_cast<int>(K);
    MP_UNROLL
    for (int s = 0; s < kAheadW; s++) ring_fill(la, lb, sm + s * kSlot, s, ktiles, k32);
    // one k-tile: its A fragments into `af` (`prev`, the other buffer, may still be read by the
    // previous k-tile's wgmmas), its wgmmas issued as a group; returns once at most that group is
    // pending. The fragments are pinned (wgmma_fence_operands) until the wait that completes the
    // group reading them: to the compiler they are dead after the wgmma that takes them, and ptxas
    // would give the next fragments the same registers and serialise every wgmma (its warning
    // C7513) to make that safe.
    auto step = [&](int kt, uint32_t(&af)[2][4], uint32_t(&prev)[2][4]) {
      cp_async_wait<kAheadW - 1>();
      fence_proxy_async();  // this thread's copies, for wgmma
      __syncthreads();      // k-tile kt landed for all; every warpgroup waited for k-tile kt - 2's wgmmas
      ring_fill(la, lb, sm + ((kt + kAheadW) % kStagesW) * kSlot, kt + kAheadW, ktiles, k32);  // kt - 2's slot
      const int rd = kt % kStagesW;
      const SmemAddr as = sm + rd * kSlot;
      MP_UNROLL
      for (int h = 0; h < 2; h++) {
        if (AMF) ldsm_x4_trans(af[h], as + abase[h]);
        else ldsm_x4(af[h], as + abase[h]);
      }
      const uint64_t d = desc0 + static_cast<uint64_t>((rd * kSlot + 2 * kSlice) >> 4);
      wgmma_fence_operands(af);
      MP_UNROLL
      for (int x = 0; x < kHalves; x++) wgmma_fence_operands(acc[x]);
      wgmma_fence();
      MP_UNROLL
      for (int h = 0; h < 2; h++)
        MP_UNROLL
        for (int x = 0; x < kHalves; x++) wgmma_rs<T, kHN, BNF>(acc[x], af[h], d + h * kStepDesc + x * kHalfDesc, 1);
      wgmma_commit();
      wgmma_wait<1>();
      wgmma_fence_operands(prev);  // the previous group is done: its fragments may go now
    };
    uint32_t af0[2][4] = {}, af1[2][4] = {};
    for (int kt = 0; kt < ktiles; kt += 2) {
      step(kt, af0, af1);
      if (kt + 1 < ktiles) step(kt + 1, af1, af0);
    }
    wgmma_wait<0>();
    wgmma_fence_operands(af0);
    wgmma_fence_operands(af1);
    MP_UNROLL
    for (int x = 0; x < kHalves; x++) wgmma_fence_operands(acc[x]);
    cp_async_wait<0>();
    __syncthreads();

    T* C = reinterpret_cast<T*>(e.c);
    const int g = lane >> 2, q = lane & 3;
    MP_UNROLL
    for (int h = 0; h < 2; h++) {
      const int64_t r = m0 + rows + g + 8 * h;
      if (r >= M) continue;
      MP_UNROLL
      for (int x = 0; x < kHalves; x++)
        MP_UNROLL
        for (int j = 0; j < kHN / 8; j++) {
          const int64_t col = n0 + x * kHN + j * 8 + 2 * q;
          store2(C + r * e.ldc + col, col, N, e.pairs != 0, acc[x][j][2 * h], acc[x][j][2 * h + 1]);
        }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The entry of a problem the kernel takes, or false (see the file's comment).
bool mma_entry(const GemmProblem& p, MmaEntry& e) {
  e = MmaEntry{p.a.data, p.b.data, p.c.data, p.M, p.N, p.K, 0, 0, 0, 0, 0, 0, 0, 0};
  if (!aligned16(p.a.data) || !aligned16(p.b.data) || p.K > (int64_t(1) << 30)) return false;
  // A: element (m, k) at m * rs + k * cs
  if (p.a.cs == 1 && p.a.rs >= 0 && p.a.rs % 8 == 0 && p.K % 8 == 0) e.lda = p.a.rs;
  else if (p.a.rs == 1 && p.a.cs >= 0 && p.a.cs % 8 == 0 && p.M % 8 == 0) e.lda = p.a.cs, e.a_mfast = 1;
  else return false;
  // B: element (k, n) at k * rs + n * cs
  if (p.b.rs == 1 && p.b.cs >= 0 && p.b.cs % 8 == 0 && p.K % 8 == 0) e.ldb = p.b.cs;
  else if (p.b.cs == 1 && p.b.rs >= 0 && p.b.rs % 8 == 0 && p.N % 8 == 0) e.ldb = p.b.rs, e.b_nfast = 1;
  else return false;
  e.ldc = p.c.rs;
  e.pairs = (p.c.rs % 2 == 0 && reinterpret_cast<uintptr_t>(p.c.data) % 4 == 0) ? 1 : 0;
  return true;
}

// sm_80+ and the kernel compiled for it (a build for older architectures JIT-compiled on a newer
// GPU would run mma.cuh's shuffle emulation); per device, asked once.
bool device_runs_mma() {
#ifdef MEGAPATCH_CUDA_EMULATOR
  return true;
#else
  static std::atomic<int> known[64];  // 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  int k = known[dev].load();
  if (k == 0) {
    int major = 0;
    cudaFuncAttributes fa;
    bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 8 &&
              cudaFuncGetAttributes(&fa, gemm_grouped_mma_kernel<bf16, false, false>) == cudaSuccess && fa.ptxVersion >= 80;
    (void)cudaGetLastError();
    k = ok ? 2 : 1;
    known[dev].store(k);
  }
  return k == 2;
#endif
}

// The kernel of a launch: mma.sync (bn 0), or wgmma with tiles bn columns wide.
template <typename T, bool AMF, bool BNF> struct Pick {
  void (*kernel)(const MmaEntry*, int64_t, int64_t, const int64_t*);
  const char* name;
  size_t smem;
};
template <typename T, bool AMF, bool BNF> Pick<T, AMF, BNF> pick(int bn) {
  if (bn == 256) return {gemm_grouped_wgmma_kernel<T, AMF, BNF, 256>, "gemm_grouped_wgmma_kernel (n 256)", kSmemW<256>};
  if (bn == 128) return {gemm_grouped_wgmma_kernel<T, AMF, BNF, 128>, "gemm_grouped_wgmma_kernel", kSmemW<128>};
  return {gemm_grouped_mma_kernel<T, AMF, BNF>, "gemm_grouped_mma_kernel", kSmem};
}

// One launch for the entries of one layout: the table uploaded into scratch, then every tile.
// With a plan (device group sizes), the plan's kernel first completes the table there and `total`
// is the most tiles there can be (the kernel reads the real count).
template <typename T, bool AMF, bool BNF>
void launch_layout(cudaStream_t stream, int bn, const std::vector<MmaEntry>& table, int64_t total,
                   const SizedPlan* plan) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  constexpr int64_t kMaxBlocks = 3;  // few blocks: the grid-stride loop runs
#else
  constexpr int64_t kMaxBlocks = int64_t(1) << 30;
#endif
  const size_t bytes = table.size() * sizeof(MmaEntry);
  Scratch scratch(bytes + sizeof(int64_t), stream);
  upload_words(stream, reinterpret_cast<const uint64_t*>(table.data()), static_cast<int64_t>(bytes / sizeof(uint64_t)),
               scratch.at<uint64_t>());
  const int64_t* total_dev = nullptr;
  if (plan) {
    MP_LAUNCH((plan_sized_kernel<MmaEntry, kBM>), dim3(1), dim3(1), 0, stream, scratch.at<MmaEntry>(),
              static_cast<int64_t>(table.size()), *plan, scratch.at<int64_t>(bytes));
    check_launch("plan_sized_kernel");
    total_dev = scratch.at<const int64_t>(bytes);
  }
  const Pick<T, AMF, BNF> k = pick<T, AMF, BNF>(bn);
  check(cudaFuncSetAttribute(k.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(k.smem)), k.name);
  MP_LAUNCH(k.kernel, dim3(static_cast<unsigned>(mn(total, kMaxBlocks))), dim3(kNT), k.smem, stream,
            scratch.at<const MmaEntry>(), static_cast<int64_t>(table.size()), total, total_dev);
  check_launch(k.name);
}

template <typename T>
void launch_layout(cudaStream_t stream, int bn, int layout, const std::vector<MmaEntry>& t, int64_t n,
                   const SizedPlan* plan = nullptr) {
  switch (layout) {
    case 0: launch_layout<T, false, false>(stream, bn, t, n, plan); break;
    case 1: launch_layout<T, false, true>(stream, bn, t, n, plan); break;
    case 2: launch_layout<T, true, false>(stream, bn, t, n, plan); break;
    default: launch_layout<T, true, true>(stream, bn, t, n, plan); break;
  }
}

// MEGAPATCH_GROUPED_WGMMA_N: the wgmma kernel's tile width, 128 (default) or 256.
int wgmma_tile_n() {
  static const int n = [] {
    const char* v = std::getenv("MEGAPATCH_GROUPED_WGMMA_N");
    const std::string s = v ? v : "";
    if (s.empty() || s == "128") return 128;
    if (s == "256") return 256;
    throw_error("groupedGemm: MEGAPATCH_GROUPED_WGMMA_N must be 128 or 256, got '" + s + "'");
  }();
  return n;
}

}  // namespace

std::vector<GemmProblem> grouped_mma(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps,
                                     bool wgmma) {
  if ((dtype != DType::BF16 && dtype != DType::F16) || ps.empty() || !device_runs_mma()) return ps;
  const int bn = wgmma && device_has_wgmma() ? wgmma_tile_n() : 0;  // 0: mma.sync, 128 x 128
  const int64_t tile_n = bn ? bn : kBN;
  std::vector<GemmProblem> rest;
  // by layout (2 a_mfast + b_nfast): one launch each; a grouped linear layer's call has one
  std::vector<MmaEntry> tables[4];
  int64_t totals[4] = {0, 0, 0, 0};
  for (const GemmProblem& p : ps) {
    MmaEntry e;
    if (!mma_entry(p, e)) {
      rest.push_back(p);
      continue;
    }
    const int layout = static_cast<int>(2 * e.a_mfast + e.b_nfast);
    e.ntiles_n = (p.N + tile_n - 1) / tile_n;
    e.tile_start = totals[layout];
    totals[layout] += ((p.M + kBM - 1) / kBM) * e.ntiles_n;
    tables[layout].push_back(e);
  }
  for (int layout = 0; layout < 4; layout++) {
    if (tables[layout].empty()) continue;
    if (dtype == DType::BF16) launch_layout<bf16>(stream, bn, layout, tables[layout], totals[layout]);
    else launch_layout<f16>(stream, bn, layout, tables[layout], totals[layout]);
  }
  return rest;
}

bool grouped_mma_sized(cudaStream_t stream, DType dtype, const std::vector<GemmProblem>& ps, const SizedGroups& g,
                       bool wgmma) {
  if ((dtype != DType::BF16 && dtype != DType::F16) || ps.empty() || !device_runs_mma()) return false;
  if (g.total > (int64_t(1) << 30)) return false;
  const int bn = wgmma && device_has_wgmma() ? wgmma_tile_n() : 0;
  const int64_t tile_n = bn ? bn : kBN;
  // Every group's entry as mma_entry takes it whatever its size: the split dimension stands in as 8
  // (a whole chunk) and may not be one whose extent must be a multiple of 8 (rows: an M-fast A;
  // k: a K-fast A or B); moved by whole rows, the operands stay 16-byte aligned (their strides
  // along the split are multiples of 8 then) and C's pairs 4-byte aligned (its row stride even).
  std::vector<MmaEntry> table;
  table.reserve(ps.size());
  int layout = -1;
  for (const GemmProblem& p : ps) {
    GemmProblem q = p;
    (g.split == 0 ? q.M : q.K) = 8;
    MmaEntry e;
    if (!mma_entry(q, e)) return false;
    if (g.split == 0 ? e.a_mfast != 0 : (e.a_mfast == 0 || e.b_nfast == 0)) return false;
    const int l = static_cast<int>(2 * e.a_mfast + e.b_nfast);
    if (layout >= 0 && l != layout) return false;
    layout = l;
    (g.split == 0 ? e.M : e.K) = 0;
    e.ntiles_n = (p.N + tile_n - 1) / tile_n;
    table.push_back(e);
  }
  const GemmProblem& p0 = ps.front();
  const int64_t most = sized_max_tiles(g.split, g.total, static_cast<int64_t>(ps.size()), p0.M, (p0.N + tile_n - 1) / tile_n, kBM);
  if (most == 0) return true;
  const SizedPlan plan = sized_plan(p0, g, 2);
  if (dtype == DType::BF16) launch_layout<bf16>(stream, bn, layout, table, most, &plan);
  else launch_layout<f16>(stream, bn, layout, table, most, &plan);
  return true;
}

}  // namespace mpc
