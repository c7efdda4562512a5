// Warp-level tensor-core primitives for the kernels, usable in both builds:
//  - mma_m16n8k16<T>(d, a, b, c): D[16x8] = A[16x16] * B[16x8] + C, T = bf16 or f16 inputs, fp32
//    accumulators (PTX mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32);
//  - ldmatrix_x1/x2/x4 (+ _trans): one, two or four 8x8 matrices of 16-bit elements from shared
//    memory into the fragment layout (PTX ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16);
//  - pack2<T>(lo, hi): two floats to a packed bf16x2 / f16x2 register (round to nearest even, the
//    conversions of common.cuh).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" and
// "Warp-level matrix load instruction: ldmatrix"), with g = lane >> 2 (groupID) and
// t = lane & 3 (threadID_in_group); a 32-bit register holds two 16-bit elements, the lower column
// (A, C) or row (B) in the low half:
//   A (16x16, row-major view, 4 regs): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1],
//                                      a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
//   B (16x8, k x n, 2 regs):           b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C/D (16x8 fp32, 4 floats):         c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
//   ldmatrix: lane 8m + r gives the address of row r of matrix m (x1: lanes 0-7, x2: 0-15,
//   x4: all; the other lanes' addresses are ignored); register m of lane l receives row l >> 2,
//   columns 2(l & 3), 2(l & 3) + 1 of matrix m; with .trans, matrix m is read column-major: it
//   receives elements [2(l & 3)][l >> 2] and [2(l & 3) + 1][l >> 2] of the stored rows.
// So with A row-major in shared memory, ldmatrix_x4 over (rows 0-7, cols 0-7), (rows 8-15, cols
// 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) gives a[0..3]; B stored n-major ("col"
// operand, e.g. K rows for Q K^T) comes from ldmatrix_x2 over (n 0-7, k 0-7), (n 0-7, k 8-15); B
// stored k-major (e.g. V rows for P V) from ldmatrix_x2_trans over (k 0-7, n 0-7), (k 8-15, n 0-7).
// And the accumulators of two adjacent 16x8 products (columns 0-7 and 8-15) are, packed to 16 bits,
// exactly the A fragment of a 16x16 operand: a = {pack(c0[0], c0[1]), pack(c0[2], c0[3]),
// pack(c1[0], c1[1]), pack(c1[2], c1[3])} (FlashAttention-2's P fragment).
//
// Implementations: on the GPU with __CUDA_ARCH__ >= 800, inline PTX. Under the emulator
// (MEGAPATCH_CUDA_EMULATOR) the warp's lanes publish their registers in a per-warp scratch area
// (shared by the fibers of the warp: blocks run one at a time), meet at __syncwarp, and each lane
// computes its own elements: products of two bf16/f16 values are exact in fp32, and each output
// element is c + a_0 b_0 + a_1 b_1 + ... + a_15 b_15 summed in fp32 in k order (the tensor cores
// accumulate with a different, not IEEE-specified, internal order and precision, so results may
// differ from a GPU's in the last bits). On older GPUs (__CUDA_ARCH__ < 800) the same exchange runs
// through __shfl_sync (slow; the attention kernels only pick the tensor-core path on sm_80+); the
// emulator build uses that variant too when MPC_MMA_SHFL is defined (the self-test checks both).
// Every lane of the warp must call each primitive together (they are warp-synchronous, .aligned).
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace mpc {

// (16-bit packing: Half16, pack2, unpack_lo / unpack_hi in common.cuh)

// ---- portable reference of the mma (element gathering by a callback) ------------------------
namespace mma_detail {

// d[e] for this lane from the full operands fetched through get_a(row, col) / get_b(k, n) (16-bit
// element bits) and its own c; fixed order: c, then k = 0..15.
template <typename T, typename GA, typename GB>
MP_D void mma_lane(float (&d)[4], const float (&c)[4], unsigned lane, GA get_a, GB get_b) {
  const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3);
  float out[4];
  for (int e = 0; e < 4; e++) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; k++) acc += Half16<T>::to_f32(get_a(row, k)) * Half16<T>::to_f32(get_b(k, col));
    out[e] = acc;
  }
  for (int e = 0; e < 4; e++) d[e] = out[e];
}

// Which register / half of which lane holds A[row][col], B[k][n] (the layouts above).
MP_HD void a_home(int row, int col, int& lane, int& reg, int& half) {
  lane = (row & 7) * 4 + ((col & 7) >> 1);
  reg = (row >> 3) + 2 * (col >> 3);
  half = col & 1;
}
MP_HD void b_home(int k, int n, int& lane, int& reg, int& half) {
  lane = n * 4 + ((k & 7) >> 1);
  reg = k >> 3;
  half = k & 1;
}

#ifdef MEGAPATCH_CUDA_EMULATOR
// the thread's index in its block
inline unsigned emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
// Per-warp exchange area of the emulator: 32 warps (1024 threads) x 32 lanes x 8 words. Blocks and
// launches never run concurrently, so a process-wide array is the running block's.
inline uint64_t* emu_scratch() {
  static uint64_t area[32][32][8];
  return &area[emu_tid() / 32][0][0];
}
inline unsigned emu_lane() { return emu_tid() & 31u; }
#endif

}  // namespace mma_detail

// ---- mma.sync m16n8k16, fp32 accumulate -------------------------------------------------------
// d = a * b + c (d may alias c)
template <typename T>
MP_D void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same<T, bf16>::value || std::is_same<T, f16>::value, "mma_m16n8k16: bf16 or f16");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, bf16>::value)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#elif defined(MEGAPATCH_CUDA_EMULATOR) && !defined(MPC_MMA_SHFL)
  using namespace mma_detail;
  uint64_t* x = emu_scratch();
  const unsigned lane = emu_lane();
  for (int r = 0; r < 4; r++) x[lane * 8 + r] = a[r];
  for (int r = 0; r < 2; r++) x[lane * 8 + 4 + r] = b[r];
  __syncwarp();
  auto get_a = [x](int row, int col) -> uint16_t {
    int l, r, h;
    a_home(row, col, l, r, h);
    return static_cast<uint16_t>(static_cast<uint32_t>(x[l * 8 + r]) >> (16 * h));
  };
  auto get_b = [x](int k, int n) -> uint16_t {
    int l, r, h;
    b_home(k, n, l, r, h);
    return static_cast<uint16_t>(static_cast<uint32_t>(x[l * 8 + 4 + r]) >> (16 * h));
  };
  mma_lane<T>(d, c, lane, get_a, get_b);
  __syncwarp();  // the scratch is reused by the next call
#else
  // pre-sm_80 GPU: gather the 16 A registers and 16 B registers this lane needs by shuffles
  using namespace mma_detail;
  const unsigned lane = threadIdx.x & 31u;  // 1-D blocks
  const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3);
  uint32_t ra[4][4];     // [source lane 4g + s][reg]: rows g and g + 8
  uint32_t rb[2][4][2];  // [column 2t + j][source lane 4(2t + j) + s][reg]
  for (int s = 0; s < 4; s++) {
    for (int r = 0; r < 4; r++) ra[s][r] = __shfl_sync(0xffffffffu, a[r], g * 4 + s);
    for (int r = 0; r < 2; r++) {
      rb[0][s][r] = __shfl_sync(0xffffffffu, b[r], (2 * t) * 4 + s);
      rb[1][s][r] = __shfl_sync(0xffffffffu, b[r], (2 * t + 1) * 4 + s);
    }
  }
  auto get_a = [&](int row, int col) -> uint16_t {
    int l, r, h;
    a_home(row, col, l, r, h);
    return static_cast<uint16_t>(ra[l & 3][r] >> (16 * h));
  };
  auto get_b = [&](int k, int n) -> uint16_t {
    int l, r, h;
    b_home(k, n, l, r, h);
    return static_cast<uint16_t>(rb[n - 2 * t][l & 3][r] >> (16 * h));
  };
  mma_lane<T>(d, c, lane, get_a, get_b);
#endif
}

// ---- ldmatrix ---------------------------------------------------------------------------------
namespace mma_detail {
// N matrices, rows addressed by lanes 8m + r; TRANS reads them column-major.
template <int N, bool TRANS> MP_D void ldmatrix_generic(uint32_t* out, const void* p) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  // ldmatrix's row addresses (of the lanes that give one) are 16-byte aligned, or a GPU faults
  if (emu_lane() < 8u * N && reinterpret_cast<uintptr_t>(p) % 16 != 0)
    ::emu::detail::fault("ldmatrix: row address not 16-byte aligned");
#endif
#if defined(MEGAPATCH_CUDA_EMULATOR) && !defined(MPC_MMA_SHFL)
  uint64_t* x = emu_scratch();
  const unsigned lane = emu_lane();
  x[lane * 8] = reinterpret_cast<uint64_t>(p);
  __syncwarp();
  const int row = static_cast<int>(lane >> 2), pair = static_cast<int>(lane & 3);
  for (int m = 0; m < N; m++) {
    uint16_t e0, e1;
    if (!TRANS) {
      const uint16_t* rp = reinterpret_cast<const uint16_t*>(x[(8 * m + row) * 8]);
      e0 = rp[2 * pair];
      e1 = rp[2 * pair + 1];
    } else {
      e0 = reinterpret_cast<const uint16_t*>(x[(8 * m + 2 * pair) * 8])[row];
      e1 = reinterpret_cast<const uint16_t*>(x[(8 * m + 2 * pair + 1) * 8])[row];
    }
    out[m] = static_cast<uint32_t>(e0) | (static_cast<uint32_t>(e1) << 16);
  }
  __syncwarp();
#else
  const unsigned lane = threadIdx.x & 31u;
  const int row = static_cast<int>(lane >> 2), pair = static_cast<int>(lane & 3);
  const unsigned long long mine = reinterpret_cast<unsigned long long>(p);
  for (int m = 0; m < N; m++) {
    uint16_t e0, e1;
    if (!TRANS) {
      const uint16_t* rp = reinterpret_cast<const uint16_t*>(__shfl_sync(0xffffffffu, mine, 8 * m + row));
      e0 = rp[2 * pair];
      e1 = rp[2 * pair + 1];
    } else {
      e0 = reinterpret_cast<const uint16_t*>(__shfl_sync(0xffffffffu, mine, 8 * m + 2 * pair))[row];
      e1 = reinterpret_cast<const uint16_t*>(__shfl_sync(0xffffffffu, mine, 8 * m + 2 * pair + 1))[row];
    }
    out[m] = static_cast<uint32_t>(e0) | (static_cast<uint32_t>(e1) << 16);
  }
#endif
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
MP_D unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
#endif
}  // namespace mma_detail

// `p`: this lane's row address (16-byte aligned, in shared memory)
MP_D void ldmatrix_x1(uint32_t (&r)[1], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(mma_detail::smem_addr(p)));
#else
  mma_detail::ldmatrix_generic<1, false>(r, p);
#endif
}
MP_D void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(mma_detail::smem_addr(p)));
#else
  mma_detail::ldmatrix_generic<2, false>(r, p);
#endif
}
MP_D void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(mma_detail::smem_addr(p)));
#else
  mma_detail::ldmatrix_generic<4, false>(r, p);
#endif
}
MP_D void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];"
               : "=r"(r[0])
               : "r"(mma_detail::smem_addr(p)));
#else
  mma_detail::ldmatrix_generic<1, true>(r, p);
#endif
}
MP_D void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(mma_detail::smem_addr(p)));
#else
  mma_detail::ldmatrix_generic<2, true>(r, p);
#endif
}
MP_D void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(mma_detail::smem_addr(p)));
#else
  mma_detail::ldmatrix_generic<4, true>(r, p);
#endif
}

// A shared-memory address for address arithmetic in hot loops: on sm_80+ the 32-bit address in
// the shared window (converted from a pointer once, not at every ldmatrix or cp.async), elsewhere
// (the emulator, older GPUs, the host pass) a byte pointer. `a + bytes` works on both.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
using SmemAddr = uint32_t;
MP_D SmemAddr smem_at(const void* p) { return mma_detail::smem_addr(p); }
MP_D void ldsm_x4(uint32_t (&r)[4], SmemAddr a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
MP_D void ldsm_x4_trans(uint32_t (&r)[4], SmemAddr a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
#else
using SmemAddr = const unsigned char*;
MP_D SmemAddr smem_at(const void* p) { return static_cast<const unsigned char*>(p); }
MP_D void ldsm_x4(uint32_t (&r)[4], SmemAddr a) { ldmatrix_x4(r, a); }
MP_D void ldsm_x4_trans(uint32_t (&r)[4], SmemAddr a) { ldmatrix_x4_trans(r, a); }
#endif

// ---- cp.async: 16-byte global -> shared copies that complete later ---------------------------
//  cp_async16(dst, src): starts a copy of 16 bytes (dst in shared memory; both 16-byte aligned);
//  cp_async16_zfill(dst, src, full): the same, or 16 zero bytes when !full (below);
//  cp_async_commit(): closes the group of this thread's copies started since its last commit;
//  cp_async_wait<N>(): returns when at most N of this thread's committed groups are incomplete.
// A thread's completed copies are visible to itself; to the block after a __syncthreads that
// follows the wait. sm_80+: PTX cp.async.cg.shared.global / commit_group / wait_group; older GPUs
// copy at once. The emulator holds each copy (its source read at the call) until the wait that
// completes its group, so a kernel that reads a buffer before waiting for it reads the old bytes
// there, as it may on a GPU, and its tests fail.
#ifdef MEGAPATCH_CUDA_EMULATOR
namespace mma_detail {
struct EmuCopy {
  unsigned char* dst;
  unsigned char bytes[16];
};
struct EmuAsync {
  std::vector<EmuCopy> open;                // started since the last commit
  std::vector<std::vector<EmuCopy>> groups;  // committed, oldest first
  unsigned long long serial = 0;             // the block that made them (emu::block_serial)
};
// One per thread of the running block (blocks and launches never run concurrently). Copies that
// a block left pending (a launch stopped by a fault) are dropped when another block uses the slot.
inline EmuAsync& emu_async() {
  static EmuAsync state[1024];
  EmuAsync& a = state[emu_tid()];
  if (a.serial != ::emu::block_serial()) {
    a.open.clear();
    a.groups.clear();
    a.serial = ::emu::block_serial();
  }
  return a;
}
// The async proxy's view of dynamic shared memory: each 16-byte chunk that a thread's cp.async
// landed and that thread has not fenced since (fence_proxy_async) is "unfenced", owned by the
// thread; a wgmma that reads an unfenced chunk is a fault (on a GPU it may read the old bytes).
// Writes by ordinary stores are not tracked (no kernel here feeds wgmma by them).
struct EmuProxy {
  unsigned long long serial = 0;              // the block it describes (emu::block_serial)
  std::vector<int> owner;                     // a chunk's unfenced writer, -1 when none
  std::vector<std::vector<unsigned>> landed;  // a thread's unfenced chunks
};
inline EmuProxy& emu_proxy() {
  static EmuProxy p;
  if (p.serial != ::emu::block_serial()) {
    p.serial = ::emu::block_serial();
    p.owner.clear();
    for (std::vector<unsigned>& l : p.landed) l.clear();
  }
  return p;
}
// MEGAPATCH_CUDA_EMU_CP_ASYNC=eager: each copy also lands at once, at its cp.async (a GPU may land
// it any time between the call and the wait that completes it). The default (landing at the wait)
// catches reads before the wait; eager catches writes into a buffer that an earlier asynchronous
// reader (a wgmma group not yet waited for) still reads. The tests run both.
inline bool emu_eager_copies() {
  static const bool eager = [] {
    const char* v = std::getenv("MEGAPATCH_CUDA_EMU_CP_ASYNC");
    return v && std::string(v) == "eager";
  }();
  return eager;
}
// lands a group of this thread's copies; those in dynamic shared memory become its unfenced chunks
inline void emu_land(const std::vector<EmuCopy>& group) {
  const unsigned char* sm = static_cast<const unsigned char*>(::emu::dynamic_smem());
  const size_t bytes = ::emu::dynamic_smem_bytes();
  EmuProxy& p = emu_proxy();
  const unsigned tid = emu_tid();
  if (p.owner.size() < (bytes + 15) / 16) p.owner.resize((bytes + 15) / 16, -1);
  if (p.landed.size() <= tid) p.landed.resize(tid + 1);
  for (const EmuCopy& c : group) {
    std::memcpy(c.dst, c.bytes, 16);
    if (sm == nullptr || c.dst < sm || c.dst >= sm + bytes) continue;
    const unsigned chunk = static_cast<unsigned>((c.dst - sm) / 16);
    p.owner[chunk] = static_cast<int>(tid);
    p.landed[tid].push_back(chunk);
  }
}
}  // namespace mma_detail
#endif

MP_D void cp_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(mma_detail::smem_addr(dst)), "l"(src) : "memory");
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  // both addresses 16-byte aligned, or a GPU faults ("misaligned address")
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    ::emu::detail::fault("cp.async: address not 16-byte aligned");
  mma_detail::EmuCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  std::memcpy(c.bytes, src, 16);
  if (mma_detail::emu_eager_copies()) std::memcpy(c.dst, c.bytes, 16);
  mma_detail::emu_async().open.push_back(c);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}
// cp_async16_zfill(dst, src, full): cp_async16 when `full`, else the 16 bytes at dst become zeros and
// nothing is read (PTX cp.async's src-size operand, 0): the out-of-range chunks of a tile, without
// a branch; they land with the thread's group like any copy.
// (dst: a SmemAddr)
MP_D void cp_async16_zfill(SmemAddr dst, const void* src, bool full) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(full ? 16 : 0) : "memory");
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (full && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    ::emu::detail::fault("cp.async: address not 16-byte aligned");
  mma_detail::EmuCopy c;
  c.dst = const_cast<unsigned char*>(dst);
  if (full) std::memcpy(c.bytes, src, 16);
  else std::memset(c.bytes, 0, 16);
  if (mma_detail::emu_eager_copies()) std::memcpy(c.dst, c.bytes, 16);
  mma_detail::emu_async().open.push_back(c);
#else
  uint4* d = reinterpret_cast<uint4*>(const_cast<unsigned char*>(dst));
  if (full) *d = *reinterpret_cast<const uint4*>(src);
  else *d = uint4{0u, 0u, 0u, 0u};
#endif
}
MP_D void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  mma_detail::EmuAsync& a = mma_detail::emu_async();
  a.groups.push_back(std::move(a.open));
  a.open.clear();
#endif
}
template <int N> MP_D void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  mma_detail::EmuAsync& a = mma_detail::emu_async();
  while (a.groups.size() > static_cast<size_t>(N)) {
    mma_detail::emu_land(a.groups.front());
    a.groups.erase(a.groups.begin());
  }
#endif
}

// ---- wgmma (sm_90a): warpgroup-level asynchronous matrix multiply ------------------------------
// D[64 x N] (+)= A[64 x 16] * B[16 x N] by the 4 warps of a warpgroup (128 consecutive threads,
// the first at a multiple of 128; the attention kernels run one, two or, warp-specialised, three
// warpgroups a block), A from registers, B from shared memory through a
// matrix descriptor, fp32 accumulators (PTX wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}).
// Register layouts (PTX ISA, "Register Fragments and Shared Memory Matrix Layouts" of wgmma): warp
// w of the warpgroup owns rows 16 w .. 16 w + 15 of A and D, in the layouts of mma.m16n8k16 above
// (A: 4 registers; D: N / 8 accumulator tiles of 4 floats, tile n holding columns 8 n .. 8 n + 7).
// So the attention kernels' per-warp score and output tiles are the same registers in either form.
// B in shared memory, without swizzling: "core matrices" of 8 rows x 16 bytes stored as 128
// contiguous bytes; for a K-major B (element (k, n) contiguous along k, like K rows for Q K^T) a
// core matrix is 8 n x 8 k with k contiguous in each 16-byte row; for an MN-major B (.trans: n
// contiguous, like V rows for P V) it is 8 k x 8 n with n contiguous. In both, the descriptor's
// leading byte offset (LBO) steps between core matrices along k and its stride byte offset (SBO)
// along n:
//   K-major:  byte(k, n) = start + (k / 8) LBO + (n / 8) SBO + (n % 8) 16 + (k % 8) 2
//   MN-major: byte(k, n) = start + (k / 8) LBO + (n / 8) SBO + (k % 8) 16 + (n % 8) 2
// Descriptor bits (wgmma "Matrix Descriptor Format"): 0-13 start address >> 4 (shared window),
// 16-29 LBO >> 4, 32-45 SBO >> 4, 49-51 base offset (0), 62-63 swizzle mode (0: none).
// Order of use: writes of shared memory by ordinary stores or cp.async reach wgmma (the async
// proxy) after fence_proxy_async() by the writers and a barrier; wgmma_fence() before the first
// wgmma that reads registers written since the last wgmma (accumulators, A); wgmma_commit() closes
// the group of wgmmas issued since the last commit; wgmma_wait<N>() returns when at most N groups
// are pending; only then may their accumulators be read (wgmma_fence_operands() after the wait
// keeps the compiler from moving those reads above it), or their A registers and B tiles be
// overwritten.
// Under the emulator a wgmma issued without a wgmma_fence since the block's start or the last
// wgmma_wait is a fault, so is one that reads bytes a thread's cp.async wrote while that thread has
// not called fence_proxy_async since (EmuProxy; ordinary stores are not tracked), and each wgmma
// is recorded at issue and carried out at the wait that completes its group (reading A from its
// registers and B from shared memory then, in k order in fp32 like mma_m16n8k16's emulation), so a
// kernel that reads accumulators early, or overwrites A or B before the wait, computes other
// numbers and its tests fail. On a GPU without sm_90a code the primitives trap (the launches check
// device_has_wgmma first).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MPC_WGMMA_PTX 1
#endif

// Host side: the build carries sm_90a code (MEGAPATCH_CUDA_WGMMA, from CMakeLists.txt: an
// architecture list with 90a) and the current device is compute capability 9.0, so that kernels
// using the primitives below may be launched. The emulator emulates wgmma.
inline bool device_has_wgmma() {
#if defined(MEGAPATCH_CUDA_EMULATOR)
  return true;
#elif defined(MEGAPATCH_CUDA_WGMMA)
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

// The descriptor of a B operand at shared-memory address `p` (16-byte aligned).
MP_D uint64_t wgmma_desc(const void* p, uint32_t lbo_bytes, uint32_t sbo_bytes) {
#if defined(MEGAPATCH_CUDA_EMULATOR)
  const uint64_t addr = static_cast<uint64_t>(static_cast<const unsigned char*>(p) -
                                              static_cast<const unsigned char*>(::emu::dynamic_smem()));
#elif defined(__CUDA_ARCH__)
  const uint64_t addr = static_cast<uint64_t>(__cvta_generic_to_shared(p));
#else
  const uint64_t addr = reinterpret_cast<uintptr_t>(p);
#endif
  return ((addr >> 4) & 0x3FFFu) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32);
}

#ifdef MEGAPATCH_CUDA_EMULATOR
namespace mma_detail {
struct EmuWgmma {
  float* d;          // this thread's N / 2 accumulators
  const uint32_t* a;  // and 4 A registers
  uint64_t desc;
  int n;
  bool trans, scale_d, bf;
};
struct EmuWg {
  std::vector<EmuWgmma> open;
  std::vector<std::vector<EmuWgmma>> groups;
  unsigned long long serial = 0;  // the block that issued them (emu::block_serial)
  bool fenced = false;            // a wgmma_fence since the block started or the last wait
};
inline EmuWg& emu_wg() {
  static EmuWg state[1024];
  EmuWg& w = state[emu_tid()];
  if (w.serial != ::emu::block_serial()) {
    w.open.clear();
    w.groups.clear();
    w.serial = ::emu::block_serial();
    w.fenced = false;
  }
  return w;
}
// Carries out one wgmma of the group being completed: every thread of the warpgroup publishes its
// record, then computes its own accumulators from the others' A registers and shared memory. The
// warpgroups of a block are independent (a named barrier each, as the hardware's wgmma is per
// warpgroup).
inline void emu_wg_run(const EmuWgmma& op) {
  static const EmuWgmma* table[1024];
  const unsigned tid = emu_tid();
  if ((blockDim.x * blockDim.y * blockDim.z) % 128 != 0)
    throw std::runtime_error("emulator: wgmma needs blocks of whole warpgroups (multiples of 128 threads)");
  const unsigned wg = tid / 128, base = 128 * wg, bar = 16 + wg;
  table[tid] = &op;
  ::emu::named_barrier_sync(bar, 128, __FILE__, __LINE__);
  const uint64_t desc = op.desc;
  if ((desc >> 62) != 0) throw std::runtime_error("emulator: wgmma with a swizzled layout");
  const unsigned char* base_sm = static_cast<const unsigned char*>(::emu::dynamic_smem());
  const size_t start = (desc & 0x3FFFu) << 4, lbo = ((desc >> 16) & 0x3FFFu) << 4,
               sbo = ((desc >> 32) & 0x3FFFu) << 4;
  const int warp = static_cast<int>((tid >> 5) & 3), lane = static_cast<int>(tid & 31);
  const int g = lane >> 2, t = lane & 3;
  auto elem = [&](uint16_t h) { return op.bf ? Half16<bf16>::to_f32(h) : Half16<f16>::to_f32(h); };
  auto get_a = [&](int row, int k) -> float {  // row < 64
    int l, r, h;
    a_home(row & 15, k, l, r, h);
    return elem(static_cast<uint16_t>(table[base + 32 * (row >> 4) + l]->a[r] >> (16 * h)));
  };
  auto b_offset = [&](int k, int n) -> size_t {
    return start + (k / 8) * lbo + (n / 8) * sbo + (op.trans ? (k % 8) * 16 + (n % 8) * 2 : (n % 8) * 16 + (k % 8) * 2);
  };
  // the warpgroup's first thread checks that B's bytes reach the async proxy (one 16-byte chunk
  // holds 8 k of one n, K-major, or 8 n of one k, MN-major)
  if (tid % 128 == 0) {
    const EmuProxy& proxy = emu_proxy();
    for (int k = 0; k < 16; k += op.trans ? 1 : 8)
      for (int n = 0; n < op.n; n += op.trans ? 8 : 1) {
        const size_t chunk = b_offset(k, n) / 16;
        if (chunk < proxy.owner.size() && proxy.owner[chunk] >= 0)
          throw std::runtime_error("wgmma reads shared memory at byte " + std::to_string(16 * chunk) + ", which thread " +
                                   std::to_string(proxy.owner[chunk]) +
                                   "'s cp.async wrote with no fence_proxy_async (fence.proxy.async) after it");
      }
  }
  auto get_b = [&](int k, int n) -> float {
    const size_t off = b_offset(k, n);
    uint16_t h;
    std::memcpy(&h, base_sm + off, 2);
    return elem(h);
  };
  for (int nt = 0; nt < op.n / 8; nt++)
    for (int e = 0; e < 4; e++) {
      const int row = 16 * warp + g + (e >= 2 ? 8 : 0), col = 8 * nt + 2 * t + (e & 1);
      float acc = op.scale_d ? op.d[4 * nt + e] : 0.0f;
      for (int k = 0; k < 16; k++) acc += get_a(row, k) * get_b(k, col);
      op.d[4 * nt + e] = acc;
    }
  // the table and the A registers are read by the warpgroup before its next record
  ::emu::named_barrier_sync(bar, 128, __FILE__, __LINE__);
}
}  // namespace mma_detail
#endif

MP_D void wgmma_fence() {
#if defined(MPC_WGMMA_PTX)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  mma_detail::emu_wg().fenced = true;
#endif
}
MP_D void wgmma_commit() {
#if defined(MPC_WGMMA_PTX)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  mma_detail::EmuWg& w = mma_detail::emu_wg();
  w.groups.push_back(std::move(w.open));
  w.open.clear();
#endif
}
template <int N> MP_D void wgmma_wait() {
#if defined(MPC_WGMMA_PTX)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  mma_detail::EmuWg& w = mma_detail::emu_wg();
  w.fenced = false;  // the accumulators may be read and written now: the next wgmma needs a fence
  while (w.groups.size() > static_cast<size_t>(N)) {
    const std::vector<mma_detail::EmuWgmma> group = std::move(w.groups.front());
    w.groups.erase(w.groups.begin());
    for (const mma_detail::EmuWgmma& op : group) mma_detail::emu_wg_run(op);
  }
#endif
}
// shared-memory writes of this thread (generic proxy) become visible to wgmma (async proxy)
MP_D void fence_proxy_async() {
#if defined(MPC_WGMMA_PTX)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  mma_detail::EmuProxy& p = mma_detail::emu_proxy();
  const unsigned tid = mma_detail::emu_tid();
  if (tid < p.landed.size()) {
    for (unsigned chunk : p.landed[tid])
      if (p.owner[chunk] == static_cast<int>(tid)) p.owner[chunk] = -1;
    p.landed[tid].clear();
  }
#endif
}
// ties the values of accumulators (float, after a wgmma_wait) or of A fragments (packed 16-bit
// pairs, before wgmma_fence: so that the compiler cannot move their last write between the fence
// and the wgmma that reads them, undefined in the PTX ISA) to this point of the program
template <typename E, int NT> MP_D void wgmma_fence_operands(E (&d)[NT][4]) {
  static_assert(std::is_same<E, float>::value || std::is_same<E, uint32_t>::value, "accumulators or A fragments");
#if defined(__CUDA_ARCH__)
#pragma unroll
  for (int n = 0; n < NT; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      if constexpr (std::is_same<E, float>::value) asm volatile("" : "+f"(d[n][e])::"memory");
      else asm volatile("" : "+r"(d[n][e])::"memory");
    }
#else
  (void)d;
#endif
}

// Issues issue()'s wgmmas as one group and waits for it: the accumulators `accs` are pinned before
// and after (wgmma_fence_operands), the registers written before are fenced (wgmma_fence).
template <typename F, typename... Acc> MP_D void wgmma_sync(F issue, Acc&... accs) {
  (wgmma_fence_operands(accs), ...);
  wgmma_fence();
  issue();
  wgmma_commit();
  wgmma_wait<0>();
  (wgmma_fence_operands(accs), ...);
}

#define MPC_WG_D64_STR "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MPC_WG_D64_OPS(d) "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define MPC_WG_A64_STR "{%32, %33, %34, %35}, %36"
#define MPC_WG_SCALE64_STR "%37"
#define MPC_WG_D128_STR "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define MPC_WG_D128_OPS(d) "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define MPC_WG_A128_STR "{%64, %65, %66, %67}, %68"
#define MPC_WG_SCALE128_STR "%69"
#define MPC_WGMMA_RS(N, TY, TR, d, a, desc, scale)                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " MPC_WG_SCALE##N##_STR ", 0;\n"                             \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " MPC_WG_D##N##_STR               \
               ", " MPC_WG_A##N##_STR ", p, 1, 1, " #TR ";\n}\n"                                              \
               : MPC_WG_D##N##_OPS(d)                                                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale)                            \
               : "memory")

// d (+)= A B: A from this thread's registers (the warpgroup's 64 x 16 tile), B (16 x N) from shared
// memory by `desc`; TRANS: B is MN-major; scale_d = 0 overwrites d. N: 64 or 128.
template <typename T, int N, bool TRANS>
MP_D void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc, int scale_d) {
  static_assert(std::is_same<T, bf16>::value || std::is_same<T, f16>::value, "wgmma_rs: bf16 or f16");
  static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
#if defined(MPC_WGMMA_PTX)
  constexpr bool kBf = std::is_same<T, bf16>::value;
  if constexpr (N == 64 && kBf && !TRANS) MPC_WGMMA_RS(64, "bf16", 0, d, a, desc, scale_d);
  else if constexpr (N == 64 && kBf && TRANS) MPC_WGMMA_RS(64, "bf16", 1, d, a, desc, scale_d);
  else if constexpr (N == 64 && !kBf && !TRANS) MPC_WGMMA_RS(64, "f16", 0, d, a, desc, scale_d);
  else if constexpr (N == 64) MPC_WGMMA_RS(64, "f16", 1, d, a, desc, scale_d);
  else if constexpr (kBf && !TRANS) MPC_WGMMA_RS(128, "bf16", 0, d, a, desc, scale_d);
  else if constexpr (kBf && TRANS) MPC_WGMMA_RS(128, "bf16", 1, d, a, desc, scale_d);
  else if constexpr (!kBf && !TRANS) MPC_WGMMA_RS(128, "f16", 0, d, a, desc, scale_d);
  else MPC_WGMMA_RS(128, "f16", 1, d, a, desc, scale_d);
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  mma_detail::EmuWgmma op;
  op.d = &d[0][0];
  op.a = &a[0];
  op.desc = desc;
  op.n = N;
  op.trans = TRANS;
  op.scale_d = scale_d != 0;
  op.bf = std::is_same<T, bf16>::value;
  mma_detail::EmuWg& w = mma_detail::emu_wg();
  // the PTX ISA asks for wgmma.fence before a warpgroup's first wgmma and between register
  // accesses and the wgmmas that use those registers: checked here as "after every wait"
  if (!w.fenced) throw std::runtime_error("emulator: wgmma without a wgmma_fence since the last wgmma_wait");
  w.open.push_back(op);
#elif defined(__CUDA_ARCH__)
  (void)d;
  (void)a;
  (void)desc;
  (void)scale_d;
  __trap();
#else
  (void)d;
  (void)a;
  (void)desc;
  (void)scale_d;
#endif
}

}  // namespace mpc
