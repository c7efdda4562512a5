// N-API entries of the gated activations (kernels/glu.h), with the argument order of
// @megapatch/tensor's CPU entries (native/src/glu.cc). See src/kernels/glu.ts.
#include "../kernels/glu.h"
#include "glue.h"

namespace mpc {

// gatedActivationForward(out, x, act)
MPC_ENTRY(GatedActivationForwardE) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  int act = a.i32();
  gated_activation_forward(current_stream(), out, x, act);
  return info.Env().Undefined();
}

// gatedActivationBackward(dx, g, x, act)
MPC_ENTRY(GatedActivationBackwardE) {
  Args a;
  TensorArg dx = a.tensor(), g = a.tensor(), x = a.tensor();
  int act = a.i32();
  gated_activation_backward(current_stream(), dx, g, x, act);
  return info.Env().Undefined();
}

void register_glu(Napi::Env env, Napi::Object exports) {
  exports.Set("gatedActivationForward", Napi::Function::New(env, GatedActivationForwardE));
  exports.Set("gatedActivationBackward", Napi::Function::New(env, GatedActivationBackwardE));
}

}  // namespace mpc
