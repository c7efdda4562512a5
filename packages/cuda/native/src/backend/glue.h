// The N-API side of the CUDA backend: the shared argument buffer (the same layout as the CPU
// backend's, written by src/backend.ts), the entry macro that turns KernelError into a JS Error,
// and the per-device state every entry uses (current device, its stream, its cuBLASLt handle).
//
// Every entry reads its arguments with Args in the order src/backend.ts packs them, calls a host
// launcher from kernels/kernels.h on current_stream(), and returns. Kernels run asynchronously;
// only readInto / synchronize wait for the stream.
#pragma once

#include <napi.h>

#include <string>

#include "../kernels/common.cuh"

namespace mpc {

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
    if (t.ndim < 0 || t.ndim > kMaxDims)
      throw_error("tensors have at most " + std::to_string(kMaxDims) + " dimensions, got " + std::to_string(t.ndim));
    for (int i = 0; i < t.ndim; i++) t.shape[i] = i64();
    for (int i = 0; i < t.ndim; i++) t.strides[i] = i64();
    return t;
  }
};

// Wraps an entry body: KernelError becomes a JS exception.
#define MPC_ENTRY(name)                                                     \
  static Napi::Value name##_impl(const Napi::CallbackInfo& info);           \
  static Napi::Value name(const Napi::CallbackInfo& info) {                 \
    try {                                                                   \
      return name##_impl(info);                                             \
    } catch (const ::mpc::KernelError& e) {                                 \
      Napi::Error::New(info.Env(), e.message).ThrowAsJavaScriptException(); \
      return info.Env().Undefined();                                        \
    }                                                                       \
  }                                                                         \
  static Napi::Value name##_impl(const Napi::CallbackInfo& info)

// The device that entries run on (set by setDevice from JavaScript before a call on another
// device), and its stream: one non-blocking stream per device, made on first use.
int current_device();
cudaStream_t current_stream();

// Registration of each family's entries on the addon's exports (backend/*.cc); state.cc calls
// the families beyond memory and elementwise when their files are linked in.
void register_memory(Napi::Env env, Napi::Object exports);
void register_elementwise(Napi::Env env, Napi::Object exports);
// NCCL (loaded on first use; the emulator's own in an emulator build): backend/nccl.cc.
void register_nccl(Napi::Env env, Napi::Object exports);
// The kernel profiler's event marks (backend/profile.cc).
void register_profile(Napi::Env env, Napi::Object exports);
// cudaMalloc calls of the caching allocator since the process started (backend/memory.cc): a
// training step in its steady state makes none (each one synchronises the device).
uint64_t device_malloc_count();
// Waits until `stream` has finished; with NCCL communicators alive, a watchdog that turns a dead
// peer into an error (backend/nccl.cc). `what` names the caller in errors.
void wait_stream(cudaStream_t stream, const char* what);
// The same watchdog for an event (the caller counts the wait).
void wait_event(cudaEvent_t event, const char* what);
// Times the host has waited for a device since the process started (wait_stream, and an upload
// waiting for a staging buffer): reads and synchronize() wait, nothing else should (state.cc).
void note_host_wait();
uint64_t host_wait_count();

}  // namespace mpc
