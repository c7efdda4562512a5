// N-API entries of the random numbers: philox(out, dist, seedLo, seedHi, offset, a, b), packed as
// @megapatch/tensor's src/backend/cpu.ts packs it (out contiguous; the caller advances its offset
// by ceil(numel / 4)), and philoxBlock(c0, c1, c2, c3, k0, k1) -> [4 words] (host, for the
// known-answer tests, as the CPU addon). The kernel is in kernels/random.cu.
#include "../kernels/random.h"
#include "glue.h"

namespace mpc {

MPC_ENTRY(PhiloxEntry) {
  Args a;
  TensorArg out = a.tensor();
  int dist = a.i32();
  uint32_t k0 = static_cast<uint32_t>(a.num()), k1 = static_cast<uint32_t>(a.num());
  uint64_t offset = static_cast<uint64_t>(a.num());
  double lo = a.num(), hi = a.num();
  philox(current_stream(), out, dist, k0, k1, offset, lo, hi);
  return info.Env().Undefined();
}

static Napi::Value PhiloxBlockEntry(const Napi::CallbackInfo& info) {
  uint32_t w[6];
  for (int i = 0; i < 6; i++) w[i] = info[i].As<Napi::Number>().Uint32Value();
  uint32_t r[4];
  philox_block(w, w[4], w[5], r);
  Napi::Array arr = Napi::Array::New(info.Env(), 4);
  for (uint32_t i = 0; i < 4; i++) arr.Set(i, Napi::Number::New(info.Env(), r[i]));
  return arr;
}

void register_random(Napi::Env env, Napi::Object exports) {
  exports.Set("philox", Napi::Function::New(env, PhiloxEntry));
  exports.Set("philoxBlock", Napi::Function::New(env, PhiloxBlockEntry));
}

}  // namespace mpc
