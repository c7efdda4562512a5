// Module entry: the argument buffer, threading, build information, and registration of every
// kernel family.
#include <cstdlib>
#include <thread>

#include "common.h"

#ifdef MEGAPATCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace mp {

thread_local double* g_args = nullptr;
static int g_num_threads = 1;

int num_threads() { return g_num_threads; }

static void apply_num_threads(int n) {
  g_num_threads = n < 1 ? 1 : n;
#ifdef _OPENMP
  // oneDNN (bf16 GEMM, OpenMP build only: see CMakeLists.txt) sizes its teams by
  // omp_get_max_threads() on the calling thread, so this sets its thread count too.
  omp_set_num_threads(g_num_threads);
#endif
#ifdef MEGAPATCH_HAVE_OPENBLAS
  // GEMMs are split across our OpenMP threads (gemm.cc); OpenBLAS's own pool would compete with
  // them for the same cores.
  openblas_set_num_threads(1);
#endif
}

static int default_num_threads() {
  const char* env = std::getenv("MEGAPATCH_NUM_THREADS");
  if (env && *env) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// setArgBuffer(Float64Array): the buffer JS fills before each kernel call. The reference held in
// the instance data keeps its backing store alive for as long as the module is loaded.
struct InstanceData {
  Napi::Reference<Napi::Float64Array> args;
};

static Napi::Value SetArgBuffer(const Napi::CallbackInfo& info) {
  auto arr = info[0].As<Napi::Float64Array>();
  auto* data = info.Env().GetInstanceData<InstanceData>();
  data->args = Napi::Persistent(arr);
  g_args = arr.Data();
  return info.Env().Undefined();
}

static Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  apply_num_threads(info[0].As<Napi::Number>().Int32Value());
  return info.Env().Undefined();
}

static Napi::Value GetNumThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), g_num_threads);
}

static Napi::Value BuildInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
#ifdef MEGAPATCH_HAVE_OPENBLAS
  o.Set("blas", "openblas");
  o.Set("blasConfig", openblas_get_config());
#else
  o.Set("blas", "portable");
  o.Set("blasConfig", "megapatch blocked GEMM");
#endif
  std::string simd;
#if defined(__AVX512F__)
  simd = "avx512f";
#elif defined(__AVX2__)
  simd = "avx2";
#elif defined(__AVX__)
  simd = "avx";
#elif defined(__SSE4_2__)
  simd = "sse4.2";
#elif defined(__ARM_NEON)
  simd = "neon";
#else
  simd = "scalar";
#endif
#if defined(__FMA__)
  simd += "+fma";
#endif
  o.Set("simd", simd);
#ifdef _OPENMP
  o.Set("openmp", true);
#else
  o.Set("openmp", false);
#endif
  o.Set("threads", g_num_threads);
  o.Set("compiler", __VERSION__);
  describe_gemm(env, o);
  return o;
}

void register_cross_entropy_shard(Napi::Env env, Napi::Object exports);  // cross-entropy-shard.cc

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new InstanceData());
  apply_num_threads(default_num_threads());
  exports.Set("setArgBuffer", Napi::Function::New(env, SetArgBuffer));
  exports.Set("setNumThreads", Napi::Function::New(env, SetNumThreads));
  exports.Set("getNumThreads", Napi::Function::New(env, GetNumThreads));
  exports.Set("buildInfo", Napi::Function::New(env, BuildInfo));
  register_memory(env, exports);
  register_elementwise(env, exports);
  register_reduce(env, exports);
  register_gemm(env, exports);
  register_random(env, exports);
  register_softmax(env, exports);
  register_norm(env, exports);
  register_rope(env, exports);
  register_glu(env, exports);
  register_cross_entropy_shard(env, exports);
  register_attention(env, exports);
  register_index(env, exports);
  register_optim(env, exports);
  return exports;
}

}  // namespace mp

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return mp::Init(env, exports); }

NODE_API_MODULE(megapatch_tensor, InitModule)
