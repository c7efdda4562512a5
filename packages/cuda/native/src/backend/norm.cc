// N-API entries of the normalisation and RoPE kernels (kernels/norm.h), with the argument order of
// @megapatch/tensor's CPU entries (native/src/norm.cc, rope.cc); optional operands arrive as a flag
// followed by the tensor. See src/kernels/norm.ts.
#include "../kernels/norm.h"
#include "glue.h"

namespace mpc {

namespace {
// an optional operand: a flag, then the tensor when the flag is set
const TensorArg* maybe(Args& a, TensorArg& slot) {
  if (a.i32() == 0) return nullptr;
  slot = a.tensor();
  return &slot;
}
}  // namespace

// normForward(y, x, hasW, w?, hasB, b?, hasMean, mean?, rstd, N, eps, center)
MPC_ENTRY(NormForwardE) {
  Args a;
  TensorArg y = a.tensor(), x = a.tensor();
  TensorArg ws, bs, ms;
  const TensorArg* w = maybe(a, ws);
  const TensorArg* b = maybe(a, bs);
  const TensorArg* mean = maybe(a, ms);
  TensorArg rstd = a.tensor();
  int64_t n = a.i64();
  double eps = a.num();
  bool center = a.i32() != 0;
  norm_forward(current_stream(), y, x, w, b, mean, rstd, n, eps, center);
  return info.Env().Undefined();
}

// normBackward(dx, g, x, hasW, w?, hasMean, mean?, rstd, hasDw, dw?, hasDb, db?, N, center, accumulate,
// paramsIntoMain)
MPC_ENTRY(NormBackwardE) {
  Args a;
  TensorArg dx = a.tensor(), g = a.tensor(), x = a.tensor();
  TensorArg ws, ms, dws, dbs;
  const TensorArg* w = maybe(a, ws);
  const TensorArg* mean = maybe(a, ms);
  TensorArg rstd = a.tensor();
  const TensorArg* dw = maybe(a, dws);
  const TensorArg* db = maybe(a, dbs);
  int64_t n = a.i64();
  bool center = a.i32() != 0;
  bool accumulate = a.i32() != 0;
  bool params_into_main = a.i32() != 0;
  norm_backward(current_stream(), dx, g, x, w, mean, rstd, dw, db, n, center, accumulate, params_into_main);
  return info.Env().Undefined();
}

// ropeApply(out, x, cos, sin, inverse)
MPC_ENTRY(RopeApplyE) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor(), cs = a.tensor(), sn = a.tensor();
  bool inverse = a.i32() != 0;
  rope_apply(current_stream(), out, x, cs, sn, inverse);
  return info.Env().Undefined();
}

void register_norm(Napi::Env env, Napi::Object exports) {
  exports.Set("normForward", Napi::Function::New(env, NormForwardE));
  exports.Set("normBackward", Napi::Function::New(env, NormBackwardE));
  exports.Set("ropeApply", Napi::Function::New(env, RopeApplyE));
}

}  // namespace mpc
