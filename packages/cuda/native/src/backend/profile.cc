// The kernel profiler's device side: timing events recorded on the current device's stream
// between the backend's entries (src/profile.ts decides where). A mark costs one cudaEventRecord;
// events come from a per-device pool and go back to it when their times are collected, so a
// long profile allocates no more events than its largest collection window.
#include <mutex>
#include <vector>

#include "glue.h"

namespace mpc {

namespace {

struct Marks {
  std::vector<cudaEvent_t> pool;  // recorded and collected: free for reuse
  std::vector<cudaEvent_t> live;  // recorded since the last collection, in order
};

std::mutex g_mu;
std::vector<Marks> g_marks;  // per device

Marks& marks_of(int device) {
  if (static_cast<int>(g_marks.size()) <= device) g_marks.resize(device + 1);
  return g_marks[device];
}

}  // namespace

// profileMark() -> index: records an event on the current device's stream; its index counts the
// marks since the last profileCollect() on this device.
MPC_ENTRY(ProfileMark) {
  int device = current_device();
  cudaStream_t stream = current_stream();
  std::lock_guard<std::mutex> lock(g_mu);
  Marks& m = marks_of(device);
  cudaEvent_t e;
  if (m.pool.empty()) {
    check(cudaEventCreateWithFlags(&e, cudaEventDefault), "profileMark: cudaEventCreate");
  } else {
    e = m.pool.back();
    m.pool.pop_back();
  }
  m.live.push_back(e);
  check(cudaEventRecord(e, stream), "profileMark: cudaEventRecord");
  return Napi::Number::New(info.Env(), static_cast<double>(m.live.size() - 1));
}

// profileCollect() -> { ms: Float64Array, mallocs, hostWaits }: waits for the current device's
// stream, then each mark's time in ms after the first mark since the last collection (empty when
// there were none); the events return to the pool. `mallocs`: the allocator's cudaMalloc calls so
// far; `hostWaits`: the host's waits for a device so far (this one included).
MPC_ENTRY(ProfileCollect) {
  Napi::Env env = info.Env();
  int device = current_device();
  wait_stream(current_stream(), "profileCollect");
  std::vector<cudaEvent_t> live;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    live.swap(marks_of(device).live);
  }
  Napi::Float64Array ms = Napi::Float64Array::New(env, live.size());
  cudaError_t err = cudaSuccess;
  for (size_t i = 0; i < live.size() && err == cudaSuccess; i++) {
    float t = 0.0f;
    if (i > 0) err = cudaEventElapsedTime(&t, live[0], live[i]);
    ms[i] = t;
  }
  {
    std::lock_guard<std::mutex> lock(g_mu);
    Marks& m = marks_of(device);
    m.pool.insert(m.pool.end(), live.begin(), live.end());
  }
  check(err, "profileCollect: cudaEventElapsedTime");
  Napi::Object out = Napi::Object::New(env);
  out.Set("ms", ms);
  out.Set("mallocs", Napi::Number::New(env, static_cast<double>(device_malloc_count())));
  // the host's waits so far, this collection's own included
  out.Set("hostWaits", Napi::Number::New(env, static_cast<double>(host_wait_count())));
  return out;
}

void register_profile(Napi::Env env, Napi::Object exports) {
  exports.Set("profileMark", Napi::Function::New(env, ProfileMark));
  exports.Set("profileCollect", Napi::Function::New(env, ProfileCollect));
}

}  // namespace mpc
