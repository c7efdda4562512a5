// Shared definitions of the CUDA kernels: dtypes and their bit-exact conversions (the same
// rounding as the CPU backend, native/src/common.h of @megapatch/tensor), tensor descriptors,
// strided offset computation with broadcasting, and the launch macro.
//
// Every .cu file under kernels/ is compiled twice: by nvcc for the GPU, and by the host C++
// compiler against native/emu/cuda_emu.h, which runs the same kernels on the CPU (one block at a
// time, each CUDA thread a fiber), so the kernels' logic is tested on machines without a GPU.
// Kernels may therefore use only what cuda_emu.h provides; see its header comment for the list.
// In particular: no CUDA headers but through this file, dynamic shared memory only through
// MP_DYNAMIC_SMEM, launches only through MP_LAUNCH, and no bare min/max (use mn/mx below).
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>

#ifdef MEGAPATCH_CUDA_EMULATOR
#include "cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif

#define MP_HD __host__ __device__ __forceinline__
#define MP_D __device__ __forceinline__
// unrolls the next loop under nvcc (the emulator's host compiler would warn of an unknown pragma)
#ifdef __CUDACC__
#define MP_UNROLL _Pragma("unroll")
#else
#define MP_UNROLL
#endif

#ifdef MEGAPATCH_CUDA_EMULATOR
// declare `T* name` pointing at the block's dynamic shared memory (the launch's smem bytes)
#define MP_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_smem())
#define MP_LAUNCH(fn, grid, block, smem, stream, ...) \
  ::emu::launch((fn), dim3(grid), dim3(block), (smem), (stream), __VA_ARGS__)
#else
#define MP_DYNAMIC_SMEM(T, name)                                 \
  extern __shared__ __align__(16) unsigned char mp_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(mp_dyn_smem_)
#define MP_LAUNCH(fn, grid, block, smem, stream, ...)                   \
  do {                                                                  \
    (fn)<<<dim3(grid), dim3(block), (smem), (stream)>>>(__VA_ARGS__);  \
  } while (0)
#endif

namespace mpc {

// Must match DTYPE_CODES in @megapatch/tensor's src/dtype.ts.
enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3, I32 = 4, I64 = 5, U8 = 6, Bool = 7 };

MP_HD int itemsize(DType d) {
  switch (d) {
    case DType::F32: case DType::I32: return 4;
    case DType::F64: case DType::I64: return 8;
    case DType::BF16: case DType::F16: return 2;
    default: return 1;
  }
}

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::U8: return "uint8";
    default: return "bool";
  }
}

template <typename A, typename B> MP_HD A mn(A a, B b) { return a < A(b) ? a : A(b); }
template <typename A, typename B> MP_HD A mx(A a, B b) { return a > A(b) ? a : A(b); }

// ---- bit casts and 16-bit floats (bit-exact with the CPU backend) ----------------------------
MP_HD float f32_from_bits(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
MP_HD uint32_t f32_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

MP_HD float bf16_to_f32(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }
// round to nearest even; a NaN stays NaN (quiet)
MP_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
MP_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) {
        man <<= 1;
        exp--;
      }
      man &= 0x3ffu;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  return f32_from_bits(u);
}
MP_HD uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal or zero in half: round with the float adder
    float a = f32_from_bits(absu) + 0.5f;  // 2^-1 aligns half subnormals (2^-24 units) low
    return static_cast<uint16_t>(sign | (f32_bits(a) - 0x3f000000u));
  }
  uint32_t mant_odd = (absu >> 13) & 1u;
  absu += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (absu >> 13));
}

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };
struct boolean { uint8_t v; };

// Storage type -> compute type (float for 16/32-bit floats; double for float64 and integers,
// which keeps int32 exact and int64 exact below 2^53), with loads and stores. Integer stores
// convert as the CPU backend does (C++ truncation of the double).
template <typename T> struct Tr;
template <> struct Tr<float> {
  using C = float;
  static MP_HD C ld(const float* p) { return *p; }
  static MP_HD void st(float* p, C v) { *p = v; }
};
template <> struct Tr<double> {
  using C = double;
  static MP_HD C ld(const double* p) { return *p; }
  static MP_HD void st(double* p, C v) { *p = v; }
};
template <> struct Tr<bf16> {
  using C = float;
  static MP_HD C ld(const bf16* p) { return bf16_to_f32(p->bits); }
  static MP_HD void st(bf16* p, C v) { p->bits = f32_to_bf16(v); }
};
template <> struct Tr<f16> {
  using C = float;
  static MP_HD C ld(const f16* p) { return f16_to_f32(p->bits); }
  static MP_HD void st(f16* p, C v) { p->bits = f32_to_f16(v); }
};

// 16-bit storage formats (bf16, f16): a float rounded to nearest even and back, and two floats
// rounded into one 32-bit word (lo in the low half), on a GPU by the hardware's conversion
// (cvt.rn.{bf16,f16}x2.f32: one instruction a pair; the same bits as the portable rounding but for
// a NaN's payload: the hardware's is canonical)
template <typename T> constexpr bool kHalf16 = std::is_same<T, bf16>::value || std::is_same<T, f16>::value;
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

// out[k] = v[k] rounded to T for k < N (out: N elements of T, 4-byte aligned for 16-bit T when N
// is even): 16-bit formats two at a time by pack2, on a GPU one conversion instruction a pair
// instead of the portable rounding's bit operations a value (~8 instructions: a memory-bound
// kernel's loop can be short of issue slots); other types by Tr<T>::st.
template <typename T, int N, typename C> MP_D void round_store(T* out, const C (&v)[N]) {
  if constexpr (kHalf16<T> && N % 2 == 0) {
    uint32_t w[N / 2];
#ifdef __CUDACC__
#pragma unroll
#endif
    for (int k = 0; k < N / 2; k++) w[k] = pack2<T>(static_cast<float>(v[2 * k]), static_cast<float>(v[2 * k + 1]));
    std::memcpy(out, w, sizeof(w));
  } else {
#ifdef __CUDACC__
#pragma unroll
#endif
    for (int k = 0; k < N; k++) Tr<T>::st(&out[k], v[k]);
  }
}
// p[0] += a, p[1] += b, each atomically (p 8-byte aligned, global memory): on compute capability
// 9.0 and later one vector reduction (atomicAdd of a float2: half the instructions and requests of
// two scalar ones), elsewhere and in the emulator two atomicAdds; either way each element gets
// one atomic addition.
// (Device code only: a host compiler reading this header for the launchers has no atomicAdd.)
#if defined(__CUDACC__) || defined(MEGAPATCH_CUDA_EMULATOR)
MP_D void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
#ifdef MEGAPATCH_CUDA_EMULATOR
  // the vector reduction's alignment, which a GPU of compute capability 9.0 faults on
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) ::emu::detail::fault("atomic_add2: address not 8-byte aligned");
#endif
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}
#endif
// Casts from double as static_cast does on x86-64 (the CPU backend's): NaN and out-of-range
// values give the most negative integer ("integer indefinite"), uint8 takes the low byte of the
// int32. Written out because the GPU's conversions saturate instead.
MP_HD int32_t x86_i32(double v) {
  return (v >= -2147483648.0 && v < 2147483648.0) ? static_cast<int32_t>(v) : INT32_MIN;
}
MP_HD int64_t x86_i64(double v) {
  return (v >= -9223372036854775808.0 && v < 9223372036854775808.0) ? static_cast<int64_t>(v) : INT64_MIN;
}
template <> struct Tr<int32_t> {
  using C = double;
  static MP_HD C ld(const int32_t* p) { return *p; }
  static MP_HD void st(int32_t* p, C v) { *p = x86_i32(v); }
};
template <> struct Tr<int64_t> {
  using C = double;
  static MP_HD C ld(const int64_t* p) { return static_cast<double>(*p); }
  static MP_HD void st(int64_t* p, C v) { *p = x86_i64(v); }
};
template <> struct Tr<uint8_t> {
  using C = double;
  static MP_HD C ld(const uint8_t* p) { return *p; }
  static MP_HD void st(uint8_t* p, C v) { *p = static_cast<uint8_t>(static_cast<uint32_t>(x86_i32(v))); }
};
template <> struct Tr<boolean> {
  using C = double;
  static MP_HD C ld(const boolean* p) { return p->v ? 1.0 : 0.0; }
  static MP_HD void st(boolean* p, C v) { p->v = v != 0 ? 1 : 0; }
};

// Calls F<T>(args...) with the storage type of a dtype.
#define MPC_DISPATCH_ALL(dtype, F, ...)                           \
  switch (dtype) {                                                \
    case ::mpc::DType::F32: F<float>(__VA_ARGS__); break;         \
    case ::mpc::DType::F64: F<double>(__VA_ARGS__); break;        \
    case ::mpc::DType::BF16: F<::mpc::bf16>(__VA_ARGS__); break;  \
    case ::mpc::DType::F16: F<::mpc::f16>(__VA_ARGS__); break;    \
    case ::mpc::DType::I32: F<int32_t>(__VA_ARGS__); break;       \
    case ::mpc::DType::I64: F<int64_t>(__VA_ARGS__); break;       \
    case ::mpc::DType::U8: F<uint8_t>(__VA_ARGS__); break;        \
    case ::mpc::DType::Bool: F<::mpc::boolean>(__VA_ARGS__); break; \
  }
#define MPC_DISPATCH_FLOAT(dtype, F, ...)                         \
  switch (dtype) {                                                \
    case ::mpc::DType::F32: F<float>(__VA_ARGS__); break;         \
    case ::mpc::DType::F64: F<double>(__VA_ARGS__); break;        \
    case ::mpc::DType::BF16: F<::mpc::bf16>(__VA_ARGS__); break;  \
    case ::mpc::DType::F16: F<::mpc::f16>(__VA_ARGS__); break;    \
    default: ::mpc::throw_error("expected a floating-point dtype"); \
  }

// ---- errors (host) ---------------------------------------------------------------------------
// Host launchers signal bad arguments with this exception; the N-API entry (backend/glue.h)
// turns it into a JS Error. Never thrown from device code.
struct KernelError {
  std::string message;
};
[[noreturn]] inline void throw_error(const std::string& msg) { throw KernelError{msg}; }

// Throws with `what` and CUDA's message when `err` is not cudaSuccess.
inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_error(std::string(what) + ": " + cudaGetErrorString(err));
}
// After a launch: a bad configuration (or, in the emulator, a kernel fault) surfaces here.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// The current device's entry of a process-wide table (one T per device index below 64), made by
// make(entry) under a lock at its first use and kept for the process (side streams and their
// events: never destroyed, since at exit the CUDA context may be gone before static destructors
// run). `what` names the caller in errors. One table per instantiation: one call site per T.
template <typename T, typename Make> T& per_current_device(const char* what, Make make) {
  static std::mutex mu;
  static T table[64];
  static bool made[64] = {};
  int dev = 0;
  check(cudaGetDevice(&dev), (std::string(what) + ": cudaGetDevice").c_str());
  if (dev < 0 || dev >= 64) throw_error(std::string(what) + ": device index " + std::to_string(dev) + " out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (!made[dev]) {
    make(table[dev]);
    made[dev] = true;
  }
  return table[dev];
}

// Stream-ordered device scratch owned by one launcher call, freed on the stream when the call
// returns or throws (later work on the stream may reuse it only after the call's kernels). The
// emulator runs launches synchronously and has no memory pools: plain cudaMalloc and cudaFree are
// equivalent there.
class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t s) : s_(s) {
#ifdef MEGAPATCH_CUDA_EMULATOR
    check(cudaMalloc(&p_, bytes), "scratch memory");
#else
    check(cudaMallocAsync(&p_, bytes, s_), "scratch memory");
#endif
  }
  ~Scratch() {
#ifdef MEGAPATCH_CUDA_EMULATOR
    cudaFree(p_);
#else
    cudaFreeAsync(p_, s_);
#endif
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename P> P* at(size_t byte_offset = 0) const {
    return reinterpret_cast<P*>(static_cast<char*>(p_) + byte_offset);
  }

 private:
  void* p_ = nullptr;
  cudaStream_t s_;
};

// ---- tensor descriptors (host) ---------------------------------------------------------------
constexpr int kMaxDims = 16;

// What JavaScript passes for a tensor (same layout as the CPU backend's argument buffer):
// address of element 0 of the view, dtype, shape and strides in elements.
struct TensorArg {
  char* data = nullptr;
  DType dtype = DType::F32;
  int ndim = 0;
  int64_t shape[kMaxDims];
  int64_t strides[kMaxDims];

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
  }
  bool contiguous() const {
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; i--) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  template <typename T> T* ptr() const { return reinterpret_cast<T*>(data); }
};

// ---- strided offsets (device) ----------------------------------------------------------------
// N operands iterated over one shape (the output's); each operand's byte strides, 0 on broadcast
// dimensions. Dimensions are coalesced on the host where every operand allows it, so the usual
// contiguous case has ndim 1 and the division loop runs once.
template <int N> struct Strided {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t strides[N][kMaxDims];  // bytes

  // byte offsets of linear element i (row-major over shape) for each operand
  MP_HD void offsets(int64_t i, int64_t* off) const {
    if (ndim == 1) {  // one merged dimension (every operand contiguous or evenly strided): no division
      for (int k = 0; k < N; k++) off[k] = i * strides[k][0];
      return;
    }
    for (int k = 0; k < N; k++) off[k] = 0;
    for (int d = ndim - 1; d >= 0; d--) {
      int64_t s = shape[d];
      int64_t q = i / s;
      int64_t r = i - q * s;
      i = q;
      for (int k = 0; k < N; k++) off[k] += r * strides[k][d];
    }
  }
};

// Byte strides of `t` broadcast (right-aligned) to `nd` dims of `shape`: 0 where t lacks the
// dimension or has size 1 there.
inline void broadcast_byte_strides(const TensorArg& t, int nd, int64_t* out) {
  int64_t isz = itemsize(t.dtype);
  int off = nd - t.ndim;
  for (int d = 0; d < nd; d++) {
    int td = d - off;
    out[d] = (td < 0 || t.shape[td] == 1) ? 0 : t.strides[td] * isz;
  }
}

// The iteration over `out`'s shape for operands ops[0..N) (ops[0] is normally `out`), with
// size-1 dimensions dropped and adjacent dimensions merged where every operand is contiguous
// across them.
template <int N> Strided<N> make_strided(const TensorArg& out, const TensorArg* const* ops) {
  int64_t st[N][kMaxDims];
  for (int k = 0; k < N; k++) broadcast_byte_strides(*ops[k], out.ndim, st[k]);
  Strided<N> s;
  s.ndim = 0;
  for (int d = 0; d < out.ndim; d++) {
    if (out.shape[d] == 1) continue;
    if (s.ndim > 0) {
      int p = s.ndim - 1;
      bool merge = true;
      for (int k = 0; k < N; k++)
        if (s.strides[k][p] != st[k][d] * out.shape[d]) merge = false;
      if (merge) {
        s.shape[p] *= out.shape[d];
        for (int k = 0; k < N; k++) s.strides[k][p] = st[k][d];
        continue;
      }
    }
    s.shape[s.ndim] = out.shape[d];
    for (int k = 0; k < N; k++) s.strides[k][s.ndim] = st[k][d];
    s.ndim++;
  }
  return s;
}

// V elements of T as one aligned unit: one load / store of up to 16 bytes (two for 32-byte packs)
template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// ---- launch geometry -------------------------------------------------------------------------
constexpr int kThreads = 256;
// Blocks for a grid-stride loop over n items: enough to fill the GPU, few in the emulator.
inline unsigned grid_for(int64_t n, int threads = kThreads) {
#ifdef MEGAPATCH_CUDA_EMULATOR
  const int64_t cap = 4;
#else
  const int64_t cap = 65535;
#endif
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<unsigned>(b < cap ? b : cap);
}

// Named barriers (PTX bar.sync / bar.arrive): `count` threads, a multiple of 32, of the block meet
// at barrier `id` (1 .. 15; 0 is __syncthreads'); bar_arrive counts this thread in without waiting
// (a producer's signal). Warpgroups of a block synchronise among themselves this way.
MP_D void bar_sync(int id, int count) {
#if defined(MEGAPATCH_CUDA_EMULATOR)
  ::emu::named_barrier_sync(static_cast<unsigned>(id), static_cast<unsigned>(count), __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__)
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#else
  (void)id;
  (void)count;
#endif
}
MP_D void bar_arrive(int id, int count) {
#if defined(MEGAPATCH_CUDA_EMULATOR)
  ::emu::named_barrier_arrive(static_cast<unsigned>(id), static_cast<unsigned>(count), __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__)
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#else
  (void)id;
  (void)count;
#endif
}

}  // namespace mpc
