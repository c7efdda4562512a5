// N-API entries of the batched GEMM (kernels/gemm.h), with the argument order of
// @megapatch/tensor's CPU entry (native/src/gemm.cc, packed by src/backend/cpu.ts).
#include "../kernels/gemm.h"
#include "glue.h"

namespace mpc {

static GemmMat read_mat(Args& a, bool has_cs) {
  GemmMat m;
  m.data = static_cast<char*>(a.ptr());
  m.bs = a.i64();
  m.rs = a.i64();
  m.cs = has_cs ? a.i64() : 1;
  return m;
}

// gemm(dtype, batch, M, N, K, A(ptr, bs, rs, cs), B(ptr, bs, rs, cs), C(ptr, bs, rs), alpha, beta):
// C[i] = alpha * A[i] @ B[i] + beta * C[i]. `fallback` forces the tiled kernel (gemmFallback,
// for comparing it with cuBLASLt on a GPU).
static Napi::Value gemm_entry(const Napi::CallbackInfo& info, bool fallback) {
  Args a;
  DType dt = static_cast<DType>(a.i32());
  int64_t batch = a.i64(), M = a.i64(), N = a.i64(), K = a.i64();
  GemmMat A = read_mat(a, true);
  GemmMat B = read_mat(a, true);
  GemmMat C = read_mat(a, false);
  double alpha = a.num(), beta = a.num();
  if (fallback) gemm_fallback(current_stream(), dt, batch, M, N, K, A, B, C, alpha, beta);
  else gemm(current_stream(), dt, batch, M, N, K, A, B, C, alpha, beta);
  return info.Env().Undefined();
}

MPC_ENTRY(GemmE) { return gemm_entry(info, false); }
MPC_ENTRY(GemmFallbackE) { return gemm_entry(info, true); }

// linearBias(dtype, M, N, K, A(ptr, rs, cs), B(ptr, rs, cs), C(ptr, rs), bias(ptr, dtype)):
// C = A @ B + bias with the bias added in the GEMM's epilogue, one matrix (src/kernels/gemm.ts
// passes linear's x as A and weight^T as B).
MPC_ENTRY(LinearBiasE) {
  Args a;
  DType dt = static_cast<DType>(a.i32());
  int64_t M = a.i64(), N = a.i64(), K = a.i64();
  GemmMat A{static_cast<char*>(a.ptr()), 0, 0, 0};
  A.rs = a.i64();
  A.cs = a.i64();
  GemmMat B{static_cast<char*>(a.ptr()), 0, 0, 0};
  B.rs = a.i64();
  B.cs = a.i64();
  GemmMat C{static_cast<char*>(a.ptr()), 0, 0, 1};
  C.rs = a.i64();
  GemmBias bias{static_cast<const char*>(a.ptr()), DType::F32};
  bias.dtype = static_cast<DType>(a.i32());
  gemm(current_stream(), dt, 1, M, N, K, A, B, C, 1.0, 0.0, &bias);
  return info.Env().Undefined();
}

// gemmEngine(): "cuBLASLt <version>" or "emulated fallback"
static Napi::Value GemmEngineE(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), gemm_engine());
}

void register_gemm(Napi::Env env, Napi::Object exports) {
  exports.Set("gemm", Napi::Function::New(env, GemmE));
  exports.Set("gemmFallback", Napi::Function::New(env, GemmFallbackE));
  exports.Set("linearBias", Napi::Function::New(env, LinearBiasE));
  exports.Set("gemmEngine", Napi::Function::New(env, GemmEngineE));
}

}  // namespace mpc
