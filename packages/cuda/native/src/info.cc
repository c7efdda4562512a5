// Device discovery for @megapatch/cuda: what the addon was built with, the driver and runtime
// versions, every visible GPU and the NCCL version. Built without CUDA, it only says why.
#include <napi.h>

#include <string>

#ifdef MEGAPATCH_WITH_CUDA
#include <cuda_runtime_api.h>
#ifdef MEGAPATCH_WITH_NCCL
#include <nccl.h>
#endif
#endif

namespace {

#ifdef MEGAPATCH_WITH_CUDA
// "13.0" from CUDA's integer versions (1000 * major + 10 * minor)
std::string versionString(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}
#endif

Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);
#ifndef MEGAPATCH_WITH_CUDA
  out.Set("built", false);
  out.Set("reason", std::string(MEGAPATCH_CUDA_REASON));
#else
  out.Set("built", true);
  out.Set("toolkit", std::string(MEGAPATCH_CUDA_TOOLKIT));
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) == cudaSuccess) out.Set("runtime", versionString(runtime));
  int driver = 0;
  // 0 when no driver is installed
  if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0) out.Set("driver", versionString(driver));
#ifdef MEGAPATCH_WITH_NCCL
  int nccl = 0;
  if (ncclGetVersion(&nccl) == ncclSuccess) {
    // NCCL_VERSION_CODE: major * 10000 + minor * 100 + patch (2.9 and later)
    out.Set("nccl", std::to_string(nccl / 10000) + "." + std::to_string((nccl % 10000) / 100) + "." +
                        std::to_string(nccl % 100));
  }
#endif
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  Napi::Array devices = Napi::Array::New(env);
  if (err != cudaSuccess) {
    out.Set("deviceError", std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
    cudaGetLastError();  // clear the sticky error so later calls start clean
    count = 0;
  }
  for (int i = 0; i < count; i++) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    Napi::Object d = Napi::Object::New(env);
    d.Set("index", i);
    d.Set("name", std::string(p.name));
    d.Set("totalMemory", static_cast<double>(p.totalGlobalMem));
    d.Set("computeCapability", std::to_string(p.major) + "." + std::to_string(p.minor));
    d.Set("multiProcessors", p.multiProcessorCount);
    d.Set("l2CacheBytes", p.l2CacheSize);
    d.Set("sharedMemoryPerBlockOptin", static_cast<double>(p.sharedMemPerBlockOptin));
    devices.Set(devices.Length(), d);
  }
  out.Set("devices", devices);
#endif
  return out;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("info", Napi::Function::New(env, Info));
  return exports;
}

}  // namespace

NODE_API_MODULE(megapatch_cuda, Init)
