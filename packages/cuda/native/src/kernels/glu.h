// Host launchers of the gated activations (the CUDA twin of @megapatch/tensor's native/src/glu.cc):
// SwiGLU / GeGLU / GeGLU-tanh forward out = act(gate) * up over x [rows, 2f] = [gate, up] (gate
// first), and the backward dx = [g * up * act'(gate), g * act(gate)]. Arithmetic in float for
// 16/32-bit floats and in double for float64, one rounding to the storage dtype per output; the
// launchers only enqueue on the given stream.
//
// Arguments are checked as the CPU entries check them, with the same messages. `act` is the code
// of GATED_ACTIVATION_CODES in @megapatch/tensor (src/backend/abi.ts): 0 swiglu, 1 geglu (erf),
// 2 geglu-tanh.
#pragma once

#include "common.cuh"

namespace mpc {

// out [..., f] = act(x[..., :f]) * x[..., f:] for x [..., 2f]; both contiguous, one float dtype.
void gated_activation_forward(cudaStream_t s, const TensorArg& out, const TensorArg& x, int act);

// dx [..., 2f] = [g * up * act'(gate), g * act(gate)] from g [..., f] and the forward's x; all
// contiguous in x's dtype.
void gated_activation_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& g, const TensorArg& x,
                               int act);

}  // namespace mpc
