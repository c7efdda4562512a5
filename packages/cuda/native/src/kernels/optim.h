// Host launchers of the optimizer kernels (the CUDA twin of @megapatch/tensor's
// native/src/optim.cc): fused AdamW and SGD updates (one pass over param, grad and state), the
// per-tensor power sum of gradient-norm clipping, and the unscale + non-finite check of mixed
// precision. Every tensor is contiguous (the TypeScript side makes copies when it is not); the
// launchers check it and throw the CPU backend's messages.
//
// Nothing is returned to the host: normPowerSum writes its result into a float64 device scalar,
// unscaleCheck stores 1.0f into a float32 device flag when it finds inf or NaN.
#pragma once

#include "common.cuh"

namespace mpc {

// Scalars of one AdamW update, computed in double in JavaScript (see AdamWScalars of
// @megapatch/tensor) and cast once to the compute type, as the CPU kernel does.
struct AdamWParams {
  double decay;  // 1 - lr * weight_decay
  double beta1, one_minus_beta1, beta2, one_minus_beta2;
  double bc2_sqrt;  // sqrt(1 - beta2^step)
  double eps;
  double neg_step;  // -lr / (1 - beta1^step)
  double grad_scale;  // g is read as round_G(g * grad_scale), as an in-place multiply (1: as is)
  // or, when set, the scale read on the device from this float64 (a clip coefficient not read
  // back); a value that is not finite skips the update (nothing written)
  const double* grad_scale_ptr;
};

// p (float dtype), g (p's dtype or float32), m and v (float32, float64 for float64 params), all
// contiguous with p's numel:
//   m = m * beta1 + (1 - beta1) g;  v = v * beta2 + (1 - beta2) g g;
//   p = p * decay + negStep * m / (sqrt(v) / bc2Sqrt + eps)
// copy (nullable): also receives the new p rounded to its dtype (p float32, copy bfloat16 or float16).
void adamw_step(cudaStream_t s, const TensorArg& p, const TensorArg& g, const TensorArg& m, const TensorArg& v,
                const TensorArg* copy, const AdamWParams& h);

// Tensors per launch of adamw_step_multi: the launch carries their pointers and sizes in its
// kernel argument (by value, 52 bytes a tensor), which stays well under the 4 KB that every
// CUDA version accepts.
constexpr int kAdamWMultiTensors = 48;

// adamw_step on each of `count` tensors (p[i], g[i], m[i], v[i] as above; one dtype per list),
// bit-identical to count adamw_step calls, in ceil(count / kAdamWMultiTensors) launches (empty
// tensors take no part).
void adamw_step_multi(cudaStream_t s, const TensorArg* p, const TensorArg* g, const TensorArg* m,
                      const TensorArg* v, const TensorArg* copies, int count, const AdamWParams& h);

struct SgdParams {
  double neg_lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, first;  // first: the momentum buffer starts as the (decayed) gradient
};

// d = g + weightDecay p; with buf: b = first ? d : b * momentum + (1 - dampening) d,
// d = nesterov ? d + momentum b : b; then p = p - lr d. buf (nullable) has the state dtype.
void sgd_step(cudaStream_t s, const TensorArg& p, const TensorArg& g, const TensorArg* buf, const SgdParams& h);

// out (float64, 1 element) = sum over t of |x|^p in double (max |x| when p is +-inf; NaN
// propagates; 0 for an empty t). Deterministic: per-block partials in a fixed-size device array,
// combined in block order by the last block of the same launch.
void norm_power_sum(cudaStream_t s, const TensorArg& t, double p, const TensorArg& out, bool accumulate = false);

// The same over a list of tensors of one dtype (empty ones ignored), as if they were one: a few
// launches of a fixed grid striding over their chunks (deterministic; the terms grouped otherwise
// than by norm_power_sum per tensor). out = 0 for an empty list (unless accumulating).
void norm_power_sum_multi(cudaStream_t s, const TensorArg* ts, int count, double p, const TensorArg& out,
                          bool accumulate);

// t *= invScale in place (in t's compute type; skipped when invScale is 1), and found_inf[0] (a
// float32 device flag) = 1 when t held inf or NaN before scaling; the flag is never cleared.
void unscale_check(cudaStream_t s, const TensorArg& t, double inv_scale, const TensorArg& found_inf);

}  // namespace mpc
