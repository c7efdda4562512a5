// The addon of @megapatch/cuda. Three builds share these sources: with CUDA (device discovery and
// the tensor backend), without CUDA (discovery only, saying why), and the emulator
// (megapatch_cuda_emu.node: the same backend and kernels run on the CPU by native/emu).
#include <napi.h>

#ifdef MEGAPATCH_CUDA_EMULATOR
#include "cuda_emu.h"
#endif

namespace mpc {
#ifndef MEGAPATCH_CUDA_EMULATOR
void register_info(Napi::Env env, Napi::Object exports);
#endif
#if defined(MEGAPATCH_WITH_CUDA) || defined(MEGAPATCH_CUDA_EMULATOR)
void register_backend(Napi::Env env, Napi::Object exports);
#endif
}  // namespace mpc

namespace {
Napi::Object Init(Napi::Env env, Napi::Object exports) {
#ifndef MEGAPATCH_CUDA_EMULATOR
  mpc::register_info(env, exports);
#endif
#if defined(MEGAPATCH_WITH_CUDA) || defined(MEGAPATCH_CUDA_EMULATOR)
  mpc::register_backend(env, exports);
#endif
#ifdef MEGAPATCH_CUDA_EMULATOR
  exports.Set("emulator", true);
  // emuStats(): { launches, streamWaits, dryRun } (native/emu/emu.cc)
  exports.Set("emuStats", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
                Napi::Object o = Napi::Object::New(info.Env());
                o.Set("launches", Napi::Number::New(info.Env(), static_cast<double>(emu::launch_count())));
                o.Set("streamWaits", Napi::Number::New(info.Env(), static_cast<double>(emu::stream_wait_count())));
                o.Set("dryRun", Napi::Boolean::New(info.Env(), emu::is_dry_run()));
                return o;
              }));
#else
  exports.Set("emulator", false);
#endif
  return exports;
}
}  // namespace

NODE_API_MODULE(megapatch_cuda, Init)
