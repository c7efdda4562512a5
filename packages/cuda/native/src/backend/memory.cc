// The caching device allocator, copies and fills, and transfers between device memory and JS
// typed arrays.
//
// Allocation: blocks are rounded up to a size class (an eighth of the size's power of two, at
// least 512 bytes: at most 12.5% waste) and a freed block goes to its device's free list of that
// class, to be handed out again without cudaMalloc (which is slow and synchronises the device).
// Every kernel of a device runs on that device's one stream, so a block freed while kernels that
// use it are still queued is safe to reuse: the next user's kernels run after them. When
// cudaMalloc fails, the device's cached blocks are released (after a synchronisation) and the
// allocation is tried once more; then the error names the sizes. emptyCache() releases them too.
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "../kernels/elementwise.h"
#include "glue.h"

namespace mpc {

namespace {

constexpr size_t kMinBlock = 512;

struct DeviceCache {
  std::unordered_map<size_t, std::vector<void*>> free_lists;
  std::unordered_map<void*, size_t> sizes;  // live and cached blocks -> class size
  size_t cached_bytes = 0;
  size_t live_bytes = 0;
};

std::mutex g_mu;
std::vector<DeviceCache*> g_caches;  // per device; never destroyed (blocks may be freed at exit)

DeviceCache& cache_of(int device) {
  if (static_cast<int>(g_caches.size()) <= device) g_caches.resize(device + 1, nullptr);
  if (!g_caches[device]) g_caches[device] = new DeviceCache();
  return *g_caches[device];
}

size_t size_class(size_t bytes) {
  if (bytes <= kMinBlock) return kMinBlock;
  size_t p = 1;
  while (p <= bytes / 2) p <<= 1;  // largest power of two <= bytes
  size_t step = p >= 8 * kMinBlock ? p / 8 : kMinBlock;
  return ((bytes + step - 1) / step) * step;
}

// Frees every cached block of the device (the caller holds g_mu and made the device current).
void release_cached(DeviceCache& c) {
  cudaStreamSynchronize(current_stream());
  for (auto& [size, list] : c.free_lists) {
    for (void* p : list) {
      c.sizes.erase(p);
      cudaFree(p);
    }
    c.cached_bytes -= size * list.size();
    list.clear();
  }
}

std::string mib(size_t bytes) { return std::to_string((bytes + (1 << 19)) >> 20) + " MiB"; }

std::atomic<uint64_t> g_device_mallocs{0};

}  // namespace

uint64_t device_malloc_count() { return g_device_mallocs.load(std::memory_order_relaxed); }

// alloc(bytes, zero) -> device address. 0 bytes still gets a block, so that every storage has an
// owner and a unique address.
MPC_ENTRY(Alloc) {
  Napi::Env env = info.Env();
  size_t bytes = static_cast<size_t>(info[0].As<Napi::Number>().DoubleValue());
  bool zero = info[1].ToBoolean();
  size_t cls = size_class(bytes);
  int device = current_device();
  cudaStream_t stream = current_stream();
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    DeviceCache& c = cache_of(device);
    auto it = c.free_lists.find(cls);
    if (it != c.free_lists.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      c.cached_bytes -= cls;
    } else {
      g_device_mallocs.fetch_add(1, std::memory_order_relaxed);
      cudaError_t err = cudaMalloc(&p, cls);
      if (err != cudaSuccess) {
        cudaGetLastError();
        size_t cached = c.cached_bytes;
        release_cached(c);
        err = cudaMalloc(&p, cls);
        if (err != cudaSuccess) {
          cudaGetLastError();
          size_t free_b = 0, total_b = 0;
          cudaMemGetInfo(&free_b, &total_b);
          throw_error("CUDA out of memory on cuda:" + std::to_string(device) + ": tried to allocate " + mib(bytes) +
                      "; " + mib(c.live_bytes) + " held by tensors, " + mib(cached) +
                      " was cached (released), " + mib(free_b) + " free of " + mib(total_b));
        }
      }
      c.sizes[p] = cls;
    }
    c.live_bytes += cls;
  }
  if (zero) check(cudaMemsetAsync(p, 0, bytes, stream), "alloc: cudaMemsetAsync");
  return Napi::Number::New(env, static_cast<double>(reinterpret_cast<uintptr_t>(p)));
}

MPC_ENTRY(Free) {
  void* p = reinterpret_cast<void*>(static_cast<uintptr_t>(info[0].As<Napi::Number>().DoubleValue()));
  std::lock_guard<std::mutex> lock(g_mu);
  DeviceCache& c = cache_of(current_device());
  auto it = c.sizes.find(p);
  if (it == c.sizes.end()) return info.Env().Undefined();  // not ours: ignore rather than corrupt
  c.free_lists[it->second].push_back(p);
  c.cached_bytes += it->second;
  c.live_bytes -= it->second;
  return info.Env().Undefined();
}

MPC_ENTRY(EmptyCache) {
  std::lock_guard<std::mutex> lock(g_mu);
  release_cached(cache_of(current_device()));
  return info.Env().Undefined();
}

MPC_ENTRY(CachedBytes) {
  std::lock_guard<std::mutex> lock(g_mu);
  return Napi::Number::New(info.Env(), static_cast<double>(cache_of(current_device()).cached_bytes));
}

// memGetInfo() -> [free, total] bytes of the current device.
MPC_ENTRY(MemGetInfo) {
  size_t free_b = 0, total_b = 0;
  check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  Napi::Array a = Napi::Array::New(info.Env(), 2);
  a.Set(0u, static_cast<double>(free_b));
  a.Set(1u, static_cast<double>(total_b));
  return a;
}

// copy(dst, src): dst = cast(src), src broadcast to dst's shape.
MPC_ENTRY(Copy) {
  Args a;
  TensorArg dst = a.tensor(), src = a.tensor();
  copy(current_stream(), dst, src);
  return info.Env().Undefined();
}

// fill(t, value)
MPC_ENTRY(Fill) {
  Args a;
  TensorArg t = a.tensor();
  double v = a.num();
  fill(current_stream(), t, v);
  return info.Env().Undefined();
}

// readInto(address, bytes, typedArray): waits for the stream, then copies device bytes into the
// typed array. The one place a host read synchronises.
MPC_ENTRY(ReadInto) {
  auto* src = reinterpret_cast<const char*>(static_cast<uintptr_t>(info[0].As<Napi::Number>().DoubleValue()));
  size_t bytes = static_cast<size_t>(info[1].As<Napi::Number>().DoubleValue());
  auto arr = info[2].As<Napi::TypedArray>();
  if (bytes > arr.ByteLength()) throw_error("readInto: destination too small");
  char* dst = static_cast<char*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
  cudaStream_t s = current_stream();
  if (bytes > 0) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s), "readInto: cudaMemcpyAsync");
  wait_stream(s, "readInto");
  return info.Env().Undefined();
}

// writeFrom(address, typedArray): copies a JS typed array to the device, in stream order. From
// pageable memory the call returns once the source has been staged, so the array may change after.
MPC_ENTRY(WriteFrom) {
  auto* dst = reinterpret_cast<char*>(static_cast<uintptr_t>(info[0].As<Napi::Number>().DoubleValue()));
  auto arr = info[1].As<Napi::TypedArray>();
  const char* src = static_cast<const char*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
  size_t bytes = arr.ByteLength();
  if (bytes == 0) return info.Env().Undefined();
  cudaStream_t s = current_stream();
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s), "writeFrom: cudaMemcpyAsync");
  // pageable source: make sure the bytes left the JS buffer before JS may reuse it
  wait_stream(s, "writeFrom");
  return info.Env().Undefined();
}

void register_memory(Napi::Env env, Napi::Object exports) {
  exports.Set("alloc", Napi::Function::New(env, Alloc));
  exports.Set("free", Napi::Function::New(env, Free));
  exports.Set("emptyCache", Napi::Function::New(env, EmptyCache));
  exports.Set("cachedBytes", Napi::Function::New(env, CachedBytes));
  exports.Set("memGetInfo", Napi::Function::New(env, MemGetInfo));
  exports.Set("copy", Napi::Function::New(env, Copy));
  exports.Set("fill", Napi::Function::New(env, Fill));
  exports.Set("readInto", Napi::Function::New(env, ReadInto));
  exports.Set("writeFrom", Napi::Function::New(env, WriteFrom));
}

}  // namespace mpc
