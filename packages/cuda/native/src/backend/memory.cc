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
#include <cstdlib>
#include <cstring>
#include <deque>
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
  note_host_wait();
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

// Uploads (writeFrom) through page-locked staging. A copy from a JS typed array (pageable memory)
// can only be queued once its bytes are somewhere the copy engine may read later, so each upload
// first copies them into a ring of page-locked memory per device, queues the copy from there and
// records an event; the ring's bytes are reused once that event has completed. The host waits
// only when the ring is full of copies still queued (the oldest one's event), never for the
// stream: an upload does not synchronise, a read does. Uploads over half the ring (checkpoint
// weights) copy directly and wait for the stream, as they did before.
constexpr size_t kStagingAlign = 256;
struct Staging {
  char* base = nullptr;
  size_t size = 0;
  size_t head = 0;  // where the next upload goes
  size_t asked = 0;  // the size last allocated (or refused: not asked again)
  struct Flight {
    size_t start;
    cudaEvent_t done;
  };
  std::deque<Flight> flights;  // queued copies, oldest first: each holds the ring from its start to the next one's (the newest: to head)
  std::vector<cudaEvent_t> spare;
};
std::vector<Staging*> g_staging;  // per device; never destroyed (copies may be queued at exit)
size_t g_staging_bytes = [] {
  const char* v = std::getenv("MEGAPATCH_CUDA_STAGING_BYTES");
  long long n = v ? std::atoll(v) : -1;
  return n >= 0 ? static_cast<size_t>(n) : size_t(16) << 20;
}();
struct UploadCounts {
  uint64_t staged = 0, direct = 0, waits = 0, unstaged_devices = 0;
} g_uploads;

// Returns the ring's bytes of the copies that have finished, oldest first.
void staging_retire(Staging& st) {
  while (!st.flights.empty()) {
    cudaError_t q = cudaEventQuery(st.flights.front().done);
    if (q == cudaErrorNotReady) {
      (void)cudaGetLastError();  // "not ready" is no error: leave none behind (as PyTorch's query)
      break;
    }
    check(q, "writeFrom: cudaEventQuery");
    st.spare.push_back(st.flights.front().done);
    st.flights.pop_front();
  }
}

Staging& staging_of(int device) {
  if (static_cast<int>(g_staging.size()) <= device) g_staging.resize(device + 1, nullptr);
  if (!g_staging[device]) g_staging[device] = new Staging();
  Staging& st = *g_staging[device];
  staging_retire(st);
  if (st.asked != g_staging_bytes && st.flights.empty()) {
    st.asked = g_staging_bytes;
    // first use, or resized (setStagingBytes) while idle
    if (st.base) check(cudaFreeHost(st.base), "writeFrom: cudaFreeHost");
    st.base = nullptr;
    st.size = 0;
    void* p = nullptr;
    if (g_staging_bytes > 0 && cudaHostAlloc(&p, g_staging_bytes, cudaHostAllocPortable) == cudaSuccess) {
      st.base = static_cast<char*>(p);
      st.size = g_staging_bytes;
    } else if (g_staging_bytes > 0) {
      // no page-locked memory to be had (a locked-memory limit): uploads copy directly and wait
      (void)cudaGetLastError();
      g_uploads.unstaged_devices++;
    }
    st.head = 0;
  }
  return st;
}

// The offset of `n` free bytes of the ring (n a multiple of kStagingAlign, at most half of it).
// Free space is [head, size) and [0, oldest start) when the queued copies do not wrap, else
// [head, oldest start); the head never catches up with the oldest start (strict comparisons), so
// head == oldest start means an empty ring.
size_t staging_take(Staging& st, size_t n) {
  for (;;) {
    staging_retire(st);
    if (st.flights.empty()) return 0;
    size_t tail = st.flights.front().start;
    if (st.head > tail) {
      if (st.head + n <= st.size) return st.head;
      if (n < tail) return 0;
    } else if (st.head + n < tail) {
      return st.head;
    }
    // full of queued copies: wait for the oldest
    note_host_wait();
    g_uploads.waits++;
    wait_event(st.flights.front().done, "writeFrom");
  }
}

// Page-locked memory per device that readIntoMany gathers reads in (grown to a power of two).
struct Download {
  char* base = nullptr;
  size_t size = 0;
};
std::vector<Download> g_downloads;

// The device's buffer of at least `bytes`, or nullptr when no page-locked memory can be had.
Download* download_of(int device, size_t bytes) {
  if (static_cast<int>(g_downloads.size()) <= device) g_downloads.resize(device + 1);
  Download& d = g_downloads[device];
  if (d.size < bytes) {
    size_t size = 64 << 10;
    while (size < bytes) size <<= 1;
    if (d.base) check(cudaFreeHost(d.base), "readIntoMany: cudaFreeHost");
    d.base = nullptr;
    d.size = 0;
    void* p = nullptr;
    if (cudaHostAlloc(&p, size, cudaHostAllocPortable) != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    d.base = static_cast<char*>(p);
    d.size = size;
  }
  return &d;
}

// Queues the upload of `bytes` from `src` to `dst` on `s` through the current device's ring; false
// (nothing done) when the ring is off or the upload is over half of it.
bool upload_staged(char* dst, const char* src, size_t bytes, cudaStream_t s) {
  size_t n = (bytes + kStagingAlign - 1) / kStagingAlign * kStagingAlign;
  std::lock_guard<std::mutex> lock(g_mu);
  Staging& st = staging_of(current_device());
  if (st.size == 0 || n > st.size / 2) {
    g_uploads.direct++;
    return false;
  }
  size_t at = staging_take(st, n);
  std::memcpy(st.base + at, src, bytes);
  check(cudaMemcpyAsync(dst, st.base + at, bytes, cudaMemcpyHostToDevice, s), "writeFrom: cudaMemcpyAsync");
  cudaEvent_t done;
  if (st.spare.empty()) {
    check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "writeFrom: cudaEventCreateWithFlags");
  } else {
    done = st.spare.back();
    st.spare.pop_back();
  }
  cudaError_t rec = cudaEventRecord(done, s);
  if (rec != cudaSuccess) st.spare.push_back(done);
  check(rec, "writeFrom: cudaEventRecord");
  st.flights.push_back({at, done});
  st.head = at + n;
  g_uploads.staged++;
  return true;
}

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

// readIntoMany(addresses, bytes, typedArrays): several reads with one wait. Each source is copied
// into page-locked memory of the device (asynchronous copies: no wait between them), the stream is
// waited for once, then each typed array gets its bytes. The queued checks of the tensor package
// (a few bytes each, tens of them at a read in a MoE step) are read this way.
MPC_ENTRY(ReadIntoMany) {
  auto addrs = info[0].As<Napi::Float64Array>();
  auto sizes = info[1].As<Napi::Float64Array>();
  auto dsts = info[2].As<Napi::Array>();
  size_t n = addrs.ElementLength();
  if (sizes.ElementLength() != n || dsts.Length() != n) throw_error("readIntoMany: expected as many sizes and arrays as addresses");
  std::vector<size_t> at(n + 1, 0);
  for (size_t i = 0; i < n; i++) {
    size_t b = static_cast<size_t>(sizes[i]);
    if (b > dsts.Get(i).As<Napi::TypedArray>().ByteLength()) throw_error("readIntoMany: destination too small");
    at[i + 1] = at[i] + (b + 15) / 16 * 16;
  }
  cudaStream_t s = current_stream();
  auto dst_of = [&](size_t i) {
    auto arr = dsts.Get(i).As<Napi::TypedArray>();
    return static_cast<char*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
  };
  auto src_of = [&](size_t i) { return reinterpret_cast<const char*>(static_cast<uintptr_t>(addrs[i])); };
  std::lock_guard<std::mutex> lock(g_mu);
  Download* d = download_of(current_device(), at[n]);
  if (!d) {
    // no page-locked memory: one read after another, as readInto does
    for (size_t i = 0; i < n; i++) {
      size_t b = static_cast<size_t>(sizes[i]);
      if (b > 0) check(cudaMemcpyAsync(dst_of(i), src_of(i), b, cudaMemcpyDeviceToHost, s), "readIntoMany: cudaMemcpyAsync");
      wait_stream(s, "readIntoMany");
    }
    return info.Env().Undefined();
  }
  for (size_t i = 0; i < n; i++) {
    size_t b = static_cast<size_t>(sizes[i]);
    if (b > 0) check(cudaMemcpyAsync(d->base + at[i], src_of(i), b, cudaMemcpyDeviceToHost, s), "readIntoMany: cudaMemcpyAsync");
  }
  wait_stream(s, "readIntoMany");
  for (size_t i = 0; i < n; i++) {
    size_t b = static_cast<size_t>(sizes[i]);
    if (b > 0) std::memcpy(dst_of(i), d->base + at[i], b);
  }
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
  if (upload_staged(dst, src, bytes, s)) return info.Env().Undefined();
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s), "writeFrom: cudaMemcpyAsync");
  // pageable source: make sure the bytes left the JS buffer before JS may reuse it
  wait_stream(s, "writeFrom");
  return info.Env().Undefined();
}

// setStagingBytes(bytes): the size of each device's upload ring from its next idle moment on (0:
// every upload copies directly and waits); MEGAPATCH_CUDA_STAGING_BYTES sets it at start (16 MiB).
MPC_ENTRY(SetStagingBytes) {
  double v = info[0].As<Napi::Number>().DoubleValue();
  if (!(v >= 0) || v > 4.0 * (1ull << 30)) throw_error("setStagingBytes: expected 0 to 4 GiB, got " + std::to_string(v));
  std::lock_guard<std::mutex> lock(g_mu);
  g_staging_bytes = static_cast<size_t>(v) / kStagingAlign * kStagingAlign;
  return info.Env().Undefined();
}

// uploadStats() -> { staged, direct, waits, unstagedDevices, stagingBytes }: uploads through the
// ring and direct ones since the process started, how often an upload waited for the ring, and how
// often a device's ring could not be allocated (page-locked memory refused: its uploads then wait).
MPC_ENTRY(UploadStats) {
  Napi::Env env = info.Env();
  std::lock_guard<std::mutex> lock(g_mu);
  Napi::Object o = Napi::Object::New(env);
  o.Set("staged", Napi::Number::New(env, static_cast<double>(g_uploads.staged)));
  o.Set("direct", Napi::Number::New(env, static_cast<double>(g_uploads.direct)));
  o.Set("waits", Napi::Number::New(env, static_cast<double>(g_uploads.waits)));
  o.Set("unstagedDevices", Napi::Number::New(env, static_cast<double>(g_uploads.unstaged_devices)));
  o.Set("stagingBytes", Napi::Number::New(env, static_cast<double>(g_staging_bytes)));
  return o;
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
  exports.Set("readIntoMany", Napi::Function::New(env, ReadIntoMany));
  exports.Set("setStagingBytes", Napi::Function::New(env, SetStagingBytes));
  exports.Set("uploadStats", Napi::Function::New(env, UploadStats));
  exports.Set("writeFrom", Napi::Function::New(env, WriteFrom));
}

}  // namespace mpc
