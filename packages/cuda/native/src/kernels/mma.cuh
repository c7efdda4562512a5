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

#include <cstring>
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace mpc {

// ---- 16-bit packing --------------------------------------------------------------------------
template <typename T> struct Half16;
template <> struct Half16<bf16> {
  static MP_HD uint16_t from_f32(float v) { return f32_to_bf16(v); }
  static MP_HD float to_f32(uint16_t h) { return bf16_to_f32(h); }
};
template <> struct Half16<f16> {
  static MP_HD uint16_t from_f32(float v) { return f32_to_f16(v); }
  static MP_HD float to_f32(uint16_t h) { return f16_to_f32(h); }
};

// lo in bits 0-15, hi in bits 16-31
template <typename T> MP_D uint32_t pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  if constexpr (std::is_same<T, bf16>::value)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return static_cast<uint32_t>(Half16<T>::from_f32(lo)) | (static_cast<uint32_t>(Half16<T>::from_f32(hi)) << 16);
#endif
}
template <typename T> MP_D float unpack_lo(uint32_t r) { return Half16<T>::to_f32(static_cast<uint16_t>(r & 0xffffu)); }
template <typename T> MP_D float unpack_hi(uint32_t r) { return Half16<T>::to_f32(static_cast<uint16_t>(r >> 16)); }

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
// Per-warp exchange area of the emulator: 32 warps (1024 threads) x 32 lanes x 8 words. Blocks and
// launches never run concurrently, so a process-wide array is the running block's.
inline uint64_t* emu_scratch() {
  static uint64_t area[32][32][8];
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return &area[tid / 32][0][0];
}
inline unsigned emu_lane() {
  return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31u;
}
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

// ---- cp.async: 16-byte global -> shared copies that complete later ---------------------------
//  cp_async16(dst, src): starts a copy of 16 bytes (dst in shared memory; both 16-byte aligned);
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
  uint3 block;                               // the block that made them
  void* smem = nullptr;                      // and its launch's dynamic shared memory
};
// One per thread of the running block (blocks and launches never run concurrently). Copies that
// a block left pending (a launch stopped by a fault) are dropped when another block uses the slot.
inline EmuAsync& emu_async() {
  static EmuAsync state[1024];
  EmuAsync& a = state[threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)];
  const uint3 b = blockIdx;
  void* sm = ::emu::dynamic_smem();
  if (a.smem != sm || a.block.x != b.x || a.block.y != b.y || a.block.z != b.z) {
    a.open.clear();
    a.groups.clear();
    a.block = b;
    a.smem = sm;
  }
  return a;
}
}  // namespace mma_detail
#endif

MP_D void cp_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(mma_detail::smem_addr(dst)), "l"(src) : "memory");
#elif defined(MEGAPATCH_CUDA_EMULATOR)
  mma_detail::EmuCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  std::memcpy(c.bytes, src, 16);
  mma_detail::emu_async().open.push_back(c);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
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
    for (const mma_detail::EmuCopy& c : a.groups.front()) std::memcpy(c.dst, c.bytes, 16);
    a.groups.erase(a.groups.begin());
  }
#endif
}

}  // namespace mpc
