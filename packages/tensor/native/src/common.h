// Shared definitions of the native CPU backend: dtypes and their conversions, the argument
// buffer through which JavaScript passes tensor descriptors, and the strided iteration helpers
// every kernel family uses.
#pragma once

#include <napi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mp {

// Must match DTYPE_CODES in src/dtype.ts.
enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3, I32 = 4, I64 = 5, U8 = 6, Bool = 7 };

inline size_t itemsize(DType d) {
  switch (d) {
    case DType::F32: case DType::I32: return 4;
    case DType::F64: case DType::I64: return 8;
    case DType::BF16: case DType::F16: return 2;
    default: return 1;
  }
}

// ---- 16-bit floats -------------------------------------------------------------------------
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, NaN stays NaN (quiet).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; exp--; }
      man &= 0x3ffu;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal or zero in half: round with the float adder
    float a;
    std::memcpy(&a, &absu, 4);
    a += 0.5f;  // 2^-1 aligns half subnormals (2^-24 units) into the low mantissa bits
    uint32_t r;
    std::memcpy(&r, &a, 4);
    return static_cast<uint16_t>(sign | (r - 0x3f000000u));
  }
  uint32_t mant_odd = (absu >> 13) & 1u;
  absu += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (absu >> 13));
}

// Load/store between a storage type and its compute type (float for 16/32-bit floats, double
// for float64 and integers, which keeps int32 exact and int64 exact below 2^53).
template <typename T> struct Tr;
template <> struct Tr<float> { using C = float; static C ld(const float* p) { return *p; } static void st(float* p, C v) { *p = v; } };
template <> struct Tr<double> { using C = double; static C ld(const double* p) { return *p; } static void st(double* p, C v) { *p = v; } };
template <> struct Tr<bf16> { using C = float; static C ld(const bf16* p) { return bf16_to_f32(p->bits); } static void st(bf16* p, C v) { p->bits = f32_to_bf16(v); } };
template <> struct Tr<f16> { using C = float; static C ld(const f16* p) { return f16_to_f32(p->bits); } static void st(f16* p, C v) { p->bits = f32_to_f16(v); } };
template <> struct Tr<int32_t> { using C = double; static C ld(const int32_t* p) { return *p; } static void st(int32_t* p, C v) { *p = static_cast<int32_t>(v); } };
template <> struct Tr<int64_t> { using C = double; static C ld(const int64_t* p) { return static_cast<double>(*p); } static void st(int64_t* p, C v) { *p = static_cast<int64_t>(v); } };
template <> struct Tr<uint8_t> { using C = double; static C ld(const uint8_t* p) { return *p; } static void st(uint8_t* p, C v) { *p = static_cast<uint8_t>(v); } };
struct boolean { uint8_t v; };
template <> struct Tr<boolean> { using C = double; static C ld(const boolean* p) { return p->v ? 1.0 : 0.0; } static void st(boolean* p, C v) { p->v = v != 0 ? 1 : 0; } };

// Calls F::template run<T>(args...) with the storage type of a dtype.
#define MP_DISPATCH_ALL(dtype, F, ...)                                      \
  switch (dtype) {                                                          \
    case ::mp::DType::F32: F<float>(__VA_ARGS__); break;                    \
    case ::mp::DType::F64: F<double>(__VA_ARGS__); break;                   \
    case ::mp::DType::BF16: F<::mp::bf16>(__VA_ARGS__); break;              \
    case ::mp::DType::F16: F<::mp::f16>(__VA_ARGS__); break;                \
    case ::mp::DType::I32: F<int32_t>(__VA_ARGS__); break;                  \
    case ::mp::DType::I64: F<int64_t>(__VA_ARGS__); break;                  \
    case ::mp::DType::U8: F<uint8_t>(__VA_ARGS__); break;                   \
    case ::mp::DType::Bool: F<::mp::boolean>(__VA_ARGS__); break;           \
  }
#define MP_DISPATCH_FLOAT(dtype, F, ...)                                    \
  switch (dtype) {                                                          \
    case ::mp::DType::F32: F<float>(__VA_ARGS__); break;                    \
    case ::mp::DType::F64: F<double>(__VA_ARGS__); break;                   \
    case ::mp::DType::BF16: F<::mp::bf16>(__VA_ARGS__); break;              \
    case ::mp::DType::F16: F<::mp::f16>(__VA_ARGS__); break;                \
    default: throw_error("expected a floating-point dtype");                \
  }

// ---- errors ----------------------------------------------------------------------------------
// Kernels are compiled without C++ exceptions in node-addon-api; they signal errors with this
// exception type, caught at the N-API boundary (see MP_ENTRY) and rethrown as a JS Error.
struct KernelError {
  std::string message;
};
[[noreturn]] inline void throw_error(const std::string& msg) { throw KernelError{msg}; }

// ---- the argument buffer -------------------------------------------------------------------
// JavaScript writes kernel arguments into one shared Float64Array (set once per thread with
// setArgBuffer) and then calls the kernel with no JS arguments. This keeps the fixed cost of a
// call to a few hundred nanoseconds. Pointers are passed as doubles (user-space addresses fit in
// 53 bits).
constexpr int kMaxDims = 16;

struct TensorArg {
  char* data = nullptr;  // address of element 0 of the view
  DType dtype = DType::F32;
  int ndim = 0;
  int64_t shape[kMaxDims];
  int64_t strides[kMaxDims];  // in elements

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

extern thread_local double* g_args;

struct Args {
  const double* p;
  Args() : p(g_args) {}
  double num() { return *p++; }
  int64_t i64() { return static_cast<int64_t>(*p++); }
  int i32() { return static_cast<int>(*p++); }
  void* ptr() { return reinterpret_cast<void*>(static_cast<uintptr_t>(*p++)); }
  TensorArg tensor() {
    TensorArg t;
    t.data = static_cast<char*>(ptr());
    t.dtype = static_cast<DType>(i32());
    t.ndim = i32();
    // shape/strides are fixed arrays: more dims would overflow them (and every kernel's loops)
    if (t.ndim < 0 || t.ndim > kMaxDims)
      throw_error("tensors have at most " + std::to_string(kMaxDims) + " dimensions, got " + std::to_string(t.ndim));
    for (int i = 0; i < t.ndim; i++) t.shape[i] = i64();
    for (int i = 0; i < t.ndim; i++) t.strides[i] = i64();
    return t;
  }
};

// Wraps a kernel body: converts KernelError into a JS exception.
#define MP_ENTRY(name)                                                       \
  static Napi::Value name##_impl(const Napi::CallbackInfo& info);            \
  Napi::Value name(const Napi::CallbackInfo& info) {                         \
    try {                                                                    \
      return name##_impl(info);                                              \
    } catch (const ::mp::KernelError& e) {                                   \
      Napi::Error::New(info.Env(), e.message).ThrowAsJavaScriptException();  \
      return info.Env().Undefined();                                         \
    }                                                                        \
  }                                                                          \
  static Napi::Value name##_impl(const Napi::CallbackInfo& info)

// ---- threading -----------------------------------------------------------------------------
int num_threads();
// Below this many elements an elementwise kernel stays on one thread.
constexpr int64_t kParallelGrain = 32768;

// Runs fn(begin, end) over [0, n) split into contiguous chunks, one per thread, when the work
// (n * cost_per_item) is large enough to pay for waking the pool.
template <typename F>
void parallel_for(int64_t n, int64_t cost_per_item, F fn) {
#ifdef _OPENMP
  int nt = num_threads();
  if (nt > 1 && n > 1 && n * cost_per_item >= kParallelGrain) {
    int chunks = static_cast<int>(n < nt ? n : nt);
#pragma omp parallel num_threads(chunks)
    {
      // split by the team actually granted: a nested region (nesting off) gets one thread
      int t = omp_get_thread_num(), team = omp_get_num_threads();
      int64_t b = n * t / team, e = n * (t + 1) / team;
      if (b < e) fn(b, e);
    }
    return;
  }
#endif
  fn(0, n);
}

// ---- strided iteration ---------------------------------------------------------------------
// N operands over one iteration shape (operand 0 is usually the output); strides are in bytes
// and 0 for broadcast dimensions. Dimensions are coalesced where every operand allows, and the
// innermost dimension is handed to `inner(ptrs, n, strides)` as one run.
template <int N>
struct StridedLoop {
  int ndim = 0;
  int64_t shape[kMaxDims];
  int64_t strides[N][kMaxDims];

  StridedLoop(int nd, const int64_t* shp, const int64_t* const* st) {
    // drop size-1 dims, then merge neighbours that are contiguous for every operand
    for (int d = 0; d < nd; d++) {
      if (shp[d] == 1) continue;
      bool merge = ndim > 0;
      for (int k = 0; k < N && merge; k++)
        merge = strides[k][ndim - 1] == st[k][d] * shp[d];
      if (merge) {
        shape[ndim - 1] *= shp[d];
        for (int k = 0; k < N; k++) strides[k][ndim - 1] = st[k][d];
      } else {
        shape[ndim] = shp[d];
        for (int k = 0; k < N; k++) strides[k][ndim] = st[k][d];
        ndim++;
      }
    }
    if (ndim == 0) {
      ndim = 1;
      shape[0] = 1;
      for (int k = 0; k < N; k++) strides[k][0] = 0;
    }
  }

  template <typename F>
  void run(char* const* base, int64_t cost_per_item, F inner) const {
    int64_t inner_n = shape[ndim - 1];
    int64_t outer = 1;
    for (int d = 0; d < ndim - 1; d++) outer *= shape[d];
    int64_t inner_st[N];
    for (int k = 0; k < N; k++) inner_st[k] = strides[k][ndim - 1];
    if (outer == 1) {
      // split the one long run across threads
      parallel_for(inner_n, cost_per_item, [&](int64_t b, int64_t e) {
        char* p[N];
        for (int k = 0; k < N; k++) p[k] = base[k] + b * inner_st[k];
        inner(p, e - b, inner_st);
      });
      return;
    }
    parallel_for(outer, inner_n * cost_per_item, [&](int64_t b, int64_t e) {
      int64_t idx[kMaxDims];
      for (int64_t o = b; o < e; o++) {
        int64_t rem = o;
        for (int d = ndim - 2; d >= 0; d--) {
          idx[d] = rem % shape[d];
          rem /= shape[d];
        }
        char* p[N];
        for (int k = 0; k < N; k++) {
          p[k] = base[k];
          for (int d = 0; d < ndim - 1; d++) p[k] += idx[d] * strides[k][d];
        }
        inner(p, inner_n, inner_st);
      }
    });
  }
};

// Byte strides of `t` broadcast to an iteration shape of `nd` dims (right-aligned).
inline void broadcast_byte_strides(const TensorArg& t, int nd, const int64_t* shape, int64_t* out) {
  size_t isz = itemsize(t.dtype);
  int off = nd - t.ndim;
  for (int d = 0; d < nd; d++) {
    int td = d - off;
    if (td < 0 || t.shape[td] == 1) out[d] = 0;
    else out[d] = t.strides[td] * static_cast<int64_t>(isz);
    (void)shape;
  }
}

// Registration of each kernel family's functions on the addon's exports.
void register_memory(Napi::Env env, Napi::Object exports);
void register_elementwise(Napi::Env env, Napi::Object exports);
void register_reduce(Napi::Env env, Napi::Object exports);
void register_gemm(Napi::Env env, Napi::Object exports);
void describe_gemm(Napi::Env env, Napi::Object info);
void register_random(Napi::Env env, Napi::Object exports);
void register_softmax(Napi::Env env, Napi::Object exports);
void register_norm(Napi::Env env, Napi::Object exports);
void register_rope(Napi::Env env, Napi::Object exports);
void register_glu(Napi::Env env, Napi::Object exports);
void register_attention(Napi::Env env, Napi::Object exports);
void register_index(Napi::Env env, Napi::Object exports);
void register_optim(Napi::Env env, Napi::Object exports);

}  // namespace mp
