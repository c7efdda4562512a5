// N-API entries of the elementwise kernels; arguments in the order src/backend.ts packs them.
#include "../kernels/elementwise.h"
#include "glue.h"

namespace mpc {

// unary(out, x, op, p0, p1)
MPC_ENTRY(UnaryK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  int op = a.i32();
  double p0 = a.num(), p1 = a.num();
  unary(current_stream(), out, x, op, p0, p1);
  return info.Env().Undefined();
}

// binary(out, x, y, op, alpha): out = x OP (alpha * y) for add/sub, x OP y otherwise.
MPC_ENTRY(BinaryK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor(), y = a.tensor();
  int op = a.i32();
  double alpha = a.num();
  binary(current_stream(), out, x, y, op, alpha);
  return info.Env().Undefined();
}

// binaryScalar(out, x, scalar, op, reverse): out = x OP s, or s OP x when reverse.
MPC_ENTRY(BinaryScalarK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  double s = a.num();
  int op = a.i32();
  bool reverse = a.i32() != 0;
  binary_scalar(current_stream(), out, x, s, op, reverse);
  return info.Env().Undefined();
}

// where(out, cond(bool), x, y)
MPC_ENTRY(WhereK) {
  Args a;
  TensorArg out = a.tensor(), cond = a.tensor(), x = a.tensor(), y = a.tensor();
  where(current_stream(), out, cond, x, y);
  return info.Env().Undefined();
}

// accumulateGrad(dst, src): dst += src rounded to dst's dtype
MPC_ENTRY(AccumulateGradK) {
  Args a;
  TensorArg dst = a.tensor(), src = a.tensor();
  accumulate_grad(current_stream(), dst, src);
  return info.Env().Undefined();
}

void register_elementwise(Napi::Env env, Napi::Object exports) {
  exports.Set("accumulateGrad", Napi::Function::New(env, AccumulateGradK));
  exports.Set("unary", Napi::Function::New(env, UnaryK));
  exports.Set("binary", Napi::Function::New(env, BinaryK));
  exports.Set("binaryScalar", Napi::Function::New(env, BinaryScalarK));
  exports.Set("where", Napi::Function::New(env, WhereK));
}

}  // namespace mpc
