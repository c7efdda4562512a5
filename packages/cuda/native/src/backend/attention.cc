// N-API entries of the attention family (kernels/attention.h), with the argument order of
// @megapatch/tensor's CPU entries (native/src/attention.cc): the tensors, then hasMask, [mask],
// hasCuSeqlens, [cuSeqlens], causal, scale (see src/kernels/attention.ts).
#include "../kernels/attention.h"
#include "glue.h"

namespace mpc {

namespace {
AttentionOptions read_attention_options(Args& a) {
  AttentionOptions o;
  o.has_mask = a.i32() != 0;
  if (o.has_mask) o.mask = a.tensor();
  o.has_cu = a.i32() != 0;
  if (o.has_cu) o.cu = a.tensor();
  o.causal = a.i32() != 0;
  o.scale = a.num();
  return o;
}
}  // namespace

// attentionForward(out [B,Hq,Sq,Dv], lse [B,Hq,Sq], q, k, v, hasMask, [mask], hasCu, [cu], causal, scale)
MPC_ENTRY(AttentionForwardE) {
  Args a;
  TensorArg out = a.tensor(), lse = a.tensor(), q = a.tensor(), k = a.tensor(), v = a.tensor();
  AttentionOptions o = read_attention_options(a);
  attention_forward(current_stream(), out, lse, q, k, v, o);
  return info.Env().Undefined();
}

// attentionBackward(dq, dk, dv, gradOut, q, k, v, out, lse, hasMask, [mask], hasCu, [cu], causal, scale)
MPC_ENTRY(AttentionBackwardE) {
  Args a;
  TensorArg dq = a.tensor(), dk = a.tensor(), dv = a.tensor(), g = a.tensor(), q = a.tensor(), k = a.tensor(),
            v = a.tensor(), out = a.tensor(), lse = a.tensor();
  AttentionOptions o = read_attention_options(a);
  attention_backward(current_stream(), dq, dk, dv, g, q, k, v, out, lse, o);
  return info.Env().Undefined();
}

void register_attention(Napi::Env env, Napi::Object exports) {
  exports.Set("attentionForward", Napi::Function::New(env, AttentionForwardE));
  exports.Set("attentionBackward", Napi::Function::New(env, AttentionBackwardE));
}

}  // namespace mpc
