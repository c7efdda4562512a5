// Per-thread argument buffer, the current device and its stream, and the registration of every
// entry of the backend.
#include <atomic>
#include <mutex>
#include <vector>

#include "glue.h"

namespace mpc {

thread_local double* g_args = nullptr;

std::atomic<uint64_t> g_host_waits{0};
void note_host_wait() { g_host_waits.fetch_add(1, std::memory_order_relaxed); }
uint64_t host_wait_count() { return g_host_waits.load(std::memory_order_relaxed); }

namespace {
thread_local int g_device = -1;
std::mutex g_streams_mu;
std::vector<cudaStream_t> g_streams;  // per device, made on first use; never destroyed

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}
}  // namespace

int current_device() {
  if (g_device < 0) {
    check(cudaSetDevice(0), "cudaSetDevice(0)");
    g_device = 0;
  }
  return g_device;
}

cudaStream_t current_stream() {
  int d = current_device();
  std::lock_guard<std::mutex> lock(g_streams_mu);
  if (static_cast<int>(g_streams.size()) <= d) g_streams.resize(d + 1, nullptr);
  if (!g_streams[d]) {
    cudaStream_t s;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    g_streams[d] = s;
  }
  return g_streams[d];
}

// setArgBuffer(Float64Array): the buffer the entries read their arguments from (this thread's).
static Napi::Value SetArgBuffer(const Napi::CallbackInfo& info) {
  auto arr = info[0].As<Napi::Float64Array>();
  g_args = arr.Data();
  return info.Env().Undefined();
}

// setDevice(index): the device of the following calls on this thread.
MPC_ENTRY(SetDevice) {
  int d = info[0].As<Napi::Number>().Int32Value();
  if (d != g_device) {
    check(cudaSetDevice(d), ("cudaSetDevice(" + std::to_string(d) + ")").c_str());
    g_device = d;
  }
  return info.Env().Undefined();
}

static Napi::Value DeviceCount(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), device_count());
}

// synchronize(): waits for the current device's stream; a fault of an earlier kernel surfaces here.
MPC_ENTRY(Synchronize) {
  wait_stream(current_stream(), "synchronize");
  check(cudaGetLastError(), "synchronize");
  return info.Env().Undefined();
}

// Kernel families beyond the core: each registers its entries when its file is linked in.
#define MPC_FAMILIES(X) X(reduce) X(random) X(gemm) X(index) X(softmax) X(norm) X(glu) X(optim) X(attention)
#define MPC_DECLARE(f) __attribute__((weak)) void register_##f(Napi::Env env, Napi::Object exports);
MPC_FAMILIES(MPC_DECLARE)

void register_backend(Napi::Env env, Napi::Object exports) {
  exports.Set("setArgBuffer", Napi::Function::New(env, SetArgBuffer));
  exports.Set("setDevice", Napi::Function::New(env, SetDevice));
  exports.Set("deviceCount", Napi::Function::New(env, DeviceCount));
  exports.Set("synchronize", Napi::Function::New(env, Synchronize));
  // hostWaits(): how often the host waited for a device so far (glue.h)
  exports.Set("hostWaits", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
                return Napi::Number::New(info.Env(), static_cast<double>(host_wait_count()));
              }));
  register_memory(env, exports);
  register_elementwise(env, exports);
  register_nccl(env, exports);
  register_profile(env, exports);
  Napi::Array families = Napi::Array::New(env);
#define MPC_REGISTER(f)                             \
  if (register_##f) {                               \
    register_##f(env, exports);                     \
    families.Set(families.Length(), #f);            \
  }
  MPC_FAMILIES(MPC_REGISTER)
  exports.Set("families", families);
}

}  // namespace mpc
