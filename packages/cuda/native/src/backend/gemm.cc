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

// one matrix of the linear entries: (ptr, rs, cs)
static GemmMat read_mat2(Args& a) {
  GemmMat m{static_cast<char*>(a.ptr()), 0, 0, 0};
  m.rs = a.i64();
  m.cs = a.i64();
  return m;
}

// One GEMM C = A @ B as the entries pass it: M, N, K, A(ptr, rs, cs), B(ptr, rs, cs), C(ptr, rs).
static GemmProblem read_problem(Args& a) {
  GemmProblem p;
  p.M = a.i64();
  p.N = a.i64();
  p.K = a.i64();
  p.a = read_mat2(a);
  p.b = read_mat2(a);
  p.c = GemmMat{static_cast<char*>(a.ptr()), 0, 0, 1};
  p.c.rs = a.i64();
  return p;
}

// The head every linear entry starts with: the dtype and one GEMM (src/kernels/gemm.ts packHead
// writes it).
struct LinearHead {
  DType dt;
  GemmProblem p;
};
static LinearHead read_head(Args& a) {
  LinearHead h;
  h.dt = static_cast<DType>(a.i32());
  h.p = read_problem(a);
  return h;
}
static void run_head(const LinearHead& h, const GemmEpilogue& epi) {
  gemm(current_stream(), h.dt, 1, h.p.M, h.p.N, h.p.K, h.p.a, h.p.b, h.p.c, 1.0, 0.0, &epi);
}

// linearBias(dtype, M, N, K, A(ptr, rs, cs), B(ptr, rs, cs), C(ptr, rs), bias(ptr, dtype)):
// C = A @ B + bias with the bias added in the GEMM's epilogue, one matrix (src/kernels/gemm.ts
// passes linear's x as A and weight^T as B).
MPC_ENTRY(LinearBiasE) {
  Args a;
  const LinearHead h = read_head(a);
  GemmEpilogue epi;
  epi.bias = static_cast<const char*>(a.ptr());
  epi.dtype = static_cast<DType>(a.i32());
  run_head(h, epi);
  return info.Env().Undefined();
}

// linearActivation(dtype, M, N, K, A(ptr, rs, cs), B(ptr, rs, cs), C(ptr, rs), bias(ptr or 0,
// dtype), aux(ptr or 0, rs, dtype), act): aux = A @ B + bias and C = act(aux) in the GEMM's
// epilogue, one matrix; a null bias adds nothing, a null aux is not written.
MPC_ENTRY(LinearActivationE) {
  Args a;
  const LinearHead h = read_head(a);
  GemmEpilogue epi;
  epi.bias = static_cast<const char*>(a.ptr());
  const DType bias_dt = static_cast<DType>(a.i32());
  epi.aux = static_cast<char*>(a.ptr());
  epi.aux_rs = a.i64();
  const DType aux_dt = static_cast<DType>(a.i32());
  const int act = a.i32();
  if (act < static_cast<int>(GemmAct::Relu) || act > static_cast<int>(GemmAct::GeluTanh))
    throw_error("linearActivation: unknown activation code " + std::to_string(act));
  epi.act = static_cast<GemmAct>(act);
  // the GEMM checks the epilogue's dtype: the bias's, else the pre-activation's; both must match
  epi.dtype = epi.bias ? bias_dt : aux_dt;
  if (epi.bias && epi.aux && aux_dt != bias_dt)
    throw_error(std::string("linearActivation: the pre-activation is ") + dtype_name(aux_dt) + " but the bias is " +
                dtype_name(bias_dt) + "; both must have the input's dtype");
  run_head(h, epi);
  return info.Env().Undefined();
}

// linearWeightBiasGrad(dtype, M, N, K, A(ptr, rs, cs), B(ptr, rs, cs), C(ptr, rs), biasGrad(ptr,
// dtype)): C = A @ B and biasGrad = the row sums of A, one matrix (src/kernels/gemm.ts passes
// g^T as A and x as B: the weight and bias gradients of linear).
MPC_ENTRY(LinearWeightBiasGradE) {
  Args a;
  const LinearHead h = read_head(a);
  GemmEpilogue epi;
  epi.bias_grad = static_cast<char*>(a.ptr());
  epi.dtype = static_cast<DType>(a.i32());
  run_head(h, epi);
  return info.Env().Undefined();
}

// linearWeightGradAccumulate(dtype, M, N, K, A(ptr, rs, cs), B(ptr, rs, cs), C(ptr, rs)): C (float32)
// += A @ B with A and B of `dtype`, one matrix (src/kernels/gemm.ts passes g^T as A, x as B and the
// fp32 main gradient as C).
MPC_ENTRY(LinearWeightGradAccumulateE) {
  Args a;
  const LinearHead h = read_head(a);
  gemm_accumulate_f32(current_stream(), h.dt, h.p.M, h.p.N, h.p.K, h.p.a, h.p.b, h.p.c);
  return info.Env().Undefined();
}

// linearResidual(dtype, M, N, K, A(ptr, rs, cs), B(ptr, rs, cs), C(ptr, rs), R(ptr, rs)): C = A @ B + R,
// R added before the one rounding (src/kernels/gemm.ts passes linear's x as A, weight^T as B and
// the residual as R).
MPC_ENTRY(LinearResidualE) {
  Args a;
  const LinearHead h = read_head(a);
  GemmMat r{static_cast<char*>(a.ptr()), 0, 0, 1};
  r.rs = a.i64();
  gemm_residual(current_stream(), h.dt, h.p.M, h.p.N, h.p.K, h.p.a, h.p.b, h.p.c, r);
  return info.Env().Undefined();
}

// groupedGemm(dtype, count, count x [M, N, K, A(ptr, rs, cs), B(ptr, rs, cs), C(ptr, rs)]):
// C = A @ B for each problem, in one grouped GEMM (kernels/gemm.h grouped_gemm).
MPC_ENTRY(GroupedGemmE) {
  Args a;
  const DType dt = static_cast<DType>(a.i32());
  const int64_t count = a.i64();
  if (count < 0) throw_error("groupedGemm: negative problem count " + std::to_string(count));
  std::vector<GemmProblem> ps(static_cast<size_t>(count));
  for (GemmProblem& p : ps) p = read_problem(a);
  grouped_gemm(current_stream(), dt, ps);
  return info.Env().Undefined();
}

// groupedGemmSized(dtype, split, total, sizes(ptr), count, count x [M, N, K, A(ptr, rs, cs), B(ptr,
// rs, cs), C(ptr, rs)]): the grouped GEMM over device group sizes (kernels/gemm.h
// grouped_gemm_sized); false when the grouped mode cannot take them (nothing enqueued).
MPC_ENTRY(GroupedGemmSizedE) {
  Args a;
  const DType dt = static_cast<DType>(a.i32());
  SizedGroups g;
  g.split = a.i64();
  g.total = a.i64();
  g.sizes = static_cast<const int64_t*>(a.ptr());
  const int64_t count = a.i64();
  if (count < 0) throw_error("groupedGemmSized: negative problem count " + std::to_string(count));
  std::vector<GemmProblem> ps(static_cast<size_t>(count));
  for (GemmProblem& p : ps) p = read_problem(a);
  return Napi::Boolean::New(info.Env(), grouped_gemm_sized(current_stream(), dt, ps, g));
}

// gemmEngine(): "cuBLASLt <version>" or "emulated fallback"
static Napi::Value GemmEngineE(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), gemm_engine());
}

void register_gemm(Napi::Env env, Napi::Object exports) {
  exports.Set("gemm", Napi::Function::New(env, GemmE));
  exports.Set("gemmFallback", Napi::Function::New(env, GemmFallbackE));
  exports.Set("linearBias", Napi::Function::New(env, LinearBiasE));
  exports.Set("linearActivation", Napi::Function::New(env, LinearActivationE));
  exports.Set("linearWeightBiasGrad", Napi::Function::New(env, LinearWeightBiasGradE));
  exports.Set("linearWeightGradAccumulate", Napi::Function::New(env, LinearWeightGradAccumulateE));
  exports.Set("linearResidual", Napi::Function::New(env, LinearResidualE));
  exports.Set("groupedGemm", Napi::Function::New(env, GroupedGemmE));
  exports.Set("groupedGemmSized", Napi::Function::New(env, GroupedGemmSizedE));
  exports.Set("gemmEngine", Napi::Function::New(env, GemmEngineE));
}

}  // namespace mpc
