// N-API entries of the optimizer kernels (kernels/optim.h), with the argument order of
// @megapatch/tensor's CPU entries (native/src/optim.cc) plus, for the two kernels that return a
// value on the CPU, the device tensor that receives it last: normPowerSum's float64 `out` and
// unscaleCheck's float32 `foundInf` flag (see src/kernels/optim.ts). adamwStepMulti has no CPU
// entry (the CPU loops over adamwStep): it reads a count, then each parameter's four tensors.
#include <vector>

#include "../kernels/optim.h"
#include "glue.h"

namespace mpc {

// The scalars of an AdamW update, in the order src/kernels/optim.ts packs them.
static AdamWParams adamw_params(Args& a) {
  AdamWParams h;
  h.decay = a.num();
  h.beta1 = a.num();
  h.one_minus_beta1 = a.num();
  h.beta2 = a.num();
  h.one_minus_beta2 = a.num();
  h.bc2_sqrt = a.num();
  h.eps = a.num();
  h.neg_step = a.num();
  h.grad_scale = a.num();
  h.grad_scale_ptr = nullptr;
  return h;
}

// After the scalars (and adamwStep's copy): whether the gradient scale is a float64 device tensor,
// then that tensor; its value replaces grad_scale where the kernel runs, and a value that is not
// finite makes the kernel write nothing.
static void adamw_scale_tensor(Args& a, AdamWParams& h, const char* name) {
  if (a.num() == 0) return;
  TensorArg t = a.tensor();
  if (t.dtype != DType::F64 || t.numel() != 1)
    throw_error(std::string(name) + ": gradScaleTensor must be a float64 tensor of one element");
  h.grad_scale_ptr = t.ptr<double>();
}

// adamwStep(param, grad, expAvg, expAvgSq, decay, beta1, 1-beta1, beta2, 1-beta2, bc2Sqrt, eps, negStep,
// gradScale, hasCopy, [copy], hasScaleTensor, [scaleTensor])
MPC_ENTRY(AdamWStepE) {
  Args a;
  TensorArg p = a.tensor(), g = a.tensor(), m = a.tensor(), v = a.tensor();
  AdamWParams h = adamw_params(a);
  const bool has_copy = a.num() != 0;
  TensorArg copy;
  if (has_copy) copy = a.tensor();
  adamw_scale_tensor(a, h, "adamwStep");
  adamw_step(current_stream(), p, g, m, v, has_copy ? &copy : nullptr, h);
  return info.Env().Undefined();
}

// adamwStepMulti(count, hasCopies, count x (param, grad, expAvg, expAvgSq[, copy]), decay, beta1, 1-beta1,
// beta2, 1-beta2, bc2Sqrt, eps, negStep, gradScale, hasScaleTensor, [scaleTensor])
MPC_ENTRY(AdamWStepMultiE) {
  Args a;
  const int count = a.i32();
  if (count < 0) throw_error("adamwStepMulti: negative tensor count");
  const bool has_copies = a.i32() != 0;
  std::vector<TensorArg> p(count), g(count), m(count), v(count), c(has_copies ? count : 0);
  for (int i = 0; i < count; i++) {
    p[i] = a.tensor();
    g[i] = a.tensor();
    m[i] = a.tensor();
    v[i] = a.tensor();
    if (has_copies) c[i] = a.tensor();
  }
  AdamWParams h = adamw_params(a);
  adamw_scale_tensor(a, h, "adamwStepMulti");
  adamw_step_multi(current_stream(), p.data(), g.data(), m.data(), v.data(), has_copies ? c.data() : nullptr, count,
                   h);
  return info.Env().Undefined();
}

// sgdStep(param, grad, hasBuf, [buf], -lr, momentum, 1-dampening, weightDecay, nesterov, first)
MPC_ENTRY(SgdStepE) {
  Args a;
  TensorArg p = a.tensor(), g = a.tensor();
  bool has_buf = a.i32() != 0;
  TensorArg buf;
  if (has_buf) buf = a.tensor();
  SgdParams h;
  h.neg_lr = a.num();
  h.momentum = a.num();
  h.one_minus_dampening = a.num();
  h.weight_decay = a.num();
  h.nesterov = a.i32() != 0;
  h.first = a.i32() != 0;
  sgd_step(current_stream(), p, g, has_buf ? &buf : nullptr, h);
  return info.Env().Undefined();
}

// normPowerSum(t, p, out, accumulate)
MPC_ENTRY(NormPowerSumE) {
  Args a;
  TensorArg t = a.tensor();
  double p = a.num();
  TensorArg out = a.tensor();
  const bool accumulate = a.i32() != 0;
  norm_power_sum(current_stream(), t, p, out, accumulate);
  return info.Env().Undefined();
}

// normPowerSumMulti(count, count x t, p, out, accumulate)
MPC_ENTRY(NormPowerSumMultiE) {
  Args a;
  const int count = a.i32();
  if (count < 0) throw_error("normPowerSumMulti: negative tensor count");
  std::vector<TensorArg> ts(count);
  for (int i = 0; i < count; i++) ts[i] = a.tensor();
  double p = a.num();
  TensorArg out = a.tensor();
  const bool accumulate = a.i32() != 0;
  norm_power_sum_multi(current_stream(), ts.data(), count, p, out, accumulate);
  return info.Env().Undefined();
}

// unscaleCheck(t, invScale, foundInf)
MPC_ENTRY(UnscaleCheckE) {
  Args a;
  TensorArg t = a.tensor();
  double inv = a.num();
  TensorArg found = a.tensor();
  unscale_check(current_stream(), t, inv, found);
  return info.Env().Undefined();
}

void register_optim(Napi::Env env, Napi::Object exports) {
  exports.Set("adamwStep", Napi::Function::New(env, AdamWStepE));
  exports.Set("adamwStepMulti", Napi::Function::New(env, AdamWStepMultiE));
  exports.Set("sgdStep", Napi::Function::New(env, SgdStepE));
  exports.Set("normPowerSum", Napi::Function::New(env, NormPowerSumE));
  exports.Set("normPowerSumMulti", Napi::Function::New(env, NormPowerSumMultiE));
  exports.Set("unscaleCheck", Napi::Function::New(env, UnscaleCheckE));
}

}  // namespace mpc
