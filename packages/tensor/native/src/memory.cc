// Allocation, strided copies with dtype conversion, fills, and transfers to and from JS typed
// arrays.
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common.h"

namespace mp {

constexpr size_t kAlign = 64;

// A caching allocator: freed blocks are kept in per-size-class free lists and handed out again,
// so a training loop that allocates the same shapes every step stops paying for malloc, for
// munmap/mmap of large blocks and for the page faults of first touch. Size classes round up to
// an eighth of the size's power of two (at most 12.5% waste). The cache holds at most
// MEGAPATCH_ALLOCATOR_CACHE_MB (default 1024) MiB; emptyCache() returns it to the system.
namespace {

struct Cache {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free_lists;
  std::unordered_map<void*, size_t> sizes;  // live and cached blocks -> their class size
  size_t cached_bytes = 0;
  size_t limit = 1024ull << 20;
  Cache() {
    const char* env = std::getenv("MEGAPATCH_ALLOCATOR_CACHE_MB");
    if (env && *env) limit = static_cast<size_t>(std::strtoull(env, nullptr, 10)) << 20;
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: blocks may be freed during shutdown
  return *c;
}

size_t size_class(size_t bytes) {
  if (bytes <= kAlign) return kAlign;
  size_t p = 1;
  while (p <= bytes / 2) p <<= 1;  // p = largest power of two <= bytes
  size_t step = p >= 8 * kAlign ? p / 8 : kAlign;
  return ((bytes + step - 1) / step) * step;
}

void release_cached(Cache& c) {
  for (auto& [size, list] : c.free_lists) {
    for (void* p : list) {
      c.sizes.erase(p);
      std::free(p);
    }
    c.cached_bytes -= size * list.size();
    list.clear();
  }
}

}  // namespace

// alloc(bytes, zero) -> address of a 64-byte aligned block. 0 bytes still gets a unique
// address so that every storage has an owner.
static Napi::Value Alloc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t bytes = static_cast<size_t>(info[0].As<Napi::Number>().DoubleValue());
  bool zero = info[1].ToBoolean();
  size_t cls = size_class(bytes);
  Cache& c = cache();
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.free_lists.find(cls);
    if (it != c.free_lists.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      c.cached_bytes -= cls;
    }
  }
  if (!p) {
    p = std::aligned_alloc(kAlign, cls);
    if (!p) {
      {
        std::lock_guard<std::mutex> lock(c.mu);
        release_cached(c);
      }
      p = std::aligned_alloc(kAlign, cls);
    }
    if (!p) {
      Napi::Error::New(env, "out of memory: could not allocate " + std::to_string(bytes) + " bytes")
          .ThrowAsJavaScriptException();
      return env.Undefined();
    }
    std::lock_guard<std::mutex> lock(c.mu);
    c.sizes[p] = cls;
  }
  if (zero) std::memset(p, 0, bytes);
  return Napi::Number::New(env, static_cast<double>(reinterpret_cast<uintptr_t>(p)));
}

static Napi::Value Free(const Napi::CallbackInfo& info) {
  void* p = reinterpret_cast<void*>(static_cast<uintptr_t>(info[0].As<Napi::Number>().DoubleValue()));
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.sizes.find(p);
  if (it == c.sizes.end()) return info.Env().Undefined();  // not ours: ignore rather than corrupt
  size_t cls = it->second;
  if (c.cached_bytes + cls <= c.limit) {
    c.free_lists[cls].push_back(p);
    c.cached_bytes += cls;
  } else {
    c.sizes.erase(it);
    std::free(p);
  }
  return info.Env().Undefined();
}

// emptyCache(): frees every cached block; cachedBytes(): bytes held by the cache.
static Napi::Value EmptyCache(const Napi::CallbackInfo& info) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  release_cached(c);
  return info.Env().Undefined();
}

static Napi::Value CachedBytes(const Napi::CallbackInfo& info) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return Napi::Number::New(info.Env(), static_cast<double>(c.cached_bytes));
}

template <typename TI, typename TO>
static void copy_typed(const StridedLoop<2>& loop, char* const* base) {
  loop.run(base, 1, [](char* const* p, int64_t n, const int64_t* st) {
    TO* o = reinterpret_cast<TO*>(p[0]);
    const TI* i = reinterpret_cast<const TI*>(p[1]);
    int64_t so = st[0] / static_cast<int64_t>(sizeof(TO)), si = st[1] / static_cast<int64_t>(sizeof(TI));
    if (so == 1 && si == 1) {
      for (int64_t k = 0; k < n; k++) Tr<TO>::st(o + k, static_cast<typename Tr<TO>::C>(Tr<TI>::ld(i + k)));
    } else {
      for (int64_t k = 0; k < n; k++)
        Tr<TO>::st(o + k * so, static_cast<typename Tr<TO>::C>(Tr<TI>::ld(i + k * si)));
    }
  });
}

template <typename TI>
static void copy_from(DType out, const StridedLoop<2>& loop, char* const* base) {
  switch (out) {
    case DType::F32: copy_typed<TI, float>(loop, base); break;
    case DType::F64: copy_typed<TI, double>(loop, base); break;
    case DType::BF16: copy_typed<TI, bf16>(loop, base); break;
    case DType::F16: copy_typed<TI, f16>(loop, base); break;
    case DType::I32: copy_typed<TI, int32_t>(loop, base); break;
    case DType::I64: copy_typed<TI, int64_t>(loop, base); break;
    case DType::U8: copy_typed<TI, uint8_t>(loop, base); break;
    case DType::Bool: copy_typed<TI, boolean>(loop, base); break;
  }
}

// copy(dst, src): dst[...] = cast(src[...]) with src broadcast to dst's shape.
MP_ENTRY(Copy) {
  Args a;
  TensorArg dst = a.tensor(), src = a.tensor();
  int64_t sd[kMaxDims], ss[kMaxDims];
  broadcast_byte_strides(dst, dst.ndim, dst.shape, sd);
  broadcast_byte_strides(src, dst.ndim, dst.shape, ss);
  const int64_t* st[2] = {sd, ss};
  StridedLoop<2> loop(dst.ndim, dst.shape, st);
  char* base[2] = {dst.data, src.data};
  if (dst.dtype == src.dtype && dst.contiguous() && src.contiguous() && dst.numel() == src.numel()) {
    std::memcpy(dst.data, src.data, dst.numel() * itemsize(dst.dtype));
    return info.Env().Undefined();
  }
  MP_DISPATCH_ALL(src.dtype, copy_from, dst.dtype, loop, base);
  return info.Env().Undefined();
}

template <typename T>
static void fill_typed(const TensorArg& t, double value) {
  int64_t s[kMaxDims];
  broadcast_byte_strides(t, t.ndim, t.shape, s);
  const int64_t* st[1] = {s};
  StridedLoop<1> loop(t.ndim, t.shape, st);
  char* base[1] = {t.data};
  T v;
  Tr<T>::st(&v, static_cast<typename Tr<T>::C>(value));
  loop.run(base, 1, [v](char* const* p, int64_t n, const int64_t* st) {
    T* o = reinterpret_cast<T*>(p[0]);
    int64_t so = st[0] / static_cast<int64_t>(sizeof(T));
    for (int64_t k = 0; k < n; k++) o[k * so] = v;
  });
}

// fill(t, value)
MP_ENTRY(Fill) {
  Args a;
  TensorArg t = a.tensor();
  double v = a.num();
  MP_DISPATCH_ALL(t.dtype, fill_typed, t, v);
  return info.Env().Undefined();
}

// readInto(address, bytes, typedArray): copies native bytes into a JS typed array.
static Napi::Value ReadInto(const Napi::CallbackInfo& info) {
  auto* src = reinterpret_cast<const char*>(static_cast<uintptr_t>(info[0].As<Napi::Number>().DoubleValue()));
  size_t bytes = static_cast<size_t>(info[1].As<Napi::Number>().DoubleValue());
  auto arr = info[2].As<Napi::TypedArray>();
  char* dst = static_cast<char*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
  if (bytes > arr.ByteLength()) {
    Napi::RangeError::New(info.Env(), "readInto: destination too small").ThrowAsJavaScriptException();
    return info.Env().Undefined();
  }
  std::memcpy(dst, src, bytes);
  return info.Env().Undefined();
}

// writeFrom(address, typedArray): copies a JS typed array into native memory.
static Napi::Value WriteFrom(const Napi::CallbackInfo& info) {
  auto* dst = reinterpret_cast<char*>(static_cast<uintptr_t>(info[0].As<Napi::Number>().DoubleValue()));
  auto arr = info[1].As<Napi::TypedArray>();
  const char* src = static_cast<const char*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
  std::memcpy(dst, src, arr.ByteLength());
  return info.Env().Undefined();
}

void register_memory(Napi::Env env, Napi::Object exports) {
  exports.Set("alloc", Napi::Function::New(env, Alloc));
  exports.Set("free", Napi::Function::New(env, Free));
  exports.Set("emptyCache", Napi::Function::New(env, EmptyCache));
  exports.Set("cachedBytes", Napi::Function::New(env, CachedBytes));
  exports.Set("copy", Napi::Function::New(env, Copy));
  exports.Set("fill", Napi::Function::New(env, Fill));
  exports.Set("readInto", Napi::Function::New(env, ReadInto));
  exports.Set("writeFrom", Napi::Function::New(env, WriteFrom));
}

}  // namespace mp
