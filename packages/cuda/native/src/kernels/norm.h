// Host launchers of the normalisation and RoPE kernels (the CUDA twin of @megapatch/tensor's
// native/src/norm.cc and rope.cc): LayerNorm / RMSNorm forward and backward over contiguous rows
// of N elements, and rotary position embedding in the HF "rotate half" layout.
//
// Arguments are checked as the CPU entries check them, with the same messages.
#pragma once

#include "common.cuh"

namespace mpc {

// y = (x - mean) * rstd * weight + bias per row of n (RMSNorm, center = false: mean 0, no bias).
// x, y contiguous [rows, n]; weight, bias (optional) contiguous [n] in x's dtype; mean (optional)
// and rstd [rows] float32 (float64 for float64 x) receive the statistics (mean 0 for RMSNorm).
void norm_forward(cudaStream_t s, const TensorArg& y, const TensorArg& x, const TensorArg* weight,
                  const TensorArg* bias, const TensorArg* mean, const TensorArg& rstd, int64_t n, double eps,
                  bool center);

// dx from the saved statistics (the saved mean is subtracted whenever it is passed), and when
// given dweight = sum over rows of g * xhat and dbias = sum over rows of g (zeros for 0 rows).
// accumulate: dx already holds a gradient and becomes dx + (the input gradient rounded to dx's
// dtype), the bits of the separate add. params_into_main: dweight / dbias are float32 main
// gradients (gradient-accumulation fusion) that the sums are added to, unrounded.
void norm_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& g, const TensorArg& x,
                   const TensorArg* weight, const TensorArg* mean, const TensorArg& rstd, const TensorArg* dweight,
                   const TensorArg* dbias, int64_t n, bool center, bool accumulate = false,
                   bool params_into_main = false);

// out [B, H, S, D] = rope(x [B, H, S, D]) with cos/sin [B, S, R] (any strides; batch stride 0 for
// shared tables), or its transpose when inverse. Channels R..D are copied.
void rope_apply(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& cos,
                const TensorArg& sin, bool inverse);

}  // namespace mpc
