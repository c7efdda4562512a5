// A CUDA emulator for the host compiler: kernel files written for nvcc compile with g++
// (C++17, -x c++, -DMEGAPATCH_CUDA_EMULATOR=1, -I native/emu) and run on the CPU, so that the
// kernels' logic is tested on machines without a GPU. common.cuh includes this header instead of
// <cuda_runtime.h> when MEGAPATCH_CUDA_EMULATOR is defined.
//
// Execution model. A launch runs its blocks one at a time, in (z, y, x) order, on the calling OS
// thread, before it returns (launches are synchronous; streams and events only validate handles).
// Every CUDA thread of a block is a fiber with its own stack (256 KB, MEGAPATCH_CUDA_EMU_STACK_KB;
// mmap'ed once with a guard page and reused by every launch), driven by a round-robin cooperative
// scheduler: a fiber runs until it finishes or waits at a barrier (__syncthreads, __syncwarp, and
// every warp primitive, which is built on a warp barrier); each round takes the block's threads in
// order, or last to first with MEGAPATCH_CUDA_EMU_SCHEDULE=reverse (read at each launch). With
// MEGAPATCH_CUDA_EMU_SCHEDULE=priority[:SEED] there are no rounds: the block's warps are ranked at
// random (from the seed, the launch's number and the block's index), the highest-ranked warp with a
// ready thread always runs, a thread that releases others from a barrier yields, and about one
// switch in 4096 drops the warp that ran to the lowest rank; an unknown value fails the launch. A
// kernel without barriers costs one context switch pair per thread (an assembly switch on x86-64,
// ucontext elsewhere).
//
// Consequences:
//  - `__shared__` is `static`: a function-static array is the block's shared memory, since blocks
//    never run at the same time. Its values carry over between blocks and launches (real shared
//    memory is uninitialised, so correct kernels cannot tell). Dynamic shared memory
//    (MP_DYNAMIC_SMEM) is a per-launch buffer of `smem` bytes, 16-byte aligned, filled with 0xCD
//    at the start of every block.
//  - One kernel runs at a time per process: emu::launch holds a global mutex, so launches from
//    concurrent N-API worker threads serialize. A kernel must not launch kernels.
//  - Every thread of a block must reach every __syncthreads, at the same call site (__FILE__ and
//    __LINE__). A thread that exits while others wait, or waits at another barrier, is a divergent
//    barrier: the launch stops (the remaining threads and blocks are abandoned; their fibers are
//    simply reset by the next launch) and the sticky error cudaErrorLaunchFailure is set, with a
//    message for cudaGetErrorString: "emulator: divergent __syncthreads in block (x,y,z): ...".
//    Warp barriers (__syncwarp, __shfl*_sync, votes) wait for the lanes of their mask that exist in
//    the warp (a partial last warp has fewer lanes), with the same error ("divergent __shfl_sync in
//    block ..."). __trap() and a C++ exception escaping a kernel stop the launch the same way.
//  - __activemask() is the warp's lanes that have not exited (the emulator does not track branch
//    divergence), so a shuffle over __activemask() inside a divergent branch is reported as a
//    divergent warp barrier.
//  - Errors are per host thread, as in CUDA: a failing runtime call or launch sets the thread's last
//    error, which cudaGetLastError returns and clears. Launches check the configuration (1..1024
//    threads per block, block z <= 64, grid dims >= 1, smem <= 227 KB: else
//    cudaErrorInvalidConfiguration) and the stream (default, or a live stream of the current
//    device: else cudaErrorInvalidResourceHandle).
//  - cudaMalloc returns host memory (256-byte aligned, filled with 0xCD), tracked per device
//    (cudaMemGetInfo reports it against a nominal 16 GiB). Copies and memsets are synchronous and
//    check that their device side lies inside one allocation (else cudaErrorInvalidValue).
//
// Device features provided: threadIdx/blockIdx/blockDim/gridDim, warpSize, __syncthreads
// (+ _count/_and/_or), named barriers (bar.sync / bar.arrive: named_barrier_sync below), __syncwarp, __shfl_sync/__shfl_xor_sync/__shfl_down_sync/__shfl_up_sync
// (any 4- or 8-byte trivially copyable type, narrower integers through int; the PTX lane rules
// for `width`; a source lane past the end of a partial last warp yields the caller's own value),
// __ballot_sync, __any_sync, __all_sync, __activemask, __popc/__popcll, __ffs/__ffsll,
// __clz/__clzll, __brev/__brevll, __umulhi/__umul64hi/__mulhi/__mul64hi, __byte_perm, funnel
// shifts, atomics (atomicAdd/Sub/Min/Max/CAS/Exch/And/Or/Xor/Inc/Dec; each returns the old value),
// __threadfence*, bit casts (__float_as_uint, __double_as_longlong, ...), fast-math intrinsics
// (__expf, __fdividef, __saturatef, ...), float->int conversions (__float2int_rn, ...; saturating,
// NaN -> 0), __ldg, __trap, printf, the <cmath> functions (float overloads included) plus
// rsqrtf/rsqrt, erfinvf/erfinv, normcdff/normcdfinvf, sinpif/cospif, and CUDA vector types (int2,
// float4, ...; make_*). Runtime API subset: see the declarations below. The number of devices is
// MEGAPATCH_CUDA_EMU_DEVICES (default 2; 0 makes cudaGetDeviceCount fail with cudaErrorNoDevice).
#pragma once

// Standard headers first: some use names that the CUDA qualifier macros below redefine (e.g.
// <memory> has __attribute__((__noinline__))), so they must be read before those macros exist.
#include <math.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- qualifiers ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__
// __restrict__ is a g++ keyword already.
// blocks run one at a time: a function-static array is the block's shared memory
#define __shared__ static

using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// ---- vector types ----------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define EMU_VEC2(T, name, al)                                                           \
  struct __attribute__((aligned(al))) name { T x, y; };                                \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define EMU_VEC3(T, name)                                                               \
  struct name { T x, y, z; };                                                          \
  inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define EMU_VEC4(T, name, al)                                                           \
  struct __attribute__((aligned(al))) name { T x, y, z, w; };                          \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
EMU_VEC2(int, int2, 8)
EMU_VEC2(unsigned, uint2, 8)
EMU_VEC2(float, float2, 8)
EMU_VEC2(double, double2, 16)
EMU_VEC2(long long, longlong2, 16)
EMU_VEC3(int, int3)
EMU_VEC3(float, float3)
EMU_VEC4(int, int4, 16)
EMU_VEC4(unsigned, uint4, 16)
EMU_VEC4(float, float4, 16)
EMU_VEC4(unsigned char, uchar4, 4)
EMU_VEC4(short, short4, 8)
EMU_VEC4(unsigned short, ushort4, 8)
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
inline dim3 make_dim3(unsigned x, unsigned y, unsigned z) { return dim3(x, y, z); }

// a variable, not a macro, so that cudaDeviceProp::warpSize stays usable
constexpr int warpSize = 32;

// ---- runtime API types -----------------------------------------------------------------------
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorPeerAccessAlreadyEnabled = 704,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
typedef enum cudaError cudaError_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamPerThread ((cudaStream_t)0x2)
#define cudaEventDefault 0x00
#define cudaEventBlockingSync 0x01
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault 0x00
#define cudaHostAllocPortable 0x01

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  int regsPerBlock;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int major;
  int minor;
  int multiProcessorCount;
  int maxThreadsPerMultiProcessor;
  int pciBusID;
  int pciDeviceID;
  int pciDomainID;
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

typedef void (*cudaHostFn_t)(void* userData);

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

// ---- runtime API (emu.cc) ----------------------------------------------------------------------
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
const char* cudaGetErrorName(cudaError_t err);

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaDeviceReset();
cudaError_t cudaDeviceCanAccessPeer(int* canAccess, int device, int peer);
cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned flags);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaMemGetInfo(size_t* free, size_t* total);

cudaError_t cudaMalloc(void** ptr, size_t size);
template <typename T> inline cudaError_t cudaMalloc(T** ptr, size_t size) {
  return cudaMalloc(reinterpret_cast<void**>(ptr), size);
}
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMallocHost(void** ptr, size_t size);
template <typename T> inline cudaError_t cudaMallocHost(T** ptr, size_t size) {
  return cudaMallocHost(reinterpret_cast<void**>(ptr), size);
}
cudaError_t cudaHostAlloc(void** ptr, size_t size, unsigned flags);
cudaError_t cudaFreeHost(void* ptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream = 0);
cudaError_t cudaMemcpyPeer(void* dst, int dstDevice, const void* src, int srcDevice, size_t count);
cudaError_t cudaMemcpyPeerAsync(void* dst, int dstDevice, const void* src, int srcDevice,
                                size_t count, cudaStream_t stream = 0);
cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                         size_t height, cudaMemcpyKind kind);
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                              size_t height, cudaMemcpyKind kind, cudaStream_t stream = 0);
// stream-ordered allocation: immediate, as every stream is synchronous here
cudaError_t cudaMallocAsync(void** ptr, size_t size, cudaStream_t stream);
template <typename T> inline cudaError_t cudaMallocAsync(T** ptr, size_t size, cudaStream_t stream) {
  return cudaMallocAsync(reinterpret_cast<void**>(ptr), size, stream);
}
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream);
cudaError_t cudaMemset(void* dst, int value, size_t count);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t stream = 0);

cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags = 0);
// runs fn(userData) at once (the stream's work so far is complete)
cudaError_t cudaLaunchHostFunc(cudaStream_t stream, cudaHostFn_t fn, void* userData);

cudaError_t cudaEventCreate(cudaEvent_t* event);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = 0);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaEventDestroy(cudaEvent_t event);

// __constant__ / __device__ variables are host variables here
template <typename T>
inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t count, size_t offset = 0,
                                      cudaMemcpyKind = cudaMemcpyHostToDevice) {
  if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
  std::memcpy(reinterpret_cast<char*>(&symbol) + offset, src, count);
  return cudaSuccess;
}
template <typename T>
inline cudaError_t cudaMemcpyToSymbolAsync(T& symbol, const void* src, size_t count, size_t offset = 0,
                                           cudaMemcpyKind kind = cudaMemcpyHostToDevice, cudaStream_t = 0) {
  return cudaMemcpyToSymbol(symbol, src, count, offset, kind);
}
template <typename T>
inline cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t count, size_t offset = 0,
                                        cudaMemcpyKind = cudaMemcpyDeviceToHost) {
  if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
  std::memcpy(dst, reinterpret_cast<const char*>(&symbol) + offset, count);
  return cudaSuccess;
}

// accepted and ignored (dynamic shared memory is not limited per function in the emulator)
template <typename F> inline cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) {
  return cudaSuccess;
}

// ---- emulator core ---------------------------------------------------------------------------
namespace emu {

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytes = 227 * 1024;
constexpr int kWarpSize = 32;

namespace detail {
// the running fiber's threadIdx, and the launch's blockIdx / blockDim / gridDim
extern const uint3* g_thread_idx;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

// runs a launch whose kernel call is type-erased: invoke(ctx) calls the kernel once (one thread)
void launch_erased(void (*invoke)(void*), void* ctx, dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream);

// warp support for the running thread
unsigned lane_id();
unsigned warp_lanes();    // lanes that exist in the running thread's warp (< 32 for a partial last warp)
uint64_t* warp_slots();   // the warp's 32 exchange slots
void warp_barrier(unsigned mask, const char* what);
unsigned active_mask();
[[noreturn]] void fault(const char* what);
}  // namespace detail

inline const uint3& cur_thread_idx() { return *detail::g_thread_idx; }
inline const uint3& cur_block_idx() { return detail::g_block_idx; }
inline const dim3& cur_block_dim() { return detail::g_block_dim; }
inline const dim3& cur_grid_dim() { return detail::g_grid_dim; }

// the launch's dynamic shared memory (16-byte aligned; nullptr when the launch asked for 0 bytes)
void* dynamic_smem();
// its size in bytes, as the launch asked for
size_t dynamic_smem_bytes();

// launches since the process started (run or, with MEGAPATCH_CUDA_EMU_DRY_RUN=1, only counted)
unsigned long long launch_count();
// cudaStreamWaitEvent calls since the process started (a fork or join between streams each)
unsigned long long stream_wait_count();
// host-to-device copies from page-locked memory, which the emulator queues until something could
// observe them (see emu.cc), since the process started; and running the queued ones now
unsigned long long deferred_copy_count();
void run_deferred_copies();
// the running block's serial number (blocks run so far in the process, this one included): state a
// kernel header keeps per block is stale when it was made under another serial
unsigned long long block_serial();
// whether MEGAPATCH_CUDA_EMU_DRY_RUN is on (see emu.cc)
bool is_dry_run();

// block barrier; `file`/`line` name the call site (all threads must be at the same one)
void syncthreads(const char* file, int line);
int syncthreads_reduce(int op, int pred, const char* file, int line);  // op 0 count, 1 and, 2 or

// Named barriers (PTX bar.sync / bar.arrive id, count): `count` threads (a multiple of 32) complete
// a phase of barrier `id`; bar.sync waits for the phase to complete, bar.arrive does not. Unlike
// __syncthreads the call sites may differ. Ids 0 .. 15 as on the GPU (a kernel mixing id 0 with
// __syncthreads is not modelled: the emulator keeps them apart), 16 .. 31 the emulator's own.
constexpr unsigned kNamedBarriers = 32;
// setmaxnreg.inc / .dec (sm_90a; by every thread of a warpgroup, the same count): checks the count
// (a multiple of 8 in 24 .. 256, not below the warpgroup's for .inc nor above it for .dec, the
// warpgroup's registers at entry taken as the most the block size allows), and at the end of the
// block that every warpgroup finished its call and that together they hold at most the block's
// registers (a GPU's .inc would wait forever). Registers are not otherwise modelled.
void setmaxnreg(unsigned n, bool inc, const char* file, int line);
void named_barrier_sync(unsigned id, unsigned count, const char* file, int line);
void named_barrier_arrive(unsigned id, unsigned count, const char* file, int line);

// the message of the last emulator fault on this thread ("" if none)
const char* last_fault_message();

// Launch: the arguments are converted to the kernel's parameter types once, and every thread
// gets its own copy (as CUDA passes parameters by value).
template <typename... P, typename... A>
void launch(void (*fn)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "emu::launch: wrong number of kernel arguments");
  struct Ctx {
    void (*fn)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  Ctx ctx{fn, std::tuple<std::decay_t<P>...>(static_cast<std::decay_t<P>>(std::forward<A>(args))...)};
  auto invoke = [](void* c) {
    Ctx* x = static_cast<Ctx*>(c);
    std::apply([x](const std::decay_t<P>&... a) { x->fn(a...); }, x->args);
  };
  detail::launch_erased(+invoke, &ctx, grid, block, smem, stream);
}
inline void launch(void (*fn)(), dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
  auto invoke = [](void* c) { reinterpret_cast<void (*)()>(c)(); };
  detail::launch_erased(+invoke, reinterpret_cast<void*>(fn), grid, block, smem, stream);
}

// ---- warp primitives ---------------------------------------------------------------------------
// mode: 0 idx, 1 up, 2 down, 3 bfly (xor); the PTX shfl lane rule with CUDA's `c` operand
inline unsigned shfl_src_lane(unsigned lane, int mode, unsigned b, int width) {
  if (width <= 0 || width > 32) width = 32;
  unsigned segmask = (32u - static_cast<unsigned>(width)) & 0x1f;
  unsigned cval = mode == 1 ? 0u : 0x1fu;
  unsigned maxLane = (lane & segmask) | (cval & ~segmask);
  unsigned minLane = lane & segmask;
  b &= 0x1f;
  int j;
  bool pval;
  switch (mode) {
    case 1: j = static_cast<int>(lane) - static_cast<int>(b); pval = j >= static_cast<int>(maxLane); break;
    case 2: j = static_cast<int>(lane + b); pval = j <= static_cast<int>(maxLane); break;
    case 3: j = static_cast<int>(lane ^ b); pval = j <= static_cast<int>(maxLane); break;
    default: j = static_cast<int>(minLane | (b & ~segmask)); pval = j <= static_cast<int>(maxLane); break;
  }
  return pval ? static_cast<unsigned>(j) : lane;
}

// integers narrower than 4 bytes go through int, as CUDA's int overload takes them
template <typename T>
using shfl_t = std::conditional_t<(std::is_integral<T>::value || std::is_enum<T>::value) && sizeof(T) < 4, int, T>;

template <typename T> T shfl(unsigned mask, T value, int mode, unsigned b, int width) {
  using U = shfl_t<T>;
  static_assert(sizeof(U) == 4 || sizeof(U) == 8, "warp shuffles take 4- or 8-byte values");
  static_assert(std::is_trivially_copyable<U>::value, "warp shuffles take trivially copyable values");
  U v = static_cast<U>(value);
  unsigned lane = detail::lane_id();
  uint64_t* slots = detail::warp_slots();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(U));
  slots[lane] = bits;
  detail::warp_barrier(mask, "__shfl_sync");
  unsigned src = shfl_src_lane(lane, mode, b, width);
  U r = v;
  if (src < detail::warp_lanes()) std::memcpy(&r, &slots[src], sizeof(U));
  detail::warp_barrier(mask, "__shfl_sync");
  return static_cast<T>(r);
}

// op 0 ballot, 1 any, 2 all
inline unsigned vote(unsigned mask, int pred, int op) {
  unsigned lane = detail::lane_id();
  uint64_t* slots = detail::warp_slots();
  slots[lane] = pred ? 1 : 0;
  detail::warp_barrier(mask, op == 0 ? "__ballot_sync" : op == 1 ? "__any_sync" : "__all_sync");
  unsigned n = detail::warp_lanes();
  unsigned m = (mask | (1u << lane)) & (n >= 32 ? 0xffffffffu : ((1u << n) - 1));
  unsigned ballot = 0;
  for (unsigned i = 0; i < n; i++)
    if (((m >> i) & 1u) && slots[i]) ballot |= 1u << i;
  detail::warp_barrier(mask, op == 0 ? "__ballot_sync" : op == 1 ? "__any_sync" : "__all_sync");
  if (op == 0) return ballot;
  if (op == 1) return ballot != 0;
  return ballot == m;
}

}  // namespace emu

// ---- device built-ins ------------------------------------------------------------------------
#define threadIdx (::emu::cur_thread_idx())
#define blockIdx (::emu::cur_block_idx())
#define blockDim (::emu::cur_block_dim())
#define gridDim (::emu::cur_grid_dim())

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) ::emu::syncthreads_reduce(0, (p), __FILE__, __LINE__)
#define __syncthreads_and(p) ::emu::syncthreads_reduce(1, (p), __FILE__, __LINE__)
#define __syncthreads_or(p) ::emu::syncthreads_reduce(2, (p), __FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::detail::warp_barrier(mask, "__syncwarp"); }
template <typename T> inline T __shfl_sync(unsigned mask, T v, int srcLane, int width = 32) {
  return ::emu::shfl(mask, v, 0, static_cast<unsigned>(srcLane), width);
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shfl(mask, v, 1, delta, width);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shfl(mask, v, 2, delta, width);
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int laneMask, int width = 32) {
  return ::emu::shfl(mask, v, 3, static_cast<unsigned>(laneMask), width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::emu::vote(mask, pred, 0); }
inline int __any_sync(unsigned mask, int pred) { return static_cast<int>(::emu::vote(mask, pred, 1)); }
inline int __all_sync(unsigned mask, int pred) { return static_cast<int>(::emu::vote(mask, pred, 2)); }
inline unsigned __activemask() { return ::emu::detail::active_mask(); }

inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
[[noreturn]] inline void __trap() { ::emu::detail::fault("__trap"); }
[[noreturn]] inline void __brkpt() { ::emu::detail::fault("__brkpt"); }

// ---- integer intrinsics ------------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) |
         __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<__int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) {
  return static_cast<int>(static_cast<long long>((a << 8) >> 8) * ((b << 8) >> 8));
}
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; i++) r |= static_cast<unsigned>((v >> (((s >> (4 * i)) & 7) * 8)) & 0xff) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (s & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (s & 31));
}

// ---- bit casts -------------------------------------------------------------------------------
namespace emu {
template <typename To, typename From> inline To bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bitcast sizes differ");
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}
}  // namespace emu
inline unsigned __float_as_uint(float f) { return ::emu::bitcast<unsigned>(f); }
inline int __float_as_int(float f) { return ::emu::bitcast<int>(f); }
inline float __uint_as_float(unsigned u) { return ::emu::bitcast<float>(u); }
inline float __int_as_float(int u) { return ::emu::bitcast<float>(u); }
inline long long __double_as_longlong(double d) { return ::emu::bitcast<long long>(d); }
inline double __longlong_as_double(long long v) { return ::emu::bitcast<double>(v); }
inline int __double2hiint(double d) { return static_cast<int>(::emu::bitcast<unsigned long long>(d) >> 32); }
inline int __double2loint(double d) { return static_cast<int>(::emu::bitcast<unsigned long long>(d)); }
inline double __hiloint2double(int hi, int lo) {
  return ::emu::bitcast<double>((static_cast<unsigned long long>(static_cast<unsigned>(hi)) << 32) |
                                static_cast<unsigned>(lo));
}

// ---- float intrinsics --------------------------------------------------------------------------
// __expf as the GPU computes it: ex2.approx.ftz of x log2(e), the product rounded to float first
// (the main error for large |x|), a result below 2^-126 flushed to zero (ex2's own approximation
// is taken as exact here)
inline float __expf(float x) {
  const float t = x * 1.4426950408889634f;
  return t < -126.0f ? 0.0f : std::exp2(t);
}
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline void sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline void sincos(double x, double* s, double* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
// __fdividef as the GPU computes it: a times the reciprocal of b (two roundings), and 0 for
// 2^126 < |b| < 2^128 (where the reciprocal would be subnormal)
inline float __fdividef(float a, float b) {
  const float r = std::fabs(b) > 0x1p126f && std::isfinite(b) ? std::copysign(0.0f, b) : 1.0f / b;
  return a * r;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline double __dsqrt_rn(double x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float exp10f(float x) { return std::pow(10.0f, x); }
inline double exp10(double x) { return std::pow(10.0, x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
// inverse error function: M. Giles' single-precision approximation, refined by Newton steps on erf
inline double erfinv(double y) {
  if (!(y > -1.0 && y < 1.0)) {
    if (y == 1.0) return HUGE_VAL;
    if (y == -1.0) return -HUGE_VAL;
    return std::numeric_limits<double>::quiet_NaN();
  }
  double w = -std::log((1.0 - y) * (1.0 + y)), x;
  if (w < 5.0) {
    w -= 2.5;
    x = 2.81022636e-08;
    x = 3.43273939e-07 + x * w;
    x = -3.5233877e-06 + x * w;
    x = -4.39150654e-06 + x * w;
    x = 0.00021858087 + x * w;
    x = -0.00125372503 + x * w;
    x = -0.00417768164 + x * w;
    x = 0.246640727 + x * w;
    x = 1.50140941 + x * w;
  } else {
    w = std::sqrt(w) - 3.0;
    x = -0.000200214257;
    x = 0.000100950558 + x * w;
    x = 0.00134934322 + x * w;
    x = -0.00367342844 + x * w;
    x = 0.00573950773 + x * w;
    x = -0.0076224613 + x * w;
    x = 0.00943887047 + x * w;
    x = 1.00167406 + x * w;
    x = 2.83297682 + x * w;
  }
  x *= y;
  for (int i = 0; i < 3; i++) {
    double d = std::exp(-x * x) * 1.1283791670955126;  // 2 / sqrt(pi)
    if (d == 0.0) break;
    x -= (std::erf(x) - y) / d;
  }
  return x;
}
inline float erfinvf(float y) { return static_cast<float>(erfinv(static_cast<double>(y))); }
inline double erfcinv(double y) { return erfinv(1.0 - y); }
inline float erfcinvf(float y) { return static_cast<float>(erfinv(1.0 - static_cast<double>(y))); }
inline double normcdfinv(double p) { return -1.4142135623730951 * erfcinv(2.0 * p); }
inline float normcdfinvf(float p) { return static_cast<float>(normcdfinv(static_cast<double>(p))); }
inline float sinpif(float x) { return static_cast<float>(std::sin(3.14159265358979323846 * x)); }
inline float cospif(float x) { return static_cast<float>(std::cos(3.14159265358979323846 * x)); }
inline double sinpi(double x) { return std::sin(3.14159265358979323846 * x); }
inline double cospi(double x) { return std::cos(3.14159265358979323846 * x); }
inline void sincospif(float x, float* s, float* c) { *s = sinpif(x); *c = cospif(x); }
inline float normcdff(float x) { return 0.5f * std::erfc(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * std::erfc(-x * 0.70710678118654752440); }

// float -> integer conversions saturate, NaN -> 0 (as cvt.sat does)
namespace emu {
template <typename I, typename F> inline I sat_cvt(F v) {
  if (v != v) return 0;
  if (v <= static_cast<F>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (v >= static_cast<F>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(v);
}
}  // namespace emu
inline int __float2int_rn(float x) { return ::emu::sat_cvt<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return ::emu::sat_cvt<int>(std::trunc(x)); }
inline int __float2int_rd(float x) { return ::emu::sat_cvt<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return ::emu::sat_cvt<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return ::emu::sat_cvt<unsigned>(std::nearbyint(x)); }
inline unsigned __float2uint_rz(float x) { return ::emu::sat_cvt<unsigned>(std::trunc(x)); }
inline long long __float2ll_rn(float x) { return ::emu::sat_cvt<long long>(std::nearbyint(x)); }
inline long long __float2ll_rz(float x) { return ::emu::sat_cvt<long long>(std::trunc(x)); }
inline int __double2int_rn(double x) { return ::emu::sat_cvt<int>(std::nearbyint(x)); }
inline int __double2int_rz(double x) { return ::emu::sat_cvt<int>(std::trunc(x)); }
inline long long __double2ll_rn(double x) { return ::emu::sat_cvt<long long>(std::nearbyint(x)); }
inline long long __double2ll_rz(double x) { return ::emu::sat_cvt<long long>(std::trunc(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline double __ll2double_rn(long long x) { return static_cast<double>(x); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }

// ---- atomics (fibers of one OS thread: a plain read-modify-write is atomic) ---------------------
#define EMU_ATOMIC(name, T, expr)              \
  inline T name(T* address, T val) {          \
    T old = *address;                          \
    *address = (expr);                         \
    return old;                                \
  }
EMU_ATOMIC(atomicAdd, int, old + val)
EMU_ATOMIC(atomicAdd, unsigned, old + val)
EMU_ATOMIC(atomicAdd, unsigned long long, old + val)
EMU_ATOMIC(atomicAdd, float, old + val)
EMU_ATOMIC(atomicAdd, double, old + val)
EMU_ATOMIC(atomicSub, int, old - val)
EMU_ATOMIC(atomicSub, unsigned, old - val)
EMU_ATOMIC(atomicMin, int, val < old ? val : old)
EMU_ATOMIC(atomicMin, unsigned, val < old ? val : old)
EMU_ATOMIC(atomicMin, long long, val < old ? val : old)
EMU_ATOMIC(atomicMin, unsigned long long, val < old ? val : old)
EMU_ATOMIC(atomicMax, int, val > old ? val : old)
EMU_ATOMIC(atomicMax, unsigned, val > old ? val : old)
EMU_ATOMIC(atomicMax, long long, val > old ? val : old)
EMU_ATOMIC(atomicMax, unsigned long long, val > old ? val : old)
EMU_ATOMIC(atomicExch, int, val)
EMU_ATOMIC(atomicExch, unsigned, val)
EMU_ATOMIC(atomicExch, unsigned long long, val)
EMU_ATOMIC(atomicExch, float, val)
EMU_ATOMIC(atomicAnd, int, old & val)
EMU_ATOMIC(atomicAnd, unsigned, old & val)
EMU_ATOMIC(atomicAnd, unsigned long long, old & val)
EMU_ATOMIC(atomicOr, int, old | val)
EMU_ATOMIC(atomicOr, unsigned, old | val)
EMU_ATOMIC(atomicOr, unsigned long long, old | val)
EMU_ATOMIC(atomicXor, int, old ^ val)
EMU_ATOMIC(atomicXor, unsigned, old ^ val)
EMU_ATOMIC(atomicXor, unsigned long long, old ^ val)
EMU_ATOMIC(atomicInc, unsigned, old >= val ? 0u : old + 1u)
EMU_ATOMIC(atomicDec, unsigned, (old == 0u || old > val) ? val : old - 1u)
#undef EMU_ATOMIC
#define EMU_ATOMIC_CAS(T)                                 \
  inline T atomicCAS(T* address, T compare, T val) {      \
    T old = *address;                                     \
    if (old == compare) *address = val;                   \
    return old;                                           \
  }
EMU_ATOMIC_CAS(int)
EMU_ATOMIC_CAS(unsigned)
EMU_ATOMIC_CAS(unsigned long long)
EMU_ATOMIC_CAS(unsigned short)
#undef EMU_ATOMIC_CAS
